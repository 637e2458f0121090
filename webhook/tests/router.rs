//! HTTP-level tests of the admission and health routers: each request is an AdmissionReview
//! fixture sent through `tower::ServiceExt::oneshot`, with no socket, against caches fed by hand.
//!
//! Every branch of the three endpoints is covered, and every denial and warning is checked for
//! what a person needs from it. Certificates are generated here with rcgen (ECDSA P-256).

// The workspace warns about unwrap/expect outside tests (STYLE.md); here a broken fixture panics.
#![allow(clippy::expect_used, clippy::unwrap_used)]

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use axum::Router;
use axum::body::{Body, Bytes};
use axum::http::{Method, Request, StatusCode, header};
use http_body_util::BodyExt;
use k8s_openapi::ByteString;
use k8s_openapi::api::core::v1::Secret;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;
use kube::runtime::watcher;
use prometheus_client::registry::Registry;
use rcgen::{CertificateParams, KeyPair, date_time_ymd};
use seinode_tls_crds::SeiNode;
use seinode_tls_crds::contract::{REQUIRED_DNS_NAMES_ANNOTATION, required_dns_names};
use seinode_tls_webhook::admission::DenyReason;
use seinode_tls_webhook::cache::{NodeCache, SecretCache};
use seinode_tls_webhook::limits::{BodyBudget, RequestLimit};
use seinode_tls_webhook::metrics::WebhookMetrics;
use seinode_tls_webhook::server::{
    AdmissionState, MAX_SECRET_REVIEW_BYTES, MAX_SEINODE_REVIEW_BYTES, MUTATE_SEINODES_PATH,
    VALIDATE_SECRETS_PATH, VALIDATE_SEINODES_PATH, admission_router, health_router,
};
use seinode_tls_webhook::{GuardPolicy, SecretPolicy};
use serde_json::{Value, json};
use tower::ServiceExt;

const NAMESPACE: &str = "sei";
const NODE: &str = "rpc";
const SECRET: &str = "rpc-tls";
const CLUSTER_DOMAIN: &str = "cluster.local";
const SERVICE_NAME: &str = "rpc.sei.svc.cluster.local";
const POD_NAME: &str = "rpc-0.rpc.sei.svc.cluster.local";
/// What the delete + recreate advice of every immutability denial must mention.
const PVC_FIELD: &str = "spec.dataVolume.import.pvcName";

// === Webhook under test ===

/// The routers over hand-fed caches, with the registry their metrics live in.
struct Webhook {
    state: Arc<AdmissionState>,
    registry: Arc<Registry>,
    admission: Router,
}

/// How to build a [`Webhook`]: cache contents, sync state and policies.
struct Setup {
    secrets: Vec<Secret>,
    nodes: Vec<SeiNode>,
    synced: bool,
    secret_policy: SecretPolicy,
    guard_policy: GuardPolicy,
    max_concurrent_requests: usize,
    body_memory: usize,
}

fn setup() -> Setup {
    Setup {
        secrets: Vec::new(),
        nodes: Vec::new(),
        synced: true,
        secret_policy: SecretPolicy::Deny,
        guard_policy: GuardPolicy::Warn,
        max_concurrent_requests: 32,
        body_memory: seinode_tls_webhook::config::DEFAULT_MAX_BODY_MEMORY,
    }
}

impl Setup {
    fn secret(mut self, secret: Secret) -> Self {
        self.secrets.push(secret);
        self
    }

    fn node(mut self, node: Value) -> Self {
        self.nodes
            .push(serde_json::from_value(node).expect("the fixture is a SeiNode"));
        self
    }

    fn secret_policy(mut self, policy: SecretPolicy) -> Self {
        self.secret_policy = policy;
        self
    }

    fn guard_policy(mut self, policy: GuardPolicy) -> Self {
        self.guard_policy = policy;
        self
    }

    fn max_concurrent_requests(mut self, max: usize) -> Self {
        self.max_concurrent_requests = max;
        self
    }

    fn body_memory(mut self, bytes: usize) -> Self {
        self.body_memory = bytes;
        self
    }

    fn unsynced(mut self) -> Self {
        self.synced = false;
        self
    }

    fn build(self) -> Webhook {
        let mut registry = Registry::default();
        let metrics = Arc::new(WebhookMetrics::register(&mut registry));
        let client = seinode_tls_testkit::no_api_server();
        let secrets = Arc::new(SecretCache::new(client, metrics.clone()));
        for secret in &self.secrets {
            secrets.apply(secret);
        }
        let nodes = NodeCache::new();
        for node in self.nodes {
            nodes.apply(&watcher::Event::Apply(node));
        }
        if self.synced {
            secrets.mark_synced();
            nodes.mark_synced();
        }
        let state = Arc::new(AdmissionState {
            secrets,
            nodes,
            secret_policy: self.secret_policy,
            guard_policy: self.guard_policy,
            cluster_domain: CLUSTER_DOMAIN.to_owned(),
            request_deadline: Duration::from_secs(2),
            request_limit: Arc::new(RequestLimit::new(self.max_concurrent_requests, &metrics)),
            body_budget: Arc::new(BodyBudget::new(self.body_memory, &metrics)),
            metrics,
        });
        let admission = admission_router(state.clone());
        Webhook {
            state,
            registry: Arc::new(registry),
            admission,
        }
    }
}

impl Webhook {
    /// POSTs `body` to `path`: the status, the headers and the body as text.
    async fn post_full(
        &self,
        path: &str,
        body: impl Into<Body>,
    ) -> (StatusCode, axum::http::HeaderMap, String) {
        let (status, headers, body) = self.send(path, body).await;
        (status, headers, String::from_utf8_lossy(&body).into_owned())
    }

    /// POSTs `body` to `path` of the admission router; the same router answers every call.
    async fn send(
        &self,
        path: &str,
        body: impl Into<Body>,
    ) -> (StatusCode, axum::http::HeaderMap, Bytes) {
        let request = Request::builder()
            .method(Method::POST)
            .uri(path)
            .header(header::CONTENT_TYPE, "application/json")
            .body(body.into())
            .unwrap();
        let response = self
            .admission
            .clone()
            .oneshot(request)
            .await
            .expect("the router is infallible");
        let (parts, body) = response.into_parts();
        let body = body
            .collect()
            .await
            .expect("read the response body")
            .to_bytes();
        (parts.status, parts.headers, body)
    }

    fn metrics_text(&self) -> String {
        let mut text = String::new();
        prometheus_client::encoding::text::encode(&mut text, &self.registry).unwrap();
        text
    }

    async fn post(&self, path: &str, body: impl Into<Body>) -> (StatusCode, Bytes) {
        let (status, _, body) = self.send(path, body).await;
        (status, body)
    }

    /// Sends a review that must be answered with HTTP 200 and an AdmissionReview.
    async fn review(&self, path: &str, review: &Review) -> Answer {
        let (status, body) = self.post(path, review.to_json().to_string()).await;
        assert_eq!(status, StatusCode::OK, "{}", String::from_utf8_lossy(&body));
        let answer: Value = serde_json::from_slice(&body).expect("the answer is JSON");
        assert_eq!(answer["apiVersion"], "admission.k8s.io/v1", "{answer}");
        assert_eq!(answer["kind"], "AdmissionReview", "{answer}");
        assert_eq!(
            answer["response"]["uid"],
            review.uid.as_str(),
            "the uid is echoed: {answer}"
        );
        Answer { review: answer }
    }

    async fn validate(&self, review: &Review) -> Answer {
        self.review(VALIDATE_SEINODES_PATH, review).await
    }

    async fn mutate(&self, review: &Review) -> Answer {
        self.review(MUTATE_SEINODES_PATH, review).await
    }

    async fn guard(&self, review: &Review) -> Answer {
        self.review(VALIDATE_SECRETS_PATH, review).await
    }

    /// Sends a body that must be refused with HTTP 400; returns the text message.
    async fn bad_request(&self, path: &str, body: impl Into<Body>) -> String {
        let (status, body) = self.post(path, body).await;
        let text = String::from_utf8(body.to_vec()).expect("the message is UTF-8");
        assert_eq!(status, StatusCode::BAD_REQUEST, "{text}");
        text
    }

    fn health(&self) -> Router {
        {
            let state = self.state.clone();
            health_router(move || state.readiness(), self.registry.clone())
        }
    }

    async fn get_health(&self, path: &str) -> (StatusCode, String) {
        let request = Request::builder().uri(path).body(Body::empty()).unwrap();
        let response = self
            .health()
            .oneshot(request)
            .await
            .expect("the router is infallible");
        let status = response.status();
        let body = response
            .into_body()
            .collect()
            .await
            .expect("read the response body")
            .to_bytes();
        (status, String::from_utf8(body.to_vec()).expect("UTF-8"))
    }

    async fn metrics(&self) -> String {
        let (status, text) = self.get_health("/metrics").await;
        assert_eq!(status, StatusCode::OK, "{text}");
        text
    }
}

// === Answers ===

/// An AdmissionReview answer.
struct Answer {
    review: Value,
}

impl Answer {
    fn response(&self) -> &Value {
        &self.review["response"]
    }

    fn allowed(&self) -> bool {
        self.response()["allowed"]
            .as_bool()
            .expect("allowed is a boolean")
    }

    fn message(&self) -> &str {
        self.response()["status"]["message"]
            .as_str()
            .unwrap_or_default()
    }

    fn warnings(&self) -> Vec<String> {
        match &self.response()["warnings"] {
            Value::Null => Vec::new(),
            warnings => serde_json::from_value(warnings.clone()).expect("warnings are strings"),
        }
    }

    /// The decoded JSON patch, if any.
    ///
    /// The API server reads `patch` as Go `[]byte`, documented as a base64 string; anything
    /// else fails the test.
    fn patch(&self) -> Option<Value> {
        let bytes: Vec<u8> = match &self.response()["patch"] {
            Value::Null => return None,
            Value::String(_) => {
                serde_json::from_value::<ByteString>(self.response()["patch"].clone())
                    .expect("the patch is base64")
                    .0
            }
            other => panic!("the patch must be a base64 string, got {other}"),
        };
        Some(serde_json::from_slice(&bytes).expect("the patch is JSON"))
    }

    /// Allowed, with no warnings and no patch.
    #[track_caller]
    fn assert_allowed_silently(&self) {
        assert!(self.allowed(), "{}", self.review);
        assert_eq!(self.warnings(), Vec::<String>::new(), "{}", self.review);
        assert_eq!(self.patch(), None, "{}", self.review);
        assert_eq!(self.response()["status"], json!({}), "{}", self.review);
    }

    /// Allowed with exactly one warning, which is returned.
    #[track_caller]
    fn assert_allowed_with_one_warning(&self) -> String {
        assert!(self.allowed(), "{}", self.review);
        assert_eq!(self.patch(), None, "{}", self.review);
        let warnings = self.warnings();
        assert_eq!(warnings.len(), 1, "{}", self.review);
        warnings.into_iter().next().unwrap()
    }

    /// Denied with the given reason and its HTTP code, and no warnings; returns the message.
    #[track_caller]
    fn assert_denied(&self, reason: DenyReason) -> String {
        assert!(!self.allowed(), "{}", self.review);
        assert_eq!(
            self.response()["status"]["code"],
            reason.code(),
            "{}",
            self.review
        );
        assert_eq!(
            self.response()["status"]["reason"],
            reason.as_str(),
            "{}",
            self.review
        );
        assert_eq!(self.warnings(), Vec::<String>::new(), "{}", self.review);
        assert_eq!(self.patch(), None, "{}", self.review);
        self.message().to_owned()
    }
}

#[track_caller]
fn assert_contains_all(text: &str, parts: &[&str]) {
    for part in parts {
        assert!(text.contains(part), "expected {part:?} in: {text}");
    }
}

// === Requests ===

/// One AdmissionReview request.
struct Review {
    uid: String,
    operation: &'static str,
    secret: bool,
    name: String,
    object: Option<Value>,
    old_object: Option<Value>,
    dry_run: bool,
}

impl Review {
    fn seinode(operation: &'static str, object: Option<Value>, old_object: Option<Value>) -> Self {
        let name = object
            .as_ref()
            .or(old_object.as_ref())
            .and_then(|o| o["metadata"]["name"].as_str())
            .unwrap_or_default()
            .to_owned();
        Review {
            uid: format!("uid-{operation}-{name}").to_lowercase(),
            operation,
            secret: false,
            name,
            object,
            old_object,
            dry_run: false,
        }
    }

    fn create_node(object: Value) -> Self {
        Review::seinode("CREATE", Some(object), None)
    }

    fn update_node(old: Value, new: Value) -> Self {
        Review::seinode("UPDATE", Some(new), Some(old))
    }

    fn secret(
        operation: &'static str,
        object: Option<&Secret>,
        old_object: Option<&Secret>,
    ) -> Self {
        let to_json = |secret: &Secret| serde_json::to_value(secret).expect("a Secret serializes");
        let name = object
            .or(old_object)
            .and_then(|s| s.metadata.name.clone())
            .unwrap_or_default();
        Review {
            uid: format!("uid-{operation}-secret-{name}").to_lowercase(),
            operation,
            secret: true,
            name,
            object: object.map(to_json),
            old_object: old_object.map(to_json),
            dry_run: false,
        }
    }

    fn update_secret(old: &Secret, new: &Secret) -> Self {
        Review::secret("UPDATE", Some(new), Some(old))
    }

    fn delete_secret(old: &Secret) -> Self {
        Review::secret("DELETE", None, Some(old))
    }

    fn dry_run(mut self) -> Self {
        self.dry_run = true;
        self
    }

    fn to_json(&self) -> Value {
        let (kind, resource) = if self.secret {
            (
                json!({"group": "", "version": "v1", "kind": "Secret"}),
                json!({"group": "", "version": "v1", "resource": "secrets"}),
            )
        } else {
            (
                json!({"group": "sei.io", "version": "v1alpha1", "kind": "SeiNode"}),
                json!({"group": "sei.io", "version": "v1alpha1", "resource": "seinodes"}),
            )
        };
        json!({
            "apiVersion": "admission.k8s.io/v1",
            "kind": "AdmissionReview",
            "request": {
                "uid": self.uid,
                "kind": kind,
                "resource": resource,
                "requestKind": kind,
                "requestResource": resource,
                "name": self.name,
                "namespace": NAMESPACE,
                "operation": self.operation,
                "userInfo": {"username": "u", "groups": ["system:authenticated"]},
                "object": self.object,
                "oldObject": self.old_object,
                "dryRun": self.dry_run,
            }
        })
    }
}

// === SeiNodes ===

/// A full node named `name` in [`NAMESPACE`], with sidecar TLS from Secret `tls` when given.
fn node(name: &str, tls: Option<&str>) -> Value {
    let mut sidecar = json!({"port": 7777});
    if let Some(secret) = tls {
        sidecar["tls"] = json!({"secretName": secret});
    }
    json!({
        "apiVersion": "sei.io/v1alpha1",
        "kind": "SeiNode",
        "metadata": {"name": name, "namespace": NAMESPACE, "uid": format!("{name}-uid"), "resourceVersion": "7"},
        "spec": {
            "chainId": "pacific-1",
            "image": "ghcr.io/sei-protocol/seid:v6.0.0",
            "fullNode": {"snapshotGeneration": {"keepRecent": 5}},
            "sidecar": sidecar,
            "dataVolume": {"import": {"pvcName": format!("data-{name}")}},
        }
    })
}

/// The TLS node of most tests: `rpc` with Secret `rpc-tls`.
fn tls_node() -> Value {
    node(NODE, Some(SECRET))
}

/// A node without `spec.sidecar` at all.
fn node_without_sidecar(name: &str) -> Value {
    let mut node = node(name, None);
    node["spec"].as_object_mut().unwrap().remove("sidecar");
    node
}

fn with_image(mut node: Value, image: &str) -> Value {
    node["spec"]["image"] = json!(image);
    node
}

// === Certificates and Secrets ===

/// A certificate for `dns_names` and its own key, both PEM; `expired` moves its validity to 2020.
fn certificate(dns_names: &[&str], expired: bool) -> (String, String) {
    let key = KeyPair::generate().expect("generate a P-256 key");
    let names: Vec<String> = dns_names.iter().map(|n| (*n).to_owned()).collect();
    let mut params = CertificateParams::new(names).expect("valid SANs");
    if expired {
        params.not_before = date_time_ymd(2019, 1, 1);
        params.not_after = date_time_ymd(2020, 1, 1);
    }
    let cert = params.self_signed(&key).expect("sign the certificate");
    (cert.pem(), key.serialize_pem())
}

/// A `kubernetes.io/tls` Secret in [`NAMESPACE`] with the given content and resourceVersion.
fn tls_secret(name: &str, resource_version: &str, cert_pem: &str, key_pem: &str) -> Secret {
    Secret {
        metadata: ObjectMeta {
            name: Some(name.to_owned()),
            namespace: Some(NAMESPACE.to_owned()),
            resource_version: Some(resource_version.to_owned()),
            ..ObjectMeta::default()
        },
        type_: Some("kubernetes.io/tls".to_owned()),
        data: Some(BTreeMap::from([
            (
                "tls.crt".to_owned(),
                ByteString(cert_pem.as_bytes().to_vec()),
            ),
            (
                "tls.key".to_owned(),
                ByteString(key_pem.as_bytes().to_vec()),
            ),
        ])),
        ..Secret::default()
    }
}

/// Meets the contract of SeiNode `rpc`.
fn valid_secret(name: &str, resource_version: &str) -> Secret {
    let (cert, key) = certificate(&[SERVICE_NAME, POD_NAME], false);
    tls_secret(name, resource_version, &cert, &key)
}

/// Covers the Service name only, not pod 0.
fn wrong_sans_secret(name: &str, resource_version: &str) -> Secret {
    let (cert, key) = certificate(&[SERVICE_NAME, "rpc-0.other.sei.svc.cluster.local"], false);
    tls_secret(name, resource_version, &cert, &key)
}

fn expired_secret(name: &str, resource_version: &str) -> Secret {
    let (cert, key) = certificate(&[SERVICE_NAME, POD_NAME], true);
    tls_secret(name, resource_version, &cert, &key)
}

fn malformed_secret(name: &str, resource_version: &str) -> Secret {
    let (_, key) = certificate(&[SERVICE_NAME, POD_NAME], false);
    tls_secret(name, resource_version, "this is not PEM", &key)
}

/// The right names, but `tls.key` holds another key than the certificate's.
fn mismatched_key_secret(name: &str, resource_version: &str) -> Secret {
    let (cert, _) = certificate(&[SERVICE_NAME, POD_NAME], false);
    let (_, other_key) = certificate(&[SERVICE_NAME, POD_NAME], false);
    tls_secret(name, resource_version, &cert, &other_key)
}

/// A broken Secret for each defect a present Secret can have, with the reason it must report.
fn broken_secrets() -> Vec<(&'static str, Secret, &'static str)> {
    vec![
        (
            "wrong SANs",
            wrong_sans_secret(SECRET, "1"),
            "TLSSecretSANsMismatch",
        ),
        ("expired", expired_secret(SECRET, "1"), "TLSSecretExpired"),
        (
            "malformed",
            malformed_secret(SECRET, "1"),
            "TLSSecretMalformed",
        ),
        (
            "mismatched key",
            mismatched_key_secret(SECRET, "1"),
            "TLSSecretKeyMismatch",
        ),
    ]
}

// === Validating SeiNode UPDATE: spec.sidecar.tls is immutable ===

/// What every immutability denial must say besides what changed.
#[track_caller]
fn assert_immutability_advice(message: &str) {
    assert_contains_all(
        message,
        &[
            "SeiNode \"sei/rpc\"",
            "spec.sidecar.tls",
            "is immutable",
            "delete the SeiNode",
            "create it again",
            PVC_FIELD,
        ],
    );
}

#[tokio::test]
async fn update_that_enables_tls_is_denied_with_delete_and_recreate_advice() {
    let webhook = setup().build();
    let answer = webhook
        .validate(&Review::update_node(node(NODE, None), tls_node()))
        .await;
    let message = answer.assert_denied(DenyReason::Forbidden);
    assert_immutability_advice(&message);
    assert_contains_all(&message, &["would enable TLS", "secretName \"rpc-tls\""]);
}

#[tokio::test]
async fn update_that_disables_tls_is_denied_with_delete_and_recreate_advice() {
    let webhook = setup().build();
    let answer = webhook
        .validate(&Review::update_node(tls_node(), node(NODE, None)))
        .await;
    let message = answer.assert_denied(DenyReason::Forbidden);
    assert_immutability_advice(&message);
    assert_contains_all(&message, &["would disable TLS", "\"rpc-tls\""]);
}

#[tokio::test]
async fn update_that_renames_the_secret_is_denied_naming_both_names() {
    let webhook = setup().build();
    let answer = webhook
        .validate(&Review::update_node(
            node(NODE, Some("a")),
            node(NODE, Some("b")),
        ))
        .await;
    let message = answer.assert_denied(DenyReason::Forbidden);
    assert_immutability_advice(&message);
    assert_contains_all(&message, &["spec.sidecar.tls.secretName \"a\" -> \"b\""]);
}

#[tokio::test]
async fn update_that_adds_tls_to_a_node_without_a_sidecar_block_is_denied() {
    let webhook = setup().build();
    let answer = webhook
        .validate(&Review::update_node(node_without_sidecar(NODE), tls_node()))
        .await;
    let message = answer.assert_denied(DenyReason::Forbidden);
    assert_immutability_advice(&message);
    assert_contains_all(&message, &["would enable TLS"]);
}

#[tokio::test]
async fn update_that_removes_the_whole_sidecar_block_of_a_tls_node_is_denied() {
    let webhook = setup().build();
    let answer = webhook
        .validate(&Review::update_node(tls_node(), node_without_sidecar(NODE)))
        .await;
    let message = answer.assert_denied(DenyReason::Forbidden);
    assert_immutability_advice(&message);
    assert_contains_all(&message, &["would disable TLS"]);
}

#[tokio::test]
async fn update_that_changes_only_the_image_is_allowed() {
    let webhook = setup().build();
    let new = with_image(tls_node(), "ghcr.io/sei-protocol/seid:v6.1.0");
    webhook
        .validate(&Review::update_node(tls_node(), new))
        .await
        .assert_allowed_silently();
}

#[tokio::test]
async fn update_with_identical_tls_is_allowed() {
    let webhook = setup().build();
    let mut new = tls_node();
    new["spec"]["sidecar"]["port"] = json!(7778);
    webhook
        .validate(&Review::update_node(tls_node(), new))
        .await
        .assert_allowed_silently();
}

#[tokio::test]
async fn update_of_a_node_without_sidecar_on_either_side_is_allowed() {
    let webhook = setup().build();
    let new = with_image(
        node_without_sidecar(NODE),
        "ghcr.io/sei-protocol/seid:v6.1.0",
    );
    webhook
        .validate(&Review::update_node(node_without_sidecar(NODE), new))
        .await
        .assert_allowed_silently();
}

#[tokio::test]
async fn update_that_adds_a_sidecar_block_without_tls_is_allowed() {
    let webhook = setup().build();
    webhook
        .validate(&Review::update_node(
            node_without_sidecar(NODE),
            node(NODE, None),
        ))
        .await
        .assert_allowed_silently();
}

#[tokio::test]
async fn update_to_a_tls_block_without_secret_name_is_denied_as_invalid() {
    let webhook = setup().build();
    let mut new = tls_node();
    new["spec"]["sidecar"]["tls"] = json!({});
    let message = webhook
        .validate(&Review::update_node(tls_node(), new))
        .await
        .assert_denied(DenyReason::Invalid);
    assert_contains_all(&message, &["spec.sidecar.tls without a string secretName"]);
}

#[tokio::test]
async fn update_is_not_judged_by_the_secret_so_a_broken_secret_does_not_block_image_changes() {
    let webhook = setup().secret(wrong_sans_secret(SECRET, "1")).build();
    let new = with_image(tls_node(), "ghcr.io/sei-protocol/seid:v6.1.0");
    webhook
        .validate(&Review::update_node(tls_node(), new))
        .await
        .assert_allowed_silently();
}

// === Validating SeiNode CREATE ===

#[tokio::test]
async fn create_without_tls_is_allowed() {
    let webhook = setup().build();
    webhook
        .validate(&Review::create_node(node(NODE, None)))
        .await
        .assert_allowed_silently();
    webhook
        .validate(&Review::create_node(node_without_sidecar(NODE)))
        .await
        .assert_allowed_silently();
}

#[tokio::test]
async fn create_with_tls_and_a_valid_secret_is_allowed_without_warnings() {
    let webhook = setup().secret(valid_secret(SECRET, "1")).build();
    webhook
        .validate(&Review::create_node(tls_node()))
        .await
        .assert_allowed_silently();
}

#[tokio::test]
async fn create_with_tls_and_a_missing_secret_is_allowed_with_a_pending_warning() {
    let webhook = setup().build();
    let warning = webhook
        .validate(&Review::create_node(tls_node()))
        .await
        .assert_allowed_with_one_warning();
    assert_contains_all(
        &warning,
        &[
            "\"sei/rpc-tls\"",
            SERVICE_NAME,
            POD_NAME,
            "Pending",
            "kubernetes.io/tls",
        ],
    );
}

#[tokio::test]
async fn create_with_tls_and_a_secret_of_another_namespace_only_is_warned_as_missing() {
    let mut elsewhere = valid_secret(SECRET, "1");
    elsewhere.metadata.namespace = Some("other".to_owned());
    let webhook = setup().secret(elsewhere).build();
    let warning = webhook
        .validate(&Review::create_node(tls_node()))
        .await
        .assert_allowed_with_one_warning();
    assert_contains_all(&warning, &["\"sei/rpc-tls\"", "does not exist", "Pending"]);
}

#[tokio::test]
async fn create_with_tls_and_an_opaque_secret_of_that_name_is_allowed_with_a_pending_warning() {
    // The cache holds kubernetes.io/tls Secrets only, so another type counts as missing here.
    let mut opaque = valid_secret(SECRET, "1");
    opaque.type_ = Some("Opaque".to_owned());
    let webhook = setup().secret(opaque).build();
    let warning = webhook
        .validate(&Review::create_node(tls_node()))
        .await
        .assert_allowed_with_one_warning();
    assert_contains_all(
        &warning,
        &[
            "\"sei/rpc-tls\"",
            "kubernetes.io/tls",
            SERVICE_NAME,
            POD_NAME,
            "Pending",
        ],
    );
}

#[tokio::test]
async fn create_with_tls_before_the_cache_has_synced_is_allowed_with_a_warning() {
    // Even a valid Secret is not trusted before the first list completes.
    let webhook = setup().secret(valid_secret(SECRET, "1")).unsynced().build();
    let warning = webhook
        .validate(&Review::create_node(tls_node()))
        .await
        .assert_allowed_with_one_warning();
    assert_contains_all(
        &warning,
        &[
            "\"sei/rpc-tls\"",
            SERVICE_NAME,
            POD_NAME,
            "Pending",
            "can be checked",
        ],
    );
}

#[tokio::test]
async fn create_with_tls_and_a_broken_secret_is_denied_with_the_reason() {
    for (case, secret, reason) in broken_secrets() {
        let webhook = setup().secret(secret).build();
        let message = webhook
            .validate(&Review::create_node(tls_node()))
            .await
            .assert_denied(DenyReason::Invalid);
        assert_contains_all(
            &message,
            &[
                "SeiNode \"sei/rpc\"",
                reason,
                "Secret \"sei/rpc-tls\"",
                "--secret-policy warn",
            ],
        );
        assert!(!message.contains("PRIVATE KEY"), "{case}: {message}");
    }
}

#[tokio::test]
async fn create_with_tls_and_a_secret_with_wrong_sans_names_the_missing_dns_name() {
    let webhook = setup().secret(wrong_sans_secret(SECRET, "1")).build();
    let message = webhook
        .validate(&Review::create_node(tls_node()))
        .await
        .assert_denied(DenyReason::Invalid);
    assert_contains_all(
        &message,
        &["TLSSecretSANsMismatch", &format!("do not cover {POD_NAME}")],
    );
}

#[tokio::test]
async fn create_with_tls_and_a_broken_secret_is_allowed_with_a_warning_under_the_warn_policy() {
    for (case, secret, reason) in broken_secrets() {
        let webhook = setup()
            .secret(secret)
            .secret_policy(SecretPolicy::Warn)
            .build();
        let warning = webhook
            .validate(&Review::create_node(tls_node()))
            .await
            .assert_allowed_with_one_warning();
        assert_contains_all(
            &warning,
            &[
                "SeiNode \"sei/rpc\"",
                "Pending",
                reason,
                "Secret \"sei/rpc-tls\"",
            ],
        );
        assert!(!warning.contains("PRIVATE KEY"), "{case}: {warning}");
    }
}

#[tokio::test]
async fn create_with_tls_and_a_valid_secret_is_allowed_silently_under_the_warn_policy() {
    let webhook = setup()
        .secret(valid_secret(SECRET, "1"))
        .secret_policy(SecretPolicy::Warn)
        .build();
    webhook
        .validate(&Review::create_node(tls_node()))
        .await
        .assert_allowed_silently();
}

#[tokio::test]
async fn create_of_a_node_whose_pods_revision_label_would_exceed_63_characters_is_denied() {
    // 53 characters is a valid name, but the StatefulSet's Pods would carry the label
    // controller-revision-hash "<name>-<10-character hash>", 64 characters: no Pod is created.
    let name = "n".repeat(53);
    let webhook = setup().build();
    for node in [node(&name, Some(SECRET)), node(&name, None)] {
        let message = webhook
            .validate(&Review::create_node(node))
            .await
            .assert_denied(DenyReason::Invalid);
        assert_contains_all(
            &message,
            &[
                &format!("SeiNode \"sei/{name}\" could never run"),
                "controller-revision-hash",
                "over 52",
            ],
        );
    }
}

#[tokio::test]
async fn create_of_a_node_whose_sidecar_takes_the_proxys_port_is_denied() {
    let webhook = setup().build();
    for tls in [Some(SECRET), None] {
        let mut node = node(NODE, tls);
        node["spec"]["sidecar"]["port"] = json!(8443);
        let message = webhook
            .validate(&Review::create_node(node))
            .await
            .assert_denied(DenyReason::Invalid);
        assert_contains_all(
            &message,
            &[
                "could never run",
                "spec.sidecar.port 8443",
                "kube-rbac-proxy",
                "7777",
            ],
        );
    }
    // Any other port is the sidecar's to take.
    let mut node = node(NODE, None);
    node["spec"]["sidecar"]["port"] = json!(9000);
    webhook
        .validate(&Review::create_node(node))
        .await
        .assert_allowed_silently();
}

#[tokio::test]
async fn create_of_a_node_whose_name_cannot_name_its_service_is_denied() {
    let webhook = setup().build();
    let message = webhook
        .validate(&Review::create_node(node("rpc.east", None)))
        .await
        .assert_denied(DenyReason::Invalid);
    assert_contains_all(&message, &["could never run", "DNS-1035", "no dots"]);
}

#[tokio::test]
async fn create_of_a_tls_node_whose_certificate_is_not_valid_yet_waits_with_a_warning() {
    // Clock skew between the issuer and the cluster must not refuse the node.
    let (cert, key) = {
        let key = KeyPair::generate().expect("generate a P-256 key");
        let names = vec![
            format!("{NODE}.{NAMESPACE}.svc.cluster.local"),
            format!("{NODE}-0.{NODE}.{NAMESPACE}.svc.cluster.local"),
        ];
        let mut params = CertificateParams::new(names).expect("valid SANs");
        params.not_before = date_time_ymd(2099, 1, 1);
        params.not_after = date_time_ymd(2100, 1, 1);
        let cert = params.self_signed(&key).expect("sign the certificate");
        (cert.pem(), key.serialize_pem())
    };
    let webhook = setup().secret(tls_secret(SECRET, "1", &cert, &key)).build();
    let warning = webhook
        .validate(&Review::create_node(tls_node()))
        .await
        .assert_allowed_with_one_warning();
    assert_contains_all(&warning, &["will wait in Pending", "not valid before"]);
}

#[tokio::test]
async fn create_of_a_tls_node_with_the_longest_runnable_name_is_judged_normally() {
    // 52 characters: the revision label is exactly 63.
    let name = "n".repeat(52);
    let webhook = setup().build();
    let warning = webhook
        .validate(&Review::create_node(node(&name, Some(SECRET))))
        .await
        .assert_allowed_with_one_warning();
    assert_contains_all(&warning, &["does not exist", "Pending"]);
}

#[tokio::test]
async fn create_of_a_52_character_node_without_tls_is_allowed() {
    let webhook = setup().build();
    webhook
        .validate(&Review::create_node(node(&"n".repeat(52), None)))
        .await
        .assert_allowed_silently();
}

#[tokio::test]
async fn create_with_generate_name_is_allowed_with_a_warning_that_the_names_are_not_known_yet() {
    let mut object = tls_node();
    let metadata = object["metadata"].as_object_mut().unwrap();
    metadata.remove("name");
    metadata.insert("generateName".to_owned(), json!("rpc-"));
    let webhook = setup().build();
    let warning = webhook
        .validate(&Review::create_node(object))
        .await
        .assert_allowed_with_one_warning();
    assert_contains_all(
        &warning,
        &[
            "generateName",
            "\"sei/rpc-tls\"",
            "status.sidecarTLS.requiredDNSNames",
        ],
    );
}

#[tokio::test]
async fn create_with_a_tls_block_without_secret_name_is_denied_as_invalid() {
    let mut object = tls_node();
    object["spec"]["sidecar"]["tls"] = json!({"secretName": 7});
    let webhook = setup().build();
    let message = webhook
        .validate(&Review::create_node(object))
        .await
        .assert_denied(DenyReason::Invalid);
    assert_contains_all(&message, &["spec.sidecar.tls without a string secretName"]);
}

#[tokio::test]
async fn create_with_a_null_tls_block_is_treated_as_without_tls() {
    let mut object = tls_node();
    object["spec"]["sidecar"]["tls"] = Value::Null;
    let webhook = setup().build();
    webhook
        .validate(&Review::create_node(object))
        .await
        .assert_allowed_silently();
}

#[tokio::test]
async fn delete_of_a_seinode_is_allowed() {
    let webhook = setup().build();
    let review = Review::seinode("DELETE", None, Some(tls_node()));
    webhook.validate(&review).await.assert_allowed_silently();
}

// === Dry run ===

#[tokio::test]
async fn dry_run_requests_get_the_identical_decision() {
    let webhook = setup()
        .secret(wrong_sans_secret("bad-tls", "1"))
        .secret(valid_secret(SECRET, "1"))
        .build();
    let cases = [
        (
            VALIDATE_SEINODES_PATH,
            Review::update_node(tls_node(), node(NODE, Some("b"))),
        ),
        (
            VALIDATE_SEINODES_PATH,
            Review::create_node(node(NODE, Some("missing-tls"))),
        ),
        (
            VALIDATE_SEINODES_PATH,
            Review::create_node(node(NODE, Some("bad-tls"))),
        ),
        (VALIDATE_SEINODES_PATH, Review::create_node(tls_node())),
        (MUTATE_SEINODES_PATH, Review::create_node(tls_node())),
    ];
    for (path, review) in cases {
        let normal = webhook.review(path, &review).await;
        let dry = webhook.review(path, &review.dry_run()).await;
        assert_eq!(dry.review, normal.review, "{path}");
    }
}

#[tokio::test]
async fn dry_run_secret_guard_requests_get_the_identical_decision() {
    let old = valid_secret(SECRET, "1");
    let webhook = setup().secret(old.clone()).node(tls_node()).build();
    let review = Review::update_secret(&old, &wrong_sans_secret(SECRET, "2"));
    let normal = webhook.guard(&review).await;
    let dry = webhook.guard(&review.dry_run()).await;
    assert_eq!(dry.review, normal.review);
    assert_eq!(normal.warnings().len(), 1);
}

// === Mutating SeiNode CREATE ===

const CONTRACT: &str = "rpc.sei.svc.cluster.local,rpc-0.rpc.sei.svc.cluster.local";

/// Applies the answer's patch to `object` and returns the result.
fn apply(answer: &Answer, object: &Value) -> Value {
    let patch: json_patch::Patch =
        serde_json::from_value(answer.patch().expect("a patch")).expect("a JSON patch");
    let mut patched = object.clone();
    json_patch::patch(&mut patched, &patch).expect("the patch applies");
    patched
}

#[tokio::test]
async fn mutating_create_of_a_tls_node_without_annotations_adds_the_annotations_map() {
    let webhook = setup().build();
    let object = tls_node();
    assert!(object["metadata"].get("annotations").is_none());
    let answer = webhook.mutate(&Review::create_node(object.clone())).await;

    assert!(answer.allowed(), "{}", answer.review);
    assert_eq!(answer.warnings(), Vec::<String>::new());
    assert_eq!(answer.response()["patchType"], "JSONPatch");
    assert_eq!(
        answer.patch(),
        Some(json!([{
            "op": "add",
            "path": "/metadata/annotations",
            "value": {"sei.io/sidecar-tls-required-dns-names": CONTRACT},
        }]))
    );
    assert_eq!(
        CONTRACT,
        required_dns_names(NODE, NAMESPACE, CLUSTER_DOMAIN).join(",")
    );

    let patched = apply(&answer, &object);
    let mut expected = object;
    expected["metadata"]["annotations"] = json!({REQUIRED_DNS_NAMES_ANNOTATION: CONTRACT});
    assert_eq!(patched, expected, "only the annotation changes");
}

#[tokio::test]
async fn mutating_create_of_a_tls_node_with_annotations_adds_one_escaped_key() {
    let webhook = setup().build();
    let mut object = tls_node();
    object["metadata"]["annotations"] = json!({"team": "rpc", "example.com/owner": "platform"});
    let answer = webhook.mutate(&Review::create_node(object.clone())).await;

    assert!(answer.allowed(), "{}", answer.review);
    assert_eq!(
        answer.patch(),
        Some(json!([{
            "op": "add",
            "path": "/metadata/annotations/sei.io~1sidecar-tls-required-dns-names",
            "value": CONTRACT,
        }]))
    );

    let patched = apply(&answer, &object);
    let mut expected = object;
    expected["metadata"]["annotations"][REQUIRED_DNS_NAMES_ANNOTATION] = json!(CONTRACT);
    assert_eq!(patched, expected, "only the annotation changes");
    assert_eq!(patched["metadata"]["annotations"]["team"], "rpc");
}

#[tokio::test]
async fn mutating_create_overwrites_a_stale_contract_annotation_the_user_set() {
    let webhook = setup().build();
    let mut object = tls_node();
    object["metadata"]["annotations"] = json!({REQUIRED_DNS_NAMES_ANNOTATION: "wrong.example.com"});
    let answer = webhook.mutate(&Review::create_node(object.clone())).await;
    let patched = apply(&answer, &object);
    assert_eq!(
        patched["metadata"]["annotations"],
        json!({REQUIRED_DNS_NAMES_ANNOTATION: CONTRACT})
    );
}

#[tokio::test]
async fn mutating_create_patches_whatever_the_state_of_the_secret() {
    // The annotation is the contract; it does not depend on the Secret or the cache.
    for webhook in [
        setup().build(),
        setup().unsynced().build(),
        setup().secret(wrong_sans_secret(SECRET, "1")).build(),
    ] {
        let answer = webhook.mutate(&Review::create_node(tls_node())).await;
        assert!(answer.allowed());
        assert_eq!(answer.warnings(), Vec::<String>::new());
        assert!(answer.patch().is_some(), "{}", answer.review);
    }
}

#[tokio::test]
async fn mutating_create_without_tls_does_not_patch() {
    let webhook = setup().build();
    for object in [node(NODE, None), node_without_sidecar(NODE)] {
        let answer = webhook.mutate(&Review::create_node(object)).await;
        answer.assert_allowed_silently();
        assert!(
            answer.response().get("patchType").is_none(),
            "{}",
            answer.review
        );
    }
}

#[tokio::test]
async fn mutating_update_restores_a_missing_annotation_and_leaves_a_correct_one_alone() {
    let webhook = setup().build();
    // A later server-side apply dropped the annotation: the update puts it back.
    let new = with_image(tls_node(), "ghcr.io/sei-protocol/seid:v6.1.0");
    let answer = webhook.mutate(&Review::update_node(tls_node(), new)).await;
    assert!(answer.allowed(), "{}", answer.review);
    let patch = answer.patch().expect("a patch");
    assert_eq!(patch[0]["path"], "/metadata/annotations", "{patch}");

    let mut annotated = with_image(tls_node(), "ghcr.io/sei-protocol/seid:v6.1.0");
    annotated["metadata"]["annotations"] = json!({
        "sei.io/sidecar-tls-required-dns-names": "rpc.sei.svc.cluster.local,rpc-0.rpc.sei.svc.cluster.local"
    });
    webhook
        .mutate(&Review::update_node(tls_node(), annotated))
        .await
        .assert_allowed_silently();
    // No TLS, no annotation.
    webhook
        .mutate(&Review::update_node(node(NODE, None), node(NODE, None)))
        .await
        .assert_allowed_silently();
}

#[tokio::test]
async fn mutating_create_of_an_unsatisfiable_or_unnamed_node_does_not_patch() {
    let webhook = setup().build();
    webhook
        .mutate(&Review::create_node(node(&"n".repeat(62), Some(SECRET))))
        .await
        .assert_allowed_silently();

    let mut generated = tls_node();
    generated["metadata"]
        .as_object_mut()
        .unwrap()
        .remove("name");
    generated["metadata"]["generateName"] = json!("rpc-");
    webhook
        .mutate(&Review::create_node(generated))
        .await
        .assert_allowed_silently();

    let mut malformed = tls_node();
    malformed["spec"]["sidecar"]["tls"] = json!({});
    webhook
        .mutate(&Review::create_node(malformed))
        .await
        .assert_allowed_silently();
}

// === Secret guard ===

#[tokio::test]
async fn secret_update_to_wrong_sans_is_allowed_with_a_warning_naming_the_seinode() {
    let old = valid_secret(SECRET, "1");
    let webhook = setup()
        .secret(old.clone())
        .node(tls_node())
        .node(node("other", Some("other-tls")))
        .build();
    let answer = webhook
        .guard(&Review::update_secret(
            &old,
            &wrong_sans_secret(SECRET, "2"),
        ))
        .await;
    let warning = answer.assert_allowed_with_one_warning();
    assert_contains_all(
        &warning,
        &[
            "this change to Secret \"sei/rpc-tls\"",
            "SeiNode \"rpc\"",
            "TLSSecretSANsMismatch",
            &format!("missing {POD_NAME}"),
        ],
    );
    assert!(!warning.contains("other"), "{warning}");
}

/// A Secret object that does not deserialize (a data value that is not base64) is denied as
/// invalid with the category of the problem; the value itself is never quoted back.
#[tokio::test]
async fn a_secret_object_that_does_not_parse_is_denied_without_quoting_it() {
    let old = valid_secret(SECRET, "1");
    let webhook = setup().secret(old.clone()).node(tls_node()).build();
    let mut review = Review::update_secret(&old, &old);
    review.object.as_mut().unwrap()["data"]["tls.key"] = json!("not base64: SECRET-KEY-BYTES");
    let message = webhook
        .guard(&review)
        .await
        .assert_denied(DenyReason::Invalid);
    assert_contains_all(
        &message,
        &["not a valid Secret object", "wrong type or value"],
    );
    assert!(!message.contains("SECRET-KEY-BYTES"), "{message}");
}

#[tokio::test]
async fn secret_update_to_wrong_sans_is_denied_under_the_deny_policy() {
    let old = valid_secret(SECRET, "1");
    let webhook = setup()
        .secret(old.clone())
        .node(tls_node())
        .guard_policy(GuardPolicy::Deny)
        .build();
    let answer = webhook
        .guard(&Review::update_secret(
            &old,
            &wrong_sans_secret(SECRET, "2"),
        ))
        .await;
    let message = answer.assert_denied(DenyReason::Forbidden);
    assert_contains_all(
        &message,
        &[
            "this change to Secret \"sei/rpc-tls\"",
            "would break",
            "1 SeiNode(s)",
            "SeiNode \"rpc\"",
            "TLSSecretSANsMismatch",
        ],
    );
}

#[tokio::test]
async fn secret_update_to_expired_or_malformed_content_is_warned_with_its_reason() {
    let old = valid_secret(SECRET, "1");
    let webhook = setup().secret(old.clone()).node(tls_node()).build();
    for (_, new, reason) in broken_secrets() {
        let mut new = new;
        new.metadata.resource_version = Some("2".to_owned());
        let warning = webhook
            .guard(&Review::update_secret(&old, &new))
            .await
            .assert_allowed_with_one_warning();
        assert_contains_all(
            &warning,
            &["Secret \"sei/rpc-tls\"", "SeiNode \"rpc\"", reason],
        );
    }
}

#[tokio::test]
async fn secret_delete_of_a_referenced_secret_is_allowed_with_a_warning() {
    let old = valid_secret(SECRET, "1");
    let webhook = setup().secret(old.clone()).node(tls_node()).build();
    let warning = webhook
        .guard(&Review::delete_secret(&old))
        .await
        .assert_allowed_with_one_warning();
    assert_contains_all(
        &warning,
        &[
            "deleting Secret \"sei/rpc-tls\"",
            "SeiNode \"rpc\"",
            "TLSSecretNotFound",
        ],
    );
}

#[tokio::test]
async fn secret_delete_of_a_referenced_secret_is_denied_under_the_deny_policy() {
    let old = valid_secret(SECRET, "1");
    let webhook = setup()
        .secret(old.clone())
        .node(tls_node())
        .guard_policy(GuardPolicy::Deny)
        .build();
    let message = webhook
        .guard(&Review::delete_secret(&old))
        .await
        .assert_denied(DenyReason::Forbidden);
    assert_contains_all(
        &message,
        &[
            "deleting Secret \"sei/rpc-tls\"",
            "would break",
            "SeiNode \"rpc\"",
            "TLSSecretNotFound",
        ],
    );
}

#[tokio::test]
async fn secret_update_that_keeps_it_valid_is_allowed_silently() {
    let old = valid_secret(SECRET, "1");
    let webhook = setup()
        .secret(old.clone())
        .node(tls_node())
        .guard_policy(GuardPolicy::Deny)
        .build();
    webhook
        .guard(&Review::update_secret(&old, &valid_secret(SECRET, "2")))
        .await
        .assert_allowed_silently();
}

#[tokio::test]
async fn secret_update_of_an_unreferenced_secret_is_allowed_silently() {
    let old = valid_secret("unused-tls", "1");
    let webhook = setup()
        .secret(old.clone())
        .node(tls_node())
        .guard_policy(GuardPolicy::Deny)
        .build();
    webhook
        .guard(&Review::update_secret(
            &old,
            &wrong_sans_secret("unused-tls", "2"),
        ))
        .await
        .assert_allowed_silently();
    webhook
        .guard(&Review::delete_secret(&old))
        .await
        .assert_allowed_silently();
}

#[tokio::test]
async fn secret_referenced_only_by_a_seinode_of_another_namespace_is_not_guarded() {
    let old = valid_secret(SECRET, "1");
    let mut elsewhere = tls_node();
    elsewhere["metadata"]["namespace"] = json!("other");
    let webhook = setup()
        .secret(old.clone())
        .node(elsewhere)
        .guard_policy(GuardPolicy::Deny)
        .build();
    webhook
        .guard(&Review::delete_secret(&old))
        .await
        .assert_allowed_silently();
}

#[tokio::test]
async fn secret_update_that_leaves_an_already_broken_secret_broken_is_warned_not_denied() {
    // Deny only refuses changes that break nodes; it never blocks an attempt at a fix.
    let old = wrong_sans_secret(SECRET, "1");
    let webhook = setup()
        .secret(old.clone())
        .node(tls_node())
        .guard_policy(GuardPolicy::Deny)
        .build();
    let warning = webhook
        .guard(&Review::update_secret(&old, &expired_secret(SECRET, "2")))
        .await
        .assert_allowed_with_one_warning();
    assert_contains_all(&warning, &["SeiNode \"rpc\"", "TLSSecretExpired"]);
}

#[tokio::test]
async fn secret_update_that_fixes_a_broken_secret_is_allowed_silently() {
    let old = wrong_sans_secret(SECRET, "1");
    let webhook = setup()
        .secret(old.clone())
        .node(tls_node())
        .guard_policy(GuardPolicy::Deny)
        .build();
    webhook
        .guard(&Review::update_secret(&old, &valid_secret(SECRET, "2")))
        .await
        .assert_allowed_silently();
}

#[tokio::test]
async fn secret_guard_names_at_most_ten_seinodes_and_counts_the_rest() {
    let old = valid_secret("shared-tls", "1");
    let mut setup = setup().secret(old.clone());
    for i in 0..12 {
        setup = setup.node(node(&format!("node-{i:02}"), Some("shared-tls")));
    }
    let webhook = setup.build();
    let answer = webhook.guard(&Review::delete_secret(&old)).await;
    assert!(answer.allowed());
    let warnings = answer.warnings();
    assert_eq!(warnings.len(), 11, "{warnings:#?}");
    for (i, warning) in warnings.iter().take(10).enumerate() {
        assert_contains_all(
            warning,
            &[&format!("SeiNode \"node-{i:02}\""), "TLSSecretNotFound"],
        );
    }
    assert_eq!(warnings[10], "... and 2 more SeiNodes");
}

#[tokio::test]
async fn secret_create_is_not_guarded() {
    let webhook = setup()
        .node(tls_node())
        .guard_policy(GuardPolicy::Deny)
        .build();
    let review = Review::secret("CREATE", Some(&wrong_sans_secret(SECRET, "1")), None);
    webhook.guard(&review).await.assert_allowed_silently();
}

// === Bad input ===

#[tokio::test]
async fn malformed_json_is_a_400_with_a_clear_message() {
    let webhook = setup().build();
    let message = webhook
        .bad_request(VALIDATE_SEINODES_PATH, "{\"apiVersion\": ")
        .await;
    assert_contains_all(&message, &["the body is not a JSON AdmissionReview"]);
    let message = webhook.bad_request(VALIDATE_SEINODES_PATH, "").await;
    assert_contains_all(&message, &["the body is not a JSON AdmissionReview"]);
}

#[tokio::test]
async fn v1beta1_review_is_a_400_saying_only_v1_is_served() {
    let webhook = setup().build();
    let mut review = Review::create_node(tls_node()).to_json();
    review["apiVersion"] = json!("admission.k8s.io/v1beta1");
    let message = webhook
        .bad_request(VALIDATE_SEINODES_PATH, review.to_string())
        .await;
    assert_contains_all(
        &message,
        &[
            "admission.k8s.io/v1beta1",
            "expected kind AdmissionReview in apiVersion admission.k8s.io/v1",
            "admissionReviewVersions: [v1]",
        ],
    );
}

#[tokio::test]
async fn review_without_a_request_is_a_400() {
    let webhook = setup().build();
    let body = json!({"apiVersion": "admission.k8s.io/v1", "kind": "AdmissionReview"}).to_string();
    let message = webhook.bad_request(VALIDATE_SEINODES_PATH, body).await;
    assert_contains_all(&message, &["the AdmissionReview has no request"]);
}

#[tokio::test]
async fn review_whose_request_is_not_a_request_is_a_400() {
    let webhook = setup().build();
    let mut review = Review::create_node(tls_node()).to_json();
    review["request"]
        .as_object_mut()
        .unwrap()
        .remove("operation");
    let message = webhook
        .bad_request(VALIDATE_SEINODES_PATH, review.to_string())
        .await;
    assert_contains_all(&message, &["malformed AdmissionReview", "operation"]);

    let mut review = Review::create_node(tls_node()).to_json();
    review["request"]["uid"] = json!("");
    let message = webhook
        .bad_request(MUTATE_SEINODES_PATH, review.to_string())
        .await;
    assert_contains_all(&message, &["has no uid"]);
}

#[tokio::test]
async fn body_over_the_endpoints_limit_is_a_400_mentioning_the_limit() {
    let webhook = setup().build();
    for (path, limit) in [
        (VALIDATE_SEINODES_PATH, MAX_SEINODE_REVIEW_BYTES),
        (MUTATE_SEINODES_PATH, MAX_SEINODE_REVIEW_BYTES),
        (VALIDATE_SECRETS_PATH, MAX_SECRET_REVIEW_BYTES),
    ] {
        let message = webhook.bad_request(path, vec![b' '; limit + 1]).await;
        assert_contains_all(
            &message,
            &["exceeds this endpoint's limit", &limit.to_string()],
        );
    }
}

#[tokio::test]
async fn streamed_body_over_the_limit_is_a_400_mentioning_the_limit() {
    // No length up front: the limit is enforced as the chunks arrive.
    let webhook = setup().build();
    let chunk = Bytes::from(vec![b' '; 1 << 20]);
    let chunks =
        (0..=MAX_SECRET_REVIEW_BYTES >> 20).map(move |_| Ok::<_, std::io::Error>(chunk.clone()));
    let body = Body::from_stream(futures::stream::iter(chunks));
    let message = webhook.bad_request(VALIDATE_SECRETS_PATH, body).await;
    assert_contains_all(
        &message,
        &[
            "exceeds this endpoint's limit",
            &MAX_SECRET_REVIEW_BYTES.to_string(),
        ],
    );
}

#[tokio::test]
async fn secret_review_larger_than_the_seinode_limit_and_axums_default_is_answered() {
    // A Secret UPDATE carries the Secret twice; 3 MiB must hit neither axum's 2 MiB default nor
    // the SeiNode endpoints' limit.
    let webhook = setup().secret(valid_secret(SECRET, "1")).build();
    let mut body = Review::update_secret(&valid_secret(SECRET, "1"), &valid_secret(SECRET, "2"))
        .to_json()
        .to_string();
    body.push_str(&" ".repeat(3 << 20));
    let (status, answer) = webhook.post(VALIDATE_SECRETS_PATH, body).await;
    assert_eq!(
        status,
        StatusCode::OK,
        "{}",
        String::from_utf8_lossy(&answer)
    );
}

/// A request whose body is still arriving.
struct Trickling {
    sender: futures::channel::mpsc::Sender<Result<Bytes, std::io::Error>>,
    answer: tokio::task::JoinHandle<StatusCode>,
}

impl Trickling {
    /// Starts a request on `path` and sends the first `sent` bytes of `body`.
    async fn start(webhook: &Webhook, path: &'static str, body: &[u8], sent: usize) -> Self {
        let (mut sender, chunks) = futures::channel::mpsc::channel(1);
        let request = Request::builder()
            .method(Method::POST)
            .uri(path)
            .header(header::CONTENT_TYPE, "application/json")
            .body(Body::from_stream(chunks))
            .unwrap();
        let answer = tokio::spawn({
            let admission = webhook.admission.clone();
            async move { admission.oneshot(request).await.unwrap().status() }
        });
        futures::SinkExt::send(&mut sender, Ok(Bytes::copy_from_slice(&body[..sent])))
            .await
            .unwrap();
        Self { sender, answer }
    }

    /// Sends the rest and returns the status.
    async fn finish(mut self, rest: &[u8]) -> StatusCode {
        futures::SinkExt::send(&mut self.sender, Ok(Bytes::copy_from_slice(rest)))
            .await
            .unwrap();
        drop(self.sender);
        self.answer.await.unwrap()
    }
}

/// A body still arriving holds no request slot: with one slot, a trickling request does not
/// stop another from being answered, and is answered itself once its body is complete.
#[tokio::test]
async fn a_trickling_body_takes_no_request_slot() {
    let webhook = setup().max_concurrent_requests(1).build();
    let review = Review::create_node(node(NODE, None)).to_json().to_string();
    let trickling = Trickling::start(&webhook, VALIDATE_SEINODES_PATH, review.as_bytes(), 10).await;
    for _ in 0..3 {
        let (status, body) = webhook.post(VALIDATE_SEINODES_PATH, review.clone()).await;
        assert_eq!(status, StatusCode::OK, "{}", String::from_utf8_lossy(&body));
    }
    assert_eq!(
        trickling.finish(&review.as_bytes()[10..]).await,
        StatusCode::OK
    );
}

/// Decisions over the limit are shed with a 429 and `Retry-After`, which the API server's client
/// retries within the webhook's timeout.
#[tokio::test]
async fn requests_over_the_concurrency_limit_are_shed_with_a_429_the_api_server_retries() {
    let webhook = setup().max_concurrent_requests(1).build();
    let review = Review::create_node(node(NODE, None)).to_json().to_string();
    let held = webhook.state.request_limit.try_slot().ok().unwrap();
    let (status, headers, body) = webhook
        .post_full(VALIDATE_SEINODES_PATH, review.clone())
        .await;
    assert_eq!(status, StatusCode::TOO_MANY_REQUESTS, "{body}");
    assert_eq!(headers.get(header::RETRY_AFTER).unwrap(), "1");
    assert_contains_all(
        &body,
        &["maximum of 1 requests", "--max-concurrent-requests"],
    );
    assert!(
        webhook
            .metrics_text()
            .contains("webhook_requests_shed_total 1"),
        "{}",
        webhook.metrics_text()
    );
    // Once the slot is free, the same request is answered.
    drop(held);
    let (status, _) = webhook.post(VALIDATE_SEINODES_PATH, review).await;
    assert_eq!(status, StatusCode::OK);
}

/// Bodies are charged to the memory budget as they arrive: a body that finds it spent is shed
/// with a 429 (holding nothing), and the budget comes back when a request is answered.
#[tokio::test]
async fn a_body_that_finds_the_memory_budget_spent_is_shed_holding_nothing() {
    let review = Review::create_node(node(NODE, None)).to_json().to_string();
    let bytes = review.as_bytes();
    // Room for one review (two bytes per byte of body), not two.
    let webhook = setup().body_memory(bytes.len() * 3).build();
    let held = Trickling::start(&webhook, VALIDATE_SEINODES_PATH, bytes, bytes.len() - 1).await;
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    while webhook.state.body_budget.available() == bytes.len() * 3 {
        assert!(
            std::time::Instant::now() < deadline,
            "the body was never read"
        );
        tokio::task::yield_now().await;
    }
    let (status, headers, body) = webhook
        .post_full(VALIDATE_SEINODES_PATH, review.clone())
        .await;
    assert_eq!(status, StatusCode::TOO_MANY_REQUESTS, "{body}");
    assert_eq!(headers.get(header::RETRY_AFTER).unwrap(), "1");
    assert_contains_all(&body, &["--max-body-memory", "retry"]);
    // The shed request held nothing: the first one completes, and then a new one fits.
    assert_eq!(held.finish(&bytes[bytes.len() - 1..]).await, StatusCode::OK);
    let (status, _) = webhook.post(VALIDATE_SEINODES_PATH, review).await;
    assert_eq!(status, StatusCode::OK);
}

#[tokio::test]
async fn bad_requests_do_not_stop_the_router_from_answering() {
    let webhook = setup().secret(valid_secret(SECRET, "1")).build();
    for path in [
        VALIDATE_SEINODES_PATH,
        MUTATE_SEINODES_PATH,
        VALIDATE_SECRETS_PATH,
    ] {
        webhook.bad_request(path, "not json").await;
        webhook.bad_request(path, "[1, 2, 3]").await;
        webhook.bad_request(path, "{\"apiVersion\": 7}").await;
        webhook.bad_request(path, vec![0xff_u8, 0xfe, 0x00]).await;
        webhook
            .bad_request(path, vec![b'{'; MAX_SECRET_REVIEW_BYTES + 1])
            .await;
    }
    webhook
        .validate(&Review::create_node(tls_node()))
        .await
        .assert_allowed_silently();
    assert!(
        webhook
            .mutate(&Review::create_node(tls_node()))
            .await
            .patch()
            .is_some()
    );
}

#[tokio::test]
async fn unknown_paths_and_methods_are_not_answered_as_reviews() {
    let webhook = setup().build();
    let (status, _) = webhook
        .post(
            "/validate/pods",
            Review::create_node(tls_node()).to_json().to_string(),
        )
        .await;
    assert_eq!(status, StatusCode::NOT_FOUND);
    let request = Request::builder()
        .uri(VALIDATE_SEINODES_PATH)
        .body(Body::empty())
        .unwrap();
    let response = webhook.admission.clone().oneshot(request).await.unwrap();
    assert_eq!(response.status(), StatusCode::METHOD_NOT_ALLOWED);
}

// === Health and metrics ===

#[tokio::test]
async fn readyz_is_503_until_both_caches_have_synced() {
    let webhook = setup().unsynced().build();
    let (status, text) = webhook.get_health("/readyz").await;
    assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE);
    assert_contains_all(
        &text,
        &["Secret cache not synced", "SeiNode cache not synced"],
    );

    webhook.state.secrets.mark_synced();
    let (status, text) = webhook.get_health("/readyz").await;
    assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE);
    assert_eq!(text, "SeiNode cache not synced");

    webhook.state.nodes.mark_synced();
    assert_eq!(
        webhook.get_health("/readyz").await,
        (StatusCode::OK, "ok".to_owned())
    );
}

#[tokio::test]
async fn healthz_is_200_even_before_the_caches_sync() {
    let webhook = setup().unsynced().build();
    assert_eq!(
        webhook.get_health("/healthz").await,
        (StatusCode::OK, "ok".to_owned())
    );
}

#[tokio::test]
async fn metrics_count_requests_by_webhook_operation_and_outcome() {
    let old = valid_secret(SECRET, "1");
    let webhook = setup().secret(old.clone()).node(tls_node()).build();
    webhook
        .validate(&Review::create_node(node(NODE, None)))
        .await;
    webhook
        .validate(&Review::create_node(node(NODE, None)))
        .await;
    webhook
        .validate(&Review::create_node(node(NODE, Some("missing-tls"))))
        .await;
    webhook
        .validate(&Review::update_node(tls_node(), node(NODE, None)))
        .await;
    webhook.mutate(&Review::create_node(tls_node())).await;
    webhook.guard(&Review::delete_secret(&old)).await;
    webhook.bad_request(VALIDATE_SECRETS_PATH, "nope").await;

    let text = webhook.metrics().await;
    let lines: Vec<&str> = text.lines().collect();
    assert!(
        lines.contains(&r#"webhook_requests_total{webhook="validate_seinodes",operation="CREATE",outcome="allowed"} 2"#),
        "{text}"
    );
    for expected in [
        r#"webhook_requests_total{webhook="validate_seinodes",operation="CREATE",outcome="warned"} 1"#,
        r#"webhook_requests_total{webhook="validate_seinodes",operation="UPDATE",outcome="denied"} 1"#,
        r#"webhook_requests_total{webhook="mutate_seinodes",operation="CREATE",outcome="patched"} 1"#,
        r#"webhook_requests_total{webhook="validate_secrets",operation="DELETE",outcome="warned"} 1"#,
        r#"webhook_requests_total{webhook="validate_secrets",operation="unknown",outcome="bad_request"} 1"#,
        r#"webhook_request_duration_seconds_count{webhook="validate_seinodes"} 4"#,
        r#"webhook_request_duration_seconds_count{webhook="validate_secrets"} 2"#,
    ] {
        assert!(
            lines.contains(&expected),
            "expected {expected:?} in:\n{text}"
        );
    }
    assert!(text.contains("# TYPE webhook_requests counter"), "{text}");
    assert!(
        text.contains("# TYPE webhook_request_duration_seconds histogram"),
        "{text}"
    );
    // Labels come from fixed sets: no object or Secret names.
    assert!(
        !text.contains("rpc-tls") && !text.contains("\"rpc\""),
        "{text}"
    );
}
