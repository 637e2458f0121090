//! The client of the Kubernetes API: kube's own middleware (base URI, retries of 429/503/504,
//! credentials, extra headers) over a connector that offers HTTP/2.
//!
//! kube's default client speaks HTTP/1.1 only, so every watch holds a TCP connection of its own
//! and every request in flight another: `run` held 13 connections to the API server with 1,000
//! nodes (seven watches, four reconciles, idle spares). Over HTTP/2 they are streams of one
//! connection, as with client-go: one TLS session for the API server to keep, whatever the
//! number of watches and reconciles.

use std::io;
use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::Duration;

use anyhow::Context as _;
use futures::future::BoxFuture;
use hyper::Uri;
use hyper_util::client::legacy::connect::{Connected, Connection, HttpConnector};
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

pub use seinode_tls_controller::Fence;

/// The client configuration from the cluster (in-cluster) or `KUBECONFIG`.
pub async fn infer_config() -> anyhow::Result<kube::Config> {
    kube::Config::infer()
        .await
        .context("failed to configure the Kubernetes client (in-cluster or KUBECONFIG)")
}

/// A client from the in-cluster configuration or `KUBECONFIG`.
pub async fn infer() -> anyhow::Result<kube::Client> {
    from_config(infer_config().await?, None)
}

/// The clients [`seinode_tls_controller::Controller::run`] takes, for the cluster `config`
/// names: with leader election the reconciles' is fenced ([`from_config`]).
pub fn controller_clients(
    controller: &seinode_tls_controller::Controller,
    config: kube::Config,
) -> anyhow::Result<seinode_tls_controller::Clients> {
    let client = from_config(config.clone(), None)?;
    controller.clients(client, |fence| from_config(config, Some(fence)))
}

/// A client for `config` that multiplexes every request and watch over one HTTP/2 connection
/// when the API server offers HTTP/2 (ALPN), and falls back to HTTP/1.1 when it does not.
/// Through a proxy (`proxy_url`), kube's own client is used, over HTTP/1.1.
///
/// With a `fence`, every write to the connection's socket asks it first and fails while it is
/// closed: the request fails, and no byte of it written after the fence closed is sent. (Bytes
/// the kernel took before are sent, even by a paused process's kernel.) A proxy is refused
/// then: kube's client has no place for the check.
pub fn from_config(config: kube::Config, fence: Option<Fence>) -> anyhow::Result<kube::Client> {
    if config.proxy_url.is_some() {
        anyhow::ensure!(
            fence.is_none(),
            "leader election needs a direct connection to the API server: the kubeconfig's proxy-url is not supported with --leader-elect"
        );
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
    let connector = builder
        .enable_all_versions()
        .wrap_connector(FencedConnector { inner: http, fence });
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

/// The connector under TLS whose connections ask the fence before every write.
#[derive(Clone)]
struct FencedConnector<C> {
    inner: C,
    fence: Option<Fence>,
}

impl<S> tower::Service<Uri> for FencedConnector<S>
where
    S: tower::Service<Uri>,
    S::Future: Send + 'static,
    S::Response: Send,
    S::Error: Send,
{
    type Response = Fenced<S::Response>;
    type Error = S::Error;
    type Future = BoxFuture<'static, Result<Self::Response, Self::Error>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, uri: Uri) -> Self::Future {
        let fence = self.fence.clone();
        let connecting = self.inner.call(uri);
        Box::pin(async move {
            Ok(Fenced {
                inner: connecting.await?,
                fence,
                refused: false,
            })
        })
    }
}

/// A connection (TCP, under TLS) that asks its fence before every write.
struct Fenced<T> {
    inner: T,
    fence: Option<Fence>,
    /// Whether it has refused a write (and logged why).
    refused: bool,
}

impl<T> Fenced<T> {
    /// Fails while the fence is closed. The error ends the connection, and HTTP/2 reports it
    /// to the requests on it as a broken pipe, so the reason is logged here, once.
    fn check(&mut self) -> io::Result<()> {
        match &self.fence {
            Some(fence) if !fence() => {
                if !std::mem::replace(&mut self.refused, true) {
                    tracing::info!(
                        "not sending to the API server: this replica no longer leads (its renew deadline passed); closing the connection of its reconciles"
                    );
                }
                Err(io::Error::new(
                    io::ErrorKind::PermissionDenied,
                    "fenced: this replica no longer leads",
                ))
            }
            _ => Ok(()),
        }
    }
}

impl<T: Connection> Connection for Fenced<T> {
    fn connected(&self) -> Connected {
        self.inner.connected()
    }
}

impl<T: hyper::rt::Read + Unpin> hyper::rt::Read for Fenced<T> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: hyper::rt::ReadBufCursor<'_>,
    ) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_read(cx, buf)
    }
}

impl<T: hyper::rt::Write + Unpin> hyper::rt::Write for Fenced<T> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        self.check()?;
        Pin::new(&mut self.inner).poll_write(cx, buf)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        self.check()?;
        Pin::new(&mut self.inner).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use super::*;

    #[test]
    fn a_fenced_client_through_a_proxy_is_refused_with_the_reason() {
        let mut config = kube::Config::new("https://127.0.0.1:6443".parse().unwrap());
        config.proxy_url = Some("http://127.0.0.1:3128".parse().unwrap());
        let fence: Fence = Arc::new(|| true);
        let Err(error) = from_config(config, Some(fence)) else {
            panic!("a fenced client through a proxy was built");
        };
        let error = error.to_string();
        assert!(
            error.contains("proxy-url is not supported with --leader-elect"),
            "{error}"
        );
    }
}
