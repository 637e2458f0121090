//! The end-to-end check of a node's sidecar through its front door.
//!
//! With TLS the controller calls `https://<pod-0 DNS name>:8443/healthz` the way a client of the
//! sidecar would: the server name is the pod's DNS name and verification is real. The trust
//! anchor is the Secret's `ca.crt`, else the `--sidecar-ca-bundle`, else the Secret's exact leaf
//! (pinning). Without TLS it is plain HTTP on the sidecar port. Clients are cached per host and
//! trust, so probes reuse connections and a rotation (new trust) starts fresh ones.
//!
//! The probe sends no credential, ever: kube-rbac-proxy passes `/healthz` through unchecked
//! (`--ignore-paths`), so whoever answers in the pod's name — a rogue Pod with the node's
//! hostname and its Secret's certificate included — learns nothing it could replay.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::{Arc, Mutex, RwLock};
use std::task::{Context, Poll};
use std::time::Duration;

use http_body_util::{BodyExt, Empty};
use hyper::body::Bytes;
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::client::legacy::connect::dns::{GaiResolver, Name};
use hyper_util::rt::TokioExecutor;
use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, ServerName, UnixTime};
use rustls::{CertificateError, DigitallySignedStruct, SignatureScheme};

use crate::config::SIDECAR_HEALTH_PATH;

/// Where to connect for a host name, instead of DNS (tests and `local`, which have no cluster
/// DNS; the name still drives SNI and verification). A table that is `only` never falls back to
/// DNS: a host it does not list is unreachable, and no query leaves the machine.
#[derive(Clone, Default, Debug)]
pub struct SidecarAddresses {
    table: Arc<RwLock<HashMap<String, SocketAddr>>>,
    only: bool,
}

impl SidecarAddresses {
    /// A table with no DNS fallback.
    pub fn only() -> Self {
        Self {
            only: true,
            ..Self::default()
        }
    }

    pub fn is_only(&self) -> bool {
        self.only
    }

    pub fn set(&self, host: &str, addr: SocketAddr) {
        self.table
            .write()
            .unwrap_or_else(|e| e.into_inner())
            .insert(host.to_owned(), addr);
    }

    fn get(&self, host: &str) -> Option<SocketAddr> {
        self.table
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .get(host)
            .copied()
    }
}

/// What a probe found. Each maps to one `SidecarReady` reason.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ProbeResult {
    Healthy(String),
    Unreachable(String),
    HandshakeFailed(String),
    /// The served certificate is not the Secret's leaf.
    CertificateMismatch(String),
    Unhealthy(String),
    /// Nothing to verify against: the node's TLS Secret is not usable.
    NotProbed(String),
}

impl ProbeResult {
    pub fn reason(&self) -> &'static str {
        match self {
            ProbeResult::Healthy(_) => "SidecarHealthy",
            ProbeResult::Unreachable(_) => "SidecarUnreachable",
            ProbeResult::HandshakeFailed(_) => "SidecarTLSHandshakeFailed",
            ProbeResult::CertificateMismatch(_) => "SidecarCertificateMismatch",
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
            | ProbeResult::Unhealthy(m)
            | ProbeResult::NotProbed(m) => m,
        }
    }

    pub fn is_healthy(&self) -> bool {
        matches!(self, ProbeResult::Healthy(_))
    }
}

/// How to trust the sidecar's proxy.
#[derive(Clone, PartialEq, Eq, Hash)]
enum Trust {
    /// PEM CA certificates (the Secret's `ca.crt` or the configured bundle).
    Roots(Vec<u8>),
    /// Exactly this leaf (DER).
    Pinned(Vec<u8>),
}

type HttpsClient =
    Client<hyper_rustls::HttpsConnector<HttpConnector<OverrideResolver>>, Empty<Bytes>>;
type PlainClient = Client<HttpConnector<OverrideResolver>, Empty<Bytes>>;

/// A client per pod host, trust anchor and expected leaf.
type ClientKey = (String, Trust, Vec<u8>);

struct TlsEntry {
    client: HttpsClient,
    /// The leaf the last handshake of this client presented.
    seen: Arc<Mutex<Option<Vec<u8>>>>,
}

/// Probes sidecars; shared by all reconciles.
pub struct SidecarProber {
    addresses: SidecarAddresses,
    ca_bundle: Option<Vec<u8>>,
    timeout: Duration,
    tls: Mutex<HashMap<ClientKey, Arc<TlsEntry>>>,
    plain: PlainClient,
}

impl SidecarProber {
    pub fn new(addresses: SidecarAddresses, ca_bundle: Option<Vec<u8>>, timeout: Duration) -> Self {
        let plain =
            Client::builder(TokioExecutor::new()).build(http_connector(&addresses, timeout));
        Self {
            addresses,
            ca_bundle,
            timeout,
            tls: Mutex::default(),
            plain,
        }
    }

    /// `GET https://host:port/healthz` through kube-rbac-proxy, verified against the Secret.
    pub async fn probe_tls(
        &self,
        host: &str,
        port: u16,
        leaf_der: &[u8],
        ca_crt: Option<&[u8]>,
    ) -> ProbeResult {
        let trust = match ca_crt.or(self.ca_bundle.as_deref()) {
            Some(pem) => Trust::Roots(pem.to_vec()),
            None => Trust::Pinned(leaf_der.to_vec()),
        };
        let entry = match self.tls_entry(host, trust, leaf_der) {
            Ok(entry) => entry,
            Err(message) => return ProbeResult::HandshakeFailed(message),
        };
        let url = format!(
            "https://{host}:{}{SIDECAR_HEALTH_PATH}",
            self.port_for(host, port)
        );
        let result = self.get(&entry.client, &url).await;
        let seen = entry.seen.lock().unwrap_or_else(|e| e.into_inner()).clone();
        let served_other = seen.as_deref().is_some_and(|served| served != leaf_der);
        match result {
            Ok(status) if served_other => ProbeResult::CertificateMismatch(format!(
                "{url} answered {status} with a certificate that is not the leaf in the node's Secret \
                 (kube-rbac-proxy has not picked up a rotation yet, or the pod mounts another Secret)"
            )),
            Ok(status) if (200..300).contains(&status) => ProbeResult::Healthy(format!(
                "{url} answered {status} through kube-rbac-proxy over verified TLS"
            )),
            Ok(status @ (401 | 403)) => ProbeResult::Unhealthy(format!(
                "{url} answered HTTP {status}: kube-rbac-proxy asked for credentials on the health \
                 path, so the pod predates --ignore-paths=/healthz (a spec.image update \
                 re-applies its template)"
            )),
            Ok(status) => ProbeResult::Unhealthy(format!("{url} answered HTTP {status}")),
            Err(Failure::Tls {
                pin_mismatch: true, ..
            }) => ProbeResult::CertificateMismatch(format!(
                "{url} presented a certificate that is not the leaf in the node's Secret (kube-rbac-proxy \
                     has not picked up a rotation yet, or the pod mounts another Secret)"
            )),
            Err(Failure::Tls { detail, .. }) => {
                ProbeResult::HandshakeFailed(format!("TLS handshake with {url} failed: {detail}"))
            }
            Err(Failure::Connect(detail)) => {
                ProbeResult::Unreachable(format!("{url} is unreachable: {detail}"))
            }
        }
    }

    /// `GET http://host:port/healthz` on a sidecar without TLS (no credentials sent).
    pub async fn probe_plain(&self, host: &str, port: u16) -> ProbeResult {
        let url = format!(
            "http://{host}:{}{SIDECAR_HEALTH_PATH}",
            self.port_for(host, port)
        );
        match self.get(&self.plain, &url).await {
            Ok(status) if (200..300).contains(&status) => {
                ProbeResult::Healthy(format!("{url} answered {status}"))
            }
            Ok(status) => ProbeResult::Unhealthy(format!("{url} answered HTTP {status}")),
            Err(Failure::Tls { detail, .. } | Failure::Connect(detail)) => {
                ProbeResult::Unreachable(format!("{url} is unreachable: {detail}"))
            }
        }
    }

    /// The connector takes the port from the URL, so an override moves the port there too.
    fn port_for(&self, host: &str, port: u16) -> u16 {
        self.addresses.get(host).map_or(port, |addr| addr.port())
    }

    /// The client for `host` under `trust`, for the Secret holding `leaf_der`: a new leaf (a
    /// rotation) gets a new client, so no pooled connection from before it is reused.
    fn tls_entry(
        &self,
        host: &str,
        trust: Trust,
        leaf_der: &[u8],
    ) -> Result<Arc<TlsEntry>, String> {
        let mut clients = self.tls.lock().unwrap_or_else(|e| e.into_inner());
        let key = (host.to_owned(), trust.clone(), leaf_der.to_vec());
        if let Some(entry) = clients.get(&key) {
            return Ok(entry.clone());
        }
        // A rotation replaces the trust: drop the host's old clients and their connections.
        clients.retain(|(h, _, _), _| h != host);
        let seen = Arc::new(Mutex::new(None));
        let verifier = Arc::new(RecordingVerifier::new(&trust, seen.clone())?);
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let config = rustls::ClientConfig::builder_with_provider(provider)
            .with_protocol_versions(&[&rustls::version::TLS13, &rustls::version::TLS12])
            .map_err(|e| format!("TLS configuration: {e}"))?
            .dangerous()
            .with_custom_certificate_verifier(verifier)
            .with_no_client_auth();
        let connector = hyper_rustls::HttpsConnectorBuilder::new()
            .with_tls_config(config)
            .https_only()
            .enable_http1()
            .wrap_connector(http_connector(&self.addresses, self.timeout));
        let client = Client::builder(TokioExecutor::new()).build(connector);
        let entry = Arc::new(TlsEntry { client, seen });
        clients.insert(key, entry.clone());
        Ok(entry)
    }

    async fn get<C>(&self, client: &Client<C, Empty<Bytes>>, url: &str) -> Result<u16, Failure>
    where
        C: hyper_util::client::legacy::connect::Connect + Clone + Send + Sync + 'static,
    {
        // No Authorization header, no cookie: nothing that authenticates anywhere.
        let request = hyper::Request::get(url)
            .body(Empty::new())
            .map_err(|e| Failure::Connect(e.to_string()))?;
        let response = match tokio::time::timeout(self.timeout, client.request(request)).await {
            Ok(Ok(response)) => response,
            Ok(Err(error)) => return Err(classify(&error)),
            Err(_) => {
                return Err(Failure::Connect(format!(
                    "no answer within {:?}",
                    self.timeout
                )));
            }
        };
        let status = response.status().as_u16();
        // Drain the (small) body so the connection can be reused.
        let _ = tokio::time::timeout(self.timeout, response.into_body().collect()).await;
        Ok(status)
    }
}

enum Failure {
    Tls { detail: String, pin_mismatch: bool },
    Connect(String),
}

/// TLS if a rustls error is anywhere in the chain, else a connection problem.
fn classify(error: &hyper_util::client::legacy::Error) -> Failure {
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
/// wrap, which is where hyper and tokio-rustls put the TLS error).
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

const PIN_MISMATCH: &str = "not the pinned certificate";

/// Verifies like rustls' WebPKI verifier (CA mode) or by exact leaf (pinning), and records the
/// leaf presented so a CA-valid but unexpected certificate is reported as a mismatch.
#[derive(Debug)]
struct RecordingVerifier {
    mode: VerifyMode,
    seen: Arc<Mutex<Option<Vec<u8>>>>,
    algorithms: rustls::crypto::WebPkiSupportedAlgorithms,
}

#[derive(Debug)]
enum VerifyMode {
    Roots(Arc<rustls::client::WebPkiServerVerifier>),
    Pinned(Vec<u8>),
}

impl RecordingVerifier {
    fn new(trust: &Trust, seen: Arc<Mutex<Option<Vec<u8>>>>) -> Result<Self, String> {
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
            seen,
            algorithms,
        })
    }
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
        *self.seen.lock().unwrap_or_else(|e| e.into_inner()) = Some(end_entity.to_vec());
        match &self.mode {
            VerifyMode::Roots(verifier) => verifier.verify_server_cert(
                end_entity,
                intermediates,
                server_name,
                ocsp_response,
                now,
            ),
            VerifyMode::Pinned(pinned) => {
                // The name first: a certificate for another host is a handshake failure.
                let parsed = rustls::server::ParsedCertificate::try_from(end_entity)?;
                rustls::client::verify_server_name(&parsed, server_name)?;
                if end_entity.as_ref() == pinned.as_slice() {
                    Ok(ServerCertVerified::assertion())
                } else {
                    Err(rustls::Error::InvalidCertificate(CertificateError::Other(
                        rustls::OtherError(Arc::new(PinMismatch)),
                    )))
                }
            }
        }
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

fn http_connector(
    addresses: &SidecarAddresses,
    timeout: Duration,
) -> HttpConnector<OverrideResolver> {
    let mut http = HttpConnector::new_with_resolver(OverrideResolver {
        addresses: addresses.clone(),
        gai: GaiResolver::new(),
    });
    http.enforce_http(false);
    http.set_connect_timeout(Some(timeout));
    http
}

/// DNS, except for hosts with an address override.
#[derive(Clone)]
struct OverrideResolver {
    addresses: SidecarAddresses,
    gai: GaiResolver,
}

type Addrs = Box<dyn Iterator<Item = SocketAddr> + Send>;

impl tower_service::Service<Name> for OverrideResolver {
    type Response = Addrs;
    type Error = std::io::Error;
    type Future = Pin<Box<dyn Future<Output = Result<Addrs, std::io::Error>> + Send>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.gai.poll_ready(cx)
    }

    fn call(&mut self, name: Name) -> Self::Future {
        if let Some(addr) = self.addresses.get(name.as_str()) {
            return Box::pin(async move { Ok(Box::new(std::iter::once(addr)) as Addrs) });
        }
        if self.addresses.only {
            let error = std::io::Error::new(
                std::io::ErrorKind::NotFound,
                format!("no address is known for {name} (DNS is not used for sidecars here)"),
            );
            return Box::pin(async move { Err(error) });
        }
        let lookup = self.gai.call(name);
        Box::pin(async move { Ok(Box::new(lookup.await?) as Addrs) })
    }
}

impl SidecarProber {
    /// Forgets clients of hosts `keep` rejects (deleted nodes).
    pub fn retain_hosts(&self, keep: impl Fn(&str) -> bool) {
        self.tls
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .retain(|(host, _, _), _| keep(host));
    }
}
