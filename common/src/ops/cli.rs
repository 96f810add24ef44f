//! What the three command lines (`pgcourier-sender`, `pgcourier-receiver`,
//! `pgcourier-queue`) share: the log format, the environment variable that
//! names the config, and the `generate` command that writes man pages and
//! shell completions from the same clap definitions (`scripts/package` calls
//! it for the Debian package). `generate` is parsed apart from each binary's
//! own command line, before it ([`generate_if_asked`]), so that neither its
//! help, its man pages nor its completions offer it.

use std::path::{Path, PathBuf};
use std::process::ExitCode;

use anyhow::Context;

/// The environment variable `--config` defaults to, in every command that
/// takes a config.
pub const CONFIG_ENV: &str = "PGCOURIER_CONFIG";

/// The environment variable for a receiver's `--peer` (its section of a
/// site file): the unit `pgcourier-receiver@<peer>` sets it.
pub const PEER_ENV: &str = "PGCOURIER_PEER";

/// How a daemon logs to stderr.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, clap::ValueEnum)]
pub enum LogFormat {
    /// A line per event, for a person (coloured on a terminal).
    #[default]
    Human,
    /// A JSON object per line, for a log shipper.
    Json,
}

/// `<binary> generate man DIR` or `<binary> generate completions SHELL DIR`.
#[derive(Debug, clap::Parser)]
#[command(no_binary_name = true)]
struct GenerateArgs {
    #[command(subcommand)]
    what: Generate,
}

#[derive(Debug, clap::Subcommand)]
enum Generate {
    /// Write a man page for the command and one for each subcommand into DIR.
    Man { dir: PathBuf },
    /// Write the completion script for SHELL into DIR, under the name that
    /// shell's completion directory expects (bash: the command's name; zsh:
    /// `_` and the name; fish: the name and `.fish`).
    Completions {
        #[arg(value_enum)]
        shell: clap_complete::Shell,
        dir: PathBuf,
    },
}

/// When the first argument is `generate`: write what the rest asks for
/// (man pages or completions of the command line `cmd`), print the files
/// written, one a line, and return the exit code (0; 1 with the error; 2
/// for bad arguments, from clap). `None` otherwise: parse the command line
/// as usual.
pub fn generate_if_asked(cmd: impl FnOnce() -> clap::Command) -> Option<ExitCode> {
    let mut args = std::env::args_os().skip(1);
    if args.next().is_none_or(|a| a != "generate") {
        return None;
    }
    let what = match <GenerateArgs as clap::Parser>::try_parse_from(args) {
        Ok(g) => g.what,
        Err(e) => {
            let _ = e.print();
            return Some(ExitCode::from(if e.use_stderr() { 2 } else { 0 }));
        }
    };
    Some(generate(cmd(), &what))
}

fn generate(cmd: clap::Command, what: &Generate) -> ExitCode {
    let name = cmd.get_name().to_string();
    let written = match what {
        Generate::Man { dir } => man_pages(cmd, dir),
        Generate::Completions { shell, dir } => completions(cmd, *shell, dir),
    };
    match written {
        Ok(paths) => {
            for p in paths {
                println!("{}", p.display());
            }
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("{name}: {e:#}");
            ExitCode::from(1)
        }
    }
}

/// `<name>.1` for the command and `<name>-<sub>.1` for each visible
/// subcommand, at every depth (clap_mangen's names); returns them sorted.
fn man_pages(cmd: clap::Command, dir: &Path) -> anyhow::Result<Vec<PathBuf>> {
    std::fs::create_dir_all(dir).with_context(|| format!("create {}", dir.display()))?;
    let name = cmd.get_name().to_string();
    clap_mangen::generate_to(cmd, dir)
        .with_context(|| format!("write man pages into {}", dir.display()))?;
    let mut pages = Vec::new();
    for entry in std::fs::read_dir(dir).with_context(|| format!("read {}", dir.display()))? {
        let path = entry
            .with_context(|| format!("read {}", dir.display()))?
            .path();
        let file = path.file_name().unwrap_or_default().to_string_lossy();
        if file.starts_with(&name) && file.ends_with(".1") {
            pages.push(path);
        }
    }
    pages.sort();
    Ok(pages)
}

fn completions(
    cmd: clap::Command,
    shell: clap_complete::Shell,
    dir: &Path,
) -> anyhow::Result<Vec<PathBuf>> {
    use clap_complete::Shell;
    std::fs::create_dir_all(dir).with_context(|| format!("create {}", dir.display()))?;
    let mut cmd = cmd;
    let name = cmd.get_name().to_string();
    let file = match shell {
        Shell::Bash => name.clone(),
        Shell::Zsh => format!("_{name}"),
        Shell::Fish => format!("{name}.fish"),
        Shell::Elvish => format!("{name}.elv"),
        Shell::PowerShell => format!("_{name}.ps1"),
        other => format!("{name}.{other}"),
    };
    let mut out = Vec::new();
    clap_complete::generate(shell, &mut cmd, &name, &mut out);
    let path = dir.join(file);
    std::fs::write(&path, out).with_context(|| format!("write {}", path.display()))?;
    Ok(vec![path])
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::{CommandFactory, Parser, Subcommand};

    /// A command line shaped like the daemons'.
    #[derive(Parser)]
    #[command(
        name = "pgcourier-example",
        version,
        after_help = "Example:\n  pgcourier-example run"
    )]
    struct Cli {
        #[command(subcommand)]
        command: Command,
    }

    #[derive(Subcommand)]
    enum Command {
        /// Run it.
        Run {
            #[arg(long, env = CONFIG_ENV)]
            config: PathBuf,
            #[arg(long, value_enum, default_value_t)]
            log_format: LogFormat,
        },
    }

    #[test]
    fn man_pages_cover_each_visible_subcommand_and_are_not_empty() {
        let dir = tempfile::tempdir().expect("tempdir");
        let written = man_pages(Cli::command(), dir.path()).expect("man pages");
        let names: Vec<String> = written
            .iter()
            .map(|p| p.file_name().unwrap().to_string_lossy().into_owned())
            .collect();
        assert_eq!(names, ["pgcourier-example-run.1", "pgcourier-example.1"]);
        let run = std::fs::read_to_string(&written[0]).expect("read page");
        assert!(run.contains("log\\-format"), "{run}");
        assert!(run.contains("PGCOURIER_CONFIG"), "{run}");
    }

    #[test]
    fn completions_are_written_under_the_names_the_shells_look_for() {
        let dir = tempfile::tempdir().expect("tempdir");
        for (shell, file) in [
            (clap_complete::Shell::Bash, "pgcourier-example"),
            (clap_complete::Shell::Zsh, "_pgcourier-example"),
            (clap_complete::Shell::Fish, "pgcourier-example.fish"),
        ] {
            let written = completions(Cli::command(), shell, dir.path()).expect("completions");
            assert_eq!(written, [dir.path().join(file)]);
            let text = std::fs::read_to_string(&written[0]).expect("read script");
            assert!(text.contains("log-format"), "{shell}: {text}");
        }
    }
}
