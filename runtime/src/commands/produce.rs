//! `riffle produce`: a generated clickstream into a Kafka topic, keyed by userId the way
//! Kafka's own clients partition (murmur2), for demos and walkthroughs.

use std::time::{Duration, Instant};

use rdkafka::config::ClientConfig;
use rdkafka::producer::{BaseProducer, BaseRecord, Producer};

use crate::config::GeneratorConfig;
use crate::distributed::kafka;
use crate::keygroup::key_group;
use crate::source::generator::Generator;
use crate::{Error, Result};

pub struct ProduceOptions {
    pub bootstrap: String,
    pub topic: String,
    pub events: u64,
    pub users: u64,
    pub items: u64,
    /// Records per second of wall time; 0: as fast as possible.
    pub rate: u64,
    pub seed: u64,
}

/// Produce `events` generated events; returns how many were sent and how long it took.
pub fn run(o: &ProduceOptions) -> Result<(u64, Duration)> {
    let producer: BaseProducer = ClientConfig::new()
        .set("bootstrap.servers", &o.bootstrap)
        .set("enable.idempotence", "true")
        .set("linger.ms", "20")
        .set("compression.type", "lz4")
        .create()
        .map_err(|e| kafka::kafka_error("creating a producer", e))?;
    let md = producer
        .client()
        .fetch_metadata(Some(&o.topic), kafka::CALL_TIMEOUT)
        .map_err(|e| kafka::kafka_error("topic metadata", e))?;
    let partitions = md
        .topics()
        .iter()
        .find(|t| t.name() == o.topic)
        .map_or(0, |t| t.partitions().len() as u32);
    if partitions == 0 {
        return Err(Error::Config(format!(
            "topic {} does not exist: create it first",
            o.topic
        )));
    }
    let gen_parts = 4;
    let start_ms = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as i64)
        .unwrap_or(0);
    let gen = Generator::new(GeneratorConfig {
        users: o.users,
        items: o.items,
        events: o.events,
        partitions: gen_parts,
        seed: o.seed,
        // Event time starts now and advances at the production rate (or at 4,000 events per
        // second when producing as fast as possible: 1 M events span about 4 minutes).
        start_ts: start_ms,
        events_per_second: if o.rate > 0 {
            (o.rate / u64::from(gen_parts)).max(1)
        } else {
            1_000
        },
        ..GeneratorConfig::default()
    });
    let run = format!("{:x}", start_ms);
    let started = Instant::now();
    let mut sent = 0u64;
    for k in 0..o.events / u64::from(gen_parts) {
        for p in 0..gen_parts {
            let mut e = gen.event(p, k);
            // The generator numbers events per run; a run prefix keeps ids unique when the
            // same topic gets several runs (eventId is what exactly-once is checked by).
            e.event_id = compact_str::format_compact!("{run}-{}", e.event_id);
            let value = serde_json::to_vec(&e)?;
            let partition = key_group(e.user_id.as_bytes(), partitions) as i32;
            let mut rec = BaseRecord::to(&o.topic)
                .partition(partition)
                .key(e.user_id.as_bytes())
                .payload(&value);
            loop {
                match producer.send(rec) {
                    Ok(()) => break,
                    Err((_, r)) => {
                        // Queue full: let deliveries drain.
                        rec = r;
                        producer.poll(Duration::from_millis(10));
                    }
                }
            }
            producer.poll(Duration::ZERO);
            sent += 1;
            if o.rate > 0 {
                let due = Duration::from_secs_f64(sent as f64 / o.rate as f64);
                if let Some(wait) = due.checked_sub(started.elapsed()) {
                    std::thread::sleep(wait);
                }
            }
        }
    }
    producer
        .flush(Duration::from_secs(120))
        .map_err(|e| kafka::kafka_error("flushing", e))?;
    Ok((sent, started.elapsed()))
}
