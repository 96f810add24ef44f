//! The sender's end of a session: admission, the resume point, the
//! in-flight window, Ack/Applied validation and batch shaping.
//!
//! ```text
//!  Hello ─────────────▶ on_hello ─▶ read HelloSpool next | Admission::Refuse (another
//!                                      protocol version, in the form it reads)
//!  HelloSpool + SpoolFacts ─▶ on_hello_spool ─▶ Admission::Welcome (resume after the
//!                                      receiver's durable mark, or at a copy made for it)
//!                                  └▶ Admission::Refuse (why, transient or definite:
//!                                      another source, another spool, records gone)
//!  complete_seq ───────▶ wants ────▶ Want { from, max_raw_bytes } | None (window full,
//!                                      nothing new)
//!  records + rate ─────▶ next_batch ▶ Batch frame (zstd level from the rate; size from
//!                                      the ratio seen), in flight until acknowledged
//!  Ack / Applied ──────▶ on_control ▶ Control::Acked (window freed) | Control::Applied
//!                                      (record it in the spool) | error past what was sent
//! ```
//!
//! The driver (`sender/src/ship.rs`) reads the spool and quinn's figures and
//! passes them in as values; it writes the frames this returns.

use std::collections::VecDeque;
use std::time::Instant;

use super::{Class, Refusal};
use crate::frame::{encode_batch, Frame, FrameError, PROTOCOL_VERSION};
use crate::record::{self, Record, RecordError};

/// Compressed bytes a batch should not exceed: what a link drop in the
/// middle of a batch can waste (the receiver discards a partial batch).
pub const MAX_BATCH_WIRE_BYTES: usize = 48 * 1024;

/// Raw bytes of the first batch of a session, before a compression ratio
/// has been seen (at most `batch-bytes`).
pub const FIRST_BATCH_RAW_BYTES: usize = 44 * 1024;

/// Below this measured rate (bytes/s) batches are compressed at level 9.
pub const SLOW_LINK_BYTES_PER_SEC: f64 = 1_000_000.0;
/// Below this (and at or above the slow limit) at level 3; above, level 1.
pub const FAST_LINK_BYTES_PER_SEC: f64 = 20_000_000.0;

/// The settings of shipping that shape a session.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ShipSettings {
    /// Raw record bytes sent and not yet acknowledged before sending stops.
    pub max_in_flight: usize,
    /// Largest raw batch (`batch-bytes`).
    pub batch_bytes: usize,
    /// `zstd-level` when pinned; `None`: chosen from the link's rate.
    pub pinned_level: Option<i32>,
}

/// The spool's source identity, as the driver could read it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum SpoolSource {
    Known(String),
    /// Capture has not reached the source database yet.
    NotYet,
    /// Reading it failed (the error, as text).
    Unreadable(String),
}

/// What the spool says about this receiver when it says hello.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SpoolFacts {
    pub source: SpoolSource,
    /// The spool's own identity (random, made when it was created): record
    /// numbers name transactions only within it.
    pub spool: String,
    /// Lowest record still stored (`complete_seq + 1` when empty).
    pub first_seq: u64,
    /// Highest record that is durable and ends a transaction.
    pub complete_seq: u64,
    /// The first record of a copy made for this receiver alone, if any.
    pub start_for: Option<u64>,
    /// This receiver waits for a copy made for it (not spooled yet).
    pub needs_copy: bool,
}

/// The answer to a receiver's `Hello`.
#[derive(Clone, Debug, PartialEq)]
pub enum Admission {
    /// Write `frame` (a `Welcome`), then stream from `resume_after + 1`.
    Welcome { frame: Frame, resume_after: u64 },
    /// Write `frame` (a refusal) and end the session.
    Refuse { frame: Frame, refusal: Refusal },
}

/// What the driver asks the spool for next.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Want {
    pub from: u64,
    pub max_raw_bytes: usize,
}

/// A batch built for the wire, with the figures the driver counts.
#[derive(Clone, Debug, PartialEq)]
pub struct Shipped {
    pub frame: Frame,
    pub records: u64,
    /// Encoded record bytes before compression.
    pub raw_bytes: u64,
    /// Batch payload bytes after zstd.
    pub wire_bytes: u64,
    /// The share of `wire_bytes` that carries records shipped to this
    /// receiver before (it had not made them durable when the link dropped).
    pub resent_bytes: u64,
    /// Highest record ever shipped to this receiver, this batch included.
    pub sent_high: u64,
}

/// What an Ack or Applied frame means for the driver.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Control {
    /// The window freed `freed_bytes` raw bytes (possibly 0).
    Acked { freed_bytes: u64 },
    /// The receiver applied everything up to `seq`: record it in the spool.
    Applied { seq: u64 },
}

#[derive(Debug, thiserror::Error)]
pub enum SenderError {
    #[error("peer broke the protocol: {0}")]
    Protocol(String),
    #[error("spool has no record {next} although it is complete up to {complete}")]
    SpoolHole { next: u64, complete: u64 },
    #[error("spool record {seq} does not decode")]
    Record {
        seq: u64,
        #[source]
        source: RecordError,
    },
    #[error("batch from record {first_seq} does not encode")]
    Encode {
        first_seq: u64,
        #[source]
        source: FrameError,
    },
}

impl SenderError {
    /// Every one of these repeats if the session is started again: a peer
    /// that breaks the protocol, a spool that holds a hole or a bad record.
    pub fn class(&self) -> Class {
        Class::Definite
    }
}

#[derive(Clone, Debug, PartialEq, Eq)]
enum Phase {
    AwaitingHello,
    /// A `Hello` of this protocol came: its `HelloSpool` is next.
    AwaitingSpool {
        source: Option<String>,
        durable_seq: u64,
    },
    Streaming,
    Refused,
}

/// One session with one receiver, from its `Hello` to its end.
pub struct SenderSession {
    receiver: String,
    settings: ShipSettings,
    phase: Phase,
    /// Next record to send.
    next: u64,
    /// Highest record sent on this session (or the resume point).
    sent_through: u64,
    /// Sent batches not yet acknowledged: (last seq, raw bytes).
    in_flight: VecDeque<(u64, usize)>,
    in_flight_bytes: usize,
    acked_bytes: u64,
    welcomed_at: Option<Instant>,
    shape: BatchShape,
    /// Highest record ever shipped to this receiver, over all sessions.
    sent_high: u64,
}

impl SenderSession {
    /// A session with `receiver` (its configured name), to which records up
    /// to `sent_high` were shipped before (0: none).
    pub fn new(
        receiver: impl Into<String>,
        settings: ShipSettings,
        sent_high: u64,
    ) -> SenderSession {
        SenderSession {
            receiver: receiver.into(),
            shape: BatchShape::new(settings.batch_bytes, settings.pinned_level),
            settings,
            phase: Phase::AwaitingHello,
            next: 1,
            sent_through: 0,
            in_flight: VecDeque::new(),
            in_flight_bytes: 0,
            acked_bytes: 0,
            welcomed_at: None,
            sent_high,
        }
    }

    /// The receiver's first frame. `None`: it speaks this protocol, read
    /// its next frame (`HelloSpool`) and pass it to
    /// [`SenderSession::on_hello_spool`]. A receiver of another version is
    /// refused at once, in the form every version reads (it sends no
    /// `HelloSpool`, or one this side need not read).
    pub fn on_hello(&mut self, frame: Frame) -> Result<Option<Admission>, SenderError> {
        if self.phase != Phase::AwaitingHello {
            return Err(SenderError::Protocol(
                "Hello after the session began".into(),
            ));
        }
        let Frame::Hello {
            protocol,
            source,
            durable_seq,
        } = frame
        else {
            return Err(SenderError::Protocol(format!(
                "first frame is {}, not Hello",
                frame.name()
            )));
        };
        if protocol != PROTOCOL_VERSION {
            self.phase = Phase::Refused;
            let refusal = Refusal::definite(format!("protocol {protocol} is not supported (this sender speaks {PROTOCOL_VERSION}): upgrade the older side"));
            return Ok(Some(Admission::Refuse {
                // The form a peer of any version can read.
                frame: Frame::Refuse {
                    reason: refusal.reason.clone(),
                },
                refusal,
            }));
        }
        self.phase = Phase::AwaitingSpool {
            source,
            durable_seq,
        };
        Ok(None)
    }

    /// The receiver's second frame: the spool its inbox holds records of.
    /// A new branch whose copy was made for it starts at that copy; anyone
    /// else resumes right after what it holds durably, if the spool still
    /// has that and the receiver belongs here: same source, same spool.
    pub fn on_hello_spool(
        &mut self,
        frame: Frame,
        facts: &SpoolFacts,
        now: Instant,
    ) -> Result<Admission, SenderError> {
        let Phase::AwaitingSpool {
            source,
            durable_seq,
        } = std::mem::replace(&mut self.phase, Phase::Refused)
        else {
            return Err(SenderError::Protocol(format!(
                "{} where only the frame after Hello belongs",
                frame.name()
            )));
        };
        let Frame::HelloSpool { spool } = frame else {
            return Err(SenderError::Protocol(format!(
                "the frame after Hello is {}, not HelloSpool",
                frame.name()
            )));
        };
        let start = facts.start_for.filter(|_| durable_seq == 0);
        let durable_seq = start.map_or(durable_seq, |s| s - 1);
        let our_source = match admit(source.as_deref(), spool.as_deref(), durable_seq, facts) {
            Ok(s) => s,
            Err(refusal) => {
                let frame = Frame::RefuseClassed {
                    reason: refusal.reason.clone(),
                    definite: refusal.class == Class::Definite,
                };
                return Ok(Admission::Refuse { frame, refusal });
            }
        };
        self.phase = Phase::Streaming;
        self.next = durable_seq + 1;
        self.sent_through = durable_seq;
        self.welcomed_at = Some(now);
        Ok(Admission::Welcome {
            frame: Frame::Welcome {
                source: our_source,
                spool: facts.spool.clone(),
                first_seq: start.unwrap_or(facts.first_seq),
            },
            resume_after: durable_seq,
        })
    }

    /// What to read from the spool next, or `None` while there is nothing
    /// new up to `complete_seq` or the in-flight window is full.
    pub fn wants(&self, complete_seq: u64) -> Option<Want> {
        if self.phase != Phase::Streaming
            || self.next > complete_seq
            || self.in_flight_bytes >= self.settings.max_in_flight
        {
            return None;
        }
        Some(Want {
            from: self.next,
            max_raw_bytes: self.shape.raw_bytes,
        })
    }

    /// Build the next batch from `records` (read from [`Want::from`] on)
    /// for a link that currently carries `bytes_per_sec`. Records made for
    /// another receiver's copy travel as empty placeholders.
    pub fn next_batch(
        &mut self,
        records: Vec<Vec<u8>>,
        bytes_per_sec: f64,
        complete_seq: u64,
    ) -> Result<Shipped, SenderError> {
        debug_assert_eq!(self.phase, Phase::Streaming, "next_batch before Welcome");
        let first = self.next;
        if records.is_empty() {
            return Err(SenderError::SpoolHole {
                next: first,
                complete: complete_seq,
            });
        }
        let records = self.addressed(records)?;
        let count = records.len() as u64;
        let level = self.shape.level(bytes_per_sec);
        let frame = encode_batch(&records, first, level).map_err(|source| SenderError::Encode {
            first_seq: first,
            source,
        })?;
        let raw: usize = records.iter().map(Vec::len).sum();
        let wire = match &frame {
            Frame::Batch { payload, .. } => payload.len(),
            _ => unreachable!("encode_batch builds a Batch"),
        };
        self.shape.observe(raw, wire);
        let last = first + count - 1;
        let resent_bytes = if first <= self.sent_high {
            let again = (self.sent_high - first + 1).min(count);
            wire as u64 * again / count
        } else {
            0
        };
        self.sent_high = self.sent_high.max(last);
        self.sent_through = last;
        self.next = last + 1;
        self.in_flight.push_back((last, raw));
        self.in_flight_bytes += raw;
        Ok(Shipped {
            frame,
            records: count,
            raw_bytes: raw as u64,
            wire_bytes: wire as u64,
            resent_bytes,
            sent_high: self.sent_high,
        })
    }

    /// A frame from the receiver's control stream after `Welcome`.
    pub fn on_control(&mut self, frame: Frame) -> Result<Control, SenderError> {
        if self.phase != Phase::Streaming {
            return Err(SenderError::Protocol(format!(
                "{} before Welcome",
                frame.name()
            )));
        }
        match frame {
            Frame::Ack { durable_seq: seq } => {
                if seq > self.sent_through {
                    return Err(SenderError::Protocol(format!(
                        "acknowledged record {seq}, which was never sent"
                    )));
                }
                let mut freed = 0u64;
                while let Some(&(last, bytes)) = self.in_flight.front() {
                    if last > seq {
                        break;
                    }
                    self.in_flight.pop_front();
                    self.in_flight_bytes -= bytes;
                    freed += bytes as u64;
                }
                self.acked_bytes += freed;
                Ok(Control::Acked { freed_bytes: freed })
            }
            Frame::Applied { seq } => {
                if seq > self.sent_through {
                    return Err(SenderError::Protocol(format!(
                        "reported record {seq} applied, which was never sent"
                    )));
                }
                Ok(Control::Applied { seq })
            }
            other => Err(SenderError::Protocol(format!(
                "unexpected frame {}",
                other.name()
            ))),
        }
    }

    /// Raw bytes sent and not yet acknowledged.
    pub fn in_flight_bytes(&self) -> u64 {
        self.in_flight_bytes as u64
    }

    /// Raw bytes the receiver acknowledged on this session.
    pub fn acked_bytes(&self) -> u64 {
        self.acked_bytes
    }

    /// Average acknowledged raw bytes per second since `Welcome`.
    pub fn throughput(&self, now: Instant) -> f64 {
        let secs = self
            .welcomed_at
            .map(|t| now.saturating_duration_since(t).as_secs_f64())
            .unwrap_or(0.0);
        if secs > 0.0 {
            self.acked_bytes as f64 / secs
        } else {
            0.0
        }
    }

    /// Highest record sent on this session (the resume point before any).
    pub fn sent_through(&self) -> u64 {
        self.sent_through
    }

    /// Raw bytes the next batch may hold.
    pub fn batch_raw_bytes(&self) -> usize {
        self.shape.raw_bytes
    }

    /// Records made for one other receiver (its copy), and records
    /// forwarded from this receiver's own site, become empty placeholders:
    /// same positions and transaction boundaries, no changes.
    fn addressed(&self, records: Vec<Vec<u8>>) -> Result<Vec<Vec<u8>>, SenderError> {
        let first = self.next;
        records
            .into_iter()
            .enumerate()
            .map(|(i, bytes)| {
                let bad = |source| SenderError::Record {
                    seq: first + i as u64,
                    source,
                };
                let to = record::peek_only_for(&bytes).map_err(bad)?;
                if record::addressed_to(to.as_deref(), &self.receiver) {
                    Ok(bytes)
                } else {
                    Record::decode(&bytes)
                        .map_err(bad)?
                        .placeholder()
                        .encode()
                        .map_err(bad)
                }
            })
            .collect()
    }
}

/// Whether a receiver of this protocol that says hello with these facts
/// may be served: our source, or why not. `durable_seq` is already moved to
/// a copy's start.
fn admit(
    source: Option<&str>,
    spool: Option<&str>,
    durable_seq: u64,
    facts: &SpoolFacts,
) -> Result<String, Refusal> {
    if facts.needs_copy && durable_seq == 0 {
        return Err(Refusal::transient(
            "this branch is new: its copy of the tables is being prepared; retry shortly",
        ));
    }
    let our_source = match &facts.source {
        SpoolSource::Known(s) => s.clone(),
        SpoolSource::NotYet => {
            return Err(Refusal::transient(
                "the sender has not reached its source database yet; retry later",
            ))
        }
        SpoolSource::Unreadable(e) => {
            return Err(Refusal::transient(format!(
                "the sender cannot read its spool: {e}"
            )))
        }
    };
    if let Some(theirs) = source {
        if theirs != our_source {
            return Err(Refusal::definite(format!(
                "the receiver's inbox belongs to source {theirs}, this sender ships {our_source}"
            )));
        }
    }
    if let Some(theirs) = spool {
        if theirs != facts.spool {
            return Err(Refusal::definite(format!(
                "the receiver's inbox holds records of spool {theirs}, but this sender's spool is {}: \
                 the spool-dir was replaced (a new directory, or a backup of another spool restored) and its \
                 record numbers name other transactions, so resuming would silently skip changes. \
                 Re-seed this branch: stop the receiver and move its inbox-dir aside, then import a seed into \
                 the new empty one (pgcourier-sender seed export, then pgcourier-receiver seed import), or just \
                 start it if this spool still begins with its initial copy; then restart the sender",
                facts.spool
            )));
        }
    }
    if durable_seq + 1 < facts.first_seq {
        return Err(Refusal::definite(format!(
            "the receiver holds up to record {durable_seq} but the spool starts at {}: records in between are gone; re-seed this branch (pgcourier-sender seed export, then pgcourier-receiver seed import)",
            facts.first_seq
        )));
    }
    if durable_seq > facts.complete_seq {
        return Err(Refusal::definite(format!(
            "the receiver claims record {durable_seq} but the spool ends at {}: is this the right sender and spool?",
            facts.complete_seq
        )));
    }
    Ok(our_source)
}

/// Batch size and compression level suited to the link. Batches grow up to
/// `batch-bytes` raw but are cut so that a compressed batch stays under
/// [`MAX_BATCH_WIRE_BYTES`]; the zstd level rises on slow links (where even
/// level 9 outruns the link and every byte saved is time saved) and falls
/// on fast ones (where compression must not hold the link back), unless
/// `zstd-level` pins it.
#[derive(Clone, Debug, PartialEq)]
pub struct BatchShape {
    raw_bytes: usize,
    max_raw: usize,
    pinned_level: Option<i32>,
}

impl BatchShape {
    pub fn new(batch_bytes: usize, pinned_level: Option<i32>) -> BatchShape {
        BatchShape {
            raw_bytes: batch_bytes.min(FIRST_BATCH_RAW_BYTES),
            max_raw: batch_bytes,
            pinned_level,
        }
    }

    /// The zstd level for a link that carries `bytes_per_sec` (the driver
    /// measures it as congestion window / RTT).
    pub fn level(&self, bytes_per_sec: f64) -> i32 {
        if let Some(l) = self.pinned_level {
            return l;
        }
        if bytes_per_sec < SLOW_LINK_BYTES_PER_SEC {
            9
        } else if bytes_per_sec < FAST_LINK_BYTES_PER_SEC {
            3
        } else {
            1
        }
    }

    /// Adjust the raw size after a batch of `raw` bytes compressed to `wire`.
    pub fn observe(&mut self, raw: usize, wire: usize) {
        let ratio = raw as f64 / wire.max(1) as f64;
        let fits = (MAX_BATCH_WIRE_BYTES as f64 * ratio * 0.9) as usize;
        self.raw_bytes = fits.clamp(4096, self.max_raw);
    }

    /// Raw bytes the next batch may hold.
    pub fn raw_bytes(&self) -> usize {
        self.raw_bytes
    }
}

#[cfg(test)]
mod tests {
    use std::time::{Duration, Instant};

    use super::*;
    use crate::frame::decode_batch;
    use crate::record::Piece;
    use crate::Lsn;

    const SOURCE: &str = "hq-7";
    const SPOOL: &str = "5b0e1a9c";

    fn settings() -> ShipSettings {
        ShipSettings {
            max_in_flight: 4000,
            batch_bytes: 256 << 10,
            pinned_level: None,
        }
    }

    fn facts(first_seq: u64, complete_seq: u64) -> SpoolFacts {
        SpoolFacts {
            source: SpoolSource::Known(SOURCE.into()),
            spool: SPOOL.into(),
            first_seq,
            complete_seq,
            start_for: None,
            needs_copy: false,
        }
    }

    fn hello(source: Option<&str>, durable_seq: u64) -> Frame {
        Frame::Hello {
            protocol: PROTOCOL_VERSION,
            source: source.map(Into::into),
            durable_seq,
        }
    }

    /// The receiver's first two frames: `Hello`, then `HelloSpool` naming
    /// our spool when the inbox belongs to a source (it has been welcomed).
    fn greet(
        s: &mut SenderSession,
        source: Option<&str>,
        durable_seq: u64,
        facts: &SpoolFacts,
        now: Instant,
    ) -> Result<Admission, SenderError> {
        let spool = source.map(|_| SPOOL);
        greet_from(s, source, spool, durable_seq, facts, now)
    }

    fn greet_from(
        s: &mut SenderSession,
        source: Option<&str>,
        spool: Option<&str>,
        durable_seq: u64,
        facts: &SpoolFacts,
        now: Instant,
    ) -> Result<Admission, SenderError> {
        if let Some(refused) = s.on_hello(hello(source, durable_seq))? {
            return Ok(refused);
        }
        s.on_hello_spool(
            Frame::HelloSpool {
                spool: spool.map(Into::into),
            },
            facts,
            now,
        )
    }

    /// A record of about `len` bytes of incompressible-ish text.
    fn rec(seq: u64, len: usize, only_for: Option<&str>) -> Vec<u8> {
        let body: Vec<u8> = (0..len)
            .map(|i| (seq as usize * 31 + i * 7) as u8)
            .collect();
        Record {
            seq,
            only_for: only_for.map(Into::into),
            commit_lsn: Lsn(seq * 100),
            commit_time: 0,
            xid: seq as u32,
            part: 0,
            last: true,
            end_lsn: Lsn(seq * 100 + 50),
            pieces: vec![Piece::Message(body)],
        }
        .encode()
        .unwrap()
    }

    fn welcomed(durable: u64, first: u64, complete: u64, now: Instant) -> SenderSession {
        let mut s = SenderSession::new("branch-a", settings(), 0);
        match greet(&mut s, Some(SOURCE), durable, &facts(first, complete), now) {
            Ok(Admission::Welcome { .. }) => s,
            other => panic!("expected a welcome, got {other:?}"),
        }
    }

    /// The refusal of a receiver that says `hello` (a `Hello`) and, if
    /// asked, names our spool when it has a source.
    fn refusal(hello: Frame, facts: &SpoolFacts) -> (Frame, Refusal) {
        let mut s = SenderSession::new("branch-a", settings(), 0);
        let admission = match s.on_hello(hello.clone()).unwrap() {
            Some(refused) => refused,
            None => {
                let Frame::Hello { source, .. } = hello else {
                    unreachable!("on_hello takes only a Hello")
                };
                s.on_hello_spool(
                    Frame::HelloSpool {
                        spool: source.map(|_| SPOOL.into()),
                    },
                    facts,
                    Instant::now(),
                )
                .unwrap()
            }
        };
        match admission {
            Admission::Refuse { frame, refusal } => (frame, refusal),
            other => panic!("expected a refusal, got {other:?}"),
        }
    }

    #[test]
    fn a_receiver_resumes_right_after_what_it_holds_durably() {
        let mut s = SenderSession::new("branch-a", settings(), 0);
        let admitted = greet(&mut s, Some(SOURCE), 5, &facts(3, 10), Instant::now()).unwrap();
        assert_eq!(
            admitted,
            Admission::Welcome {
                frame: Frame::Welcome {
                    source: SOURCE.into(),
                    spool: SPOOL.into(),
                    first_seq: 3
                },
                resume_after: 5
            }
        );
        assert_eq!(s.wants(10).map(|w| w.from), Some(6));
        assert_eq!(s.wants(5), None, "nothing past the complete mark");
        // A new receiver (no source yet, holds nothing) starts at the
        // spool's first record, which must be 1.
        let mut s = SenderSession::new("branch-a", settings(), 0);
        assert!(matches!(
            greet(&mut s, None, 0, &facts(1, 10), Instant::now()),
            Ok(Admission::Welcome {
                resume_after: 0,
                ..
            })
        ));
        assert_eq!(s.wants(10).map(|w| w.from), Some(1));
    }

    #[test]
    fn a_new_branch_starts_at_the_copy_made_for_it_and_waits_while_it_is_made() {
        let mut f = facts(3, 80);
        f.needs_copy = true;
        let (frame, r) = refusal(hello(None, 0), &f);
        assert_eq!(r.class, Class::Transient, "{r:?}");
        assert!(
            r.reason.contains("copy of the tables is being prepared"),
            "{r:?}"
        );
        assert_eq!(
            frame,
            Frame::RefuseClassed {
                reason: r.reason.clone(),
                definite: false
            }
        );

        let mut f = facts(3, 80);
        f.start_for = Some(50);
        let mut s = SenderSession::new("branch-a", settings(), 0);
        let admitted = greet(&mut s, None, 0, &f, Instant::now()).unwrap();
        assert_eq!(
            admitted,
            Admission::Welcome {
                frame: Frame::Welcome {
                    source: SOURCE.into(),
                    spool: SPOOL.into(),
                    first_seq: 50
                },
                resume_after: 49
            }
        );
        assert_eq!(s.wants(80).map(|w| w.from), Some(50));
        // Once it holds records, it resumes after them like anyone.
        let mut s = SenderSession::new("branch-a", settings(), 0);
        assert!(matches!(
            greet(&mut s, Some(SOURCE), 60, &f, Instant::now()),
            Ok(Admission::Welcome {
                resume_after: 60,
                ..
            })
        ));
    }

    #[test]
    fn a_receiver_of_another_protocol_is_refused_definitely_in_a_form_it_can_read() {
        let (frame, r) = refusal(
            Frame::Hello {
                protocol: 2,
                source: Some(SOURCE.into()),
                durable_seq: 0,
            },
            &facts(1, 10),
        );
        assert_eq!(r.class, Class::Definite);
        assert!(r.reason.contains("protocol 2 is not supported"), "{r:?}");
        assert_eq!(frame, Frame::Refuse { reason: r.reason });
    }

    #[test]
    fn a_sender_that_has_not_reached_its_source_refuses_for_now() {
        let mut f = facts(1, 0);
        f.source = SpoolSource::NotYet;
        let (frame, r) = refusal(hello(None, 0), &f);
        assert_eq!(r.class, Class::Transient);
        assert!(r
            .reason
            .starts_with("the sender has not reached its source database"));
        assert!(matches!(
            frame,
            Frame::RefuseClassed {
                definite: false,
                ..
            }
        ));
        f.source = SpoolSource::Unreadable("disk on fire".into());
        let (_, r) = refusal(hello(None, 0), &f);
        assert_eq!(r.class, Class::Transient);
        assert!(r.reason.contains("disk on fire"));
    }

    #[test]
    fn a_receiver_of_another_source_is_refused_definitely() {
        let (frame, r) = refusal(hello(Some("elsewhere"), 3), &facts(1, 10));
        assert_eq!(r.class, Class::Definite);
        assert!(
            r.reason
                .starts_with("the receiver's inbox belongs to source elsewhere"),
            "{r:?}"
        );
        assert!(matches!(frame, Frame::RefuseClassed { definite: true, .. }));
    }

    /// Issue 12, item 2: record numbers name transactions only within one
    /// spool. A receiver holding 20 records of spool A, greeted by a sender
    /// whose new spool (same source, same slot) has reached 30, would resume
    /// at 21 and never get the new spool's 1-20.
    #[test]
    fn a_receiver_holding_records_of_another_spool_is_refused_definitely_with_the_way_to_re_seed() {
        let mut s = SenderSession::new("branch-a", settings(), 0);
        let a = greet_from(
            &mut s,
            Some(SOURCE),
            Some("a-spool"),
            20,
            &facts(1, 30),
            Instant::now(),
        )
        .unwrap();
        let Admission::Refuse { frame, refusal } = a else {
            panic!("admitted a receiver of another spool: {a:?}")
        };
        assert_eq!(refusal.class, Class::Definite);
        assert!(
            refusal.reason.starts_with(&format!(
                "the receiver's inbox holds records of spool a-spool, but this sender's spool is {SPOOL}"
            )),
            "{refusal:?}"
        );
        assert!(
            refusal.reason.contains("Re-seed this branch"),
            "{refusal:?}"
        );
        assert!(matches!(frame, Frame::RefuseClassed { definite: true, .. }));
        assert_eq!(s.wants(30), None, "nothing is shipped to it");
        // An inbox from before protocol 4 (no spool yet) is welcomed, and
        // told which spool to keep.
        let mut s = SenderSession::new("branch-a", settings(), 0);
        let a = greet_from(
            &mut s,
            Some(SOURCE),
            None,
            20,
            &facts(1, 30),
            Instant::now(),
        )
        .unwrap();
        assert!(
            matches!(&a, Admission::Welcome { frame: Frame::Welcome { spool, .. }, resume_after: 20 } if spool == SPOOL),
            "{a:?}"
        );
    }

    #[test]
    fn a_receiver_behind_the_trimmed_spool_must_be_re_seeded() {
        // Holds up to 4, spool starts at 6: record 5 is gone.
        let (_, r) = refusal(hello(Some(SOURCE), 4), &facts(6, 10));
        assert_eq!(r.class, Class::Definite);
        assert!(r.reason.contains("re-seed this branch"), "{r:?}");
        // Holds up to 5: resumes at 6, the first stored.
        let mut s = SenderSession::new("branch-a", settings(), 0);
        assert!(matches!(
            greet(&mut s, Some(SOURCE), 5, &facts(6, 10), Instant::now()),
            Ok(Admission::Welcome {
                resume_after: 5,
                ..
            })
        ));
    }

    #[test]
    fn a_receiver_that_claims_records_past_the_spool_is_refused_definitely() {
        let (_, r) = refusal(hello(Some(SOURCE), 11), &facts(1, 10));
        assert_eq!(r.class, Class::Definite);
        assert!(
            r.reason
                .contains("claims record 11 but the spool ends at 10"),
            "{r:?}"
        );
    }

    #[test]
    fn a_first_frame_other_than_hello_breaks_the_protocol() {
        let mut s = SenderSession::new("branch-a", settings(), 0);
        let e = s.on_hello(Frame::Ack { durable_seq: 1 }).unwrap_err();
        assert!(matches!(e, SenderError::Protocol(_)), "{e}");
        // After a Hello of this protocol, only its HelloSpool.
        let mut s = SenderSession::new("branch-a", settings(), 0);
        assert_eq!(s.on_hello(hello(Some(SOURCE), 3)).unwrap(), None);
        let e = s
            .on_hello_spool(Frame::Ack { durable_seq: 1 }, &facts(1, 10), Instant::now())
            .unwrap_err();
        assert!(e.to_string().contains("not HelloSpool"), "{e}");
        let mut s = SenderSession::new("branch-a", settings(), 0);
        let e = s
            .on_hello_spool(
                Frame::HelloSpool { spool: None },
                &facts(1, 10),
                Instant::now(),
            )
            .unwrap_err();
        assert!(matches!(e, SenderError::Protocol(_)), "{e}");
        // And nothing else is taken before Welcome.
        let mut s = SenderSession::new("branch-a", settings(), 0);
        assert!(s.on_control(Frame::Ack { durable_seq: 0 }).is_err());
        assert_eq!(s.wants(10), None);
    }

    #[test]
    fn the_window_stops_at_max_in_flight_and_resumes_on_ack() {
        let t0 = Instant::now();
        let mut s = welcomed(0, 1, 100, t0);
        let mut sent = Vec::new();
        // 1,000-byte records, one per batch: the window (4,000) holds four.
        while let Some(w) = s.wants(100) {
            assert!(sent.len() < 100, "the window never closed");
            let b = s
                .next_batch(vec![rec(w.from, 1000, None)], 1e9, 100)
                .unwrap();
            sent.push(b.raw_bytes);
        }
        assert_eq!(sent.len(), 4, "stopped after {} batches", sent.len());
        assert_eq!(s.in_flight_bytes(), sent.iter().sum::<u64>());
        assert!(s.in_flight_bytes() >= 4000);
        // An Ack of the first two frees them, and sending goes on.
        let freed = s.on_control(Frame::Ack { durable_seq: 2 }).unwrap();
        assert_eq!(
            freed,
            Control::Acked {
                freed_bytes: sent[0] + sent[1]
            }
        );
        assert_eq!(s.wants(100).map(|w| w.from), Some(5));
        // An Ack that frees nothing whole (a replay's) changes nothing.
        assert_eq!(
            s.on_control(Frame::Ack { durable_seq: 1 }).unwrap(),
            Control::Acked { freed_bytes: 0 }
        );
        assert_eq!(s.acked_bytes(), sent[0] + sent[1]);
        let later = t0 + Duration::from_secs(2);
        assert_eq!(s.throughput(later), (sent[0] + sent[1]) as f64 / 2.0);
    }

    #[test]
    fn ack_or_applied_past_what_was_sent_breaks_the_protocol() {
        let mut s = welcomed(5, 1, 100, Instant::now());
        // Before any batch, the resume point is what was "sent".
        assert_eq!(
            s.on_control(Frame::Applied { seq: 5 }).unwrap(),
            Control::Applied { seq: 5 }
        );
        let e = s.on_control(Frame::Ack { durable_seq: 6 }).unwrap_err();
        assert!(
            e.to_string()
                .contains("acknowledged record 6, which was never sent"),
            "{e}"
        );
        let mut s = welcomed(5, 1, 100, Instant::now());
        s.next_batch(vec![rec(6, 100, None), rec(7, 100, None)], 1e9, 100)
            .unwrap();
        assert_eq!(s.sent_through(), 7);
        assert!(s.on_control(Frame::Ack { durable_seq: 7 }).is_ok());
        assert_eq!(
            s.on_control(Frame::Applied { seq: 7 }).unwrap(),
            Control::Applied { seq: 7 }
        );
        let e = s.on_control(Frame::Applied { seq: 8 }).unwrap_err();
        assert!(
            e.to_string()
                .contains("reported record 8 applied, which was never sent"),
            "{e}"
        );
        assert_eq!(e.class(), Class::Definite);
        let mut s = welcomed(5, 1, 100, Instant::now());
        assert!(s
            .on_control(Frame::Hello {
                protocol: 3,
                source: None,
                durable_seq: 0
            })
            .is_err());
    }

    #[test]
    fn the_zstd_level_follows_the_measured_rate_unless_pinned() {
        let shape = BatchShape::new(256 << 10, None);
        assert_eq!(shape.level(125_000.0), 9, "1 Mbit/s");
        assert_eq!(shape.level(999_999.0), 9);
        assert_eq!(shape.level(1_000_000.0), 3);
        assert_eq!(shape.level(12_500_000.0), 3, "100 Mbit/s");
        assert_eq!(shape.level(20_000_000.0), 1);
        assert_eq!(shape.level(1e9), 1);
        let pinned = BatchShape::new(256 << 10, Some(19));
        assert_eq!(pinned.level(125_000.0), 19);
        assert_eq!(pinned.level(1e9), 19);
        // The session uses the rate it is given: a slow link compresses more.
        let records: Vec<_> = (1..=20).map(|i| rec(i, 2000, None)).collect();
        let mut fast = welcomed(0, 1, 100, Instant::now());
        let mut slow = welcomed(0, 1, 100, Instant::now());
        let f = fast.next_batch(records.clone(), 1e9, 100).unwrap();
        let s = slow.next_batch(records, 100_000.0, 100).unwrap();
        assert!(
            s.wire_bytes <= f.wire_bytes,
            "level 9 {} > level 1 {}",
            s.wire_bytes,
            f.wire_bytes
        );
    }

    #[test]
    fn the_raw_batch_size_follows_the_observed_compression_ratio() {
        let mut shape = BatchShape::new(256 << 10, None);
        assert_eq!(shape.raw_bytes(), FIRST_BATCH_RAW_BYTES);
        // Ratio 4: a 48 KiB wire batch holds about 4 x 48 KiB x 0.9 raw.
        shape.observe(40_000, 10_000);
        assert_eq!(
            shape.raw_bytes(),
            (MAX_BATCH_WIRE_BYTES as f64 * 4.0 * 0.9) as usize
        );
        // Ratio 10: capped at batch-bytes.
        shape.observe(100_000, 10_000);
        assert_eq!(shape.raw_bytes(), 256 << 10);
        // Incompressible: below a wire batch, never under 4 KiB.
        shape.observe(10_000, 10_000);
        assert_eq!(
            shape.raw_bytes(),
            (MAX_BATCH_WIRE_BYTES as f64 * 0.9) as usize
        );
        shape.observe(1, 1_000_000);
        assert_eq!(shape.raw_bytes(), 4096);
        // A small batch-bytes is never exceeded, even at first.
        assert_eq!(BatchShape::new(8192, None).raw_bytes(), 8192);
    }

    #[test]
    fn records_shipped_to_this_receiver_before_are_counted_as_resent() {
        // Records up to 12 went out on an earlier session; the receiver
        // holds 10.
        let mut s = SenderSession::new("branch-a", settings(), 12);
        greet(&mut s, Some(SOURCE), 10, &facts(1, 100), Instant::now()).unwrap();
        let b = s
            .next_batch((11..=14).map(|i| rec(i, 200, None)).collect(), 1e9, 100)
            .unwrap();
        assert_eq!(b.resent_bytes, b.wire_bytes * 2 / 4, "11 and 12 of 11..=14");
        assert_eq!(b.sent_high, 14);
        let b = s.next_batch(vec![rec(15, 200, None)], 1e9, 100).unwrap();
        assert_eq!(b.resent_bytes, 0);
    }

    #[test]
    fn a_change_forwarded_from_a_receivers_own_site_reaches_it_as_a_placeholder() {
        // `welcomed` serves "branch-a".
        let mut s = welcomed(0, 1, 100, Instant::now());
        let from_us = rec(1, 300, Some("!branch-a"));
        let from_b = rec(2, 300, Some("!branch-b"));
        let b = s
            .next_batch(vec![from_us, from_b.clone()], 1e9, 100)
            .unwrap();
        let Frame::Batch {
            first_seq,
            last_seq,
            raw_len,
            payload,
        } = b.frame
        else {
            panic!("not a batch")
        };
        let got = decode_batch(first_seq, last_seq, raw_len, &payload).unwrap();
        let placeholder = Record::decode(&got[0]).unwrap();
        assert!(
            placeholder.pieces.is_empty() && placeholder.seq == 1,
            "{placeholder:?}"
        );
        assert_eq!(got[1], from_b);
    }

    #[test]
    fn records_of_another_receivers_copy_travel_as_placeholders() {
        let mut s = welcomed(0, 1, 100, Instant::now());
        let ours = rec(1, 300, Some("branch-a"));
        let theirs = rec(2, 300, Some("branch-b"));
        let all = rec(3, 300, None);
        let b = s
            .next_batch(vec![ours.clone(), theirs.clone(), all.clone()], 1e9, 100)
            .unwrap();
        let Frame::Batch {
            first_seq,
            last_seq,
            raw_len,
            payload,
        } = b.frame
        else {
            panic!("not a batch")
        };
        let got = decode_batch(first_seq, last_seq, raw_len, &payload).unwrap();
        assert_eq!(got[0], ours);
        assert_eq!(got[2], all);
        let placeholder = Record::decode(&got[1]).unwrap();
        assert_eq!(placeholder.seq, 2);
        assert!(placeholder.pieces.is_empty(), "{placeholder:?}");
        // A spool that lost a record it claims to hold is an error, not a
        // silent skip.
        let e = s.next_batch(vec![], 1e9, 100).unwrap_err();
        assert!(
            matches!(
                e,
                SenderError::SpoolHole {
                    next: 4,
                    complete: 100
                }
            ),
            "{e}"
        );
    }
}
