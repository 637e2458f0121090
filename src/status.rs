//! What `status` says about one SeiNode: its contract, each condition with what to do about its
//! reason, and when its certificate expires. Built from the node alone (pure, with `now`), so
//! the report and the advice are unit-tested; `online::status` reads the node and prints it.

use jiff::Timestamp;
use seinode_tls_controller::decide::{SIDECAR_GATED, SIDECAR_MARKED_READY, SIDECAR_STARTING};
use seinode_tls_controller::status::{
    NODE_READY, NOT_RUNNING, PLAN_IN_PROGRESS, READY, SIDECAR_NOT_READY, SIDECAR_READY,
    TLS_SECRET_NOT_READY,
};
use seinode_tls_crds::contract::required_dns_names;
use seinode_tls_crds::validation::Reason;
use seinode_tls_crds::{
    PlanPhase, SIDECAR_TLS_SECRET_READY, SeiNode, TaskFailureReason, TaskStatus,
};
use serde::Serialize;

/// The node as `status` prints it (`-o json|yaml` prints this structure).
#[derive(Debug, Clone, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct NodeReport {
    pub namespace: String,
    pub name: String,
    /// `status.phase`; absent before the controller's first reconcile.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub phase: Option<String>,
    /// `Ready` is True for the node's current generation.
    pub ready: bool,
    /// The TLS contract; absent for a node without TLS.
    #[serde(rename = "sidecarTLS", skip_serializing_if = "Option::is_none")]
    pub sidecar_tls: Option<ContractReport>,
    pub conditions: Vec<ConditionReport>,
    /// The plan that is not complete, if any: what a Pending or updating node waits for.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub plan: Option<PlanReport>,
    /// Things a person should know that no condition says (no status yet, a stale status).
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub notes: Vec<String>,
}

/// The contract of a TLS node and its certificate's expiry.
#[derive(Debug, Clone, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct ContractReport {
    pub secret_name: String,
    #[serde(rename = "requiredDNSNames")]
    pub required_dns_names: Vec<String>,
    /// False when the controller has not published the contract yet and `status` computed it
    /// (with `--cluster-domain`).
    pub published: bool,
    /// `status.sidecarTLS.notAfter`: the leaf's last valid second, when the Secret was readable.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub not_after: Option<Timestamp>,
    /// Seconds from now to `notAfter` (negative once expired).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub expires_in_seconds: Option<i64>,
}

/// `status.plan` while it is not complete: its phase and the task it is at.
#[derive(Debug, Clone, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct PlanReport {
    pub id: String,
    pub phase: String,
    /// The first task not complete, with its status (and, failed, its reason) and error.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub task: Option<String>,
    /// Why that task failed, for machines (`status.plan.tasks[].reason`).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub reason: Option<TaskFailureReason>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
}

/// One condition, and what to do about its reason.
#[derive(Debug, Clone, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct ConditionReport {
    #[serde(rename = "type")]
    pub type_: String,
    pub status: String,
    pub reason: String,
    pub message: String,
    pub action: String,
    pub last_transition_time: Timestamp,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub observed_generation: Option<i64>,
}

/// The order conditions are printed in: the summary first, then what it sums up.
const CONDITION_ORDER: [&str; 3] = [READY, SIDECAR_TLS_SECRET_READY, SIDECAR_READY];

impl NodeReport {
    pub fn new(node: &SeiNode, cluster_domain: &str, now: Timestamp) -> Self {
        let namespace = node.metadata.namespace.clone().unwrap_or_default();
        let name = node.metadata.name.clone().unwrap_or_default();
        let status = node.status.as_ref();
        let generation = node.metadata.generation;
        let mut notes = Vec::new();

        let secret_name = node
            .spec
            .sidecar
            .as_ref()
            .and_then(|s| s.tls.as_ref())
            .map(|tls| tls.secret_name.clone());
        let sidecar_tls =
            secret_name.map(
                |secret_name| match status.and_then(|s| s.sidecar_tls.as_ref()) {
                    Some(published) => {
                        let not_after = published.not_after.as_ref().map(|t| t.0);
                        ContractReport {
                            secret_name: published.secret_name.clone(),
                            required_dns_names: published.required_dns_names.clone(),
                            published: true,
                            not_after,
                            expires_in_seconds: not_after.map(|t| t.duration_since(now).as_secs()),
                        }
                    }
                    None => ContractReport {
                        secret_name,
                        required_dns_names: required_dns_names(&name, &namespace, cluster_domain),
                        published: false,
                        not_after: None,
                        expires_in_seconds: None,
                    },
                },
            );

        let mut conditions: Vec<ConditionReport> = status
            .and_then(|s| s.conditions.as_ref())
            .into_iter()
            .flatten()
            .map(|c| ConditionReport {
                type_: c.type_.clone(),
                status: c.status.clone(),
                reason: c.reason.clone(),
                message: c.message.clone(),
                action: advice(&c.type_, &c.reason).to_owned(),
                last_transition_time: c.last_transition_time.0,
                observed_generation: c.observed_generation,
            })
            .collect();
        conditions.sort_by_key(|c| {
            CONDITION_ORDER
                .iter()
                .position(|t| *t == c.type_)
                .unwrap_or(CONDITION_ORDER.len())
        });

        let ready_condition = conditions.iter().find(|c| c.type_ == READY);
        let current = |c: &ConditionReport| {
            c.observed_generation.is_none()
                || generation.is_none()
                || c.observed_generation == generation
        };
        let ready = ready_condition.is_some_and(|c| c.status == "True" && current(c));
        match ready_condition {
            None if conditions.is_empty() => notes.push(
                "no conditions yet: the controller has not reconciled this node; if that lasts, \
                 run `seinode-tls check` (is the controller installed and leading?)"
                    .to_owned(),
            ),
            None => notes.push(
                "no Ready condition: the controller that wrote this status predates it; upgrade \
                 seinode-tls"
                    .to_owned(),
            ),
            Some(c) if !current(c) => notes.push(format!(
                "the conditions describe generation {} but the node is at generation {}: the \
                 controller has not caught up with the last change yet",
                c.observed_generation.unwrap_or_default(),
                generation.unwrap_or_default()
            )),
            Some(_) => {}
        }
        if sidecar_tls.as_ref().is_some_and(|c| !c.published) {
            notes.push(
                "status.sidecarTLS is not published yet: the names above are computed with \
                 --cluster-domain"
                    .to_owned(),
            );
        }

        let plan = status
            .and_then(|s| s.plan.as_ref())
            .filter(|p| p.phase != PlanPhase::Complete)
            .map(|p| {
                let task = p.tasks.iter().find(|t| t.status != TaskStatus::Complete);
                PlanReport {
                    id: p.id.clone(),
                    phase: format!("{:?}", p.phase),
                    task: task.map(|t| match t.reason {
                        Some(reason) => format!("{} ({:?}: {reason:?})", t.r#type, t.status),
                        None => format!("{} ({:?})", t.r#type, t.status),
                    }),
                    reason: task.and_then(|t| t.reason),
                    error: task.and_then(|t| t.error.clone()),
                }
            });

        NodeReport {
            namespace,
            name,
            plan,
            phase: status
                .and_then(|s| s.phase)
                .map(|phase| format!("{phase:?}")),
            ready,
            sidecar_tls,
            conditions,
            notes,
        }
    }

    /// The report for a person.
    pub fn text(&self) -> String {
        let mut out = format!(
            "SeiNode {}/{}: {}, {}\n",
            self.namespace,
            self.name,
            self.phase.as_deref().unwrap_or("no phase yet"),
            if self.ready { "Ready" } else { "not Ready" }
        );
        match &self.sidecar_tls {
            None => out.push_str("TLS: off (spec.sidecar.tls is not set)\n"),
            Some(contract) => {
                out.push_str("TLS contract:\n");
                out.push_str(&format!("  secretName:       {}\n", contract.secret_name));
                for (i, name) in contract.required_dns_names.iter().enumerate() {
                    let label = if i == 0 { "requiredDNSNames:" } else { "" };
                    out.push_str(&format!("  {label:<17} {name}\n"));
                }
                let expiry = match (contract.not_after, contract.expires_in_seconds) {
                    (Some(at), Some(secs)) if secs >= 0 => {
                        format!("{at} (in {})", human(secs))
                    }
                    (Some(at), Some(secs)) => format!("{at} (EXPIRED {} ago)", human(-secs)),
                    _ => "unknown (the Secret could not be read or parsed)".to_owned(),
                };
                out.push_str(&format!("  notAfter:         {expiry}\n"));
            }
        }
        if !self.conditions.is_empty() {
            out.push_str("Conditions:\n");
        }
        for c in &self.conditions {
            out.push_str(&format!("  {:<22} {:<7} {}\n", c.type_, c.status, c.reason));
            if !c.message.is_empty() {
                out.push_str(&format!("      {}\n", c.message));
            }
            out.push_str(&format!("      do: {}\n", c.action));
        }
        if let Some(plan) = &self.plan {
            out.push_str(&format!("Plan {}: {}", plan.id, plan.phase));
            if let Some(task) = &plan.task {
                out.push_str(&format!(", at {task}"));
            }
            out.push('\n');
            if let Some(error) = &plan.error {
                out.push_str(&format!("      error: {error}\n"));
            }
        }
        for note in &self.notes {
            out.push_str(&format!("Note: {note}\n"));
        }
        out
    }
}

/// Days and hours (or minutes, or seconds) of a span, for expiry.
fn human(secs: i64) -> String {
    let (days, hours, minutes) = (secs / 86_400, secs % 86_400 / 3600, secs % 3600 / 60);
    if days > 0 {
        format!("{days}d {hours}h")
    } else if hours > 0 {
        format!("{hours}h {minutes}m")
    } else if minutes > 0 {
        format!("{minutes}m")
    } else {
        format!("{secs}s")
    }
}

/// What to do about a condition's reason (docs/operations.md, "What each condition reason
/// means", in one line each).
pub fn advice(condition_type: &str, reason: &str) -> &'static str {
    if condition_type == SIDECAR_TLS_SECRET_READY {
        let Some(reason) = Reason::ALL.into_iter().find(|r| r.as_str() == reason) else {
            return UNKNOWN;
        };
        return match reason {
            Reason::Ready => "nothing",
            Reason::NotFound => {
                "create the kubernetes.io/tls Secret with the requiredDNSNames above (`seinode-tls \
                 contract -o certificate` prints a cert-manager Certificate for it); the node \
                 waits in Pending until it exists"
            }
            Reason::Unavailable => {
                "transient, retried with backoff; if it lasts, read the controller's log and check \
                 its RBAC on Secrets (`seinode-tls check`)"
            }
            Reason::Malformed => {
                "the message says what is wrong; re-issue the Secret (type kubernetes.io/tls, PEM \
                 tls.crt and an unencrypted tls.key, serverAuth usage)"
            }
            Reason::KeyMismatch => {
                "store the key that belongs to the certificate (often a half-finished rotation)"
            }
            Reason::NotYetValid => "check the issuer's clock, or wait until notBefore",
            Reason::Expired => {
                "renew the certificate (cert-manager: `kubectl describe certificate` and its issuer)"
            }
            Reason::SansMismatch => {
                "re-issue the certificate with exactly the requiredDNSNames above (a wildcard \
                 covers one label only; the common name and IP SANs do not count); `seinode-tls \
                 check-secret NAME -n NS --seinode NODE` tells when it is right"
            }
        };
    }
    match (condition_type, reason) {
        (READY, NODE_READY) => "nothing",
        (READY, TLS_SECRET_NOT_READY) => "fix the Secret: see SidecarTLSSecretReady",
        (READY, NOT_RUNNING) => {
            "look at status.plan (a failed task waits for a spec change) and the node's events \
             (`kubectl describe snode`)"
        }
        (READY, PLAN_IN_PROGRESS) => "wait for the plan in status.plan to finish",
        (READY, SIDECAR_NOT_READY) => "see SidecarReady",
        (SIDECAR_READY, "SidecarHealthy" | SIDECAR_MARKED_READY) => "nothing",
        (SIDECAR_READY, SIDECAR_STARTING) => {
            "usually nothing (the pod is starting); if it lasts, do what the message says (a \
             401/403: the proxy's client CA or the controller's seinodetasks RBAC)"
        }
        (SIDECAR_READY, SIDECAR_GATED) => "fix the Secret first: see SidecarTLSSecretReady",
        (SIDECAR_READY, "SidecarNotMarkedReady") => {
            "nothing: the sidecar restarted and a repair plan marks it ready again"
        }
        (SIDECAR_READY, "SidecarUnreachable") => {
            "check that the node's pod runs and that no network policy keeps the controller from \
             the pod's port 8443 (or the sidecar port without TLS)"
        }
        (SIDECAR_READY, "SidecarTLSHandshakeFailed") => {
            "the proxy's certificate does not verify: check what the pod mounts and the Secret's \
             ca.crt"
        }
        (SIDECAR_READY, "SidecarCertificateMismatch") => {
            "expected for about a minute after a rotation; if it lasts, restart the node's pod"
        }
        (SIDECAR_READY, "SidecarUnhealthy") => "read the sidecar's and kube-rbac-proxy's logs",
        (SIDECAR_READY, "SidecarNotProbed") => "fix the Secret first: see SidecarTLSSecretReady",
        _ => UNKNOWN,
    }
}

const UNKNOWN: &str = "see docs/operations.md, \"What each condition reason means\"";

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use seinode_tls_controller::sidecar::ProbeResult;

    use super::*;

    fn at(secs: i64) -> Timestamp {
        Timestamp::from_second(secs).unwrap()
    }

    fn node(status: serde_json::Value, generation: i64) -> SeiNode {
        serde_json::from_value(serde_json::json!({
            "apiVersion": "sei.io/v1alpha1", "kind": "SeiNode",
            "metadata": {"name": "rpc", "namespace": "sei", "generation": generation},
            "spec": {"chainId": "arctic-1", "image": "sei:v1", "fullNode": {},
                     "sidecar": {"tls": {"secretName": "rpc-tls"}}},
            "status": status,
        }))
        .unwrap()
    }

    fn condition(type_: &str, status: &str, reason: &str, generation: i64) -> serde_json::Value {
        serde_json::json!({"type": type_, "status": status, "reason": reason,
            "message": format!("{reason} message"), "observedGeneration": generation,
            "lastTransitionTime": "2026-12-01T00:00:00Z"})
    }

    #[test]
    fn every_reason_the_controller_writes_has_advice() {
        for reason in Reason::ALL {
            assert_ne!(
                advice(SIDECAR_TLS_SECRET_READY, reason.as_str()),
                UNKNOWN,
                "{reason}"
            );
        }
        let probes = [
            ProbeResult::Healthy(String::new()),
            ProbeResult::Unreachable(String::new()),
            ProbeResult::HandshakeFailed(String::new()),
            ProbeResult::CertificateMismatch(String::new()),
            ProbeResult::NotMarkedReady(String::new()),
            ProbeResult::Unhealthy(String::new()),
            ProbeResult::NotProbed(String::new()),
        ];
        // A new probe outcome fails to compile here until it is listed above.
        let _every_variant_is_listed = |probe: &ProbeResult| match probe {
            ProbeResult::Healthy(_)
            | ProbeResult::Unreachable(_)
            | ProbeResult::HandshakeFailed(_)
            | ProbeResult::CertificateMismatch(_)
            | ProbeResult::NotMarkedReady(_)
            | ProbeResult::Unhealthy(_)
            | ProbeResult::NotProbed(_) => (),
        };
        for reason in probes.iter().map(ProbeResult::reason).chain([
            SIDECAR_GATED,
            SIDECAR_STARTING,
            SIDECAR_MARKED_READY,
        ]) {
            assert_ne!(advice(SIDECAR_READY, reason), UNKNOWN, "{reason}");
        }
        for reason in seinode_tls_controller::status::READY_REASONS {
            assert_ne!(advice(READY, reason), UNKNOWN, "{reason}");
        }
        assert_eq!(advice(READY, "SomethingNew"), UNKNOWN);
    }

    #[test]
    fn a_ready_node_reports_its_contract_expiry_and_conditions_summary_first() {
        let n = node(
            serde_json::json!({
                "phase": "Running",
                "sidecarTLS": {"secretName": "rpc-tls",
                    "requiredDNSNames": ["rpc.sei.svc.cluster.local", "rpc-0.rpc.sei.svc.cluster.local"],
                    "notAfter": "2027-01-01T00:00:00Z"},
                "conditions": [
                    condition("SidecarTLSSecretReady", "True", "TLSSecretReady", 1),
                    condition("Ready", "True", "NodeReady", 1),
                ],
            }),
            1,
        );
        let now: Timestamp = "2026-12-31T00:00:00Z".parse().unwrap();
        let report = NodeReport::new(&n, "cluster.local", now);
        assert!(report.ready);
        let contract = report.sidecar_tls.as_ref().unwrap();
        assert!(contract.published);
        assert_eq!(contract.expires_in_seconds, Some(86_400));
        assert_eq!(report.conditions[0].type_, "Ready");
        let text = report.text();
        assert!(
            text.starts_with("SeiNode sei/rpc: Running, Ready\n"),
            "{text}"
        );
        assert!(text.contains("rpc-0.rpc.sei.svc.cluster.local"), "{text}");
        assert!(text.contains("2027-01-01T00:00:00Z (in 1d 0h)"), "{text}");
        assert!(text.contains("do: nothing"), "{text}");
        assert!(report.notes.is_empty(), "{:?}", report.notes);
    }

    #[test]
    fn a_node_with_a_bad_secret_is_not_ready_and_says_what_to_do() {
        let n = node(
            serde_json::json!({
                "phase": "Pending",
                "sidecarTLS": {"secretName": "rpc-tls",
                    "requiredDNSNames": ["rpc.sei.svc.cluster.local"],
                    "notAfter": "2026-01-01T00:00:00Z"},
                "conditions": [
                    condition("Ready", "False", "TLSSecretNotReady", 1),
                    condition("SidecarTLSSecretReady", "False", "TLSSecretExpired", 1),
                ],
            }),
            1,
        );
        let report = NodeReport::new(&n, "cluster.local", at(1_767_225_600 + 3 * 86_400));
        assert!(!report.ready);
        let text = report.text();
        assert!(text.contains("EXPIRED 3d 0h ago"), "{text}");
        assert!(text.contains("TLSSecretExpired"), "{text}");
        assert!(text.contains("do: renew the certificate"), "{text}");
    }

    #[test]
    fn a_plan_that_is_not_complete_names_its_task_and_error() {
        let n = node(
            serde_json::json!({
                "phase": "Initializing",
                "plan": {"id": "init-1", "phase": "Failed", "tasks": [
                    {"type": "ApplyService", "status": "Complete"},
                    {"type": "ApplyStatefulSet", "status": "Failed",
                     "error": "StatefulSet sei/rpc is in the way"},
                ]},
                "conditions": [condition("Ready", "False", "NotRunning", 1)],
            }),
            1,
        );
        let text = NodeReport::new(&n, "cluster.local", at(0)).text();
        assert!(
            text.contains("Plan init-1: Failed, at ApplyStatefulSet (Failed)\n      error: StatefulSet sei/rpc is in the way\n"),
            "{text}"
        );
        // A failure with its reason (a status of this release) says it too.
        let typed = node(
            serde_json::json!({
                "phase": "Initializing",
                "plan": {"id": "init-1", "phase": "Failed", "tasks": [
                    {"type": "ApplyService", "status": "Failed", "reason": "ObjectInTheWay",
                     "error": "Service sei/rpc is in the way"},
                ]},
            }),
            1,
        );
        let report = NodeReport::new(&typed, "cluster.local", at(0));
        assert!(
            report
                .text()
                .contains("Plan init-1: Failed, at ApplyService (Failed: ObjectInTheWay)\n"),
            "{}",
            report.text()
        );
        let json = serde_json::to_value(&report).unwrap();
        assert_eq!(json["plan"]["reason"], "ObjectInTheWay", "{json}");
        let done = node(
            serde_json::json!({"phase": "Running",
                "plan": {"id": "init-1", "phase": "Complete", "tasks": []}}),
            1,
        );
        assert!(
            NodeReport::new(&done, "cluster.local", at(0))
                .plan
                .is_none()
        );
    }

    #[test]
    fn a_stale_or_missing_status_is_not_ready_and_says_why() {
        let stale = node(
            serde_json::json!({"phase": "Running",
                "conditions": [condition("Ready", "True", "NodeReady", 1)]}),
            2,
        );
        let report = NodeReport::new(&stale, "cluster.local", at(0));
        assert!(
            !report.ready,
            "Ready of generation 1 says nothing of generation 2"
        );
        assert!(
            report.notes[0].contains("generation 1"),
            "{:?}",
            report.notes
        );

        let fresh = node(serde_json::Value::Null, 1);
        let report = NodeReport::new(&fresh, "fleet.internal", at(0));
        assert!(!report.ready);
        let contract = report.sidecar_tls.as_ref().unwrap();
        assert!(!contract.published);
        assert_eq!(
            contract.required_dns_names[0], "rpc.sei.svc.fleet.internal",
            "computed with the cluster domain"
        );
        let text = report.text();
        assert!(text.contains("no conditions yet"), "{text}");
        assert!(text.contains("not published yet"), "{text}");
    }
}
