//! Issue 12, item 13: the initial copy sends exactly what the publication
//! publishes. A PostgreSQL 15 publication may leave columns out (a column
//! list) and rows out (a row filter, `WHERE`); the copy's table definitions
//! (and so the branch's CREATE TABLE) and its rows follow them, as the live
//! stream (pgoutput) does. Only the configured publication counts: another
//! publication of the same table with every column and row changes nothing.

use std::time::Duration;

use anyhow::Context;
use pgcourier_tests::wait_until;

use crate::fixture::{Options, Setup};

const WAIT: Duration = Duration::from_secs(120);

/// Source only: the branch has no table, `create-tables` makes it from the
/// copy's definitions. The sender's publication (`pgcourier`, the default
/// name) exists before it starts, so it is used as it is. Its row filter
/// names a column outside the replica identity, so it publishes inserts only
/// (PostgreSQL refuses UPDATE/DELETE on such a table otherwise).
const SOURCE_SQL: &str = "
    CREATE TABLE t (id integer PRIMARY KEY, name text NOT NULL, secret text, region text NOT NULL);
    INSERT INTO t SELECT g, 'name ' || g, 'secret ' || g, CASE WHEN g % 2 = 0 THEN 'north' ELSE 'south' END
      FROM generate_series(1, 100) g;
    CREATE PUBLICATION other FOR TABLE t;
    CREATE PUBLICATION pgcourier FOR TABLE t (id, name) WHERE (region = 'north') WITH (publish = 'insert');";

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_copy_sends_only_the_published_columns_and_rows() -> anyhow::Result<()> {
    let setup = Setup::start(
        "trust-publication",
        Options {
            source_sql: SOURCE_SQL,
            receiver_extra: "create-tables = true",
            ..Options::default()
        },
    )
    .await?;
    let dst = setup.target(0).await?;
    let columns: Vec<String> = dst
        .query(
            "SELECT attname::text FROM pg_attribute \
             WHERE attrelid = 'public.t'::regclass AND attnum > 0 AND NOT attisdropped ORDER BY attnum",
            &[],
        )
        .await
        .with_context(|| format!("the branch's table t\n{}", setup.logs()))?
        .iter()
        .map(|r| r.get(0))
        .collect();
    assert_eq!(
        columns,
        ["id", "name"],
        "the branch's table has only the published columns\n{}",
        setup.logs()
    );
    let rows: Vec<(i32, String)> = dst
        .query("SELECT id, name FROM t ORDER BY id", &[])
        .await?
        .iter()
        .map(|r| (r.get(0), r.get(1)))
        .collect();
    let north: Vec<(i32, String)> = (1..=100)
        .filter(|g| g % 2 == 0)
        .map(|g| (g, format!("name {g}")))
        .collect();
    assert_eq!(
        rows,
        north,
        "only the north rows were copied\n{}",
        setup.logs()
    );

    // The live stream goes on from the copy with the same definition.
    let src = setup.source().await?;
    src.batch_execute(
        "INSERT INTO t VALUES (101, 'late south', 's', 'south'); \
         INSERT INTO t VALUES (102, 'late north', 'n', 'north');",
    )
    .await?;
    wait_until("the live north row to arrive", WAIT, || async {
        Ok(dst
            .query_opt("SELECT 1 FROM t WHERE id = 102", &[])
            .await?
            .is_some())
    })
    .await
    .with_context(|| setup.logs())?;
    let n: i64 = dst.query_one("SELECT count(*) FROM t", &[]).await?.get(0);
    assert_eq!(
        n,
        51,
        "50 copied north rows and the live north one\n{}",
        setup.logs()
    );
    Ok(())
}
