//! The control port: a line-based TCP service to command a running relay.
//!
//! ```text
//!  down   ─▶ "ok down"    commanded outage, both directions
//!  up     ─▶ "ok up"      end of the commanded outage
//!  stats  ─▶ one line of JSON (LinkStats)
//!  help   ─▶ the commands
//! ```
//!
//! Anything else gets `error: ...` and the connection stays open; a line
//! longer than [`MAX_LINE`] bytes closes it. There is no authentication:
//! bind it to a loopback address.

use std::net::SocketAddr;

use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::net::{TcpListener, TcpStream};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::link::LinkControl;
use crate::relay::RelayError;

/// Longest command line accepted.
pub const MAX_LINE: u64 = 1024;

/// A running control port; stops on drop or [`ControlPort::shutdown`].
pub struct ControlPort {
    local_addr: SocketAddr,
    cancel: CancellationToken,
    tracker: TaskTracker,
}

impl ControlPort {
    /// Listen at `addr` and serve commands for `control`.
    pub async fn start(addr: SocketAddr, control: LinkControl) -> Result<ControlPort, RelayError> {
        let listener = TcpListener::bind(addr)
            .await
            .map_err(|source| RelayError::Bind { addr, source })?;
        let local_addr = listener
            .local_addr()
            .map_err(|source| RelayError::Bind { addr, source })?;
        let cancel = CancellationToken::new();
        let tracker = TaskTracker::new();
        tracker.spawn(accept(listener, control, cancel.clone(), tracker.clone()));
        Ok(ControlPort {
            local_addr,
            cancel,
            tracker,
        })
    }

    pub fn local_addr(&self) -> SocketAddr {
        self.local_addr
    }

    /// Close the port and its connections, and wait for them.
    pub async fn shutdown(self) {
        self.cancel.cancel();
        self.tracker.close();
        self.tracker.wait().await;
    }
}

impl Drop for ControlPort {
    fn drop(&mut self) {
        self.cancel.cancel();
    }
}

async fn accept(
    listener: TcpListener,
    control: LinkControl,
    cancel: CancellationToken,
    tracker: TaskTracker,
) {
    loop {
        let accepted = tokio::select! {
            () = cancel.cancelled() => return,
            r = listener.accept() => r,
        };
        match accepted {
            Ok((stream, _peer)) => {
                let (control, cancel) = (control.clone(), cancel.clone());
                tracker.spawn(async move {
                    tokio::select! {
                        () = cancel.cancelled() => {}
                        r = session(stream, &control) => if let Err(error) = r {
                            tracing::debug!(%error, "control session");
                        },
                    }
                });
            }
            Err(error) => tracing::warn!(%error, "accept control connection"),
        }
    }
}

async fn session(stream: TcpStream, control: &LinkControl) -> std::io::Result<()> {
    let (read, mut write) = stream.into_split();
    let mut reader = BufReader::new(read);
    let mut line = String::new();
    loop {
        line.clear();
        let n = (&mut reader).take(MAX_LINE).read_line(&mut line).await?;
        if n == 0 {
            return Ok(());
        }
        if !line.ends_with('\n') && n as u64 == MAX_LINE {
            write.write_all(b"error: line too long\n").await?;
            return Ok(());
        }
        let reply = command(line.trim(), control);
        write.write_all(reply.as_bytes()).await?;
        write.write_all(b"\n").await?;
    }
}

/// The reply to one command line.
pub fn command(line: &str, control: &LinkControl) -> String {
    match line.to_ascii_lowercase().as_str() {
        "down" => {
            control.set_down(true);
            tracing::info!("link down (commanded)");
            "ok down".into()
        }
        "up" => {
            control.set_down(false);
            tracing::info!("link up (commanded)");
            "ok up".into()
        }
        "stats" => serde_json::to_string(&control.stats())
            .unwrap_or_else(|e| format!("error: serialize stats: {e}")),
        "help" | "" => "commands: down, up, stats".into(),
        other => format!("error: unknown command {other:?} (commands: down, up, stats)"),
    }
}
