//! End-to-end replication: a real source cluster, the sender, QUIC on
//! loopback, the receiver and a real branch cluster. Every test ends by
//! comparing every table row for row, and (where a trigger audit is set up)
//! by checking that each source row change was applied exactly once.

use std::time::Duration;

use anyhow::Context;
use pgcourier_tests::wait_until;
use tokio_postgres::Client;

use crate::fixture::{wait_count, Dial, Options, Setup};

const WAIT: Duration = Duration::from_secs(120);

/// Types, quoting, TOAST, identity FULL, truncation: the schema of the mixed
/// workload, with a row-change audit trigger on every table that fires on
/// the source and (ENABLE ALWAYS) under the receiver's replica role too.
pub const MIXED_SCHEMA: &str = r#"
CREATE TYPE mood AS ENUM ('sad', 'ok', 'happy', 'très "bien"');
CREATE DOMAIN posint AS integer CHECK (VALUE > 0);
CREATE TYPE pair AS (a integer, b text);
CREATE TABLE kinds (
  id bigint PRIMARY KEY, i2 smallint, i4 integer, i8 bigint, num numeric, f4 real, f8 double precision,
  t text, vc varchar(20), b bytea, bo boolean, d date, tm time, ts timestamp, tstz timestamptz, iv interval,
  u uuid, js json, jb jsonb, arr integer[], arr2 text[], m mood, dom posint, comp pair, ip inet, net cidr,
  mac macaddr, r int4range, tsr tstzrange, ma mood[]);
CREATE TABLE "Mixed Case" ("Id" integer PRIMARY KEY, "select" text, "we""ird" text, "naïve col" text, "ÜBER" integer);
CREATE TABLE toasty (id integer PRIMARY KEY, big text, small integer);
ALTER TABLE toasty ALTER COLUMN big SET STORAGE EXTERNAL;
CREATE TABLE fullident (a integer, b text, c jsonb);
ALTER TABLE fullident REPLICA IDENTITY FULL;
CREATE TABLE parent (id integer PRIMARY KEY, v text);
CREATE TABLE child (id integer PRIMARY KEY, parent_id integer REFERENCES parent (id), v text);
CREATE TABLE counter (id serial PRIMARY KEY, v text);
CREATE SCHEMA audit;
CREATE TABLE audit.log (tbl text, op text, r text);
CREATE FUNCTION audit.rec() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
  INSERT INTO audit.log VALUES (TG_TABLE_NAME, TG_OP, CASE WHEN TG_OP = 'DELETE' THEN OLD::text ELSE NEW::text END);
  RETURN NULL;
END $$;
DO $$
DECLARE t text;
BEGIN
  FOREACH t IN ARRAY ARRAY['kinds', 'Mixed Case', 'toasty', 'fullident', 'parent', 'child', 'counter'] LOOP
    EXECUTE format('CREATE TRIGGER audit AFTER INSERT OR UPDATE OR DELETE ON public.%I FOR EACH ROW EXECUTE FUNCTION audit.rec()', t);
    EXECUTE format('ALTER TABLE public.%I ENABLE ALWAYS TRIGGER audit', t);
  END LOOP;
END $$;
"#;

pub const MIXED_TABLES: &[&str] = &[
    "public.kinds",
    "public.Mixed Case",
    "public.toasty",
    "public.fullident",
    "public.parent",
    "public.child",
    "public.counter",
];

pub const MIXED_TABLES_SQL: &[&str] = &[
    "public.kinds",
    "public.\"Mixed Case\"",
    "public.toasty",
    "public.fullident",
    "public.parent",
    "public.child",
    "public.counter",
];

/// The mixed workload: every change kind and every common type.
pub const MIXED_WORKLOAD: &[&str] = &[
    r#"INSERT INTO kinds VALUES
     (1, 1, 2, 3, 'NaN', 'NaN', 'Infinity', 'plain', 'varchar', '\x00ff', true, '2024-02-29', '23:59:59.999999',
      '2000-01-01 00:00:00', '2024-01-01 12:00:00+05:30', '1 year 2 mons 3 days 04:05:06.789',
      'a0eebc99-9c0b-4ef8-bb6d-6bb9bd380a11', '{"a": [1, 2, {"b": null}]}', '{"z": 1, "a": "é"}',
      '{1,NULL,3}', '{{a,b},{c,NULL}}', 'très "bien"', 5, ROW(1, 'x,y "z"'), '192.168.0.1/24', '10.0.0.0/8',
      '08:00:2b:01:02:03', '[1,10)', '[2024-01-01 00:00+00,infinity)', '{sad,happy}'),
     (2, -32768, -2147483648, -9223372036854775808, '-0.000000000000000000001', '-Infinity', '-0',
      E'tab\there\nnewline 🚀 中文 \\ backslash ''quote''', 'ü', '\x', false, 'infinity', '00:00', '-infinity', 'infinity',
      '-178000000 years', '00000000-0000-0000-0000-000000000000', 'null', '[]', '{}', '{}', 'sad', 1,
      ROW(NULL, NULL), '::1', '2001:db8::/32', 'ff:ff:ff:ff:ff:ff', 'empty', '(,)', '{}'),
     (3, 32767, 2147483647, 9223372036854775807, '123456789012345678901234567890.123456789', 1.1, 0.1,
      '', 'x', NULL, NULL, '-infinity', '24:00', 'infinity', '-infinity', '-1 days +00:00:00.000001',
      NULL, '"string"', '{"nested": {"deep": [true, false]}}', '{NULL}', '{{"with space","with,comma"}}', NULL, NULL,
      ROW(-1, ''), '0.0.0.0/0', '::/0', NULL, '(,5]', NULL, '{NULL,ok}')"#,
    "INSERT INTO kinds (id) VALUES (4)",
    "INSERT INTO kinds (id, i4, f8, t, jb, arr, num) SELECT g, g, g / 7.0, md5(g::text), jsonb_build_object('g', g), ARRAY[g, g + 1], g * 1.5 FROM generate_series(10, 2009) g",
    "UPDATE kinds SET t = t || '!' WHERE id % 3 = 0",
    "UPDATE kinds SET id = id + 100000 WHERE id BETWEEN 10 AND 20",
    "UPDATE kinds SET jb = NULL, num = 'NaN', f4 = '-0' WHERE id = 1",
    "DELETE FROM kinds WHERE id % 5 = 0",
    r#"INSERT INTO "Mixed Case" VALUES (1, 'sel', 'we"ird', 'naïve', 1), (2, NULL, NULL, NULL, NULL), (3, 'x', 'y', 'z', 3)"#,
    r#"UPDATE "Mixed Case" SET "select" = 'changed', "Id" = 30 WHERE "Id" = 3"#,
    r#"DELETE FROM "Mixed Case" WHERE "Id" = 2"#,
    "INSERT INTO toasty SELECT g, repeat(md5(g::text), 200), g FROM generate_series(1, 50) g",
    "UPDATE toasty SET small = small + 1000 WHERE id <= 25",
    // One value larger than a spool record: travels as fragments.
    "INSERT INTO toasty VALUES (1000, repeat(md5('big'), 5000), 1)",
    "UPDATE toasty SET small = 2 WHERE id = 1000",
    "UPDATE toasty SET id = id + 100 WHERE id <= 5",
    "DELETE FROM toasty WHERE id BETWEEN 40 AND 45",
    "INSERT INTO fullident VALUES (1, 'dup', '{\"k\": 1}'), (1, 'dup', '{\"k\": 1}'), (2, NULL, NULL), (3, 'three', '[1]')",
    "UPDATE fullident SET b = 'was null' WHERE a = 2",
    "DELETE FROM fullident WHERE ctid = (SELECT ctid FROM fullident WHERE a = 1 LIMIT 1)",
    "UPDATE fullident SET c = '{\"k\": 2}' WHERE a = 1",
    "INSERT INTO parent SELECT g, 'p' || g FROM generate_series(1, 20) g",
    "INSERT INTO child SELECT g, g % 20 + 1, 'c' || g FROM generate_series(1, 40) g",
    "TRUNCATE parent CASCADE",
    "INSERT INTO parent VALUES (1, 'again')",
    "INSERT INTO child VALUES (1, 1, 'again')",
    "INSERT INTO counter (v) SELECT 'n' || g FROM generate_series(1, 10) g",
    "TRUNCATE counter RESTART IDENTITY",
    "INSERT INTO counter (v) VALUES ('after restart')",
];

/// Each source row change and how often the target's audit trigger saw it:
/// rows of (table, op, row, count) that differ between source and target.
pub async fn audit_differences(src: &Client, dst: &Client) -> anyhow::Result<Vec<String>> {
    let q = "SELECT tbl || ' ' || op || ' ' || coalesce(r, 'NULL') || ' x' || count(*) FROM audit.log GROUP BY tbl, op, r ORDER BY 1";
    // Sets, not Vec::contains: the fault tests compare logs of 100k rows.
    let a: std::collections::BTreeSet<String> =
        src.query(q, &[]).await?.iter().map(|r| r.get(0)).collect();
    let b: std::collections::BTreeSet<String> =
        dst.query(q, &[]).await?.iter().map(|r| r.get(0)).collect();
    let mut diff: Vec<String> = a
        .difference(&b)
        .map(|x| format!("source only: {x}"))
        .collect();
    diff.extend(b.difference(&a).map(|x| format!("target only: {x}")));
    Ok(diff)
}

pub async fn assert_applied_exactly_once(setup: &Setup, i: usize) -> anyhow::Result<()> {
    let src = setup.source().await?;
    let dst = setup.target(i).await?;
    let diff = audit_differences(&src, &dst).await?;
    let n: i64 = dst
        .query_one("SELECT count(*) FROM audit.log", &[])
        .await?
        .get(0);
    anyhow::ensure!(
        n > 0,
        "the target's audit trigger recorded nothing: the test would prove nothing"
    );
    anyhow::ensure!(
        diff.is_empty(),
        "row changes not applied exactly once on branch {i}:\n{}",
        diff.iter().take(10).cloned().collect::<Vec<_>>().join("\n")
    );
    Ok(())
}

async fn run_sql(client: &Client, statements: &[&str]) -> anyhow::Result<()> {
    for s in statements {
        client
            .batch_execute(s)
            .await
            .with_context(|| format!("source statement: {s}"))?;
    }
    Ok(())
}

fn mixed(branches: usize, dial: Dial) -> Options<'static> {
    Options {
        branches,
        dial,
        schema: MIXED_SCHEMA,
        source_sql: "",
        tables: MIXED_TABLES,
        sender_extra: "",
        receiver_extra: "",
        link: None,
        wait_for_copy: true,
        ..Options::default()
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mixed_workload_over_every_type_replicates_row_for_row_exactly_once() -> anyhow::Result<()>
{
    let setup = Setup::start("mixed", mixed(1, Dial::SenderDials)).await?;
    let src = setup.source().await?;
    run_sql(&src, MIXED_WORKLOAD).await?;
    // Many small transactions too.
    for i in 0..200 {
        src.batch_execute(&format!(
            "INSERT INTO \"Mixed Case\" VALUES ({id}, 'row {i}', NULL, 'ü', {i}); UPDATE kinds SET i2 = {i} WHERE id = 1",
            id = 1000 + i
        ))
        .await?;
    }
    setup.wait_equal(0, MIXED_TABLES_SQL, WAIT).await?;
    assert_applied_exactly_once(&setup, 0).await?;
    // Unchanged TOASTed values kept their value.
    let dst = setup.target(0).await?;
    let nulls: i64 = dst
        .query_one("SELECT count(*) FROM toasty WHERE big IS NULL", &[])
        .await?
        .get(0);
    assert_eq!(nulls, 0, "an unchanged TOASTed column was overwritten");
    Ok(())
}

/// A schema for the fault tests: one table, audited.
pub const ACCT_SCHEMA: &str = r#"
CREATE TABLE acct (id integer PRIMARY KEY, bal bigint NOT NULL, note text);
CREATE SCHEMA audit;
CREATE TABLE audit.log (tbl text, op text, r text);
CREATE FUNCTION audit.rec() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
  INSERT INTO audit.log VALUES (TG_TABLE_NAME, TG_OP, CASE WHEN TG_OP = 'DELETE' THEN OLD::text ELSE NEW::text END);
  RETURN NULL;
END $$;
CREATE TRIGGER audit AFTER INSERT OR UPDATE OR DELETE ON acct FOR EACH ROW EXECUTE FUNCTION audit.rec();
ALTER TABLE acct ENABLE ALWAYS TRIGGER audit;
"#;

fn acct(branches: usize, dial: Dial) -> Options<'static> {
    Options {
        branches,
        dial,
        schema: ACCT_SCHEMA,
        source_sql: "",
        tables: &["public.acct"],
        sender_extra: "",
        receiver_extra: "",
        link: None,
        wait_for_copy: true,
        ..Options::default()
    }
}

/// `n` single-row transactions numbered from `from`: inserts, then updates
/// and deletes of earlier rows.
pub async fn acct_transactions(client: &Client, from: i32, n: i32) -> anyhow::Result<()> {
    for i in from..from + n {
        let sql = match i % 4 {
            3 => format!(
                "UPDATE acct SET bal = bal + {i}, note = 'u{i}' WHERE id = {}",
                i - 1
            ),
            2 if i > 10 => format!("DELETE FROM acct WHERE id = {}", i - 10),
            _ => format!("INSERT INTO acct VALUES ({i}, {i}, 'i{i}')"),
        };
        client.batch_execute(&sql).await?;
    }
    Ok(())
}

async fn applied(setup: &Setup, i: usize) -> anyhow::Result<i64> {
    let dst = setup.target(i).await?;
    Ok(dst
        .query_one("SELECT count(*) FROM audit.log", &[])
        .await?
        .get(0))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sender_killed_mid_stream_restarts_without_loss_or_duplicates() -> anyhow::Result<()> {
    let mut setup = Setup::start("killsender", acct(1, Dial::SenderDials)).await?;
    let src = setup.source().await?;
    acct_transactions(&src, 1, 300).await?;
    // Kill while changes are still being captured and shipped.
    let writer = {
        let src = setup.source().await?;
        tokio::spawn(async move { acct_transactions(&src, 301, 1500).await })
    };
    let dst = setup.target(0).await?;
    wait_count(&dst, "SELECT count(*) FROM audit.log", 50, WAIT)
        .await
        .with_context(|| setup.logs())?;
    setup.sender.kill9()?;
    setup.restart_sender()?;
    // Work committed after the restart must arrive (the writer may already
    // have finished and everything before it been shipped).
    acct_transactions(&src, 5001, 20).await?;
    wait_count(&dst, "SELECT count(*) FROM acct WHERE id >= 5001", 1, WAIT)
        .await
        .with_context(|| setup.logs())?;
    setup.sender.kill9()?;
    setup.restart_sender()?;
    writer.await??;
    setup.wait_equal(0, &["public.acct"], WAIT).await?;
    assert_applied_exactly_once(&setup, 0).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn receiver_killed_mid_apply_restarts_without_loss_or_duplicates() -> anyhow::Result<()> {
    // Small apply groups: more commits, so kills land between a target
    // commit and the inbox delete as well as inside groups.
    let opts = Options {
        receiver_extra: "apply-group-transactions = 20",
        ..acct(1, Dial::SenderDials)
    };
    let mut setup = Setup::start("killrecv", opts).await?;
    // A backlog builds while the receiver is down, then it is killed
    // repeatedly while it applies.
    setup.branches[0].receiver.terminate()?;
    let src = setup.source().await?;
    acct_transactions(&src, 1, 3000).await?;
    let total: i64 = src
        .query_one("SELECT count(*) FROM audit.log", &[])
        .await?
        .get(0);
    setup.restart_receiver(0)?;
    let mut kills = 0;
    for _ in 0..4 {
        let at = applied(&setup, 0).await.unwrap_or(0);
        if at >= total {
            break;
        }
        let dst = setup.target(0).await?;
        wait_count(
            &dst,
            "SELECT count(*) FROM audit.log",
            (at + 150).min(total),
            WAIT,
        )
        .await
        .with_context(|| setup.logs())?;
        setup.branches[0].receiver.kill9()?;
        kills += 1;
        setup.restart_receiver(0)?;
    }
    anyhow::ensure!(
        kills > 0,
        "apply finished before the first kill: the test proved nothing"
    );
    setup.wait_equal(0, &["public.acct"], WAIT).await?;
    assert_applied_exactly_once(&setup, 0).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn target_restart_during_apply_is_survived() -> anyhow::Result<()> {
    let setup = Setup::start("pgrestart", acct(1, Dial::SenderDials)).await?;
    let writer = {
        let src = setup.source().await?;
        tokio::spawn(async move { acct_transactions(&src, 1, 1500).await })
    };
    let dst = setup.target(0).await?;
    wait_count(&dst, "SELECT count(*) FROM audit.log", 100, WAIT)
        .await
        .with_context(|| setup.logs())?;
    drop(dst);
    setup.branches[0].pg.kill()?;
    setup.branches[0].pg.start_again()?;
    writer.await??;
    setup.wait_equal(0, &["public.acct"], WAIT).await?;
    assert_applied_exactly_once(&setup, 0).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_receivers_one_stopped_both_end_identical_and_spool_waits_for_the_slower(
) -> anyhow::Result<()> {
    let mut setup = Setup::start("tworecv", acct(2, Dial::SenderDials)).await?;
    let src = setup.source().await?;
    acct_transactions(&src, 1, 200).await?;
    setup.wait_equal(0, &["public.acct"], WAIT).await?;
    setup.wait_equal(1, &["public.acct"], WAIT).await?;
    setup.branches[1].receiver.terminate()?;
    acct_transactions(&src, 201, 400).await?;
    setup.wait_equal(0, &["public.acct"], WAIT).await?;
    // The spool must still hold what branch 1 has not acknowledged: stop the
    // sender and look at the spool directly.
    setup.sender.terminate()?;
    let spool = pgcourier_sender::spool::Spool::open(
        &setup.dir.path().join("spool"),
        1 << 20,
        &["branch0".into(), "branch1".into()],
    )?;
    let (depth, _) = spool.depth();
    let ack0 = spool.applied("branch0").unwrap_or(0);
    let ack1 = spool.applied("branch1").unwrap_or(0);
    anyhow::ensure!(
        ack0 > ack1,
        "the running branch should be ahead: acks {ack0} vs {ack1}"
    );
    anyhow::ensure!(
        spool.marks().first_seq == ack1 + 1,
        "the spool must start right after the slower receiver's ack {ack1}, starts at {}",
        spool.marks().first_seq
    );
    anyhow::ensure!(
        depth >= ack0 - ack1,
        "spool holds {depth} records, fewer than the {} branch1 still needs",
        ack0 - ack1
    );
    drop(spool);
    setup.restart_sender()?;
    setup.restart_receiver(1)?;
    setup.wait_equal(1, &["public.acct"], WAIT).await?;
    setup.wait_equal(0, &["public.acct"], WAIT).await?;
    assert_applied_exactly_once(&setup, 0).await?;
    assert_applied_exactly_once(&setup, 1).await?;
    // Once both hold everything, the spool is trimmed behind both.
    setup.sender.terminate()?;
    setup.branches[0].receiver.terminate()?;
    setup.branches[1].receiver.terminate()?;
    let spool = pgcourier_sender::spool::Spool::open(
        &setup.dir.path().join("spool"),
        1 << 20,
        &["branch0".into(), "branch1".into()],
    )?;
    anyhow::ensure!(
        spool.applied("branch0") == spool.applied("branch1"),
        "both receivers should have acknowledged everything"
    );
    anyhow::ensure!(
        spool.depth().0 == 0,
        "spool should be empty after both acknowledged, holds {}",
        spool.depth().0
    );
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn receiver_behind_nat_dials_the_sender_and_replicates() -> anyhow::Result<()> {
    let mut setup = Setup::start("reverse", acct(1, Dial::ReceiverDials)).await?;
    let src = setup.source().await?;
    acct_transactions(&src, 1, 300).await?;
    setup.wait_equal(0, &["public.acct"], WAIT).await?;
    // And it comes back after the sender restarts.
    setup.sender.terminate()?;
    acct_transactions(&src, 301, 100).await?;
    setup.restart_sender()?;
    setup.wait_equal(0, &["public.acct"], WAIT).await?;
    assert_applied_exactly_once(&setup, 0).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_receiver_with_an_unpinned_certificate_is_refused() -> anyhow::Result<()> {
    let mut setup = Setup::start("wrongcert", acct(1, Dial::ReceiverDials)).await?;
    // Replace the receiver's certificate with one the sender does not pin.
    setup.branches[0].receiver.terminate()?;
    let dir = setup.dir.path();
    std::fs::remove_file(dir.join("branch0.crt"))?;
    std::fs::remove_file(dir.join("branch0.key"))?;
    let impostor = crate::fixture::keygen(dir, "branch0");
    anyhow::ensure!(impostor != setup.branches[0].fingerprint);
    setup.restart_receiver(0)?;
    let src = setup.source().await?;
    acct_transactions(&src, 1, 20).await?;
    wait_until(
        "the sender to log the refused fingerprint",
        WAIT,
        || async { Ok(setup.sender.log().contains(&impostor)) },
    )
    .await
    .with_context(|| setup.logs())?;
    let dst = setup.target(0).await?;
    let n: i64 = dst
        .query_one("SELECT count(*) FROM acct", &[])
        .await?
        .get(0);
    anyhow::ensure!(n == 0, "an impostor receiver got {n} rows");
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_missing_target_table_pauses_apply_until_the_dba_creates_it() -> anyhow::Result<()> {
    let schema = "CREATE TABLE a (id integer PRIMARY KEY, v text); CREATE TABLE b (id integer PRIMARY KEY, v text);";
    let setup = Setup::start(
        "pause",
        Options {
            schema,
            ..Options::default()
        },
    )
    .await?;
    let dst = setup.target(0).await?;
    dst.batch_execute("DROP TABLE b").await?;
    let src = setup.source().await?;
    src.batch_execute("INSERT INTO a VALUES (1, 'before')")
        .await?;
    src.batch_execute("INSERT INTO b VALUES (1, 'blocked')")
        .await?;
    src.batch_execute("INSERT INTO a VALUES (2, 'after')")
        .await?;
    wait_until("the receiver to name the missing table", WAIT, || async {
        Ok(setup.branches[0]
            .receiver
            .log()
            .contains("table \"public\".\"b\" does not exist on the target"))
    })
    .await
    .with_context(|| setup.logs())?;
    // The transaction before the blocked one commits on its own; the one
    // after it waits, in commit order.
    wait_count(&dst, "SELECT count(*) FROM a", 1, WAIT)
        .await
        .with_context(|| setup.logs())?;
    let after: i64 = dst
        .query_one("SELECT count(*) FROM a WHERE id = 2", &[])
        .await?
        .get(0);
    anyhow::ensure!(
        after == 0,
        "a transaction after the blocked one was applied out of order"
    );
    dst.batch_execute("CREATE TABLE b (id integer PRIMARY KEY, v text)")
        .await?;
    setup.wait_equal(0, &["public.a", "public.b"], WAIT).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn check_names_tables_whose_updates_could_not_replicate_and_exits_non_zero(
) -> anyhow::Result<()> {
    let schema = "CREATE TABLE good (id integer PRIMARY KEY); CREATE TABLE \"No Key\" (v text); \
                  CREATE TABLE full_ident (v text); ALTER TABLE full_ident REPLICA IDENTITY FULL;";
    let setup = Setup::start(
        "check",
        Options {
            schema,
            ..Options::default()
        },
    )
    .await?;
    let out = std::process::Command::new(pgcourier_tests::bin_path("pgcourier-sender"))
        .args([
            "check",
            "--config",
            setup.sender_config.to_str().expect("utf-8"),
        ])
        .output()?;
    let text = String::from_utf8_lossy(&out.stdout);
    anyhow::ensure!(
        out.status.code() == Some(1),
        "check should exit 1 on problems, got {:?}\n{text}",
        out.status
    );
    anyhow::ensure!(
        text.contains("table \"public\".\"No Key\" has no primary key and no replica identity"),
        "check did not name the table:\n{text}"
    );
    anyhow::ensure!(
        text.contains("REPLICA IDENTITY FULL"),
        "check did not give the fix:\n{text}"
    );
    anyhow::ensure!(
        !text.contains("\"good\"") && !text.contains("\"full_ident\""),
        "check flagged a table that is fine:\n{text}"
    );
    // Once fixed, check passes.
    setup
        .hq
        .execute(
            crate::fixture::DB,
            "ALTER TABLE \"No Key\" REPLICA IDENTITY FULL",
        )
        .await?;
    let out = std::process::Command::new(pgcourier_tests::bin_path("pgcourier-sender"))
        .args([
            "check",
            "--config",
            setup.sender_config.to_str().expect("utf-8"),
        ])
        .output()?;
    anyhow::ensure!(
        out.status.success(),
        "check should pass once fixed:\n{}",
        String::from_utf8_lossy(&out.stdout)
    );
    Ok(())
}
