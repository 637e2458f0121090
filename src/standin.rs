//! A stand-in for a node's pod, for `local --demo` and the tests (there is no kubelet): an HTTPS
//! server on loopback that answers `/healthz` the way kube-rbac-proxy in front of a healthy
//! sidecar would, with the certificate and key of the node's Secret. Its certificate and answer
//! can be changed while it runs, and it records the bearer token it was sent.

use std::net::{Ipv4Addr, SocketAddr};
use std::sync::atomic::{AtomicU16, Ordering};
use std::sync::{Arc, Mutex};

use anyhow::Context as _;
use axum::extract::State;
use axum::http::{HeaderMap, StatusCode, header};
use axum::routing::get;
use axum_server::Handle;
use axum_server::tls_rustls::RustlsConfig;

struct Shared {
    status: AtomicU16,
    last_token: Mutex<Option<String>>,
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
            last_token: Mutex::new(None),
        });
        let app = axum::Router::new()
            .route("/healthz", get(healthz))
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

    /// The bearer token of the last request, if any.
    pub fn last_token(&self) -> Option<String> {
        self.shared
            .last_token
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

async fn healthz(State(shared): State<Arc<Shared>>, headers: HeaderMap) -> StatusCode {
    let token = headers
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "))
        .map(str::to_owned);
    *shared.last_token.lock().unwrap_or_else(|e| e.into_inner()) = token;
    StatusCode::from_u16(shared.status.load(Ordering::Relaxed))
        .unwrap_or(StatusCode::INTERNAL_SERVER_ERROR)
}
