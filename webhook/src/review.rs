//! AdmissionReviews in and out, as typed structs that hold only what the decisions read.
//!
//! A review body is attacker-sized: anything that reaches the webhook's port can post one, and
//! an UPDATE of a Secret carries it twice. Reading it into a loose JSON tree costs several
//! times its size; reading it into these structs costs the few names, one annotation and, for a
//! Secret, the three data values the judge reads. Every other field, `managedFields`, `options`,
//! `userInfo` and the Secret's other keys included, is skipped as it is parsed.
//!
//! Every field is [`Lenient`]: a value of another JSON type than the one expected is recorded
//! as such, never a parse error, because the mutating webhook sees objects before the API server
//! has checked them against the schema. Only a body that is not JSON, not a v1 AdmissionReview,
//! or has no `request`, `uid` or `operation`, is refused (HTTP 400).

use std::fmt;
use std::marker::PhantomData;

use k8s_openapi::ByteString;
use k8s_openapi::api::core::v1::Secret;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;
use kube::core::admission::Operation;
use serde::de::value::MapAccessDeserializer;
use serde::de::{self, Deserializer, IgnoredAny, IntoDeserializer, MapAccess, SeqAccess, Visitor};
use serde::{Deserialize, Serialize};

/// The only AdmissionReview version served.
pub const ADMISSION_V1: &str = "admission.k8s.io/v1";

// === Lenient fields ===

/// A field as it came: absent or `null`, a value of the expected type, or a value of another
/// JSON type (skipped without being kept).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub enum Lenient<T> {
    #[default]
    Absent,
    Value(T),
    Mismatch,
}

/// Whether a type is read from a JSON object (a struct of lenient fields) or from a scalar.
pub trait Shape {
    const OBJECT: bool;
}

macro_rules! shapes {
    ($object:literal: $($type:ty),+) => {
        $(impl Shape for $type { const OBJECT: bool = $object; })+
    };
}

shapes!(false: String, i64, bool, ByteString);
shapes!(true: Gvk, Meta, Annotations, SeiNodeObject, NodeSpec, SidecarSpec, TlsBlock, SecretObject, TlsData);

impl<T> Lenient<T> {
    pub fn value(&self) -> Option<&T> {
        match self {
            Lenient::Value(value) => Some(value),
            Lenient::Absent | Lenient::Mismatch => None,
        }
    }

    pub fn into_value(self) -> Option<T> {
        match self {
            Lenient::Value(value) => Some(value),
            Lenient::Absent | Lenient::Mismatch => None,
        }
    }
}

impl<'de, T: Deserialize<'de> + Shape> Deserialize<'de> for Lenient<T> {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        deserializer.deserialize_any(LenientVisitor(PhantomData))
    }
}

struct LenientVisitor<T>(PhantomData<T>);

impl<T> LenientVisitor<T> {
    /// A scalar offered to `T`: kept when `T` takes it, else a mismatch.
    fn scalar<'de, E, V>(value: V) -> Result<Lenient<T>, E>
    where
        T: Deserialize<'de>,
        V: IntoDeserializer<'de, de::value::Error>,
    {
        Ok(T::deserialize(value.into_deserializer()).map_or(Lenient::Mismatch, Lenient::Value))
    }
}

impl<'de, T: Deserialize<'de> + Shape> Visitor<'de> for LenientVisitor<T> {
    type Value = Lenient<T>;

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("any JSON value")
    }

    fn visit_unit<E>(self) -> Result<Self::Value, E> {
        Ok(Lenient::Absent)
    }

    fn visit_none<E>(self) -> Result<Self::Value, E> {
        Ok(Lenient::Absent)
    }

    fn visit_bool<E>(self, v: bool) -> Result<Self::Value, E> {
        Self::scalar(v)
    }

    fn visit_i64<E>(self, v: i64) -> Result<Self::Value, E> {
        Self::scalar(v)
    }

    fn visit_u64<E>(self, v: u64) -> Result<Self::Value, E> {
        Self::scalar(v)
    }

    fn visit_f64<E>(self, v: f64) -> Result<Self::Value, E> {
        Self::scalar(v)
    }

    fn visit_str<E>(self, v: &str) -> Result<Self::Value, E> {
        Self::scalar(v)
    }

    /// Arrays are never read: skipped element by element.
    fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<Self::Value, A::Error> {
        while seq.next_element::<IgnoredAny>()?.is_some() {}
        Ok(Lenient::Mismatch)
    }

    /// An object is handed to a `T` read from objects (a struct of lenient fields, so only
    /// malformed JSON fails), and skipped entry by entry where a scalar was expected.
    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Self::Value, A::Error> {
        if T::OBJECT {
            return T::deserialize(MapAccessDeserializer::new(map)).map(Lenient::Value);
        }
        while map.next_entry::<IgnoredAny, IgnoredAny>()?.is_some() {}
        Ok(Lenient::Mismatch)
    }
}

// === Requests ===

/// The request of a review, with its object typed as `T`.
#[derive(Debug, Clone, Deserialize)]
#[serde(rename_all = "camelCase")]
#[serde(bound = "T: Deserialize<'de> + Shape")]
pub struct AdmissionRequest<T> {
    pub uid: String,
    #[serde(default)]
    pub kind: Lenient<Gvk>,
    #[serde(default)]
    pub namespace: Lenient<String>,
    #[serde(default)]
    pub name: Lenient<String>,
    pub operation: Operation,
    #[serde(default)]
    pub dry_run: Lenient<bool>,
    #[serde(default)]
    pub object: Lenient<T>,
    #[serde(default)]
    pub old_object: Lenient<T>,
}

impl<T> AdmissionRequest<T> {
    pub fn namespace(&self) -> &str {
        self.namespace.value().map_or("", String::as_str)
    }

    pub fn kind(&self) -> &str {
        self.kind
            .value()
            .map_or("", |gvk| gvk.kind.value().map_or("", String::as_str))
    }

    pub fn dry_run(&self) -> bool {
        self.dry_run.value().copied().unwrap_or(false)
    }

    pub fn object(&self) -> Option<&T> {
        self.object.value()
    }

    pub fn old_object(&self) -> Option<&T> {
        self.old_object.value()
    }
}

/// `request.kind`: only `kind` is read (for logs).
#[derive(Debug, Clone, Default, Deserialize)]
pub struct Gvk {
    #[serde(default)]
    pub kind: Lenient<String>,
}

/// The object metadata the decisions read.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Meta {
    #[serde(default)]
    pub name: Lenient<String>,
    #[serde(default)]
    pub namespace: Lenient<String>,
    #[serde(default)]
    pub resource_version: Lenient<String>,
    /// Present or not, and the contract's annotation; no other annotation is kept.
    #[serde(default)]
    pub annotations: Lenient<Annotations>,
}

#[derive(Debug, Clone, Default, Deserialize)]
pub struct Annotations {
    /// The contract's annotation (serde takes only a literal here; a test checks it is
    /// `REQUIRED_DNS_NAMES_ANNOTATION`).
    #[serde(rename = "sei.io/sidecar-tls-required-dns-names", default)]
    pub required_dns_names: Lenient<String>,
}

/// What the SeiNode decisions read of a SeiNode: its names, the contract annotation, and
/// `spec.sidecar.{port,tls.secretName}`.
#[derive(Debug, Clone, Default, Deserialize)]
pub struct SeiNodeObject {
    #[serde(default)]
    pub metadata: Lenient<Meta>,
    #[serde(default)]
    pub spec: Lenient<NodeSpec>,
}

#[derive(Debug, Clone, Default, Deserialize)]
pub struct NodeSpec {
    #[serde(default)]
    pub sidecar: Lenient<SidecarSpec>,
}

#[derive(Debug, Clone, Default, Deserialize)]
pub struct SidecarSpec {
    #[serde(default)]
    pub port: Lenient<i64>,
    #[serde(default)]
    pub tls: Lenient<TlsBlock>,
}

#[derive(Debug, Clone, Default, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct TlsBlock {
    #[serde(default)]
    pub secret_name: Lenient<String>,
}

impl SeiNodeObject {
    pub fn meta(&self) -> Option<&Meta> {
        self.metadata.value()
    }

    pub fn name(&self) -> Option<&str> {
        self.meta()?.name.value().map(String::as_str)
    }

    fn sidecar(&self) -> Option<&SidecarSpec> {
        self.spec.value()?.sidecar.value()
    }

    /// `spec.sidecar.port`, when it is an integer.
    pub fn sidecar_port(&self) -> Option<i64> {
        self.sidecar()?.port.value().copied()
    }

    /// `spec.sidecar.tls.secretName`: `None` when TLS is off, an error when the block is not the
    /// shape the CRD defines.
    pub fn tls_secret_name(&self) -> Result<Option<&str>, &'static str> {
        let Some(sidecar) = self.sidecar() else {
            return Ok(None);
        };
        match &sidecar.tls {
            Lenient::Absent => Ok(None),
            Lenient::Value(TlsBlock {
                secret_name: Lenient::Value(name),
            }) => Ok(Some(name)),
            Lenient::Value(_) | Lenient::Mismatch => {
                Err("has spec.sidecar.tls without a string secretName")
            }
        }
    }
}

/// What the Secret guard reads of a Secret: its names and version, its type, and the three
/// data values of the contract (base64-decoded). Other keys are skipped unread.
#[derive(Debug, Clone, Default, Deserialize)]
pub struct SecretObject {
    #[serde(default)]
    pub metadata: Lenient<Meta>,
    #[serde(rename = "type", default)]
    pub type_: Lenient<String>,
    #[serde(default)]
    pub data: Lenient<TlsData>,
}

#[derive(Debug, Clone, Default, Deserialize)]
pub struct TlsData {
    #[serde(rename = "tls.crt", default)]
    pub tls_crt: Lenient<ByteString>,
    #[serde(rename = "tls.key", default)]
    pub tls_key: Lenient<ByteString>,
    #[serde(rename = "ca.crt", default)]
    pub ca_crt: Lenient<ByteString>,
}

impl SecretObject {
    /// The Secret as the judge reads it, or why it is not one: a field it reads has the wrong
    /// type (a data value that is not base64, among others). The reason quotes nothing.
    pub fn to_secret(&self) -> Result<Secret, &'static str> {
        let mismatch = "a field has the wrong type or value (data must map keys to base64 strings)";
        let meta = match &self.metadata {
            Lenient::Mismatch => return Err(mismatch),
            metadata => metadata.value().cloned().unwrap_or_default(),
        };
        let type_ = match &self.type_ {
            Lenient::Mismatch => return Err(mismatch),
            type_ => type_.value().cloned(),
        };
        let data = match &self.data {
            Lenient::Absent => None,
            Lenient::Mismatch => return Err(mismatch),
            Lenient::Value(data) => {
                let mut kept = std::collections::BTreeMap::new();
                for (key, value) in [
                    ("tls.crt", &data.tls_crt),
                    ("tls.key", &data.tls_key),
                    ("ca.crt", &data.ca_crt),
                ] {
                    match value {
                        Lenient::Absent => {}
                        Lenient::Mismatch => return Err(mismatch),
                        Lenient::Value(bytes) => {
                            kept.insert(key.to_owned(), bytes.clone());
                        }
                    }
                }
                Some(kept)
            }
        };
        Ok(Secret {
            metadata: ObjectMeta {
                name: meta.name.into_value(),
                namespace: meta.namespace.into_value(),
                resource_version: meta.resource_version.into_value(),
                ..ObjectMeta::default()
            },
            type_,
            data,
            ..Secret::default()
        })
    }
}

/// Reads an `admission.k8s.io/v1` AdmissionReview body into its request; the error is the 400
/// message.
pub fn parse_review<'de, T: Deserialize<'de> + Shape>(
    body: &'de [u8],
) -> Result<AdmissionRequest<T>, String> {
    // The envelope first, so a wrong version is reported as such rather than as a parse error
    // (a pass that skips the request without keeping anything of it).
    #[derive(Deserialize)]
    #[serde(rename_all = "camelCase")]
    struct Envelope {
        #[serde(default)]
        api_version: Lenient<String>,
        #[serde(default)]
        kind: Lenient<String>,
    }
    #[derive(Deserialize)]
    #[serde(bound = "T: Deserialize<'de> + Shape")]
    struct Review<T> {
        #[serde(default = "Option::default")]
        request: Option<AdmissionRequest<T>>,
    }
    let envelope: Envelope = serde_json::from_slice(body).map_err(|e| {
        format!(
            "the body is not a JSON AdmissionReview: {}",
            serde_message(&e)
        )
    })?;
    match (envelope.api_version.value(), envelope.kind.value()) {
        (Some(version), Some(kind)) if version == ADMISSION_V1 && kind == "AdmissionReview" => {}
        (version, kind) => {
            return Err(format!(
                "expected kind AdmissionReview in apiVersion {ADMISSION_V1}, got kind {} in apiVersion {}; \
                 register this webhook with admissionReviewVersions: [v1]",
                quoted(kind),
                quoted(version)
            ));
        }
    }
    let review: Review<T> = serde_json::from_slice(body)
        .map_err(|e| format!("malformed AdmissionReview: {}", serde_message(&e)))?;
    let request = review
        .request
        .ok_or_else(|| "the AdmissionReview has no request".to_owned())?;
    if request.uid.is_empty() {
        return Err("the AdmissionReview request has no uid".to_owned());
    }
    Ok(request)
}

/// Most characters of a request's value quoted back in a 400 (and its log line).
const MAX_QUOTED: usize = 64;

/// serde's message, which says what was wrong and where. The only values it can quote are the
/// request's `uid` and `operation` tokens (a Secret's data is read leniently and never fails the
/// parse); the message is bounded all the same.
fn serde_message(error: &serde_json::Error) -> String {
    seinode_tls_crds::truncated(&error.to_string(), 4 * MAX_QUOTED).into_owned()
}

fn quoted(value: Option<&String>) -> String {
    match value {
        None => "(none)".to_owned(),
        Some(value) => seinode_tls_crds::truncated(value, MAX_QUOTED).into_owned(),
    }
}

// === Responses ===

/// The answer to a review.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct AdmissionResponse {
    pub uid: String,
    pub allowed: bool,
    /// Set on a denial: Kubernetes' `metav1.Status` code, reason and message.
    pub status: Option<Status>,
    /// A JSON patch the API server applies (mutating endpoints only).
    pub patch: Option<json_patch::Patch>,
    pub warnings: Vec<String>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Status {
    pub code: u16,
    pub reason: String,
    pub message: String,
}

impl AdmissionResponse {
    /// Allows the request with this uid.
    pub fn allow(uid: &str) -> Self {
        Self {
            uid: uid.to_owned(),
            allowed: true,
            ..Self::default()
        }
    }

    /// Denies it with a `metav1.Status` reason, code and message.
    pub fn deny(uid: &str, code: u16, reason: &str, message: String) -> Self {
        Self {
            uid: uid.to_owned(),
            allowed: false,
            status: Some(Status {
                code,
                reason: reason.to_owned(),
                message,
            }),
            ..Self::default()
        }
    }

    /// The AdmissionReview that carries this response, as JSON. The patch is base64-encoded
    /// JSON, as the API documents it.
    pub fn to_review_json(&self) -> Result<Vec<u8>, serde_json::Error> {
        use base64::Engine;
        #[derive(Serialize)]
        #[serde(rename_all = "camelCase")]
        struct Review<'a> {
            api_version: &'static str,
            kind: &'static str,
            response: Body<'a>,
        }
        #[derive(Serialize)]
        #[serde(rename_all = "camelCase")]
        struct Body<'a> {
            uid: &'a str,
            allowed: bool,
            /// `{}` when allowed, as Kubernetes writes an empty Status.
            status: StatusOrEmpty<'a>,
            #[serde(skip_serializing_if = "Option::is_none")]
            patch_type: Option<&'static str>,
            #[serde(skip_serializing_if = "Option::is_none")]
            patch: Option<String>,
            #[serde(skip_serializing_if = "<[String]>::is_empty")]
            warnings: &'a [String],
        }
        #[derive(Serialize)]
        #[serde(untagged)]
        enum StatusOrEmpty<'a> {
            Status(&'a Status),
            Empty {},
        }
        let patch = match &self.patch {
            Some(patch) => {
                Some(base64::engine::general_purpose::STANDARD.encode(serde_json::to_vec(patch)?))
            }
            None => None,
        };
        serde_json::to_vec(&Review {
            api_version: ADMISSION_V1,
            kind: "AdmissionReview",
            response: Body {
                uid: &self.uid,
                allowed: self.allowed,
                status: self
                    .status
                    .as_ref()
                    .map_or(StatusOrEmpty::Empty {}, StatusOrEmpty::Status),
                patch_type: patch.as_ref().map(|_| "JSONPatch"),
                patch,
                warnings: &self.warnings,
            },
        })
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used)]

    use seinode_tls_crds::contract::REQUIRED_DNS_NAMES_ANNOTATION;
    use serde_json::json;

    use super::*;

    fn review(request: serde_json::Value) -> Vec<u8> {
        serde_json::to_vec(&json!({
            "apiVersion": ADMISSION_V1,
            "kind": "AdmissionReview",
            "request": request,
        }))
        .unwrap()
    }

    #[test]
    fn the_annotation_key_is_the_contracts() {
        let body = review(json!({
            "uid": "u", "operation": "CREATE",
            "object": {"metadata": {"annotations": {REQUIRED_DNS_NAMES_ANNOTATION: "a,b", "x": "y"}}},
        }));
        let request: AdmissionRequest<SeiNodeObject> = parse_review(&body).unwrap();
        let annotations = request
            .object()
            .unwrap()
            .meta()
            .unwrap()
            .annotations
            .value();
        assert_eq!(
            annotations.unwrap().required_dns_names,
            Lenient::Value("a,b".to_owned())
        );
    }

    /// Each field of another JSON type than the schema's is recorded as a mismatch, and the
    /// request still parses: the decision reports it, not a 400.
    #[test]
    fn fields_of_the_wrong_type_are_mismatches_not_parse_errors() {
        let body = review(json!({
            "uid": "u", "operation": "CREATE", "name": 7, "namespace": ["a"], "dryRun": "yes",
            "kind": "SeiNode",
            "object": {
                "metadata": {"name": {"a": 1}, "annotations": "none"},
                "spec": {"sidecar": {"port": "8443", "tls": "on"}},
            },
            "oldObject": 12,
        }));
        let request: AdmissionRequest<SeiNodeObject> = parse_review(&body).unwrap();
        assert_eq!(request.name, Lenient::Mismatch);
        assert_eq!(request.namespace, Lenient::Mismatch);
        assert_eq!(request.dry_run, Lenient::Mismatch);
        assert!(matches!(request.kind, Lenient::Mismatch));
        assert!(matches!(request.old_object, Lenient::Mismatch));
        let object = request.object().unwrap();
        assert_eq!(object.name(), None);
        assert_eq!(object.sidecar_port(), None);
        assert!(object.tls_secret_name().is_err());
    }

    #[test]
    fn tls_is_off_when_absent_or_null_and_on_with_a_string_secret_name() {
        for (sidecar, expected) in [
            (json!(null), Ok(None)),
            (json!({}), Ok(None)),
            (json!({"tls": null}), Ok(None)),
            (json!({"tls": {"secretName": "s"}}), Ok(Some("s"))),
            (json!({"tls": {}}), Err(())),
            (json!({"tls": {"secretName": 5}}), Err(())),
            (json!({"tls": {"secretName": null}}), Err(())),
        ] {
            let object: SeiNodeObject =
                serde_json::from_value(json!({"spec": {"sidecar": sidecar}})).unwrap();
            assert_eq!(
                object.tls_secret_name().map_err(|_| ()),
                expected,
                "{sidecar}"
            );
        }
    }

    /// A Secret keeps its three contract values, decoded, and nothing else of its data.
    #[test]
    fn a_secret_keeps_only_the_values_the_judge_reads() {
        let object: SecretObject = serde_json::from_value(json!({
            "metadata": {"name": "s", "namespace": "n", "resourceVersion": "3",
                         "managedFields": [{"manager": "kubectl"}]},
            "type": "kubernetes.io/tls",
            "data": {"tls.crt": "Y2VydA==", "tls.key": "a2V5", "other": "b3RoZXI=", "x": 5},
        }))
        .unwrap();
        let secret = object.to_secret().unwrap();
        assert_eq!(secret.metadata.name.as_deref(), Some("s"));
        assert_eq!(secret.metadata.resource_version.as_deref(), Some("3"));
        let data = secret.data.unwrap();
        assert_eq!(
            data.keys().collect::<Vec<_>>(),
            ["tls.crt", "tls.key"],
            "only the contract's keys"
        );
        assert_eq!(data["tls.crt"].0, b"cert");
    }

    #[test]
    fn a_contract_value_that_is_not_base64_makes_the_secret_invalid() {
        let object: SecretObject = serde_json::from_value(json!({
            "type": "kubernetes.io/tls",
            "data": {"tls.crt": "Y2VydA==", "tls.key": "not base64: KEY"},
        }))
        .unwrap();
        let reason = object.to_secret().unwrap_err();
        assert!(reason.contains("wrong type or value"), "{reason}");
        assert!(!reason.contains("KEY"));
    }

    #[test]
    fn the_response_is_written_as_the_api_documents_it() {
        let allowed = AdmissionResponse::allow("u1").to_review_json().unwrap();
        assert_eq!(
            serde_json::from_slice::<serde_json::Value>(&allowed).unwrap(),
            json!({"apiVersion": ADMISSION_V1, "kind": "AdmissionReview",
                   "response": {"uid": "u1", "allowed": true, "status": {}}})
        );
        let mut patched = AdmissionResponse::allow("u2");
        patched.patch = Some(json_patch::Patch(vec![]));
        patched.warnings = vec!["w".to_owned()];
        let patched: serde_json::Value =
            serde_json::from_slice(&patched.to_review_json().unwrap()).unwrap();
        assert_eq!(patched["response"]["patchType"], "JSONPatch");
        assert_eq!(patched["response"]["patch"], "W10=", "base64 of []");
        assert_eq!(patched["response"]["warnings"], json!(["w"]));
        let denied = AdmissionResponse::deny("u3", 403, "Forbidden", "no".to_owned());
        let denied: serde_json::Value =
            serde_json::from_slice(&denied.to_review_json().unwrap()).unwrap();
        assert_eq!(
            denied["response"],
            json!({"uid": "u3", "allowed": false,
                   "status": {"code": 403, "reason": "Forbidden", "message": "no"}})
        );
    }
}
