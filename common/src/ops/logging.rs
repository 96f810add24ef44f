//! How a daemon process starts and stops: the tracing subscriber, the
//! runtime, SIGTERM/SIGINT turned into the shutdown token, and the exit
//! codes (0 stopped cleanly, 1 the daemon failed, 2 bad input such as the
//! config or certificate files). Both daemons' `main` call [`run_daemon`].

use std::fmt::Display;
use std::future::Future;
use std::process::ExitCode;

use tokio_util::sync::CancellationToken;

pub use crate::ops::cli::LogFormat;

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

/// A daemon's `run` command: start logging in `log_format`, `load` its
/// config (exit 2 when it is bad), then `run(config, shutdown)` on the
/// daemon runtime until it returns; a signal cancels `shutdown`. Exit 0 when
/// `run` ends well, 1 (its error printed) when it fails.
pub fn run_daemon<C, E, F, Fut, R>(
    program: &str,
    log_format: LogFormat,
    load: impl FnOnce() -> Result<C, E>,
    run: F,
) -> ExitCode
where
    E: std::error::Error,
    F: FnOnce(C, CancellationToken) -> Fut,
    Fut: Future<Output = Result<(), R>>,
    R: Display,
{
    init(log_format);
    let config = match load() {
        Ok(c) => c,
        Err(e) => return fail(program, &e),
    };
    runtime().block_on(async {
        let shutdown = CancellationToken::new();
        let daemon = async {
            let result = run(config, shutdown.clone()).await;
            // Also ends the signal listener.
            shutdown.cancel();
            result
        };
        let (result, ()) = tokio::join!(daemon, cancel_on_signal(shutdown.clone()));
        match result {
            Ok(()) => ExitCode::SUCCESS,
            Err(e) => {
                eprintln!("{program}: {e:#}");
                ExitCode::from(1)
            }
        }
    })
}

#[cfg(test)]
mod tests {
    use super::*;

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
