//! What the slim decodings share ([`crate::index::NodeSecretRef`],
//! [`crate::versions::SecretMeta`]): the metadata they keep, and their `kube::Resource`, which
//! stands for the full type on the API (same group, version, kind and plural).

use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;
use serde::Deserialize;

/// An object's name, namespace, resourceVersion and uid, as decoded from its metadata; every
/// other field (labels, annotations, managedFields) is skipped as it is parsed.
#[derive(Deserialize, Default)]
#[serde(rename_all = "camelCase")]
pub(crate) struct Meta {
    name: Option<String>,
    namespace: Option<String>,
    resource_version: Option<String>,
    uid: Option<String>,
}

impl From<Meta> for ObjectMeta {
    fn from(meta: Meta) -> Self {
        let Meta {
            name,
            namespace,
            resource_version,
            uid,
        } = meta;
        ObjectMeta {
            name,
            namespace,
            resource_version,
            uid,
            ..ObjectMeta::default()
        }
    }
}

/// `impl kube::Resource for $slim`, a type with a `metadata: ObjectMeta` field, as `$full` on
/// the API; `metadata_api` makes its requests ask for `PartialObjectMetadata`.
macro_rules! resource_as {
    ($slim:ty, $full:ty $(, metadata_api = $metadata_api:expr)?) => {
        impl kube::Resource for $slim {
            type DynamicType = ();
            type Scope = k8s_openapi::NamespaceResourceScope;

            fn kind(dt: &()) -> std::borrow::Cow<'_, str> {
                <$full as kube::Resource>::kind(dt)
            }
            fn group(dt: &()) -> std::borrow::Cow<'_, str> {
                <$full as kube::Resource>::group(dt)
            }
            fn version(dt: &()) -> std::borrow::Cow<'_, str> {
                <$full as kube::Resource>::version(dt)
            }
            fn plural(dt: &()) -> std::borrow::Cow<'_, str> {
                <$full as kube::Resource>::plural(dt)
            }
            fn meta(&self) -> &k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta {
                &self.metadata
            }
            fn meta_mut(&mut self) -> &mut k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta {
                &mut self.metadata
            }
            $(
                fn metadata_api() -> bool {
                    $metadata_api
                }
            )?
        }
    };
}

pub(crate) use resource_as;
