//! Calls to a node's sidecar through its front door (the probe and `mark-ready`), made apart
//! from the reconciles: a finished call wakes its node, whose next reconcile reads the
//! result.

use std::sync::Arc;
use std::time::Duration;

use jiff::Timestamp;
use k8s_openapi::api::apps::v1::StatefulSet;
use k8s_openapi::api::core::v1::Pod;
use kube::ResourceExt;
use kube::runtime::reflector::ObjectRef;
use seinode_tls_crds::validation::{InspectedSecret, LeafCertificate};
use seinode_tls_crds::{SeiNode, SeiNodePhase, TaskFailureReason};

use super::context::{Context, pod_host, uid};
use super::observe::{judge_secret, parsed};
use crate::calls::{CallKind, Finished};
use crate::decide::{Outcome, TaskFailure};
use crate::metrics::ProbeLabels;
use crate::plan::{Task, next_task};
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

/// Takes the results of the node's finished sidecar calls, and starts the call the node looks
/// due for (a probe for a Running node with a settled plan, at most once per probe interval;
/// `mark-ready` for a plan at `MarkSidecarReady`, at most once per [`MARK_READY_GAP`]).
/// Never waits on a sidecar (the reconcile checks again whether a result applies).
pub(super) fn sidecar_calls(node: &Arc<SeiNode>, ctx: &Arc<Context>) -> Called {
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
    let pod_name = seinode_tls_crds::contract::pod_name(&name);
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
    let pod: Option<Pod> = parsed(ctx.owned.pods.get(
        &ObjectRef::new(&seinode_tls_crds::contract::pod_name(&node.name_any())).within(&namespace),
    ));
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
