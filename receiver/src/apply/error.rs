//! What can stop apply, and what happens next: [`ApplyError::is_transient`]
//! errors (the target is unreachable or restarting) are retried soon with
//! backoff; the others pause apply on the transaction they name until the
//! DBA fixes the target (or skips it), retried slowly meanwhile.
//! [`ApplyError::class`] is the stable name shown in status and metrics.
//!
//! A PostgreSQL error is shown through [`PgError`], which never carries row
//! values: the text is built from the SQLSTATE, the message and the table,
//! column and constraint names, never from DETAIL or CONTEXT (a unique
//! violation's DETAIL is `Key (email)=(...) already exists`), and the
//! quoted values of data exceptions (class 22: `invalid input syntax for
//! type integer: "..."`) and of a trigger's RAISE (class P0) are masked.

use pgcourier_common::pg::connect::ConnectError;
use pgcourier_common::pg::errors::{classify, PgError, PgFault};
use pgcourier_common::pg::progress_row::ProgressError;
use pgcourier_proto::pgoutput;
use pgcourier_proto::record::RecordError;

/// Why apply stopped; [`ApplyError::class`] says what kind of problem it is
/// and [`ApplyError::is_transient`] whether it is retried soon.
#[derive(Debug, thiserror::Error)]
pub enum ApplyError {
    #[error(transparent)]
    Connect(ConnectError),
    #[error("target query failed: {what}")]
    Target {
        what: String,
        #[source]
        source: PgError,
    },
    #[error("table {table} does not exist on the target: create it with the source's columns, then apply resumes")]
    MissingTable { table: String },
    #[error("column {column} of table {table} does not exist on the target: ALTER TABLE {table} ADD COLUMN {column} <type>, then apply resumes")]
    MissingColumn { table: String, column: String },
    #[error("table {table} is written at several sites (pgcourier.two_way) but apply runs with replica-role = false, under which its own writes would be stamped as this site's: set replica-role = true (the default)")]
    TwoWayNeedsReplicaRole { table: String },
    #[error("table {table} has no primary key on the target and no replica identity on the source: add a primary key on the target")]
    NoKey { table: String },
    #[error("record {seq} in the inbox is corrupt")]
    Corrupt {
        seq: u64,
        #[source]
        source: RecordError,
    },
    #[error("record {seq} holds an undecodable pgoutput message")]
    Decode {
        seq: u64,
        #[source]
        source: pgoutput::DecodeError,
    },
    #[error("record {seq} refers to relation {oid}, which no Relation message described")]
    UnknownRelation { seq: u64, oid: u32 },
    #[error("inbox failed")]
    Inbox(#[from] pgcourier_common::store::durable::StoreError),
    #[error("record {seq} is out of order: {message}")]
    Order { seq: u64, message: String },
    #[error("record {seq} is out of order, so it was not applied: {message}. The sender's spool holds a transaction twice or out of commit order (a sender bug): upgrade the sender, then re-seed this branch")]
    OutOfOrder { seq: u64, message: String },
    #[error("record {seq} holds copy metadata that does not decode: {message}")]
    CopyMeta { seq: u64, message: String },
    #[error("record {seq} holds a join message (pgcourier.join) that cannot be applied: {message}. The sender and the receiver disagree on the join's messages (check their versions); skipping it leaves the table out of step: re-seed it instead")]
    Join { seq: u64, message: String },
    #[error("a Relation message kept in the inbox does not decode: the inbox is damaged; restore it, or re-seed the branch")]
    StoredRelation(#[source] pgoutput::DecodeError),
    #[error("record {seq} cannot be rendered for pgcourier.skipped")]
    SkipContent {
        seq: u64,
        #[source]
        source: serde_json::Error,
    },
    #[error("record {seq} holds a schema change message that does not decode: {message}")]
    DdlMessage { seq: u64, message: String },
    #[error("the schema change in record {seq} failed at the target: {statement}. Fix what it conflicts with at the branch (a local object of the same name, a missing one) and apply retries it by itself; or apply the change at the branch by hand, then pgcourier-queue skip")]
    Ddl {
        seq: u64,
        statement: String,
        #[source]
        source: PgError,
    },
    #[error("the schema change in record {seq} is a query string of several statements, which is not replayed: {statement}. Apply it at the branch by hand, then pgcourier-queue skip")]
    DdlSeveral { seq: u64, statement: String },
    #[error("the schema change in record {seq} was made by code at headquarters (a DO block, or a function called by SELECT or CALL): its query string is not a DDL statement and is not run at the branch, where it would run that code with the apply role's rights: {statement}. Make the same schema change at the branch by hand, then pgcourier-queue skip")]
    DdlByCode { seq: u64, statement: String },
    #[error("moving sequence {sequence} forward at the target failed (apply moves each sequence that feeds a column to the values the applied rows used): if permission was denied, GRANT SELECT, UPDATE ON SEQUENCE {sequence} TO {role}; apply retries by itself")]
    Sequence {
        sequence: String,
        role: String,
        #[source]
        source: PgError,
    },
    #[error("the schema change in record {seq} changes tables and, in the same query string, objects that ddl = \"tables\" leaves out ({outside}): {statement}. Apply at the branch by hand the part it should have, then pgcourier-queue skip")]
    DdlMixed {
        seq: u64,
        statement: String,
        outside: String,
    },
    #[error(transparent)]
    Progress(#[from] ProgressError),
    #[error(transparent)]
    Seed(#[from] pgcourier_common::store::seed_file::SeedError),
}

impl ApplyError {
    /// Retry soon with backoff (connection lost, target restarting or
    /// read-only, serialization failure); otherwise the DBA must act and
    /// apply retries slowly until the problem is gone. Errors from
    /// PostgreSQL are classified by [`classify`], the classifier the source
    /// side uses too.
    pub fn is_transient(&self) -> bool {
        self.fault().transient
    }

    /// A short stable name of the kind of error, for status and metrics:
    /// from PostgreSQL `connection`, `read_only`, `in_use`,
    /// `serialization` (retried) or `login_refused`, `missing_table`,
    /// `missing_column`, `type_mismatch`, `ddl` (a schema change the branch
    /// refused, or one it does not replay), `unique_violation`, `constraint`,
    /// `permission_denied`, `target_error` (any other SQLSTATE), `tls` (the
    /// TLS handshake failed, or the server refused TLS); from apply
    /// itself `no_key`, `corrupt_record`, `out_of_order`, `bad_record`, `bad_progress_row`,
    /// `inbox` or `seed`.
    pub fn class(&self) -> &'static str {
        self.fault().class
    }

    fn fault(&self) -> PgFault {
        let definite = |class| PgFault {
            transient: false,
            class,
        };
        match self {
            ApplyError::Connect(e) => match e.server_error() {
                Some(e) => target_fault(e),
                // Unreachable (retried), or TLS refused or failed (`tls`:
                // sslmode, sslrootcert, the server's certificate).
                None => PgFault {
                    transient: e.is_transient(),
                    class: e.class(),
                },
            },
            ApplyError::Target { source: e, .. } | ApplyError::Sequence { source: e, .. } => {
                target_fault(&e.0)
            }
            ApplyError::Progress(p) => match p.query_error() {
                Some(e) => target_fault(e),
                None => definite("bad_progress_row"),
            },
            ApplyError::MissingTable { .. } => definite("missing_table"),
            ApplyError::MissingColumn { .. } => definite("missing_column"),
            ApplyError::NoKey { .. } => definite("no_key"),
            ApplyError::TwoWayNeedsReplicaRole { .. } => definite("two_way_replica_role"),
            // A lost connection while running DDL is retried as any other.
            ApplyError::Ddl { source, .. } if target_fault(&source.0).transient => {
                target_fault(&source.0)
            }
            ApplyError::Ddl { .. }
            | ApplyError::DdlSeveral { .. }
            | ApplyError::DdlByCode { .. }
            | ApplyError::DdlMixed { .. } => definite("ddl"),
            ApplyError::Corrupt { .. } => definite("corrupt_record"),
            ApplyError::OutOfOrder { .. } => definite("out_of_order"),
            ApplyError::Decode { .. }
            | ApplyError::UnknownRelation { .. }
            | ApplyError::Order { .. }
            | ApplyError::CopyMeta { .. }
            | ApplyError::Join { .. }
            | ApplyError::DdlMessage { .. }
            | ApplyError::SkipContent { .. } => definite("bad_record"),
            ApplyError::Inbox(_) | ApplyError::StoredRelation(_) => definite("inbox"),
            ApplyError::Seed(_) => definite("seed"),
        }
    }
}

/// The shared classification of a PostgreSQL error, its catch-all named
/// after this side (`target_error`, as status and metrics have always said).
fn target_fault(e: &tokio_postgres::Error) -> PgFault {
    let fault = classify(e);
    match fault.class {
        "server_error" => PgFault {
            class: "target_error",
            ..fault
        },
        _ => fault,
    }
}

/// Wrap a target error with what apply was doing (verb + object).
pub(super) fn target_err(what: &'static str) -> impl Fn(tokio_postgres::Error) -> ApplyError {
    move |source| ApplyError::Target {
        what: what.to_owned(),
        source: source.into(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use pgcourier_common::ops::backoff::error_chain;
    use pgcourier_common::pg::connect::PgConnect;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    /// A real connection error carrying `sqlstate`: a one-shot server on
    /// 127.0.0.1 answers the startup message with a FATAL ErrorResponse, as
    /// PostgreSQL does when it refuses a login.
    async fn refused_at_startup(sqlstate: &str) -> ConnectError {
        connect_error(&[
            (b'S', "FATAL"),
            (b'V', "FATAL"),
            (b'C', sqlstate),
            (b'M', "refused by the test server"),
        ])
        .await
    }

    /// A real `tokio_postgres::Error` with these ErrorResponse fields.
    async fn server_error(fields_in: &[(u8, &str)]) -> tokio_postgres::Error {
        connect_error(fields_in)
            .await
            .into_server_error()
            .expect("the test server answered")
    }

    /// The connection error of a login answered with these ErrorResponse
    /// fields.
    async fn connect_error(fields_in: &[(u8, &str)]) -> ConnectError {
        let fields_in: Vec<(u8, String)> = fields_in
            .iter()
            .map(|(t, v)| (*t, (*v).to_owned()))
            .collect();
        let sqlstate = fields_in
            .iter()
            .find(|(t, _)| *t == b'C')
            .map(|(_, v)| v.clone())
            .unwrap();
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = listener.local_addr().unwrap().port();
        let server = tokio::spawn(async move {
            let (mut sock, _) = listener.accept().await.unwrap();
            let len = sock.read_i32().await.unwrap();
            let mut startup = vec![0; usize::try_from(len).unwrap() - 4];
            sock.read_exact(&mut startup).await.unwrap();
            let mut fields = Vec::new();
            for (tag, value) in &fields_in {
                fields.push(*tag);
                fields.extend_from_slice(value.as_bytes());
                fields.push(0);
            }
            fields.push(0);
            let mut msg = vec![b'E'];
            msg.extend_from_slice(&(fields.len() as i32 + 4).to_be_bytes());
            msg.extend_from_slice(&fields);
            sock.write_all(&msg).await.unwrap();
        });
        let cfg = PgConnect::from_conninfo(
            "target",
            &format!("host=127.0.0.1 port={port} user=courier dbname=postgres sslmode=disable"),
        )
        .unwrap();
        let Err(e) = cfg.connect().await else {
            panic!("the test server accepted a login");
        };
        server.await.unwrap();
        assert_eq!(
            e.server_error().and_then(|e| e.code()).map(|c| c.code()),
            Some(sqlstate.as_str()),
            "{e}"
        );
        e
    }

    #[tokio::test]
    async fn a_target_error_is_reported_without_row_values() {
        let e = server_error(&[
            (b'S', "ERROR"),
            (b'V', "ERROR"),
            (b'C', "23505"),
            (
                b'M',
                "duplicate key value violates unique constraint \"users_email_key\"",
            ),
            (
                b'D',
                "Key (email)=(zebra-4417@secret.example) already exists.",
            ),
            (b's', "public"),
            (b't', "users"),
            (b'n', "users_email_key"),
        ])
        .await;
        let text = error_chain(&target(e));
        assert!(!text.contains("zebra"), "{text}");
        assert!(
            text.contains("23505")
                && text.contains("users_email_key")
                && text.contains("table public.users"),
            "{text}"
        );
        let e = server_error(&[
            (b'S', "ERROR"),
            (b'V', "ERROR"),
            (b'C', "22P02"),
            (
                b'M',
                "invalid input syntax for type integer: \"zebra-4417\"",
            ),
            (b'W', "COPY t, line 1, column n: \"zebra-4417\""),
        ])
        .await;
        let text = error_chain(&target(e));
        assert!(!text.contains("zebra"), "{text}");
        assert!(
            text.contains("22P02: invalid input syntax for type integer"),
            "{text}"
        );
    }

    fn target(source: tokio_postgres::Error) -> ApplyError {
        ApplyError::Target {
            what: "apply change to table \"t\"".into(),
            source: source.into(),
        }
    }

    #[tokio::test]
    async fn a_wrong_password_while_running_is_definite_never_retried_as_transient() {
        for code in ["28P01", "28000", "3D000"] {
            let e = ApplyError::Connect(refused_at_startup(code).await);
            assert!(
                !e.is_transient(),
                "{code}: a refused login must not be retried as transient"
            );
            assert_eq!(e.class(), "login_refused", "{code}");
        }
    }

    #[tokio::test]
    async fn an_unreachable_or_starting_target_is_retried() {
        let e = ApplyError::Connect(refused_at_startup("57P03").await);
        assert!(e.is_transient());
        assert_eq!(e.class(), "connection");
        // Nobody listens on this port any more: connection refused, no SQLSTATE.
        let port = {
            let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
            l.local_addr().unwrap().port()
        };
        let cfg = PgConnect::from_conninfo(
            "target",
            &format!("host=127.0.0.1 port={port} user=courier"),
        )
        .unwrap();
        let e = ApplyError::Connect(cfg.connect().await.err().unwrap());
        assert!(e.is_transient());
        assert_eq!(e.class(), "connection");
    }

    #[tokio::test]
    async fn target_errors_keep_the_class_names_status_and_metrics_show() {
        for (code, transient, class) in [
            ("25006", true, "read_only"),
            ("40001", true, "serialization"),
            ("40P01", true, "serialization"),
            ("55006", true, "in_use"),
            ("42P01", false, "missing_table"),
            ("42703", false, "missing_column"),
            ("22P02", false, "type_mismatch"),
            ("23505", false, "unique_violation"),
            ("23503", false, "constraint"),
            ("42501", false, "permission_denied"),
            ("55P03", false, "target_error"),
            ("XX000", false, "target_error"),
        ] {
            let e = target(refused_at_startup(code).await.into_server_error().unwrap());
            assert_eq!((e.is_transient(), e.class()), (transient, class), "{code}");
        }
    }

    #[test]
    fn apply_own_errors_are_definite_with_their_classes() {
        let cases = [
            (
                ApplyError::MissingTable { table: "t".into() },
                "missing_table",
            ),
            (
                ApplyError::MissingColumn {
                    table: "t".into(),
                    column: "c".into(),
                },
                "missing_column",
            ),
            (ApplyError::NoKey { table: "t".into() }, "no_key"),
            (ApplyError::UnknownRelation { seq: 1, oid: 2 }, "bad_record"),
            (
                ApplyError::OutOfOrder {
                    seq: 1,
                    message: "m".into(),
                },
                "out_of_order",
            ),
            (
                ApplyError::Order {
                    seq: 1,
                    message: "m".into(),
                },
                "bad_record",
            ),
            (
                ApplyError::Progress(ProgressError::BadLsn("x".into())),
                "bad_progress_row",
            ),
            (
                ApplyError::Progress(ProgressError::BadSeq(-1)),
                "bad_progress_row",
            ),
            (
                ApplyError::StoredRelation(pgoutput::DecodeError::Empty),
                "inbox",
            ),
        ];
        for (e, class) in cases {
            assert!(!e.is_transient(), "{e}");
            assert_eq!(e.class(), class, "{e}");
        }
    }
}
