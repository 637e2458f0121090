//! The admission router, as the API server reaches it: the first input byte picks the endpoint
//! (`% 3`: validate SeiNodes, mutate SeiNodes, validate Secrets) and the policies (`/ 3 % 2`:
//! deny or warn), the rest is the request body, sent with `tower::ServiceExt::oneshot` on a
//! current-thread runtime, as `webhook/tests/router.rs` does. The caches hold a valid Secret
//! `sei/rpc-tls` used by SeiNode `sei/rpc`, and a defective `sei/broken-tls` used by `sei/web`,
//! so the Secret guard and the CREATE judgement reach their decisions.
//!
//! Invariants: no panic, and every answer is either HTTP 400 or HTTP 200 with an
//! `admission.k8s.io/v1` AdmissionReview whose `response.uid` is the request's `uid`.

#![no_main]

use std::sync::{Arc, OnceLock};
use std::time::Duration;

use axum::Router;
use axum::body::Body;
use axum::http::{Method, Request, StatusCode, header};
use http_body_util::BodyExt;
use kube::runtime::watcher;
use libfuzzer_sys::fuzz_target;
use seinode_tls_crds::SeiNode;
use seinode_tls_crds::contract::required_dns_names;
use seinode_tls_testkit::{CertificateAuthority, LeafSpec, tls_secret};
use seinode_tls_webhook::cache::{NodeCache, SecretCache};
use seinode_tls_webhook::limits::{BodyBudget, RequestLimit};
use seinode_tls_webhook::metrics::WebhookMetrics;
use seinode_tls_webhook::server::{
    AdmissionState, MUTATE_SEINODES_PATH, VALIDATE_SECRETS_PATH, VALIDATE_SEINODES_PATH,
    admission_router,
};
use seinode_tls_webhook::{GuardPolicy, SecretPolicy};
use serde_json::{Value, json};

const ENDPOINTS: [&str; 3] = [
    VALIDATE_SEINODES_PATH,
    MUTATE_SEINODES_PATH,
    VALIDATE_SECRETS_PATH,
];
const NAMESPACE: &str = "sei";

struct Harness {
    runtime: tokio::runtime::Runtime,
    /// By policy: [deny a bad Secret and a breaking change, warn about both].
    routers: [Router; 2],
}

fn harness() -> &'static Harness {
    static HARNESS: OnceLock<Harness> = OnceLock::new();
    HARNESS.get_or_init(|| {
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_time()
            .build()
            .expect("build a runtime");
        let mut registry = prometheus_client::registry::Registry::default();
        let cache_metrics = Arc::new(WebhookMetrics::register(&mut registry));
        let (secrets, nodes) = {
            let _runtime = runtime.enter();
            caches(cache_metrics)
        };
        let router = |secret_policy, guard_policy| {
            let mut registry = prometheus_client::registry::Registry::default();
            let metrics = Arc::new(WebhookMetrics::register(&mut registry));
            admission_router(Arc::new(AdmissionState {
                secrets: secrets.clone(),
                nodes: nodes.clone(),
                secret_policy,
                guard_policy,
                cluster_domain: "cluster.local".to_owned(),
                request_deadline: Duration::from_secs(2),
                request_limit: Arc::new(RequestLimit::new(32, &metrics)),
                body_budget: Arc::new(BodyBudget::new(48 << 20, &metrics)),
                metrics,
            }))
        };
        Harness {
            runtime,
            routers: [
                router(SecretPolicy::Deny, GuardPolicy::Deny),
                router(SecretPolicy::Warn, GuardPolicy::Warn),
            ],
        }
    })
}

/// Synced caches: `rpc` uses the valid `rpc-tls`, `web` the defective `broken-tls`. Both
/// Secrets are held, so the cache reads nothing and needs no API server.
fn caches(metrics: Arc<WebhookMetrics>) -> (Arc<SecretCache>, NodeCache) {
    let ca = CertificateAuthority::new("fuzz CA").expect("generate a CA");
    let names = required_dns_names("rpc", NAMESPACE, "cluster.local");
    let names: Vec<&str> = names.iter().map(String::as_str).collect();
    let leaf = ca
        .issue(&LeafSpec {
            common_name: "rpc",
            dns_names: &names,
            server: true,
            ..Default::default()
        })
        .expect("issue a leaf");
    let mut valid = tls_secret(NAMESPACE, "rpc-tls", &leaf.cert_pem, &leaf.key_pem, None);
    valid.metadata.resource_version = Some("11".to_owned());
    let mut broken = tls_secret(NAMESPACE, "broken-tls", &leaf.cert_pem, "not a key", None);
    broken.metadata.resource_version = Some("12".to_owned());
    let client = seinode_tls_testkit::no_api_server();
    let secrets = Arc::new(SecretCache::new(client, metrics));
    secrets.apply(&valid);
    secrets.apply(&broken);
    secrets.mark_synced();

    let nodes = NodeCache::new();
    for (name, secret) in [("rpc", "rpc-tls"), ("web", "broken-tls")] {
        let node: SeiNode = serde_json::from_value(json!({
            "apiVersion": "sei.io/v1alpha1",
            "kind": "SeiNode",
            "metadata": {"name": name, "namespace": NAMESPACE, "uid": format!("{name}-uid")},
            "spec": {
                "chainId": "pacific-1",
                "image": "ghcr.io/sei-protocol/seid:v6.0.0",
                "fullNode": {},
                "sidecar": {"port": 7777, "tls": {"secretName": secret}},
            }
        }))
        .expect("the fixture is a SeiNode");
        nodes.apply(&watcher::Event::Apply(node));
    }
    nodes.mark_synced();
    (secrets, nodes)
}

/// The request's uid, read as a typed struct the way the server reads the review (serde_json
/// skips the fields a struct does not name without checking their strings, so a `Value` would
/// refuse bodies the server rightly accepts).
fn sent_uid(body: &[u8]) -> Result<String, serde_json::Error> {
    #[derive(serde::Deserialize)]
    struct Sent {
        request: SentRequest,
    }
    #[derive(serde::Deserialize)]
    struct SentRequest {
        uid: String,
    }
    serde_json::from_slice::<Sent>(body).map(|review| review.request.uid)
}

fuzz_target!(|data: &[u8]| {
    let Some((&selector, body)) = data.split_first() else {
        return;
    };
    let path = ENDPOINTS[usize::from(selector % 3)];
    let harness = harness();
    let router = harness.routers[usize::from(selector / 3 % 2)].clone();
    let request = Request::builder()
        .method(Method::POST)
        .uri(path)
        .header(header::CONTENT_TYPE, "application/json")
        .body(Body::from(body.to_vec()))
        .expect("a valid request");
    let (status, answer) = harness.runtime.block_on(async {
        let response = tower::ServiceExt::oneshot(router, request)
            .await
            .expect("the router is infallible");
        let status = response.status();
        let answer = response
            .into_body()
            .collect()
            .await
            .expect("read the answer")
            .to_bytes();
        (status, answer)
    });

    match status {
        StatusCode::BAD_REQUEST => {}
        StatusCode::OK => {
            let uid = sent_uid(body)
                .unwrap_or_else(|e| panic!("HTTP 200 for a request without a uid ({e})"));
            let answer: Value = serde_json::from_slice(&answer).expect("the answer is JSON");
            assert_eq!(answer["apiVersion"], "admission.k8s.io/v1", "{answer}");
            assert_eq!(answer["kind"], "AdmissionReview", "{answer}");
            assert_eq!(answer["response"]["uid"], uid, "{answer}");
            assert!(answer["response"]["allowed"].is_boolean(), "{answer}");
        }
        other => panic!(
            "{path} answered {other}: {}",
            String::from_utf8_lossy(&answer)
        ),
    }
});
