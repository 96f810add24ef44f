//! The link model: one direction of an emulated link as a pure, deterministic
//! state machine.
//!
//! ```text
//!  packet (now, len)
//!    │ outage? (commanded or scheduled) ─────────────▶ Drop(Outage)
//!    │ len > mtu? ───────────────────────────────────▶ Drop(TooBig)
//!    ▼
//!  bottleneck queue (queue_bytes) ── would overflow ─▶ Drop(QueueFull)   tail drop
//!    │ waits for the transmitter (queue delay)
//!    ▼
//!  transmitter (rate_bps): departs when its last bit is sent
//!    │ Gilbert-Elliott bad state ────────────────────▶ Drop(BurstLoss)
//!    │ random loss ──────────────────────────────────▶ Drop(Loss)
//!    ▼
//!  propagation: delay ± jitter (monotonic), reorder extra delay,
//!  duplicate, corrupt one bit ───────────────────────▶ Deliver { at, .. }
//! ```
//!
//! The model never reads a clock: time is passed in as `now`, a [`Duration`]
//! since the link's epoch, and the verdict says when the packet arrives at
//! the far end. The relays (`udp`, `tcp`) are thin drivers that feed it real
//! arrival times and deliver at the times it returns; the tests drive it in
//! virtual time.
//!
//! Lost packets are lost *on the wire*, after the queue: they used their share
//! of the bandwidth, as on a radio or satellite hop. Outage and MTU drops
//! happen at the entrance and use nothing. A packet is judged once, when it
//! enters the link: packets already past the entrance when an outage begins
//! are still delivered.
//!
//! Every random decision draws from its own ChaCha8 stream of the seed, so
//! enabling one knob (say duplication) does not change the pattern of another
//! (say loss) for the same seed.

use std::time::Duration;

use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use serde::Serialize;

/// Parameters of one direction of a link. `LinkParams::default()` is a clean
/// link: no delay, no loss, unlimited rate.
#[derive(Clone, Debug, PartialEq)]
pub struct LinkParams {
    /// One-way propagation delay added to every packet.
    pub delay: Duration,
    /// Uniform jitter: each packet's delay is drawn from `delay ± jitter`.
    /// Delivery times never go backwards (a packet is not delivered before
    /// the one sent ahead of it, as on a real serial link): a draw that would
    /// overtake is raised to the previous delivery time. So when packets come
    /// closer together than the jitter's span, delays lean toward
    /// `delay + jitter`; they stay within the bounds. Only `reorder` reorders.
    pub jitter: Duration,
    /// Probability that a packet is lost on the wire, independently of others.
    pub loss: f64,
    /// Bursty (Gilbert-Elliott) loss, applied before and independently of `loss`.
    pub burst_loss: Option<BurstLoss>,
    /// Bottleneck rate in bits per second; `None` is unlimited (no queue).
    pub rate_bps: Option<u64>,
    /// Bytes the bottleneck queue holds besides the packet being sent; a
    /// packet that would overflow it is tail-dropped. Only with `rate_bps`.
    /// Default 64 KiB. Trade-off: a bigger queue drops less and delays more
    /// (the worst queue delay is `queue_bytes * 8 / rate_bps`).
    pub queue_bytes: u64,
    /// Probability that a delivered packet is delivered twice (the copy at
    /// the same time, right after it; the copy uses no bandwidth).
    pub duplicate: f64,
    /// Probability that a packet is held back by `reorder_delay`, letting
    /// later packets overtake it. The others keep their order.
    pub reorder: f64,
    /// Extra delay of a reordered packet. Default 10 ms.
    pub reorder_delay: Duration,
    /// Probability that one bit of a delivered packet is flipped.
    pub corrupt: f64,
    /// Largest datagram the link carries; larger ones are dropped.
    pub mtu: Option<usize>,
    /// Scheduled outages.
    pub outage: Option<OutageSchedule>,
}

impl Default for LinkParams {
    fn default() -> Self {
        LinkParams {
            delay: Duration::ZERO,
            jitter: Duration::ZERO,
            loss: 0.0,
            burst_loss: None,
            rate_bps: None,
            queue_bytes: 64 * 1024,
            duplicate: 0.0,
            reorder: 0.0,
            reorder_delay: Duration::from_millis(10),
            corrupt: 0.0,
            mtu: None,
            outage: None,
        }
    }
}

impl LinkParams {
    /// Check that every probability is in [0, 1] and the rate and outage
    /// schedule make sense.
    pub fn validate(&self) -> Result<(), ParamError> {
        let probabilities = [
            ("loss", self.loss),
            ("duplicate", self.duplicate),
            ("reorder", self.reorder),
            ("corrupt", self.corrupt),
        ];
        let burst = self.burst_loss.iter().flat_map(|b| {
            [
                ("burst-loss p_good_to_bad", b.p_good_to_bad),
                ("burst-loss p_bad_to_good", b.p_bad_to_good),
                ("burst-loss loss_in_bad", b.loss_in_bad),
            ]
        });
        for (knob, value) in probabilities.into_iter().chain(burst) {
            if !(0.0..=1.0).contains(&value) {
                return Err(ParamError::Probability { knob, value });
            }
        }
        if self.rate_bps == Some(0) {
            return Err(ParamError::ZeroRate);
        }
        if let Some(o) = &self.outage {
            if o.every.is_zero() || o.down_for >= o.every {
                return Err(ParamError::Outage {
                    every: o.every,
                    down_for: o.down_for,
                });
            }
        }
        Ok(())
    }

    /// The knobs that make sense for a byte stream: delay, jitter (kept
    /// monotonic), rate, queue and outages. Loss, duplication, reordering,
    /// corruption and the MTU are cleared: the kernel's TCP runs below the
    /// relay and would hide them by retransmitting.
    pub fn for_stream(&self) -> LinkParams {
        LinkParams {
            loss: 0.0,
            burst_loss: None,
            duplicate: 0.0,
            reorder: 0.0,
            corrupt: 0.0,
            mtu: None,
            ..self.clone()
        }
    }
}

/// Gilbert-Elliott bursty loss: a two-state Markov chain stepped once per
/// packet on the wire; in the bad state each packet is lost with
/// `loss_in_bad`. Mean burst (bad-state) length is `1 / p_bad_to_good` packets.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct BurstLoss {
    pub p_good_to_bad: f64,
    pub p_bad_to_good: f64,
    pub loss_in_bad: f64,
}

/// The link is down for `down_for` every `every`, the first time at `offset`
/// after the epoch: down in `[offset + k*every, offset + k*every + down_for)`.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct OutageSchedule {
    pub every: Duration,
    pub down_for: Duration,
    pub offset: Duration,
}

impl OutageSchedule {
    /// A schedule that starts up: the first outage begins at `every - down_for`.
    pub fn starting_up(every: Duration, down_for: Duration) -> OutageSchedule {
        OutageSchedule {
            every,
            down_for,
            offset: every.saturating_sub(down_for),
        }
    }

    /// Whether `now` is inside an outage window.
    pub fn covers(&self, now: Duration) -> bool {
        self.window_start(now)
            .is_some_and(|start| now < start + self.down_for)
    }

    /// The end of the window covering `now`, or `now` when none does.
    pub fn up_at(&self, now: Duration) -> Duration {
        match self.window_start(now) {
            Some(start) if now < start + self.down_for => start + self.down_for,
            _ => now,
        }
    }

    /// The next instant after `now` at which the link goes down or comes up.
    pub fn next_transition(&self, now: Duration) -> Duration {
        match self.window_start(now) {
            None => self.offset,
            Some(start) if now < start + self.down_for => start + self.down_for,
            Some(start) => start + self.every,
        }
    }

    /// Start of the latest window that began at or before `now`.
    fn window_start(&self, now: Duration) -> Option<Duration> {
        if now < self.offset || self.every.is_zero() {
            return None;
        }
        let every = self.every.as_nanos();
        let since = (now - self.offset).as_nanos();
        Some(self.offset + nanos(since - since % every))
    }
}

/// Parameters that cannot describe a link.
#[derive(Debug, thiserror::Error, PartialEq)]
pub enum ParamError {
    #[error("{knob} must be a probability between 0 and 1 (0% and 100%), not {value}")]
    Probability { knob: &'static str, value: f64 },
    #[error("a rate of 0 bit/s carries nothing; leave the rate unset for an unlimited link")]
    ZeroRate,
    #[error(
        "an outage of {down_for:?} every {every:?} never ends; it must be shorter than the period"
    )]
    Outage { every: Duration, down_for: Duration },
}

/// What the link does with one packet.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Verdict {
    /// Deliver at `at` (since the epoch); again at `duplicate_at` when
    /// duplicated; with bit `corrupt_bit` (0 = most significant bit of the
    /// first byte) flipped when corrupted.
    Deliver {
        at: Duration,
        duplicate_at: Option<Duration>,
        corrupt_bit: Option<usize>,
    },
    Drop(DropCause),
}

/// Why a packet was dropped.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum DropCause {
    /// Random loss on the wire.
    Loss,
    /// Gilbert-Elliott loss in the bad state.
    BurstLoss,
    /// Tail drop: the bottleneck queue was full.
    QueueFull,
    /// The link was down (commanded or scheduled).
    Outage,
    /// Larger than the MTU.
    TooBig,
}

/// Counters of one direction.
#[derive(Clone, Debug, Default, PartialEq, Serialize)]
pub struct DirectionStats {
    /// Packets (TCP: segments) offered to the link, and their bytes.
    pub packets_in: u64,
    pub bytes_in: u64,
    /// Packets delivered (not counting duplicates), and their bytes.
    pub packets_forwarded: u64,
    pub bytes_forwarded: u64,
    pub duplicated: u64,
    pub corrupted: u64,
    pub reordered: u64,
    pub dropped: DropCounts,
    /// Total and largest time delivered packets waited in the bottleneck queue.
    #[serde(rename = "queue_delay_total_ms", serialize_with = "serialize_ms")]
    pub queue_delay_total: Duration,
    #[serde(rename = "queue_delay_max_ms", serialize_with = "serialize_ms")]
    pub queue_delay_max: Duration,
}

impl DirectionStats {
    /// Mean queue delay of delivered packets.
    pub fn queue_delay_mean(&self) -> Duration {
        match u32::try_from(self.packets_forwarded) {
            Ok(0) => Duration::ZERO,
            Ok(n) => self.queue_delay_total / n,
            Err(_) => nanos(self.queue_delay_total.as_nanos() / u128::from(self.packets_forwarded)),
        }
    }
}

/// Drops by cause.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize)]
pub struct DropCounts {
    pub loss: u64,
    pub burst_loss: u64,
    pub queue_full: u64,
    pub outage: u64,
    pub too_big: u64,
}

impl DropCounts {
    pub fn total(&self) -> u64 {
        self.loss + self.burst_loss + self.queue_full + self.outage + self.too_big
    }

    pub fn get(&self, cause: DropCause) -> u64 {
        match cause {
            DropCause::Loss => self.loss,
            DropCause::BurstLoss => self.burst_loss,
            DropCause::QueueFull => self.queue_full,
            DropCause::Outage => self.outage,
            DropCause::TooBig => self.too_big,
        }
    }

    fn count(&mut self, cause: DropCause) {
        let counter = match cause {
            DropCause::Loss => &mut self.loss,
            DropCause::BurstLoss => &mut self.burst_loss,
            DropCause::QueueFull => &mut self.queue_full,
            DropCause::Outage => &mut self.outage,
            DropCause::TooBig => &mut self.too_big,
        };
        *counter += 1;
    }
}

pub(crate) fn serialize_ms<S: serde::Serializer>(d: &Duration, s: S) -> Result<S::Ok, S::Error> {
    s.serialize_f64(d.as_secs_f64() * 1000.0)
}

/// One independent random stream per decision (see the module doc).
struct Streams {
    burst: ChaCha8Rng,
    loss: ChaCha8Rng,
    jitter: ChaCha8Rng,
    reorder: ChaCha8Rng,
    duplicate: ChaCha8Rng,
    corrupt: ChaCha8Rng,
}

impl Streams {
    fn new(seed: u64) -> Streams {
        let stream = |id: u64| {
            let mut rng = ChaCha8Rng::seed_from_u64(seed);
            rng.set_stream(id);
            rng
        };
        Streams {
            burst: stream(1),
            loss: stream(2),
            jitter: stream(3),
            reorder: stream(4),
            duplicate: stream(5),
            corrupt: stream(6),
        }
    }
}

/// One direction of a link. See the module doc for the order of decisions.
pub struct LinkModel {
    params: LinkParams,
    rng: Streams,
    commanded_down: bool,
    /// Latest `now` seen; earlier arrivals are treated as arriving now.
    last_now: Duration,
    /// When the transmitter will have sent everything accepted so far.
    busy_until: Duration,
    /// Latest in-order delivery time (delivery is monotonic without reorder).
    last_at: Duration,
    /// Gilbert-Elliott state.
    bad: bool,
    stats: DirectionStats,
}

impl LinkModel {
    /// A model of one direction; the same `params` and `seed` and the same
    /// sequence of `on_packet` calls give the same verdicts.
    pub fn new(params: LinkParams, seed: u64) -> Result<LinkModel, ParamError> {
        params.validate()?;
        Ok(LinkModel {
            params,
            rng: Streams::new(seed),
            commanded_down: false,
            last_now: Duration::ZERO,
            busy_until: Duration::ZERO,
            last_at: Duration::ZERO,
            bad: false,
            stats: DirectionStats::default(),
        })
    }

    pub fn params(&self) -> &LinkParams {
        &self.params
    }

    pub fn stats(&self) -> &DirectionStats {
        &self.stats
    }

    /// Commanded outage: while down, every packet is dropped with `Outage`.
    pub fn set_down(&mut self, down: bool) {
        self.commanded_down = down;
    }

    pub fn commanded_down(&self) -> bool {
        self.commanded_down
    }

    /// Whether the link is down at `now` (commanded or scheduled).
    pub fn is_down(&self, now: Duration) -> bool {
        self.commanded_down || self.params.outage.is_some_and(|o| o.covers(now))
    }

    /// Bytes waiting for or in the transmitter at `now`.
    pub fn backlog_bytes(&self, now: Duration) -> u64 {
        match self.params.rate_bps {
            Some(rate) if self.busy_until > now => {
                let bits = (self.busy_until - now).as_nanos() * u128::from(rate) / 1_000_000_000;
                u64::try_from(bits.div_ceil(8)).unwrap_or(u64::MAX)
            }
            _ => 0,
        }
    }

    /// The earliest time at or after `now` at which a packet of `len` bytes
    /// would neither meet an outage nor overflow the queue; `None` while a
    /// commanded outage lasts. Stream relays wait for it instead of losing
    /// data; it is exact unless the wait runs into the next outage window,
    /// so callers check again when it comes.
    pub fn ready_at(&self, now: Duration, len: usize) -> Option<Duration> {
        let now = now.max(self.last_now);
        let up = self.up_at(now)?;
        let Some(rate) = self.params.rate_bps else {
            return Some(up);
        };
        // Room for `len` once the backlog has shrunk to `queue - len`
        // (an empty queue takes any packet).
        let allowed = self.params.queue_bytes.saturating_sub(len as u64);
        let room_at = self.busy_until.saturating_sub(transmit_time(allowed, rate));
        Some(up.max(room_at))
    }

    /// When the link is up again: `now` if it is up, the end of the current
    /// scheduled outage, or `None` while a commanded outage lasts.
    pub fn up_at(&self, now: Duration) -> Option<Duration> {
        if self.commanded_down {
            return None;
        }
        Some(self.params.outage.map_or(now, |o| o.up_at(now)))
    }

    /// The next instant after `now` at which a scheduled outage begins or
    /// ends, if there is a schedule.
    pub fn next_transition(&self, now: Duration) -> Option<Duration> {
        self.params.outage.map(|o| o.next_transition(now))
    }

    /// Decide the fate of a packet of `len` bytes entering the link at `now`.
    pub fn on_packet(&mut self, now: Duration, len: usize) -> Verdict {
        let now = now.max(self.last_now);
        self.last_now = now;
        self.stats.packets_in += 1;
        self.stats.bytes_in += len as u64;

        if self.is_down(now) {
            return self.drop(DropCause::Outage);
        }
        if self.params.mtu.is_some_and(|mtu| len > mtu) {
            return self.drop(DropCause::TooBig);
        }

        // The bottleneck: wait behind the backlog, then take len*8/rate to send.
        let (departure, queue_delay) = match self.params.rate_bps {
            None => (now, Duration::ZERO),
            Some(rate) => {
                let backlog = self.backlog_bytes(now);
                if backlog > 0 && backlog + len as u64 > self.params.queue_bytes {
                    return self.drop(DropCause::QueueFull);
                }
                let start = now.max(self.busy_until);
                self.busy_until = start + transmit_time(len as u64, rate);
                debug_assert!(start - now <= transmit_time(self.params.queue_bytes, rate));
                (self.busy_until, start - now)
            }
        };

        // On the wire.
        if let Some(b) = self.params.burst_loss {
            let flip = if self.bad {
                b.p_bad_to_good
            } else {
                b.p_good_to_bad
            };
            if self.rng.burst.gen_bool(flip) {
                self.bad = !self.bad;
            }
            if self.bad && self.rng.burst.gen_bool(b.loss_in_bad) {
                return self.drop(DropCause::BurstLoss);
            }
        }
        if self.params.loss > 0.0 && self.rng.loss.gen_bool(self.params.loss) {
            return self.drop(DropCause::Loss);
        }

        // Propagation.
        let base = departure + self.params.delay;
        let mut at = if self.params.jitter.is_zero() {
            base
        } else {
            let j = i128::try_from(self.params.jitter.as_nanos()).unwrap_or(i128::MAX);
            let offset = self.rng.jitter.gen_range(-j..=j);
            let at = i128::try_from(base.as_nanos()).unwrap_or(i128::MAX) + offset;
            nanos(u128::try_from(at).unwrap_or(0)).max(departure)
        };
        if self.params.reorder > 0.0 && self.rng.reorder.gen_bool(self.params.reorder) {
            // Held back; does not hold back the packets behind it.
            at += self.params.reorder_delay;
            self.stats.reordered += 1;
        } else {
            at = at.max(self.last_at);
            self.last_at = at;
        }
        let duplicate_at = (self.params.duplicate > 0.0
            && self.rng.duplicate.gen_bool(self.params.duplicate))
        .then_some(at);
        let corrupt_bit = (len > 0
            && self.params.corrupt > 0.0
            && self.rng.corrupt.gen_bool(self.params.corrupt))
        .then(|| self.rng.corrupt.gen_range(0..len * 8));

        self.stats.packets_forwarded += 1;
        self.stats.bytes_forwarded += len as u64;
        self.stats.duplicated += u64::from(duplicate_at.is_some());
        self.stats.corrupted += u64::from(corrupt_bit.is_some());
        self.stats.queue_delay_total += queue_delay;
        self.stats.queue_delay_max = self.stats.queue_delay_max.max(queue_delay);
        Verdict::Deliver {
            at,
            duplicate_at,
            corrupt_bit,
        }
    }

    fn drop(&mut self, cause: DropCause) -> Verdict {
        self.stats.dropped.count(cause);
        Verdict::Drop(cause)
    }
}

/// Flip bit `bit` of `payload` (0 = most significant bit of the first byte),
/// as a `corrupt_bit` verdict asks.
pub fn flip_bit(payload: &mut [u8], bit: usize) {
    if let Some(byte) = payload.get_mut(bit / 8) {
        *byte ^= 0x80 >> (bit % 8);
    }
}

/// Time to send `bytes` at `rate` bits per second, rounded up to the nanosecond.
pub fn transmit_time(bytes: u64, rate_bps: u64) -> Duration {
    nanos((u128::from(bytes) * 8 * 1_000_000_000).div_ceil(u128::from(rate_bps.max(1))))
}

fn nanos(n: u128) -> Duration {
    let secs = u64::try_from(n / 1_000_000_000).unwrap_or(u64::MAX);
    // The remainder is below 10^9 and fits.
    Duration::new(secs, (n % 1_000_000_000) as u32)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ms(n: u64) -> Duration {
        Duration::from_millis(n)
    }

    fn model(params: LinkParams, seed: u64) -> LinkModel {
        LinkModel::new(params, seed).expect("test parameters are valid")
    }

    /// Feed `count` packets of `len` bytes, one every `gap`, starting at 0.
    fn run(m: &mut LinkModel, count: usize, gap: Duration, len: usize) -> Vec<(Duration, Verdict)> {
        (0..count)
            .map(|i| {
                let now = gap * i as u32;
                (now, m.on_packet(now, len))
            })
            .collect()
    }

    fn delivered_at(v: &Verdict) -> Option<Duration> {
        match v {
            Verdict::Deliver { at, .. } => Some(*at),
            Verdict::Drop(_) => None,
        }
    }

    #[test]
    fn saturating_sender_gets_the_configured_rate_within_one_percent_over_ten_virtual_seconds() {
        for rate in [512_000, 2_000_000, 8_000_000] {
            let params = LinkParams {
                rate_bps: Some(rate),
                delay: ms(20),
                ..LinkParams::default()
            };
            let mut m = model(params, 1);
            // Offer about 10x the rate: 1200-byte packets at 10 * rate.
            let gap = transmit_time(1200, rate * 10);
            let window = Duration::from_secs(10);
            let mut bytes = 0u64;
            let mut now = Duration::ZERO;
            while now < window {
                if let Verdict::Deliver { at, .. } = m.on_packet(now, 1200) {
                    // Count what arrives at the far end within [delay, delay + 10 s).
                    if at < window + ms(20) {
                        bytes += 1200;
                    }
                }
                now += gap;
            }
            let measured = bytes as f64 * 8.0 / window.as_secs_f64();
            let error = (measured - rate as f64).abs() / rate as f64;
            assert!(
                error < 0.01,
                "rate {rate}: measured {measured:.0} bit/s, error {:.3}%",
                error * 100.0
            );
            assert!(
                m.stats().dropped.queue_full > 0,
                "a saturating sender fills the queue"
            );
        }
    }

    #[test]
    fn delay_and_jitter_stay_in_bounds_and_order_is_preserved_without_reorder() {
        let params = LinkParams {
            delay: ms(50),
            jitter: ms(10),
            ..LinkParams::default()
        };
        // Dense traffic (gaps far below the jitter): order is kept by clamping.
        let mut m = model(params.clone(), 7);
        let mut last = Duration::ZERO;
        for (now, v) in run(&mut m, 20_000, Duration::from_micros(700), 100) {
            let at = delivered_at(&v).expect("a clean link delivers everything");
            let delay = at - now;
            assert!(
                delay >= ms(40) && delay <= ms(60),
                "delay {delay:?} outside 50 ms ± 10 ms"
            );
            assert!(
                at >= last,
                "delivery went back in time: {at:?} after {last:?}"
            );
            last = at;
        }
        // Sparse traffic (gaps above twice the jitter): the jitter is uniform and two-sided.
        let mut m = model(params, 7);
        let delays: Vec<f64> = run(&mut m, 5_000, ms(25), 100)
            .iter()
            .map(|(now, v)| (delivered_at(v).expect("delivered") - *now).as_secs_f64() * 1000.0)
            .collect();
        let mean = delays.iter().sum::<f64>() / delays.len() as f64;
        assert!((mean - 50.0).abs() < 0.5, "mean delay {mean:.2} ms");
        let below = delays.iter().filter(|d| **d < 45.0).count();
        assert!(
            (1000..1500).contains(&below),
            "{below} of 5000 delays below 45 ms (uniform: 1250)"
        );
    }

    #[test]
    fn reorder_lets_later_packets_overtake_held_back_ones() {
        let params = LinkParams {
            delay: ms(5),
            reorder: 0.05,
            reorder_delay: ms(10),
            ..LinkParams::default()
        };
        let mut m = model(params, 3);
        let ats: Vec<Duration> = run(&mut m, 10_000, ms(1), 100)
            .iter()
            .filter_map(|(_, v)| delivered_at(v))
            .collect();
        let inversions = ats.windows(2).filter(|w| w[1] < w[0]).count();
        assert!(
            inversions > 100,
            "only {inversions} out-of-order deliveries at 5% reorder"
        );
        assert_eq!(
            m.stats().reordered as usize,
            ats.iter()
                .zip(0..)
                .filter(|(at, i)| **at > ms(*i + 5))
                .count()
        );
    }

    #[test]
    fn random_loss_rate_is_within_statistical_bounds() {
        for seed in 0..5 {
            let n = 100_000;
            let mut m = model(
                LinkParams {
                    loss: 0.02,
                    ..LinkParams::default()
                },
                seed,
            );
            let lost = run(&mut m, n, ms(1), 100)
                .iter()
                .filter(|(_, v)| *v == Verdict::Drop(DropCause::Loss))
                .count();
            // Five standard deviations: sqrt(n p (1-p)) = 44.3.
            let expected = 0.02 * n as f64;
            assert!(
                (lost as f64 - expected).abs() < 5.0 * 44.3,
                "seed {seed}: lost {lost}, expected ≈{expected}"
            );
            assert_eq!(m.stats().dropped.loss as usize, lost);
        }
    }

    #[test]
    fn gilbert_elliott_loss_comes_in_bursts() {
        let b = BurstLoss {
            p_good_to_bad: 0.01,
            p_bad_to_good: 0.25,
            loss_in_bad: 0.9,
        };
        let mut m = model(
            LinkParams {
                burst_loss: Some(b),
                ..LinkParams::default()
            },
            11,
        );
        let verdicts = run(&mut m, 200_000, ms(1), 100);
        let mut bursts = Vec::new();
        let mut run_len = 0;
        for (_, v) in &verdicts {
            if *v == Verdict::Drop(DropCause::BurstLoss) {
                run_len += 1;
            } else if run_len > 0 {
                bursts.push(run_len);
                run_len = 0;
            }
        }
        let lost: usize = bursts.iter().sum();
        let mean = lost as f64 / bursts.len() as f64;
        assert!(
            mean > 1.5,
            "mean burst length {mean:.2} over {} bursts",
            bursts.len()
        );
        // Stationary loss: P(bad) * loss_in_bad = 0.01 / 0.26 * 0.9 ≈ 3.5%.
        let rate = lost as f64 / verdicts.len() as f64;
        assert!((0.025..0.045).contains(&rate), "burst loss rate {rate:.4}");
    }

    #[test]
    fn full_queue_tail_drops_and_queue_delay_never_exceeds_queue_over_rate() {
        let rate = 1_000_000;
        let queue = 16 * 1024;
        let params = LinkParams {
            rate_bps: Some(rate),
            queue_bytes: queue,
            ..LinkParams::default()
        };
        let mut m = model(params, 5);
        // Twice the rate: 1000-byte packets every 4 ms.
        let bound = transmit_time(queue, rate);
        let mut dropped_while_full = 0;
        for i in 0..5_000u32 {
            let now = ms(4) * i;
            let backlog = m.backlog_bytes(now);
            match m.on_packet(now, 1000) {
                Verdict::Drop(DropCause::QueueFull) => {
                    assert!(
                        backlog + 1000 > queue,
                        "dropped with {backlog} bytes queued"
                    );
                    dropped_while_full += 1;
                }
                Verdict::Deliver { at, .. } => {
                    assert!(
                        at - now <= bound + transmit_time(1000, rate),
                        "sojourn {:?}",
                        at - now
                    );
                }
                other => panic!("unexpected {other:?}"),
            }
        }
        assert!(
            dropped_while_full > 2000,
            "about half must be tail-dropped, got {dropped_while_full}"
        );
        let stats = m.stats();
        assert!(
            stats.queue_delay_max <= bound,
            "max queue delay {:?} > {bound:?}",
            stats.queue_delay_max
        );
        assert!(
            stats.queue_delay_max > bound * 9 / 10,
            "the queue filled: max {:?}",
            stats.queue_delay_max
        );
    }

    #[test]
    fn scheduled_outages_drop_everything_inside_the_window_and_nothing_outside() {
        let schedule = OutageSchedule {
            every: Duration::from_secs(10),
            down_for: Duration::from_secs(2),
            offset: Duration::from_secs(5),
        };
        let mut m = model(
            LinkParams {
                outage: Some(schedule),
                ..LinkParams::default()
            },
            1,
        );
        for (now, v) in run(&mut m, 60_000, ms(1), 100) {
            let s = now.as_millis() as u64;
            let inside = s >= 5000 && (s - 5000) % 10_000 < 2000;
            assert_eq!(
                v == Verdict::Drop(DropCause::Outage),
                inside,
                "at {s} ms: {v:?}"
            );
            assert_eq!(m.is_down(now), inside);
        }
        // Windows at 5, 15, 25, 35, 45 and 55 s, 2000 packets each.
        assert_eq!(m.stats().dropped.outage, 6 * 2000);
    }

    #[test]
    fn commanded_outage_drops_until_lifted() {
        let mut m = model(LinkParams::default(), 1);
        m.set_down(true);
        assert_eq!(m.on_packet(ms(1), 10), Verdict::Drop(DropCause::Outage));
        assert_eq!(m.ready_at(ms(1), 10), None);
        m.set_down(false);
        assert!(matches!(m.on_packet(ms(2), 10), Verdict::Deliver { .. }));
    }

    #[test]
    fn same_seed_gives_identical_verdicts_and_another_seed_differs() {
        let params = LinkParams {
            delay: ms(30),
            jitter: ms(5),
            loss: 0.05,
            burst_loss: Some(BurstLoss {
                p_good_to_bad: 0.02,
                p_bad_to_good: 0.3,
                loss_in_bad: 0.5,
            }),
            rate_bps: Some(2_000_000),
            duplicate: 0.01,
            reorder: 0.01,
            corrupt: 0.01,
            ..LinkParams::default()
        };
        let verdicts = |seed| {
            run(
                &mut model(params.clone(), seed),
                20_000,
                Duration::from_micros(4500),
                1100,
            )
        };
        assert_eq!(verdicts(42), verdicts(42));
        assert_ne!(verdicts(42), verdicts(43));
    }

    #[test]
    fn datagrams_larger_than_the_mtu_are_dropped() {
        let mut m = model(
            LinkParams {
                mtu: Some(1400),
                ..LinkParams::default()
            },
            1,
        );
        assert!(matches!(m.on_packet(ms(0), 1400), Verdict::Deliver { .. }));
        assert_eq!(m.on_packet(ms(1), 1401), Verdict::Drop(DropCause::TooBig));
        assert_eq!(m.stats().dropped.too_big, 1);
    }

    #[test]
    fn duplication_and_corruption_happen_at_their_rates_within_the_packet() {
        let mut m = model(
            LinkParams {
                duplicate: 0.1,
                corrupt: 0.1,
                ..LinkParams::default()
            },
            9,
        );
        let mut dups = 0;
        let mut corrupt = 0;
        for (_, v) in run(&mut m, 10_000, ms(1), 50) {
            let Verdict::Deliver {
                at,
                duplicate_at,
                corrupt_bit,
            } = v
            else {
                panic!("dropped: {v:?}")
            };
            if let Some(d) = duplicate_at {
                assert!(d >= at);
                dups += 1;
            }
            if let Some(bit) = corrupt_bit {
                assert!(bit < 50 * 8);
                corrupt += 1;
            }
        }
        assert!(
            (800..1200).contains(&dups),
            "{dups} duplicates of 10000 at 10%"
        );
        assert!(
            (800..1200).contains(&corrupt),
            "{corrupt} corrupted of 10000 at 10%"
        );
        let mut payload = [0u8; 2];
        flip_bit(&mut payload, 9);
        assert_eq!(payload, [0, 0x40]);
    }

    #[test]
    fn ready_at_waits_for_queue_room_and_the_end_of_an_outage() {
        let rate = 1_000_000;
        let schedule = OutageSchedule {
            every: Duration::from_secs(10),
            down_for: Duration::from_secs(1),
            offset: Duration::from_secs(5),
        };
        let params = LinkParams {
            rate_bps: Some(rate),
            queue_bytes: 4000,
            outage: Some(schedule),
            ..LinkParams::default()
        };
        let mut m = model(params, 1);
        for _ in 0..4 {
            assert!(matches!(m.on_packet(ms(0), 1000), Verdict::Deliver { .. }));
        }
        // 4000 bytes accepted at t=0 (8 ms each); room for 1000 more once 3000 remain, at 8 ms.
        assert_eq!(m.ready_at(ms(0), 1000), Some(ms(8)));
        assert_eq!(
            m.on_packet(ms(0), 1000),
            Verdict::Drop(DropCause::QueueFull)
        );
        assert!(matches!(m.on_packet(ms(8), 1000), Verdict::Deliver { .. }));
        assert_eq!(
            m.ready_at(Duration::from_millis(5500), 10),
            Some(Duration::from_secs(6))
        );
        assert_eq!(
            m.next_transition(Duration::from_millis(5500)),
            Some(Duration::from_secs(6))
        );
        assert_eq!(
            m.next_transition(Duration::from_secs(6)),
            Some(Duration::from_secs(15))
        );
        assert_eq!(
            m.next_transition(Duration::ZERO),
            Some(Duration::from_secs(5))
        );
    }

    #[test]
    fn invalid_parameters_are_rejected() {
        let bad = |p: LinkParams| LinkModel::new(p, 0).err();
        assert!(matches!(
            bad(LinkParams {
                loss: 1.5,
                ..LinkParams::default()
            }),
            Some(ParamError::Probability { knob: "loss", .. })
        ));
        assert_eq!(
            bad(LinkParams {
                rate_bps: Some(0),
                ..LinkParams::default()
            }),
            Some(ParamError::ZeroRate)
        );
        let never_up = OutageSchedule {
            every: ms(10),
            down_for: ms(10),
            offset: ms(0),
        };
        assert!(matches!(
            bad(LinkParams {
                outage: Some(never_up),
                ..LinkParams::default()
            }),
            Some(ParamError::Outage { .. })
        ));
    }
}
