//! HTTP: the admission router (HTTPS, axum over rustls) and the health router (plain HTTP).
//!
//! [`admission_router`] and [`health_router`] are public so tests call them directly with
//! `tower::ServiceExt::oneshot`, without a socket; [`Webhook`] binds and serves them.

use std::net::{SocketAddr, TcpListener};
use std::sync::Arc;
use std::time::{Duration, Instant};

use axum::Router;
use axum::body::{Body, Bytes};
use axum::extract::{Request, State};
use axum::http::{StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum_server::tls_rustls::RustlsAcceptor;
use base64::Engine;
use base64::engine::general_purpose::STANDARD as BASE64;
use hyper_util::rt::TokioTimer;
use jiff::Timestamp;
use kube::Client;
use kube::core::DynamicObject;
use kube::core::admission::{AdmissionRequest, AdmissionResponse, AdmissionReview, Operation};
use prometheus_client::registry::Registry;
use thiserror::Error;
use tracing::Instrument;

use crate::admission::{AdmissionContext, Decision, WebhookKind, decide};
use crate::cache::{Caches, NodeCache, SecretCache};
use crate::config::{GuardPolicy, SecretPolicy, WebhookConfig};
use crate::limits::{ConnectionGuard, RequestLimit, shed_over_limit};
use crate::metrics::{
    LatencyLabels, OperationLabel, OutcomeLabel, RequestLabels, WebhookLabel, WebhookMetrics,
};
use crate::tls::{ServingCertificate, TlsError};

/// Largest Secret review accepted. A Secret is at most 1 MiB; an UPDATE carries it twice,
/// base64-encoded, plus JSON around it.
pub const MAX_SECRET_REVIEW_BYTES: usize = 6 << 20;
/// Largest SeiNode review accepted. A SeiNode is a few KiB; an UPDATE with a kubectl
/// last-applied annotation and managedFields, twice, stays well below this. Parsing JSON of small
/// values takes up to about 30 times its size, so this also bounds what one request can make
/// the process allocate.
pub const MAX_SEINODE_REVIEW_BYTES: usize = 512 << 10;

impl WebhookKind {
    /// Largest review this endpoint reads; a longer body is a 400 that says so.
    pub fn max_body_bytes(self) -> usize {
        match self {
            WebhookKind::ValidateSeiNode | WebhookKind::MutateSeiNode => MAX_SEINODE_REVIEW_BYTES,
            WebhookKind::GuardSecret => MAX_SECRET_REVIEW_BYTES,
        }
    }
}

/// A client gets this long for its TLS handshake, and again for its first request.
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);
const FIRST_REQUEST_TIMEOUT: Duration = Duration::from_secs(10);

/// The only AdmissionReview version served.
const ADMISSION_V1: &str = "admission.k8s.io/v1";

/// Paths of the admission endpoints (used by the registrations here, in `local` and the chart).
pub const VALIDATE_SEINODES_PATH: &str = "/validate/seinodes";
pub const MUTATE_SEINODES_PATH: &str = "/mutate/seinodes";
pub const VALIDATE_SECRETS_PATH: &str = "/validate/secrets";

#[derive(Debug, Error)]
pub enum WebhookError {
    #[error("failed to bind {addr}")]
    Bind {
        addr: SocketAddr,
        #[source]
        source: std::io::Error,
    },
    #[error("failed to load the serving certificate")]
    Tls(#[from] TlsError),
    #[error("the {what} server failed")]
    Serve {
        what: &'static str,
        #[source]
        source: std::io::Error,
    },
}

/// What the admission handlers share.
pub struct AdmissionState {
    pub secrets: Arc<SecretCache>,
    pub nodes: NodeCache,
    pub secret_policy: SecretPolicy,
    pub guard_policy: GuardPolicy,
    pub cluster_domain: String,
    pub request_deadline: Duration,
    pub metrics: Arc<WebhookMetrics>,
    pub request_limit: Arc<RequestLimit>,
}

impl AdmissionState {
    pub fn from_config(
        config: &WebhookConfig,
        secrets: Arc<SecretCache>,
        nodes: NodeCache,
        metrics: Arc<WebhookMetrics>,
    ) -> Self {
        Self {
            secrets,
            nodes,
            secret_policy: config.secret_policy,
            guard_policy: config.guard_policy,
            cluster_domain: config.cluster_domain.clone(),
            request_deadline: config.request_deadline,
            request_limit: Arc::new(RequestLimit::new(config.max_concurrent_requests, &metrics)),
            metrics,
        }
    }

    /// Whether the caches have synced, and if not, which.
    pub fn readiness(&self) -> Result<(), String> {
        let mut waiting = Vec::new();
        if !self.secrets.is_synced() {
            waiting.push("Secret cache not synced");
        }
        if !self.nodes.is_synced() {
            waiting.push("SeiNode cache not synced");
        }
        if waiting.is_empty() {
            Ok(())
        } else {
            Err(waiting.join(", "))
        }
    }
}

// === Routers ===

/// The admission endpoints, behind the concurrent-request limit.
pub fn admission_router(state: Arc<AdmissionState>) -> Router {
    admission_router_with(state, Router::new())
}

/// The admission endpoints and `extra` routes (a benchmark's baseline), all behind the
/// concurrent-request limit.
fn admission_router_with(state: Arc<AdmissionState>, extra: Router<Arc<AdmissionState>>) -> Router {
    let route = |kind: WebhookKind| {
        post(
            move |State(state): State<Arc<AdmissionState>>, request: Request| {
                admit(state, kind, request)
            },
        )
    };
    let router = Router::new()
        .route(VALIDATE_SEINODES_PATH, route(WebhookKind::ValidateSeiNode))
        .route(MUTATE_SEINODES_PATH, route(WebhookKind::MutateSeiNode))
        .route(VALIDATE_SECRETS_PATH, route(WebhookKind::GuardSecret));
    let limit = state.request_limit.clone();
    router
        .merge(extra)
        .route_layer(axum::middleware::from_fn_with_state(limit, shed_over_limit))
        .with_state(state)
}

/// What one client can hold of the health port, which sits in the Service and answers anyone
/// who reaches the pod: the kubelet's probes and a Prometheus scrape need a few connections and
/// send their request at once.
#[derive(Debug, Clone, Copy)]
pub struct HealthLimits {
    /// Open connections; over it a new one is closed at once.
    pub max_connections: usize,
    /// A connection with no byte moving is closed (keep-alive between scrapes included).
    pub idle_timeout: Duration,
    /// The first request's head must arrive within this.
    pub first_request_timeout: Duration,
}

impl Default for HealthLimits {
    fn default() -> Self {
        Self {
            max_connections: 64,
            idle_timeout: Duration::from_secs(30),
            first_request_timeout: Duration::from_secs(5),
        }
    }
}

/// Serves `router` (the health router) on `listener` in plain HTTP within `limits`, until
/// `shutdown` resolves; then lets requests in flight finish.
pub async fn serve_health(
    listener: tokio::net::TcpListener,
    router: Router,
    limits: HealthLimits,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> std::io::Result<()> {
    let listener = listener.into_std()?;
    let handle = axum_server::Handle::new();
    let guard = ConnectionGuard::unexported(limits.max_connections, limits.idle_timeout);
    let mut server = axum_server::from_tcp(listener)?
        .acceptor(guard)
        .first_request_timeout(limits.first_request_timeout)
        .handle(handle.clone());
    server
        .http_builder()
        .http1()
        .timer(TokioTimer::new())
        .header_read_timeout(limits.first_request_timeout);
    let stop = tokio::spawn(async move {
        shutdown.await;
        handle.graceful_shutdown(Some(Duration::from_secs(5)));
    });
    let served = server.serve(router.into_make_service()).await;
    stop.abort();
    served
}

/// `/healthz` (the process serves), `/readyz` (200 while `ready()` holds, else 503 with its
/// cause) and `/metrics`: the health router of every server command. The webhook is ready once
/// its caches synced (the serving certificate is loaded before anything is served); the
/// controller alone serves no traffic, so being up is its readiness.
pub fn health_router(
    ready: impl Fn() -> Result<(), String> + Clone + Send + Sync + 'static,
    registry: Arc<Registry>,
) -> Router {
    Router::new()
        .route("/healthz", get(|| async { "ok" }))
        .route(
            "/readyz",
            get(move || {
                let ready = ready.clone();
                async move {
                    match ready() {
                        Ok(()) => (StatusCode::OK, "ok".to_owned()),
                        Err(waiting) => (StatusCode::SERVICE_UNAVAILABLE, waiting),
                    }
                }
            }),
        )
        .route(
            "/metrics",
            get(move || {
                let registry = registry.clone();
                async move { metrics_response(&registry) }
            }),
        )
}

/// The registry in the Prometheus text format.
fn metrics_response(registry: &Registry) -> Response {
    let mut text = String::new();
    match prometheus_client::encoding::text::encode(&mut text, registry) {
        Ok(()) => (
            StatusCode::OK,
            [(
                header::CONTENT_TYPE,
                "application/openmetrics-text; version=1.0.0; charset=utf-8",
            )],
            text,
        )
            .into_response(),
        Err(_) => StatusCode::INTERNAL_SERVER_ERROR.into_response(),
    }
}

// === Admission handler ===

/// Reads, decides, answers. A body that is not a v1 AdmissionReview is a 400 with a message;
/// a decision is always HTTP 200 with the request's uid.
async fn admit(state: Arc<AdmissionState>, kind: WebhookKind, request: Request) -> Response {
    let started = Instant::now();
    let _in_flight = InFlight::enter(&state.metrics);
    let webhook = WebhookLabel::from(kind);
    let span = tracing::info_span!(
        "admission",
        webhook = kind.as_str(),
        uid = tracing::field::Empty,
        kind = tracing::field::Empty,
        namespace = tracing::field::Empty,
        name = tracing::field::Empty,
        operation = tracing::field::Empty,
        dry_run = tracing::field::Empty,
        decision = tracing::field::Empty,
    );
    let deadline = state.request_deadline;
    let result = async {
        let limit = kind.max_body_bytes();
        let body = match tokio::time::timeout(deadline, read_body(request.into_body(), limit)).await
        {
            Ok(body) => body?,
            Err(_) => {
                return Err(format!(
                    "the request body did not arrive within {deadline:?}"
                ));
            }
        };
        let admission = parse_review(&body)?;
        if let Some((namespace, name)) = crate::admission::secret_to_read(kind, &admission) {
            // The read gets what is left of the deadline (and at most its own second).
            let left = deadline.saturating_sub(started.elapsed());
            let read = state.secrets.ensure(&namespace, &name);
            if tokio::time::timeout(left, read).await.is_err() {
                tracing::warn!(%namespace, %name, "the Secret read ran out of the request deadline");
                state.metrics.count_secret_read("failed");
            }
        }
        let span = tracing::Span::current();
        span.record("uid", admission.uid.as_str());
        span.record("kind", admission.kind.kind.as_str());
        span.record(
            "namespace",
            admission.namespace.as_deref().unwrap_or_default(),
        );
        span.record("name", admission.name.as_str());
        span.record("operation", operation_label(&admission.operation));
        span.record("dry_run", admission.dry_run);
        let ctx = AdmissionContext {
            secrets: &state.secrets,
            nodes: &state.nodes,
            secret_policy: state.secret_policy,
            guard_policy: state.guard_policy,
            cluster_domain: &state.cluster_domain,
            now: Timestamp::now(),
        };
        let decision = decide(kind, &admission, &ctx);
        span.record("decision", decision.outcome.as_str());
        if decision.outcome == crate::admission::Outcome::Denied {
            tracing::info!(message = %decision.response.result.message, "denied");
        } else {
            tracing::debug!("admitted");
        }
        Ok((operation_of(&admission), decision))
    }
    .instrument(span)
    .await;

    let (operation, outcome, response) = match result {
        Ok((operation, Decision { response, outcome })) => (
            operation,
            OutcomeLabel::from(outcome),
            review_response(response),
        ),
        Err(message) => {
            tracing::warn!(webhook = kind.as_str(), %message, "bad admission request");
            (
                OperationLabel::unknown,
                OutcomeLabel::bad_request,
                bad_request(message),
            )
        }
    };
    state
        .metrics
        .requests
        .get_or_create(&RequestLabels {
            webhook,
            operation,
            outcome,
        })
        .inc();
    state
        .metrics
        .latency
        .get_or_create(&LatencyLabels { webhook })
        .observe(started.elapsed().as_secs_f64());
    response
}

/// Counts a request in `webhook_requests_in_flight` until dropped (also when the client goes
/// away and the handler is cancelled).
struct InFlight<'a>(&'a WebhookMetrics);

impl<'a> InFlight<'a> {
    fn enter(metrics: &'a WebhookMetrics) -> Self {
        metrics.in_flight.inc();
        Self(metrics)
    }
}

impl Drop for InFlight<'_> {
    fn drop(&mut self) {
        self.0.in_flight.dec();
    }
}

async fn read_body(body: Body, limit: usize) -> Result<Bytes, String> {
    axum::body::to_bytes(body, limit).await.map_err(|e| {
        if std::error::Error::source(&e).is_some_and(|s| s.is::<http_body_util::LengthLimitError>())
        {
            format!("request body exceeds this endpoint's limit of {limit} bytes")
        } else {
            format!("failed to read the request body: {e}")
        }
    })
}

/// Decodes an `admission.k8s.io/v1` AdmissionReview body into its request; the error is the
/// 400 message.
pub fn parse_review(body: &[u8]) -> Result<AdmissionRequest<DynamicObject>, String> {
    // The envelope first, so a wrong version is reported as such rather than as a parse error.
    #[derive(serde::Deserialize)]
    #[serde(rename_all = "camelCase")]
    struct Envelope {
        api_version: Option<String>,
        kind: Option<String>,
    }
    let envelope: Envelope = serde_json::from_slice(body)
        .map_err(|e| format!("the body is not a JSON AdmissionReview: {e}"))?;
    match (envelope.api_version.as_deref(), envelope.kind.as_deref()) {
        (Some(ADMISSION_V1), Some("AdmissionReview")) => {}
        (version, kind) => {
            return Err(format!(
                "expected kind AdmissionReview in apiVersion {ADMISSION_V1}, got kind {} in apiVersion {}; \
                 register this webhook with admissionReviewVersions: [v1]",
                kind.unwrap_or("(none)"),
                version.unwrap_or("(none)")
            ));
        }
    }
    let review: AdmissionReview<DynamicObject> =
        serde_json::from_slice(body).map_err(|e| format!("malformed AdmissionReview: {e}"))?;
    let request: AdmissionRequest<DynamicObject> = review
        .try_into()
        .map_err(|_| "the AdmissionReview has no request".to_owned())?;
    if request.uid.is_empty() {
        return Err("the AdmissionReview request has no uid".to_owned());
    }
    Ok(request)
}

/// The review as JSON, with the patch base64-encoded as the API documents it (kube-core's type
/// holds the patch as bytes, which serde would write as an array of numbers).
pub fn review_response(mut response: AdmissionResponse) -> Response {
    let patch = response.patch.take();
    let mut review = match serde_json::to_value(response.into_review()) {
        Ok(review) => review,
        Err(e) => return bad_request(format!("failed to encode the response: {e}")),
    };
    if let (Some(patch), Some(body)) = (
        patch,
        review.get_mut("response").and_then(|r| r.as_object_mut()),
    ) {
        body.insert(
            "patch".to_owned(),
            serde_json::Value::String(BASE64.encode(patch)),
        );
    }
    axum::Json(review).into_response()
}

fn bad_request(message: String) -> Response {
    (
        StatusCode::BAD_REQUEST,
        [(header::CONTENT_TYPE, "text/plain; charset=utf-8")],
        message + "\n",
    )
        .into_response()
}

fn operation_of<T: kube::Resource>(request: &AdmissionRequest<T>) -> OperationLabel {
    match request.operation {
        Operation::Create => OperationLabel::CREATE,
        Operation::Update => OperationLabel::UPDATE,
        Operation::Delete => OperationLabel::DELETE,
        Operation::Connect => OperationLabel::CONNECT,
    }
}

fn operation_label(operation: &Operation) -> &'static str {
    match operation {
        Operation::Create => "CREATE",
        Operation::Update => "UPDATE",
        Operation::Delete => "DELETE",
        Operation::Connect => "CONNECT",
    }
}

// === Serving ===

/// A webhook with its ports bound and its certificate loaded, ready to [`Webhook::run`].
pub struct Webhook {
    config: WebhookConfig,
    metrics: Arc<WebhookMetrics>,
    certificate: Arc<ServingCertificate>,
    https: TcpListener,
    health: TcpListener,
    extra_routes: Router<Arc<AdmissionState>>,
}

impl Webhook {
    /// Registers metrics, loads the serving certificate and binds both ports.
    pub fn bind(config: WebhookConfig, registry: &mut Registry) -> Result<Self, WebhookError> {
        let metrics = Arc::new(WebhookMetrics::register(registry));
        let certificate = Arc::new(ServingCertificate::load(
            config.tls_cert_file.clone(),
            config.tls_key_file.clone(),
            metrics.clone(),
        )?);
        let bind = |addr: SocketAddr| {
            let listener =
                TcpListener::bind(addr).map_err(|source| WebhookError::Bind { addr, source })?;
            listener
                .set_nonblocking(true)
                .map_err(|source| WebhookError::Bind { addr, source })?;
            Ok::<_, WebhookError>(listener)
        };
        let https = bind(config.listen_addr)?;
        let health = bind(config.health_addr)?;
        Ok(Self {
            config,
            metrics,
            certificate,
            https,
            health,
            extra_routes: Router::new(),
        })
    }

    /// Also serves `routes` on the admission port, behind the same TLS, connection and request
    /// limits (the load benchmark's constant-allow baseline).
    pub fn with_extra_routes(mut self, routes: Router<Arc<AdmissionState>>) -> Self {
        self.extra_routes = self.extra_routes.merge(routes);
        self
    }

    /// The metrics the webhook registered (to build an [`AdmissionState`] for [`Webhook::serve`]).
    pub fn metrics(&self) -> Arc<WebhookMetrics> {
        self.metrics.clone()
    }

    /// The configuration it was bound with.
    pub fn config(&self) -> &WebhookConfig {
        &self.config
    }

    /// The bound HTTPS address (useful with port 0).
    pub fn https_addr(&self) -> SocketAddr {
        self.https.local_addr().unwrap_or(self.config.listen_addr)
    }

    /// The bound health address.
    pub fn health_addr(&self) -> SocketAddr {
        self.health.local_addr().unwrap_or(self.config.health_addr)
    }

    /// Watches Secrets and SeiNodes, serves until `shutdown` resolves, then drains in-flight
    /// requests for up to the configured grace period.
    pub async fn run(
        self,
        client: Client,
        registry: Arc<Registry>,
        shutdown: impl Future<Output = ()> + Send + 'static,
    ) -> Result<(), WebhookError> {
        let (caches, watch) = Caches::watch(client, self.metrics.clone(), &self.config.watch_scope);
        let state = Arc::new(AdmissionState::from_config(
            &self.config,
            caches.secrets,
            caches.nodes,
            self.metrics.clone(),
        ));
        self.serve(state, registry, watch, shutdown).await
    }

    /// Serves with caches the caller feeds (tests, benchmarks).
    pub async fn serve(
        self,
        state: Arc<AdmissionState>,
        registry: Arc<Registry>,
        watch: impl Future<Output = ()> + Send + 'static,
        shutdown: impl Future<Output = ()> + Send + 'static,
    ) -> Result<(), WebhookError> {
        let handle = axum_server::Handle::new();
        let grace = self.config.shutdown_grace;
        let https_addr = self.https_addr();
        let health_addr = self.health_addr();

        let admission = admission_router_with(state.clone(), self.extra_routes);
        let guard = ConnectionGuard::new(
            self.config.max_connections,
            self.config.idle_timeout,
            &self.metrics,
        );
        let acceptor = RustlsAcceptor::new(self.certificate.rustls_config())
            .handshake_timeout(HANDSHAKE_TIMEOUT)
            .acceptor(guard);
        let mut server = axum_server::from_tcp(self.https)
            .map_err(|source| WebhookError::Serve {
                what: "admission",
                source,
            })?
            .acceptor(acceptor)
            .first_request_timeout(FIRST_REQUEST_TIMEOUT)
            .handle(handle.clone());
        server
            .http_builder()
            .http1()
            .timer(TokioTimer::new())
            .header_read_timeout(self.config.idle_timeout);
        let https = server.serve(admission.into_make_service());
        let health_listener = tokio::net::TcpListener::from_std(self.health).map_err(|source| {
            WebhookError::Serve {
                what: "health",
                source,
            }
        })?;
        let (health_stop_tx, health_stop_rx) = tokio::sync::oneshot::channel::<()>();
        let health = serve_health(
            health_listener,
            health_router(move || state.readiness(), registry),
            HealthLimits::default(),
            async move {
                let _ = health_stop_rx.await;
            },
        );

        let watch_task = tokio::spawn(watch);
        let reload_task = tokio::spawn(self.certificate.clone().watch());
        let shutdown_handle = handle.clone();
        let shutdown_task = tokio::spawn(async move {
            shutdown.await;
            tracing::info!(
                ?grace,
                "shutting down the webhook; draining in-flight requests"
            );
            shutdown_handle.graceful_shutdown(Some(grace));
        });
        tracing::info!(%https_addr, %health_addr, "webhook serving");

        let health_task = tokio::spawn(health);
        let result = https.await.map_err(|source| WebhookError::Serve {
            what: "admission",
            source,
        });
        let _ = health_stop_tx.send(());
        let _ = health_task.await;
        watch_task.abort();
        reload_task.abort();
        shutdown_task.abort();
        tracing::info!("webhook stopped");
        result
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used)]

    use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};

    use super::*;

    /// Reads until the server closes the connection; `None` when it stays open past `within`.
    async fn closed_within(
        stream: &mut tokio::net::TcpStream,
        within: Duration,
    ) -> Option<Vec<u8>> {
        let mut read = Vec::new();
        tokio::time::timeout(within, stream.read_to_end(&mut read))
            .await
            .ok()
            .map(|_| read)
    }

    /// The health port sits in the Service: a stalled connection is closed, connections are
    /// capped, and it keeps answering a fresh client through both.
    #[tokio::test]
    async fn the_health_port_closes_stalled_connections_and_caps_them() {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let limits = HealthLimits {
            max_connections: 2,
            idle_timeout: Duration::from_millis(300),
            first_request_timeout: Duration::from_millis(200),
        };
        let registry = Arc::new(Registry::default());
        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        let server = tokio::spawn(serve_health(
            listener,
            health_router(|| Ok(()), registry),
            limits,
            async move {
                let _ = stopped.await;
            },
        ));

        // Two stalled connections hold both slots; a third is closed at once.
        let mut stalled = [
            tokio::net::TcpStream::connect(addr).await.unwrap(),
            tokio::net::TcpStream::connect(addr).await.unwrap(),
        ];
        tokio::time::sleep(Duration::from_millis(50)).await;
        let mut third = tokio::net::TcpStream::connect(addr).await.unwrap();
        let _ = third
            .write_all(b"GET /healthz HTTP/1.1\r\nHost: h\r\n\r\n")
            .await;
        let answer = closed_within(&mut third, Duration::from_secs(2)).await;
        assert!(
            answer.is_some_and(|a| a.is_empty()),
            "over the cap: closed with no answer"
        );
        // The stalled ones are closed by the server, with no answer.
        for stream in &mut stalled {
            let read = closed_within(stream, Duration::from_secs(2)).await;
            assert!(read.is_some(), "a stalled connection stays open");
        }
        // A client that asks gets its answer.
        let mut fresh = tokio::net::TcpStream::connect(addr).await.unwrap();
        fresh
            .write_all(b"GET /healthz HTTP/1.1\r\nHost: h\r\nConnection: close\r\n\r\n")
            .await
            .unwrap();
        let answer = closed_within(&mut fresh, Duration::from_secs(2))
            .await
            .unwrap();
        assert!(
            answer.starts_with(b"HTTP/1.1 200"),
            "{}",
            String::from_utf8_lossy(&answer)
        );

        stop.send(()).unwrap();
        tokio::time::timeout(Duration::from_secs(10), server)
            .await
            .expect("stops")
            .unwrap()
            .unwrap();
    }
}
