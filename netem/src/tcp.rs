//! The TCP relay: byte streams through the link's delay, rate limit and
//! outages.
//!
//! ```text
//!  client ─▶ accept ─▶ read ─▶ segments ≤ 1448 B ─▶ forward model (wait for room) ─▶ write at `at` ─▶ forward address
//!  client ◀─ write at `at` ◀─ back model (wait for room) ◀─ segments ◀─ read ◀──────────────────────── forward address
//! ```
//!
//! Each accepted connection gets its own upstream connection; all
//! connections share the link, so they share its rate. The relay cuts what
//! it reads into segments and feeds them to the model; a segment that would
//! overflow the bottleneck queue waits for room instead of being dropped,
//! and while it waits the relay reads no more, so TCP's own flow control
//! slows the sender (backpressure, as a full router queue does through loss
//! and retransmission, but without the loss).
//!
//! **Loss, duplication, reordering, corruption and the MTU do not apply**:
//! the relay terminates TCP, and the kernel's TCP below it would hide them
//! by retransmitting. To emulate a lossy path for TCP, relay a protocol that
//! runs over UDP, or use the kernel's netem.
//!
//! Outages, commanded or scheduled, act per [`OutageMode`]:
//! - `Stall`: nothing is read or written while the link is down; connections
//!   stay open and resume when it comes up. New connections are accepted by
//!   the kernel but not connected upstream until then.
//! - `Cut`: when the link goes down every connection is reset (RST both ways)
//!   and new ones are reset at once while it stays down.
//!
//! Connection setup is not delayed (the kernel completes the client's
//! handshake); data and the end of stream are.

use std::io;
use std::net::SocketAddr;
use std::str::FromStr;
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::tcp::{OwnedReadHalf, OwnedWriteHalf};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::link::{Counters, Direction, Link, LinkControl};
use crate::model::Verdict;
use crate::relay::{RelayError, RelayHandle};

/// Bytes of one segment fed to a rate-limited model (a typical Ethernet MSS).
pub const SEGMENT: usize = 1448;
/// Segments in flight per direction of a connection (about 6 MiB): bounds
/// memory; on an unlimited link with a long delay it also bounds throughput
/// to this much per delay.
const SEGMENTS_IN_FLIGHT: usize = 4096;
const READ_CHUNK: usize = 16 * 1024;
const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);

/// What an outage does to TCP connections.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum OutageMode {
    /// Stop forwarding; keep connections.
    Stall,
    /// Reset connections; refuse new ones while down.
    Cut,
}

impl FromStr for OutageMode {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "stall" => Ok(OutageMode::Stall),
            "cut" => Ok(OutageMode::Cut),
            other => Err(format!(
                "outage mode {other:?} is neither \"stall\" nor \"cut\""
            )),
        }
    }
}

/// Starts TCP relays.
pub enum TcpRelay {}

impl TcpRelay {
    /// Relay connections accepted at `listen` to `forward` through `link`
    /// (its stream knobs only: see [`crate::model::LinkParams::for_stream`]).
    pub async fn start(
        listen: SocketAddr,
        forward: SocketAddr,
        link: Link,
        mode: OutageMode,
    ) -> Result<RelayHandle, RelayError> {
        let link = Link {
            forward: link.forward.for_stream(),
            back: link.back.for_stream(),
            seed: link.seed,
        };
        let control = LinkControl::new(&link)?;
        let listener = TcpListener::bind(listen)
            .await
            .map_err(|source| RelayError::Bind {
                addr: listen,
                source,
            })?;
        let local_addr = listener.local_addr().map_err(|source| RelayError::Bind {
            addr: listen,
            source,
        })?;
        let cancel = CancellationToken::new();
        let tracker = TaskTracker::new();
        let acceptor = Acceptor {
            listener,
            forward,
            control: control.clone(),
            mode,
            cancel: cancel.clone(),
            tracker: tracker.clone(),
        };
        tracker.spawn(acceptor.run());
        tracing::debug!(%local_addr, %forward, ?mode, "tcp relay started");
        Ok(RelayHandle::new(control, local_addr, cancel, tracker))
    }
}

struct Acceptor {
    listener: TcpListener,
    forward: SocketAddr,
    control: LinkControl,
    mode: OutageMode,
    cancel: CancellationToken,
    tracker: TaskTracker,
}

impl Acceptor {
    /// Accept connections; in `Cut` mode also watch for the link going down
    /// and cut every connection opened before.
    async fn run(self) {
        let counters = self.control.counters();
        let mut commanded = self.control.watch_down();
        // Cancelled and replaced at each cut; connections hold child tokens.
        let mut generation = self.cancel.child_token();
        let mut was_down = false;
        loop {
            let next_transition = self.next_transition();
            let accepted = tokio::select! {
                () = self.cancel.cancelled() => return,
                changed = commanded.changed() => {
                    if changed.is_err() {
                        return;
                    }
                    None
                }
                () = sleep_until_some(next_transition) => None,
                r = self.listener.accept() => Some(r),
            };
            let down = self.control.is_down();
            if self.mode == OutageMode::Cut && down && !was_down {
                tracing::debug!("link down: cutting connections");
                generation.cancel();
                generation = self.cancel.child_token();
            }
            was_down = down;
            let (stream, peer) = match accepted {
                None => continue,
                Some(Ok(a)) => a,
                Some(Err(error)) => {
                    // Out of descriptors, or the client gave up: try the next one.
                    tracing::warn!(%error, "accept connection");
                    continue;
                }
            };
            if self.mode == OutageMode::Cut && down {
                Counters::bump(&counters.connections_refused);
                reset(&stream);
                continue;
            }
            Counters::bump(&counters.connections);
            let connection = Connection {
                forward: self.forward,
                control: self.control.clone(),
                mode: self.mode,
                cut: generation.child_token(),
                shutdown: self.cancel.clone(),
            };
            tracing::debug!(%peer, "new connection");
            self.tracker.spawn(connection.run(stream));
        }
    }

    /// When a scheduled outage next begins or ends (either direction).
    fn next_transition(&self) -> Option<tokio::time::Instant> {
        let now = self.control.elapsed();
        let f = self.control.model(Direction::Forward).next_transition(now);
        let b = self.control.model(Direction::Back).next_transition(now);
        let t = match (f, b) {
            (Some(f), Some(b)) => Some(f.min(b)),
            (f, b) => f.or(b),
        };
        t.map(|t| self.control.instant(t))
    }
}

/// Reset a connection: close with SO_LINGER 0 so both ends see RST.
fn reset(stream: &TcpStream) {
    if let Err(error) = stream.set_zero_linger() {
        tracing::debug!(%error, "set SO_LINGER 0");
    }
}

struct Connection {
    forward: SocketAddr,
    control: LinkControl,
    mode: OutageMode,
    /// Cancelled when an outage cuts this connection (or on shutdown).
    cut: CancellationToken,
    shutdown: CancellationToken,
}

impl Connection {
    async fn run(self, client: TcpStream) {
        let counters = self.control.counters();
        if self.mode == OutageMode::Stall {
            tokio::select! {
                () = self.cut.cancelled() => return,
                () = wait_until_up(&self.control, Direction::Forward) => {}
            }
        }
        let connect = tokio::time::timeout(CONNECT_TIMEOUT, TcpStream::connect(self.forward));
        let upstream = tokio::select! {
            () = self.cut.cancelled() => return,
            r = connect => match r {
                Ok(Ok(s)) => s,
                Ok(Err(error)) => {
                    tracing::debug!(%error, forward = %self.forward, "connect upstream");
                    Counters::bump(&counters.connect_errors);
                    reset(&client);
                    return;
                }
                Err(_elapsed) => {
                    tracing::debug!(forward = %self.forward, "connect upstream timed out");
                    Counters::bump(&counters.connect_errors);
                    reset(&client);
                    return;
                }
            },
        };
        for s in [&client, &upstream] {
            if let Err(error) = s.set_nodelay(true) {
                tracing::debug!(%error, "set TCP_NODELAY");
            }
        }
        let (mut client_read, mut client_write) = client.into_split();
        let (mut upstream_read, mut upstream_write) = upstream.into_split();
        let outcome = tokio::select! {
            () = self.cut.cancelled() => None,
            r = async {
                tokio::try_join!(
                    pump(&mut client_read, &mut upstream_write, Direction::Forward, &self.control, self.mode),
                    pump(&mut upstream_read, &mut client_write, Direction::Back, &self.control, self.mode),
                )
            } => Some(r),
        };
        match outcome {
            Some(Ok(_)) => {}
            None if self.shutdown.is_cancelled() => {}
            None => {
                Counters::bump(&counters.connections_cut);
                reset(client_write.as_ref());
                reset(upstream_write.as_ref());
            }
            Some(Err(error)) => {
                // One side reset or failed: pass the reset on to the other.
                tracing::debug!(%error, "relay connection");
                reset(client_write.as_ref());
                reset(upstream_write.as_ref());
            }
        }
    }
}

/// What the reading side hands to the writing side.
enum Segment {
    Data { at: Duration, bytes: Vec<u8> },
    End { at: Duration },
}

/// One direction of a connection: read, pass through the model, write at
/// the delivery times; shut down the write side after the end of stream.
async fn pump(
    reader: &mut OwnedReadHalf,
    writer: &mut OwnedWriteHalf,
    direction: Direction,
    control: &LinkControl,
    mode: OutageMode,
) -> io::Result<()> {
    let (tx, mut rx) = mpsc::channel::<Segment>(SEGMENTS_IN_FLIGHT);
    // Segments let a rate limit pace the stream; without one, a whole read
    // travels as one piece.
    let segment = if control.model(direction).params().rate_bps.is_some() {
        SEGMENT
    } else {
        READ_CHUNK
    };
    let read_side = async move {
        let mut buf = vec![0u8; READ_CHUNK];
        let mut last_at = Duration::ZERO;
        loop {
            let n = reader.read(&mut buf).await?;
            if n == 0 {
                let delay = control.model(direction).params().delay;
                let at = last_at.max(control.elapsed() + delay);
                // A closed channel means the writer failed; try_join reports that.
                let _ = tx.send(Segment::End { at }).await;
                return Ok::<(), io::Error>(());
            }
            for bytes in buf[..n].chunks(segment) {
                let at = admit(control, direction, bytes.len()).await;
                last_at = at;
                if tx
                    .send(Segment::Data {
                        at,
                        bytes: bytes.to_vec(),
                    })
                    .await
                    .is_err()
                {
                    return Ok(());
                }
            }
        }
    };
    let write_side = async move {
        while let Some(segment) = rx.recv().await {
            let at = match &segment {
                Segment::Data { at, .. } | Segment::End { at } => *at,
            };
            tokio::time::sleep_until(control.instant(at)).await;
            if mode == OutageMode::Stall {
                wait_until_up(control, direction).await;
            }
            match segment {
                Segment::Data { bytes, .. } => writer.write_all(&bytes).await?,
                Segment::End { .. } => {
                    writer.shutdown().await?;
                    return Ok(());
                }
            }
        }
        Ok::<(), io::Error>(())
    };
    tokio::try_join!(read_side, write_side).map(|_| ())
}

/// Wait until a segment of `len` bytes may enter the link (up, and room in
/// the queue), enter it, and return its delivery time.
async fn admit(control: &LinkControl, direction: Direction, len: usize) -> Duration {
    let mut commanded = control.watch_down();
    loop {
        let now = control.elapsed();
        let ready = {
            let mut model = control.model(direction);
            match model.ready_at(now, len) {
                Some(t) if t <= now => match model.on_packet(now, len) {
                    Verdict::Deliver { at, .. } => return at,
                    // Not expected: ready_at and on_packet agree, and stream
                    // parameters lose nothing. Look again shortly.
                    Verdict::Drop(_) => Some(now + Duration::from_millis(1)),
                },
                other => other,
            }
        };
        match ready {
            Some(t) => tokio::time::sleep_until(control.instant(t)).await,
            None => {
                if commanded.changed().await.is_err() {
                    // The control is gone with the relay; nothing more to admit.
                    std::future::pending::<()>().await;
                }
            }
        }
    }
}

/// Wait while `direction` of the link is down (commanded or scheduled).
async fn wait_until_up(control: &LinkControl, direction: Direction) {
    let mut commanded = control.watch_down();
    loop {
        let now = control.elapsed();
        let up_at = control.model(direction).up_at(now);
        match up_at {
            Some(t) if t <= now => return,
            Some(t) => tokio::time::sleep_until(control.instant(t)).await,
            None => {
                if commanded.changed().await.is_err() {
                    std::future::pending::<()>().await;
                }
            }
        }
    }
}

async fn sleep_until_some(deadline: Option<tokio::time::Instant>) {
    match deadline {
        Some(deadline) => tokio::time::sleep_until(deadline).await,
        None => std::future::pending().await,
    }
}
