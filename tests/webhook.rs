//! The webhook registered with a real API server, driven with kubectl as a user runs it.

#![allow(clippy::expect_used, clippy::unwrap_used)]

mod common;

use std::sync::Arc;
use std::time::Duration;

use base64::Engine;
use base64::engine::general_purpose::STANDARD as BASE64;
use k8s_openapi::api::core::v1::Secret;
use kube::api::{Api, PostParams};
use rustls::pki_types::ServerName;
use rustls::pki_types::pem::PemObject;
use seinode_tls_crds::validation::InspectedSecret;
use seinode_tls_testkit::{CertificateAuthority, LeafSpec};
use seinode_tls_webhook::cache::CachedLookup;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

fn node_manifest(ns: &str, name: &str, secret: &str) -> String {
    format!(
        "apiVersion: sei.io/v1alpha1\nkind: SeiNode\nmetadata:\n  name: {name}\n  namespace: {ns}\n\
         spec:\n  chainId: arctic-1\n  image: ghcr.io/sei-protocol/sei:v6.3.0\n  sidecar:\n    tls:\n      \
         secretName: {secret}\n  fullNode: {{}}\n"
    )
}

fn tls_secret(ns: &str, name: &str, dns_names: &[&str]) -> Secret {
    let ca = CertificateAuthority::new("test issuer").unwrap();
    let leaf_spec = LeafSpec {
        common_name: "sidecar",
        dns_names,
        server: true,
        ..LeafSpec::default()
    };
    let leaf = ca.issue(&leaf_spec).unwrap();
    seinode_tls_testkit::tls_secret(ns, name, &leaf.cert_pem, &leaf.key_pem, None)
}

fn contract(ns: &str, name: &str) -> [String; 2] {
    [
        format!("{name}.{ns}.svc.cluster.local"),
        format!("{name}-0.{name}.{ns}.svc.cluster.local"),
    ]
}

fn text(bytes: &[u8]) -> String {
    String::from_utf8_lossy(bytes).into_owned()
}

/// Polls a server-side dry run of `manifest` until its stderr contains `expected`: the webhook's
/// caches follow the API server through a watch, a moment behind.
fn wait_for_dry_run_stderr(manifest: &str, expected: &str) {
    let mut last = String::new();
    let seen = common::wait_until(Duration::from_secs(15), || {
        last = text(&common::kubectl(&["apply", "--dry-run=server", "-f", "-"], manifest).stderr);
        last.contains(expected)
    });
    assert!(
        seen,
        "the webhook never answered with {expected:?}; last stderr: {last}"
    );
}

#[tokio::test]
async fn a_seinode_whose_secret_is_missing_is_created_with_a_warning() {
    common::webhook();
    let client = common::client().await;
    let ns = common::namespace(&client, "wh-missing").await;
    let out = common::kubectl(&["apply", "-f", "-"], &node_manifest(&ns, "rpc", "rpc-tls"));
    let stderr = text(&out.stderr);
    assert!(out.status.success(), "{stderr}");
    let [service, pod] = contract(&ns, "rpc");
    assert!(
        stderr.contains(&format!(
            "Warning: SeiNode \"{ns}/rpc\" will wait in Pending: Secret \"{ns}/rpc-tls\" does not exist yet"
        )),
        "{stderr}"
    );
    assert!(stderr.contains(&format!("{service}, {pod}")), "{stderr}");
    assert!(text(&out.stdout).contains("seinode.sei.io/rpc created"));
}

#[tokio::test]
async fn a_seinode_whose_secret_is_present_but_wrong_is_refused_with_the_reason() {
    common::webhook();
    let client = common::client().await;
    let ns = common::namespace(&client, "wh-wrong").await;
    let [service, pod] = contract(&ns, "rpc");
    // The certificate covers the service name only.
    let secrets: Api<Secret> = Api::namespaced(client, &ns);
    secrets
        .create(
            &PostParams::default(),
            &tls_secret(&ns, "rpc-tls", &[&service]),
        )
        .await
        .unwrap();

    let manifest = node_manifest(&ns, "rpc", "rpc-tls");
    wait_for_dry_run_stderr(&manifest, "TLSSecretSANsMismatch");
    let out = common::kubectl(&["apply", "-f", "-"], &manifest);
    let stderr = text(&out.stderr);
    assert!(!out.status.success(), "refused: {stderr}");
    assert!(
        stderr.contains("admission webhook \"seinodes.validate.sei.io\" denied the request"),
        "{stderr}"
    );
    assert!(
        stderr.contains(&format!(
            "SeiNode \"{ns}/rpc\" cannot start with this Secret: TLSSecretSANsMismatch"
        )),
        "{stderr}"
    );
    assert!(
        stderr.contains(&format!("do not cover {pod} (it carries {service})")),
        "{stderr}"
    );
    let get = common::kubectl(&["get", "snode", "rpc", "-n", &ns], "");
    assert!(!get.status.success(), "nothing was created");
}

#[tokio::test]
async fn a_patch_of_the_tls_block_is_refused() {
    common::webhook();
    let client = common::client().await;
    let ns = common::namespace(&client, "wh-patch").await;
    let out = common::kubectl(&["apply", "-f", "-"], &node_manifest(&ns, "rpc", "rpc-tls"));
    assert!(out.status.success(), "{}", text(&out.stderr));
    let patch = r#"{"spec":{"sidecar":{"tls":{"secretName":"other-tls"}}}}"#;
    let out = common::kubectl(
        &[
            "patch",
            "snode",
            "rpc",
            "-n",
            &ns,
            "--type=merge",
            "-p",
            patch,
        ],
        "",
    );
    let stderr = text(&out.stderr);
    assert!(!out.status.success());
    assert!(
        stderr.contains("spec.sidecar.tls: Forbidden: TLS is fixed when a SeiNode is created"),
        "{stderr}"
    );
    assert!(
        stderr.contains("spec.dataVolume.import.pvcName"),
        "{stderr}"
    );
}

#[tokio::test]
async fn a_server_side_dry_run_shows_the_required_names_annotation() {
    common::webhook();
    let client = common::client().await;
    let ns = common::namespace(&client, "wh-dryrun").await;
    let out = common::kubectl(
        &["apply", "--dry-run=server", "-o", "yaml", "-f", "-"],
        &node_manifest(&ns, "rpc", "rpc-tls"),
    );
    assert!(out.status.success(), "{}", text(&out.stderr));
    let [service, pod] = contract(&ns, "rpc");
    let stdout = text(&out.stdout);
    assert!(
        stdout.contains(&format!(
            "sei.io/sidecar-tls-required-dns-names: {service},{pod}"
        )),
        "{stdout}"
    );
    let get = common::kubectl(&["get", "snode", "rpc", "-n", &ns], "");
    assert!(!get.status.success(), "a dry run creates nothing");
}

#[tokio::test]
async fn a_bad_rotation_of_a_referenced_secret_prints_the_guard_warning() {
    common::webhook();
    let client = common::client().await;
    let ns = common::namespace(&client, "wh-guard").await;
    let [service, pod] = contract(&ns, "rpc");
    let secrets: Api<Secret> = Api::namespaced(client, &ns);
    secrets
        .create(
            &PostParams::default(),
            &tls_secret(&ns, "rpc-tls", &[&service, &pod]),
        )
        .await
        .unwrap();
    let out = common::kubectl(&["apply", "-f", "-"], &node_manifest(&ns, "rpc", "rpc-tls"));
    assert!(out.status.success(), "{}", text(&out.stderr));

    let rotated =
        serde_json::to_string(&tls_secret(&ns, "rpc-tls", &["elsewhere.example.com"])).unwrap();
    let expected = format!(
        "Warning: this change to Secret \"{ns}/rpc-tls\" leaves SeiNode \"rpc\" without a valid TLS \
         Secret: TLSSecretSANsMismatch (missing {service}, {pod})"
    );
    let mut last = String::new();
    let warned = common::wait_until(Duration::from_secs(15), || {
        last = text(&common::kubectl(&["apply", "--dry-run=server", "-f", "-"], &rotated).stderr);
        last.contains(&expected)
    });
    assert!(warned, "expected {expected:?}, last stderr: {last}");
    let out = common::kubectl(&["apply", "-f", "-"], &rotated);
    assert!(
        out.status.success(),
        "the guard warns by default, it does not block"
    );
    assert!(
        text(&out.stderr).contains(&expected),
        "{}",
        text(&out.stderr)
    );

    let out = common::kubectl(
        &["delete", "secret", "rpc-tls", "-n", &ns, "--dry-run=server"],
        "",
    );
    assert!(out.status.success());
    // The Secret now fails already, so deleting it is reported as leaving the node without one.
    assert!(
        text(&out.stderr).contains(&format!(
            "deleting Secret \"{ns}/rpc-tls\" leaves SeiNode \"rpc\""
        )),
        "{}",
        text(&out.stderr)
    );
}

/// POSTs `body` over TLS (trusting the control plane's CA) and returns the status and body.
async fn post_raw(path: &str, content_type: &str, body: &[u8]) -> (u16, String) {
    let ca = common::control_plane().ca().cert_pem();
    let mut roots = rustls::RootCertStore::empty();
    for cert in rustls::pki_types::CertificateDer::pem_slice_iter(ca.as_bytes()) {
        roots.add(cert.unwrap()).unwrap();
    }
    let config = rustls::ClientConfig::builder()
        .with_root_certificates(roots)
        .with_no_client_auth();
    let connector = tokio_rustls::TlsConnector::from(Arc::new(config));
    let tcp = tokio::net::TcpStream::connect(common::webhook().https)
        .await
        .unwrap();
    let mut tls = connector
        .connect(ServerName::try_from("localhost").unwrap(), tcp)
        .await
        .unwrap();
    let head = format!(
        "POST {path} HTTP/1.1\r\nHost: localhost\r\nContent-Type: {content_type}\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
        body.len()
    );
    tls.write_all(head.as_bytes()).await.unwrap();
    // The server may answer (and close) before reading an oversized body to its end.
    let _ = tls.write_all(body).await;
    let mut response = Vec::new();
    let _ = tls.read_to_end(&mut response).await;
    let response = text(&response);
    let status = response
        .get(9..12)
        .and_then(|s| s.parse().ok())
        .unwrap_or(0);
    let body = response
        .split_once("\r\n\r\n")
        .map(|(_, b)| b.to_owned())
        .unwrap_or_default();
    (status, body)
}

#[tokio::test]
async fn malformed_requests_get_a_400_and_never_take_the_server_down() {
    seinode_tls::telemetry::install_crypto_provider();
    common::webhook();
    let (status, body) = post_raw("/validate/seinodes", "application/json", b"{not json").await;
    assert_eq!(status, 400, "{body}");
    assert!(body.contains("not a JSON AdmissionReview"), "{body}");

    let v1beta1 = br#"{"apiVersion":"admission.k8s.io/v1beta1","kind":"AdmissionReview","request":{"uid":"u"}}"#;
    let (status, body) = post_raw("/validate/seinodes", "application/json", v1beta1).await;
    assert_eq!(status, 400, "{body}");
    assert!(body.contains("admissionReviewVersions: [v1]"), "{body}");

    let huge = format!("{{\"padding\":\"{}\"}}", BASE64.encode(vec![0u8; 7 << 20]));
    let (status, body) = post_raw("/validate/secrets", "application/json", huge.as_bytes()).await;
    assert_eq!(status, 400, "{body}");
    assert!(body.contains("exceeds this endpoint's limit"), "{body}");

    // Still serving the API server.
    let client = common::client().await;
    let ns = common::namespace(&client, "wh-after-bad").await;
    let out = common::kubectl(
        &["apply", "--dry-run=server", "-o", "yaml", "-f", "-"],
        &node_manifest(&ns, "rpc", "x"),
    );
    assert!(out.status.success(), "{}", text(&out.stderr));
    assert!(text(&out.stdout).contains("sei.io/sidecar-tls-required-dns-names"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_tenants_large_tls_secrets_cost_the_webhook_their_names_not_their_bytes() {
    let client = common::client().await;
    let ns = common::namespace(&client, "wh-big-secrets").await;
    let mut registry = prometheus_client::registry::Registry::default();
    let metrics = Arc::new(seinode_tls_webhook::metrics::WebhookMetrics::register(
        &mut registry,
    ));
    let (caches, watch) = seinode_tls_webhook::cache::Caches::watch(
        client.clone(),
        metrics,
        &seinode_tls_kube::watch::WatchScope::Cluster,
    );
    let watch = tokio::spawn(watch);

    // 20 valid TLS Secrets of 600 KiB each (a valid Secret may carry extra keys).
    let api: Api<Secret> = Api::namespaced(client.clone(), &ns);
    let [service, pod] = contract(&ns, "rpc");
    let names: Vec<String> = (0..20).map(|i| format!("big-{i}")).collect();
    for name in &names {
        let mut secret = tls_secret(&ns, name, &[&service, &pod]);
        secret.data.get_or_insert_default().insert(
            "padding".to_owned(),
            k8s_openapi::ByteString(vec![b'x'; 600 << 10]),
        );
        api.create(&PostParams::default(), &secret).await.unwrap();
    }
    let secrets = &caches.secrets;
    let (_, known) = common::poll(
        Duration::from_secs(30),
        || async {
            names
                .iter()
                .all(|n| !matches!(secrets.lookup(&ns, n), CachedLookup::NotFound))
        },
        |known| *known,
    )
    .await;
    assert!(known, "the metadata watch never saw the 20 Secrets");
    // Known by name and version only.
    for name in &names {
        assert!(!secrets.holds_inspection(&ns, name), "{name} was read");
        assert!(matches!(
            secrets.lookup(&ns, name),
            CachedLookup::Unavailable(seinode_tls_webhook::cache::NOT_READ)
        ));
    }

    // A new SeiNode naming one: one read, and what is kept holds no certificate bytes.
    secrets.ensure(&ns, &names[0]).await;
    let CachedLookup::Found(inspected) = secrets.lookup(&ns, &names[0]) else {
        panic!("not read: {:?}", secrets.lookup(&ns, &names[0]));
    };
    let InspectedSecret::Usable(leaf) = inspected.as_ref() else {
        panic!("{inspected:?}");
    };
    assert_eq!(leaf.dns_names, [service, pod]);
    assert!(leaf.der.is_empty() && leaf.ca_crt.is_none(), "{leaf:?}");
    assert_eq!(secrets.inspections(), 1);
    // A Secret the watch does not know is not read: the SeiNode gets the "does not exist yet"
    // warning.
    secrets.ensure(&ns, "absent").await;
    assert!(matches!(
        secrets.lookup(&ns, "absent"),
        CachedLookup::NotFound
    ));
    assert_eq!(secrets.inspections(), 1);
    watch.abort();
}

/// The webhook's and the controller's Secret read (`read_secret`) against the real API server:
/// at a version a watch reported it is served from the watch cache, never returns an older
/// Secret, and finds a deleted one gone.
#[tokio::test]
async fn a_secret_read_at_a_watched_version_is_never_older_than_it() {
    use seinode_tls_kube::versions::read_secret;

    let client = common::client().await;
    let ns = common::namespace(&client, "read-at").await;
    let cache_reads_before = secret_reads_from_watch_cache(&client).await;
    let secrets: Api<Secret> = Api::namespaced(client.clone(), &ns);
    let first = secrets
        .create(&PostParams::default(), &tls_secret(&ns, "rpc-tls", &["a"]))
        .await
        .unwrap();
    let first_version = first.metadata.resource_version.clone().unwrap();
    let read = read_secret(&secrets, "rpc-tls", Some(&first_version))
        .await
        .unwrap()
        .expect("present");
    assert_eq!(read.data, first.data);

    let mut changed = tls_secret(&ns, "rpc-tls", &["b"]);
    changed.metadata.resource_version = Some(first_version.clone());
    let second = secrets
        .replace("rpc-tls", &PostParams::default(), &changed)
        .await
        .unwrap();
    // At the version the replace returned: the cache has it (at an older version it might not
    // have it yet, and "no older than" allows the first).
    let read = read_secret(
        &secrets,
        "rpc-tls",
        second.metadata.resource_version.as_deref(),
    )
    .await
    .unwrap()
    .expect("present");
    assert_eq!(
        read.metadata.resource_version,
        second.metadata.resource_version
    );
    assert_eq!(read.data, second.data);

    secrets
        .delete("rpc-tls", &Default::default())
        .await
        .unwrap();
    // A Secret written after the delete: a cache at its version has seen the delete.
    let marker = secrets
        .create(&PostParams::default(), &tls_secret(&ns, "marker", &["m"]))
        .await
        .unwrap();
    let gone = read_secret(
        &secrets,
        "rpc-tls",
        marker.metadata.resource_version.as_deref(),
    )
    .await;
    assert!(matches!(gone, Ok(None)), "{gone:?}");
    // All three were answered by the watch cache (other tests' reads only add to the count).
    let cache_reads = secret_reads_from_watch_cache(&client).await - cache_reads_before;
    assert!(
        cache_reads >= 3,
        "{cache_reads} Secret reads from the watch cache"
    );
}

/// Reads of Secrets at a version the API server served from its watch cache, so far.
async fn secret_reads_from_watch_cache(client: &kube::Client) -> u64 {
    let request = http::Request::get("/metrics").body(Vec::new()).unwrap();
    let metrics = client.request_text(request).await.unwrap();
    let prefix = "apiserver_watch_cache_read_wait_seconds_count{";
    metrics
        .lines()
        .filter(|line| line.starts_with(prefix) && line.contains("resource=\"secrets\""))
        .filter_map(|line| line.rsplit(' ').next()?.parse::<u64>().ok())
        .sum()
}
