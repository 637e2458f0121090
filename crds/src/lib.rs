//! The SeiNode API, the sidecar TLS contract and the pure validation of TLS Secrets.
//!
//! Everything here is free of I/O so that the webhook, the controller and the `check-secret`
//! command share one implementation and can never disagree. The one exception is [`watch`]: the
//! cluster- or namespace-scoped watch both co-processes use, here because this is the one crate
//! they share.

pub mod contract;
pub mod crd;
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
