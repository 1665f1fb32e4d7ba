//! Riffle's job runtime: the windowed recommendation dataflow (docs/semantics.md) with keyed
//! RocksDB state, incremental checkpoints and exactly-once file output.

pub mod checkpoint;
pub mod commands;
pub mod config;
pub mod dataflow;
pub mod engine;
mod error;
pub mod event;
pub mod http;
pub mod keygroup;
pub mod metrics;
pub mod sink;
pub mod source;
pub mod state;
pub mod watermark;

pub use error::{Error, Result};
