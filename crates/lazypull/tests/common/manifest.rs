//! Comparing `lazypull-testkit manifest` outputs: what a guest scenario read
//! through a mount against what the host expects of the image's source.

/// The manifest line of the tree's root directory (path "." or "/" or empty):
/// compared apart (its metadata is the mount point's in some cases).
pub fn is_root_line(line: &str) -> bool {
    let path = line.split('\t').next().unwrap_or("");
    path.is_empty() || path == "." || path == "/"
}

/// Fails, quoting the first differences, unless `got` lists the same
/// entries as `want` (both without their root line, in any order); `what`
/// names the comparison. Returns the number of entries.
pub fn assert_same_manifest(want: &str, got: &str, what: &str) -> usize {
    let sorted = |text: &str| -> Vec<String> {
        let mut v: Vec<String> = text
            .lines()
            .filter(|l| !is_root_line(l))
            .map(str::to_owned)
            .collect();
        v.sort_unstable();
        v
    };
    let (want, got) = (sorted(want), sorted(got));
    let diff: Vec<String> = want
        .iter()
        .zip(&got)
        .filter(|(w, g)| w != g)
        .take(10)
        .map(|(w, g)| format!("want {w}\n got {g}"))
        .collect();
    assert!(
        diff.is_empty() && want.len() == got.len(),
        "{what}: the mounted tree differs from its source ({} vs {} entries):\n{}",
        got.len(),
        want.len(),
        diff.join("\n")
    );
    want.len()
}
