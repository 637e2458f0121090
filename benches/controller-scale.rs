//! `controller-scale`: the controller at fleet size, against a real API server.
//!
//! It starts the one-machine control plane (etcd, kube-apiserver, kube-controller-manager,
//! kube-scheduler; no kubelet) with the SeiNode CRD, and fills it before the controller starts:
//! `--nodes` TLS SeiNodes over `--namespaces` namespaces, and `--secrets` `kubernetes.io/tls`
//! Secrets (an EC P-256 leaf issued by a throwaway CA for a contract's two DNS names, with
//! `ca.crt`). Every node names one Secret; one node in 20 has a bad one (missing, wrong SANs,
//! or a truncated certificate), and the Secrets no node names are noise. A ResourceQuota of
//! zero Pods and PersistentVolumeClaims in each namespace keeps kube-controller-manager from
//! creating the StatefulSets' Pods, which nothing could run.
//!
//! Then it starts `seinode-tls run` (webhook and controller, as the chart deploys it; the
//! webhook is not registered with the API server) as a child process on the admin kubeconfig
//! and measures, from a watch on SeiNodes, the API server's `/metrics`, the controller's
//! `/metrics` and `/proc`:
//!
//! - the time until every node is decided (`status.sidecarTLS` and `SidecarTLSSecretReady` with
//!   the reason its Secret calls for) and settled (a good node's apply tasks complete);
//! - the writes the API server served until then, against the minimum the design needs;
//! - the controller's concurrent TCP connections to the API server (peak of 100 ms samples);
//! - its memory once settled;
//! - reconciles and Secret reads to settling, and writes, reconciles and Secret reads over
//!   `--steady` of steady state;
//! - the latency from creating a Secret to the True condition, for `--late` nodes created
//!   without their Secrets, whose Secrets then arrive at 10 per second.
//!
//! Figures, not assertions; see `docs/benchmarks.md`. Everything it starts is stopped when it
//! ends or is interrupted, and by watchdog processes if it is killed.

use std::collections::{BTreeMap, HashMap};
use std::io::{Read as _, Write as _};
use std::net::{Ipv4Addr, SocketAddr, TcpListener, TcpStream};
use std::os::unix::process::CommandExt as _;
use std::path::PathBuf;
use std::process::{Child, Command, ExitCode, Stdio};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{Context as _, bail};
use clap::Parser;
use futures::{StreamExt as _, TryStreamExt as _};
use k8s_openapi::NamespaceResourceScope;
use k8s_openapi::api::core::v1::{Namespace, ResourceQuota, Secret};
use kube::api::{Api, ObjectMeta, Patch, PatchParams, PostParams};
use kube::runtime::{WatchStreamExt as _, watcher};
use kube::{Client, Resource, ResourceExt as _};
use seinode_tls_crds::contract::{DEFAULT_CLUSTER_DOMAIN, required_dns_names};
use seinode_tls_crds::validation::Reason;
use seinode_tls_crds::{SIDECAR_TLS_SECRET_READY, SeiNode, TaskStatus, error_chain};
use seinode_tls_devcluster::control_plane::{
    self, ControlPlane, ControlPlaneConfig, log_tail, write_private,
};
use seinode_tls_devcluster::watchdog::Watchdog;
use seinode_tls_kube::versions::read_secret;
use seinode_tls_testkit::{CertificateAuthority, LeafSpec};
use serde::Serialize;
use serde::de::DeserializeOwned;
use serde_json::json;

/// One node in this many gets a bad Secret (5 %).
const BAD_EVERY: usize = 20;
/// Writes the design needs per node whose Secret is good: the status with contract, condition
/// and plan; for each of the ConfigMap, Service and StatefulSet tasks an apply and a status
/// write; one event; the status saying what `MarkSidecarReady` waits for (no Pod runs here).
const MIN_WRITES_GOOD: u64 = 9;
/// Writes the design needs per node whose Secret is bad: the status, one event.
const MIN_WRITES_BAD: u64 = 2;
/// Pace of the late Secrets (10 per second).
const LATE_INTERVAL: Duration = Duration::from_millis(100);
/// Period of the connection samples.
const SAMPLE_INTERVAL: Duration = Duration::from_millis(100);
/// After the watch shows every node settled, the controller's write counters must stay still
/// this long before the "settled" figures are taken (its last events follow the last status).
const QUIET: Duration = Duration::from_secs(2);
/// Period of the API server scrapes while waiting for that quiet.
const QUIET_POLL: Duration = Duration::from_millis(500);
/// Time the controller gets to stop on SIGTERM before it is killed.
const STOP_GRACE: Duration = Duration::from_secs(15);

#[derive(Debug, Parser)]
#[command(about = "Scale benchmark: seinode-tls run against a real API server holding a fleet")]
struct Args {
    /// Passed by `cargo bench` to every bench target; nothing to do with it.
    #[arg(long, hide = true)]
    bench: bool,
    /// TLS SeiNodes created before the controller starts.
    #[arg(long, env = "CONTROLLER_SCALE_NODES", default_value_t = 1000)]
    nodes: usize,
    /// `kubernetes.io/tls` Secrets created before the controller starts, the nodes' included.
    #[arg(long, env = "CONTROLLER_SCALE_SECRETS", default_value_t = 10_000)]
    secrets: usize,
    /// Nodes created in steady state without their Secrets, which then arrive at 10 per second.
    #[arg(long, env = "CONTROLLER_SCALE_LATE", default_value_t = 200)]
    late: usize,
    /// Steady-state window in which writes and reconciles are counted.
    #[arg(long, env = "CONTROLLER_SCALE_STEADY", default_value = "60s", value_parser = humantime::parse_duration)]
    steady: Duration,
    /// Namespaces the nodes and Secrets are spread over.
    #[arg(long, env = "CONTROLLER_SCALE_NAMESPACES", default_value_t = 4)]
    namespaces: usize,
    /// Creates in flight during set-up.
    #[arg(long, env = "CONTROLLER_SCALE_CONCURRENCY", default_value_t = 32)]
    concurrency: usize,
    /// Longest wait for any one phase (all decided, all settled, late nodes True); past it the
    /// figures say how far it got.
    #[arg(long, env = "CONTROLLER_SCALE_TIMEOUT", default_value = "10m", value_parser = humantime::parse_duration)]
    timeout: Duration,
    /// Instead of `seinode-tls run`, decide every node with the fewest requests any controller
    /// could make (a list of SeiNodes, then per node one Secret read and one status replace
    /// giving the reason the fleet plan calls for), this many nodes in flight, beside two idle
    /// SeiNode watches (`run` holds two); report the time to decide them all and stop: the API
    /// server's floor for the "every node decided" figure on this machine.
    #[arg(long, env = "CONTROLLER_SCALE_FLOOR", value_parser = clap::value_parser!(u16).range(1..=1024))]
    floor: Option<u16>,
    /// With `--floor`: idle SeiNode watches beside the decisions (`run` holds two).
    #[arg(long, env = "CONTROLLER_SCALE_FLOOR_WATCHES", default_value_t = 2)]
    floor_watches: usize,
    /// With `--floor`: how each status is written: `replace` (a PUT of the whole node, as the
    /// controller writes) or `merge` (a JSON merge patch of the status carrying the listed
    /// resourceVersion, the same precondition in a smaller body).
    #[arg(long, env = "CONTROLLER_SCALE_FLOOR_WRITE", value_enum, default_value_t = FloorWrite::Replace)]
    floor_write: FloorWrite,
    /// With `--floor`: what each status holds: `verdict` (the contract and the condition, the
    /// least a decision publishes) or `decided` (the status the controller's own `decide`
    /// writes on first sight: the verdict, the phase, the Ready condition and the init plan).
    #[arg(long, env = "CONTROLLER_SCALE_FLOOR_STATUS", value_enum, default_value_t = FloorStatus::Verdict)]
    floor_status: FloorStatus,
}

/// What `--floor` writes in a status.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
enum FloorStatus {
    Verdict,
    Decided,
}

/// How `--floor` writes a status.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
enum FloorWrite {
    Replace,
    Merge,
}

fn main() -> ExitCode {
    let args = Args::parse();
    if args.nodes == 0 || args.namespaces == 0 || args.concurrency == 0 {
        eprintln!("controller-scale: --nodes, --namespaces and --concurrency must be at least 1");
        return ExitCode::from(2);
    }
    let _ = tracing_subscriber::fmt()
        // kube's client logs every failed request, the API server's readiness polls included.
        .with_env_filter(tracing_subscriber::EnvFilter::new(
            "warn,kube_client::client::builder=off",
        ))
        .with_writer(std::io::stderr)
        .try_init();
    seinode_tls::telemetry::install_crypto_provider();
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(runtime) => runtime,
        Err(e) => {
            eprintln!("controller-scale: failed to start the async runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    // Interrupted, the benchmark's future is dropped: the controller, then the control plane,
    // stop as they drop.
    let outcome = runtime.block_on(async {
        tokio::select! {
            result = run(&args) => result,
            () = seinode_tls::serve::shutdown_signal() => Err(anyhow::anyhow!("interrupted")),
        }
    });
    match outcome {
        Ok(()) => ExitCode::SUCCESS,
        Err(error) => {
            eprintln!("controller-scale: {}", error_chain(error.as_ref()));
            ExitCode::FAILURE
        }
    }
}

async fn run(args: &Args) -> anyhow::Result<()> {
    let started = Instant::now();
    let cp = ControlPlane::start(ControlPlaneConfig::default())
        .await
        .context("failed to start the control plane (see docs/control-plane.md)")?;
    let client = cp.client().await?;
    control_plane::install_crd(&client).await?;
    eprintln!(
        "controller-scale: control plane up at {} in {:.1}s",
        cp.server(),
        started.elapsed().as_secs_f64()
    );

    // === Set-up: the fleet, before the controller ===
    let fleet = FleetPlan::new(args);
    let setup = fleet.create(&client, args.concurrency).await?;
    eprintln!(
        "controller-scale: created {} Secrets (mean {} bytes) and {} SeiNodes in {:.1}s",
        setup.secrets,
        setup.mean_secret_bytes,
        fleet.nodes.len(),
        setup.elapsed.as_secs_f64()
    );

    let tracker = Tracker::default();
    for node in &fleet.nodes {
        tracker.expect(&node.namespace, &node.name, node.kind.reason());
    }
    let (mut changes, watch) = tracker.watch(client.clone());
    tracker.wait_synced(&mut changes, args.timeout).await?;
    if let Some(in_flight) = args.floor {
        let client = cp.client().await?;
        decide_floor(
            args,
            &client,
            &fleet,
            &tracker,
            &mut changes,
            in_flight.into(),
        )
        .await?;
        drop(watch);
        drop(cp);
        return Ok(());
    }

    // === The controller ===
    let writes_before = ApiWrites::scrape(&client).await?;
    let mut controller = ControllerProcess::spawn(&cp)?;
    let controller_started = Instant::now();
    let sampler = ConnectionSampler::start(controller.pid(), cp.port());
    let all_nodes = fleet.keys();
    let decided = tracker
        .wait_all(&mut changes, &all_nodes, args.timeout, Watched::decided_at)
        .await;
    let cpu_decided = controller.cpu()?;
    let settled = tracker
        .wait_all(&mut changes, &all_nodes, args.timeout, Watched::settled_at)
        .await;
    let cpu_settled = controller.cpu()?;
    controller.check_running()?;
    let writes_settled = ApiWrites::wait_quiet(&client, writes_before.clone()).await?;
    let work_settled = controller.work().await?;
    let memory = controller.memory()?;
    let decided = decided.map(|at| at.duration_since(controller_started));
    let settled = settled.map(|at| at.duration_since(controller_started));
    let undecided = tracker.undecided(&all_nodes);
    let decided_quantiles = tracker.decided_quantiles(&all_nodes, controller_started);
    let mut last_decided = tracker.last_decided(&all_nodes, controller_started);
    if let Some(last) = last_decided.as_mut() {
        last.logged = controller.log_lines_naming(&last.name);
    }

    // === Steady state ===
    sampler.set_phase(Phase::Steady);
    let steady_writes_before = ApiWrites::scrape(&client).await?;
    let steady_work_before = controller.work().await?;
    eprintln!(
        "controller-scale: settled; steady state for {}",
        humantime::format_duration(args.steady)
    );
    // A measurement window, not a wait for something to happen.
    tokio::time::sleep(args.steady).await;
    controller.check_running()?;
    let steady_writes = ApiWrites::scrape(&client).await?;
    let steady_work = controller.work().await?;

    // === Late Secrets ===
    sampler.set_phase(Phase::Late);
    let late = if args.late > 0 {
        Some(
            late_secrets(
                args,
                &client,
                &fleet,
                &tracker,
                &mut changes,
                steady_writes.clone(),
            )
            .await?,
        )
    } else {
        None
    };
    controller.check_running()?;
    let connections = sampler.stop();
    drop(controller);

    // === The webhook alone: memory with every TLS Secret known, those of the nodes read ===
    let webhook = webhook_memory(&cp, &fleet, args.timeout).await?;

    let report = Report {
        args,
        fleet: &fleet,
        setup,
        decided,
        decided_quantiles,
        last_decided,
        settled,
        undecided,
        settle_writes: writes_settled.delta(&writes_before),
        settle_work: work_settled,
        connections,
        cpu: [cpu_decided, cpu_settled],
        memory,
        steady_writes: steady_writes.delta(&steady_writes_before),
        steady_work: steady_work.since(steady_work_before),
        late,
        webhook,
    };
    report.print();
    drop(watch);
    drop(cp);
    Ok(())
}

// === The fleet ===

/// What a node's Secret is like.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Kind {
    Good,
    Missing,
    WrongSans,
    /// tls.crt holds the first half of the leaf's DER only.
    Malformed,
}

impl Kind {
    fn of(index: usize) -> Self {
        if index % BAD_EVERY != BAD_EVERY - 1 {
            return Kind::Good;
        }
        match (index / BAD_EVERY) % 3 {
            0 => Kind::Missing,
            1 => Kind::WrongSans,
            _ => Kind::Malformed,
        }
    }

    /// The reason the node's condition must end up with.
    fn reason(self) -> Reason {
        match self {
            Kind::Good => Reason::Ready,
            Kind::Missing => Reason::NotFound,
            Kind::WrongSans => Reason::SansMismatch,
            Kind::Malformed => Reason::Malformed,
        }
    }
}

#[derive(Debug, Clone)]
struct PlannedNode {
    namespace: String,
    name: String,
    kind: Kind,
}

impl PlannedNode {
    fn secret_name(&self) -> String {
        format!("{}-tls", self.name)
    }

    fn key(&self) -> NodeKey {
        (self.namespace.clone(), self.name.clone())
    }
}

type NodeKey = (String, String);

struct FleetPlan {
    namespaces: Vec<String>,
    nodes: Vec<PlannedNode>,
    /// Secrets no node names, to reach `--secrets`.
    noise: usize,
    ca: CertificateAuthority,
    ca_pem: String,
}

struct Setup {
    secrets: usize,
    mean_secret_bytes: usize,
    elapsed: Duration,
}

impl FleetPlan {
    fn new(args: &Args) -> Self {
        let namespaces: Vec<String> = (0..args.namespaces).map(|i| format!("scale-{i}")).collect();
        let nodes: Vec<PlannedNode> = (0..args.nodes)
            .map(|i| PlannedNode {
                namespace: namespaces[i % namespaces.len()].clone(),
                name: format!("node-{i:05}"),
                kind: Kind::of(i),
            })
            .collect();
        let with_secret = nodes.iter().filter(|n| n.kind != Kind::Missing).count();
        #[allow(clippy::expect_used)] // rcgen fails only on invalid parameters, fixed here
        let ca = CertificateAuthority::new("controller-scale CA").expect("a CA");
        let ca_pem = ca.cert_pem();
        Self {
            noise: args.secrets.saturating_sub(with_secret),
            namespaces,
            nodes,
            ca,
            ca_pem,
        }
    }

    fn keys(&self) -> Vec<NodeKey> {
        self.nodes.iter().map(PlannedNode::key).collect()
    }

    fn count(&self, kind: Kind) -> usize {
        self.nodes.iter().filter(|n| n.kind == kind).count()
    }

    /// The node's Secret, as its kind has it (none when missing).
    fn node_secret(&self, node: &PlannedNode) -> anyhow::Result<Option<Secret>> {
        let names = match node.kind {
            Kind::Missing => return Ok(None),
            Kind::Good | Kind::Malformed => {
                required_dns_names(&node.name, &node.namespace, DEFAULT_CLUSTER_DOMAIN)
            }
            Kind::WrongSans => required_dns_names(
                &format!("{}-elsewhere", node.name),
                &node.namespace,
                DEFAULT_CLUSTER_DOMAIN,
            ),
        };
        let secret = self.secret(&node.namespace, &node.secret_name(), &names)?;
        Ok(Some(if node.kind == Kind::Malformed {
            truncate_certificate(secret)
        } else {
            secret
        }))
    }

    /// A `kubernetes.io/tls` Secret with a fresh leaf for `dns_names` and the CA, labelled and
    /// annotated as cert-manager leaves the Secrets it issues.
    fn secret(&self, namespace: &str, name: &str, dns_names: &[String]) -> anyhow::Result<Secret> {
        let dns: Vec<&str> = dns_names.iter().map(String::as_str).collect();
        let leaf = self.ca.issue(&LeafSpec {
            common_name: &dns_names[0],
            dns_names: &dns,
            server: true,
            ..LeafSpec::default()
        })?;
        let mut secret = seinode_tls_testkit::tls_secret(
            namespace,
            name,
            &leaf.cert_pem,
            &leaf.key_pem,
            Some(&self.ca_pem),
        );
        let certificate = name.trim_end_matches("-tls");
        secret.metadata.labels = Some(BTreeMap::from([(
            "controller.cert-manager.io/fao".to_owned(),
            "true".to_owned(),
        )]));
        secret.metadata.annotations = Some(
            [
                ("alt-names", dns.join(",")),
                ("certificate-name", certificate.to_owned()),
                ("common-name", dns_names[0].clone()),
                ("ip-sans", String::new()),
                ("issuer-group", "cert-manager.io".to_owned()),
                ("issuer-kind", "Issuer".to_owned()),
                ("issuer-name", "sei-nodes-ca".to_owned()),
                ("uri-sans", String::new()),
            ]
            .into_iter()
            .map(|(k, v)| (format!("cert-manager.io/{k}"), v))
            .collect(),
        );
        Ok(secret)
    }

    /// Noise Secret `index`: valid, for a contract no node has.
    fn noise_secret(&self, index: usize) -> anyhow::Result<Secret> {
        let namespace = &self.namespaces[index % self.namespaces.len()];
        let owner = format!("unused-{index:05}");
        let names = required_dns_names(&owner, namespace, DEFAULT_CLUSTER_DOMAIN);
        self.secret(namespace, &format!("{owner}-tls"), &names)
    }

    /// Namespaces with their quota, then the Secrets, then the nodes.
    async fn create(&self, client: &Client, concurrency: usize) -> anyhow::Result<Setup> {
        let started = Instant::now();
        let namespaces: Api<Namespace> = Api::all(client.clone());
        for name in &self.namespaces {
            let namespace = Namespace {
                metadata: ObjectMeta {
                    name: Some(name.clone()),
                    ..ObjectMeta::default()
                },
                ..Namespace::default()
            };
            namespaces
                .create(&PostParams::default(), &namespace)
                .await
                .with_context(|| format!("failed to create namespace {name}"))?;
            create(client, &no_pods_quota(name)).await?;
        }

        let bytes = Arc::new(AtomicUsize::new(0));
        let measured = |secret: Secret| {
            bytes.fetch_add(
                serde_json::to_vec(&secret).map_or(0, |v| v.len()),
                Ordering::Relaxed,
            );
            secret
        };
        let node_secrets = self
            .nodes
            .iter()
            .filter_map(|node| self.node_secret(node).transpose());
        let noise = (0..self.noise).map(|i| self.noise_secret(i));
        let secrets = create_all(
            client,
            node_secrets.chain(noise).map(|s| s.map(&measured)),
            concurrency,
        )
        .await?;
        let nodes = self.nodes.iter().map(|n| Ok(seinode(n)));
        create_all(client, nodes, concurrency).await?;
        Ok(Setup {
            secrets,
            mean_secret_bytes: bytes.load(Ordering::Relaxed) / secrets.max(1),
            elapsed: started.elapsed(),
        })
    }
}

/// A TLS full node naming its Secret.
fn seinode(node: &PlannedNode) -> SeiNode {
    let value = json!({
        "apiVersion": "sei.io/v1alpha1", "kind": "SeiNode",
        "metadata": {"name": node.name, "namespace": node.namespace},
        "spec": {
            "chainId": "arctic-1",
            "image": "ghcr.io/sei-protocol/sei:v6.3.0",
            "sidecar": {"tls": {"secretName": node.secret_name()}},
            "fullNode": {},
        },
    });
    #[allow(clippy::expect_used)] // a fixed shape that matches the type
    serde_json::from_value(value).expect("a SeiNode")
}

/// No Pods and no PersistentVolumeClaims: nothing could run them, and kube-controller-manager
/// would otherwise create one of each per StatefulSet (and the scheduler report each Pod).
fn no_pods_quota(namespace: &str) -> ResourceQuota {
    let value = json!({
        "apiVersion": "v1", "kind": "ResourceQuota",
        "metadata": {"name": "no-pods", "namespace": namespace},
        "spec": {"hard": {"pods": "0", "persistentvolumeclaims": "0"}},
    });
    #[allow(clippy::expect_used)] // a fixed shape that matches the type
    serde_json::from_value(value).expect("a ResourceQuota")
}

/// Keeps the first half of the leaf's base64 lines: a CERTIFICATE block whose DER is cut short.
fn truncate_certificate(mut secret: Secret) -> Secret {
    if let Some(cert) = secret.data.as_mut().and_then(|d| d.get_mut("tls.crt")) {
        let pem = String::from_utf8_lossy(&cert.0).into_owned();
        let body: Vec<&str> = pem.lines().filter(|l| !l.starts_with("-----")).collect();
        let half = body[..body.len() / 2].join("\n");
        cert.0 = format!("-----BEGIN CERTIFICATE-----\n{half}\n-----END CERTIFICATE-----\n")
            .into_bytes();
    }
    secret
}

async fn create<K>(client: &Client, object: &K) -> anyhow::Result<()>
where
    K: Resource<Scope = NamespaceResourceScope>
        + Clone
        + Serialize
        + DeserializeOwned
        + std::fmt::Debug,
    K::DynamicType: Default,
{
    let namespace = object.meta().namespace.clone().unwrap_or_default();
    Api::<K>::namespaced(client.clone(), &namespace)
        .create(&PostParams::default(), object)
        .await
        .with_context(|| {
            format!(
                "failed to create {} {namespace}/{}",
                K::kind(&K::DynamicType::default()),
                object.name_any()
            )
        })?;
    Ok(())
}

/// Creates `objects` with at most `concurrency` in flight; returns how many.
async fn create_all<K>(
    client: &Client,
    objects: impl Iterator<Item = anyhow::Result<K>>,
    concurrency: usize,
) -> anyhow::Result<usize>
where
    K: Resource<Scope = NamespaceResourceScope>
        + Clone
        + Serialize
        + DeserializeOwned
        + std::fmt::Debug,
    K::DynamicType: Default,
{
    futures::stream::iter(objects)
        .map(|object| async move { create(client, &object?).await })
        .buffer_unordered(concurrency)
        .try_fold(0, |count, ()| async move { Ok(count + 1) })
        .await
}

// === The watch on SeiNodes ===

/// What the watch saw of one node (instants are when the event arrived).
#[derive(Debug, Clone)]
struct Watched {
    /// The reason the condition must have for the node to count as decided.
    expect: Reason,
    /// The condition's reason in the last event.
    reason: Option<String>,
    /// Each reason the condition showed before the node was decided, with its message, when
    /// first shown (a node decided late tells what held it).
    shown: Vec<Shown>,
    decided_at: Option<Instant>,
    /// Decided and, when the Secret is good, every apply task of the plan complete.
    settled_at: Option<Instant>,
    /// The condition first True.
    ready_at: Option<Instant>,
}

/// A reason a node's condition showed, with its message (cut to 160 characters), and when.
#[derive(Debug, Clone)]
struct Shown {
    at: Instant,
    reason: String,
    message: String,
}

impl Watched {
    fn decided_at(&self) -> Option<Instant> {
        self.decided_at
    }

    fn settled_at(&self) -> Option<Instant> {
        self.settled_at
    }

    fn ready_at(&self) -> Option<Instant> {
        self.ready_at
    }

    fn observe(&mut self, node: &SeiNode, now: Instant) {
        let status = node.status.as_ref();
        let contract = status.is_some_and(|s| s.sidecar_tls.is_some());
        let condition = status
            .and_then(|s| s.conditions.as_ref())
            .and_then(|c| c.iter().find(|c| c.type_ == SIDECAR_TLS_SECRET_READY));
        self.reason = condition.map(|c| c.reason.clone());
        let Some(condition) = condition else {
            return;
        };
        if self.decided_at.is_none()
            && self
                .shown
                .last()
                .is_none_or(|shown| shown.reason != condition.reason)
        {
            self.shown.push(Shown {
                at: now,
                reason: condition.reason.clone(),
                message: condition.message.chars().take(160).collect(),
            });
        }
        if condition.status == "True" && self.ready_at.is_none() {
            self.ready_at = Some(now);
        }
        if contract && condition.reason == self.expect.as_str() && self.decided_at.is_none() {
            self.decided_at = Some(now);
        }
        let applied = !self.expect.is_ready()
            || status.and_then(|s| s.plan.as_ref()).is_some_and(|plan| {
                let mut applies = plan
                    .tasks
                    .iter()
                    .filter(|t| t.r#type.starts_with("Apply"))
                    .peekable();
                applies.peek().is_some() && applies.all(|t| t.status == TaskStatus::Complete)
            });
        if self.decided_at.is_some() && applied && self.settled_at.is_none() {
            self.settled_at = Some(now);
        }
    }
}

/// The nodes the benchmark expects, as its watch sees them.
#[derive(Clone, Default)]
struct Tracker {
    nodes: Arc<Mutex<HashMap<NodeKey, Watched>>>,
    synced: Arc<AtomicBool>,
}

impl Tracker {
    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<NodeKey, Watched>> {
        self.nodes.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Tracks node `namespace/name`, decided once its condition has `reason`.
    fn expect(&self, namespace: &str, name: &str, reason: Reason) {
        self.lock().insert(
            (namespace.to_owned(), name.to_owned()),
            Watched {
                expect: reason,
                reason: None,
                shown: Vec::new(),
                decided_at: None,
                settled_at: None,
                ready_at: None,
            },
        );
    }

    /// Starts the watch, which runs until the guard drops; the receiver changes after every
    /// event.
    fn watch(&self, client: Client) -> (tokio::sync::watch::Receiver<u64>, AbortOnDrop) {
        let (tx, rx) = tokio::sync::watch::channel(0u64);
        let tracker = self.clone();
        let task = tokio::spawn(async move {
            let events =
                watcher(Api::<SeiNode>::all(client), watcher::Config::default()).default_backoff();
            let mut events = std::pin::pin!(events);
            while let Some(event) = events.next().await {
                let now = Instant::now();
                match event {
                    Ok(watcher::Event::Apply(node) | watcher::Event::InitApply(node)) => {
                        let key = (node.namespace().unwrap_or_default(), node.name_any());
                        if let Some(watched) = tracker.lock().get_mut(&key) {
                            watched.observe(&node, now);
                        }
                    }
                    Ok(watcher::Event::InitDone) => tracker.synced.store(true, Ordering::SeqCst),
                    Ok(_) => {}
                    Err(error) => eprintln!("controller-scale: SeiNode watch: {error}"),
                }
                tx.send_modify(|n| *n += 1);
            }
        });
        (rx, AbortOnDrop(task))
    }

    async fn wait_synced(
        &self,
        changes: &mut tokio::sync::watch::Receiver<u64>,
        timeout: Duration,
    ) -> anyhow::Result<()> {
        let synced = self.until(changes, timeout, |_| self.synced.load(Ordering::SeqCst));
        if !synced.await {
            bail!("the SeiNode watch did not list within {timeout:?}");
        }
        Ok(())
    }

    /// Waits until every node of `keys` has `at`; returns the latest of those instants, or
    /// `None` when `timeout` passed first.
    async fn wait_all(
        &self,
        changes: &mut tokio::sync::watch::Receiver<u64>,
        keys: &[NodeKey],
        timeout: Duration,
        at: fn(&Watched) -> Option<Instant>,
    ) -> Option<Instant> {
        let all = |nodes: &HashMap<NodeKey, Watched>| {
            keys.iter().all(|k| nodes.get(k).and_then(at).is_some())
        };
        if !self.until(changes, timeout, all).await {
            return None;
        }
        let nodes = self.lock();
        keys.iter().filter_map(|k| nodes.get(k).and_then(at)).max()
    }

    /// Waits, woken by the watch, until `done` holds; false when `timeout` passed first.
    async fn until(
        &self,
        changes: &mut tokio::sync::watch::Receiver<u64>,
        timeout: Duration,
        done: impl Fn(&HashMap<NodeKey, Watched>) -> bool,
    ) -> bool {
        let deadline = tokio::time::Instant::now() + timeout;
        loop {
            changes.mark_unchanged();
            if done(&self.lock()) {
                return true;
            }
            match tokio::time::timeout_at(deadline, changes.changed()).await {
                Ok(Ok(())) => {}
                Ok(Err(_)) | Err(_) => return false,
            }
        }
    }

    /// When the first node, half, 90 % and 99 % of `keys` were decided, after `start`.
    fn decided_quantiles(&self, keys: &[NodeKey], start: Instant) -> Vec<Option<Duration>> {
        let nodes = self.lock();
        let mut times: Vec<Duration> = keys
            .iter()
            .filter_map(|k| nodes.get(k)?.decided_at)
            .map(|at| at.duration_since(start))
            .collect();
        times.sort();
        [0.0, 0.5, 0.9, 0.99]
            .into_iter()
            .map(|q| {
                let rank = ((keys.len() as f64) * q).ceil() as usize;
                times
                    .get(rank.saturating_sub(1).min(keys.len() - 1))
                    .copied()
            })
            .collect()
    }

    /// The node of `keys` decided last, and what its condition showed before, after `start`.
    fn last_decided(&self, keys: &[NodeKey], start: Instant) -> Option<LastDecided> {
        let nodes = self.lock();
        let (key, watched) = keys
            .iter()
            .filter_map(|k| Some((k, nodes.get(k)?)))
            .filter(|(_, w)| w.decided_at.is_some())
            .max_by_key(|(_, w)| w.decided_at)?;
        Some(LastDecided {
            node: format!("{}/{}", key.0, key.1),
            name: key.1.clone(),
            logged: Vec::new(),
            at: watched.decided_at?.duration_since(start),
            shown: watched
                .shown
                .iter()
                .map(|shown| {
                    let at = shown.at.duration_since(start);
                    (at, format!("{}: {}", shown.reason, shown.message))
                })
                .collect(),
        })
    }

    /// Nodes of `keys` not decided, by the reason they showed last.
    fn undecided(&self, keys: &[NodeKey]) -> BTreeMap<String, usize> {
        let nodes = self.lock();
        let mut by_reason = BTreeMap::new();
        for watched in keys.iter().filter_map(|k| nodes.get(k)) {
            if watched.decided_at.is_none() {
                let reason = watched
                    .reason
                    .clone()
                    .unwrap_or_else(|| "(none)".to_owned());
                *by_reason.entry(reason).or_default() += 1;
            }
        }
        by_reason
    }
}

/// The node decided last: which, when, and the reasons its condition showed on the way.
struct LastDecided {
    node: String,
    name: String,
    at: Duration,
    shown: Vec<(Duration, String)>,
    /// What `run` logged that names the node (its log level: `CONTROLLER_SCALE_RUN_LOG`).
    logged: Vec<String>,
}

/// Aborts a task when dropped (before the control plane it talks to stops).
struct AbortOnDrop(tokio::task::JoinHandle<()>);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.0.abort();
    }
}

// === Late Secrets ===

struct Late {
    nodes: usize,
    /// Secret created (response received) → condition True, per node that got there.
    latencies: Vec<Duration>,
    writes: BTreeMap<WriteKey, u64>,
}

/// `--floor`: decides every node of `fleet` with one Secret read and one status replace each,
/// `in_flight` at a time, and prints when the watch saw them all decided.
async fn decide_floor(
    args: &Args,
    client: &Client,
    fleet: &FleetPlan,
    tracker: &Tracker,
    changes: &mut tokio::sync::watch::Receiver<u64>,
    in_flight: usize,
) -> anyhow::Result<()> {
    // The fan-out of each status write to `run`'s two SeiNode watches.
    let idle_watches: Vec<AbortOnDrop> = (0..args.floor_watches)
        .map(|_| {
            let nodes = Api::<SeiNode>::all(client.clone());
            AbortOnDrop(tokio::spawn(async move {
                let events = watcher(nodes, watcher::Config::default()).default_backoff();
                let mut events = std::pin::pin!(events);
                while events.next().await.is_some() {}
            }))
        })
        .collect();
    let started = Instant::now();
    let listed = Api::<SeiNode>::all(client.clone())
        .list(&Default::default())
        .await
        .context("failed to list the SeiNodes")?;
    let planned: HashMap<NodeKey, &PlannedNode> =
        fleet.nodes.iter().map(|n| (n.key(), n)).collect();
    let decided = futures::stream::iter(listed.items)
        .map(|node| {
            let key = (node.namespace().unwrap_or_default(), node.name_any());
            let plan = planned.get(&key).copied();
            async move {
                match plan {
                    Some(plan) => {
                        decide_one(client, node, plan, args.floor_write, args.floor_status).await
                    }
                    None => Ok(()),
                }
            }
        })
        .buffer_unordered(in_flight)
        .try_fold(0usize, |count, ()| async move { Ok(count + 1) })
        .await?;
    let keys = fleet.keys();
    let all = tracker
        .wait_all(changes, &keys, args.timeout, Watched::decided_at)
        .await;
    let decided_quantiles = tracker.decided_quantiles(&keys, started);
    drop(idle_watches);
    println!(
        "controller-scale floor: {decided} nodes, {in_flight} in flight, {} idle watches, {:?} status, {:?} \
         writes: every node decided {}; first / 50 % / 90 % / 99 % {}",
        args.floor_watches,
        args.floor_status,
        args.floor_write,
        elapsed(all.map(|at| at.duration_since(started)), args.timeout),
        quantiles(&decided_quantiles, args.timeout)
    );
    Ok(())
}

/// A phase's duration in seconds, or that it did not end within `timeout`.
fn elapsed(duration: Option<Duration>, timeout: Duration) -> String {
    duration.map_or_else(
        || format!("not within {}", humantime::format_duration(timeout)),
        |d| format!("{:.2} s", d.as_secs_f64()),
    )
}

/// Quantiles as `elapsed` prints them, separated by slashes.
fn quantiles(quantiles: &[Option<Duration>], timeout: Duration) -> String {
    quantiles
        .iter()
        .map(|d| elapsed(*d, timeout))
        .collect::<Vec<_>>()
        .join(" / ")
}

/// The floor's decision for one node: its Secret read, and the status a decision publishes
/// (`verdict`: contract and condition; `decided`: what the controller's `decide` writes),
/// replaced on the listed version.
async fn decide_one(
    client: &Client,
    mut node: SeiNode,
    plan: &PlannedNode,
    write: FloorWrite,
    status: FloorStatus,
) -> anyhow::Result<()> {
    use k8s_openapi::apimachinery::pkg::apis::meta::v1::{Condition, Time};
    use seinode_tls_controller::ControllerConfig;
    use seinode_tls_controller::decide::{Observed, decide};
    use seinode_tls_crds::validation::SecretVerdict;
    use seinode_tls_crds::{SeiNodeStatus, SidecarTlsStatus};

    let namespace = node.namespace().unwrap_or_default();
    let name = node.name_any();
    let secret_name = plan.secret_name();
    // From the API server's cache, as the controller reads a Secret its watch reported (this
    // benchmark keeps no Secret watch: version 0, any version, is the same path on the server).
    let secrets = Api::<Secret>::namespaced(client.clone(), &namespace);
    read_secret(&secrets, &secret_name, Some("0"))
        .await
        .with_context(|| format!("failed to read Secret {namespace}/{secret_name}"))?;
    let reason = plan.kind.reason();
    let message = format!("Secret {namespace}/{secret_name}: {}", reason.as_str());
    let now = jiff::Timestamp::now();
    node.status = Some(match status {
        FloorStatus::Verdict => SeiNodeStatus {
            sidecar_tls: Some(SidecarTlsStatus {
                secret_name: secret_name.clone(),
                required_dns_names: required_dns_names(&name, &namespace, DEFAULT_CLUSTER_DOMAIN),
                not_after: None,
            }),
            conditions: Some(vec![Condition {
                type_: SIDECAR_TLS_SECRET_READY.to_owned(),
                status: if reason.is_ready() { "True" } else { "False" }.to_owned(),
                reason: reason.as_str().to_owned(),
                message,
                observed_generation: node.metadata.generation,
                last_transition_time: Time(now),
            }]),
            observed_generation: node.metadata.generation,
            ..SeiNodeStatus::default()
        },
        FloorStatus::Decided => {
            let observed = Observed {
                leading: true,
                first_sight: true,
                verdict: Some(SecretVerdict {
                    reason,
                    message,
                    // The fleet's leaves last 90 days (`LeafSpec`'s default).
                    not_after: reason
                        .is_ready()
                        .then(|| now + jiff::SignedDuration::from_hours(24 * 90)),
                    missing_dns_names: Vec::new(),
                }),
                ..Observed::default()
            };
            // `run`'s settings: the controller's defaults.
            let settings = ControllerConfig::default().settings();
            let base = node.status.clone().unwrap_or_default();
            decide(&node, &base, &observed, &settings, now).status
        }
    });
    let nodes = Api::<SeiNode>::namespaced(client.clone(), &namespace);
    match write {
        FloorWrite::Replace => {
            nodes
                .replace_status(&name, &PostParams::default(), &node)
                .await
        }
        FloorWrite::Merge => {
            let patch = json!({
                "metadata": { "resourceVersion": node.metadata.resource_version },
                "status": node.status,
            });
            nodes
                .patch_status(&name, &PatchParams::default(), &Patch::Merge(patch))
                .await
        }
    }
    .with_context(|| format!("failed to write the status of SeiNode {namespace}/{name}"))?;
    Ok(())
}

/// Creates `--late` nodes without Secrets, waits until each is decided `TLSSecretNotFound`,
/// then creates their Secrets at 10 per second and times each to its True condition.
async fn late_secrets(
    args: &Args,
    client: &Client,
    fleet: &FleetPlan,
    tracker: &Tracker,
    changes: &mut tokio::sync::watch::Receiver<u64>,
    writes_before: ApiWrites,
) -> anyhow::Result<Late> {
    let nodes: Vec<PlannedNode> = (0..args.late)
        .map(|i| PlannedNode {
            namespace: fleet.namespaces[i % fleet.namespaces.len()].clone(),
            name: format!("late-{i:05}"),
            kind: Kind::Good,
        })
        .collect();
    for node in &nodes {
        tracker.expect(&node.namespace, &node.name, Reason::NotFound);
    }
    let keys: Vec<NodeKey> = nodes.iter().map(PlannedNode::key).collect();
    create_all(
        client,
        nodes.iter().map(|n| Ok(seinode(n))),
        args.concurrency,
    )
    .await?;
    if tracker
        .wait_all(changes, &keys, args.timeout, Watched::decided_at)
        .await
        .is_none()
    {
        bail!(
            "the late nodes were not all decided TLSSecretNotFound within {:?}: {:?}",
            args.timeout,
            tracker.undecided(&keys)
        );
    }
    // Issued up front, so that the pace is the API's and not the key generator's.
    let secrets = nodes
        .iter()
        .map(|n| fleet.node_secret(n))
        .collect::<anyhow::Result<Vec<_>>>()?;
    eprintln!(
        "controller-scale: {} late nodes wait for their Secrets; creating them at 10/s",
        nodes.len()
    );
    let mut tick = tokio::time::interval(LATE_INTERVAL);
    let mut creates = tokio::task::JoinSet::new();
    for (node, secret) in nodes.iter().zip(secrets.into_iter().flatten()) {
        tick.tick().await;
        let (client, key) = (client.clone(), node.key());
        creates.spawn(async move {
            create(&client, &secret).await?;
            anyhow::Ok((key, Instant::now()))
        });
    }
    let mut created = HashMap::new();
    while let Some(result) = creates.join_next().await {
        let (key, at) = result.context("a Secret create task")??;
        created.insert(key, at);
    }
    let ready = tracker
        .wait_all(changes, &keys, args.timeout, Watched::ready_at)
        .await;
    if ready.is_none() {
        eprintln!(
            "controller-scale: not every late node was True within {:?}",
            args.timeout
        );
    }
    let writes = ApiWrites::wait_quiet(client, writes_before.clone()).await?;
    let watched = tracker.lock();
    let mut latencies: Vec<Duration> = keys
        .iter()
        .filter_map(|k| {
            let ready = watched.get(k)?.ready_at?;
            Some(ready.saturating_duration_since(*created.get(k)?))
        })
        .collect();
    latencies.sort();
    Ok(Late {
        nodes: nodes.len(),
        latencies,
        writes: writes.delta(&writes_before),
    })
}

// === The API server's write counters ===

/// `(group, resource, subresource, verb)` of `apiserver_request_total`.
type WriteKey = (String, String, String, String);

/// Verbs of `apiserver_request_total` that write (APPLY is a server-side apply patch).
const WRITE_VERBS: [&str; 6] = [
    "POST",
    "PUT",
    "PATCH",
    "APPLY",
    "DELETE",
    "DELETECOLLECTION",
];

/// The API server's write requests so far, every response code included.
#[derive(Debug, Clone, Default)]
struct ApiWrites(BTreeMap<WriteKey, f64>);

impl ApiWrites {
    async fn scrape(client: &Client) -> anyhow::Result<Self> {
        let request = http::Request::get("/metrics").body(Vec::new())?;
        let text = client
            .request_text(request)
            .await
            .context("failed to read the API server's /metrics")?;
        let mut writes = BTreeMap::new();
        for line in text.lines() {
            let Some(rest) = line.strip_prefix("apiserver_request_total{") else {
                continue;
            };
            let Some((labels, value)) = rest.rsplit_once("} ") else {
                continue;
            };
            let labels = parse_labels(labels);
            let label = |name: &str| labels.get(name).cloned().unwrap_or_default();
            let verb = label("verb");
            if !WRITE_VERBS.contains(&verb.as_str()) {
                continue;
            }
            let value: f64 = value.trim().parse().unwrap_or_default();
            let key = (
                label("group"),
                label("resource"),
                label("subresource"),
                verb,
            );
            *writes.entry(key).or_default() += value;
        }
        Ok(Self(writes))
    }

    /// Scrapes until the controller's writes since `before` have not moved for [`QUIET`].
    async fn wait_quiet(client: &Client, before: ApiWrites) -> anyhow::Result<Self> {
        let mut last = Self::scrape(client).await?;
        let mut still_since = Instant::now();
        loop {
            tokio::time::sleep(QUIET_POLL).await;
            let now = Self::scrape(client).await?;
            if total(&now.delta(&before), Writer::Controller)
                != total(&last.delta(&before), Writer::Controller)
            {
                still_since = Instant::now();
            } else if still_since.elapsed() >= QUIET {
                return Ok(now);
            }
            last = now;
        }
    }

    fn delta(&self, before: &ApiWrites) -> BTreeMap<WriteKey, u64> {
        self.0
            .iter()
            .filter_map(|(key, after)| {
                let d = after - before.0.get(key).copied().unwrap_or_default();
                (d >= 0.5).then(|| (key.clone(), d.round() as u64))
            })
            .collect()
    }
}

/// `name="value"` pairs of a Prometheus text line.
fn parse_labels(text: &str) -> HashMap<String, String> {
    let mut labels = HashMap::new();
    let mut rest = text;
    while let Some((name, after)) = rest.split_once("=\"") {
        let mut value = String::new();
        let mut chars = after.char_indices();
        let mut end = after.len();
        while let Some((i, c)) = chars.next() {
            match c {
                '\\' => {
                    if let Some((_, escaped)) = chars.next() {
                        value.push(if escaped == 'n' { '\n' } else { escaped });
                    }
                }
                '"' => {
                    end = i + 1;
                    break;
                }
                c => value.push(c),
            }
        }
        labels.insert(name.trim_start_matches(',').trim().to_owned(), value);
        rest = &after[end..];
    }
    labels
}

/// Who makes writes of a kind.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
enum Writer {
    Controller,
    /// The late nodes and their Secrets.
    Benchmark,
    /// kube-controller-manager and the API server itself: StatefulSet status,
    /// ControllerRevisions, EndpointSlices, core Events, Leases, refused Pod and PVC creates.
    ControlPlane,
}

impl Writer {
    /// The benchmark creates only while it measures the late nodes, and the quota keeps Pods
    /// (so the scheduler's events.k8s.io Events) out.
    fn of((group, resource, subresource, verb): &WriteKey) -> Self {
        match (
            group.as_str(),
            resource.as_str(),
            subresource.as_str(),
            verb.as_str(),
        ) {
            ("sei.io", "seinodes", "", "POST") | ("", "secrets", "", "POST") => Writer::Benchmark,
            ("sei.io", "seinodes", _, _)
            | ("", "configmaps", "", _)
            | ("", "services", "", _)
            | ("apps", "statefulsets", "", _)
            | ("events.k8s.io", "events", "", _) => Writer::Controller,
            _ => Writer::ControlPlane,
        }
    }

    fn as_str(self) -> &'static str {
        match self {
            Writer::Controller => "controller",
            Writer::Benchmark => "benchmark",
            Writer::ControlPlane => "control plane",
        }
    }
}

fn total(writes: &BTreeMap<WriteKey, u64>, writer: Writer) -> u64 {
    writes
        .iter()
        .filter(|(k, _)| Writer::of(k) == writer)
        .map(|(_, n)| n)
        .sum()
}

// === The controller process ===

/// `seinode-tls run` on the control plane's admin kubeconfig, its webhook serving a
/// certificate from the control plane's CA, health and metrics on loopback.
struct ControllerProcess {
    child: Child,
    log: PathBuf,
    metrics: SocketAddr,
    https: SocketAddr,
    ca_pem: String,
    /// Stops the child if this process dies without dropping it; dropped after the child stops.
    _watchdog: Option<Watchdog>,
}

impl ControllerProcess {
    fn spawn(cp: &ControlPlane) -> anyhow::Result<Self> {
        Self::spawn_command(cp, "run")
    }

    /// `seinode-tls <command>` (`run`, or `webhook` alone).
    fn spawn_command(cp: &ControlPlane, command: &str) -> anyhow::Result<Self> {
        let dir = cp.dir().join(format!("controller-scale-{command}"));
        std::fs::create_dir_all(&dir)
            .with_context(|| format!("failed to create {}", dir.display()))?;
        let serving = cp.issue_serving_certificate("seinode-tls-webhook", &["localhost"])?;
        let (cert_file, key_file) = (dir.join("tls.crt"), dir.join("tls.key"));
        std::fs::write(&cert_file, &serving.cert_pem)
            .with_context(|| format!("failed to write {}", cert_file.display()))?;
        write_private(&key_file, &serving.key_pem)?;
        let (health, https) = (free_loopback_port()?, free_loopback_port()?);
        let log = dir.join("seinode-tls.log");
        let out = std::fs::File::create(&log)
            .with_context(|| format!("failed to create {}", log.display()))?;
        let child = Command::new(env!("CARGO_BIN_EXE_seinode-tls"))
            .arg(command)
            .arg(format!("--health-addr={health}"))
            .arg(format!("--listen-addr={https}"))
            .arg("--tls-cert-file")
            .arg(&cert_file)
            .arg("--tls-key-file")
            .arg(&key_file)
            .env("KUBECONFIG", cp.kubeconfig())
            .env_remove("RUST_LOG")
            .envs(std::env::var_os("CONTROLLER_SCALE_RUN_LOG").map(|filter| ("RUST_LOG", filter)))
            .stdin(Stdio::null())
            .stdout(out.try_clone()?)
            .stderr(out)
            // Its own group: a terminal's Ctrl-C reaches the benchmark, which stops it first.
            .process_group(0)
            .spawn()
            .with_context(|| format!("failed to start seinode-tls {command}"))?;
        let mut watchdog = Watchdog::spawn(None);
        if let Some(w) = watchdog.as_mut() {
            w.watch_pid(child.id());
        }
        Ok(Self {
            child,
            log,
            metrics: health,
            https,
            ca_pem: cp.ca().cert_pem(),
            _watchdog: watchdog,
        })
    }

    /// The lines of its log that contain `name` followed by no letter, digit or `-` (so not
    /// `node-1` in `node-10` or `node-1-tls`), at most the last 40.
    fn log_lines_naming(&self, name: &str) -> Vec<String> {
        let Ok(text) = std::fs::read_to_string(&self.log) else {
            return vec![format!("(cannot read {})", self.log.display())];
        };
        let mut lines: Vec<String> = text
            .lines()
            .filter(|line| {
                line.match_indices(name).any(|(at, _)| {
                    let after = line[at + name.len()..].chars().next();
                    !after.is_some_and(|c| c.is_ascii_alphanumeric() || c == '-')
                })
            })
            .map(str::to_owned)
            .collect();
        lines.drain(..lines.len().saturating_sub(40));
        lines
    }

    /// Waits for `/readyz` (caches synced).
    async fn wait_ready(&mut self, timeout: Duration) -> anyhow::Result<()> {
        let deadline = Instant::now() + timeout;
        loop {
            let addr = self.metrics;
            if tokio::task::spawn_blocking(move || http_get(addr, "/readyz"))
                .await?
                .is_ok()
            {
                return Ok(());
            }
            self.check_running()?;
            if Instant::now() > deadline {
                bail!("not ready within {}", humantime::format_duration(timeout));
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }

    /// POSTs a SeiNode CREATE review of `node` to `/validate/seinodes`, over TLS on a fresh
    /// connection; the response's `allowed`.
    async fn review_create(&self, node: &SeiNode) -> anyhow::Result<bool> {
        use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
        let review = json!({
            "apiVersion": "admission.k8s.io/v1", "kind": "AdmissionReview",
            "request": {
                "uid": format!("{}-{}", node.namespace().unwrap_or_default(), node.name_any()),
                "kind": {"group": "sei.io", "version": "v1alpha1", "kind": "SeiNode"},
                "resource": {"group": "sei.io", "version": "v1alpha1", "resource": "seinodes"},
                "name": node.name_any(), "namespace": node.namespace(),
                "operation": "CREATE", "userInfo": {"username": "controller-scale"},
                "object": node, "dryRun": true,
            },
        })
        .to_string();
        let mut roots = rustls::RootCertStore::empty();
        use rustls::pki_types::pem::PemObject as _;
        for cert in rustls::pki_types::CertificateDer::pem_slice_iter(self.ca_pem.as_bytes()) {
            roots.add(cert?)?;
        }
        let config = rustls::ClientConfig::builder()
            .with_root_certificates(roots)
            .with_no_client_auth();
        let tcp = tokio::net::TcpStream::connect(self.https).await?;
        let mut tls = tokio_rustls::TlsConnector::from(Arc::new(config))
            .connect(rustls::pki_types::ServerName::try_from("localhost")?, tcp)
            .await?;
        let head = format!(
            "POST /validate/seinodes HTTP/1.1\r\nHost: localhost\r\nContent-Type: application/json\r\n\
             Content-Length: {}\r\nConnection: close\r\n\r\n",
            review.len()
        );
        tls.write_all(head.as_bytes()).await?;
        tls.write_all(review.as_bytes()).await?;
        let mut response = Vec::new();
        // The server closes without close_notify after `Connection: close`; what was read counts.
        let _ = tls.read_to_end(&mut response).await;
        let response = String::from_utf8_lossy(&response);
        if !response.starts_with("HTTP/1.1 200") {
            bail!(
                "review answered {}",
                response.lines().next().unwrap_or_default()
            );
        }
        Ok(response.contains(r#""allowed":true"#))
    }

    /// One gauge of its `/metrics`.
    async fn gauge(&self, name: &str) -> anyhow::Result<f64> {
        let addr = self.metrics;
        let text = tokio::task::spawn_blocking(move || http_get(addr, "/metrics")).await??;
        let value = text
            .lines()
            .find_map(|l| l.strip_prefix(name)?.strip_prefix(' ')?.parse::<f64>().ok());
        value.with_context(|| format!("no {name} in /metrics"))
    }

    fn pid(&self) -> u32 {
        self.child.id()
    }

    fn check_running(&mut self) -> anyhow::Result<()> {
        if let Some(status) = self.child.try_wait()? {
            bail!(
                "seinode-tls run exited ({status}); last lines of {}:\n{}",
                self.log.display(),
                log_tail(&self.log)
            );
        }
        Ok(())
    }

    /// Reconciles (every outcome) and Secret reads so far, from the controller's own counters.
    async fn work(&self) -> anyhow::Result<Work> {
        let addr = self.metrics;
        let text = tokio::task::spawn_blocking(move || http_get(addr, "/metrics")).await??;
        let total = |series: &str| {
            let sum = text
                .lines()
                .filter(|l| {
                    l.strip_prefix(series)
                        .is_some_and(|rest| rest.starts_with(['{', ' ']))
                })
                .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
                .sum::<f64>();
            sum.round() as u64
        };
        Ok(Work {
            reconciles: total("seinode_tls_controller_reconciles_total"),
            secret_reads: total("seinode_tls_controller_secret_reads_total"),
        })
    }

    /// The CPU time it has used so far, user and system, every thread's (`/proc/PID/stat`,
    /// in clock ticks): the share of the two cores it took from the API server.
    fn cpu(&self) -> anyhow::Result<Duration> {
        use nix::unistd::{SysconfVar, sysconf};
        let stat = std::fs::read_to_string(format!("/proc/{}/stat", self.pid()))?;
        // After the command name, which is in parentheses and may hold spaces: the state is
        // field 3, utime and stime fields 14 and 15.
        let fields: Vec<&str> = stat
            .rsplit_once(')')
            .map(|(_, rest)| rest.split_whitespace().collect())
            .unwrap_or_default();
        let ticks = |field: usize| -> anyhow::Result<u64> {
            let value = fields
                .get(field - 3)
                .with_context(|| format!("/proc/{}/stat has no field {field}", self.pid()))?;
            Ok(value.parse()?)
        };
        let per_second = sysconf(SysconfVar::CLK_TCK)?
            .and_then(|hz| u64::try_from(hz).ok())
            .filter(|hz| *hz > 0)
            .context("the clock tick rate is unknown")?;
        let ticks = ticks(14)? + ticks(15)?;
        Ok(Duration::from_secs_f64(ticks as f64 / per_second as f64))
    }

    /// `VmRSS` and `VmHWM`, in KiB.
    fn memory(&self) -> anyhow::Result<(u64, u64)> {
        let status = std::fs::read_to_string(format!("/proc/{}/status", self.pid()))?;
        let field = |name: &str| {
            status
                .lines()
                .find_map(|l| l.strip_prefix(name))
                .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<u64>().ok())
                .unwrap_or_default()
        };
        Ok((field("VmRSS:"), field("VmHWM:")))
    }
}

impl Drop for ControllerProcess {
    /// SIGTERM, a grace period, then SIGKILL.
    fn drop(&mut self) {
        if let Ok(None) = self.child.try_wait() {
            if let Ok(pid) = i32::try_from(self.child.id()) {
                let _ = nix::sys::signal::kill(
                    nix::unistd::Pid::from_raw(pid),
                    nix::sys::signal::Signal::SIGTERM,
                );
            }
            let deadline = Instant::now() + STOP_GRACE;
            while Instant::now() < deadline {
                if let Ok(Some(_)) = self.child.try_wait() {
                    return;
                }
                std::thread::sleep(Duration::from_millis(50));
            }
            let _ = self.child.kill();
        }
        let _ = self.child.wait();
    }
}

fn free_loopback_port() -> anyhow::Result<SocketAddr> {
    Ok(TcpListener::bind((Ipv4Addr::LOCALHOST, 0))?.local_addr()?)
}

/// The body of a plain HTTP/1.1 GET on loopback.
fn http_get(addr: SocketAddr, path: &str) -> anyhow::Result<String> {
    let mut stream = TcpStream::connect_timeout(&addr, Duration::from_secs(5))?;
    stream.set_read_timeout(Some(Duration::from_secs(10)))?;
    write!(
        stream,
        "GET {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n"
    )?;
    let mut response = String::new();
    stream.read_to_string(&mut response)?;
    let (head, body) = response
        .split_once("\r\n\r\n")
        .context("an HTTP response without a header end")?;
    if !head.starts_with("HTTP/1.1 200") {
        bail!(
            "GET http://{addr}{path}: {}",
            head.lines().next().unwrap_or_default()
        );
    }
    Ok(body.to_owned())
}

// === Connections ===

#[derive(Debug, Clone, Copy)]
enum Phase {
    Settle = 0,
    Steady = 1,
    Late = 2,
}

/// Samples the controller's established TCP connections to the API server every 100 ms on a
/// thread of its own, keeping the peak per phase.
struct ConnectionSampler {
    phase: Arc<AtomicUsize>,
    peaks: Arc<[AtomicUsize; 3]>,
    stop: Arc<AtomicBool>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl ConnectionSampler {
    fn start(pid: u32, port: u16) -> Self {
        let phase = Arc::new(AtomicUsize::new(Phase::Settle as usize));
        let peaks: Arc<[AtomicUsize; 3]> = Arc::new(Default::default());
        let stop = Arc::new(AtomicBool::new(false));
        let thread = {
            let (phase, peaks, stop) = (phase.clone(), peaks.clone(), stop.clone());
            std::thread::spawn(move || {
                while !stop.load(Ordering::SeqCst) {
                    if let Ok(count) =
                        seinode_tls_devcluster::network::established_connections(pid, port)
                    {
                        peaks[phase.load(Ordering::SeqCst)].fetch_max(count, Ordering::SeqCst);
                    }
                    std::thread::sleep(SAMPLE_INTERVAL);
                }
            })
        };
        Self {
            phase,
            peaks,
            stop,
            thread: Some(thread),
        }
    }

    fn set_phase(&self, phase: Phase) {
        self.phase.store(phase as usize, Ordering::SeqCst);
    }

    /// Peaks per phase: settling, steady, late.
    fn stop(mut self) -> [usize; 3] {
        self.stop.store(true, Ordering::SeqCst);
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
        [0, 1, 2].map(|i| self.peaks[i].load(Ordering::SeqCst))
    }
}

// === Report ===

struct Report<'a> {
    args: &'a Args,
    fleet: &'a FleetPlan,
    setup: Setup,
    decided: Option<Duration>,
    /// First node, 50 %, 90 %, 99 % decided.
    decided_quantiles: Vec<Option<Duration>>,
    last_decided: Option<LastDecided>,
    settled: Option<Duration>,
    undecided: BTreeMap<String, usize>,
    settle_writes: BTreeMap<WriteKey, u64>,
    settle_work: Work,
    connections: [usize; 3],
    /// The controller's CPU time (user and system), start → every node decided, → settled.
    cpu: [Duration; 2],
    memory: (u64, u64),
    steady_writes: BTreeMap<WriteKey, u64>,
    steady_work: Work,
    late: Option<Late>,
    webhook: WebhookMemory,
}

/// The controller's work so far, from its counters.
#[derive(Clone, Copy)]
struct Work {
    reconciles: u64,
    secret_reads: u64,
}

impl Work {
    fn since(self, before: Work) -> Work {
        Work {
            reconciles: self.reconciles.saturating_sub(before.reconciles),
            secret_reads: self.secret_reads.saturating_sub(before.secret_reads),
        }
    }
}

/// `seinode-tls webhook` alone over the fleet's Secrets.
struct WebhookMemory {
    known: f64,
    /// VmRSS once synced, in KiB.
    synced: u64,
    inspected: f64,
    reviews: usize,
    /// VmRSS and VmHWM after a CREATE review of every node, in KiB.
    reviewed: (u64, u64),
}

/// Starts `seinode-tls webhook` (not registered with the API server), waits until its caches
/// synced, sends a dry-run CREATE review of every node (each reads that node's Secret), and
/// takes its memory before and after.
async fn webhook_memory(
    cp: &ControlPlane,
    fleet: &FleetPlan,
    timeout: Duration,
) -> anyhow::Result<WebhookMemory> {
    let mut webhook = ControllerProcess::spawn_command(cp, "webhook")?;
    webhook.wait_ready(timeout).await?;
    let synced = webhook.memory()?.0;
    let known = webhook
        .gauge("seinode_tls_webhook_secret_cache_known")
        .await?;
    eprintln!(
        "controller-scale: webhook synced with {known} TLS Secrets known; reviewing every node"
    );
    for node in &fleet.nodes {
        webhook.review_create(&seinode(node)).await?;
    }
    webhook.check_running()?;
    let inspected = webhook
        .gauge("seinode_tls_webhook_secret_cache_inspected")
        .await?;
    Ok(WebhookMemory {
        known,
        synced,
        inspected,
        reviews: fleet.nodes.len(),
        reviewed: webhook.memory()?,
    })
}

impl Report<'_> {
    fn print(&self) {
        let fleet = self.fleet;
        let good = fleet.count(Kind::Good);
        let bad = fleet.nodes.len() - good;
        let minimum = MIN_WRITES_GOOD * good as u64 + MIN_WRITES_BAD * bad as u64;
        let writes = total(&self.settle_writes, Writer::Controller);
        let elapsed = |d: Option<Duration>| elapsed(d, self.args.timeout);
        let mib = |kib: u64| format!("{:.1} MiB", kib as f64 / 1024.0);

        println!();
        println!(
            "controller-scale: {} TLS SeiNodes in {} namespaces ({good} good; bad: {} missing, \
             {} wrong SANs, {} malformed), {} kubernetes.io/tls Secrets ({} noise, mean {} \
             bytes as JSON), created in {:.1} s",
            fleet.nodes.len(),
            fleet.namespaces.len(),
            fleet.count(Kind::Missing),
            fleet.count(Kind::WrongSans),
            fleet.count(Kind::Malformed),
            self.setup.secrets,
            fleet.noise,
            self.setup.mean_secret_bytes,
            self.setup.elapsed.as_secs_f64(),
        );
        println!();
        println!("| figure | measured | target |");
        println!("|---|---|---|");
        println!(
            "| controller start → every node decided | {} | ≤ 3 s |",
            elapsed(self.decided)
        );
        println!(
            "| controller start → first / 50 % / 90 % / 99 % of nodes decided | {} | |",
            quantiles(&self.decided_quantiles, self.args.timeout)
        );
        println!(
            "| controller start → every good node's apply tasks complete | {} | |",
            elapsed(self.settled)
        );
        println!(
            "| controller writes, start → settled | {writes} = {:.3} × minimum {minimum} \
             ({MIN_WRITES_GOOD} × {good} good + {MIN_WRITES_BAD} × {bad} bad) | ≤ 1.1 × |",
            writes as f64 / minimum.max(1) as f64
        );
        println!(
            "| other writes (kube-controller-manager, API server), start → settled | {} | |",
            total(&self.settle_writes, Writer::ControlPlane)
        );
        println!(
            "| reconciles / Secret reads, start → settled | {} / {} | |",
            self.settle_work.reconciles, self.settle_work.secret_reads
        );
        println!(
            "| peak API connections: settling / steady / late | {} / {} / {} | ≤ 8 |",
            self.connections[0], self.connections[1], self.connections[2]
        );
        println!(
            "| controller CPU (user + system), start → every node decided / → settled | {:.2} s / {:.2} s | |",
            self.cpu[0].as_secs_f64(),
            self.cpu[1].as_secs_f64()
        );
        println!(
            "| memory after settling: VmRSS (VmHWM) | {} ({}) | ≤ 60 MiB |",
            mib(self.memory.0),
            mib(self.memory.1)
        );
        println!(
            "| steady state ({}): controller writes / reconciles / Secret reads | {} / {} / {} | 0 writes |",
            humantime::format_duration(self.args.steady),
            total(&self.steady_writes, Writer::Controller),
            self.steady_work.reconciles,
            self.steady_work.secret_reads
        );
        println!(
            "| steady state: other writes | {} | |",
            total(&self.steady_writes, Writer::ControlPlane)
        );
        if let Some(late) = &self.late {
            let percentile = |p: f64| {
                let n = late.latencies.len();
                if n == 0 {
                    return "-".to_owned();
                }
                let rank = ((p * n as f64).ceil() as usize).clamp(1, n);
                format!("{:.1}", late.latencies[rank - 1].as_secs_f64() * 1000.0)
            };
            println!(
                "| Secret → True, {} of {} late nodes: p50 / p99 / max | {} / {} / {} ms | p99 ≤ 50 ms |",
                late.latencies.len(),
                late.nodes,
                percentile(0.50),
                percentile(0.99),
                percentile(1.0)
            );
            let late_minimum = (MIN_WRITES_BAD + MIN_WRITES_GOOD) * late.nodes as u64;
            println!(
                "| controller writes for the late nodes | {} against minimum {late_minimum} \
                 ({} × ({MIN_WRITES_BAD} NotFound + {MIN_WRITES_GOOD} ready)) | |",
                total(&late.writes, Writer::Controller),
                late.nodes
            );
        }
        let webhook = &self.webhook;
        println!(
            "| `seinode-tls webhook` alone, {} TLS Secrets known: VmRSS synced | {} | |",
            webhook.known,
            mib(webhook.synced)
        );
        println!(
            "| … after a CREATE review of each of the {} nodes ({} Secrets inspected): VmRSS (VmHWM) | {} ({}) | ≤ 40 MiB |",
            webhook.reviews,
            webhook.inspected,
            mib(webhook.reviewed.0),
            mib(webhook.reviewed.1)
        );
        if !self.undecided.is_empty() {
            println!();
            println!("undecided nodes by last reason: {:?}", self.undecided);
        }
        if let Some(last) = &self.last_decided {
            println!();
            println!(
                "decided last: {} at {:.2} s; its condition showed:",
                last.node,
                last.at.as_secs_f64()
            );
            for (at, shown) in &last.shown {
                println!("- {:.2} s {shown}", at.as_secs_f64());
            }
            println!("`run` logged about it: {} lines", last.logged.len());
            for line in &last.logged {
                println!("    {line}");
            }
        }

        println!();
        println!("Writes by kind (API server `apiserver_request_total`, every code):");
        println!();
        println!("| resource | verb | by | start → settled | steady | late |");
        println!("|---|---|---|---|---|---|");
        let empty = BTreeMap::new();
        let late = self.late.as_ref().map_or(&empty, |l| &l.writes);
        let mut keys: Vec<&WriteKey> = self
            .settle_writes
            .keys()
            .chain(self.steady_writes.keys())
            .chain(late.keys())
            .collect();
        keys.sort_by_key(|k| (Writer::of(k), *k));
        keys.dedup();
        for key in keys {
            let (group, resource, subresource, verb) = key;
            let mut name = if group.is_empty() {
                resource.clone()
            } else {
                format!("{resource}.{group}")
            };
            if !subresource.is_empty() {
                name = format!("{name}/{subresource}");
            }
            let count = |m: &BTreeMap<WriteKey, u64>| m.get(key).copied().unwrap_or_default();
            println!(
                "| {name} | {verb} | {} | {} | {} | {} |",
                Writer::of(key).as_str(),
                count(&self.settle_writes),
                count(&self.steady_writes),
                count(late),
            );
        }
    }
}
