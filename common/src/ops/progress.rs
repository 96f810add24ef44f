//! A one-line progress bar for the seed commands, drawn on stderr only when
//! it is a terminal.

use std::io::{IsTerminal, Write};

/// Draws `label [#####.....] 42% 1.2M/2.9M rows 310k rows/s ETA 6s`.
pub struct Bar {
    tty: bool,
    drawn: bool,
}

impl Default for Bar {
    fn default() -> Self {
        Bar {
            tty: std::io::stderr().is_terminal(),
            drawn: false,
        }
    }
}

fn short(n: f64) -> String {
    if n >= 1e9 {
        format!("{:.1}G", n / 1e9)
    } else if n >= 1e6 {
        format!("{:.1}M", n / 1e6)
    } else if n >= 1e3 {
        format!("{:.1}k", n / 1e3)
    } else {
        format!("{n:.0}")
    }
}

/// The bar's text (without the carriage return).
pub fn line(label: &str, done: u64, total: u64, rate: f64, eta: Option<f64>) -> String {
    const WIDTH: usize = 24;
    let frac = if total > 0 {
        (done as f64 / total as f64).min(1.0)
    } else {
        0.0
    };
    let filled = (frac * WIDTH as f64).round() as usize;
    let eta = eta.map_or(String::new(), |s| format!(" ETA {}s", s.round() as u64));
    format!(
        "{label} [{}{}] {:>3.0}% {}/{} rows {} rows/s{eta}",
        "#".repeat(filled),
        ".".repeat(WIDTH - filled),
        frac * 100.0,
        short(done as f64),
        short(total as f64),
        short(rate),
    )
}

impl Bar {
    pub fn draw(&mut self, label: &str, done: u64, total: u64, rate: f64, eta: Option<f64>) {
        if !self.tty {
            return;
        }
        let mut err = std::io::stderr().lock();
        let _ = write!(err, "\r\x1b[2K{}", line(label, done, total, rate, eta));
        let _ = err.flush();
        self.drawn = true;
    }

    /// End the bar's line.
    pub fn finish(&mut self) {
        if self.drawn {
            eprintln!();
            self.drawn = false;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bar_shows_share_counts_rate_and_eta() {
        assert_eq!(
            line("copy", 500, 1000, 2500.0, Some(0.2)),
            "copy [############............]  50% 500/1.0k rows 2.5k rows/s ETA 0s"
        );
        assert!(line("x", 5, 0, 0.0, None).contains("  0%"));
    }
}
