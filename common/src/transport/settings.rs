//! The link settings both daemons read from their config file
//! (`congestion`, `idle-timeout`, `keep-alive`, `window`, `initial-rtt`,
//! `handshake-timeout`, `quic-retry`, `return-window`):
//! one struct, flattened into `sender.toml` and `receiver.toml`, and turned
//! into quinn's transport configuration by [`crate::transport::quic`].

use std::time::Duration;

use serde::Deserialize;

use crate::config::{de_duration, de_size};

/// QUIC congestion controller.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Congestion {
    Cubic,
    Bbr,
    NewReno,
}

/// How a daemon's QUIC connections behave on the link. Read from the top
/// level of the daemon's config file (`config::load_toml`); the trade-off
/// of each is in docs/configuration.md.
#[derive(Clone, Debug, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub struct TransportSettings {
    /// Default `bbr`: measured on netem's 3g profile (2% random loss),
    /// 100k-transaction backlog, BBR kept the link 90% busy (goodput 87%),
    /// Cubic 47% (loss-limited). See README, Benchmarks.
    #[serde(default = "default_congestion")]
    pub congestion: Congestion,
    /// Default 30 s; `0s` disables it. The connection is dropped after this
    /// long without a packet (the smaller of both sides' values wins).
    #[serde(default = "default_idle_timeout", deserialize_with = "de_duration")]
    pub idle_timeout: Duration,
    /// Default 5 s; `0s` disables it. Keeps NAT bindings and the idle
    /// timeout alive on a quiet link, at one small packet per interval.
    #[serde(default = "default_keep_alive", deserialize_with = "de_duration")]
    pub keep_alive: Duration,
    /// Setting `window`, default 16MiB: connection and stream receive
    /// windows and the send window, in bytes. Should be at least twice the
    /// link's bandwidth-delay product, or the window caps the throughput.
    #[serde(
        rename = "window",
        default = "default_window",
        deserialize_with = "de_size"
    )]
    pub window_bytes: u64,
    /// Default 100 ms: the RTT assumed before the first measurement.
    #[serde(default = "default_initial_rtt", deserialize_with = "de_duration")]
    pub initial_rtt: Duration,
    /// Default 5 s: how long a dial waits for a handshake (TCP and TLS, or
    /// QUIC under `transport = "auto"`, after which it falls back to TCP).
    #[serde(
        default = "default_handshake_timeout",
        deserialize_with = "de_duration"
    )]
    pub handshake_timeout: Duration,
    /// Default 60 s: after falling back to TCP, how often a dialler tries a
    /// QUIC handshake again, moving back to QUIC when one completes.
    #[serde(default = "default_quic_retry", deserialize_with = "de_duration")]
    pub quic_retry: Duration,
    /// Default 60 s; `0s` disables it. After a connection that carried a
    /// session drops, the dialler tries again at once and back to back
    /// (each try bounded by a few round trips) for this long, so a peer
    /// that returns is found within about a second; then it backs off up
    /// to `max-backoff`, so a peer really gone is not hammered.
    #[serde(default = "default_return_window", deserialize_with = "de_duration")]
    pub return_window: Duration,
}

fn default_congestion() -> Congestion {
    Congestion::Bbr
}
fn default_idle_timeout() -> Duration {
    Duration::from_secs(30)
}
fn default_keep_alive() -> Duration {
    Duration::from_secs(5)
}
fn default_window() -> u64 {
    16 << 20
}
fn default_initial_rtt() -> Duration {
    Duration::from_millis(100)
}
fn default_handshake_timeout() -> Duration {
    Duration::from_secs(5)
}
fn default_quic_retry() -> Duration {
    Duration::from_secs(60)
}
fn default_return_window() -> Duration {
    Duration::from_secs(60)
}

impl Default for TransportSettings {
    fn default() -> Self {
        TransportSettings {
            congestion: default_congestion(),
            idle_timeout: default_idle_timeout(),
            keep_alive: default_keep_alive(),
            window_bytes: default_window(),
            initial_rtt: default_initial_rtt(),
            handshake_timeout: default_handshake_timeout(),
            quic_retry: default_quic_retry(),
            return_window: default_return_window(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn settings_parse_from_toml_with_units_and_default_when_absent() {
        let t: TransportSettings = toml::from_str("").unwrap();
        assert_eq!(t.congestion, Congestion::Bbr);
        assert_eq!(t.window_bytes, 16 << 20);
        assert_eq!(t.idle_timeout, Duration::from_secs(30));
        let t: TransportSettings = toml::from_str(
            "congestion = \"cubic\"\nidle-timeout = \"0s\"\nkeep-alive = \"2s\"\nwindow = \"64MiB\"\ninitial-rtt = \"300ms\"",
        )
        .unwrap();
        assert_eq!(t.congestion, Congestion::Cubic);
        assert_eq!(t.idle_timeout, Duration::ZERO);
        assert_eq!(t.keep_alive, Duration::from_secs(2));
        assert_eq!(t.window_bytes, 64 << 20);
        assert_eq!(t.initial_rtt, Duration::from_millis(300));
        let t: TransportSettings = toml::from_str("window = 1048576").unwrap();
        assert_eq!(t.window_bytes, 1 << 20);
        for (text, setting) in [
            ("window = \"12 parsecs\"", "window"),
            ("congestion = \"vegas\"", "congestion"),
            ("idle-timeout = \"soon\"", "idle-timeout"),
            ("keep-alive = \"5 parsecs\"", "keep-alive"),
            ("initial-rtt = 3", "initial-rtt"),
        ] {
            let err = toml::from_str::<TransportSettings>(text)
                .unwrap_err()
                .to_string();
            assert!(err.contains(setting), "{text}: {err}");
        }
    }
}
