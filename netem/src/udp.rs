//! The UDP relay: datagrams through the link model, delivered at the times
//! it decides.
//!
//! ```text
//!  client ─▶ listen socket ─▶ forward model ─▶ forward scheduler ─▶ flow's upstream socket ─▶ forward address
//!  client ◀─ listen socket ◀─ back scheduler ◀─ back model ◀──────── flow's upstream socket ◀─ forward address
//! ```
//!
//! Each client address gets its own *flow*: an upstream socket connected to
//! the forward address, so the far end sees one peer per client (as behind
//! a NAT) and its replies find their way back. A flow expires after
//! [`FLOW_IDLE`] without traffic either way; at most [`MAX_FLOWS`] are active.
//!
//! A scheduler per direction holds the datagrams in flight in a min-heap by
//! delivery time. Its sender is a blocking thread (from tokio's blocking
//! pool) that waits on a condition variable with a timeout: it sends within
//! about 0.1 ms of the scheduled time, where tokio's millisecond timer wheel
//! would add up to 1 ms (never early in either case). It sends on
//! non-blocking clones of the relay's sockets; a send that would block (a
//! full socket buffer) is dropped and counted as a send error, as a NIC
//! drops when its ring is full. In-flight bytes are bounded per direction by
//! [`MAX_IN_FLIGHT_BYTES`]; past that a datagram is dropped and counted as
//! relay overflow (only an unlimited-rate link with a long delay gets there).
//!
//! The rate counts UDP payload bytes, not the IP and UDP headers.

use std::cmp::Reverse;
use std::collections::{BinaryHeap, HashMap};
use std::net::{Ipv4Addr, Ipv6Addr, SocketAddr};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex, PoisonError};
use std::time::Duration;

use tokio::net::UdpSocket;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::link::{Counters, Direction, Link, LinkControl};
use crate::model::{flip_bit, Verdict};
use crate::relay::{RelayError, RelayHandle};

/// Largest datagram the relay receives.
const MAX_DATAGRAM: usize = 65_535;
/// Most clients relayed at once.
pub const MAX_FLOWS: usize = 1024;
/// A flow without traffic for this long is closed.
pub const FLOW_IDLE: Duration = Duration::from_secs(300);
/// Most payload bytes held in flight per direction.
pub const MAX_IN_FLIGHT_BYTES: usize = 64 << 20;

/// Starts UDP relays.
pub enum UdpRelay {}

impl UdpRelay {
    /// Relay datagrams from clients at `listen` to `forward` and replies back,
    /// through `link`.
    pub async fn start(
        listen: SocketAddr,
        forward: SocketAddr,
        link: Link,
    ) -> Result<RelayHandle, RelayError> {
        UdpRelay::start_sharing(listen, forward, LinkControl::new(&link)?).await
    }

    /// Like [`UdpRelay::start`], through the models of `control`: relays
    /// started with the same control share one bottleneck (its rate, queue
    /// and counters), as two branches behind one uplink do.
    pub async fn start_sharing(
        listen: SocketAddr,
        forward: SocketAddr,
        control: LinkControl,
    ) -> Result<RelayHandle, RelayError> {
        let (socket, sender) = open_socket(listen, None).map_err(|source| RelayError::Bind {
            addr: listen,
            source,
        })?;
        let local_addr = socket.local_addr().map_err(|source| RelayError::Bind {
            addr: listen,
            source,
        })?;
        let socket = Arc::new(socket);
        let cancel = CancellationToken::new();
        let tracker = TaskTracker::new();

        let to_forward = Scheduler::start(&tracker, &cancel, &control);
        let to_client = Scheduler::start(&tracker, &cancel, &control);
        let clients = ClientSide {
            socket,
            sender,
            forward,
            control: control.clone(),
            to_forward,
            to_client,
            flows: HashMap::new(),
            cancel: cancel.clone(),
            tracker: tracker.clone(),
        };
        tracker.spawn(clients.run());
        tracing::debug!(%local_addr, %forward, "udp relay started");
        Ok(RelayHandle::new(control, local_addr, cancel, tracker))
    }
}

/// A datagram waiting for its delivery time.
struct Departure {
    at: std::time::Instant,
    seq: u64,
    socket: Arc<std::net::UdpSocket>,
    /// `None`: the socket is connected (a flow's upstream socket).
    to: Option<SocketAddr>,
    payload: Vec<u8>,
}

impl PartialEq for Departure {
    fn eq(&self, other: &Self) -> bool {
        (self.at, self.seq) == (other.at, other.seq)
    }
}
impl Eq for Departure {}
impl PartialOrd for Departure {
    fn partial_cmp(&self, other: &Self) -> Option<std::cmp::Ordering> {
        Some(self.cmp(other))
    }
}
impl Ord for Departure {
    fn cmp(&self, other: &Self) -> std::cmp::Ordering {
        (self.at, self.seq).cmp(&(other.at, other.seq))
    }
}

/// One direction's datagrams in flight, shared by the tasks that schedule
/// them and the thread that sends them.
struct InFlight {
    heap: Mutex<Queue>,
    /// Signalled when a datagram becomes the earliest, and on shutdown.
    wake: Condvar,
}

#[derive(Default)]
struct Queue {
    heap: BinaryHeap<Reverse<Departure>>,
    bytes: usize,
    next_seq: u64,
}

/// The longest the sender sleeps before it checks for shutdown.
const IDLE_WAIT: Duration = Duration::from_millis(100);

/// Schedules one direction's datagrams.
#[derive(Clone)]
struct Scheduler {
    in_flight: Arc<InFlight>,
    control: LinkControl,
}

impl Scheduler {
    fn start(
        tracker: &TaskTracker,
        cancel: &CancellationToken,
        control: &LinkControl,
    ) -> Scheduler {
        let in_flight = Arc::new(InFlight {
            heap: Mutex::new(Queue::default()),
            wake: Condvar::new(),
        });
        let (shared, token, ctl) = (in_flight.clone(), cancel.clone(), control.clone());
        tracker.spawn_blocking(move || send_when_due(&shared, &token, &ctl));
        // Wake the sender at once on shutdown rather than at its next check.
        let (shared, token) = (in_flight.clone(), cancel.clone());
        tracker.spawn(async move {
            token.cancelled().await;
            shared.wake.notify_all();
        });
        Scheduler {
            in_flight,
            control: control.clone(),
        }
    }

    /// Carry out `verdict` for `payload`: schedule it (and its duplicate),
    /// with a bit flipped if it is corrupted.
    fn carry_out(
        &self,
        verdict: Verdict,
        payload: &[u8],
        socket: &Arc<std::net::UdpSocket>,
        to: Option<SocketAddr>,
    ) {
        let Verdict::Deliver {
            at,
            duplicate_at,
            corrupt_bit,
        } = verdict
        else {
            return;
        };
        let mut payload = payload.to_vec();
        if let Some(bit) = corrupt_bit {
            flip_bit(&mut payload, bit);
        }
        if let Some(dup) = duplicate_at {
            self.schedule(dup, socket, to, payload.clone());
        }
        self.schedule(at, socket, to, payload);
    }

    fn schedule(
        &self,
        at: Duration,
        socket: &Arc<std::net::UdpSocket>,
        to: Option<SocketAddr>,
        payload: Vec<u8>,
    ) {
        let at = self.control.instant(at).into_std();
        let mut queue = self
            .in_flight
            .heap
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        if queue.bytes + payload.len() > MAX_IN_FLIGHT_BYTES {
            Counters::bump(&self.control.counters().overflow);
            return;
        }
        queue.bytes += payload.len();
        let seq = queue.next_seq;
        queue.next_seq += 1;
        let earliest = queue.heap.peek().map_or(true, |Reverse(head)| at < head.at);
        queue.heap.push(Reverse(Departure {
            at,
            seq,
            socket: socket.clone(),
            to,
            payload,
        }));
        drop(queue);
        if earliest {
            self.in_flight.wake.notify_one();
        }
    }
}

/// The sender thread: send each datagram at its time, until shutdown, which
/// discards what is still in flight.
fn send_when_due(in_flight: &InFlight, cancel: &CancellationToken, control: &LinkControl) {
    let mut due = Vec::new();
    let mut queue = in_flight
        .heap
        .lock()
        .unwrap_or_else(PoisonError::into_inner);
    loop {
        if cancel.is_cancelled() {
            return;
        }
        let now = std::time::Instant::now();
        while queue.heap.peek().is_some_and(|Reverse(d)| d.at <= now) {
            let Some(Reverse(d)) = queue.heap.pop() else {
                break;
            };
            queue.bytes -= d.payload.len();
            due.push(d);
        }
        if due.is_empty() {
            let wait = queue
                .heap
                .peek()
                .map_or(IDLE_WAIT, |Reverse(d)| (d.at - now).min(IDLE_WAIT));
            queue = in_flight
                .wake
                .wait_timeout(queue, wait)
                .unwrap_or_else(PoisonError::into_inner)
                .0;
            continue;
        }
        drop(queue);
        for d in due.drain(..) {
            let sent = match d.to {
                Some(to) => d.socket.send_to(&d.payload, to),
                None => d.socket.send(&d.payload),
            };
            if let Err(error) = sent {
                // Typically nothing listens at the far end yet; UDP carries on.
                tracing::debug!(%error, "send datagram");
                Counters::bump(&control.counters().send_errors);
            }
        }
        queue = in_flight
            .heap
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
    }
}

/// A socket bound at `addr` (connected to `peer` if given), as a tokio
/// socket to receive on and a non-blocking std clone for the sender thread.
fn open_socket(
    addr: SocketAddr,
    peer: Option<SocketAddr>,
) -> std::io::Result<(UdpSocket, Arc<std::net::UdpSocket>)> {
    let socket = std::net::UdpSocket::bind(addr)?;
    if let Some(peer) = peer {
        socket.connect(peer)?;
    }
    socket.set_nonblocking(true)?;
    let sender = socket.try_clone()?;
    Ok((UdpSocket::from_std(socket)?, Arc::new(sender)))
}

/// One client's upstream socket.
struct Flow {
    /// The sending clone of the upstream socket.
    upstream: Arc<std::net::UdpSocket>,
    /// Milliseconds since the epoch of the last datagram either way.
    last_seen_ms: Arc<AtomicU64>,
    cancel: CancellationToken,
}

/// The listen socket's task: receives from clients, opens and expires flows.
struct ClientSide {
    socket: Arc<UdpSocket>,
    /// The sending clone of the listen socket.
    sender: Arc<std::net::UdpSocket>,
    forward: SocketAddr,
    control: LinkControl,
    to_forward: Scheduler,
    to_client: Scheduler,
    flows: HashMap<SocketAddr, Flow>,
    cancel: CancellationToken,
    tracker: TaskTracker,
}

impl ClientSide {
    async fn run(mut self) {
        let mut buf = vec![0u8; MAX_DATAGRAM];
        let mut sweep = tokio::time::interval(FLOW_IDLE / 10);
        loop {
            let received = tokio::select! {
                () = self.cancel.cancelled() => return,
                _ = sweep.tick() => {
                    self.expire_idle_flows();
                    continue;
                }
                r = self.socket.recv_from(&mut buf) => r,
            };
            let (len, client) = match received {
                Ok(r) => r,
                Err(error) => {
                    tracing::debug!(%error, "receive datagram from a client");
                    continue;
                }
            };
            let now = self.control.elapsed();
            let Some(upstream) = self.flow(client, now) else {
                continue;
            };
            let verdict = self.control.model(Direction::Forward).on_packet(now, len);
            self.to_forward
                .carry_out(verdict, &buf[..len], &upstream, None);
        }
    }

    /// The upstream socket of `client`'s flow, opened on its first datagram.
    fn flow(&mut self, client: SocketAddr, now: Duration) -> Option<Arc<std::net::UdpSocket>> {
        if let Some(flow) = self.flows.get(&client) {
            flow.last_seen_ms
                .store(now.as_millis() as u64, Ordering::Relaxed);
            return Some(flow.upstream.clone());
        }
        let counters = self.control.counters();
        if self.flows.len() >= MAX_FLOWS {
            Counters::bump(&counters.flows_refused);
            return None;
        }
        let any: SocketAddr = if self.forward.is_ipv4() {
            (Ipv4Addr::UNSPECIFIED, 0).into()
        } else {
            (Ipv6Addr::UNSPECIFIED, 0).into()
        };
        let (receiver, upstream) = match open_socket(any, Some(self.forward)) {
            Ok(s) => s,
            Err(error) => {
                tracing::warn!(%error, %client, forward = %self.forward, "open upstream socket");
                Counters::bump(&counters.send_errors);
                return None;
            }
        };
        let flow = Flow {
            upstream: upstream.clone(),
            last_seen_ms: Arc::new(AtomicU64::new(now.as_millis() as u64)),
            cancel: self.cancel.child_token(),
        };
        let replies = Replies {
            upstream: receiver,
            listen: self.sender.clone(),
            client,
            control: self.control.clone(),
            to_client: self.to_client.clone(),
            last_seen_ms: flow.last_seen_ms.clone(),
            cancel: flow.cancel.clone(),
        };
        self.tracker.spawn(replies.run());
        self.flows.insert(client, flow);
        Counters::bump(&counters.flows);
        counters
            .flows_active
            .store(self.flows.len() as u64, Ordering::Relaxed);
        tracing::debug!(%client, "new flow");
        Some(upstream)
    }

    fn expire_idle_flows(&mut self) {
        let now_ms = self.control.elapsed().as_millis() as u64;
        let idle_ms = FLOW_IDLE.as_millis() as u64;
        self.flows.retain(|client, flow| {
            let keep = now_ms.saturating_sub(flow.last_seen_ms.load(Ordering::Relaxed)) < idle_ms;
            if !keep {
                tracing::debug!(%client, "flow expired");
                flow.cancel.cancel();
            }
            keep
        });
        self.control
            .counters()
            .flows_active
            .store(self.flows.len() as u64, Ordering::Relaxed);
    }
}

/// One flow's task: replies from the forward address, back to the client.
struct Replies {
    upstream: UdpSocket,
    /// The sending clone of the listen socket.
    listen: Arc<std::net::UdpSocket>,
    client: SocketAddr,
    control: LinkControl,
    to_client: Scheduler,
    last_seen_ms: Arc<AtomicU64>,
    cancel: CancellationToken,
}

impl Replies {
    async fn run(self) {
        let mut buf = vec![0u8; MAX_DATAGRAM];
        loop {
            let received = tokio::select! {
                () = self.cancel.cancelled() => return,
                r = self.upstream.recv(&mut buf) => r,
            };
            let len = match received {
                Ok(len) => len,
                Err(error) => {
                    // A connected UDP socket reports an earlier ICMP "port
                    // unreachable" as ECONNREFUSED; the flow goes on.
                    tracing::debug!(%error, client = %self.client, "receive reply");
                    continue;
                }
            };
            let now = self.control.elapsed();
            self.last_seen_ms
                .store(now.as_millis() as u64, Ordering::Relaxed);
            let verdict = self.control.model(Direction::Back).on_packet(now, len);
            self.to_client
                .carry_out(verdict, &buf[..len], &self.listen, Some(self.client));
        }
    }
}
