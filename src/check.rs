//! `check`: is an install of the chart working? Each check reads what the chart created (the CRD,
//! the Deployment, the webhook registrations, the Lease) or asks the API server a question (a
//! server-side dry run through the webhooks, SubjectAccessReviews for the controller's
//! ServiceAccount), and reports one line: ok, or failed with why and what to do. Read-only: dry
//! runs and access reviews store nothing. The chart's `helm test` runs it in a Pod.
//!
//! The judgements (a caBundle, a Lease, a namespace selector, the Deployment's arguments) are
//! pure functions, unit-tested below; `run` does the reads.

use std::collections::BTreeMap;
use std::process::ExitCode;

use jiff::Timestamp;
use k8s_openapi::api::admissionregistration::v1::{
    MutatingWebhookConfiguration, ValidatingWebhookConfiguration, WebhookClientConfig,
};
use k8s_openapi::api::apps::v1::Deployment;
use k8s_openapi::api::authorization::v1::{
    ResourceAttributes, SubjectAccessReview, SubjectAccessReviewSpec,
};
use k8s_openapi::api::coordination::v1::Lease;
use k8s_openapi::api::core::v1::Namespace;
use k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::LabelSelector;
use kube::Api;
use kube::api::PostParams;
use seinode_tls_crds::contract::REQUIRED_DNS_NAMES_ANNOTATION;
use seinode_tls_crds::{SeiNode, SeiNodeSpec, SidecarSpec, SidecarTls};
use serde::Serialize;

use crate::offline::{self, OutputFormat};
use crate::online::{ClusterOptions, Failure, block_on, client};

/// The CRD the chart installs.
pub const CRD_NAME: &str = "seinodes.sei.io";
/// The webhooks the chart registers (templates/webhooks.yaml).
pub const VALIDATING_WEBHOOK: &str = "seinodes.validate.sei.io";
pub const MUTATING_WEBHOOK: &str = "seinodes.mutate.sei.io";
/// The name of the dry-run SeiNodes `check` sends through the webhooks; never stored.
const PROBE_NODE: &str = "seinode-tls-check";

/// Where the install is: the chart's names (templates/_helpers.tpl).
#[derive(Debug, Clone)]
pub struct CheckArgs {
    /// The release namespace: the Deployment, Service and Lease.
    pub namespace: String,
    /// The chart's full name: the Deployment, Service, Lease and webhook configurations.
    pub name: String,
    /// The controller's ServiceAccount (the chart's default: the full name).
    pub service_account: Option<String>,
    /// Where to send the dry-run SeiNodes; else one the webhooks select.
    pub dry_run_namespace: Option<String>,
    pub output: OutputFormat,
}

/// One check's outcome.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct CheckResult {
    pub name: &'static str,
    pub ok: bool,
    /// What was found (ok) or what is wrong (failed).
    pub message: String,
    /// What to do; empty when ok.
    #[serde(skip_serializing_if = "String::is_empty")]
    pub fix: String,
}

impl CheckResult {
    fn ok(name: &'static str, message: impl Into<String>) -> Self {
        Self {
            name,
            ok: true,
            message: message.into(),
            fix: String::new(),
        }
    }

    fn failed(name: &'static str, message: impl Into<String>, fix: impl Into<String>) -> Self {
        Self {
            name,
            ok: false,
            message: message.into(),
            fix: fix.into(),
        }
    }

    /// The one line printed for it.
    pub fn line(&self) -> String {
        if self.ok {
            format!("ok      {}: {}\n", self.name, self.message)
        } else {
            format!(
                "FAILED  {}: {}. Fix: {}\n",
                self.name, self.message, self.fix
            )
        }
    }
}

#[derive(Serialize)]
struct Report<'a> {
    ok: bool,
    checks: &'a [CheckResult],
}

/// Runs every check, prints them, and returns 0 when all passed, 1 when one failed, 5 when the
/// API server cannot be reached at all.
pub fn check(args: &CheckArgs, cluster: &ClusterOptions) -> ExitCode {
    block_on(async {
        let client = client(cluster).await?;
        client.apiserver_version().await.map_err(|e| {
            Failure::Cluster(format!(
                "cannot talk to the API server ({})",
                crate::online::root_cause(&e)
            ))
        })?;
        let results = run(&client, args, Timestamp::now()).await;
        let ok = results.iter().all(|r| r.ok);
        let text = match args.output {
            OutputFormat::Text => results.iter().map(CheckResult::line).collect(),
            OutputFormat::Json => offline::json_line(&Report {
                ok,
                checks: &results,
            }),
            OutputFormat::Yaml => offline::yaml_document(&Report {
                ok,
                checks: &results,
            }),
        };
        let written = offline::write_stdout(&text);
        if written != ExitCode::SUCCESS {
            return Ok(written);
        }
        Ok(if ok {
            ExitCode::SUCCESS
        } else {
            ExitCode::from(crate::exit::EXIT_NOT_READY)
        })
    })
}

/// Every check, in order.
pub async fn run(client: &kube::Client, args: &CheckArgs, now: Timestamp) -> Vec<CheckResult> {
    let (deployment, watched) = check_deployment(client, args).await;
    let (validating, selector) = check_validating(client, args, now).await;
    vec![
        check_crd(client).await,
        deployment,
        validating,
        check_mutating(client, args, now).await,
        check_reachable(client, args, selector.as_ref()).await,
        check_leader(client, args, now).await,
        check_rbac(client, args, watched.as_deref()).await,
    ]
}

/// A failed read, as a check result: not found and forbidden get their own fix.
fn read_failed(check: &'static str, what: &str, error: &kube::Error, fix: &str) -> CheckResult {
    match Failure::from_api(what, "get", error) {
        Failure::NotFound(message) => CheckResult::failed(check, message, fix),
        Failure::Forbidden(message) => CheckResult::failed(
            check,
            message,
            "give the identity running `check` read access (the chart's helm test has it)",
        ),
        Failure::Cluster(message) => {
            CheckResult::failed(check, message, "retry; if it lasts, check the API server")
        }
    }
}

// === the CRD ===

async fn check_crd(client: &kube::Client) -> CheckResult {
    const CHECK: &str = "crd";
    let crd = match Api::<CustomResourceDefinition>::all(client.clone())
        .get(CRD_NAME)
        .await
    {
        Ok(crd) => crd,
        Err(e) => {
            return read_failed(
                CHECK,
                &format!("CustomResourceDefinition {CRD_NAME}"),
                &e,
                "install it: `kubectl apply --server-side -f charts/seinode-tls/crds/` (Helm \
                 installs crds/ only on first install)",
            );
        }
    };
    crd_verdict(&crd)
}

/// Whether the CRD is Established and serves and stores v1alpha1.
pub fn crd_verdict(crd: &CustomResourceDefinition) -> CheckResult {
    const CHECK: &str = "crd";
    let conditions = crd
        .status
        .as_ref()
        .and_then(|s| s.conditions.clone())
        .unwrap_or_default();
    let holds = |t: &str| {
        conditions
            .iter()
            .any(|c| c.type_ == t && c.status == "True")
    };
    if !holds("Established") || !holds("NamesAccepted") {
        let why = conditions
            .iter()
            .filter(|c| c.status != "True")
            .map(|c| format!("{}: {}", c.type_, c.message.as_deref().unwrap_or_default()))
            .collect::<Vec<_>>()
            .join("; ");
        return CheckResult::failed(
            CHECK,
            format!("{CRD_NAME} is not Established ({why})"),
            format!("`kubectl describe crd {CRD_NAME}`; another CRD may claim its names"),
        );
    }
    let served = crd
        .spec
        .versions
        .iter()
        .find(|v| v.name == "v1alpha1")
        .is_some_and(|v| v.served && v.storage);
    if !served {
        return CheckResult::failed(
            CHECK,
            format!("{CRD_NAME} does not serve and store v1alpha1"),
            "apply the chart's CRD: `kubectl apply --server-side -f charts/seinode-tls/crds/`",
        );
    }
    CheckResult::ok(
        CHECK,
        format!("{CRD_NAME} is Established and serves v1alpha1"),
    )
}

// === the Deployment ===

/// The Deployment's ready replicas, and the namespaces it watches (`--watch-namespaces`).
async fn check_deployment(
    client: &kube::Client,
    args: &CheckArgs,
) -> (CheckResult, Option<Vec<String>>) {
    const CHECK: &str = "deployment";
    let what = format!("Deployment {}/{}", args.namespace, args.name);
    let deployment = match Api::<Deployment>::namespaced(client.clone(), &args.namespace)
        .get(&args.name)
        .await
    {
        Ok(d) => d,
        Err(e) => {
            let fix = "check --namespace and --name (the chart's full name), or install the chart";
            return (read_failed(CHECK, &what, &e, fix), None);
        }
    };
    let watched = deployment
        .spec
        .as_ref()
        .and_then(|s| s.template.spec.as_ref())
        .and_then(|p| p.containers.first())
        .and_then(|c| c.args.as_deref())
        .and_then(watch_namespaces);
    let wanted = deployment
        .spec
        .as_ref()
        .and_then(|s| s.replicas)
        .unwrap_or(1);
    let ready = deployment
        .status
        .as_ref()
        .and_then(|s| s.ready_replicas)
        .unwrap_or(0);
    let result = if ready > 0 {
        CheckResult::ok(CHECK, format!("{what}: {ready}/{wanted} replicas ready"))
    } else {
        CheckResult::failed(
            CHECK,
            format!("{what}: 0/{wanted} replicas ready"),
            format!(
                "`kubectl -n {} describe deployment {}` and `kubectl -n {} logs deploy/{}`",
                args.namespace, args.name, args.namespace, args.name
            ),
        )
    };
    (result, watched)
}

/// The namespaces in `--watch-namespaces=a,b` (or `--watch-namespaces a,b`), if the container
/// is given one that is not empty.
pub fn watch_namespaces(args: &[String]) -> Option<Vec<String>> {
    let value = args.iter().enumerate().find_map(|(i, arg)| {
        arg.strip_prefix("--watch-namespaces=")
            .map(str::to_owned)
            .or_else(|| (arg == "--watch-namespaces").then(|| args.get(i + 1).cloned())?)
    })?;
    let namespaces: Vec<String> = value
        .split(',')
        .filter(|ns| !ns.is_empty())
        .map(str::to_owned)
        .collect();
    (!namespaces.is_empty()).then_some(namespaces)
}

// === the webhook registrations ===

async fn check_validating(
    client: &kube::Client,
    args: &CheckArgs,
    now: Timestamp,
) -> (CheckResult, Option<LabelSelector>) {
    const CHECK: &str = "validating-webhook";
    let what = format!("ValidatingWebhookConfiguration {}", args.name);
    match Api::<ValidatingWebhookConfiguration>::all(client.clone())
        .get(&args.name)
        .await
    {
        Ok(config) => {
            let webhooks = config.webhooks.unwrap_or_default();
            let selector = webhooks
                .iter()
                .find(|w| w.name == VALIDATING_WEBHOOK)
                .map(|w| w.namespace_selector.clone().unwrap_or_default());
            let configs: Vec<_> = webhooks
                .into_iter()
                .map(|w| (w.name, w.client_config))
                .collect();
            let result =
                registration_verdict(CHECK, &what, VALIDATING_WEBHOOK, &configs, args, now);
            (result, selector)
        }
        Err(e) => (read_failed(CHECK, &what, &e, REINSTALL), None),
    }
}

async fn check_mutating(client: &kube::Client, args: &CheckArgs, now: Timestamp) -> CheckResult {
    const CHECK: &str = "mutating-webhook";
    let what = format!("MutatingWebhookConfiguration {}", args.name);
    match Api::<MutatingWebhookConfiguration>::all(client.clone())
        .get(&args.name)
        .await
    {
        Ok(config) => {
            let webhooks = config.webhooks.unwrap_or_default();
            let configs: Vec<_> = webhooks
                .into_iter()
                .map(|w| (w.name, w.client_config))
                .collect();
            registration_verdict(CHECK, &what, MUTATING_WEBHOOK, &configs, args, now)
        }
        Err(e) => read_failed(CHECK, &what, &e, REINSTALL),
    }
}

const REINSTALL: &str = "`helm upgrade` (or reinstall) the release; the registrations are part of \
     the chart (a break-glass deletion must be undone)";

const CA_BUNDLE_FIX: &str = "with cert-manager, check its cainjector and the Certificate of the \
     release (`kubectl -n NS describe certificate`); else `helm upgrade --reuse-values \
     --set-file tls.caBundle=ca.crt` with the CA that issued the serving certificate";

/// Whether the registration has the `expected` webhook, every webhook calls the release's
/// Service, and every caBundle holds certificates valid now.
pub fn registration_verdict(
    check: &'static str,
    what: &str,
    expected: &str,
    webhooks: &[(String, WebhookClientConfig)],
    args: &CheckArgs,
    now: Timestamp,
) -> CheckResult {
    if !webhooks.iter().any(|(name, _)| name == expected) {
        return CheckResult::failed(
            check,
            format!("{what} has no webhook {expected}"),
            REINSTALL,
        );
    }
    let mut earliest: Option<Timestamp> = None;
    for (name, config) in webhooks {
        match &config.service {
            Some(service) if service.namespace == args.namespace && service.name == args.name => {}
            Some(service) => {
                return CheckResult::failed(
                    check,
                    format!(
                        "webhook {name} calls Service {}/{}, not {}/{}",
                        service.namespace, service.name, args.namespace, args.name
                    ),
                    "check --namespace and --name; two releases may be installed",
                );
            }
            None => {
                return CheckResult::failed(
                    check,
                    format!("webhook {name} calls a URL, not the release's Service"),
                    REINSTALL,
                );
            }
        }
        let bundle = config.ca_bundle.as_ref().map(|b| b.0.as_slice());
        match ca_bundle_until(bundle.unwrap_or_default(), now) {
            Ok(until) => earliest = Some(earliest.map_or(until, |e| e.min(until))),
            Err(why) => {
                return CheckResult::failed(
                    check,
                    format!("webhook {name}: its caBundle {why}"),
                    CA_BUNDLE_FIX,
                );
            }
        }
    }
    let until = earliest.map_or_else(String::new, |t| format!(", caBundle valid until {t}"));
    CheckResult::ok(
        check,
        format!(
            "{what}: {} webhook(s) call Service {}/{}{until}",
            webhooks.len(),
            args.namespace,
            args.name
        ),
    )
}

/// The end of the validity of the first certificate to expire in a PEM caBundle, or why the
/// bundle cannot be trusted now (empty, not PEM certificates, expired, not yet valid).
pub fn ca_bundle_until(bundle: &[u8], now: Timestamp) -> Result<Timestamp, String> {
    if bundle.is_empty() {
        return Err("is empty (the API server cannot verify the webhook)".to_owned());
    }
    let mut earliest: Option<Timestamp> = None;
    for pem in x509_parser::pem::Pem::iter_from_buffer(bundle) {
        let pem = pem.map_err(|_| "is not PEM".to_owned())?;
        if pem.label != "CERTIFICATE" {
            return Err(format!(
                "holds a {} block, not only certificates",
                pem.label
            ));
        }
        let certificate = pem
            .parse_x509()
            .map_err(|_| "holds a certificate that does not parse as X.509".to_owned())?;
        let validity = certificate.validity();
        let (from, until) = (
            validity.not_before.timestamp(),
            validity.not_after.timestamp(),
        );
        let subject = certificate.subject().to_string();
        if now.as_second() < from {
            return Err(format!("certificate \"{subject}\" is not valid yet"));
        }
        if now.as_second() > until {
            return Err(format!(
                "certificate \"{subject}\" expired at {}",
                Timestamp::from_second(until).map_or_else(|_| until.to_string(), |t| t.to_string())
            ));
        }
        let until = Timestamp::from_second(until).unwrap_or(Timestamp::MAX);
        earliest = Some(earliest.map_or(until, |e| e.min(until)));
    }
    earliest.ok_or_else(|| "holds no PEM certificate".to_owned())
}

// === the webhooks answer ===

/// Sends two dry-run SeiNodes through the webhooks: a TLS node the mutating webhook must
/// annotate with its contract, and one whose name can never run, which the validating webhook
/// must deny. Dry runs go through admission (the webhooks declare `sideEffects: None`) and
/// store nothing.
async fn check_reachable(
    client: &kube::Client,
    args: &CheckArgs,
    selector: Option<&LabelSelector>,
) -> CheckResult {
    const CHECK: &str = "webhooks-answer";
    let namespace = match dry_run_namespace(client, args, selector).await {
        Ok(ns) => ns,
        Err(result) => return result,
    };
    let nodes = Api::<SeiNode>::namespaced(client.clone(), &namespace);
    let dry_run = PostParams {
        dry_run: true,
        ..PostParams::default()
    };
    let tls_node = probe_node(&namespace, PROBE_NODE, true);
    let mutated = match nodes.create(&dry_run, &tls_node).await {
        Ok(node) => node,
        Err(e) => return unreachable_result(CHECK, &namespace, &e),
    };
    let annotated = mutated
        .metadata
        .annotations
        .as_ref()
        .and_then(|a| a.get(REQUIRED_DNS_NAMES_ANNOTATION))
        .is_some_and(|names| names.contains(PROBE_NODE));
    if !annotated {
        return CheckResult::failed(
            CHECK,
            format!(
                "a dry-run TLS SeiNode in namespace {namespace} came back without the \
                 {REQUIRED_DNS_NAMES_ANNOTATION} annotation: the mutating webhook {MUTATING_WEBHOOK} \
                 was not called"
            ),
            "check the MutatingWebhookConfiguration's rules and namespaceSelector (or give \
             --dry-run-namespace a namespace the webhooks apply to)",
        );
    }
    // One more character than a node's objects can carry (see check_runnable_name).
    let unrunnable = format!(
        "{PROBE_NODE}-{}",
        "x".repeat(seinode_tls_crds::contract::MAX_NODE_NAME_LEN - PROBE_NODE.len())
    );
    match nodes
        .create(&dry_run, &probe_node(&namespace, &unrunnable, false))
        .await
    {
        Err(kube::Error::Api(status))
            if status.message.contains(VALIDATING_WEBHOOK) && status.message.contains("denied") => {
        }
        Err(e) => return unreachable_result(CHECK, &namespace, &e),
        Ok(_) => {
            return CheckResult::failed(
                CHECK,
                format!(
                    "a dry-run SeiNode whose name can never run was admitted in namespace \
                     {namespace}: the validating webhook {VALIDATING_WEBHOOK} was not called"
                ),
                "check the ValidatingWebhookConfiguration's rules, matchConditions and \
                 namespaceSelector",
            );
        }
    }
    CheckResult::ok(
        CHECK,
        format!(
            "in namespace {namespace}, a dry-run TLS SeiNode was annotated by {MUTATING_WEBHOOK} \
             and an unrunnable one denied by {VALIDATING_WEBHOOK}"
        ),
    )
}

/// A SeiNode for a dry run.
fn probe_node(namespace: &str, name: &str, tls: bool) -> SeiNode {
    let mut node = SeiNode::new(
        name,
        SeiNodeSpec {
            chain_id: "seinode-tls-check".to_owned(),
            image: "seinode-tls-check:dry-run".to_owned(),
            full_node: Some(serde_json::json!({})),
            // A Secret that does not exist: the webhook admits the node with a warning.
            sidecar: tls.then(|| SidecarSpec {
                tls: Some(SidecarTls {
                    secret_name: format!("{PROBE_NODE}-absent"),
                }),
                ..SidecarSpec::default()
            }),
            ..SeiNodeSpec::default()
        },
    );
    node.metadata.namespace = Some(namespace.to_owned());
    node
}

/// What a failed dry run means: the API server could not call the webhook (which says why:
/// TLS, no endpoints, timeout), or something else refused it.
fn unreachable_result(check: &'static str, namespace: &str, error: &kube::Error) -> CheckResult {
    let message = match error {
        kube::Error::Api(status) => status.message.clone(),
        other => crate::online::root_cause(other),
    };
    let fix = if message.contains("x509") || message.contains("certificate") {
        CA_BUNDLE_FIX
    } else if message.contains("failed calling webhook") {
        "the API server cannot reach the webhook pods: check that they are Ready (`kubectl -n NS \
         get pods`), the Service's endpoints, and any NetworkPolicy (networkPolicy.webhookFrom)"
    } else if message.contains("forbidden") || message.contains("Forbidden") {
        "the identity running `check` may not create SeiNodes (dry runs need create)"
    } else {
        "read the message; `kubectl apply --dry-run=server` of a SeiNode shows the same"
    };
    CheckResult::failed(
        check,
        format!("a dry-run SeiNode in namespace {namespace} failed: {message}"),
        fix,
    )
}

/// The namespace to send dry runs to: `--dry-run-namespace`, else the first existing one the
/// validating webhook's namespaceSelector selects among those it names and `default`.
async fn dry_run_namespace(
    client: &kube::Client,
    args: &CheckArgs,
    selector: Option<&LabelSelector>,
) -> Result<String, CheckResult> {
    const CHECK: &str = "webhooks-answer";
    if let Some(ns) = &args.dry_run_namespace {
        return Ok(ns.clone());
    }
    let Some(selector) = selector else {
        return Err(CheckResult::failed(
            CHECK,
            format!("not tried: no webhook {VALIDATING_WEBHOOK} is registered"),
            REINSTALL,
        ));
    };
    let namespaces = Api::<Namespace>::all(client.clone());
    let mut tried = Vec::new();
    for candidate in namespace_candidates(selector) {
        match namespaces.get_opt(&candidate).await {
            Ok(Some(ns)) => {
                let labels = ns.metadata.labels.unwrap_or_default();
                if selector_matches(selector, &labels) {
                    return Ok(candidate);
                }
            }
            Ok(None) => {}
            Err(e) => {
                return Err(read_failed(
                    CHECK,
                    &format!("Namespace {candidate}"),
                    &e,
                    "or give --dry-run-namespace",
                ));
            }
        }
        tried.push(candidate);
    }
    Err(CheckResult::failed(
        CHECK,
        format!(
            "no namespace to try the webhooks in: none of {} exists and is selected by the \
             webhooks",
            tried.join(", ")
        ),
        "give --dry-run-namespace NS, a namespace the webhooks apply to",
    ))
}

/// The namespaces a selector names (`kubernetes.io/metadata.name In [...]`), then `default`.
pub fn namespace_candidates(selector: &LabelSelector) -> Vec<String> {
    let mut candidates: Vec<String> = selector
        .match_expressions
        .iter()
        .flatten()
        .filter(|e| e.key == "kubernetes.io/metadata.name" && e.operator == "In")
        .flat_map(|e| e.values.clone().unwrap_or_default())
        .collect();
    if candidates.is_empty() {
        candidates.push("default".to_owned());
    }
    candidates
}

/// Whether `labels` satisfy `selector` (matchLabels and matchExpressions, as the API server
/// evaluates them).
pub fn selector_matches(selector: &LabelSelector, labels: &BTreeMap<String, String>) -> bool {
    let by_labels = selector
        .match_labels
        .iter()
        .flatten()
        .all(|(k, v)| labels.get(k) == Some(v));
    let by_expressions = selector.match_expressions.iter().flatten().all(|e| {
        let values = e.values.as_deref().unwrap_or_default();
        match e.operator.as_str() {
            "In" => labels.get(&e.key).is_some_and(|v| values.contains(v)),
            "NotIn" => labels.get(&e.key).is_none_or(|v| !values.contains(v)),
            "Exists" => labels.contains_key(&e.key),
            "DoesNotExist" => !labels.contains_key(&e.key),
            _ => false,
        }
    });
    by_labels && by_expressions
}

// === the leader ===

async fn check_leader(client: &kube::Client, args: &CheckArgs, now: Timestamp) -> CheckResult {
    const CHECK: &str = "leader";
    let what = format!("Lease {}/{}", args.namespace, args.name);
    match Api::<Lease>::namespaced(client.clone(), &args.namespace)
        .get(&args.name)
        .await
    {
        Ok(lease) => lease_verdict(&what, &lease, now),
        Err(e) => read_failed(
            CHECK,
            &what,
            &e,
            "no replica has ever led: check that the Deployment runs with --leader-elect and \
             --leader-election-name set to the chart's full name, and its logs",
        ),
    }
}

/// Whether a replica holds the Lease and renewed it within its duration (by this machine's
/// clock; a skew of a few seconds is within the margin).
pub fn lease_verdict(what: &str, lease: &Lease, now: Timestamp) -> CheckResult {
    const CHECK: &str = "leader";
    /// Allowance for clock skew between this machine and the leader's.
    const SKEW: i64 = 5;
    let spec = lease.spec.clone().unwrap_or_default();
    let Some(holder) = spec.holder_identity.filter(|h| !h.is_empty()) else {
        return CheckResult::failed(
            CHECK,
            format!("{what} is held by no replica: no controller reconciles"),
            "check that the Deployment's pods run (`kubectl -n NS get pods`) and their logs \
             (\"leader election\")",
        );
    };
    let duration = i64::from(spec.lease_duration_seconds.unwrap_or(15));
    let Some(renewed) = spec.renew_time.map(|t| t.0) else {
        return CheckResult::failed(
            CHECK,
            format!("{what} is held by {holder} but was never renewed"),
            "restart the controller's pods",
        );
    };
    let age = now.as_second() - renewed.as_second();
    if age > duration + SKEW {
        return CheckResult::failed(
            CHECK,
            format!(
                "{what} is held by {holder}, last renewed {age}s ago (its duration is {duration}s): \
                 the leader stopped renewing and no replica took over"
            ),
            "check the pods (`kubectl -n NS get pods`) and their logs; a replica takes the \
             Lease over once it has expired",
        );
    }
    CheckResult::ok(
        CHECK,
        format!("{what} is held by {holder}, renewed {}s ago", age.max(0)),
    )
}

// === RBAC ===

/// What the controller must be allowed, cluster-wide or in each watched namespace (the chart's
/// `seinode-tls.rules`; tests/chart.rs keeps the two equal), and on Leases in the release
/// namespace: (API group, resource or resource/subresource, verbs).
pub const RULES: &[(&str, &str, &[&str])] = &[
    ("sei.io", "seinodes", &["get", "list", "watch"]),
    ("sei.io", "seinodes/status", &["update"]),
    ("", "secrets", &["get", "list", "watch"]),
    (
        "",
        "configmaps",
        &["get", "list", "watch", "create", "patch"],
    ),
    ("", "services", &["get", "list", "watch", "create", "patch"]),
    (
        "apps",
        "statefulsets",
        &["get", "list", "watch", "create", "patch"],
    ),
    ("", "pods", &["get", "list", "watch"]),
    ("events.k8s.io", "events", &["create"]),
];
pub const LEASE_VERBS: &[&str] = &["get", "create", "update"];

/// One question for the API server: may the controller `verb` `resource` there?
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Access {
    /// `None`: cluster-wide (every namespace).
    pub namespace: Option<String>,
    pub group: &'static str,
    /// `resource` or `resource/subresource`.
    pub resource: &'static str,
    pub verb: &'static str,
}

impl Access {
    /// The SubjectAccessReview that asks it for ServiceAccount `account` of `sa_namespace`,
    /// with the groups the API server gives every ServiceAccount.
    pub fn review(&self, sa_namespace: &str, account: &str) -> SubjectAccessReview {
        let (resource, subresource) = match self.resource.split_once('/') {
            Some((resource, sub)) => (resource, Some(sub.to_owned())),
            None => (self.resource, None),
        };
        SubjectAccessReview {
            spec: SubjectAccessReviewSpec {
                user: Some(format!("system:serviceaccount:{sa_namespace}:{account}")),
                groups: Some(vec![
                    "system:serviceaccounts".to_owned(),
                    format!("system:serviceaccounts:{sa_namespace}"),
                    "system:authenticated".to_owned(),
                ]),
                resource_attributes: Some(ResourceAttributes {
                    group: Some(self.group.to_owned()),
                    resource: Some(resource.to_owned()),
                    subresource,
                    verb: Some(self.verb.to_owned()),
                    namespace: self.namespace.clone(),
                    ..ResourceAttributes::default()
                }),
                ..SubjectAccessReviewSpec::default()
            },
            ..SubjectAccessReview::default()
        }
    }
}

impl std::fmt::Display for Access {
    /// `update sei.io/seinodes/status in sei`, `get core/secrets cluster-wide`.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let group = if self.group.is_empty() {
            "core"
        } else {
            self.group
        };
        match &self.namespace {
            Some(ns) => write!(f, "{} {group}/{} in {ns}", self.verb, self.resource),
            None => write!(f, "{} {group}/{} cluster-wide", self.verb, self.resource),
        }
    }
}

/// Everything the controller needs: [`RULES`] cluster-wide or in each of `watched`, and
/// [`LEASE_VERBS`] on Leases in the release namespace.
pub fn needed_access(release_namespace: &str, watched: Option<&[String]>) -> Vec<Access> {
    let scopes: Vec<Option<String>> = match watched {
        Some(namespaces) => namespaces.iter().cloned().map(Some).collect(),
        None => vec![None],
    };
    let mut needed = Vec::new();
    for namespace in scopes {
        for (group, resource, verbs) in RULES {
            for verb in *verbs {
                needed.push(Access {
                    namespace: namespace.clone(),
                    group,
                    resource,
                    verb,
                });
            }
        }
    }
    for verb in LEASE_VERBS {
        needed.push(Access {
            namespace: Some(release_namespace.to_owned()),
            group: "coordination.k8s.io",
            resource: "leases",
            verb,
        });
    }
    needed
}

async fn check_rbac(
    client: &kube::Client,
    args: &CheckArgs,
    watched: Option<&[String]>,
) -> CheckResult {
    const CHECK: &str = "rbac";
    let account = args.service_account.as_deref().unwrap_or(&args.name);
    let user = format!("system:serviceaccount:{}:{account}", args.namespace);
    let needed = needed_access(&args.namespace, watched);
    let reviews = Api::<SubjectAccessReview>::all(client.clone());
    let answers = futures::future::join_all(needed.iter().map(|access| {
        let review = access.review(&args.namespace, account);
        let reviews = reviews.clone();
        async move { reviews.create(&PostParams::default(), &review).await }
    }))
    .await;
    let mut denied = Vec::new();
    for (access, answer) in needed.iter().zip(answers) {
        match answer {
            Ok(answer) if answer.status.as_ref().is_some_and(|s| s.allowed) => {}
            Ok(_) => denied.push(access.to_string()),
            Err(e) => {
                return read_failed(
                    CHECK,
                    "a SubjectAccessReview",
                    &e,
                    "the identity running `check` needs create on \
                     subjectaccessreviews.authorization.k8s.io",
                );
            }
        }
    }
    if denied.is_empty() {
        return CheckResult::ok(
            CHECK,
            format!(
                "{user} may do the {} things the controller does",
                needed.len()
            ),
        );
    }
    let shown = denied
        .iter()
        .take(6)
        .cloned()
        .collect::<Vec<_>>()
        .join(", ");
    let more = match denied.len().saturating_sub(6) {
        0 => String::new(),
        more => format!(" and {more} more"),
    };
    CheckResult::failed(
        CHECK,
        format!("{user} may not {shown}{more}"),
        "restore the chart's ClusterRole/Role and bindings (`helm upgrade`), or give \
         --service-account if serviceAccount.name is set",
    )
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use k8s_openapi::api::coordination::v1::LeaseSpec;
    use k8s_openapi::apimachinery::pkg::apis::meta::v1::{LabelSelectorRequirement, MicroTime};
    use seinode_tls_testkit::CertificateAuthority;

    use super::*;

    fn at(secs: i64) -> Timestamp {
        Timestamp::from_second(secs).unwrap()
    }

    #[test]
    fn a_ca_bundle_is_good_until_its_first_certificate_expires() {
        let ca = CertificateAuthority::new("webhook CA").unwrap();
        let now = Timestamp::now();
        let until = ca_bundle_until(ca.cert_pem().as_bytes(), now).unwrap();
        assert!(until > now, "{until}");
        let later = until
            .checked_add(jiff::SignedDuration::from_secs(60))
            .unwrap();
        let expired = ca_bundle_until(ca.cert_pem().as_bytes(), later).unwrap_err();
        assert!(expired.contains("expired at"), "{expired}");
    }

    #[test]
    fn a_ca_bundle_that_is_empty_garbage_or_a_key_is_refused() {
        let now = Timestamp::now();
        assert!(ca_bundle_until(b"", now).unwrap_err().contains("empty"));
        assert!(
            ca_bundle_until(b"not pem at all", now)
                .unwrap_err()
                .contains("no PEM certificate")
        );
        let key = b"-----BEGIN PRIVATE KEY-----\nAAAA\n-----END PRIVATE KEY-----\n";
        let error = ca_bundle_until(key, now).unwrap_err();
        assert!(error.contains("PRIVATE KEY block"), "{error}");
        assert!(!error.contains("AAAA"), "no key material: {error}");
        let bad = b"-----BEGIN CERTIFICATE-----\nAAAA\n-----END CERTIFICATE-----\n";
        assert!(
            ca_bundle_until(bad, now)
                .unwrap_err()
                .contains("does not parse")
        );
    }

    fn lease(holder: Option<&str>, renewed: Option<i64>) -> Lease {
        Lease {
            spec: Some(LeaseSpec {
                holder_identity: holder.map(str::to_owned),
                lease_duration_seconds: Some(15),
                renew_time: renewed.map(|s| MicroTime(at(s))),
                ..LeaseSpec::default()
            }),
            ..Lease::default()
        }
    }

    #[test]
    fn a_lease_leads_only_when_held_and_renewed_within_its_duration() {
        let now = at(1_000);
        let ok = lease_verdict("Lease ns/x", &lease(Some("pod-a_1"), Some(995)), now);
        assert!(ok.ok, "{ok:?}");
        assert!(ok.message.contains("pod-a_1"), "{ok:?}");
        let stale = lease_verdict("Lease ns/x", &lease(Some("pod-a_1"), Some(900)), now);
        assert!(!stale.ok);
        assert!(stale.message.contains("last renewed 100s ago"), "{stale:?}");
        let released = lease_verdict("Lease ns/x", &lease(None, Some(999)), now);
        assert!(!released.ok);
        assert!(
            released.message.contains("held by no replica"),
            "{released:?}"
        );
        assert!(
            released.line().starts_with("FAILED  leader: "),
            "{}",
            released.line()
        );
        assert!(released.line().contains(". Fix: "), "{}", released.line());
    }

    fn expression(key: &str, operator: &str, values: &[&str]) -> LabelSelectorRequirement {
        LabelSelectorRequirement {
            key: key.to_owned(),
            operator: operator.to_owned(),
            values: Some(values.iter().map(|v| (*v).to_owned()).collect()),
        }
    }

    #[test]
    fn the_dry_run_goes_to_a_namespace_the_webhooks_select() {
        let name = "kubernetes.io/metadata.name";
        let cluster_wide = LabelSelector {
            match_expressions: Some(vec![expression(
                name,
                "NotIn",
                &["kube-system", "seinode-tls-system"],
            )]),
            ..LabelSelector::default()
        };
        assert_eq!(namespace_candidates(&cluster_wide), ["default"]);
        let labels = |ns: &str| BTreeMap::from([(name.to_owned(), ns.to_owned())]);
        assert!(selector_matches(&cluster_wide, &labels("default")));
        assert!(!selector_matches(&cluster_wide, &labels("kube-system")));

        let watched = LabelSelector {
            match_expressions: Some(vec![
                expression(name, "NotIn", &["kube-system"]),
                expression(name, "In", &["sei-a", "sei-b"]),
            ]),
            ..LabelSelector::default()
        };
        assert_eq!(namespace_candidates(&watched), ["sei-a", "sei-b"]);
        assert!(selector_matches(&watched, &labels("sei-b")));
        assert!(!selector_matches(&watched, &labels("default")));
    }

    #[test]
    fn watched_namespaces_are_read_from_the_deployments_arguments() {
        let args = |a: &[&str]| a.iter().map(|s| (*s).to_owned()).collect::<Vec<_>>();
        assert_eq!(
            watch_namespaces(&args(&["run", "--watch-namespaces=a,b", "--leader-elect"])),
            Some(vec!["a".to_owned(), "b".to_owned()])
        );
        assert_eq!(
            watch_namespaces(&args(&["run", "--watch-namespaces", "a"])),
            Some(vec!["a".to_owned()])
        );
        assert_eq!(
            watch_namespaces(&args(&["run", "--watch-namespaces="])),
            None
        );
        assert_eq!(watch_namespaces(&args(&["run"])), None);
    }

    #[test]
    fn a_registration_must_call_the_releases_service_with_a_valid_bundle() {
        use k8s_openapi::ByteString;
        use k8s_openapi::api::admissionregistration::v1::ServiceReference;
        let ca = CertificateAuthority::new("webhook CA").unwrap();
        let args = CheckArgs {
            namespace: "seinode-tls-system".to_owned(),
            name: "seinode-tls".to_owned(),
            service_account: None,
            dry_run_namespace: None,
            output: OutputFormat::Text,
        };
        let config = |ns: &str, bundle: &[u8]| WebhookClientConfig {
            service: Some(ServiceReference {
                namespace: ns.to_owned(),
                name: "seinode-tls".to_owned(),
                ..ServiceReference::default()
            }),
            ca_bundle: Some(ByteString(bundle.to_vec())),
            url: None,
        };
        let now = Timestamp::now();
        let good = [(
            VALIDATING_WEBHOOK.to_owned(),
            config("seinode-tls-system", ca.cert_pem().as_bytes()),
        )];
        let verdict = registration_verdict("v", "V", VALIDATING_WEBHOOK, &good, &args, now);
        assert!(verdict.ok, "{verdict:?}");
        assert!(
            verdict.message.contains("caBundle valid until"),
            "{verdict:?}"
        );

        let missing = registration_verdict("v", "V", MUTATING_WEBHOOK, &good, &args, now);
        assert!(!missing.ok && missing.message.contains("has no webhook"));
        let other = [(
            VALIDATING_WEBHOOK.to_owned(),
            config("elsewhere", ca.cert_pem().as_bytes()),
        )];
        let verdict = registration_verdict("v", "V", VALIDATING_WEBHOOK, &other, &args, now);
        assert!(!verdict.ok && verdict.message.contains("elsewhere/seinode-tls"));
        let empty = [(
            VALIDATING_WEBHOOK.to_owned(),
            config("seinode-tls-system", b""),
        )];
        let verdict = registration_verdict("v", "V", VALIDATING_WEBHOOK, &empty, &args, now);
        assert!(!verdict.ok && verdict.message.contains("caBundle is empty"));
    }

    #[test]
    fn the_controllers_access_is_asked_where_it_watches_and_on_its_lease() {
        let cluster = needed_access("sys", None);
        let verbs: usize = RULES.iter().map(|(_, _, verbs)| verbs.len()).sum();
        assert_eq!(cluster.len(), verbs + LEASE_VERBS.len());
        assert!(cluster[..verbs].iter().all(|a| a.namespace.is_none()));
        let watched = ["a".to_owned(), "b".to_owned()];
        let namespaced = needed_access("sys", Some(&watched));
        assert_eq!(namespaced.len(), 2 * verbs + LEASE_VERBS.len());
        assert_eq!(
            namespaced.last().unwrap().to_string(),
            "update coordination.k8s.io/leases in sys"
        );

        let status = cluster
            .iter()
            .find(|a| a.resource == "seinodes/status")
            .unwrap();
        assert_eq!(
            status.to_string(),
            "update sei.io/seinodes/status cluster-wide"
        );
        let review = status.review("sys", "seinode-tls");
        let attributes = review.spec.resource_attributes.unwrap();
        assert_eq!(
            (
                attributes.resource.as_deref(),
                attributes.subresource.as_deref()
            ),
            (Some("seinodes"), Some("status"))
        );
        assert_eq!(
            review.spec.user.as_deref(),
            Some("system:serviceaccount:sys:seinode-tls")
        );
        let secrets = cluster.iter().find(|a| a.resource == "secrets").unwrap();
        assert_eq!(secrets.to_string(), "get core/secrets cluster-wide");
    }
}
