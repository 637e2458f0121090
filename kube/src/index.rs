//! Which SeiNodes name which Secret, fed by a SeiNode watch: the controller wakes exactly a
//! Secret's nodes when it changes, and the webhook's Secret guard finds the nodes a change would
//! break, neither by scanning every node.

use parking_lot::RwLock;
use std::collections::{BTreeSet, HashMap};

use kube::ResourceExt;
use kube::runtime::reflector::ObjectRef;
use kube::runtime::watcher;
use seinode_tls_crds::SeiNode;

type SecretKey = (String, String);

#[derive(Default)]
pub struct SecretIndex {
    inner: RwLock<Inner>,
}

#[derive(Default)]
struct Inner {
    by_secret: HashMap<SecretKey, BTreeSet<String>>,
    by_node: HashMap<(String, String), SecretKey>,
    relist: Option<Vec<(String, String, SecretKey)>>,
}

impl Inner {
    fn unlink(&mut self, node: &(String, String)) {
        if let Some(secret) = self.by_node.remove(node)
            && let Some(nodes) = self.by_secret.get_mut(&secret)
        {
            nodes.remove(&node.1);
            if nodes.is_empty() {
                self.by_secret.remove(&secret);
            }
        }
    }

    fn link(&mut self, node: (String, String), secret: SecretKey) {
        self.unlink(&node);
        self.by_secret
            .entry(secret.clone())
            .or_default()
            .insert(node.1.clone());
        self.by_node.insert(node, secret);
    }
}

fn entry(node: &SeiNode) -> ((String, String), Option<SecretKey>) {
    let ns = node.namespace().unwrap_or_default();
    let key = (ns.clone(), node.name_any());
    (
        key,
        node.sidecar_tls().map(|tls| (ns, tls.secret_name.clone())),
    )
}

impl SecretIndex {
    /// Follows the SeiNode watch.
    pub fn apply(&self, event: &watcher::Event<SeiNode>) {
        let mut inner = self.inner.write();
        match event {
            watcher::Event::Apply(node) => match entry(node) {
                (key, Some(secret)) => inner.link(key, secret),
                (key, None) => inner.unlink(&key),
            },
            watcher::Event::Delete(node) => inner.unlink(&entry(node).0),
            watcher::Event::Init => inner.relist = Some(Vec::new()),
            watcher::Event::InitApply(node) => {
                if let (key, Some(secret)) = entry(node) {
                    inner
                        .relist
                        .get_or_insert_with(Vec::new)
                        .push((key.0, key.1, secret));
                }
            }
            watcher::Event::InitDone => {
                let fresh = inner.relist.take().unwrap_or_default();
                inner.by_secret.clear();
                inner.by_node.clear();
                for (ns, name, secret) in fresh {
                    inner.link((ns, name), secret);
                }
            }
        }
    }

    /// The (namespace, name) of every Secret some node names.
    pub fn secrets(&self) -> std::collections::HashSet<SecretKey> {
        self.inner.read().by_secret.keys().cloned().collect()
    }

    /// Whether some node names Secret `namespace/name`.
    pub fn is_named(&self, namespace: &str, name: &str) -> bool {
        let inner = self.inner.read();
        inner
            .by_secret
            .contains_key(&(namespace.to_owned(), name.to_owned()))
    }

    /// The nodes that name Secret `namespace/name`, by name.
    pub fn nodes_for(&self, namespace: &str, name: &str) -> Vec<ObjectRef<SeiNode>> {
        let inner = self.inner.read();
        inner
            .by_secret
            .get(&(namespace.to_owned(), name.to_owned()))
            .map(|nodes| {
                nodes
                    .iter()
                    .map(|n| ObjectRef::new(n).within(namespace))
                    .collect()
            })
            .unwrap_or_default()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use seinode_tls_crds::{SeiNodeSpec, SidecarSpec, SidecarTls};

    fn node(name: &str, secret: Option<&str>) -> SeiNode {
        let mut node = SeiNode::new(
            name,
            SeiNodeSpec {
                sidecar: secret.map(|s| SidecarSpec {
                    tls: Some(SidecarTls {
                        secret_name: s.to_owned(),
                    }),
                    ..SidecarSpec::default()
                }),
                ..SeiNodeSpec::default()
            },
        );
        node.metadata.namespace = Some("sei".to_owned());
        node
    }

    fn names(refs: Vec<ObjectRef<SeiNode>>) -> Vec<String> {
        refs.into_iter().map(|r| r.name).collect()
    }

    #[test]
    fn maps_a_secret_to_exactly_the_nodes_that_name_it() {
        let index = SecretIndex::default();
        for event in [
            watcher::Event::Init,
            watcher::Event::InitApply(node("a", Some("shared"))),
            watcher::Event::InitApply(node("b", Some("shared"))),
            watcher::Event::InitApply(node("c", Some("own"))),
            watcher::Event::InitApply(node("d", None)),
            watcher::Event::InitDone,
        ] {
            index.apply(&event);
        }
        assert_eq!(names(index.nodes_for("sei", "shared")), ["a", "b"]);
        assert_eq!(names(index.nodes_for("sei", "own")), ["c"]);
        assert!(index.nodes_for("other", "shared").is_empty(), "namespaced");

        index.apply(&watcher::Event::Delete(node("a", Some("shared"))));
        assert_eq!(names(index.nodes_for("sei", "shared")), ["b"]);
        index.apply(&watcher::Event::Apply(node("e", Some("own"))));
        assert_eq!(names(index.nodes_for("sei", "own")), ["c", "e"]);
    }

    #[test]
    fn a_relist_replaces_the_index() {
        let index = SecretIndex::default();
        index.apply(&watcher::Event::Apply(node("gone", Some("s"))));
        index.apply(&watcher::Event::Init);
        index.apply(&watcher::Event::InitApply(node("kept", Some("s"))));
        assert_eq!(
            names(index.nodes_for("sei", "s")),
            ["gone"],
            "old view until the relist completes"
        );
        index.apply(&watcher::Event::InitDone);
        assert_eq!(names(index.nodes_for("sei", "s")), ["kept"]);
    }
}
