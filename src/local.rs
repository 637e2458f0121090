//! `seinode-tls local`: the whole system on one machine, a thin command over
//! [`seinode_tls_devcluster`].
//!
//! Starts the one-machine cluster (control plane and, as root, the process kubelet), installs
//! the SeiNode CRD, serves the webhook on loopback and registers it, runs the controller, prints
//! one `ready: export KUBECONFIG=...` line on stdout and runs until SIGINT or SIGTERM, then
//! stops everything and removes its directory. Progress and logs go to stderr. With `--demo`
//! the node's Pod really runs: the real StatefulSet controller makes it, the scheduler binds it
//! and the process kubelet runs kube-rbac-proxy in front of the sidecar stand-in.

use std::collections::BTreeMap;
use std::net::{Ipv4Addr, SocketAddr};
use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context as _;
use futures::StreamExt;
use k8s_openapi::api::core::v1::Pod;
use kube::ResourceExt;
use kube::api::Api;
use kube::runtime::watcher;
use prometheus_client::registry::Registry;
use seinode_tls_controller::config::{SidecarClientFiles, SidecarPlatform};
use seinode_tls_controller::sidecar::SidecarAddresses;
use seinode_tls_controller::{Controller, ControllerConfig};
use seinode_tls_crds::contract::{
    DEFAULT_CLUSTER_DOMAIN, REQUIRED_DNS_NAMES_ANNOTATION, required_dns_names,
};
use seinode_tls_crds::{SIDECAR_TLS_SECRET_READY, SeiNode, SeiNodeSpec, SidecarSpec, SidecarTls};
use seinode_tls_devcluster::cluster::{Cluster, ClusterConfig, RunPods};
use seinode_tls_devcluster::control_plane::{self, ControlPlane};
use seinode_tls_devcluster::network::is_pod_address;
use seinode_tls_webhook::registration::{
    Endpoint, mutating_configuration, validating_configuration,
};
use seinode_tls_webhook::{Webhook, WebhookConfig};

use crate::exit::error_chain;
use crate::serve::shutdown_signal;

/// Namespace and names of the `--demo` objects.
const DEMO_NAMESPACE: &str = "default";
const DEMO_NODE: &str = "demo";
const DEMO_SECRET: &str = "demo-sidecar-tls";

/// Inputs of `local`.
#[derive(Debug, Clone)]
pub struct LocalConfig {
    pub dir: PathBuf,
    pub demo: bool,
}

/// Runs `local` to completion and returns the exit code.
pub fn main(config: LocalConfig) -> ExitCode {
    crate::serve::run_to_exit(run(config))
}

async fn run(config: LocalConfig) -> anyhow::Result<()> {
    // Installed first so a signal during start-up is not lost: it ends the run right after.
    let shutdown = shutdown_signal();

    eprintln!(
        "starting the one-machine cluster (etcd, kube-apiserver, kube-controller-manager, \
         kube-scheduler, process kubelet) in {}",
        config.dir.display()
    );
    let cluster = Cluster::start(ClusterConfig {
        dir: Some(config.dir),
        run_pods: RunPods::IfPossible,
        seinode_tls: std::env::current_exe().ok(),
        ..ClusterConfig::default()
    })
    .await?;
    if let Some(reason) = cluster.no_pods_reason() {
        eprintln!("no process kubelet, so no Pod runs and SeiNodes stay Initializing: {reason}");
    }
    let control_plane = cluster.control_plane();
    let client = control_plane.client().await?;
    eprintln!(
        "API server ready at {}; installing the SeiNode CRD",
        control_plane.server()
    );
    control_plane::install_crd(&client).await?;
    // What the chart grants: kube-rbac-proxy's reviews, and the controller's certificate user
    // the sidecars' task API.
    control_plane::install_sidecar_rbac(&client).await.context(
        "failed to grant the node proxies and the controller's sidecar client their RBAC",
    )?;
    let client_files = control_plane.write_sidecar_client()?;

    let mut registry = crate::serve::registry();
    // The controller dials the Pod IPs the API reports, and only those of the Pod network this
    // process made: nothing else on the host's networks is ever dialed.
    let gateway = cluster.gateway();
    let controller_config = ControllerConfig {
        sidecar_addresses: SidecarAddresses::pod_ips_where(move |ip| {
            gateway.is_some_and(|gateway| is_pod_address(ip, gateway))
        }),
        sidecar_client: Some(SidecarClientFiles {
            cert_file: client_files.cert_file,
            key_file: client_files.key_file,
            ca_file: client_files.ca_file,
        }),
        // seictl refuses to start without them; nothing here reads them.
        sidecar_platform: SidecarPlatform {
            genesis_bucket: "local-genesis".to_owned(),
            genesis_region: "local".to_owned(),
            snapshot_bucket: "local-snapshots".to_owned(),
            snapshot_region: "local".to_owned(),
        },
        ..ControllerConfig::default()
    };
    let controller = Controller::new(controller_config, &mut registry)?;
    let webhook = start_webhook(control_plane, client.clone(), registry).await?;
    let controller = RunningController::start(controller, control_plane.config().await?)?;
    eprintln!("controller running");

    let demo = if config.demo {
        Some(start_demo(control_plane, client.clone()).await?)
    } else {
        None
    };

    println!(
        "ready: export KUBECONFIG={}",
        control_plane.kubeconfig().display()
    );
    shutdown.await;
    eprintln!("shutting down");
    if let Some(demo) = demo {
        demo.abort();
    }
    controller.stop().await;
    webhook.stop().await;
    drop(cluster);
    eprintln!("stopped");
    Ok(())
}

/// A co-process (webhook or controller) running on the current runtime until stopped.
pub struct Stoppable<E> {
    name: &'static str,
    stop: tokio::sync::oneshot::Sender<()>,
    task: tokio::task::JoinHandle<Result<(), E>>,
}

impl<E: std::error::Error + Send + 'static> Stoppable<E> {
    /// Spawns `run`, handing it the future that resolves when [`Stoppable::stop`] is called.
    fn spawn<F>(name: &'static str, run: impl FnOnce(StopSignal) -> F) -> Self
    where
        F: Future<Output = Result<(), E>> + Send + 'static,
    {
        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        let task = tokio::spawn(run(Box::pin(async move {
            let _ = stopped.await;
        })));
        Self { name, stop, task }
    }

    /// Stops it gracefully and waits for it; a failure is reported on stderr.
    pub async fn stop(self) {
        let _ = self.stop.send(());
        match self.task.await {
            Ok(Ok(())) => {}
            Ok(Err(e)) => eprintln!("{}: {}", self.name, error_chain(&e)),
            Err(e) => eprintln!("{} task failed: {e}", self.name),
        }
    }
}

type StopSignal = std::pin::Pin<Box<dyn Future<Output = ()> + Send>>;

/// The in-process controller.
pub type RunningController = Stoppable<seinode_tls_controller::ControllerError>;

impl RunningController {
    /// Runs `controller` against the cluster `config` names, on the current runtime, until
    /// [`Stoppable::stop`]; with leader election its reconciles get a fenced client
    /// ([`crate::api_client::controller_clients`]).
    pub fn start(controller: Controller, config: kube::Config) -> anyhow::Result<Self> {
        let clients = crate::api_client::controller_clients(&controller, config)?;
        Ok(Self::spawn("controller", |stop| {
            controller.run(clients, stop)
        }))
    }
}

/// The in-process webhook: where it listens, and how to stop it.
pub struct RunningWebhook {
    /// Where the admission endpoints are served.
    pub https: SocketAddr,
    /// Where `/healthz`, `/readyz` and `/metrics` are served.
    pub health: SocketAddr,
    task: Stoppable<seinode_tls_webhook::WebhookError>,
}

impl RunningWebhook {
    /// Stops the webhook gracefully and waits for it.
    pub async fn stop(self) {
        self.task.stop().await;
    }
}

/// Serves the webhook on loopback with a certificate from the control plane's CA, waits until
/// its caches have synced, registers it with the API server and waits until the API server
/// calls it.
pub async fn start_webhook(
    control_plane: &ControlPlane,
    client: kube::Client,
    mut registry: Registry,
) -> anyhow::Result<RunningWebhook> {
    let dir = control_plane.dir().join("webhook");
    std::fs::create_dir_all(&dir).with_context(|| format!("failed to create {}", dir.display()))?;
    let serving = control_plane.issue_serving_certificate("seinode-tls-webhook", &["localhost"])?;
    let (cert_file, key_file) = (dir.join("tls.crt"), dir.join("tls.key"));
    std::fs::write(&cert_file, &serving.cert_pem)
        .context("failed to write the webhook certificate")?;
    control_plane::write_private(&key_file, &serving.key_pem)?;

    let loopback = |port| SocketAddr::from((Ipv4Addr::LOCALHOST, port));
    let config = WebhookConfig::new(loopback(0), loopback(0), cert_file, key_file);
    let webhook = Webhook::bind(config, &mut registry)?;
    let (https, health) = (webhook.https_addr(), webhook.health_addr());
    let registry = Arc::new(registry);
    let task = Stoppable::spawn("webhook", |stop| {
        webhook.run(client.clone(), registry, stop)
    });
    let running = RunningWebhook {
        https,
        health,
        task,
    };

    if let Err(e) = wait_until_ready(health).await {
        running.stop().await;
        return Err(e);
    }
    let endpoint = Endpoint::Url(format!("https://{https}"));
    let ca = control_plane.ca().cert_pem();
    let excluded = ["kube-system".to_owned()];
    control_plane::apply(
        &Api::all(client.clone()),
        &validating_configuration(
            &endpoint,
            ca.as_bytes(),
            &excluded,
            &seinode_tls_kube::watch::WatchScope::Cluster,
        ),
    )
    .await
    .context("failed to register the validating webhooks")?;
    control_plane::apply(
        &Api::all(client.clone()),
        &mutating_configuration(
            &endpoint,
            ca.as_bytes(),
            &excluded,
            &seinode_tls_kube::watch::WatchScope::Cluster,
        ),
    )
    .await
    .context("failed to register the mutating webhook")?;
    wait_until_called(client).await?;
    eprintln!(
        "webhook serving on https://{https} (health and metrics: http://{health}/readyz, /metrics)"
    );
    Ok(running)
}

/// Polls the webhook's `/readyz` until it answers 200.
async fn wait_until_ready(health: SocketAddr) -> anyhow::Result<()> {
    const TIMEOUT: Duration = Duration::from_secs(30);
    let deadline = tokio::time::Instant::now() + TIMEOUT;
    loop {
        if http_status(health, "/readyz").await == Some(200) {
            return Ok(());
        }
        if tokio::time::Instant::now() >= deadline {
            anyhow::bail!(
                "the webhook did not become ready within {TIMEOUT:?} (its caches did not sync)"
            );
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// Waits until the API server has picked up the registration: a server-side dry run of a TLS
/// SeiNode comes back with the mutating webhook's annotation.
async fn wait_until_called(client: kube::Client) -> anyhow::Result<()> {
    const TIMEOUT: Duration = Duration::from_secs(30);
    let nodes: Api<SeiNode> = Api::namespaced(client, DEMO_NAMESPACE);
    let probe = demo_node("seinode-tls-registration-probe");
    let params = kube::api::PostParams {
        dry_run: true,
        ..Default::default()
    };
    let deadline = tokio::time::Instant::now() + TIMEOUT;
    loop {
        if let Ok(created) = nodes.create(&params, &probe).await
            && created
                .annotations()
                .contains_key(REQUIRED_DNS_NAMES_ANNOTATION)
        {
            return Ok(());
        }
        if tokio::time::Instant::now() >= deadline {
            anyhow::bail!("the API server did not start calling the webhook within {TIMEOUT:?}");
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// A TLS-enabled full node named `name` in the demo namespace, naming the demo Secret.
fn demo_node(name: &str) -> SeiNode {
    let mut node = SeiNode::new(
        name,
        SeiNodeSpec {
            chain_id: "arctic-1".to_owned(),
            image: "ghcr.io/sei-protocol/sei:v6.3.0".to_owned(),
            sidecar: Some(SidecarSpec {
                tls: Some(SidecarTls {
                    secret_name: DEMO_SECRET.to_owned(),
                }),
                ..SidecarSpec::default()
            }),
            full_node: Some(serde_json::json!({})),
            ..SeiNodeSpec::default()
        },
    );
    node.metadata.namespace = Some(DEMO_NAMESPACE.to_owned());
    node
}

/// The status code of a plain HTTP/1.0 GET, or `None` when the server cannot be reached.
async fn http_status(addr: SocketAddr, path: &str) -> Option<u16> {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut stream = tokio::net::TcpStream::connect(addr).await.ok()?;
    stream
        .write_all(format!("GET {path} HTTP/1.0\r\n\r\n").as_bytes())
        .await
        .ok()?;
    let mut head = [0u8; 12];
    stream.read_exact(&mut head).await.ok()?;
    std::str::from_utf8(&head[9..12]).ok()?.parse().ok()
}

/// Applies an example TLS Secret (issued for the node's contract) and a SeiNode naming it, and
/// prints the progress of the node and of its Pod as they change.
async fn start_demo(
    control_plane: &ControlPlane,
    client: kube::Client,
) -> anyhow::Result<tokio::task::JoinHandle<()>> {
    let names = required_dns_names(DEMO_NODE, DEMO_NAMESPACE, DEFAULT_CLUSTER_DOMAIN);
    let dns: Vec<&str> = names.iter().map(String::as_str).collect();
    let issued = control_plane.issue_serving_certificate(DEMO_NODE, &dns)?;
    let ca = control_plane.ca().cert_pem();
    let secret = seinode_tls_testkit::tls_secret(
        DEMO_NAMESPACE,
        DEMO_SECRET,
        &issued.cert_pem,
        &issued.key_pem,
        Some(&ca),
    );
    control_plane::apply(&Api::namespaced(client.clone(), DEMO_NAMESPACE), &secret)
        .await
        .context("failed to apply the demo Secret")?;
    eprintln!(
        "demo: applied Secret {DEMO_NAMESPACE}/{DEMO_SECRET} with DNS names {}",
        names.join(", ")
    );

    let node = demo_node(DEMO_NODE);
    let nodes: Api<SeiNode> = Api::namespaced(client.clone(), DEMO_NAMESPACE);
    control_plane::apply(&nodes, &node)
        .await
        .context("failed to apply the demo SeiNode")?;
    eprintln!("demo: applied SeiNode {DEMO_NAMESPACE}/{DEMO_NODE}");

    let pods: Api<Pod> = Api::namespaced(client, DEMO_NAMESPACE);
    Ok(tokio::spawn(async move {
        let node_progress = print_changes(nodes, format!("metadata.name={DEMO_NODE}"), describe);
        let pod_progress =
            print_changes(pods, format!("metadata.name={DEMO_NODE}-0"), describe_pod);
        futures::future::join(node_progress, pod_progress).await;
    }))
}

/// Prints `describe(object)` on stderr each time it changes, for the objects `fields` selects.
async fn print_changes<K>(api: Api<K>, fields: String, describe: fn(&K) -> String)
where
    K: kube::Resource + Clone + std::fmt::Debug + serde::de::DeserializeOwned + Send + 'static,
{
    let mut last = String::new();
    let mut events = watcher::watcher(api, watcher::Config::default().fields(&fields)).boxed();
    while let Some(event) = events.next().await {
        if let Ok(watcher::Event::Apply(object) | watcher::Event::InitApply(object)) = event {
            let line = describe(&object);
            if line != last {
                eprintln!("demo: {line}");
                last = line;
            }
        }
    }
}

/// One line on the demo Pod: phase, ready containers and restarts, as `kubectl get pods`.
fn describe_pod(pod: &Pod) -> String {
    let status = pod.status.as_ref();
    let phase = status
        .and_then(|s| s.phase.clone())
        .unwrap_or_else(|| "Pending".to_owned());
    let containers = status
        .and_then(|s| s.container_statuses.clone())
        .unwrap_or_default();
    let total = pod.spec.as_ref().map_or(0, |s| s.containers.len());
    let ready = containers.iter().filter(|c| c.ready).count();
    let restarts: i32 = containers.iter().map(|c| c.restart_count).sum();
    let waiting: BTreeMap<String, String> = containers
        .iter()
        .filter_map(|c| {
            let reason = c.state.as_ref()?.waiting.as_ref()?.reason.clone()?;
            Some((c.name.clone(), reason))
        })
        .collect();
    let ip = status
        .and_then(|s| s.pod_ip.clone())
        .unwrap_or_else(|| "(none yet)".to_owned());
    let waiting = if waiting.is_empty() {
        String::new()
    } else {
        format!(", waiting {waiting:?}")
    };
    format!(
        "Pod {DEMO_NAMESPACE}/{}: {phase}, {ready}/{total} ready, {restarts} restarts, IP {ip}{waiting}",
        pod.name_any()
    )
}

/// One line on a node's progress: phase and TLS condition.
fn describe(node: &SeiNode) -> String {
    let status = node.status.as_ref();
    let phase = status
        .and_then(|s| s.phase)
        .map_or_else(|| "(none yet)".to_owned(), |p| format!("{p:?}"));
    let tls = status
        .and_then(|s| s.conditions.as_ref())
        .and_then(|c| c.iter().find(|c| c.type_ == SIDECAR_TLS_SECRET_READY))
        .map_or_else(
            || "(not reported yet)".to_owned(),
            |c| format!("{} {}", c.status, c.reason),
        );
    let sidecar = status
        .and_then(|s| s.conditions.as_ref())
        .and_then(|c| c.iter().find(|c| c.type_ == "SidecarReady"))
        .map_or_else(
            || "(not probed yet)".to_owned(),
            |c| format!("{} {}", c.status, c.reason),
        );
    format!(
        "SeiNode {DEMO_NAMESPACE}/{DEMO_NODE}: phase {phase}, {SIDECAR_TLS_SECRET_READY} {tls}, SidecarReady {sidecar}"
    )
}
