//! Watch-fed caches, so that admission answers from memory.
//!
//! - [`SecretCache`]: the name and resourceVersion of every `kubernetes.io/tls` Secret (a
//!   metadata-only watch), and the inspection ([`inspect_tls_secret`], without the leaf or
//!   `ca.crt` bytes, which no admission decision reads) only of Secrets a decision asked for:
//!   fetched with one bounded GET when a new SeiNode names one, kept while some SeiNode names
//!   it and its resourceVersion holds. What a tenant's Secrets can make the webhook hold is a
//!   few hundred bytes each, whatever their size.
//! - [`NodeCache`]: which SeiNodes name which Secret, for the Secret guard's "who uses this
//!   Secret?".

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use futures::StreamExt;
use k8s_openapi::api::core::v1::Secret;
use kube::runtime::watcher;
use kube::{Client, ResourceExt};
use seinode_tls_crds::validation::{
    InspectedSecret, LeafCertificate, SecretLookup, TLS_SECRET_TYPE, inspect_tls_secret,
};
use seinode_tls_kube::index::{NamesSecret, NodeSecretRef, SecretIndex};
use seinode_tls_kube::inspections::{Current, Inspections};
use seinode_tls_kube::versions::{SecretVersions, watch_tls_secrets};
use seinode_tls_kube::watch::{WatchScope, scoped_watcher};

use crate::metrics::WebhookMetrics;

/// Cause given while the Secret cache has not completed its first list.
pub const NOT_SYNCED: &str = "the webhook's Secret cache has not finished its first sync";
/// Cause given when the on-demand read of a Secret failed or took too long.
pub const NOT_READ: &str = "the webhook could not read the Secret in time";

/// The on-demand GET of a Secret gets this long (the whole answer has `--request-deadline`).
const READ_TIMEOUT: Duration = Duration::from_secs(1);
/// An inspection naming more DNS bytes than this is not kept (it is read again when needed).
const MAX_RETAINED_DNS_BYTES: usize = 16 << 10;
/// How often inspections of Secrets that no SeiNode names are dropped.
const PRUNE_INTERVAL: Duration = Duration::from_secs(60);

type Key = (String, String);

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

/// TLS Secrets by namespace and name: every one's resourceVersion, and the inspections a
/// decision needed.
pub struct SecretCache {
    /// resourceVersion by Secret, from the metadata watch (or a read).
    versions: SecretVersions,
    inspections: Inspections,
    synced: AtomicBool,
    /// For the on-demand read of a Secret a decision needs.
    client: Client,
    metrics: Arc<WebhookMetrics>,
}

impl SecretCache {
    /// An empty cache, not synced, that reads a Secret through `client` when a decision needs
    /// its content.
    pub fn new(client: Client, metrics: Arc<WebhookMetrics>) -> Self {
        Self {
            versions: SecretVersions::default(),
            inspections: Inspections::new(retainable),
            synced: AtomicBool::new(false),
            client,
            metrics,
        }
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
        self.inspections.parsed()
    }

    /// (TLS Secrets known, inspections held).
    pub fn sizes(&self) -> (usize, usize) {
        (self.versions.len(), self.inspections.len())
    }

    /// The resourceVersion the cache knows of a Secret; `None` when it knows no such Secret.
    fn version(&self, namespace: &str, name: &str) -> Option<Option<String>> {
        self.versions.get(namespace, name)
    }

    /// Whether the cache holds the inspection of the current version of this Secret (tests).
    pub fn holds_inspection(&self, namespace: &str, name: &str) -> bool {
        self.version(namespace, name).is_some_and(|v| {
            self.inspections
                .held(namespace, name, v.as_deref())
                .is_some()
        })
    }

    pub fn lookup(&self, namespace: &str, name: &str) -> CachedLookup {
        if !self.is_synced() {
            return CachedLookup::Unavailable(NOT_SYNCED);
        }
        match self.version(namespace, name) {
            Some(version) => match self.inspections.held(namespace, name, version.as_deref()) {
                Some(inspected) => CachedLookup::Found(inspected),
                None => CachedLookup::Unavailable(NOT_READ),
            },
            None => CachedLookup::NotFound,
        }
    }

    /// The inspection of `secret` as the Secret guard sees it in a review: the held one when
    /// this is the version the cache read, else a fresh one (not kept: only reads are).
    pub fn inspect(&self, secret: &Secret) -> Arc<InspectedSecret> {
        let namespace = secret.metadata.namespace.as_deref().unwrap_or_default();
        let name = secret.metadata.name.as_deref().unwrap_or_default();
        self.inspections
            .held(namespace, name, secret.metadata.resource_version.as_deref())
            .unwrap_or_else(|| Arc::new(inspect_tls_secret(secret)))
    }

    /// Makes sure [`SecretCache::lookup`] can answer for a Secret the watch knows: reads it
    /// unless the inspection of its current version is held ([`Inspections::held_or_read`], as
    /// the controller's Secret judge does: one GET at the version the watch reported, which the
    /// API server serves from its cache, or a quorum read if the cache has not answered within
    /// `CACHE_READ_PATIENCE`; at most [`READ_TIMEOUT`] in all). A failed read is logged and
    /// counted; the lookup then says the Secret could not be read.
    pub async fn ensure(&self, namespace: &str, name: &str) {
        if !self.is_synced() {
            return;
        }
        let Some(version) = self.version(namespace, name) else {
            return;
        };
        let read = self
            .inspections
            .held_or_read(&self.client, namespace, name, version.as_deref());
        let result = match tokio::time::timeout(READ_TIMEOUT, read).await {
            Ok(Ok(Current::Held(_))) => return,
            Ok(Ok(Current::Read(secret))) => Ok(secret),
            Ok(Err(error)) => Err(seinode_tls_crds::error_chain(&error)),
            Err(_) => Err(format!("no answer within {READ_TIMEOUT:?}")),
        };
        // Each outcome is recorded only if the watch has not moved the Secret while the read was
        // in flight: the watch's word is then the newer one.
        let outcome = match result {
            Ok(Some(secret)) if secret.type_.as_deref() == Some(TLS_SECRET_TYPE) => {
                let read = secret.metadata.resource_version.as_deref();
                if self
                    .versions
                    .replace_if(namespace, name, version.as_deref(), read)
                {
                    self.inspections
                        .forget_other_versions(namespace, name, read);
                    self.inspections.of(&secret);
                    self.publish_sizes();
                }
                "read"
            }
            // Gone (or retyped) since the watch saw it: the watch will say so too.
            Ok(_) => {
                if self.versions.remove_if(namespace, name, version.as_deref()) {
                    self.inspections.remove(namespace, name);
                    self.publish_sizes();
                }
                "not_found"
            }
            Err(cause) => {
                tracing::warn!(namespace, name, %cause, "cannot read a Secret a SeiNode names");
                "failed"
            }
        };
        self.metrics.count_secret_read(outcome);
    }

    /// Records a Secret with its content, as a read would, parsing it unless this
    /// resourceVersion was parsed already; Secrets of another type are removed. What tests,
    /// benchmarks and fuzz targets fill the cache with, where no API server serves reads.
    pub fn apply(&self, secret: &Secret) {
        let (namespace, name) = key_of(secret);
        if secret.type_.as_deref() != Some(TLS_SECRET_TYPE) {
            self.remove(&namespace, &name);
            return;
        }
        self.inspections.of(secret);
        self.apply_meta(
            &namespace,
            &name,
            secret.metadata.resource_version.as_deref(),
        );
    }

    /// Records what the metadata watch says of a Secret: its version. The inspection of another
    /// version is dropped.
    pub fn apply_meta(&self, namespace: &str, name: &str, resource_version: Option<&str>) {
        self.inspections
            .forget_other_versions(namespace, name, resource_version);
        self.versions.set(namespace, name, resource_version);
        self.publish_sizes();
    }

    pub fn remove(&self, namespace: &str, name: &str) {
        self.versions.remove(namespace, name);
        self.inspections.remove(namespace, name);
        self.publish_sizes();
    }

    /// Drops the inspections of Secrets for which `keep(namespace, name)` is false (their names
    /// and versions stay known).
    pub fn retain_inspections(&self, keep: impl Fn(&str, &str) -> bool) {
        self.inspections.retain(keep);
        self.publish_sizes();
    }

    fn publish_sizes(&self) {
        let (known, inspected) = self.sizes();
        self.metrics.secret_cache_known.set(known as i64);
        self.metrics.secret_cache_inspected.set(inspected as i64);
    }

    /// Applies one event of the metadata watch: the versions follow it, the inspections of
    /// versions it moved past or Secrets it no longer lists are dropped, and its first
    /// completed list makes the cache synced.
    pub fn apply_meta_event(&self, event: &watcher::Event<impl ResourceExt>) {
        self.versions.apply(event);
        match event {
            watcher::Event::Init => return,
            watcher::Event::InitApply(secret) | watcher::Event::Apply(secret) => {
                let (namespace, name) = key_of(secret);
                let version = secret.meta().resource_version.as_deref();
                self.inspections
                    .forget_other_versions(&namespace, &name, version);
            }
            watcher::Event::Delete(secret) => {
                let (namespace, name) = key_of(secret);
                self.inspections.remove(&namespace, &name);
            }
            watcher::Event::InitDone => {
                self.inspections
                    .retain(|ns, name| self.versions.contains(ns, name));
                self.mark_synced();
            }
        }
        self.publish_sizes();
    }
}

/// What the cache keeps of an inspection: no leaf or `ca.crt` bytes (no admission decision
/// reads them), and nothing at all for a certificate with an outsized list of names.
fn retainable(inspected: InspectedSecret) -> Option<InspectedSecret> {
    let trimmed = match inspected {
        InspectedSecret::Usable(leaf) => {
            let dns_bytes: usize = leaf.dns_names.iter().map(String::len).sum();
            if dns_bytes > MAX_RETAINED_DNS_BYTES {
                return None;
            }
            InspectedSecret::Usable(LeafCertificate {
                der: Vec::new(),
                ca_crt: None,
                ..leaf
            })
        }
        // Our own one-line message.
        defective @ InspectedSecret::Defective { .. } => defective,
    };
    Some(trimmed)
}

fn key_of<K: ResourceExt>(secret: &K) -> Key {
    (secret.namespace().unwrap_or_default(), secret.name_any())
}

/// Which SeiNodes name which Secret (all the guard and the pruning need of them), fed by the
/// SeiNode watch through [`NodeCache::apply`].
#[derive(Clone, Default)]
pub struct NodeCache {
    index: Arc<SecretIndex>,
    synced: Arc<AtomicBool>,
}

impl NodeCache {
    pub fn new() -> Self {
        Self::default()
    }

    /// Follows the SeiNode watch; its first complete list marks the cache synced.
    pub fn apply(&self, event: &watcher::Event<impl NamesSecret>) {
        self.index.apply(event);
        if matches!(event, watcher::Event::InitDone) {
            self.mark_synced();
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

    /// The (namespace, name) of every Secret some SeiNode names.
    pub fn secrets_named(&self) -> std::collections::HashSet<Key> {
        self.index.secrets()
    }

    /// The names of the SeiNodes in `namespace` whose `spec.sidecar.tls.secretName` is
    /// `secret`, sorted.
    pub fn using_secret(&self, namespace: &str, secret: &str) -> Vec<String> {
        self.index
            .nodes_for(namespace, secret)
            .into_iter()
            .map(|node| node.name)
            .collect()
    }
}

/// Both caches, and the future that feeds them.
pub struct Caches {
    pub secrets: Arc<SecretCache>,
    pub nodes: NodeCache,
}

impl Caches {
    pub fn watch(
        client: Client,
        metrics: Arc<WebhookMetrics>,
        scope: &WatchScope,
    ) -> (Self, impl Future<Output = ()> + Send + 'static) {
        let secrets = Arc::new(SecretCache::new(client.clone(), metrics));

        // Metadata only: a tenant's Secrets cost the webhook their names, not their bytes.
        let secret_cache = secrets.clone();
        let secret_watch = watch_tls_secrets(client.clone(), scope).for_each(move |event| {
            match event {
                Ok(event) => secret_cache.apply_meta_event(&event),
                Err(error) => tracing::warn!(%error, "Secret watch failed; retrying"),
            }
            std::future::ready(())
        });

        let nodes = NodeCache::new();
        let node_cache = nodes.clone();
        let node_watch = scoped_watcher::<NodeSecretRef>(client, scope, watcher::Config::default())
            .for_each(move |event| {
                match event {
                    Ok(event) => node_cache.apply(&event),
                    Err(error) => tracing::warn!(%error, "SeiNode watch failed; retrying"),
                }
                std::future::ready(())
            });

        // Inspections read for a SeiNode that was never created, or whose Secret it no longer
        // names, are dropped.
        let (prune_secrets, prune_nodes) = (secrets.clone(), nodes.clone());
        let prune = async move {
            let mut every = tokio::time::interval(PRUNE_INTERVAL);
            loop {
                every.tick().await;
                let named = prune_nodes.secrets_named();
                prune_secrets.retain_inspections(|ns, name| {
                    named.contains(&(ns.to_owned(), name.to_owned()))
                });
            }
        };

        let run = async move {
            futures::future::join3(secret_watch, node_watch, prune).await;
        };
        (Self { secrets, nodes }, run)
    }

    pub fn is_synced(&self) -> bool {
        self.secrets.is_synced() && self.nodes.is_synced()
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use super::*;
    use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;
    use kube::core::PartialObjectMeta;

    /// An event of the Secret metadata watch.
    type MetaEvent = watcher::Event<PartialObjectMeta<Secret>>;

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

    fn meta(name: &str, resource_version: &str) -> PartialObjectMeta<Secret> {
        PartialObjectMeta {
            metadata: secret(name, resource_version).metadata,
            ..PartialObjectMeta::default()
        }
    }

    /// A cache whose reads reach no API server (they fail at once), with its metrics.
    fn cache_without_api_server() -> (SecretCache, prometheus_client::registry::Registry) {
        let mut registry = prometheus_client::registry::Registry::default();
        let metrics = Arc::new(WebhookMetrics::register(&mut registry));
        let client = seinode_tls_testkit::no_api_server();
        (SecretCache::new(client, metrics), registry)
    }

    #[tokio::test]
    async fn each_secret_version_is_parsed_once_and_kept_only_while_its_version_holds() {
        let (cache, _) = cache_without_api_server();
        cache.apply_meta_event(&MetaEvent::Init);
        cache.apply_meta_event(&MetaEvent::InitApply(meta("a", "1")));
        cache.apply_meta_event(&MetaEvent::InitDone);
        // Known, not read: the metadata watch carries no content.
        assert_eq!(cache.inspections(), 0);
        assert!(matches!(
            cache.lookup("sei", "a"),
            CachedLookup::Unavailable(NOT_READ)
        ));
        cache.apply(&secret("a", "1"));
        assert_eq!(cache.inspections(), 1);
        // The same version again (a re-delivered event, a relist, a second read): no new parse.
        cache.apply(&secret("a", "1"));
        cache.apply_meta_event(&MetaEvent::Apply(meta("a", "1")));
        cache.apply_meta_event(&MetaEvent::Init);
        cache.apply_meta_event(&MetaEvent::InitApply(meta("a", "1")));
        cache.apply_meta_event(&MetaEvent::InitDone);
        assert_eq!(cache.inspections(), 1);
        assert!(matches!(cache.lookup("sei", "a"), CachedLookup::Found(_)));
        // A new version drops the old inspection; a deleted Secret is gone.
        cache.apply_meta_event(&MetaEvent::Apply(meta("a", "2")));
        assert!(!cache.holds_inspection("sei", "a"));
        cache.apply_meta_event(&MetaEvent::Delete(meta("a", "2")));
        assert!(matches!(cache.lookup("sei", "a"), CachedLookup::NotFound));
        assert_eq!(cache.sizes(), (0, 0));
    }

    #[tokio::test]
    async fn inspections_keep_no_certificate_bytes_and_are_dropped_when_no_node_names_them() {
        let leaf = LeafCertificate {
            not_before: jiff::Timestamp::UNIX_EPOCH,
            not_after: jiff::Timestamp::MAX,
            dns_names: vec!["rpc.sei.svc".to_owned()],
            der: vec![1; 2048],
            ca_crt: Some(vec![2; 1 << 20]),
            issuers: Vec::new(),
        };
        let kept = retainable(InspectedSecret::Usable(leaf.clone())).unwrap();
        let InspectedSecret::Usable(kept) = &kept else {
            panic!("{kept:?}")
        };
        assert!(kept.der.is_empty() && kept.ca_crt.is_none());
        assert_eq!(kept.dns_names, leaf.dns_names);
        let outsized = LeafCertificate {
            dns_names: vec!["x".repeat(100); 200],
            ..leaf
        };
        assert!(retainable(InspectedSecret::Usable(outsized)).is_none());

        let (cache, _) = cache_without_api_server();
        cache.mark_synced();
        cache.apply(&secret("a", "1"));
        cache.apply(&secret("b", "1"));
        cache.retain_inspections(|_, name| name == "a");
        assert!(cache.holds_inspection("sei", "a"));
        assert!(!cache.holds_inspection("sei", "b"));
        assert_eq!(cache.sizes(), (2, 1));
    }

    #[tokio::test]
    async fn a_failed_read_is_counted_and_leaves_the_secret_unavailable_not_missing() {
        let (cache, registry) = cache_without_api_server();
        cache.mark_synced();
        cache.apply_meta("sei", "a", Some("1"));
        cache.ensure("sei", "a").await;
        assert!(matches!(
            cache.lookup("sei", "a"),
            CachedLookup::Unavailable(NOT_READ)
        ));
        let mut text = String::new();
        prometheus_client::encoding::text::encode(&mut text, &registry).unwrap();
        assert!(
            text.contains(r#"webhook_secret_reads_total{result="failed"} 1"#),
            "{text}"
        );
    }

    /// A client whose GET of `sei/a` answers `answer` (a 404 if `None`) once the test lets it,
    /// having said that the read arrived.
    fn held_read(
        answer: Option<Secret>,
    ) -> (
        Client,
        tokio::sync::mpsc::UnboundedReceiver<()>,
        tokio::sync::oneshot::Sender<()>,
    ) {
        let (arrived_tx, arrived_rx) = tokio::sync::mpsc::unbounded_channel();
        let (release_tx, release_rx) = tokio::sync::oneshot::channel::<()>();
        let release = Arc::new(parking_lot::Mutex::new(Some(release_rx)));
        let service = tower::service_fn(move |_: http::Request<kube::client::Body>| {
            let _ = arrived_tx.send(());
            let release = release.lock().take();
            let answer = answer.clone();
            async move {
                if let Some(release) = release {
                    let _ = release.await;
                }
                let (code, body) = seinode_tls_testkit::get_answer(answer.as_ref());
                http::Response::builder()
                    .status(code)
                    .header("content-type", "application/json")
                    .body(kube::client::Body::from(body))
                    .map_err(|e| Box::new(e) as Box<dyn std::error::Error + Send + Sync>)
            }
        });
        (Client::new(service, "sei"), arrived_rx, release_tx)
    }

    /// The watch moves a Secret while a read of it is in flight: the read's older answer (its
    /// content, or that it is gone) must not replace what the watch reported.
    #[tokio::test]
    async fn a_read_overtaken_by_the_watch_leaves_the_watch_s_version() {
        for answer in [Some(secret("a", "2")), None] {
            let (client, mut arrived, release) = held_read(answer.clone());
            let mut registry = prometheus_client::registry::Registry::default();
            let metrics = Arc::new(WebhookMetrics::register(&mut registry));
            let cache = SecretCache::new(client, metrics);
            cache.mark_synced();
            cache.apply_meta("sei", "a", Some("1"));
            let overtake = async {
                arrived.recv().await;
                // Recreated, or changed again, while the read was in flight.
                cache.apply_meta_event(&MetaEvent::Apply(meta("a", "3")));
                let _ = release.send(());
            };
            let read = tokio::time::timeout(Duration::from_secs(10), async {
                tokio::join!(cache.ensure("sei", "a"), overtake)
            });
            read.await.expect("the read ends once released");
            assert_eq!(
                cache.version("sei", "a"),
                Some(Some("3".to_owned())),
                "a read answering {} replaced the watch's version",
                answer.map_or("not found", |_| "version 2")
            );
            assert!(matches!(
                cache.lookup("sei", "a"),
                CachedLookup::Unavailable(NOT_READ)
            ));
        }
    }

    #[tokio::test]
    async fn lookups_before_the_first_list_are_unavailable_not_missing() {
        let (cache, _) = cache_without_api_server();
        assert!(matches!(
            cache.lookup("sei", "a"),
            CachedLookup::Unavailable(NOT_SYNCED)
        ));
    }
}
