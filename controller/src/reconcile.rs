//! One reconcile of a SeiNode: publish the contract, judge the Secret, keep the condition and
//! its events, then advance the plan if the gate is open.

use std::collections::{HashMap, HashSet};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use jiff::Timestamp;
use k8s_openapi::api::apps::v1::StatefulSet;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;
use kube::api::{Patch, PatchParams};
use kube::runtime::controller::Action;
use kube::runtime::events::{Event, EventType, Recorder};
use kube::runtime::reflector::{ObjectRef, Store};
use kube::{Api, Client, Resource, ResourceExt};
use seinode_tls_crds::DEFAULT_SIDECAR_PORT;
use seinode_tls_crds::contract::required_dns_names;
use seinode_tls_crds::validation::{InspectedSecret, LeafCertificate, SecretVerdict};
use seinode_tls_crds::{
    PlanPhase, SIDECAR_TLS_SECRET_READY, SeiNode, SeiNodePhase, SeiNodeStatus, SidecarTlsStatus,
    TaskStatus,
};
use serde::Serialize;
use serde::de::DeserializeOwned;
use thiserror::Error;

use crate::config::ControllerConfig;
use crate::metrics::{ControllerMetrics, NodeTls, OutcomeLabels, ProbeLabels, ReconcileOutcome};
use crate::plan::{Gate, Task, desired_plan, gate, next_task};
use crate::probe::{ProbeResult, SidecarProber};
use crate::resources;
use crate::secrets::SecretJudge;
use crate::status::{
    SIDECAR_READY, condition, flipped, remove_condition, set_condition, tls_condition,
};

/// Field manager of everything the controller applies.
pub const FIELD_MANAGER: &str = "seinode-tls-controller";
/// Re-check a node whose Secret could not be read this soon.
const UNAVAILABLE_RETRY: Duration = Duration::from_secs(10);
/// Safety-net resync of every node (all real triggers are watches).
const RESYNC: Duration = Duration::from_secs(600);
/// Backoff bounds for transient errors.
const BACKOFF_MIN: Duration = Duration::from_secs(1);
const BACKOFF_MAX: Duration = Duration::from_secs(300);

/// Errors of a reconcile. All of them are transient (API calls); permanent problems (an invalid
/// image) are not errors but a failed task, a condition and an event, and wait for a change.
#[derive(Debug, Error)]
pub enum Error {
    #[error("failed to apply {kind} {namespace}/{name}")]
    Apply {
        kind: String,
        namespace: String,
        name: String,
        #[source]
        source: kube::Error,
    },
    #[error("failed to read StatefulSet {namespace}/{name}")]
    ReadStatefulSet {
        namespace: String,
        name: String,
        #[source]
        source: kube::Error,
    },
    #[error("failed to update the status of SeiNode {namespace}/{name}")]
    Status {
        namespace: String,
        name: String,
        #[source]
        source: kube::Error,
    },
}

/// What reconciles share.
pub struct Context {
    pub client: Client,
    pub config: ControllerConfig,
    pub recorder: Recorder,
    pub metrics: Arc<ControllerMetrics>,
    pub secrets: SecretJudge,
    pub prober: SidecarProber,
    /// The reflector's view of SeiNodes (to forget metrics of deleted nodes).
    pub store: Store<SeiNode>,
    failures: Mutex<HashMap<String, u32>>,
    expiry_warned: Mutex<HashSet<(String, i64)>>,
    /// The status last written per node, with the resourceVersion it was computed from.
    written: Mutex<HashMap<String, WrittenStatus>>,
}

type WrittenStatus = (Option<String>, SeiNodeStatus);

impl Context {
    /// The node's status as this controller last left it: the reflector may still hand out the
    /// version from before our own write (same resourceVersion), and diffing against that would
    /// repeat a flip (a second event, a moved lastTransitionTime).
    fn newest_status(&self, node: &SeiNode) -> SeiNodeStatus {
        let written = self.written.lock().unwrap_or_else(|e| e.into_inner());
        match written.get(&uid(node)) {
            Some((version, status))
                if version.is_some() && *version == node.metadata.resource_version =>
            {
                status.clone()
            }
            _ => node.status.clone().unwrap_or_default(),
        }
    }

    /// Forgets what is kept per node and per Secret for nodes that are gone (run periodically,
    /// so memory follows the fleet rather than its history).
    pub fn prune(&self) {
        let nodes = self.store.state();
        let uids: HashSet<String> = nodes.iter().map(|n| uid(n)).collect();
        let hosts: HashSet<String> = nodes
            .iter()
            .map(|n| {
                let (ns, name) = (n.namespace().unwrap_or_default(), n.name_any());
                format!("{name}-0.{name}.{ns}.svc.{}", self.config.cluster_domain)
            })
            .collect();
        let secrets: HashSet<(String, String)> = nodes
            .iter()
            .filter_map(|n| Some((n.namespace()?, n.sidecar_tls()?.secret_name.clone())))
            .collect();
        self.metrics
            .tls
            .retain(|ns, name| self.store.get(&ObjectRef::new(name).within(ns)).is_some());
        self.failures
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .retain(|u, _| uids.contains(u));
        self.expiry_warned
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .retain(|(u, _)| uids.contains(u));
        self.written
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .retain(|u, _| uids.contains(u));
        self.prober.retain_hosts(|host| hosts.contains(host));
        self.secrets
            .retain(|ns, name| secrets.contains(&(ns.to_owned(), name.to_owned())));
    }
}

impl Context {
    pub fn new(
        client: Client,
        config: ControllerConfig,
        ca_bundle: Option<Vec<u8>>,
        recorder: Recorder,
        metrics: Arc<ControllerMetrics>,
        store: Store<SeiNode>,
    ) -> Self {
        let prober = SidecarProber::new(
            config.sidecar_addresses.clone(),
            ca_bundle,
            config.sidecar_probe_timeout,
        );
        Self {
            client,
            config,
            recorder,
            metrics,
            secrets: SecretJudge::default(),
            prober,
            store,
            failures: Mutex::default(),
            expiry_warned: Mutex::default(),
            written: Mutex::default(),
        }
    }
}

/// kube-runtime entry point: one reconcile, with metrics and the backoff bookkeeping.
pub async fn reconcile(node: Arc<SeiNode>, ctx: Arc<Context>) -> Result<Action, Error> {
    let started = Instant::now();
    let span = tracing::info_span!("reconcile", namespace = %node.namespace().unwrap_or_default(), name = %node.name_any());
    let result = tracing::Instrument::instrument(reconcile_node(&node, &ctx), span).await;
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
    if result.is_ok() {
        ctx.failures
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .remove(&uid(&node));
    }
    result
}

/// kube-runtime error policy: exponential backoff per node, 1 s to 5 min.
pub fn error_policy(node: Arc<SeiNode>, error: &Error, ctx: Arc<Context>) -> Action {
    let mut failures = ctx.failures.lock().unwrap_or_else(|e| e.into_inner());
    let count = failures.entry(uid(&node)).or_insert(0);
    *count = count.saturating_add(1);
    let delay = BACKOFF_MIN
        .saturating_mul(1 << (*count - 1).min(9))
        .min(BACKOFF_MAX);
    tracing::warn!(
        error = %seinode_tls_crds::error_chain(error),
        namespace = %node.namespace().unwrap_or_default(),
        name = %node.name_any(),
        retry_in = ?delay,
        "reconcile failed"
    );
    Action::requeue(delay)
}

fn uid(node: &SeiNode) -> String {
    node.uid().unwrap_or_else(|| node.name_any())
}

/// When to look at the node again, whichever comes first.
struct Requeue(Option<Duration>);

impl Requeue {
    fn at_most(&mut self, after: Duration) {
        self.0 = Some(self.0.map_or(after, |d| d.min(after)));
    }

    fn at(&mut self, when: Timestamp, now: Timestamp) {
        if when >= now {
            let wait = when.duration_since(now).unsigned_abs();
            // Land just after the instant (notAfter is itself valid), so the check then sees it
            // passed.
            self.at_most(wait + Duration::from_secs(1));
        }
    }

    fn action(self) -> Action {
        Action::requeue(self.0.unwrap_or(RESYNC).min(RESYNC))
    }
}

async fn reconcile_node(node: &SeiNode, ctx: &Context) -> Result<Action, Error> {
    if node.meta().deletion_timestamp.is_some() {
        return Ok(Action::await_change());
    }
    let namespace = node.namespace().unwrap_or_default();
    let name = node.name_any();
    let now = Timestamp::now();
    let generation = node.metadata.generation;
    let old = ctx.newest_status(node);
    let mut status = old.clone();
    let mut requeue = Requeue(None);

    // 1. The contract and the condition.
    let mut flip: Option<(bool, String)> = None;
    let mut secret_leaf: Option<LeafCertificate> = None;
    let tls_enabled = node.sidecar_tls().is_some();
    let mut conditions = status.conditions.take().unwrap_or_default();
    if let Some(tls) = node.sidecar_tls() {
        let required = required_dns_names(&name, &namespace, &ctx.config.cluster_domain);
        let (verdict, inspected) = ctx
            .secrets
            .verdict(&ctx.client, &namespace, &tls.secret_name, &required, now)
            .await;
        secret_leaf = match inspected.as_deref() {
            Some(InspectedSecret::Usable(leaf)) => Some(leaf.clone()),
            _ => None,
        };
        if let Some(leaf) = &secret_leaf {
            // A certificate not valid yet becomes valid without any event: look again then.
            requeue.at(leaf.not_before, now);
        }
        status.sidecar_tls = Some(SidecarTlsStatus {
            secret_name: tls.secret_name.clone(),
            required_dns_names: required,
        });
        let existing = conditions
            .iter()
            .find(|c| c.type_ == SIDECAR_TLS_SECRET_READY)
            .cloned();
        let condition = tls_condition(&verdict, generation, existing.as_ref(), now);
        if flipped(existing.as_ref(), &condition) {
            flip = Some((verdict.is_ready(), verdict.message.clone()));
        }
        set_condition(&mut conditions, condition);
        ctx.metrics.tls.set(
            &namespace,
            &name,
            NodeTls {
                reason: verdict.reason,
                not_after: verdict.not_after,
                running: old.phase == Some(SeiNodePhase::Running),
            },
        );
        schedule_tls_checks(node, ctx, &verdict, now, &mut requeue).await;
    } else {
        status.sidecar_tls = None;
        remove_condition(&mut conditions, SIDECAR_TLS_SECRET_READY);
        ctx.metrics.tls.remove(&namespace, &name);
    }
    status.conditions = (!conditions.is_empty()).then_some(conditions);
    if status.phase.is_none() {
        set_phase(&mut status, SeiNodePhase::Pending, now);
    }

    // 2. The plan, recorded before anything runs.
    let spec_changed = old.observed_generation != generation;
    status.plan = desired_plan(node, &status, spec_changed);
    status.observed_generation = generation;
    write_status(ctx, node, &old, &status).await?;
    if let Some((ready, message)) = flip {
        let (type_, reason) = if ready {
            (EventType::Normal, "SidecarTLSSecretReady")
        } else {
            (EventType::Warning, "SidecarTLSSecretNotReady")
        };
        publish(ctx, node, type_, reason, "ValidateTLSSecret", message).await;
    }

    // 3. Advance the plan while the gate is open.
    match gate(
        tls_enabled,
        status.conditions.as_deref().unwrap_or_default(),
    ) {
        Gate::Blocked(why) => {
            if status
                .plan
                .as_ref()
                .is_some_and(|p| p.phase == PlanPhase::Active)
            {
                tracing::info!(%why, "plan waits for the TLS Secret");
            }
            Ok(requeue.action())
        }
        Gate::Open => {
            let status = advance_plan(node, ctx, status, now).await?;
            let settled = !status
                .plan
                .as_ref()
                .is_some_and(|p| p.phase == PlanPhase::Active);
            if status.phase == Some(SeiNodePhase::Running) && settled {
                probe_sidecar(node, ctx, status, secret_leaf.as_ref(), now).await?;
                requeue.at_most(ctx.config.sidecar_probe_interval);
            }
            Ok(requeue.action())
        }
    }
}

/// Calls the sidecar through its front door and keeps the `SidecarReady` condition, with events
/// when it flips. A TLS node whose Secret is unusable has nothing to verify against: the
/// condition is left as it is until the Secret is back.
async fn probe_sidecar(
    node: &SeiNode,
    ctx: &Context,
    mut status: SeiNodeStatus,
    leaf: Option<&LeafCertificate>,
    now: Timestamp,
) -> Result<(), Error> {
    let namespace = node.namespace().unwrap_or_default();
    let name = node.name_any();
    let pod_host = format!(
        "{name}-0.{name}.{namespace}.svc.{}",
        ctx.config.cluster_domain
    );
    let result = match (node.sidecar_tls(), leaf) {
        (Some(_), Some(leaf)) => {
            let port = u16::try_from(resources::TLS_PORT).unwrap_or(8443);
            ctx.prober
                .probe_tls(&pod_host, port, &leaf.der, leaf.ca_crt.as_deref())
                .await
        }
        (Some(_), None) => ProbeResult::NotProbed(
            "not probed: the node's TLS Secret does not meet the contract (see SidecarTLSSecretReady)".to_owned(),
        ),
        (None, _) => {
            let port = node
                .spec
                .sidecar
                .as_ref()
                .map_or(DEFAULT_SIDECAR_PORT, |s| s.port);
            ctx.prober
                .probe_plain(&pod_host, u16::try_from(port).unwrap_or_default())
                .await
        }
    };
    ctx.metrics
        .probes
        .get_or_create(&ProbeLabels {
            result: result.reason(),
        })
        .inc();
    let before = status.clone();
    let mut conditions = status.conditions.take().unwrap_or_default();
    let existing = conditions
        .iter()
        .find(|c| c.type_ == SIDECAR_READY)
        .cloned();
    let ready = condition(
        SIDECAR_READY,
        result.is_healthy(),
        result.reason(),
        result.message(),
        node.metadata.generation,
        existing.as_ref(),
        now,
    );
    let flip = flipped(existing.as_ref(), &ready);
    set_condition(&mut conditions, ready);
    status.conditions = Some(conditions);
    write_status(ctx, node, &before, &status).await?;
    if flip {
        let (type_, reason) = if result.is_healthy() {
            (EventType::Normal, "SidecarReady")
        } else {
            (EventType::Warning, "SidecarNotReady")
        };
        let note = format!("{}: {}", result.reason(), result.message());
        publish(ctx, node, type_, reason, "ProbeSidecar", note).await;
    }
    Ok(())
}

/// Requeues for expiry (to report `TLSSecretExpired` on time) and the expiry warning window;
/// emits the warning once per certificate.
async fn schedule_tls_checks(
    node: &SeiNode,
    ctx: &Context,
    verdict: &SecretVerdict,
    now: Timestamp,
    requeue: &mut Requeue,
) {
    if verdict.reason.is_transient() {
        requeue.at_most(UNAVAILABLE_RETRY);
    }
    let Some(not_after) = verdict.not_after else {
        return;
    };
    requeue.at(not_after, now);
    let window = jiff::SignedDuration::try_from(ctx.config.cert_expiry_warning)
        .unwrap_or(jiff::SignedDuration::ZERO);
    let warn_from = not_after.checked_sub(window).unwrap_or(not_after);
    if now < warn_from {
        requeue.at(warn_from, now);
        return;
    }
    if !verdict.is_ready() {
        return;
    }
    let key = (uid(node), not_after.as_second());
    let first = ctx
        .expiry_warned
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .insert(key);
    if first {
        let left = not_after.duration_since(now);
        let message = format!(
            "the certificate in Secret \"{}\" expires at {not_after} (in {}h); renew it before then or the node's TLS condition turns False",
            node.sidecar_tls()
                .map(|t| t.secret_name.as_str())
                .unwrap_or_default(),
            left.as_secs() / 3600,
        );
        publish(
            ctx,
            node,
            EventType::Warning,
            "SidecarTLSCertificateExpiring",
            "ValidateTLSSecret",
            message,
        )
        .await;
    }
}

/// Runs pending tasks in order, recording each in status, until one must wait or fails;
/// returns the status as written.
async fn advance_plan(
    node: &SeiNode,
    ctx: &Context,
    mut status: SeiNodeStatus,
    now: Timestamp,
) -> Result<SeiNodeStatus, Error> {
    let Some(mut plan) = status.plan.clone() else {
        return Ok(status);
    };
    while let Some((index, task)) = next_task(&plan) {
        let before = status.clone();
        let outcome = match task {
            Some(task) => run_task(node, ctx, task).await?,
            None => TaskOutcome::Failed(format!(
                "unknown task type \"{}\"",
                plan.tasks[index].r#type
            )),
        };
        match outcome {
            TaskOutcome::Waiting => return Ok(status),
            TaskOutcome::Done => {
                plan.tasks[index].status = TaskStatus::Complete;
                plan.tasks[index].error = None;
                if matches!(
                    status.phase,
                    Some(SeiNodePhase::Pending | SeiNodePhase::Failed)
                ) {
                    set_phase(&mut status, SeiNodePhase::Initializing, now);
                }
            }
            TaskOutcome::Failed(error) => {
                publish(
                    ctx,
                    node,
                    EventType::Warning,
                    "PlanFailed",
                    plan.tasks[index].r#type.as_str(),
                    error.clone(),
                )
                .await;
                plan.tasks[index].status = TaskStatus::Failed;
                plan.tasks[index].error = Some(error);
                plan.phase = PlanPhase::Failed;
                // A failed update leaves the running pods alone; a failed init plan fails the node.
                if status.current_image.is_none() {
                    set_phase(&mut status, SeiNodePhase::Failed, now);
                }
            }
        }
        if plan.phase == PlanPhase::Active && next_task(&plan).is_none() {
            plan.phase = PlanPhase::Complete;
            if let Some(target) = plan.target_phase {
                set_phase(&mut status, target, now);
            }
            status.current_image = Some(node.spec.image.clone());
        }
        status.plan = Some(plan.clone());
        write_status(ctx, node, &before, &status).await?;
    }
    Ok(status)
}

enum TaskOutcome {
    Done,
    Waiting,
    /// Permanent: needs a change of the spec.
    Failed(String),
}

async fn run_task(node: &SeiNode, ctx: &Context, task: Task) -> Result<TaskOutcome, Error> {
    match run_task_inner(node, ctx, task).await {
        // The API server refused what we built (say, a name that is not a valid Service name):
        // retrying cannot help, the spec must change.
        Err(Error::Apply {
            kind,
            namespace,
            name,
            source: kube::Error::Api(status),
        }) if (400..500).contains(&status.code) && ![409, 429].contains(&status.code) => {
            Ok(TaskOutcome::Failed(format!(
                "the API server refused {kind} {namespace}/{name}: {} (HTTP {})",
                status.message, status.code
            )))
        }
        other => other,
    }
}

async fn run_task_inner(node: &SeiNode, ctx: &Context, task: Task) -> Result<TaskOutcome, Error> {
    let namespace = node.namespace().unwrap_or_default();
    match task {
        Task::ApplyRbacProxyConfig => {
            apply(ctx, &namespace, &resources::rbac_proxy_config_map(node)).await?
        }
        Task::ApplyService => apply(ctx, &namespace, &resources::service(node)).await?,
        Task::ApplyStatefulSet => match resources::stateful_set(node, &ctx.config) {
            Ok(sts) => apply(ctx, &namespace, &sts).await?,
            Err(error) => return Ok(TaskOutcome::Failed(error)),
        },
        Task::AwaitStatefulSetReady => {
            let api: Api<StatefulSet> = Api::namespaced(ctx.client.clone(), &namespace);
            let sts =
                api.get_opt(&node.name_any())
                    .await
                    .map_err(|source| Error::ReadStatefulSet {
                        namespace: namespace.clone(),
                        name: node.name_any(),
                        source,
                    })?;
            let rolled_out = sts.as_ref().is_some_and(|sts| {
                resources::stateful_set_ready(sts)
                    && resources::stateful_set_image(sts).as_deref()
                        == Some(node.spec.image.as_str())
            });
            // The watch on owned StatefulSets brings the node back when the status moves.
            return Ok(if rolled_out {
                TaskOutcome::Done
            } else {
                TaskOutcome::Waiting
            });
        }
    }
    Ok(TaskOutcome::Done)
}

async fn apply<K>(ctx: &Context, namespace: &str, object: &K) -> Result<(), Error>
where
    K: Resource<Scope = k8s_openapi::NamespaceResourceScope>
        + Serialize
        + DeserializeOwned
        + Clone
        + std::fmt::Debug,
    K::DynamicType: Default,
{
    let name = object.meta().name.clone().unwrap_or_default();
    let api: Api<K> = Api::namespaced(ctx.client.clone(), namespace);
    api.patch(
        &name,
        &PatchParams::apply(FIELD_MANAGER).force(),
        &Patch::Apply(object),
    )
    .await
    .map_err(|source| Error::Apply {
        kind: K::kind(&K::DynamicType::default()).into_owned(),
        namespace: namespace.to_owned(),
        name,
        source,
    })?;
    Ok(())
}

fn set_phase(status: &mut SeiNodeStatus, phase: SeiNodePhase, now: Timestamp) {
    if status.phase != Some(phase) {
        status.phase = Some(phase);
        status.phase_transition_time = Some(Time(now));
    }
}

/// Server-side applies the status when it changed (an unchanged status writes nothing, so a
/// reconcile triggered by our own write ends there).
async fn write_status(
    ctx: &Context,
    node: &SeiNode,
    old: &SeiNodeStatus,
    new: &SeiNodeStatus,
) -> Result<(), Error> {
    if old == new {
        return Ok(());
    }
    let namespace = node.namespace().unwrap_or_default();
    let api: Api<SeiNode> = Api::namespaced(ctx.client.clone(), &namespace);
    let patch = serde_json::json!({
        "apiVersion": "sei.io/v1alpha1",
        "kind": "SeiNode",
        "status": new,
    });
    api.patch_status(
        &node.name_any(),
        &PatchParams::apply(FIELD_MANAGER).force(),
        &Patch::Apply(&patch),
    )
    .await
    .map_err(|source| Error::Status {
        namespace,
        name: node.name_any(),
        source,
    })?;
    ctx.written
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .insert(
            uid(node),
            (node.metadata.resource_version.clone(), new.clone()),
        );
    Ok(())
}

async fn publish(
    ctx: &Context,
    node: &SeiNode,
    type_: EventType,
    reason: &str,
    action: &str,
    note: String,
) {
    let event = Event {
        type_,
        reason: reason.to_owned(),
        note: Some(note),
        action: action.to_owned(),
        secondary: None,
    };
    if let Err(error) = ctx.recorder.publish(&event, &node.object_ref(&())).await {
        tracing::warn!(%error, reason, "failed to publish an event");
    }
}
