//! What the webhook, the controller and the CLI share, so they can never disagree: the SeiNode
//! API ([`crd`] and the types), the sidecar TLS [`contract`] and the [`validation`] of TLS
//! Secrets.
//!
//! Pure: no API client, no async runtime, no state kept between calls. Its inputs are values
//! (a Secret, a node's names, the time); what talks to the API server or holds state while the
//! processes run is in `seinode-tls-kube`.

pub mod contract;
pub mod crd;
mod types;
pub mod validation;

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
