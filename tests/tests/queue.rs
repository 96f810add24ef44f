//! `pgcourier-queue` and the admin endpoints, against running and stopped
//! daemons, and `skip` on a poisoned transaction.

use std::process::Command;
use std::time::Duration;

use anyhow::Context;
use pgcourier_tests::{bin_path, wait_until};
use serde_json::Value;

use crate::fixture::{free_tcp_port, wait_count, Dial, Options, Setup};

const WAIT: Duration = Duration::from_secs(120);

/// Run pgcourier-queue; returns (exit code, stdout).
fn queue(config: &std::path::Path, args: &[&str]) -> anyhow::Result<(i32, String)> {
    let out = Command::new(bin_path("pgcourier-queue"))
        .args(["--config", config.to_str().expect("utf-8")])
        .args(args)
        .output()
        .context("run pgcourier-queue")?;
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    let code = out.status.code().unwrap_or(-1);
    anyhow::ensure!(
        code != 1,
        "pgcourier-queue {args:?} failed: {}{stdout}",
        String::from_utf8_lossy(&out.stderr)
    );
    Ok((code, stdout))
}

fn json(config: &std::path::Path, args: &[&str]) -> anyhow::Result<Value> {
    let mut all = vec!["--json"];
    all.extend_from_slice(args);
    let (_, out) = queue(config, &all)?;
    serde_json::from_str(&out).with_context(|| format!("parse JSON of {args:?}: {out}"))
}

const SCHEMA: &str = "CREATE TABLE items (id integer PRIMARY KEY, name text UNIQUE, qty integer);";

async fn setup(name: &str, sender_admin: u16, receiver_admin: u16) -> anyhow::Result<Setup> {
    let sender_extra = format!("admin = \"127.0.0.1:{sender_admin}\"");
    let receiver_extra = format!("admin = \"127.0.0.1:{receiver_admin}\"");
    // The options borrow these strings for the duration of start().
    Setup::start(
        name,
        Options {
            branches: 1,
            dial: Dial::SenderDials,
            schema: SCHEMA,
            source_sql: "",
            tables: &[],
            sender_extra: Box::leak(sender_extra.into_boxed_str()),
            receiver_extra: Box::leak(receiver_extra.into_boxed_str()),
            link: None,
            wait_for_copy: true,
            ..Options::default()
        },
    )
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn queue_commands_work_against_running_and_stopped_daemons() -> anyhow::Result<()> {
    let (sa, ra) = (free_tcp_port(), free_tcp_port());
    let mut setup = setup("queuecli", sa, ra).await?;
    let src = setup.source().await?;
    for i in 0..30 {
        src.batch_execute(&format!("INSERT INTO items VALUES ({i}, 'item {i}', {i})"))
            .await?;
    }
    setup.wait_equal(0, &["public.items"], WAIT).await?;
    let rcfg = setup.branches[0].config.clone();
    let scfg = setup.sender_config.clone();

    // Running: through the admin endpoints.
    let st = json(&rcfg, &["status"])?;
    assert_eq!(st["running"], true);
    assert_eq!(st["apply_state"], "applying");
    assert_eq!(st["applied_seq"], st["durable_seq"]);
    assert_eq!(st["link"]["connected"], true);
    let (code, text) = queue(&rcfg, &["status"])?;
    assert_eq!(code, 0);
    assert!(text.contains("apply             applying"), "{text}");
    let st = json(&scfg, &["status"])?;
    assert_eq!(st["role"], "sender");
    assert_eq!(st["receivers"][0]["name"], "branch0");
    assert_eq!(st["receivers"][0]["records_behind"], 0);
    assert!(
        st["slot"]["retained_wal_bytes"].is_number(),
        "slot statistics missing: {st}"
    );
    // The sender's spool is trimmed once acknowledged; stop the receiver so
    // records stay, then list and show them on the running sender.
    setup.branches[0].receiver.terminate()?;
    src.batch_execute("INSERT INTO items VALUES (100, 'it''s \"quoted\"', NULL)")
        .await?;
    src.batch_execute("UPDATE items SET qty = 7 WHERE id = 1")
        .await?;
    wait_until("the sender to spool two records", WAIT, || async {
        Ok(json(&scfg, &["status"])?["receivers"][0]["records_behind"] == 2)
    })
    .await?;
    let st = json(&scfg, &["status"])?;
    assert!(
        st["receivers"][0]["bytes_behind"].as_u64().unwrap_or(0) > 0,
        "bytes behind: {st}"
    );
    let list = json(&scfg, &["list"])?;
    let rows = list.as_array().context("list is an array")?;
    assert_eq!(rows.len(), 2, "{list}");
    assert_eq!(rows[0]["tables"][0], "\"public\".\"items\"");
    let seq = rows[0]["seq"].as_u64().context("seq")?;
    let (_, sql) = queue(&scfg, &["show", &seq.to_string(), "--format", "sql"])?;
    assert!(sql.contains("INSERT INTO \"public\".\"items\" (\"id\", \"name\", \"qty\") VALUES ('100', 'it''s \"quoted\"', NULL);"), "{sql}");
    let shown = json(&scfg, &["show", &(seq + 1).to_string()])?;
    assert_eq!(shown["changes"][0]["op"], "update");

    // Stopped: the stores are opened directly, and left unchanged.
    setup.sender.terminate()?;
    let st = json(&scfg, &["status"])?;
    assert_eq!(st["running"], false);
    assert_eq!(st["spool_records"], 2);
    let rst = json(&rcfg, &["status"])?;
    assert_eq!(rst["running"], false);
    assert_eq!(
        rst["applied_seq"].as_u64(),
        Some(seq - 1),
        "applied position from the target's progress row: {rst}"
    );
    let (_, listed) = queue(&scfg, &["list"])?;
    assert!(listed.contains("\"public\".\"items\""), "{listed}");
    let (code, watched) = queue(&rcfg, &["watch", "--count", "2"])?;
    assert_eq!(code, 0);
    assert_eq!(watched.matches("pgcourier-queue watch").count(), 2);
    // Nothing was changed: the daemons resume and deliver both records.
    setup.restart_sender()?;
    setup.restart_receiver(0)?;
    setup.wait_equal(0, &["public.items"], WAIT).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn skip_unblocks_a_poisoned_transaction_and_leaves_an_audit_row() -> anyhow::Result<()> {
    let (sa, ra) = (free_tcp_port(), free_tcp_port());
    let setup = setup("queueskip", sa, ra).await?;
    let rcfg = setup.branches[0].config.clone();
    // Plant a unique violation on the target.
    let dst = setup.target(0).await?;
    dst.batch_execute("INSERT INTO items VALUES (999, 'poison', 0)")
        .await?;
    let src = setup.source().await?;
    src.batch_execute("INSERT INTO items VALUES (1, 'ok before', 1)")
        .await?;
    src.batch_execute("INSERT INTO items VALUES (2, 'poison', 2)")
        .await?;
    src.batch_execute("INSERT INTO items VALUES (3, 'ok after', 3)")
        .await?;
    wait_until("apply to pause with a blocking record", WAIT, || async {
        let st = json(&rcfg, &["status"])?;
        Ok(st["apply_state"] == "paused" && st["blocking_seq"].is_u64())
    })
    .await
    .with_context(|| setup.logs())?;
    let (code, text) = queue(&rcfg, &["status"])?;
    assert_eq!(code, 3, "status exits 3 while apply is paused:\n{text}");
    assert!(text.contains("blocked at"), "{text}");
    let st = json(&rcfg, &["status"])?;
    let blocking = st["blocking_seq"].as_u64().context("blocking seq")?;
    assert!(
        st["last_error"].as_str().unwrap_or("").contains("items"),
        "the error names the table: {st}"
    );

    // Only the blocking transaction may be skipped.
    let (code, _) = queue(
        &rcfg,
        &["skip", &(blocking + 1).to_string(), "--reason", "wrong one"],
    )?;
    assert_eq!(code, 4);
    let (code, text) = queue(
        &rcfg,
        &[
            "skip",
            &blocking.to_string(),
            "--reason",
            "duplicate name planted on the branch",
        ],
    )?;
    assert_eq!(code, 0, "{text}");
    wait_count(&dst, "SELECT count(*) FROM items WHERE id = 3", 1, WAIT)
        .await
        .with_context(|| setup.logs())?;
    let row = dst
        .query_one(
            "SELECT seq, reason, content::text FROM pgcourier.skipped",
            &[],
        )
        .await?;
    assert_eq!(row.get::<_, i64>(0) as u64, blocking);
    assert_eq!(
        row.get::<_, String>(1),
        "duplicate name planted on the branch"
    );
    assert!(
        row.get::<_, String>(2).contains("poison"),
        "the audit row keeps the skipped content"
    );
    let ids: Vec<i32> = dst
        .query("SELECT id FROM items ORDER BY id", &[])
        .await?
        .iter()
        .map(|r| r.get(0))
        .collect();
    assert_eq!(ids, vec![1, 3, 999]);
    let (code, _) = queue(&rcfg, &["status"])?;
    assert_eq!(code, 0);
    Ok(())
}

/// Parse Prometheus text: name{labels} value lines.
fn parse_metrics(text: &str) -> anyhow::Result<Vec<(String, f64)>> {
    let mut out = Vec::new();
    for line in text
        .lines()
        .filter(|l| !l.starts_with('#') && !l.is_empty())
    {
        let (name, value) = line
            .rsplit_once(' ')
            .with_context(|| format!("bad metric line {line:?}"))?;
        out.push((
            name.to_owned(),
            value
                .parse()
                .with_context(|| format!("bad value in {line:?}"))?,
        ));
    }
    Ok(out)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn metrics_are_scraped_over_http_and_parse() -> anyhow::Result<()> {
    let (sa, ra) = (free_tcp_port(), free_tcp_port());
    let setup = setup("metrics", sa, ra).await?;
    let src = setup.source().await?;
    for i in 0..20 {
        src.batch_execute(&format!("INSERT INTO items VALUES ({i}, 'n{i}', {i})"))
            .await?;
    }
    setup.wait_equal(0, &["public.items"], WAIT).await?;
    let addr: std::net::SocketAddr = format!("127.0.0.1:{ra}").parse()?;
    let body = tokio::task::spawn_blocking(move || {
        pgcourier_common::ops::admin::request(addr, "GET", "/metrics")
    })
    .await??;
    assert_eq!(body.0, 200);
    let m = parse_metrics(&body.1)?;
    let get = |n: &str| m.iter().find(|(k, _)| k == n).map(|(_, v)| *v);
    assert_eq!(get("pgcourier_receiver_records_behind"), Some(0.0));
    assert!(get("pgcourier_receiver_applied_transactions_total").unwrap_or(0.0) >= 20.0);
    assert_eq!(get("pgcourier_receiver_link_connected"), Some(1.0));
    let addr: std::net::SocketAddr = format!("127.0.0.1:{sa}").parse()?;
    let body = tokio::task::spawn_blocking(move || {
        pgcourier_common::ops::admin::request(addr, "GET", "/metrics")
    })
    .await??;
    let m = parse_metrics(&body.1)?;
    assert!(
        m.iter()
            .any(|(k, _)| k == "pgcourier_sender_slot_retained_wal_bytes"),
        "{}",
        body.1
    );
    assert!(
        m.iter().any(
            |(k, v)| k == "pgcourier_sender_receiver_connected{receiver=\"branch0\"}" && *v == 1.0
        ),
        "{}",
        body.1
    );
    let health = tokio::task::spawn_blocking(move || {
        pgcourier_common::ops::admin::request(addr, "GET", "/health")
    })
    .await??;
    assert_eq!(health.0, 200);
    Ok(())
}
