//! `pgcourier-sender seed export`: write a seed file, through the running
//! daemon's admin endpoint when there is one, or in this process when the
//! sender is stopped.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use anyhow::{bail, Context};
use pgcourier_common::ops::admin::{self, percent_encode};
use pgcourier_common::ops::progress::Bar;
use tokio::sync::{mpsc, oneshot};
use tokio_util::sync::CancellationToken;

use crate::capture::{Capture, SeedRequest, SeedSummary};
use crate::spool::Spool;
use crate::SenderConfig;

/// Resolve and check the output path before any work starts.
fn output_path(out: &Path) -> anyhow::Result<PathBuf> {
    let out =
        std::path::absolute(out).with_context(|| format!("resolve seed path {}", out.display()))?;
    let dir = out.parent().unwrap_or(Path::new("/"));
    if !dir.is_dir() {
        bail!(
            "directory {} does not exist: create it or choose another --out",
            dir.display()
        );
    }
    // symlink_metadata: a symbolic link, even a dangling one, exists too.
    if std::fs::symlink_metadata(&out).is_ok() {
        bail!("{} exists: choose a new file for --out", out.display());
    }
    Ok(out)
}

pub fn export(cfg: SenderConfig, out: &Path) -> anyhow::Result<SeedSummary> {
    let out = output_path(out)?;
    let socket = cfg.admin_socket.clone();
    match admin::request(
        socket.as_path(),
        "POST",
        &format!("/seed?out={}", percent_encode(&out.display().to_string())),
    ) {
        Ok((202, _)) => return follow(&socket, &out),
        Ok((code, body)) => bail!("the running sender refused the export ({code}): {body}"),
        // Not running: do it here.
        Err(_) => {}
    }
    in_process(cfg, &out)
}

/// Watch the daemon's status until it reports this export's outcome.
fn follow(socket: &Path, out: &Path) -> anyhow::Result<SeedSummary> {
    let mut bar = Bar::default();
    let path = out.display().to_string();
    loop {
        std::thread::sleep(Duration::from_millis(300));
        let (code, body) = admin::request(socket, "GET", "/status")
            .context("ask the running sender for the export's progress (setting `admin-socket`)")?;
        if code != 200 {
            bail!("the running sender answered {code}: {body}");
        }
        let st: crate::admin::SenderStatus =
            serde_json::from_str(&body).context("parse the running sender's status")?;
        if let Some(outcome) = st.last_seed.filter(|o| o.path == path) {
            bar.finish();
            return match (outcome.summary, outcome.error) {
                (Some(s), _) => Ok(s),
                (None, Some(e)) => bail!("seed export failed: {e}"),
                (None, None) => bail!("seed export failed; the sender's log says why"),
            };
        }
        if let Some(copy) = st.copy {
            let total: u64 = copy.tables.iter().map(|t| t.rows_estimate).sum();
            bar.draw(
                "seed export",
                copy.rows,
                total,
                copy.rows_per_second,
                copy.eta_seconds,
            );
        }
    }
}

fn in_process(cfg: SenderConfig, out: &Path) -> anyhow::Result<SeedSummary> {
    let names: Vec<String> = cfg.receivers.iter().map(|r| r.name.clone()).collect();
    let spool = Arc::new(
        Spool::open(&cfg.spool_dir, cfg.cache_capacity, &names).with_context(|| {
            format!(
                "open spool {} (setting `spool-dir`); if the sender is running, seed export asks it through its admin socket (setting `admin-socket`): check that setting",
                cfg.spool_dir.display()
            )
        })?,
    );
    let rt = pgcourier_common::ops::logging::runtime();
    rt.block_on(async {
        let (tx, rx) = mpsc::channel(1);
        let capture = Capture::new(Arc::new(cfg), spool.clone()).with_seeds(rx);
        let status = capture.status.clone();
        let (reply, answer) = oneshot::channel();
        tx.send(SeedRequest {
            path: out.to_owned(),
            reply,
        })
        .await
        .expect("a new channel has room for one request, and capture holds its receiver");
        let shutdown = CancellationToken::new();
        // Capture runs in this task, beside the progress bar: nothing is
        // spawned, so nothing outlives this function.
        let run = capture.run(shutdown.clone());
        tokio::pin!(run);
        tokio::pin!(answer);
        let mut bar = Bar::default();
        let mut ended = None;
        let result = loop {
            tokio::select! {
                r = &mut answer => break r.ok(),
                r = &mut run => {
                    ended = Some(r);
                    break None;
                }
                _ = tokio::time::sleep(Duration::from_millis(300)) => {
                    let st = status.lock().expect("status lock");
                    if let Some(c) = &st.copy {
                        let total = c.tables.iter().map(|t| t.rows_estimate).sum();
                        bar.draw("seed export", c.rows, total, c.rows_per_second, c.eta_seconds);
                    }
                }
            }
        };
        bar.finish();
        shutdown.cancel();
        let ended = match ended {
            Some(ended) => ended,
            None => run.await,
        };
        spool.flush_on_stop();
        match result {
            Some(Ok(summary)) => Ok(summary),
            Some(Err(e)) => bail!("seed export failed: {e}"),
            None => match ended {
                Err(e) => Err(anyhow::Error::from(e).context("capture stopped")),
                Ok(()) => bail!("capture stopped before the export finished"),
            },
        }
    })
}
