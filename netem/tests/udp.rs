use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use pgcourier_netem::{ControlPort, Link, LinkControl, LinkParams, UdpRelay};
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader, Lines};
use tokio::net::tcp::{OwnedReadHalf, OwnedWriteHalf};
use tokio::net::{TcpStream, UdpSocket};

use crate::{wait_for, within, Server};

const LIMIT: Duration = Duration::from_secs(5);

async fn echo_server() -> (SocketAddr, Server) {
    let socket = Arc::new(
        UdpSocket::bind("127.0.0.1:0")
            .await
            .expect("bind echo server"),
    );
    let addr = socket.local_addr().expect("echo server address");
    let task = tokio::spawn(async move {
        let mut buf = vec![0u8; 65_535];
        while let Ok((n, from)) = socket.recv_from(&mut buf).await {
            let _ = socket.send_to(&buf[..n], from).await;
        }
    });
    (addr, Server(task))
}

async fn client(relay: SocketAddr) -> UdpSocket {
    let socket = UdpSocket::bind("127.0.0.1:0").await.expect("bind client");
    socket
        .connect(relay)
        .await
        .expect("connect client to relay");
    socket
}

async fn recv(socket: &UdpSocket, what: &str) -> Vec<u8> {
    let mut buf = vec![0u8; 65_535];
    let n = within(LIMIT, what, socket.recv(&mut buf))
        .await
        .expect("receive datagram");
    buf.truncate(n);
    buf
}

#[tokio::test]
async fn udp_echo_behind_a_50ms_link_has_an_rtt_of_at_least_100ms() {
    let (echo, _server) = echo_server().await;
    let link = Link::symmetric(
        LinkParams {
            delay: Duration::from_millis(50),
            ..LinkParams::default()
        },
        1,
    );
    let relay = UdpRelay::start("127.0.0.1:0".parse().expect("address"), echo, link)
        .await
        .expect("start relay");
    let socket = client(relay.local_addr()).await;
    for i in 0..5u8 {
        let sent = Instant::now();
        socket.send(&[i; 100]).await.expect("send ping");
        let reply = recv(&socket, "the echo through the relay").await;
        let rtt = sent.elapsed();
        assert_eq!(reply, vec![i; 100]);
        assert!(
            rtt >= Duration::from_millis(100),
            "ping {i}: RTT {rtt:?} below 2 x 50 ms"
        );
    }
    let stats = relay.stats();
    assert_eq!(
        (
            stats.forward.packets_forwarded,
            stats.back.packets_forwarded
        ),
        (5, 5)
    );
    assert_eq!(stats.relay.flows, 1);
    relay.shutdown().await;
}

#[tokio::test]
async fn commanded_outage_drops_datagrams_and_up_restores_them() {
    let (echo, _server) = echo_server().await;
    let relay = UdpRelay::start(
        "127.0.0.1:0".parse().expect("address"),
        echo,
        Link::symmetric(LinkParams::default(), 1),
    )
    .await
    .expect("start relay");
    let port = ControlPort::start("127.0.0.1:0".parse().expect("address"), relay.control())
        .await
        .expect("start control port");
    let stream = within(
        LIMIT,
        "connect to the control port",
        TcpStream::connect(port.local_addr()),
    )
    .await
    .expect("connect");
    let (read, mut write) = stream.into_split();
    let mut lines = BufReader::new(read).lines();
    let socket = client(relay.local_addr()).await;
    socket.send(b"before").await.expect("send");
    assert_eq!(recv(&socket, "echo before the outage").await, b"before");

    assert_eq!(ask(&mut write, &mut lines, "down").await, "ok down");
    for _ in 0..10 {
        socket.send(b"lost").await.expect("send");
    }
    wait_for(LIMIT, "10 outage drops", || {
        relay.stats().forward.dropped.outage == 10
    })
    .await;

    assert_eq!(ask(&mut write, &mut lines, "up").await, "ok up");
    socket.send(b"after").await.expect("send");
    // No reordering on this link: had any "lost" datagram got through, it would come first.
    assert_eq!(recv(&socket, "echo after the outage").await, b"after");
    let stats = relay.stats();
    assert_eq!(stats.forward.packets_forwarded, 2);
    assert!(!stats.down);
}

#[tokio::test]
async fn relays_sharing_a_control_share_one_bottleneck() {
    let (echo_a, _server_a) = echo_server().await;
    let (echo_b, _server_b) = echo_server().await;
    // 80 kbit/s: a 1000-byte datagram takes 100 ms to cross.
    let link = Link::symmetric(
        LinkParams {
            rate_bps: Some(80_000),
            ..LinkParams::default()
        },
        1,
    );
    let control = LinkControl::new(&link).expect("link parameters");
    let any: SocketAddr = "127.0.0.1:0".parse().expect("address");
    let a = UdpRelay::start_sharing(any, echo_a, control.clone())
        .await
        .expect("start relay a");
    let b = UdpRelay::start_sharing(any, echo_b, control)
        .await
        .expect("start relay b");
    let (ca, cb) = (client(a.local_addr()).await, client(b.local_addr()).await);
    let sent = Instant::now();
    ca.send(&[1; 1000]).await.expect("send through a");
    cb.send(&[2; 1000]).await.expect("send through b");
    assert_eq!(recv(&cb, "b's echo").await, vec![2; 1000]);
    // b's datagram queued behind a's: two serialisations each way.
    let rtt = sent.elapsed();
    assert!(
        rtt >= Duration::from_millis(300),
        "b's datagram crossed in {rtt:?}, as if a's were not in the same queue"
    );
    assert_eq!(recv(&ca, "a's echo").await, vec![1; 1000]);
    assert_eq!(b.stats().forward.packets_forwarded, 2);
    a.set_down(true);
    cb.send(b"lost").await.expect("send through b");
    wait_for(LIMIT, "b's datagram dropped by a's outage", || {
        b.stats().forward.dropped.outage == 1
    })
    .await;
}

#[tokio::test]
async fn each_client_gets_its_own_flow_and_its_own_replies() {
    let (echo, _server) = echo_server().await;
    let relay = UdpRelay::start(
        "127.0.0.1:0".parse().expect("address"),
        echo,
        Link::symmetric(LinkParams::default(), 1),
    )
    .await
    .expect("start relay");
    let a = client(relay.local_addr()).await;
    let b = client(relay.local_addr()).await;
    a.send(b"from a").await.expect("send");
    b.send(b"from b").await.expect("send");
    assert_eq!(recv(&a, "a's echo").await, b"from a");
    assert_eq!(recv(&b, "b's echo").await, b"from b");
    assert_eq!(relay.stats().relay.flows, 2);
}

#[tokio::test]
async fn datagrams_over_the_mtu_are_dropped_and_the_rest_pass() {
    let (echo, _server) = echo_server().await;
    let link = Link::symmetric(
        LinkParams {
            mtu: Some(1200),
            ..LinkParams::default()
        },
        1,
    );
    let relay = UdpRelay::start("127.0.0.1:0".parse().expect("address"), echo, link)
        .await
        .expect("start relay");
    let socket = client(relay.local_addr()).await;
    socket.send(&[1; 1201]).await.expect("send");
    socket.send(&[2; 1200]).await.expect("send");
    assert_eq!(recv(&socket, "the datagram that fits").await, vec![2; 1200]);
    assert_eq!(relay.stats().forward.dropped.too_big, 1);
}

async fn ask(
    write: &mut OwnedWriteHalf,
    lines: &mut Lines<BufReader<OwnedReadHalf>>,
    command: &str,
) -> String {
    write
        .write_all(format!("{command}\n").as_bytes())
        .await
        .expect("send command");
    within(LIMIT, "a control reply", lines.next_line())
        .await
        .expect("read reply")
        .expect("a reply line")
}

#[tokio::test]
async fn control_port_commands_down_up_and_stats() {
    let (echo, _server) = echo_server().await;
    let relay = UdpRelay::start(
        "127.0.0.1:0".parse().expect("address"),
        echo,
        Link::symmetric(LinkParams::default(), 1),
    )
    .await
    .expect("start relay");
    let port = ControlPort::start("127.0.0.1:0".parse().expect("address"), relay.control())
        .await
        .expect("start control port");
    let stream = within(
        LIMIT,
        "connect to the control port",
        TcpStream::connect(port.local_addr()),
    )
    .await
    .expect("connect");
    let (read, mut write) = stream.into_split();
    let mut lines = BufReader::new(read).lines();
    assert_eq!(ask(&mut write, &mut lines, "down").await, "ok down");
    assert!(relay.stats().down);
    let stats: serde_json::Value =
        serde_json::from_str(&ask(&mut write, &mut lines, "stats").await).expect("stats are JSON");
    assert_eq!(stats["down"], true);
    assert_eq!(stats["forward"]["dropped"]["outage"], 0);
    assert_eq!(ask(&mut write, &mut lines, "up").await, "ok up");
    assert!(!relay.stats().down);
    assert!(ask(&mut write, &mut lines, "launch")
        .await
        .starts_with("error:"));
    port.shutdown().await;
}
