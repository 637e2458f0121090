//! The offline commands as a platform engineer runs them: output and exit status.

#![allow(clippy::expect_used, clippy::unwrap_used)]

mod common;

use std::process::Output;

use base64::Engine;
use base64::engine::general_purpose::STANDARD as BASE64;
use seinode_tls_testkit::{CertificateAuthority, LeafSpec};
use serde_json::Value;

fn run(args: &[&str], stdin: &str) -> Output {
    common::seinode_tls(args, stdin)
}

fn secret_yaml(dns_names: &[&str]) -> String {
    let ca = CertificateAuthority::new("test CA").unwrap();
    let leaf = ca
        .issue(&LeafSpec {
            common_name: "rpc",
            dns_names,
            server: true,
            ..LeafSpec::default()
        })
        .unwrap();
    format!(
        "apiVersion: v1\nkind: Secret\nmetadata:\n  name: rpc-tls\n  namespace: sei\ntype: kubernetes.io/tls\n\
         data:\n  tls.crt: {}\n  tls.key: {}\n",
        BASE64.encode(&leaf.cert_pem),
        BASE64.encode(&leaf.key_pem)
    )
}

const NODE: [&str; 4] = ["--seinode", "rpc", "--namespace", "sei"];

#[test]
fn contract_prints_a_cert_manager_certificate_and_refuses_flags_that_do_not_fit() {
    let out = run(
        &[
            "contract",
            "--seinode",
            "rpc",
            "-n",
            "sei",
            "-o",
            "certificate",
            "--issuer",
            "sei-ca",
        ],
        "",
    );
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let yaml = String::from_utf8(out.stdout).unwrap();
    for line in [
        "kind: Certificate",
        "secretName: rpc-sidecar-tls",
        "- rpc.sei.svc.cluster.local",
        "- rpc-0.rpc.sei.svc.cluster.local",
        "name: sei-ca",
    ] {
        assert!(yaml.contains(line), "{line:?} in:\n{yaml}");
    }

    for (args, expected) in [
        (&["-o", "certificate"][..], "--issuer"),
        (&["--issuer", "sei-ca"][..], "go with --output certificate"),
        (
            &["-o", "certificate", "--issuer", "x", "--duration", "30m"][..],
            "shorter than the 1h",
        ),
    ] {
        let mut all = vec!["contract", "--seinode", "rpc", "-n", "sei"];
        all.extend(args);
        let out = run(&all, "");
        assert_eq!(out.status.code(), Some(2), "{args:?}");
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(stderr.contains(expected), "{args:?}: {stderr}");
    }
}

#[test]
fn contract_and_check_secret_refuse_a_node_name_the_webhook_would_deny() {
    let long = "n".repeat(53);
    for node in ["rpc.east", long.as_str()] {
        for args in [
            vec!["contract", "--seinode", node, "-n", "sei"],
            vec!["check-secret", "-f", "-", "--seinode", node, "-n", "sei"],
        ] {
            let out = run(&args, "");
            assert_eq!(out.status.code(), Some(2), "{args:?}");
            let stderr = String::from_utf8_lossy(&out.stderr);
            assert!(stderr.contains("could never run"), "{args:?}: {stderr}");
        }
    }
}

#[test]
fn contract_prints_one_name_per_line_or_json() {
    let text = run(&["contract", "--seinode", "rpc", "-n", "sei"], "");
    assert!(text.status.success());
    assert_eq!(
        String::from_utf8(text.stdout).unwrap(),
        "rpc.sei.svc.cluster.local\nrpc-0.rpc.sei.svc.cluster.local\n"
    );
    let json = run(
        &[
            "contract",
            "--seinode",
            "rpc",
            "-n",
            "sei",
            "--cluster-domain",
            "fleet.internal",
            "-o",
            "json",
        ],
        "",
    );
    let value: Value = serde_json::from_slice(&json.stdout).unwrap();
    assert_eq!(
        value["requiredDNSNames"][1],
        "rpc-0.rpc.sei.svc.fleet.internal"
    );
}

#[test]
fn check_secret_exits_0_for_a_secret_that_meets_the_contract() {
    let yaml = secret_yaml(&[
        "rpc.sei.svc.cluster.local",
        "rpc-0.rpc.sei.svc.cluster.local",
    ]);
    let out = run(&[&["check-secret", "-f", "-"][..], &NODE].concat(), &yaml);
    let stdout = String::from_utf8(out.stdout).unwrap();
    assert_eq!(out.status.code(), Some(0), "{stdout}");
    assert!(
        stdout.starts_with("TLSSecretReady: Secret \"sei/rpc-tls\" meets the contract"),
        "{stdout}"
    );
}

#[test]
fn check_secret_exits_1_and_names_the_missing_sans() {
    let yaml = secret_yaml(&["rpc.sei.svc.cluster.local"]);
    let path = common::temp_path("secret").with_extension("yaml");
    std::fs::write(&path, &yaml).unwrap();
    let out = run(
        &[
            &["check-secret", "-f", path.to_str().unwrap(), "-o", "json"][..],
            &NODE,
        ]
        .concat(),
        "",
    );
    std::fs::remove_file(&path).unwrap();
    assert_eq!(out.status.code(), Some(1));
    let value: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(value["ready"], false);
    assert_eq!(value["reason"], "TLSSecretSANsMismatch");
    assert_eq!(
        value["missingDNSNames"],
        serde_json::json!(["rpc-0.rpc.sei.svc.cluster.local"])
    );
    assert!(
        value["message"]
            .as_str()
            .unwrap()
            .contains("it carries rpc.sei.svc.cluster.local"),
        "{value}"
    );
}

#[test]
fn check_secret_at_a_later_instant_reports_expiry() {
    let yaml = secret_yaml(&[
        "rpc.sei.svc.cluster.local",
        "rpc-0.rpc.sei.svc.cluster.local",
    ]);
    let out = run(
        &[
            &["check-secret", "-f", "-", "--at", "9000-01-01T00:00:00Z"][..],
            &NODE,
        ]
        .concat(),
        &yaml,
    );
    assert_eq!(out.status.code(), Some(1));
    assert!(
        String::from_utf8(out.stdout)
            .unwrap()
            .starts_with("TLSSecretExpired: ")
    );
}

#[test]
fn check_secret_exits_2_on_unreadable_input_with_a_clear_message() {
    let garbage = run(&[&["check-secret", "-f", "-"][..], &NODE].concat(), "{[");
    assert_eq!(garbage.status.code(), Some(2));
    assert!(
        String::from_utf8(garbage.stderr)
            .unwrap()
            .starts_with("error: stdin is not a YAML or JSON document")
    );

    let missing = run(
        &[
            &["check-secret", "-f", "/nonexistent/secret.yaml"][..],
            &NODE,
        ]
        .concat(),
        "",
    );
    assert_eq!(missing.status.code(), Some(2));
    let stderr = String::from_utf8(missing.stderr).unwrap();
    assert!(
        stderr.contains("failed to read /nonexistent/secret.yaml: No such file"),
        "{stderr}"
    );

    let configmap = run(
        &[&["check-secret", "-f", "-"][..], &NODE].concat(),
        "apiVersion: v1\nkind: ConfigMap\n",
    );
    assert_eq!(configmap.status.code(), Some(2));

    let other_ns = secret_yaml(&["x"]).replace("namespace: sei", "namespace: other");
    let out = run(
        &[&["check-secret", "-f", "-"][..], &NODE].concat(),
        &other_ns,
    );
    assert_eq!(out.status.code(), Some(2));
    assert!(
        String::from_utf8(out.stderr)
            .unwrap()
            .contains("can only use a Secret in its own namespace")
    );

    let bad_at = run(
        &[&["check-secret", "-f", "-", "--at", "yesterday"][..], &NODE].concat(),
        "",
    );
    assert_eq!(bad_at.status.code(), Some(2));
}

#[test]
fn check_secret_takes_exactly_one_of_a_name_or_a_file() {
    let neither = run(&[&["check-secret"][..], &NODE].concat(), "");
    assert_eq!(neither.status.code(), Some(2));
    let stderr = String::from_utf8(neither.stderr).unwrap();
    assert!(stderr.contains("<SECRET|--filename <FILE>>"), "{stderr}");
    let both = run(
        &[&["check-secret", "rpc-tls", "-f", "-"][..], &NODE].concat(),
        "",
    );
    assert_eq!(both.status.code(), Some(2));
    let stderr = String::from_utf8(both.stderr).unwrap();
    assert!(stderr.contains("cannot be used with"), "{stderr}");
}

#[test]
fn contract_and_check_secret_print_yaml_too() {
    let out = run(
        &["contract", "--seinode", "rpc", "-n", "sei", "-o", "yaml"],
        "",
    );
    assert!(out.status.success());
    let yaml = String::from_utf8(out.stdout).unwrap();
    assert!(
        yaml.starts_with("---\n") && yaml.ends_with('\n'),
        "{yaml:?}"
    );
    let value: Value = serde_saphyr::from_str(&yaml).unwrap();
    assert_eq!(value["requiredDNSNames"][0], "rpc.sei.svc.cluster.local");

    let secret = secret_yaml(&["rpc.sei.svc.cluster.local"]);
    let out = run(
        &[&["check-secret", "-f", "-", "-o", "yaml"][..], &NODE].concat(),
        &secret,
    );
    assert_eq!(out.status.code(), Some(1));
    let value: Value = serde_saphyr::from_str(&String::from_utf8(out.stdout).unwrap()).unwrap();
    assert_eq!(value["reason"], "TLSSecretSANsMismatch");
    assert_eq!(
        value["missingDNSNames"][0],
        "rpc-0.rpc.sei.svc.cluster.local"
    );
}

#[test]
fn the_commands_that_read_the_cluster_exit_5_with_one_line_when_there_is_no_cluster() {
    let missing = common::temp_path("kubeconfig");
    let missing = missing.to_str().unwrap();
    // A kubeconfig whose server nothing listens on (port 9 on loopback: discard, closed here).
    let unreachable = common::temp_path("kubeconfig-unreachable");
    std::fs::write(
        &unreachable,
        "apiVersion: v1\nkind: Config\nclusters:\n- name: c\n  cluster:\n    server: https://127.0.0.1:9\n\
         users:\n- name: u\n  user:\n    token: t\ncontexts:\n- name: x\n  context:\n    cluster: c\n    user: u\n\
         current-context: x\n",
    )
    .unwrap();
    for kubeconfig in [missing, unreachable.to_str().unwrap()] {
        for args in [
            &["check-secret", "rpc-tls", "--seinode", "rpc", "-n", "sei"][..],
            &["status", "rpc", "-n", "sei"],
            &["check"],
        ] {
            let mut args = args.to_vec();
            args.extend(["--kubeconfig", kubeconfig, "--request-timeout", "5s"]);
            let out = run(&args, "");
            let stderr = String::from_utf8(out.stderr).unwrap();
            assert_eq!(out.status.code(), Some(5), "{args:?}: {stderr}");
            assert!(
                stderr.starts_with("error: ") && stderr.lines().count() == 1,
                "{args:?}: {stderr}"
            );
            assert!(out.stdout.is_empty(), "{args:?}");
        }
    }
    std::fs::remove_file(&unreachable).unwrap();
    // A context the kubeconfig does not have.
    let out = run(
        &[
            "status",
            "rpc",
            "-n",
            "sei",
            "--context",
            "nope",
            "--kubeconfig",
            "/dev/null",
        ],
        "",
    );
    assert_eq!(out.status.code(), Some(5));
}

#[test]
fn completion_prints_a_script_that_knows_the_commands() {
    for shell in ["bash", "zsh", "fish", "powershell", "elvish"] {
        let out = run(&["completion", shell], "");
        assert!(out.status.success(), "{shell}");
        let script = String::from_utf8(out.stdout).unwrap();
        for command in ["check-secret", "status", "check", "contract"] {
            assert!(script.contains(command), "{shell}: {command}");
        }
    }
    let out = run(&["completion", "tcsh"], "");
    assert_eq!(out.status.code(), Some(2));
}

#[test]
fn every_command_documents_its_exit_status() {
    let top = run(&["--help"], "");
    let help = String::from_utf8(top.stdout).unwrap();
    assert!(help.contains("Exit status of every command"), "{help}");
    for command in [
        "crd",
        "contract",
        "check-secret",
        "status",
        "check",
        "completion",
    ] {
        let out = run(&[command, "--help"], "");
        let help = String::from_utf8(out.stdout).unwrap();
        assert!(out.status.success(), "{command}");
        assert!(help.contains("Exit status: 0"), "{command}: {help}");
    }
    for (command, codes) in [
        (
            "check-secret",
            &[
                "1 when it does not",
                "3 when the Secret does not exist",
                "4 when reading it is forbidden",
            ][..],
        ),
        (
            "status",
            &[
                "0 when the node is Ready",
                "3 when the SeiNode does not exist",
            ],
        ),
        ("check", &["1 when one failed"]),
    ] {
        let help = String::from_utf8(run(&[command, "--help"], "").stdout).unwrap();
        for code in codes {
            assert!(help.contains(code), "{command}: {code:?} in {help}");
        }
    }
}
