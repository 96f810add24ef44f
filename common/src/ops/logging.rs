//! How a daemon process starts and stops: the tracing subscriber, the
//! runtime, SIGTERM/SIGINT turned into the shutdown token, systemd's
//! watchdog and `STOPPING=1` (`ops/systemd.rs`), and the exit codes. Both
//! daemons' `main` call [`run_daemon`].
//!
//! Exit codes (the units in `deploy/systemd/` restart on 1 and not on 2 or
//! 3, `RestartPreventExitStatus=2 3`, so that a definite error does not
//! restart in a loop):
//! - 0: stopped cleanly (a signal).
//! - 1: the daemon failed in a way a restart may cure (a socket in use, a
//!   task that died, a store that would not open).
//! - 2: bad input: the command line, the config file, the certificate or
//!   key files ([`Definite::BadInput`]).
//! - 3: stopped on a definite error an operator must act on before a
//!   restart can help ([`Definite::OperatorMustAct`]): the sender's capture
//!   stopped (slot dropped or ahead of the spool, another source, a login
//!   or TLS refused, a dropped publication, a spool write the disk refused),
//!   the receiver's target refused its login or TLS at start.

use std::future::Future;
use std::process::ExitCode;

use tokio_util::sync::CancellationToken;

pub use crate::ops::cli::LogFormat;
use crate::ops::systemd;

/// What a daemon's `run` marks its error with (as the outermost
/// `anyhow` context) when a restart cannot cure it; the exit code follows.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum Definite {
    /// Exit 2: a file it was given (certificate, key) is unusable.
    #[error("bad input")]
    BadInput,
    /// Exit 3: the daemon stopped on an error that needs an operator.
    #[error("stopped on a definite error, an operator must act")]
    OperatorMustAct,
}

impl Definite {
    pub fn exit_code(self) -> u8 {
        match self {
            Definite::BadInput => 2,
            Definite::OperatorMustAct => 3,
        }
    }
}

/// The exit code of a daemon whose `run` failed with `error`: its
/// [`Definite`] mark's, else 1.
pub fn failure_code(error: &anyhow::Error) -> u8 {
    error
        .downcast_ref::<Definite>()
        .map_or(1, |d| d.exit_code())
}

/// Install the tracing subscriber in `format`, filtered by `RUST_LOG`
/// (default `info`).
pub fn init(format: LogFormat) {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    use std::io::IsTerminal;
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(std::io::stderr().is_terminal());
    if format == LogFormat::Json {
        builder.json().init();
    } else {
        builder.init();
    }
}

/// Cancel `token` on SIGTERM or SIGINT; returns then, or as soon as
/// `token` is cancelled by anyone else (so it never outlives the daemon).
pub async fn cancel_on_signal(token: CancellationToken) {
    let mut term = match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
        Ok(s) => s,
        Err(e) => {
            tracing::warn!(error = %e, "cannot listen for SIGTERM");
            return;
        }
    };
    tokio::select! {
        _ = token.cancelled() => return,
        _ = term.recv() => {}
        _ = tokio::signal::ctrl_c() => {}
    }
    tracing::info!("stopping on signal");
    token.cancel();
}

/// The multi-threaded runtime a daemon runs on.
pub fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .expect("build tokio runtime")
}

/// Print `error` with its causes, prefixed by `program`, and return exit code 2
/// (bad input: config, certificate files, arguments).
pub fn fail(program: &str, error: &dyn std::error::Error) -> ExitCode {
    eprintln!("{program}: {}", crate::ops::backoff::error_chain(error));
    ExitCode::from(2)
}

/// The error a daemon stops on, as the last line of its log: in the json
/// format a JSON object like every other line (level ERROR, the error in
/// the field `error`), else `program: error` on stderr.
fn fatal(program: &str, format: LogFormat, error: &str) {
    match format {
        LogFormat::Json => tracing::error!(program, error, "stopped on an error"),
        LogFormat::Human => eprintln!("{program}: {error}"),
    }
}

/// A daemon's `run` command: start logging in `log_format`, `load` its
/// config (exit 2 when it is bad), then `run(config, shutdown)` on the
/// daemon runtime until it returns; a signal cancels `shutdown`. Meanwhile
/// systemd's watchdog is fed, and told `STOPPING=1` once `shutdown` is
/// cancelled. Exit 0 when `run` ends well; when it fails, its error printed
/// and the exit code its [`Definite`] mark gives, else 1.
pub fn run_daemon<C, E, F, Fut>(
    program: &str,
    log_format: LogFormat,
    load: impl FnOnce() -> Result<C, E>,
    run: F,
) -> ExitCode
where
    E: std::error::Error,
    F: FnOnce(C, CancellationToken) -> Fut,
    Fut: Future<Output = anyhow::Result<()>>,
{
    init(log_format);
    let config = match load() {
        Ok(c) => c,
        Err(e) => {
            fatal(program, log_format, &crate::ops::backoff::error_chain(&e));
            return ExitCode::from(2);
        }
    };
    runtime().block_on(async {
        let shutdown = CancellationToken::new();
        let daemon = async {
            let result = run(config, shutdown.clone()).await;
            // Also ends the signal listener.
            shutdown.cancel();
            result
        };
        let stopping = async {
            shutdown.cancelled().await;
            systemd::stopping();
        };
        let all = async { tokio::join!(daemon, cancel_on_signal(shutdown.clone()), stopping) };
        let (result, (), ()) = tokio::select! {
            r = all => r,
            never = systemd::watchdog() => match never {},
        };
        match result {
            Ok(()) => ExitCode::SUCCESS,
            Err(e) => {
                fatal(program, log_format, &format!("{e:#}"));
                ExitCode::from(failure_code(&e))
            }
        }
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_failed_run_exits_by_its_mark_under_any_context() {
        use anyhow::Context;
        let io = || std::io::Error::other("disk full");
        let plain = anyhow::Error::new(io()).context("flush spool");
        assert_eq!(failure_code(&plain), 1);
        let must_act = Err::<(), _>(io())
            .context("capture stopped")
            .context(Definite::OperatorMustAct)
            .unwrap_err();
        assert_eq!(failure_code(&must_act), 3);
        assert!(
            format!("{must_act:#}").contains("an operator must act: capture stopped: disk full")
        );
        let bad = Err::<(), _>(io())
            .context("load the sender's certificate")
            .context(Definite::BadInput)
            .context("start the sender")
            .unwrap_err();
        assert_eq!(failure_code(&bad), 2);
    }

    #[tokio::test]
    async fn the_signal_listener_ends_when_the_daemon_cancels_its_token() {
        let token = CancellationToken::new();
        let listener = cancel_on_signal(token.clone());
        token.cancel();
        tokio::time::timeout(std::time::Duration::from_secs(5), listener)
            .await
            .expect("the signal listener outlived the daemon");
    }
}
