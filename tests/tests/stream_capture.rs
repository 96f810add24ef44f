//! Issue 13: capture streams the slot (START_REPLICATION, capture/stream.rs)
//! instead of peeking it. What a DBA sees and relies on: the sender is an
//! active walsender in `pg_stat_replication` with its slot `active`, and a
//! publication that is quiet while the rest of the database writes does not
//! make the source keep WAL for the slot.

use std::time::Duration;

use pgcourier_proto::Lsn;
use pgcourier_tests::wait_until;

use crate::fixture::{Options, Setup};

const WAIT: Duration = Duration::from_secs(60);

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_sender_is_an_active_walsender_and_a_quiet_publication_keeps_no_wal(
) -> anyhow::Result<()> {
    let setup = Setup::start(
        "stream-quiet",
        Options {
            schema: "CREATE TABLE published (id int PRIMARY KEY, v text);
                     CREATE TABLE other (id int PRIMARY KEY, v text);",
            tables: &["public.published"],
            wait_for_copy: true,
            ..Options::default()
        },
    )
    .await?;
    let src = setup.hq.client("postgres").await?;
    src.batch_execute("INSERT INTO published VALUES (1, 'one')")
        .await?;
    let dst = setup.target(0).await?;
    pgcourier_tests::wait_tables_equal(&src, &dst, &["public.published"], WAIT).await?;

    let row = src
        .query_one(
            "SELECT (SELECT count(*) FROM pg_stat_replication r
                       JOIN pg_replication_slots s ON s.active_pid = r.pid
                      WHERE s.slot_name = 'pgcourier'),
                    (SELECT active FROM pg_replication_slots WHERE slot_name = 'pgcourier')",
            &[],
        )
        .await?;
    anyhow::ensure!(
        row.get::<_, i64>(0) == 1 && row.get::<_, bool>(1),
        "the sender is not an active walsender on its slot: pg_stat_replication rows {}, active {}\n{}",
        row.get::<_, i64>(0),
        row.get::<_, bool>(1),
        setup.logs()
    );

    // Only an unpublished table writes: about 8 MB of WAL the publication
    // never sees. The slot must be confirmed past all of it.
    for _ in 0..4 {
        src.batch_execute(
            "INSERT INTO other SELECT g, repeat('x', 200) FROM generate_series(1, 20000) g;
             DELETE FROM other;",
        )
        .await?;
    }
    let written: String = src
        .query_one("SELECT pg_current_wal_insert_lsn()::text", &[])
        .await?
        .get(0);
    let written: Lsn = written.parse()?;
    wait_until(
        "the slot's confirmed_flush_lsn to pass the unpublished writes",
        WAIT,
        || {
            let src = &src;
            async move {
                let lsn: String = src
                    .query_one(
                        "SELECT confirmed_flush_lsn::text FROM pg_replication_slots WHERE slot_name = 'pgcourier'",
                        &[],
                    )
                    .await?
                    .get(0);
                Ok(lsn.parse::<Lsn>()? >= written)
            }
        },
    )
    .await
    .map_err(|e| e.context(setup.logs()))?;

    // And the stream still carries the publication afterwards.
    src.batch_execute("INSERT INTO published VALUES (2, 'two')")
        .await?;
    pgcourier_tests::wait_tables_equal(&src, &dst, &["public.published"], WAIT).await?;
    Ok(())
}
