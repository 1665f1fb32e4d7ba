//! Helpers shared by the runtime's integration tests.
#![allow(dead_code)]

use std::io::{BufRead, BufReader, Read, Write};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

pub mod cluster;

use riffle_runtime::checkpoint::{self, Manifest};
use riffle_runtime::sink::{file::read_committed, Stream};

pub fn riffle() -> Command {
    Command::new(env!("CARGO_BIN_EXE_riffle"))
}

/// Committed lines of every output stream, sorted (record order inside a batch is not part
/// of the contract).
pub fn sorted_outputs(out: &Path) -> Vec<(Stream, Vec<String>)> {
    Stream::ALL
        .iter()
        .map(|s| {
            let mut lines = read_committed(out, *s).unwrap();
            lines.sort();
            (*s, lines)
        })
        .collect()
}

/// The lines of one stream in the result of [`sorted_outputs`].
pub fn lines(outputs: &[(Stream, Vec<String>)], stream: Stream) -> &[String] {
    &outputs
        .iter()
        .find(|(s, _)| *s == stream)
        .expect("every stream is listed")
        .1
}

/// Asserts no event got two recommendations; returns how many events got one.
pub fn distinct_recommendations(lines: &[String]) -> usize {
    let mut ids = std::collections::HashSet::new();
    for l in lines {
        let r: riffle_runtime::dataflow::output::Recommendation = serde_json::from_str(l).unwrap();
        assert!(
            ids.insert(r.event_id.clone()),
            "duplicate recommendation for {}",
            r.event_id
        );
    }
    ids.len()
}

/// The newest completed checkpoint's manifest in a file store, if any.
pub fn latest_manifest(store: &Path) -> Option<Manifest> {
    let mut ids = Vec::new();
    for e in std::fs::read_dir(store).ok()? {
        let name = e.ok()?.file_name().to_string_lossy().into_owned();
        if let Some(id) = name
            .strip_prefix("chk-")
            .and_then(|n| n.parse::<u64>().ok())
        {
            if store.join(&name).join(checkpoint::MANIFEST).exists() {
                ids.push(id);
            }
        }
    }
    let id = ids.into_iter().max()?;
    let bytes = std::fs::read(store.join(checkpoint::manifest_key(id))).ok()?;
    serde_json::from_slice(&bytes).ok()
}

/// Poll `cond` every few milliseconds until it holds or `timeout` passes.
pub fn wait_until(timeout: Duration, mut cond: impl FnMut() -> bool) -> bool {
    let deadline = Instant::now() + timeout;
    while Instant::now() < deadline {
        if cond() {
            return true;
        }
        std::thread::sleep(Duration::from_millis(5));
    }
    cond()
}

/// Start `riffle run` and return it with the HTTP address it printed (if any).
pub fn spawn_run(
    config: &Path,
    restore: Option<&str>,
    expect_http: bool,
) -> (Child, Option<String>) {
    let mut cmd = riffle();
    cmd.arg("run").arg("--config").arg(config);
    if let Some(r) = restore {
        cmd.arg("--restore").arg(r);
    }
    let mut child = cmd
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn riffle");
    let stderr = child.stderr.take().unwrap();
    let mut reader = BufReader::new(stderr);
    let mut addr = None;
    if expect_http {
        let mut line = String::new();
        while reader.read_line(&mut line).unwrap() > 0 {
            if let Some(a) = line.trim().strip_prefix("riffle: HTTP API on http://") {
                addr = Some(a.to_string());
                break;
            }
            line.clear();
        }
    }
    // Keep draining stderr so the child never blocks on a full pipe.
    std::thread::spawn(move || {
        let mut sink = Vec::new();
        let _ = reader.read_to_end(&mut sink);
    });
    (child, addr)
}

/// A minimal HTTP/1.1 request (tests only talk to our own loopback server).
pub fn http(addr: &str, method: &str, path: &str) -> (u16, String) {
    let mut s = std::net::TcpStream::connect(addr).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(120))).unwrap();
    write!(s, "{method} {path} HTTP/1.1\r\nHost: {addr}\r\nContent-Length: 0\r\nConnection: close\r\n\r\n").unwrap();
    let mut resp = String::new();
    s.read_to_string(&mut resp).unwrap();
    let status = resp
        .split_whitespace()
        .nth(1)
        .and_then(|c| c.parse().ok())
        .unwrap_or(0);
    let body = resp
        .split_once("\r\n\r\n")
        .map(|(_, b)| b.to_string())
        .unwrap_or_default();
    (status, body)
}

pub fn write_yaml(path: &Path, text: &str) -> PathBuf {
    std::fs::write(path, text).unwrap();
    path.to_path_buf()
}

/// The shared data directory (`../shared` from the repository root).
pub fn shared_dir() -> PathBuf {
    let dir = std::env::var_os("RIFFLE_SHARED")
        .map(PathBuf::from)
        .unwrap_or_else(|| Path::new(env!("CARGO_MANIFEST_DIR")).join("../../shared"));
    assert!(
        dir.join("datasets/yoochoose-clicks-100k/train_tr.tsv")
            .exists(),
        "shared data not found at {} (set RIFFLE_SHARED)",
        dir.display()
    );
    dir
}
