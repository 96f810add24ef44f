use std::os::unix::fs::PermissionsExt;

use super::*;

fn resolve_in(env: &Environment, conninfo: &str) -> Result<PgConnect, String> {
    PgConnect::resolve("source", conninfo, &PasswordSource::default(), env)
        .map_err(|e| e.to_string())
}

fn tcp(t: &Target) -> &str {
    match &t.host {
        Host::Tcp(h) => h,
        Host::Unix(d) => panic!("a Unix socket {}", d.display()),
    }
}

/// A file with mode 0600.
fn private_file(path: &Path, text: &str) {
    std::fs::write(path, text).unwrap();
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600)).unwrap();
}

#[test]
fn the_string_beats_the_service_entry_which_beats_the_environment_which_beats_defaults() {
    let dir = tempfile::tempdir().unwrap();
    let services = dir.path().join("services.conf");
    std::fs::write(
        &services,
        "[shop]\nhost=svc.example\nport=5433\ndbname=shopdb\n",
    )
    .unwrap();
    let services = services.display().to_string();
    let env = Environment::from_vars([
        ("PGSERVICEFILE", services.as_str()),
        ("PGHOST", "env.example"),
        ("PGDATABASE", "envdb"),
        ("PGUSER", "envuser"),
        ("PGAPPNAME", "from-env"),
        ("USER", "osuser"),
    ]);
    let c = resolve_in(&env, "service=shop port=6000 sslmode=disable").unwrap();
    assert_eq!(tcp(&c.targets()[0]), "svc.example");
    assert_eq!(c.targets()[0].port, 6000);
    assert_eq!(c.dbname(), "shopdb");
    assert_eq!(c.user(), "envuser");
    assert_eq!(c.application_name(), Some("from-env"));
    // PGSERVICE names the entry too; no service: the environment, then
    // the defaults (OS user; dbname = user; port 5432; the socket dir).
    let env2 =
        Environment::from_vars([("PGSERVICEFILE", services.as_str()), ("PGSERVICE", "shop")]);
    let c = resolve_in(&env2, "user=u sslmode=disable").unwrap();
    assert_eq!(tcp(&c.targets()[0]), "svc.example");
    let c = resolve_in(&Environment::from_vars([("USER", "osuser")]), "").unwrap();
    assert_eq!((c.user(), c.dbname()), ("osuser", "osuser"));
    assert_eq!(c.targets()[0].host, Host::Unix("/tmp".into()));
    assert_eq!(c.targets()[0].port, 5432);
    assert_eq!(c.application_name(), Some("pgcourier"));
    assert!(c.tls_config().is_none(), "a Unix socket never uses TLS");
}

#[test]
fn a_service_missing_from_the_user_file_is_looked_up_in_the_system_file() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("user.conf"), "[other]\nhost=x\n").unwrap();
    std::fs::write(
        dir.path().join("pg_service.conf"),
        "[shop]\nhost=sys.example\n",
    )
    .unwrap();
    let user_file = dir.path().join("user.conf").display().to_string();
    let sysconf = dir.path().display().to_string();
    let env = Environment::from_vars([
        ("PGSERVICEFILE", user_file.as_str()),
        ("PGSYSCONFDIR", sysconf.as_str()),
        ("USER", "u"),
    ]);
    let c = resolve_in(&env, "service=shop sslmode=disable").unwrap();
    assert_eq!(tcp(&c.targets()[0]), "sys.example");
    let e = resolve_in(&env, "service=nowhere").unwrap_err();
    assert!(
        e.contains("setting `source`")
            && e.contains("service \"nowhere\"")
            && e.contains("user.conf"),
        "{e}"
    );
}

#[test]
fn password_precedence_string_then_settings_then_service_then_pgpassword_then_pgpass() {
    let dir = tempfile::tempdir().unwrap();
    let pgpass = dir.path().join("pgpass");
    private_file(&pgpass, "db.example:5432:app:courier:from-pgpass\n");
    let services = dir.path().join("services.conf");
    std::fs::write(&services, "[svc]\npassword=from-service\n").unwrap();
    let pgpass_s = pgpass.display().to_string();
    let services_s = services.display().to_string();
    let base = "host=db.example dbname=app user=courier sslmode=disable";
    let pw = |vars: &[(&str, &str)], conninfo: &str, source: PasswordSource| {
        let mut all = vec![
            ("PGPASSFILE", pgpass_s.as_str()),
            ("PGSERVICEFILE", services_s.as_str()),
        ];
        all.extend_from_slice(vars);
        let env = Environment::from_vars(all);
        PgConnect::resolve("target", conninfo, &source, &env)
            .unwrap()
            .targets()[0]
            .password()
            .map(str::to_owned)
    };
    let from_env = PasswordSource {
        password_env: Some("MY_PW".into()),
        password_file: None,
    };
    let with_pw = format!("{base} password=from-string service=svc");
    let with_svc = format!("{base} service=svc");
    let vars = [("MY_PW", "from-setting"), ("PGPASSWORD", "from-pgpassword")];
    assert_eq!(
        pw(&vars, &with_pw, from_env.clone()).as_deref(),
        Some("from-string")
    );
    assert_eq!(
        pw(&vars, &with_svc, from_env.clone()).as_deref(),
        Some("from-setting")
    );
    assert_eq!(
        pw(&vars, &with_svc, PasswordSource::default()).as_deref(),
        Some("from-service")
    );
    assert_eq!(
        pw(&vars, base, PasswordSource::default()).as_deref(),
        Some("from-pgpassword")
    );
    assert_eq!(
        pw(&[], base, PasswordSource::default()).as_deref(),
        Some("from-pgpass")
    );
    // passfile= beats PGPASSFILE; no match: no password.
    let other = dir.path().join("other");
    private_file(&other, "*:*:*:*:from-passfile\n");
    let with_passfile = format!("{base} passfile={}", other.display());
    assert_eq!(
        pw(&[], &with_passfile, PasswordSource::default()).as_deref(),
        Some("from-passfile")
    );
    assert_eq!(
        pw(
            &[],
            "host=elsewhere user=courier dbname=app sslmode=disable",
            PasswordSource::default()
        ),
        None
    );
    // password-env naming an unset variable is an error naming the setting.
    let env = Environment::from_vars([("USER", "u")]);
    let e = PgConnect::resolve("target", base, &from_env, &env)
        .unwrap_err()
        .to_string();
    assert!(e.contains("password-env") && e.contains("MY_PW"), "{e}");
}

#[test]
fn pgpass_matches_each_host_of_a_list_and_unix_sockets_as_localhost() {
    let dir = tempfile::tempdir().unwrap();
    let pgpass = dir.path().join(".pgpass");
    private_file(
        &pgpass,
        "a.example:5432:*:u:pw-a\nb.example:6000:*:u:pw-b\nlocalhost:7000:*:u:pw-local\n",
    );
    let home = dir.path().display().to_string();
    let env = Environment::from_vars([("HOME", home.as_str())]);
    let c = resolve_in(
        &env,
        "host=a.example,b.example port=5432,6000 user=u sslmode=disable",
    )
    .unwrap();
    let pws: Vec<_> = c.targets().iter().map(|t| t.password()).collect();
    assert_eq!(pws, [Some("pw-a"), Some("pw-b")]);
    let c = resolve_in(&env, "host=/var/run/postgresql port=7000 user=u").unwrap();
    assert_eq!(c.targets()[0].password(), Some("pw-local"));
    // Readable by others: ignored (with a WARN naming it, see files.rs).
    std::fs::set_permissions(&pgpass, std::fs::Permissions::from_mode(0o640)).unwrap();
    let c = resolve_in(&env, "host=a.example user=u sslmode=disable").unwrap();
    assert_eq!(c.targets()[0].password(), None);
}

#[test]
fn bad_keywords_and_values_are_named_without_showing_the_password() {
    let env = Environment::from_vars([("USER", "u")]);
    let e = resolve_in(&env, "host=h password=hunter2 sslrootcrt=/x").unwrap_err();
    assert!(
        e.contains("setting `source`") && e.contains("unknown connection keyword `sslrootcrt`"),
        "{e}"
    );
    assert!(!e.contains("hunter2"), "{e}");
    let e = resolve_in(&env, "host=h password=hunter2 sslmode=bogus").unwrap_err();
    assert!(
        e.contains("sslmode=\"bogus\"") && !e.contains("hunter2"),
        "{e}"
    );
    let e = resolve_in(
        &Environment::from_vars([("PGSSLMODE", "strict")]),
        "user=u host=h",
    )
    .unwrap_err();
    assert!(e.contains("PGSSLMODE"), "{e}");
    let e = resolve_in(&env, "host=a,b port=1,2,3").unwrap_err();
    assert!(e.contains("3 ports for 2 hosts"), "{e}");
    let e = resolve_in(&env, "host=h port=http").unwrap_err();
    assert!(e.contains("port \"http\""), "{e}");
    let e = resolve_in(&env, "host=h sslcrl=/x").unwrap_err();
    assert!(e.contains("not supported"), "{e}");
    let c = resolve_in(&env, "host=h password=hunter2 sslmode=disable").unwrap();
    let debug = format!("{c:?}");
    assert!(!debug.contains("hunter2"), "{debug}");
}

/// A CA and a server certificate it signed, as PEM files in `dir`.
fn ca_files(dir: &Path) -> PathBuf {
    let key = rcgen::KeyPair::generate().unwrap();
    let mut params = rcgen::CertificateParams::new(Vec::<String>::new()).unwrap();
    params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
    let ca = params.self_signed(&key).unwrap();
    let path = dir.join("root.crt");
    std::fs::write(&path, ca.pem()).unwrap();
    path
}

#[test]
fn verify_modes_need_a_root_certificate_and_a_name_for_each_tcp_host() {
    let dir = tempfile::tempdir().unwrap();
    let env = Environment::from_vars([("USER", "u")]);
    let e = resolve_in(&env, "host=db.example sslmode=verify-full").unwrap_err();
    assert!(e.contains("sslrootcert"), "{e}");
    let e = resolve_in(
        &env,
        "host=db.example sslmode=verify-ca sslrootcert=/nonexistent/ca.pem",
    )
    .unwrap_err();
    assert!(
        e.contains("/nonexistent/ca.pem") && e.contains("does not exist"),
        "{e}"
    );
    let root = ca_files(dir.path());
    let c = resolve_in(
        &env,
        &format!(
            "host=db.example,127.0.0.1 sslmode=verify-full sslrootcert={}",
            root.display()
        ),
    )
    .unwrap();
    assert!(c.tls_config().is_some());
    assert_eq!(c.ssl_mode(), SslMode::VerifyFull);
    assert_eq!(
        c.targets()[0].server_name(),
        Some(&ServerName::try_from("db.example").unwrap())
    );
    assert!(matches!(
        c.targets()[1].server_name(),
        Some(ServerName::IpAddress(_))
    ));
    // The default root certificate: ~/.postgresql/root.crt.
    std::fs::create_dir(dir.path().join(".postgresql")).unwrap();
    std::fs::copy(&root, dir.path().join(".postgresql/root.crt")).unwrap();
    let home = dir.path().display().to_string();
    let env = Environment::from_vars([("USER", "u"), ("HOME", home.as_str())]);
    assert!(resolve_in(&env, "host=db.example sslmode=verify-ca").is_ok());
    // `system` is only for verify-full (as libpq).
    let e = resolve_in(&env, "host=db.example sslmode=require sslrootcert=system").unwrap_err();
    assert!(e.contains("verify-full"), "{e}");
    // Unix sockets never use TLS, so need no root certificate.
    let c = resolve_in(
        &Environment::from_vars([("USER", "u")]),
        "host=/tmp sslmode=verify-full",
    )
    .unwrap();
    assert!(c.tls_config().is_none());
}

#[test]
fn a_client_key_readable_by_others_is_refused_by_name() {
    let dir = tempfile::tempdir().unwrap();
    let key = rcgen::KeyPair::generate().unwrap();
    let cert = rcgen::CertificateParams::new(vec!["courier".into()])
        .unwrap()
        .self_signed(&key)
        .unwrap();
    let cert_path = dir.path().join("client.crt");
    let key_path = dir.path().join("client.key");
    std::fs::write(&cert_path, cert.pem()).unwrap();
    private_file(&key_path, &key.serialize_pem());
    let env = Environment::from_vars([("USER", "u")]);
    let conninfo = format!(
        "host=db.example sslmode=require sslcert={} sslkey={}",
        cert_path.display(),
        key_path.display()
    );
    assert!(resolve_in(&env, &conninfo).is_ok());
    std::fs::set_permissions(&key_path, std::fs::Permissions::from_mode(0o644)).unwrap();
    let e = resolve_in(&env, &conninfo).unwrap_err();
    assert!(
        e.contains("setting `source`")
            && e.contains("client.key")
            && e.contains("group or world access"),
        "{e}"
    );
}

#[tokio::test]
async fn a_server_without_tls_is_a_definite_error_under_require_and_plaintext_under_prefer() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    // A server that answers SSLRequest with 'N', then reads the startup
    // message and refuses the login with 28000.
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = listener.local_addr().unwrap().port();
    let server = tokio::spawn(async move {
        for _ in 0..2 {
            let (mut sock, _) = listener.accept().await.unwrap();
            let mut req = [0u8; 8];
            sock.read_exact(&mut req).await.unwrap();
            assert_eq!(req, [0, 0, 0, 8, 0x04, 0xd2, 0x16, 0x2f]);
            sock.write_all(b"N").await.unwrap();
            let len = sock.read_i32().await;
            if let Ok(len) = len {
                let mut startup = vec![0; usize::try_from(len).unwrap() - 4];
                sock.read_exact(&mut startup).await.unwrap();
                let mut fields = Vec::new();
                for (tag, v) in [(b'S', "FATAL"), (b'C', "28000"), (b'M', "no")] {
                    fields.push(tag);
                    fields.extend_from_slice(v.as_bytes());
                    fields.push(0);
                }
                fields.push(0);
                let mut msg = vec![b'E'];
                msg.extend_from_slice(&(fields.len() as i32 + 4).to_be_bytes());
                msg.extend_from_slice(&fields);
                sock.write_all(&msg).await.unwrap();
            }
        }
    });
    let env = Environment::from_vars([("USER", "u")]);
    let require = resolve_in(&env, &format!("host=127.0.0.1 port={port} sslmode=require")).unwrap();
    let Err(e) = require.connect().await else {
        panic!("connected without TLS under sslmode=require")
    };
    assert!(matches!(e, ConnectError::TlsRefused { .. }), "{e:?}");
    assert!(!e.is_transient());
    assert_eq!(e.class(), "tls");
    let text = e.to_string();
    assert!(
        text.contains("setting `source`") && text.contains(&format!("127.0.0.1:{port}")),
        "{text}"
    );
    // prefer goes on in plaintext on the same socket: the login is what fails.
    let prefer = resolve_in(&env, &format!("host=127.0.0.1 port={port}")).unwrap();
    let Err(e) = prefer.connect().await else {
        panic!("the test server accepted a login")
    };
    assert!(e.login_refused().is_some(), "{e:?}");
    server.await.unwrap();
}
