//! Whether a `kubernetes.io/tls` Secret satisfies a node's sidecar TLS contract.
//!
//! Validation is split in two pure steps so callers can cache the expensive one:
//!
//! 1. [`inspect_tls_secret`] parses the Secret (type, PEM, X.509, key/certificate match) into
//!    [`InspectedSecret`]. It depends only on the Secret's content, so the webhook keeps one per
//!    Secret resourceVersion. No private key material survives it.
//! 2. [`judge`] applies the checks that depend on the node and the clock (validity window, SAN
//!    coverage) and produces the [`SecretVerdict`].
//!
//! [`validate_tls_secret`] does both; it is the one function the CLI, the webhook and the
//! controller agree on. Each failure maps to exactly one [`Reason`]; the first failing check in
//! DESIGN.md's order decides.

use std::fmt;

use jiff::Timestamp;
use k8s_openapi::api::core::v1::Secret;
use rustls::pki_types::{
    CertificateDer, PrivateKeyDer, PrivatePkcs1KeyDer, PrivatePkcs8KeyDer, PrivateSec1KeyDer,
    UnixTime,
};
use serde::{Deserialize, Serialize};
use x509_parser::certificate::X509Certificate;
use x509_parser::extensions::GeneralName;
use x509_parser::prelude::FromDer;

use crate::contract::san_covers;

/// The Secret type the contract requires.
pub const TLS_SECRET_TYPE: &str = "kubernetes.io/tls";
/// Most PEM blocks accepted in `tls.crt` (leaf plus intermediates); bounds the parsing work.
pub const MAX_CERTIFICATE_BLOCKS: usize = 16;
/// Most PEM blocks read from `ca.crt` (a bundle of a few CAs; a public-CA bundle has ~150).
pub const MAX_CA_BLOCKS: usize = 256;
/// Most SAN names quoted in a message, so a certificate with thousands cannot flood a condition.
const MAX_NAMES_IN_MESSAGE: usize = 16;
/// Most characters of one SAN quoted in a message (a DNS name has at most 253).
const MAX_NAME_IN_MESSAGE: usize = 253;

/// The condition reason of a verdict. `Ready` is the only one that means the Secret is usable.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum Reason {
    #[serde(rename = "TLSSecretReady")]
    Ready,
    #[serde(rename = "TLSSecretNotFound")]
    NotFound,
    #[serde(rename = "TLSSecretUnavailable")]
    Unavailable,
    #[serde(rename = "TLSSecretMalformed")]
    Malformed,
    #[serde(rename = "TLSSecretKeyMismatch")]
    KeyMismatch,
    #[serde(rename = "TLSSecretNotYetValid")]
    NotYetValid,
    #[serde(rename = "TLSSecretExpired")]
    Expired,
    #[serde(rename = "TLSSecretSANsMismatch")]
    SansMismatch,
}

impl Reason {
    /// Every reason, in check order (ready last).
    pub const ALL: [Reason; 8] = [
        Reason::NotFound,
        Reason::Unavailable,
        Reason::Malformed,
        Reason::KeyMismatch,
        Reason::NotYetValid,
        Reason::Expired,
        Reason::SansMismatch,
        Reason::Ready,
    ];

    /// The reason as it appears in conditions, events and metrics.
    pub fn as_str(self) -> &'static str {
        match self {
            Reason::Ready => "TLSSecretReady",
            Reason::NotFound => "TLSSecretNotFound",
            Reason::Unavailable => "TLSSecretUnavailable",
            Reason::Malformed => "TLSSecretMalformed",
            Reason::KeyMismatch => "TLSSecretKeyMismatch",
            Reason::NotYetValid => "TLSSecretNotYetValid",
            Reason::Expired => "TLSSecretExpired",
            Reason::SansMismatch => "TLSSecretSANsMismatch",
        }
    }

    /// Whether the Secret meets the contract.
    pub fn is_ready(self) -> bool {
        self == Reason::Ready
    }

    /// Whether the failure can go away without anyone changing the Secret (a retry may help).
    pub fn is_transient(self) -> bool {
        self == Reason::Unavailable
    }
}

impl fmt::Display for Reason {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// The outcome of validating a Secret against a node's contract.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SecretVerdict {
    pub reason: Reason,
    /// What is wrong and what to do about it; names the Secret, never prints key material.
    pub message: String,
    /// The leaf certificate's notAfter, when the Secret passed the content checks.
    pub not_after: Option<Timestamp>,
    /// Required names no DNS SAN of the leaf covers (empty unless `SansMismatch`).
    pub missing_dns_names: Vec<String>,
}

impl SecretVerdict {
    pub fn is_ready(&self) -> bool {
        self.reason.is_ready()
    }
}

/// What parsing a Secret's content established. Holds no private key material.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum InspectedSecret {
    /// The Secret is well formed and its key matches its leaf certificate.
    Usable(LeafCertificate),
    /// The Secret fails a content check; `reason` is `Malformed` or `KeyMismatch`.
    Defective { reason: Reason, detail: String },
}

/// What the time- and node-dependent checks need to know about the leaf certificate.
#[derive(Clone, PartialEq, Eq)]
pub struct LeafCertificate {
    pub not_before: Timestamp,
    pub not_after: Timestamp,
    /// The DNS names of the subjectAltName extension, as written in the certificate.
    pub dns_names: Vec<String>,
    /// The leaf in DER: what the sidecar's proxy must serve (pinned when there is no CA).
    pub der: Vec<u8>,
    /// The Secret's `ca.crt` (PEM), when present: the trust anchor for reaching the sidecar.
    pub ca_crt: Option<Vec<u8>>,
    /// With `ca.crt`: the validity of every other certificate on the verified path (the
    /// intermediates of `tls.crt` it used, then the CA of `ca.crt`). Clients check each at the
    /// time they connect, so [`judge`] does too.
    pub issuers: Vec<IssuerValidity>,
}

/// When one certificate of the path above the leaf is valid.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct IssuerValidity {
    /// Which certificate, for messages: `intermediate "CN" in tls.crt`, `CA "CN" in ca.crt`.
    pub name: String,
    pub not_before: Timestamp,
    pub not_after: Timestamp,
}

impl LeafCertificate {
    /// The first instant at which the leaf and every issuer are valid.
    pub fn valid_from(&self) -> Timestamp {
        self.issuers
            .iter()
            .map(|i| i.not_before)
            .fold(self.not_before, Timestamp::max)
    }

    /// The last instant at which the leaf and every issuer are valid.
    pub fn valid_until(&self) -> Timestamp {
        self.issuers
            .iter()
            .map(|i| i.not_after)
            .fold(self.not_after, Timestamp::min)
    }
}

impl fmt::Debug for LeafCertificate {
    // Sizes, not bytes: the certificate is public, but byte dumps make logs unreadable.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("LeafCertificate")
            .field("not_before", &self.not_before)
            .field("not_after", &self.not_after)
            .field("dns_names", &self.dns_names)
            .field("der_len", &self.der.len())
            .field("ca_crt_len", &self.ca_crt.as_ref().map(Vec::len))
            .field("issuers", &self.issuers)
            .finish()
    }
}

/// The Secret as a cache or an API call found it.
#[derive(Debug, Clone, Copy)]
pub enum SecretLookup<'a> {
    Found(&'a InspectedSecret),
    NotFound,
    /// The Secret could not be read (API error, cache not synced); carries a short cause.
    Unavailable(&'a str),
}

/// Inspects a Secret and judges it against `required_dns_names` at `now`.
///
/// `secret` is `None` when the Secret does not exist. `namespace` and `name` identify it in
/// messages.
pub fn validate_tls_secret(
    namespace: &str,
    name: &str,
    secret: Option<&Secret>,
    required_dns_names: &[String],
    now: Timestamp,
) -> SecretVerdict {
    match secret {
        Some(secret) => {
            let inspected = inspect_tls_secret(secret);
            judge(
                namespace,
                name,
                SecretLookup::Found(&inspected),
                required_dns_names,
                now,
            )
        }
        None => judge(
            namespace,
            name,
            SecretLookup::NotFound,
            required_dns_names,
            now,
        ),
    }
}

/// Applies the node- and time-dependent checks to an inspected Secret.
pub fn judge(
    namespace: &str,
    name: &str,
    lookup: SecretLookup<'_>,
    required_dns_names: &[String],
    now: Timestamp,
) -> SecretVerdict {
    let secret = format!("Secret \"{namespace}/{name}\"");
    let required = required_dns_names.join(", ");
    let verdict = |reason: Reason, message: String, not_after: Option<Timestamp>| SecretVerdict {
        reason,
        message,
        not_after,
        missing_dns_names: Vec::new(),
    };
    let leaf = match lookup {
        SecretLookup::NotFound => {
            return verdict(
                Reason::NotFound,
                format!(
                    "{secret} not found: create a kubernetes.io/tls Secret named \"{name}\" in \
                     namespace \"{namespace}\" whose certificate carries the DNS names {required}"
                ),
                None,
            );
        }
        SecretLookup::Unavailable(cause) => {
            return verdict(
                Reason::Unavailable,
                format!("{secret} could not be read ({cause}); it will be checked again"),
                None,
            );
        }
        SecretLookup::Found(InspectedSecret::Defective { reason, detail }) => {
            let hint = match reason {
                Reason::KeyMismatch => {
                    "store the private key the certificate was issued for, or re-issue the \
                     certificate for this key"
                }
                _ => {
                    "provide a Secret of type kubernetes.io/tls with the PEM certificate chain \
                     (leaf first) in tls.crt and its unencrypted PEM private key in tls.key"
                }
            };
            return verdict(*reason, format!("{secret} {detail}; {hint}"), None);
        }
        SecretLookup::Found(InspectedSecret::Usable(leaf)) => leaf,
    };

    // The earliest expiry on the path: when the verdict must be looked at again.
    let not_after = Some(leaf.valid_until());
    if now < leaf.not_before {
        return verdict(
            Reason::NotYetValid,
            format!(
                "{secret} holds a certificate that is not valid before {} (now {now}); check the \
                 issuer's clock, or wait until then",
                leaf.not_before
            ),
            not_after,
        );
    }
    // notAfter is the last valid second, as TLS clients read it.
    if now > leaf.not_after {
        return verdict(
            Reason::Expired,
            format!(
                "{secret} holds a certificate that expired at {}; renew it (with cert-manager, \
                 check the Certificate's status and its issuer)",
                leaf.not_after
            ),
            not_after,
        );
    }

    // Every certificate on the path must be valid now too, as clients check it (Go refuses an
    // expired intermediate or CA; a certificate not valid yet likewise).
    for issuer in &leaf.issuers {
        if now < issuer.not_before {
            return verdict(
                Reason::NotYetValid,
                format!(
                    "{secret} chains through the {} that is not valid before {} (now {now}); \
                     check the issuer's clock, or wait until then",
                    issuer.name, issuer.not_before
                ),
                not_after,
            );
        }
        if now > issuer.not_after {
            return verdict(
                Reason::Expired,
                format!(
                    "{secret} chains through the {} that expired at {}; re-issue the certificate \
                     from a valid issuer, and put the issuer's current certificates in tls.crt \
                     and ca.crt",
                    issuer.name, issuer.not_after
                ),
                not_after,
            );
        }
    }

    let missing: Vec<String> = required_dns_names
        .iter()
        .filter(|host| !leaf.dns_names.iter().any(|san| san_covers(san, host)))
        .cloned()
        .collect();
    if !missing.is_empty() {
        return SecretVerdict {
            reason: Reason::SansMismatch,
            message: format!(
                "{secret} holds a certificate whose DNS SANs do not cover {} (it carries {}); \
                 re-issue it with the DNS names {required} (a wildcard covers one label only; the \
                 common name and IP SANs do not count)",
                missing.join(", "),
                quote_names(&leaf.dns_names),
            ),
            not_after,
            missing_dns_names: missing,
        };
    }

    verdict(
        Reason::Ready,
        format!(
            "{secret} meets the contract: its certificate covers {required} and is valid until {}",
            leaf.valid_until()
        ),
        not_after,
    )
}

fn quote_names(names: &[String]) -> String {
    if names.is_empty() {
        return "no DNS names".to_owned();
    }
    // A name is quoted up to MAX_NAME_IN_MESSAGE characters: a certificate may carry any
    // string as a DNS SAN, and a condition message is read by people.
    let shown = names
        .iter()
        .take(MAX_NAMES_IN_MESSAGE)
        .map(|name| crate::truncated(name, MAX_NAME_IN_MESSAGE).into_owned())
        .collect::<Vec<_>>();
    match names.len() - shown.len() {
        0 => shown.join(", "),
        more => format!("{} and {more} more", shown.join(", ")),
    }
}

// === Inspection ===

/// Parses a Secret's content and checks everything that does not depend on the node or time.
pub fn inspect_tls_secret(secret: &Secret) -> InspectedSecret {
    match inspect(secret) {
        Ok(leaf) => InspectedSecret::Usable(leaf),
        Err((reason, detail)) => InspectedSecret::Defective { reason, detail },
    }
}

type Defect = (Reason, String);

fn malformed(detail: impl Into<String>) -> Defect {
    (Reason::Malformed, detail.into())
}

fn inspect(secret: &Secret) -> Result<LeafCertificate, Defect> {
    let secret_type = secret.type_.as_deref().unwrap_or("Opaque");
    if secret_type != TLS_SECRET_TYPE {
        return Err(malformed(format!(
            "has type \"{secret_type}\", not \"{TLS_SECRET_TYPE}\""
        )));
    }
    let cert_pem = data_field(secret, "tls.crt")?;
    let key_pem = data_field(secret, "tls.key")?;

    let chain = parse_certificate_blocks(cert_pem)?;
    let key = parse_private_key(key_pem)?;

    let (_, leaf) = X509Certificate::from_der(&chain[0])
        .map_err(|e| malformed(format!("has a leaf certificate that does not parse: {e}")))?;
    for (index, der) in chain.iter().enumerate().skip(1) {
        X509Certificate::from_der(der).map_err(|e| {
            malformed(format!(
                "has a certificate in tls.crt (block {}) that does not parse as X.509: {e}",
                index + 1
            ))
        })?;
    }

    match leaf.basic_constraints() {
        Ok(Some(constraints)) if constraints.value.ca => {
            return Err(malformed(
                "has a CA certificate as its leaf (basicConstraints CA:TRUE); TLS clients refuse \
                 a CA certificate as a server certificate: issue an end-entity certificate",
            ));
        }
        Ok(_) => {}
        Err(e) => {
            return Err(malformed(format!(
                "has a leaf certificate with an invalid basicConstraints extension: {e}"
            )));
        }
    }
    match leaf.extended_key_usage() {
        // anyExtendedKeyUsage alone does not do: Go and rustls/webpki require serverAuth itself.
        Ok(Some(eku)) if !eku.value.server_auth => {
            return Err(malformed(
                "has a leaf certificate whose extendedKeyUsage does not include serverAuth \
                 (anyExtendedKeyUsage alone is not enough), so TLS clients will refuse it as a \
                 server certificate",
            ));
        }
        Ok(_) => {}
        Err(e) => {
            return Err(malformed(format!(
                "has a leaf certificate with an invalid extendedKeyUsage extension: {e}"
            )));
        }
    }

    let dns_names = match leaf.subject_alternative_name() {
        Ok(Some(san)) => san
            .value
            .general_names
            .iter()
            .filter_map(|name| match name {
                GeneralName::DNSName(dns) => Some((*dns).to_owned()),
                _ => None,
            })
            .collect(),
        Ok(None) => Vec::new(),
        Err(e) => {
            return Err(malformed(format!(
                "has a leaf certificate with an invalid subjectAltName extension: {e}"
            )));
        }
    };

    check_key_matches(&key, leaf.public_key().raw)?;

    let validity = leaf.validity();
    let not_before = timestamp(validity.not_before.timestamp())?;
    let not_after = timestamp(validity.not_after.timestamp())?;
    let ca_crt = secret
        .data
        .as_ref()
        .and_then(|data| data.get("ca.crt"))
        .filter(|ca| !ca.0.is_empty())
        .map(|ca| ca.0.clone());
    let issuers = match &ca_crt {
        Some(ca_pem) => check_ca_issues_chain(ca_pem, &chain)?,
        None => Vec::new(),
    };
    Ok(LeafCertificate {
        not_before,
        not_after,
        dns_names,
        der: chain[0].clone(),
        ca_crt,
        issuers,
    })
}

/// A client that trusts `ca.crt` (the controller's probe does) must build the leaf's chain to it,
/// through the intermediates of `tls.crt`, as rustls/webpki does. Verified at the first instant
/// at which the leaf and its intermediates are all valid, so every signature is checked (webpki
/// checks a certificate's time before its signature); when the path is valid in time is judged
/// against the clock by [`judge`], from the validity this returns for each certificate of the
/// path above the leaf, the CA included (webpki does not check a trust anchor's time; Go does).
fn check_ca_issues_chain(ca_pem: &[u8], chain: &[Vec<u8>]) -> Result<Vec<IssuerValidity>, Defect> {
    let blocks = count_pem_blocks(ca_pem);
    if blocks > MAX_CA_BLOCKS {
        return Err(malformed(format!(
            "has {blocks} PEM blocks in ca.crt, more than the {MAX_CA_BLOCKS} allowed"
        )));
    }
    let pems = pem::parse_many(ca_pem).map_err(|e| {
        malformed(format!(
            "has a ca.crt that is not valid PEM: {}",
            pem_error(&e)
        ))
    })?;
    let ders: Vec<CertificateDer<'_>> = pems
        .iter()
        .filter(|block| block.tag() == "CERTIFICATE")
        .map(|block| CertificateDer::from(block.contents()))
        .collect();
    if ders.is_empty() {
        return Err(malformed("has a ca.crt with no PEM CERTIFICATE block"));
    }
    let mut anchors = Vec::with_capacity(ders.len());
    for (index, der) in ders.iter().enumerate() {
        let anchor = webpki::anchor_from_trusted_cert(der).map_err(|e| {
            malformed(format!(
                "has a certificate in ca.crt (block {}) that TLS clients cannot use as a trust \
                 anchor: {e}",
                index + 1
            ))
        })?;
        anchors.push(anchor);
    }
    let at = common_validity(chain)?;
    let leaf = CertificateDer::from(chain[0].as_slice());
    let leaf = webpki::EndEntityCert::try_from(&leaf).map_err(|e| {
        malformed(format!(
            "has a leaf certificate TLS clients cannot parse: {e}"
        ))
    })?;
    let intermediates: Vec<CertificateDer<'_>> = chain[1..]
        .iter()
        .map(|der| CertificateDer::from(der.as_slice()))
        .collect();
    let at = UnixTime::since_unix_epoch(std::time::Duration::from_secs(
        u64::try_from(at).unwrap_or(0),
    ));
    let algorithms = rustls::crypto::ring::default_provider()
        .signature_verification_algorithms
        .all;
    match leaf.verify_for_usage(
        algorithms,
        &anchors,
        &intermediates,
        at,
        webpki::KeyUsage::server_auth(),
        None,
        None,
    ) {
        Ok(path) => {
            let mut issuers = Vec::new();
            for der in path.intermediate_certificates() {
                issuers.push(issuer_validity(
                    der.der().as_ref(),
                    "intermediate",
                    "tls.crt",
                )?);
            }
            let anchor = path.anchor();
            // The CA of ca.crt the path ends at: the certificate whose subject and key are the
            // anchor's.
            let ca = ders.iter().find(|der| {
                webpki::anchor_from_trusted_cert(der).is_ok_and(|a| {
                    a.subject.as_ref() == anchor.subject.as_ref()
                        && a.subject_public_key_info.as_ref()
                            == anchor.subject_public_key_info.as_ref()
                })
            });
            if let Some(ca) = ca {
                issuers.push(issuer_validity(ca.as_ref(), "CA", "ca.crt")?);
            }
            Ok(issuers)
        }
        // No CA of that name, or one of that name whose key did not sign the leaf.
        Err(webpki::Error::UnknownIssuer | webpki::Error::InvalidSignatureForPublicKey) => {
            Err(malformed(
                "has a ca.crt that did not issue the leaf certificate (nor an intermediate in \
             tls.crt), so clients that trust ca.crt refuse the sidecar: put the issuing CA in \
             ca.crt, the intermediates after the leaf in tls.crt, or leave ca.crt out",
            ))
        }
        Err(e) => Err(malformed(format!(
            "has a leaf certificate whose chain does not verify against its ca.crt: {e}"
        ))),
    }
}

/// Most characters of a certificate's name quoted in a message.
const MAX_CERTIFICATE_NAME: usize = 64;

/// The first second at which every certificate of `chain` (leaf first, then intermediates) is
/// valid; a chain that is never valid at once is malformed.
fn common_validity(chain: &[Vec<u8>]) -> Result<i64, Defect> {
    let mut latest_start: Option<(i64, String)> = None;
    let mut earliest_end: Option<(i64, String)> = None;
    for (index, der) in chain.iter().enumerate() {
        let (_, cert) = X509Certificate::from_der(der).map_err(|e| {
            malformed(format!(
                "has a certificate in tls.crt that does not parse: {e}"
            ))
        })?;
        let what = if index == 0 {
            "the leaf".to_owned()
        } else {
            format!("intermediate {}", certificate_name(&cert))
        };
        let validity = cert.validity();
        let (start, end) = (
            validity.not_before.timestamp(),
            validity.not_after.timestamp(),
        );
        if latest_start.as_ref().is_none_or(|(at, _)| start > *at) {
            latest_start = Some((start, what.clone()));
        }
        if earliest_end.as_ref().is_none_or(|(at, _)| end < *at) {
            earliest_end = Some((end, what));
        }
    }
    match (latest_start, earliest_end) {
        (Some((start, starts)), Some((end, ends))) if start > end => Err(malformed(format!(
            "has a tls.crt whose certificates are never valid at the same time: {ends} \
             expires at {} before {starts} becomes valid at {}; re-issue the chain",
            time_text(end),
            time_text(start)
        ))),
        (Some((start, _)), _) => Ok(start),
        _ => Err(malformed("has no certificate in tls.crt")),
    }
}

/// A certificate's subject common name (else its whole subject), quoted and bounded.
fn certificate_name(cert: &X509Certificate<'_>) -> String {
    let subject = cert.subject();
    let name = subject
        .iter_common_name()
        .next()
        .and_then(|cn| cn.as_str().ok())
        .map(str::to_owned)
        .unwrap_or_else(|| subject.to_string());
    let bounded: String = name.chars().take(MAX_CERTIFICATE_NAME).collect();
    if bounded.len() < name.len() {
        format!("{bounded:?}…")
    } else {
        format!("{bounded:?}")
    }
}

fn time_text(seconds: i64) -> String {
    Timestamp::from_second(seconds).map_or_else(|_| seconds.to_string(), |t| t.to_string())
}

/// The validity of an issuer on the path: `role` and where it came from name it.
fn issuer_validity(der: &[u8], role: &str, from: &str) -> Result<IssuerValidity, Defect> {
    let (_, cert) = X509Certificate::from_der(der).map_err(|e| {
        malformed(format!(
            "has a certificate in {from} that does not parse: {e}"
        ))
    })?;
    let validity = cert.validity();
    Ok(IssuerValidity {
        name: format!("{role} {} in {from}", certificate_name(&cert)),
        not_before: timestamp(validity.not_before.timestamp())?,
        not_after: timestamp(validity.not_after.timestamp())?,
    })
}

fn data_field<'a>(secret: &'a Secret, key: &str) -> Result<&'a [u8], Defect> {
    match secret.data.as_ref().and_then(|data| data.get(key)) {
        Some(value) if !value.0.is_empty() => Ok(&value.0),
        Some(_) => Err(malformed(format!("has an empty {key}"))),
        None => Err(malformed(format!("has no {key}"))),
    }
}

/// The DER of every block of `tls.crt`, leaf first. Every block must be a CERTIFICATE.
fn parse_certificate_blocks(pem_bytes: &[u8]) -> Result<Vec<Vec<u8>>, Defect> {
    // Count before parsing so an oversized bundle costs a scan, not a decode.
    let blocks = count_pem_blocks(pem_bytes);
    if blocks > MAX_CERTIFICATE_BLOCKS {
        return Err(malformed(format!(
            "has {blocks} PEM blocks in tls.crt, more than the {MAX_CERTIFICATE_BLOCKS} allowed \
             (leaf plus intermediates; leave root CAs out)"
        )));
    }
    let pems = pem::parse_many(pem_bytes).map_err(|e| {
        malformed(format!(
            "has a tls.crt that is not valid PEM: {}",
            pem_error(&e)
        ))
    })?;
    if pems.is_empty() {
        return Err(malformed("has a tls.crt with no PEM CERTIFICATE block"));
    }
    pems.into_iter()
        .enumerate()
        .map(|(index, block)| {
            if block.tag() == "CERTIFICATE" {
                Ok(block.into_contents())
            } else {
                let hint = if block.tag().contains("PRIVATE KEY") {
                    " (a private key belongs in tls.key only)"
                } else {
                    ""
                };
                Err(malformed(format!(
                    "has a \"{}\" block in tls.crt (block {}), where only CERTIFICATE blocks are \
                     allowed{hint}",
                    block.tag(),
                    index + 1
                )))
            }
        })
        .collect()
}

/// What is wrong with a PEM file, without quoting it: `pem`'s own messages can quote a line of
/// the input (a blank line inside a key block makes its first base64 line an "invalid header").
fn pem_error(error: &pem::PemError) -> &'static str {
    match error {
        pem::PemError::InvalidHeader(_) => {
            "a block has a blank line inside it, or a malformed header"
        }
        pem::PemError::MismatchedTags(..) => "a BEGIN line and its END line name different blocks",
        pem::PemError::InvalidData(_) => "a block's body is not valid base64",
        pem::PemError::NotUtf8(_) => "it is not UTF-8 text",
        _ => "a block is not properly framed by its BEGIN and END lines",
    }
}

fn count_pem_blocks(bytes: &[u8]) -> usize {
    const BEGIN: &[u8] = b"-----BEGIN ";
    bytes.windows(BEGIN.len()).filter(|w| *w == BEGIN).count()
}

/// The one private key in `tls.key`: PKCS#8, PKCS#1 RSA or SEC1 EC, unencrypted.
fn parse_private_key(pem_bytes: &[u8]) -> Result<PrivateKeyDer<'static>, Defect> {
    if count_pem_blocks(pem_bytes) > MAX_CERTIFICATE_BLOCKS {
        return Err(malformed(
            "has too many PEM blocks in tls.key; it must hold one private key",
        ));
    }
    let pems = pem::parse_many(pem_bytes).map_err(|e| {
        malformed(format!(
            "has a tls.key that is not valid PEM: {}",
            pem_error(&e)
        ))
    })?;
    // `openssl ecparam -genkey` writes the curve parameters before the key; they carry nothing
    // secret and TLS stacks skip them, so they are tolerated.
    let keys: Vec<pem::Pem> = pems
        .into_iter()
        .filter(|p| p.tag() != "EC PARAMETERS")
        .collect();
    let block = match keys.as_slice() {
        [block] => block,
        [] => return Err(malformed("has a tls.key with no PEM private key block")),
        _ => {
            return Err(malformed(format!(
                "has {} PEM blocks in tls.key, where exactly one private key is expected",
                keys.len()
            )));
        }
    };
    let encrypted_header = block
        .headers()
        .get("Proc-Type")
        .is_some_and(|v| v.contains("ENCRYPTED"));
    if block.tag() == "ENCRYPTED PRIVATE KEY" || encrypted_header {
        return Err(malformed(
            "has an encrypted private key in tls.key; TLS servers cannot use it without the \
             passphrase, so store the key unencrypted",
        ));
    }
    let der = block.contents().to_vec();
    match block.tag() {
        "PRIVATE KEY" => Ok(PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(der))),
        "RSA PRIVATE KEY" => Ok(PrivateKeyDer::Pkcs1(PrivatePkcs1KeyDer::from(der))),
        "EC PRIVATE KEY" => Ok(PrivateKeyDer::Sec1(PrivateSec1KeyDer::from(der))),
        other => Err(malformed(format!(
            "has a \"{other}\" block in tls.key, where a PRIVATE KEY, RSA PRIVATE KEY or EC \
             PRIVATE KEY block is expected"
        ))),
    }
}

/// Loads the key and compares its public half with the leaf's SubjectPublicKeyInfo.
fn check_key_matches(key: &PrivateKeyDer<'_>, leaf_spki: &[u8]) -> Result<(), Defect> {
    let signing_key = rustls::crypto::ring::sign::any_supported_type(key).map_err(|_| {
        // The error never includes key bytes, but it adds nothing a person can act on either.
        malformed(
            "has a private key in tls.key that could not be loaded: it is not a valid RSA \
             (2048 to 4096 bits), ECDSA P-256/P-384 or Ed25519 key",
        )
    })?;
    match signing_key.public_key() {
        Some(spki) if spki.as_ref() == leaf_spki => Ok(()),
        Some(_) => Err((
            Reason::KeyMismatch,
            "has a private key in tls.key that does not match the public key of the leaf \
             certificate in tls.crt"
                .to_owned(),
        )),
        None => Err(malformed(
            "has a private key in tls.key whose public key cannot be derived",
        )),
    }
}

fn timestamp(seconds: i64) -> Result<Timestamp, Defect> {
    Timestamp::from_second(seconds)
        .map_err(|_| malformed("has a leaf certificate with a validity date out of range"))
}

#[cfg(test)]
mod tests;
