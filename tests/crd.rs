//! The SeiNode CRD as the API server enforces it: the project's example manifests, the CEL
//! rules, the status subresource and the printer columns.

#![allow(clippy::expect_used, clippy::unwrap_used)]

mod common;

use std::collections::BTreeSet;
use std::path::PathBuf;

use kube::CustomResourceExt as _;
use kube::api::{Api, DynamicObject, Patch, PatchParams, PostParams};
use kube::core::{ApiResource, GroupVersionKind};
use seinode_tls_crds::{SeiNode, TLS_IMMUTABLE_MESSAGE};
use serde_json::{Value, json};

const EXAMPLES: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/examples");

/// Every field upstream's sample SeiNodes set (sei-protocol's `config/samples` at 967f153:
/// full node, state syncer, snapshotter, shadow replayer), except `metadata.namespace`, which the
/// examples leave to `kubectl -n`. `[]` is an array's items, `.*` the values of a map.
const UPSTREAM_SAMPLE_FIELDS: &[&str] = &[
    "apiVersion",
    "kind",
    "metadata.name",
    "spec.chainId",
    "spec.image",
    "spec.sidecar.image",
    "spec.overrides.*",
    "spec.genesis.s3.uri",
    "spec.genesis.s3.region",
    "spec.storage.retainOnDelete",
    "spec.peers[].ec2Tags.region",
    "spec.peers[].ec2Tags.tags.*",
    "spec.fullNode.snapshot.s3.targetHeight",
    "spec.fullNode.snapshot.stateSync",
    "spec.fullNode.snapshot.trustPeriod",
    "spec.fullNode.snapshotGeneration.tendermint.keepRecent",
    "spec.fullNode.snapshotGeneration.tendermint.publish",
    "spec.archive.snapshotGeneration.tendermint.keepRecent",
    "spec.archive.snapshotGeneration.tendermint.publish",
    "spec.replayer.snapshot.s3.targetHeight",
    "spec.replayer.snapshot.bootstrapImage",
    "spec.replayer.snapshot.trustPeriod",
    "spec.replayer.resultExport.shadowResult.canonicalRpc",
];

/// Upstream's names for the fields inside the parts of the spec this CRD keeps open
/// (`x-kubernetes-preserve-unknown-fields`: the mode sub-specs, the peer sources, `genesis`,
/// `storage`), from upstream's CRD at 967f153 and, for `genesis` and `storage`, its samples. The
/// API server accepts anything there, so this list is what catches a misspelt field in an
/// example. Add upstream's name here when an example needs one more.
const UPSTREAM_OPEN_FIELDS: &[&str] = &[
    "spec.genesis.s3.uri",
    "spec.genesis.s3.region",
    "spec.storage.retainOnDelete",
    "spec.peers[].ec2Tags.region",
    "spec.peers[].ec2Tags.tags.*",
    "spec.peers[].label.namespace",
    "spec.peers[].label.selector.*",
    "spec.peers[].static.addresses[]",
    "spec.fullNode.snapshot.s3.targetHeight",
    "spec.fullNode.snapshot.stateSync",
    "spec.fullNode.snapshot.trustPeriod",
    "spec.fullNode.snapshot.bootstrapImage",
    "spec.fullNode.snapshot.backfillBlocks",
    "spec.fullNode.snapshotGeneration.tendermint.keepRecent",
    "spec.fullNode.snapshotGeneration.tendermint.publish",
    "spec.archive.snapshotGeneration.tendermint.keepRecent",
    "spec.archive.snapshotGeneration.tendermint.publish",
    "spec.replayer.snapshot.s3.targetHeight",
    "spec.replayer.snapshot.stateSync",
    "spec.replayer.snapshot.trustPeriod",
    "spec.replayer.snapshot.bootstrapImage",
    "spec.replayer.snapshot.backfillBlocks",
    "spec.replayer.resultExport.shadowResult.canonicalRpc",
];

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

/// The SeiNode examples (`examples/seinode-*.yaml`, one SeiNode each), by file name.
fn seinode_examples() -> Vec<(String, Value)> {
    let mut examples = Vec::new();
    for entry in std::fs::read_dir(EXAMPLES).expect("examples/ is in the checkout") {
        let path = entry.unwrap().path();
        let file_name = path.file_name().unwrap().to_string_lossy().into_owned();
        if !(file_name.starts_with("seinode-") && file_name.ends_with(".yaml")) {
            continue;
        }
        let text = std::fs::read_to_string(&path).unwrap();
        let object: Value = serde_saphyr::from_str(&text)
            .unwrap_or_else(|e| panic!("{file_name} does not parse: {e}"));
        assert_eq!(object["kind"], "SeiNode", "{file_name}");
        examples.push((file_name, object));
    }
    examples.sort_by(|a, b| a.0.cmp(&b.0));
    assert_eq!(
        examples.len(),
        5,
        "expected the five SeiNode examples in {EXAMPLES}"
    );
    examples
}

/// The fields a manifest uses, checked against the CRD's schema: `used` holds every leaf path
/// (in the notation of [`UPSTREAM_SAMPLE_FIELDS`]), `unknown` the paths neither the schema nor,
/// inside its open parts, [`UPSTREAM_OPEN_FIELDS`] knows.
#[derive(Debug, Default)]
struct FieldUse {
    used: BTreeSet<String>,
    unknown: BTreeSet<String>,
}

impl FieldUse {
    fn of(manifest: &Value) -> Self {
        let crd = serde_json::to_value(SeiNode::crd()).unwrap();
        let schema = &crd["spec"]["versions"][0]["schema"]["openAPIV3Schema"];
        let mut fields = Self::default();
        let Value::Object(top) = manifest else {
            panic!("a manifest is an object: {manifest}");
        };
        for (key, value) in top {
            match key.as_str() {
                // The API server's own fields, not the CRD's.
                "apiVersion" | "kind" => {
                    fields.used.insert(key.clone());
                }
                "metadata" => {
                    for name in value.as_object().unwrap().keys() {
                        fields.used.insert(format!("metadata.{name}"));
                    }
                }
                _ => fields.typed(value, &schema["properties"][key.as_str()], key.clone()),
            }
        }
        fields
    }

    /// Walks `value` along the structural `schema` of the CRD.
    fn typed(&mut self, value: &Value, schema: &Value, path: String) {
        if schema.is_null() {
            self.unknown.insert(path);
            return;
        }
        match value {
            Value::Object(map) if schema.get("properties").is_some() || !map.is_empty() => {
                for (key, child) in map {
                    if let Some(property) = schema["properties"].get(key) {
                        self.typed(child, property, format!("{path}.{key}"));
                    } else if schema["additionalProperties"].is_object() {
                        self.typed(child, &schema["additionalProperties"], format!("{path}.*"));
                    } else if schema["x-kubernetes-preserve-unknown-fields"] == true {
                        self.open(child, format!("{path}.{key}"));
                    } else {
                        self.unknown.insert(format!("{path}.{key}"));
                    }
                }
            }
            Value::Array(items) => {
                for item in items {
                    self.typed(item, &schema["items"], format!("{path}[]"));
                }
            }
            _ => {
                self.used.insert(path);
            }
        }
    }

    /// Walks `value` inside an open part of the schema, against upstream's names.
    fn open(&mut self, value: &Value, path: String) {
        let map_path = format!("{path}.*");
        if UPSTREAM_OPEN_FIELDS.contains(&map_path.as_str()) {
            self.used.insert(map_path);
            return;
        }
        match value {
            Value::Object(map) if !map.is_empty() => {
                for (key, child) in map {
                    self.open(child, format!("{path}.{key}"));
                }
            }
            Value::Array(items) => {
                for item in items {
                    self.open(item, format!("{path}[]"));
                }
            }
            _ => {
                if !UPSTREAM_OPEN_FIELDS.contains(&path.as_str()) {
                    self.unknown.insert(path.clone());
                }
                self.used.insert(path);
            }
        }
    }
}

#[test]
fn examples_use_no_field_the_crd_or_upstream_does_not_know() {
    let mut unknown = Vec::new();
    for (file_name, example) in seinode_examples() {
        for path in FieldUse::of(&example).unknown {
            unknown.push(format!("{file_name}: {path}"));
        }
    }
    assert!(
        unknown.is_empty(),
        "fields neither the CRD nor upstream's API knows:\n{}",
        unknown.join("\n")
    );
}

#[test]
fn the_field_check_catches_misspelt_fields_in_typed_and_open_parts() {
    let manifest = json!({
        "apiVersion": "sei.io/v1alpha1", "kind": "SeiNode", "metadata": {"name": "typo"},
        "spec": {
            "chainId": "arctic-1", "image": "i",
            "sidecar": {"tsl": {"secretName": "s"}, "resources": {"requests": {"cpu": "1"}}},
            "overrides": {"any.key": "v"},
            "peers": [{"ec2Tags": {"region": "r", "tags": {"Any": "v"}}}],
            "fullNode": {"snapshot": {"s3": {"targetHieght": 1}, "stateSync": {}}},
            "replicas": 2,
        },
    });
    let fields = FieldUse::of(&manifest);
    assert_eq!(
        fields.unknown,
        BTreeSet::from([
            "spec.fullNode.snapshot.s3.targetHieght".to_owned(),
            "spec.replicas".to_owned(),
            "spec.sidecar.tsl".to_owned(),
        ])
    );
    for path in [
        "spec.sidecar.resources.requests.*",
        "spec.overrides.*",
        "spec.peers[].ec2Tags.tags.*",
        "spec.fullNode.snapshot.stateSync",
    ] {
        assert!(fields.used.contains(path), "{path} in {:?}", fields.used);
    }
}

#[test]
fn examples_together_use_every_field_of_upstreams_samples() {
    let used: BTreeSet<String> = seinode_examples()
        .iter()
        .flat_map(|(_, example)| FieldUse::of(example).used)
        .collect();
    let missing: Vec<&str> = UPSTREAM_SAMPLE_FIELDS
        .iter()
        .copied()
        .filter(|field| !used.contains(*field))
        .collect();
    assert!(
        missing.is_empty(),
        "no example uses these fields of upstream's samples: {missing:?}"
    );
}

#[test]
fn the_tls_example_names_a_secret_and_the_others_have_no_tls() {
    for (file_name, example) in seinode_examples() {
        let node: SeiNode = serde_json::from_value(example).unwrap();
        let tls = node.sidecar_tls().map(|tls| tls.secret_name.as_str());
        if file_name == "seinode-tls-full-node.yaml" {
            assert_eq!(tls, Some("atlantic-2-rpc-sidecar-tls"), "{file_name}");
        } else {
            assert_eq!(tls, None, "{file_name}");
        }
    }
}

#[tokio::test]
async fn every_example_is_accepted_unchanged_by_strict_server_side_apply() {
    let client = common::client().await;
    let ns = common::namespace(&client, "examples").await;
    let api: Api<DynamicObject> = Api::namespaced_with(client, &ns, &seinode_resource());
    for (file_name, example) in seinode_examples() {
        let mut object: DynamicObject = serde_json::from_value(example).unwrap();
        object.metadata.namespace = Some(ns.clone());
        let name = object.metadata.name.clone().unwrap();
        // Strict field validation, as `kubectl apply --server-side` does by default: an unknown
        // field would fail here rather than be pruned silently.
        let params = PatchParams::apply("examples-test").validation_strict();
        let result = api.patch(&name, &params, &Patch::Apply(&object)).await;
        assert!(result.is_ok(), "{file_name}: {:?}", result.err());
    }
}

#[tokio::test]
async fn the_examples_directory_applies_as_its_readme_says_with_a_server_dry_run() {
    let client = common::client().await;
    let ns = common::namespace(&client, "examples-dir").await;
    let examples = PathBuf::from(EXAMPLES);
    let out = common::kubectl(
        &[
            "apply",
            "--server-side",
            "--dry-run=server",
            "--validate=strict",
            "-n",
            &ns,
            "-f",
            examples.to_str().unwrap(),
        ],
        "",
    );
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{}\n{stdout}",
        String::from_utf8_lossy(&out.stderr)
    );
    let mut expected: Vec<String> = seinode_examples()
        .into_iter()
        .map(|(_, example)| {
            format!(
                "seinode.sei.io/{}",
                example["metadata"]["name"].as_str().unwrap()
            )
        })
        .collect();
    expected.extend(
        [
            "serviceaccount/sei-node",
            "serviceaccount/sidecar-client",
            "clusterrolebinding.rbac.authorization.k8s.io/sei-node-auth-delegator",
            "clusterrole.rbac.authorization.k8s.io/seinode-sidecar-caller",
            "rolebinding.rbac.authorization.k8s.io/sidecar-client-seinode-sidecar-caller",
        ]
        .map(str::to_owned),
    );
    for object in expected {
        assert!(
            stdout.contains(&format!("{object} serverside-applied (server dry run)")),
            "{object} in:\n{stdout}"
        );
    }
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
        "sidecarTLS": {
            "secretName": "tls-secret",
            "requiredDNSNames": ["tls.x.svc.cluster.local"],
            "notAfter": "2099-01-01T00:00:00Z"
        },
        "conditions": [{
            "type": "SidecarTLSSecretReady", "status": "False", "reason": "TLSSecretNotFound",
            "message": "create-the-Secret", "lastTransitionTime": "2026-01-01T00:00:00Z"
        }, {
            "type": "SidecarReady", "status": "False", "reason": "SidecarStarting",
            "message": "m", "lastTransitionTime": "2026-01-01T00:00:00Z"
        }, {
            "type": "Ready", "status": "False", "reason": "TLSSecretNotReady",
            "message": "m", "lastTransitionTime": "2026-01-01T00:00:00Z"
        }]
    }});
    api.patch_status("tls", &PatchParams::default(), &Patch::Merge(&status))
        .await
        .unwrap();

    let get = |args: &[&str]| {
        let output = common::control_plane()
            .kubectl()
            .args(args)
            .output()
            .expect("run kubectl");
        assert!(
            output.status.success(),
            "{}",
            String::from_utf8_lossy(&output.stderr)
        );
        let text = String::from_utf8(output.stdout).unwrap();
        let mut lines = text.lines();
        let header: Vec<String> = lines
            .next()
            .unwrap()
            .split_whitespace()
            .map(str::to_owned)
            .collect();
        let row: Vec<String> = lines
            .next()
            .unwrap()
            .split_whitespace()
            .map(str::to_owned)
            .collect();
        (header, row, text)
    };
    let (header, row, text) = get(&["get", "snode", "-n", &ns]);
    assert_eq!(
        header,
        [
            "NAME", "PHASE", "READY", "TLS", "SECRET", "TLS", "SIDECAR", "AGE"
        ],
        "{text}"
    );
    assert_eq!(
        &row[..6],
        [
            "tls",
            "Pending",
            "False",
            "tls-secret",
            "TLSSecretNotFound",
            "SidecarStarting"
        ],
        "{text}"
    );
    // -o wide adds the image and the TLS condition's message.
    let (header, row, text) = get(&["get", "snode", "-n", &ns, "-o", "wide"]);
    assert_eq!(&header[8..], ["IMAGE", "EXPIRES", "MESSAGE"], "{text}");
    // Expires is the timestamp itself (a date column would print "<invalid>" for the future).
    assert_eq!(row[7], "ghcr.io/sei-protocol/sei:v6.3.0", "{text}");
    assert_eq!(row[8], "2099-01-01T00:00:00Z", "{text}");
    assert_eq!(row[9], "create-the-Secret", "{text}");
    // The category: `kubectl get sei` lists SeiNodes (prefixed with their kind when another
    // resource joins the category).
    let (_, row, text) = get(&["get", "sei", "-n", &ns]);
    assert!(row[0] == "tls" || row[0] == "seinode.sei.io/tls", "{text}");
}
