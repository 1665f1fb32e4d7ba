//! `riffle consume`: print what a job wrote to a topic, as its downstream readers see it —
//! `read_committed`, so only records of committed transactions (what exactly-once means to
//! a consumer).

use std::io::Write;
use std::time::{Duration, Instant};

use rdkafka::config::ClientConfig;
use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::{Message, Offset, TopicPartitionList};

use crate::distributed::kafka;
use crate::{Error, Result};

pub struct ConsumeOptions {
    pub bootstrap: String,
    pub topic: String,
    /// Stop after this many records.
    pub max: u64,
    /// Give up waiting for more after this long without a record.
    pub idle: Duration,
}

/// Print up to `max` records from the start of every partition; returns how many.
pub fn run(o: &ConsumeOptions, out: &mut impl Write) -> Result<u64> {
    let consumer: BaseConsumer = ClientConfig::new()
        .set("bootstrap.servers", &o.bootstrap)
        .set("group.id", "riffle-consume")
        .set("enable.auto.commit", "false")
        .set("isolation.level", "read_committed")
        .create()
        .map_err(|e| kafka::kafka_error("creating a consumer", e))?;
    let md = consumer
        .fetch_metadata(Some(&o.topic), kafka::CALL_TIMEOUT)
        .map_err(|e| kafka::kafka_error("topic metadata", e))?;
    let partitions: Vec<i32> = md
        .topics()
        .iter()
        .find(|t| t.name() == o.topic)
        .map(|t| t.partitions().iter().map(|p| p.id()).collect())
        .unwrap_or_default();
    if partitions.is_empty() {
        return Err(Error::Config(format!("topic {} does not exist", o.topic)));
    }
    // Assigned, not subscribed: no group membership, nothing committed.
    let mut list = TopicPartitionList::new();
    for p in partitions {
        list.add_partition_offset(&o.topic, p, Offset::Beginning)
            .map_err(|e| kafka::kafka_error("assigning partitions", e))?;
    }
    consumer
        .assign(&list)
        .map_err(|e| kafka::kafka_error("assigning partitions", e))?;
    let mut n = 0;
    let mut last = Instant::now();
    while n < o.max && last.elapsed() < o.idle {
        let Some(m) = consumer.poll(Duration::from_millis(200)) else {
            continue;
        };
        let m = m.map_err(|e| kafka::kafka_error("reading", e))?;
        last = Instant::now();
        let key = m.key().map(String::from_utf8_lossy).unwrap_or_default();
        let value = m.payload().map(String::from_utf8_lossy).unwrap_or_default();
        writeln!(out, "{key}\t{value}").map_err(|source| Error::Io {
            path: "<stdout>".into(),
            source,
        })?;
        n += 1;
    }
    Ok(n)
}
