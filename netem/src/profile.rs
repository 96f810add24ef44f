//! Named link profiles, and the overrides the command line applies on top.
//!
//! Rates are given for the forward direction ("down", toward the branch)
//! and the back direction; delays are one-way (half the RTT). Bottleneck
//! queues hold about 250 ms at the line rate.

use std::time::Duration;

use crate::link::Link;
use crate::model::{BurstLoss, LinkParams, OutageSchedule};

/// A named link.
#[derive(Clone, Debug, PartialEq)]
pub struct Profile {
    pub name: &'static str,
    pub summary: &'static str,
    pub forward: LinkParams,
    pub back: LinkParams,
}

impl Profile {
    /// Every profile, in the order `pgcourier-netem profiles` lists them.
    pub fn all() -> Vec<Profile> {
        let ms = Duration::from_millis;
        let clean = LinkParams::default();
        let shaped = |delay: u64, jitter: u64, rate: u64, queue: u64, loss: f64| LinkParams {
            delay: ms(delay),
            jitter: ms(jitter),
            rate_bps: Some(rate),
            queue_bytes: queue,
            loss,
            ..LinkParams::default()
        };
        vec![
            Profile {
                name: "clean",
                summary: "no delay, no loss, unlimited rate",
                forward: clean.clone(),
                back: clean.clone(),
            },
            Profile {
                name: "satellite",
                summary: "geostationary: ~600 ms RTT, 2 Mbit/s down, 512 kbit/s back, 1% loss",
                forward: shaped(300, 5, 2_000_000, 64 * 1024, 0.01),
                back: shaped(300, 5, 512_000, 16 * 1024, 0.01),
            },
            Profile {
                name: "3g",
                summary: "mobile: ~150 ms RTT, 1 Mbit/s, 2% loss",
                forward: shaped(75, 10, 1_000_000, 32 * 1024, 0.02),
                back: shaped(75, 10, 1_000_000, 32 * 1024, 0.02),
            },
            Profile {
                name: "dsl",
                summary: "wired: 40 ms RTT, 8 Mbit/s, 0.1% loss",
                forward: shaped(20, 1, 8_000_000, 256 * 1024, 0.001),
                back: shaped(20, 1, 8_000_000, 256 * 1024, 0.001),
            },
            Profile {
                name: "flaky",
                summary: "clean, but down 30 s every 2 min (first outage after 90 s)",
                forward: LinkParams {
                    outage: Some(OutageSchedule::starting_up(
                        Duration::from_secs(120),
                        Duration::from_secs(30),
                    )),
                    ..clean.clone()
                },
                back: LinkParams {
                    outage: Some(OutageSchedule::starting_up(
                        Duration::from_secs(120),
                        Duration::from_secs(30),
                    )),
                    ..clean.clone()
                },
            },
            Profile {
                name: "lossy",
                summary: "10% random loss, otherwise clean",
                forward: LinkParams {
                    loss: 0.1,
                    ..clean.clone()
                },
                back: LinkParams { loss: 0.1, ..clean },
            },
        ]
    }

    pub fn by_name(name: &str) -> Option<Profile> {
        Profile::all()
            .into_iter()
            .find(|p| p.name.eq_ignore_ascii_case(name))
    }

    pub fn names() -> Vec<&'static str> {
        Profile::all().iter().map(|p| p.name).collect()
    }

    /// This profile as a link with `seed`.
    pub fn link(&self, seed: u64) -> Link {
        Link {
            forward: self.forward.clone(),
            back: self.back.clone(),
            seed,
        }
    }
}

/// Knobs to change on top of a profile. `None` keeps the profile's value;
/// all but the rates apply to both directions.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Overrides {
    pub delay: Option<Duration>,
    pub jitter: Option<Duration>,
    pub loss: Option<f64>,
    /// `Some(None)` turns bursty loss off.
    pub burst_loss: Option<Option<BurstLoss>>,
    /// Both directions unless `rate_back` is given; `Some(None)` is unlimited.
    pub rate: Option<Option<u64>>,
    /// The back direction.
    pub rate_back: Option<Option<u64>>,
    pub queue_bytes: Option<u64>,
    pub duplicate: Option<f64>,
    pub reorder: Option<f64>,
    pub reorder_delay: Option<Duration>,
    pub corrupt: Option<f64>,
    /// `Some(None)` removes the MTU cap.
    pub mtu: Option<Option<usize>>,
    /// `Some(None)` turns scheduled outages off.
    pub outage: Option<Option<OutageSchedule>>,
}

impl Overrides {
    /// Apply to both directions of `link`.
    pub fn apply(&self, link: &mut Link) {
        for (params, rate) in [
            (&mut link.forward, self.rate),
            (&mut link.back, self.rate_back.or(self.rate)),
        ] {
            self.apply_common(params);
            if let Some(rate) = rate {
                params.rate_bps = rate;
            }
        }
    }

    fn apply_common(&self, p: &mut LinkParams) {
        fn set<T: Clone>(target: &mut T, value: &Option<T>) {
            if let Some(v) = value {
                *target = v.clone();
            }
        }
        set(&mut p.delay, &self.delay);
        set(&mut p.jitter, &self.jitter);
        set(&mut p.loss, &self.loss);
        set(&mut p.burst_loss, &self.burst_loss);
        set(&mut p.queue_bytes, &self.queue_bytes);
        set(&mut p.duplicate, &self.duplicate);
        set(&mut p.reorder, &self.reorder);
        set(&mut p.reorder_delay, &self.reorder_delay);
        set(&mut p.corrupt, &self.corrupt);
        set(&mut p.mtu, &self.mtu);
        set(&mut p.outage, &self.outage);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_profile_is_valid_and_satellite_is_asymmetric() {
        for p in Profile::all() {
            p.link(0)
                .validate()
                .unwrap_or_else(|e| panic!("profile {}: {e}", p.name));
        }
        let sat = Profile::by_name("satellite").expect("satellite exists");
        assert_eq!(sat.forward.delay, Duration::from_millis(300));
        assert_eq!(sat.forward.rate_bps, Some(2_000_000));
        assert_eq!(sat.back.rate_bps, Some(512_000));
        assert_eq!(Profile::by_name("3G").map(|p| p.name), Some("3g"));
        let flaky = Profile::by_name("flaky").expect("flaky exists");
        let outage = flaky.forward.outage.expect("flaky has outages");
        assert!(!outage.covers(Duration::ZERO) && outage.covers(Duration::from_secs(100)));
    }

    #[test]
    fn overrides_change_only_what_they_name_and_rate_back_wins_for_the_back_direction() {
        let mut link = Profile::by_name("satellite")
            .expect("satellite exists")
            .link(1);
        Overrides {
            loss: Some(0.0),
            rate: Some(Some(4_000_000)),
            ..Overrides::default()
        }
        .apply(&mut link);
        assert_eq!((link.forward.loss, link.back.loss), (0.0, 0.0));
        assert_eq!(
            (link.forward.rate_bps, link.back.rate_bps),
            (Some(4_000_000), Some(4_000_000))
        );
        assert_eq!(link.forward.delay, Duration::from_millis(300));
        Overrides {
            rate_back: Some(Some(256_000)),
            ..Overrides::default()
        }
        .apply(&mut link);
        assert_eq!(
            (link.forward.rate_bps, link.back.rate_bps),
            (Some(4_000_000), Some(256_000))
        );
    }
}
