//! Reading a node's TLS Secret and judging it, parsing each Secret version once.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use jiff::Timestamp;
use k8s_openapi::api::core::v1::Secret;
use kube::{Api, Client};
use seinode_tls_crds::validation::{
    InspectedSecret, SecretLookup, SecretVerdict, inspect_tls_secret, judge,
};

type SecretKey = (String, String);
type ResourceVersion = String;

/// Inspections by Secret namespace/name, with the resourceVersion they were made from; an entry
/// is replaced when the version moves and pruned when no node names the Secret any more.
#[derive(Default)]
pub struct SecretJudge {
    parsed: Mutex<HashMap<SecretKey, (ResourceVersion, Arc<InspectedSecret>)>>,
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
                let inspected = self.inspect(&secret);
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

    fn inspect(&self, secret: &Secret) -> Arc<InspectedSecret> {
        let key = (
            secret.metadata.namespace.clone().unwrap_or_default(),
            secret.metadata.name.clone().unwrap_or_default(),
        );
        let version = secret.metadata.resource_version.clone().unwrap_or_default();
        let mut parsed = self.parsed.lock().unwrap_or_else(|e| e.into_inner());
        if let Some((cached_version, inspected)) = parsed.get(&key)
            && !version.is_empty()
            && *cached_version == version
        {
            return inspected.clone();
        }
        let inspected = Arc::new(inspect_tls_secret(secret));
        parsed.insert(key, (version, inspected.clone()));
        inspected
    }

    /// Keeps only the Secrets for which `keep(namespace, name)` holds.
    pub fn retain(&self, keep: impl Fn(&str, &str) -> bool) {
        self.parsed
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .retain(|(ns, name), _| keep(ns, name));
    }
}
