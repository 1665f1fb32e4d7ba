#!/usr/bin/env python3
"""Riffle vs Apache Flink, side by side on the test bed (`make bench-flink`).

One generated input topic (`riffle produce`) is read by Riffle (one `riffle run` worker) and by
the Flink job in bench/flink (a local mini-cluster) alternately, for several rounds, each run
with fresh output topics, consumer groups and checkpoint locations. Per run:

  throughput  the whole input, pre-produced; events/s from the first to the last
              recommendation visible to a read_committed consumer, events per CPU second of
              the engine process (utime+stime from /proc, children included), and the rate
              from the engine's own counters between 10 % and 90 % of the input;
  checkpoints duration and size of every checkpoint taken during the throughput run
              (Riffle: GET /status; Flink: REST /jobs/:id/checkpoints);
  latency     a fresh topic fed by `riffle produce --rate R`; send time (the input record's
              CreateTime) → recommendation visible to a read_committed consumer; warm-up
              excluded;
  recovery    then SIGKILL of the engine process and a restart from its latest checkpoint
              while the producer goes on: time until outputs flow again, until every event
              is visible again within the threshold, until the outage is drained.

Then Flink's item stats must equal Riffle's (as multisets of parsed records) on the same
input, or the benchmark fails. Writes bench/results/flink-vs-riffle.md, PNG plots and the raw
JSON of every run.
"""

import argparse
import collections
import json
import os
import platform
import re
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import threading
import time
import urllib.request
from pathlib import Path

from confluent_kafka import Consumer, TopicPartition
from confluent_kafka.admin import AdminClient, NewTopic

REPO = Path(__file__).resolve().parents[2]
CACHE = Path(os.environ.get("RIFFLE_CACHE", Path.home() / ".cache" / "riffle"))
TARGET = Path(os.environ.get("CARGO_TARGET_DIR", CACHE / "target"))
RIFFLE = Path(os.environ.get("RIFFLE_BIN", TARGET / "release" / "riffle"))
FLINK_BUILD = Path(os.environ.get("RIFFLE_FLINK_BUILD", CACHE / "bench-flink" / "target"))
FLINK_VERSION = "2.2.1"
FLINK_KAFKA_VERSION = "5.0.0-2.2"
JAVA_OPENS = [
    "--add-opens=java.base/java.lang=ALL-UNNAMED", "--add-opens=java.base/java.util=ALL-UNNAMED",
    "--add-opens=java.base/java.io=ALL-UNNAMED", "--add-opens=java.base/java.nio=ALL-UNNAMED",
    "--add-opens=java.base/sun.nio.ch=ALL-UNNAMED", "--add-opens=java.base/java.lang.reflect=ALL-UNNAMED",
    "--add-opens=java.base/java.net=ALL-UNNAMED", "--add-opens=java.base/java.util.concurrent=ALL-UNNAMED",
    "--add-opens=java.base/java.util.concurrent.atomic=ALL-UNNAMED", "--add-opens=java.base/java.time=ALL-UNNAMED",
    "--add-opens=java.base/java.text=ALL-UNNAMED", "--add-exports=java.base/sun.net.util=ALL-UNNAMED",
    "--add-exports=java.rmi/sun.rmi.registry=ALL-UNNAMED",
]
CLK_TCK = os.sysconf("SC_CLK_TCK")
SAMPLE_PERIOD = 0.5


def log(msg):
    print(f"[bench-flink {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


class BenchError(Exception):
    pass


# --------------------------------------------------------------------------------------------
# Small helpers


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def http_get(port, path, timeout=5.0):
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=timeout) as r:
            return r.status, r.read()
    except urllib.error.HTTPError as e:
        return e.code, e.read()
    except Exception:
        return None, b""


def http_json(port, path):
    code, body = http_get(port, path)
    if code != 200:
        return None
    try:
        return json.loads(body)
    except ValueError:
        return None


def proc_cpu_ticks(pid):
    """utime + stime + cutime + cstime of a process, in clock ticks (None once it is gone)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    fields = stat.rsplit(")", 1)[1].split()
    # fields[0] is field 3 (state): utime is field 14 → index 11.
    return sum(int(fields[i]) for i in (11, 12, 13, 14))


def machine_busy_ticks():
    cpu = Path("/proc/stat").read_text().splitlines()[0].split()[1:9]
    v = [int(x) for x in cpu]
    return v[0] + v[1] + v[2] + v[5] + v[6] + v[7]


def quantile(sorted_values, q):
    if not sorted_values:
        return None
    i = min(len(sorted_values) - 1, max(0, int(round(q * (len(sorted_values) - 1)))))
    return sorted_values[i]


def event_id_of(value):
    """The eventId of a JSON record whose first field it is (both engines write it first)."""
    if value.startswith(b'{"eventId":"'):
        end = value.find(b'"', 12)
        if end > 0 and value.find(b"\\", 12, end) < 0:
            return value[12:end]
    try:
        return json.loads(value)["eventId"].encode()
    except (ValueError, KeyError, TypeError):
        return None


# --------------------------------------------------------------------------------------------
# Kafka


class Kafka:
    def __init__(self, bootstrap):
        self.bootstrap = bootstrap
        self.admin = AdminClient({"bootstrap.servers": bootstrap, "log_level": 3})

    def create_topics(self, topics):
        new = [NewTopic(name, num_partitions=n, replication_factor=1) for name, n in topics]
        for name, f in self.admin.create_topics(new, operation_timeout=60, request_timeout=60).items():
            try:
                f.result()
            except Exception as e:  # noqa: BLE001
                if "already exists" not in str(e).lower() and "TOPIC_ALREADY_EXISTS" not in str(e):
                    raise BenchError(f"creating topic {name}: {e}")
        deadline = time.time() + 60
        for name, n in topics:
            while True:
                md = self.admin.list_topics(name, timeout=10)
                t = md.topics.get(name)
                if t is not None and t.error is None and len(t.partitions) == n:
                    break
                if time.time() > deadline:
                    raise BenchError(f"topic {name} did not show {n} partitions")
                time.sleep(0.05)

    def delete_topics(self, names):
        if not names:
            return
        try:
            existing = set(self.admin.list_topics(timeout=10).topics)
        except Exception:  # noqa: BLE001
            return
        names = [n for n in names if n in existing]
        if not names:
            return
        for name, f in self.admin.delete_topics(names, operation_timeout=60).items():
            try:
                f.result()
            except Exception as e:  # noqa: BLE001
                log(f"warning: deleting topic {name}: {e}")

    def topics_with_prefix(self, prefix):
        return [t for t in self.admin.list_topics(timeout=10).topics if t.startswith(prefix)]

    def delete_groups(self, groups):
        try:
            futures = self.admin.delete_consumer_groups(groups, request_timeout=30)
        except Exception:  # noqa: BLE001
            return
        for _, f in futures.items():
            try:
                f.result()
            except Exception:  # noqa: BLE001
                pass

    def read_all(self, topic, idle=3.0, max_seconds=600):
        """Every committed record of a topic (read_committed), up to its current end."""
        c = Consumer({
            "bootstrap.servers": self.bootstrap, "group.id": f"bench-read-{topic}-{time.time()}",
            "isolation.level": "read_committed", "enable.auto.commit": False, "allow.auto.create.topics": False,
        })
        md = c.list_topics(topic, timeout=10)
        parts = sorted(md.topics[topic].partitions)
        ends = {}
        for p in parts:
            _, hi = c.get_watermark_offsets(TopicPartition(topic, p), timeout=10)
            ends[p] = hi
        c.assign([TopicPartition(topic, p, 0) for p in parts])
        out, done = [], {p for p in parts if ends[p] == 0}
        last, start = time.time(), time.time()
        while len(done) < len(parts) and time.time() - last < idle and time.time() - start < max_seconds:
            for m in c.consume(10000, timeout=0.5):
                if m.error():
                    continue
                last = time.time()
                out.append(m.value())
                if m.offset() + 1 >= ends[m.partition()]:
                    done.add(m.partition())
        c.close()
        return out


class Collector:
    """Reads a topic from the start as a read_committed consumer; notes when each eventId's
    record first became visible (and, with `timestamps`, the record's CreateTime instead)."""

    def __init__(self, bootstrap, topic, partitions, timestamps=False):
        self.c = Consumer({
            "bootstrap.servers": bootstrap, "group.id": f"bench-collect-{topic}",
            "isolation.level": "read_committed", "enable.auto.commit": False, "allow.auto.create.topics": False,
            "fetch.wait.max.ms": 10,
        })
        self.c.assign([TopicPartition(topic, p, 0) for p in range(partitions)])
        self.timestamps = timestamps
        self.at = {}
        self.duplicates = 0
        self.unreadable = 0
        self.first = None
        self.last = None
        self.lock = threading.Lock()
        self.stop_flag = False
        self.error = None
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def _run(self):
        try:
            while not self.stop_flag:
                msgs = self.c.consume(5000, timeout=0.05)
                now = time.time()
                if not msgs:
                    continue
                with self.lock:
                    for m in msgs:
                        if m.error():
                            continue
                        eid = event_id_of(m.value())
                        if eid is None:
                            self.unreadable += 1
                            continue
                        t = m.timestamp()[1] / 1000.0 if self.timestamps else now
                        if eid in self.at:
                            self.duplicates += 1
                        else:
                            self.at[eid] = t
                    if self.first is None:
                        self.first = now
                    self.last = now
        except Exception as e:  # noqa: BLE001
            self.error = e
        finally:
            self.c.close()

    def count(self):
        with self.lock:
            return len(self.at)

    def stop(self):
        self.stop_flag = True
        self.thread.join(30)
        if self.error:
            raise BenchError(f"reading recommendations: {self.error}")


# --------------------------------------------------------------------------------------------
# Engines


class Engine:
    name = "?"

    def __init__(self, run_dir, kafka, topics):
        self.dir = run_dir
        self.dir.mkdir(parents=True, exist_ok=True)
        self.kafka = kafka
        self.topics = topics  # input, recommendations, item_stats, late, dead_letter
        self.proc = None
        self.log_path = self.dir / f"{self.name}.log"
        self.checkpoints = []  # dicts: id, duration_ms, size_bytes, incremental_bytes

    def _spawn(self, cmd, env=None, log_path=None):
        logf = open(log_path or self.log_path, "ab")
        logf.write(f"--- bench-flink: starting {' '.join(map(str, cmd))}\n".encode())
        logf.flush()
        self.proc = subprocess.Popen(cmd, stdout=logf, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                     env=env, start_new_session=True)
        logf.close()
        self.spawned_at = time.time()

    def alive(self):
        return self.proc is not None and self.proc.poll() is None

    def check(self):
        if self.proc is not None and self.proc.poll() is not None:
            # The log's last lines without backtrace frames (indented), e.g. a panic message.
            lines = [ln for ln in self.log_path.read_text(errors="replace").splitlines()
                     if ln.strip() and not ln.startswith(" ") and not ln.startswith("\t")]
            raise BenchError(f"{self.name} exited with {self.proc.returncode} (log {self.log_path}): "
                             + " | ".join(lines[-6:]))

    def cpu_ticks(self):
        return proc_cpu_ticks(self.proc.pid) if self.proc else None

    def kill9(self):
        if self.proc and self.proc.poll() is None:
            os.kill(self.proc.pid, signal.SIGKILL)
            self.proc.wait()
        self.proc = None

    def stop(self):
        self.kill9()


class RiffleEngine(Engine):
    """`--parallelism` worker processes of one distributed Riffle job (worker 0 … P−1)."""
    name = "riffle"

    def __init__(self, run_dir, kafka, topics, job, opts, testbed):
        super().__init__(run_dir, kafka, topics)
        self.job = job
        self.workers = opts.parallelism
        self.ports = [free_port() for _ in range(self.workers)]
        self.procs = [None] * self.workers
        self.store = f"s3://{testbed['bucket']}/bench-flink/{job}"
        self.config = self.dir / "job.yaml"
        self.config.write_text(f"""name: {job}
parallelism: {opts.parallelism}
keyGroups: {opts.partitions}
source:
  kafka:
    topics: [{topics['input']}]
    startOffsets: earliest
sink:
  kafka:
    recommendations: {topics['recommendations']}
    itemStats: {topics['item_stats']}
    late: {topics['late']}
    deadLetter: {topics['dead_letter']}
stateDir: {self.dir / 'state'}
checkpointStore: {self.store}
checkpointInterval: {int(opts.checkpoint_interval * 1000)}ms
commitInterval: {opts.commit_interval_ms}ms
kafka:
  bootstrapServers: "{kafka.bootstrap}"
s3:
  endpoint: "{testbed['s3_endpoint']}"
  forcePathStyle: true
""")
        self.last_status = [{} for _ in range(self.workers)]

    def start(self):
        env = dict(os.environ, RUST_LOG=os.environ.get("RUST_LOG", "info"), NO_COLOR="1")
        for w in range(self.workers):
            self._spawn([str(RIFFLE), "run", "--config", str(self.config), "--worker-index", str(w),
                         "--workers", str(self.workers), "--generation", "1",
                         "--state-dir", str(self.dir / f"state-{w}"),
                         "--http-listen", f"127.0.0.1:{self.ports[w]}"], env=env,
                        log_path=self.dir / f"riffle-w{w}.log")
            self.procs[w] = self.proc

    def alive(self):
        return all(p is not None and p.poll() is None for p in self.procs)

    def check(self):
        for w, p in enumerate(self.procs):
            if p is not None and p.poll() is not None:
                self.proc, self.log_path = p, self.dir / f"riffle-w{w}.log"
                super().check()

    def cpu_ticks(self):
        ticks = [proc_cpu_ticks(p.pid) for p in self.procs if p is not None]
        return None if not ticks or any(t is None for t in ticks) else sum(ticks)

    def kill9(self):
        for w, p in enumerate(self.procs):
            if p is not None and p.poll() is None:
                os.kill(p.pid, signal.SIGKILL)
                p.wait()
            self.procs[w] = None
        self.proc = None

    def ready(self):
        return all(http_get(port, "/readyz", timeout=1)[0] == 200 for port in self.ports)

    def sample(self):
        """Progress (recommendations out, all workers) and checkpoint figures from /status."""
        total = 0
        for w, port in enumerate(self.ports):
            st = http_json(port, "/status")
            if not st:
                return None
            m = st.get("metrics", {})
            prev = self.last_status[w].get("checkpointsCompleted", 0)
            if m.get("checkpointsCompleted", 0) > prev:
                self.checkpoints.append({
                    "worker": w, "id": m.get("lastCheckpointId"), "duration_ms": m.get("checkpointDurationMs"),
                    "size_bytes": m.get("checkpointSizeBytes"),
                    "incremental_bytes": m.get("checkpointUploadedBytes"),
                    "sampled_after_s": round(time.time() - self.spawned_at, 2),
                })
            self.last_status[w] = m
            total += m.get("recommendationsOut") or 0
        return total

    def restart(self):
        """SIGKILL every worker (the whole engine, as the Flink JVM) and start them again."""
        self.kill9()
        self.last_status = [{} for _ in range(self.workers)]
        self.start()

    def counters(self):
        keys = ("eventsIn", "recommendationsOut", "itemStatsOut", "late", "deadLettered", "forwarded",
                "checkpointsCompleted", "commitsCompleted")
        return {k: sum((m.get(k) or 0) for m in self.last_status) for k in keys}

    def cleanup(self, s3):
        for w in range(self.workers):
            shutil.rmtree(self.dir / f"state-{w}", ignore_errors=True)
        internal = f"riffle-{self.job}"
        self.kafka.delete_topics(self.kafka.topics_with_prefix(internal + "-"))
        self.kafka.delete_groups([internal])
        if s3 is not None:
            s3.delete_prefix(f"bench-flink/{self.job}/")


class FlinkEngine(Engine):
    name = "flink"

    def __init__(self, run_dir, kafka, topics, job, opts):
        super().__init__(run_dir, kafka, topics)
        self.job = job
        self.opts = opts
        self.checkpoint_dir = self.dir / "checkpoints"
        self.port = free_port()
        self.job_id = None
        self.vertices = {}
        self.restored = False

    def command(self, restore):
        cp = (FLINK_BUILD / "classpath.txt").read_text().strip()
        o = self.opts
        return (["java", f"-Xms{o.flink_heap}", f"-Xmx{o.flink_heap}", "-XX:+UseParallelGC"] + JAVA_OPENS +
                ["-cp", f"{FLINK_BUILD / 'classes'}:{cp}", "dev.riffle.bench.flink.RiffleFlinkJob",
                 "--bootstrap", self.kafka.bootstrap, "--input", self.topics["input"],
                 "--group", f"{self.job}-flink", "--recommendations", self.topics["recommendations"],
                 "--item-stats", self.topics["item_stats"], "--late", self.topics["late"],
                 "--dead-letter", self.topics["dead_letter"], "--checkpoint-dir", str(self.checkpoint_dir),
                 "--checkpoint-interval-ms", str(int(o.checkpoint_interval * 1000)),
                 "--parallelism", str(o.parallelism), "--max-parallelism", str(o.partitions),
                 "--rest-port", str(self.port), "--txn-prefix", f"{self.job}-flink",
                 "--managed-memory", o.flink_managed_memory, "--restore", restore])

    def start(self, restore="none"):
        self.job_id = None
        self.vertices = {}
        self._spawn(self.command(restore))

    def _find_job(self):
        if self.job_id is None:
            ov = http_json(self.port, "/jobs/overview")
            if ov and ov.get("jobs"):
                running = [j for j in ov["jobs"] if j["state"] not in ("FAILED", "CANCELED", "FINISHED")]
                if running:
                    self.job_id = running[0]["jid"]
        if self.job_id and not self.vertices:
            d = http_json(self.port, f"/jobs/{self.job_id}")
            if d:
                for v in d["vertices"]:
                    if v["name"].startswith("item-stage"):
                        self.vertices["item"] = v["id"]
                    elif v["name"].startswith("user-stage"):
                        self.vertices["user"] = v["id"]
        return self.job_id

    def ready(self):
        if not self._find_job():
            return False
        d = http_json(self.port, f"/jobs/{self.job_id}")
        return bool(d) and d.get("state") == "RUNNING" and all(v["status"] == "RUNNING" for v in d["vertices"])

    def metric(self, vertex, name):
        if not self._find_job() or vertex not in self.vertices:
            return None
        r = http_json(self.port, f"/jobs/{self.job_id}/vertices/{self.vertices[vertex]}/subtasks/metrics"
                                 f"?get={name}&agg=sum")
        if not r:
            return None
        return int(r[0].get("sum", 0))

    def sample(self):
        self.samples_taken = getattr(self, "samples_taken", 0) + 1
        if self.samples_taken % 10 == 0:
            self.fetch_checkpoints()  # the REST history is bounded: collect as we go
        return self.metric("item", "item-stage.riffleRecommendations")

    def fetch_checkpoints(self):
        """Every completed checkpoint of the current job from the REST API."""
        if not self._find_job():
            return
        d = http_json(self.port, f"/jobs/{self.job_id}/checkpoints")
        if not d:
            return
        seen = {(c["job"], c["id"]) for c in self.checkpoints}
        for h in sorted(d.get("history", []), key=lambda h: h["id"]):
            if h.get("status") != "COMPLETED" or h.get("is_savepoint") or (self.job_id, h["id"]) in seen:
                continue
            self.checkpoints.append({
                "job": self.job_id, "id": h["id"], "duration_ms": h.get("end_to_end_duration"),
                "size_bytes": h.get("state_size"), "incremental_bytes": h.get("checkpointed_size"),
            })

    def restart(self):
        self.fetch_checkpoints()
        self.kill9()
        self.start(restore="latest")

    def counters(self):
        return {
            "eventsIn": self.metric("user", "user-stage.riffleEventsIn"),
            "late": self.metric("user", "user-stage.riffleLate"),
            "recommendationsOut": self.metric("item", "item-stage.riffleRecommendations"),
            "itemStatsOut": self.metric("item", "item-stage.riffleItemStats"),
            "incrementsAfterPaneDeath": self.metric("item", "item-stage.riffleIncrementsAfterPaneDeath"),
        }

    def cleanup(self, s3):
        shutil.rmtree(self.checkpoint_dir, ignore_errors=True)
        self.kafka.delete_groups([f"{self.job}-flink"])


class S3:
    """Deletes a run's Riffle checkpoints from MinIO afterwards."""

    def __init__(self, testbed):
        import boto3
        from botocore.config import Config
        self.bucket = testbed["bucket"]
        self.client = boto3.client("s3", endpoint_url=testbed["s3_endpoint"],
                                   region_name=os.environ.get("AWS_REGION", "us-east-1"),
                                   config=Config(s3={"addressing_style": "path"}))

    def delete_prefix(self, prefix):
        try:
            paginator = self.client.get_paginator("list_objects_v2")
            for page in paginator.paginate(Bucket=self.bucket, Prefix=prefix):
                keys = [{"Key": o["Key"]} for o in page.get("Contents", [])]
                for i in range(0, len(keys), 1000):
                    self.client.delete_objects(Bucket=self.bucket, Delete={"Objects": keys[i:i + 1000]})
        except Exception as e:  # noqa: BLE001
            log(f"warning: deleting s3://{self.bucket}/{prefix}: {e}")


# --------------------------------------------------------------------------------------------
# Phases


def make_engine(kind, run_dir, kafka, topics, job, opts, testbed):
    if kind == "riffle":
        return RiffleEngine(run_dir, kafka, topics, job, opts, testbed)
    return FlinkEngine(run_dir, kafka, topics, job, opts)


def output_topics(kafka, prefix):
    t = {"recommendations": f"{prefix}-recs", "item_stats": f"{prefix}-stats", "late": f"{prefix}-late",
         "dead_letter": f"{prefix}-dead"}
    kafka.create_topics([(t["recommendations"], 8), (t["item_stats"], 8), (t["late"], 1), (t["dead_letter"], 1)])
    return t


def throughput_run(kind, rnd, ctx):
    opts, kafka = ctx["opts"], ctx["kafka"]
    job = f"{ctx['tag']}-r{rnd}-{kind}-tput"
    topics = output_topics(kafka, job)
    topics["input"] = ctx["input_topic"]
    engine = make_engine(kind, ctx["workdir"] / f"round-{rnd}" / f"{kind}-throughput", kafka, topics, job, opts,
                         ctx["testbed"])
    n = opts.events
    collector = Collector(kafka.bootstrap, topics["recommendations"], 8)
    samples = []  # (t, progress, cpu ticks, machine ticks)
    result = {"engine": kind, "round": rnd, "phase": "throughput", "events": n}
    try:
        log(f"round {rnd}: {kind} throughput over {n} events")
        engine.start()
        cpu_first = None
        last_progress = (0, time.time())
        next_sample = 0.0
        while True:
            engine.check()
            now = time.time()
            seen = collector.count()
            if seen > 0 and cpu_first is None:
                cpu_first = (now, engine.cpu_ticks(), machine_busy_ticks())
            if now >= next_sample:
                next_sample = now + SAMPLE_PERIOD
                prog = engine.sample()
                samples.append((now, prog, engine.cpu_ticks(), machine_busy_ticks()))
            if seen >= n:
                break
            if seen > last_progress[0]:
                last_progress = (seen, now)
            elif now - last_progress[1] > opts.stall_seconds:
                raise BenchError(f"{kind}: only {seen} of {n} recommendations, no progress for "
                                 f"{opts.stall_seconds} s")
            time.sleep(0.005)
        end = (time.time(), engine.cpu_ticks(), machine_busy_ticks())
        engine.sample()
        samples.append((end[0], engine.sample(), end[1], end[2]))
        if kind == "flink":
            engine.fetch_checkpoints()
        result["counters"] = engine.counters()
        engine.stop()
        collector.stop()
        first, last = collector.first, collector.last
        seconds = max(last - first, 1e-9)
        recs = len(collector.at)
        result.update({
            "recommendations": recs, "duplicates": collector.duplicates, "unreadable": collector.unreadable,
            "startup_s": first - engine.spawned_at, "first_to_last_s": seconds,
            "events_per_s": recs / seconds,
            "spawn_to_last_s": last - engine.spawned_at,
            "events_per_s_from_spawn": recs / (last - engine.spawned_at),
        })
        cpu_total = (end[1] - samples[0][2]) / CLK_TCK if samples and samples[0][2] is not None else None
        cpu_window = (end[1] - cpu_first[1]) / CLK_TCK
        result.update({
            "cpu_s_first_to_last": cpu_window,
            "events_per_cpu_s_first_to_last": recs / max(cpu_window, 1e-9),
            "cpu_s_whole_run": cpu_total,
            "events_per_cpu_s_whole_run": recs / cpu_total if cpu_total else None,
            "machine_busy_cores": (end[2] - cpu_first[2]) / CLK_TCK / seconds,
            "engine_cores": cpu_window / seconds,
        })
        result.update(steady_rates(samples, n))
        result["checkpoints"] = engine.checkpoints
        result["samples"] = [{"t": round(t - engine.spawned_at, 3), "progress": p,
                              "cpu_s": None if c is None else c / CLK_TCK} for t, p, c, _ in samples]
        # Outputs other than recommendations, for the equality check and the sanity checks.
        stats = kafka.read_all(topics["item_stats"])
        result["item_stats_records"] = len(stats)
        result["late_records"] = len(kafka.read_all(topics["late"], idle=1.0))
        result["dead_letter_records"] = len(kafka.read_all(topics["dead_letter"], idle=1.0))
        return result, stats
    finally:
        engine.stop()
        collector.stop_flag = True
        if not opts.keep:
            kafka.delete_topics([topics["recommendations"], topics["item_stats"], topics["late"],
                                 topics["dead_letter"]])
            engine.cleanup(ctx["s3"])


def steady_rates(samples, n):
    """Rate and CPU efficiency between 10 % and 90 % of the input, from the engine's own
    progress counter (interpolated between samples)."""
    pts = [(t, p, c) for t, p, c, _ in samples if p is not None and c is not None]

    def cross(level):
        for (t0, p0, c0), (t1, p1, c1) in zip(pts, pts[1:]):
            if p0 < level <= p1:
                f = (level - p0) / (p1 - p0)
                return t0 + f * (t1 - t0), c0 + f * (c1 - c0)
        return None

    lo, hi = cross(0.1 * n), cross(0.9 * n)
    if not lo or not hi or hi[0] <= lo[0]:
        return {"steady_events_per_s": None, "steady_events_per_cpu_s": None}
    events = 0.8 * n
    cpu = (hi[1] - lo[1]) / CLK_TCK
    return {"steady_events_per_s": events / (hi[0] - lo[0]),
            "steady_events_per_cpu_s": events / cpu if cpu > 0 else None,
            "steady_engine_cores": cpu / (hi[0] - lo[0])}


def latency_run(kind, rnd, ctx):
    opts, kafka = ctx["opts"], ctx["kafka"]
    job = f"{ctx['tag']}-r{rnd}-{kind}-lat"
    topics = output_topics(kafka, job)
    topics["input"] = f"{job}-events"
    kafka.create_topics([(topics["input"], opts.partitions)])
    engine = make_engine(kind, ctx["workdir"] / f"round-{rnd}" / f"{kind}-latency", kafka, topics, job, opts,
                         ctx["testbed"])
    result = {"engine": kind, "round": rnd, "phase": "latency", "rate": opts.latency_rate}
    recs = sent = producer = None
    try:
        engine.start()
        deadline = time.time() + 180
        while not engine.ready():
            engine.check()
            if time.time() > deadline:
                raise BenchError(f"{kind} not ready after 180 s; see {engine.log_path}")
            time.sleep(0.05)
        result["ready_after_start_s"] = time.time() - engine.spawned_at
        recs = Collector(kafka.bootstrap, topics["recommendations"], 8)
        sent = Collector(kafka.bootstrap, topics["input"], opts.partitions, timestamps=True)
        total = int(opts.latency_rate * (opts.latency_seconds + opts.recovery_seconds))
        log(f"round {rnd}: {kind} latency at {opts.latency_rate} events/s for {opts.latency_seconds} s, "
            f"then SIGKILL and {opts.recovery_seconds} s more")
        plog = open(engine.dir / "producer.log", "ab")
        producer = subprocess.Popen([str(RIFFLE), "produce", "--topic", topics["input"], "--events", str(total),
                                     "--users", str(opts.users), "--items", str(opts.items),
                                     "--rate", str(opts.latency_rate), "--seed", str(1000 + rnd),
                                     "--bootstrap", kafka.bootstrap],
                                    stdout=plog, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
        plog.close()
        p_start = time.time()
        measure_to = p_start + opts.latency_seconds

        def watch(until):
            while time.time() < until:
                engine.check()
                engine.sample()
                if producer.poll() not in (None, 0):
                    raise BenchError(f"the producer failed; see {engine.dir / 'producer.log'}")
                time.sleep(SAMPLE_PERIOD)

        watch(measure_to)
        # Kill once the measured events are visible (bounded), so the kill is not in them.
        wait_until = time.time() + 60
        while time.time() < wait_until:
            with sent.lock, recs.lock:
                measured = [e for e, t in sent.at.items() if t < measure_to]
                missing = sum(1 for e in measured if e not in recs.at)
            if missing == 0:
                break
            engine.check()
            time.sleep(0.1)
        if kind == "flink":
            engine.fetch_checkpoints()
        killed = time.time()
        engine.restart()
        log(f"round {rnd}: {kind} killed (SIGKILL) and restarted")
        deadline = time.time() + 300
        while not engine.ready():
            engine.check()
            if time.time() > deadline:
                raise BenchError(f"{kind} not ready 300 s after the restart; see {engine.log_path}")
            time.sleep(0.02)
        ready = time.time()
        watch(max(p_start + opts.latency_seconds + opts.recovery_seconds, ready + 5))
        producer.wait(timeout=120)
        stopped = time.time()
        drain_until = stopped + opts.drain_seconds
        while time.time() < drain_until:
            if sent.count() >= total and recs.count() >= sent.count():
                break
            engine.check()
            time.sleep(0.1)
        if kind == "flink":
            engine.fetch_checkpoints()
        result["counters"] = engine.counters()
        engine.stop()
        recs.stop()
        sent.stop()
        result.update(latency_stats(sent.at, recs.at, p_start + opts.warmup_seconds, measure_to, p_start, killed))
        result.update(recovery_stats(sent.at, recs.at, killed, ready, result.get("p99_ms")))
        result["sent"] = len(sent.at)
        result["received"] = sum(1 for e in sent.at if e in recs.at)
        result["duplicates"] = recs.duplicates
        result["checkpoints"] = engine.checkpoints
        result["ready_after_restart_s"] = ready - killed
        lat_csv = engine.dir / "latency.csv"
        with open(lat_csv, "w") as f:
            f.write("event_id,sent_s,latency_ms\n")
            for e, t in sorted(sent.at.items(), key=lambda kv: kv[1]):
                got = recs.at.get(e)
                f.write(f"{e.decode()},{t - p_start:.3f},{'' if got is None else f'{(got - t) * 1000:.1f}'}\n")
        result["samples_csv"] = str(lat_csv)
        result["_latencies_ms"] = sorted((recs.at[e] - t) * 1000 for e, t in sent.at.items()
                                         if p_start + opts.warmup_seconds <= t < measure_to and e in recs.at)
        return result
    finally:
        engine.stop()
        if producer and producer.poll() is None:
            producer.kill()
        for c in (recs, sent):
            if c:
                c.stop_flag = True
        if not opts.keep:
            kafka.delete_topics([topics["input"], topics["recommendations"], topics["item_stats"],
                                 topics["late"], topics["dead_letter"]])
            engine.cleanup(ctx["s3"])


def latency_stats(sent, arrived, t0, t1, p_start, killed):
    lat = sorted((arrived[e] - t) * 1000 for e, t in sent.items() if t0 <= t < t1 and e in arrived)
    n = sum(1 for t in sent.values() if t0 <= t < t1)
    produced = sum(1 for t in sent.values() if p_start <= t < killed)
    return {
        "measured": n, "measured_received": len(lat),
        "achieved_rate": produced / max(killed - p_start, 1e-9),
        "p50_ms": quantile(lat, 0.5), "p90_ms": quantile(lat, 0.9), "p99_ms": quantile(lat, 0.99),
        "p999_ms": quantile(lat, 0.999), "max_ms": lat[-1] if lat else None,
    }


def recovery_stats(sent, arrived, killed, ready, steady_p99_ms):
    """Affected events: sent after the kill, or sent before it and not visible by then."""
    after = sorted((t, arrived.get(e)) for e, t in sent.items()
                   if t >= killed or arrived.get(e) is None or arrived[e] > killed)
    flows = [a for _, a in after if a is not None and a > killed]
    res = {"outputs_flow_again_s": (min(flows) - killed) if flows else None,
           "affected_events": len(after), "affected_missing": sum(1 for _, a in after if a is None),
           "max_latency_ms": max(((a - t) * 1000 for t, a in after if a is not None), default=None)}

    def recovered(threshold_s):
        last_bad = None
        for i, (t, a) in enumerate(after):
            if a is None or a - t >= threshold_s:
                last_bad = i
        if last_bad is None:
            return 0.0
        if last_bad + 1 < len(after):
            return after[last_bad + 1][0] - killed
        return None

    threshold = max(1.0, (steady_p99_ms or 0) / 1000.0)
    res["latency_threshold_s"] = threshold
    res["latency_back_s"] = recovered(threshold)
    res["latency_under_1s_s"] = recovered(1.0)
    drained = [a for t, a in after if t <= ready]
    res["outage_drained_s"] = (max(drained) - killed) if drained and all(a is not None for a in drained) else None
    return res


# --------------------------------------------------------------------------------------------
# Item stats equality


def canonical_stats(values):
    c = collections.Counter()
    bad = 0
    for v in values:
        try:
            r = json.loads(v)
            c[json.dumps(r, sort_keys=True, separators=(",", ":"))] += 1
        except ValueError:
            bad += 1
    return c, bad


def compare_stats(ref_name, ref, name, other):
    only_ref, only_other = ref - other, other - ref
    ends = lambda c: sorted({json.loads(k)["windowEnd"] for k in c})  # noqa: E731
    return {
        "reference": ref_name, "engine": name,
        "reference_records": sum(ref.values()), "records": sum(other.values()),
        "windows_reference": len(ends(ref)), "windows": len(ends(other)),
        "only_in_reference": sum(only_ref.values()), "only_in_engine": sum(only_other.values()),
        "equal": not only_ref and not only_other,
        "examples_only_in_reference": list(only_ref)[:3], "examples_only_in_engine": list(only_other)[:3],
    }


# --------------------------------------------------------------------------------------------
# Report


METRICS = [
    # key, label, unit, better, phase
    ("events_per_s", "throughput, first → last recommendation visible", "events/s", "higher", "throughput"),
    ("steady_events_per_s", "throughput, engine counter 10 % → 90 % of input", "events/s", "higher", "throughput"),
    ("steady_events_per_cpu_s", "events per CPU second (= events/s per core), 10 % → 90 %", "events/CPU-s",
     "higher", "throughput"),
    ("events_per_cpu_s_whole_run", "events per CPU second, process start → last visible", "events/CPU-s",
     "higher", "throughput"),
    ("engine_cores", "engine CPU, first → last visible", "cores", "-", "throughput"),
    ("startup_s", "start → first recommendation visible", "s", "lower", "throughput"),
    ("ckpt_duration_median_ms", "checkpoint duration, median (throughput run)", "ms", "lower", "throughput"),
    ("ckpt_duration_max_ms", "checkpoint duration, max (throughput run)", "ms", "lower", "throughput"),
    ("ckpt_size_last_mb", "checkpoint size, full, last of the throughput run", "MB", "lower", "throughput"),
    ("ckpt_incremental_median_mb", "checkpoint size, incremental (uploaded), median", "MB", "lower", "throughput"),
    ("p50_ms", "end-to-end latency p50 (send → visible, read_committed)", "ms", "lower", "latency"),
    ("p99_ms", "end-to-end latency p99", "ms", "lower", "latency"),
    ("max_ms", "end-to-end latency max", "ms", "lower", "latency"),
    ("ready_after_restart_s", "recovery: SIGKILL → restarted engine ready", "s", "lower", "latency"),
    ("outputs_flow_again_s", "recovery: SIGKILL → first new recommendation visible", "s", "lower", "latency"),
    ("latency_back_s", "recovery: SIGKILL → latency back within max(1 s, steady p99)", "s", "lower", "latency"),
    ("latency_under_1s_s", "recovery: SIGKILL → latency back under 1 s", "s", "lower", "latency"),
    ("outage_drained_s", "recovery: SIGKILL → every event sent until ready visible", "s", "lower", "latency"),
]


def derive(run):
    ck = run.get("checkpoints") or []
    d = [c["duration_ms"] for c in ck if c.get("duration_ms") is not None]
    inc = [c["incremental_bytes"] for c in ck if c.get("incremental_bytes") is not None]
    size = [c["size_bytes"] for c in ck if c.get("size_bytes") is not None]
    run["ckpt_count"] = len(ck)
    run["ckpt_duration_median_ms"] = statistics.median(d) if d else None
    run["ckpt_duration_max_ms"] = max(d) if d else None
    run["ckpt_size_last_mb"] = size[-1] / 1e6 if size else None
    run["ckpt_incremental_median_mb"] = statistics.median(inc) / 1e6 if inc else None


def mmm(values):
    v = sorted(x for x in values if x is not None)
    if not v:
        return None
    return (v[0], statistics.median(v), v[-1])


def fmt(x, unit):
    if x is None:
        return "n/a"
    if unit in ("events/s", "events/CPU-s"):
        return f"{x:,.0f}"
    if unit == "ms":
        return f"{x:,.0f}" if x >= 100 else f"{x:.1f}"
    return f"{x:.2f}"


def fmt3(t, unit):
    if t is None:
        return "not measured"
    return " / ".join(fmt(x, unit) for x in t)


def machine_description():
    cpu = Path("/proc/cpuinfo").read_text()
    model = re.search(r"model name\s*:\s*(.*)", cpu)
    mem = re.search(r"MemTotal:\s*(\d+)", Path("/proc/meminfo").read_text())
    return (f"{model.group(1) if model else platform.processor()}, {os.cpu_count()} logical CPUs, "
            f"{int(mem.group(1)) / 1024 / 1024:.0f} GiB RAM, Linux {platform.release()}")


def versions():
    def out(cmd):
        try:
            r = subprocess.run(cmd, capture_output=True, text=True, timeout=30)
            return (r.stdout + r.stderr).strip().splitlines()[0]
        except Exception:  # noqa: BLE001
            return "unknown"
    commit = out(["git", "-C", str(REPO), "rev-parse", "--short", "HEAD"])
    # This run's own outputs under bench/results do not make the build dirty.
    dirty = subprocess.run(["git", "-C", str(REPO), "status", "--porcelain", "--untracked-files=no",
                            "--", ".", ":(exclude)bench/results"],
                           capture_output=True, text=True).stdout.strip()
    if os.environ.get("RIFFLE_BIN"):
        built = f"binary RIFFLE_BIN={RIFFLE}, not necessarily from this tree (at {commit})"
    else:
        built = f"built from the work tree at commit {commit}{', with uncommitted changes' if dirty else ''}"
    return {
        "riffle": f"{out([str(RIFFLE), '--version'])} ({built})",
        "flink": f"Apache Flink {FLINK_VERSION}, flink-connector-kafka {FLINK_KAFKA_VERSION}, RocksDB state backend "
                 f"(frocksdbjni)",
        "java": out(["java", "-version"]),
        "kafka": "test bed Kafka (e2e/testbed: 4.3.1, KRaft, one broker)",
    }


def write_report(ctx, runs, checks, failures):
    opts = ctx["opts"]
    out = ctx["results"]
    out.mkdir(parents=True, exist_ok=True)
    for r in runs:
        derive(r)
    by = collections.defaultdict(dict)
    for r in runs:
        by[(r["engine"], r["phase"])][r["round"]] = r
    rounds = sorted({r["round"] for r in runs})
    lines = []
    w = lines.append
    w("# Riffle vs Apache Flink, side by side")
    w("")
    w(f"Generated by bench/flink/bench.py (`make bench-flink`) on {time.strftime('%Y-%m-%d %H:%M %Z')}; "
      f"{len(rounds)} round(s), engines alternating (odd rounds Riffle first, even rounds Flink first).")
    w("")
    w(f"- **Machine**: {machine_description()}. The test bed's Kafka and MinIO and the benchmark's own "
      f"reader run on the same cores as the engine under test.")
    v = versions()
    w(f"- **Riffle**: {v['riffle']}; one `riffle run` worker process, `commitInterval` "
      f"{opts.commit_interval_ms} ms, checkpoints to MinIO (`s3://…`, the test bed's).")
    w(f"- **Flink**: {v['flink']}; the job in `bench/flink/` on a local mini-cluster in one JVM "
      f"({v['java']}, `-Xmx{opts.flink_heap}`, ParallelGC, managed memory {opts.flink_managed_memory}); "
      f"checkpoints to the **local file system** (`file://`; no S3 file system plugin), incremental; "
      f"exactly-once KafkaSink (one transaction per checkpoint).")
    w(f"- **Kafka**: {v['kafka']}.")
    w(f"- **Input**: {opts.events:,} events from `riffle produce` ({opts.users:,} users, {opts.items:,} items, "
      f"Zipf), {opts.partitions} partitions keyed by userId (= Riffle's keyGroups; Flink's max parallelism "
      f"is set to the same); produced once, read by every throughput run.")
    w(f"- **Both**: parallelism {opts.parallelism}, checkpoints every {opts.checkpoint_interval:g} s, the default "
      f"dataflow parameters (docs/semantics.md), outputs read by a `read_committed` consumer.")
    w("")
    w("## Results")
    w("")
    w("min / median / max over the rounds. Ratio = Riffle ÷ Flink, computed per round (the two runs of that "
      "round) and summarised as min / median / max: for rates, > 1 means Riffle is faster; for times and "
      "sizes, < 1 means Riffle is smaller/faster. Timing numbers on a 2-core machine shared with Kafka, "
      "MinIO and the benchmark's reader are noisy; compare ratios within a round first.")
    w("")
    w("| metric | unit | better | Riffle min / med / max | Flink min / med / max | ratio Riffle/Flink (min / med / max of per-round ratios) |")
    w("|---|---|---|---|---|---|")
    for key, label, unit, better, phase in METRICS:
        rv = [by[("riffle", phase)].get(i, {}).get(key) for i in rounds]
        fv = [by[("flink", phase)].get(i, {}).get(key) for i in rounds]
        ratios = [a / b for a, b in zip(rv, fv) if a is not None and b not in (None, 0)]
        rt = mmm(ratios)
        ratio = "n/a" if rt is None else " / ".join(f"{x:.2f}" for x in rt)
        w(f"| {label} | {unit} | {better} | {fmt3(mmm(rv), unit)} | {fmt3(mmm(fv), unit)} | {ratio} |")
    w("")
    w("`n/a` / `not measured`: the quantity did not occur within the run (e.g. latency never came back "
      "under 1 s, or no checkpoint completed); the raw JSON has the details.")
    w("")
    w("## Work done: item stats equality")
    w("")
    ref = checks[0]["reference"] if checks else "none: no Riffle run completed"
    w(f"Every throughput run's item-stats topic, parsed and compared as a multiset of records with the "
      f"reference, the first Riffle run ({ref}):")
    w("")
    w("| run | records | windows | only in reference | only in this run | equal |")
    w("|---|---|---|---|---|---|")
    for c in checks:
        w(f"| {c['engine']} | {c['records']:,} | {c['windows']} | {c['only_in_reference']} | "
          f"{c['only_in_engine']} | {'yes' if c['equal'] else '**NO**'} |")
    w("")
    sanity = []
    for r in runs:
        if r["phase"] == "throughput":
            sanity.append(f"{r['engine']} round {r['round']}: {r['recommendations']:,} recommendations "
                          f"({r['duplicates']} duplicates), {r['item_stats_records']:,} item stats, "
                          f"{r['late_records']} late, {r['dead_letter_records']} dead letters")
        else:
            sanity.append(f"{r['engine']} round {r['round']} latency: {r['sent']:,} sent, {r['received']:,} "
                          f"with a recommendation, {r['duplicates']} duplicates, {r['affected_missing']} "
                          f"affected by the kill never answered")
    w("Sanity: " + "; ".join(sanity) + ".")
    w("")
    if failures:
        w("## Failures")
        w("")
        for f in failures:
            w(f"- {f}")
        w("")
    w("## How each quantity is measured")
    w("")
    w("- **Throughput**: the input is produced before the engine starts. *first → last*: recommendations "
      "visible to a read_committed consumer, from the first to the last one (as `riffle bench-kafka`). "
      "Flink's exactly-once sink makes output visible only when a checkpoint completes, so its first and last "
      "visible instants are quantised by the checkpoint interval; *10 % → 90 %* uses each engine's own "
      "counter of recommendations emitted (Riffle `/status`, Flink REST metrics), sampled every 0.5 s, and "
      "does not depend on commit timing.")
    w("- **Events per CPU second** (= events/s per core): utime+stime (+ children) of the engine process from "
      "`/proc/<pid>/stat` over the same 10 % → 90 % span; the Flink JVM includes its JobManager, "
      "TaskManager, Kafka clients, GC and JIT threads. *Process start → last visible* includes start-up.")
    w(f"- **Latency**: a fresh topic fed by `riffle produce --rate {opts.latency_rate}` for "
      f"{opts.latency_seconds} s (first {opts.warmup_seconds} s excluded); latency = recommendation visible "
      f"to a read_committed consumer − the input record's CreateTime (stamped by the producer when it sent "
      f"it). Flink's visibility is bound to its checkpoint interval (exactly-once KafkaSink), Riffle's to its "
      f"commitInterval ({opts.commit_interval_ms} ms), with checkpoints decoupled.")
    w("- **Checkpoints**: every checkpoint completed during the throughput run. Riffle: `/status` "
      "(`checkpointDurationMs`, `checkpointSizeBytes`, `checkpointUploadedBytes`, sampled every 0.5 s). "
      "Flink: `/jobs/:id/checkpoints` (`end_to_end_duration`, `state_size`, `checkpointed_size`).")
    w(f"- **Recovery**: after the latency measurement the engine process gets SIGKILL and is restarted at "
      f"once with the same arguments (Riffle: `--restore latest` by default; Flink: "
      f"`execution.state-recovery.path` = the newest retained checkpoint) while the producer goes on for "
      f"{opts.recovery_seconds} s. *Latency back*: the send time from which every event's latency stays "
      f"under max(1 s, that run's steady p99) — the same rule for both, since Flink's steady latency is "
      f"above 1 s by construction; *under 1 s*: the strict rule of `riffle bench-kafka`.")
    w("")
    w("## Plots")
    w("")
    for png in ctx.get("plots", []):
        w(f"![{png.stem}]({png.name})")
        w("")
    w(f"Raw JSON of every run: `bench/results/raw/`. Work directory (logs, latency CSVs): `{ctx['workdir']}`.")
    (out / "flink-vs-riffle.md").write_text("\n".join(lines) + "\n")


def plots(ctx, runs):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    out = ctx["results"]
    files = []
    colors = {"riffle": "#1f77b4", "flink": "#d62728"}
    tput = [r for r in runs if r["phase"] == "throughput"]
    lat = [r for r in runs if r["phase"] == "latency"]
    rounds = sorted({r["round"] for r in runs})

    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    for ax, key, title in ((axes[0], "steady_events_per_s", "throughput (10 % → 90 %), events/s"),
                           (axes[1], "steady_events_per_cpu_s", "events per CPU second")):
        for k, eng in enumerate(("riffle", "flink")):
            xs = [i + (k - 0.5) * 0.35 for i in rounds]
            ys = [next((r.get(key) or 0 for r in tput if r["engine"] == eng and r["round"] == i), 0) for i in rounds]
            ax.bar(xs, ys, width=0.35, color=colors[eng], label=eng)
        ax.set_xticks(rounds)
        ax.set_xlabel("round")
        ax.set_title(title)
        ax.legend()
    fig.tight_layout()
    p = out / "throughput.png"
    fig.savefig(p, dpi=110)
    plt.close(fig)
    files.append(p)

    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    for r in lat:
        v = r.get("_latencies_ms") or []
        if v:
            ys = [(i + 1) / len(v) for i in range(len(v))]
            axes[0].plot(v, ys, color=colors[r["engine"]], alpha=0.8, label=f"{r['engine']} r{r['round']}")
    axes[0].set_xscale("log")
    axes[0].set_xlabel("latency, ms (log)")
    axes[0].set_ylabel("fraction of events")
    axes[0].set_title("end-to-end latency CDF")
    axes[0].legend(fontsize=7)
    for k, eng in enumerate(("riffle", "flink")):
        for j, q in enumerate(("p50_ms", "p99_ms")):
            vals = [r.get(q) for r in lat if r["engine"] == eng and r.get(q) is not None]
            if vals:
                axes[1].bar(k * 3 + j, statistics.median(vals), color=colors[eng], alpha=1.0 if j == 0 else 0.6)
                axes[1].errorbar(k * 3 + j, statistics.median(vals),
                                 yerr=[[statistics.median(vals) - min(vals)], [max(vals) - statistics.median(vals)]],
                                 color="black", capsize=3)
    axes[1].set_xticks([0, 1, 3, 4])
    axes[1].set_xticklabels(["Riffle p50", "Riffle p99", "Flink p50", "Flink p99"])
    axes[1].set_yscale("log")
    axes[1].set_ylabel("ms (log), median and range over rounds")
    axes[1].set_title("latency percentiles")
    fig.tight_layout()
    p = out / "latency.png"
    fig.savefig(p, dpi=110)
    plt.close(fig)
    files.append(p)

    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    for k, eng in enumerate(("riffle", "flink")):
        data = [[c["duration_ms"] for c in (r.get("checkpoints") or []) if c.get("duration_ms") is not None]
                for r in sorted(tput, key=lambda r: r["round"]) if r["engine"] == eng]
        sizes = [[(c.get("incremental_bytes") or 0) / 1e6 for c in (r.get("checkpoints") or [])]
                 for r in sorted(tput, key=lambda r: r["round"]) if r["engine"] == eng]
        for i, (d, s) in enumerate(zip(data, sizes)):
            axes[0].plot(range(1, len(d) + 1), d, marker="o", color=colors[eng], alpha=0.7,
                         label=f"{eng} r{i + 1}")
            axes[1].plot(range(1, len(s) + 1), s, marker="o", color=colors[eng], alpha=0.7, label=f"{eng} r{i + 1}")
    axes[0].set_title("checkpoint duration (throughput run)")
    axes[0].set_xlabel("checkpoint #")
    axes[0].set_ylabel("ms")
    axes[0].legend(fontsize=7)
    axes[1].set_title("checkpoint incremental size (uploaded)")
    axes[1].set_xlabel("checkpoint #")
    axes[1].set_ylabel("MB")
    axes[1].legend(fontsize=7)
    fig.tight_layout()
    p = out / "checkpoints.png"
    fig.savefig(p, dpi=110)
    plt.close(fig)
    files.append(p)
    return files


# --------------------------------------------------------------------------------------------
# Main


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    env = os.environ.get
    ap.add_argument("--rounds", type=int, default=int(env("ROUNDS", 3)))
    ap.add_argument("--events", type=int, default=int(env("EVENTS", 1_000_000)))
    ap.add_argument("--users", type=int, default=100_000)
    ap.add_argument("--items", type=int, default=20_000)
    ap.add_argument("--partitions", type=int, default=32, help="input partitions = Riffle keyGroups")
    ap.add_argument("--parallelism", type=int, default=int(env("PARALLELISM", 1)))
    ap.add_argument("--checkpoint-interval", type=float, default=10.0, help="seconds, both engines")
    ap.add_argument("--commit-interval-ms", type=int, default=100, help="Riffle's commitInterval")
    ap.add_argument("--latency-rate", type=int, default=int(env("LATENCY_RATE", 2000)))
    ap.add_argument("--latency-seconds", type=int, default=int(env("LATENCY_SECONDS", 60)))
    ap.add_argument("--warmup-seconds", type=int, default=5)
    ap.add_argument("--recovery-seconds", type=int, default=int(env("RECOVERY_SECONDS", 60)))
    ap.add_argument("--drain-seconds", type=int, default=120)
    ap.add_argument("--stall-seconds", type=int, default=180)
    ap.add_argument("--flink-heap", default="1g")
    ap.add_argument("--flink-managed-memory", default="512m")
    ap.add_argument("--engines", default="riffle,flink")
    ap.add_argument("--skip-latency", action="store_true")
    ap.add_argument("--input-topic", help="reuse an existing input topic (it must hold --events events)")
    ap.add_argument("--results", default=str(REPO / "bench" / "results"))
    ap.add_argument("--workdir", default=None)
    ap.add_argument("--keep", action="store_true", help="keep topics, checkpoints and state")
    opts = ap.parse_args()
    if not 1 <= opts.parallelism <= opts.partitions:
        raise SystemExit("--parallelism must be between 1 and --partitions")

    for var in ("KAFKA_BOOTSTRAP", "S3_ENDPOINT", "S3_BUCKET", "AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"):
        if not env(var):
            raise SystemExit(f"{var} is not set: eval \"$(e2e/testbed/testbed env)\" first (make bench-flink does)")
    if not RIFFLE.exists():
        raise SystemExit(f"{RIFFLE} missing: cargo build --release --workspace --bin riffle")
    if not (FLINK_BUILD / "classpath.txt").exists():
        raise SystemExit(f"{FLINK_BUILD}/classpath.txt missing: (cd bench/flink && mvn package)")
    testbed = {"bucket": env("S3_BUCKET"), "s3_endpoint": env("S3_ENDPOINT")}
    tag = f"bf{time.strftime('%m%d%H%M%S')}"
    workdir = Path(opts.workdir or Path("/tmp") / f"riffle-bench-flink-{tag}")
    workdir.mkdir(parents=True, exist_ok=True)
    results = Path(opts.results)
    (results / "raw").mkdir(parents=True, exist_ok=True)
    for stale in list((results / "raw").glob("round-*.json")) + list(results.glob("*.png")):
        stale.unlink()  # this run's files only
    kafka = Kafka(env("KAFKA_BOOTSTRAP"))
    ctx = {"opts": opts, "kafka": kafka, "tag": tag, "workdir": workdir, "testbed": testbed, "results": results,
           "s3": None if opts.keep else S3(testbed)}
    log(f"work directory {workdir}")

    if opts.input_topic:
        ctx["input_topic"] = opts.input_topic
    else:
        ctx["input_topic"] = f"{tag}-input"
        kafka.create_topics([(ctx["input_topic"], opts.partitions)])
        log(f"producing {opts.events:,} events into {ctx['input_topic']} ({opts.partitions} partitions)")
        subprocess.run([str(RIFFLE), "produce", "--topic", ctx["input_topic"], "--events", str(opts.events),
                        "--users", str(opts.users), "--items", str(opts.items), "--bootstrap", kafka.bootstrap],
                       check=True, stderr=subprocess.DEVNULL)

    engines = opts.engines.split(",")
    runs, checks, failures, pending = [], [], [], []
    reference = None
    try:
        for rnd in range(1, opts.rounds + 1):
            order = engines if rnd % 2 == 1 else list(reversed(engines))
            for kind in order:
                try:
                    r, stats = throughput_run(kind, rnd, ctx)
                except BenchError as e:
                    failures.append(f"round {rnd} {kind} throughput: {e}")
                    log(f"FAILED: {e}")
                    continue
                canon, bad = canonical_stats(stats)
                if bad:
                    failures.append(f"round {rnd} {kind}: {bad} item-stats records are not JSON")
                # The reference is the first Riffle run; runs before it wait for it.
                pending.append((f"{kind} round {rnd}", canon))
                if reference is None and kind == "riffle":
                    reference = (f"{kind} round {rnd}", canon)
                if reference is not None:
                    for name, c in pending:
                        chk = compare_stats(reference[0], reference[1], name, c)
                        checks.append(chk)
                        if not chk["equal"]:
                            failures.append(f"item stats of {name} differ from {reference[0]}: "
                                            f"{chk['only_in_reference']} records only there, "
                                            f"{chk['only_in_engine']} only here")
                    pending = []
                if r["recommendations"] != opts.events or r["duplicates"]:
                    failures.append(f"round {rnd} {kind}: {r['recommendations']} distinct recommendations for "
                                    f"{opts.events} events, {r['duplicates']} duplicates")
                if r["late_records"] or r["dead_letter_records"]:
                    failures.append(f"round {rnd} {kind}: {r['late_records']} late and {r['dead_letter_records']}"
                                    f" dead-letter records on generated input (the equality check assumes none)")
                runs.append(r)
                save_raw(results, r)
                log(f"round {rnd}: {kind} throughput {fmt(r['events_per_s'], 'events/s')} events/s first→last, "
                    f"{fmt(r.get('steady_events_per_s'), 'events/s')} steady, "
                    f"{fmt(r.get('steady_events_per_cpu_s'), 'events/CPU-s')} events/CPU-s; "
                    f"{len(stats)} item stats records"
                    + ("" if not checks or checks[-1]["engine"] != f"{kind} round {rnd}" else
                       f" ({'equal to' if checks[-1]['equal'] else 'DIFFERENT from'} {checks[-1]['reference']})"))
                if opts.skip_latency:
                    continue
                try:
                    r = latency_run(kind, rnd, ctx)
                except BenchError as e:
                    failures.append(f"round {rnd} {kind} latency/recovery: {e}")
                    log(f"FAILED: {e}")
                    continue
                runs.append(r)
                save_raw(results, r)
                log(f"round {rnd}: {kind} latency p50 {fmt(r['p50_ms'], 'ms')} ms p99 {fmt(r['p99_ms'], 'ms')} ms; "
                    f"recovery: ready {fmt(r['ready_after_restart_s'], 's')} s, outputs again "
                    f"{fmt(r['outputs_flow_again_s'], 's')} s, latency back {fmt(r['latency_back_s'], 's')} s".replace("n/a s", "n/a"))
    finally:
        if pending:
            failures.append("item stats not checked: no Riffle run completed to compare with ("
                            + ", ".join(name for name, _ in pending) + ")")
        if not opts.keep and not opts.input_topic:
            kafka.delete_topics([ctx["input_topic"]])
        for r in runs:
            derive(r)
        try:
            ctx["plots"] = plots(ctx, runs) if runs else []
        except Exception as e:  # noqa: BLE001
            failures.append(f"plots: {e}")
            ctx["plots"] = []
        write_report(ctx, runs, checks, failures)
        log(f"wrote {results / 'flink-vs-riffle.md'}")
    if failures:
        for f in failures:
            log(f"FAILURE: {f}")
        raise SystemExit(1)


def save_raw(results, r):
    path = results / "raw" / f"round-{r['round']}-{r['engine']}-{r['phase']}.json"
    path.write_text(json.dumps({k: v for k, v in r.items() if not k.startswith("_")}, indent=1, default=str))


if __name__ == "__main__":
    main()
