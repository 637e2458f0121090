//! The admission webhook for SeiNodes and the TLS Secrets they reference.
//!
//! - `POST /validate/seinodes`: refuses any edit of `spec.sidecar.tls`, and judges the Secret a
//!   new TLS node names (warning when it is missing, denial when it is present but wrong).
//! - `POST /mutate/seinodes`: on CREATE of a TLS node, adds the annotation
//!   `sei.io/sidecar-tls-required-dns-names` with the contract.
//! - `POST /validate/secrets`: the Secret guard; warns (or denies) when an UPDATE or DELETE of a
//!   TLS Secret would break the contract of SeiNodes that use it.
//!
//! The request path answers from watch-fed caches (which SeiNodes name which Secret, TLS Secrets
//! by name and version). It makes one API call, by design, only where the caches cannot hold the answer: a
//! new TLS SeiNode names a Secret whose current version has not been inspected, and the Secret
//! is read once (a GET at that version, at most 1 s). Each Secret is parsed once per
//! resourceVersion. Health, readiness and metrics are served on a
//! separate plain-HTTP port.

pub mod admission;
pub mod cache;
pub mod config;
pub mod limits;
pub mod metrics;
pub mod registration;
pub mod review;
pub mod serve;
pub mod server;
pub mod tls;

pub use config::{GuardPolicy, SecretPolicy, WebhookConfig};
pub use server::{Webhook, WebhookError};
