//! Pod "sandbox" preparation: the pod directory, volumes, service account credentials and
//! the environment and command line of every container.
//!
//! Processes cannot mount, so every container gets a *mount root* (`$RIFFLE_MOUNT_ROOT`)
//! in which each `volumeMount.mountPath` is re-created as a symlink to the materialised
//! volume: a file the pod would read at `/etc/riffle/job.yaml` is at
//! `$RIFFLE_MOUNT_ROOT/etc/riffle/job.yaml`. `$RIFFLE_MOUNTS` names a JSON file listing the
//! mounts, and arguments (or `env[].value`s) that are absolute paths under a `mountPath`
//! are rewritten to the host path, so `--config=/etc/riffle/job.yaml` just works.

use std::collections::{BTreeMap, HashMap};
use std::net::Ipv4Addr;
use std::os::unix::fs::PermissionsExt;
use std::path::{Component, Path, PathBuf};

use base64::Engine as _;
use k8s_openapi::api::authentication::v1::{BoundObjectReference, TokenRequest, TokenRequestSpec};
use k8s_openapi::api::core::v1::{
    ConfigMap, Container, DownwardAPIVolumeFile, KeyToPath, Pod, Secret, ServiceAccount, Volume,
};
use kube::api::PostParams;
use kube::config::Kubeconfig;
use kube::{Api, Client};
use serde::Serialize;

use crate::node_agent::images::{container_command, expand_vars, ImageMap};
use crate::node_agent::layout::PodDir;
use crate::node_agent::{Error, Result};

/// Lifetime requested for service account tokens (no rotation: tests are short).
const TOKEN_EXPIRATION_SECONDS: i64 = 24 * 3600;

/// How in-pod clients reach the API server (taken from the agent's kubeconfig).
#[derive(Debug, Clone)]
pub struct ClusterAccess {
    /// API server URL.
    pub server: String,
    /// PEM CA bundle, if the kubeconfig has one.
    pub ca_pem: Option<Vec<u8>>,
    /// `insecure-skip-tls-verify` of the agent's cluster entry.
    pub insecure: bool,
}

impl ClusterAccess {
    /// Extracts the current context's cluster from a kubeconfig.
    pub fn from_kubeconfig(kubeconfig: &Kubeconfig) -> Result<Self> {
        let err = |m: &str| Error::Kubeconfig(m.to_owned());
        let context_name = kubeconfig
            .current_context
            .as_deref()
            .ok_or_else(|| err("no current-context"))?;
        let context = kubeconfig
            .contexts
            .iter()
            .find(|c| c.name == context_name)
            .and_then(|c| c.context.as_ref())
            .ok_or_else(|| err("current-context not found"))?;
        let cluster = kubeconfig
            .clusters
            .iter()
            .find(|c| c.name == context.cluster)
            .and_then(|c| c.cluster.as_ref())
            .ok_or_else(|| err("cluster of the current context not found"))?;
        let server = cluster
            .server
            .clone()
            .ok_or_else(|| err("cluster has no server"))?;
        let ca_pem = match (
            &cluster.certificate_authority_data,
            &cluster.certificate_authority,
        ) {
            (Some(data), _) => Some(
                base64::engine::general_purpose::STANDARD
                    .decode(data.trim())
                    .map_err(|e| Error::Kubeconfig(format!("certificate-authority-data: {e}")))?,
            ),
            (None, Some(path)) => Some(std::fs::read(path).map_err(|e| Error::io(path, e))?),
            (None, None) => None,
        };
        Ok(Self {
            server,
            ca_pem,
            insecure: cluster.insecure_skip_tls_verify.unwrap_or(false),
        })
    }

    /// A kubeconfig that authenticates with a bearer token file.
    pub fn kubeconfig_yaml(
        &self,
        namespace: &str,
        ca_file: Option<&Path>,
        token_file: &Path,
    ) -> String {
        let mut cluster = format!("    server: {}\n", self.server);
        if let Some(ca) = ca_file {
            cluster.push_str(&format!("    certificate-authority: {}\n", ca.display()));
        }
        if self.insecure {
            cluster.push_str("    insecure-skip-tls-verify: true\n");
        }
        format!(
            "apiVersion: v1\nkind: Config\nclusters:\n- name: testbed\n  cluster:\n{cluster}\
users:\n- name: pod\n  user:\n    tokenFile: {token}\n\
contexts:\n- name: pod\n  context:\n    cluster: testbed\n    user: pod\n    namespace: {namespace}\n\
current-context: pod\n",
            token = token_file.display(),
        )
    }
}

/// One mount of a container, as listed in `$RIFFLE_MOUNTS`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct MountEntry {
    /// Volume name.
    pub name: String,
    /// The in-pod path from the spec.
    pub mount_path: String,
    /// Where it really is on the host.
    pub host_path: PathBuf,
    /// `readOnly` from the spec (not enforced).
    pub read_only: bool,
}

/// Everything needed to (re)start one container process.
#[derive(Debug, Clone)]
pub struct PreparedContainer {
    /// Container name.
    pub name: String,
    /// Image reference.
    pub image: String,
    /// Executable.
    pub program: PathBuf,
    /// Arguments.
    pub args: Vec<String>,
    /// Complete environment (the agent's own environment is not inherited).
    pub env: Vec<(String, String)>,
    /// Working directory.
    pub cwd: PathBuf,
    /// Log file (stdout and stderr).
    pub log_file: PathBuf,
    /// PID file.
    pub pid_file: PathBuf,
    /// The container spec.
    pub spec: Container,
}

/// A prepared pod.
#[derive(Debug, Clone)]
pub struct Sandbox {
    /// Its directory.
    pub dir: PodDir,
    /// Init containers, in order.
    pub init_containers: Vec<PreparedContainer>,
    /// Containers.
    pub containers: Vec<PreparedContainer>,
}

/// What sandbox preparation needs from the agent.
pub struct SandboxContext<'a> {
    /// Admin client.
    pub client: &'a Client,
    /// API server access for in-pod clients.
    pub cluster: &'a ClusterAccess,
    /// Image mapping.
    pub images: &'a ImageMap,
    /// Node name.
    pub node_name: &'a str,
    /// Node IP.
    pub host_ip: &'a str,
    /// Agent state directory.
    pub state_dir: &'a Path,
}

/// Fetches (and caches) config maps and secrets of the pod's namespace.
struct Objects<'a> {
    client: &'a Client,
    namespace: &'a str,
    config_maps: HashMap<String, Option<BTreeMap<String, Vec<u8>>>>,
    secrets: HashMap<String, Option<BTreeMap<String, Vec<u8>>>>,
}

fn not_found_as_none<T>(result: kube::Result<T>, what: &str) -> Result<Option<T>> {
    match result {
        Ok(v) => Ok(Some(v)),
        Err(kube::Error::Api(s)) if s.code == 404 => Ok(None),
        Err(e) => Err(Error::kube(format!("reading {what}"), e)),
    }
}

/// Text and binary keys of a ConfigMap or Secret as bytes (binary wins on a clash, as the
/// API server never returns both for one key anyway).
fn merge_data(
    text: Option<BTreeMap<String, String>>,
    binary: Option<BTreeMap<String, k8s_openapi::ByteString>>,
) -> BTreeMap<String, Vec<u8>> {
    let mut out: BTreeMap<String, Vec<u8>> = text
        .unwrap_or_default()
        .into_iter()
        .map(|(k, v)| (k, v.into_bytes()))
        .collect();
    for (k, v) in binary.unwrap_or_default() {
        out.insert(k, v.0);
    }
    out
}

impl<'a> Objects<'a> {
    async fn config_map(&mut self, name: &str) -> Result<Option<&BTreeMap<String, Vec<u8>>>> {
        if !self.config_maps.contains_key(name) {
            let api: Api<ConfigMap> = Api::namespaced(self.client.clone(), self.namespace);
            let cm = not_found_as_none(api.get(name).await, &format!("configmap {name}"))?;
            let data = cm.map(|cm| merge_data(cm.data, cm.binary_data));
            self.config_maps.insert(name.to_owned(), data);
        }
        Ok(self.config_maps[name].as_ref())
    }

    async fn secret(&mut self, name: &str) -> Result<Option<&BTreeMap<String, Vec<u8>>>> {
        if !self.secrets.contains_key(name) {
            let api: Api<Secret> = Api::namespaced(self.client.clone(), self.namespace);
            let secret = not_found_as_none(api.get(name).await, &format!("secret {name}"))?;
            let data = secret.map(|s| merge_data(s.string_data, s.data));
            self.secrets.insert(name.to_owned(), data);
        }
        Ok(self.secrets[name].as_ref())
    }
}

/// Value of a downward-API `fieldRef`.
pub fn field_ref(pod: &Pod, field_path: &str, pod_ip: &str, host_ip: &str) -> Result<String> {
    let meta = &pod.metadata;
    let spec = pod.spec.as_ref();
    let quoted = |prefix: &str| {
        field_path
            .strip_prefix(prefix)
            .and_then(|rest| rest.strip_suffix("']"))
            .map(str::to_owned)
    };
    let value = match field_path {
        "metadata.name" => meta.name.clone().unwrap_or_default(),
        "metadata.namespace" => meta.namespace.clone().unwrap_or_default(),
        "metadata.uid" => meta.uid.clone().unwrap_or_default(),
        "spec.nodeName" => spec.and_then(|s| s.node_name.clone()).unwrap_or_default(),
        "spec.serviceAccountName" => spec
            .and_then(|s| s.service_account_name.clone())
            .unwrap_or_else(|| "default".to_owned()),
        "status.podIP" | "status.podIPs" => pod_ip.to_owned(),
        "status.hostIP" | "status.hostIPs" => host_ip.to_owned(),
        "metadata.labels" | "metadata.annotations" => {
            let map = if field_path == "metadata.labels" {
                &meta.labels
            } else {
                &meta.annotations
            };
            map.iter()
                .flatten()
                .map(|(k, v)| format!("{k}={v:?}"))
                .collect::<Vec<_>>()
                .join("\n")
        }
        _ => {
            if let Some(key) = quoted("metadata.labels['") {
                meta.labels
                    .as_ref()
                    .and_then(|l| l.get(&key))
                    .cloned()
                    .unwrap_or_default()
            } else if let Some(key) = quoted("metadata.annotations['") {
                meta.annotations
                    .as_ref()
                    .and_then(|a| a.get(&key))
                    .cloned()
                    .unwrap_or_default()
            } else {
                return Err(Error::ContainerConfig(format!(
                    "unsupported fieldRef {field_path:?}"
                )));
            }
        }
    };
    Ok(value)
}

/// Value of a `resourceFieldRef`: the container's limit/request as written in the spec
/// (divisors are ignored), or the node's capacity for unset limits.
pub fn resource_field_ref(container: &Container, resource: &str) -> String {
    let resources = container.resources.as_ref();
    let (kind, name) = resource.split_once('.').unwrap_or(("limits", resource));
    let set = match kind {
        "limits" => resources.and_then(|r| r.limits.as_ref()),
        _ => resources.and_then(|r| r.requests.as_ref()),
    }
    .and_then(|m| m.get(name))
    .map(|q| q.0.clone());
    set.unwrap_or_else(|| match (kind, name) {
        ("limits", "cpu") => std::thread::available_parallelism()
            .map_or(1, std::num::NonZeroUsize::get)
            .to_string(),
        ("limits", "memory") => crate::node_agent::node::memory_bytes().to_string(),
        _ => "0".to_owned(),
    })
}

/// Rewrites a value that is an absolute path under one of the mounts (possibly after a
/// `--flag=` prefix) to the host path. Longest mount paths win.
pub fn rewrite_mount_paths(value: &str, mounts: &[MountEntry]) -> String {
    let rewrite = |v: &str| -> Option<String> {
        mounts
            .iter()
            .filter(|m| m.mount_path != "/")
            .filter_map(|m| {
                let base = m.mount_path.trim_end_matches('/');
                let rest = v.strip_prefix(base)?;
                (rest.is_empty() || rest.starts_with('/')).then_some((base.len(), m, rest))
            })
            .max_by_key(|(len, _, _)| *len)
            .map(|(_, m, rest)| format!("{}{rest}", m.host_path.display()))
    };
    if let Some(out) = rewrite(value) {
        return out;
    }
    if let Some((flag, path)) = value.split_once('=') {
        if let Some(out) = rewrite(path) {
            return format!("{flag}={out}");
        }
    }
    value.to_owned()
}

/// Joins a relative API path (item path, subPath) under `base`, refusing escapes.
fn safe_join(base: &Path, relative: &str) -> Result<PathBuf> {
    let rel = Path::new(relative);
    if rel
        .components()
        .any(|c| !matches!(c, Component::Normal(_) | Component::CurDir))
    {
        return Err(Error::ContainerConfig(format!(
            "invalid relative path {relative:?}"
        )));
    }
    Ok(base.join(rel))
}

fn write_file(path: &Path, data: &[u8], mode: Option<i32>) -> Result<()> {
    if let Some(parent) = path.parent() {
        std::fs::create_dir_all(parent).map_err(|e| Error::io(parent, e))?;
    }
    std::fs::write(path, data).map_err(|e| Error::io(path, e))?;
    let mode = mode.and_then(|m| u32::try_from(m).ok()).unwrap_or(0o644) | 0o600;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode))
        .map_err(|e| Error::io(path, e))
}

fn create_dir(path: &Path) -> Result<()> {
    std::fs::create_dir_all(path).map_err(|e| Error::io(path, e))
}

/// Writes `data` keys (all, or the listed items) into `dir`.
/// Write a ConfigMap's or Secret's keys into `dir`; a missing object is an error unless the
/// volume marks it optional.
fn write_object_keys(
    dir: &Path,
    data: Option<&BTreeMap<String, Vec<u8>>>,
    items: Option<&Vec<KeyToPath>>,
    default_mode: Option<i32>,
    optional: Option<bool>,
    what: &str,
) -> Result<()> {
    match data {
        Some(data) => write_keys(dir, data, items, default_mode, what),
        None if optional == Some(true) => Ok(()),
        None => Err(Error::ContainerConfig(format!("{what} not found"))),
    }
}

fn write_keys(
    dir: &Path,
    data: &BTreeMap<String, Vec<u8>>,
    items: Option<&Vec<KeyToPath>>,
    default_mode: Option<i32>,
    what: &str,
) -> Result<()> {
    match items {
        Some(items) => {
            for item in items {
                let value = data.get(&item.key).ok_or_else(|| {
                    Error::ContainerConfig(format!("{what} has no key {:?}", item.key))
                })?;
                write_file(
                    &safe_join(dir, &item.path)?,
                    value,
                    item.mode.or(default_mode),
                )?;
            }
        }
        None => {
            for (key, value) in data {
                write_file(&safe_join(dir, key)?, value, default_mode)?;
            }
        }
    }
    Ok(())
}

/// Prepares a pod: directory, volumes, service account credentials, containers.
pub async fn prepare(ctx: &SandboxContext<'_>, pod: &Pod, pod_ip: Ipv4Addr) -> Result<Sandbox> {
    let namespace = pod.metadata.namespace.as_deref().unwrap_or("default");
    let name = pod.metadata.name.as_deref().unwrap_or_default();
    let uid = pod.metadata.uid.as_deref().unwrap_or_default();
    let spec = pod
        .spec
        .as_ref()
        .ok_or_else(|| Error::ContainerConfig("pod has no spec".into()))?;
    let dir = PodDir::new(ctx.state_dir, namespace, name, uid);
    create_dir(&dir.root().join("logs"))?;
    let pod_ip_s = pod_ip.to_string();
    let pod_json = serde_json::json!({
        "namespace": namespace, "name": name, "uid": uid,
        "node": ctx.node_name, "podIP": pod_ip_s,
    });
    write_file(&dir.pod_file(), pod_json.to_string().as_bytes(), None)?;

    let mut objects = Objects {
        client: ctx.client,
        namespace,
        config_maps: HashMap::new(),
        secrets: HashMap::new(),
    };

    // Service account credentials.
    let sa_name = spec.service_account_name.as_deref().unwrap_or("default");
    let sa_api: Api<ServiceAccount> = Api::namespaced(ctx.client.clone(), namespace);
    let automount = match spec.automount_service_account_token {
        Some(v) => v,
        None => not_found_as_none(
            sa_api.get(sa_name).await,
            &format!("serviceaccount {sa_name}"),
        )?
        .and_then(|sa| sa.automount_service_account_token)
        .unwrap_or(true),
    };
    let request_token = |audience: Option<String>, expiration: Option<i64>| {
        let sa_api = sa_api.clone();
        async move {
            let request = TokenRequest {
                spec: TokenRequestSpec {
                    audiences: audience.into_iter().collect(),
                    expiration_seconds: Some(expiration.unwrap_or(TOKEN_EXPIRATION_SECONDS)),
                    bound_object_ref: Some(BoundObjectReference {
                        api_version: Some("v1".into()),
                        kind: Some("Pod".into()),
                        name: Some(name.to_owned()),
                        uid: Some(uid.to_owned()),
                    }),
                },
                ..Default::default()
            };
            let response: TokenRequest = sa_api
                .create_subresource("token", sa_name, &PostParams::default(), &request)
                .await
                .map_err(|e| {
                    Error::kube(
                        format!("requesting a token for serviceaccount {sa_name}"),
                        e,
                    )
                })?;
            response
                .status
                .map(|s| s.token)
                .ok_or_else(|| Error::ContainerConfig("token request returned no token".into()))
        }
    };
    let mut kubeconfig = None;
    if automount {
        let token = request_token(None, None).await?;
        let sa_dir = dir.service_account();
        write_file(&sa_dir.join("token"), token.as_bytes(), Some(0o600))?;
        write_file(&sa_dir.join("namespace"), namespace.as_bytes(), None)?;
        let ca_file = match &ctx.cluster.ca_pem {
            Some(pem) => {
                write_file(&sa_dir.join("ca.crt"), pem, None)?;
                Some(sa_dir.join("ca.crt"))
            }
            None => None,
        };
        let yaml =
            ctx.cluster
                .kubeconfig_yaml(namespace, ca_file.as_deref(), &sa_dir.join("token"));
        write_file(&dir.kubeconfig(), yaml.as_bytes(), Some(0o600))?;
        kubeconfig = Some(dir.kubeconfig());
    }

    // Volumes.
    let mut volumes: HashMap<String, PathBuf> = HashMap::new();
    for volume in spec.volumes.iter().flatten() {
        let path = materialise_volume(
            ctx,
            pod,
            volume,
            &dir,
            &pod_ip_s,
            &mut objects,
            &request_token,
        )
        .await?;
        volumes.insert(volume.name.clone(), path);
    }

    let mut init_containers = Vec::new();
    for c in spec.init_containers.iter().flatten() {
        init_containers.push(
            prepare_container(
                ctx,
                pod,
                c,
                &dir,
                &pod_ip_s,
                &volumes,
                kubeconfig.as_deref(),
                &mut objects,
            )
            .await?,
        );
    }
    let mut containers = Vec::new();
    for c in &spec.containers {
        containers.push(
            prepare_container(
                ctx,
                pod,
                c,
                &dir,
                &pod_ip_s,
                &volumes,
                kubeconfig.as_deref(),
                &mut objects,
            )
            .await?,
        );
    }
    Ok(Sandbox {
        dir,
        init_containers,
        containers,
    })
}

#[allow(clippy::too_many_arguments)]
async fn materialise_volume<F, Fut>(
    ctx: &SandboxContext<'_>,
    pod: &Pod,
    volume: &Volume,
    dir: &PodDir,
    pod_ip: &str,
    objects: &mut Objects<'_>,
    request_token: &F,
) -> Result<PathBuf>
where
    F: Fn(Option<String>, Option<i64>) -> Fut,
    Fut: std::future::Future<Output = Result<String>>,
{
    let path = dir.volume(&volume.name);
    let what = |kind: &str, name: &str| format!("volume {:?}: {kind} {name:?}", volume.name);
    if let Some(host) = &volume.host_path {
        if matches!(host.type_.as_deref(), Some("DirectoryOrCreate")) {
            create_dir(Path::new(&host.path))?;
        }
        return Ok(PathBuf::from(&host.path));
    }
    // Materialised volumes are rebuilt from scratch (except emptyDir, which survives restarts).
    if volume.empty_dir.is_some() {
        create_dir(&path)?;
        return Ok(path);
    }
    if path.exists() {
        std::fs::remove_dir_all(&path).map_err(|e| Error::io(&path, e))?;
    }
    create_dir(&path)?;
    let downward = |items: &[DownwardAPIVolumeFile], default_mode: Option<i32>| -> Result<()> {
        for item in items {
            let value = if let Some(f) = &item.field_ref {
                field_ref(pod, &f.field_path, pod_ip, ctx.host_ip)?
            } else if let Some(r) = &item.resource_field_ref {
                let container = pod
                    .spec
                    .iter()
                    .flat_map(|s| &s.containers)
                    .find(|c| Some(&c.name) == r.container_name.as_ref())
                    .cloned()
                    .unwrap_or_default();
                resource_field_ref(&container, &r.resource)
            } else {
                String::new()
            };
            write_file(
                &safe_join(&path, &item.path)?,
                value.as_bytes(),
                item.mode.or(default_mode),
            )?;
        }
        Ok(())
    };
    if let Some(cm) = &volume.config_map {
        write_object_keys(
            &path,
            objects.config_map(&cm.name).await?,
            cm.items.as_ref(),
            cm.default_mode,
            cm.optional,
            &what("configmap", &cm.name),
        )?;
    } else if let Some(secret) = &volume.secret {
        let name = secret.secret_name.clone().unwrap_or_default();
        write_object_keys(
            &path,
            objects.secret(&name).await?,
            secret.items.as_ref(),
            secret.default_mode,
            secret.optional,
            &what("secret", &name),
        )?;
    } else if let Some(d) = &volume.downward_api {
        downward(d.items.as_deref().unwrap_or_default(), d.default_mode)?;
    } else if let Some(projected) = &volume.projected {
        let mode = projected.default_mode;
        for source in projected.sources.iter().flatten() {
            if let Some(cm) = &source.config_map {
                write_object_keys(
                    &path,
                    objects.config_map(&cm.name).await?,
                    cm.items.as_ref(),
                    mode,
                    cm.optional,
                    &what("configmap", &cm.name),
                )?;
            } else if let Some(secret) = &source.secret {
                write_object_keys(
                    &path,
                    objects.secret(&secret.name).await?,
                    secret.items.as_ref(),
                    mode,
                    secret.optional,
                    &what("secret", &secret.name),
                )?;
            } else if let Some(d) = &source.downward_api {
                downward(d.items.as_deref().unwrap_or_default(), mode)?;
            } else if let Some(token) = &source.service_account_token {
                let value = request_token(
                    token.audience.clone().filter(|a| !a.is_empty()),
                    token.expiration_seconds,
                )
                .await?;
                write_file(
                    &safe_join(&path, &token.path)?,
                    value.as_bytes(),
                    Some(0o600),
                )?;
            } else {
                return Err(Error::ContainerConfig(format!(
                    "volume {:?}: unsupported projected source",
                    volume.name
                )));
            }
        }
    } else {
        return Err(Error::ContainerConfig(format!(
            "volume {:?}: only configMap, secret, emptyDir, hostPath, downwardAPI and projected volumes are supported",
            volume.name
        )));
    }
    Ok(path)
}

/// Sets `key` to `value`, replacing an earlier definition in place.
fn set_env(env: &mut Vec<(String, String)>, key: &str, value: String) {
    match env.iter_mut().find(|(k, _)| k == key) {
        Some(entry) => entry.1 = value,
        None => env.push((key.to_owned(), value)),
    }
}

#[allow(clippy::too_many_arguments)]
async fn prepare_container(
    ctx: &SandboxContext<'_>,
    pod: &Pod,
    container: &Container,
    dir: &PodDir,
    pod_ip: &str,
    volumes: &HashMap<String, PathBuf>,
    kubeconfig: Option<&Path>,
    objects: &mut Objects<'_>,
) -> Result<PreparedContainer> {
    let image = container.image.clone().unwrap_or_default();
    let binary = ctx.images.resolve(&image)?.to_owned();

    // Mounts: symlinks under the mount root.
    let root = dir.mount_root(&container.name);
    if root.exists() {
        std::fs::remove_dir_all(&root).map_err(|e| Error::io(&root, e))?;
    }
    create_dir(&root)?;
    let mut mounts = Vec::new();
    for m in container.volume_mounts.iter().flatten() {
        let volume = volumes.get(&m.name).ok_or_else(|| {
            Error::ContainerConfig(format!("volumeMount of unknown volume {:?}", m.name))
        })?;
        let host_path = match m.sub_path.as_deref().filter(|s| !s.is_empty()) {
            Some(sub) => {
                let p = safe_join(volume, sub)?;
                if !p.exists() {
                    create_dir(&p)?;
                }
                p
            }
            None => volume.clone(),
        };
        let link = safe_join(&root, m.mount_path.trim_start_matches('/'))?;
        if link == root {
            return Err(Error::ContainerConfig(
                "mounting a volume at / is not supported".into(),
            ));
        }
        if let Some(parent) = link.parent() {
            create_dir(parent)?;
        }
        std::os::unix::fs::symlink(&host_path, &link).map_err(|e| Error::io(&link, e))?;
        mounts.push(MountEntry {
            name: m.name.clone(),
            mount_path: m.mount_path.clone(),
            host_path,
            read_only: m.read_only.unwrap_or(false),
        });
    }
    let mounts_file = dir.mounts_file(&container.name);
    let json = serde_json::to_vec_pretty(&mounts).map_err(|e| Error::Serde(e.to_string()))?;
    write_file(&mounts_file, &json, None)?;

    // Environment: agent defaults, then envFrom, then env (later definitions win).
    let pod_name = pod.metadata.name.clone().unwrap_or_default();
    let mut env: Vec<(String, String)> = vec![
        (
            "PATH".into(),
            std::env::var("PATH").unwrap_or_else(|_| "/usr/local/bin:/usr/bin:/bin".into()),
        ),
        ("HOME".into(), root.display().to_string()),
        ("HOSTNAME".into(), pod_name.clone()),
        ("POD_NAME".into(), pod_name),
        (
            "POD_NAMESPACE".into(),
            pod.metadata.namespace.clone().unwrap_or_default(),
        ),
        ("POD_IP".into(), pod_ip.to_owned()),
        ("NODE_NAME".into(), ctx.node_name.to_owned()),
        ("RIFFLE_POD_DIR".into(), dir.root().display().to_string()),
        ("RIFFLE_MOUNT_ROOT".into(), root.display().to_string()),
        ("RIFFLE_MOUNTS".into(), mounts_file.display().to_string()),
    ];
    if let Some(kc) = kubeconfig {
        env.push(("KUBECONFIG".into(), kc.display().to_string()));
    }
    for from in container.env_from.iter().flatten() {
        let prefix = from.prefix.clone().unwrap_or_default();
        let data = if let Some(r) = &from.config_map_ref {
            match objects.config_map(&r.name).await? {
                Some(d) => Some(d.clone()),
                None if r.optional == Some(true) => None,
                None => {
                    return Err(Error::ContainerConfig(format!(
                        "configmap {:?} not found",
                        r.name
                    )))
                }
            }
        } else if let Some(r) = &from.secret_ref {
            match objects.secret(&r.name).await? {
                Some(d) => Some(d.clone()),
                None if r.optional == Some(true) => None,
                None => {
                    return Err(Error::ContainerConfig(format!(
                        "secret {:?} not found",
                        r.name
                    )))
                }
            }
        } else {
            None
        };
        for (k, v) in data.into_iter().flatten() {
            set_env(
                &mut env,
                &format!("{prefix}{k}"),
                String::from_utf8_lossy(&v).into_owned(),
            );
        }
    }
    for var in container.env.iter().flatten() {
        let value = if let Some(source) = &var.value_from {
            if let Some(f) = &source.field_ref {
                Some(field_ref(pod, &f.field_path, pod_ip, ctx.host_ip)?)
            } else if let Some(r) = &source.resource_field_ref {
                Some(resource_field_ref(container, &r.resource))
            } else if let Some(r) = &source.config_map_key_ref {
                match objects
                    .config_map(&r.name)
                    .await?
                    .and_then(|d| d.get(&r.key))
                {
                    Some(v) => Some(String::from_utf8_lossy(v).into_owned()),
                    None if r.optional == Some(true) => None,
                    None => {
                        return Err(Error::ContainerConfig(format!(
                            "env {}: key {:?} of configmap {:?} not found",
                            var.name, r.key, r.name
                        )))
                    }
                }
            } else if let Some(r) = &source.secret_key_ref {
                match objects.secret(&r.name).await?.and_then(|d| d.get(&r.key)) {
                    Some(v) => Some(String::from_utf8_lossy(v).into_owned()),
                    None if r.optional == Some(true) => None,
                    None => {
                        return Err(Error::ContainerConfig(format!(
                            "env {}: key {:?} of secret {:?} not found",
                            var.name, r.key, r.name
                        )))
                    }
                }
            } else {
                return Err(Error::ContainerConfig(format!(
                    "env {}: unsupported valueFrom",
                    var.name
                )));
            }
        } else {
            let raw = var.value.clone().unwrap_or_default();
            let expanded = expand_vars(&raw, |n| {
                env.iter().find(|(k, _)| k == n).map(|(_, v)| v.clone())
            });
            Some(rewrite_mount_paths(&expanded, &mounts))
        };
        if let Some(value) = value {
            set_env(&mut env, &var.name, value);
        }
    }

    let lookup = |n: &str| env.iter().find(|(k, _)| k == n).map(|(_, v)| v.clone());
    let expand = |list: &Option<Vec<String>>| -> Vec<String> {
        list.iter()
            .flatten()
            .map(|a| rewrite_mount_paths(&expand_vars(a, lookup), &mounts))
            .collect()
    };
    let command = container_command(
        &binary,
        &expand(&container.command),
        &expand(&container.args),
    );
    let cwd = match container.working_dir.as_deref().filter(|w| !w.is_empty()) {
        Some(w) => {
            let rewritten = PathBuf::from(rewrite_mount_paths(w, &mounts));
            let p = if rewritten.as_os_str() == w {
                safe_join(&root, w.trim_start_matches('/'))?
            } else {
                rewritten
            };
            create_dir(&p)?;
            p
        }
        None => root.clone(),
    };
    Ok(PreparedContainer {
        name: container.name.clone(),
        image,
        program: command.program,
        args: command.args,
        env,
        cwd,
        log_file: dir.log_file(&container.name),
        pid_file: dir.pid_file(&container.name),
        spec: container.clone(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;

    fn mount(path: &str, host: &str) -> MountEntry {
        MountEntry {
            name: "v".into(),
            mount_path: path.into(),
            host_path: host.into(),
            read_only: false,
        }
    }

    #[test]
    fn rewrites_paths_under_mounts() {
        let mounts = [
            mount("/etc/riffle", "/h/cfg"),
            mount("/etc/riffle/secret/", "/h/sec"),
        ];
        assert_eq!(
            rewrite_mount_paths("/etc/riffle/job.yaml", &mounts),
            "/h/cfg/job.yaml"
        );
        assert_eq!(rewrite_mount_paths("/etc/riffle", &mounts), "/h/cfg");
        assert_eq!(
            rewrite_mount_paths("/etc/riffle/secret/key", &mounts),
            "/h/sec/key"
        );
        assert_eq!(
            rewrite_mount_paths("--config=/etc/riffle/a", &mounts),
            "--config=/h/cfg/a"
        );
        assert_eq!(
            rewrite_mount_paths("/etc/riffle2/a", &mounts),
            "/etc/riffle2/a"
        );
        assert_eq!(rewrite_mount_paths("run", &mounts), "run");
    }

    #[test]
    fn downward_fields() {
        let pod = Pod {
            metadata: ObjectMeta {
                name: Some("p".into()),
                namespace: Some("ns".into()),
                labels: Some([("app".to_string(), "web".to_string())].into()),
                ..Default::default()
            },
            spec: Some(k8s_openapi::api::core::v1::PodSpec {
                node_name: Some("n1".into()),
                ..Default::default()
            }),
            ..Default::default()
        };
        let f = |p: &str| field_ref(&pod, p, "127.0.1.1", "127.0.0.1").unwrap();
        assert_eq!(f("metadata.name"), "p");
        assert_eq!(f("metadata.namespace"), "ns");
        assert_eq!(f("status.podIP"), "127.0.1.1");
        assert_eq!(f("spec.nodeName"), "n1");
        assert_eq!(f("spec.serviceAccountName"), "default");
        assert_eq!(f("metadata.labels['app']"), "web");
        assert!(field_ref(&pod, "status.phase", "", "").is_err());
    }

    #[test]
    fn safe_join_refuses_escapes() {
        assert!(safe_join(Path::new("/a"), "../b").is_err());
        assert!(safe_join(Path::new("/a"), "/b").is_err());
        assert_eq!(
            safe_join(Path::new("/a"), "b/c").unwrap(),
            Path::new("/a/b/c")
        );
    }

    #[test]
    fn pod_kubeconfig_is_valid() {
        let access = ClusterAccess {
            server: "https://127.0.0.1:6443".into(),
            ca_pem: None,
            insecure: false,
        };
        let yaml =
            access.kubeconfig_yaml("ns", Some(Path::new("/x/ca.crt")), Path::new("/x/token"));
        let parsed = Kubeconfig::from_yaml(&yaml).unwrap();
        assert_eq!(parsed.current_context.as_deref(), Some("pod"));
        let back = ClusterAccess::from_kubeconfig(&Kubeconfig {
            clusters: parsed.clusters.clone(),
            contexts: parsed.contexts.clone(),
            current_context: parsed.current_context.clone(),
            ..Default::default()
        });
        // The CA file does not exist, so reading it fails: proves the path was carried over.
        assert!(matches!(back, Err(Error::Io { .. })));
    }
}
