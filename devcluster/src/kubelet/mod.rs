//! A process kubelet: runs the Pods bound to its Node from their specs, as processes in
//! network namespaces of their own, so the tests and `seinode-tls local` exercise real
//! Deployments, StatefulSets, Services and certificate rotation without a container runtime.
//!
//! Test and local infrastructure only, never part of the product. Images are mapped to local
//! executables by an [`Images`] table; everything else (volumes, env, probes, restarts,
//! status, graceful deletion, names) follows the kubelet closely enough for charts to run
//! unchanged. Unsupported fields make the container wait with `CreateContainerConfigError`
//! and a message naming the field; the kubelet itself never panics on a spec.
//!
//! Layout of [`KubeletConfig::dir`]: `pods/<ns>_<name>_<uid>/` (volumes, logs, the pod's
//! hosts file, a scratch dir per container) and `volumes/pvc-<uid>/` (provisioned claims).

mod dns;
mod env;
mod images;
mod node;
mod pod;
mod probe;
mod runtime;
mod status;
mod storage;
mod volumes;

use std::collections::{BTreeMap, HashMap, HashSet};
use std::net::Ipv4Addr;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use futures::{Stream, StreamExt};
use k8s_openapi::api::core::v1::{ConfigMap, Pod, Secret, Service};
use k8s_openapi::api::discovery::v1::EndpointSlice;
use kube::Client;
use kube::api::Api;
use kube::runtime::reflector::{self, Store};
use kube::runtime::{WatchStreamExt, watcher};
use nix::sys::signal::Signal;
use thiserror::Error;
use tokio::sync::{Notify, watch};
use tokio::task::JoinHandle;
use tracing::Instrument;

pub use images::{DEFAULT_PATH, Image, ImageFile, Images, repository_of};
pub use pod::pod_dir_name;

use crate::network::PodNetwork;
use dns::Names;
use pod::{PodUpdate, Shared};

/// How long start-up waits for the Secret and ConfigMap caches.
const CACHE_SYNC_TIMEOUT: Duration = Duration::from_secs(60);
/// Settling time before the name table is recomputed after a change.
const NAMES_DEBOUNCE: Duration = Duration::from_millis(100);

/// Where and how the kubelet runs.
#[derive(Debug, Clone)]
pub struct KubeletConfig {
    /// The Node's name, e.g. `devcluster`.
    pub node_name: String,
    /// State directory (`pods/`, `volumes/`); the caller removes it.
    pub dir: PathBuf,
    /// Image references to local executables.
    pub images: Images,
    /// `KUBERNETES_SERVICE_HOST` inside pods (the network's gateway).
    pub apiserver_host: Ipv4Addr,
    /// `KUBERNETES_SERVICE_PORT`.
    pub apiserver_port: u16,
    /// Usually `cluster.local`.
    pub cluster_domain: String,
    /// First restart back-off (the kubelet's is 10 s), doubling up to 300 s.
    pub crash_loop_base: Duration,
}

#[derive(Debug, Error)]
pub enum KubeletError {
    #[error("failed to register node {node} with the API server")]
    Register {
        node: String,
        #[source]
        source: kube::Error,
    },
    #[error("failed to create the kubelet directory {}", .path.display())]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error(
        "the kubelet's Secret and ConfigMap caches did not sync within {0:?}; is the API server \
         reachable and does the client may list Secrets and ConfigMaps in all namespaces?"
    )]
    CacheSync(Duration),
}

/// A running kubelet. [`Kubelet::stop`] stops every pod gracefully; dropping it kills every
/// container process at once and removes the sandboxes.
pub struct Kubelet {
    shared: Arc<Shared>,
    shutdown: watch::Sender<bool>,
    dispatcher: Option<JoinHandle<()>>,
    background: Vec<JoinHandle<()>>,
}

impl std::fmt::Debug for Kubelet {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Kubelet")
            .field("node", &self.shared.config.node_name)
            .finish_non_exhaustive()
    }
}

impl Kubelet {
    /// Registers the Node and starts running the pods bound to it, on the current runtime.
    pub async fn start(
        client: Client,
        network: Arc<PodNetwork>,
        config: KubeletConfig,
    ) -> Result<Self, KubeletError> {
        for sub in ["pods", "volumes"] {
            let path = config.dir.join(sub);
            std::fs::create_dir_all(&path).map_err(|source| KubeletError::Io { path, source })?;
        }
        let node_name = config.node_name.clone();
        node::register(&client, &node_name, network.gateway())
            .await
            .map_err(|source| KubeletError::Register {
                node: node_name.clone(),
                source,
            })?;
        node::renew_lease(&client, &node_name)
            .await
            .map_err(|source| KubeletError::Register {
                node: node_name.clone(),
                source,
            })?;
        tracing::info!(node = %node_name, gateway = %network.gateway(), "node registered");

        let mut background = Vec::new();
        let (objects_tx, objects_rx) = watch::channel(0u64);
        let objects_tx = Arc::new(objects_tx);
        let (secrets, task) = cache::<Secret>(&client, objects_tx.clone());
        background.push(task);
        let (config_maps, task) = cache::<ConfigMap>(&client, objects_tx);
        background.push(task);
        let synced = async {
            let _ = secrets.wait_until_ready().await;
            let _ = config_maps.wait_until_ready().await;
        };
        if tokio::time::timeout(CACHE_SYNC_TIMEOUT, synced)
            .await
            .is_err()
        {
            for task in &background {
                task.abort();
            }
            return Err(KubeletError::CacheSync(CACHE_SYNC_TIMEOUT));
        }

        let names = Names::new();
        let shared = Arc::new(Shared {
            client: client.clone(),
            network,
            config,
            secrets,
            config_maps,
            objects_changed: objects_rx,
            names: names.clone(),
            pids: Mutex::default(),
            sandboxes: Mutex::default(),
        });
        background.push(tokio::spawn(node::keep_alive(client.clone(), node_name)));
        background.push(tokio::spawn(storage::provision(
            client.clone(),
            shared.config.dir.join("volumes"),
        )));
        background.extend(names_tasks(&shared));

        let (shutdown, shutdown_rx) = watch::channel(false);
        let dispatcher = tokio::spawn(dispatch(shared.clone(), shutdown_rx));
        Ok(Self {
            shared,
            shutdown,
            dispatcher: Some(dispatcher),
            background,
        })
    }

    /// The first address of a cluster name (`<pod>.<svc>.<ns>.svc.<domain>`,
    /// `<svc>.<ns>.svc`, `kubernetes.default.svc`, …) as seen from the host.
    pub fn resolve(&self, host: &str) -> Option<Ipv4Addr> {
        self.shared.names.resolve(host)
    }

    /// Every name the host can resolve, with its addresses.
    pub fn addresses(&self) -> BTreeMap<String, Vec<Ipv4Addr>> {
        self.shared.names.snapshot()
    }

    /// The directory of a running pod's logs (`<container>.log`) and volumes.
    pub fn pod_dir(&self, pod: &Pod) -> PathBuf {
        self.shared
            .config
            .dir
            .join("pods")
            .join(pod::pod_dir_name(pod))
    }

    /// Stops every pod (preStop, SIGTERM, its grace period capped at 10 s, SIGKILL), removes
    /// the sandboxes and the Node.
    pub async fn stop(mut self) {
        let _ = self.shutdown.send(true);
        if let Some(dispatcher) = self.dispatcher.take()
            && let Err(error) = dispatcher.await
        {
            tracing::warn!(%error, "the kubelet's pod dispatcher failed");
        }
        for task in self.background.drain(..) {
            task.abort();
        }
        node::deregister(&self.shared.client, &self.shared.config.node_name).await;
        tracing::info!(node = %self.shared.config.node_name, "kubelet stopped");
    }
}

impl Drop for Kubelet {
    fn drop(&mut self) {
        let _ = self.shutdown.send(true);
        if let Some(dispatcher) = self.dispatcher.take() {
            dispatcher.abort();
        }
        for task in self.background.drain(..) {
            task.abort();
        }
        if let Ok(pids) = self.shared.pids.lock() {
            for pid in pids.iter() {
                runtime::signal_group(*pid, Signal::SIGKILL);
            }
        }
        if let Ok(mut sandboxes) = self.shared.sandboxes.lock() {
            for (_, sandbox) in std::mem::take(&mut *sandboxes) {
                sandbox.remove();
            }
        }
    }
}

// === Watches ===

/// A cluster-wide reflector store; every change bumps `changed`.
fn cache<K>(client: &Client, changed: Arc<watch::Sender<u64>>) -> (Store<K>, JoinHandle<()>)
where
    K: kube::Resource<DynamicType = ()>
        + Clone
        + std::fmt::Debug
        + serde::de::DeserializeOwned
        + Send
        + Sync
        + 'static,
{
    let (store, writer) = reflector::store();
    let stream = reflector::reflector(
        writer,
        watcher(Api::<K>::all(client.clone()), watcher::Config::default()).default_backoff(),
    );
    let task = tokio::spawn(drain(stream, move || {
        changed.send_modify(|n| *n = n.wrapping_add(1));
    }));
    (store, task)
}

/// Runs a watch stream, calling `on_change` after each applied change, logging errors.
async fn drain<K>(
    stream: impl Stream<Item = Result<watcher::Event<K>, watcher::Error>>,
    on_change: impl Fn(),
) {
    let mut stream = std::pin::pin!(stream);
    while let Some(event) = stream.next().await {
        match event {
            Ok(watcher::Event::Apply(_) | watcher::Event::Delete(_) | watcher::Event::InitDone) => {
                on_change();
            }
            Ok(_) => {}
            Err(error) => tracing::warn!(%error, "watch failed; retrying"),
        }
    }
}

/// Keeps the name table (and every pod's hosts file) in step with Services, EndpointSlices
/// and pods.
fn names_tasks(shared: &Arc<Shared>) -> Vec<JoinHandle<()>> {
    let client = &shared.client;
    let dirty = Arc::new(Notify::new());
    let mut tasks = Vec::new();
    let (services, writer) = reflector::store::<Service>();
    let stream = reflector::reflector(
        writer,
        watcher(
            Api::<Service>::all(client.clone()),
            watcher::Config::default(),
        )
        .default_backoff(),
    );
    let notify = dirty.clone();
    tasks.push(tokio::spawn(drain(stream, move || notify.notify_one())));
    let (slices, writer) = reflector::store::<EndpointSlice>();
    let stream = reflector::reflector(
        writer,
        watcher(
            Api::<EndpointSlice>::all(client.clone()),
            watcher::Config::default(),
        )
        .default_backoff(),
    );
    let notify = dirty.clone();
    tasks.push(tokio::spawn(drain(stream, move || notify.notify_one())));
    let (pods, writer) = reflector::store::<Pod>();
    let stream = reflector::reflector(
        writer,
        watcher(Api::<Pod>::all(client.clone()), watcher::Config::default())
            .default_backoff()
            .modify(|pod| {
                // The name table needs only names, hostnames and addresses.
                pod.metadata.managed_fields = None;
                pod.metadata.annotations = None;
            }),
    );
    let notify = dirty.clone();
    tasks.push(tokio::spawn(drain(stream, move || notify.notify_one())));

    let shared = shared.clone();
    tasks.push(tokio::spawn(async move {
        loop {
            dirty.notified().await;
            tokio::time::sleep(NAMES_DEBOUNCE).await;
            let entries = dns::name_entries(
                &clone_all(services.state()),
                &clone_all(slices.state()),
                &clone_all(pods.state()),
                &shared.config.cluster_domain,
            );
            shared
                .names
                .update(entries, shared.gateway(), &shared.config.cluster_domain);
        }
    }));
    tasks
}

fn update_namespace(receiver: &watch::Receiver<PodUpdate>) -> String {
    let pod = &receiver.borrow().pod;
    format!(
        "{}/{}",
        pod.metadata.namespace.as_deref().unwrap_or_default(),
        pod.metadata.name.as_deref().unwrap_or_default()
    )
}

fn clone_all<K: Clone>(objects: Vec<Arc<K>>) -> Vec<K> {
    objects.iter().map(|o| (**o).clone()).collect()
}

/// Watches the pods bound to this node and keeps one worker per pod.
async fn dispatch(shared: Arc<Shared>, mut shutdown: watch::Receiver<bool>) {
    let node = shared.config.node_name.clone();
    let api: Api<Pod> = Api::all(shared.client.clone());
    let config = watcher::Config::default().fields(&format!("spec.nodeName={node}"));
    let mut events = watcher(api, config).default_backoff().boxed();
    let mut workers: HashMap<String, (watch::Sender<PodUpdate>, JoinHandle<()>)> = HashMap::new();
    let mut listed: Option<HashSet<String>> = None;
    let gone = |workers: &HashMap<String, (watch::Sender<PodUpdate>, JoinHandle<()>)>,
                uid: &str| {
        if let Some((sender, _)) = workers.get(uid) {
            sender.send_modify(|update| update.gone = true);
        }
    };
    loop {
        let event = tokio::select! {
            _ = shutdown.changed() => break,
            event = events.next() => event,
        };
        let Some(event) = event else { break };
        let pod = match event {
            Ok(watcher::Event::Init) => {
                listed = Some(HashSet::new());
                continue;
            }
            Ok(watcher::Event::InitDone) => {
                if let Some(listed) = listed.take() {
                    for uid in workers.keys().filter(|uid| !listed.contains(*uid)) {
                        gone(&workers, uid);
                    }
                }
                continue;
            }
            Ok(watcher::Event::Delete(pod)) => {
                if let Some(uid) = &pod.metadata.uid {
                    gone(&workers, uid);
                }
                continue;
            }
            Ok(watcher::Event::Apply(pod) | watcher::Event::InitApply(pod)) => pod,
            Err(error) => {
                tracing::warn!(%error, %node, "pod watch failed; retrying");
                continue;
            }
        };
        let Some(uid) = pod.metadata.uid.clone() else {
            continue;
        };
        if let Some(listed) = listed.as_mut() {
            listed.insert(uid.clone());
        }
        let update = PodUpdate {
            pod: Arc::new(pod),
            gone: false,
        };
        match workers.get(&uid) {
            Some((sender, _)) => {
                // A finished worker's pod is not started again.
                sender.send_if_modified(|current| {
                    if current.gone {
                        return false;
                    }
                    *current = update;
                    true
                });
            }
            None => {
                let (sender, receiver) = watch::channel(update);
                let span = tracing::info_span!(
                    "pod",
                    pod = update_namespace(&receiver),
                    uid = %uid
                );
                let worker = tokio::spawn(
                    pod::run_pod(shared.clone(), receiver, shutdown.clone()).instrument(span),
                );
                workers.insert(uid, (sender, worker));
            }
        }
    }
    for (_, (_, worker)) in workers {
        let _ = worker.await;
    }
}
