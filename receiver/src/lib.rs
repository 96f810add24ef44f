//! pgcourier-receiver: stores what the sender ships in a durable inbox,
//! acknowledges it, and applies it to the branch database exactly once, in
//! source commit order.
//!
//! `ingest` (QUIC → inbox) and `apply` (inbox → target) run side by side and
//! meet only in the [`inbox::Inbox`]. See `ARCHITECTURE.md`.

pub mod admin;
pub mod apply;
pub mod config;
pub mod inbox;
pub mod ingest;
pub mod init;
pub mod seed;

use std::sync::Arc;

use anyhow::Context;
use pgcourier_common::ops::admin::Listeners;
use pgcourier_common::ops::logging::Definite;
use pgcourier_common::ops::systemd;
use pgcourier_common::transport::link::Net;
use pgcourier_common::transport::tls;
use tokio_util::sync::CancellationToken;

pub use config::ReceiverConfig;

/// Run the receiver until `shutdown` is cancelled. Tells systemd it is
/// ready once the inbox is open, the target's login was tried and the link
/// listens or dials. A target that refuses the login is [`Definite`].
pub async fn run(cfg: ReceiverConfig, shutdown: CancellationToken) -> anyhow::Result<()> {
    let cfg = Arc::new(cfg);
    let identity = tls::load_identity(&cfg.cert, &cfg.key)
        .context("load the receiver's certificate (settings `cert`, `key`)")
        .context(Definite::BadInput)?;
    let inbox = Arc::new(
        inbox::Inbox::open(&cfg.inbox_dir, cfg.cache_capacity).with_context(|| {
            format!(
                "open inbox {} (setting `inbox-dir`)",
                cfg.inbox_dir.display()
            )
        })?,
    );
    let (bind, listen) = match cfg.link {
        config::Link::Listen(addr) => (addr, true),
        config::Link::Dial(_) => ("0.0.0.0:0".parse().expect("valid address"), false),
    };
    let net = Arc::new(
        Net::open(
            bind,
            &identity,
            &cfg.sender_fingerprints,
            &cfg.transport,
            listen,
        )
        .with_context(|| format!("open the link's sockets on {bind} (setting `listen`)"))?,
    );
    tracing::info!(fingerprint = %identity.fingerprint(), bind = %net.local_addr().map(|a| a.to_string()).unwrap_or_default(), "receiver starting");

    probe_target(&cfg)
        .await
        .context(Definite::OperatorMustAct)?;
    let ingest = ingest::Ingest::new(cfg.clone(), inbox.clone());
    let apply = Arc::new(apply::Apply::new(cfg.clone(), inbox.clone()));
    let endpoint_view = Arc::new(admin::Admin {
        inbox: inbox.clone(),
        apply: apply.clone(),
        link: ingest.link.clone(),
        inbox_max_bytes: cfg.inbox_max_bytes,
    });
    let admin = Listeners::start(
        &cfg.admin_socket,
        cfg.admin,
        endpoint_view,
        shutdown.clone(),
    )
    .await
    .context("start the admin endpoint")?;
    let ingest_task = tokio::spawn(ingest.run(net, shutdown.clone()));
    systemd::ready(&match &cfg.link {
        config::Link::Listen(addr) => format!("inbox open, listening on {addr} for the sender"),
        config::Link::Dial(peer) => format!("inbox open, dialling the sender at {peer}"),
    });
    apply.clone().run(shutdown.clone()).await;
    shutdown.cancel();
    ingest_task.await.context("join ingest task")?;
    admin.stopped().await;
    inbox.sync().context("final inbox sync")?;
    Ok(())
}

/// Log in to the target once at start: a login it refuses (wrong password,
/// role or database) or a TLS failure (certificate refused, server without
/// TLS under sslmode=require or stronger) will not succeed by retrying, so
/// the receiver exits with an error naming the setting. An unreachable target is only logged:
/// apply retries until it is up.
async fn probe_target(cfg: &ReceiverConfig) -> anyhow::Result<()> {
    let attempt =
        tokio::time::timeout(std::time::Duration::from_secs(15), cfg.target.connect()).await;
    match attempt {
        Ok(Ok(_)) => Ok(()),
        Ok(Err(e)) => match e.login_refused() {
            Some(hint) => Err(anyhow::Error::new(e).context(format!(
                "the target database refused the login (setting `target`): {hint}"
            ))),
            // TLS refused or failed: retrying cannot help either.
            None if e.class() == "tls" => Err(anyhow::Error::new(e)),
            None => {
                tracing::warn!(error = %pgcourier_common::ops::backoff::error_chain(&e), "cannot reach the target database (setting `target`) yet; apply retries until it is up");
                Ok(())
            }
        },
        Err(_) => {
            tracing::warn!("the target database (setting `target`) did not answer within 15 s; apply retries until it is up");
            Ok(())
        }
    }
}
