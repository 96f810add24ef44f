-- Row clocks and conflict resolution for tables written at several sites
-- (conflict.rs says how it works). Installed, or replaced, by the site's
-- sender; @SITE@, @PRIORITY@, @CLOCK_PREFIX@ and @POLICIES@ are filled in.
CREATE SCHEMA IF NOT EXISTS pgcourier;
CREATE TABLE IF NOT EXISTS pgcourier.site (
    one boolean PRIMARY KEY DEFAULT true CHECK (one),
    name text NOT NULL,
    priority integer NOT NULL
);
INSERT INTO pgcourier.site (name, priority) VALUES (@SITE@, @PRIORITY@)
    ON CONFLICT (one) DO UPDATE SET name = EXCLUDED.name, priority = EXCLUDED.priority;
CREATE TABLE IF NOT EXISTS pgcourier.two_way (
    tbl regclass PRIMARY KEY,
    policy text NOT NULL CHECK (policy IN (@POLICIES@)),
    -- Numeric columns whose concurrent changes add up (stock, balance).
    delta text[] NOT NULL DEFAULT '{}'
);
ALTER TABLE pgcourier.two_way DROP CONSTRAINT IF EXISTS two_way_policy_check;
ALTER TABLE pgcourier.two_way ADD CONSTRAINT two_way_policy_check CHECK (policy IN (@POLICIES@));
CREATE TABLE IF NOT EXISTS pgcourier.clock (
    tbl text NOT NULL,
    key jsonb NOT NULL,
    hlc bigint NOT NULL,
    site text NOT NULL,
    priority integer NOT NULL,
    deleted boolean NOT NULL,
    -- The clock of the insert that made this incarnation of the row (null:
    -- not known, a row copied before it was stamped). Delta columns add up
    -- within one incarnation only.
    incarnation bigint,
    PRIMARY KEY (tbl, key)
);
ALTER TABLE pgcourier.clock ADD COLUMN IF NOT EXISTS incarnation bigint;
-- merge-columns tables: each column's clock, {"column": [hlc, priority,
-- site]}, of the write that last set it in this incarnation (a column
-- not in it: never written since the row was copied; key columns have
-- none, they never change, nor delta columns, whose changes add up).
ALTER TABLE pgcourier.clock ADD COLUMN IF NOT EXISTS cols jsonb;
CREATE TABLE IF NOT EXISTS pgcourier.conflicts (
    id bigserial PRIMARY KEY,
    at timestamptz NOT NULL DEFAULT now(),
    tbl text NOT NULL,
    key jsonb NOT NULL,
    kind text NOT NULL,
    policy text NOT NULL,
    -- The version kept: 'local' (this site's) or 'remote' (the one that
    -- arrived); a parked conflict keeps 'local' until resolved.
    winner text NOT NULL CHECK (winner IN ('local', 'remote')),
    -- 'resolved' by the policy; 'open' (manual: parked), then 'resolved'
    -- by an operator here, or 'resolved-elsewhere' by a resolution from
    -- another site.
    state text NOT NULL DEFAULT 'resolved'
        CHECK (state IN ('resolved', 'open', 'resolved-elsewhere')),
    local_row jsonb,
    local_hlc bigint,
    local_site text,
    remote_row jsonb,
    remote_hlc bigint,
    remote_site text,
    resolved_at timestamptz,
    resolved_by text
);
CREATE INDEX IF NOT EXISTS conflicts_open ON pgcourier.conflicts (tbl, key) WHERE state = 'open';
REVOKE ALL ON pgcourier.site, pgcourier.two_way, pgcourier.clock, pgcourier.conflicts FROM PUBLIC;

-- A row's primary key as a JSON object, from the row as JSON.
CREATE OR REPLACE FUNCTION pgcourier.row_key(rel regclass, r jsonb) RETURNS jsonb
LANGUAGE sql STABLE SET search_path = pg_catalog, pg_temp AS $pgcourier$
    SELECT jsonb_object_agg(a.attname, r -> a.attname::text)
      FROM pg_index i
      JOIN pg_attribute a ON a.attrelid = i.indrelid AND a.attnum = ANY (i.indkey)
     WHERE i.indrelid = rel AND i.indisprimary
$pgcourier$;

-- `WHERE` condition matching the row of table alias t whose key is the
-- JSON object $1 (columns named from the catalog, quoted).
CREATE OR REPLACE FUNCTION pgcourier.key_cond(rel regclass) RETURNS text
LANGUAGE sql STABLE SET search_path = pg_catalog, pg_temp AS $pgcourier$
    SELECT format('(%s) = (SELECT %s FROM jsonb_populate_record(NULL::%s, $1) k)',
                  string_agg(format('t.%I', a.attname), ', ' ORDER BY a.attnum),
                  string_agg(format('k.%I', a.attname), ', ' ORDER BY a.attnum),
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
    PERFORM pg_logical_emit_message(true, @CLOCK_PREFIX@, pgcourier.mac(b) || b);
END
$pgcourier$;
REVOKE ALL ON FUNCTION pgcourier.clock_emit(jsonb) FROM PUBLIC;

-- Column clocks: `cols` with each named column's clock set to (h, p, s).
CREATE OR REPLACE FUNCTION pgcourier.set_col_clocks(cols jsonb, names text[], h bigint, p integer, s text)
RETURNS jsonb LANGUAGE sql IMMUTABLE SET search_path = pg_catalog, pg_temp AS $pgcourier$
    SELECT coalesce(cols, '{}') || coalesce(jsonb_object_agg(n, jsonb_build_array(h, p, s)), '{}')
      FROM unnest(names) n
$pgcourier$;

-- A local write to a two-way table: the row's new clock, and for an
-- update the old values of its delta columns (what the writer changed
-- them from).
CREATE OR REPLACE FUNCTION pgcourier.stamp() RETURNS trigger
LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, pg_temp AS $pgcourier$
DECLARE
    v_tbl text := format('%I.%I', TG_TABLE_SCHEMA, TG_TABLE_NAME);
    r jsonb := to_jsonb(CASE WHEN TG_OP = 'DELETE' THEN OLD ELSE NEW END);
    k jsonb;
    loc pgcourier.clock;
    me pgcourier.site;
    h bigint;
    body jsonb;
    deltas text[];
    old_values jsonb := '{}';
    col text;
    inc bigint;
    pol text;
    changed text[];
    cols jsonb;
BEGIN
    k := pgcourier.row_key(TG_RELID, r);
    IF TG_OP = 'UPDATE' AND k IS DISTINCT FROM pgcourier.row_key(TG_RELID, to_jsonb(OLD)) THEN
        RAISE EXCEPTION 'pgcourier: the primary key of two-way table % cannot change', v_tbl
            USING HINT = 'delete the row and insert it with its new key';
    END IF;
    SELECT * INTO loc FROM pgcourier.clock c WHERE c.tbl = v_tbl AND c.key = k FOR UPDATE;
    SELECT w.policy, w.delta INTO pol, deltas FROM pgcourier.two_way w WHERE w.tbl = TG_RELID;
    IF TG_OP = 'UPDATE' THEN
        FOREACH col IN ARRAY coalesce(deltas, '{}') LOOP
            old_values := old_values || jsonb_build_object(col, to_jsonb(OLD) -> col);
        END LOOP;
        IF old_values <> '{}' AND (to_jsonb(NEW) - deltas) = (to_jsonb(OLD) - deltas)
           AND to_jsonb(NEW) <> to_jsonb(OLD)
           AND current_setting('pgcourier.resolving', true) IS DISTINCT FROM 'on' THEN
            -- Only delta columns changed (a stock count): an increment,
            -- which never conflicts; the row's version stays.
            PERFORM pgcourier.clock_emit(jsonb_build_object(
                'tbl', v_tbl, 'key', k, 'delta_only', true, 'old', old_values,
                'inc', loc.incarnation));
            RETURN NEW;
        END IF;
    END IF;
    SELECT * INTO me FROM pgcourier.site;
    h := greatest((extract(epoch FROM clock_timestamp()) * 1000)::bigint << 16,
                  coalesce(loc.hlc, 0) + 1);
    inc := CASE WHEN TG_OP = 'INSERT' THEN h ELSE loc.incarnation END;
    IF pol = 'merge-columns' THEN
        -- The columns this write set, each now with this clock.
        IF TG_OP <> 'DELETE' THEN
            SELECT array_agg(a.attname::text ORDER BY a.attnum) INTO changed
              FROM pg_attribute a
             WHERE a.attrelid = TG_RELID AND a.attnum > 0 AND NOT a.attisdropped
               AND a.attgenerated = '' AND NOT a.attname = ANY (coalesce(deltas, '{}'))
               AND NOT k ? a.attname::text
               AND (TG_OP = 'INSERT'
                    OR to_jsonb(NEW) -> a.attname::text IS DISTINCT FROM to_jsonb(OLD) -> a.attname::text);
        END IF;
        cols := CASE WHEN TG_OP = 'INSERT' THEN pgcourier.set_col_clocks(NULL, changed, h, me.priority, me.name)
                     WHEN TG_OP = 'UPDATE' THEN pgcourier.set_col_clocks(loc.cols, changed, h, me.priority, me.name) END;
    END IF;
    INSERT INTO pgcourier.clock AS c (tbl, key, hlc, site, priority, deleted, incarnation, cols)
        VALUES (v_tbl, k, h, me.name, me.priority, TG_OP = 'DELETE', inc, cols)
        ON CONFLICT (tbl, key) DO UPDATE
        SET hlc = EXCLUDED.hlc, site = EXCLUDED.site, priority = EXCLUDED.priority,
            deleted = EXCLUDED.deleted, incarnation = EXCLUDED.incarnation, cols = EXCLUDED.cols;
    body := jsonb_build_object(
        'tbl', v_tbl, 'key', k, 'hlc', h, 'site', me.name, 'priority', me.priority,
        'base_hlc', loc.hlc, 'base_site', loc.site, 'inc', inc, 'deleted', TG_OP = 'DELETE');
    IF changed IS NOT NULL THEN
        body := body || jsonb_build_object('cols', to_jsonb(changed));
    END IF;
    IF old_values <> '{}' THEN
        body := body || jsonb_build_object('old', old_values);
    END IF;
    IF current_setting('pgcourier.resolving', true) = 'on' THEN
        -- An operator's resolution of a parked conflict: it settles the
        -- conflict at every site.
        body := body || jsonb_build_object('resolution', true);
    END IF;
    PERFORM pgcourier.clock_emit(body);
    RETURN CASE WHEN TG_OP = 'DELETE' THEN OLD ELSE NEW END;
END
$pgcourier$;

-- The row `nr` (JSON, text values) with each delta column set to this
-- site's value plus the writer's increment: cur + (new - old).
CREATE OR REPLACE FUNCTION pgcourier.add_deltas(deltas text[], nr jsonb, old_values jsonb, cur jsonb)
RETURNS jsonb LANGUAGE plpgsql IMMUTABLE SET search_path = pg_catalog, pg_temp AS $pgcourier$
DECLARE
    col text;
BEGIN
    FOREACH col IN ARRAY coalesce(deltas, '{}') LOOP
        IF nr ->> col IS NOT NULL AND old_values ->> col IS NOT NULL AND cur ->> col IS NOT NULL THEN
            nr := jsonb_set(nr, ARRAY[col], to_jsonb(((cur ->> col)::numeric
                + (nr ->> col)::numeric - (old_values ->> col)::numeric)::text));
        END IF;
    END LOOP;
    RETURN nr;
END
$pgcourier$;

-- Whether the version of clock `c` comes after the one whose clock here
-- is `loc`: by (priority, clock, site) under site-priority, else by
-- (clock, priority, site).
CREATE OR REPLACE FUNCTION pgcourier.later(pol text, c jsonb, loc pgcourier.clock) RETURNS boolean
LANGUAGE sql IMMUTABLE SET search_path = pg_catalog, pg_temp AS $pgcourier$
    SELECT CASE WHEN pol = 'site-priority'
                THEN ((c ->> 'priority')::integer, (c ->> 'hlc')::bigint, c ->> 'site')
                     > ((loc).priority, (loc).hlc, (loc).site)
                ELSE ((c ->> 'hlc')::bigint, (c ->> 'priority')::integer, c ->> 'site')
                     > ((loc).hlc, (loc).priority, (loc).site) END
$pgcourier$;

-- Set the delta columns of the row keyed `k` to their values in `nr`.
CREATE OR REPLACE FUNCTION pgcourier.set_deltas(rel regclass, deltas text[], k jsonb, nr jsonb)
RETURNS void LANGUAGE plpgsql SET search_path = pg_catalog, pg_temp AS $pgcourier$
DECLARE
    sets text;
BEGIN
    SELECT string_agg(format('%I = r.%I', d, d), ', ') INTO sets FROM unnest(deltas) d;
    EXECUTE format('UPDATE %s t SET %s FROM jsonb_populate_record(NULL::%s, $2) r WHERE %s',
                   rel, sets, rel, pgcourier.key_cond(rel)) USING k, nr;
END
$pgcourier$;

-- This site's values of the delta columns, for the message that forwards
-- a change: the next site adds (new - these), the same increment.
CREATE OR REPLACE FUNCTION pgcourier.delta_values(deltas text[], cur jsonb) RETURNS jsonb
LANGUAGE sql IMMUTABLE SET search_path = pg_catalog, pg_temp AS $pgcourier$
    SELECT coalesce(jsonb_object_agg(d, cur -> d), '{}') FROM unnest(deltas) d
$pgcourier$;

-- Apply one change to a two-way table (see conflict.rs). `new_row`: the
-- new row's columns as text (an unchanged TOAST value left out);
-- `old_key`: a delete's key columns as text. Returns 0 (no conflict),
-- 1 (a conflict the remote version won), 2 (one this site's version won)
-- or 3 (parked for an operator: policy manual).
CREATE OR REPLACE FUNCTION pgcourier.apply_change(
    rel regclass, clock text, op text, new_row jsonb, old_key jsonb) RETURNS integer
LANGUAGE plpgsql SET search_path = pg_catalog, pg_temp AS $pgcourier$
DECLARE
    v_tbl text;
    c jsonb := nullif(clock, '')::jsonb;
    pol text;
    deltas text[];
    typed jsonb;
    k jsonb;
    cond text := pgcourier.key_cond(rel);
    loc pgcourier.clock;
    cur jsonb;
    nr jsonb := new_row;
    conflict boolean := false;
    remote_wins boolean := true;
    parked boolean := false;
    same_inc boolean := true;
    resolution boolean;
    clash text;
    ucols text;
    uvals text;
    other jsonb;
    okey jsonb;
    oloc pgcourier.clock;
    stored jsonb;
    local_row jsonb;
    same_row boolean;
    mop text;
    merged_some boolean := true;
    col text;
    lc jsonb;
    mcols jsonb;
BEGIN
    -- One applying transaction at a time changes two-way tables here:
    -- headquarters' receivers, one per branch, would otherwise deadlock
    -- on the rows every site writes (stock rows), and abort whole groups.
    PERFORM pg_advisory_xact_lock(pg_catalog.hashtextextended('pgcourier.two_way', 0));
    SELECT format('%I.%I', s.nspname, t.relname) INTO v_tbl
      FROM pg_class t JOIN pg_namespace s ON s.oid = t.relnamespace WHERE t.oid = rel;
    SELECT w.policy, w.delta INTO pol, deltas FROM pgcourier.two_way w WHERE w.tbl = rel;
    EXECUTE format('SELECT to_jsonb(jsonb_populate_record(NULL::%s, $1))', rel)
        INTO typed USING CASE WHEN op = 'D' THEN old_key ELSE new_row END;
    k := pgcourier.row_key(rel, typed);
    IF c IS NOT NULL AND c -> 'key' IS DISTINCT FROM k THEN
        -- The clock was of another row: a deletion that found nothing to
        -- delete where it was applied (apply_orphan_clock).
        PERFORM pgcourier.apply_orphan_clock(clock);
        c := NULL;
    END IF;
    -- The row, then its clock: the order a local write locks them in
    -- (the row, then the stamping trigger's clock row).
    EXECUTE format('SELECT to_jsonb(t) FROM %s t WHERE %s FOR UPDATE', rel, cond) INTO cur USING k;
    local_row := cur;
    IF c IS NOT NULL THEN
        SELECT * INTO loc FROM pgcourier.clock WHERE tbl = v_tbl AND key = k FOR UPDATE;
        -- Increments add up within one incarnation of the row: one that
        -- another insert replaced here does not (the insert's values are
        -- absolute).
        same_inc := loc.incarnation IS NULL OR c ->> 'inc' IS NULL
            OR loc.incarnation = (c ->> 'inc')::bigint;
    END IF;
    IF c IS NOT NULL AND coalesce((c ->> 'delta_only')::boolean, false) THEN
        -- An increment only (a stock count): it travels on as one.
        IF op = 'U' AND cur IS NOT NULL AND same_inc THEN
            PERFORM pgcourier.clock_emit(c || jsonb_build_object('old', pgcourier.delta_values(deltas, cur)));
            nr := pgcourier.add_deltas(deltas, nr, c -> 'old', cur);
            PERFORM pgcourier.set_deltas(rel, deltas, k, nr);
            RETURN 0;
        END IF;
        -- The row it counted against is gone here, or was replaced by
        -- another insert: recorded, not applied.
        INSERT INTO pgcourier.conflicts (tbl, key, kind, policy, winner,
                                         local_row, local_hlc, local_site, remote_row)
        VALUES (v_tbl, k, CASE WHEN cur IS NULL THEN 'increment/delete' ELSE 'increment/insert' END,
                pol, 'local', cur, loc.hlc, loc.site, typed);
        RETURN 2;
    END IF;
    IF c IS NOT NULL THEN
        conflict := loc.hlc IS NOT NULL
            AND (loc.hlc, loc.site) IS DISTINCT FROM ((c ->> 'base_hlc')::bigint, c ->> 'base_site');
        resolution := coalesce((c ->> 'resolution')::boolean, false);
        IF NOT conflict THEN
            remote_wins := true;
        ELSIF pol = 'manual' AND NOT resolution THEN
            remote_wins := false;
            parked := true;
        ELSE
            remote_wins := pgcourier.later(CASE WHEN resolution THEN NULL ELSE pol END, c, loc);
        END IF;
        IF resolution THEN
            UPDATE pgcourier.conflicts
               SET state = 'resolved-elsewhere', resolved_at = now(), resolved_by = c ->> 'site'
             WHERE tbl = v_tbl AND key = k AND state = 'open';
        END IF;
    END IF;
    -- The writer's increments of the delta columns, on top of this site's
    -- values.
    IF op = 'U' AND cur IS NOT NULL AND c ? 'old' AND same_inc THEN
        nr := pgcourier.add_deltas(deltas, nr, c -> 'old', cur);
    END IF;
    IF pol = 'merge-columns' AND c IS NOT NULL THEN
        -- Column by column within one incarnation of the row; a deletion
        -- wins over the updates of the incarnation it removed; a later
        -- insert (a new incarnation) replaces the row whole.
        -- The write that made the incarnation (its clock is the
        -- incarnation's), whatever op it arrives as: a site that applied
        -- an insert over its own row forwards it as an update.
        mop := CASE WHEN op <> 'D' AND c ->> 'inc' = c ->> 'hlc' THEN 'I' ELSE op END;
        -- An update or deletion of an unknown incarnation (a row the
        -- initial copy brought without its clock, and the writes to it
        -- there) is taken as of the same one; an insert starts its own.
        same_row := CASE WHEN mop = 'I'
                         THEN loc.incarnation IS NOT DISTINCT FROM (c ->> 'inc')::bigint
                         ELSE loc.incarnation IS NULL OR c ->> 'inc' IS NULL
                              OR loc.incarnation = (c ->> 'inc')::bigint END;
        stored := jsonb_build_object('hlc', c -> 'hlc', 'site', c -> 'site',
                                     'priority', c -> 'priority', 'deleted', op = 'D',
                                     'inc', c -> 'inc');
        IF mop = 'I' AND NOT same_row THEN
            remote_wins := loc.hlc IS NULL
                OR coalesce(loc.incarnation, 0) < (c ->> 'inc')::bigint;
            stored := stored || jsonb_build_object('cols', pgcourier.set_col_clocks(NULL,
                ARRAY(SELECT n FROM jsonb_object_keys(nr) n WHERE NOT n = ANY (deltas) AND NOT k ? n),
                (c ->> 'hlc')::bigint,
                (c ->> 'priority')::integer, c ->> 'site'));
        ELSIF op = 'D' THEN
            -- Already gone here: the tombstone keeps the later deletion's clock.
            remote_wins := same_row
                AND (cur IS NOT NULL OR loc.hlc IS NULL OR pgcourier.later(NULL, c, loc));
        ELSIF cur IS NULL OR NOT same_row THEN
            -- An update of a row deleted here, or of an incarnation
            -- another insert replaced.
            remote_wins := false;
        ELSE
            -- Each column the writer set takes the later of its two
            -- clocks.
            mcols := coalesce(loc.cols, '{}');
            merged_some := false;
            FOR col IN SELECT jsonb_array_elements_text(CASE WHEN mop = 'I'
                           THEN to_jsonb(ARRAY(SELECT jsonb_object_keys(nr)))
                           ELSE coalesce(c -> 'cols', '[]') END) LOOP
                CONTINUE WHEN NOT nr ? col OR col = ANY (deltas) OR k ? col;
                lc := mcols -> col;
                IF lc IS NULL OR ((c ->> 'hlc')::bigint, (c ->> 'priority')::integer, c ->> 'site')
                                    > ((lc ->> 0)::bigint, (lc ->> 1)::integer, lc ->> 2) THEN
                    cur := jsonb_set(cur, ARRAY[col], nr -> col);
                    mcols := pgcourier.set_col_clocks(mcols, ARRAY[col], (c ->> 'hlc')::bigint,
                                                      (c ->> 'priority')::integer, c ->> 'site');
                    merged_some := true;
                END IF;
            END LOOP;
            -- Delta columns: the writer's increments, added above; an
            -- insert's values (two inserts of one incarnation) by clock.
            IF (op = 'U' AND c ? 'old' AND same_inc)
               OR (mop = 'I' AND pgcourier.later(NULL, c, loc)) THEN
                FOREACH col IN ARRAY deltas LOOP
                    IF nr ? col THEN
                        cur := jsonb_set(cur, ARRAY[col], nr -> col);
                    END IF;
                END LOOP;
            END IF;
            nr := cur;
            remote_wins := true;
            stored := CASE WHEN loc.hlc IS NULL OR pgcourier.later(NULL, c, loc) THEN stored
                           ELSE jsonb_build_object('hlc', loc.hlc, 'site', loc.site,
                                                   'priority', loc.priority, 'deleted', false)
                      END || jsonb_build_object('inc', coalesce(loc.incarnation, (c ->> 'inc')::bigint),
                                                'cols', mcols);
        END IF;
    END IF;
    IF conflict THEN
        INSERT INTO pgcourier.conflicts (tbl, key, kind, policy, winner, state,
                                         local_row, local_hlc, local_site,
                                         remote_row, remote_hlc, remote_site)
        VALUES (v_tbl, k,
                CASE WHEN op = 'I' AND cur IS NOT NULL THEN 'insert/insert'
                     WHEN op = 'I' THEN 'insert/delete'
                     WHEN op = 'D' AND cur IS NULL THEN 'delete/delete'
                     WHEN op = 'D' THEN 'delete/update'
                     WHEN cur IS NULL THEN 'update/delete'
                     ELSE 'update/update' END,
                pol,
                CASE WHEN remote_wins AND merged_some THEN 'remote' ELSE 'local' END,
                CASE WHEN parked THEN 'open' ELSE 'resolved' END,
                local_row, loc.hlc, loc.site,
                CASE WHEN op = 'D' THEN NULL ELSE typed END,
                (c ->> 'hlc')::bigint, c ->> 'site');
    END IF;
    IF NOT remote_wins THEN
        -- This site's version stays (for now, if parked), but the remote's
        -- increments count, and travel on as increments only.
        IF op = 'U' AND cur IS NOT NULL AND c ? 'old' AND cardinality(deltas) > 0 AND same_inc THEN
            PERFORM pgcourier.clock_emit(jsonb_build_object(
                'tbl', v_tbl, 'key', k, 'delta_only', true,
                'old', pgcourier.delta_values(deltas, cur), 'inc', loc.incarnation));
            PERFORM pgcourier.set_deltas(rel, deltas, k, nr);
        END IF;
        RETURN CASE WHEN parked THEN 3 ELSE 2 END;
    END IF;
    IF c IS NOT NULL AND c ? 'old' AND op = 'U' AND cur IS NOT NULL AND same_inc THEN
        -- Forwarded with increments measured from this site's values when
        -- they were added here (else as the writer measured them).
        c := c || jsonb_build_object('old', pgcourier.delta_values(deltas, local_row));
    END IF;
    IF op = 'D' OR NOT EXISTS (SELECT 1 FROM pg_index i
                                WHERE i.indrelid = rel AND i.indisunique AND NOT i.indisprimary) THEN
        PERFORM pgcourier.write_change(rel, v_tbl, k, c, op, nr, cur, stored);
        RETURN CASE WHEN conflict THEN 1 ELSE 0 END;
    END IF;
    -- A unique index besides the primary key: the row may clash there
    -- with another row of this site (two sites inserting the same e-mail
    -- under different keys). The row written last by the policy's order
    -- stays; the other is deleted here (every site decides the same).
    FOR attempt IN 1..8 LOOP
        BEGIN
            PERFORM pgcourier.write_change(rel, v_tbl, k, c, op, nr, cur, stored);
            RETURN CASE WHEN conflict THEN 1 ELSE 0 END;
        EXCEPTION WHEN unique_violation THEN
            GET STACKED DIAGNOSTICS clash = CONSTRAINT_NAME;
            SELECT string_agg(format('t.%I', a.attname), ', ' ORDER BY a.attnum),
                   string_agg(format('r.%I', a.attname), ', ' ORDER BY a.attnum)
              INTO ucols, uvals
              FROM pg_index i
              JOIN pg_class ic ON ic.oid = i.indexrelid
              JOIN pg_attribute a ON a.attrelid = i.indrelid AND a.attnum = ANY (i.indkey)
             WHERE i.indrelid = rel AND ic.relname = clash AND NOT i.indisprimary;
            IF ucols IS NULL THEN
                RAISE;
            END IF;
            EXECUTE format('SELECT to_jsonb(t) FROM %s t WHERE (%s) = (SELECT %s FROM jsonb_populate_record(NULL::%s, $1) r)',
                           rel, ucols, uvals, rel) INTO other USING nr;
            IF other IS NULL THEN
                RAISE;
            END IF;
            okey := pgcourier.row_key(rel, other);
            SELECT * INTO oloc FROM pgcourier.clock WHERE tbl = v_tbl AND key = okey;
            IF c IS NULL THEN
                remote_wins := false;
            ELSIF pol = 'manual' THEN
                remote_wins := false;
                parked := true;
            ELSIF oloc.hlc IS NULL THEN
                remote_wins := true;
            ELSE
                remote_wins := pgcourier.later(pol, c, oloc);
            END IF;
            INSERT INTO pgcourier.conflicts (tbl, key, kind, policy, winner, state,
                                             local_row, local_hlc, local_site,
                                             remote_row, remote_hlc, remote_site)
            VALUES (v_tbl, k, 'unique ' || clash, coalesce(pol, 'none'),
                    CASE WHEN remote_wins THEN 'remote' ELSE 'local' END,
                    CASE WHEN parked THEN 'open' ELSE 'resolved' END,
                    other, oloc.hlc, oloc.site, typed, (c ->> 'hlc')::bigint, c ->> 'site');
            IF NOT remote_wins THEN
                RETURN CASE WHEN parked THEN 3 ELSE 2 END;
            END IF;
            EXECUTE format('DELETE FROM %s t WHERE %s', rel, cond) USING okey;
            UPDATE pgcourier.clock SET deleted = true WHERE tbl = v_tbl AND key = okey;
            conflict := true;
        END;
    END LOOP;
    RAISE EXCEPTION 'pgcourier: a change to % clashes with rows on more than 8 unique keys', v_tbl;
END
$pgcourier$;

-- A clock that no row change followed: a deletion headquarters applied
-- to a row already gone there (delete/delete), forwarded so that every
-- site ends with the same tombstone clock. Applied as that deletion.
CREATE OR REPLACE FUNCTION pgcourier.apply_orphan_clock(clock text) RETURNS integer
LANGUAGE plpgsql SET search_path = pg_catalog, pg_temp AS $pgcourier$
DECLARE
    c jsonb := clock::jsonb;
    rel regclass;
BEGIN
    IF NOT coalesce((c ->> 'deleted')::boolean, false) THEN
        RETURN 0;
    END IF;
    rel := to_regclass(c ->> 'tbl');
    IF rel IS NULL OR NOT EXISTS (SELECT 1 FROM pgcourier.two_way w WHERE w.tbl = rel) THEN
        RETURN 0;
    END IF;
    RETURN pgcourier.apply_change(rel, clock, 'D', NULL, c -> 'key');
END
$pgcourier$;
REVOKE ALL ON FUNCTION pgcourier.apply_orphan_clock(text) FROM PUBLIC;

-- The write apply_change decided on: the row's clock becomes the
-- change's (emitted again, so that headquarters forwards it), then the
-- row is deleted or upserted.
-- `stored`: the clock the row keeps when it is not the change's (a
-- merge-columns row: the later of the two, and its column clocks).
DROP FUNCTION IF EXISTS pgcourier.write_change(regclass, text, jsonb, jsonb, text, jsonb, jsonb);
CREATE OR REPLACE FUNCTION pgcourier.write_change(
    rel regclass, v_tbl text, k jsonb, c jsonb, op text, nr jsonb, cur jsonb, stored jsonb) RETURNS void
LANGUAGE plpgsql SET search_path = pg_catalog, pg_temp AS $pgcourier$
DECLARE
    cond text := pgcourier.key_cond(rel);
    cols text;
    vals text;
    sets text;
    st jsonb;
BEGIN
    IF c IS NOT NULL THEN
        st := coalesce(stored, c);
        INSERT INTO pgcourier.clock (tbl, key, hlc, site, priority, deleted, incarnation, cols)
            VALUES (v_tbl, k, (st ->> 'hlc')::bigint, st ->> 'site', (st ->> 'priority')::integer,
                    op = 'D', (st ->> 'inc')::bigint, st -> 'cols')
            ON CONFLICT (tbl, key) DO UPDATE
            SET hlc = EXCLUDED.hlc, site = EXCLUDED.site, priority = EXCLUDED.priority,
                deleted = EXCLUDED.deleted, incarnation = EXCLUDED.incarnation, cols = EXCLUDED.cols;
        PERFORM pgcourier.clock_emit(c);
    END IF;
    IF op = 'D' THEN
        EXECUTE format('DELETE FROM %s t WHERE %s', rel, cond) USING k;
        RETURN;
    END IF;
    SELECT string_agg(format('%I', a.attname), ', ' ORDER BY a.attnum),
           string_agg(format('r.%I', a.attname), ', ' ORDER BY a.attnum),
           string_agg(format('%I = r.%I', a.attname, a.attname), ', ' ORDER BY a.attnum)
             FILTER (WHERE NOT a.attnum = ANY (i.indkey))
      INTO cols, vals, sets
      FROM pg_attribute a
      JOIN pg_index i ON i.indrelid = a.attrelid AND i.indisprimary
     WHERE a.attrelid = rel AND a.attnum > 0 AND NOT a.attisdropped
       AND a.attgenerated = '' AND nr ? a.attname::text;
    IF cur IS NULL THEN
        EXECUTE format('INSERT INTO %s (%s) OVERRIDING SYSTEM VALUE SELECT %s FROM jsonb_populate_record(NULL::%s, $2) r',
                       rel, cols, vals, rel) USING k, nr;
    ELSIF sets IS NOT NULL THEN
        EXECUTE format('UPDATE %s t SET %s FROM jsonb_populate_record(NULL::%s, $2) r WHERE %s',
                       rel, sets, rel, cond) USING k, nr;
    END IF;
END
$pgcourier$;
REVOKE ALL ON FUNCTION pgcourier.write_change(regclass, text, jsonb, jsonb, text, jsonb, jsonb, jsonb) FROM PUBLIC;
REVOKE ALL ON FUNCTION pgcourier.apply_change(regclass, text, text, jsonb, jsonb) FROM PUBLIC;

-- An operator's decision on a parked conflict (`pgcourier-queue conflicts
-- resolve`): 'remote' writes the version that arrived, 'local' writes
-- this site's again; either way as a local write, stamped with a new
-- clock and marked as a resolution, so every site ends with it.
CREATE OR REPLACE FUNCTION pgcourier.resolve_conflict(conflict_id bigint, keep text, by_whom text)
RETURNS text LANGUAGE plpgsql SET search_path = pg_catalog, pg_temp AS $pgcourier$
DECLARE
    f pgcourier.conflicts;
    cur jsonb;
    rel regclass;
    cond text;
    chosen jsonb;
    cols text;
    vals text;
    sets text;
BEGIN
    IF keep NOT IN ('local', 'remote') THEN
        RAISE EXCEPTION 'pgcourier: keep % is neither local nor remote', keep;
    END IF;
    SELECT * INTO f FROM pgcourier.conflicts WHERE id = conflict_id FOR UPDATE;
    IF NOT FOUND THEN
        RAISE EXCEPTION 'pgcourier: no conflict %', conflict_id
            USING HINT = 'pgcourier-queue conflicts list shows the open ones';
    END IF;
    IF f.state <> 'open' THEN
        RAISE EXCEPTION 'pgcourier: conflict % is %, not open', conflict_id, f.state;
    END IF;
    rel := f.tbl::regclass;
    cond := pgcourier.key_cond(rel);
    EXECUTE format('SELECT to_jsonb(t) FROM %s t WHERE %s', rel, cond) INTO cur USING f.key;
    chosen := cur;
    IF keep = 'remote' THEN
        -- The remote version, but the delta columns as they stand here:
        -- every increment, the remote's included, is in them already.
        IF f.remote_row IS NULL OR chosen IS NULL THEN
            chosen := f.remote_row;
        ELSE
            chosen := f.remote_row || pgcourier.delta_values(
                (SELECT w.delta FROM pgcourier.two_way w WHERE w.tbl = rel), chosen);
        END IF;
    END IF;
    PERFORM set_config('pgcourier.resolving', 'on', true);
    SELECT string_agg(format('%I', a.attname), ', ' ORDER BY a.attnum),
           string_agg(format('r.%I', a.attname), ', ' ORDER BY a.attnum),
           string_agg(format('%I = r.%I', a.attname, a.attname), ', ' ORDER BY a.attnum)
      INTO cols, vals, sets
      FROM pg_attribute a
     WHERE a.attrelid = rel AND a.attnum > 0 AND NOT a.attisdropped AND a.attgenerated = '';
    -- One write of the row (stamped once), whatever it was here.
    IF chosen IS NULL AND cur IS NOT NULL THEN
        EXECUTE format('DELETE FROM %s t WHERE %s', rel, cond) USING f.key;
    ELSIF chosen IS NOT NULL AND cur IS NULL THEN
        EXECUTE format('INSERT INTO %s (%s) OVERRIDING SYSTEM VALUE SELECT %s FROM jsonb_populate_record(NULL::%s, $1) r',
                       rel, cols, vals, rel) USING chosen;
    ELSIF chosen IS NOT NULL THEN
        EXECUTE format('UPDATE %s t SET %s FROM jsonb_populate_record(NULL::%s, $2) r WHERE %s',
                       rel, sets, rel, cond) USING f.key, chosen;
    END IF;
    PERFORM set_config('pgcourier.resolving', '', true);
    UPDATE pgcourier.conflicts
       SET state = 'resolved', winner = keep, resolved_at = now(), resolved_by = by_whom
     WHERE id = conflict_id;
    RETURN format('conflict %s on %s %s: kept the %s version', conflict_id, f.tbl, f.key, keep);
END
$pgcourier$;
REVOKE ALL ON FUNCTION pgcourier.resolve_conflict(bigint, text, text) FROM PUBLIC;
