//! The kubelet's Node and its heartbeat.
//!
//! kube-controller-manager's node-lifecycle controller runs, so a Node whose Lease or Ready
//! condition goes stale is tainted and its pods evicted: the Lease is renewed every 10 s and
//! the Ready condition's heartbeat at least every minute, as the real kubelet does.

use std::net::Ipv4Addr;
use std::time::Duration;

use jiff::Timestamp;
use k8s_openapi::api::coordination::v1::{Lease, LeaseSpec};
use k8s_openapi::api::core::v1::{
    Node, NodeAddress, NodeCondition, NodeSpec, NodeStatus, NodeSystemInfo,
};
use k8s_openapi::apimachinery::pkg::api::resource::Quantity;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{MicroTime, Time};
use kube::Client;
use kube::api::{Api, DeleteParams, ObjectMeta, Patch, PatchParams, PostParams};

/// How often the Lease is renewed.
pub const LEASE_RENEW: Duration = Duration::from_secs(10);
/// How long the Lease is valid.
const LEASE_SECONDS: i32 = 40;
/// How often the Ready condition's heartbeat is refreshed (well inside the controller's 40 s
/// grace period, even when one write fails).
pub const STATUS_HEARTBEAT: Duration = Duration::from_secs(20);
const LEASE_NAMESPACE: &str = "kube-node-lease";

/// The Node as registered, with its status.
pub fn node_object(name: &str, address: Ipv4Addr, now: Timestamp) -> Node {
    let resources = [
        ("cpu", "2"),
        ("memory", "24Gi"),
        ("pods", "110"),
        ("ephemeral-storage", "100Gi"),
    ]
    .into_iter()
    .map(|(k, v)| (k.to_owned(), Quantity(v.to_owned())))
    .collect::<std::collections::BTreeMap<_, _>>();
    Node {
        metadata: ObjectMeta {
            name: Some(name.to_owned()),
            labels: Some(
                [
                    ("kubernetes.io/hostname", name),
                    ("kubernetes.io/os", "linux"),
                    ("kubernetes.io/arch", "amd64"),
                ]
                .into_iter()
                .map(|(k, v)| (k.to_owned(), v.to_owned()))
                .collect(),
            ),
            ..ObjectMeta::default()
        },
        spec: Some(NodeSpec::default()),
        status: Some(NodeStatus {
            capacity: Some(resources.clone()),
            allocatable: Some(resources),
            conditions: Some(vec![ready_condition(now)]),
            addresses: Some(vec![
                NodeAddress {
                    type_: "InternalIP".into(),
                    address: address.to_string(),
                },
                NodeAddress {
                    type_: "Hostname".into(),
                    address: name.to_owned(),
                },
            ]),
            node_info: Some(NodeSystemInfo {
                architecture: "amd64".into(),
                boot_id: String::new(),
                container_runtime_version: "devcluster://0.1".into(),
                kernel_version: String::new(),
                kube_proxy_version: String::new(),
                kubelet_version: "v1.36.3".into(),
                machine_id: String::new(),
                operating_system: "linux".into(),
                os_image: "devcluster".into(),
                system_uuid: String::new(),
                ..NodeSystemInfo::default()
            }),
            ..NodeStatus::default()
        }),
    }
}

fn ready_condition(now: Timestamp) -> NodeCondition {
    NodeCondition {
        type_: "Ready".into(),
        status: "True".into(),
        reason: Some("KubeletReady".into()),
        message: Some("kubelet is posting ready status".into()),
        last_heartbeat_time: Some(Time(now)),
        last_transition_time: None,
    }
}

/// Creates the Node, or replaces one left by an earlier run, and writes its status.
pub async fn register(client: &Client, name: &str, address: Ipv4Addr) -> Result<(), kube::Error> {
    let api: Api<Node> = Api::all(client.clone());
    let now = Timestamp::now();
    let mut node = node_object(name, address, now);
    let status = node.status.clone();
    match api.get_opt(name).await? {
        Some(existing) => {
            node.metadata.resource_version = existing.metadata.resource_version;
            api.replace(name, &PostParams::default(), &node).await?;
        }
        None => {
            api.create(&PostParams::default(), &node).await?;
        }
    }
    let mut status = status.unwrap_or_default();
    if let Some(condition) = status.conditions.iter_mut().flatten().next() {
        condition.last_transition_time = Some(Time(now));
    }
    api.patch_status(
        name,
        &PatchParams::default(),
        &Patch::Merge(serde_json::json!({ "status": status })),
    )
    .await?;
    Ok(())
}

/// Renews the Lease (creating it when missing).
pub async fn renew_lease(client: &Client, name: &str) -> Result<(), kube::Error> {
    let api: Api<Lease> = Api::namespaced(client.clone(), LEASE_NAMESPACE);
    let spec = LeaseSpec {
        holder_identity: Some(name.to_owned()),
        lease_duration_seconds: Some(LEASE_SECONDS),
        renew_time: Some(MicroTime(Timestamp::now())),
        ..LeaseSpec::default()
    };
    match api.get_opt(name).await? {
        Some(mut lease) => {
            lease.spec = Some(spec);
            api.replace(name, &PostParams::default(), &lease).await?;
        }
        None => {
            let lease = Lease {
                metadata: ObjectMeta {
                    name: Some(name.to_owned()),
                    namespace: Some(LEASE_NAMESPACE.to_owned()),
                    ..ObjectMeta::default()
                },
                spec: Some(spec),
            };
            api.create(&PostParams::default(), &lease).await?;
        }
    }
    Ok(())
}

/// Refreshes the Ready condition's heartbeat.
pub async fn heartbeat(client: &Client, name: &str) -> Result<(), kube::Error> {
    let api: Api<Node> = Api::all(client.clone());
    let Some(node) = api.get_opt(name).await? else {
        return Ok(());
    };
    let now = Timestamp::now();
    let mut conditions = node.status.and_then(|s| s.conditions).unwrap_or_default();
    match conditions.iter_mut().find(|c| c.type_ == "Ready") {
        Some(ready) if ready.status == "True" => {
            ready.last_heartbeat_time = Some(Time(now));
            ready.reason = Some("KubeletReady".into());
        }
        _ => {
            conditions.retain(|c| c.type_ != "Ready");
            let mut ready = ready_condition(now);
            ready.last_transition_time = Some(Time(now));
            conditions.push(ready);
        }
    }
    api.patch_status(
        name,
        &PatchParams::default(),
        &Patch::Merge(serde_json::json!({ "status": { "conditions": conditions } })),
    )
    .await?;
    Ok(())
}

/// Keeps the Lease and the Ready heartbeat fresh until the task is aborted.
pub async fn keep_alive(client: Client, name: String) {
    let mut since_heartbeat = Duration::ZERO;
    loop {
        tokio::time::sleep(LEASE_RENEW).await;
        if let Err(error) = renew_lease(&client, &name).await {
            tracing::warn!(%error, node = %name, "failed to renew the node lease");
        }
        since_heartbeat += LEASE_RENEW;
        if since_heartbeat >= STATUS_HEARTBEAT {
            match heartbeat(&client, &name).await {
                Ok(()) => since_heartbeat = Duration::ZERO,
                Err(error) => {
                    tracing::warn!(%error, node = %name, "failed to refresh the node heartbeat");
                }
            }
        }
    }
}

/// Removes the Node and its Lease.
pub async fn deregister(client: &Client, name: &str) {
    let nodes: Api<Node> = Api::all(client.clone());
    if let Err(error) = nodes.delete(name, &DeleteParams::default()).await {
        tracing::warn!(%error, node = %name, "failed to delete the node");
    }
    let leases: Api<Lease> = Api::namespaced(client.clone(), LEASE_NAMESPACE);
    let _ = leases.delete(name, &DeleteParams::default()).await;
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn node_reports_ready_capacity_and_addresses() {
        let node = node_object(
            "devcluster",
            Ipv4Addr::new(10, 0, 0, 1),
            Timestamp::UNIX_EPOCH,
        );
        let status = node.status.unwrap();
        assert_eq!(status.capacity.unwrap()["pods"].0, "110");
        let ready = &status.conditions.unwrap()[0];
        assert_eq!(
            (ready.type_.as_str(), ready.status.as_str()),
            ("Ready", "True")
        );
        let addresses = status.addresses.unwrap();
        assert_eq!(addresses[0].address, "10.0.0.1");
        assert_eq!(status.node_info.unwrap().kubelet_version, "v1.36.3");
        assert!(node.spec.unwrap().taints.is_none());
    }
}
