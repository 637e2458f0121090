//! Observe: everything `decide` needs, gathered once per reconcile. The Secret's verdict, the
//! owned objects from the watches against what the controller would apply now (built once, from
//! the spec), whether the sidecar can be called (its pod, from the Pod watch), and the per-node
//! TLS figures the metrics export.

use std::net::IpAddr;
use std::sync::{Arc, OnceLock};

use jiff::Timestamp;
use k8s_openapi::api::apps::v1::StatefulSet;
use k8s_openapi::api::core::v1::{ConfigMap, Pod, Service};
use kube::runtime::reflector::ObjectRef;
use kube::{Resource, ResourceExt};
use seinode_tls_crds::contract::required_dns_names;
use seinode_tls_crds::validation::{InspectedSecret, SecretVerdict};
use seinode_tls_crds::{PlanPhase, SeiNode, SeiNodePhase, SeiNodeStatus};
use serde::de::DeserializeOwned;

use super::context::{Context, pod_host};
use crate::compact::Compact;
use crate::decide::{Objects, Observed};
use crate::drift::{stamp, state};
use crate::metrics::NodeTls;
use crate::plan::{Task, next_task};
use crate::resources;

/// Reads what the decision needs: the Secret's verdict (one GET, parsed once per version), the
/// owned objects (from the watches) and, for a settled Running node, the sidecar probe.
/// `mark_ready_done`: a finished `mark-ready` call's result is at hand, which the decision
/// records whatever the pod does now (the next call, if one is needed, waits for the pod
/// again), so the pod is not looked up.
pub(super) async fn observe(
    node: &SeiNode,
    base: &SeiNodeStatus,
    ctx: &Context,
    desired: &Desired,
    mark_ready_done: bool,
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
    let next = base.plan.as_ref().and_then(next_task);
    if !mark_ready_done && next.is_some_and(|(_, task)| task == Some(Task::MarkSidecarReady)) {
        observed.sidecar_unreachable = sidecar_unreachable(node, ctx);
    }
    observed
}

/// Pod 0 of the StatefulSet a node controls, as the watches show it: where its sidecar is
/// called (at the IP the Pod reports, never a DNS answer).
pub(super) struct SidecarPod {
    /// The pod's DNS name: the server name of TLS and of the URL.
    pub(super) host: String,
    pub(super) ip: Option<IpAddr>,
    pub(super) uid: String,
}

/// The node's sidecar pod, or why there is none to call: the node controls no StatefulSet of
/// its name yet, the StatefulSet has no pod 0, the pod is being deleted or, with `current`
/// (a task must reach the new pod of a roll, not the old one it replaces), is not of the
/// StatefulSet's update revision.
pub(super) fn sidecar_pod(
    node: &SeiNode,
    ctx: &Context,
    current: bool,
) -> Result<SidecarPod, String> {
    let namespace = node.namespace().unwrap_or_default();
    let name = node.name_any();
    let pod_name = seinode_tls_crds::contract::pod_name(&name);
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
    Ok(SidecarPod {
        host: pod_host(node, &ctx.config.cluster_domain),
        ip: pod
            .status
            .as_ref()
            .and_then(|s| s.pod_ip.as_deref())
            .and_then(|ip| ip.parse().ok()),
        uid: pod.metadata.uid.unwrap_or_default(),
    })
}

/// Why `mark-ready` could not be called on the node's sidecar now (see [`sidecar_pod`]; and a
/// pod with no address yet); `None` when it could.
fn sidecar_unreachable(node: &SeiNode, ctx: &Context) -> Option<String> {
    sidecar_pod(node, ctx, true)
        .and_then(|pod| ctx.config.sidecar_addresses.dialable(&pod.host, pod.ip))
        .err()
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

/// Whether a node's sidecar is probed: Running, its plan settled, its Secret ready.
pub(super) fn probe_due(base: &SeiNodeStatus, observed: &Observed) -> bool {
    let settled = base
        .plan
        .as_ref()
        .is_none_or(|p| p.phase != PlanPhase::Active);
    let gate_open = observed.verdict.as_ref().is_none_or(|v| v.is_ready());
    base.phase == Some(SeiNodePhase::Running) && settled && gate_open && observed.leading
}

/// The verdict on a TLS node's Secret at `now` (parsed once per version, so a second caller
/// reads nothing), and its inspection; `None` for a node without TLS.
pub(super) async fn judge_secret(
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

/// The cached object. One whose JSON does not parse as `K` (the watch keeps the API server's
/// JSON unchecked; never seen) counts as missing, with a warning: the create that follows gets
/// a conflict and reads the object itself.
pub(super) fn parsed<K: DeserializeOwned + Resource<DynamicType = ()>>(
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

/// What the controller would apply for a node now, built from its spec (and stamped) at most
/// once per reconcile, and only when needed: the observation compares an owned object that
/// exists against it, and a task applies it. A node none of whose objects exist yet (every
/// node on a cold start) builds none of them to be decided.
pub(super) struct Desired {
    node: Arc<SeiNode>,
    config_map: OnceLock<ConfigMap>,
    service: OnceLock<Service>,
    /// `Err`: why the spec cannot make the StatefulSet (an invalid image).
    stateful_set: OnceLock<Result<StatefulSet, String>>,
}

impl Desired {
    pub(super) fn of(node: &Arc<SeiNode>) -> Self {
        Self {
            node: node.clone(),
            config_map: OnceLock::new(),
            service: OnceLock::new(),
            stateful_set: OnceLock::new(),
        }
    }

    pub(super) fn config_map(&self, ctx: &Context) -> &ConfigMap {
        self.config_map.get_or_init(|| {
            stamp(resources::rbac_proxy_config_map(
                &self.node,
                ctx.client_ca.as_deref(),
            ))
        })
    }

    pub(super) fn service(&self) -> &Service {
        self.service
            .get_or_init(|| stamp(resources::service(&self.node)))
    }

    pub(super) fn stateful_set(&self, ctx: &Context) -> &Result<StatefulSet, String> {
        self.stateful_set.get_or_init(|| {
            resources::stateful_set(&self.node, &ctx.config, ctx.client_ca.is_some()).map(stamp)
        })
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
    // What would be applied is built only to compare with an object that exists.
    Objects {
        config_map: state(
            node,
            config_map.as_ref(),
            config_map.as_ref().map(|_| desired.config_map(ctx)),
        ),
        service: state(
            node,
            service.as_ref(),
            service.as_ref().map(|_| desired.service()),
        ),
        stateful_set: state(
            node,
            stateful_set.as_ref(),
            stateful_set
                .as_ref()
                .and_then(|_| desired.stateful_set(ctx).as_ref().ok()),
        ),
        rolled_out: stateful_set.as_ref().is_some_and(|sts| {
            resources::stateful_set_ready(sts)
                && resources::stateful_set_image(sts).as_deref() == Some(node.spec.image.as_str())
        }),
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use k8s_openapi::api::core::v1::Service;
    use serde_json::json;

    use super::*;

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
}
