//! Command-line interface. Flags convert into plain config structs; the commands live in their
//! own modules and never see clap.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use clap::{Parser, Subcommand, ValueEnum};
use jiff::Timestamp;
use seinode_tls_controller::config::{SidecarClientFiles, SidecarPlatform};
use seinode_tls_controller::sidecar::SidecarAddresses;
use seinode_tls_controller::{ControllerConfig, LeaderElection};
use seinode_tls_kube::watch::WatchScope;
use seinode_tls_webhook::{GuardPolicy, SecretPolicy, WebhookConfig};

use crate::check::CheckArgs;
use crate::offline::{
    self, CertificateSpec, CheckSecretArgs, ContractFormat, OutputFormat, SecretCheck,
};
use crate::online::{ClusterOptions, StatusArgs};

#[derive(Debug, Parser)]
#[command(
    name = "seinode-tls",
    version,
    about = "TLS for the sidecar API of Sei nodes: admission webhook, reconciler and tools",
    long_about = "TLS for the sidecar API of Sei nodes (SeiNode, sei.io/v1alpha1).\n\n\
        A SeiNode names an externally provisioned kubernetes.io/tls Secret in \
        spec.sidecar.tls.secretName. The certificate must carry the DNS names printed by \
        `seinode-tls contract`; `seinode-tls check-secret` tells whether a Secret does, \
        `seinode-tls status` what a node waits for, and `seinode-tls check` whether the install \
        works.",
    after_help = "Exit status of every command: 0 ok; 1 not ok (a Secret fails the contract, a \
        node is not Ready, a check failed); 2 usage error or unreadable input; 3 the Secret or \
        SeiNode named does not exist; 4 the API server refused the caller (credentials, RBAC); \
        5 the cluster could not be reached or answered with an error. The server commands \
        exit 0 after a graceful shutdown and 1 when they fail."
)]
pub struct Cli {
    #[command(subcommand)]
    pub command: Command,
    #[command(flatten)]
    pub log: LogArgs,
}

/// How the process logs (to stderr).
#[derive(Debug, clap::Args)]
#[command(next_help_heading = "Logging")]
pub struct LogArgs {
    /// One line of text per event, or one JSON object per line (with the event's fields and its
    /// span's: a reconcile's `namespace` and `seinode`, an admission's `uid`, `namespace`, `object`).
    #[arg(long, global = true, env = "SEINODE_TLS_LOG_FORMAT", value_enum, default_value_t = LogFormat::Text)]
    pub log_format: LogFormat,
    /// The lowest level logged (error, warn, info, debug, trace), or a full filter such as
    /// `info,seinode_tls_controller=debug`. Without it, `RUST_LOG`, else `info`.
    #[arg(long, global = true, env = "SEINODE_TLS_LOG_LEVEL", value_name = "LEVEL|FILTER", value_parser = parse_log_filter)]
    pub log_level: Option<String>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum LogFormat {
    Text,
    Json,
}

/// A log level, or a list of directives each a level or `target=level`; refused when tracing
/// cannot read it, and when a directive is a bare word (tracing would take it for a target and
/// log nothing else).
fn parse_log_filter(value: &str) -> Result<String, String> {
    let bare_word = value.split(',').find(|directive| {
        !directive.contains('=')
            && directive != &"off"
            && directive.parse::<tracing::Level>().is_err()
    });
    if let Some(word) = bare_word {
        return Err(format!(
            "\"{word}\" is not a level (error, warn, info, debug, trace, off); a filter directive \
             is a level or target=level"
        ));
    }
    tracing_subscriber::EnvFilter::builder()
        .parse(value)
        .map(|_| value.to_owned())
        .map_err(|e| format!("\"{value}\" is not a log level or filter: {e}"))
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Print the SeiNode CustomResourceDefinition (YAML).
    ///
    /// Exit status: 0, or 2 when the output cannot be written.
    Crd,
    /// Print the DNS names a SeiNode's sidecar certificate must carry.
    ///
    /// Exit status: 0; 2 on a usage error (a node name that could never run, Certificate flags
    /// without -o certificate).
    Contract(ContractCli),
    /// Check a kubernetes.io/tls Secret against a SeiNode's contract: from a manifest (-f), or
    /// read from the cluster by name.
    ///
    /// The same code as the webhook's and the controller's judges it. Exit status: 0 when the
    /// Secret meets the contract, 1 when it does not, 2 on a usage error or unreadable input,
    /// 3 when the Secret does not exist, 4 when reading it is forbidden, 5 when the cluster
    /// cannot be reached.
    #[command(group(clap::ArgGroup::new("source").required(true).args(["name", "file"])))]
    CheckSecret(CheckSecretCli),
    /// Show a SeiNode's TLS contract, its conditions with what to do about each reason, and
    /// when its certificate expires.
    ///
    /// Exit status: 0 when the node is Ready (for its current generation), 1 when not, 2 on a
    /// usage error, 3 when the SeiNode does not exist, 4 when reading it is forbidden, 5 when
    /// the cluster cannot be reached.
    Status(StatusCli),
    /// Check an install of the chart: the CRD, the Deployment, the webhook registrations and
    /// their caBundle, that the API server can call the webhooks (two server-side dry runs),
    /// that a controller leads, and the controller's RBAC. One line per check.
    ///
    /// Stores nothing: the SeiNodes are dry runs, the RBAC questions SubjectAccessReviews. The
    /// chart's `helm test` runs it. Exit status: 0 when every check passed, 1 when one failed,
    /// 2 on a usage error, 5 when the cluster cannot be reached.
    Check(CheckCli),
    /// Print a shell completion script (bash, elvish, fish, powershell, zsh).
    ///
    /// bash: `source <(seinode-tls completion bash)`; zsh: `seinode-tls completion zsh >
    /// "${fpath[1]}/_seinode-tls"`. Exit status: 0.
    Completion {
        #[arg(value_enum)]
        shell: clap_complete::Shell,
    },
    /// Serve the admission webhook (HTTPS), with health and metrics on a plain-HTTP port.
    Webhook(WebhookCli),
    /// Run the SeiNode controller, with health and metrics on a plain-HTTP port.
    Controller(ControllerCli),
    /// Run the webhook and the controller together (what the Helm chart deploys).
    Run(RunCli),
    /// Run the whole system on this machine until interrupted: a one-machine cluster built from
    /// Go modules (etcd, kube-apiserver, kube-controller-manager, kube-scheduler and, as root, a
    /// process kubelet that runs Pods), the SeiNode CRD, the webhook registered against it, and
    /// the controller.
    #[cfg(feature = "local")]
    Local(LocalCli),
    /// Stand-ins for the Sei images, run by the process kubelet of `local` and the tests in
    /// place of the sidecar and seid containers.
    #[cfg(feature = "local")]
    #[command(subcommand, hide = true)]
    StandIn(StandInCommand),
}

#[derive(Debug, clap::Args)]
pub struct NodeArgs {
    /// Name of the SeiNode.
    #[arg(long, value_name = "NAME")]
    pub seinode: String,
    /// Namespace of the SeiNode (and of its Secret).
    #[arg(long, short = 'n', value_name = "NS")]
    pub namespace: String,
    /// Cluster DNS domain.
    #[arg(long, env = "SEINODE_TLS_CLUSTER_DOMAIN", default_value = seinode_tls_crds::contract::DEFAULT_CLUSTER_DOMAIN)]
    pub cluster_domain: String,
}

#[derive(Debug, clap::Args)]
pub struct ContractCli {
    #[command(flatten)]
    pub node: NodeArgs,
    /// Output format: one name per line, {"requiredDNSNames": [...]} (JSON or YAML), or a cert-manager
    /// Certificate (cert-manager.io/v1) that issues the node's Secret for exactly those names.
    #[arg(long, short = 'o', value_enum, default_value_t = ContractOutput::Text)]
    pub output: ContractOutput,
    #[command(flatten)]
    pub certificate: CertificateCli,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum ContractOutput {
    Text,
    Json,
    Yaml,
    Certificate,
}

/// The cert-manager Certificate that `contract --output certificate` prints.
#[derive(Debug, clap::Args)]
#[command(next_help_heading = "With --output certificate")]
pub struct CertificateCli {
    /// Issuer of the Certificate (required with --output certificate).
    #[arg(long, value_name = "NAME", required_if_eq("output", "certificate"))]
    pub issuer: Option<String>,
    /// Kind of the issuer.
    #[arg(long, value_enum, default_value_t = IssuerKind::Issuer)]
    pub issuer_kind: IssuerKind,
    /// Secret the Certificate writes (the SeiNode's spec.sidecar.tls.secretName); default
    /// <SEINODE>-sidecar-tls.
    #[arg(long, value_name = "NAME")]
    pub secret_name: Option<String>,
    /// Lifetime of the certificate (cert-manager's default when absent: 90 days).
    #[arg(long, value_parser = humantime::parse_duration)]
    pub duration: Option<Duration>,
    /// How long before expiry cert-manager renews it (its default when absent: a third of the
    /// lifetime).
    #[arg(long, value_parser = humantime::parse_duration)]
    pub renew_before: Option<Duration>,
}

/// Spelled as cert-manager's `issuerRef.kind`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum IssuerKind {
    #[value(name = "Issuer")]
    Issuer,
    #[value(name = "ClusterIssuer")]
    ClusterIssuer,
}

#[derive(Debug, clap::Args)]
pub struct CheckSecretCli {
    /// Name of a Secret in the node's namespace, read from the cluster (with --kubeconfig,
    /// --context); or give -f.
    #[arg(value_name = "SECRET")]
    pub name: Option<String>,
    /// Secret manifest, YAML or JSON as `kubectl get secret -o yaml` prints it; `-` for stdin.
    #[arg(long = "filename", short = 'f', value_name = "FILE")]
    pub file: Option<PathBuf>,
    #[command(flatten)]
    pub node: NodeArgs,
    /// Judge validity at this instant (RFC 3339, e.g. 2027-01-01T00:00:00Z) instead of now.
    #[arg(long, value_name = "RFC3339")]
    pub at: Option<Timestamp>,
    /// Output format.
    #[arg(long, short = 'o', value_enum, default_value_t = Output::Text)]
    pub output: Output,
    #[command(flatten)]
    pub cluster: ClusterArgs,
}

#[derive(Debug, clap::Args)]
pub struct StatusCli {
    /// Name of the SeiNode.
    #[arg(value_name = "SEINODE")]
    pub seinode: String,
    /// Namespace of the SeiNode.
    #[arg(long, short = 'n', value_name = "NS")]
    pub namespace: String,
    /// Cluster DNS domain, for the contract of a node whose status does not carry it yet.
    #[arg(long, env = "SEINODE_TLS_CLUSTER_DOMAIN", default_value = seinode_tls_crds::contract::DEFAULT_CLUSTER_DOMAIN)]
    pub cluster_domain: String,
    /// Output format.
    #[arg(long, short = 'o', value_enum, default_value_t = Output::Text)]
    pub output: Output,
    #[command(flatten)]
    pub cluster: ClusterArgs,
}

#[derive(Debug, clap::Args)]
pub struct CheckCli {
    /// The release namespace (where the Deployment, its Service and the Lease are).
    #[arg(
        long,
        short = 'n',
        env = "SEINODE_TLS_CHECK_NAMESPACE",
        value_name = "NS",
        default_value = "seinode-tls-system"
    )]
    pub namespace: String,
    /// The chart's full name: the release name when it contains "seinode-tls", else
    /// <release>-seinode-tls. It names the Deployment, Service, Lease and webhook
    /// configurations.
    #[arg(
        long,
        env = "SEINODE_TLS_CHECK_NAME",
        value_name = "NAME",
        default_value = "seinode-tls"
    )]
    pub name: String,
    /// The controller's ServiceAccount (the chart's serviceAccount.name); default: --name.
    #[arg(long, env = "SEINODE_TLS_CHECK_SERVICE_ACCOUNT", value_name = "NAME")]
    pub service_account: Option<String>,
    /// Namespace for the dry-run SeiNodes sent through the webhooks; default: the first of
    /// the namespaces the webhooks name (watchNamespaces), else `default`.
    #[arg(long, env = "SEINODE_TLS_CHECK_DRY_RUN_NAMESPACE", value_name = "NS")]
    pub dry_run_namespace: Option<String>,
    /// Output format.
    #[arg(long, short = 'o', value_enum, default_value_t = Output::Text)]
    pub output: Output,
    #[command(flatten)]
    pub cluster: ClusterArgs,
}

/// Which cluster the commands that read it talk to.
#[derive(Debug, clap::Args)]
#[command(next_help_heading = "Cluster")]
pub struct ClusterArgs {
    /// kubeconfig file; default: KUBECONFIG, ~/.kube/config, or the Pod's ServiceAccount.
    // No `env`: KUBECONFIG may be a list of files, which kube reads itself when this is absent.
    #[arg(long, value_name = "FILE")]
    pub kubeconfig: Option<PathBuf>,
    /// kubeconfig context to use instead of the current one.
    #[arg(long, value_name = "NAME")]
    pub context: Option<String>,
    /// Longest wait for each API request, retries included.
    #[arg(long, env = "SEINODE_TLS_REQUEST_TIMEOUT", default_value = "15s", value_parser = humantime::parse_duration)]
    pub request_timeout: Duration,
}

impl From<ClusterArgs> for ClusterOptions {
    fn from(args: ClusterArgs) -> Self {
        ClusterOptions {
            kubeconfig: args.kubeconfig,
            context: args.context,
            request_timeout: args.request_timeout,
        }
    }
}

#[cfg(feature = "local")]
#[derive(Debug, clap::Args)]
pub struct LocalCli {
    /// Directory for the control plane's state; the kubeconfig is written to DIR/kubeconfig.
    #[arg(long, env = "SEINODE_TLS_LOCAL_DIR", default_value = ".seinode-local")]
    pub dir: PathBuf,
    /// Also apply an example TLS Secret and SeiNode and print the node's progress.
    #[arg(long)]
    pub demo: bool,
}

#[cfg(feature = "local")]
#[derive(Debug, Subcommand)]
pub enum StandInCommand {
    /// The sidecar (the image's `seictl serve`): seictl's API on SEI_SIDECAR_PORT (default
    /// 7777), authenticated as SEI_SIDECAR_AUTHN_MODE says, until SIGTERM. Takes only an
    /// optional `serve`.
    Sidecar {
        #[arg(value_name = "SEICTL_ARGS")]
        args: Vec<String>,
    },
    /// seid: `start --home DIR` writes DIR/stand-in-seid.started, then waits for SIGTERM.
    /// Arguments after `seid` (or after `--`) go to the stand-in unparsed.
    Seid {
        #[arg(
            trailing_var_arg = true,
            allow_hyphen_values = true,
            value_name = "SEID_ARGS"
        )]
        args: Vec<String>,
    },
}

/// Flags shared by the server commands.
#[derive(Debug, clap::Args)]
pub struct ServeArgs {
    /// Plain-HTTP address of /healthz, /readyz and /metrics.
    #[arg(long, env = "SEINODE_TLS_HEALTH_ADDR", default_value = "0.0.0.0:8080")]
    pub health_addr: SocketAddr,
    /// Cluster DNS domain of the contract.
    #[arg(long, env = "SEINODE_TLS_CLUSTER_DOMAIN", default_value = seinode_tls_crds::contract::DEFAULT_CLUSTER_DOMAIN)]
    pub cluster_domain: String,
    /// Watch only these namespaces (comma-separated), for an install whose RBAC covers only
    /// them; empty watches the whole cluster. Register the webhooks for the same namespaces (the
    /// chart's watchNamespaces does both).
    #[arg(long, env = "SEINODE_TLS_WATCH_NAMESPACES", value_name = "NS[,NS...]", default_value = "", value_parser = parse_watch_scope)]
    pub watch_namespaces: WatchScope,
}

#[derive(Debug, clap::Args)]
#[command(next_help_heading = "Webhook")]
pub struct WebhookArgs {
    /// HTTPS address of the admission endpoints.
    #[arg(long, env = "SEINODE_TLS_LISTEN_ADDR", default_value = "0.0.0.0:8443")]
    pub listen_addr: SocketAddr,
    /// Serving certificate chain (PEM); reloaded when it changes on disk.
    #[arg(long, env = "SEINODE_TLS_TLS_CERT_FILE", value_name = "FILE")]
    pub tls_cert_file: PathBuf,
    /// Serving private key (PEM); reloaded when it changes on disk.
    #[arg(long, env = "SEINODE_TLS_TLS_KEY_FILE", value_name = "FILE")]
    pub tls_key_file: PathBuf,
    /// A new TLS SeiNode whose Secret exists but fails the contract: deny it, or admit it with a
    /// warning (it then waits in Pending).
    #[arg(long, env = "SEINODE_TLS_SECRET_POLICY", value_enum, default_value_t = SecretPolicyArg::Deny)]
    pub secret_policy: SecretPolicyArg,
    /// An update or deletion of a TLS Secret that breaks SeiNodes using it: warn, or deny it.
    #[arg(long, env = "SEINODE_TLS_SECRET_GUARD_POLICY", value_enum, default_value_t = GuardPolicyArg::Warn)]
    pub secret_guard_policy: GuardPolicyArg,
    /// Every admission request is answered within this time; keep it below the webhook
    /// configurations' timeoutSeconds (5s).
    #[arg(long, env = "SEINODE_TLS_REQUEST_DEADLINE", default_value = "2s", value_parser = humantime::parse_duration)]
    pub request_deadline: Duration,
    /// Time in-flight requests get to finish at shutdown.
    #[arg(long, env = "SEINODE_TLS_SHUTDOWN_GRACE", default_value = "10s", value_parser = humantime::parse_duration)]
    pub shutdown_grace: Duration,
    /// HTTPS connections open at once; a connection over the limit is closed on accept.
    #[arg(long, env = "SEINODE_TLS_MAX_CONNECTIONS", default_value_t = seinode_tls_webhook::config::DEFAULT_MAX_CONNECTIONS as u32, value_parser = clap::value_parser!(u32).range(1..=65_536))]
    pub max_connections: u32,
    /// Admission requests handled at once; a request over the limit is answered 429 with
    /// Retry-After, which the API server retries.
    #[arg(long, env = "SEINODE_TLS_MAX_CONCURRENT_REQUESTS", default_value_t = seinode_tls_webhook::config::DEFAULT_MAX_CONCURRENT_REQUESTS as u32, value_parser = clap::value_parser!(u32).range(1..=4096))]
    pub max_concurrent_requests: u32,
    /// HTTPS connections open at once from one source address; over it a new connection from
    /// there is closed on accept, so that one Pod cannot hold the slots the API server needs.
    #[arg(long, env = "SEINODE_TLS_MAX_CONNECTIONS_PER_SOURCE", default_value_t = seinode_tls_webhook::config::DEFAULT_MAX_CONNECTIONS_PER_SOURCE as u32, value_parser = clap::value_parser!(u32).range(1..=65_536))]
    pub max_connections_per_source: u32,
    /// A connection that has carried no admission review for this long is closed (HTTP/2 PINGs
    /// and requests to other paths do not count), and so is one on which no byte moves for this
    /// long; keep it above the 90s after which the API server drops idle connections itself.
    #[arg(long, env = "SEINODE_TLS_IDLE_TIMEOUT", default_value = "120s", value_parser = humantime::parse_duration)]
    pub idle_timeout: Duration,
    /// A connection is closed gracefully at this age, however busy (HTTP/2 GOAWAY; HTTP/1.1
    /// `Connection: close` on its next response).
    #[arg(long, env = "SEINODE_TLS_MAX_CONNECTION_AGE", default_value = "10m", value_parser = humantime::parse_duration)]
    pub max_connection_age: Duration,
    /// Memory that request bodies being read and decided on may take (bytes, or with a Ki, Mi or
    /// Gi suffix; at least 8Mi, twice the largest review). A body that finds it spent is answered
    /// 429 with Retry-After, which the API server retries.
    #[arg(long, env = "SEINODE_TLS_MAX_BODY_MEMORY", value_name = "BYTES", default_value = "48Mi", value_parser = parse_body_memory)]
    pub max_body_memory: usize,
}

#[derive(Debug, clap::Args)]
#[command(next_help_heading = "Controller")]
pub struct ControllerArgs {
    /// Emit a Warning event this long before a node's certificate expires.
    #[arg(long, env = "SEINODE_TLS_CERT_EXPIRY_WARNING", default_value = "7d", value_parser = humantime::parse_duration)]
    pub cert_expiry_warning: Duration,
    /// Sidecar image for SeiNodes that do not set spec.sidecar.image.
    #[arg(long, env = "SEINODE_TLS_SIDECAR_IMAGE", default_value = seinode_tls_controller::config::DEFAULT_SIDECAR_IMAGE)]
    pub sidecar_image: String,
    /// kube-rbac-proxy image that terminates TLS in front of the sidecar.
    #[arg(long, env = "SEINODE_TLS_RBAC_PROXY_IMAGE", default_value = seinode_tls_controller::config::DEFAULT_RBAC_PROXY_IMAGE)]
    pub rbac_proxy_image: String,
    /// How often a Running node's sidecar is called through its front door (SidecarReady).
    #[arg(long, env = "SEINODE_TLS_SIDECAR_PROBE_INTERVAL", default_value = "30s", value_parser = humantime::parse_duration)]
    pub sidecar_probe_interval: Duration,
    /// Timeout of each sidecar probe.
    #[arg(long, env = "SEINODE_TLS_SIDECAR_PROBE_TIMEOUT", default_value = "5s", value_parser = humantime::parse_duration)]
    pub sidecar_probe_timeout: Duration,
    /// PEM CA bundle trusted for sidecars whose Secret has no ca.crt; without either, the
    /// certificate served must be exactly the Secret's leaf.
    #[arg(long, env = "SEINODE_TLS_SIDECAR_CA_BUNDLE", value_name = "FILE")]
    pub sidecar_ca_bundle: Option<PathBuf>,
    /// ServiceAccount the node pods run as (kube-rbac-proxy uses it for TokenReview and
    /// SubjectAccessReview: bind it to system:auth-delegator); the namespace's default if unset.
    #[arg(long, env = "SEINODE_TLS_NODE_SERVICE_ACCOUNT")]
    pub node_service_account: Option<String>,
    /// The controller's TLS client certificate (PEM, leaf first) for calling the sidecars'
    /// task API through kube-rbac-proxy; read again for each call, so a renewal needs no
    /// restart. Without it, TLS nodes wait at their MarkSidecarReady task.
    #[arg(long, env = "SEINODE_TLS_SIDECAR_CLIENT_CERT_FILE", value_name = "FILE", requires_all = ["sidecar_client_key_file", "sidecar_client_ca_file"])]
    pub sidecar_client_cert_file: Option<PathBuf>,
    /// The private key of --sidecar-client-cert-file (PEM).
    #[arg(
        long,
        env = "SEINODE_TLS_SIDECAR_CLIENT_KEY_FILE",
        value_name = "FILE",
        requires = "sidecar_client_cert_file"
    )]
    pub sidecar_client_key_file: Option<PathBuf>,
    /// The CA bundle (PEM) the node proxies are to trust for --sidecar-client-cert-file
    /// (their --client-ca-file); read at start. Never a CA the API server trusts for clients.
    #[arg(
        long,
        env = "SEINODE_TLS_SIDECAR_CLIENT_CA_FILE",
        value_name = "FILE",
        requires = "sidecar_client_cert_file"
    )]
    pub sidecar_client_ca_file: Option<PathBuf>,
    /// Sidecar calls (probes and mark-ready) at once. They run apart from the reconciles: a
    /// sidecar that never answers holds one of these until its timeout, never a reconcile.
    #[arg(long, env = "SEINODE_TLS_MAX_CONCURRENT_PROBES", default_value_t = 16, value_parser = clap::value_parser!(u16).range(1..=1024))]
    pub max_concurrent_probes: u16,
    /// Bucket of the fleet's genesis artifacts: the sidecar's SEI_GENESIS_BUCKET, which
    /// `seictl serve` requires (as the next three).
    #[arg(long, env = "SEINODE_TLS_SIDECAR_GENESIS_BUCKET", default_value = "")]
    pub sidecar_genesis_bucket: String,
    /// Region of the genesis bucket (SEI_GENESIS_REGION).
    #[arg(long, env = "SEINODE_TLS_SIDECAR_GENESIS_REGION", default_value = "")]
    pub sidecar_genesis_region: String,
    /// Bucket of the fleet's snapshots (SEI_SNAPSHOT_BUCKET).
    #[arg(long, env = "SEINODE_TLS_SIDECAR_SNAPSHOT_BUCKET", default_value = "")]
    pub sidecar_snapshot_bucket: String,
    /// Region of the snapshot bucket (SEI_SNAPSHOT_REGION).
    #[arg(long, env = "SEINODE_TLS_SIDECAR_SNAPSHOT_REGION", default_value = "")]
    pub sidecar_snapshot_region: String,
    /// Dial ADDR (IP:PORT) for the pod named HOST (its DNS name) instead of the IP its Pod
    /// reports (repeatable; for a controller that cannot reach Pod IPs).
    #[arg(long = "sidecar-address", value_name = "HOST=ADDR", value_parser = parse_sidecar_address)]
    pub sidecar_addresses: Vec<(String, std::net::SocketAddr)>,
    /// Dial only Pod IPs inside this IPv4 range (a.b.c.d/n); a Pod reporting another address
    /// is reported unreachable. Unset: any Pod IP.
    #[arg(long, env = "SEINODE_TLS_SIDECAR_POD_CIDR", value_name = "CIDR", value_parser = parse_cidr)]
    pub sidecar_pod_cidr: Option<(std::net::Ipv4Addr, u8)>,
    /// SeiNodes reconciled at once; a node not decided yet goes before plan work.
    #[arg(long, env = "SEINODE_TLS_MAX_CONCURRENT_RECONCILES", default_value_t = 4, value_parser = clap::value_parser!(u16).range(1..=256))]
    pub max_concurrent_reconciles: u16,
    /// Reconcile only while holding a coordination.k8s.io Lease (for several replicas).
    #[arg(long, env = "SEINODE_TLS_LEADER_ELECT")]
    pub leader_elect: bool,
    /// Name of the Lease.
    #[arg(
        long,
        env = "SEINODE_TLS_LEADER_ELECTION_NAME",
        default_value = "seinode-tls-controller"
    )]
    pub leader_election_name: String,
    /// Namespace of the Lease (in a cluster: the pod's namespace).
    #[arg(long, env = "POD_NAMESPACE", default_value = "default")]
    pub leader_election_namespace: String,
    /// This replica's identity in the Lease (in a cluster: the pod's name); a random suffix
    /// keeps two processes apart.
    #[arg(long, env = "POD_NAME")]
    pub leader_election_identity: Option<String>,
    /// How long followers wait, after the Lease last changed, before taking it over.
    #[arg(long, env = "SEINODE_TLS_LEADER_ELECTION_LEASE_DURATION", default_value = "15s", value_parser = humantime::parse_duration)]
    pub leader_election_lease_duration: Duration,
    /// How long the leader goes on without a successful renewal before it stops writing
    /// (shorter than the lease duration).
    #[arg(long, env = "SEINODE_TLS_LEADER_ELECTION_RENEW_DEADLINE", default_value = "10s", value_parser = humantime::parse_duration)]
    pub leader_election_renew_deadline: Duration,
    /// How often the leader renews and candidates try (also each request's timeout).
    #[arg(long, env = "SEINODE_TLS_LEADER_ELECTION_RETRY_PERIOD", default_value = "2s", value_parser = humantime::parse_duration)]
    pub leader_election_retry_period: Duration,
}

#[derive(Debug, clap::Args)]
pub struct WebhookCli {
    #[command(flatten)]
    pub serve: ServeArgs,
    #[command(flatten)]
    pub webhook: WebhookArgs,
}

#[derive(Debug, clap::Args)]
pub struct ControllerCli {
    #[command(flatten)]
    pub serve: ServeArgs,
    #[command(flatten)]
    pub controller: ControllerArgs,
}

#[derive(Debug, clap::Args)]
pub struct RunCli {
    #[command(flatten)]
    pub serve: ServeArgs,
    #[command(flatten)]
    pub webhook: WebhookArgs,
    #[command(flatten)]
    pub controller: ControllerArgs,
}

impl WebhookArgs {
    pub fn into_config(self, serve: &ServeArgs) -> WebhookConfig {
        let mut config = WebhookConfig::new(
            self.listen_addr,
            serve.health_addr,
            self.tls_cert_file,
            self.tls_key_file,
        );
        config.secret_policy = match self.secret_policy {
            SecretPolicyArg::Deny => SecretPolicy::Deny,
            SecretPolicyArg::Warn => SecretPolicy::Warn,
        };
        config.guard_policy = match self.secret_guard_policy {
            GuardPolicyArg::Warn => GuardPolicy::Warn,
            GuardPolicyArg::Deny => GuardPolicy::Deny,
        };
        config.cluster_domain = serve.cluster_domain.clone();
        config.request_deadline = self.request_deadline;
        config.shutdown_grace = self.shutdown_grace;
        config.max_connections = self.max_connections as usize;
        config.max_concurrent_requests = self.max_concurrent_requests as usize;
        config.max_connections_per_source = self.max_connections_per_source as usize;
        config.idle_timeout = self.idle_timeout;
        config.max_connection_age = self.max_connection_age;
        config.max_body_memory = self.max_body_memory;
        config.watch_scope = serve.watch_namespaces.clone();
        config
    }
}

impl ControllerArgs {
    pub fn into_config(self, serve: &ServeArgs) -> ControllerConfig {
        let identity = self
            .leader_election_identity
            .or_else(|| std::env::var("HOSTNAME").ok())
            .unwrap_or_else(|| format!("seinode-tls-{}", std::process::id()));
        let sidecar_addresses = match self.sidecar_pod_cidr {
            Some((network, bits)) => SidecarAddresses::pod_ips_where(move |ip| match ip {
                std::net::IpAddr::V4(ip) => in_cidr(ip, network, bits),
                std::net::IpAddr::V6(_) => false,
            }),
            None => SidecarAddresses::default(),
        };
        for (host, addr) in &self.sidecar_addresses {
            sidecar_addresses.set(host, *addr);
        }
        ControllerConfig {
            sidecar_addresses,
            cluster_domain: serve.cluster_domain.clone(),
            cert_expiry_warning: self.cert_expiry_warning,
            sidecar_image: self.sidecar_image,
            rbac_proxy_image: self.rbac_proxy_image,
            leader_election: self.leader_elect.then_some(LeaderElection {
                lease_name: self.leader_election_name,
                lease_namespace: self.leader_election_namespace,
                identity,
                lease_duration: self.leader_election_lease_duration,
                renew_deadline: self.leader_election_renew_deadline,
                retry_period: self.leader_election_retry_period,
            }),
            max_concurrent_reconciles: self.max_concurrent_reconciles,
            sidecar_probe_interval: self.sidecar_probe_interval,
            sidecar_probe_timeout: self.sidecar_probe_timeout,
            sidecar_ca_bundle: self.sidecar_ca_bundle,
            sidecar_client: match (
                self.sidecar_client_cert_file,
                self.sidecar_client_key_file,
                self.sidecar_client_ca_file,
            ) {
                (Some(cert_file), Some(key_file), Some(ca_file)) => Some(SidecarClientFiles {
                    cert_file,
                    key_file,
                    ca_file,
                }),
                _ => None,
            },
            max_concurrent_probes: self.max_concurrent_probes,
            sidecar_platform: SidecarPlatform {
                genesis_bucket: self.sidecar_genesis_bucket,
                genesis_region: self.sidecar_genesis_region,
                snapshot_bucket: self.sidecar_snapshot_bucket,
                snapshot_region: self.sidecar_snapshot_region,
            },
            node_service_account: self.node_service_account,
            watch_scope: serve.watch_namespaces.clone(),
            ..ControllerConfig::default()
        }
    }
}

/// A size in bytes: a number, or a number with a Ki, Mi or Gi suffix; at least what reading the
/// largest review takes.
fn parse_body_memory(value: &str) -> Result<usize, String> {
    let (number, unit) = match value.find(|c: char| !c.is_ascii_digit()) {
        Some(at) => value.split_at(at),
        None => (value, ""),
    };
    let shift = match unit {
        "" => 0,
        "Ki" => 10,
        "Mi" => 20,
        "Gi" => 30,
        _ => {
            return Err(format!(
                "\"{value}\" is not a size (bytes, or a number with Ki, Mi or Gi)"
            ));
        }
    };
    let bytes = number
        .parse::<usize>()
        .ok()
        .and_then(|n| n.checked_mul(1 << shift))
        .ok_or_else(|| {
            format!("\"{value}\" is not a size (bytes, or a number with Ki, Mi or Gi)")
        })?;
    let least = seinode_tls_webhook::limits::MEMORY_PER_BODY_BYTE
        * seinode_tls_webhook::server::MAX_SECRET_REVIEW_BYTES;
    if bytes < least {
        return Err(format!(
            "{value} cannot hold the largest review; give at least {}Mi",
            least >> 20
        ));
    }
    Ok(bytes)
}

fn parse_watch_scope(value: &str) -> Result<WatchScope, String> {
    WatchScope::parse(value).map_err(|e| e.to_string())
}

/// `a.b.c.d/n`.
fn parse_cidr(value: &str) -> Result<(std::net::Ipv4Addr, u8), String> {
    let (ip, bits) = value
        .split_once('/')
        .ok_or_else(|| format!("expected an IPv4 range like 10.0.0.0/8, got {value:?}"))?;
    let ip = ip
        .parse()
        .map_err(|e| format!("{ip:?} is not an IPv4 address: {e}"))?;
    let bits: u8 = bits
        .parse()
        .ok()
        .filter(|b| *b <= 32)
        .ok_or_else(|| format!("{bits:?} is not a prefix length from 0 to 32"))?;
    Ok((ip, bits))
}

/// Whether `ip` is in `network/bits`.
pub fn in_cidr(ip: std::net::Ipv4Addr, network: std::net::Ipv4Addr, bits: u8) -> bool {
    let mask = u32::MAX.checked_shl(32 - u32::from(bits)).unwrap_or(0);
    u32::from(ip) & mask == u32::from(network) & mask
}

fn parse_sidecar_address(value: &str) -> Result<(String, std::net::SocketAddr), String> {
    let (host, addr) = value
        .split_once('=')
        .ok_or_else(|| format!("expected HOST=IP:PORT, got {value:?}"))?;
    let addr = addr
        .parse()
        .map_err(|e| format!("{addr:?} is not an IP:PORT address: {e}"))?;
    Ok((host.to_owned(), addr))
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum SecretPolicyArg {
    Deny,
    Warn,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum GuardPolicyArg {
    Warn,
    Deny,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum Output {
    Text,
    Json,
    Yaml,
}

impl ContractCli {
    /// The output asked for; the Certificate's flags only go with `--output certificate`.
    fn contract_format(&self) -> Result<ContractFormat, String> {
        let c = &self.certificate;
        let certificate_flags = c.issuer.is_some()
            || c.secret_name.is_some()
            || c.duration.is_some()
            || c.renew_before.is_some()
            || c.issuer_kind != IssuerKind::Issuer;
        match self.output {
            ContractOutput::Text | ContractOutput::Json | ContractOutput::Yaml
                if certificate_flags =>
            {
                Err(
                "--issuer, --issuer-kind, --secret-name, --duration and --renew-before go with \
                 --output certificate"
                    .to_owned(),
                )
            }
            ContractOutput::Text => Ok(ContractFormat::Text),
            ContractOutput::Json => Ok(ContractFormat::Json),
            ContractOutput::Yaml => Ok(ContractFormat::Yaml),
            ContractOutput::Certificate => Ok(ContractFormat::Certificate(CertificateSpec {
                issuer: c.issuer.clone().unwrap_or_default(),
                cluster_issuer: c.issuer_kind == IssuerKind::ClusterIssuer,
                secret_name: c
                    .secret_name
                    .clone()
                    .unwrap_or_else(|| format!("{}-sidecar-tls", self.node.seinode)),
                duration: c.duration,
                renew_before: c.renew_before,
            })),
        }
    }
}

impl From<Output> for OutputFormat {
    fn from(output: Output) -> Self {
        match output {
            Output::Text => OutputFormat::Text,
            Output::Json => OutputFormat::Json,
            Output::Yaml => OutputFormat::Yaml,
        }
    }
}

/// Runs a parsed command line and returns the process exit code.
pub fn run(cli: Cli) -> ExitCode {
    crate::telemetry::init_with(
        match cli.log.log_format {
            LogFormat::Text => crate::telemetry::Format::Text,
            LogFormat::Json => crate::telemetry::Format::Json,
        },
        cli.log.log_level.as_deref(),
    );
    match cli.command {
        Command::Crd => offline::print_crd(),
        Command::Contract(args) => {
            let format = match args.contract_format() {
                Ok(format) => format,
                Err(message) => return offline::usage_error(&message),
            };
            offline::print_contract(
                &args.node.seinode,
                &args.node.namespace,
                &args.node.cluster_domain,
                &format,
            )
        }
        Command::CheckSecret(args) => {
            let check = SecretCheck {
                seinode: args.node.seinode,
                namespace: args.node.namespace,
                cluster_domain: args.node.cluster_domain,
                at: args.at,
                output: args.output.into(),
            };
            match (args.name, args.file) {
                (Some(name), None) => {
                    crate::online::check_secret_in_cluster(&name, &check, &args.cluster.into())
                }
                (None, Some(file)) => offline::check_secret(&CheckSecretArgs { file, check }),
                // clap's group allows exactly one; say so should that ever change.
                _ => offline::usage_error("give either a Secret NAME or -f FILE, not both"),
            }
        }
        Command::Status(args) => crate::online::status(
            &StatusArgs {
                seinode: args.seinode,
                namespace: args.namespace,
                cluster_domain: args.cluster_domain,
                output: args.output.into(),
            },
            &args.cluster.into(),
        ),
        Command::Check(args) => crate::check::check(
            &CheckArgs {
                namespace: args.namespace,
                name: args.name,
                service_account: args.service_account,
                dry_run_namespace: args.dry_run_namespace,
                output: args.output.into(),
            },
            &args.cluster.into(),
        ),
        Command::Completion { shell } => {
            use clap::CommandFactory as _;
            let mut out = Vec::new();
            clap_complete::generate(shell, &mut Cli::command(), "seinode-tls", &mut out);
            offline::write_stdout(&String::from_utf8_lossy(&out))
        }
        Command::Webhook(args) => crate::serve::webhook_main(args.webhook.into_config(&args.serve)),
        Command::Controller(args) => crate::serve::controller_main(
            args.controller.into_config(&args.serve),
            args.serve.health_addr,
        ),
        Command::Run(args) => crate::serve::run_main(
            args.webhook.into_config(&args.serve),
            args.controller.into_config(&args.serve),
        ),
        #[cfg(feature = "local")]
        Command::Local(args) => {
            match in_a_cluster(|name| std::env::var_os(name).is_some(), false) {
                Some(refusal) => refuse(&refusal),
                None => crate::local::main(crate::local::LocalConfig {
                    dir: args.dir,
                    demo: args.demo,
                }),
            }
        }
        #[cfg(feature = "local")]
        Command::StandIn(command) => {
            if let Some(refusal) = in_a_cluster(|name| std::env::var_os(name).is_some(), true) {
                return refuse(&refusal);
            }
            match command {
                StandInCommand::Sidecar { args } => {
                    crate::serve::run_to_exit(seinode_tls_devcluster::standin::run_sidecar(args))
                }
                StandInCommand::Seid { args } => {
                    crate::serve::run_to_exit(seinode_tls_devcluster::standin::run_seid(args))
                }
            }
        }
    }
}

/// Why a development command refuses to run here: inside a Kubernetes Pod
/// (`KUBERNETES_SERVICE_HOST` is set), `local` (which, as root, makes network namespaces and
/// overlays `/`) never runs, and a stand-in only in the one-machine cluster's own Pods (whose
/// images set `SEINODE_TLS_DEVCLUSTER_POD`).
#[cfg(feature = "local")]
fn in_a_cluster(is_set: impl Fn(&str) -> bool, stand_in: bool) -> Option<String> {
    if !is_set("KUBERNETES_SERVICE_HOST") {
        return None;
    }
    if stand_in && is_set(seinode_tls_devcluster::cluster::DEVCLUSTER_POD_ENV) {
        return None;
    }
    let what = if stand_in {
        "the stand-ins run only in the one-machine cluster's Pods"
    } else {
        "`local` starts a cluster of its own on this machine (as root it makes network namespaces \
         and overlays /)"
    };
    Some(format!(
        "refusing to run inside a Kubernetes Pod (KUBERNETES_SERVICE_HOST is set): {what}"
    ))
}

#[cfg(feature = "local")]
fn refuse(refusal: &str) -> std::process::ExitCode {
    eprintln!("error: {refusal}");
    std::process::ExitCode::FAILURE
}

#[cfg(all(test, feature = "local"))]
mod stand_in_tests {
    #![allow(clippy::unwrap_used)]

    use clap::CommandFactory as _;

    use super::*;

    #[test]
    fn local_and_the_stand_ins_refuse_to_run_in_a_cluster_but_the_stand_ins_in_their_own_pods() {
        let env = |names: &'static [&'static str]| move |name: &str| names.contains(&name);
        static POD: [&str; 1] = ["KUBERNETES_SERVICE_HOST"];
        static OWN_POD: [&str; 2] = [
            "KUBERNETES_SERVICE_HOST",
            seinode_tls_devcluster::cluster::DEVCLUSTER_POD_ENV,
        ];
        let (pod, own_pod) = (&POD, &OWN_POD);
        assert_eq!(in_a_cluster(env(&[]), false), None);
        assert_eq!(in_a_cluster(env(&[]), true), None);
        let local = in_a_cluster(env(pod), false).unwrap();
        assert!(
            local.contains("KUBERNETES_SERVICE_HOST") && local.contains("`local`"),
            "{local}"
        );
        assert!(
            in_a_cluster(env(own_pod), false).is_some(),
            "local never runs in a Pod"
        );
        assert!(in_a_cluster(env(pod), true).is_some());
        assert_eq!(in_a_cluster(env(own_pod), true), None);
    }

    fn stand_in(args: &[&str]) -> StandInCommand {
        let argv = ["seinode-tls", "stand-in"].iter().chain(args);
        match Cli::try_parse_from(argv).unwrap().command {
            Command::StandIn(command) => command,
            other => panic!("parsed as {other:?}"),
        }
    }

    #[test]
    fn stand_in_seid_passes_its_arguments_through_unparsed() {
        let expected = ["start", "--home", "/sei", "--trace", "-x"].map(str::to_owned);
        for args in [
            &["seid", "--", "start", "--home", "/sei", "--trace", "-x"][..],
            &["seid", "start", "--home", "/sei", "--trace", "-x"],
        ] {
            match stand_in(args) {
                StandInCommand::Seid { args } => assert_eq!(args, expected),
                other => panic!("parsed as {other:?}"),
            }
        }
    }

    #[test]
    fn stand_in_sidecar_takes_seictls_serve_but_no_flags_and_is_hidden_from_help() {
        assert!(
            matches!(stand_in(&["sidecar"]), StandInCommand::Sidecar { args } if args.is_empty())
        );
        assert!(
            matches!(stand_in(&["sidecar", "serve"]), StandInCommand::Sidecar { args } if args == ["serve"])
        );
        assert!(Cli::try_parse_from(["seinode-tls", "stand-in", "sidecar", "--port=1"]).is_err());
        let help = Cli::command().render_help().to_string();
        assert!(!help.contains("stand-in"), "{help}");
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    #[test]
    fn a_pod_cidr_is_an_ipv4_range_and_contains_what_it_should() {
        let (network, bits) = super::parse_cidr("198.18.3.0/24").unwrap();
        assert!(super::in_cidr("198.18.3.7".parse().unwrap(), network, bits));
        assert!(!super::in_cidr(
            "198.18.4.7".parse().unwrap(),
            network,
            bits
        ));
        let (any, zero) = super::parse_cidr("0.0.0.0/0").unwrap();
        assert!(super::in_cidr("10.1.2.3".parse().unwrap(), any, zero));
        for bad in ["198.18.3.0", "198.18.3.0/33", "fd00::/8", "x/24"] {
            assert!(super::parse_cidr(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn a_log_level_is_a_level_or_a_list_of_directives() {
        for good in [
            "info",
            "DEBUG",
            "warn,seinode_tls_controller=debug",
            "off",
            "kube=trace",
        ] {
            assert_eq!(super::parse_log_filter(good).as_deref(), Ok(good), "{good}");
        }
        for bad in ["nope", "info,verbose", "kube=loud", ""] {
            assert!(super::parse_log_filter(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn body_memory_is_a_size_that_holds_the_largest_review() {
        assert_eq!(super::parse_body_memory("48Mi"), Ok(48 << 20));
        assert_eq!(super::parse_body_memory("1Gi"), Ok(1 << 30));
        assert_eq!(super::parse_body_memory("8388608"), Ok(8 << 20));
        let small = super::parse_body_memory("4Mi").unwrap_err();
        assert!(small.contains("at least 8Mi"), "{small}");
        for bad in ["", "Mi", "48MB", "-1", "48 Mi", "99999999999999999999Gi"] {
            let error = super::parse_body_memory(bad).unwrap_err();
            assert!(error.contains("not a size"), "{bad}: {error}");
        }
    }

    use super::*;

    #[test]
    fn the_webhook_flags_default_to_the_library_defaults() {
        let cli = Cli::try_parse_from([
            "seinode-tls",
            "webhook",
            "--tls-cert-file=c.pem",
            "--tls-key-file=k.pem",
        ])
        .unwrap();
        let Command::Webhook(args) = cli.command else {
            panic!("parsed as {:?}", cli.command);
        };
        let flags = args.webhook.into_config(&args.serve);
        let library = WebhookConfig::new(
            flags.listen_addr,
            flags.health_addr,
            flags.tls_cert_file.clone(),
            flags.tls_key_file.clone(),
        );
        assert_eq!(flags.max_connections, library.max_connections);
        assert_eq!(
            flags.max_concurrent_requests,
            library.max_concurrent_requests
        );
        assert_eq!(flags.idle_timeout, library.idle_timeout);
        assert_eq!(
            flags.max_connections_per_source,
            library.max_connections_per_source
        );
        assert_eq!(flags.max_connection_age, library.max_connection_age);
        assert_eq!(flags.max_body_memory, library.max_body_memory);
        assert_eq!(flags.request_deadline, library.request_deadline);
        assert_eq!(flags.shutdown_grace, library.shutdown_grace);
        assert_eq!(flags.watch_scope, library.watch_scope);
    }

    fn run_cli(args: &[&str]) -> Result<RunCli, clap::Error> {
        let argv = [
            "seinode-tls",
            "run",
            "--tls-cert-file=c",
            "--tls-key-file=k",
        ];
        match Cli::try_parse_from(argv.iter().chain(args))?.command {
            Command::Run(run) => Ok(run),
            other => panic!("parsed as {other:?}"),
        }
    }

    #[test]
    fn watch_namespaces_reach_both_co_processes() {
        let args = run_cli(&["--watch-namespaces=sei-a,sei-b"]).unwrap();
        let expected = WatchScope::Namespaces(vec!["sei-a".into(), "sei-b".into()]);
        let RunCli {
            serve,
            webhook,
            controller,
        } = args;
        assert_eq!(webhook.into_config(&serve).watch_scope, expected);
        assert_eq!(controller.into_config(&serve).watch_scope, expected);
    }

    #[test]
    fn no_watch_namespaces_watches_the_cluster() {
        let args = run_cli(&[]).unwrap();
        assert_eq!(args.serve.watch_namespaces, WatchScope::Cluster);
        let args = run_cli(&["--watch-namespaces="]).unwrap();
        assert_eq!(args.serve.watch_namespaces, WatchScope::Cluster);
    }

    #[test]
    fn bad_watch_namespaces_are_refused_with_the_reason() {
        for (value, reason) in [
            ("sei,Sei", "\"Sei\" is not a namespace name"),
            ("sei,sei", "namespace \"sei\" is listed twice"),
            ("sei,,b", "empty entry"),
        ] {
            let error = run_cli(&[&format!("--watch-namespaces={value}")])
                .err()
                .unwrap_or_else(|| panic!("{value:?} accepted"))
                .to_string();
            assert!(
                error.contains("--watch-namespaces") && error.contains(reason),
                "{value:?}: {error}"
            );
        }
    }
}
