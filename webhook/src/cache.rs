//! Watch-fed caches, so that admission never calls the API server.
//!
//! - [`SecretCache`]: every `kubernetes.io/tls` Secret (field selector), kept only as the result
//!   of [`inspect_tls_secret`], computed once per resourceVersion on the watch task. The private
//!   key never stays in memory.
//! - [`NodeCache`]: every SeiNode, for the Secret guard's "who uses this Secret?".

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, RwLock};

use futures::StreamExt;
use k8s_openapi::api::core::v1::Secret;
use kube::runtime::reflector::{self, Store};
use kube::runtime::{WatchStreamExt, watcher};
use kube::{Api, Client, ResourceExt};
use seinode_tls_crds::SeiNode;
use seinode_tls_crds::validation::{
    InspectedSecret, SecretLookup, TLS_SECRET_TYPE, inspect_tls_secret,
};

/// Cause given while the Secret cache has not completed its first list.
pub const NOT_SYNCED: &str = "the webhook's Secret cache has not finished its first sync";

type Key = (String, String);

struct CachedSecret {
    resource_version: Option<String>,
    inspected: Arc<InspectedSecret>,
}

/// What the cache knows of one Secret, detached from the cache's lock.
#[derive(Debug, Clone)]
pub enum CachedLookup {
    Found(Arc<InspectedSecret>),
    NotFound,
    Unavailable(&'static str),
}

impl CachedLookup {
    /// The lookup in the form the validation functions take.
    pub fn as_lookup(&self) -> SecretLookup<'_> {
        match self {
            CachedLookup::Found(inspected) => SecretLookup::Found(inspected),
            CachedLookup::NotFound => SecretLookup::NotFound,
            CachedLookup::Unavailable(cause) => SecretLookup::Unavailable(cause),
        }
    }
}

/// Inspected TLS Secrets by namespace and name.
#[derive(Default)]
pub struct SecretCache {
    entries: RwLock<HashMap<Key, CachedSecret>>,
    /// Entries collected during a (re)list, swapped in when it completes.
    relist: RwLock<Option<HashMap<Key, CachedSecret>>>,
    synced: AtomicBool,
    inspections: std::sync::atomic::AtomicU64,
}

impl SecretCache {
    pub fn new() -> Self {
        Self::default()
    }

    /// Whether the first list has completed.
    pub fn is_synced(&self) -> bool {
        self.synced.load(Ordering::Acquire)
    }

    /// Marks the cache synced (the watch task does this after its first list).
    pub fn mark_synced(&self) {
        self.synced.store(true, Ordering::Release);
    }

    /// How many Secret versions have been parsed so far (a parse-once check for tests).
    pub fn inspections(&self) -> u64 {
        self.inspections.load(Ordering::Relaxed)
    }

    pub fn lookup(&self, namespace: &str, name: &str) -> CachedLookup {
        if !self.is_synced() {
            return CachedLookup::Unavailable(NOT_SYNCED);
        }
        let entries = self.entries.read().unwrap_or_else(|e| e.into_inner());
        match entries.get(&(namespace.to_owned(), name.to_owned())) {
            Some(entry) => CachedLookup::Found(entry.inspected.clone()),
            None => CachedLookup::NotFound,
        }
    }

    /// The cached inspection of exactly this resourceVersion of a Secret, if the cache holds it.
    pub fn lookup_version(
        &self,
        namespace: &str,
        name: &str,
        resource_version: Option<&str>,
    ) -> CachedLookup {
        let entries = self.entries.read().unwrap_or_else(|e| e.into_inner());
        match entries.get(&(namespace.to_owned(), name.to_owned())) {
            Some(entry)
                if resource_version.is_some()
                    && entry.resource_version.as_deref() == resource_version =>
            {
                CachedLookup::Found(entry.inspected.clone())
            }
            _ => CachedLookup::NotFound,
        }
    }

    /// Records a Secret, parsing it unless this resourceVersion was parsed already. Secrets of
    /// another type are removed (a Secret's type is immutable, but be strict anyway).
    pub fn apply(&self, secret: &Secret) {
        let key = key_of(secret);
        if secret.type_.as_deref() != Some(TLS_SECRET_TYPE) {
            self.remove(&key.0, &key.1);
            return;
        }
        let mut relist = self.relist.write().unwrap_or_else(|e| e.into_inner());
        let mut entries = self.entries.write().unwrap_or_else(|e| e.into_inner());
        let entry = self.entry_for(secret, &entries);
        match relist.as_mut() {
            Some(pending) => pending.insert(key, entry),
            None => entries.insert(key, entry),
        };
    }

    pub fn remove(&self, namespace: &str, name: &str) {
        let key = (namespace.to_owned(), name.to_owned());
        // Same lock order as `apply`: relist, then entries.
        let mut relist = self.relist.write().unwrap_or_else(|e| e.into_inner());
        if let Some(pending) = relist.as_mut() {
            pending.remove(&key);
        }
        self.entries
            .write()
            .unwrap_or_else(|e| e.into_inner())
            .remove(&key);
    }

    fn begin_relist(&self) {
        *self.relist.write().unwrap_or_else(|e| e.into_inner()) = Some(HashMap::new());
    }

    fn finish_relist(&self) {
        if let Some(pending) = self
            .relist
            .write()
            .unwrap_or_else(|e| e.into_inner())
            .take()
        {
            *self.entries.write().unwrap_or_else(|e| e.into_inner()) = pending;
        }
        self.mark_synced();
    }

    /// Reuses the parsed entry of the same resourceVersion, or parses the Secret.
    fn entry_for(&self, secret: &Secret, entries: &HashMap<Key, CachedSecret>) -> CachedSecret {
        let resource_version = secret.metadata.resource_version.clone();
        if let Some(existing) = entries.get(&key_of(secret))
            && resource_version.is_some()
            && existing.resource_version == resource_version
        {
            return CachedSecret {
                resource_version,
                inspected: existing.inspected.clone(),
            };
        }
        self.inspections.fetch_add(1, Ordering::Relaxed);
        CachedSecret {
            resource_version,
            inspected: Arc::new(inspect_tls_secret(secret)),
        }
    }

    /// Applies one watch event.
    pub fn apply_event(&self, event: &watcher::Event<Secret>) {
        match event {
            watcher::Event::Init => self.begin_relist(),
            watcher::Event::InitApply(secret) | watcher::Event::Apply(secret) => self.apply(secret),
            watcher::Event::Delete(secret) => {
                let (namespace, name) = key_of(secret);
                self.remove(&namespace, &name);
            }
            watcher::Event::InitDone => self.finish_relist(),
        }
    }
}

fn key_of(secret: &Secret) -> Key {
    (secret.namespace().unwrap_or_default(), secret.name_any())
}

/// SeiNodes, from a reflector.
#[derive(Clone)]
pub struct NodeCache {
    store: Store<SeiNode>,
    synced: Arc<AtomicBool>,
}

impl NodeCache {
    pub fn new(store: Store<SeiNode>) -> Self {
        Self {
            store,
            synced: Arc::new(AtomicBool::new(false)),
        }
    }

    /// Whether the first list has completed.
    pub fn is_synced(&self) -> bool {
        self.synced.load(Ordering::Acquire)
    }

    /// Marks the cache synced (the watch does this after its first list).
    pub fn mark_synced(&self) {
        self.synced.store(true, Ordering::Release);
    }

    /// SeiNodes in `namespace` whose `spec.sidecar.tls.secretName` is `secret`.
    pub fn using_secret(&self, namespace: &str, secret: &str) -> Vec<Arc<SeiNode>> {
        let mut nodes: Vec<Arc<SeiNode>> = self
            .store
            .state()
            .into_iter()
            .filter(|node| {
                node.namespace().as_deref() == Some(namespace)
                    && node
                        .sidecar_tls()
                        .is_some_and(|tls| tls.secret_name == secret)
            })
            .collect();
        nodes.sort_by_key(|node| node.name_any());
        nodes
    }
}

/// Both caches, and the future that feeds them.
pub struct Caches {
    pub secrets: Arc<SecretCache>,
    pub nodes: NodeCache,
}

impl Caches {
    /// Starts watching through `client`; the returned future runs the watches until dropped.
    pub fn watch(client: Client) -> (Self, impl Future<Output = ()> + Send + 'static) {
        let secrets = Arc::new(SecretCache::new());
        let (reader, writer) = reflector::store();

        let secret_api: Api<Secret> = Api::all(client.clone());
        let secret_config = watcher::Config::default().fields(&format!("type={TLS_SECRET_TYPE}"));
        let secret_cache = secrets.clone();
        let secret_watch = watcher(secret_api, secret_config)
            .default_backoff()
            .for_each(move |event| {
                match event {
                    Ok(event) => secret_cache.apply_event(&event),
                    Err(error) => tracing::warn!(%error, "Secret watch failed; retrying"),
                }
                std::future::ready(())
            });

        let nodes = NodeCache::new(reader);
        let node_api: Api<SeiNode> = Api::all(client);
        let node_cache = nodes.clone();
        let node_watch = reflector::reflector(
            writer,
            watcher(node_api, watcher::Config::default()).default_backoff(),
        )
        .for_each(move |event| {
            match event {
                Ok(watcher::Event::InitDone) => node_cache.mark_synced(),
                Ok(_) => {}
                Err(error) => tracing::warn!(%error, "SeiNode watch failed; retrying"),
            }
            std::future::ready(())
        });

        let run = async move {
            futures::future::join(secret_watch, node_watch).await;
        };
        (Self { secrets, nodes }, run)
    }

    pub fn is_synced(&self) -> bool {
        self.secrets.is_synced() && self.nodes.is_synced()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;

    fn secret(name: &str, resource_version: &str) -> Secret {
        Secret {
            metadata: ObjectMeta {
                name: Some(name.to_owned()),
                namespace: Some("sei".to_owned()),
                resource_version: Some(resource_version.to_owned()),
                ..ObjectMeta::default()
            },
            type_: Some(TLS_SECRET_TYPE.to_owned()),
            ..Secret::default()
        }
    }

    #[test]
    fn each_secret_version_is_parsed_once_across_events_and_relists() {
        let cache = SecretCache::new();
        cache.apply_event(&watcher::Event::Init);
        cache.apply_event(&watcher::Event::InitApply(secret("a", "1")));
        cache.apply_event(&watcher::Event::InitDone);
        assert_eq!(cache.inspections(), 1);
        // The same version again (a re-delivered event, a relist): no new parse.
        cache.apply_event(&watcher::Event::Apply(secret("a", "1")));
        cache.apply_event(&watcher::Event::Init);
        cache.apply_event(&watcher::Event::InitApply(secret("a", "1")));
        cache.apply_event(&watcher::Event::InitDone);
        assert_eq!(cache.inspections(), 1);
        assert!(matches!(cache.lookup("sei", "a"), CachedLookup::Found(_)));
        // A new version is parsed; a deleted Secret is gone.
        cache.apply_event(&watcher::Event::Apply(secret("a", "2")));
        assert_eq!(cache.inspections(), 2);
        cache.apply_event(&watcher::Event::Delete(secret("a", "2")));
        assert!(matches!(cache.lookup("sei", "a"), CachedLookup::NotFound));
    }

    #[test]
    fn lookups_before_the_first_list_are_unavailable_not_missing() {
        let cache = SecretCache::new();
        assert!(matches!(
            cache.lookup("sei", "a"),
            CachedLookup::Unavailable(NOT_SYNCED)
        ));
    }
}
