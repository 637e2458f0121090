//! The Helm chart against a real API server: it renders (with Helm itself), lints, and applies
//! with a server-side dry run; its RBAC allows exactly what the code does (proven by running the
//! controller and the webhook's caches as the chart's ServiceAccount, and by `kubectl auth can-i`
//! for what must stay denied); the nodes' sidecar task API (`seinodetasks`, asked about by
//! kube-rbac-proxy) is granted to the controller's client certificate user and to whoever an
//! operator binds, never to the ServiceAccount; its admission policy reserves `seinodes/status`
//! for the controller.

#![allow(clippy::expect_used, clippy::unwrap_used)]

mod common;

use std::path::PathBuf;
use std::sync::{Arc, OnceLock};
use std::time::Duration;

use common::chart::{Release, chart_dir, documents_of, ensure_namespace, may_call_sidecar, text};
use k8s_openapi::api::core::v1::Secret;
use kube::Client;
use kube::api::{Api, Patch, PatchParams, PostParams};
use prometheus_client::registry::Registry;
use seinode_tls::local::RunningController;
use seinode_tls_controller::Controller;
use seinode_tls_crds::{SeiNode, SeiNodePhase, SeiNodeStatus};
use seinode_tls_testkit::{CertificateAuthority, LeafSpec};
use serde_json::json;

/// Release name and namespace of the chart in these tests.
const RELEASE: &str = "seinode-tls";
const RELEASE_NS: &str = "seinode-tls-system";
const CHART: Release = Release {
    name: RELEASE,
    namespace: RELEASE_NS,
};
const WAIT: Duration = Duration::from_secs(30);
/// The chart's default `sidecarClient.user`: the controller's client certificate's CommonName.
const DEFAULT_SIDECAR_CLIENT_USER: &str = "seinode-tls:sidecar-client";
/// `sidecarClient.user` of the release installed here. Not the default: the test cluster itself
/// grants the default user `seinodetasks` (for the controllers the tests run), which would
/// answer for the chart's binding.
const SIDECAR_CLIENT_USER: &str = "seinode-tls-chart-test:sidecar-client";
/// `sidecarClient.secretName` in the "own certificate" mode.
const SIDECAR_CLIENT_SECRET: &str = "seinode-tls-sidecar-client-own";

fn render(extra: &[String]) -> String {
    CHART.render(extra)
}

/// Values for the "own certificate" mode: the serving Secret and CA bundle of
/// `common::chart::own_cert_values`, and the Secret of the controller's sidecar client
/// certificate, which the chart requires without cert-manager. (Nothing here runs the
/// Deployment, so neither Secret has to exist; tests/install.rs creates both.)
fn own_cert_values() -> Vec<String> {
    let mut values = common::chart::own_cert_values();
    values.extend([
        "--set".to_owned(),
        format!("sidecarClient.secretName={SIDECAR_CLIENT_SECRET}"),
    ]);
    values
}

/// cert-manager's real CRDs (its Issuer and Certificate schemas check the chart's), and
/// open-schema stand-ins for the Prometheus Operator's, so the chart's optional objects can be
/// dry-run applied here.
fn install_crds() {
    common::install_cert_manager_crds();
    static DONE: OnceLock<()> = OnceLock::new();
    DONE.get_or_init(|| {
        let mut yaml = String::new();
        for (group, kind, plural) in [
            ("monitoring.coreos.com", "ServiceMonitor", "servicemonitors"),
            ("monitoring.coreos.com", "PodMonitor", "podmonitors"),
            ("monitoring.coreos.com", "PrometheusRule", "prometheusrules"),
        ] {
            yaml.push_str(&format!(
                "---\napiVersion: apiextensions.k8s.io/v1\nkind: CustomResourceDefinition\nmetadata:\n  name: {plural}.{group}\n\
                 spec:\n  group: {group}\n  scope: Namespaced\n  names: {{kind: {kind}, plural: {plural}}}\n  versions:\n  \
                 - name: v1\n    served: true\n    storage: true\n    schema:\n      openAPIV3Schema:\n        type: object\n        \
                 x-kubernetes-preserve-unknown-fields: true\n"
            ));
        }
        let out = common::kubectl(&["apply", "--server-side", "-f", "-"], &yaml);
        assert!(out.status.success(), "{}", text(&out.stderr));
        for crd in ["servicemonitors.monitoring.coreos.com", "podmonitors.monitoring.coreos.com", "prometheusrules.monitoring.coreos.com"] {
            let out = common::kubectl(&["wait", "--for=condition=Established", &format!("crd/{crd}"), "--timeout=30s"], "");
            assert!(out.status.success(), "{}", text(&out.stderr));
        }
    });
}

/// Installs, for real, the chart's ServiceAccount, RBAC and status policy (not the Deployment:
/// there is no kubelet), with [`SIDECAR_CLIENT_USER`], once per test binary; waits until the
/// policy is enforced.
fn install_rbac_and_policy() {
    static DONE: OnceLock<()> = OnceLock::new();
    DONE.get_or_init(|| {
        let mut values = own_cert_values();
        values.extend([
            "--set".to_owned(),
            format!("sidecarClient.user={SIDECAR_CLIENT_USER}"),
        ]);
        CHART.install_rbac_and_policy(&values);
    });
}

/// A client that acts as the chart's ServiceAccount (impersonation by the admin).
async fn service_account_client() -> Client {
    CHART.service_account_client().await
}

fn can_i(args: &[&str]) -> bool {
    CHART.can_i(args)
}

/// `kubectl auth can-i ARGS` as `user`.
fn can_i_as(user: &str, args: &[&str]) -> bool {
    let as_user = format!("--as={user}");
    let mut all = vec!["auth", "can-i", as_user.as_str()];
    all.extend_from_slice(args);
    let out = common::kubectl(&all, "");
    text(&out.stdout).trim() == "yes"
}

/// What the chart's sidecar roles hold: the nodes' task API, as kube-rbac-proxy asks about it.
fn sidecar_task_rules() -> serde_json::Value {
    json!([{"apiGroups": ["sei.io"], "resources": ["seinodetasks"],
            "verbs": ["create", "get", "list"]}])
}

/// The groups the API server gives the chart's ServiceAccount.
fn service_account_groups() -> [String; 3] {
    [
        "system:serviceaccounts".to_owned(),
        format!("system:serviceaccounts:{RELEASE_NS}"),
        "system:authenticated".to_owned(),
    ]
}

/// `--set` arguments, one per `key=value` pair.
fn sets(pairs: &[&str]) -> Vec<String> {
    pairs
        .iter()
        .flat_map(|pair| ["--set".to_owned(), (*pair).to_owned()])
        .collect()
}

/// Every value that passes something to the binary.
fn every_controller_value() -> Vec<String> {
    sets(&[
        "controller.nodeServiceAccount=sei-node",
        "controller.sidecarImage=ghcr.io/sei-protocol/seictl:v1",
        "controller.rbacProxyImage=quay.io/brancz/kube-rbac-proxy:v0.19.1",
        "webhook.secretPolicy=warn",
        "webhook.secretGuardPolicy=deny",
        "logging.format=json",
        "logging.level=info\\,seinode_tls_controller=debug",
    ])
}

/// Every optional object: both monitors, the rules and the NetworkPolicy.
fn every_optional_object() -> Vec<String> {
    sets(&[
        "monitoring.serviceMonitor.enabled=true",
        "monitoring.podMonitor.enabled=true",
        "monitoring.prometheusRule.enabled=true",
        "networkPolicy.enabled=true",
        "networkPolicy.webhookFrom[0].ipBlock.cidr=172.18.0.0/16",
    ])
}

/// The digest `image.digest` is set to in these tests.
const IMAGE_DIGEST: &str =
    "sha256:0123456789abcdef0123456789abcdef0123456789abcdef0123456789abcdef";

/// A values file (`-f`) that sets each value a cluster's conventions need, as a user writes
/// them: names, labels, a pinned image, an existing ServiceAccount, OpenShift's security context
/// (the UID and GID left to the platform), and a flag the chart has no value for with its volume.
fn every_convention_value() -> Vec<String> {
    let yaml = format!(
        r#"nameOverride: stls
fullnameOverride: tls-x
commonLabels:
  team: sei
  # Never replaces the chart's own.
  app.kubernetes.io/name: not-the-chart
image:
  tag: v9
  digest: {IMAGE_DIGEST}
serviceAccount:
  create: false
  name: existing-sa
podSecurityContext:
  runAsUser: null
  runAsGroup: null
extraArgs:
  - --sidecar-ca-bundle=/sidecar-ca/ca.crt
  - --sidecar-probe-interval=1m
extraEnv:
  - name: RUST_BACKTRACE
    value: full
extraVolumes:
  - name: sidecar-ca
    configMap: {{name: sidecar-ca}}
extraVolumeMounts:
  - name: sidecar-ca
    mountPath: /sidecar-ca
    readOnly: true
"#
    );
    values_file("convention-values", &yaml)
}

/// `-f FILE` with `yaml` written to a scratch file.
fn values_file(name: &str, yaml: &str) -> Vec<String> {
    let path = common::scratch_path(name).with_extension("yaml");
    std::fs::write(&path, yaml).unwrap();
    vec!["-f".to_owned(), path.display().to_string()]
}

/// What `helm template` says when it refuses `values` (panics when it renders them).
fn refusal(values: &[String]) -> String {
    let chart = chart_dir();
    let mut args = vec![
        "template",
        RELEASE,
        chart.to_str().unwrap(),
        "--namespace",
        RELEASE_NS,
    ];
    args.extend(values.iter().map(String::as_str));
    let out = common::helm(&args);
    assert!(!out.status.success(), "rendered {values:?}");
    text(&out.stderr)
}

/// The rendered documents as JSON (CRDs included), without the empty ones.
fn objects(rendered: &str) -> Vec<serde_json::Value> {
    rendered
        .split("\n---")
        .filter_map(|doc| serde_saphyr::from_str::<serde_json::Value>(doc).ok())
        .filter(|doc| doc["kind"].is_string())
        .collect()
}

#[test]
fn the_chart_lints_strictly_and_renders_with_helm() {
    // Every set of values the chart tests render, and the defaults.
    for values in [
        vec![],
        own_cert_values(),
        every_controller_value(),
        every_optional_object(),
        every_convention_value(),
    ] {
        let mut args = vec![
            "lint".to_owned(),
            "--strict".to_owned(),
            chart_dir().to_str().unwrap().to_owned(),
        ];
        args.extend(values.iter().cloned());
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        let out = common::helm(&args);
        assert!(
            out.status.success(),
            "helm lint --strict {values:?}: {}{}",
            text(&out.stdout),
            text(&out.stderr)
        );
    }
    let rendered = render(&[]);
    for kind in [
        "CustomResourceDefinition",
        "Deployment",
        "Service",
        "PodDisruptionBudget",
        "ValidatingWebhookConfiguration",
        "MutatingWebhookConfiguration",
        "Certificate",
        "Issuer",
        "ValidatingAdmissionPolicy",
    ] {
        assert!(
            rendered.contains(&format!("\nkind: {kind}\n")),
            "renders a {kind}"
        );
    }
    assert!(rendered.contains("cert-manager.io/inject-ca-from: seinode-tls-system/seinode-tls"));
    // The controller's client certificate for the node proxies, and the sidecar roles.
    for name in [
        "name: seinode-tls-sidecar-client\n",
        "name: seinode-tls-sidecar-operator\n",
    ] {
        assert!(rendered.contains(name), "renders {name}");
    }
    assert!(rendered.contains(&format!("commonName: \"{DEFAULT_SIDECAR_CLIENT_USER}\"")));
    assert!(
        rendered.contains("failurePolicy: Ignore"),
        "the Secret guard fails open"
    );
    assert!(
        rendered.contains("readOnlyRootFilesystem: true")
            && rendered.contains("runAsNonRoot: true")
    );
    // The chart's CRD is the generated one.
    let crd = std::fs::read_to_string(chart_dir().join("crds/sei.io_seinodes.yaml")).unwrap();
    assert_eq!(crd, seinode_tls_crds::crd::crd_yaml().unwrap());
}

#[test]
fn the_rendered_chart_applies_with_a_server_side_dry_run_in_both_certificate_modes() {
    install_crds();
    ensure_namespace(RELEASE_NS);
    let monitoring = sets(&[
        "monitoring.serviceMonitor.enabled=true",
        "monitoring.podMonitor.enabled=true",
        "monitoring.prometheusRule.enabled=true",
    ]);
    for (cert_manager, mut values) in [(true, vec![]), (false, own_cert_values())] {
        values.extend(monitoring.iter().cloned());
        let rendered = render(&values);
        let stdout = common::chart::server_dry_run(&rendered);
        for object in [
            "deployment.apps/seinode-tls",
            "validatingwebhookconfiguration",
            "prometheusrule",
            "servicemonitor.monitoring.coreos.com/seinode-tls",
            "podmonitor.monitoring.coreos.com/seinode-tls",
            "clusterrole.rbac.authorization.k8s.io/seinode-tls-sidecar-operator",
            "clusterrole.rbac.authorization.k8s.io/seinode-tls-sidecar-client",
            "clusterrolebinding.rbac.authorization.k8s.io/seinode-tls-sidecar-client",
        ] {
            assert!(stdout.contains(object), "{object} in {stdout}");
        }
        // The default path's Issuer and Certificates (serving, sidecar client), checked against
        // cert-manager's own schema.
        for object in [
            "issuer.cert-manager.io/",
            "certificate.cert-manager.io/seinode-tls ",
            "certificate.cert-manager.io/seinode-tls-sidecar-client ",
        ] {
            assert_eq!(
                stdout.contains(object),
                cert_manager,
                "{object} in {stdout}"
            );
        }
    }
}

#[test]
fn the_service_account_may_do_exactly_what_the_code_does() {
    install_rbac_and_policy();
    let allowed: &[&[&str]] = &[
        &["get", "seinodes.sei.io", "-A"],
        &["list", "seinodes.sei.io", "-A"],
        &["watch", "seinodes.sei.io", "-A"],
        &["update", "seinodes.sei.io", "--subresource=status", "-A"],
        &["get", "secrets", "-A"],
        &["list", "secrets", "-A"],
        &["watch", "secrets", "-A"],
        &["create", "configmaps", "-A"],
        &["get", "configmaps", "-A"],
        &["patch", "services", "-A"],
        &["get", "services", "-A"],
        &["watch", "services", "-A"],
        &["create", "statefulsets.apps", "-A"],
        &["patch", "statefulsets.apps", "-A"],
        &["get", "statefulsets.apps", "-A"],
        &["create", "events.events.k8s.io", "-A"],
        // The nodes' Pods: the controller dials a node's sidecar at its Pod IP.
        &["get", "pods", "-A"],
        &["list", "pods", "-A"],
        &["watch", "pods", "-A"],
        &["get", "leases.coordination.k8s.io", "-n", RELEASE_NS],
        &["create", "leases.coordination.k8s.io", "-n", RELEASE_NS],
        &["update", "leases.coordination.k8s.io", "-n", RELEASE_NS],
    ];
    for args in allowed {
        assert!(can_i(args), "the chart must allow: {}", args.join(" "));
    }
    let denied: &[&[&str]] = &[
        &["create", "secrets", "-A"],
        &["update", "secrets", "-A"],
        &["patch", "secrets", "-A"],
        &["delete", "secrets", "-A"],
        &["create", "seinodes.sei.io", "-A"],
        &["update", "seinodes.sei.io", "-A"],
        &["patch", "seinodes.sei.io", "--subresource=status", "-A"],
        &["delete", "seinodes.sei.io", "-A"],
        &["patch", "events.events.k8s.io", "-A"],
        &["delete", "statefulsets.apps", "-A"],
        &["create", "pods", "-A"],
        &["delete", "pods", "-A"],
        &["patch", "pods", "-A"],
        &["create", "pods", "--subresource=exec", "-A"],
        &["create", "deployments.apps", "-A"],
        &["get", "leases.coordination.k8s.io", "-n", "kube-system"],
        &["create", "clusterroles.rbac.authorization.k8s.io"],
    ];
    for args in denied {
        assert!(!can_i(args), "the chart must not allow: {}", args.join(" "));
    }
    // The ServiceAccount is not the sidecars' client: the controller calls them with its client
    // certificate (sidecarClient.user), whose key never leaves its pods; a token of the
    // ServiceAccount is worth nothing to a node proxy.
    let groups = service_account_groups();
    let groups: Vec<&str> = groups.iter().map(String::as_str).collect();
    for verb in ["create", "get", "list"] {
        assert!(
            !may_call_sidecar(&CHART.service_account(), &groups, verb, "sei-nodes", "rpc"),
            "the ServiceAccount must not {verb} seinodetasks"
        );
    }
}

#[tokio::test]
async fn the_sidecar_client_user_and_bound_operators_may_call_the_sidecars_and_nothing_else() {
    install_rbac_and_policy();
    let admin = common::client().await;
    let ns = common::namespace(&admin, "chart-sidecar").await;

    // The controller's certificate identity (the release's sidecarClient.user): every node's
    // tasks, cluster-wide (a ClusterRoleBinding without watchNamespaces), POST and GET.
    for verb in ["create", "get"] {
        for (at, node) in [(ns.as_str(), "rpc"), ("sei-nodes", "archive")] {
            assert!(
                may_call_sidecar(SIDECAR_CLIENT_USER, &[], verb, at, node),
                "{SIDECAR_CLIENT_USER} must {verb} seinodetasks {at}/{node}"
            );
        }
    }
    // Nobody else: the answer above is the chart's binding.
    assert!(!may_call_sidecar(
        "seinode-tls-chart-test:someone-else",
        &[],
        "create",
        &ns,
        "rpc"
    ));
    // ... and nothing in the API server: a certificate of that name is no credential there
    // anyway (its CA is not the API server's), and the name is granted nothing either.
    let api_server: &[&[&str]] = &[
        &["get", "seinodes.sei.io", "-A"],
        &["get", "secrets", "-A"],
        &["get", "pods", "-A"],
        &["create", "pods", "--subresource=exec", "-A"],
        &["update", "seinodes.sei.io", "--subresource=status", "-A"],
    ];
    for args in api_server {
        assert!(
            !can_i_as(SIDECAR_CLIENT_USER, args),
            "{SIDECAR_CLIENT_USER} must not: {}",
            args.join(" ")
        );
    }

    // The operators' ClusterRole: the same rules, bound by nobody until an operator binds it.
    let out = common::kubectl(
        &[
            "get",
            "clusterrole",
            "seinode-tls-sidecar-operator",
            "-o",
            "json",
        ],
        "",
    );
    assert!(out.status.success(), "{}", text(&out.stderr));
    let role: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let rules = sidecar_task_rules();
    assert_eq!(role["rules"], rules);
    let out = common::kubectl(
        &[
            "get",
            "clusterrole",
            "seinode-tls-sidecar-client",
            "-o",
            "json",
        ],
        "",
    );
    assert!(out.status.success(), "{}", text(&out.stderr));
    let role: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(role["rules"], rules);
    let operator = ["sei-operators", "system:authenticated"];
    assert!(!may_call_sidecar("alice", &operator, "create", &ns, "rpc"));

    // examples/sidecar-operator-rolebinding.yaml, applied as its header says: the group's
    // members may call every node of that namespace, and of no other.
    let example = PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("examples/sidecar-operator-rolebinding.yaml");
    let out = common::kubectl(
        &[
            "apply",
            "--server-side",
            "-n",
            &ns,
            "-f",
            example.to_str().unwrap(),
        ],
        "",
    );
    assert!(out.status.success(), "{}", text(&out.stderr));
    // The authorizer learns of a new binding from its watch: wait for the first yes.
    assert!(
        common::wait_until(WAIT, || may_call_sidecar(
            "alice", &operator, "create", &ns, "rpc"
        )),
        "the example's RoleBinding did not take effect"
    );
    for verb in ["create", "get", "list"] {
        for node in ["rpc", "archive"] {
            assert!(
                may_call_sidecar("alice", &operator, verb, &ns, node),
                "a sei-operators member must {verb} seinodetasks {ns}/{node}"
            );
        }
    }
    assert!(!may_call_sidecar(
        "alice",
        &operator,
        "create",
        "sei-nodes",
        "rpc"
    ));
    assert!(!may_call_sidecar(
        "bob",
        &["system:authenticated"],
        "create",
        &ns,
        "rpc"
    ));
    assert!(
        !may_call_sidecar("alice", &operator, "delete", &ns, "rpc"),
        "DELETE is not granted"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_controller_and_the_webhook_caches_work_as_the_service_account() {
    install_rbac_and_policy();
    let admin = common::client().await;
    let sa = service_account_client().await;

    // The webhook's caches sync (list/watch of Secrets and SeiNodes).
    let metrics = Arc::new(seinode_tls_webhook::metrics::WebhookMetrics::register(
        &mut prometheus_client::registry::Registry::default(),
    ));
    let (caches, watch) = seinode_tls_webhook::cache::Caches::watch(
        sa.clone(),
        metrics,
        &seinode_tls_kube::watch::WatchScope::Cluster,
    );
    let watch = tokio::spawn(watch);
    let (_, synced) = common::poll(WAIT, || async { caches.is_synced() }, |s| *s).await;
    assert!(
        synced,
        "the webhook's caches did not sync as the ServiceAccount"
    );
    watch.abort();

    // The controller, with leader election in the release namespace, takes a TLS node to Running.
    let config = common::chart::leader_config("seinode-tls", RELEASE_NS, "chart-test");
    let controller = RunningController::start(
        Controller::new(config, &mut Registry::default()).unwrap(),
        CHART.service_account_config().await,
    )
    .unwrap();

    let ns = common::namespace(&admin, "chart-sa").await;
    let dns = [
        format!("rpc.{ns}.svc.cluster.local"),
        format!("rpc-0.rpc.{ns}.svc.cluster.local"),
    ];
    let leaf = CertificateAuthority::new("issuer")
        .unwrap()
        .issue(&LeafSpec {
            common_name: "rpc",
            dns_names: &[&dns[0], &dns[1]],
            server: true,
            ..LeafSpec::default()
        })
        .unwrap();
    let secret =
        seinode_tls_testkit::tls_secret(&ns, "rpc-tls", &leaf.cert_pem, &leaf.key_pem, None);
    Api::<Secret>::namespaced(admin.clone(), &ns)
        .create(&PostParams::default(), &secret)
        .await
        .unwrap();
    let node: SeiNode = serde_json::from_value(json!({
        "apiVersion": "sei.io/v1alpha1", "kind": "SeiNode", "metadata": {"name": "rpc", "namespace": ns},
        "spec": {"chainId": "arctic-1", "image": "ghcr.io/sei-protocol/sei:v6.3.0", "fullNode": {},
                 "sidecar": {"tls": {"secretName": "rpc-tls"}}},
    }))
    .unwrap();
    let nodes: Api<SeiNode> = Api::namespaced(admin.clone(), &ns);
    nodes.create(&PostParams::default(), &node).await.unwrap();
    let sts: Api<k8s_openapi::api::apps::v1::StatefulSet> = Api::namespaced(admin.clone(), &ns);
    let (_, applied) = common::poll(
        WAIT,
        || async { sts.get_opt("rpc").await.unwrap() },
        Option::is_some,
    )
    .await;
    assert!(
        applied,
        "the controller, as the ServiceAccount, applied the StatefulSet"
    );
    common::wait_stateful_set_ready(&admin, &ns, "rpc").await;
    let (node, running) = common::poll(
        WAIT,
        || async { nodes.get("rpc").await.unwrap() },
        |n| n.status.as_ref().and_then(|s| s.phase) == Some(SeiNodePhase::Running),
    )
    .await;
    assert!(running, "not Running: {:#?}", node.status);
    controller.stop().await;
}

#[tokio::test]
async fn only_the_controller_may_write_seinode_status() {
    install_rbac_and_policy();
    let admin = common::client().await;
    let ns = common::namespace(&admin, "chart-status").await;
    let node: SeiNode = serde_json::from_value(json!({
        "apiVersion": "sei.io/v1alpha1", "kind": "SeiNode", "metadata": {"name": "rpc", "namespace": ns},
        "spec": {"chainId": "arctic-1", "image": "ghcr.io/sei-protocol/sei:v6.3.0", "fullNode": {}},
    }))
    .unwrap();
    let admin_nodes: Api<SeiNode> = Api::namespaced(admin.clone(), &ns);
    admin_nodes
        .create(&PostParams::default(), &node)
        .await
        .unwrap();
    let forged = json!({"status": {"phase": "Running"}});

    // The policy takes effect shortly after it is created: wait for the first refusal.
    let (result, refused) = common::poll(
        WAIT,
        || async {
            admin_nodes
                .patch_status("rpc", &PatchParams::default(), &Patch::Merge(&forged))
                .await
        },
        Result::is_err,
    )
    .await;
    assert!(
        refused,
        "a status write by another identity was accepted: {result:?}"
    );
    let message = result.unwrap_err().to_string();
    assert!(
        message.contains("only the seinode-tls controller may write seinodes/status"),
        "{message}"
    );
    assert!(message.contains("seinode-tls-admin may not"), "{message}");

    let sa_nodes: Api<SeiNode> = Api::namespaced(service_account_client().await, &ns);
    // As the controller writes it: a replace on the version it read (read again on a
    // conflict: another test's controller may be reconciling the same node).
    let mut result = None;
    for _ in 0..5 {
        let mut node = sa_nodes.get("rpc").await.unwrap();
        node.status = Some(SeiNodeStatus {
            phase: Some(SeiNodePhase::Pending),
            ..SeiNodeStatus::default()
        });
        match sa_nodes
            .replace_status("rpc", &PostParams::default(), &node)
            .await
        {
            Err(kube::Error::Api(status)) if status.code == 409 => continue,
            other => {
                result = Some(other);
                break;
            }
        }
    }
    result
        .expect("five conflicts in a row")
        .expect("the controller's ServiceAccount may write status");
}

/// A StatefulSet as the controller would write it for SeiNode `node` (owner reference, label,
/// the node pod's template), changed by `edit`.
fn node_stateful_set(
    ns: &str,
    node: &SeiNode,
    edit: impl FnOnce(&mut serde_json::Value),
) -> serde_json::Value {
    let mut sts = json!({
        "apiVersion": "apps/v1", "kind": "StatefulSet",
        "metadata": {"name": "rpc", "namespace": ns,
                     "labels": {"app.kubernetes.io/managed-by": "seinode-tls"},
                     "ownerReferences": [{"apiVersion": "sei.io/v1alpha1", "kind": "SeiNode",
                                          "name": "rpc", "uid": node.metadata.uid, "controller": true}]},
        "spec": {"serviceName": "rpc", "replicas": 0,
                 "selector": {"matchLabels": {"sei.io/node": "rpc"}},
                 "template": {"metadata": {"labels": {"sei.io/node": "rpc"}},
                              "spec": {"containers": [{"name": "seid", "image": "ghcr.io/sei-protocol/sei:v6.3.0"}]}}},
    });
    edit(&mut sts);
    sts
}

/// The writes the controller's RBAC allows but its policy does not: nothing in kube-system, only
/// objects it owns, StatefulSets only with the node pod's template. Each is tried as the chart's
/// ServiceAccount and refused by the API server, with the policy's message; what the controller
/// does write goes through (dry run).
#[tokio::test]
async fn the_service_account_writes_only_what_the_controller_owns() {
    install_rbac_and_policy();
    let admin = common::client().await;
    let ns = common::namespace(&admin, "chart-writes").await;
    let node: SeiNode = serde_json::from_value(json!({
        "apiVersion": "sei.io/v1alpha1", "kind": "SeiNode", "metadata": {"name": "rpc", "namespace": ns},
        "spec": {"chainId": "arctic-1", "image": "ghcr.io/sei-protocol/sei:v6.3.0", "fullNode": {}},
    }))
    .unwrap();
    let node = Api::<SeiNode>::namespaced(admin.clone(), &ns)
        .create(&PostParams::default(), &node)
        .await
        .unwrap();
    let sa = service_account_client().await;
    let dry_run = PostParams {
        dry_run: true,
        ..PostParams::default()
    };
    let create = |ns: &str, value: serde_json::Value| {
        let (sa, ns, dry_run) = (sa.clone(), ns.to_owned(), dry_run.clone());
        async move {
            let object: kube::api::DynamicObject = serde_json::from_value(value.clone()).unwrap();
            let kind = value["kind"].as_str().unwrap().to_owned();
            let resource = match kind.as_str() {
                "ConfigMap" => {
                    kube::api::ApiResource::erase::<k8s_openapi::api::core::v1::ConfigMap>(&())
                }
                "Service" => {
                    kube::api::ApiResource::erase::<k8s_openapi::api::core::v1::Service>(&())
                }
                _ => kube::api::ApiResource::erase::<k8s_openapi::api::apps::v1::StatefulSet>(&()),
            };
            let api: Api<kube::api::DynamicObject> = Api::namespaced_with(sa, &ns, &resource);
            api.create(&dry_run, &object)
                .await
                .map(|_| ())
                .map_err(|e| e.to_string())
        }
    };
    let refused = |result: Result<(), String>, says: &str| {
        let message = result.expect_err("refused");
        assert!(message.contains(says), "{message}");
    };

    // The policy takes effect shortly after it is created: wait for the first refusal.
    let config_map = |ns: &str| json!({"apiVersion": "v1", "kind": "ConfigMap", "metadata": {"name": "x", "namespace": ns}});
    let (first, in_force) = common::poll(
        WAIT,
        || create("kube-system", config_map("kube-system")),
        Result::is_err,
    )
    .await;
    assert!(
        in_force,
        "a ConfigMap in kube-system was accepted: {first:?}"
    );
    refused(first, "writes nothing in kube-system");
    refused(
        create(&ns, config_map(&ns)).await,
        "changes only configmaps it owns",
    );
    refused(
        create(&ns, json!({"apiVersion": "v1", "kind": "Service",
            "metadata": {"name": "rpc", "namespace": ns, "labels": {"app.kubernetes.io/managed-by": "seinode-tls"}},
            "spec": {"ports": [{"port": 8443}]}})).await,
        "changes only services it owns",
    );
    refused(
        create(
            &ns,
            node_stateful_set(&ns, &node, |s| {
                s["spec"]["template"]["spec"]["serviceAccountName"] = json!("admin");
            }),
        )
        .await,
        "run as the node pods' ServiceAccount (default) only",
    );
    refused(
        create(
            &ns,
            node_stateful_set(&ns, &node, |s| {
                s["spec"]["template"]["spec"]["volumes"] =
                    json!([{"name": "root", "hostPath": {"path": "/"}}]);
            }),
        )
        .await,
        "no host namespace and no hostPath volume",
    );
    refused(
        create(
            &ns,
            node_stateful_set(&ns, &node, |s| {
                // (`privileged` itself this API server refuses on its own: --allow-privileged=false.)
                s["spec"]["template"]["spec"]["containers"][0]["securityContext"] =
                    json!({"capabilities": {"add": ["NET_ADMIN"]}});
            }),
        )
        .await,
        "add no capability",
    );
    // What the controller writes goes through.
    create(&ns, node_stateful_set(&ns, &node, |_| {}))
        .await
        .expect("an owned StatefulSet with the node pod's template");
}

/// The pod spec of the rendered Deployment.
fn deployment_pod(rendered: &str) -> k8s_openapi::api::core::v1::PodSpec {
    let deployment = documents_of(rendered, &["Deployment"]);
    let deployment: k8s_openapi::api::apps::v1::Deployment =
        serde_saphyr::from_str(deployment.trim_start_matches("---\n")).expect("Deployment parses");
    deployment.spec.unwrap().template.spec.unwrap()
}

/// The container args of the rendered Deployment.
fn deployment_args(rendered: &str) -> Vec<String> {
    let containers = deployment_pod(rendered).containers;
    assert_eq!(containers.len(), 1, "one container");
    containers[0].args.clone().unwrap_or_default()
}

#[test]
fn the_deployment_passes_each_flag_once_and_the_binary_accepts_its_args() {
    for values in [
        vec![],
        own_cert_values(),
        every_controller_value(),
        every_convention_value(),
    ] {
        let args = deployment_args(&render(&values));
        // The image's entrypoint is the binary; `args` start with the subcommand.
        assert_eq!(args.first().map(String::as_str), Some("run"), "{args:?}");
        let mut seen = std::collections::BTreeSet::new();
        for arg in &args[1..] {
            let flag = arg.split('=').next().unwrap();
            assert!(seen.insert(flag), "{flag} is passed twice: {args:?}");
        }
        let argv = std::iter::once("seinode-tls").chain(args.iter().map(String::as_str));
        if let Err(error) = <seinode_tls::cli::Cli as clap::Parser>::try_parse_from(argv) {
            panic!("seinode-tls refuses the chart's args {args:?}:\n{error}");
        }
        if values
            .iter()
            .any(|v| v.starts_with("controller.nodeServiceAccount"))
        {
            assert!(args.contains(&"--node-service-account=sei-node".to_owned()));
            assert!(args.contains(&"--log-format=json".to_owned()), "{args:?}");
            assert!(
                args.contains(&"--log-level=info,seinode_tls_controller=debug".to_owned()),
                "{args:?}"
            );
        } else {
            assert!(args.contains(&"--log-format=text".to_owned()), "{args:?}");
            assert!(
                !args.iter().any(|a| a.starts_with("--log-level")),
                "{args:?}"
            );
        }
        for flag in [
            "--sidecar-client-cert-file=/sidecar-client/tls.crt",
            "--sidecar-client-key-file=/sidecar-client/tls.key",
            "--sidecar-client-ca-file=/sidecar-client/ca.crt",
        ] {
            assert!(args.contains(&flag.to_owned()), "{flag} in {args:?}");
        }
    }
}

/// The controller's client certificate reaches it: cert-manager's Secret, or the one named in
/// `sidecarClient.secretName`, mounted read-only where the flags point.
#[test]
fn the_deployment_mounts_the_sidecar_client_secret_in_both_certificate_modes() {
    for (values, secret) in [
        (vec![], "seinode-tls-sidecar-client"),
        (own_cert_values(), SIDECAR_CLIENT_SECRET),
    ] {
        let pod = deployment_pod(&render(&values));
        let volume = pod
            .volumes
            .unwrap_or_default()
            .into_iter()
            .find(|v| v.name == "sidecar-client")
            .expect("a sidecar-client volume");
        assert_eq!(
            volume.secret.and_then(|s| s.secret_name).as_deref(),
            Some(secret)
        );
        let mount = pod.containers[0]
            .volume_mounts
            .clone()
            .unwrap_or_default()
            .into_iter()
            .find(|m| m.name == "sidecar-client")
            .expect("the sidecar-client volume is mounted");
        assert_eq!(mount.mount_path, "/sidecar-client");
        assert_eq!(mount.read_only, Some(true));
    }
}

/// Without cert-manager the chart cannot issue the controller's client certificate: it refuses
/// to render without `sidecarClient.secretName`, saying so.
#[test]
fn without_cert_manager_the_chart_requires_the_sidecar_client_secret() {
    let chart = chart_dir();
    let out = common::helm(&[
        "template",
        RELEASE,
        chart.to_str().unwrap(),
        "--namespace",
        RELEASE_NS,
        "--set",
        "tls.certManager.enabled=false",
        "--set",
        "tls.secretName=seinode-tls-webhook",
        "--set",
        "tls.caBundle=not-checked-by-helm",
    ]);
    assert!(
        !out.status.success(),
        "rendered without sidecarClient.secretName"
    );
    let stderr = text(&out.stderr);
    assert!(
        stderr
            .contains("sidecarClient.secretName is required when tls.certManager.enabled is false"),
        "{stderr}"
    );
}

/// The chart's webhook registrations and `webhook/src/registration.rs` (what `local` and the
/// tests register) are the same rules: operations, match conditions, failure and side-effect
/// policies, and the namespaces they apply to, cluster-wide and with `watchNamespaces`.
#[test]
fn the_charts_webhooks_match_the_registration_code() {
    use seinode_tls_kube::watch::WatchScope;
    use seinode_tls_webhook::registration::{
        Endpoint, mutating_configuration, validating_configuration,
    };
    let endpoint = Endpoint::Url("https://example.invalid".to_owned());
    // The chart always excludes kube-system and its own namespace.
    let excluded = ["kube-system".to_owned(), RELEASE_NS.to_owned()];
    let watched = WatchScope::Namespaces(vec!["sei-a".to_owned(), "sei-b".to_owned()]);
    for (scope, values) in [
        (WatchScope::Cluster, vec![]),
        (
            watched,
            vec![
                "--set".to_owned(),
                "watchNamespaces={sei-a,sei-b}".to_owned(),
            ],
        ),
    ] {
        let code = [
            serde_json::to_value(validating_configuration(
                &endpoint, b"ca", &excluded, &scope,
            ))
            .unwrap(),
            serde_json::to_value(mutating_configuration(&endpoint, b"ca", &excluded, &scope))
                .unwrap(),
        ];
        let rendered = render(&values);
        let chart: Vec<serde_json::Value> = rendered
            .split("\n---")
            .filter_map(|doc| serde_saphyr::from_str::<serde_json::Value>(doc).ok())
            .filter(|doc| {
                doc["kind"]
                    .as_str()
                    .is_some_and(|k| k.ends_with("WebhookConfiguration"))
            })
            .collect();
        assert_eq!(chart.len(), 2, "two configurations in the chart");
        let fields = [
            "rules",
            "matchConditions",
            "failurePolicy",
            "sideEffects",
            "matchPolicy",
            "reinvocationPolicy",
            "admissionReviewVersions",
            "namespaceSelector",
        ];
        for expected in &code {
            let kind = expected["kind"].as_str().unwrap();
            let rendered = chart.iter().find(|c| c["kind"] == kind).unwrap();
            for hook in expected["webhooks"].as_array().unwrap() {
                let name = hook["name"].as_str().unwrap();
                let other = rendered["webhooks"]
                    .as_array()
                    .unwrap()
                    .iter()
                    .find(|h| h["name"] == name)
                    .unwrap_or_else(|| panic!("{kind} {name} is not in the chart"));
                for field in fields {
                    assert_eq!(
                        other[field], hook[field],
                        "{kind} {name}: {field} ({scope:?})"
                    );
                }
            }
        }
    }
}

/// The optional NetworkPolicy selects exactly the webhook pods, admits `webhookFrom` to the
/// admission port and `metricsFrom` to the health port by the container's own port names, and
/// is accepted by the API server. Enabled without `webhookFrom` (which would fail every SeiNode
/// CREATE) the chart refuses to render, saying what to set.
#[test]
fn the_network_policy_admits_the_api_server_to_the_webhook_and_monitoring_to_metrics() {
    use k8s_openapi::api::networking::v1::NetworkPolicy;
    assert!(
        !render(&[]).contains("\nkind: NetworkPolicy\n"),
        "off by default"
    );
    let values: Vec<String> = [
        "networkPolicy.enabled=true",
        "networkPolicy.webhookFrom[0].ipBlock.cidr=172.18.0.0/16",
        "networkPolicy.metricsFrom[0].namespaceSelector.matchLabels.name=monitoring",
    ]
    .iter()
    .flat_map(|value| ["--set".to_owned(), (*value).to_owned()])
    .collect();
    let rendered = render(&values);
    let policy = documents_of(&rendered, &["NetworkPolicy"]);
    let policy: NetworkPolicy =
        serde_saphyr::from_str(policy.trim_start_matches("---\n")).expect("NetworkPolicy parses");
    let spec = policy.spec.unwrap();

    let deployment = documents_of(&rendered, &["Deployment"]);
    let deployment: k8s_openapi::api::apps::v1::Deployment =
        serde_saphyr::from_str(deployment.trim_start_matches("---\n")).unwrap();
    let template = deployment.spec.unwrap().template;
    let pod_labels = template.metadata.unwrap().labels.unwrap();
    for (key, value) in spec.pod_selector.clone().unwrap().match_labels.unwrap() {
        assert_eq!(
            pod_labels.get(&key),
            Some(&value),
            "selects the webhook pods"
        );
    }
    let port_names: Vec<String> = template.spec.unwrap().containers[0]
        .ports
        .clone()
        .unwrap()
        .into_iter()
        .filter_map(|p| p.name)
        .collect();

    let rules = spec.ingress.unwrap();
    let peers_of = |port: &str| -> serde_json::Value {
        assert!(
            port_names.iter().any(|p| p == port),
            "the pod has port {port}"
        );
        let rule = rules
            .iter()
            .find(|rule| {
                rule.ports.iter().flatten().any(|p| {
                    p.port
                        == Some(
                            k8s_openapi::apimachinery::pkg::util::intstr::IntOrString::String(
                                port.to_owned(),
                            ),
                        )
                })
            })
            .unwrap_or_else(|| panic!("a rule for port {port}"));
        serde_json::to_value(&rule.from).unwrap()
    };
    assert_eq!(
        peers_of("webhook"),
        json!([{"ipBlock": {"cidr": "172.18.0.0/16"}}])
    );
    assert_eq!(
        peers_of("health"),
        json!([{"namespaceSelector": {"matchLabels": {"name": "monitoring"}}}])
    );
    assert_eq!(rules.len(), 2, "nothing else is admitted");

    install_crds();
    ensure_namespace(RELEASE_NS);
    let stdout = common::chart::server_dry_run(&documents_of(&rendered, &["NetworkPolicy"]));
    assert!(
        stdout.contains("networkpolicy.networking.k8s.io/seinode-tls"),
        "{stdout}"
    );

    // Enabled with no API server peers: refused at render time, with what to set.
    let out = common::helm(&[
        "template",
        RELEASE,
        chart_dir().to_str().unwrap(),
        "--set",
        "networkPolicy.enabled=true",
    ]);
    assert!(!out.status.success());
    assert!(
        text(&out.stderr).contains("networkPolicy.webhookFrom"),
        "{}",
        text(&out.stderr)
    );
}

/// The disruption budget lets a drain through with one replica as with two (at most one pod
/// evicted at a time), and both monitors keep the per-node series' own `namespace` label.
#[test]
fn the_budget_never_blocks_a_drain_and_the_monitors_keep_the_nodes_namespace() {
    for replicas in ["1", "2"] {
        let rendered = render(&["--set".to_owned(), format!("replicaCount={replicas}")]);
        let pdb = documents_of(&rendered, &["PodDisruptionBudget"]);
        let pdb: k8s_openapi::api::policy::v1::PodDisruptionBudget =
            serde_saphyr::from_str(pdb.trim_start_matches("---\n")).expect("the PDB parses");
        let spec = pdb.spec.unwrap();
        assert_eq!(
            spec.max_unavailable,
            Some(k8s_openapi::apimachinery::pkg::util::intstr::IntOrString::Int(1)),
            "replicaCount {replicas}"
        );
        assert_eq!(spec.min_available, None, "replicaCount {replicas}");
    }
    let rendered = render(
        &[
            "monitoring.serviceMonitor.enabled=true",
            "monitoring.podMonitor.enabled=true",
        ]
        .iter()
        .flat_map(|v| ["--set".to_owned(), (*v).to_owned()])
        .collect::<Vec<_>>(),
    );
    for (kind, endpoints) in [
        ("ServiceMonitor", "endpoints"),
        ("PodMonitor", "podMetricsEndpoints"),
    ] {
        let monitor = documents_of(&rendered, &[kind]);
        let monitor: serde_json::Value =
            serde_saphyr::from_str(monitor.trim_start_matches("---\n")).expect("parses");
        assert_eq!(
            monitor["spec"][endpoints][0]["honorLabels"], true,
            "{kind}: {monitor}"
        );
    }
}

#[test]
fn the_schema_refuses_bad_values_and_unknown_keys_naming_them() {
    for (value, named) in [
        ("webhook.secretPolicy=allow", "/webhook/secretPolicy"),
        (
            "webhook.secretGuardPolicy=ignore",
            "/webhook/secretGuardPolicy",
        ),
        ("logging.format=yaml", "/logging/format"),
        ("webhook.secretPolcy=warn", "'secretPolcy'"),
        ("replicaCont=3", "'replicaCont'"),
        (
            "podDisruptionBudget.maxUnavailable=0",
            "/podDisruptionBudget/maxUnavailable",
        ),
        (
            "controller.certExpiryWarning=7d",
            "/controller/certExpiryWarning",
        ),
        (
            "tls.certManager.duration=90days",
            "/tls/certManager/duration",
        ),
        (
            "monitoring.serviceMonitor.interval=often",
            "/monitoring/serviceMonitor/interval",
        ),
        ("image.digest=sha256:abc", "/image/digest"),
        (
            "webhook.excludedNamespaces={Sei_A}",
            "/webhook/excludedNamespaces/0",
        ),
        ("webhook.port=70000", "/webhook/port"),
        // Replaced by controller.certExpiryWarning.
        (
            "monitoring.prometheusRule.expiryWarningSeconds=604800",
            "'expiryWarningSeconds'",
        ),
        (
            "monitoring.prometheusRule.servingCertificateExpiryWarningSeconds=604800",
            "'servingCertificateExpiryWarningSeconds'",
        ),
    ] {
        let message = refusal(&sets(&[value]));
        assert!(
            message.contains("values don't meet the specifications of the schema")
                && message.contains(named),
            "{value}: {message}"
        );
    }
    // The values' documented shape: a label value is a string, and so is an env var's.
    for (values, named) in [
        (sets(&["commonLabels.team=1"]), "/commonLabels/team"),
        (
            sets(&["extraEnv[0].name=RUST_BACKTRACE", "extraEnv[0].value=1"]),
            "/extraEnv/0/value",
        ),
    ] {
        let message = refusal(&values);
        assert!(message.contains(named), "{values:?}: {message}");
    }
    // A number given as a string is what --set-string is for.
    render(&["--set-string".to_owned(), "commonLabels.team=1".to_owned()]);

    // `helm install` checks the same schema, before it talks to the cluster.
    let chart = chart_dir();
    let out = common::helm(&[
        "install",
        RELEASE,
        chart.to_str().unwrap(),
        "--namespace",
        RELEASE_NS,
        "--dry-run=client",
        "--set",
        "webhook.secretPolicy=allow",
    ]);
    assert!(!out.status.success(), "installed secretPolicy=allow");
    let message = text(&out.stderr);
    assert!(message.contains("/webhook/secretPolicy"), "{message}");
}

/// `extraArgs` come after the chart's own (and the binary accepts them), `extraEnv` after the
/// pod's name and namespace, `extraVolumes` and `extraVolumeMounts` beside the certificates';
/// the API server accepts the result.
#[test]
fn the_extra_args_env_and_volumes_reach_the_container() {
    let values = every_convention_value();
    let rendered = render(&values);
    let args = deployment_args(&rendered);
    assert_eq!(
        args[args.len() - 2..],
        [
            "--sidecar-ca-bundle=/sidecar-ca/ca.crt",
            "--sidecar-probe-interval=1m"
        ],
        "appended: {args:?}"
    );
    let argv = std::iter::once("seinode-tls").chain(args.iter().map(String::as_str));
    let cli = <seinode_tls::cli::Cli as clap::Parser>::try_parse_from(argv)
        .unwrap_or_else(|error| panic!("seinode-tls refuses {args:?}:\n{error}"));
    let debug = format!("{cli:?}");
    assert!(
        debug.contains("sidecar_ca_bundle: Some(\"/sidecar-ca/ca.crt\")")
            && debug.contains("sidecar_probe_interval: 60s"),
        "{debug}"
    );

    let pod = deployment_pod(&rendered);
    let container = &pod.containers[0];
    let env: Vec<(String, Option<String>)> = container
        .env
        .clone()
        .unwrap_or_default()
        .into_iter()
        .map(|e| (e.name, e.value))
        .collect();
    assert_eq!(
        env.iter()
            .map(|(name, _)| name.as_str())
            .collect::<Vec<_>>(),
        ["POD_NAME", "POD_NAMESPACE", "RUST_BACKTRACE"]
    );
    assert_eq!(env[2].1.as_deref(), Some("full"));
    let volumes = pod.volumes.clone().unwrap_or_default();
    assert_eq!(
        volumes.iter().map(|v| v.name.as_str()).collect::<Vec<_>>(),
        ["tls", "sidecar-client", "sidecar-ca"]
    );
    assert_eq!(
        volumes[2].config_map.as_ref().map(|c| c.name.as_str()),
        Some("sidecar-ca")
    );
    let mounts = container.volume_mounts.clone().unwrap_or_default();
    let mount = mounts
        .iter()
        .find(|m| m.name == "sidecar-ca")
        .unwrap_or_else(|| panic!("sidecar-ca is mounted: {mounts:?}"));
    assert_eq!(
        (mount.mount_path.as_str(), mount.read_only),
        ("/sidecar-ca", Some(true))
    );
    assert_eq!(mounts.len(), 3, "{mounts:?}");

    // Without them, nothing is added.
    let pod = deployment_pod(&render(&[]));
    assert_eq!(pod.containers[0].env.as_ref().map(Vec::len), Some(2));
    assert_eq!(pod.volumes.as_ref().map(Vec::len), Some(2));

    ensure_namespace(RELEASE_NS);
    let stdout = common::chart::server_dry_run(&documents_of(&rendered, &["Deployment"]));
    assert!(stdout.contains("deployment.apps/tls-x"), "{stdout}");
}

/// The image is the chart's appVersion by default, `image.tag` when set, and
/// `repository@digest` whenever `image.digest` is set, whatever the tag.
#[test]
fn the_image_digest_takes_precedence_over_the_tag() {
    let image = |values: &[String]| -> String {
        deployment_pod(&render(values)).containers[0]
            .image
            .clone()
            .unwrap()
    };
    let repository = "ghcr.io/sei-protocol/seinode-tls";
    assert_eq!(image(&[]), format!("{repository}:0.1.0"));
    assert_eq!(image(&sets(&["image.tag=v9"])), format!("{repository}:v9"));
    let digest = format!("image.digest={IMAGE_DIGEST}");
    assert_eq!(
        image(&sets(&["image.tag=v9", &digest])),
        format!("{repository}@{IMAGE_DIGEST}")
    );
    assert_eq!(
        image(&sets(&[&digest])),
        format!("{repository}@{IMAGE_DIGEST}")
    );
}

/// Pod Security Admission's verdict on the rendered Deployment in a namespace that warns at the
/// restricted level: the violations it reports (empty when none).
fn restricted_violations(values: &[String]) -> String {
    const NS: &str = "seinode-tls-restricted";
    let namespace = format!(
        "apiVersion: v1\nkind: Namespace\nmetadata:\n  name: {NS}\n  labels:\n    \
         pod-security.kubernetes.io/warn: restricted\n"
    );
    let out = common::kubectl(&["apply", "--server-side", "-f", "-"], &namespace);
    assert!(out.status.success(), "{}", text(&out.stderr));
    let release = Release {
        name: RELEASE,
        namespace: NS,
    };
    let deployment = documents_of(&release.render(values), &["Deployment"]);
    let out = common::kubectl(
        &["apply", "--server-side", "--dry-run=server", "-f", "-"],
        &deployment,
    );
    assert!(out.status.success(), "{}", text(&out.stderr));
    assert!(
        text(&out.stdout).contains("deployment.apps/"),
        "{}",
        text(&out.stdout)
    );
    text(&out.stderr)
        .lines()
        .filter(|line| line.contains("would violate PodSecurity"))
        .collect()
}

/// The defaults are today's: UID and GID 65532, non-root, RuntimeDefault seccomp, no privilege
/// escalation, a read-only root and no capabilities, which the API server's Pod Security
/// Admission finds restricted. OpenShift's install (`runAsUser`/`runAsGroup` null, or "") leaves
/// the IDs out and is still restricted; a field can be overridden, and a default dropped that
/// the restricted level needs is reported.
#[test]
fn the_security_contexts_are_restricted_by_default_and_can_leave_the_ids_to_openshift() {
    let pod = deployment_pod(&render(&[]));
    let security = pod.security_context.clone().unwrap();
    assert_eq!(security.run_as_user, Some(65532));
    assert_eq!(security.run_as_group, Some(65532));
    assert_eq!(security.run_as_non_root, Some(true));
    assert_eq!(
        security.seccomp_profile.map(|p| p.type_),
        Some("RuntimeDefault".to_owned())
    );
    let container = pod.containers[0].security_context.clone().unwrap();
    assert_eq!(container.allow_privilege_escalation, Some(false));
    assert_eq!(container.read_only_root_filesystem, Some(true));
    assert_eq!(
        container.capabilities.and_then(|c| c.drop),
        Some(vec!["ALL".to_owned()])
    );
    assert_eq!(restricted_violations(&[]), "");

    for openshift in [
        every_convention_value(),
        sets(&[
            "podSecurityContext.runAsUser=null",
            "podSecurityContext.runAsGroup=null",
        ]),
        sets(&[
            "podSecurityContext.runAsUser=",
            "podSecurityContext.runAsGroup=",
        ]),
    ] {
        let pod = deployment_pod(&render(&openshift));
        let security = pod.security_context.clone().unwrap();
        assert_eq!(
            (security.run_as_user, security.run_as_group),
            (None, None),
            "{openshift:?}"
        );
        assert_eq!(security.run_as_non_root, Some(true), "{openshift:?}");
        assert_eq!(
            pod.containers[0].security_context,
            deployment_pod(&render(&[])).containers[0].security_context,
            "{openshift:?}"
        );
        assert_eq!(restricted_violations(&openshift), "", "{openshift:?}");
    }

    let pod = deployment_pod(&render(&sets(&[
        "podSecurityContext.fsGroup=2000",
        "securityContext.readOnlyRootFilesystem=false",
    ])));
    assert_eq!(pod.security_context.unwrap().fs_group, Some(2000));
    assert_eq!(
        pod.containers[0]
            .security_context
            .as_ref()
            .unwrap()
            .read_only_root_filesystem,
        Some(false)
    );

    let violations =
        restricted_violations(&sets(&["securityContext.allowPrivilegeEscalation=null"]));
    assert!(
        violations.contains("allowPrivilegeEscalation"),
        "{violations:?}"
    );
}

/// With `serviceAccount.create=false` the chart creates no ServiceAccount and runs as, binds
/// and trusts the one named; without a name it refuses to render, saying what to set.
#[test]
fn an_existing_service_account_is_used_and_bound_instead_of_a_created_one() {
    let message = refusal(&sets(&["serviceAccount.create=false"]));
    assert!(
        message.contains("serviceAccount.name is required when serviceAccount.create is false"),
        "{message}"
    );

    // The ServiceAccount subjects of the release's bindings (the helm test's hooks bind their
    // own), and the identities the policies name.
    let bound = |rendered: &str| -> Vec<String> {
        objects(rendered)
            .iter()
            .filter(|o| o["metadata"]["annotations"]["helm.sh/hook"].is_null())
            .flat_map(|o| o["subjects"].as_array().cloned().unwrap_or_default())
            .filter(|s| s["kind"] == "ServiceAccount")
            .map(|s| {
                format!(
                    "{}/{}",
                    s["namespace"].as_str().unwrap(),
                    s["name"].as_str().unwrap()
                )
            })
            .collect()
    };
    let default = render(&[]);
    let existing = render(&sets(&[
        "serviceAccount.create=false",
        "serviceAccount.name=existing-sa",
    ]));
    // The helm test's hook has a ServiceAccount of its own, created only for `helm test`.
    let release_service_account = |o: &serde_json::Value| {
        o["kind"] == "ServiceAccount" && o["metadata"]["annotations"]["helm.sh/hook"].is_null()
    };
    let created: Vec<_> = objects(&default)
        .into_iter()
        .filter(release_service_account)
        .collect();
    assert_eq!(created.len(), 1, "the default creates one");
    assert!(
        !objects(&existing).iter().any(release_service_account),
        "creates none"
    );
    assert_eq!(
        deployment_pod(&existing).service_account_name.as_deref(),
        Some("existing-sa")
    );
    let default_bound = bound(&default);
    assert!(!default_bound.is_empty());
    assert!(
        default_bound
            .iter()
            .all(|s| s == &format!("{RELEASE_NS}/{RELEASE}"))
    );
    assert_eq!(
        bound(&existing),
        vec![format!("{RELEASE_NS}/existing-sa"); default_bound.len()]
    );
    // The admission policies (status writes, the controller's own writes) name the account.
    let user = format!("system:serviceaccount:{RELEASE_NS}:");
    let policies = default.matches(&format!("{user}{RELEASE}'")).count();
    assert_eq!(policies, 2, "both policies name the chart's account");
    assert_eq!(
        existing.matches(&format!("{user}existing-sa'")).count(),
        policies
    );
    assert!(!existing.contains(&format!("{user}{RELEASE}'")));
}

/// `nameOverride` and `fullnameOverride` rename every object and the selector labels alike (so
/// the selectors still find the pods); `commonLabels` reach every object the chart renders and
/// its pods, without replacing the chart's own labels. The CRD, from `crds/`, is not templated.
#[test]
fn name_overrides_and_common_labels_reach_every_object() {
    let mut values = every_optional_object();
    values.extend(every_convention_value());
    let rendered = render(&values);
    let all = objects(&rendered);
    assert!(all.len() > 20, "{} objects", all.len());
    for object in &all {
        let kind = object["kind"].as_str().unwrap();
        let name = object["metadata"]["name"].as_str().unwrap();
        let labels = &object["metadata"]["labels"];
        if kind == "CustomResourceDefinition" {
            assert!(labels.get("team").is_none(), "{name}: {labels}");
            continue;
        }
        assert!(
            name == "tls-x" || name.starts_with("tls-x-"),
            "{kind} {name} is named after fullnameOverride"
        );
        assert_eq!(labels["team"], "sei", "{kind} {name}: {labels}");
        assert_eq!(
            labels["app.kubernetes.io/name"], "stls",
            "{kind} {name}: {labels}"
        );
        assert_eq!(
            labels["app.kubernetes.io/instance"], RELEASE,
            "{kind} {name}"
        );
        assert_eq!(
            labels["helm.sh/chart"], "seinode-tls-0.1.0",
            "{kind} {name}"
        );
    }
    let deployment = all.iter().find(|o| o["kind"] == "Deployment").unwrap();
    let pod_labels = &deployment["spec"]["template"]["metadata"]["labels"];
    assert_eq!(pod_labels["team"], "sei", "{pod_labels}");
    let selector = json!({"app.kubernetes.io/name": "stls", "app.kubernetes.io/instance": RELEASE});
    assert_eq!(deployment["spec"]["selector"]["matchLabels"], selector);
    // Every selector of the release's pods selects them.
    for (kind, path) in [
        ("Service", "/spec/selector"),
        ("PodDisruptionBudget", "/spec/selector/matchLabels"),
        ("NetworkPolicy", "/spec/podSelector/matchLabels"),
        ("ServiceMonitor", "/spec/selector/matchLabels"),
        ("PodMonitor", "/spec/selector/matchLabels"),
        (
            "Deployment",
            "/spec/template/spec/topologySpreadConstraints/0/labelSelector/matchLabels",
        ),
    ] {
        let object = all.iter().find(|o| o["kind"] == kind).unwrap();
        let selector = object
            .pointer(path)
            .unwrap_or_else(|| panic!("{kind} {path}"));
        for (key, value) in selector.as_object().unwrap() {
            assert_eq!(&pod_labels[key], value, "{kind} selects {key}");
        }
    }
    // The Lease and the webhooks' CA injection follow the full name.
    assert!(deployment_args(&rendered).contains(&"--leader-election-name=tls-x".to_owned()));
    assert!(rendered.contains(&format!(
        "cert-manager.io/inject-ca-from: {RELEASE_NS}/tls-x\n"
    )));

    install_crds();
    ensure_namespace(RELEASE_NS);
    // Everything but the CRD (cert-manager's and the monitors' are installed; ours is the
    // cluster's own) and the helm test's Pod (its ServiceAccount exists only once the hook ran),
    // whatever kinds the chart adds.
    let without_crds: Vec<String> = rendered
        .split("\n---")
        .filter(|doc| {
            doc.contains("\nkind: ")
                && !doc.contains("\nkind: CustomResourceDefinition\n")
                && !doc.contains("\nkind: Pod\n")
        })
        .map(|doc| format!("---\n{}\n", doc.trim_start_matches('-')))
        .collect();
    let stdout = common::chart::server_dry_run(&without_crds.concat());
    assert_eq!(stdout.lines().count(), without_crds.len(), "{stdout}");
    assert_eq!(
        without_crds.len(),
        all.len() - 2,
        "all but the CRD and the test Pod"
    );
}

/// The helm test's ServiceAccount (templates/tests/check.yaml) may read, by name, what
/// `seinode-tls check` reads and nothing else; of writes, only access reviews and SeiNodes,
/// and its policy lets a SeiNode through only as a dry run.
#[tokio::test(flavor = "multi_thread")]
async fn the_helm_tests_service_account_reads_what_check_reads_and_sends_only_dry_runs() {
    // Applies every ServiceAccount, role, binding and policy the chart renders, the test's too.
    install_rbac_and_policy();
    let user = format!("system:serviceaccount:{RELEASE_NS}:{RELEASE}-test");
    for allowed in [
        &[
            "get",
            "customresourcedefinitions.apiextensions.k8s.io/seinodes.sei.io",
        ][..],
        &[
            "get",
            "validatingwebhookconfigurations.admissionregistration.k8s.io/seinode-tls",
        ],
        &[
            "get",
            "mutatingwebhookconfigurations.admissionregistration.k8s.io/seinode-tls",
        ],
        &["get", "namespaces/default"],
        &["create", "subjectaccessreviews.authorization.k8s.io"],
        &["create", "seinodes.sei.io", "-n", "default"],
        &["get", "deployments.apps/seinode-tls", "-n", RELEASE_NS],
        &[
            "get",
            "leases.coordination.k8s.io/seinode-tls",
            "-n",
            RELEASE_NS,
        ],
    ] {
        assert!(can_i_as(&user, allowed), "{allowed:?} is allowed");
    }
    for denied in [
        &["get", "secrets", "-n", RELEASE_NS][..],
        &["list", "seinodes.sei.io", "-A"],
        &["get", "seinodes.sei.io", "-n", "default"],
        &["delete", "seinodes.sei.io", "-n", "default"],
        &["update", "seinodes.sei.io", "-n", "default"],
        &[
            "get",
            "customresourcedefinitions.apiextensions.k8s.io/other.example.com",
        ],
        &[
            "get",
            "validatingwebhookconfigurations.admissionregistration.k8s.io/other",
        ],
        &["list", "namespaces"],
        &["create", "pods", "-n", RELEASE_NS],
        &["get", "deployments.apps/other", "-n", RELEASE_NS],
        &[
            "update",
            "leases.coordination.k8s.io/seinode-tls",
            "-n",
            RELEASE_NS,
        ],
    ] {
        assert!(!can_i_as(&user, denied), "{denied:?} is denied");
    }

    let client = common::client().await;
    let ns = common::namespace(&client, "helm-test").await;
    let node = serde_json::to_string(&common::plain_node(&ns, "dry")).unwrap();
    let as_user = format!("--as={user}");
    let out = common::kubectl(&["create", "--dry-run=server", &as_user, "-f", "-"], &node);
    assert!(out.status.success(), "a dry run: {}", text(&out.stderr));
    // The policy is enforced once the API server has loaded it: until then a create may go
    // through, which is undone and tried again.
    let nodes: Api<SeiNode> = Api::namespaced(client.clone(), &ns);
    let (out, refused) = common::poll(
        WAIT,
        || async {
            let out = common::kubectl(&["create", &as_user, "-f", "-"], &node);
            if out.status.success() {
                nodes.delete("dry", &Default::default()).await.unwrap();
            }
            out
        },
        |out| !out.status.success(),
    )
    .await;
    assert!(refused, "a real create went through: {}", text(&out.stdout));
    assert!(
        text(&out.stderr).contains("sends SeiNodes as dry runs only"),
        "{}",
        text(&out.stderr)
    );
}

/// The (group, resource, verb) triples the rendered `kind` named `name` grants.
fn granted(
    rendered: &str,
    kind: &str,
    name: &str,
) -> std::collections::BTreeSet<(String, String, String)> {
    let documents = documents_of(rendered, &[kind]);
    let role = documents
        .split("\n---")
        .map(|doc| doc.trim_start_matches("---\n").trim_start_matches('\n'))
        .filter(|doc| !doc.trim().is_empty())
        .map(|doc| serde_saphyr::from_str::<serde_json::Value>(doc).unwrap())
        .find(|role| role["kind"] == kind && role["metadata"]["name"] == name)
        .unwrap_or_else(|| panic!("no {kind} {name} in the chart"));
    let strings = |value: &serde_json::Value| -> Vec<String> {
        value
            .as_array()
            .into_iter()
            .flatten()
            .map(|v| v.as_str().unwrap().to_owned())
            .collect()
    };
    let mut triples = std::collections::BTreeSet::new();
    for rule in role["rules"].as_array().unwrap() {
        for group in strings(&rule["apiGroups"]) {
            for resource in strings(&rule["resources"]) {
                for verb in strings(&rule["verbs"]) {
                    triples.insert((group.clone(), resource.clone(), verb));
                }
            }
        }
    }
    triples
}

/// `seinode-tls check` asks the API server about exactly what the chart grants the controller,
/// so the two cannot drift apart.
#[test]
fn check_asks_about_exactly_the_access_the_chart_grants() {
    let rendered = render(&[]);
    let asked: std::collections::BTreeSet<(String, String, String)> = seinode_tls::check::RULES
        .iter()
        .flat_map(|(group, resource, verbs)| {
            verbs.iter().map(|verb| {
                (
                    (*group).to_owned(),
                    (*resource).to_owned(),
                    (*verb).to_owned(),
                )
            })
        })
        .collect();
    assert_eq!(asked, granted(&rendered, "ClusterRole", RELEASE));
    let leases: std::collections::BTreeSet<_> = seinode_tls::check::LEASE_VERBS
        .iter()
        .map(|verb| {
            (
                "coordination.k8s.io".to_owned(),
                "leases".to_owned(),
                (*verb).to_owned(),
            )
        })
        .collect();
    assert_eq!(
        leases,
        granted(&rendered, "Role", &format!("{RELEASE}-leader-election"))
    );
}
