//! The two cores together: takeover, and a sender and a receiver talking
//! over an in-memory link in virtual time, with link drops and reconnects.

use std::collections::VecDeque;
use std::time::{Duration, Instant};

use super::receiver::{BatchVerdict, InboxFacts, ReceiverSession};
use super::sender::{Admission, Control, SenderSession, ShipSettings, SpoolFacts, SpoolSource};
use super::{SessionId, Takeover};
use crate::frame::{decode_batch, Frame};
use crate::record::{peek_seq, Piece, Record};
use crate::Lsn;

#[test]
fn a_newer_welcomed_session_supersedes_the_older_and_an_unwelcomed_one_never_does() {
    let mut t: Takeover<String, &str> = Takeover::default();
    let peer = "branch-a".to_string();
    let good = t.begin();
    assert_eq!(
        t.welcomed(&peer, good, "good"),
        None,
        "nothing to supersede"
    );
    // An impostor (wrong source, refused, never welcomed) connects: it gets
    // an id, but only a welcome makes a session live.
    let impostor = t.begin();
    assert_eq!(t.live(&peer), Some(good));
    assert!(!t.ended(&peer, impostor), "its end changes nothing");
    assert_eq!(t.live(&peer), Some(good));
    // The same peer reconnects (the old link is half-dead) and is welcomed.
    let newer = t.begin();
    assert_eq!(t.welcomed(&peer, newer, "newer"), Some("good"));
    assert_eq!(t.live(&peer), Some(newer));
    // The superseded session ends later: the newer one stays live.
    assert!(!t.ended(&peer, good));
    assert_eq!(t.live(&peer), Some(newer));
    // Another peer is independent.
    let other = "branch-b".to_string();
    let b = t.begin();
    assert_eq!(t.welcomed(&other, b, "b"), None);
    assert!(t.ended(&peer, newer));
    assert_eq!(t.live(&peer), None);
    assert_eq!(t.live(&other), Some(b));
    assert_eq!(t.drain(), vec!["b"]);
    assert!(SessionId(1) < SessionId(2));
}

fn rec(seq: u64) -> Vec<u8> {
    Record {
        seq,
        only_for: None,
        commit_lsn: Lsn(seq * 100),
        commit_time: 0,
        xid: seq as u32,
        part: 0,
        last: true,
        end_lsn: Lsn(seq * 100 + 50),
        pieces: vec![Piece::Message(
            format!("change {seq} ").repeat(40).into_bytes(),
        )],
    }
    .encode()
    .expect("record encodes")
}

/// The sender's spool: records `first..=complete`, trimmed behind the
/// receiver's `Applied`.
struct Spool {
    id: String,
    records: VecDeque<Vec<u8>>,
    first: u64,
    complete: u64,
    applied: u64,
}

impl Spool {
    fn facts(&self) -> SpoolFacts {
        SpoolFacts {
            source: SpoolSource::Known("hq".into()),
            spool: self.id.clone(),
            first_seq: self.first,
            complete_seq: self.complete,
            start_for: None,
            needs_copy: false,
        }
    }

    fn capture(&mut self, n: u64) {
        for _ in 0..n {
            self.complete += 1;
            self.records.push_back(rec(self.complete));
        }
    }

    fn read(&self, from: u64, max_bytes: usize) -> Vec<Vec<u8>> {
        let mut out = Vec::new();
        let mut bytes = 0;
        for r in self.records.iter().skip((from - self.first) as usize) {
            if !out.is_empty() && bytes + r.len() > max_bytes {
                break;
            }
            bytes += r.len();
            out.push(r.clone());
        }
        out
    }

    fn acknowledge(&mut self, seq: u64) {
        self.applied = self.applied.max(seq);
        while self.first <= self.applied {
            self.records.pop_front();
            self.first += 1;
        }
    }
}

/// The receiver's inbox and apply: records stored through `durable`,
/// applied in order into `target`.
#[derive(Default)]
struct Branch {
    source: Option<String>,
    spool: Option<String>,
    inbox: VecDeque<(u64, Vec<u8>)>,
    durable: u64,
    applied: u64,
    target: Vec<u64>,
}

impl Branch {
    fn apply_one(&mut self) {
        if let Some((seq, bytes)) = self.inbox.pop_front() {
            assert_eq!(peek_seq(&bytes).expect("stored records verify"), seq);
            self.target.push(seq);
            self.applied = seq;
        }
    }
}

/// One direction of the link: frames in order, each delivered `delay`
/// after it was sent; a drop loses everything on the wire.
struct Wire {
    delay: Duration,
    frames: VecDeque<(Instant, Frame)>,
}

impl Wire {
    fn send(&mut self, now: Instant, frame: Frame) {
        self.frames.push_back((now + self.delay, frame));
    }

    fn arrived(&mut self, now: Instant) -> Option<Frame> {
        if self.frames.front().is_some_and(|(at, _)| *at <= now) {
            self.frames.pop_front().map(|(_, f)| f)
        } else {
            None
        }
    }
}

#[test]
fn two_cores_over_a_dropping_link_deliver_every_record_once_and_in_order() {
    let t0 = Instant::now();
    let tick = Duration::from_millis(1);
    let settings = ShipSettings {
        max_in_flight: 16 << 10,
        batch_bytes: 8 << 10,
        pinned_level: Some(1),
    };
    let mut spool = Spool {
        id: "spool-a".into(),
        records: VecDeque::new(),
        first: 1,
        complete: 0,
        applied: 0,
    };
    let mut branch = Branch::default();
    let mut to_receiver = Wire {
        delay: Duration::from_millis(30),
        frames: VecDeque::new(),
    };
    let mut to_sender = Wire {
        delay: Duration::from_millis(30),
        frames: VecDeque::new(),
    };
    let mut sessions: Option<(SenderSession, ReceiverSession)> = None;
    let mut sent_high = 0;
    let mut resent = 0;
    let mut drops = 0;
    // Link down during these windows (ms): one mid-stream, one long.
    let outages = [(700..760), (1500..2600), (3100..3105)];
    for ms in 0..6000u64 {
        let now = t0 + tick * ms as u32;
        let up = !outages.iter().any(|o| o.contains(&ms));
        if ms < 4000 && ms % 3 == 0 {
            spool.capture(2);
        }
        if !up {
            if sessions.take().is_some() {
                drops += 1;
            }
            // Everything on the wire is lost.
            to_receiver.frames.clear();
            to_sender.frames.clear();
            continue;
        }
        let (snd, rcv) = sessions.get_or_insert_with(|| {
            let rcv = ReceiverSession::new(InboxFacts {
                source: branch.source.clone(),
                spool: branch.spool.clone(),
                durable_seq: branch.durable,
            });
            for f in rcv.hello() {
                to_sender.send(now, f);
            }
            (
                SenderSession::new("branch", settings.clone(), sent_high),
                rcv,
            )
        });
        // Sender side.
        while let Some(frame) = to_sender.arrived(now) {
            match frame {
                hello @ Frame::Hello { .. } => {
                    assert_eq!(snd.on_hello(hello).unwrap(), None, "same protocol");
                }
                spool_frame @ Frame::HelloSpool { .. } => {
                    match snd
                        .on_hello_spool(spool_frame, &spool.facts(), now)
                        .unwrap()
                    {
                        Admission::Welcome { frame, .. } => to_receiver.send(now, frame),
                        Admission::Refuse { refusal, .. } => panic!("refused: {refusal:?}"),
                    }
                }
                other => match snd.on_control(other).unwrap() {
                    Control::Acked { .. } => {}
                    Control::Applied { seq } => spool.acknowledge(seq),
                },
            }
        }
        while let Some(want) = snd.wants(spool.complete) {
            let shipped = snd
                .next_batch(
                    spool.read(want.from, want.max_raw_bytes),
                    1e6,
                    spool.complete,
                )
                .unwrap();
            sent_high = shipped.sent_high;
            resent += shipped.resent_bytes;
            to_receiver.send(now, shipped.frame);
        }
        // Receiver side.
        while let Some(frame) = to_receiver.arrived(now) {
            match frame {
                Frame::Batch {
                    first_seq,
                    last_seq,
                    raw_len,
                    payload,
                } => match rcv
                    .on_batch(first_seq, last_seq, branch.durable, false)
                    .unwrap()
                {
                    BatchVerdict::Replay { ack } => to_sender.send(now, rcv.stored(ack)),
                    BatchVerdict::Store { skip } => {
                        let records = decode_batch(first_seq, last_seq, raw_len, &payload).unwrap();
                        for (i, r) in records.into_iter().enumerate().skip(skip) {
                            branch.inbox.push_back((first_seq + i as u64, r));
                        }
                        branch.durable = last_seq;
                        // (fsync here)
                        to_sender.send(now, rcv.stored(branch.durable));
                    }
                },
                welcome => {
                    let w = rcv
                        .on_welcome(Some(welcome), branch.inbox.is_empty())
                        .unwrap();
                    if w.adopt_source {
                        branch.source = Some(w.source);
                    }
                    if w.adopt_spool {
                        branch.spool = Some(w.spool);
                    }
                    assert_eq!(w.start_at_copy, None);
                    if let Some(f) = rcv.applied(branch.applied) {
                        to_sender.send(now, f);
                    }
                }
            }
        }
        // Apply, slower than the link at first, then catching up.
        if ms % 2 == 0 || ms > 4000 {
            branch.apply_one();
            if let Some(f) = rcv.applied(branch.applied) {
                to_sender.send(now, f);
            }
        }
    }
    assert_eq!(drops, 3, "the link dropped three times");
    assert!(
        resent > 0,
        "a drop mid-stream made the sender ship records again"
    );
    let expected: Vec<u64> = (1..=spool.complete).collect();
    assert_eq!(
        branch.target.len(),
        expected.len(),
        "lost or doubled records"
    );
    assert_eq!(
        branch.target, expected,
        "every record applied once, in order"
    );
    assert_eq!(
        spool.first,
        spool.complete + 1,
        "the spool trimmed everything applied"
    );
}

/// Issue 12, item 2: a sender started on a new spool-dir (same source,
/// same slot) numbers its own transactions from 1. A branch holding 20
/// records of the old spool must not be resumed at 21 once the new one has
/// reached 30: it would never get the new spool's 1-20. Both cores refuse:
/// the sender on the branch's `HelloSpool`, the branch on the `Welcome` of a
/// sender that does not check.
#[test]
fn a_branch_holding_records_of_a_replaced_spool_is_refused_by_both_cores() {
    let now = Instant::now();
    let settings = ShipSettings {
        max_in_flight: 16 << 10,
        batch_bytes: 8 << 10,
        pinned_level: Some(1),
    };
    let mut old = Spool {
        id: "spool-a".into(),
        records: VecDeque::new(),
        first: 1,
        complete: 0,
        applied: 0,
    };
    old.capture(20);
    // The branch, welcomed by the old spool, holds its 20 records.
    let mut rcv = ReceiverSession::new(InboxFacts {
        source: None,
        spool: None,
        durable_seq: 0,
    });
    let mut snd = SenderSession::new("branch", settings.clone(), 0);
    let [hello, spool_frame] = rcv.hello();
    assert_eq!(snd.on_hello(hello).unwrap(), None);
    let Admission::Welcome { frame, .. } =
        snd.on_hello_spool(spool_frame, &old.facts(), now).unwrap()
    else {
        panic!("the old spool refused a new branch")
    };
    let w = rcv.on_welcome(Some(frame), true).unwrap();
    assert!(w.adopt_source && w.adopt_spool);
    let branch = InboxFacts {
        source: Some(w.source),
        spool: Some(w.spool),
        durable_seq: 20,
    };
    // A new spool on the same source, past what the branch holds.
    let mut new = Spool {
        id: "spool-b".into(),
        records: VecDeque::new(),
        first: 1,
        complete: 0,
        applied: 0,
    };
    new.capture(30);
    let rcv = ReceiverSession::new(branch.clone());
    let mut snd = SenderSession::new("branch", settings, 0);
    let [hello, spool_frame] = rcv.hello();
    assert_eq!(snd.on_hello(hello).unwrap(), None);
    match snd.on_hello_spool(spool_frame, &new.facts(), now).unwrap() {
        Admission::Refuse { frame, refusal } => {
            assert_eq!(refusal.class, super::Class::Definite);
            assert!(refusal.reason.contains("spool spool-a"), "{refusal:?}");
            assert!(matches!(frame, Frame::RefuseClassed { definite: true, .. }));
        }
        other => panic!("admitted a branch holding another spool's records: {other:?}"),
    }
    assert_eq!(snd.wants(new.complete), None, "nothing is shipped");
    // A sender that welcomes it anyway (no check of its own) is refused by
    // the branch before any batch.
    let mut rcv = ReceiverSession::new(branch);
    let e = rcv
        .on_welcome(
            Some(Frame::Welcome {
                source: "hq".into(),
                spool: "spool-b".into(),
                first_seq: 1,
            }),
            false,
        )
        .unwrap_err();
    assert_eq!(e.class(), super::Class::Definite, "{e}");
    assert!(rcv.on_batch(21, 21, 20, false).is_err());
}
