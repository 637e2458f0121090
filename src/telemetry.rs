//! Process-wide set-up: logging to stderr and the TLS crypto provider.

use std::io::IsTerminal;

use tracing_subscriber::EnvFilter;

/// Default log filter. kube's client logs every failed request at ERROR, including the expected
/// ones while a control plane starts; the callers report failures that matter themselves.
const DEFAULT_FILTER: &str = "info,kube_client::client::builder=off";

/// Logs to stderr, filtered by `RUST_LOG` (default: [`DEFAULT_FILTER`]).
pub fn init() {
    let filter =
        EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new(DEFAULT_FILTER));
    // A second call (tests) keeps the first subscriber.
    let _ = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(std::io::stderr().is_terminal())
        .try_init();
}

/// Selects ring as the process's rustls provider (kube's client, the webhook server).
pub fn install_crypto_provider() {
    // Fails only when a provider is already installed, which is what we want anyway.
    let _ = rustls::crypto::ring::default_provider().install_default();
}
