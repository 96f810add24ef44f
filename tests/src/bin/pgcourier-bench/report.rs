//! Figures of several runs: median, min and max per system, the ratio of
//! the medians, the target of each line and whether it is met; printed as a
//! table and written as JSON.

use serde_json::json;

/// What a line must show to pass.
#[derive(Clone, Copy, Debug)]
pub enum Target {
    /// pgcourier / PostgreSQL at least this (higher is better).
    RatioAtLeast(f64),
    /// pgcourier / PostgreSQL at most this (lower is better).
    RatioAtMost(f64),
    /// pgcourier's own figure at least this.
    AtLeast(f64),
    /// pgcourier's own figure at most this.
    AtMost(f64),
    /// Shown for information.
    None,
}

impl Target {
    fn describe(&self, unit: &str) -> String {
        match *self {
            Target::RatioAtLeast(r) => format!(">= {r}x"),
            Target::RatioAtMost(r) => format!("<= {r}x"),
            Target::AtLeast(v) => format!(">= {} {unit}", fmt_num(v)),
            Target::AtMost(v) => format!("<= {} {unit}", fmt_num(v)),
            Target::None => "-".into(),
        }
    }

    fn check(&self, ours: Option<f64>, ratio: Option<f64>) -> Option<bool> {
        match *self {
            Target::RatioAtLeast(r) => ratio.map(|x| x >= r),
            Target::RatioAtMost(r) => ratio.map(|x| x <= r),
            Target::AtLeast(v) => ours.map(|x| x >= v),
            Target::AtMost(v) => ours.map(|x| x <= v),
            Target::None => None,
        }
    }
}

#[derive(Clone, Debug, Default)]
pub struct Samples(pub Vec<f64>);

impl Samples {
    fn sorted(&self) -> Vec<f64> {
        let mut v: Vec<f64> = self.0.iter().copied().filter(|x| x.is_finite()).collect();
        v.sort_by(|a, b| a.total_cmp(b));
        v
    }

    pub fn median(&self) -> Option<f64> {
        let v = self.sorted();
        match v.len() {
            0 => None,
            n if n % 2 == 1 => Some(v[n / 2]),
            n => Some((v[n / 2 - 1] + v[n / 2]) / 2.0),
        }
    }

    fn min_max(&self) -> Option<(f64, f64)> {
        let v = self.sorted();
        Some((*v.first()?, *v.last()?))
    }

    fn json(&self) -> serde_json::Value {
        let (min, max) = self.min_max().unzip();
        json!({"median": self.median(), "min": min, "max": max, "samples": self.0})
    }
}

pub struct Line {
    pub key: String,
    pub label: String,
    pub unit: String,
    pub target: Target,
    pub ours: Samples,
    pub theirs: Samples,
    /// What PostgreSQL's column measures when it is not PostgreSQL's
    /// logical replication itself (e.g. pg_recvlogical).
    pub note: Option<String>,
}

impl Line {
    fn ratio(&self) -> Option<f64> {
        let (a, b) = (self.ours.median()?, self.theirs.median()?);
        (b != 0.0).then(|| a / b)
    }
}

/// Every line, in the order first seen.
#[derive(Default)]
pub struct Report {
    pub lines: Vec<Line>,
}

impl Report {
    /// Add one run's figures to line `key` (created on first use).
    pub fn add(
        &mut self,
        key: &str,
        label: &str,
        unit: &str,
        target: Target,
        ours: Option<f64>,
        theirs: Option<f64>,
    ) {
        let i = match self.lines.iter().position(|l| l.key == key) {
            Some(i) => i,
            None => {
                self.lines.push(Line {
                    key: key.into(),
                    label: label.into(),
                    unit: unit.into(),
                    target,
                    ours: Samples::default(),
                    theirs: Samples::default(),
                    note: None,
                });
                self.lines.len() - 1
            }
        };
        let line = &mut self.lines[i];
        if let Some(v) = ours {
            line.ours.0.push(v);
        }
        if let Some(v) = theirs {
            line.theirs.0.push(v);
        }
    }

    pub fn note(&mut self, key: &str, note: &str) {
        if let Some(l) = self.lines.iter_mut().find(|l| l.key == key) {
            l.note = Some(note.into());
        }
    }

    /// The table: one line per figure, medians with [min-max] when there
    /// were several runs.
    pub fn table(&self) -> String {
        let cell = |s: &Samples| match (s.median(), s.min_max()) {
            (Some(m), Some((lo, hi))) if s.0.len() > 1 => {
                format!("{} [{}-{}]", fmt_num(m), fmt_num(lo), fmt_num(hi))
            }
            (Some(m), _) => fmt_num(m),
            _ => "n/a".into(),
        };
        let mut rows = vec![[
            "line".to_string(),
            "unit".into(),
            "pgcourier".into(),
            "PostgreSQL".into(),
            "ratio".into(),
            "target".into(),
            "".into(),
        ]];
        for l in &self.lines {
            let ratio = l.ratio();
            let verdict = match l.target.check(l.ours.median(), ratio) {
                Some(true) => "PASS",
                Some(false) => "MISS",
                None if matches!(l.target, Target::None) => "",
                None => "n/a",
            };
            let label = match &l.note {
                Some(n) => format!("{} ({n})", l.label),
                None => l.label.clone(),
            };
            rows.push([
                label,
                l.unit.clone(),
                cell(&l.ours),
                cell(&l.theirs),
                ratio
                    .map(|r| format!("{r:.2}x"))
                    .unwrap_or_else(|| "-".into()),
                l.target.describe(&l.unit),
                verdict.into(),
            ]);
        }
        let mut widths = [0usize; 7];
        for r in &rows {
            for (w, c) in widths.iter_mut().zip(r) {
                *w = (*w).max(c.chars().count());
            }
        }
        let mut out = String::new();
        for (i, r) in rows.iter().enumerate() {
            let mut s = String::from("|");
            for (j, (w, c)) in widths.iter().zip(r).enumerate() {
                let pad = w - c.chars().count();
                if (2..=4).contains(&j) {
                    s += &format!(" {}{c} |", " ".repeat(pad));
                } else {
                    s += &format!(" {c}{} |", " ".repeat(pad));
                }
            }
            out += s.trim_end();
            out.push('\n');
            if i == 0 {
                let mut sep = String::from("|");
                for (j, w) in widths.iter().enumerate() {
                    let dashes = "-".repeat(w + 1);
                    sep += &if (2..=4).contains(&j) {
                        format!("{dashes}:|")
                    } else {
                        format!("{dashes}-|")
                    };
                }
                out += &sep;
                out.push('\n');
            }
        }
        out
    }

    pub fn json(&self, header: serde_json::Value) -> serde_json::Value {
        let lines: Vec<_> = self
            .lines
            .iter()
            .map(|l| {
                let ratio = l.ratio();
                json!({
                    "key": l.key,
                    "label": l.label,
                    "unit": l.unit,
                    "note": l.note,
                    "pgcourier": l.ours.json(),
                    "postgresql": l.theirs.json(),
                    "ratio": ratio,
                    "target": l.target.describe(&l.unit),
                    "pass": l.target.check(l.ours.median(), ratio),
                })
            })
            .collect();
        json!({"run": header, "lines": lines})
    }
}

/// Numbers as a reader wants them: thousands separated, 3 significant
/// digits below 100.
pub fn fmt_num(v: f64) -> String {
    if !v.is_finite() {
        return "n/a".into();
    }
    let a = v.abs();
    if a >= 1000.0 {
        let s = format!("{:.0}", a);
        let mut out = String::new();
        for (i, ch) in s.chars().enumerate() {
            if i > 0 && (s.len() - i) % 3 == 0 {
                out.push(',');
            }
            out.push(ch);
        }
        if v < 0.0 {
            out.insert(0, '-');
        }
        out
    } else if a >= 100.0 {
        format!("{v:.0}")
    } else if a >= 10.0 {
        format!("{v:.1}")
    } else {
        format!("{v:.2}")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn medians_ignore_missing_runs_and_ratios_use_medians() {
        let mut r = Report::default();
        r.add(
            "k",
            "l",
            "txn/s",
            Target::RatioAtLeast(2.0),
            Some(30.0),
            Some(10.0),
        );
        r.add(
            "k",
            "l",
            "txn/s",
            Target::RatioAtLeast(2.0),
            Some(10.0),
            None,
        );
        r.add(
            "k",
            "l",
            "txn/s",
            Target::RatioAtLeast(2.0),
            Some(20.0),
            Some(20.0),
        );
        let l = &r.lines[0];
        assert_eq!(l.ours.median(), Some(20.0));
        assert_eq!(l.theirs.median(), Some(15.0));
        assert!(r.table().contains("1.33x"));
        assert!(r.table().contains("MISS"));
        assert_eq!(fmt_num(1234567.0), "1,234,567");
        assert_eq!(fmt_num(1.23456), "1.23");
    }
}
