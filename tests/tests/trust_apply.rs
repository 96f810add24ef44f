//! Issue 12, the receiver's side of trust: apply refuses records that do not
//! follow one another (a transaction spooled twice is never applied twice),
//! a corrupt record already applied never lowers the inbox below what the
//! sender was told, a transaction larger than `inbox-max-bytes` still
//! arrives, and row values never reach the log or `/status`.

use std::time::Duration;

use anyhow::Context;
use pgcourier_proto::record::Record;
use pgcourier_tests::wait_until;

use crate::fixture::{admin_status as status, free_tcp_port, wait_count, Options, Setup};

const WAIT: Duration = Duration::from_secs(120);

fn leak(s: String) -> &'static str {
    Box::leak(s.into_boxed_str())
}

async fn count(client: &tokio_postgres::Client, sql: &str) -> anyhow::Result<i64> {
    Ok(client.query_one(sql, &[]).await?.get(0))
}

/// The capture bug of item 1, planted in the inbox: the transactions waiting
/// there appended again at new seqs. The originals are applied once; the
/// copies are refused (`out_of_order`), never applied.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_transaction_spooled_twice_is_refused_out_of_order_and_never_applied_twice(
) -> anyhow::Result<()> {
    let admin = free_tcp_port();
    let mut setup = Setup::start(
        "dupapply",
        Options {
            schema: "CREATE TABLE k (v integer)",
            receiver_extra: leak(format!("admin = \"127.0.0.1:{admin}\"")),
            ..Options::default()
        },
    )
    .await?;
    let src = setup.source().await?;
    let dst = setup.target(0).await?;
    src.batch_execute("INSERT INTO k VALUES (0)").await?;
    wait_count(&dst, "SELECT count(*) FROM k", 1, WAIT)
        .await
        .with_context(|| setup.logs())?;
    // Hold records in the inbox: apply pauses on a missing table.
    dst.batch_execute("ALTER TABLE k RENAME TO k_away").await?;
    for i in 1..=3 {
        src.batch_execute(&format!(
            "INSERT INTO k SELECT {i} FROM generate_series(1, 2)"
        ))
        .await?;
    }
    wait_until("3 transactions to wait in the inbox", WAIT, || async {
        let st = status(admin).await?;
        let durable = st["durable_seq"].as_u64().unwrap_or(0);
        let applied = st["applied_seq"].as_u64().unwrap_or(0);
        Ok(durable >= applied + 3 && st["apply_state"] == "paused")
    })
    .await
    .with_context(|| setup.logs())?;
    setup.branches[0].receiver.terminate()?;
    let inbox_dir = setup.dir.path().join("branch0-inbox");
    {
        let store = pgcourier_common::store::durable::Store::open(&inbox_dir, 1 << 20)?;
        let records =
            pgcourier_common::store::segments::SegmentLog::open(&store, "segments", None, None)?;
        let meta = store.tree("meta")?;
        let first = records.first_seq()?.context("records in the inbox")?;
        let waiting: Vec<Record> = records
            .read(first, u64::MAX, usize::MAX)?
            .iter()
            .map(|v| Ok(Record::decode(v)?))
            .collect::<anyhow::Result<_>>()?;
        let durable = waiting.last().context("records in the inbox")?.seq;
        for (i, r) in waiting.iter().enumerate() {
            let mut again = r.clone();
            again.seq = durable + 1 + i as u64;
            records.append(again.seq, &again.encode()?)?;
        }
        records.write_pending()?;
        let top = durable + waiting.len() as u64;
        meta.insert("durable_seq", &top.to_be_bytes())?;
        store.sync()?;
        eprintln!(
            "planted records {}..={top}, copies of {}..={durable}",
            durable + 1,
            waiting[0].seq
        );
    }
    dst.batch_execute("ALTER TABLE k_away RENAME TO k").await?;
    // Apply alone: the sender (which never had records past 5) stays away.
    setup.sender.terminate()?;
    setup.restart_receiver(0)?;
    wait_until(
        "apply to refuse the copies, or apply them",
        WAIT,
        || async {
            let st = status(admin).await?;
            Ok(
                st["error_class"] == "out_of_order" && st["apply_state"] == "paused"
                    || count(&dst, "SELECT count(*) FROM k").await? >= 10,
            )
        },
    )
    .await
    .with_context(|| setup.logs())?;
    let st = status(admin).await?;
    eprintln!("last_error: {}", st["last_error"]);
    let rows = count(&dst, "SELECT count(*) FROM k").await?;
    anyhow::ensure!(
        rows == 7 && st["error_class"] == "out_of_order",
        "the originals are applied once, the copies never: {rows} rows, status {st}\n{}",
        setup.logs()
    );
    anyhow::ensure!(
        st["last_error"]
            .as_str()
            .unwrap_or("")
            .contains("out of order"),
        "{st}"
    );
    Ok(())
}

/// Item 8: a corrupt record at or below the progress row (applied, back
/// after a crash undid its delete) is dropped; the inbox never goes below
/// what the sender was told is applied, so replication goes on.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_corrupt_record_already_applied_is_dropped_and_replication_goes_on() -> anyhow::Result<()>
{
    let admin = free_tcp_port();
    let mut setup = Setup::start(
        "corruptapplied",
        Options {
            schema: "CREATE TABLE k (v integer PRIMARY KEY)",
            receiver_extra: leak(format!("admin = \"127.0.0.1:{admin}\"")),
            ..Options::default()
        },
    )
    .await?;
    let src = setup.source().await?;
    for i in 1..=5 {
        src.batch_execute(&format!("INSERT INTO k VALUES ({i})"))
            .await?;
    }
    setup.wait_equal(0, &["public.k"], WAIT).await?;
    // Wait for the sender to hear it is applied (and trim behind it).
    wait_until("the inbox to be applied and empty", WAIT, || async {
        let st = status(admin).await?;
        let applied = st["applied_seq"].as_u64().unwrap_or(0);
        Ok(applied > 0 && applied == st["durable_seq"].as_u64().unwrap_or(0))
    })
    .await?;
    let applied = status(admin).await?["applied_seq"].as_u64().unwrap_or(0);
    tokio::time::sleep(Duration::from_secs(2)).await;
    setup.branches[0].receiver.terminate()?;
    {
        // The last applied record back, corrupt.
        let store = pgcourier_common::store::durable::Store::open(
            &setup.dir.path().join("branch0-inbox"),
            1 << 20,
        )?;
        let records =
            pgcourier_common::store::segments::SegmentLog::open(&store, "segments", None, None)?;
        records.put_back(applied, &[0x5a; 40])?;
        store.sync()?;
    }
    setup.restart_receiver(0)?;
    for i in 6..=8 {
        src.batch_execute(&format!("INSERT INTO k VALUES ({i})"))
            .await?;
    }
    setup.wait_equal(0, &["public.k"], WAIT).await?;
    let st = status(admin).await?;
    anyhow::ensure!(st["apply_state"] == "applying", "{st}");
    Ok(())
}

/// Item 6: one transaction larger than `inbox-max-bytes` (a 64 KiB inbox,
/// a 2 MB transaction) still arrives and is applied.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_transaction_larger_than_inbox_max_bytes_is_applied() -> anyhow::Result<()> {
    let setup = Setup::start(
        "bigtxn",
        Options {
            schema: "CREATE TABLE big (id integer PRIMARY KEY, pad text)",
            receiver_extra: "inbox-max-bytes = \"64KiB\"",
            ..Options::default()
        },
    )
    .await?;
    let src = setup.source().await?;
    src.batch_execute(
        "INSERT INTO big SELECT i, repeat(md5(i::text), 3) FROM generate_series(1, 20000) i",
    )
    .await?;
    src.batch_execute("INSERT INTO big VALUES (0, 'after')")
        .await?;
    setup.wait_equal(0, &["public.big"], WAIT).await
}

/// Item 11: a unique violation's DETAIL (`Key (email)=(...)`) never reaches
/// the receiver's log or `/status`; the constraint and table names do.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn row_values_of_a_target_error_reach_neither_the_log_nor_status() -> anyhow::Result<()> {
    let admin = free_tcp_port();
    let setup = Setup::start(
        "novalues",
        Options {
            schema: "CREATE TABLE users (id integer PRIMARY KEY, email text CONSTRAINT users_email_key UNIQUE)",
            receiver_extra: leak(format!("admin = \"127.0.0.1:{admin}\"")),
            ..Options::default()
        },
    )
    .await?;
    let src = setup.source().await?;
    let dst = setup.target(0).await?;
    const SECRET: &str = "zebra-4417@secret.example";
    dst.batch_execute(&format!("INSERT INTO users VALUES (100, '{SECRET}')"))
        .await?;
    src.batch_execute(&format!("INSERT INTO users VALUES (1, '{SECRET}')"))
        .await?;
    wait_until("apply to pause on the unique violation", WAIT, || async {
        let st = status(admin).await?;
        Ok(st["error_class"] == "unique_violation" && st["apply_state"] == "paused")
    })
    .await
    .with_context(|| setup.logs())?;
    let st = status(admin).await?;
    let last_error = st["last_error"].as_str().unwrap_or("").to_owned();
    eprintln!("last_error: {last_error}");
    let log = setup.branches[0].receiver.log();
    anyhow::ensure!(
        !last_error.contains("zebra") && !log.contains("zebra"),
        "a row value reached the status or the log:\nstatus: {last_error}\nlog:\n{log}"
    );
    anyhow::ensure!(
        last_error.contains("users_email_key") && last_error.contains("23505"),
        "the error keeps the constraint and SQLSTATE: {last_error}"
    );
    dst.batch_execute("DELETE FROM users WHERE id = 100")
        .await?;
    setup.wait_equal(0, &["public.users"], WAIT).await
}
