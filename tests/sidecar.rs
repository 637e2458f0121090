//! The TLS path end to end: the controller's own client calls the sidecar through its front
//! door. The nodes' Pods run (real kube-rbac-proxy, the seictl stand-in) and reach Running
//! through it: the controller submits `mark-ready` with its client certificate. Then the
//! controller is pointed at a stand-in HTTPS server on loopback that serves the certificate
//! under test — exactly what a rogue Pod answering in the node's name with the Secret's own
//! certificate would be — through an address override, while the pod's DNS name still drives
//! SNI and verification.

#![allow(clippy::expect_used, clippy::unwrap_used)]

mod common;

use std::sync::OnceLock;
use std::time::Duration;

use k8s_openapi::api::core::v1::Secret;
use k8s_openapi::api::events::v1::Event;
use kube::Client;
use kube::api::{Api, ListParams, Patch, PatchParams, PostParams};
use rustls::pki_types::pem::PemObject;
use seinode_tls_controller::sidecar::SidecarAddresses;
use seinode_tls_crds::SeiNode;
use seinode_tls_devcluster::standin::StandInSidecar;
use seinode_tls_testkit::{CertificateAuthority, Issued, LeafSpec};
use serde_json::json;

const WAIT: Duration = Duration::from_secs(30);
/// Headers that carry credentials.
const CREDENTIAL_HEADERS: [&str; 3] = ["authorization", "proxy-authorization", "cookie"];

struct Shared {
    addresses: SidecarAddresses,
}

/// This binary's controller: probes every second, with address overrides.
fn controller() -> &'static Shared {
    static SHARED: OnceLock<Shared> = OnceLock::new();
    SHARED.get_or_init(|| {
        let addresses = common::pod_addresses();
        common::spawn_controller(seinode_tls_controller::ControllerConfig {
            sidecar_addresses: addresses.clone(),
            sidecar_probe_interval: Duration::from_secs(1),
            sidecar_probe_timeout: Duration::from_secs(2),
            ..common::test_controller_config()
        });
        Shared { addresses }
    })
}

fn pod_host(ns: &str) -> String {
    format!("rpc-0.rpc.{ns}.svc.cluster.local")
}

fn issue(ca: &CertificateAuthority, names: &[&str]) -> Issued {
    issue_valid_for(ca, names, None)
}

fn issue_valid_for(ca: &CertificateAuthority, names: &[&str], days: Option<i64>) -> Issued {
    ca.issue(&LeafSpec {
        common_name: "rpc",
        dns_names: names,
        server: true,
        valid_days: days,
        ..LeafSpec::default()
    })
    .unwrap()
}

fn contract_cert(ca: &CertificateAuthority, ns: &str) -> Issued {
    let service = format!("rpc.{ns}.svc.cluster.local");
    issue(ca, &[&service, &pod_host(ns)])
}

/// A contract certificate of 30 days ([`contract_cert`]'s run 90), so that
/// [`nodes_leaf_is`] tells the two apart whenever they were issued.
fn rotated_contract_cert(ca: &CertificateAuthority, ns: &str, first: &Issued) -> Issued {
    let service = format!("rpc.{ns}.svc.cluster.local");
    let rotated = issue_valid_for(ca, &[&service, &pod_host(ns)], Some(30));
    assert_ne!(
        x509_not_after(&first.cert_pem),
        x509_not_after(&rotated.cert_pem),
        "the rotated certificate must be told apart by its notAfter"
    );
    rotated
}

fn secret(ns: &str, leaf: &Issued, ca_crt: Option<&str>) -> Secret {
    seinode_tls_testkit::tls_secret(ns, "rpc-tls", &leaf.cert_pem, &leaf.key_pem, ca_crt)
}

async fn put_secret(client: &Client, secret: &Secret) {
    let api: Api<Secret> = Api::namespaced(
        client.clone(),
        secret.metadata.namespace.as_deref().unwrap(),
    );
    api.patch(
        "rpc-tls",
        &PatchParams::apply("sidecar-test").force(),
        &Patch::Apply(secret),
    )
    .await
    .unwrap();
}

/// A Running TLS node `rpc` whose Secret holds `leaf` (and `ca_crt`): its real pod made ready
/// by the controller's `mark-ready`; from then on probed at `addr`, if given.
async fn running_node(
    client: &Client,
    ns: &str,
    leaf: &Issued,
    ca_crt: Option<&str>,
    addr: Option<std::net::SocketAddr>,
) -> Api<SeiNode> {
    put_secret(client, &secret(ns, leaf, ca_crt)).await;
    let node: SeiNode = serde_json::from_value(json!({
        "apiVersion": "sei.io/v1alpha1", "kind": "SeiNode", "metadata": {"name": "rpc", "namespace": ns},
        "spec": {"chainId": "arctic-1", "image": "ghcr.io/sei-protocol/sei:v6.3.0", "fullNode": {},
                 "sidecar": {"tls": {"secretName": "rpc-tls"}}},
    }))
    .unwrap();
    let nodes: Api<SeiNode> = Api::namespaced(client.clone(), ns);
    nodes.create(&PostParams::default(), &node).await.unwrap();
    let sts: Api<k8s_openapi::api::apps::v1::StatefulSet> = Api::namespaced(client.clone(), ns);
    let (_, applied) = common::poll(
        WAIT,
        || async { sts.get_opt("rpc").await.unwrap() },
        Option::is_some,
    )
    .await;
    assert!(applied, "the plan applied the StatefulSet");
    common::wait_stateful_set_ready(client, ns, "rpc").await;
    let (node, running) = common::poll(
        WAIT,
        || async { nodes.get("rpc").await.unwrap() },
        |n| {
            n.status.as_ref().and_then(|s| s.phase) == Some(seinode_tls_crds::SeiNodePhase::Running)
        },
    )
    .await;
    assert!(running, "not Running: {:?}", node.status);
    if let Some(addr) = addr {
        controller().addresses.set(&pod_host(ns), addr);
    }
    nodes
}

fn sidecar_ready(node: &SeiNode) -> Option<(String, String, String)> {
    let c = node
        .status
        .as_ref()?
        .conditions
        .as_ref()?
        .iter()
        .find(|c| c.type_ == "SidecarReady")?;
    Some((c.status.clone(), c.reason.clone(), c.message.clone()))
}

async fn wait_sidecar(nodes: &Api<SeiNode>, status: &str, reason: &str) -> String {
    let (node, ok) = common::poll(
        WAIT,
        || async { nodes.get("rpc").await.unwrap() },
        |n| sidecar_ready(n).is_some_and(|(s, r, _)| s == status && r == reason),
    )
    .await;
    assert!(
        ok,
        "SidecarReady never became {status} {reason}: {:?}",
        sidecar_ready(&node)
    );
    sidecar_ready(&node).unwrap().2
}

/// Whether the node's condition was set after the Secret held `leaf` (its TLS message names the
/// new notAfter), so a True from before the rotation does not count.
fn nodes_leaf_is(node: &SeiNode, leaf: &Issued) -> bool {
    let not_after = x509_not_after(&leaf.cert_pem);
    node.status
        .as_ref()
        .and_then(|s| s.conditions.as_ref())
        .is_some_and(|conditions| {
            conditions
                .iter()
                .any(|c| c.type_ == "SidecarTLSSecretReady" && c.message.contains(&not_after))
        })
}

fn x509_not_after(cert_pem: &str) -> String {
    let der = rustls::pki_types::CertificateDer::from_pem_slice(cert_pem.as_bytes()).unwrap();
    let (_, cert) = x509_parser::parse_x509_certificate(&der).unwrap();
    jiff::Timestamp::from_second(cert.validity().not_after.timestamp())
        .unwrap()
        .to_string()
}

async fn setup(prefix: &str) -> (Client, String) {
    controller();
    let client = common::client().await;
    let ns = common::namespace(&client, prefix).await;
    (client, ns)
}

#[tokio::test]
async fn a_healthy_sidecar_behind_the_secrets_certificate_is_ready_and_is_sent_no_credential() {
    let (client, ns) = setup("sc-healthy").await;
    let ca = CertificateAuthority::new("fleet issuer").unwrap();
    let leaf = contract_cert(&ca, &ns);
    let stand_in = StandInSidecar::start(&leaf.cert_pem, &leaf.key_pem)
        .await
        .unwrap();
    // Pinned: no ca.crt in the Secret and no bundle configured.
    let nodes = running_node(&client, &ns, &leaf, None, Some(stand_in.addr())).await;
    let message = wait_sidecar(&nodes, "True", "SidecarHealthy").await;
    assert!(
        message.contains(&format!("https://{}:", pod_host(&ns))),
        "{message}"
    );
    // The node may have been probed healthy at its real pod before the override: wait for the
    // stand-in's own probes.
    let (requests, probed) =
        common::poll(WAIT, || async { stand_in.requests() }, |r| !r.is_empty()).await;
    assert!(probed, "the stand-in was never probed");
    for request in &requests {
        assert_eq!(
            (request.method.as_str(), request.path.as_str()),
            ("GET", "/v0/healthz")
        );
        assert!(
            !request
                .headers
                .iter()
                .any(|(k, _)| CREDENTIAL_HEADERS.contains(&k.as_str())),
            "{request:?}"
        );
    }

    let events: Api<Event> = Api::namespaced(client.clone(), &ns);
    let (found, ok) = common::poll(
        WAIT,
        || async { events.list(&ListParams::default()).await.unwrap().items },
        |items| {
            items
                .iter()
                .any(|e| e.reason.as_deref() == Some("SidecarReady"))
        },
    )
    .await;
    assert!(ok, "no SidecarReady event: {found:?}");
}

#[tokio::test]
async fn a_server_presenting_another_certificate_is_a_certificate_mismatch() {
    let (client, ns) = setup("sc-mismatch").await;
    let ca = CertificateAuthority::new("fleet issuer").unwrap();
    let in_secret = contract_cert(&ca, &ns);
    // Same names, same issuer, but not the Secret's leaf: say, the pre-rotation certificate.
    let old = contract_cert(&ca, &ns);
    let stand_in = StandInSidecar::start(&old.cert_pem, &old.key_pem)
        .await
        .unwrap();
    let nodes = running_node(&client, &ns, &in_secret, None, Some(stand_in.addr())).await;
    let message = wait_sidecar(&nodes, "False", "SidecarCertificateMismatch").await;
    assert!(
        message.contains("not the leaf in the node's Secret"),
        "{message}"
    );

    // With ca.crt the handshake verifies, and the leaf comparison still reports the mismatch.
    put_secret(&client, &secret(&ns, &in_secret, Some(&ca.cert_pem()))).await;
    let (node, ok) = common::poll(
        WAIT,
        || async { nodes.get("rpc").await.unwrap() },
        |n| {
            sidecar_ready(n).is_some_and(|(s, r, m)| {
                s == "False"
                    && r == "SidecarCertificateMismatch"
                    && m.contains("answered 200 with a certificate that is not the leaf")
            })
        },
    )
    .await;
    assert!(ok, "with ca.crt: {:?}", sidecar_ready(&node));
}

#[tokio::test]
async fn no_server_is_unreachable_and_an_http_500_is_unhealthy() {
    let (client, ns) = setup("sc-down").await;
    let ca = CertificateAuthority::new("fleet issuer").unwrap();
    let leaf = contract_cert(&ca, &ns);
    let stand_in = StandInSidecar::start(&leaf.cert_pem, &leaf.key_pem)
        .await
        .unwrap();
    stand_in.set_status(500);
    let nodes = running_node(&client, &ns, &leaf, None, Some(stand_in.addr())).await;
    let message = wait_sidecar(&nodes, "False", "SidecarUnhealthy").await;
    assert!(message.contains("answered HTTP 500"), "{message}");

    let closed = {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        listener.local_addr().unwrap()
    };
    controller().addresses.set(&pod_host(&ns), closed);
    let message = wait_sidecar(&nodes, "False", "SidecarUnreachable").await;
    assert!(message.contains("is unreachable"), "{message}");
}

#[tokio::test]
async fn a_certificate_without_the_pod_name_fails_the_handshake() {
    let (client, ns) = setup("sc-name").await;
    let ca = CertificateAuthority::new("fleet issuer").unwrap();
    let leaf = contract_cert(&ca, &ns);
    let service_only = issue(&ca, &[&format!("rpc.{ns}.svc.cluster.local")]);
    let stand_in = StandInSidecar::start(&service_only.cert_pem, &service_only.key_pem)
        .await
        .unwrap();
    for ca_crt in [Some(ca.cert_pem()), None] {
        let nodes = if ca_crt.is_some() {
            running_node(
                &client,
                &ns,
                &leaf,
                ca_crt.as_deref(),
                Some(stand_in.addr()),
            )
            .await
        } else {
            put_secret(&client, &secret(&ns, &leaf, None)).await;
            Api::namespaced(client.clone(), &ns)
        };
        let message = wait_sidecar(&nodes, "False", "SidecarTLSHandshakeFailed").await;
        assert!(message.contains("TLS handshake with"), "{message}");
        assert!(
            message.to_lowercase().contains("not valid for name"),
            "{message}"
        );
    }
}

#[tokio::test]
async fn rotating_the_secret_and_the_served_certificate_together_returns_to_ready() {
    let (client, ns) = setup("sc-rotate").await;
    let ca = CertificateAuthority::new("fleet issuer").unwrap();
    let first = contract_cert(&ca, &ns);
    let stand_in = StandInSidecar::start(&first.cert_pem, &first.key_pem)
        .await
        .unwrap();
    // With ca.crt (trust by CA): a rotation keeps the trust anchor, so only the leaf tells.
    let ca_pem = ca.cert_pem();
    let nodes = running_node(&client, &ns, &first, Some(&ca_pem), Some(stand_in.addr())).await;
    wait_sidecar(&nodes, "True", "SidecarHealthy").await;

    let second = rotated_contract_cert(&ca, &ns, &first);
    stand_in
        .set_certificate(&second.cert_pem, &second.key_pem)
        .await
        .unwrap();
    put_secret(&client, &secret(&ns, &second, Some(&ca_pem))).await;
    // A probe may land between the two changes (a mismatch); the end state is healthy again.
    let (node, ok) = common::poll(
        WAIT,
        || async { nodes.get("rpc").await.unwrap() },
        |n| {
            let leaf_now = nodes_leaf_is(n, &second);
            leaf_now
                && sidecar_ready(n).is_some_and(|(s, r, _)| s == "True" && r == "SidecarHealthy")
        },
    )
    .await;
    assert!(
        ok,
        "not back to ready after the rotation: {:?}",
        sidecar_ready(&node)
    );
}

/// The leaf certificate the server at `addr` presents for `server_name`, as PEM (openssl).
fn served_leaf(addr: std::net::SocketAddr, server_name: &str) -> Option<String> {
    let connect = std::process::Command::new("openssl")
        .args([
            "s_client",
            "-connect",
            &addr.to_string(),
            "-servername",
            server_name,
        ])
        .stdin(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .output()
        .ok()?;
    let mut x509 = std::process::Command::new("openssl")
        .arg("x509")
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::null())
        .spawn()
        .ok()?;
    use std::io::Write;
    x509.stdin.take()?.write_all(&connect.stdout).ok()?;
    let out = x509.wait_with_output().ok()?;
    out.status
        .success()
        .then(|| String::from_utf8_lossy(&out.stdout).into_owned())
}

#[tokio::test]
async fn a_rotated_secret_reaches_the_real_kube_rbac_proxy_and_the_probe_follows() {
    let (client, ns) = setup("sc-rotate-real").await;
    let ca = CertificateAuthority::new("fleet issuer").unwrap();
    let first = contract_cert(&ca, &ns);
    // Pinned (no ca.crt): the probe accepts exactly the Secret's leaf, so it tells which one
    // the proxy serves. The node's real Pod is probed at the IP the API reports.
    let nodes = running_node(&client, &ns, &first, None, None).await;
    let pods: Api<k8s_openapi::api::core::v1::Pod> = Api::namespaced(client.clone(), &ns);
    let ip: std::net::IpAddr = pods
        .get("rpc-0")
        .await
        .unwrap()
        .status
        .and_then(|s| s.pod_ip)
        .expect("the node's Pod runs")
        .parse()
        .unwrap();
    let proxy = std::net::SocketAddr::new(ip, 8443);
    wait_sidecar(&nodes, "True", "SidecarHealthy").await;
    assert_eq!(
        served_leaf(proxy, &pod_host(&ns)).as_deref(),
        Some(first.cert_pem.as_str())
    );

    // Rotate: the kubelet swaps the mounted files, kube-rbac-proxy reloads them, the probe
    // (pinned to the new leaf) follows. A mismatch may show only while the proxy still serves
    // the old certificate.
    let second = rotated_contract_cert(&ca, &ns, &first);
    put_secret(&client, &secret(&ns, &second, None)).await;
    let (node, ok) = common::poll(
        Duration::from_secs(120),
        || async {
            let serving_second =
                served_leaf(proxy, &pod_host(&ns)).as_deref() == Some(second.cert_pem.as_str());
            (serving_second, nodes.get("rpc").await.unwrap())
        },
        |(serving_second, node)| {
            *serving_second
                && nodes_leaf_is(node, &second)
                && sidecar_ready(node).is_some_and(|(s, r, _)| s == "True" && r == "SidecarHealthy")
        },
    )
    .await;
    assert!(
        ok,
        "the probe did not follow the rotation (proxy serving the new leaf: {}): {:?}",
        node.0,
        sidecar_ready(&node.1)
    );
}

/// The status of `url` requested with `headers`, as a replay of what a rogue server recorded
/// (less the headers curl sets itself).
fn replay(url: &str, headers: &[(String, String)]) -> String {
    let replayed: Vec<(String, String)> = headers
        .iter()
        .filter(|(name, _)| {
            !["host", "content-length", "accept", "user-agent"].contains(&name.as_str())
        })
        .cloned()
        .collect();
    common::http_status(url, &replayed)
}

#[tokio::test]
async fn a_rogue_pod_in_the_nodes_name_collects_nothing_that_authenticates_anywhere() {
    let (client, ns) = setup("sc-rogue").await;
    let ca = CertificateAuthority::new("fleet issuer").unwrap();
    // The rogue: whoever may create Pods in the namespace can take the node's hostname and
    // serve the Secret's own certificate; the controller is pointed at it, as DNS would.
    let leaf = contract_cert(&ca, &ns);
    let rogue = StandInSidecar::start(&leaf.cert_pem, &leaf.key_pem)
        .await
        .unwrap();
    let nodes = running_node(
        &client,
        &ns,
        &leaf,
        Some(&ca.cert_pem()),
        Some(rogue.addr()),
    )
    .await;
    wait_sidecar(&nodes, "True", "SidecarHealthy").await;
    // The rogue says the sidecar forgot mark-ready: the controller submits the task to it, as
    // it would to a restarted sidecar.
    rogue.set_status(503);
    let (recorded, called) = common::poll(
        WAIT,
        || async { rogue.requests() },
        |r| {
            r.iter()
                .any(|r| r.method == "POST" && r.path == "/v0/tasks")
        },
    )
    .await;
    assert!(called, "the rogue got the task call: {recorded:?}");
    for request in &recorded {
        assert!(
            !request
                .headers
                .iter()
                .any(|(k, _)| CREDENTIAL_HEADERS.contains(&k.as_str())),
            "the controller sent a credential: {request:?}"
        );
    }

    // The real kube-rbac-proxy, in the node's running Pod (the rogue only took its name), and the
    // API server: what the rogue collected gets it nowhere past health.
    let pods: Api<k8s_openapi::api::core::v1::Pod> = Api::namespaced(client.clone(), &ns);
    let ip = pods
        .get("rpc-0")
        .await
        .unwrap()
        .status
        .and_then(|s| s.pod_ip)
        .expect("the node's Pod runs");
    let api_server = common::control_plane().server().to_owned();
    for request in &recorded {
        assert_eq!(
            replay(&format!("https://{ip}:8443/v0/status"), &request.headers),
            "401"
        );
        let to_api = replay(
            &format!("{api_server}/api/v1/namespaces/{ns}/secrets"),
            &request.headers,
        );
        assert!(
            to_api == "401" || to_api == "403",
            "the API server answered {to_api}"
        );
    }
    // And the real proxy does let the probe's health check through without a credential.
    assert_eq!(replay(&format!("https://{ip}:8443/v0/healthz"), &[]), "200");
}

/// `kubectl create token` for ServiceAccount `name` in `ns`: a token of the API server's
/// audience, what an operator's kubeconfig sends (on EKS, `aws eks get-token`).
fn token(ns: &str, name: &str) -> String {
    let out = common::kubectl(&["create", "token", name, "-n", ns, "--duration=10m"], "");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).unwrap().trim().to_owned()
}

/// Operators reach their node's sidecar through the front door with their own identity: a
/// grant on `seinodetasks` for the node gets 2xx and the sidecar sees exactly that caller;
/// without the grant 403; without a token 401.
#[tokio::test]
async fn an_operator_granted_seinodetasks_reaches_the_sidecar_others_do_not() {
    let (client, ns) = setup("sc-operator").await;
    let ca = CertificateAuthority::new("fleet issuer").unwrap();
    let leaf = contract_cert(&ca, &ns);
    running_node(&client, &ns, &leaf, Some(&ca.cert_pem()), None).await;
    let yaml = format!(
        "apiVersion: v1\nkind: ServiceAccount\nmetadata: {{name: operator, namespace: {ns}}}\n---\n\
         apiVersion: v1\nkind: ServiceAccount\nmetadata: {{name: bystander, namespace: {ns}}}\n---\n\
         apiVersion: rbac.authorization.k8s.io/v1\nkind: Role\nmetadata: {{name: rpc-tasks, namespace: {ns}}}\n\
         rules: [{{apiGroups: [sei.io], resources: [seinodetasks], resourceNames: [rpc], verbs: [create, get]}}]\n---\n\
         apiVersion: rbac.authorization.k8s.io/v1\nkind: RoleBinding\nmetadata: {{name: rpc-tasks, namespace: {ns}}}\n\
         roleRef: {{apiGroup: rbac.authorization.k8s.io, kind: Role, name: rpc-tasks}}\n\
         subjects: [{{kind: ServiceAccount, name: operator, namespace: {ns}}}]\n"
    );
    let out = common::kubectl(&["apply", "-f", "-"], &yaml);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );

    let pods: Api<k8s_openapi::api::core::v1::Pod> = Api::namespaced(client.clone(), &ns);
    let pod = pods.get("rpc-0").await.unwrap();
    let ip = pod.status.as_ref().and_then(|s| s.pod_ip.clone()).unwrap();
    let url = format!("https://{ip}:8443/v0/status");
    let bearer = |token: &str| vec![("Authorization".to_owned(), format!("Bearer {token}"))];
    // RBAC may take a moment to reach the proxy's SubjectAccessReview.
    let operator = token(&ns, "operator");
    let (status, granted) = common::poll(
        WAIT,
        || async { common::http_status(&url, &bearer(&operator)) },
        |status| status == "200",
    )
    .await;
    assert!(granted, "the operator got {status}");
    assert_eq!(
        common::http_status(&url, &bearer(&token(&ns, "bystander"))),
        "403"
    );
    assert_eq!(common::http_status(&url, &[]), "401");
    // A caller's own X-Remote-User is overwritten by the proxy, not appended to it.
    let mut forged = bearer(&operator);
    forged.push(("X-Remote-User".to_owned(), "system:admin".to_owned()));
    assert_eq!(common::http_status(&url, &forged), "200");

    // The sidecar saw the operator, exactly once per request, never the forged name.
    let log = common::cluster()
        .container_log(&pod, "sei-sidecar")
        .expect("the cluster runs Pods");
    let text = std::fs::read_to_string(&log).unwrap();
    let caller = format!("caller \"system:serviceaccount:{ns}:operator\"");
    let statuses: Vec<&str> = text
        .lines()
        .filter(|l| l.contains("GET /v0/status"))
        .collect();
    assert!(
        statuses.len() >= 2
            && statuses
                .iter()
                .all(|l| l.contains("x-remote-user headers: 1") && l.contains(&caller)),
        "{statuses:#?}"
    );
    assert!(!text.contains("system:admin"), "{text}");
}
