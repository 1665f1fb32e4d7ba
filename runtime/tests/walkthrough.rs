//! The README's walkthrough, run from the README itself: every `sh` block between
//! `<!-- walkthrough:begin -->` and `<!-- walkthrough:end -->` runs as written, in order, in
//! one bash (`set -euo pipefail`) at the repository root. At `<!-- walkthrough:verify -->`
//! — the job has been installed by Helm, fed, upgraded, scaled by hand and autoscaled up and
//! down — the outputs are checked: one recommendation per click (read back from the input
//! topic), nothing dead-lettered, no transaction left open, and ItemStats equal to the
//! independent reference for every window the job closed. Then the rest (delete, uninstall)
//! runs, and nothing of the release or the job may be left.

mod common;
mod reference;
#[path = "common/scenario.rs"]
mod scenario;

use std::collections::{BTreeMap, HashSet};
use std::io::Write;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use common::cluster::{verify_exactly_once, Bed, Topics};
use reference::from_config::ref_event;
use riffle_operator::crd::StreamJob;
use riffle_runtime::event::Event;

/// The example's topics (examples/streamjob.yaml).
const TOPICS: [&str; 5] = [
    "clicks",
    "recommendations",
    "item-stats",
    "late-events",
    "dead-letters",
];
/// The bound of each half of the walkthrough (every `kubectl wait` in it has its own).
const BOUND: Duration = Duration::from_secs(1800);

fn repo() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("..")
}

/// The walkthrough's shell, before and after the verification point.
fn walkthrough() -> (String, String) {
    let readme = std::fs::read_to_string(repo().join("README.md")).unwrap();
    let section = |from: &str, to: &str| -> String {
        let start = readme
            .find(from)
            .unwrap_or_else(|| panic!("README has no {from}"));
        let end = readme[start..]
            .find(to)
            .unwrap_or_else(|| panic!("README has no {to} after {from}"));
        let text = &readme[start..start + end];
        let mut script = String::new();
        let mut inside = false;
        for line in text.lines() {
            match (inside, line.trim_end()) {
                (false, "```sh") => inside = true,
                (true, "```") => inside = false,
                (true, l) => {
                    script.push_str(l);
                    script.push('\n');
                }
                _ => {}
            }
        }
        script
    };
    (
        section("<!-- walkthrough:begin -->", "<!-- walkthrough:verify -->"),
        section("<!-- walkthrough:verify -->", "<!-- walkthrough:end -->"),
    )
}

/// A bash running part of the walkthrough in its own process group (killed with everything
/// it started if the test fails).
struct Shell {
    child: Option<Child>,
    log: PathBuf,
}

impl Shell {
    fn run(script: &str, log: &Path) -> Self {
        let mut file = std::fs::File::create(log).unwrap();
        writeln!(file, "+++ walkthrough part\n{script}\n+++ output").unwrap();
        let child = Command::new("bash")
            .args(["-euo", "pipefail", "-x", "-c", script])
            .current_dir(repo())
            .stdin(Stdio::null())
            .stdout(file.try_clone().unwrap())
            .stderr(file)
            .process_group(0)
            .spawn()
            .expect("run bash");
        Self {
            child: Some(child),
            log: log.to_path_buf(),
        }
    }

    fn finish(mut self) {
        let mut child = self.child.take().unwrap();
        let started = Instant::now();
        let status = loop {
            if let Some(s) = child.try_wait().unwrap() {
                break s;
            }
            if started.elapsed() > BOUND {
                let _ = child.kill();
                break child.wait().unwrap();
            }
            std::thread::sleep(Duration::from_millis(200));
        };
        let log = std::fs::read_to_string(&self.log).unwrap_or_default();
        let tail: Vec<&str> = log.lines().rev().take(80).collect();
        assert!(
            status.success(),
            "the walkthrough failed ({status}); last lines:\n{}",
            tail.into_iter().rev().collect::<Vec<_>>().join("\n")
        );
        eprintln!("{log}");
    }
}

impl Drop for Shell {
    fn drop(&mut self) {
        if let Some(child) = &mut self.child {
            // The whole group: a `riffle produce` or `kubectl wait` it started goes too.
            let _ = Command::new("kill")
                .args(["-KILL", "--", &format!("-{}", child.id())])
                .status();
            let _ = child.wait();
        }
    }
}

/// The walkthrough starts from a fresh test bed: what a failed run leaves (a release, the
/// namespaces) and the CRD other tests install without Helm (which `helm install` would
/// refuse to adopt) are removed first, and again after a failure. StreamJobs whose operator
/// is gone (earlier tests' leftovers) keep their finalizer, and the CRD cannot go before
/// they do: the finalizers are dropped first.
fn clean_slate() {
    // (Without the CRD there are no StreamJobs to list: `|| true`.)
    let script = r#"
        set -euo pipefail
        helm uninstall riffle-operator --namespace riffle-system --wait >/dev/null 2>&1 || true
        { kubectl get sj -A -o jsonpath='{range .items[*]}{.metadata.namespace} {.metadata.name}{"\n"}{end}' 2>/dev/null || true; } |
          while read -r ns name; do
            kubectl -n "$ns" patch sj "$name" --type merge -p '{"metadata":{"finalizers":null}}' >/dev/null
          done
        kubectl delete namespace shop riffle-system --ignore-not-found --timeout=120s
        kubectl delete crd streamjobs.riffle.dev --ignore-not-found --timeout=120s
    "#;
    let out = Command::new("bash")
        .args(["-c", script])
        .current_dir(repo())
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "cleaning up before the walkthrough: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

struct CleanOnFailure;

impl Drop for CleanOnFailure {
    fn drop(&mut self) {
        if std::thread::panicking() {
            clean_slate();
        }
    }
}

#[test]
fn the_readme_walkthrough_works_as_written_and_is_exactly_once() {
    let bed = Bed::from_env();
    let (before, after) = walkthrough();
    assert!(before.contains("helm install") && after.contains("helm uninstall"));
    clean_slate();
    bed.delete_topics(&TOPICS);
    let _clean = CleanOnFailure;
    let tmp = tempfile::tempdir().unwrap();

    Shell::run(&before, &tmp.path().join("walkthrough-1.log")).finish();

    // The job's state at the verification point.
    let sj: StreamJob = serde_json::from_slice(
        &Command::new("kubectl")
            .args(["-n", "shop", "get", "sj", "recs", "-o", "json"])
            .output()
            .unwrap()
            .stdout,
    )
    .expect("the StreamJob as JSON");
    let status = sj.status.clone().unwrap();
    let history = status.autoscaler.clone().unwrap().history;
    assert!(
        history.iter().any(|d| d.applied && d.target > d.current)
            && history.iter().any(|d| d.applied && d.target < d.current),
        "the autoscaler scaled up and down: {history:?}"
    );
    assert_eq!(sj.spec.parallelism, 3, "spec.parallelism is the user's");

    // Every click read back; the job answers each once (it may still be catching up).
    let clicks = bed.read_committed("clicks");
    let mut events = Vec::with_capacity(clicks.len());
    let mut valid = HashSet::new();
    let mut max_ts: BTreeMap<i32, i64> = BTreeMap::new();
    for r in &clicks {
        let e: Event = serde_json::from_slice(&r.value).expect("the producer writes valid events");
        valid.insert(e.event_id.to_string());
        let m = max_ts.entry(r.partition).or_insert(i64::MIN);
        *m = (*m).max(e.ts);
        events.push(ref_event(&e, r.partition as u32));
    }
    assert!(valid.len() >= 65_000, "{} clicks", valid.len());
    let answered = common::wait_until(Duration::from_secs(300), || {
        bed.read_committed("recommendations").len() >= valid.len()
    });
    assert!(answered, "every click answered within 5 minutes");
    let topics = Topics {
        bed: bed.clone(),
        input: TOPICS[0].into(),
        recs: TOPICS[1].into(),
        stats: TOPICS[2].into(),
        late: TOPICS[3].into(),
        dlq: TOPICS[4].into(),
    };
    let stats = verify_exactly_once(&topics, &valid, &HashSet::new());
    assert!(
        bed.read_committed("late-events").is_empty(),
        "no click is late: the producer's disorder is below maxOutOfOrderness"
    );

    // Windows closed by the reference's watermark over everything produced. The job has read
    // all of it (every click is answered), so its watermark is at least that: each of those
    // windows was emitted. (A generation that has read nothing since its restore reports no
    // watermark; when it reports one, it bounds the comparison too.)
    let df = sj.spec.dataflow.clone();
    let reference_wm = max_ts.values().min().unwrap() - df.max_out_of_orderness.0;
    let final_wm = kubectl_watermark().map_or(reference_wm, |w| w.min(reference_wm));
    scenario::assert_item_stats_match(&stats, &events, 32, &df, final_wm, true);

    Shell::run(&after, &tmp.path().join("walkthrough-2.log")).finish();
    let left = Command::new("kubectl")
        .args([
            "get",
            "namespace",
            "shop",
            "riffle-system",
            "--ignore-not-found",
            "-o",
            "name",
        ])
        .output()
        .unwrap();
    assert!(left.stdout.is_empty(), "namespaces left: {left:?}");
}

/// The job's watermark now (the lowest of its workers'), if it reports one.
fn kubectl_watermark() -> Option<i64> {
    let out = Command::new("kubectl")
        .args([
            "-n",
            "shop",
            "get",
            "sj",
            "recs",
            "-o",
            "jsonpath={.status.workers.watermark}",
        ])
        .output()
        .unwrap();
    String::from_utf8_lossy(&out.stdout).trim().parse().ok()
}
