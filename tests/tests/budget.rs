//! A link's budget: a receiver capped by `max-rate` gets no more than the
//! cap, measured at netem's relay (QUIC's headers and acknowledgements
//! included), and loses nothing.

use std::time::{Duration, Instant};

use anyhow::Context;
use pgcourier_netem::Profile;
use pgcourier_tests::wait_until;

use crate::fixture::{Options, Setup};

const SCHEMA: &str = "CREATE TABLE blob (id int PRIMARY KEY, b bytea NOT NULL);";

/// 600 rows of 10 KiB of random bytes (zstd cannot shrink them below their
/// raw size: about 6 MB on the wire).
const ROWS: &str = "INSERT INTO blob SELECT g, (SELECT string_agg(decode(md5(random()::text || g || i), 'hex'), '') \
                    FROM generate_series(1, 640) i) FROM generate_series(1, 600) g";

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_receiver_capped_by_max_rate_gets_the_cap_and_loses_nothing() -> anyhow::Result<()> {
    // 4 Mbit/s = 500 kB/s, far below what loopback carries.
    let cap = 4_000_000.0 / 8.0;
    let link = Profile::by_name("clean").context("netem profile clean")?.link(1);
    let setup = Setup::start(
        "max_rate",
        Options {
            schema: SCHEMA,
            receiver_entry_extra: "max-rate = \"4Mbit\"",
            link: Some(link),
            ..Options::default()
        },
    )
    .await?;
    setup.hq.execute(crate::fixture::DB, ROWS).await?;
    // The relay's count of the sender's bytes toward the receiver.
    let sent = || setup.relays[0].stats().forward.bytes_forwarded;
    let start = sent();
    // Past the start (the burst a pacer allows after an idle spell), then
    // 4 MB later: the rate in between.
    let (from, to) = (start + 1_000_000, start + 5_000_000);
    let mut marks: Vec<Instant> = Vec::new();
    wait_until("the relay to carry 5 MB", Duration::from_secs(120), || {
        let n = sent();
        if n >= from && marks.is_empty() {
            marks.push(Instant::now());
        }
        if n >= to && marks.len() == 1 {
            marks.push(Instant::now());
        }
        let done = marks.len() == 2;
        async move { Ok(done) }
    })
    .await
    .with_context(|| setup.logs())?;
    let secs = (marks[1] - marks[0]).as_secs_f64();
    let rate = (to - from) as f64 / secs;
    eprintln!(
        "max-rate 4Mbit: 4 MB in {secs:.2} s, {:.0} kbit/s",
        rate * 8.0 / 1000.0
    );
    assert!(
        (rate - cap).abs() <= cap * 0.05,
        "the relay carried {:.0} kbit/s under a cap of 4000 kbit/s",
        rate * 8.0 / 1000.0
    );
    setup
        .wait_equal(0, &["public.blob"], Duration::from_secs(120))
        .await?;
    // The cap is in the sender's status.
    let status = crate::copy::status(&setup.sender_config)?;
    assert_eq!(
        status["receivers"][0]["link"]["max_rate_bits_per_sec"], 4_000_000,
        "{status}"
    );
    Ok(())
}
