//! Issue 12, item 5, end to end: a copy cut that lands exactly on a WAL page
//! boundary. `pg_current_wal_insert_lsn()` then points just past the next
//! page's header (L = page start + 24, or + 40 at a segment start), and a
//! peek with `upto_lsn = L` also decodes the commit that *starts* at L. That
//! transaction is not in the copy's snapshot: it must be spooled after the
//! copy (commit LSN L − 1), or apply skips the whole copy.
//!
//! The recipe (every step checked, the whole attempt repeated a bounded
//! number of times when other WAL activity spoiled it):
//! 1. `a` is published and replicated; `b<k>` is not published yet and has
//!    rows.
//! 2. Session X opens a transaction with an insert into `a` (its commit
//!    record is then the only record it still has to write).
//! 3. Session W opens a transaction with an insert into `b<k>`.
//! 4. `b<k>` joins the publication: the sender's cut waits for W on
//!    `LOCK TABLE b<k> IN SHARE MODE` (seen in `pg_locks`).
//! 5. A non-transactional logical message pads the WAL so that W's commit
//!    record, measured beforehand on an identical transaction, ends exactly
//!    at the end of a page; W commits; the insert position is the page start
//!    plus its header.
//! 6. The sender's snapshot session reads L (its log says where); X commits:
//!    its commit record starts at L (pg_waldump says so).
//! 7. The branch gets every row of `b<k>` and X's row.

use std::process::Command;
use std::time::Duration;

use anyhow::{bail, Context};
use pgcourier_proto::Lsn;
use pgcourier_tests::{pg_bindir, wait_until};
use tokio_postgres::Client;

use crate::fixture::{Options, Setup};

const WAIT: Duration = Duration::from_secs(120);
/// Attempts at landing the cut on a boundary (the checkpointer, the
/// background writer's standby snapshots or a page prune can write WAL at
/// the wrong moment).
const ATTEMPTS: usize = 5;
const PAGE: u64 = 8192;
const SHORT_HEADER: u64 = 24;
const LONG_HEADER: u64 = 40;
/// Rows each `b<k>` holds before it joins the publication.
const B_ROWS: i64 = 500;
/// Payload of the logical message used to measure a message's WAL size.
const PROBE_PAYLOAD: u64 = 2000;

/// WAL positions as PostgreSQL's insert position counts them: bytes of
/// records only, page headers left out (xlog.c's XLogRecPtrToBytePos).
struct Wal {
    segment: u64,
}

impl Wal {
    fn header(&self, page_start: u64) -> u64 {
        if page_start.is_multiple_of(self.segment) {
            LONG_HEADER
        } else {
            SHORT_HEADER
        }
    }

    /// Usable bytes before `lsn` (a position past a page header).
    fn usable(&self, lsn: u64) -> u64 {
        let per_segment =
            (self.segment / PAGE) * (PAGE - SHORT_HEADER) - (LONG_HEADER - SHORT_HEADER);
        let (seg, off) = (lsn / self.segment, lsn % self.segment);
        let (page, in_page) = (off / PAGE, off % PAGE);
        let within = if page == 0 {
            in_page - LONG_HEADER
        } else {
            (PAGE - LONG_HEADER) + (page - 1) * (PAGE - SHORT_HEADER) + in_page - SHORT_HEADER
        };
        seg * per_segment + within
    }
}

async fn insert_lsn(c: &Client) -> anyhow::Result<u64> {
    let text: String = c
        .query_one("SELECT pg_current_wal_insert_lsn()::text", &[])
        .await?
        .get(0);
    Ok(text.parse::<Lsn>()?.0)
}

/// WAL bytes (usable) that `step` writes; the smallest of three tries, so
/// that a record someone else wrote meanwhile does not count.
async fn measure(wal: &Wal, c: &Client, before: &str, step: &str) -> anyhow::Result<u64> {
    let mut best = u64::MAX;
    for _ in 0..3 {
        c.batch_execute(before).await?;
        let from = insert_lsn(c).await?;
        c.batch_execute(step).await?;
        let to = insert_lsn(c).await?;
        best = best.min(wal.usable(to) - wal.usable(from));
    }
    Ok(best)
}

/// The first record pg_waldump finds at `lsn`: its line.
fn waldump_at(setup: &Setup, lsn: u64) -> anyhow::Result<String> {
    let out = Command::new(pg_bindir()?.join("pg_waldump"))
        .arg("-p")
        .arg(setup.hq.data_dir().join("pg_wal"))
        .args(["-s", &Lsn(lsn).to_string(), "-n", "1"])
        .output()
        .context("run pg_waldump")?;
    Ok(format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    ))
}

/// The LSN of a pg_waldump record line (`lsn: 0/0157E018,`).
fn waldump_lsn(line: &str) -> Option<u64> {
    let rest = &line[line.find("lsn: ")? + 5..];
    let text = rest.split(',').next()?.trim();
    text.parse::<Lsn>().ok().map(|l| l.0)
}

/// The cut LSNs the sender logged, in order.
fn logged_cuts(log: &str) -> Vec<u64> {
    log.lines()
        .filter(|l| l.contains("copy cut taken"))
        .filter_map(|l| {
            let rest = &l[l.find("cut=")? + 4..];
            let text = rest.split_whitespace().next()?;
            text.trim_matches('"').parse::<Lsn>().ok().map(|l| l.0)
        })
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_copy_cut_on_a_wal_page_boundary_keeps_the_transaction_committing_there_after_the_copy(
) -> anyhow::Result<()> {
    let mut schema = String::from(
        "CREATE TABLE a (id integer PRIMARY KEY, v text);\
         CREATE TABLE cal (v text);",
    );
    let mut rows = String::from("INSERT INTO a SELECT g, 'a' || g FROM generate_series(1, 10) g;");
    for k in 1..=ATTEMPTS {
        schema.push_str(&format!(
            "CREATE TABLE b{k} (id integer PRIMARY KEY, v text);"
        ));
        rows.push_str(&format!(
            "INSERT INTO b{k} SELECT g, 'b{k} ' || g FROM generate_series(1, {B_ROWS}) g;"
        ));
    }
    let setup = Setup::start(
        "trust-cut",
        Options {
            schema: &schema,
            source_sql: &rows,
            tables: &["public.a"],
            // The cut waits for W while the test pads the WAL.
            sender_extra: "copy-lock-wait = \"60s\"",
            ..Options::default()
        },
    )
    .await?;
    let admin = setup.source().await?;
    // Fewer writers of WAL besides the test: no autovacuum, no timed
    // checkpoint during the test.
    admin
        .batch_execute("ALTER SYSTEM SET autovacuum = off")
        .await?;
    admin
        .batch_execute("ALTER SYSTEM SET checkpoint_timeout = '1d'")
        .await?;
    admin.batch_execute("SELECT pg_reload_conf()").await?;
    let segment: i64 = admin
        .query_one(
            "SELECT setting::bigint FROM pg_settings WHERE name = 'wal_segment_size'",
            &[],
        )
        .await?
        .get(0);
    let wal = Wal {
        segment: segment as u64,
    };
    anyhow::ensure!(
        wal.segment.is_multiple_of(PAGE),
        "wal_segment_size {segment}"
    );
    setup.wait_equal(0, &["public.a"], WAIT).await?;

    // The size of W's commit record, and of a padding message.
    let cal = setup.source().await?;
    let commit_size = measure(&wal, &cal, "BEGIN; INSERT INTO cal VALUES ('w')", "COMMIT").await?;
    let probe_size = measure(
        &wal,
        &cal,
        "SELECT 1",
        &format!("SELECT pg_logical_emit_message(false, 'pad', repeat('x', {PROBE_PAYLOAD}))"),
    )
    .await?;
    eprintln!(
        "WAL sizes: a commit record {commit_size} B, a {PROBE_PAYLOAD} B message {probe_size} B"
    );

    let mut tables = vec!["public.a".to_owned()];
    let mut hit_at = None;
    for k in 1..=ATTEMPTS {
        let b = format!("b{k}");
        tables.push(format!("public.{b}"));
        let cuts_before = logged_cuts(&setup.sender.log()).len();
        // 2. X: an open transaction on the replicated table.
        let x = setup.source().await?;
        x.batch_execute(&format!(
            "BEGIN; INSERT INTO a VALUES ({}, 'x{k}')",
            1000 + k
        ))
        .await?;
        let xid: String = x
            .query_one("SELECT pg_current_xact_id()::text", &[])
            .await?
            .get(0);
        // 3. W: an open transaction on the table about to join.
        let w = setup.source().await?;
        w.batch_execute(&format!(
            "BEGIN; INSERT INTO {b} VALUES ({}, 'w')",
            B_ROWS + 1
        ))
        .await?;
        // 4. b<k> joins; the sender's cut waits for W.
        admin
            .batch_execute(&format!("ALTER PUBLICATION pgcourier ADD TABLE {b}"))
            .await?;
        let waiting = format!(
            "SELECT count(*) FROM pg_locks WHERE relation = 'public.{b}'::regclass \
             AND mode = 'ShareLock' AND NOT granted"
        );
        wait_until("the sender's cut to wait for W's lock", WAIT, || async {
            Ok(admin.query_one(&waiting, &[]).await?.get::<_, i64>(0) == 1)
        })
        .await
        .with_context(|| setup.logs())?;
        // 5. Pad so that W's commit record ends at the end of a page.
        let pad = setup.source().await?;
        let at = insert_lsn(&pad).await?;
        let from = wal.usable(at);
        let (boundary, room) = (1..)
            .map(|j| {
                let page_start = (at / PAGE + j) * PAGE;
                (page_start, wal.usable(page_start + wal.header(page_start)))
            })
            .map(|(page_start, end)| (page_start, end - from))
            .find(|(_, room)| *room >= commit_size + 512)
            .expect("some page boundary is far enough");
        let pad_size = room - commit_size;
        let payload = PROBE_PAYLOAD + pad_size - probe_size;
        pad.batch_execute(&format!(
            "SELECT pg_logical_emit_message(false, 'pad', repeat('x', {payload}))"
        ))
        .await?;
        w.batch_execute("COMMIT").await?;
        let after_w = insert_lsn(&pad).await?;
        let expected = boundary + wal.header(boundary);
        // 6. The sender's snapshot has read L; then X commits.
        wait_until(
            "the sender's snapshot session to read the cut",
            WAIT,
            || async {
                let n: i64 = admin
                .query_one(
                    "SELECT count(*) FROM pg_stat_activity WHERE state = 'idle in transaction' \
                     AND query = 'SELECT pg_current_wal_insert_lsn()::text'",
                    &[],
                )
                .await?
                .get(0);
                Ok(n == 1)
            },
        )
        .await
        .with_context(|| setup.logs())?;
        wait_until("the sender to log its cut", WAIT, || async {
            Ok(logged_cuts(&setup.sender.log()).len() > cuts_before)
        })
        .await
        .with_context(|| setup.logs())?;
        let cut = logged_cuts(&setup.sender.log())[cuts_before];
        x.batch_execute("COMMIT").await?;
        let record = waldump_at(&setup, cut)?;
        let tx = record
            .split("tx:")
            .nth(1)
            .and_then(|r| r.split(',').next())
            .map(str::trim);
        let x_at_cut = waldump_lsn(&record) == Some(cut)
            && record.contains("desc: COMMIT")
            && tx == Some(xid.as_str());
        let hit = after_w == expected && cut == expected && x_at_cut;
        eprintln!(
            "attempt {k}: W's commit ended at {} (aimed at page {}), the cut is {}, X ({xid}) \
             committed {}: {}",
            Lsn(after_w),
            Lsn(boundary),
            Lsn(cut),
            if x_at_cut { "at the cut" } else { "elsewhere" },
            record.lines().next().unwrap_or_default()
        );
        // 7. The whole copy and X's row.
        let refs: Vec<&str> = tables.iter().map(String::as_str).collect();
        setup.wait_equal(0, &refs, WAIT).await?;
        let dst = setup.target(0).await?;
        let n: i64 = dst
            .query_one(&format!("SELECT count(*) FROM {b}"), &[])
            .await?
            .get(0);
        assert_eq!(n, B_ROWS + 1, "every row of {b}, W's included");
        let n: i64 = dst
            .query_one(
                &format!("SELECT count(*) FROM a WHERE id = {}", 1000 + k),
                &[],
            )
            .await?
            .get(0);
        assert_eq!(n, 1, "X's row");
        if hit {
            hit_at = Some(k);
            break;
        }
    }
    if hit_at.is_none() {
        bail!(
            "in {ATTEMPTS} attempts the cut never landed on a page boundary with X's commit at it \
             (see the attempt lines above)\n{}",
            setup.logs()
        );
    }
    Ok(())
}
