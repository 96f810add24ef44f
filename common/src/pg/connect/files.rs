//! The two files libpq reads beside the connection string: the service file
//! (`[name]` sections of `keyword=value` lines) and the password file
//! (`.pgpass`: `host:port:database:user:password` lines), read with libpq's
//! rules. Neither reader ever puts a password in an error or a log line.

use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::Path;

/// The `keyword=value` lines of section `[service]` in the service file at
/// `path`: `Ok(None)` when the file does not exist or has no such section.
/// Blank lines and lines starting with `#` are skipped; spaces around
/// keyword and value are trimmed.
pub(crate) fn service_entry(
    path: &Path,
    service: &str,
) -> Result<Option<Vec<(String, String)>>, String> {
    let text = match std::fs::read_to_string(path) {
        Ok(t) => t,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(e) => {
            return Err(format!(
                "cannot read the service file {}: {e}",
                path.display()
            ))
        }
    };
    let mut found: Option<Vec<(String, String)>> = None;
    let mut inside = false;
    for (n, line) in text.lines().enumerate() {
        let line = line.trim();
        if line.is_empty() || line.starts_with('#') {
            continue;
        }
        if let Some(name) = line.strip_prefix('[') {
            let name = name.strip_suffix(']').ok_or_else(|| {
                format!(
                    "line {} of the service file {}: a section name lacks its closing \"]\"",
                    n + 1,
                    path.display()
                )
            })?;
            if found.is_some() {
                // The section ended: libpq reads only the first one.
                break;
            }
            inside = name == service;
            if inside {
                found = Some(Vec::new());
            }
            continue;
        }
        if !inside {
            continue;
        }
        let (k, v) = line.split_once('=').ok_or_else(|| {
            format!(
                "line {} of the service file {}: expected keyword=value",
                n + 1,
                path.display()
            )
        })?;
        let k = k.trim();
        if k == "service" {
            return Err(format!(
                "line {} of the service file {}: a service may not name another service",
                n + 1,
                path.display()
            ));
        }
        super::conninfo::check_keyword(k).map_err(|e| {
            format!(
                "line {} of the service file {} (service {service:?}): {e}",
                n + 1,
                path.display()
            )
        })?;
        if let Some(entry) = found.as_mut() {
            entry.push((k.to_owned(), v.trim().to_owned()));
        }
    }
    Ok(found)
}

/// Who the password is for, as a password file line is matched.
pub(crate) struct PassKey<'a> {
    /// The host name, or the socket directory of a Unix-socket host.
    pub host: &'a str,
    /// A Unix-socket host also matches `localhost`.
    pub unix_socket: bool,
    pub port: &'a str,
    pub dbname: &'a str,
    pub user: &'a str,
}

/// The password for `key` from the password file at `path`, libpq's way:
/// the first line whose four fields match (`*` matches anything; `\:` and
/// `\\` are a literal colon and backslash) wins. A missing file is `None`;
/// a file that is not a plain file, or that its group or others may read
/// or write, is ignored with a WARN naming it (as libpq does).
pub(crate) fn pgpass_password(path: &Path, key: &PassKey<'_>) -> Option<String> {
    let meta = match std::fs::metadata(path) {
        Ok(m) => m,
        Err(_) => return None,
    };
    if !meta.is_file() {
        tracing::warn!(file = %path.display(), "the password file is not a plain file: ignored");
        return None;
    }
    if meta.permissions().mode() & 0o077 != 0 {
        tracing::warn!(
            file = %path.display(),
            mode = format!("{:o}", meta.mode() & 0o777),
            "the password file has group or world access: ignored; permissions should be u=rw (0600) or less"
        );
        return None;
    }
    let text = match std::fs::read_to_string(path) {
        Ok(t) => t,
        Err(e) => {
            tracing::warn!(file = %path.display(), error = %e, "cannot read the password file: ignored");
            return None;
        }
    };
    pgpass_lookup(&text, key)
}

/// Split a password file line into its fields, unescaping `\:` and `\\`.
fn fields(line: &str) -> Vec<String> {
    let mut out = vec![String::new()];
    let mut chars = line.chars();
    while let Some(c) = chars.next() {
        match c {
            '\\' => {
                if let Some(n) = chars.next() {
                    out.last_mut().expect("never empty").push(n);
                }
            }
            // The fifth field (the password) keeps its colons.
            ':' if out.len() < 5 => out.push(String::new()),
            c => out.last_mut().expect("never empty").push(c),
        }
    }
    out
}

pub(crate) fn pgpass_lookup(text: &str, key: &PassKey<'_>) -> Option<String> {
    let matches = |field: &str, value: &str| field == "*" || field == value;
    for line in text.lines() {
        if line.starts_with('#') || line.trim().is_empty() {
            continue;
        }
        let f = fields(line.trim_end_matches('\r'));
        if f.len() < 5 {
            continue;
        }
        let host_ok = matches(&f[0], key.host) || (key.unix_socket && f[0] == "localhost");
        if host_ok
            && matches(&f[1], key.port)
            && matches(&f[2], key.dbname)
            && matches(&f[3], key.user)
        {
            return Some(f[4].clone());
        }
    }
    None
}

/// Whether a private key file may be used: not readable by group or others
/// (libpq also accepts 0640 when root owns the file, for keys shared
/// through a group). Returns what is wrong, or `None`.
pub(crate) fn key_file_problem(path: &Path) -> Option<String> {
    let meta = match std::fs::metadata(path) {
        Ok(m) => m,
        Err(e) => return Some(format!("cannot read {}: {e}", path.display())),
    };
    if !meta.is_file() {
        return Some(format!("{} is not a plain file", path.display()));
    }
    let mode = meta.mode() & 0o777;
    let allowed = if meta.uid() == 0 { 0o640 } else { 0o600 };
    if mode & !allowed & 0o077 != 0 {
        return Some(format!(
            "private key file {} has group or world access (mode {mode:o}): chmod 0600 it{}",
            path.display(),
            if meta.uid() == 0 {
                " (or 0640 when root owns it)"
            } else {
                ""
            }
        ));
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    fn key<'a>(host: &'a str, unix: bool, db: &'a str, user: &'a str) -> PassKey<'a> {
        PassKey {
            host,
            unix_socket: unix,
            port: "5432",
            dbname: db,
            user,
        }
    }

    #[test]
    fn pgpass_first_matching_line_wins_with_wildcards_and_escapes() {
        let text = "# comment\n\
                    db.example:5432:shop:app:first\n\
                    db.example:*:*:app:second\n\
                    db\\:odd:5432:*:app:esc\\:aped\\\\pw\n\
                    localhost:5432:*:*:local:with:colons\n\
                    short:line\n\
                    *:*:*:*:fallback\n";
        assert_eq!(
            pgpass_lookup(text, &key("db.example", false, "shop", "app")).as_deref(),
            Some("first")
        );
        assert_eq!(
            pgpass_lookup(text, &key("db.example", false, "other", "app")).as_deref(),
            Some("second")
        );
        assert_eq!(
            pgpass_lookup(text, &key("db:odd", false, "x", "app")).as_deref(),
            Some("esc:aped\\pw")
        );
        // A Unix-socket host matches `localhost`; the password keeps its colons.
        assert_eq!(
            pgpass_lookup(text, &key("/var/run/postgresql", true, "x", "u")).as_deref(),
            Some("local:with:colons")
        );
        assert_eq!(
            pgpass_lookup(text, &key("elsewhere", false, "x", "u")).as_deref(),
            Some("fallback")
        );
        assert_eq!(
            pgpass_lookup("a:1:b:c:d\n", &key("a", false, "b", "c")),
            None,
            "the port must match too"
        );
    }

    #[test]
    fn a_pgpass_readable_by_others_is_ignored_with_a_warning_naming_it() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("pgpass");
        std::fs::write(&path, "*:*:*:*:pw\n").unwrap();
        let k = key("h", false, "d", "u");
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o600)).unwrap();
        assert_eq!(pgpass_password(&path, &k).as_deref(), Some("pw"));
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o644)).unwrap();
        let (_guard, logs) = crate::transport::tls::test_support::capture_warnings();
        assert_eq!(pgpass_password(&path, &k), None);
        let text = logs.text();
        assert!(text.contains("group or world access"), "{text}");
        assert!(text.contains(&path.display().to_string()), "{text}");
        assert!(!text.contains("pw\""), "{text}");
        assert_eq!(pgpass_password(&dir.path().join("missing"), &k), None);
        assert_eq!(pgpass_password(dir.path(), &k), None, "a directory");
    }

    #[test]
    fn a_service_file_section_is_read_and_bad_lines_named() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("services");
        std::fs::write(
            &path,
            "# services\n[other]\nhost=x\n\n[shop]\nhost = db.example\nport=5433\n# note\nsslmode=verify-full\n[next]\nhost=y\n",
        )
        .unwrap();
        assert_eq!(
            service_entry(&path, "shop").unwrap().unwrap(),
            vec![
                ("host".to_owned(), "db.example".to_owned()),
                ("port".into(), "5433".into()),
                ("sslmode".into(), "verify-full".into())
            ]
        );
        assert_eq!(service_entry(&path, "none").unwrap(), None);
        assert_eq!(
            service_entry(&dir.path().join("missing"), "shop").unwrap(),
            None
        );
        std::fs::write(&path, "[shop]\nhots=db\n").unwrap();
        let e = service_entry(&path, "shop").unwrap_err();
        assert!(e.contains("line 2") && e.contains("`hots`"), "{e}");
        std::fs::write(&path, "[shop]\nservice=other\n").unwrap();
        assert!(service_entry(&path, "shop").is_err());
        std::fs::write(&path, "[shop\nhost=db\n").unwrap();
        assert!(service_entry(&path, "shop").is_err());
    }

    #[test]
    fn a_private_key_readable_by_others_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("k.pem");
        std::fs::write(&path, "x").unwrap();
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o600)).unwrap();
        assert_eq!(key_file_problem(&path), None);
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o604)).unwrap();
        let e = key_file_problem(&path).unwrap();
        assert!(e.contains("group or world access"), "{e}");
        assert!(key_file_problem(&dir.path().join("missing")).is_some());
    }
}
