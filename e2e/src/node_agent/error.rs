//! Errors of the node agent library.

use std::path::PathBuf;

/// Everything that can go wrong in the node agent.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// A call to the Kubernetes API failed.
    #[error("kubernetes API call failed while {context}: {source}")]
    Kube {
        /// What the agent was doing.
        context: String,
        /// The client error.
        #[source]
        source: kube::Error,
    },
    /// The kubeconfig could not be read or used.
    #[error("kubeconfig: {0}")]
    Kubeconfig(String),
    /// A file system operation failed.
    #[error("I/O error on {path}: {source}")]
    Io {
        /// The file or directory involved.
        path: PathBuf,
        /// The underlying error.
        #[source]
        source: std::io::Error,
    },
    /// The image mapping file is malformed.
    #[error("image map {path}: {message}")]
    ImageMap {
        /// The mapping file.
        path: PathBuf,
        /// What is wrong with it.
        message: String,
    },
    /// No mapping entry matches a container image.
    #[error("no local binary is mapped for image {0:?}")]
    UnmappedImage(String),
    /// The pod spec uses something the agent cannot provide (missing key, unsupported volume...).
    #[error("container config error: {0}")]
    ContainerConfig(String),
    /// Every loopback pod IP is in use.
    #[error("no free loopback pod IP left")]
    IpExhausted,
    /// Spawning a container process failed.
    #[error("cannot start {binary}: {source}")]
    Spawn {
        /// The executable.
        binary: PathBuf,
        /// The underlying error.
        #[source]
        source: std::io::Error,
    },
    /// Serialising state files failed.
    #[error("serialisation: {0}")]
    Serde(String),
    /// Logs or pod directories asked for do not exist.
    #[error("not found: {0}")]
    NotFound(String),
}

/// Result alias of the node agent library.
pub type Result<T, E = Error> = std::result::Result<T, E>;

impl Error {
    /// Wraps a client error with what the agent was doing.
    pub fn kube(context: impl Into<String>, source: kube::Error) -> Self {
        Self::Kube {
            context: context.into(),
            source,
        }
    }

    /// Wraps an I/O error with the path involved.
    pub fn io(path: impl Into<PathBuf>, source: std::io::Error) -> Self {
        Self::Io {
            path: path.into(),
            source,
        }
    }

    /// The HTTP status code of an API error, if this is one.
    pub fn api_code(&self) -> Option<u16> {
        match self {
            Self::Kube {
                source: kube::Error::Api(status),
                ..
            } => Some(status.code),
            _ => None,
        }
    }
}
