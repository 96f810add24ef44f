//! pgcourier-netem: a userspace link emulator, to reproduce bad branch links
//! (long delay, jitter, loss, a thin bottleneck, outages) on loopback, in
//! tests, benchmarks and by hand.
//!
//! ```text
//!  client ──▶ relay (listen) ── forward LinkModel ──▶ forward address    "down", toward the branch
//!  client ◀── relay (listen) ◀── back LinkModel ───── forward address    back
//! ```
//!
//! - [`model`]: one direction of a link as a pure, deterministic state
//!   machine: packets in (with `now`), verdicts out. All the behaviour lives
//!   here and is tested in virtual time.
//! - [`link`]: both directions ([`Link`]) and the shared [`LinkControl`] of a
//!   running relay (commanded outages, statistics).
//! - [`profile`]: named links (`satellite`, `3g`, `dsl`, `flaky`, `lossy`,
//!   `clean`) and command-line [`Overrides`].
//! - [`udp`], [`tcp`]: the relays, thin tokio drivers around the models.
//! - [`control`]: the line-based control port (`down`, `up`, `stats`).
//! - [`units`]: parsing and printing rates, sizes, probabilities, durations.

pub mod control;
pub mod link;
pub mod model;
pub mod profile;
pub mod relay;
pub mod tcp;
pub mod udp;
pub mod units;

pub use control::ControlPort;
pub use link::{Direction, Link, LinkControl, LinkStats, RelayCounters};
pub use model::{
    BurstLoss, DirectionStats, DropCause, DropCounts, LinkModel, LinkParams, OutageSchedule,
    ParamError, Verdict,
};
pub use profile::{Overrides, Profile};
pub use relay::{RelayError, RelayHandle};
pub use tcp::{OutageMode, TcpRelay};
pub use udp::UdpRelay;
