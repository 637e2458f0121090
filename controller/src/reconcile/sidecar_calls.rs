//! Calls to a node's sidecar through its front door (the probe and `mark-ready`), made apart
//! from the reconciles: a finished call wakes its node, whose next reconcile reads the
//! result.

use std::sync::Arc;
use std::time::Duration;

use jiff::Timestamp;
use kube::runtime::reflector::ObjectRef;
use seinode_tls_crds::validation::{InspectedSecret, LeafCertificate};
use seinode_tls_crds::{SeiNode, TaskFailureReason};

use super::context::{Context, uid};
use super::observe::{SidecarPod, judge_secret, sidecar_pod};
use crate::calls::{CallKind, Finished};
use crate::decide::{Outcome, TaskFailure};
use crate::metrics::ProbeLabels;
use crate::resources;
use crate::sidecar::{ProbeResult, Target, TaskProgress, TlsTarget, task_id};

/// The least time between two `mark-ready` calls of a node.
const MARK_READY_GAP: Duration = Duration::from_secs(1);

/// What the node's finished sidecar calls found, for this reconcile.
#[derive(Clone, Debug, Default)]
pub(super) struct Called {
    pub(super) probe: Option<ProbeResult>,
    pub(super) mark_ready: Option<Outcome>,
}

/// Takes the results of the node's finished sidecar calls, for this reconcile (each is used
/// once).
pub(super) fn take_called(node: &SeiNode, ctx: &Context) -> Called {
    let uid = uid(node);
    let mut called = Called::default();
    if let Some(Finished::Probe(result)) = ctx.calls.take(&uid, CallKind::Probe) {
        called.probe = Some(result);
    }
    if let Some(Finished::MarkReady(outcome)) = ctx.calls.take(&uid, CallKind::MarkReady) {
        called.mark_ready = Some(outcome);
    }
    called
}

/// Starts the `kind` call a decision asked for, apart from the reconcile: at most one call of
/// a node in flight, a probe at most once per probe interval, `mark-ready` at most once per
/// [`MARK_READY_GAP`] (the Pod watch wakes the node sooner when its pod moves). Never waits
/// on a sidecar; the finished call wakes the node, whose next reconcile takes its result.
pub(super) fn start_call(node: &Arc<SeiNode>, ctx: &Arc<Context>, kind: CallKind) {
    if !ctx.leadership.is_leading() {
        return;
    }
    let gap = match kind {
        CallKind::MarkReady => MARK_READY_GAP,
        CallKind::Probe => ctx.config.sidecar_probe_interval,
    };
    let (node, task_ctx) = (node.clone(), ctx.clone());
    ctx.calls.start(
        &uid(&node),
        ObjectRef::from_obj(&*node),
        kind,
        gap,
        async move { call_sidecar(&node, &task_ctx, kind).await },
    );
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
    match sidecar_pod(node, ctx, false).and_then(|pod| sidecar_target(node, ctx, leaf, pod)) {
        Ok(target) => ctx.sidecar.probe(&target).await,
        Err(why) => ProbeResult::Unreachable(why),
    }
}

/// Where the node's sidecar is: its `pod` (see [`sidecar_pod`]), on the proxy's port with TLS,
/// else the sidecar's.
fn sidecar_target(
    node: &SeiNode,
    ctx: &Context,
    leaf: Option<&LeafCertificate>,
    pod: SidecarPod,
) -> Result<Target, String> {
    let port = match leaf {
        Some(_) => resources::TLS_PORT,
        None => resources::sidecar_port(node),
    };
    let port = u16::try_from(port).map_err(|_| format!("port {port} is not a TCP port"))?;
    let addr = ctx
        .config
        .sidecar_addresses
        .resolve(&pod.host, pod.ip, port)?;
    Ok(Target {
        host: pod.host,
        addr,
        tls: leaf.map(|leaf| TlsTarget {
            leaf_der: leaf.der.clone(),
            ca_crt: leaf.ca_crt.clone(),
        }),
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
    let pod = match sidecar_pod(node, ctx, true) {
        Ok(pod) => pod,
        Err(why) => return Outcome::Waiting(why),
    };
    let pod_uid = pod.uid.clone();
    let target = match sidecar_target(node, ctx, leaf, pod) {
        Ok(target) => target,
        Err(why) => return Outcome::Waiting(why),
    };
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
