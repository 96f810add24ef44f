//! A one-line progress bar for the seed commands, drawn by `indicatif` on
//! stderr, and only when stderr is a terminal (hidden in logs and pipes).

/// Draws `label [#####.....]  42% 1.2M/2.9M rows 310k rows/s ETA 6s`; the
/// counts, rate and ETA are the daemon's (a copy's progress in its status).
#[derive(Default)]
pub struct Bar {
    bar: Option<indicatif::ProgressBar>,
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

/// What follows the bar: `1.2M/2.9M rows 310k rows/s ETA 6s`.
fn counts(done: u64, total: u64, rate: f64, eta: Option<f64>) -> String {
    let eta = eta.map_or(String::new(), |s| format!(" ETA {}s", s.round() as u64));
    format!(
        "{}/{} rows {} rows/s{eta}",
        short(done as f64),
        short(total as f64),
        short(rate),
    )
}

/// The bar as text, for screens that are redrawn whole (`pgcourier-queue
/// watch`).
pub fn line(label: &str, done: u64, total: u64, rate: f64, eta: Option<f64>) -> String {
    const WIDTH: usize = 24;
    let frac = if total > 0 {
        (done as f64 / total as f64).min(1.0)
    } else {
        0.0
    };
    let filled = (frac * WIDTH as f64).round() as usize;
    format!(
        "{label} [{}{}] {:>3.0}% {}",
        "#".repeat(filled),
        ".".repeat(WIDTH - filled),
        frac * 100.0,
        counts(done, total, rate, eta),
    )
}

impl Bar {
    pub fn draw(&mut self, label: &str, done: u64, total: u64, rate: f64, eta: Option<f64>) {
        let bar = self.bar.get_or_insert_with(|| {
            let bar = indicatif::ProgressBar::with_draw_target(
                Some(total),
                indicatif::ProgressDrawTarget::hidden(),
            );
            bar.set_style(
                indicatif::ProgressStyle::with_template("{prefix} [{bar:24}] {percent:>3}% {msg}")
                    .expect("a valid template")
                    .progress_chars("#."),
            );
            bar.set_prefix(label.to_owned());
            bar.set_message(counts(done, total, rate, eta));
            bar.set_draw_target(indicatif::ProgressDrawTarget::stderr());
            bar
        });
        bar.set_prefix(label.to_owned());
        bar.set_message(counts(done, total, rate, eta));
        bar.set_length(total);
        bar.set_position(done);
    }

    /// End the bar's line (it stays on the terminal as last drawn).
    pub fn finish(&mut self) {
        if let Some(bar) = self.bar.take() {
            bar.abandon();
        }
    }

    /// Whether nothing is drawn (stderr is not a terminal).
    pub fn is_hidden(&self) -> bool {
        self.bar.as_ref().is_none_or(|b| b.is_hidden())
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

    /// Under `cargo test` stderr is captured or a pipe: nothing is drawn.
    /// On a terminal (`cargo test -- --nocapture` in one) the bar shows.
    #[test]
    fn the_bar_is_hidden_when_stderr_is_not_a_terminal() {
        use std::io::IsTerminal;
        let mut bar = Bar::default();
        bar.draw("seed export", 5, 10, 1.0, Some(5.0));
        assert_eq!(bar.is_hidden(), !std::io::stderr().is_terminal());
        bar.finish();
    }
}
