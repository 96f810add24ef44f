//! A receiver's bandwidth cap (`max-rate`): a token bucket over the bytes
//! the link carried, in virtual time.
//!
//! The shipper asks [`Pacer::wait`] before each batch, giving the bytes
//! sent so far on the connection: the larger of the frames it has written
//! (known at once) and what QUIC has put in UDP datagrams (headers,
//! acknowledgements, retransmissions and TLS included, known only once
//! sent). Tokens accrue at the cap, at most a burst ahead; a batch may
//! overdraw them, and the next waits until the debt is paid, so over any
//! stretch longer than a few batches the link carries the cap.

use std::time::{Duration, Instant};

/// The most a link may run ahead of its cap after an idle spell: this long
/// at the cap.
const BURST: Duration = Duration::from_millis(250);

#[derive(Debug)]
pub struct Pacer {
    /// The cap, bytes per second.
    rate: f64,
    /// Tokens (bytes) in the bucket; negative: a debt.
    tokens: f64,
    at: Instant,
    /// Bytes sent when last asked.
    counted: u64,
}

impl Pacer {
    /// A pacer for `rate` bytes per second, starting full.
    pub fn new(rate: u64, now: Instant) -> Pacer {
        let rate = rate.max(1) as f64;
        Pacer {
            rate,
            tokens: rate * BURST.as_secs_f64(),
            at: now,
            counted: 0,
        }
    }

    /// How long to wait before sending more, given `sent`, the bytes sent
    /// so far on the link (never decreasing).
    pub fn wait(&mut self, now: Instant, sent: u64) -> Duration {
        let dt = now.saturating_duration_since(self.at).as_secs_f64();
        self.at = now;
        let burst = self.rate * BURST.as_secs_f64();
        self.tokens = (self.tokens + self.rate * dt).min(burst);
        self.tokens -= sent.saturating_sub(self.counted) as f64;
        self.counted = self.counted.max(sent);
        if self.tokens >= 0.0 {
            Duration::ZERO
        } else {
            Duration::from_secs_f64(-self.tokens / self.rate)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A sender that sends `batch` bytes whenever the pacer lets it, for
    /// `secs` of virtual time: the bytes it sent.
    fn run(rate: u64, batch: u64, secs: u64) -> u64 {
        let t0 = Instant::now();
        let mut p = Pacer::new(rate, t0);
        let (mut now, mut sent) = (t0, 0u64);
        while now < t0 + Duration::from_secs(secs) {
            let w = p.wait(now, sent);
            if w.is_zero() {
                sent += batch;
            } else {
                now += w;
            }
        }
        sent
    }

    #[test]
    fn the_rate_over_time_is_the_cap_whatever_the_batch_size() {
        for (rate, batch) in [(32_000, 48 << 10), (250_000, 1400), (1_000_000, 300 << 10)] {
            let sent = run(rate, batch, 60);
            let expected = rate as f64 * 60.0;
            let err = (sent as f64 - expected).abs() / expected;
            // At most one batch and the burst beyond the cap.
            let slack = (batch as f64 + rate as f64 * 0.25) / expected;
            assert!(
                err <= slack + 1e-9,
                "rate {rate} B/s, batches of {batch}: sent {sent} in 60 s, {:.2}% off",
                err * 100.0
            );
        }
    }

    #[test]
    fn an_idle_spell_earns_no_more_than_the_burst() {
        let t0 = Instant::now();
        let mut p = Pacer::new(100_000, t0);
        // Idle for a minute: still only 250 ms worth may go at once.
        let later = t0 + Duration::from_secs(60);
        assert_eq!(p.wait(later, 0), Duration::ZERO);
        assert_eq!(p.wait(later, 25_000), Duration::ZERO);
        let w = p.wait(later, 35_000);
        assert_eq!(w, Duration::from_millis(100), "10 KB of debt at 100 KB/s");
    }

    #[test]
    fn bytes_counted_twice_are_not_charged_twice() {
        let t0 = Instant::now();
        let mut p = Pacer::new(1000, t0);
        assert_eq!(p.wait(t0, 250), Duration::ZERO);
        // The same total again (QUIC had not sent more): nothing new.
        assert_eq!(p.wait(t0, 250), Duration::ZERO);
        assert_eq!(p.wait(t0, 350), Duration::from_millis(100));
    }
}
