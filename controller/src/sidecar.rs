//! The controller's client of a node's sidecar (seictl), through its front door.
//!
//! Two kinds of call, both to the Pod the node's StatefulSet owns, dialed at the Pod's IP from
//! the API (never a DNS answer, never an address a SeiNode's author chose), with the server name
//! and verification on the pod's DNS name:
//!
//! - **Probes** (`SidecarReady`): `GET /v0/healthz`, a bypass path, so no credential is ever
//!   sent. At most [`BODY_LIMIT`] bytes of the answer are read, then the connection is
//!   dropped, and the whole call is bounded by the probe timeout: no sidecar can hold the
//!   controller's memory or time.
//! - **Tasks** (the plan's `MarkSidecarReady`): `POST /v0/tasks` with a deterministic id, then
//!   `GET /v0/tasks/{id}`. With TLS the controller authenticates with its client certificate,
//!   whose key never leaves it: a server answering in the pod's name (a rogue Pod holding the
//!   node's Secret) gets a handshake signature bound to that one connection, nothing it could
//!   replay. The call is refused before the certificate is sent unless the server presents
//!   exactly the leaf of the node's Secret.
//!
//! With TLS the trust anchor is the Secret's `ca.crt`, else `--sidecar-ca-bundle`, else the
//! Secret's exact leaf (pinning). Without TLS the calls are plain HTTP to the sidecar's port.

use parking_lot::{Mutex, RwLock};
use std::collections::HashMap;
use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::time::Duration;

use http_body_util::{BodyExt, Full};
use hyper::body::Bytes;
use hyper::{Method, Request, StatusCode};
use hyper_util::rt::TokioIo;
use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName, UnixTime};
use rustls::{CertificateError, ClientConfig, DigitallySignedStruct, SignatureScheme};
use serde::Deserialize;
use tokio::io::{AsyncRead, AsyncWrite};

use crate::config::{SIDECAR_HEALTH_PATH, SidecarClientFiles};

/// The most of a sidecar's answer the controller reads; the rest is never received.
pub const BODY_LIMIT: usize = 4096;
/// How long each of a task's two calls may take at most (a probe has the probe timeout).
pub const TASK_TIMEOUT: Duration = Duration::from_secs(10);

/// Which Pod addresses the controller may dial, and fixed addresses for some pod names (the
/// tests that serve a sidecar in-process on loopback). In a cluster: every Pod IP.
#[derive(Clone, Default)]
pub struct SidecarAddresses {
    table: Arc<RwLock<HashMap<String, SocketAddr>>>,
    /// `None`: any Pod IP. Otherwise only those it accepts (`local` and the tests: the Pod
    /// network they made, so nothing else on the host's networks is ever dialed).
    pod_ips: Option<Arc<dyn Fn(IpAddr) -> bool + Send + Sync>>,
}

impl std::fmt::Debug for SidecarAddresses {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SidecarAddresses")
            .field("fixed", &self.table.read().len())
            .field("pod_ips_filtered", &self.pod_ips.is_some())
            .finish()
    }
}

impl SidecarAddresses {
    /// Pod IPs only where `allow` says so.
    pub fn pod_ips_where(allow: impl Fn(IpAddr) -> bool + Send + Sync + 'static) -> Self {
        Self {
            pod_ips: Some(Arc::new(allow)),
            ..Self::default()
        }
    }

    /// Dials `addr` for the pod named `host`, whatever the API says of the Pod.
    pub fn set(&self, host: &str, addr: SocketAddr) {
        self.table.write().insert(host.to_owned(), addr);
    }

    /// Where to dial the pod `host` on `port`, given the IP its Pod reports (if any).
    pub fn resolve(
        &self,
        host: &str,
        pod_ip: Option<IpAddr>,
        port: u16,
    ) -> Result<SocketAddr, String> {
        if let Some(addr) = self.table.read().get(host) {
            return Ok(*addr);
        }
        Ok(SocketAddr::new(self.pod_ip(host, pod_ip)?, port))
    }

    /// Whether `host` can be dialed: it is in the table, or its pod has an IP this controller
    /// may dial (`Err`: why not).
    pub fn dialable(&self, host: &str, pod_ip: Option<IpAddr>) -> Result<(), String> {
        if self.table.read().contains_key(host) {
            return Ok(());
        }
        self.pod_ip(host, pod_ip).map(drop)
    }

    fn pod_ip(&self, host: &str, pod_ip: Option<IpAddr>) -> Result<IpAddr, String> {
        let ip = pod_ip.ok_or_else(|| format!("pod {host} has no IP yet"))?;
        if self.pod_ips.as_ref().is_some_and(|allow| !allow(ip)) {
            return Err(format!(
                "pod {host} reports IP {ip}, outside the Pod network this controller may dial"
            ));
        }
        Ok(ip)
    }
}

/// One node's sidecar: where it is and, with TLS, what it must present.
#[derive(Debug, Clone)]
pub struct Target {
    /// The pod's DNS name: the server name of TLS and of the URL.
    pub host: String,
    pub addr: SocketAddr,
    pub tls: Option<TlsTarget>,
}

/// The node's Secret, as far as verifying its proxy needs it.
#[derive(Debug, Clone)]
pub struct TlsTarget {
    /// The Secret's leaf (DER).
    pub leaf_der: Vec<u8>,
    /// The Secret's `ca.crt` (PEM), if any.
    pub ca_crt: Option<Vec<u8>>,
}

/// What a probe found. Each maps to one `SidecarReady` reason.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ProbeResult {
    Healthy(String),
    Unreachable(String),
    HandshakeFailed(String),
    /// The served certificate is not the Secret's leaf.
    CertificateMismatch(String),
    /// seictl answers 503: no `mark-ready` has completed since it started (a restarted
    /// sidecar, or a pod from before this controller submitted tasks).
    NotMarkedReady(String),
    Unhealthy(String),
    /// Nothing to verify against: the node's TLS Secret is not usable.
    NotProbed(String),
}

impl ProbeResult {
    /// Every [`ProbeResult::reason`].
    pub const REASONS: [&'static str; 7] = [
        "SidecarHealthy",
        "SidecarUnreachable",
        "SidecarTLSHandshakeFailed",
        "SidecarCertificateMismatch",
        "SidecarNotMarkedReady",
        "SidecarUnhealthy",
        "SidecarNotProbed",
    ];

    pub fn reason(&self) -> &'static str {
        match self {
            ProbeResult::Healthy(_) => "SidecarHealthy",
            ProbeResult::Unreachable(_) => "SidecarUnreachable",
            ProbeResult::HandshakeFailed(_) => "SidecarTLSHandshakeFailed",
            ProbeResult::CertificateMismatch(_) => "SidecarCertificateMismatch",
            ProbeResult::NotMarkedReady(_) => "SidecarNotMarkedReady",
            ProbeResult::Unhealthy(_) => "SidecarUnhealthy",
            ProbeResult::NotProbed(_) => "SidecarNotProbed",
        }
    }

    pub fn message(&self) -> &str {
        match self {
            ProbeResult::Healthy(m)
            | ProbeResult::Unreachable(m)
            | ProbeResult::HandshakeFailed(m)
            | ProbeResult::CertificateMismatch(m)
            | ProbeResult::NotMarkedReady(m)
            | ProbeResult::Unhealthy(m)
            | ProbeResult::NotProbed(m) => m,
        }
    }

    pub fn is_healthy(&self) -> bool {
        matches!(self, ProbeResult::Healthy(_))
    }
}

/// How a sidecar task went, as far as the plan is concerned.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum TaskProgress {
    Completed,
    /// Not yet: the sidecar is not reachable yet, or the task runs. Asked again later.
    Waiting(String),
    /// The sidecar refused the task or reports it failed: needs a person.
    Failed(String),
}

/// The sidecar's record of a task (`GET /v0/tasks/{id}`), as far as the controller reads it.
#[derive(Debug, Deserialize)]
struct TaskRecord {
    status: String,
    #[serde(default)]
    error: Option<String>,
}

/// How to trust the sidecar's proxy.
enum Trust {
    /// PEM CA certificates (the Secret's `ca.crt` or the configured bundle).
    Roots(Vec<u8>),
    /// Exactly this leaf (DER).
    Pinned(Vec<u8>),
}

/// SHA-256 over the trust anchor and the expected leaf.
fn trust_digest(trust: &Trust, leaf_der: &[u8]) -> [u8; 32] {
    use sha2::{Digest, Sha256};
    let (kind, bytes): (&[u8], &[u8]) = match trust {
        Trust::Roots(pem) => (b"roots", pem),
        Trust::Pinned(der) => (b"pinned", der),
    };
    let length = u64::try_from(bytes.len()).unwrap_or(u64::MAX).to_be_bytes();
    Sha256::new()
        .chain_update(kind)
        .chain_update(length)
        .chain_update(bytes)
        .chain_update(leaf_der)
        .finalize()
        .into()
}

/// A probe's TLS configuration for one pod, kept while its trust and leaf stay the same.
struct ProbeTls {
    /// A digest of the trust anchor and the leaf it was built for: the configuration is kept per
    /// pod, the certificates' bytes are not.
    key: [u8; 32],
    config: Arc<ClientConfig>,
    seen: Arc<Mutex<Option<Vec<u8>>>>,
}

/// Calls sidecars; shared by all reconciles.
pub struct SidecarClient {
    ca_bundle: Option<Vec<u8>>,
    timeout: Duration,
    identity: Option<SidecarClientFiles>,
    probe_tls: Mutex<HashMap<String, Arc<ProbeTls>>>,
}

/// Why a call did not get an answer.
enum Failure {
    Tls { detail: String, pin_mismatch: bool },
    Connect(String),
}

impl SidecarClient {
    pub fn new(
        ca_bundle: Option<Vec<u8>>,
        timeout: Duration,
        identity: Option<SidecarClientFiles>,
    ) -> Self {
        Self {
            ca_bundle,
            timeout,
            identity,
            probe_tls: Mutex::default(),
        }
    }

    fn trust(&self, tls: &TlsTarget) -> Trust {
        match tls.ca_crt.as_ref().or(self.ca_bundle.as_ref()) {
            Some(pem) => Trust::Roots(pem.clone()),
            None => Trust::Pinned(tls.leaf_der.clone()),
        }
    }

    /// `GET /v0/healthz` (no credential), at most [`BODY_LIMIT`] bytes read.
    pub async fn probe(&self, target: &Target) -> ProbeResult {
        let url = url(target, SIDECAR_HEALTH_PATH);
        let (config, seen) = match &target.tls {
            Some(tls) => match self.probe_config(&target.host, tls) {
                Ok(entry) => (Some(entry.config.clone()), Some(entry.seen.clone())),
                Err(message) => return ProbeResult::HandshakeFailed(message),
            },
            None => (None, None),
        };
        let result = self
            .call(target, config, Method::GET, SIDECAR_HEALTH_PATH, None)
            .await;
        let served_other = match (&target.tls, &seen) {
            (Some(tls), Some(seen)) => seen
                .lock()
                .take()
                .is_some_and(|served| served != tls.leaf_der),
            _ => false,
        };
        let via = if target.tls.is_some() {
            " through kube-rbac-proxy over verified TLS"
        } else {
            ""
        };
        match result {
            Ok((status, _)) if served_other => ProbeResult::CertificateMismatch(format!(
                "{url} answered {} with a certificate that is not the leaf in the node's Secret \
                 (kube-rbac-proxy has not picked up a rotation yet, or the pod mounts another Secret)",
                status.as_u16()
            )),
            Ok((status, _)) if status.is_success() => {
                ProbeResult::Healthy(format!("{url} answered {}{via}", status.as_u16()))
            }
            Ok((StatusCode::SERVICE_UNAVAILABLE, _)) => ProbeResult::NotMarkedReady(format!(
                "{url} answered 503: the sidecar has not completed mark-ready since it started; \
                 the controller submits it again"
            )),
            Ok((status @ (StatusCode::UNAUTHORIZED | StatusCode::FORBIDDEN), _)) => {
                ProbeResult::Unhealthy(format!(
                    "{url} answered HTTP {}: kube-rbac-proxy asked for credentials on a bypass path, \
                     so the pod predates this controller's template (the controller rolls it)",
                    status.as_u16()
                ))
            }
            Ok((status, _)) => {
                ProbeResult::Unhealthy(format!("{url} answered HTTP {}", status.as_u16()))
            }
            Err(Failure::Tls {
                pin_mismatch: true, ..
            }) => ProbeResult::CertificateMismatch(format!(
                "{url} presented a certificate that is not the leaf in the node's Secret (kube-rbac-proxy \
                 has not picked up a rotation yet, or the pod mounts another Secret)"
            )),
            Err(Failure::Tls { detail, .. }) if target.tls.is_some() => {
                ProbeResult::HandshakeFailed(format!("TLS handshake with {url} failed: {detail}"))
            }
            Err(Failure::Tls { detail, .. } | Failure::Connect(detail)) => {
                ProbeResult::Unreachable(format!("{url} is unreachable: {detail}"))
            }
        }
    }

    /// Submits the task `kind` with `id` (idempotent: a task the sidecar already has is not
    /// run again) and reads how it stands.
    pub async fn run_task(&self, target: &Target, id: &str, kind: &str) -> TaskProgress {
        let config = match &target.tls {
            Some(tls) => match self.task_config(&target.host, tls) {
                Ok(config) => Some(config),
                Err(waiting) => return waiting,
            },
            None => None,
        };
        let body = serde_json::json!({"id": id, "type": kind}).to_string();
        let submit = self
            .call(
                target,
                config.clone(),
                Method::POST,
                "/v0/tasks",
                Some(body.into()),
            )
            .await;
        let submitted = url(target, "/v0/tasks");
        match submit {
            Err(failure) => return unreachable(&submitted, failure),
            Ok((status, _)) if status.is_success() => {}
            Ok((status, body)) => return refused(&submitted, kind, status, &body),
        }
        let path = format!("/v0/tasks/{id}");
        let read = url(target, &path);
        match self.call(target, config, Method::GET, &path, None).await {
            Err(failure) => unreachable(&read, failure),
            Ok((status, body)) if status.is_success() => {
                match serde_json::from_slice::<TaskRecord>(&body) {
                    Ok(record) => match record.status.as_str() {
                        "completed" => TaskProgress::Completed,
                        "failed" => TaskProgress::Failed(format!(
                            "the sidecar's task {kind} ({id}) failed: {}",
                            record.error.as_deref().unwrap_or("no error given")
                        )),
                        other => TaskProgress::Waiting(format!(
                            "the sidecar's task {kind} ({id}) is {other}"
                        )),
                    },
                    Err(error) => TaskProgress::Waiting(format!(
                        "{read} answered a task record the controller cannot read ({error})"
                    )),
                }
            }
            Ok((status, body)) => refused(&read, kind, status, &body),
        }
    }

    /// The probe's TLS configuration for `host`: kept while the trust and the leaf stay the
    /// same (a rotation starts a new one).
    fn probe_config(&self, host: &str, tls: &TlsTarget) -> Result<Arc<ProbeTls>, String> {
        let trust = self.trust(tls);
        let key = trust_digest(&trust, &tls.leaf_der);
        let mut configs = self.probe_tls.lock();
        if let Some(entry) = configs.get(host).filter(|e| e.key == key) {
            return Ok(entry.clone());
        }
        let seen = Arc::new(Mutex::new(None));
        let verifier = RecordingVerifier::new(&trust, None, seen.clone())?;
        let mut config = client_config(verifier)?.with_no_client_auth();
        // Every probe verifies the certificate: a resumed session would skip the verifier, and
        // with it the check that the leaf is the Secret's.
        config.resumption = rustls::client::Resumption::disabled();
        let entry = Arc::new(ProbeTls {
            key,
            config: Arc::new(config),
            seen,
        });
        configs.insert(host.to_owned(), entry.clone());
        Ok(entry)
    }

    /// A task call's TLS configuration: the controller's certificate (read now, so a renewed
    /// one is used), presented only to a server holding exactly the Secret's leaf.
    fn task_config(&self, host: &str, tls: &TlsTarget) -> Result<Arc<ClientConfig>, TaskProgress> {
        let Some(identity) = &self.identity else {
            return Err(TaskProgress::Waiting(
                "the controller has no client certificate for the node proxies \
                 (--sidecar-client-cert-file, --sidecar-client-key-file, --sidecar-client-ca-file)"
                    .to_owned(),
            ));
        };
        let (chain, key) = read_identity(identity).map_err(TaskProgress::Waiting)?;
        let seen = Arc::new(Mutex::new(None));
        let verifier = RecordingVerifier::new(&self.trust(tls), Some(tls.leaf_der.clone()), seen)
            .map_err(TaskProgress::Waiting)?;
        let mut config = client_config(verifier)
            .map_err(TaskProgress::Waiting)?
            .with_client_auth_cert(chain, key)
            .map_err(|e| {
                TaskProgress::Waiting(format!(
                    "the controller's client certificate for {host} is not usable: {e}"
                ))
            })?;
        // The leaf is checked on every call (see `probe_config`).
        config.resumption = rustls::client::Resumption::disabled();
        Ok(Arc::new(config))
    }

    /// One request over a fresh connection to `target.addr`; at most [`BODY_LIMIT`] bytes of
    /// the answer are read, and the whole call ends within the timeout.
    async fn call(
        &self,
        target: &Target,
        tls: Option<Arc<ClientConfig>>,
        method: Method,
        path: &str,
        body: Option<Bytes>,
    ) -> Result<(StatusCode, Bytes), Failure> {
        let timeout = if method == Method::GET && path == SIDECAR_HEALTH_PATH {
            self.timeout
        } else {
            self.timeout.max(TASK_TIMEOUT)
        };
        let exchange = async {
            let tcp = tokio::net::TcpStream::connect(target.addr)
                .await
                .map_err(|e| Failure::Connect(format!("connect to {}: {e}", target.addr)))?;
            let json = body.is_some();
            let request = Request::builder()
                .method(method)
                .uri(path)
                .header(hyper::header::HOST, authority(target))
                .header(hyper::header::CONNECTION, "close");
            let request = if json {
                request.header(hyper::header::CONTENT_TYPE, "application/json")
            } else {
                request
            }
            .body(Full::new(body.unwrap_or_default()))
            .map_err(|e| Failure::Connect(e.to_string()))?;
            match tls {
                Some(config) => {
                    let name = ServerName::try_from(target.host.clone())
                        .map_err(|e| Failure::Connect(format!("{}: {e}", target.host)))?;
                    let stream = tokio_rustls::TlsConnector::from(config)
                        .connect(name, tcp)
                        .await
                        .map_err(|e| classify_io(&e))?;
                    exchange(stream, request).await
                }
                None => exchange(tcp, request).await,
            }
        };
        match tokio::time::timeout(timeout, exchange).await {
            Ok(result) => result,
            Err(_) => Err(Failure::Connect(format!("no answer within {timeout:?}"))),
        }
    }

    /// Forgets the probe configurations of pods `keep` rejects (deleted nodes).
    pub fn retain_hosts(&self, keep: impl Fn(&str) -> bool) {
        self.probe_tls.lock().retain(|host, _| keep(host));
    }
}

/// Sends `request` over `stream` (HTTP/1.1) and reads the status and at most [`BODY_LIMIT`]
/// bytes of the body; the connection is dropped after that, read to its end or not.
async fn exchange<S>(
    stream: S,
    request: Request<Full<Bytes>>,
) -> Result<(StatusCode, Bytes), Failure>
where
    S: AsyncRead + AsyncWrite + Send + Unpin + 'static,
{
    let (mut sender, connection) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
        .await
        .map_err(|e| Failure::Connect(seinode_tls_crds::error_chain(&e)))?;
    let driver = tokio::spawn(connection);
    let _stop = AbortOnDrop(driver);
    let response = sender
        .send_request(request)
        .await
        .map_err(|e| Failure::Connect(seinode_tls_crds::error_chain(&e)))?;
    let status = response.status();
    let mut body = response.into_body();
    let mut read = Vec::new();
    while read.len() < BODY_LIMIT {
        match body.frame().await {
            Some(Ok(frame)) => {
                if let Some(data) = frame.data_ref() {
                    let room = BODY_LIMIT - read.len();
                    read.extend_from_slice(&data[..data.len().min(room)]);
                }
            }
            // An answer cut short still has its status.
            Some(Err(_)) | None => break,
        }
    }
    Ok((status, Bytes::from(read)))
}

/// Ends the connection's task when the call returns, whatever it read.
struct AbortOnDrop(tokio::task::JoinHandle<Result<(), hyper::Error>>);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.0.abort();
    }
}

fn authority(target: &Target) -> String {
    format!("{}:{}", target.host, target.addr.port())
}

fn url(target: &Target, path: &str) -> String {
    let scheme = if target.tls.is_some() {
        "https"
    } else {
        "http"
    };
    format!("{scheme}://{}{path}", authority(target))
}

fn unreachable(url: &str, failure: Failure) -> TaskProgress {
    match failure {
        Failure::Tls {
            pin_mismatch: true, ..
        } => TaskProgress::Waiting(format!(
            "{url} presented a certificate that is not the leaf in the node's Secret; the \
             controller sends its client certificate only to the Secret's leaf"
        )),
        Failure::Tls { detail, .. } => {
            TaskProgress::Waiting(format!("TLS handshake with {url} failed: {detail}"))
        }
        Failure::Connect(detail) => {
            TaskProgress::Waiting(format!("{url} is not reachable yet: {detail}"))
        }
    }
}

/// A non-2xx answer to a task call: the API's refusals of what the controller sent are
/// permanent (400: a sidecar that does not know the task), those of who sent it are not (a
/// missing RBAC grant is fixed without a change of the node).
fn refused(url: &str, kind: &str, status: StatusCode, body: &[u8]) -> TaskProgress {
    let said = serde_json::from_slice::<serde_json::Value>(body)
        .ok()
        .and_then(|v| v.get("error")?.as_str().map(str::to_owned))
        .map(|e| format!(": {}", clip(&e, 200)))
        .unwrap_or_default();
    let code = status.as_u16();
    match status {
        StatusCode::BAD_REQUEST => TaskProgress::Failed(format!(
            "{url} refused the task {kind} (HTTP 400{said}); the sidecar image may predate it"
        )),
        StatusCode::UNAUTHORIZED => TaskProgress::Waiting(format!(
            "{url} answered 401{said}: kube-rbac-proxy did not accept the controller's client \
             certificate (is the pod's --client-ca-file the controller's CA?)"
        )),
        StatusCode::FORBIDDEN => TaskProgress::Waiting(format!(
            "{url} answered 403{said}: grant the controller's certificate user create and get on \
             seinodetasks.sei.io (the chart's sidecar-client ClusterRole)"
        )),
        _ => TaskProgress::Waiting(format!("{url} answered HTTP {code}{said}")),
    }
}

/// At most `max` characters of `text` (what a sidecar says is quoted, never in full).
fn clip(text: &str, max: usize) -> String {
    match text.char_indices().nth(max) {
        Some((end, _)) => format!("{}…", &text[..end]),
        None => text.to_owned(),
    }
}

fn read_identity(
    files: &SidecarClientFiles,
) -> Result<(Vec<CertificateDer<'static>>, PrivateKeyDer<'static>), String> {
    let chain = CertificateDer::pem_file_iter(&files.cert_file)
        .and_then(|certs| certs.collect::<Result<Vec<_>, _>>())
        .map_err(|e| {
            format!(
                "failed to read the controller's client certificate {}: {e}",
                files.cert_file.display()
            )
        })?;
    if chain.is_empty() {
        return Err(format!(
            "{} holds no PEM CERTIFICATE",
            files.cert_file.display()
        ));
    }
    let key = PrivateKeyDer::from_pem_file(&files.key_file).map_err(|e| {
        format!(
            "failed to read the controller's client key {}: {e}",
            files.key_file.display()
        )
    })?;
    Ok((chain, key))
}

fn client_config(
    verifier: RecordingVerifier,
) -> Result<rustls::ConfigBuilder<ClientConfig, rustls::client::WantsClientCert>, String> {
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    Ok(ClientConfig::builder_with_provider(provider)
        .with_protocol_versions(&[&rustls::version::TLS13, &rustls::version::TLS12])
        .map_err(|e| format!("TLS configuration: {e}"))?
        .dangerous()
        .with_custom_certificate_verifier(Arc::new(verifier)))
}

/// TLS if a rustls error is anywhere in the chain, else a connection problem.
fn classify_io(error: &std::io::Error) -> Failure {
    match find_rustls_error(error) {
        Some(tls) => {
            let pin_mismatch = matches!(
                tls,
                rustls::Error::InvalidCertificate(CertificateError::Other(other)) if other.0.is::<PinMismatch>()
            );
            Failure::Tls {
                detail: tls.to_string(),
                pin_mismatch,
            }
        }
        None => Failure::Connect(seinode_tls_crds::error_chain(error)),
    }
}

/// Walks the cause chain, looking inside `io::Error`s (whose `source()` skips the error they
/// wrap, which is where tokio-rustls puts the TLS error).
fn find_rustls_error<'a>(
    error: &'a (dyn std::error::Error + 'static),
) -> Option<&'a rustls::Error> {
    let mut current: Option<&(dyn std::error::Error + 'static)> = Some(error);
    while let Some(e) = current {
        if let Some(tls) = e.downcast_ref::<rustls::Error>() {
            return Some(tls);
        }
        current = match e.downcast_ref::<std::io::Error>() {
            Some(io) => match io.get_ref() {
                Some(inner) => Some(inner as &(dyn std::error::Error + 'static)),
                None => std::error::Error::source(io),
            },
            None => e.source(),
        };
    }
    None
}

const PIN_MISMATCH: &str = "not the certificate of the node's Secret";

/// Verifies like rustls' WebPKI verifier (CA mode) or by exact leaf (pinning), records the
/// leaf presented (so a CA-valid but unexpected certificate is reported as a mismatch), and,
/// with `require`, refuses any leaf but that one.
#[derive(Debug)]
struct RecordingVerifier {
    mode: VerifyMode,
    require: Option<Vec<u8>>,
    seen: Arc<Mutex<Option<Vec<u8>>>>,
    algorithms: rustls::crypto::WebPkiSupportedAlgorithms,
}

#[derive(Debug)]
enum VerifyMode {
    Roots(Arc<rustls::client::WebPkiServerVerifier>),
    Pinned(Vec<u8>),
}

impl RecordingVerifier {
    fn new(
        trust: &Trust,
        require: Option<Vec<u8>>,
        seen: Arc<Mutex<Option<Vec<u8>>>>,
    ) -> Result<Self, String> {
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let algorithms = provider.signature_verification_algorithms;
        let mode = match trust {
            Trust::Pinned(der) => VerifyMode::Pinned(der.clone()),
            Trust::Roots(pem) => {
                let mut roots = rustls::RootCertStore::empty();
                for cert in CertificateDer::pem_slice_iter(pem) {
                    let cert = cert.map_err(|e| format!("the CA bundle is not PEM: {e}"))?;
                    roots
                        .add(cert)
                        .map_err(|e| format!("the CA bundle holds an unusable certificate: {e}"))?;
                }
                let verifier = rustls::client::WebPkiServerVerifier::builder_with_provider(
                    Arc::new(roots),
                    provider,
                )
                .build()
                .map_err(|e| format!("the CA bundle cannot be used: {e}"))?;
                VerifyMode::Roots(verifier)
            }
        };
        Ok(Self {
            mode,
            require,
            seen,
            algorithms,
        })
    }
}

fn pin_mismatch() -> rustls::Error {
    rustls::Error::InvalidCertificate(CertificateError::Other(rustls::OtherError(Arc::new(
        PinMismatch,
    ))))
}

impl ServerCertVerifier for RecordingVerifier {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        server_name: &ServerName<'_>,
        ocsp_response: &[u8],
        now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        *self.seen.lock() = Some(end_entity.to_vec());
        match &self.mode {
            VerifyMode::Roots(verifier) => {
                verifier.verify_server_cert(
                    end_entity,
                    intermediates,
                    server_name,
                    ocsp_response,
                    now,
                )?;
            }
            VerifyMode::Pinned(pinned) => {
                // The name first: a certificate for another host is a handshake failure.
                let parsed = rustls::server::ParsedCertificate::try_from(end_entity)?;
                rustls::client::verify_server_name(&parsed, server_name)?;
                if end_entity.as_ref() != pinned.as_slice() {
                    return Err(pin_mismatch());
                }
            }
        }
        if self
            .require
            .as_ref()
            .is_some_and(|leaf| leaf.as_slice() != end_entity.as_ref())
        {
            return Err(pin_mismatch());
        }
        Ok(ServerCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(message, cert, dss, &self.algorithms)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(message, cert, dss, &self.algorithms)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.algorithms.supported_schemes()
    }
}

#[derive(Debug)]
struct PinMismatch;

impl std::fmt::Display for PinMismatch {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(PIN_MISMATCH)
    }
}

impl std::error::Error for PinMismatch {}

/// The id of task `kind` for the pod with uid `pod_uid`: the same for every controller that
/// asks (a restarted one never submits it twice), new for a new pod. seictl takes only UUIDs;
/// this is a name-based one (version 5 layout over SHA-256).
pub fn task_id(pod_uid: &str, kind: &str) -> String {
    use sha2::{Digest, Sha256};
    let digest = Sha256::new()
        .chain_update(b"seinode-tls sidecar task\0")
        .chain_update(pod_uid.as_bytes())
        .chain_update(b"\0")
        .chain_update(kind.as_bytes())
        .finalize();
    let mut bytes = [0u8; 16];
    bytes.copy_from_slice(&digest[..16]);
    bytes[6] = (bytes[6] & 0x0f) | 0x50;
    bytes[8] = (bytes[8] & 0x3f) | 0x80;
    let hex: String = bytes.iter().map(|b| format!("{b:02x}")).collect();
    format!(
        "{}-{}-{}-{}-{}",
        &hex[..8],
        &hex[8..12],
        &hex[12..16],
        &hex[16..20],
        &hex[20..]
    )
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used)]

    use super::*;

    /// The metric's pre-created series are exactly the reasons a probe can end in.
    #[test]
    fn every_probe_reason_is_listed_once() {
        let m = String::new;
        let reasons: Vec<&str> = [
            ProbeResult::Healthy(m()),
            ProbeResult::Unreachable(m()),
            ProbeResult::HandshakeFailed(m()),
            ProbeResult::CertificateMismatch(m()),
            ProbeResult::NotMarkedReady(m()),
            ProbeResult::Unhealthy(m()),
            ProbeResult::NotProbed(m()),
        ]
        .iter()
        .map(ProbeResult::reason)
        .collect();
        assert_eq!(reasons, ProbeResult::REASONS);
    }

    #[test]
    fn task_ids_are_uuids_stable_per_pod_and_task() {
        let id = task_id("pod-uid-1", "mark-ready");
        assert_eq!(id, task_id("pod-uid-1", "mark-ready"));
        assert_ne!(id, task_id("pod-uid-2", "mark-ready"));
        assert_ne!(id, task_id("pod-uid-1", "config-validate"));
        let groups: Vec<usize> = id.split('-').map(str::len).collect();
        assert_eq!(groups, [8, 4, 4, 4, 12], "{id}");
        assert_eq!(&id[14..15], "5", "version 5 layout: {id}");
    }

    #[test]
    fn pod_addresses_come_from_the_pod_within_the_allowed_network_or_a_fixed_entry() {
        let any = SidecarAddresses::default();
        let ip: IpAddr = "10.1.2.3".parse().unwrap();
        assert_eq!(
            any.resolve("p", Some(ip), 8443),
            Ok(SocketAddr::new(ip, 8443))
        );
        assert!(any.resolve("p", None, 8443).unwrap_err().contains("no IP"));
        let only = SidecarAddresses::pod_ips_where(|ip| ip.to_string().starts_with("198.18."));
        assert!(only.resolve("p", Some(ip), 8443).is_err());
        let fixed: SocketAddr = "127.0.0.1:4000".parse().unwrap();
        only.set("p", fixed);
        assert_eq!(only.resolve("p", Some(ip), 8443), Ok(fixed));
    }

    /// The process's resident memory (KiB), from `/proc/self/status`.
    fn rss_kib() -> u64 {
        std::fs::read_to_string("/proc/self/status")
            .unwrap()
            .lines()
            .find_map(|l| l.strip_prefix("VmRSS:"))
            .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
            .unwrap()
    }

    /// A sidecar that streams an endless body: each probe reads [`BODY_LIMIT`] bytes, answers,
    /// and the server sees the connection closed; fifty of them leave memory where it was.
    #[tokio::test]
    async fn a_probe_reads_a_bounded_part_of_an_endless_answer_and_hangs_up() {
        use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
        const PROBES: usize = 50;
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let server = tokio::spawn(async move {
            let mut most = 0usize;
            for _ in 0..PROBES {
                let (mut stream, _) = listener.accept().await.unwrap();
                let mut head = [0u8; 1024];
                let _ = stream.read(&mut head).await.unwrap();
                stream
                    .write_all(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n")
                    .await
                    .unwrap();
                let chunk = format!("{:x}\r\n{}\r\n", 65536, "x".repeat(65536));
                let mut sent = 0usize;
                // Ends when the client hangs up; bounded in case it never does.
                while sent < 1 << 30 {
                    if stream.write_all(chunk.as_bytes()).await.is_err() {
                        break;
                    }
                    sent += 65536;
                }
                most = most.max(sent);
            }
            most
        });
        let client = SidecarClient::new(None, Duration::from_secs(5), None);
        let target = Target {
            host: "rpc-0.rpc.ns.svc.cluster.local".to_owned(),
            addr,
            tls: None,
        };
        let before = rss_kib();
        for _ in 0..PROBES {
            let result = client.probe(&target).await;
            assert!(result.is_healthy(), "{result:?}");
        }
        let after = rss_kib();
        let most = tokio::time::timeout(Duration::from_secs(30), server)
            .await
            .expect("the server sees every connection closed")
            .unwrap();
        // The figures: what an endless answer costs is what the kernel buffers before the
        // hang-up, not what the sidecar sends.
        println!(
            "an endless answer, {PROBES} probes: at most {most} bytes sent before each hang-up; \
             resident memory {before} KiB before, {after} KiB after"
        );
        assert!(most < 64 << 20, "the server could send {most} bytes");
    }

    #[tokio::test]
    async fn a_task_call_without_a_client_certificate_waits_with_a_message_naming_the_flags() {
        let client = SidecarClient::new(None, Duration::from_secs(1), None);
        let target = Target {
            host: "rpc-0.rpc.ns.svc.cluster.local".to_owned(),
            addr: "127.0.0.1:9".parse().unwrap(),
            tls: Some(TlsTarget {
                leaf_der: vec![1, 2, 3],
                ca_crt: None,
            }),
        };
        match client
            .run_task(&target, &task_id("u", "mark-ready"), "mark-ready")
            .await
        {
            TaskProgress::Waiting(message) => {
                assert!(message.contains("--sidecar-client-cert-file"), "{message}");
            }
            other => panic!("{other:?}"),
        }
    }
}
