//! Admission decisions. Pure over the caches: no I/O, time passed in, so every branch is tested
//! with fixtures and no server.

use jiff::Timestamp;
use json_patch::jsonptr::PointerBuf;
use json_patch::{AddOperation, PatchOperation};
use kube::core::admission::Operation;
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
use crate::review::{
    AdmissionRequest, AdmissionResponse, SecretObject, SeiNodeObject, parse_review,
};

/// A review of a SeiNode, typed as the SeiNode endpoints read it.
pub type NodeRequest = AdmissionRequest<SeiNodeObject>;
/// A review of a Secret, typed as the Secret guard reads it.
pub type SecretRequest = AdmissionRequest<SecretObject>;

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

/// A request to one endpoint, read as that endpoint's decision reads it.
#[derive(Debug, Clone)]
pub enum Review {
    ValidateSeiNode(NodeRequest),
    MutateSeiNode(NodeRequest),
    GuardSecret(SecretRequest),
}

/// What a log line says about a request.
pub struct Summary<'a> {
    pub uid: &'a str,
    pub kind: &'a str,
    pub namespace: &'a str,
    pub name: String,
    pub operation: &'a Operation,
    pub dry_run: bool,
}

impl Review {
    /// Reads a body as `kind`'s request; the error is the 400 message.
    pub fn parse(kind: WebhookKind, body: &[u8]) -> Result<Self, String> {
        Ok(match kind {
            WebhookKind::ValidateSeiNode => Review::ValidateSeiNode(parse_review(body)?),
            WebhookKind::MutateSeiNode => Review::MutateSeiNode(parse_review(body)?),
            WebhookKind::GuardSecret => Review::GuardSecret(parse_review(body)?),
        })
    }

    pub fn summary(&self) -> Summary<'_> {
        fn of<T>(request: &AdmissionRequest<T>, name: String) -> Summary<'_> {
            Summary {
                uid: &request.uid,
                kind: request.kind(),
                namespace: request.namespace(),
                name,
                operation: &request.operation,
                dry_run: request.dry_run(),
            }
        }
        match self {
            Review::ValidateSeiNode(request) | Review::MutateSeiNode(request) => {
                of(request, node_name(request))
            }
            Review::GuardSecret(request) => of(request, secret_name(request)),
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
    fn allow<T>(request: &AdmissionRequest<T>) -> Self {
        Self {
            response: AdmissionResponse::allow(&request.uid),
            outcome: Outcome::Allowed,
        }
    }

    fn warn<T>(request: &AdmissionRequest<T>, warnings: Vec<String>) -> Self {
        if warnings.is_empty() {
            return Self::allow(request);
        }
        let mut response = AdmissionResponse::allow(&request.uid);
        response.warnings = warnings;
        Self {
            response,
            outcome: Outcome::AllowedWithWarnings,
        }
    }

    fn deny<T>(request: &AdmissionRequest<T>, reason: DenyReason, message: String) -> Self {
        Self {
            response: AdmissionResponse::deny(
                &request.uid,
                reason.code(),
                reason.as_str(),
                message,
            ),
            outcome: Outcome::Denied,
        }
    }

    /// The denial's message, if this is one.
    pub fn denial(&self) -> Option<&str> {
        self.response.status.as_ref().map(|s| s.message.as_str())
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
pub fn decide(review: &Review, ctx: &AdmissionContext<'_>) -> Decision {
    match review {
        Review::ValidateSeiNode(request) => validate_seinode(request, ctx),
        Review::MutateSeiNode(request) => mutate_seinode(request, ctx),
        Review::GuardSecret(request) => guard_secret(request, ctx),
    }
}

/// The Secret whose content the decision on `review` reads: a new TLS SeiNode's. The server
/// makes sure the cache holds it before deciding (see `SecretCache::ensure`).
pub fn secret_to_read(review: &Review) -> Option<(String, String)> {
    let Review::ValidateSeiNode(request) = review else {
        return None;
    };
    if request.operation != Operation::Create {
        return None;
    }
    let secret = tls_secret_name(request.object()).ok().flatten()?;
    Some((request.namespace().to_owned(), secret.to_owned()))
}

// === SeiNode validation ===

/// CREATE: judge the named Secret. UPDATE: refuse any change of `spec.sidecar.tls`.
pub fn validate_seinode(request: &NodeRequest, ctx: &AdmissionContext<'_>) -> Decision {
    match request.operation {
        Operation::Create => validate_create(request, ctx),
        Operation::Update => validate_update(request),
        Operation::Delete | Operation::Connect => Decision::allow(request),
    }
}

fn validate_update(request: &NodeRequest) -> Decision {
    let old = match tls_secret_name(request.old_object()) {
        Ok(old) => old,
        Err(e) => {
            return Decision::deny(
                request,
                DenyReason::BadRequest,
                format!("the stored SeiNode {e}"),
            );
        }
    };
    let new = match tls_secret_name(request.object()) {
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

fn validate_create(request: &NodeRequest, ctx: &AdmissionContext<'_>) -> Decision {
    let name = node_name(request);
    let namespace = request.namespace().to_owned();
    if !name.is_empty()
        && let Err(e) = check_runnable_name(&name)
    {
        return Decision::deny(
            request,
            DenyReason::Invalid,
            format!("SeiNode \"{namespace}/{name}\" could never run: {e}"),
        );
    }
    if let Some(port) = request
        .object()
        .and_then(SeiNodeObject::sidecar_port)
        .and_then(|port| i32::try_from(port).ok())
        && let Err(e) = check_sidecar_port(port)
    {
        return Decision::deny(
            request,
            DenyReason::Invalid,
            format!("SeiNode \"{namespace}/{name}\" could never run: {e}"),
        );
    }
    let secret_name = match tls_secret_name(request.object()) {
        Ok(Some(secret_name)) => secret_name.to_owned(),
        Ok(None) => return Decision::allow(request),
        Err(e) => return Decision::deny(request, DenyReason::Invalid, format!("the SeiNode {e}")),
    };
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
pub fn mutate_seinode(request: &NodeRequest, ctx: &AdmissionContext<'_>) -> Decision {
    // An UPDATE, should a registration send one, is annotated the same way.
    if !matches!(request.operation, Operation::Create | Operation::Update) {
        return Decision::allow(request);
    }
    let Some(object) = request.object() else {
        return Decision::allow(request);
    };
    // A malformed or TLS-less node gets no annotation; validation reports malformed ones.
    if !matches!(object.tls_secret_name(), Ok(Some(_))) {
        return Decision::allow(request);
    }
    let name = node_name(request);
    let namespace = request.namespace();
    if name.is_empty() {
        return Decision::allow(request);
    }
    let required = required_dns_names(&name, namespace, ctx.cluster_domain);
    if check_satisfiable(&required).is_err() {
        return Decision::allow(request);
    }
    let expected = required.join(",");
    let annotations = object.meta().and_then(|meta| meta.annotations.value());
    let current = annotations.and_then(|a| a.required_dns_names.value());
    if current == Some(&expected) {
        return Decision::allow(request);
    }
    let value = Value::String(expected);
    let operation = match annotations {
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
    let mut response = AdmissionResponse::allow(&request.uid);
    response.patch = Some(json_patch::Patch(vec![PatchOperation::Add(operation)]));
    Decision {
        response,
        outcome: Outcome::Patched,
    }
}

// === Secret guard ===

/// UPDATE/DELETE of a TLS Secret: warn (or deny) when the change breaks SeiNodes using it.
pub fn guard_secret(request: &SecretRequest, ctx: &AdmissionContext<'_>) -> Decision {
    if !matches!(request.operation, Operation::Update | Operation::Delete) {
        return Decision::allow(request);
    }
    let namespace = request.namespace().to_owned();
    let name = secret_name(request);
    let nodes = ctx.nodes.using_secret(&namespace, &name);
    if nodes.is_empty() {
        return Decision::allow(request);
    }

    let old = match request.old_object().map(SecretObject::to_secret) {
        Some(Ok(secret)) => Some(ctx.secrets.inspect(&secret)),
        _ => None,
    };
    let new = match (&request.operation, request.object()) {
        (Operation::Delete, _) | (_, None) => None,
        (_, Some(object)) => match object.to_secret() {
            Ok(secret) => Some(std::sync::Arc::new(inspect_tls_secret(&secret))),
            Err(problem) => {
                return Decision::deny(
                    request,
                    DenyReason::Invalid,
                    format!("the Secret is not a valid Secret object: {problem}"),
                );
            }
        },
    };

    let mut failing: Vec<(String, SecretVerdict)> = Vec::new();
    let mut newly_broken = 0;
    for node_name in &nodes {
        let required = required_dns_names(node_name, &namespace, ctx.cluster_domain);
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
        failing.push((node_name.clone(), after));
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

/// `spec.sidecar.tls.secretName` of an object (see [`SeiNodeObject::tls_secret_name`]).
fn tls_secret_name(object: Option<&SeiNodeObject>) -> Result<Option<&str>, &'static str> {
    object.map_or(Ok(None), SeiNodeObject::tls_secret_name)
}

/// The SeiNode's name: the request's, else the object's.
fn node_name(request: &NodeRequest) -> String {
    match request.name.value() {
        Some(name) if !name.is_empty() => name.clone(),
        _ => request
            .object()
            .and_then(SeiNodeObject::name)
            .unwrap_or_default()
            .to_owned(),
    }
}

/// The Secret's name: the request's, else the object's (or, for a DELETE, the old object's).
fn secret_name(request: &SecretRequest) -> String {
    let of = |object: Option<&SecretObject>| {
        object
            .and_then(|o| o.metadata.value())
            .and_then(|meta| meta.name.value().cloned())
    };
    match request.name.value() {
        Some(name) if !name.is_empty() => name.clone(),
        _ => of(request.object())
            .or_else(|| of(request.old_object()))
            .unwrap_or_default(),
    }
}

fn node_ref(request: &NodeRequest) -> String {
    format!("\"{}/{}\"", request.namespace(), node_name(request))
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
