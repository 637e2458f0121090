//! Test and `local` fixtures: a throwaway certificate authority, the certificates it issues,
//! the `kubernetes.io/tls` Secrets that hold them, and an API client for code that must hold one
//! where no API server is (`no_api_server`). Never part of the shipped binary.
//! Production certificates come from the cluster (cert-manager or the platform's own PKI).

use std::net::IpAddr;

use rcgen::{
    BasicConstraints, CertificateParams, CertifiedIssuer, DnType, ExtendedKeyUsagePurpose, IsCa,
    KeyPair, KeyUsagePurpose, SanType,
};
use thiserror::Error;

#[derive(Debug, Error)]
#[error("failed to generate a certificate for {subject}")]
pub struct PkiError {
    subject: String,
    #[source]
    source: rcgen::Error,
}

impl PkiError {
    pub fn new(subject: &str, source: rcgen::Error) -> Self {
        Self {
            subject: subject.to_owned(),
            source,
        }
    }
}

/// Lifetime of issued leaf certificates, like a typical cert-manager Certificate.
const LEAF_VALIDITY_DAYS: i64 = 90;
/// Lifetime of the CA.
const CA_VALIDITY_DAYS: i64 = 3650;

/// A certificate and its private key, PEM-encoded.
#[derive(Clone)]
pub struct Issued {
    pub cert_pem: String,
    pub key_pem: String,
}

impl std::fmt::Debug for Issued {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Issued")
            .field("cert_pem", &self.cert_pem)
            .finish_non_exhaustive()
    }
}

/// What a leaf certificate is for.
#[derive(Debug, Clone, Default)]
pub struct LeafSpec<'a> {
    pub common_name: &'a str,
    pub organizations: &'a [&'a str],
    pub dns_names: &'a [&'a str],
    pub ip_addresses: &'a [IpAddr],
    pub server: bool,
    pub client: bool,
    /// Days from now to notAfter; `None` is the default lifetime. Two leaves issued within the
    /// same second share notAfter unless given different lifetimes.
    pub valid_days: Option<i64>,
}

/// A self-signed CA (ECDSA P-256) that issues leaf certificates.
pub struct CertificateAuthority {
    issuer: CertifiedIssuer<'static, KeyPair>,
}

impl CertificateAuthority {
    pub fn new(common_name: &str) -> Result<Self, PkiError> {
        let err = |source| PkiError {
            subject: common_name.to_owned(),
            source,
        };
        let key = KeyPair::generate().map_err(err)?;
        let mut params = CertificateParams::new(Vec::<String>::new()).map_err(err)?;
        params
            .distinguished_name
            .push(DnType::CommonName, common_name);
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        let now = time::OffsetDateTime::now_utc();
        params.not_before = now - time::Duration::hours(1);
        params.not_after = now + time::Duration::days(CA_VALIDITY_DAYS);
        params.key_usages = vec![
            KeyUsagePurpose::KeyCertSign,
            KeyUsagePurpose::CrlSign,
            KeyUsagePurpose::DigitalSignature,
        ];
        let issuer = CertifiedIssuer::self_signed(params, key).map_err(err)?;
        Ok(Self { issuer })
    }

    /// The CA certificate, PEM: what clients trust (the webhooks' `caBundle`).
    pub fn cert_pem(&self) -> String {
        self.issuer.pem()
    }

    pub fn issue(&self, spec: &LeafSpec<'_>) -> Result<Issued, PkiError> {
        let err = |source| PkiError {
            subject: spec.common_name.to_owned(),
            source,
        };
        let key = KeyPair::generate().map_err(err)?;
        let mut params = CertificateParams::new(Vec::<String>::new()).map_err(err)?;
        params
            .distinguished_name
            .push(DnType::CommonName, spec.common_name);
        for org in spec.organizations {
            params
                .distinguished_name
                .push(DnType::OrganizationName, *org);
        }
        for name in spec.dns_names {
            let name = (*name).try_into().map_err(err)?;
            params.subject_alt_names.push(SanType::DnsName(name));
        }
        for ip in spec.ip_addresses {
            params.subject_alt_names.push(SanType::IpAddress(*ip));
        }
        // Realistic lifetimes (rcgen's default runs to the year 4096).
        let now = time::OffsetDateTime::now_utc();
        params.not_before = now - time::Duration::hours(1);
        params.not_after =
            now + time::Duration::days(spec.valid_days.unwrap_or(LEAF_VALIDITY_DAYS));
        params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
        if spec.server {
            params
                .extended_key_usages
                .push(ExtendedKeyUsagePurpose::ServerAuth);
        }
        if spec.client {
            params
                .extended_key_usages
                .push(ExtendedKeyUsagePurpose::ClientAuth);
        }
        let cert = params.signed_by(&key, &self.issuer).map_err(err)?;
        Ok(Issued {
            cert_pem: cert.pem(),
            key_pem: key.serialize_pem(),
        })
    }
}

/// An API client for code that must hold one where no API server serves it (tests, benchmarks,
/// fuzz targets): every request fails at once with "no API server", and nothing is dialled.
/// Like any `kube::Client`, it is made inside a Tokio runtime (its request queue is a task).
pub fn no_api_server() -> kube::Client {
    let service = tower::service_fn(|_: http::Request<kube::client::Body>| async {
        Err::<http::Response<kube::client::Body>, _>(NoApiServer)
    });
    kube::Client::new(service, "default")
}

/// The error of every request through [`no_api_server`].
#[derive(Debug, Error)]
#[error("no API server: this client is not connected to one")]
pub struct NoApiServer;

/// What an API server answers a GET of a Secret with, for fake API servers in unit tests: the
/// Secret (200), or a `NotFound` Status (404) when there is none. Status code and JSON body.
pub fn get_answer(secret: Option<&k8s_openapi::api::core::v1::Secret>) -> (u16, Vec<u8>) {
    let (code, body) = match secret {
        Some(secret) => (200, serde_json::to_value(secret).unwrap_or_default()),
        None => (
            404,
            serde_json::json!({
                "kind": "Status", "apiVersion": "v1", "status": "Failure",
                "reason": "NotFound", "code": 404, "message": "not found",
            }),
        ),
    };
    (code, body.to_string().into_bytes())
}

/// A `kubernetes.io/tls` Secret holding `cert_pem` and `key_pem`, and `ca_pem` as `ca.crt`.
pub fn tls_secret(
    namespace: &str,
    name: &str,
    cert_pem: &str,
    key_pem: &str,
    ca_pem: Option<&str>,
) -> k8s_openapi::api::core::v1::Secret {
    use k8s_openapi::ByteString;
    let mut data = std::collections::BTreeMap::from([
        (
            "tls.crt".to_owned(),
            ByteString(cert_pem.as_bytes().to_vec()),
        ),
        (
            "tls.key".to_owned(),
            ByteString(key_pem.as_bytes().to_vec()),
        ),
    ]);
    if let Some(ca) = ca_pem {
        data.insert("ca.crt".to_owned(), ByteString(ca.as_bytes().to_vec()));
    }
    k8s_openapi::api::core::v1::Secret {
        metadata: k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta {
            name: Some(name.to_owned()),
            namespace: Some(namespace.to_owned()),
            ..Default::default()
        },
        type_: Some(seinode_tls_crds::validation::TLS_SECRET_TYPE.to_owned()),
        data: Some(data),
        ..Default::default()
    }
}
