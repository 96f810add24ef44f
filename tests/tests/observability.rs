//! The deploy files against the daemons' `/metrics`: the Prometheus alert
//! rules (`deploy/prometheus/pgcourier-alerts.yml`), their promtool unit
//! tests (`pgcourier-alerts.test.yml`) and the Grafana dashboard
//! (`deploy/grafana/pgcourier.json`). No PostgreSQL.
//!
//! Every metric named in them must be one the daemons emit: the families,
//! kinds and labels come from `pgcourier_sender::admin::metrics` and
//! `pgcourier_receiver::admin::metrics` rendered for a status with every
//! optional part present. A counter is only read through `rate`, `irate` or
//! `increase` in a query, a label selected or shown must be on the metric,
//! and promtool (Debian's `prometheus` package, installed by
//! scripts/install-postgres) must accept the rules, pass their unit tests
//! and parse every dashboard query.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};
use std::process::Command;

use pgcourier_receiver::admin::ReceiverStatus;
use pgcourier_sender::admin::SenderStatus;
use serde_json::{json, Value};

const RULES: &str = "deploy/prometheus/pgcourier-alerts.yml";
const RULE_TESTS: &str = "deploy/prometheus/pgcourier-alerts.test.yml";
const DASHBOARD: &str = "deploy/grafana/pgcourier.json";
const OPERATIONS: &str = "docs/operations.md";

/// Labels Prometheus adds to every scraped series.
const TARGET_LABELS: [&str; 2] = ["job", "instance"];

fn repo() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("the tests crate is in the workspace root")
        .to_path_buf()
}

fn read(path: &str) -> String {
    let full = repo().join(path);
    std::fs::read_to_string(&full).unwrap_or_else(|e| panic!("read {}: {e}", full.display()))
}

// ---------------------------------------------------------------------------
// What the daemons emit.
// ---------------------------------------------------------------------------

#[derive(Debug, Default)]
struct Family {
    kind: String,
    labels: BTreeSet<String>,
}

/// A sender status with every optional part present (slot, a connected
/// receiver link, shipping totals), as the daemon serializes it.
fn full_sender_status() -> SenderStatus {
    serde_json::from_value(json!({
        "role": "sender",
        "running": true,
        "source": "7000/db/pgcourier",
        "slot": {"slot": "pgcourier", "active": true, "retained_wal_bytes": 4096},
        "capture_error": "source unreachable",
        "spool_full": true,
        "spool_max_bytes": 1000,
        "captured_end_lsn": "0/16B3748",
        "spool_records": 3,
        "spool_bytes": 900,
        "first_seq": 7,
        "complete_seq": 9,
        "oldest_age_seconds": 1.5,
        "receivers": [{
            "name": "branch1",
            "acked_seq": 6,
            "records_behind": 3,
            "bytes_behind": 900,
            "lag_seconds": 2.0,
            "link": {
                "connected": true,
                "peer": "192.0.2.1:7751",
                "transport": "tcp",
                "fell_back_to_tcp": true,
                "tcp_fallbacks": 1,
                "connected_since": "2026-01-01T00:00:00Z",
                "rtt_ms": 12.5,
                "in_flight_bytes": 100,
                "connections": 2,
                "acked_bytes": 800,
                "throughput_bytes_per_sec": 80.0
            }
        }],
        "shipping": {
            "batches": 1, "records": 2, "raw_bytes": 3, "compressed_bytes": 4,
            "compression_ratio": 0.75, "udp_tx_bytes": 5, "tcp_tx_bytes": 7,
            "resent_bytes": 6
        },
        "copy_waiting": 0
    }))
    .expect("a full SenderStatus from JSON: add the field it names to full_sender_status")
}

/// A receiver status with every optional part present (a link, an apply
/// error with its class).
fn full_receiver_status() -> ReceiverStatus {
    serde_json::from_value(json!({
        "role": "receiver",
        "running": true,
        "source": "7000/db/pgcourier",
        "inbox_records": 2,
        "inbox_bytes": 600,
        "inbox_full": true,
        "inbox_max_bytes": 1000,
        "durable_seq": 9,
        "applied_seq": 7,
        "applied_commit_lsn": "0/16B3748",
        "applied_transactions": 5,
        "apply_lag_seconds": 3.0,
        "apply_state": "paused",
        "last_error": "relation \"t\" does not exist",
        "error_class": "missing_table",
        "blocking_seq": 8,
        "missing_rows": 1,
        "skipped_transactions": 1,
        "link": {
            "connected": true,
            "peer": "192.0.2.2:7750",
            "connected_since": "2026-01-01T00:00:00Z",
            "rtt_ms": 12.5,
            "batches": 3,
            "compressed_bytes": 400,
            "raw_bytes": 900,
            "connections": 2,
            "discarded_bytes": 10
        }
    }))
    .expect("a full ReceiverStatus from JSON: add the field it names to full_receiver_status")
}

/// Families of Prometheus text: name -> kind (from `# TYPE`) and the label
/// names of its samples.
fn families(text: &str, into: &mut BTreeMap<String, Family>) {
    for line in text.lines() {
        if let Some(rest) = line.strip_prefix("# TYPE ") {
            let (name, kind) = rest.split_once(' ').expect("# TYPE name kind");
            into.entry(name.to_owned()).or_default().kind = kind.to_owned();
        } else if !line.starts_with('#') && !line.is_empty() {
            let name_end = line.find(['{', ' ']).expect("a sample: name value");
            let family = into.entry(line[..name_end].to_owned()).or_default();
            if line[name_end..].starts_with('{') {
                let labels = &line[name_end + 1..line.rfind('}').expect("labels end with }")];
                for (key, _) in labels.split(',').filter_map(|kv| kv.split_once('=')) {
                    family.labels.insert(key.to_owned());
                }
            }
        }
    }
}

fn emitted() -> BTreeMap<String, Family> {
    let mut all = BTreeMap::new();
    families(
        &pgcourier_sender::admin::metrics(&full_sender_status()),
        &mut all,
    );
    families(
        &pgcourier_receiver::admin::metrics(&full_receiver_status()),
        &mut all,
    );
    for family in all.values_mut() {
        family.labels.extend(TARGET_LABELS.map(str::to_owned));
    }
    all
}

// ---------------------------------------------------------------------------
// What the deploy files use.
// ---------------------------------------------------------------------------

/// One `pgcourier_*` name in a text, with what surrounds it.
#[derive(Debug)]
struct Use {
    name: String,
    /// Label names of the selector right after the name (`name{a="x"}`).
    labels: Vec<String>,
    /// The function whose first argument it is (`rate(name...`), if any.
    function: Option<String>,
}

fn is_ident(c: char) -> bool {
    c.is_ascii_alphanumeric() || c == '_' || c == ':'
}

/// Every `pgcourier_[a-z0-9_]+` in `text` standing alone (not inside a
/// longer identifier), with its selector's label names and the function
/// it is passed to.
fn uses(text: &str) -> Vec<Use> {
    let mut out = Vec::new();
    let mut from = 0;
    while let Some(i) = text[from..].find("pgcourier_").map(|i| from + i) {
        let end = text[i..]
            .find(|c: char| !(c.is_ascii_lowercase() || c.is_ascii_digit() || c == '_'))
            .map_or(text.len(), |n| i + n);
        from = end;
        if text[..i].chars().next_back().is_some_and(is_ident) {
            continue;
        }
        let before = text[..i].trim_end();
        let function = before.strip_suffix('(').map(|b| {
            let start = b.rfind(|c: char| !is_ident(c)).map_or(0, |n| n + 1);
            b[start..].to_owned()
        });
        let mut labels = Vec::new();
        if text[end..].starts_with('{') {
            let close = text[end..].find('}').map_or(text.len(), |n| end + n);
            labels = selector_labels(&text[end + 1..close]);
        }
        out.push(Use {
            name: text[i..end].to_owned(),
            labels,
            function,
        });
    }
    out
}

/// Label names of a selector's body: `a="x", b=~"y|z"` -> [a, b].
fn selector_labels(body: &str) -> Vec<String> {
    let mut names = Vec::new();
    let mut rest = body;
    loop {
        rest = rest.trim_start_matches([',', ' ']);
        let Some(op) = rest.find(['=', '!']) else {
            break;
        };
        names.push(rest[..op].trim().to_owned());
        // Skip the quoted value (it may hold commas).
        let Some(open) = rest.find('"') else { break };
        let mut close = open + 1;
        let bytes = rest.as_bytes();
        while close < bytes.len() && bytes[close] != b'"' {
            close += if bytes[close] == b'\\' { 2 } else { 1 };
        }
        rest = rest.get(close + 1..).unwrap_or("");
    }
    names
}

/// Values of `key:` in a YAML file, read line by line: plain, quoted, or a
/// `|` / `>` block (the lines indented deeper than the key). Enough for the
/// files here, which promtool parses in full.
fn yaml_values(text: &str, key: &str) -> Vec<String> {
    let lines: Vec<&str> = text.lines().collect();
    let mut out = Vec::new();
    let mut i = 0;
    while i < lines.len() {
        let line = lines[i];
        let trimmed = line.trim_start().trim_start_matches("- ");
        i += 1;
        let Some(value) = trimmed.strip_prefix(key).and_then(|r| r.strip_prefix(':')) else {
            continue;
        };
        let value = value.trim();
        if value.starts_with('|') || value.starts_with('>') {
            let indent = line.len() - line.trim_start().len();
            let mut block = Vec::new();
            while i < lines.len()
                && (lines[i].trim().is_empty()
                    || lines[i].len() - lines[i].trim_start().len() > indent)
            {
                block.push(lines[i].trim());
                i += 1;
            }
            out.push(block.join("\n"));
        } else if let Some(v) = value.strip_prefix('\'').and_then(|v| v.strip_suffix('\'')) {
            out.push(v.replace("''", "'"));
        } else if value.starts_with('"') {
            out.push(serde_json::from_str(value).expect("a double-quoted YAML string"));
        } else {
            out.push(value.to_owned());
        }
    }
    out
}

/// Every string in a JSON document.
fn json_strings<'a>(v: &'a Value, out: &mut Vec<&'a str>) {
    match v {
        Value::String(s) => out.push(s),
        Value::Array(a) => a.iter().for_each(|v| json_strings(v, out)),
        Value::Object(o) => o.values().for_each(|v| json_strings(v, out)),
        _ => {}
    }
}

/// The dashboard's queries: (panel title, expr, legendFormat).
fn dashboard_queries(dashboard: &Value) -> Vec<(String, String, String)> {
    let mut out = Vec::new();
    for panel in dashboard["panels"].as_array().expect("panels") {
        for t in panel["targets"].as_array().into_iter().flatten() {
            out.push((
                panel["title"].as_str().unwrap_or_default().to_owned(),
                t["expr"].as_str().unwrap_or_default().to_owned(),
                t["legendFormat"].as_str().unwrap_or_default().to_owned(),
            ));
        }
    }
    out
}

/// What is wrong with the names in `text` (from `file`): a metric the
/// daemons do not emit, a label it does not carry, a gauge passed to
/// `rate`. With `query`, `text` is one PromQL expression: a counter must
/// go through `rate`, `irate` or `increase` there.
fn check_uses(
    file: &str,
    text: &str,
    query: bool,
    emitted: &BTreeMap<String, Family>,
) -> Vec<String> {
    let mut problems = Vec::new();
    for u in uses(text) {
        let Some(family) = emitted.get(&u.name) else {
            problems.push(format!(
                "{file}: {} is not a metric the daemons emit (sender/src/admin.rs, receiver/src/admin.rs)",
                u.name
            ));
            continue;
        };
        for label in &u.labels {
            if !family.labels.contains(label) {
                problems.push(format!(
                    "{file}: {} has no label {label} (it has {:?})",
                    u.name, family.labels
                ));
            }
        }
        let f = u.function.as_deref().unwrap_or_default();
        let over_time = matches!(f, "rate" | "irate" | "increase" | "resets");
        if over_time && family.kind != "counter" {
            problems.push(format!("{file}: {f}({}) on a {}", u.name, family.kind));
        }
        if query && family.kind == "counter" && !over_time {
            problems.push(format!(
                "{file}: the counter {} is read without rate/irate/increase in `{text}`",
                u.name
            ));
        }
        if f == "label_values" {
            let arg = text.split_once(&u.name).map(|(_, a)| a).unwrap_or_default();
            let label = arg
                .rsplit_once(',')
                .map(|(_, l)| l.trim().trim_end_matches(')').trim())
                .unwrap_or_default();
            if !family.labels.contains(label) {
                problems.push(format!(
                    "{file}: label_values of {}: it has no label {label}",
                    u.name
                ));
            }
        }
    }
    problems
}

/// Problems in the rules, their unit tests and the dashboard, given as
/// texts (so a changed copy can be checked too).
fn check_deploy_files(
    rules: &str,
    rule_tests: &str,
    dashboard: &str,
    emitted: &BTreeMap<String, Family>,
) -> Vec<String> {
    let mut problems = Vec::new();
    // The whole files: names in descriptions and test series count too.
    problems.extend(check_uses(RULES, rules, false, emitted));
    problems.extend(check_uses(RULE_TESTS, rule_tests, false, emitted));
    for expr in yaml_values(rules, "expr") {
        problems.extend(check_uses(RULES, &expr, true, emitted));
    }
    let dashboard: Value = match serde_json::from_str(dashboard) {
        Ok(v) => v,
        Err(e) => return vec![format!("{DASHBOARD}: not JSON: {e}")],
    };
    let mut strings = Vec::new();
    json_strings(&dashboard, &mut strings);
    for s in strings {
        problems.extend(check_uses(DASHBOARD, s, false, emitted));
    }
    for (title, expr, legend) in dashboard_queries(&dashboard) {
        let file = format!("{DASHBOARD} panel \"{title}\"");
        problems.extend(check_uses(&file, &expr, true, emitted));
        // A label shown in the legend must be on every metric of the query
        // (or kept by its `by (...)`).
        let names: Vec<String> = uses(&expr).into_iter().map(|u| u.name).collect();
        for part in legend.split("{{").skip(1) {
            let label = part.split("}}").next().unwrap_or_default().trim();
            let on_all = names
                .iter()
                .all(|n| emitted.get(n).is_some_and(|f| f.labels.contains(label)));
            if !on_all {
                problems.push(format!(
                    "{file}: legend {{{{{label}}}}} is not a label of every metric in `{expr}`"
                ));
            }
        }
    }
    // A name in an expression is also in the file's text: say it once.
    let mut seen = BTreeSet::new();
    problems.retain(|p| seen.insert(p.clone()));
    problems
}

fn deploy_files() -> (String, String, String) {
    (read(RULES), read(RULE_TESTS), read(DASHBOARD))
}

#[test]
fn every_metric_the_alert_rules_and_the_dashboard_name_is_one_the_daemons_emit() {
    let emitted = emitted();
    // The samples render the families this test relies on.
    for name in [
        "pgcourier_sender_slot_retained_wal_bytes",
        "pgcourier_sender_receiver_connected",
        "pgcourier_sender_compression_ratio",
        "pgcourier_receiver_link_connected",
        "pgcourier_receiver_apply_error_class",
    ] {
        assert!(
            emitted.contains_key(name),
            "the sample status renders no {name}"
        );
    }
    let (rules, rule_tests, dashboard) = deploy_files();
    let problems = check_deploy_files(&rules, &rule_tests, &dashboard, &emitted);
    assert!(problems.is_empty(), "{}", problems.join("\n"));
    let used: BTreeSet<String> = [&rules, &rule_tests, &dashboard]
        .iter()
        .flat_map(|t| uses(t))
        .map(|u| u.name)
        .collect();
    eprintln!(
        "{} of the {} metric families the daemons emit are used by the deploy files",
        used.len(),
        emitted.len()
    );
}

/// The checker above can fail: a copy of each file with one thing broken.
#[test]
fn a_bogus_metric_a_missing_label_or_a_gauge_under_rate_in_a_deploy_file_is_caught() {
    let emitted = emitted();
    let (rules, rule_tests, dashboard) = deploy_files();
    let lag = "pgcourier_sender_receiver_lag_seconds > 900";
    assert!(rules.contains(lag), "the rules have the lag alert");
    let broken = [
        (
            rules.replace(lag, "pgcourier_sender_receiver_lag_secs > 900"),
            rule_tests.clone(),
            dashboard.clone(),
            "pgcourier_sender_receiver_lag_secs is not a metric",
        ),
        (
            rules.replace(lag, "pgcourier_sender_spool_bytes{receiver=\"b\"} > 900"),
            rule_tests.clone(),
            dashboard.clone(),
            "pgcourier_sender_spool_bytes has no label receiver",
        ),
        (
            rules.replace(lag, "rate(pgcourier_sender_spool_bytes[5m]) > 900"),
            rule_tests.clone(),
            dashboard.clone(),
            "rate(pgcourier_sender_spool_bytes) on a gauge",
        ),
        (
            rules.replace(lag, "pgcourier_sender_resent_bytes_total > 900"),
            rule_tests.clone(),
            dashboard.clone(),
            "the counter pgcourier_sender_resent_bytes_total is read without rate",
        ),
        (
            rules.clone(),
            rule_tests.replace(
                "pgcourier_receiver_inbox_full{",
                "pgcourier_receiver_inbox_is_full{",
            ),
            dashboard.clone(),
            "pgcourier_receiver_inbox_is_full is not a metric",
        ),
        (
            rules.clone(),
            rule_tests.clone(),
            dashboard.replace(
                "pgcourier_sender_receiver_rtt_seconds{",
                "pgcourier_sender_receiver_rtt_ms{",
            ),
            "pgcourier_sender_receiver_rtt_ms is not a metric",
        ),
        (
            rules.clone(),
            rule_tests.clone(),
            dashboard.replace(
                "pgcourier_sender_receiver_lag_seconds{instance=~\\\"$sender\\\"}, receiver)",
                "pgcourier_sender_spool_bytes{instance=~\\\"$sender\\\"}, receiver)",
            ),
            "label_values of pgcourier_sender_spool_bytes: it has no label receiver",
        ),
    ];
    for (rules, rule_tests, dashboard, expected) in broken {
        let problems = check_deploy_files(&rules, &rule_tests, &dashboard, &emitted);
        assert!(
            problems.iter().any(|p| p.contains(expected)),
            "expected a problem containing {expected:?}, got {problems:#?}"
        );
    }
}

/// Each alert block of the rule file: (name, its lines).
fn alert_blocks(rules: &str) -> Vec<(String, String)> {
    let mut blocks: Vec<(String, String)> = Vec::new();
    for line in rules.lines() {
        let t = line.trim_start();
        if let Some(name) = t.strip_prefix("- alert:") {
            blocks.push((name.trim().to_owned(), String::new()));
        } else if t.starts_with("- name:") || t.starts_with("- record:") {
            blocks.push((String::new(), String::new()));
        } else if let Some((_, body)) = blocks.last_mut() {
            body.push_str(line);
            body.push('\n');
        }
    }
    blocks.retain(|(name, _)| !name.is_empty());
    blocks
}

#[test]
fn every_alert_has_for_a_severity_a_summary_a_description_and_a_runbook_in_the_docs() {
    let rules = read(RULES);
    let docs = read(OPERATIONS);
    let blocks = alert_blocks(&rules);
    assert!(blocks.len() >= 10, "alerts in {RULES}: {}", blocks.len());
    let mut problems = Vec::new();
    for (name, body) in &blocks {
        for key in ["expr", "for", "summary", "description", "runbook"] {
            if yaml_values(body, key).iter().all(|v| v.is_empty()) {
                problems.push(format!("{name}: no {key}"));
            }
        }
        match yaml_values(body, "severity").as_slice() {
            [s] if ["critical", "warning", "info"].contains(&s.as_str()) => {}
            other => problems.push(format!("{name}: severity {other:?}")),
        }
        if !docs.contains(&format!("**{name}**")) {
            problems.push(format!(
                "{name}: not described in {OPERATIONS} (as **{name}**)"
            ));
        }
        if !yaml_values(body, "runbook")
            .iter()
            .any(|r| r.contains(OPERATIONS) && r.contains(name.as_str()))
        {
            problems.push(format!(
                "{name}: its runbook does not name {OPERATIONS} and it"
            ));
        }
    }
    assert!(problems.is_empty(), "{}", problems.join("\n"));
}

#[test]
fn every_alert_fires_in_one_promtool_unit_test_and_stays_silent_in_another() {
    let rules = read(RULES);
    let tests = read(RULE_TESTS);
    // alertname -> (cases where it fires, cases where it must not)
    let mut cases: BTreeMap<String, (usize, usize)> = BTreeMap::new();
    let lines: Vec<&str> = tests.lines().collect();
    for (i, line) in lines.iter().enumerate() {
        let Some(name) = line.trim_start().strip_prefix("alertname:") else {
            continue;
        };
        let next = lines[i + 1..]
            .iter()
            .map(|l| l.trim())
            .find(|l| !l.is_empty() && !l.starts_with('#'))
            .unwrap_or_default();
        let entry = cases.entry(name.trim().to_owned()).or_default();
        match next {
            "exp_alerts: []" => entry.1 += 1,
            "exp_alerts:" => entry.0 += 1,
            other => panic!("{RULE_TESTS}: after alertname {name}: {other}"),
        }
    }
    let mut problems = Vec::new();
    for (name, _) in alert_blocks(&rules) {
        match cases.get(&name) {
            Some((fires, silent)) if *fires > 0 && *silent > 0 => {}
            other => problems.push(format!(
                "{name}: (firing, silent) cases in {RULE_TESTS}: {other:?}"
            )),
        }
    }
    assert!(problems.is_empty(), "{}", problems.join("\n"));
}

/// promtool from PATH; the tests need it (scripts/install-postgres puts it
/// there with Debian's `prometheus` package).
fn promtool(args: &[&str], dir: &Path) -> String {
    let out = Command::new("promtool")
        .args(args)
        .current_dir(dir)
        .output()
        .unwrap_or_else(|e| {
            panic!(
                "run promtool: {e}; it is in Debian's package `prometheus` \
                 (scripts/install-postgres installs it)"
            )
        });
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(out.status.success(), "promtool {args:?} failed:\n{text}");
    text
}

#[test]
fn promtool_accepts_the_rules_and_every_unit_test_of_them_passes() {
    let dir = repo().join("deploy/prometheus");
    let checked = promtool(&["check", "rules", "pgcourier-alerts.yml"], &dir);
    assert!(checked.contains("SUCCESS"), "{checked}");
    let tested = promtool(&["test", "rules", "pgcourier-alerts.test.yml"], &dir);
    assert!(tested.contains("SUCCESS"), "{tested}");
    eprintln!("{checked}{tested}");
}

#[test]
fn promtool_parses_every_dashboard_query() {
    let dashboard: Value = serde_json::from_str(&read(DASHBOARD)).expect("dashboard JSON");
    // Each query as a recording rule, with the dashboard's variables given
    // values as Grafana would.
    let mut rules = String::from("groups:\n  - name: dashboard\n    rules:\n");
    let queries = dashboard_queries(&dashboard);
    for (i, (_, expr, _)) in queries.iter().enumerate() {
        let expr = expr
            .replace("$__rate_interval", "5m")
            .replace("$__range", "1h")
            .replace("$sender", ".*")
            .replace("$receiver", ".*")
            .replace("$branch", ".*");
        assert!(!expr.contains('$'), "a variable left in {expr}");
        rules.push_str(&format!(
            "      - record: dashboard:query_{i}\n        expr: {}\n",
            serde_json::to_string(&expr).expect("a JSON string")
        ));
    }
    let dir = tempfile::tempdir().expect("temp dir");
    std::fs::write(dir.path().join("dashboard.yml"), rules).expect("write rules");
    let checked = promtool(&["check", "rules", "dashboard.yml"], dir.path());
    assert!(
        checked.contains(&format!("SUCCESS: {} rules found", queries.len())),
        "{checked}"
    );
}

#[test]
fn the_dashboard_has_its_variables_and_every_panel_reads_the_datasource_variable() {
    let dashboard: Value = serde_json::from_str(&read(DASHBOARD)).expect("dashboard JSON");
    assert!(dashboard["schemaVersion"].as_u64() >= Some(36));
    assert_eq!(dashboard["uid"], "pgcourier");
    let vars = dashboard["templating"]["list"]
        .as_array()
        .expect("variables");
    let var = |name: &str| {
        vars.iter()
            .find(|v| v["name"] == name)
            .unwrap_or_else(|| panic!("no variable {name}"))
    };
    assert_eq!(var("datasource")["type"], "datasource");
    assert_eq!(var("datasource")["query"], "prometheus");
    for (name, label) in [
        ("sender", "instance"),
        ("receiver", "receiver"),
        ("branch", "instance"),
    ] {
        let v = var(name);
        assert_eq!(v["type"], "query", "{name}");
        let q = v["query"]["query"].as_str().expect("query");
        assert!(
            q.starts_with("label_values(") && q.ends_with(&format!(", {label})")),
            "{name}: {q}"
        );
        assert_eq!(v["definition"], q, "{name}");
    }
    let ds = json!({"type": "prometheus", "uid": "${datasource}"});
    let mut ids = BTreeSet::new();
    let mut cells: Vec<(u64, u64, u64, u64, String)> = Vec::new();
    let mut exprs = String::new();
    for panel in dashboard["panels"].as_array().expect("panels") {
        let title = panel["title"].as_str().expect("title").to_owned();
        assert!(
            ids.insert(panel["id"].as_u64().expect("id")),
            "id of {title}"
        );
        let g = &panel["gridPos"];
        let (x, y, w, h) = (
            g["x"].as_u64().expect("x"),
            g["y"].as_u64().expect("y"),
            g["w"].as_u64().expect("w"),
            g["h"].as_u64().expect("h"),
        );
        assert!(x + w <= 24 && w > 0 && h > 0, "gridPos of {title}");
        for (cx, cy, cw, ch, other) in &cells {
            let overlap = x < cx + cw && *cx < x + w && y < cy + ch && *cy < y + h;
            assert!(!overlap, "{title} overlaps {other}");
        }
        cells.push((x, y, w, h, title.clone()));
        if panel["type"] == "row" {
            continue;
        }
        assert_eq!(panel["datasource"], ds, "datasource of {title}");
        let targets = panel["targets"].as_array().expect("targets");
        assert!(!targets.is_empty(), "{title} has no query");
        let mut refs = BTreeSet::new();
        for t in targets {
            assert_eq!(t["datasource"], ds, "datasource of a query of {title}");
            assert!(
                refs.insert(t["refId"].as_str().expect("refId")),
                "refId in {title}"
            );
            let expr = t["expr"].as_str().expect("expr");
            assert!(!expr.is_empty(), "empty query in {title}");
            exprs.push_str(expr);
            exprs.push('\n');
        }
    }
    // What the dashboard is for: each of these is plotted.
    for name in [
        "pgcourier_sender_receiver_lag_seconds",
        "pgcourier_sender_receiver_records_behind",
        "pgcourier_sender_receiver_bytes_behind",
        "pgcourier_sender_receiver_throughput_bytes_per_second",
        "pgcourier_sender_receiver_connected",
        "pgcourier_sender_receiver_rtt_seconds",
        "pgcourier_sender_receiver_in_flight_bytes",
        "pgcourier_sender_spool_bytes",
        "pgcourier_receiver_inbox_bytes",
        "pgcourier_sender_slot_retained_wal_bytes",
        "pgcourier_receiver_applied_transactions_total",
        "pgcourier_sender_receiver_tcp",
        "pgcourier_sender_receiver_tcp_fallback",
        "pgcourier_sender_resent_bytes_total",
        "pgcourier_sender_compression_ratio",
        "pgcourier_receiver_apply_lag_seconds",
        "pgcourier_receiver_link_connected",
    ] {
        assert!(
            uses(&exprs).iter().any(|u| u.name == name),
            "no panel plots {name}"
        );
    }
}

/// Both daemons' `/metrics` (every family, for a status with every part
/// present) pass `promtool check metrics`: the text format and
/// Prometheus's naming rules (a counter ends in `_total`, units in base
/// units), with the build and the process families there.
#[test]
fn promtool_accepts_the_metrics_of_both_daemons() {
    for (who, text) in [
        (
            "sender",
            pgcourier_sender::admin::metrics(&full_sender_status()),
        ),
        (
            "receiver",
            pgcourier_receiver::admin::metrics(&full_receiver_status()),
        ),
    ] {
        for family in [
            format!(
                "pgcourier_{who}_build_info{{version=\"{}\"}} 1",
                env!("CARGO_PKG_VERSION")
            ),
            "process_resident_memory_bytes ".to_string(),
            "process_cpu_seconds_total ".to_string(),
        ] {
            assert!(text.contains(&family), "{who}: no {family:?} in:\n{text}");
        }
        let mut child = Command::new("promtool")
            .args(["check", "metrics"])
            .stdin(std::process::Stdio::piped())
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::piped())
            .spawn()
            .expect("run promtool (Debian's package `prometheus`, installed by scripts/install-postgres)");
        use std::io::Write;
        child
            .stdin
            .take()
            .expect("promtool's stdin")
            .write_all(text.as_bytes())
            .expect("write the metrics to promtool");
        let out = child.wait_with_output().expect("promtool ends");
        assert!(
            out.status.success(),
            "{who}: promtool check metrics:\n{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
    }
}
