//! How commands end: exit codes and the one-line error text they print. Shared by the command
//! line and the commands, so neither imports the other.

/// Exit code for a usage error or unreadable input.
pub const EXIT_USAGE: u8 = 2;

pub use seinode_tls_crds::error_chain;
