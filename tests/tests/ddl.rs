//! Schema changes follow headquarters: DDL captured by the sender's event
//! trigger is applied at the branch in commit order, inside the target
//! transaction of its source transaction, under a continuous write load.

use std::process::Command;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::Context;
use pgcourier_tests::{bin_path, pg_bindir, wait_until, PgCluster};

use crate::fixture::{admin_status as status, free_tcp_port, Options, Setup, DB};

const WAIT: Duration = Duration::from_secs(120);

/// `pg_dump --schema-only` of schema public, without comments, SET lines,
/// `\restrict` lines and blank lines.
fn schema_dump(pg: &PgCluster) -> anyhow::Result<String> {
    let out = Command::new(pg_bindir()?.join("pg_dump"))
        .args([
            "--schema-only",
            "--no-owner",
            "--no-privileges",
            "--no-publications",
            "--no-subscriptions",
            "-n",
            "public",
            "-d",
            &pg.conninfo(DB),
        ])
        .output()
        .context("run pg_dump")?;
    anyhow::ensure!(
        out.status.success(),
        "pg_dump failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    Ok(String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter(|l| {
            let t = l.trim();
            !(t.is_empty()
                || t.starts_with("--")
                || t.starts_with("SET ")
                // pg_dump's per-run random key (17.6+, 15.14+).
                || t.starts_with("\\restrict ")
                || t.starts_with("\\unrestrict ")
                || t.starts_with("SELECT pg_catalog.set_config"))
        })
        .collect::<Vec<_>>()
        .join("\n"))
}

/// The migration, one statement per query (as psql sends a script): what
/// migrations do to tables, columns, constraints, indexes, types, views,
/// functions, triggers, comments and sequences, renames included.
const MIGRATION: &[&str] = &[
    "ALTER TABLE item ADD COLUMN status text DEFAULT 'new'",
    "UPDATE item SET status = 'old' WHERE id % 2 = 0",
    "ALTER TABLE item ALTER COLUMN status SET NOT NULL",
    "ALTER TABLE item RENAME COLUMN name TO label",
    "ALTER TABLE item ALTER COLUMN qty TYPE bigint USING qty::bigint * 10",
    "CREATE INDEX CONCURRENTLY item_status ON item (status)",
    "CREATE TYPE mood AS ENUM ('calm', 'busy')",
    "ALTER TYPE mood ADD VALUE 'tired'",
    "ALTER TABLE item ADD COLUMN mood mood",
    "UPDATE item SET mood = 'tired' WHERE id % 5 = 0",
    "CREATE TABLE note (id integer PRIMARY KEY, item_id integer, body text)",
    "INSERT INTO note SELECT g, g, 'note ' || g FROM generate_series(1, 50) g",
    "CREATE TABLE summary AS SELECT id, qty FROM item WHERE id <= 20",
    "ALTER TABLE item DROP COLUMN label",
    "CREATE TABLE scratch (id integer PRIMARY KEY)",
    "INSERT INTO scratch SELECT generate_series(1, 10)",
    "DROP TABLE scratch",
    "ALTER TABLE item ADD CONSTRAINT qty_not_negative CHECK (qty >= 0)",
    "CREATE VIEW item_view AS SELECT id, status FROM item",
    "ALTER VIEW item_view RENAME TO item_list",
    "CREATE FUNCTION item_count() RETURNS bigint LANGUAGE sql AS 'SELECT count(*) FROM item'",
    "ALTER FUNCTION item_count() RENAME TO item_total",
    "CREATE FUNCTION touch() RETURNS trigger LANGUAGE plpgsql AS $$ BEGIN RETURN NEW; END $$",
    "CREATE TRIGGER item_touch BEFORE UPDATE ON item FOR EACH ROW EXECUTE FUNCTION touch()",
    "COMMENT ON TABLE item IS 'what the shops sell'",
    "CREATE SEQUENCE ticket_seq START 100",
    "ALTER SEQUENCE ticket_seq RENAME TO ticket_no",
    "ALTER TABLE note ALTER COLUMN body SET DEFAULT 'empty'",
    "ALTER TABLE item DROP CONSTRAINT qty_not_negative",
];

/// A branch-local audit of applied inserts into `item` (schema audit: not
/// dumped).
async fn audit_inserts(dst: &tokio_postgres::Client) -> anyhow::Result<()> {
    dst.batch_execute(
        "CREATE SCHEMA audit;
         CREATE TABLE audit.applied (id integer);
         CREATE FUNCTION audit.rec() RETURNS trigger LANGUAGE plpgsql AS $$
         BEGIN INSERT INTO audit.applied VALUES (NEW.id); RETURN NULL; END $$;
         CREATE TRIGGER applied AFTER INSERT ON item FOR EACH ROW EXECUTE FUNCTION audit.rec();
         ALTER TABLE item ENABLE ALWAYS TRIGGER applied;",
    )
    .await?;
    Ok(())
}

/// The writer: inserts and updates into the table being changed, until
/// `done` (bounded in count and time). Returns the rows inserted.
fn spawn_writer(
    client: tokio_postgres::Client,
    done: Arc<AtomicBool>,
) -> tokio::task::JoinHandle<anyhow::Result<i32>> {
    tokio::spawn(async move {
        let started = Instant::now();
        let mut id = 0i32;
        while id < 3000 && started.elapsed() < Duration::from_secs(90) {
            id += 1;
            client
                .execute(
                    "INSERT INTO item (id, qty) VALUES ($1, $2::text::bigint)",
                    &[&id, &id.to_string()],
                )
                .await
                .map_err(|e| anyhow::anyhow!("writer insert {id}: {:?}", e.as_db_error()))?;
            if id % 3 == 0 {
                client
                    .execute("UPDATE item SET qty = qty + 1 WHERE id = $1", &[&(id - 1)])
                    .await
                    .map_err(|e| anyhow::anyhow!("writer update {id}: {:?}", e.as_db_error()))?;
            }
            if done.load(Ordering::Relaxed) && id >= 200 {
                break;
            }
        }
        anyhow::Ok(id)
    })
}

/// Run `steps` of the migration at the source, one statement per query.
async fn migrate(src: &tokio_postgres::Client, steps: &[&str]) -> anyhow::Result<()> {
    for statement in steps {
        src.batch_execute(statement)
            .await
            .with_context(|| format!("source: {statement}"))?;
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    Ok(())
}

/// DDL and DML in one source transaction, statement by statement.
async fn migrate_in_one_transaction(src: &tokio_postgres::Client) -> anyhow::Result<()> {
    src.batch_execute("BEGIN").await?;
    src.batch_execute("ALTER TABLE note ADD COLUMN seen boolean DEFAULT false")
        .await?;
    src.batch_execute("UPDATE note SET seen = true WHERE id < 10")
        .await?;
    src.batch_execute("INSERT INTO note VALUES (51, 1, 'late', true)")
        .await?;
    src.batch_execute("COMMIT").await?;
    Ok(())
}

/// After the migration: the branch's data and schema equal headquarters',
/// each insert was applied once, and apply never paused.
async fn converged(setup: &Setup, admin: u16, written: i32) -> anyhow::Result<()> {
    setup
        .wait_equal(0, &["public.item", "public.note", "public.summary"], WAIT)
        .await?;
    let dst = setup.target(0).await?;
    // Schema: identical, once the branch's local audit trigger is gone.
    dst.batch_execute("DROP TRIGGER applied ON item").await?;
    let (hq, branch) = (schema_dump(&setup.hq)?, schema_dump(&setup.branches[0].pg)?);
    anyhow::ensure!(
        hq == branch,
        "schemas differ:\n--- hq ---\n{hq}\n--- branch ---\n{branch}"
    );
    anyhow::ensure!(hq.contains("item_status"), "the index is there: {hq}");
    // No insert applied twice.
    let (applied, twice): (i64, i64) = {
        let r = dst
            .query_one(
                "SELECT count(*), (SELECT count(*) FROM (SELECT id FROM audit.applied GROUP BY id HAVING count(*) > 1) x) FROM audit.applied",
                &[],
            )
            .await?;
        (r.get(0), r.get(1))
    };
    anyhow::ensure!(
        applied == i64::from(written) && twice == 0,
        "{applied} inserts applied for {written} written, {twice} ids applied more than once"
    );
    // Apply never paused.
    let st = status(admin).await?;
    anyhow::ensure!(
        st["error_class"].is_null() && st["apply_state"] != "paused",
        "apply reports an error: {st}"
    );
    let log = setup.branches[0].receiver.log();
    anyhow::ensure!(
        !log.contains("apply paused"),
        "apply paused on the way:\n{}",
        setup.logs()
    );
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_migration_under_write_load_leaves_the_branch_identical_in_data_and_schema(
) -> anyhow::Result<()> {
    let admin = free_tcp_port();
    let receiver_extra = format!("admin = \"127.0.0.1:{admin}\"");
    let setup = Setup::start(
        "ddl-migration",
        Options {
            schema: "CREATE TABLE item (id integer PRIMARY KEY, name text, qty integer);",
            receiver_extra: &receiver_extra,
            sender_extra: "ddl-capture = true",
            ..Options::default()
        },
    )
    .await?;
    audit_inserts(&setup.target(0).await?).await?;
    let done = Arc::new(AtomicBool::new(false));
    let writer = spawn_writer(setup.source().await?, done.clone());
    let src = setup.source().await?;
    migrate(&src, MIGRATION).await?;
    migrate_in_one_transaction(&src).await?;
    done.store(true, Ordering::Relaxed);
    let written = writer.await??;
    eprintln!("writer: {written} inserts");
    converged(&setup, admin, written).await
}

/// The same migration through an outage of the link that spans part of it,
/// a sender killed (SIGKILL) during the outage and a receiver killed while
/// it catches up afterwards.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_migration_through_an_outage_and_killed_daemons_leaves_the_branch_identical(
) -> anyhow::Result<()> {
    const TIMERS: &str = "idle-timeout = \"4s\"\nkeep-alive = \"1s\"";
    let admin = free_tcp_port();
    let receiver_extra = format!("{TIMERS}\nadmin = \"127.0.0.1:{admin}\"");
    let link = pgcourier_netem::Profile::by_name("dsl")
        .context("dsl profile")?
        .link(15);
    let mut setup = Setup::start(
        "ddl-outage",
        Options {
            schema: "CREATE TABLE item (id integer PRIMARY KEY, name text, qty integer);",
            receiver_extra: &receiver_extra,
            sender_extra: &format!("{TIMERS}\nddl-capture = true"),
            link: Some(link),
            ..Options::default()
        },
    )
    .await?;
    audit_inserts(&setup.target(0).await?).await?;
    let done = Arc::new(AtomicBool::new(false));
    let writer = spawn_writer(setup.source().await?, done.clone());
    let src = setup.source().await?;
    let (first, rest) = MIGRATION.split_at(4);
    let (during, after) = rest.split_at(6);
    migrate(&src, first).await?;
    setup.relays[0].set_down(true);
    migrate(&src, &during[..3]).await?;
    setup.sender.kill9()?;
    migrate(&src, &during[3..]).await?;
    setup.restart_sender()?;
    migrate(&src, after).await?;
    migrate_in_one_transaction(&src).await?;
    setup.relays[0].set_down(false);
    // Kill the receiver once it has applied part of what the outage held.
    let dst = setup.target(0).await?;
    let at_outage: i64 = dst
        .query_one("SELECT count(*) FROM audit.applied", &[])
        .await?
        .get(0);
    wait_until("the branch to apply after the outage", WAIT, || async {
        let n: i64 = dst
            .query_one("SELECT count(*) FROM audit.applied", &[])
            .await?
            .get(0);
        Ok(n > at_outage)
    })
    .await
    .with_context(|| setup.logs())?;
    setup.branches[0].receiver.kill9()?;
    setup.restart_receiver(0)?;
    done.store(true, Ordering::Relaxed);
    let written = writer.await??;
    eprintln!("writer: {written} inserts");
    converged(&setup, admin, written).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_schema_change_the_branch_refuses_pauses_apply_naming_it_until_the_conflict_is_gone(
) -> anyhow::Result<()> {
    let admin = free_tcp_port();
    let receiver_extra = format!("admin = \"127.0.0.1:{admin}\"");
    let setup = Setup::start(
        "ddl-refused",
        Options {
            schema: "CREATE TABLE item (id integer PRIMARY KEY, qty integer);",
            receiver_extra: &receiver_extra,
            sender_extra: "ddl-capture = true",
            ..Options::default()
        },
    )
    .await?;
    let (src, dst) = (setup.source().await?, setup.target(0).await?);
    // A local object in the way.
    dst.batch_execute("CREATE TABLE extra (local text)").await?;
    src.batch_execute("INSERT INTO item VALUES (1, 1)").await?;
    src.batch_execute("CREATE TABLE extra (id integer PRIMARY KEY, v text)")
        .await?;
    src.batch_execute("INSERT INTO extra VALUES (1, 'one')")
        .await?;
    src.batch_execute("INSERT INTO item VALUES (2, 2)").await?;
    wait_until("apply to pause with class ddl", WAIT, || async {
        let st = status(admin).await?;
        Ok(st["apply_state"] == "paused" && st["error_class"] == "ddl")
    })
    .await
    .with_context(|| setup.logs())?;
    let out = Command::new(bin_path("pgcourier-queue"))
        .args([
            "--config",
            setup.branches[0].config.to_str().expect("utf-8"),
            "status",
        ])
        .output()?;
    let text = String::from_utf8_lossy(&out.stdout);
    anyhow::ensure!(
        text.contains("CREATE TABLE extra (id integer PRIMARY KEY, v text)")
            && text.contains("(ddl)"),
        "pgcourier-queue status names the statement: {text}"
    );
    // What came before the refused transaction is applied.
    let n: i64 = dst
        .query_one("SELECT count(*) FROM item", &[])
        .await?
        .get(0);
    anyhow::ensure!(n == 1, "item holds {n} rows at the pause");
    // The DBA removes the local table: apply resumes by itself.
    dst.batch_execute("DROP TABLE extra").await?;
    setup
        .wait_equal(0, &["public.item", "public.extra"], WAIT)
        .await?;
    // A sender restart installs its trigger again: that is no schema change
    // for the branch (it once paused on the install script).
    let mut setup = setup;
    setup.sender.kill9()?;
    setup.restart_sender()?;
    src.batch_execute("INSERT INTO item VALUES (3, 3)").await?;
    setup
        .wait_equal(0, &["public.item", "public.extra"], WAIT)
        .await?;
    let st = status(admin).await?;
    anyhow::ensure!(
        st["error_class"].is_null(),
        "apply reports an error after the sender restarted: {st}"
    );
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_ddl_none_the_branch_pauses_at_a_column_it_lacks() -> anyhow::Result<()> {
    let admin = free_tcp_port();
    let receiver_extra = format!("admin = \"127.0.0.1:{admin}\"\nddl = \"none\"");
    let setup = Setup::start(
        "ddl-none",
        Options {
            schema: "CREATE TABLE item (id integer PRIMARY KEY, qty integer);",
            receiver_extra: &receiver_extra,
            sender_extra: "ddl-capture = true",
            ..Options::default()
        },
    )
    .await?;
    let src = setup.source().await?;
    src.batch_execute("ALTER TABLE item ADD COLUMN note text")
        .await?;
    src.batch_execute("INSERT INTO item VALUES (1, 1, 'x')")
        .await?;
    wait_until("apply to pause with class missing_column", WAIT, || async {
        let st = status(admin).await?;
        Ok(st["apply_state"] == "paused" && st["error_class"] == "missing_column")
    })
    .await
    .with_context(|| setup.logs())?;
    Ok(())
}

/// With `ddl-capture = false` the sender installs no event trigger, and a
/// schema change at headquarters reaches no branch (the branch pauses
/// at the first row that no longer fits, as before).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn without_ddl_capture_the_sender_installs_no_trigger() -> anyhow::Result<()> {
    let admin = free_tcp_port();
    let receiver_extra = format!("admin = \"127.0.0.1:{admin}\"");
    let setup = Setup::start(
        "ddl-off",
        Options {
            schema: "CREATE TABLE item (id integer PRIMARY KEY, qty integer);",
            receiver_extra: &receiver_extra,
            sender_extra: "ddl-capture = false",
            ..Options::default()
        },
    )
    .await?;
    let src = setup.source().await?;
    let triggers: i64 = src
        .query_one(
            "SELECT count(*) FROM pg_event_trigger WHERE evtname LIKE 'pgcourier%'",
            &[],
        )
        .await?
        .get(0);
    assert_eq!(triggers, 0, "{}", setup.logs());
    src.batch_execute("ALTER TABLE item ADD COLUMN note text")
        .await?;
    src.batch_execute("INSERT INTO item VALUES (1, 1, 'x')")
        .await?;
    wait_until("apply to pause with class missing_column", WAIT, || async {
        let st = status(admin).await?;
        Ok(st["apply_state"] == "paused" && st["error_class"] == "missing_column")
    })
    .await
    .with_context(|| setup.logs())?;
    Ok(())
}

/// Any role at headquarters may call `pg_logical_emit_message`, and a
/// branch runs what a `pgcourier.ddl` message says: capture keeps only the
/// messages the trigger signed. A forged DDL message, a forged copy
/// message and other applications' messages (transactional or not) reach
/// no branch and stop nothing; the signing function works only inside DDL;
/// the key is neither readable by other roles nor copied; DDL run by code
/// (a DO block) pauses apply, naming it, instead of running the code.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn forged_and_foreign_logical_messages_never_reach_the_branch() -> anyhow::Result<()> {
    let admin = free_tcp_port();
    let receiver_extra = format!("admin = \"127.0.0.1:{admin}\"");
    let setup = Setup::start(
        "ddl-forged",
        Options {
            schema: "CREATE TABLE item (id integer PRIMARY KEY, qty integer);
                     CREATE ROLE mallory LOGIN;
                     GRANT SELECT, INSERT ON item TO mallory;",
            receiver_extra: &receiver_extra,
            sender_extra: "ddl-capture = true",
            ..Options::default()
        },
    )
    .await?;
    let (src, dst) = (setup.source().await?, setup.target(0).await?);
    src.batch_execute("INSERT INTO item VALUES (1, 1)").await?;
    setup.wait_equal(0, &["public.item"], WAIT).await?;

    let conninfo = setup
        .hq
        .conninfo(DB)
        .replace("user=postgres", "user=mallory");
    let (mallory, conn) = tokio_postgres::connect(&conninfo, tokio_postgres::NoTls).await?;
    tokio::spawn(conn);
    // Forged: a statement, a copy (which would truncate the branch's
    // tables), with a row around them; other applications' messages.
    mallory
        .batch_execute(
            r#"BEGIN;
               INSERT INTO item VALUES (2, 2);
               SELECT pg_logical_emit_message(true, 'pgcourier.ddl',
                   '{"statement":"DROP TABLE item","search_path":"public","tags":["DROP TABLE"]}');
               SELECT pg_logical_emit_message(true, 'pgcourier.copy', '{}');
               SELECT pg_logical_emit_message(true, 'app.audit', 'x');
               COMMIT;
               SELECT pg_logical_emit_message(false, 'app.heartbeat', 'beat');
               SELECT pg_logical_emit_message(false, 'pgcourier.ddl', '{"statement":"DROP TABLE item"}');"#,
        )
        .await?;
    // The signing function refuses outside DDL; the key is not readable.
    let e = mallory
        .batch_execute("SELECT pgcourier.ddl_emit('DROP TABLE', 'public', 'postgres')")
        .await
        .expect_err("ddl_emit outside DDL");
    anyhow::ensure!(
        format!("{:?}", e.as_db_error())
            .contains("can only be called in an event trigger function"),
        "ddl_emit outside DDL: {e:?}"
    );
    let e = mallory
        .batch_execute("SELECT key FROM pgcourier.ddl_key")
        .await
        .expect_err("the key is private");
    anyhow::ensure!(
        e.code() == Some(&tokio_postgres::error::SqlState::INSUFFICIENT_PRIVILEGE),
        "reading the key: {e:?}"
    );
    // A real schema change after them is applied, in order.
    src.batch_execute("ALTER TABLE item ADD COLUMN note text")
        .await?;
    src.batch_execute("INSERT INTO item VALUES (3, 3, 'three')")
        .await?;
    setup.wait_equal(0, &["public.item"], WAIT).await?;
    let key_at_branch: Option<String> = dst
        .query_one("SELECT to_regclass('pgcourier.ddl_key')::text", &[])
        .await?
        .get(0);
    anyhow::ensure!(
        key_at_branch.is_none(),
        "the DDL key was copied to the branch"
    );
    let log = setup.sender.log();
    anyhow::ensure!(
        log.contains("left out pgcourier.ddl logical messages whose signature does not verify"),
        "the sender says it left a forged message out:\n{}",
        setup.logs()
    );

    // DDL made by code: the code is not run at the branch.
    src.batch_execute(
        "DO $$ BEGIN EXECUTE 'CREATE TABLE by_code (id integer PRIMARY KEY)'; END $$",
    )
    .await?;
    wait_until("apply to pause with class ddl", WAIT, || async {
        let st = status(admin).await?;
        Ok(st["apply_state"] == "paused"
            && st["error_class"] == "ddl"
            && st["last_error"]
                .as_str()
                .is_some_and(|e| e.contains("made by code at headquarters")))
    })
    .await
    .with_context(|| setup.logs())?;

    // A key short enough to guess (set by hand) is refused: `check` says so.
    src.batch_execute("UPDATE pgcourier.ddl_key SET key = '\\x01'")
        .await?;
    let out = Command::new(bin_path("pgcourier-sender"))
        .args([
            "check",
            "--config",
            setup.sender_config.to_str().expect("utf-8"),
        ])
        .output()?;
    let text = String::from_utf8_lossy(&out.stdout);
    anyhow::ensure!(
        out.status.code() == Some(1) && text.contains("holds a key of 1 bytes"),
        "check on a 1-byte key: {:?}\n{text}",
        out.status
    );
    Ok(())
}

/// With a `FOR TABLE` publication, a table created at headquarters in a
/// schema that has a published table joins the publication in its creating
/// transaction and is followed from its first row; one created in another
/// schema does not join (its DDL still reaches the branch).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_new_table_beside_published_ones_joins_a_for_table_publication() -> anyhow::Result<()> {
    let setup = Setup::start(
        "ddl-for-table",
        Options {
            schema: "CREATE TABLE item (id integer PRIMARY KEY, qty integer);
                     CREATE SCHEMA other;",
            tables: &["public.item"],
            sender_extra: "ddl-capture = true",
            ..Options::default()
        },
    )
    .await?;
    let src = setup.source().await?;
    // One statement per query, as psql sends a script.
    for statement in [
        "BEGIN",
        "CREATE TABLE extra (id integer PRIMARY KEY, v text)",
        "INSERT INTO extra VALUES (1, 'first')",
        "COMMIT",
    ] {
        src.batch_execute(statement).await?;
    }
    src.batch_execute("CREATE TABLE other.apart (id integer PRIMARY KEY)")
        .await?;
    src.batch_execute("INSERT INTO extra VALUES (2, 'second')")
        .await?;
    src.batch_execute("INSERT INTO other.apart VALUES (1)")
        .await?;
    src.batch_execute("INSERT INTO item VALUES (1, 1)").await?;
    setup
        .wait_equal(0, &["public.item", "public.extra"], WAIT)
        .await?;
    let published: Vec<String> = src
        .query(
            "SELECT schemaname || '.' || tablename FROM pg_publication_tables WHERE pubname = 'pgcourier' ORDER BY 1",
            &[],
        )
        .await?
        .iter()
        .map(|r| r.get(0))
        .collect();
    anyhow::ensure!(
        published == ["public.extra", "public.item"],
        "published: {published:?}"
    );
    let dst = setup.target(0).await?;
    let apart: i64 = dst
        .query_one("SELECT count(*) FROM other.apart", &[])
        .await?
        .get(0);
    anyhow::ensure!(
        apart == 0,
        "other.apart is created at the branch, not followed"
    );
    Ok(())
}

/// Wait until `done` holds; fail at once, with the status, if apply pauses
/// meanwhile.
async fn wait_applied<F, Fut>(
    setup: &Setup,
    admin: u16,
    what: &str,
    mut done: F,
) -> anyhow::Result<()>
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = anyhow::Result<bool>>,
{
    wait_until(what, WAIT, || {
        let check = done();
        async move { Ok(check.await? || status(admin).await?["apply_state"] == "paused") }
    })
    .await
    .with_context(|| setup.logs())?;
    // A pause lasts until the target is fixed: still there.
    let st = status(admin).await?;
    anyhow::ensure!(
        st["apply_state"] != "paused",
        "apply paused waiting for {what}: {st}\n{}",
        setup.logs()
    );
    Ok(())
}

/// `indisvalid` of index `name` at the branch; `None` when there is none.
async fn index_valid(client: &tokio_postgres::Client, name: &str) -> anyhow::Result<Option<bool>> {
    Ok(client
        .query_one(
            "SELECT (SELECT indisvalid FROM pg_index WHERE indexrelid = to_regclass($1::text))",
            &[&name],
        )
        .await?
        .get(0))
}

/// `CREATE INDEX CONCURRENTLY` at headquarters is applied at the branch on
/// its own, with `CONCURRENTLY`, between target transactions: while it
/// waits for a branch writer's open transaction, other branch writers go
/// on. (Inside a target transaction the build's SHARE lock request waits in
/// the lock queue, and every writer after it waits behind it.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_concurrent_index_is_built_at_the_branch_without_blocking_its_writers(
) -> anyhow::Result<()> {
    let admin = free_tcp_port();
    let receiver_extra = format!("admin = \"127.0.0.1:{admin}\"");
    let setup = Setup::start(
        "ddl-concurrently",
        Options {
            schema: "CREATE TABLE item (id integer PRIMARY KEY, qty integer);",
            source_sql: "INSERT INTO item SELECT g, g FROM generate_series(1, 100) g;",
            receiver_extra: &receiver_extra,
            sender_extra: "ddl-capture = true",
            ..Options::default()
        },
    )
    .await?;
    let (src, dst) = (setup.source().await?, setup.target(0).await?);
    setup.wait_equal(0, &["public.item"], WAIT).await?;
    // A branch writer in the middle of its transaction.
    let holder = setup.target(0).await?;
    holder
        .batch_execute("BEGIN; INSERT INTO item VALUES (-1, 0)")
        .await?;
    let holder_pid: i32 = holder
        .query_one("SELECT pg_backend_pid()", &[])
        .await?
        .get(0);
    let before: String = src
        .query_one("SELECT pg_current_wal_lsn()::text", &[])
        .await?
        .get(0);
    src.batch_execute("CREATE INDEX CONCURRENTLY item_qty ON item (qty)")
        .await?;
    wait_until(
        "apply's index statement to wait for the branch writer",
        WAIT,
        || async {
            let n: i64 = dst
                .query_one(
                    "SELECT count(*) FROM pg_stat_activity \
                      WHERE pid NOT IN ($1, pg_backend_pid()) \
                        AND query LIKE '%item_qty%' AND wait_event_type = 'Lock'",
                    &[&holder_pid],
                )
                .await?
                .get(0);
            Ok(n > 0)
        },
    )
    .await
    .with_context(|| setup.logs())?;
    // Meanwhile another branch writer is not held up.
    let writer = setup.target(0).await?;
    writer.batch_execute("SET lock_timeout = '10s'").await?;
    if let Err(e) = writer
        .batch_execute("BEGIN; INSERT INTO item VALUES (-2, 0)")
        .await
    {
        anyhow::bail!(
            "a branch INSERT waited behind the index being applied: {}\n{}",
            e.as_db_error()
                .map_or(e.to_string(), |d| d.message().to_owned()),
            setup.logs()
        );
    }
    writer.batch_execute("ROLLBACK").await?;
    holder.batch_execute("ROLLBACK").await?;
    wait_until("the index to be valid at the branch", WAIT, || async {
        Ok(index_valid(&dst, "public.item_qty").await? == Some(true))
    })
    .await
    .with_context(|| setup.logs())?;
    // The progress row moved past its transaction, and apply goes on.
    wait_until("the progress row to pass the index", WAIT, || async {
        let passed: bool = dst
            .query_one(
                "SELECT coalesce(bool_or(commit_lsn > $1::text::pg_lsn), false) FROM pgcourier.progress",
                &[&before],
            )
            .await?
            .get(0);
        Ok(passed)
    })
    .await
    .with_context(|| setup.logs())?;
    src.batch_execute("INSERT INTO item VALUES (101, 101)")
        .await?;
    setup.wait_equal(0, &["public.item"], WAIT).await?;
    let log = setup.branches[0].receiver.log();
    anyhow::ensure!(
        !log.contains("apply paused"),
        "apply paused on the way:\n{}",
        setup.logs()
    );
    Ok(())
}

/// A crash between a `CONCURRENTLY` statement and its progress row replays
/// the statement over what the first run left: an invalid index (an
/// interrupted build, here marked invalid by hand), the index already
/// built, the index already dropped. None of these stops apply, and the
/// index ends valid.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_concurrent_index_statement_replayed_over_what_a_first_run_left_ends_valid(
) -> anyhow::Result<()> {
    let admin = free_tcp_port();
    let receiver_extra = format!("admin = \"127.0.0.1:{admin}\"");
    let setup = Setup::start(
        "ddl-concurrently-replay",
        Options {
            schema: "CREATE TABLE item (id integer PRIMARY KEY, qty integer);",
            source_sql: "INSERT INTO item SELECT g, g FROM generate_series(1, 100) g; \
                         CREATE INDEX item_gone ON item (qty, id);",
            receiver_extra: &receiver_extra,
            sender_extra: "ddl-capture = true",
            ..Options::default()
        },
    )
    .await?;
    let (src, dst) = (setup.source().await?, setup.target(0).await?);
    dst.batch_execute(
        "CREATE INDEX item_qty ON item (qty);
         UPDATE pg_index SET indisvalid = false WHERE indexrelid = 'item_qty'::regclass;
         CREATE INDEX item_built ON item (id, qty);",
    )
    .await?;
    anyhow::ensure!(index_valid(&dst, "item_qty").await? == Some(false));
    src.batch_execute("CREATE INDEX CONCURRENTLY item_qty ON item (qty)")
        .await?;
    src.batch_execute("CREATE INDEX CONCURRENTLY item_built ON item (id, qty)")
        .await?;
    src.batch_execute("DROP INDEX CONCURRENTLY item_gone")
        .await?;
    src.batch_execute("INSERT INTO item VALUES (101, 101)")
        .await?;
    wait_applied(&setup, admin, "the row after the indexes", || async {
        let n: i64 = dst
            .query_one("SELECT count(*) FROM item WHERE id = 101", &[])
            .await?
            .get(0);
        Ok(n == 1)
    })
    .await?;
    for index in ["item_qty", "item_built"] {
        let valid = index_valid(&dst, index).await?;
        anyhow::ensure!(valid == Some(true), "{index}: valid {valid:?}");
    }
    setup.wait_equal(0, &["public.item"], WAIT).await?;
    Ok(())
}

/// A `CONCURRENTLY` build that fails at the branch (a unique index over a
/// branch-local duplicate) pauses apply naming it; the operator's skip moves
/// past it and leaves no invalid index behind.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failed_concurrent_index_pauses_naming_it_and_can_be_skipped() -> anyhow::Result<()> {
    let admin = free_tcp_port();
    let receiver_extra = format!("admin = \"127.0.0.1:{admin}\"");
    let setup = Setup::start(
        "ddl-concurrently-skip",
        Options {
            schema: "CREATE TABLE item (id integer PRIMARY KEY, qty integer);",
            source_sql: "INSERT INTO item SELECT g, g FROM generate_series(1, 10) g;",
            receiver_extra: &receiver_extra,
            sender_extra: "ddl-capture = true",
            ..Options::default()
        },
    )
    .await?;
    let (src, dst) = (setup.source().await?, setup.target(0).await?);
    dst.batch_execute("INSERT INTO item VALUES (-1, 1)").await?;
    src.batch_execute("CREATE UNIQUE INDEX CONCURRENTLY item_qty_u ON item (qty)")
        .await?;
    wait_until("apply to pause with class ddl", WAIT, || async {
        let st = status(admin).await?;
        Ok(st["apply_state"] == "paused" && st["error_class"] == "ddl")
    })
    .await
    .with_context(|| setup.logs())?;
    let st = status(admin).await?;
    anyhow::ensure!(
        st["last_error"]
            .as_str()
            .unwrap_or("")
            .contains("CREATE UNIQUE INDEX CONCURRENTLY item_qty_u ON item (qty)"),
        "the error names the statement: {st}"
    );
    let blocking = st["blocking_seq"].as_u64().context("blocking seq")?;
    let out = Command::new(bin_path("pgcourier-queue"))
        .args([
            "--config",
            setup.branches[0].config.to_str().expect("utf-8"),
            "skip",
            &blocking.to_string(),
            "--reason",
            "duplicate qty at the branch",
        ])
        .output()?;
    anyhow::ensure!(
        out.status.success(),
        "skip: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    wait_until("apply to take the skip", WAIT, || async {
        Ok(status(admin).await?["skipped_transactions"] == 1)
    })
    .await
    .with_context(|| setup.logs())?;
    src.batch_execute("INSERT INTO item VALUES (11, 11)")
        .await?;
    wait_applied(&setup, admin, "the row after the skipped index", || async {
        let n: i64 = dst
            .query_one("SELECT count(*) FROM item WHERE id = 11", &[])
            .await?
            .get(0);
        Ok(n == 1)
    })
    .await?;
    let left = index_valid(&dst, "item_qty_u").await?;
    anyhow::ensure!(
        left.is_none(),
        "the failed build left an index: valid {left:?}"
    );
    let skipped: i64 = dst
        .query_one("SELECT count(*) FROM pgcourier.skipped", &[])
        .await?
        .get(0);
    anyhow::ensure!(skipped == 1, "{skipped} transactions recorded as skipped");
    Ok(())
}

/// `ddl = "tables"`: table changes are applied, views and functions left
/// out (logged); one query string doing both pauses apply naming it, until
/// the operator applies the table part by hand and skips it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_ddl_tables_only_table_changes_reach_the_branch() -> anyhow::Result<()> {
    let admin = free_tcp_port();
    let receiver_extra = format!("admin = \"127.0.0.1:{admin}\"\nddl = \"tables\"");
    let setup = Setup::start(
        "ddl-tables",
        Options {
            schema: "CREATE TABLE item (id integer PRIMARY KEY, qty integer);",
            receiver_extra: &receiver_extra,
            sender_extra: "ddl-capture = true",
            ..Options::default()
        },
    )
    .await?;
    let (src, dst) = (setup.source().await?, setup.target(0).await?);
    src.batch_execute("CREATE VIEW item_view AS SELECT id FROM item")
        .await?;
    src.batch_execute(
        "CREATE FUNCTION item_count() RETURNS bigint LANGUAGE sql AS 'SELECT count(*) FROM item'",
    )
    .await?;
    src.batch_execute("ALTER TABLE item ADD COLUMN note text")
        .await?;
    src.batch_execute("COMMENT ON COLUMN item.note IS 'free text'")
        .await?;
    src.batch_execute("INSERT INTO item VALUES (1, 1, 'x')")
        .await?;
    wait_applied(&setup, admin, "the row with the new column", || async {
        let n: i64 = dst
            .query_one("SELECT count(*) FROM item WHERE id = 1", &[])
            .await?
            .get(0);
        Ok(n == 1)
    })
    .await?;
    setup.wait_equal(0, &["public.item"], WAIT).await?;
    let (view, function, comment): (bool, bool, Option<String>) = {
        let r = dst
            .query_one(
                "SELECT to_regclass('item_view') IS NOT NULL, to_regproc('item_count') IS NOT NULL, \
                        col_description('item'::regclass, 3)",
                &[],
            )
            .await?;
        (r.get(0), r.get(1), r.get(2))
    };
    anyhow::ensure!(
        !view && !function && comment.as_deref() == Some("free text"),
        "at the branch: view {view}, function {function}, comment {comment:?}"
    );
    let log = setup.branches[0].receiver.log();
    anyhow::ensure!(
        log.contains("CREATE VIEW item_view") && log.contains("CREATE FUNCTION item_count"),
        "the left-out statements are logged:\n{}",
        setup.logs()
    );

    // One statement doing both.
    let mixed = "CREATE SCHEMA extra CREATE TABLE extra_t (a int) CREATE VIEW extra_v AS SELECT a FROM extra_t";
    src.batch_execute(mixed).await?;
    wait_until("apply to pause with class ddl", WAIT, || async {
        let st = status(admin).await?;
        Ok(st["apply_state"] == "paused" && st["error_class"] == "ddl")
    })
    .await
    .with_context(|| setup.logs())?;
    let st = status(admin).await?;
    let error = st["last_error"].as_str().unwrap_or("");
    anyhow::ensure!(
        error.contains(mixed) && error.contains("CREATE VIEW") && error.contains("skip"),
        "the error names the statement, the part left out and what to do: {st}"
    );
    let blocking = st["blocking_seq"].as_u64().context("blocking seq")?;
    dst.batch_execute("CREATE SCHEMA extra CREATE TABLE extra_t (a int)")
        .await?;
    let out = Command::new(bin_path("pgcourier-queue"))
        .args([
            "--config",
            setup.branches[0].config.to_str().expect("utf-8"),
            "skip",
            &blocking.to_string(),
            "--reason",
            "table part applied by hand",
        ])
        .output()?;
    anyhow::ensure!(
        out.status.success(),
        "skip: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    src.batch_execute("INSERT INTO extra.extra_t VALUES (7); INSERT INTO item VALUES (2, 2, 'y')")
        .await?;
    setup
        .wait_equal(0, &["public.item", "extra.extra_t"], WAIT)
        .await?;
    Ok(())
}
