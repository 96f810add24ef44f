//! Opening a replication connection from the `source` setting: the same
//! hosts, TLS (sslmode, sslrootcert, client certificate) and login as
//! every other source connection (`pgcourier_common::pg::connect`), then
//! our own startup with `replication=database`.

use pgcourier_common::pg::connect::{PgConnect, PgStream, SslMode, Target};

use super::{ReplicationConnection, ReplicationError, StartupParams};

/// Connect to the first of the source's hosts that accepts, as libpq
/// would: a definite refusal anywhere is what is reported.
pub async fn open(cfg: &PgConnect) -> Result<ReplicationConnection, ReplicationError> {
    let mut definite = None;
    let mut last = None;
    for target in cfg.targets() {
        let attempt = async {
            let stream = cfg
                .open_stream(target)
                .await
                .map_err(ReplicationError::Connect)?;
            match login(cfg, target, stream).await {
                // sslmode=allow: plaintext first, TLS when the server
                // refuses the plaintext login.
                Err(ReplicationError::Server(_)) if cfg.ssl_mode() == SslMode::Allow => {
                    let stream = cfg
                        .open_tls_stream(target)
                        .await
                        .map_err(ReplicationError::Connect)?;
                    login(cfg, target, stream).await
                }
                r => r,
            }
        };
        let result = match cfg.connect_timeout() {
            Some(limit) => tokio::time::timeout(limit, attempt)
                .await
                .unwrap_or(Err(ReplicationError::Timeout("connecting"))),
            None => attempt.await,
        };
        match result {
            Ok(c) => return Ok(c),
            Err(e) if !e.fault().transient && definite.is_none() => definite = Some(e),
            Err(e) => last = Some(e),
        }
    }
    Err(definite
        .or(last)
        .unwrap_or_else(|| ReplicationError::Protocol("setting `source` names no host".into())))
}

async fn login(
    cfg: &PgConnect,
    target: &Target,
    stream: PgStream,
) -> Result<ReplicationConnection, ReplicationError> {
    let params = StartupParams {
        user: cfg.user().to_owned(),
        database: cfg.dbname().to_owned(),
        password: target.password().map(str::to_owned),
        application_name: cfg.application_name().unwrap_or("pgcourier").to_owned(),
        options: cfg.options().map(str::to_owned),
        tls: stream.is_tls(),
        tls_end_point: stream.server_end_point(),
    };
    ReplicationConnection::connect(Box::new(stream), &params).await
}
