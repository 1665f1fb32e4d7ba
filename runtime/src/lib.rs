//! Riffle's job runtime: the windowed recommendation dataflow (docs/semantics.md) with keyed
//! RocksDB state, incremental checkpoints and exactly-once file output.

pub mod checkpoint;
pub mod commands;
pub mod dataflow;
pub mod distributed;
pub mod engine;
mod error;
pub mod event;
pub mod http;
pub mod keygroup;
pub mod metrics;
pub mod shutdown;
pub mod sink;
pub mod source;
pub mod state;
pub mod watermark;

pub use error::{Error, Result};
/// The job configuration (crate `riffle-config`, shared with the operator).
pub use riffle_config as config;
/// Object stores for checkpoints and savepoints (crate `riffle-store`).
pub use riffle_store as store;
