//! Capture's trust fixes (issue 12): what capture spools must be exactly
//! what the source committed, once, whatever happens to the source
//! connection, the spool's history or the publication.
//!
//! - A source connection cut while a peek's rows flow (netem's TCP relay,
//!   rate-limited, in front of the source) leaves no stale tail that a
//!   retry would spool again (item 1).
//! - A slot that has confirmed more than the spool holds (a spool restored
//!   from a backup, a new spool-dir on an old slot) stops capture with a
//!   named error (item 2).
//! - A table that leaves the publication and comes back is copied again
//!   (item 4).
//! - A full spool and a receiver that needs a copy do not deadlock (item 7).

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use anyhow::Context;
use pgcourier_netem::{Link, LinkParams, OutageMode, RelayHandle, TcpRelay};
use pgcourier_tests::{wait_until, PgCluster};
use tokio::net::{TcpListener, UnixStream};

use crate::fixture::{wait_count, Options, Setup};

const WAIT: Duration = Duration::from_secs(180);

/// A TCP listener on loopback that passes each connection on to a cluster's
/// Unix socket (the test clusters listen on nothing else). Its tasks end
/// when it is dropped.
struct UnixBridge {
    port: u16,
    task: tokio::task::JoinHandle<()>,
}

impl UnixBridge {
    async fn start(pg: &PgCluster) -> anyhow::Result<UnixBridge> {
        let socket: PathBuf = pg.socket_dir().join(format!(".s.PGSQL.{}", pg.port()));
        let listener = TcpListener::bind("127.0.0.1:0").await?;
        let port = listener.local_addr()?.port();
        let task = tokio::spawn(async move {
            // Dropped (and so aborted) with the accept task.
            let mut conns = tokio::task::JoinSet::new();
            while let Ok((mut tcp, _)) = listener.accept().await {
                let socket = socket.clone();
                conns.spawn(async move {
                    let Ok(mut unix) = UnixStream::connect(&socket).await else {
                        return;
                    };
                    let _ = tcp.set_nodelay(true);
                    let _ = tokio::io::copy_bidirectional(&mut tcp, &mut unix).await;
                });
                while conns.try_join_next().is_some() {}
            }
        });
        Ok(UnixBridge { port, task })
    }
}

impl Drop for UnixBridge {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// sender.toml with its `source` pointing at `127.0.0.1:port`.
fn point_source_at(config: &Path, port: u16) -> anyhow::Result<()> {
    let text = std::fs::read_to_string(config)?;
    let mut out = String::new();
    for line in text.lines() {
        if line.starts_with("source = ") {
            out.push_str(&format!(
                "source = \"host=127.0.0.1 port={port} user=postgres dbname=postgres\"\n"
            ));
        } else {
            out.push_str(line);
            out.push('\n');
        }
    }
    std::fs::write(config, out)?;
    Ok(())
}

fn back_bytes(relay: &RelayHandle) -> u64 {
    relay.stats().back.bytes_forwarded
}

/// Item 1. The sender reaches its source through a TCP relay at 4 Mbit/s,
/// so the rows of a peek of a large backlog take seconds to arrive; the
/// relay is cut three times while they flow. Each retry must spool the
/// peek's transactions once: the keyless (REPLICA IDENTITY FULL) table at
/// the branch ends with exactly the source's rows, no duplicates.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn source_connection_cut_mid_peek_spools_each_transaction_once() -> anyhow::Result<()> {
    let mut setup = Setup::start(
        "trust-cut-peek",
        Options {
            schema: "CREATE TABLE nokey (a integer, b text);
                     ALTER TABLE nokey REPLICA IDENTITY FULL;
                     CREATE TABLE mark (id integer PRIMARY KEY);",
            tables: &["public.nokey", "public.mark"],
            ..Options::default()
        },
    )
    .await?;
    setup.sender.terminate()?;
    // The backlog: 60,000 rows in 10,000 transactions of 6.
    let src = setup.source().await?;
    for batch in 0..20 {
        let mut sql = String::new();
        for t in 0..500 {
            let first = (batch * 500 + t) * 6 + 1;
            sql.push_str(&format!(
                "BEGIN; INSERT INTO nokey SELECT g, 'row ' || g || ' of the backlog, padded' \
                 FROM generate_series({first}, {}) g; COMMIT;\n",
                first + 5
            ));
        }
        src.batch_execute(&sql).await?;
    }
    let bridge = UnixBridge::start(&setup.hq).await?;
    let relay = TcpRelay::start(
        "127.0.0.1:0".parse()?,
        format!("127.0.0.1:{}", bridge.port).parse()?,
        Link {
            forward: LinkParams::default(),
            back: LinkParams {
                rate_bps: Some(4_000_000),
                ..LinkParams::default()
            },
            seed: 12,
        },
        OutageMode::Cut,
    )
    .await?;
    point_source_at(&setup.sender_config, relay.local_addr().port())?;
    setup.restart_sender()?;
    // Cut the relay each time a peek's rows have been flowing for a while
    // (400 kB: about 0.8 s at 4 Mbit/s, some 5,000 rows).
    let mut cuts = 0;
    let mut from = back_bytes(&relay);
    let deadline = Instant::now() + WAIT;
    while cuts < 3 {
        anyhow::ensure!(
            Instant::now() < deadline,
            "the peek's rows never flowed ({cuts} cuts):\n{}",
            setup.logs()
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
        if back_bytes(&relay) - from >= 400_000 {
            relay.set_down(true);
            tokio::time::sleep(Duration::from_millis(300)).await;
            relay.set_down(false);
            cuts += 1;
            from = back_bytes(&relay);
        }
    }
    anyhow::ensure!(
        setup.sender.log().contains("capture"),
        "the sender logged nothing about capture"
    );
    // Everything committed before the marker is applied once it is there.
    src.batch_execute("INSERT INTO mark VALUES (1)").await?;
    let dst = setup.target(0).await?;
    wait_count(&dst, "SELECT count(*) FROM mark", 1, WAIT)
        .await
        .with_context(|| setup.logs())?;
    let (s, d): (i64, i64) = (
        src.query_one("SELECT count(*) FROM nokey", &[])
            .await?
            .get(0),
        dst.query_one("SELECT count(*) FROM nokey", &[])
            .await?
            .get(0),
    );
    anyhow::ensure!(
        s == d,
        "the source has {s} rows, the branch {d}: {} duplicates or losses after {cuts} cuts",
        d - s
    );
    pgcourier_tests::assert_tables_equal(&src, &dst, &["public.nokey"]).await?;
    Ok(())
}

/// Wait until the sender has exited, and return its log.
async fn sender_exits(setup: &Setup) -> anyhow::Result<String> {
    wait_until(
        "the sender to stop with an error",
        Duration::from_secs(60),
        || async { Ok(!setup.sender.is_running()) },
    )
    .await
    .with_context(|| setup.logs())?;
    Ok(setup.sender.log())
}

/// Item 2. A spool that is older than its slot (restored from a backup, or
/// a new spool-dir on a slot that captured before) lacks what the slot
/// confirmed since: capture must stop at start-up with a named error that
/// says how to re-seed, instead of carrying on from the slot.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_slot_ahead_of_its_spool_stops_capture_with_a_named_error() -> anyhow::Result<()> {
    let mut setup = Setup::start(
        "trust-slot-ahead",
        Options {
            schema: "CREATE TABLE t (id integer PRIMARY KEY);",
            ..Options::default()
        },
    )
    .await?;
    let src = setup.source().await?;
    src.batch_execute("INSERT INTO t VALUES (1)").await?;
    setup.wait_equal(0, &["public.t"], WAIT).await?;
    setup.sender.terminate()?;
    let spool = setup.dir.path().join("spool");
    let backup = setup.dir.path().join("spool-backup");
    let copied = std::process::Command::new("cp")
        .arg("-a")
        .arg(&spool)
        .arg(&backup)
        .status()?;
    anyhow::ensure!(copied.success(), "cp -a spool spool-backup failed");
    // The slot moves on past the backup.
    setup.restart_sender()?;
    src.batch_execute("INSERT INTO t SELECT g FROM generate_series(2, 100) g")
        .await?;
    setup.wait_equal(0, &["public.t"], WAIT).await?;
    setup.sender.terminate()?;

    // The spool restored from the backup.
    std::fs::remove_dir_all(&spool)?;
    std::fs::rename(&backup, &spool)?;
    setup.restart_sender()?;
    let log = sender_exits(&setup).await?;
    anyhow::ensure!(
        log.contains("is ahead of the spool") && log.contains("re-seed"),
        "no slot-ahead error in the sender's log:\n{log}"
    );

    // A new spool-dir on the same slot.
    std::fs::remove_dir_all(&spool)?;
    setup.restart_sender()?;
    let log = sender_exits(&setup).await?;
    anyhow::ensure!(
        log.contains("is ahead of the spool") && log.contains("re-seed"),
        "no slot-ahead error for a new spool-dir in the sender's log:\n{log}"
    );
    Ok(())
}

/// Item 4. A table leaves the publication, is written to while out, and
/// comes back: its rows must be copied again, so that the branch ends
/// identical (the changes made while it was out are in no stream).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_table_that_leaves_the_publication_and_returns_is_copied_again() -> anyhow::Result<()> {
    let setup = Setup::start(
        "trust-pub-return",
        Options {
            schema: "CREATE TABLE a (id integer PRIMARY KEY, v text);
                     CREATE TABLE b (id integer PRIMARY KEY, v text);",
            source_sql: "INSERT INTO b SELECT g, 'b' || g FROM generate_series(1, 100) g;",
            tables: &["public.a", "public.b"],
            ..Options::default()
        },
    )
    .await?;
    let src = setup.source().await?;
    src.batch_execute("INSERT INTO b VALUES (101, 'live')")
        .await?;
    setup.wait_equal(0, &["public.a", "public.b"], WAIT).await?;
    src.batch_execute("ALTER PUBLICATION pgcourier DROP TABLE b")
        .await?;
    // Let capture see it gone (it looks every 2 s); unfixed code never says
    // so, and the data check below is what fails.
    let _ = wait_until(
        "capture to notice that b left the publication",
        Duration::from_secs(15),
        || async { Ok(setup.sender.log().contains("left the publication")) },
    )
    .await;
    src.batch_execute(
        "INSERT INTO b VALUES (200, 'while out');
         UPDATE b SET v = 'changed while out' WHERE id <= 10;
         DELETE FROM b WHERE id BETWEEN 50 AND 59;",
    )
    .await?;
    src.batch_execute("ALTER PUBLICATION pgcourier ADD TABLE b")
        .await?;
    src.batch_execute("INSERT INTO b VALUES (300, 'back'); INSERT INTO a VALUES (1, 'a')")
        .await?;
    setup
        .wait_equal(0, &["public.a", "public.b"], Duration::from_secs(60))
        .await?;
    Ok(())
}

/// Item 7. The spool is at `spool-max-bytes` when a receiver that needs a
/// copy of its own is added: the copy must still be made (capture paused
/// before making it, and that receiver's position kept every record from
/// being trimmed: nothing moved again).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_full_spool_still_makes_the_copy_a_new_receiver_needs() -> anyhow::Result<()> {
    let mut setup = Setup::start(
        "trust-full-copy",
        Options {
            branches: 2,
            schema: "CREATE TABLE t (id integer PRIMARY KEY, v text);",
            source_sql: "INSERT INTO t SELECT g, 'initial ' || g FROM generate_series(1, 1000) g;",
            sender_extra: "spool-max-bytes = \"64KiB\"",
            ..Options::default()
        },
    )
    .await?;
    // Branch 1 leaves the configuration; the spool trims behind branch 0.
    let removed = setup.remove_branch(1)?;
    let src = setup.source().await?;
    src.batch_execute("INSERT INTO t VALUES (1001, 'trimmed')")
        .await?;
    setup.wait_equal(0, &["public.t"], WAIT).await?;
    // Branch 0 stops; the spool fills past spool-max-bytes.
    setup.branches[0].receiver.terminate()?;
    for i in 0..200 {
        src.batch_execute(&format!(
            "INSERT INTO t VALUES ({}, repeat('x', 1000))",
            2000 + i
        ))
        .await?;
    }
    let spool_dir = setup.dir.path().join("spool");
    let open =
        || pgcourier_sender::spool::Spool::open_for_inspection(&spool_dir, &["branch0".into()]);
    wait_until(
        "the sender to capture past spool-max-bytes",
        WAIT,
        || async { Ok(setup.sender.log().contains("capture is paused")) },
    )
    .await
    .with_context(|| setup.logs())?;
    setup.sender.terminate()?;
    {
        let spool = open()?;
        anyhow::ensure!(spool.marks().first_seq > 1, "the spool trimmed nothing");
        anyhow::ensure!(spool.bytes() >= 64 << 10, "the spool is not full");
    }
    // Branch 1 comes back as a receiver new to the spool, with a fresh inbox.
    setup.add_back_as(&removed, 1, "branch9")?;
    setup.restart_sender()?;
    setup.restart_receiver(0)?;
    setup.restart_receiver(1)?;
    src.batch_execute("INSERT INTO t VALUES (9999, 'last')")
        .await?;
    setup
        .wait_equal(1, &["public.t"], Duration::from_secs(90))
        .await?;
    setup
        .wait_equal(0, &["public.t"], Duration::from_secs(90))
        .await?;
    Ok(())
}
