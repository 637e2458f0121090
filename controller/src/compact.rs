//! Owned objects as the controller's watches keep them: the metadata typed, the rest as the
//! API server's JSON (managedFields dropped).
//!
//! A k8s-openapi `StatefulSet` with the node's three containers takes about 26 KB of heap (every
//! optional field of a container, probe and pod spec is inline, every string its own
//! allocation); its JSON, a few KB. The stores hold one ConfigMap, Service and StatefulSet per
//! node, so at 1,000 nodes the typed StatefulSets alone were half the process's heap. The
//! reconcile that looks at an object parses what it needs from the JSON: once per reconcile, a
//! few microseconds beside the API calls around it.

use std::borrow::Cow;
use std::marker::PhantomData;
use std::sync::Arc;

use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;
use kube::Resource;
use serde::de::{DeserializeOwned, Error as _};
use serde::{Deserialize, Deserializer};

/// A `K` as watched: typed metadata, the whole object as compact JSON.
pub struct Compact<K> {
    metadata: ObjectMeta,
    json: Arc<[u8]>,
    kind: PhantomData<fn() -> K>,
}

impl<K: DeserializeOwned> Compact<K> {
    /// The object, parsed from its JSON. Drift is judged on this, through `K`, so an object reads
    /// the same whether it came from a watch event or a list (whose items carry no apiVersion or
    /// kind).
    pub fn object(&self) -> Result<K, serde_json::Error> {
        serde_json::from_slice(&self.json)
    }
}

impl<'de, K> Deserialize<'de> for Compact<K> {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        let mut value = serde_json::Value::deserialize(deserializer)?;
        let metadata = match value.get_mut("metadata") {
            Some(metadata) => {
                if let Some(fields) = metadata.as_object_mut() {
                    fields.remove("managedFields");
                }
                ObjectMeta::deserialize(&*metadata).map_err(D::Error::custom)?
            }
            None => ObjectMeta::default(),
        };
        let json = serde_json::to_vec(&value).map_err(D::Error::custom)?;
        Ok(Self {
            metadata,
            json: json.into(),
            kind: PhantomData,
        })
    }
}

impl<K> Clone for Compact<K> {
    fn clone(&self) -> Self {
        Self {
            metadata: self.metadata.clone(),
            json: self.json.clone(),
            kind: PhantomData,
        }
    }
}

impl<K> std::fmt::Debug for Compact<K> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Compact")
            .field("metadata", &self.metadata)
            .field("json_bytes", &self.json.len())
            .finish()
    }
}

impl<K: Resource<DynamicType = ()>> Resource for Compact<K> {
    type DynamicType = ();
    type Scope = K::Scope;

    fn kind(dt: &()) -> Cow<'_, str> {
        K::kind(dt)
    }

    fn group(dt: &()) -> Cow<'_, str> {
        K::group(dt)
    }

    fn version(dt: &()) -> Cow<'_, str> {
        K::version(dt)
    }

    fn plural(dt: &()) -> Cow<'_, str> {
        K::plural(dt)
    }

    fn meta(&self) -> &ObjectMeta {
        &self.metadata
    }

    fn meta_mut(&mut self) -> &mut ObjectMeta {
        &mut self.metadata
    }
}

#[cfg(test)]
mod tests {
    use k8s_openapi::api::apps::v1::{StatefulSet, StatefulSetStatus};
    use k8s_openapi::apimachinery::pkg::apis::meta::v1::ManagedFieldsEntry;

    use super::*;
    use crate::config::ControllerConfig;

    fn watched_stateful_set() -> StatefulSet {
        let node = crate::decide::tests::node("ghcr.io/sei-protocol/sei:v6.3.0", 1);
        let mut sts = crate::resources::stateful_set(&node, &ControllerConfig::default(), true)
            .expect("a StatefulSet for a valid node");
        sts.metadata.resource_version = Some("42".to_owned());
        sts.metadata.managed_fields = Some(vec![ManagedFieldsEntry {
            manager: Some("seinode-tls-controller".to_owned()),
            operation: Some("Apply".to_owned()),
            ..ManagedFieldsEntry::default()
        }]);
        sts.status = Some(StatefulSetStatus {
            replicas: 1,
            ready_replicas: Some(1),
            ..StatefulSetStatus::default()
        });
        sts
    }

    #[test]
    fn keeps_the_object_whole_but_its_managed_fields_with_typed_metadata() {
        let watched = watched_stateful_set();
        let json = serde_json::to_vec(&watched).unwrap();
        let compact: Compact<StatefulSet> = serde_json::from_slice(&json).unwrap();

        assert_eq!(compact.meta().name.as_deref(), Some("rpc"));
        assert_eq!(compact.meta().resource_version.as_deref(), Some("42"));
        assert_eq!(
            compact.meta().owner_references,
            watched.metadata.owner_references
        );
        assert!(compact.meta().managed_fields.is_none());
        let mut expected = watched.clone();
        expected.metadata.managed_fields = None;
        assert_eq!(compact.object().unwrap(), expected);
        assert_eq!(
            serde_json::to_value(compact.object().unwrap()).unwrap(),
            serde_json::to_value(&expected).unwrap()
        );
        assert!(
            compact.json.len() < json.len(),
            "managedFields are not kept"
        );
        assert_eq!(
            <Compact<StatefulSet> as Resource>::plural(&()),
            StatefulSet::plural(&())
        );
    }

    #[test]
    fn a_listed_object_reads_as_the_same_value_as_a_watched_one() {
        let watched = watched_stateful_set();
        let mut listed = serde_json::to_value(&watched).unwrap();
        // List items carry no apiVersion or kind.
        let fields = listed.as_object_mut().unwrap();
        fields.remove("apiVersion").unwrap();
        fields.remove("kind").unwrap();
        let listed: Compact<StatefulSet> = serde_json::from_value(listed).unwrap();
        let watched: Compact<StatefulSet> =
            serde_json::from_value(serde_json::to_value(&watched).unwrap()).unwrap();
        let value = |compact: &Compact<StatefulSet>| {
            serde_json::to_value(compact.object().unwrap()).unwrap()
        };
        assert_eq!(value(&listed), value(&watched));
        assert_eq!(value(&listed)["kind"], "StatefulSet");
    }

    #[test]
    fn a_watch_event_decodes_into_it() {
        let watched = watched_stateful_set();
        let event = serde_json::json!({"type": "MODIFIED", "object": watched});
        let decoded: kube::core::WatchEvent<Compact<StatefulSet>> =
            serde_json::from_value(event).unwrap();
        let kube::core::WatchEvent::Modified(compact) = decoded else {
            panic!("not a Modified event");
        };
        assert_eq!(compact.object().unwrap().spec, watched.spec);
    }
}
