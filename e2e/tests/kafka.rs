//! Kafka transactions against the test bed's real broker (KRaft, single node).
//!
//! Commits one transaction, aborts another, commits a sentinel, then checks that a
//! `read_committed` consumer sees exactly the committed records and none of the
//! aborted ones, while a `read_uncommitted` consumer does see the aborted ones
//! (so the abort really reached the log and the first check is not vacuous).
//!
//! Needs the test bed: `make testbed-up && eval "$(e2e/testbed/testbed env)"`.

use std::collections::BTreeSet;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use rdkafka::admin::{AdminClient, AdminOptions, NewTopic, TopicReplication};
use rdkafka::client::DefaultClientContext;
use rdkafka::config::ClientConfig;
use rdkafka::consumer::{Consumer, StreamConsumer};
use rdkafka::message::Message;
use rdkafka::producer::{FutureProducer, FutureRecord, Producer};
use rdkafka::{Offset, TopicPartitionList};

const TIMEOUT: Duration = Duration::from_secs(60);
const SENTINEL: &str = "end-of-test";

/// The broker address printed by `testbed env`; a missing variable is a failure, not a skip.
fn bootstrap() -> String {
    std::env::var("KAFKA_BOOTSTRAP").unwrap_or_else(|_| {
        panic!(
            "KAFKA_BOOTSTRAP is not set: test bed not running: run `make testbed-up` \
             and `eval \"$(e2e/testbed/testbed env)\"`"
        )
    })
}

/// Unique per run (pid + wall-clock nanos) so re-runs never see old records.
fn unique(prefix: &str) -> String {
    let nanos = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_nanos();
    format!("{prefix}-{}-{nanos}", std::process::id())
}

async fn create_topic(bootstrap: &str, topic: &str) {
    let admin: AdminClient<DefaultClientContext> = ClientConfig::new()
        .set("bootstrap.servers", bootstrap)
        .create()
        .expect("admin client");
    let opts = AdminOptions::new()
        .operation_timeout(Some(TIMEOUT))
        .request_timeout(Some(TIMEOUT));
    let results = admin
        .create_topics(
            &[NewTopic::new(topic, 1, TopicReplication::Fixed(1))],
            &opts,
        )
        .await
        .unwrap_or_else(|e| {
            panic!("create topic {topic} (is the test bed running? `make testbed-up`): {e}")
        });
    for r in results {
        r.unwrap_or_else(|(t, e)| panic!("create topic {t}: {e}"));
    }
}

fn transactional_producer(bootstrap: &str) -> FutureProducer {
    let producer: FutureProducer = ClientConfig::new()
        .set("bootstrap.servers", bootstrap)
        .set("transactional.id", unique("riffle-e2e-tx"))
        .set("enable.idempotence", "true")
        .set("message.timeout.ms", "30000")
        .create()
        .expect("transactional producer");
    producer.init_transactions(TIMEOUT).unwrap_or_else(|e| {
        panic!("init_transactions (is the test bed running? `make testbed-up`): {e}")
    });
    producer
}

/// Produce `values` in one transaction, then commit or abort it.
async fn produce_in_transaction(
    producer: &FutureProducer,
    topic: &str,
    values: &[String],
    commit: bool,
) {
    producer.begin_transaction().expect("begin_transaction");
    for v in values {
        producer
            .send(
                FutureRecord::to(topic).key(v.as_str()).payload(v.as_str()),
                TIMEOUT,
            )
            .await
            .unwrap_or_else(|(e, _)| panic!("produce {v}: {e}"));
    }
    if commit {
        producer
            .commit_transaction(TIMEOUT)
            .expect("commit_transaction");
    } else {
        producer
            .abort_transaction(TIMEOUT)
            .expect("abort_transaction");
    }
}

/// Read partition 0 from the beginning until the sentinel arrives (bounded by TIMEOUT).
async fn read_until_sentinel(bootstrap: &str, topic: &str, isolation: &str) -> Vec<String> {
    let consumer: StreamConsumer = ClientConfig::new()
        .set("bootstrap.servers", bootstrap)
        .set("group.id", unique("riffle-e2e-group"))
        .set("enable.auto.commit", "false")
        .set("isolation.level", isolation)
        .create()
        .expect("consumer");
    let mut tpl = TopicPartitionList::new();
    tpl.add_partition_offset(topic, 0, Offset::Beginning)
        .unwrap();
    consumer.assign(&tpl).expect("assign");

    let deadline = Instant::now() + TIMEOUT;
    let mut seen = Vec::new();
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        let msg = tokio::time::timeout(left, consumer.recv())
            .await
            .unwrap_or_else(|_| {
                panic!("{isolation} consumer: no sentinel within {TIMEOUT:?}; got {seen:?}")
            })
            .expect("consume");
        let value = String::from_utf8(msg.payload().expect("payload").to_vec()).unwrap();
        if value == SENTINEL {
            return seen;
        }
        seen.push(value);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn read_committed_sees_committed_and_not_aborted() {
    let bootstrap = bootstrap();
    let topic = unique("riffle-e2e-tx");
    create_topic(&bootstrap, &topic).await;

    let committed: Vec<String> = (0..5).map(|i| format!("committed-{i}")).collect();
    let aborted: Vec<String> = (0..5).map(|i| format!("aborted-{i}")).collect();

    let producer = transactional_producer(&bootstrap);
    produce_in_transaction(&producer, &topic, &committed, true).await;
    produce_in_transaction(&producer, &topic, &aborted, false).await;
    produce_in_transaction(&producer, &topic, &[SENTINEL.to_string()], true).await;

    let read_committed = read_until_sentinel(&bootstrap, &topic, "read_committed").await;
    assert_eq!(
        read_committed, committed,
        "read_committed must see exactly the committed records, in order"
    );

    let read_uncommitted: BTreeSet<String> =
        read_until_sentinel(&bootstrap, &topic, "read_uncommitted")
            .await
            .into_iter()
            .collect();
    let expected: BTreeSet<String> = committed.iter().chain(&aborted).cloned().collect();
    assert_eq!(
        read_uncommitted, expected,
        "read_uncommitted should also see the aborted records (proves the abort reached the log)"
    );
}
