//! The `pf` command line apart from its entry point: each subcommand's flags (clap structs),
//! their defaults and range checks, and the job that runs it on the chosen backend. The
//! library crates (pf-train, pf-models, pf-data) take plain argument structs and return typed
//! errors; this crate turns them into messages and exit codes.

pub mod commands;
