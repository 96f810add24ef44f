//! Issue 12, item 2: a spool has an identity, and a receiver that holds
//! records of one spool is never resumed by another. Record numbers name
//! transactions only within one spool: a new spool-dir numbers its own
//! transactions from 1, so a receiver holding N records of the old spool,
//! admitted by the new one once it reaches N, would silently never get what
//! the new spool holds at or below N. (A new spool-dir on the *same* slot is
//! stopped earlier, at capture start-up, by the slot check of
//! `trust_capture`; here the sender side is rebuilt whole, slot included,
//! which only the spool identity can tell.)

use std::time::Duration;

use anyhow::Context;
use pgcourier_tests::{read_from, wait_until};

use crate::fixture::{Options, Setup};

const WAIT: Duration = Duration::from_secs(120);

const SCHEMA: &str = "CREATE TABLE t (id integer PRIMARY KEY, v text);";

async fn insert_one_by_one(
    setup: &Setup,
    ids: std::ops::RangeInclusive<i32>,
) -> anyhow::Result<()> {
    let src = setup.source().await?;
    for id in ids {
        // One transaction each: one record each in the spool.
        src.execute("INSERT INTO t VALUES ($1, 'row')", &[&id])
            .await
            .context("insert a source row")?;
    }
    Ok(())
}

async fn count(client: &tokio_postgres::Client) -> anyhow::Result<i64> {
    Ok(client
        .query_one("SELECT count(*) FROM t", &[])
        .await?
        .get(0))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_receiver_is_refused_by_a_sender_whose_spool_was_replaced_and_re_syncs_from_an_empty_inbox(
) -> anyhow::Result<()> {
    let mut setup = Setup::start(
        "spool-identity",
        Options {
            schema: SCHEMA,
            tables: &["public.t"],
            ..Options::default()
        },
    )
    .await?;
    // Spool A: the copy, then 20 one-row transactions; the branch holds them.
    insert_one_by_one(&setup, 1..=20).await?;
    setup
        .wait_equal(0, &["t"], WAIT)
        .await
        .context("the branch to hold spool A's rows")?;

    // The branch goes away for a while; meanwhile headquarters rebuilds its
    // side (a lost disk: new spool-dir, the slot dropped and made again),
    // and the new spool captures more than the branch holds.
    setup.branches[0].receiver.terminate()?;
    setup.sender.terminate()?;
    let src = setup.source().await?;
    wait_until("the old sender's slot to be released", WAIT, || async {
        Ok(src
            .query_one(
                "SELECT count(*) = 0 FROM pg_replication_slots WHERE slot_name = 'pgcourier' AND active",
                &[],
            )
            .await?
            .get::<_, bool>(0))
    })
    .await?;
    src.execute("SELECT pg_drop_replication_slot('pgcourier')", &[])
        .await
        .context("drop the old slot")?;
    let cfg = std::fs::read_to_string(&setup.sender_config)?;
    anyhow::ensure!(cfg.contains("spool-dir = \"spool\""), "sender.toml: {cfg}");
    std::fs::write(
        &setup.sender_config,
        cfg.replace("spool-dir = \"spool\"", "spool-dir = \"spool-b\""),
    )?;
    let sender_log = setup.sender.log_path().to_path_buf();
    let (_, sender_from) = read_from(&sender_log, 0)?;
    setup.restart_sender()?;
    // Spool B starts with a copy of the table (rows 1-20), then one record
    // per transaction.
    wait_until("spool B to spool its initial copy", WAIT, || async {
        Ok(read_from(&sender_log, sender_from)?
            .0
            .contains("copy spooled"))
    })
    .await
    .with_context(|| setup.logs())?;
    insert_one_by_one(&setup, 21..=100).await?;
    let src = setup.source().await?;
    let lsn: String = src
        .query_one("SELECT pg_current_wal_insert_lsn()::text", &[])
        .await?
        .get(0);
    wait_until("spool B to hold every source row (slot confirmed)", WAIT, || async {
        let done: Option<bool> = src
            .query_one(
                &format!("SELECT bool_and(confirmed_flush_lsn >= '{lsn}'::pg_lsn) FROM pg_replication_slots WHERE slot_type = 'logical'"),
                &[],
            )
            .await?
            .get(0);
        Ok(done == Some(true))
    })
    .await
    .with_context(|| setup.logs())?;

    // The branch comes back, holding fewer records of spool A than spool B
    // now holds: record numbers alone admit it.
    let receiver_log = setup.branches[0].receiver.log_path().to_path_buf();
    let (_, receiver_from) = read_from(&receiver_log, 0)?;
    setup.restart_receiver(0)?;
    let dst = setup.target(0).await?;
    wait_until(
        "the new spool to refuse the branch, or the branch to receive spool B's last row",
        WAIT,
        || async {
            let (rlog, _) = read_from(&receiver_log, receiver_from)?;
            let last: i64 = dst
                .query_one("SELECT count(*) FROM t WHERE id = 100", &[])
                .await?
                .get(0);
            Ok(rlog.contains("sender refused") || last == 1)
        },
    )
    .await
    .with_context(|| setup.logs())?;
    let (rlog, _) = read_from(&receiver_log, receiver_from)?;
    let (slog, _) = read_from(&sender_log, sender_from)?;
    let held = count(&dst).await?;
    let refusal = rlog
        .lines()
        .find(|l| l.contains("sender refused"))
        .unwrap_or("none: the branch was admitted");
    anyhow::ensure!(
        refusal.contains("sender refused: the receiver's inbox holds records of spool"),
        "the branch was not refused for holding records of another spool (refusal: {refusal}); \
         it now holds {held} of the source's 100 rows and nothing says any are missing\n{}",
        setup.logs()
    );
    anyhow::ensure!(
        slog.contains("refused the receiver: the receiver's inbox holds records of spool")
            && slog.contains("Re-seed this branch"),
        "the sender did not say why it refused the branch and how to re-seed it:\n{}",
        setup.logs()
    );
    anyhow::ensure!(held == 20, "the refused branch changed: {held} rows");
    eprintln!("refusal: {refusal}");

    // The way out the refusal names: an empty inbox-dir, and the sender
    // restarted (it stopped dialing the branch). Spool B still holds its
    // first record (its copy), so the branch re-syncs from it.
    setup.branches[0].receiver.terminate()?;
    setup.sender.terminate()?;
    let inbox = setup.dir.path().join("branch0-inbox");
    std::fs::rename(&inbox, setup.dir.path().join("branch0-inbox.spool-a"))
        .context("move the inbox-dir aside")?;
    setup.restart_sender()?;
    setup.restart_receiver(0)?;
    setup.wait_equal(0, &["t"], WAIT).await?;
    Ok(())
}
