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

/// The one policy built so far.
pub const LAST_WRITER_WINS: &str = "last-writer-wins";

/// The SQL that installs (or replaces) the clock and conflict tables and
/// functions, and records this site's name and priority. Needs the DDL
/// capture's schema and key (`ddl::install_sql`, run before) and a
/// superuser.
pub fn install_sql(site: &str, priority: i32) -> String {
    let site = site.replace('\'', "''");
    format!(
        r#"CREATE SCHEMA IF NOT EXISTS pgcourier;
CREATE TABLE IF NOT EXISTS pgcourier.site (
    one boolean PRIMARY KEY DEFAULT true CHECK (one),
    name text NOT NULL,
    priority integer NOT NULL
);
INSERT INTO pgcourier.site (name, priority) VALUES ('{site}', {priority})
    ON CONFLICT (one) DO UPDATE SET name = EXCLUDED.name, priority = EXCLUDED.priority;
CREATE TABLE IF NOT EXISTS pgcourier.two_way (
    tbl regclass PRIMARY KEY,
    policy text NOT NULL CHECK (policy IN ('{LAST_WRITER_WINS}'))
);
CREATE TABLE IF NOT EXISTS pgcourier.clock (
    tbl text NOT NULL,
    key jsonb NOT NULL,
    hlc bigint NOT NULL,
    site text NOT NULL,
    priority integer NOT NULL,
    deleted boolean NOT NULL,
    PRIMARY KEY (tbl, key)
);
CREATE TABLE IF NOT EXISTS pgcourier.conflicts (
    id bigserial PRIMARY KEY,
    at timestamptz NOT NULL DEFAULT now(),
    tbl text NOT NULL,
    key jsonb NOT NULL,
    kind text NOT NULL,
    policy text NOT NULL,
    winner text NOT NULL CHECK (winner IN ('local', 'remote')),
    local_row jsonb,
    local_hlc bigint,
    local_site text,
    remote_row jsonb,
    remote_hlc bigint,
    remote_site text
);
REVOKE ALL ON pgcourier.site, pgcourier.two_way, pgcourier.clock, pgcourier.conflicts FROM PUBLIC;

-- A row's primary key as a JSON object, from the row as JSON.
CREATE OR REPLACE FUNCTION pgcourier.row_key(rel regclass, r jsonb) RETURNS jsonb
LANGUAGE sql STABLE SET search_path = pg_catalog, pg_temp AS $pgcourier$
    SELECT jsonb_object_agg(a.attname, r -> a.attname::text)
      FROM pg_index i
      JOIN pg_attribute a ON a.attrelid = i.indrelid AND a.attnum = ANY (i.indkey)
     WHERE i.indrelid = rel AND i.indisprimary
$pgcourier$;

-- `WHERE` condition matching the row whose key is the JSON object $1
-- (columns named from the catalog, quoted).
CREATE OR REPLACE FUNCTION pgcourier.key_cond(rel regclass) RETURNS text
LANGUAGE sql STABLE SET search_path = pg_catalog, pg_temp AS $pgcourier$
    SELECT format('(%s) = (SELECT %s FROM jsonb_populate_record(NULL::%s, $1) r)',
                  string_agg(format('t.%I', a.attname), ', ' ORDER BY a.attnum),
                  string_agg(format('r.%I', a.attname), ', ' ORDER BY a.attnum),
                  rel)
      FROM pg_index i
      JOIN pg_attribute a ON a.attrelid = i.indrelid AND a.attnum = ANY (i.indkey)
     WHERE i.indrelid = rel AND i.indisprimary
$pgcourier$;

CREATE OR REPLACE FUNCTION pgcourier.clock_emit(body jsonb) RETURNS void
LANGUAGE plpgsql SET search_path = pg_catalog, pg_temp AS $pgcourier$
DECLARE
    b bytea := convert_to(body::text, 'UTF8');
BEGIN
    PERFORM pg_logical_emit_message(true, '{CLOCK_PREFIX}', pgcourier.mac(b) || b);
END
$pgcourier$;
REVOKE ALL ON FUNCTION pgcourier.clock_emit(jsonb) FROM PUBLIC;

-- A local write to a two-way table: the row's new clock.
CREATE OR REPLACE FUNCTION pgcourier.stamp() RETURNS trigger
LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, pg_temp AS $pgcourier$
DECLARE
    v_tbl text := format('%I.%I', TG_TABLE_SCHEMA, TG_TABLE_NAME);
    r jsonb := to_jsonb(CASE WHEN TG_OP = 'DELETE' THEN OLD ELSE NEW END);
    k jsonb;
    loc pgcourier.clock;
    me pgcourier.site;
    h bigint;
BEGIN
    k := pgcourier.row_key(TG_RELID, r);
    IF TG_OP = 'UPDATE' AND k IS DISTINCT FROM pgcourier.row_key(TG_RELID, to_jsonb(OLD)) THEN
        RAISE EXCEPTION 'pgcourier: the primary key of two-way table % cannot change', v_tbl
            USING HINT = 'delete the row and insert it with its new key';
    END IF;
    SELECT * INTO me FROM pgcourier.site;
    SELECT * INTO loc FROM pgcourier.clock c WHERE c.tbl = v_tbl AND c.key = k FOR UPDATE;
    h := greatest((extract(epoch FROM clock_timestamp()) * 1000)::bigint << 16,
                  coalesce(loc.hlc, 0) + 1);
    INSERT INTO pgcourier.clock AS c VALUES (v_tbl, k, h, me.name, me.priority, TG_OP = 'DELETE')
        ON CONFLICT (tbl, key) DO UPDATE
        SET hlc = EXCLUDED.hlc, site = EXCLUDED.site, priority = EXCLUDED.priority,
            deleted = EXCLUDED.deleted;
    PERFORM pgcourier.clock_emit(jsonb_build_object(
        'tbl', v_tbl, 'key', k, 'hlc', h, 'site', me.name, 'priority', me.priority,
        'base_hlc', loc.hlc, 'base_site', loc.site));
    RETURN CASE WHEN TG_OP = 'DELETE' THEN OLD ELSE NEW END;
END
$pgcourier$;

-- Apply one change to a two-way table (see conflict.rs). `new_row`: the new
-- row's columns as text (an unchanged TOAST value left out); `old_key`:
-- a delete's key columns as text. Returns the rows changed.
CREATE OR REPLACE FUNCTION pgcourier.apply_change(
    rel regclass, clock text, op text, new_row jsonb, old_key jsonb) RETURNS integer
LANGUAGE plpgsql SET search_path = pg_catalog, pg_temp AS $pgcourier$
DECLARE
    v_tbl text;
    c jsonb := nullif(clock, '')::jsonb;
    typed jsonb;
    k jsonb;
    cond text := pgcourier.key_cond(rel);
    loc pgcourier.clock;
    cur jsonb;
    conflict boolean := false;
    remote_wins boolean := true;
    cols text;
    vals text;
    sets text;
    n integer;
BEGIN
    SELECT format('%I.%I', s.nspname, t.relname) INTO v_tbl
      FROM pg_class t JOIN pg_namespace s ON s.oid = t.relnamespace WHERE t.oid = rel;
    EXECUTE format('SELECT to_jsonb(jsonb_populate_record(NULL::%s, $1))', rel)
        INTO typed USING CASE WHEN op = 'D' THEN old_key ELSE new_row END;
    k := pgcourier.row_key(rel, typed);
    IF c IS NOT NULL AND c -> 'key' IS DISTINCT FROM k THEN
        c := NULL;
    END IF;
    EXECUTE format('SELECT to_jsonb(t) FROM %s t WHERE %s', rel, cond) INTO cur USING k;
    IF c IS NOT NULL THEN
        SELECT * INTO loc FROM pgcourier.clock WHERE tbl = v_tbl AND key = k FOR UPDATE;
        conflict := loc.hlc IS NOT NULL
            AND (loc.hlc, loc.site) IS DISTINCT FROM ((c ->> 'base_hlc')::bigint, c ->> 'base_site');
        remote_wins := NOT conflict
            OR ((c ->> 'hlc')::bigint, (c ->> 'priority')::integer, c ->> 'site')
               > (loc.hlc, loc.priority, loc.site);
    END IF;
    IF conflict THEN
        INSERT INTO pgcourier.conflicts (tbl, key, kind, policy, winner,
                                         local_row, local_hlc, local_site,
                                         remote_row, remote_hlc, remote_site)
        VALUES (v_tbl, k,
                CASE WHEN op = 'I' AND cur IS NOT NULL THEN 'insert/insert'
                     WHEN op = 'I' THEN 'insert/delete'
                     WHEN op = 'D' AND cur IS NULL THEN 'delete/delete'
                     WHEN op = 'D' THEN 'delete/update'
                     WHEN cur IS NULL THEN 'update/delete'
                     ELSE 'update/update' END,
                '{LAST_WRITER_WINS}',
                CASE WHEN remote_wins THEN 'remote' ELSE 'local' END,
                cur, loc.hlc, loc.site,
                CASE WHEN op = 'D' THEN NULL ELSE typed END,
                (c ->> 'hlc')::bigint, c ->> 'site');
    END IF;
    IF NOT remote_wins THEN
        RETURN 1;
    END IF;
    IF c IS NOT NULL THEN
        INSERT INTO pgcourier.clock VALUES (v_tbl, k, (c ->> 'hlc')::bigint, c ->> 'site',
                                            (c ->> 'priority')::integer, op = 'D')
            ON CONFLICT (tbl, key) DO UPDATE
            SET hlc = EXCLUDED.hlc, site = EXCLUDED.site, priority = EXCLUDED.priority,
                deleted = EXCLUDED.deleted;
        -- Forwarded with the change (headquarters to the other branches).
        PERFORM pgcourier.clock_emit(c);
    END IF;
    IF op = 'D' THEN
        EXECUTE format('DELETE FROM %s t WHERE %s', rel, cond) USING k;
        GET DIAGNOSTICS n = ROW_COUNT;
        RETURN CASE WHEN conflict THEN 1 ELSE n END;
    END IF;
    SELECT string_agg(format('%I', a.attname), ', ' ORDER BY a.attnum),
           string_agg(format('r.%I', a.attname), ', ' ORDER BY a.attnum),
           string_agg(format('%I = r.%I', a.attname, a.attname), ', ' ORDER BY a.attnum)
             FILTER (WHERE NOT a.attnum = ANY (i.indkey))
      INTO cols, vals, sets
      FROM pg_attribute a
      JOIN pg_index i ON i.indrelid = a.attrelid AND i.indisprimary
     WHERE a.attrelid = rel AND a.attnum > 0 AND NOT a.attisdropped
       AND a.attgenerated = '' AND new_row ? a.attname::text;
    IF cur IS NULL THEN
        EXECUTE format('INSERT INTO %s (%s) OVERRIDING SYSTEM VALUE SELECT %s FROM jsonb_populate_record(NULL::%s, $2) r',
                       rel, cols, vals, rel) USING k, new_row;
    ELSIF sets IS NOT NULL THEN
        EXECUTE format('UPDATE %s t SET %s FROM jsonb_populate_record(NULL::%s, $2) r WHERE %s',
                       rel, sets, rel, cond) USING k, new_row;
    END IF;
    RETURN 1;
END
$pgcourier$;
REVOKE ALL ON FUNCTION pgcourier.apply_change(regclass, text, text, jsonb, jsonb) FROM PUBLIC;
"#
    )
}

/// The SQL that makes `table` (quoted, qualified) two-way under `policy`:
/// registered, stamped by local writes. Idempotent.
pub fn two_way_sql(table: &str, policy: &str) -> String {
    let literal = table.replace('\'', "''");
    let policy = policy.replace('\'', "''");
    let trigger = quote_ident("pgcourier_stamp");
    let ddl_trigger = quote_ident(DDL_TRIGGER);
    format!(
        r#"INSERT INTO pgcourier.two_way VALUES ('{literal}'::regclass, '{policy}')
    ON CONFLICT (tbl) DO UPDATE SET policy = EXCLUDED.policy;
DO $pgcourier$
DECLARE
    capture "char";
BEGIN
    IF NOT EXISTS (SELECT 1 FROM pg_catalog.pg_index
                    WHERE indrelid = '{literal}'::regclass AND indisprimary) THEN
        RAISE EXCEPTION 'pgcourier: two-way table % has no primary key', '{literal}'
            USING HINT = 'add a primary key, or leave the table one-way (direction = "down")';
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
