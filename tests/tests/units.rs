//! The systemd units in `deploy/systemd/`: `systemd-analyze verify` finds
//! nothing to say about them (with `ExecStart` pointed at the binaries just
//! built: it checks that the command exists), they are `Type=notify` with a
//! watchdog and do not restart on the exit codes that mean an operator must
//! act, and the example configs keep their state where the units let the
//! daemons write. The installed package is checked the same way by
//! `scripts/package --check` (man pages included).

use std::path::{Path, PathBuf};
use std::process::Command;

use pgcourier_tests::{bin_path, workdir};

const UNITS: [(&str, &str, &str); 2] = [
    (
        "pgcourier-sender.service",
        "pgcourier-sender.service",
        "pgcourier-sender",
    ),
    (
        "pgcourier-receiver@.service",
        "pgcourier-receiver@branch1.service",
        "pgcourier-receiver",
    ),
];

fn repo() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("workspace root")
        .to_path_buf()
}

fn unit_text(file: &str) -> String {
    let path = repo().join("deploy/systemd").join(file);
    std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("read {}: {e}", path.display()))
}

/// The values of `key=` in the unit, in order.
fn values<'a>(unit: &'a str, key: &str) -> Vec<&'a str> {
    unit.lines()
        .filter_map(|l| l.strip_prefix(key)?.strip_prefix('='))
        .collect()
}

#[test]
fn systemd_analyze_verify_passes_on_the_units() {
    let dir = workdir("units");
    for (file, instance, bin) in UNITS {
        let unit = unit_text(file);
        let exec = format!("ExecStart=/usr/bin/{bin} ");
        assert!(unit.contains(&exec), "{file}: no {exec}");
        let built = bin_path(bin);
        std::fs::write(
            dir.path().join(file),
            unit.replace(&exec, &format!("ExecStart={} ", built.display())),
        )
        .expect("write unit copy");
        let out = Command::new("systemd-analyze")
            .args(["verify", "--man=no"])
            .arg(dir.path().join(instance))
            .output()
            .expect("run systemd-analyze (Debian: apt-get install systemd)");
        let said = format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        assert!(
            out.status.success() && said.trim().is_empty(),
            "systemd-analyze verify {instance}: {}\n{said}",
            out.status
        );
    }
}

#[test]
fn the_units_notify_keep_a_watchdog_and_do_not_restart_on_definite_errors() {
    for (file, _, bin) in UNITS {
        let unit = unit_text(file);
        for (key, want) in [
            ("Type", "notify"),
            ("WatchdogSec", "30s"),
            ("Restart", "on-failure"),
            ("User", "pgcourier"),
            ("Group", "pgcourier"),
            ("ReadWritePaths", "/var/lib/pgcourier"),
            ("ProtectSystem", "strict"),
            ("UMask", "0077"),
        ] {
            assert_eq!(values(&unit, key), [want], "{file}: {key}");
        }
        let prevent = values(&unit, "RestartPreventExitStatus");
        let codes: Vec<&str> = prevent.iter().flat_map(|v| v.split_whitespace()).collect();
        assert!(
            codes.contains(&"2") && codes.contains(&"3") && !codes.contains(&"1"),
            "{file}: RestartPreventExitStatus {prevent:?}: 2 (bad input) and 3 (an operator must act), not 1"
        );
        let config = if bin == "pgcourier-sender" {
            "/etc/pgcourier/sender.toml"
        } else {
            "/etc/pgcourier/receiver-%i.toml"
        };
        assert_eq!(
            values(&unit, "ExecStart"),
            [format!("/usr/bin/{bin} run --config {config}").as_str()],
            "{file}"
        );
    }
}

#[test]
fn the_example_configs_keep_their_state_where_the_units_may_write() {
    let runtime = [
        (
            "sender.toml",
            "pgcourier-sender.service",
            "spool-dir",
            "sender",
        ),
        (
            "receiver.toml",
            "pgcourier-receiver@.service",
            "inbox-dir",
            "branch1",
        ),
    ];
    for (example, file, dir_key, instance) in runtime {
        let text =
            std::fs::read_to_string(repo().join("examples").join(example)).expect("read example");
        let unit = unit_text(file);
        let writable = values(&unit, "ReadWritePaths");
        let run_dir = format!(
            "/run/{}/",
            values(&unit, "RuntimeDirectory")[0].replace("%i", instance)
        );
        let setting = |key: &str, commented: bool| -> String {
            let prefix = if commented { "# " } else { "" };
            text.lines()
                .find_map(|l| {
                    let rest = l.strip_prefix(prefix)?.strip_prefix(key)?;
                    let value = rest.trim_start().strip_prefix('=')?.trim_start();
                    Some(value.split('"').nth(1)?.to_string())
                })
                .unwrap_or_else(|| panic!("{example}: no {prefix}{key}"))
        };
        let state = setting(dir_key, false);
        assert!(
            writable.iter().any(|w| state.starts_with(&format!("{w}/"))),
            "{example}: {dir_key} {state} is not under {file}'s ReadWritePaths {writable:?}"
        );
        let socket = setting("admin-socket", true);
        assert!(
            socket.starts_with(&run_dir),
            "{example}: the admin-socket example {socket} is not under {run_dir}"
        );
        if instance == "branch1" {
            assert!(
                state.contains("/branch1/"),
                "{example}: one inbox per instance: {state}"
            );
        }
    }
}
