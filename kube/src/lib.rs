//! The kube support the webhook and the controller share: what talks to the API server and what
//! holds state while the processes run, over the pure types and validation of
//! `seinode-tls-crds`.
//!
//! - [`watch`]: the cluster- or namespace-scoped watches every watch of both goes through (the
//!   watch requests; the namespace merge is pure stream plumbing).
//! - [`versions`]: the resourceVersion of every TLS Secret, as the metadata watch reports it,
//!   and [`versions::read_secret`], the one GET of a Secret (at that version, from the API
//!   server's watch cache).
//! - [`inspections`]: each Secret version parsed once and held, and
//!   [`inspections::Inspections::held_or_read`], "the held inspection of the watched version,
//!   else read the Secret", the one way both look a Secret up.
//! - [`index`]: which SeiNodes name which Secret, fed by a SeiNode watch.
//!
//! The API calls are the watches and that GET; the rest is memory fed by the watches.

pub mod index;
pub mod inspections;
mod slim;
pub mod versions;
pub mod watch;
