//! Issue 14: a table that joins a running publication does not hold back
//! the live changes to the branch's other tables. Its rows travel in
//! chunks between the live transactions (the sender's capture/join.rs),
//! are staged at the branch and swapped in at the end with the changes
//! made to the table meanwhile (the receiver's apply/join.rs). Over a
//! netem 3g relay (1 Mbit/s), so the load takes seconds.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use pgcourier_tests::wait_until;

use crate::fixture::{Options, Setup};

const WAIT: Duration = Duration::from_secs(240);

const SCHEMA: &str = "CREATE TABLE live (id bigint PRIMARY KEY, note text);
     CREATE TABLE big (id integer PRIMARY KEY, h text NOT NULL, n integer, spare text);";

/// About 2 MB of rows that compress about 2:1: some 8 s on 3g.
const BIG_ROWS: &str =
    "INSERT INTO big (id, h, n) SELECT g, md5(g::text) || md5((g * 7)::text), g % 1000 \
     FROM generate_series(1, 30000) g;";

async fn start(name: &str, seed: u64) -> anyhow::Result<Setup> {
    let link = pgcourier_netem::Profile::by_name("3g")
        .context("3g profile")?
        .link(seed);
    Setup::start(
        name,
        Options {
            schema: SCHEMA,
            source_sql: BIG_ROWS,
            tables: &["public.live"],
            link: Some(link),
            ..Options::default()
        },
    )
    .await
}

/// Writes until stopped: a row into `live` every 100 ms, and changes to
/// `big` (rows the copy reads early and late, deleted, inserted).
struct Writer {
    stop: Arc<AtomicBool>,
    task: tokio::task::JoinHandle<anyhow::Result<i64>>,
}

impl Writer {
    async fn start(setup: &Setup) -> anyhow::Result<Writer> {
        let src = setup.source().await?;
        let stop = Arc::new(AtomicBool::new(false));
        let stopped = stop.clone();
        let task = tokio::spawn(async move {
            let mut i = 0i64;
            while !stopped.load(Ordering::Relaxed) && i < 3000 {
                i += 1;
                src.batch_execute(&format!(
                    "BEGIN;
                     INSERT INTO live VALUES ({}, 'live {i}');
                     UPDATE big SET n = n + 1, h = 'early {i}' WHERE id = {};
                     UPDATE big SET n = n + 1 WHERE id = {};
                     DELETE FROM big WHERE id = {};
                     INSERT INTO big VALUES ({}, 'new {i}', {i});
                     COMMIT",
                    10_000 + i,
                    i % 50 + 1,
                    30000 - (i % 50),
                    1000 + i,
                    100_000 + i,
                ))
                .await?;
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
            Ok(i)
        });
        Ok(Writer { stop, task })
    }

    /// Stop; the transactions it wrote.
    async fn stop(self) -> anyhow::Result<i64> {
        self.stop.store(true, Ordering::Relaxed);
        self.task.await?
    }
}

async fn one(client: &tokio_postgres::Client, sql: &str) -> anyhow::Result<i64> {
    Ok(client.query_one(sql, &[]).await?.get(0))
}

/// The branch is loading a join: its `pgcourier.joining` row, and rows
/// staged so far.
async fn loading(dst: &tokio_postgres::Client) -> anyhow::Result<Option<i64>> {
    let exists = one(
        dst,
        "SELECT count(*) FROM pg_tables WHERE schemaname = 'pgcourier' AND tablename = 'joining'",
    )
    .await?;
    if exists == 0 {
        return Ok(None);
    }
    let row = dst
        .query_opt("SELECT rows FROM pgcourier.joining LIMIT 1", &[])
        .await?;
    Ok(row.map(|r| r.get::<_, i64>(0)))
}

/// Wait until the branch has staged more than `rows` rows of a join.
async fn staged_past(setup: &Setup, dst: &tokio_postgres::Client, rows: i64) -> anyhow::Result<()> {
    wait_until(&format!("more than {rows} rows staged"), WAIT, || async {
        Ok(loading(dst).await?.is_some_and(|r| r > rows))
    })
    .await
    .with_context(|| setup.logs())
}

/// Wait until no join is loading at the branch; then nothing of one is
/// left there: no joining or held rows, no staging table.
async fn nothing_staged(dst: &tokio_postgres::Client) -> anyhow::Result<()> {
    wait_until("no join loading", WAIT, || async {
        Ok(one(dst, "SELECT count(*) FROM pgcourier.joining").await? == 0)
    })
    .await?;
    assert_eq!(one(dst, "SELECT count(*) FROM pgcourier.held").await?, 0);
    assert_eq!(
        one(
            dst,
            "SELECT count(*) FROM pg_tables WHERE schemaname = 'pgcourier' AND tablename LIKE 'join\\_%'"
        )
        .await?,
        0,
        "a staging table is left"
    );
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn live_changes_keep_arriving_while_a_joining_table_loads_in_chunks() -> anyhow::Result<()> {
    let setup = start("join-live", 41).await?;
    let src = setup.source().await?;
    let dst = setup.target(0).await?;
    let writes = Writer::start(&setup).await?;
    wait_until("live rows reach the branch", WAIT, || async {
        Ok(one(&dst, "SELECT count(*) FROM live").await? >= 5)
    })
    .await
    .with_context(|| setup.logs())?;
    src.batch_execute("ALTER PUBLICATION pgcourier ADD TABLE big")
        .await?;
    // The join is under way at the branch (rows staged, not all), and live
    // rows committed after it started keep being applied meanwhile.
    let deadline = tokio::time::Instant::now() + WAIT;
    let mut seen: Option<(i64, i64)> = None;
    loop {
        anyhow::ensure!(
            tokio::time::Instant::now() < deadline,
            "no live rows applied while the joining table was half loaded\n{}",
            setup.logs()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
        let Some(staged) = loading(&dst).await? else {
            continue;
        };
        let live = one(&dst, "SELECT count(*) FROM live").await?;
        match seen {
            None if staged > 0 => seen = Some((staged, live)),
            Some((first, live_then)) if staged > first && live >= live_then + 5 => {
                if loading(&dst).await?.is_some_and(|r| r < 30000) {
                    break;
                }
            }
            _ => {}
        }
    }
    let big_now = one(&dst, "SELECT count(*) FROM big").await?;
    assert_eq!(
        big_now, 0,
        "the table stays empty at the branch until its rows are all in"
    );
    let n = writes.stop().await?;
    assert!(n > 10, "{n} writes");
    setup
        .wait_equal(0, &["public.live", "public.big"], WAIT)
        .await?;
    nothing_staged(&dst).await?;
    // The rows went into the table in the side transaction, committed at
    // the end: the apply connection did not copy them from staging.
    let receiver_log = setup.branches[0].receiver.log();
    let loaded: Vec<&str> = receiver_log
        .lines()
        .filter(|l| l.contains("join loaded"))
        .collect();
    assert!(
        loaded.len() == 1 && loaded[0].contains("side transaction"),
        "the join's end took the side transaction's path: {loaded:?}\n{}",
        setup.logs()
    );
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_join_survives_kill_9_of_the_receiver_and_is_copied_again_after_kill_9_of_the_sender(
) -> anyhow::Result<()> {
    let mut setup = start("join-kill", 43).await?;
    let src = setup.source().await?;
    let writes = Writer::start(&setup).await?;
    src.batch_execute("ALTER PUBLICATION pgcourier ADD TABLE big")
        .await?;
    let dst = setup.target(0).await?;
    staged_past(&setup, &dst, 0).await?;
    // The receiver dies mid-load: staging, held changes and progress are
    // in the target; it carries on where it stood.
    setup.branches[0].receiver.kill9()?;
    let staged = loading(&dst).await?.unwrap_or(0);
    setup.restart_receiver(0)?;
    staged_past(&setup, &dst, staged).await?;
    // The sender dies mid-load: its snapshot is gone. The join is
    // abandoned, the table copied again from a new cut.
    setup.sender.kill9()?;
    setup.restart_sender()?;
    writes.stop().await?;
    setup
        .wait_equal(0, &["public.live", "public.big"], WAIT)
        .await?;
    nothing_staged(&dst).await?;
    let logs = setup.logs();
    assert!(
        logs.contains("cut short"),
        "the sender abandoned the join: {logs}"
    );
    Ok(())
}

/// A receiver added once the spool has deleted records gets its copy as a
/// join made for it alone (chunks addressed to it, placeholders for the
/// others). The sender dies mid-join: the new branch applies what it was
/// sent, then a new copy owed to it, which drops the abandoned join.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_new_receiver_s_join_cut_short_by_kill_9_of_the_sender_is_owed_a_new_copy(
) -> anyhow::Result<()> {
    let link = pgcourier_netem::Profile::by_name("3g")
        .context("3g profile")?
        .link(47);
    let mut setup = Setup::start(
        "join-owed",
        Options {
            branches: 2,
            schema: SCHEMA,
            source_sql: BIG_ROWS,
            link: Some(link),
            ..Options::default()
        },
    )
    .await?;
    let removed = setup.remove_branch(1)?;
    let src = setup.source().await?;
    for i in 1..=200 {
        src.batch_execute(&format!("INSERT INTO live VALUES ({i}, 'before')"))
            .await?;
    }
    setup.wait_equal(0, &["public.live"], WAIT).await?;
    wait_until("the spool deleted what branch0 applied", WAIT, || async {
        let st = crate::copy::status(&setup.sender_config)?;
        Ok(st["first_seq"].as_u64().unwrap_or(0) > 1)
    })
    .await?;
    setup.sender.terminate()?;
    setup.add_back_as(&removed, 1, "branch9")?;
    setup.restart_sender()?;
    setup.restart_receiver(1)?;
    let writes = Writer::start(&setup).await?;
    let dst = setup.target(1).await?;
    staged_past(&setup, &dst, 0).await?;
    setup.sender.kill9()?;
    setup.restart_sender()?;
    writes.stop().await?;
    for i in [0, 1] {
        setup
            .wait_equal(i, &["public.live", "public.big"], WAIT)
            .await?;
    }
    nothing_staged(&dst).await?;
    let logs = setup.logs();
    assert!(
        logs.contains("cut short"),
        "the sender abandoned the join: {logs}"
    );
    // Branch 0 loaded the initial copy and nothing else: the new branch's
    // chunks reached it as placeholders.
    let branch0 = setup.branches[0].receiver.log();
    assert_eq!(branch0.matches("loading a table copy").count(), 1, "{logs}");
    assert!(!branch0.contains("join started"), "{logs}");
    Ok(())
}

/// A schema change to the joining table while it loads: a column dropped
/// at the source (and, through DDL replication, at the branch). The join is
/// abandoned and copied again when the sender sees the table's new shape
/// first, or its end leaves the column out when the end comes first;
/// either way the branch ends up equal.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_column_dropped_while_its_table_joins_leaves_the_branch_equal() -> anyhow::Result<()> {
    let setup = start("join-ddl", 53).await?;
    let src = setup.source().await?;
    let dst = setup.target(0).await?;
    let writes = Writer::start(&setup).await?;
    src.batch_execute("ALTER PUBLICATION pgcourier ADD TABLE big")
        .await?;
    staged_past(&setup, &dst, 0).await?;
    src.batch_execute("ALTER TABLE big DROP COLUMN spare")
        .await?;
    tokio::time::sleep(Duration::from_secs(2)).await;
    writes.stop().await?;
    setup
        .wait_equal(0, &["public.live", "public.big"], WAIT)
        .await?;
    nothing_staged(&dst).await?;
    Ok(())
}
