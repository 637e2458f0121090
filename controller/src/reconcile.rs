//! One reconcile of a SeiNode: observe (the Secret, the owned objects, the sidecar), decide
//! (`decide`, pure), act (write the status with the resourceVersion it was decided from, then
//! publish the events, then run at most one task and record it).

use parking_lot::Mutex;
use std::collections::{HashMap, HashSet};
use std::sync::Arc;
use std::time::{Duration, Instant};

use futures::FutureExt as _;
use futures::future::{BoxFuture, Shared};
use jiff::Timestamp;
use k8s_openapi::api::apps::v1::StatefulSet;
use k8s_openapi::api::core::v1::{ConfigMap, Pod, Service};
use k8s_openapi::api::events::v1::Event;
use kube::api::{Patch, PatchParams, PostParams};
use kube::runtime::controller::Action;
use kube::runtime::reflector::{ObjectRef, Store};
use kube::{Api, Client, Resource, ResourceExt};
use seinode_tls_crds::contract::required_dns_names;
use seinode_tls_crds::validation::{InspectedSecret, LeafCertificate, SecretVerdict};
use seinode_tls_crds::{PlanPhase, SeiNode, SeiNodePhase, SeiNodeStatus, TaskFailureReason};
use serde::Serialize;
use serde::de::DeserializeOwned;
use thiserror::Error;

use crate::calls::{CallKind, Finished, SidecarCalls};
use crate::compact::Compact;
use crate::config::ControllerConfig;
use crate::decide::{
    Decision, IN_THE_WAY, ObjectState, Objects, Observed, Outcome, SIDECAR_TASK_RETRY, Settings,
    TaskFailure, decide,
};
use crate::drift::{stamp, state};
use crate::events::NodeEvent;
use crate::leader::Leadership;
use crate::metrics::{ControllerMetrics, NodeTls, OutcomeLabels, ProbeLabels, ReconcileOutcome};
use crate::plan::{Task, next_task};
use crate::resources;
use crate::secrets::SecretJudge;
use crate::sidecar::{ProbeResult, SidecarClient, Target, TaskProgress, TlsTarget, task_id};
use crate::slots::{Priority, Slots};
use seinode_tls_crds::versions::SecretVersions;

/// Field manager of everything the controller applies.
pub const FIELD_MANAGER: &str = "seinode-tls-controller";
/// Backoff bounds for transient errors (before jitter).
const BACKOFF_MIN: Duration = Duration::from_millis(500);
const BACKOFF_MAX: Duration = Duration::from_secs(300);
/// The least time between two `mark-ready` calls of a node.
const MARK_READY_GAP: Duration = Duration::from_secs(1);
/// How long a reconcile waits for the first list of the owned objects.
const SYNC_WAIT: Duration = Duration::from_secs(10);
/// A reconcile re-observes at most this often after its status write conflicted.
const CONFLICT_ATTEMPTS: usize = 3;

/// Errors of a reconcile. All of them are transient (API calls); permanent problems (an invalid
/// image, an object in the way) are not errors but a failed task, a condition and an event.
#[derive(Debug, Error)]
pub enum Error {
    #[error("failed to {verb} {kind} {namespace}/{name}")]
    Api {
        verb: &'static str,
        kind: String,
        namespace: String,
        name: String,
        #[source]
        source: kube::Error,
    },
    #[error(
        "the ConfigMap, Service, StatefulSet and Pod watches have not listed yet (see their warnings)"
    )]
    NotSynced,
    #[error(
        "the status of SeiNode {namespace}/{name} changed while it was being decided ({CONFLICT_ATTEMPTS} times in a row)"
    )]
    Conflict { namespace: String, name: String },
}

/// The watched state of the objects nodes own (labelled, managedFields dropped, kept compact).
#[derive(Clone)]
pub struct OwnedStores {
    pub config_maps: Store<Compact<ConfigMap>>,
    pub services: Store<Compact<Service>>,
    pub stateful_sets: Store<Compact<StatefulSet>>,
    /// The node pods (labelled by the StatefulSets' template): where to dial a sidecar.
    pub pods: Store<Compact<Pod>>,
    listed: Shared<BoxFuture<'static, ()>>,
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
        // their slot until `SYNC_WAIT` polled them again (a node decided 10 s late).
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
    client_ca: Option<String>,
    /// The reflector's view of SeiNodes.
    pub store: Store<SeiNode>,
    pub owned: OwnedStores,
    pub leadership: Leadership,
    /// Who reports events (`reportingInstance`).
    pub instance: String,
    /// `--max-concurrent-reconciles` slots for API work, undecided nodes first.
    pub slots: Slots,
    /// What this process remembers per node uid between reconciles.
    memory: Mutex<HashMap<String, NodeMemory>>,
    /// The node as this controller's last status write returned it: the watch may still hand
    /// out an older version, and deciding from that would run finished tasks again. (Shared
    /// with the SeiNode watch, so apart from `memory`.)
    latest: Latest,
}

/// What this process remembers about one node between its reconciles; dropped by
/// [`Context::prune`] once the node is gone.
#[derive(Debug, Default)]
struct NodeMemory {
    /// Failed reconciles in a row: the backoff's count.
    failures: u32,
    /// The notAfter (seconds) of the certificate the node was last warned about: one value a
    /// node, however often its certificate is renewed.
    expiry_warned: Option<i64>,
    /// Reconciled by this process already (its first look re-sends the events a killed
    /// predecessor may have lost).
    seen: bool,
    /// Events decided and not yet created (the API refused them, or they wait behind urgent
    /// nodes): sent first by the node's next reconcile.
    unsent: Vec<NodeEvent>,
}

/// Per node uid, the node as the controller last wrote (or read) it; shared with the SeiNode
/// watch, which drops the events of the controller's own writes (the reconcile that wrote
/// already went on from there).
#[derive(Clone, Default)]
pub struct Latest(Arc<Mutex<HashMap<String, Arc<SeiNode>>>>);

impl Latest {
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
            slots: Slots::new(usize::from(config.max_concurrent_reconciles)),
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
    fn remember<T>(&self, node: &SeiNode, f: impl FnOnce(&mut NodeMemory) -> T) -> T {
        f(self.memory.lock().entry(uid(node)).or_default())
    }

    fn settings(&self) -> Settings {
        Settings {
            cluster_domain: self.config.cluster_domain.clone(),
            cert_expiry_warning: self.config.cert_expiry_warning,
            sidecar_probe_interval: self.config.sidecar_probe_interval,
        }
    }

    /// The newest version of `cached` this controller knows: its own last write, unless the
    /// watch has caught up with it or the spec moved on since.
    fn newest(&self, cached: Arc<SeiNode>) -> Arc<SeiNode> {
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

/// kube-runtime entry point: one reconcile, with metrics and the backoff bookkeeping.
pub async fn reconcile(node: Arc<SeiNode>, ctx: Arc<Context>) -> Result<Action, Error> {
    let newest = ctx.newest(node.clone());
    // The sidecar is called apart: what a finished call found, and a call started if due.
    let called = sidecar_calls(&newest, &ctx);
    let Some(slot) = ctx.slots.acquire(priority(&newest)).await else {
        // The term is over.
        return Ok(Action::await_change());
    };
    // The wait for a slot can be long (a cold start): the node may have changed, or gone.
    let Some(node) = ctx.store.get(&ObjectRef::from_obj(&*node)) else {
        return Ok(Action::await_change());
    };
    let started = Instant::now();
    // `seinode`, not `name`: a JSON log line's span object has its own `name` (the span's).
    let span = tracing::info_span!("reconcile", namespace = %node.namespace().unwrap_or_default(), seinode = %node.name_any());
    // Boxed: every queued node's reconcile waits above for a slot, and an unboxed future is as
    // large as its largest state (the whole reconcile) while it waits.
    let result = Box::pin(tracing::Instrument::instrument(
        reconcile_newest(node.clone(), &ctx, slot.priority(), called),
        span,
    ))
    .await;
    drop(slot);
    ctx.metrics
        .reconcile_duration
        .observe(started.elapsed().as_secs_f64());
    let outcome = if result.is_ok() {
        ReconcileOutcome::success
    } else {
        ReconcileOutcome::error
    };
    ctx.metrics
        .reconciles
        .get_or_create(&OutcomeLabels { outcome })
        .inc();
    match result {
        Ok(Step::Done(action)) => {
            ctx.remember(&node, |memory| memory.failures = 0);
            Ok(action)
        }
        // The Secret could not be read: like an error, with backoff, without logging one.
        // (`reconcile_newest` answers a conflict itself, by deciding again.)
        Ok(Step::Retry | Step::Conflict) => Ok(Action::requeue(backoff(&ctx, &node))),
        Err(error) => Err(error),
    }
}

/// kube-runtime error policy: exponential backoff per node with jitter, 0.5 s to 5 min.
pub fn error_policy(node: Arc<SeiNode>, error: &Error, ctx: Arc<Context>) -> Action {
    let delay = backoff(&ctx, &node);
    tracing::warn!(
        error = %seinode_tls_crds::error_chain(error),
        namespace = %node.namespace().unwrap_or_default(),
        seinode = %node.name_any(),
        retry_in = ?delay,
        "reconcile failed"
    );
    Action::requeue(delay)
}

fn backoff(ctx: &Context, node: &SeiNode) -> Duration {
    ctx.remember(node, |memory| {
        memory.failures = memory.failures.saturating_add(1);
        jittered(memory.failures)
    })
}

/// The delay before retry `count` (1-based): doubling from [`BACKOFF_MIN`] up to
/// [`BACKOFF_MAX`], each drawn uniformly from its upper half, so retries of many nodes spread.
pub fn jittered(count: u32) -> Duration {
    let ceiling = BACKOFF_MIN
        .saturating_mul(1 << count.saturating_sub(1).min(12))
        .min(BACKOFF_MAX);
    ceiling / 2 + ceiling.mul_f64(fastrand::f64() / 2.0)
}

fn uid(node: &SeiNode) -> String {
    node.uid().unwrap_or_else(|| node.name_any())
}

fn pod_host(node: &SeiNode, cluster_domain: &str) -> String {
    let namespace = node.namespace().unwrap_or_default();
    seinode_tls_crds::contract::pod_dns_name(&node.name_any(), &namespace, cluster_domain)
}

/// How a reconcile ended.
enum Step {
    Done(Action),
    /// A transient problem the decision saw (retried with backoff).
    Retry,
    /// The status write found the node changed since it was read: read it again, decide again.
    Conflict,
}

/// Reconciles from the newest known version; a status write that finds the node changed
/// re-reads it and decides again (never forcing a status decided from an older one).
async fn reconcile_newest(
    cached: Arc<SeiNode>,
    ctx: &Context,
    priority: Priority,
    called: Called,
) -> Result<Step, Error> {
    let mut node = ctx.newest(cached);
    for _ in 0..CONFLICT_ATTEMPTS {
        match reconcile_node(&node, ctx, priority, called.clone()).await? {
            Step::Conflict => {
                let namespace = node.namespace().unwrap_or_default();
                let api: Api<SeiNode> = Api::namespaced(ctx.client.clone(), &namespace);
                let fresh = api.get_opt(&node.name_any()).await.map_err(|source| {
                    api_error("read", "SeiNode", &namespace, &node.name_any(), source)
                })?;
                let Some(fresh) = fresh else {
                    return Ok(Step::Done(Action::await_change()));
                };
                let fresh = Arc::new(fresh);
                ctx.latest.0.lock().insert(uid(&fresh), fresh.clone());
                node = fresh;
            }
            step => return Ok(step),
        }
    }
    Err(Error::Conflict {
        namespace: node.namespace().unwrap_or_default(),
        name: node.name_any(),
    })
}

/// Urgent: a node with no status yet, or a TLS node whose Secret is not (yet) judged ready: its
/// user waits on this verdict, and its reconcile is short (one Secret check, at most one
/// status write), so a Secret that arrives or is fixed does not queue behind plan work.
fn priority(node: &SeiNode) -> Priority {
    let waiting = node.status.as_ref().is_none_or(|status| {
        let conditions = status.conditions.as_deref().unwrap_or_default();
        crate::plan::gate(node.sidecar_tls().is_some(), conditions) != crate::plan::Gate::Open
    });
    if waiting {
        Priority::Urgent
    } else {
        Priority::Normal
    }
}

/// One observe → decide → act round (two decides when a task ran). `None`: the status changed
/// under the decision; read it again.
async fn reconcile_node(
    node: &Arc<SeiNode>,
    ctx: &Context,
    priority: Priority,
    mut called: Called,
) -> Result<Step, Error> {
    if node.meta().deletion_timestamp.is_some() {
        return Ok(Step::Done(Action::await_change()));
    }
    // Until the owned objects are listed, every one would look missing.
    if tokio::time::timeout(SYNC_WAIT, ctx.owned.listed())
        .await
        .is_err()
    {
        return Err(Error::NotSynced);
    }
    send_unsent(ctx, node).await;
    let now = Timestamp::now();
    let mut base = node.status.clone().unwrap_or_default();
    let desired = Desired::of(node, ctx);
    let mut observed = observe(node, &base, ctx, &desired, now).await;
    if probe_due(&base, &observed) {
        observed.probe = called.probe.take();
    }
    let settings = ctx.settings();
    let mut current = node.clone();
    loop {
        let decision = decide(&current, &base, &observed, &settings, now);
        if !ctx.leadership.is_leading() {
            return Ok(Step::Done(Action::await_change()));
        }
        let wrote = decision.status != base;
        if wrote {
            match write_status(ctx, &current, &decision.status).await? {
                Some(written) => current = written,
                None => return Ok(Step::Conflict),
            }
        }
        if priority == Priority::Urgent && wrote && self::priority(&current) == Priority::Normal {
            // Decided, and published in the status: its events and the plan's work wait behind
            // the nodes still waiting for their decision (a node's condition is what its user
            // reads). Nothing is held meanwhile: the events wait in `unsent`, which the node's
            // next reconcile sends first (a successor process re-sends recent flips itself).
            ctx.remember(node, |memory| {
                memory.unsent.extend(decision.events.iter().cloned());
                memory.seen = true;
            });
            return Ok(Step::Done(Action::requeue(Duration::ZERO)));
        }
        publish(ctx, &current, &decision.events).await;
        if observed.first_sight {
            ctx.remember(node, |memory| memory.seen = true);
        }
        base = decision.status.clone();
        observed.first_sight = false;
        let Decision {
            task,
            requeue,
            transient,
            ..
        } = decision;
        let Some(task) = task else {
            if transient {
                return Ok(Step::Retry);
            }
            return Ok(Step::Done(Action::requeue(requeue)));
        };
        if observed.ran.is_some() {
            // One task per reconcile: the next one waits its turn behind other nodes.
            return Ok(Step::Done(Action::requeue(Duration::ZERO)));
        }
        if !ctx.leadership.is_leading() {
            return Ok(Step::Done(Action::await_change()));
        }
        let outcome = if task == Task::MarkSidecarReady {
            // Called apart (see `sidecar_calls`): the call started or running wakes the node
            // when it finishes; this is the fallback.
            match called.mark_ready.take() {
                Some(outcome) => outcome,
                None => return Ok(Step::Done(Action::requeue(SIDECAR_TASK_RETRY))),
            }
        } else {
            run_task(&current, ctx, task, &observed, &desired).await?
        };
        if outcome == Outcome::Done {
            set_state(&mut observed.objects, task, ObjectState::Current);
        }
        observed.ran = Some((task, outcome));
    }
}

fn set_state(objects: &mut Objects, task: Task, state: ObjectState) {
    match task {
        Task::ApplyRbacProxyConfig => objects.config_map = state,
        Task::ApplyService => objects.service = state,
        Task::ApplyStatefulSet => objects.stateful_set = state,
        Task::MarkSidecarReady | Task::AwaitStatefulSetReady => {}
    }
}

/// Reads what the decision needs: the Secret's verdict (one GET, parsed once per version), the
/// owned objects (from the watches) and, for a settled Running node, the sidecar probe.
async fn observe(
    node: &SeiNode,
    base: &SeiNodeStatus,
    ctx: &Context,
    desired: &Desired,
    now: Timestamp,
) -> Observed {
    let namespace = node.namespace().unwrap_or_default();
    let name = node.name_any();
    let mut observed = Observed {
        leading: ctx.leadership.is_leading(),
        first_sight: !ctx.remember(node, |memory| memory.seen),
        objects: objects(node, ctx, desired),
        ..Observed::default()
    };
    if let Some((verdict, inspected)) = judge_secret(node, ctx, now).await {
        if let Some(InspectedSecret::Usable(usable)) = inspected.as_deref() {
            // When the whole path is valid: the leaf's, or a later issuer's, notBefore.
            observed.not_before = Some(usable.valid_from());
        }
        let warned = ctx.remember(node, |memory| memory.expiry_warned);
        observed.expiry_warned = verdict
            .not_after
            .is_some_and(|not_after| warned == Some(not_after.as_second()));
        ctx.metrics.tls.set(
            &namespace,
            &name,
            NodeTls {
                reason: verdict.reason,
                not_after: verdict.not_after,
                running: base.phase == Some(SeiNodePhase::Running),
            },
        );
        observed.verdict = Some(verdict);
    } else {
        ctx.metrics.tls.remove(&namespace, &name);
    }
    observed
}

/// Whether a node's sidecar is probed: Running, its plan settled, its Secret ready.
fn probe_due(base: &SeiNodeStatus, observed: &Observed) -> bool {
    let settled = base
        .plan
        .as_ref()
        .is_none_or(|p| p.phase != PlanPhase::Active);
    let gate_open = observed.verdict.as_ref().is_none_or(|v| v.is_ready());
    base.phase == Some(SeiNodePhase::Running) && settled && gate_open && observed.leading
}

/// What the node's finished sidecar calls found, for this reconcile.
#[derive(Clone, Debug, Default)]
struct Called {
    probe: Option<ProbeResult>,
    mark_ready: Option<Outcome>,
}

/// Takes the results of the node's finished sidecar calls, and starts the call the node looks
/// due for (a probe for a Running node with a settled plan, at most once per probe interval;
/// `mark-ready` for a plan at `MarkSidecarReady`, at most once per [`MARK_READY_GAP`]).
/// Never waits on a sidecar (the reconcile checks again whether a result applies).
fn sidecar_calls(node: &Arc<SeiNode>, ctx: &Arc<Context>) -> Called {
    let uid = uid(node);
    let mut called = Called::default();
    if let Some(Finished::Probe(result)) = ctx.calls.take(&uid, CallKind::Probe) {
        called.probe = Some(result);
    }
    if let Some(Finished::MarkReady(outcome)) = ctx.calls.take(&uid, CallKind::MarkReady) {
        called.mark_ready = Some(outcome);
    }
    let Some(status) = node.status.as_ref() else {
        return called;
    };
    let next = status
        .plan
        .as_ref()
        .and_then(next_task)
        .and_then(|(_, task)| task);
    let (kind, gap) = if next == Some(Task::MarkSidecarReady) {
        if called.mark_ready.is_some() {
            return called;
        }
        // A second apart at least; the decision requeues after SIDECAR_TASK_RETRY, and the
        // Pod watch wakes the node sooner when its pod moves.
        (CallKind::MarkReady, MARK_READY_GAP)
    } else if status.phase == Some(SeiNodePhase::Running) && next.is_none() {
        if called.probe.is_some() {
            return called;
        }
        (CallKind::Probe, ctx.config.sidecar_probe_interval)
    } else {
        return called;
    };
    if !ctx.leadership.is_leading() {
        return called;
    }
    let (node, task_ctx) = (node.clone(), ctx.clone());
    ctx.calls
        .start(&uid, ObjectRef::from_obj(&*node), kind, gap, async move {
            call_sidecar(&node, &task_ctx, kind).await
        });
    called
}

/// The verdict on a TLS node's Secret at `now` (parsed once per version, so a second caller
/// reads nothing), and its inspection; `None` for a node without TLS.
async fn judge_secret(
    node: &SeiNode,
    ctx: &Context,
    now: Timestamp,
) -> Option<(SecretVerdict, Option<Arc<InspectedSecret>>)> {
    let tls = node.sidecar_tls()?;
    let namespace = node.namespace().unwrap_or_default();
    let required = required_dns_names(&node.name_any(), &namespace, &ctx.config.cluster_domain);
    Some(
        ctx.secrets
            .verdict(&ctx.client, &namespace, &tls.secret_name, &required, now)
            .await,
    )
}

/// One sidecar call of `kind` for `node`, with the Secret's leaf it needs.
async fn call_sidecar(node: &SeiNode, ctx: &Context, kind: CallKind) -> Finished {
    let leaf = match judge_secret(node, ctx, Timestamp::now()).await {
        Some((verdict, inspected)) => match inspected.as_deref() {
            Some(InspectedSecret::Usable(usable)) if verdict.is_ready() => Some(usable.clone()),
            _ => None,
        },
        None => None,
    };
    match kind {
        CallKind::MarkReady => {
            Finished::MarkReady(mark_sidecar_ready(node, ctx, leaf.as_ref()).await)
        }
        CallKind::Probe => {
            let result = probe(node, ctx, leaf.as_ref()).await;
            ctx.metrics
                .probes
                .get_or_create(&ProbeLabels {
                    result: result.reason(),
                })
                .inc();
            Finished::Probe(result)
        }
    }
}

/// Calls the sidecar's health path through its front door.
async fn probe(node: &SeiNode, ctx: &Context, leaf: Option<&LeafCertificate>) -> ProbeResult {
    if node.sidecar_tls().is_some() && leaf.is_none() {
        return ProbeResult::NotProbed(
            "not probed: the node's TLS Secret does not meet the contract (see SidecarTLSSecretReady)".to_owned(),
        );
    }
    match sidecar_target(node, ctx, leaf, false) {
        Ok(target) => ctx.sidecar.probe(&target).await,
        Err(why) => ProbeResult::Unreachable(why),
    }
}

/// Where the node's sidecar is: pod 0 of the StatefulSet the node controls, at the IP its Pod
/// reports (never a DNS answer), on the proxy's port with TLS, else the sidecar's. `current`:
/// only a pod of the StatefulSet's update revision will do (a task must reach the new pod of
/// a roll, not the old one it replaces).
fn sidecar_target(
    node: &SeiNode,
    ctx: &Context,
    leaf: Option<&LeafCertificate>,
    current: bool,
) -> Result<Target, String> {
    let namespace = node.namespace().unwrap_or_default();
    let name = node.name_any();
    let host = pod_host(node, &ctx.config.cluster_domain);
    let pod_name = format!("{name}-0");
    let port = match leaf {
        Some(_) => resources::TLS_PORT,
        None => resources::sidecar_port(node),
    };
    let port = u16::try_from(port).map_err(|_| format!("port {port} is not a TCP port"))?;
    let sts: Option<StatefulSet> = parsed(
        ctx.owned
            .stateful_sets
            .get(&ObjectRef::new(&name).within(&namespace)),
    );
    let sts = sts
        .filter(|sts| controlled_by(&sts.metadata, "SeiNode", &name, node.uid().as_deref()))
        .ok_or_else(|| format!("StatefulSet {namespace}/{name} of this node is not there yet"))?;
    let pod: Option<Pod> = parsed(
        ctx.owned
            .pods
            .get(&ObjectRef::new(&pod_name).within(&namespace)),
    );
    let pod = pod
        .filter(|pod| {
            controlled_by(
                &pod.metadata,
                "StatefulSet",
                &name,
                sts.metadata.uid.as_deref(),
            )
        })
        .ok_or_else(|| {
            format!("pod {namespace}/{pod_name} of StatefulSet {name} is not there yet")
        })?;
    if pod.metadata.deletion_timestamp.is_some() {
        return Err(format!("pod {namespace}/{pod_name} is being deleted"));
    }
    if current {
        let revision = pod
            .metadata
            .labels
            .as_ref()
            .and_then(|l| l.get("controller-revision-hash"));
        let update = sts.status.as_ref().and_then(|s| s.update_revision.as_ref());
        if update.is_none() || revision != update {
            return Err(format!(
                "pod {namespace}/{pod_name} is not of the StatefulSet's current revision yet"
            ));
        }
    }
    let pod_ip = pod
        .status
        .as_ref()
        .and_then(|s| s.pod_ip.as_deref())
        .and_then(|ip| ip.parse().ok());
    let addr = ctx.config.sidecar_addresses.resolve(&host, pod_ip, port)?;
    Ok(Target {
        host,
        addr,
        tls: leaf.map(|leaf| TlsTarget {
            leaf_der: leaf.der.clone(),
            ca_crt: leaf.ca_crt.clone(),
        }),
    })
}

/// Whether `meta`'s controller owner is the `kind` named `name` with `uid`.
fn controlled_by(meta: &kube::api::ObjectMeta, kind: &str, name: &str, uid: Option<&str>) -> bool {
    meta.owner_references.iter().flatten().any(|o| {
        o.controller == Some(true)
            && o.kind == kind
            && o.name == name
            && Some(o.uid.as_str()) == uid
    })
}

/// Runs `mark-ready` on the node's current pod through its front door.
async fn mark_sidecar_ready(
    node: &SeiNode,
    ctx: &Context,
    leaf: Option<&LeafCertificate>,
) -> Outcome {
    const KIND: &str = "mark-ready";
    if node.sidecar_tls().is_some() && leaf.is_none() {
        return Outcome::Waiting("the node's TLS Secret is not usable".to_owned());
    }
    let target = match sidecar_target(node, ctx, leaf, true) {
        Ok(target) => target,
        Err(why) => return Outcome::Waiting(why),
    };
    let namespace = node.namespace().unwrap_or_default();
    let pod: Option<Pod> = parsed(
        ctx.owned
            .pods
            .get(&ObjectRef::new(&format!("{}-0", node.name_any())).within(&namespace)),
    );
    let pod_uid = pod.and_then(|p| p.metadata.uid).unwrap_or_default();
    match ctx
        .sidecar
        .run_task(&target, &task_id(&pod_uid, KIND), KIND)
        .await
    {
        TaskProgress::Completed => Outcome::Done,
        TaskProgress::Waiting(why) => Outcome::Waiting(why),
        TaskProgress::Failed(why) => {
            Outcome::Failed(TaskFailure::new(TaskFailureReason::SidecarTaskFailed, why))
        }
    }
}

/// The cached object. One whose JSON does not parse as `K` (the watch keeps the API server's
/// JSON unchecked; never seen) counts as missing, with a warning: the create that follows gets
/// a conflict and reads the object itself.
fn parsed<K: DeserializeOwned + Resource<DynamicType = ()>>(
    compact: Option<Arc<Compact<K>>>,
) -> Option<K> {
    let compact = compact?;
    compact
        .object()
        .inspect_err(|error| {
            tracing::warn!(
                kind = %K::kind(&()),
                namespace = compact.namespace().unwrap_or_default(),
                name = compact.name_any(),
                %error,
                "a watched object does not parse from the cache; treating it as missing"
            );
        })
        .ok()
}

/// What the controller would apply for a node now, built once per reconcile from its spec (and
/// stamped): the observation compares the owned objects against it, and the tasks apply it.
struct Desired {
    config_map: ConfigMap,
    service: Service,
    /// Why the spec cannot make the StatefulSet (an invalid image), when it cannot.
    stateful_set: Result<StatefulSet, String>,
}

impl Desired {
    fn of(node: &SeiNode, ctx: &Context) -> Self {
        Self {
            config_map: stamp(resources::rbac_proxy_config_map(
                node,
                ctx.client_ca.as_deref(),
            )),
            service: stamp(resources::service(node)),
            stateful_set: resources::stateful_set(node, &ctx.config, ctx.client_ca.is_some())
                .map(stamp),
        }
    }
}

/// The owned objects as the watches see them (each parsed once), against what the controller
/// would apply now.
fn objects(node: &SeiNode, ctx: &Context, desired: &Desired) -> Objects {
    let namespace = node.namespace().unwrap_or_default();
    let name = node.name_any();
    let config_map: Option<ConfigMap> = parsed(
        ctx.owned
            .config_maps
            .get(&ObjectRef::new(&resources::rbac_proxy_config_name(node)).within(&namespace)),
    );
    let service: Option<Service> = parsed(
        ctx.owned
            .services
            .get(&ObjectRef::new(&name).within(&namespace)),
    );
    let stateful_set: Option<StatefulSet> = parsed(
        ctx.owned
            .stateful_sets
            .get(&ObjectRef::new(&name).within(&namespace)),
    );
    Objects {
        config_map: state(node, config_map.as_ref(), Some(&desired.config_map)),
        service: state(node, service.as_ref(), Some(&desired.service)),
        stateful_set: state(
            node,
            stateful_set.as_ref(),
            desired.stateful_set.as_ref().ok(),
        ),
        rolled_out: stateful_set.as_ref().is_some_and(|sts| {
            resources::stateful_set_ready(sts)
                && resources::stateful_set_image(sts).as_deref() == Some(node.spec.image.as_str())
        }),
    }
}

/// Runs an apply task: creates a missing object (never adopting one that exists and is not
/// this node's), or applies over an object this node controls.
async fn run_task(
    node: &SeiNode,
    ctx: &Context,
    task: Task,
    observed: &Observed,
    desired: &Desired,
) -> Result<Outcome, Error> {
    let namespace = node.namespace().unwrap_or_default();
    let state = observed.objects.of(task);
    let result = match task {
        Task::ApplyRbacProxyConfig => ensure(ctx, node, &desired.config_map, state).await,
        Task::ApplyService => ensure(ctx, node, &desired.service, state).await,
        Task::ApplyStatefulSet => match &desired.stateful_set {
            Ok(sts) => ensure(ctx, node, sts, state).await,
            Err(error) => {
                return Ok(Outcome::Failed(TaskFailure::new(
                    TaskFailureReason::InvalidSpec,
                    error.clone(),
                )));
            }
        },
        // Called before the slot (see `reconcile_node`); observation decides the await.
        Task::MarkSidecarReady | Task::AwaitStatefulSetReady => return Ok(Outcome::Done),
    };
    match result {
        // The API server refused what we built (say, a name that is not a valid Service name):
        // retrying cannot help, the spec must change.
        Err(Error::Api {
            kind,
            name,
            source: kube::Error::Api(status),
            ..
        }) if (400..500).contains(&status.code) && ![409, 429].contains(&status.code) => {
            Ok(Outcome::Failed(TaskFailure::new(
                TaskFailureReason::RefusedByAPIServer,
                format!(
                    "the API server refused {kind} {namespace}/{name}: {} (HTTP {})",
                    status.message, status.code
                ),
            )))
        }
        other => other,
    }
}

async fn ensure<K>(
    ctx: &Context,
    node: &SeiNode,
    object: &K,
    state: &ObjectState,
) -> Result<Outcome, Error>
where
    K: Resource<Scope = k8s_openapi::NamespaceResourceScope>
        + Serialize
        + DeserializeOwned
        + Clone
        + std::fmt::Debug,
    K::DynamicType: Default,
{
    let namespace = node.namespace().unwrap_or_default();
    let name = object.meta().name.clone().unwrap_or_default();
    let kind = K::kind(&K::DynamicType::default()).into_owned();
    let api: Api<K> = Api::namespaced(ctx.client.clone(), &namespace);
    let in_the_way = |why: &str| {
        Outcome::Failed(TaskFailure::new(
            TaskFailureReason::ObjectInTheWay,
            format!(
                "{kind} {namespace}/{name} {IN_THE_WAY}: {why}, and the controller only manages objects it created for this SeiNode. Delete or rename that {kind} (kubectl -n {namespace} delete {} {name}); the plan retries on its own.",
                kind.to_lowercase()
            ),
        ))
    };
    match state {
        ObjectState::Foreign(why) => return Ok(in_the_way(why)),
        ObjectState::Missing => {
            let params = PostParams {
                field_manager: Some(FIELD_MANAGER.to_owned()),
                ..PostParams::default()
            };
            match api.create(&params, object).await {
                Ok(_) => return Ok(Outcome::Done),
                Err(kube::Error::Api(status)) if status.code == 409 => {
                    // Something holds the name that the watch has not shown (it is not
                    // labelled as ours, or the watch lags): look before applying over it.
                    let existing = api
                        .get_opt(&name)
                        .await
                        .map_err(|source| api_error("read", &kind, &namespace, &name, source))?;
                    if let Some(existing) = existing {
                        match crate::drift::state(node, Some(&existing), None) {
                            ObjectState::Current | ObjectState::Drifted => {}
                            ObjectState::Foreign(why) => return Ok(in_the_way(&why)),
                            ObjectState::Orphaned => return Ok(in_the_way(ORPHANED)),
                            ObjectState::Missing => {}
                        }
                    }
                }
                Err(source) => return Err(api_error("create", &kind, &namespace, &name, source)),
            }
        }
        ObjectState::Orphaned => return Ok(in_the_way(ORPHANED)),
        ObjectState::Current | ObjectState::Drifted => {}
    }
    api.patch(
        &name,
        &PatchParams::apply(FIELD_MANAGER).force(),
        &Patch::Apply(object),
    )
    .await
    .map_err(|source| api_error("apply", &kind, &namespace, &name, source))?;
    Ok(Outcome::Done)
}

/// Why an object of a deleted SeiNode of the same name is in the way.
const ORPHANED: &str =
    "it belongs to a deleted SeiNode of the same name and waits for the garbage collector";

fn api_error(
    verb: &'static str,
    kind: &str,
    namespace: &str,
    name: &str,
    source: kube::Error,
) -> Error {
    Error::Api {
        verb,
        kind: kind.to_owned(),
        namespace: namespace.to_owned(),
        name: name.to_owned(),
        source,
    }
}

/// Replaces the status, on the condition that the node is still the version it was decided
/// from. `None`: it changed (409) or is gone (404); the caller re-reads it, and a node deleted
/// meanwhile needs nothing more (no event, no task).
async fn write_status(
    ctx: &Context,
    node: &Arc<SeiNode>,
    status: &SeiNodeStatus,
) -> Result<Option<Arc<SeiNode>>, Error> {
    if !ctx.leadership.is_leading() {
        // Not ours to write any more; the next leader decides again from what is stored.
        return Ok(Some(node.clone()));
    }
    let namespace = node.namespace().unwrap_or_default();
    let api: Api<SeiNode> = Api::namespaced(ctx.client.clone(), &namespace);
    let mut next = SeiNode {
        status: Some(status.clone()),
        ..(**node).clone()
    };
    next.metadata.managed_fields = None;
    let params = PostParams {
        field_manager: Some(FIELD_MANAGER.to_owned()),
        ..PostParams::default()
    };
    match api.replace_status(&node.name_any(), &params, &next).await {
        Ok(written) => {
            let written = Arc::new(written);
            ctx.latest.0.lock().insert(uid(node), written.clone());
            Ok(Some(written))
        }
        Err(kube::Error::Api(status)) if status.code == 409 => Ok(None),
        Err(kube::Error::Api(status)) if status.code == 404 => Ok(None),
        Err(source) => Err(api_error(
            "update the status of",
            "SeiNode",
            &namespace,
            &node.name_any(),
            source,
        )),
    }
}

/// Creates the events (each once: named after what it reports); keeps the ones the API
/// refused for the next reconcile of the node.
async fn publish(ctx: &Context, node: &SeiNode, events: &[NodeEvent]) {
    if events.is_empty() {
        return;
    }
    let namespace = node.namespace().unwrap_or_default();
    let api: Api<Event> = Api::namespaced(ctx.client.clone(), &namespace);
    let regarding = node.object_ref(&());
    let now = Timestamp::now();
    let mut failed = Vec::new();
    for event in events {
        // Checked before each: a process paused mid-reconcile (a stuck host, SIGSTOP) may wake
        // after another replica took over, which re-sends recent flips on its first look.
        if !ctx.leadership.is_leading() {
            return;
        }
        if let NodeEvent::CertificateExpiring { not_after, .. } = event {
            ctx.remember(node, |memory| {
                memory.expiry_warned = Some(not_after.as_second());
            });
        }
        let object = event.to_object(regarding.clone(), &ctx.config.reporter, &ctx.instance, now);
        match api.create(&PostParams::default(), &object).await {
            Ok(_) => {}
            Err(kube::Error::Api(status)) if status.code == 409 => {}
            Err(error) => {
                tracing::warn!(%error, reason = event.reason(), "failed to publish an event; retrying with the next reconcile");
                failed.push(event.clone());
            }
        }
    }
    // Added to what waits already (events put back earlier in this reconcile included): the
    // pending ones are taken out only by `send_unsent`, which sends them.
    if !failed.is_empty() {
        ctx.remember(node, |memory| memory.unsent.extend(failed));
    }
}

async fn send_unsent(ctx: &Context, node: &SeiNode) {
    let pending = ctx.remember(node, |memory| std::mem::take(&mut memory.unsent));
    if !pending.is_empty() {
        publish(ctx, node, &pending).await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use kube::runtime::{reflector, watcher};
    use seinode_tls_crds::SIDECAR_TLS_SECRET_READY;
    use serde_json::json;

    #[test]
    fn a_cached_object_that_does_not_parse_counts_as_missing() {
        let compact = |spec: serde_json::Value| -> Arc<Compact<Service>> {
            Arc::new(
                serde_json::from_value(json!({
                    "metadata": {"name": "n", "namespace": "ns"},
                    "spec": spec,
                }))
                .unwrap(),
            )
        };
        let good = parsed(Some(compact(json!({"clusterIP": "None"})))).unwrap();
        assert_eq!(good.spec.unwrap().cluster_ip.as_deref(), Some("None"));
        assert!(parsed(Some(compact(json!({"ports": "not a list"})))).is_none());
        assert!(parsed::<Service>(None).is_none());
    }

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

    #[test]
    fn a_node_waiting_on_its_secret_verdict_is_urgent() {
        let with_tls = |tls: bool, ready: Option<bool>| {
            let mut node = crate::decide::tests::node("ghcr.io/sei-protocol/sei:v6.3.0", 1);
            if !tls {
                node.spec.sidecar = None;
            }
            node.status = ready.map(|ok| SeiNodeStatus {
                conditions: Some(vec![crate::status::condition(
                    SIDECAR_TLS_SECRET_READY,
                    ok,
                    "Reason",
                    "message",
                    None,
                    None,
                    Timestamp::UNIX_EPOCH,
                )]),
                ..SeiNodeStatus::default()
            });
            node
        };
        let mut no_verdict = with_tls(true, Some(true));
        no_verdict.status.as_mut().unwrap().conditions = None;
        let mut plain_decided = with_tls(false, None);
        plain_decided.status = Some(SeiNodeStatus::default());

        for (node, want, what) in [
            (with_tls(true, None), Priority::Urgent, "TLS, no status"),
            (no_verdict, Priority::Urgent, "TLS, no verdict yet"),
            (
                with_tls(true, Some(false)),
                Priority::Urgent,
                "TLS, Secret not ready",
            ),
            (
                with_tls(true, Some(true)),
                Priority::Normal,
                "TLS, Secret ready",
            ),
            (with_tls(false, None), Priority::Urgent, "no TLS, no status"),
            (plain_decided, Priority::Normal, "no TLS, with status"),
        ] {
            assert_eq!(priority(&node), want, "{what}");
        }
    }

    #[test]
    fn backoff_doubles_with_jitter_within_bounds() {
        for count in 1..20 {
            let ceiling = BACKOFF_MIN
                .saturating_mul(1 << (count - 1).min(12))
                .min(BACKOFF_MAX);
            for _ in 0..50 {
                let delay = jittered(count);
                assert!(
                    delay >= ceiling / 2 && delay <= ceiling,
                    "{count}: {delay:?}"
                );
            }
        }
        let spread: HashSet<Duration> = (0..50).map(|_| jittered(5)).collect();
        assert!(spread.len() > 10, "delays are spread: {spread:?}");
        assert_eq!(jittered(u32::MAX).max(BACKOFF_MAX), BACKOFF_MAX);
    }
}
