//! Set-based apply: runs of updates and of deletes by primary key to one
//! table go to the target as one `UPDATE .. FROM unnest(..)` or
//! `DELETE .. USING unnest(..)` (receiver/src/apply/pipeline.rs). The
//! tests build a backlog while the receiver is stopped (so that many source
//! transactions share a target transaction), replay it, compare the tables
//! row for row, and read the target's statement log to see which path each
//! table took.

use std::time::Duration;

use anyhow::Context;

use crate::fixture::{Options, Setup, DB};

const WAIT: Duration = Duration::from_secs(180);

const SCHEMA: &str = r#"
CREATE TABLE sets (id integer PRIMARY KEY, t text, b bytea, n numeric, ts timestamp, v integer, big text);
ALTER TABLE sets ALTER COLUMN big SET STORAGE EXTERNAL;
CREATE TABLE "Sets Two" ("k 1" text, k2 integer, note text, PRIMARY KEY ("k 1", k2));
CREATE TABLE uniq (id integer PRIMARY KEY, code integer UNIQUE);
CREATE TABLE gone (id integer PRIMARY KEY, v integer);
"#;

const ROWS: &str = r#"
INSERT INTO sets (id, t, v) SELECT g, 'row ' || g, g FROM generate_series(1, 3000) g;
INSERT INTO "Sets Two" SELECT E'k\t"''' || (g % 10), g, 'note ' || g FROM generate_series(1, 400) g;
INSERT INTO uniq SELECT g, g FROM generate_series(1, 40) g;
INSERT INTO gone SELECT g, 0 FROM generate_series(1, 100) g;
"#;

/// As SQL names (the harness reads `SELECT t::text FROM <name> t`).
const TABLES: &[&str] = &[
    "public.sets",
    "public.\"Sets Two\"",
    "public.uniq",
    "public.gone",
];

/// What the source does while the receiver is stopped: in order.
const WORKLOAD: &[&str] = &[
    // Every row in one transaction, with text that needs escaping, NULLs, a
    // bytea, a numeric and a timestamp.
    r#"UPDATE sets SET
         t = CASE WHEN id % 5 = 0 THEN NULL ELSE E'q''uote\ttab\nnl\\bs "dq" \r ' || id END,
         b = CASE WHEN id % 7 = 0 THEN NULL ELSE decode(md5(id::text), 'hex') || '\x00ff5c0a'::bytea END,
         n = id * 1.0001 + 0.123456789012345678,
         ts = timestamp '2024-02-29 23:59:59.123456' + id * interval '1 minute',
         v = id"#,
    // The same keys updated several times in one transaction, each time
    // with other values: a set holding two of them would keep either.
    "BEGIN; UPDATE sets SET v = 1, t = 'round 1' WHERE id <= 300; \
     UPDATE sets SET v = 2, t = 'round 2' WHERE id <= 300; \
     UPDATE sets SET v = v * 10 + 3, t = NULL WHERE id <= 150; COMMIT",
    // Keys repeating every 40 changes inside one transaction.
    "DO $$ BEGIN FOR i IN 1..400 LOOP UPDATE sets SET v = i, t = 'loop ' || i WHERE id = 1000 + (i % 40); END LOOP; END $$",
    // Deletes by key; deleted, inserted again and deleted again in one
    // transaction.
    "DELETE FROM sets WHERE id % 3 = 0 AND id > 2000",
    "BEGIN; DELETE FROM sets WHERE id BETWEEN 1500 AND 1599; \
     INSERT INTO sets (id, t, v) SELECT g, 'back', g FROM generate_series(1500, 1599) g; \
     DELETE FROM sets WHERE id BETWEEN 1500 AND 1549; \
     UPDATE sets SET v = 0, t = 'kept' WHERE id BETWEEN 1550 AND 1599; COMMIT",
    // Runs shorter than 8 go one by one.
    "UPDATE sets SET t = 'short run', v = 7 WHERE id BETWEEN 700 AND 703",
    "DELETE FROM sets WHERE id BETWEEN 710 AND 712",
    // Key changes and unchanged TOAST values go one by one.
    "UPDATE sets SET id = id + 100000 WHERE id BETWEEN 500 AND 520",
    "UPDATE sets SET big = repeat(md5(id::text), 3000) WHERE id BETWEEN 600 AND 640",
    "UPDATE sets SET v = v + 1 WHERE id BETWEEN 600 AND 640",
    // A composite text key with a tab, quotes and a space in its name.
    r#"UPDATE "Sets Two" SET note = note || E'\n\\2'"#,
    r#"DELETE FROM "Sets Two" WHERE k2 % 2 = 0"#,
    // A second unique index: the order of the rows inside one statement
    // could matter, so its changes go one by one.
    "DO $$ BEGIN UPDATE uniq SET code = 1000 WHERE id = 40; \
     FOR i IN REVERSE 39..1 LOOP UPDATE uniq SET code = i + 1 WHERE id = i; END LOOP; END $$",
    // Rows deleted on the target beforehand: counted as missing, skipped.
    "UPDATE gone SET v = id",
];

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn runs_of_updates_and_deletes_apply_as_sets_in_order() -> anyhow::Result<()> {
    let setup = Setup::start(
        "apply-sets",
        Options {
            schema: SCHEMA,
            source_sql: ROWS,
            ..Options::default()
        },
    )
    .await?;
    setup.wait_equal(0, TABLES, WAIT).await?;
    let branch = &setup.branches[0];
    // The target logs every change statement: which path each table took.
    // (ALTER SYSTEM cannot share an implicit transaction.)
    branch
        .pg
        .execute(DB, "ALTER SYSTEM SET log_statement = 'mod'")
        .await?;
    branch.pg.execute(DB, "SELECT pg_reload_conf()").await?;
    branch
        .pg
        .execute(DB, "DELETE FROM gone WHERE id <= 10")
        .await?;
    // A backlog: the receiver is down while the source writes.
    branch.receiver.terminate()?;
    let src = setup.source().await?;
    for sql in WORKLOAD {
        src.batch_execute(sql)
            .await
            .with_context(|| format!("source statement: {sql}"))?;
    }
    // Single-row transactions whose keys repeat every 50: runs across
    // source transactions in one target transaction.
    for i in 0..500 {
        src.batch_execute(&format!(
            "UPDATE sets SET v = -{i}, t = 'tx {i}' WHERE id = {}",
            1 + i % 50
        ))
        .await?;
    }
    branch.receiver.respawn()?;

    setup
        .wait_equal(0, &TABLES[..3], WAIT)
        .await
        .context("tables equal after set-based apply")?;
    let dst = setup.target(0).await?;
    let gone: Vec<(i32, i32)> = dst
        .query("SELECT id, v FROM gone ORDER BY id", &[])
        .await?
        .iter()
        .map(|r| (r.get(0), r.get(1)))
        .collect();
    let want: Vec<(i32, i32)> = (11..=100).map(|i| (i, i)).collect();
    assert_eq!(gone, want, "the rows present on the target were updated");

    // A row missing on the target is skipped and counted, as one by one:
    // the only misses are the ten rows of `gone`.
    let log = branch.receiver.log();
    let missing: Vec<&str> = log
        .lines()
        .filter(|l| l.contains("not found on the target"))
        .collect();
    assert!(
        !missing.is_empty() && missing.iter().all(|l| l.contains("gone")),
        "only rows of gone were missing on the target: {missing:?}\n{}",
        setup.logs()
    );
    assert!(
        missing.iter().any(|l| l.contains("rows=10")),
        "the ten missing rows of gone were counted in one set: {missing:?}"
    );

    // The sets and the one-by-one fallbacks really ran.
    let pglog = std::fs::read_to_string(branch.pg.log_path()).context("read the target log")?;
    for (what, needle) in [
        (
            "set-based UPDATE of sets",
            "UPDATE \"public\".\"sets\" AS t SET",
        ),
        (
            "set-based DELETE of sets",
            "DELETE FROM \"public\".\"sets\" AS t USING unnest(",
        ),
        (
            "set-based DELETE of Sets Two",
            "DELETE FROM \"public\".\"Sets Two\" AS t USING",
        ),
        (
            "one-by-one UPDATE of sets",
            "UPDATE \"public\".\"sets\" SET",
        ),
        (
            "one-by-one DELETE of sets",
            "DELETE FROM \"public\".\"sets\" WHERE",
        ),
        (
            "one-by-one UPDATE of uniq",
            "UPDATE \"public\".\"uniq\" SET",
        ),
    ] {
        anyhow::ensure!(
            pglog.contains(needle),
            "the target ran no {what} ({needle})"
        );
    }
    anyhow::ensure!(
        !pglog.contains("\"public\".\"uniq\" AS t"),
        "uniq has a second unique index: no set-based statement may touch it"
    );
    Ok(())
}
