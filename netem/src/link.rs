//! A link: two directions, each its own [`LinkModel`] with its own seed, and
//! the [`LinkControl`] a relay's tasks share to consult the models, command
//! outages and read statistics.
//!
//! ```text
//!  client ──▶ listen ── forward model ──▶ forward address   ("down", toward the branch)
//!  client ◀── listen ◀── back model ───── forward address   (back)
//! ```

use std::fmt;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::Duration;

use serde::Serialize;
use tokio::sync::watch;
use tokio::time::Instant;

use crate::model::{DirectionStats, LinkModel, LinkParams, ParamError};

/// Both directions of an emulated link.
#[derive(Clone, Debug, PartialEq)]
pub struct Link {
    /// From the client that talks to the relay's listen address toward the
    /// forward address.
    pub forward: LinkParams,
    /// From the forward address back to the client.
    pub back: LinkParams,
    /// Seed of the forward direction; the back direction's is derived from it.
    pub seed: u64,
}

impl Link {
    /// The same parameters both ways.
    pub fn symmetric(params: LinkParams, seed: u64) -> Link {
        Link {
            forward: params.clone(),
            back: params,
            seed,
        }
    }

    pub fn validate(&self) -> Result<(), ParamError> {
        self.forward.validate()?;
        self.back.validate()
    }

    /// The forward and back models, seeded `seed` and [`Link::back_seed`].
    pub fn models(&self) -> Result<(LinkModel, LinkModel), ParamError> {
        Ok((
            LinkModel::new(self.forward.clone(), self.seed)?,
            LinkModel::new(self.back.clone(), Link::back_seed(self.seed))?,
        ))
    }

    /// The back direction's seed: a SplitMix64 step of the forward seed, so
    /// the two directions draw unrelated numbers.
    pub fn back_seed(seed: u64) -> u64 {
        let mut z = seed.wrapping_add(0x9e37_79b9_7f4a_7c15);
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }
}

/// Which way a packet travels.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Direction {
    Forward,
    Back,
}

/// A snapshot of a relay's counters.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct LinkStats {
    /// Whether the link is down now (commanded or scheduled).
    pub down: bool,
    /// Time since the relay started.
    #[serde(rename = "elapsed_ms", serialize_with = "crate::model::serialize_ms")]
    pub elapsed: Duration,
    pub forward: DirectionStats,
    pub back: DirectionStats,
    pub relay: RelayCounters,
}

/// What the relay itself counted, outside the link model.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize)]
pub struct RelayCounters {
    /// UDP: clients seen (each gets its own upstream socket), and those not
    /// yet expired.
    pub flows: u64,
    pub flows_active: u64,
    /// UDP: clients refused because too many flows were active.
    pub flows_refused: u64,
    /// Sends the operating system refused (for instance, nothing listening).
    pub send_errors: u64,
    /// UDP: datagrams dropped because the relay already held its maximum of
    /// bytes in flight (only on an unlimited, long-delay link).
    pub overflow: u64,
    /// TCP: connections accepted, cut by an outage, refused while down, and
    /// failed to connect upstream.
    pub connections: u64,
    pub connections_cut: u64,
    pub connections_refused: u64,
    pub connect_errors: u64,
}

/// Atomic counterparts of [`RelayCounters`], bumped by the relay tasks.
#[derive(Default)]
pub(crate) struct Counters {
    pub flows: AtomicU64,
    pub flows_active: AtomicU64,
    pub flows_refused: AtomicU64,
    pub send_errors: AtomicU64,
    pub overflow: AtomicU64,
    pub connections: AtomicU64,
    pub connections_cut: AtomicU64,
    pub connections_refused: AtomicU64,
    pub connect_errors: AtomicU64,
}

impl Counters {
    pub fn bump(counter: &AtomicU64) {
        counter.fetch_add(1, Ordering::Relaxed);
    }

    fn snapshot(&self) -> RelayCounters {
        let get = |c: &AtomicU64| c.load(Ordering::Relaxed);
        RelayCounters {
            flows: get(&self.flows),
            flows_active: get(&self.flows_active),
            flows_refused: get(&self.flows_refused),
            send_errors: get(&self.send_errors),
            overflow: get(&self.overflow),
            connections: get(&self.connections),
            connections_cut: get(&self.connections_cut),
            connections_refused: get(&self.connections_refused),
            connect_errors: get(&self.connect_errors),
        }
    }
}

/// The shared state of a running relay: the two models (each behind a
/// `std::sync::Mutex`, held only for one decision), the commanded-outage
/// flag and the relay's counters. Cheap to clone.
#[derive(Clone)]
pub struct LinkControl {
    shared: Arc<Shared>,
}

struct Shared {
    epoch: Instant,
    forward: Mutex<LinkModel>,
    back: Mutex<LinkModel>,
    down: watch::Sender<bool>,
    counters: Counters,
}

impl LinkControl {
    /// Models for `link`, with the epoch (time zero of the models and of
    /// scheduled outages) now.
    pub fn new(link: &Link) -> Result<LinkControl, ParamError> {
        let (forward, back) = link.models()?;
        Ok(LinkControl {
            shared: Arc::new(Shared {
                epoch: Instant::now(),
                forward: Mutex::new(forward),
                back: Mutex::new(back),
                down: watch::Sender::new(false),
                counters: Counters::default(),
            }),
        })
    }

    /// Commanded outage of both directions: while down, UDP datagrams are
    /// dropped and TCP stalls or cuts (see `tcp`).
    pub fn set_down(&self, down: bool) {
        self.model(Direction::Forward).set_down(down);
        self.model(Direction::Back).set_down(down);
        self.shared.down.send_replace(down);
    }

    /// Whether either direction is down now (commanded or scheduled).
    pub fn is_down(&self) -> bool {
        let now = self.elapsed();
        self.model(Direction::Forward).is_down(now) || self.model(Direction::Back).is_down(now)
    }

    pub fn stats(&self) -> LinkStats {
        let now = self.elapsed();
        let (forward, fdown) = {
            let m = self.model(Direction::Forward);
            (m.stats().clone(), m.is_down(now))
        };
        let (back, bdown) = {
            let m = self.model(Direction::Back);
            (m.stats().clone(), m.is_down(now))
        };
        LinkStats {
            down: fdown || bdown,
            elapsed: now,
            forward,
            back,
            relay: self.shared.counters.snapshot(),
        }
    }

    /// Time since the epoch: the `now` the models are fed.
    pub fn elapsed(&self) -> Duration {
        self.shared.epoch.elapsed()
    }

    /// The instant a model time stands for.
    pub(crate) fn instant(&self, at: Duration) -> Instant {
        self.shared.epoch + at
    }

    pub(crate) fn model(&self, direction: Direction) -> MutexGuard<'_, LinkModel> {
        let model = match direction {
            Direction::Forward => &self.shared.forward,
            Direction::Back => &self.shared.back,
        };
        // A panic while deciding one packet leaves the model usable.
        model.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Changes of the commanded outage flag.
    pub(crate) fn watch_down(&self) -> watch::Receiver<bool> {
        self.shared.down.subscribe()
    }

    pub(crate) fn counters(&self) -> &Counters {
        &self.shared.counters
    }
}

impl fmt::Display for LinkStats {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        writeln!(
            f,
            "link {} after {:.1} s",
            if self.down { "down" } else { "up" },
            self.elapsed.as_secs_f64()
        )?;
        for (name, d) in [("forward", &self.forward), ("back", &self.back)] {
            writeln!(
                f,
                "  {name:<7} in {} ({} B), forwarded {} ({} B); dropped {} (loss {}, burst {}, queue-full {}, outage {}, too-big {}); \
                 duplicated {}, corrupted {}, reordered {}; queue delay mean {:.1} ms, max {:.1} ms",
                d.packets_in,
                d.bytes_in,
                d.packets_forwarded,
                d.bytes_forwarded,
                d.dropped.total(),
                d.dropped.loss,
                d.dropped.burst_loss,
                d.dropped.queue_full,
                d.dropped.outage,
                d.dropped.too_big,
                d.duplicated,
                d.corrupted,
                d.reordered,
                d.queue_delay_mean().as_secs_f64() * 1000.0,
                d.queue_delay_max.as_secs_f64() * 1000.0,
            )?;
        }
        let r = &self.relay;
        write!(
            f,
            "  relay   flows {} (active {}, refused {}), connections {} (cut {}, refused {}, upstream failed {}), send errors {}, overflow drops {}",
            r.flows,
            r.flows_active,
            r.flows_refused,
            r.connections,
            r.connections_cut,
            r.connections_refused,
            r.connect_errors,
            r.send_errors,
            r.overflow
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn directions_get_different_seeds_and_a_commanded_outage_covers_both() {
        assert_ne!(Link::back_seed(1), 1);
        assert_ne!(Link::back_seed(1), Link::back_seed(2));
        let control = LinkControl::new(&Link::symmetric(LinkParams::default(), 1))
            .expect("clean link is valid");
        control.set_down(true);
        assert!(control.is_down());
        let stats = control.stats();
        assert!(stats.down);
        let json = serde_json::to_value(&stats).expect("stats serialize");
        assert_eq!(json["forward"]["dropped"]["outage"], 0);
        control.set_down(false);
        assert!(!control.is_down());
    }
}
