//! QUIC endpoints for both daemons: mutual TLS with pinned fingerprints
//! (the only mode), and the quinn transport configuration built from the
//! [`TransportSettings`] of the config (sized for long, thin links). Both
//! the sender's `ship` and the receiver's `ingest` dial or accept here.

use std::net::SocketAddr;
use std::sync::Arc;

use quinn::crypto::rustls::{QuicClientConfig, QuicServerConfig};
use rustls::pki_types::CertificateDer;

use crate::transport::settings::{Congestion, TransportSettings};
use crate::transport::tls::{
    fingerprint, Fingerprint, Identity, PinnedClientVerifier, PinnedServerVerifier, TlsError,
};

/// ALPN protocol id; both sides require it.
pub const ALPN: &[u8] = b"pgcourier/1";
/// The server name clients ask for (certificates are pinned, names unused).
pub const SERVER_NAME: &str = "pgcourier";

/// The quinn transport configuration for `settings`, used on both sides.
/// A zero idle timeout or keep-alive interval disables it.
pub fn transport_config(settings: &TransportSettings) -> Result<quinn::TransportConfig, TlsError> {
    let window = quinn::VarInt::from_u64(settings.window_bytes).map_err(|_| {
        TlsError::Config(format!(
            "QUIC window of {} bytes is too large (at most 2^62 - 1)",
            settings.window_bytes
        ))
    })?;
    let idle = if settings.idle_timeout.is_zero() {
        None
    } else {
        Some(
            quinn::IdleTimeout::try_from(settings.idle_timeout).map_err(|_| {
                TlsError::Config(format!(
                    "QUIC idle timeout {:?} is too large",
                    settings.idle_timeout
                ))
            })?,
        )
    };
    let mut t = quinn::TransportConfig::default();
    t.max_idle_timeout(idle)
        .keep_alive_interval((!settings.keep_alive.is_zero()).then_some(settings.keep_alive))
        .stream_receive_window(window)
        .receive_window(window)
        .send_window(settings.window_bytes)
        .initial_rtt(settings.initial_rtt)
        .max_concurrent_uni_streams(quinn::VarInt::from_u32(16))
        .max_concurrent_bidi_streams(quinn::VarInt::from_u32(4));
    match settings.congestion {
        Congestion::Cubic => {
            t.congestion_controller_factory(Arc::new(quinn::congestion::CubicConfig::default()))
        }
        Congestion::Bbr => {
            t.congestion_controller_factory(Arc::new(quinn::congestion::BbrConfig::default()))
        }
        Congestion::NewReno => {
            t.congestion_controller_factory(Arc::new(quinn::congestion::NewRenoConfig::default()))
        }
    };
    Ok(t)
}

fn crypto_provider() -> Arc<rustls::crypto::CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

/// TLS 1.3 client configuration presenting `identity` and accepting only
/// pinned server certificates.
pub(crate) fn client_crypto(
    identity: &Identity,
    pinned: &[Fingerprint],
) -> Result<rustls::ClientConfig, TlsError> {
    let mut cfg = rustls::ClientConfig::builder_with_provider(crypto_provider())
        .with_protocol_versions(&[&rustls::version::TLS13])
        .map_err(|e| TlsError::Config(format!("TLS 1.3 client setup: {e}")))?
        .dangerous()
        .with_custom_certificate_verifier(PinnedServerVerifier::new(pinned.iter().copied()))
        .with_client_auth_cert(vec![identity.cert.clone()], identity.key.clone_key())
        .map_err(|e| {
            TlsError::Config(format!(
                "own certificate/key unusable as TLS client identity: {e}"
            ))
        })?;
    cfg.alpn_protocols = vec![ALPN.to_vec()];
    // Every connection runs the full pinned verification (no resumption).
    cfg.resumption = rustls::client::Resumption::disabled();
    cfg.enable_early_data = false;
    Ok(cfg)
}

/// TLS 1.3 server configuration presenting `identity` and requiring a
/// pinned client certificate.
pub(crate) fn server_crypto(
    identity: &Identity,
    pinned: &[Fingerprint],
) -> Result<rustls::ServerConfig, TlsError> {
    let mut cfg = rustls::ServerConfig::builder_with_provider(crypto_provider())
        .with_protocol_versions(&[&rustls::version::TLS13])
        .map_err(|e| TlsError::Config(format!("TLS 1.3 server setup: {e}")))?
        .with_client_cert_verifier(PinnedClientVerifier::new(pinned.iter().copied()))
        .with_single_cert(vec![identity.cert.clone()], identity.key.clone_key())
        .map_err(|e| {
            TlsError::Config(format!(
                "own certificate/key unusable as TLS server identity: {e}"
            ))
        })?;
    cfg.alpn_protocols = vec![ALPN.to_vec()];
    // Every connection runs the full pinned verification (no resumption).
    cfg.session_storage = Arc::new(rustls::server::NoServerSessionStorage {});
    cfg.send_tls13_tickets = 0;
    cfg.max_early_data_size = 0;
    Ok(cfg)
}

/// A QUIC endpoint bound to `bind` that can dial peers (client config set as
/// default) and, when `listen` is true, accept them. Both directions present
/// `identity` and accept only peers whose certificate fingerprint is in
/// `pinned`; a refused peer is logged once with the fingerprint it offered.
pub fn endpoint(
    bind: SocketAddr,
    identity: &Identity,
    pinned: &[Fingerprint],
    transport: &TransportSettings,
    listen: bool,
) -> Result<quinn::Endpoint, TlsError> {
    let client = Arc::new(client_crypto(identity, pinned)?);
    let server = Arc::new(server_crypto(identity, pinned)?);
    endpoint_with(bind, identity, pinned, transport, listen, &client, &server)
}

/// [`endpoint`] with TLS configurations already built (shared with the TCP
/// transport by [`crate::transport::link::Net`]).
pub(crate) fn endpoint_with(
    bind: SocketAddr,
    identity: &Identity,
    pinned: &[Fingerprint],
    transport: &TransportSettings,
    listen: bool,
    client_crypto: &Arc<rustls::ClientConfig>,
    server_crypto: &Arc<rustls::ServerConfig>,
) -> Result<quinn::Endpoint, TlsError> {
    if pinned.is_empty() {
        tracing::warn!(%bind, "no peer certificate fingerprints are pinned: every peer will be refused");
    }
    let transport = Arc::new(transport_config(transport)?);

    let client_tls = QuicClientConfig::try_from(client_crypto.clone()).map_err(|e| {
        TlsError::Config(format!("TLS client configuration unusable for QUIC: {e}"))
    })?;
    let mut client = quinn::ClientConfig::new(Arc::new(client_tls));
    client.transport_config(transport.clone());

    let server = if listen {
        let server_tls = QuicServerConfig::try_from(server_crypto.clone()).map_err(|e| {
            TlsError::Config(format!("TLS server configuration unusable for QUIC: {e}"))
        })?;
        let mut server = quinn::ServerConfig::with_crypto(Arc::new(server_tls));
        server.transport_config(transport);
        Some(server)
    } else {
        None
    };
    let socket =
        std::net::UdpSocket::bind(bind).map_err(|source| TlsError::Bind { addr: bind, source })?;
    let runtime = quinn::default_runtime()
        .ok_or_else(|| TlsError::Config("no async runtime for QUIC".into()))?;
    let mut endpoint = quinn::Endpoint::new(endpoint_config(identity), server, socket, runtime)
        .map_err(|source| TlsError::Bind { addr: bind, source })?;
    endpoint.set_default_client_config(client);
    Ok(endpoint)
}

/// Endpoint settings with a stateless-reset key derived from the node's
/// private key: stable across restarts, so a restarted daemon resets the
/// connections its previous process held and the peer reconnects at once,
/// instead of waiting out the idle timeout.
fn endpoint_config(identity: &Identity) -> quinn::EndpointConfig {
    use sha2::{Digest, Sha256};
    let mut h = Sha256::new();
    h.update(b"pgcourier stateless reset key v1");
    h.update(identity.key.secret_der());
    let secret = h.finalize();
    let mut config = quinn::EndpointConfig::new(Arc::new(ring::hmac::Key::new(
        ring::hmac::HMAC_SHA256,
        &secret,
    )));
    // Connection IDs are validated with a hash key; it must survive restarts
    // too, or the new process drops the old connection's packets as invalid
    // instead of answering them with a reset.
    let cid_key = u64::from_le_bytes(
        secret[..8]
            .try_into()
            .expect("a SHA-256 digest has 32 bytes"),
    );
    config.cid_generator(move || {
        Box::new(quinn_proto::HashedConnectionIdGenerator::from_key(cid_key))
    });
    config
}

/// The fingerprint of the certificate the peer presented on `conn`.
pub fn peer_fingerprint(conn: &quinn::Connection) -> Option<Fingerprint> {
    let certs = conn
        .peer_identity()?
        .downcast::<Vec<CertificateDer<'static>>>()
        .ok()?;
    certs.first().map(|c| fingerprint(c))
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;
    use crate::transport::tls::generate_identity;
    use crate::transport::tls::test_support::capture_warnings;

    type BoxError = Box<dyn std::error::Error + Send + Sync>;

    const LIMIT: Duration = Duration::from_secs(20);

    fn localhost() -> SocketAddr {
        "127.0.0.1:0".parse().unwrap()
    }

    fn identity(name: &str) -> Identity {
        generate_identity(name, |_| {}).unwrap()
    }

    fn expired_identity(name: &str) -> Identity {
        generate_identity(name, |p| {
            p.not_before = rcgen::date_time_ymd(2000, 1, 1);
            p.not_after = rcgen::date_time_ymd(2001, 1, 1);
        })
        .unwrap()
    }

    /// Dial `server`, send `msg` on a bidi stream and read the reply.
    async fn dial_and_exchange(
        client: &quinn::Endpoint,
        server: SocketAddr,
        msg: &[u8],
    ) -> Result<(quinn::Connection, Vec<u8>), BoxError> {
        let conn = client.connect(server, SERVER_NAME)?.await?;
        let (mut send, mut recv) = conn.open_bi().await?;
        send.write_all(msg).await?;
        send.finish()?;
        let reply = recv.read_to_end(1 << 16).await?;
        Ok((conn, reply))
    }

    /// Accept one connection and answer one bidi stream with "ack:" + data;
    /// returns the peer's fingerprint and the data received.
    async fn accept_one(
        server: quinn::Endpoint,
    ) -> Result<(Option<Fingerprint>, Vec<u8>), BoxError> {
        let incoming = server.accept().await.ok_or("endpoint closed")?;
        let conn = incoming.await?;
        let peer = peer_fingerprint(&conn);
        let (mut send, mut recv) = conn.accept_bi().await?;
        let data = recv.read_to_end(1 << 16).await?;
        send.write_all(&[b"ack:".as_slice(), &data].concat())
            .await?;
        send.finish()?;
        // Let the client read the reply and close.
        conn.closed().await;
        Ok((peer, data))
    }

    /// An error with all its sources, for assertions on what a peer was told.
    fn chain(e: &(dyn std::error::Error + 'static)) -> String {
        let mut text = e.to_string();
        let mut source = e.source();
        while let Some(s) = source {
            text.push_str(&format!(": {s}"));
            source = s.source();
        }
        text
    }

    /// Run a refused handshake: the server must never hand out a connection
    /// and the client must not get any application data through.
    async fn assert_refused(server: quinn::Endpoint, client: quinn::Endpoint) -> (String, String) {
        let addr = server.local_addr().unwrap();
        let server_task = tokio::spawn(accept_one(server));
        let client_err = match dial_and_exchange(&client, addr, b"secret").await {
            Ok((_, reply)) => panic!("refused client exchanged data: {reply:?}"),
            Err(e) => chain(&*e),
        };
        let server_err = match server_task.await.unwrap() {
            Ok((peer, data)) => panic!("server accepted a refused peer {peer:?} and read {data:?}"),
            Err(e) => chain(&*e),
        };
        (client_err, server_err)
    }

    #[tokio::test]
    async fn mutually_pinned_peers_complete_a_handshake_exchange_bytes_and_see_each_others_fingerprint(
    ) {
        tokio::time::timeout(LIMIT, async {
            let (hq, branch) = (identity("hq"), identity("branch"));
            let settings = TransportSettings::default();
            let server =
                endpoint(localhost(), &branch, &[hq.fingerprint()], &settings, true).unwrap();
            let addr = server.local_addr().unwrap();
            let client =
                endpoint(localhost(), &hq, &[branch.fingerprint()], &settings, false).unwrap();

            let server_task = tokio::spawn(accept_one(server));
            let (conn, reply) = dial_and_exchange(&client, addr, b"hello over quic")
                .await
                .unwrap();
            assert_eq!(reply, b"ack:hello over quic");
            assert_eq!(peer_fingerprint(&conn), Some(branch.fingerprint()));
            let hs = conn
                .handshake_data()
                .unwrap()
                .downcast::<quinn::crypto::rustls::HandshakeData>()
                .unwrap();
            assert_eq!(hs.protocol.as_deref(), Some(ALPN));
            conn.close(0u32.into(), b"done");

            let (peer, data) = server_task.await.unwrap().unwrap();
            assert_eq!(peer, Some(hq.fingerprint()));
            assert_eq!(data, b"hello over quic");
            client.wait_idle().await;
        })
        .await
        .expect("test timed out");
    }

    #[tokio::test]
    async fn a_listening_endpoint_can_also_dial_with_its_default_client_config() {
        tokio::time::timeout(LIMIT, async {
            let (a, b) = (identity("a"), identity("b"));
            let settings = TransportSettings::default();
            let both = [a.fingerprint(), b.fingerprint()];
            let ep_a = endpoint(localhost(), &a, &both, &settings, true).unwrap();
            let ep_b = endpoint(localhost(), &b, &both, &settings, true).unwrap();
            let addr_b = ep_b.local_addr().unwrap();
            let server_task = tokio::spawn(accept_one(ep_b));
            let (conn, reply) = dial_and_exchange(&ep_a, addr_b, b"x").await.unwrap();
            assert_eq!(reply, b"ack:x");
            conn.close(0u32.into(), b"done");
            assert_eq!(server_task.await.unwrap().unwrap().0, Some(a.fingerprint()));
        })
        .await
        .expect("test timed out");
    }

    #[tokio::test]
    async fn a_client_whose_certificate_the_server_does_not_pin_is_refused_and_logged_once() {
        let (guard, logs) = capture_warnings();
        tokio::time::timeout(LIMIT, async {
            let (hq, branch, stranger) = (identity("hq"), identity("branch"), identity("stranger"));
            let settings = TransportSettings::default();
            let server =
                endpoint(localhost(), &branch, &[hq.fingerprint()], &settings, true).unwrap();
            // The stranger pins the server correctly; only the server refuses.
            let client = endpoint(
                localhost(),
                &stranger,
                &[branch.fingerprint()],
                &settings,
                false,
            )
            .unwrap();
            let (client_err, server_err) = assert_refused(server, client).await;
            eprintln!("client saw: {client_err}\nserver saw: {server_err}");
            assert!(server_err.contains("not pinned"), "{server_err}");
            // The refused client is told why (the close reason carries it).
            assert!(client_err.contains("not pinned"), "{client_err}");
            assert!(server_err.contains("not pinned"), "{server_err}");

            let text = logs.text();
            let lines: Vec<&str> = text.lines().filter(|l| l.contains("not pinned")).collect();
            assert_eq!(lines.len(), 1, "{text}");
            assert!(
                lines[0].contains(&format!("offered={}", stranger.fingerprint())),
                "{}",
                lines[0]
            );
            assert!(lines[0].contains("client"), "{}", lines[0]);
        })
        .await
        .expect("test timed out");
        drop(guard);
    }

    #[tokio::test]
    async fn a_server_whose_certificate_the_client_does_not_pin_is_refused_and_logged_once() {
        let (guard, logs) = capture_warnings();
        tokio::time::timeout(LIMIT, async {
            let (hq, branch, impostor) = (identity("hq"), identity("branch"), identity("impostor"));
            let settings = TransportSettings::default();
            // The impostor would accept hq, but hq only pins the real branch.
            let server =
                endpoint(localhost(), &impostor, &[hq.fingerprint()], &settings, true).unwrap();
            let client =
                endpoint(localhost(), &hq, &[branch.fingerprint()], &settings, false).unwrap();
            let (client_err, server_err) = assert_refused(server, client).await;
            eprintln!("client saw: {client_err}\nserver saw: {server_err}");
            assert!(client_err.contains("not pinned"), "{client_err}");
            assert!(server_err.contains("not pinned"), "{server_err}");

            let text = logs.text();
            let lines: Vec<&str> = text.lines().filter(|l| l.contains("not pinned")).collect();
            assert_eq!(lines.len(), 1, "{text}");
            assert!(
                lines[0].contains(&format!("offered={}", impostor.fingerprint())),
                "{}",
                lines[0]
            );
            assert!(lines[0].contains("server"), "{}", lines[0]);
        })
        .await
        .expect("test timed out");
        drop(guard);
    }

    #[tokio::test]
    async fn an_expired_certificate_is_refused_even_when_pinned() {
        tokio::time::timeout(LIMIT, async {
            let settings = TransportSettings::default();

            // Expired server certificate, pinned by the client.
            let (hq, old_branch) = (identity("hq"), expired_identity("old-branch"));
            let server = endpoint(
                localhost(),
                &old_branch,
                &[hq.fingerprint()],
                &settings,
                true,
            )
            .unwrap();
            let client = endpoint(
                localhost(),
                &hq,
                &[old_branch.fingerprint()],
                &settings,
                false,
            )
            .unwrap();
            let (client_err, server_err) = assert_refused(server, client).await;
            eprintln!("client saw: {client_err}\nserver saw: {server_err}");
            assert!(client_err.contains("expired"), "{client_err}");
            assert!(server_err.contains("expired"), "{server_err}");

            // Expired client certificate, pinned by the server.
            let (old_hq, branch) = (expired_identity("old-hq"), identity("branch"));
            let server = endpoint(
                localhost(),
                &branch,
                &[old_hq.fingerprint()],
                &settings,
                true,
            )
            .unwrap();
            let client = endpoint(
                localhost(),
                &old_hq,
                &[branch.fingerprint()],
                &settings,
                false,
            )
            .unwrap();
            let (client_err, server_err) = assert_refused(server, client).await;
            eprintln!("client saw: {client_err}\nserver saw: {server_err}");
            assert!(server_err.contains("expired"), "{server_err}");
            assert!(client_err.contains("expired"), "{client_err}");
        })
        .await
        .expect("test timed out");
    }

    #[tokio::test]
    async fn binding_an_address_in_use_fails_naming_the_address() {
        let taken = std::net::UdpSocket::bind(localhost()).unwrap();
        let addr = taken.local_addr().unwrap();
        let id = identity("x");
        for listen in [true, false] {
            let err = endpoint(
                addr,
                &id,
                &[id.fingerprint()],
                &TransportSettings::default(),
                listen,
            )
            .unwrap_err();
            assert!(matches!(err, TlsError::Bind { .. }), "{err:?}");
            assert!(err.to_string().contains(&addr.to_string()), "{err}");
        }
    }

    #[test]
    fn transport_settings_out_of_range_are_configuration_errors() {
        let t = TransportSettings {
            window_bytes: u64::MAX,
            ..TransportSettings::default()
        };
        assert!(matches!(transport_config(&t), Err(TlsError::Config(_))));
        let t = TransportSettings {
            idle_timeout: Duration::from_secs(u64::MAX / 2),
            ..TransportSettings::default()
        };
        assert!(matches!(transport_config(&t), Err(TlsError::Config(_))));
        let t = TransportSettings {
            idle_timeout: Duration::ZERO,
            keep_alive: Duration::ZERO,
            ..TransportSettings::default()
        };
        transport_config(&t).unwrap();
        transport_config(&TransportSettings::default()).unwrap();
    }
}
