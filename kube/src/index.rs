//! Which SeiNodes name which Secret, fed by a SeiNode watch: the controller wakes exactly a
//! Secret's nodes when it changes, and the webhook's Secret guard finds the nodes a change would
//! break, neither by scanning every node.

use parking_lot::RwLock;
use std::collections::{BTreeSet, HashMap};

use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;
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

/// What the index reads of a node: its namespace and name, and the Secret it names.
pub trait NamesSecret: ResourceExt {
    /// `spec.sidecar.tls.secretName`, when TLS is on.
    fn secret_name(&self) -> Option<&str>;
}

impl NamesSecret for SeiNode {
    fn secret_name(&self) -> Option<&str> {
        self.sidecar_tls().map(|tls| tls.secret_name.as_str())
    }
}

/// A SeiNode as a watch that only feeds the index decodes it: its name, namespace, uid and
/// version, and the Secret it names. Its status, labels, annotations and managedFields are skipped in
/// the decoding, not decoded and dropped: the webhook's watch sees every status write of every
/// node.
#[derive(Clone, Debug, serde::Deserialize)]
#[serde(from = "wire::Node")]
pub struct NodeSecretRef {
    metadata: ObjectMeta,
    secret_name: Option<String>,
}

impl NamesSecret for NodeSecretRef {
    fn secret_name(&self) -> Option<&str> {
        self.secret_name.as_deref()
    }
}

crate::slim::resource_as!(NodeSecretRef, SeiNode);

/// The wire shape of [`NodeSecretRef`]: every other field of the object is skipped.
mod wire {
    use serde::Deserialize;

    #[derive(Deserialize)]
    pub struct Node {
        #[serde(default)]
        metadata: crate::slim::Meta,
        #[serde(default)]
        spec: Spec,
    }

    #[derive(Deserialize, Default)]
    struct Spec {
        sidecar: Option<Sidecar>,
    }

    #[derive(Deserialize)]
    struct Sidecar {
        tls: Option<Tls>,
    }

    #[derive(Deserialize)]
    #[serde(rename_all = "camelCase")]
    struct Tls {
        secret_name: String,
    }

    impl From<Node> for super::NodeSecretRef {
        fn from(node: Node) -> Self {
            Self {
                metadata: node.metadata.into(),
                secret_name: node
                    .spec
                    .sidecar
                    .and_then(|sidecar| sidecar.tls)
                    .map(|tls| tls.secret_name),
            }
        }
    }
}

fn entry(node: &impl NamesSecret) -> ((String, String), Option<SecretKey>) {
    let ns = node.namespace().unwrap_or_default();
    let key = (ns.clone(), node.name_any());
    (
        key,
        node.secret_name().map(|secret| (ns, secret.to_owned())),
    )
}

impl SecretIndex {
    /// Follows the SeiNode watch.
    pub fn apply(&self, event: &watcher::Event<impl NamesSecret>) {
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
        index.apply(&watcher::Event::<SeiNode>::Init);
        index.apply(&watcher::Event::InitApply(node("kept", Some("s"))));
        assert_eq!(
            names(index.nodes_for("sei", "s")),
            ["gone"],
            "old view until the relist completes"
        );
        index.apply(&watcher::Event::<SeiNode>::InitDone);
        assert_eq!(names(index.nodes_for("sei", "s")), ["kept"]);
    }

    /// A SeiNode as the API server sends it: status, labels and managedFields included.
    fn wire(name: &str, tls: Option<&str>) -> serde_json::Value {
        let mut spec =
            serde_json::json!({"chainId": "arctic-1", "image": "sei:v6", "fullNode": {}});
        if let Some(secret) = tls {
            spec["sidecar"] = serde_json::json!({"port": 7777, "tls": {"secretName": secret}});
        }
        serde_json::json!({
            "apiVersion": "sei.io/v1alpha1", "kind": "SeiNode",
            "metadata": {
                "name": name, "namespace": "sei", "uid": "u-1", "resourceVersion": "42",
                "labels": {"team": "rpc"},
                "managedFields": [{"manager": "seinode-tls", "operation": "Update",
                    "subresource": "status", "fieldsType": "FieldsV1",
                    "fieldsV1": {"f:status": {"f:conditions": {".": {}}}}}],
            },
            "spec": spec,
            "status": {"phase": "Running", "conditions": [{"type": "Ready", "status": "True",
                "reason": "NodeReady", "message": "", "lastTransitionTime": "2026-12-07T00:00:00Z"}]},
        })
    }

    #[test]
    fn a_node_secret_ref_decodes_the_key_and_the_secret_name_only() {
        let cases = [("tls", Some("tls-secret")), ("plain", None)];
        for (name, secret) in cases {
            let decoded: NodeSecretRef = serde_json::from_value(wire(name, secret)).unwrap();
            let full: SeiNode = serde_json::from_value(wire(name, secret)).unwrap();
            assert_eq!(decoded.secret_name(), full.secret_name(), "{name}");
            assert_eq!(decoded.secret_name(), secret, "{name}");
            let meta = &decoded.metadata;
            assert_eq!(
                (meta.name.as_deref(), meta.namespace.as_deref()),
                (Some(name), Some("sei"))
            );
            assert_eq!(
                (meta.uid.as_deref(), meta.resource_version.as_deref()),
                (Some("u-1"), Some("42"))
            );
            assert!(
                meta.managed_fields.is_none() && meta.labels.is_none(),
                "{name}"
            );
        }
        // The index reads both alike.
        let (slim, whole) = (SecretIndex::default(), SecretIndex::default());
        for name in ["a", "b"] {
            let slim_node: NodeSecretRef = serde_json::from_value(wire(name, Some("s"))).unwrap();
            slim.apply(&watcher::Event::Apply(slim_node));
            let whole_node: SeiNode = serde_json::from_value(wire(name, Some("s"))).unwrap();
            whole.apply(&watcher::Event::Apply(whole_node));
        }
        assert_eq!(names(slim.nodes_for("sei", "s")), ["a", "b"]);
        assert_eq!(
            names(slim.nodes_for("sei", "s")),
            names(whole.nodes_for("sei", "s"))
        );
    }

    #[test]
    fn a_node_secret_ref_is_a_seinode_to_the_api() {
        use kube::Resource as _;
        assert_eq!(
            NodeSecretRef::url_path(&(), Some("sei")),
            SeiNode::url_path(&(), Some("sei"))
        );
        assert_eq!(NodeSecretRef::api_version(&()), SeiNode::api_version(&()));
    }
}
