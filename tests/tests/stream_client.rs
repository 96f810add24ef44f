//! Issue 13: the sender's replication connection
//! (sender/src/replication/) against a real PostgreSQL 15: login with
//! `replication=database` (trust, SCRAM-SHA-256, MD5, and a refused
//! password), `START_REPLICATION` of a pgoutput slot, the messages in
//! commit order, the walsender visible in `pg_stat_replication`, and a
//! standby status update moving the slot's `confirmed_flush_lsn` exactly as
//! far as it says: a new stream starts after it.

use std::time::Duration;

use anyhow::Context;
use pgcourier_proto::pgoutput::{self, Message};
use pgcourier_proto::walstream::{self, ServerMessage, StatusUpdate};
use pgcourier_proto::Lsn;
use pgcourier_sender::replication::{
    ReplicationConnection, ReplicationError, ReplicationStream, StartupParams,
};
use pgcourier_tests::{wait_until, PgCluster};

const WAIT: Duration = Duration::from_secs(60);

async fn connect(
    pg: &PgCluster,
    user: &str,
    password: Option<&str>,
) -> Result<ReplicationConnection, ReplicationError> {
    let path = pg.socket_dir().join(format!(".s.PGSQL.{}", pg.port()));
    let io = tokio::net::UnixStream::connect(&path).await?;
    ReplicationConnection::connect(
        Box::new(io),
        &StartupParams {
            user: user.into(),
            database: "postgres".into(),
            password: password.map(str::to_owned),
            application_name: "pgcourier-stream-test".into(),
            options: None,
            tls: false,
            tls_end_point: None,
        },
    )
    .await
}

/// Messages of the stream until `commits` Commits have been seen:
/// (kind, commit end LSN for Commits).
async fn read_transactions(
    stream: &mut ReplicationStream,
    commits: usize,
) -> anyhow::Result<Vec<Message>> {
    let mut out = Vec::new();
    let mut seen = 0;
    let deadline = tokio::time::Instant::now() + WAIT;
    while seen < commits {
        let payload = tokio::time::timeout_at(deadline, stream.next())
            .await
            .context("waiting for the stream")??
            .context("the server ended the stream")?;
        match walstream::parse(&payload)? {
            ServerMessage::XLogData { data, .. } => {
                let m = pgoutput::decode(data)?;
                if matches!(m, Message::Commit { .. }) {
                    seen += 1;
                }
                out.push(m);
            }
            ServerMessage::Keepalive { .. } => {}
        }
    }
    Ok(out)
}

fn inserted_ids(messages: &[Message]) -> Vec<String> {
    messages
        .iter()
        .filter_map(|m| match m {
            Message::Insert { new, .. } => match new.first() {
                Some(pgoutput::Value::Text(id)) => Some(id.clone()),
                other => Some(format!("{other:?}")),
            },
            _ => None,
        })
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_slot_streams_in_commit_order_and_a_status_update_confirms_exactly_what_it_says(
) -> anyhow::Result<()> {
    let pg = PgCluster::start("stream-client")?;
    pg.execute(
        "postgres",
        "CREATE TABLE t (id int PRIMARY KEY, v text);
         CREATE PUBLICATION p FOR TABLE t;",
    )
    .await?;
    // Not in the same (implicit) transaction as writes.
    pg.execute(
        "postgres",
        "SELECT pg_create_logical_replication_slot('s', 'pgoutput')",
    )
    .await?;
    for id in 1..=3 {
        pg.execute("postgres", &format!("INSERT INTO t VALUES ({id}, 'v{id}')"))
            .await?;
    }
    let mut conn = connect(&pg, "postgres", None).await?;
    let system = conn.simple_query("IDENTIFY_SYSTEM").await?;
    anyhow::ensure!(
        system.len() == 1 && system[0].len() == 4,
        "IDENTIFY_SYSTEM: {system:?}"
    );
    let options = [("proto_version", "1"), ("publication_names", "\"p\"")];
    let mut stream = conn.start_logical("s", Lsn::ZERO, &options).await?;
    let messages = read_transactions(&mut stream, 3).await?;
    let ids = inserted_ids(&messages);
    anyhow::ensure!(ids.len() == 3, "three inserts expected: {messages:?}");
    let commit_ends: Vec<Lsn> = messages
        .iter()
        .filter_map(|m| match m {
            Message::Commit { end_lsn, .. } => Some(*end_lsn),
            _ => None,
        })
        .collect();
    anyhow::ensure!(
        commit_ends.windows(2).all(|w| w[0] < w[1]),
        "commits out of order: {commit_ends:?}"
    );

    // An active walsender, as DBAs' monitoring sees it.
    let client = pg.client("postgres").await?;
    let row = client
        .query_one(
            "SELECT (SELECT count(*) FROM pg_stat_replication WHERE application_name = 'pgcourier-stream-test'),
                    (SELECT active FROM pg_replication_slots WHERE slot_name = 's')",
            &[],
        )
        .await?;
    anyhow::ensure!(
        row.get::<_, i64>(0) == 1 && row.get::<_, bool>(1),
        "walsender not visible: pg_stat_replication rows {}, slot active {}",
        row.get::<_, i64>(0),
        row.get::<_, bool>(1)
    );

    // Confirm the first two transactions only.
    let flush = commit_ends[1];
    stream
        .send_status(StatusUpdate {
            write: commit_ends[2],
            flush,
            apply: flush,
            now: 0,
            reply_requested: false,
        })
        .await?;
    wait_until("the slot's confirmed_flush_lsn follows the status update", WAIT, || {
        let client = &client;
        async move {
            let lsn: String = client
                .query_one(
                    "SELECT confirmed_flush_lsn::text FROM pg_replication_slots WHERE slot_name = 's'",
                    &[],
                )
                .await?
                .get(0);
            Ok(lsn.parse::<Lsn>()? == flush)
        }
    })
    .await?;
    stream.close(Duration::from_secs(5)).await;
    wait_until("the slot is released", WAIT, || {
        let client = &client;
        async move {
            Ok(!client
                .query_one(
                    "SELECT active FROM pg_replication_slots WHERE slot_name = 's'",
                    &[],
                )
                .await?
                .get::<_, bool>(0))
        }
    })
    .await?;

    // Streaming again from 0/0 starts after what was confirmed: the third
    // transaction, then a new one.
    pg.execute("postgres", "INSERT INTO t VALUES (4, 'v4')")
        .await?;
    let conn = connect(&pg, "postgres", None).await?;
    let mut stream = conn.start_logical("s", Lsn::ZERO, &options).await?;
    let again = inserted_ids(&read_transactions(&mut stream, 2).await?);
    anyhow::ensure!(
        again == ["3", "4"] && ids == ["1", "2", "3"],
        "after confirming two transactions the stream restarted with {again:?} (first stream {ids:?})"
    );
    stream.close(Duration::from_secs(5)).await;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn scram_and_md5_logins_work_and_a_wrong_password_is_a_definite_refusal() -> anyhow::Result<()>
{
    let pg = PgCluster::start("stream-auth")?;
    pg.execute(
        "postgres",
        "SET password_encryption = 'scram-sha-256';
         CREATE ROLE scram_user LOGIN REPLICATION PASSWORD 'scram-pw';
         SET password_encryption = 'md5';
         CREATE ROLE md5_user LOGIN REPLICATION PASSWORD 'md5-pw';",
    )
    .await?;
    // Password logins for these two roles on the socket; trust for the rest.
    let hba = pg.data_dir().join("pg_hba.conf");
    let old = std::fs::read_to_string(&hba)?;
    std::fs::write(
        &hba,
        format!(
            "local all scram_user scram-sha-256\nlocal all md5_user md5\n\
             local replication scram_user scram-sha-256\nlocal replication md5_user md5\n{old}"
        ),
    )?;
    pg.execute("postgres", "SELECT pg_reload_conf()").await?;
    tokio::time::sleep(Duration::from_millis(300)).await;

    let mut c = connect(&pg, "scram_user", Some("scram-pw")).await?;
    c.simple_query("IDENTIFY_SYSTEM").await?;
    let mut c = connect(&pg, "md5_user", Some("md5-pw")).await?;
    c.simple_query("IDENTIFY_SYSTEM").await?;

    for (user, pw) in [("scram_user", Some("wrong")), ("md5_user", Some("wrong"))] {
        let err = match connect(&pg, user, pw).await {
            Ok(_) => anyhow::bail!("{user} logged in with a wrong password"),
            Err(e) => e,
        };
        let fault = err.fault();
        anyhow::ensure!(
            !fault.transient && fault.class == "login_refused",
            "{user}: {err} classified {fault:?}"
        );
        anyhow::ensure!(err.to_string().contains("28P01"), "{user}: {err}");
    }
    let err = match connect(&pg, "scram_user", None).await {
        Ok(_) => anyhow::bail!("logged in with no password"),
        Err(e) => e,
    };
    anyhow::ensure!(
        matches!(err, ReplicationError::Auth(_)) && !err.fault().transient,
        "no password: {err}"
    );
    Ok(())
}
