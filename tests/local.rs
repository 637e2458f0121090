//! `seinode-tls local` as a user runs it: it comes up, answers kubectl, runs the demo node's Pod
//! for real, and leaves nothing behind (processes, network namespaces, bridge, directory).

#![allow(clippy::expect_used, clippy::unwrap_used)]

mod common;

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::time::Duration;

use seinode_tls_devcluster::control_plane::Binaries;
use seinode_tls_devcluster::watchdog::Watchdog;

const START_TIMEOUT: Duration = Duration::from_secs(180);
/// How long the demo node gets to reach Running with its sidecar probed through the proxy.
const DEMO_TIMEOUT: Duration = Duration::from_secs(120);

struct Local {
    child: Child,
    dir: PathBuf,
    stdout_lines: Vec<String>,
    /// Stops `local` (which then cleans up its cluster) if this test binary dies.
    _watchdog: Option<Watchdog>,
}

/// A test that fails half-way still stops its `local`: SIGINT (it removes its Pods, network and
/// directory), then SIGKILL after a minute (its own watchdog cleans up then).
impl Drop for Local {
    fn drop(&mut self) {
        if !matches!(self.child.try_wait(), Ok(None)) {
            return;
        }
        let _ = Command::new("kill")
            .arg("-INT")
            .arg(self.child.id().to_string())
            .status();
        let stopped = common::wait_until(Duration::from_secs(60), || {
            !matches!(self.child.try_wait(), Ok(None))
        });
        if !stopped {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}

/// Starts `seinode-tls local --dir DIR` and waits for its `ready:` line.
fn start_local(dir: &Path, extra: &[&str]) -> Local {
    let mut child = Command::new(env!("CARGO_BIN_EXE_seinode-tls"))
        .arg("local")
        .arg("--dir")
        .arg(dir)
        .args(extra)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .spawn()
        .expect("spawn seinode-tls local");
    let mut watchdog = Watchdog::spawn(None);
    if let Some(w) = watchdog.as_mut() {
        w.watch_pid(child.id());
    }
    let stdout = child.stdout.take().unwrap();
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(stdout).lines() {
            if tx.send(line.unwrap_or_default()).is_err() {
                break;
            }
        }
    });
    let mut stdout_lines = Vec::new();
    loop {
        match rx.recv_timeout(START_TIMEOUT) {
            Ok(line) => {
                let ready = line.starts_with("ready: ");
                stdout_lines.push(line);
                if ready {
                    break;
                }
            }
            Err(e) => {
                let _ = child.kill();
                panic!(
                    "no ready line from seinode-tls local ({e}); stdout so far: {stdout_lines:?}"
                );
            }
        }
    }
    Local {
        child,
        dir: dir.to_owned(),
        stdout_lines,
        _watchdog: watchdog,
    }
}

fn signal(child: &Child, signal: &str) {
    let status = Command::new("kill")
        .arg(format!("-{signal}"))
        .arg(child.id().to_string())
        .status()
        .unwrap();
    assert!(status.success());
}

fn kubectl(kubeconfig: &str, args: &[&str]) -> std::process::Output {
    Command::new(Binaries::locate().unwrap().kubectl)
        .env("KUBECONFIG", kubeconfig)
        .args(args)
        .output()
        .unwrap()
}

#[test]
fn local_comes_up_answers_kubectl_and_leaves_nothing_after_sigterm() {
    let dir = common::temp_path("local-sigterm");
    let mut local = start_local(&dir, &[]);
    let dir_abs = std::fs::canonicalize(&local.dir).unwrap();
    let expected = format!(
        "ready: export KUBECONFIG={}",
        dir_abs.join("kubeconfig").display()
    );
    assert_eq!(local.stdout_lines, [expected], "exactly one line on stdout");

    let kubeconfig = dir_abs.join("kubeconfig").display().to_string();
    let crd = kubectl(
        &kubeconfig,
        &["get", "crd", "seinodes.sei.io", "-o", "name"],
    );
    assert!(
        crd.status.success(),
        "{}",
        String::from_utf8_lossy(&crd.stderr)
    );
    assert_eq!(
        String::from_utf8_lossy(&crd.stdout).trim(),
        "customresourcedefinition.apiextensions.k8s.io/seinodes.sei.io"
    );
    let nodes = kubectl(&kubeconfig, &["get", "snode", "-A"]);
    assert!(
        nodes.status.success(),
        "{}",
        String::from_utf8_lossy(&nodes.stderr)
    );

    let needle = dir_abs.display().to_string();
    assert!(common::processes_mentioning(&needle).len() >= 2);
    signal(&local.child, "TERM");
    let mut status = None;
    assert!(common::wait_until(Duration::from_secs(30), || {
        status = local.child.try_wait().unwrap();
        status.is_some()
    }));
    assert!(status.unwrap().success(), "exit status {status:?}");
    assert!(
        common::processes_mentioning(&needle).is_empty(),
        "no process left behind"
    );
    assert!(!dir_abs.exists(), "state directory removed");
}

/// `jsonpath` output of `kubectl get` as text ("" when kubectl fails).
fn get(kubeconfig: &str, args: &[&str]) -> String {
    let out = kubectl(kubeconfig, args);
    String::from_utf8_lossy(&out.stdout).trim().to_owned()
}

/// Waits until the demo node is Running with `SidecarReady=True` and its Pod has every
/// container ready; returns the Pod's address.
fn wait_for_demo(kubeconfig: &str) -> String {
    let sidecar_ready =
        "jsonpath={.status.phase} {.status.conditions[?(@.type==\"SidecarReady\")].status}";
    // seid, and the two native sidecars (seictl, kube-rbac-proxy) as init containers.
    let containers_ready =
        "jsonpath={.status.containerStatuses[*].ready} {.status.initContainerStatuses[*].ready}";
    let (mut node, mut ready) = (String::new(), String::new());
    let ok = common::wait_until(DEMO_TIMEOUT, || {
        node = get(kubeconfig, &["get", "snode", "demo", "-o", sidecar_ready]);
        ready = get(
            kubeconfig,
            &["get", "pod", "demo-0", "-o", containers_ready],
        );
        node == "Running True" && ready == "true true true"
    });
    let pods = get(kubeconfig, &["get", "pods", "-o", "wide"]);
    assert!(
        ok,
        "demo node: {node:?}; containers ready: {ready:?}; pods:\n{pods}"
    );
    get(
        kubeconfig,
        &["get", "pod", "demo-0", "-o", "jsonpath={.status.podIP}"],
    )
}

/// The Pod network index of a Pod address (`198.18.<index>.x`).
fn network_index(pod_ip: &str) -> String {
    let octets: Vec<&str> = pod_ip.split('.').collect();
    assert!(
        octets.len() == 4 && octets[..2] == ["198", "18"],
        "a Pod address in 198.18.0.0/16: {pod_ip:?}"
    );
    octets[2].to_owned()
}

/// Network namespaces and the bridge of Pod network `index` that still exist.
fn network_left(index: &str) -> Vec<String> {
    let out = Command::new("ip").args(["netns", "list"]).output().unwrap();
    let prefix = format!("sntls{index}-");
    let mut left: Vec<String> = String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter_map(|l| l.split_whitespace().next())
        .filter(|ns| ns.starts_with(&prefix))
        .map(str::to_owned)
        .collect();
    let bridge = format!("sntls{index}");
    if Command::new("ip")
        .args(["link", "show", &bridge])
        .output()
        .unwrap()
        .status
        .success()
    {
        left.push(bridge);
    }
    left
}

#[test]
fn local_demo_runs_the_node_pod_behind_the_real_proxy_and_leaves_nothing_after_sigint() {
    let dir = common::temp_path("local-demo");
    let mut local = start_local(&dir, &["--demo"]);
    let dir_abs = std::fs::canonicalize(&local.dir).unwrap();
    let kubeconfig = dir_abs.join("kubeconfig").display().to_string();
    let pod_ip = wait_for_demo(&kubeconfig);
    let index = network_index(&pod_ip);
    assert!(!network_left(&index).is_empty(), "the Pod has a namespace");

    // The real kube-rbac-proxy answers on :8443 in the Pod, with the demo Secret's certificate:
    // the bypass paths pass without a credential (readiness is 200: the controller's mark-ready
    // went through), the sidecar's API does not. seictl itself is not reachable from outside
    // the pod: it listens on the pod's loopback.
    for (path, expected) in [
        ("v0/livez", "200"),
        ("v0/healthz", "200"),
        ("v0/status", "401"),
    ] {
        let status = common::http_status(&format!("https://{pod_ip}:8443/{path}"), &[]);
        assert_eq!(status, expected, "/{path}");
    }
    assert_eq!(
        common::http_status(&format!("http://{pod_ip}:7777/v0/status"), &[]),
        "000",
        "seictl listens on the pod's loopback only"
    );

    signal(&local.child, "INT");
    let mut status = None;
    assert!(common::wait_until(Duration::from_secs(60), || {
        status = local.child.try_wait().unwrap();
        status.is_some()
    }));
    assert!(status.unwrap().success(), "exit status {status:?}");
    assert_eq!(
        network_left(&index),
        Vec::<String>::new(),
        "network removed"
    );
    let needle = dir_abs.display().to_string();
    assert!(
        common::processes_mentioning(&needle).is_empty(),
        "no process left"
    );
    assert!(!dir_abs.exists(), "state directory removed");
}

#[test]
fn local_killed_outright_still_leaves_no_process_or_network_behind() {
    let dir = common::temp_path("local-sigkill");
    let mut local = start_local(&dir, &["--demo"]);
    let dir_abs = std::fs::canonicalize(&local.dir).unwrap();
    let needle = dir_abs.display().to_string();
    let kubeconfig = dir_abs.join("kubeconfig").display().to_string();
    let pod_ip = wait_for_demo(&kubeconfig);
    let index = network_index(&pod_ip);
    assert!(common::processes_mentioning(&needle).len() >= 4);
    signal(&local.child, "KILL");
    local.child.wait().unwrap();
    // The watchdogs notice their parent is gone: they stop the control plane, kill what runs
    // in the Pods' namespaces and remove them and the bridge.
    assert!(
        common::wait_until(Duration::from_secs(30), || network_left(&index).is_empty()),
        "network left: {:?}",
        network_left(&index)
    );
    assert!(
        common::wait_until(Duration::from_secs(30), || common::processes_mentioning(
            &needle
        )
        .is_empty()),
        "processes left: {:?}",
        common::processes_mentioning(&needle)
    );
    assert!(common::wait_until(Duration::from_secs(10), || !Path::new(
        &needle
    )
    .exists()));
}
