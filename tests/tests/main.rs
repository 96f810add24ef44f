//! The single end-to-end test binary (`e2e`) of pgcourier.
//!
//! Each module below is one area of tests; they all use the harness in
//! `pgcourier_tests` (tests/src/lib.rs). Tests run in parallel: every test
//! starts its own clusters, daemons and work directories.

mod apply_sets;
mod bad_input;
mod budget;
mod cli;
mod copy;
mod ddl;
mod faults;
mod fixture;
mod harness_selftest;
mod init;
mod join_live;
mod large_values;
mod links;
mod observability;
mod peers;
mod queue;
mod replication;
mod sequences;
mod stream_capture;
mod stream_client;
mod systemd;
mod transports;
mod trust_admin;
mod trust_apply;
mod trust_capture;
mod trust_cut;
mod trust_identity;
mod trust_pg_tls;
mod trust_publication;
mod two_way;
mod units;

// ---------------------------------------------------------------------------
// Other test modules go here, one line each (keep this list sorted), e.g.:
// mod replication;
// ---------------------------------------------------------------------------
