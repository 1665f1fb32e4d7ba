//! The Riffle operator: reconciles `StreamJob` resources into worker pods.
//!
//! - [`upgrade`]: the lifecycle as a pure, journaled state machine (no I/O).
//! - [`autoscaler`]: the lag-driven rescale decision, pure; [`lag`] reads its ground truth
//!   (committed against end offsets) from Kafka.
//! - [`render`]: what a spec becomes (job file, pods, ConfigMap, Service), pure.
//! - [`controller`]: the reconciler, the only place that talks to the API server.
//! - [`workers`], [`savepoints`]: the edges to the workers' HTTP API and to the savepoint
//!   store, behind small traits.
//! - [`leader`]: Lease-based leader election (a pure decision plus the Lease I/O).
//! - [`metrics`]: the operator's Prometheus metrics.

pub mod autoscaler;
pub mod autoscaling;
pub mod controller;
pub mod crd;
pub mod lag;
pub mod leader;
pub mod metrics;
pub mod render;
pub mod savepoints;
pub mod upgrade;
pub mod workers;

/// Errors of the operator library.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("Kubernetes API: {0}")]
    Kube(#[from] kube::Error),
    #[error("the spec cannot run: {0}")]
    InvalidSpec(String),
    #[error("finalizer: {0}")]
    Finalizer(#[source] Box<kube::runtime::finalizer::Error<Error>>),
    /// Not a failure: cleanup waits for something (the finalizer stays until it is done).
    #[error("waiting: {0}")]
    Waiting(String),
    #[error("no answer within {0:?}")]
    Timeout(std::time::Duration),
    #[error("object store: {0}")]
    Store(String),
    #[error("serialization: {0}")]
    Json(#[from] serde_json::Error),
    #[error("lost the leader lease: {0}")]
    LostLease(String),
}

impl Error {
    /// What cleanup waits for, if this is a wait rather than a failure.
    pub fn waiting(&self) -> Option<&str> {
        match self {
            Self::Waiting(what) => Some(what),
            Self::Finalizer(f) => match f.as_ref() {
                kube::runtime::finalizer::Error::CleanupFailed(e) => e.waiting(),
                _ => None,
            },
            _ => None,
        }
    }

    /// The HTTP status of an API error, if this is one (for the error policy and metrics).
    pub fn api_code(&self) -> Option<u16> {
        match self {
            Self::Kube(kube::Error::Api(s)) => Some(s.code),
            Self::Finalizer(f) => match f.as_ref() {
                kube::runtime::finalizer::Error::ApplyFailed(e)
                | kube::runtime::finalizer::Error::CleanupFailed(e) => e.api_code(),
                kube::runtime::finalizer::Error::AddFinalizer(kube::Error::Api(s))
                | kube::runtime::finalizer::Error::RemoveFinalizer(kube::Error::Api(s)) => {
                    Some(s.code)
                }
                _ => None,
            },
            _ => None,
        }
    }
}
