//! What a reconcile runs with: the clients, the configuration, the watches' stores, and what
//! this process remembers per node between reconciles (pruned as nodes go).

use std::collections::{HashMap, HashSet};
use std::sync::Arc;

use futures::FutureExt as _;
use futures::future::{BoxFuture, Shared};
use k8s_openapi::api::apps::v1::StatefulSet;
use k8s_openapi::api::core::v1::{ConfigMap, Pod, Service};
use kube::runtime::reflector::{ObjectRef, Store};
use kube::{Client, ResourceExt};
use parking_lot::Mutex;
use seinode_tls_crds::SeiNode;
use seinode_tls_kube::versions::SecretVersions;

use crate::calls::SidecarCalls;
use crate::compact::Compact;
use crate::config::ControllerConfig;
use crate::events::NodeEvent;
use crate::leader::Leadership;
use crate::metrics::ControllerMetrics;
use crate::secrets::SecretJudge;
use crate::sidecar::SidecarClient;

/// The watched state of the objects nodes own (labelled, managedFields dropped, kept compact).
#[derive(Clone)]
pub struct OwnedStores {
    pub config_maps: Store<Compact<ConfigMap>>,
    pub services: Store<Compact<Service>>,
    pub stateful_sets: Store<Compact<StatefulSet>>,
    /// The node pods (labelled by the StatefulSets' template): where to dial a sidecar.
    pub pods: Store<Compact<Pod>>,
    pub(super) listed: Shared<BoxFuture<'static, ()>>,
}

impl OwnedStores {
    pub fn new(
        config_maps: Store<Compact<ConfigMap>>,
        services: Store<Compact<Service>>,
        stateful_sets: Store<Compact<StatefulSet>>,
        pods: Store<Compact<Pod>>,
    ) -> Self {
        // One wait on kube-runtime's readiness, shared by every reconcile: the future of
        // `Store::wait_until_ready` keeps the waker of only the task that polled it last, so of
        // several reconciles each waiting on its own, all but one missed the wake-up and held
        // their worker until `SYNC_WAIT` polled them again (a node decided 10 s late).
        let listed = {
            let stores = (
                config_maps.clone(),
                services.clone(),
                stateful_sets.clone(),
                pods.clone(),
            );
            async move {
                // A dropped writer (the term is ending) ends the wait too.
                let _ = futures::future::join4(
                    stores.0.wait_until_ready(),
                    stores.1.wait_until_ready(),
                    stores.2.wait_until_ready(),
                    stores.3.wait_until_ready(),
                )
                .await;
            }
            .boxed()
            .shared()
        };
        Self {
            config_maps,
            services,
            stateful_sets,
            pods,
            listed,
        }
    }

    /// Completes once all four stores have been listed; any number of tasks may wait.
    pub fn listed(&self) -> impl Future<Output = ()> + Send + 'static {
        self.listed.clone()
    }
}

/// What reconciles share. One per leadership term: nothing a previous term learnt is trusted.
pub struct Context {
    pub client: Client,
    pub config: ControllerConfig,
    pub metrics: Arc<ControllerMetrics>,
    pub secrets: SecretJudge,
    pub sidecar: SidecarClient,
    /// Sidecar calls, apart from the reconciles (see `calls`).
    pub calls: SidecarCalls,
    /// The CA the node proxies trust for the controller's client certificate.
    pub(super) client_ca: Option<String>,
    /// The reflector's view of SeiNodes.
    pub store: Store<SeiNode>,
    pub owned: OwnedStores,
    pub leadership: Leadership,
    /// Who reports events (`reportingInstance`).
    pub instance: String,
    /// What this process remembers per node uid between reconciles.
    memory: Mutex<HashMap<String, NodeMemory>>,
    /// The node as this controller's last status write returned it: the watch may still hand
    /// out an older version, and deciding from that would run finished tasks again. (Shared
    /// with the SeiNode watch, so apart from `memory`.)
    pub(super) latest: Latest,
}

/// What this process remembers about one node between its reconciles; dropped by
/// [`Context::prune`] once the node is gone.
#[derive(Debug, Default)]
pub(super) struct NodeMemory {
    /// Failed reconciles in a row: the backoff's count.
    pub(super) failures: u32,
    /// The notAfter (seconds) of the certificate the node was last warned about: one value a
    /// node, however often its certificate is renewed.
    pub(super) expiry_warned: Option<i64>,
    /// Reconciled by this process already (its first look re-sends the events a killed
    /// predecessor may have lost).
    pub(super) seen: bool,
    /// Events decided and not yet created (the API refused them, or they wait behind urgent
    /// nodes): sent first by the node's next reconcile.
    pub(super) unsent: Vec<NodeEvent>,
}

/// Per node uid, the node as the controller last wrote (or read) it; shared with the SeiNode
/// watch, which drops the events of the controller's own writes (the reconcile that wrote
/// already went on from there).
#[derive(Clone, Default)]
pub struct Latest(pub(super) Arc<Mutex<HashMap<String, Arc<SeiNode>>>>);

impl Latest {
    /// Keeps `node`, as the controller just wrote or read it, without its managedFields (as
    /// the watch keeps nodes: a thousand nodes' field sets parsed into JSON trees are megabytes
    /// nothing reads).
    pub(super) fn record(&self, mut node: SeiNode) -> Arc<SeiNode> {
        node.metadata.managed_fields = None;
        let node = Arc::new(node);
        self.0.lock().insert(uid(&node), node.clone());
        node
    }

    /// Whether `node` is exactly the version the controller itself wrote or read last.
    pub fn is_own(&self, node: &SeiNode) -> bool {
        self.0
            .lock()
            .get(&uid(node))
            .is_some_and(|ours| ours.metadata.resource_version == node.metadata.resource_version)
    }
}

impl Context {
    #[allow(clippy::too_many_arguments)]
    pub fn new(
        client: Client,
        config: ControllerConfig,
        ca_bundle: Option<Vec<u8>>,
        client_ca: Option<String>,
        metrics: Arc<ControllerMetrics>,
        store: Store<SeiNode>,
        owned: OwnedStores,
        leadership: Leadership,
        instance: String,
        latest: Latest,
        secret_versions: Arc<SecretVersions>,
        calls: SidecarCalls,
    ) -> Self {
        let sidecar = SidecarClient::new(
            ca_bundle,
            config.sidecar_probe_timeout,
            config.sidecar_client.clone(),
        );
        Self {
            calls,
            client_ca,
            client,
            config,
            secrets: SecretJudge::new(secret_versions, metrics.secret_reads.clone()),
            metrics,
            sidecar,
            store,
            owned,
            leadership,
            instance,
            memory: Mutex::default(),
            latest,
        }
    }

    /// Reads or changes what is remembered about `node`.
    pub(super) fn remember<T>(&self, node: &SeiNode, f: impl FnOnce(&mut NodeMemory) -> T) -> T {
        f(self.memory.lock().entry(uid(node)).or_default())
    }

    /// The newest version of `cached` this controller knows: its own last write, unless the
    /// watch has caught up with it or the spec moved on since.
    pub(super) fn newest(&self, cached: Arc<SeiNode>) -> Arc<SeiNode> {
        let mut latest = self.latest.0.lock();
        let key = uid(&cached);
        match latest.get(&key) {
            Some(ours)
                if ours.metadata.resource_version != cached.metadata.resource_version
                    && ours.metadata.generation >= cached.metadata.generation =>
            {
                ours.clone()
            }
            _ => {
                latest.remove(&key);
                cached
            }
        }
    }

    /// Forgets what is kept per node and per Secret for nodes that are gone (run periodically,
    /// so memory follows the fleet rather than its history).
    pub fn prune(&self) {
        let nodes = self.store.state();
        let uids: HashSet<String> = nodes.iter().map(|n| uid(n)).collect();
        let hosts: HashSet<String> = nodes
            .iter()
            .map(|n| pod_host(n, &self.config.cluster_domain))
            .collect();
        let secrets: HashSet<(String, String)> = nodes
            .iter()
            .filter_map(|n| Some((n.namespace()?, n.sidecar_tls()?.secret_name.clone())))
            .collect();
        self.metrics
            .tls
            .retain(|ns, name| self.store.get(&ObjectRef::new(name).within(ns)).is_some());
        self.memory.lock().retain(|u, _| uids.contains(u));
        self.latest.0.lock().retain(|u, _| uids.contains(u));
        self.calls.retain(|u| uids.contains(u));
        self.sidecar.retain_hosts(|host| hosts.contains(host));
        self.secrets
            .retain(|ns, name| secrets.contains(&(ns.to_owned(), name.to_owned())));
    }
}

/// The key of what is kept per node: its uid (its name before the API server gave it one).
pub(super) fn uid(node: &SeiNode) -> String {
    node.uid().unwrap_or_else(|| node.name_any())
}

/// The DNS name the node's sidecar is called by (and its certificate verified against).
pub(super) fn pod_host(node: &SeiNode, cluster_domain: &str) -> String {
    let namespace = node.namespace().unwrap_or_default();
    seinode_tls_crds::contract::pod_dns_name(&node.name_any(), &namespace, cluster_domain)
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use kube::runtime::{reflector, watcher};

    use super::*;

    /// Reconciles in separate tasks all wait for the owned stores' first lists; every one of them
    /// must wake when the lists complete, not only the one that asked last.
    #[tokio::test(flavor = "current_thread")]
    async fn every_reconcile_waiting_for_the_owned_lists_wakes_when_they_complete() {
        let (config_maps, mut cm_writer) = reflector::store::<Compact<ConfigMap>>();
        let (services, mut svc_writer) = reflector::store::<Compact<Service>>();
        let (stateful_sets, mut sts_writer) = reflector::store::<Compact<StatefulSet>>();
        let (pods, mut pod_writer) = reflector::store::<Compact<Pod>>();
        let owned = OwnedStores::new(config_maps, services, stateful_sets, pods);
        let done = Arc::new(std::sync::atomic::AtomicUsize::new(0));
        let waiters: Vec<_> = (0..8)
            .map(|_| {
                let (listed, done) = (owned.listed(), done.clone());
                tokio::spawn(async move {
                    listed.await;
                    done.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
                })
            })
            .collect();
        // One thread: after these yields every waiter has polled and is parked.
        for _ in 0..8 {
            tokio::task::yield_now().await;
        }
        assert_eq!(done.load(std::sync::atomic::Ordering::SeqCst), 0);
        cm_writer.apply_watcher_event(&watcher::Event::InitDone);
        svc_writer.apply_watcher_event(&watcher::Event::InitDone);
        sts_writer.apply_watcher_event(&watcher::Event::InitDone);
        for _ in 0..8 {
            tokio::task::yield_now().await;
        }
        assert_eq!(
            done.load(std::sync::atomic::Ordering::SeqCst),
            0,
            "the Pod store has not listed yet"
        );
        pod_writer.apply_watcher_event(&watcher::Event::InitDone);
        let all = futures::future::join_all(waiters);
        let joined = tokio::time::timeout(Duration::from_secs(5), all)
            .await
            .expect("every waiter wakes, not only the last to poll");
        assert!(joined.iter().all(Result::is_ok));
        assert_eq!(done.load(std::sync::atomic::Ordering::SeqCst), 8);
    }

    /// What the controller keeps of its own writes is what the watch keeps of a node: no
    /// managedFields (each a JSON tree; at 1,000 nodes, megabytes of heap nothing reads).
    #[test]
    fn a_node_written_is_kept_without_its_managed_fields_and_known_as_its_own() {
        use k8s_openapi::apimachinery::pkg::apis::meta::v1::{FieldsV1, ManagedFieldsEntry};

        let mut node: SeiNode = serde_json::from_value(serde_json::json!({
            "apiVersion": "sei.io/v1alpha1",
            "kind": "SeiNode",
            "metadata": {"name": "rpc", "namespace": "ns", "uid": "u1", "resourceVersion": "7"},
            "spec": {"chainId": "pacific-1", "image": "sei:v1"},
        }))
        .expect("a SeiNode");
        node.metadata.managed_fields = Some(vec![ManagedFieldsEntry {
            manager: Some("seinode-tls-controller".to_owned()),
            fields_v1: Some(FieldsV1(serde_json::json!({"f:status": {"f:phase": {}}}))),
            ..ManagedFieldsEntry::default()
        }]);
        let latest = Latest::default();
        let kept = latest.record(node.clone());
        assert!(kept.metadata.managed_fields.is_none());
        assert_eq!(kept.metadata.resource_version.as_deref(), Some("7"));
        assert!(
            latest.is_own(&node),
            "the watch's copy of the write is recognised"
        );
        node.metadata.resource_version = Some("8".to_owned());
        assert!(!latest.is_own(&node));
    }
}
