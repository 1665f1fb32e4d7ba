//! Riffle's job runtime: the windowed recommendation dataflow (docs/semantics.md) with keyed
//! RocksDB state, incremental checkpoints and exactly-once file output.

pub mod checkpoint;
pub mod commands;
pub mod distributed;
pub mod engine;
mod error;
pub mod http;
pub mod metrics;
pub mod shutdown;
pub mod sink;
pub mod source;
pub mod state;
pub mod watermark;

pub use error::{Error, Result};
/// The job configuration (crate `riffle-config`, shared with the operator).
pub use riffle_config as config;
/// The dataflow core (crate `riffle-dataflow`): stages, exchange, windows, outputs.
pub use riffle_dataflow as dataflow;
/// Events and their decoding, and key groups (part of the dataflow core).
pub use riffle_dataflow::{event, keygroup};
/// Object stores for checkpoints and savepoints (crate `riffle-store`).
pub use riffle_store as store;
