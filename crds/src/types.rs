//! The `sei.io/v1alpha1` SeiNode API.
//!
//! Field names follow upstream's SeiNode so that existing manifests apply unchanged. The parts
//! this project acts on (`sidecar`, `image`, `dataVolume.import`) are typed; the mode sub-specs
//! and the rest are kept open (their contents are preserved, not interpreted), with upstream's
//! structural rules (exactly one mode, peers for replayers) kept on top.

use std::collections::BTreeMap;

use k8s_openapi::api::core::v1::ResourceRequirements;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{Condition, Time};
use kube::{CustomResource, KubeSchema};
use schemars::{JsonSchema, Schema, SchemaGenerator, json_schema};
use serde::{Deserialize, Serialize};
use serde_json::Value;

/// Condition type that reports whether the Secret named in `spec.sidecar.tls` meets the contract.
pub const SIDECAR_TLS_SECRET_READY: &str = "SidecarTLSSecretReady";

/// Default port of the sidecar's HTTP API.
pub const DEFAULT_SIDECAR_PORT: i32 = 7777;

/// The CEL rule that makes TLS state at creation final. It holds when `spec.sidecar` is absent on
/// either side, because `has()` is only reached through a present parent (`&&` short-circuits).
pub const TLS_IMMUTABLE_RULE: &str = "(has(oldSelf.sidecar) && has(oldSelf.sidecar.tls)) == \
     (has(self.sidecar) && has(self.sidecar.tls)) && \
     (!(has(self.sidecar) && has(self.sidecar.tls)) || self.sidecar.tls == oldSelf.sidecar.tls)";

/// The message of [`TLS_IMMUTABLE_RULE`]; the API server reports it on the field, as
/// `spec.sidecar.tls: Forbidden: <message>`.
pub const TLS_IMMUTABLE_MESSAGE: &str = "TLS is fixed when a SeiNode is created: the block cannot \
     be added, removed or changed; to change it, delete the SeiNode and recreate it, keeping its \
     data volume through spec.dataVolume.import.pvcName";

/// SeiNodeSpec defines the desired state of a standalone Sei node. Exactly one mode sub-spec
/// (fullNode, archive, replayer, validator) must be set.
#[derive(CustomResource, KubeSchema, Serialize, Deserialize, Clone, Debug, Default, PartialEq)]
#[kube(
    group = "sei.io",
    version = "v1alpha1",
    kind = "SeiNode",
    namespaced,
    shortname = "snode",
    category = "sei",
    doc = "SeiNode is a standalone Sei blockchain node, optionally with TLS on its sidecar API.",
    status = "SeiNodeStatus",
    printcolumn = r#"{"name":"Phase","type":"string","jsonPath":".status.phase"}"#,
    printcolumn = r#"{"name":"Ready","type":"string","jsonPath":".status.conditions[?(@.type==\"Ready\")].status"}"#,
    printcolumn = r#"{"name":"TLS Secret","type":"string","jsonPath":".spec.sidecar.tls.secretName"}"#,
    printcolumn = r#"{"name":"TLS","type":"string","jsonPath":".status.conditions[?(@.type==\"SidecarTLSSecretReady\")].reason"}"#,
    printcolumn = r#"{"name":"Sidecar","type":"string","jsonPath":".status.conditions[?(@.type==\"SidecarReady\")].reason"}"#,
    printcolumn = r#"{"name":"Age","type":"date","jsonPath":".metadata.creationTimestamp"}"#,
    printcolumn = r#"{"name":"Image","type":"string","priority":1,"jsonPath":".spec.image"}"#,
    printcolumn = r#"{"name":"Expires","type":"string","priority":1,"jsonPath":".status.sidecarTLS.notAfter"}"#,
    printcolumn = r#"{"name":"Message","type":"string","priority":1,"jsonPath":".status.conditions[?(@.type==\"SidecarTLSSecretReady\")].message"}"#
)]
#[x_kube(
    validation = Rule::new("(has(self.fullNode) ? 1 : 0) + (has(self.archive) ? 1 : 0) + (has(self.replayer) ? 1 : 0) + (has(self.validator) ? 1 : 0) == 1")
        .message("exactly one of fullNode, archive, replayer, or validator must be set"),
    validation = Rule::new("!has(self.replayer) || (has(self.peers) && size(self.peers) > 0)")
        .message("peers is required when replayer mode is set"),
    validation = Rule::new(TLS_IMMUTABLE_RULE)
        .message(TLS_IMMUTABLE_MESSAGE)
        .field_path(".sidecar.tls")
        .reason(Reason::FieldValueForbidden),
)]
#[serde(rename_all = "camelCase")]
pub struct SeiNodeSpec {
    /// ChainID of the chain this node belongs to.
    #[schemars(length(min = 1))]
    pub chain_id: String,

    /// Image is the seid container image.
    #[schemars(length(min = 1, max = 512))]
    pub image: String,

    /// Sidecar configures the sei-sidecar container and, optionally, TLS in front of its API.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub sidecar: Option<SidecarSpec>,

    /// PodLabels are additional labels merged into the StatefulSet pod template.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pod_labels: Option<BTreeMap<String, String>>,

    /// Overrides is a flat map of dotted TOML key paths to string values.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub overrides: Option<BTreeMap<String, String>>,

    /// Peers configures how this node discovers and connects to network peers.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub peers: Option<Vec<PeerSource>>,

    /// DataVolume configures the data PersistentVolumeClaim for this node.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub data_volume: Option<DataVolumeSpec>,

    /// FullNode configures a chain-following full node.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(schema_with = "open_object")]
    pub full_node: Option<Value>,

    /// Archive configures an archive node with full history and no pruning.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(schema_with = "open_object")]
    pub archive: Option<Value>,

    /// Replayer configures a node that replays the chain from a snapshot.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(schema_with = "open_object")]
    pub replayer: Option<Value>,

    /// Validator configures a consensus-participating validator node.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(schema_with = "open_object")]
    pub validator: Option<Value>,

    /// Entrypoint is ignored (deprecated upstream); accepted so older manifests still apply.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(schema_with = "open_object")]
    pub entrypoint: Option<Value>,

    /// Genesis is not acted on by this project; accepted so older manifests still apply.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(schema_with = "open_object")]
    pub genesis: Option<Value>,

    /// Storage is not acted on by this project; accepted so older manifests still apply.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(schema_with = "open_object")]
    pub storage: Option<Value>,
}

/// Sidecar configures the sei-sidecar container.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct SidecarSpec {
    /// Image overrides the sidecar container image.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub image: Option<String>,

    /// Port is the HTTP port the sidecar listens on.
    #[serde(default = "default_sidecar_port")]
    #[schemars(range(min = 1, max = 65535))]
    pub port: i32,

    /// Resources defines CPU/memory requests and limits for the sidecar container.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub resources: Option<ResourceRequirements>,

    /// TLS, if set, fronts the sidecar API with kube-rbac-proxy on :8443 using an
    /// operator-provisioned kubernetes.io/tls Secret in the SeiNode's namespace. Fixed at
    /// creation: it can be neither added, removed nor changed afterwards.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tls: Option<SidecarTls>,
}

impl Default for SidecarSpec {
    fn default() -> Self {
        Self {
            image: None,
            port: DEFAULT_SIDECAR_PORT,
            resources: None,
            tls: None,
        }
    }
}

fn default_sidecar_port() -> i32 {
    DEFAULT_SIDECAR_PORT
}

/// The Secret that carries the sidecar's serving certificate.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct SidecarTls {
    /// SecretName is a kubernetes.io/tls Secret in the SeiNode's namespace. Its certificate's DNS
    /// SANs must cover status.sidecarTLS.requiredDNSNames; the node waits in Pending until it does.
    #[schemars(
        length(min = 1, max = 253),
        regex(pattern = r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*$")
    )]
    pub secret_name: String,
}

/// PeerSource is a union: exactly one source must be set. Sources are kept open.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, Default, PartialEq)]
#[x_kube(
    validation = Rule::new("(has(self.ec2Tags) ? 1 : 0) + (has(self.static) ? 1 : 0) + (has(self.label) ? 1 : 0) == 1")
        .message("exactly one of ec2Tags, static, or label must be set")
)]
#[serde(rename_all = "camelCase")]
pub struct PeerSource {
    /// EC2Tags discovers peers by querying EC2 for running instances with the given tags.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(schema_with = "open_object")]
    pub ec2_tags: Option<Value>,

    /// Static provides a fixed list of peer addresses.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(schema_with = "open_object")]
    pub r#static: Option<Value>,

    /// Label discovers peers among SeiNodes with the given labels.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(schema_with = "open_object")]
    pub label: Option<Value>,
}

/// DataVolume configures the data PersistentVolumeClaim for this node.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, Default, PartialEq)]
#[x_kube(
    validation = Rule::new("!has(oldSelf.import) || has(self.import)")
        .message("import cannot be unset once configured")
)]
#[serde(rename_all = "camelCase")]
pub struct DataVolumeSpec {
    /// Import references a pre-existing PersistentVolumeClaim in the SeiNode's namespace instead
    /// of creating a new one. This is how a node keeps its data across delete + recreate.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub import: Option<DataVolumeImport>,
}

/// A pre-existing PersistentVolumeClaim to use as the node's data volume.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, Default, PartialEq, Eq)]
#[serde(rename_all = "camelCase")]
pub struct DataVolumeImport {
    /// PVCName is the name of a PersistentVolumeClaim in the SeiNode's namespace. Immutable.
    #[x_kube(validation = Rule::new("self == oldSelf").message("pvcName is immutable"))]
    #[schemars(
        length(min = 1, max = 253),
        regex(pattern = r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$")
    )]
    pub pvc_name: String,
}

/// The high-level lifecycle state of a node.
#[derive(Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq, JsonSchema)]
pub enum SeiNodePhase {
    Pending,
    Initializing,
    Running,
    Failed,
    Terminating,
}

/// SeiNodeStatus defines the observed state of a SeiNode.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct SeiNodeStatus {
    /// Phase is the high-level lifecycle state.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub phase: Option<SeiNodePhase>,

    /// PhaseTransitionTime is when the node last changed phases.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub phase_transition_time: Option<Time>,

    /// Conditions, keyed by type; SidecarTLSSecretReady exists only while TLS is enabled.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(schema_with = "condition_list")]
    pub conditions: Option<Vec<Condition>>,

    /// SidecarTLS publishes the contract the TLS Secret must meet; set only while TLS is enabled.
    #[serde(
        default,
        rename = "sidecarTLS",
        skip_serializing_if = "Option::is_none"
    )]
    pub sidecar_tls: Option<SidecarTlsStatus>,

    /// Plan tracks the active task sequence for this node.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub plan: Option<TaskPlan>,

    /// CurrentImage is the seid image observed running on the owned StatefulSet.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub current_image: Option<String>,

    /// ObservedGeneration is the metadata.generation the controller last acted on.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub observed_generation: Option<i64>,
}

/// The machine-readable TLS contract of one node.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct SidecarTlsStatus {
    /// SecretName mirrors spec.sidecar.tls.secretName.
    pub secret_name: String,
    /// RequiredDNSNames is the list of DNS names the certificate in the Secret must cover.
    #[serde(rename = "requiredDNSNames")]
    pub required_dns_names: Vec<String>,
    /// NotAfter is when the Secret's leaf certificate expires (the last valid second), when the
    /// Secret could be read and parsed.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub not_after: Option<Time>,
}

/// The state of a task plan.
#[derive(Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq, JsonSchema)]
pub enum PlanPhase {
    Active,
    Complete,
    Failed,
}

/// The state of one planned task.
#[derive(Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq, JsonSchema)]
pub enum TaskStatus {
    Pending,
    Complete,
    Failed,
}

/// An ordered sequence of tasks that moves a node to `targetPhase`.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct TaskPlan {
    /// ID is a unique identifier for this plan instance.
    pub id: String,
    /// Phase is the overall state of the plan.
    pub phase: PlanPhase,
    /// Tasks is the ordered list of tasks to execute.
    pub tasks: Vec<PlannedTask>,
    /// TargetPhase is the phase the node enters when the plan completes.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub target_phase: Option<SeiNodePhase>,
}

/// A single task within a plan.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct PlannedTask {
    /// Type identifies the task (e.g. "ApplyStatefulSet").
    pub r#type: String,
    /// Status is the current state of this task.
    pub status: TaskStatus,
    /// Error is the error message if the task failed.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
    /// Reason says, for machines, why the task failed (the error says it for people).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reason: Option<TaskFailureReason>,
}

/// Why a planned task failed.
#[derive(Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq, JsonSchema)]
pub enum TaskFailureReason {
    /// An object of the task's name exists and is not this node's: once it is deleted or
    /// renamed, the plan retries on its own.
    ObjectInTheWay,
    /// The API server refused the object the controller built from the spec (HTTP 4xx other
    /// than a conflict or throttling): the spec must change.
    RefusedByAPIServer,
    /// The spec cannot be turned into the node's objects (for example an invalid image): the
    /// spec must change.
    InvalidSpec,
    /// The node's sidecar ran the task and reported it failed.
    SidecarTaskFailed,
    /// The plan names a task this controller does not know (written by another version).
    UnknownTask,
}

impl SeiNode {
    /// The TLS block of the spec, when TLS is enabled.
    pub fn sidecar_tls(&self) -> Option<&SidecarTls> {
        self.spec.sidecar.as_ref().and_then(|s| s.tls.as_ref())
    }
}

/// Schema of an object whose contents are preserved but not interpreted.
fn open_object(_: &mut SchemaGenerator) -> Schema {
    json_schema!({
        "type": "object",
        "x-kubernetes-preserve-unknown-fields": true,
    })
}

/// Schema of `status.conditions`: standard conditions as a list-map keyed by `type`.
fn condition_list(generator: &mut SchemaGenerator) -> Schema {
    let mut schema = generator.subschema_for::<Vec<Condition>>();
    schema.insert("x-kubernetes-list-type".into(), "map".into());
    schema.insert(
        "x-kubernetes-list-map-keys".into(),
        serde_json::json!(["type"]),
    );
    schema
}
