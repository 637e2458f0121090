//! The objects the controller creates for a node, built purely from the SeiNode and the config.
//! All carry an owner reference to the node and the managed-by label the watches select on.
//! No certificate object anywhere: the TLS Secret is the operator's.

use std::collections::BTreeMap;

use k8s_openapi::api::apps::v1::{StatefulSet, StatefulSetSpec};
use k8s_openapi::api::core::v1::{
    ConfigMap, ConfigMapProjection, ConfigMapVolumeSource, Container, ContainerPort,
    DownwardAPIProjection, DownwardAPIVolumeFile, EnvVar, KeyToPath, ObjectFieldSelector,
    PersistentVolumeClaim, PersistentVolumeClaimSpec, PersistentVolumeClaimVolumeSource,
    PodSecurityContext, PodSpec, PodTemplateSpec, Probe, ProjectedVolumeSource, SecretVolumeSource,
    Service, ServiceAccountTokenProjection, ServicePort, ServiceSpec, TCPSocketAction, Volume,
    VolumeMount, VolumeProjection, VolumeResourceRequirements,
};
use k8s_openapi::apimachinery::pkg::api::resource::Quantity;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{LabelSelector, ObjectMeta, OwnerReference};
use k8s_openapi::apimachinery::pkg::util::intstr::IntOrString;
use kube::{Resource, ResourceExt};
use seinode_tls_crds::{DEFAULT_SIDECAR_PORT, SeiNode};

use crate::config::ControllerConfig;
use crate::image::check_image;

/// Label every created object carries; the controller's watches select on it.
pub const MANAGED_BY_LABEL: &str = "app.kubernetes.io/managed-by";
pub const MANAGED_BY: &str = "seinode-tls";
/// Label that ties pods to their node (also the Service and StatefulSet selector).
pub const NODE_LABEL: &str = "sei.io/node";
/// Port of kube-rbac-proxy, the node's TLS front door.
pub const TLS_PORT: i32 = 8443;
/// Where the TLS Secret and the proxy configuration are mounted in the proxy container.
const TLS_MOUNT: &str = "/etc/sidecar-tls";
const PROXY_CONFIG_MOUNT: &str = "/etc/kube-rbac-proxy";
/// Home (data directory) of seid.
const SEI_HOME: &str = "/sei";
/// Group that owns mounted volumes (the TLS key among them); kube-rbac-proxy's image runs as
/// UID/GID 65532.
const NODE_FS_GROUP: i64 = 65532;
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

fn sidecar_port(node: &SeiNode) -> i32 {
    node.spec
        .sidecar
        .as_ref()
        .map_or(DEFAULT_SIDECAR_PORT, |s| s.port)
}

/// kube-rbac-proxy's authorization config: a caller may use the sidecar of node N when it may
/// `get seinodes/sidecar` named N in N's namespace (SubjectAccessReview by the proxy, which
/// needs the node pods' ServiceAccount bound to `system:auth-delegator`).
pub fn rbac_proxy_config_map(node: &SeiNode) -> ConfigMap {
    let config = format!(
        "authorization:\n  resourceAttributes:\n    namespace: {ns}\n    apiGroup: sei.io\n    \
         apiVersion: v1alpha1\n    resource: seinodes\n    subresource: sidecar\n    name: {name}\n",
        ns = node.namespace().unwrap_or_default(),
        name = node.name_any(),
    );
    ConfigMap {
        metadata: metadata(node, rbac_proxy_config_name(node)),
        data: Some(BTreeMap::from([("config.yaml".to_owned(), config)])),
        ..ConfigMap::default()
    }
}

/// The headless Service `N`: the name the certificate covers. With TLS it exposes only 8443.
pub fn service(node: &SeiNode) -> Service {
    let port = if node.sidecar_tls().is_some() {
        ServicePort {
            name: Some("sidecar-https".to_owned()),
            port: TLS_PORT,
            target_port: Some(IntOrString::Int(TLS_PORT)),
            protocol: Some("TCP".to_owned()),
            ..ServicePort::default()
        }
    } else {
        ServicePort {
            name: Some("sidecar-http".to_owned()),
            port: sidecar_port(node),
            target_port: Some(IntOrString::Int(sidecar_port(node))),
            protocol: Some("TCP".to_owned()),
            ..ServicePort::default()
        }
    };
    Service {
        metadata: metadata(node, node.name_any()),
        spec: Some(ServiceSpec {
            cluster_ip: Some("None".to_owned()),
            selector: Some(selector(node)),
            ports: Some(vec![port]),
            publish_not_ready_addresses: Some(true),
            ..ServiceSpec::default()
        }),
        ..Service::default()
    }
}

/// The StatefulSet `N`: one replica running seid and the sidecar; with TLS, kube-rbac-proxy on
/// :8443 in front of a sidecar bound to loopback. Fails on an invalid image.
pub fn stateful_set(node: &SeiNode, config: &ControllerConfig) -> Result<StatefulSet, String> {
    check_image(&node.spec.image).map_err(|e| format!("spec.image: {e}"))?;
    let sidecar_image = node
        .spec
        .sidecar
        .as_ref()
        .and_then(|s| s.image.clone())
        .filter(|image| !image.is_empty())
        .unwrap_or_else(|| config.sidecar_image.clone());
    check_image(&sidecar_image).map_err(|e| format!("spec.sidecar.image: {e}"))?;

    let port = sidecar_port(node);
    let tls = node.sidecar_tls();
    // With TLS only the proxy can reach the sidecar: it listens on loopback.
    let listen = if tls.is_some() {
        format!("127.0.0.1:{port}")
    } else {
        format!("0.0.0.0:{port}")
    };
    let data_mount = VolumeMount {
        name: "data".to_owned(),
        mount_path: SEI_HOME.to_owned(),
        ..VolumeMount::default()
    };
    let home = EnvVar {
        name: "HOME".to_owned(),
        value: Some(SEI_HOME.to_owned()),
        ..EnvVar::default()
    };

    let mut containers = vec![
        Container {
            name: "seid".to_owned(),
            image: Some(node.spec.image.clone()),
            command: Some(vec![
                "seid".to_owned(),
                "start".to_owned(),
                "--home".to_owned(),
                "$(HOME)".to_owned(),
            ]),
            env: Some(vec![home.clone()]),
            volume_mounts: Some(vec![data_mount.clone()]),
            ..Container::default()
        },
        Container {
            name: "sidecar".to_owned(),
            image: Some(sidecar_image),
            env: Some(vec![
                home,
                EnvVar {
                    name: "SEI_SIDECAR_LISTEN_ADDRESS".to_owned(),
                    value: Some(listen),
                    ..EnvVar::default()
                },
                EnvVar {
                    name: "SEI_CHAIN_ID".to_owned(),
                    value: Some(node.spec.chain_id.clone()),
                    ..EnvVar::default()
                },
            ]),
            ports: tls.is_none().then(|| {
                vec![ContainerPort {
                    name: Some("sidecar-http".to_owned()),
                    container_port: port,
                    ..ContainerPort::default()
                }]
            }),
            resources: node.spec.sidecar.as_ref().and_then(|s| s.resources.clone()),
            volume_mounts: Some(vec![data_mount]),
            ..Container::default()
        },
    ];
    let mut volumes = Vec::new();
    if let Some(tls) = tls {
        check_image(&config.rbac_proxy_image).map_err(|e| format!("--rbac-proxy-image: {e}"))?;
        let probe = || Probe {
            tcp_socket: Some(TCPSocketAction {
                port: IntOrString::Int(TLS_PORT),
                host: None,
            }),
            period_seconds: Some(10),
            ..Probe::default()
        };
        containers.push(Container {
            name: "kube-rbac-proxy".to_owned(),
            image: Some(config.rbac_proxy_image.clone()),
            args: Some(vec![
                format!("--secure-listen-address=0.0.0.0:{TLS_PORT}"),
                format!("--upstream=http://127.0.0.1:{port}/"),
                format!("--tls-cert-file={TLS_MOUNT}/tls.crt"),
                format!("--tls-private-key-file={TLS_MOUNT}/tls.key"),
                "--tls-min-version=VersionTLS12".to_owned(),
                format!(
                    "--auth-token-audiences={}",
                    crate::config::SIDECAR_TOKEN_AUDIENCE
                ),
                format!("--config-file={PROXY_CONFIG_MOUNT}/config.yaml"),
                // Health without a credential: the controller's probe sends none, so nothing it
                // sends to whoever answers in the pod's name can be replayed anywhere.
                format!("--ignore-paths={}", crate::config::SIDECAR_HEALTH_PATH),
            ]),
            ports: Some(vec![ContainerPort {
                name: Some("sidecar-https".to_owned()),
                container_port: TLS_PORT,
                ..ContainerPort::default()
            }]),
            readiness_probe: Some(probe()),
            liveness_probe: Some(probe()),
            volume_mounts: Some(vec![
                VolumeMount {
                    name: "sidecar-tls".to_owned(),
                    mount_path: TLS_MOUNT.to_owned(),
                    read_only: Some(true),
                    ..VolumeMount::default()
                },
                VolumeMount {
                    name: "rbac-proxy-config".to_owned(),
                    mount_path: PROXY_CONFIG_MOUNT.to_owned(),
                    read_only: Some(true),
                    ..VolumeMount::default()
                },
                VolumeMount {
                    name: "rbac-proxy-api-access".to_owned(),
                    mount_path: SERVICE_ACCOUNT_MOUNT.to_owned(),
                    read_only: Some(true),
                    ..VolumeMount::default()
                },
            ]),
            ..Container::default()
        });
        volumes.push(Volume {
            name: "sidecar-tls".to_owned(),
            secret: Some(SecretVolumeSource {
                secret_name: Some(tls.secret_name.clone()),
                // Read-only for the owner and the pod's fsGroup: the proxy runs as non-root.
                default_mode: Some(0o440),
                ..SecretVolumeSource::default()
            }),
            ..Volume::default()
        });
        volumes.push(Volume {
            name: "rbac-proxy-config".to_owned(),
            config_map: Some(ConfigMapVolumeSource {
                name: rbac_proxy_config_name(node),
                ..ConfigMapVolumeSource::default()
            }),
            ..Volume::default()
        });
        volumes.push(proxy_api_access());
    }

    let imported = node
        .spec
        .data_volume
        .as_ref()
        .and_then(|d| d.import.as_ref());
    let volume_claim_templates = match imported {
        Some(import) => {
            volumes.push(Volume {
                name: "data".to_owned(),
                persistent_volume_claim: Some(PersistentVolumeClaimVolumeSource {
                    claim_name: import.pvc_name.clone(),
                    read_only: None,
                }),
                ..Volume::default()
            });
            None
        }
        None => Some(vec![PersistentVolumeClaim {
            metadata: ObjectMeta {
                name: Some("data".to_owned()),
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
    };

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
                    containers,
                    volumes: (!volumes.is_empty()).then_some(volumes),
                    service_account_name: config.node_service_account.clone(),
                    // Only kube-rbac-proxy talks to the API server (TokenReview and
                    // SubjectAccessReview); seid and the sidecar, whose images the SeiNode's
                    // author chooses, get no token (`rbac-proxy-api-access` is the proxy's).
                    automount_service_account_token: Some(false),
                    security_context: Some(PodSecurityContext {
                        fs_group: Some(NODE_FS_GROUP),
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

/// What the API server's automount would give every container, for kube-rbac-proxy alone: a
/// token of the pod's ServiceAccount (default audience), the cluster's CA and the namespace.
fn proxy_api_access() -> Volume {
    Volume {
        name: "rbac-proxy-api-access".to_owned(),
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
        .find(|c| c.name == "seid")?
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
        stateful_set(node, &ControllerConfig::default())
            .ok()
            .and_then(|s| s.spec)
            .and_then(|s| s.template.spec)
            .unwrap_or_default()
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
        let with_token: Vec<&str> = spec
            .containers
            .iter()
            .filter(|c| mounts_token(c))
            .map(|c| c.name.as_str())
            .collect();
        assert_eq!(with_token, ["kube-rbac-proxy"]);
        let volume = spec
            .volumes
            .iter()
            .flatten()
            .find(|v| v.name == "rbac-proxy-api-access")
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

    #[test]
    fn only_health_passes_kube_rbac_proxy_unauthenticated() {
        let spec = pod_spec(&node(true));
        let args = spec
            .containers
            .iter()
            .find(|c| c.name == "kube-rbac-proxy")
            .and_then(|c| c.args.clone())
            .unwrap_or_default();
        let ignored: Vec<&String> = args
            .iter()
            .filter(|a| a.starts_with("--ignore-paths="))
            .collect();
        assert_eq!(ignored, ["--ignore-paths=/healthz"]);
        assert!(args.contains(&"--auth-token-audiences=seinode-sidecar".to_owned()));
    }

    #[test]
    fn a_node_without_tls_gets_no_token_at_all() {
        let spec = pod_spec(&node(false));
        assert_eq!(spec.automount_service_account_token, Some(false));
        assert!(!spec.containers.iter().any(mounts_token));
    }
}
