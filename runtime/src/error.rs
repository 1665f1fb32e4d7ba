use std::path::PathBuf;

/// Errors of the Riffle runtime library.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("invalid configuration: {0}")]
    Config(String),
    #[error("I/O error on {path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("state store (RocksDB): {0}")]
    State(#[from] rocksdb::Error),
    #[error("corrupt state: {0}")]
    CorruptState(String),
    #[error("checkpoint store: {0}")]
    Checkpoint(String),
    #[error("no checkpoint to restore from in {0}")]
    NoCheckpoint(String),
    #[error("serialization: {0}")]
    Json(#[from] serde_json::Error),
    #[error(transparent)]
    ConfigFile(#[from] riffle_config::ConfigError),
    #[error("store: {0}")]
    Store(#[from] riffle_store::StoreError),
    #[error("Kafka: {0}")]
    Kafka(String),
    /// The open transaction was aborted: restart from the last committed state.
    #[error("transaction aborted, rewinding: {0}")]
    Rewind(String),
    #[error("engine stopped: {0}")]
    Stopped(String),
}

pub type Result<T, E = Error> = std::result::Result<T, E>;

/// Attach the path to an `io::Error`.
pub(crate) trait IoContext<T> {
    fn at(self, path: impl Into<PathBuf>) -> Result<T>;
}

impl<T> IoContext<T> for std::io::Result<T> {
    fn at(self, path: impl Into<PathBuf>) -> Result<T> {
        self.map_err(|source| Error::Io {
            path: path.into(),
            source,
        })
    }
}
