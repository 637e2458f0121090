//! What the project emits for cert-manager, against cert-manager's real CRDs (fetched from its
//! Go module; its controllers cannot be built here): the Certificate `seinode-tls contract
//! --output certificate` prints is accepted by the schema, and a Secret issued for exactly its
//! names passes `check-secret`.

#![allow(clippy::expect_used, clippy::unwrap_used)]

mod common;

use std::process::Output;

fn text(bytes: &[u8]) -> String {
    String::from_utf8_lossy(bytes).into_owned()
}

/// `kubectl apply --server-side --dry-run=server` of `yaml` into `ns`.
fn dry_run(ns: &str, yaml: &str) -> Output {
    common::kubectl(
        &[
            "apply",
            "--server-side",
            "--dry-run=server",
            "-n",
            ns,
            "-f",
            "-",
        ],
        yaml,
    )
}

#[tokio::test(flavor = "multi_thread")]
async fn the_printed_certificate_is_valid_for_cert_manager_and_its_secret_meets_the_contract() {
    common::install_cert_manager_crds();
    let client = common::client().await;
    let ns = common::namespace(&client, "cert-manager").await;

    for extra in [
        &[][..],
        &[
            "--issuer-kind",
            "ClusterIssuer",
            "--duration",
            "90d",
            "--renew-before",
            "15d",
        ][..],
    ] {
        let mut args = vec!["contract", "--seinode", "rpc", "-n", &ns];
        args.extend(["--output", "certificate", "--issuer", "sei-ca"]);
        args.extend(extra);
        let out = common::seinode_tls(&args, "");
        assert!(out.status.success(), "{}", text(&out.stderr));
        let yaml = text(&out.stdout);
        let applied = dry_run(&ns, &yaml);
        assert!(
            applied.status.success(),
            "cert-manager's schema refuses {yaml}: {}",
            text(&applied.stderr)
        );
        assert!(
            text(&applied.stdout).contains("certificate.cert-manager.io/rpc-sidecar-tls"),
            "{}",
            text(&applied.stdout)
        );
    }

    // The schema is real: a usage cert-manager does not know is refused.
    let out = common::seinode_tls(
        &[
            "contract",
            "--seinode",
            "rpc",
            "-n",
            &ns,
            "-o",
            "certificate",
            "--issuer",
            "x",
        ],
        "",
    );
    let broken = text(&out.stdout).replace("server auth", "serverAuth");
    assert!(
        !dry_run(&ns, &broken).status.success(),
        "an unknown usage passes"
    );

    // A Secret issued for exactly the Certificate's dnsNames meets the contract.
    let certificate: serde_json::Value = serde_saphyr::from_str(&text(&out.stdout)).unwrap();
    let names: Vec<String> = certificate["spec"]["dnsNames"]
        .as_array()
        .unwrap()
        .iter()
        .map(|n| n.as_str().unwrap().to_owned())
        .collect();
    let dns: Vec<&str> = names.iter().map(String::as_str).collect();
    let ca = seinode_tls_testkit::CertificateAuthority::new("cert-manager stand-in CA").unwrap();
    let leaf = ca
        .issue(&seinode_tls_testkit::LeafSpec {
            common_name: "rpc",
            dns_names: &dns,
            server: true,
            ..Default::default()
        })
        .unwrap();
    let secret_name = certificate["spec"]["secretName"].as_str().unwrap();
    let secret = seinode_tls_testkit::tls_secret(
        &ns,
        secret_name,
        &leaf.cert_pem,
        &leaf.key_pem,
        Some(&ca.cert_pem()),
    );
    let manifest = serde_json::to_string(&secret).unwrap();
    let checked = common::seinode_tls(
        &["check-secret", "-f", "-", "--seinode", "rpc", "-n", &ns],
        &manifest,
    );
    assert!(
        checked.status.success(),
        "{}{}",
        text(&checked.stdout),
        text(&checked.stderr)
    );
}
