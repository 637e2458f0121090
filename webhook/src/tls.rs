//! The serving certificate: loaded from PEM files, TLS 1.2 and 1.3 only, reloaded when the
//! files change. Kubernetes updates a mounted Secret by swapping a symlink in its directory, so
//! the directories are watched rather than the files. A bad new pair is logged and counted, and
//! the last good one keeps serving.

use std::hash::{DefaultHasher, Hash, Hasher};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use axum_server::tls_rustls::RustlsConfig;
use notify::{RecursiveMode, Watcher};
use rustls::ServerConfig;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use thiserror::Error;
use x509_parser::prelude::FromDer;

use crate::metrics::{ReloadLabels, ReloadResult, WebhookMetrics};

/// How often the files are re-read even without a change notification (a safety net for
/// file systems that do not deliver events).
const POLL_INTERVAL: Duration = Duration::from_secs(30);
/// Settle time after a change notification: a Secret update touches several entries.
const DEBOUNCE: Duration = Duration::from_millis(100);

#[derive(Debug, Error)]
pub enum TlsError {
    #[error("failed to read {}", .path.display())]
    Read {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{} holds no PEM CERTIFICATE", .path.display())]
    NoCertificate { path: PathBuf },
    #[error("{} holds no PEM private key (PKCS#8, PKCS#1 or SEC1)", .path.display())]
    NoKey { path: PathBuf },
    #[error("{} does not hold a parsable X.509 certificate", .path.display())]
    BadCertificate { path: PathBuf },
    #[error("the serving certificate and key are not usable together")]
    Rustls(#[source] rustls::Error),
    #[error("failed to watch {} for certificate changes", .path.display())]
    Watch {
        path: PathBuf,
        #[source]
        source: notify::Error,
    },
}

/// A loaded serving certificate and the axum-server configuration that serves it.
pub struct ServingCertificate {
    cert_file: PathBuf,
    key_file: PathBuf,
    config: RustlsConfig,
    /// Hash of the PEM files last loaded, to skip no-op reloads.
    loaded_hash: AtomicU64,
    /// Hash of the last pair that failed, so a bad pair is reported once, not every poll.
    failed_hash: AtomicU64,
    metrics: Arc<WebhookMetrics>,
}

impl ServingCertificate {
    /// Loads the pair; fails when it is unusable (nothing to serve yet).
    pub fn load(
        cert_file: PathBuf,
        key_file: PathBuf,
        metrics: Arc<WebhookMetrics>,
    ) -> Result<Self, TlsError> {
        let loaded = load_pair(&cert_file, &key_file)?;
        metrics.serving_cert_not_after.set(loaded.not_after);
        Ok(Self {
            cert_file,
            key_file,
            config: RustlsConfig::from_config(loaded.config),
            loaded_hash: AtomicU64::new(loaded.hash),
            failed_hash: AtomicU64::new(0),
            metrics,
        })
    }

    pub fn rustls_config(&self) -> RustlsConfig {
        self.config.clone()
    }

    /// Re-reads the files; swaps the served pair when they changed and are good.
    pub fn reload(&self) {
        let result = match read_pair(&self.cert_file, &self.key_file) {
            // Unchanged, or the same bad pair as last time (already logged and counted).
            Ok((_, _, hash))
                if hash == self.loaded_hash.load(Ordering::Acquire)
                    || hash == self.failed_hash.load(Ordering::Acquire) =>
            {
                return;
            }
            Ok((cert_pem, key_pem, hash)) => {
                match parse_pair(&self.cert_file, &self.key_file, &cert_pem, &key_pem) {
                    Ok((config, not_after)) => {
                        self.config.reload_from_config(config);
                        self.loaded_hash.store(hash, Ordering::Release);
                        self.metrics.serving_cert_not_after.set(not_after);
                        tracing::info!(cert = %self.cert_file.display(), "reloaded the serving certificate");
                        ReloadResult::success
                    }
                    Err(error) => {
                        self.failed_hash.store(hash, Ordering::Release);
                        tracing::error!(
                            error = %seinode_tls_crds::error_chain(&error),
                            "new serving certificate is unusable; keeping the previous one"
                        );
                        ReloadResult::failure
                    }
                }
            }
            Err(error) => {
                tracing::error!(
                    error = %seinode_tls_crds::error_chain(&error),
                    "cannot read the serving certificate; keeping the previous one"
                );
                ReloadResult::failure
            }
        };
        self.metrics
            .serving_cert_reloads
            .get_or_create(&ReloadLabels { result })
            .inc();
    }

    /// Watches the files' directories and reloads on change, until the future is dropped; the
    /// files are also re-read every 30 s. A watch that cannot be set up (inotify instances and
    /// watches are limited per user on a node) or that reports an error is logged and counted
    /// (`webhook_serving_certificate_watch_failures_total`), and the re-reads carry on alone.
    pub async fn watch(self: Arc<Self>) {
        let (tx, rx) = tokio::sync::mpsc::channel::<()>(1);
        let watcher = match self.start_watcher(tx) {
            Ok(watcher) => Some(watcher),
            Err(error) => {
                self.watch_failed(&error);
                None
            }
        };
        self.reload_loop(watcher, rx, POLL_INTERVAL).await;
    }

    fn start_watcher(
        &self,
        tx: tokio::sync::mpsc::Sender<()>,
    ) -> Result<notify::RecommendedWatcher, TlsError> {
        let failures = self.metrics.serving_cert_watch_failures.clone();
        let path = self.cert_file.clone();
        let mut watcher =
            notify::recommended_watcher(move |event: notify::Result<notify::Event>| {
                if let Err(error) = event {
                    failures.inc();
                    tracing::error!(
                        cert = %path.display(),
                        %error,
                        "the serving certificate watch reported an error; the files are still re-read every 30s"
                    );
                }
                // A full channel already holds a pending reload.
                let _ = tx.try_send(());
            })
            .map_err(|source| TlsError::Watch {
                path: self.cert_file.clone(),
                source,
            })?;
        for dir in watched_dirs(&self.cert_file, &self.key_file) {
            watcher
                .watch(&dir, RecursiveMode::NonRecursive)
                .map_err(|source| TlsError::Watch {
                    path: dir.clone(),
                    source,
                })?;
        }
        Ok(watcher)
    }

    fn watch_failed(&self, error: &TlsError) {
        self.metrics.serving_cert_watch_failures.inc();
        tracing::error!(
            error = %seinode_tls_crds::error_chain(error),
            "cannot watch the serving certificate for changes; re-reading it every {}s instead",
            POLL_INTERVAL.as_secs()
        );
    }

    /// Reloads on each notification (debounced) and every `poll_interval`. `watcher` is only
    /// held: dropping it would end the notifications.
    async fn reload_loop(
        &self,
        watcher: Option<notify::RecommendedWatcher>,
        mut rx: tokio::sync::mpsc::Receiver<()>,
        poll_interval: Duration,
    ) {
        let mut poll = tokio::time::interval(poll_interval);
        poll.tick().await;
        loop {
            tokio::select! {
                event = rx.recv(), if watcher.is_some() => {
                    if event.is_none() {
                        return;
                    }
                    tokio::time::sleep(DEBOUNCE).await;
                    while rx.try_recv().is_ok() {}
                }
                _ = poll.tick() => {}
            }
            self.reload();
        }
    }
}

fn watched_dirs(cert: &Path, key: &Path) -> Vec<PathBuf> {
    let dir = |p: &Path| match p.parent() {
        Some(parent) if !parent.as_os_str().is_empty() => parent.to_owned(),
        _ => PathBuf::from("."),
    };
    let mut dirs = vec![dir(cert), dir(key)];
    dirs.dedup();
    dirs
}

struct LoadedPair {
    config: Arc<ServerConfig>,
    not_after: i64,
    hash: u64,
}

fn load_pair(cert_file: &Path, key_file: &Path) -> Result<LoadedPair, TlsError> {
    let (cert_pem, key_pem, hash) = read_pair(cert_file, key_file)?;
    let (config, not_after) = parse_pair(cert_file, key_file, &cert_pem, &key_pem)?;
    Ok(LoadedPair {
        config,
        not_after,
        hash,
    })
}

/// The PEM files and a hash of both.
fn read_pair(cert_file: &Path, key_file: &Path) -> Result<(Vec<u8>, Vec<u8>, u64), TlsError> {
    let read = |path: &Path| {
        std::fs::read(path).map_err(|source| TlsError::Read {
            path: path.to_owned(),
            source,
        })
    };
    let cert_pem = read(cert_file)?;
    let key_pem = read(key_file)?;
    let mut hasher = DefaultHasher::new();
    (&cert_pem, &key_pem).hash(&mut hasher);
    let hash = hasher.finish();
    Ok((cert_pem, key_pem, hash))
}

/// The server configuration and the leaf's notAfter (Unix seconds).
fn parse_pair(
    cert_file: &Path,
    key_file: &Path,
    cert_pem: &[u8],
    key_pem: &[u8],
) -> Result<(Arc<ServerConfig>, i64), TlsError> {
    let chain: Vec<CertificateDer<'static>> = CertificateDer::pem_slice_iter(cert_pem)
        .collect::<Result<_, _>>()
        .map_err(|_| TlsError::NoCertificate {
            path: cert_file.to_owned(),
        })?;
    let Some(leaf) = chain.first() else {
        return Err(TlsError::NoCertificate {
            path: cert_file.to_owned(),
        });
    };
    let not_after = x509_parser::certificate::X509Certificate::from_der(leaf)
        .map(|(_, cert)| cert.validity().not_after.timestamp())
        .map_err(|_| TlsError::BadCertificate {
            path: cert_file.to_owned(),
        })?;
    let key = PrivateKeyDer::from_pem_slice(key_pem).map_err(|_| TlsError::NoKey {
        path: key_file.to_owned(),
    })?;
    Ok((server_config(chain, key)?, not_after))
}

/// TLS 1.2 and 1.3 with the ring provider; HTTP/2 and HTTP/1.1 by ALPN.
pub fn server_config(
    chain: Vec<CertificateDer<'static>>,
    key: PrivateKeyDer<'static>,
) -> Result<Arc<ServerConfig>, TlsError> {
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let mut config = ServerConfig::builder_with_provider(provider)
        .with_protocol_versions(&[&rustls::version::TLS13, &rustls::version::TLS12])
        .map_err(TlsError::Rustls)?
        .with_no_client_auth()
        .with_single_cert(chain, key)
        .map_err(TlsError::Rustls)?;
    config.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
    Ok(Arc::new(config))
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use super::*;

    /// A self-signed pair for `localhost` valid until January 1st of `year`.
    fn pair(year: i32) -> (String, String) {
        let key = rcgen::KeyPair::generate().unwrap();
        let mut params = rcgen::CertificateParams::new(vec!["localhost".to_owned()]).unwrap();
        params.not_after = rcgen::date_time_ymd(year, 1, 1);
        (params.self_signed(&key).unwrap().pem(), key.serialize_pem())
    }

    #[tokio::test]
    async fn without_a_watch_the_failure_is_counted_and_rotation_still_happens_by_re_reading() {
        let dir = std::env::temp_dir().join(format!("seinode-tls-poll-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let (cert_file, key_file) = (dir.join("tls.crt"), dir.join("tls.key"));
        let (cert, key) = pair(2030);
        std::fs::write(&cert_file, cert).unwrap();
        std::fs::write(&key_file, key).unwrap();
        let mut registry = prometheus_client::registry::Registry::default();
        let metrics = Arc::new(WebhookMetrics::register(&mut registry));
        let serving = Arc::new(
            ServingCertificate::load(cert_file.clone(), key_file.clone(), metrics.clone()).unwrap(),
        );
        let first = metrics.serving_cert_not_after.get();

        // As when inotify's per-user limits are used up on the node.
        serving.watch_failed(&TlsError::Watch {
            path: dir.clone(),
            source: notify::Error::generic("inotify watch limit reached"),
        });
        let (_tx, rx) = tokio::sync::mpsc::channel(1);
        let polling = tokio::spawn({
            let serving = serving.clone();
            async move {
                serving
                    .reload_loop(None, rx, Duration::from_millis(50))
                    .await
            }
        });
        let (cert, key) = pair(2031);
        std::fs::write(&key_file, key).unwrap();
        std::fs::write(&cert_file, cert).unwrap();
        let deadline = std::time::Instant::now() + Duration::from_secs(10);
        while metrics.serving_cert_not_after.get() == first {
            assert!(std::time::Instant::now() < deadline, "never re-read");
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        polling.abort();
        assert!(metrics.serving_cert_not_after.get() > first);
        assert_eq!(metrics.serving_cert_watch_failures.get(), 1);
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
