//! One classifier from a PostgreSQL error to what happens next, for the
//! source (capture, copy) and the target (apply, seed import) alike.
//!
//! Transient: the connection was lost, the server is starting, stopping,
//! out of resources or read-only (a standby being promoted), an object is
//! in use by another session (a replication slot still held by a lingering
//! backend), or a serialization failure or deadlock: retry with backoff.
//! Everything else is definite: an operator must act (a refused login, a
//! missing table, a type mismatch, a constraint, a privilege), and a retry
//! loop must not spin on it.

/// What an error from PostgreSQL means for the caller.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct PgFault {
    /// Retry with backoff; `false`: report and wait for an operator.
    pub transient: bool,
    /// A short stable name for status and metrics: `connection`,
    /// `read_only`, `in_use`, `serialization`, `login_refused`,
    /// `missing_table`, `missing_column`, `permission_denied`,
    /// `unique_violation`, `constraint`, `type_mismatch` or `server_error`
    /// (any other SQLSTATE; a caller may name it after its side, as apply
    /// does with `target_error`).
    pub class: &'static str,
}

/// Classify an error from `tokio_postgres`.
pub fn classify(e: &tokio_postgres::Error) -> PgFault {
    if e.is_closed() {
        return classify_sqlstate(None);
    }
    classify_sqlstate(e.code().map(|c| c.code()))
}

/// Classify by SQLSTATE; `None` means no server answer (I/O, closed).
pub fn classify_sqlstate(code: Option<&str>) -> PgFault {
    let (transient, class) = match code {
        None => (true, "connection"),
        Some(c) if c.starts_with("08") || c.starts_with("57") || c.starts_with("53") => {
            (true, "connection")
        }
        Some("25006") => (true, "read_only"),
        Some("55006") => (true, "in_use"),
        Some("40001" | "40P01") => (true, "serialization"),
        // Wrong password, a role that may not log in, a database that does
        // not exist: retrying the same login cannot succeed.
        Some(c) if c.starts_with("28") => (false, "login_refused"),
        Some("3D000") => (false, "login_refused"),
        Some("42P01") => (false, "missing_table"),
        Some("42703") => (false, "missing_column"),
        Some("42501") => (false, "permission_denied"),
        Some("23505") => (false, "unique_violation"),
        Some(c) if c.starts_with("23") => (false, "constraint"),
        Some("42804" | "42846") => (false, "type_mismatch"),
        Some(c) if c.starts_with("22") => (false, "type_mismatch"),
        Some(_) => (false, "server_error"),
    };
    PgFault { transient, class }
}

/// A PostgreSQL error as the daemons log and report it, source and target
/// alike: without row values. The text is built from the severity, the
/// SQLSTATE, the message and the table, column, type and constraint names,
/// never from DETAIL, HINT or CONTEXT (a unique violation's DETAIL is
/// `Key (email)=(...) already exists`); the quoted values of data exceptions
/// (class 22: `invalid input syntax for type integer: "..."`) and of a
/// trigger's RAISE (class P0) are masked. The error itself is kept for
/// [`classify`].
#[derive(Debug)]
pub struct PgError(pub tokio_postgres::Error);

impl From<tokio_postgres::Error> for PgError {
    fn from(e: tokio_postgres::Error) -> PgError {
        PgError(e)
    }
}

impl std::fmt::Display for PgError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self.0.as_db_error() {
            Some(db) => f.write_str(&describe_db_error(db)),
            // Not from the server (I/O, protocol, conversion): no row values.
            None => write!(f, "{}", self.0),
        }
    }
}

impl std::error::Error for PgError {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        match self.0.as_db_error() {
            // The DbError's own text carries DETAIL: never shown.
            Some(_) => None,
            None => std::error::Error::source(&self.0),
        }
    }
}

/// A server error's text without row values: severity, SQLSTATE, message
/// (quoted values masked where the message carries them) and the names of
/// the table, column, data type and constraint involved. Never DETAIL,
/// HINT, CONTEXT or the statement.
fn describe_db_error(db: &tokio_postgres::error::DbError) -> String {
    let mut s = describe_server_error(db.severity(), db.code().code(), db.message());
    let mut names = Vec::new();
    if let Some(t) = db.table() {
        names.push(match db.schema() {
            Some(schema) => format!("table {schema}.{t}"),
            None => format!("table {t}"),
        });
    }
    if let Some(c) = db.column() {
        names.push(format!("column {c}"));
    }
    if let Some(d) = db.datatype() {
        names.push(format!("type {d}"));
    }
    if let Some(c) = db.constraint() {
        names.push(format!("constraint {c}"));
    }
    if !names.is_empty() {
        s.push_str(&format!(" ({})", names.join(", ")));
    }
    s
}

/// A server error's text from its severity, SQLSTATE and message alone,
/// with quoted values masked where the message carries row values (classes
/// 22 and P0): for errors that do not come through tokio-postgres (the
/// replication connection's).
pub fn describe_server_error(severity: &str, code: &str, message: &str) -> String {
    let message = if code.starts_with("22") || code.starts_with("P0") {
        mask_quoted(message)
    } else {
        message.to_owned()
    };
    format!("{severity} {code}: {message}")
}

/// `invalid input syntax for type integer: "42x"` → `... "…"`.
fn mask_quoted(message: &str) -> String {
    let mut out = String::with_capacity(message.len());
    let mut inside = false;
    for ch in message.chars() {
        if ch == '"' {
            if inside {
                out.push_str("…\"");
            } else {
                out.push('"');
            }
            inside = !inside;
        } else if !inside {
            out.push(ch);
        }
    }
    if inside {
        out.push('…');
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn connection_and_server_state_errors_are_transient_the_rest_definite() {
        for code in [
            None,
            Some("08006"),
            Some("57P01"),
            Some("53300"),
            Some("25006"),
            Some("55006"),
            Some("40001"),
            Some("40P01"),
        ] {
            assert!(
                classify_sqlstate(code).transient,
                "{code:?} should be retried"
            );
        }
        for (code, class) in [
            ("42P01", "missing_table"),
            ("42703", "missing_column"),
            ("42501", "permission_denied"),
            ("23505", "unique_violation"),
            ("23503", "constraint"),
            ("22P02", "type_mismatch"),
            ("42804", "type_mismatch"),
            ("55P03", "server_error"),
            ("XX000", "server_error"),
        ] {
            let f = classify_sqlstate(Some(code));
            assert!(!f.transient, "{code} must not be retried for ever");
            assert_eq!(f.class, class, "{code}");
        }
    }

    #[test]
    fn a_slot_in_use_by_a_lingering_backend_is_retried() {
        assert_eq!(
            classify_sqlstate(Some("55006")),
            PgFault {
                transient: true,
                class: "in_use"
            }
        );
    }

    #[test]
    fn a_refused_login_is_definite_never_retried() {
        // 28P01 wrong password, 28000 role may not log in (pg_hba),
        // 3D000 no such database.
        for code in ["28P01", "28000", "3D000"] {
            assert_eq!(
                classify_sqlstate(Some(code)),
                PgFault {
                    transient: false,
                    class: "login_refused"
                },
                "{code}"
            );
        }
    }
}
