//! The `seinode-tls` binary's library: command line, offline commands, the embedded control
//! plane and the `local` mode. Nothing below this crate knows about the command line.

pub mod cli;
pub mod control_plane;
pub mod local;
pub mod offline;
pub mod pki;
pub mod serve;
pub mod standin;
pub mod telemetry;
