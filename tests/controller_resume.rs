//! A restarted controller resumes a recorded plan where it stopped, and a node whose pod cannot
//! be created waits for it without calling its sidecar in a loop. Their own test binary (and so
//! their own control plane), each controller watching only its test's namespace, so no other
//! controller touches a node and a controller's metrics count its test's node alone.

#![allow(clippy::expect_used, clippy::unwrap_used)]

mod common;

use std::time::Duration;

use k8s_openapi::api::apps::v1::StatefulSet;
use k8s_openapi::api::core::v1::{ResourceQuota, Service};
use kube::api::{Api, Patch, PatchParams, PostParams};
use prometheus_client::registry::Registry;
use seinode_tls::local::RunningController;
use seinode_tls_controller::{Controller, ControllerConfig};
use seinode_tls_crds::{PlanPhase, SeiNode, SeiNodePhase};
use seinode_tls_kube::watch::WatchScope;
use serde_json::json;

const WAIT: Duration = Duration::from_secs(30);

/// A controller of the tests' configuration that watches only `ns`, and its metrics.
async fn start(ns: &str) -> (RunningController, Registry) {
    let config = ControllerConfig {
        watch_scope: WatchScope::Namespaces(vec![ns.to_owned()]),
        ..common::test_controller_config()
    };
    let mut registry = Registry::default();
    let controller = Controller::new(config, &mut registry).unwrap();
    let running = RunningController::start(controller, common::kube_config().await).unwrap();
    (running, registry)
}

/// The controller's successful reconciles so far, from its metrics.
fn reconciles(registry: &Registry) -> u64 {
    let success = "controller_reconciles_total{outcome=\"success\"}";
    common::metrics::samples_sum(registry, success)
        .unwrap_or_else(|| panic!("no {success} sample: no reconcile succeeded yet"))
}

async fn wait_phase(api: &Api<SeiNode>, name: &str, phase: SeiNodePhase) {
    let (node, ok) = common::poll(
        WAIT,
        || async { api.get(name).await.unwrap() },
        |n| n.status.as_ref().and_then(|s| s.phase) == Some(phase),
    )
    .await;
    assert!(ok, "{name} never reached {phase:?}: {:#?}", node.status);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_restarted_controller_resumes_the_plan_without_repeating_finished_tasks() {
    let client = common::client().await;
    let ns = common::namespace(&client, "ha-resume").await;
    let nodes: Api<SeiNode> = Api::namespaced(client.clone(), &ns);
    nodes
        .create(&PostParams::default(), &common::plain_node(&ns, "rpc"))
        .await
        .unwrap();
    // What a controller that stopped after ApplyService left behind in status.
    let status = json!({"status": {
        "phase": "Initializing",
        "observedGeneration": 1,
        "plan": {"id": "init-1", "phase": "Active", "targetPhase": "Running", "tasks": [
            {"type": "ApplyService", "status": "Complete"},
            {"type": "ApplyStatefulSet", "status": "Pending"},
            {"type": "AwaitStatefulSetReady", "status": "Pending"},
        ]},
    }});
    nodes
        .patch_status("rpc", &PatchParams::default(), &Patch::Merge(&status))
        .await
        .unwrap();

    let (controller, _metrics) = start(&ns).await;
    let sts: Api<StatefulSet> = Api::namespaced(client.clone(), &ns);
    let (_, applied) = common::poll(
        WAIT,
        || async { sts.get_opt("rpc").await.unwrap() },
        Option::is_some,
    )
    .await;
    assert!(applied, "the pending ApplyStatefulSet ran");
    // ApplyService was recorded Complete, so it did not run again: no Service exists.
    let services: Api<Service> = Api::namespaced(client.clone(), &ns);
    assert!(
        services.get_opt("rpc").await.unwrap().is_none(),
        "a finished task was repeated"
    );
    common::wait_stateful_set_ready(&client, &ns, "rpc").await;
    wait_phase(&nodes, "rpc", SeiNodePhase::Running).await;
    // The Service the simulated predecessor never created is missing from a Running node:
    // drift, restored by a repair plan (the init plan was resumed, not replaced: the
    // StatefulSet came while the Service was still absent).
    let (node, repaired) = common::poll(
        WAIT,
        || async { nodes.get("rpc").await.unwrap() },
        |n| {
            n.status
                .as_ref()
                .and_then(|s| s.plan.as_ref())
                .is_some_and(|p| p.id == "repair-1" && p.phase == PlanPhase::Complete)
        },
    )
    .await;
    assert!(repaired, "no repair plan: {:#?}", node.status);
    assert!(services.get_opt("rpc").await.unwrap().is_some());
    controller.stop().await;
}

/// A node whose pod cannot be created (a quota of no Pods) waits at `MarkSidecarReady`, saying
/// why, and is not reconciled again until its pod changes or the 30 s safety net: before, the
/// controller called its sidecar every few seconds, each call failing at once and waking the
/// node (1,900 reconciles per 5 s for 950 such nodes in the scale benchmark).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_node_whose_pod_cannot_be_created_waits_for_it_without_calling_in_a_loop() {
    let client = common::client().await;
    let ns = common::namespace(&client, "no-pod").await;
    let quotas: Api<ResourceQuota> = Api::namespaced(client.clone(), &ns);
    let quota: ResourceQuota = serde_json::from_value(json!({
        "metadata": {"name": "no-pods"},
        "spec": {"hard": {"pods": "0"}},
    }))
    .unwrap();
    quotas.create(&PostParams::default(), &quota).await.unwrap();
    let nodes: Api<SeiNode> = Api::namespaced(client.clone(), &ns);
    nodes
        .create(&PostParams::default(), &common::plain_node(&ns, "rpc"))
        .await
        .unwrap();
    let (controller, metrics) = start(&ns).await;

    let waiting = |n: &SeiNode| {
        n.status
            .as_ref()
            .and_then(|s| s.conditions.as_ref())
            .and_then(|c| c.iter().find(|c| c.type_ == "SidecarReady"))
            .is_some_and(|c| {
                c.status == "False"
                    && c.reason == "SidecarStarting"
                    && c.message.contains("pod")
                    && c.message.contains("is not there yet")
            })
    };
    let (node, ok) =
        common::poll(WAIT, || async { nodes.get("rpc").await.unwrap() }, waiting).await;
    assert!(
        ok,
        "the node never said it waits for its pod: {:#?}",
        node.status
    );
    let plan = node.status.and_then(|s| s.plan).expect("a plan");
    let pending: Vec<&str> = plan
        .tasks
        .iter()
        .filter(|t| t.status != seinode_tls_crds::TaskStatus::Complete)
        .map(|t| t.r#type.as_str())
        .collect();
    assert_eq!(pending, ["MarkSidecarReady", "AwaitStatefulSetReady"]);

    // A measurement window, not a wait for something to happen: with nothing changing, the
    // node is left alone (before, about four reconciles in this time).
    let before = reconciles(&metrics);
    tokio::time::sleep(Duration::from_secs(12)).await;
    let during = reconciles(&metrics) - before;
    assert!(
        during <= 2,
        "{during} reconciles in 12 s of a node waiting for a pod that cannot be created"
    );
    assert!(waiting(&nodes.get("rpc").await.unwrap()));
    controller.stop().await;
}
