//! One reconcile of a SeiNode: observe (the Secret, the owned objects, the sidecar), decide
//! (`decide`, pure), act (write the status with the resourceVersion it was decided from, then
//! publish the events, then run at most one task and record it).

use std::sync::Arc;
use std::time::{Duration, Instant};

use jiff::Timestamp;
use kube::runtime::reflector::ObjectRef;
use kube::{Api, Resource, ResourceExt};
use seinode_tls_crds::SeiNode;

use crate::decide::decide;
use crate::dispatch::{Next, Priority, Queue};
use crate::metrics::{OutcomeLabels, ReconcileOutcome};

mod act;
mod context;
mod observe;
mod sidecar_calls;

pub use act::Error;
pub use act::FIELD_MANAGER;
use act::{Acted, CONFLICT_ATTEMPTS, Round, Step, act, api_error, send_unsent};
pub use context::{Context, Latest, OwnedStores};
use observe::{Desired, observe, probe_due};
use sidecar_calls::{Called, take_called};

/// Backoff bounds for transient errors (before jitter).
const BACKOFF_MIN: Duration = Duration::from_millis(500);
const BACKOFF_MAX: Duration = Duration::from_secs(300);

/// How long a reconcile waits for the first list of the owned objects.
const SYNC_WAIT: Duration = Duration::from_secs(10);

/// One worker of the dispatch: reconciles the nodes `queue` hands out until it closes.
pub async fn work(queue: &Queue, ctx: &Arc<Context>) {
    while let Some((key, priority)) = queue.next().await {
        let (next, priority) = match node_of(ctx, &key).await {
            Ok(Some(node)) => {
                let next = reconcile(node.clone(), ctx, priority).await;
                (next, priority_of(ctx, ctx.store.get(&key).unwrap_or(node)))
            }
            // Deleted since it was queued.
            Ok(None) => (Next::OnChange, priority),
            Err(error) => {
                tracing::warn!(error = %seinode_tls_crds::error_chain(&error), "failed to read a SeiNode the store does not hold; retrying");
                (Next::After(jittered(1)), priority)
            }
        };
        queue.done(&key, next, priority);
    }
}

/// The node `key` names: from the store, else (a node created while its watch relists, which
/// the store shows only once the list is done; or one deleted since) read from the API server.
async fn node_of(ctx: &Context, key: &ObjectRef<SeiNode>) -> Result<Option<Arc<SeiNode>>, Error> {
    if let Some(node) = ctx.store.get(key) {
        return Ok(Some(node));
    }
    let namespace = key.namespace.as_deref().unwrap_or_default();
    Ok(read_node(ctx, namespace, &key.name).await?.map(Arc::new))
}

/// Reads SeiNode `namespace/name` from the API server (`None`: it is gone).
async fn read_node(ctx: &Context, namespace: &str, name: &str) -> Result<Option<SeiNode>, Error> {
    let api: Api<SeiNode> = Api::namespaced(ctx.client.clone(), namespace);
    api.get_opt(name)
        .await
        .map_err(|source| api_error("read", "SeiNode", namespace, name, source))
}

/// The priority `node` is queued with: that of the newest version this controller knows.
pub fn priority_of(ctx: &Context, node: Arc<SeiNode>) -> Priority {
    Priority::of(&ctx.newest(node))
}

/// One reconcile, with metrics and the backoff bookkeeping; says when to reconcile again.
async fn reconcile(node: Arc<SeiNode>, ctx: &Arc<Context>, priority: Priority) -> Next {
    let node = ctx.newest(node);
    // The sidecar is called apart: what the node's finished calls found.
    let called = take_called(&node, ctx);
    let started = Instant::now();
    // `seinode`, not `name`: a JSON log line's span object has its own `name` (the span's).
    let span = tracing::info_span!("reconcile", namespace = %node.namespace().unwrap_or_default(), seinode = %node.name_any());
    let result = tracing::Instrument::instrument(
        reconcile_newest(node.clone(), ctx, priority, called),
        span,
    )
    .await;
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
        Ok(Step::Done(next)) => {
            ctx.remember(&node, |memory| memory.failures = 0);
            next
        }
        // The Secret could not be read: like an error, with backoff, without logging one.
        // (`reconcile_newest` answers a conflict itself, by deciding again.)
        Ok(Step::Retry) => Next::After(backoff(ctx, &node)),
        Err(error) => {
            // Exponential backoff per node with jitter, 0.5 s to 5 min.
            let delay = backoff(ctx, &node);
            tracing::warn!(
                error = %seinode_tls_crds::error_chain(&error),
                namespace = %node.namespace().unwrap_or_default(),
                seinode = %node.name_any(),
                retry_in = ?delay,
                "reconcile failed"
            );
            Next::After(delay)
        }
    }
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

/// Reconciles from the newest known version; a status write that finds the node changed
/// re-reads it and decides again (never forcing a status decided from an older one).
async fn reconcile_newest(
    cached: Arc<SeiNode>,
    ctx: &Arc<Context>,
    priority: Priority,
    called: Called,
) -> Result<Step, Error> {
    let mut node = ctx.newest(cached);
    for _ in 1..CONFLICT_ATTEMPTS {
        match reconcile_node(&node, ctx, priority, called.clone()).await {
            Err(Error::Conflict { .. }) => {
                let namespace = node.namespace().unwrap_or_default();
                let fresh = read_node(ctx, &namespace, &node.name_any()).await?;
                let Some(fresh) = fresh else {
                    return Ok(Step::Done(Next::OnChange));
                };
                node = ctx.latest.record(fresh);
            }
            ended => return ended,
        }
    }
    reconcile_node(&node, ctx, priority, called).await
}

/// One observe → decide → act round (two decides when a task ran). [`Error::Conflict`]: the
/// status changed under the decision; read it again.
async fn reconcile_node(
    node: &Arc<SeiNode>,
    ctx: &Arc<Context>,
    priority: Priority,
    mut called: Called,
) -> Result<Step, Error> {
    if node.meta().deletion_timestamp.is_some() {
        return Ok(Step::Done(Next::OnChange));
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
    let desired = Desired::of(node);
    let mut observed = observe(node, &base, ctx, &desired, called.mark_ready.is_some(), now).await;
    if probe_due(&base, &observed) {
        observed.probe = called.probe.take();
    }
    let settings = ctx.config.settings();
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

    use super::*;

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
