//! Exponential backoff with jitter, and the "say it once" rule for logs: a
//! daemon retrying a transient fault logs when the fault starts or changes,
//! not on every attempt.

use std::time::Duration;

use rand::Rng;

pub struct Backoff {
    current: Duration,
    min: Duration,
    max: Duration,
    last_message: Option<String>,
}

impl Backoff {
    pub fn new(max: Duration) -> Backoff {
        let min = Duration::from_millis(100).min(max);
        Backoff {
            current: min,
            min,
            max,
            last_message: None,
        }
    }

    /// The next delay: doubles up to `max`, with up to 25% jitter.
    pub fn next(&mut self) -> Duration {
        let base = self.current;
        self.current = (self.current * 2).min(self.max);
        let jitter = rand::thread_rng().gen_range(0.0..0.25);
        base.mul_f64(1.0 + jitter).min(self.max)
    }

    /// Back to the shortest delay, after success. Returns true when a fault
    /// had been reported, so the caller can say it is over.
    pub fn reset(&mut self) -> bool {
        self.current = self.min;
        self.last_message.take().is_some()
    }

    /// Log `error` at WARN unless it is the same as the last one logged.
    pub fn log_once(&mut self, what: &str, error: &dyn std::error::Error, retry_in: Duration) {
        let message = error_chain(error);
        if self.last_message.as_deref() != Some(message.as_str()) {
            tracing::warn!(error = %message, retry_in = ?retry_in, "{what}: retrying with backoff (logged once until it changes)");
            self.last_message = Some(message);
        }
    }
}

/// An error and its causes on one line.
pub fn error_chain(e: &dyn std::error::Error) -> String {
    let mut s = e.to_string();
    let mut cur = e.source();
    while let Some(c) = cur {
        let text = c.to_string();
        if !s.ends_with(&text) {
            s.push_str(": ");
            s.push_str(&text);
        }
        cur = c.source();
    }
    s
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backoff_grows_to_its_cap_and_resets() {
        let mut b = Backoff::new(Duration::from_secs(2));
        let mut last = Duration::ZERO;
        for _ in 0..20 {
            last = b.next();
            assert!(last <= Duration::from_secs(2));
        }
        assert!(last >= Duration::from_millis(1600));
        b.reset();
        assert!(b.next() < Duration::from_millis(200));
    }
}
