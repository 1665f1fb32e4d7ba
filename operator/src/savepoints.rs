//! Savepoints as the operator sees them: requests in flight (answered by a worker in the
//! background, so a reconcile never waits minutes), completed savepoints found in the store
//! after an operator restart, and disposal straight on S3 (no live job needed).

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};

use futures::future::BoxFuture;
use riffle_config::S3Config;

use crate::upgrade::SavepointOutcome;
use crate::workers::WorkerApi;

/// The job-wide manifest a savepoint directory holds once it is complete (the runtime writes
/// it last).
pub const MANIFEST: &str = "_savepoint.json";

/// The savepoint store, reduced to what the operator needs. A trait so the bookkeeping can be
/// tested with a scripted store.
pub trait SavepointStore: Send + Sync {
    /// Whether the savepoint at `location` (`s3://…/<id>`) is complete.
    fn is_complete(
        &self,
        location: String,
        s3: Option<S3Config>,
    ) -> BoxFuture<'static, Result<bool, String>>;
    /// Delete everything under `location`; deleting what is gone is not an error.
    fn dispose(
        &self,
        location: String,
        s3: Option<S3Config>,
    ) -> BoxFuture<'static, Result<usize, String>>;
}

/// `riffle-store` (S3 or a directory), with the operator's own credentials (the AWS default
/// chain of its environment).
#[derive(Clone, Copy, Default)]
pub struct ObjectStoreSavepoints;

impl SavepointStore for ObjectStoreSavepoints {
    fn is_complete(
        &self,
        location: String,
        s3: Option<S3Config>,
    ) -> BoxFuture<'static, Result<bool, String>> {
        Box::pin(async move {
            tokio::task::spawn_blocking(move || {
                let store =
                    riffle_store::open(&location, s3.as_ref()).map_err(|e| e.to_string())?;
                match store.get_bytes(MANIFEST) {
                    Ok(_) => Ok(true),
                    Err(e) if e.is_not_found() => Ok(false),
                    Err(e) => Err(format!("reading {location}/{MANIFEST}: {e}")),
                }
            })
            .await
            .map_err(|e| e.to_string())?
        })
    }

    fn dispose(
        &self,
        location: String,
        s3: Option<S3Config>,
    ) -> BoxFuture<'static, Result<usize, String>> {
        Box::pin(async move {
            tokio::task::spawn_blocking(move || {
                let store =
                    riffle_store::open(&location, s3.as_ref()).map_err(|e| e.to_string())?;
                let keys = store.list("").map_err(|e| e.to_string())?;
                // The manifest goes first: a half-deleted savepoint must not look complete.
                let (manifest, rest): (Vec<_>, Vec<_>) =
                    keys.into_iter().partition(|k| k == MANIFEST);
                let mut n = 0;
                for key in manifest.iter().chain(rest.iter()) {
                    store
                        .delete(key)
                        .map_err(|e| format!("deleting {location}/{key}: {e}"))?;
                    n += 1;
                }
                Ok(n)
            })
            .await
            .map_err(|e| e.to_string())?
        })
    }
}

#[derive(Clone, Debug)]
enum Tracked {
    Pending,
    Done(Result<String, String>),
}

/// Savepoint requests this operator process made, by (job UID, savepoint id).
#[derive(Clone, Default)]
pub struct Tracker {
    requests: Arc<Mutex<HashMap<(String, String), Tracked>>>,
}

impl Tracker {
    /// Ask `addr` for savepoint `id` in the background (once per id and process).
    pub fn request(
        &self,
        workers: &Arc<dyn WorkerApi>,
        job_uid: &str,
        addr: SocketAddr,
        id: &str,
        stop: bool,
    ) {
        let key = (job_uid.to_string(), id.to_string());
        {
            let mut requests = self.requests.lock().expect("tracker lock");
            if matches!(requests.get(&key), Some(Tracked::Pending)) {
                return;
            }
            requests.insert(key.clone(), Tracked::Pending);
        }
        let call = workers.savepoint(addr, id.to_string(), stop);
        let requests = self.requests.clone();
        tokio::spawn(async move {
            let result = call.await.map(|r| r.location);
            match &result {
                Ok(location) => {
                    tracing::info!(savepoint = %key.1, %location, "savepoint completed")
                }
                Err(e) => tracing::warn!(savepoint = %key.1, error = %e, "savepoint failed"),
            }
            requests
                .lock()
                .expect("tracker lock")
                .insert(key, Tracked::Done(result));
        });
    }

    /// Record a failure without a request (no worker to ask).
    pub fn fail(&self, job_uid: &str, id: &str, reason: String) {
        self.requests.lock().expect("tracker lock").insert(
            (job_uid.to_string(), id.to_string()),
            Tracked::Done(Err(reason)),
        );
    }

    /// What became of `id`: this process's request if it made one, else the store decides
    /// between Completed (the manifest is there) and NotRequested.
    pub async fn outcome(
        &self,
        store: &Arc<dyn SavepointStore>,
        job_uid: &str,
        id: &str,
        location: String,
        s3: Option<S3Config>,
    ) -> SavepointOutcome {
        let tracked = self
            .requests
            .lock()
            .expect("tracker lock")
            .get(&(job_uid.to_string(), id.to_string()))
            .cloned();
        match tracked {
            Some(Tracked::Pending) => SavepointOutcome::Pending,
            Some(Tracked::Done(Ok(location))) => SavepointOutcome::Completed(location),
            // The answer may have been lost after the savepoint completed (a connection cut
            // while the manifest was written): the store has the last word.
            Some(Tracked::Done(Err(e))) => match store.is_complete(location.clone(), s3).await {
                Ok(true) => SavepointOutcome::Completed(location),
                _ => SavepointOutcome::Failed(e),
            },
            None => match store.is_complete(location.clone(), s3).await {
                Ok(true) => SavepointOutcome::Completed(location),
                Ok(false) => SavepointOutcome::NotRequested,
                // Cannot tell: ask (again) under the same id; a running savepoint with that id
                // is joined, not repeated.
                Err(e) => {
                    tracing::warn!(savepoint = id, error = %e, "cannot check the savepoint store");
                    SavepointOutcome::NotRequested
                }
            },
        }
    }

    /// Forget answers the record no longer waits for.
    pub fn forget(&self, job_uid: &str, keep: &[&str]) {
        self.requests
            .lock()
            .expect("tracker lock")
            .retain(|(uid, id), t| {
                uid != job_uid || matches!(t, Tracked::Pending) || keep.contains(&id.as_str())
            });
    }

    /// Forget everything about a job (it is gone).
    pub fn forget_job(&self, job_uid: &str) {
        self.requests
            .lock()
            .expect("tracker lock")
            .retain(|(uid, _), _| uid != job_uid);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::workers::{SavepointReply, WorkerMetrics};

    /// A worker answering from a script.
    struct Scripted(Result<SavepointReply, String>);

    impl WorkerApi for Scripted {
        fn savepoint(
            &self,
            _: SocketAddr,
            _: String,
            _: bool,
        ) -> BoxFuture<'static, Result<SavepointReply, String>> {
            let r = self.0.clone();
            Box::pin(async move { r })
        }
        fn metrics(&self, _: SocketAddr) -> BoxFuture<'static, Result<WorkerMetrics, String>> {
            Box::pin(async { Ok(WorkerMetrics::default()) })
        }
    }

    struct Store(Result<bool, String>);

    impl SavepointStore for Store {
        fn is_complete(
            &self,
            _: String,
            _: Option<S3Config>,
        ) -> BoxFuture<'static, Result<bool, String>> {
            let r = self.0.clone();
            Box::pin(async move { r })
        }
        fn dispose(
            &self,
            _: String,
            _: Option<S3Config>,
        ) -> BoxFuture<'static, Result<usize, String>> {
            Box::pin(async { Ok(0) })
        }
    }

    async fn settle(t: &Tracker, store: &Arc<dyn SavepointStore>, id: &str) -> SavepointOutcome {
        for _ in 0..1000 {
            let o = t.outcome(store, "u", id, "s3://b/x".into(), None).await;
            if o != SavepointOutcome::Pending {
                return o;
            }
            tokio::task::yield_now().await;
        }
        panic!("the scripted request never finished");
    }

    #[tokio::test]
    async fn answers_of_this_process_win_over_the_store() {
        let addr: SocketAddr = "127.0.0.1:1".parse().unwrap();
        let store: Arc<dyn SavepointStore> = Arc::new(Store(Ok(false)));
        let ok: Arc<dyn WorkerApi> = Arc::new(Scripted(Ok(SavepointReply {
            id: "a".into(),
            location: "s3://b/sp/a".into(),
        })));
        let t = Tracker::default();
        t.request(&ok, "u", addr, "a", true);
        assert_eq!(
            settle(&t, &store, "a").await,
            SavepointOutcome::Completed("s3://b/sp/a".into())
        );
        let failing: Arc<dyn WorkerApi> = Arc::new(Scripted(Err("upload failed".into())));
        t.request(&failing, "u", addr, "b", true);
        assert_eq!(
            settle(&t, &store, "b").await,
            SavepointOutcome::Failed("upload failed".into())
        );
        t.forget("u", &["a"]);
        assert_eq!(
            settle(&t, &store, "b").await,
            SavepointOutcome::NotRequested,
            "a forgotten failure is unknown again"
        );
    }

    #[tokio::test]
    async fn after_a_restart_the_store_tells_completed_from_never_requested() {
        let t = Tracker::default();
        for (answer, want) in [
            (Ok(true), SavepointOutcome::Completed("s3://b/x".into())),
            (Ok(false), SavepointOutcome::NotRequested),
            (Err("503".to_string()), SavepointOutcome::NotRequested),
        ] {
            let store: Arc<dyn SavepointStore> = Arc::new(Store(answer));
            assert_eq!(
                t.outcome(&store, "u", "sp", "s3://b/x".into(), None).await,
                want
            );
        }
    }
}
