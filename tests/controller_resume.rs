//! A restarted controller resumes a recorded plan where it stopped. Its own test binary (and so
//! its own control plane), so no other controller touches the node.

#![allow(clippy::expect_used, clippy::unwrap_used)]

mod common;

use std::time::Duration;

use k8s_openapi::api::apps::v1::StatefulSet;
use k8s_openapi::api::core::v1::Service;
use kube::api::{Api, Patch, PatchParams, PostParams};
use prometheus_client::registry::Registry;
use seinode_tls::local::RunningController;
use seinode_tls_controller::{Controller, ControllerConfig};
use seinode_tls_crds::{PlanPhase, SeiNode, SeiNodePhase};
use serde_json::json;

const WAIT: Duration = Duration::from_secs(30);

async fn start(config: ControllerConfig) -> RunningController {
    let controller = Controller::new(config, &mut Registry::default()).unwrap();
    RunningController::start(controller, common::kube_config().await).unwrap()
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

    let controller = start(common::test_controller_config()).await;
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
