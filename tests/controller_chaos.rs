//! The controller under faults, on the one-machine cluster (Pods run): a controller killed
//! mid-plan, the API server and etcd crashed and restarted mid-plan, two replicas racing for the
//! Lease, a leader paused past its renew deadline. Each scenario ends with every node Running
//! on its init plan, no plan seen going backwards (a finished task run again), exactly one event
//! per condition flip, the controller's part done within 15 s of the fault's end, and each
//! controller back on one connection to the API server (a leader under leader election, two).
//!
//! The controllers are `seinode-tls controller` processes (so they can be killed and paused),
//! each watched by a watchdog that stops it if this binary dies. Scenarios run one at a time:
//! they crash the binary's shared API server and etcd.

#![allow(clippy::expect_used, clippy::unwrap_used)]

mod common;

use std::collections::{BTreeMap, HashMap};
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use futures::StreamExt;
use k8s_openapi::api::core::v1::Secret;
use k8s_openapi::api::events::v1::Event;
use kube::api::{Api, ListParams, PostParams};
use kube::runtime::{WatchStreamExt, watcher};
use kube::{Client, ResourceExt};
use seinode_tls_crds::{PlanPhase, SIDECAR_TLS_SECRET_READY, SeiNode, SeiNodePhase, TaskStatus};
use seinode_tls_devcluster::network::established_connections;
use seinode_tls_devcluster::watchdog::Watchdog;
use seinode_tls_testkit::{CertificateAuthority, LeafSpec};
use serde_json::json;

/// Nodes per scenario.
const NODES: usize = 6;
/// The controller's part (every apply done, every condition decided) after the fault ends.
const CONVERGE: Duration = Duration::from_secs(15);
/// Pods of the process kubelet becoming Ready, after that.
const PODS: Duration = Duration::from_secs(180);

static SERIAL: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

/// A `seinode-tls controller` process.
struct ControllerProcess {
    child: Child,
    log: PathBuf,
    /// Started with `--leader-elect`.
    elects: bool,
    /// Where it serves `/healthz`, `/readyz` and `/metrics`.
    health: std::net::SocketAddr,
    _watchdog: Option<Watchdog>,
}

impl ControllerProcess {
    fn start(name: &str, extra: &[&str]) -> Self {
        Self::start_with(name, extra, common::control_plane().kubeconfig())
    }

    fn start_with(name: &str, extra: &[&str], kubeconfig: &std::path::Path) -> Self {
        let log = common::temp_path(&format!("chaos-{name}"));
        // A port free now, for the process to bind (it does not print the one it binds).
        let health = std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap();
        let client = common::sidecar_client();
        let out = std::fs::File::create(&log).unwrap();
        let child = Command::new(env!("CARGO_BIN_EXE_seinode-tls"))
            .arg("controller")
            .arg(format!("--health-addr={health}"))
            .args([
                "--cert-expiry-warning=1h",
                "--sidecar-probe-timeout=1s",
                "--sidecar-probe-interval=5s",
            ])
            .arg(format!("--sidecar-pod-cidr={}", common::pod_cidr()))
            .arg(format!(
                "--sidecar-client-cert-file={}",
                client.cert_file.display()
            ))
            .arg(format!(
                "--sidecar-client-key-file={}",
                client.key_file.display()
            ))
            .arg(format!(
                "--sidecar-client-ca-file={}",
                client.ca_file.display()
            ))
            .args([
                "--sidecar-genesis-bucket=test-genesis",
                "--sidecar-genesis-region=local",
                "--sidecar-snapshot-bucket=test-snapshots",
                "--sidecar-snapshot-region=local",
            ])
            .args(extra)
            .env("KUBECONFIG", kubeconfig)
            .env("RUST_LOG", "info,seinode_tls_controller=debug")
            .env("NO_COLOR", "1")
            .stdin(Stdio::null())
            .stdout(out.try_clone().unwrap())
            .stderr(out)
            .spawn()
            .unwrap();
        let mut watchdog = Watchdog::spawn(None);
        if let Some(w) = watchdog.as_mut() {
            w.watch_pid(child.id());
        }
        Self {
            child,
            log,
            elects: extra.contains(&"--leader-elect"),
            health,
            _watchdog: watchdog,
        }
    }

    /// `/readyz`: the status code and the body.
    fn readyz(&self) -> (String, String) {
        let out = Command::new("curl")
            .args(["-s", "--max-time", "2", "-w", "\n%{http_code}"])
            .arg(format!("http://{}/readyz", self.health))
            .output()
            .unwrap();
        let text = String::from_utf8_lossy(&out.stdout).into_owned();
        let (body, code) = text.rsplit_once('\n').unwrap_or(("", &text));
        (code.to_owned(), body.to_owned())
    }

    fn leader_args(name: &str, lease_ns: &str) -> Vec<String> {
        [
            "--leader-elect",
            "--leader-election-name=chaos",
            &format!("--leader-election-namespace={lease_ns}"),
            &format!("--leader-election-identity={name}"),
            "--leader-election-lease-duration=4s",
            "--leader-election-renew-deadline=3s",
            "--leader-election-retry-period=1s",
        ]
        .map(str::to_owned)
        .to_vec()
    }

    fn leader(name: &str, lease_ns: &str) -> Self {
        let args = Self::leader_args(name, lease_ns);
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        Self::start(name, &args)
    }

    fn signal(&self, signal: &str) {
        let status = Command::new("kill")
            .arg(format!("-{signal}"))
            .arg(self.child.id().to_string())
            .status()
            .unwrap();
        assert!(status.success(), "kill -{signal}");
    }

    fn stop(&mut self) {
        // A paused process is killed as well (SIGKILL needs no CONT).
        let _ = self.child.kill();
        let _ = self.child.wait();
    }

    fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// Whether its log says it leads now (it acquired the Lease and has not lost it since).
    fn leads(&self) -> bool {
        let log = self.log();
        log.rfind("acquired the Lease") > log.rfind("not leading")
    }

    /// Waits up to 10 s for the process to hold one connection to the API server (every watch
    /// and request are streams of one HTTP/2 connection); panics with the count if not. With
    /// leader election the leader's reconciles have a fenced connection of their own, which
    /// closes when it stops leading: two for the leader then.
    async fn assert_api_connections(&self) {
        let (pid, port) = (self.child.id(), common::control_plane().port());
        let want = if self.elects && self.leads() { 2 } else { 1 };
        let (count, ok) = common::poll(
            Duration::from_secs(10),
            || async { established_connections(pid, port) },
            |count| count.as_ref().is_ok_and(|n| *n == want),
        )
        .await;
        assert!(
            ok,
            "connections to the API server: {count:?}, want {want}\n{}",
            self.log()
        );
    }

    /// Waits up to 30 s for `line` in the log; panics with the log if it never comes.
    async fn wait_log(&self, line: &str, what: &str) {
        let (log, found) = common::poll(
            Duration::from_secs(30),
            || async { self.log() },
            |log| log.contains(line),
        )
        .await;
        assert!(found, "{what}:\n{log}");
    }
}

impl Drop for ControllerProcess {
    fn drop(&mut self) {
        self.stop();
        let _ = std::fs::remove_file(&self.log);
    }
}

/// What a watch of the namespace's SeiNodes saw: per node, every (plan id, tasks complete)
/// and every `SidecarTLSSecretReady` status in order.
#[derive(Default)]
struct History {
    plans: HashMap<String, Vec<(String, usize)>>,
    tls: HashMap<String, Vec<String>>,
}

impl History {
    fn record(&mut self, node: &SeiNode) {
        let name = node.name_any();
        let Some(status) = &node.status else { return };
        if let Some(plan) = &status.plan {
            let done = plan
                .tasks
                .iter()
                .filter(|t| t.status == TaskStatus::Complete)
                .count();
            let seen = self.plans.entry(name.clone()).or_default();
            if seen.last() != Some(&(plan.id.clone(), done)) {
                seen.push((plan.id.clone(), done));
            }
        }
        if let Some(c) = status
            .conditions
            .iter()
            .flatten()
            .find(|c| c.type_ == SIDECAR_TLS_SECRET_READY)
        {
            let seen = self.tls.entry(name).or_default();
            if seen.last() != Some(&c.status) {
                seen.push(c.status.clone());
            }
        }
    }

    /// Plans that lost a finished task: (node, what was seen).
    fn backwards(&self) -> Vec<(String, Vec<(String, usize)>)> {
        self.plans
            .iter()
            .filter(|(_, seen)| seen.windows(2).any(|w| w[0].0 == w[1].0 && w[1].1 < w[0].1))
            .map(|(n, s)| (n.clone(), s.clone()))
            .collect()
    }
}

struct Scenario {
    client: Client,
    ns: String,
    nodes: Api<SeiNode>,
    history: Arc<Mutex<History>>,
    watch: tokio::task::JoinHandle<()>,
}

impl Scenario {
    /// A namespace with NODES TLS nodes and their valid Secrets, watched from the start.
    async fn new(prefix: &str) -> Self {
        let client = common::client().await;
        let ns = common::namespace(&client, prefix).await;
        let nodes: Api<SeiNode> = Api::namespaced(client.clone(), &ns);
        let history = Arc::new(Mutex::new(History::default()));
        let watch = {
            let (nodes, history) = (nodes.clone(), history.clone());
            tokio::spawn(async move {
                let mut stream = watcher(nodes, watcher::Config::default())
                    .default_backoff()
                    .applied_objects()
                    .boxed();
                while let Some(event) = stream.next().await {
                    if let Ok(node) = event {
                        history.lock().unwrap().record(&node);
                    }
                }
            })
        };
        let ca = CertificateAuthority::new("chaos").unwrap();
        let secrets: Api<Secret> = Api::namespaced(client.clone(), &ns);
        for i in 0..NODES {
            let name = format!("n{i}");
            let dns = [
                format!("{name}.{ns}.svc.cluster.local"),
                format!("{name}-0.{name}.{ns}.svc.cluster.local"),
            ];
            let leaf = ca
                .issue(&LeafSpec {
                    common_name: &name,
                    dns_names: &[&dns[0], &dns[1]],
                    server: true,
                    ..LeafSpec::default()
                })
                .unwrap();
            let secret = seinode_tls_testkit::tls_secret(
                &ns,
                &format!("{name}-tls"),
                &leaf.cert_pem,
                &leaf.key_pem,
                Some(&ca.cert_pem()),
            );
            secrets
                .create(&PostParams::default(), &secret)
                .await
                .unwrap();
            let node: SeiNode = serde_json::from_value(json!({
                "apiVersion": "sei.io/v1alpha1", "kind": "SeiNode",
                "metadata": {"name": name, "namespace": ns},
                "spec": {"chainId": "arctic-1", "image": "ghcr.io/sei-protocol/sei:v6.3.0",
                         "fullNode": {}, "sidecar": {"tls": {"secretName": format!("{name}-tls")}}},
            }))
            .unwrap();
            nodes.create(&PostParams::default(), &node).await.unwrap();
        }
        Self {
            client,
            ns,
            nodes,
            history,
            watch,
        }
    }

    /// Waits until some node has finished a task and some has not finished its plan.
    async fn mid_plan(&self) {
        let (_, ok) = common::poll(
            Duration::from_secs(60),
            || async { self.nodes.list(&ListParams::default()).await.ok() },
            |list| {
                let Some(list) = list else { return false };
                let done = |n: &SeiNode| {
                    n.status
                        .as_ref()
                        .and_then(|s| s.plan.as_ref())
                        .map_or(0, |p| {
                            p.tasks
                                .iter()
                                .filter(|t| t.status == TaskStatus::Complete)
                                .count()
                        })
                };
                list.items.iter().any(|n| done(n) > 0) && list.items.iter().any(|n| done(n) < 4)
            },
        )
        .await;
        assert!(ok, "the plans never got under way");
    }

    /// The end state and the history: within CONVERGE of `fault_end` every node has every
    /// condition decided and every apply done; then every node Running on its init plan; no
    /// plan went backwards; one event per flip, each from `reporters` (when given).
    async fn assert_converged(&self, fault_end: Instant, controllers: &[&ControllerProcess]) {
        let ns = self.ns.clone();
        let logs = move || {
            let objects =
                common::kubectl(&["get", "statefulsets,pods", "-n", &ns, "-o", "wide"], "");
            format!(
                "{}\n{}\nobjects:\n{}",
                controllers
                    .iter()
                    .map(|c| c.log())
                    .collect::<Vec<_>>()
                    .join("\n-----\n"),
                String::from_utf8_lossy(&objects.stderr),
                String::from_utf8_lossy(&objects.stdout)
            )
        };
        let applied = |n: &SeiNode| {
            let status = n.status.as_ref();
            let tls_true = status
                .and_then(|s| s.conditions.as_ref())
                .is_some_and(|cs| {
                    cs.iter()
                        .any(|c| c.type_ == SIDECAR_TLS_SECRET_READY && c.status == "True")
                });
            let applies_done = status.and_then(|s| s.plan.as_ref()).is_some_and(|p| {
                p.tasks
                    .iter()
                    .take(3)
                    .all(|t| t.status == TaskStatus::Complete)
            });
            tls_true && applies_done
        };
        let running_init = |n: &SeiNode| {
            let s = n.status.as_ref();
            s.and_then(|s| s.phase) == Some(SeiNodePhase::Running)
                && s.and_then(|s| s.plan.as_ref())
                    .is_some_and(|p| p.id == "init-1" && p.phase == PlanPhase::Complete)
        };
        let left = CONVERGE.saturating_sub(fault_end.elapsed());
        self.wait_all(
            left,
            applied,
            "every apply done and condition decided",
            &logs,
        )
        .await;
        for controller in controllers {
            controller.assert_api_connections().await;
        }
        self.wait_all(
            PODS,
            running_init,
            "every node Running on its init plan",
            &logs,
        )
        .await;
        let backwards = self.history.lock().unwrap().backwards();
        assert!(
            backwards.is_empty(),
            "plans went backwards (a finished task ran again): {backwards:?}"
        );

        // Events: one per flip of SidecarTLSSecretReady seen by the watch.
        let events: Vec<Event> = Api::<Event>::namespaced(self.client.clone(), &self.ns)
            .list(&ListParams::default())
            .await
            .unwrap()
            .items;
        let mut counted: BTreeMap<(String, String), usize> = BTreeMap::new();
        for event in &events {
            let node = event
                .regarding
                .as_ref()
                .and_then(|r| r.name.clone())
                .unwrap_or_default();
            let reason = event.reason.clone().unwrap_or_default();
            *counted.entry((node, reason)).or_default() += 1;
        }
        let history = self.history.lock().unwrap();
        for i in 0..NODES {
            let node = format!("n{i}");
            let flips = history.tls.get(&node).cloned().unwrap_or_default();
            let ready_flips = flips.iter().filter(|s| *s == "True").count();
            let not_ready_flips = flips.len() - ready_flips;
            assert_eq!(
                counted
                    .get(&(node.clone(), "SidecarTLSSecretReady".to_owned()))
                    .copied()
                    .unwrap_or(0),
                ready_flips,
                "{node}: SidecarTLSSecretReady events against flips {flips:?}; events {counted:?}"
            );
            assert_eq!(
                counted
                    .get(&(node.clone(), "SidecarTLSSecretNotReady".to_owned()))
                    .copied()
                    .unwrap_or(0),
                not_ready_flips,
                "{node}: SidecarTLSSecretNotReady events against flips {flips:?}"
            );
        }
    }
}

impl Scenario {
    /// Waits up to `timeout` for `check` to hold for every node; panics with their statuses
    /// and `logs()` if it does not.
    async fn wait_all(
        &self,
        timeout: Duration,
        check: impl Fn(&SeiNode) -> bool,
        what: &str,
        logs: &impl Fn() -> String,
    ) {
        let (list, ok) = common::poll(
            timeout,
            || async { self.nodes.list(&ListParams::default()).await.ok() },
            |list| list.as_ref().is_some_and(|l| l.items.iter().all(&check)),
        )
        .await;
        assert!(
            ok,
            "not {what} within {timeout:?}: {:#?}\ncontroller logs:\n{}",
            list.map(|l| l
                .items
                .iter()
                .map(|n| (n.name_any(), n.status.clone()))
                .collect::<Vec<_>>()),
            logs()
        );
    }
}

impl Drop for Scenario {
    fn drop(&mut self) {
        self.watch.abort();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_controller_killed_mid_plan_is_replaced_without_repeating_or_losing_anything() {
    let _serial = SERIAL.lock().await;
    let scenario = Scenario::new("chaos-kill").await;
    let mut first = ControllerProcess::start("kill-first", &[]);
    scenario.mid_plan().await;
    first.stop();
    let second = ControllerProcess::start("kill-second", &[]);
    scenario.assert_converged(Instant::now(), &[&second]).await;
}

/// Crashes control-plane `component` mid-plan, down for 2 s, under one controller.
async fn crash_mid_plan(component: &str) {
    let _serial = SERIAL.lock().await;
    let scenario = Scenario::new(&format!("chaos-{component}")).await;
    let controller = ControllerProcess::start(component, &[]);
    scenario.mid_plan().await;
    common::control_plane()
        .crash_and_restart(component, Duration::from_secs(2))
        .await
        .unwrap();
    scenario
        .assert_converged(Instant::now(), &[&controller])
        .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_api_server_crashing_mid_plan_costs_no_more_than_its_downtime() {
    crash_mid_plan("kube-apiserver").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn etcd_crashing_mid_plan_costs_no_more_than_its_downtime() {
    crash_mid_plan("etcd").await;
}

/// The `reportingInstance` of every event in the namespace.
async fn reporters(client: &Client, ns: &str) -> Vec<String> {
    let mut seen: Vec<String> = Api::<Event>::namespaced(client.clone(), ns)
        .list(&ListParams::default())
        .await
        .unwrap()
        .items
        .into_iter()
        .filter(|e| e.regarding.as_ref().and_then(|r| r.kind.as_deref()) == Some("SeiNode"))
        .filter_map(|e| e.reporting_instance)
        .collect();
    seen.sort();
    seen.dedup();
    seen
}

/// The names of the events replica `identity` (the configured one) reported in `ns`.
async fn events_of(client: &Client, ns: &str, identity: &str) -> Vec<String> {
    let prefix = format!("{identity}_");
    let mut names: Vec<String> = Api::<Event>::namespaced(client.clone(), ns)
        .list(&ListParams::default())
        .await
        .unwrap()
        .items
        .into_iter()
        .filter(|e| {
            e.reporting_instance
                .as_deref()
                .is_some_and(|i| i.starts_with(&prefix))
        })
        .map(|e| e.name_any())
        .collect();
    names.sort();
    names
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_replicas_racing_for_the_lease_give_exactly_one_leader() {
    let _serial = SERIAL.lock().await;
    let scenario = Scenario::new("chaos-race").await;
    let lease_ns = scenario.ns.clone();
    // Started at the same instant, on an expired-free, absent Lease: both create or take it.
    let a = ControllerProcess::leader("race-a", &lease_ns);
    let b = ControllerProcess::leader("race-b", &lease_ns);
    scenario.assert_converged(Instant::now(), &[&a, &b]).await;
    let leaders: Vec<&ControllerProcess> = [&a, &b]
        .into_iter()
        .filter(|c| c.log().contains("acquired the Lease"))
        .collect();
    assert_eq!(
        leaders.len(),
        1,
        "exactly one replica led:\n{}\n-----\n{}",
        a.log(),
        b.log()
    );
    let reporters = reporters(&scenario.client, &scenario.ns).await;
    assert_eq!(
        reporters.len(),
        1,
        "all events come from one replica: {reporters:?}"
    );
    // Both are ready, the leader and the one standing by: their rounds reach the API server.
    for replica in [&a, &b] {
        let (last, ready) = common::poll(
            Duration::from_secs(10),
            || async { replica.readyz() },
            |(code, _)| code == "200",
        )
        .await;
        assert!(ready, "/readyz: {last:?}\n{}", replica.log());
    }
    // A replica whose API server does not answer is not ready, and says why.
    let kubeconfig = common::temp_path("chaos-unreachable-kubeconfig");
    let closed = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap();
    let admin = std::fs::read_to_string(common::control_plane().kubeconfig()).unwrap();
    let server = admin
        .lines()
        .find_map(|l| l.trim().strip_prefix("server: "))
        .unwrap()
        .to_owned();
    std::fs::write(
        &kubeconfig,
        admin.replace(&server, &format!("https://{closed}")),
    )
    .unwrap();
    let args = ControllerProcess::leader_args("race-unreachable", &lease_ns);
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let mut unreachable = ControllerProcess::start_with("race-unreachable", &args, &kubeconfig);
    let (last, answered) = common::poll(
        Duration::from_secs(10),
        || async { unreachable.readyz() },
        |(code, _)| !code.is_empty() && code != "000",
    )
    .await;
    assert!(answered, "{last:?}\n{}", unreachable.log());
    assert_eq!(
        last,
        (
            "503".to_owned(),
            "waiting for a first leader election round with the API server".to_owned()
        ),
        "{}",
        unreachable.log()
    );
    unreachable.stop();
    std::fs::remove_file(&kubeconfig).unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_leader_paused_past_its_deadline_writes_nothing_after_another_took_over() {
    let _serial = SERIAL.lock().await;
    let scenario = Scenario::new("chaos-pause").await;
    let lease_ns = scenario.ns.clone();
    let first = ControllerProcess::leader("pause-first", &lease_ns);
    first
        .wait_log("acquired the Lease", "the first replica never led")
        .await;
    let second = ControllerProcess::leader("pause-second", &lease_ns);
    scenario.mid_plan().await;
    // The leader hangs (as on a stuck renewal) well past the lease; the other takes over.
    first.signal("STOP");
    second
        .wait_log("acquired the Lease", "the second replica never took over")
        .await;
    let before = events_of(&scenario.client, &scenario.ns, "pause-first").await;
    // It wakes with its reconciles mid-flight: it must notice it no longer leads, not write.
    first.signal("CONT");
    first
        .wait_log("not leading", "the old leader never stepped down")
        .await;
    scenario
        .assert_converged(Instant::now(), &[&first, &second])
        .await;
    let after = events_of(&scenario.client, &scenario.ns, "pause-first").await;
    assert_eq!(
        after, before,
        "the paused leader published events after another replica took the Lease"
    );
}
