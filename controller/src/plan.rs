//! Plans and the TLS gate, as pure functions of the node and its status.
//!
//! A plan is an ordered list of tasks recorded in `status.plan`; the controller executes the
//! first pending task, records it, and moves on, so a restarted controller resumes where the
//! last one stopped. While TLS is enabled and `SidecarTLSSecretReady` is not True, no plan
//! starts or advances.

use k8s_openapi::apimachinery::pkg::apis::meta::v1::Condition;
use seinode_tls_crds::{
    PlanPhase, PlannedTask, SIDECAR_TLS_SECRET_READY, SeiNode, SeiNodePhase, SeiNodeStatus,
    TaskPlan, TaskStatus,
};

/// The tasks the controller knows.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Task {
    /// TLS only: the kube-rbac-proxy authorization ConfigMap `N-rbac-proxy-config`.
    ApplyRbacProxyConfig,
    /// The headless Service `N`.
    ApplyService,
    /// The StatefulSet `N`.
    ApplyStatefulSet,
    /// Submit seictl's `mark-ready` task to the pod of the StatefulSet's current revision,
    /// through its front door, and wait until it completed: the pod turns ready (the
    /// readiness probe is `/v0/healthz`) and seid starts.
    MarkSidecarReady,
    /// Wait until the StatefulSet reports a ready replica of the current revision.
    AwaitStatefulSetReady,
}

impl Task {
    pub fn as_str(self) -> &'static str {
        match self {
            Task::ApplyRbacProxyConfig => "ApplyRBACProxyConfig",
            Task::ApplyService => "ApplyService",
            Task::ApplyStatefulSet => "ApplyStatefulSet",
            Task::MarkSidecarReady => "MarkSidecarReady",
            Task::AwaitStatefulSetReady => "AwaitStatefulSetReady",
        }
    }

    pub fn parse(name: &str) -> Option<Self> {
        [
            Task::ApplyRbacProxyConfig,
            Task::ApplyService,
            Task::ApplyStatefulSet,
            Task::MarkSidecarReady,
            Task::AwaitStatefulSetReady,
        ]
        .into_iter()
        .find(|task| task.as_str() == name)
    }
}

fn plan(id: String, tasks: &[Task]) -> TaskPlan {
    TaskPlan {
        id,
        phase: PlanPhase::Active,
        tasks: tasks
            .iter()
            .map(|task| PlannedTask {
                r#type: task.as_str().to_owned(),
                status: TaskStatus::Pending,
                error: None,
                reason: None,
            })
            .collect(),
        target_phase: Some(SeiNodePhase::Running),
    }
}

/// The plan that brings a new node to Running.
pub fn init_plan(generation: i64, tls: bool) -> TaskPlan {
    let mut tasks = Vec::with_capacity(5);
    if tls {
        tasks.push(Task::ApplyRbacProxyConfig);
    }
    tasks.extend([
        Task::ApplyService,
        Task::ApplyStatefulSet,
        Task::MarkSidecarReady,
        Task::AwaitStatefulSetReady,
    ]);
    plan(format!("init-{generation}"), &tasks)
}

/// The plan that rolls a Running node to a new `spec.image`.
pub fn update_plan(generation: i64) -> TaskPlan {
    plan(
        format!("update-{generation}"),
        &[
            Task::ApplyStatefulSet,
            Task::MarkSidecarReady,
            Task::AwaitStatefulSetReady,
        ],
    )
}

/// The plan that restores the objects of a Running node that went missing or changed (`tasks`
/// are the applies needed, in plan order, or `MarkSidecarReady` for a sidecar that restarted);
/// a restored StatefulSet's new pod is marked ready and awaited.
pub fn repair_plan(generation: i64, tasks: &[Task]) -> TaskPlan {
    let mut tasks = tasks.to_vec();
    if tasks.contains(&Task::ApplyStatefulSet) {
        tasks.retain(|t| *t != Task::MarkSidecarReady);
        tasks.extend([Task::MarkSidecarReady, Task::AwaitStatefulSetReady]);
    }
    plan(format!("repair-{generation}"), &tasks)
}

/// Whether plans may run.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Gate {
    Open,
    /// TLS is enabled and no verdict about the Secret has been published yet.
    AwaitingVerdict,
    /// TLS is enabled and the Secret does not meet the contract (or could not be read): the
    /// condition's reason says why.
    SecretNotReady,
}

/// The gate: blocks while TLS is enabled and `SidecarTLSSecretReady` is False or absent; never
/// consulted when TLS is disabled.
pub fn gate(tls_enabled: bool, conditions: &[Condition]) -> Gate {
    if !tls_enabled {
        return Gate::Open;
    }
    match conditions
        .iter()
        .find(|c| c.type_ == SIDECAR_TLS_SECRET_READY)
    {
        Some(c) if crate::status::is_true(c) => Gate::Open,
        Some(_) => Gate::SecretNotReady,
        None => Gate::AwaitingVerdict,
    }
}

/// The plan the node should have now, given its spec and (already updated) status:
/// the active plan if any (rebuilt when the spec changed under it); a fresh init plan for a node that never reached Running; an update
/// plan when a Running node's image differs from what runs; a failed plan is rebuilt only once
/// the spec changed (`spec_changed`), so a permanent failure waits for a fix.
pub fn desired_plan(
    node: &SeiNode,
    status: &SeiNodeStatus,
    spec_changed: bool,
) -> Option<TaskPlan> {
    let generation = node.metadata.generation.unwrap_or_default();
    let tls = node.sidecar_tls().is_some();
    let running = status.phase == Some(SeiNodePhase::Running);
    let rebuild = || {
        if running || status.current_image.is_some() {
            update_plan(generation)
        } else {
            init_plan(generation, tls)
        }
    };
    match &status.plan {
        // A spec change under an active plan (say, a fixed image while init is stuck) restarts
        // it, so it applies what the spec says now; a restart of the controller does not.
        Some(plan) if plan.phase == PlanPhase::Active => Some(if spec_changed {
            rebuild()
        } else {
            plan.clone()
        }),
        Some(plan) if plan.phase == PlanPhase::Failed => Some(if spec_changed {
            rebuild()
        } else {
            plan.clone()
        }),
        _ => {
            let never_ran = !running && status.current_image.is_none();
            if never_ran && status.plan.is_none() {
                Some(init_plan(generation, tls))
            } else if !never_ran
                && status.current_image.as_deref() != Some(node.spec.image.as_str())
            {
                Some(update_plan(generation))
            } else {
                status.plan.clone()
            }
        }
    }
}

/// The first task of an active plan that is not complete.
pub fn next_task(plan: &TaskPlan) -> Option<(usize, Option<Task>)> {
    if plan.phase != PlanPhase::Active {
        return None;
    }
    plan.tasks
        .iter()
        .position(|t| t.status != TaskStatus::Complete)
        .map(|i| (i, Task::parse(&plan.tasks[i].r#type)))
}

#[cfg(test)]
mod tests {
    use super::*;
    use seinode_tls_crds::{SeiNodeSpec, SidecarSpec, SidecarTls};

    fn node(tls: bool) -> SeiNode {
        let mut node = SeiNode::new(
            "rpc",
            SeiNodeSpec {
                chain_id: "arctic-1".to_owned(),
                image: "sei:v2".to_owned(),
                sidecar: tls.then(|| SidecarSpec {
                    tls: Some(SidecarTls {
                        secret_name: "rpc-tls".to_owned(),
                    }),
                    ..SidecarSpec::default()
                }),
                ..SeiNodeSpec::default()
            },
        );
        node.metadata.generation = Some(3);
        node
    }

    fn condition(status: &str, reason: &str) -> Condition {
        Condition {
            type_: SIDECAR_TLS_SECRET_READY.to_owned(),
            status: status.to_owned(),
            reason: reason.to_owned(),
            message: String::new(),
            observed_generation: None,
            last_transition_time: k8s_openapi::apimachinery::pkg::apis::meta::v1::Time(
                jiff::Timestamp::UNIX_EPOCH,
            ),
        }
    }

    fn types(plan: &TaskPlan) -> Vec<&str> {
        plan.tasks.iter().map(|t| t.r#type.as_str()).collect()
    }

    #[test]
    fn gate_blocks_while_the_condition_is_false_or_unknown() {
        for status in ["False", "Unknown"] {
            let gate = gate(true, &[condition(status, "TLSSecretNotFound")]);
            assert_eq!(gate, Gate::SecretNotReady, "{status}");
        }
    }

    #[test]
    fn gate_blocks_while_the_condition_is_absent() {
        assert_eq!(gate(true, &[]), Gate::AwaitingVerdict);
    }

    #[test]
    fn gate_passes_when_the_condition_is_true() {
        assert_eq!(
            gate(true, &[condition("True", "TLSSecretReady")]),
            Gate::Open
        );
    }

    #[test]
    fn gate_is_not_consulted_when_tls_is_disabled() {
        assert_eq!(gate(false, &[]), Gate::Open);
        assert_eq!(
            gate(false, &[condition("False", "TLSSecretExpired")]),
            Gate::Open
        );
    }

    #[test]
    fn a_new_tls_node_gets_the_init_plan_with_the_proxy_config() {
        let plan = desired_plan(&node(true), &SeiNodeStatus::default(), false).expect("plan");
        assert_eq!(plan.id, "init-3");
        assert_eq!(
            types(&plan),
            [
                "ApplyRBACProxyConfig",
                "ApplyService",
                "ApplyStatefulSet",
                "MarkSidecarReady",
                "AwaitStatefulSetReady"
            ]
        );
        assert_eq!(plan.target_phase, Some(SeiNodePhase::Running));
        assert!(plan.tasks.iter().all(|t| t.status == TaskStatus::Pending));
    }

    #[test]
    fn a_new_node_without_tls_gets_no_proxy_config_task() {
        let plan = desired_plan(&node(false), &SeiNodeStatus::default(), false).expect("plan");
        assert_eq!(
            types(&plan),
            [
                "ApplyService",
                "ApplyStatefulSet",
                "MarkSidecarReady",
                "AwaitStatefulSetReady"
            ]
        );
    }

    #[test]
    fn an_active_plan_is_kept_as_recorded() {
        let mut recorded = init_plan(1, true);
        recorded.tasks[0].status = TaskStatus::Complete;
        let status = SeiNodeStatus {
            plan: Some(recorded.clone()),
            ..SeiNodeStatus::default()
        };
        assert_eq!(
            desired_plan(&node(true), &status, false),
            Some(recorded.clone())
        );
        assert_eq!(next_task(&recorded), Some((1, Some(Task::ApplyService))));
    }

    #[test]
    fn a_spec_change_under_an_active_plan_restarts_it() {
        let mut recorded = init_plan(1, false);
        recorded.tasks[0].status = TaskStatus::Complete;
        recorded.tasks[1].status = TaskStatus::Complete;
        let status = SeiNodeStatus {
            plan: Some(recorded),
            ..SeiNodeStatus::default()
        };
        let restarted = desired_plan(&node(false), &status, true).expect("plan");
        assert_eq!(restarted.id, "init-3");
        assert_eq!(next_task(&restarted), Some((0, Some(Task::ApplyService))));
    }

    #[test]
    fn a_running_node_with_a_new_image_gets_an_update_plan() {
        let mut done = init_plan(1, true);
        done.phase = PlanPhase::Complete;
        let status = SeiNodeStatus {
            phase: Some(SeiNodePhase::Running),
            current_image: Some("sei:v1".to_owned()),
            plan: Some(done.clone()),
            ..SeiNodeStatus::default()
        };
        let plan = desired_plan(&node(true), &status, true).expect("plan");
        assert_eq!(plan.id, "update-3");
        assert_eq!(
            types(&plan),
            [
                "ApplyStatefulSet",
                "MarkSidecarReady",
                "AwaitStatefulSetReady"
            ]
        );

        let current = SeiNodeStatus {
            current_image: Some("sei:v2".to_owned()),
            ..status
        };
        assert_eq!(
            desired_plan(&node(true), &current, false),
            Some(done),
            "nothing to do"
        );
    }

    #[test]
    fn a_failed_plan_waits_for_a_spec_change() {
        let mut failed = init_plan(1, false);
        failed.phase = PlanPhase::Failed;
        failed.tasks[1].status = TaskStatus::Failed;
        let status = SeiNodeStatus {
            plan: Some(failed.clone()),
            ..SeiNodeStatus::default()
        };
        assert_eq!(desired_plan(&node(false), &status, false), Some(failed));
        let rebuilt = desired_plan(&node(false), &status, true).expect("plan");
        assert_eq!(rebuilt.phase, PlanPhase::Active);
        assert_eq!(rebuilt.id, "init-3");
        assert_eq!(next_task(&rebuilt), Some((0, Some(Task::ApplyService))));
    }
}
