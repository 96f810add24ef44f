//! Replication across emulated bad links (netem's UDP relay between the
//! sender and the receiver): profiles, commanded outages (one longer than
//! the QUIC idle timeout), and an outage in the middle of a large
//! transaction. Every test ends row for row identical with each source row
//! change applied exactly once.

use std::time::Duration;

use anyhow::Context;
use pgcourier_netem::Profile;
use pgcourier_tests::wait_until;

use crate::fixture::{Options, Setup};
use crate::replication::{acct_transactions, assert_applied_exactly_once, ACCT_SCHEMA};

/// Short link timers so that a test outage can outlast the idle timeout.
const TIMERS: &str = "idle-timeout = \"4s\"\nkeep-alive = \"1s\"";
const IDLE_TIMEOUT: Duration = Duration::from_secs(4);
const WAIT: Duration = Duration::from_secs(300);

async fn setup(name: &str, profile: &str, seed: u64) -> anyhow::Result<Setup> {
    let link = Profile::by_name(profile)
        .with_context(|| format!("netem profile {profile}"))?
        .link(seed);
    eprintln!("{name}: netem profile {profile}, seed {seed}");
    Setup::start(
        name,
        Options {
            schema: ACCT_SCHEMA,
            tables: &["public.acct"],
            sender_extra: TIMERS,
            receiver_extra: TIMERS,
            link: Some(link),
            ..Options::default()
        },
    )
    .await
}

async fn applied(setup: &Setup) -> anyhow::Result<i64> {
    Ok(setup
        .target(0)
        .await?
        .query_one("SELECT count(*) FROM audit.log", &[])
        .await?
        .get(0))
}

/// A workload with two outages: a short one, and one longer than the idle
/// timeout, both while transactions keep committing on the source.
async fn workload_with_outages(profile: &str, seed: u64) -> anyhow::Result<()> {
    let setup = setup(&format!("link-{profile}"), profile, seed).await?;
    let writer = {
        let src = setup.source().await?;
        tokio::spawn(async move {
            for chunk in 0..6 {
                acct_transactions(&src, 1 + chunk * 250, 250).await?;
                tokio::time::sleep(Duration::from_millis(700)).await;
            }
            anyhow::Ok(())
        })
    };
    wait_until("the first changes to cross the link", WAIT, || async {
        Ok(applied(&setup).await? > 20)
    })
    .await
    .with_context(|| setup.logs())?;
    let src = setup.source().await?;
    let dst = setup.target(0).await?;
    for (k, outage) in [
        Duration::from_secs(2),
        IDLE_TIMEOUT + Duration::from_secs(3),
    ]
    .into_iter()
    .enumerate()
    {
        setup.relays[0].set_down(true);
        tokio::time::sleep(outage).await;
        setup.relays[0].set_down(false);
        // Work committed after the link came back must cross it.
        let from = 10_000 + 100 * k as i32;
        acct_transactions(&src, from, 20).await?;
        let sql = format!(
            "SELECT count(*) FROM acct WHERE id BETWEEN {from} AND {}",
            from + 99
        );
        crate::fixture::wait_count(&dst, &sql, 1, WAIT)
            .await
            .with_context(|| setup.logs())?;
    }
    writer.await??;
    setup.wait_equal(0, &["public.acct"], WAIT).await?;
    assert_applied_exactly_once(&setup, 0).await?;
    eprintln!(
        "{profile}: link stats {}",
        serde_json::to_string(&setup.relays[0].stats())?
    );
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn replication_over_dsl_with_outages_loses_and_doubles_nothing() -> anyhow::Result<()> {
    workload_with_outages("dsl", 11).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn replication_over_3g_with_outages_loses_and_doubles_nothing() -> anyhow::Result<()> {
    workload_with_outages("3g", 12).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn replication_over_satellite_with_outages_loses_and_doubles_nothing() -> anyhow::Result<()> {
    workload_with_outages("satellite", 13).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn replication_over_a_lossy_link_with_outages_loses_and_doubles_nothing() -> anyhow::Result<()>
{
    workload_with_outages("lossy", 14).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_outage_longer_than_the_idle_timeout_in_the_middle_of_a_100k_row_transaction_resumes(
) -> anyhow::Result<()> {
    let setup = setup("link-bigtxn", "satellite", 21).await?;
    let src = setup.source().await?;
    acct_transactions(&src, 1, 50).await?;
    let start = setup.relays[0].stats().forward.bytes_forwarded;
    src.batch_execute(
        "INSERT INTO acct SELECT g, g, 'bulk ' || g FROM generate_series(1000001, 1100000) g",
    )
    .await?;
    // Cut the link once part of the transaction has crossed it.
    wait_until("the large transaction to be on its way", WAIT, || async {
        Ok(setup.relays[0].stats().forward.bytes_forwarded > start + 200_000)
    })
    .await
    .with_context(|| setup.logs())?;
    setup.relays[0].set_down(true);
    tokio::time::sleep(IDLE_TIMEOUT + Duration::from_secs(3)).await;
    let dst = setup.target(0).await?;
    let partial: i64 = dst
        .query_one("SELECT count(*) FROM acct WHERE id > 1000000", &[])
        .await?
        .get(0);
    anyhow::ensure!(
        partial == 0,
        "the branch shows part of a transaction ({partial} of 100000 rows)"
    );
    setup.relays[0].set_down(false);
    acct_transactions(&src, 51, 50).await?;
    setup.wait_equal(0, &["public.acct"], WAIT).await?;
    assert_applied_exactly_once(&setup, 0).await?;
    eprintln!(
        "satellite big transaction: link stats {}",
        serde_json::to_string(&setup.relays[0].stats())?
    );
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn replication_over_a_flaky_link_with_scheduled_outages_loses_and_doubles_nothing(
) -> anyhow::Result<()> {
    // The `flaky` profile (down 30 s every 2 min) with its schedule shortened
    // to fit a test: down 5 s (longer than the idle timeout) every 9 s.
    let mut link = Profile::by_name("flaky").context("flaky profile")?.link(15);
    let schedule = pgcourier_netem::OutageSchedule::starting_up(
        Duration::from_secs(9),
        Duration::from_secs(5),
    );
    link.forward.outage = Some(schedule);
    link.back.outage = Some(schedule);
    let setup = Setup::start(
        "link-flaky",
        Options {
            schema: ACCT_SCHEMA,
            tables: &["public.acct"],
            sender_extra: TIMERS,
            receiver_extra: TIMERS,
            link: Some(link),
            ..Options::default()
        },
    )
    .await?;
    let src = setup.source().await?;
    for chunk in 0..10 {
        acct_transactions(&src, 1 + chunk * 100, 100).await?;
        tokio::time::sleep(Duration::from_millis(1500)).await;
    }
    setup.wait_equal(0, &["public.acct"], WAIT).await?;
    assert_applied_exactly_once(&setup, 0).await?;
    let stats = setup.relays[0].stats();
    anyhow::ensure!(
        stats.forward.dropped.outage > 0,
        "the scheduled outages dropped nothing: the test proved nothing"
    );
    Ok(())
}
