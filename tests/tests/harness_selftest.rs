//! Tests that prove the test harness itself works.

use std::time::Duration;

use anyhow::Context as _;
use pgcourier_tests::{
    assert_tables_equal, bin_path, table_rows, try_table_rows, wait_tables_equal, wait_until,
    workdir, Daemon, PgCluster,
};

async fn show(client: &tokio_postgres::Client, setting: &str) -> String {
    client
        .query_one(&format!("SHOW {setting}"), &[])
        .await
        .unwrap_or_else(|e| panic!("SHOW {setting}: {e}"))
        .get(0)
}

#[tokio::test(flavor = "multi_thread")]
async fn two_clusters_start_in_parallel_with_logical_wal_level_and_distinct_ports() {
    let a = tokio::task::spawn_blocking(|| PgCluster::start("par-a"));
    let b = tokio::task::spawn_blocking(|| PgCluster::start("par-b"));
    let a = a.await.unwrap().expect("cluster a starts");
    let b = b.await.unwrap().expect("cluster b starts");
    assert_ne!(a.port(), b.port(), "clusters must get distinct ports");
    assert_ne!(a.socket_dir(), b.socket_dir());
    assert!(
        a.socket_dir().as_os_str().len() < 60,
        "socket dir should be short: {}",
        a.socket_dir().display()
    );

    for cluster in [&a, &b] {
        let c = cluster.client("postgres").await.expect("connect");
        assert_eq!(show(&c, "wal_level").await, "logical");
        assert_eq!(show(&c, "max_replication_slots").await, "16");
        assert_eq!(show(&c, "max_wal_senders").await, "16");
        assert_eq!(show(&c, "listen_addresses").await, "");
        assert_eq!(show(&c, "fsync").await, "off");
        assert_eq!(show(&c, "port").await, cluster.port().to_string());
        assert_eq!(show(&c, "server_encoding").await, "UTF8");
        let version: i32 = show(&c, "server_version_num").await.parse().unwrap();
        assert_eq!(version / 10000, 15, "PostgreSQL 15 expected, got {version}");
        assert!(cluster
            .conninfo("postgres")
            .contains(&format!("port={}", cluster.port())));
    }

    // The two servers are really separate.
    a.execute("postgres", "CREATE TABLE only_in_a (x int)")
        .await
        .unwrap();
    let cb = b.client("postgres").await.unwrap();
    assert!(try_table_rows(&cb, "only_in_a").await.is_err());
    assert!(a
        .log_tail(50)
        .contains("database system is ready to accept connections"));
}

#[tokio::test(flavor = "multi_thread")]
async fn a_cluster_restarts_and_the_client_reconnects() {
    let pg = PgCluster::start("restart").expect("cluster starts");
    pg.create_database("app").await.unwrap();
    let c = pg.client("app").await.unwrap();
    c.batch_execute("CREATE TABLE t (id int PRIMARY KEY, v text); INSERT INTO t VALUES (1, 'one')")
        .await
        .unwrap();

    pg.restart().expect("restart");
    assert!(
        c.simple_query("SELECT 1").await.is_err(),
        "old connection is gone"
    );
    let c = pg.client("app").await.expect("reconnect after restart");
    c.execute("INSERT INTO t VALUES (2, 'two')", &[])
        .await
        .unwrap();

    // A crash (immediate stop) and start again keeps committed data.
    pg.kill().expect("immediate stop");
    assert!(!pg.is_running());
    assert!(
        pg.client("app").await.is_err(),
        "nothing listens while stopped"
    );
    pg.start_again().expect("start after crash");
    assert!(pg.is_running());
    let c = pg.client("app").await.unwrap();
    assert_eq!(table_rows(&c, "t").await, vec!["(1,one)", "(2,two)"]);

    // stop / start_again, waiting for the new client with wait_until.
    pg.stop().expect("fast stop");
    pg.start_again().unwrap();
    wait_until(
        "a connection after start_again",
        Duration::from_secs(30),
        || async { pg.client("app").await.map(|_| true) },
    )
    .await
    .unwrap();
}

#[tokio::test(flavor = "multi_thread")]
async fn a_pgoutput_slot_returns_changes_after_an_insert_into_a_published_table() {
    let pg = PgCluster::start("slot").expect("cluster starts");
    let c = pg.client("postgres").await.unwrap();
    c.batch_execute(
        "CREATE TABLE items (id int PRIMARY KEY, name text);
         CREATE PUBLICATION p FOR TABLE items;",
    )
    .await
    .unwrap();
    c.query_one(
        "SELECT pg_create_logical_replication_slot('s', 'pgoutput')",
        &[],
    )
    .await
    .unwrap();
    c.execute("INSERT INTO items VALUES (1, 'apple')", &[])
        .await
        .unwrap();

    let rows = c
        .query(
            "SELECT data FROM pg_logical_slot_peek_binary_changes('s', NULL, NULL, \
             'proto_version', '1', 'publication_names', 'p')",
            &[],
        )
        .await
        .expect("peek changes");
    let kinds: Vec<char> = rows
        .iter()
        .map(|r| r.get::<_, Vec<u8>>(0)[0] as char)
        .collect();
    // Begin, Relation, Insert, Commit.
    assert_eq!(kinds, vec!['B', 'R', 'I', 'C'], "pgoutput messages");
    let insert: Vec<u8> = rows[2].get(0);
    assert!(
        insert.windows(5).any(|w| w == b"apple"),
        "insert carries the row"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn assert_tables_equal_fails_on_a_difference_and_passes_on_equal_tables() {
    let pg = PgCluster::start("equal").expect("cluster starts");
    pg.create_database("src").await.unwrap();
    pg.create_database("dst").await.unwrap();
    let src = pg.client("src").await.unwrap();
    let dst = pg.client("dst").await.unwrap();
    let schema = "CREATE TABLE a (id int PRIMARY KEY, v text, n numeric);
                  CREATE TABLE \"B b\" (k text PRIMARY KEY, j jsonb);";
    src.batch_execute(schema).await.unwrap();
    dst.batch_execute(schema).await.unwrap();
    let data = "INSERT INTO a SELECT g, 'v' || g, g / 3.0 FROM generate_series(1, 20) g;
                INSERT INTO \"B b\" VALUES ('x', '{\"a\": [1, 2]}'), ('y', NULL);";
    src.batch_execute(data).await.unwrap();
    dst.batch_execute(data).await.unwrap();
    let tables = ["a", "public.\"B b\""];

    assert_tables_equal(&src, &dst, &tables)
        .await
        .expect("equal tables pass");
    wait_tables_equal(&src, &dst, &tables, Duration::from_secs(5))
        .await
        .unwrap();

    // A different value in one column.
    dst.execute("UPDATE a SET n = n + 1 WHERE id = 7", &[])
        .await
        .unwrap();
    let err = assert_tables_equal(&src, &dst, &tables)
        .await
        .expect_err("a difference fails");
    let msg = format!("{err:#}");
    assert!(msg.contains("table a differs"), "{msg}");
    assert!(
        msg.contains("source has 20 rows, destination has 20 rows"),
        "{msg}"
    );
    assert!(msg.contains("(7,v7,"), "differing row shown: {msg}");
    assert!(!msg.contains("B b"), "equal table not reported: {msg}");
    dst.execute("UPDATE a SET n = n - 1 WHERE id = 7", &[])
        .await
        .unwrap();
    assert_tables_equal(&src, &dst, &tables).await.unwrap();

    // A missing row and an extra row.
    dst.batch_execute("DELETE FROM \"B b\" WHERE k = 'y'; INSERT INTO a VALUES (99, 'extra', 0)")
        .await
        .unwrap();
    let msg = format!(
        "{:#}",
        assert_tables_equal(&src, &dst, &tables).await.unwrap_err()
    );
    assert!(
        msg.contains("source has 20 rows, destination has 21 rows"),
        "{msg}"
    );
    assert!(
        msg.contains("only in destination: 1 rows\n    (99,extra,0)"),
        "{msg}"
    );
    assert!(
        msg.contains("table public.\"B b\" differs: source has 2 rows, destination has 1 rows"),
        "{msg}"
    );
    assert!(msg.contains("only in source: 1 rows\n    (y,)"), "{msg}");

    // A table missing on one side is an error too.
    src.batch_execute("CREATE TABLE only_src (x int)")
        .await
        .unwrap();
    assert!(assert_tables_equal(&src, &dst, &["only_src"])
        .await
        .is_err());

    // wait_tables_equal reports the last difference on timeout.
    let msg = format!(
        "{:#}",
        wait_tables_equal(&src, &dst, &tables, Duration::from_millis(400))
            .await
            .unwrap_err()
    );
    assert!(
        msg.contains("waiting for tables a, public.\"B b\" to be equal"),
        "{msg}"
    );
    assert!(msg.contains("(99,extra,0)"), "{msg}");
}

#[tokio::test(flavor = "multi_thread")]
async fn wait_until_names_what_it_awaited_and_the_last_error_on_timeout() {
    let mut calls = 0;
    let err = wait_until("the moon to turn blue", Duration::from_millis(500), || {
        calls += 1;
        let n = calls;
        async move {
            if n % 2 == 0 {
                anyhow::bail!("attempt {n} failed")
            }
            Ok(false)
        }
    })
    .await
    .unwrap_err();
    let msg = format!("{err:#}");
    assert!(msg.contains("waiting for the moon to turn blue"), "{msg}");
    assert!(msg.contains("failed"), "last error included: {msg}");
    assert!(
        (3..=8).contains(&calls),
        "polls every 100-200 ms, got {calls} calls in 500 ms"
    );

    let err = wait_until("never", Duration::from_millis(200), || async { Ok(false) })
        .await
        .unwrap_err();
    assert!(
        format!("{err:#}").contains("condition stayed false"),
        "{err:#}"
    );

    // A check that hangs is cut off at the deadline.
    let started = std::time::Instant::now();
    let err = wait_until("a hanging check", Duration::from_millis(300), || async {
        std::future::pending::<anyhow::Result<bool>>().await
    })
    .await
    .unwrap_err();
    assert!(started.elapsed() < Duration::from_secs(5));
    assert!(format!("{err:#}").contains("a hanging check"));

    let mut n = 0;
    wait_until("the third poll", Duration::from_secs(5), || {
        n += 1;
        let n = n;
        async move { Ok(n >= 3) }
    })
    .await
    .unwrap();
}

#[tokio::test(flavor = "multi_thread")]
async fn a_daemon_logs_to_its_file_and_stops_on_terminate_or_kill9() {
    use std::os::unix::process::ExitStatusExt as _;
    let dir = workdir("daemon");
    assert!(dir.path().starts_with("/tmp"));
    let log = dir.path().join("d.log");
    let script = "echo started RUST_LOG=$RUST_LOG; echo to-stderr >&2; \
                  trap 'echo got TERM; exit 0' TERM; while :; do sleep 0.05; done";
    let d = Daemon::spawn("sh", "/bin/sh".as_ref(), &["-c", script], &log).unwrap();
    wait_until("the daemon to log", Duration::from_secs(10), || async {
        Ok(d.log().lines().any(|l| l == "to-stderr"))
    })
    .await
    .unwrap();
    assert!(d.is_running());
    let expected_log = format!(
        "started RUST_LOG={}",
        std::env::var("RUST_LOG").unwrap_or_else(|_| "info".into())
    );
    assert!(d.log().contains(&expected_log), "{}", d.log());
    let status = d.terminate().unwrap();
    assert!(status.success(), "SIGTERM handled: {status:?}\n{}", d.log());
    assert!(!d.is_running());
    assert!(d.log().lines().any(|l| l == "got TERM"), "{}", d.log());

    // Same command again, appending to the log; then SIGKILL.
    d.respawn().unwrap();
    wait_until(
        "the respawned daemon to log",
        Duration::from_secs(10),
        || async { Ok(d.log().lines().filter(|l| *l == "to-stderr").count() == 2) },
    )
    .await
    .unwrap();
    let status = d.kill9().unwrap();
    assert_eq!(status.signal(), Some(9));
    assert!(!d.is_running());

    // A process ignoring SIGTERM is killed after the grace period.
    let stubborn = Daemon::spawn(
        "stubborn",
        "/bin/sh".as_ref(),
        &[
            "-c",
            "trap '' TERM; echo ready; while :; do sleep 0.05; done",
        ],
        &dir.path().join("s.log"),
    )
    .unwrap();
    wait_until("stubborn to start", Duration::from_secs(10), || async {
        Ok(stubborn.log().lines().any(|l| l == "ready"))
    })
    .await
    .unwrap();
    let status =
        tokio::task::block_in_place(|| stubborn.terminate_with_grace(Duration::from_millis(500)))
            .unwrap();
    assert_eq!(status.signal(), Some(9), "{}", stubborn.log());
    assert!(stubborn.log().contains("sending SIGKILL"));
}

#[tokio::test(flavor = "multi_thread")]
async fn the_daemon_binaries_are_found_next_to_the_test_executable() {
    for name in ["pgcourier-sender", "pgcourier-receiver"] {
        let path = tokio::task::spawn_blocking(move || bin_path(name))
            .await
            .unwrap();
        assert!(path.is_file(), "{}", path.display());
        let out = std::process::Command::new(&path)
            .arg("--help")
            .output()
            .with_context(|| format!("running {}", path.display()))
            .unwrap();
        assert!(out.status.success(), "{name} --help: {out:?}");
    }
}
