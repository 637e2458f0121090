//! `seinode-tls local`: the whole system on one machine, against an embedded control plane.
//!
//! Starts etcd and kube-apiserver (see [`crate::control_plane`]), installs the SeiNode CRD,
//! prints one `ready: export KUBECONFIG=...` line on stdout and runs until SIGINT or SIGTERM,
//! then stops everything and removes its directory. Progress and logs go to stderr.

use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::Context as _;
use futures::StreamExt;
use k8s_openapi::ByteString;
use k8s_openapi::api::core::v1::Secret;
use kube::api::{Api, ObjectMeta};
use kube::runtime::watcher;
use seinode_tls_crds::contract::{DEFAULT_CLUSTER_DOMAIN, required_dns_names};
use seinode_tls_crds::{SIDECAR_TLS_SECRET_READY, SeiNode, SeiNodeSpec, SidecarSpec, SidecarTls};
use tokio::signal::unix::{SignalKind, signal};

use crate::control_plane::{self, ControlPlane, ControlPlaneConfig};
use crate::offline::error_chain;

/// Namespace and names of the `--demo` objects.
const DEMO_NAMESPACE: &str = "default";
const DEMO_NODE: &str = "demo";
const DEMO_SECRET: &str = "demo-sidecar-tls";

/// Inputs of `local`.
#[derive(Debug, Clone)]
pub struct LocalConfig {
    pub dir: PathBuf,
    pub demo: bool,
}

/// Runs `local` to completion and returns the exit code.
pub fn main(config: LocalConfig) -> ExitCode {
    crate::telemetry::init();
    crate::telemetry::install_crypto_provider();
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(runtime) => runtime,
        Err(e) => {
            eprintln!("error: failed to start the async runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    match runtime.block_on(run(config)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {}", error_chain(e.as_ref()));
            ExitCode::FAILURE
        }
    }
}

async fn run(config: LocalConfig) -> anyhow::Result<()> {
    // Registered first so a signal during start-up is not lost: it ends the run right after.
    let mut sigint =
        signal(SignalKind::interrupt()).context("failed to install the SIGINT handler")?;
    let mut sigterm =
        signal(SignalKind::terminate()).context("failed to install the SIGTERM handler")?;

    eprintln!(
        "starting etcd and kube-apiserver in {}",
        config.dir.display()
    );
    let control_plane = ControlPlane::start(ControlPlaneConfig {
        dir: Some(config.dir),
        binaries: None,
    })
    .await?;
    let client = control_plane.client().await?;
    eprintln!(
        "API server ready at {}; installing the SeiNode CRD",
        control_plane.server()
    );
    control_plane::install_crd(&client).await?;

    let demo = if config.demo {
        Some(start_demo(&control_plane, client.clone()).await?)
    } else {
        None
    };

    println!(
        "ready: export KUBECONFIG={}",
        control_plane.kubeconfig().display()
    );
    tokio::select! {
        _ = sigint.recv() => {}
        _ = sigterm.recv() => {}
    }
    eprintln!("shutting down");
    if let Some(demo) = demo {
        demo.abort();
    }
    drop(control_plane);
    eprintln!("stopped");
    Ok(())
}

/// Applies an example TLS Secret (issued for the node's contract) and a SeiNode naming it, and
/// prints the node's progress as its status changes.
async fn start_demo(
    control_plane: &ControlPlane,
    client: kube::Client,
) -> anyhow::Result<tokio::task::JoinHandle<()>> {
    let names = required_dns_names(DEMO_NODE, DEMO_NAMESPACE, DEFAULT_CLUSTER_DOMAIN);
    let dns: Vec<&str> = names.iter().map(String::as_str).collect();
    let issued = control_plane.issue_serving_certificate(DEMO_NODE, &dns)?;
    let secret = Secret {
        metadata: ObjectMeta {
            name: Some(DEMO_SECRET.to_owned()),
            namespace: Some(DEMO_NAMESPACE.to_owned()),
            ..ObjectMeta::default()
        },
        type_: Some("kubernetes.io/tls".to_owned()),
        data: Some(
            [
                (
                    "tls.crt".to_owned(),
                    ByteString(issued.cert_pem.into_bytes()),
                ),
                (
                    "tls.key".to_owned(),
                    ByteString(issued.key_pem.into_bytes()),
                ),
                (
                    "ca.crt".to_owned(),
                    ByteString(control_plane.ca().cert_pem().into_bytes()),
                ),
            ]
            .into(),
        ),
        ..Secret::default()
    };
    control_plane::apply(&Api::namespaced(client.clone(), DEMO_NAMESPACE), &secret)
        .await
        .context("failed to apply the demo Secret")?;
    eprintln!(
        "demo: applied Secret {DEMO_NAMESPACE}/{DEMO_SECRET} with DNS names {}",
        names.join(", ")
    );

    let mut node = SeiNode::new(
        DEMO_NODE,
        SeiNodeSpec {
            chain_id: "arctic-1".to_owned(),
            image: "ghcr.io/sei-protocol/sei:v6.3.0".to_owned(),
            sidecar: Some(SidecarSpec {
                tls: Some(SidecarTls {
                    secret_name: DEMO_SECRET.to_owned(),
                }),
                ..SidecarSpec::default()
            }),
            full_node: Some(serde_json::json!({})),
            ..SeiNodeSpec::default()
        },
    );
    node.metadata.namespace = Some(DEMO_NAMESPACE.to_owned());
    let nodes: Api<SeiNode> = Api::namespaced(client, DEMO_NAMESPACE);
    control_plane::apply(&nodes, &node)
        .await
        .context("failed to apply the demo SeiNode")?;
    eprintln!("demo: applied SeiNode {DEMO_NAMESPACE}/{DEMO_NODE}");

    Ok(tokio::spawn(async move {
        let config = watcher::Config::default().fields(&format!("metadata.name={DEMO_NODE}"));
        let mut last = String::new();
        let mut events = watcher::watcher(nodes, config).boxed();
        while let Some(event) = events.next().await {
            if let Ok(watcher::Event::Apply(node) | watcher::Event::InitApply(node)) = event {
                let line = describe(&node);
                if line != last {
                    eprintln!("demo: {line}");
                    last = line;
                }
            }
        }
    }))
}

/// One line on a node's progress: phase and TLS condition.
fn describe(node: &SeiNode) -> String {
    let status = node.status.as_ref();
    let phase = status
        .and_then(|s| s.phase)
        .map_or_else(|| "(none yet)".to_owned(), |p| format!("{p:?}"));
    let tls = status
        .and_then(|s| s.conditions.as_ref())
        .and_then(|c| c.iter().find(|c| c.type_ == SIDECAR_TLS_SECRET_READY))
        .map_or_else(
            || "(not reported yet)".to_owned(),
            |c| format!("{} {}", c.status, c.reason),
        );
    format!("SeiNode {DEMO_NAMESPACE}/{DEMO_NODE}: phase {phase}, {SIDECAR_TLS_SECRET_READY} {tls}")
}
