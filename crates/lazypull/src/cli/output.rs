//! How the commands show progress and sizes: progress bars (drawn on stderr
//! only when it is a terminal, hidden with `--json`) and human byte counts.
//! Presentation only.

use indicatif::{ProgressBar, ProgressStyle};

/// A spinner to restyle as the work goes (hidden: draws nothing).
pub(crate) fn progress_bar(hidden: bool) -> ProgressBar {
    if hidden {
        ProgressBar::hidden()
    } else {
        // Draws on stderr only when it is a terminal.
        let pb = ProgressBar::new_spinner();
        pb.enable_steady_tick(std::time::Duration::from_millis(120));
        pb
    }
}

/// A byte bar of `total` bytes, with a rate and an ETA.
pub(crate) fn byte_bar(hidden: bool, total: u64, msg: &str) -> ProgressBar {
    let pb = if hidden {
        ProgressBar::hidden()
    } else {
        ProgressBar::new(total)
    };
    pb.set_style(
        ProgressStyle::with_template(
            "{msg} [{bar:30}] {bytes}/{total_bytes} {binary_bytes_per_sec} eta {eta}",
        )
        .expect("static template")
        .progress_chars("=> "),
    );
    pb.set_message(msg.to_owned());
    pb
}

/// `bytes` as a human reads it: "1.50 MiB".
pub(crate) fn human(bytes: u64) -> String {
    indicatif::HumanBytes(bytes).to_string()
}

/// An error and its causes on one line, `outer: cause: its cause`, each
/// said once: a cause whose text ends the line so far is already in it (an
/// error whose message embeds its source, as `path: io error` does, would
/// otherwise print that source twice).
pub fn error_text(e: &anyhow::Error) -> String {
    let mut out = String::new();
    for cause in e.chain() {
        let s = cause.to_string();
        if s.is_empty() || out.ends_with(&s) {
            continue;
        }
        if !out.is_empty() {
            out.push_str(": ");
        }
        out.push_str(&s);
    }
    out
}
