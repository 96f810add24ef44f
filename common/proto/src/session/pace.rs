//! A receiver's bandwidth cap (`max-rate`): a token bucket over the bytes
//! the link carried, in virtual time.
//!
//! The shipper asks [`Pacer::wait`] before each batch, giving two counts
//! of the connection: the frame bytes it has written (known at once) and
//! the bytes the transport has put on the wire (for QUIC its UDP payloads:
//! headers, acknowledgements, retransmissions and TLS included, known only
//! once sent). What is charged is the frames plus the most the wire count
//! was ever seen ahead of them: a frame is charged when it is written, the
//! transport's overhead once it shows. (Charging the larger of the two
//! counts instead let frames go uncharged while they caught up with
//! retransmissions the wire count already held: 5-12% over the cap.)
//! Tokens accrue at the cap, at most a burst ahead; a batch may overdraw
//! them, and the next waits until the debt is paid, so over any stretch
//! longer than a few batches the link carries the cap.

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
    /// Bytes charged when last asked.
    counted: u64,
    /// The most the wire count was ever ahead of the frames written: the
    /// transport's overhead (and retransmissions) seen so far.
    overhead: u64,
}

impl Pacer {
    /// Change the cap (a time window began), keeping what is owed and at
    /// most the new burst.
    pub fn set_rate(&mut self, rate: u64, now: Instant) {
        let rate = rate.max(1) as f64;
        if rate == self.rate {
            return;
        }
        let _ = self.charge(now, 0);
        self.rate = rate;
        self.tokens = self.tokens.min(rate * BURST.as_secs_f64());
    }

    /// Forget what was sent so far (sent while the link was not capped)
    /// and start full again from these counts.
    pub fn reset(&mut self, now: Instant, frames: u64, wire: u64) {
        self.at = now;
        self.counted = self.counted.max(self.sent(frames, wire));
        self.tokens = self.rate * BURST.as_secs_f64();
    }

    /// What the link has been charged for, given `frames` (bytes written)
    /// and `wire` (bytes the transport sent), both never decreasing.
    fn sent(&mut self, frames: u64, wire: u64) -> u64 {
        self.overhead = self.overhead.max(wire.saturating_sub(frames));
        frames + self.overhead
    }

    /// A pacer for `rate` bytes per second, starting full.
    pub fn new(rate: u64, now: Instant) -> Pacer {
        let rate = rate.max(1) as f64;
        Pacer {
            rate,
            tokens: rate * BURST.as_secs_f64(),
            at: now,
            counted: 0,
            overhead: 0,
        }
    }

    /// How long to wait before sending more, given the frame bytes written
    /// so far on the link and the bytes its transport sent (both never
    /// decreasing).
    pub fn wait(&mut self, now: Instant, frames: u64, wire: u64) -> Duration {
        let sent = self.sent(frames, wire);
        self.charge(now, sent.saturating_sub(self.counted))
    }

    /// Accrue tokens up to `now`, take `bytes` newly sent, and say how long
    /// the debt takes to pay.
    fn charge(&mut self, now: Instant, bytes: u64) -> Duration {
        let dt = now.saturating_duration_since(self.at).as_secs_f64();
        self.at = now;
        let burst = self.rate * BURST.as_secs_f64();
        self.tokens = (self.tokens + self.rate * dt).min(burst);
        self.tokens -= bytes as f64;
        self.counted += bytes;
        if self.tokens >= 0.0 {
            Duration::ZERO
        } else {
            Duration::from_secs_f64(-self.tokens / self.rate)
        }
    }
}

/// What a link may carry: without limit, a cap in bytes per second, or
/// nothing (a closed window).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Rate {
    Unlimited,
    Bytes(u64),
    Closed,
}

/// A time window of the local day, `[from, to)` in seconds since local
/// midnight; `from > to` spans midnight.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Window {
    pub from: u32,
    pub to: u32,
    pub rate: Rate,
}

impl Window {
    fn holds(&self, sec: u32) -> bool {
        if self.from <= self.to {
            (self.from..self.to).contains(&sec)
        } else {
            sec >= self.from || sec < self.to
        }
    }
}

pub const DAY: u32 = 24 * 3600;

/// A receiver's `schedule`: the first window holding the time of day
/// decides the rate; outside every window, `otherwise` (its `max-rate`, or
/// no limit).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Schedule {
    pub windows: Vec<Window>,
    pub otherwise: Rate,
}

impl Schedule {
    /// The rate in force at `sec` (seconds since local midnight), the
    /// window that sets it (`None`: outside every window), and the seconds
    /// until the next window starts or ends.
    pub fn at(&self, sec: u32) -> (Rate, Option<usize>, u32) {
        let sec = sec % DAY;
        let found = self.windows.iter().position(|w| w.holds(sec));
        let rate = found.map_or(self.otherwise, |i| self.windows[i].rate);
        let next = self
            .windows
            .iter()
            .flat_map(|w| [w.from, w.to])
            .map(|b| (b + DAY - sec) % DAY)
            .filter(|&d| d > 0)
            .min()
            .unwrap_or(DAY);
        (rate, found, next)
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
            let w = p.wait(now, sent, 0);
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
        assert_eq!(p.wait(later, 0, 0), Duration::ZERO);
        assert_eq!(p.wait(later, 25_000, 0), Duration::ZERO);
        let w = p.wait(later, 35_000, 0);
        assert_eq!(w, Duration::from_millis(100), "10 KB of debt at 100 KB/s");
    }

    #[test]
    fn the_first_window_holding_the_time_sets_the_rate_and_midnight_is_crossed() {
        let h = |h: u32| h * 3600;
        let s = Schedule {
            windows: vec![
                // Full rate at night, closed at lunch.
                Window {
                    from: h(22),
                    to: h(6),
                    rate: Rate::Unlimited,
                },
                Window {
                    from: h(12),
                    to: h(13),
                    rate: Rate::Closed,
                },
            ],
            otherwise: Rate::Bytes(8000),
        };
        assert_eq!(s.at(h(23)), (Rate::Unlimited, Some(0), h(7)));
        assert_eq!(s.at(h(2)), (Rate::Unlimited, Some(0), h(4)));
        assert_eq!(s.at(h(6)), (Rate::Bytes(8000), None, h(6)));
        assert_eq!(s.at(h(12) + 30), (Rate::Closed, Some(1), 3600 - 30));
        assert_eq!(s.at(h(13)), (Rate::Bytes(8000), None, h(9)));
        assert_eq!(s.at(h(21) + 3599), (Rate::Bytes(8000), None, 1));
        let none = Schedule {
            windows: vec![],
            otherwise: Rate::Unlimited,
        };
        assert_eq!(none.at(5), (Rate::Unlimited, None, DAY));
    }

    #[test]
    fn a_new_rate_keeps_the_debt_and_at_most_the_new_burst() {
        let t0 = Instant::now();
        let mut p = Pacer::new(100_000, t0);
        assert_eq!(p.wait(t0, 45_000, 0), Duration::from_millis(200));
        // Half the rate: the same 20 KB of debt takes twice as long.
        p.set_rate(50_000, t0);
        assert_eq!(p.wait(t0, 45_000, 0), Duration::from_millis(400));
    }

    #[test]
    fn bytes_counted_twice_are_not_charged_twice() {
        let t0 = Instant::now();
        let mut p = Pacer::new(1000, t0);
        assert_eq!(p.wait(t0, 250, 0), Duration::ZERO);
        // The same totals again (QUIC had not sent more): nothing new.
        assert_eq!(p.wait(t0, 250, 0), Duration::ZERO);
        // The wire catching up with the frames already charged: nothing.
        assert_eq!(p.wait(t0, 250, 250), Duration::ZERO);
        assert_eq!(p.wait(t0, 350, 250), Duration::from_millis(100));
        // The transport's overhead once it shows: 50 bytes more.
        assert_eq!(p.wait(t0, 350, 400), Duration::from_millis(150));
    }

    /// A transport that sends what was written a little later, with 3% of
    /// headers, and now and then resends a burst it took for lost (QUIC on
    /// a busy machine: a late acknowledgement looks like a loss): in every
    /// second of a minute, what it put on the wire stays within the cap,
    /// the burst and two batches (a measurement over any stretch sees the
    /// cap, not bursts paid for by pauses).
    #[test]
    fn the_wire_holds_the_cap_in_every_second_when_the_transport_resends() {
        let (rate, batch) = (500_000u64, 42_000u64);
        let t0 = Instant::now();
        let mut p = Pacer::new(rate, t0);
        let (mut frames, mut wire) = (0u64, 0u64);
        // Written but not yet on the wire.
        let mut queued = 0u64;
        // The wire count at each millisecond.
        let mut at_ms = Vec::new();
        let mut wait_until = t0;
        for ms in 0..60_000u64 {
            let now = t0 + Duration::from_millis(ms);
            // The transport sends what was written 20 ms later at the
            // earliest, and resends 100 kB every second.
            if ms % 20 == 0 {
                wire += queued * 103 / 100;
                queued = 0;
            }
            if ms % 1000 == 500 {
                wire += 100_000;
            }
            if now >= wait_until {
                let w = p.wait(now, frames, wire);
                if w.is_zero() {
                    frames += batch;
                    queued += batch;
                } else {
                    wait_until = now + w;
                }
            }
            at_ms.push(wire);
        }
        let allowed = rate + rate / 4 + 2 * batch + 100_000;
        let worst = (1000..at_ms.len())
            .map(|i| at_ms[i] - at_ms[i - 1000])
            .max()
            .unwrap_or(0);
        assert!(
            worst <= allowed,
            "{worst} bytes on the wire in one second at a cap of {rate} B/s: {:.1}% over",
            (worst as f64 / rate as f64 - 1.0) * 100.0
        );
        // And the cap is used: the resends take their share from the frames.
        assert!(wire >= rate * 59, "{wire} bytes on the wire in 60 s");
    }
}
