//! With leader election only the Lease holder reconciles, and a follower takes over when the
//! leader stops. Its own test binary (and so its own control plane).

#![allow(clippy::expect_used, clippy::unwrap_used)]

mod common;

use std::sync::Arc;
use std::sync::atomic::{AtomicI64, Ordering};
use std::time::Duration;

use k8s_openapi::api::coordination::v1::Lease;
use k8s_openapi::api::core::v1::{ConfigMap, Service};
use kube::api::{Api, PostParams};
use prometheus_client::registry::Registry;
use seinode_tls::local::RunningController;
use seinode_tls_controller::{Controller, ControllerConfig, LeaderElection};
use seinode_tls_crds::SeiNode;

const WAIT: Duration = Duration::from_secs(30);

/// The `controller` command's `/readyz` check of a replica.
type Readiness = Box<dyn Fn() -> Result<(), String> + Send + Sync>;

/// Starts a replica against the cluster `kube_config` names.
fn start(
    config: ControllerConfig,
    kube_config: kube::Config,
) -> (RunningController, Arc<Registry>, Readiness) {
    let mut registry = Registry::default();
    let controller = Controller::new(config, &mut registry).unwrap();
    let readiness = controller.readiness();
    assert!(readiness().is_err(), "not ready before it ran");
    (
        RunningController::start(controller, kube_config).unwrap(),
        Arc::new(registry),
        Box::new(readiness),
    )
}

/// `seinode_tls_controller_leader` as the registry exports it.
fn leader_gauge(registry: &Registry) -> i64 {
    let mut text = String::new();
    prometheus_client::encoding::text::encode(&mut text, registry).unwrap();
    text.lines()
        .find_map(|l| l.strip_prefix("controller_leader "))
        .and_then(|v| v.parse().ok())
        .expect("controller_leader is exported")
}

/// The controller's reconciles so far, every outcome (none before its first).
fn reconciles(registry: &Registry) -> u64 {
    common::metrics::samples_sum(registry, "controller_reconciles_total{").unwrap_or(0)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_two_replicas_only_the_leader_reconciles_and_the_other_takes_over() {
    let client = common::client().await;
    let ns = common::namespace(&client, "ha-leader").await;
    let lease_name = format!("seinode-tls-{ns}");
    let config = |identity: &str| ControllerConfig {
        leader_election: Some(LeaderElection {
            lease_name: lease_name.clone(),
            lease_namespace: ns.clone(),
            identity: identity.to_owned(),
            lease_duration: Duration::from_secs(4),
            renew_deadline: Duration::from_secs(3),
            retry_period: Duration::from_millis(500),
        }),
        ..common::test_controller_config()
    };
    let leases: Api<Lease> = Api::namespaced(client.clone(), &ns);
    let holder = || async {
        leases
            .get_opt(&lease_name)
            .await
            .unwrap()
            .and_then(|l| l.spec?.holder_identity)
            .unwrap_or_default()
    };

    let (first, first_metrics, first_ready) = start(config("first"), common::kube_config().await);
    let (who, ok) = common::poll(WAIT, holder, |h| h.starts_with("first_")).await;
    assert!(ok, "first never took the lease (holder {who:?})");
    let (second, second_metrics, second_ready) =
        start(config("second"), common::kube_config().await);
    // Both are ready: the leader, and the follower that stands by (it reads the Lease).
    for (name, ready) in [("leader", &first_ready), ("follower", &second_ready)] {
        let (last, ok) = common::poll(WAIT, || async { ready() }, Result::is_ok).await;
        assert!(ok, "the {name} is ready: {last:?}");
    }
    // A third replica that cannot reach the API server never is.
    let closed_port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let mut unreachable = common::kube_config().await;
    unreachable.cluster_url = format!("https://127.0.0.1:{closed_port}").parse().unwrap();
    let (third, _, third_ready) = start(config("third"), unreachable);
    let (last, ok) = common::poll(
        Duration::from_secs(3),
        || async { third_ready() },
        Result::is_ok,
    )
    .await;
    assert!(
        !ok,
        "a replica that cannot reach the API server is not ready"
    );
    assert_eq!(
        last,
        Err("waiting for a first leader election round with the API server".to_owned())
    );
    third.stop().await;

    let nodes: Api<SeiNode> = Api::namespaced(client.clone(), &ns);
    nodes
        .create(&PostParams::default(), &common::plain_node(&ns, "one"))
        .await
        .unwrap();
    let services: Api<Service> = Api::namespaced(client.clone(), &ns);
    let (_, acted) = common::poll(
        WAIT,
        || async { services.get_opt("one").await.unwrap() },
        Option::is_some,
    )
    .await;
    assert!(acted, "the leader reconciled the node");
    // The counter moves when the reconcile ends, a moment after the Service appeared.
    let (_, counted) =
        common::poll(WAIT, || async { reconciles(&first_metrics) }, |n| *n > 0).await;
    assert!(counted, "the leader counted its reconciles");
    assert_eq!(
        reconciles(&second_metrics),
        0,
        "the follower did not reconcile"
    );
    assert!(holder().await.starts_with("first_"));
    assert_eq!(
        (leader_gauge(&first_metrics), leader_gauge(&second_metrics)),
        (1, 0),
        "the leader gauge says who reconciles"
    );

    // The leader stops (releasing the lease); the follower takes over and acts.
    first.stop().await;
    let (who, ok) = common::poll(WAIT, holder, |h| h.starts_with("second_")).await;
    assert!(ok, "second never took the lease (holder {who:?})");
    nodes
        .create(&PostParams::default(), &common::plain_node(&ns, "two"))
        .await
        .unwrap();
    let (_, acted) = common::poll(
        WAIT,
        || async { services.get_opt("two").await.unwrap() },
        Option::is_some,
    )
    .await;
    assert!(acted, "the new leader reconciled the new node");
    let (_, counted) =
        common::poll(WAIT, || async { reconciles(&second_metrics) }, |n| *n > 0).await;
    assert!(counted, "the new leader counted its reconciles");
    assert_eq!(leader_gauge(&second_metrics), 1, "the new leader's gauge");
    assert_eq!(
        leader_gauge(&first_metrics),
        0,
        "the stopped leader's gauge"
    );
    let cms: Api<ConfigMap> = Api::namespaced(client.clone(), &ns);
    assert!(
        cms.list(&Default::default())
            .await
            .unwrap()
            .items
            .iter()
            .all(|c| !c
                .metadata
                .name
                .as_deref()
                .unwrap_or_default()
                .ends_with("rbac-proxy-config"))
    );
    second.stop().await;
}

/// The transport under the leader's checks: a client whose fence closes sends nothing more,
/// whatever the code above it decided while it still led (a paused process wakes right there),
/// not even the rest of a request already on its way.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_fenced_client_sends_nothing_once_its_fence_closes_even_mid_request() {
    let admin = common::client().await;
    let ns = common::namespace(&admin, "fence").await;
    // How many more writes to the socket the fence lets through.
    let budget = Arc::new(AtomicI64::new(i64::MAX));
    let fence: seinode_tls::api_client::Fence = {
        let budget = budget.clone();
        Arc::new(move || budget.fetch_sub(1, Ordering::SeqCst) > 0)
    };
    let fenced =
        seinode_tls::api_client::from_config(common::kube_config().await, Some(fence)).unwrap();
    let maps: Api<ConfigMap> = Api::namespaced(fenced, &ns);
    let map = |name: &str, size: usize| ConfigMap {
        metadata: kube::api::ObjectMeta {
            name: Some(name.to_owned()),
            ..Default::default()
        },
        data: Some([("data".to_owned(), "x".repeat(size))].into()),
        ..Default::default()
    };
    // Open: the request goes out, and leaves a pooled connection behind.
    maps.create(&PostParams::default(), &map("before", 1))
        .await
        .unwrap();
    // Closed before the request: it fails (its connection ends; HTTP/2 calls it a broken pipe).
    budget.store(0, Ordering::SeqCst);
    maps.create(&PostParams::default(), &map("fenced", 1))
        .await
        .expect_err("a request through a closed fence fails");
    // Closing mid-request: on a new connection (opened by a read), two of the writes of a
    // 900 kB request (about 18 here) go out, then the fence closes. A check per request would
    // let it all through.
    budget.store(i64::MAX, Ordering::SeqCst);
    maps.list(&Default::default()).await.unwrap();
    budget.store(2, Ordering::SeqCst);
    maps.create(&PostParams::default(), &map("cut", 900_000))
        .await
        .expect_err("a request whose fence closed on the way fails");
    assert!(
        budget.load(Ordering::SeqCst) < 0,
        "the fence was asked again after its last allowed write"
    );
    // Open again (a new term): requests go out again.
    budget.store(i64::MAX, Ordering::SeqCst);
    maps.create(&PostParams::default(), &map("after", 1))
        .await
        .unwrap();
    let mut names: Vec<String> = Api::<ConfigMap>::namespaced(admin, &ns)
        .list(&Default::default())
        .await
        .unwrap()
        .items
        .into_iter()
        .filter_map(|c| c.metadata.name)
        .filter(|n| n != "kube-root-ca.crt")
        .collect();
    names.sort();
    assert_eq!(
        names,
        ["after", "before"],
        "nothing of the fenced requests was created"
    );
}
