//! Container processes: spawning into their own process group with output to the log file,
//! and signalling the group.

use std::fs::OpenOptions;
use std::io::Write;
use std::os::unix::process::ExitStatusExt;
use std::path::Path;
use std::process::{ExitStatus, Stdio};

use nix::sys::signal::{killpg, Signal};
use nix::unistd::Pid;
use tokio::process::{Child, Command};

use crate::node_agent::layout::PodDir;
use crate::node_agent::sandbox::PreparedContainer;
use crate::node_agent::{Error, Result};

/// A started container process.
#[derive(Debug)]
pub struct Spawned {
    /// Its PID, which is also its process group id.
    pub pid: u32,
    /// The child handle (to wait on).
    pub child: Child,
}

/// Starts a container process: clean environment, own process group, stdin from
/// `/dev/null`, stdout and stderr appended to the container log, PID written to its file.
pub fn spawn(container: &PreparedContainer) -> Result<Spawned> {
    let log_file = &container.log_file;
    let mut log = OpenOptions::new()
        .create(true)
        .append(true)
        .open(log_file)
        .map_err(|e| Error::io(log_file, e))?;
    let stderr = log.try_clone().map_err(|e| Error::io(log_file, e))?;
    let mut command = Command::new(&container.program);
    command
        .args(&container.args)
        .env_clear()
        .envs(container.env.iter().map(|(k, v)| (k, v)))
        .current_dir(&container.cwd)
        .stdin(Stdio::null())
        .stdout(log.try_clone().map_err(|e| Error::io(log_file, e))?)
        .stderr(stderr)
        .process_group(0)
        .kill_on_drop(false);
    let child = command.spawn().map_err(|source| {
        // Make start failures visible in the log like a runtime would.
        let _ = writeln!(
            log,
            "riffle-node-agent: cannot start {}: {source}",
            container.program.display()
        );
        Error::Spawn {
            binary: container.program.clone(),
            source,
        }
    })?;
    let pid = child.id().ok_or_else(|| Error::Spawn {
        binary: container.program.clone(),
        source: std::io::Error::other("process exited before its PID was read"),
    })?;
    std::fs::write(&container.pid_file, format!("{pid}\n"))
        .map_err(|e| Error::io(&container.pid_file, e))?;
    Ok(Spawned { pid, child })
}

/// Sends `signal` to the process group `pgid`; a group that is already gone is not an error.
pub fn signal_group(pgid: u32, signal: Signal) {
    let Ok(raw) = i32::try_from(pgid) else {
        return;
    };
    match killpg(Pid::from_raw(raw), signal) {
        Ok(()) | Err(nix::errno::Errno::ESRCH) => {}
        Err(e) => tracing::warn!(pgid, ?signal, error = %e, "cannot signal process group"),
    }
}

/// Kills the container processes a previous agent of `node` left running (an agent that is
/// SIGKILLed cannot stop its pods, and its successor would otherwise run them twice). A
/// container counts only if its PID file names a live process whose `RIFFLE_MOUNT_ROOT` is
/// that container's mount root, so a PID reused by an unrelated process is never hit.
/// Returns how many process groups were killed.
pub fn reap_leftovers(state_dir: &Path, node: &str) -> usize {
    let Ok(pods) = std::fs::read_dir(state_dir.join("pods")) else {
        return 0;
    };
    let mut reaped = 0;
    for pod in pods.flatten() {
        let dir = PodDir::from_path(pod.path());
        let owner = std::fs::read(dir.pod_file())
            .ok()
            .and_then(|b| serde_json::from_slice::<serde_json::Value>(&b).ok())
            .and_then(|v| v["node"].as_str().map(str::to_owned));
        if owner.as_deref() != Some(node) {
            continue;
        }
        let Ok(containers) = std::fs::read_dir(dir.root().join("containers")) else {
            continue;
        };
        for c in containers.flatten() {
            let name = c.file_name().to_string_lossy().into_owned();
            let Some(pid) = std::fs::read_to_string(dir.pid_file(&name))
                .ok()
                .and_then(|t| t.trim().parse::<u32>().ok())
            else {
                continue;
            };
            let root = dir.mount_root(&name);
            if mount_root_of(pid).is_some_and(|r| Path::new(&r) == root) {
                tracing::warn!(pid, pod = %dir.root().display(), container = %name, "killing a container a previous agent left running");
                signal_group(pid, Signal::SIGKILL);
                reaped += 1;
            }
        }
    }
    reaped
}

/// `RIFFLE_MOUNT_ROOT` in the environment of a live process, if any.
fn mount_root_of(pid: u32) -> Option<String> {
    let env = std::fs::read(format!("/proc/{pid}/environ")).ok()?;
    env.split(|b| *b == 0).find_map(|kv| {
        kv.strip_prefix(b"RIFFLE_MOUNT_ROOT=")
            .map(|v| String::from_utf8_lossy(v).into_owned())
    })
}

/// Exit code and signal of a finished process.
pub fn exit_details(status: ExitStatus) -> (Option<i32>, Option<i32>) {
    (status.code(), status.signal())
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::path::PathBuf;

    #[tokio::test]
    async fn spawn_logs_and_signals() {
        let dir = tempfile::tempdir().unwrap();
        let container = |args: &[&str]| PreparedContainer {
            name: "c".into(),
            image: "sh:1".into(),
            program: PathBuf::from("sh"),
            args: args.iter().map(|a| a.to_string()).collect(),
            env: vec![
                ("PATH".into(), std::env::var("PATH").unwrap()),
                ("GREETING".into(), "hi".into()),
            ],
            cwd: dir.path().to_owned(),
            log_file: dir.path().join("c.log"),
            pid_file: dir.path().join("pid"),
            spec: Default::default(),
        };
        let mut done = spawn(&container(&["-c", "echo $GREETING; echo oops >&2; exit 3"])).unwrap();
        let status = done.child.wait().await.unwrap();
        assert_eq!(exit_details(status), (Some(3), None));
        let log = std::fs::read_to_string(dir.path().join("c.log")).unwrap();
        assert!(log.contains("hi\n") && log.contains("oops\n"), "{log}");
        assert_eq!(
            std::fs::read_to_string(dir.path().join("pid"))
                .unwrap()
                .trim(),
            done.pid.to_string()
        );

        // A child of the container process dies with the group.
        let mut sleeper = spawn(&container(&["-c", "sleep 600 & wait"])).unwrap();
        signal_group(sleeper.pid, Signal::SIGKILL);
        let status = sleeper.child.wait().await.unwrap();
        assert_eq!(exit_details(status), (None, Some(9)));

        let missing = PreparedContainer {
            program: PathBuf::from("/nonexistent/binary"),
            ..container(&[])
        };
        assert!(matches!(spawn(&missing), Err(Error::Spawn { .. })));
    }

    #[tokio::test]
    async fn leftovers_of_this_node_are_killed_and_nothing_else() {
        let state = tempfile::tempdir().unwrap();
        let sleeper = |node: &str, pod: &str, with_root: bool| {
            let dir = PodDir::new(state.path(), "ns", pod, "uid");
            std::fs::create_dir_all(dir.mount_root("c")).unwrap();
            std::fs::create_dir_all(dir.root().join("logs")).unwrap();
            std::fs::write(
                dir.pod_file(),
                serde_json::json!({"namespace": "ns", "name": pod, "uid": "uid", "node": node})
                    .to_string(),
            )
            .unwrap();
            let mut env = vec![("PATH".into(), std::env::var("PATH").unwrap())];
            if with_root {
                env.push((
                    "RIFFLE_MOUNT_ROOT".into(),
                    dir.mount_root("c").display().to_string(),
                ));
            }
            spawn(&PreparedContainer {
                name: "c".into(),
                image: "sh:1".into(),
                program: PathBuf::from("sh"),
                args: vec!["-c".into(), "sleep 600 & wait".into()],
                env,
                cwd: dir.mount_root("c"),
                log_file: dir.log_file("c"),
                pid_file: dir.pid_file("c"),
                spec: Default::default(),
            })
            .unwrap()
        };
        let mut mine = sleeper("n1", "mine", true);
        let mut other_node = sleeper("n2", "theirs", true);
        // A PID file naming a process that is not that container (a reused PID).
        let mut stranger = sleeper("n1", "reused", false);

        assert_eq!(reap_leftovers(state.path(), "n1"), 1);
        let status = mine.child.wait().await.unwrap();
        assert_eq!(exit_details(status), (None, Some(9)));
        for other in [&mut other_node, &mut stranger] {
            assert!(other.child.try_wait().unwrap().is_none(), "killed too much");
            signal_group(other.pid, Signal::SIGKILL);
            other.child.wait().await.unwrap();
        }
        assert_eq!(reap_leftovers(state.path(), "n1"), 0, "nothing left");
    }
}
