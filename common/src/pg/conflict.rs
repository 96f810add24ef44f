//! Tables written at more than one site (`direction = "both"`): the row
//! clocks that order their versions, and the apply function that detects
//! and resolves conflicts. Everything here is SQL run in the site's own
//! database, installed by the site's sender ([`install_sql`], then
//! [`two_way_sql`] per table); the receiver at the same site calls
//! `pgcourier.apply_change` for every change to such a table.
//!
//! **Clocks.** `pgcourier.clock` holds, per row of a two-way table (by
//! table name and primary key as JSON), the hybrid logical clock of its
//! latest version: `hlc` (milliseconds since 1970 shifted left 16 bits,
//! plus a counter), the site that wrote it and that site's priority, and
//! whether that version is a deletion (a tombstone). A local write sets it
//! from the `BEFORE` row trigger `pgcourier_stamp` (an ordinary trigger:
//! it does not fire under apply's `session_replication_role = replica`)
//! to `greatest(now, the row's clock + 1)`, so a change made after seeing
//! a version is later than it whatever the sites' clocks say; never the
//! commit timestamp, which freezing loses. The trigger writes the new
//! clock into the WAL, in the writing transaction just before the row
//! change, as a transactional logical message [`CLOCK_PREFIX`] signed
//! like DDL messages (`ddl.rs`: any role may emit messages; capture keeps
//! only those that verify). The message carries the clock the row had
//! before: the version the writer saw (`base_hlc`, `base_site`).
//!
//! **Apply.** `pgcourier.apply_change(table, clock, op, row, old key)`
//! applies one change with the clock message that preceded it. No clock
//! for this row (a site that does not stamp it): applied as it comes, an
//! insert or update as an upsert. Otherwise it is a *conflict* when the
//! row's clock here is not the writer's base (someone changed the row
//! that the writer had not seen): insert/insert, update/update,
//! update/delete (the row is gone here), delete/update, delete/delete.
//! Policy `last-writer-wins`: the version with the higher `(hlc,
//! priority, site)` wins. The remote version winning: the change is made
//! (an insert of a key present here or an update of a row deleted here
//! become an upsert of the remote row), the clock takes the remote's, and
//! the clock message is emitted again (headquarters forwarding the change
//! forwards its clock). The local version winning: nothing changes. Every
//! conflict, whoever won, is a row of `pgcourier.conflicts` with both
//! versions, in the apply transaction.
//!
//! Policy `merge-columns`: each row also keeps a clock per column
//! (`pgcourier.clock.cols`, `{column: [hlc, priority, site]}`; `delta`
//! columns have none), set by the trigger for the columns a write changed,
//! and the clock message names them (`cols`). Within one incarnation of
//! the row, each column the writer set takes the later of its clock and
//! the column's clock here, so changes to different columns both survive
//! and the same column goes to the later writer; a deletion removes the
//! incarnation it saw whatever its clock (an update arriving after it is
//! dropped, and one already applied does not save the row); an insert
//! starts a new incarnation and the later incarnation (its insert's clock)
//! replaces the row whole; an update or deletion of an unknown incarnation
//! (a row the initial copy brought without its clock) is taken as of the
//! row's, which it then learns. A change whose clock is its incarnation's is
//! an insert whatever op it arrives as (headquarters applies an insert
//! over its own row as an update, and forwards that). Every such meeting
//! the writer had not seen is recorded like any conflict (winner
//! `remote` when a column of the arriving version was taken).
//!
//! **Convergence.** Each row ends, at every site that has received every
//! version, as the version with the highest `(hlc, priority, site)`: a
//! total order, the same at every site, whatever the order of arrival.
//! A site's own version loses only to a higher one; a version that loses
//! at headquarters is never forwarded, but the version that beat it was
//! (it was either headquarters' own, shipped to every branch, or a
//! branch's, forwarded).

use super::ddl::DDL_TRIGGER;
use super::quote_ident;

/// The prefix of the logical messages that carry row clocks.
pub use pgcourier_proto::cutter::CLOCK_PREFIX;

/// The policies built: the higher `(hlc, priority, site)` wins; the
/// higher `(priority, hlc, site)` wins; parked for an operator; column by
/// column, the later clock wins.
pub const LAST_WRITER_WINS: &str = "last-writer-wins";
pub const SITE_PRIORITY: &str = "site-priority";
pub const MANUAL: &str = "manual";
pub const MERGE_COLUMNS: &str = "merge-columns";
pub const POLICIES: [&str; 4] = [LAST_WRITER_WINS, SITE_PRIORITY, MANUAL, MERGE_COLUMNS];

/// The SQL that installs (or replaces) the clock and conflict tables and
/// functions (`conflict.sql`), and records this site's name and priority.
/// Needs the DDL capture's schema and key (`ddl::install_sql`, run
/// before) and a superuser.
pub fn install_sql(site: &str, priority: i32) -> String {
    let literal = |s: &str| format!("'{}'", s.replace('\'', "''"));
    let policies: Vec<String> = POLICIES.iter().map(|p| literal(p)).collect();
    include_str!("conflict.sql")
        .replace("@SITE@", &literal(site))
        .replace("@PRIORITY@", &priority.to_string())
        .replace("@CLOCK_PREFIX@", &literal(CLOCK_PREFIX))
        .replace("@POLICIES@", &policies.join(", "))
}

/// The types a `delta` column may have, as an SQL list of type OIDs (the
/// install refuses others; `pgcourier-sender check` names them).
pub const DELTA_TYPES: &str = "('int2'::regtype, 'int4'::regtype, 'int8'::regtype, \
     'numeric'::regtype, 'float4'::regtype, 'float8'::regtype)";

/// The SQL that makes `table` (quoted, qualified) two-way under `policy`,
/// its `delta` columns adding up: registered, stamped by local writes.
/// Idempotent.
pub fn two_way_sql(table: &str, policy: &str, delta: &[String]) -> String {
    let literal = table.replace('\'', "''");
    let policy = policy.replace('\'', "''");
    let delta: Vec<String> = delta
        .iter()
        .map(|c| format!("'{}'", c.replace('\'', "''")))
        .collect();
    let delta = format!("ARRAY[{}]::text[]", delta.join(", "));
    let trigger = quote_ident("pgcourier_stamp");
    let ddl_trigger = quote_ident(DDL_TRIGGER);
    format!(
        r#"INSERT INTO pgcourier.two_way VALUES ('{literal}'::regclass, '{policy}', {delta})
    ON CONFLICT (tbl) DO UPDATE SET policy = EXCLUDED.policy, delta = EXCLUDED.delta;
DO $pgcourier$
DECLARE
    capture "char";
    bad text;
BEGIN
    IF NOT EXISTS (SELECT 1 FROM pg_catalog.pg_index
                    WHERE indrelid = '{literal}'::regclass AND indisprimary) THEN
        RAISE EXCEPTION 'pgcourier: two-way table % has no primary key', '{literal}'
            USING HINT = 'add a primary key, or leave the table one-way (direction = "down")';
    END IF;
    SELECT d INTO bad FROM unnest({delta}) d
     WHERE NOT EXISTS (SELECT 1 FROM pg_catalog.pg_attribute a
                        WHERE a.attrelid = '{literal}'::regclass AND a.attname = d
                          AND NOT a.attisdropped AND a.atttypid IN {DELTA_TYPES})
     LIMIT 1;
    IF bad IS NOT NULL THEN
        RAISE EXCEPTION 'pgcourier: delta column % of two-way table % is not a numeric column of it', bad, '{literal}'
            USING HINT = 'list in delta only numeric columns (integer, bigint, numeric, ...) of the table';
    END IF;
    IF NOT EXISTS (SELECT 1 FROM pg_catalog.pg_trigger
                    WHERE tgrelid = '{literal}'::regclass AND tgname = 'pgcourier_stamp') THEN
        -- Each site stamps its own writes: the trigger is not a schema
        -- change for the DDL capture to ship (the event trigger is off
        -- for this statement only, inside this transaction).
        SELECT evtenabled INTO capture FROM pg_catalog.pg_event_trigger
         WHERE evtname = '{DDL_TRIGGER}';
        IF capture IS NOT NULL THEN
            ALTER EVENT TRIGGER {ddl_trigger} DISABLE;
        END IF;
        CREATE TRIGGER {trigger} BEFORE INSERT OR UPDATE OR DELETE ON {table}
            FOR EACH ROW EXECUTE FUNCTION pgcourier.stamp();
        IF capture = 'O' THEN
            ALTER EVENT TRIGGER {ddl_trigger} ENABLE;
        ELSIF capture = 'R' THEN
            ALTER EVENT TRIGGER {ddl_trigger} ENABLE REPLICA;
        ELSIF capture = 'A' THEN
            ALTER EVENT TRIGGER {ddl_trigger} ENABLE ALWAYS;
        END IF;
    END IF;
END
$pgcourier$;
"#
    )
}
