//! Command-line interface. Flags convert into plain config structs; the commands live in their
//! own modules and never see clap.

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand, ValueEnum};
use jiff::Timestamp;

use crate::offline::{self, CheckSecretArgs, OutputFormat};

/// Exit code for a usage error or unreadable input.
pub const EXIT_USAGE: u8 = 2;

#[derive(Debug, Parser)]
#[command(
    name = "seinode-tls",
    version,
    about = "TLS for the sidecar API of Sei nodes: admission webhook, reconciler and tools",
    long_about = "TLS for the sidecar API of Sei nodes (SeiNode, sei.io/v1alpha1).\n\n\
        A SeiNode names an externally provisioned kubernetes.io/tls Secret in \
        spec.sidecar.tls.secretName. The certificate must carry the DNS names printed by \
        `seinode-tls contract`; `seinode-tls check-secret` tells whether a Secret does."
)]
pub struct Cli {
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Print the SeiNode CustomResourceDefinition (YAML).
    Crd,
    /// Print the DNS names a SeiNode's sidecar certificate must carry.
    Contract(ContractCli),
    /// Check a kubernetes.io/tls Secret manifest against a SeiNode's contract.
    ///
    /// Exit status: 0 when the Secret meets the contract, 1 when it does not, 2 on a usage
    /// error or unreadable input.
    CheckSecret(CheckSecretCli),
    /// Run a local control plane (etcd + kube-apiserver built from Go modules) with the SeiNode
    /// CRD installed, until interrupted.
    Local(LocalCli),
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
    /// Output format: one name per line, or {"requiredDNSNames": [...]}.
    #[arg(long, short = 'o', value_enum, default_value_t = Output::Text)]
    pub output: Output,
}

#[derive(Debug, clap::Args)]
pub struct CheckSecretCli {
    /// Secret manifest, YAML or JSON as `kubectl get secret -o yaml` prints it; `-` for stdin.
    #[arg(long = "filename", short = 'f', value_name = "FILE")]
    pub file: PathBuf,
    #[command(flatten)]
    pub node: NodeArgs,
    /// Judge validity at this instant (RFC 3339, e.g. 2027-01-01T00:00:00Z) instead of now.
    #[arg(long, value_name = "RFC3339")]
    pub at: Option<Timestamp>,
    /// Output format.
    #[arg(long, short = 'o', value_enum, default_value_t = Output::Text)]
    pub output: Output,
}

#[derive(Debug, clap::Args)]
pub struct LocalCli {
    /// Directory for the control plane's state; the kubeconfig is written to DIR/kubeconfig.
    #[arg(long, env = "SEINODE_TLS_LOCAL_DIR", default_value = ".seinode-local")]
    pub dir: PathBuf,
    /// Also apply an example TLS Secret and SeiNode and print the node's progress.
    #[arg(long)]
    pub demo: bool,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum Output {
    Text,
    Json,
}

impl From<Output> for OutputFormat {
    fn from(output: Output) -> Self {
        match output {
            Output::Text => OutputFormat::Text,
            Output::Json => OutputFormat::Json,
        }
    }
}

/// Runs a parsed command line and returns the process exit code.
pub fn run(cli: Cli) -> ExitCode {
    match cli.command {
        Command::Crd => offline::print_crd(),
        Command::Contract(args) => offline::print_contract(
            &args.node.seinode,
            &args.node.namespace,
            &args.node.cluster_domain,
            args.output.into(),
        ),
        Command::CheckSecret(args) => offline::check_secret(&CheckSecretArgs {
            file: args.file,
            seinode: args.node.seinode,
            namespace: args.node.namespace,
            cluster_domain: args.node.cluster_domain,
            at: args.at,
            output: args.output.into(),
        }),
        Command::Local(args) => crate::local::main(crate::local::LocalConfig {
            dir: args.dir,
            demo: args.demo,
        }),
    }
}
