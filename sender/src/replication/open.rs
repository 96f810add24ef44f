//! Opening a replication connection from the `source` setting: the first
//! host it names (a Unix socket directory or a TCP host) and its login.

use std::time::Duration;

use tokio_postgres::config::Host;

use super::{ReplicationConnection, ReplicationError, StartupParams, Transport};

/// How long the TCP or socket connect may take.
const DIAL_TIMEOUT: Duration = Duration::from_secs(30);

/// Connect to the source named by `cfg` with `replication=database`.
pub async fn open(cfg: &tokio_postgres::Config) -> Result<ReplicationConnection, ReplicationError> {
    let host = cfg
        .get_hosts()
        .first()
        .cloned()
        .unwrap_or_else(|| Host::Unix("/var/run/postgresql".into()));
    let port = cfg.get_ports().first().copied().unwrap_or(5432);
    let dial = async {
        let io: Box<dyn Transport> = match &host {
            Host::Tcp(name) => {
                let stream = tokio::net::TcpStream::connect((name.as_str(), port)).await?;
                stream.set_nodelay(true)?;
                Box::new(stream)
            }
            Host::Unix(dir) => {
                let path = dir.join(format!(".s.PGSQL.{port}"));
                Box::new(tokio::net::UnixStream::connect(path).await?)
            }
        };
        Ok::<_, std::io::Error>(io)
    };
    let io = tokio::time::timeout(DIAL_TIMEOUT, dial)
        .await
        .map_err(|_| ReplicationError::Timeout("connecting"))??;
    let user = cfg
        .get_user()
        .map(str::to_owned)
        .or_else(|| std::env::var("USER").ok())
        .unwrap_or_else(|| "postgres".into());
    let params = StartupParams {
        database: cfg.get_dbname().map_or_else(|| user.clone(), str::to_owned),
        user,
        password: cfg
            .get_password()
            .map(|p| String::from_utf8_lossy(p).into_owned()),
        application_name: cfg.get_application_name().unwrap_or("pgcourier").to_owned(),
    };
    ReplicationConnection::connect(io, &params).await
}
