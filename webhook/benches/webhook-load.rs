//! `webhook-load`: how much a SeiNode validation costs over the bare HTTPS round trip.
//!
//! It starts the webhook in this process, over real TLS on loopback, with its caches filled by
//! hand: one valid `kubernetes.io/tls` Secret for the SeiNode in the requests, and an empty,
//! synced SeiNode cache. No API server is involved. Then it drives two endpoints of the same
//! server with the same AdmissionReview bodies (a kubectl-sized CREATE of a TLS SeiNode):
//!
//! - `POST /validate/seinodes`: the full decision (span, cache lookup, contract, judge, metrics);
//!   every answer must be an allow without warnings, which proves the judge found the Secret;
//! - `POST /floor`: the same read and parse, then a constant allow: everything but the decision.
//!
//! Each of `--concurrency` keep-alive HTTP/1.1 connections sends one request after another.
//! After a warm-up, floor and validate phases alternate (`--rounds` of each) so drift on a shared
//! machine hits both alike. Every phase is bounded in time and in requests. The figures go to
//! stdout, the last line being one JSON object; any failed request makes the exit status 1.
//! See `docs/benchmarks.md`.

use std::net::{Ipv4Addr, SocketAddr};
use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use clap::Parser;
use http_body_util::{BodyExt, Full};
use hyper::body::Bytes;
use hyper::client::conn::http1::SendRequest;
use hyper::header::{CONTENT_TYPE, HOST};
use hyper_util::rt::TokioIo;
use k8s_openapi::ByteString;
use k8s_openapi::api::core::v1::Secret;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;
use prometheus_client::registry::Registry;
use rcgen::{BasicConstraints, CertificateParams, CertifiedIssuer, DnType, IsCa, KeyPair};
use rustls::pki_types::ServerName;
use seinode_tls_crds::contract::{DEFAULT_CLUSTER_DOMAIN, required_dns_names};
use seinode_tls_crds::validation::TLS_SECRET_TYPE;
use seinode_tls_webhook::WebhookConfig;
use seinode_tls_webhook::cache::{NodeCache, SecretCache};
use seinode_tls_webhook::limits::{ConnectionCounters, read_body};
use seinode_tls_webhook::metrics::WebhookMetrics;
use seinode_tls_webhook::review::AdmissionResponse;
use seinode_tls_webhook::serve::{Port, serve};
use seinode_tls_webhook::server::{
    AdmissionState, MAX_SEINODE_REVIEW_BYTES, VALIDATE_SEINODES_PATH, admission_limits,
    admission_router, review_response,
};
use seinode_tls_webhook::tls::ServingCertificate;
use serde_json::{Value, json};

/// The SeiNode every request creates, and the Secret it names.
const NAMESPACE: &str = "sei";
const NODE_NAME: &str = "pacific-rpc-7";
const SECRET_NAME: &str = "pacific-rpc-7-sidecar-tls";
/// Distinct request uids cycled through (each answer must echo its own).
const DISTINCT_REVIEWS: usize = 64;
/// Most failed requests quoted in the report.
const ERRORS_QUOTED: usize = 5;
/// How long past a phase's deadline a connection may still wait for an answer before it is
/// abandoned (and counted as an error), so that a stuck server cannot hang the benchmark.
const STALL_LIMIT: Duration = Duration::from_secs(10);

#[derive(Debug, Parser)]
#[command(
    about = "Load benchmark: POST /validate/seinodes against the constant-allow /floor, over HTTPS"
)]
struct Args {
    /// Passed by `cargo bench` to every bench target; nothing to do with it.
    #[arg(long, hide = true)]
    bench: bool,
    /// Keep-alive connections, each sending one request after another.
    #[arg(long, env = "WEBHOOK_LOAD_CONCURRENCY", default_value_t = 32)]
    concurrency: usize,
    /// Measured time per endpoint, split evenly over the rounds.
    #[arg(long, env = "WEBHOOK_LOAD_DURATION", default_value = "10s", value_parser = humantime::parse_duration)]
    duration: Duration,
    /// Unmeasured warm-up before the first round, split evenly between the endpoints.
    #[arg(long, env = "WEBHOOK_LOAD_WARMUP", default_value = "2s", value_parser = humantime::parse_duration)]
    warmup: Duration,
    /// Most measured requests per endpoint, split evenly over the rounds.
    #[arg(long, env = "WEBHOOK_LOAD_MAX_REQUESTS", default_value_t = 1_000_000)]
    max_requests: u64,
    /// Measured phases per endpoint; they alternate floor, validate, floor, validate, ...
    #[arg(long, env = "WEBHOOK_LOAD_ROUNDS", default_value_t = 4)]
    rounds: u32,
    /// Log filter of the in-process webhook; `info` is what `seinode-tls webhook` runs with,
    /// so the request span costs what it costs in production. `off` removes the subscriber.
    #[arg(long, env = "RUST_LOG", default_value = "info")]
    log_filter: String,
}

fn main() -> ExitCode {
    let args = Args::parse();
    match run(&args) {
        Ok(Summary { errors: 0 }) => ExitCode::SUCCESS,
        Ok(Summary { errors }) => {
            eprintln!("webhook-load: {errors} request(s) failed");
            ExitCode::FAILURE
        }
        Err(error) => {
            eprintln!("webhook-load: {error:#}");
            ExitCode::FAILURE
        }
    }
}

struct Summary {
    errors: u64,
}

fn run(args: &Args) -> anyhow::Result<Summary> {
    if args.concurrency == 0 || args.rounds == 0 || args.max_requests < u64::from(args.rounds) {
        bail!(
            "--concurrency and --rounds must be at least 1, and --max-requests at least --rounds"
        );
    }
    if args.log_filter != "off" {
        tracing_subscriber::fmt()
            .with_env_filter(tracing_subscriber::EnvFilter::new(&args.log_filter))
            .with_writer(std::io::stderr)
            // No colours, as in a pod (`seinode-tls` colours only a terminal): the fmt layer
            // styles every span field name, which would inflate the span's cost here.
            .with_ansi(false)
            .try_init()
            .map_err(|e| anyhow::anyhow!("failed to install the log subscriber: {e}"))?;
    }
    let _ = rustls::crypto::ring::default_provider().install_default();

    let pki = Pki::new()?;
    let server = Server::start(&pki)?;
    let reviews = Arc::new(Reviews::build()?);

    // The client gets its own runtime, so client and server are scheduled by the OS as two
    // processes would be; both share the machine's cores.
    let client = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .thread_name("load-client")
        .build()
        .context("failed to start the client runtime")?;
    let load_before = load_average();
    let report = client.block_on(drive(args, &pki, server.addr, reviews.clone()));
    let load_after = load_average();
    drop(client);
    server.stop()?;
    let report = report?;
    report.print(args, &reviews, [&load_before, &load_after]);
    Ok(Summary {
        errors: report.floor.errors + report.validate.errors,
    })
}

// === Certificates ===

/// A throwaway CA, the webhook's serving certificate (written to a temporary directory, as the
/// webhook reads files), and the Secret's certificate for the SeiNode's contract.
struct Pki {
    ca_pem: String,
    dir: TempDir,
    secret: Secret,
}

impl Pki {
    fn new() -> anyhow::Result<Self> {
        let mut ca = CertificateParams::new(Vec::<String>::new())?;
        ca.distinguished_name
            .push(DnType::CommonName, "webhook-load CA");
        ca.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        let ca = CertifiedIssuer::self_signed(ca, KeyPair::generate()?)?;

        let issue = |names: Vec<String>, common_name: &str| -> anyhow::Result<(String, String)> {
            let key = KeyPair::generate()?;
            let mut params = CertificateParams::new(names)?;
            params
                .distinguished_name
                .push(DnType::CommonName, common_name);
            let cert = params.signed_by(&key, &ca)?;
            Ok((cert.pem(), key.serialize_pem()))
        };

        let dir = TempDir::create()?;
        let (cert, key) = issue(
            vec!["localhost".to_owned(), "127.0.0.1".to_owned()],
            "webhook-load",
        )?;
        std::fs::write(dir.path.join("tls.crt"), cert)
            .context("failed to write the serving certificate")?;
        std::fs::write(dir.path.join("tls.key"), key).context("failed to write the serving key")?;

        let required = required_dns_names(NODE_NAME, NAMESPACE, DEFAULT_CLUSTER_DOMAIN);
        let (cert, key) = issue(required, NODE_NAME)?;
        // Leaf then CA, as cert-manager stores a chain.
        let chain = format!("{cert}{}", ca.pem());
        let secret = Secret {
            metadata: ObjectMeta {
                name: Some(SECRET_NAME.to_owned()),
                namespace: Some(NAMESPACE.to_owned()),
                resource_version: Some("48213".to_owned()),
                ..ObjectMeta::default()
            },
            type_: Some(TLS_SECRET_TYPE.to_owned()),
            data: Some(
                [
                    ("tls.crt".to_owned(), ByteString(chain.into_bytes())),
                    ("tls.key".to_owned(), ByteString(key.into_bytes())),
                    ("ca.crt".to_owned(), ByteString(ca.pem().into_bytes())),
                ]
                .into(),
            ),
            ..Secret::default()
        };
        Ok(Self {
            ca_pem: ca.pem(),
            dir,
            secret,
        })
    }

    fn connector(&self) -> anyhow::Result<tokio_rustls::TlsConnector> {
        use rustls::pki_types::CertificateDer;
        use rustls::pki_types::pem::PemObject;
        let mut roots = rustls::RootCertStore::empty();
        roots.add(CertificateDer::from_pem_slice(self.ca_pem.as_bytes())?)?;
        let mut config = rustls::ClientConfig::builder_with_provider(Arc::new(
            rustls::crypto::ring::default_provider(),
        ))
        .with_safe_default_protocol_versions()?
        .with_root_certificates(roots)
        .with_no_client_auth();
        config.alpn_protocols = vec![b"http/1.1".to_vec()];
        Ok(tokio_rustls::TlsConnector::from(Arc::new(config)))
    }
}

/// A directory removed when dropped.
struct TempDir {
    path: PathBuf,
}

impl TempDir {
    fn create() -> anyhow::Result<Self> {
        let path = std::env::temp_dir().join(format!("webhook-load-{}", std::process::id()));
        std::fs::create_dir_all(&path)
            .with_context(|| format!("failed to create {}", path.display()))?;
        Ok(Self { path })
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.path);
    }
}

// === The server ===

/// The webhook on its own runtime (default worker count: one per core, as in production).
struct Server {
    addr: SocketAddr,
    stop: tokio::sync::oneshot::Sender<()>,
    thread: std::thread::JoinHandle<std::io::Result<()>>,
}

/// The constant-allow baseline: read and parse the review as the admission endpoints do, then
/// allow. Served on the admission port under test, behind its TLS and limits.
const FLOOR_PATH: &str = "/floor";

async fn floor(
    axum::extract::State(state): axum::extract::State<Arc<AdmissionState>>,
    request: axum::extract::Request,
) -> axum::response::Response {
    use axum::response::IntoResponse;
    use seinode_tls_webhook::admission::{Review, WebhookKind};
    let deadline = tokio::time::Instant::now() + state.request_deadline;
    let body = match read_body(
        &state.body_budget,
        request.into_body(),
        MAX_SEINODE_REVIEW_BYTES,
        deadline,
    )
    .await
    {
        Ok(body) => body,
        Err(error) => return error.into_response(),
    };
    match Review::parse(WebhookKind::ValidateSeiNode, &body.bytes) {
        Ok(review) => review_response(&AdmissionResponse::allow(review.summary().uid)),
        Err(message) => (axum::http::StatusCode::BAD_REQUEST, message).into_response(),
    }
}

impl Server {
    /// The webhook's admission port as `Webhook::serve` runs it (its router over TLS with the
    /// serving certificate, within `admission_limits`, through `serve::serve`), with the floor
    /// routed beside the admission endpoints.
    fn start(pki: &Pki) -> anyhow::Result<Self> {
        let loopback = SocketAddr::from((Ipv4Addr::LOCALHOST, 0));
        let mut config = WebhookConfig::new(
            loopback,
            loopback,
            pki.dir.path.join("tls.crt"),
            pki.dir.path.join("tls.key"),
        );
        config.shutdown_grace = Duration::from_secs(2);
        let metrics = Arc::new(WebhookMetrics::register(&mut Registry::default()));
        let certificate = ServingCertificate::load(
            config.tls_cert_file.clone(),
            config.tls_key_file.clone(),
            metrics.clone(),
        )?;
        let listener = std::net::TcpListener::bind(config.listen_addr)
            .and_then(|listener| listener.set_nonblocking(true).map(|()| listener))
            .context("failed to bind the admission port")?;
        let addr = listener.local_addr()?;

        let runtime = tokio::runtime::Builder::new_multi_thread()
            .enable_all()
            .thread_name("webhook")
            .build()
            .context("failed to start the server runtime")?;

        // The Secret is in the cache: no read, so no API server.
        let client = {
            let _runtime = runtime.enter();
            seinode_tls_testkit::no_api_server()
        };
        let secrets = Arc::new(SecretCache::new(client, metrics.clone()));
        secrets.apply(&pki.secret);
        secrets.mark_synced();
        let nodes = NodeCache::new();
        nodes.mark_synced();
        let state = Arc::new(AdmissionState::from_config(
            &config,
            secrets,
            nodes,
            metrics.clone(),
        ));
        let floor = axum::Router::new()
            .route(FLOOR_PATH, axum::routing::post(floor))
            .with_state(state.clone());
        let router = admission_router(state).merge(floor);
        let tls = certificate.rustls_config();
        let limits = admission_limits(&config);
        let counters = ConnectionCounters::of(&metrics);

        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        let thread = std::thread::Builder::new()
            .name("webhook".to_owned())
            .spawn(move || {
                runtime.block_on(async move {
                    let port = Port {
                        listener: tokio::net::TcpListener::from_std(listener)?,
                        router,
                        tls: Some(tls),
                        limits,
                        counters,
                    };
                    let stopped = async move {
                        let _ = stopped.await;
                    };
                    serve(port, stopped, config.shutdown_grace).await
                })
            })
            .context("failed to start the server thread")?;
        Ok(Self { addr, stop, thread })
    }

    fn stop(self) -> anyhow::Result<()> {
        let _ = self.stop.send(());
        match self.thread.join() {
            Ok(result) => Ok(result?),
            Err(_) => bail!("the webhook thread panicked"),
        }
    }
}

// === Requests ===

/// The request bodies: the same CREATE under distinct uids.
struct Reviews {
    bodies: Vec<(String, Bytes)>,
}

impl Reviews {
    fn build() -> anyhow::Result<Self> {
        let bodies = (0..DISTINCT_REVIEWS)
            .map(|i| {
                let uid = format!("6f1c2b7e-3d4a-4c51-9e2f-{i:012x}");
                Ok((
                    uid.clone(),
                    Bytes::from(serde_json::to_vec(&admission_review(&uid))?),
                ))
            })
            .collect::<anyhow::Result<_>>()?;
        Ok(Self { bodies })
    }

    fn body_len(&self) -> usize {
        self.bodies.first().map_or(0, |(_, body)| body.len())
    }
}

/// The object kubectl sends for `kubectl apply -f seinode.yaml` of a TLS full node, as the API
/// server forwards it: defaults applied, the last-applied annotation, and kubectl's managedFields.
fn admission_review(uid: &str) -> Value {
    let labels = json!({
        "app.kubernetes.io/name": "seid",
        "app.kubernetes.io/instance": NODE_NAME,
        "app.kubernetes.io/part-of": "pacific-1",
        "app.kubernetes.io/managed-by": "platform-gitops",
        "sei.io/role": "rpc",
        "team": "infra-rpc",
    });
    let spec = json!({
        "chainId": "pacific-1",
        "image": "ghcr.io/sei-protocol/sei:v6.1.4",
        "sidecar": {
            "image": "ghcr.io/sei-protocol/sei-sidecar:v0.9.2",
            "port": 7777,
            "resources": {
                "requests": {"cpu": "100m", "memory": "128Mi"},
                "limits": {"cpu": "500m", "memory": "256Mi"},
            },
            "tls": {"secretName": SECRET_NAME},
        },
        "podLabels": {"sei.io/pool": "rpc-public", "topology.sei.io/zone-group": "use2"},
        "overrides": {
            "config.p2p.max_num_inbound_peers": "80",
            "config.p2p.max_num_outbound_peers": "40",
            "config.mempool.size": "5000",
            "app.evm.http_enabled": "true",
            "app.evm.ws_enabled": "true",
            "app.state-store.ss-keep-recent": "100000",
        },
        "peers": [
            {"ec2Tags": {"region": "us-east-2", "tags": {"ChainIdentifier": "pacific-1", "Component": "state-syncer"}}},
            {"label": {"selector": {"sei.io/chain": "pacific-1", "sei.io/role": "validator-sentry"}}},
        ],
        "dataVolume": {"import": {"pvcName": format!("data-{NODE_NAME}-0")}},
        "fullNode": {
            "snapshotGeneration": {"keepRecent": 2, "interval": 2000},
            "stateSync": {"enabled": true, "trustPeriod": "168h"},
        },
    });
    let manifest = json!({
        "apiVersion": "sei.io/v1alpha1",
        "kind": "SeiNode",
        "metadata": {"name": NODE_NAME, "namespace": NAMESPACE, "labels": labels},
        "spec": spec,
    });
    let last_applied = format!("{manifest}\n");
    let managed_fields = json!([{
        "apiVersion": "sei.io/v1alpha1",
        "fieldsType": "FieldsV1",
        "fieldsV1": {
            "f:metadata": {
                "f:annotations": {".": {}, "f:kubectl.kubernetes.io/last-applied-configuration": {}},
                "f:labels": fields_v1(&labels),
            },
            "f:spec": fields_v1(&spec),
        },
        "manager": "kubectl-client-side-apply",
        "operation": "Update",
        "time": "2025-06-02T09:41:17Z",
    }]);
    let object = json!({
        "apiVersion": "sei.io/v1alpha1",
        "kind": "SeiNode",
        "metadata": {
            "annotations": {"kubectl.kubernetes.io/last-applied-configuration": last_applied},
            "creationTimestamp": "2025-06-02T09:41:17Z",
            "generation": 1,
            "labels": labels,
            "managedFields": managed_fields,
            "name": NODE_NAME,
            "namespace": NAMESPACE,
            "uid": "c3f0a9d2-58b4-4a7e-8f61-2d9e7b3c1a45",
        },
        "spec": spec,
    });
    json!({
        "apiVersion": "admission.k8s.io/v1",
        "kind": "AdmissionReview",
        "request": {
            "uid": uid,
            "kind": {"group": "sei.io", "version": "v1alpha1", "kind": "SeiNode"},
            "resource": {"group": "sei.io", "version": "v1alpha1", "resource": "seinodes"},
            "requestKind": {"group": "sei.io", "version": "v1alpha1", "kind": "SeiNode"},
            "requestResource": {"group": "sei.io", "version": "v1alpha1", "resource": "seinodes"},
            "name": NODE_NAME,
            "namespace": NAMESPACE,
            "operation": "CREATE",
            "userInfo": {
                "username": "system:serviceaccount:argocd:argocd-application-controller",
                "uid": "0b7c9a54-1e2f-4d3a-a9b8-6c5d4e3f2a1b",
                "groups": ["system:serviceaccounts", "system:serviceaccounts:argocd", "system:authenticated"],
                "extra": {
                    "authentication.kubernetes.io/credential-id": ["JTI=5f0d2c1e-8a7b-4c6d-9e0f-1a2b3c4d5e6f"],
                    "authentication.kubernetes.io/node-name": ["ip-10-20-31-142.us-east-2.compute.internal"],
                    "authentication.kubernetes.io/pod-name": ["argocd-application-controller-0"],
                    "authentication.kubernetes.io/pod-uid": ["7e6d5c4b-3a29-4180-9f7e-6d5c4b3a2918"],
                },
            },
            "object": object,
            "oldObject": null,
            "dryRun": false,
            "options": {
                "apiVersion": "meta.k8s.io/v1",
                "kind": "CreateOptions",
                "fieldManager": "kubectl-client-side-apply",
                "fieldValidation": "Strict",
            },
        },
    })
}

/// The FieldsV1 set of a value: an `f:` entry per object field, lists and scalars as leaves.
fn fields_v1(value: &Value) -> Value {
    match value {
        Value::Object(map) => Value::Object(
            map.iter()
                .map(|(key, value)| (format!("f:{key}"), fields_v1(value)))
                .collect(),
        ),
        _ => json!({}),
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Endpoint {
    Floor,
    Validate,
}

impl Endpoint {
    fn path(self) -> &'static str {
        match self {
            Endpoint::Floor => FLOOR_PATH,
            Endpoint::Validate => VALIDATE_SEINODES_PATH,
        }
    }

    fn name(self) -> &'static str {
        match self {
            Endpoint::Floor => "floor",
            Endpoint::Validate => "validate",
        }
    }
}

/// The part of the answer that is checked.
#[derive(serde::Deserialize)]
struct ReviewAnswer {
    response: Option<AnswerBody>,
}

#[derive(serde::Deserialize)]
struct AnswerBody {
    uid: String,
    allowed: bool,
    #[serde(default)]
    warnings: Option<Vec<String>>,
}

/// Sends one review and checks the answer: HTTP 200, the uid echoed, allowed, no warnings (a
/// warning would mean the Secret was not judged, so validation took a shorter path).
async fn send(
    connection: &mut SendRequest<Full<Bytes>>,
    endpoint: Endpoint,
    uid: &str,
    body: &Bytes,
) -> Result<(), RequestError> {
    connection
        .ready()
        .await
        .map_err(|e| RequestError::Transport(format!("connection lost: {e}")))?;
    let request = hyper::Request::post(endpoint.path())
        .header(HOST, "localhost")
        .header(CONTENT_TYPE, "application/json")
        .body(Full::new(body.clone()))
        .map_err(|e| RequestError::Answer(format!("failed to build the request: {e}")))?;
    let response = connection
        .send_request(request)
        .await
        .map_err(|e| RequestError::Transport(format!("request failed: {e}")))?;
    let status = response.status();
    let bytes = response
        .into_body()
        .collect()
        .await
        .map_err(|e| RequestError::Transport(format!("failed to read the answer: {e}")))?
        .to_bytes();
    if status != hyper::StatusCode::OK {
        return Err(RequestError::Answer(format!(
            "HTTP {status}: {}",
            String::from_utf8_lossy(&bytes).trim()
        )));
    }
    let answer: ReviewAnswer = serde_json::from_slice(&bytes)
        .map_err(|e| RequestError::Answer(format!("the answer is not an AdmissionReview: {e}")))?;
    match answer.response {
        Some(AnswerBody { uid: answered, .. }) if answered != uid => Err(RequestError::Answer(
            format!("answered uid {answered} to request {uid}"),
        )),
        Some(AnswerBody { allowed: false, .. }) => Err(RequestError::Answer(format!(
            "not allowed: {}",
            String::from_utf8_lossy(&bytes)
        ))),
        Some(AnswerBody {
            warnings: Some(warnings),
            ..
        }) if !warnings.is_empty() => Err(RequestError::Answer(format!(
            "allowed with warnings: {warnings:?}"
        ))),
        Some(_) => Ok(()),
        None => Err(RequestError::Answer(
            "the answer has no response".to_owned(),
        )),
    }
}

enum RequestError {
    /// The connection is unusable; its worker stops.
    Transport(String),
    /// A wrong answer; the connection carries on.
    Answer(String),
}

// === Driving the load ===

/// What one phase (or several, merged) measured for one endpoint.
#[derive(Default)]
struct Sample {
    /// Latency of each successful request, in nanoseconds.
    latencies_ns: Vec<u64>,
    errors: u64,
    error_messages: Vec<String>,
    elapsed: Duration,
}

impl Sample {
    fn merge(&mut self, other: Sample) {
        self.latencies_ns.extend(other.latencies_ns);
        self.errors += other.errors;
        self.error_messages.extend(other.error_messages);
        self.error_messages.truncate(ERRORS_QUOTED);
        self.elapsed += other.elapsed;
    }

    fn figures(&self) -> Figures {
        let mut sorted = self.latencies_ns.clone();
        sorted.sort_unstable();
        let quantile_us = |q: f64| {
            if sorted.is_empty() {
                return 0.0;
            }
            // Nearest rank.
            let rank = ((q * sorted.len() as f64).ceil() as usize).clamp(1, sorted.len());
            sorted[rank - 1] as f64 / 1_000.0
        };
        let secs = self.elapsed.as_secs_f64();
        Figures {
            requests: sorted.len() as u64,
            errors: self.errors,
            p50_us: quantile_us(0.50),
            p99_us: quantile_us(0.99),
            p999_us: quantile_us(0.999),
            max_us: quantile_us(1.0),
            rps: if secs > 0.0 {
                sorted.len() as f64 / secs
            } else {
                0.0
            },
        }
    }
}

#[derive(Debug, Clone, Copy)]
struct Figures {
    requests: u64,
    errors: u64,
    p50_us: f64,
    p99_us: f64,
    p999_us: f64,
    max_us: f64,
    rps: f64,
}

/// How long and how many requests a phase may take.
#[derive(Debug, Clone, Copy)]
struct Bound {
    time: Duration,
    requests: u64,
}

type Connection = SendRequest<Full<Bytes>>;

/// Runs one phase over every live connection; returns the connections still usable.
async fn phase(
    connections: Vec<Connection>,
    endpoint: Endpoint,
    reviews: Arc<Reviews>,
    bound: Bound,
) -> (Vec<Connection>, Sample) {
    let started = Instant::now();
    let deadline = started + bound.time;
    let issued = Arc::new(AtomicU64::new(0));
    let workers: Vec<_> = connections
        .into_iter()
        .enumerate()
        .map(|(worker, mut connection)| {
            let (reviews, issued) = (reviews.clone(), issued.clone());
            tokio::spawn(async move {
                let mut sample = Sample::default();
                let mut next = worker;
                // Bounded by the shared request budget and the deadline.
                while Instant::now() < deadline
                    && issued.fetch_add(1, Ordering::Relaxed) < bound.requests
                {
                    let (uid, body) = &reviews.bodies[next % reviews.bodies.len()];
                    next += 1;
                    let sent = Instant::now();
                    match send(&mut connection, endpoint, uid, body).await {
                        Ok(()) => sample.latencies_ns.push(sent.elapsed().as_nanos() as u64),
                        Err(RequestError::Answer(message)) => sample.record_error(message),
                        Err(RequestError::Transport(message)) => {
                            sample.record_error(message);
                            return (None, sample);
                        }
                    }
                }
                (Some(connection), sample)
            })
        })
        .collect();
    let mut live = Vec::new();
    let mut total = Sample::default();
    let give_up = tokio::time::Instant::from_std(deadline + STALL_LIMIT);
    for mut worker in workers {
        match tokio::time::timeout_at(give_up, &mut worker).await {
            Ok(Ok((connection, sample))) => {
                live.extend(connection);
                total.merge(sample);
            }
            Ok(Err(e)) => total.record_error(format!("a client task failed: {e}")),
            Err(_) => {
                worker.abort();
                total.record_error(format!(
                    "no answer within {STALL_LIMIT:?} after the end of the phase; connection abandoned"
                ));
            }
        }
    }
    total.elapsed = started.elapsed();
    (live, total)
}

impl Sample {
    fn record_error(&mut self, message: String) {
        self.errors += 1;
        if self.error_messages.len() < ERRORS_QUOTED {
            self.error_messages.push(message);
        }
    }
}

async fn connect(
    connector: &tokio_rustls::TlsConnector,
    addr: SocketAddr,
) -> anyhow::Result<Connection> {
    let tcp = tokio::net::TcpStream::connect(addr)
        .await
        .with_context(|| format!("failed to connect to {addr}"))?;
    tcp.set_nodelay(true)?;
    let tls = connector
        .connect(ServerName::try_from("localhost")?, tcp)
        .await
        .context("TLS handshake with the webhook failed")?;
    let (sender, connection) = hyper::client::conn::http1::handshake(TokioIo::new(tls)).await?;
    tokio::spawn(async move {
        // Ends when the sender is dropped or the server closes; failures surface in `send`.
        let _ = connection.await;
    });
    Ok(sender)
}

struct Report {
    floor: Figures,
    validate: Figures,
    rounds: Vec<(Endpoint, Figures)>,
    error_messages: Vec<(Endpoint, String)>,
    tls_version: String,
}

async fn drive(
    args: &Args,
    pki: &Pki,
    addr: SocketAddr,
    reviews: Arc<Reviews>,
) -> anyhow::Result<Report> {
    let connector = pki.connector()?;
    let mut connections = Vec::with_capacity(args.concurrency);
    for _ in 0..args.concurrency {
        connections.push(connect(&connector, addr).await?);
    }
    let tls_version = tls_version(&connector, addr).await?;

    let endpoints = [Endpoint::Floor, Endpoint::Validate];
    let warmup = Bound {
        time: args.warmup / 2,
        requests: args.max_requests,
    };
    for endpoint in endpoints {
        let (live, sample) = phase(connections, endpoint, reviews.clone(), warmup).await;
        connections = live;
        if sample.errors > 0 {
            bail!(
                "{} failed during the warm-up ({} errors), e.g. {}",
                endpoint.path(),
                sample.errors,
                sample.error_messages.first().map_or("", String::as_str)
            );
        }
    }

    let round = Bound {
        time: args.duration / args.rounds,
        requests: args.max_requests.div_ceil(u64::from(args.rounds)),
    };
    let (mut floor, mut validate) = (Sample::default(), Sample::default());
    let mut rounds = Vec::new();
    let mut error_messages = Vec::new();
    for _ in 0..args.rounds {
        for endpoint in endpoints {
            let (live, sample) = phase(connections, endpoint, reviews.clone(), round).await;
            connections = live;
            rounds.push((endpoint, sample.figures()));
            error_messages.extend(sample.error_messages.iter().map(|m| (endpoint, m.clone())));
            match endpoint {
                Endpoint::Floor => floor.merge(sample),
                Endpoint::Validate => validate.merge(sample),
            }
        }
    }
    error_messages.truncate(ERRORS_QUOTED);
    Ok(Report {
        floor: floor.figures(),
        validate: validate.figures(),
        rounds,
        error_messages,
        tls_version,
    })
}

/// The protocol the server negotiates with this client (one extra, unmeasured connection).
async fn tls_version(
    connector: &tokio_rustls::TlsConnector,
    addr: SocketAddr,
) -> anyhow::Result<String> {
    let tcp = tokio::net::TcpStream::connect(addr).await?;
    let tls = connector
        .connect(ServerName::try_from("localhost")?, tcp)
        .await?;
    let version = tls
        .get_ref()
        .1
        .protocol_version()
        .map_or("unknown".to_owned(), |v| format!("{v:?}"));
    Ok(version)
}

// === Output ===

impl Report {
    fn print(&self, args: &Args, reviews: &Reviews, [load_before, load_after]: [&str; 2]) {
        let cores = std::thread::available_parallelism().map_or(0, usize::from);
        println!(
            "webhook-load: {} keep-alive HTTP/1.1 connections over {}, AdmissionReview of {} bytes \
             (CREATE of a TLS SeiNode, Secret in cache)",
            args.concurrency,
            self.tls_version,
            reviews.body_len()
        );
        println!(
            "  {} rounds of {:?} or {} requests per endpoint after {:?} of warm-up; log filter {:?}",
            args.rounds,
            args.duration / args.rounds,
            args.max_requests.div_ceil(u64::from(args.rounds)),
            args.warmup,
            args.log_filter
        );
        println!(
            "  client and server in one process on {cores} cores, each with its own runtime of {cores} workers: \
             they compete for the same CPUs"
        );
        println!("  load average (1, 5, 15 min) before {load_before}, after {load_after}");
        println!();
        let header = format!(
            "{:<10} {:>9} {:>7} {:>10} {:>10} {:>10} {:>10} {:>10}",
            "endpoint", "requests", "errors", "p50 µs", "p99 µs", "p99.9 µs", "max µs", "req/s"
        );
        let line = |name: &str, f: &Figures| {
            format!(
                "{name:<10} {:>9} {:>7} {:>10.0} {:>10.0} {:>10.0} {:>10.0} {:>10.0}",
                f.requests, f.errors, f.p50_us, f.p99_us, f.p999_us, f.max_us, f.rps
            )
        };
        println!("per round:");
        println!("  {header}");
        for (endpoint, figures) in &self.rounds {
            println!("  {}", line(endpoint.name(), figures));
        }
        println!();
        println!("aggregate:");
        println!("  {header}");
        println!("  {}", line("floor", &self.floor));
        println!("  {}", line("validate", &self.validate));
        let (p99_ratio, rps_ratio) = self.ratios();
        println!();
        // Figures of a run with failed requests compare unlike things; say so instead.
        let valid = self.floor.errors + self.validate.errors == 0;
        let verdict = |met: bool| match (valid, met) {
            (false, _) => "not judged: requests failed",
            (true, true) => "met",
            (true, false) => "NOT met",
        };
        println!(
            "validate/floor: p99 {p99_ratio:.3} (goal <= 1.2: {}), throughput {rps_ratio:.3} (goal >= 0.85: {})",
            verdict(p99_ratio <= 1.2),
            verdict(rps_ratio >= 0.85)
        );
        for (endpoint, message) in &self.error_messages {
            println!("error on {}: {message}", endpoint.path());
        }
        println!("{}", self.json());
    }

    fn ratios(&self) -> (f64, f64) {
        let ratio = |a: f64, b: f64| if b > 0.0 { a / b } else { 0.0 };
        (
            ratio(self.validate.p99_us, self.floor.p99_us),
            ratio(self.validate.rps, self.floor.rps),
        )
    }

    fn json(&self) -> Value {
        let figures = |f: &Figures| {
            json!({
                "p50_us": round1(f.p50_us),
                "p99_us": round1(f.p99_us),
                "p999_us": round1(f.p999_us),
                "rps": round1(f.rps),
            })
        };
        let (p99, rps) = self.ratios();
        json!({
            "validate": figures(&self.validate),
            "floor": figures(&self.floor),
            "ratios": {"p99": round3(p99), "rps": round3(rps)},
            "errors": {"validate": self.validate.errors, "floor": self.floor.errors},
        })
    }
}

/// The machine's load average, to judge how much other work skewed a run.
fn load_average() -> String {
    std::fs::read_to_string("/proc/loadavg").map_or_else(
        |_| "unknown".to_owned(),
        |text| {
            text.split_whitespace()
                .take(3)
                .collect::<Vec<_>>()
                .join(" ")
        },
    )
}

fn round1(x: f64) -> f64 {
    (x * 10.0).round() / 10.0
}

fn round3(x: f64) -> f64 {
    (x * 1000.0).round() / 1000.0
}
