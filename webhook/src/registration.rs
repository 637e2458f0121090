//! The Validating and Mutating WebhookConfigurations that point the API server at this webhook.
//!
//! `local` and the tests register these against the embedded control plane; the Helm chart
//! renders the same shape from templates.

use k8s_openapi::ByteString;
use k8s_openapi::api::admissionregistration::v1::{
    MatchCondition, MutatingWebhook, MutatingWebhookConfiguration, RuleWithOperations,
    ServiceReference, ValidatingWebhook, ValidatingWebhookConfiguration, WebhookClientConfig,
};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{
    LabelSelector, LabelSelectorRequirement, ObjectMeta,
};

use seinode_tls_kube::watch::WatchScope;

use crate::config::WEBHOOK_TIMEOUT_SECONDS;
use crate::server::{MUTATE_SEINODES_PATH, VALIDATE_SECRETS_PATH, VALIDATE_SEINODES_PATH};

/// Name of both configuration objects.
pub const CONFIGURATION_NAME: &str = "seinode-tls";
pub const VALIDATE_SEINODES_WEBHOOK: &str = "seinodes.validate.sei.io";
pub const MUTATE_SEINODES_WEBHOOK: &str = "seinodes.mutate.sei.io";
pub const GUARD_SECRETS_WEBHOOK: &str = "tls-secrets.guard.sei.io";

/// Which SeiNode requests reach the validating webhook: every CREATE, and only the UPDATEs that
/// change `spec.sidecar.tls`. Label edits, GitOps syncs and finalizer removal never wait on the
/// webhook. An edit of the block is refused by the CRD's CEL rule first (it runs before validating
/// webhooks); the webhook refuses it too where the rule was bypassed.
pub const SEINODE_MATCH_CONDITION: &str = "request.operation == 'CREATE' || \
     (has(object.spec.sidecar) && has(object.spec.sidecar.tls)) != \
     (has(oldObject.spec.sidecar) && has(oldObject.spec.sidecar.tls)) || \
     (has(object.spec.sidecar) && has(object.spec.sidecar.tls) && \
     object.spec.sidecar.tls != oldObject.spec.sidecar.tls)";
/// Only TLS Secrets reach the guard (evaluated by the API server, before any call).
pub const TLS_SECRET_MATCH_CONDITION: &str =
    "(request.operation == 'DELETE' ? oldObject : object).type == 'kubernetes.io/tls'";

/// Where the API server reaches the webhook.
#[derive(Debug, Clone)]
pub enum Endpoint {
    /// `https://host:port` (local mode, tests).
    Url(String),
    /// A Service in the cluster.
    Service {
        namespace: String,
        name: String,
        port: i32,
    },
}

impl Endpoint {
    fn client_config(&self, path: &str, ca_bundle: &[u8]) -> WebhookClientConfig {
        let ca_bundle = Some(ByteString(ca_bundle.to_vec()));
        match self {
            Endpoint::Url(base) => WebhookClientConfig {
                url: Some(format!("{}{path}", base.trim_end_matches('/'))),
                ca_bundle,
                service: None,
            },
            Endpoint::Service {
                namespace,
                name,
                port,
            } => WebhookClientConfig {
                service: Some(ServiceReference {
                    namespace: namespace.clone(),
                    name: name.clone(),
                    path: Some(path.to_owned()),
                    port: Some(*port),
                }),
                ca_bundle,
                url: None,
            },
        }
    }
}

/// Namespaces the webhooks apply to: never the excluded ones (no lock-out of the system, or of
/// the webhook's own), and with a namespace scope only the watched ones (elsewhere the webhook
/// sees no Secret and would tell a SeiNode its Secret does not exist yet).
fn namespace_selector(excluded: &[String], scope: &WatchScope) -> LabelSelector {
    let name_is = |operator: &str, values: &[String]| LabelSelectorRequirement {
        key: "kubernetes.io/metadata.name".to_owned(),
        operator: operator.to_owned(),
        values: Some(values.to_vec()),
    };
    let mut expressions = vec![name_is("NotIn", excluded)];
    if let WatchScope::Namespaces(watched) = scope {
        expressions.push(name_is("In", watched));
    }
    LabelSelector {
        match_expressions: Some(expressions),
        match_labels: None,
    }
}

fn rule(group: &str, resource: &str, operations: &[&str]) -> RuleWithOperations {
    RuleWithOperations {
        api_groups: Some(vec![group.to_owned()]),
        api_versions: Some(vec![
            if group.is_empty() { "v1" } else { "v1alpha1" }.to_owned(),
        ]),
        operations: Some(operations.iter().map(|o| (*o).to_owned()).collect()),
        resources: Some(vec![resource.to_owned()]),
        scope: Some("Namespaced".to_owned()),
    }
}

/// The validating configuration: SeiNode CREATE/UPDATE (failurePolicy Fail) and the Secret guard
/// on UPDATE/DELETE of TLS Secrets (failurePolicy Ignore), in the namespaces of `scope`.
pub fn validating_configuration(
    endpoint: &Endpoint,
    ca_bundle: &[u8],
    excluded_namespaces: &[String],
    scope: &WatchScope,
) -> ValidatingWebhookConfiguration {
    let common = |name: &str, path: &str, rules, failure_policy: &str| ValidatingWebhook {
        name: name.to_owned(),
        client_config: endpoint.client_config(path, ca_bundle),
        rules: Some(rules),
        failure_policy: Some(failure_policy.to_owned()),
        side_effects: "None".to_owned(),
        admission_review_versions: vec!["v1".to_owned()],
        timeout_seconds: Some(WEBHOOK_TIMEOUT_SECONDS),
        namespace_selector: Some(namespace_selector(excluded_namespaces, scope)),
        match_policy: Some("Equivalent".to_owned()),
        ..ValidatingWebhook::default()
    };
    let mut seinodes = common(
        VALIDATE_SEINODES_WEBHOOK,
        VALIDATE_SEINODES_PATH,
        vec![rule("sei.io", "seinodes", &["CREATE", "UPDATE"])],
        "Fail",
    );
    seinodes.match_conditions = Some(vec![MatchCondition {
        name: "create-or-tls-change".to_owned(),
        expression: SEINODE_MATCH_CONDITION.to_owned(),
    }]);
    let mut secrets = common(
        GUARD_SECRETS_WEBHOOK,
        VALIDATE_SECRETS_PATH,
        vec![rule("", "secrets", &["UPDATE", "DELETE"])],
        "Ignore",
    );
    secrets.match_conditions = Some(vec![MatchCondition {
        name: "tls-secrets-only".to_owned(),
        expression: TLS_SECRET_MATCH_CONDITION.to_owned(),
    }]);
    ValidatingWebhookConfiguration {
        metadata: ObjectMeta {
            name: Some(CONFIGURATION_NAME.to_owned()),
            ..ObjectMeta::default()
        },
        webhooks: Some(vec![seinodes, secrets]),
    }
}

/// The mutating configuration: SeiNode CREATE only (failurePolicy Fail, no reinvocation needed):
/// the annotation is a preview for a node about to be created; `status.sidecarTLS` is the
/// contract afterwards, so no update has to wait on the webhook. In the namespaces of `scope`.
pub fn mutating_configuration(
    endpoint: &Endpoint,
    ca_bundle: &[u8],
    excluded_namespaces: &[String],
    scope: &WatchScope,
) -> MutatingWebhookConfiguration {
    MutatingWebhookConfiguration {
        metadata: ObjectMeta {
            name: Some(CONFIGURATION_NAME.to_owned()),
            ..ObjectMeta::default()
        },
        webhooks: Some(vec![MutatingWebhook {
            name: MUTATE_SEINODES_WEBHOOK.to_owned(),
            client_config: endpoint.client_config(MUTATE_SEINODES_PATH, ca_bundle),
            rules: Some(vec![rule("sei.io", "seinodes", &["CREATE"])]),
            failure_policy: Some("Fail".to_owned()),
            side_effects: "None".to_owned(),
            admission_review_versions: vec!["v1".to_owned()],
            timeout_seconds: Some(WEBHOOK_TIMEOUT_SECONDS),
            namespace_selector: Some(namespace_selector(excluded_namespaces, scope)),
            match_policy: Some("Equivalent".to_owned()),
            reinvocation_policy: Some("Never".to_owned()),
            ..MutatingWebhook::default()
        }]),
    }
}
