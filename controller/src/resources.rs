//! The objects the controller creates for a node, built purely from the SeiNode and the config.
//! All carry an owner reference to the node and the managed-by label the watches select on.
//! No certificate object anywhere: the TLS Secret is the operator's.

use std::collections::BTreeMap;

use k8s_openapi::api::apps::v1::{StatefulSet, StatefulSetSpec};
use k8s_openapi::api::core::v1::{
    Capabilities, ConfigMap, ConfigMapProjection, ConfigMapVolumeSource, Container, ContainerPort,
    DownwardAPIProjection, DownwardAPIVolumeFile, EmptyDirVolumeSource, EnvVar, HTTPGetAction,
    KeyToPath, ObjectFieldSelector, PersistentVolumeClaim, PersistentVolumeClaimSpec,
    PersistentVolumeClaimVolumeSource, PodSecurityContext, PodSpec, PodTemplateSpec, Probe,
    ProjectedVolumeSource, SeccompProfile, SecretVolumeSource, SecurityContext, Service,
    ServiceAccountTokenProjection, ServicePort, ServiceSpec, TCPSocketAction, Volume, VolumeMount,
    VolumeProjection, VolumeResourceRequirements,
};
use k8s_openapi::apimachinery::pkg::api::resource::Quantity;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{LabelSelector, ObjectMeta, OwnerReference};
use k8s_openapi::apimachinery::pkg::util::intstr::IntOrString;
use kube::{Resource, ResourceExt};
use seinode_tls_crds::{DEFAULT_SIDECAR_PORT, SeiNode};

use crate::config::{ControllerConfig, SIDECAR_BYPASS_PATHS, SIDECAR_HEALTH_PATH};
use crate::image::check_image;

/// Label every created object carries; the controller's watches select on it.
pub const MANAGED_BY_LABEL: &str = "app.kubernetes.io/managed-by";
pub const MANAGED_BY: &str = "seinode-tls";
/// Label that ties pods to their node (also the Service and StatefulSet selector).
pub const NODE_LABEL: &str = "sei.io/node";
/// Port of kube-rbac-proxy, the node's TLS front door (the Service's port `api`).
pub const TLS_PORT: i32 = seinode_tls_crds::contract::PROXY_PORT;
/// Names of the node pod's containers.
pub const SEID_CONTAINER: &str = "seid";
pub const SIDECAR_CONTAINER: &str = "sei-sidecar";
pub const PROXY_CONTAINER: &str = "kube-rbac-proxy";
/// Name of the proxy's port (TLS nodes) and of the sidecar's (nodes without TLS).
pub const API_PORT_NAME: &str = "api";
pub const SIDECAR_PORT_NAME: &str = "sidecar";
/// seictl's authentication mode variable, and the mode that binds it to loopback behind the
/// proxy (any other value than this or `unauthenticated` stops seictl at start).
pub const SIDECAR_AUTHN_MODE_ENV: &str = "SEI_SIDECAR_AUTHN_MODE";
pub const SIDECAR_AUTHN_TRUSTED_HEADER: &str = "trusted-header";
/// Where the TLS Secret and the proxy configuration are mounted in the proxy container.
const TLS_MOUNT: &str = "/etc/sidecar-tls";
const PROXY_CONFIG_MOUNT: &str = "/etc/kube-rbac-proxy";
/// Keys of the proxy's ConfigMap.
const PROXY_CONFIG_FILE: &str = "config.yaml";
const PROXY_CLIENT_CA_FILE: &str = "client-ca.crt";
/// Volume names.
const DATA_VOLUME: &str = "data";
const TMP_VOLUME: &str = "tmp";
const TLS_VOLUME: &str = "sidecar-tls";
const PROXY_CONFIG_VOLUME: &str = "rbac-proxy-config";
const PROXY_API_ACCESS_VOLUME: &str = "rbac-proxy-api-access";
/// Home (data directory) of seid and the sidecar, as upstream has it.
const SEI_HOME: &str = "/sei";
/// UID and GID of every container, and the group that owns mounted volumes (the TLS key among
/// them): the non-root user of seictl's and kube-rbac-proxy's images.
const NONROOT_ID: i64 = 65532;
/// Where in-cluster clients look for the ServiceAccount token, CA and namespace.
const SERVICE_ACCOUNT_MOUNT: &str = "/var/run/secrets/kubernetes.io/serviceaccount";
/// Lifetime of kube-rbac-proxy's token, as the API server's own automount uses (the kubelet
/// renews it at 80 %).
const PROXY_TOKEN_SECONDS: i64 = 3607;
/// Size of the data volume the StatefulSet claims when no PVC is imported.
const DEFAULT_DATA_SIZE: &str = "500Gi";

/// Name of the kube-rbac-proxy authorization ConfigMap of a node.
pub fn rbac_proxy_config_name(node: &SeiNode) -> String {
    format!("{}-rbac-proxy-config", node.name_any())
}

fn labels(node: &SeiNode) -> BTreeMap<String, String> {
    BTreeMap::from([
        ("app.kubernetes.io/name".to_owned(), "seinode".to_owned()),
        ("app.kubernetes.io/instance".to_owned(), node.name_any()),
        (MANAGED_BY_LABEL.to_owned(), MANAGED_BY.to_owned()),
        (NODE_LABEL.to_owned(), node.name_any()),
    ])
}

fn selector(node: &SeiNode) -> BTreeMap<String, String> {
    BTreeMap::from([(NODE_LABEL.to_owned(), node.name_any())])
}

fn owner(node: &SeiNode) -> Vec<OwnerReference> {
    node.controller_owner_ref(&()).into_iter().collect()
}

fn metadata(node: &SeiNode, name: String) -> ObjectMeta {
    ObjectMeta {
        name: Some(name),
        namespace: node.namespace(),
        labels: Some(labels(node)),
        owner_references: Some(owner(node)),
        ..ObjectMeta::default()
    }
}

/// The sidecar's port: `spec.sidecar.port`, else seictl's default.
pub fn sidecar_port(node: &SeiNode) -> i32 {
    node.spec
        .sidecar
        .as_ref()
        .map_or(DEFAULT_SIDECAR_PORT, |s| s.port)
}

/// kube-rbac-proxy's authorization config: a caller may use the sidecar of node N when it may
/// `create` (POST) or `get` (GET) `seinodetasks.sei.io` named N in N's namespace, as upstream
/// and the fleet's RBAC have it (SubjectAccessReview by the proxy, which needs the node pods'
/// ServiceAccount bound to `system:auth-delegator`). With `client_ca`, the CA the proxy trusts
/// for client certificates (the controller's own identity) rides along as `client-ca.crt`.
pub fn rbac_proxy_config_map(node: &SeiNode, client_ca: Option<&str>) -> ConfigMap {
    // kube-rbac-proxy v0.19.1 reads the group from `apiGroup`; the verb follows the method.
    let config = format!(
        "authorization:\n  resourceAttributes:\n    apiGroup: sei.io\n    resource: seinodetasks\n    \
         namespace: {ns}\n    name: {name}\n",
        ns = node.namespace().unwrap_or_default(),
        name = node.name_any(),
    );
    let mut data = BTreeMap::from([(PROXY_CONFIG_FILE.to_owned(), config)]);
    if let Some(ca) = client_ca {
        data.insert(PROXY_CLIENT_CA_FILE.to_owned(), ca.to_owned());
    }
    ConfigMap {
        metadata: metadata(node, rbac_proxy_config_name(node)),
        data: Some(data),
        ..ConfigMap::default()
    }
}

/// The headless Service `N`: the name the certificate covers. With TLS it exposes only the
/// proxy (`api`, 8443); without, the sidecar's port. Not-ready addresses are published: the
/// controller reaches a pod that is not ready yet to submit the tasks that make it ready.
pub fn service(node: &SeiNode) -> Service {
    let (name, port) = if node.sidecar_tls().is_some() {
        (API_PORT_NAME, TLS_PORT)
    } else {
        (SIDECAR_PORT_NAME, sidecar_port(node))
    };
    Service {
        metadata: metadata(node, node.name_any()),
        spec: Some(ServiceSpec {
            cluster_ip: Some("None".to_owned()),
            selector: Some(selector(node)),
            ports: Some(vec![ServicePort {
                name: Some(name.to_owned()),
                port,
                target_port: Some(IntOrString::Int(port)),
                protocol: Some("TCP".to_owned()),
                ..ServicePort::default()
            }]),
            publish_not_ready_addresses: Some(true),
            ..ServiceSpec::default()
        }),
        ..Service::default()
    }
}

/// The StatefulSet `N`: one replica, laid out as upstream's pod (see
/// `docs/architecture.md`): seictl and, with TLS, kube-rbac-proxy as native sidecars, then seid,
/// which starts once the sidecar is ready. With TLS the sidecar listens on loopback in
/// trusted-header mode and the proxy, holding the Secret, is its only door. Every container
/// meets the restricted Pod Security level. `client_ca`: the proxy trusts it for client
/// certificates (see [`rbac_proxy_config_map`]). Fails on an invalid image.
pub fn stateful_set(
    node: &SeiNode,
    config: &ControllerConfig,
    client_ca: bool,
) -> Result<StatefulSet, String> {
    let sidecar_image = node
        .spec
        .sidecar
        .as_ref()
        .and_then(|s| s.image.clone())
        .filter(|image| !image.is_empty())
        .unwrap_or_else(|| config.sidecar_image.clone());
    check_image(&node.spec.image).map_err(|e| format!("spec.image: {e}"))?;
    check_image(&sidecar_image).map_err(|e| format!("spec.sidecar.image: {e}"))?;
    seinode_tls_crds::contract::check_sidecar_port(sidecar_port(node))?;

    let mut init_containers = vec![sidecar_container(node, sidecar_image, config)];
    let mut volumes = vec![Volume {
        name: TMP_VOLUME.to_owned(),
        empty_dir: Some(EmptyDirVolumeSource::default()),
        ..Volume::default()
    }];
    if let Some(tls) = node.sidecar_tls() {
        check_image(&config.rbac_proxy_image).map_err(|e| format!("--rbac-proxy-image: {e}"))?;
        init_containers.push(proxy_container(node, &config.rbac_proxy_image, client_ca));
        volumes.extend(proxy_volumes(node, &tls.secret_name));
    }
    let (data, volume_claim_templates) = data_volume(node);
    volumes.extend(data);

    // User labels first, so the system labels (and the selector) win.
    let mut pod_labels = node.spec.pod_labels.clone().unwrap_or_default();
    pod_labels.extend(labels(node));

    Ok(StatefulSet {
        metadata: metadata(node, node.name_any()),
        spec: Some(StatefulSetSpec {
            replicas: Some(1),
            service_name: Some(node.name_any()),
            selector: LabelSelector {
                match_labels: Some(selector(node)),
                match_expressions: None,
            },
            template: PodTemplateSpec {
                metadata: Some(ObjectMeta {
                    labels: Some(pod_labels),
                    ..ObjectMeta::default()
                }),
                spec: Some(PodSpec {
                    init_containers: Some(init_containers),
                    containers: vec![seid_container(node)],
                    volumes: Some(volumes),
                    service_account_name: config.node_service_account.clone(),
                    // Only kube-rbac-proxy talks to the API server (TokenReview and
                    // SubjectAccessReview); seid and the sidecar, whose images the SeiNode's
                    // author chooses, get no token (`rbac-proxy-api-access` is the proxy's).
                    automount_service_account_token: Some(false),
                    security_context: Some(PodSecurityContext {
                        run_as_non_root: Some(true),
                        fs_group: Some(NONROOT_ID),
                        // A large data volume is not chowned on every start.
                        fs_group_change_policy: Some("OnRootMismatch".to_owned()),
                        seccomp_profile: Some(runtime_default_seccomp()),
                        ..PodSecurityContext::default()
                    }),
                    ..PodSpec::default()
                }),
            },
            volume_claim_templates,
            ..StatefulSetSpec::default()
        }),
        ..StatefulSet::default()
    })
}

/// What the restricted Pod Security level asks of every container: non-root, no privilege
/// escalation, no capabilities, the runtime's seccomp profile; and a read-only root filesystem.
fn restricted() -> SecurityContext {
    SecurityContext {
        run_as_non_root: Some(true),
        run_as_user: Some(NONROOT_ID),
        run_as_group: Some(NONROOT_ID),
        allow_privilege_escalation: Some(false),
        read_only_root_filesystem: Some(true),
        capabilities: Some(Capabilities {
            drop: Some(vec!["ALL".to_owned()]),
            add: None,
        }),
        seccomp_profile: Some(runtime_default_seccomp()),
        ..SecurityContext::default()
    }
}

fn runtime_default_seccomp() -> SeccompProfile {
    SeccompProfile {
        type_: "RuntimeDefault".to_owned(),
        localhost_profile: None,
    }
}

fn env(name: &str, value: impl Into<String>) -> EnvVar {
    EnvVar {
        name: name.to_owned(),
        value: Some(value.into()),
        ..EnvVar::default()
    }
}

fn mount(name: &str, path: &str, read_only: bool) -> VolumeMount {
    VolumeMount {
        name: name.to_owned(),
        mount_path: path.to_owned(),
        read_only: read_only.then_some(true),
        ..VolumeMount::default()
    }
}

/// An HTTP(S) GET probe of `path` on `port`.
fn http_probe(path: &str, port: i32, scheme: &str, period: i32, failures: i32) -> Probe {
    Probe {
        http_get: Some(HTTPGetAction {
            path: Some(path.to_owned()),
            port: IntOrString::Int(port),
            scheme: Some(scheme.to_owned()),
            ..HTTPGetAction::default()
        }),
        period_seconds: Some(period),
        failure_threshold: Some(failures),
        ..Probe::default()
    }
}

/// seictl (`seictl serve`), a native sidecar: it runs before seid and for the pod's whole life.
/// With TLS it binds loopback and takes the caller's identity from kube-rbac-proxy
/// (`trusted-header`); the kubelet cannot reach it there, so its probes are the proxy's.
/// Without TLS it listens on every interface, unauthenticated, as upstream's plain nodes do.
fn sidecar_container(node: &SeiNode, image: String, config: &ControllerConfig) -> Container {
    let port = sidecar_port(node);
    let tls = node.sidecar_tls().is_some();
    let mut env = vec![
        env("SEI_CHAIN_ID", node.spec.chain_id.clone()),
        env("SEI_SIDECAR_PORT", port.to_string()),
        env("SEI_HOME", SEI_HOME),
    ];
    for (name, value) in config.sidecar_platform.env() {
        if !value.is_empty() {
            env.push(self::env(name, value));
        }
    }
    if tls {
        env.push(env_authn_trusted_header());
    }
    Container {
        name: SIDECAR_CONTAINER.to_owned(),
        image: Some(image),
        command: Some(vec!["seictl".to_owned(), "serve".to_owned()]),
        restart_policy: Some("Always".to_owned()),
        env: Some(env),
        ports: (!tls).then(|| {
            vec![ContainerPort {
                name: Some(SIDECAR_PORT_NAME.to_owned()),
                container_port: port,
                protocol: Some("TCP".to_owned()),
                ..ContainerPort::default()
            }]
        }),
        liveness_probe: (!tls).then(|| http_probe("/v0/livez", port, "HTTP", 10, 3)),
        readiness_probe: (!tls).then(|| http_probe(SIDECAR_HEALTH_PATH, port, "HTTP", 5, 6)),
        resources: node.spec.sidecar.as_ref().and_then(|s| s.resources.clone()),
        volume_mounts: Some(vec![
            mount(DATA_VOLUME, SEI_HOME, false),
            mount(TMP_VOLUME, "/tmp", false),
        ]),
        security_context: Some(restricted()),
        ..Container::default()
    }
}

fn env_authn_trusted_header() -> EnvVar {
    env(SIDECAR_AUTHN_MODE_ENV, SIDECAR_AUTHN_TRUSTED_HEADER)
}

/// kube-rbac-proxy on :8443, a native sidecar: TLS with the node's Secret, authentication
/// (the caller's token by TokenReview, or a client certificate of `--client-ca-file`),
/// authorization on `seinodetasks` (SubjectAccessReview), and the caller's identity forwarded
/// as `X-Remote-User`. The four bypass paths pass unauthenticated: the kubelet's probes and
/// Prometheus carry no token, and the controller's probe sends none.
fn proxy_container(node: &SeiNode, image: &str, client_ca: bool) -> Container {
    let mut args = vec![
        format!("--secure-listen-address=0.0.0.0:{TLS_PORT}"),
        format!("--upstream=http://127.0.0.1:{}/", sidecar_port(node)),
        format!("--tls-cert-file={TLS_MOUNT}/tls.crt"),
        format!("--tls-private-key-file={TLS_MOUNT}/tls.key"),
        "--tls-min-version=VersionTLS12".to_owned(),
        format!("--config-file={PROXY_CONFIG_MOUNT}/{PROXY_CONFIG_FILE}"),
        format!("--ignore-paths={}", SIDECAR_BYPASS_PATHS.join(",")),
        "--auth-header-fields-enabled=true".to_owned(),
    ];
    if client_ca {
        args.push(format!(
            "--client-ca-file={PROXY_CONFIG_MOUNT}/{PROXY_CLIENT_CA_FILE}"
        ));
    }
    Container {
        name: PROXY_CONTAINER.to_owned(),
        image: Some(image.to_owned()),
        restart_policy: Some("Always".to_owned()),
        args: Some(args),
        ports: Some(vec![ContainerPort {
            name: Some(API_PORT_NAME.to_owned()),
            container_port: TLS_PORT,
            protocol: Some("TCP".to_owned()),
            ..ContainerPort::default()
        }]),
        startup_probe: Some(Probe {
            tcp_socket: Some(TCPSocketAction {
                port: IntOrString::Int(TLS_PORT),
                host: None,
            }),
            period_seconds: Some(2),
            failure_threshold: Some(60),
            ..Probe::default()
        }),
        liveness_probe: Some(http_probe("/v0/livez", TLS_PORT, "HTTPS", 10, 3)),
        readiness_probe: Some(http_probe(SIDECAR_HEALTH_PATH, TLS_PORT, "HTTPS", 5, 6)),
        volume_mounts: Some(vec![
            mount(TLS_VOLUME, TLS_MOUNT, true),
            mount(PROXY_CONFIG_VOLUME, PROXY_CONFIG_MOUNT, true),
            mount(PROXY_API_ACCESS_VOLUME, SERVICE_ACCOUNT_MOUNT, true),
        ]),
        security_context: Some(restricted()),
        ..Container::default()
    }
}

/// seid, started once the sidecar answers `/v0/healthz` with 200 (after `mark-ready`), as
/// upstream's pod does: the sidecar's tasks prepare the node before seid reads its home. The
/// wait asks the sidecar on loopback (a bypass path, so no identity is needed in either mode).
fn seid_container(node: &SeiNode) -> Container {
    let script = format!(
        "echo 'waiting for the sidecar to become ready'; \
         until (exec 3<>/dev/tcp/127.0.0.1/{port} && \
         printf 'GET {SIDECAR_HEALTH_PATH} HTTP/1.0\\r\\nHost: localhost\\r\\n\\r\\n' >&3 && \
         head -n 1 <&3 | grep -q ' 200 ') 2>/dev/null; do sleep 2; done; \
         echo 'sidecar ready, starting seid'; exec seid start --home {SEI_HOME}",
        port = sidecar_port(node),
    );
    Container {
        name: SEID_CONTAINER.to_owned(),
        image: Some(node.spec.image.clone()),
        command: Some(vec!["/bin/bash".to_owned(), "-c".to_owned(), script]),
        env: Some(vec![env("HOME", SEI_HOME)]),
        volume_mounts: Some(vec![
            mount(DATA_VOLUME, SEI_HOME, false),
            mount(TMP_VOLUME, "/tmp", false),
        ]),
        security_context: Some(restricted()),
        ..Container::default()
    }
}

/// The Secret, the proxy's configuration and its API access.
fn proxy_volumes(node: &SeiNode, secret_name: &str) -> [Volume; 3] {
    [
        Volume {
            name: TLS_VOLUME.to_owned(),
            secret: Some(SecretVolumeSource {
                secret_name: Some(secret_name.to_owned()),
                // Read-only for the owner and the pod's fsGroup: the proxy runs as non-root.
                default_mode: Some(0o440),
                ..SecretVolumeSource::default()
            }),
            ..Volume::default()
        },
        Volume {
            name: PROXY_CONFIG_VOLUME.to_owned(),
            config_map: Some(ConfigMapVolumeSource {
                name: rbac_proxy_config_name(node),
                ..ConfigMapVolumeSource::default()
            }),
            ..Volume::default()
        },
        proxy_api_access(),
    ]
}

/// The data volume: the imported PVC, or a claim template of [`DEFAULT_DATA_SIZE`].
fn data_volume(node: &SeiNode) -> (Option<Volume>, Option<Vec<PersistentVolumeClaim>>) {
    let imported = node
        .spec
        .data_volume
        .as_ref()
        .and_then(|d| d.import.as_ref());
    match imported {
        Some(import) => (
            Some(Volume {
                name: DATA_VOLUME.to_owned(),
                persistent_volume_claim: Some(PersistentVolumeClaimVolumeSource {
                    claim_name: import.pvc_name.clone(),
                    read_only: None,
                }),
                ..Volume::default()
            }),
            None,
        ),
        None => (
            None,
            Some(vec![PersistentVolumeClaim {
                metadata: ObjectMeta {
                    name: Some(DATA_VOLUME.to_owned()),
                    ..ObjectMeta::default()
                },
                spec: Some(PersistentVolumeClaimSpec {
                    access_modes: Some(vec!["ReadWriteOnce".to_owned()]),
                    resources: Some(VolumeResourceRequirements {
                        requests: Some(BTreeMap::from([(
                            "storage".to_owned(),
                            Quantity(DEFAULT_DATA_SIZE.to_owned()),
                        )])),
                        ..VolumeResourceRequirements::default()
                    }),
                    ..PersistentVolumeClaimSpec::default()
                }),
                ..PersistentVolumeClaim::default()
            }]),
        ),
    }
}

/// What the API server's automount would give every container, for kube-rbac-proxy alone: a
/// token of the pod's ServiceAccount (default audience), the cluster's CA and the namespace.
fn proxy_api_access() -> Volume {
    Volume {
        name: PROXY_API_ACCESS_VOLUME.to_owned(),
        projected: Some(ProjectedVolumeSource {
            default_mode: Some(0o444),
            sources: Some(vec![
                VolumeProjection {
                    service_account_token: Some(ServiceAccountTokenProjection {
                        path: "token".to_owned(),
                        expiration_seconds: Some(PROXY_TOKEN_SECONDS),
                        audience: None,
                    }),
                    ..VolumeProjection::default()
                },
                VolumeProjection {
                    config_map: Some(ConfigMapProjection {
                        name: "kube-root-ca.crt".to_owned(),
                        items: Some(vec![KeyToPath {
                            key: "ca.crt".to_owned(),
                            path: "ca.crt".to_owned(),
                            mode: None,
                        }]),
                        optional: None,
                    }),
                    ..VolumeProjection::default()
                },
                VolumeProjection {
                    downward_api: Some(DownwardAPIProjection {
                        items: Some(vec![DownwardAPIVolumeFile {
                            path: "namespace".to_owned(),
                            field_ref: Some(ObjectFieldSelector {
                                api_version: Some("v1".to_owned()),
                                field_path: "metadata.namespace".to_owned(),
                            }),
                            ..DownwardAPIVolumeFile::default()
                        }]),
                    }),
                    ..VolumeProjection::default()
                },
            ]),
        }),
        ..Volume::default()
    }
}

/// Whether a StatefulSet has rolled out: its controller saw the current spec, a replica is
/// ready, and no update is pending.
pub fn stateful_set_ready(sts: &StatefulSet) -> bool {
    let generation = sts.metadata.generation.unwrap_or_default();
    let Some(status) = sts.status.as_ref() else {
        return false;
    };
    let observed = status.observed_generation.unwrap_or_default() >= generation;
    let ready = status.ready_replicas.unwrap_or_default() >= 1;
    let updated = match (&status.current_revision, &status.update_revision) {
        (Some(current), Some(update)) => current == update,
        _ => true,
    };
    observed && ready && updated
}

/// The seid image the StatefulSet runs.
pub fn stateful_set_image(sts: &StatefulSet) -> Option<String> {
    sts.spec
        .as_ref()?
        .template
        .spec
        .as_ref()?
        .containers
        .iter()
        .find(|c| c.name == SEID_CONTAINER)?
        .image
        .clone()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn node(tls: bool) -> SeiNode {
        let mut value = serde_json::json!({
            "apiVersion": "sei.io/v1alpha1", "kind": "SeiNode",
            "metadata": {"name": "rpc", "namespace": "pacific-1", "uid": "u"},
            "spec": {"chainId": "pacific-1", "image": "ghcr.io/sei-protocol/sei:v6.3.0", "fullNode": {}},
        });
        if tls {
            value["spec"]["sidecar"] = serde_json::json!({"tls": {"secretName": "rpc-tls"}});
        }
        serde_json::from_value(value).unwrap_or_else(|e| panic!("node: {e}"))
    }

    fn pod_spec(node: &SeiNode) -> PodSpec {
        pod_spec_with(node, &ControllerConfig::default(), true)
    }

    fn pod_spec_with(node: &SeiNode, config: &ControllerConfig, client_ca: bool) -> PodSpec {
        stateful_set(node, config, client_ca)
            .ok()
            .and_then(|s| s.spec)
            .and_then(|s| s.template.spec)
            .unwrap_or_default()
    }

    fn all_containers(spec: &PodSpec) -> Vec<&Container> {
        spec.init_containers
            .iter()
            .flatten()
            .chain(&spec.containers)
            .collect()
    }

    fn container<'a>(spec: &'a PodSpec, name: &str) -> &'a Container {
        all_containers(spec)
            .into_iter()
            .find(|c| c.name == name)
            .unwrap_or_else(|| panic!("no container {name}"))
    }

    fn init_names(spec: &PodSpec) -> Vec<&str> {
        spec.init_containers
            .iter()
            .flatten()
            .map(|c| c.name.as_str())
            .collect()
    }

    fn env_of(container: &Container) -> BTreeMap<String, String> {
        container
            .env
            .iter()
            .flatten()
            .map(|e| (e.name.clone(), e.value.clone().unwrap_or_default()))
            .collect()
    }

    fn mounts_token(container: &Container) -> bool {
        container
            .volume_mounts
            .iter()
            .flatten()
            .any(|m| m.mount_path == SERVICE_ACCOUNT_MOUNT)
    }

    #[test]
    fn only_kube_rbac_proxy_gets_a_service_account_token() {
        let spec = pod_spec(&node(true));
        assert_eq!(spec.automount_service_account_token, Some(false));
        let with_token: Vec<&str> = all_containers(&spec)
            .into_iter()
            .filter(|c| mounts_token(c))
            .map(|c| c.name.as_str())
            .collect();
        assert_eq!(with_token, [PROXY_CONTAINER]);
        let volume = spec
            .volumes
            .iter()
            .flatten()
            .find(|v| v.name == PROXY_API_ACCESS_VOLUME)
            .and_then(|v| v.projected.clone())
            .unwrap_or_default();
        let token = volume
            .sources
            .iter()
            .flatten()
            .find_map(|s| s.service_account_token.clone());
        assert!(
            token.is_some_and(|t| t.audience.is_none()),
            "a token for the API server itself (TokenReview, SubjectAccessReview)"
        );
    }

    /// The pod seictl's contract describes: the sidecar behind the proxy in trusted-header
    /// mode, the proxy's bypass paths, forwarded identity, probes and client CA.
    #[test]
    fn a_tls_pod_puts_seictl_in_trusted_header_mode_behind_kube_rbac_proxy() {
        let spec = pod_spec(&node(true));
        let init = init_names(&spec);
        assert_eq!(init, [SIDECAR_CONTAINER, PROXY_CONTAINER]);
        for name in init {
            let restart = container(&spec, name).restart_policy.as_deref();
            assert_eq!(restart, Some("Always"), "{name} is a native sidecar");
        }
        let sidecar = container(&spec, SIDECAR_CONTAINER);
        assert_eq!(
            sidecar.command.as_deref(),
            Some(&["seictl".to_owned(), "serve".to_owned()][..])
        );
        let env = env_of(sidecar);
        assert_eq!(
            env.get("SEI_SIDECAR_AUTHN_MODE").map(String::as_str),
            Some("trusted-header")
        );
        assert_eq!(
            env.get("SEI_SIDECAR_PORT").map(String::as_str),
            Some("7777")
        );
        assert_eq!(env.get("SEI_HOME").map(String::as_str), Some("/sei"));
        assert_eq!(
            env.get("SEI_CHAIN_ID").map(String::as_str),
            Some("pacific-1")
        );
        assert!(
            !env.contains_key("SEI_SIDECAR_LISTEN_ADDRESS"),
            "seictl never reads it"
        );
        assert!(sidecar.ports.is_none() && sidecar.readiness_probe.is_none());

        let proxy = container(&spec, PROXY_CONTAINER);
        let args = proxy.args.clone().unwrap_or_default();
        for expected in [
            "--ignore-paths=/v0/healthz,/v0/startupz,/v0/livez,/v0/metrics",
            "--auth-header-fields-enabled=true",
            "--upstream=http://127.0.0.1:7777/",
            "--client-ca-file=/etc/kube-rbac-proxy/client-ca.crt",
            "--tls-min-version=VersionTLS12",
        ] {
            assert!(args.iter().any(|a| a == expected), "{expected} in {args:?}");
        }
        assert!(
            !args.iter().any(|a| a.starts_with("--auth-token-audiences")),
            "operators' tokens carry the API server's audience: {args:?}"
        );
        let get = |probe: &Option<Probe>| {
            let http = probe.as_ref().and_then(|p| p.http_get.as_ref());
            http.map(|h| (h.path.clone().unwrap_or_default(), h.scheme.clone()))
        };
        assert_eq!(
            get(&proxy.liveness_probe),
            Some(("/v0/livez".to_owned(), Some("HTTPS".to_owned())))
        );
        assert_eq!(
            get(&proxy.readiness_probe),
            Some(("/v0/healthz".to_owned(), Some("HTTPS".to_owned())))
        );
        assert!(
            proxy
                .startup_probe
                .as_ref()
                .is_some_and(|p| p.tcp_socket.is_some())
        );

        let seid = container(&spec, SEID_CONTAINER);
        let script = seid.command.clone().unwrap_or_default().join(" ");
        assert!(
            script.contains("/dev/tcp/127.0.0.1/7777") && script.contains("/v0/healthz"),
            "seid waits for the sidecar: {script}"
        );
        assert!(script.ends_with("exec seid start --home /sei"), "{script}");
    }

    #[test]
    fn the_sidecar_gets_the_platform_variables_seictl_requires_when_configured() {
        let config = ControllerConfig {
            sidecar_platform: crate::config::SidecarPlatform {
                genesis_bucket: "genesis".to_owned(),
                genesis_region: "us-east-2".to_owned(),
                snapshot_bucket: "snapshots".to_owned(),
                snapshot_region: "us-east-2".to_owned(),
            },
            ..ControllerConfig::default()
        };
        let spec = pod_spec_with(&node(true), &config, true);
        let env = env_of(container(&spec, SIDECAR_CONTAINER));
        for (name, value) in config.sidecar_platform.env() {
            assert_eq!(env.get(name).map(String::as_str), Some(value), "{name}");
        }
        let bare = env_of(container(&pod_spec(&node(true)), SIDECAR_CONTAINER));
        assert!(
            !bare.contains_key("SEI_GENESIS_BUCKET"),
            "unset values are left out"
        );
    }

    #[test]
    fn the_client_ca_is_trusted_only_when_the_controller_has_one() {
        let without = pod_spec_with(&node(true), &ControllerConfig::default(), false);
        let args = container(&without, PROXY_CONTAINER)
            .args
            .clone()
            .unwrap_or_default();
        assert!(!args.iter().any(|a| a.starts_with("--client-ca-file")));

        let config = rbac_proxy_config_map(&node(true), Some("-----BEGIN CERTIFICATE-----"));
        let data = config.data.unwrap_or_default();
        assert_eq!(
            data.get("config.yaml").map(String::as_str),
            Some(
                "authorization:\n  resourceAttributes:\n    apiGroup: sei.io\n    \
                 resource: seinodetasks\n    namespace: pacific-1\n    name: rpc\n"
            )
        );
        assert!(data.contains_key("client-ca.crt"));
        let bare = rbac_proxy_config_map(&node(true), None)
            .data
            .unwrap_or_default();
        assert!(!bare.contains_key("client-ca.crt"));
    }

    #[test]
    fn a_node_without_tls_runs_seictl_unauthenticated_and_gets_no_token_at_all() {
        let spec = pod_spec(&node(false));
        assert_eq!(spec.automount_service_account_token, Some(false));
        assert!(!all_containers(&spec).into_iter().any(mounts_token));
        let init = init_names(&spec);
        assert_eq!(init, [SIDECAR_CONTAINER]);
        let sidecar = container(&spec, SIDECAR_CONTAINER);
        assert!(!env_of(sidecar).contains_key("SEI_SIDECAR_AUTHN_MODE"));
        let port = sidecar
            .ports
            .iter()
            .flatten()
            .next()
            .map(|p| p.container_port);
        assert_eq!(port, Some(7777));
        assert!(sidecar.readiness_probe.is_some() && sidecar.liveness_probe.is_some());
    }

    /// Every container non-root, no privilege escalation, no capabilities, RuntimeDefault
    /// seccomp and a read-only root; no host namespaces or hostPath; the data volume is not
    /// chowned on every start.
    #[test]
    fn every_container_meets_the_restricted_pod_security_level() {
        for tls in [true, false] {
            let spec = pod_spec(&node(tls));
            let pod = spec.security_context.clone().unwrap_or_default();
            assert_eq!(pod.run_as_non_root, Some(true));
            assert_eq!(
                pod.fs_group_change_policy.as_deref(),
                Some("OnRootMismatch")
            );
            assert!(spec.host_network.is_none() && spec.host_pid.is_none());
            assert!(spec.host_ipc.is_none());
            assert!(spec.volumes.iter().flatten().all(|v| v.host_path.is_none()));
            for c in all_containers(&spec) {
                let sc = c.security_context.clone().unwrap_or_default();
                assert_eq!(sc.run_as_non_root, Some(true), "{}", c.name);
                assert_eq!(sc.allow_privilege_escalation, Some(false), "{}", c.name);
                assert_eq!(sc.read_only_root_filesystem, Some(true), "{}", c.name);
                let drop = sc.capabilities.and_then(|c| c.drop).unwrap_or_default();
                assert_eq!(drop, ["ALL"], "{}", c.name);
                let seccomp = sc.seccomp_profile.map(|p| p.type_);
                assert_eq!(seccomp.as_deref(), Some("RuntimeDefault"), "{}", c.name);
            }
        }
    }

    #[test]
    fn a_sidecar_on_the_proxys_port_is_refused_with_the_reason() {
        let mut node = node(true);
        if let Some(sidecar) = node.spec.sidecar.as_mut() {
            sidecar.port = TLS_PORT;
        }
        let error = stateful_set(&node, &ControllerConfig::default(), true)
            .err()
            .unwrap_or_default();
        assert!(error.contains("spec.sidecar.port 8443"), "{error}");
    }

    #[test]
    fn the_service_exposes_the_api_port_with_not_ready_addresses() {
        let spec = service(&node(true)).spec.unwrap_or_default();
        let ports: Vec<(Option<String>, i32)> = spec
            .ports
            .iter()
            .flatten()
            .map(|p| (p.name.clone(), p.port))
            .collect();
        assert_eq!(ports, [(Some("api".to_owned()), 8443)]);
        assert_eq!(spec.publish_not_ready_addresses, Some(true));
    }
}
