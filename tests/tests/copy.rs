//! Initial copy: the published tables' existing rows reach a new branch
//! consistently with the change stream, while the source keeps writing;
//! a copy cut by an outage resumes where it stopped; a table that joins the
//! publication is copied; seeds travel by file.

use std::time::Duration;

use anyhow::Context;
use pgcourier_tests::bin_path;
use serde_json::Value;

use crate::fixture::{free_tcp_port, keygen, Options, Setup};

const WAIT: Duration = Duration::from_secs(300);

pub const COPY_SCHEMA: &str = "
    CREATE TABLE items (id bigint PRIMARY KEY, qty integer NOT NULL, note text, tags text[], payload jsonb);
    CREATE TABLE shops (id integer PRIMARY KEY, name text NOT NULL);";

/// 100k items, 50 shops, and a table the branches do not have.
pub const COPY_ROWS: &str = "
    INSERT INTO items SELECT g, g % 100, 'note ' || g, ARRAY['a', 'b' || g], jsonb_build_object('g', g)
      FROM generate_series(1, 100000) g;
    INSERT INTO shops SELECT g, 'shop ' || g FROM generate_series(1, 50) g;
    CREATE TABLE \"Extra Stock\" (k text PRIMARY KEY, v numeric(10,2) NOT NULL, d date);
    INSERT INTO \"Extra Stock\" SELECT 'k' || g, g / 7.0, date '2026-01-01' + g FROM generate_series(1, 1000) g;";

pub const COPY_TABLES: &[&str] = &["public.items", "public.shops", "public.\"Extra Stock\""];

/// `pgcourier-queue --json status` for a config.
pub fn status(config: &std::path::Path) -> anyhow::Result<Value> {
    let out = std::process::Command::new(bin_path("pgcourier-queue"))
        .args([
            "--config",
            config.to_str().expect("utf-8"),
            "--json",
            "status",
        ])
        .output()
        .context("run pgcourier-queue")?;
    serde_json::from_slice(&out.stdout).with_context(|| {
        format!(
            "parse status: {}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        )
    })
}

/// Writes to the copied tables: `n` transactions of an update, an insert
/// and a delete, spread over time.
pub async fn churn(src: &tokio_postgres::Client, from: i64, n: i64) -> anyhow::Result<()> {
    for k in from..from + n {
        src.batch_execute(&format!(
            "BEGIN;
             UPDATE items SET qty = qty + 1, note = 'churn {k}' WHERE id = {};
             INSERT INTO items VALUES ({}, {k}, 'new {k}', NULL, '{{\"k\": {k}}}');
             DELETE FROM items WHERE id = {};
             UPDATE \"Extra Stock\" SET v = v + 1 WHERE k = 'k{}';
             COMMIT",
            (k * 7919) % 100_000 + 1,
            200_000 + k,
            (k * 104_729) % 100_000 + 1,
            k % 1000 + 1,
        ))
        .await?;
        if k % 50 == 0 {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn initial_copy_of_100k_rows_while_the_source_keeps_writing() -> anyhow::Result<()> {
    let admin = free_tcp_port();
    let setup = Setup::start(
        "copy-initial",
        Options {
            schema: COPY_SCHEMA,
            source_sql: COPY_ROWS,
            receiver_extra: &format!("create-tables = true\nadmin = \"127.0.0.1:{admin}\""),
            wait_for_copy: false,
            ..Options::default()
        },
    )
    .await?;
    // Writes start at once: the cut falls among them.
    let src = setup.source().await?;
    churn(&src, 1, 1500).await?;
    src.batch_execute("INSERT INTO shops VALUES (1000, 'last')")
        .await?;
    setup.wait_equal(0, COPY_TABLES, WAIT).await?;
    let st = status(&setup.branches[0].config)?;
    assert_eq!(st["missing_rows"], 0, "no change was applied twice: {st}");
    assert_eq!(st["apply_state"], "applying", "{st}");
    let sender_log = setup.sender.log();
    assert!(sender_log.contains("copy spooled"), "{}", setup.logs());
    assert_eq!(
        sender_log
            .matches("copy reader joined the snapshot")
            .count(),
        2,
        "two readers (copy-workers = 2) share the cut's snapshot:\n{}",
        setup.logs()
    );
    assert!(
        setup.branches[0]
            .receiver
            .log()
            .contains("table copy loaded"),
        "{}",
        setup.logs()
    );
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_table_that_joins_the_publication_is_copied_then_followed() -> anyhow::Result<()> {
    let setup = Setup::start(
        "copy-new-table",
        Options {
            schema: "CREATE TABLE a (id integer PRIMARY KEY, v text);
                     CREATE TABLE b (id integer PRIMARY KEY, v text);",
            source_sql: "INSERT INTO b SELECT g, 'b' || g FROM generate_series(1, 5000) g;",
            tables: &["public.a"],
            ..Options::default()
        },
    )
    .await?;
    let src = setup.source().await?;
    src.batch_execute("INSERT INTO a VALUES (1, 'one')").await?;
    setup.wait_equal(0, &["public.a"], WAIT).await?;
    let dst = setup.target(0).await?;
    let b: i64 = dst.query_one("SELECT count(*) FROM b", &[]).await?.get(0);
    assert_eq!(b, 0, "b is not published yet");
    // b joins with 5000 rows, and is written to at once.
    src.batch_execute(
        "ALTER PUBLICATION pgcourier ADD TABLE b;
         UPDATE b SET v = 'changed' WHERE id <= 10;
         DELETE FROM b WHERE id > 4990;
         INSERT INTO b VALUES (9001, 'new');",
    )
    .await?;
    for i in 0..200 {
        src.batch_execute(&format!(
            "UPDATE b SET v = 'loop {i}' WHERE id = {}; INSERT INTO a VALUES ({}, 'a')",
            i + 20,
            i + 2
        ))
        .await?;
    }
    setup.wait_equal(0, &["public.a", "public.b"], WAIT).await?;
    Ok(())
}

/// Run a pgcourier binary; returns (exit code, stdout + stderr).
fn run(bin: &str, args: &[&str]) -> anyhow::Result<(i32, String)> {
    let out = std::process::Command::new(bin_path(bin))
        .args(args)
        .output()
        .with_context(|| format!("run {bin}"))?;
    Ok((
        out.status.code().unwrap_or(-1),
        format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        ),
    ))
}

/// Rewrite a seed file with a changed header, signed by `identity` (a file
/// from elsewhere).
fn rewrite_seed(
    from: &std::path::Path,
    to: &std::path::Path,
    identity: &pgcourier_common::transport::tls::Identity,
    change: impl Fn(&mut pgcourier_common::store::seed_file::SeedHeader),
) -> anyhow::Result<()> {
    let mut r = pgcourier_common::store::seed_file::SeedReader::open_any_signer(from)?;
    let mut header = r.header.clone();
    change(&mut header);
    let _ = std::fs::remove_file(to);
    let file = std::fs::File::create(to)?;
    let mut w =
        pgcourier_common::store::seed_file::SeedWriter::create(to, file, &header, identity)?;
    while let Some(rec) = r.next_record()? {
        w.record(&rec)?;
    }
    w.finish()?;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn seed_export_import_then_live_stream_and_bad_seeds_refused() -> anyhow::Result<()> {
    let (sender_admin, receiver_admin) = (free_tcp_port(), free_tcp_port());
    let mut setup = Setup::start(
        "copy-seed",
        Options {
            schema: COPY_SCHEMA,
            source_sql: COPY_ROWS,
            sender_extra: &format!("initial-copy = false\nadmin = \"127.0.0.1:{sender_admin}\""),
            receiver_extra: &format!(
                "create-tables = true\nadmin = \"127.0.0.1:{receiver_admin}\""
            ),
            ..Options::default()
        },
    )
    .await?;
    setup.branches[0].receiver.terminate()?;
    let src = setup.source().await?;
    let dst = setup.target(0).await?;
    let items = || async {
        anyhow::Ok(
            dst.query_one("SELECT count(*) FROM items", &[])
                .await?
                .get::<_, i64>(0),
        )
    };
    let writer = {
        let src = setup.source().await?;
        tokio::spawn(async move { churn(&src, 1, 1500).await })
    };
    let seed = setup.dir.path().join("branch.seed");
    let seed_str = seed.to_str().expect("utf-8");
    let sender_cfg = setup.sender_config.to_str().expect("utf-8").to_owned();
    let branch_cfg = setup.branches[0].config.to_str().expect("utf-8").to_owned();
    // Export while the sender runs and the source is written to.
    let (code, out) = run(
        "pgcourier-sender",
        &["seed", "export", "--config", &sender_cfg, "--out", seed_str],
    )?;
    assert_eq!(code, 0, "seed export: {out}\n{}", setup.logs());
    assert!(
        out.contains("live shipping continues after record"),
        "{out}"
    );
    // A second export to the same file is refused before any work.
    let (code, out) = run(
        "pgcourier-sender",
        &["seed", "export", "--config", &sender_cfg, "--out", seed_str],
    )?;
    assert_eq!(code, 1, "{out}");
    assert!(out.contains("exists"), "{out}");

    // Bad seeds on a fresh branch: nothing applied.
    let good = std::fs::read(&seed)?;
    let bad = setup.dir.path().join("bad.seed");
    let bad_str = bad.to_str().expect("utf-8");
    std::fs::write(&bad, &good[..good.len() / 2])?;
    let (code, out) = run(
        "pgcourier-receiver",
        &["seed", "import", "--config", &branch_cfg, bad_str],
    )?;
    assert_eq!(code, 1, "truncated seed: {out}");
    assert!(
        out.contains("truncated") || out.contains("corrupt"),
        "{out}"
    );
    let mut flipped = good.clone();
    let at = flipped.len() * 2 / 3;
    flipped[at] ^= 0x10;
    std::fs::write(&bad, &flipped)?;
    let (code, out) = run(
        "pgcourier-receiver",
        &["seed", "import", "--config", &branch_cfg, bad_str],
    )?;
    assert_eq!(code, 1, "corrupted seed: {out}");
    assert!(
        out.contains("corrupt") || out.contains("truncated"),
        "{out}"
    );
    keygen(setup.dir.path(), "other-sender");
    let other_sender = pgcourier_common::transport::tls::load_identity(
        &setup.dir.path().join("other-sender.crt"),
        &setup.dir.path().join("other-sender.key"),
    )?;
    rewrite_seed(&seed, &bad, &other_sender, |_| {})?;
    let (code, out) = run(
        "pgcourier-receiver",
        &["seed", "import", "--config", &branch_cfg, bad_str],
    )?;
    assert_eq!(code, 1, "seed from another sender: {out}");
    assert!(out.contains("does not pin"), "{out}");
    assert_eq!(items().await?, 0, "a refused seed applied nothing");

    // The good seed.
    let (code, out) = run(
        "pgcourier-receiver",
        &["seed", "import", "--config", &branch_cfg, seed_str],
    )?;
    assert_eq!(code, 0, "seed import: {out}");
    assert!(
        items().await? >= 100_000 - 1500,
        "the seed's rows are on the branch"
    );

    // Live shipping continues from the seed's position.
    setup.restart_receiver(0)?;
    writer.await??;
    churn(&src, 5000, 200).await?;
    src.batch_execute("INSERT INTO shops VALUES (1000, 'last')")
        .await?;
    setup.wait_equal(0, COPY_TABLES, WAIT).await?;
    let st = status(&setup.branches[0].config)?;
    assert_eq!(st["missing_rows"], 0, "no change applied twice: {st}");

    // Now the same seed is older than the branch, and a seed claiming another
    // source is refused: both leave the branch as it is.
    setup.branches[0].receiver.terminate()?;
    let before = items().await?;
    let (code, out) = run(
        "pgcourier-receiver",
        &["seed", "import", "--config", &branch_cfg, seed_str],
    )?;
    assert_eq!(code, 1, "older seed: {out}");
    assert!(out.contains("older"), "{out}");
    let sender = pgcourier_common::transport::tls::load_identity(
        &setup.dir.path().join("sender.crt"),
        &setup.dir.path().join("sender.key"),
    )?;
    rewrite_seed(&seed, &bad, &sender, |h| {
        h.source_id = "7123456789/postgres/pgcourier".into()
    })?;
    let (code, out) = run(
        "pgcourier-receiver",
        &["seed", "import", "--config", &branch_cfg, bad_str],
    )?;
    assert_eq!(code, 1, "seed from another source: {out}");
    assert!(out.contains("comes from source"), "{out}");
    assert_eq!(items().await?, before);
    setup.restart_receiver(0)?;
    src.batch_execute("INSERT INTO shops VALUES (1001, 'after')")
        .await?;
    setup.wait_equal(0, COPY_TABLES, WAIT).await?;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_copy_cut_by_an_outage_resumes_without_resending_what_arrived() -> anyhow::Result<()> {
    const TIMERS: &str = "idle-timeout = \"4s\"\nkeep-alive = \"1s\"";
    let (sender_admin, receiver_admin) = (free_tcp_port(), free_tcp_port());
    let link = pgcourier_netem::Profile::by_name("3g")
        .context("3g profile")?
        .link(31);
    let setup = Setup::start(
        "copy-outage",
        Options {
            schema: "CREATE TABLE blobs (id integer PRIMARY KEY, h text NOT NULL, n integer);",
            // About 10 MB of rows that compress only about 2:1 (hex digests).
            source_sql: "INSERT INTO blobs SELECT g, md5(g::text) || md5((g * 7)::text), g % 1000 \
                         FROM generate_series(1, 100000) g;",
            sender_extra: &format!(
                "{TIMERS}\nmax-in-flight = \"1MiB\"\nadmin = \"127.0.0.1:{sender_admin}\""
            ),
            receiver_extra: &format!("{TIMERS}\nadmin = \"127.0.0.1:{receiver_admin}\""),
            link: Some(link),
            wait_for_copy: false,
            ..Options::default()
        },
    )
    .await?;
    let branch = &setup.branches[0].config;
    // Cut the link once a fair part of the copy is in the inbox.
    let at_cut = loop {
        let st = status(branch)?;
        let durable = st["durable_seq"].as_u64().unwrap_or(0);
        if durable >= 60 {
            break durable;
        }
        anyhow::ensure!(
            st["applied_transactions"].as_u64().unwrap_or(0) == 0,
            "the copy finished before the outage: the test proved nothing"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    setup.relays[0].set_down(true);
    tokio::time::sleep(Duration::from_secs(7)).await;
    let dst = setup.target(0).await?;
    let partial: i64 = dst
        .query_one("SELECT count(*) FROM blobs", &[])
        .await?
        .get(0);
    assert_eq!(partial, 0, "the branch shows part of the copy");
    let held = status(branch)?["durable_seq"].as_u64().unwrap_or(0);
    assert!(
        held >= at_cut,
        "the inbox kept what arrived ({held} < {at_cut})"
    );
    setup.relays[0].set_down(false);
    let src = setup.source().await?;
    src.batch_execute("INSERT INTO blobs VALUES (0, 'after the outage', 0)")
        .await?;
    setup.wait_equal(0, &["public.blobs"], WAIT).await?;
    // Shipping resumed after what the inbox held: what crossed again is at
    // most the unacknowledged window, not the copy from its start.
    let sender = status(&setup.sender_config)?;
    let raw = sender["shipping"]["raw_bytes"].as_u64().unwrap_or(0);
    let resent = sender["shipping"]["resent_bytes"]
        .as_u64()
        .unwrap_or(u64::MAX);
    eprintln!("copy across 3g with an outage: raw {raw} bytes, resent {resent} bytes, cut at record {at_cut}, held {held}");
    assert!(raw > 8_000_000, "the copy was shipped: {sender}");
    assert!(
        resent <= 1_100_000,
        "more than the in-flight window was shipped again: {resent} bytes\n{sender}"
    );
    let log = setup.branches[0].receiver.log();
    assert!(
        log.contains(&format!("durable_seq={held}")),
        "the receiver reconnected holding record {held}:\n{}",
        setup.logs()
    );
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_receiver_added_later_gets_a_copy_made_for_it_alone() -> anyhow::Result<()> {
    let admin = free_tcp_port();
    let mut setup = Setup::start(
        "copy-new-receiver",
        Options {
            branches: 2,
            schema: &format!(
                "{COPY_SCHEMA} CREATE TABLE \"Extra Stock\" (k text PRIMARY KEY, v numeric(10,2) NOT NULL, d date);"
            ),
            source_sql: "INSERT INTO items SELECT g, g, 'n' || g, NULL, NULL FROM generate_series(1, 20000) g;
                         INSERT INTO \"Extra Stock\" SELECT 'k' || g, g, NULL FROM generate_series(1, 1000) g;",
            sender_extra: &format!("admin = \"127.0.0.1:{admin}\""),
            ..Options::default()
        },
    )
    .await?;
    // Branch 1 leaves the configuration; the spool moves on without it.
    let removed = setup.remove_branch(1)?;
    let src = setup.source().await?;
    churn(&src, 1, 300).await?;
    setup.wait_equal(0, &["public.items"], WAIT).await?;
    let st = status(&setup.sender_config)?;
    anyhow::ensure!(
        st["first_seq"].as_u64().unwrap_or(0) > 1,
        "the spool deleted nothing, so a new receiver would need no copy: {st}"
    );
    // It comes back as a new branch: a fresh inbox, a damaged table, and a
    // name the spool has never seen.
    setup.sender.terminate()?;
    setup.add_back_as(&removed, 1, "branch9")?;
    setup
        .target(1)
        .await?
        .batch_execute("DELETE FROM items WHERE id % 2 = 0")
        .await?;
    setup.restart_sender()?;
    setup.restart_receiver(1)?;
    churn(&src, 1000, 300).await?;
    src.batch_execute("INSERT INTO shops VALUES (7, 'last')")
        .await?;
    setup
        .wait_equal(1, &["public.items", "public.shops"], WAIT)
        .await?;
    setup
        .wait_equal(0, &["public.items", "public.shops"], WAIT)
        .await?;
    assert!(
        setup.sender.log().contains("new receiver branch9"),
        "{}",
        setup.logs()
    );
    // Branch 0 was shipped placeholders, not the copy: it loaded one copy
    // (the initial one) in its whole life.
    let loads = setup.branches[0]
        .receiver
        .log()
        .matches("loading a table copy")
        .count();
    assert_eq!(loads, 1, "{}", setup.logs());
    Ok(())
}
