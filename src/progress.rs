//! Output for people: progress on stderr (a bar with throughput and ETA when stderr is a terminal,
//! nothing animated otherwise, so logs and --json stay clean for scripts), and the one place sizes
//! are formatted for reading.

use indicatif::{ProgressBar, ProgressDrawTarget, ProgressStyle};
use std::io::IsTerminal;

pub struct Progress {
    bar: Option<ProgressBar>,
}

impl Progress {
    /// A bar only when stderr is a terminal and the user did not ask for quiet.
    pub fn new(enabled: bool) -> Progress {
        let bar = (enabled && std::io::stderr().is_terminal()).then(|| {
            let b = ProgressBar::with_draw_target(None, ProgressDrawTarget::stderr_with_hz(4));
            b.set_style(
                ProgressStyle::with_template(
                    "{msg}\n{wide_bar} {percent:>3}%  {bytes}/{total_bytes}  {bytes_per_sec}  ETA {eta}",
                )
                .expect("valid template"),
            );
            b
        });
        Progress { bar }
    }

    pub fn hidden() -> Progress {
        Progress { bar: None }
    }

    pub fn start(&self, total: u64, what: &str) {
        if let Some(b) = &self.bar {
            b.set_length(total);
            b.set_position(0);
            b.set_message(what.to_string());
            b.reset_eta();
        }
    }

    pub fn advance(&self, n: u64) {
        if let Some(b) = &self.bar {
            b.inc(n);
        }
    }

    pub fn finish(&self) {
        if let Some(b) = &self.bar {
            b.finish_and_clear();
        }
    }
}

/// A size for a sentence: "1.5 GiB (1610612736 bytes)", exact bytes kept because people compare
/// them with what other tools print.
pub fn human_bytes(n: u64) -> String {
    const UNITS: [&str; 6] = ["B", "KiB", "MiB", "GiB", "TiB", "PiB"];
    let (v, u) = scaled(n, UNITS.len());
    if u == 0 {
        format!("{n} B")
    } else {
        format!("{v:.1} {} ({n} bytes)", UNITS[u])
    }
}

/// A size for a table column: "1.5G".
pub fn short_bytes(n: u64) -> String {
    const UNITS: [&str; 6] = ["B", "K", "M", "G", "T", "P"];
    let (v, u) = scaled(n, UNITS.len());
    if u == 0 {
        format!("{n}B")
    } else {
        format!("{v:.1}{}", UNITS[u])
    }
}

/// `n` in the largest binary unit (index into a unit list of `units` entries) that keeps it >= 1.
fn scaled(n: u64, units: usize) -> (f64, usize) {
    let mut v = n as f64;
    let mut u = 0;
    while v >= 1024.0 && u < units - 1 {
        v /= 1024.0;
        u += 1;
    }
    (v, u)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes_read_the_same_everywhere() {
        assert_eq!(human_bytes(0), "0 B");
        assert_eq!(human_bytes(1023), "1023 B");
        assert_eq!(human_bytes(1536), "1.5 KiB (1536 bytes)");
        assert_eq!(human_bytes(2 << 40), "2.0 TiB (2199023255552 bytes)");
        assert_eq!(short_bytes(1023), "1023B");
        assert_eq!(short_bytes(1536), "1.5K");
        assert_eq!(short_bytes(3 << 30), "3.0G");
        assert_eq!(short_bytes(u64::MAX), "16384.0P");
    }
}
