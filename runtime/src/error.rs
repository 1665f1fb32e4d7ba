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
    #[error("dataflow: {0}")]
    Dataflow(#[source] riffle_dataflow::Error),
}

/// The dataflow's errors come from the state store it was given, which is this crate's: hand
/// them back unwrapped.
impl From<riffle_dataflow::Error> for Error {
    fn from(e: riffle_dataflow::Error) -> Self {
        match e {
            riffle_dataflow::Error::Store(inner) => match inner.downcast::<Error>() {
                Ok(e) => *e,
                Err(other) => Error::Dataflow(riffle_dataflow::Error::Store(other)),
            },
        }
    }
}

/// Errors of the state layer, as the dataflow's stages see them.
impl From<Error> for riffle_dataflow::Error {
    fn from(e: Error) -> Self {
        riffle_dataflow::Error::Store(Box::new(e))
    }
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
