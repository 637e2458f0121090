//! A container's environment and command line, resolved the way the kubelet does it.
//!
//! Pure functions over the pod, the image and a view of Secrets and ConfigMaps, so the rules
//! (`$(VAR)` expansion, `command`/`args` against the image, precedence of `envFrom` and `env`)
//! are unit-tested without a cluster.

use std::collections::BTreeMap;
use std::net::Ipv4Addr;

use k8s_openapi::api::core::v1::{ConfigMap, Container, Pod, Secret};

use super::images::{DEFAULT_PATH, Image};

/// Why a container cannot be started with its spec as written; shown as the message of a
/// `CreateContainerConfigError` waiting state.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{0}")]
pub struct ConfigError(pub String);

/// Read access to the Secrets and ConfigMaps a pod refers to.
pub trait ObjectSource {
    fn secret(&self, namespace: &str, name: &str) -> Option<Secret>;
    fn config_map(&self, namespace: &str, name: &str) -> Option<ConfigMap>;
}

/// What the environment depends on besides the pod spec.
#[derive(Debug, Clone)]
pub struct EnvContext<'a> {
    pub pod: &'a Pod,
    pub pod_ip: Ipv4Addr,
    pub host_ip: Ipv4Addr,
    pub hostname: &'a str,
    pub apiserver_host: Ipv4Addr,
    pub apiserver_port: u16,
}

impl EnvContext<'_> {
    /// The pod's namespace, where the Secrets and ConfigMaps it names are.
    pub fn namespace(&self) -> &str {
        self.pod.metadata.namespace.as_deref().unwrap_or("default")
    }
}

/// Expands `$(VAR)` references as Kubernetes does: `$$` is a literal `$` (so `$$(VAR)` stays
/// `$(VAR)`), an unknown or unterminated reference is left as written.
pub fn expand(input: &str, lookup: &dyn Fn(&str) -> Option<String>) -> String {
    let mut out = String::with_capacity(input.len());
    let mut rest = input;
    while let Some(dollar) = rest.find('$') {
        out.push_str(&rest[..dollar]);
        let after = &rest[dollar + 1..];
        if let Some(stripped) = after.strip_prefix('$') {
            out.push('$');
            rest = stripped;
        } else if let Some(reference) = after.strip_prefix('(') {
            match reference.find(')') {
                Some(close) => {
                    let name = &reference[..close];
                    match lookup(name) {
                        Some(value) => out.push_str(&value),
                        None => {
                            out.push_str("$(");
                            out.push_str(name);
                            out.push(')');
                        }
                    }
                    rest = &reference[close + 1..];
                }
                None => {
                    out.push_str("$(");
                    rest = reference;
                }
            }
        } else {
            out.push('$');
            rest = after;
        }
    }
    out.push_str(rest);
    out
}

/// The argv of a container: `command` replaces the image's entrypoint, `args` its (empty)
/// cmd; both expanded against the container's environment.
pub fn command_line(container: &Container, image: &Image, env: &[(String, String)]) -> Vec<String> {
    let vars: BTreeMap<&str, &str> = env.iter().map(|(k, v)| (k.as_str(), v.as_str())).collect();
    let lookup = |name: &str| vars.get(name).map(|v| (*v).to_owned());
    let expand_all = |words: &[String]| -> Vec<String> {
        words.iter().map(|word| expand(word, &lookup)).collect()
    };
    let mut argv = match &container.command {
        Some(command) if !command.is_empty() => expand_all(command),
        _ => image.entrypoint.clone(),
    };
    if let Some(args) = &container.args {
        argv.extend(expand_all(args));
    }
    argv
}

/// An ordered environment where a later definition replaces an earlier one in place.
#[derive(Debug, Default)]
struct EnvList(Vec<(String, String)>);

impl EnvList {
    fn set(&mut self, name: &str, value: String) {
        match self.0.iter_mut().find(|(k, _)| k == name) {
            Some(entry) => entry.1 = value,
            None => self.0.push((name.to_owned(), value)),
        }
    }

    fn get(&self, name: &str) -> Option<String> {
        self.0
            .iter()
            .find(|(k, _)| k == name)
            .map(|(_, v)| v.clone())
    }
}

/// The environment variables that point in-cluster clients at the API server, as the kubelet
/// derives them from the `kubernetes` Service.
pub fn apiserver_env(host: Ipv4Addr, port: u16) -> Vec<(String, String)> {
    let url = format!("tcp://{host}:{port}");
    vec![
        ("KUBERNETES_SERVICE_HOST".into(), host.to_string()),
        ("KUBERNETES_SERVICE_PORT".into(), port.to_string()),
        ("KUBERNETES_SERVICE_PORT_HTTPS".into(), port.to_string()),
        ("KUBERNETES_PORT".into(), url.clone()),
        (format!("KUBERNETES_PORT_{port}_TCP"), url),
        (format!("KUBERNETES_PORT_{port}_TCP_PROTO"), "tcp".into()),
        (format!("KUBERNETES_PORT_{port}_TCP_PORT"), port.to_string()),
        (format!("KUBERNETES_PORT_{port}_TCP_ADDR"), host.to_string()),
    ]
}

/// The full process environment of a container: the image's, `HOSTNAME`, the API server's
/// service variables, then `envFrom` and `env` in order (later wins).
pub fn container_env(
    container: &Container,
    image: &Image,
    context: &EnvContext<'_>,
    objects: &dyn ObjectSource,
) -> Result<Vec<(String, String)>, ConfigError> {
    let namespace = context.namespace();
    let mut env = EnvList::default();
    if !image.env.iter().any(|(k, _)| k == "PATH") {
        env.set("PATH", DEFAULT_PATH.to_owned());
    }
    for (name, value) in &image.env {
        env.set(name, value.clone());
    }
    env.set("HOSTNAME", context.hostname.to_owned());
    // Only these are visible to `$(VAR)` in `env`, like the kubelet's service variables; the
    // image's variables belong to the runtime and are not.
    let mut visible = EnvList::default();
    for (name, value) in apiserver_env(context.apiserver_host, context.apiserver_port) {
        visible.set(&name, value);
    }

    for source in container.env_from.iter().flatten() {
        let prefix = source.prefix.as_deref().unwrap_or("");
        if let Some(reference) = &source.secret_ref {
            let optional = reference.optional.unwrap_or(false);
            match objects.secret(namespace, &reference.name) {
                Some(secret) => {
                    for (key, value) in secret.data.unwrap_or_default() {
                        visible.set(
                            &format!("{prefix}{key}"),
                            String::from_utf8_lossy(&value.0).into_owned(),
                        );
                    }
                }
                None if optional => {}
                None => {
                    return Err(ConfigError(format!(
                        "secret \"{}\" not found (envFrom of container {})",
                        reference.name, container.name
                    )));
                }
            }
        }
        if let Some(reference) = &source.config_map_ref {
            let optional = reference.optional.unwrap_or(false);
            match objects.config_map(namespace, &reference.name) {
                Some(config_map) => {
                    for (key, value) in config_map.data.unwrap_or_default() {
                        visible.set(&format!("{prefix}{key}"), value);
                    }
                }
                None if optional => {}
                None => {
                    return Err(ConfigError(format!(
                        "configmap \"{}\" not found (envFrom of container {})",
                        reference.name, container.name
                    )));
                }
            }
        }
    }

    for var in container.env.iter().flatten() {
        let value = match (&var.value, &var.value_from) {
            (_, Some(from)) => {
                if let Some(field) = &from.field_ref {
                    Some(field_value(&field.field_path, context)?)
                } else if let Some(key) = &from.secret_key_ref {
                    let value = objects
                        .secret(namespace, &key.name)
                        .and_then(|s| s.data.and_then(|mut d| d.remove(&key.key)))
                        .map(|v| String::from_utf8_lossy(&v.0).into_owned());
                    match value {
                        Some(value) => Some(value),
                        None if key.optional.unwrap_or(false) => None,
                        None => {
                            return Err(ConfigError(format!(
                                "secret \"{}\" or its key \"{}\" not found (env {} of container {})",
                                key.name, key.key, var.name, container.name
                            )));
                        }
                    }
                } else if let Some(key) = &from.config_map_key_ref {
                    let value = objects
                        .config_map(namespace, &key.name)
                        .and_then(|c| c.data.and_then(|mut d| d.remove(&key.key)));
                    match value {
                        Some(value) => Some(value),
                        None if key.optional.unwrap_or(false) => None,
                        None => {
                            return Err(ConfigError(format!(
                                "configmap \"{}\" or its key \"{}\" not found (env {} of container {})",
                                key.name, key.key, var.name, container.name
                            )));
                        }
                    }
                } else {
                    return Err(ConfigError(format!(
                        "env {} of container {} uses valueFrom.resourceFieldRef, which the \
                         devcluster kubelet does not support; set a plain value",
                        var.name, container.name
                    )));
                }
            }
            (Some(value), None) => Some(expand(value, &|name| visible.get(name))),
            (None, None) => Some(String::new()),
        };
        if let Some(value) = value {
            visible.set(&var.name, value);
        }
    }
    for (name, value) in visible.0 {
        env.set(&name, value);
    }
    Ok(env.0)
}

/// The value of a downward-API field path (`fieldRef`), for env and downwardAPI volumes.
pub fn field_value(path: &str, context: &EnvContext<'_>) -> Result<String, ConfigError> {
    let pod = context.pod;
    let meta = &pod.metadata;
    let spec = pod.spec.as_ref();
    let value = match path {
        "metadata.name" => meta.name.clone().unwrap_or_default(),
        "metadata.namespace" => meta.namespace.clone().unwrap_or_default(),
        "metadata.uid" => meta.uid.clone().unwrap_or_default(),
        "spec.nodeName" => spec.and_then(|s| s.node_name.clone()).unwrap_or_default(),
        "spec.serviceAccountName" => spec
            .and_then(|s| s.service_account_name.clone())
            .unwrap_or_else(|| "default".into()),
        "status.podIP" | "status.podIPs" => context.pod_ip.to_string(),
        "status.hostIP" | "status.hostIPs" => context.host_ip.to_string(),
        "metadata.labels" => render_map(meta.labels.as_ref()),
        "metadata.annotations" => render_map(meta.annotations.as_ref()),
        other => {
            let keyed = |prefix: &str| {
                other
                    .strip_prefix(prefix)
                    .and_then(|rest| rest.strip_suffix("']"))
                    .map(str::to_owned)
            };
            if let Some(key) = keyed("metadata.labels['") {
                meta.labels
                    .as_ref()
                    .and_then(|l| l.get(&key).cloned())
                    .unwrap_or_default()
            } else if let Some(key) = keyed("metadata.annotations['") {
                meta.annotations
                    .as_ref()
                    .and_then(|a| a.get(&key).cloned())
                    .unwrap_or_default()
            } else {
                return Err(ConfigError(format!(
                    "fieldRef {other} is not supported by the devcluster kubelet"
                )));
            }
        }
    };
    Ok(value)
}

/// `key="value"` lines, sorted, as the kubelet writes labels and annotations.
fn render_map(map: Option<&BTreeMap<String, String>>) -> String {
    map.into_iter()
        .flatten()
        .map(|(k, v)| format!("{k}={v:?}\n"))
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use k8s_openapi::ByteString;
    use k8s_openapi::api::core::v1::{
        EnvFromSource, EnvVar, EnvVarSource, ObjectFieldSelector, PodSpec, SecretEnvSource,
        SecretKeySelector,
    };
    use kube::api::ObjectMeta;

    fn env_of(pairs: &[(&str, &str)]) -> impl Fn(&str) -> Option<String> {
        let map: BTreeMap<String, String> = pairs
            .iter()
            .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
            .collect();
        move |name: &str| map.get(name).cloned()
    }

    #[test]
    fn expansion_replaces_known_and_keeps_unknown_references() {
        let lookup = env_of(&[("A", "1"), ("B", "two")]);
        assert_eq!(expand("$(A)-$(B)", &lookup), "1-two");
        assert_eq!(expand("$(C) stays", &lookup), "$(C) stays");
        assert_eq!(expand("$$(A) is escaped", &lookup), "$(A) is escaped");
        assert_eq!(expand("$$$(A)", &lookup), "$1");
        assert_eq!(expand("cost $5 and $", &lookup), "cost $5 and $");
        assert_eq!(expand("$(A unterminated", &lookup), "$(A unterminated");
        assert_eq!(expand("$()", &lookup), "$()");
    }

    #[test]
    fn command_overrides_entrypoint_and_args_are_appended() {
        let image = Image {
            entrypoint: vec!["/bin/app".into(), "--serve".into()],
            ..Image::default()
        };
        let env = vec![("PORT".to_owned(), "8443".to_owned())];
        let mut container = Container::default();
        assert_eq!(
            command_line(&container, &image, &env),
            ["/bin/app", "--serve"]
        );
        container.args = Some(vec!["--port=$(PORT)".into()]);
        assert_eq!(
            command_line(&container, &image, &env),
            ["/bin/app", "--serve", "--port=8443"]
        );
        container.command = Some(vec!["/bin/sh".into(), "-c".into()]);
        container.args = Some(vec!["echo $(PORT) $$(PORT)".into()]);
        assert_eq!(
            command_line(&container, &image, &env),
            ["/bin/sh", "-c", "echo 8443 $(PORT)"]
        );
    }

    struct Objects(Vec<Secret>);

    impl ObjectSource for Objects {
        fn secret(&self, namespace: &str, name: &str) -> Option<Secret> {
            self.0
                .iter()
                .find(|s| {
                    s.metadata.namespace.as_deref() == Some(namespace)
                        && s.metadata.name.as_deref() == Some(name)
                })
                .cloned()
        }
        fn config_map(&self, _: &str, _: &str) -> Option<ConfigMap> {
            None
        }
    }

    fn pod() -> Pod {
        Pod {
            metadata: ObjectMeta {
                name: Some("web-0".into()),
                namespace: Some("ns".into()),
                labels: Some([("app".to_owned(), "web".to_owned())].into()),
                ..ObjectMeta::default()
            },
            spec: Some(PodSpec {
                node_name: Some("devcluster".into()),
                ..PodSpec::default()
            }),
            ..Pod::default()
        }
    }

    fn context(pod: &Pod) -> EnvContext<'_> {
        EnvContext {
            pod,
            pod_ip: Ipv4Addr::new(10, 0, 0, 5),
            host_ip: Ipv4Addr::new(10, 0, 0, 1),
            hostname: "web-0",
            apiserver_host: Ipv4Addr::new(10, 0, 0, 1),
            apiserver_port: 6443,
        }
    }

    fn var(name: &str, value: &str) -> EnvVar {
        EnvVar {
            name: name.into(),
            value: Some(value.into()),
            value_from: None,
        }
    }

    fn from(name: &str, source: EnvVarSource) -> EnvVar {
        EnvVar {
            name: name.into(),
            value: None,
            value_from: Some(source),
        }
    }

    #[test]
    fn env_resolves_fields_secrets_and_references_in_order() {
        let pod = pod();
        let secret = Secret {
            metadata: ObjectMeta {
                name: Some("creds".into()),
                namespace: Some("ns".into()),
                ..ObjectMeta::default()
            },
            data: Some([("token".to_owned(), ByteString(b"s3cret".to_vec()))].into()),
            ..Secret::default()
        };
        let objects = Objects(vec![secret]);
        let container = Container {
            name: "app".into(),
            env_from: Some(vec![EnvFromSource {
                prefix: Some("CREDS_".into()),
                secret_ref: Some(SecretEnvSource {
                    name: "creds".into(),
                    optional: None,
                }),
                ..EnvFromSource::default()
            }]),
            env: Some(vec![
                from(
                    "POD_NAME",
                    EnvVarSource {
                        field_ref: Some(ObjectFieldSelector {
                            field_path: "metadata.name".into(),
                            api_version: None,
                        }),
                        ..EnvVarSource::default()
                    },
                ),
                from(
                    "APP",
                    EnvVarSource {
                        field_ref: Some(ObjectFieldSelector {
                            field_path: "metadata.labels['app']".into(),
                            api_version: None,
                        }),
                        ..EnvVarSource::default()
                    },
                ),
                var(
                    "GREETING",
                    "hello $(POD_NAME) on $(KUBERNETES_SERVICE_HOST)",
                ),
                var("PATH", "/opt/bin"),
            ]),
            ..Container::default()
        };
        let image = Image::default();
        let env = container_env(&container, &image, &context(&pod), &objects).unwrap();
        let get = |name: &str| env.iter().find(|(k, _)| k == name).map(|(_, v)| v.as_str());
        assert_eq!(get("PATH"), Some("/opt/bin"));
        assert_eq!(get("HOSTNAME"), Some("web-0"));
        assert_eq!(get("CREDS_token"), Some("s3cret"));
        assert_eq!(get("POD_NAME"), Some("web-0"));
        assert_eq!(get("APP"), Some("web"));
        assert_eq!(get("GREETING"), Some("hello web-0 on 10.0.0.1"));
        assert_eq!(get("KUBERNETES_SERVICE_PORT"), Some("6443"));
        assert_eq!(get("KUBERNETES_PORT_6443_TCP"), Some("tcp://10.0.0.1:6443"));
    }

    #[test]
    fn env_without_path_gets_the_default_search_path() {
        let pod = pod();
        let env = container_env(
            &Container::default(),
            &Image::default(),
            &context(&pod),
            &Objects(vec![]),
        )
        .unwrap();
        assert!(env.contains(&("PATH".to_owned(), DEFAULT_PATH.to_owned())));
    }

    #[test]
    fn missing_secret_key_is_a_config_error_unless_optional() {
        let pod = pod();
        let reference = |optional| EnvVarSource {
            secret_key_ref: Some(SecretKeySelector {
                name: "absent".into(),
                key: "k".into(),
                optional,
            }),
            ..EnvVarSource::default()
        };
        let mut container = Container {
            name: "app".into(),
            env: Some(vec![from("X", reference(None))]),
            ..Container::default()
        };
        let error = container_env(
            &container,
            &Image::default(),
            &context(&pod),
            &Objects(vec![]),
        )
        .unwrap_err();
        assert!(error.0.contains("secret \"absent\""), "{error}");
        container.env = Some(vec![from("X", reference(Some(true)))]);
        let env = container_env(
            &container,
            &Image::default(),
            &context(&pod),
            &Objects(vec![]),
        )
        .unwrap();
        assert!(!env.iter().any(|(k, _)| k == "X"));
    }
}
