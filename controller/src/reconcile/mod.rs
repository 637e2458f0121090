//! One reconcile of a SeiNode: observe (the Secret, the owned objects, the sidecar), decide
//! (`decide`, pure), act (write the status with the resourceVersion it was decided from, then
//! publish the events, then run at most one task and record it).

use std::sync::Arc;
use std::time::{Duration, Instant};

use jiff::Timestamp;
use kube::runtime::controller::Action;
use kube::runtime::reflector::ObjectRef;
use kube::{Api, Resource, ResourceExt};
use seinode_tls_crds::SeiNode;
use thiserror::Error;

use crate::decide::decide;
use crate::metrics::{OutcomeLabels, ReconcileOutcome};
use crate::slots::Priority;

mod act;
mod context;
mod observe;
mod sidecar_calls;

pub use act::FIELD_MANAGER;
use act::{Acted, Round, act, api_error, send_unsent};
use context::uid;
pub use context::{Context, Latest, OwnedStores};
use observe::{Desired, observe, probe_due};
use sidecar_calls::{Called, sidecar_calls};

/// Backoff bounds for transient errors (before jitter).
const BACKOFF_MIN: Duration = Duration::from_millis(500);
const BACKOFF_MAX: Duration = Duration::from_secs(300);

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
    /// The status write found the node changed since it was read: `reconcile_newest` reads it
    /// again and decides again, and reports this error only after [`CONFLICT_ATTEMPTS`].
    #[error(
        "the status of SeiNode {namespace}/{name} changed while it was being decided ({CONFLICT_ATTEMPTS} times in a row)"
    )]
    Conflict { namespace: String, name: String },
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
        Ok(Step::Retry) => Ok(Action::requeue(backoff(&ctx, &node))),
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

/// How a reconcile ended.
pub(super) enum Step {
    Done(Action),
    /// A transient problem the decision saw (retried with backoff).
    Retry,
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
    for _ in 1..CONFLICT_ATTEMPTS {
        match reconcile_node(&node, ctx, priority, called.clone()).await {
            Err(Error::Conflict { .. }) => {
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
            ended => return ended,
        }
    }
    reconcile_node(&node, ctx, priority, called).await
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

/// One observe → decide → act round (two decides when a task ran). [`Error::Conflict`]: the
/// status changed under the decision; read it again.
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
    let base = node.status.clone().unwrap_or_default();
    let desired = Desired::of(node, ctx);
    let mut observed = observe(node, &base, ctx, &desired, now).await;
    if probe_due(&base, &observed) {
        observed.probe = called.probe.take();
    }
    let settings = ctx.settings();
    let mut round = Round {
        current: node.clone(),
        base,
        observed,
        called,
        desired,
    };
    loop {
        let decision = decide(&round.current, &round.base, &round.observed, &settings, now);
        match act(ctx, decision, &mut round, priority).await? {
            // A task ran: its outcome is decided (and written) in the same reconcile.
            Acted::Ran => {}
            Acted::Ended(step) => return Ok(step),
        }
    }
}

#[cfg(test)]
mod tests {
    use std::collections::HashSet;

    use seinode_tls_crds::{SIDECAR_TLS_SECRET_READY, SeiNodeStatus};

    use super::*;

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
