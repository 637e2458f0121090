//! The one-machine cluster itself: the real StatefulSet controller, scheduler and garbage
//! collector, and the process kubelet running Pods from their specs (probes, restarts with
//! back-off, volumes updated in place, projected tokens), and the API server calling a webhook
//! through a Service's endpoints. Each test can fail: it looks at what runs, from inside the
//! container where it matters (`nsenter` into the container's mount namespace and root).

#![allow(clippy::expect_used, clippy::unwrap_used)]

mod common;

use std::time::Duration;

use base64::Engine;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use k8s_openapi::api::apps::v1::StatefulSet;
use k8s_openapi::api::authentication::v1::{TokenReview, TokenReviewSpec};
use k8s_openapi::api::core::v1::{ConfigMap, Pod, Secret, Service};
use kube::Client;
use kube::api::{Api, DeleteParams, Patch, PatchParams, PostParams};
use seinode_tls_crds::SeiNode;
use seinode_tls_crds::contract::{DEFAULT_CLUSTER_DOMAIN, required_dns_names};
use seinode_tls_devcluster::cluster::{PROJECT_IMAGE, SEID_IMAGE, SIDECAR_IMAGE};

const TIMEOUT: Duration = Duration::from_secs(90);

/// `kubectl apply --server-side` of `yaml` in `ns`.
fn apply(ns: &str, yaml: &str) {
    let out = common::kubectl(
        &[
            "apply",
            "--server-side",
            "--field-manager=test",
            "-n",
            ns,
            "-f",
            "-",
        ],
        yaml,
    );
    assert!(
        out.status.success(),
        "kubectl apply: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// Waits until Pod `name` satisfies `check`; panics with the Pod's status otherwise.
async fn wait_pod(
    client: &Client,
    ns: &str,
    name: &str,
    what: &str,
    check: impl Fn(&Pod) -> bool,
) -> Pod {
    let api: Api<Pod> = Api::namespaced(client.clone(), ns);
    let (pod, ok) = common::poll(
        TIMEOUT,
        || async { api.get_opt(name).await.ok().flatten() },
        |pod| pod.as_ref().is_some_and(&check),
    )
    .await;
    assert!(
        ok,
        "Pod {ns}/{name} never {what}: {:#?}",
        pod.and_then(|p| p.status)
    );
    pod.unwrap()
}

fn ready(pod: &Pod) -> bool {
    pod.status
        .as_ref()
        .and_then(|s| s.conditions.as_ref())
        .is_some_and(|c| c.iter().any(|c| c.type_ == "Ready" && c.status == "True"))
}

fn running(pod: &Pod) -> bool {
    pod.status
        .as_ref()
        .and_then(|s| s.container_statuses.as_ref())
        .is_some_and(|cs| {
            !cs.is_empty()
                && cs
                    .iter()
                    .all(|c| c.state.as_ref().and_then(|s| s.running.as_ref()).is_some())
        })
}

/// Process id of `container` in `pod` (the kubelet reports `devcluster://<pid>`).
fn container_pid(pod: &Pod, container: &str) -> String {
    let status = pod.status.as_ref().unwrap();
    // Native sidecars (the node's seictl and kube-rbac-proxy) report as init containers.
    let status = status
        .container_statuses
        .iter()
        .chain(&status.init_container_statuses)
        .flatten()
        .find(|c| c.name == container)
        .unwrap_or_else(|| panic!("no status of container {container}"));
    let id = status.container_id.as_deref().expect("a container id");
    id.strip_prefix("devcluster://")
        .expect("devcluster://<pid>")
        .to_owned()
}

/// Runs `args` inside the container's mount namespace and root, as `kubectl exec` would.
fn exec(pid: &str, args: &[&str]) -> String {
    let out = std::process::Command::new("nsenter")
        .args(["-t", pid, "-m", "-r", "--"])
        .args(args)
        .output()
        .expect("run nsenter");
    assert!(
        out.status.success(),
        "{args:?} in container: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

#[tokio::test(flavor = "multi_thread")]
async fn a_stateful_sets_pod_is_scheduled_runs_and_becomes_ready_through_its_probes() {
    let client = common::client().await;
    let ns = common::namespace(&client, "cluster-sts").await;
    apply(
        &ns,
        &format!(
            r#"
apiVersion: apps/v1
kind: StatefulSet
metadata: {{name: web}}
spec:
  serviceName: web
  replicas: 1
  selector: {{matchLabels: {{app: web}}}}
  template:
    metadata: {{labels: {{app: web}}}}
    spec:
      containers:
      - name: sidecar
        image: {SIDECAR_IMAGE}:v1
        # What seictl serve will not start without.
        env:
        - {{name: SEI_CHAIN_ID, value: arctic-1}}
        - {{name: SEI_GENESIS_BUCKET, value: test-genesis}}
        - {{name: SEI_GENESIS_REGION, value: local}}
        - {{name: SEI_SNAPSHOT_BUCKET, value: test-snapshots}}
        - {{name: SEI_SNAPSHOT_REGION, value: local}}
        ports: [{{name: http, containerPort: 7777}}]
        readinessProbe: {{httpGet: {{path: /v0/livez, port: http}}, periodSeconds: 1}}
        livenessProbe: {{tcpSocket: {{port: 7777}}, periodSeconds: 2}}
"#
        ),
    );
    common::wait_stateful_set_ready(&client, &ns, "web").await;
    let pod = wait_pod(&client, &ns, "web-0", "became Ready", ready).await;
    let status = pod.status.unwrap();
    assert_eq!(
        pod.spec.unwrap().node_name.as_deref(),
        Some("devcluster"),
        "bound by the scheduler"
    );
    assert_eq!(status.phase.as_deref(), Some("Running"));
    let ip = status.pod_ip.expect("a Pod address");
    assert!(ip.starts_with("198.18."), "{ip}");
    // The sidecar stand-in really serves in the Pod's network namespace (unauthenticated mode:
    // every interface; not ready until mark-ready).
    assert_eq!(
        common::http_status(&format!("http://{ip}:7777/v0/livez"), &[]),
        "200"
    );
    assert_eq!(
        common::http_status(&format!("http://{ip}:7777/v0/healthz"), &[]),
        "503"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn a_crashing_container_shows_crash_loop_back_off_with_a_growing_restart_count() {
    let client = common::client().await;
    let ns = common::namespace(&client, "cluster-crash").await;
    apply(
        &ns,
        &format!(
            r#"
apiVersion: v1
kind: Pod
metadata: {{name: crash}}
spec:
  containers:
  - name: app
    image: {PROJECT_IMAGE}:v1
    args: [no-such-command]
"#
        ),
    );
    let restarts = |p: &Pod| {
        p.status
            .as_ref()
            .and_then(|s| s.container_statuses.as_ref())
            .and_then(|c| c.first())
            .map_or(0, |c| c.restart_count)
    };
    let pod = wait_pod(&client, &ns, "crash", "restarted twice", |p| {
        restarts(p) >= 2
    })
    .await;
    let status = &pod
        .status
        .as_ref()
        .unwrap()
        .container_statuses
        .as_ref()
        .unwrap()[0];
    let last = status
        .last_state
        .as_ref()
        .and_then(|s| s.terminated.as_ref())
        .expect("last state terminated");
    assert_eq!(last.exit_code, 2, "seinode-tls' usage error exit code");
    // What a person sees.
    let mut table = String::new();
    let seen = common::wait_until(TIMEOUT, || {
        let out = common::kubectl(&["get", "pod", "crash", "-n", &ns], "");
        table = String::from_utf8_lossy(&out.stdout).into_owned();
        table.contains("CrashLoopBackOff")
    });
    assert!(seen, "kubectl get pod shows CrashLoopBackOff:\n{table}");
}

#[tokio::test(flavor = "multi_thread")]
async fn a_changed_secret_reaches_the_mounted_file_through_an_atomic_swap() {
    let client = common::client().await;
    let ns = common::namespace(&client, "cluster-secret").await;
    apply(
        &ns,
        &format!(
            r#"
apiVersion: v1
kind: Secret
metadata: {{name: greeting}}
stringData: {{message: hello}}
---
apiVersion: v1
kind: Pod
metadata: {{name: reader}}
spec:
  containers:
  - name: seid
    image: {SEID_IMAGE}:v1
    command: [seid, start, --home, /sei]
    volumeMounts: [{{name: greeting, mountPath: /etc/greeting, readOnly: true}}, {{name: home, mountPath: /sei}}]
  volumes:
  - {{name: greeting, secret: {{secretName: greeting, defaultMode: 0440}}}}
  - {{name: home, emptyDir: {{}}}}
"#
        ),
    );
    let pod = wait_pod(&client, &ns, "reader", "ran", running).await;
    let pid = container_pid(&pod, "seid");
    assert_eq!(exec(&pid, &["cat", "/etc/greeting/message"]), "hello");
    assert!(
        exec(&pid, &["readlink", "/etc/greeting/..data"]).starts_with(".."),
        "..data is a symlink to a timestamped directory"
    );

    let secrets: Api<Secret> = Api::namespaced(client.clone(), &ns);
    secrets
        .patch(
            "greeting",
            &PatchParams::default(),
            &Patch::Merge(serde_json::json!({"stringData": {"message": "world"}})),
        )
        .await
        .unwrap();
    let mut seen = String::new();
    let updated = common::wait_until(TIMEOUT, || {
        seen = exec(&pid, &["cat", "/etc/greeting/message"]);
        seen == "world"
    });
    assert!(updated, "the mounted file still says {seen:?}");
}

#[tokio::test(flavor = "multi_thread")]
async fn a_projected_token_carries_the_audience_asked_for_and_is_bound_to_its_pod() {
    let client = common::client().await;
    let ns = common::namespace(&client, "cluster-token").await;
    apply(
        &ns,
        &format!(
            r#"
apiVersion: v1
kind: Pod
metadata: {{name: tok}}
spec:
  containers:
  - name: seid
    image: {SEID_IMAGE}:v1
    command: [seid, start, --home, /tmp]
    volumeMounts: [{{name: token, mountPath: /var/run/secrets/tokens}}]
  volumes:
  - name: token
    projected:
      sources:
      - serviceAccountToken: {{audience: devcluster-test, expirationSeconds: 600, path: token}}
"#
        ),
    );
    let pod = wait_pod(&client, &ns, "tok", "ran", running).await;
    let token = exec(
        &container_pid(&pod, "seid"),
        &["cat", "/var/run/secrets/tokens/token"],
    );
    let payload = token.split('.').nth(1).expect("a JWT");
    let claims: serde_json::Value =
        serde_json::from_slice(&URL_SAFE_NO_PAD.decode(payload).unwrap()).unwrap();
    assert_eq!(
        claims["aud"],
        serde_json::json!(["devcluster-test"]),
        "{claims}"
    );
    assert_eq!(claims["kubernetes.io"]["pod"]["name"], "tok", "{claims}");

    // The API server accepts it for that audience only.
    let reviews: Api<TokenReview> = Api::all(client.clone());
    let review = |audience: &str| TokenReview {
        spec: TokenReviewSpec {
            token: token.clone(),
            audiences: Some(vec![audience.to_owned()]),
        },
        ..TokenReview::default()
    };
    let ok = reviews
        .create(&PostParams::default(), &review("devcluster-test"))
        .await
        .unwrap();
    assert_eq!(ok.status.and_then(|s| s.authenticated), Some(true));
    let other = reviews
        .create(&PostParams::default(), &review("another"))
        .await
        .unwrap();
    assert_ne!(other.status.and_then(|s| s.authenticated), Some(true));
}

/// Creates a TLS SeiNode `name` with a Secret that meets its contract, and waits until its Pod
/// runs (the controller, the StatefulSet controller, the scheduler and the kubelet all at work).
async fn run_tls_node(client: &Client, ns: &str, name: &str) -> Pod {
    let names = required_dns_names(name, ns, DEFAULT_CLUSTER_DOMAIN);
    let dns: Vec<&str> = names.iter().map(String::as_str).collect();
    let leaf = common::control_plane()
        .issue_serving_certificate(name, &dns)
        .unwrap();
    let secret_name = format!("{name}-tls");
    let secret =
        seinode_tls_testkit::tls_secret(ns, &secret_name, &leaf.cert_pem, &leaf.key_pem, None);
    Api::<Secret>::namespaced(client.clone(), ns)
        .create(&PostParams::default(), &secret)
        .await
        .unwrap();
    apply(
        ns,
        &format!(
            r#"
apiVersion: sei.io/v1alpha1
kind: SeiNode
metadata: {{name: {name}}}
spec:
  chainId: arctic-1
  image: ghcr.io/sei-protocol/sei:v6.3.0
  fullNode: {{}}
  sidecar: {{tls: {{secretName: {secret_name}}}}}
"#
        ),
    );
    common::wait_stateful_set_ready(client, ns, name).await;
    wait_pod(client, ns, &format!("{name}-0"), "ran", running).await
}

#[tokio::test(flavor = "multi_thread")]
async fn a_tls_node_pod_gives_a_service_account_token_to_kube_rbac_proxy_alone() {
    let client = common::client().await;
    common::controller();
    let ns = common::namespace(&client, "cluster-token-scope").await;
    let pod = run_tls_node(&client, &ns, "scoped").await;
    let token = "/var/run/secrets/kubernetes.io/serviceaccount/token";
    for container in ["seid", "sei-sidecar"] {
        let pid = container_pid(&pod, container);
        let out = std::process::Command::new("nsenter")
            .args(["-t", &pid, "-m", "-r", "--", "test", "-e", token])
            .status()
            .unwrap();
        assert!(!out.success(), "{container} has no ServiceAccount token");
    }
    let proxy = exec(&container_pid(&pod, "kube-rbac-proxy"), &["cat", token]);
    assert_eq!(
        proxy.split('.').count(),
        3,
        "kube-rbac-proxy has its token (a JWT)"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn deleting_a_seinode_garbage_collects_its_service_config_map_stateful_set_and_pod() {
    let client = common::client().await;
    common::controller();
    let ns = common::namespace(&client, "cluster-gc").await;
    run_tls_node(&client, &ns, "gc").await;

    Api::<SeiNode>::namespaced(client.clone(), &ns)
        .delete("gc", &DeleteParams::default())
        .await
        .unwrap();
    let services: Api<Service> = Api::namespaced(client.clone(), &ns);
    let maps: Api<ConfigMap> = Api::namespaced(client.clone(), &ns);
    let sets: Api<StatefulSet> = Api::namespaced(client.clone(), &ns);
    let pods: Api<Pod> = Api::namespaced(client.clone(), &ns);
    let (left, gone) = common::poll(
        TIMEOUT,
        || async {
            let mut left = Vec::new();
            if services.get_opt("gc").await.unwrap().is_some() {
                left.push("Service gc");
            }
            if maps
                .get_opt("gc-rbac-proxy-config")
                .await
                .unwrap()
                .is_some()
            {
                left.push("ConfigMap gc-rbac-proxy-config");
            }
            if sets.get_opt("gc").await.unwrap().is_some() {
                left.push("StatefulSet gc");
            }
            if pods.get_opt("gc-0").await.unwrap().is_some() {
                left.push("Pod gc-0");
            }
            left
        },
        Vec::is_empty,
    )
    .await;
    assert!(gone, "still there: {left:?}");
}

#[tokio::test(flavor = "multi_thread")]
async fn the_api_server_calls_a_webhook_registered_by_service_at_its_endpoints() {
    use seinode_tls_webhook::registration::{Endpoint, mutating_configuration};
    let client = common::client().await;
    let ns = common::namespace(&client, "cluster-webhook").await;
    let cp = common::control_plane();
    let service_name = format!("webhook.{ns}.svc");
    let serving = cp
        .issue_serving_certificate("webhook", &[service_name.as_str()])
        .unwrap();
    let secret = seinode_tls_testkit::tls_secret(
        &ns,
        "webhook-tls",
        &serving.cert_pem,
        &serving.key_pem,
        None,
    );
    Api::<Secret>::namespaced(client.clone(), &ns)
        .create(&PostParams::default(), &secret)
        .await
        .unwrap();
    // The webhook's caches list Secrets and SeiNodes cluster-wide as its ServiceAccount.
    apply(
        &ns,
        &format!(
            r#"
apiVersion: v1
kind: ServiceAccount
metadata: {{name: webhook}}
---
apiVersion: rbac.authorization.k8s.io/v1
kind: ClusterRoleBinding
metadata: {{name: {ns}-webhook}}
roleRef: {{apiGroup: rbac.authorization.k8s.io, kind: ClusterRole, name: view-for-webhook-{ns}}}
subjects: [{{kind: ServiceAccount, name: webhook, namespace: {ns}}}]
---
apiVersion: rbac.authorization.k8s.io/v1
kind: ClusterRole
metadata: {{name: view-for-webhook-{ns}}}
rules:
- {{apiGroups: [""], resources: [secrets], verbs: [get, list, watch]}}
- {{apiGroups: [sei.io], resources: [seinodes], verbs: [get, list, watch]}}
---
apiVersion: v1
kind: Service
metadata: {{name: webhook}}
spec:
  selector: {{app: webhook}}
  ports: [{{port: 443, targetPort: 8443}}]
---
apiVersion: v1
kind: Pod
metadata: {{name: webhook, labels: {{app: webhook}}}}
spec:
  serviceAccountName: webhook
  containers:
  - name: webhook
    image: {PROJECT_IMAGE}:v1
    args: [webhook, --listen-addr=0.0.0.0:8443, --health-addr=0.0.0.0:8080, --tls-cert-file=/tls/tls.crt, --tls-key-file=/tls/tls.key]
    ports: [{{containerPort: 8443}}, {{name: health, containerPort: 8080}}]
    readinessProbe: {{httpGet: {{path: /readyz, port: health}}, periodSeconds: 1}}
    volumeMounts: [{{name: tls, mountPath: /tls, readOnly: true}}]
  volumes:
  - {{name: tls, secret: {{secretName: webhook-tls}}}}
"#
        ),
    );
    wait_pod(&client, &ns, "webhook", "became Ready", ready).await;

    let endpoint = Endpoint::Service {
        namespace: ns.clone(),
        name: "webhook".to_owned(),
        port: 443,
    };
    let mut registration = mutating_configuration(
        &endpoint,
        cp.ca().cert_pem().as_bytes(),
        &[],
        &seinode_tls_kube::watch::WatchScope::Cluster,
    );
    registration.metadata.name = Some(format!("{ns}-by-service"));
    for hook in registration.webhooks.iter_mut().flatten() {
        hook.namespace_selector = Some(
            k8s_openapi::apimachinery::pkg::apis::meta::v1::LabelSelector {
                match_labels: Some([("kubernetes.io/metadata.name".to_owned(), ns.clone())].into()),
                ..Default::default()
            },
        );
    }
    seinode_tls_devcluster::control_plane::apply(&Api::all(client.clone()), &registration)
        .await
        .unwrap();

    // A server-side dry run of a TLS SeiNode comes back with the annotation only the webhook adds.
    let node: SeiNode = serde_json::from_value(serde_json::json!({
        "apiVersion": "sei.io/v1alpha1", "kind": "SeiNode",
        "metadata": {"name": "probe", "namespace": ns},
        "spec": {"chainId": "arctic-1", "image": "ghcr.io/sei-protocol/sei:v6.3.0", "fullNode": {},
                 "sidecar": {"tls": {"secretName": "probe-tls"}}},
    }))
    .unwrap();
    let nodes: Api<SeiNode> = Api::namespaced(client.clone(), &ns);
    let params = PostParams {
        dry_run: true,
        ..Default::default()
    };
    let (created, called) = common::poll(
        TIMEOUT,
        || async { nodes.create(&params, &node).await },
        |r| {
            r.as_ref().is_ok_and(|n| {
                n.metadata.annotations.as_ref().is_some_and(|a| {
                    a.contains_key(seinode_tls_crds::contract::REQUIRED_DNS_NAMES_ANNOTATION)
                })
            })
        },
    )
    .await;
    assert!(
        called,
        "the webhook Pod was not called through Service {ns}/webhook: {created:?}"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn during_a_webhook_outage_seinode_edits_other_than_tls_still_go_through() {
    use seinode_tls_webhook::registration::{
        Endpoint, mutating_configuration, validating_configuration,
    };
    let client = common::client().await;
    let ns = common::namespace(&client, "cluster-outage").await;
    apply(
        &ns,
        r#"
apiVersion: sei.io/v1alpha1
kind: SeiNode
metadata: {name: rpc}
spec:
  chainId: arctic-1
  image: ghcr.io/sei-protocol/sei:v6.3.0
  fullNode: {}
  sidecar: {tls: {secretName: rpc-tls}}
"#,
    );
    // The webhooks are registered for this namespace at an address where nothing answers.
    let endpoint = Endpoint::Url("https://127.0.0.1:1".to_owned());
    let ca = common::control_plane().ca().cert_pem();
    let only_here = k8s_openapi::apimachinery::pkg::apis::meta::v1::LabelSelector {
        match_labels: Some([("kubernetes.io/metadata.name".to_owned(), ns.clone())].into()),
        ..Default::default()
    };
    let mut validating = validating_configuration(
        &endpoint,
        ca.as_bytes(),
        &[],
        &seinode_tls_kube::watch::WatchScope::Cluster,
    );
    validating.metadata.name = Some(format!("{ns}-outage"));
    for hook in validating.webhooks.iter_mut().flatten() {
        hook.namespace_selector = Some(only_here.clone());
    }
    let mut mutating = mutating_configuration(
        &endpoint,
        ca.as_bytes(),
        &[],
        &seinode_tls_kube::watch::WatchScope::Cluster,
    );
    mutating.metadata.name = Some(format!("{ns}-outage"));
    for hook in mutating.webhooks.iter_mut().flatten() {
        hook.namespace_selector = Some(only_here.clone());
    }
    seinode_tls_devcluster::control_plane::apply(&Api::all(client.clone()), &validating)
        .await
        .unwrap();
    seinode_tls_devcluster::control_plane::apply(&Api::all(client.clone()), &mutating)
        .await
        .unwrap();

    // The registration is live: a CREATE fails closed...
    let (created, fails) = common::poll(
        TIMEOUT,
        || async {
            common::kubectl(&["create", "-n", &ns, "-f", "-"], r#"{"apiVersion":"sei.io/v1alpha1","kind":"SeiNode","metadata":{"name":"new"},"spec":{"chainId":"arctic-1","image":"ghcr.io/sei-protocol/sei:v6.3.0","fullNode":{}}}"#)
        },
        |out| !out.status.success(),
    )
    .await;
    assert!(fails, "{}", String::from_utf8_lossy(&created.stdout));
    // ...but a label edit and a spec edit outside spec.sidecar.tls do not wait on the webhook,
    let out = common::kubectl(&["label", "snode", "rpc", "-n", &ns, "team=sre"], "");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let out = common::patch_seinode(
        &ns,
        "rpc",
        r#"{"spec":{"image":"ghcr.io/sei-protocol/sei:v6.3.1"}}"#,
    );
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    // ...while an edit of spec.sidecar.tls is still refused.
    let out = common::patch_seinode(
        &ns,
        "rpc",
        r#"{"spec":{"sidecar":{"tls":{"secretName":"other"}}}}"#,
    );
    assert!(!out.status.success(), "the TLS edit went through");
    for kind in [
        "validatingwebhookconfiguration",
        "mutatingwebhookconfiguration",
    ] {
        common::kubectl(&["delete", kind, &format!("{ns}-outage")], "");
    }
}
