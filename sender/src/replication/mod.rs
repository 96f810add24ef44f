//! A replication connection to the source: PostgreSQL's frontend/backend
//! protocol with `replication=database`, just enough of it to stream a
//! logical slot. Step 1 of a change's path (WAL → records → spool …): the
//! walsender decodes WAL once, in order, as it is written, and sends each
//! pgoutput message as XLogData; capture answers with standby status
//! updates whose flush position is what the spool holds durably.
//!
//! Why our own client (ARCHITECTURE.md says it too): tokio-postgres has no
//! replication protocol (no CopyBoth, no `replication` startup parameter),
//! and `pgwire-replication` hard-codes `proto_version 1`, pulls rustls with
//! aws-lc-rs, and its shutdown does not send the last position. What this
//! needs is small: the startup message, authentication (SCRAM-SHA-256, MD5,
//! cleartext: `postgres-protocol` computes them), the simple query protocol
//! for the replication commands, and CopyData in both directions.
//!
//! The session: [`ReplicationConnection::connect`], then
//! [`ReplicationConnection::start_logical`] turns it into a
//! [`ReplicationStream`], whose [`ReplicationStream::next`] returns CopyData
//! payloads (parse them with `pgcourier_proto::walstream`) and whose
//! [`ReplicationStream::send_status`] confirms positions.

mod open;
mod wire;

#[cfg(test)]
mod tests;

use std::io;
use std::time::Duration;

use bytes::{Bytes, BytesMut};
use pgcourier_common::pg::connect::ConnectError;
use pgcourier_common::pg::errors::{classify_sqlstate, PgFault};
use pgcourier_common::pg::quote_ident;
use pgcourier_proto::walstream::StatusUpdate;
use pgcourier_proto::Lsn;
use postgres_protocol::authentication::sasl::{self, ScramSha256};
use postgres_protocol::message::frontend;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};

pub use open::open;
pub use wire::ServerError;
use wire::{Backend, Frame};

/// Largest message accepted from the server. PostgreSQL's own limit on a
/// value is 1 GiB; a pgoutput message carries a row, so it may be a little
/// more. A bigger length is a broken stream, not a reason to allocate.
const MAX_MESSAGE: usize = (1 << 30) + (64 << 20);

/// How long connecting and authenticating may take.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(30);

#[derive(Debug, thiserror::Error)]
pub enum ReplicationError {
    #[error("replication connection to the source: {0}")]
    Io(#[from] io::Error),
    #[error("the source refused: {0}")]
    Server(ServerError),
    #[error("replication connection to the source: {0}")]
    Protocol(String),
    #[error("replication connection to the source: authentication: {0}")]
    Auth(String),
    #[error("replication connection to the source timed out while {0}")]
    Timeout(&'static str),
    #[error("replication connection to the source")]
    Connect(#[source] ConnectError),
}

impl ReplicationError {
    /// Transient (retry with backoff) or definite, and the class for
    /// status, by the same rules as every other PostgreSQL error.
    pub fn fault(&self) -> PgFault {
        match self {
            ReplicationError::Io(_) | ReplicationError::Timeout(_) => classify_sqlstate(None),
            ReplicationError::Server(e) => classify_sqlstate(Some(&e.code)),
            ReplicationError::Connect(e) => PgFault {
                transient: e.is_transient(),
                class: e.class(),
            },
            // A server that does not speak the protocol we expect, or a
            // login we cannot make (no password, a method we lack):
            // retrying the same thing cannot help.
            ReplicationError::Protocol(_) => PgFault {
                transient: false,
                class: "server_error",
            },
            ReplicationError::Auth(_) => PgFault {
                transient: false,
                class: "login_refused",
            },
        }
    }

    fn protocol(what: impl Into<String>) -> ReplicationError {
        ReplicationError::Protocol(what.into())
    }
}

/// A byte stream to the server: TCP, a Unix socket, or TLS over TCP.
pub trait Transport: AsyncRead + AsyncWrite + Unpin + Send {}
impl<T: AsyncRead + AsyncWrite + Unpin + Send> Transport for T {}

/// Who connects, to what.
#[derive(Clone)]
pub struct StartupParams {
    pub user: String,
    pub database: String,
    pub password: Option<String>,
    pub application_name: String,
    /// libpq's `options` (command-line options for the server session).
    pub options: Option<String>,
    /// The stream is TLS.
    pub tls: bool,
    /// The server certificate's `tls-server-end-point` hash: SCRAM then
    /// binds the login to this TLS session (SCRAM-SHA-256-PLUS) when the
    /// server offers it.
    pub tls_end_point: Option<Vec<u8>>,
}

impl std::fmt::Debug for StartupParams {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("StartupParams")
            .field("user", &self.user)
            .field("database", &self.database)
            .field("password", &self.password.as_ref().map(|_| "…"))
            .field("application_name", &self.application_name)
            .finish()
    }
}

/// Rows of a simple query, as text (`None` for NULL).
pub type Rows = Vec<Vec<Option<String>>>;

/// An authenticated replication connection, ready for replication commands.
pub struct ReplicationConnection {
    io: Box<dyn Transport>,
    buf: BytesMut,
    out: BytesMut,
}

impl ReplicationConnection {
    /// Send the startup message with `replication=database` over `io`
    /// (already connected, TLS already negotiated when wanted) and
    /// authenticate.
    pub async fn connect(
        io: Box<dyn Transport>,
        params: &StartupParams,
    ) -> Result<ReplicationConnection, ReplicationError> {
        let mut conn = ReplicationConnection {
            io,
            buf: BytesMut::with_capacity(64 << 10),
            out: BytesMut::with_capacity(1024),
        };
        tokio::time::timeout(CONNECT_TIMEOUT, conn.startup(params))
            .await
            .map_err(|_| ReplicationError::Timeout("logging in"))??;
        Ok(conn)
    }

    async fn startup(&mut self, params: &StartupParams) -> Result<(), ReplicationError> {
        // Values are rendered the way PostgreSQL's own walreceiver asks
        // for them (REFERENCE.md: pgoutput's text output follows them).
        let startup = [
            ("user", params.user.as_str()),
            ("database", params.database.as_str()),
            ("replication", "database"),
            ("application_name", params.application_name.as_str()),
            ("client_encoding", "UTF8"),
            ("DateStyle", "ISO"),
            ("IntervalStyle", "postgres"),
            ("extra_float_digits", "3"),
        ];
        let options = params.options.as_deref().map(|o| ("options", o));
        frontend::startup_message(startup.iter().copied().chain(options), &mut self.out)?;
        self.flush().await?;
        self.authenticate(params).await?;
        // ParameterStatus, BackendKeyData, then ReadyForQuery.
        loop {
            match self.read_backend().await? {
                Backend::ReadyForQuery => return Ok(()),
                Backend::Error(e) => return Err(ReplicationError::Server(e)),
                Backend::Other(_) | Backend::Notice => {}
                other => {
                    return Err(ReplicationError::protocol(format!(
                        "unexpected {} after authentication",
                        other.name()
                    )))
                }
            }
        }
    }

    async fn authenticate(&mut self, params: &StartupParams) -> Result<(), ReplicationError> {
        let password = || {
            params.password.as_deref().ok_or_else(|| {
                ReplicationError::Auth(format!(
                    "the server asks a password for role {:?} and none is configured (in the connection string, password-env, password-file, PGPASSWORD or .pgpass)",
                    params.user
                ))
            })
        };
        match self.read_backend().await? {
            Backend::AuthOk => return Ok(()),
            Backend::AuthCleartext => {
                frontend::password_message(password()?.as_bytes(), &mut self.out)?;
            }
            Backend::AuthMd5(salt) => {
                let hash = postgres_protocol::authentication::md5_hash(
                    params.user.as_bytes(),
                    password()?.as_bytes(),
                    salt,
                );
                frontend::password_message(hash.as_bytes(), &mut self.out)?;
            }
            Backend::AuthSasl(mechanisms) => {
                let plus = mechanisms.iter().any(|m| m == sasl::SCRAM_SHA_256_PLUS);
                let (mechanism, binding) = match &params.tls_end_point {
                    Some(hash) if plus => (
                        sasl::SCRAM_SHA_256_PLUS,
                        sasl::ChannelBinding::tls_server_end_point(hash.clone()),
                    ),
                    _ if !mechanisms.iter().any(|m| m == sasl::SCRAM_SHA_256) => {
                        return Err(ReplicationError::Auth(format!(
                            "the server offers SASL mechanisms {mechanisms:?}, none of which pgcourier can use (SCRAM-SHA-256)"
                        )))
                    }
                    // TLS, but the server does not offer binding.
                    _ if params.tls => (sasl::SCRAM_SHA_256, sasl::ChannelBinding::unrequested()),
                    _ => (sasl::SCRAM_SHA_256, sasl::ChannelBinding::unsupported()),
                };
                let mut scram = ScramSha256::new(password()?.as_bytes(), binding);
                frontend::sasl_initial_response(mechanism, scram.message(), &mut self.out)?;
                self.flush().await?;
                match self.read_backend().await? {
                    Backend::AuthSaslContinue(data) => scram.update(&data).map_err(|e| {
                        ReplicationError::Auth(format!("the server's SCRAM challenge is malformed: {e}"))
                    })?,
                    Backend::Error(e) => return Err(ReplicationError::Server(e)),
                    other => {
                        return Err(ReplicationError::protocol(format!(
                            "unexpected {} during SCRAM",
                            other.name()
                        )))
                    }
                }
                frontend::sasl_response(scram.message(), &mut self.out)?;
                self.flush().await?;
                match self.read_backend().await? {
                    Backend::AuthSaslFinal(data) => scram.finish(&data).map_err(|e| {
                        ReplicationError::Auth(format!("the server's SCRAM proof is wrong: {e}"))
                    })?,
                    Backend::Error(e) => return Err(ReplicationError::Server(e)),
                    other => {
                        return Err(ReplicationError::protocol(format!(
                            "unexpected {} during SCRAM",
                            other.name()
                        )))
                    }
                }
            }
            Backend::Error(e) => return Err(ReplicationError::Server(e)),
            Backend::AuthOther(code) => {
                return Err(ReplicationError::Auth(format!(
                    "the server asks for authentication method {code} (GSS, SSPI or Kerberos), which pgcourier does not support: use scram-sha-256 in pg_hba.conf"
                )))
            }
            other => {
                return Err(ReplicationError::protocol(format!(
                    "unexpected {} instead of an authentication request",
                    other.name()
                )))
            }
        }
        self.flush().await?;
        match self.read_backend().await? {
            Backend::AuthOk => Ok(()),
            Backend::Error(e) => Err(ReplicationError::Server(e)),
            other => Err(ReplicationError::protocol(format!(
                "unexpected {} instead of AuthenticationOk",
                other.name()
            ))),
        }
    }

    /// Run one command with the simple query protocol; its rows as text.
    pub async fn simple_query(&mut self, sql: &str) -> Result<Rows, ReplicationError> {
        frontend::query(sql, &mut self.out)?;
        self.flush().await?;
        let mut rows = Vec::new();
        let mut error = None;
        loop {
            match self.read_backend().await? {
                Backend::DataRow(row) => rows.push(row),
                Backend::ReadyForQuery => break,
                Backend::Error(e) => error = Some(e),
                Backend::CommandComplete | Backend::Other(_) | Backend::Notice => {}
                other => {
                    return Err(ReplicationError::protocol(format!(
                        "unexpected {} in answer to a query",
                        other.name()
                    )))
                }
            }
        }
        match error {
            Some(e) => Err(ReplicationError::Server(e)),
            None => Ok(rows),
        }
    }

    /// `START_REPLICATION SLOT <slot> LOGICAL <start> (<options>)`: the
    /// server answers CopyBoth and streams from `start` (or from the slot's
    /// confirmed position, if that is further on). Option values are quoted
    /// here; names must be plain identifiers.
    pub async fn start_logical(
        mut self,
        slot: &str,
        start: Lsn,
        options: &[(&str, &str)],
    ) -> Result<ReplicationStream, ReplicationError> {
        let opts: Vec<String> = options
            .iter()
            .map(|(name, value)| format!("{} '{}'", quote_ident(name), value.replace('\'', "''")))
            .collect();
        let sql = format!(
            "START_REPLICATION SLOT {} LOGICAL {start} ({})",
            quote_ident(slot),
            opts.join(", ")
        );
        frontend::query(&sql, &mut self.out)?;
        self.flush().await?;
        loop {
            match self.read_backend().await? {
                Backend::CopyBoth => {
                    return Ok(ReplicationStream {
                        conn: self,
                        done: false,
                    })
                }
                Backend::Error(e) => {
                    // ReadyForQuery follows an error; the connection is
                    // not used again.
                    return Err(ReplicationError::Server(e));
                }
                Backend::Other(_) | Backend::Notice => {}
                other => {
                    return Err(ReplicationError::protocol(format!(
                        "unexpected {} in answer to START_REPLICATION",
                        other.name()
                    )))
                }
            }
        }
    }

    async fn flush(&mut self) -> io::Result<()> {
        if !self.out.is_empty() {
            self.io.write_all(&self.out).await?;
            self.out.clear();
        }
        self.io.flush().await
    }

    /// The next whole message from the server. Cancel safe: bytes read
    /// stay in the buffer for the next call.
    async fn read_frame(&mut self) -> Result<Frame, ReplicationError> {
        loop {
            if let Some(frame) = wire::split_frame(&mut self.buf, MAX_MESSAGE)? {
                return Ok(frame);
            }
            if self.io.read_buf(&mut self.buf).await? == 0 {
                return Err(ReplicationError::Io(io::Error::new(
                    io::ErrorKind::UnexpectedEof,
                    "the source closed the connection",
                )));
            }
        }
    }

    async fn read_backend(&mut self) -> Result<Backend, ReplicationError> {
        let frame = self.read_frame().await?;
        wire::decode(frame)
    }
}

/// A connection in CopyBoth mode, streaming a slot.
pub struct ReplicationStream {
    conn: ReplicationConnection,
    done: bool,
}

impl ReplicationStream {
    /// The next CopyData payload (parse it with
    /// `pgcourier_proto::walstream::parse`); `None` once the server has
    /// ended the stream. Cancel safe.
    pub async fn next(&mut self) -> Result<Option<Bytes>, ReplicationError> {
        if self.done {
            return Ok(None);
        }
        loop {
            match self.conn.read_backend().await? {
                Backend::CopyData(data) => return Ok(Some(data)),
                Backend::CopyDone | Backend::CommandComplete => {
                    self.done = true;
                    return Ok(None);
                }
                Backend::Error(e) => return Err(ReplicationError::Server(e)),
                Backend::Other(_) | Backend::Notice => {}
                other => {
                    return Err(ReplicationError::protocol(format!(
                        "unexpected {} in the replication stream",
                        other.name()
                    )))
                }
            }
        }
    }

    /// Whether a whole message is already buffered, so [`Self::next`] will
    /// return without waiting for the network. Capture ends a batch (and
    /// fsyncs it) when none is.
    pub fn has_buffered(&self) -> bool {
        wire::frame_ready(&self.conn.buf)
    }

    /// Send a standby status update (and flush it to the socket).
    pub async fn send_status(&mut self, update: StatusUpdate) -> Result<(), ReplicationError> {
        let payload = update.encode();
        frontend::CopyData::new(&payload[..])?.write(&mut self.conn.out);
        self.conn.flush().await?;
        Ok(())
    }

    /// End the stream the polite way: CopyDone, then Terminate, waiting at
    /// most `wait` for the server's side of it. Send the last status first:
    /// the server keeps only what a status update told it.
    pub async fn close(mut self, wait: Duration) {
        let polite = async {
            frontend::copy_done(&mut self.conn.out);
            self.conn.flush().await?;
            // Drain what the server still had in flight until its CopyDone.
            while self.next().await?.is_some() {}
            frontend::terminate(&mut self.conn.out);
            self.conn.flush().await?;
            Ok::<(), ReplicationError>(())
        };
        if let Ok(Err(e)) = tokio::time::timeout(wait, polite).await {
            tracing::debug!(error = %e, "closing the replication stream");
        }
    }
}
