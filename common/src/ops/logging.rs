//! Logging set-up shared by the daemons, and signal handling.

use tokio_util::sync::CancellationToken;

/// Install the tracing subscriber: `human` (default) or `json`, filtered by
/// `RUST_LOG` (default `info`).
pub fn init(format: &str) {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    use std::io::IsTerminal;
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(std::io::stderr().is_terminal());
    if format == "json" {
        builder.json().init();
    } else {
        builder.init();
    }
}

/// Cancel `token` on SIGTERM or SIGINT.
pub fn cancel_on_signal(token: CancellationToken) {
    tokio::spawn(async move {
        let mut term =
            match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
                Ok(s) => s,
                Err(e) => {
                    tracing::warn!(error = %e, "cannot listen for SIGTERM");
                    return;
                }
            };
        tokio::select! {
            _ = term.recv() => {}
            _ = tokio::signal::ctrl_c() => {}
        }
        tracing::info!("stopping on signal");
        token.cancel();
    });
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
pub fn fail(program: &str, error: &dyn std::error::Error) -> std::process::ExitCode {
    eprintln!("{program}: {}", crate::ops::backoff::error_chain(error));
    std::process::ExitCode::from(2)
}
