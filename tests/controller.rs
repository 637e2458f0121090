//! The controller against a real API server: the contract, the condition and its events, the
//! gate, the plan and the objects it creates. The tests write StatefulSet status where a kubelet
//! would.

#![allow(clippy::expect_used, clippy::unwrap_used)]

mod common;

use std::time::{Duration, Instant};

use k8s_openapi::api::apps::v1::StatefulSet;
use k8s_openapi::api::core::v1::{ConfigMap, Secret, Service};
use k8s_openapi::api::events::v1::Event;
use kube::Client;
use kube::api::{Api, ListParams, Patch, PatchParams, PostParams};
use rcgen::{CertificateParams, KeyPair};
use seinode_tls_crds::{
    PlanPhase, SIDECAR_TLS_SECRET_READY, SeiNode, SeiNodePhase, TaskFailureReason, TaskStatus,
};
use serde_json::json;

const WAIT: Duration = Duration::from_secs(30);
/// How long a node whose pod is replaced gets to run again.
const REPLACED_POD_WAIT: Duration = Duration::from_secs(90);

// === Fixtures ===

struct Cert {
    cert_pem: String,
    key_pem: String,
}

/// A self-signed serving certificate for `dns_names`, valid from `not_before` to `not_after`
/// (seconds relative to now).
fn cert(dns_names: &[&str], not_before: i64, not_after: i64) -> Cert {
    let key = KeyPair::generate().unwrap();
    let mut params = CertificateParams::new(
        dns_names
            .iter()
            .map(|s| (*s).to_owned())
            .collect::<Vec<_>>(),
    )
    .unwrap();
    let now = time::OffsetDateTime::now_utc();
    params.not_before = now + time::Duration::seconds(not_before);
    params.not_after = now + time::Duration::seconds(not_after);
    let cert = params.self_signed(&key).unwrap();
    Cert {
        cert_pem: cert.pem(),
        key_pem: key.serialize_pem(),
    }
}

fn names(ns: &str, node: &str) -> [String; 2] {
    [
        format!("{node}.{ns}.svc.cluster.local"),
        format!("{node}-0.{node}.{ns}.svc.cluster.local"),
    ]
}

fn valid_cert(ns: &str, node: &str) -> Cert {
    let [service, pod] = names(ns, node);
    cert(&[&service, &pod], -60, 30 * 24 * 3600)
}

fn secret(ns: &str, name: &str, cert_pem: &str, key_pem: &str) -> Secret {
    seinode_tls_testkit::tls_secret(ns, name, cert_pem, key_pem, None)
}

async fn put_secret(client: &Client, secret: &Secret) {
    let api: Api<Secret> = Api::namespaced(
        client.clone(),
        secret.metadata.namespace.as_deref().unwrap(),
    );
    api.patch(
        secret.metadata.name.as_deref().unwrap(),
        &PatchParams::apply("controller-test").force(),
        &Patch::Apply(secret),
    )
    .await
    .unwrap();
}

fn node(ns: &str, name: &str, tls_secret: Option<&str>) -> SeiNode {
    let mut spec =
        json!({"chainId": "arctic-1", "image": "ghcr.io/sei-protocol/sei:v6.3.0", "fullNode": {}});
    if let Some(secret) = tls_secret {
        spec["sidecar"] = json!({"tls": {"secretName": secret}});
    }
    serde_json::from_value(json!({
        "apiVersion": "sei.io/v1alpha1", "kind": "SeiNode",
        "metadata": {"name": name, "namespace": ns}, "spec": spec,
    }))
    .unwrap()
}

async fn create_node(client: &Client, node: &SeiNode) -> Api<SeiNode> {
    let api: Api<SeiNode> =
        Api::namespaced(client.clone(), node.metadata.namespace.as_deref().unwrap());
    api.create(&PostParams::default(), node).await.unwrap();
    api
}

fn phase(node: &SeiNode) -> Option<SeiNodePhase> {
    node.status.as_ref().and_then(|s| s.phase)
}

/// Waits until the node satisfies `check`, failing with its last status.
async fn wait_node(
    api: &Api<SeiNode>,
    name: &str,
    what: &str,
    check: impl Fn(&SeiNode) -> bool,
) -> SeiNode {
    let (node, ok) = common::poll(WAIT, || async { api.get(name).await.unwrap() }, check).await;
    assert!(
        ok,
        "timed out waiting for {what}; status: {:#?}",
        node.status
    );
    node
}

async fn wait_reason(api: &Api<SeiNode>, name: &str, status: &str, reason: &str) -> SeiNode {
    let expected = Some((status.to_owned(), reason.to_owned()));
    wait_node(
        api,
        name,
        &format!("{SIDECAR_TLS_SECRET_READY}={status} {reason}"),
        |n| common::tls_reason(n) == expected,
    )
    .await
}

/// Waits for the StatefulSet the plan applies, reports it ready, and waits for Running.
async fn bring_to_running(client: &Client, api: &Api<SeiNode>, ns: &str, name: &str) -> SeiNode {
    let sts: Api<StatefulSet> = Api::namespaced(client.clone(), ns);
    let (_, found) = common::poll(
        WAIT,
        || async { sts.get_opt(name).await.unwrap() },
        Option::is_some,
    )
    .await;
    assert!(found, "the plan never applied StatefulSet {ns}/{name}");
    common::wait_stateful_set_ready(client, ns, name).await;
    wait_node(api, name, "phase Running", |n| {
        phase(n) == Some(SeiNodePhase::Running)
    })
    .await
}

async fn events(client: &Client, ns: &str, reason: &str) -> Vec<Event> {
    let api: Api<Event> = Api::namespaced(client.clone(), ns);
    api.list(&ListParams::default())
        .await
        .unwrap()
        .items
        .into_iter()
        .filter(|e| e.reason.as_deref() == Some(reason))
        .collect()
}

async fn wait_event(client: &Client, ns: &str, reason: &str) -> Event {
    let (found, ok) = common::poll(WAIT, || events(client, ns, reason), |e| !e.is_empty()).await;
    assert!(ok, "no {reason} event in {ns}");
    found.into_iter().next().unwrap()
}

/// Waits for phase Failed and returns the plan's failed task.
async fn wait_failed_task(api: &Api<SeiNode>, name: &str) -> seinode_tls_crds::PlannedTask {
    let failed = wait_node(api, name, "phase Failed", |n| {
        phase(n) == Some(SeiNodePhase::Failed)
    })
    .await;
    let plan = failed.status.and_then(|s| s.plan).expect("a plan");
    plan.tasks
        .into_iter()
        .find(|t| t.status == TaskStatus::Failed)
        .expect("a failed task")
}

/// The controller, and a namespace of its own that enforces the restricted Pod Security level:
/// a node pod that did not meet it would never be created, and its node never run.
async fn setup(prefix: &str) -> (Client, String) {
    common::controller();
    let client = common::client().await;
    let ns = common::namespace(&client, prefix).await;
    let namespaces: Api<k8s_openapi::api::core::v1::Namespace> = Api::all(client.clone());
    namespaces
        .patch(
            &ns,
            &PatchParams::default(),
            &Patch::Merge(json!({"metadata": {"labels": {
                "pod-security.kubernetes.io/enforce": "restricted",
                "pod-security.kubernetes.io/enforce-version": "latest",
            }}})),
        )
        .await
        .unwrap();
    (client, ns)
}

/// What kstatus (sigs.k8s.io/cli-utils, as Flux and Argo CD use it) computes for `node`: its
/// status and message, from the real library (`tools/kstatus`).
fn kstatus(node: &SeiNode) -> (String, String) {
    let probe = seinode_tls_devcluster::control_plane::kstatus().expect("build the kstatus probe");
    let mut child = std::process::Command::new(probe)
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .spawn()
        .expect("run kstatus");
    std::io::Write::write_all(
        child.stdin.as_mut().unwrap(),
        &serde_json::to_vec(node).unwrap(),
    )
    .unwrap();
    drop(child.stdin.take());
    let out = child.wait_with_output().unwrap();
    assert!(out.status.success(), "kstatus: {out:?}");
    let text = String::from_utf8(out.stdout).unwrap();
    let (status, message) = text
        .trim_end()
        .split_once('\t')
        .expect("status<TAB>message");
    (status.to_owned(), message.to_owned())
}

// === Tests ===

#[tokio::test]
async fn a_tls_node_waits_for_its_secret_then_runs_as_soon_as_it_appears() {
    let (client, ns) = setup("ctl-provision").await;
    let api = create_node(&client, &node(&ns, "rpc", Some("rpc-tls"))).await;
    let pending = wait_reason(&api, "rpc", "False", "TLSSecretNotFound").await;
    assert_eq!(phase(&pending), Some(SeiNodePhase::Pending));
    let published = pending
        .status
        .as_ref()
        .unwrap()
        .sidecar_tls
        .clone()
        .expect("contract published");
    assert_eq!(published.secret_name, "rpc-tls");
    assert_eq!(published.required_dns_names, names(&ns, "rpc"));
    // As Flux and Argo CD read it (kstatus): in progress, saying why.
    let (health, message) = kstatus(&pending);
    assert_eq!(health, "InProgress", "{message}");
    assert!(message.contains("TLSSecretNotFound"), "{message}");
    // The gate holds: nothing created while the Secret is missing.
    let plan = pending
        .status
        .as_ref()
        .unwrap()
        .plan
        .clone()
        .expect("plan recorded");
    assert!(
        plan.tasks.iter().all(|t| t.status == TaskStatus::Pending),
        "{plan:?}"
    );
    let services: Api<Service> = Api::namespaced(client.clone(), &ns);
    assert!(services.get_opt("rpc").await.unwrap().is_none());
    let not_ready = wait_event(&client, &ns, "SidecarTLSSecretNotReady").await;
    assert!(not_ready.note.unwrap_or_default().contains("not found"));

    let c = valid_cert(&ns, "rpc");
    let started = Instant::now();
    put_secret(&client, &secret(&ns, "rpc-tls", &c.cert_pem, &c.key_pem)).await;
    wait_reason(&api, "rpc", "True", "TLSSecretReady").await;
    let elapsed = started.elapsed();
    // A figure, not an assertion: without the Secret watch the node would wait for the
    // 10-minute resync and the wait above would time out.
    println!(
        "secret created -> SidecarTLSSecretReady=True in {} ms",
        elapsed.as_millis()
    );
    wait_event(&client, &ns, "SidecarTLSSecretReady").await;

    let running = bring_to_running(&client, &api, &ns, "rpc").await;
    // What Flux, Argo CD and scripts wait on: `kubectl wait --for=condition=Ready` returns, and
    // kstatus's rule for a custom resource holds (status.observedGeneration is the generation,
    // and so is the Ready condition's).
    let waited = common::control_plane()
        .kubectl()
        .args([
            "wait",
            "--for=condition=Ready",
            "snode/rpc",
            "-n",
            &ns,
            "--timeout=120s",
        ])
        .output()
        .expect("run kubectl");
    assert!(
        waited.status.success(),
        "kubectl wait: {}{}",
        String::from_utf8_lossy(&waited.stdout),
        String::from_utf8_lossy(&waited.stderr)
    );
    let ready_node = api.get("rpc").await.unwrap();
    assert_eq!(
        kstatus(&ready_node),
        ("Current".to_owned(), "Resource is Ready".to_owned())
    );
    let generation = ready_node.metadata.generation;
    let ready_status = ready_node.status.clone().unwrap();
    assert_eq!(ready_status.observed_generation, generation);
    let ready = ready_status
        .conditions
        .iter()
        .flatten()
        .find(|c| c.type_ == "Ready")
        .expect("a Ready condition");
    assert_eq!(
        (
            ready.status.as_str(),
            ready.reason.as_str(),
            ready.observed_generation
        ),
        ("True", "NodeReady", generation),
        "{ready:?}"
    );
    let status = running.status.unwrap();
    assert_eq!(
        status.current_image.as_deref(),
        Some("ghcr.io/sei-protocol/sei:v6.3.0")
    );
    let plan = status.plan.unwrap();
    assert_eq!(plan.phase, PlanPhase::Complete);
    let tasks: Vec<&str> = plan.tasks.iter().map(|t| t.r#type.as_str()).collect();
    assert_eq!(
        tasks,
        [
            "ApplyRBACProxyConfig",
            "ApplyService",
            "ApplyStatefulSet",
            "MarkSidecarReady",
            "AwaitStatefulSetReady"
        ]
    );

    // What the plan created, with owner references.
    let svc = services.get("rpc").await.unwrap();
    let ports: Vec<i32> = svc
        .spec
        .unwrap()
        .ports
        .unwrap()
        .iter()
        .map(|p| p.port)
        .collect();
    assert_eq!(ports, [8443]);
    assert_eq!(svc.metadata.owner_references.unwrap()[0].name, "rpc");
    let cms: Api<ConfigMap> = Api::namespaced(client.clone(), &ns);
    let cm = cms.get("rpc-rbac-proxy-config").await.unwrap();
    assert!(cm.data.unwrap()["config.yaml"].contains("resource: seinodetasks"));
    let sts: Api<StatefulSet> = Api::namespaced(client.clone(), &ns);
    let pod = sts
        .get("rpc")
        .await
        .unwrap()
        .spec
        .unwrap()
        .template
        .spec
        .unwrap();
    let proxy = pod
        .init_containers
        .iter()
        .flatten()
        .find(|c| c.name == "kube-rbac-proxy")
        .expect("proxy container");
    assert_eq!(
        proxy.restart_policy.as_deref(),
        Some("Always"),
        "a native sidecar"
    );
    assert!(
        proxy
            .args
            .as_ref()
            .unwrap()
            .iter()
            .any(|a| a == "--upstream=http://127.0.0.1:7777/")
    );
    let tls_volume = pod
        .volumes
        .unwrap()
        .into_iter()
        .find(|v| v.name == "sidecar-tls")
        .unwrap();
    let secret_volume = tls_volume.secret.unwrap();
    assert_eq!(
        (
            secret_volume.secret_name.as_deref(),
            secret_volume.default_mode
        ),
        (Some("rpc-tls"), Some(0o440))
    );
}

#[tokio::test]
async fn a_secret_with_wrong_sans_holds_the_node_until_it_is_fixed() {
    let (client, ns) = setup("ctl-sans").await;
    let [service, _] = names(&ns, "rpc");
    let wrong = cert(&[&service], -60, 3600 * 24);
    put_secret(
        &client,
        &secret(&ns, "rpc-tls", &wrong.cert_pem, &wrong.key_pem),
    )
    .await;
    let api = create_node(&client, &node(&ns, "rpc", Some("rpc-tls"))).await;
    let held = wait_reason(&api, "rpc", "False", "TLSSecretSANsMismatch").await;
    assert_eq!(phase(&held), Some(SeiNodePhase::Pending));
    let message = &held.status.unwrap().conditions.unwrap()[0].message;
    assert!(
        message.contains(&format!("do not cover rpc-0.rpc.{ns}.svc.cluster.local")),
        "{message}"
    );

    let fixed = valid_cert(&ns, "rpc");
    put_secret(
        &client,
        &secret(&ns, "rpc-tls", &fixed.cert_pem, &fixed.key_pem),
    )
    .await;
    wait_reason(&api, "rpc", "True", "TLSSecretReady").await;
    bring_to_running(&client, &api, &ns, "rpc").await;
}

#[tokio::test]
async fn malformed_mismatched_and_expired_secrets_are_reported_end_to_end() {
    let (client, ns) = setup("ctl-reasons").await;
    let good = valid_cert(&ns, "malformed");
    put_secret(
        &client,
        &secret(&ns, "malformed-tls", &good.cert_pem, "not a key"),
    )
    .await;
    let other = valid_cert(&ns, "mismatch");
    let mismatched = valid_cert(&ns, "mismatch");
    put_secret(
        &client,
        &secret(&ns, "mismatch-tls", &other.cert_pem, &mismatched.key_pem),
    )
    .await;
    let [service, pod] = names(&ns, "expired");
    let old = cert(&[&service, &pod], -7200, -3600);
    put_secret(
        &client,
        &secret(&ns, "expired-tls", &old.cert_pem, &old.key_pem),
    )
    .await;

    let mut apis = Vec::new();
    for (name, reason) in [
        ("malformed", "TLSSecretMalformed"),
        ("mismatch", "TLSSecretKeyMismatch"),
        ("expired", "TLSSecretExpired"),
    ] {
        let api = create_node(&client, &node(&ns, name, Some(&format!("{name}-tls")))).await;
        apis.push((api, name, reason));
    }
    for (api, name, reason) in apis {
        let held = wait_reason(&api, name, "False", reason).await;
        assert_eq!(phase(&held), Some(SeiNodePhase::Pending), "{name}");
    }
}

#[tokio::test]
async fn a_certificate_that_expires_flips_the_condition_on_time_without_any_change() {
    let (client, ns) = setup("ctl-expiry").await;
    let [service, pod] = names(&ns, "rpc");
    let short = cert(&[&service, &pod], -60, 4);
    put_secret(
        &client,
        &secret(&ns, "rpc-tls", &short.cert_pem, &short.key_pem),
    )
    .await;
    let api = create_node(&client, &node(&ns, "rpc", Some("rpc-tls"))).await;
    wait_reason(&api, "rpc", "True", "TLSSecretReady").await;
    // Inside the (one-hour, in tests) warning window from the start.
    wait_event(&client, &ns, "SidecarTLSCertificateExpiring").await;
    // Nothing changes; the requeue at notAfter reports the expiry.
    wait_reason(&api, "rpc", "False", "TLSSecretExpired").await;
}

#[tokio::test]
async fn a_running_node_whose_secret_breaks_keeps_its_pod_and_recovers_when_restored() {
    let (client, ns) = setup("ctl-break").await;
    let c = valid_cert(&ns, "rpc");
    let good = secret(&ns, "rpc-tls", &c.cert_pem, &c.key_pem);
    put_secret(&client, &good).await;
    let api = create_node(&client, &node(&ns, "rpc", Some("rpc-tls"))).await;
    wait_reason(&api, "rpc", "True", "TLSSecretReady").await;
    let running = bring_to_running(&client, &api, &ns, "rpc").await;
    let plan_before = running.status.unwrap().plan;
    let sts: Api<StatefulSet> = Api::namespaced(client.clone(), &ns);
    let before = sts.get("rpc").await.unwrap();

    let secrets: Api<Secret> = Api::namespaced(client.clone(), &ns);
    secrets
        .delete("rpc-tls", &Default::default())
        .await
        .unwrap();
    let broken = wait_reason(&api, "rpc", "False", "TLSSecretNotFound").await;
    wait_event(&client, &ns, "SidecarTLSSecretNotReady").await;
    let status = broken.status.unwrap();
    assert_eq!(
        status.phase,
        Some(SeiNodePhase::Running),
        "the node keeps running"
    );
    assert_eq!(status.plan, plan_before, "no new plan");
    let after = sts.get("rpc").await.unwrap();
    assert_eq!(
        after.metadata.resource_version, before.metadata.resource_version,
        "StatefulSet untouched"
    );

    put_secret(&client, &good).await;
    wait_reason(&api, "rpc", "True", "TLSSecretReady").await;
    assert_eq!(
        sts.get("rpc").await.unwrap().metadata.resource_version,
        before.metadata.resource_version
    );
}

#[tokio::test]
async fn an_image_change_waits_for_a_valid_secret_then_rolls() {
    let (client, ns) = setup("ctl-image").await;
    let c = valid_cert(&ns, "rpc");
    let good = secret(&ns, "rpc-tls", &c.cert_pem, &c.key_pem);
    put_secret(&client, &good).await;
    let api = create_node(&client, &node(&ns, "rpc", Some("rpc-tls"))).await;
    wait_reason(&api, "rpc", "True", "TLSSecretReady").await;
    bring_to_running(&client, &api, &ns, "rpc").await;

    // Break the Secret, then change the image: the update plan is recorded but waits.
    let [service, _] = names(&ns, "rpc");
    let wrong = cert(&[&service], -60, 3600);
    put_secret(
        &client,
        &secret(&ns, "rpc-tls", &wrong.cert_pem, &wrong.key_pem),
    )
    .await;
    wait_reason(&api, "rpc", "False", "TLSSecretSANsMismatch").await;
    let patch = json!({"spec": {"image": "ghcr.io/sei-protocol/sei:v6.4.0"}});
    api.patch("rpc", &PatchParams::default(), &Patch::Merge(&patch))
        .await
        .unwrap();
    let waiting = wait_node(&api, "rpc", "an update plan", |n| {
        n.status
            .as_ref()
            .and_then(|s| s.plan.as_ref())
            .is_some_and(|p| p.id.starts_with("update-"))
    })
    .await;
    let plan = waiting.status.as_ref().unwrap().plan.clone().unwrap();
    assert!(
        plan.tasks.iter().all(|t| t.status == TaskStatus::Pending),
        "blocked: {plan:?}"
    );
    let sts: Api<StatefulSet> = Api::namespaced(client.clone(), &ns);
    let image = |s: &StatefulSet| {
        s.spec
            .as_ref()
            .unwrap()
            .template
            .spec
            .as_ref()
            .unwrap()
            .containers[0]
            .image
            .clone()
    };
    assert_eq!(
        image(&sts.get("rpc").await.unwrap()).as_deref(),
        Some("ghcr.io/sei-protocol/sei:v6.3.0")
    );

    // Fix the Secret: the plan applies the new image; report the rollout.
    put_secret(&client, &good).await;
    let (rolled, ok) = common::poll(
        WAIT,
        || async { sts.get("rpc").await.unwrap() },
        |s| image(s).as_deref() == Some("ghcr.io/sei-protocol/sei:v6.4.0"),
    )
    .await;
    assert!(
        ok,
        "StatefulSet never got the new image: {:?}",
        image(&rolled)
    );
    common::wait_stateful_set_ready(&client, &ns, "rpc").await;
    wait_node(&api, "rpc", "currentImage v6.4.0", |n| {
        n.status.as_ref().and_then(|s| s.current_image.as_deref())
            == Some("ghcr.io/sei-protocol/sei:v6.4.0")
    })
    .await;
}

#[tokio::test]
async fn a_node_without_tls_gets_no_condition_no_contract_no_proxy_and_no_8443() {
    let (client, ns) = setup("ctl-plain").await;
    let api = create_node(&client, &node(&ns, "plain", None)).await;
    let running = bring_to_running(&client, &api, &ns, "plain").await;
    let status = running.status.unwrap();
    assert!(status.sidecar_tls.is_none());
    assert!(common::tls_reason(&api.get("plain").await.unwrap()).is_none());
    let cms: Api<ConfigMap> = Api::namespaced(client.clone(), &ns);
    assert!(
        cms.get_opt("plain-rbac-proxy-config")
            .await
            .unwrap()
            .is_none()
    );
    let svc: Api<Service> = Api::namespaced(client.clone(), &ns);
    let ports: Vec<i32> = svc
        .get("plain")
        .await
        .unwrap()
        .spec
        .unwrap()
        .ports
        .unwrap()
        .iter()
        .map(|p| p.port)
        .collect();
    assert_eq!(ports, [7777]);
    let sts: Api<StatefulSet> = Api::namespaced(client.clone(), &ns);
    let pod = sts
        .get("plain")
        .await
        .unwrap()
        .spec
        .unwrap()
        .template
        .spec
        .unwrap();
    assert!(pod.containers.iter().all(|c| c.name != "kube-rbac-proxy"));
}

#[tokio::test]
async fn an_invalid_image_fails_the_plan_with_a_clear_error_until_the_spec_is_fixed() {
    let (client, ns) = setup("ctl-badimage").await;
    let mut bad = node(&ns, "rpc", None);
    bad.spec.image = "ghcr.io/Sei/Sei:v1".to_owned();
    let api = create_node(&client, &bad).await;
    let task = wait_failed_task(&api, "rpc").await;
    assert_eq!(task.r#type, "ApplyStatefulSet");
    assert_eq!(task.reason, Some(TaskFailureReason::InvalidSpec));
    assert!(
        task.error
            .as_deref()
            .unwrap()
            .contains("spec.image: image \"ghcr.io/Sei/Sei:v1\" is not a valid image reference")
    );
    wait_event(&client, &ns, "PlanFailed").await;

    let patch = json!({"spec": {"image": "ghcr.io/sei-protocol/sei:v6.3.0"}});
    api.patch("rpc", &PatchParams::default(), &Patch::Merge(&patch))
        .await
        .unwrap();
    bring_to_running(&client, &api, &ns, "rpc").await;
}

#[tokio::test]
async fn a_resource_the_api_server_refuses_fails_the_plan_instead_of_retrying_forever() {
    let (client, ns) = setup("ctl-refused").await;
    // A valid SeiNode name, but not a valid Service name (a dot): the API server refuses the
    // Service with 422, which no retry can fix.
    let api = create_node(&client, &node(&ns, "rpc.one", None)).await;
    let task = wait_failed_task(&api, "rpc.one").await;
    assert_eq!(task.r#type, "ApplyService");
    assert_eq!(task.reason, Some(TaskFailureReason::RefusedByAPIServer));
    let error = task.error.as_deref().unwrap();
    assert!(
        error.contains(&format!("the API server refused Service {ns}/rpc.one")),
        "{error}"
    );
    assert!(error.contains("HTTP 422"), "{error}");
    wait_event(&client, &ns, "PlanFailed").await;
}

#[tokio::test]
async fn an_object_in_the_way_is_never_adopted_and_the_plan_resumes_once_it_is_gone() {
    let (client, ns) = setup("ctl-in-the-way").await;
    // A Service that happens to have the node's name, not made by the controller.
    let services: Api<Service> = Api::namespaced(client.clone(), &ns);
    let theirs: Service = serde_json::from_value(json!({
        "apiVersion": "v1", "kind": "Service",
        "metadata": {"name": "rpc", "namespace": ns},
        "spec": {"selector": {"app": "someone-else"}, "ports": [{"port": 80}]},
    }))
    .unwrap();
    services
        .create(&PostParams::default(), &theirs)
        .await
        .unwrap();
    let api = create_node(&client, &node(&ns, "rpc", None)).await;
    let task = wait_failed_task(&api, "rpc").await;
    assert_eq!(task.r#type, "ApplyService");
    assert_eq!(task.reason, Some(TaskFailureReason::ObjectInTheWay));
    let error = task.error.as_deref().unwrap();
    assert!(
        error.contains(&format!("Service {ns}/rpc is in the way"))
            && error.contains("no controller owner")
            && error.contains(&format!("kubectl -n {ns} delete service rpc")),
        "{error}"
    );
    let event = wait_event(&client, &ns, "PlanFailed").await;
    assert_eq!(event.note.as_deref(), Some(error));
    // Untouched: not re-selected, not owned (so never garbage-collected with the node).
    let kept = services.get("rpc").await.unwrap();
    assert_eq!(
        kept.spec
            .unwrap()
            .selector
            .unwrap()
            .get("app")
            .map(String::as_str),
        Some("someone-else")
    );
    assert!(
        kept.metadata
            .owner_references
            .unwrap_or_default()
            .is_empty()
    );

    // Cleared by its owner: the plan resumes on its own (retried every 30 s).
    services.delete("rpc", &Default::default()).await.unwrap();
    let (_, resumed) = common::poll(
        Duration::from_secs(90),
        || async { api.get("rpc").await.unwrap() },
        |n| {
            n.status
                .as_ref()
                .and_then(|s| s.plan.as_ref())
                .is_some_and(|p| {
                    p.phase == PlanPhase::Active && p.tasks[0].status == TaskStatus::Complete
                })
                || phase(n) == Some(SeiNodePhase::Running)
        },
    )
    .await;
    assert!(resumed, "the plan did not resume once the Service was gone");
    let running = bring_to_running(&client, &api, &ns, "rpc").await;
    assert_eq!(running.status.unwrap().plan.unwrap().id, "init-1");
    let ours = services.get("rpc").await.unwrap();
    assert_eq!(
        ours.metadata.owner_references.unwrap()[0].uid,
        running.metadata.uid.unwrap()
    );
}

/// The API server stores a StatefulSet's quantities in its canonical form (`1024Mi` as `1Gi`);
/// sidecar resources written in another notation must not make the applied StatefulSet look
/// edited, which would hold the node's init plan at AwaitStatefulSetReady for good.
#[tokio::test]
async fn sidecar_resources_in_any_notation_let_the_node_run() {
    let (client, ns) = setup("ctl-quantities").await;
    let mut spec = serde_json::to_value(node(&ns, "rpc", None)).unwrap();
    spec["spec"]["sidecar"] = json!({"resources": {
        "limits": {"memory": "1024Mi", "cpu": "0.5"},
        "requests": {"memory": "0.25Gi", "cpu": "100m"},
    }});
    let api = create_node(&client, &serde_json::from_value(spec).unwrap()).await;
    let running = bring_to_running(&client, &api, &ns, "rpc").await;
    let plan = running.status.unwrap().plan.unwrap();
    assert_eq!(
        (plan.id.as_str(), plan.phase),
        ("init-1", PlanPhase::Complete)
    );
    // The notations did differ: the API server rewrote them.
    let sts: Api<StatefulSet> = Api::namespaced(client.clone(), &ns);
    let stored = sts.get("rpc").await.unwrap();
    let limits = stored
        .spec
        .unwrap()
        .template
        .spec
        .unwrap()
        .init_containers
        .into_iter()
        .flatten()
        .find_map(|c| c.resources?.limits)
        .unwrap();
    assert_eq!(limits["memory"].0, "1Gi");
    assert_eq!(limits["cpu"].0, "500m");
}

#[tokio::test]
async fn objects_of_a_running_node_that_are_deleted_or_edited_are_restored() {
    let (client, ns) = setup("ctl-drift").await;
    let api = create_node(&client, &node(&ns, "rpc", None)).await;
    bring_to_running(&client, &api, &ns, "rpc").await;
    let plan_id = |n: &SeiNode| {
        n.status
            .as_ref()
            .and_then(|s| s.plan.as_ref())
            .map(|p| (p.id.clone(), p.phase))
    };

    // Deleted: recreated by a repair plan.
    let services: Api<Service> = Api::namespaced(client.clone(), &ns);
    services.delete("rpc", &Default::default()).await.unwrap();
    let repaired = wait_node(&api, "rpc", "a completed repair plan", |n| {
        plan_id(n) == Some(("repair-1".to_owned(), PlanPhase::Complete))
    })
    .await;
    assert_eq!(phase(&repaired), Some(SeiNodePhase::Running));
    assert!(services.get_opt("rpc").await.unwrap().is_some());

    // Edited (scaled to zero by hand): put back as applied.
    let sts: Api<StatefulSet> = Api::namespaced(client.clone(), &ns);
    sts.patch(
        "rpc",
        &PatchParams::default(),
        &Patch::Merge(json!({"spec": {"replicas": 0}})),
    )
    .await
    .unwrap();
    let (last, restored) = common::poll(
        WAIT,
        || async { sts.get("rpc").await.unwrap() },
        |s| s.spec.as_ref().and_then(|s| s.replicas) == Some(1),
    )
    .await;
    assert!(
        restored,
        "replicas not restored: {:?}",
        last.spec.and_then(|s| s.replicas)
    );
    // The pod is replaced: the old one stops first (seictl drains for up to 25 s on SIGTERM),
    // then the new one starts and is marked ready.
    let (node, running) = common::poll(
        REPLACED_POD_WAIT,
        || async { api.get("rpc").await.unwrap() },
        |n| {
            phase(n) == Some(SeiNodePhase::Running)
                && plan_id(n).is_some_and(|(_, phase)| phase == PlanPhase::Complete)
        },
    )
    .await;
    assert!(
        running,
        "not Running again after the repair: {:#?}",
        node.status
    );
}

/// An upgrade from the first pod contract: objects without the sidecar-contract annotation
/// (what the previous controller applied) are repaired at once, not left until the next image
/// change, and the node is Running and its sidecar ready again on the new template.
#[tokio::test]
async fn objects_of_the_previous_sidecar_contract_are_rolled_onto_the_new_pod() {
    let (client, ns) = setup("ctl-contract").await;
    let leaf = valid_cert(&ns, "rpc");
    put_secret(
        &client,
        &secret(&ns, "rpc-tls", &leaf.cert_pem, &leaf.key_pem),
    )
    .await;
    let api = create_node(&client, &node(&ns, "rpc", Some("rpc-tls"))).await;
    bring_to_running(&client, &api, &ns, "rpc").await;

    // As the previous controller left them: no contract annotation, another template digest.
    let old = json!({"metadata": {"annotations": {
        "seinode-tls.sei.io/sidecar-contract": null,
        "seinode-tls.sei.io/template-hash": "0123456789abcdef",
    }}});
    let sts: Api<StatefulSet> = Api::namespaced(client.clone(), &ns);
    let cms: Api<ConfigMap> = Api::namespaced(client.clone(), &ns);
    sts.patch("rpc", &PatchParams::default(), &Patch::Merge(&old))
        .await
        .unwrap();
    cms.patch(
        "rpc-rbac-proxy-config",
        &PatchParams::default(),
        &Patch::Merge(&old),
    )
    .await
    .unwrap();

    let contract = |meta: &kube::api::ObjectMeta| {
        meta.annotations
            .as_ref()
            .and_then(|a| a.get("seinode-tls.sei.io/sidecar-contract").cloned())
    };
    let (last, restored) = common::poll(
        WAIT,
        || async {
            (
                sts.get("rpc").await.unwrap(),
                cms.get("rpc-rbac-proxy-config").await.unwrap(),
            )
        },
        |(s, c)| contract(&s.metadata).is_some() && contract(&c.metadata).is_some(),
    )
    .await;
    assert!(
        restored,
        "not re-applied: {:?}",
        (last.0.metadata.annotations, last.1.metadata.annotations)
    );
    // Each object is repaired as its drift is seen (one plan or two), then the node runs on.
    wait_node(&api, "rpc", "Running on a completed repair plan", |n| {
        let plan = n.status.as_ref().and_then(|s| s.plan.as_ref());
        phase(n) == Some(SeiNodePhase::Running)
            && plan.is_some_and(|p| p.id.starts_with("repair-") && p.phase == PlanPhase::Complete)
    })
    .await;
    let failed = events(&client, &ns, "PlanFailed").await;
    assert!(failed.is_empty(), "{failed:?}");
}
