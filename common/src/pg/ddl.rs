//! Schema changes, both sites: how DDL enters the WAL at the source and how
//! the branch reads it back.
//!
//! At the source an event trigger (`pgcourier_ddl`, `ddl_command_end`,
//! installed by the sender: [`install_sql`]) writes each DDL statement into
//! the WAL as a transactional logical message with the prefix
//! [`DDL_PREFIX`] and a JSON [`DdlMessage`] as content. It reaches capture
//! inside its transaction, in commit order, with the changes around it, and
//! travels in the same spool record. At the branch apply runs the statement
//! in the same target transaction (`receiver/src/apply/ddl.rs`), after
//! splitting the text with [`split_statements`] (a query string of several
//! statements is not replayed: it pauses apply); a statement with
//! `CONCURRENTLY` is read by [`concurrently`] and run on its own, between
//! target transactions.

use serde::{Deserialize, Serialize};

use super::quote_ident;

/// The prefix of the logical messages that carry DDL.
pub use pgcourier_proto::cutter::DDL_PREFIX;

/// The schema the sender's trigger function lives in (also the receiver's
/// bookkeeping schema at the branch); DDL in it is never captured.
pub const DDL_SCHEMA: &str = "pgcourier";
/// The event trigger's name.
pub const DDL_TRIGGER: &str = "pgcourier_ddl";

/// The table holding the key the trigger signs DDL messages with.
pub const DDL_KEY_TABLE: &str = "ddl_key";

/// What one DDL message carries.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct DdlMessage {
    /// The client's query string (`current_query()`): the statement, or
    /// several when the client sent them in one string.
    pub statement: String,
    /// The source session's `search_path` when the statement ran.
    pub search_path: String,
    /// The command tags of the DDL commands it ran (`CREATE TABLE`, ...).
    pub tags: Vec<String>,
    /// The role that ran it at the source (`current_user`); the branch
    /// runs the statement as that role. Absent in messages of versions
    /// before it was carried.
    #[serde(default)]
    pub role: Option<String>,
}

/// Command tags the trigger never captures: the source's own replication
/// set-up (publications, subscriptions) and privileges, which name roles,
/// and roles are global objects a branch has its own of.
pub const NOT_CAPTURED: &[&str] = &[
    "CREATE PUBLICATION",
    "ALTER PUBLICATION",
    "DROP PUBLICATION",
    "CREATE SUBSCRIPTION",
    "ALTER SUBSCRIPTION",
    "DROP SUBSCRIPTION",
    "GRANT",
    "REVOKE",
    "ALTER DEFAULT PRIVILEGES",
];

/// The SQL that installs (or replaces: idempotent) the capture functions
/// and creates the event triggers when absent (a trigger an operator
/// disabled stays disabled: `check` reports it). Needs a superuser on
/// PostgreSQL 15. `reader`: a role, not a superuser, that the sender
/// connects as and that must read the key.
///
/// Messages are signed: any role may call `pg_logical_emit_message`, and a
/// branch runs what a `pgcourier.ddl` message says, so the message carries
/// an HMAC-SHA256 of its content under a random key kept in
/// `pgcourier.ddl_key` (readable by its owner and `reader` only; made once,
/// kept across re-installs). The signing function `ddl_emit` is `SECURITY
/// DEFINER` (it reads the key for whoever runs DDL) and works only inside a
/// DDL command (`pg_event_trigger_ddl_commands()` refuses elsewhere), where
/// the statement it signs is always the client's own query string. It
/// signs the role that ran the statement only if the session's login role
/// could be it (`pg_has_role`). The capture (`pgcourier_proto::cutter`)
/// keeps only messages that verify.
///
/// One message per query string per transaction: a string of several DDL
/// statements fires the trigger once per statement, but `current_query()`
/// is the whole string each time, so a transaction-local setting
/// (`pgcourier.ddl_last`: the string's md5 and the statement's start time)
/// remembers what was emitted last. The drop trigger's verdict
/// (`pgcourier.ddl_drop`) carries the statement's start time too, so a
/// value set by hand in an earlier statement does not count.
///
/// With a `FOR TABLE` publication (`publication`), a table created in a
/// schema that already has a table in it is added to it by `ddl_emit`
/// (`ALTER PUBLICATION .. ADD TABLE`, as the function's owner), in the
/// creating transaction: it is then copied and followed from its first
/// row, as with `FOR ALL TABLES`.
pub fn install_sql(reader: Option<&str>, publication: &str) -> String {
    let publication = publication.replace('\'', "''");
    let schema = quote_ident(DDL_SCHEMA);
    let trigger = quote_ident(DDL_TRIGGER);
    let drops = quote_ident(&format!("{DDL_TRIGGER}_drops"));
    let key_table = format!("{schema}.{}", quote_ident(DDL_KEY_TABLE));
    let skipped: Vec<String> = NOT_CAPTURED.iter().map(|t| format!("'{t}'")).collect();
    let grant = match reader {
        Some(role) => format!(
            "GRANT USAGE ON SCHEMA {schema} TO {role};\nGRANT SELECT ON {key_table} TO {role};\n",
            role = quote_ident(role)
        ),
        None => String::new(),
    };
    format!(
        r#"CREATE SCHEMA IF NOT EXISTS {schema};
CREATE TABLE IF NOT EXISTS {key_table} (
    one boolean PRIMARY KEY DEFAULT true CHECK (one),
    key bytea NOT NULL
);
REVOKE ALL ON {key_table} FROM PUBLIC;
INSERT INTO {key_table} (key)
    SELECT pg_catalog.decode(pg_catalog.replace(
        pg_catalog.gen_random_uuid()::text || pg_catalog.gen_random_uuid()::text, '-', ''), 'hex')
    ON CONFLICT DO NOTHING;
{grant}-- The HMAC-SHA256 of a message body under the key, in hex, for the
-- SECURITY DEFINER functions that sign (DDL here, row clocks in
-- conflict.rs): nobody else may call it.
CREATE OR REPLACE FUNCTION {schema}.mac(body bytea) RETURNS bytea
LANGUAGE plpgsql SET search_path = pg_catalog, pg_temp AS $pgcourier$
DECLARE
    k bytea;
    ipad bytea;
    opad bytea;
BEGIN
    SELECT d.key INTO k FROM {key_table} d;
    IF k IS NULL THEN
        RAISE EXCEPTION 'pgcourier: no key in {DDL_SCHEMA}.{DDL_KEY_TABLE}'
            USING HINT = 'run pgcourier-sender (as a superuser) or the SQL pgcourier-sender check prints';
    END IF;
    k := k || decode(repeat('00', 64 - length(k)), 'hex');
    ipad := k;
    opad := k;
    FOR i IN 0..63 LOOP
        ipad := set_byte(ipad, i, get_byte(k, i) # 54);
        opad := set_byte(opad, i, get_byte(k, i) # 92);
    END LOOP;
    RETURN convert_to(encode(sha256(opad || sha256(ipad || body)), 'hex'), 'UTF8');
END
$pgcourier$;
REVOKE ALL ON FUNCTION {schema}.mac(bytea) FROM PUBLIC;
CREATE OR REPLACE FUNCTION {schema}.ddl_drops() RETURNS event_trigger
LANGUAGE plpgsql AS $pgcourier$
BEGIN
    -- A DROP is not listed by pg_event_trigger_ddl_commands(): say here
    -- whether it dropped only temporary objects or pgcourier's own.
    PERFORM pg_catalog.set_config('pgcourier.ddl_drop',
        CASE WHEN EXISTS (SELECT 1 FROM pg_catalog.pg_event_trigger_dropped_objects() d
                           WHERE d.original AND NOT d.is_temporary
                             AND d.schema_name IS DISTINCT FROM '{DDL_SCHEMA}')
             THEN 'replicated/' || pg_catalog.statement_timestamp()::text ELSE 'local' END, true);
END
$pgcourier$;
CREATE OR REPLACE FUNCTION {schema}.ddl_emit(tag text, path text, runner text) RETURNS void
LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, pg_temp AS $pgcourier$
DECLARE
    tags text[];
    listed bigint;
    mark text;
    body bytea;
    added record;
BEGIN
    SELECT count(*),
           array_agg(DISTINCT c.command_tag) FILTER (
               WHERE NOT c.in_extension
                 AND c.command_tag <> ALL (ARRAY[{skipped}])
                 AND c.schema_name IS DISTINCT FROM '{DDL_SCHEMA}'
                 AND NOT (c.object_type = 'schema' AND c.object_identity = '{DDL_SCHEMA}')
                 AND coalesce(c.schema_name, '') NOT LIKE 'pg\_temp%')
      INTO listed, tags
      FROM pg_event_trigger_ddl_commands() c;
    IF listed = 0 THEN
        -- Nothing listed: a DROP (pg_event_trigger_ddl_commands() lists
        -- none) that the sql_drop trigger saw drop a replicated object in
        -- this very statement, or nothing to replicate (IF NOT EXISTS /
        -- IF EXISTS that did nothing).
        IF current_setting('pgcourier.ddl_drop', true)
           = 'replicated/' || statement_timestamp()::text THEN
            IF tag LIKE 'DROP %' THEN
                tags := ARRAY[tag];
            END IF;
        END IF;
        PERFORM set_config('pgcourier.ddl_drop', '', true);
    END IF;
    IF tags IS NULL THEN
        RETURN;
    END IF;
    FOR added IN
        SELECT c.objid::regclass AS rel
          FROM pg_event_trigger_ddl_commands() c
          JOIN pg_class k ON k.oid = c.objid
         WHERE c.command_tag IN ('CREATE TABLE', 'CREATE TABLE AS')
           AND c.object_type = 'table' AND NOT c.in_extension
           AND k.relkind IN ('r', 'p') AND k.relpersistence = 'p' AND NOT k.relispartition
           AND c.schema_name IS DISTINCT FROM '{DDL_SCHEMA}'
           AND EXISTS (SELECT 1 FROM pg_publication p
                        WHERE p.pubname = '{publication}' AND NOT p.puballtables)
           AND EXISTS (SELECT 1 FROM pg_publication_rel r
                         JOIN pg_publication p ON p.oid = r.prpubid
                         JOIN pg_class t ON t.oid = r.prrelid
                        WHERE p.pubname = '{publication}' AND t.relnamespace = k.relnamespace)
           AND NOT EXISTS (SELECT 1 FROM pg_publication_rel r
                             JOIN pg_publication p ON p.oid = r.prpubid
                            WHERE p.pubname = '{publication}' AND r.prrelid = k.oid)
    LOOP
        EXECUTE format('ALTER PUBLICATION %I ADD TABLE %s', '{publication}', added.rel);
    END LOOP;
    mark := md5(current_query()) || '/' || statement_timestamp()::text;
    IF current_setting('pgcourier.ddl_last', true) IS NOT DISTINCT FROM mark THEN
        RETURN;
    END IF;
    PERFORM set_config('pgcourier.ddl_last', mark, true);
    IF runner IS NULL OR NOT pg_has_role(session_user, runner, 'MEMBER') THEN
        runner := session_user;
    END IF;
    body := convert_to(json_build_object(
        'statement', current_query(),
        'search_path', path,
        'tags', tags,
        'role', runner)::text, 'UTF8');
    PERFORM pg_logical_emit_message(true, '{DDL_PREFIX}', {schema}.mac(body) || body);
END
$pgcourier$;
-- Whoever runs DDL calls ddl_emit (through ddl_capture, as themselves).
GRANT USAGE ON SCHEMA {schema} TO PUBLIC;
CREATE OR REPLACE FUNCTION {schema}.ddl_capture() RETURNS event_trigger
LANGUAGE plpgsql AS $pgcourier$
BEGIN
    IF TG_TAG = ANY (ARRAY[{skipped}]) THEN
        RETURN;
    END IF;
    PERFORM {schema}.ddl_emit(TG_TAG, pg_catalog.current_setting('search_path'), current_user::text);
END
$pgcourier$;
DO $pgcourier$
BEGIN
    IF NOT EXISTS (SELECT 1 FROM pg_catalog.pg_event_trigger WHERE evtname = '{DDL_TRIGGER}') THEN
        CREATE EVENT TRIGGER {trigger} ON ddl_command_end EXECUTE FUNCTION {schema}.ddl_capture();
    END IF;
    IF NOT EXISTS (SELECT 1 FROM pg_catalog.pg_event_trigger WHERE evtname = '{DDL_TRIGGER}_drops') THEN
        CREATE EVENT TRIGGER {drops} ON sql_drop EXECUTE FUNCTION {schema}.ddl_drops();
    END IF;
END
$pgcourier$;
"#,
        skipped = skipped.join(", "),
    )
}

/// A query string split at its top-level semicolons: the statements, each
/// trimmed, without empty ones (a trailing `;`, comments only). Quotes
/// (`'..'`, `E'..'` with backslash escapes, `".."`), dollar quotes
/// (`$tag$..$tag$`) and comments (`--`, nested `/* */`) are skipped over.
pub fn split_statements(text: &str) -> Vec<String> {
    let mut out = Vec::new();
    let mut start = 0;
    let mut code = false;
    for seg in segments(text) {
        match seg.kind {
            Kind::Code => {
                for (i, c) in text[seg.start..seg.end].char_indices() {
                    if c == ';' {
                        let at = seg.start + i;
                        if code {
                            out.push(text[start..at].trim().to_owned());
                        }
                        start = at + 1;
                        code = false;
                    } else if !c.is_whitespace() {
                        code = true;
                    }
                }
            }
            Kind::Quoted => code = true,
            Kind::Comment => {}
        }
    }
    if code {
        out.push(text[start..].trim().to_owned());
    }
    out
}

/// The first words a DDL statement may start with. The trigger fires for
/// DDL run by code too (a `DO` block, a function called by `SELECT` or
/// `CALL`), whose query string is that code: not replayed.
const DDL_VERBS: &[&str] = &[
    "CREATE", "ALTER", "DROP", "COMMENT", "SECURITY", "IMPORT", "REFRESH",
];

/// Whether `statement` (one, from [`split_statements`]) starts, after
/// comments and parentheses, with a DDL verb.
pub fn is_ddl_statement(statement: &str) -> bool {
    for seg in segments(statement) {
        match seg.kind {
            Kind::Comment => continue,
            Kind::Quoted => return false,
            Kind::Code => {
                let code = &statement[seg.start..seg.end];
                let code = code.trim_start_matches(|c: char| c.is_whitespace());
                if code.is_empty() {
                    continue;
                }
                let word: String = code
                    .chars()
                    .take_while(|c| c.is_ascii_alphabetic())
                    .collect();
                return DDL_VERBS.iter().any(|v| v.eq_ignore_ascii_case(&word));
            }
        }
    }
    false
}

/// `CREATE TABLE .. AS query` (command tag `CREATE TABLE AS`) made to
/// create the table empty: `WITH NO DATA` in place of a trailing `WITH
/// [NO] DATA`, or added on a line of its own. The rows the source's query
/// wrote reach the branch as changes when the publication publishes the
/// new table, and are not the branch's to compute (its query would read the
/// branch's rows, and the changes would then insert them twice).
pub fn ctas_without_data(statement: &str) -> String {
    // The code words, with where each starts and ends.
    let mut words: Vec<(usize, usize)> = Vec::new();
    for seg in segments(statement) {
        if seg.kind != Kind::Code {
            // A quoted or commented part ends any "WITH DATA" before it.
            words.push((seg.start, seg.start));
            continue;
        }
        let part = &statement[seg.start..seg.end];
        let mut start = None;
        for (i, c) in part
            .char_indices()
            .chain(std::iter::once((part.len(), ' ')))
        {
            let is_word = c.is_alphanumeric() || c == '_';
            match (is_word, start) {
                (true, None) => start = Some(i),
                (false, Some(st)) => {
                    words.push((seg.start + st, seg.start + i));
                    start = None;
                }
                _ => {}
            }
        }
    }
    let is = |w: &(usize, usize), kw: &str| statement[w.0..w.1].eq_ignore_ascii_case(kw);
    // Trailing comments and whitespace do not count.
    let tail_start = segments(statement)
        .iter()
        .rev()
        .find(|seg| seg.kind != Kind::Comment && !statement[seg.start..seg.end].trim().is_empty())
        .map_or(0, |seg| seg.end);
    let code_words: Vec<&(usize, usize)> = words
        .iter()
        .filter(|w| w.1 > w.0 && w.1 <= tail_start)
        .collect();
    let n = code_words.len();
    let cut_at = if n >= 3
        && is(code_words[n - 3], "WITH")
        && is(code_words[n - 2], "NO")
        && is(code_words[n - 1], "DATA")
    {
        Some(code_words[n - 3].0)
    } else if n >= 2 && is(code_words[n - 2], "WITH") && is(code_words[n - 1], "DATA") {
        Some(code_words[n - 2].0)
    } else {
        None
    };
    match cut_at {
        Some(at) => format!("{}WITH NO DATA", &statement[..at]),
        None => format!("{}\nWITH NO DATA", statement.trim_end()),
    }
}

/// The statement without its top-level `CONCURRENTLY` keyword (`CREATE
/// INDEX CONCURRENTLY`, `DROP INDEX CONCURRENTLY`, `REINDEX ...
/// CONCURRENTLY`), which cannot run inside a transaction block; `None` when
/// it has none.
pub fn without_concurrently(statement: &str) -> Option<String> {
    let mut out = String::with_capacity(statement.len());
    let mut found = false;
    for seg in segments(statement) {
        let part = &statement[seg.start..seg.end];
        if seg.kind != Kind::Code {
            out.push_str(part);
            continue;
        }
        let mut word_start: Option<usize> = None;
        let mut last = 0;
        let bytes: Vec<(usize, char)> = part.char_indices().collect();
        for (n, &(i, c)) in bytes.iter().enumerate() {
            let is_word = c.is_alphanumeric() || c == '_' || c == '$';
            if is_word && word_start.is_none() {
                word_start = Some(i);
            }
            let ends = !is_word || n + 1 == bytes.len();
            if let (true, Some(ws)) = (ends, word_start) {
                let we = if is_word { i + c.len_utf8() } else { i };
                if part[ws..we].eq_ignore_ascii_case("concurrently") {
                    out.push_str(&part[last..ws]);
                    last = we;
                    found = true;
                }
                word_start = None;
            }
        }
        out.push_str(&part[last..]);
    }
    found.then_some(out)
}

/// What a statement with `CONCURRENTLY` does, as far as the branch needs
/// to know to run it on its own, outside a transaction block, and to run it
/// again harmlessly after a crash between the statement and the progress
/// row (`receiver/src/apply/ddl.rs`).
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Concurrently {
    /// `CREATE [UNIQUE] INDEX CONCURRENTLY [IF NOT EXISTS] index ON [ONLY]
    /// table ...`: the index is created in the table's schema. Both names
    /// as written (quoted or not; the table possibly schema-qualified), for
    /// `to_regclass`.
    CreateIndex { index: String, table: String },
    /// `DROP INDEX CONCURRENTLY [IF EXISTS] index [CASCADE | RESTRICT]`:
    /// one index (PostgreSQL allows no more with `CONCURRENTLY`), as
    /// written.
    DropIndex { index: String },
    /// `REINDEX ... CONCURRENTLY ...`: running it again rebuilds again.
    Reindex,
}

/// The shape of a statement holding the keyword `CONCURRENTLY`; `None` when
/// it has none, or when its shape is not one of [`Concurrently`] (an index
/// created without a name: a replay could not tell whether it was built).
pub fn concurrently(statement: &str) -> Option<Concurrently> {
    let tokens = tokens(statement);
    let word = |i: usize, w: &str| matches!(tokens.get(i), Some(Token::Word(t)) if t.eq_ignore_ascii_case(w));
    if !tokens
        .iter()
        .any(|t| matches!(t, Token::Word(w) if w.eq_ignore_ascii_case("concurrently")))
    {
        return None;
    }
    if word(0, "reindex") {
        return Some(Concurrently::Reindex);
    }
    let mut i;
    if word(0, "create") {
        i = 1;
        if word(i, "unique") {
            i += 1;
        }
        if !(word(i, "index") && word(i + 1, "concurrently")) {
            return None;
        }
        i += 2;
        if word(i, "if") && word(i + 1, "not") && word(i + 2, "exists") {
            i += 3;
        }
        if word(i, "on") {
            return None;
        }
        let index = name_at(&tokens, i)?.to_owned();
        i += 1;
        if !word(i, "on") {
            return None;
        }
        i += 1;
        if word(i, "only") {
            i += 1;
        }
        let (table, _) = qualified_at(&tokens, i)?;
        return Some(Concurrently::CreateIndex { index, table });
    }
    if word(0, "drop") && word(1, "index") && word(2, "concurrently") {
        i = 3;
        if word(i, "if") && word(i + 1, "exists") {
            i += 2;
        }
        let (index, next) = qualified_at(&tokens, i)?;
        i = next;
        if word(i, "cascade") || word(i, "restrict") {
            i += 1;
        }
        return (i == tokens.len()).then_some(Concurrently::DropIndex { index });
    }
    None
}

/// Whether `statement` is `COMMENT ON TABLE` or `COMMENT ON COLUMN`.
pub fn comments_on_table(statement: &str) -> bool {
    let tokens = tokens(statement);
    let word = |i: usize, w: &str| matches!(tokens.get(i), Some(Token::Word(t)) if t.eq_ignore_ascii_case(w));
    word(0, "comment") && word(1, "on") && (word(2, "table") || word(2, "column"))
}

/// A token of a statement's code: a word (keyword or plain identifier), a
/// quoted identifier (with its quotes), a literal, or one other character.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Token<'a> {
    Word(&'a str),
    Quoted(&'a str),
    Literal,
    Other(char),
}

/// The tokens of `text`, comments left out.
fn tokens(text: &str) -> Vec<Token<'_>> {
    let mut out = Vec::new();
    for seg in segments(text) {
        let part = &text[seg.start..seg.end];
        match seg.kind {
            Kind::Comment => {}
            Kind::Quoted if part.starts_with('"') => out.push(Token::Quoted(part)),
            Kind::Quoted => out.push(Token::Literal),
            Kind::Code => {
                let mut word_start: Option<usize> = None;
                for (i, c) in part.char_indices() {
                    let is_word = c.is_alphanumeric() || c == '_' || c == '$';
                    match (is_word, word_start) {
                        (true, None) => word_start = Some(i),
                        (true, Some(_)) => {}
                        (false, ws) => {
                            if let Some(ws) = ws {
                                out.push(Token::Word(&part[ws..i]));
                                word_start = None;
                            }
                            if !c.is_whitespace() {
                                out.push(Token::Other(c));
                            }
                        }
                    }
                }
                if let Some(ws) = word_start {
                    out.push(Token::Word(&part[ws..]));
                }
            }
        }
    }
    out
}

/// The name (a word or a quoted identifier) at `at`, as written.
fn name_at<'a>(tokens: &[Token<'a>], at: usize) -> Option<&'a str> {
    match tokens.get(at)? {
        Token::Word(w) | Token::Quoted(w) => Some(w),
        _ => None,
    }
}

/// The possibly qualified name (`a`, `s.a`, `"S"."a"`) starting at `at`,
/// as written, and where it ends.
fn qualified_at(tokens: &[Token<'_>], at: usize) -> Option<(String, usize)> {
    let mut name = name_at(tokens, at)?.to_owned();
    let mut i = at + 1;
    while tokens.get(i) == Some(&Token::Other('.')) {
        name.push('.');
        name.push_str(name_at(tokens, i + 1)?);
        i += 2;
    }
    Some((name, i))
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Kind {
    Code,
    Quoted,
    Comment,
}

struct Segment {
    kind: Kind,
    start: usize,
    end: usize,
}

/// The text cut into code, quoted text and comments. An unterminated quote
/// or comment runs to the end.
fn segments(text: &str) -> Vec<Segment> {
    let b = text.as_bytes();
    let mut out = Vec::new();
    let mut i = 0;
    let mut code_start = 0;
    let push_code = |out: &mut Vec<Segment>, from: usize, to: usize| {
        if to > from {
            out.push(Segment {
                kind: Kind::Code,
                start: from,
                end: to,
            });
        }
    };
    while i < b.len() {
        let prev_is_word = i > 0 && (b[i - 1].is_ascii_alphanumeric() || b[i - 1] == b'_');
        let (kind, end) = match b[i] {
            b'-' if b.get(i + 1) == Some(&b'-') => {
                let end = text[i..].find('\n').map_or(b.len(), |n| i + n + 1);
                (Kind::Comment, end)
            }
            b'/' if b.get(i + 1) == Some(&b'*') => {
                let mut depth = 0usize;
                let mut j = i;
                loop {
                    if j + 1 >= b.len() {
                        break (Kind::Comment, b.len());
                    }
                    if b[j] == b'/' && b[j + 1] == b'*' {
                        depth += 1;
                        j += 2;
                    } else if b[j] == b'*' && b[j + 1] == b'/' {
                        depth -= 1;
                        j += 2;
                        if depth == 0 {
                            break (Kind::Comment, j);
                        }
                    } else {
                        j += 1;
                    }
                }
            }
            b'\'' => {
                let escapes = i > 0
                    && matches!(b[i - 1], b'e' | b'E')
                    && !(i > 1 && (b[i - 2].is_ascii_alphanumeric() || b[i - 2] == b'_'));
                (Kind::Quoted, quoted_end(b, i, b'\'', escapes))
            }
            b'"' => (Kind::Quoted, quoted_end(b, i, b'"', false)),
            b'$' if !prev_is_word => match dollar_tag(b, i) {
                Some(tag) => {
                    let body = i + tag.len();
                    let end = text[body..]
                        .find(tag)
                        .map_or(b.len(), |n| body + n + tag.len());
                    (Kind::Quoted, end)
                }
                None => {
                    i += 1;
                    continue;
                }
            },
            _ => {
                i += 1;
                continue;
            }
        };
        push_code(&mut out, code_start, i);
        out.push(Segment {
            kind,
            start: i,
            end,
        });
        i = end;
        code_start = end;
    }
    push_code(&mut out, code_start, b.len());
    out
}

/// Where a quote opened at `open` ends (after its closing quote). A doubled
/// quote stays inside; with `escapes`, so does a backslash-escaped one.
fn quoted_end(b: &[u8], open: usize, quote: u8, escapes: bool) -> usize {
    let mut j = open + 1;
    while j < b.len() {
        if escapes && b[j] == b'\\' {
            j += 2;
            continue;
        }
        if b[j] == quote {
            if b.get(j + 1) == Some(&quote) {
                j += 2;
                continue;
            }
            return j + 1;
        }
        j += 1;
    }
    b.len()
}

/// The dollar-quote tag (`$$`, `$fn$`) opening at `at`, if one does: a
/// parameter (`$1`) is none.
fn dollar_tag(b: &[u8], at: usize) -> Option<&str> {
    let mut j = at + 1;
    if b.get(j).is_some_and(|c| c.is_ascii_digit()) {
        return None;
    }
    while j < b.len() && (b[j].is_ascii_alphanumeric() || b[j] == b'_' || b[j] >= 0x80) {
        j += 1;
    }
    if b.get(j) == Some(&b'$') {
        std::str::from_utf8(&b[at..=j]).ok()
    } else {
        None
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn one_statement_with_or_without_its_semicolon() {
        assert_eq!(
            split_statements("ALTER TABLE t ADD COLUMN a int;"),
            vec!["ALTER TABLE t ADD COLUMN a int"]
        );
        assert_eq!(
            split_statements("  CREATE TABLE t (a int)  -- trailing\n"),
            vec!["CREATE TABLE t (a int)  -- trailing"]
        );
        assert!(split_statements(" ; -- nothing\n /* ; */").is_empty());
    }

    #[test]
    fn semicolons_inside_quotes_comments_and_dollar_quotes_do_not_split() {
        let text = "CREATE FUNCTION f() RETURNS int LANGUAGE sql AS $fn$ SELECT 1; $fn$; \
                    COMMENT ON TABLE t IS 'a; b'';c'; \
                    COMMENT ON TABLE \"x;y\" IS E'it\\'s; ok' /* ; /* ; */ ; */; \
                    SELECT $1; -- ; \n SELECT 2";
        let parts = split_statements(text);
        assert_eq!(parts.len(), 5, "{parts:#?}");
        assert!(parts[0].ends_with("$fn$ SELECT 1; $fn$"));
        assert_eq!(parts[1], "COMMENT ON TABLE t IS 'a; b'';c'");
        assert!(parts[2].starts_with("COMMENT ON TABLE \"x;y\" IS E'it\\'s; ok'"));
        assert_eq!(parts[3], "SELECT $1");
        assert_eq!(parts[4], "-- ; \n SELECT 2");
    }

    #[test]
    fn only_statements_that_are_ddl_themselves_are_replayed() {
        for yes in [
            "CREATE TABLE t (a int)",
            "  -- migration 12\n/* x */ alter table t add b int",
            "DROP INDEX CONCURRENTLY i",
            "COMMENT ON TABLE t IS 'x'",
            "REFRESH MATERIALIZED VIEW v",
        ] {
            assert!(is_ddl_statement(yes), "{yes}");
        }
        for no in [
            "DO $$ BEGIN CREATE TABLE t (); PERFORM 1; END $$",
            "SELECT make_tables()",
            "CALL migrate()",
            "WITH x AS (SELECT 1) SELECT * INTO t FROM x",
            "EXPLAIN ANALYZE CREATE TABLE t AS SELECT 1",
            "createx TABLE t ()",
            "",
            "-- only a comment",
        ] {
            assert!(!is_ddl_statement(no), "{no}");
        }
    }

    #[test]
    fn create_table_as_is_replayed_without_its_rows() {
        assert_eq!(
            ctas_without_data("CREATE TABLE t AS SELECT * FROM s"),
            "CREATE TABLE t AS SELECT * FROM s\nWITH NO DATA"
        );
        assert_eq!(
            ctas_without_data("create table t as select 1 with data"),
            "create table t as select 1 WITH NO DATA"
        );
        assert_eq!(
            ctas_without_data("CREATE TABLE t AS SELECT 1 WITH NO DATA -- done"),
            "CREATE TABLE t AS SELECT 1 WITH NO DATA"
        );
        // A trailing comment is not where the clause goes.
        assert_eq!(
            ctas_without_data("CREATE TABLE t AS SELECT 'with data' -- with data"),
            "CREATE TABLE t AS SELECT 'with data' -- with data\nWITH NO DATA"
        );
    }

    #[test]
    fn concurrently_is_removed_only_where_it_is_a_keyword() {
        assert_eq!(
            without_concurrently("CREATE INDEX CONCURRENTLY IF NOT EXISTS i ON t (a)").as_deref(),
            Some("CREATE INDEX  IF NOT EXISTS i ON t (a)")
        );
        assert_eq!(
            without_concurrently("drop index concurrently i").as_deref(),
            Some("drop index  i")
        );
        assert_eq!(
            without_concurrently("COMMENT ON TABLE t IS 'concurrently'"),
            None
        );
        assert_eq!(
            without_concurrently("CREATE INDEX concurrently_a ON t (a)"),
            None
        );
    }

    #[test]
    fn concurrent_statements_are_read_for_the_names_a_replay_needs() {
        assert_eq!(
            concurrently(
                "CREATE UNIQUE INDEX CONCURRENTLY IF NOT EXISTS \"Item_A\" ON ONLY s.\"T\" (a)"
            ),
            Some(Concurrently::CreateIndex {
                index: "\"Item_A\"".into(),
                table: "s.\"T\"".into()
            })
        );
        assert_eq!(
            concurrently("create index /* c */ concurrently item_a on item using btree (a)"),
            Some(Concurrently::CreateIndex {
                index: "item_a".into(),
                table: "item".into()
            })
        );
        assert_eq!(
            concurrently("DROP INDEX CONCURRENTLY IF EXISTS public.item_a CASCADE"),
            Some(Concurrently::DropIndex {
                index: "public.item_a".into()
            })
        );
        assert_eq!(
            concurrently("REINDEX INDEX CONCURRENTLY item_a"),
            Some(Concurrently::Reindex)
        );
        // No name: a replay could not find what a first run built.
        assert_eq!(concurrently("CREATE INDEX CONCURRENTLY ON item (a)"), None);
        // Several indexes, or none of the keyword.
        assert_eq!(concurrently("DROP INDEX CONCURRENTLY a, b"), None);
        assert_eq!(concurrently("CREATE INDEX item_a ON item (a)"), None);
        assert_eq!(concurrently("COMMENT ON INDEX i IS 'CONCURRENTLY'"), None);
    }

    #[test]
    fn comments_on_tables_and_columns_are_told_from_other_comments() {
        assert!(comments_on_table("COMMENT ON TABLE t IS 'x'"));
        assert!(comments_on_table("comment  on column t.a is null"));
        assert!(!comments_on_table("COMMENT ON FUNCTION f() IS 'on table'"));
        assert!(!comments_on_table("COMMENT ON VIEW v IS 'x'"));
    }

    #[test]
    fn the_install_sql_quotes_its_names_and_skips_its_own_schema() {
        let sql = install_sql(None, "pub'x");
        assert!(!sql.contains("GRANT SELECT"));
        assert!(sql.contains("p.pubname = 'pub''x'"));
        assert!(install_sql(Some("cour ier"), "p")
            .contains("GRANT SELECT ON \"pgcourier\".\"ddl_key\" TO \"cour ier\";"));
        assert!(sql.contains("CREATE OR REPLACE FUNCTION \"pgcourier\".ddl_capture()"));
        assert!(sql.contains("CREATE EVENT TRIGGER \"pgcourier_ddl\" ON ddl_command_end"));
        assert!(sql.contains("IS DISTINCT FROM 'pgcourier'"));
        // Its own schema, created by this very script, is not captured.
        assert!(sql.contains("c.object_identity = 'pgcourier'"));
        // Nothing listed and not a DROP (CREATE SCHEMA IF NOT EXISTS that
        // did nothing): not captured.
        assert!(sql.contains("tag LIKE 'DROP %'"));
        assert!(sql.contains("SECURITY DEFINER SET search_path = pg_catalog, pg_temp"));
        assert!(sql.contains("pg_logical_emit_message(true, 'pgcourier.ddl'"));
    }
}
