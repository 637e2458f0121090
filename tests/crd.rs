//! The SeiNode CRD as the API server enforces it: upstream samples, the CEL rules, the status
//! subresource and the printer columns.

#![allow(clippy::expect_used, clippy::unwrap_used)]

mod common;

use std::path::Path;

use kube::api::{Api, DynamicObject, Patch, PatchParams, PostParams};
use kube::core::{ApiResource, GroupVersionKind};
use seinode_tls_crds::{SeiNode, TLS_IMMUTABLE_MESSAGE};
use serde_json::{Value, json};

const SAMPLES: &str = concat!(
    env!("CARGO_MANIFEST_DIR"),
    "/../shared/reference/upstream-967f153"
);

fn seinode_resource() -> ApiResource {
    ApiResource::from_gvk(&GroupVersionKind::gvk("sei.io", "v1alpha1", "SeiNode"))
}

fn node(name: &str, sidecar: Option<Value>) -> SeiNode {
    let mut spec = json!({
        "chainId": "arctic-1",
        "image": "ghcr.io/sei-protocol/sei:v6.3.0",
        "fullNode": {},
    });
    if let Some(sidecar) = sidecar {
        spec["sidecar"] = sidecar;
    }
    serde_json::from_value(json!({
        "apiVersion": "sei.io/v1alpha1",
        "kind": "SeiNode",
        "metadata": {"name": name},
        "spec": spec,
    }))
    .expect("valid SeiNode")
}

fn tls(secret: &str) -> Value {
    json!({"tls": {"secretName": secret}})
}

fn json_patch(operations: Value) -> Patch<()> {
    Patch::Json(serde_json::from_value(operations).expect("valid JSON patch"))
}

async fn create(api: &Api<SeiNode>, node: &SeiNode) {
    api.create(&PostParams::default(), node)
        .await
        .expect("create SeiNode");
}

/// Asserts that `result` is the API server refusing the edit with the immutability rule.
fn assert_tls_immutable<T: std::fmt::Debug>(result: Result<T, kube::Error>) {
    match result {
        Err(kube::Error::Api(status)) => {
            assert_eq!(status.code, 422, "{status:?}");
            assert!(
                status.message.contains(TLS_IMMUTABLE_MESSAGE),
                "{}",
                status.message
            );
            assert!(
                status.message.contains("spec.sidecar.tls: Forbidden"),
                "{}",
                status.message
            );
        }
        other => panic!("expected the CEL rule to refuse the edit, got {other:?}"),
    }
}

#[tokio::test]
async fn every_upstream_sample_is_accepted_unchanged_by_server_side_apply() {
    let client = common::client().await;
    let ns = common::namespace(&client, "samples").await;
    let api: Api<DynamicObject> = Api::namespaced_with(client, &ns, &seinode_resource());
    let mut applied = 0;
    for entry in std::fs::read_dir(SAMPLES).expect("shared/reference is beside the checkout") {
        let path = entry.unwrap().path();
        let file_name = path.file_name().unwrap().to_string_lossy().into_owned();
        if !(file_name.starts_with("pacific-1-") && file_name.ends_with(".yaml")) {
            continue;
        }
        let mut object: DynamicObject =
            serde_saphyr::from_str(&std::fs::read_to_string(&path).unwrap())
                .expect("sample parses");
        object.metadata.namespace = Some(ns.clone());
        let name = object.metadata.name.clone().unwrap();
        // Strict field validation, as `kubectl apply --server-side` does by default: an unknown
        // field would fail here rather than be pruned silently.
        let params = PatchParams::apply("samples-test").validation_strict();
        let result = api.patch(&name, &params, &Patch::Apply(&object)).await;
        assert!(
            result.is_ok(),
            "{}: {:?}",
            Path::new(&file_name).display(),
            result.err()
        );
        applied += 1;
    }
    assert_eq!(
        applied, 4,
        "expected the four pacific-1 samples in {SAMPLES}"
    );
}

#[tokio::test]
async fn adding_tls_to_a_node_created_without_it_is_refused() {
    let client = common::client().await;
    let ns = common::namespace(&client, "cel-add").await;
    let api: Api<SeiNode> = Api::namespaced(client, &ns);

    // No sidecar at all on the old object.
    create(&api, &node("bare", None)).await;
    let patch = json!({"spec": {"sidecar": tls("bare-tls")}});
    assert_tls_immutable(
        api.patch("bare", &PatchParams::default(), &Patch::Merge(&patch))
            .await,
    );

    // A sidecar without TLS on the old object.
    create(&api, &node("plain", Some(json!({"port": 7777})))).await;
    let patch = json!({"spec": {"sidecar": tls("plain-tls")}});
    assert_tls_immutable(
        api.patch("plain", &PatchParams::default(), &Patch::Merge(&patch))
            .await,
    );
}

#[tokio::test]
async fn removing_tls_is_refused_whether_the_block_or_the_whole_sidecar_goes() {
    let client = common::client().await;
    let ns = common::namespace(&client, "cel-remove").await;
    let api: Api<SeiNode> = Api::namespaced(client, &ns);
    create(&api, &node("tls", Some(tls("tls-secret")))).await;

    let remove_tls = json!([{"op": "remove", "path": "/spec/sidecar/tls"}]);
    assert_tls_immutable(
        api.patch("tls", &PatchParams::default(), &json_patch(remove_tls))
            .await,
    );

    let remove_sidecar = json!([{"op": "remove", "path": "/spec/sidecar"}]);
    assert_tls_immutable(
        api.patch("tls", &PatchParams::default(), &json_patch(remove_sidecar))
            .await,
    );
}

#[tokio::test]
async fn changing_the_secret_name_is_refused() {
    let client = common::client().await;
    let ns = common::namespace(&client, "cel-change").await;
    let api: Api<SeiNode> = Api::namespaced(client, &ns);
    create(&api, &node("tls", Some(tls("old-secret")))).await;
    let patch = json!({"spec": {"sidecar": {"tls": {"secretName": "new-secret"}}}});
    assert_tls_immutable(
        api.patch("tls", &PatchParams::default(), &Patch::Merge(&patch))
            .await,
    );
    let stored = api.get("tls").await.unwrap();
    assert_eq!(stored.sidecar_tls().unwrap().secret_name, "old-secret");
}

#[tokio::test]
async fn other_spec_edits_are_accepted_on_nodes_with_and_without_tls() {
    let client = common::client().await;
    let ns = common::namespace(&client, "cel-other").await;
    let api: Api<SeiNode> = Api::namespaced(client, &ns);
    create(&api, &node("tls", Some(tls("tls-secret")))).await;
    create(&api, &node("plain", None)).await;

    let patch =
        json!({"spec": {"image": "ghcr.io/sei-protocol/sei:v6.4.0", "sidecar": {"port": 7000}}});
    for name in ["tls", "plain"] {
        let updated = api
            .patch(name, &PatchParams::default(), &Patch::Merge(&patch))
            .await
            .unwrap_or_else(|e| panic!("{name}: {e}"));
        assert_eq!(updated.spec.image, "ghcr.io/sei-protocol/sei:v6.4.0");
        assert_eq!(updated.spec.sidecar.as_ref().unwrap().port, 7000);
    }
    // Re-applying the identical TLS block is not a change.
    let same = json!({"spec": {"sidecar": tls("tls-secret")}});
    api.patch("tls", &PatchParams::default(), &Patch::Merge(&same))
        .await
        .expect("no-op TLS edit");
}

#[tokio::test]
async fn status_writes_are_unaffected_by_the_spec_rules() {
    let client = common::client().await;
    let ns = common::namespace(&client, "cel-status").await;
    let api: Api<SeiNode> = Api::namespaced(client, &ns);
    create(&api, &node("tls", Some(tls("tls-secret")))).await;
    let status = json!({"status": {
        "phase": "Pending",
        "sidecarTLS": {
            "secretName": "tls-secret",
            "requiredDNSNames": ["tls.x.svc.cluster.local", "tls-0.tls.x.svc.cluster.local"]
        }
    }});
    let updated = api
        .patch_status("tls", &PatchParams::default(), &Patch::Merge(&status))
        .await
        .expect("status write");
    let published = updated.status.unwrap().sidecar_tls.unwrap();
    assert_eq!(published.secret_name, "tls-secret");
    assert_eq!(published.required_dns_names.len(), 2);
}

#[tokio::test]
async fn schema_rejects_bad_secret_names_and_a_missing_mode() {
    let client = common::client().await;
    let ns = common::namespace(&client, "schema").await;
    let api: Api<SeiNode> = Api::namespaced(client, &ns);

    let bad_name = node("bad-name", Some(tls("Not_A_DNS_Name")));
    let err = api
        .create(&PostParams::default(), &bad_name)
        .await
        .expect_err("invalid secretName");
    assert!(
        err.to_string().contains("spec.sidecar.tls.secretName"),
        "{err}"
    );

    let empty_name = node("empty-name", Some(tls("")));
    let err = api
        .create(&PostParams::default(), &empty_name)
        .await
        .expect_err("empty secretName");
    assert!(
        err.to_string().contains("spec.sidecar.tls.secretName"),
        "{err}"
    );

    let mut no_mode = node("no-mode", None);
    no_mode.spec.full_node = None;
    let err = api
        .create(&PostParams::default(), &no_mode)
        .await
        .expect_err("no mode");
    assert!(
        err.to_string()
            .contains("exactly one of fullNode, archive, replayer, or validator"),
        "{err}"
    );

    let no_secret = serde_json::from_value::<SeiNode>(json!({
        "apiVersion": "sei.io/v1alpha1", "kind": "SeiNode", "metadata": {"name": "x"},
        "spec": {"chainId": "c", "image": "i", "fullNode": {}}
    }))
    .unwrap();
    let mut raw = serde_json::to_value(&no_secret).unwrap();
    raw["spec"]["sidecar"] = json!({"tls": {}});
    let dynamic: Api<DynamicObject> =
        Api::namespaced_with(api.clone().into_client(), &ns, &seinode_resource());
    let object: DynamicObject = serde_json::from_value(raw).unwrap();
    let err = dynamic
        .create(&PostParams::default(), &object)
        .await
        .expect_err("tls without secretName");
    assert!(
        err.to_string().contains("secretName: Required value"),
        "{err}"
    );
}

#[tokio::test]
async fn kubectl_get_snode_shows_the_printer_columns() {
    let client = common::client().await;
    let ns = common::namespace(&client, "columns").await;
    let api: Api<SeiNode> = Api::namespaced(client, &ns);
    create(&api, &node("tls", Some(tls("tls-secret")))).await;
    let status = json!({"status": {
        "phase": "Pending",
        "conditions": [{
            "type": "SidecarTLSSecretReady", "status": "False", "reason": "TLSSecretNotFound",
            "message": "m", "lastTransitionTime": "2026-01-01T00:00:00Z"
        }]
    }});
    api.patch_status("tls", &PatchParams::default(), &Patch::Merge(&status))
        .await
        .unwrap();

    let output = common::control_plane()
        .kubectl()
        .args(["get", "snode", "-n", &ns])
        .output()
        .expect("run kubectl");
    assert!(
        output.status.success(),
        "{}",
        String::from_utf8_lossy(&output.stderr)
    );
    let text = String::from_utf8(output.stdout).unwrap();
    let mut lines = text.lines();
    let header: Vec<&str> = lines.next().unwrap().split_whitespace().collect();
    assert_eq!(
        header,
        ["NAME", "PHASE", "TLS", "SECRET", "TLS", "AGE"],
        "{text}"
    );
    let row: Vec<&str> = lines.next().unwrap().split_whitespace().collect();
    assert_eq!(
        &row[..4],
        ["tls", "Pending", "tls-secret", "TLSSecretNotFound"],
        "{text}"
    );
}
