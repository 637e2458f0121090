//! Reading a node's TLS Secret and judging it, parsing each Secret version once.

use std::sync::Arc;

use jiff::Timestamp;
use k8s_openapi::api::core::v1::Secret;
use kube::{Api, Client};
use seinode_tls_crds::inspections::Inspections;
use seinode_tls_crds::validation::{InspectedSecret, SecretLookup, SecretVerdict, judge};

/// Inspections kept whole (the probe trusts their leaf and `ca.crt`), replaced when the
/// version moves and pruned when no node names the Secret any more.
#[derive(Default)]
pub struct SecretJudge {
    inspections: Inspections,
}

impl SecretJudge {
    /// Reads `namespace/name` from the API server (authoritative: a Secret of another type is
    /// reported as malformed, not as missing) and judges it against `required` at `now`. A
    /// failed read is `TLSSecretUnavailable`, never `TLSSecretNotFound`. Also returns the
    /// inspection, whose leaf the sidecar probe trusts.
    pub async fn verdict(
        &self,
        client: &Client,
        namespace: &str,
        name: &str,
        required: &[String],
        now: Timestamp,
    ) -> (SecretVerdict, Option<Arc<InspectedSecret>>) {
        let api: Api<Secret> = Api::namespaced(client.clone(), namespace);
        match api.get_opt(name).await {
            Ok(Some(secret)) => {
                let inspected = self.inspections.of(&secret);
                let verdict = judge(
                    namespace,
                    name,
                    SecretLookup::Found(&inspected),
                    required,
                    now,
                );
                (verdict, Some(inspected))
            }
            Ok(None) => (
                judge(namespace, name, SecretLookup::NotFound, required, now),
                None,
            ),
            Err(error) => {
                let cause = match &error {
                    kube::Error::Api(status) => {
                        format!("API error {}: {}", status.code, status.message)
                    }
                    other => other.to_string(),
                };
                (
                    judge(
                        namespace,
                        name,
                        SecretLookup::Unavailable(&cause),
                        required,
                        now,
                    ),
                    None,
                )
            }
        }
    }

    /// Keeps only the Secrets for which `keep(namespace, name)` holds.
    pub fn retain(&self, keep: impl Fn(&str, &str) -> bool) {
        self.inspections.retain(keep);
    }
}
