//! The distributed runtime: a job runs as N worker processes (pods) that read Kafka, exchange
//! records between the by-user and the by-item stage through an internal Kafka topic, write
//! their outputs to Kafka, and commit all of it exactly once in Kafka transactions, with state
//! snapshots in S3. The design is in `docs/distributed.md`.
//!
//! - `wire`, `sender`, `receiver`, `board`, `protocol`: pure logic (formats, aggregation,
//!   watermark alignment, the trending board, commit/recovery/GC decisions);
//! - `kafka`, `snapshot`: the edges (rdkafka, object stores);
//! - `worker`: the loop that ties them together.

pub mod board;
pub mod kafka;
pub mod protocol;
pub mod receiver;
pub mod sender;
pub mod snapshot;
pub mod wire;
pub mod worker;

pub use worker::{RestoreArg, SavepointInfo, WorkerControl, WorkerOptions};
