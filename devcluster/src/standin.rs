//! Stand-ins for what runs in a node's pod, so the system can be exercised without Sei's images.
//!
//! - [`StandInSidecar`]: in-process, for the sidecar-probe tests (`tests/sidecar.rs`) that need
//!   to change what the server presents at will: an HTTPS server on loopback that answers
//!   `/healthz` the way kube-rbac-proxy in front of a healthy sidecar would, with the certificate
//!   and key of the node's Secret. Its certificate and answer can be changed while it runs, and it
//!   records every request it gets — what a rogue server in the pod's name would collect.
//!   (`local --demo` runs the real kube-rbac-proxy.)
//! - [`run_sidecar`] and [`run_seid`]: processes (`seinode-tls stand-in sidecar|seid`) that the
//!   process kubelet runs in real Pods in place of the sidecar and seid images. They read what the
//!   controller puts in the pod spec (`SEI_SIDECAR_LISTEN_ADDRESS`, `SEI_CHAIN_ID`,
//!   `seid start --home DIR`) and stop cleanly on SIGTERM, as a kubelet expects.

use std::fmt;
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::path::PathBuf;
use std::sync::atomic::{AtomicU16, Ordering};
use std::sync::{Arc, Mutex};

use anyhow::Context as _;
use axum::extract::{Request, State};
use axum::http::{HeaderMap, Method, StatusCode, header};
use axum::middleware::{self, Next};
use axum::response::Response;
use axum::routing::get;
use axum_server::Handle;
use axum_server::tls_rustls::RustlsConfig;
use seinode_tls_crds::DEFAULT_SIDECAR_PORT;

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

    /// The HTTP status `/healthz` answers with.
    pub fn set_status(&self, status: u16) {
        self.shared.status.store(status, Ordering::Relaxed);
    }

    /// Every request received so far.
    pub fn requests(&self) -> Vec<Recorded> {
        self.shared
            .requests
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }
}

impl Drop for StandInSidecar {
    fn drop(&mut self) {
        self.handle.shutdown();
    }
}

/// Records every request, and answers `/healthz` with the configured status (404 elsewhere).
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
    let health = recorded.path == "/healthz";
    shared
        .requests
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .push(recorded);
    if !health {
        return StatusCode::NOT_FOUND;
    }
    StatusCode::from_u16(shared.status.load(Ordering::Relaxed))
        .unwrap_or(StatusCode::INTERNAL_SERVER_ERROR)
}

// === The sidecar process ===

/// Where the controller tells the sidecar to listen (`host:port`).
pub const SIDECAR_LISTEN_ADDRESS_ENV: &str = "SEI_SIDECAR_LISTEN_ADDRESS";
/// The chain the node belongs to, set by the controller on the sidecar container.
pub const SIDECAR_CHAIN_ID_ENV: &str = "SEI_CHAIN_ID";

/// The sidecar's address when the environment names none: every interface, on the port the
/// controller assumes when `spec.sidecar.port` is unset.
pub const DEFAULT_SIDECAR_LISTEN_ADDRESS: SocketAddr = SocketAddr::new(
    IpAddr::V4(Ipv4Addr::UNSPECIFIED),
    // Checked in the tests: the constant is 7777, well inside u16.
    DEFAULT_SIDECAR_PORT as u16,
);

/// What the sidecar stand-in needs from its environment.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SidecarStandInConfig {
    pub listen_address: SocketAddr,
    pub chain_id: Option<String>,
}

impl SidecarStandInConfig {
    /// Reads the variables the controller sets on the sidecar container through `var` (the
    /// process environment in [`run_sidecar`], a table in the tests).
    pub fn from_vars(var: impl Fn(&str) -> Option<String>) -> anyhow::Result<Self> {
        let listen_address = match var(SIDECAR_LISTEN_ADDRESS_ENV) {
            Some(text) => text.trim().parse().with_context(|| {
                format!(
                    "{SIDECAR_LISTEN_ADDRESS_ENV}={text:?} is not an address like 127.0.0.1:7777"
                )
            })?,
            None => DEFAULT_SIDECAR_LISTEN_ADDRESS,
        };
        let chain_id = var(SIDECAR_CHAIN_ID_ENV).filter(|id| !id.is_empty());
        Ok(Self {
            listen_address,
            chain_id,
        })
    }
}

/// `seinode-tls stand-in sidecar`: plain HTTP on `SEI_SIDECAR_LISTEN_ADDRESS` (default
/// `0.0.0.0:7777`) answering `GET /healthz` and `GET /v0/status`, each request logged to stderr,
/// until SIGTERM or SIGINT.
pub async fn run_sidecar() -> anyhow::Result<()> {
    // Before anything else, so a SIGTERM sent as soon as the pod runs ends it cleanly.
    let terminated = termination_signal()?;
    let config = SidecarStandInConfig::from_vars(|name| std::env::var(name).ok())?;
    let listener = tokio::net::TcpListener::bind(config.listen_address)
        .await
        .with_context(|| format!("failed to bind {}", config.listen_address))?;
    let chain_id = config.chain_id.as_deref().unwrap_or("<unset>");
    tracing::info!(address = %listener.local_addr()?, %chain_id, "stand-in sidecar listening");
    serve_sidecar(listener, config.chain_id, async move {
        let signal = terminated.await;
        tracing::info!(signal, "stand-in sidecar stopping");
    })
    .await?;
    tracing::info!("stand-in sidecar stopped");
    Ok(())
}

/// Serves the sidecar stand-in on `listener` until `shutdown` resolves, then lets in-flight
/// requests finish.
pub async fn serve_sidecar(
    listener: tokio::net::TcpListener,
    chain_id: Option<String>,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> anyhow::Result<()> {
    axum::serve(listener, sidecar_router(chain_id))
        .with_graceful_shutdown(shutdown)
        .await
        .context("the stand-in sidecar's server failed")
}

/// The sidecar stand-in's routes. `/v0/status` is shaped for humans and tests, not a copy of
/// the real sidecar's API.
fn sidecar_router(chain_id: Option<String>) -> axum::Router {
    let status = serde_json::json!({
        "chainId": chain_id,
        "standIn": true,
    });
    axum::Router::new()
        .route("/healthz", get(|| async { "ok" }))
        .route(
            "/v0/status",
            get(move || std::future::ready(axum::Json(status.clone()))),
        )
        .layer(middleware::from_fn(log_request))
}

async fn log_request(request: Request, next: Next) -> Response {
    let summary = RequestSummary::of(request.method(), request.uri().path(), request.headers());
    let response = next.run(request).await;
    tracing::info!(status = response.status().as_u16(), "{summary}");
    response
}

/// What the stand-in logs about a request: never a header's value (the Authorization header
/// carries a bearer token), nor the query string.
#[derive(Debug, Clone, PartialEq, Eq)]
struct RequestSummary {
    method: Method,
    path: String,
    authorization: bool,
}

impl RequestSummary {
    fn of(method: &Method, path: &str, headers: &HeaderMap) -> Self {
        Self {
            method: method.clone(),
            path: path.to_owned(),
            authorization: headers.contains_key(header::AUTHORIZATION),
        }
    }
}

impl fmt::Display for RequestSummary {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let authorization = if self.authorization {
            "present"
        } else {
            "absent"
        };
        write!(
            f,
            "{} {} (authorization header {authorization})",
            self.method, self.path
        )
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

    use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};

    use super::*;

    fn vars(pairs: &[(&str, &str)]) -> impl Fn(&str) -> Option<String> {
        let map: HashMap<String, String> = pairs
            .iter()
            .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
            .collect();
        move |name| map.get(name).cloned()
    }

    fn strings(args: &[&str]) -> Vec<String> {
        args.iter().map(|a| (*a).to_owned()).collect()
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

    #[test]
    fn default_listen_address_is_the_controllers_default_sidecar_port_on_all_interfaces() {
        assert_eq!(
            i32::from(DEFAULT_SIDECAR_LISTEN_ADDRESS.port()),
            DEFAULT_SIDECAR_PORT
        );
        assert!(DEFAULT_SIDECAR_LISTEN_ADDRESS.ip().is_unspecified());
        let config = SidecarStandInConfig::from_vars(vars(&[])).unwrap();
        assert_eq!(config.listen_address, DEFAULT_SIDECAR_LISTEN_ADDRESS);
        assert_eq!(config.chain_id, None);
    }

    #[test]
    fn reads_the_listen_address_and_chain_id_the_controller_sets() {
        let config = SidecarStandInConfig::from_vars(vars(&[
            (SIDECAR_LISTEN_ADDRESS_ENV, "127.0.0.1:7000"),
            (SIDECAR_CHAIN_ID_ENV, "arctic-1"),
        ]))
        .unwrap();
        assert_eq!(config.listen_address, "127.0.0.1:7000".parse().unwrap());
        assert_eq!(config.chain_id.as_deref(), Some("arctic-1"));
    }

    #[test]
    fn refuses_a_listen_address_without_a_port() {
        let error =
            SidecarStandInConfig::from_vars(vars(&[(SIDECAR_LISTEN_ADDRESS_ENV, "127.0.0.1")]))
                .unwrap_err();
        assert!(
            error.to_string().contains(SIDECAR_LISTEN_ADDRESS_ENV),
            "{error}"
        );
    }

    #[test]
    fn request_summary_says_whether_authorization_was_sent_but_never_its_value() {
        let mut headers = HeaderMap::new();
        headers.insert(
            header::AUTHORIZATION,
            "Bearer secret-token".parse().unwrap(),
        );
        let with = RequestSummary::of(&Method::GET, "/healthz", &headers).to_string();
        assert_eq!(with, "GET /healthz (authorization header present)");
        assert!(!with.contains("secret-token"));
        let without = RequestSummary::of(&Method::GET, "/healthz", &HeaderMap::new());
        assert_eq!(
            without.to_string(),
            "GET /healthz (authorization header absent)"
        );
    }

    #[tokio::test]
    async fn sidecar_answers_healthz_and_status_then_stops_when_told() {
        let listener = tokio::net::TcpListener::bind((Ipv4Addr::LOCALHOST, 0))
            .await
            .unwrap();
        let addr = listener.local_addr().unwrap();
        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        let server = tokio::spawn(serve_sidecar(
            listener,
            Some("arctic-1".to_owned()),
            async move {
                let _ = stopped.await;
            },
        ));

        let healthz = http_get(addr, "/healthz", "Authorization: Bearer t\r\n").await;
        assert!(healthz.starts_with("HTTP/1.1 200 OK\r\n"), "{healthz}");
        assert!(healthz.ends_with("\r\n\r\nok"), "{healthz}");

        let status = http_get(addr, "/v0/status", "").await;
        assert!(status.starts_with("HTTP/1.1 200 OK\r\n"), "{status}");
        let body = status.split("\r\n\r\n").nth(1).unwrap();
        let body: serde_json::Value = serde_json::from_str(body).unwrap();
        assert_eq!(
            body,
            serde_json::json!({"chainId": "arctic-1", "standIn": true})
        );

        let missing = http_get(addr, "/nope", "").await;
        assert!(missing.starts_with("HTTP/1.1 404"), "{missing}");

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
