//! Initial copy: the published tables' existing rows reach a new branch
//! consistently with the change stream, while the source keeps writing;
//! a copy cut by an outage resumes where it stopped; a table that joins the
//! publication is copied; seeds travel by file.

use std::time::Duration;

use anyhow::Context;
use pgcourier_tests::{bin_path, wait_until};
use serde_json::Value;

use crate::fixture::{Options, Setup};

const WAIT: Duration = Duration::from_secs(40);

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

fn free_tcp_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("bind a TCP port")
}

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

/// Wait for a JSON status field to satisfy `f`.
pub async fn wait_status(
    config: &std::path::Path,
    what: &str,
    f: impl Fn(&Value) -> bool,
) -> anyhow::Result<Value> {
    let mut last = Value::Null;
    wait_until(what, WAIT, || {
        let st = status(config);
        let ok = match &st {
            Ok(v) => f(v),
            Err(_) => false,
        };
        if let Ok(v) = st {
            last = v;
        }
        async move { Ok(ok) }
    })
    .await?;
    Ok(last)
}
