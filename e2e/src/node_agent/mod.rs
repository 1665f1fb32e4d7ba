//! A small kubelet for tests: registers a Node, renews its Lease and runs the pods bound to
//! it as local processes (image → binary through a mapping file). See `e2e/README.md`.

pub mod agent;
mod error;
pub mod images;
pub mod ipam;
pub mod layout;
pub mod node;
pub mod probe;
pub mod process;
pub mod sandbox;
pub mod status;
pub mod worker;

pub use agent::{run, AgentConfig};
pub use error::{Error, Result};
pub use layout::{default_state_dir, process_exists, read_logs, read_pid};
