//! Writes the seed corpus of every fuzz target into `fuzz/corpus/<target>/` (a handful of small
//! realistic inputs each; certificates are made here, so none is an opaque blob). Run it again
//! only to change the seeds:
//!
//!     cargo +nightly fuzz build --features make-corpus make_corpus
//!     $CARGO_TARGET_DIR/x86_64-unknown-linux-gnu/release/make_corpus   # or fuzz/target/...

use std::path::{Path, PathBuf};

use k8s_openapi::api::core::v1::Secret;
use rcgen::{
    BasicConstraints, CertificateParams, DnType, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair,
    SignatureAlgorithm, date_time_ymd,
};
use seinode_tls_crds::contract::{REQUIRED_DNS_NAMES_ANNOTATION, required_dns_names};
use seinode_tls_fuzz::{Layout, encode, encode_fields};
use seinode_tls_testkit::{CertificateAuthority, Issued, LeafSpec, tls_secret};
use serde_json::{Value, json};

const NAMESPACE: &str = "sei";

fn main() {
    let corpus = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("corpus");
    let ca = CertificateAuthority::new("seinode-tls fuzz corpus CA").expect("generate a CA");
    let rpc = issue(&ca, "rpc", true, false);
    admission_review(&corpus.join("admission_review"), &rpc);
    secret_inspection(&corpus.join("secret_inspection"), &ca, &rpc);
    manifest_reader(&corpus.join("manifest_reader"), &ca, &rpc);
}

fn write(dir: &Path, name: &str, bytes: &[u8]) {
    std::fs::create_dir_all(dir).expect("create the corpus directory");
    std::fs::write(dir.join(name), bytes).expect("write a seed");
}

/// A leaf for SeiNode `node`'s contract.
fn issue(ca: &CertificateAuthority, node: &str, server: bool, client: bool) -> Issued {
    let names = required_dns_names(node, NAMESPACE, "cluster.local");
    let names: Vec<&str> = names.iter().map(String::as_str).collect();
    ca.issue(&LeafSpec {
        common_name: node,
        dns_names: &names,
        server,
        client,
        ..Default::default()
    })
    .expect("issue a leaf")
}

/// A self-signed server certificate for `rpc` signed by `signer`, stored with `key_pem`.
fn self_signed(signer: &KeyPair, key_pem: String, ca: bool) -> Issued {
    let names = required_dns_names("rpc", NAMESPACE, "cluster.local");
    let mut params = CertificateParams::new(names).expect("valid SANs");
    params.distinguished_name.push(DnType::CommonName, "rpc");
    params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
    if ca {
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    }
    let cert = params.self_signed(signer).expect("sign a certificate");
    Issued {
        cert_pem: cert.pem(),
        key_pem,
    }
}

fn generated(alg: &'static SignatureAlgorithm) -> Issued {
    let signer = KeyPair::generate_for(alg).expect("generate a key");
    let pem = signer.serialize_pem();
    self_signed(&signer, pem, false)
}

/// A root CA, an intermediate it signed, and an `rpc` contract leaf the intermediate signed.
struct TwoLevelChain {
    root_pem: String,
    /// The leaf, then the intermediate.
    tls_crt: String,
    key_pem: String,
}

fn two_level_chain(expired_intermediate: bool) -> TwoLevelChain {
    let ca_params = |name: &str| {
        let mut params = CertificateParams::new(Vec::<String>::new()).expect("no SANs");
        params.distinguished_name.push(DnType::CommonName, name);
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        params
    };
    let root_key = KeyPair::generate().expect("generate a key");
    let root_params = ca_params("fuzz root");
    let root_pem = root_params
        .self_signed(&root_key)
        .expect("sign the root")
        .pem();
    let root = Issuer::new(root_params, &root_key);
    let intermediate_key = KeyPair::generate().expect("generate a key");
    let mut intermediate_params = ca_params("fuzz intermediate");
    if expired_intermediate {
        intermediate_params.not_before = date_time_ymd(2020, 1, 1);
        intermediate_params.not_after = date_time_ymd(2021, 1, 1);
    }
    let intermediate = intermediate_params
        .signed_by(&intermediate_key, &root)
        .expect("sign the intermediate");
    let intermediate_issuer = Issuer::new(intermediate_params, &intermediate_key);
    let leaf_key = KeyPair::generate().expect("generate a key");
    let names = required_dns_names("rpc", NAMESPACE, "cluster.local");
    let mut leaf_params = CertificateParams::new(names).expect("valid SANs");
    leaf_params
        .distinguished_name
        .push(DnType::CommonName, "rpc");
    leaf_params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
    let leaf = leaf_params
        .signed_by(&leaf_key, &intermediate_issuer)
        .expect("sign the leaf");
    TwoLevelChain {
        root_pem,
        tls_crt: format!("{}{}", leaf.pem(), intermediate.pem()),
        key_pem: leaf_key.serialize_pem(),
    }
}

fn der(pem_text: &str) -> Vec<u8> {
    pem::parse(pem_text)
        .expect("PEM made here parses")
        .into_contents()
}

// === admission_review ===

/// First byte of an admission_review input: endpoint (`% 3`) and policies (`/ 3 % 2`).
fn selector(endpoint: u8, warn: bool) -> u8 {
    endpoint + if warn { 3 } else { 0 }
}
const VALIDATE: u8 = 0;
const MUTATE: u8 = 1;
const GUARD: u8 = 2;

fn admission_review(dir: &Path, rpc: &Issued) {
    let seed = |name: &str, selector: u8, review: Value| {
        let mut bytes = vec![selector];
        bytes.extend_from_slice(review.to_string().as_bytes());
        write(dir, name, &bytes);
    };
    seed(
        "validate-create-ready",
        selector(VALIDATE, false),
        review(
            "CREATE",
            "rpc",
            Some(kubectl_applied_node("rpc", Some("rpc-tls"))),
            None,
        ),
    );
    seed(
        "validate-create-defective-secret",
        selector(VALIDATE, false),
        review("CREATE", "web", Some(node("web", Some("broken-tls"))), None),
    );
    seed(
        "validate-create-missing-secret-warn",
        selector(VALIDATE, true),
        review("CREATE", "db", Some(node("db", Some("db-tls"))), None),
    );
    seed(
        "validate-create-without-tls",
        selector(VALIDATE, false),
        review("CREATE", "plain", Some(node("plain", None)), None),
    );
    let mut generated = node("", Some("rpc-tls"));
    generated["metadata"] = json!({"generateName": "rpc-", "namespace": NAMESPACE});
    seed(
        "validate-create-generate-name",
        selector(VALIDATE, false),
        review("CREATE", "", Some(generated), None),
    );
    seed(
        "validate-create-unrunnable-name",
        selector(VALIDATE, false),
        review(
            "CREATE",
            "Rpc.east",
            Some(node("Rpc.east", Some("rpc-tls"))),
            None,
        ),
    );
    seed(
        "validate-update-renames-secret",
        selector(VALIDATE, false),
        review(
            "UPDATE",
            "rpc",
            Some(node("rpc", Some("rpc-tls-2"))),
            Some(node("rpc", Some("rpc-tls"))),
        ),
    );
    seed(
        "mutate-create",
        selector(MUTATE, false),
        review("CREATE", "rpc", Some(node("rpc", Some("rpc-tls"))), None),
    );
    let mut annotated = node("rpc", Some("rpc-tls"));
    annotated["metadata"]["annotations"] = json!({
        REQUIRED_DNS_NAMES_ANNOTATION: required_dns_names("rpc", NAMESPACE, "cluster.local").join(","),
    });
    seed(
        "mutate-create-annotated",
        selector(MUTATE, true),
        review("CREATE", "rpc", Some(annotated), None),
    );
    let mut old = tls_secret(NAMESPACE, "rpc-tls", &rpc.cert_pem, &rpc.key_pem, None);
    old.metadata.resource_version = Some("11".to_owned());
    let mut new = tls_secret(NAMESPACE, "rpc-tls", &rpc.cert_pem, "", None);
    new.metadata.resource_version = Some("12".to_owned());
    seed(
        "guard-update-breaks",
        selector(GUARD, false),
        secret_review("UPDATE", Some(&new), Some(&old)),
    );
    seed(
        "guard-delete-warn",
        selector(GUARD, true),
        secret_review("DELETE", None, Some(&old)),
    );
    let mut wrong_version = review("CREATE", "rpc", Some(node("rpc", None)), None);
    wrong_version["apiVersion"] = json!("admission.k8s.io/v1beta1");
    seed(
        "validate-wrong-version",
        selector(VALIDATE, false),
        wrong_version,
    );
}

/// A SeiNode as the tests write it.
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

/// A SeiNode as `kubectl apply` sends it (the shape of the webhook-load benchmark, shortened):
/// labels, the last-applied annotation, managedFields.
fn kubectl_applied_node(name: &str, tls: Option<&str>) -> Value {
    let mut object = node(name, tls);
    let labels = json!({"app.kubernetes.io/name": "seid", "app.kubernetes.io/instance": name, "sei.io/role": "rpc"});
    let last_applied = format!(
        "{}\n",
        json!({"apiVersion": "sei.io/v1alpha1", "kind": "SeiNode", "metadata": {"name": name, "namespace": NAMESPACE, "labels": labels}, "spec": object["spec"]})
    );
    object["metadata"]["labels"] = labels;
    object["metadata"]["annotations"] =
        json!({"kubectl.kubernetes.io/last-applied-configuration": last_applied});
    object["metadata"]["managedFields"] = json!([{
        "apiVersion": "sei.io/v1alpha1",
        "fieldsType": "FieldsV1",
        "fieldsV1": {"f:metadata": {"f:labels": {}}, "f:spec": {"f:sidecar": {"f:tls": {"f:secretName": {}}}}},
        "manager": "kubectl-client-side-apply",
        "operation": "Update",
        "time": "2025-06-02T09:41:17Z",
    }]);
    object["metadata"]["creationTimestamp"] = json!("2025-06-02T09:41:17Z");
    object["metadata"]["generation"] = json!(1);
    object
}

fn review(operation: &str, name: &str, object: Option<Value>, old: Option<Value>) -> Value {
    let kind = json!({"group": "sei.io", "version": "v1alpha1", "kind": "SeiNode"});
    let resource = json!({"group": "sei.io", "version": "v1alpha1", "resource": "seinodes"});
    envelope(operation, name, kind, resource, object, old)
}

fn secret_review(operation: &str, object: Option<&Secret>, old: Option<&Secret>) -> Value {
    let to_json = |secret: &Secret| serde_json::to_value(secret).expect("a Secret serializes");
    let kind = json!({"group": "", "version": "v1", "kind": "Secret"});
    let resource = json!({"group": "", "version": "v1", "resource": "secrets"});
    envelope(
        operation,
        "rpc-tls",
        kind,
        resource,
        object.map(to_json),
        old.map(to_json),
    )
}

fn envelope(
    operation: &str,
    name: &str,
    kind: Value,
    resource: Value,
    object: Option<Value>,
    old: Option<Value>,
) -> Value {
    json!({
        "apiVersion": "admission.k8s.io/v1",
        "kind": "AdmissionReview",
        "request": {
            "uid": format!("705ab4f5-6393-11e8-b7cc-42010a8000{:02x}", name.len()),
            "kind": kind,
            "resource": resource,
            "requestKind": kind,
            "requestResource": resource,
            "name": name,
            "namespace": NAMESPACE,
            "operation": operation,
            "userInfo": {"username": "system:serviceaccount:argocd:argocd-application-controller", "groups": ["system:serviceaccounts", "system:authenticated"]},
            "object": object,
            "oldObject": old,
            "dryRun": false,
        }
    })
}

// === secret_inspection ===

fn secret_inspection(dir: &Path, ca: &CertificateAuthority, rpc: &Issued) {
    let other = issue(ca, "rpc", true, false);
    let client_only = issue(ca, "rpc", false, true);
    let ca_pem = ca.cert_pem();
    let fields = |name: &str, type_bits: u8, parts: &[&[u8]]| {
        write(dir, name, &encode_fields(type_bits, parts));
    };
    let (crt, key, ca_crt) = (
        rpc.cert_pem.as_bytes(),
        rpc.key_pem.as_bytes(),
        ca_pem.as_bytes(),
    );
    fields("fields-valid-with-ca", 0, &[crt, key, ca_crt]);
    fields(
        "fields-chain-leaf-then-ca",
        0,
        &[format!("{}{ca_pem}", rpc.cert_pem).as_bytes(), key],
    );
    fields("fields-key-mismatch", 0, &[crt, other.key_pem.as_bytes()]);
    // Root in ca.crt, the leaf and its intermediate in tls.crt: the path the judge builds and
    // checks at now, certificate by certificate; once with an intermediate that has expired.
    for (name, expired) in [
        ("fields-two-level-chain", false),
        ("fields-two-level-chain-expired-intermediate", true),
    ] {
        let chain = two_level_chain(expired);
        fields(
            name,
            0,
            &[
                chain.tls_crt.as_bytes(),
                chain.key_pem.as_bytes(),
                chain.root_pem.as_bytes(),
            ],
        );
    }
    fields(
        "fields-client-only",
        0,
        &[
            client_only.cert_pem.as_bytes(),
            client_only.key_pem.as_bytes(),
        ],
    );
    fields("fields-opaque", 2, &[crt, key]);
    fields("fields-key-in-crt", 0, &[key, key]);
    fields("fields-empty-key", 0, &[crt, b""]);
    fields("fields-crt-only", 0, &[crt]);

    let ed25519 = generated(&rcgen::PKCS_ED25519);
    fields(
        "fields-ed25519",
        0,
        &[ed25519.cert_pem.as_bytes(), ed25519.key_pem.as_bytes()],
    );
    let p384 = generated(&rcgen::PKCS_ECDSA_P384_SHA384);
    fields(
        "fields-p384",
        0,
        &[p384.cert_pem.as_bytes(), p384.key_pem.as_bytes()],
    );
    // The validation tests' throwaway RSA key (ring cannot generate one), in both forms.
    let pkcs8 = include_str!("../../../crds/src/validation/testdata/rsa-2048.pkcs8.pem");
    let signer = KeyPair::from_pkcs8_pem_and_sign_algo(pkcs8, &rcgen::PKCS_RSA_SHA256)
        .expect("rcgen loads the RSA key");
    let pkcs1 = include_str!("../../../crds/src/validation/testdata/rsa-2048.pkcs1.pem").to_owned();
    let rsa = self_signed(&signer, pkcs1, false);
    fields(
        "fields-rsa-pkcs1",
        0,
        &[rsa.cert_pem.as_bytes(), rsa.key_pem.as_bytes()],
    );
    let p256 = KeyPair::generate().expect("generate a key");
    let ca_leaf = self_signed(&p256, p256.serialize_pem(), true);
    fields(
        "fields-ca-as-leaf",
        0,
        &[ca_leaf.cert_pem.as_bytes(), ca_leaf.key_pem.as_bytes()],
    );

    let leaf_der = der(&rpc.cert_pem);
    write(
        dir,
        "der-leaf",
        &encode(Layout::CertificateDer, 0, &leaf_der),
    );
    write(
        dir,
        "der-intermediate",
        &encode(Layout::CertificateDer, 1, &der(&ca_pem)),
    );
    write(
        dir,
        "der-rsa-certificate",
        &encode(Layout::CertificateDer, 0, &der(&rsa.cert_pem)),
    );
    write(
        dir,
        "der-key-pkcs8",
        &encode(Layout::KeyDer, 0, &der(&rpc.key_pem)),
    );
    write(
        dir,
        "der-key-rsa-pkcs1",
        &encode(Layout::KeyDer, 1, &der(&rsa.key_pem)),
    );
    write(
        dir,
        "der-key-ed25519",
        &encode(Layout::KeyDer, 0, &der(&ed25519.key_pem)),
    );
    write(dir, "pem-as-crt", &encode(Layout::Pem, 0, crt));
    write(dir, "pem-as-key", &encode(Layout::Pem, 1, key));
}

// === manifest_reader ===

fn manifest_reader(dir: &Path, ca: &CertificateAuthority, rpc: &Issued) {
    let secret = tls_secret(
        NAMESPACE,
        "rpc-tls",
        &rpc.cert_pem,
        &rpc.key_pem,
        Some(&ca.cert_pem()),
    );
    // As `kubectl get secret -o json` prints it.
    let mut printed = serde_json::to_value(&secret).expect("a Secret serializes");
    printed["apiVersion"] = json!("v1");
    printed["kind"] = json!("Secret");
    printed["metadata"]["resourceVersion"] = json!("4211");
    printed["metadata"]["creationTimestamp"] = json!("2025-06-02T09:41:17Z");
    printed["metadata"]["uid"] = json!("9d1c7a4e-2b3f-4e5a-8c6d-7e8f9a0b1c2d");
    let json_text = serde_json::to_string_pretty(&printed).expect("JSON");
    write(dir, "kubectl-get-json", json_text.as_bytes());
    // The same as YAML.
    let yaml = kubectl_yaml(&printed);
    write(dir, "kubectl-get-yaml", yaml.as_bytes());

    let indent = |pem: &str| {
        pem.lines()
            .map(|line| format!("    {line}\n"))
            .collect::<String>()
    };
    let string_data = format!(
        "apiVersion: v1\nkind: Secret\nmetadata:\n  name: rpc-tls\n  namespace: sei\n\
         type: kubernetes.io/tls\nstringData:\n  tls.crt: |\n{}  tls.key: |\n{}",
        indent(&rpc.cert_pem),
        indent(&rpc.key_pem)
    );
    write(dir, "string-data-block-scalars", string_data.as_bytes());

    // A tab where the key's block scalar wants spaces: a YAML error on the key's lines.
    let key_lines: Vec<&str> = rpc.key_pem.lines().collect();
    let broken = format!(
        "apiVersion: v1\nkind: Secret\nmetadata:\n  name: rpc-tls\ntype: kubernetes.io/tls\n\
         stringData:\n  tls.key: |\n    {}\n    {}\n\t{}\n    {}\n",
        key_lines[0], key_lines[1], key_lines[2], key_lines[3]
    );
    write(dir, "string-data-tab-in-key", broken.as_bytes());

    let inline_key = format!(
        "apiVersion: v1\nkind: Secret\nmetadata: {{name: rpc-tls}}\ndata:\n  tls.crt: {}\n  tls.key: {}%%\n",
        base64_of(&printed, "tls.crt"),
        base64_of(&printed, "tls.key"),
    );
    write(dir, "data-bad-base64-key", inline_key.as_bytes());

    let unterminated = format!(
        "apiVersion: v1\nkind: Secret\ndata:\n  tls.key: \"{}\n",
        base64_of(&printed, "tls.key")
    );
    write(dir, "data-unterminated-quote", unterminated.as_bytes());

    write(
        dir,
        "configmap",
        b"apiVersion: v1\nkind: ConfigMap\nmetadata:\n  name: rpc-config\ndata:\n  tls.key: not-a-secret-at-all-but-long\n",
    );
    write(
        dir,
        "two-documents",
        b"apiVersion: v1\nkind: Secret\nmetadata:\n  name: a\n---\napiVersion: v1\nkind: Secret\nmetadata:\n  name: b\n",
    );
    write(
        dir,
        "anchors-and-wrong-types",
        b"apiVersion: v1\nkind: Secret\nmetadata: &m\n  name: rpc-tls\n  labels: *m\ntype: [kubernetes.io/tls]\nstringData:\n  tls.key: &k 0123456789abcdefghij\n  tls.crt: *k\n",
    );
}

fn base64_of(printed: &Value, field: &str) -> String {
    printed["data"][field]
        .as_str()
        .expect("data is base64 text")
        .to_owned()
}

/// YAML the way kubectl prints it (block style), for the few shapes a printed Secret has.
fn kubectl_yaml(value: &Value) -> String {
    fn scalar(value: &Value) -> String {
        match value {
            // Quoted where a plain scalar would read as something else (a time, a number).
            Value::String(s) if s.contains(':') || s.starts_with(|c: char| c.is_ascii_digit()) => {
                format!("{s:?}")
            }
            Value::String(s) => s.clone(),
            other => other.to_string(),
        }
    }
    fn write_map(out: &mut String, map: &serde_json::Map<String, Value>, depth: usize) {
        for (key, value) in map {
            let pad = "  ".repeat(depth);
            match value {
                Value::Object(inner) => {
                    out.push_str(&format!("{pad}{key}:\n"));
                    write_map(out, inner, depth + 1);
                }
                other => out.push_str(&format!("{pad}{key}: {}\n", scalar(other))),
            }
        }
    }
    let mut out = String::new();
    if let Value::Object(map) = value {
        write_map(&mut out, map, 0);
    }
    out
}
