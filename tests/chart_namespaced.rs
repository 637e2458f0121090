//! The chart's namespace-scoped install (`watchNamespaces`) against a real API server: it renders
//! Roles in the watched namespaces and grants nothing cluster-wide (its only ClusterRoles, the
//! sidecar task roles, are bound per watched namespace or not at all); `kubectl auth can-i`
//! proves its ServiceAccount may act in the watched namespaces only, and a SubjectAccessReview
//! that the controller's client certificate user may call the sidecars there only; and the
//! webhook and the controller,
//! run in namespaced mode as that ServiceAccount, get ready, decide the SeiNodes of the watched
//! namespaces, leave the others alone and never hit a Forbidden.
//!
//! A test binary of its own (one cluster each): the cluster-wide release of tests/chart.rs would
//! otherwise reconcile the unwatched namespace and its status policy refuse this release's writes.

#![allow(clippy::expect_used, clippy::unwrap_used)]

mod common;

use std::fmt::Write as _;
use std::net::{Ipv4Addr, SocketAddr};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::Duration;

use common::chart::{Release, ensure_namespace, may_call_sidecar, text};
use futures::StreamExt;
use k8s_openapi::api::apps::v1::StatefulSet;
use k8s_openapi::api::core::v1::Secret;
use kube::api::{Api, PostParams};
use kube::runtime::watcher;
use prometheus_client::registry::Registry;
use seinode_tls::local::RunningController;
use seinode_tls_controller::Controller;
use seinode_tls_crds::SeiNode;
use seinode_tls_kube::versions::watch_tls_secrets;
use seinode_tls_kube::watch::WatchScope;
use seinode_tls_testkit::{CertificateAuthority, LeafSpec};
use seinode_tls_webhook::{Webhook, WebhookConfig};
use serde_json::json;

const SCOPED: Release = Release {
    name: "seinode-tls-scoped",
    namespace: "seinode-tls-scoped-system",
};
const WATCHED: [&str; 2] = ["scoped-a", "scoped-b"];
const UNWATCHED: &str = "scoped-c";
const WAIT: Duration = Duration::from_secs(30);
/// `sidecarClient.user` of this release. Not the chart's default: the test cluster itself grants
/// the default user `seinodetasks` everywhere (for the controllers the tests run), which would
/// answer for the chart's bindings.
const SIDECAR_CLIENT_USER: &str = "seinode-tls-scoped:sidecar-client";

fn scope() -> WatchScope {
    WatchScope::Namespaces(WATCHED.map(str::to_owned).to_vec())
}

/// The "own certificate" values (the serving Secret and CA bundle, and the Secret of the
/// controller's sidecar client certificate, which the chart requires without cert-manager;
/// nothing here runs the Deployment, so neither Secret has to exist), [`SIDECAR_CLIENT_USER`],
/// watching [`WATCHED`].
fn values() -> Vec<String> {
    let mut values = common::chart::own_cert_values();
    values.extend([
        "--set".to_owned(),
        "sidecarClient.secretName=seinode-tls-scoped-sidecar-client".to_owned(),
        "--set".to_owned(),
        format!("sidecarClient.user={SIDECAR_CLIENT_USER}"),
        "--set".to_owned(),
        format!("watchNamespaces={{{}}}", WATCHED.join(",")),
    ]);
    values
}

/// The namespaces, then the release's ServiceAccount, Roles and status policy, once.
fn install() {
    static DONE: OnceLock<()> = OnceLock::new();
    DONE.get_or_init(|| {
        for ns in WATCHED.iter().chain([&UNWATCHED]) {
            ensure_namespace(ns);
        }
        SCOPED.install_rbac_and_policy(&values());
    });
}

/// The rendered documents as JSON values.
fn documents(rendered: &str) -> Vec<serde_json::Value> {
    rendered
        .split("\n---")
        .filter_map(|doc| serde_saphyr::from_str::<serde_json::Value>(doc).ok())
        .filter(|doc| doc.get("kind").is_some())
        .collect()
}

#[test]
fn the_chart_renders_roles_in_the_watched_namespaces_and_grants_nothing_cluster_wide() {
    // What the release keeps; the `helm test` hooks (its ServiceAccount's ClusterRole, which
    // reads cluster-scoped objects by name) exist only while a test runs, and are checked last.
    let (tests, docs): (Vec<_>, Vec<_>) = documents(&SCOPED.render(&values()))
        .into_iter()
        .partition(|d| d["metadata"]["annotations"]["helm.sh/hook"] == "test");
    let of_kind = |kind: &str| -> Vec<&serde_json::Value> {
        docs.iter().filter(|d| d["kind"] == kind).collect()
    };
    // The only ClusterRoles are the sidecar task roles (a virtual resource only the node proxies
    // ask about), and nothing binds them cluster-wide.
    let mut cluster_roles: Vec<&str> = of_kind("ClusterRole")
        .iter()
        .map(|d| d["metadata"]["name"].as_str().unwrap())
        .collect();
    cluster_roles.sort_unstable();
    assert_eq!(
        cluster_roles,
        [
            format!("{}-sidecar-client", SCOPED.name),
            format!("{}-sidecar-operator", SCOPED.name)
        ]
    );
    let task_rules = json!([{"apiGroups": ["sei.io"], "resources": ["seinodetasks"],
                             "verbs": ["create", "get", "list"]}]);
    for role in of_kind("ClusterRole") {
        assert_eq!(role["rules"], task_rules, "{}", role["metadata"]["name"]);
    }
    assert!(
        of_kind("ClusterRoleBinding").is_empty(),
        "no ClusterRoleBinding"
    );
    let namespaces = |kind: &str, subject_kind: &str| -> Vec<String> {
        let mut namespaces: Vec<String> = of_kind(kind)
            .iter()
            .filter(|d| subject_kind.is_empty() || d["subjects"][0]["kind"] == subject_kind)
            .map(|d| d["metadata"]["namespace"].as_str().unwrap().to_owned())
            .collect();
        namespaces.sort();
        namespaces
    };
    let expected = ["scoped-a", "scoped-b", SCOPED.namespace];
    assert_eq!(
        namespaces("Role", ""),
        expected,
        "a Role per watched namespace and the Lease's"
    );
    assert_eq!(namespaces("RoleBinding", "ServiceAccount"), expected);
    // The controller's client certificate user, per watched namespace.
    assert_eq!(namespaces("RoleBinding", "User"), WATCHED);
    for binding in of_kind("RoleBinding")
        .into_iter()
        .filter(|d| d["subjects"][0]["kind"] == "User")
    {
        assert_eq!(binding["subjects"][0]["name"], SIDECAR_CLIENT_USER);
        assert_eq!(
            binding["roleRef"],
            json!({"apiGroup": "rbac.authorization.k8s.io", "kind": "ClusterRole",
                   "name": format!("{}-sidecar-client", SCOPED.name)})
        );
    }
    assert_eq!(of_kind("RoleBinding").len(), 2 * WATCHED.len() + 1);

    // The pod watches the same namespaces, with a flag the binary accepts.
    let deployment = of_kind("Deployment")[0];
    let args: Vec<String> = serde_json::from_value(
        deployment["spec"]["template"]["spec"]["containers"][0]["args"].clone(),
    )
    .unwrap();
    assert!(
        args.contains(&"--watch-namespaces=scoped-a,scoped-b".to_owned()),
        "{args:?}"
    );
    let argv = std::iter::once("seinode-tls").chain(args.iter().map(String::as_str));
    let cli = <seinode_tls::cli::Cli as clap::Parser>::try_parse_from(argv).unwrap();
    let seinode_tls::cli::Command::Run(run) = cli.command else {
        panic!("the chart runs `run`");
    };
    assert_eq!(run.serve.watch_namespaces, scope());

    // The webhooks and the status policy apply in the watched namespaces only.
    let watched_only = json!({"key": "kubernetes.io/metadata.name", "operator": "In",
                              "values": WATCHED});
    for kind in [
        "ValidatingWebhookConfiguration",
        "MutatingWebhookConfiguration",
    ] {
        for hook in of_kind(kind)[0]["webhooks"].as_array().unwrap() {
            let expressions = hook["namespaceSelector"]["matchExpressions"]
                .as_array()
                .unwrap();
            assert!(
                expressions.contains(&watched_only),
                "{kind} {}",
                hook["name"]
            );
        }
    }
    let policy = of_kind("ValidatingAdmissionPolicy")[0];
    assert_eq!(
        policy["spec"]["matchConstraints"]["namespaceSelector"]["matchExpressions"],
        json!([watched_only])
    );

    // The helm test's ClusterRole is bound to the test's own ServiceAccount only, and gives it
    // nothing but reads by name, namespaces, access reviews and (dry-run) SeiNode creates.
    let test_roles: Vec<_> = tests
        .iter()
        .filter(|d| d["kind"] == "ClusterRole")
        .collect();
    assert_eq!(test_roles.len(), 1);
    for rule in test_roles[0]["rules"].as_array().unwrap() {
        let verbs = &rule["verbs"];
        let resources = &rule["resources"];
        let allowed = (verbs == &json!(["get"]) && !rule["resourceNames"].is_null())
            || (verbs == &json!(["get"]) && resources == &json!(["namespaces"]))
            || (verbs == &json!(["create"])
                && (resources == &json!(["subjectaccessreviews"])
                    || resources == &json!(["seinodes"])));
        assert!(allowed, "{rule}");
    }
    for binding in tests.iter().filter(|d| d["kind"] == "ClusterRoleBinding") {
        assert_eq!(
            binding["subjects"],
            json!([{"kind": "ServiceAccount", "name": format!("{}-test", SCOPED.name),
                    "namespace": SCOPED.namespace}])
        );
    }
}

#[test]
fn the_whole_namespaced_chart_applies_with_a_server_side_dry_run() {
    install();
    let stdout = common::chart::server_dry_run(&SCOPED.render(&values()));
    for object in [
        "deployment.apps/seinode-tls-scoped",
        "validatingwebhookconfiguration.admissionregistration.k8s.io/seinode-tls-scoped",
        "mutatingwebhookconfiguration.admissionregistration.k8s.io/seinode-tls-scoped",
        "role.rbac.authorization.k8s.io/seinode-tls-scoped",
        "rolebinding.rbac.authorization.k8s.io/seinode-tls-scoped-sidecar-client",
        "clusterrole.rbac.authorization.k8s.io/seinode-tls-scoped-sidecar-operator",
    ] {
        assert!(stdout.contains(object), "{object} in {stdout}");
    }
}

#[test]
fn the_chart_refuses_watch_namespaces_that_are_not_namespace_names() {
    for (list, reason) in [
        ("{scoped-a,Scoped}", "\"Scoped\" is not a namespace name"),
        ("{scoped-a,scoped-a}", "\"scoped-a\" is listed twice"),
    ] {
        let chart = common::chart::chart_dir();
        let out = common::helm(&[
            "template",
            SCOPED.name,
            chart.to_str().unwrap(),
            "--set",
            &format!("watchNamespaces={list}"),
        ]);
        assert!(!out.status.success(), "{list} rendered");
        let stderr = text(&out.stderr);
        assert!(stderr.contains(reason), "{list}: {stderr}");
    }
}

#[test]
fn the_service_account_may_act_in_the_watched_namespaces_only() {
    install();
    let verbs: &[&[&str]] = &[
        &["get", "seinodes.sei.io"],
        &["list", "seinodes.sei.io"],
        &["watch", "seinodes.sei.io"],
        &["update", "seinodes.sei.io", "--subresource=status"],
        &["get", "secrets"],
        &["list", "secrets"],
        &["watch", "secrets"],
        &["create", "configmaps"],
        &["list", "configmaps"],
        &["watch", "configmaps"],
        &["patch", "services"],
        &["watch", "services"],
        &["create", "statefulsets.apps"],
        &["patch", "statefulsets.apps"],
        &["watch", "statefulsets.apps"],
        &["create", "events.events.k8s.io"],
        &["get", "pods"],
        &["list", "pods"],
        &["watch", "pods"],
    ];
    for args in verbs {
        for ns in WATCHED {
            let mut at = args.to_vec();
            at.extend(["-n", ns]);
            assert!(SCOPED.can_i(&at), "must allow in {ns}: {}", args.join(" "));
        }
        let mut elsewhere = args.to_vec();
        elsewhere.extend(["-n", UNWATCHED]);
        assert!(
            !SCOPED.can_i(&elsewhere),
            "must not allow outside the watched namespaces: {}",
            elsewhere.join(" ")
        );
    }
    let leases: &[&[&str]] = &[
        &["get", "leases.coordination.k8s.io", "-n", SCOPED.namespace],
        &[
            "update",
            "leases.coordination.k8s.io",
            "-n",
            SCOPED.namespace,
        ],
    ];
    for args in leases {
        assert!(SCOPED.can_i(args), "must allow: {}", args.join(" "));
    }
    let denied: &[&[&str]] = &[
        &["list", "secrets", "-A"],
        &["watch", "secrets", "-A"],
        &["get", "secrets", "-A"],
        &["list", "seinodes.sei.io", "-A"],
        &["list", "statefulsets.apps", "-A"],
        &["create", "secrets", "-n", "scoped-a"],
        &["update", "secrets", "-n", "scoped-a"],
        &["delete", "secrets", "-n", "scoped-a"],
        &["list", "pods", "-A"],
        &["delete", "pods", "-n", "scoped-a"],
        &["get", "leases.coordination.k8s.io", "-n", "scoped-a"],
        &["create", "clusterroles.rbac.authorization.k8s.io"],
    ];
    for args in denied {
        assert!(!SCOPED.can_i(args), "must not allow: {}", args.join(" "));
    }

    // The nodes' sidecar task API: the controller's client certificate user in the watched
    // namespaces only; the ServiceAccount nowhere.
    let sa_groups = [
        "system:serviceaccounts".to_owned(),
        format!("system:serviceaccounts:{}", SCOPED.namespace),
        "system:authenticated".to_owned(),
    ];
    let sa_groups: Vec<&str> = sa_groups.iter().map(String::as_str).collect();
    for verb in ["create", "get"] {
        for ns in WATCHED {
            assert!(
                may_call_sidecar(SIDECAR_CLIENT_USER, &[], verb, ns, "rpc"),
                "{SIDECAR_CLIENT_USER} must {verb} seinodetasks in {ns}"
            );
        }
        for ns in WATCHED.iter().chain([&UNWATCHED]) {
            assert!(
                !may_call_sidecar(&SCOPED.service_account(), &sa_groups, verb, ns, "rpc"),
                "the ServiceAccount must not {verb} seinodetasks in {ns}"
            );
        }
        assert!(
            !may_call_sidecar(SIDECAR_CLIENT_USER, &[], verb, UNWATCHED, "rpc"),
            "{SIDECAR_CLIENT_USER} must not {verb} seinodetasks outside the watched namespaces"
        );
    }
}

// === logged warnings ===

/// The warnings and errors logged in this test binary, as text (a failing watch logs one).
static LOGGED: Mutex<Vec<String>> = Mutex::new(Vec::new());

/// Starts recording into [`LOGGED`].
fn record_logs() {
    static INSTALLED: OnceLock<()> = OnceLock::new();
    INSTALLED.get_or_init(|| {
        use tracing_subscriber::layer::SubscriberExt as _;
        use tracing_subscriber::util::SubscriberInitExt as _;
        tracing_subscriber::registry()
            .with(RecordWarnings)
            .try_init()
            .expect("no other global subscriber in this test binary");
    });
}

fn forbidden_logged() -> Vec<String> {
    LOGGED
        .lock()
        .unwrap()
        .iter()
        .filter(|line| line.to_lowercase().contains("forbidden"))
        .cloned()
        .collect()
}

struct RecordWarnings;

impl<S: tracing::Subscriber> tracing_subscriber::Layer<S> for RecordWarnings {
    fn on_event(&self, event: &tracing::Event<'_>, _: tracing_subscriber::layer::Context<'_, S>) {
        if *event.metadata().level() <= tracing::Level::WARN {
            let mut line = String::new();
            event.record(&mut Fields(&mut line));
            LOGGED.lock().unwrap_or_else(|e| e.into_inner()).push(line);
        }
    }
}

struct Fields<'a>(&'a mut String);

impl tracing::field::Visit for Fields<'_> {
    fn record_debug(&mut self, field: &tracing::field::Field, value: &dyn std::fmt::Debug) {
        let _ = write!(self.0, "{}={value:?} ", field.name());
    }
}

// === the co-processes in namespaced mode ===

/// A TLS SeiNode `name` in `ns` naming Secret `secret`, created with a Secret whose certificate
/// carries `dns_names`.
async fn tls_node(admin: &kube::Client, ns: &str, name: &str, dns_names: &[String]) {
    let dns: Vec<&str> = dns_names.iter().map(String::as_str).collect();
    let leaf = CertificateAuthority::new("issuer")
        .unwrap()
        .issue(&LeafSpec {
            common_name: name,
            dns_names: &dns,
            server: true,
            ..LeafSpec::default()
        })
        .unwrap();
    let secret_name = format!("{name}-tls");
    let secret =
        seinode_tls_testkit::tls_secret(ns, &secret_name, &leaf.cert_pem, &leaf.key_pem, None);
    Api::<Secret>::namespaced(admin.clone(), ns)
        .create(&PostParams::default(), &secret)
        .await
        .unwrap();
    let node: SeiNode = serde_json::from_value(json!({
        "apiVersion": "sei.io/v1alpha1", "kind": "SeiNode", "metadata": {"name": name, "namespace": ns},
        "spec": {"chainId": "arctic-1", "image": "ghcr.io/sei-protocol/sei:v6.3.0", "fullNode": {},
                 "sidecar": {"tls": {"secretName": secret_name}}},
    }))
    .unwrap();
    Api::<SeiNode>::namespaced(admin.clone(), ns)
        .create(&PostParams::default(), &node)
        .await
        .unwrap();
}

fn contract(ns: &str, name: &str) -> Vec<String> {
    seinode_tls_crds::contract::required_dns_names(name, ns, "cluster.local")
}

/// The webhook, serving on loopback as the ServiceAccount in namespaced mode.
async fn start_webhook(
    sa: kube::Client,
    scope: WatchScope,
) -> (SocketAddr, Arc<Registry>, tokio::sync::oneshot::Sender<()>) {
    let dir = common::scratch_path("scoped-webhook");
    std::fs::create_dir_all(&dir).unwrap();
    let serving = common::control_plane()
        .issue_serving_certificate("seinode-tls-scoped", &["localhost"])
        .unwrap();
    std::fs::write(dir.join("tls.crt"), &serving.cert_pem).unwrap();
    std::fs::write(dir.join("tls.key"), &serving.key_pem).unwrap();
    let loopback = SocketAddr::from((Ipv4Addr::LOCALHOST, 0));
    let mut config =
        WebhookConfig::new(loopback, loopback, dir.join("tls.crt"), dir.join("tls.key"));
    config.watch_scope = scope;
    let mut registry = Registry::default();
    let webhook = Webhook::bind(config, &mut registry).unwrap();
    let health = webhook.health_addr();
    let registry = Arc::new(registry);
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    tokio::spawn(webhook.run(sa, registry.clone(), async move {
        let _ = stopped.await;
    }));
    (health, registry, stop)
}

/// The value of the metric whose name ends with `name`, from `registry`.
fn metric(registry: &Registry, name: &str) -> Option<f64> {
    let mut text = String::new();
    prometheus_client::encoding::text::encode(&mut text, registry).unwrap();
    text.lines()
        .find(|line| line.split(' ').next().is_some_and(|n| n.ends_with(name)))
        .and_then(|line| line.rsplit(' ').next()?.parse().ok())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_webhook_and_the_controller_work_in_the_watched_namespaces_only() {
    record_logs();
    install();
    let admin = common::client().await;
    let sa = SCOPED.service_account_client().await;

    // A node whose Secret meets the contract, one whose Secret lacks the names (both watched),
    // and one with a good Secret where this release does not watch.
    tls_node(&admin, "scoped-a", "good", &contract("scoped-a", "good")).await;
    tls_node(&admin, "scoped-b", "wrong", &contract("scoped-b", "other")).await;
    tls_node(
        &admin,
        UNWATCHED,
        "ignored",
        &contract(UNWATCHED, "ignored"),
    )
    .await;

    // The webhook gets ready: both of its watches listed every watched namespace.
    let (health, registry, stop_webhook) = start_webhook(sa.clone(), scope()).await;
    let readyz = format!("http://{health}/readyz");
    let (status, ready) = common::poll(
        WAIT,
        || async { common::http_status(&readyz, &[]) },
        |s| s == "200",
    )
    .await;
    assert!(
        ready,
        "the namespaced webhook never got ready: /readyz {status}"
    );
    assert_eq!(
        metric(&registry, "secret_cache_known"),
        Some(2.0),
        "the webhook knows the TLS Secrets of the watched namespaces, not the other's"
    );

    let config = seinode_tls_controller::ControllerConfig {
        watch_scope: scope(),
        ..common::chart::leader_config(SCOPED.name, SCOPED.namespace, "chart-namespaced-test")
    };
    let controller = RunningController::start(
        Controller::new(config, &mut Registry::default()).unwrap(),
        SCOPED.service_account_config().await,
    )
    .unwrap();

    for (ns, name, expected) in [
        ("scoped-a", "good", "True TLSSecretReady"),
        ("scoped-b", "wrong", "False TLSSecretSANsMismatch"),
    ] {
        let nodes: Api<SeiNode> = Api::namespaced(admin.clone(), ns);
        let (node, decided) = common::poll(
            WAIT,
            || async { nodes.get(name).await.unwrap() },
            |n| {
                common::tls_reason(n)
                    .is_some_and(|(status, reason)| format!("{status} {reason}") == expected)
            },
        )
        .await;
        assert!(
            decided,
            "{ns}/{name} not decided as {expected}: {:#?}",
            node.status
        );
    }
    let sts: Api<StatefulSet> = Api::namespaced(admin.clone(), "scoped-a");
    let (_, applied) = common::poll(
        WAIT,
        || async { sts.get_opt("good").await.unwrap() },
        Option::is_some,
    )
    .await;
    assert!(
        applied,
        "the controller applied the ready node's StatefulSet"
    );

    // The unwatched node: by now it would have been decided too, were it watched.
    let ignored: Api<SeiNode> = Api::namespaced(admin.clone(), UNWATCHED);
    let (node, touched) = common::poll(
        Duration::from_secs(3),
        || async { ignored.get("ignored").await.unwrap() },
        |n| n.status.is_some(),
    )
    .await;
    assert!(
        !touched,
        "a node outside the watched namespaces was reconciled: {:#?}",
        node.status
    );
    let elsewhere: Api<StatefulSet> = Api::namespaced(admin.clone(), UNWATCHED);
    assert!(elsewhere.get_opt("ignored").await.unwrap().is_none());

    controller.stop().await;
    let _ = stop_webhook.send(());
    assert_eq!(
        forbidden_logged(),
        Vec::<String>::new(),
        "no watch or request of the namespaced co-processes was forbidden"
    );

    // The check above can fail: the same ServiceAccount watching the unwatched namespace is
    // refused, and that is logged.
    let mut outside = watch_tls_secrets(
        sa.clone(),
        &WatchScope::Namespaces(vec![UNWATCHED.to_owned()]),
    );
    let first_error = tokio::time::timeout(WAIT, async {
        while let Some(item) = outside.next().await {
            match item {
                Err(error) => return Some(error),
                Ok(watcher::Event::InitDone) => return None,
                Ok(_) => {}
            }
        }
        None
    });
    let error = first_error
        .await
        .unwrap()
        .expect("listing outside the Roles must fail");
    assert!(
        error.to_string().to_lowercase().contains("forbidden"),
        "{error}"
    );
    let (health, _, stop_webhook) =
        start_webhook(sa, WatchScope::Namespaces(vec![UNWATCHED.to_owned()])).await;
    let (logged, seen) =
        common::poll(WAIT, || async { forbidden_logged() }, |l| !l.is_empty()).await;
    assert!(seen, "a forbidden watch is logged: {logged:?}");
    assert_ne!(
        common::http_status(&format!("http://{health}/readyz"), &[]),
        "200",
        "a webhook that cannot list one of its namespaces is not ready"
    );
    let _ = stop_webhook.send(());
}
