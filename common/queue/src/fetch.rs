//! Where `pgcourier-queue` gets what it shows: the running daemon's admin
//! endpoint when it answers, or else the daemon's store opened read-only
//! (the spool or the inbox; sled lets one process in, so this works only
//! while the daemon is stopped) plus the database beside it (the source's
//! slot, the target's progress row). Everything comes back typed: the
//! daemons' own [`SenderStatus`] / [`ReceiverStatus`] and record lines.

use std::path::{Path, PathBuf};

use anyhow::{bail, Context};
use pgcourier_common::ops::admin::{self, percent_encode};
use pgcourier_common::ops::backoff::error_chain;
use pgcourier_common::ops::inspect::RecordLine;
use pgcourier_common::pg::progress_row;
use pgcourier_receiver::admin::ReceiverStatus;
use pgcourier_receiver::inbox::Inbox;
use pgcourier_receiver::ReceiverConfig;
use pgcourier_sender::admin::SenderStatus;
use pgcourier_sender::spool::Spool;
use pgcourier_sender::SenderConfig;
use serde::Serialize;

/// The daemon a config file belongs to.
pub enum Daemon {
    Sender(SenderConfig),
    Receiver(ReceiverConfig),
}

/// A daemon's status, as it serializes it on `/status`.
#[derive(Serialize)]
#[serde(untagged)]
pub enum Status {
    Sender(SenderStatus),
    Receiver(ReceiverStatus),
}

impl Daemon {
    /// Load a sender's config (it has `source`) or a receiver's (`target`);
    /// of a site file, the receiver of `peer`'s changes, or else the
    /// sender.
    pub fn load(path: &Path, peer: Option<&str>) -> anyhow::Result<Daemon> {
        let text = std::fs::read_to_string(path)
            .with_context(|| format!("read config file {}", path.display()))?;
        let value: toml::Value = toml::from_str(&text)
            .with_context(|| format!("config file {} is not TOML", path.display()))?;
        let site_file = value.get("apply").is_some();
        if site_file && peer.is_some() {
            Ok(Daemon::Receiver(ReceiverConfig::load_peer(path, peer)?))
        } else if peer.is_some() {
            bail!(
                "--peer names a section of a site file, and {} has no [apply.*] section",
                path.display()
            )
        } else if value.get("source").is_some() {
            Ok(Daemon::Sender(SenderConfig::load(path)?))
        } else if value.get("target").is_some() {
            Ok(Daemon::Receiver(ReceiverConfig::load(path)?))
        } else {
            bail!(
                "config file {} is neither a sender's (no `source`) nor a receiver's (no `target`)",
                path.display()
            )
        }
    }

    /// The daemon's admin socket: every route, records and control
    /// requests included (the TCP listener is read-only).
    fn admin(&self) -> PathBuf {
        match self {
            Daemon::Sender(c) => c.admin_socket.clone(),
            Daemon::Receiver(c) => c.admin_socket.clone(),
        }
    }

    /// Ask the running daemon; `None` when it has no admin endpoint or does
    /// not answer (then the store is opened directly). An answer other than
    /// 200 is an error carrying the daemon's message.
    fn ask(&self, method: &str, path: &str) -> anyhow::Result<Option<String>> {
        let addr = self.admin();
        match admin::request(addr.as_path(), method, path) {
            Ok((200, body)) => Ok(Some(body)),
            Ok((code, body)) => bail!("admin socket {} answered {code}: {body}", addr.display()),
            Err(_) => Ok(None),
        }
    }
}

/// The daemon's status: from its endpoint, or built from its store.
pub fn status(daemon: &Daemon) -> anyhow::Result<Status> {
    let body = daemon.ask("GET", "/status")?;
    Ok(match (daemon, body) {
        (Daemon::Sender(_), Some(body)) => {
            Status::Sender(serde_json::from_str(&body).context("read the sender's /status")?)
        }
        (Daemon::Receiver(_), Some(body)) => {
            Status::Receiver(serde_json::from_str(&body).context("read the receiver's /status")?)
        }
        (Daemon::Sender(c), None) => Status::Sender(stopped_sender(c)?),
        (Daemon::Receiver(c), None) => Status::Receiver(stopped_receiver(c)?),
    })
}

/// Up to `limit` record lines from `from` (default: the oldest held).
pub fn list(daemon: &Daemon, from: Option<u64>, limit: usize) -> anyhow::Result<Vec<RecordLine>> {
    let mut path = format!("/records?limit={limit}");
    if let Some(f) = from {
        path.push_str(&format!("&from={f}"));
    }
    if let Some(body) = daemon.ask("GET", &path)? {
        return serde_json::from_str(&body).context("read the daemon's record list");
    }
    Ok(match daemon {
        Daemon::Sender(c) => pgcourier_sender::admin::list(&open_spool(c)?, from, limit),
        Daemon::Receiver(c) => pgcourier_receiver::admin::list(&open_inbox(c)?, from, limit),
    })
}

/// One record, as the daemon renders it (`json` or `sql` text).
pub fn show(daemon: &Daemon, seq: u64, format: &str) -> anyhow::Result<String> {
    if let Some(body) = daemon.ask("GET", &format!("/records/{seq}?format={format}"))? {
        return Ok(body);
    }
    let response = match daemon {
        Daemon::Sender(c) => pgcourier_sender::admin::show(&open_spool(c)?, seq, format),
        Daemon::Receiver(c) => pgcourier_receiver::admin::show(&open_inbox(c)?, seq, format),
    };
    if response.status != 200 {
        bail!("{}", response.body);
    }
    Ok(response.body)
}

/// Ask the running receiver to skip the transaction at `seq`: whether it
/// accepted, and its message.
pub fn skip(daemon: &Daemon, seq: u64, reason: &str) -> anyhow::Result<(bool, String)> {
    let Daemon::Receiver(_) = daemon else {
        bail!("skip is a receiver command: pass the receiver's config")
    };
    let addr = daemon.admin();
    let (code, body) = admin::request(
        addr.as_path(),
        "POST",
        &format!("/skip?seq={seq}&reason={}", percent_encode(reason)),
    )
    .with_context(|| {
        format!(
            "reach the receiver's admin socket {} (setting `admin-socket`; is the receiver running, as this user?)",
            addr.display()
        )
    })?;
    Ok((code == 200, body))
}

fn busy(e: impl std::fmt::Display, what: &str) -> anyhow::Error {
    anyhow::anyhow!(
        "{e}\n(if the {what} is running, pgcourier-queue asks it through its admin socket, setting `admin-socket`: run it as the {what}'s user)"
    )
}

pub(crate) fn runtime() -> anyhow::Result<tokio::runtime::Runtime> {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .context("start a runtime to ask the database")
}

fn open_spool(c: &SenderConfig) -> anyhow::Result<Spool> {
    let names: Vec<String> = c.receivers.iter().map(|r| r.name.clone()).collect();
    Spool::open_for_inspection(&c.spool_dir, &names).map_err(|e| busy(e, "sender"))
}

fn open_inbox(c: &ReceiverConfig) -> anyhow::Result<Inbox> {
    if !c.inbox_dir.join("db").exists() {
        bail!(
            "no inbox at {} (setting `inbox-dir`)",
            c.inbox_dir.display()
        );
    }
    Inbox::open(&c.inbox_dir, 16 << 20).map_err(|e| busy(e, "receiver"))
}

/// A stopped sender's status: the spool, and the slot if the source answers.
fn stopped_sender(c: &SenderConfig) -> anyhow::Result<SenderStatus> {
    let spool = open_spool(c)?;
    let mut capture = pgcourier_sender::capture::CaptureStatus::default();
    let slot = runtime()?.block_on(async {
        let (client, conn) = c
            .source
            .connect()
            .await
            .map_err(|e| format!("sender stopped; {}", error_chain(&e)))?;
        // The connection is driven here and ends when the client is dropped.
        let read = async move {
            let slot = pgcourier_sender::source::slot_stats(&client, &c.slot).await;
            drop(client);
            slot.map_err(|e| error_chain(&e))
        };
        let (slot, _closed) = tokio::join!(read, conn);
        slot
    });
    match slot {
        Ok(slot) => capture.slot = slot,
        Err(e) => capture.last_error = Some(e),
    }
    Ok(pgcourier_sender::admin::status(
        c, &spool, &capture, None, false,
    ))
}

/// A stopped receiver's status: the inbox, and what the target's progress
/// row says was applied (read by the one progress-row reader; a row that
/// does not parse is reported, never taken as zero).
fn stopped_receiver(c: &ReceiverConfig) -> anyhow::Result<ReceiverStatus> {
    let inbox = open_inbox(c)?;
    let mut apply = pgcourier_receiver::apply::ApplyStatus::default();
    if let Some(source) = inbox.source()? {
        let applied = runtime()?.block_on(async {
            let (client, conn) = c.target.connect().await.map_err(|e| {
                format!(
                    "receiver stopped and the target does not answer: {}",
                    error_chain(&e)
                )
            })?;
            let read = async move {
                let row = progress_row::read(&client, &source).await;
                drop(client);
                row.map_err(|e| error_chain(&e))
            };
            let (row, _closed) = tokio::join!(read, conn);
            row
        });
        match applied {
            Ok(Some(p)) => {
                apply.applied_seq = p.seq;
                apply.applied_commit_lsn = p.commit_lsn;
                apply.applied_commit_time = p.commit_time;
            }
            Ok(None) => {}
            Err(e) => apply.last_error = Some(e),
        }
    }
    let mut st = pgcourier_receiver::admin::status(&inbox, &apply, None, false);
    st.inbox_max_bytes = c.inbox_max_bytes;
    Ok(st)
}
