//! The `seinode-tls` binary's library: command line, offline commands, the server commands and
//! (with the default `local` feature) `local` mode over the one-machine cluster in
//! `seinode-tls-devcluster`. Nothing below this crate knows about the command line.

pub mod api_client;
pub mod check;
pub mod cli;
pub mod exit;
#[cfg(feature = "local")]
pub mod local;
pub mod offline;
pub mod online;
pub mod serve;
pub mod status;
pub mod telemetry;
