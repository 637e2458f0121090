//! `webhook-abuse`: what a hostile tenant Pod can do to the webhook, in figures.
//!
//! The admission port is reachable from Pods, so a tenant can post the largest bodies the
//! endpoints take, hold connections open, and send bodies one byte at a time. This benchmark
//! plays that tenant against the real server over real TLS on loopback and prints what it got;
//! it asserts nothing. Each abuse comes from a loopback address of its own (127.0.0.2 and up), as
//! a Pod would from its IP, while 127.0.0.1 plays the API server. The phases answer, in order:
//!
//! 1. **memory**: do 32 concurrent maximum-size worst-case Secret reviews keep the process under
//!    128 MiB? Two shapes: `data` with a hundred thousand tiny keys per object, and the three
//!    contract values as megabyte PEM garbage (decoded and inspected). Clients retry a 429 after
//!    its `Retry-After`, as the API server does.
//! 2. **lock-out**: 256 connections from one source kept busy only by HTTP/2 PINGs or `GET /`:
//!    how many get in (the per-source cap), when the server closes them, and whether a fresh
//!    API-server connection is answered meanwhile.
//! 3. **trickle**: 32 bodies sent one byte a second, on 32 HTTP/1.1 connections and then as 32
//!    streams of one HTTP/2 connection: what share of the API server's reviews is answered 200.
//! 4. **health**: 300 silent connections to the health port: refused, closed later, or held; and
//!    whether `/readyz` answers meanwhile.
//!
//! The webhook runs in a child process (this binary, re-executed with `--serve-dir`) so that its
//! resident memory is its own and can be read from `/proc`. Its caches are filled by hand with
//! one valid TLS Secret and a SeiNode that uses it, so the Secret guard does its full work; no API
//! server is involved. The child serves until its stdin closes, so it cannot outlive this
//! process, and it is killed when the harness ends by any path. Every wait on the server is
//! bounded. The exit status is 1 only when the harness itself fails (the server does not start,
//! answers the warm-up wrongly, or dies); the last line of stdout is one JSON object.

use std::collections::BTreeMap;
use std::convert::Infallible;
use std::io::{BufRead as _, BufReader, Write as _};
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::path::{Path, PathBuf};
use std::pin::Pin;
use std::process::{Child, ChildStdin, Command, ExitCode, Stdio};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::task::Poll;
use std::time::Duration;

use anyhow::{Context, bail};
use base64::Engine as _;
use clap::Parser;
use http_body_util::{BodyExt, Empty, Full};
use hyper::StatusCode;
use hyper::body::{Bytes, Frame};
use hyper::header::{CONTENT_LENGTH, CONTENT_TYPE, HOST, RETRY_AFTER};
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use k8s_openapi::ByteString;
use k8s_openapi::api::core::v1::Secret;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;
use kube::runtime::watcher;
use prometheus_client::registry::Registry;
use rustls::pki_types::ServerName;
use seinode_tls_crds::SeiNode;
use seinode_tls_crds::contract::{DEFAULT_CLUSTER_DOMAIN, required_dns_names};
use seinode_tls_crds::validation::TLS_SECRET_TYPE;
use seinode_tls_testkit::{CertificateAuthority, LeafSpec};
use seinode_tls_webhook::cache::{NodeCache, SecretCache};
use seinode_tls_webhook::server::{
    AdmissionState, HEALTH_LIMITS, MAX_SECRET_REVIEW_BYTES, VALIDATE_SECRETS_PATH,
    VALIDATE_SEINODES_PATH,
};
use seinode_tls_webhook::{Webhook, WebhookConfig};
use serde_json::{Value, json};
use tokio::io::{AsyncRead, AsyncReadExt as _, AsyncWriteExt as _};
use tokio::net::{TcpSocket, TcpStream};
use tokio::task::JoinHandle;
use tokio::time::Instant;
use tokio_rustls::TlsConnector;
use tokio_rustls::client::TlsStream;

/// The SeiNode in the cache (and in every CREATE the API server sends), and its Secret.
const NAMESPACE: &str = "sei";
const NODE_NAME: &str = "pacific-rpc-7";
const SECRET_NAME: &str = "pacific-rpc-7-sidecar-tls";
/// The Secret's resourceVersion in the webhook's cache. An old object that carries it reuses the
/// cached inspection; any other version is inspected afresh, as an attacker's would be.
const CACHED_VERSION: &str = "48213";

/// Who connects from where: 127.0.0.1 plays the API server, each abuse has an address of its own
/// (the per-source caps count addresses).
const API_SERVER: Ipv4Addr = Ipv4Addr::new(127, 0, 0, 1);
const IDLE_ABUSER: Ipv4Addr = Ipv4Addr::new(127, 0, 0, 2);
const TRICKLE_HTTP1_ABUSER: Ipv4Addr = Ipv4Addr::new(127, 0, 0, 3);
const TRICKLE_HTTP2_ABUSER: Ipv4Addr = Ipv4Addr::new(127, 0, 0, 4);
const HEALTH_ABUSER: Ipv4Addr = Ipv4Addr::new(127, 0, 0, 5);

// --- memory phase ---
const BIG_REVIEWS_AT_ONCE: usize = 32;
/// Just under the Secret endpoint's limit: the largest body it reads to the end.
const BIG_REVIEW_BYTES: usize = MAX_SECRET_REVIEW_BYTES - 1024;
/// One tiny `data` entry of the many-keys shape: `,"k0000000":"YWJj"` (index of seven digits).
const TINY_ENTRY_BYTES: usize = 18;
/// Attempts per review, as a client that retries a 429 but not forever.
const MAX_ATTEMPTS: u32 = 10;
/// Longest `Retry-After` honoured; the server says 1 s.
const MAX_RETRY_AFTER: Duration = Duration::from_secs(5);
/// Wait after a connection that ended without an answer, before the next attempt.
const RECONNECT_PAUSE: Duration = Duration::from_secs(1);
/// One round of 32 reviews with its retries; past it, its clients are abandoned.
const ROUND_LIMIT: Duration = Duration::from_secs(60);
const RSS_SAMPLE_INTERVAL: Duration = Duration::from_millis(20);
/// What the issue asks of the process under the largest reviews.
const MEMORY_TARGET_MIB: f64 = 128.0;

// --- lock-out phase ---
const IDLE_CONNECTIONS: usize = 256;
/// HTTP/2 PINGs, and `GET /` over HTTP/1.1: activity that must not count as use.
const BUSYWORK_INTERVAL: Duration = Duration::from_secs(3);
/// A fresh API-server connection with one review, this often.
const PROBE_INTERVAL: Duration = Duration::from_secs(1);
/// The server's grace for a request in flight once it starts to close a connection
/// (`CLOSING_GRACE` in webhook/src/serve.rs); a held connection is waited for this much past the
/// idle timeout, plus `LOCKOUT_SLACK`, before it counts as never closed.
const SERVER_CLOSING_GRACE: Duration = Duration::from_secs(10);
const LOCKOUT_SLACK: Duration = Duration::from_secs(10);

// --- trickle phase ---
const TRICKLERS: usize = 32;
const TRICKLE_CONTENT_LENGTH: usize = 1 << 20;
const TRICKLE_INTERVAL: Duration = Duration::from_secs(1);
const LEGIT_CLIENTS: usize = 4;
const ANSWERED_TARGET_PERCENT: f64 = 95.0;

// --- health phase ---
const HEALTH_STALLERS: usize = 300;
/// A connection closed this soon was refused by a cap, not closed by a timeout (the health
/// port's first-request timeout is seconds).
const REFUSED_WITHIN: Duration = Duration::from_secs(1);
const READYZ_INTERVAL: Duration = Duration::from_millis(500);

// --- bounds of every wait on the server ---
const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);
const ANSWER_TIMEOUT: Duration = Duration::from_secs(5);
const BIG_ANSWER_TIMEOUT: Duration = Duration::from_secs(30);
const START_TIMEOUT: Duration = Duration::from_secs(30);
const STOP_TIMEOUT: Duration = Duration::from_secs(10);
/// Most failure messages quoted per figure.
const MESSAGES_QUOTED: usize = 3;

/// Files the parent writes into the directory it hands the child.
const SERVING_CERT_FILE: &str = "serving.crt";
const SERVING_KEY_FILE: &str = "serving.key";
const SECRET_CERT_FILE: &str = "secret-tls.crt";
const SECRET_KEY_FILE: &str = "secret-tls.key";
const SECRET_CA_FILE: &str = "secret-ca.crt";
/// The child's one line on stdout: `listening <https> <health>`.
const LISTENING: &str = "listening";

#[derive(Debug, Parser)]
#[command(
    about = "What a hostile tenant Pod can do to the webhook: memory, lock-out, trickle, health"
)]
struct Args {
    /// Passed by `cargo bench` to every bench target; nothing to do with it.
    #[arg(long, hide = true)]
    bench: bool,
    /// Internal: serve the webhook from the certificates in this directory (the child process).
    #[arg(long, hide = true)]
    serve_dir: Option<PathBuf>,
    /// The server's idle timeout for this run (production: 120s); the lock-out phase lasts
    /// about this long.
    #[arg(long, env = "WEBHOOK_ABUSE_IDLE_TIMEOUT", default_value = "10s", value_parser = humantime::parse_duration)]
    idle_timeout: Duration,
    /// Rounds of 32 concurrent maximum-size reviews per body shape.
    #[arg(long, env = "WEBHOOK_ABUSE_MEMORY_ROUNDS", default_value_t = 3)]
    memory_rounds: u32,
    /// How long each trickle attack (HTTP/1.1, then HTTP/2) runs.
    #[arg(long, env = "WEBHOOK_ABUSE_TRICKLE_DURATION", default_value = "10s", value_parser = humantime::parse_duration)]
    trickle_duration: Duration,
    /// How long each silent health-port connection is watched.
    #[arg(long, env = "WEBHOOK_ABUSE_HEALTH_WAIT", default_value = "10s", value_parser = humantime::parse_duration)]
    health_wait: Duration,
    /// Log filter of the webhook process (its stderr is this benchmark's).
    #[arg(long, env = "WEBHOOK_ABUSE_SERVER_LOG", default_value = "error")]
    server_log: String,
}

fn main() -> ExitCode {
    let args = Args::parse();
    let result = match &args.serve_dir {
        Some(dir) => serve_child(dir, &args),
        None => run(&args),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(error) => {
            eprintln!("webhook-abuse: {error:#}");
            ExitCode::FAILURE
        }
    }
}

/// The webhook's configuration for this run: the command line's defaults, with the short idle
/// timeout. Both processes build it, the child to serve and the parent to print.
fn webhook_config(dir: &Path, idle_timeout: Duration) -> WebhookConfig {
    let loopback = SocketAddr::from((Ipv4Addr::LOCALHOST, 0));
    let mut config = WebhookConfig::new(
        loopback,
        loopback,
        dir.join(SERVING_CERT_FILE),
        dir.join(SERVING_KEY_FILE),
    );
    config.idle_timeout = idle_timeout;
    config.shutdown_grace = Duration::from_secs(2);
    config
}

// === The webhook process ===

/// Serves the webhook until stdin closes. Prints `listening <https> <health>` once bound.
fn serve_child(dir: &Path, args: &Args) -> anyhow::Result<()> {
    if args.server_log != "off" {
        tracing_subscriber::fmt()
            .with_env_filter(tracing_subscriber::EnvFilter::new(&args.server_log))
            .with_writer(std::io::stderr)
            .with_ansi(false)
            .try_init()
            .map_err(|e| anyhow::anyhow!("failed to install the log subscriber: {e}"))?;
    }
    let _ = rustls::crypto::ring::default_provider().install_default();

    let read = |file: &str| {
        std::fs::read(dir.join(file)).with_context(|| format!("failed to read {file}"))
    };
    let secret = Secret {
        metadata: ObjectMeta {
            name: Some(SECRET_NAME.to_owned()),
            namespace: Some(NAMESPACE.to_owned()),
            resource_version: Some(CACHED_VERSION.to_owned()),
            ..ObjectMeta::default()
        },
        type_: Some(TLS_SECRET_TYPE.to_owned()),
        data: Some(
            [
                ("tls.crt".to_owned(), ByteString(read(SECRET_CERT_FILE)?)),
                ("tls.key".to_owned(), ByteString(read(SECRET_KEY_FILE)?)),
                ("ca.crt".to_owned(), ByteString(read(SECRET_CA_FILE)?)),
            ]
            .into(),
        ),
        ..Secret::default()
    };
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .thread_name("webhook")
        .build()
        .context("failed to start the server runtime")?;
    let mut registry = Registry::default();
    let webhook = Webhook::bind(webhook_config(dir, args.idle_timeout), &mut registry)?;

    // The Secret is in the cache: no read, so no API server.
    let client = {
        let _runtime = runtime.enter();
        seinode_tls_testkit::no_api_server()
    };
    let secrets = Arc::new(SecretCache::new(client, webhook.metrics()));
    secrets.apply(&secret);
    secrets.mark_synced();
    let node: SeiNode = serde_json::from_value(seinode_object())
        .context("the benchmark's SeiNode does not parse as a SeiNode")?;
    let nodes = NodeCache::new();
    nodes.apply(&watcher::Event::Apply(node));
    nodes.mark_synced();

    let state = Arc::new(AdmissionState::from_config(
        webhook.config(),
        secrets,
        nodes,
        webhook.metrics(),
    ));
    {
        let mut stdout = std::io::stdout().lock();
        writeln!(
            stdout,
            "{LISTENING} {} {}",
            webhook.https_addr(),
            webhook.health_addr()
        )?;
        stdout.flush()?;
    }

    // The parent holds our stdin; when it ends by any path, stdin closes and we stop.
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    std::thread::Builder::new()
        .name("stdin-watch".to_owned())
        .spawn(move || {
            let _ = std::io::copy(&mut std::io::stdin().lock(), &mut std::io::sink());
            let _ = stop.send(());
        })
        .context("failed to start the stdin watch")?;
    runtime.block_on(webhook.serve(
        state,
        Arc::new(registry),
        std::future::pending(),
        async move {
            let _ = stopped.await;
        },
    ))?;
    Ok(())
}

/// The webhook child, killed when dropped.
struct ServerProcess {
    child: Child,
    /// Closed to ask the child to stop.
    stdin: Option<ChildStdin>,
    pid: u32,
    https: SocketAddr,
    health: SocketAddr,
}

impl ServerProcess {
    fn start(dir: &Path, args: &Args) -> anyhow::Result<Self> {
        let exe = std::env::current_exe().context("failed to find this benchmark's binary")?;
        let mut child = Command::new(exe)
            .arg("--serve-dir")
            .arg(dir)
            .arg("--idle-timeout")
            .arg(humantime::format_duration(args.idle_timeout).to_string())
            .arg("--server-log")
            .arg(&args.server_log)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .context("failed to start the webhook process")?;
        let stdin = child.stdin.take();
        let stdout = child.stdout.take();
        let pid = child.id();
        // From here the guard kills the child on every path, errors below included.
        let mut server = Self {
            child,
            stdin,
            pid,
            https: SocketAddr::from((Ipv4Addr::LOCALHOST, 0)),
            health: SocketAddr::from((Ipv4Addr::LOCALHOST, 0)),
        };
        let stdout = stdout.context("the webhook process has no stdout")?;
        let (line_tx, line_rx) = std::sync::mpsc::channel();
        std::thread::Builder::new()
            .name("server-stdout".to_owned())
            .spawn(move || {
                let mut lines = BufReader::new(stdout).lines();
                let _ = line_tx.send(lines.next());
                // Keep reading, so that the child never writes into a closed pipe.
                for _ in lines {}
            })
            .context("failed to start the stdout reader")?;
        let line = match line_rx.recv_timeout(START_TIMEOUT) {
            Ok(Some(Ok(line))) => line,
            Ok(Some(Err(e))) => bail!("failed to read the webhook process's output: {e}"),
            Ok(None) | Err(std::sync::mpsc::RecvTimeoutError::Disconnected) => {
                let status = server.child.wait().ok();
                bail!("the webhook process exited before it listened ({status:?})")
            }
            Err(std::sync::mpsc::RecvTimeoutError::Timeout) => {
                bail!("the webhook process did not listen within {START_TIMEOUT:?}")
            }
        };
        let mut words = line.split_whitespace();
        let (Some(LISTENING), Some(https), Some(health)) =
            (words.next(), words.next(), words.next())
        else {
            bail!("unexpected first line from the webhook process: {line:?}");
        };
        server.https = https.parse().context("the webhook's HTTPS address")?;
        server.health = health.parse().context("the webhook's health address")?;
        Ok(server)
    }

    /// Why the child is gone, if it is.
    fn exited(&mut self) -> Option<String> {
        match self.child.try_wait() {
            Ok(None) => None,
            Ok(Some(status)) => Some(status.to_string()),
            Err(e) => Some(format!("unknown ({e})")),
        }
    }

    /// Fails when the child has died: the figures of what follows would be about nothing.
    fn check_alive(&mut self, after: &str) -> anyhow::Result<()> {
        match self.exited() {
            None => Ok(()),
            Some(status) => bail!("the webhook process exited during the {after} ({status})"),
        }
    }

    /// Closes the child's stdin and waits for it to stop; kills it if it does not.
    fn stop(mut self) -> anyhow::Result<()> {
        drop(self.stdin.take());
        let give_up = std::time::Instant::now() + STOP_TIMEOUT;
        while std::time::Instant::now() < give_up {
            match self.child.try_wait() {
                Ok(Some(status)) if status.success() => return Ok(()),
                Ok(Some(status)) => bail!("the webhook process failed: {status}"),
                Ok(None) => std::thread::sleep(Duration::from_millis(50)),
                Err(e) => bail!("failed to wait for the webhook process: {e}"),
            }
        }
        bail!(
            "the webhook process did not stop within {STOP_TIMEOUT:?} of its stdin closing; killed"
        )
    }
}

impl Drop for ServerProcess {
    fn drop(&mut self) {
        drop(self.stdin.take());
        if matches!(self.child.try_wait(), Ok(None)) {
            let _ = self.child.kill();
        }
        let _ = self.child.wait();
    }
}

/// The child's memory as the kernel counts it, in KiB.
#[derive(Debug, Clone, Copy)]
struct Memory {
    rss_kib: u64,
    /// Peak resident memory since the start, or since the last reset.
    hwm_kib: u64,
}

fn read_memory(pid: u32) -> Option<Memory> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let field = |name: &str| {
        status
            .lines()
            .find_map(|line| line.strip_prefix(name))
            .and_then(|rest| rest.split_whitespace().next())
            .and_then(|kib| kib.parse::<u64>().ok())
    };
    Some(Memory {
        rss_kib: field("VmRSS:")?,
        hwm_kib: field("VmHWM:")?,
    })
}

/// Resets the child's peak resident memory to its current one (`clear_refs` 5); false when the
/// kernel or the sandbox does not allow it.
fn reset_peak(pid: u32) -> bool {
    std::fs::write(format!("/proc/{pid}/clear_refs"), "5").is_ok()
}

fn mib(kib: u64) -> f64 {
    round1(kib as f64 / 1024.0)
}

// === Certificates and bodies ===

/// A throwaway CA, the webhook's serving certificate and the Secret's, written where the child
/// reads them.
struct Pki {
    dir: TempDir,
    ca_pem: String,
    /// The Secret's values: leaf then CA, its key, the CA.
    secret_chain: String,
    secret_key: String,
}

impl Pki {
    fn new() -> anyhow::Result<Self> {
        let ca = CertificateAuthority::new("webhook-abuse CA")?;
        let serving = ca.issue(&LeafSpec {
            common_name: "webhook-abuse",
            dns_names: &["localhost"],
            ip_addresses: &[IpAddr::V4(Ipv4Addr::LOCALHOST)],
            server: true,
            ..Default::default()
        })?;
        let required = required_dns_names(NODE_NAME, NAMESPACE, DEFAULT_CLUSTER_DOMAIN);
        let required: Vec<&str> = required.iter().map(String::as_str).collect();
        let leaf = ca.issue(&LeafSpec {
            common_name: NODE_NAME,
            dns_names: &required,
            server: true,
            ..Default::default()
        })?;
        let ca_pem = ca.cert_pem();
        // Leaf then CA, as cert-manager stores a chain.
        let secret_chain = format!("{}{ca_pem}", leaf.cert_pem);
        let dir = TempDir::create()?;
        for (file, content) in [
            (SERVING_CERT_FILE, &serving.cert_pem),
            (SERVING_KEY_FILE, &serving.key_pem),
            (SECRET_CERT_FILE, &secret_chain),
            (SECRET_KEY_FILE, &leaf.key_pem),
            (SECRET_CA_FILE, &ca_pem),
        ] {
            std::fs::write(dir.path.join(file), content)
                .with_context(|| format!("failed to write {file}"))?;
        }
        Ok(Self {
            dir,
            ca_pem,
            secret_chain,
            secret_key: leaf.key_pem,
        })
    }

    /// A client that trusts the CA and offers `alpn`.
    fn connector(&self, alpn: &[u8]) -> anyhow::Result<TlsConnector> {
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
        config.alpn_protocols = vec![alpn.to_vec()];
        Ok(TlsConnector::from(Arc::new(config)))
    }

    /// The `data` entries of the valid Secret, as JSON object members.
    fn valid_data_entries(&self) -> String {
        data_entries(&[
            ("tls.crt", self.secret_chain.as_bytes()),
            ("tls.key", self.secret_key.as_bytes()),
            ("ca.crt", self.ca_pem.as_bytes()),
        ])
    }
}

/// A directory removed when dropped.
struct TempDir {
    path: PathBuf,
}

impl TempDir {
    fn create() -> anyhow::Result<Self> {
        let path = std::env::temp_dir().join(format!("webhook-abuse-{}", std::process::id()));
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

/// The SeiNode in the cache, and the object of every CREATE the API server sends.
fn seinode_object() -> Value {
    json!({
        "apiVersion": "sei.io/v1alpha1",
        "kind": "SeiNode",
        "metadata": {
            "name": NODE_NAME,
            "namespace": NAMESPACE,
            "uid": "c3f0a9d2-58b4-4a7e-8f61-2d9e7b3c1a45",
        },
        "spec": {
            "chainId": "pacific-1",
            "image": "ghcr.io/sei-protocol/sei:v6.1.4",
            "fullNode": {},
            "sidecar": {"port": 7777, "tls": {"secretName": SECRET_NAME}},
        },
    })
}

/// A CREATE of the SeiNode: the API server's ordinary review, allowed once the judge has found
/// the Secret valid.
fn seinode_review() -> anyhow::Result<Bytes> {
    let review = json!({
        "apiVersion": "admission.k8s.io/v1",
        "kind": "AdmissionReview",
        "request": {
            "uid": "6f1c2b7e-3d4a-4c51-9e2f-000000000001",
            "kind": {"group": "sei.io", "version": "v1alpha1", "kind": "SeiNode"},
            "resource": {"group": "sei.io", "version": "v1alpha1", "resource": "seinodes"},
            "name": NODE_NAME,
            "namespace": NAMESPACE,
            "operation": "CREATE",
            "userInfo": {"username": "system:serviceaccount:argocd:argocd-application-controller"},
            "object": seinode_object(),
            "oldObject": null,
            "dryRun": false,
        },
    });
    Ok(Bytes::from(serde_json::to_vec(&review)?))
}

/// Stand-ins replaced by the objects' JSON text, which is built as text so that its size is
/// exact and no tree of it is ever held.
const OBJECT_SLOT: &str = "@object@";
const OLD_OBJECT_SLOT: &str = "@old-object@";
const BIG_REVIEW_UID: &str = "9a8b7c6d-5e4f-4a3b-8c2d-1e0f9a8b7c6d";

/// An UPDATE of the Secret from `old` to `new` (JSON text of each).
fn secret_update_review(old: &str, new: &str) -> anyhow::Result<String> {
    let envelope = json!({
        "apiVersion": "admission.k8s.io/v1",
        "kind": "AdmissionReview",
        "request": {
            "uid": BIG_REVIEW_UID,
            "kind": {"group": "", "version": "v1", "kind": "Secret"},
            "resource": {"group": "", "version": "v1", "resource": "secrets"},
            "name": SECRET_NAME,
            "namespace": NAMESPACE,
            "operation": "UPDATE",
            "userInfo": {"username": "system:serviceaccount:tenant-a:default"},
            "object": OBJECT_SLOT,
            "oldObject": OLD_OBJECT_SLOT,
            "dryRun": false,
        },
    });
    let text = serde_json::to_string(&envelope)?;
    Ok(text
        .replacen(&format!("\"{OBJECT_SLOT}\""), new, 1)
        .replacen(&format!("\"{OLD_OBJECT_SLOT}\""), old, 1))
}

/// A `kubernetes.io/tls` Secret at `resource_version` whose `data` members are `entries`.
fn secret_object(resource_version: &str, entries: &str) -> anyhow::Result<String> {
    let metadata = serde_json::to_string(&json!({
        "name": SECRET_NAME,
        "namespace": NAMESPACE,
        "resourceVersion": resource_version,
        "uid": "0d9c8b7a-6f5e-4d3c-2b1a-0f9e8d7c6b5a",
    }))?;
    Ok(format!(
        r#"{{"apiVersion":"v1","kind":"Secret","metadata":{metadata},"type":"{TLS_SECRET_TYPE}","data":{{{entries}}}}}"#
    ))
}

/// JSON object members mapping each key to its value in base64, as a Secret's `data` holds them.
fn data_entries(values: &[(&str, &[u8])]) -> String {
    values
        .iter()
        .map(|(key, value)| {
            format!(
                "\"{key}\":\"{}\"",
                base64::engine::general_purpose::STANDARD.encode(value)
            )
        })
        .collect::<Vec<_>>()
        .join(",")
}

/// A maximum-size review and what it is.
struct BigReview {
    name: &'static str,
    description: String,
    body: Bytes,
}

/// Old and new Secret each half the body, both valid, with `data` padded by tiny keys: the shape
/// that made a loosely typed parser build a map entry per key.
fn many_keys_review(pki: &Pki) -> anyhow::Result<BigReview> {
    let valid = pki.valid_data_entries();
    let envelope = secret_update_review("", "")?.len();
    let per_object = BIG_REVIEW_BYTES.saturating_sub(envelope) / 2;
    let base = secret_object(CACHED_VERSION, &valid)?.len();
    let keys = per_object.saturating_sub(base) / TINY_ENTRY_BYTES;
    let mut entries = String::with_capacity(valid.len() + keys * TINY_ENTRY_BYTES);
    entries.push_str(&valid);
    for index in 0..keys {
        entries.push_str(&format!(",\"k{index:07}\":\"YWJj\""));
    }
    let old = secret_object(CACHED_VERSION, &entries)?;
    let new = secret_object("48214", &entries)?;
    let body = secret_update_review(&old, &new)?;
    Ok(BigReview {
        name: "many-keys",
        description: format!(
            "old and new Secret each with {keys} tiny data keys besides the valid tls.crt, tls.key, ca.crt"
        ),
        body: Bytes::from(body),
    })
}

/// The new Secret's three contract values as PEM blocks of garbage, about a megabyte each: every
/// value is base64-decoded by the parser and PEM-decoded by the inspection before it fails. The
/// old Secret is the valid one at the cached version.
fn large_values_review(pki: &Pki) -> anyhow::Result<BigReview> {
    let old = secret_object(CACHED_VERSION, &pki.valid_data_entries())?;
    let envelope = secret_update_review(&old, "")?.len();
    let empty = secret_object(
        "48215",
        &data_entries(&[("tls.crt", b""), ("tls.key", b""), ("ca.crt", b"")]),
    )?;
    let room = BIG_REVIEW_BYTES.saturating_sub(envelope + empty.len());
    // Each value's base64 text takes a third of the room; it encodes 3 bytes in 4 characters.
    let pem_bytes = room / 3 / 4 * 3;
    let mut garbage = Garbage::new(0x5eed_0fab_05e1);
    let cert = garbage.pem("CERTIFICATE", pem_bytes);
    let key = garbage.pem("PRIVATE KEY", pem_bytes);
    let ca = garbage.pem("CERTIFICATE", pem_bytes);
    let new = secret_object(
        "48215",
        &data_entries(&[
            ("tls.crt", cert.as_bytes()),
            ("tls.key", key.as_bytes()),
            ("ca.crt", ca.as_bytes()),
        ]),
    )?;
    let body = secret_update_review(&old, &new)?;
    Ok(BigReview {
        name: "large-values",
        description: format!(
            "new Secret with tls.crt, tls.key, ca.crt each a PEM block of {} KiB of garbage; old Secret the valid one",
            cert.len() >> 10
        ),
        body: Bytes::from(body),
    })
}

/// Pseudo-random bytes (xorshift): garbage that neither compresses nor parses.
struct Garbage(u64);

impl Garbage {
    fn new(seed: u64) -> Self {
        Self(seed.max(1))
    }

    fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }

    /// A PEM block tagged `tag` of at most `max_len` bytes, lines of 64 characters.
    fn pem(&mut self, tag: &str, max_len: usize) -> String {
        let header = format!("-----BEGIN {tag}-----\n");
        let footer = format!("-----END {tag}-----\n");
        // A line is 48 bytes of garbage in 64 base64 characters, and its newline.
        let lines = max_len.saturating_sub(header.len() + footer.len()) / 65;
        let raw: Vec<u8> = (0..lines * 48)
            .map(|_| self.next().to_le_bytes()[0])
            .collect();
        let encoded = base64::engine::general_purpose::STANDARD.encode(raw);
        let mut pem = String::with_capacity(max_len);
        pem.push_str(&header);
        for line in encoded.as_bytes().chunks(64) {
            pem.push_str(&String::from_utf8_lossy(line));
            pem.push('\n');
        }
        pem.push_str(&footer);
        pem
    }
}

// === Clients ===

/// How to reach the webhook.
struct Clients {
    http1: TlsConnector,
    http2: TlsConnector,
    https: SocketAddr,
    health: SocketAddr,
}

type Http1 = hyper::client::conn::http1::SendRequest<Full<Bytes>>;

/// A TCP connection from `source` (a loopback address; the per-source caps count it).
async fn tcp_from(source: Ipv4Addr, addr: SocketAddr) -> anyhow::Result<TcpStream> {
    let socket = TcpSocket::new_v4()?;
    socket.bind(SocketAddr::from((source, 0)))?;
    let tcp = tokio::time::timeout(CONNECT_TIMEOUT, socket.connect(addr))
        .await
        .with_context(|| format!("no connection to {addr} within {CONNECT_TIMEOUT:?}"))?
        .with_context(|| format!("failed to connect to {addr} from {source}"))?;
    tcp.set_nodelay(true)?;
    Ok(tcp)
}

/// A TLS connection from `source`; fails when the server closes it unshaken (over a cap).
async fn tls_from(
    connector: &TlsConnector,
    source: Ipv4Addr,
    addr: SocketAddr,
) -> anyhow::Result<TlsStream<TcpStream>> {
    let tcp = tcp_from(source, addr).await?;
    tokio::time::timeout(
        CONNECT_TIMEOUT,
        connector.connect(ServerName::try_from("localhost")?, tcp),
    )
    .await
    .with_context(|| format!("no TLS handshake within {CONNECT_TIMEOUT:?}"))?
    .context("TLS handshake failed")
}

/// An HTTP/1.1 connection from `source`, and the task that drives it (it ends when the
/// connection does).
async fn connect_http1(
    clients: &Clients,
    source: Ipv4Addr,
) -> anyhow::Result<(Http1, JoinHandle<()>)> {
    let tls = tls_from(&clients.http1, source, clients.https).await?;
    let (sender, connection) = tokio::time::timeout(
        CONNECT_TIMEOUT,
        hyper::client::conn::http1::handshake(TokioIo::new(tls)),
    )
    .await
    .context("no HTTP/1.1 handshake in time")??;
    let driver = tokio::spawn(async move {
        let _ = connection.await;
    });
    Ok((sender, driver))
}

/// An HTTP/2 connection from `source`, PINGing every `keepalive` if given, and its driver.
async fn connect_http2<B>(
    clients: &Clients,
    source: Ipv4Addr,
    keepalive: Option<Duration>,
) -> anyhow::Result<(hyper::client::conn::http2::SendRequest<B>, JoinHandle<()>)>
where
    B: hyper::body::Body + Send + Unpin + 'static,
    B::Data: Send,
    B::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
{
    let tls = tls_from(&clients.http2, source, clients.https).await?;
    if tls.get_ref().1.alpn_protocol() != Some(b"h2") {
        bail!("the webhook did not negotiate HTTP/2");
    }
    let mut builder = hyper::client::conn::http2::Builder::new(TokioExecutor::new());
    builder.timer(TokioTimer::new());
    if let Some(interval) = keepalive {
        builder
            .keep_alive_interval(interval)
            .keep_alive_while_idle(true);
    }
    let (sender, connection) =
        tokio::time::timeout(CONNECT_TIMEOUT, builder.handshake(TokioIo::new(tls)))
            .await
            .context("no HTTP/2 handshake in time")??;
    let driver = tokio::spawn(async move {
        let _ = connection.await;
    });
    Ok((sender, driver))
}

/// An answer, read to its end.
struct Answer {
    status: StatusCode,
    retry_after: Duration,
    body: Bytes,
}

/// POSTs `body` to `path` and reads the answer, within `within`. The error says why there is no
/// answer (the connection ended, or the time ran out).
async fn post(
    sender: &mut Http1,
    path: &str,
    body: Bytes,
    within: Duration,
) -> Result<Answer, String> {
    let exchange = async {
        sender
            .ready()
            .await
            .map_err(|e| format!("connection lost before the request: {e}"))?;
        let request = hyper::Request::post(path)
            .header(HOST, "localhost")
            .header(CONTENT_TYPE, "application/json")
            .body(Full::new(body))
            .map_err(|e| format!("failed to build the request: {e}"))?;
        let response = sender
            .send_request(request)
            .await
            .map_err(|e| format!("no answer: {e}"))?;
        let status = response.status();
        let retry_after = response
            .headers()
            .get(RETRY_AFTER)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.trim().parse::<u64>().ok())
            .map_or(Duration::from_secs(1), Duration::from_secs)
            .min(MAX_RETRY_AFTER);
        let body = response
            .into_body()
            .collect()
            .await
            .map_err(|e| format!("the answer was cut: {e}"))?
            .to_bytes();
        Ok(Answer {
            status,
            retry_after,
            body,
        })
    };
    tokio::time::timeout(within, exchange)
        .await
        .map_err(|_| format!("no answer within {within:?}"))?
}

/// Whether an answer is an AdmissionReview that allows without warnings.
fn allowed_cleanly(body: &[u8]) -> bool {
    let Ok(review) = serde_json::from_slice::<Value>(body) else {
        return false;
    };
    let response = &review["response"];
    response["allowed"] == Value::Bool(true)
        && response["warnings"]
            .as_array()
            .is_none_or(|warnings| warnings.is_empty())
}

/// What a set of clients got for their reviews.
#[derive(Default)]
struct Tally {
    /// Reviews sent (attempts included).
    sent: AtomicU64,
    ok: AtomicU64,
    too_many: AtomicU64,
    /// Another status.
    other: AtomicU64,
    /// No answer: the connection failed or ended, or the time ran out.
    no_answer: AtomicU64,
    /// Reviews given up after the last attempt (or abandoned at the round's limit).
    gave_up: AtomicU64,
    messages: Mutex<Vec<String>>,
}

impl Tally {
    fn add(counter: &AtomicU64) {
        counter.fetch_add(1, Ordering::Relaxed);
    }

    fn note(&self, message: String) {
        let mut messages = self.messages.lock().unwrap_or_else(PoisonError::into_inner);
        if messages.len() < MESSAGES_QUOTED && !messages.contains(&message) {
            messages.push(message);
        }
    }

    /// Counts an answer (or its absence) by status.
    fn record(&self, answer: &Result<Answer, String>) {
        Self::add(&self.sent);
        match answer {
            Ok(a) if a.status == StatusCode::OK => Self::add(&self.ok),
            Ok(a) if a.status == StatusCode::TOO_MANY_REQUESTS => Self::add(&self.too_many),
            Ok(a) => {
                Self::add(&self.other);
                self.note(format!(
                    "HTTP {}: {}",
                    a.status,
                    seinode_tls_crds::truncated(String::from_utf8_lossy(&a.body).trim(), 200)
                ));
            }
            Err(message) => {
                Self::add(&self.no_answer);
                self.note(message.clone());
            }
        }
    }

    fn snapshot(&self) -> TallyFigures {
        let load = |c: &AtomicU64| c.load(Ordering::Relaxed);
        TallyFigures {
            sent: load(&self.sent),
            ok: load(&self.ok),
            too_many: load(&self.too_many),
            other: load(&self.other),
            no_answer: load(&self.no_answer),
            gave_up: load(&self.gave_up),
            messages: self
                .messages
                .lock()
                .unwrap_or_else(PoisonError::into_inner)
                .clone(),
        }
    }
}

#[derive(Debug, Clone, Default)]
struct TallyFigures {
    sent: u64,
    ok: u64,
    too_many: u64,
    other: u64,
    no_answer: u64,
    gave_up: u64,
    messages: Vec<String>,
}

impl TallyFigures {
    fn ok_percent(&self) -> f64 {
        if self.sent == 0 {
            0.0
        } else {
            round1(100.0 * self.ok as f64 / self.sent as f64)
        }
    }

    fn json(&self) -> Value {
        json!({
            "sent": self.sent, "ok": self.ok, "too_many": self.too_many, "other": self.other,
            "no_answer": self.no_answer, "gave_up": self.gave_up,
        })
    }
}

// === The run ===

fn run(args: &Args) -> anyhow::Result<()> {
    if args.memory_rounds == 0 {
        bail!("--memory-rounds must be at least 1");
    }
    let _ = rustls::crypto::ring::default_provider().install_default();
    let pki = Pki::new()?;
    let shapes = [many_keys_review(&pki)?, large_values_review(&pki)?];
    let seinode = seinode_review()?;
    let mut server = ServerProcess::start(&pki.dir.path, args)?;
    let clients = Arc::new(Clients {
        http1: pki.connector(b"http/1.1")?,
        http2: pki.connector(b"h2")?,
        https: server.https,
        health: server.health,
    });
    print_setup(args, &pki, &server, &shapes, seinode.len());

    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .thread_name("abuse-client")
        .build()
        .context("failed to start the client runtime")?;
    let report = runtime.block_on(async {
        warm_up(&clients, &pki, &seinode).await?;
        server.check_alive("warm-up")?;
        let memory = memory_phase(server.pid, &clients, &shapes, args.memory_rounds).await?;
        server.check_alive("memory phase")?;
        print_memory(&memory, &shapes);
        let lockout = lockout_phase(&clients, args.idle_timeout, &seinode).await;
        server.check_alive("lock-out phase")?;
        print_lockout(&lockout, args.idle_timeout);
        let mut trickle = Vec::new();
        for mode in [TrickleMode::Http1, TrickleMode::Http2] {
            let report = trickle_phase(&clients, mode, args.trickle_duration, &seinode).await;
            server.check_alive("trickle phase")?;
            print_trickle(&report, args.trickle_duration);
            trickle.push(report);
        }
        let health = health_phase(&clients, args.health_wait).await;
        server.check_alive("health phase")?;
        print_health(&health, args.health_wait);
        Ok::<_, anyhow::Error>(Report {
            memory,
            lockout,
            trickle,
            health,
        })
    });
    // Client tasks still holding connections go with the runtime, before the server stops.
    runtime.shutdown_timeout(Duration::from_secs(2));
    let final_memory = read_memory(server.pid);
    let report = report?;
    server.stop()?;
    println!();
    println!("{}", report.json(args, final_memory));
    Ok(())
}

/// Ordinary reviews until the allocator and the TLS sessions are warm, and two checks that the
/// setup is what the figures claim: the judge finds the Secret valid (a clean allow), and the
/// Secret guard sees the SeiNode (a breaking change is warned about).
async fn warm_up(clients: &Clients, pki: &Pki, seinode: &Bytes) -> anyhow::Result<()> {
    let (mut sender, _driver) = connect_http1(clients, API_SERVER).await?;
    for _ in 0..200 {
        let answer = post(
            &mut sender,
            VALIDATE_SEINODES_PATH,
            seinode.clone(),
            ANSWER_TIMEOUT,
        )
        .await
        .map_err(|e| anyhow::anyhow!("warm-up review failed: {e}"))?;
        if answer.status != StatusCode::OK || !allowed_cleanly(&answer.body) {
            bail!(
                "the warm-up SeiNode review was not allowed cleanly (HTTP {}): {}; the Secret in \
                 the webhook's cache is not what the benchmark expects",
                answer.status,
                String::from_utf8_lossy(&answer.body)
            );
        }
    }
    let old = secret_object(CACHED_VERSION, &pki.valid_data_entries())?;
    let broken = secret_object(
        "48216",
        &data_entries(&[("tls.key", pki.secret_key.as_bytes())]),
    )?;
    let review = Bytes::from(secret_update_review(&old, &broken)?);
    let answer = post(&mut sender, VALIDATE_SECRETS_PATH, review, ANSWER_TIMEOUT)
        .await
        .map_err(|e| anyhow::anyhow!("warm-up Secret review failed: {e}"))?;
    let text = String::from_utf8_lossy(&answer.body);
    if answer.status != StatusCode::OK || !text.contains(NODE_NAME) {
        bail!(
            "the Secret guard did not name SeiNode {NODE_NAME} for a change that breaks it (HTTP {}): \
             {text}; the SeiNode cache is not what the benchmark expects",
            answer.status
        );
    }
    Ok(())
}

// === Memory phase ===

struct ShapeFigures {
    tally: TallyFigures,
    /// Peak resident memory over the shape (VmHWM), and whether it was reset before the shape
    /// (else it is the peak since the process started).
    peak_kib: Option<u64>,
    peak_was_reset: bool,
    /// The highest VmRSS seen by sampling every few milliseconds (a floor of the true peak).
    sampled_peak_kib: u64,
    rss_after_kib: Option<u64>,
    elapsed: Duration,
}

struct MemoryReport {
    baseline_rss_kib: u64,
    rounds: u32,
    shapes: Vec<ShapeFigures>,
}

impl MemoryReport {
    /// The highest peak over the shapes.
    fn peak_mib(&self) -> f64 {
        self.shapes
            .iter()
            .filter_map(|s| s.peak_kib)
            .max()
            .map_or(0.0, mib)
    }

    fn under_target(&self) -> bool {
        self.peak_mib() < MEMORY_TARGET_MIB
    }
}

async fn memory_phase(
    pid: u32,
    clients: &Arc<Clients>,
    shapes: &[BigReview],
    rounds: u32,
) -> anyhow::Result<MemoryReport> {
    let baseline = read_memory(pid).context("failed to read the webhook's memory from /proc")?;
    let mut figures = Vec::new();
    for shape in shapes {
        let peak_was_reset = reset_peak(pid);
        let sampling = Arc::new(AtomicBool::new(true));
        let sampler = tokio::spawn(sample_peak_rss(pid, sampling.clone()));
        let tally = Arc::new(Tally::default());
        let started = Instant::now();
        for _ in 0..rounds {
            let give_up = Instant::now() + ROUND_LIMIT;
            let senders: Vec<_> = (0..BIG_REVIEWS_AT_ONCE)
                .map(|_| {
                    tokio::spawn(send_with_retries(
                        clients.clone(),
                        shape.body.clone(),
                        tally.clone(),
                    ))
                })
                .collect();
            for mut sender in senders {
                if tokio::time::timeout_at(give_up, &mut sender).await.is_err() {
                    sender.abort();
                    Tally::add(&tally.gave_up);
                    tally.note(format!("abandoned after {ROUND_LIMIT:?}"));
                }
            }
        }
        let elapsed = started.elapsed();
        sampling.store(false, Ordering::Relaxed);
        let sampled_peak_kib = sampler.await.unwrap_or(0);
        let peak_kib = read_memory(pid).map(|m| m.hwm_kib);
        // Memory freed by the last requests is returned (or not) by the allocator; give it a
        // moment, then read what stays.
        tokio::time::sleep(Duration::from_secs(1)).await;
        figures.push(ShapeFigures {
            tally: tally.snapshot(),
            peak_kib,
            peak_was_reset,
            sampled_peak_kib,
            rss_after_kib: read_memory(pid).map(|m| m.rss_kib),
            elapsed,
        });
    }
    Ok(MemoryReport {
        baseline_rss_kib: baseline.rss_kib,
        rounds,
        shapes: figures,
    })
}

/// The highest VmRSS seen while `running` holds.
async fn sample_peak_rss(pid: u32, running: Arc<AtomicBool>) -> u64 {
    let mut peak = 0;
    while running.load(Ordering::Relaxed) {
        if let Some(memory) = read_memory(pid) {
            peak = peak.max(memory.rss_kib);
        }
        tokio::time::sleep(RSS_SAMPLE_INTERVAL).await;
    }
    peak
}

/// One review, sent as the API server sends it: on its own connection, again after the
/// `Retry-After` of a 429, on a new connection when the old one ended, at most `MAX_ATTEMPTS`.
async fn send_with_retries(clients: Arc<Clients>, body: Bytes, tally: Arc<Tally>) {
    let mut connection: Option<Http1> = None;
    for _ in 0..MAX_ATTEMPTS {
        if connection.as_ref().is_none_or(Http1::is_closed) {
            match connect_http1(&clients, API_SERVER).await {
                Ok((sender, _driver)) => connection = Some(sender),
                Err(e) => {
                    tally.record(&Err(format!("{e:#}")));
                    tokio::time::sleep(RECONNECT_PAUSE).await;
                    continue;
                }
            }
        }
        let Some(sender) = connection.as_mut() else {
            continue;
        };
        let answer = post(
            sender,
            VALIDATE_SECRETS_PATH,
            body.clone(),
            BIG_ANSWER_TIMEOUT,
        )
        .await;
        tally.record(&answer);
        match answer {
            Ok(a) if a.status == StatusCode::TOO_MANY_REQUESTS => {
                tokio::time::sleep(a.retry_after).await;
            }
            Ok(_) => return,
            Err(_) => {
                connection = None;
                tokio::time::sleep(RECONNECT_PAUSE).await;
            }
        }
    }
    Tally::add(&tally.gave_up);
}

// === Lock-out phase ===

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Protocol {
    Http1,
    Http2,
}

/// What became of one idle connection.
#[derive(Debug, Clone, Copy)]
enum Held {
    /// The server closed it at once (a cap).
    Refused,
    /// The server closed it this long after it was established.
    Closed(Duration),
    /// Still open at the phase's end.
    StillOpen,
}

struct LockoutReport {
    accepted: BTreeMap<&'static str, u64>,
    refused: u64,
    /// When the server closed each accepted connection, sorted.
    closed_after: Vec<Duration>,
    still_open: u64,
    probes: TallyFigures,
    elapsed: Duration,
}

impl LockoutReport {
    fn all_closed(&self) -> bool {
        self.still_open == 0 && !self.closed_after.is_empty()
    }

    fn api_server_never_locked_out(&self) -> bool {
        self.probes.sent > 0 && self.probes.ok == self.probes.sent
    }
}

async fn lockout_phase(
    clients: &Arc<Clients>,
    idle_timeout: Duration,
    seinode: &Bytes,
) -> LockoutReport {
    let started = Instant::now();
    let deadline = started + idle_timeout + SERVER_CLOSING_GRACE + LOCKOUT_SLACK;
    let holders: Vec<_> = (0..IDLE_CONNECTIONS)
        .map(|i| {
            let clients = clients.clone();
            if i % 2 == 0 {
                tokio::spawn(async move { (Protocol::Http2, hold_http2(&clients, deadline).await) })
            } else {
                tokio::spawn(async move { (Protocol::Http1, hold_http1(&clients, deadline).await) })
            }
        })
        .collect();

    // The API server, meanwhile: a fresh connection and one review every second, from before
    // the idle connections are all in until after the server should have closed them.
    let probes = Arc::new(Tally::default());
    let probe_until = started + idle_timeout + Duration::from_secs(5);
    let mut tick = tokio::time::interval(PROBE_INTERVAL);
    let mut probing = Vec::new();
    while Instant::now() < probe_until {
        tick.tick().await;
        let (clients, probes, body) = (clients.clone(), probes.clone(), seinode.clone());
        probing.push(tokio::spawn(async move {
            let answer = match connect_http1(&clients, API_SERVER).await {
                Ok((mut sender, _driver)) => {
                    post(&mut sender, VALIDATE_SEINODES_PATH, body, ANSWER_TIMEOUT).await
                }
                Err(e) => Err(format!("{e:#}")),
            };
            probes.record(&answer);
        }));
    }
    for probe in probing {
        // Each is bounded by its connect and answer timeouts.
        let _ = probe.await;
    }

    let mut report = LockoutReport {
        accepted: BTreeMap::new(),
        refused: 0,
        closed_after: Vec::new(),
        still_open: 0,
        probes: probes.snapshot(),
        elapsed: Duration::ZERO,
    };
    for holder in holders {
        // Each returns by the deadline on its own; the margin covers a wedged task.
        let outcome = tokio::time::timeout_at(deadline + Duration::from_secs(5), holder).await;
        let Ok(Ok((protocol, held))) = outcome else {
            report.still_open += 1;
            continue;
        };
        let name = match protocol {
            Protocol::Http1 => "http1",
            Protocol::Http2 => "http2",
        };
        match held {
            Held::Refused => report.refused += 1,
            Held::Closed(after) => {
                *report.accepted.entry(name).or_default() += 1;
                report.closed_after.push(after);
            }
            Held::StillOpen => {
                *report.accepted.entry(name).or_default() += 1;
                report.still_open += 1;
            }
        }
    }
    report.closed_after.sort_unstable();
    report.elapsed = started.elapsed();
    report
}

/// An HTTP/2 connection with one `GET /` at its start and PINGs from then on.
async fn hold_http2(clients: &Clients, deadline: Instant) -> Held {
    let Ok((mut sender, mut driver)) =
        connect_http2::<Empty<Bytes>>(clients, IDLE_ABUSER, Some(BUSYWORK_INTERVAL)).await
    else {
        return Held::Refused;
    };
    let accepted = Instant::now();
    let get = async {
        sender.ready().await.ok()?;
        let request = hyper::Request::get("https://localhost/")
            .body(Empty::new())
            .ok()?;
        let response = sender.send_request(request).await.ok()?;
        response.into_body().collect().await.ok()
    };
    let _ = tokio::time::timeout(ANSWER_TIMEOUT, get).await;
    let held = match tokio::time::timeout_at(deadline, &mut driver).await {
        Ok(_) => Held::Closed(accepted.elapsed()),
        Err(_) => {
            driver.abort();
            Held::StillOpen
        }
    };
    // Held until here: a client that drops its last sender closes the connection itself.
    drop(sender);
    held
}

/// An HTTP/1.1 connection with a `GET /` every few seconds.
async fn hold_http1(clients: &Clients, deadline: Instant) -> Held {
    let Ok((mut sender, mut driver)) = connect_http1(clients, IDLE_ABUSER).await else {
        return Held::Refused;
    };
    let accepted = Instant::now();
    let mut tick = tokio::time::interval(BUSYWORK_INTERVAL);
    loop {
        tokio::select! {
            _ = &mut driver => return Held::Closed(accepted.elapsed()),
            () = tokio::time::sleep_until(deadline) => {
                driver.abort();
                return Held::StillOpen;
            }
            _ = tick.tick() => {
                let get = async {
                    sender.ready().await.ok()?;
                    let request = hyper::Request::get("/")
                        .header(HOST, "localhost")
                        .body(Full::new(Bytes::new()))
                        .ok()?;
                    let response = sender.send_request(request).await.ok()?;
                    response.into_body().collect().await.ok()
                };
                if !matches!(tokio::time::timeout(ANSWER_TIMEOUT, get).await, Ok(Some(_))) {
                    // The server is closing it; the driver ends when it has.
                    let _ = tokio::time::timeout(ANSWER_TIMEOUT, &mut driver).await;
                    return Held::Closed(accepted.elapsed());
                }
            }
        }
    }
}

// === Trickle phase ===

#[derive(Debug, Clone, Copy)]
enum TrickleMode {
    /// 32 HTTP/1.1 connections, one trickling body each.
    Http1,
    /// One HTTP/2 connection with 32 trickling streams.
    Http2,
}

impl TrickleMode {
    fn name(self) -> &'static str {
        match self {
            TrickleMode::Http1 => "http1",
            TrickleMode::Http2 => "http2",
        }
    }

    fn description(self) -> String {
        match self {
            TrickleMode::Http1 => format!(
                "{TRICKLERS} HTTP/1.1 connections from {TRICKLE_HTTP1_ABUSER}, one body each"
            ),
            TrickleMode::Http2 => {
                format!("{TRICKLERS} streams of one HTTP/2 connection from {TRICKLE_HTTP2_ABUSER}")
            }
        }
    }
}

/// What the trickling bodies got.
#[derive(Default)]
struct TrickleTally {
    /// Connections established, and those closed unshaken (a cap).
    connections: AtomicU64,
    refused: AtomicU64,
    /// Bodies begun.
    requests: AtomicU64,
    /// Answers by status.
    answers: Mutex<BTreeMap<u16, u64>>,
    /// Ended without an answer.
    cut: AtomicU64,
}

impl TrickleTally {
    fn answered(&self, status: u16) {
        *self
            .answers
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .entry(status)
            .or_default() += 1;
    }
}

struct TrickleReport {
    mode: TrickleMode,
    connections: u64,
    refused: u64,
    requests: u64,
    answers: BTreeMap<u16, u64>,
    cut: u64,
    legit: TallyFigures,
}

impl TrickleReport {
    fn answered_enough(&self) -> bool {
        self.legit.ok_percent() >= ANSWERED_TARGET_PERCENT
    }
}

async fn trickle_phase(
    clients: &Arc<Clients>,
    mode: TrickleMode,
    duration: Duration,
    seinode: &Bytes,
) -> TrickleReport {
    let deadline = Instant::now() + duration;
    let tally = Arc::new(TrickleTally::default());
    let trickling: Vec<_> = match mode {
        TrickleMode::Http1 => (0..TRICKLERS)
            .map(|_| tokio::spawn(trickle_http1(clients.clone(), deadline, tally.clone())))
            .collect(),
        TrickleMode::Http2 => vec![tokio::spawn(trickle_http2(
            clients.clone(),
            deadline,
            tally.clone(),
        ))],
    };
    // Let the trickles take hold before the API server's reviews are counted.
    tokio::time::sleep(Duration::from_millis(500).min(duration / 4)).await;
    let legit = Arc::new(Tally::default());
    let reviewers: Vec<_> = (0..LEGIT_CLIENTS)
        .map(|_| {
            tokio::spawn(review_back_to_back(
                clients.clone(),
                seinode.clone(),
                deadline,
                legit.clone(),
            ))
        })
        .collect();
    for mut task in reviewers.into_iter().chain(trickling) {
        // Every task stops at the deadline; the margin covers one bounded wait in progress.
        let give_up = deadline + CONNECT_TIMEOUT + ANSWER_TIMEOUT;
        if tokio::time::timeout_at(give_up, &mut task).await.is_err() {
            task.abort();
        }
    }
    let load = |c: &AtomicU64| c.load(Ordering::Relaxed);
    TrickleReport {
        mode,
        connections: load(&tally.connections),
        refused: load(&tally.refused),
        requests: load(&tally.requests),
        answers: tally
            .answers
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .clone(),
        cut: load(&tally.cut),
        legit: legit.snapshot(),
    }
}

/// The API server's side: SeiNode reviews one after another on a keep-alive connection.
async fn review_back_to_back(
    clients: Arc<Clients>,
    body: Bytes,
    deadline: Instant,
    tally: Arc<Tally>,
) {
    let mut connection: Option<Http1> = None;
    while Instant::now() < deadline {
        if connection.as_ref().is_none_or(Http1::is_closed) {
            match connect_http1(&clients, API_SERVER).await {
                Ok((sender, _driver)) => connection = Some(sender),
                Err(e) => {
                    tally.record(&Err(format!("{e:#}")));
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    continue;
                }
            }
        }
        let Some(sender) = connection.as_mut() else {
            continue;
        };
        let answer = post(sender, VALIDATE_SEINODES_PATH, body.clone(), ANSWER_TIMEOUT).await;
        if answer.is_err() {
            connection = None;
        }
        tally.record(&answer);
    }
}

/// One trickling body after another over HTTP/1.1, each on a new connection (an unread body
/// leaves the connection unusable).
async fn trickle_http1(clients: Arc<Clients>, deadline: Instant, tally: Arc<TrickleTally>) {
    let head = format!(
        "POST {VALIDATE_SECRETS_PATH} HTTP/1.1\r\nHost: localhost\r\nContent-Type: application/json\r\n\
         Content-Length: {TRICKLE_CONTENT_LENGTH}\r\n\r\n"
    );
    while Instant::now() < deadline {
        let tls = match tokio::time::timeout_at(
            deadline,
            tls_from(&clients.http1, TRICKLE_HTTP1_ABUSER, clients.https),
        )
        .await
        {
            Err(_) => return,
            Ok(Err(_)) => {
                Tally::add(&tally.refused);
                tokio::time::sleep(Duration::from_millis(100)).await;
                continue;
            }
            Ok(Ok(tls)) => tls,
        };
        Tally::add(&tally.connections);
        let (mut reader, mut writer) = tokio::io::split(tls);
        if writer.write_all(head.as_bytes()).await.is_err() || writer.flush().await.is_err() {
            Tally::add(&tally.cut);
            continue;
        }
        Tally::add(&tally.requests);
        let trickle = async {
            loop {
                tokio::time::sleep(TRICKLE_INTERVAL).await;
                // JSON whitespace: a body that could still become a review.
                if writer.write_all(b" ").await.is_err() || writer.flush().await.is_err() {
                    return;
                }
            }
        };
        let outcome = tokio::select! {
            biased;
            status = read_status(&mut reader) => Some(status),
            () = trickle => None,
            () = tokio::time::sleep_until(deadline) => return,
        };
        // The server stopped reading; its answer may still be on its way.
        let status = match outcome {
            Some(status) => status,
            None => tokio::time::timeout(Duration::from_secs(1), read_status(&mut reader))
                .await
                .ok()
                .flatten(),
        };
        match status {
            Some(status) => tally.answered(status),
            None => Tally::add(&tally.cut),
        }
    }
}

/// The status of an HTTP/1.1 answer; `None` when the connection ends first.
async fn read_status<R: AsyncRead + Unpin>(reader: &mut R) -> Option<u16> {
    let mut head = Vec::new();
    let mut chunk = [0u8; 512];
    while !head.windows(2).any(|w| w == b"\r\n") && head.len() < 4096 {
        match reader.read(&mut chunk).await {
            Ok(0) | Err(_) => return None,
            Ok(n) => head.extend_from_slice(&chunk[..n]),
        }
    }
    let line = String::from_utf8_lossy(&head);
    line.split_whitespace().nth(1)?.parse().ok()
}

/// A request body fed one chunk at a time by its sender; it never ends unless the sender goes.
struct TrickleBody(tokio::sync::mpsc::Receiver<Bytes>);

impl hyper::body::Body for TrickleBody {
    type Data = Bytes;
    type Error = Infallible;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Infallible>>> {
        self.get_mut()
            .0
            .poll_recv(cx)
            .map(|chunk| chunk.map(|bytes| Ok(Frame::data(bytes))))
    }
}

type Http2Trickle = hyper::client::conn::http2::SendRequest<TrickleBody>;

/// 32 trickling streams on one HTTP/2 connection; a new connection when the server ends it.
async fn trickle_http2(clients: Arc<Clients>, deadline: Instant, tally: Arc<TrickleTally>) {
    while Instant::now() < deadline {
        let connected = tokio::time::timeout_at(
            deadline,
            connect_http2::<TrickleBody>(&clients, TRICKLE_HTTP2_ABUSER, None),
        )
        .await;
        let (sender, driver) = match connected {
            Err(_) => return,
            Ok(Err(_)) => {
                Tally::add(&tally.refused);
                tokio::time::sleep(Duration::from_millis(100)).await;
                continue;
            }
            Ok(Ok(connection)) => connection,
        };
        Tally::add(&tally.connections);
        let streams: Vec<_> = (0..TRICKLERS)
            .map(|_| tokio::spawn(trickle_stream(sender.clone(), deadline, tally.clone())))
            .collect();
        for mut stream in streams {
            if tokio::time::timeout_at(deadline + ANSWER_TIMEOUT, &mut stream)
                .await
                .is_err()
            {
                stream.abort();
            }
        }
        drop(sender);
        driver.abort();
    }
}

/// One trickling body after another on one stream at a time, until the connection ends.
async fn trickle_stream(mut sender: Http2Trickle, deadline: Instant, tally: Arc<TrickleTally>) {
    let uri = format!("https://localhost{VALIDATE_SECRETS_PATH}");
    while Instant::now() < deadline {
        if !matches!(
            tokio::time::timeout_at(deadline, sender.ready()).await,
            Ok(Ok(()))
        ) {
            return;
        }
        let (feed, body) = tokio::sync::mpsc::channel::<Bytes>(1);
        let Ok(request) = hyper::Request::post(uri.as_str())
            .header(CONTENT_TYPE, "application/json")
            .header(CONTENT_LENGTH, TRICKLE_CONTENT_LENGTH)
            .body(TrickleBody(body))
        else {
            return;
        };
        Tally::add(&tally.requests);
        let feeder = tokio::spawn(async move {
            loop {
                tokio::time::sleep(TRICKLE_INTERVAL).await;
                if feed.send(Bytes::from_static(b" ")).await.is_err() {
                    return;
                }
            }
        });
        let outcome = tokio::select! {
            response = sender.send_request(request) => Some(response),
            () = tokio::time::sleep_until(deadline) => None,
        };
        feeder.abort();
        match outcome {
            None => return,
            Some(Ok(response)) => tally.answered(response.status().as_u16()),
            Some(Err(_)) => {
                Tally::add(&tally.cut);
                if sender.is_closed() {
                    return;
                }
            }
        }
    }
}

// === Health phase ===

/// What became of one silent connection to the health port.
#[derive(Debug, Clone, Copy)]
enum Stalled {
    /// No TCP connection at all.
    ConnectFailed,
    Refused,
    Closed(Duration),
    StillOpen,
}

struct HealthReport {
    connect_failed: u64,
    refused: u64,
    closed_after: Vec<Duration>,
    still_open: u64,
    readyz_tried: u64,
    readyz_ok: u64,
}

impl HealthReport {
    fn all_closed(&self) -> bool {
        self.still_open == 0
    }

    fn always_ready(&self) -> bool {
        self.readyz_tried > 0 && self.readyz_ok == self.readyz_tried
    }
}

async fn health_phase(clients: &Arc<Clients>, wait: Duration) -> HealthReport {
    let started = Instant::now();
    let stallers: Vec<_> = (0..HEALTH_STALLERS)
        .map(|_| tokio::spawn(stall(clients.health, wait)))
        .collect();
    let mut readyz = Vec::new();
    let mut tick = tokio::time::interval(READYZ_INTERVAL);
    while started.elapsed() < wait {
        tick.tick().await;
        readyz.push(tokio::spawn(readyz_once(clients.health)));
    }
    let mut report = HealthReport {
        connect_failed: 0,
        refused: 0,
        closed_after: Vec::new(),
        still_open: 0,
        readyz_tried: 0,
        readyz_ok: 0,
    };
    for check in readyz {
        report.readyz_tried += 1;
        if matches!(check.await, Ok(true)) {
            report.readyz_ok += 1;
        }
    }
    let give_up = started + CONNECT_TIMEOUT + wait + Duration::from_secs(5);
    for staller in stallers {
        match tokio::time::timeout_at(give_up, staller).await {
            Ok(Ok(Stalled::ConnectFailed)) => report.connect_failed += 1,
            Ok(Ok(Stalled::Refused)) => report.refused += 1,
            Ok(Ok(Stalled::Closed(after))) => report.closed_after.push(after),
            Ok(Ok(Stalled::StillOpen)) | Ok(Err(_)) | Err(_) => report.still_open += 1,
        }
    }
    report.closed_after.sort_unstable();
    report
}

/// A connection that sends nothing, watched for `wait`.
async fn stall(addr: SocketAddr, wait: Duration) -> Stalled {
    let Ok(mut stream) = tcp_from(HEALTH_ABUSER, addr).await else {
        return Stalled::ConnectFailed;
    };
    let connected = Instant::now();
    let mut byte = [0u8; 1];
    match tokio::time::timeout(wait, stream.read(&mut byte)).await {
        Err(_) => Stalled::StillOpen,
        // An end, a reset, or (never expected) a byte: the server acted.
        Ok(_) if connected.elapsed() < REFUSED_WITHIN => Stalled::Refused,
        Ok(_) => Stalled::Closed(connected.elapsed()),
    }
}

/// `GET /readyz` on a fresh connection from 127.0.0.1; whether it answered 200.
async fn readyz_once(addr: SocketAddr) -> bool {
    let check = async {
        let mut stream = tcp_from(API_SERVER, addr).await.ok()?;
        stream
            .write_all(b"GET /readyz HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n")
            .await
            .ok()?;
        read_status(&mut stream).await
    };
    matches!(
        tokio::time::timeout(ANSWER_TIMEOUT, check).await,
        Ok(Some(200))
    )
}

// === Output ===

struct Report {
    memory: MemoryReport,
    lockout: LockoutReport,
    trickle: Vec<TrickleReport>,
    health: HealthReport,
}

fn verdict(met: bool) -> &'static str {
    if met { "met" } else { "NOT met" }
}

fn print_setup(
    args: &Args,
    pki: &Pki,
    server: &ServerProcess,
    shapes: &[BigReview],
    seinode: usize,
) {
    let config = webhook_config(&pki.dir.path, args.idle_timeout);
    let health = HEALTH_LIMITS;
    let cores = std::thread::available_parallelism().map_or(0, usize::from);
    println!(
        "webhook-abuse: the webhook in process {} (HTTPS {}, health {}) on {cores} cores; load average {}",
        server.pid,
        server.https,
        server.health,
        load_average()
    );
    println!(
        "  admission port: {} connections, {} per source, idle timeout {:?} (production 120s), \
         max age {:?}, {} requests at once, {} MiB of bodies, request deadline {:?}",
        config.max_connections,
        config.max_connections_per_source,
        config.idle_timeout,
        config.max_connection_age,
        config.max_concurrent_requests,
        config.max_body_memory >> 20,
        config.request_deadline
    );
    println!(
        "  health port: {} connections, {} per source, first request within {:?}, idle {:?}",
        health.max_connections,
        health.max_per_source,
        health.first_request_timeout,
        health.idle_timeout
    );
    println!(
        "  API server: 127.0.0.1, SeiNode CREATE reviews of {seinode} bytes; abusers: {IDLE_ABUSER} idle, \
         {TRICKLE_HTTP1_ABUSER} and {TRICKLE_HTTP2_ABUSER} trickle, {HEALTH_ABUSER} health"
    );
    for shape in shapes {
        println!(
            "  body {:<12} {} bytes: {}",
            shape.name,
            shape.body.len(),
            shape.description
        );
    }
    println!();
}

fn print_memory(report: &MemoryReport, shapes: &[BigReview]) {
    println!(
        "memory: {BIG_REVIEWS_AT_ONCE} concurrent maximum-size Secret UPDATE reviews, one HTTP/1.1 \
         connection each, {} rounds per shape; a 429 is retried after its Retry-After, at most {MAX_ATTEMPTS} attempts",
        report.rounds
    );
    println!(
        "  RSS after warm-up: {:.1} MiB",
        mib(report.baseline_rss_kib)
    );
    println!(
        "  {:<12} {:>8} {:>5} {:>5} {:>9} {:>6} {:>7} {:>11} {:>13} {:>10} {:>8}",
        "shape",
        "attempts",
        "200",
        "429",
        "no-answer",
        "other",
        "gave-up",
        "peak MiB",
        "sampled MiB",
        "after MiB",
        "time"
    );
    for (shape, figures) in shapes.iter().zip(&report.shapes) {
        let t = &figures.tally;
        println!(
            "  {:<12} {:>8} {:>5} {:>5} {:>9} {:>6} {:>7} {:>10.1}{} {:>13.1} {:>10.1} {:>7.1}s",
            shape.name,
            t.sent,
            t.ok,
            t.too_many,
            t.no_answer,
            t.other,
            t.gave_up,
            figures.peak_kib.map_or(0.0, mib),
            if figures.peak_was_reset { " " } else { "*" },
            mib(figures.sampled_peak_kib),
            figures.rss_after_kib.map_or(0.0, mib),
            figures.elapsed.as_secs_f64()
        );
    }
    if report.shapes.iter().any(|s| !s.peak_was_reset) {
        println!("  * VmHWM could not be reset (clear_refs): the peak since the process started");
    }
    for (shape, figures) in shapes.iter().zip(&report.shapes) {
        for message in &figures.tally.messages {
            println!("  {}: {message}", shape.name);
        }
    }
    println!(
        "  peak {:.1} MiB: target under {MEMORY_TARGET_MIB} MiB {}",
        report.peak_mib(),
        verdict(report.under_target())
    );
    println!();
}

fn quantile(sorted: &[Duration], q: f64) -> Duration {
    if sorted.is_empty() {
        return Duration::ZERO;
    }
    // Nearest rank.
    let rank = ((q * sorted.len() as f64).ceil() as usize).clamp(1, sorted.len());
    sorted[rank - 1]
}

fn print_lockout(report: &LockoutReport, idle_timeout: Duration) {
    let accepted: u64 = report.accepted.values().sum();
    println!(
        "lock-out: {IDLE_CONNECTIONS} connections from {IDLE_ABUSER}, half HTTP/2 with PINGs every \
         {BUSYWORK_INTERVAL:?} after one GET /, half HTTP/1.1 with GET / every {BUSYWORK_INTERVAL:?}"
    );
    println!(
        "  accepted {accepted} ({}), refused {}, closed by the server after p50 {:.1}s max {:.1}s \
         (idle timeout {idle_timeout:?}), never closed {}; phase {:.1}s",
        report
            .accepted
            .iter()
            .map(|(protocol, n)| format!("{protocol} {n}"))
            .collect::<Vec<_>>()
            .join(", "),
        report.refused,
        quantile(&report.closed_after, 0.5).as_secs_f64(),
        quantile(&report.closed_after, 1.0).as_secs_f64(),
        report.still_open,
        report.elapsed.as_secs_f64()
    );
    let probes = &report.probes;
    println!(
        "  API server, a fresh connection each second: {} of {} answered 200 ({} 429, {} other, {} no answer)",
        probes.ok, probes.sent, probes.too_many, probes.other, probes.no_answer
    );
    for message in &probes.messages {
        println!("  API server: {message}");
    }
    println!(
        "  every busy connection closed: {}; no API-server lock-out: {}",
        verdict(report.all_closed()),
        verdict(report.api_server_never_locked_out())
    );
    println!();
}

fn print_trickle(report: &TrickleReport, duration: Duration) {
    println!(
        "trickle ({}): {}; bodies of {TRICKLE_CONTENT_LENGTH} bytes sent one byte per {TRICKLE_INTERVAL:?}, for {duration:?}",
        report.mode.name(),
        report.mode.description()
    );
    println!(
        "  trickling: {} connections ({} refused), {} bodies begun, answers {}, {} ended without an answer",
        report.connections,
        report.refused,
        report.requests,
        report
            .answers
            .iter()
            .map(|(status, n)| format!("{status}: {n}"))
            .collect::<Vec<_>>()
            .join(", "),
        report.cut
    );
    let legit = &report.legit;
    println!(
        "  API server, {LEGIT_CLIENTS} keep-alive connections back to back: {} reviews, {} answered 200 \
         ({:.1} %), {} 429, {} other, {} no answer: target >= {ANSWERED_TARGET_PERCENT} % {}",
        legit.sent,
        legit.ok,
        legit.ok_percent(),
        legit.too_many,
        legit.other,
        legit.no_answer,
        verdict(report.answered_enough())
    );
    for message in &legit.messages {
        println!("  API server: {message}");
    }
    println!();
}

fn print_health(report: &HealthReport, wait: Duration) {
    println!(
        "health: {HEALTH_STALLERS} connections from {HEALTH_ABUSER} that send nothing, watched {wait:?} each"
    );
    println!(
        "  refused at once {}, closed later {} (after p50 {:.1}s max {:.1}s), still open {}, no connection {}",
        report.refused,
        report.closed_after.len(),
        quantile(&report.closed_after, 0.5).as_secs_f64(),
        quantile(&report.closed_after, 1.0).as_secs_f64(),
        report.still_open,
        report.connect_failed
    );
    println!(
        "  GET /readyz from 127.0.0.1 meanwhile: {} of {} answered 200",
        report.readyz_ok, report.readyz_tried
    );
    println!(
        "  stalled connections closed: {}; readiness answered: {}",
        verdict(report.all_closed()),
        verdict(report.always_ready())
    );
}

impl Report {
    fn json(&self, args: &Args, final_memory: Option<Memory>) -> Value {
        let memory = &self.memory;
        let shapes: serde_json::Map<String, Value> = ["many_keys", "large_values"]
            .iter()
            .zip(&memory.shapes)
            .map(|(name, s)| {
                (
                    (*name).to_owned(),
                    json!({
                        "answers": s.tally.json(),
                        "peak_mib": s.peak_kib.map(mib),
                        "peak_reset": s.peak_was_reset,
                        "sampled_peak_mib": mib(s.sampled_peak_kib),
                        "rss_after_mib": s.rss_after_kib.map(mib),
                        "seconds": round1(s.elapsed.as_secs_f64()),
                    }),
                )
            })
            .collect();
        let lockout = &self.lockout;
        let trickle: serde_json::Map<String, Value> = self
            .trickle
            .iter()
            .map(|t| {
                (
                    t.mode.name().to_owned(),
                    json!({
                        "connections": t.connections,
                        "refused": t.refused,
                        "bodies": t.requests,
                        "answers": t.answers.iter().map(|(k, v)| (k.to_string(), json!(v))).collect::<serde_json::Map<_, _>>(),
                        "cut": t.cut,
                        "api_server": t.legit.json(),
                        "api_server_ok_percent": t.legit.ok_percent(),
                    }),
                )
            })
            .collect();
        let health = &self.health;
        let targets = json!({
            "memory_under_128_mib": memory.under_target(),
            "busy_connections_closed": lockout.all_closed(),
            "api_server_never_locked_out": lockout.api_server_never_locked_out(),
            "trickle_95_percent_answered": self.trickle.iter().all(TrickleReport::answered_enough),
            "stalled_health_connections_closed": health.all_closed(),
            "readyz_answered": health.always_ready(),
        });
        json!({
            "targets": targets,
            "config": {
                "idle_timeout_s": args.idle_timeout.as_secs_f64(),
                "memory_rounds": memory.rounds,
                "trickle_s": args.trickle_duration.as_secs_f64(),
                "health_wait_s": args.health_wait.as_secs_f64(),
            },
            "memory": {
                "baseline_rss_mib": mib(memory.baseline_rss_kib),
                "shapes": shapes,
                "final_rss_mib": final_memory.map(|m| mib(m.rss_kib)),
                "final_hwm_mib": final_memory.map(|m| mib(m.hwm_kib)),
            },
            "lockout": {
                "accepted": lockout.accepted,
                "refused": lockout.refused,
                "closed_p50_s": round1(quantile(&lockout.closed_after, 0.5).as_secs_f64()),
                "closed_max_s": round1(quantile(&lockout.closed_after, 1.0).as_secs_f64()),
                "never_closed": lockout.still_open,
                "api_server": lockout.probes.json(),
            },
            "trickle": trickle,
            "health": {
                "refused": health.refused,
                "closed_later": health.closed_after.len(),
                "closed_max_s": round1(quantile(&health.closed_after, 1.0).as_secs_f64()),
                "still_open": health.still_open,
                "no_connection": health.connect_failed,
                "readyz_ok": health.readyz_ok,
                "readyz_tried": health.readyz_tried,
            },
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
