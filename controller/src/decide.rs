//! What a reconcile decides, as a pure function of the node, the status it starts from, what was
//! observed and the time: the status to write, the events to publish, the one task to run and
//! when to look again. Nothing here reads or writes the cluster; `reconcile` observes and acts.

use std::time::Duration;

use jiff::{SignedDuration, Timestamp};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{Condition, Time};
use seinode_tls_crds::contract::required_dns_names;
use seinode_tls_crds::validation::SecretVerdict;
use seinode_tls_crds::{
    PlanPhase, PlannedTask, SIDECAR_TLS_SECRET_READY, SeiNode, SeiNodePhase, SeiNodeStatus,
    SidecarTlsStatus, TaskFailureReason, TaskPlan, TaskStatus,
};

use crate::events::NodeEvent;
use crate::plan::{Gate, Task, desired_plan, gate, next_task, repair_plan};
use crate::sidecar::ProbeResult;
use crate::status::{
    NODE_READY, NOT_RUNNING, PLAN_IN_PROGRESS, READY, SIDECAR_NOT_READY, SIDECAR_READY,
    TLS_SECRET_NOT_READY, condition, flipped, is_true, remove_condition, set_condition,
    tls_condition,
};

/// Safety-net resync of every node (all real triggers are watches).
pub const RESYNC: Duration = Duration::from_secs(600);
/// Look again this soon while an object of a deleted node waits for the garbage collector, or
/// while an object not ours blocks the plan.
pub const BLOCKED_RETRY: Duration = Duration::from_secs(30);
/// On a process's first look at a node, flips younger than this get their event again (it is
/// created once: a restart between the status write and the event loses nothing).
pub const REASSERT_WINDOW: SignedDuration = SignedDuration::from_mins(10);
/// Condition reason of `SidecarReady` while the TLS gate is closed.
pub const SIDECAR_GATED: &str = "SidecarTLSSecretNotReady";
/// What a task failure's message says when an object not controlled by the node holds the
/// name. Statuses written before tasks carried a `reason` are recognised by it.
pub const IN_THE_WAY: &str = "is in the way";
/// How soon a sidecar task that could not finish yet (the pod starting, the task running) is
/// tried again; the Pod watch brings the node back sooner when its pod changes.
pub const SIDECAR_TASK_RETRY: Duration = Duration::from_secs(5);
/// How soon a sidecar task whose pod is not there to call (not created, not of the current
/// revision, without an IP) is looked at again; the Pod and StatefulSet watches wake the node
/// as soon as its pod changes, so this is only a safety net.
pub const SIDECAR_POD_RETRY: Duration = Duration::from_secs(30);
/// Condition reason of `SidecarReady` while the plan waits for the sidecar to become ready.
pub const SIDECAR_STARTING: &str = "SidecarStarting";
/// Condition reason of `SidecarReady` once `mark-ready` completed, until the first probe.
pub const SIDECAR_MARKED_READY: &str = "SidecarMarkedReady";

/// How an object the node should own looks in the cluster.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub enum ObjectState {
    /// Not found (or not applicable, such as the proxy ConfigMap of a node without TLS).
    #[default]
    Missing,
    /// Controlled by this node and holding what the controller would apply.
    Current,
    /// Controlled by this node, but changed or built from an older template.
    Drifted,
    /// Controlled by a SeiNode of the same name that is gone: the garbage collector deletes it.
    Orphaned,
    /// Not controlled by this node (the message says by what): never adopted.
    Foreign(String),
}

/// The node's owned objects, as the watches last saw them.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Objects {
    pub config_map: ObjectState,
    pub service: ObjectState,
    pub stateful_set: ObjectState,
    /// The StatefulSet has a ready replica of the current revision running `spec.image`.
    pub rolled_out: bool,
}

impl Objects {
    pub fn of(&self, task: Task) -> &ObjectState {
        match task {
            Task::ApplyRbacProxyConfig => &self.config_map,
            Task::ApplyService => &self.service,
            Task::ApplyStatefulSet | Task::MarkSidecarReady | Task::AwaitStatefulSetReady => {
                &self.stateful_set
            }
        }
    }
}

/// The outcome of running a task.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Outcome {
    Done,
    /// Not yet (a sidecar task whose pod is starting, or that runs): the task stays pending
    /// and is tried again after [`SIDECAR_TASK_RETRY`]; the message says what it waits for.
    Waiting(String),
    /// Permanent: needs a change of the spec (or, when in the way, of the cluster).
    Failed(TaskFailure),
}

/// Why a task failed: the reason `decide` acts on, and the message for people.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TaskFailure {
    pub reason: TaskFailureReason,
    pub message: String,
}

impl TaskFailure {
    pub fn new(reason: TaskFailureReason, message: impl Into<String>) -> Self {
        Self {
            reason,
            message: message.into(),
        }
    }
}

/// Whether a failed task failed on an object in the way (so it is retried on its own). A status
/// written before tasks carried a reason says so only in its message.
fn failed_in_the_way(task: &PlannedTask) -> bool {
    match task.reason {
        Some(reason) => reason == TaskFailureReason::ObjectInTheWay,
        None => task
            .error
            .as_deref()
            .is_some_and(|e| e.contains(IN_THE_WAY)),
    }
}

/// Everything a decision depends on besides the node and its status.
#[derive(Debug, Clone, Default)]
pub struct Observed {
    /// This replica may write (it holds the Lease, or runs without leader election).
    pub leading: bool,
    /// The first reconcile of this node in this process.
    pub first_sight: bool,
    /// The judgement of the node's TLS Secret (TLS nodes only).
    pub verdict: Option<SecretVerdict>,
    /// `notBefore` of the Secret's usable leaf.
    pub not_before: Option<Timestamp>,
    /// The expiry warning for this certificate was already published by this process.
    pub expiry_warned: bool,
    pub objects: Objects,
    /// The sidecar probe, when the node is Running with a settled plan.
    pub probe: Option<ProbeResult>,
    /// The task this reconcile ran, and how it went.
    pub ran: Option<(Task, Outcome)>,
    /// Why the node's sidecar cannot be called now (pod 0 of its StatefulSet not there, being
    /// deleted, not of the current revision, or without an address); `None`: it can be, or
    /// the plan is not at `MarkSidecarReady`, or a finished call's result is at hand. The Pod
    /// and StatefulSet watches wake the node when that changes.
    pub sidecar_unreachable: Option<String>,
}

/// Configuration a decision needs.
#[derive(Debug, Clone)]
pub struct Settings {
    pub cluster_domain: String,
    pub cert_expiry_warning: Duration,
    pub sidecar_probe_interval: Duration,
}

/// What to do.
#[derive(Debug, Clone, PartialEq)]
pub struct Decision {
    pub status: SeiNodeStatus,
    pub events: Vec<NodeEvent>,
    /// The one task to run now (`MarkSidecarReady`: a call to the sidecar, apart from the
    /// reconcile, whose result wakes the node).
    pub task: Option<Task>,
    /// Probe the sidecar (apart from the reconcile; the result wakes the node).
    pub probe: bool,
    /// Look again after this long at the latest.
    pub requeue: Duration,
    /// The Secret could not be read: retry with backoff.
    pub transient: bool,
}

/// Decides from `base`, the status this reconcile starts from (the newest known).
pub fn decide(
    node: &SeiNode,
    base: &SeiNodeStatus,
    observed: &Observed,
    settings: &Settings,
    now: Timestamp,
) -> Decision {
    let mut decision = Decision {
        status: base.clone(),
        events: Vec::new(),
        task: None,
        probe: false,
        requeue: RESYNC,
        transient: false,
    };
    if !observed.leading || node.metadata.deletion_timestamp.is_some() {
        return decision;
    }
    let generation = node.metadata.generation;
    let status = &mut decision.status;
    let mut conditions = status.conditions.take().unwrap_or_default();

    // 1. The contract and the TLS condition.
    let tls = node.sidecar_tls();
    match (tls, &observed.verdict) {
        (Some(tls), Some(verdict)) => {
            let namespace = node.metadata.namespace.as_deref().unwrap_or_default();
            let name = node.metadata.name.as_deref().unwrap_or_default();
            status.sidecar_tls = Some(SidecarTlsStatus {
                secret_name: tls.secret_name.clone(),
                required_dns_names: required_dns_names(name, namespace, &settings.cluster_domain),
                not_after: verdict.not_after.map(Time),
            });
            let existing = find(&conditions, SIDECAR_TLS_SECRET_READY);
            let new = tls_condition(verdict, generation, existing, now);
            if flipped(existing, &new) {
                decision
                    .events
                    .push(tls_event(&new, verdict.is_ready(), now));
            }
            set_condition(&mut conditions, new);
            let (requeue, transient, expiring) =
                tls_schedule(verdict, observed, &tls.secret_name, settings, now);
            decision.requeue = decision.requeue.min(requeue);
            decision.transient = transient;
            decision.events.extend(expiring);
        }
        _ => {
            status.sidecar_tls = None;
            remove_condition(&mut conditions, SIDECAR_TLS_SECRET_READY);
        }
    }
    if status.phase.is_none() {
        set_phase(status, SeiNodePhase::Pending, now);
    }

    // 2. The plan: recorded before anything runs; a finished or failed one replaced only for a
    // reason (a spec change, drift, an obstacle cleared).
    let spec_changed = base.observed_generation != generation;
    let mut plan = desired_plan(node, status, spec_changed);
    status.observed_generation = generation;
    let open = gate(tls.is_some(), &conditions) == Gate::Open;
    if let (Some(plan), Some((task, outcome))) = (plan.as_mut(), &observed.ran) {
        let before = base.plan.as_ref().filter(|p| p.id == plan.id);
        record(
            plan,
            before,
            status,
            node,
            *task,
            outcome,
            &mut decision.events,
            now,
        );
    }
    if open && let Some(settled) = plan.as_mut() {
        // Finish what observation allows first: a plan completed just now is checked for
        // drift in the same decision (the controller's own write does not wake the node).
        advance(settled, status, node, observed, now);
    }
    if open {
        plan = repair(plan, node, status, observed, generation.unwrap_or_default());
    }
    if let Some(plan) = plan.as_mut().filter(|_| open) {
        decision.task = advance(plan, status, node, observed, now);
        // The sidecar's task waits: asked just now and not done (look again a little later, not
        // in a loop), or its pod is not there to ask (the Pod watch wakes the node).
        let waiting = match (decision.task, &observed.ran) {
            (Some(task), Some((ran, Outcome::Waiting(why)))) if task == *ran => {
                Some((task, why.as_str(), SIDECAR_TASK_RETRY))
            }
            (Some(Task::MarkSidecarReady), None) => observed
                .sidecar_unreachable
                .as_deref()
                .map(|why| (Task::MarkSidecarReady, why, SIDECAR_POD_RETRY)),
            _ => None,
        };
        if let Some((task, why, retry)) = waiting {
            decision.task = None;
            decision.requeue = decision.requeue.min(retry);
            // A node that starts gets no event for it; one that was ready does.
            report_sidecar(
                &mut conditions,
                &mut decision.events,
                (false, SIDECAR_STARTING),
                &format!(
                    "waiting for the sidecar to complete {}: {why}",
                    task.as_str()
                ),
                (generation, now),
                false,
            );
        }
        if observed.ran == Some((Task::MarkSidecarReady, Outcome::Done)) {
            // The sidecar answered through its front door (verified TLS, the controller's
            // certificate accepted) that it is ready: so it is, until a probe says otherwise.
            report_sidecar(
                &mut conditions,
                &mut decision.events,
                (true, SIDECAR_MARKED_READY),
                "mark-ready completed through the sidecar's front door; probed from now on",
                (generation, now),
                true,
            );
        }
        if decision.task.is_none() && observed.ran.is_none() {
            decision.task = retry_in_the_way(plan, observed);
        }
        if decision.task.is_none() && blocked(plan, observed) {
            decision.requeue = decision.requeue.min(BLOCKED_RETRY);
        }
    }
    status.plan = plan;

    // 3. The sidecar: probed while Running and settled; not ready while the TLS gate is closed.
    let settled = status
        .plan
        .as_ref()
        .is_none_or(|p| p.phase != PlanPhase::Active);
    if !open {
        if find(&conditions, SIDECAR_READY).is_some_and(is_true) {
            report_sidecar(
                &mut conditions,
                &mut decision.events,
                (false, SIDECAR_GATED),
                "the node's TLS Secret does not meet the contract (see SidecarTLSSecretReady); the sidecar is not probed until it does",
                (generation, now),
                true,
            );
        }
    } else if let Some(result) = observed.probe.as_ref().filter(|_| settled) {
        report_sidecar(
            &mut conditions,
            &mut decision.events,
            (result.is_healthy(), result.reason()),
            result.message(),
            (generation, now),
            true,
        );
    }
    if status.phase == Some(SeiNodePhase::Running) && settled {
        decision.requeue = decision.requeue.min(settings.sidecar_probe_interval);
        // A new probe, unless this reconcile has one's result (the next is due an interval on).
        decision.probe = open && observed.probe.is_none();
    }

    // 4. Ready: the one condition the ecosystem reads (kstatus, Flux, Argo CD, `kubectl wait`).
    let (ready, reason, message) = readiness(status, &conditions, tls.is_some(), settled);
    let new = condition(
        READY,
        ready,
        reason,
        &message,
        generation,
        find(&conditions, READY),
        now,
    );
    set_condition(&mut conditions, new);
    status.conditions = (!conditions.is_empty()).then_some(conditions);

    // 4. A new process tells again what a killed one may have decided but not told.
    if observed.first_sight {
        reassert(&mut decision, now);
    }
    decision
}

/// The `Ready` condition of a node: True when it is Running with no plan in progress and, with
/// TLS, its Secret meets the contract, and its sidecar (once reported) is ready. The first of
/// these that fails is the reason; the message says where to look. Messages hold no time, so an
/// unchanged node writes nothing.
fn readiness(
    status: &SeiNodeStatus,
    conditions: &[Condition],
    tls: bool,
    settled: bool,
) -> (bool, &'static str, String) {
    if gate(tls, conditions) != Gate::Open {
        let reason = find(conditions, SIDECAR_TLS_SECRET_READY)
            .map_or("not judged yet", |c| c.reason.as_str());
        return (
            false,
            TLS_SECRET_NOT_READY,
            format!(
                "the node's TLS Secret does not meet the contract ({reason}); see condition SidecarTLSSecretReady"
            ),
        );
    }
    let phase = status.phase.unwrap_or(SeiNodePhase::Pending);
    if phase != SeiNodePhase::Running {
        let plan = status.plan.as_ref().map_or(String::new(), |p| {
            format!("; plan {} is {:?}", p.id, p.phase)
        });
        return (false, NOT_RUNNING, format!("the node is {phase:?}{plan}"));
    }
    if !settled {
        let plan = status.plan.as_ref().map_or("", |p| p.id.as_str());
        return (
            false,
            PLAN_IN_PROGRESS,
            format!("plan {plan} is in progress; see status.plan"),
        );
    }
    if let Some(sidecar) = find(conditions, SIDECAR_READY).filter(|c| !is_true(c)) {
        return (
            false,
            SIDECAR_NOT_READY,
            format!(
                "the sidecar is not ready ({}); see condition SidecarReady",
                sidecar.reason
            ),
        );
    }
    let what = if tls {
        "Running, its TLS Secret meets the contract and its sidecar is ready"
    } else {
        "Running and its sidecar is ready"
    };
    (true, NODE_READY, what.to_owned())
}

/// Sets `SidecarReady` to `(ok, reason)` with `message`, with an event when it flips (on its
/// first report too only with `event_on_first`).
fn report_sidecar(
    conditions: &mut Vec<Condition>,
    events: &mut Vec<NodeEvent>,
    (ok, reason): (bool, &str),
    message: &str,
    (generation, now): (Option<i64>, Timestamp),
    event_on_first: bool,
) {
    let existing = find(conditions, SIDECAR_READY);
    let new = condition(
        SIDECAR_READY,
        ok,
        reason,
        message,
        generation,
        existing,
        now,
    );
    if flipped(existing, &new) && (event_on_first || existing.is_some()) {
        events.push(sidecar_event(&new, now));
    }
    set_condition(conditions, new);
}

fn find<'a>(conditions: &'a [Condition], type_: &str) -> Option<&'a Condition> {
    conditions.iter().find(|c| c.type_ == type_)
}

fn tls_event(condition: &Condition, ready: bool, at: Timestamp) -> NodeEvent {
    let message = condition.message.clone();
    if ready {
        NodeEvent::TlsSecretReady { message, at }
    } else {
        NodeEvent::TlsSecretNotReady { message, at }
    }
}

fn sidecar_event(condition: &Condition, at: Timestamp) -> NodeEvent {
    let note = format!("{}: {}", condition.reason, condition.message);
    if is_true(condition) {
        NodeEvent::SidecarReady { note, at }
    } else {
        NodeEvent::SidecarNotReady { note, at }
    }
}

/// When the TLS verdict needs another look (the leaf's notBefore and notAfter, the warning
/// window), whether the read failed, and the expiry warning if it is due.
fn tls_schedule(
    verdict: &SecretVerdict,
    observed: &Observed,
    secret: &str,
    settings: &Settings,
    now: Timestamp,
) -> (Duration, bool, Option<NodeEvent>) {
    let mut requeue = RESYNC;
    let mut at = |when: Timestamp| {
        if when >= now {
            // Land just after the instant (notAfter is itself valid), so the check then sees it
            // passed.
            let wait = when.duration_since(now).unsigned_abs() + Duration::from_secs(1);
            requeue = requeue.min(wait);
        }
    };
    if let Some(not_before) = observed.not_before {
        at(not_before);
    }
    let Some(not_after) = verdict.not_after else {
        return (requeue, verdict.reason.is_transient(), None);
    };
    at(not_after);
    let window =
        SignedDuration::try_from(settings.cert_expiry_warning).unwrap_or(SignedDuration::ZERO);
    let warn_from = not_after.checked_sub(window).unwrap_or(not_after);
    let mut expiring = None;
    if now < warn_from {
        at(warn_from);
    } else if verdict.is_ready() && !observed.expiry_warned {
        expiring = Some(NodeEvent::CertificateExpiring {
            secret: secret.to_owned(),
            not_after,
            hours_left: not_after.duration_since(now).as_hours(),
        });
    }
    (requeue, verdict.reason.is_transient(), expiring)
}

/// Replaces a settled plan with a repair plan when objects of a Running node went missing or
/// changed.
fn repair(
    plan: Option<TaskPlan>,
    node: &SeiNode,
    status: &SeiNodeStatus,
    observed: &Observed,
    generation: i64,
) -> Option<TaskPlan> {
    let objects = &observed.objects;
    match plan {
        Some(plan) if plan.phase != PlanPhase::Complete => Some(plan),
        plan => {
            if status.phase != Some(SeiNodePhase::Running) {
                return plan;
            }
            let tls = node.sidecar_tls().is_some();
            let needs =
                |state: &ObjectState| matches!(state, ObjectState::Missing | ObjectState::Drifted);
            let tasks: Vec<Task> = [
                (
                    Task::ApplyRbacProxyConfig,
                    tls && needs(&objects.config_map),
                ),
                (Task::ApplyService, needs(&objects.service)),
                (Task::ApplyStatefulSet, needs(&objects.stateful_set)),
                // A sidecar that restarted forgot `mark-ready` (its pod is not ready, seid
                // waits): submit it again.
                (
                    Task::MarkSidecarReady,
                    matches!(observed.probe, Some(ProbeResult::NotMarkedReady(_))),
                ),
            ]
            .into_iter()
            .filter_map(|(task, needed)| needed.then_some(task))
            .collect();
            if tasks.is_empty() {
                plan
            } else {
                Some(repair_plan(generation, &tasks))
            }
        }
    }
}

/// Records how the task this reconcile ran went. A failure already recorded in `before` (the
/// same plan as the reconcile found it) is not reported again.
#[allow(clippy::too_many_arguments)]
fn record(
    plan: &mut TaskPlan,
    before: Option<&TaskPlan>,
    status: &mut SeiNodeStatus,
    node: &SeiNode,
    task: Task,
    outcome: &Outcome,
    events: &mut Vec<NodeEvent>,
    now: Timestamp,
) {
    let Some(index) = plan
        .tasks
        .iter()
        .position(|t| t.r#type == task.as_str() && t.status != TaskStatus::Complete)
    else {
        return;
    };
    match outcome {
        // Still pending: tried again later (see `decide`).
        Outcome::Waiting(_) => {}
        Outcome::Done => {
            // A retried task that failed on an object in the way went through: resume.
            if plan.phase == PlanPhase::Failed {
                plan.phase = PlanPhase::Active;
            }
            complete(plan, index, status, node, now);
        }
        Outcome::Failed(failure) => {
            let known = before.and_then(|p| p.tasks.get(index)).is_some_and(|t| {
                t.status == TaskStatus::Failed
                    && t.error.as_deref() == Some(failure.message.as_str())
                    && t.reason == Some(failure.reason)
            });
            let slot = &mut plan.tasks[index];
            slot.status = TaskStatus::Failed;
            slot.error = Some(failure.message.clone());
            slot.reason = Some(failure.reason);
            plan.phase = PlanPhase::Failed;
            if !known {
                events.push(NodeEvent::PlanFailed {
                    plan: plan.id.clone(),
                    task: task.as_str().to_owned(),
                    error: failure.message.clone(),
                });
            }
            // A failed update leaves the running pods alone; a failed init plan fails the node.
            if status.current_image.is_none() {
                set_phase(status, SeiNodePhase::Failed, now);
            }
        }
    }
}

fn complete(
    plan: &mut TaskPlan,
    index: usize,
    status: &mut SeiNodeStatus,
    node: &SeiNode,
    now: Timestamp,
) {
    plan.tasks[index].status = TaskStatus::Complete;
    plan.tasks[index].error = None;
    plan.tasks[index].reason = None;
    if matches!(
        status.phase,
        Some(SeiNodePhase::Pending | SeiNodePhase::Failed)
    ) {
        set_phase(status, SeiNodePhase::Initializing, now);
    }
    if plan.phase == PlanPhase::Active && next_task(plan).is_none() {
        plan.phase = PlanPhase::Complete;
        if let Some(target) = plan.target_phase {
            set_phase(status, target, now);
        }
        status.current_image = Some(node.spec.image.clone());
    }
}

/// Moves the plan as far as observation allows (an await that holds completes, an obstacle
/// fails its task) and returns the task to run, if any.
fn advance(
    plan: &mut TaskPlan,
    status: &mut SeiNodeStatus,
    node: &SeiNode,
    observed: &Observed,
    now: Timestamp,
) -> Option<Task> {
    loop {
        let (index, task) = next_task(plan)?;
        let Some(task) = task else {
            let error = format!("unknown task type \"{}\"", plan.tasks[index].r#type);
            plan.tasks[index].status = TaskStatus::Failed;
            plan.tasks[index].error = Some(error);
            plan.tasks[index].reason = Some(TaskFailureReason::UnknownTask);
            plan.phase = PlanPhase::Failed;
            return None;
        };
        if task == Task::AwaitStatefulSetReady {
            if observed.objects.rolled_out && observed.objects.stateful_set == ObjectState::Current
            {
                complete(plan, index, status, node, now);
                continue;
            }
            // The watch on owned StatefulSets brings the node back when the status moves.
            return None;
        }
        if observed.objects.of(task) == &ObjectState::Orphaned {
            return None;
        }
        return Some(task);
    }
}

/// The task of a plan that failed on an object in the way, to try again: whether the name is
/// free is found out by trying (objects not labelled as the controller's are not watched); the
/// status changes only when it goes through, so a retry that fails again writes nothing.
fn retry_in_the_way(plan: &TaskPlan, observed: &Observed) -> Option<Task> {
    if plan.phase != PlanPhase::Failed {
        return None;
    }
    let failed = plan.tasks.iter().find(|t| t.status == TaskStatus::Failed)?;
    if !failed_in_the_way(failed) {
        return None;
    }
    // Not while a deleted node's object holds the name: it is the garbage collector's, never
    // adopted (its deletion wakes the node).
    Task::parse(&failed.r#type).filter(|task| {
        !matches!(
            observed.objects.of(*task),
            ObjectState::Foreign(_) | ObjectState::Orphaned
        )
    })
}

/// Whether the next task waits for the garbage collector.
fn blocked(plan: &TaskPlan, observed: &Observed) -> bool {
    next_task(plan)
        .and_then(|(_, task)| task)
        .is_some_and(|task| observed.objects.of(task) == &ObjectState::Orphaned)
        || plan.phase == PlanPhase::Failed && plan.tasks.iter().any(failed_in_the_way)
}

/// Events for recent flips and a failed plan, which a killed predecessor may not have sent.
fn reassert(decision: &mut Decision, now: Timestamp) {
    let status = &decision.status;
    let recent = |c: &&Condition| now.duration_since(c.last_transition_time.0) <= REASSERT_WINDOW;
    let mut again = Vec::new();
    for c in status.conditions.iter().flatten().filter(recent) {
        let at = c.last_transition_time.0;
        match c.type_.as_str() {
            SIDECAR_TLS_SECRET_READY => again.push(tls_event(c, is_true(c), at)),
            SIDECAR_READY => again.push(sidecar_event(c, at)),
            _ => {}
        }
    }
    if let Some(plan) = status
        .plan
        .as_ref()
        .filter(|p| p.phase == PlanPhase::Failed)
        && let Some(task) = plan.tasks.iter().find(|t| t.status == TaskStatus::Failed)
    {
        again.push(NodeEvent::PlanFailed {
            plan: plan.id.clone(),
            task: task.r#type.clone(),
            error: task.error.clone().unwrap_or_default(),
        });
    }
    for event in again {
        if !decision.events.contains(&event) {
            decision.events.push(event);
        }
    }
}

fn set_phase(status: &mut SeiNodeStatus, phase: SeiNodePhase, now: Timestamp) {
    if status.phase != Some(phase) {
        status.phase = Some(phase);
        status.phase_transition_time = Some(Time(now));
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use seinode_tls_crds::validation::Reason;
    use seinode_tls_crds::{SeiNodeSpec, SidecarSpec, SidecarTls};

    use crate::plan::init_plan;

    const NOW: i64 = 1_800_000_000;

    fn at(second: i64) -> Timestamp {
        Timestamp::from_second(second).expect("valid")
    }

    fn now() -> Timestamp {
        at(NOW)
    }

    /// A TLS node `sei/rpc` (uid `u-1`) running `image`.
    pub(crate) fn node(image: &str, generation: i64) -> SeiNode {
        let mut node = SeiNode::new(
            "rpc",
            SeiNodeSpec {
                chain_id: "pacific-1".to_owned(),
                image: image.to_owned(),
                sidecar: Some(SidecarSpec {
                    tls: Some(SidecarTls {
                        secret_name: "rpc-tls".to_owned(),
                    }),
                    ..SidecarSpec::default()
                }),
                ..SeiNodeSpec::default()
            },
        );
        node.metadata.namespace = Some("sei".to_owned());
        node.metadata.uid = Some("u-1".to_owned());
        node.metadata.generation = Some(generation);
        node
    }

    fn settings() -> Settings {
        Settings {
            cluster_domain: "cluster.local".to_owned(),
            cert_expiry_warning: Duration::from_secs(7 * 24 * 3600),
            sidecar_probe_interval: Duration::from_secs(30),
        }
    }

    fn verdict(reason: Reason, not_after: Option<i64>) -> SecretVerdict {
        SecretVerdict {
            reason,
            message: format!("{reason}"),
            not_after: not_after.map(at),
            missing_dns_names: vec![],
        }
    }

    fn observed(reason: Reason) -> Observed {
        Observed {
            leading: true,
            verdict: Some(verdict(reason, Some(NOW + 90 * 24 * 3600))),
            ..Observed::default()
        }
    }

    fn current() -> Objects {
        Objects {
            config_map: ObjectState::Current,
            service: ObjectState::Current,
            stateful_set: ObjectState::Current,
            rolled_out: true,
        }
    }

    /// What a new node's first reconcile writes, with its Secret judged `reason`, at `now()`.
    fn first_status(reason: Reason) -> SeiNodeStatus {
        decide(
            &node("sei:v1", 1),
            &SeiNodeStatus::default(),
            &observed(reason),
            &settings(),
            now(),
        )
        .status
    }

    /// A TLS node's first status with its plan's applies done: at `MarkSidecarReady`.
    fn at_mark_ready() -> SeiNodeStatus {
        let base = first_status(Reason::Ready);
        let mut plan = base.plan.clone().expect("plan");
        for task in &mut plan.tasks[..3] {
            task.status = TaskStatus::Complete;
        }
        SeiNodeStatus {
            plan: Some(plan),
            ..base
        }
    }

    fn condition_of<'a>(status: &'a SeiNodeStatus, type_: &str) -> &'a Condition {
        status
            .conditions
            .iter()
            .flatten()
            .find(|c| c.type_ == type_)
            .unwrap_or_else(|| panic!("no {type_} condition"))
    }

    fn reasons(decision: &Decision) -> Vec<&'static str> {
        decision.events.iter().map(NodeEvent::reason).collect()
    }

    /// A Running TLS node whose init plan completed, at generation 1.
    fn running() -> SeiNodeStatus {
        let first = decide(
            &node("sei:v1", 1),
            &SeiNodeStatus::default(),
            &observed(Reason::Ready),
            &settings(),
            at(NOW - 3600),
        );
        let mut status = first.status;
        let mut plan = init_plan(1, true);
        plan.phase = PlanPhase::Complete;
        for task in &mut plan.tasks {
            task.status = TaskStatus::Complete;
        }
        status.plan = Some(plan);
        status.phase = Some(SeiNodePhase::Running);
        status.current_image = Some("sei:v1".to_owned());
        let ready = condition(
            SIDECAR_READY,
            true,
            "SidecarHealthy",
            "ok",
            Some(1),
            None,
            at(NOW - 3600),
        );
        status.conditions.get_or_insert_default().push(ready);
        status
    }

    #[test]
    fn a_new_node_waiting_for_its_secret_gets_the_contract_the_condition_and_a_blocked_plan() {
        let decision = decide(
            &node("sei:v1", 1),
            &SeiNodeStatus::default(),
            &observed(Reason::NotFound),
            &settings(),
            now(),
        );
        let status = &decision.status;
        let tls = status.sidecar_tls.as_ref().expect("contract");
        assert_eq!(tls.secret_name, "rpc-tls");
        assert_eq!(
            tls.required_dns_names,
            [
                "rpc.sei.svc.cluster.local",
                "rpc-0.rpc.sei.svc.cluster.local"
            ]
        );
        let ready = condition_of(status, SIDECAR_TLS_SECRET_READY);
        assert_eq!(
            (ready.status.as_str(), ready.reason.as_str()),
            ("False", "TLSSecretNotFound")
        );
        assert_eq!(status.phase, Some(SeiNodePhase::Pending));
        let plan = status.plan.as_ref().expect("plan recorded before it runs");
        assert_eq!(plan.phase, PlanPhase::Active);
        assert!(plan.tasks.iter().all(|t| t.status == TaskStatus::Pending));
        assert_eq!(decision.task, None, "the gate is closed");
        assert_eq!(reasons(&decision), ["SidecarTLSSecretNotReady"]);
        assert_eq!(status.observed_generation, Some(1));
    }

    #[test]
    fn a_fixed_secret_flips_the_condition_once_and_opens_the_gate() {
        let waiting = decide(
            &node("sei:v1", 1),
            &SeiNodeStatus::default(),
            &observed(Reason::NotFound),
            &settings(),
            at(NOW - 60),
        )
        .status;
        let decision = decide(
            &node("sei:v1", 1),
            &waiting,
            &observed(Reason::Ready),
            &settings(),
            now(),
        );
        let ready = condition_of(&decision.status, SIDECAR_TLS_SECRET_READY);
        assert_eq!(ready.status, "True");
        assert_eq!(ready.last_transition_time, Time(now()));
        assert_eq!(reasons(&decision), ["SidecarTLSSecretReady"]);
        assert_eq!(decision.task, Some(Task::ApplyRbacProxyConfig));
        // Deciding again from what was written: nothing new to say or record.
        let again = decide(
            &node("sei:v1", 1),
            &decision.status,
            &observed(Reason::Ready),
            &settings(),
            at(NOW + 1),
        );
        assert_eq!(again.status, decision.status);
        assert!(again.events.is_empty());
        assert_eq!(again.task, Some(Task::ApplyRbacProxyConfig));
    }

    #[test]
    fn a_task_done_is_recorded_and_the_next_one_is_chosen_never_an_earlier_one() {
        let base = first_status(Reason::Ready);
        let mut seen = observed(Reason::Ready);
        seen.ran = Some((Task::ApplyRbacProxyConfig, Outcome::Done));
        let decision = decide(&node("sei:v1", 1), &base, &seen, &settings(), now());
        let plan = decision.status.plan.as_ref().expect("plan");
        assert_eq!(plan.tasks[0].status, TaskStatus::Complete);
        assert_eq!(decision.status.phase, Some(SeiNodePhase::Initializing));
        assert_eq!(decision.task, Some(Task::ApplyService));

        // The StatefulSet applied and rolled out: the await completes from observation alone.
        let mut base = decision.status;
        for task in &mut base.plan.as_mut().expect("plan").tasks[..4] {
            task.status = TaskStatus::Complete;
        }
        let mut seen = observed(Reason::Ready);
        seen.objects = current();
        let done = decide(&node("sei:v1", 1), &base, &seen, &settings(), now());
        let plan = done.status.plan.as_ref().expect("plan");
        assert_eq!(plan.phase, PlanPhase::Complete);
        assert_eq!(done.status.phase, Some(SeiNodePhase::Running));
        assert_eq!(done.status.current_image.as_deref(), Some("sei:v1"));
        assert_eq!(done.task, None);
        // Not rolled out yet: waits, runs nothing.
        seen.objects.rolled_out = false;
        let waiting = decide(&node("sei:v1", 1), &base, &seen, &settings(), now());
        assert_eq!(waiting.task, None);
        assert_eq!(waiting.status.plan, base.plan);
    }

    #[test]
    fn expiry_is_warned_once_in_the_window_and_reported_when_it_passes() {
        let base = running();
        let soon = NOW + 2 * 24 * 3600;
        let mut seen = observed(Reason::Ready);
        seen.verdict = Some(verdict(Reason::Ready, Some(soon)));
        seen.objects = current();
        let decision = decide(&node("sei:v1", 1), &base, &seen, &settings(), now());
        assert_eq!(reasons(&decision), ["SidecarTLSCertificateExpiring"]);
        assert!(decision.requeue <= Duration::from_secs(2 * 24 * 3600 + 1));
        seen.expiry_warned = true;
        let warned = decide(&node("sei:v1", 1), &base, &seen, &settings(), now());
        assert!(warned.events.is_empty(), "{:?}", warned.events);

        // Outside the window: a requeue for when it opens, no event.
        seen.expiry_warned = false;
        seen.verdict = Some(verdict(Reason::Ready, Some(NOW + 30 * 24 * 3600)));
        let early = decide(&node("sei:v1", 1), &base, &seen, &settings(), now());
        assert!(early.events.is_empty());

        // Expired: the condition turns False, the gate closes, the sidecar is no longer Ready.
        seen.verdict = Some(verdict(Reason::Expired, Some(NOW - 1)));
        let expired = decide(&node("sei:v1", 1), &base, &seen, &settings(), now());
        let tls = condition_of(&expired.status, SIDECAR_TLS_SECRET_READY);
        assert_eq!(
            (tls.status.as_str(), tls.reason.as_str()),
            ("False", "TLSSecretExpired")
        );
        let sidecar = condition_of(&expired.status, SIDECAR_READY);
        assert_eq!(
            (sidecar.status.as_str(), sidecar.reason.as_str()),
            ("False", SIDECAR_GATED)
        );
        assert_eq!(
            reasons(&expired),
            ["SidecarTLSSecretNotReady", "SidecarNotReady"]
        );
        assert_eq!(expired.task, None);
        // Once closed, deciding again repeats nothing.
        let again = decide(
            &node("sei:v1", 1),
            &expired.status,
            &seen,
            &settings(),
            now(),
        );
        assert!(again.events.is_empty());
        assert_eq!(again.status, expired.status);
    }

    #[test]
    fn a_failed_task_fails_the_plan_once_and_waits_for_a_spec_change() {
        let base = first_status(Reason::Ready);
        let mut seen = observed(Reason::Ready);
        seen.ran = Some((
            Task::ApplyRbacProxyConfig,
            Outcome::Failed(TaskFailure::new(
                TaskFailureReason::RefusedByAPIServer,
                "refused",
            )),
        ));
        let failed = decide(&node("sei:v1", 1), &base, &seen, &settings(), now());
        let plan = failed.status.plan.as_ref().expect("plan");
        assert_eq!(plan.phase, PlanPhase::Failed);
        assert_eq!(plan.tasks[0].error.as_deref(), Some("refused"));
        assert_eq!(failed.status.phase, Some(SeiNodePhase::Failed));
        assert_eq!(reasons(&failed), ["PlanFailed"]);
        assert_eq!(failed.task, None);

        let seen = observed(Reason::Ready);
        let still = decide(
            &node("sei:v1", 1),
            &failed.status,
            &seen,
            &settings(),
            now(),
        );
        assert_eq!(still.status, failed.status);
        assert_eq!((still.task, still.events.len()), (None, 0));

        let fixed = decide(
            &node("sei:v2", 2),
            &failed.status,
            &seen,
            &settings(),
            now(),
        );
        let plan = fixed.status.plan.as_ref().expect("plan");
        assert_eq!(
            (plan.id.as_str(), plan.phase),
            ("init-2", PlanPhase::Active)
        );
        assert_eq!(fixed.task, Some(Task::ApplyRbacProxyConfig));
    }

    #[test]
    fn a_new_image_on_a_running_node_gets_an_update_plan() {
        let mut seen = observed(Reason::Ready);
        seen.objects = current();
        let decision = decide(&node("sei:v2", 2), &running(), &seen, &settings(), now());
        let plan = decision.status.plan.as_ref().expect("plan");
        assert_eq!(plan.id, "update-2");
        assert_eq!(decision.task, Some(Task::ApplyStatefulSet));
        assert_eq!(decision.status.phase, Some(SeiNodePhase::Running));
    }

    #[test]
    fn drift_on_a_running_node_is_repaired_by_a_plan_of_its_own() {
        let mut seen = observed(Reason::Ready);
        seen.objects = current();
        let steady = decide(&node("sei:v1", 1), &running(), &seen, &settings(), now());
        assert_eq!(steady.task, None);
        assert_eq!(steady.status.plan, running().plan, "nothing to repair");

        seen.objects.service = ObjectState::Missing;
        let deleted = decide(&node("sei:v1", 1), &running(), &seen, &settings(), now());
        let plan = deleted.status.plan.as_ref().expect("plan");
        assert_eq!(plan.id, "repair-1");
        assert_eq!(plan.tasks.len(), 1);
        assert_eq!(deleted.task, Some(Task::ApplyService));

        seen.objects = current();
        seen.objects.stateful_set = ObjectState::Drifted;
        let changed = decide(&node("sei:v1", 1), &running(), &seen, &settings(), now());
        let plan = changed.status.plan.as_ref().expect("plan");
        let types: Vec<&str> = plan.tasks.iter().map(|t| t.r#type.as_str()).collect();
        assert_eq!(
            types,
            [
                "ApplyStatefulSet",
                "MarkSidecarReady",
                "AwaitStatefulSetReady"
            ]
        );
        assert_eq!(changed.task, Some(Task::ApplyStatefulSet));
    }

    /// A sidecar task that cannot finish yet (the pod starting) stays pending: nothing runs
    /// again in this reconcile, the node is looked at again soon, and `SidecarReady` says what
    /// the plan waits for.
    #[test]
    fn a_sidecar_task_that_waits_stays_pending_and_says_why() {
        let base = at_mark_ready();
        let mut seen = observed(Reason::Ready);
        seen.objects = current();
        let first = decide(&node("sei:v1", 1), &base, &seen, &settings(), now());
        assert_eq!(first.task, Some(Task::MarkSidecarReady));

        seen.ran = Some((
            Task::MarkSidecarReady,
            Outcome::Waiting("pod ns/rpc-0 has no IP yet".to_owned()),
        ));
        let waiting = decide(&node("sei:v1", 1), &base, &seen, &settings(), now());
        assert_eq!(waiting.task, None);
        assert!(waiting.requeue <= SIDECAR_TASK_RETRY);
        let plan = waiting.status.plan.as_ref().expect("plan");
        assert_eq!(plan.phase, PlanPhase::Active);
        assert_eq!(plan.tasks[3].status, TaskStatus::Pending);
        let sidecar = condition_of(&waiting.status, SIDECAR_READY);
        assert_eq!(
            (sidecar.status.as_str(), sidecar.reason.as_str()),
            ("False", SIDECAR_STARTING)
        );
        assert!(sidecar.message.contains("MarkSidecarReady") && sidecar.message.contains("no IP"));

        seen.ran = Some((Task::MarkSidecarReady, Outcome::Done));
        let marked = decide(
            &node("sei:v1", 1),
            &waiting.status,
            &seen,
            &settings(),
            now(),
        );
        let plan = marked.status.plan.as_ref().expect("plan");
        assert_eq!(plan.tasks[3].status, TaskStatus::Complete);
        let sidecar = condition_of(&marked.status, SIDECAR_READY);
        assert_eq!(
            (sidecar.status.as_str(), sidecar.reason.as_str()),
            ("True", SIDECAR_MARKED_READY)
        );
        // The StatefulSet reports the pod ready (as `current()` has it): Running.
        assert_eq!(marked.status.phase, Some(SeiNodePhase::Running));
    }

    /// A sidecar task whose pod is not there to call is not called: the decision waits for the
    /// pod (the Pod watch wakes the node; the requeue is a safety net) and says so, exactly as
    /// a call that answered "waiting" would have, without a call per retry.
    #[test]
    fn a_sidecar_task_without_a_pod_to_call_waits_for_the_pod_without_calling() {
        let base = at_mark_ready();
        let mut seen = observed(Reason::Ready);
        seen.objects = current();
        let cases: [(Option<&str>, Option<Task>, Duration); 3] = [
            (None, Some(Task::MarkSidecarReady), RESYNC),
            (
                Some("pod ns/rpc-0 of StatefulSet rpc is not there yet"),
                None,
                SIDECAR_POD_RETRY,
            ),
            (
                Some("pod ns/rpc-0 is not of the StatefulSet's current revision yet"),
                None,
                SIDECAR_POD_RETRY,
            ),
        ];
        for (unreachable, task, requeue) in cases {
            seen.sidecar_unreachable = unreachable.map(str::to_owned);
            let decision = decide(&node("sei:v1", 1), &base, &seen, &settings(), now());
            assert_eq!(decision.task, task, "{unreachable:?}");
            assert_eq!(decision.requeue, requeue, "{unreachable:?}");
            assert!(
                !decision.probe,
                "{unreachable:?}: no probe while the plan runs"
            );
            let plan = decision.status.plan.as_ref().expect("plan");
            assert_eq!(plan.tasks[3].status, TaskStatus::Pending);
            if let Some(why) = unreachable {
                let sidecar = condition_of(&decision.status, SIDECAR_READY);
                assert_eq!(
                    (sidecar.status.as_str(), sidecar.reason.as_str()),
                    ("False", SIDECAR_STARTING)
                );
                assert!(sidecar.message.contains(why), "{}", sidecar.message);
            }
        }
        // A result in hand is recorded whatever the pod does now (observe does not look the pod
        // up when a finished call's result waits; this checks decide does not need that).
        seen.ran = Some((Task::MarkSidecarReady, Outcome::Done));
        let marked = decide(&node("sei:v1", 1), &base, &seen, &settings(), now());
        let plan = marked.status.plan.as_ref().expect("plan");
        assert_eq!(plan.tasks[3].status, TaskStatus::Complete);
    }

    /// The decision lists the probe a settled Running node is due for: not when this reconcile
    /// holds a probe's result (the next one is an interval on), not while the TLS gate is
    /// closed, not while a plan runs.
    #[test]
    fn a_settled_running_node_with_its_gate_open_is_due_for_a_probe() {
        let mut seen = observed(Reason::Ready);
        seen.objects = current();
        let due = decide(&node("sei:v1", 1), &running(), &seen, &settings(), now());
        assert!(due.probe);
        assert_eq!(due.task, None);

        seen.probe = Some(ProbeResult::Unreachable("refused".to_owned()));
        let answered = decide(&node("sei:v1", 1), &running(), &seen, &settings(), now());
        assert!(!answered.probe);

        let gated = decide(
            &node("sei:v1", 1),
            &running(),
            &observed(Reason::NotFound),
            &settings(),
            now(),
        );
        assert!(!gated.probe);

        let mut unsettled = observed(Reason::Ready);
        unsettled.objects = current();
        unsettled.objects.stateful_set = ObjectState::Drifted;
        let repairing = decide(
            &node("sei:v1", 1),
            &running(),
            &unsettled,
            &settings(),
            now(),
        );
        assert_eq!(repairing.task, Some(Task::ApplyStatefulSet));
        assert!(!repairing.probe);
    }

    /// A sidecar that restarted answers 503 until `mark-ready` again: a repair plan submits it.
    #[test]
    fn a_sidecar_that_forgot_mark_ready_gets_it_again() {
        let mut seen = observed(Reason::Ready);
        seen.objects = current();
        seen.probe = Some(ProbeResult::NotMarkedReady("503".to_owned()));
        let decision = decide(&node("sei:v1", 1), &running(), &seen, &settings(), now());
        let plan = decision.status.plan.as_ref().expect("plan");
        let types: Vec<&str> = plan.tasks.iter().map(|t| t.r#type.as_str()).collect();
        assert_eq!(types, ["MarkSidecarReady"]);
        assert_eq!(decision.task, Some(Task::MarkSidecarReady));
    }

    #[test]
    fn drift_is_seen_in_the_decision_that_completes_the_plan() {
        let mut base = running();
        let plan = base.plan.as_mut().expect("plan");
        plan.phase = PlanPhase::Active;
        plan.tasks[4].status = TaskStatus::Pending;
        base.phase = Some(SeiNodePhase::Initializing);
        let mut seen = observed(Reason::Ready);
        seen.objects = current();
        seen.objects.service = ObjectState::Missing;
        let decision = decide(&node("sei:v1", 1), &base, &seen, &settings(), now());
        assert_eq!(decision.status.phase, Some(SeiNodePhase::Running));
        assert_eq!(
            decision.status.plan.as_ref().map(|p| p.id.as_str()),
            Some("repair-1")
        );
        assert_eq!(decision.task, Some(Task::ApplyService));
    }

    #[test]
    fn an_object_in_the_way_fails_the_plan_until_it_is_gone_and_a_deleted_nodes_object_is_awaited()
    {
        let base = first_status(Reason::Ready);
        let mut seen = observed(Reason::Ready);
        seen.objects.config_map = ObjectState::Orphaned;
        let orphaned = decide(&node("sei:v1", 1), &base, &seen, &settings(), now());
        assert_eq!(orphaned.task, None, "the garbage collector goes first");
        assert_eq!(orphaned.requeue, BLOCKED_RETRY);

        // Recognised by its reason, whatever the message says.
        let error = TaskFailure::new(
            TaskFailureReason::ObjectInTheWay,
            "ConfigMap sei/rpc-rbac-proxy-config has no controller owner",
        );
        seen.objects.config_map = ObjectState::Foreign("it has no controller owner".to_owned());
        seen.ran = Some((Task::ApplyRbacProxyConfig, Outcome::Failed(error.clone())));
        let blocked = decide(&node("sei:v1", 1), &base, &seen, &settings(), now());
        assert_eq!(reasons(&blocked), ["PlanFailed"]);
        assert_eq!(blocked.requeue, BLOCKED_RETRY);

        seen.ran = None;
        let still = decide(
            &node("sei:v1", 1),
            &blocked.status,
            &seen,
            &settings(),
            now(),
        );
        assert_eq!((still.task, still.events.len()), (None, 0));

        // Not seen by the watch (not labelled): the task is tried again, the status unchanged.
        seen.objects.config_map = ObjectState::Missing;
        let v1 = node("sei:v1", 1);
        let retry = decide(&v1, &blocked.status, &seen, &settings(), now());
        assert_eq!(retry.task, Some(Task::ApplyRbacProxyConfig));
        assert_eq!(retry.status, blocked.status, "a retry alone writes nothing");
        let failed = |status: &SeiNodeStatus| {
            let plan = status.plan.as_ref().unwrap();
            plan.tasks
                .iter()
                .find(|t| t.status == TaskStatus::Failed)
                .cloned()
                .unwrap()
        };
        assert_eq!(
            failed(&blocked.status).reason,
            Some(TaskFailureReason::ObjectInTheWay),
            "the reason is in the status"
        );
        // A status written before tasks carried a reason is recognised by its message.
        let mut legacy = blocked.status.clone();
        for task in &mut legacy.plan.as_mut().unwrap().tasks {
            if task.status == TaskStatus::Failed {
                task.reason = None;
                task.error = Some(format!(
                    "ConfigMap sei/rpc-rbac-proxy-config {IN_THE_WAY}: it has no controller owner"
                ));
            }
        }
        let legacy_retry = decide(&v1, &legacy, &seen, &settings(), now());
        assert_eq!(legacy_retry.task, Some(Task::ApplyRbacProxyConfig));
        // Another failure is not retried on its own: it waits for a spec change.
        let mut refused = blocked.status.clone();
        for task in &mut refused.plan.as_mut().unwrap().tasks {
            if task.status == TaskStatus::Failed {
                task.reason = Some(TaskFailureReason::RefusedByAPIServer);
            }
        }
        assert_eq!(decide(&v1, &refused, &seen, &settings(), now()).task, None);
        // Still there: failed again, but nothing written or reported again.
        seen.ran = Some((Task::ApplyRbacProxyConfig, Outcome::Failed(error)));
        let again = decide(&v1, &blocked.status, &seen, &settings(), now());
        assert_eq!(again.status, blocked.status);
        // Now shown by the watch as a deleted node's object: awaited, never applied over.
        seen.ran = None;
        seen.objects.config_map = ObjectState::Orphaned;
        let awaited = decide(&v1, &blocked.status, &seen, &settings(), now());
        assert_eq!(awaited.task, None, "an orphan in the way is not adopted");
        assert!(again.events.is_empty());
        assert_eq!(again.task, None, "one try per reconcile");
        // Gone: the plan resumes where it failed.
        seen.ran = Some((Task::ApplyRbacProxyConfig, Outcome::Done));
        let resumed = decide(&v1, &blocked.status, &seen, &settings(), now());
        let plan = resumed.status.plan.as_ref().expect("plan");
        assert_eq!(plan.phase, PlanPhase::Active);
        assert_eq!(plan.tasks[0].status, TaskStatus::Complete);
        assert_eq!(resumed.status.phase, Some(SeiNodePhase::Initializing));
        assert_eq!(resumed.task, Some(Task::ApplyService));
    }

    #[test]
    fn a_replica_that_does_not_lead_decides_nothing() {
        let mut seen = observed(Reason::Expired);
        seen.leading = false;
        let decision = decide(&node("sei:v2", 2), &running(), &seen, &settings(), now());
        assert_eq!(decision.status, running());
        assert!(decision.events.is_empty());
        assert_eq!(decision.task, None);
    }

    #[test]
    fn a_new_process_tells_recent_flips_again_and_not_old_ones() {
        let flipped = decide(
            &node("sei:v1", 1),
            &SeiNodeStatus::default(),
            &observed(Reason::NotFound),
            &settings(),
            at(NOW - 30),
        )
        .status;
        let mut seen = observed(Reason::NotFound);
        seen.first_sight = true;
        let decision = decide(&node("sei:v1", 1), &flipped, &seen, &settings(), now());
        assert_eq!(decision.status, flipped);
        assert_eq!(
            decision.events,
            [NodeEvent::TlsSecretNotReady {
                message: "TLSSecretNotFound".to_owned(),
                at: at(NOW - 30),
            }],
            "the same event as the flip's, so it is created once"
        );
        let later = decide(
            &node("sei:v1", 1),
            &flipped,
            &seen,
            &settings(),
            at(NOW + 3600),
        );
        assert!(later.events.is_empty(), "{:?}", later.events);
    }

    #[test]
    fn a_healthy_probe_on_a_settled_running_node_is_recorded_and_requeued_at_the_interval() {
        let mut base = running();
        base.conditions
            .as_mut()
            .expect("conditions")
            .retain(|c| c.type_ != SIDECAR_READY);
        let mut seen = observed(Reason::Ready);
        seen.objects = current();
        seen.probe = Some(ProbeResult::Unreachable("refused".to_owned()));
        let decision = decide(&node("sei:v1", 1), &base, &seen, &settings(), now());
        let sidecar = condition_of(&decision.status, SIDECAR_READY);
        assert_eq!(
            (sidecar.status.as_str(), sidecar.reason.as_str()),
            ("False", "SidecarUnreachable")
        );
        assert_eq!(reasons(&decision), ["SidecarNotReady"]);
        assert_eq!(decision.requeue, Duration::from_secs(30));
        seen.probe = Some(ProbeResult::Unreachable("refused again".to_owned()));
        let again = decide(
            &node("sei:v1", 1),
            &decision.status,
            &seen,
            &settings(),
            now(),
        );
        assert!(again.events.is_empty(), "no flip, no event");
    }

    /// `Ready` summarises the node, naming the first thing that keeps it from being ready, and
    /// carries the node's generation (what `kubectl wait` and kstatus compare).
    #[test]
    fn ready_says_whether_the_node_serves_and_if_not_the_first_reason() {
        let ready_of = |decision: &Decision| {
            let ready = condition_of(&decision.status, READY);
            assert_eq!(
                ready.observed_generation,
                node("sei:v1", 1).metadata.generation
            );
            (
                ready.status.clone(),
                ready.reason.clone(),
                ready.message.clone(),
            )
        };
        let new = |reason| {
            decide(
                &node("sei:v1", 1),
                &SeiNodeStatus::default(),
                &observed(reason),
                &settings(),
                now(),
            )
        };
        let (status, reason, message) = ready_of(&new(Reason::NotFound));
        assert_eq!(
            (status.as_str(), reason.as_str()),
            ("False", "TLSSecretNotReady")
        );
        assert!(message.contains("TLSSecretNotFound"), "{message}");
        let (status, reason, message) = ready_of(&new(Reason::Ready));
        assert_eq!((status.as_str(), reason.as_str()), ("False", "NotRunning"));
        assert!(message.contains("Pending"), "{message}");

        let mut seen = observed(Reason::Ready);
        seen.objects = current();
        seen.probe = Some(ProbeResult::Healthy("ok".to_owned()));
        let serving = decide(&node("sei:v1", 1), &running(), &seen, &settings(), now());
        let (status, reason, _) = ready_of(&serving);
        assert_eq!((status.as_str(), reason.as_str()), ("True", "NodeReady"));
        // Unchanged, it writes the same condition (no time in the message, same transition).
        let again = decide(
            &node("sei:v1", 1),
            &serving.status,
            &seen,
            &settings(),
            at(NOW + 60),
        );
        assert_eq!(
            condition_of(&again.status, READY),
            condition_of(&serving.status, READY)
        );

        seen.probe = Some(ProbeResult::Unreachable("refused".to_owned()));
        let (status, reason, message) = ready_of(&decide(
            &node("sei:v1", 1),
            &running(),
            &seen,
            &settings(),
            now(),
        ));
        assert_eq!(
            (status.as_str(), reason.as_str()),
            ("False", "SidecarNotReady")
        );
        assert!(message.contains("SidecarUnreachable"), "{message}");

        seen.probe = None;
        let updating = decide(&node("sei:v2", 2), &running(), &seen, &settings(), now());
        let ready = condition_of(&updating.status, READY);
        assert_eq!(
            (
                ready.status.as_str(),
                ready.reason.as_str(),
                ready.observed_generation
            ),
            ("False", "PlanInProgress", Some(2))
        );
        assert!(ready.message.contains("update-2"), "{}", ready.message);

        let mut expired = observed(Reason::Expired);
        expired.objects = current();
        let (status, reason, _) = ready_of(&decide(
            &node("sei:v1", 1),
            &running(),
            &expired,
            &settings(),
            now(),
        ));
        assert_eq!(
            (status.as_str(), reason.as_str()),
            ("False", "TLSSecretNotReady")
        );
    }

    /// The contract in the status carries the certificate's expiry (the Expires column), and
    /// the condition of a Secret that could not be read is Unknown, not False.
    #[test]
    fn the_status_carries_the_expiry_and_an_unreadable_secret_is_unknown() {
        let ready = first_status(Reason::Ready);
        assert_eq!(
            ready.sidecar_tls.as_ref().and_then(|t| t.not_after.clone()),
            Some(Time(at(NOW + 90 * 24 * 3600)))
        );
        let unreadable = decide(
            &node("sei:v1", 1),
            &SeiNodeStatus::default(),
            &Observed {
                leading: true,
                verdict: Some(verdict(Reason::Unavailable, None)),
                ..Observed::default()
            },
            &settings(),
            now(),
        );
        let tls = condition_of(&unreadable.status, SIDECAR_TLS_SECRET_READY);
        assert_eq!(
            (tls.status.as_str(), tls.reason.as_str()),
            ("Unknown", "TLSSecretUnavailable")
        );
        assert_eq!(
            unreadable
                .status
                .sidecar_tls
                .as_ref()
                .and_then(|t| t.not_after.clone()),
            None
        );
        // Not ready, and the plan stays gated.
        assert_eq!(condition_of(&unreadable.status, READY).status, "False");
        assert_eq!(unreadable.task, None);
    }
}
