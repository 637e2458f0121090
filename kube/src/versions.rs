//! The resourceVersion of every `kubernetes.io/tls` Secret, as a metadata-only watch reports
//! it: what the webhook's Secret cache and the controller's Secret reads compare a held
//! inspection against (an inspection of exactly that version is the Secret as it stands).

use parking_lot::{RwLock, RwLockReadGuard, RwLockWriteGuard};
use std::collections::HashMap;
use std::time::Duration;

use k8s_openapi::api::core::v1::Secret;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;
use kube::api::GetParams;
use kube::runtime::watcher;
use kube::{Api, Client, ResourceExt};
use seinode_tls_crds::validation::TLS_SECRET_TYPE;

use crate::watch::{WatchEvents, WatchScope, scoped_watcher};

/// A Secret as the metadata-only watches decode it: its namespace, name, resourceVersion and uid.
/// Like `PartialObjectMeta<Secret>`, it asks the API server for `PartialObjectMetadata`; unlike
/// it, the labels, annotations and managedFields are skipped as they are parsed, not decoded
/// into a JSON tree per Secret and dropped: both processes list every TLS Secret of the cluster
/// at each start and relist, and read nothing but the name and the version.
#[derive(Clone, Debug, Default, serde::Deserialize)]
#[serde(from = "Wire")]
pub struct SecretMeta {
    metadata: ObjectMeta,
}

// Lists, watches and reads ask for `PartialObjectMetadata`: no Secret data on the wire.
crate::slim::resource_as!(SecretMeta, Secret, metadata_api = true);

/// The wire shape of [`SecretMeta`]: every other field of the object is skipped.
#[derive(serde::Deserialize)]
struct Wire {
    #[serde(default)]
    metadata: crate::slim::Meta,
}

impl From<Wire> for SecretMeta {
    fn from(object: Wire) -> Self {
        Self {
            metadata: object.metadata.into(),
        }
    }
}

/// The watch both co-processes keep of the TLS Secrets over `scope`: metadata only
/// ([`SecretMeta`]), field selector `type=kubernetes.io/tls`.
pub fn watch_tls_secrets(client: Client, scope: &WatchScope) -> WatchEvents<SecretMeta> {
    let config = watcher::Config::default().fields(&format!("type={TLS_SECRET_TYPE}"));
    scoped_watcher(client, scope, config)
}

/// Secret versions by namespace and name (about 150 bytes a Secret). A relist replaces the set
/// when it completes: until then the versions known before keep answering, updated by what the
/// list reports, and what it did not list is dropped at its end.
#[derive(Default)]
pub struct SecretVersions {
    state: RwLock<State>,
}

#[derive(Default)]
struct State {
    /// Namespace → name → version (`None`: known, of no version) and the list that last
    /// reported it.
    by_namespace: HashMap<String, HashMap<String, (Option<String>, u64)>>,
    /// Counts the lists begun: a relist keeps only what it listed.
    lists: u64,
    len: usize,
}

impl SecretVersions {
    fn read(&self) -> RwLockReadGuard<'_, State> {
        self.state.read()
    }

    fn write(&self) -> RwLockWriteGuard<'_, State> {
        self.state.write()
    }

    /// Follows one event of the Secret watch (of [`SecretMeta`]s, or of anything else that
    /// names a Secret).
    pub fn apply(&self, event: &watcher::Event<impl ResourceExt>) {
        match event {
            watcher::Event::Apply(secret) | watcher::Event::InitApply(secret) => self.set(
                &secret.namespace().unwrap_or_default(),
                &secret.name_any(),
                secret.meta().resource_version.as_deref(),
            ),
            watcher::Event::Delete(secret) => {
                self.remove(&secret.namespace().unwrap_or_default(), &secret.name_any());
            }
            watcher::Event::Init => self.write().lists += 1,
            watcher::Event::InitDone => {
                let state = &mut *self.write();
                let (lists, mut len) = (state.lists, 0);
                state.by_namespace.retain(|_, names| {
                    names.retain(|_, (_, listed)| *listed == lists);
                    len += names.len();
                    !names.is_empty()
                });
                state.len = len;
            }
        }
    }

    /// Records `namespace/name` at `version` (also what a read found), as listed by the list
    /// under way if there is one.
    pub fn set(&self, namespace: &str, name: &str, version: Option<&str>) {
        let state = &mut *self.write();
        let entry = (version.map(str::to_owned), state.lists);
        let names = match state.by_namespace.get_mut(namespace) {
            Some(names) => names,
            None => state.by_namespace.entry(namespace.to_owned()).or_default(),
        };
        match names.get_mut(name) {
            Some(known) => *known = entry,
            None => {
                names.insert(name.to_owned(), entry);
                state.len += 1;
            }
        }
    }

    /// Forgets `namespace/name`.
    pub fn remove(&self, namespace: &str, name: &str) {
        let state = &mut *self.write();
        let Some(names) = state.by_namespace.get_mut(namespace) else {
            return;
        };
        if names.remove(name).is_some() {
            state.len -= 1;
            if names.is_empty() {
                state.by_namespace.remove(namespace);
            }
        }
    }

    /// Moves `namespace/name` from `expected` to `version` (what a read at `expected` found), if
    /// the watch has not moved it meanwhile: the watch's word is the newer one. Whether it moved.
    pub fn replace_if(
        &self,
        namespace: &str,
        name: &str,
        expected: Option<&str>,
        version: Option<&str>,
    ) -> bool {
        let state = &mut *self.write();
        let known = state
            .by_namespace
            .get_mut(namespace)
            .and_then(|names| names.get_mut(name));
        match known {
            // Listed as before: the read says nothing of the list under way.
            Some((known, _)) if known.as_deref() == expected => {
                *known = version.map(str::to_owned);
                true
            }
            _ => false,
        }
    }

    /// Forgets `namespace/name` (a read at `expected` found it gone) if the watch still has it
    /// at `expected`. Whether it was forgotten.
    pub fn remove_if(&self, namespace: &str, name: &str, expected: Option<&str>) -> bool {
        let state = &mut *self.write();
        let Some(names) = state.by_namespace.get_mut(namespace) else {
            return false;
        };
        if names
            .get(name)
            .is_none_or(|(known, _)| known.as_deref() != expected)
        {
            return false;
        }
        names.remove(name);
        state.len -= 1;
        if names.is_empty() {
            state.by_namespace.remove(namespace);
        }
        true
    }

    /// The version of `namespace/name`: `None` when no such Secret is known, `Some(None)` when
    /// it is known without a version.
    pub fn get(&self, namespace: &str, name: &str) -> Option<Option<String>> {
        let state = self.read();
        let (version, _) = state.by_namespace.get(namespace)?.get(name)?;
        Some(version.clone())
    }

    /// Whether `namespace/name` is known.
    pub fn contains(&self, namespace: &str, name: &str) -> bool {
        self.read()
            .by_namespace
            .get(namespace)
            .is_some_and(|names| names.contains_key(name))
    }

    /// How many Secrets are known.
    pub fn len(&self) -> usize {
        self.read().len
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// How long a read at a watched version may take before a quorum read replaces it. The API
/// server's watch cache answers in milliseconds; one that lags behind the version (a replica of
/// several, or one that has just restarted) waits up to 3 s and then answers 504, which the
/// client retries: a reconcile slot would be held for minutes.
pub const CACHE_READ_PATIENCE: Duration = Duration::from_millis(500);

/// Reads Secret `name`; `None` when it does not exist. Given the `version` a watch reported,
/// it asks for the Secret no older than that version, which the API server serves from its
/// watch cache: no quorum read from etcd and, where Secrets are encrypted at rest, no
/// decryption. Without a version, or when that read takes longer than [`CACHE_READ_PATIENCE`],
/// a quorum read.
pub async fn read_secret(
    api: &Api<Secret>,
    name: &str,
    version: Option<&str>,
) -> kube::Result<Option<Secret>> {
    if let Some(version) = version {
        let at = GetParams::at(version);
        let cached = get_secret(api, name, &at);
        if let Ok(result) = tokio::time::timeout(CACHE_READ_PATIENCE, cached).await {
            return result;
        }
    }
    get_secret(api, name, &GetParams::default()).await
}

async fn get_secret(
    api: &Api<Secret>,
    name: &str,
    params: &GetParams,
) -> kube::Result<Option<Secret>> {
    match api.get_with(name, params).await {
        Ok(secret) => Ok(Some(secret)),
        Err(kube::Error::Api(status)) if status.is_not_found() => Ok(None),
        Err(error) => Err(error),
    }
}

#[cfg(test)]
mod tests {
    use kube::core::PartialObjectMeta;

    use super::*;

    type Event = watcher::Event<SecretMeta>;

    fn meta(namespace: &str, name: &str, version: Option<&str>) -> SecretMeta {
        SecretMeta {
            metadata: ObjectMeta {
                namespace: Some(namespace.to_owned()),
                name: Some(name.to_owned()),
                resource_version: version.map(str::to_owned),
                ..ObjectMeta::default()
            },
        }
    }

    /// A Secret's metadata as the API server sends it in a `PartialObjectMetadata` list or watch.
    fn wire(version: Option<&str>) -> serde_json::Value {
        let mut object = serde_json::json!({
            "apiVersion": "meta.k8s.io/v1", "kind": "PartialObjectMetadata",
            "metadata": {
                "name": "node-0-tls", "namespace": "sei", "uid": "u-1",
                "creationTimestamp": "2026-12-07T00:00:00Z",
                "labels": {"team": "rpc"},
                "annotations": {"cert-manager.io/certificate-name": "node-0"},
                "managedFields": [{"manager": "cert-manager", "operation": "Update",
                    "apiVersion": "v1", "time": "2026-12-07T00:00:00Z", "fieldsType": "FieldsV1",
                    "fieldsV1": {"f:data": {".": {}, "f:tls.crt": {}, "f:tls.key": {}},
                        "f:type": {}}}],
            },
        });
        if let Some(version) = version {
            object["metadata"]["resourceVersion"] = version.into();
        }
        object
    }

    #[test]
    fn a_secret_meta_decodes_the_key_version_and_uid_only() {
        for version in [Some("42"), None] {
            let decoded: SecretMeta = serde_json::from_value(wire(version)).unwrap();
            let full: PartialObjectMeta<Secret> = serde_json::from_value(wire(version)).unwrap();
            let meta = &decoded.metadata;
            assert_eq!(
                (meta.namespace.as_deref(), meta.name.as_deref()),
                (Some("sei"), Some("node-0-tls"))
            );
            assert_eq!(meta.resource_version.as_deref(), version);
            assert_eq!(meta.uid.as_deref(), Some("u-1"));
            assert!(
                meta.managed_fields.is_none()
                    && meta.labels.is_none()
                    && meta.annotations.is_none()
                    && meta.creation_timestamp.is_none(),
                "{meta:?}"
            );
            // The versions read both alike.
            let (slim, whole) = (SecretVersions::default(), SecretVersions::default());
            slim.apply(&Event::Apply(decoded));
            whole.apply(&watcher::Event::Apply(full));
            assert_eq!(
                slim.get("sei", "node-0-tls"),
                whole.get("sei", "node-0-tls")
            );
            assert_eq!(
                slim.get("sei", "node-0-tls"),
                Some(version.map(str::to_owned))
            );
        }
        // What a watch may send for an object with no metadata at all: nothing to key, no error.
        let bare: SecretMeta = serde_json::from_value(serde_json::json!({})).unwrap();
        assert_eq!(bare.metadata, ObjectMeta::default());
    }

    #[test]
    fn a_secret_meta_is_a_secret_asked_for_as_metadata() {
        use kube::Resource as _;
        assert_eq!(
            SecretMeta::url_path(&(), Some("sei")),
            Secret::url_path(&(), Some("sei"))
        );
        assert!(SecretMeta::metadata_api());
        assert!(PartialObjectMeta::<Secret>::metadata_api());
    }

    #[test]
    fn a_read_moves_or_forgets_a_version_only_if_the_watch_has_not_moved_it() {
        let versions = SecretVersions::default();
        versions.apply(&Event::Apply(meta("sei", "a", Some("1"))));
        // Read at 1, found at 2: moved.
        assert!(versions.replace_if("sei", "a", Some("1"), Some("2")));
        assert_eq!(versions.get("sei", "a"), Some(Some("2".to_owned())));
        // The watch reported 3 while a read at 2 was in flight: the read's 2 is older.
        versions.apply(&Event::Apply(meta("sei", "a", Some("3"))));
        assert!(!versions.replace_if("sei", "a", Some("2"), Some("2")));
        assert!(!versions.remove_if("sei", "a", Some("2")));
        assert_eq!(versions.get("sei", "a"), Some(Some("3".to_owned())));
        // Not known: nothing to move.
        assert!(!versions.replace_if("sei", "b", None, Some("1")));
        assert_eq!(versions.get("sei", "b"), None);
        // Read at 3 and found gone: forgotten.
        assert!(versions.remove_if("sei", "a", Some("3")));
        assert_eq!(versions.get("sei", "a"), None);
        assert!(versions.is_empty());
    }

    /// A relist under way keeps only what it lists: a read is no listing.
    #[test]
    fn a_read_during_a_relist_does_not_keep_a_secret_the_relist_did_not_list() {
        let versions = SecretVersions::default();
        versions.apply(&Event::Apply(meta("sei", "a", Some("1"))));
        versions.apply(&Event::Init);
        assert!(versions.replace_if("sei", "a", Some("1"), Some("2")));
        versions.apply(&Event::InitDone);
        assert_eq!(versions.get("sei", "a"), None);
    }

    /// The version each read asked for (`None`: a quorum read).
    type Asked = std::sync::Arc<parking_lot::Mutex<Vec<Option<String>>>>;

    /// An API server that answers a read at a version from `cached` (never, if `None`) and a
    /// quorum read with the Secret at version 9; records the version each read asked for.
    fn api_server(cached: Option<&'static str>) -> (Api<Secret>, Asked) {
        let asked = Asked::default();
        let seen = asked.clone();
        let service = tower::service_fn(move |request: http::Request<kube::client::Body>| {
            let version = request.uri().query().and_then(|query| {
                query
                    .split('&')
                    .find_map(|pair| pair.strip_prefix("resourceVersion="))
                    .map(str::to_owned)
            });
            seen.lock().push(version.clone());
            async move {
                let answer = match version {
                    Some(_) => match cached {
                        Some(answer) => answer,
                        None => std::future::pending().await,
                    },
                    None => "9",
                };
                let secret = serde_json::json!({
                    "apiVersion": "v1", "kind": "Secret",
                    "metadata": {"name": "a", "namespace": "sei", "resourceVersion": answer},
                });
                http::Response::builder()
                    .header("content-type", "application/json")
                    .body(kube::client::Body::from(serde_json::to_vec(&secret)?))
                    .map_err(|e| Box::new(e) as Box<dyn std::error::Error + Send + Sync>)
            }
        });
        let client = kube::Client::new(service, "sei");
        (Api::namespaced(client, "sei"), asked)
    }

    fn version_of(read: kube::Result<Option<Secret>>) -> Option<String> {
        read.unwrap().unwrap().metadata.resource_version
    }

    #[tokio::test]
    async fn a_read_at_a_watched_version_comes_from_the_cache_and_others_from_a_quorum_read() {
        let (api, asked) = api_server(Some("5"));
        assert_eq!(
            version_of(read_secret(&api, "a", Some("4")).await).as_deref(),
            Some("5")
        );
        assert_eq!(
            version_of(read_secret(&api, "a", None).await).as_deref(),
            Some("9")
        );
        assert_eq!(*asked.lock(), [Some("4".to_owned()), None]);
    }

    /// A lagging watch cache holds the read up to 3 s and then answers 504, which the client
    /// retries: past the patience, the quorum read answers instead.
    #[tokio::test]
    async fn a_read_the_cache_does_not_answer_in_time_is_made_again_as_a_quorum_read() {
        let (api, asked) = api_server(None);
        let started = std::time::Instant::now();
        let read = tokio::time::timeout(Duration::from_secs(10), read_secret(&api, "a", Some("4")))
            .await
            .expect("the read waited on the cache instead of reading from etcd");
        assert_eq!(version_of(read).as_deref(), Some("9"));
        assert!(started.elapsed() >= CACHE_READ_PATIENCE);
        assert_eq!(*asked.lock(), [Some("4".to_owned()), None]);
    }

    #[test]
    fn the_watch_sets_moves_and_forgets_versions() {
        let versions = SecretVersions::default();
        assert_eq!(versions.get("sei", "a"), None);
        versions.apply(&Event::Apply(meta("sei", "a", Some("1"))));
        versions.apply(&Event::Apply(meta("other", "a", Some("7"))));
        versions.apply(&Event::Apply(meta("sei", "b", None)));
        assert_eq!(versions.get("sei", "a"), Some(Some("1".to_owned())));
        assert_eq!(versions.get("other", "a"), Some(Some("7".to_owned())));
        assert_eq!(versions.get("sei", "b"), Some(None));
        assert_eq!(versions.len(), 3);
        versions.apply(&Event::Apply(meta("sei", "a", Some("2"))));
        assert_eq!(versions.get("sei", "a"), Some(Some("2".to_owned())));
        assert_eq!(versions.len(), 3);
        versions.apply(&Event::Delete(meta("other", "a", Some("7"))));
        versions.apply(&Event::Delete(meta("other", "never-seen", Some("1"))));
        assert!(!versions.contains("other", "a"));
        assert!(versions.contains("sei", "a"));
        assert_eq!(versions.len(), 2);
    }

    #[test]
    fn a_relist_keeps_answering_and_drops_what_it_did_not_list_when_done() {
        let versions = SecretVersions::default();
        versions.apply(&Event::Init);
        versions.apply(&Event::InitApply(meta("sei", "a", Some("1"))));
        versions.apply(&Event::InitApply(meta("sei", "gone", Some("1"))));
        versions.apply(&Event::InitApply(meta("old", "x", Some("1"))));
        versions.apply(&Event::InitDone);
        assert_eq!(versions.len(), 3);

        versions.apply(&Event::Init);
        versions.apply(&Event::InitApply(meta("sei", "a", Some("5"))));
        // A read during the relist counts as listed.
        versions.set("sei", "read", Some("6"));
        // Until the list completes, what it has not reported yet still answers.
        assert_eq!(versions.get("sei", "gone"), Some(Some("1".to_owned())));
        assert_eq!(versions.get("sei", "a"), Some(Some("5".to_owned())));
        versions.apply(&Event::InitDone);
        assert_eq!(versions.get("sei", "a"), Some(Some("5".to_owned())));
        assert_eq!(versions.get("sei", "read"), Some(Some("6".to_owned())));
        assert!(!versions.contains("sei", "gone"));
        assert!(!versions.contains("old", "x"));
        assert_eq!(versions.len(), 2);
    }
}
