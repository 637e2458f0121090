//! Reading a node's TLS Secret and judging it, parsing each Secret version once.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use jiff::Timestamp;
use k8s_openapi::api::core::v1::Secret;
use kube::{Api, Client};
use seinode_tls_crds::validation::{
    InspectedSecret, SecretLookup, SecretVerdict, inspect_tls_secret, judge,
};

/// Inspections by Secret uid and resourceVersion; an entry is replaced when the version moves.
#[derive(Default)]
pub struct SecretJudge {
    parsed: Mutex<HashMap<String, (String, Arc<InspectedSecret>)>>,
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
        let uid = secret.metadata.uid.clone().unwrap_or_default();
        let version = secret.metadata.resource_version.clone().unwrap_or_default();
        let mut parsed = self.parsed.lock().unwrap_or_else(|e| e.into_inner());
        if let Some((cached_version, inspected)) = parsed.get(&uid)
            && !version.is_empty()
            && *cached_version == version
        {
            return inspected.clone();
        }
        let inspected = Arc::new(inspect_tls_secret(secret));
        if !uid.is_empty() {
            parsed.insert(uid, (version, inspected.clone()));
        }
        inspected
    }

    /// Forgets Secrets that are gone (called with the uids still referenced).
    pub fn retain(&self, live: impl Fn(&str) -> bool) {
        self.parsed
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .retain(|uid, _| live(uid));
    }

    pub fn len(&self) -> usize {
        self.parsed.lock().unwrap_or_else(|e| e.into_inner()).len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}
