//! The agent: node registration, the pod watch and one worker per pod.

use std::collections::{HashMap, HashSet};
use std::future::Future;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use futures::{StreamExt, TryStreamExt};
use k8s_openapi::api::core::v1::Pod;
use kube::api::{DeleteParams, ListParams};
use kube::config::{KubeConfigOptions, Kubeconfig};
use kube::runtime::watcher::{self, Event};
use kube::runtime::WatchStreamExt;
use kube::{Api, Client, Config};
use tokio::sync::watch;
use tokio::task::JoinHandle;

use crate::node_agent::images::ImageMap;
use crate::node_agent::ipam::IpAllocator;
use crate::node_agent::node;
use crate::node_agent::sandbox::ClusterAccess;
use crate::node_agent::worker::{run_pod, PodUpdate};
use crate::node_agent::{Error, Result};

/// Agent configuration.
#[derive(Debug, Clone)]
pub struct AgentConfig {
    /// Node name to register.
    pub node_name: String,
    /// State directory (pod directories, IP locks).
    pub state_dir: PathBuf,
    /// Image mapping file.
    pub image_map: PathBuf,
    /// Kubeconfig to use (default: `$KUBECONFIG` / `~/.kube/config`).
    pub kubeconfig: Option<PathBuf>,
    /// The node's IP (also the host IP of its pods).
    pub host_ip: String,
    /// Delete the Node and its Lease on shutdown.
    pub delete_node_on_exit: bool,
}

/// What every pod worker shares.
pub struct Shared {
    /// Admin client.
    pub client: Client,
    /// API server access for in-pod clients.
    pub cluster: ClusterAccess,
    /// Image mapping.
    pub images: ImageMap,
    /// Node name.
    pub node_name: String,
    /// Node IP.
    pub host_ip: String,
    /// State directory.
    pub state_dir: PathBuf,
    /// Pod IP allocator.
    pub ipam: IpAllocator,
}

struct PodHandle {
    updates: watch::Sender<PodUpdate>,
    task: JoinHandle<()>,
}

/// Loads the kubeconfig and builds a client plus the cluster access for pods.
pub async fn connect(kubeconfig: Option<&PathBuf>) -> Result<(Client, ClusterAccess)> {
    crate::install_crypto_provider();
    let kc = match kubeconfig {
        Some(path) => Kubeconfig::read_from(path),
        None => Kubeconfig::read(),
    }
    .map_err(|e| Error::Kubeconfig(e.to_string()))?;
    let cluster = ClusterAccess::from_kubeconfig(&kc)?;
    let config = Config::from_custom_kubeconfig(kc, &KubeConfigOptions::default())
        .await
        .map_err(|e| Error::Kubeconfig(e.to_string()))?;
    let client = Client::try_from(config).map_err(|e| Error::kube("building the client", e))?;
    Ok((client, cluster))
}

/// Runs the agent until `shutdown` completes, then stops every pod process.
pub async fn run(config: AgentConfig, shutdown: impl Future<Output = ()>) -> Result<()> {
    let images = ImageMap::load(&config.image_map)?;
    let (client, cluster) = connect(config.kubeconfig.as_ref()).await?;
    std::fs::create_dir_all(config.state_dir.join("pods"))
        .map_err(|e| Error::io(config.state_dir.join("pods"), e))?;
    // Before running anything: a predecessor that died may have left our pods running.
    let reaped = crate::node_agent::process::reap_leftovers(&config.state_dir, &config.node_name);
    if reaped > 0 {
        tracing::warn!(reaped, node = %config.node_name, "killed containers of a previous agent");
    }
    let shared = Arc::new(Shared {
        client: client.clone(),
        cluster,
        images,
        node_name: config.node_name.clone(),
        host_ip: config.host_ip.clone(),
        state_dir: config.state_dir.clone(),
        ipam: IpAllocator::new(config.state_dir.join("ipam"))?,
    });

    let node = node::register(&client, &config.node_name, &config.host_ip).await?;
    node::renew_lease(&client, &node).await?;
    let (stop_tx, stop_rx) = watch::channel(false);
    let heartbeat = tokio::spawn(node::heartbeat(
        client.clone(),
        node,
        config.host_ip.clone(),
        stop_rx.clone(),
    ));

    let pods: Api<Pod> = Api::all(client.clone());
    let selector = format!("spec.nodeName={}", config.node_name);
    let mut events = watcher::watcher(pods, watcher::Config::default().fields(&selector))
        .default_backoff()
        .boxed();
    let mut handles: HashMap<String, PodHandle> = HashMap::new();
    let mut listed: HashSet<String> = HashSet::new();
    tracing::info!(node = %config.node_name, state_dir = %config.state_dir.display(), "node agent running");
    tokio::pin!(shutdown);
    loop {
        tokio::select! {
            () = &mut shutdown => break,
            event = events.try_next() => match event {
                Ok(Some(Event::Apply(pod) | Event::InitApply(pod))) => {
                    if let Some(uid) = pod.metadata.uid.clone() {
                        listed.insert(uid.clone());
                        dispatch(&shared, &mut handles, &stop_rx, uid, PodUpdate::Present(Arc::new(pod)));
                    }
                }
                Ok(Some(Event::Delete(pod))) => {
                    if let Some(uid) = pod.metadata.uid.clone() {
                        dispatch(&shared, &mut handles, &stop_rx, uid, PodUpdate::Gone);
                    }
                }
                Ok(Some(Event::Init)) => listed.clear(),
                Ok(Some(Event::InitDone)) => {
                    // Pods that vanished while the watch was re-listing.
                    let gone: Vec<String> = handles.keys().filter(|uid| !listed.contains(*uid)).cloned().collect();
                    for uid in gone {
                        dispatch(&shared, &mut handles, &stop_rx, uid, PodUpdate::Gone);
                    }
                }
                Ok(None) => {
                    tracing::error!("pod watch ended");
                    break;
                }
                Err(e) => tracing::warn!(error = %e, "pod watch error; retrying"),
            }
        }
        handles.retain(|_, h| !h.task.is_finished());
    }

    tracing::info!(
        pods = handles.len(),
        "shutting down: stopping pod processes"
    );
    let _ = stop_tx.send(true);
    for (_, handle) in handles.drain() {
        if tokio::time::timeout(Duration::from_secs(30), handle.task)
            .await
            .is_err()
        {
            tracing::error!("a pod worker did not stop in time");
        }
    }
    let _ = heartbeat.await;
    if config.delete_node_on_exit {
        // Nothing will ever run the pods bound to this node again: remove them now rather
        // than leaving them to the pod garbage collector (which would keep their namespaces
        // terminating for a while).
        remove_bound_pods(&client, &config.node_name).await;
        node::unregister(&client, &config.node_name).await?;
        tracing::info!(node = %config.node_name, "node unregistered");
    }
    Ok(())
}

async fn remove_bound_pods(client: &Client, node_name: &str) {
    let pods: Api<Pod> = Api::all(client.clone());
    let params = ListParams::default().fields(&format!("spec.nodeName={node_name}"));
    let list = match pods.list(&params).await {
        Ok(list) => list,
        Err(e) => {
            tracing::warn!(error = %e, "cannot list the node's pods");
            return;
        }
    };
    for pod in list {
        let (Some(ns), Some(name)) = (
            pod.metadata.namespace.as_deref(),
            pod.metadata.name.as_deref(),
        ) else {
            continue;
        };
        let api: Api<Pod> = Api::namespaced(client.clone(), ns);
        let params = DeleteParams {
            grace_period_seconds: Some(0),
            ..Default::default()
        };
        match api.delete(name, &params).await {
            Ok(_) => tracing::info!(
                namespace = ns,
                pod = name,
                "removed pod of the departing node"
            ),
            Err(kube::Error::Api(s)) if s.code == 404 => {}
            Err(e) => tracing::warn!(namespace = ns, pod = name, error = %e, "cannot remove pod"),
        }
    }
}

fn dispatch(
    shared: &Arc<Shared>,
    handles: &mut HashMap<String, PodHandle>,
    stop: &watch::Receiver<bool>,
    uid: String,
    update: PodUpdate,
) {
    if let Some(handle) = handles.get(&uid) {
        if !handle.task.is_finished() {
            let _ = handle.updates.send(update);
            return;
        }
    }
    let PodUpdate::Present(pod) = update else {
        return;
    };
    let (tx, rx) = watch::channel(PodUpdate::Present(pod.clone()));
    let task = tokio::spawn(run_pod(shared.clone(), pod, rx, stop.clone()));
    handles.insert(uid, PodHandle { updates: tx, task });
}
