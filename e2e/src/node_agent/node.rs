//! Node registration, node status heartbeats and the node Lease.

use std::collections::BTreeMap;
use std::time::Duration;

use k8s_openapi::api::coordination::v1::{Lease, LeaseSpec};
use k8s_openapi::api::core::v1::{Node, NodeAddress, NodeCondition, NodeStatus, NodeSystemInfo};
use k8s_openapi::apimachinery::pkg::api::resource::Quantity;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{MicroTime, ObjectMeta, OwnerReference, Time};
use k8s_openapi::jiff::Timestamp;
use kube::api::{DeleteParams, Patch, PatchParams, PostParams};
use kube::{Api, Client};
use tokio::sync::watch;

use crate::node_agent::{Error, Result};

/// Namespace of node leases.
pub const LEASE_NAMESPACE: &str = "kube-node-lease";
/// Lease duration announced (the node lifecycle controller's grace period is 40s).
const LEASE_DURATION_SECONDS: i32 = 40;
/// How often the lease is renewed.
const LEASE_RENEW: Duration = Duration::from_secs(10);
/// How often node status (condition heartbeats) is reported.
const STATUS_REPORT: Duration = Duration::from_secs(30);
/// Pods the node accepts.
pub const MAX_PODS: u32 = 110;

/// Total memory of the machine in bytes (from `/proc/meminfo`; 8 GiB if unreadable).
pub fn memory_bytes() -> u64 {
    std::fs::read_to_string("/proc/meminfo")
        .ok()
        .and_then(|text| {
            text.lines()
                .find_map(|l| l.strip_prefix("MemTotal:"))
                .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<u64>().ok())
        })
        .map_or(8 << 30, |kib| kib * 1024)
}

fn read_trimmed(path: &str) -> String {
    std::fs::read_to_string(path)
        .map(|s| s.trim().to_owned())
        .unwrap_or_default()
}

/// Capacity (= allocatable) of the node.
pub fn capacity() -> BTreeMap<String, Quantity> {
    let cpus = std::thread::available_parallelism().map_or(1, std::num::NonZeroUsize::get);
    BTreeMap::from([
        ("cpu".to_owned(), Quantity(cpus.to_string())),
        (
            "memory".to_owned(),
            Quantity(format!("{}Ki", memory_bytes() / 1024)),
        ),
        ("pods".to_owned(), Quantity(MAX_PODS.to_string())),
        ("ephemeral-storage".to_owned(), Quantity("100Gi".to_owned())),
    ])
}

/// The node conditions: Ready, and no pressure.
pub fn conditions(now: Timestamp, since: Timestamp) -> Vec<NodeCondition> {
    let condition = |type_: &str, status: &str, reason: &str, message: &str| NodeCondition {
        type_: type_.to_owned(),
        status: status.to_owned(),
        reason: Some(reason.to_owned()),
        message: Some(message.to_owned()),
        last_heartbeat_time: Some(Time(now)),
        last_transition_time: Some(Time(since)),
    };
    vec![
        condition(
            "MemoryPressure",
            "False",
            "KubeletHasSufficientMemory",
            "riffle-node-agent does not track memory pressure",
        ),
        condition(
            "DiskPressure",
            "False",
            "KubeletHasNoDiskPressure",
            "riffle-node-agent does not track disk pressure",
        ),
        condition(
            "PIDPressure",
            "False",
            "KubeletHasSufficientPID",
            "riffle-node-agent does not track PIDs",
        ),
        condition(
            "Ready",
            "True",
            "KubeletReady",
            "riffle-node-agent is posting ready status",
        ),
    ]
}

/// The full node status.
pub fn node_status(node_name: &str, host_ip: &str, now: Timestamp, since: Timestamp) -> NodeStatus {
    let capacity = capacity();
    NodeStatus {
        addresses: Some(vec![
            NodeAddress {
                type_: "InternalIP".to_owned(),
                address: host_ip.to_owned(),
            },
            NodeAddress {
                type_: "Hostname".to_owned(),
                address: node_name.to_owned(),
            },
        ]),
        allocatable: Some(capacity.clone()),
        capacity: Some(capacity),
        conditions: Some(conditions(now, since)),
        node_info: Some(NodeSystemInfo {
            architecture: match std::env::consts::ARCH {
                "x86_64" => "amd64",
                "aarch64" => "arm64",
                other => other,
            }
            .to_owned(),
            boot_id: read_trimmed("/proc/sys/kernel/random/boot_id"),
            container_runtime_version: "riffle-node-agent://0.1.0".to_owned(),
            kernel_version: read_trimmed("/proc/sys/kernel/osrelease"),
            kube_proxy_version: String::new(),
            kubelet_version: "v1.34.0-riffle".to_owned(),
            machine_id: read_trimmed("/etc/machine-id"),
            operating_system: "linux".to_owned(),
            os_image: "riffle-node-agent (local processes)".to_owned(),
            system_uuid: read_trimmed("/etc/machine-id"),
            ..Default::default()
        }),
        ..Default::default()
    }
}

/// Creates the Node (or takes over an existing one of that name) and reports its status.
pub async fn register(client: &Client, node_name: &str, host_ip: &str) -> Result<Node> {
    let api: Api<Node> = Api::all(client.clone());
    let labels = BTreeMap::from([
        ("kubernetes.io/hostname".to_owned(), node_name.to_owned()),
        ("kubernetes.io/os".to_owned(), "linux".to_owned()),
        (
            "kubernetes.io/arch".to_owned(),
            node_status(node_name, host_ip, Timestamp::now(), Timestamp::now())
                .node_info
                .map(|i| i.architecture)
                .unwrap_or_default(),
        ),
        ("riffle.dev/node-agent".to_owned(), "true".to_owned()),
    ]);
    let node = Node {
        metadata: ObjectMeta {
            name: Some(node_name.to_owned()),
            labels: Some(labels.clone()),
            ..Default::default()
        },
        ..Default::default()
    };
    match api.create(&PostParams::default(), &node).await {
        Ok(_) => tracing::info!(node = node_name, "node registered"),
        Err(kube::Error::Api(s)) if s.code == 409 => {
            tracing::info!(node = node_name, "node exists: taking it over");
            let patch = serde_json::json!({ "metadata": { "labels": labels } });
            api.patch(node_name, &PatchParams::default(), &Patch::Merge(&patch))
                .await
                .map_err(|e| Error::kube("labelling the existing node", e))?;
        }
        Err(e) => return Err(Error::kube("creating the node", e)),
    }
    report_status(client, node_name, host_ip, Timestamp::now()).await
}

/// Patches the node status (all conditions heartbeat now).
pub async fn report_status(
    client: &Client,
    node_name: &str,
    host_ip: &str,
    since: Timestamp,
) -> Result<Node> {
    let api: Api<Node> = Api::all(client.clone());
    let body =
        serde_json::json!({ "status": node_status(node_name, host_ip, Timestamp::now(), since) });
    api.patch_status(node_name, &PatchParams::default(), &Patch::Merge(&body))
        .await
        .map_err(|e| Error::kube("updating node status", e))
}

/// Creates or renews the node lease.
pub async fn renew_lease(client: &Client, node: &Node) -> Result<()> {
    let node_name = node.metadata.name.clone().unwrap_or_default();
    let api: Api<Lease> = Api::namespaced(client.clone(), LEASE_NAMESPACE);
    let now = MicroTime(Timestamp::now());
    let patch = serde_json::json!({ "spec": {
        "holderIdentity": node_name,
        "leaseDurationSeconds": LEASE_DURATION_SECONDS,
        "renewTime": now.clone(),
    }});
    match api
        .patch(&node_name, &PatchParams::default(), &Patch::Merge(&patch))
        .await
    {
        Ok(_) => Ok(()),
        Err(kube::Error::Api(s)) if s.code == 404 => {
            let lease = Lease {
                metadata: ObjectMeta {
                    name: Some(node_name.clone()),
                    namespace: Some(LEASE_NAMESPACE.to_owned()),
                    owner_references: Some(vec![OwnerReference {
                        api_version: "v1".to_owned(),
                        kind: "Node".to_owned(),
                        name: node_name.clone(),
                        uid: node.metadata.uid.clone().unwrap_or_default(),
                        ..Default::default()
                    }]),
                    ..Default::default()
                },
                spec: Some(LeaseSpec {
                    holder_identity: Some(node_name.clone()),
                    lease_duration_seconds: Some(LEASE_DURATION_SECONDS),
                    renew_time: Some(now.clone()),
                    acquire_time: Some(now),
                    ..Default::default()
                }),
            };
            match api.create(&PostParams::default(), &lease).await {
                Ok(_) | Err(kube::Error::Api(_)) => Ok(()),
                Err(e) => Err(Error::kube("creating the node lease", e)),
            }
        }
        Err(e) => Err(Error::kube("renewing the node lease", e)),
    }
}

/// Renews the lease and reports node status until `shutdown` flips.
pub async fn heartbeat(
    client: Client,
    node: Node,
    host_ip: String,
    mut shutdown: watch::Receiver<bool>,
) {
    let node_name = node.metadata.name.clone().unwrap_or_default();
    let since = Timestamp::now();
    let mut lease_tick = tokio::time::interval(LEASE_RENEW);
    let mut status_tick = tokio::time::interval(STATUS_REPORT);
    loop {
        tokio::select! {
            _ = lease_tick.tick() => {
                if let Err(e) = renew_lease(&client, &node).await {
                    tracing::warn!(node = %node_name, error = %e, "lease renewal failed");
                }
            }
            _ = status_tick.tick() => {
                if let Err(e) = report_status(&client, &node_name, &host_ip, since).await {
                    tracing::warn!(node = %node_name, error = %e, "node status report failed");
                }
            }
            _ = shutdown.changed() => return,
        }
    }
}

/// Deletes the node lease and the Node (used with `--delete-node-on-exit`).
pub async fn unregister(client: &Client, node_name: &str) -> Result<()> {
    let leases: Api<Lease> = Api::namespaced(client.clone(), LEASE_NAMESPACE);
    match leases.delete(node_name, &DeleteParams::default()).await {
        Ok(_) => {}
        Err(kube::Error::Api(s)) if s.code == 404 => {}
        Err(e) => return Err(Error::kube("deleting the node lease", e)),
    }
    let nodes: Api<Node> = Api::all(client.clone());
    match nodes.delete(node_name, &DeleteParams::default()).await {
        Ok(_) => Ok(()),
        Err(kube::Error::Api(s)) if s.code == 404 => Ok(()),
        Err(e) => Err(Error::kube("deleting the node", e)),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn status_has_capacity_addresses_and_ready() {
        let now = Timestamp::now();
        let status = node_status("n1", "127.0.0.1", now, now);
        let capacity = status.capacity.unwrap();
        assert_eq!(capacity["pods"].0, "110");
        assert!(capacity["memory"].0.ends_with("Ki"));
        assert_eq!(status.addresses.unwrap()[0].address, "127.0.0.1");
        let ready = status
            .conditions
            .unwrap()
            .into_iter()
            .find(|c| c.type_ == "Ready")
            .unwrap();
        assert_eq!(ready.status, "True");
        assert!(memory_bytes() > 0);
    }
}
