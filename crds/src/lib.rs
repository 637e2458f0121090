//! The SeiNode API, the sidecar TLS contract and the pure validation of TLS Secrets.
//!
//! Everything here is free of I/O so that the webhook, the controller and the `check-secret`
//! command share one implementation and can never disagree.

pub mod contract;
pub mod crd;
mod types;
pub mod validation;

pub use types::*;
