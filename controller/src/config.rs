//! Plain configuration of the controller; the CLI converts its flags into this.

use std::path::PathBuf;
use std::time::Duration;

use seinode_tls_kube::watch::WatchScope;

use crate::decide::Settings;
use crate::sidecar::SidecarAddresses;

/// The sidecar's readiness path (seictl answers 200 once `mark-ready` has completed, 503 before):
/// a bypass path, so the controller's probe sends no credential.
pub const SIDECAR_HEALTH_PATH: &str = "/v0/healthz";
/// The paths seictl serves without an identity in trusted-header mode, and so the paths
/// kube-rbac-proxy passes through unauthenticated (`--ignore-paths`): the kubelet's probes and
/// Prometheus carry no token. Nothing else may be listed: every other path drives the node.
pub const SIDECAR_BYPASS_PATHS: [&str; 4] =
    ["/v0/healthz", "/v0/startupz", "/v0/livez", "/v0/metrics"];

/// seictl sidecar image used when `spec.sidecar.image` is empty: the release upstream's samples pin.
pub const DEFAULT_SIDECAR_IMAGE: &str = "ghcr.io/sei-protocol/seictl@sha256:2cb320dd583000765520293d4e28ecc79fed4432c76760923d3aaa47803a4dbf";
/// kube-rbac-proxy image that terminates TLS in front of the sidecar.
pub const DEFAULT_RBAC_PROXY_IMAGE: &str = "quay.io/brancz/kube-rbac-proxy:v0.19.1";

/// Everything the controller needs besides a Kubernetes client.
#[derive(Debug, Clone)]
pub struct ControllerConfig {
    /// Cluster DNS domain of the contract.
    pub cluster_domain: String,
    /// Warn (event) this long before a node's certificate expires.
    pub cert_expiry_warning: Duration,
    /// Sidecar image for nodes that do not set `spec.sidecar.image`.
    pub sidecar_image: String,
    /// kube-rbac-proxy image for TLS nodes.
    pub rbac_proxy_image: String,
    /// Leader election; `None` reconciles without it (a single replica).
    pub leader_election: Option<LeaderElection>,
    /// Name under which events are reported.
    pub reporter: String,
    /// How often a Running node's sidecar is probed.
    pub sidecar_probe_interval: Duration,
    /// Timeout of each probe (connect, handshake and answer).
    pub sidecar_probe_timeout: Duration,
    /// PEM CA bundle file trusted for sidecars whose Secret has no `ca.crt` (else the leaf is
    /// pinned); read once at start.
    pub sidecar_ca_bundle: Option<PathBuf>,
    /// The controller's TLS client certificate for the node proxies (the sidecar's tasks);
    /// without it, TLS nodes wait at their first sidecar task.
    pub sidecar_client: Option<SidecarClientFiles>,
    /// Which Pod addresses the controller may dial (all, in a cluster), and fixed addresses
    /// for pods the tests serve in-process.
    pub sidecar_addresses: SidecarAddresses,
    /// Sidecar probes at once, apart from the reconciles.
    pub max_concurrent_probes: u16,
    /// What `seictl serve` requires of its environment besides the node's chain.
    pub sidecar_platform: SidecarPlatform,
    /// Reconciles doing API work at once; a node not decided yet goes before plan work.
    pub max_concurrent_reconciles: u16,
    /// ServiceAccount of the node pods (kube-rbac-proxy runs as it and needs TokenReview and
    /// SubjectAccessReview); the namespace's default when `None`.
    pub node_service_account: Option<String>,
    /// Where SeiNodes, their objects and TLS Secrets are watched: the whole cluster, or only
    /// some namespaces (an install whose RBAC covers only those).
    pub watch_scope: WatchScope,
}

impl ControllerConfig {
    /// What a decision takes of this configuration.
    pub fn settings(&self) -> Settings {
        Settings {
            cluster_domain: self.cluster_domain.clone(),
            cert_expiry_warning: self.cert_expiry_warning,
            sidecar_probe_interval: self.sidecar_probe_interval,
        }
    }
}

impl Default for ControllerConfig {
    fn default() -> Self {
        Self {
            cluster_domain: seinode_tls_crds::contract::DEFAULT_CLUSTER_DOMAIN.to_owned(),
            cert_expiry_warning: Duration::from_secs(7 * 24 * 3600),
            sidecar_image: DEFAULT_SIDECAR_IMAGE.to_owned(),
            rbac_proxy_image: DEFAULT_RBAC_PROXY_IMAGE.to_owned(),
            leader_election: None,
            reporter: "seinode-tls".to_owned(),
            sidecar_probe_interval: Duration::from_secs(30),
            sidecar_probe_timeout: Duration::from_secs(5),
            sidecar_ca_bundle: None,
            sidecar_client: None,
            max_concurrent_probes: 16,
            sidecar_platform: SidecarPlatform::default(),
            sidecar_addresses: SidecarAddresses::default(),
            node_service_account: None,
            max_concurrent_reconciles: 4,
            watch_scope: WatchScope::Cluster,
        }
    }
}

/// The buckets and regions of the fleet's genesis and snapshot artifacts: `seictl serve` will not
/// start unless `SEI_GENESIS_BUCKET`, `SEI_GENESIS_REGION`, `SEI_SNAPSHOT_BUCKET` and
/// `SEI_SNAPSHOT_REGION` are all set (upstream's controller sets them from its platform
/// configuration). Empty values are left out of the pod; the controller warns at start.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct SidecarPlatform {
    pub genesis_bucket: String,
    pub genesis_region: String,
    pub snapshot_bucket: String,
    pub snapshot_region: String,
}

impl SidecarPlatform {
    /// The sidecar's variables, in seictl's order.
    pub fn env(&self) -> [(&'static str, &str); 4] {
        [
            ("SEI_GENESIS_BUCKET", &self.genesis_bucket),
            ("SEI_GENESIS_REGION", &self.genesis_region),
            ("SEI_SNAPSHOT_BUCKET", &self.snapshot_bucket),
            ("SEI_SNAPSHOT_REGION", &self.snapshot_region),
        ]
    }
}

/// The files of the controller's client identity towards the node proxies. The node proxies
/// trust `ca_file` for client certificates (`--client-ca-file`), so a request signed with the
/// key is authenticated as the certificate's common name, which RBAC grants `seinodetasks`.
/// The key never leaves the controller: a server that answers in a pod's name learns nothing
/// it could replay. `ca_file` must not be a CA the API server trusts for clients.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SidecarClientFiles {
    /// PEM certificate (leaf first, then its chain); read again for each sidecar call, so a
    /// renewed certificate is used without a restart.
    pub cert_file: PathBuf,
    /// Its PEM private key; read with the certificate.
    pub key_file: PathBuf,
    /// PEM CA bundle the node proxies trust for client certificates; read once at start and
    /// copied into each node's `<node>-rbac-proxy-config` ConfigMap.
    pub ca_file: PathBuf,
}

/// Where the controller's Lease lives and who this replica is.
#[derive(Debug, Clone)]
pub struct LeaderElection {
    pub lease_name: String,
    pub lease_namespace: String,
    /// Unique per replica (the pod name in a cluster).
    pub identity: String,
    /// How long a follower waits, from when it saw the Lease change last, before taking it.
    pub lease_duration: Duration,
    /// How long the leader keeps writing after the start of its last successful renewal
    /// (shorter than `lease_duration`): a leader that cannot renew stops before it could have
    /// lost the Lease.
    pub renew_deadline: Duration,
    /// How often candidates try and the leader renews; also each request's timeout.
    pub retry_period: Duration,
}
