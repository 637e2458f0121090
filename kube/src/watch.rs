//! Watches of the whole cluster or of a list of namespaces, as one stream with cluster-watch
//! semantics.
//!
//! A namespace-scoped install may not list anything cluster-wide, so it runs one watcher per
//! namespace. Its consumers (a reflector store, `Controller::for_stream`, the controller's
//! Secret index, the webhook's Secret cache) read `Init … InitApply … InitDone` as "replace
//! everything you hold", so the per-namespace streams cannot simply be interleaved: namespace B's
//! relist would wipe namespace A's objects. [`merge_namespaces`] makes one stream of them that
//! reads like a cluster watch:
//!
//! - the first sync is one `Init`, an `InitApply` per object and one `InitDone`, sent once
//!   every namespace has listed; live events from a namespace that listed earlier are folded
//!   into that list, never lost;
//! - after it, a namespace's own relist (a 410 Gone, a reconnect) becomes an `Apply` per object
//!   listed and a `Delete` per object of that namespace the consumer holds and the relist no
//!   longer has;
//! - errors pass through; each namespace backs off on its own, so one failing namespace never
//!   stalls the others (the first sync does wait for it: a partial list is never reported as
//!   complete).
//!
//! To send those `Delete`s the merge keeps the last object it sent per key: namespaced mode holds
//! a second copy of what the consumers hold. Both the webhook and the controller watch through
//! here; apart from building the watchers it is pure stream plumbing, tested without a cluster.

use std::collections::{BTreeMap, HashSet};
use std::fmt::Debug;

use futures::stream::BoxStream;
use futures::{Stream, StreamExt};
use k8s_openapi::NamespaceResourceScope;
use kube::runtime::WatchStreamExt;
use kube::runtime::watcher::{self, Event, watcher};
use kube::{Api, Client, Resource, ResourceExt};
use serde::de::DeserializeOwned;
use thiserror::Error;

/// Where the co-processes watch: every namespace, or only the listed ones.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub enum WatchScope {
    /// Cluster-wide watches (`Api::all`): the default install.
    #[default]
    Cluster,
    /// One watch per namespace; nothing outside them is listed or watched.
    Namespaces(Vec<String>),
}

/// Why a list of namespaces cannot be watched.
#[derive(Debug, Clone, PartialEq, Eq, Error)]
pub enum WatchScopeError {
    #[error("the namespace list has an empty entry (a stray comma?)")]
    EmptyName,
    #[error(
        "{0:?} is not a namespace name: use a DNS-1123 label (at most 63 lowercase letters, \
         digits and '-', starting and ending with a letter or digit)"
    )]
    InvalidName(String),
    #[error("namespace {0:?} is listed twice")]
    Duplicate(String),
}

impl WatchScope {
    /// The scope of a comma-separated list of namespaces (blanks around names ignored); an
    /// empty or blank list is the whole cluster.
    pub fn parse(list: &str) -> Result<Self, WatchScopeError> {
        if list.trim().is_empty() {
            return Ok(WatchScope::Cluster);
        }
        Self::namespaces(list.split(',').map(str::trim))
    }

    /// The scope of these namespaces, checked: valid names, none twice. No names is the whole
    /// cluster.
    pub fn namespaces<S: AsRef<str>>(
        names: impl IntoIterator<Item = S>,
    ) -> Result<Self, WatchScopeError> {
        let mut seen = HashSet::new();
        let mut namespaces = Vec::new();
        for name in names {
            let name = name.as_ref();
            if name.is_empty() {
                return Err(WatchScopeError::EmptyName);
            }
            if !is_dns1123_label(name) {
                return Err(WatchScopeError::InvalidName(name.to_owned()));
            }
            if !seen.insert(name.to_owned()) {
                return Err(WatchScopeError::Duplicate(name.to_owned()));
            }
            namespaces.push(name.to_owned());
        }
        Ok(if namespaces.is_empty() {
            WatchScope::Cluster
        } else {
            WatchScope::Namespaces(namespaces)
        })
    }

    /// Whether objects of `namespace` are watched.
    pub fn includes(&self, namespace: &str) -> bool {
        match self {
            WatchScope::Cluster => true,
            WatchScope::Namespaces(namespaces) => namespaces.iter().any(|ns| ns == namespace),
        }
    }
}

impl std::str::FromStr for WatchScope {
    type Err = WatchScopeError;

    fn from_str(list: &str) -> Result<Self, Self::Err> {
        Self::parse(list)
    }
}

/// A namespace name as Kubernetes accepts it: a DNS-1123 label.
fn is_dns1123_label(name: &str) -> bool {
    let bytes = name.as_bytes();
    let inner = |b: &u8| b.is_ascii_lowercase() || b.is_ascii_digit() || *b == b'-';
    let end = |b: &u8| b.is_ascii_lowercase() || b.is_ascii_digit();
    !bytes.is_empty()
        && bytes.len() <= 63
        && bytes.iter().all(inner)
        && bytes.first().is_some_and(end)
        && bytes.last().is_some_and(end)
}

/// The events of a watch, as `kube::runtime::watcher` yields them.
pub type WatchEvents<K> = BoxStream<'static, Result<Event<K>, watcher::Error>>;

/// A watch of `K` over `scope` with `config`, each underlying watcher with the default backoff
/// (so callers add none: a backoff on the merged stream would pause every namespace when one
/// fails). `Cluster` is exactly `watcher(Api::all(client), config).default_backoff()`.
pub fn scoped_watcher<K>(
    client: Client,
    scope: &WatchScope,
    config: watcher::Config,
) -> WatchEvents<K>
where
    K: Resource<DynamicType = (), Scope = NamespaceResourceScope>
        + Clone
        + DeserializeOwned
        + Debug
        + Send
        + 'static,
{
    match scope {
        WatchScope::Cluster => watcher(Api::<K>::all(client), config)
            .default_backoff()
            .boxed(),
        WatchScope::Namespaces(namespaces) => merge_namespaces(
            namespaces
                .iter()
                // A scope built without `WatchScope::namespaces` may name one twice; two watches
                // of it would hold its objects twice and delete what the other still has.
                .collect::<std::collections::BTreeSet<_>>()
                .into_iter()
                .map(|ns| {
                    watcher(Api::<K>::namespaced(client.clone(), ns), config.clone())
                        .default_backoff()
                        .boxed()
                })
                .collect(),
        ),
    }
}

/// One stream with cluster-watch semantics from one watch per namespace (see the module docs).
/// With no namespace at all it reports an empty, completed list and then nothing.
pub fn merge_namespaces<K, S>(streams: Vec<S>) -> WatchEvents<K>
where
    K: Resource + Clone + Send + 'static,
    S: Stream<Item = Result<Event<K>, watcher::Error>> + Send + 'static,
{
    if streams.is_empty() {
        return futures::stream::iter([Ok(Event::Init), Ok(Event::InitDone)])
            .chain(futures::stream::pending())
            .boxed();
    }
    let mut merge = Merge::new(streams.len());
    let tagged = streams
        .into_iter()
        .enumerate()
        .map(|(index, stream)| stream.map(move |item| (index, item)).boxed());
    futures::stream::select_all(tagged)
        .flat_map(move |(index, item)| futures::stream::iter(merge.step(index, item)))
        .boxed()
}

// === impl Merge ===

/// The state of [`merge_namespaces`]: what each namespace's watch said, and what was sent.
struct Merge<K> {
    namespaces: Vec<NamespaceState<K>>,
    /// The first `Init` was sent.
    started: bool,
    /// The first `InitDone` was sent: from now on a relist is sent as `Apply`/`Delete`.
    synced: bool,
}

struct NamespaceState<K> {
    /// By name, the objects of this namespace the consumer holds (or, before the first sync,
    /// will be sent in it): the last version sent, which a synthesised `Delete` carries.
    held: BTreeMap<String, K>,
    /// The objects of a list in progress (between this namespace's `Init` and `InitDone`).
    listing: Option<BTreeMap<String, K>>,
    /// This namespace has completed a list.
    listed: bool,
}

impl<K> Default for NamespaceState<K> {
    fn default() -> Self {
        Self {
            held: BTreeMap::new(),
            listing: None,
            listed: false,
        }
    }
}

type Item<K> = Result<Event<K>, watcher::Error>;

impl<K: Resource + Clone> Merge<K> {
    fn new(namespaces: usize) -> Self {
        Self {
            namespaces: (0..namespaces).map(|_| NamespaceState::default()).collect(),
            started: false,
            synced: false,
        }
    }

    /// What the merged stream says after namespace `index`'s watch said `item`.
    fn step(&mut self, index: usize, item: Item<K>) -> Vec<Item<K>> {
        let event = match item {
            Ok(event) => event,
            Err(error) => return vec![Err(error)],
        };
        let synced = self.synced;
        let Some(state) = self.namespaces.get_mut(index) else {
            return Vec::new();
        };
        let mut out = Vec::new();
        match event {
            Event::Init => {
                state.listing = Some(BTreeMap::new());
                if !self.started {
                    self.started = true;
                    out.push(Ok(Event::Init));
                }
            }
            Event::InitApply(object) => {
                state
                    .listing
                    .get_or_insert_with(BTreeMap::new)
                    .insert(object.name_any(), object);
            }
            Event::InitDone => {
                let listed = state.listing.take().unwrap_or_default();
                state.listed = true;
                let previous = std::mem::replace(&mut state.held, listed);
                if synced {
                    for (name, object) in previous {
                        if !state.held.contains_key(&name) {
                            out.push(Ok(Event::Delete(object)));
                        }
                    }
                    out.extend(state.held.values().cloned().map(|o| Ok(Event::Apply(o))));
                } else if self.namespaces.iter().all(|ns| ns.listed) {
                    out.extend(self.first_sync());
                }
            }
            // A watcher sends live events only between lists; one inside a list is kept in it.
            Event::Apply(object) => {
                let name = object.name_any();
                match &mut state.listing {
                    Some(listing) => {
                        listing.insert(name, object);
                    }
                    None if synced => {
                        state.held.insert(name, object.clone());
                        out.push(Ok(Event::Apply(object)));
                    }
                    // Folded into the first sync.
                    None => {
                        state.held.insert(name, object);
                    }
                }
            }
            Event::Delete(object) => {
                let name = object.name_any();
                match &mut state.listing {
                    Some(listing) => {
                        listing.remove(&name);
                    }
                    None => {
                        state.held.remove(&name);
                        if synced {
                            out.push(Ok(Event::Delete(object)));
                        }
                    }
                }
            }
        }
        out
    }

    /// The first complete list: every namespace's objects between one `Init` and `InitDone`.
    fn first_sync(&mut self) -> Vec<Item<K>> {
        self.synced = true;
        let mut out = Vec::new();
        if !self.started {
            self.started = true;
            out.push(Ok(Event::Init));
        }
        for state in &self.namespaces {
            out.extend(
                state
                    .held
                    .values()
                    .cloned()
                    .map(|o| Ok(Event::InitApply(o))),
            );
        }
        out.push(Ok(Event::InitDone));
        out
    }
}

#[cfg(test)]
mod tests;
