//! The one parse-once store of Secret inspections, shared by the webhook's cache and the
//! controller's Secret reads: a Secret's content is parsed once per resourceVersion, and a
//! Secret is read only when the inspection of the version the watch reports is not held
//! ([`Inspections::held_or_read`]).

use parking_lot::{Mutex, MutexGuard};
use std::collections::HashMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use k8s_openapi::api::core::v1::Secret;
use kube::{Api, Client};
use seinode_tls_crds::validation::{InspectedSecret, inspect_tls_secret};

use crate::versions::read_secret;

type Key = (String, String);

/// What a store keeps of an inspection: the inspection itself, a trimmed copy, or nothing
/// (the caller still gets the inspection, which is then made again next time).
pub type Keep = fn(InspectedSecret) -> Option<InspectedSecret>;

/// A Secret as the watch says it stands.
#[derive(Debug)]
pub enum Current {
    /// The held inspection of exactly the watched version: nothing was read.
    Held(Arc<InspectedSecret>),
    /// Not held: the Secret as read at the watched version (`None`: it does not exist).
    Read(Option<Box<Secret>>),
}

/// Inspections by Secret namespace and name, each with the resourceVersion it was made from.
pub struct Inspections {
    held: Mutex<HashMap<Key, (String, Arc<InspectedSecret>)>>,
    keep: Keep,
    parsed: AtomicU64,
}

impl Default for Inspections {
    fn default() -> Self {
        Self::new(Some)
    }
}

impl Inspections {
    /// A store that keeps what `keep` makes of each inspection.
    pub fn new(keep: Keep) -> Self {
        Self {
            held: Mutex::default(),
            keep,
            parsed: AtomicU64::new(0),
        }
    }

    fn lock(&self) -> MutexGuard<'_, HashMap<Key, (String, Arc<InspectedSecret>)>> {
        self.held.lock()
    }

    /// The inspection of this version of `secret`: the held one, or a new one (kept as `keep`
    /// says). A Secret without a resourceVersion is inspected every time and never kept.
    pub fn of(&self, secret: &Secret) -> Arc<InspectedSecret> {
        let key = (
            secret.metadata.namespace.clone().unwrap_or_default(),
            secret.metadata.name.clone().unwrap_or_default(),
        );
        let version = secret.metadata.resource_version.as_deref();
        if let Some(held) = self.held(&key.0, &key.1, version) {
            return held;
        }
        self.parsed.fetch_add(1, Ordering::Relaxed);
        let inspected = inspect_tls_secret(secret);
        let Some(version) = version else {
            return Arc::new(inspected);
        };
        match (self.keep)(inspected.clone()) {
            Some(kept) => {
                let kept = Arc::new(kept);
                self.lock().insert(key, (version.to_owned(), kept.clone()));
                kept
            }
            None => {
                self.lock().remove(&key);
                Arc::new(inspected)
            }
        }
    }

    /// The held inspection of exactly this version, if any.
    pub fn held(
        &self,
        namespace: &str,
        name: &str,
        version: Option<&str>,
    ) -> Option<Arc<InspectedSecret>> {
        let version = version?;
        let held = self.lock();
        let (held_version, inspected) = held.get(&(namespace.to_owned(), name.to_owned()))?;
        (held_version == version).then(|| inspected.clone())
    }

    /// The held inspection of `namespace/name` at `watched` (the version the Secret watch
    /// reports, see [`SecretVersions`](crate::versions::SecretVersions)), else the Secret read
    /// at that version ([`read_secret`]: from the API server's watch cache; without a version, a
    /// quorum read). A held inspection of the watched version is the Secret as it stands: a
    /// later change reaches the watch, which moves the version. What is read is neither
    /// inspected nor kept here: each caller records a read as its own bookkeeping needs.
    pub async fn held_or_read(
        &self,
        client: &Client,
        namespace: &str,
        name: &str,
        watched: Option<&str>,
    ) -> kube::Result<Current> {
        if let Some(held) = self.held(namespace, name, watched) {
            return Ok(Current::Held(held));
        }
        let api: Api<Secret> = Api::namespaced(client.clone(), namespace);
        let read = read_secret(&api, name, watched).await?;
        Ok(Current::Read(read.map(Box::new)))
    }

    /// Drops the inspection of `namespace/name` unless it is of `version`.
    pub fn forget_other_versions(&self, namespace: &str, name: &str, version: Option<&str>) {
        let key = (namespace.to_owned(), name.to_owned());
        let mut held = self.lock();
        if held
            .get(&key)
            .is_some_and(|(v, _)| Some(v.as_str()) != version)
        {
            held.remove(&key);
        }
    }

    /// Drops the inspection of `namespace/name`, whatever its version.
    pub fn remove(&self, namespace: &str, name: &str) {
        self.lock().remove(&(namespace.to_owned(), name.to_owned()));
    }

    /// Keeps only the inspections of Secrets for which `keep(namespace, name)` holds.
    pub fn retain(&self, keep: impl Fn(&str, &str) -> bool) {
        self.lock().retain(|(ns, name), _| keep(ns, name));
    }

    /// How many are held.
    pub fn len(&self) -> usize {
        self.lock().len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// How many Secret versions were parsed so far (a parse-once check for tests).
    pub fn parsed(&self) -> u64 {
        self.parsed.load(Ordering::Relaxed)
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use super::*;
    use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;

    fn secret(name: &str, version: Option<&str>) -> Secret {
        Secret {
            metadata: ObjectMeta {
                name: Some(name.to_owned()),
                namespace: Some("sei".to_owned()),
                resource_version: version.map(str::to_owned),
                ..ObjectMeta::default()
            },
            type_: Some(seinode_tls_crds::validation::TLS_SECRET_TYPE.to_owned()),
            ..Secret::default()
        }
    }

    #[test]
    fn each_version_is_parsed_once_and_only_the_current_one_is_held() {
        let store = Inspections::default();
        store.of(&secret("a", Some("1")));
        store.of(&secret("a", Some("1")));
        assert_eq!(store.parsed(), 1);
        assert!(store.held("sei", "a", Some("1")).is_some());
        store.of(&secret("a", Some("2")));
        assert_eq!(store.parsed(), 2);
        assert!(store.held("sei", "a", Some("1")).is_none());
        store.forget_other_versions("sei", "a", Some("3"));
        assert!(store.is_empty());
        store.of(&secret("a", Some("3")));
        store.remove("sei", "a");
        assert!(store.is_empty());
        // Without a version: parsed each time, never held.
        store.of(&secret("b", None));
        store.of(&secret("b", None));
        assert_eq!((store.parsed(), store.len()), (5, 0));
    }

    /// The path and the version (`None`: a quorum read) of each GET.
    type Asked = Arc<Mutex<Vec<(String, Option<String>)>>>;

    /// An API server holding `sei/a` at version 2 (and nothing else); records each GET.
    fn api_server() -> (Client, Asked) {
        let asked = Asked::default();
        let seen = asked.clone();
        let service = tower::service_fn(move |request: http::Request<kube::client::Body>| {
            let path = request.uri().path().to_owned();
            let version = request.uri().query().and_then(|query| {
                query
                    .split('&')
                    .find_map(|pair| pair.strip_prefix("resourceVersion="))
                    .map(str::to_owned)
            });
            seen.lock().push((path.clone(), version));
            async move {
                let (code, body) = if path.ends_with("/secrets/a") {
                    (200, serde_json::to_vec(&secret("a", Some("2")))?)
                } else {
                    let status = serde_json::json!({
                        "kind": "Status", "apiVersion": "v1", "status": "Failure",
                        "reason": "NotFound", "code": 404, "message": "not found",
                    });
                    (404, serde_json::to_vec(&status)?)
                };
                http::Response::builder()
                    .status(code)
                    .header("content-type", "application/json")
                    .body(kube::client::Body::from(body))
                    .map_err(|e| Box::new(e) as Box<dyn std::error::Error + Send + Sync>)
            }
        });
        (Client::new(service, "default"), asked)
    }

    #[tokio::test]
    async fn the_held_inspection_of_the_watched_version_answers_else_the_secret_is_read_at_it() {
        let (client, asked) = api_server();
        let store = Inspections::default();
        store.of(&secret("a", Some("1")));
        // (name, watched version, read?, found?, the version the read asked for)
        let cases = [
            ("a", Some("1"), false, true, None),
            ("a", Some("2"), true, true, Some("2")),
            // Unknown to the watch: a quorum read, whatever is held.
            ("a", None, true, true, None),
            ("gone", Some("5"), true, false, Some("5")),
        ];
        for (name, watched, read, found, at) in cases {
            let current = store
                .held_or_read(&client, "sei", name, watched)
                .await
                .unwrap();
            let asked = std::mem::take(&mut *asked.lock());
            match current {
                Current::Held(_) => assert!(!read && asked.is_empty(), "{name} at {watched:?}"),
                Current::Read(secret) => {
                    assert!(read, "{name} at {watched:?} was read");
                    assert_eq!(secret.is_some(), found, "{name} at {watched:?}");
                    let path = format!("/api/v1/namespaces/sei/secrets/{name}");
                    assert_eq!(asked, [(path, at.map(str::to_owned))]);
                }
            }
        }
        // A read is not kept: the caller records it.
        assert!(store.held("sei", "a", Some("2")).is_none());
    }

    #[test]
    fn what_keep_refuses_is_returned_but_not_held() {
        let store = Inspections::new(|_| None);
        let inspected = store.of(&secret("a", Some("1")));
        assert!(matches!(*inspected, InspectedSecret::Defective { .. }));
        assert!(store.is_empty());
        store.of(&secret("a", Some("1")));
        assert_eq!(store.parsed(), 2);
    }
}
