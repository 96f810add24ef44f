//! Both directions between two sites, the same table written at each:
//! headquarters' sender ships to the branch, and a second pair (a sender
//! at the branch, a receiver at headquarters) ships back. Apply writes
//! under a replication origin of pgcourier's and capture leaves those
//! transactions out, so a change never returns to the site it came from.

use std::time::Duration;

use anyhow::Context;
use pgcourier_tests::{bin_path, wait_until, Daemon};

use crate::fixture::{admin_status, free_tcp_port, free_udp_port, keygen, Options, Setup, DB};

const WAIT: Duration = Duration::from_secs(90);

/// Headquarters → branch by the fixture, branch → headquarters started
/// here and capturing; returns the admin ports (hq sender, branch receiver, branch
/// sender, hq receiver) and the two daemons of the way back.
async fn both_ways(
    name: &str,
    receiver_extra: &str,
    sender_extra: [&str; 2],
) -> anyhow::Result<(Setup, [u16; 4], Daemon, Daemon)> {
    let ports = [
        free_tcp_port(),
        free_tcp_port(),
        free_tcp_port(),
        free_tcp_port(),
    ];
    let setup = Setup::start(
        name,
        Options {
            schema: "CREATE TABLE item (id int PRIMARY KEY, v text NOT NULL, qty int NOT NULL DEFAULT 0, \
                     email text UNIQUE); CREATE TABLE price (id int PRIMARY KEY, p int NOT NULL)",
            sender_extra: &format!("admin = \"127.0.0.1:{}\"\n{}", ports[0], sender_extra[0]),
            receiver_extra: &format!("admin = \"127.0.0.1:{}\"\n{receiver_extra}", ports[1]),
            ..Options::default()
        },
    )
    .await?;
    let dir = setup.dir.path();
    let back_fp = keygen(dir, "back-sender");
    let hq_fp = keygen(dir, "hq-receiver");
    let port = free_udp_port();
    let hq_receiver_config = dir.join("hq-receiver.toml");
    std::fs::write(
        &hq_receiver_config,
        format!(
            "target = \"{}\"\ninbox-dir = \"hq-inbox\"\ncert = \"hq-receiver.crt\"\nkey = \"hq-receiver.key\"\n\
             listen = \"127.0.0.1:{port}\"\nsender-fingerprints = [\"{back_fp}\"]\nmax-backoff = \"2s\"\n\
             admin = \"127.0.0.1:{}\"\n{receiver_extra}\n",
            setup.hq.conninfo(DB),
            ports[3]
        ),
    )?;
    let back_sender_config = dir.join("back-sender.toml");
    std::fs::write(
        &back_sender_config,
        format!(
            "source = \"{}\"\nspool-dir = \"back-spool\"\ncert = \"back-sender.crt\"\nkey = \"back-sender.key\"\n\
             initial-copy = false\npoll-interval = \"50ms\"\nmax-backoff = \"2s\"\nadmin = \"127.0.0.1:{}\"\n{}\n\n\
             [[receiver]]\nname = \"hq\"\nfingerprint = \"{hq_fp}\"\naddress = \"127.0.0.1:{port}\"\n",
            setup.branches[0].pg.conninfo(DB),
            ports[2],
            sender_extra[1]
        ),
    )?;
    let hq_receiver =
        crate::fixture::spawn_receiver(&setup.dir, &hq_receiver_config, "hq-receiver")?;
    let back_sender = Daemon::spawn(
        "back-sender",
        &bin_path("pgcourier-sender"),
        &[
            "run",
            "--config",
            back_sender_config.to_str().context("utf-8 path")?,
        ],
        &dir.join("back-sender.log"),
    )?;
    // The way back captures before either site writes.
    wait_until("the branch's sender to capture", WAIT, || async {
        Ok(admin_status(ports[2])
            .await
            .is_ok_and(|s| s["slot"].is_object()))
    })
    .await
    .with_context(|| two_site_logs(&setup, &back_sender, &hq_receiver))?;
    Ok((setup, ports, back_sender, hq_receiver))
}

/// Every daemon's log of a [`both_ways`] set-up, for failure messages.
fn two_site_logs(setup: &Setup, back_sender: &Daemon, hq_receiver: &Daemon) -> String {
    format!(
        "{}\n--- back sender ---\n{}\n--- hq receiver ---\n{}",
        setup.logs(),
        back_sender.log_tail(40),
        hq_receiver.log_tail(40)
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn both_sites_write_the_same_table_and_nothing_comes_back() -> anyhow::Result<()> {
    let (setup, ports, back_sender, hq_receiver) = both_ways("two_way", "", ["", ""]).await?;
    let logs = || two_site_logs(&setup, &back_sender, &hq_receiver);
    let hq = setup.source().await?;
    let branch = setup.target(0).await?;
    for i in 1..=30 {
        hq.execute("INSERT INTO item VALUES ($1, 'hq')", &[&i])
            .await?;
        branch
            .execute("INSERT INTO item VALUES ($1, 'branch')", &[&(1000 + i)])
            .await?;
    }
    // Each side changes a row the other wrote, once it has it.
    crate::fixture::wait_count(&hq, "SELECT count(*) FROM item WHERE id = 1001", 1, WAIT)
        .await
        .with_context(logs)?;
    crate::fixture::wait_count(&branch, "SELECT count(*) FROM item WHERE id = 1", 1, WAIT)
        .await
        .with_context(logs)?;
    hq.batch_execute("UPDATE item SET v = 'changed at hq' WHERE id = 1001")
        .await?;
    branch
        .batch_execute("UPDATE item SET v = 'changed at the branch' WHERE id = 1")
        .await?;
    let count = "SELECT count(*) FROM item";
    crate::fixture::wait_count(&hq, count, 60, WAIT)
        .await
        .with_context(logs)?;
    crate::fixture::wait_count(&branch, count, 60, WAIT)
        .await
        .with_context(logs)?;
    pgcourier_tests::wait_tables_equal(&hq, &branch, &["public.item"], WAIT)
        .await
        .with_context(logs)?;
    let v: String = hq
        .query_one("SELECT v FROM item WHERE id = 1", &[])
        .await?
        .get(0);
    assert_eq!(v, "changed at the branch");

    // No loop: apply's writes were left out by the other sender, nothing
    // is paused, and the spools stop growing.
    let quiet = || async {
        let mut marks = Vec::new();
        for port in ports {
            let st = admin_status(port).await?;
            marks.push(st);
        }
        anyhow::Ok(marks)
    };
    let before = quiet().await?;
    tokio::time::sleep(Duration::from_secs(3)).await;
    let after = quiet().await?;
    for (i, (b, a)) in before.iter().zip(&after).enumerate() {
        for key in ["complete_seq", "durable_seq", "applied_seq"] {
            assert_eq!(
                b[key],
                a[key],
                "daemon {i}: {key} moved while both sites were quiet: {a}\n{}",
                logs()
            );
        }
        assert!(a["last_error"].is_null(), "daemon {i}: {a}\n{}", logs());
    }
    for (i, port) in [(0, ports[0]), (2, ports[2])] {
        let st = &after[i];
        let looped = st["looped_transactions"].as_u64().unwrap_or(0);
        assert!(
            looped > 0,
            "sender on port {port} left out no applied transaction: {st}"
        );
        eprintln!("sender {i}: {looped} transactions applied there left out of capture");
    }
    // The origins are PostgreSQL's, visible to a DBA.
    let origins: i64 = hq
        .query_one(
            "SELECT count(*) FROM pg_replication_origin WHERE roname LIKE 'pgcourier/%'",
            &[],
        )
        .await?
        .get(0);
    assert_eq!(origins, 1, "headquarters' apply has one origin");
    Ok(())
}

/// The way back from branch `i` to headquarters: a sender at the branch
/// with the branch's certificate, and a receiver at headquarters with
/// headquarters' (each site has one identity for both directions).
/// Headquarters' receiver listens on `port`; the branch's sender dials
/// `address` (that port, or a netem relay to it).
fn way_back(
    setup: &Setup,
    i: usize,
    admin: [u16; 2],
    port: u16,
    address: &str,
    extra: &str,
) -> anyhow::Result<(Daemon, Daemon)> {
    let dir = setup.dir.path();
    let branch_config = std::fs::read_to_string(&setup.branches[i].config)?;
    let hq_fp = branch_config
        .split("sender-fingerprints = [\"")
        .nth(1)
        .and_then(|s| s.split('"').next())
        .context("the sender's fingerprint in a branch config")?
        .to_owned();
    let branch_fp = &setup.branches[i].fingerprint;
    let receiver_config = dir.join(format!("hq-receiver-{i}.toml"));
    std::fs::write(
        &receiver_config,
        format!(
            "target = \"{}\"\ninbox-dir = \"hq-inbox-{i}\"\ncert = \"sender.crt\"\nkey = \"sender.key\"\n\
             listen = \"127.0.0.1:{port}\"\nsender-fingerprints = [\"{branch_fp}\"]\nmax-backoff = \"2s\"\n\
             admin = \"127.0.0.1:{}\"\n",
            setup.hq.conninfo(DB),
            admin[1]
        ),
    )?;
    let sender_config = dir.join(format!("back-sender-{i}.toml"));
    std::fs::write(
        &sender_config,
        format!(
            "source = \"{}\"\nspool-dir = \"back-spool-{i}\"\ncert = \"branch{i}.crt\"\nkey = \"branch{i}.key\"\n\
             initial-copy = false\npoll-interval = \"50ms\"\nmax-backoff = \"2s\"\nadmin = \"127.0.0.1:{}\"\n{extra}\n\n\
             [[receiver]]\nname = \"hq\"\nfingerprint = \"{hq_fp}\"\naddress = \"{address}\"\n",
            setup.branches[i].pg.conninfo(DB),
            admin[0]
        ),
    )?;
    let receiver =
        crate::fixture::spawn_receiver(&setup.dir, &receiver_config, &format!("hq-receiver-{i}"))?;
    let sender = Daemon::spawn(
        &format!("back-sender-{i}"),
        &bin_path("pgcourier-sender"),
        &[
            "run",
            "--config",
            sender_config.to_str().context("utf-8 path")?,
        ],
        &dir.join(format!("back-sender-{i}.log")),
    )?;
    Ok((sender, receiver))
}

/// Headquarters and `n` branches, both ways: the fixture's sender and
/// receivers, plus a way back per branch. Admin ports: hq sender, the
/// branch receivers, then per way back its sender and its receiver at
/// headquarters.
struct Sites {
    setup: Setup,
    ports: Vec<u16>,
    back: Vec<(Daemon, Daemon)>,
    /// With links through netem ([`Sites::start_linked`]): each way
    /// back's relay (the ways down are `setup.relays`).
    relays: Vec<pgcourier_netem::RelayHandle>,
}

impl Sites {
    /// Headquarters and two branches, `item (id, v)` one-way tables
    /// written everywhere (no two keys alike).
    async fn start(name: &str) -> anyhow::Result<Sites> {
        Sites::start_with(
            name,
            2,
            "CREATE TABLE item (id int PRIMARY KEY, v text NOT NULL)",
            |_| String::new(),
        )
        .await
    }

    /// `extra(site)`: lines for the sender of site `site` ("hq",
    /// "branch0", ...).
    async fn start_with(
        name: &str,
        n: usize,
        schema: &str,
        extra: impl Fn(&str) -> String,
    ) -> anyhow::Result<Sites> {
        Sites::start_linked(name, n, schema, extra, false).await
    }

    /// As [`Sites::start_with`]; `netem`: every link, both ways, through
    /// a netem UDP relay (clean), which a test takes down and up.
    async fn start_linked(
        name: &str,
        n: usize,
        schema: &str,
        extra: impl Fn(&str) -> String,
        netem: bool,
    ) -> anyhow::Result<Sites> {
        let link = || -> anyhow::Result<pgcourier_netem::Link> {
            Ok(pgcourier_netem::Profile::by_name("clean")
                .context("netem profile clean")?
                .link(16))
        };
        // Admin ports are picked just before each daemon binds them: a
        // port picked early may meanwhile become some connection's
        // ephemeral port.
        let mut ports = vec![free_tcp_port()];
        let mut setup = Setup::start(
            name,
            Options {
                branches: n,
                schema,
                sender_extra: &format!("admin = \"127.0.0.1:{}\"\n{}", ports[0], extra("hq")),
                link: if netem { Some(link()?) } else { None },
                ..Options::default()
            },
        )
        .await?;
        // The fixture's receivers have no admin listener: give them one.
        for i in 0..n {
            setup.branches[i].receiver.terminate()?;
            let cfg = std::fs::read_to_string(&setup.branches[i].config)?;
            ports.push(free_tcp_port());
            std::fs::write(
                &setup.branches[i].config,
                format!("admin = \"127.0.0.1:{}\"\n{cfg}", ports[1 + i]),
            )?;
            setup.restart_receiver(i)?;
        }
        let mut back = Vec::new();
        let mut relays = Vec::new();
        for i in 0..n {
            let admin = [free_tcp_port(), free_tcp_port()];
            ports.extend(admin);
            let port = free_udp_port();
            let mut address = format!("127.0.0.1:{port}");
            if netem {
                let relay = pgcourier_netem::UdpRelay::start(
                    "127.0.0.1:0".parse()?,
                    address.parse()?,
                    link()?,
                )
                .await
                .context("start a netem relay for a way back")?;
                address = relay.local_addr().to_string();
                relays.push(relay);
            }
            let extra = extra(&format!("branch{i}"));
            back.push(way_back(&setup, i, admin, port, &address, &extra)?);
        }
        let sites = Sites {
            setup,
            ports,
            back,
            relays,
        };
        for i in 0..n {
            let port = sites.ports[1 + n + 2 * i];
            wait_until("the branches' senders to capture", WAIT, || async {
                Ok(admin_status(port)
                    .await
                    .is_ok_and(|s| s["slot"].is_object()))
            })
            .await
            .with_context(|| sites.logs())?;
        }
        // A daemon that could not bind its port has exited (and another
        // process may have answered on it).
        let all = std::iter::once(&sites.setup.sender)
            .chain(sites.setup.branches.iter().map(|b| &b.receiver))
            .chain(sites.back.iter().flat_map(|(s, r)| [s, r]));
        for d in all {
            anyhow::ensure!(
                d.is_running(),
                "{} exited at start\n{}",
                d.name(),
                sites.logs()
            );
        }
        Ok(sites)
    }

    fn logs(&self) -> String {
        let mut s = self.setup.logs();
        for (i, (sender, receiver)) in self.back.iter().enumerate() {
            s.push_str(&format!(
                "\n--- back sender {i} ---\n{}\n--- hq receiver {i} ---\n{}",
                sender.log_tail(30),
                receiver.log_tail(30)
            ));
        }
        s
    }

    /// Every site holds `n` rows (when given), the same ones; then nothing
    /// moves for 3 s (no loop) and no daemon reports an error. Returns the
    /// statuses.
    async fn converged(&self, n: Option<i64>) -> anyhow::Result<Vec<serde_json::Value>> {
        let hq = self.setup.source().await?;
        let count = "SELECT count(*) FROM item";
        if let Some(n) = n {
            crate::fixture::wait_count(&hq, count, n, WAIT)
                .await
                .with_context(|| self.logs())?;
        }
        for i in 0..self.back.len() {
            let b = self.setup.target(i).await?;
            if let Some(n) = n {
                crate::fixture::wait_count(&b, count, n, WAIT)
                    .await
                    .with_context(|| self.logs())?;
            }
            pgcourier_tests::wait_tables_equal(&hq, &b, &["public.item"], WAIT)
                .await
                .with_context(|| self.logs())?;
        }
        let statuses = || async {
            let mut all = Vec::new();
            for (i, &port) in self.ports.iter().enumerate() {
                // A daemon just respawned may not listen yet.
                let deadline = tokio::time::Instant::now() + WAIT;
                let status = loop {
                    match admin_status(port).await {
                        Ok(s) => break s,
                        Err(e) if tokio::time::Instant::now() > deadline => {
                            return Err(e.context(format!("daemon {i}'s status\n{}", self.logs())))
                        }
                        Err(_) => tokio::time::sleep(Duration::from_millis(200)).await,
                    }
                };
                all.push(status);
            }
            anyhow::Ok(all)
        };
        // Marks settle once every receiver has reported what it applied.
        let mut before = statuses().await?;
        let mut after = before.clone();
        for _ in 0..20 {
            tokio::time::sleep(Duration::from_secs(3)).await;
            after = statuses().await?;
            let moved = before.iter().zip(&after).any(|(b, a)| {
                ["complete_seq", "durable_seq", "applied_seq"]
                    .iter()
                    .any(|k| b[k] != a[k])
            });
            if !moved {
                break;
            }
            before = after.clone();
        }
        for (i, (b, a)) in before.iter().zip(&after).enumerate() {
            for key in ["complete_seq", "durable_seq", "applied_seq"] {
                assert_eq!(
                    b[key],
                    a[key],
                    "daemon {i}: {key} kept moving while every site was quiet: {a}\n{}",
                    self.logs()
                );
            }
            assert!(
                a["last_error"].is_null(),
                "daemon {i}: {a}\n{}",
                self.logs()
            );
        }
        if let Some(n) = n {
            let total: i64 = hq.query_one(count, &[]).await?.get(0);
            assert_eq!(total, n, "headquarters has {total} rows, not {n}");
        }
        Ok(after)
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_branchs_change_reaches_the_other_branch_through_headquarters_once() -> anyhow::Result<()>
{
    let sites = Sites::start("forwarding").await?;
    let hq = sites.setup.source().await?;
    let b0 = sites.setup.target(0).await?;
    let b1 = sites.setup.target(1).await?;
    for i in 1..=20 {
        hq.execute("INSERT INTO item VALUES ($1, 'hq')", &[&i])
            .await?;
        b0.execute("INSERT INTO item VALUES ($1, 'branch0')", &[&(1000 + i)])
            .await?;
        b1.execute("INSERT INTO item VALUES ($1, 'branch1')", &[&(2000 + i)])
            .await?;
    }
    // A branch changes a row the other branch wrote, once it has it.
    crate::fixture::wait_count(&b0, "SELECT count(*) FROM item WHERE id = 2001", 1, WAIT)
        .await
        .with_context(|| sites.logs())?;
    b0.batch_execute("UPDATE item SET v = 'changed at branch0' WHERE id = 2001")
        .await?;
    crate::fixture::wait_count(
        &b1,
        "SELECT count(*) FROM item WHERE v = 'changed at branch0'",
        1,
        WAIT,
    )
    .await
    .with_context(|| sites.logs())?;
    let after = sites.converged(Some(60)).await?;

    // Headquarters forwarded what each branch wrote to the other branch
    // only; the branches sent nothing of headquarters' back.
    let hq_sender = &after[0];
    let forwarded = hq_sender["forwarded_transactions"].as_u64().unwrap_or(0);
    assert!(forwarded > 0, "headquarters forwarded nothing: {hq_sender}");
    for st in [&after[3], &after[5]] {
        assert!(st["looped_transactions"].as_u64().unwrap_or(0) > 0, "{st}");
        assert_eq!(st["forwarded_transactions"], 0, "{st}");
    }
    eprintln!(
        "headquarters forwarded {forwarded} transactions; the branches left out {} and {}",
        after[3]["looped_transactions"], after[5]["looped_transactions"]
    );
    Ok(())
}

/// Insert rows `ids` at `pg`, one per transaction, through restarts of
/// the cluster: a lost connection is opened again, and a key already there
/// (its commit's answer was lost) counts as written.
async fn write_through(
    pg: &pgcourier_tests::PgCluster,
    site: &str,
    ids: std::ops::RangeInclusive<i32>,
) -> anyhow::Result<()> {
    let deadline = tokio::time::Instant::now() + WAIT;
    let mut client = None;
    for id in ids {
        loop {
            anyhow::ensure!(
                tokio::time::Instant::now() < deadline,
                "{site}: could not write row {id}"
            );
            if client.is_none() {
                client = pg.client(DB).await.ok();
                if client.is_none() {
                    tokio::time::sleep(Duration::from_millis(200)).await;
                    continue;
                }
            }
            let c = client.as_ref().expect("just set");
            match c
                .execute("INSERT INTO item VALUES ($1, $2)", &[&id, &site])
                .await
            {
                Ok(_) => break,
                Err(e) if e.code() == Some(&tokio_postgres::error::SqlState::UNIQUE_VIOLATION) => {
                    break
                }
                Err(_) => {
                    client = None;
                    tokio::time::sleep(Duration::from_millis(200)).await;
                }
            }
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    Ok(())
}

/// Kill -9 of daemons on both ways and an immediate stop of headquarters'
/// cluster while the three sites write: the same end state, every row
/// once everywhere, no loop.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn forwarding_comes_through_kill_9_of_daemons_and_of_headquarters_cluster(
) -> anyhow::Result<()> {
    let sites = Sites::start("forwarding_kills").await?;
    let n = 150;
    let writers = async {
        tokio::try_join!(
            write_through(&sites.setup.hq, "hq", 1..=n),
            write_through(&sites.setup.branches[0].pg, "branch0", 1001..=1000 + n),
            write_through(&sites.setup.branches[1].pg, "branch1", 2001..=2000 + n),
        )
    };
    let faults = async {
        let pause = |ms| tokio::time::sleep(Duration::from_millis(ms));
        pause(800).await;
        sites.setup.sender.kill9()?;
        pause(500).await;
        sites.setup.sender.respawn()?;
        pause(800).await;
        sites.back[0].1.kill9()?;
        sites.back[1].0.kill9()?;
        pause(500).await;
        sites.back[0].1.respawn()?;
        sites.back[1].0.respawn()?;
        pause(800).await;
        sites.setup.hq.kill()?;
        pause(1500).await;
        sites.setup.hq.start_again()?;
        pause(800).await;
        sites.setup.branches[1].receiver.kill9()?;
        sites.back[0].0.kill9()?;
        pause(500).await;
        sites.setup.branches[1].receiver.respawn()?;
        sites.back[0].0.respawn()?;
        anyhow::Ok(())
    };
    let (w, f) = tokio::join!(writers, faults);
    f.with_context(|| sites.logs())?;
    w.with_context(|| sites.logs())?;
    let after = sites.converged(Some(3 * i64::from(n))).await?;
    eprintln!(
        "after kills: headquarters forwarded {}, the branches left out {} and {}",
        after[0]["forwarded_transactions"],
        after[3]["looped_transactions"],
        after[5]["looped_transactions"]
    );
    Ok(())
}

/// `[[table]]` making `item` two-way, for the sender of site `site`.
fn two_way_item(site: &str) -> String {
    format!("site = \"{site}\"\n[[table]]\nname = \"public.item\"\ndirection = \"both\"\n")
}

/// A site's row clocks, one line each; rows 15 to 20, which the initial
/// copy may have carried without their clocks, left out.
async fn clock_rows(c: &tokio_postgres::Client) -> anyhow::Result<Vec<String>> {
    let rows = c
        .query(
            "SELECT tbl, key::text, hlc, site, deleted FROM pgcourier.clock \
             WHERE NOT (key ->> 'id')::int BETWEEN 15 AND 20 ORDER BY 1, 2",
            &[],
        )
        .await?;
    Ok(rows
        .iter()
        .map(|r| {
            format!(
                "{} {} {} {} {}",
                r.get::<_, String>(0),
                r.get::<_, String>(1),
                r.get::<_, i64>(2),
                r.get::<_, String>(3),
                r.get::<_, bool>(4)
            )
        })
        .collect())
}

/// A row's value at a site (`None`: no such row).
async fn value(c: &tokio_postgres::Client, id: i32) -> anyhow::Result<Option<String>> {
    Ok(c.query_opt("SELECT v FROM item WHERE id = $1", &[&id])
        .await?
        .map(|r| r.get(0)))
}

/// Both sites write the same rows and keys while the link is down, each
/// kind of conflict once or more: after it comes back both hold the same
/// rows, each row the version with the later clock, the same clocks, and
/// every conflict, with the version that lost, in each site's
/// `pgcourier.conflicts`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn conflicting_writes_at_two_sites_converge_to_the_later_version_and_are_recorded(
) -> anyhow::Result<()> {
    // The branch ships its two-way table only: `price` stays one-way.
    let (setup, ports, back_sender, hq_receiver) = both_ways(
        "conflicts",
        "",
        [
            &two_way_item("hq"),
            &format!("ship-tables = \"two-way\"\n{}", two_way_item("branch0")),
        ],
    )
    .await?;
    let logs = || two_site_logs(&setup, &back_sender, &hq_receiver);
    let hq = setup.source().await?;
    let branch = setup.target(0).await?;
    for i in 1..=20 {
        hq.execute("INSERT INTO item VALUES ($1, 'first')", &[&i])
            .await?;
    }
    hq.batch_execute("INSERT INTO price VALUES (1, 10)").await?;
    let count = "SELECT count(*) FROM item";
    crate::fixture::wait_count(&branch, count, 20, WAIT)
        .await
        .with_context(logs)?;
    crate::fixture::wait_count(&branch, "SELECT count(*) FROM price", 1, WAIT)
        .await
        .with_context(logs)?;
    // A local write at the branch to the one-way table: reported, not
    // shipped.
    branch
        .batch_execute("UPDATE price SET p = 99 WHERE id = 1")
        .await?;
    wait_until(
        "the branch's sender to report its one-way write",
        WAIT,
        || async {
            Ok(admin_status(ports[2])
                .await
                .is_ok_and(|s| s["one_way_writes"]["public.price"] == 1))
        },
    )
    .await
    .with_context(logs)?;

    // The link goes down: both receivers stop; the senders spool on.
    setup.branches[0].receiver.terminate()?;
    hq_receiver.terminate()?;
    // `first` writes, then `second` a little later (a later clock).
    let step = || tokio::time::sleep(Duration::from_millis(5));
    for id in 1..=10 {
        let (first, second) = if id <= 5 {
            (&branch, &hq)
        } else {
            (&hq, &branch)
        };
        first
            .execute("UPDATE item SET v = 'older' WHERE id = $1", &[&id])
            .await?;
        step().await;
        second
            .execute("UPDATE item SET v = 'newer' WHERE id = $1", &[&id])
            .await?;
        step().await;
    }
    for id in 100..=102 {
        branch
            .execute("INSERT INTO item VALUES ($1, 'older')", &[&id])
            .await?;
        step().await;
        hq.execute("INSERT INTO item VALUES ($1, 'newer')", &[&id])
            .await?;
        step().await;
    }
    // A delete, then an update of the same row elsewhere: the row comes
    // back with the update; an update, then a delete: it stays deleted.
    for id in 11..=12 {
        hq.execute("DELETE FROM item WHERE id = $1", &[&id]).await?;
        step().await;
        branch
            .execute("UPDATE item SET v = 'newer' WHERE id = $1", &[&id])
            .await?;
        step().await;
    }
    branch
        .execute("UPDATE item SET v = 'older' WHERE id = 13", &[])
        .await?;
    step().await;
    hq.execute("DELETE FROM item WHERE id = 13", &[]).await?;
    for c in [&hq, &branch] {
        c.execute("DELETE FROM item WHERE id = 14", &[]).await?;
    }
    for id in 200..=202 {
        branch
            .execute("INSERT INTO item VALUES ($1, 'branch')", &[&id])
            .await?;
        hq.execute("INSERT INTO item VALUES ($1 + 100, 'hq')", &[&id])
            .await?;
    }

    // The link comes back.
    setup.branches[0].receiver.respawn()?;
    hq_receiver.respawn()?;
    crate::fixture::wait_count(&hq, count, 27, WAIT)
        .await
        .with_context(logs)?;
    pgcourier_tests::wait_tables_equal(&hq, &branch, &["public.item"], WAIT)
        .await
        .with_context(logs)?;
    let p: i32 = hq
        .query_one("SELECT p FROM price WHERE id = 1", &[])
        .await?
        .get(0);
    assert_eq!(
        p, 10,
        "the branch's write to a one-way table reached headquarters"
    );
    for (id, want) in [
        (1, Some("newer")),
        (6, Some("newer")),
        (100, Some("newer")),
        (11, Some("newer")),
        (13, None),
        (14, None),
        (15, Some("first")),
    ] {
        for (site, c) in [("headquarters", &hq), ("the branch", &branch)] {
            assert_eq!(
                value(c, id).await?.as_deref(),
                want,
                "row {id} at {site}\n{}",
                logs()
            );
        }
    }
    assert_eq!(
        clock_rows(&hq).await?,
        clock_rows(&branch).await?,
        "the sites' row clocks differ"
    );
    // Each site met every conflicting key once, and kept what lost.
    let conflicts = "SELECT (key ->> 'id')::int, kind, winner, local_row IS NOT NULL, \
                            remote_row IS NOT NULL FROM pgcourier.conflicts ORDER BY 1";
    for (site, c) in [("headquarters", &hq), ("the branch", &branch)] {
        let rows = c.query(conflicts, &[]).await?;
        let ids: Vec<i32> = rows.iter().map(|r| r.get(0)).collect();
        let want: Vec<i32> = (1..=14).chain(100..=102).collect();
        assert_eq!(ids, want, "conflicts recorded at {site}");
        for r in &rows {
            let (id, kind, winner): (i32, String, String) = (r.get(0), r.get(1), r.get(2));
            let (local, remote): (bool, bool) = (r.get(3), r.get(4));
            // The losing version is kept, unless it is a deletion.
            let lost_row = if winner == "local" { remote } else { local };
            let lost_deletion = matches!(
                (kind.as_str(), winner.as_str()),
                ("delete/delete", _)
                    | ("update/delete" | "insert/delete", "remote")
                    | ("delete/update", "local")
            );
            assert!(
                lost_row || lost_deletion,
                "{site}: conflict on row {id} ({kind}, {winner} won) lost the other version"
            );
        }
        eprintln!("{site}: {} conflicts recorded", rows.len());
    }
    Ok(())
}

/// `pgcourier-queue` on a site's config: exit code and stdout.
fn queue(config: &std::path::Path, args: &[&str]) -> anyhow::Result<(i32, String)> {
    let out = std::process::Command::new(bin_path("pgcourier-queue"))
        .arg("--config")
        .arg(config)
        .args(args)
        .output()?;
    Ok((
        out.status.code().unwrap_or(-1),
        format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        ),
    ))
}

/// Policy `manual` with a `delta` column: stock decrements made at both
/// sites while the link is down all count, without a conflict; a row whose
/// other columns both sites changed is parked at each, keeps its local
/// version, and once an operator resolves it at one site
/// (`pgcourier-queue conflicts resolve`) both sites hold the chosen
/// version and nothing stays open.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn parked_conflicts_wait_for_an_operator_and_stock_counts_add_up() -> anyhow::Result<()> {
    let table = |site: &str| {
        format!(
            "{}conflict = \"manual\"\ndelta = [\"qty\"]\n",
            two_way_item(site)
        )
    };
    let (setup, ports, back_sender, hq_receiver) =
        both_ways("parked", "", [&table("hq"), &table("branch0")]).await?;
    let logs = || two_site_logs(&setup, &back_sender, &hq_receiver);
    let hq = setup.source().await?;
    let branch = setup.target(0).await?;
    for i in 1..=3 {
        hq.execute("INSERT INTO item VALUES ($1, 'first', 100)", &[&i])
            .await?;
    }
    let count = "SELECT count(*) FROM item";
    crate::fixture::wait_count(&branch, count, 3, WAIT)
        .await
        .with_context(logs)?;

    setup.branches[0].receiver.terminate()?;
    hq_receiver.terminate()?;
    // Row 1: stock taken at both sites, nothing else changed.
    for _ in 0..3 {
        hq.batch_execute("UPDATE item SET qty = qty - 1 WHERE id = 1")
            .await?;
    }
    for _ in 0..2 {
        branch
            .batch_execute("UPDATE item SET qty = qty - 2 WHERE id = 1")
            .await?;
    }
    // Rows 2 and 3: both sites change the text; row 3 takes stock too.
    hq.batch_execute("UPDATE item SET v = 'hq' WHERE id = 2")
        .await?;
    branch
        .batch_execute("UPDATE item SET v = 'branch' WHERE id = 2")
        .await?;
    hq.batch_execute("UPDATE item SET v = 'hq', qty = qty - 1 WHERE id = 3")
        .await?;
    branch
        .batch_execute("UPDATE item SET v = 'branch', qty = qty - 5 WHERE id = 3")
        .await?;
    setup.branches[0].receiver.respawn()?;
    hq_receiver.respawn()?;

    let open = "SELECT count(*) FROM pgcourier.conflicts WHERE state = 'open'";
    for c in [&hq, &branch] {
        crate::fixture::wait_count(c, open, 2, WAIT)
            .await
            .with_context(logs)?;
        crate::fixture::wait_count(
            c,
            "SELECT count(*) FROM item WHERE id = 1 AND qty = 93",
            1,
            WAIT,
        )
        .await
        .with_context(logs)?;
        crate::fixture::wait_count(
            c,
            "SELECT count(*) FROM item WHERE id = 3 AND qty = 94",
            1,
            WAIT,
        )
        .await
        .with_context(logs)?;
    }
    // Parked: each site keeps its own text meanwhile.
    assert_eq!(value(&hq, 2).await?.as_deref(), Some("hq"));
    assert_eq!(value(&branch, 2).await?.as_deref(), Some("branch"));

    // An operator at headquarters takes the branch's row 2; one at the
    // branch keeps its own row 3.
    let hq_config = setup.dir.path().join("sender.toml");
    let branch_config = &setup.branches[0].config;
    // What an operator sees (printed for the README's example).
    let (_, table) = queue(&hq_config, &["conflicts", "list", "--open"])?;
    eprintln!("$ pgcourier-queue conflicts list --open\n{table}");
    let (code, listed) = queue(&hq_config, &["--json", "conflicts", "list", "--open"])?;
    assert_eq!(code, 0, "{listed}");
    let listed: Vec<serde_json::Value> = serde_json::from_str(&listed)?;
    let id_of = |list: &[serde_json::Value], row: i64| {
        list.iter()
            .find(|c| c["key"]["id"] == row)
            .and_then(|c| c["id"].as_i64())
            .context("the parked conflict of the row")
    };
    let hq_row2 = id_of(&listed, 2)?;
    let (code, shown) = queue(&hq_config, &["conflicts", "show", &hq_row2.to_string()])?;
    assert_eq!(code, 0, "{shown}");
    eprintln!("$ pgcourier-queue conflicts show {hq_row2}\n{shown}");
    assert!(
        shown.contains("\"branch\"") && shown.contains("\"hq\""),
        "show prints both versions: {shown}"
    );
    let (code, out) = queue(
        &hq_config,
        &[
            "conflicts",
            "resolve",
            &hq_row2.to_string(),
            "--keep",
            "remote",
        ],
    )?;
    assert_eq!(code, 0, "{out}");
    eprintln!("$ pgcourier-queue conflicts resolve {hq_row2} --keep remote\n{out}");
    // Resolved already: refused, exit 4.
    let (code, out) = queue(
        &hq_config,
        &[
            "conflicts",
            "resolve",
            &hq_row2.to_string(),
            "--keep",
            "local",
        ],
    )?;
    assert_eq!(code, 4, "{out}");
    let (code, listed) = queue(branch_config, &["--json", "conflicts", "list", "--open"])?;
    assert_eq!(code, 0, "{listed}");
    let listed: Vec<serde_json::Value> = serde_json::from_str(&listed)?;
    let branch_row3 = id_of(&listed, 3)?;
    let (code, out) = queue(
        branch_config,
        &[
            "conflicts",
            "resolve",
            &branch_row3.to_string(),
            "--keep",
            "local",
        ],
    )?;
    assert_eq!(code, 0, "{out}");

    for c in [&hq, &branch] {
        crate::fixture::wait_count(c, open, 0, WAIT)
            .await
            .with_context(logs)?;
    }
    pgcourier_tests::wait_tables_equal(&hq, &branch, &["public.item"], WAIT)
        .await
        .with_context(logs)?;
    assert_eq!(value(&hq, 2).await?.as_deref(), Some("branch"));
    assert_eq!(value(&hq, 3).await?.as_deref(), Some("branch"));
    let qty: Vec<i32> = hq
        .query("SELECT qty FROM item ORDER BY id", &[])
        .await?
        .iter()
        .map(|r| r.get(0))
        .collect();
    assert_eq!(qty, vec![93, 100, 94], "every decrement counted once");
    // The counters say what happened.
    let st = admin_status(ports[3]).await?;
    assert!(
        st["conflicts"]["parked"].as_u64() >= Some(2),
        "headquarters' receiver parked two: {st}"
    );
    Ok(())
}

/// What one site wrote while cut off: its last version of each key it
/// wrote (`None`: it deleted the row) and the stock it took per stock row.
#[derive(Default)]
struct Written {
    last: std::collections::BTreeMap<i32, Option<String>>,
    taken: std::collections::BTreeMap<i32, i64>,
    transactions: u32,
}

/// Stock rows: only their `qty` is taken (sometimes with `v` changed):
/// never deleted, so their final `qty` is exact.
const STOCK_ROWS: std::ops::RangeInclusive<i32> = 1..=8;
/// Other keys: updated, deleted, inserted again, by every site.
const OTHER_KEYS: std::ops::RangeInclusive<i32> = 9..=40;
const STOCK: i64 = 1000;

/// `ops` single-statement transactions at one site, drawn from `seed`.
async fn random_writes(
    c: &tokio_postgres::Client,
    site: &str,
    seed: u64,
    ops: u32,
) -> anyhow::Result<Written> {
    use rand::{Rng, SeedableRng};
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
    let mut w = Written::default();
    for n in 0..ops {
        let v = format!("{site}-{n}");
        if rng.gen_bool(0.35) {
            let id = rng.gen_range(STOCK_ROWS);
            let take: i32 = rng.gen_range(1..=5);
            if rng.gen_bool(0.3) {
                c.execute(
                    "UPDATE item SET v = $2, qty = qty - $3 WHERE id = $1",
                    &[&id, &v, &take],
                )
                .await?;
                w.last.insert(id, Some(v));
            } else {
                c.execute(
                    "UPDATE item SET qty = qty - $2 WHERE id = $1",
                    &[&id, &take],
                )
                .await?;
            }
            *w.taken.entry(id).or_default() += i64::from(take);
        } else {
            let id = rng.gen_range(OTHER_KEYS);
            let here = c
                .query_opt("SELECT 1 FROM item WHERE id = $1", &[&id])
                .await?
                .is_some();
            if here && rng.gen_bool(0.3) {
                c.execute("DELETE FROM item WHERE id = $1", &[&id]).await?;
                w.last.insert(id, None);
            } else if here && rng.gen_bool(0.25) {
                // Another column (merge-columns keeps both).
                c.execute("UPDATE item SET note = $2 WHERE id = $1", &[&id, &v])
                    .await?;
            } else if here {
                c.execute("UPDATE item SET v = $2 WHERE id = $1", &[&id, &v])
                    .await?;
                w.last.insert(id, Some(v));
            } else {
                c.execute("INSERT INTO item (id, v) VALUES ($1, $2)", &[&id, &v])
                    .await?;
                w.last.insert(id, Some(v));
            }
        }
        w.transactions += 1;
        tokio::time::sleep(Duration::from_millis(rng.gen_range(0..15))).await;
    }
    Ok(w)
}

/// Headquarters and three branches, every branch cut off (its links down
/// both ways at netem relays), all four
/// writing the same rows and keys meanwhile (a seeded random workload:
/// colliding inserts, updates of one column or another, deletes, stock
/// taken from a `delta` column; the policy `last-writer-wins` or
/// `merge-columns`, drawn), links restored in a random order with kill -9 of a daemon and
/// an immediate stop of a cluster on the way: all four end identical,
/// each stock row holds what is left after every site's takings, each
/// site's last version of a key is either what every site holds or in a
/// conflict log, nothing is parked, and the links go quiet.
///
/// `PGCOURIER_CONVERGE_SEED=S` replays a run (the seed is printed).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn four_sites_writing_the_same_rows_offline_converge_whatever_the_order_links_return(
) -> anyhow::Result<()> {
    use rand::{Rng, SeedableRng};
    let seed = match std::env::var("PGCOURIER_CONVERGE_SEED") {
        Ok(s) => s.parse().context("PGCOURIER_CONVERGE_SEED is a number")?,
        Err(_) => std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)?
            .as_secs(),
    };
    eprintln!("converge: seed {seed} (replay with PGCOURIER_CONVERGE_SEED={seed})");
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
    // For a figure: PGCOURIER_CONVERGE_OPS transactions per site (at most
    // 20000), and PGCOURIER_CONVERGE_KILLS=0 to keep the senders' byte
    // counts whole.
    let ops: u32 = match std::env::var("PGCOURIER_CONVERGE_OPS") {
        Ok(s) => s
            .parse::<u32>()
            .context("PGCOURIER_CONVERGE_OPS")?
            .clamp(1, 20_000),
        Err(_) => 60,
    };
    let kills = std::env::var("PGCOURIER_CONVERGE_KILLS").as_deref() != Ok("0");
    // The policy, drawn too (PGCOURIER_CONVERGE_POLICY chooses it).
    let drawn = if rng.gen_bool(0.5) {
        "last-writer-wins"
    } else {
        "merge-columns"
    };
    let policy = std::env::var("PGCOURIER_CONVERGE_POLICY").unwrap_or_else(|_| drawn.to_owned());
    eprintln!("converge: policy {policy}");
    let n = 3;
    let sites = Sites::start_linked(
        "converge",
        n,
        "CREATE TABLE item (id int PRIMARY KEY, v text NOT NULL, qty int NOT NULL DEFAULT 0, note text)",
        |site| {
            format!(
                "site = \"{site}\"\n[[table]]\nname = \"public.item\"\ndirection = \"both\"\n\
                 conflict = \"{policy}\"\ndelta = [\"qty\"]\n"
            )
        },
        true,
    )
    .await?;
    let hq = sites.setup.source().await?;
    for id in STOCK_ROWS.chain(OTHER_KEYS).step_by(1) {
        if STOCK_ROWS.contains(&id) || id % 2 == 0 {
            hq.execute(
                "INSERT INTO item VALUES ($1, 'first', $2)",
                &[&id, &(STOCK as i32)],
            )
            .await?;
        }
    }
    let first: i64 = hq.query_one("SELECT count(*) FROM item", &[]).await?.get(0);
    sites.converged(Some(first)).await?;

    // Every branch is cut off: its links down, both ways (netem); the
    // daemons run on, the senders spool.
    for i in 0..n {
        sites.setup.relays[i].set_down(true);
        sites.relays[i].set_down(true);
    }
    let mut clients = vec![hq];
    for i in 0..n {
        clients.push(sites.setup.target(i).await?);
    }
    let names: Vec<String> = std::iter::once("hq".to_owned())
        .chain((0..n).map(|i| format!("branch{i}")))
        .collect();
    let writes = futures_util::future::try_join_all(
        clients
            .iter()
            .zip(&names)
            .enumerate()
            .map(|(k, (c, name))| random_writes(c, name, seed.wrapping_add(1 + k as u64), ops)),
    )
    .await?;

    // The links come back one by one in a random order; on the way a
    // daemon is killed -9 and a cluster stopped at once, both drawn.
    let mut order: Vec<usize> = (0..n).collect();
    for i in (1..n).rev() {
        order.swap(i, rng.gen_range(0..=i));
    }
    let killed_cluster = rng.gen_range(0..=n);
    // Any of the 1 + 3n daemons: headquarters' sender, a branch's
    // receiver, a way-back sender, a receiver of it at headquarters.
    let daemons: Vec<(&Daemon, String)> =
        std::iter::once((&sites.setup.sender, "headquarters' sender".to_owned()))
            .chain((0..n).flat_map(|i| {
                [
                    (
                        &sites.setup.branches[i].receiver,
                        format!("branch{i}'s receiver"),
                    ),
                    (&sites.back[i].0, format!("branch{i}'s way-back sender")),
                    (
                        &sites.back[i].1,
                        format!("headquarters' receiver of branch{i}"),
                    ),
                ]
            }))
            .collect();
    // Drawn when it happens, among those running then.
    let killed_draw: f64 = rng.gen();
    let cluster = if killed_cluster == 0 {
        "headquarters' cluster".to_owned()
    } else {
        format!("branch{}'s cluster", killed_cluster - 1)
    };
    if kills {
        eprintln!(
            "converge: links back in order {order:?}; kill -9 of a running daemon, immediate stop \
             of {cluster}"
        );
    } else {
        eprintln!("converge: links back in order {order:?}; no kills");
    }
    let started = std::time::Instant::now();
    for (step, &i) in order.iter().enumerate() {
        sites.setup.relays[i].set_down(false);
        sites.relays[i].set_down(false);
        tokio::time::sleep(Duration::from_millis(rng.gen_range(200..1500))).await;
        if step == 0 && kills {
            let running: Vec<&(&Daemon, String)> =
                daemons.iter().filter(|(d, _)| d.is_running()).collect();
            let (killed, killed_name) = running[(killed_draw * running.len() as f64) as usize];
            eprintln!("converge: kill -9 of {killed_name}");
            killed.kill9()?;
            let pg = if killed_cluster == 0 {
                &sites.setup.hq
            } else {
                &sites.setup.branches[killed_cluster - 1].pg
            };
            pg.kill()?;
            tokio::time::sleep(Duration::from_millis(500)).await;
            pg.start_again()?;
            killed.respawn()?;
        }
    }
    // Identical first (timed), then quiet.
    let hq = sites.setup.source().await?;
    let backlog = 2 * WAIT + Duration::from_millis(20 * u64::from(ops));
    for i in 0..n {
        let b = sites.setup.target(i).await?;
        if let Err(e) = pgcourier_tests::wait_tables_equal(&hq, &b, &["public.item"], backlog).await
        {
            // What each site holds and decided, for the diagnosis.
            let mut dump = String::new();
            for k in 0..=n {
                let c = if k == 0 {
                    sites.setup.source().await?
                } else {
                    sites.setup.target(k - 1).await?
                };
                for sql in [
                    "SELECT 'row', id::text, v || ' qty ' || qty || ' note ' || coalesce(note, '-') FROM item ORDER BY id",
                    "SELECT 'clock', key::text, hlc || ' ' || site || ' deleted ' || deleted || ' inc ' \
                     || coalesce(incarnation::text, '-') FROM pgcourier.clock ORDER BY key",
                    "SELECT 'conflict', key::text, kind || ' ' || winner || ' local ' || coalesce(local_row ->> 'v', '-') \
                     || '@' || coalesce(local_hlc::text, '-') || ' remote ' || coalesce(remote_row ->> 'v', '-') || '@' \
                     || coalesce(remote_hlc::text, '-') FROM pgcourier.conflicts ORDER BY id",
                ] {
                    for r in c.query(sql, &[]).await? {
                        dump.push_str(&format!(
                            "site {k} {} {} {}\n",
                            r.get::<_, String>(0),
                            r.get::<_, String>(1),
                            r.get::<_, String>(2)
                        ));
                    }
                }
            }
            return Err(e.context(format!("seed {seed}\n{dump}\n{}", sites.logs())));
        }
    }
    let took = started.elapsed();
    let statuses = sites.converged(None).await?;

    // Reconnect: a stopped cluster closed the writers' connections.
    let hq = sites.setup.source().await?;
    for id in STOCK_ROWS {
        let taken: i64 = writes
            .iter()
            .map(|w| w.taken.get(&id).copied().unwrap_or(0))
            .sum();
        let qty: i32 = hq
            .query_one("SELECT qty FROM item WHERE id = $1", &[&id])
            .await?
            .get(0);
        assert_eq!(
            i64::from(qty),
            STOCK - taken,
            "stock row {id}: every site's takings count once"
        );
    }
    let mut logged = std::collections::BTreeSet::new();
    let mut conflicts = Vec::new();
    for i in 0..=n {
        let c = if i == 0 {
            sites.setup.source().await?
        } else {
            sites.setup.target(i - 1).await?
        };
        let rows = c
            .query(
                "SELECT local_row ->> 'v', remote_row ->> 'v', state FROM pgcourier.conflicts",
                &[],
            )
            .await?;
        for r in &rows {
            logged.extend(r.get::<_, Option<String>>(0));
            logged.extend(r.get::<_, Option<String>>(1));
            assert_ne!(
                r.get::<_, String>(2),
                "open",
                "nothing is parked under {policy}"
            );
        }
        conflicts.push(rows.len());
    }
    for (w, name) in writes.iter().zip(&names) {
        for (id, last) in &w.last {
            let Some(v) = last else { continue };
            let now: Option<String> = hq
                .query_opt("SELECT v FROM item WHERE id = $1", &[id])
                .await?
                .map(|r| r.get(0));
            assert!(
                now.as_deref() == Some(v.as_str()) || logged.contains(v),
                "{name}'s last version of row {id} ({v}) is neither kept nor in a conflict log"
            );
        }
    }
    let shipped = |field: &str| -> u64 {
        statuses
            .iter()
            .filter_map(|s| s["shipping"][field].as_u64())
            .sum()
    };
    eprintln!(
        "converge: {} transactions per site; converged {:.1} s after the first link returned; \
         conflicts recorded per site (hq, branches) {conflicts:?}; the senders shipped {} bytes \
         of changes compressed to {} (since their last start)",
        ops,
        took.as_secs_f64(),
        shipped("raw_bytes"),
        shipped("compressed_bytes")
    );
    Ok(())
}

/// Two sites insert rows with different keys and the same value of a
/// unique column while cut off: at each site the row written later stays
/// and the other is deleted, the same everywhere, and the clash is
/// recorded at both; apply never pauses.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_unique_key_clash_between_sites_keeps_the_later_row_everywhere() -> anyhow::Result<()> {
    let (setup, ports, back_sender, hq_receiver) = both_ways(
        "unique",
        "",
        [&two_way_item("hq"), &two_way_item("branch0")],
    )
    .await?;
    let logs = || two_site_logs(&setup, &back_sender, &hq_receiver);
    let hq = setup.source().await?;
    let branch = setup.target(0).await?;
    setup.branches[0].receiver.terminate()?;
    hq_receiver.terminate()?;
    // a@x: headquarters first, the branch later; b@x: the other way.
    hq.batch_execute("INSERT INTO item (id, v, email) VALUES (1, 'hq', 'a@x')")
        .await?;
    tokio::time::sleep(Duration::from_millis(5)).await;
    branch
        .batch_execute("INSERT INTO item (id, v, email) VALUES (2, 'branch', 'a@x')")
        .await?;
    branch
        .batch_execute("INSERT INTO item (id, v, email) VALUES (3, 'branch', 'b@x')")
        .await?;
    tokio::time::sleep(Duration::from_millis(5)).await;
    hq.batch_execute("INSERT INTO item (id, v, email) VALUES (4, 'hq', 'b@x')")
        .await?;
    setup.branches[0].receiver.respawn()?;
    hq_receiver.respawn()?;

    let clashes = "SELECT count(*) FROM pgcourier.conflicts WHERE kind = 'unique item_email_key'";
    for c in [&hq, &branch] {
        crate::fixture::wait_count(c, clashes, 2, WAIT)
            .await
            .with_context(logs)?;
    }
    pgcourier_tests::wait_tables_equal(&hq, &branch, &["public.item"], WAIT)
        .await
        .with_context(logs)?;
    let ids: Vec<i32> = hq
        .query("SELECT id FROM item ORDER BY id", &[])
        .await?
        .iter()
        .map(|r| r.get(0))
        .collect();
    assert_eq!(ids, vec![2, 4], "the later row of each clash stays");
    for port in [ports[1], ports[3]] {
        let st = admin_status(port).await?;
        assert!(st["last_error"].is_null(), "apply went on: {st}");
    }
    Ok(())
}

/// A delete/delete conflict that the arriving deletion wins at
/// headquarters changes no row there, but its clock must still reach the
/// other branches: headquarters deletes first, branch 1 updates later,
/// branch 0 deletes last (the latest version: deleted). Headquarters meets
/// branch 0's deletion before branch 1's update and keeps the row deleted;
/// branch 1 keeps its update against headquarters' older deletion and
/// must then apply branch 0's, forwarded as a clock with no row change.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_deletion_that_found_nothing_at_headquarters_still_reaches_the_other_branch(
) -> anyhow::Result<()> {
    let sites = Sites::start_with(
        "orphan",
        2,
        "CREATE TABLE item (id int PRIMARY KEY, v text NOT NULL)",
        |site| {
            format!("site = \"{site}\"\n[[table]]\nname = \"public.item\"\ndirection = \"both\"\n")
        },
    )
    .await?;
    let hq = sites.setup.source().await?;
    hq.batch_execute("INSERT INTO item VALUES (1, 'first')")
        .await?;
    sites.converged(Some(1)).await?;
    for i in 0..2 {
        sites.setup.branches[i].receiver.terminate()?;
        sites.back[i].1.terminate()?;
    }
    let b0 = sites.setup.target(0).await?;
    let b1 = sites.setup.target(1).await?;
    let step = || tokio::time::sleep(Duration::from_millis(5));
    hq.batch_execute("DELETE FROM item WHERE id = 1").await?;
    step().await;
    b1.batch_execute("UPDATE item SET v = 'branch1' WHERE id = 1")
        .await?;
    step().await;
    b0.batch_execute("DELETE FROM item WHERE id = 1").await?;

    // Branch 0's link first: headquarters meets the delete/delete.
    sites.setup.branches[0].receiver.respawn()?;
    sites.back[0].1.respawn()?;
    crate::fixture::wait_count(
        &hq,
        "SELECT count(*) FROM pgcourier.conflicts WHERE kind = 'delete/delete' AND winner = 'remote'",
        1,
        WAIT,
    )
    .await
    .with_context(|| sites.logs())?;
    sites.setup.branches[1].receiver.respawn()?;
    sites.back[1].1.respawn()?;
    sites.converged(Some(0)).await?;
    Ok(())
}

/// Policy `merge-columns` (with a `delta` column): two sites changing
/// different columns of a row while the link is down both keep their
/// change; the same column changed at both takes the later; stock taken
/// at both adds up beside a column change; a deletion wins over an update
/// of the row it removed, even a later one; an update of a row another
/// insert replaced is dropped. Every such meeting is recorded, and both
/// sites end with the same rows and clocks.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn merge_columns_keeps_changes_to_different_columns_from_both_sites() -> anyhow::Result<()> {
    let table = |site: &str| {
        format!(
            "{}conflict = \"merge-columns\"\ndelta = [\"qty\"]\n",
            two_way_item(site)
        )
    };
    let (setup, _ports, back_sender, hq_receiver) =
        both_ways("merge", "", [&table("hq"), &table("branch0")]).await?;
    let logs = || two_site_logs(&setup, &back_sender, &hq_receiver);
    let hq = setup.source().await?;
    let branch = setup.target(0).await?;
    for i in 1..=7 {
        hq.execute("INSERT INTO item VALUES ($1, 'first', 100)", &[&i])
            .await?;
    }
    let count = "SELECT count(*) FROM item";
    crate::fixture::wait_count(&branch, count, 7, WAIT)
        .await
        .with_context(logs)?;
    // Row 7 as an initial copy leaves it at a branch that joins later:
    // without its clock there.
    branch
        .batch_execute("DELETE FROM pgcourier.clock WHERE key = '{\"id\": 7}'")
        .await?;

    setup.branches[0].receiver.terminate()?;
    hq_receiver.terminate()?;
    let step = || tokio::time::sleep(Duration::from_millis(5));
    let writes: [(&tokio_postgres::Client, &str); 12] = [
        // Row 1: different columns.
        (&hq, "UPDATE item SET v = 'hq' WHERE id = 1"),
        (&branch, "UPDATE item SET email = 'b1@branch' WHERE id = 1"),
        // Row 2: the same column; the branch's is later.
        (&hq, "UPDATE item SET v = 'older' WHERE id = 2"),
        (&branch, "UPDATE item SET v = 'newer' WHERE id = 2"),
        // Row 3: stock taken at both, beside a change of another column.
        (&hq, "UPDATE item SET v = 'hq', qty = qty - 3 WHERE id = 3"),
        (
            &branch,
            "UPDATE item SET email = 'b3@branch', qty = qty - 4 WHERE id = 3",
        ),
        // Row 4: deleted at headquarters, updated later at the branch.
        (&hq, "DELETE FROM item WHERE id = 4"),
        (&branch, "UPDATE item SET v = 'too late' WHERE id = 4"),
        // Row 5: the branch updates, then headquarters deletes and
        // inserts the key again (a new incarnation).
        (&branch, "UPDATE item SET email = 'b5@branch' WHERE id = 5"),
        (
            &hq,
            "DELETE FROM item WHERE id = 5; INSERT INTO item VALUES (5, 'reborn', 7)",
        ),
        // Row 7, copied without its clock: different columns.
        (&hq, "UPDATE item SET v = 'hq' WHERE id = 7"),
        (&branch, "UPDATE item SET email = 'b7@branch' WHERE id = 7"),
    ];
    for (site, sql) in writes {
        site.batch_execute(sql).await?;
        step().await;
    }
    setup.branches[0].receiver.respawn()?;
    hq_receiver.respawn()?;
    crate::fixture::wait_count(&hq, count, 6, WAIT)
        .await
        .with_context(logs)?;
    pgcourier_tests::wait_tables_equal(&hq, &branch, &["public.item"], WAIT)
        .await
        .with_context(logs)?;
    let rows = "SELECT id, v, qty, coalesce(email, '-') FROM item ORDER BY id";
    let want = vec![
        "1 hq 100 b1@branch",
        "2 newer 100 -",
        "3 hq 93 b3@branch",
        "5 reborn 7 -",
        "6 first 100 -",
        "7 hq 100 b7@branch",
    ];
    for (site, c) in [("headquarters", &hq), ("the branch", &branch)] {
        let got: Vec<String> = c
            .query(rows, &[])
            .await?
            .iter()
            .map(|r| {
                format!(
                    "{} {} {} {}",
                    r.get::<_, i32>(0),
                    r.get::<_, String>(1),
                    r.get::<_, i32>(2),
                    r.get::<_, String>(3)
                )
            })
            .collect();
        assert_eq!(got, want, "rows at {site}\n{}", logs());
    }
    let clocks = "SELECT key::text, hlc, site, deleted, coalesce(cols::text, '') \
                  FROM pgcourier.clock ORDER BY 1";
    let clock_lines = |rows: Vec<tokio_postgres::Row>| -> Vec<String> {
        rows.iter()
            .map(|r| {
                format!(
                    "{} {} {} {} {}",
                    r.get::<_, String>(0),
                    r.get::<_, i64>(1),
                    r.get::<_, String>(2),
                    r.get::<_, bool>(3),
                    r.get::<_, String>(4)
                )
            })
            .collect()
    };
    assert_eq!(
        clock_lines(hq.query(clocks, &[]).await?),
        clock_lines(branch.query(clocks, &[]).await?),
        "the sites' row and column clocks differ"
    );
    // Rows 1 to 5 each met a change the writer had not seen, at each site.
    let met = "SELECT DISTINCT (key ->> 'id')::int FROM pgcourier.conflicts \
               WHERE policy = 'merge-columns' ORDER BY 1";
    for (site, c) in [("headquarters", &hq), ("the branch", &branch)] {
        let ids: Vec<i32> = c.query(met, &[]).await?.iter().map(|r| r.get(0)).collect();
        assert_eq!(ids, vec![1, 2, 3, 4, 5, 7], "conflicts recorded at {site}");
    }
    Ok(())
}

/// A table written at the branches only (`direction = "up"`, orders taken
/// at shops): each branch's rows reach headquarters, and go no further;
/// headquarters' own write to it is reported, not shipped down; the
/// one-way tables still come down.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_table_written_at_the_branches_goes_up_to_headquarters_only() -> anyhow::Result<()> {
    let up = "[[table]]\nname = \"public.orders\"\ndirection = \"up\"\n";
    let sites = Sites::start_with(
        "up",
        2,
        "CREATE TABLE item (id int PRIMARY KEY, v text NOT NULL); \
         CREATE TABLE orders (id int PRIMARY KEY, shop text NOT NULL)",
        |site| {
            if site == "hq" {
                up.to_owned()
            } else {
                format!("ship-tables = \"two-way\"\n{up}")
            }
        },
    )
    .await?;
    let logs = || sites.logs();
    let hq = sites.setup.source().await?;
    let b0 = sites.setup.target(0).await?;
    let b1 = sites.setup.target(1).await?;
    hq.batch_execute("INSERT INTO orders VALUES (1, 'hq')")
        .await?;
    for i in 0..5 {
        b0.execute("INSERT INTO orders VALUES ($1, 'branch0')", &[&(100 + i)])
            .await?;
        b1.execute("INSERT INTO orders VALUES ($1, 'branch1')", &[&(200 + i)])
            .await?;
    }
    let orders = "SELECT count(*) FROM orders";
    crate::fixture::wait_count(&hq, orders, 11, WAIT)
        .await
        .with_context(logs)?;
    // Headquarters' next transaction comes down after anything it would
    // have forwarded.
    hq.batch_execute("INSERT INTO item VALUES (1, 'after')")
        .await?;
    for b in [&b0, &b1] {
        crate::fixture::wait_count(b, "SELECT count(*) FROM item", 1, WAIT)
            .await
            .with_context(logs)?;
    }
    for (name, b) in [("branch0", &b0), ("branch1", &b1)] {
        let shops: Vec<String> = b
            .query("SELECT DISTINCT shop FROM orders", &[])
            .await?
            .iter()
            .map(|r| r.get(0))
            .collect();
        assert_eq!(shops, vec![name.to_owned()], "orders at {name}\n{}", logs());
    }
    // Headquarters' own order and the ten it applied: left out, counted.
    let status = admin_status(sites.ports[0]).await?;
    assert_eq!(
        status["one_way_writes"]["public.orders"], 11,
        "headquarters' sender: {status}"
    );
    Ok(())
}

/// Each site configured in one file: headquarters' sender and its
/// receiver of the branch's changes (`[apply.branch0]`) from one, the
/// branch's receiver (`[apply.hq]`) and sender from the other; the
/// receivers take the site's identity, database and peer fingerprint.
/// Changes flow both ways, and `pgcourier-queue` reads either daemon of a
/// site from its file.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_site_is_configured_in_one_file() -> anyhow::Result<()> {
    let setup = Setup::start(
        "site-file",
        Options {
            schema: "CREATE TABLE item (id int PRIMARY KEY, v text NOT NULL)",
            sender_extra: &two_way_item("hq"),
            ..Options::default()
        },
    )
    .await?;
    let dir = setup.dir.path();
    setup.sender.terminate()?;
    setup.branches[0].receiver.terminate()?;
    let hq_fp = {
        let branch_config = std::fs::read_to_string(&setup.branches[0].config)?;
        branch_config
            .split("sender-fingerprints = [\"")
            .nth(1)
            .and_then(|s| s.split('"').next())
            .context("headquarters' fingerprint")?
            .to_owned()
    };
    let back_port = free_udp_port();
    let hq_site = dir.join("hq-site.toml");
    std::fs::write(
        &hq_site,
        format!(
            "{}\n[apply.branch0]\ninbox-dir = \"hq-inbox\"\nlisten = \"127.0.0.1:{back_port}\"\n\
             max-backoff = \"2s\"\n",
            std::fs::read_to_string(&setup.sender_config)?
        ),
    )?;
    let branch_site = dir.join("branch-site.toml");
    std::fs::write(
        &branch_site,
        format!(
            "source = \"{}\"\nspool-dir = \"back-spool\"\ncert = \"branch0.crt\"\nkey = \"branch0.key\"\n\
             initial-copy = false\npoll-interval = \"50ms\"\nmax-backoff = \"2s\"\nship-tables = \"two-way\"\n\
             {}\n[[receiver]]\nname = \"hq\"\nfingerprint = \"{hq_fp}\"\naddress = \"127.0.0.1:{back_port}\"\n\n\
             [apply.hq]\n{}",
            setup.branches[0].pg.conninfo(DB),
            two_way_item("branch0"),
            std::fs::read_to_string(&setup.branches[0].config)?
        ),
    )?;
    let path = |p: &std::path::Path| p.to_str().map(str::to_owned).context("utf-8 path");
    let (hq_site_s, branch_site_s) = (path(&hq_site)?, path(&branch_site)?);
    let daemons = [
        Daemon::spawn(
            "hq-site-sender",
            &bin_path("pgcourier-sender"),
            &["run", "--config", &hq_site_s],
            &dir.join("hq-site-sender.log"),
        )?,
        // As the unit pgcourier-receiver@branch0 runs it.
        Daemon::spawn_with_env(
            "hq-site-receiver",
            &bin_path("pgcourier-receiver"),
            &["run", "--config", &hq_site_s],
            &[("PGCOURIER_PEER", "branch0")],
            &dir.join("hq-site-receiver.log"),
        )?,
        Daemon::spawn(
            "branch-site-receiver",
            &bin_path("pgcourier-receiver"),
            &["run", "--config", &branch_site_s],
            &dir.join("branch-site-receiver.log"),
        )?,
        Daemon::spawn(
            "branch-site-sender",
            &bin_path("pgcourier-sender"),
            &["run", "--config", &branch_site_s],
            &dir.join("branch-site-sender.log"),
        )?,
    ];
    let logs = || {
        daemons
            .iter()
            .map(|d| format!("--- {} ---\n{}\n", d.name(), d.log_tail(30)))
            .collect::<String>()
    };
    // The branch's sender captures before either site writes.
    wait_until("the branch's sender to capture", WAIT, || async {
        let (code, out) = queue(&branch_site, &["status", "--json"])?;
        Ok(code == 0 && out.contains("\"slot\": {"))
    })
    .await
    .with_context(logs)?;
    let hq = setup.source().await?;
    let branch = setup.target(0).await?;
    for i in 1..=5 {
        hq.execute("INSERT INTO item VALUES ($1, 'hq')", &[&i])
            .await?;
        branch
            .execute("INSERT INTO item VALUES ($1, 'branch')", &[&(100 + i)])
            .await?;
    }
    for c in [&hq, &branch] {
        crate::fixture::wait_count(c, "SELECT count(*) FROM item", 10, WAIT)
            .await
            .with_context(logs)?;
    }
    for (config, peer, role) in [
        (&hq_site, None, "sender"),
        (&hq_site, Some("branch0"), "receiver"),
        (&branch_site, Some("hq"), "receiver"),
    ] {
        let mut args = vec!["status", "--json"];
        if let Some(p) = peer {
            args.extend(["--peer", p]);
        }
        let (code, out) = queue(config, &args)?;
        assert_eq!(code, 0, "{out}");
        assert!(
            out.contains(&format!("\"role\": \"{role}\"")),
            "{config:?} {peer:?}: {out}"
        );
    }
    let (code, out) = queue(&hq_site, &["status", "--peer", "branch9"])?;
    assert!(
        code != 0 && out.contains("[apply.branch9]"),
        "a wrong peer: {code} {out}"
    );
    Ok(())
}
