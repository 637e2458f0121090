//! The Helm chart in the tests: rendering a release, picking its documents, installing its
//! RBAC, and acting as its ServiceAccount (tests/chart.rs, tests/chart_namespaced.rs).

use std::path::PathBuf;

use kube::Client;
use kube::Config;
use seinode_tls_testkit::CertificateAuthority;

/// A release of the chart: its name (which contains the chart's, so it is also the full name
/// and the ServiceAccount's name) and namespace.
#[derive(Debug, Clone, Copy)]
pub struct Release {
    pub name: &'static str,
    pub namespace: &'static str,
}

pub fn chart_dir() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("charts/seinode-tls")
}

pub fn text(bytes: &[u8]) -> String {
    String::from_utf8_lossy(bytes).into_owned()
}

/// The question kube-rbac-proxy asks the API server for a call to node `name`'s sidecar (a
/// SubjectAccessReview): may `user`, in `groups`, `verb` (`create` for a POST, `get` for a GET)
/// `seinodetasks.sei.io` named `name` in `ns`? `kubectl auth can-i` cannot ask it: for a resource
/// no API serves, it drops the group and asks about a resource named `seinodetasks.sei.io` in
/// the core group, which nothing grants.
pub fn may_call_sidecar(user: &str, groups: &[&str], verb: &str, ns: &str, name: &str) -> bool {
    let review = serde_json::json!({
        "apiVersion": "authorization.k8s.io/v1", "kind": "SubjectAccessReview",
        "spec": {"user": user, "groups": groups, "resourceAttributes": {
            "group": "sei.io", "resource": "seinodetasks", "verb": verb,
            "namespace": ns, "name": name}},
    });
    let out = super::kubectl(
        &["create", "-f", "-", "-o", "jsonpath={.status.allowed}"],
        &review.to_string(),
    );
    assert!(out.status.success(), "{}", text(&out.stderr));
    text(&out.stdout).trim() == "true"
}

/// Values for the "own certificate" mode: no cert-manager, a Secret and CA bundle we supply.
pub fn own_cert_values() -> Vec<String> {
    let ca = CertificateAuthority::new("chart test CA").unwrap();
    let ca_file = super::scratch_path("chart-ca.pem");
    std::fs::write(&ca_file, ca.cert_pem()).unwrap();
    vec![
        "--set".into(),
        "tls.certManager.enabled=false".into(),
        "--set".into(),
        "tls.secretName=seinode-tls-webhook".into(),
        "--set-file".into(),
        format!("tls.caBundle={}", ca_file.display()),
    ]
}

/// The rendered documents of the given kinds.
pub fn documents_of(rendered: &str, kinds: &[&str]) -> String {
    rendered
        .split("\n---")
        .filter(|doc| {
            kinds
                .iter()
                .any(|k| doc.contains(&format!("\nkind: {k}\n")))
        })
        .map(|doc| format!("---{doc}\n"))
        .collect()
}

/// Applies `manifests` with a server-side dry run, panics with kubectl's output if it fails,
/// and returns what kubectl printed (one line per object).
pub fn server_dry_run(manifests: &str) -> String {
    let out = super::kubectl(
        &["apply", "--server-side", "--dry-run=server", "-f", "-"],
        manifests,
    );
    assert!(
        out.status.success(),
        "dry run failed: {}\n{}",
        text(&out.stderr),
        text(&out.stdout)
    );
    text(&out.stdout)
}

/// A controller configuration that leads through the Lease `lease_name` in `lease_namespace`
/// (where the chart's Role allows it), as the chart runs the controller.
pub fn leader_config(
    lease_name: &str,
    lease_namespace: &str,
    identity: &str,
) -> seinode_tls_controller::ControllerConfig {
    use std::time::Duration;
    seinode_tls_controller::ControllerConfig {
        leader_election: Some(seinode_tls_controller::LeaderElection {
            lease_name: lease_name.to_owned(),
            lease_namespace: lease_namespace.to_owned(),
            identity: identity.to_owned(),
            lease_duration: Duration::from_secs(10),
            renew_deadline: Duration::from_secs(7),
            retry_period: Duration::from_secs(2),
        }),
        ..super::test_controller_config()
    }
}

pub fn ensure_namespace(ns: &str) {
    let yaml = format!("apiVersion: v1\nkind: Namespace\nmetadata:\n  name: {ns}\n");
    let out = super::kubectl(&["apply", "--server-side", "-f", "-"], &yaml);
    assert!(out.status.success(), "{}", text(&out.stderr));
}

impl Release {
    /// The user name of the release's ServiceAccount.
    pub fn service_account(&self) -> String {
        format!("system:serviceaccount:{}:{}", self.namespace, self.name)
    }

    /// `helm template` of the release with `extra` arguments (CRDs included).
    pub fn render(&self, extra: &[String]) -> String {
        let chart = chart_dir();
        let mut args = vec![
            "template",
            self.name,
            chart.to_str().unwrap(),
            "--namespace",
            self.namespace,
            "--include-crds",
        ];
        args.extend(extra.iter().map(String::as_str));
        let out = super::helm(&args);
        assert!(
            out.status.success(),
            "helm template failed: {}",
            text(&out.stderr)
        );
        text(&out.stdout)
    }

    /// Applies, for real, the release's ServiceAccount, RBAC and status policy rendered with
    /// `extra` (not the Deployment: there is no image to run).
    pub fn install_rbac_and_policy(&self, extra: &[String]) {
        ensure_namespace(self.namespace);
        let objects = documents_of(
            &self.render(extra),
            &[
                "ServiceAccount",
                "ClusterRole",
                "ClusterRoleBinding",
                "Role",
                "RoleBinding",
                "ValidatingAdmissionPolicy",
                "ValidatingAdmissionPolicyBinding",
            ],
        );
        let out = super::kubectl(&["apply", "--server-side", "-f", "-"], &objects);
        assert!(out.status.success(), "{}", text(&out.stderr));
    }

    /// A client that acts as the release's ServiceAccount (impersonation by the admin).
    pub async fn service_account_client(&self) -> Client {
        Client::try_from(self.service_account_config().await).unwrap()
    }

    /// The admin's client configuration, impersonating the release's ServiceAccount.
    pub async fn service_account_config(&self) -> Config {
        let mut config = super::kube_config().await;
        config.auth_info.impersonate = Some(self.service_account());
        config
    }

    /// `kubectl auth can-i ARGS` as the release's ServiceAccount.
    pub fn can_i(&self, args: &[&str]) -> bool {
        let mut all = vec!["auth", "can-i"];
        all.extend_from_slice(args);
        let as_sa = format!("--as={}", self.service_account());
        all.push(&as_sa);
        let out = super::kubectl(&all, "");
        text(&out.stdout).trim() == "yes"
    }
}
