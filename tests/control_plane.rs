//! The control-plane harness itself: it starts, cleans up after itself, and explains failures.

#![allow(clippy::expect_used, clippy::unwrap_used)]

mod common;

use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use std::time::Duration;

use seinode_tls_devcluster::control_plane::{
    Binaries, ControlPlane, ControlPlaneConfig, ControlPlaneError,
};

fn runtime() -> tokio::runtime::Runtime {
    seinode_tls::telemetry::install_crypto_provider();
    tokio::runtime::Runtime::new().expect("tokio runtime")
}

fn real_binaries() -> Binaries {
    Binaries::locate().expect("control-plane binaries (see tools/control-plane/build.sh)")
}

/// A binaries directory with the real binaries but a fake kube-apiserver script.
fn binaries_with_fake_apiserver(dir: &Path, script: &str) -> Binaries {
    let real = real_binaries();
    let real_dir = real.etcd.parent().unwrap();
    std::fs::create_dir_all(dir).unwrap();
    for name in Binaries::NAMES.iter().filter(|n| **n != "kube-apiserver") {
        std::os::unix::fs::symlink(real_dir.join(name), dir.join(name)).unwrap();
    }
    let fake = dir.join("kube-apiserver");
    std::fs::write(&fake, format!("#!/bin/sh\n{script}\n")).unwrap();
    std::fs::set_permissions(&fake, std::fs::Permissions::from_mode(0o755)).unwrap();
    Binaries::in_dir(dir).unwrap()
}

#[test]
fn dropping_the_control_plane_stops_its_processes_and_removes_its_directory() {
    let dir = common::temp_path("cp-drop");
    let rt = runtime();
    let cp = rt
        .block_on(ControlPlane::start(ControlPlaneConfig {
            dir: Some(dir.clone()),
            ..ControlPlaneConfig::default()
        }))
        .expect("control plane starts");
    let dir = cp.dir().to_owned();
    let needle = dir.display().to_string();
    let pids = cp.pids();
    assert_eq!(pids.len(), 4, "four components");
    assert!(
        common::processes_mentioning(&needle).len() >= 4,
        "etcd, kube-apiserver, kube-controller-manager and kube-scheduler run"
    );

    // It answers: the kubeconfig works for kubectl.
    let output = cp
        .kubectl()
        .args(["get", "--raw", "/readyz"])
        .output()
        .unwrap();
    assert_eq!(String::from_utf8_lossy(&output.stdout).trim(), "ok");

    drop(cp);
    for pid in pids {
        assert!(
            !Path::new(&format!("/proc/{pid}")).exists(),
            "process {pid} still exists after drop"
        );
    }
    assert!(
        common::processes_mentioning(&needle).is_empty(),
        "no process left behind"
    );
    assert!(!dir.exists(), "{} removed", dir.display());
}

#[test]
fn an_api_server_that_dies_at_start_is_reported_with_its_last_log_lines() {
    let bin = common::temp_path("cp-fake-bin");
    let binaries = binaries_with_fake_apiserver(
        &bin,
        "echo 'E1127 run.go:72] \"command failed\" err=\"invalid --etcd-servers\"' >&2; exit 3",
    );
    let dir = common::temp_path("cp-dies");
    let err = runtime()
        .block_on(ControlPlane::start(ControlPlaneConfig {
            dir: Some(dir.clone()),
            binaries: Some(binaries),
            ..ControlPlaneConfig::default()
        }))
        .expect_err("the fake kube-apiserver exits");
    let text = err.to_string();
    assert!(
        matches!(
            err,
            ControlPlaneError::Died {
                component: "kube-apiserver",
                ..
            }
        ),
        "{text}"
    );
    assert!(
        text.contains("kube-apiserver exited during start-up"),
        "{text}"
    );
    assert!(
        text.contains("invalid --etcd-servers"),
        "log tail shown: {text}"
    );
    assert!(!dir.exists(), "failed start cleans up {}", dir.display());
    let needle = dir.display().to_string();
    assert!(common::wait_until(Duration::from_secs(10), || {
        common::processes_mentioning(&needle).is_empty()
    }));
    std::fs::remove_dir_all(bin).unwrap();
}

#[test]
fn a_port_that_stays_taken_is_reported_as_a_port_clash() {
    let bin = common::temp_path("cp-clash-bin");
    let binaries = binaries_with_fake_apiserver(
        &bin,
        "echo 'failed to listen on 127.0.0.1:6443: listen tcp 127.0.0.1:6443: bind: address already in use' >&2; exit 1",
    );
    let err = runtime()
        .block_on(ControlPlane::start(ControlPlaneConfig {
            dir: None,
            binaries: Some(binaries),
            ..ControlPlaneConfig::default()
        }))
        .expect_err("the port is always taken");
    let text = err.to_string();
    assert!(
        matches!(
            err,
            ControlPlaneError::PortClash {
                component: "kube-apiserver",
                ..
            }
        ),
        "{text}"
    );
    assert!(text.contains("could not bind its port 3 times"), "{text}");
    assert!(common::processes_mentioning(&bin.display().to_string()).is_empty());
    std::fs::remove_dir_all(bin).unwrap();
}

#[test]
fn a_directory_without_the_binaries_names_what_is_missing_and_the_way_out() {
    let dir = common::temp_path("cp-empty-bin");
    std::fs::create_dir_all(&dir).unwrap();
    let err = Binaries::in_dir(&dir).expect_err("empty directory");
    let text = err.to_string();
    assert!(text.contains("has no executable etcd"), "{text}");
    assert!(text.contains("SEINODE_TLS_CONTROL_PLANE_BIN_DIR"), "{text}");
    std::fs::remove_dir_all(dir).unwrap();
}

#[test]
fn a_directory_that_is_not_a_control_planes_is_never_wiped() {
    let dir = common::temp_path("cp-foreign");
    std::fs::create_dir_all(&dir).unwrap();
    std::fs::write(dir.join("precious.txt"), "keep me").unwrap();
    let err = runtime()
        .block_on(ControlPlane::start(ControlPlaneConfig {
            dir: Some(dir.clone()),
            binaries: Some(real_binaries()),
            ..ControlPlaneConfig::default()
        }))
        .expect_err("foreign directory");
    assert!(matches!(err, ControlPlaneError::ForeignDir { .. }), "{err}");
    assert_eq!(
        std::fs::read_to_string(dir.join("precious.txt")).unwrap(),
        "keep me"
    );
    std::fs::remove_dir_all(dir).unwrap();
}
