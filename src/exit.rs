//! How commands end: exit codes and the one-line error text they print. Shared by the command
//! line and the commands, so neither imports the other.
//!
//! Every command uses the same codes (README, "The command line"): 0 all is well, 1 what was
//! checked is not (a Secret that fails the contract, a node that is not Ready, a failed install
//! check), 2 a usage error or unreadable input, 3 the object asked about does not exist, 4 the
//! API server refused the caller, 5 the cluster could not be reached or answered with an error.

/// What was checked is not as it should be.
pub const EXIT_NOT_READY: u8 = 1;
/// Exit code for a usage error or unreadable input.
pub const EXIT_USAGE: u8 = 2;
/// The Secret or SeiNode named on the command line does not exist.
pub const EXIT_NOT_FOUND: u8 = 3;
/// The API server refused the caller (401, 403): the credentials or RBAC.
pub const EXIT_FORBIDDEN: u8 = 4;
/// No kubeconfig, the API server could not be reached, or it answered with another error.
pub const EXIT_CLUSTER: u8 = 5;

pub use seinode_tls_crds::error_chain;
