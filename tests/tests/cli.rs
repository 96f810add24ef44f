//! The command lines' manners, on the built binaries: a value outside an
//! option's set is refused by clap (exit 2), `PGCOURIER_CONFIG` stands in
//! for `--config`, every `--help` ends with an example, and man pages and
//! shell completions come out of the same definitions. No database needed.

use std::path::Path;
use std::process::{Command, Output};

use pgcourier_tests::{bin_path, workdir};

const BINARIES: [&str; 3] = ["pgcourier-sender", "pgcourier-receiver", "pgcourier-queue"];

fn run(bin: &str, args: &[&str], env: &[(&str, &str)]) -> Output {
    let mut cmd = Command::new(bin_path(bin));
    cmd.args(args).env_remove("PGCOURIER_CONFIG");
    for (k, v) in env {
        cmd.env(k, v);
    }
    cmd.output()
        .unwrap_or_else(|e| panic!("run {bin} {args:?}: {e}"))
}

fn text(out: &Output) -> String {
    format!(
        "status {}\nstdout:\n{}\nstderr:\n{}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    )
}

#[test]
fn a_typo_in_a_fixed_set_option_is_refused_with_exit_2() {
    for (bin, args) in [
        (
            "pgcourier-sender",
            &["run", "--config", "x.toml", "--log-format", "jsno"][..],
        ),
        (
            "pgcourier-receiver",
            &["run", "--config", "x.toml", "--log-format", "jsno"][..],
        ),
        (
            "pgcourier-queue",
            &["--config", "x.toml", "show", "1", "--format", "jsno"][..],
        ),
    ] {
        let out = run(bin, args, &[]);
        let all = text(&out);
        assert_eq!(out.status.code(), Some(2), "{bin} {args:?}: {all}");
        assert!(
            all.contains("invalid value 'jsno'") && all.contains("json"),
            "{bin} {args:?} should name the bad value and the possible ones: {all}"
        );
    }
}

#[test]
fn pgcourier_config_stands_in_for_config_and_its_path_is_named_in_the_error() {
    let dir = workdir("cli-env");
    let missing = dir.path().join("from-the-environment.toml");
    let missing = missing.to_str().expect("utf-8 path");
    for (bin, args, code) in [
        ("pgcourier-sender", &["check"][..], 2),
        ("pgcourier-sender", &["run"][..], 2),
        (
            "pgcourier-sender",
            &["seed", "export", "--out", "x.seed"][..],
            2,
        ),
        ("pgcourier-receiver", &["run"][..], 2),
        ("pgcourier-receiver", &["seed", "import", "x.seed"][..], 2),
        ("pgcourier-queue", &["status"][..], 1),
    ] {
        let out = run(bin, args, &[("PGCOURIER_CONFIG", missing)]);
        let all = text(&out);
        assert_eq!(out.status.code(), Some(code), "{bin} {args:?}: {all}");
        assert!(
            String::from_utf8_lossy(&out.stderr).contains(missing),
            "{bin} {args:?} should name {missing} from PGCOURIER_CONFIG: {all}"
        );
    }
    // --config wins over the environment.
    let flag = dir.path().join("from-the-flag.toml");
    let flag = flag.to_str().expect("utf-8 path");
    let out = run(
        "pgcourier-sender",
        &["check", "--config", flag],
        &[("PGCOURIER_CONFIG", missing)],
    );
    assert!(
        String::from_utf8_lossy(&out.stderr).contains(flag),
        "{}",
        text(&out)
    );
}

/// Every command and subcommand, as the words after the binary.
fn commands(bin: &str) -> Vec<Vec<&'static str>> {
    let mut all: Vec<Vec<&str>> = vec![vec![]];
    let subs: &[&[&str]] = match bin {
        "pgcourier-sender" => &[
            &["run"],
            &["check"],
            &["init"],
            &["keygen"],
            &["seed"],
            &["seed", "export"],
        ],
        "pgcourier-receiver" => &[
            &["run"],
            &["init"],
            &["keygen"],
            &["seed"],
            &["seed", "import"],
        ],
        _ => &[&["status"], &["list"], &["show"], &["watch"], &["skip"]],
    };
    all.extend(subs.iter().map(|s| s.to_vec()));
    all
}

#[test]
fn the_help_of_every_command_ends_with_an_example() {
    for bin in BINARIES {
        for words in commands(bin) {
            for flag in ["-h", "--help"] {
                let mut args = words.clone();
                args.push(flag);
                let out = run(bin, &args, &[]);
                let all = text(&out);
                assert_eq!(out.status.code(), Some(0), "{bin} {args:?}: {all}");
                let stdout = String::from_utf8_lossy(&out.stdout);
                let lines: Vec<&str> = stdout.trim_end().lines().collect();
                let heading = lines
                    .iter()
                    .rposition(|l| l.starts_with("Example"))
                    .unwrap_or_else(|| panic!("{bin} {args:?}: no example: {all}"));
                let examples = &lines[heading + 1..];
                assert!(
                    !examples.is_empty()
                        && examples.iter().all(|l| l.trim_start().starts_with(bin)
                            || l.trim_start().starts_with("sudo -u pgcourier")),
                    "{bin} {args:?}: the help should end with example command lines: {all}"
                );
                let first = words.first().copied().unwrap_or("");
                assert!(
                    examples.iter().any(|l| l.contains(first)),
                    "{bin} {args:?}: the example should use {first:?}: {all}"
                );
            }
        }
    }
}

fn files_in(dir: &Path) -> Vec<String> {
    let mut names: Vec<String> = std::fs::read_dir(dir)
        .expect("read generated dir")
        .map(|e| {
            e.expect("dir entry")
                .file_name()
                .to_string_lossy()
                .into_owned()
        })
        .collect();
    names.sort();
    names
}

#[test]
fn man_pages_and_completions_are_generated_from_the_command_lines() {
    let dir = workdir("cli-generate");
    for bin in BINARIES {
        let man = dir.path().join(bin).join("man");
        let out = run(bin, &["generate", "man", man.to_str().expect("utf-8")], &[]);
        assert_eq!(out.status.code(), Some(0), "{}", text(&out));
        let pages = files_in(&man);
        for words in commands(bin) {
            let page = std::iter::once(bin)
                .chain(words.iter().copied())
                .collect::<Vec<_>>()
                .join("-")
                + ".1";
            assert!(pages.contains(&page), "{bin}: no {page} in {pages:?}");
            let roff = std::fs::read_to_string(man.join(&page)).expect("read page");
            assert!(
                roff.starts_with(".ie") || roff.contains(".TH"),
                "{page} is not a man page: {roff}"
            );
            assert!(roff.contains("Example"), "{page} lacks the example: {roff}");
        }
        assert!(
            !pages.iter().any(|p| p.contains("generate")),
            "{bin}: the generate command has a man page: {pages:?}"
        );
        let comp = dir.path().join(bin).join("completions");
        for (shell, file) in [
            ("bash", bin.to_string()),
            ("zsh", format!("_{bin}")),
            ("fish", format!("{bin}.fish")),
        ] {
            let out = run(
                bin,
                &[
                    "generate",
                    "completions",
                    shell,
                    comp.to_str().expect("utf-8"),
                ],
                &[],
            );
            assert_eq!(out.status.code(), Some(0), "{}", text(&out));
            let script = std::fs::read_to_string(comp.join(&file))
                .unwrap_or_else(|e| panic!("{bin} {shell}: read {file}: {e}; {}", text(&out)));
            assert!(
                script.contains(bin) && script.contains("config"),
                "{bin} {shell}: {script}"
            );
            assert!(
                !script.contains("generate"),
                "{bin} {shell}: completions offer the generate command: {script}"
            );
        }
    }
    let out = run(
        "pgcourier-sender",
        &["generate", "completions", "tcsh", "x"],
        &[],
    );
    assert_eq!(out.status.code(), Some(2), "{}", text(&out));
}

/// In `--log-format json` every line on stderr is a JSON object, the
/// error the daemon stops on included: a config that does not load (exit
/// 2) and a receiver whose certificate files are missing (exit 2, from
/// `run`).
#[test]
fn in_json_mode_the_log_is_json_to_the_end_the_fatal_error_included() {
    let dir = workdir("cli-json");
    let bad = dir.path().join("bad.toml");
    std::fs::write(&bad, "this is = not toml [").expect("write bad.toml");
    let no_cert = dir.path().join("receiver.toml");
    let missing_cert = dir.path().join("missing.crt");
    std::fs::write(
        &no_cert,
        format!(
            "target = \"host=/nonexistent dbname=x\"\ninbox-dir = \"{}\"\ncert = \"{}\"\nkey = \"{}\"\n\
             listen = \"127.0.0.1:0\"\nsender-fingerprints = [\"{}\"]\n",
            dir.path().join("inbox").display(),
            missing_cert.display(),
            dir.path().join("missing.key").display(),
            "ab".repeat(32)
        ),
    )
    .expect("write receiver.toml");
    for (bin, config, named) in [
        ("pgcourier-sender", &bad, bad.display().to_string()),
        ("pgcourier-receiver", &bad, bad.display().to_string()),
        (
            "pgcourier-receiver",
            &no_cert,
            missing_cert.display().to_string(),
        ),
    ] {
        let out = run(
            bin,
            &[
                "run",
                "--config",
                config.to_str().expect("utf-8"),
                "--log-format",
                "json",
            ],
            &[],
        );
        let all = text(&out);
        assert_eq!(out.status.code(), Some(2), "{bin}: {all}");
        let stderr = String::from_utf8_lossy(&out.stderr);
        let lines: Vec<serde_json::Value> = stderr
            .lines()
            .map(|l| {
                serde_json::from_str(l).unwrap_or_else(|e| {
                    panic!("{bin}: a line that is not JSON ({e}): {l:?}\n{all}")
                })
            })
            .collect();
        let last = lines
            .last()
            .unwrap_or_else(|| panic!("{bin}: no log: {all}"));
        assert_eq!(last["level"], "ERROR", "{bin}: {all}");
        let error = last["fields"]["error"].as_str().unwrap_or_default();
        assert!(
            error.contains(&named),
            "{bin}: the fatal line should name {named}: {all}"
        );
    }
}
