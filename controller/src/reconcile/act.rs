//! Act: the writes a decision asks for. The status (on the resourceVersion it was decided
//! from), the events (created once), and the one task a reconcile may run.

use std::sync::Arc;
use std::time::Duration;

use jiff::Timestamp;
use k8s_openapi::api::events::v1::Event;
use kube::api::{Patch, PatchParams, PostParams};
use kube::{Api, Resource, ResourceExt};
use seinode_tls_crds::{SeiNode, SeiNodeStatus, TaskFailureReason};
use serde::Serialize;
use serde::de::DeserializeOwned;
use thiserror::Error;

use super::context::Context;
use super::observe::Desired;
use super::sidecar_calls::{Called, start_call};
use crate::calls::CallKind;
use crate::decide::{
    Decision, IN_THE_WAY, ObjectState, Objects, Observed, Outcome, SIDECAR_TASK_RETRY, TaskFailure,
};
use crate::dispatch::{Next, Priority};
use crate::events::NodeEvent;
use crate::plan::Task;

/// A reconcile re-observes at most this often after its status write conflicted.
pub(super) const CONFLICT_ATTEMPTS: usize = 3;

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
    /// The status write found the node changed since it was read: `reconcile_newest` reads it
    /// again and decides again, and reports this error only after [`CONFLICT_ATTEMPTS`].
    #[error(
        "the status of SeiNode {namespace}/{name} changed while it was being decided ({CONFLICT_ATTEMPTS} times in a row)"
    )]
    Conflict { namespace: String, name: String },
}

/// How a reconcile ended.
pub(super) enum Step {
    Done(Next),
    /// A transient problem the decision saw (retried with backoff).
    Retry,
}

/// Field manager of everything the controller applies.
pub const FIELD_MANAGER: &str = "seinode-tls-controller";

/// What one reconcile carries from one decision to the next: the node as last written, the
/// status decided last, the observation (with the task that ran), the sidecar call results, and
/// what the controller would apply.
pub(super) struct Round {
    pub(super) current: Arc<SeiNode>,
    pub(super) base: SeiNodeStatus,
    pub(super) observed: Observed,
    pub(super) called: Called,
    pub(super) desired: Desired,
}

/// How acting on a decision ended.
pub(super) enum Acted {
    /// A task ran: decide again on its outcome.
    Ran,
    /// This reconcile is over.
    Ended(Step),
}

/// Acts on `decision`: writes its status (on the version it was decided from), publishes its
/// events, and runs its task, at most one per reconcile. An urgent node that got its verdict
/// stops after the write: its events and its plan's work wait behind the nodes still waiting
/// for theirs. Nothing is written once this replica no longer leads.
pub(super) async fn act(
    ctx: &Arc<Context>,
    decision: Decision,
    round: &mut Round,
    priority: Priority,
) -> Result<Acted, Error> {
    if !ctx.leadership.is_leading() {
        return Ok(Acted::Ended(Step::Done(Next::OnChange)));
    }
    let wrote = decision.status != round.base;
    if wrote {
        match write_status(ctx, &round.current, &decision.status).await? {
            Some(written) => round.current = written,
            None => {
                return Err(Error::Conflict {
                    namespace: round.current.namespace().unwrap_or_default(),
                    name: round.current.name_any(),
                });
            }
        }
    }
    if priority == Priority::Urgent && wrote && Priority::of(&round.current) == Priority::Normal {
        // Decided, and published in the status: its events and the plan's work wait behind
        // the nodes still waiting for their decision (a node's condition is what its user
        // reads). Nothing is held meanwhile: the events wait in `unsent`, which the node's
        // next reconcile sends first (a successor process re-sends recent flips itself).
        ctx.remember(&round.current, |memory| {
            memory.unsent.extend(decision.events.iter().cloned());
            memory.seen = true;
        });
        return Ok(Acted::Ended(Step::Done(Next::After(Duration::ZERO))));
    }
    publish(ctx, &round.current, &decision.events).await;
    if round.observed.first_sight {
        ctx.remember(&round.current, |memory| memory.seen = true);
    }
    round.base = decision.status;
    round.observed.first_sight = false;
    if decision.probe {
        start_call(&round.current, ctx, CallKind::Probe);
    }
    let Some(task) = decision.task else {
        if decision.transient {
            return Ok(Acted::Ended(Step::Retry));
        }
        return Ok(Acted::Ended(Step::Done(Next::After(decision.requeue))));
    };
    if round.observed.ran.is_some() {
        // One task per reconcile: the next one waits its turn behind other nodes.
        return Ok(Acted::Ended(Step::Done(Next::After(Duration::ZERO))));
    }
    if !ctx.leadership.is_leading() {
        return Ok(Acted::Ended(Step::Done(Next::OnChange)));
    }
    let outcome = if task == Task::MarkSidecarReady {
        // Called apart (see `sidecar_calls`): the result of a finished call, else a call started
        // (or running), which wakes the node when it finishes; the requeue is the fallback.
        match round.called.mark_ready.take() {
            Some(outcome) => outcome,
            None => {
                start_call(&round.current, ctx, CallKind::MarkReady);
                return Ok(Acted::Ended(Step::Done(Next::After(SIDECAR_TASK_RETRY))));
            }
        }
    } else {
        run_task(&round.current, ctx, task, &round.observed, &round.desired).await?
    };
    if outcome == Outcome::Done {
        set_state(&mut round.observed.objects, task, ObjectState::Current);
    }
    round.observed.ran = Some((task, outcome));
    Ok(Acted::Ran)
}

fn set_state(objects: &mut Objects, task: Task, state: ObjectState) {
    match task {
        Task::ApplyRbacProxyConfig => objects.config_map = state,
        Task::ApplyService => objects.service = state,
        Task::ApplyStatefulSet => objects.stateful_set = state,
        Task::MarkSidecarReady | Task::AwaitStatefulSetReady => {}
    }
}

/// Runs an apply task: creates a missing object (never adopting one that exists and is not
/// this node's), or applies over an object this node controls.
pub(super) async fn run_task(
    node: &SeiNode,
    ctx: &Context,
    task: Task,
    observed: &Observed,
    desired: &Desired,
) -> Result<Outcome, Error> {
    let namespace = node.namespace().unwrap_or_default();
    let state = observed.objects.of(task);
    let result = match task {
        Task::ApplyRbacProxyConfig => ensure(ctx, node, desired.config_map(ctx), state).await,
        Task::ApplyService => ensure(ctx, node, desired.service(), state).await,
        Task::ApplyStatefulSet => match desired.stateful_set(ctx) {
            Ok(sts) => ensure(ctx, node, sts, state).await,
            Err(error) => {
                return Ok(Outcome::Failed(TaskFailure::new(
                    TaskFailureReason::InvalidSpec,
                    error.clone(),
                )));
            }
        },
        // Called apart (see `sidecar_calls`); observation decides the await.
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

pub(super) fn api_error(
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
pub(super) async fn write_status(
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
        Ok(written) => Ok(Some(ctx.latest.record(written))),
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
pub(super) async fn publish(ctx: &Context, node: &SeiNode, events: &[NodeEvent]) {
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

pub(super) async fn send_unsent(ctx: &Context, node: &SeiNode) {
    let pending = ctx.remember(node, |memory| std::mem::take(&mut memory.unsent));
    if !pending.is_empty() {
        publish(ctx, node, &pending).await;
    }
}
