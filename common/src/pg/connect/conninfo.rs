//! libpq connection strings, parsed as libpq parses them: `keyword=value`
//! pairs (whitespace around `=` allowed, values in single quotes, `\`
//! escaping the next character) or a `postgres://` / `postgresql://` URI
//! (`user:password@host1:port1,host2/dbname?keyword=value`, every part
//! percent-decoded). The result is a list of (keyword, value) in the order
//! given; a later value of a keyword wins, as in libpq.
//!
//! Errors never quote a value (the password is one of them): they name the
//! keyword or the position.

use percent_encoding::percent_decode_str;

/// Keywords pgcourier understands; what each does is in
/// docs/configuration.md ("Connecting to PostgreSQL").
pub(crate) const SUPPORTED: &[&str] = &[
    "host",
    "hostaddr",
    "port",
    "dbname",
    "user",
    "password",
    "passfile",
    "service",
    "options",
    "application_name",
    "fallback_application_name",
    "client_encoding",
    "connect_timeout",
    "keepalives",
    "keepalives_idle",
    "keepalives_interval",
    "keepalives_count",
    "tcp_user_timeout",
    "sslmode",
    "sslrootcert",
    "sslcert",
    "sslkey",
    "sslsni",
    "channel_binding",
    "gssencmode",
    "target_session_attrs",
    "load_balance_hosts",
];

/// libpq keywords pgcourier does not implement: refused by name rather than
/// ignored (a silently ignored `sslcrl` would be a revocation list not
/// checked).
pub(crate) const UNSUPPORTED: &[&str] = &[
    "requiressl",
    "sslcompression",
    "sslpassword",
    "sslcrl",
    "sslcrldir",
    "sslcertmode",
    "sslnegotiation",
    "ssl_min_protocol_version",
    "ssl_max_protocol_version",
    "requirepeer",
    "require_auth",
    "krbsrvname",
    "gsslib",
    "gssdelegation",
    "replication",
];

/// Check that `keyword` is one pgcourier understands; the error says why
/// not, and lists the keywords when it is not a libpq keyword at all.
pub(crate) fn check_keyword(keyword: &str) -> Result<(), String> {
    if SUPPORTED.contains(&keyword) {
        Ok(())
    } else if UNSUPPORTED.contains(&keyword) {
        Err(format!(
            "the connection keyword `{keyword}` is not supported by pgcourier"
        ))
    } else {
        Err(format!(
            "unknown connection keyword `{keyword}`; the keywords are `{}`",
            SUPPORTED.join("`, `")
        ))
    }
}

/// Parse a connection string (either form) into (keyword, value) pairs.
/// Keywords are not checked here (see [`check_keyword`]).
pub(crate) fn parse(text: &str) -> Result<Vec<(String, String)>, String> {
    if let Some(rest) = text
        .strip_prefix("postgresql://")
        .or_else(|| text.strip_prefix("postgres://"))
    {
        parse_uri(rest)
    } else {
        parse_pairs(text)
    }
}

/// `keyword = value ...`, libpq's `conninfo_parse`.
fn parse_pairs(text: &str) -> Result<Vec<(String, String)>, String> {
    let mut out = Vec::new();
    let mut chars = text.chars().peekable();
    loop {
        while chars.peek().is_some_and(|c| c.is_whitespace()) {
            chars.next();
        }
        if chars.peek().is_none() {
            return Ok(out);
        }
        let mut keyword = String::new();
        while let Some(&c) = chars.peek() {
            if c == '=' || c.is_whitespace() {
                break;
            }
            keyword.push(c);
            chars.next();
        }
        while chars.peek().is_some_and(|c| c.is_whitespace()) {
            chars.next();
        }
        if chars.next() != Some('=') {
            return Err(format!("missing \"=\" after `{keyword}` in the connection string (write keyword=value pairs, or a postgres:// URI)"));
        }
        while chars.peek().is_some_and(|c| c.is_whitespace()) {
            chars.next();
        }
        let mut value = String::new();
        if chars.peek() == Some(&'\'') {
            chars.next();
            loop {
                match chars.next() {
                    None => {
                        return Err(format!(
                            "unterminated quoted value of `{keyword}` in the connection string"
                        ))
                    }
                    Some('\\') => match chars.next() {
                        Some(c) => value.push(c),
                        None => {
                            return Err(format!(
                                "unterminated quoted value of `{keyword}` in the connection string"
                            ))
                        }
                    },
                    Some('\'') => break,
                    Some(c) => value.push(c),
                }
            }
        } else {
            while let Some(&c) = chars.peek() {
                if c.is_whitespace() {
                    break;
                }
                chars.next();
                if c == '\\' {
                    if let Some(n) = chars.next() {
                        value.push(n);
                    }
                } else {
                    value.push(c);
                }
            }
        }
        out.push((keyword, value));
    }
}

fn decode(part: &str, what: &str) -> Result<String, String> {
    percent_decode_str(part)
        .decode_utf8()
        .map(|s| s.into_owned())
        .map_err(|_| format!("the {what} in the connection URI is not UTF-8 once percent-decoded"))
}

/// The part of a URI after `postgres://`, libpq's `conninfo_uri_parse`.
fn parse_uri(rest: &str) -> Result<Vec<(String, String)>, String> {
    let mut out = Vec::new();
    let (main, query) = match rest.split_once('?') {
        Some((m, q)) => (m, Some(q)),
        None => (rest, None),
    };
    // The authority ends at the first '/'.
    let (authority, path) = match main.split_once('/') {
        Some((a, p)) => (a, Some(p)),
        None => (main, None),
    };
    // User info ends at the last '@' (a password may hold an encoded '@').
    let hosts = match authority.rsplit_once('@') {
        Some((userinfo, hosts)) => {
            let (user, password) = match userinfo.split_once(':') {
                Some((u, p)) => (u, Some(p)),
                None => (userinfo, None),
            };
            if !user.is_empty() {
                out.push(("user".into(), decode(user, "user name")?));
            }
            if let Some(p) = password {
                out.push(("password".into(), decode(p, "password")?));
            }
            hosts
        }
        None => authority,
    };
    if !hosts.is_empty() {
        let mut host_list = Vec::new();
        let mut port_list = Vec::new();
        for spec in hosts.split(',') {
            let (host, port) = if let Some(v6) = spec.strip_prefix('[') {
                let (addr, after) = v6.split_once(']').ok_or_else(|| {
                    "an IPv6 address in the connection URI lacks its closing \"]\"".to_owned()
                })?;
                let port = match after {
                    "" => "",
                    p => p.strip_prefix(':').ok_or_else(|| {
                        "unexpected characters after an IPv6 address in the connection URI"
                            .to_owned()
                    })?,
                };
                (addr.to_owned(), port)
            } else {
                match spec.split_once(':') {
                    Some((h, p)) => (decode(h, "host")?, p),
                    None => (decode(spec, "host")?, ""),
                }
            };
            host_list.push(host);
            port_list.push(decode(port, "port")?);
        }
        if host_list.iter().any(|h| !h.is_empty()) {
            out.push(("host".into(), host_list.join(",")));
        }
        if port_list.iter().any(|p| !p.is_empty()) {
            out.push(("port".into(), port_list.join(",")));
        }
    }
    if let Some(db) = path.filter(|p| !p.is_empty()) {
        out.push(("dbname".into(), decode(db, "database name")?));
    }
    for pair in query.into_iter().flat_map(|q| q.split('&')) {
        if pair.is_empty() {
            continue;
        }
        let (k, v) = pair.split_once('=').ok_or_else(|| {
            format!(
                "missing \"=\" in the connection URI's parameter `{}`",
                decode(pair, "parameter").unwrap_or_default()
            )
        })?;
        let k = decode(k, "parameter name")?;
        let v = decode(v, "parameter value")?;
        // As libpq: the JDBC spelling `ssl=true` means sslmode=require.
        if k == "ssl" && v == "true" {
            out.push(("sslmode".into(), "require".into()));
        } else {
            out.push((k, v));
        }
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pairs(text: &str) -> Vec<(String, String)> {
        parse(text).unwrap()
    }

    fn p(list: &[(&str, &str)]) -> Vec<(String, String)> {
        list.iter()
            .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
            .collect()
    }

    #[test]
    fn keyword_value_pairs_with_quotes_escapes_and_spaces_around_equals() {
        assert_eq!(
            pairs("host=db.example port = 5433  dbname='my db'"),
            p(&[
                ("host", "db.example"),
                ("port", "5433"),
                ("dbname", "my db")
            ])
        );
        assert_eq!(
            pairs(r"password='o\'brien\\x' user=a\ b sslmode=verify-full"),
            p(&[
                ("password", r"o'brien\x"),
                ("user", "a b"),
                ("sslmode", "verify-full")
            ])
        );
        assert_eq!(pairs("  "), p(&[]));
        assert_eq!(pairs("dbname="), p(&[("dbname", "")]));
    }

    #[test]
    fn malformed_pairs_are_refused_without_quoting_values() {
        let e = parse("host=a secret").unwrap_err();
        assert!(e.contains("missing \"=\" after `secret`"), "{e}");
        let e = parse("password='hunter2").unwrap_err();
        assert!(e.contains("unterminated quoted value of `password`"), "{e}");
        assert!(!e.contains("hunter2"), "{e}");
    }

    #[test]
    fn uris_are_percent_decoded_with_host_lists_ipv6_and_parameters() {
        assert_eq!(
            pairs("postgresql://app:p%40ss%3Aw@db1:5433,[::1]:5434/shop%20db?sslmode=verify-full&sslrootcert=%2Fetc%2Fca.pem"),
            p(&[
                ("user", "app"),
                ("password", "p@ss:w"),
                ("host", "db1,::1"),
                ("port", "5433,5434"),
                ("dbname", "shop db"),
                ("sslmode", "verify-full"),
                ("sslrootcert", "/etc/ca.pem"),
            ])
        );
        assert_eq!(
            pairs("postgres://%2Fvar%2Frun%2Fpostgresql/db"),
            p(&[("host", "/var/run/postgresql"), ("dbname", "db")])
        );
        assert_eq!(
            pairs("postgres:///db?host=/tmp&ssl=true"),
            p(&[("dbname", "db"), ("host", "/tmp"), ("sslmode", "require")])
        );
        assert_eq!(pairs("postgres://"), p(&[]));
        assert!(parse("postgres://[::1/db").is_err());
        assert!(parse("postgres://h/db?sslmode").is_err());
    }

    #[test]
    fn keywords_are_checked_by_name() {
        assert!(check_keyword("sslrootcert").is_ok());
        let e = check_keyword("sslrootcrt").unwrap_err();
        assert!(e.contains("unknown connection keyword `sslrootcrt`"), "{e}");
        assert!(e.contains("`sslrootcert`"), "{e}");
        let e = check_keyword("sslcrl").unwrap_err();
        assert!(e.contains("`sslcrl` is not supported"), "{e}");
    }
}
