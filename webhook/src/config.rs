//! Plain configuration of the webhook; the CLI converts its flags into this.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use seinode_tls_kube::watch::WatchScope;

/// What happens when a new TLS SeiNode names a Secret that exists but fails the contract.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum SecretPolicy {
    /// Refuse the SeiNode (the default: the node could never start).
    #[default]
    Deny,
    /// Admit it with a warning; the node waits in Pending until the Secret is fixed.
    Warn,
}

/// What happens when a change to a TLS Secret would break SeiNodes that use it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum GuardPolicy {
    /// Admit the change with a warning naming the affected SeiNodes (the default).
    #[default]
    Warn,
    /// Refuse the change.
    Deny,
}

/// Everything the webhook needs besides a Kubernetes client.
#[derive(Debug, Clone)]
pub struct WebhookConfig {
    /// HTTPS address of the admission endpoints.
    pub listen_addr: SocketAddr,
    /// Plain-HTTP address of `/healthz`, `/readyz` and `/metrics`.
    pub health_addr: SocketAddr,
    /// Serving certificate chain (PEM); reloaded when it changes on disk.
    pub tls_cert_file: PathBuf,
    /// Serving private key (PEM); reloaded when it changes on disk.
    pub tls_key_file: PathBuf,
    pub secret_policy: SecretPolicy,
    pub guard_policy: GuardPolicy,
    /// Cluster DNS domain of the contract.
    pub cluster_domain: String,
    /// Every admission decision is answered within this time (keep it below the webhook
    /// configurations' `timeoutSeconds`).
    pub request_deadline: Duration,
    /// Requests still in flight at shutdown get this long to finish.
    pub shutdown_grace: Duration,
    /// HTTPS connections open at once; more are closed on accept.
    pub max_connections: usize,
    /// HTTPS connections open at once from one source address; more from it are closed on
    /// accept, so one Pod cannot hold the slots the API server needs.
    pub max_connections_per_source: usize,
    /// A connection is closed gracefully at this age (HTTP/2 GOAWAY; HTTP/1 `Connection: close`
    /// on its next response).
    pub max_connection_age: Duration,
    /// Memory that request bodies being read and decided on may take, in bytes (see
    /// [`crate::limits::BodyBudget`]); a body that finds it spent is answered 429.
    pub max_body_memory: usize,
    /// Admission requests handled at once; more are answered 429 with `Retry-After`.
    pub max_concurrent_requests: usize,
    /// A connection that has carried no admission review for this long is closed gracefully,
    /// and so is one on which no byte moves for this long (also the time an HTTP/1 request head
    /// may take). HTTP/2 PINGs and requests to other paths do not count as use. Longer than the
    /// 90 s after which Go clients such as the API server drop idle connections themselves, so
    /// the webhook never closes one a client is about to use.
    pub idle_timeout: Duration,
    /// Where Secrets and SeiNodes are watched: the whole cluster, or only some namespaces (an
    /// install whose RBAC covers only those; its registrations must select them too).
    pub watch_scope: WatchScope,
}

impl WebhookConfig {
    /// A configuration with the defaults of the command line for the given files and addresses.
    pub fn new(
        listen_addr: SocketAddr,
        health_addr: SocketAddr,
        tls_cert_file: PathBuf,
        tls_key_file: PathBuf,
    ) -> Self {
        Self {
            listen_addr,
            health_addr,
            tls_cert_file,
            tls_key_file,
            secret_policy: SecretPolicy::default(),
            guard_policy: GuardPolicy::default(),
            cluster_domain: seinode_tls_crds::contract::DEFAULT_CLUSTER_DOMAIN.to_owned(),
            request_deadline: DEFAULT_REQUEST_DEADLINE,
            shutdown_grace: Duration::from_secs(10),
            max_connections: DEFAULT_MAX_CONNECTIONS,
            max_connections_per_source: DEFAULT_MAX_CONNECTIONS_PER_SOURCE,
            max_connection_age: DEFAULT_MAX_CONNECTION_AGE,
            max_body_memory: DEFAULT_MAX_BODY_MEMORY,
            max_concurrent_requests: DEFAULT_MAX_CONCURRENT_REQUESTS,
            idle_timeout: DEFAULT_IDLE_TIMEOUT,
            watch_scope: WatchScope::Cluster,
        }
    }
}

/// Default internal deadline: well below the 5-second `timeoutSeconds` the configurations use,
/// so the API server always gets our answer rather than its own timeout.
pub const DEFAULT_REQUEST_DEADLINE: Duration = Duration::from_secs(2);

/// The API server holds a handful of connections (one per replica over HTTP/2, a few dozen over
/// HTTP/1.1 under load); the rest is headroom for probes and bursts.
pub const DEFAULT_MAX_CONNECTIONS: usize = 256;
/// The API server reaches the webhook from its own address: over HTTP/2 one connection per API
/// server, over HTTP/1.1 a few dozen under load. A tenant's Pod is another address.
pub const DEFAULT_MAX_CONNECTIONS_PER_SOURCE: usize = 64;
/// Long enough that reconnecting costs nothing measurable, short enough that no client keeps a
/// connection (and so a share of the cap) for long.
pub const DEFAULT_MAX_CONNECTION_AGE: Duration = Duration::from_secs(600);
/// A decision takes tens of microseconds; 32 in progress at once means a client is slow or
/// hostile. Only requests whose body has arrived take a slot.
pub const DEFAULT_MAX_CONCURRENT_REQUESTS: usize = 32;
/// 48 MiB of bodies being read and decided on: six of the largest Secret reviews at once, and
/// thousands of ordinary ones (a kubectl-sized SeiNode review is about 5 KiB).
pub const DEFAULT_MAX_BODY_MEMORY: usize = 48 << 20;
pub const DEFAULT_IDLE_TIMEOUT: Duration = Duration::from_secs(120);

/// `timeoutSeconds` of the webhook configurations this project registers.
pub const WEBHOOK_TIMEOUT_SECONDS: i32 = 5;
