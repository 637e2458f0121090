//! Plain configuration of the controller; the CLI converts its flags into this.

use std::path::PathBuf;
use std::time::Duration;

use seinode_tls_crds::watch::WatchScope;

use crate::probe::SidecarAddresses;

/// The only token audience the node pods' kube-rbac-proxy accepts (`--auth-token-audiences`), for
/// the sidecar's callers: a token a sidecar receives is useless against the API server, and an
/// API server token is useless against a sidecar. (The controller's own probe sends no token.)
pub const SIDECAR_TOKEN_AUDIENCE: &str = "seinode-sidecar";
/// The sidecar's health path: kube-rbac-proxy passes it through without authentication
/// (`--ignore-paths`), so the controller's probe needs no credential.
pub const SIDECAR_HEALTH_PATH: &str = "/healthz";

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
    /// Connect to these addresses instead of resolving the pod's DNS name (tests and `local`).
    pub sidecar_addresses: SidecarAddresses,
    /// Reconciles doing API work at once; a node not decided yet goes before plan work.
    pub max_concurrent_reconciles: u16,
    /// ServiceAccount of the node pods (kube-rbac-proxy runs as it and needs TokenReview and
    /// SubjectAccessReview); the namespace's default when `None`.
    pub node_service_account: Option<String>,
    /// Where SeiNodes, their objects and TLS Secrets are watched: the whole cluster, or only
    /// some namespaces (an install whose RBAC covers only those).
    pub watch_scope: WatchScope,
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
            sidecar_addresses: SidecarAddresses::default(),
            node_service_account: None,
            max_concurrent_reconciles: 4,
            watch_scope: WatchScope::Cluster,
        }
    }
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
