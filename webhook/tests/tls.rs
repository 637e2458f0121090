//! The webhook over a real TLS socket: protocol versions, a real request, certificate rotation
//! under load (the way Kubernetes updates a mounted Secret), a bad rotation, graceful shutdown.

#![allow(clippy::expect_used, clippy::unwrap_used)]

use std::net::{Ipv4Addr, SocketAddr};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use prometheus_client::registry::Registry;
use rcgen::{BasicConstraints, CertificateParams, CertifiedIssuer, DnType, IsCa, KeyPair};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, ServerName};
use seinode_tls_webhook::cache::{NodeCache, SecretCache};
use seinode_tls_webhook::server::{AdmissionState, VALIDATE_SEINODES_PATH};
use seinode_tls_webhook::{Webhook, WebhookConfig};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

const REVIEW: &str = r#"{"apiVersion":"admission.k8s.io/v1","kind":"AdmissionReview","request":{
  "uid":"0d5c2a4e-7d0b-4e36-9d55-1f7c2d7c1a01",
  "kind":{"group":"sei.io","version":"v1alpha1","kind":"SeiNode"},
  "resource":{"group":"sei.io","version":"v1alpha1","resource":"seinodes"},
  "name":"plain","namespace":"sei","operation":"CREATE","userInfo":{"username":"tester"},
  "object":{"apiVersion":"sei.io/v1alpha1","kind":"SeiNode","metadata":{"name":"plain","namespace":"sei"},
            "spec":{"chainId":"arctic-1","image":"sei:v1","fullNode":{}}},
  "oldObject":null,"dryRun":false}}"#;

struct Ca {
    issuer: CertifiedIssuer<'static, KeyPair>,
}

impl Ca {
    fn new() -> Self {
        let mut params = CertificateParams::new(Vec::<String>::new()).unwrap();
        params
            .distinguished_name
            .push(DnType::CommonName, "webhook test CA");
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        Self {
            issuer: CertifiedIssuer::self_signed(params, KeyPair::generate().unwrap()).unwrap(),
        }
    }

    /// A serving certificate for `localhost`; returns (cert PEM, key PEM, leaf DER).
    fn issue(&self, serial: u8) -> (String, String, Vec<u8>) {
        let key = KeyPair::generate().unwrap();
        let mut params = CertificateParams::new(vec!["localhost".to_owned()]).unwrap();
        params
            .distinguished_name
            .push(DnType::CommonName, format!("webhook {serial}"));
        let cert = params.signed_by(&key, &self.issuer).unwrap();
        (cert.pem(), key.serialize_pem(), cert.der().to_vec())
    }

    fn client(
        &self,
        versions: &[&'static rustls::SupportedProtocolVersion],
    ) -> tokio_rustls::TlsConnector {
        tokio_rustls::TlsConnector::from(self.client_config(versions))
    }

    fn client_config(
        &self,
        versions: &[&'static rustls::SupportedProtocolVersion],
    ) -> Arc<rustls::ClientConfig> {
        let mut roots = rustls::RootCertStore::empty();
        roots
            .add(CertificateDer::from_pem_slice(self.issuer.pem().as_bytes()).unwrap())
            .unwrap();
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let config = rustls::ClientConfig::builder_with_provider(provider)
            .with_protocol_versions(versions)
            .unwrap()
            .with_root_certificates(roots)
            .with_no_client_auth();
        Arc::new(config)
    }
}

/// A directory laid out like a mounted Secret: `tls.crt -> ..data/tls.crt`, `..data -> ..<n>`.
/// Updating it swaps the `..data` symlink atomically, as the kubelet does.
struct SecretVolume {
    dir: PathBuf,
    version: usize,
}

impl SecretVolume {
    fn new(cert: &str, key: &str) -> Self {
        static N: AtomicUsize = AtomicUsize::new(0);
        let dir = std::env::temp_dir().join(format!(
            "webhook-tls-{}-{}",
            std::process::id(),
            N.fetch_add(1, Ordering::Relaxed)
        ));
        std::fs::create_dir_all(&dir).unwrap();
        let mut volume = Self { dir, version: 0 };
        volume.update(cert, key);
        std::os::unix::fs::symlink("..data/tls.crt", volume.dir.join("tls.crt")).unwrap();
        std::os::unix::fs::symlink("..data/tls.key", volume.dir.join("tls.key")).unwrap();
        volume
    }

    fn update(&mut self, cert: &str, key: &str) {
        self.version += 1;
        let version_dir = format!("..{}", self.version);
        std::fs::create_dir(self.dir.join(&version_dir)).unwrap();
        std::fs::write(self.dir.join(&version_dir).join("tls.crt"), cert).unwrap();
        std::fs::write(self.dir.join(&version_dir).join("tls.key"), key).unwrap();
        let tmp = self.dir.join("..data_tmp");
        std::os::unix::fs::symlink(&version_dir, &tmp).unwrap();
        std::fs::rename(&tmp, self.dir.join("..data")).unwrap();
        if self.version > 1 {
            std::fs::remove_dir_all(self.dir.join(format!("..{}", self.version - 1))).unwrap();
        }
    }

    fn cert(&self) -> PathBuf {
        self.dir.join("tls.crt")
    }

    fn key(&self) -> PathBuf {
        self.dir.join("tls.key")
    }
}

impl Drop for SecretVolume {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

struct Server {
    addr: SocketAddr,
    registry: Arc<Registry>,
    stop: Option<tokio::sync::oneshot::Sender<()>>,
    task: tokio::task::JoinHandle<Result<(), seinode_tls_webhook::WebhookError>>,
}

fn start(cert: &Path, key: &Path) -> Server {
    start_with(cert, key, |_| {})
}

fn start_with(cert: &Path, key: &Path, configure: impl FnOnce(&mut WebhookConfig)) -> Server {
    let loopback = SocketAddr::from((Ipv4Addr::LOCALHOST, 0));
    let mut config = WebhookConfig::new(loopback, loopback, cert.to_owned(), key.to_owned());
    config.shutdown_grace = Duration::from_secs(5);
    // Generous: the graceful-shutdown test sends half a body, then the rest a moment later.
    config.request_deadline = Duration::from_secs(30);
    configure(&mut config);
    let mut registry = Registry::default();
    let webhook = Webhook::bind(config, &mut registry).expect("bind");
    let addr = webhook.https_addr();
    let client = seinode_tls_testkit::no_api_server();
    let secrets = Arc::new(SecretCache::new(client, webhook.metrics()));
    secrets.mark_synced();
    let nodes = NodeCache::new();
    nodes.mark_synced();
    let state = Arc::new(AdmissionState::from_config(
        webhook.config(),
        secrets,
        nodes,
        webhook.metrics(),
    ));
    let registry = Arc::new(registry);
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let task = tokio::spawn(webhook.serve(
        state,
        registry.clone(),
        std::future::pending(),
        async move {
            let _ = stopped.await;
        },
    ));
    Server {
        addr,
        registry,
        stop: Some(stop),
        task,
    }
}

/// One request on a fresh TLS connection: (HTTP status, response body, served leaf DER).
async fn request(
    connector: &tokio_rustls::TlsConnector,
    addr: SocketAddr,
) -> Result<(u16, String, Vec<u8>), String> {
    let tcp = tokio::net::TcpStream::connect(addr)
        .await
        .map_err(|e| e.to_string())?;
    let mut tls = connector
        .connect(ServerName::try_from("localhost").unwrap(), tcp)
        .await
        .map_err(|e| format!("handshake: {e}"))?;
    let leaf = tls
        .get_ref()
        .1
        .peer_certificates()
        .and_then(|c| c.first())
        .map(|c| c.to_vec())
        .unwrap_or_default();
    let head = format!(
        "POST {VALIDATE_SEINODES_PATH} HTTP/1.1\r\nHost: localhost\r\nContent-Type: application/json\r\n\
         Content-Length: {}\r\nConnection: close\r\n\r\n{REVIEW}",
        REVIEW.len()
    );
    tls.write_all(head.as_bytes())
        .await
        .map_err(|e| e.to_string())?;
    let mut response = Vec::new();
    tls.read_to_end(&mut response)
        .await
        .map_err(|e| e.to_string())?;
    let response = String::from_utf8_lossy(&response).into_owned();
    let status = response
        .get(9..12)
        .and_then(|s| s.parse().ok())
        .ok_or_else(|| format!("no status: {response}"))?;
    let body = response
        .split_once("\r\n\r\n")
        .map(|(_, b)| b.to_owned())
        .unwrap_or_default();
    Ok((status, body, leaf))
}

fn metrics_text(registry: &Registry) -> String {
    let mut text = String::new();
    prometheus_client::encoding::text::encode(&mut text, registry).unwrap();
    text
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn answers_over_tls_1_2_and_1_3() {
    let ca = Ca::new();
    let (cert, key, leaf) = ca.issue(1);
    let volume = SecretVolume::new(&cert, &key);
    let server = start(&volume.cert(), &volume.key());
    for version in [&rustls::version::TLS12, &rustls::version::TLS13] {
        let (status, body, served) = request(&ca.client(&[version]), server.addr)
            .await
            .expect("request");
        assert_eq!(status, 200, "{body}");
        assert!(
            body.contains(r#""uid":"0d5c2a4e-7d0b-4e36-9d55-1f7c2d7c1a01""#),
            "{body}"
        );
        assert!(body.contains(r#""allowed":true"#), "{body}");
        assert_eq!(served, leaf);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rotating_the_certificate_under_load_fails_no_request_and_serves_the_new_one() {
    let ca = Ca::new();
    let (cert_a, key_a, leaf_a) = ca.issue(1);
    let (cert_b, key_b, leaf_b) = ca.issue(2);
    let mut volume = SecretVolume::new(&cert_a, &key_a);
    let server = Arc::new(start(&volume.cert(), &volume.key()));

    // Clients keep sending, each request on a new connection so it sees the current certificate.
    let stop = Arc::new(AtomicBool::new(false));
    let failures = Arc::new(std::sync::Mutex::new(Vec::<String>::new()));
    let served_b = Arc::new(AtomicUsize::new(0));
    let sent = Arc::new(AtomicUsize::new(0));
    let mut clients = Vec::new();
    for _ in 0..4 {
        let (connector, addr) = (
            ca.client(&[&rustls::version::TLS13, &rustls::version::TLS12]),
            server.addr,
        );
        let (stop, failures, served_b, sent, leaf_b) = (
            stop.clone(),
            failures.clone(),
            served_b.clone(),
            sent.clone(),
            leaf_b.clone(),
        );
        clients.push(tokio::spawn(async move {
            // Bounded: at most 20 s or 20 000 requests per client.
            let deadline = Instant::now() + Duration::from_secs(20);
            for _ in 0..20_000 {
                if stop.load(Ordering::Relaxed) || Instant::now() > deadline {
                    break;
                }
                sent.fetch_add(1, Ordering::Relaxed);
                match request(&connector, addr).await {
                    Ok((200, body, leaf)) if body.contains(r#""allowed":true"#) => {
                        if leaf == leaf_b {
                            served_b.fetch_add(1, Ordering::Relaxed);
                        }
                    }
                    Ok((status, body, _)) => {
                        failures.lock().unwrap().push(format!("{status}: {body}"))
                    }
                    Err(e) => failures.lock().unwrap().push(e),
                }
            }
        }));
    }

    let wait = |what: &str, condition: &dyn Fn() -> bool| {
        let deadline = Instant::now() + Duration::from_secs(15);
        while !condition() {
            assert!(Instant::now() < deadline, "timed out waiting for {what}");
            std::thread::sleep(Duration::from_millis(20));
        }
    };
    wait("requests on the first certificate", &|| {
        sent.load(Ordering::Relaxed) > 20
    });
    volume.update(&cert_b, &key_b);
    wait("the new certificate to be served", &|| {
        served_b.load(Ordering::Relaxed) > 20
    });

    // A bad pair (certificate B with key A) is refused; B keeps serving.
    volume.update(&cert_b, &key_a);
    wait("the failed reload to be counted", &|| {
        metrics_text(&server.registry)
            .contains(r#"webhook_serving_certificate_reloads_total{result="failure"} 1"#)
    });
    let before = served_b.load(Ordering::Relaxed);
    wait("more requests after the bad pair", &|| {
        served_b.load(Ordering::Relaxed) > before + 20
    });

    stop.store(true, Ordering::Relaxed);
    for client in clients {
        client.await.unwrap();
    }
    let failures = std::mem::take(&mut *failures.lock().unwrap());
    assert!(
        failures.is_empty(),
        "{} of {} requests failed: {:?}",
        failures.len(),
        sent.load(Ordering::Relaxed),
        &failures[..failures.len().min(5)]
    );
    let (_, _, served) = request(&ca.client(&[&rustls::version::TLS13]), server.addr)
        .await
        .unwrap();
    assert_ne!(served, leaf_a, "the old certificate is no longer served");
    assert_eq!(served, leaf_b);
    let text = metrics_text(&server.registry);
    assert!(
        text.contains(r#"webhook_serving_certificate_reloads_total{result="success"} 1"#),
        "{text}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn graceful_shutdown_finishes_the_request_in_flight_and_refuses_new_connections() {
    let ca = Ca::new();
    let (cert, key, _) = ca.issue(1);
    let volume = SecretVolume::new(&cert, &key);
    let mut server = start(&volume.cert(), &volume.key());
    let connector = ca.client(&[&rustls::version::TLS13]);

    // A request in flight: headers and half of the body sent.
    let tcp = tokio::net::TcpStream::connect(server.addr).await.unwrap();
    let mut tls = connector
        .connect(ServerName::try_from("localhost").unwrap(), tcp)
        .await
        .unwrap();
    let head = format!(
        "POST {VALIDATE_SEINODES_PATH} HTTP/1.1\r\nHost: localhost\r\nContent-Type: application/json\r\n\
         Content-Length: {}\r\nConnection: close\r\n\r\n",
        REVIEW.len()
    );
    let (first, rest) = REVIEW.split_at(REVIEW.len() / 2);
    tls.write_all(head.as_bytes()).await.unwrap();
    tls.write_all(first.as_bytes()).await.unwrap();
    tls.flush().await.unwrap();
    let deadline = Instant::now() + Duration::from_secs(10);
    while !metrics_text(&server.registry).contains("webhook_requests_in_flight 1") {
        assert!(
            Instant::now() < deadline,
            "the request never reached the handler"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }

    server.stop.take().unwrap().send(()).unwrap();
    let deadline = Instant::now() + Duration::from_secs(10);
    while request(&connector, server.addr).await.is_ok() {
        assert!(
            Instant::now() < deadline,
            "still accepting new connections after shutdown"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }

    tls.write_all(rest.as_bytes()).await.unwrap();
    let mut response = Vec::new();
    tls.read_to_end(&mut response).await.unwrap();
    let response = String::from_utf8_lossy(&response);
    assert!(response.starts_with("HTTP/1.1 200"), "{response}");
    assert!(response.contains(r#""allowed":true"#), "{response}");

    let result = tokio::time::timeout(Duration::from_secs(10), server.task)
        .await
        .expect("stops in time");
    assert!(result.unwrap().is_ok());
}

#[test]
fn an_unusable_serving_certificate_is_a_clear_error_at_start() {
    let ca = Ca::new();
    let (cert, _, _) = ca.issue(1);
    let (_, other_key, _) = ca.issue(2);
    let volume = SecretVolume::new(&cert, &other_key);
    let loopback = SocketAddr::from((Ipv4Addr::LOCALHOST, 0));
    let config = WebhookConfig::new(loopback, loopback, volume.cert(), volume.key());
    let err = match Webhook::bind(config, &mut Registry::default()) {
        Ok(_) => panic!("a mismatched pair must not load"),
        Err(e) => seinode_tls_crds::error_chain(&e),
    };
    assert!(
        err.contains("failed to load the serving certificate"),
        "{err}"
    );
    assert!(err.contains("not usable together"), "{err}");
}

type TlsStream = tokio_rustls::client::TlsStream<tokio::net::TcpStream>;

async fn connect(
    connector: &tokio_rustls::TlsConnector,
    addr: SocketAddr,
) -> std::io::Result<TlsStream> {
    let tcp = tokio::net::TcpStream::connect(addr).await?;
    connector
        .connect(ServerName::try_from("localhost").unwrap(), tcp)
        .await
}

/// Holds a connection open, reading whatever comes and, with `trickle`, writing its bytes one
/// every 300 ms (then `a` forever); returns once the server closes the connection.
async fn hold(mut tls: TlsStream, trickle: Option<&'static [u8]>) {
    let mut buf = [0u8; 4096];
    let mut sent = 0;
    loop {
        let read = tokio::time::timeout(Duration::from_millis(300), tls.read(&mut buf)).await;
        if let Ok(Ok(0) | Err(_)) = read {
            return;
        }
        if let Some(bytes) = trickle {
            let byte = bytes.get(sent).copied().unwrap_or(b'a');
            if tls.write_all(&[byte]).await.is_err() || tls.flush().await.is_err() {
                return;
            }
            sent += 1;
        }
    }
}

async fn metric_reaches(registry: &Registry, line: &str) {
    let deadline = Instant::now() + Duration::from_secs(10);
    while !metrics_text(registry).lines().any(|l| l == line) {
        assert!(
            Instant::now() < deadline,
            "no {line:?} in\n{}",
            metrics_text(registry)
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn idle_and_slow_connections_are_closed_while_requests_are_still_answered() {
    let ca = Ca::new();
    let (cert, key, _) = ca.issue(1);
    let volume = SecretVolume::new(&cert, &key);
    let server = start_with(&volume.cert(), &volume.key(), |config| {
        config.idle_timeout = Duration::from_secs(2);
    });
    let connector = ca.client(&[&rustls::version::TLS13, &rustls::version::TLS12]);
    let slow_head: &'static [u8] =
        b"POST /validate/seinodes HTTP/1.1\r\nHost: localhost\r\nX-Padding: ";
    let keep_alive = format!(
        "POST {VALIDATE_SEINODES_PATH} HTTP/1.1\r\nHost: localhost\r\nContent-Type: application/json\r\n\
         Content-Length: {}\r\n\r\n{REVIEW}",
        REVIEW.len()
    );
    let mut held = tokio::task::JoinSet::new();
    for i in 0..40 {
        let mut tls = connect(&connector, server.addr).await.expect("connect");
        match i % 4 {
            // TLS, then nothing: closed by the idle timeout.
            0 => drop(held.spawn(hold(tls, None))),
            // A first request head one byte at a time: closed by the first-request timeout.
            1 => drop(held.spawn(hold(tls, Some(slow_head)))),
            // One request answered on a kept-alive connection, then silence.
            2 => {
                tls.write_all(keep_alive.as_bytes()).await.unwrap();
                drop(held.spawn(hold(tls, None)));
            }
            // One request, then the next head one byte at a time: the head timeout.
            _ => {
                tls.write_all(keep_alive.as_bytes()).await.unwrap();
                drop(held.spawn(hold(tls, Some(slow_head))));
            }
        }
    }
    // HTTP/2 has no head timeout: after one request, only the idle timeout closes these.
    let mut h2_config = (*ca.client_config(&[&rustls::version::TLS13])).clone();
    h2_config.alpn_protocols = vec![b"h2".to_vec()];
    let h2_connector = tokio_rustls::TlsConnector::from(Arc::new(h2_config));
    for _ in 0..5 {
        let tls = connect(&h2_connector, server.addr).await.expect("connect");
        let (mut sender, connection) = hyper::client::conn::http2::handshake(
            hyper_util::rt::TokioExecutor::new(),
            hyper_util::rt::TokioIo::new(tls),
        )
        .await
        .expect("h2 handshake");
        let running = tokio::spawn(connection);
        let request = hyper::Request::post(VALIDATE_SEINODES_PATH)
            .header("content-type", "application/json")
            .body(http_body_util::Full::new(axum::body::Bytes::from_static(
                REVIEW.as_bytes(),
            )))
            .unwrap();
        let response = sender.send_request(request).await.expect("h2 request");
        assert_eq!(response.status(), 200);
        drop(held.spawn(async move {
            let _sender = sender;
            let _ = running.await;
        }));
    }
    metric_reaches(&server.registry, "webhook_connections_open 45").await;

    // Held connections take nothing from the API server's requests.
    for _ in 0..5 {
        let (status, body, _) = request(&connector, server.addr).await.expect("request");
        assert_eq!(status, 200, "{body}");
    }

    // Every held connection is closed by the server (the first-request timeout is 10 s).
    let all_closed = tokio::time::timeout(Duration::from_secs(30), async {
        while held.join_next().await.is_some() {}
    })
    .await;
    assert!(
        all_closed.is_ok(),
        "{} connections still open after 30 s\n{}",
        held.len(),
        metrics_text(&server.registry)
    );
    metric_reaches(&server.registry, "webhook_connections_open 0").await;
    let text = metrics_text(&server.registry);
    let idle_closed: u64 = text
        .lines()
        .find_map(|l| l.strip_prefix("webhook_connections_idle_closed_total "))
        .and_then(|v| v.parse().ok())
        .unwrap_or(0);
    // The HTTP/2 ones at least (HTTP/1 ones may meet the head timeout first).
    assert!(idle_closed >= 5, "{text}");
    let (status, body, _) = request(&connector, server.addr).await.expect("request");
    assert_eq!(status, 200, "{body}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connections_over_the_cap_are_closed_on_accept_until_one_is_freed() {
    let ca = Ca::new();
    let (cert, key, _) = ca.issue(1);
    let volume = SecretVolume::new(&cert, &key);
    let server = start_with(&volume.cert(), &volume.key(), |config| {
        config.max_connections = 4;
    });
    let connector = ca.client(&[&rustls::version::TLS13, &rustls::version::TLS12]);
    let mut open = Vec::new();
    for _ in 0..4 {
        open.push(connect(&connector, server.addr).await.expect("connect"));
    }
    metric_reaches(&server.registry, "webhook_connections_open 4").await;
    let refused = request(&connector, server.addr).await;
    assert!(refused.is_err(), "answered over the cap: {refused:?}");
    metric_reaches(&server.registry, "webhook_connections_refused_total 1").await;

    // Closing one frees its slot.
    drop(open.pop());
    metric_reaches(&server.registry, "webhook_connections_open 3").await;
    let (status, body, _) = request(&connector, server.addr).await.expect("request");
    assert_eq!(status, 200, "{body}");
}

// === What keeps a connection ===

type H2Sender = hyper::client::conn::http2::SendRequest<http_body_util::Full<axum::body::Bytes>>;

/// An HTTP/2 connection from `source`, its requests' sender, and a task that ends when the
/// server closes it. With `pings`, the client PINGs the server at that interval, idle or not.
async fn h2_connection(
    ca: &Ca,
    addr: SocketAddr,
    pings: Option<Duration>,
) -> (H2Sender, tokio::task::JoinHandle<()>) {
    let mut config = (*ca.client_config(&[&rustls::version::TLS13])).clone();
    config.alpn_protocols = vec![b"h2".to_vec()];
    let tls = connect(&tokio_rustls::TlsConnector::from(Arc::new(config)), addr)
        .await
        .expect("connect");
    let mut builder =
        hyper::client::conn::http2::Builder::new(hyper_util::rt::TokioExecutor::new());
    builder.timer(hyper_util::rt::TokioTimer::new());
    if let Some(interval) = pings {
        builder
            .keep_alive_interval(interval)
            .keep_alive_while_idle(true)
            .keep_alive_timeout(Duration::from_secs(20));
    }
    let (sender, connection) = builder
        .handshake(hyper_util::rt::TokioIo::new(tls))
        .await
        .expect("h2 handshake");
    let running = tokio::spawn(async move {
        let _ = connection.await;
    });
    (sender, running)
}

async fn h2_post(sender: &mut H2Sender, path: &str) -> Result<u16, hyper::Error> {
    sender.ready().await?;
    let request = hyper::Request::post(path)
        .header("content-type", "application/json")
        .body(http_body_util::Full::new(axum::body::Bytes::from_static(
            REVIEW.as_bytes(),
        )))
        .unwrap();
    Ok(sender.send_request(request).await?.status().as_u16())
}

/// Whether `connection` ends within `within`.
async fn ends_within(connection: &mut tokio::task::JoinHandle<()>, within: Duration) -> bool {
    tokio::time::timeout(within, connection).await.is_ok()
}

/// Only admission reviews keep a connection: one kept busy by HTTP/2 PINGs, or by requests to
/// other paths (HTTP/1 or HTTP/2), is closed once the idle timeout passes, while one that
/// carries reviews stays open.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn only_admission_reviews_keep_a_connection_open() {
    let ca = Ca::new();
    let (cert, key, _) = ca.issue(1);
    let volume = SecretVolume::new(&cert, &key);
    let server = start_with(&volume.cert(), &volume.key(), |config| {
        config.idle_timeout = Duration::from_secs(2);
    });
    let connector = ca.client(&[&rustls::version::TLS13]);

    // HTTP/2: one review, then PINGs every 200 ms.
    let (mut pinging, mut pinging_open) =
        h2_connection(&ca, server.addr, Some(Duration::from_millis(200))).await;
    assert_eq!(
        h2_post(&mut pinging, VALIDATE_SEINODES_PATH).await.unwrap(),
        200
    );
    // HTTP/2: a request to another path every 200 ms.
    let (mut elsewhere, mut elsewhere_open) = h2_connection(&ca, server.addr, None).await;
    let other_path = tokio::spawn(async move {
        while h2_post(&mut elsewhere, "/").await.is_ok() {
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    });
    // HTTP/1.1: `GET /` every 200 ms on one kept-alive connection.
    let mut cheap = connect(&connector, server.addr).await.expect("connect");
    let cheap_closed = tokio::spawn(async move {
        let mut buf = vec![0u8; 4096];
        loop {
            if cheap
                .write_all(b"GET / HTTP/1.1\r\nHost: localhost\r\n\r\n")
                .await
                .is_err()
            {
                return;
            }
            match tokio::time::timeout(Duration::from_secs(5), cheap.read(&mut buf)).await {
                Ok(Ok(0) | Err(_)) => return,
                Ok(Ok(_)) => tokio::time::sleep(Duration::from_millis(200)).await,
                Err(_) => panic!("no answer within 5 s"),
            }
        }
    });
    // HTTP/2: a review every 200 ms.
    let (mut reviewing, mut reviewing_open) = h2_connection(&ca, server.addr, None).await;
    let reviews = tokio::spawn(async move {
        let mut answered = 0;
        let until = Instant::now() + Duration::from_secs(5);
        while Instant::now() < until {
            assert_eq!(
                h2_post(&mut reviewing, VALIDATE_SEINODES_PATH)
                    .await
                    .unwrap(),
                200
            );
            answered += 1;
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
        (answered, reviewing)
    });

    // The idle timeout is 2 s: the three kept busy by other traffic are closed by 5 s.
    assert!(
        ends_within(&mut pinging_open, Duration::from_secs(5)).await,
        "PINGs kept an HTTP/2 connection open"
    );
    assert!(
        ends_within(&mut elsewhere_open, Duration::from_secs(5)).await,
        "requests to another path kept an HTTP/2 connection open"
    );
    tokio::time::timeout(Duration::from_secs(5), cheap_closed)
        .await
        .expect("GET / kept an HTTP/1.1 connection open")
        .unwrap();
    other_path.await.unwrap();
    // The one carrying reviews was answered every time and is still open.
    let (answered, _sender) = reviews.await.unwrap();
    assert!(answered >= 10, "{answered}");
    assert!(
        !ends_within(&mut reviewing_open, Duration::from_millis(100)).await,
        "a connection carrying reviews was closed"
    );
    let text = metrics_text(&server.registry);
    let idle_closed: u64 = text
        .lines()
        .find_map(|l| l.strip_prefix("webhook_connections_idle_closed_total "))
        .and_then(|v| v.parse().ok())
        .unwrap_or(0);
    assert!(idle_closed >= 3, "{text}");
}

/// Every connection reaches its maximum age, however busy: HTTP/2 gets a GOAWAY, HTTP/1.1 a
/// `Connection: close` on its next response; no review on either fails.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn busy_connections_are_closed_gracefully_at_their_maximum_age() {
    let ca = Ca::new();
    let (cert, key, _) = ca.issue(1);
    let volume = SecretVolume::new(&cert, &key);
    let server = start_with(&volume.cert(), &volume.key(), |config| {
        config.max_connection_age = Duration::from_secs(1);
    });

    let (mut sender, mut open) = h2_connection(&ca, server.addr, None).await;
    let started = Instant::now();
    let mut answered = 0;
    while !open.is_finished() && started.elapsed() < Duration::from_secs(5) {
        match h2_post(&mut sender, VALIDATE_SEINODES_PATH).await {
            Ok(status) => {
                assert_eq!(status, 200);
                answered += 1;
            }
            // A request the client began as the GOAWAY arrived is refused before the server read
            // it (a client retries those); only that one may fail.
            Err(_) => break,
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(
        ends_within(&mut open, Duration::from_secs(3)).await,
        "an HTTP/2 connection outlived its maximum age"
    );
    assert!(answered >= 5, "{answered}");

    let connector = ca.client(&[&rustls::version::TLS13]);
    let mut tls = connect(&connector, server.addr).await.expect("connect");
    let request = format!(
        "POST {VALIDATE_SEINODES_PATH} HTTP/1.1\r\nHost: localhost\r\nContent-Type: application/json\r\n\
         Content-Length: {}\r\n\r\n{REVIEW}",
        REVIEW.len()
    );
    let started = Instant::now();
    let mut read = Vec::new();
    let closed_by_server = loop {
        assert!(
            started.elapsed() < Duration::from_secs(5),
            "an HTTP/1.1 connection outlived its maximum age"
        );
        tls.write_all(request.as_bytes()).await.unwrap();
        let mut buf = vec![0u8; 8192];
        let n = tls.read(&mut buf).await.unwrap();
        read.extend_from_slice(&buf[..n]);
        let answer = String::from_utf8_lossy(&buf[..n]).to_lowercase();
        assert!(answer.starts_with("http/1.1 200"), "{answer}");
        if answer.contains("connection: close") {
            break tls.read(&mut buf).await.map(|n| n == 0).unwrap_or(true);
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    assert!(
        closed_by_server,
        "the server kept the connection after Connection: close"
    );
}

/// One address holds at most its share of the connections: over it, a new connection from
/// there is closed at once, while another address is still served.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_source_address_cannot_take_every_connection() {
    let ca = Ca::new();
    let (cert, key, _) = ca.issue(1);
    let volume = SecretVolume::new(&cert, &key);
    let server = start_with(&volume.cert(), &volume.key(), |config| {
        config.max_connections_per_source = 3;
    });
    let connector = ca.client(&[&rustls::version::TLS13]);
    let from = |source: Ipv4Addr| {
        let connector = connector.clone();
        let addr = server.addr;
        async move {
            let socket = tokio::net::TcpSocket::new_v4()?;
            socket.bind(SocketAddr::from((source, 0)))?;
            let tcp = socket.connect(addr).await?;
            connector
                .connect(ServerName::try_from("localhost").unwrap(), tcp)
                .await
        }
    };
    let tenant = Ipv4Addr::new(127, 0, 0, 2);
    let mut held = Vec::new();
    for _ in 0..3 {
        held.push(from(tenant).await.expect("within the share"));
    }
    metric_reaches(&server.registry, "webhook_connections_open 3").await;
    // A fourth from the same address is closed before or during its handshake.
    let fourth = async {
        let mut tls = from(tenant).await?;
        tls.write_all(b"GET / HTTP/1.1\r\nHost: localhost\r\n\r\n")
            .await?;
        let mut buf = [0u8; 64];
        match tls.read(&mut buf).await? {
            0 => Err(std::io::Error::other("closed")),
            _ => Ok(()),
        }
    };
    assert!(
        fourth.await.is_err(),
        "a fourth connection from one address was served"
    );
    metric_reaches(&server.registry, "webhook_connections_refused_total 1").await;
    // Another address is served.
    let (status, body, _) = request(&connector, server.addr).await.expect("request");
    assert_eq!(status, 200, "{body}");
}
