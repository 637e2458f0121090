//! Names without a cluster DNS server: every pod gets an `/etc/hosts` the kubelet keeps
//! current, and `local` resolves the same names on the host through [`Names::resolve`].
//!
//! There is no kube-proxy either, so a ClusterIP Service's name resolves to its endpoints'
//! addresses: a client reaches it only when the Service's `port` equals its `targetPort`.
//! Headless Services and pods with `hostname` + `subdomain` resolve as CoreDNS would.

use std::collections::{BTreeMap, BTreeSet};
use std::fs;
use std::io;
use std::net::Ipv4Addr;
use std::path::{Path, PathBuf};
use std::sync::{Arc, RwLock};

use k8s_openapi::api::core::v1::{Pod, Service};
use k8s_openapi::api::discovery::v1::EndpointSlice;

/// The label an EndpointSlice carries with its Service's name.
const SERVICE_NAME_LABEL: &str = "kubernetes.io/service-name";

/// One address and the names that lead to it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NameEntry {
    pub ip: Ipv4Addr,
    pub namespace: String,
    /// Names valid from every namespace (`svc.ns.svc.domain`, `svc.ns.svc`, `svc.ns`).
    pub global: Vec<String>,
    /// Short names valid only inside `namespace` (`svc`, `host.subdomain`).
    pub local: Vec<String>,
}

/// The names of the cluster, computed from Services, their EndpointSlices and pods.
pub fn name_entries(
    services: &[Service],
    slices: &[EndpointSlice],
    pods: &[Pod],
    domain: &str,
) -> Vec<NameEntry> {
    let mut entries = Vec::new();
    for pod in pods {
        let (Some(spec), Some(namespace)) = (&pod.spec, &pod.metadata.namespace) else {
            continue;
        };
        let (Some(hostname), Some(subdomain)) = (&spec.hostname, &spec.subdomain) else {
            continue;
        };
        let Some(ip) = pod_ip(pod) else { continue };
        let short = format!("{hostname}.{subdomain}");
        entries.push(NameEntry {
            ip,
            namespace: namespace.clone(),
            global: vec![
                format!("{short}.{namespace}.svc.{domain}"),
                format!("{short}.{namespace}.svc"),
            ],
            local: vec![short],
        });
    }
    for service in services {
        let (Some(name), Some(namespace)) = (&service.metadata.name, &service.metadata.namespace)
        else {
            continue;
        };
        if name == "kubernetes" && namespace == "default" {
            continue;
        }
        let spec = service.spec.clone().unwrap_or_default();
        let not_ready_too = spec.publish_not_ready_addresses.unwrap_or(false);
        let mut addresses = BTreeSet::new();
        for slice in slices {
            let owner = slice
                .metadata
                .labels
                .as_ref()
                .and_then(|l| l.get(SERVICE_NAME_LABEL));
            if owner != Some(name) || slice.metadata.namespace.as_ref() != Some(namespace) {
                continue;
            }
            for endpoint in slice.endpoints.iter().flatten() {
                let ready = endpoint
                    .conditions
                    .as_ref()
                    .and_then(|c| c.ready)
                    .unwrap_or(true);
                if ready || not_ready_too {
                    addresses.extend(
                        endpoint
                            .addresses
                            .iter()
                            .filter_map(|a| a.parse::<Ipv4Addr>().ok()),
                    );
                }
            }
        }
        for ip in addresses {
            entries.push(NameEntry {
                ip,
                namespace: namespace.clone(),
                global: vec![
                    format!("{name}.{namespace}.svc.{domain}"),
                    format!("{name}.{namespace}.svc"),
                    format!("{name}.{namespace}"),
                ],
                local: vec![name.clone()],
            });
        }
    }
    entries.sort_by(|a, b| (&a.global, a.ip).cmp(&(&b.global, b.ip)));
    entries
}

fn pod_ip(pod: &Pod) -> Option<Ipv4Addr> {
    pod.status.as_ref()?.pod_ip.as_ref()?.parse().ok()
}

/// A pod's own line of its hosts file.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct OwnName {
    pub namespace: String,
    pub ip: Ipv4Addr,
    pub hostname: String,
    pub subdomain: Option<String>,
}

/// The `/etc/hosts` of a pod in `own.namespace`.
pub fn render_hosts(
    entries: &[NameEntry],
    own: &OwnName,
    gateway: Ipv4Addr,
    domain: &str,
) -> String {
    let mut out = String::from(
        "# Kubernetes-managed hosts file (devcluster kubelet).\n\
         127.0.0.1\tlocalhost\n\
         ::1\tlocalhost ip6-localhost ip6-loopback\n",
    );
    let own_names = match &own.subdomain {
        Some(sub) => format!(
            "{h}.{sub}.{ns}.svc.{domain}\t{h}",
            h = own.hostname,
            ns = own.namespace
        ),
        None => own.hostname.clone(),
    };
    out.push_str(&format!("{}\t{own_names}\n", own.ip));
    out.push_str(&format!(
        "{gateway}\tkubernetes kubernetes.default kubernetes.default.svc \
         kubernetes.default.svc.{domain}\n"
    ));
    for entry in entries {
        let mut names = entry.global.clone();
        if entry.namespace == own.namespace {
            names.extend(entry.local.iter().cloned());
        }
        out.push_str(&format!("{}\t{}\n", entry.ip, names.join(" ")));
    }
    out
}

/// Host name to addresses, for lookups from the host (`local`).
pub fn lookup_table(
    entries: &[NameEntry],
    gateway: Ipv4Addr,
    domain: &str,
) -> BTreeMap<String, Vec<Ipv4Addr>> {
    let mut table: BTreeMap<String, Vec<Ipv4Addr>> = BTreeMap::new();
    for name in [
        "kubernetes.default".to_owned(),
        "kubernetes.default.svc".to_owned(),
        format!("kubernetes.default.svc.{domain}"),
    ] {
        table.entry(name).or_default().push(gateway);
    }
    for entry in entries {
        for name in &entry.global {
            let ips = table.entry(name.to_ascii_lowercase()).or_default();
            if !ips.contains(&entry.ip) {
                ips.push(entry.ip);
            }
        }
    }
    table
}

/// Writes `content` to `path` by rename, so readers see the old or the new file whole; skips
/// the write when nothing changed.
pub fn replace_file(path: &Path, content: &str) -> io::Result<bool> {
    if fs::read_to_string(path).is_ok_and(|old| old == content) {
        return Ok(false);
    }
    let tmp = path.with_extension("tmp");
    fs::write(&tmp, content)?;
    fs::rename(&tmp, path)?;
    Ok(true)
}

// === Names ===

/// The live name table, shared by the kubelet's pods and [`super::Kubelet::resolve`].
#[derive(Debug, Default)]
pub struct Names {
    state: RwLock<NamesState>,
}

#[derive(Debug, Default)]
struct NamesState {
    entries: Vec<NameEntry>,
    lookup: BTreeMap<String, Vec<Ipv4Addr>>,
    /// Hosts directories of the running pods, by pod uid.
    pods: BTreeMap<String, (OwnName, PathBuf)>,
}

impl Names {
    pub fn new() -> Arc<Self> {
        Arc::default()
    }

    /// The first address of `host` (a trailing dot and case are ignored).
    pub fn resolve(&self, host: &str) -> Option<Ipv4Addr> {
        let host = host.trim_end_matches('.').to_ascii_lowercase();
        let state = self.state.read().ok()?;
        state.lookup.get(&host).and_then(|ips| ips.first().copied())
    }

    /// Every name the host can resolve, with its addresses.
    pub fn snapshot(&self) -> BTreeMap<String, Vec<Ipv4Addr>> {
        self.state
            .read()
            .map(|s| s.lookup.clone())
            .unwrap_or_default()
    }

    /// Replaces the table and rewrites the hosts file of every registered pod that changed.
    pub fn update(&self, entries: Vec<NameEntry>, gateway: Ipv4Addr, domain: &str) {
        let pods = {
            let Ok(mut state) = self.state.write() else {
                return;
            };
            state.lookup = lookup_table(&entries, gateway, domain);
            state.entries = entries;
            state.pods.clone()
        };
        for (own, dir) in pods.values() {
            self.write_pod(own, dir, gateway, domain);
        }
    }

    /// Starts keeping `dir/hosts` current for a pod; writes it now.
    pub fn register(&self, uid: &str, own: OwnName, dir: PathBuf, gateway: Ipv4Addr, domain: &str) {
        if let Ok(mut state) = self.state.write() {
            state
                .pods
                .insert(uid.to_owned(), (own.clone(), dir.clone()));
        }
        self.write_pod(&own, &dir, gateway, domain);
    }

    pub fn unregister(&self, uid: &str) {
        if let Ok(mut state) = self.state.write() {
            state.pods.remove(uid);
        }
    }

    fn write_pod(&self, own: &OwnName, dir: &Path, gateway: Ipv4Addr, domain: &str) {
        let content = match self.state.read() {
            Ok(state) => render_hosts(&state.entries, own, gateway, domain),
            Err(_) => return,
        };
        let written =
            fs::create_dir_all(dir).and_then(|()| replace_file(&dir.join("hosts"), &content));
        if let Err(error) = written {
            tracing::warn!(%error, dir = %dir.display(), "failed to write a pod's hosts file");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use k8s_openapi::api::core::v1::{PodSpec, PodStatus, ServiceSpec};
    use k8s_openapi::api::discovery::v1::{Endpoint, EndpointConditions};
    use kube::api::ObjectMeta;

    fn meta(name: &str, namespace: &str) -> ObjectMeta {
        ObjectMeta {
            name: Some(name.into()),
            namespace: Some(namespace.into()),
            ..ObjectMeta::default()
        }
    }

    fn fixtures() -> (Vec<Service>, Vec<EndpointSlice>, Vec<Pod>) {
        let service = |name: &str, publish: bool| Service {
            metadata: meta(name, "ns"),
            spec: Some(ServiceSpec {
                publish_not_ready_addresses: Some(publish),
                ..ServiceSpec::default()
            }),
            ..Service::default()
        };
        let slice = |service: &str, ip: &str, ready: bool| EndpointSlice {
            metadata: ObjectMeta {
                labels: Some([(SERVICE_NAME_LABEL.to_owned(), service.to_owned())].into()),
                ..meta(&format!("{service}-abc"), "ns")
            },
            address_type: "IPv4".into(),
            endpoints: Some(vec![Endpoint {
                addresses: vec![ip.into()],
                conditions: Some(EndpointConditions {
                    ready: Some(ready),
                    ..EndpointConditions::default()
                }),
                ..Endpoint::default()
            }]),
            ..EndpointSlice::default()
        };
        let pod = Pod {
            metadata: meta("node-0", "ns"),
            spec: Some(PodSpec {
                hostname: Some("node-0".into()),
                subdomain: Some("node".into()),
                ..PodSpec::default()
            }),
            status: Some(PodStatus {
                pod_ip: Some("10.9.0.7".into()),
                ..PodStatus::default()
            }),
        };
        (
            vec![service("node", true), service("web", false)],
            vec![
                slice("node", "10.9.0.7", false),
                slice("web", "10.9.0.8", true),
                slice("web", "10.9.0.9", false),
            ],
            vec![pod],
        )
    }

    #[test]
    fn hosts_file_lists_pods_services_and_short_names_of_its_namespace() {
        let (services, slices, pods) = fixtures();
        let entries = name_entries(&services, &slices, &pods, "cluster.local");
        let own = OwnName {
            namespace: "ns".into(),
            ip: "10.9.0.8".parse().unwrap(),
            hostname: "web-x".into(),
            subdomain: None,
        };
        let hosts = render_hosts(&entries, &own, "10.9.0.1".parse().unwrap(), "cluster.local");
        assert!(hosts.contains("127.0.0.1\tlocalhost\n"), "{hosts}");
        assert!(hosts.contains("10.9.0.8\tweb-x\n"), "{hosts}");
        assert!(hosts.contains(
            "10.9.0.1\tkubernetes kubernetes.default kubernetes.default.svc kubernetes.default.svc.cluster.local\n"
        ));
        assert!(
            hosts.contains(
                "10.9.0.7\tnode-0.node.ns.svc.cluster.local node-0.node.ns.svc node-0.node\n"
            ),
            "{hosts}"
        );
        assert!(hosts.contains("10.9.0.7\tnode.ns.svc.cluster.local node.ns.svc node.ns node\n"));
        assert!(hosts.contains("10.9.0.8\tweb.ns.svc.cluster.local web.ns.svc web.ns web\n"));
        assert!(
            !hosts.contains("10.9.0.9"),
            "a not-ready address of a normal Service is listed"
        );
    }

    #[test]
    fn hosts_file_of_another_namespace_has_no_short_names() {
        let (services, slices, pods) = fixtures();
        let entries = name_entries(&services, &slices, &pods, "cluster.local");
        let own = OwnName {
            namespace: "other".into(),
            ip: "10.9.0.20".parse().unwrap(),
            hostname: "a".into(),
            subdomain: Some("b".into()),
        };
        let hosts = render_hosts(&entries, &own, "10.9.0.1".parse().unwrap(), "cluster.local");
        assert!(
            hosts.contains("10.9.0.20\ta.b.other.svc.cluster.local\ta\n"),
            "{hosts}"
        );
        assert!(hosts.contains("10.9.0.8\tweb.ns.svc.cluster.local web.ns.svc web.ns\n"));
        assert!(!hosts.contains(" node-0.node\n"));
    }

    #[test]
    fn names_resolve_pod_and_service_names_from_the_host() {
        let (services, slices, pods) = fixtures();
        let names = Names::default();
        let gateway = "10.9.0.1".parse().unwrap();
        names.update(
            name_entries(&services, &slices, &pods, "cluster.local"),
            gateway,
            "cluster.local",
        );
        let ip = |s: &str| Some(s.parse::<Ipv4Addr>().unwrap());
        assert_eq!(
            names.resolve("node-0.node.ns.svc.cluster.local."),
            ip("10.9.0.7")
        );
        assert_eq!(names.resolve("WEB.ns.svc"), ip("10.9.0.8"));
        assert_eq!(
            names.resolve("kubernetes.default.svc.cluster.local"),
            Some(gateway)
        );
        assert_eq!(names.resolve("web"), None);
    }
}
