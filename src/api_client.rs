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
/// Every request but a watch is answered within this, retries included: kube-apiserver's own
/// request timeout (`--request-timeout`, 60 s) and a margin. A reconcile then never waits on one
/// call for minutes (kube's default retries up to 15 times, honouring any `Retry-After`).
const REQUEST_DEADLINE: Duration = Duration::from_secs(70);
/// Retries of 429, 503 and 504 (with `Retry-After` when the server gives one), from 200 ms to
/// 2 s apart: a short throttle is ridden out, a long one is the caller's backoff's to handle.
const MAX_RETRIES: u32 = 3;
const RETRY_MIN: Duration = Duration::from_millis(200);
const RETRY_MAX: Duration = Duration::from_secs(2);

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
    controller.clients(client, move |fence| {
        from_config(config.clone(), Some(fence))
    })
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
    build(config, fence, REQUEST_DEADLINE)
}

/// A client for `config` whose every request is answered within `deadline`, retries included:
/// for the commands a person runs, who should not wait a minute for a cluster that is not there.
pub fn with_deadline(config: kube::Config, deadline: Duration) -> anyhow::Result<kube::Client> {
    build(config, None, deadline)
}

fn build(
    config: kube::Config,
    fence: Option<Fence>,
    deadline: Duration,
) -> anyhow::Result<kube::Client> {
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
    let retry = RetryPolicy::new(RETRY_MIN, RETRY_MAX, MAX_RETRIES, true)
        .context("the client's retry policy")?;
    let service = ServiceBuilder::new()
        .layer(tower::layer::layer_fn(move |inner| Deadline {
            inner,
            deadline,
        }))
        .layer(config.base_uri_layer())
        .option_layer(
            config
                .default_retry
                .then(|| tower::retry::RetryLayer::new(retry)),
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

/// Bounds every request but a watch (a long poll the server ends itself) to `deadline`,
/// retries included.
#[derive(Clone)]
struct Deadline<S> {
    inner: S,
    deadline: Duration,
}

impl<S, B> tower::Service<hyper::Request<B>> for Deadline<S>
where
    S: tower::Service<hyper::Request<B>>,
    S::Error: Into<BoxError>,
    S::Future: Send + 'static,
{
    type Response = S::Response;
    type Error = BoxError;
    type Future = BoxFuture<'static, Result<Self::Response, Self::Error>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx).map_err(Into::into)
    }

    fn call(&mut self, request: hyper::Request<B>) -> Self::Future {
        let watch = request
            .uri()
            .query()
            .is_some_and(|q| q.split('&').any(|p| p == "watch=true" || p == "watch=1"));
        let deadline = self.deadline;
        let response = self.inner.call(request);
        Box::pin(async move {
            if watch {
                return response.await.map_err(Into::into);
            }
            match tokio::time::timeout(deadline, response).await {
                Ok(result) => result.map_err(Into::into),
                Err(_) => Err(format!(
                    "the API server did not answer within {deadline:?} (retries included)"
                )
                .into()),
            }
        })
    }
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

    /// A local API server stand-in: answers every request with `answer` (or never, with
    /// `None`) and counts them.
    async fn api_server(
        answer: Option<&'static str>,
    ) -> (kube::Config, Arc<std::sync::atomic::AtomicUsize>) {
        use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let count = Arc::new(std::sync::atomic::AtomicUsize::new(0));
        let counted = count.clone();
        tokio::spawn(async move {
            let mut held = Vec::new();
            while let Ok((mut stream, _)) = listener.accept().await {
                let counted = counted.clone();
                match answer {
                    Some(answer) => {
                        tokio::spawn(async move {
                            let mut buf = vec![0u8; 8192];
                            while let Ok(n) = stream.read(&mut buf).await {
                                if n == 0 {
                                    break;
                                }
                                counted.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
                                if stream.write_all(answer.as_bytes()).await.is_err() {
                                    break;
                                }
                            }
                        });
                    }
                    None => held.push(stream),
                }
            }
        });
        let config = kube::Config::new(format!("http://{addr}").parse().unwrap());
        (config, count)
    }

    /// Throttled for good (429, Retry-After: 1): the call fails after a bounded number of
    /// tries, not fifteen with a second or more between them.
    #[tokio::test]
    async fn a_throttled_call_is_retried_a_bounded_number_of_times() {
        let (config, count) = api_server(Some(
            "HTTP/1.1 429 Too Many Requests\r\nRetry-After: 1\r\nContent-Type: application/json\r\nContent-Length: 2\r\n\r\n{}",
        ))
        .await;
        let client = from_config(config, None).unwrap();
        let pods: kube::Api<k8s_openapi::api::core::v1::Pod> = kube::Api::namespaced(client, "ns");
        assert!(pods.get("p").await.is_err());
        let tries = count.load(std::sync::atomic::Ordering::SeqCst);
        assert_eq!(tries, 1 + MAX_RETRIES as usize, "tries: {tries}");
    }

    /// A server that never answers: the call fails at the deadline, with a message saying so;
    /// a watch is not cut by it.
    #[tokio::test]
    async fn a_call_the_server_never_answers_fails_at_the_deadline() {
        let (config, _) = api_server(None).await;
        let client = build(config, None, Duration::from_millis(300)).unwrap();
        let pods: kube::Api<k8s_openapi::api::core::v1::Pod> = kube::Api::namespaced(client, "ns");
        let error = tokio::time::timeout(Duration::from_secs(10), pods.get("p"))
            .await
            .expect("the deadline ends the call")
            .unwrap_err();
        assert!(
            seinode_tls_crds::error_chain(&error).contains("did not answer within 300ms"),
            "{error}"
        );
        let params = kube::api::WatchParams::default();
        let watch = pods.watch(&params, "0");
        assert!(
            tokio::time::timeout(Duration::from_secs(1), watch)
                .await
                .is_err(),
            "a watch outlives the deadline"
        );
    }

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
