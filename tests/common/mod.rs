//! Shared set-up for the tests that run against a real kube-apiserver and etcd.
//!
//! One control plane per test binary, started on first use and stopped by its watchdog when the
//! binary exits; one namespace per test.

#![allow(dead_code, clippy::expect_used, clippy::unwrap_used)]

use std::sync::OnceLock;

use k8s_openapi::api::core::v1::Namespace;
use kube::Client;
use kube::api::{Api, ObjectMeta, PostParams};
use seinode_tls::control_plane::{self, ControlPlane, ControlPlaneConfig};
use seinode_tls::offline::error_chain;

static CONTROL_PLANE: OnceLock<ControlPlane> = OnceLock::new();

/// The test binary's control plane, with the SeiNode CRD installed.
pub fn control_plane() -> &'static ControlPlane {
    CONTROL_PLANE.get_or_init(|| {
        // Started on its own thread and runtime: tests call this from inside their runtimes,
        // and the processes outlive whichever runtime started them.
        std::thread::spawn(|| {
            seinode_tls::telemetry::install_crypto_provider();
            let runtime = tokio::runtime::Runtime::new().expect("tokio runtime");
            runtime.block_on(async {
                let cp = ControlPlane::start(ControlPlaneConfig::default())
                    .await
                    .unwrap_or_else(|e| {
                        panic!(
                            "cannot start the test control plane: {}\n\
                         The tests need kube-apiserver, kubectl and etcd: either let \
                         tools/control-plane/build.sh build them (needs Go and the Go module \
                         proxy) or point SEINODE_TLS_CONTROL_PLANE_BIN_DIR at a directory that \
                         holds them.",
                            error_chain(&e)
                        )
                    });
                let client = cp.client().await.expect("client");
                control_plane::install_crd(&client)
                    .await
                    .expect("install the SeiNode CRD");
                cp
            })
        })
        .join()
        .expect("control plane start-up thread")
    })
}

/// A client bound to the calling test's runtime.
pub async fn client() -> Client {
    seinode_tls::telemetry::install_crypto_provider();
    control_plane().client().await.expect("client")
}

/// Creates a fresh namespace for one test and returns its name.
pub async fn namespace(client: &Client, prefix: &str) -> String {
    static COUNTER: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);
    let n = COUNTER.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    let name = format!("{prefix}-{n}-{}", std::process::id());
    let api: Api<Namespace> = Api::all(client.clone());
    let ns = Namespace {
        metadata: ObjectMeta {
            name: Some(name.clone()),
            ..ObjectMeta::default()
        },
        ..Namespace::default()
    };
    api.create(&PostParams::default(), &ns)
        .await
        .expect("create namespace");
    name
}

/// Process ids whose command line mentions `needle` (for leak checks).
pub fn processes_mentioning(needle: &str) -> Vec<u32> {
    let mut pids = Vec::new();
    let Ok(entries) = std::fs::read_dir("/proc") else {
        return pids;
    };
    for entry in entries.flatten() {
        let Ok(pid) = entry.file_name().to_string_lossy().parse::<u32>() else {
            continue;
        };
        if pid == std::process::id() {
            continue;
        }
        if let Ok(cmdline) = std::fs::read(entry.path().join("cmdline"))
            && String::from_utf8_lossy(&cmdline).contains(needle)
        {
            pids.push(pid);
        }
    }
    pids
}

/// Polls `condition` every 100 ms until it holds or `timeout` passes; returns whether it held.
pub fn wait_until(timeout: std::time::Duration, mut condition: impl FnMut() -> bool) -> bool {
    let deadline = std::time::Instant::now() + timeout;
    loop {
        if condition() {
            return true;
        }
        if std::time::Instant::now() >= deadline {
            return false;
        }
        std::thread::sleep(std::time::Duration::from_millis(100));
    }
}

/// A fresh directory under the system temp dir (not created).
pub fn temp_path(prefix: &str) -> std::path::PathBuf {
    static COUNTER: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);
    let n = COUNTER.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    std::env::temp_dir().join(format!("{prefix}-{}-{n}", std::process::id()))
}
