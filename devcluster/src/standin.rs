//! Stand-ins for what runs in a node's pod, so the system can be exercised without Sei's images.
//!
//! - [`StandInSidecar`]: in-process, for the sidecar-probe tests (`tests/sidecar.rs`) that need
//!   to change what the server presents at will: an HTTPS server on loopback that answers
//!   `/v0/healthz` the way kube-rbac-proxy in front of a healthy sidecar would, with the
//!   certificate and key of the node's Secret. Its certificate and answer can be changed while it
//!   runs, and it records every request it gets — what a rogue server in the pod's name would
//!   collect. (`local --demo` runs the real kube-rbac-proxy.)
//! - [`run_sidecar`] and [`run_seid`]: processes (`seinode-tls stand-in sidecar|seid`) that the
//!   process kubelet runs in real Pods in place of the sidecar and seid images, and that stop
//!   cleanly on SIGTERM, as a kubelet expects.
//!
//! The sidecar process stands in for seictl (`seictl serve`), so it follows seictl's published
//! contract (its `serve.go`, `sidecar/server/server.go` and `auth.go`) and nothing else: a pod
//! that works with the stand-in must work with the real image, so the stand-in must not accept a
//! configuration or request the real sidecar refuses, nor refuse one it accepts. The rules:
//!
//! - `SEI_SIDECAR_PORT` is the port (default 7777). `SEI_SIDECAR_AUTHN_MODE` unset or
//!   `unauthenticated` listens on every interface with no authentication; `trusted-header`
//!   listens on 127.0.0.1 only and requires the identity header. The mode is read trimmed and
//!   case-insensitively; any other value stops the process at start, so a typo cannot open the
//!   API. `SEI_HOME` is the data directory (default `/sei`), `SEI_CHAIN_ID` the chain.
//! - In `trusted-header` mode every path except `/v0/healthz`, `/v0/startupz`, `/v0/livez` and
//!   `/v0/metrics` needs exactly one non-empty `X-Remote-User` header (what kube-rbac-proxy sets
//!   after it authenticated and authorized the caller); none, an empty one or two are a 401,
//!   counted by reason in `seictl_sidecar_authn_rejections_total`. The check runs before routing,
//!   as seictl's middleware wraps its whole mux: an unknown path without the header is a 401 too.
//! - `/v0/healthz` and `/v0/startupz` answer 200 once a `mark-ready` task completed (503 before
//!   and after a `mark-not-ready`), `/v0/livez` 200, `/v0/status` `{"status": "Initializing" |
//!   "Ready"}`, `/v0/node-id` the CometBFT id of `$SEI_HOME/config/node_key.json`, `/v0/metrics`
//!   a Prometheus exposition.
//! - `POST /v0/tasks` takes `{"id"?, "type", "params"?}` and answers 201 `{"id"}`; a given id
//!   (a UUID) makes the submission idempotent. `GET /v0/tasks`, `GET` and `DELETE
//!   /v0/tasks/{id}` read and remove results. Errors are `{"error": "..."}`.
//!
//! What the stand-in leaves out, it leaves out on purpose: tasks do nothing (see
//! [`SIDECAR_TASK_TYPES`]), results live in memory, and it writes nothing anywhere (the pod runs
//! it as a non-root user on a read-only root filesystem). One way it is more lenient than
//! seictl, and knowingly so: `seictl serve` refuses to start without `SEI_CHAIN_ID`,
//! `SEI_GENESIS_BUCKET`, `SEI_GENESIS_REGION`, `SEI_SNAPSHOT_BUCKET` and `SEI_SNAPSHOT_REGION`,
//! which only its tasks use; the stand-in requires none of them.

use parking_lot::{Mutex, MutexGuard};
use std::collections::BTreeMap;
use std::fmt;
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::path::PathBuf;
use std::str::FromStr;
use std::sync::Arc;
use std::sync::atomic::{AtomicU16, Ordering};
use std::time::Duration;

use anyhow::Context as _;
use axum::Json;
use axum::body::Bytes;
use axum::extract::{DefaultBodyLimit, Path, Request, State};
use axum::http::{HeaderMap, Method, StatusCode, header};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum_server::Handle;
use axum_server::tls_rustls::RustlsConfig;
use seinode_tls_crds::DEFAULT_SIDECAR_PORT;
use serde_json::{Map, Value};
use sha2::Digest as _;

struct Shared {
    status: AtomicU16,
    /// Every request received: what a rogue server in the pod's name would collect.
    requests: Mutex<Vec<Recorded>>,
}

/// One request as it arrived: method, path and every header.
#[derive(Debug, Clone)]
pub struct Recorded {
    pub method: String,
    pub path: String,
    pub headers: Vec<(String, String)>,
}

/// A running stand-in; stops when dropped.
pub struct StandInSidecar {
    addr: SocketAddr,
    config: RustlsConfig,
    shared: Arc<Shared>,
    handle: Handle<SocketAddr>,
}

impl StandInSidecar {
    /// Serves `cert_pem`/`key_pem` on a free loopback port.
    pub async fn start(cert_pem: &str, key_pem: &str) -> anyhow::Result<Self> {
        let config =
            RustlsConfig::from_pem(cert_pem.as_bytes().to_vec(), key_pem.as_bytes().to_vec())
                .await
                .context("the stand-in's certificate and key are not usable")?;
        let listener = std::net::TcpListener::bind((Ipv4Addr::LOCALHOST, 0))
            .context("failed to bind a loopback port")?;
        listener.set_nonblocking(true)?;
        let addr = listener.local_addr()?;
        let shared = Arc::new(Shared {
            status: AtomicU16::new(200),
            requests: Mutex::default(),
        });
        let app = axum::Router::new()
            .fallback(record)
            .with_state(shared.clone());
        let handle = Handle::new();
        let server = axum_server::from_tcp_rustls(listener, config.clone())?.handle(handle.clone());
        tokio::spawn(async move {
            if let Err(error) = server.serve(app.into_make_service()).await {
                tracing::warn!(%error, "stand-in sidecar stopped");
            }
        });
        Ok(Self {
            addr,
            config,
            shared,
            handle,
        })
    }

    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// Serves another certificate from the next connection on.
    pub async fn set_certificate(&self, cert_pem: &str, key_pem: &str) -> anyhow::Result<()> {
        self.config
            .reload_from_pem(cert_pem.as_bytes().to_vec(), key_pem.as_bytes().to_vec())
            .await
            .context("the new certificate and key are not usable")
    }

    /// The HTTP status `/v0/healthz` answers with.
    pub fn set_status(&self, status: u16) {
        self.shared.status.store(status, Ordering::Relaxed);
    }

    /// Every request received so far.
    pub fn requests(&self) -> Vec<Recorded> {
        self.shared.requests.lock().clone()
    }
}

impl Drop for StandInSidecar {
    fn drop(&mut self) {
        self.handle.shutdown();
    }
}

/// Records every request, and answers `/v0/healthz` with the configured status (404 elsewhere).
async fn record(
    State(shared): State<Arc<Shared>>,
    method: axum::http::Method,
    uri: axum::http::Uri,
    headers: HeaderMap,
) -> StatusCode {
    let recorded = Recorded {
        method: method.to_string(),
        path: uri.path().to_owned(),
        headers: headers
            .iter()
            .map(|(k, v)| {
                (
                    k.to_string(),
                    String::from_utf8_lossy(v.as_bytes()).into_owned(),
                )
            })
            .collect(),
    };
    let health = recorded.path == SIDECAR_HEALTHZ_PATH;
    shared.requests.lock().push(recorded);
    if !health {
        return StatusCode::NOT_FOUND;
    }
    StatusCode::from_u16(shared.status.load(Ordering::Relaxed))
        .unwrap_or(StatusCode::INTERNAL_SERVER_ERROR)
}

// === The sidecar process (seictl's contract) ===

/// The sidecar API's port (seictl's `--port` flag reads it).
pub const SIDECAR_PORT_ENV: &str = "SEI_SIDECAR_PORT";
/// How seictl authenticates callers: unset or `unauthenticated`, or `trusted-header`.
pub const SIDECAR_AUTHN_MODE_ENV: &str = "SEI_SIDECAR_AUTHN_MODE";
/// The chain the node belongs to.
pub const SIDECAR_CHAIN_ID_ENV: &str = "SEI_CHAIN_ID";
/// What `seictl serve` will not start without (each set and not empty), in the order it checks.
pub const SIDECAR_REQUIRED_ENV: [&str; 5] = [
    SIDECAR_CHAIN_ID_ENV,
    "SEI_GENESIS_BUCKET",
    "SEI_GENESIS_REGION",
    "SEI_SNAPSHOT_BUCKET",
    "SEI_SNAPSHOT_REGION",
];
/// The node's data directory (seictl's global `--home` flag reads it).
pub const SIDECAR_HOME_ENV: &str = "SEI_HOME";
/// seictl's data directory when `SEI_HOME` is unset.
pub const DEFAULT_SIDECAR_HOME: &str = "/sei";
/// The identity kube-rbac-proxy forwards in `trusted-header` mode (names are case-insensitive).
pub const REMOTE_USER_HEADER: &str = "x-remote-user";
/// The paths `trusted-header` mode serves without an identity: the kubelet's probes and the
/// Prometheus scrape carry none (seictl's `BypassPaths()`, in its order).
pub const SIDECAR_BYPASS_PATHS: [&str; 4] =
    ["/v0/healthz", "/v0/livez", "/v0/metrics", "/v0/startupz"];
/// Readiness: 200 once `mark-ready` completed.
pub const SIDECAR_HEALTHZ_PATH: &str = "/v0/healthz";

/// The task that makes the sidecar ready (`/v0/healthz` 200, status `Ready`).
pub const MARK_READY: &str = "mark-ready";
/// The task that takes readiness back and forgets every `mark-ready` result.
pub const MARK_NOT_READY: &str = "mark-not-ready";

/// Every task type `seictl serve` registers a handler for (its `serve.go`); any other type is a
/// 400. In the stand-in every task completes at once when submitted and does nothing else,
/// except that [`MARK_READY`] makes the sidecar ready and [`MARK_NOT_READY`] undoes it, as in
/// seictl. Parameters are not looked at: seictl would fail a task whose parameters its handler
/// cannot use, the stand-in completes it.
pub const SIDECAR_TASK_TYPES: [&str; 25] = [
    "snapshot-restore",
    "config-patch",
    "config-apply",
    "config-validate",
    "config-reload",
    MARK_READY,
    MARK_NOT_READY,
    "restart-seid",
    "stop-seid",
    "reset-data",
    "configure-genesis",
    "configure-state-sync",
    "snapshot-upload",
    "snapshot-upload-once",
    "result-export",
    "await-condition",
    "generate-identity",
    "generate-gentx",
    "upload-genesis-artifacts",
    "assemble-and-upload-genesis",
    "set-genesis-peers",
    "gov-vote",
    "gov-software-upgrade",
    "gov-param-change",
    "evm-logical-digest",
];

/// seictl's default port, the one the controller assumes when `spec.sidecar.port` is unset.
// Checked in the tests: the constant is 7777, well inside u16.
const DEFAULT_PORT: u16 = DEFAULT_SIDECAR_PORT as u16;
/// seictl's `ReadHeaderTimeout`.
const HEADER_READ_TIMEOUT: Duration = Duration::from_secs(5);
/// Near seictl's `MaxHeaderBytes` (32 KiB): hyper's read buffer, which holds the request head.
const MAX_HEAD_BYTES: usize = 32 * 1024;
/// The stand-in's own bound on a request body (seictl has none); task requests are small.
const MAX_BODY_BYTES: usize = 1024 * 1024;
/// How long in-flight requests get after SIGTERM (seictl's, under the default 30 s grace).
const SHUTDOWN_GRACE: Duration = Duration::from_secs(25);
/// How many results `GET /v0/tasks` lists, newest first (seictl's).
const RECENT_RESULTS: usize = 100;

/// How the sidecar authenticates callers (`SEI_SIDECAR_AUTHN_MODE`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum AuthnMode {
    /// Every interface, every caller trusted.
    #[default]
    Unauthenticated,
    /// Loopback only, behind kube-rbac-proxy, which names the caller in `X-Remote-User`.
    TrustedHeader,
}

impl AuthnMode {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Unauthenticated => "unauthenticated",
            Self::TrustedHeader => "trusted-header",
        }
    }
}

impl fmt::Display for AuthnMode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// An `SEI_SIDECAR_AUTHN_MODE` seictl does not know (the value as read: trimmed, lowercase).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error(
    "{SIDECAR_AUTHN_MODE_ENV}={0:?} is not recognized (allowed: unset, \"unauthenticated\", \"trusted-header\")"
)]
pub struct UnknownAuthnMode(pub String);

impl FromStr for AuthnMode {
    type Err = UnknownAuthnMode;

    /// Reads the variable's value as seictl does: trimmed, case-insensitively, the empty string
    /// meaning unset.
    fn from_str(raw: &str) -> Result<Self, Self::Err> {
        let value = raw.trim().to_lowercase();
        match value.as_str() {
            "" | "unauthenticated" => Ok(Self::Unauthenticated),
            "trusted-header" => Ok(Self::TrustedHeader),
            _ => Err(UnknownAuthnMode(value)),
        }
    }
}

/// What the sidecar stand-in needs from its environment.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct SidecarStandInConfig {
    pub mode: AuthnMode,
    pub port: u16,
    pub chain_id: Option<String>,
    /// `SEI_HOME`; `None` is seictl's default, [`DEFAULT_SIDECAR_HOME`].
    pub home: Option<PathBuf>,
}

impl SidecarStandInConfig {
    /// Reads the variables seictl reads through `var` (the process environment in
    /// [`run_sidecar`], a table in the tests).
    /// Like seictl, it refuses to start without `SEI_CHAIN_ID` and the genesis and snapshot
    /// bucket and region variables ([`SIDECAR_REQUIRED_ENV`]), though its tasks never use them:
    /// a pod that would crash-loop with the real image must fail here too.
    pub fn from_vars(var: impl Fn(&str) -> Option<String>) -> anyhow::Result<Self> {
        let port = match var(SIDECAR_PORT_ENV) {
            Some(text) => text.parse().map_err(|_| {
                anyhow::anyhow!("{SIDECAR_PORT_ENV}={text:?} is not a port number (0 to 65535)")
            })?,
            None => DEFAULT_PORT,
        };
        let mode = var(SIDECAR_AUTHN_MODE_ENV)
            .as_deref()
            .unwrap_or_default()
            .parse()?;
        if let Some(missing) = SIDECAR_REQUIRED_ENV
            .iter()
            .find(|name| var(name).is_none_or(|value| value.is_empty()))
        {
            anyhow::bail!("required environment variable {missing} is not set");
        }
        let chain_id = var(SIDECAR_CHAIN_ID_ENV).filter(|id| !id.is_empty());
        let home = var(SIDECAR_HOME_ENV)
            .map(|home| home.trim().to_owned())
            .filter(|home| !home.is_empty())
            .map(PathBuf::from);
        Ok(Self {
            mode,
            port,
            chain_id,
            home,
        })
    }

    /// Where seictl listens: every interface, or only loopback in `trusted-header` mode (so the
    /// only way in from outside the pod is through the proxy).
    pub fn listen_address(&self) -> SocketAddr {
        let ip = match self.mode {
            AuthnMode::Unauthenticated => Ipv4Addr::UNSPECIFIED,
            AuthnMode::TrustedHeader => Ipv4Addr::LOCALHOST,
        };
        SocketAddr::new(IpAddr::V4(ip), self.port)
    }

    /// The data directory: `SEI_HOME`, else `/sei`.
    pub fn home_dir(&self) -> PathBuf {
        self.home
            .clone()
            .unwrap_or_else(|| PathBuf::from(DEFAULT_SIDECAR_HOME))
    }
}

/// Why the stand-in was started with a command line `seictl` would not serve from.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error(
    "the sidecar stand-in runs only `seictl serve` (configured through its environment), not `seictl {0}`"
)]
pub struct SidecarArgsError(pub String);

/// Accepts what the stand-in is started with: nothing (the image's entrypoint) or `serve` (the
/// pod's `command: [seictl, serve]`, through the image's `seictl` script).
pub fn check_sidecar_args(args: &[String]) -> Result<(), SidecarArgsError> {
    match args {
        [] => Ok(()),
        [serve] if serve == "serve" => Ok(()),
        _ => Err(SidecarArgsError(args.join(" "))),
    }
}

/// `seinode-tls stand-in sidecar [serve]` (the image's `seictl serve`): the sidecar API on
/// [`SidecarStandInConfig::listen_address`], each request logged to stderr, until SIGTERM or
/// SIGINT.
pub async fn run_sidecar(args: Vec<String>) -> anyhow::Result<()> {
    // Before anything else, so a SIGTERM sent as soon as the pod runs ends it cleanly.
    let terminated = termination_signal()?;
    check_sidecar_args(&args)?;
    let config = SidecarStandInConfig::from_vars(|name| std::env::var(name).ok())?;
    let address = config.listen_address();
    let listener = tokio::net::TcpListener::bind(address)
        .await
        .with_context(|| format!("failed to bind {address}"))?;
    let bypass_paths = match config.mode {
        AuthnMode::TrustedHeader => &SIDECAR_BYPASS_PATHS[..],
        AuthnMode::Unauthenticated => &[],
    };
    tracing::info!(
        address = %listener.local_addr()?,
        authn_mode = %config.mode,
        ?bypass_paths,
        chain_id = config.chain_id.as_deref().unwrap_or("<unset>"),
        home = %config.home_dir().display(),
        "stand-in sidecar listening"
    );
    serve_sidecar(listener, config, async move {
        let signal = terminated.await;
        tracing::info!(signal, "stand-in sidecar stopping");
    })
    .await?;
    tracing::info!("stand-in sidecar stopped");
    Ok(())
}

/// Serves [`sidecar_router`] on `listener` (HTTP/1.1, as seictl's Go server) until `shutdown`
/// resolves, then gives in-flight requests [`SHUTDOWN_GRACE`] to finish.
pub async fn serve_sidecar(
    listener: tokio::net::TcpListener,
    config: SidecarStandInConfig,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> anyhow::Result<()> {
    let handle = Handle::<SocketAddr>::new();
    let mut server = axum_server::Server::<SocketAddr>::from_listener(listener).http1_only();
    server
        .http_builder()
        .http1()
        .header_read_timeout(HEADER_READ_TIMEOUT)
        .max_buf_size(MAX_HEAD_BYTES);
    let serving = server
        .handle(handle.clone())
        .serve(sidecar_router(config).into_make_service());
    tokio::pin!(serving);
    tokio::select! {
        served = &mut serving => return served.context("the stand-in sidecar's server failed"),
        () = shutdown => handle.graceful_shutdown(Some(SHUTDOWN_GRACE)),
    }
    serving
        .await
        .context("the stand-in sidecar's server failed")
}

/// The sidecar API (see the module doc), with its own empty task store. In `trusted-header`
/// mode the identity check wraps every route and the 404 fallback, as seictl's middleware wraps
/// its whole mux. Public so tests call it without a socket (`tower::ServiceExt::oneshot`).
pub fn sidecar_router(config: SidecarStandInConfig) -> axum::Router {
    let state = Arc::new(SidecarState {
        home: config.home_dir(),
        engine: Mutex::new(Engine::new(jiff::Timestamp::now())),
        rejections: Mutex::default(),
    });
    let router = axum::Router::new()
        .route("/v0/healthz", get(healthz))
        .route("/v0/startupz", get(healthz))
        .route("/v0/livez", get(|| async { StatusCode::OK }))
        .route("/v0/status", get(status))
        .route("/v0/metrics", get(metrics))
        .route("/v0/node-id", get(node_id))
        .route("/v0/tasks", get(list_tasks).post(submit_task))
        .route("/v0/tasks/{id}", get(get_task).delete(delete_task))
        .fallback(|| async { (StatusCode::NOT_FOUND, "404 page not found\n") })
        .layer(DefaultBodyLimit::max(MAX_BODY_BYTES));
    let router = match config.mode {
        AuthnMode::Unauthenticated => router,
        AuthnMode::TrustedHeader => router.layer(middleware::from_fn_with_state(
            state.clone(),
            require_identity,
        )),
    };
    router
        .layer(middleware::from_fn(log_request))
        .with_state(state)
}

// --- State ---

struct SidecarState {
    home: PathBuf,
    engine: Mutex<Engine>,
    /// 401s of the identity check, by reason (a reason appears once counted, as in seictl).
    rejections: Mutex<BTreeMap<&'static str, u64>>,
}

impl SidecarState {
    fn engine(&self) -> MutexGuard<'_, Engine> {
        self.engine.lock()
    }

    fn rejections(&self) -> MutexGuard<'_, BTreeMap<&'static str, u64>> {
        self.rejections.lock()
    }
}

/// seictl's task engine, minus the work: results in memory, oldest first.
#[derive(Debug)]
struct Engine {
    ready: bool,
    results: Vec<TaskResult>,
    /// Submissions that ran, by type (`seictl_task_submissions_total`).
    submissions: BTreeMap<String, u64>,
    /// Generated ids: the router's start time, then a counter.
    id_seed: u64,
    generated: u64,
}

/// A task and its outcome, as seictl's `TaskResult` serializes.
#[derive(Debug, Clone, serde::Serialize)]
#[serde(rename_all = "camelCase")]
struct TaskResult {
    id: String,
    #[serde(rename = "type")]
    task_type: String,
    status: TaskStatus,
    run: u32,
    #[serde(skip_serializing_if = "no_params")]
    params: Option<Map<String, Value>>,
    submitted_at: jiff::Timestamp,
    /// Optional in seictl (a running task has none); the stand-in's tasks all completed.
    completed_at: jiff::Timestamp,
}

/// seictl also reports `running` and `failed`; the stand-in's tasks complete when submitted.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "lowercase")]
enum TaskStatus {
    Completed,
}

/// Go's `omitempty` on a map: absent and empty are both left out.
fn no_params(params: &Option<Map<String, Value>>) -> bool {
    params.as_ref().is_none_or(Map::is_empty)
}

/// Why `POST /v0/tasks` is a 400; the messages are seictl's.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
enum SubmitError {
    #[error("invalid request body")]
    InvalidBody,
    #[error("type is required")]
    MissingType,
    #[error("unknown task type: {0}")]
    UnknownType(String),
    #[error("task ID must be a valid UUID: {0:?}")]
    InvalidId(String),
}

/// The body of `POST /v0/tasks`.
#[derive(Debug, Clone, PartialEq, Default)]
struct TaskRequest {
    id: String,
    task_type: String,
    params: Option<Map<String, Value>>,
}

impl TaskRequest {
    /// Decodes the body as Go's `json.Decoder` decodes seictl's `TaskRequest`: the first JSON
    /// value only, `null` or an absent field leaves it empty, field names match
    /// case-insensitively, unknown fields are ignored, a field of the wrong JSON type fails.
    fn decode(body: &[u8]) -> Result<Self, SubmitError> {
        let value = serde_json::Deserializer::from_slice(body)
            .into_iter::<Value>()
            .next()
            .ok_or(SubmitError::InvalidBody)?
            .map_err(|_| SubmitError::InvalidBody)?;
        let fields = match value {
            Value::Null => return Ok(Self::default()),
            Value::Object(fields) => fields,
            _ => return Err(SubmitError::InvalidBody),
        };
        let mut request = Self::default();
        for (name, value) in fields {
            match (name.to_ascii_lowercase().as_str(), value) {
                (_, Value::Null) => {}
                ("id", Value::String(id)) => request.id = id,
                ("type", Value::String(task_type)) => request.task_type = task_type,
                ("params", Value::Object(params)) => request.params = Some(params),
                ("id" | "type" | "params", _) => return Err(SubmitError::InvalidBody),
                _ => {}
            }
        }
        Ok(request)
    }
}

impl Engine {
    fn new(started: jiff::Timestamp) -> Self {
        Self {
            ready: false,
            results: Vec::new(),
            submissions: BTreeMap::new(),
            // The low bits of the start time in nanoseconds: ids differ from one run to the next.
            id_seed: started.as_nanosecond() as u64,
            generated: 0,
        }
    }

    /// seictl's `Submit`, with the task run at once: an unknown type or an id that is not a
    /// UUID is refused; an id already known answers that id and runs nothing (a failed task
    /// would run again in seictl; the stand-in's never fail).
    fn submit(
        &mut self,
        request: TaskRequest,
        now: jiff::Timestamp,
    ) -> Result<String, SubmitError> {
        if request.task_type.is_empty() {
            return Err(SubmitError::MissingType);
        }
        if !SIDECAR_TASK_TYPES.contains(&request.task_type.as_str()) {
            return Err(SubmitError::UnknownType(request.task_type));
        }
        if !request.id.is_empty() && !is_uuid(&request.id) {
            return Err(SubmitError::InvalidId(request.id));
        }
        let id = if request.id.is_empty() {
            self.generate_id()
        } else {
            request.id
        };
        if self.result(&id).is_some() {
            return Ok(id);
        }
        match request.task_type.as_str() {
            MARK_READY => self.ready = true,
            MARK_NOT_READY => {
                self.results.retain(|result| result.task_type != MARK_READY);
                self.ready = false;
            }
            _ => {}
        }
        *self
            .submissions
            .entry(request.task_type.clone())
            .or_default() += 1;
        self.results.push(TaskResult {
            id: id.clone(),
            task_type: request.task_type,
            status: TaskStatus::Completed,
            run: 1,
            params: request.params,
            submitted_at: now,
            completed_at: now,
        });
        Ok(id)
    }

    /// A version 4 UUID no result has yet.
    fn generate_id(&mut self) -> String {
        loop {
            self.generated += 1;
            let (high, low) = (self.id_seed, self.generated);
            let id = format!(
                "{:08x}-{:04x}-4{:03x}-{:04x}-{:012x}",
                high >> 32,
                (high >> 16) & 0xffff,
                high & 0xfff,
                0x8000 | ((low >> 48) & 0x3fff),
                low & 0xffff_ffff_ffff,
            );
            if self.result(&id).is_none() {
                return id;
            }
        }
    }

    fn result(&self, id: &str) -> Option<&TaskResult> {
        self.results.iter().find(|result| result.id == id)
    }

    fn recent(&self) -> Vec<TaskResult> {
        self.results
            .iter()
            .rev()
            .take(RECENT_RESULTS)
            .cloned()
            .collect()
    }

    fn remove(&mut self, id: &str) -> bool {
        let before = self.results.len();
        self.results.retain(|result| result.id != id);
        self.results.len() != before
    }
}

/// Whether `id` parses as a UUID the way seictl's `uuid.Parse` (google/uuid) takes it:
/// `xxxxxxxx-xxxx-xxxx-xxxx-xxxxxxxxxxxx`, that in braces or after `urn:uuid:`, or 32 hex digits.
fn is_uuid(id: &str) -> bool {
    let hyphenated = |text: &str| {
        text.len() == 36
            && text.char_indices().all(|(i, c)| match i {
                8 | 13 | 18 | 23 => c == '-',
                _ => c.is_ascii_hexdigit(),
            })
    };
    match id.len() {
        32 => id.chars().all(|c| c.is_ascii_hexdigit()),
        36 => hyphenated(id),
        38 => id.starts_with('{') && id.ends_with('}') && hyphenated(&id[1..37]),
        45 => {
            id.get(..9)
                .is_some_and(|prefix| prefix.eq_ignore_ascii_case("urn:uuid:"))
                && id.get(9..).is_some_and(hyphenated)
        }
        _ => false,
    }
}

// --- Authentication ---

/// Why the identity check refused a request; the reason is the metric's label.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Rejection {
    Missing,
    Empty,
    Duplicate,
}

impl Rejection {
    fn reason(self) -> &'static str {
        match self {
            Self::Missing => "missing_header",
            Self::Empty => "empty_header",
            Self::Duplicate => "duplicate_header",
        }
    }

    /// seictl's messages.
    fn message(self) -> &'static str {
        match self {
            Self::Missing => "missing X-Remote-User header",
            Self::Empty => "empty X-Remote-User header",
            Self::Duplicate => {
                "expected exactly one X-Remote-User header — proxy must overwrite, not append"
            }
        }
    }
}

/// Exactly one non-empty `X-Remote-User`: a proxy that appends instead of overwriting would let
/// a caller's own value arrive first, so two fail closed rather than trusting either.
fn check_identity(headers: &HeaderMap) -> Result<(), Rejection> {
    let mut values = headers.get_all(REMOTE_USER_HEADER).iter();
    match (values.next(), values.next()) {
        (None, _) => Err(Rejection::Missing),
        (Some(_), Some(_)) => Err(Rejection::Duplicate),
        (Some(value), None) if value.is_empty() => Err(Rejection::Empty),
        (Some(_), None) => Ok(()),
    }
}

async fn require_identity(
    State(state): State<Arc<SidecarState>>,
    request: Request,
    next: Next,
) -> Response {
    if SIDECAR_BYPASS_PATHS.contains(&request.uri().path()) {
        return next.run(request).await;
    }
    match check_identity(request.headers()) {
        Ok(()) => next.run(request).await,
        Err(rejection) => {
            *state.rejections().entry(rejection.reason()).or_default() += 1;
            error(StatusCode::UNAUTHORIZED, rejection.message())
        }
    }
}

// --- Handlers ---

fn error(status: StatusCode, message: impl fmt::Display) -> Response {
    (
        status,
        Json(serde_json::json!({ "error": message.to_string() })),
    )
        .into_response()
}

async fn healthz(State(state): State<Arc<SidecarState>>) -> StatusCode {
    if state.engine().ready {
        StatusCode::OK
    } else {
        StatusCode::SERVICE_UNAVAILABLE
    }
}

async fn status(State(state): State<Arc<SidecarState>>) -> Json<Value> {
    let status = if state.engine().ready {
        "Ready"
    } else {
        "Initializing"
    };
    Json(serde_json::json!({ "status": status }))
}

async fn metrics(State(state): State<Arc<SidecarState>>) -> Response {
    let rejections = state.rejections().clone();
    let submissions = state.engine().submissions.clone();
    let mut text = String::new();
    exposition(
        &mut text,
        "seictl_sidecar_authn_rejections_total",
        "Count of 401 responses from the trusted-header middleware, by reason.",
        "reason",
        rejections.iter().map(|(reason, n)| (*reason, *n)),
    );
    exposition(
        &mut text,
        "seictl_task_submissions_total",
        "Total number of tasks submitted.",
        "type",
        submissions
            .iter()
            .map(|(task_type, n)| (task_type.as_str(), *n)),
    );
    (
        [(
            header::CONTENT_TYPE,
            "text/plain; version=0.0.4; charset=utf-8",
        )],
        text,
    )
        .into_response()
}

/// Appends one counter family in the Prometheus text format; none without a series, as the Go
/// client leaves out a vector nothing was counted in. Label values come from fixed sets (task
/// types, rejection reasons) and need no escaping.
fn exposition<'a>(
    out: &mut String,
    name: &str,
    help: &str,
    label: &str,
    series: impl Iterator<Item = (&'a str, u64)>,
) {
    let series: Vec<_> = series.collect();
    if series.is_empty() {
        return;
    }
    out.push_str(&format!("# HELP {name} {help}\n# TYPE {name} counter\n"));
    for (value, count) in series {
        out.push_str(&format!("{name}{{{label}=\"{value}\"}} {count}\n"));
    }
}

/// `hex(sha256(ed25519 public key)[..20])` of `$SEI_HOME/config/node_key.json`, seictl's (and
/// CometBFT's) node id; 500 while the file is missing or not a key.
async fn node_id(State(state): State<Arc<SidecarState>>) -> Response {
    let path = state.home.join("config").join("node_key.json");
    let Ok(data) = tokio::fs::read(&path).await else {
        return error(
            StatusCode::INTERNAL_SERVER_ERROR,
            "node_key.json not found — generate-identity may not have run yet",
        );
    };
    match node_id_of(&data) {
        Ok(id) => Json(serde_json::json!({ "nodeId": id })).into_response(),
        Err(message) => error(StatusCode::INTERNAL_SERVER_ERROR, message),
    }
}

fn node_id_of(key_file: &[u8]) -> Result<String, &'static str> {
    use base64::Engine as _;

    /// The private key is the seed (32 bytes) then the public key (32 bytes).
    const PRIVATE_KEY_LEN: usize = 64;
    const PUBLIC_KEY_OFFSET: usize = 32;
    const NODE_ID_LEN: usize = 20;

    #[derive(serde::Deserialize)]
    struct KeyFile {
        priv_key: Option<PrivKey>,
    }
    #[derive(serde::Deserialize)]
    struct PrivKey {
        value: Option<String>,
    }

    let key_file: KeyFile =
        serde_json::from_slice(key_file).map_err(|_| "failed to parse node_key.json")?;
    let value = key_file
        .priv_key
        .and_then(|key| key.value)
        .unwrap_or_default();
    let key = base64::engine::general_purpose::STANDARD
        .decode(value)
        .ok()
        .filter(|key| key.len() == PRIVATE_KEY_LEN)
        .ok_or("invalid Ed25519 key in node_key.json")?;
    let hash = sha2::Sha256::digest(&key[PUBLIC_KEY_OFFSET..]);
    Ok(hash[..NODE_ID_LEN]
        .iter()
        .map(|byte| format!("{byte:02x}"))
        .collect())
}

async fn submit_task(State(state): State<Arc<SidecarState>>, body: Bytes) -> Response {
    let submitted = TaskRequest::decode(&body)
        .and_then(|request| state.engine().submit(request, jiff::Timestamp::now()));
    match submitted {
        Ok(id) => (StatusCode::CREATED, Json(serde_json::json!({ "id": id }))).into_response(),
        Err(e) => error(StatusCode::BAD_REQUEST, e),
    }
}

async fn list_tasks(State(state): State<Arc<SidecarState>>) -> Json<Vec<TaskResult>> {
    Json(state.engine().recent())
}

async fn get_task(State(state): State<Arc<SidecarState>>, Path(id): Path<String>) -> Response {
    match state.engine().result(&id) {
        Some(result) => Json(result.clone()).into_response(),
        None => error(StatusCode::NOT_FOUND, "task not found"),
    }
}

async fn delete_task(State(state): State<Arc<SidecarState>>, Path(id): Path<String>) -> Response {
    if state.engine().remove(&id) {
        StatusCode::NO_CONTENT.into_response()
    } else {
        error(StatusCode::NOT_FOUND, "task not found")
    }
}

// --- Logging ---

async fn log_request(request: Request, next: Next) -> Response {
    let summary = RequestSummary::of(request.method(), request.uri().path(), request.headers());
    let response = next.run(request).await;
    tracing::info!(status = response.status().as_u16(), "{summary}");
    response
}

/// What the stand-in logs about a request: never a credential (Authorization carries a bearer
/// token) nor the query string. The caller's identity is logged when exactly one
/// `X-Remote-User` came (quoted, at most 128 characters): who kube-rbac-proxy let through,
/// what an operator reads to see who called.
#[derive(Debug, Clone, PartialEq, Eq)]
struct RequestSummary {
    method: Method,
    path: String,
    /// How many `X-Remote-User` headers came: the identity check wants exactly one.
    remote_users: usize,
    /// The one `X-Remote-User`, if exactly one came.
    caller: Option<String>,
    authorization: bool,
}

impl RequestSummary {
    fn of(method: &Method, path: &str, headers: &HeaderMap) -> Self {
        Self {
            method: method.clone(),
            path: path.to_owned(),
            remote_users: headers.get_all(REMOTE_USER_HEADER).iter().count(),
            caller: match headers
                .get_all(REMOTE_USER_HEADER)
                .iter()
                .collect::<Vec<_>>()[..]
            {
                [one] => Some(
                    String::from_utf8_lossy(one.as_bytes())
                        .chars()
                        .take(128)
                        .collect(),
                ),
                _ => None,
            },
            authorization: headers.contains_key(header::AUTHORIZATION),
        }
    }
}

impl fmt::Display for RequestSummary {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let present = |yes: bool| if yes { "present" } else { "absent" };
        write!(
            f,
            "{} {} (x-remote-user headers: {}, authorization header {})",
            self.method,
            self.path,
            self.remote_users,
            present(self.authorization)
        )?;
        match &self.caller {
            Some(caller) => write!(f, " caller {caller:?}"),
            None => Ok(()),
        }
    }
}

// === The seid process ===

/// Written into seid's home when the stand-in starts; holds the start time (RFC 3339).
pub const SEID_STARTED_FILE: &str = "stand-in-seid.started";

/// The part of seid's command line the stand-in acts on.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SeidInvocation {
    pub home: PathBuf,
    /// Arguments the stand-in does not know, in order; logged, then ignored.
    pub ignored: Vec<String>,
}

/// Why a seid command line is not one the stand-in can run.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum SeidArgsError {
    #[error("the seid stand-in runs only `seid start --home DIR`, not `seid {0}`")]
    NotStart(String),
    #[error("the seid stand-in runs only `seid start --home DIR`; no command was given")]
    NoCommand,
    #[error("the seid stand-in needs `--home DIR`")]
    MissingHome,
}

impl SeidInvocation {
    /// Parses `start --home DIR` (or `--home=DIR`), anywhere among other arguments. Unknown
    /// arguments are kept in `ignored`: a stand-in should not fail on a flag real seid accepts.
    pub fn parse(args: &[String]) -> Result<Self, SeidArgsError> {
        let mut args = args.iter();
        match args.next() {
            Some(command) if command == "start" => {}
            Some(other) => return Err(SeidArgsError::NotStart(other.clone())),
            None => return Err(SeidArgsError::NoCommand),
        }
        let mut home = None;
        let mut ignored = Vec::new();
        while let Some(arg) = args.next() {
            if arg == "--home" {
                home = Some(args.next().ok_or(SeidArgsError::MissingHome)?.clone());
            } else if let Some(value) = arg.strip_prefix("--home=") {
                home = Some(value.to_owned());
            } else {
                ignored.push(arg.clone());
            }
        }
        let home = home
            .filter(|home| !home.is_empty())
            .ok_or(SeidArgsError::MissingHome)?;
        Ok(Self {
            home: PathBuf::from(home),
            ignored,
        })
    }
}

/// `seinode-tls stand-in seid -- start --home DIR [...]`: writes `DIR/stand-in-seid.started`
/// with the time, then waits for SIGTERM or SIGINT and returns (exit status 0).
pub async fn run_seid(args: Vec<String>) -> anyhow::Result<()> {
    // Before the marker is written: whoever waits for it may signal at once.
    let terminated = termination_signal()?;
    seid_until(&args, jiff::Timestamp::now(), async move {
        let signal = terminated.await;
        tracing::info!(signal, "stand-in seid stopping");
    })
    .await?;
    tracing::info!("stand-in seid stopped");
    Ok(())
}

async fn seid_until(
    args: &[String],
    now: jiff::Timestamp,
    shutdown: impl Future<Output = ()>,
) -> anyhow::Result<()> {
    let invocation = SeidInvocation::parse(args)?;
    for arg in &invocation.ignored {
        tracing::info!(%arg, "stand-in seid ignores an argument it does not know");
    }
    tokio::fs::create_dir_all(&invocation.home)
        .await
        .with_context(|| format!("failed to create seid's home {}", invocation.home.display()))?;
    let marker = invocation.home.join(SEID_STARTED_FILE);
    tokio::fs::write(&marker, format!("{now}\n"))
        .await
        .with_context(|| format!("failed to write {}", marker.display()))?;
    tracing::info!(home = %invocation.home.display(), "stand-in seid started");
    shutdown.await;
    Ok(())
}

// === Signals ===

/// Resolves with the signal's name on the first SIGTERM or SIGINT. The handlers are installed
/// by this call, so a signal that arrives before the future is polled is not lost.
fn termination_signal() -> anyhow::Result<impl Future<Output = &'static str> + Send + 'static> {
    use tokio::signal::unix::{SignalKind, signal};
    let mut terminate =
        signal(SignalKind::terminate()).context("failed to install the SIGTERM handler")?;
    let mut interrupt =
        signal(SignalKind::interrupt()).context("failed to install the SIGINT handler")?;
    Ok(async move {
        tokio::select! {
            _ = terminate.recv() => "SIGTERM",
            _ = interrupt.recv() => "SIGINT",
        }
    })
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used)]

    use std::collections::HashMap;

    use axum::body::Body;
    use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
    use tower::ServiceExt as _;

    use super::*;

    fn vars(pairs: &[(&str, &str)]) -> impl Fn(&str) -> Option<String> + use<> {
        let map: HashMap<String, String> = pairs
            .iter()
            .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
            .collect();
        move |name| map.get(name).cloned()
    }

    fn strings(args: &[&str]) -> Vec<String> {
        args.iter().map(|a| (*a).to_owned()).collect()
    }

    /// A directory of this test process's own, removed by the test.
    fn scratch_dir(name: &str) -> PathBuf {
        std::env::temp_dir().join(format!("stand-in-{name}-{}", std::process::id()))
    }

    /// One HTTP/1.1 request over a fresh connection; returns the whole response text.
    async fn http_get(addr: SocketAddr, path: &str, extra_headers: &str) -> String {
        let mut stream = tokio::net::TcpStream::connect(addr).await.unwrap();
        let request = format!(
            "GET {path} HTTP/1.1\r\nHost: sidecar\r\n{extra_headers}Connection: close\r\n\r\n"
        );
        stream.write_all(request.as_bytes()).await.unwrap();
        let mut response = String::new();
        stream.read_to_string(&mut response).await.unwrap();
        response
    }

    /// The variables seictl requires, and `extra`.
    fn required_and(
        extra: &[(&'static str, &'static str)],
    ) -> impl Fn(&str) -> Option<String> + use<> {
        let mut pairs = vec![
            (SIDECAR_CHAIN_ID_ENV, "arctic-1"),
            ("SEI_GENESIS_BUCKET", "genesis"),
            ("SEI_GENESIS_REGION", "us-east-2"),
            ("SEI_SNAPSHOT_BUCKET", "snapshots"),
            ("SEI_SNAPSHOT_REGION", "us-east-2"),
        ];
        pairs.extend_from_slice(extra);
        vars(&pairs)
    }

    #[test]
    fn refuses_to_start_without_what_seictl_requires_naming_the_variable() {
        for missing in SIDECAR_REQUIRED_ENV {
            let all = required_and(&[]);
            let error = SidecarStandInConfig::from_vars(|name| {
                (name != missing).then(|| all(name)).flatten()
            })
            .unwrap_err();
            assert_eq!(
                error.to_string(),
                format!("required environment variable {missing} is not set")
            );
        }
    }

    #[test]
    fn defaults_to_seictls_port_on_every_interface_without_authentication() {
        assert_eq!(i32::from(DEFAULT_PORT), DEFAULT_SIDECAR_PORT);
        let config = SidecarStandInConfig::from_vars(required_and(&[])).unwrap();
        assert_eq!(
            config,
            SidecarStandInConfig {
                mode: AuthnMode::Unauthenticated,
                port: 7777,
                chain_id: Some("arctic-1".to_owned()),
                home: None,
            }
        );
        assert_eq!(config.listen_address(), "0.0.0.0:7777".parse().unwrap());
        assert_eq!(config.home_dir(), PathBuf::from("/sei"));
        let explicit = SidecarStandInConfig::from_vars(required_and(&[(
            SIDECAR_AUTHN_MODE_ENV,
            "unauthenticated",
        )]))
        .unwrap();
        assert_eq!(explicit.mode, AuthnMode::Unauthenticated);
    }

    #[test]
    fn trusted_header_mode_is_read_trimmed_and_case_insensitively_and_binds_loopback() {
        let config = SidecarStandInConfig::from_vars(required_and(&[
            (SIDECAR_AUTHN_MODE_ENV, " Trusted-Header "),
            (SIDECAR_PORT_ENV, "7000"),
            (SIDECAR_HOME_ENV, "/data/sei"),
        ]))
        .unwrap();
        assert_eq!(config.mode, AuthnMode::TrustedHeader);
        assert_eq!(config.listen_address(), "127.0.0.1:7000".parse().unwrap());
        assert_eq!(config.chain_id.as_deref(), Some("arctic-1"));
        assert_eq!(config.home_dir(), PathBuf::from("/data/sei"));
    }

    #[test]
    fn refuses_an_authn_mode_seictl_does_not_know_naming_the_variable() {
        for typo in ["trusted_header", "trusted", "none"] {
            let error = SidecarStandInConfig::from_vars(vars(&[(SIDECAR_AUTHN_MODE_ENV, typo)]))
                .unwrap_err();
            let message = error.to_string();
            assert!(message.contains(SIDECAR_AUTHN_MODE_ENV), "{message}");
            assert!(message.contains(typo), "{message}");
        }
    }

    #[test]
    fn refuses_a_port_that_is_not_a_number_naming_the_variable() {
        for port in ["http", "", "70000", "-1"] {
            let error =
                SidecarStandInConfig::from_vars(vars(&[(SIDECAR_PORT_ENV, port)])).unwrap_err();
            assert!(error.to_string().contains(SIDECAR_PORT_ENV), "{error}");
        }
    }

    #[test]
    fn runs_as_seictl_serve_or_without_arguments_and_refuses_anything_else() {
        assert_eq!(check_sidecar_args(&[]), Ok(()));
        assert_eq!(check_sidecar_args(&strings(&["serve"])), Ok(()));
        for args in [&["config", "patch"][..], &["serve", "extra"], &["await"]] {
            let error = check_sidecar_args(&strings(args)).unwrap_err();
            assert_eq!(error, SidecarArgsError(args.join(" ")));
            assert!(error.to_string().contains("seictl serve"), "{error}");
        }
    }

    #[test]
    fn task_ids_are_uuids_in_the_forms_seictl_parses() {
        for id in [
            "3b241101-e2bb-4255-8caf-4136c566a962",
            "3B241101-E2BB-4255-8CAF-4136C566A962",
            "{3b241101-e2bb-4255-8caf-4136c566a962}",
            "urn:uuid:3b241101-e2bb-4255-8caf-4136c566a962",
            "URN:UUID:3b241101-e2bb-4255-8caf-4136c566a962",
            "3b241101e2bb42558caf4136c566a962",
        ] {
            assert!(is_uuid(id), "{id}");
        }
        for id in [
            "",
            "mark-ready",
            "3b241101-e2bb-4255-8caf-4136c566a96",
            "3b241101-e2bb-4255-8caf-4136c566a96g",
            "3b241101+e2bb-4255-8caf-4136c566a962",
            "(3b241101-e2bb-4255-8caf-4136c566a962)",
            "urn:uuix:3b241101-e2bb-4255-8caf-4136c566a962",
            "é3b241101-e2bb-4255-8caf-4136c566a9",
        ] {
            assert!(!is_uuid(id), "{id}");
        }
        let mut engine = Engine::new("2026-03-01T12:00:00Z".parse().unwrap());
        let generated = engine.generate_id();
        assert!(is_uuid(&generated), "{generated}");
        assert_eq!(generated.as_bytes()[14], b'4', "version 4: {generated}");
        assert_ne!(engine.generate_id(), generated);
    }

    #[test]
    fn request_summary_counts_identity_headers_names_one_caller_and_never_logs_a_credential() {
        let mut headers = HeaderMap::new();
        headers.insert(
            header::AUTHORIZATION,
            "Bearer secret-token".parse().unwrap(),
        );
        headers.append(REMOTE_USER_HEADER, "alice".parse().unwrap());
        headers.append(REMOTE_USER_HEADER, "mallory".parse().unwrap());
        let with = RequestSummary::of(&Method::GET, "/v0/tasks", &headers).to_string();
        assert_eq!(
            with,
            "GET /v0/tasks (x-remote-user headers: 2, authorization header present)"
        );
        for value in ["secret-token", "alice", "mallory"] {
            assert!(!with.contains(value), "{with}");
        }
        let mut one = HeaderMap::new();
        one.insert(
            header::AUTHORIZATION,
            "Bearer secret-token".parse().unwrap(),
        );
        one.append(REMOTE_USER_HEADER, "alice".parse().unwrap());
        let named = RequestSummary::of(&Method::POST, "/v0/tasks", &one).to_string();
        assert_eq!(
            named,
            "POST /v0/tasks (x-remote-user headers: 1, authorization header present) caller \"alice\""
        );
        assert!(!named.contains("secret-token"), "{named}");
        let without = RequestSummary::of(&Method::GET, "/v0/healthz", &HeaderMap::new());
        assert_eq!(
            without.to_string(),
            "GET /v0/healthz (x-remote-user headers: 0, authorization header absent)"
        );
    }

    /// What a row checks in the response besides its status.
    enum Expect {
        Status,
        /// The JSON body's value at a JSON pointer.
        Json(&'static str, Value),
        /// A UUID at a JSON pointer.
        Uuid(&'static str),
        /// A JSON array of this many items.
        Items(usize),
        /// Text in the body.
        Contains(&'static str),
        /// Text not in the body.
        Lacks(&'static str),
    }

    type Headers = &'static [(&'static str, &'static str)];
    const NO_IDENTITY: Headers = &[];
    const IDENTITY: Headers = &[(
        "X-Remote-User",
        "system:serviceaccount:seinode-tls-system:seinode-tls",
    )];
    const IDENTITY_LOWERCASE: Headers = &[("x-remote-user", "alice")];
    const EMPTY_IDENTITY: Headers = &[("X-Remote-User", "")];
    const TWO_IDENTITIES: Headers = &[("X-Remote-User", "mallory"), ("X-Remote-User", "alice")];
    /// (what the row says, mode, method, path, headers, body) → (status, what else to check).
    type Row<'a> = (
        &'a str,
        AuthnMode,
        Method,
        &'a str,
        Headers,
        &'a str,
        u16,
        Expect,
    );
    const MARK_READY_ID: &str = "3b241101-e2bb-4255-8caf-4136c566a962";

    /// seictl's contract as a table: each row is one request and the answer seictl gives (from
    /// its `sidecar/server` and `engine` sources), one rule per row. The rows run in order, each
    /// mode on one router, so a row sees what the rows before it submitted. It is the table a
    /// real seictl image would have to pass too: point the rows at one (an `unauthenticated`
    /// instance and a `trusted-header` one, each fresh, the latter with no `node_key.json`) and
    /// every row holds, bar the stand-in's own simplification that tasks complete at once.
    #[tokio::test]
    async fn conforms_to_the_seictl_contract() {
        use AuthnMode::{TrustedHeader as T, Unauthenticated as U};
        use serde_json::json;

        // An unauthenticated node with a node key: the private key is bytes 0..64 (seed, then
        // public key); its id is hex(sha256(bytes 32..64)[..20]), computed with Python's hashlib.
        let home = scratch_dir("seictl-home");
        std::fs::create_dir_all(home.join("config")).unwrap();
        std::fs::write(
            home.join("config/node_key.json"),
            r#"{"priv_key":{"type":"tendermint/PrivKeyEd25519","value":"AAECAwQFBgcICQoLDA0ODxAREhMUFRYXGBkaGxwdHh8gISIjJCUmJygpKissLS4vMDEyMzQ1Njc4OTo7PD0+Pw=="}}"#,
        )
        .unwrap();
        let unauthenticated = sidecar_router(SidecarStandInConfig {
            mode: U,
            home: Some(home.clone()),
            ..SidecarStandInConfig::default()
        });
        let trusted = sidecar_router(SidecarStandInConfig {
            mode: T,
            home: Some(scratch_dir("seictl-no-home")),
            ..SidecarStandInConfig::default()
        });

        let task = format!("/v0/tasks/{MARK_READY_ID}");
        let task = task.as_str();
        let unknown_task = "/v0/tasks/00000000-0000-4000-8000-000000000000";
        let mark_ready = format!(r#"{{"id": "{MARK_READY_ID}", "type": "mark-ready"}}"#);
        let mark_ready = mark_ready.as_str();
        let error = |message: &str| Expect::Json("/error", json!(message));
        let missing = || error("missing X-Remote-User header");
        let status = |s: &str| Expect::Json("/status", json!(s));

        #[rustfmt::skip]
        let rows: Vec<Row> = vec![
            // trusted-header: the bypass paths need no identity, and readiness waits for mark-ready.
            ("healthz bypasses the identity check, 503 before mark-ready", T, Method::GET, "/v0/healthz", NO_IDENTITY, "", 503, Expect::Status),
            ("startupz bypasses the identity check, 503 before mark-ready", T, Method::GET, "/v0/startupz", NO_IDENTITY, "", 503, Expect::Status),
            ("livez bypasses the identity check and answers 200", T, Method::GET, "/v0/livez", NO_IDENTITY, "", 200, Expect::Status),
            ("metrics bypasses the identity check", T, Method::GET, "/v0/metrics", NO_IDENTITY, "", 200, Expect::Status),
            ("a bypass path keeps its methods", T, Method::POST, "/v0/healthz", NO_IDENTITY, "", 405, Expect::Status),
            // trusted-header: everything else wants exactly one non-empty X-Remote-User.
            ("status without an identity is a 401", T, Method::GET, "/v0/status", NO_IDENTITY, "", 401, missing()),
            ("status with an empty identity is a 401", T, Method::GET, "/v0/status", EMPTY_IDENTITY, "", 401, error("empty X-Remote-User header")),
            ("status with two identities is a 401", T, Method::GET, "/v0/status", TWO_IDENTITIES, "", 401, error("expected exactly one X-Remote-User header — proxy must overwrite, not append")),
            ("status with one identity answers, Initializing before mark-ready", T, Method::GET, "/v0/status", IDENTITY, "", 200, status("Initializing")),
            ("the header's name is case-insensitive", T, Method::GET, "/v0/status", IDENTITY_LOWERCASE, "", 200, status("Initializing")),
            ("a bypass path with a suffix is not a bypass path", T, Method::GET, "/v0/healthz/", NO_IDENTITY, "", 401, missing()),
            ("the check runs before routing: an unknown path without identity is a 401", T, Method::GET, "/v0/nope", NO_IDENTITY, "", 401, missing()),
            ("an unknown path with an identity is a 404", T, Method::GET, "/v0/nope", IDENTITY, "", 404, Expect::Status),
            ("node-id without identity is a 401", T, Method::GET, "/v0/node-id", NO_IDENTITY, "", 401, missing()),
            ("node-id is a 500 while node_key.json is missing", T, Method::GET, "/v0/node-id", IDENTITY, "", 500, error("node_key.json not found — generate-identity may not have run yet")),
            // trusted-header: submitting tasks.
            ("a task without identity is a 401", T, Method::POST, "/v0/tasks", NO_IDENTITY, r#"{"type": "mark-ready"}"#, 401, missing()),
            ("a body that is not JSON is a 400", T, Method::POST, "/v0/tasks", IDENTITY, "{not json", 400, error("invalid request body")),
            ("an empty body is a 400", T, Method::POST, "/v0/tasks", IDENTITY, "", 400, error("invalid request body")),
            ("a body that is not an object is a 400", T, Method::POST, "/v0/tasks", IDENTITY, r#"["mark-ready"]"#, 400, error("invalid request body")),
            ("params that are not an object are a 400", T, Method::POST, "/v0/tasks", IDENTITY, r#"{"type": "config-apply", "params": []}"#, 400, error("invalid request body")),
            ("a task without type is a 400", T, Method::POST, "/v0/tasks", IDENTITY, r#"{"params": {}}"#, 400, error("type is required")),
            ("a task of an unknown type is a 400", T, Method::POST, "/v0/tasks", IDENTITY, r#"{"type": "frobnicate"}"#, 400, error("unknown task type: frobnicate")),
            ("a removed task type is unknown", T, Method::POST, "/v0/tasks", IDENTITY, r#"{"type": "discover-peers"}"#, 400, error("unknown task type: discover-peers")),
            ("a task id that is not a UUID is a 400", T, Method::POST, "/v0/tasks", IDENTITY, r#"{"id": "mark-ready-1", "type": "mark-ready"}"#, 400, error("task ID must be a valid UUID: \"mark-ready-1\"")),
            ("the refused submissions left no result", T, Method::GET, "/v0/tasks", IDENTITY, "", 200, Expect::Items(0)),
            ("a task without id is created with a generated UUID", T, Method::POST, "/v0/tasks", IDENTITY, r#"{"type": "config-apply", "params": {"overrides": {}}, "unknown": 1}"#, 201, Expect::Uuid("/id")),
            ("field names match case-insensitively, as in Go", T, Method::POST, "/v0/tasks", IDENTITY, r#"{"Type": "config-validate"}"#, 201, Expect::Uuid("/id")),
            ("mark-ready with an id is created under that id", T, Method::POST, "/v0/tasks", IDENTITY, mark_ready, 201, Expect::Json("/id", json!(MARK_READY_ID))),
            ("healthz is 200 after mark-ready", T, Method::GET, "/v0/healthz", NO_IDENTITY, "", 200, Expect::Status),
            ("startupz is 200 after mark-ready", T, Method::GET, "/v0/startupz", NO_IDENTITY, "", 200, Expect::Status),
            ("status is Ready after mark-ready", T, Method::GET, "/v0/status", IDENTITY, "", 200, status("Ready")),
            ("the same id again answers the same id", T, Method::POST, "/v0/tasks", IDENTITY, mark_ready, 201, Expect::Json("/id", json!(MARK_READY_ID))),
            ("and ran once: three results", T, Method::GET, "/v0/tasks", IDENTITY, "", 200, Expect::Items(3)),
            ("results are listed newest first", T, Method::GET, "/v0/tasks", IDENTITY, "", 200, Expect::Json("/0/id", json!(MARK_READY_ID))),
            ("listing tasks needs an identity", T, Method::GET, "/v0/tasks", NO_IDENTITY, "", 401, missing()),
            ("a result names its task", T, Method::GET, task, IDENTITY, "", 200, Expect::Json("/type", json!("mark-ready"))),
            ("a result is completed", T, Method::GET, task, IDENTITY, "", 200, Expect::Json("/status", json!("completed"))),
            ("a result is the first run", T, Method::GET, task, IDENTITY, "", 200, Expect::Json("/run", json!(1))),
            ("a result has its submission time", T, Method::GET, task, IDENTITY, "", 200, Expect::Contains("\"submittedAt\":\"")),
            ("a result has its completion time", T, Method::GET, task, IDENTITY, "", 200, Expect::Contains("\"completedAt\":\"")),
            ("a result leaves out absent params", T, Method::GET, task, IDENTITY, "", 200, Expect::Lacks("params")),
            ("reading a result needs an identity", T, Method::GET, task, NO_IDENTITY, "", 401, missing()),
            ("an unknown result is a 404", T, Method::GET, unknown_task, IDENTITY, "", 404, error("task not found")),
            ("deleting an unknown result is a 404", T, Method::DELETE, unknown_task, IDENTITY, "", 404, error("task not found")),
            ("deleting needs an identity", T, Method::DELETE, task, NO_IDENTITY, "", 401, missing()),
            ("deleting a result is a 204", T, Method::DELETE, task, IDENTITY, "", 204, Expect::Status),
            ("a deleted result is gone", T, Method::GET, task, IDENTITY, "", 404, error("task not found")),
            ("and no longer listed", T, Method::GET, "/v0/tasks", IDENTITY, "", 200, Expect::Items(2)),
            ("deleting a result does not take readiness back", T, Method::GET, "/v0/healthz", NO_IDENTITY, "", 200, Expect::Status),
            ("mark-ready again runs again once its result is deleted", T, Method::POST, "/v0/tasks", IDENTITY, mark_ready, 201, Expect::Json("/id", json!(MARK_READY_ID))),
            ("mark-not-ready is accepted", T, Method::POST, "/v0/tasks", IDENTITY, r#"{"type": "mark-not-ready"}"#, 201, Expect::Uuid("/id")),
            ("healthz is 503 after mark-not-ready", T, Method::GET, "/v0/healthz", NO_IDENTITY, "", 503, Expect::Status),
            ("status is Initializing after mark-not-ready", T, Method::GET, "/v0/status", IDENTITY, "", 200, status("Initializing")),
            ("mark-not-ready forgets the mark-ready results", T, Method::GET, task, IDENTITY, "", 404, error("task not found")),
            ("metrics count missing identities", T, Method::GET, "/v0/metrics", NO_IDENTITY, "", 200, Expect::Contains("seictl_sidecar_authn_rejections_total{reason=\"missing_header\"} 8\n")),
            ("metrics count empty identities", T, Method::GET, "/v0/metrics", NO_IDENTITY, "", 200, Expect::Contains("seictl_sidecar_authn_rejections_total{reason=\"empty_header\"} 1\n")),
            ("metrics count duplicate identities", T, Method::GET, "/v0/metrics", NO_IDENTITY, "", 200, Expect::Contains("seictl_sidecar_authn_rejections_total{reason=\"duplicate_header\"} 1\n")),
            ("metrics are a Prometheus exposition", T, Method::GET, "/v0/metrics", NO_IDENTITY, "", 200, Expect::Contains("# TYPE seictl_sidecar_authn_rejections_total counter\n")),
            ("metrics count the submissions that ran", T, Method::GET, "/v0/metrics", NO_IDENTITY, "", 200, Expect::Contains("seictl_task_submissions_total{type=\"mark-ready\"} 2\n")),
            // unauthenticated: no identity anywhere, the same API.
            ("unauthenticated: healthz 503 before mark-ready", U, Method::GET, "/v0/healthz", NO_IDENTITY, "", 503, Expect::Status),
            ("unauthenticated: status needs no identity", U, Method::GET, "/v0/status", NO_IDENTITY, "", 200, status("Initializing")),
            ("unauthenticated: node-id is the key's CometBFT id", U, Method::GET, "/v0/node-id", NO_IDENTITY, "", 200, Expect::Json("/nodeId", json!("72dbb7336c76780023f83da4c355f2eeea85733b"))),
            ("unauthenticated: listing needs no identity", U, Method::GET, "/v0/tasks", NO_IDENTITY, "", 200, Expect::Items(0)),
            ("unauthenticated: a task needs no identity", U, Method::POST, "/v0/tasks", NO_IDENTITY, mark_ready, 201, Expect::Json("/id", json!(MARK_READY_ID))),
            ("unauthenticated: ready after mark-ready", U, Method::GET, "/v0/healthz", NO_IDENTITY, "", 200, Expect::Status),
            ("unauthenticated: an unknown path is a 404", U, Method::GET, "/v0/nope", NO_IDENTITY, "", 404, Expect::Status),
            ("unauthenticated: nothing is rejected, nothing counted", U, Method::GET, "/v0/metrics", NO_IDENTITY, "", 200, Expect::Lacks("authn_rejections")),
        ];

        for (name, mode, method, path, headers, body, expected, expect) in rows {
            let router = match mode {
                T => trusted.clone(),
                U => unauthenticated.clone(),
            };
            let mut request = axum::http::Request::builder().method(method).uri(path);
            for (header_name, value) in headers {
                request = request.header(*header_name, *value);
            }
            let response = router
                .oneshot(request.body(Body::from(body.to_owned())).unwrap())
                .await
                .unwrap();
            let status = response.status().as_u16();
            let bytes = axum::body::to_bytes(response.into_body(), usize::MAX)
                .await
                .unwrap();
            let text = String::from_utf8_lossy(&bytes);
            assert_eq!(status, expected, "{name}: {text}");
            let json = || -> Value {
                serde_json::from_slice(&bytes).unwrap_or_else(|e| panic!("{name}: {e}: {text}"))
            };
            match expect {
                Expect::Status => {}
                Expect::Json(pointer, value) => {
                    assert_eq!(json().pointer(pointer), Some(&value), "{name}: {text}");
                }
                Expect::Uuid(pointer) => {
                    let id = json().pointer(pointer).and_then(Value::as_str).map(is_uuid);
                    assert_eq!(id, Some(true), "{name}: {text}");
                }
                Expect::Items(n) => {
                    assert_eq!(json().as_array().map(Vec::len), Some(n), "{name}: {text}");
                }
                Expect::Contains(part) => assert!(text.contains(part), "{name}: {text}"),
                Expect::Lacks(part) => assert!(!text.contains(part), "{name}: {text}"),
            }
        }
        std::fs::remove_dir_all(home).unwrap();
    }

    #[tokio::test]
    async fn trusted_header_sidecar_answers_livez_on_a_socket_then_stops_when_told() {
        let listener = tokio::net::TcpListener::bind((Ipv4Addr::LOCALHOST, 0))
            .await
            .unwrap();
        let addr = listener.local_addr().unwrap();
        let config = SidecarStandInConfig {
            mode: AuthnMode::TrustedHeader,
            port: addr.port(),
            ..SidecarStandInConfig::default()
        };
        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        let server = tokio::spawn(serve_sidecar(listener, config, async move {
            let _ = stopped.await;
        }));

        let livez = http_get(addr, "/v0/livez", "").await;
        assert!(livez.starts_with("HTTP/1.1 200 OK\r\n"), "{livez}");
        let status = http_get(addr, "/v0/status", "").await;
        assert!(status.starts_with("HTTP/1.1 401"), "{status}");
        let status = http_get(addr, "/v0/status", "X-Remote-User: alice\r\n").await;
        assert!(status.starts_with("HTTP/1.1 200 OK\r\n"), "{status}");
        assert!(status.ends_with(r#"{"status":"Initializing"}"#), "{status}");

        stop.send(()).unwrap();
        tokio::time::timeout(std::time::Duration::from_secs(5), server)
            .await
            .expect("the server stops after shutdown")
            .unwrap()
            .unwrap();
    }

    #[test]
    fn parses_seid_start_with_home_in_either_form_and_keeps_unknown_arguments() {
        let invocation =
            SeidInvocation::parse(&strings(&["start", "--home", "/sei", "--trace"])).unwrap();
        assert_eq!(invocation.home, PathBuf::from("/sei"));
        assert_eq!(invocation.ignored, ["--trace"]);

        let invocation = SeidInvocation::parse(&strings(&[
            "start",
            "--log_level=debug",
            "--home=/data/sei",
            "extra",
        ]))
        .unwrap();
        assert_eq!(invocation.home, PathBuf::from("/data/sei"));
        assert_eq!(invocation.ignored, ["--log_level=debug", "extra"]);
    }

    #[test]
    fn refuses_seid_commands_other_than_start_and_a_missing_home() {
        assert_eq!(
            SeidInvocation::parse(&strings(&["init", "--home", "/sei"])),
            Err(SeidArgsError::NotStart("init".to_owned()))
        );
        assert_eq!(SeidInvocation::parse(&[]), Err(SeidArgsError::NoCommand));
        for args in [&["start"][..], &["start", "--home"], &["start", "--home="]] {
            assert_eq!(
                SeidInvocation::parse(&strings(args)),
                Err(SeidArgsError::MissingHome),
                "{args:?}"
            );
        }
    }

    #[tokio::test]
    async fn seid_writes_its_start_time_into_home_then_waits_for_shutdown() {
        let home = std::env::temp_dir()
            .join(format!("stand-in-seid-{}", std::process::id()))
            .join("home");
        let now: jiff::Timestamp = "2026-03-01T12:00:00Z".parse().unwrap();
        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        let args = strings(&["start", "--home", home.to_str().unwrap()]);
        let seid = tokio::spawn(async move {
            seid_until(&args, now, async move {
                let _ = stopped.await;
            })
            .await
        });

        let marker = home.join(SEID_STARTED_FILE);
        let deadline = tokio::time::Instant::now() + std::time::Duration::from_secs(5);
        while !marker.exists() {
            assert!(tokio::time::Instant::now() < deadline, "no {marker:?}");
            tokio::time::sleep(std::time::Duration::from_millis(10)).await;
        }
        assert_eq!(
            std::fs::read_to_string(&marker).unwrap(),
            "2026-03-01T12:00:00Z\n"
        );
        assert!(!seid.is_finished(), "seid runs until told to stop");

        stop.send(()).unwrap();
        seid.await.unwrap().unwrap();
        std::fs::remove_dir_all(home.parent().unwrap()).unwrap();
    }
}
