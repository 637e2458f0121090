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
use k8s_openapi::api::core::v1::{Pod, Secret};
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
/// The README's node: `examples/seinode-tls-full-node.yaml`, and its Secret (the name
/// `contract -o certificate` gives it by default, which the example names).
const NODE: &str = "atlantic-2-rpc";
const NODE_SECRET: &str = "atlantic-2-rpc-sidecar-tls";
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

/// What the node pods of namespace `ns` need for kube-rbac-proxy: the README's step 2,
/// `examples/sidecar-rbac.yaml` (their ServiceAccount, bound to `system:auth-delegator` so the
/// proxy may ask for the TokenReviews and SubjectAccessReviews of its callers), with the
/// namespace its ClusterRoleBinding names edited as the file says.
fn apply_sidecar_rbac_example(ns: &str) {
    let example = std::fs::read_to_string(
        PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("examples/sidecar-rbac.yaml"),
    )
    .unwrap()
    .replace("namespace: sei-nodes", &format!("namespace: {ns}"));
    assert!(example.contains(&format!("name: {NODE_SERVICE_ACCOUNT}\n")));
    let out = common::kubectl(&["apply", "--server-side", "-n", ns, "-f", "-"], &example);
    assert!(out.status.success(), "{}", text(&out.stderr));
}

/// Creates `kubernetes.io/tls` Secret `ns/name` holding a leaf `ca` issues for `leaf`, with the
/// CA as `ca.crt` when `with_ca`.
async fn create_tls_secret(
    client: &kube::Client,
    ca: &CertificateAuthority,
    ns: &str,
    name: &str,
    leaf: &LeafSpec<'_>,
    with_ca: bool,
) {
    let issued = ca.issue(leaf).unwrap();
    let ca_pem = with_ca.then(|| ca.cert_pem());
    let secret = seinode_tls_testkit::tls_secret(
        ns,
        name,
        &issued.cert_pem,
        &issued.key_pem,
        ca_pem.as_deref(),
    );
    Api::<Secret>::namespaced(client.clone(), ns)
        .create(&PostParams::default(), &secret)
        .await
        .unwrap();
}

/// The install steps of docs/operations.md for certificates of one's own: the namespace, a
/// `kubernetes.io/tls` Secret for the Service's name, the sidecar client certificate's Secret,
/// and the chart with the CA.
async fn install(client: &kube::Client, ca: &CertificateAuthority) {
    let out = common::kubectl(&["create", "namespace", RELEASE_NS], "");
    assert!(out.status.success(), "{}", text(&out.stderr));
    let service = format!("{RELEASE}.{RELEASE_NS}.svc");
    let serving = LeafSpec {
        common_name: &service,
        dns_names: &[service.as_str()],
        server: true,
        ..LeafSpec::default()
    };
    create_tls_secret(
        client,
        ca,
        RELEASE_NS,
        "seinode-tls-webhook",
        &serving,
        false,
    )
    .await;
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

/// `seinode-tls ARGS` run as a user runs it on a workstation, with the test cluster's kubeconfig.
fn cli(args: &[&str]) -> std::process::Output {
    let kubeconfig = common::control_plane().kubeconfig().display().to_string();
    let mut all = args.to_vec();
    all.extend(["--kubeconfig", kubeconfig.as_str()]);
    common::seinode_tls(&all, "")
}

/// The test cluster's kubeconfig with a second context, `nobody`, whose user is the admin
/// impersonating a ServiceAccount that has no permissions.
fn kubeconfig_with_nobody() -> PathBuf {
    let admin = std::fs::read_to_string(common::control_plane().kubeconfig()).unwrap();
    let mut config: serde_json::Value = serde_saphyr::from_str(&admin).unwrap();
    let mut user = config["users"][0].clone();
    user["name"] = "nobody".into();
    user["user"]["as"] = "system:serviceaccount:default:nobody".into();
    let mut context = config["contexts"][0].clone();
    context["name"] = "nobody".into();
    context["context"]["user"] = "nobody".into();
    config["users"].as_array_mut().unwrap().push(user);
    config["contexts"].as_array_mut().unwrap().push(context);
    let path = common::scratch_path("kubeconfig-nobody");
    std::fs::write(&path, config.to_string()).unwrap();
    path
}

/// The Pod of the chart's `helm test`.
const TEST_POD: &str = "seinode-tls-test-check";

/// The chart's checks, in the order `check` prints them.
const CHECKS: [&str; 7] = [
    "crd",
    "deployment",
    "validating-webhook",
    "mutating-webhook",
    "webhooks-answer",
    "leader",
    "rbac",
];

/// `helm test` runs `seinode-tls check` in a Pod of the chart's image as a ServiceAccount of its
/// own, and every check passes; so does `check` from a workstation, `-o json`. With the
/// validating webhook's caBundle replaced by another CA's, `check` fails on one line that says
/// the API server cannot call the webhook and what to do; restored, it passes again.
async fn check_the_install(client: &kube::Client) {
    // (No --logs: the process kubelet serves no container logs.)
    let helm_test = || {
        common::helm(&[
            "test",
            RELEASE,
            "--namespace",
            RELEASE_NS,
            "--timeout",
            "3m",
        ])
    };
    // The test Pod meets the restricted Pod Security level: the API server enforces it here.
    let out = common::kubectl(
        &[
            "label",
            "namespace",
            RELEASE_NS,
            "pod-security.kubernetes.io/enforce=restricted",
        ],
        "",
    );
    assert!(out.status.success(), "{}", text(&out.stderr));
    let out = helm_test();
    assert!(
        out.status.success(),
        "helm test: {}{}\n{}",
        text(&out.stdout),
        text(&out.stderr),
        pods_table()
    );
    assert!(
        text(&out.stdout).contains(&format!("TEST SUITE:     {TEST_POD}")),
        "{}",
        text(&out.stdout)
    );
    // Its Pod passed, so it is gone with the other hooks.
    let pods: Api<Pod> = Api::namespaced(client.clone(), RELEASE_NS);
    let (pod, gone) = common::poll(
        WAIT,
        || async { pods.get_opt(TEST_POD).await.unwrap() },
        Option::is_none,
    )
    .await;
    assert!(gone, "{:?}", pod.and_then(|p| p.status));

    let out = cli(&["check", "-n", RELEASE_NS, "--name", RELEASE, "-o", "json"]);
    assert_eq!(
        out.status.code(),
        Some(0),
        "{}{}",
        text(&out.stdout),
        text(&out.stderr)
    );
    let report: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(report["ok"], true, "{report}");
    let names: Vec<&str> = report["checks"]
        .as_array()
        .unwrap()
        .iter()
        .map(|c| c["name"].as_str().unwrap())
        .collect();
    assert_eq!(names, CHECKS);

    // A caBundle that did not issue the serving certificate: the registration still parses and
    // is valid, but the API server cannot call the webhook.
    use k8s_openapi::api::admissionregistration::v1::ValidatingWebhookConfiguration;
    let registrations: Api<ValidatingWebhookConfiguration> = Api::all(client.clone());
    let registration = registrations.get(RELEASE).await.unwrap();
    let webhooks = registration.webhooks.unwrap_or_default();
    let index = webhooks
        .iter()
        .position(|w| w.name == "seinodes.validate.sei.io")
        .unwrap();
    let original = webhooks[index].client_config.ca_bundle.clone().unwrap();
    let set_bundle = |bundle: &[u8]| {
        use base64::Engine as _;
        let patch = serde_json::json!([{"op": "replace",
            "path": format!("/webhooks/{index}/clientConfig/caBundle"),
            "value": base64::engine::general_purpose::STANDARD.encode(bundle)}]);
        let out = common::kubectl(
            &[
                "patch",
                "validatingwebhookconfiguration",
                RELEASE,
                "--type=json",
                "-p",
                &patch.to_string(),
            ],
            "",
        );
        assert!(out.status.success(), "{}", text(&out.stderr));
    };
    let stranger = CertificateAuthority::new("a CA that issued nothing here").unwrap();
    set_bundle(stranger.cert_pem().as_bytes());
    let check = || async { cli(&["check", "-n", RELEASE_NS, "--name", RELEASE]) };
    let (out, failed) = common::poll(WAIT, check, |out| out.status.code() == Some(1)).await;
    let report = text(&out.stdout);
    set_bundle(&original.0);
    assert!(
        failed,
        "check kept passing with a foreign caBundle:\n{report}"
    );
    eprintln!("check with a foreign caBundle:\n{report}");
    let failed: Vec<&str> = report.lines().filter(|l| l.starts_with("FAILED")).collect();
    assert_eq!(failed.len(), 1, "{report}");
    let line = failed[0];
    assert!(
        line.starts_with("FAILED  webhooks-answer: ")
            && line.contains("seinodes.validate.sei.io")
            && line.contains("x509")
            && line.contains("Fix: ")
            && line.contains("tls.caBundle"),
        "{line}"
    );
    // helm test fails the same way: its Pod's check exits 1.
    set_bundle(stranger.cert_pem().as_bytes());
    let out = helm_test();
    assert!(
        !out.status.success(),
        "helm test passed with a foreign caBundle"
    );
    let pod = pods.get(TEST_POD).await.unwrap();
    set_bundle(&original.0);
    let status = pod.status.unwrap_or_default();
    let exit_code = status
        .container_statuses
        .iter()
        .flatten()
        .find_map(|c| c.state.as_ref()?.terminated.as_ref().map(|t| t.exit_code));
    assert_eq!(
        (status.phase.as_deref(), exit_code),
        (Some("Failed"), Some(1)),
        "{}",
        text(&out.stderr)
    );

    let (out, passed) = common::poll(WAIT, check, |out| out.status.success()).await;
    assert!(
        passed,
        "restored, check passes again:\n{}",
        text(&out.stdout)
    );
    let out = helm_test();
    assert!(
        out.status.success(),
        "restored, helm test passes again: {}",
        text(&out.stderr)
    );
    let out = common::kubectl(
        &[
            "label",
            "namespace",
            RELEASE_NS,
            "pod-security.kubernetes.io/enforce-",
        ],
        "",
    );
    assert!(out.status.success(), "{}", text(&out.stderr));
}

/// A replica's `/metrics`, as Prometheus scrapes it from the Pod, declares every metric family
/// of the registry that tests/monitoring.rs and tests/docs.rs check the dashboard, the alerts
/// and the docs against (and no other): that registry is what the binary serves.
async fn a_replica_serves_every_registered_metric(client: &kube::Client) {
    let pods: Api<k8s_openapi::api::core::v1::Pod> = Api::namespaced(client.clone(), RELEASE_NS);
    let listed = pods
        .list(&kube::api::ListParams::default().labels("app.kubernetes.io/name=seinode-tls"))
        .await
        .unwrap();
    let ip = listed
        .items
        .iter()
        .find_map(|p| p.status.as_ref()?.pod_ip.clone())
        .expect("a replica with an IP");
    let out = std::process::Command::new("curl")
        .args([
            "-sf",
            "--max-time",
            "5",
            &format!("http://{ip}:8080/metrics"),
        ])
        .output()
        .expect("run curl");
    assert!(out.status.success(), "curl /metrics: {out:?}");
    let served = common::metrics::exposition_names(&text(&out.stdout));
    assert_eq!(served, common::metrics::registered_names());
}

/// `status` and `check-secret NAME` against the node [`NODE`] that runs in `ns` with its Secret
/// [`NODE_SECRET`]; not found and forbidden have their own exit codes; a node without its
/// Secret is not Ready and `status` says what to do.
async fn status_and_check_secret(client: &kube::Client, ns: &str, names: &[String]) {
    // Ready follows SidecarReady in the same status write, or the next one.
    let (out, ready) = common::poll(
        WAIT,
        || async { cli(&["status", NODE, "-n", ns]) },
        |out| out.status.code() == Some(0),
    )
    .await;
    let report = text(&out.stdout);
    assert!(ready, "{report}{}", text(&out.stderr));
    eprintln!("status of a Ready node:\n{report}");
    assert!(
        report.starts_with(&format!("SeiNode {ns}/{NODE}: Running, Ready\n")),
        "{report}"
    );
    for expected in [
        format!("secretName:       {NODE_SECRET}").as_str(),
        names[1].as_str(),
        "notAfter:",
        "Ready                  True    NodeReady",
        "SidecarTLSSecretReady  True    TLSSecretReady",
        "do: nothing",
    ] {
        assert!(report.contains(expected), "{expected:?} in:\n{report}");
    }
    let out = cli(&["status", NODE, "-n", ns, "-o", "yaml"]);
    let value: serde_json::Value = serde_saphyr::from_str(&text(&out.stdout)).unwrap();
    assert_eq!(value["ready"], true);
    assert!(value["sidecarTLS"]["notAfter"].is_string(), "{value}");
    assert!(value["sidecarTLS"]["expiresInSeconds"].as_i64().unwrap() > 0);

    let out = cli(&["check-secret", NODE_SECRET, "-n", ns, "--seinode", NODE]);
    assert_eq!(out.status.code(), Some(0), "{}", text(&out.stderr));
    assert!(
        text(&out.stdout).starts_with(&format!("TLSSecretReady: Secret \"{ns}/{NODE_SECRET}\""))
    );
    // The same Secret judged for another node: its names are missing.
    let out = cli(&[
        "check-secret",
        NODE_SECRET,
        "-n",
        ns,
        "--seinode",
        "web",
        "-o",
        "json",
    ]);
    assert_eq!(out.status.code(), Some(1));
    let verdict: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(verdict["reason"], "TLSSecretSANsMismatch");

    for (args, what) in [
        (
            vec!["check-secret", "absent", "-n", ns, "--seinode", NODE],
            format!("Secret \"{ns}/absent\""),
        ),
        (
            vec!["status", "absent", "-n", ns],
            format!("SeiNode \"{ns}/absent\""),
        ),
    ] {
        let out = cli(&args);
        assert_eq!(out.status.code(), Some(3), "{args:?}");
        assert_eq!(text(&out.stderr), format!("error: {what} not found\n"));
    }
    let nobody = kubeconfig_with_nobody();
    let nobody = nobody.to_str().unwrap();
    for args in [
        vec!["check-secret", NODE_SECRET, "-n", ns, "--seinode", NODE],
        vec!["status", NODE, "-n", ns],
    ] {
        let mut args = args.clone();
        args.extend(["--kubeconfig", nobody, "--context", "nobody"]);
        let out = common::seinode_tls(&args, "");
        let stderr = text(&out.stderr);
        assert_eq!(out.status.code(), Some(4), "{args:?}: {stderr}");
        assert!(
            stderr.starts_with("error: failed to get ")
                && stderr.contains("forbidden")
                && stderr.lines().count() == 1,
            "{stderr}"
        );
    }

    // A TLS node whose Secret does not exist waits in Pending; status says so and what to do.
    let waiting: SeiNode = serde_json::from_value(serde_json::json!({
        "apiVersion": "sei.io/v1alpha1", "kind": "SeiNode",
        "metadata": {"name": "waiting", "namespace": ns},
        "spec": {"chainId": "arctic-1", "image": "ghcr.io/sei-protocol/sei:v6.3.0", "fullNode": {},
                 "sidecar": {"tls": {"secretName": "waiting-sidecar-tls"}}},
    }))
    .unwrap();
    Api::<SeiNode>::namespaced(client.clone(), ns)
        .create(&PostParams::default(), &waiting)
        .await
        .unwrap();
    let (out, judged) = common::poll(
        WAIT,
        || async { cli(&["status", "waiting", "-n", ns]) },
        |out| text(&out.stdout).contains("TLSSecretNotFound"),
    )
    .await;
    let report = text(&out.stdout);
    assert!(judged, "{report}");
    assert_eq!(out.status.code(), Some(1), "{report}");
    eprintln!("status of a node without its Secret:\n{report}");
    for expected in [
        "not Ready",
        "Ready                  False   TLSSecretNotReady",
        "SidecarTLSSecretReady  False   TLSSecretNotFound",
        "do: create the kubernetes.io/tls Secret",
        "waiting-0.waiting.",
    ] {
        assert!(report.contains(expected), "{expected:?} in:\n{report}");
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn the_installed_chart_runs_admits_reconciles_and_uninstalls_cleanly() {
    let client = common::client().await;
    let ca = CertificateAuthority::new("operator's CA").unwrap();
    install(&client, &ca).await;
    let leader = replicas_ready_and_one_leads(&client).await;
    check_the_install(&client).await;
    a_replica_serves_every_registered_metric(&client).await;
    let (ns, node) = the_readmes_first_screen(&client, &ca).await;
    the_lease_is_handed_over(&client, &leader).await;
    the_new_leader_releases_a_node_whose_secret_arrives(&client, &ca, &ns).await;
    a_rolling_upgrade_fails_no_admission(&client, &ns, &node).await;
    an_edit_of_the_tls_block_is_refused(&ns);
    uninstalled_it_blocks_nothing(&ns);
}

/// Both replicas run and pass /readyz; one of them holds the Lease. Returns its holder.
async fn replicas_ready_and_one_leads(client: &kube::Client) -> String {
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
    holder.unwrap()
}

/// The README's first screen, after the install; returns the node's namespace and the node.
async fn the_readmes_first_screen(
    client: &kube::Client,
    ca: &CertificateAuthority,
) -> (String, SeiNode) {
    // The README's first screen, after the install: the node's namespace and the ServiceAccount
    // its proxy authorizes with (step 2), its Certificate from `contract` (step 3), the node
    // (step 4), and `kubectl wait` for Ready.
    let ns = common::namespace(client, "install").await;
    apply_sidecar_rbac_example(&ns);
    let names = required_dns_names(NODE, &ns, DEFAULT_CLUSTER_DOMAIN);
    let out = common::seinode_tls(
        &[
            "contract",
            "--seinode",
            NODE,
            "-n",
            &ns,
            "-o",
            "certificate",
            "--issuer",
            "sei-ca",
            "--issuer-kind",
            "ClusterIssuer",
        ],
        "",
    );
    assert!(out.status.success(), "{}", text(&out.stderr));
    let certificate = text(&out.stdout);
    // cert-manager's controllers do not run here: its CRDs check the Certificate, and the test
    // creates the Secret cert-manager would, for the names and under the name it carries.
    common::install_cert_manager_crds();
    common::chart::server_dry_run(&certificate);
    let certificate: serde_json::Value = serde_saphyr::from_str(&certificate).unwrap();
    assert_eq!(certificate["spec"]["secretName"], NODE_SECRET);
    let dns: Vec<&str> = certificate["spec"]["dnsNames"]
        .as_array()
        .unwrap()
        .iter()
        .map(|n| n.as_str().unwrap())
        .collect();
    assert_eq!(dns, names, "the Certificate asks for exactly the contract");

    // The API server calls the chart's webhooks through its Service: a server-side dry run of
    // the node comes back with the mutating webhook's annotation.
    let example =
        PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("examples/seinode-tls-full-node.yaml");
    let example = example.to_str().unwrap();
    let out = common::kubectl(
        &[
            "apply",
            "--server-side",
            "--dry-run=server",
            "-n",
            &ns,
            "-f",
            example,
            "-o",
            "json",
        ],
        "",
    );
    assert!(out.status.success(), "{}", text(&out.stderr));
    let dry_run: SeiNode = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(
        dry_run
            .metadata
            .annotations
            .unwrap_or_default()
            .get(REQUIRED_DNS_NAMES_ANNOTATION),
        Some(&names.join(","))
    );

    // The node reaches Ready: the controller in its Pod submits the sidecar's tasks through the
    // real kube-rbac-proxy with its client certificate (authenticated by the CA it copied into
    // the node's proxy config, authorized by a SubjectAccessReview on seinodetasks for
    // sidecarClient.user), and then probes the sidecar by the pod's cluster DNS name.
    let leaf = LeafSpec {
        common_name: NODE,
        dns_names: &dns,
        server: true,
        ..LeafSpec::default()
    };
    create_tls_secret(client, ca, &ns, NODE_SECRET, &leaf, true).await;
    let out = common::kubectl(&["apply", "--server-side", "-n", &ns, "-f", example], "");
    assert!(out.status.success(), "{}", text(&out.stderr));
    let out = common::kubectl(
        &[
            "wait",
            "--for=condition=Ready",
            &format!("snode/{NODE}"),
            "-n",
            &ns,
            "--timeout=120s",
        ],
        "",
    );
    let nodes: Api<SeiNode> = Api::namespaced(client.clone(), &ns);
    assert!(
        out.status.success(),
        "kubectl wait: {}{}\n{:#?}\n{}",
        text(&out.stdout),
        text(&out.stderr),
        nodes.get(NODE).await.unwrap().status,
        pods_table()
    );
    // Ready once mark-ready went through; the first probe follows.
    let (node, probed) = common::poll(
        WAIT,
        || async { nodes.get(NODE).await.unwrap() },
        |n: &SeiNode| {
            n.status.as_ref().is_some_and(|s| {
                s.phase == Some(seinode_tls_crds::SeiNodePhase::Running)
                    && s.conditions.iter().flatten().any(|c| {
                        c.type_ == "SidecarReady"
                            && c.status == "True"
                            && c.reason == "SidecarHealthy"
                    })
            })
        },
    )
    .await;
    assert!(probed, "{:#?}", node.status);
    status_and_check_secret(client, &ns, &names).await;
    (ns, node)
}

/// The leader's Pod is deleted: the other replica takes the Lease within the lease's duration
/// (15 s) plus a retry period.
async fn the_lease_is_handed_over(client: &kube::Client, leader: &str) {
    let leases: Api<Lease> = Api::namespaced(client.clone(), RELEASE_NS);
    // The holder is `<pod>_<random>`: one identity per process.
    let leader_pod = leader.rsplit_once('_').map_or(leader, |(pod, _)| pod);
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
}

/// The node left waiting for its Secret (see `status_and_check_secret`) gets it: the replica
/// that leads after the handover judges it ready. The Secret's event is what wakes the node (a
/// node without its Secret is otherwise looked at again only after ten minutes), through the
/// Secret watch and the Secret → nodes index of a term that began after the node was judged.
/// The node is deleted afterwards: its pod would only add load to the steps that follow.
async fn the_new_leader_releases_a_node_whose_secret_arrives(
    client: &kube::Client,
    ca: &CertificateAuthority,
    ns: &str,
) {
    let names = required_dns_names("waiting", ns, DEFAULT_CLUSTER_DOMAIN);
    let dns: Vec<&str> = names.iter().map(String::as_str).collect();
    let leaf = LeafSpec {
        common_name: "waiting",
        dns_names: &dns,
        server: true,
        ..LeafSpec::default()
    };
    create_tls_secret(client, ca, ns, "waiting-sidecar-tls", &leaf, true).await;
    let nodes: Api<SeiNode> = Api::namespaced(client.clone(), ns);
    let (node, ready) = common::poll(
        WAIT,
        || async { nodes.get("waiting").await.unwrap() },
        |n: &SeiNode| {
            n.status.as_ref().is_some_and(|s| {
                s.conditions.iter().flatten().any(|c| {
                    c.type_ == "SidecarTLSSecretReady"
                        && c.status == "True"
                        && c.reason == "TLSSecretReady"
                })
            })
        },
    )
    .await;
    assert!(ready, "{:#?}\n{}", node.status, pods_table());
    nodes.delete("waiting", &Default::default()).await.unwrap();
}

/// A rolling upgrade while a client keeps creating (dry-run) SeiNodes: no admission fails.
async fn a_rolling_upgrade_fails_no_admission(client: &kube::Client, ns: &str, node: &SeiNode) {
    let nodes: Api<SeiNode> = Api::namespaced(client.clone(), ns);
    let dry_run = PostParams {
        dry_run: true,
        ..PostParams::default()
    };
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let admissions = tokio::spawn({
        let nodes = nodes.clone();
        let stop = stop.clone();
        // Its Secret does not exist yet: admitted with a warning, through both webhooks.
        let mut probe = SeiNode::new("probe", node.spec.clone());
        probe.metadata.namespace = Some(ns.to_owned());
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
}

/// An edit of spec.sidecar.tls is refused (by the CRD's rule, and the webhook behind it).
fn an_edit_of_the_tls_block_is_refused(ns: &str) {
    let out = common::patch_seinode(
        ns,
        NODE,
        r#"{"spec":{"sidecar":{"tls":{"secretName":"other"}}}}"#,
    );
    assert!(!out.status.success(), "the edit went through");
    assert!(
        text(&out.stderr).contains("sidecar.tls"),
        "{}",
        text(&out.stderr)
    );

    // Uninstalled, nothing blocks SeiNode edits (the CRD stays, as Helm keeps crds/).
}

/// Uninstalled, nothing blocks SeiNode edits (the CRD stays, as Helm keeps crds/).
fn uninstalled_it_blocks_nothing(ns: &str) {
    let out = common::helm(&["uninstall", RELEASE, "--namespace", RELEASE_NS, "--wait"]);
    assert!(out.status.success(), "{}", text(&out.stderr));
    let out = common::kubectl(
        &["label", "snode", NODE, "-n", ns, "after-uninstall=yes"],
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
