//! The client of the Kubernetes API: kube's own middleware (base URI, retries of 429/503/504,
//! credentials, extra headers) over a connector that offers HTTP/2.
//!
//! kube's default client speaks HTTP/1.1 only, so every watch holds a TCP connection of its own
//! and every request in flight another: `run` held 13 connections to the API server with 1,000
//! nodes (seven watches, four reconciles, idle spares). Over HTTP/2 they are streams of one
//! connection, as with client-go: one TLS session for the API server to keep, whatever the
//! number of watches and reconciles.

use std::time::Duration;

use anyhow::Context as _;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::{TokioExecutor, TokioTimer};
use kube::client::ConfigExt as _;
use kube::client::retry::RetryPolicy;
use tower::{BoxError, ServiceBuilder};

/// Interval of the HTTP/2 pings on the shared connection. A connection whose peer stopped
/// answering (an API server paused, a network path gone) would otherwise hold every watch on it
/// forever; client-go pings after 30 s of silence too.
const KEEP_ALIVE_INTERVAL: Duration = Duration::from_secs(30);
/// A ping not answered within this time closes the connection; watches then reconnect.
const KEEP_ALIVE_TIMEOUT: Duration = Duration::from_secs(15);

/// A client from the in-cluster configuration or `KUBECONFIG`.
pub async fn infer() -> anyhow::Result<kube::Client> {
    let config = kube::Config::infer()
        .await
        .context("failed to configure the Kubernetes client (in-cluster or KUBECONFIG)")?;
    from_config(config)
}

/// A client for `config` that multiplexes every request and watch over one HTTP/2 connection
/// when the API server offers HTTP/2 (ALPN), and falls back to HTTP/1.1 when it does not.
/// Through a proxy (`proxy_url`), kube's own client is used, over HTTP/1.1.
pub fn from_config(config: kube::Config) -> anyhow::Result<kube::Client> {
    if config.proxy_url.is_some() {
        return kube::Client::try_from(config).context("failed to build the Kubernetes client");
    }
    let tls = config
        .rustls_client_config()
        .context("failed to set up TLS to the API server")?;
    let mut http = HttpConnector::new();
    http.enforce_http(false);
    http.set_nodelay(true);
    http.set_connect_timeout(config.connect_timeout);
    let builder = hyper_rustls::HttpsConnectorBuilder::new()
        .with_tls_config(tls)
        .https_or_http();
    let builder = match &config.tls_server_name {
        Some(name) => {
            let name = rustls::pki_types::ServerName::try_from(name.clone())
                .with_context(|| format!("invalid tls-server-name {name:?} in the kubeconfig"))?;
            builder.with_server_name_resolver(hyper_rustls::FixedServerNameResolver::new(name))
        }
        None => builder,
    };
    let connector = builder.enable_all_versions().wrap_connector(http);
    let http = hyper_util::client::legacy::Client::builder(TokioExecutor::new())
        .timer(TokioTimer::new())
        .pool_timer(TokioTimer::new())
        .http2_keep_alive_interval(KEEP_ALIVE_INTERVAL)
        .http2_keep_alive_timeout(KEEP_ALIVE_TIMEOUT)
        .http2_keep_alive_while_idle(true)
        .build(connector);
    let service = ServiceBuilder::new()
        .layer(config.base_uri_layer())
        .option_layer(
            config
                .default_retry
                .then(|| tower::retry::RetryLayer::new(RetryPolicy::server_retry())),
        )
        .option_layer(
            config
                .auth_layer()
                .context("failed to set up the client's credentials")?,
        )
        .layer(
            config
                .extra_headers_layer()
                .context("invalid extra headers in the client configuration")?,
        )
        .map_err(BoxError::from)
        .service(http);
    Ok(kube::Client::new(service, config.default_namespace))
}
