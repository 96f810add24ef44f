//! What an operator sees and does: the loopback admin endpoint, logging and
//! signals, systemd's readiness and watchdog, the command lines' shared parts
//! (log format, man pages, completions), retry backoff with one log line per
//! fault, progress bars, and the rendering of records for the queue CLI.

pub mod admin;
pub mod backoff;
pub mod cli;
pub mod init;
pub mod inspect;
pub mod local_time;
pub mod logging;
pub mod progress;
pub mod systemd;
