//! A test environment on the local test bed: a namespace, and a node agent of its own.
//!
//! [`TestEnv::start`] creates a namespace (unique per test and process) and starts a
//! `riffle-node-agent` registering a node of its own (`riffle-e2e-<test>-<pid>-<n>`,
//! `--delete-node-on-exit`); [`TestEnv::pod`] pins pods to that node with a
//! `kubernetes.io/hostname` node selector, so tests and test binaries can run in parallel.
//! [`TestEnv::namespace_only`] gives the namespace without an agent. Waits are watch-based
//! and bounded by [`TIMEOUT`]; a timeout panics with the agent's log. Dropping the
//! environment (also after a failed assertion) stops the agent (SIGTERM, which stops its pod
//! processes and deletes its node) and deletes the namespace in the background.
//!
//! Binaries are found next to the running test executable ([`binary`]):
//! `env!("CARGO_BIN_EXE_…")` only works inside an integration test of the crate that owns
//! the binary. The agent's image map sends
//!
//! | image | binary |
//! | --- | --- |
//! | `riffle-testbed-probe:*` | `<target>/debug/riffle-testbed-probe` |
//! | `riffle-runtime:*` | `<target>/debug/riffle` |
//! | `riffle-operator:*` | `<target>/debug/riffle-operator` |
//!
//! All three are mapped whether the binaries exist or not: a missing one only shows when a
//! pod uses its image (the container waits with `ErrImagePull`). `make test` builds them
//! all (`cargo test --workspace --no-run` builds the binaries of every package with
//! integration tests); otherwise run `cargo build --workspace --bins`.
//!
//! The test bed must be running (`make testbed-up`, then `eval "$(e2e/testbed/testbed env)"`);
//! [`TestEnv::start`] panics with "test bed not running" otherwise.

use std::fmt::Debug;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::Duration;

use futures::StreamExt;
use k8s_openapi::api::core::v1::{ContainerStatus, Namespace, Node, Pod, ServiceAccount};
use k8s_openapi::NamespaceResourceScope;
use kube::api::{DeleteParams, PostParams};
use kube::runtime::wait::{await_condition, Condition};
use kube::runtime::{reflector, watcher, WatchStreamExt};
use kube::{Api, Client, Resource};
use serde::de::DeserializeOwned;
use serde_json::json;

use crate::node_agent::read_logs;
use crate::testbed::{client, kubeconfig_path};

/// The bound of every wait.
pub const TIMEOUT: Duration = Duration::from_secs(120);

/// How long [`Drop`] waits for the agent to exit after SIGTERM.
const AGENT_STOP_TIMEOUT: Duration = Duration::from_secs(60);

/// The directory holding the workspace's binaries: the running executable's directory, or
/// its parent when that is `deps/` (a test executable is `<target>/debug/deps/<test>-<hash>`,
/// the binaries are in `<target>/debug/`).
pub fn bin_dir() -> PathBuf {
    let exe = std::env::current_exe().expect("path of the running executable");
    let dir = exe.parent().expect("executable has a directory");
    if dir.file_name().is_some_and(|n| n == "deps") {
        dir.parent().expect("deps/ has a parent").to_owned()
    } else {
        dir.to_owned()
    }
}

/// The path of the workspace binary `name` (in [`bin_dir`]). Panics, naming the build
/// command, when it has not been built.
pub fn binary(name: &str) -> PathBuf {
    let path = bin_dir().join(name);
    assert!(
        path.is_file(),
        "binary {name} not found at {}: build the workspace's binaries first \
         (`cargo build --workspace --bins`, with the same CARGO_TARGET_DIR)",
        path.display()
    );
    path
}

/// The state directory shared by every agent on the machine (pod dirs, pod IP locks):
/// `$RIFFLE_TESTBED_DIR` (exported by `testbed env`), else the agent's default.
pub fn state_dir() -> PathBuf {
    std::env::var_os("RIFFLE_TESTBED_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(crate::node_agent::default_state_dir)
}

/// A namespace and (unless [`TestEnv::namespace_only`]) a running node agent, both removed
/// on drop.
pub struct TestEnv {
    /// Admin client of the test bed's API server.
    pub client: Client,
    /// This test's namespace.
    pub ns: String,
    /// This test's node (registered by the agent; only a name for [`TestEnv::namespace_only`]).
    pub node: String,
    /// The admin kubeconfig the agent uses.
    pub kubeconfig: PathBuf,
    /// The agent's image mapping file (see the module documentation).
    pub image_map: PathBuf,
    /// The agent's stdout+stderr, appended across [`TestEnv::spawn_agent`] calls.
    pub agent_log_file: PathBuf,
    /// The running agent; `None` after [`TestEnv::kill_agent`] (assign the result of
    /// [`TestEnv::spawn_agent`] to restart it) and for [`TestEnv::namespace_only`].
    pub agent: Option<Child>,
    _tmp: tempfile::TempDir,
}

static COUNTER: AtomicU32 = AtomicU32::new(0);

impl TestEnv {
    /// Creates namespace `e2e-<test>-<suffix>` and starts an agent for node
    /// `riffle-e2e-<test>-<suffix>`; returns once the namespace's default service account
    /// exists and the node is Ready. `test` should be short and DNS-safe.
    pub async fn start(test: &str) -> Self {
        let mut env = Self::namespace_only(test).await;
        env.agent = Some(env.spawn_agent());
        let nodes: Api<Node> = Api::all(env.client.clone());
        let node = env.node.clone();
        env.wait_named(nodes, &node, "node Ready", |n: Option<&Node>| {
            n.and_then(|n| n.status.as_ref())
                .and_then(|s| s.conditions.as_ref())
                .is_some_and(|cs| cs.iter().any(|c| c.type_ == "Ready" && c.status == "True"))
        })
        .await;
        env
    }

    /// Like [`TestEnv::start`] without the agent: only the namespace (and the image map,
    /// should the test start an agent itself).
    pub async fn namespace_only(test: &str) -> Self {
        let kubeconfig = kubeconfig_path();
        let client = client(&kubeconfig).await;
        let suffix = format!(
            "{}-{}",
            std::process::id(),
            COUNTER.fetch_add(1, Ordering::SeqCst)
        );
        let tmp = tempfile::tempdir().expect("temporary directory");
        let image_map = tmp.path().join("images.yaml");
        std::fs::write(&image_map, image_map_yaml(&bin_dir())).expect("write image map");
        let env = Self {
            client,
            ns: format!("e2e-{test}-{suffix}"),
            node: format!("riffle-e2e-{test}-{suffix}"),
            kubeconfig,
            image_map,
            agent_log_file: tmp.path().join("agent.log"),
            agent: None,
            _tmp: tmp,
        };
        Api::<Namespace>::all(env.client.clone())
            .create(
                &PostParams::default(),
                &serde_json::from_value(json!({"metadata": {"name": env.ns}})).unwrap(),
            )
            .await
            .expect("create namespace");
        // Pods can only be created once the namespace's default service account exists.
        env.wait_named(
            env.api::<ServiceAccount>(),
            "default",
            "default service account",
            |sa: Option<&ServiceAccount>| sa.is_some(),
        )
        .await;
        env
    }

    /// Starts a node agent for this test's node (appending to its log); the caller keeps the
    /// child (usually in [`TestEnv::agent`], so that drop stops it).
    pub fn spawn_agent(&self) -> Child {
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&self.agent_log_file)
            .expect("open agent log");
        Command::new(binary("riffle-node-agent"))
            .args([
                "run",
                "--node-name",
                &self.node,
                "--delete-node-on-exit",
                "--image-map",
            ])
            .arg(&self.image_map)
            .arg("--state-dir")
            .arg(state_dir())
            .arg("--kubeconfig")
            .arg(&self.kubeconfig)
            .env("RUST_LOG", "info,riffle_e2e=debug")
            .stdin(Stdio::null())
            .stdout(log.try_clone().expect("agent log handle"))
            .stderr(log)
            .spawn()
            .expect("start riffle-node-agent")
    }

    /// SIGKILLs the node agent and waits for it to be gone (its pod processes keep running).
    pub fn kill_agent(&mut self) {
        let mut agent = self.agent.take().expect("agent running");
        agent.kill().expect("SIGKILL the agent");
        agent.wait().expect("wait for the agent");
    }

    /// An API for namespaced resources in this test's namespace.
    pub fn api<K: Resource<Scope = NamespaceResourceScope>>(&self) -> Api<K>
    where
        K::DynamicType: Default,
    {
        Api::namespaced(self.client.clone(), &self.ns)
    }

    /// The agent's log so far (empty if there is none).
    pub fn agent_log(&self) -> String {
        std::fs::read_to_string(&self.agent_log_file).unwrap_or_default()
    }

    /// Waits (watch-based, bounded by [`TIMEOUT`]) until `cond` holds for the named object;
    /// returns it (`None` if `cond` held for its absence). Panics with the agent's log.
    pub async fn wait_named<K>(
        &self,
        api: Api<K>,
        name: &str,
        what: &str,
        cond: impl Condition<K>,
    ) -> Option<K>
    where
        K: Clone + Debug + Send + DeserializeOwned + Resource + 'static,
    {
        match tokio::time::timeout(TIMEOUT, await_condition(api, name, cond)).await {
            Ok(Ok(obj)) => obj,
            Ok(Err(e)) => panic!(
                "watching {name} ({what}) failed: {e}\n--- agent log ---\n{}",
                self.agent_log()
            ),
            Err(_) => panic!(
                "timed out waiting for {name}: {what}\n--- agent log ---\n{}",
                self.agent_log()
            ),
        }
    }

    /// Waits (bounded by [`TIMEOUT`]) until `cond` holds for the set of objects matching the
    /// label selector `labels`; returns that set. Panics with the agent's log.
    pub async fn wait_list<K>(
        &self,
        api: Api<K>,
        labels: &str,
        what: &str,
        cond: impl Fn(&[K]) -> bool,
    ) -> Vec<K>
    where
        K: Clone + Debug + Send + Sync + DeserializeOwned + Resource + 'static,
        K::DynamicType: Default + Eq + std::hash::Hash + Clone,
    {
        let (reader, writer) = reflector::store();
        let stream = reflector(
            writer,
            watcher(api, watcher::Config::default().labels(labels)).default_backoff(),
        );
        let wait = async {
            let mut stream = std::pin::pin!(stream);
            while let Some(event) = stream.next().await {
                let event = event.unwrap_or_else(|e| panic!("watch for {what} failed: {e}"));
                if matches!(event, watcher::Event::Init | watcher::Event::InitApply(_)) {
                    continue;
                }
                let objects: Vec<K> = reader.state().iter().map(|o| (**o).clone()).collect();
                if cond(&objects) {
                    return objects;
                }
            }
            panic!("watch for {what} ended");
        };
        match tokio::time::timeout(TIMEOUT, wait).await {
            Ok(objects) => objects,
            Err(_) => panic!(
                "timed out waiting for {what}\n--- agent log ---\n{}",
                self.agent_log()
            ),
        }
    }

    /// A pod `name` in this test's namespace with `spec` (JSON), pinned to this test's node;
    /// `terminationGracePeriodSeconds` defaults to 5.
    pub fn pod(&self, name: &str, spec: serde_json::Value) -> Pod {
        let mut spec = spec;
        spec["nodeSelector"] = json!({ "kubernetes.io/hostname": self.node });
        spec["terminationGracePeriodSeconds"] = spec
            .get("terminationGracePeriodSeconds")
            .cloned()
            .unwrap_or(json!(5));
        serde_json::from_value(json!({
            "metadata": { "name": name, "namespace": self.ns },
            "spec": spec,
        }))
        .expect("pod from JSON")
    }

    /// Creates `pod` in this test's namespace.
    pub async fn create_pod(&self, pod: Pod) -> Pod {
        self.api::<Pod>()
            .create(&PostParams::default(), &pod)
            .await
            .expect("create pod")
    }

    /// Waits until pod `name` exists and `cond` holds for it; returns it.
    pub async fn wait_pod(
        &self,
        name: &str,
        what: &str,
        cond: impl Fn(&Pod) -> bool + Send + 'static,
    ) -> Pod {
        self.wait_named(self.api::<Pod>(), name, what, move |p: Option<&Pod>| {
            p.is_some_and(&cond)
        })
        .await
        .expect("pod present")
    }

    /// The log of pod `pod`'s only container (all runs, appended).
    pub fn logs(&self, pod: &str) -> String {
        read_logs(&state_dir(), &self.ns, pod, None)
            .unwrap_or_else(|e| panic!("logs of {pod}: {e}"))
    }
}

impl Drop for TestEnv {
    fn drop(&mut self) {
        let ns = self.ns.clone();
        let kubeconfig = self.kubeconfig.clone();
        let agent = self.agent.take();
        // Drop cannot be async, and the test's client is tied to the test's runtime (which is
        // blocked here): clean up on a helper thread with its own runtime and client.
        let cleanup = std::thread::spawn(move || {
            if let Some(mut agent) = agent {
                if let Ok(pid) = i32::try_from(agent.id()) {
                    let _ = nix::sys::signal::kill(
                        nix::unistd::Pid::from_raw(pid),
                        nix::sys::signal::Signal::SIGTERM,
                    );
                }
                let (tx, rx) = std::sync::mpsc::channel();
                std::thread::spawn(move || {
                    let _ = tx.send(agent.wait());
                    agent
                });
                if rx.recv_timeout(AGENT_STOP_TIMEOUT).is_err() {
                    eprintln!(
                        "riffle-node-agent did not exit within {}s",
                        AGENT_STOP_TIMEOUT.as_secs()
                    );
                }
            }
            if let Ok(rt) = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
            {
                rt.block_on(async {
                    let delete = async {
                        let client = client(&kubeconfig).await;
                        let _ = Api::<Namespace>::all(client)
                            .delete(&ns, &DeleteParams::background())
                            .await;
                    };
                    if tokio::time::timeout(Duration::from_secs(30), delete)
                        .await
                        .is_err()
                    {
                        eprintln!("deleting namespace {ns} timed out");
                    }
                });
            }
        });
        let _ = cleanup.join();
    }
}

/// The image mapping file's text for binaries in `dir` (paths quoted as JSON strings, which
/// YAML reads as they are).
fn image_map_yaml(dir: &Path) -> String {
    let mut yaml = String::from("images:\n");
    for (image, bin) in [
        ("riffle-testbed-probe:*", "riffle-testbed-probe"),
        ("riffle-runtime:*", "riffle"),
        ("riffle-operator:*", "riffle-operator"),
    ] {
        let path = dir.join(bin);
        let path = serde_json::to_string(&path.to_string_lossy()).expect("string to JSON");
        yaml.push_str(&format!("  \"{image}\": {path}\n"));
    }
    yaml
}

/// Whether the pod's `Ready` condition is true.
pub fn pod_ready(p: &Pod) -> bool {
    p.status
        .as_ref()
        .and_then(|s| s.conditions.as_ref())
        .is_some_and(|cs| cs.iter().any(|c| c.type_ == "Ready" && c.status == "True"))
}

/// The pod's phase (`""` before the agent reports one).
pub fn phase(p: &Pod) -> &str {
    p.status
        .as_ref()
        .and_then(|s| s.phase.as_deref())
        .unwrap_or("")
}

/// The status of the pod's first container. Panics if there is none yet.
pub fn first_container(p: &Pod) -> ContainerStatus {
    p.status
        .as_ref()
        .and_then(|s| s.container_statuses.as_ref())
        .and_then(|cs| cs.first().cloned())
        .expect("container status")
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::node_agent::images::ImageMap;

    #[test]
    fn binaries_are_found_next_to_the_test_executable() {
        let dir = bin_dir();
        // A unit test runs from <target>/<profile>/deps/.
        assert!(
            std::env::current_exe()
                .unwrap()
                .starts_with(dir.join("deps")),
            "{}",
            dir.display()
        );
        assert_ne!(dir.file_name().unwrap(), "deps");
    }

    #[test]
    #[should_panic(expected = "cargo build --workspace --bins")]
    fn a_missing_binary_names_the_build_command() {
        binary("no-such-riffle-binary");
    }

    #[test]
    fn the_image_map_names_all_three_binaries() {
        let dir = Path::new("/t/debug");
        let map =
            ImageMap::from_yaml(&image_map_yaml(dir), Path::new("images.yaml")).expect("parses");
        for (image, bin) in [
            ("riffle-testbed-probe:test", "riffle-testbed-probe"),
            ("riffle-runtime:0.1.0", "riffle"),
            ("riffle-operator:latest", "riffle-operator"),
            ("riffle-operator", "riffle-operator"),
        ] {
            assert_eq!(map.resolve(image).unwrap(), dir.join(bin), "{image}");
        }
        assert!(map.resolve("nginx:1").is_err());
    }
}
