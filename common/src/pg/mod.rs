//! Talking to PostgreSQL, the same way at both sites: every connection is
//! resolved and opened in one place (libpq's conventions, TLS), identifiers
//! are always quoted, errors are classified by SQLSTATE in one place, and
//! the branch's progress row (the exactly-once anchor) is read by one
//! function that never falls back to a default.

pub mod conflict;
pub mod connect;
pub mod ddl;
pub mod errors;
pub mod progress_row;
pub mod time;

/// Quote an SQL identifier, always (PostgreSQL's rules: wrap in double
/// quotes, double any double quote inside).
pub fn quote_ident(name: &str) -> String {
    format!("\"{}\"", name.replace('"', "\"\""))
}

/// Quote a possibly schema-qualified table name given as `schema.table`
/// (or `table`, meaning `public.table`).
pub fn quote_table(name: &str) -> String {
    match name.split_once('.') {
        Some((s, t)) => format!("{}.{}", quote_ident(s), quote_ident(t)),
        None => format!("{}.{}", quote_ident("public"), quote_ident(name)),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn identifiers_are_always_quoted_and_inner_quotes_doubled() {
        assert_eq!(quote_ident("a"), "\"a\"");
        assert_eq!(quote_ident("Shop \"x\""), "\"Shop \"\"x\"\"\"");
        assert_eq!(quote_table("s.t"), "\"s\".\"t\"");
        assert_eq!(quote_table("T"), "\"public\".\"T\"");
    }
}
