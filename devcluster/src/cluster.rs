//! The whole one-machine cluster: the control plane and, where this process may make network
//! namespaces (root), the Pod network and a process kubelet that runs Pods.
//!
//! The kubelet and the API server's forwarder into the Pod network are async tasks; they run on
//! a runtime of their own on a dedicated thread, so a `Cluster` outlives the runtime that
//! started it, like the control plane's child processes (the tests keep one per test binary).

use std::net::{Ipv4Addr, SocketAddr};
use std::path::{Path, PathBuf};
use std::sync::Arc;

use thiserror::Error;

use crate::control_plane::{self, Binaries, ControlPlane, ControlPlaneConfig, ControlPlaneError};
use crate::kubelet::{Image, ImageFile, Images, Kubelet, KubeletConfig, KubeletError};
use crate::network::{NetworkError, PodNetwork};
use crate::watchdog::Watchdog;

/// Name of the process kubelet's Node.
pub const NODE_NAME: &str = "devcluster";
/// Repository of the project's image (the chart's `image.repository`).
pub const PROJECT_IMAGE: &str = "ghcr.io/sei-protocol/seinode-tls";
/// Repository of seid, the node's main container.
pub const SEID_IMAGE: &str = "ghcr.io/sei-protocol/sei";
/// Repository of the Sei sidecar (seictl).
pub const SIDECAR_IMAGE: &str = "ghcr.io/sei-protocol/seictl";
/// Repository of kube-rbac-proxy.
pub const RBAC_PROXY_IMAGE: &str = "quay.io/brancz/kube-rbac-proxy";
/// Set in the containers of the images this cluster maps to its stand-ins: the stand-in commands
/// refuse to run in a Pod without it (a real cluster's).
pub const DEVCLUSTER_POD_ENV: &str = "SEINODE_TLS_DEVCLUSTER_POD";
/// How long the kubelet gets to stop its Pods gracefully at shutdown.
const STOP_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(45);
/// UID and GID the distroless and kube-rbac-proxy images run as.
const NONROOT: (u32, u32) = (65532, 65532);
/// Where images keep their binaries (`PATH` holds it).
const IMAGE_BIN: &str = "/usr/local/bin";

#[derive(Debug, Error)]
pub enum ClusterError {
    #[error(transparent)]
    ControlPlane(#[from] ControlPlaneError),
    #[error("failed to set up the Pod network")]
    Network(#[from] NetworkError),
    #[error("failed to start the process kubelet")]
    Kubelet(#[from] KubeletError),
    #[error("failed to forward {listen} to the API server")]
    Forwarder {
        listen: SocketAddr,
        #[source]
        source: std::io::Error,
    },
    #[error("failed to start the Pods' runtime thread")]
    Runtime(#[source] std::io::Error),
}

/// Whether the cluster runs Pods.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum RunPods {
    /// Run them when this process may (root), else run without the kubelet.
    #[default]
    IfPossible,
    /// Fail to start when Pods cannot run (the tests).
    Required,
    /// Never run them.
    Never,
}

/// How to start a [`Cluster`].
#[derive(Debug, Clone, Default)]
pub struct ClusterConfig {
    /// State directory; a fresh temporary directory when `None`. Removed on drop either way.
    pub dir: Option<PathBuf>,
    /// The executables; located (and built if needed) when `None`.
    pub binaries: Option<Binaries>,
    /// Whether to run Pods.
    pub run_pods: RunPods,
    /// The `seinode-tls` executable the project's and the Sei images map to (the stand-ins
    /// are its hidden `stand-in` command); without it those images cannot run.
    pub seinode_tls: Option<PathBuf>,
}

/// A running cluster. Stops Pods, then the control plane, then removes the network on drop.
pub struct Cluster {
    pods: Option<PodHost>,
    /// Why Pods do not run, when they do not.
    no_pods: Option<String>,
    // Dropped in this order (see `Drop`): keep the watchdog last.
    control_plane: ControlPlane,
    network: Option<Arc<PodNetwork>>,
    // Held for its drop: it stands by until the rest has cleaned up.
    _watchdog: Option<Watchdog>,
}

impl std::fmt::Debug for Cluster {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Cluster")
            .field("control_plane", &self.control_plane)
            .field("pods", &self.pods.is_some())
            .finish_non_exhaustive()
    }
}

impl Cluster {
    /// Starts the control plane and, as [`ClusterConfig::run_pods`] says, the Pod network and
    /// the process kubelet; returns once the kubelet's Node is registered.
    pub async fn start(config: ClusterConfig) -> Result<Self, ClusterError> {
        let binaries = match config.binaries {
            Some(binaries) => binaries,
            None => tokio::task::block_in_place(Binaries::locate)?,
        };
        let (network, no_pods) = match config.run_pods {
            RunPods::Never => (None, Some("Pods are turned off".to_owned())),
            RunPods::Required => (Some(Arc::new(PodNetwork::create()?)), None),
            RunPods::IfPossible => match PodNetwork::create() {
                Ok(network) => (Some(Arc::new(network)), None),
                Err(e) => (None, Some(e.to_string())),
            },
        };
        let mut watchdog = None;
        if let Some(network) = &network {
            // It holds the range's lock until it is done, so no new cluster claims the range
            // while it still cleans up after a dead owner.
            watchdog = Watchdog::spawn(network.lock().ok());
            if let Some(w) = watchdog.as_mut() {
                w.watch_network(network.index());
            }
        }
        let control_plane = ControlPlane::start(ControlPlaneConfig {
            dir: config.dir,
            binaries: Some(binaries.clone()),
            advertise_address: network.as_ref().map(|n| n.gateway()),
            service_cluster_ip_range: network.as_ref().map(|n| n.service_range()),
        })
        .await?;
        let mut cluster = Self {
            pods: None,
            no_pods,
            control_plane,
            network,
            _watchdog: watchdog,
        };
        if let Some(network) = cluster.network.clone() {
            let images = images(&binaries, config.seinode_tls.as_deref());
            let kubelet_config = KubeletConfig {
                node_name: NODE_NAME.to_owned(),
                dir: cluster.control_plane.dir().join("kubelet"),
                images,
                apiserver_host: network.gateway(),
                apiserver_port: cluster.control_plane.port(),
                cluster_domain: seinode_tls_crds::contract::DEFAULT_CLUSTER_DOMAIN.to_owned(),
                crash_loop_base: std::time::Duration::from_secs(10),
            };
            cluster.pods = Some(
                PodHost::start(
                    cluster.control_plane.kubeconfig().to_owned(),
                    network,
                    kubelet_config,
                )
                .await?,
            );
        }
        Ok(cluster)
    }

    pub fn control_plane(&self) -> &ControlPlane {
        &self.control_plane
    }

    /// Whether Pods run here.
    pub fn runs_pods(&self) -> bool {
        self.pods.is_some()
    }

    /// Why Pods do not run, when they do not (one line for the user).
    pub fn no_pods_reason(&self) -> Option<&str> {
        self.no_pods.as_deref()
    }

    /// The address a cluster DNS name (`<pod>.<svc>.<ns>.svc.<domain>`, `<svc>.<ns>.svc...`)
    /// resolves to inside Pods; `None` without Pods or for an unknown name.
    pub fn resolve(&self, host: &str) -> Option<Ipv4Addr> {
        self.pods.as_ref()?.kubelet.as_ref()?.resolve(host)
    }

    /// The Pod network's gateway: where Pods reach the host and the API server.
    /// The log file of `container` in `pod` (what `kubectl logs` shows), if this cluster runs
    /// Pods.
    pub fn container_log(
        &self,
        pod: &k8s_openapi::api::core::v1::Pod,
        container: &str,
    ) -> Option<PathBuf> {
        self.network.as_ref()?;
        Some(
            self.control_plane
                .dir()
                .join("kubelet")
                .join("pods")
                .join(crate::kubelet::pod_dir_name(pod))
                .join(format!("{container}.log")),
        )
    }

    pub fn gateway(&self) -> Option<Ipv4Addr> {
        self.network.as_ref().map(|n| n.gateway())
    }
}

impl Drop for Cluster {
    /// Pods first, while the API server still answers; then, as the fields drop in order, the
    /// control plane, the network, and last the watchdog, which stands by until all is done.
    fn drop(&mut self) {
        if let Some(pods) = self.pods.take() {
            pods.stop();
        }
    }
}

/// The image table: the project's image and the Sei images map to `seinode_tls` (the Sei
/// images to its stand-ins), kube-rbac-proxy to the binary built from its Go module.
pub fn images(binaries: &Binaries, seinode_tls: Option<&Path>) -> Images {
    let bin = |name: &str| format!("{IMAGE_BIN}/{name}");
    let path = vec![(
        "PATH".to_owned(),
        "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin".to_owned(),
    )];
    let mut images = Images::new();
    images.insert(
        RBAC_PROXY_IMAGE,
        Image {
            entrypoint: vec![bin("kube-rbac-proxy")],
            user: NONROOT,
            env: path.clone(),
            files: vec![(
                bin("kube-rbac-proxy"),
                ImageFile::Host(binaries.kube_rbac_proxy.clone()),
            )],
        },
    );
    let mut stand_in_env = path.clone();
    stand_in_env.push((DEVCLUSTER_POD_ENV.to_owned(), "1".to_owned()));
    if let Some(exe) = seinode_tls {
        let binary = (bin("seinode-tls"), ImageFile::Host(exe.to_owned()));
        images.insert(
            PROJECT_IMAGE,
            Image {
                entrypoint: vec![bin("seinode-tls")],
                user: NONROOT,
                env: path.clone(),
                files: vec![binary.clone()],
            },
        );
        images.insert(
            SEID_IMAGE,
            Image {
                entrypoint: vec![bin("seid")],
                user: (0, 0),
                env: stand_in_env.clone(),
                files: vec![
                    binary.clone(),
                    (
                        bin("seid"),
                        ImageFile::Script(format!(
                            "#!/bin/sh\nexec {} stand-in seid -- \"$@\"\n",
                            bin("seinode-tls")
                        )),
                    ),
                ],
            },
        );
        // The pod runs `seictl serve` (its `command`); the entrypoint serves a container that
        // names none. Root, as seictl's distroless image; the pod sets its own user.
        images.insert(
            SIDECAR_IMAGE,
            Image {
                entrypoint: vec![bin("seinode-tls"), "stand-in".into(), "sidecar".into()],
                user: (0, 0),
                env: stand_in_env,
                files: vec![
                    binary,
                    (
                        bin("seictl"),
                        ImageFile::Script(format!(
                            "#!/bin/sh\nexec {} stand-in sidecar \"$@\"\n",
                            bin("seinode-tls")
                        )),
                    ),
                ],
            },
        );
    }
    images
}

// === Pod host ===

/// The kubelet and the API server forwarder, on their own runtime thread.
struct PodHost {
    /// Shared with the runtime thread, which stops the kubelet once this is dropped.
    kubelet: Option<Arc<Kubelet>>,
    stop: tokio::sync::oneshot::Sender<()>,
    thread: std::thread::JoinHandle<()>,
}

impl PodHost {
    async fn start(
        kubeconfig: PathBuf,
        network: Arc<PodNetwork>,
        config: KubeletConfig,
    ) -> Result<Self, ClusterError> {
        let (started_tx, started_rx) = tokio::sync::oneshot::channel();
        let (stop_tx, stop_rx) = tokio::sync::oneshot::channel::<()>();
        let thread = std::thread::Builder::new()
            .name("devcluster-pods".to_owned())
            .spawn(move || {
                let runtime = match tokio::runtime::Builder::new_multi_thread()
                    .worker_threads(2)
                    .enable_all()
                    .build()
                {
                    Ok(runtime) => runtime,
                    Err(e) => {
                        let _ = started_tx.send(Err(ClusterError::Runtime(e)));
                        return;
                    }
                };
                runtime.block_on(run_pod_host(
                    kubeconfig, network, config, started_tx, stop_rx,
                ));
            })
            .map_err(ClusterError::Runtime)?;
        match started_rx.await {
            Ok(Ok(kubelet)) => Ok(Self {
                kubelet: Some(kubelet),
                stop: stop_tx,
                thread,
            }),
            Ok(Err(e)) => {
                let _ = thread.join();
                Err(e)
            }
            Err(_) => {
                let _ = thread.join();
                Err(ClusterError::Runtime(std::io::Error::other(
                    "the Pods' runtime thread ended during start-up",
                )))
            }
        }
    }

    /// Stops every Pod and the forwarder, and waits for it.
    fn stop(mut self) {
        self.kubelet.take();
        let _ = self.stop.send(());
        let _ = self.thread.join();
    }
}

type Started = tokio::sync::oneshot::Sender<Result<Arc<Kubelet>, ClusterError>>;

/// The Pods' runtime: forwards the gateway's API server port to loopback, runs the kubelet
/// until told to stop, then stops it.
async fn run_pod_host(
    kubeconfig: PathBuf,
    network: Arc<PodNetwork>,
    config: KubeletConfig,
    started: Started,
    stop: tokio::sync::oneshot::Receiver<()>,
) {
    let listen = SocketAddr::from((network.gateway(), config.apiserver_port));
    let upstream = SocketAddr::from((Ipv4Addr::LOCALHOST, config.apiserver_port));
    let forwarder = match tokio::net::TcpListener::bind(listen).await {
        Ok(listener) => tokio::spawn(forward(listener, upstream)),
        Err(source) => {
            let _ = started.send(Err(ClusterError::Forwarder { listen, source }));
            return;
        }
    };
    let kubelet = async {
        let client = control_plane::client_from_kubeconfig(&kubeconfig).await?;
        Ok::<_, ClusterError>(Kubelet::start(client, network, config).await?)
    };
    match kubelet.await {
        Ok(kubelet) => {
            let kubelet = Arc::new(kubelet);
            let _ = started.send(Ok(kubelet.clone()));
            let _ = stop.await;
            // The owner dropped its handle before sending stop.
            // Bounded: an API server that is gone must not hang the owner; dropping the kubelet
            // still kills every container.
            match Arc::try_unwrap(kubelet) {
                Ok(kubelet) => {
                    if tokio::time::timeout(STOP_TIMEOUT, kubelet.stop())
                        .await
                        .is_err()
                    {
                        tracing::warn!(timeout = ?STOP_TIMEOUT, "the kubelet did not stop in time; killed its Pods");
                    }
                }
                Err(_) => tracing::warn!("the kubelet is still shared; dropping it unstopped"),
            }
        }
        Err(e) => {
            let _ = started.send(Err(e));
        }
    }
    forwarder.abort();
}

/// Accepts on `listener` and pipes each connection to `upstream` (the API server on loopback,
/// which keeps its own TLS end to end).
async fn forward(listener: tokio::net::TcpListener, upstream: SocketAddr) {
    loop {
        let Ok((mut inbound, _)) = listener.accept().await else {
            // Out of descriptors, say: do not spin.
            tokio::time::sleep(std::time::Duration::from_millis(100)).await;
            continue;
        };
        tokio::spawn(async move {
            if let Ok(mut outbound) = tokio::net::TcpStream::connect(upstream).await {
                let _ = tokio::io::copy_bidirectional(&mut inbound, &mut outbound).await;
            }
        });
    }
}
