//! The SeiNode reconciler.
//!
//! Publishes each node's TLS contract in `status.sidecarTLS`, keeps the `SidecarTLSSecretReady`
//! condition from the shared validation, and gates and runs the node's plan (ConfigMap for
//! kube-rbac-proxy, headless Service, StatefulSet). Watches SeiNodes, the objects it owns
//! (by label), and `kubernetes.io/tls` Secrets (metadata only), mapped to the nodes that name
//! them through an index. With leader election only the Lease holder reconciles.

pub mod calls;
pub mod compact;
pub mod config;
pub mod decide;
pub mod dispatch;
pub mod drift;
pub mod events;
pub mod image;
pub mod leader;
pub mod metrics;
pub mod plan;
pub mod reconcile;
pub mod resources;
pub mod secrets;
pub mod sidecar;
pub mod status;

use std::sync::Arc;
use std::time::Duration;

use futures::{StreamExt, TryStreamExt};
use k8s_openapi::api::apps::v1::StatefulSet;
use k8s_openapi::api::core::v1::{ConfigMap, Pod, Service};
use kube::runtime::reflector::ObjectRef;
use kube::runtime::{PredicateConfig, WatchStreamExt, predicates, reflector, watcher};
use kube::{Client, ResourceExt};
use prometheus_client::registry::Registry;
use seinode_tls_crds::SeiNode;
use seinode_tls_kube::watch::{WatchScope, scoped_watcher};
use thiserror::Error;
use tokio::sync::watch;

use compact::Compact;
pub use config::{ControllerConfig, LeaderElection};
use leader::{Elector, Leadership, LeaseContact};
use metrics::ControllerMetrics;
use reconcile::{Context, Latest, OwnedStores};
use seinode_tls_kube::index::SecretIndex;
use seinode_tls_kube::versions::{SecretMeta, SecretVersions, watch_tls_secrets};

#[derive(Debug, Error)]
pub enum ControllerError {
    #[error("leader election on Lease {name} stopped")]
    LeaseLost { name: String },
    #[error("invalid {flag}: {reason}")]
    Config { flag: &'static str, reason: String },
    #[error("the reconciling term ended while leading ({why}); the Lease was released")]
    TermEnded { why: String },
    #[error("failed to build the reconciles' client: {0}")]
    Client(String),
}

/// Whether the reconciles may send now. A fenced client asks it before every write to its
/// connection, so it must be cheap.
pub type Fence = Arc<dyn Fn() -> bool + Send + Sync>;

/// The clients [`Controller::run`] takes, built by [`Controller::clients`]: the process's own
/// (the Lease), and the reconciles' (watches, reads, writes, events). Without leader election
/// they are one; with it, each leadership term gets a client of its own (one more connection)
/// fenced by that term's leadership, so nothing an ended term still has in flight is sent.
pub struct Clients {
    lease: Client,
    work: WorkClient,
}

/// Builds a term's client around its fence.
type Connect = Box<dyn Fn(Fence) -> Result<Client, String> + Send + Sync>;

enum WorkClient {
    Shared(Client),
    PerTerm(Connect),
}

impl Clients {
    /// The process's own client, which no fence closes (the webhook in `run` uses it too).
    pub fn lease(&self) -> &Client {
        &self.lease
    }
}

/// The controller, with its metrics registered.
pub struct Controller {
    config: ControllerConfig,
    ca_bundle: Option<Vec<u8>>,
    client_ca: Option<String>,
    metrics: Arc<ControllerMetrics>,
    leadership: Leadership,
    contact: LeaseContact,
}

impl Controller {
    /// Checks the configuration and registers the metrics.
    pub fn new(config: ControllerConfig, registry: &mut Registry) -> Result<Self, ControllerError> {
        image::check_image(&config.sidecar_image).map_err(|reason| ControllerError::Config {
            flag: "--sidecar-image",
            reason,
        })?;
        image::check_image(&config.rbac_proxy_image).map_err(|reason| ControllerError::Config {
            flag: "--rbac-proxy-image",
            reason,
        })?;
        if config.max_concurrent_reconciles == 0 {
            return Err(ControllerError::Config {
                flag: "--max-concurrent-reconciles",
                reason: "must be at least 1".to_owned(),
            });
        }
        if let Some(election) = &config.leader_election
            && !(election.retry_period < election.renew_deadline
                && election.renew_deadline < election.lease_duration)
        {
            return Err(ControllerError::Config {
                flag: "--leader-election-renew-deadline",
                reason: format!(
                    "leader election needs retry period ({:?}) < renew deadline ({:?}) < lease duration ({:?})",
                    election.retry_period, election.renew_deadline, election.lease_duration
                ),
            });
        }
        let ca_bundle = match &config.sidecar_ca_bundle {
            Some(path) => {
                let pem = std::fs::read(path).map_err(|e| ControllerError::Config {
                    flag: "--sidecar-ca-bundle",
                    reason: format!("failed to read {}: {e}", path.display()),
                })?;
                if !pem.windows(27).any(|w| w == b"-----BEGIN CERTIFICATE-----") {
                    return Err(ControllerError::Config {
                        flag: "--sidecar-ca-bundle",
                        reason: format!("{} holds no PEM CERTIFICATE", path.display()),
                    });
                }
                Some(pem)
            }
            None => None,
        };
        let client_ca = match &config.sidecar_client {
            Some(files) => Some(read_client_ca(&files.ca_file)?),
            None => None,
        };
        if config.max_concurrent_probes == 0 {
            return Err(ControllerError::Config {
                flag: "--max-concurrent-probes",
                reason: "must be at least 1".to_owned(),
            });
        }
        let unset: Vec<&str> = config
            .sidecar_platform
            .env()
            .into_iter()
            .filter(|(_, value)| value.is_empty())
            .map(|(name, _)| name)
            .collect();
        if !unset.is_empty() {
            tracing::warn!(
                unset = %unset.join(", "),
                "seictl serve does not start without these variables: set --sidecar-genesis-bucket, \
                 --sidecar-genesis-region, --sidecar-snapshot-bucket and --sidecar-snapshot-region"
            );
        }
        let metrics = Arc::new(ControllerMetrics::register(registry));
        let leadership = match config.leader_election {
            Some(_) => Leadership::elected(),
            None => Leadership::always(),
        };
        Ok(Self {
            config,
            ca_bundle,
            client_ca,
            metrics,
            leadership,
            contact: LeaseContact::default(),
        })
    }

    /// The readiness of the `controller` command (its `/readyz`). With leader election: ready
    /// while a round about the Lease (read or write) has completed with the API server within a
    /// lease duration, whether this replica leads or stands by; a replica that cannot reach the
    /// API server, or whose rounds keep failing, is not ready. Without it: always ready (the
    /// controller then has no round to report on; its watches retry on their own).
    pub fn readiness(&self) -> impl Fn() -> Result<(), String> + Clone + Send + Sync + 'static {
        let contact = self.contact.clone();
        let lease_duration = self
            .config
            .leader_election
            .as_ref()
            .map(|election| election.lease_duration);
        move || {
            let Some(lease_duration) = lease_duration else {
                return Ok(());
            };
            lease_readiness(contact.since(), lease_duration)
        }
    }

    /// The clients for [`Controller::run`] around `client`, the process's own. With leader
    /// election the reconciles get the client `connect` builds with the fence: it must ask the
    /// fence before every write to its connections, not only before each request, as a
    /// request admitted while leading may otherwise leave the process after a pause, when
    /// another replica leads. Without leader election `connect` is not called.
    pub fn clients<E: std::fmt::Display>(
        &self,
        client: Client,
        connect: impl Fn(Fence) -> Result<Client, E> + Send + Sync + 'static,
    ) -> Result<Clients, E> {
        let work = if self.leadership.is_elected() {
            // Built once now, so a configuration it refuses fails at start, not at election.
            connect(Arc::new(|| false))?;
            WorkClient::PerTerm(Box::new(move |fence| {
                connect(fence).map_err(|e| e.to_string())
            }))
        } else {
            WorkClient::Shared(client.clone())
        };
        Ok(Clients {
            lease: client,
            work,
        })
    }

    /// Reconciles until `shutdown` resolves. With leader election, reconciles only while this
    /// replica leads; each term starts from what the cluster says, nothing remembered.
    pub async fn run(
        self,
        clients: Clients,
        shutdown: impl Future<Output = ()> + Send + 'static,
    ) -> Result<(), ControllerError> {
        let Clients {
            lease: client,
            work,
        } = clients;
        let Some(election) = self.config.leader_election.clone() else {
            let work = match work {
                WorkClient::Shared(work) => work,
                WorkClient::PerTerm(connect) => {
                    connect(Arc::new(|| true)).map_err(ControllerError::Client)?
                }
            };
            let term = Term {
                client: work,
                config: self.config,
                ca_bundle: self.ca_bundle,
                client_ca: self.client_ca,
                metrics: self.metrics,
                leadership: self.leadership,
                instance: None,
            };
            let leader = term.metrics.leader.clone();
            leader.set(1);
            term.run(shutdown).await;
            leader.set(0);
            return Ok(());
        };
        let elector = Elector::new(
            client,
            election.clone(),
            self.leadership.clone(),
            self.contact.clone(),
        );
        let identity = elector.identity().to_owned();
        let (leading_tx, mut leading) = watch::channel(false);
        let (stop_elector, stop_rx) = watch::channel(false);
        let elector = tokio::spawn(elector.run(leading_tx, stop_rx));
        let shutdown = futures::FutureExt::shared(Box::pin(shutdown));
        let stop = |elector: tokio::task::JoinHandle<()>| async move {
            // Releasing the Lease lets the next replica take it at once.
            let _ = stop_elector.send(true);
            let _ = elector.await;
        };
        loop {
            tracing::info!(%identity, "waiting for the leader lease");
            tokio::select! {
                led = async { leading.wait_for(|leading| *leading).await.map(|_| ()) } => if led.is_err() {
                    return Err(ControllerError::LeaseLost { name: election.lease_name.clone() });
                },
                () = shutdown.clone() => { stop(elector).await; return Ok(()) }
            }
            tracing::info!(%identity, "leading: reconciling");
            self.metrics.leader.set(1);
            // This term's view of the leadership, and a client fenced by it alone.
            let leadership = self.leadership.new_term();
            let fence: Fence = {
                let leadership = leadership.clone();
                Arc::new(move || leadership.is_leading())
            };
            let work = match &work {
                WorkClient::Shared(work) => work.clone(),
                WorkClient::PerTerm(connect) => match connect(fence) {
                    Ok(work) => work,
                    Err(error) => {
                        self.leadership.end_terms();
                        stop(elector).await;
                        return Err(ControllerError::Client(error));
                    }
                },
            };
            let (stop_term, term_stopped) = tokio::sync::oneshot::channel::<()>();
            let term = Term {
                client: work,
                config: self.config.clone(),
                ca_bundle: self.ca_bundle.clone(),
                client_ca: self.client_ca.clone(),
                metrics: self.metrics.clone(),
                leadership,
                instance: Some(identity.clone()),
            };
            let mut term = tokio::spawn(term.run(async move {
                let _ = term_stopped.await;
            }));
            let ended = supervise(&mut term, &mut leading, shutdown.clone()).await;
            self.metrics.leader.set(0);
            let stopping = match ended {
                TermEnd::LeaseLost => false,
                TermEnd::Shutdown => true,
                TermEnd::Ended(why) => {
                    // Nothing reconciles any more: give the Lease up at once and fail (the process
                    // exits; the next replica, or this one restarted, takes over).
                    self.leadership.end_terms();
                    tracing::error!(%identity, %why, "the reconciling term ended unexpectedly; releasing the Lease");
                    stop(elector).await;
                    return Err(ControllerError::TermEnded { why });
                }
            };
            // The ended term's reconciles are fenced off from here on, whatever happens next.
            self.leadership.end_terms();
            let _ = stop_term.send(());
            let _ = term.await;
            // A follower exports no per-node figures: the leader's are the current ones.
            self.metrics.tls.retain(|_, _| false);
            if stopping {
                stop(elector).await;
                return Ok(());
            }
            tracing::warn!(%identity, "lost the leader lease: stopped reconciling");
        }
    }
}

/// Ready when the last round about the Lease completed `since` ago, within `lease_duration`.
fn lease_readiness(since: Option<Duration>, lease_duration: Duration) -> Result<(), String> {
    match since {
        None => Err("waiting for a first leader election round with the API server".to_owned()),
        Some(since) if since > lease_duration => Err(format!(
            "no leader election round has reached the API server for {}s (the lease lasts {}s): see the log",
            since.as_secs(),
            lease_duration.as_secs()
        )),
        Some(_) => Ok(()),
    }
}

/// Why a leadership term stopped.
#[derive(Debug, PartialEq, Eq)]
enum TermEnd {
    /// The Lease went to another replica (or could not be renewed).
    LeaseLost,
    /// The process is shutting down.
    Shutdown,
    /// The term's task ended on its own, which it does only when it panicked or its controller
    /// stream ended: nothing reconciles any more.
    Ended(String),
}

/// Waits for the end of a running term: the Lease lost, shutdown, or the term's own end.
async fn supervise(
    term: &mut tokio::task::JoinHandle<()>,
    leading: &mut watch::Receiver<bool>,
    shutdown: impl Future<Output = ()>,
) -> TermEnd {
    tokio::select! {
        _ = leading.wait_for(|leading| !*leading) => TermEnd::LeaseLost,
        () = shutdown => TermEnd::Shutdown,
        ended = term => TermEnd::Ended(match ended {
            Err(error) if error.is_panic() => "it panicked".to_owned(),
            Err(error) => error.to_string(),
            Ok(()) => "its controller stopped".to_owned(),
        }),
    }
}

/// One stretch of reconciling (a leadership term, or the whole run without leader election).
struct Term {
    client: Client,
    config: ControllerConfig,
    ca_bundle: Option<Vec<u8>>,
    client_ca: Option<String>,
    metrics: Arc<ControllerMetrics>,
    leadership: Leadership,
    instance: Option<String>,
}

/// A watch of `K` over `scope` with `config`, managedFields dropped, feeding `writer` (and
/// `observe`, with every event); yields the changed objects `keep` accepts. Errors are logged
/// here; each watch backs off on its own.
fn watch_into<K>(
    client: Client,
    scope: &WatchScope,
    config: watcher::Config,
    writer: reflector::store::Writer<K>,
    what: &'static str,
    observe: impl Fn(&watcher::Event<K>) + Send + 'static,
    keep: impl Fn(&K) -> bool + Send + 'static,
) -> impl futures::Stream<Item = K> + Send + 'static
where
    K: kube::Resource<DynamicType = (), Scope = k8s_openapi::NamespaceResourceScope>
        + Clone
        + serde::de::DeserializeOwned
        + std::fmt::Debug
        + Send
        + Sync
        + 'static,
{
    reflector::reflector(
        writer,
        scoped_watcher(client, scope, config)
            .modify(|object: &mut K| object.managed_fields_mut().clear()),
    )
    .inspect(move |event| {
        if let Ok(event) = event {
            observe(event);
        }
    })
    .touched_objects()
    .predicate_filter(predicates::resource_version, PredicateConfig::default())
    .filter_map(triggers(what, keep))
}

/// The watch events that wake nodes: the objects `keep` accepts. Errors are logged here (each
/// watch backs off on its own).
fn triggers<K>(
    what: &'static str,
    keep: impl Fn(&K) -> bool,
) -> impl FnMut(Result<K, watcher::Error>) -> std::future::Ready<Option<K>> {
    move |result| {
        std::future::ready(match result {
            Ok(object) if keep(&object) => Some(object),
            Ok(_) => None,
            Err(error) => {
                tracing::warn!(watch = what, error = %seinode_tls_crds::error_chain(&error), "watch failed; retrying with backoff");
                None
            }
        })
    }
}

/// What a watch event or a finished sidecar call wakes.
enum Wake {
    /// A node's own event, with the node.
    Node(Arc<SeiNode>),
    /// The nodes another object names (looked up in the store).
    Named(Vec<ObjectRef<SeiNode>>),
}

/// Queues the nodes `triggers` wake, with the priority `priority` gives each, until the
/// triggers end.
async fn feed(
    triggers: impl futures::Stream<Item = Wake>,
    queue: &dispatch::Queue,
    store: &reflector::Store<SeiNode>,
    priority: impl Fn(Arc<SeiNode>) -> dispatch::Priority,
) {
    futures::pin_mut!(triggers);
    while let Some(wake) = triggers.next().await {
        match wake {
            // Until the first list completes the store is empty: a node's own event carries it.
            Wake::Node(node) => queue.trigger(ObjectRef::from_obj(&*node), priority(node)),
            Wake::Named(keys) => {
                for key in keys {
                    // Not in the store: gone (its owned objects follow it), or listed and not
                    // in the store yet (its own event queues it).
                    if let Some(node) = store.get(&key) {
                        queue.trigger(key, priority(node));
                    }
                }
            }
        }
    }
}

/// The SeiNodes that own `object`.
fn owners_of(object: &impl kube::Resource) -> Vec<ObjectRef<SeiNode>> {
    let namespace = object.meta().namespace.as_deref();
    object
        .owner_references()
        .iter()
        .filter_map(|owner| ObjectRef::from_owner_ref(namespace, owner, ()))
        .collect()
}

/// The CA bundle the node proxies are to trust for the controller's client certificate.
fn read_client_ca(path: &std::path::Path) -> Result<String, ControllerError> {
    let error = |reason: String| ControllerError::Config {
        flag: "--sidecar-client-ca-file",
        reason,
    };
    let pem = std::fs::read_to_string(path)
        .map_err(|e| error(format!("failed to read {}: {e}", path.display())))?;
    if !pem.contains("-----BEGIN CERTIFICATE-----") {
        return Err(error(format!(
            "{} holds no PEM CERTIFICATE",
            path.display()
        )));
    }
    Ok(pem)
}

/// The first 8 bytes of a SHA-256 of `parts`, in hex: a stable name for what they describe.
pub(crate) fn short_digest<'a>(parts: impl IntoIterator<Item = &'a [u8]>) -> String {
    use sha2::{Digest, Sha256};
    let mut hasher = Sha256::new();
    for part in parts {
        hasher.update(part);
    }
    hasher.finalize()[..8]
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

impl Term {
    /// Reconciles SeiNodes until `shutdown`: the watches of nodes, their owned objects, Pods and
    /// TLS Secrets trigger them into the dispatch, whose workers reconcile them.
    async fn run(self, shutdown: impl Future<Output = ()> + Send + 'static) {
        let client = self.client;
        let scope = self.config.watch_scope.clone();
        let latest = Latest::default();
        let own = latest.clone();
        let (reader, writer) = reflector::store();
        let index = Arc::new(SecretIndex::default());
        let node_index = index.clone();
        let node_stream = watch_into::<SeiNode>(
            client.clone(),
            &scope,
            watcher::Config::default(),
            writer,
            "SeiNode",
            move |event| node_index.apply(event),
            // Not the events of the controller's own writes: the reconcile that wrote went on.
            move |node| !own.is_own(node),
        );

        let owned = watcher::Config::default().labels(&format!(
            "{}={}",
            resources::MANAGED_BY_LABEL,
            resources::MANAGED_BY
        ));
        let (config_maps, cm_writer) = reflector::store();
        let (services, svc_writer) = reflector::store();
        let (stateful_sets, sts_writer) = reflector::store();
        let cm_stream = watch_into::<Compact<ConfigMap>>(
            client.clone(),
            &scope,
            owned.clone(),
            cm_writer,
            "ConfigMap",
            |_| {},
            |_| true,
        );
        let svc_stream = watch_into::<Compact<Service>>(
            client.clone(),
            &scope,
            owned.clone(),
            svc_writer,
            "Service",
            |_| {},
            |_| true,
        );
        let sts_stream = watch_into::<Compact<StatefulSet>>(
            client.clone(),
            &scope,
            owned.clone(),
            sts_writer,
            "StatefulSet",
            |_| {},
            |_| true,
        );
        // The node pods (their StatefulSet's template carries the label): where a sidecar is
        // dialed, and a pod that starts or turns ready wakes its node's sidecar task.
        let (pods, pod_writer) = reflector::store();
        let pod_stream = watch_into::<Compact<Pod>>(
            client.clone(),
            &scope,
            owned,
            pod_writer,
            "Pod",
            |_| {},
            |_| true,
        );
        // Metadata only: each Secret's version (a reconcile reads a Secret only when its version
        // moved), and the Secrets some node names wake those nodes.
        let secret_index = index.clone();
        let secret_versions = Arc::new(SecretVersions::default());
        let versions = secret_versions.clone();
        let secrets = watch_tls_secrets(client.clone(), &scope)
            .inspect(move |event| {
                if let Ok(event) = event {
                    versions.apply(event);
                }
            })
            .touched_objects()
            // Named first: the predicate keeps a version per Secret it passes, which for every TLS
            // Secret in the cluster (10,000 in the scale benchmark) would be memory for nothing.
            .try_filter(move |secret: &SecretMeta| {
                std::future::ready(
                    secret_index
                        .is_named(&secret.namespace().unwrap_or_default(), &secret.name_any()),
                )
            })
            .predicate_filter(predicates::resource_version, PredicateConfig::default())
            .filter_map(triggers("Secret", |_| true));

        let instance = self
            .instance
            .unwrap_or_else(|| self.config.reporter.clone());
        let (calls, mut called) =
            calls::SidecarCalls::new(usize::from(self.config.max_concurrent_probes));
        // A finished sidecar call wakes its node.
        let called = futures::stream::poll_fn(move |cx| called.poll_recv(cx));
        let ctx = Arc::new(Context::new(
            client.clone(),
            self.config,
            self.ca_bundle,
            self.client_ca,
            self.metrics,
            reader.clone(),
            OwnedStores::new(config_maps, services, stateful_sets, pods),
            self.leadership,
            instance,
            latest,
            secret_versions,
            calls,
        ));
        let pruning = {
            let ctx = ctx.clone();
            tokio::spawn(async move {
                let mut tick = tokio::time::interval(std::time::Duration::from_secs(60));
                loop {
                    tick.tick().await;
                    ctx.prune();
                }
            })
        };
        // What wakes a node: its own changes, those of the objects it owns, of its Pod and of
        // its Secret, and a finished sidecar call.
        let triggers = futures::stream::select_all([
            node_stream.map(|node| Wake::Node(Arc::new(node))).boxed(),
            cm_stream
                .map(|object| Wake::Named(owners_of(&object)))
                .boxed(),
            svc_stream
                .map(|object| Wake::Named(owners_of(&object)))
                .boxed(),
            sts_stream
                .map(|object| Wake::Named(owners_of(&object)))
                .boxed(),
            pod_stream
                .map(|pod| {
                    let node = pod.labels().get(resources::NODE_LABEL);
                    Wake::Named(
                        node.zip(pod.namespace())
                            .map(|(node, namespace)| ObjectRef::new(node).within(&namespace))
                            .into_iter()
                            .collect(),
                    )
                })
                .boxed(),
            secrets
                .map(move |secret| {
                    let namespace = secret.namespace().unwrap_or_default();
                    Wake::Named(index.nodes_for(&namespace, &secret.name_any()))
                })
                .boxed(),
            called.map(|node| Wake::Named(vec![node])).boxed(),
        ]);
        let queue = dispatch::Queue::default();
        let feed = feed(triggers, &queue, &ctx.store, |node| {
            reconcile::priority_of(&ctx, node)
        });
        let stop = async {
            tokio::select! {
                () = shutdown => {}
                () = feed => tracing::warn!("every watch of the controller ended"),
            }
            // The running reconciles finish; no other starts.
            ctx.calls.close();
            queue.close();
        };
        let workers = async {
            // A node is looked up in the store when its turn comes: not before the first list.
            // (A dropped writer, the term ending, ends the wait too.)
            let _ = reader.wait_until_ready().await;
            futures::future::join_all(
                (0..ctx.config.max_concurrent_reconciles).map(|_| reconcile::work(&queue, &ctx)),
            )
            .await
        };
        futures::future::join(stop, workers).await;
        pruning.abort();
        tracing::info!("controller stopped");
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;

    fn listed_node(name: &str) -> SeiNode {
        let mut node = decide::tests::node("ghcr.io/sei-protocol/sei:v6.3.0", 1);
        node.metadata.name = Some(name.to_owned());
        node.metadata.namespace = Some("ns".to_owned());
        node.metadata.uid = Some(format!("uid-{name}"));
        node.metadata.resource_version = Some("1".to_owned());
        node
    }

    /// Nodes that exist before the controller starts come in the first list, while kube's
    /// store is still empty (it swaps the list in at `InitDone`): each is queued from its own
    /// event, and what other objects name is looked up once the store holds it.
    #[tokio::test]
    async fn nodes_of_the_first_list_are_queued_before_the_store_holds_them() {
        let (store, writer) = reflector::store::<SeiNode>();
        let listed = ["a", "b", "c"].map(listed_node);
        let mut events = vec![watcher::Event::Init];
        events.extend(listed.iter().cloned().map(watcher::Event::InitApply));
        events.push(watcher::Event::InitDone);
        let nodes = reflector::reflector(
            writer,
            futures::stream::iter(events.into_iter().map(Ok::<_, watcher::Error>)),
        )
        .touched_objects()
        .filter_map(|node| std::future::ready(node.ok()))
        .map(|node| Wake::Node(Arc::new(node)));
        let a = ObjectRef::from_obj(&listed[0]);
        let named = futures::stream::iter([Wake::Named(vec![
            a.clone(),
            ObjectRef::new("gone").within("ns"),
        ])]);
        let queue = dispatch::Queue::default();
        let seen = std::sync::Mutex::new(Vec::new());
        feed(nodes.chain(named), &queue, &store, |node| {
            seen.lock()
                .unwrap()
                .push(node.metadata.name.clone().unwrap());
            dispatch::Priority::of(&node)
        })
        .await;
        assert_eq!(store.len(), 3, "the list is in the store once it is done");
        assert_eq!(
            queue.len(),
            3,
            "every listed node is queued; a gone one is not"
        );
        assert_eq!(*seen.lock().unwrap(), ["a", "b", "c", "a"]);
    }

    /// `/readyz` of the `controller` command: not ready before a first round about the Lease,
    /// ready within a lease duration of the last, not ready again once rounds stop succeeding.
    #[test]
    fn readiness_follows_the_last_round_with_the_api_server() {
        let lease = Duration::from_secs(15);
        let waiting = lease_readiness(None, lease).unwrap_err();
        assert!(waiting.contains("first leader election round"), "{waiting}");
        assert_eq!(lease_readiness(Some(Duration::from_secs(2)), lease), Ok(()));
        assert_eq!(lease_readiness(Some(lease), lease), Ok(()));
        let stale = lease_readiness(Some(Duration::from_secs(16)), lease).unwrap_err();
        assert_eq!(
            stale,
            "no leader election round has reached the API server for 16s (the lease lasts 15s): see the log"
        );
    }

    /// A term whose task ends on its own (a panic in a reconcile, or its controller stream
    /// ending) is told apart from the Lease lost and from shutdown, so that `run` releases the
    /// Lease and fails rather than keep renewing a Lease nobody reconciles under.
    #[tokio::test]
    async fn a_term_that_panics_or_stops_is_an_unexpected_end() {
        let never = std::future::pending::<()>;
        let (_leading_tx, mut leading) = watch::channel(true);

        let mut panicking = tokio::spawn(async {
            tokio::time::sleep(Duration::from_millis(10)).await;
            panic!("a reconcile panicked");
        });
        assert_eq!(
            supervise(&mut panicking, &mut leading, never()).await,
            TermEnd::Ended("it panicked".to_owned())
        );

        let mut stopped = tokio::spawn(async {});
        assert_eq!(
            supervise(&mut stopped, &mut leading, never()).await,
            TermEnd::Ended("its controller stopped".to_owned())
        );

        let mut running = tokio::spawn(never());
        assert_eq!(
            supervise(&mut running, &mut leading, async {}).await,
            TermEnd::Shutdown
        );
        let (leading_tx, mut leading) = watch::channel(true);
        let lose = tokio::spawn(async move {
            tokio::time::sleep(Duration::from_millis(10)).await;
            leading_tx.send_replace(false);
            leading_tx
        });
        assert_eq!(
            supervise(&mut running, &mut leading, never()).await,
            TermEnd::LeaseLost
        );
        running.abort();
        drop(lose.await);
    }
}
