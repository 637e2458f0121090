//! Commands that read the cluster with the user's kubeconfig: `check-secret NAME` and `status`
//! (`check` has its own module). They judge what they read with the same code as the offline
//! commands, the webhook and the controller, and end with the exit codes of [`crate::exit`].

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use jiff::Timestamp;
use k8s_openapi::api::core::v1::Secret;
use kube::Api;
use kube::config::{KubeConfigOptions, Kubeconfig};
use seinode_tls_crds::SeiNode;

use crate::exit::{EXIT_CLUSTER, EXIT_FORBIDDEN, EXIT_NOT_FOUND};
use crate::offline::{self, OutputFormat, SecretCheck};

/// Which cluster, as whom, and how long to wait for it.
#[derive(Debug, Clone)]
pub struct ClusterOptions {
    /// A kubeconfig file; else `KUBECONFIG`, `~/.kube/config` or the Pod's ServiceAccount.
    pub kubeconfig: Option<PathBuf>,
    /// A context of the kubeconfig other than its current one.
    pub context: Option<String>,
    /// Every API request is answered within this, retries included.
    pub request_timeout: Duration,
}

/// Why a command that talks to the cluster stopped; each kind has its exit code.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Failure {
    /// The object asked about does not exist.
    NotFound(String),
    /// The API server refused the caller.
    Forbidden(String),
    /// No configuration, no answer, or another error from the API server.
    Cluster(String),
}

impl Failure {
    /// Prints `error: <message>` and returns the kind's exit code.
    pub fn exit(&self) -> ExitCode {
        let (message, code) = match self {
            Failure::NotFound(m) => (m, EXIT_NOT_FOUND),
            Failure::Forbidden(m) => (m, EXIT_FORBIDDEN),
            Failure::Cluster(m) => (m, EXIT_CLUSTER),
        };
        eprintln!("error: {message}");
        ExitCode::from(code)
    }

    /// Sorts an API error about `what` ("Secret \"ns/name\"") into a failure whose message says
    /// what failed and what to check.
    pub fn from_api(what: &str, verb: &str, error: &kube::Error) -> Self {
        match error {
            kube::Error::Api(status) if status.code == 404 => {
                Failure::NotFound(format!("{what} not found"))
            }
            kube::Error::Api(status) if status.code == 401 => Failure::Forbidden(format!(
                "failed to {verb} {what}: the API server did not accept the credentials \
                 (401 Unauthorized); log in again or pick another --context"
            )),
            kube::Error::Api(status) if status.code == 403 => Failure::Forbidden(format!(
                "failed to {verb} {what}: forbidden: {}",
                status.message
            )),
            kube::Error::Api(status) => Failure::Cluster(format!(
                "failed to {verb} {what}: the API server answered {} {}: {}",
                status.code, status.reason, status.message
            )),
            other => Failure::Cluster(format!(
                "failed to {verb} {what}: cannot talk to the API server ({})",
                root_cause(other)
            )),
        }
    }
}

/// The innermost cause of `error`: what a transport error comes down to ("tcp connect error:
/// Connection refused"), without the layers that each repeat their source.
pub fn root_cause(error: &(dyn std::error::Error + 'static)) -> String {
    let mut cause = error;
    while let Some(source) = cause.source() {
        cause = source;
    }
    cause.to_string()
}

/// A client for the cluster `options` name: `--kubeconfig` and `--context` when given, else
/// what kubectl would use (`KUBECONFIG`, `~/.kube/config`), else the Pod's ServiceAccount.
pub async fn client(options: &ClusterOptions) -> Result<kube::Client, Failure> {
    crate::telemetry::install_crypto_provider();
    let kube_options = KubeConfigOptions {
        context: options.context.clone(),
        ..KubeConfigOptions::default()
    };
    let config = match (&options.kubeconfig, &options.context) {
        (Some(path), _) => {
            let file = Kubeconfig::read_from(path).map_err(|e| {
                // kube's message already carries its cause.
                Failure::Cluster(format!("failed to read the kubeconfig: {e}"))
            })?;
            kube::Config::from_custom_kubeconfig(file, &kube_options)
                .await
                .map_err(|e| {
                    Failure::Cluster(format!(
                        "failed to use the kubeconfig {}: {e}",
                        path.display()
                    ))
                })?
        }
        (None, Some(_)) => kube::Config::from_kubeconfig(&kube_options)
            .await
            .map_err(|e| Failure::Cluster(format!("failed to use the kubeconfig: {e}")))?,
        (None, None) => kube::Config::infer().await.map_err(|e| {
            // kube's message already carries its causes.
            Failure::Cluster(format!(
                "no cluster to talk to: {e} (give --kubeconfig, set KUBECONFIG, or run in a Pod)"
            ))
        })?,
    };
    crate::api_client::with_deadline(config, options.request_timeout)
        .map_err(|e| Failure::Cluster(format!("{e:#}")))
}

/// Runs `work` on a runtime of its own (the online commands are one-shot) and turns its
/// failure into the exit code.
pub fn block_on(work: impl Future<Output = Result<ExitCode, Failure>>) -> ExitCode {
    let runtime = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(runtime) => runtime,
        Err(e) => return Failure::Cluster(format!("failed to start the runtime: {e}")).exit(),
    };
    match runtime.block_on(work) {
        Ok(code) => code,
        Err(failure) => failure.exit(),
    }
}

// === check-secret NAME ===

/// `check-secret NAME`: reads Secret `name` in the node's namespace and judges it as `-f` does.
pub fn check_secret_in_cluster(
    name: &str,
    check: &SecretCheck,
    cluster: &ClusterOptions,
) -> ExitCode {
    let names = match offline::contract_names(check) {
        Ok(names) => names,
        Err(code) => return code,
    };
    block_on(async {
        let client = client(cluster).await?;
        let secret = Api::<Secret>::namespaced(client, &check.namespace)
            .get(name)
            .await
            .map_err(|e| {
                Failure::from_api(&format!("Secret \"{}/{name}\"", check.namespace), "get", &e)
            })?;
        Ok(offline::judge_and_print(check, &names, &secret))
    })
}

// === status ===

/// Inputs of `status`.
#[derive(Debug, Clone)]
pub struct StatusArgs {
    pub seinode: String,
    pub namespace: String,
    /// For the contract of a node whose status does not carry it yet.
    pub cluster_domain: String,
    pub output: OutputFormat,
}

/// `status SEINODE`: the node's contract, conditions with what to do, and certificate expiry;
/// 0 when it is Ready, 1 when not.
pub fn status(args: &StatusArgs, cluster: &ClusterOptions) -> ExitCode {
    block_on(async {
        let client = client(cluster).await?;
        let node = Api::<SeiNode>::namespaced(client, &args.namespace)
            .get(&args.seinode)
            .await
            .map_err(|e| {
                Failure::from_api(
                    &format!("SeiNode \"{}/{}\"", args.namespace, args.seinode),
                    "get",
                    &e,
                )
            })?;
        let report = crate::status::NodeReport::new(&node, &args.cluster_domain, Timestamp::now());
        let text = match args.output {
            OutputFormat::Text => report.text(),
            OutputFormat::Json => offline::json_line(&report),
            OutputFormat::Yaml => offline::yaml_document(&report),
        };
        let written = offline::write_stdout(&text);
        if written != ExitCode::SUCCESS {
            return Ok(written);
        }
        Ok(if report.ready {
            ExitCode::SUCCESS
        } else {
            ExitCode::from(crate::exit::EXIT_NOT_READY)
        })
    })
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use super::*;

    fn api_error(code: u16, message: &str) -> kube::Error {
        kube::Error::Api(Box::new(kube::core::Status {
            code,
            message: message.to_owned(),
            reason: "Reason".to_owned(),
            ..kube::core::Status::default()
        }))
    }

    #[test]
    fn api_errors_sort_into_not_found_forbidden_and_the_rest() {
        let what = "Secret \"sei/rpc-tls\"";
        assert_eq!(
            Failure::from_api(
                what,
                "get",
                &api_error(404, "secrets \"rpc-tls\" not found")
            ),
            Failure::NotFound("Secret \"sei/rpc-tls\" not found".to_owned())
        );
        let Failure::Forbidden(forbidden) =
            Failure::from_api(what, "get", &api_error(403, "User \"u\" cannot get"))
        else {
            panic!("403 is forbidden");
        };
        assert!(forbidden.contains("User \"u\" cannot get"), "{forbidden}");
        assert!(matches!(
            Failure::from_api(what, "get", &api_error(401, "")),
            Failure::Forbidden(_)
        ));
        assert!(matches!(
            Failure::from_api(what, "get", &api_error(500, "etcd")),
            Failure::Cluster(m) if m.contains("500") && m.contains("etcd")
        ));
    }
}
