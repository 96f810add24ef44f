//! The session protocol as two deterministic state machines, one for each
//! end of a QUIC connection between a sender and a receiver.
//!
//! ```text
//!  sender driver (sender/src/ship.rs)         receiver driver (receiver/src/ingest.rs)
//!    spool facts ─▶ SenderSession               InboxFacts ─▶ ReceiverSession ─▶ Hello
//!    Hello ───────▶   admit / refuse ─▶ Welcome | RefuseClassed | Refuse
//!                                               Welcome ─▶ adopt source, start at a copy,
//!                                                          or Gap / WrongSource / Refused
//!    records ─────▶   next_batch ─▶ Batch ────▶ on_batch ─▶ Replay | Store | Gap | Refetch
//!                                               (inbox fsync) synced mark ─▶ Ack
//!    Ack ─────────▶   frees the in-flight window
//!                                               applied mark ─▶ Applied (never past `told`)
//!    Applied ─────▶   record it in the spool
//! ```
//!
//! The cores never read a clock, a socket or a store: the drivers read
//! frames, the spool, the inbox and quinn's congestion figures, pass them
//! in as plain values (time as `now`), and carry out what the cores return
//! (frames to write, marks to record). The tests here drive both cores in
//! virtual time, alone and talking to each other over an in-memory link.
//!
//! - [`sender`]: admission, resume point, in-flight window, Ack/Applied
//!   validation, batch shaping from a measured rate, re-sent bytes.
//! - [`receiver`]: Welcome handling (source, gaps, a copy made for a new
//!   branch), what to do with each batch, what to acknowledge and report.
//! - [`Takeover`]: which session of a peer is the live one (both ends).

pub mod pace;
pub mod receiver;
pub mod sender;

#[cfg(test)]
mod tests;

use std::collections::HashMap;
use std::hash::Hash;

/// What an error means for the loop that met it.
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Class {
    /// Retry with backoff: the link, a peer restarting, a peer not ready.
    Transient,
    /// Retrying cannot help: stop, say why once, and wait for an operator.
    Definite,
}

/// Why a sender refuses a receiver, and whether retrying can help.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Refusal {
    pub reason: String,
    pub class: Class,
}

impl Refusal {
    fn transient(reason: impl Into<String>) -> Refusal {
        Refusal {
            reason: reason.into(),
            class: Class::Transient,
        }
    }

    fn definite(reason: impl Into<String>) -> Refusal {
        Refusal {
            reason: reason.into(),
            class: Class::Definite,
        }
    }
}

/// Identifies one session (one connection) among a driver's sessions.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct SessionId(pub u64);

/// Which session of each peer is the live one. A session becomes live when
/// it is welcomed (the sender admitted the receiver, or the receiver was
/// welcomed by a sender of its source), and then supersedes the one before
/// it, which may be half-dead after a link outage. A session that is never
/// welcomed (an impostor, another source, a refusal) never interrupts the
/// live one. `H` is what the driver needs to end a superseded session (a
/// cancellation token, a connection): the core only keeps it.
pub struct Takeover<K, H> {
    next: u64,
    live: HashMap<K, (SessionId, H)>,
}

impl<K: Eq + Hash + Clone, H> Default for Takeover<K, H> {
    fn default() -> Self {
        Takeover {
            next: 0,
            live: HashMap::new(),
        }
    }
}

impl<K: Eq + Hash + Clone, H> Takeover<K, H> {
    /// A new session id (a connection was established).
    pub fn begin(&mut self) -> SessionId {
        self.next += 1;
        SessionId(self.next)
    }

    /// Session `id` of `peer` was welcomed: it is now the live one. Returns
    /// the handle of the session it supersedes, for the driver to end.
    pub fn welcomed(&mut self, peer: &K, id: SessionId, handle: H) -> Option<H> {
        self.live
            .insert(peer.clone(), (id, handle))
            .filter(|(old, _)| *old != id)
            .map(|(_, h)| h)
    }

    /// Session `id` of `peer` ended. Returns true if it was the live one
    /// (a superseded session's end changes nothing).
    pub fn ended(&mut self, peer: &K, id: SessionId) -> bool {
        if self.live.get(peer).map(|(i, _)| *i) == Some(id) {
            self.live.remove(peer);
            true
        } else {
            false
        }
    }

    /// The live session of `peer`, if any.
    pub fn live(&self, peer: &K) -> Option<SessionId> {
        self.live.get(peer).map(|(i, _)| *i)
    }

    /// Take every live session's handle (at shutdown).
    pub fn drain(&mut self) -> Vec<H> {
        self.live.drain().map(|(_, (_, h))| h).collect()
    }
}
