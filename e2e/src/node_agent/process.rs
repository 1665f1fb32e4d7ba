//! Container processes: spawning into their own process group with output to the log file,
//! and signalling the group.

use std::fs::OpenOptions;
use std::io::Write;
use std::os::unix::process::ExitStatusExt;
use std::process::{ExitStatus, Stdio};

use nix::sys::signal::{killpg, Signal};
use nix::unistd::Pid;
use tokio::process::{Child, Command};

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
}
