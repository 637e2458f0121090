//! Commands for platform engineers that need no cluster: `crd`, `contract`, `check-secret`.
//!
//! `check-secret` calls the same validation function as the webhook and the controller, so a
//! Secret it accepts is one the cluster accepts.

use std::io::{Read, Write};
use std::path::PathBuf;
use std::process::ExitCode;

use jiff::Timestamp;
use k8s_openapi::ByteString;
use k8s_openapi::api::core::v1::Secret;
use seinode_tls_crds::contract::{check_runnable_name, check_satisfiable, required_dns_names};
use seinode_tls_crds::validation::{SecretVerdict, validate_tls_secret};
use serde::Serialize;
use thiserror::Error;

use crate::exit::{EXIT_NOT_READY, EXIT_USAGE, error_chain};

/// Largest manifest read; a Secret is at most 1 MiB in the API server.
const MAX_MANIFEST_BYTES: u64 = 4 << 20;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum OutputFormat {
    Text,
    Json,
    Yaml,
}

/// What `contract` prints.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ContractFormat {
    /// One name per line.
    Text,
    /// `{"requiredDNSNames": [...]}`.
    Json,
    /// The same as YAML.
    Yaml,
    /// A cert-manager Certificate for exactly those names.
    Certificate(CertificateSpec),
}

/// The choices in a cert-manager Certificate that are not the contract's.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CertificateSpec {
    pub issuer: String,
    /// `ClusterIssuer` rather than `Issuer`.
    pub cluster_issuer: bool,
    /// The Secret it writes: the SeiNode's `spec.sidecar.tls.secretName`.
    pub secret_name: String,
    pub duration: Option<std::time::Duration>,
    pub renew_before: Option<std::time::Duration>,
}

/// cert-manager refuses a shorter certificate lifetime.
const MIN_CERTIFICATE_DURATION: std::time::Duration = std::time::Duration::from_secs(3600);

/// Inputs of `check-secret -f`.
#[derive(Debug, Clone)]
pub struct CheckSecretArgs {
    /// Path of the Secret manifest; `-` reads stdin.
    pub file: PathBuf,
    pub check: SecretCheck,
}

/// What a Secret is judged against, and how the verdict is printed: shared by `check-secret -f`
/// and `check-secret NAME`, so both judge alike.
#[derive(Debug, Clone)]
pub struct SecretCheck {
    pub seinode: String,
    pub namespace: String,
    pub cluster_domain: String,
    /// Instant to judge validity at; now when absent.
    pub at: Option<Timestamp>,
    pub output: OutputFormat,
}

/// Why a manifest could not be turned into a Secret.
#[derive(Debug, Error)]
pub enum ManifestError {
    #[error("failed to read {path}")]
    Read {
        path: String,
        #[source]
        source: std::io::Error,
    },
    #[error("{path} is larger than {MAX_MANIFEST_BYTES} bytes; a Secret manifest never is")]
    TooLarge { path: String },
    #[error("{path} is not a YAML or JSON document: {detail}")]
    Parse { path: String, detail: String },
    #[error("{path} holds a {kind}, not a Secret (kind: Secret, apiVersion: v1)")]
    NotASecret { path: String, kind: String },
    #[error("{path} is not a valid Secret manifest: {detail}")]
    Invalid { path: String, detail: String },
}

pub fn print_crd() -> ExitCode {
    match seinode_tls_crds::crd::crd_yaml() {
        Ok(yaml) => write_stdout(&yaml),
        Err(e) => usage_error(&format!("failed to render the CRD: {e}")),
    }
}

pub fn print_contract(
    seinode: &str,
    namespace: &str,
    cluster_domain: &str,
    output: &ContractFormat,
) -> ExitCode {
    if let Err(e) = check_runnable_name(seinode) {
        return usage_error(&format!(
            "SeiNode \"{namespace}/{seinode}\" could never run: {e}"
        ));
    }
    let names = required_dns_names(seinode, namespace, cluster_domain);
    if let Err(e) = check_satisfiable(&names) {
        return usage_error(&format!(
            "SeiNode \"{namespace}/{seinode}\" can never be given a certificate: {e}"
        ));
    }
    let text = match output {
        ContractFormat::Text => names.iter().map(|n| format!("{n}\n")).collect(),
        ContractFormat::Json => json_line(&ContractJson {
            required_dns_names: &names,
        }),
        ContractFormat::Yaml => yaml_document(&ContractJson {
            required_dns_names: &names,
        }),
        ContractFormat::Certificate(spec) => match certificate_yaml(namespace, &names, spec) {
            Ok(yaml) => yaml,
            Err(message) => return usage_error(&message),
        },
    };
    write_stdout(&text)
}

/// A `cert-manager.io/v1` Certificate, named like the Secret it writes, whose `dnsNames` are
/// `names` (the contract) and whose key usages are what kube-rbac-proxy serves with.
pub fn certificate_yaml(
    namespace: &str,
    names: &[String],
    spec: &CertificateSpec,
) -> Result<String, String> {
    if spec.issuer.is_empty() {
        return Err("--issuer names the cert-manager issuer and may not be empty".to_owned());
    }
    if spec.secret_name.is_empty() {
        return Err("--secret-name may not be empty".to_owned());
    }
    if let Some(duration) = spec.duration
        && duration < MIN_CERTIFICATE_DURATION
    {
        return Err(format!(
            "--duration {} is shorter than the 1h cert-manager accepts",
            humantime::format_duration(duration)
        ));
    }
    if let Some(renew_before) = spec.renew_before
        && renew_before
            >= spec
                .duration
                .unwrap_or(std::time::Duration::from_secs(90 * 86_400))
    {
        return Err(format!(
            "--renew-before {} must be shorter than the certificate's lifetime ({})",
            humantime::format_duration(renew_before),
            spec.duration.map_or_else(
                || "90 days, cert-manager's default".to_owned(),
                |d| humantime::format_duration(d).to_string()
            )
        ));
    }
    let mut certificate_spec = serde_json::json!({
        "secretName": spec.secret_name,
        "dnsNames": names,
        "usages": ["digital signature", "server auth"],
        "issuerRef": {
            "group": "cert-manager.io",
            "kind": if spec.cluster_issuer { "ClusterIssuer" } else { "Issuer" },
            "name": spec.issuer,
        },
        // A new key with every renewal: a leaked key ages out with its certificate.
        "privateKey": {"algorithm": "ECDSA", "size": 256, "rotationPolicy": "Always"},
    });
    if let Some(duration) = spec.duration {
        certificate_spec["duration"] = go_duration(duration).into();
    }
    if let Some(renew_before) = spec.renew_before {
        certificate_spec["renewBefore"] = go_duration(renew_before).into();
    }
    let certificate = serde_json::json!({
        "apiVersion": "cert-manager.io/v1",
        "kind": "Certificate",
        "metadata": {"name": spec.secret_name, "namespace": namespace},
        "spec": certificate_spec,
    });
    serde_saphyr::to_string(&certificate)
        .map(|yaml| format!("---\n{yaml}"))
        .map_err(|e| format!("failed to render the Certificate: {e}"))
}

/// A duration as Go's `time.ParseDuration` (which cert-manager uses) reads it: `2160h0m0s`.
fn go_duration(duration: std::time::Duration) -> String {
    let secs = duration.as_secs();
    format!("{}h{}m{}s", secs / 3600, secs % 3600 / 60, secs % 60)
}

pub fn check_secret(args: &CheckSecretArgs) -> ExitCode {
    let names = match contract_names(&args.check) {
        Ok(names) => names,
        Err(code) => return code,
    };
    let secret = match read_secret_manifest(&args.file) {
        Ok(secret) => secret,
        Err(e) => return usage_error(&error_chain(&e)),
    };
    if let Some(ns) = secret
        .metadata
        .namespace
        .as_deref()
        .filter(|ns| *ns != args.check.namespace)
    {
        return usage_error(&format!(
            "the Secret is in namespace \"{ns}\" but the SeiNode is in \"{}\"; a SeiNode can only \
             use a Secret in its own namespace",
            args.check.namespace
        ));
    }
    judge_and_print(&args.check, &names, &secret)
}

/// The node's required names, or the usage error (printed) when the node could never run or
/// never be given a certificate: the webhook would deny it.
pub fn contract_names(check: &SecretCheck) -> Result<Vec<String>, ExitCode> {
    if let Err(e) = check_runnable_name(&check.seinode) {
        return Err(usage_error(&format!(
            "SeiNode \"{}/{}\" could never run: {e}",
            check.namespace, check.seinode
        )));
    }
    let names = required_dns_names(&check.seinode, &check.namespace, &check.cluster_domain);
    if let Err(e) = check_satisfiable(&names) {
        return Err(usage_error(&format!(
            "SeiNode \"{}/{}\" can never be given a certificate: {e}",
            check.namespace, check.seinode
        )));
    }
    Ok(names)
}

/// Judges `secret` against `names` with the code the webhook and the controller use, prints the
/// verdict and returns 0 when it meets the contract, 1 when not.
pub fn judge_and_print(check: &SecretCheck, names: &[String], secret: &Secret) -> ExitCode {
    let secret_name = secret
        .metadata
        .name
        .clone()
        .unwrap_or_else(|| "<unnamed>".to_owned());
    let now = check.at.unwrap_or_else(Timestamp::now);
    let verdict = validate_tls_secret(&check.namespace, &secret_name, Some(secret), names, now);

    let text = match check.output {
        OutputFormat::Text => format!("{}: {}\n", verdict.reason, verdict.message),
        OutputFormat::Json => json_line(&CheckJson::new(&verdict, names)),
        OutputFormat::Yaml => yaml_document(&CheckJson::new(&verdict, names)),
    };
    let code = write_stdout(&text);
    if code != ExitCode::SUCCESS {
        return code;
    }
    if verdict.is_ready() {
        ExitCode::SUCCESS
    } else {
        ExitCode::from(EXIT_NOT_READY)
    }
}

/// Reads a Secret manifest (YAML or JSON) from a file or stdin, folding `stringData` into `data`
/// as the API server does.
pub fn read_secret_manifest(file: &PathBuf) -> Result<Secret, ManifestError> {
    let path = if file.as_os_str() == "-" {
        "stdin".to_owned()
    } else {
        file.display().to_string()
    };
    let mut text = String::new();
    let read = if file.as_os_str() == "-" {
        std::io::stdin()
            .take(MAX_MANIFEST_BYTES + 1)
            .read_to_string(&mut text)
    } else {
        std::fs::File::open(file)
            .and_then(|f| f.take(MAX_MANIFEST_BYTES + 1).read_to_string(&mut text))
    };
    read.map_err(|source| ManifestError::Read {
        path: path.clone(),
        source,
    })?;
    if text.len() as u64 > MAX_MANIFEST_BYTES {
        return Err(ManifestError::TooLarge { path });
    }
    parse_secret_manifest(&text, &path)
}

/// Parses a Secret manifest; `path` names the input in errors. Errors never quote the input: a
/// manifest holds a private key, and the message may end up in a terminal or a CI log. They say
/// where (line and column, or the field) and what is wrong.
pub fn parse_secret_manifest(text: &str, path: &str) -> Result<Secret, ManifestError> {
    // YAML is a superset of JSON, so one parser serves both.
    let value: serde_json::Value = serde_saphyr::from_str(text).map_err(|e| {
        let at = e
            .location()
            .map(|l| format!(" at line {}, column {}", l.line(), l.column()))
            .unwrap_or_default();
        ManifestError::Parse {
            path: path.to_owned(),
            detail: format!("the syntax breaks{at}"),
        }
    })?;
    let invalid = |detail: String| ManifestError::Invalid {
        path: path.to_owned(),
        detail,
    };
    let Some(object) = value.as_object() else {
        return Err(invalid("the document is not a mapping".to_owned()));
    };
    match object.get("kind").and_then(|k| k.as_str()) {
        Some("Secret") => {}
        Some(kind) => {
            return Err(ManifestError::NotASecret {
                path: path.to_owned(),
                kind: if is_name(kind) {
                    kind
                } else {
                    "kind that is not a name"
                }
                .to_owned(),
            });
        }
        None => {
            return Err(ManifestError::NotASecret {
                path: path.to_owned(),
                kind: "document without a kind".to_owned(),
            });
        }
    }
    for field in ["data", "stringData"] {
        let Some(entries) = object.get(field) else {
            continue;
        };
        let Some(entries) = entries.as_object() else {
            return Err(invalid(format!(
                "{field} is not a mapping of keys to strings"
            )));
        };
        for (key, entry) in entries {
            let key = if is_name(key) {
                key.as_str()
            } else {
                "a key that is not a valid Secret key"
            };
            let Some(entry) = entry.as_str() else {
                return Err(invalid(format!("{field}[{key:?}] is not a string")));
            };
            if field == "data"
                && serde_json::from_value::<ByteString>(serde_json::Value::from(entry)).is_err()
            {
                return Err(invalid(format!(
                    "data[{key:?}] is not base64 (put plain text under stringData)"
                )));
            }
        }
    }
    let mut secret: Secret = serde_json::from_value(value).map_err(|e| {
        // serde's messages quote the offending value; keep only what kind of mistake it is.
        let what = match e.classify() {
            serde_json::error::Category::Data => {
                "a field has a type or value Kubernetes does not give it"
            }
            _ => "it cannot be read as a Secret",
        };
        invalid(what.to_owned())
    })?;
    if let Some(string_data) = secret.string_data.take() {
        let data = secret.data.get_or_insert_with(Default::default);
        for (key, value) in string_data {
            data.insert(key, ByteString(value.into_bytes()));
        }
    }
    Ok(secret)
}

/// A Kubernetes kind or Secret key, which may be quoted back: letters, digits, `-`, `_`, `.`.
fn is_name(text: &str) -> bool {
    (1..=253).contains(&text.len())
        && text
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.'))
}

#[derive(Serialize)]
struct ContractJson<'a> {
    #[serde(rename = "requiredDNSNames")]
    required_dns_names: &'a [String],
}

#[derive(Serialize)]
#[serde(rename_all = "camelCase")]
struct CheckJson<'a> {
    ready: bool,
    reason: &'static str,
    message: &'a str,
    #[serde(rename = "requiredDNSNames")]
    required_dns_names: &'a [String],
    #[serde(rename = "missingDNSNames")]
    missing_dns_names: &'a [String],
    #[serde(skip_serializing_if = "Option::is_none")]
    not_after: Option<String>,
}

impl<'a> CheckJson<'a> {
    fn new(verdict: &'a SecretVerdict, required: &'a [String]) -> Self {
        Self {
            ready: verdict.is_ready(),
            reason: verdict.reason.as_str(),
            message: &verdict.message,
            required_dns_names: required,
            missing_dns_names: &verdict.missing_dns_names,
            not_after: verdict.not_after.map(|t| t.to_string()),
        }
    }
}

/// `value` as one YAML document, starting with `---`.
pub fn yaml_document(value: &impl Serialize) -> String {
    match serde_saphyr::to_string(value) {
        Ok(yaml) if yaml.ends_with('\n') => format!("---\n{yaml}"),
        Ok(yaml) => format!("---\n{yaml}\n"),
        // Serializing these plain structs cannot fail; say so rather than print nothing.
        Err(e) => format!("---\nerror: \"failed to encode output: {e}\"\n"),
    }
}

pub fn json_line(value: &impl Serialize) -> String {
    match serde_json::to_string(value) {
        Ok(json) => format!("{json}\n"),
        // Serializing these plain structs cannot fail; say so rather than print nothing.
        Err(e) => format!("{{\"error\": \"failed to encode output: {e}\"}}\n"),
    }
}

pub fn write_stdout(text: &str) -> ExitCode {
    let mut stdout = std::io::stdout().lock();
    match stdout
        .write_all(text.as_bytes())
        .and_then(|()| stdout.flush())
    {
        Ok(()) => ExitCode::SUCCESS,
        // A closed pipe (`| head`) is not worth a message.
        Err(e) if e.kind() == std::io::ErrorKind::BrokenPipe => ExitCode::SUCCESS,
        Err(e) => usage_error(&format!("failed to write output: {e}")),
    }
}

/// Prints `error: message` and returns the usage-error exit code.
pub fn usage_error(message: &str) -> ExitCode {
    eprintln!("error: {message}");
    ExitCode::from(EXIT_USAGE)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spec() -> CertificateSpec {
        CertificateSpec {
            issuer: "sei-ca".to_owned(),
            cluster_issuer: false,
            secret_name: "rpc-sidecar-tls".to_owned(),
            duration: None,
            renew_before: None,
        }
    }

    fn certificate(spec: &CertificateSpec) -> serde_json::Value {
        let names = required_dns_names("rpc", "pacific-1", "cluster.local");
        let yaml = certificate_yaml("pacific-1", &names, spec).unwrap();
        serde_saphyr::from_str(&yaml).unwrap()
    }

    #[test]
    fn the_certificate_carries_exactly_the_contract_and_writes_the_nodes_secret() {
        let c = certificate(&spec());
        assert_eq!(c["apiVersion"], "cert-manager.io/v1");
        assert_eq!(c["kind"], "Certificate");
        assert_eq!(c["metadata"]["namespace"], "pacific-1");
        assert_eq!(c["spec"]["secretName"], "rpc-sidecar-tls");
        assert_eq!(
            c["spec"]["dnsNames"],
            serde_json::json!([
                "rpc.pacific-1.svc.cluster.local",
                "rpc-0.rpc.pacific-1.svc.cluster.local"
            ])
        );
        assert_eq!(c["spec"]["issuerRef"]["kind"], "Issuer");
        assert_eq!(c["spec"]["issuerRef"]["name"], "sei-ca");
        let usages = c["spec"]["usages"].as_array().cloned().unwrap_or_default();
        assert!(usages.contains(&"server auth".into()), "{usages:?}");
        assert!(
            c["spec"].get("duration").is_none(),
            "cert-manager's default"
        );
    }

    #[test]
    fn durations_are_written_as_go_reads_them_and_a_cluster_issuer_is_named_so() {
        let c = certificate(&CertificateSpec {
            cluster_issuer: true,
            duration: Some(std::time::Duration::from_secs(2160 * 3600)),
            renew_before: Some(std::time::Duration::from_secs(360 * 3600 + 90)),
            ..spec()
        });
        assert_eq!(c["spec"]["issuerRef"]["kind"], "ClusterIssuer");
        assert_eq!(c["spec"]["duration"], "2160h0m0s");
        assert_eq!(c["spec"]["renewBefore"], "360h1m30s");
    }

    #[test]
    fn certificate_choices_cert_manager_would_refuse_are_usage_errors() {
        let names = required_dns_names("rpc", "pacific-1", "cluster.local");
        let hour = std::time::Duration::from_secs(3600);
        for (bad, expected) in [
            (
                CertificateSpec {
                    issuer: String::new(),
                    ..spec()
                },
                "--issuer",
            ),
            (
                CertificateSpec {
                    duration: Some(hour / 2),
                    ..spec()
                },
                "shorter than the 1h",
            ),
            (
                CertificateSpec {
                    duration: Some(hour * 2),
                    renew_before: Some(hour * 2),
                    ..spec()
                },
                "must be shorter than the certificate's lifetime",
            ),
        ] {
            let err = certificate_yaml("pacific-1", &names, &bad).unwrap_err();
            assert!(err.contains(expected), "{err}");
        }
    }

    #[test]
    fn string_data_is_folded_into_data_and_wins() {
        let yaml = "apiVersion: v1\nkind: Secret\nmetadata:\n  name: s\ntype: kubernetes.io/tls\n\
                    data:\n  tls.crt: YQ==\n  tls.key: YQ==\nstringData:\n  tls.key: plain\n";
        let secret = parse_secret_manifest(yaml, "test").expect("valid manifest");
        let data = secret.data.expect("data");
        assert_eq!(data["tls.crt"].0, b"a");
        assert_eq!(data["tls.key"].0, b"plain");
    }

    #[test]
    fn json_manifests_parse() {
        let json = r#"{"apiVersion":"v1","kind":"Secret","metadata":{"name":"s"},"data":{"tls.crt":"YQ=="}}"#;
        let secret = parse_secret_manifest(json, "test").expect("valid manifest");
        assert_eq!(secret.metadata.name.as_deref(), Some("s"));
    }

    #[test]
    fn other_kinds_are_refused_with_their_kind() {
        let err = parse_secret_manifest("apiVersion: v1\nkind: ConfigMap\n", "cm.yaml")
            .expect_err("not a Secret");
        assert_eq!(
            err.to_string(),
            "cm.yaml holds a ConfigMap, not a Secret (kind: Secret, apiVersion: v1)"
        );
    }

    #[test]
    fn invalid_base64_is_a_clear_error() {
        let yaml = "apiVersion: v1\nkind: Secret\nmetadata:\n  name: s\ndata:\n  tls.crt: '%%%'\n";
        let err = parse_secret_manifest(yaml, "s.yaml").expect_err("bad base64");
        assert!(
            err.to_string()
                .starts_with("s.yaml is not a valid Secret manifest"),
            "{err}"
        );
    }

    #[test]
    fn no_error_quotes_the_manifest() {
        // A stand-in for key bytes, placed wherever a broken manifest can carry them.
        const KEY: &str = "MHcCAQEEIKeyMaterialThatMustNeverBePrinted0123";
        let head = "apiVersion: v1\nkind: Secret\nmetadata:\n  name: s\n";
        let manifests = [
            format!("{head}stringData:\n  tls.key: \"{KEY}\n"),
            format!("{head}stringData:\n  tls.key: |\n {KEY}\n  bad: [\n"),
            format!("{head}data:\n  tls.key: [{KEY}]\n"),
            format!("{head}data:\n  tls.key: '{KEY}%%'\n"),
            format!("{head}stringData:\n  tls.key: {{k: {KEY}}}\n"),
            format!("{head}type: [{KEY}]\n"),
            format!("{head}immutable: {KEY}\n"),
            format!("apiVersion: v1\nkind: Secret\nmetadata:\n  name: [{KEY}]\n"),
            format!("apiVersion: v1\nkind: {KEY}!\n"),
            format!("{KEY}: [\n"),
            format!("- {KEY}\n"),
            format!("{{\"kind\": \"Secret\", \"data\": {{\"tls.key\": \"{KEY}\""),
        ];
        for manifest in &manifests {
            let err = parse_secret_manifest(manifest, "s.yaml").expect_err(manifest);
            let shown = format!("{} {err:?}", error_chain(&err));
            for window in KEY.as_bytes().windows(8) {
                let window = std::str::from_utf8(window).unwrap();
                assert!(
                    !shown.contains(window),
                    "{window:?} of the input in: {shown}"
                );
            }
        }
    }

    #[test]
    fn the_fuzzers_reproducers_print_no_run_of_their_key() {
        // fuzz/artifacts-kept/manifest_reader: what the manifest_reader target found before the
        // fix (a YAML excerpt, serde's quote of a string).
        for (input, key) in [
            (
                include_str!(
                    "../fuzz/artifacts-kept/manifest_reader/yaml-excerpt-echoes-key-readable"
                ),
                "MIGHAgEAMBMGByqGSM49AgEGCCqGSM49",
            ),
            (
                include_str!(
                    "../fuzz/artifacts-kept/manifest_reader/type-error-quotes-key-readable"
                ),
                "LS0tLS1CRUdJTiBQUklWQVRFIEtFWS0tLS0tCk1JR0hBZ0VBTUJNR0J5cUdTTTQ5",
            ),
        ] {
            assert!(input.contains(key));
            let err = parse_secret_manifest(input, "secret.yaml").expect_err(input);
            let shown = error_chain(&err);
            for window in key.as_bytes().windows(16) {
                let window = std::str::from_utf8(window).unwrap();
                assert!(!shown.contains(window), "{window:?} of the key in: {shown}");
            }
        }
    }

    #[test]
    fn garbage_is_a_parse_error() {
        let err = parse_secret_manifest("{[", "x").expect_err("garbage");
        assert!(matches!(err, ManifestError::Parse { .. }), "{err}");
    }
}
