//! Shared set-up for the tests that run against the one-machine cluster: etcd,
//! kube-apiserver, kube-controller-manager, kube-scheduler and the process kubelet, which runs
//! the Pods (so the tests need root, as CI has).
//!
//! One cluster per test binary, started on first use and stopped by its watchdogs when the
//! binary exits; one namespace per test.

#![allow(dead_code, clippy::expect_used, clippy::unwrap_used)]

use std::sync::OnceLock;

use k8s_openapi::api::core::v1::Namespace;
use kube::Client;
use kube::api::{Api, ObjectMeta, PostParams};
use seinode_tls_crds::error_chain;
use seinode_tls_devcluster::cluster::{Cluster, ClusterConfig, RunPods};
use seinode_tls_devcluster::control_plane::{self, ControlPlane};

pub mod chart;
pub mod metrics;

static CLUSTER: OnceLock<Cluster> = OnceLock::new();

/// The test binary's control plane, with the SeiNode CRD installed.
pub fn control_plane() -> &'static ControlPlane {
    cluster().control_plane()
}

/// The test binary's cluster, Pods running, with the SeiNode CRD installed.
pub fn cluster() -> &'static Cluster {
    CLUSTER.get_or_init(|| {
        // Started on its own thread and runtime: tests call this from inside their runtimes,
        // and the processes outlive whichever runtime started them.
        std::thread::spawn(|| {
            seinode_tls::telemetry::install_crypto_provider();
            let runtime = tokio::runtime::Runtime::new().expect("tokio runtime");
            runtime.block_on(async {
                let cluster = Cluster::start(ClusterConfig {
                    run_pods: RunPods::Required,
                    seinode_tls: Some(env!("CARGO_BIN_EXE_seinode-tls").into()),
                    ..ClusterConfig::default()
                })
                .await
                .unwrap_or_else(|e| {
                    panic!(
                        "cannot start the test cluster: {}\n\
                         The tests need the control-plane binaries: either let \
                         tools/control-plane/build.sh build them (needs Go and the Go module \
                         proxy) or point SEINODE_TLS_CONTROL_PLANE_BIN_DIR at a directory that \
                         holds them; and root, for the Pods' network namespaces.",
                        error_chain(&e)
                    )
                });
                let client = cluster.control_plane().client().await.expect("client");
                control_plane::install_crd(&client)
                    .await
                    .expect("install the SeiNode CRD");
                control_plane::install_sidecar_rbac(&client)
                    .await
                    .expect("grant the node proxies and the sidecar client their RBAC");
                cluster
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

/// The admin's client configuration (for clients the code under test builds itself).
pub async fn kube_config() -> kube::Config {
    seinode_tls::telemetry::install_crypto_provider();
    control_plane()
        .config()
        .await
        .expect("client configuration")
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

/// A fresh path in the test cluster's own directory, for files a test hands to a command (a CA
/// bundle for helm, a serving certificate): removed with the cluster, by its watchdog when the
/// test binary exits however it ends, so nothing is left in the temporary directory.
pub fn scratch_path(prefix: &str) -> std::path::PathBuf {
    let scratch = control_plane().dir().join("scratch");
    std::fs::create_dir_all(&scratch).expect("the cluster's scratch directory");
    scratch.join(unique_name(prefix))
}

/// A fresh directory under the system temp dir (not created): for what must outlive or stand
/// apart from the test cluster (another control plane's state directory); the test removes it.
pub fn temp_path(prefix: &str) -> std::path::PathBuf {
    std::env::temp_dir().join(unique_name(prefix))
}

/// `<prefix>-<pid>-<n>`, never the same twice on the machine while this process runs.
fn unique_name(prefix: &str) -> String {
    static COUNTER: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);
    let n = COUNTER.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    format!("{prefix}-{}-{n}", std::process::id())
}

/// The webhook of this test binary, serving and registered with its control plane, running on
/// its own thread and runtime for the life of the binary.
pub fn webhook() -> &'static WebhookAddrs {
    static WEBHOOK: OnceLock<WebhookAddrs> = OnceLock::new();
    WEBHOOK.get_or_init(|| {
        let cp = control_plane();
        let (tx, rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            let runtime = tokio::runtime::Runtime::new().expect("tokio runtime");
            runtime.block_on(async move {
                let client = cp.client().await.expect("client");
                let running = seinode_tls::local::start_webhook(cp, client, Default::default())
                    .await
                    .unwrap_or_else(|e| {
                        panic!("cannot start the webhook: {}", error_chain(e.as_ref()))
                    });
                tx.send(WebhookAddrs {
                    https: running.https,
                    health: running.health,
                })
                .expect("report");
                // Serve until the test binary exits.
                std::future::pending::<()>().await;
                drop(running);
            });
        });
        rx.recv().expect("webhook started")
    })
}

/// Where the test webhook listens.
#[derive(Debug, Clone, Copy)]
pub struct WebhookAddrs {
    pub https: std::net::SocketAddr,
    pub health: std::net::SocketAddr,
}

/// Runs `command` with `stdin` as its input and collects its output.
fn run_with_stdin(command: &mut std::process::Command, stdin: &str) -> std::process::Output {
    use std::io::Write;
    let mut child = command
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap_or_else(|e| panic!("run {command:?}: {e}"));
    child
        .stdin
        .take()
        .expect("stdin")
        .write_all(stdin.as_bytes())
        .expect("write stdin");
    child.wait_with_output().expect("collect output")
}

/// Runs kubectl against the test control plane with `stdin` as its input.
pub fn kubectl(args: &[&str], stdin: &str) -> std::process::Output {
    run_with_stdin(control_plane().kubectl().args(args), stdin)
}

/// Starts this test binary's controller (no leader election) on its own thread and runtime,
/// once; it reconciles for the life of the binary.
pub fn controller() {
    static CONTROLLER: OnceLock<()> = OnceLock::new();
    CONTROLLER.get_or_init(|| spawn_controller(test_controller_config()));
}

/// Runs a controller with `config` on a thread and runtime of its own, through the clients the
/// binaries build, for the life of the test binary; returns once it is built.
pub fn spawn_controller(config: seinode_tls_controller::ControllerConfig) {
    control_plane();
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let runtime = tokio::runtime::Runtime::new().expect("tokio runtime");
        runtime.block_on(async move {
            let mut registry = prometheus_client::registry::Registry::default();
            let controller = seinode_tls_controller::Controller::new(config, &mut registry)
                .expect("controller config");
            let clients =
                seinode_tls::api_client::controller_clients(&controller, kube_config().await)
                    .expect("clients");
            tx.send(()).expect("report");
            controller
                .run(clients, std::future::pending())
                .await
                .expect("controller runs");
        });
    });
    rx.recv().expect("controller started");
}

/// The controller's client certificate for the node proxies in this test binary's cluster
/// (user `seinode-tls:sidecar-client`, from a CA of its own), written once.
pub fn sidecar_client() -> seinode_tls_controller::config::SidecarClientFiles {
    static FILES: OnceLock<seinode_tls_controller::config::SidecarClientFiles> = OnceLock::new();
    FILES
        .get_or_init(|| {
            let paths = control_plane()
                .write_sidecar_client()
                .expect("issue the sidecar client certificate");
            seinode_tls_controller::config::SidecarClientFiles {
                cert_file: paths.cert_file,
                key_file: paths.key_file,
                ca_file: paths.ca_file,
            }
        })
        .clone()
}

/// Only the Pod IPs of this test binary's Pod network: what a test's controller may dial.
pub fn pod_addresses() -> seinode_tls_controller::sidecar::SidecarAddresses {
    let gateway = cluster().gateway();
    seinode_tls_controller::sidecar::SidecarAddresses::pod_ips_where(move |ip| {
        gateway.is_some_and(|gateway| seinode_tls_devcluster::network::is_pod_address(ip, gateway))
    })
}

/// The Pod network as `--sidecar-pod-cidr` takes it (the /24 of the gateway).
pub fn pod_cidr() -> String {
    let gateway = cluster().gateway().expect("the test cluster runs Pods");
    let [a, b, c, _] = gateway.octets();
    format!("{a}.{b}.{c}.0/24")
}

/// The controller configuration the tests use: defaults, with a short expiry warning and
/// short sidecar probes, the sidecar client certificate, and Pod IPs of the test cluster only.
pub fn test_controller_config() -> seinode_tls_controller::ControllerConfig {
    seinode_tls_controller::ControllerConfig {
        cert_expiry_warning: std::time::Duration::from_secs(3600),
        sidecar_probe_timeout: std::time::Duration::from_secs(1),
        sidecar_addresses: pod_addresses(),
        sidecar_client: Some(sidecar_client()),
        sidecar_platform: sidecar_platform(),
        ..Default::default()
    }
}

/// Genesis and snapshot locations for the sidecar (seictl will not start without them; the
/// stand-in checks them as seictl does and never reads them).
pub fn sidecar_platform() -> seinode_tls_controller::config::SidecarPlatform {
    seinode_tls_controller::config::SidecarPlatform {
        genesis_bucket: "test-genesis".to_owned(),
        genesis_region: "local".to_owned(),
        snapshot_bucket: "test-snapshots".to_owned(),
        snapshot_region: "local".to_owned(),
    }
}

/// Waits until the StatefulSet controller reports StatefulSet `name` rolled out and ready:
/// its Pod was scheduled and runs under the process kubelet.
pub async fn wait_stateful_set_ready(client: &Client, ns: &str, name: &str) {
    use k8s_openapi::api::apps::v1::StatefulSet;
    const TIMEOUT: std::time::Duration = std::time::Duration::from_secs(120);
    let api: Api<StatefulSet> = Api::namespaced(client.clone(), ns);
    let (last, ready) = poll(
        TIMEOUT,
        || async { api.get_opt(name).await.ok().flatten() },
        |sts| {
            sts.as_ref()
                .is_some_and(seinode_tls_controller::resources::stateful_set_ready)
        },
    )
    .await;
    if !ready {
        let pods = kubectl(&["get", "pods", "-n", ns, "-o", "wide"], "");
        panic!(
            "StatefulSet {ns}/{name} not ready within {TIMEOUT:?}: {:?}\npods:\n{}{}",
            last.and_then(|s| s.status),
            String::from_utf8_lossy(&pods.stdout),
            String::from_utf8_lossy(&pods.stderr)
        );
    }
}

/// Polls `get` every 50 ms until `check` accepts its value or `timeout` passes; returns the
/// last value and whether it was accepted.
pub async fn poll<T, F, Fut>(
    timeout: std::time::Duration,
    mut get: F,
    check: impl Fn(&T) -> bool,
) -> (T, bool)
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = T>,
{
    let deadline = tokio::time::Instant::now() + timeout;
    loop {
        let value = get().await;
        if check(&value) {
            return (value, true);
        }
        if tokio::time::Instant::now() >= deadline {
            return (value, false);
        }
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    }
}

/// A full node `name` in `ns` without TLS.
pub fn plain_node(ns: &str, name: &str) -> seinode_tls_crds::SeiNode {
    serde_json::from_value(serde_json::json!({
        "apiVersion": "sei.io/v1alpha1", "kind": "SeiNode",
        "metadata": {"name": name, "namespace": ns},
        "spec": {"chainId": "arctic-1", "image": "ghcr.io/sei-protocol/sei:v6.3.0", "fullNode": {}},
    }))
    .unwrap()
}

/// Installs cert-manager's real CRDs (from its Go module, see tools/cert-manager/crds.sh) into
/// the test cluster, once per test binary, and waits until they are Established.
pub fn install_cert_manager_crds() {
    static DONE: OnceLock<()> = OnceLock::new();
    DONE.get_or_init(|| {
        let dir = control_plane::cert_manager_crds()
            .unwrap_or_else(|e| panic!("cannot fetch cert-manager's CRDs: {}", error_chain(&e)));
        let out = control_plane()
            .kubectl()
            .args(["apply", "--server-side", "-f"])
            .arg(&dir)
            .output()
            .expect("run kubectl");
        assert!(
            out.status.success(),
            "installing cert-manager's CRDs: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        for crd in ["certificates.cert-manager.io", "issuers.cert-manager.io"] {
            let out = kubectl(
                &[
                    "wait",
                    "--for=condition=Established",
                    &format!("crd/{crd}"),
                    "--timeout=60s",
                ],
                "",
            );
            assert!(
                out.status.success(),
                "{}",
                String::from_utf8_lossy(&out.stderr)
            );
        }
    });
}

/// `kubectl patch --type=merge` of SeiNode `name` in `ns`.
pub fn patch_seinode(ns: &str, name: &str, merge_patch: &str) -> std::process::Output {
    kubectl(
        &[
            "patch",
            "snode",
            name,
            "-n",
            ns,
            "--type=merge",
            "-p",
            merge_patch,
        ],
        "",
    )
}

/// helm against the test cluster, with its own state directories.
pub fn helm(args: &[&str]) -> std::process::Output {
    let home = std::env::temp_dir().join(format!("helm-home-{}", std::process::id()));
    std::process::Command::new(&control_plane().binaries().helm)
        .args(args)
        .env("KUBECONFIG", control_plane().kubeconfig())
        .env("HELM_CACHE_HOME", home.join("cache"))
        .env("HELM_CONFIG_HOME", home.join("config"))
        .env("HELM_DATA_HOME", home.join("data"))
        .stdin(std::process::Stdio::null())
        .output()
        .expect("run helm")
}

/// The `seinode-tls` binary with `args`, `stdin` as its input.
pub fn seinode_tls(args: &[&str], stdin: &str) -> std::process::Output {
    run_with_stdin(
        std::process::Command::new(env!("CARGO_BIN_EXE_seinode-tls")).args(args),
        stdin,
    )
}

/// The HTTP status of a GET of `url` with `headers`, by curl (certificates not verified: the
/// tests check who answers, not the chain; 5 s at most). "000" when nothing answered.
pub fn http_status(url: &str, headers: &[(String, String)]) -> String {
    let mut curl = std::process::Command::new("curl");
    curl.args([
        "-sk",
        "-o",
        "/dev/null",
        "-w",
        "%{http_code}",
        "--max-time",
        "5",
    ]);
    for (name, value) in headers {
        curl.arg("-H").arg(format!("{name}: {value}"));
    }
    let out = curl.arg(url).output().expect("run curl");
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// The status and reason of the node's `SidecarTLSSecretReady` condition, if it has one.
pub fn tls_reason(node: &seinode_tls_crds::SeiNode) -> Option<(String, String)> {
    node.status
        .as_ref()?
        .conditions
        .as_ref()?
        .iter()
        .find(|c| c.type_ == seinode_tls_crds::SIDECAR_TLS_SECRET_READY)
        .map(|c| (c.status.clone(), c.reason.clone()))
}
