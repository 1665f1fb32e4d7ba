//! A distributed job on the test bed's real Kafka and MinIO: topics, worker processes that can
//! be SIGKILLed and restarted, and a `read_committed` verifier.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::io::{BufRead, BufReader, Write};
use std::path::{Path, PathBuf};
use std::process::{Child, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use rdkafka::admin::{AdminClient, AdminOptions, NewTopic, TopicReplication};
use rdkafka::client::DefaultClientContext;
use rdkafka::config::ClientConfig;
use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::message::Headers;
use rdkafka::producer::{BaseProducer, BaseRecord, Producer};
use rdkafka::{Message, Offset, TopicPartitionList};
use serde_json::Value;

use super::{riffle, wait_until};

/// Only one distributed scenario at a time: they share two cores, and the outage scenario
/// stops the shared broker and store.
pub static SERIAL: Mutex<()> = Mutex::new(());

pub fn serial() -> std::sync::MutexGuard<'static, ()> {
    SERIAL.lock().unwrap_or_else(|p| p.into_inner())
}

/// The test bed's endpoints; a missing variable is a failure, not a skip.
#[derive(Clone, Debug)]
pub struct Bed {
    pub bootstrap: String,
    pub s3_endpoint: String,
    pub bucket: String,
}

fn env(name: &str) -> String {
    std::env::var(name).unwrap_or_else(|_| {
        panic!(
            "{name} is not set: test bed not running: run `make testbed-up` and \
             `eval \"$(e2e/testbed/testbed env)\"`"
        )
    })
}

impl Bed {
    pub fn from_env() -> Self {
        for v in ["AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_REGION"] {
            env(v);
        }
        Self {
            bootstrap: env("KAFKA_BOOTSTRAP"),
            s3_endpoint: env("S3_ENDPOINT"),
            bucket: env("S3_BUCKET"),
        }
    }

    /// Run a test-bed subcommand (`kafka-stop`, `s3-start`, ...).
    pub fn testbed(&self, cmd: &str) {
        let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("../e2e/testbed/testbed");
        let status = std::process::Command::new(script)
            .arg(cmd)
            .status()
            .expect("run e2e/testbed/testbed");
        assert!(status.success(), "testbed {cmd} failed");
    }

    fn client(&self) -> ClientConfig {
        let mut c = ClientConfig::new();
        c.set("bootstrap.servers", &self.bootstrap);
        c
    }

    pub fn create_topics(&self, topics: &[(&str, i32)]) {
        let admin: AdminClient<DefaultClientContext> = self.client().create().unwrap();
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        let new: Vec<NewTopic> = topics
            .iter()
            .map(|(t, p)| NewTopic::new(t, *p, TopicReplication::Fixed(1)))
            .collect();
        let opts = AdminOptions::new().operation_timeout(Some(Duration::from_secs(60)));
        for r in rt.block_on(admin.create_topics(&new, &opts)).unwrap() {
            r.unwrap_or_else(|(t, e)| panic!("create topic {t}: {e}"));
        }
    }

    /// Delete these topics if they exist, and wait until the broker no longer lists them.
    #[allow(dead_code)] // not every test binary deletes topics
    pub fn delete_topics(&self, topics: &[&str]) {
        let admin: AdminClient<DefaultClientContext> = self.client().create().unwrap();
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        let opts = AdminOptions::new().operation_timeout(Some(Duration::from_secs(60)));
        for r in rt.block_on(admin.delete_topics(topics, &opts)).unwrap() {
            if let Err((t, e)) = r {
                assert_eq!(
                    e,
                    rdkafka::types::RDKafkaErrorCode::UnknownTopicOrPartition,
                    "delete topic {t}"
                );
            }
        }
        let listed = || {
            let md = admin
                .inner()
                .fetch_metadata(None, Duration::from_secs(10))
                .unwrap();
            md.topics()
                .iter()
                .any(|t| topics.contains(&t.name()) && t.error().is_none())
        };
        assert!(
            super::wait_until(Duration::from_secs(60), || !listed()),
            "topics {topics:?} still listed a minute after their deletion"
        );
    }

    /// Produce records in order (per partition, the order given), in transactions: a chunk
    /// that fails (a broker restart) is aborted and sent again, so every record is in the
    /// topic exactly once, in order, for read_committed readers.
    pub fn produce(&self, topic: &str, records: &[(i32, Vec<u8>, Vec<u8>)]) {
        self.produce_paced(topic, records, records.len().max(1), |_| {});
    }

    /// As [`produce`](Self::produce) in transactions of `chunk` records, calling
    /// `after(records so far)` after each.
    pub fn produce_paced(
        &self,
        topic: &str,
        records: &[(i32, Vec<u8>, Vec<u8>)],
        chunk: usize,
        mut after: impl FnMut(usize),
    ) {
        let timeout = Duration::from_secs(60);
        let new_producer = || -> BaseProducer {
            let p: BaseProducer = self
                .client()
                .set("transactional.id", unique("test-producer"))
                .set("linger.ms", "20")
                .set("compression.type", "lz4")
                .create()
                .unwrap();
            p.init_transactions(timeout).expect("init_transactions");
            p
        };
        let mut p = new_producer();
        let mut done = 0;
        for part in records.chunks(chunk) {
            let mut attempts = 0;
            loop {
                attempts += 1;
                assert!(attempts < 20, "cannot produce to {topic}");
                let sent = (|| -> rdkafka::error::KafkaResult<()> {
                    p.begin_transaction()?;
                    for (partition, key, value) in part {
                        let mut rec = BaseRecord::to(topic)
                            .partition(*partition)
                            .key(key)
                            .payload(value);
                        loop {
                            match p.send(rec) {
                                Ok(()) => break,
                                Err((_, r)) => {
                                    rec = r;
                                    p.poll(Duration::from_millis(10));
                                }
                            }
                        }
                        p.poll(Duration::ZERO);
                    }
                    p.commit_transaction(timeout)
                })();
                match sent {
                    Ok(()) => break,
                    Err(e) => {
                        eprintln!("producing to {topic}: {e}; sending the chunk again");
                        if p.abort_transaction(timeout).is_err() {
                            p = new_producer();
                        }
                    }
                }
            }
            done += part.len();
            after(done);
        }
    }

    fn consumer(&self, isolation: &str) -> BaseConsumer {
        self.client()
            .set("group.id", format!("verifier-{}", unique("g")))
            .set("enable.auto.commit", "false")
            .set("isolation.level", isolation)
            .create()
            .unwrap()
    }

    /// `(low, high)` offsets per partition as a consumer with `isolation` sees them.
    pub fn watermarks(&self, topic: &str, isolation: &str) -> Vec<(i64, i64)> {
        let c = self.consumer(isolation);
        let n = partitions(&c, topic);
        (0..n)
            .map(|p| {
                c.fetch_watermarks(topic, p, Duration::from_secs(30))
                    .unwrap()
            })
            .collect()
    }

    /// Every committed record of a topic (read_committed, from the start to the last stable
    /// offset of each partition).
    pub fn read_committed(&self, topic: &str) -> Vec<Record> {
        let c = self.consumer("read_committed");
        let n = partitions(&c, topic);
        let mut tpl = TopicPartitionList::new();
        let mut ends = BTreeMap::new();
        for p in 0..n {
            let (_, hi) = c
                .fetch_watermarks(topic, p, Duration::from_secs(30))
                .unwrap();
            if hi > 0 {
                tpl.add_partition_offset(topic, p, Offset::Beginning)
                    .unwrap();
                ends.insert(p, hi);
            }
        }
        let mut out = Vec::new();
        if ends.is_empty() {
            return out;
        }
        c.assign(&tpl).unwrap();
        let deadline = Instant::now() + Duration::from_secs(300);
        while !ends.is_empty() {
            assert!(
                Instant::now() < deadline,
                "reading {topic}: stuck at {ends:?}"
            );
            match c.poll(Duration::from_millis(200)) {
                Some(Ok(m)) => {
                    let end = ends.get(&m.partition()).copied();
                    if end.is_some_and(|e| m.offset() < e) {
                        let headers = m
                            .headers()
                            .map(|h| {
                                h.iter()
                                    .map(|h| {
                                        (
                                            h.key.to_string(),
                                            String::from_utf8_lossy(h.value.unwrap_or_default())
                                                .into_owned(),
                                        )
                                    })
                                    .collect()
                            })
                            .unwrap_or_default();
                        out.push(Record {
                            partition: m.partition(),
                            offset: m.offset(),
                            key: m.key().map(<[u8]>::to_vec),
                            value: m.payload().unwrap_or_default().to_vec(),
                            headers,
                        });
                    }
                    if end.is_some_and(|e| m.offset() + 1 >= e) {
                        ends.remove(&m.partition());
                    }
                }
                Some(Err(e)) => panic!("reading {topic}: {e}"),
                None => {
                    // The end may be a commit marker, which is never delivered.
                    let pos = c.position().unwrap();
                    for e in pos.elements() {
                        if let Offset::Offset(o) = e.offset() {
                            if ends.get(&e.partition()).is_some_and(|end| o >= *end) {
                                ends.remove(&e.partition());
                            }
                        }
                    }
                }
            }
        }
        out
    }

    /// Whether no transaction is open on a topic: the last stable offset of every partition
    /// equals its high watermark.
    pub fn open_transactions(&self, topic: &str) -> Vec<i32> {
        let committed = self.watermarks(topic, "read_committed");
        let all = self.watermarks(topic, "read_uncommitted");
        committed
            .iter()
            .zip(&all)
            .enumerate()
            .filter(|(_, (c, a))| c.1 != a.1)
            .map(|(p, _)| p as i32)
            .collect()
    }
}

fn partitions(c: &BaseConsumer, topic: &str) -> i32 {
    let md = c
        .fetch_metadata(Some(topic), Duration::from_secs(30))
        .unwrap();
    md.topics()[0].partitions().len() as i32
}

#[derive(Clone, Debug)]
pub struct Record {
    pub partition: i32,
    pub offset: i64,
    pub key: Option<Vec<u8>>,
    pub value: Vec<u8>,
    pub headers: HashMap<String, String>,
}

/// A scenario's working directory (worker logs, state); kept when `RIFFLE_TEST_KEEP` is set.
pub fn workdir() -> tempfile::TempDir {
    let keep = std::env::var_os("RIFFLE_TEST_KEEP").is_some();
    let dir = tempfile::Builder::new()
        .prefix("riffle-dist-")
        .disable_cleanup(keep)
        .tempdir()
        .unwrap();
    if keep {
        eprintln!("working directory kept: {}", dir.path().display());
    }
    dir
}

/// Unique per run (pid + wall-clock nanos).
pub fn unique(prefix: &str) -> String {
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_nanos();
    format!(
        "{prefix}-{}-{}",
        std::process::id(),
        nanos % 1_000_000_000_000
    )
}

/// What a job needs besides its name.
#[derive(Clone, Debug)]
pub struct JobSpec {
    pub key_groups: u32,
    pub input_partitions: i32,
    pub checkpoint_interval: &'static str,
    pub commit_interval: &'static str,
    pub dataflow: &'static str,
}

/// A job's input and output topics, for the verifier.
#[derive(Clone, Debug)]
pub struct Topics {
    pub bed: Bed,
    pub input: String,
    pub recs: String,
    pub stats: String,
    pub late: String,
    pub dlq: String,
}

impl Topics {
    /// `<name>-in` with `input_partitions` partitions, and the four outputs.
    pub fn create(bed: &Bed, name: &str, input_partitions: i32) -> Self {
        let t = |s: &str| format!("{name}-{s}");
        let topics = Self {
            bed: bed.clone(),
            input: t("in"),
            recs: t("recs"),
            stats: t("stats"),
            late: t("late"),
            dlq: t("dlq"),
        };
        bed.create_topics(&[
            (&topics.input, input_partitions),
            (&topics.recs, 4),
            (&topics.stats, 4),
            (&topics.late, 1),
            (&topics.dlq, 1),
        ]);
        topics
    }
}

/// One distributed job: its topics, store prefix, config file and worker processes.
pub struct Job {
    pub bed: Bed,
    pub name: String,
    pub dir: PathBuf,
    pub config: PathBuf,
    pub input: String,
    pub recs: String,
    pub stats: String,
    pub late: String,
    pub dlq: String,
    pub store: String,
    pub workers: Vec<Worker>,
    pub generation: u32,
    /// Workers restarted after they exited on their own.
    pub restarts: usize,
}

pub struct Worker {
    pub index: u32,
    pub child: Child,
    pub addr: Arc<Mutex<Option<String>>>,
    pub args: Vec<String>,
    pub log: PathBuf,
}

impl Job {
    pub fn new(bed: &Bed, dir: &Path, prefix: &str, spec: &JobSpec) -> Self {
        let name = unique(prefix);
        let Topics {
            input,
            recs,
            stats,
            late,
            dlq,
            ..
        } = Topics::create(bed, &name, spec.input_partitions);
        let store = format!("s3://{}/{name}", bed.bucket);
        let config = dir.join(format!("{name}.yaml"));
        std::fs::write(
            &config,
            format!(
                r#"name: {name}
keyGroups: {kg}
source: {{kafka: {{topics: [{input}]}}}}
sink: {{kafka: {{recommendations: {recs}, itemStats: {stats}, late: {late}, deadLetter: {dlq}}}}}
stateDir: {dir}/state
checkpointStore: {store}
checkpointInterval: {ci}
commitInterval: {cm}
kafka: {{bootstrapServers: "{bootstrap}"}}
s3: {{endpoint: "{endpoint}", forcePathStyle: true}}
dataflow: {df}
"#,
                kg = spec.key_groups,
                dir = dir.display(),
                ci = spec.checkpoint_interval,
                cm = spec.commit_interval,
                bootstrap = bed.bootstrap,
                endpoint = bed.s3_endpoint,
                df = spec.dataflow,
            ),
        )
        .unwrap();
        Self {
            bed: bed.clone(),
            name,
            dir: dir.to_path_buf(),
            config,
            input,
            recs,
            stats,
            late,
            dlq,
            store,
            workers: Vec::new(),
            generation: 0,
            restarts: 0,
        }
    }

    pub fn topics(&self) -> Topics {
        Topics {
            bed: self.bed.clone(),
            input: self.input.clone(),
            recs: self.recs.clone(),
            stats: self.stats.clone(),
            late: self.late.clone(),
            dlq: self.dlq.clone(),
        }
    }

    /// Start generation `gen` with `n` workers (`restore`: a savepoint URL, or latest).
    pub fn start(&mut self, gen: u32, n: u32, restore: Option<&str>) {
        assert!(
            self.workers.is_empty(),
            "the previous generation still runs"
        );
        self.generation = gen;
        for i in 0..n {
            let mut args = vec![
                "run".to_string(),
                "--config".into(),
                self.config.display().to_string(),
                "--worker-index".into(),
                i.to_string(),
                "--workers".into(),
                n.to_string(),
                "--generation".into(),
                gen.to_string(),
                "--state-dir".into(),
                self.dir
                    .join(format!("state-g{gen}-w{i}"))
                    .display()
                    .to_string(),
                "--http-listen".into(),
                "127.0.0.1:0".into(),
            ];
            if let Some(r) = restore {
                args.push("--restore".into());
                args.push(r.into());
            }
            let log = self.dir.join(format!("worker-g{gen}-w{i}.log"));
            let w = spawn_worker(i, args, log);
            self.workers.push(w);
        }
    }

    /// SIGKILL worker `i` and start it again with the same arguments.
    pub fn kill_and_restart(&mut self, i: usize) {
        let w = &mut self.workers[i];
        w.child.kill().unwrap();
        w.child.wait().unwrap();
        let (index, args, log) = (w.index, w.args.clone(), w.log.clone());
        self.workers[i] = spawn_worker(index, args, log);
    }

    /// Restart workers that exited (what Kubernetes does with a failed container).
    pub fn restart_exited(&mut self) -> usize {
        let mut n = 0;
        for i in 0..self.workers.len() {
            if self.workers[i].child.try_wait().unwrap().is_some() {
                let (index, args, log) = {
                    let w = &self.workers[i];
                    (w.index, w.args.clone(), w.log.clone())
                };
                self.workers[i] = spawn_worker(index, args, log);
                n += 1;
            }
        }
        self.restarts += n;
        n
    }

    pub fn kill_all(&mut self) {
        for mut w in self.workers.drain(..) {
            let _ = w.child.kill();
            let _ = w.child.wait();
        }
    }

    /// `GET /status` of worker `i` (`None` while it is starting or down).
    pub fn status(&self, i: usize) -> Option<Value> {
        let addr = self.workers[i].addr.lock().unwrap().clone()?;
        let (code, body) = try_http(&addr, "GET", "/status", "")?;
        (code == 200)
            .then(|| serde_json::from_str::<Value>(&body).ok())?
            .map(|v| v["metrics"].clone())
    }

    pub fn metric(&self, i: usize, name: &str) -> Option<i64> {
        self.status(i).and_then(|m| m[name].as_i64())
    }

    /// `POST /savepoint` on worker `i`.
    pub fn savepoint(&self, i: usize, id: &str, stop: bool) -> Value {
        let addr = self.wait_addr(i);
        let body = serde_json::json!({"id": id, "stop": stop}).to_string();
        let (code, resp) = try_http(&addr, "POST", "/savepoint", &body)
            .unwrap_or_else(|| panic!("savepoint call to worker {i} failed\n{}", self.logs()));
        assert_eq!(code, 200, "savepoint: {resp}\n{}", self.logs());
        serde_json::from_str(&resp).unwrap()
    }

    pub fn wait_addr(&self, i: usize) -> String {
        let mut addr = None;
        let ok = wait_until(Duration::from_secs(120), || {
            addr = self.workers[i].addr.lock().unwrap().clone();
            addr.is_some()
        });
        assert!(ok, "worker {i} printed no address\n{}", self.logs());
        addr.unwrap()
    }

    /// Wait until every worker's committed item watermark reaches `wm`, restarting workers
    /// that exit; fails after `timeout`.
    pub fn wait_watermark(&mut self, wm: i64, timeout: Duration) {
        let deadline = Instant::now() + timeout;
        loop {
            self.restart_exited();
            let done = (0..self.workers.len())
                .all(|i| self.metric(i, "watermark").is_some_and(|w| w >= wm));
            if done {
                return;
            }
            assert!(
                Instant::now() < deadline,
                "watermark {wm} not reached: {:?}\n{}",
                (0..self.workers.len())
                    .map(|i| self.metric(i, "watermark"))
                    .collect::<Vec<_>>(),
                self.logs()
            );
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    /// The last lines of every worker's log (for failure messages).
    pub fn logs(&self) -> String {
        let mut out = String::new();
        for w in &self.workers {
            let text = std::fs::read_to_string(&w.log).unwrap_or_default();
            let lines: Vec<&str> = text.lines().collect();
            let tail = &lines[lines.len().saturating_sub(25)..];
            out.push_str(&format!("--- {}\n{}\n", w.log.display(), tail.join("\n")));
        }
        out
    }
}

impl Drop for Job {
    fn drop(&mut self) {
        self.kill_all();
        if std::thread::panicking() {
            // Keep every worker's whole log for the post-mortem.
            let keep = std::env::temp_dir().join(format!("riffle-failed-{}", self.name));
            let _ = std::fs::create_dir_all(&keep);
            for e in std::fs::read_dir(&self.dir).into_iter().flatten().flatten() {
                if e.path().extension().is_some_and(|x| x == "log") {
                    let _ = std::fs::copy(e.path(), keep.join(e.file_name()));
                }
            }
            eprintln!("{}\nworker logs kept in {}", self.logs(), keep.display());
        }
    }
}

fn spawn_worker(index: u32, args: Vec<String>, log: PathBuf) -> Worker {
    let mut child = riffle()
        .args(&args)
        .env("RUST_LOG", "info,rdkafka=warn,librdkafka=warn")
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn riffle worker");
    let stderr = child.stderr.take().unwrap();
    let addr = Arc::new(Mutex::new(None));
    let a = addr.clone();
    let path = log.clone();
    std::thread::spawn(move || {
        let mut file = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&path)
            .unwrap();
        let _ = writeln!(file, "==== start");
        for line in BufReader::new(stderr).lines().map_while(|l| l.ok()) {
            if let Some(x) = line.trim().strip_prefix("riffle: HTTP API on http://") {
                *a.lock().unwrap() = Some(x.to_string());
            }
            let _ = writeln!(file, "{line}");
        }
    });
    Worker {
        index,
        child,
        addr,
        args,
        log,
    }
}

/// One HTTP/1.1 request to a worker; `None` if it is not reachable.
pub fn try_http(addr: &str, method: &str, path: &str, body: &str) -> Option<(u16, String)> {
    use std::io::Read;
    let mut s = std::net::TcpStream::connect(addr).ok()?;
    s.set_read_timeout(Some(Duration::from_secs(300))).ok()?;
    write!(
        s,
        "{method} {path} HTTP/1.1\r\nHost: {addr}\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    )
    .ok()?;
    let mut resp = String::new();
    s.read_to_string(&mut resp).ok()?;
    let status = resp.split_whitespace().nth(1)?.parse().ok()?;
    Some((status, resp.split_once("\r\n\r\n")?.1.to_string()))
}

/// Exactly-once checks on the outputs of a job whose input was `events` (valid, by eventId)
/// plus `poison` malformed records (each with a distinct payload).
pub fn verify_exactly_once(
    job: &Topics,
    valid_event_ids: &HashSet<String>,
    poison: &HashSet<String>,
) -> Vec<Record> {
    let recs = job.bed.read_committed(&job.recs);
    let mut seen = HashSet::new();
    for r in &recs {
        let v: Value = serde_json::from_slice(&r.value).unwrap();
        let id = v["eventId"].as_str().unwrap().to_string();
        assert!(
            seen.insert(id.clone()),
            "two recommendations for event {id}"
        );
    }
    assert_eq!(
        seen.len(),
        valid_event_ids.len(),
        "one recommendation per valid event"
    );
    assert!(
        seen == *valid_event_ids,
        "recommended events differ from the input"
    );
    let dlq = job.bed.read_committed(&job.dlq);
    let mut sources = HashSet::new();
    let mut dead = HashSet::new();
    for r in &dlq {
        let at = (
            r.headers["source.partition"].parse::<i32>().unwrap(),
            r.headers["source.offset"].parse::<i64>().unwrap(),
        );
        assert_eq!(r.headers["source.topic"], job.input);
        assert!(!r.headers["reason"].is_empty());
        assert!(sources.insert(at), "dead letter from {at:?} twice");
        let payload = String::from_utf8(r.value.clone()).unwrap();
        assert!(
            dead.insert(payload.clone()),
            "dead letter {payload:?} twice"
        );
    }
    assert!(
        dead == *poison,
        "dead letters differ: {} vs {} expected",
        dead.len(),
        poison.len()
    );
    // The inputs have bounded disorder: no event may be late, whatever was killed or stopped.
    let late = job.bed.read_committed(&job.late);
    assert!(
        late.is_empty(),
        "{} late events, e.g. {}",
        late.len(),
        String::from_utf8_lossy(&late[0].value)
    );
    for t in [&job.recs, &job.stats, &job.late, &job.dlq] {
        let open = job.bed.open_transactions(t);
        assert!(
            open.is_empty(),
            "open transaction on {t} partitions {open:?}"
        );
    }
    job.bed.read_committed(&job.stats)
}
