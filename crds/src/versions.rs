//! The resourceVersion of every `kubernetes.io/tls` Secret, as a metadata-only watch reports
//! it: what the webhook's Secret cache and the controller's Secret reads compare a held
//! inspection against (an inspection of exactly that version is the Secret as it stands).

use std::collections::HashMap;
use std::sync::{RwLock, RwLockReadGuard, RwLockWriteGuard};

use k8s_openapi::api::core::v1::Secret;
use kube::api::GetParams;
use kube::core::PartialObjectMeta;
use kube::runtime::watcher;
use kube::{Api, ResourceExt};

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
        self.state.read().unwrap_or_else(|e| e.into_inner())
    }

    fn write(&self) -> RwLockWriteGuard<'_, State> {
        self.state.write().unwrap_or_else(|e| e.into_inner())
    }

    /// Follows one event of the Secret watch.
    pub fn apply(&self, event: &watcher::Event<PartialObjectMeta<Secret>>) {
        match event {
            watcher::Event::Apply(secret) | watcher::Event::InitApply(secret) => self.set(
                &secret.namespace().unwrap_or_default(),
                &secret.name_any(),
                secret.metadata.resource_version.as_deref(),
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

/// Reads Secret `name`; `None` when it does not exist. Given the `version` a watch reported,
/// it asks for the Secret no older than that version, which the API server serves from its
/// watch cache: no quorum read from etcd and, where Secrets are encrypted at rest, no
/// decryption. (An API server whose cache lags behind that version, one replica of several,
/// waits up to 3 s for it and then answers 504, which the client retries as any 504.) Without
/// a version, a quorum read.
pub async fn read_secret(
    api: &Api<Secret>,
    name: &str,
    version: Option<&str>,
) -> kube::Result<Option<Secret>> {
    let params = version.map_or_else(GetParams::default, GetParams::at);
    match api.get_with(name, &params).await {
        Ok(secret) => Ok(Some(secret)),
        Err(kube::Error::Api(status)) if status.is_not_found() => Ok(None),
        Err(error) => Err(error),
    }
}

#[cfg(test)]
mod tests {
    use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;
    use watcher::Event;

    use super::*;

    fn meta(namespace: &str, name: &str, version: Option<&str>) -> PartialObjectMeta<Secret> {
        PartialObjectMeta {
            metadata: ObjectMeta {
                namespace: Some(namespace.to_owned()),
                name: Some(name.to_owned()),
                resource_version: version.map(str::to_owned),
                ..ObjectMeta::default()
            },
            ..PartialObjectMeta::default()
        }
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
