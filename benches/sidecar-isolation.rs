//! `sidecar-isolation`: do sidecars that never answer slow down other nodes' decisions?
//!
//! It starts the one-machine control plane (no kubelet: the StatefulSets' Pods stay Pending, with
//! no IP) with the SeiNode CRD and runs the controller in-process. `--hung` nodes without TLS
//! are created first and pointed (`SidecarAddresses::set`) at a loopback listener that accepts
//! connections and never answers: each of their `mark-ready` calls hangs for its whole timeout,
//! again and again, holding a call permit (`--max-concurrent-probes`, 16) meanwhile.
//!
//! Then, in rounds alternating without and with the hung nodes, it creates `--nodes` TLS nodes
//! whose Secrets exist and measures, from a poll of the SeiNodes every 20 ms, the time from each
//! create to its decision (`SidecarTLSSecretReady=True`) and to its applies done (the plan's
//! `ApplyStatefulSet` complete). Figures, not assertions: the two kinds of round should not
//! differ, since a reconcile never waits on a sidecar call. See `docs/benchmarks.md`.
//!
//! `cargo bench --bench sidecar-isolation -- --hung 20 --nodes 20 --rounds 2`

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use anyhow::Context as _;
use clap::Parser;
use k8s_openapi::api::core::v1::{Namespace, Secret};
use kube::api::{Api, ListParams, ObjectMeta, PostParams};
use seinode_tls_controller::Controller;
use seinode_tls_controller::sidecar::SidecarAddresses;
use seinode_tls_crds::contract::{DEFAULT_CLUSTER_DOMAIN, required_dns_names};
use seinode_tls_crds::{SIDECAR_TLS_SECRET_READY, SeiNode, TaskStatus};
use seinode_tls_devcluster::control_plane::{self, ControlPlane, ControlPlaneConfig};
use seinode_tls_testkit::{CertificateAuthority, LeafSpec};
use serde_json::json;

/// The controller's default `--max-concurrent-probes`: calls in flight at once.
const MAX_CALLS: usize = 16;

#[derive(Debug, Parser)]
struct Args {
    /// Nodes whose sidecar never answers.
    #[arg(long, default_value_t = 20)]
    hung: usize,
    /// TLS nodes measured per round.
    #[arg(long, default_value_t = 20)]
    nodes: usize,
    /// Rounds of each kind (without, then with the hung nodes, alternating).
    #[arg(long, default_value_t = 2)]
    rounds: usize,
    /// Longest wait for one round.
    #[arg(long, default_value = "120s", value_parser = humantime::parse_duration)]
    timeout: Duration,
}

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() -> anyhow::Result<()> {
    // Cargo passes `--bench` to every bench target.
    let args = Args::parse_from(std::env::args().filter(|a| a != "--bench"));
    seinode_tls::telemetry::init();
    let cp = ControlPlane::start(ControlPlaneConfig::default())
        .await
        .context("failed to start the control plane (see docs/control-plane.md)")?;
    let client = cp.client().await?;
    control_plane::install_crd(&client).await?;

    // The sidecar that never answers: connections are accepted and held.
    let blackhole = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let blackhole_addr = blackhole.local_addr()?;
    let accepted = Arc::new(AtomicUsize::new(0));
    let counted = accepted.clone();
    tokio::spawn(async move {
        let mut held = Vec::new();
        while let Ok((stream, _)) = blackhole.accept().await {
            counted.fetch_add(1, Ordering::Relaxed);
            held.push(stream);
        }
    });

    let addresses = SidecarAddresses::default();
    let config = seinode_tls_controller::ControllerConfig {
        sidecar_addresses: addresses.clone(),
        ..Default::default()
    };
    let controller = Controller::new(
        config,
        &mut prometheus_client::registry::Registry::default(),
    )?;
    let clients = seinode_tls::api_client::controller_clients(&controller, cp.config().await?)?;
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let running = tokio::spawn(controller.run(clients, async move {
        let _ = stopped.await;
    }));

    let ca = CertificateAuthority::new("sidecar-isolation CA")?;
    let mut rows = Vec::new();
    for round in 0..args.rounds * 2 {
        let with_hung = round % 2 == 1;
        let mut hung_ns = None;
        if with_hung {
            let ns = namespace(&client, &format!("hung-{round}")).await?;
            for i in 0..args.hung {
                let name = format!("hung-{i}");
                addresses.set(
                    &format!("{name}-0.{name}.{ns}.svc.{DEFAULT_CLUSTER_DOMAIN}"),
                    blackhole_addr,
                );
                create_node(&client, &ns, &name, None).await?;
            }
            hung_ns = Some(ns);
            // Measure only once their calls hang (all of them, or every call permit).
            let hanging = args.hung.min(MAX_CALLS);
            let deadline = Instant::now() + args.timeout;
            while accepted.load(Ordering::Relaxed) < hanging && Instant::now() < deadline {
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        }
        let ns = namespace(&client, &format!("round-{round}")).await?;
        let measured = measure(&client, &ca, &ns, args.nodes, args.timeout).await?;
        eprintln!(
            "sidecar-isolation: round {round} ({}) done",
            if with_hung {
                "with hung sidecars"
            } else {
                "without"
            }
        );
        rows.push((with_hung, measured, accepted.swap(0, Ordering::Relaxed)));
        // The hung nodes go with their round (their calls end at their timeout).
        if let Some(ns) = hung_ns {
            for node in Api::<SeiNode>::namespaced(client.clone(), &ns)
                .list(&ListParams::default())
                .await?
                .items
                .iter()
                .take(1)
            {
                let says = node
                    .status
                    .as_ref()
                    .and_then(|s| s.conditions.as_ref())
                    .and_then(|c| c.iter().find(|c| c.type_ == "SidecarReady"))
                    .map(|c| c.message.clone());
                eprintln!("sidecar-isolation: a hung node's SidecarReady: {says:?}");
            }
            let api: Api<Namespace> = Api::all(client.clone());
            api.delete(&ns, &Default::default()).await?;
        }
    }
    let _ = stop.send(());
    let _ = running.await;

    println!(
        "| round | hung sidecars | calls they held | nodes | decided p50 / max (ms) | applies done p50 / max (ms) |"
    );
    println!("|---|---|---|---|---|---|");
    for (i, (with_hung, m, held)) in rows.iter().enumerate() {
        println!(
            "| {i} | {} | {held} | {} | {} / {} | {} / {} |",
            if *with_hung { args.hung } else { 0 },
            args.nodes,
            percentile(&m.decided, 50),
            percentile(&m.decided, 100),
            percentile(&m.applied, 50),
            percentile(&m.applied, 100),
        );
    }
    Ok(())
}

struct Measured {
    decided: Vec<u128>,
    applied: Vec<u128>,
}

fn percentile(values: &[u128], p: usize) -> String {
    if values.is_empty() {
        return "-".to_owned();
    }
    let mut sorted = values.to_vec();
    sorted.sort_unstable();
    let index = (sorted.len() * p / 100).min(sorted.len() - 1);
    sorted[index].to_string()
}

async fn namespace(client: &kube::Client, prefix: &str) -> anyhow::Result<String> {
    let name = format!("{prefix}-{}", std::process::id());
    let api: Api<Namespace> = Api::all(client.clone());
    let ns = Namespace {
        metadata: ObjectMeta {
            name: Some(name.clone()),
            ..ObjectMeta::default()
        },
        ..Namespace::default()
    };
    api.create(&PostParams::default(), &ns).await?;
    Ok(name)
}

async fn create_node(
    client: &kube::Client,
    ns: &str,
    name: &str,
    secret: Option<&str>,
) -> anyhow::Result<()> {
    let mut spec =
        json!({"chainId": "arctic-1", "image": "ghcr.io/sei-protocol/sei:v6.3.0", "fullNode": {}});
    if let Some(secret) = secret {
        spec["sidecar"] = json!({"tls": {"secretName": secret}});
    }
    let node: SeiNode = serde_json::from_value(json!({
        "apiVersion": "sei.io/v1alpha1", "kind": "SeiNode",
        "metadata": {"name": name, "namespace": ns}, "spec": spec,
    }))?;
    Api::<SeiNode>::namespaced(client.clone(), ns)
        .create(&PostParams::default(), &node)
        .await?;
    Ok(())
}

/// Creates `count` TLS nodes (their Secrets first) and times each to its decision and to its
/// applies done.
async fn measure(
    client: &kube::Client,
    ca: &CertificateAuthority,
    ns: &str,
    count: usize,
    timeout: Duration,
) -> anyhow::Result<Measured> {
    let secrets: Api<Secret> = Api::namespaced(client.clone(), ns);
    for i in 0..count {
        let name = format!("rpc-{i}");
        let names = required_dns_names(&name, ns, DEFAULT_CLUSTER_DOMAIN);
        let dns: Vec<&str> = names.iter().map(String::as_str).collect();
        let leaf = ca.issue(&LeafSpec {
            common_name: &name,
            dns_names: &dns,
            server: true,
            ..LeafSpec::default()
        })?;
        let secret = seinode_tls_testkit::tls_secret(
            ns,
            &format!("{name}-tls"),
            &leaf.cert_pem,
            &leaf.key_pem,
            Some(&ca.cert_pem()),
        );
        secrets.create(&PostParams::default(), &secret).await?;
    }
    let mut created = Vec::with_capacity(count);
    for i in 0..count {
        let name = format!("rpc-{i}");
        create_node(client, ns, &name, Some(&format!("{name}-tls"))).await?;
        created.push((name, Instant::now()));
    }
    let nodes: Api<SeiNode> = Api::namespaced(client.clone(), ns);
    let started = Instant::now();
    let mut decided: Vec<Option<u128>> = vec![None; count];
    let mut applied: Vec<Option<u128>> = vec![None; count];
    while started.elapsed() < timeout
        && (decided.iter().any(Option::is_none) || applied.iter().any(Option::is_none))
    {
        let now = Instant::now();
        for node in nodes.list(&ListParams::default()).await? {
            let name = node.metadata.name.clone().unwrap_or_default();
            let Some(i) = created.iter().position(|(n, _)| *n == name) else {
                continue;
            };
            let since = now.duration_since(created[i].1).as_millis();
            let status = node.status.as_ref();
            let ready = status.and_then(|s| s.conditions.as_ref()).is_some_and(|c| {
                c.iter()
                    .any(|c| c.type_ == SIDECAR_TLS_SECRET_READY && c.status == "True")
            });
            let sts_done = status.and_then(|s| s.plan.as_ref()).is_some_and(|p| {
                p.tasks
                    .iter()
                    .any(|t| t.r#type == "ApplyStatefulSet" && t.status == TaskStatus::Complete)
            });
            if ready && decided[i].is_none() {
                decided[i] = Some(since);
            }
            if sts_done && applied[i].is_none() {
                applied[i] = Some(since);
            }
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    Ok(Measured {
        decided: decided.into_iter().flatten().collect(),
        applied: applied.into_iter().flatten().collect(),
    })
}
