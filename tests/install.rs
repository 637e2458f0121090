//! The chart as an operator installs it, running: `helm install` of the unchanged chart with a
//! serving certificate and a sidecar client certificate of our own, its two replicas running as
//! Pods under the process kubelet, the API server calling the webhook through the chart's
//! Service, a TLS SeiNode reaching `Running` with `SidecarReady=True` from the controller inside
//! its Pod (which submits the sidecar's tasks through the node's kube-rbac-proxy with that client
//! certificate), and `helm uninstall` leaving nothing that blocks SeiNode edits.

#![allow(clippy::expect_used, clippy::unwrap_used)]

mod common;

use std::path::PathBuf;
use std::time::Duration;

use k8s_openapi::api::apps::v1::Deployment;
use k8s_openapi::api::coordination::v1::Lease;
use k8s_openapi::api::core::v1::Secret;
use kube::api::{Api, PostParams};
use seinode_tls_crds::SeiNode;
use seinode_tls_crds::contract::{
    DEFAULT_CLUSTER_DOMAIN, REQUIRED_DNS_NAMES_ANNOTATION, required_dns_names,
};
use seinode_tls_testkit::{CertificateAuthority, LeafSpec};

const RELEASE: &str = "seinode-tls";
const RELEASE_NS: &str = "seinode-tls-system";
/// The chart's default `sidecarClient.user`: the CommonName of the controller's client
/// certificate, which the chart binds to its sidecar-client ClusterRole.
const SIDECAR_CLIENT_USER: &str = "seinode-tls:sidecar-client";
/// The Secret holding that certificate (`sidecarClient.secretName`).
const SIDECAR_CLIENT_SECRET: &str = "seinode-tls-sidecar-client";
/// The node pods' ServiceAccount (`controller.nodeServiceAccount`), bound to
/// `system:auth-delegator` in each node namespace as `examples/sidecar-rbac.yaml` shows.
const NODE_SERVICE_ACCOUNT: &str = "sei-node";
const WAIT: Duration = Duration::from_secs(120);

fn text(bytes: &[u8]) -> String {
    String::from_utf8_lossy(bytes).into_owned()
}

fn pods_table() -> String {
    text(&common::kubectl(&["get", "pods", "-A", "-o", "wide"], "").stdout)
}

/// The controller's client certificate for the node proxies, as docs/operations.md has one
/// provide it without cert-manager: a CA of its own (not one the API server trusts for client
/// certificates), a leaf with CommonName `sidecarClient.user` and extendedKeyUsage clientAuth,
/// and a `kubernetes.io/tls` Secret with `tls.crt`, `tls.key` and the CA as `ca.crt`.
async fn create_sidecar_client_secret(client: &kube::Client) {
    let ca = CertificateAuthority::new("seinode-tls sidecar client CA").unwrap();
    let leaf = ca
        .issue(&LeafSpec {
            common_name: SIDECAR_CLIENT_USER,
            client: true,
            ..LeafSpec::default()
        })
        .unwrap();
    let secret = seinode_tls_testkit::tls_secret(
        RELEASE_NS,
        SIDECAR_CLIENT_SECRET,
        &leaf.cert_pem,
        &leaf.key_pem,
        Some(&ca.cert_pem()),
    );
    Api::<Secret>::namespaced(client.clone(), RELEASE_NS)
        .create(&PostParams::default(), &secret)
        .await
        .unwrap();
}

/// What the node pods of namespace `ns` need for kube-rbac-proxy (docs/operations.md,
/// `examples/sidecar-rbac.yaml`): their ServiceAccount, bound to `system:auth-delegator` so the
/// proxy may ask for the TokenReviews and SubjectAccessReviews of its callers.
fn create_node_service_account(ns: &str) {
    let yaml = format!(
        "apiVersion: v1\nkind: ServiceAccount\nmetadata:\n  name: {NODE_SERVICE_ACCOUNT}\n  namespace: {ns}\n\
         ---\napiVersion: rbac.authorization.k8s.io/v1\nkind: ClusterRoleBinding\nmetadata:\n  name: {ns}-{NODE_SERVICE_ACCOUNT}-auth-delegator\n\
         subjects:\n  - kind: ServiceAccount\n    name: {NODE_SERVICE_ACCOUNT}\n    namespace: {ns}\n\
         roleRef:\n  apiGroup: rbac.authorization.k8s.io\n  kind: ClusterRole\n  name: system:auth-delegator\n"
    );
    let out = common::kubectl(&["apply", "--server-side", "-f", "-"], &yaml);
    assert!(out.status.success(), "{}", text(&out.stderr));
}

/// The install steps of docs/operations.md for certificates of one's own: the namespace, a
/// `kubernetes.io/tls` Secret for the Service's name, the sidecar client certificate's Secret,
/// and the chart with the CA.
async fn install(client: &kube::Client, ca: &CertificateAuthority) {
    let out = common::kubectl(&["create", "namespace", RELEASE_NS], "");
    assert!(out.status.success(), "{}", text(&out.stderr));
    let service = format!("{RELEASE}.{RELEASE_NS}.svc");
    let serving = ca
        .issue(&LeafSpec {
            common_name: &service,
            dns_names: &[service.as_str()],
            server: true,
            ..LeafSpec::default()
        })
        .unwrap();
    let secret = seinode_tls_testkit::tls_secret(
        RELEASE_NS,
        "seinode-tls-webhook",
        &serving.cert_pem,
        &serving.key_pem,
        None,
    );
    Api::<Secret>::namespaced(client.clone(), RELEASE_NS)
        .create(&PostParams::default(), &secret)
        .await
        .unwrap();
    create_sidecar_client_secret(client).await;
    let ca_file: PathBuf = common::scratch_path("install-ca.pem");
    std::fs::write(&ca_file, ca.cert_pem()).unwrap();
    let chart = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("charts/seinode-tls");
    let out = common::helm(&[
        "install",
        RELEASE,
        chart.to_str().unwrap(),
        "--namespace",
        RELEASE_NS,
        "--set",
        "tls.certManager.enabled=false",
        "--set",
        "tls.secretName=seinode-tls-webhook",
        "--set-file",
        &format!("tls.caBundle={}", ca_file.display()),
        "--set",
        &format!("sidecarClient.secretName={SIDECAR_CLIENT_SECRET}"),
        "--set",
        &format!("controller.nodeServiceAccount={NODE_SERVICE_ACCOUNT}"),
        // seictl serve does not start without them.
        "--set",
        "controller.sidecarPlatform.genesisBucket=test-genesis",
        "--set",
        "controller.sidecarPlatform.genesisRegion=local",
        "--set",
        "controller.sidecarPlatform.snapshotBucket=test-snapshots",
        "--set",
        "controller.sidecarPlatform.snapshotRegion=local",
        "--wait",
        "--timeout",
        "3m",
    ]);
    assert!(
        out.status.success(),
        "helm install: {}{}\n{}",
        text(&out.stdout),
        text(&out.stderr),
        pods_table()
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn the_installed_chart_runs_admits_reconciles_and_uninstalls_cleanly() {
    let client = common::client().await;
    let ca = CertificateAuthority::new("operator's CA").unwrap();
    install(&client, &ca).await;

    // Both replicas run and pass /readyz; one of them holds the Lease.
    let deployments: Api<Deployment> = Api::namespaced(client.clone(), RELEASE_NS);
    let (deployment, ready) = common::poll(
        WAIT,
        || async { deployments.get(RELEASE).await.unwrap() },
        |d| d.status.as_ref().and_then(|s| s.ready_replicas) == Some(2),
    )
    .await;
    assert!(ready, "{:?}\n{}", deployment.status, pods_table());
    let leases: Api<Lease> = Api::namespaced(client.clone(), RELEASE_NS);
    let (holder, held) = common::poll(
        WAIT,
        || async {
            leases
                .get_opt(RELEASE)
                .await
                .unwrap()
                .and_then(|l| l.spec)
                .and_then(|s| s.holder_identity)
        },
        |h| {
            h.as_deref()
                .is_some_and(|h| h.starts_with(&format!("{RELEASE}-")))
        },
    )
    .await;
    assert!(held, "the Lease is held by a replica: {holder:?}");

    // The API server calls the chart's webhooks through its Service: a server-side dry run of
    // a TLS SeiNode comes back with the mutating webhook's annotation.
    let ns = common::namespace(&client, "install").await;
    let names = required_dns_names("rpc", &ns, DEFAULT_CLUSTER_DOMAIN);
    let node: SeiNode = serde_json::from_value(serde_json::json!({
        "apiVersion": "sei.io/v1alpha1", "kind": "SeiNode",
        "metadata": {"name": "rpc", "namespace": ns},
        "spec": {"chainId": "arctic-1", "image": "ghcr.io/sei-protocol/sei:v6.3.0", "fullNode": {},
                 "sidecar": {"tls": {"secretName": "rpc-sidecar-tls"}}},
    }))
    .unwrap();
    let nodes: Api<SeiNode> = Api::namespaced(client.clone(), &ns);
    let dry_run = PostParams {
        dry_run: true,
        ..PostParams::default()
    };
    let created = nodes.create(&dry_run, &node).await.unwrap();
    assert_eq!(
        created
            .metadata
            .annotations
            .unwrap_or_default()
            .get(REQUIRED_DNS_NAMES_ANNOTATION),
        Some(&names.join(","))
    );

    // A TLS node reaches Running: the controller in its Pod submits the sidecar's tasks through
    // the real kube-rbac-proxy with its client certificate (authenticated by the CA it copied
    // into the node's proxy config, authorized by a SubjectAccessReview on seinodetasks for
    // sidecarClient.user), and then probes the sidecar by the pod's cluster DNS name.
    create_node_service_account(&ns);
    let dns: Vec<&str> = names.iter().map(String::as_str).collect();
    let leaf = ca
        .issue(&LeafSpec {
            common_name: "rpc",
            dns_names: &dns,
            server: true,
            ..LeafSpec::default()
        })
        .unwrap();
    let secret = seinode_tls_testkit::tls_secret(
        &ns,
        "rpc-sidecar-tls",
        &leaf.cert_pem,
        &leaf.key_pem,
        Some(&ca.cert_pem()),
    );
    Api::<Secret>::namespaced(client.clone(), &ns)
        .create(&PostParams::default(), &secret)
        .await
        .unwrap();
    nodes.create(&PostParams::default(), &node).await.unwrap();
    let sidecar_ready = |n: &SeiNode| {
        n.status.as_ref().is_some_and(|s| {
            s.phase == Some(seinode_tls_crds::SeiNodePhase::Running)
                && s.conditions.iter().flatten().any(|c| {
                    c.type_ == "SidecarReady" && c.status == "True" && c.reason == "SidecarHealthy"
                })
        })
    };
    let (last, ok) = common::poll(
        WAIT,
        || async { nodes.get("rpc").await.unwrap() },
        sidecar_ready,
    )
    .await;
    assert!(ok, "{:#?}\n{}", last.status, pods_table());

    // The leader's Pod is deleted: the other replica takes the Lease within the lease's
    // duration (15 s) plus a retry period, and the next node still gets reconciled.
    let leader = holder.unwrap();
    // The holder is `<pod>_<random>`: one identity per process.
    let leader_pod = leader
        .rsplit_once('_')
        .map_or(leader.as_str(), |(pod, _)| pod);
    let out = common::kubectl(
        &[
            "delete",
            "pod",
            leader_pod,
            "-n",
            RELEASE_NS,
            "--wait=false",
        ],
        "",
    );
    assert!(out.status.success(), "{}", text(&out.stderr));
    let (next, handed_over) = common::poll(
        Duration::from_secs(40),
        || async {
            leases
                .get_opt(RELEASE)
                .await
                .unwrap()
                .and_then(|l| l.spec)
                .and_then(|s| s.holder_identity)
        },
        |h| h.as_deref().is_some_and(|h| h != leader),
    )
    .await;
    assert!(
        handed_over,
        "the Lease stayed with {leader}: {next:?}\n{}",
        pods_table()
    );

    // A rolling upgrade while a client keeps creating (dry-run) SeiNodes: no admission fails.
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let admissions = tokio::spawn({
        let nodes = nodes.clone();
        let stop = stop.clone();
        // Its Secret does not exist yet: admitted with a warning, through both webhooks.
        let mut probe = node.clone();
        probe.metadata.name = Some("probe".to_owned());
        if let Some(tls) = probe.spec.sidecar.as_mut().and_then(|s| s.tls.as_mut()) {
            tls.secret_name = "probe-sidecar-tls".to_owned();
        }
        async move {
            let (mut ok, mut failed) = (0, Vec::new());
            while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                match nodes.create(&dry_run, &probe).await {
                    Ok(_) => ok += 1,
                    Err(e) => failed.push(e.to_string()),
                }
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
            (ok, failed)
        }
    });
    let chart = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("charts/seinode-tls");
    let out = common::helm(&[
        "upgrade",
        RELEASE,
        chart.to_str().unwrap(),
        "--namespace",
        RELEASE_NS,
        "--reuse-values",
        "--set",
        "podAnnotations.rolled=yes",
        "--wait",
        "--timeout",
        "3m",
    ]);
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    let (admitted, failed) = admissions.await.unwrap();
    assert!(
        out.status.success(),
        "helm upgrade: {}{}",
        text(&out.stderr),
        pods_table()
    );
    assert!(
        failed.is_empty(),
        "{} of {} admissions failed during the roll; the first: {:?}",
        failed.len(),
        admitted + failed.len(),
        failed.first()
    );
    assert!(admitted > 10, "the client kept creating: {admitted}");

    // An edit of spec.sidecar.tls is refused.
    let out = common::patch_seinode(
        &ns,
        "rpc",
        r#"{"spec":{"sidecar":{"tls":{"secretName":"other"}}}}"#,
    );
    assert!(!out.status.success(), "the edit went through");
    assert!(
        text(&out.stderr).contains("sidecar.tls"),
        "{}",
        text(&out.stderr)
    );

    // Uninstalled, nothing blocks SeiNode edits (the CRD stays, as Helm keeps crds/).
    let out = common::helm(&["uninstall", RELEASE, "--namespace", RELEASE_NS, "--wait"]);
    assert!(out.status.success(), "{}", text(&out.stderr));
    let out = common::kubectl(
        &["label", "snode", "rpc", "-n", &ns, "after-uninstall=yes"],
        "",
    );
    assert!(out.status.success(), "{}", text(&out.stderr));
    for kind in [
        "validatingwebhookconfigurations",
        "mutatingwebhookconfigurations",
    ] {
        let out = common::kubectl(&["get", kind, "-o", "name"], "");
        assert!(
            !text(&out.stdout).contains(RELEASE),
            "{kind} left: {}",
            text(&out.stdout)
        );
    }
}
