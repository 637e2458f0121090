//! What the webhook, the controller and the CLI share, so they can never disagree.
//!
//! - Pure, free of I/O: the SeiNode API ([`crd`] and the types), the sidecar TLS [`contract`],
//!   and the [`validation`] of TLS Secrets.
//! - Kube support both co-processes use: the cluster- or namespace-scoped [`watch`], the
//!   Secret → nodes [`index`] a SeiNode watch feeds, the
//!   [`versions`] of TLS Secrets that the metadata watch reports (with the one read a verdict
//!   needs: a GET of the Secret at that version), and the [`inspections`] held per Secret
//!   version, parsed once. These hold runtime state, and `watch` and `versions` talk to the API
//!   server (the watches, and that one GET); nothing else here does.

pub mod contract;
pub mod crd;
pub mod index;
pub mod inspections;
mod types;
pub mod validation;
pub mod versions;
pub mod watch;

pub use types::*;

/// An error and its causes on one line: "failed to read x: No such file or directory".
pub fn error_chain(error: &dyn std::error::Error) -> String {
    let mut text = error.to_string();
    let mut source = error.source();
    while let Some(cause) = source {
        text.push_str(": ");
        text.push_str(&cause.to_string());
        source = cause.source();
    }
    text
}

/// `text` cut to at most `max_chars` characters, with "…" when cut: for strings a request or a
/// certificate carries, quoted in messages people read.
pub fn truncated(text: &str, max_chars: usize) -> std::borrow::Cow<'_, str> {
    match text.char_indices().nth(max_chars) {
        Some((end, _)) => format!("{}…", &text[..end]).into(),
        None => text.into(),
    }
}
