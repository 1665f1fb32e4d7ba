//! The autoscaler's ground truth: the job's committed offsets on its input topics against
//! the topics' end offsets, read from Kafka by the operator itself (the workers' own figures
//! are not trusted for this: a stuck worker reports nothing). Behind a small trait so the
//! controller does not depend on a broker in unit tests.

use std::time::Duration;

use futures::future::BoxFuture;
use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::{ClientConfig, Offset, TopicPartitionList};
use riffle_config::KafkaConfig;

/// Sums over every partition of the input topics.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Offsets {
    pub end: i64,
    /// Committed offsets; a partition without one counts from its start.
    pub committed: i64,
    pub partitions: u32,
}

pub trait LagSource: Send + Sync {
    fn offsets(
        &self,
        kafka: &KafkaConfig,
        group: &str,
        topics: &[String],
    ) -> BoxFuture<'static, Result<Offsets, String>>;
}

/// Reads through librdkafka, on a blocking thread (its calls block).
pub struct KafkaLag;

const CALL_TIMEOUT: Duration = Duration::from_secs(5);

impl LagSource for KafkaLag {
    fn offsets(
        &self,
        kafka: &KafkaConfig,
        group: &str,
        topics: &[String],
    ) -> BoxFuture<'static, Result<Offsets, String>> {
        let mut c = ClientConfig::new();
        c.set("bootstrap.servers", &kafka.bootstrap_servers)
            .set("security.protocol", kafka.security_protocol.as_librdkafka())
            // The job's group, only to read its offsets: this consumer never subscribes, so
            // it never joins the group or moves its offsets.
            .set("group.id", group)
            .set("enable.auto.commit", "false")
            .set("client.id", "riffle-operator-lag");
        if let Some(m) = kafka.sasl_mechanism {
            c.set("sasl.mechanism", m.as_librdkafka());
            // The operator's own credentials (it reads no Secrets of the jobs).
            for (var, key) in [
                ("RIFFLE_KAFKA_SASL_USERNAME", "sasl.username"),
                ("RIFFLE_KAFKA_SASL_PASSWORD", "sasl.password"),
            ] {
                if let Ok(v) = std::env::var(var) {
                    c.set(key, v);
                }
            }
        }
        let topics = topics.to_vec();
        Box::pin(async move {
            tokio::task::spawn_blocking(move || read(&c, &topics))
                .await
                .map_err(|e| e.to_string())?
        })
    }
}

fn read(config: &ClientConfig, topics: &[String]) -> Result<Offsets, String> {
    let consumer: BaseConsumer = config.create().map_err(|e| e.to_string())?;
    let mut list = TopicPartitionList::new();
    let mut starts = std::collections::HashMap::new();
    let mut out = Offsets::default();
    for topic in topics {
        let md = consumer
            .fetch_metadata(Some(topic), CALL_TIMEOUT)
            .map_err(|e| format!("metadata of {topic}: {e}"))?;
        let t = md
            .topics()
            .iter()
            .find(|t| t.name() == topic)
            .ok_or_else(|| format!("topic {topic} not found"))?;
        if let Some(e) = t.error() {
            return Err(format!("topic {topic}: {e:?}"));
        }
        for p in t.partitions() {
            let (low, high) = consumer
                .fetch_watermarks(topic, p.id(), CALL_TIMEOUT)
                .map_err(|e| format!("offsets of {topic}/{}: {e}", p.id()))?;
            out.end += high;
            out.partitions += 1;
            starts.insert((topic.clone(), p.id()), low);
            list.add_partition(topic, p.id());
        }
    }
    let committed = consumer
        .committed_offsets(list, CALL_TIMEOUT)
        .map_err(|e| format!("committed offsets: {e}"))?;
    for element in committed.elements() {
        let low = starts
            .get(&(element.topic().to_string(), element.partition()))
            .copied()
            .unwrap_or(0);
        out.committed += match element.offset() {
            Offset::Offset(o) => o,
            _ => low,
        };
    }
    Ok(out)
}
