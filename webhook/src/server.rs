//! HTTP: the admission router (HTTPS, axum over rustls) and the health router (plain HTTP).
//!
//! [`admission_router`] and [`health_router`] are public so tests call them directly with
//! `tower::ServiceExt::oneshot`, without a socket; [`Webhook`] binds and serves them, the
//! admission router within [`admission_limits`] through [`crate::serve`].

use std::net::{SocketAddr, TcpListener};
use std::sync::Arc;
use std::time::{Duration, Instant};

use axum::Router;
use axum::extract::{Request, State};
use axum::http::{StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use jiff::Timestamp;
use kube::Client;
use kube::core::admission::Operation;
use prometheus_client::registry::Registry;
use thiserror::Error;
use tracing::Instrument;

use crate::admission::{AdmissionContext, Decision, Review, WebhookKind, decide};
use crate::cache::{Caches, NodeCache, SecretCache};
use crate::config::{GuardPolicy, SecretPolicy, WebhookConfig};
use crate::limits::{
    BodyBudget, ConnectionCounters, ConnectionLimits, RequestLimit, mark_use, read_body,
};
use crate::metrics::{
    LatencyLabels, OperationLabel, OutcomeLabel, RequestLabels, WebhookLabel, WebhookMetrics,
};
use crate::review::AdmissionResponse;
use crate::serve::{Port, serve};
use crate::tls::{ServingCertificate, TlsError};

/// Largest Secret review accepted. The API server keeps a Secret's data to 1 MiB and etcd an
/// object to 1.5 MiB; an UPDATE carries the Secret twice, its data base64-encoded (a third more),
/// plus metadata and JSON around it: about 3.5 MiB at most.
pub const MAX_SECRET_REVIEW_BYTES: usize = 4 << 20;
/// Largest SeiNode review accepted. A SeiNode is a few KiB; an UPDATE with a kubectl
/// last-applied annotation and managedFields, twice, stays well below this.
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
    pub body_budget: Arc<BodyBudget>,
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
            body_budget: Arc::new(BodyBudget::new(config.max_body_memory, &metrics)),
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

/// The admission endpoints.
pub fn admission_router(state: Arc<AdmissionState>) -> Router {
    let route = |kind: WebhookKind| {
        post(
            move |State(state): State<Arc<AdmissionState>>, request: Request| {
                admit(state, kind, request)
            },
        )
    };
    Router::new()
        .route(VALIDATE_SEINODES_PATH, route(WebhookKind::ValidateSeiNode))
        .route(MUTATE_SEINODES_PATH, route(WebhookKind::MutateSeiNode))
        .route(VALIDATE_SECRETS_PATH, route(WebhookKind::GuardSecret))
        .with_state(state)
}

/// The admission port's connection limits: the configured caps, idle time and age, one HTTP/2
/// stream per request slot, and the fixed handshake and first-request timeouts.
pub fn admission_limits(config: &WebhookConfig) -> ConnectionLimits {
    ConnectionLimits {
        max_connections: config.max_connections,
        max_per_source: config.max_connections_per_source,
        idle_timeout: config.idle_timeout,
        max_age: config.max_connection_age,
        handshake_timeout: HANDSHAKE_TIMEOUT,
        first_request_timeout: FIRST_REQUEST_TIMEOUT,
        max_streams: u32::try_from(config.max_concurrent_requests).unwrap_or(u32::MAX),
    }
}

/// What one client can hold of the health port, which sits in the Service and answers anyone
/// who reaches the pod: the kubelet's probes and a Prometheus scrape need a few connections and
/// send their request at once. Every request counts as use; there is no TLS.
pub const HEALTH_LIMITS: ConnectionLimits = ConnectionLimits {
    max_connections: 64,
    max_per_source: 16,
    idle_timeout: Duration::from_secs(30),
    max_age: Duration::from_secs(300),
    handshake_timeout: Duration::from_secs(5),
    first_request_timeout: Duration::from_secs(5),
    max_streams: 4,
};

/// Serves `router` (the health router) on `listener` in plain HTTP within `limits`, until
/// `shutdown` resolves; then lets requests in flight finish. Every request counts as use.
pub async fn serve_health(
    listener: tokio::net::TcpListener,
    router: Router,
    limits: ConnectionLimits,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> std::io::Result<()> {
    let router = router.layer(axum::middleware::map_request(
        |request: Request| async move {
            mark_use(&request);
            request
        },
    ));
    let port = Port {
        listener,
        router,
        tls: None,
        limits,
        counters: ConnectionCounters::default(),
    };
    serve(port, shutdown, Duration::from_secs(5)).await
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
/// a decision is always HTTP 200 with the request's uid. The body is read within the budget of
/// bytes in flight; a request slot is taken only once it has all arrived.
async fn admit(state: Arc<AdmissionState>, kind: WebhookKind, request: Request) -> Response {
    let started = Instant::now();
    let _in_flight = InFlight::enter(&state.metrics);
    let webhook = WebhookLabel::from(kind);
    let deadline = state.request_deadline;
    let used = request
        .extensions()
        .get::<Arc<crate::limits::Activity>>()
        .cloned();
    let body = match read_body(
        &state.body_budget,
        request.into_body(),
        kind.max_body_bytes(),
        tokio::time::Instant::from_std(started) + deadline,
    )
    .await
    {
        Ok(body) => body,
        Err(error) => {
            let response = error.into_response();
            // A 429 is counted as shed, not as a request: the API server sends it again.
            if response.status() != StatusCode::TOO_MANY_REQUESTS {
                tracing::warn!(webhook = kind.as_str(), status = %response.status(), "bad admission request body");
                count(
                    &state,
                    webhook,
                    OperationLabel::unknown,
                    OutcomeLabel::bad_request,
                    started,
                );
            }
            return response;
        }
    };
    let _slot = match state.request_limit.try_slot() {
        Ok(slot) => slot,
        Err(response) => return *response,
    };
    let span = tracing::info_span!(
        "admission",
        webhook = kind.as_str(),
        uid = tracing::field::Empty,
        kind = tracing::field::Empty,
        namespace = tracing::field::Empty,
        // `object`, not `name`: a JSON log line's span object has its own `name` (the span's).
        object = tracing::field::Empty,
        operation = tracing::field::Empty,
        dry_run = tracing::field::Empty,
        decision = tracing::field::Empty,
    );
    let result = async {
        // The body's charge is held until the answer is built: what parsing and deciding
        // allocate is what the budget's second byte per byte stands for.
        let review = Review::parse(kind, &body.bytes)?;
        if let Some((namespace, name)) = crate::admission::secret_to_read(&review) {
            // The read gets what is left of the deadline (and at most its own second).
            let left = deadline.saturating_sub(started.elapsed());
            let read = state.secrets.ensure(&namespace, &name);
            if tokio::time::timeout(left, read).await.is_err() {
                tracing::warn!(%namespace, %name, "the Secret read ran out of the request deadline");
                state.metrics.count_secret_read("failed");
            }
        }
        let summary = review.summary();
        let span = tracing::Span::current();
        span.record("uid", summary.uid);
        span.record("kind", summary.kind);
        span.record("namespace", summary.namespace);
        span.record("object", summary.name.as_str());
        span.record("operation", operation_label(summary.operation));
        span.record("dry_run", summary.dry_run);
        let operation = operation_of(summary.operation);
        let ctx = AdmissionContext {
            secrets: &state.secrets,
            nodes: &state.nodes,
            secret_policy: state.secret_policy,
            guard_policy: state.guard_policy,
            cluster_domain: &state.cluster_domain,
            now: Timestamp::now(),
        };
        let decision = decide(&review, &ctx);
        span.record("decision", decision.outcome.as_str());
        match decision.denial() {
            Some(message) => tracing::info!(message, "denied"),
            None => tracing::debug!("admitted"),
        }
        Ok::<_, String>((operation, decision))
    }
    .instrument(span)
    .await;

    let (operation, outcome, response) = match result {
        Ok((operation, Decision { response, outcome })) => {
            // An answered review is what keeps a connection in use.
            if let Some(used) = used {
                used.mark_use();
            }
            (
                operation,
                OutcomeLabel::from(outcome),
                review_response(&response),
            )
        }
        Err(message) => {
            tracing::warn!(webhook = kind.as_str(), %message, "bad admission request");
            (
                OperationLabel::unknown,
                OutcomeLabel::bad_request,
                bad_request(message),
            )
        }
    };
    count(&state, webhook, operation, outcome, started);
    response
}

fn count(
    state: &AdmissionState,
    webhook: WebhookLabel,
    operation: OperationLabel,
    outcome: OutcomeLabel,
    started: Instant,
) {
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

/// The review as JSON.
pub fn review_response(response: &AdmissionResponse) -> Response {
    match response.to_review_json() {
        Ok(body) => (
            StatusCode::OK,
            [(header::CONTENT_TYPE, "application/json")],
            body,
        )
            .into_response(),
        Err(e) => bad_request(format!("failed to encode the response: {e}")),
    }
}

fn bad_request(message: String) -> Response {
    (
        StatusCode::BAD_REQUEST,
        [(header::CONTENT_TYPE, "text/plain; charset=utf-8")],
        message + "\n",
    )
        .into_response()
}

fn operation_of(operation: &Operation) -> OperationLabel {
    match operation {
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
        })
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
        let grace = self.config.shutdown_grace;
        let https_addr = self.https_addr();
        let health_addr = self.health_addr();
        let listener = |listener: TcpListener, what: &'static str| {
            tokio::net::TcpListener::from_std(listener)
                .map_err(|source| WebhookError::Serve { what, source })
        };
        let admission = Port {
            listener: listener(self.https, "admission")?,
            router: admission_router(state.clone()),
            tls: Some(self.certificate.rustls_config()),
            limits: admission_limits(&self.config),
            counters: ConnectionCounters::of(&self.metrics),
        };
        let health_listener = listener(self.health, "health")?;

        // The health port stops once the admission port has drained.
        let (health_stop, health_stopped) = tokio::sync::oneshot::channel::<()>();
        let health = tokio::spawn(serve_health(
            health_listener,
            health_router(move || state.readiness(), registry),
            HEALTH_LIMITS,
            async move {
                let _ = health_stopped.await;
            },
        ));
        let watch_task = tokio::spawn(watch);
        let reload_task = tokio::spawn(self.certificate.clone().watch());
        tracing::info!(%https_addr, %health_addr, "webhook serving");

        let shutdown = async move {
            shutdown.await;
            tracing::info!(
                ?grace,
                "shutting down the webhook; draining in-flight requests"
            );
        };
        let result =
            serve(admission, shutdown, grace)
                .await
                .map_err(|source| WebhookError::Serve {
                    what: "admission",
                    source,
                });
        let _ = health_stop.send(());
        let _ = health.await;
        watch_task.abort();
        reload_task.abort();
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
        let limits = ConnectionLimits {
            max_connections: 2,
            idle_timeout: Duration::from_millis(300),
            first_request_timeout: Duration::from_millis(200),
            ..HEALTH_LIMITS
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
