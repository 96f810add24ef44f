use std::net::SocketAddr;
use std::time::{Duration, Instant};

use pgcourier_netem::{Link, LinkParams, OutageMode, OutageSchedule, TcpRelay};
use rand::{Rng, SeedableRng};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

use crate::{wait_for, within, Server};

const LIMIT: Duration = Duration::from_secs(10);

/// Echoes every connection's bytes; closes its side after the client's end of stream.
async fn echo_server() -> (SocketAddr, Server) {
    let listener = TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind echo server");
    let addr = listener.local_addr().expect("echo server address");
    let task = tokio::spawn(async move {
        let mut connections = tokio::task::JoinSet::new();
        while let Ok((stream, _)) = listener.accept().await {
            connections.spawn(async move {
                let (mut r, mut w) = stream.into_split();
                if tokio::io::copy(&mut r, &mut w).await.is_ok() {
                    let _ = w.shutdown().await;
                }
            });
        }
    });
    (addr, Server(task))
}

async fn relay(
    echo: SocketAddr,
    params: LinkParams,
    mode: OutageMode,
) -> pgcourier_netem::RelayHandle {
    TcpRelay::start(
        "127.0.0.1:0".parse().expect("address"),
        echo,
        Link::symmetric(params, 1),
        mode,
    )
    .await
    .expect("start relay")
}

async fn connect(addr: SocketAddr) -> TcpStream {
    within(LIMIT, "connect to the relay", TcpStream::connect(addr))
        .await
        .expect("connect")
}

/// Write `msg` and read the same number of bytes back.
async fn echo_once(stream: &mut TcpStream, msg: &[u8]) -> Vec<u8> {
    stream.write_all(msg).await.expect("write");
    let mut back = vec![0u8; msg.len()];
    within(LIMIT, "the echo", stream.read_exact(&mut back))
        .await
        .expect("read echo");
    back
}

/// Whether the relay has ended this connection: reset, or end of stream.
async fn is_closed(stream: &mut TcpStream) -> bool {
    let mut buf = [0u8; 16];
    matches!(stream.read(&mut buf).await, Ok(0) | Err(_))
}

#[tokio::test]
async fn tcp_relay_forwards_a_byte_stream_intact_with_delay_and_rate_limit() {
    let (echo, _server) = echo_server().await;
    let params = LinkParams {
        delay: Duration::from_millis(20),
        jitter: Duration::from_millis(2),
        rate_bps: Some(4_000_000),
        queue_bytes: 32 * 1024,
        // Ignored for TCP: must not damage the stream.
        loss: 0.2,
        corrupt: 0.2,
        duplicate: 0.2,
        reorder: 0.2,
        ..LinkParams::default()
    };
    let relay = relay(echo, params, OutageMode::Stall).await;
    let data: Vec<u8> = {
        let mut rng = rand::rngs::StdRng::seed_from_u64(7);
        (0..256 * 1024).map(|_| rng.gen()).collect()
    };
    let started = Instant::now();
    let stream = connect(relay.local_addr()).await;
    let (mut r, mut w) = stream.into_split();
    let to_write = data.clone();
    let writer = async move {
        w.write_all(&to_write).await.expect("write stream");
        w.shutdown().await.expect("end the stream");
    };
    let mut back = Vec::new();
    let reader = r.read_to_end(&mut back);
    let (_, read) = within(LIMIT, "the whole stream echoed and closed", async {
        tokio::join!(writer, reader)
    })
    .await;
    read.expect("read echoed stream");
    let elapsed = started.elapsed();
    assert!(
        back == data,
        "stream damaged: {} bytes back of {}",
        back.len(),
        data.len()
    );
    // 256 KiB at 4 Mbit/s takes 524 ms to serialize, plus 40 ms of delay both ways.
    assert!(
        elapsed >= Duration::from_millis(560),
        "the rate limit was not applied: {elapsed:?}"
    );
    let stats = relay.stats();
    assert_eq!(stats.forward.bytes_forwarded, data.len() as u64);
    assert_eq!(stats.back.bytes_forwarded, data.len() as u64);
    assert_eq!(
        stats.forward.dropped.total() + stats.back.dropped.total(),
        0
    );
    assert!(
        stats.forward.queue_delay_max <= Duration::from_micros(32 * 1024 * 8 / 4),
        "queue delay bounded by queue/rate"
    );
    relay.shutdown().await;
}

#[tokio::test]
async fn cut_mode_resets_connections_on_outage_and_refuses_new_ones_while_down() {
    let (echo, _server) = echo_server().await;
    let relay = relay(echo, LinkParams::default(), OutageMode::Cut).await;
    let mut first = connect(relay.local_addr()).await;
    assert_eq!(echo_once(&mut first, b"hello").await, b"hello");

    relay.set_down(true);
    assert!(
        within(
            LIMIT,
            "the cut of the open connection",
            is_closed(&mut first)
        )
        .await
    );
    wait_for(LIMIT, "the cut to be counted", || {
        relay.stats().relay.connections_cut == 1
    })
    .await;

    let mut refused = connect(relay.local_addr()).await;
    assert!(
        within(
            LIMIT,
            "the refusal of a new connection",
            is_closed(&mut refused)
        )
        .await
    );
    assert_eq!(relay.stats().relay.connections_refused, 1);

    relay.set_down(false);
    let mut after = connect(relay.local_addr()).await;
    assert_eq!(echo_once(&mut after, b"again").await, b"again");
}

#[tokio::test]
async fn stall_mode_holds_data_during_an_outage_and_delivers_it_after() {
    let (echo, _server) = echo_server().await;
    let relay = relay(echo, LinkParams::default(), OutageMode::Stall).await;
    let mut stream = connect(relay.local_addr()).await;
    assert_eq!(echo_once(&mut stream, b"before").await, b"before");

    relay.set_down(true);
    stream
        .write_all(b"held")
        .await
        .expect("write during the outage");
    let mut back = [0u8; 4];
    // Absence can only be shown over a window: nothing may come back in 300 ms.
    let early =
        tokio::time::timeout(Duration::from_millis(300), stream.read_exact(&mut back)).await;
    assert!(early.is_err(), "data crossed a stalled link: {early:?}");

    relay.set_down(false);
    within(
        LIMIT,
        "the held data after the outage",
        stream.read_exact(&mut back),
    )
    .await
    .expect("read");
    assert_eq!(&back, b"held");
    assert_eq!(relay.stats().relay.connections_cut, 0);
}

#[tokio::test]
async fn cut_mode_follows_the_outage_schedule() {
    let (echo, _server) = echo_server().await;
    let schedule = OutageSchedule {
        every: Duration::from_secs(30),
        down_for: Duration::from_secs(1),
        offset: Duration::from_secs(1),
    };
    let relay = relay(
        echo,
        LinkParams {
            outage: Some(schedule),
            ..LinkParams::default()
        },
        OutageMode::Cut,
    )
    .await;
    let started = Instant::now();
    let mut stream = connect(relay.local_addr()).await;
    assert_eq!(echo_once(&mut stream, b"up").await, b"up");
    assert!(
        started.elapsed() < Duration::from_secs(1),
        "the echo took past the outage's start; the test cannot tell"
    );

    // Down from 1 s to 2 s after the relay started.
    assert!(within(LIMIT, "the scheduled cut", is_closed(&mut stream)).await);
    assert!(
        started.elapsed() >= Duration::from_millis(900),
        "cut before the outage: {:?}",
        started.elapsed()
    );
    assert_eq!(relay.stats().relay.connections_cut, 1);

    wait_for(LIMIT, "the end of the scheduled outage", || {
        !relay.stats().down
    })
    .await;
    let mut after = connect(relay.local_addr()).await;
    assert_eq!(echo_once(&mut after, b"again").await, b"again");
}
