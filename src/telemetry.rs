//! Process-wide set-up: logging to stderr and the TLS crypto provider.

use std::io::IsTerminal;

use tracing_subscriber::EnvFilter;

/// Default log filter. kube's client logs every failed request at ERROR, including the expected
/// ones while a control plane starts; the callers report failures that matter themselves.
const DEFAULT_FILTER: &str = "info,kube_client::client::builder=off";

/// How log lines are written.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Format {
    /// One line of text per event (coloured on a terminal).
    Text,
    /// One JSON object per line: timestamp, level, target, the event's fields, and the fields of
    /// the span it happened in (`span`: a reconcile's `namespace` and `seinode`).
    Json,
}

/// Logs as text to stderr, filtered by `RUST_LOG` (default: [`DEFAULT_FILTER`]).
pub fn init() {
    init_with(Format::Text, None);
}

/// Logs to stderr in `format`, filtered by `level` (a level or a filter directive list), else
/// `RUST_LOG`, else [`DEFAULT_FILTER`]. The first call wins (tests call it more than once).
pub fn init_with(format: Format, level: Option<&str>) {
    let _ = tracing::subscriber::set_global_default(subscriber(
        format,
        filter(level),
        std::io::stderr,
        std::io::stderr().is_terminal(),
    ));
}

/// The filter of `level`: a bare level keeps the default's silencing of kube's noisy builder log.
fn filter(level: Option<&str>) -> EnvFilter {
    match level {
        Some(level) if level.parse::<tracing::Level>().is_ok() => {
            EnvFilter::new(format!("{level},kube_client::client::builder=off"))
        }
        Some(filter) => EnvFilter::new(filter),
        None => {
            EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new(DEFAULT_FILTER))
        }
    }
}

fn subscriber<W>(
    format: Format,
    filter: EnvFilter,
    writer: W,
    ansi: bool,
) -> Box<dyn tracing::Subscriber + Send + Sync>
where
    W: for<'a> tracing_subscriber::fmt::MakeWriter<'a> + Send + Sync + 'static,
{
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(writer);
    match format {
        Format::Text => Box::new(builder.with_ansi(ansi).finish()),
        Format::Json => Box::new(
            builder
                .json()
                .with_current_span(true)
                .with_span_list(false)
                .finish(),
        ),
    }
}

/// Selects ring as the process's rustls provider (kube's client, the webhook server).
pub fn install_crypto_provider() {
    // Fails only when a provider is already installed, which is what we want anyway.
    let _ = rustls::crypto::ring::default_provider().install_default();
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used)]

    use std::sync::{Arc, Mutex};

    use super::*;

    /// What the subscriber writes, kept for the test to read.
    #[derive(Clone, Default)]
    struct Captured(Arc<Mutex<Vec<u8>>>);

    impl std::io::Write for Captured {
        fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
            self.0.lock().unwrap().extend_from_slice(buf);
            Ok(buf.len())
        }

        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }

    fn log_one_reconcile_event(format: Format, level: Option<&str>) -> String {
        let captured = Captured::default();
        let writer = captured.clone();
        let subscriber = subscriber(format, filter(level), move || writer.clone(), false);
        tracing::subscriber::with_default(subscriber, || {
            let span = tracing::info_span!("reconcile", namespace = "sei", seinode = "rpc-0");
            let _entered = span.enter();
            tracing::info!(reason = "TLSSecretReady", "condition changed");
            tracing::debug!("a detail");
        });
        String::from_utf8(captured.0.lock().unwrap().clone()).unwrap()
    }

    /// A JSON line carries the node's namespace and name (its reconcile span's fields) beside
    /// the event's own, so a log pipeline can select one node's lines.
    #[test]
    fn json_lines_carry_the_nodes_namespace_and_name() {
        let text = log_one_reconcile_event(Format::Json, Some("info"));
        let lines: Vec<serde_json::Value> = text
            .lines()
            .map(|line| serde_json::from_str(line).expect("one JSON object per line"))
            .collect();
        assert_eq!(lines.len(), 1, "debug is below the level: {text}");
        let line = &lines[0];
        assert_eq!(line["level"], "INFO");
        assert_eq!(line["fields"]["message"], "condition changed");
        assert_eq!(line["fields"]["reason"], "TLSSecretReady");
        assert_eq!(line["span"]["name"], "reconcile");
        assert_eq!(line["span"]["namespace"], "sei");
        assert_eq!(line["span"]["seinode"], "rpc-0");
    }

    #[test]
    fn a_level_or_a_filter_selects_what_is_logged() {
        let debug = log_one_reconcile_event(Format::Text, Some("debug"));
        assert!(
            debug.contains("a detail") && debug.contains("condition changed"),
            "{debug}"
        );
        assert!(
            debug.contains("namespace=\"sei\"") || debug.contains("namespace=sei"),
            "{debug}"
        );
        let filtered = log_one_reconcile_event(Format::Text, Some("warn,seinode_tls=info"));
        assert!(filtered.contains("condition changed"), "{filtered}");
        assert!(!filtered.contains("a detail"), "{filtered}");
        let quiet = log_one_reconcile_event(Format::Text, Some("warn"));
        assert!(quiet.is_empty(), "{quiet}");
    }
}
