//! `seinode-tls local` as a user runs it: it comes up, answers kubectl, and leaves nothing behind.

#![allow(clippy::expect_used, clippy::unwrap_used)]

mod common;

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::time::Duration;

use seinode_tls::control_plane::Binaries;

const START_TIMEOUT: Duration = Duration::from_secs(180);

struct Local {
    child: Child,
    dir: PathBuf,
    stdout_lines: Vec<String>,
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

#[test]
fn local_killed_outright_still_leaves_no_process_behind() {
    let dir = common::temp_path("local-sigkill");
    let mut local = start_local(&dir, &[]);
    let needle = std::fs::canonicalize(&local.dir)
        .unwrap()
        .display()
        .to_string();
    assert!(common::processes_mentioning(&needle).len() >= 2);
    signal(&local.child, "KILL");
    local.child.wait().unwrap();
    // The watchdog notices its parent is gone and stops etcd and kube-apiserver.
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
