//! Comparing two manifests (or two directory trees) entry by entry.

use std::collections::BTreeMap;
use std::fmt;
use std::io;
use std::path::Path;

use crate::manifest::{escape, render_line, scan_with, Entry, ScanOptions};

/// One difference between side A and side B.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Difference {
    /// Path present only in A (with A's line).
    OnlyInA(String),
    /// Path present only in B (with B's line).
    OnlyInB(String),
    /// Same path, different lines.
    Differs {
        /// Escaped path.
        path: String,
        /// A's line.
        a: String,
        /// B's line.
        b: String,
    },
}

impl fmt::Display for Difference {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Difference::OnlyInA(l) => write!(f, "only in A: {l}"),
            Difference::OnlyInB(l) => write!(f, "only in B: {l}"),
            Difference::Differs { path, a, b } => {
                write!(f, "differs: {path}\n  A: {a}\n  B: {b}")
            }
        }
    }
}

/// Compare two manifests; differences in path order.
pub fn compare_entries(a: &[Entry], b: &[Entry]) -> Vec<Difference> {
    let ma: BTreeMap<&[u8], String> = a
        .iter()
        .map(|e| (e.path.as_slice(), render_line(e)))
        .collect();
    let mb: BTreeMap<&[u8], String> = b
        .iter()
        .map(|e| (e.path.as_slice(), render_line(e)))
        .collect();
    let mut out = Vec::new();
    let mut keys: Vec<&[u8]> = ma.keys().chain(mb.keys()).copied().collect();
    keys.sort();
    keys.dedup();
    for k in keys {
        match (ma.get(k), mb.get(k)) {
            (Some(x), None) => out.push(Difference::OnlyInA(x.clone())),
            (None, Some(y)) => out.push(Difference::OnlyInB(y.clone())),
            (Some(x), Some(y)) if x != y => out.push(Difference::Differs {
                path: escape(k),
                a: x.clone(),
                b: y.clone(),
            }),
            _ => {}
        }
    }
    out
}

/// Scan and compare two directory trees.
pub fn compare_dirs(a: &Path, b: &Path) -> io::Result<Vec<Difference>> {
    compare_dirs_with(a, b, &ScanOptions::default())
}

/// Scan (with `opts`) and compare two directory trees.
pub fn compare_dirs_with(a: &Path, b: &Path, opts: &ScanOptions) -> io::Result<Vec<Difference>> {
    let ea = scan_with(a, opts)?;
    let eb = scan_with(b, opts)?;
    Ok(compare_entries(&ea, &eb))
}

/// Format up to `limit` differences, with a trailing count of the rest.
pub fn format_differences(diffs: &[Difference], limit: usize) -> String {
    let mut s = String::new();
    for d in diffs.iter().take(limit) {
        s.push_str(&d.to_string());
        s.push('\n');
    }
    if diffs.len() > limit {
        s.push_str(&format!(
            "... and {} more differences\n",
            diffs.len() - limit
        ));
    }
    s
}
