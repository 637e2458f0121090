//! Admission decisions. Pure over the caches: no I/O, time passed in, so every branch is tested
//! with fixtures and no server.

use jiff::Timestamp;
use json_patch::jsonptr::PointerBuf;
use json_patch::{AddOperation, PatchOperation};
use k8s_openapi::api::core::v1::Secret;
use kube::core::DynamicObject;
use kube::core::admission::{AdmissionRequest, AdmissionResponse, Operation};
use seinode_tls_crds::contract::{
    REQUIRED_DNS_NAMES_ANNOTATION, check_runnable_name, check_satisfiable, check_sidecar_port,
    required_dns_names,
};
use seinode_tls_crds::validation::{
    InspectedSecret, Reason, SecretLookup, SecretVerdict, inspect_tls_secret, judge,
};
use serde_json::Value;

use crate::cache::{NodeCache, SecretCache};
use crate::config::{GuardPolicy, SecretPolicy};

/// Most SeiNodes named one by one in a guard warning.
const MAX_NODES_NAMED: usize = 10;

/// The three admission endpoints.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum WebhookKind {
    ValidateSeiNode,
    MutateSeiNode,
    GuardSecret,
}

impl WebhookKind {
    /// Label of the endpoint in metrics and logs.
    pub fn as_str(self) -> &'static str {
        match self {
            WebhookKind::ValidateSeiNode => "validate_seinodes",
            WebhookKind::MutateSeiNode => "mutate_seinodes",
            WebhookKind::GuardSecret => "validate_secrets",
        }
    }
}

/// How a request was answered (a small fixed set, for metrics).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Outcome {
    Allowed,
    AllowedWithWarnings,
    Patched,
    Denied,
}

impl Outcome {
    pub fn as_str(self) -> &'static str {
        match self {
            Outcome::Allowed => "allowed",
            Outcome::AllowedWithWarnings => "warned",
            Outcome::Patched => "patched",
            Outcome::Denied => "denied",
        }
    }
}

/// Why a request is denied: the `reason` the API server shows and the HTTP code it reports
/// (Kubernetes' `metav1.StatusReason` and the code each one carries).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DenyReason {
    /// The object breaks a rule of the contract or the API (422).
    Invalid,
    /// The request itself cannot be read as the API defines it (400).
    BadRequest,
    /// A permitted shape, refused by policy (403).
    Forbidden,
}

impl DenyReason {
    pub fn as_str(self) -> &'static str {
        match self {
            DenyReason::Invalid => "Invalid",
            DenyReason::BadRequest => "BadRequest",
            DenyReason::Forbidden => "Forbidden",
        }
    }

    pub fn code(self) -> u16 {
        match self {
            DenyReason::Invalid => 422,
            DenyReason::BadRequest => 400,
            DenyReason::Forbidden => 403,
        }
    }
}

/// A response and how to count it.
#[derive(Debug, Clone)]
pub struct Decision {
    pub response: AdmissionResponse,
    pub outcome: Outcome,
}

impl Decision {
    fn allow(request: &AdmissionRequest<DynamicObject>) -> Self {
        Self {
            response: AdmissionResponse::from(request),
            outcome: Outcome::Allowed,
        }
    }

    fn warn(request: &AdmissionRequest<DynamicObject>, warnings: Vec<String>) -> Self {
        if warnings.is_empty() {
            return Self::allow(request);
        }
        let mut response = AdmissionResponse::from(request);
        response.warnings = Some(warnings);
        Self {
            response,
            outcome: Outcome::AllowedWithWarnings,
        }
    }

    fn deny(
        request: &AdmissionRequest<DynamicObject>,
        reason: DenyReason,
        message: String,
    ) -> Self {
        let mut response = AdmissionResponse::from(request).deny(message);
        response.result.code = reason.code();
        response.result.reason = reason.as_str().to_owned();
        Self {
            response,
            outcome: Outcome::Denied,
        }
    }
}

/// What the decisions read: caches, policies, the contract's domain and the time.
pub struct AdmissionContext<'a> {
    pub secrets: &'a SecretCache,
    pub nodes: &'a NodeCache,
    pub secret_policy: SecretPolicy,
    pub guard_policy: GuardPolicy,
    pub cluster_domain: &'a str,
    pub now: Timestamp,
}

/// Dispatches a request to its endpoint's decision.
pub fn decide(
    kind: WebhookKind,
    request: &AdmissionRequest<DynamicObject>,
    ctx: &AdmissionContext<'_>,
) -> Decision {
    match kind {
        WebhookKind::ValidateSeiNode => validate_seinode(request, ctx),
        WebhookKind::MutateSeiNode => mutate_seinode(request, ctx),
        WebhookKind::GuardSecret => guard_secret(request, ctx),
    }
}

/// The Secret whose content the decision on `request` reads: a new TLS SeiNode's. The server
/// makes sure the cache holds it before deciding (see `SecretCache::ensure`).
pub fn secret_to_read(
    kind: WebhookKind,
    request: &AdmissionRequest<DynamicObject>,
) -> Option<(String, String)> {
    if kind != WebhookKind::ValidateSeiNode || request.operation != Operation::Create {
        return None;
    }
    let secret = tls_secret_name(request.object.as_ref()).ok()??;
    Some((request.namespace.clone().unwrap_or_default(), secret))
}

// === SeiNode validation ===

/// CREATE: judge the named Secret. UPDATE: refuse any change of `spec.sidecar.tls`.
pub fn validate_seinode(
    request: &AdmissionRequest<DynamicObject>,
    ctx: &AdmissionContext<'_>,
) -> Decision {
    match request.operation {
        Operation::Create => validate_create(request, ctx),
        Operation::Update => validate_update(request),
        Operation::Delete | Operation::Connect => Decision::allow(request),
    }
}

fn validate_update(request: &AdmissionRequest<DynamicObject>) -> Decision {
    let old = match tls_secret_name(request.old_object.as_ref()) {
        Ok(old) => old,
        Err(e) => {
            return Decision::deny(
                request,
                DenyReason::BadRequest,
                format!("the stored SeiNode {e}"),
            );
        }
    };
    let new = match tls_secret_name(request.object.as_ref()) {
        Ok(new) => new,
        Err(e) => return Decision::deny(request, DenyReason::Invalid, format!("the SeiNode {e}")),
    };
    let change = match (&old, &new) {
        (None, None) => return Decision::allow(request),
        (Some(a), Some(b)) if a == b => return Decision::allow(request),
        (None, Some(b)) => format!(
            "this update would enable TLS (secretName \"{b}\") on a SeiNode created without it"
        ),
        (Some(a), None) => format!(
            "this update would disable TLS (remove secretName \"{a}\") on a SeiNode created with it"
        ),
        (Some(a), Some(b)) => {
            format!("this update would change spec.sidecar.tls.secretName \"{a}\" -> \"{b}\"")
        }
    };
    let node = node_ref(request);
    Decision::deny(
        request,
        DenyReason::Forbidden,
        format!(
            "spec.sidecar.tls of SeiNode {node} is immutable: {change}. TLS is fixed when a SeiNode \
             is created. To change it, delete the SeiNode and create it again with the TLS block \
             you want; to keep its chain data, set spec.dataVolume.import.pvcName to its data \
             PersistentVolumeClaim"
        ),
    )
}

fn validate_create(
    request: &AdmissionRequest<DynamicObject>,
    ctx: &AdmissionContext<'_>,
) -> Decision {
    let name = object_name(request);
    if !name.is_empty()
        && let Err(e) = check_runnable_name(&name)
    {
        let namespace = request.namespace.clone().unwrap_or_default();
        return Decision::deny(
            request,
            DenyReason::Invalid,
            format!("SeiNode \"{namespace}/{name}\" could never run: {e}"),
        );
    }
    if let Some(port) = sidecar_port(request.object.as_ref())
        && let Err(e) = check_sidecar_port(port)
    {
        let namespace = request.namespace.clone().unwrap_or_default();
        return Decision::deny(
            request,
            DenyReason::Invalid,
            format!("SeiNode \"{namespace}/{name}\" could never run: {e}"),
        );
    }
    let secret_name = match tls_secret_name(request.object.as_ref()) {
        Ok(Some(secret_name)) => secret_name,
        Ok(None) => return Decision::allow(request),
        Err(e) => return Decision::deny(request, DenyReason::Invalid, format!("the SeiNode {e}")),
    };
    let namespace = request.namespace.clone().unwrap_or_default();
    if name.is_empty() {
        // generateName: the contract depends on the name the API server has not chosen yet.
        return Decision::warn(
            request,
            vec![format!(
                "the SeiNode uses generateName, so its TLS DNS names are not known yet; read \
                 status.sidecarTLS.requiredDNSNames once it exists and issue Secret \
                 \"{namespace}/{secret_name}\" for them"
            )],
        );
    }
    let required = required_dns_names(&name, &namespace, ctx.cluster_domain);
    if let Err(e) = check_satisfiable(&required) {
        return Decision::deny(
            request,
            DenyReason::Invalid,
            format!(
                "SeiNode \"{namespace}/{name}\" can never be given a sidecar TLS certificate: {e}"
            ),
        );
    }

    let lookup = ctx.secrets.lookup(&namespace, &secret_name);
    let verdict = judge(
        &namespace,
        &secret_name,
        lookup.as_lookup(),
        &required,
        ctx.now,
    );
    let node = format!("\"{namespace}/{name}\"");
    match verdict.reason {
        Reason::Ready => Decision::allow(request),
        Reason::NotFound => Decision::warn(
            request,
            vec![format!(
                "SeiNode {node} will wait in Pending: Secret \"{namespace}/{secret_name}\" does not \
                 exist yet; create it (type kubernetes.io/tls) with DNS names {}",
                required.join(", ")
            )],
        ),
        // A few seconds of clock skew between issuer and cluster must not refuse a node: it
        // waits in Pending, and the controller lets it start at notBefore.
        Reason::NotYetValid => Decision::warn(
            request,
            vec![format!(
                "SeiNode {node} will wait in Pending until its certificate is valid: {}",
                verdict.message
            )],
        ),
        Reason::Unavailable => Decision::warn(
            request,
            vec![format!(
                "SeiNode {node} will wait in Pending until Secret \"{namespace}/{secret_name}\" can \
                 be checked; it must carry DNS names {}",
                required.join(", ")
            )],
        ),
        reason => match ctx.secret_policy {
            SecretPolicy::Deny => Decision::deny(
                request,
                DenyReason::Invalid,
                format!(
                    "SeiNode {node} cannot start with this Secret: {reason}: {} (fix the Secret \
                     first; with --secret-policy warn such nodes are admitted and wait in Pending)",
                    verdict.message
                ),
            ),
            SecretPolicy::Warn => Decision::warn(
                request,
                vec![format!(
                    "SeiNode {node} will wait in Pending: {reason}: {}",
                    verdict.message
                )],
            ),
        },
    }
}

// === SeiNode mutation ===

/// CREATE of a TLS node (the registration's only operation): annotate it with the contract (so a
/// server-side dry run shows it), unless it already carries exactly that. A later server-side
/// apply that does not list the annotation may drop it; `status.sidecarTLS` is the contract then.
pub fn mutate_seinode(
    request: &AdmissionRequest<DynamicObject>,
    ctx: &AdmissionContext<'_>,
) -> Decision {
    // An UPDATE, should a registration send one, is annotated the same way.
    if !matches!(request.operation, Operation::Create | Operation::Update) {
        return Decision::allow(request);
    }
    let Some(object) = request.object.as_ref() else {
        return Decision::allow(request);
    };
    // A malformed or TLS-less node gets no annotation; validation reports malformed ones.
    if !matches!(tls_secret_name(Some(object)), Ok(Some(_))) {
        return Decision::allow(request);
    }
    let name = object_name(request);
    let namespace = request.namespace.clone().unwrap_or_default();
    if name.is_empty() {
        return Decision::allow(request);
    }
    let required = required_dns_names(&name, &namespace, ctx.cluster_domain);
    if check_satisfiable(&required).is_err() {
        return Decision::allow(request);
    }
    let expected = required.join(",");
    let current = object
        .metadata
        .annotations
        .as_ref()
        .and_then(|a| a.get(REQUIRED_DNS_NAMES_ANNOTATION));
    if current == Some(&expected) {
        return Decision::allow(request);
    }
    let value = Value::String(expected);
    let operation = match object.metadata.annotations {
        Some(_) => AddOperation {
            path: PointerBuf::from_tokens([
                "metadata",
                "annotations",
                REQUIRED_DNS_NAMES_ANNOTATION,
            ]),
            value,
        },
        None => AddOperation {
            path: PointerBuf::from_tokens(["metadata", "annotations"]),
            value: serde_json::json!({ REQUIRED_DNS_NAMES_ANNOTATION: value }),
        },
    };
    let patch = json_patch::Patch(vec![PatchOperation::Add(operation)]);
    match AdmissionResponse::from(request).with_patch(patch) {
        Ok(response) => Decision {
            response,
            outcome: Outcome::Patched,
        },
        // Serializing a patch of strings cannot fail; if it ever does, admit unchanged.
        Err(error) => {
            tracing::error!(%error, "failed to encode the annotation patch");
            Decision::allow(request)
        }
    }
}

// === Secret guard ===

/// UPDATE/DELETE of a TLS Secret: warn (or deny) when the change breaks SeiNodes using it.
pub fn guard_secret(
    request: &AdmissionRequest<DynamicObject>,
    ctx: &AdmissionContext<'_>,
) -> Decision {
    if !matches!(request.operation, Operation::Update | Operation::Delete) {
        return Decision::allow(request);
    }
    let namespace = request.namespace.clone().unwrap_or_default();
    let name = object_name(request);
    let nodes = ctx.nodes.using_secret(&namespace, &name);
    if nodes.is_empty() {
        return Decision::allow(request);
    }

    let old = match request.old_object.as_ref().map(to_secret) {
        Some(Ok(secret)) => Some(ctx.secrets.inspect(&secret)),
        _ => None,
    };
    let new = match (&request.operation, request.object.as_ref()) {
        (Operation::Delete, _) | (_, None) => None,
        (_, Some(object)) => match to_secret(object) {
            Ok(secret) => Some(std::sync::Arc::new(inspect_tls_secret(&secret))),
            Err(e) => {
                // The category, not serde's text, which may quote the Secret's content.
                return Decision::deny(
                    request,
                    DenyReason::Invalid,
                    format!(
                        "the Secret is not a valid Secret object: {}",
                        serde_category(&e)
                    ),
                );
            }
        },
    };

    let mut failing: Vec<(String, SecretVerdict)> = Vec::new();
    let mut newly_broken = 0;
    for node in &nodes {
        let node_name = kube::ResourceExt::name_any(node.as_ref());
        let required = required_dns_names(&node_name, &namespace, ctx.cluster_domain);
        let verdict_for = |inspected: Option<&InspectedSecret>| {
            let lookup = inspected.map_or(SecretLookup::NotFound, SecretLookup::Found);
            judge(&namespace, &name, lookup, &required, ctx.now)
        };
        let after = verdict_for(new.as_deref());
        if after.is_ready() {
            continue;
        }
        let was_ready = old
            .as_deref()
            .is_some_and(|old| verdict_for(Some(old)).is_ready());
        if was_ready {
            newly_broken += 1;
        }
        failing.push((node_name, after));
    }
    if failing.is_empty() {
        return Decision::allow(request);
    }

    let action = if request.operation == Operation::Delete {
        "deleting"
    } else {
        "this change to"
    };
    if ctx.guard_policy == GuardPolicy::Deny && newly_broken > 0 {
        let mut details: Vec<String> = failing
            .iter()
            .take(MAX_NODES_NAMED)
            .map(|(node, verdict)| {
                format!(
                    "SeiNode \"{node}\": {}: {}",
                    verdict.reason, verdict.message
                )
            })
            .collect();
        if failing.len() > MAX_NODES_NAMED {
            details.push(format!(
                "and {} more SeiNodes",
                failing.len() - MAX_NODES_NAMED
            ));
        }
        return Decision::deny(
            request,
            DenyReason::Forbidden,
            format!(
                "{action} Secret \"{namespace}/{name}\" would break the sidecar TLS of {} SeiNode(s) \
                 that use it: {}",
                failing.len(),
                details.join("; ")
            ),
        );
    }
    let mut warnings: Vec<String> = failing
        .iter()
        .take(MAX_NODES_NAMED)
        .map(|(node, verdict)| {
            format!(
                "{action} Secret \"{namespace}/{name}\" leaves SeiNode \"{node}\" without a valid \
                 TLS Secret: {}{}",
                verdict.reason,
                missing_suffix(verdict)
            )
        })
        .collect();
    if failing.len() > MAX_NODES_NAMED {
        warnings.push(format!(
            "... and {} more SeiNodes",
            failing.len() - MAX_NODES_NAMED
        ));
    }
    Decision::warn(request, warnings)
}

fn missing_suffix(verdict: &SecretVerdict) -> String {
    if verdict.missing_dns_names.is_empty() {
        String::new()
    } else {
        format!(" (missing {})", verdict.missing_dns_names.join(", "))
    }
}

// === Reading requests ===

/// `spec.sidecar.tls.secretName` of an object: `None` when TLS is off, an error when the block is
/// not the shape the CRD defines.
/// `spec.sidecar.port`, when the object sets one.
fn sidecar_port(object: Option<&DynamicObject>) -> Option<i32> {
    let port = object?
        .data
        .get("spec")?
        .get("sidecar")?
        .get("port")?
        .as_i64()?;
    i32::try_from(port).ok()
}

fn tls_secret_name(object: Option<&DynamicObject>) -> Result<Option<String>, String> {
    let Some(object) = object else {
        return Ok(None);
    };
    let tls = object
        .data
        .get("spec")
        .and_then(|s| s.get("sidecar"))
        .and_then(|s| s.get("tls"));
    match tls {
        None | Some(Value::Null) => Ok(None),
        Some(tls) => match tls.get("secretName") {
            Some(Value::String(name)) => Ok(Some(name.clone())),
            _ => Err("has spec.sidecar.tls without a string secretName".to_owned()),
        },
    }
}

fn object_name(request: &AdmissionRequest<DynamicObject>) -> String {
    if !request.name.is_empty() {
        return request.name.clone();
    }
    request
        .object
        .as_ref()
        .and_then(|o| o.metadata.name.clone())
        .unwrap_or_default()
}

fn node_ref(request: &AdmissionRequest<DynamicObject>) -> String {
    format!(
        "\"{}/{}\"",
        request.namespace.as_deref().unwrap_or_default(),
        object_name(request)
    )
}

/// What kind of problem a Secret object has, without quoting any of it.
fn serde_category(error: &serde_json::Error) -> &'static str {
    match error.classify() {
        serde_json::error::Category::Data => {
            "a field has the wrong type or value (data must map keys to base64 strings)"
        }
        serde_json::error::Category::Syntax | serde_json::error::Category::Eof => {
            "it is not well-formed JSON"
        }
        serde_json::error::Category::Io => "it could not be read",
    }
}

fn to_secret(object: &DynamicObject) -> Result<Secret, serde_json::Error> {
    serde_json::to_value(object).and_then(serde_json::from_value)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn deny_reasons_carry_the_codes_kubernetes_gives_them() {
        // k8s.io/apimachinery/pkg/apis/meta/v1/types.go: StatusReasonInvalid (422),
        // StatusReasonBadRequest (400), StatusReasonForbidden (403).
        for (reason, name, code) in [
            (DenyReason::Invalid, "Invalid", 422),
            (DenyReason::BadRequest, "BadRequest", 400),
            (DenyReason::Forbidden, "Forbidden", 403),
        ] {
            assert_eq!((reason.as_str(), reason.code()), (name, code));
        }
    }
}
