//! pgcourier-sender: captures committed changes from the headquarters
//! database, spools them durably, and ships them to the branches.
//!
//! `capture` (WAL → spool) and `ship` (spool → receivers) run side by side
//! and meet only in the [`spool::Spool`], which is the sender's single
//! source of truth. See `ARCHITECTURE.md`.

pub mod admin;
pub mod capture;
pub mod config;
pub mod copy;
pub mod init;
pub mod replication;
pub mod seed;
pub mod ship;
pub mod source;
pub mod spool;

use std::sync::Arc;

use anyhow::Context;
use pgcourier_common::ops::admin::Listeners;
use pgcourier_common::ops::logging::Definite;
use pgcourier_common::ops::systemd;
use pgcourier_common::transport::link::Net;
use pgcourier_common::transport::tls;
use tokio_util::sync::CancellationToken;

pub use config::SenderConfig;
pub(crate) use pgcourier_common::ops::backoff::Backoff;

/// Run the sender until `shutdown` is cancelled or a definite error stops
/// capture (marked [`Definite`]). Tells systemd it is ready once capture
/// streams from the slot, or retries the source after a transient error.
pub async fn run(cfg: SenderConfig, shutdown: CancellationToken) -> anyhow::Result<()> {
    let cfg = Arc::new(cfg);
    let identity = tls::load_identity(&cfg.cert, &cfg.key)
        .context("load the sender's certificate (settings `cert`, `key`)")
        .context(Definite::BadInput)?;
    let names: Vec<String> = cfg.receivers.iter().map(|r| r.name.clone()).collect();
    let spool = Arc::new(
        spool::Spool::open(&cfg.spool_dir, cfg.cache_capacity, &names).with_context(|| {
            format!(
                "open spool {} (setting `spool-dir`)",
                cfg.spool_dir.display()
            )
        })?,
    );
    let pinned: Vec<_> = cfg.receivers.iter().map(|r| r.fingerprint).collect();
    let bind = cfg
        .listen
        .unwrap_or_else(|| "0.0.0.0:0".parse().expect("valid address"));
    let net = Arc::new(
        Net::open(
            bind,
            &identity,
            &pinned,
            &cfg.transport,
            cfg.listen.is_some(),
        )
        .with_context(|| format!("open the link's sockets on {bind} (setting `listen`)"))?,
    );
    tracing::info!(fingerprint = %identity.fingerprint(), bind = %net.local_addr().map(|a| a.to_string()).unwrap_or_default(), receivers = names.len(), "sender starting");

    let shipper = ship::Shipper::new(cfg.clone(), spool.clone());
    let (seeds_tx, seeds_rx) = tokio::sync::mpsc::channel(1);
    let (started_tx, started_rx) = tokio::sync::oneshot::channel();
    let room = shipper.clone();
    let capture = capture::Capture::new(cfg.clone(), spool.clone())
        .with_seeds(seeds_rx)
        .with_started(started_tx)
        .with_link_room(Arc::new(move |bytes| room.link_has_room(bytes)));
    let endpoint_view = Arc::new(admin::Admin {
        cfg: cfg.clone(),
        spool: spool.clone(),
        capture: capture.status.clone(),
        shipper: shipper.clone(),
        seeds: seeds_tx,
    });
    let admin = Listeners::start(
        &cfg.admin_socket,
        cfg.admin,
        endpoint_view,
        shutdown.clone(),
    )
    .await
    .context("start the admin endpoint")?;
    let links = shipper.clone();
    let ship_task = tokio::spawn(shipper.run(net, shutdown.clone()));
    let receivers = cfg.receivers.len();
    let ready = async {
        let line = match started_rx.await {
            Ok(capture::CaptureStart::Capturing) => "capturing from slot",
            Ok(capture::CaptureStart::Retrying) => "retrying the source (see the log) for slot",
            // Capture stopped before it started: no readiness to report.
            Err(_) => return,
        };
        systemd::ready(&format!(
            "{line} {}, shipping to {receivers} receiver(s)",
            cfg.slot
        ));
    };
    let (result, ()) = tokio::join!(capture.run(shutdown.clone()), ready);
    if let Err(e) = &result {
        tracing::error!(error = %pgcourier_common::ops::backoff::error_chain(e), "capture stopped: the operator must act; the sender ships what is spooled, then exits");
        systemd::status("capture stopped on a definite error (see the log); shipping what is spooled, then exiting");
        // Shipping what is already spooled is still useful; once every
        // receiver holds it, exit (non-zero) so a service manager sees it.
        let receivers: Vec<String> = cfg.receivers.iter().map(|r| r.name.clone()).collect();
        drained(&spool, &receivers, &links, &shutdown).await;
    }
    shutdown.cancel();
    ship_task.await.context("join shipping task")?;
    admin.stopped().await;
    spool.flush_on_stop();
    result.map_err(|e| match e {
        // A task that died: a restart may cure it.
        capture::CaptureError::Blocking(_) => anyhow::Error::from(e),
        e => anyhow::Error::from(e).context(Definite::OperatorMustAct),
    })
}

/// Wait until every receiver has acknowledged everything spooled (the spool
/// is empty) or has been refused for good (the sender stopped dialing it:
/// waiting for it would never end), or `shutdown`.
async fn drained(
    spool: &spool::Spool,
    receivers: &[String],
    links: &ship::Shipper,
    shutdown: &CancellationToken,
) {
    let mut marks = spool.subscribe();
    loop {
        let m = *marks.borrow_and_update();
        if m.first_seq > m.complete_seq {
            tracing::info!(
                complete_seq = m.complete_seq,
                "every receiver holds everything spooled; exiting"
            );
            return;
        }
        let refused: Vec<String> = {
            let links = links.links.lock().expect("links lock");
            links
                .iter()
                .filter(|(_, l)| l.stopped.is_some())
                .map(|(name, _)| name.clone())
                .collect()
        };
        let waiting = receivers
            .iter()
            .filter(|name| !refused.contains(name))
            .any(|name| spool.applied(name).unwrap_or(0) < m.complete_seq);
        if !waiting {
            tracing::info!(
                complete_seq = m.complete_seq,
                refused = ?refused,
                "every receiver that can still be reached holds everything spooled; exiting"
            );
            return;
        }
        tokio::select! {
            _ = shutdown.cancelled() => return,
            r = marks.changed() => if r.is_err() { return },
            // A receiver refused for good changes no mark.
            _ = tokio::time::sleep(std::time::Duration::from_secs(1)) => {}
        }
    }
}
