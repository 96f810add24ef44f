//! The receiver's end of a session: Hello, Welcome handling, what to do
//! with each batch, and what to acknowledge and report back.
//!
//! ```text
//!  InboxFacts ──────▶ new ─▶ hello() ─▶ Hello{durable_seq}, HelloSpool{spool}
//!  Welcome ─────────▶ on_welcome ─▶ Welcomed { adopt_source, adopt_spool, start_at_copy }
//!  Refuse* ─────────▶           └─▶ Refused (transient | definite), WrongSource,
//!                                   WrongSpool, Gap
//!  Batch + durable ─▶ on_batch ──▶ Replay { ack } | Store { skip } | Gap | Refetch
//!  synced mark ─────▶ stored ────▶ Ack (raises `told`)
//!  applied mark ────▶ applied ───▶ Applied, never past `told`
//! ```
//!
//! `told` is the highest record this session told the sender it holds
//! (its `Hello`, then each `Ack`). An earlier session may have stored and
//! applied more since this `Hello`; reporting it here would name records
//! this session's sender never sent on this connection, which it refuses
//! as a protocol error.
//!
//! The driver (`receiver/src/ingest.rs`) reads frames and the inbox, passes
//! the marks in, writes what this returns and does the inbox writes
//! (fsynced) that `Welcomed` and `BatchVerdict::Store` call for.

use super::{Class, Refusal};
use crate::frame::{Frame, PROTOCOL_VERSION};

/// What the inbox holds when a session starts.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct InboxFacts {
    /// The source the inbox belongs to (`None`: a new inbox).
    pub source: Option<String>,
    /// The sender spool the inbox holds records of (`None`: a new inbox,
    /// or one from before protocol 4).
    pub spool: Option<String>,
    /// Highest record stored and fsynced.
    pub durable_seq: u64,
}

/// A sender welcomed this session: the inbox changes to make, in order,
/// before receiving.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Welcomed {
    /// The sender's source.
    pub source: String,
    /// A new inbox: record that it belongs to `source` (fsynced).
    pub adopt_source: bool,
    /// The sender's spool identity.
    pub spool: String,
    /// The inbox names no spool yet: record `spool` (fsynced) before
    /// storing anything.
    pub adopt_spool: bool,
    /// A new branch: the sender made a copy of the tables for it, starting
    /// right after this seq. Move the inbox there (it then holds, and has
    /// applied, everything through this seq, as after a seed import).
    pub start_at_copy: Option<u64>,
}

/// What to do with a batch of records `first..=last`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum BatchVerdict {
    /// Already held (an old batch replayed, or re-sent after a reconnect):
    /// store nothing, acknowledge `ack` again (the batch's last record,
    /// not more: the sender may not have sent more on this connection).
    Replay { ack: u64 },
    /// Store the records after the first `skip` (which are already held).
    Store { skip: usize },
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum ReceiverError {
    #[error("sender refused: {}", refusal.reason)]
    Refused { refusal: Refusal },
    #[error("sender broke the protocol: {0}")]
    Protocol(String),
    #[error("the sender closed the control stream before Welcome")]
    ClosedBeforeWelcome,
    #[error("sender ships source {offered} but this inbox belongs to {ours}: use a new inbox-dir for a new source")]
    WrongSource { ours: String, offered: String },
    #[error("sender ships from spool {offered} but this inbox holds records of spool {ours}: the sender's spool-dir was replaced (or restored from another spool's backup) and its record numbers name other transactions; re-seed this branch into an empty inbox-dir (move this one aside)")]
    WrongSpool { ours: String, offered: String },
    #[error("gap: the inbox holds up to record {durable} but the sender resumes at {first}: records in between are lost; re-seed this branch")]
    Gap { durable: u64, first: u64 },
    #[error("the inbox dropped a corrupt record and everything after it; reconnecting to fetch them again")]
    Refetch,
}

impl ReceiverError {
    /// Whether reconnecting can help.
    pub fn class(&self) -> Class {
        match self {
            ReceiverError::Refused { refusal } => refusal.class,
            ReceiverError::Protocol(_)
            | ReceiverError::WrongSource { .. }
            | ReceiverError::WrongSpool { .. }
            | ReceiverError::Gap { .. } => Class::Definite,
            ReceiverError::ClosedBeforeWelcome | ReceiverError::Refetch => Class::Transient,
        }
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Phase {
    AwaitingWelcome,
    Receiving,
    Ended,
}

/// One session with the sender, from `Hello` to its end.
pub struct ReceiverSession {
    phase: Phase,
    source: Option<String>,
    spool: Option<String>,
    hello_durable: u64,
    /// Highest record this session told the sender it holds.
    told: u64,
    /// The last `Applied` sent.
    reported: Option<u64>,
}

impl ReceiverSession {
    pub fn new(inbox: InboxFacts) -> ReceiverSession {
        ReceiverSession {
            phase: Phase::AwaitingWelcome,
            source: inbox.source,
            spool: inbox.spool,
            hello_durable: inbox.durable_seq,
            told: inbox.durable_seq,
            reported: None,
        }
    }

    /// The first two frames, to write in order: `Hello` (what the inbox
    /// holds durably, in the layout every version reads) and `HelloSpool`
    /// (the spool it holds records of).
    pub fn hello(&self) -> [Frame; 2] {
        [
            Frame::Hello {
                protocol: PROTOCOL_VERSION,
                source: self.source.clone(),
                durable_seq: self.hello_durable,
            },
            Frame::HelloSpool {
                spool: self.spool.clone(),
            },
        ]
    }

    /// The sender's answer to `Hello` (`None`: the control stream ended).
    /// `inbox_empty`: the inbox holds no record (a new branch).
    pub fn on_welcome(
        &mut self,
        frame: Option<Frame>,
        inbox_empty: bool,
    ) -> Result<Welcomed, ReceiverError> {
        if self.phase != Phase::AwaitingWelcome {
            return Err(ReceiverError::Protocol("a second answer to Hello".into()));
        }
        self.phase = Phase::Ended;
        let (offered, spool, first_seq) = match frame {
            Some(Frame::Welcome {
                source,
                spool,
                first_seq,
            }) => (source, spool, first_seq),
            Some(Frame::Refuse { reason }) => {
                // Only a sender of another protocol version sends this form.
                return Err(ReceiverError::Refused {
                    refusal: Refusal::definite(reason),
                });
            }
            Some(Frame::RefuseClassed { reason, definite }) => {
                return Err(ReceiverError::Refused {
                    refusal: if definite {
                        Refusal::definite(reason)
                    } else {
                        Refusal::transient(reason)
                    },
                })
            }
            Some(other) => {
                return Err(ReceiverError::Protocol(format!(
                    "expected Welcome, got {}",
                    other.name()
                )))
            }
            None => return Err(ReceiverError::ClosedBeforeWelcome),
        };
        if let Some(ours) = &self.source {
            if *ours != offered {
                return Err(ReceiverError::WrongSource {
                    ours: ours.clone(),
                    offered,
                });
            }
        }
        if let Some(ours) = &self.spool {
            if *ours != spool {
                return Err(ReceiverError::WrongSpool {
                    ours: ours.clone(),
                    offered: spool,
                });
            }
        }
        let adopt_source = self.source.is_none();
        let adopt_spool = self.spool.is_none();
        let durable = self.hello_durable;
        let mut start_at_copy = None;
        if first_seq > durable + 1 {
            if durable == 0 && inbox_empty {
                // A new branch: the sender made a copy of the tables for
                // it and starts it there; it counts us there already.
                start_at_copy = Some(first_seq - 1);
                self.told = first_seq - 1;
            } else {
                return Err(ReceiverError::Gap {
                    durable,
                    first: first_seq,
                });
            }
        }
        self.phase = Phase::Receiving;
        Ok(Welcomed {
            source: offered,
            adopt_source,
            spool,
            adopt_spool,
            start_at_copy,
        })
    }

    /// A `Batch` of records `first..=last` arrived; the inbox holds
    /// everything through `durable`. `truncated`: apply dropped records
    /// from the inbox during this session (so a gap is ours, not the
    /// sender's: fetch them again on a new session).
    pub fn on_batch(
        &self,
        first: u64,
        last: u64,
        durable: u64,
        truncated: bool,
    ) -> Result<BatchVerdict, ReceiverError> {
        if self.phase != Phase::Receiving {
            return Err(ReceiverError::Protocol("Batch before Welcome".into()));
        }
        if last < first {
            return Err(ReceiverError::Protocol(format!(
                "batch ends at {last}, before its first record {first}"
            )));
        }
        if last <= durable {
            Ok(BatchVerdict::Replay { ack: last })
        } else if first > durable + 1 {
            if truncated {
                Err(ReceiverError::Refetch)
            } else {
                Err(ReceiverError::Gap { durable, first })
            }
        } else {
            Ok(BatchVerdict::Store {
                skip: (durable + 1 - first) as usize,
            })
        }
    }

    /// A frame on the data stream that is not a batch.
    pub fn on_data_frame(&self, frame: &Frame) -> ReceiverError {
        ReceiverError::Protocol(format!(
            "expected Batch on the data stream, got {}",
            frame.name()
        ))
    }

    /// Everything through `synced_seq` is stored and fsynced (the driver
    /// passes only a mark from after the fsync): the `Ack` to send.
    pub fn stored(&mut self, synced_seq: u64) -> Frame {
        self.told = self.told.max(synced_seq);
        Frame::Ack {
            durable_seq: synced_seq,
        }
    }

    /// Apply's mark moved to `applied_seq` (or the session just began): the
    /// `Applied` to send, if what may be reported changed. Never past
    /// `told`.
    pub fn applied(&mut self, applied_seq: u64) -> Option<Frame> {
        let seq = applied_seq.min(self.told);
        if self.reported == Some(seq) {
            return None;
        }
        self.reported = Some(seq);
        Some(Frame::Applied { seq })
    }

    /// Highest record this session told the sender it holds.
    pub fn told(&self) -> u64 {
        self.told
    }
}

/// Whether a batch of `need` bytes may be stored in an inbox holding
/// `bytes` under `inbox-max-bytes` = `max`. `holds_complete` says whether
/// the inbox holds the last record of a transaction not yet applied: if it
/// does not, apply cannot free anything until more arrives (the inbox is
/// empty, or holds only the start of one transaction larger than the
/// limit), so the batch is taken whatever its size. The inbox therefore
/// holds at most the limit plus a batch, or one transaction plus a batch.
pub fn inbox_has_room(bytes: u64, need: u64, max: Option<u64>, holds_complete: bool) -> bool {
    match max {
        None => true,
        Some(max) => !holds_complete || bytes + need <= max,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const SOURCE: &str = "hq-7";
    const SPOOL: &str = "5b0e1a9c";

    /// An inbox of `source` (and, when it has one, of our spool).
    fn session(source: Option<&str>, durable_seq: u64) -> ReceiverSession {
        ReceiverSession::new(InboxFacts {
            source: source.map(Into::into),
            spool: source.map(|_| SPOOL.into()),
            durable_seq,
        })
    }

    fn welcome(first_seq: u64) -> Option<Frame> {
        Some(Frame::Welcome {
            source: SOURCE.into(),
            spool: SPOOL.into(),
            first_seq,
        })
    }

    fn receiving(durable: u64) -> ReceiverSession {
        let mut s = session(Some(SOURCE), durable);
        s.on_welcome(welcome(1), false).unwrap();
        s
    }

    #[test]
    fn hello_says_what_the_inbox_holds() {
        assert_eq!(
            session(Some(SOURCE), 42).hello(),
            [
                Frame::Hello {
                    protocol: PROTOCOL_VERSION,
                    source: Some(SOURCE.into()),
                    durable_seq: 42
                },
                Frame::HelloSpool {
                    spool: Some(SPOOL.into())
                }
            ]
        );
        assert_eq!(
            session(None, 0).hello(),
            [
                Frame::Hello {
                    protocol: PROTOCOL_VERSION,
                    source: None,
                    durable_seq: 0
                },
                Frame::HelloSpool { spool: None }
            ]
        );
    }

    #[test]
    fn a_new_inbox_adopts_the_senders_source_and_a_used_one_refuses_another() {
        let mut s = session(None, 0);
        assert_eq!(
            s.on_welcome(welcome(1), true).unwrap(),
            Welcomed {
                source: SOURCE.into(),
                adopt_source: true,
                spool: SPOOL.into(),
                adopt_spool: true,
                start_at_copy: None
            }
        );
        let mut s = session(Some(SOURCE), 9);
        assert_eq!(
            s.on_welcome(welcome(3), false).unwrap(),
            Welcomed {
                source: SOURCE.into(),
                adopt_source: false,
                spool: SPOOL.into(),
                adopt_spool: false,
                start_at_copy: None
            }
        );
        let mut s = session(Some("elsewhere"), 9);
        let e = s.on_welcome(welcome(3), false).unwrap_err();
        assert_eq!(
            e,
            ReceiverError::WrongSource {
                ours: "elsewhere".into(),
                offered: SOURCE.into()
            }
        );
        assert_eq!(e.class(), Class::Definite);
        // A session refused at Welcome takes no batch.
        assert!(s.on_batch(10, 10, 9, false).is_err());
    }

    /// Issue 12, item 2: a sender whose spool is not the one the inbox
    /// holds records of is refused even when the record numbers would fit
    /// (its spool was replaced and has reached them again).
    #[test]
    fn a_welcome_from_another_spool_is_refused_definitely_and_a_spool_less_inbox_adopts_it() {
        let mut s = session(Some(SOURCE), 20);
        let e = s
            .on_welcome(
                Some(Frame::Welcome {
                    source: SOURCE.into(),
                    spool: "b-spool".into(),
                    first_seq: 1,
                }),
                false,
            )
            .unwrap_err();
        assert_eq!(
            e,
            ReceiverError::WrongSpool {
                ours: SPOOL.into(),
                offered: "b-spool".into()
            }
        );
        assert_eq!(e.class(), Class::Definite);
        assert!(e.to_string().contains("re-seed this branch"), "{e}");
        assert!(s.on_batch(21, 21, 20, false).is_err(), "takes no batch");
        // An inbox from before protocol 4 holds a source but no spool: it
        // adopts the sender's.
        let mut s = ReceiverSession::new(InboxFacts {
            source: Some(SOURCE.into()),
            spool: None,
            durable_seq: 20,
        });
        let w = s.on_welcome(welcome(1), false).unwrap();
        assert!(w.adopt_spool && !w.adopt_source, "{w:?}");
        assert_eq!(w.spool, SPOOL);
    }

    #[test]
    fn a_welcome_past_what_the_inbox_holds_is_a_gap_unless_the_branch_is_new() {
        let mut s = session(Some(SOURCE), 9);
        let e = s.on_welcome(welcome(11), false).unwrap_err();
        assert_eq!(
            e,
            ReceiverError::Gap {
                durable: 9,
                first: 11
            }
        );
        assert_eq!(e.class(), Class::Definite);
        // Resuming right after what we hold is no gap.
        let mut s = session(Some(SOURCE), 9);
        assert!(s.on_welcome(welcome(10), false).is_ok());
        // Holds nothing but its inbox is not empty (all applied and kept?):
        // not a new branch.
        let mut s = session(Some(SOURCE), 0);
        assert!(matches!(
            s.on_welcome(welcome(50), false),
            Err(ReceiverError::Gap { .. })
        ));
        // A new branch starts at the copy made for it, and counts it as told.
        let mut s = session(None, 0);
        assert_eq!(
            s.on_welcome(welcome(50), true).unwrap(),
            Welcomed {
                source: SOURCE.into(),
                adopt_source: true,
                spool: SPOOL.into(),
                adopt_spool: true,
                start_at_copy: Some(49)
            }
        );
        assert_eq!(s.told(), 49);
        assert_eq!(s.applied(49), Some(Frame::Applied { seq: 49 }));
    }

    #[test]
    fn refusals_carry_their_class_and_an_unclassified_one_is_definite() {
        let mut s = session(None, 0);
        let e = s
            .on_welcome(
                Some(Frame::RefuseClassed {
                    reason: "the sender has not reached its source database yet; retry later"
                        .into(),
                    definite: false,
                }),
                true,
            )
            .unwrap_err();
        assert_eq!(e.class(), Class::Transient);
        assert_eq!(
            e.to_string(),
            "sender refused: the sender has not reached its source database yet; retry later"
        );
        let mut s = session(None, 0);
        let e = s
            .on_welcome(
                Some(Frame::RefuseClassed {
                    reason: "re-seed".into(),
                    definite: true,
                }),
                true,
            )
            .unwrap_err();
        assert_eq!(e.class(), Class::Definite);
        let mut s = session(None, 0);
        let e = s
            .on_welcome(
                Some(Frame::Refuse {
                    reason: "protocol 3 is not supported".into(),
                }),
                true,
            )
            .unwrap_err();
        assert_eq!(e.class(), Class::Definite);
        // A stream that ends before the answer is the link's doing.
        let mut s = session(None, 0);
        assert_eq!(
            s.on_welcome(None, true).unwrap_err().class(),
            Class::Transient
        );
        let mut s = session(None, 0);
        assert!(matches!(
            s.on_welcome(Some(Frame::Ack { durable_seq: 1 }), true),
            Err(ReceiverError::Protocol(_))
        ));
    }

    #[test]
    fn replays_are_acknowledged_again_overlaps_trimmed_and_gaps_refused() {
        let s = receiving(10);
        assert_eq!(
            s.on_batch(1, 5, 10, false),
            Ok(BatchVerdict::Replay { ack: 5 })
        );
        assert_eq!(
            s.on_batch(10, 10, 10, false),
            Ok(BatchVerdict::Replay { ack: 10 })
        );
        assert_eq!(
            s.on_batch(11, 20, 10, false),
            Ok(BatchVerdict::Store { skip: 0 })
        );
        assert_eq!(
            s.on_batch(8, 12, 10, false),
            Ok(BatchVerdict::Store { skip: 3 })
        );
        assert_eq!(
            s.on_batch(12, 20, 10, false),
            Err(ReceiverError::Gap {
                durable: 10,
                first: 12
            })
        );
        // After apply dropped records from the inbox, a gap means: fetch
        // them again on a new session.
        assert_eq!(s.on_batch(12, 20, 10, true), Err(ReceiverError::Refetch));
        assert_eq!(ReceiverError::Refetch.class(), Class::Transient);
        assert!(matches!(
            s.on_batch(5, 4, 10, false),
            Err(ReceiverError::Protocol(_))
        ));
        let s = receiving(0);
        assert_eq!(
            s.on_batch(1, 1, 0, false),
            Ok(BatchVerdict::Store { skip: 0 })
        );
    }

    #[test]
    fn applied_is_never_reported_past_what_this_session_told_the_sender() {
        // Hello said 10; an earlier session has since stored and applied 30.
        let mut s = receiving(10);
        assert_eq!(s.applied(30), Some(Frame::Applied { seq: 10 }));
        assert_eq!(s.applied(31), None, "still 10: nothing new to say");
        // This session acknowledges 20: now up to 20 may be reported.
        assert_eq!(s.stored(20), Frame::Ack { durable_seq: 20 });
        assert_eq!(s.applied(31), Some(Frame::Applied { seq: 20 }));
        assert_eq!(
            s.applied(15),
            Some(Frame::Applied { seq: 15 }),
            "a lower mark is said (a truncation)"
        );
        // A replay's re-acknowledgement never lowers `told`.
        assert_eq!(s.stored(12), Frame::Ack { durable_seq: 12 });
        assert_eq!(s.told(), 20);
        assert_eq!(s.applied(25), Some(Frame::Applied { seq: 20 }));
    }

    #[test]
    fn the_inbox_takes_a_batch_while_it_has_room_and_always_when_empty() {
        assert!(inbox_has_room(10, 90, Some(100), true));
        assert!(!inbox_has_room(11, 90, Some(100), true));
        assert!(inbox_has_room(0, 1000, Some(100), false));
        assert!(inbox_has_room(1 << 40, 1 << 40, None, true));
    }

    #[test]
    fn a_transaction_larger_than_the_limit_is_taken_whole_then_the_limit_holds() {
        // Only the start of one transaction, already past the limit: apply
        // can free nothing until its last record arrives.
        assert!(inbox_has_room(500, 90, Some(100), false));
        // Its last record is stored: apply commits it and frees room.
        assert!(!inbox_has_room(500, 90, Some(100), true));
    }
}
