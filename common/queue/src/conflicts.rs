//! `pgcourier-queue conflicts`: the conflicts recorded at this site on
//! tables written at several sites (`pgcourier.conflicts`, written by
//! apply: `pgcourier_common::pg::conflict`), read from the site's database
//! with the config's connection (the receiver's `target` or the sender's
//! `source`: the same database at a site that writes). `resolve` decides a
//! parked one (policy `manual`) by `pgcourier.resolve_conflict`, a local
//! write that every other site then applies.

use anyhow::Context;
use comfy_table::{presets, Table};
use pgcourier_common::ops::backoff::error_chain;
use serde::Serialize;
use tokio_postgres::Client;

use crate::fetch::Daemon;

/// One conflict, as `list` and `show` print it.
#[derive(Debug, Serialize)]
pub struct Conflict {
    pub id: i64,
    pub at: String,
    pub table: String,
    pub key: serde_json::Value,
    pub kind: String,
    pub policy: String,
    pub winner: String,
    pub state: String,
    /// `show` only: both versions (null: deleted) and their clocks.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub versions: Option<Versions>,
}

#[derive(Debug, Serialize)]
pub struct Versions {
    pub local_row: Option<serde_json::Value>,
    pub local_site: Option<String>,
    pub local_hlc: Option<i64>,
    pub remote_row: Option<serde_json::Value>,
    pub remote_site: Option<String>,
    pub remote_hlc: Option<i64>,
    pub resolved_at: Option<String>,
    pub resolved_by: Option<String>,
}

const COLUMNS: &str = "id, to_char(at, 'YYYY-MM-DD HH24:MI:SS TZ'), tbl, key::text, kind, policy, \
     winner, state, local_row::text, local_site, local_hlc, remote_row::text, remote_site, \
     remote_hlc, to_char(resolved_at, 'YYYY-MM-DD HH24:MI:SS TZ'), resolved_by";

/// Run `f` on a connection to the site's database.
fn with_database<T>(
    daemon: &Daemon,
    f: impl AsyncFnOnce(&Client) -> anyhow::Result<T>,
) -> anyhow::Result<T> {
    let connect = match daemon {
        Daemon::Sender(c) => &c.source,
        Daemon::Receiver(c) => &c.target,
    };
    crate::fetch::runtime()?.block_on(async {
        let (client, conn) = connect
            .connect()
            .await
            .map_err(|e| anyhow::anyhow!("reach the site's database: {}", error_chain(&e)))?;
        let work = async move {
            let out = f(&client).await;
            drop(client);
            out
        };
        let (out, _closed) = tokio::join!(work, conn);
        out
    })
}

fn conflict(row: &tokio_postgres::Row, versions: bool) -> anyhow::Result<Conflict> {
    let json = |i: usize| -> anyhow::Result<Option<serde_json::Value>> {
        row.get::<_, Option<String>>(i)
            .map(|t| serde_json::from_str(&t).context("a version in pgcourier.conflicts"))
            .transpose()
    };
    Ok(Conflict {
        id: row.get(0),
        at: row.get(1),
        table: row.get(2),
        key: json(3)?.unwrap_or_default(),
        kind: row.get(4),
        policy: row.get(5),
        winner: row.get(6),
        state: row.get(7),
        versions: if versions {
            Some(Versions {
                local_row: json(8)?,
                local_site: row.get(9),
                local_hlc: row.get(10),
                remote_row: json(11)?,
                remote_site: row.get(12),
                remote_hlc: row.get(13),
                resolved_at: row.get(14),
                resolved_by: row.get(15),
            })
        } else {
            None
        },
    })
}

/// No `pgcourier.conflicts` table: no table here is written at several
/// sites.
const NOT_INSTALLED: &str = "this site records no conflicts: no table here is written at several sites ([[table]] direction = \"both\" in the site's sender config)";

async fn installed(client: &Client) -> anyhow::Result<()> {
    let there: bool = client
        .query_one("SELECT to_regclass('pgcourier.conflicts') IS NOT NULL", &[])
        .await?
        .get(0);
    anyhow::ensure!(there, NOT_INSTALLED);
    Ok(())
}

/// The latest conflicts, newest first; `open`: only those parked.
pub fn list(daemon: &Daemon, open: bool, limit: i64) -> anyhow::Result<Vec<Conflict>> {
    with_database(daemon, async |client| {
        installed(client).await?;
        let sql = format!(
            "SELECT {COLUMNS} FROM pgcourier.conflicts WHERE $1 = false OR state = 'open' \
             ORDER BY id DESC LIMIT $2"
        );
        let rows = client.query(&sql, &[&open, &limit]).await?;
        rows.iter().map(|r| conflict(r, false)).collect()
    })
}

/// One conflict with both versions.
pub fn show(daemon: &Daemon, id: i64) -> anyhow::Result<Conflict> {
    with_database(daemon, async |client| {
        installed(client).await?;
        let sql = format!("SELECT {COLUMNS} FROM pgcourier.conflicts WHERE id = $1");
        let row = client.query_opt(&sql, &[&id]).await?.with_context(|| {
            format!("no conflict {id} (pgcourier-queue conflicts list shows them)")
        })?;
        conflict(&row, true)
    })
}

/// Decide parked conflict `id`: keep `keep` ("local" or "remote").
/// `Ok((false, why))`: refused (no such conflict, or not open).
pub fn resolve(daemon: &Daemon, id: i64, keep: &str) -> anyhow::Result<(bool, String)> {
    let by = std::env::var("SUDO_USER")
        .or_else(|_| std::env::var("USER"))
        .unwrap_or_else(|_| "pgcourier-queue".into());
    with_database(daemon, async |client| {
        installed(client).await?;
        match client
            .query_one(
                "SELECT pgcourier.resolve_conflict($1, $2, $3)",
                &[&id, &keep, &by],
            )
            .await
        {
            Ok(row) => Ok((true, row.get(0))),
            Err(e) => match e.as_db_error() {
                Some(db) if db.message().starts_with("pgcourier:") => {
                    Ok((false, db.message().to_owned()))
                }
                _ => Err(e.into()),
            },
        }
    })
}

/// `list` for a person.
pub fn render_list(conflicts: &[Conflict]) -> String {
    let mut table = Table::new();
    table.load_preset(presets::NOTHING).set_header(vec![
        "id", "at", "table", "key", "kind", "policy", "kept", "state",
    ]);
    for c in conflicts {
        table.add_row(vec![
            c.id.to_string(),
            c.at.clone(),
            c.table.clone(),
            c.key.to_string(),
            c.kind.clone(),
            c.policy.clone(),
            c.winner.clone(),
            c.state.clone(),
        ]);
    }
    if conflicts.is_empty() {
        return "no conflicts recorded".into();
    }
    table.to_string()
}

/// `show` for a person.
pub fn render_one(c: &Conflict) -> String {
    let mut out = format!(
        "conflict {} at {}: {} on {} {}\npolicy {}, kept the {} version, {}\n",
        c.id, c.at, c.kind, c.table, c.key, c.policy, c.winner, c.state
    );
    if let Some(v) = &c.versions {
        let row = |r: &Option<serde_json::Value>| {
            r.as_ref()
                .map_or_else(|| "(deleted)".to_owned(), |r| r.to_string())
        };
        out.push_str(&format!(
            "local  (site {}, clock {}): {}\nremote (site {}, clock {}): {}\n",
            v.local_site.as_deref().unwrap_or("-"),
            v.local_hlc.map_or("-".into(), |h| h.to_string()),
            row(&v.local_row),
            v.remote_site.as_deref().unwrap_or("-"),
            v.remote_hlc.map_or("-".into(), |h| h.to_string()),
            row(&v.remote_row),
        ));
        if let Some(at) = &v.resolved_at {
            out.push_str(&format!(
                "resolved at {at} by {}\n",
                v.resolved_by.as_deref().unwrap_or("-")
            ));
        }
    }
    out
}
