//! On-disk layout of the agent's state and helpers to read it (logs, PIDs).
//!
//! ```text
//! <state-dir>/
//!   ipam/<ip>                         lock files of allocated pod IPs (shared by agents)
//!   pods/<ns>_<pod>_<uid>/
//!     pod.json                        namespace, name, uid, node, pod IP
//!     volumes/<volume>/               materialised configMap/secret/emptyDir/projected volumes
//!     serviceaccount/                 token, ca.crt, namespace (like the standard SA mount)
//!     kubeconfig                      server + CA + the pod's service account token
//!     containers/<container>/root/    $RIFFLE_MOUNT_ROOT: mountPaths re-created as symlinks
//!     containers/<container>/mounts.json   $RIFFLE_MOUNTS
//!     containers/<container>/pid      PID (= process group) of the current run
//!     logs/<container>.log            stdout+stderr of every run, appended
//! ```

use std::path::{Path, PathBuf};

use crate::node_agent::{Error, Result};

/// The default state directory: `$HOME/.cache/riffle/testbed`.
pub fn default_state_dir() -> PathBuf {
    let home = std::env::var_os("HOME").map_or_else(|| PathBuf::from("/tmp"), PathBuf::from);
    home.join(".cache/riffle/testbed")
}

/// Paths of one pod's directory.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PodDir {
    root: PathBuf,
}

impl PodDir {
    /// The directory of pod `namespace/name` with `uid` under `state_dir`.
    pub fn new(state_dir: &Path, namespace: &str, name: &str, uid: &str) -> Self {
        Self {
            root: state_dir
                .join("pods")
                .join(format!("{namespace}_{name}_{uid}")),
        }
    }

    /// Wraps an existing pod directory.
    pub fn from_path(root: PathBuf) -> Self {
        Self { root }
    }

    /// The pod directory itself.
    pub fn root(&self) -> &Path {
        &self.root
    }

    /// `pod.json`.
    pub fn pod_file(&self) -> PathBuf {
        self.root.join("pod.json")
    }

    /// Directory of a materialised volume.
    pub fn volume(&self, volume: &str) -> PathBuf {
        self.root.join("volumes").join(volume)
    }

    /// The service account files directory.
    pub fn service_account(&self) -> PathBuf {
        self.root.join("serviceaccount")
    }

    /// The pod's kubeconfig.
    pub fn kubeconfig(&self) -> PathBuf {
        self.root.join("kubeconfig")
    }

    /// A container's state directory.
    pub fn container(&self, container: &str) -> PathBuf {
        self.root.join("containers").join(container)
    }

    /// A container's mount root (`RIFFLE_MOUNT_ROOT`).
    pub fn mount_root(&self, container: &str) -> PathBuf {
        self.container(container).join("root")
    }

    /// A container's mounts file (`RIFFLE_MOUNTS`).
    pub fn mounts_file(&self, container: &str) -> PathBuf {
        self.container(container).join("mounts.json")
    }

    /// A container's PID file.
    pub fn pid_file(&self, container: &str) -> PathBuf {
        self.container(container).join("pid")
    }

    /// A container's log file.
    pub fn log_file(&self, container: &str) -> PathBuf {
        self.root.join("logs").join(format!("{container}.log"))
    }
}

/// Finds the directory of pod `namespace/name` (the most recently modified one when pods
/// with that name existed several times).
pub fn find_pod_dir(state_dir: &Path, namespace: &str, name: &str) -> Result<PodDir> {
    let pods = state_dir.join("pods");
    let prefix = format!("{namespace}_{name}_");
    let entries = std::fs::read_dir(&pods).map_err(|e| Error::io(&pods, e))?;
    let mut best: Option<(std::time::SystemTime, PathBuf)> = None;
    for entry in entries.flatten() {
        let file_name = entry.file_name();
        let Some(rest) = file_name.to_str().and_then(|n| n.strip_prefix(&prefix)) else {
            continue;
        };
        // The remainder must be a UID alone (names may contain '_'? they cannot: DNS names).
        if rest.contains('_') {
            continue;
        }
        let modified = entry
            .metadata()
            .and_then(|m| m.modified())
            .unwrap_or(std::time::UNIX_EPOCH);
        if best.as_ref().is_none_or(|(t, _)| modified > *t) {
            best = Some((modified, entry.path()));
        }
    }
    best.map(|(_, path)| PodDir::from_path(path))
        .ok_or_else(|| {
            Error::NotFound(format!(
                "no directory for pod {namespace}/{name} under {}",
                pods.display()
            ))
        })
}

fn only_container(dir: &PodDir) -> Result<String> {
    let logs = dir.root().join("logs");
    let names: Vec<String> = std::fs::read_dir(&logs)
        .map_err(|e| Error::io(&logs, e))?
        .flatten()
        .filter_map(|e| {
            e.file_name()
                .to_str()
                .and_then(|n| n.strip_suffix(".log"))
                .map(str::to_owned)
        })
        .collect();
    match names.as_slice() {
        [one] => Ok(one.clone()),
        _ => Err(Error::NotFound(format!(
            "pod has containers {names:?}: name one"
        ))),
    }
}

/// Reads the log of `container` (or of the only container) of pod `namespace/name`.
pub fn read_logs(
    state_dir: &Path,
    namespace: &str,
    name: &str,
    container: Option<&str>,
) -> Result<String> {
    let dir = find_pod_dir(state_dir, namespace, name)?;
    let container = match container {
        Some(c) => c.to_owned(),
        None => only_container(&dir)?,
    };
    let path = dir.log_file(&container);
    let bytes = std::fs::read(&path).map_err(|e| Error::io(&path, e))?;
    Ok(String::from_utf8_lossy(&bytes).into_owned())
}

/// The PID of the latest run of `container` (or of the only container) of `namespace/name`.
pub fn read_pid(
    state_dir: &Path,
    namespace: &str,
    name: &str,
    container: Option<&str>,
) -> Result<u32> {
    let dir = find_pod_dir(state_dir, namespace, name)?;
    let container = match container {
        Some(c) => c.to_owned(),
        None => only_container(&dir)?,
    };
    let path = dir.pid_file(&container);
    let text = std::fs::read_to_string(&path).map_err(|e| Error::io(&path, e))?;
    text.trim()
        .parse()
        .map_err(|_| Error::NotFound(format!("malformed pid file {}", path.display())))
}

/// Whether a process with this PID exists (zombies included).
pub fn process_exists(pid: u32) -> bool {
    let Ok(pid) = i32::try_from(pid) else {
        return false;
    };
    !matches!(
        nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid), None),
        Err(nix::errno::Errno::ESRCH)
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn finds_latest_pod_dir_and_reads_logs() {
        let state = tempfile::tempdir().unwrap();
        let old = PodDir::new(state.path(), "ns", "web", "uid-1");
        let other = PodDir::new(state.path(), "ns", "web-2", "uid-3");
        for dir in [&old, &other] {
            std::fs::create_dir_all(dir.root().join("logs")).unwrap();
            std::fs::write(dir.log_file("main"), "old\n").unwrap();
        }
        // The old directory is an hour older than the new one.
        let an_hour_ago = std::time::SystemTime::now() - std::time::Duration::from_secs(3600);
        std::fs::File::open(old.root())
            .unwrap()
            .set_modified(an_hour_ago)
            .unwrap();
        let new = PodDir::new(state.path(), "ns", "web", "uid-2");
        std::fs::create_dir_all(new.container("main")).unwrap();
        std::fs::create_dir_all(new.root().join("logs")).unwrap();
        std::fs::write(new.log_file("main"), "hello\n").unwrap();
        std::fs::write(new.pid_file("main"), "1234\n").unwrap();

        assert_eq!(find_pod_dir(state.path(), "ns", "web").unwrap(), new);
        assert_eq!(
            read_logs(state.path(), "ns", "web", None).unwrap(),
            "hello\n"
        );
        assert_eq!(
            read_logs(state.path(), "ns", "web", Some("main")).unwrap(),
            "hello\n"
        );
        assert_eq!(read_pid(state.path(), "ns", "web", None).unwrap(), 1234);
        assert!(read_logs(state.path(), "ns", "nope", None).is_err());
        std::fs::write(new.log_file("side"), "").unwrap();
        assert!(
            read_logs(state.path(), "ns", "web", None).is_err(),
            "ambiguous container"
        );
    }

    #[test]
    fn own_process_exists() {
        assert!(process_exists(std::process::id()));
    }
}
