//! The operator's edge to running workers: their HTTP API at the pod IP (there is no Service
//! routing on the test bed, and real clusters reach pods the same way).

use std::net::SocketAddr;
use std::time::Duration;

use futures::future::BoxFuture;
use http_body_util::{BodyExt, Full};
use hyper::body::Bytes;
use hyper_util::client::legacy::Client;
use hyper_util::rt::TokioExecutor;
use serde::Deserialize;

/// A completed savepoint, as the worker reports it.
#[derive(Clone, Debug, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct SavepointReply {
    pub id: String,
    pub location: String,
}

/// What the operator reads from a worker's `GET /status`.
#[derive(Clone, Debug, Default, PartialEq, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct WorkerMetrics {
    #[serde(default)]
    pub ready: bool,
    #[serde(default)]
    pub lag: i64,
    #[serde(default)]
    pub watermark: Option<i64>,
    #[serde(default)]
    pub events_per_second: f64,
    #[serde(default)]
    pub last_checkpoint_id: u64,
    #[serde(default)]
    pub stopped: bool,
    /// Input records handled since the worker started.
    #[serde(default)]
    pub events_in: u64,
    /// Seconds spent handling records since the worker started.
    #[serde(default)]
    pub busy_seconds: f64,
}

/// Talks to one worker. A trait so the controller's savepoint bookkeeping can be tested
/// without pods.
pub trait WorkerApi: Send + Sync {
    /// `POST /savepoint`; resolves when the job-wide savepoint is complete (or failed).
    fn savepoint(
        &self,
        addr: SocketAddr,
        id: String,
        stop: bool,
    ) -> BoxFuture<'static, Result<SavepointReply, String>>;
    /// `GET /status` → its `metrics`.
    fn metrics(&self, addr: SocketAddr) -> BoxFuture<'static, Result<WorkerMetrics, String>>;
}

/// The HTTP implementation.
#[derive(Clone)]
pub struct HttpWorkers {
    client: Client<hyper_util::client::legacy::connect::HttpConnector, Full<Bytes>>,
}

impl Default for HttpWorkers {
    fn default() -> Self {
        let mut connector = hyper_util::client::legacy::connect::HttpConnector::new();
        connector.set_connect_timeout(Some(Duration::from_secs(3)));
        Self {
            client: Client::builder(TokioExecutor::new()).build(connector),
        }
    }
}

/// A savepoint answer waits for every worker's barrier and upload (the worker gives up after
/// 300 s); a status answer is immediate.
const SAVEPOINT_TIMEOUT: Duration = Duration::from_secs(330);
const STATUS_TIMEOUT: Duration = Duration::from_secs(3);

impl HttpWorkers {
    fn call(
        &self,
        method: hyper::Method,
        addr: SocketAddr,
        path: &'static str,
        body: Vec<u8>,
        timeout: Duration,
    ) -> BoxFuture<'static, Result<(u16, Bytes), String>> {
        let client = self.client.clone();
        Box::pin(async move {
            let req = hyper::Request::builder()
                .method(method)
                .uri(format!("http://{addr}{path}"))
                .header("content-type", "application/json")
                .body(Full::new(Bytes::from(body)))
                .map_err(|e| e.to_string())?;
            let call = async {
                let resp = client.request(req).await.map_err(|e| format!("{e:?}"))?;
                let code = resp.status().as_u16();
                let body = resp
                    .into_body()
                    .collect()
                    .await
                    .map_err(|e| e.to_string())?
                    .to_bytes();
                Ok::<_, String>((code, body))
            };
            tokio::time::timeout(timeout, call)
                .await
                .map_err(|_| format!("no answer from {addr}{path} within {timeout:?}"))?
        })
    }
}

impl WorkerApi for HttpWorkers {
    fn savepoint(
        &self,
        addr: SocketAddr,
        id: String,
        stop: bool,
    ) -> BoxFuture<'static, Result<SavepointReply, String>> {
        let body = serde_json::json!({ "id": id, "stop": stop }).to_string();
        let call = self.call(
            hyper::Method::POST,
            addr,
            "/savepoint",
            body.into_bytes(),
            SAVEPOINT_TIMEOUT,
        );
        Box::pin(async move {
            let (code, body) = call.await?;
            if code != 200 {
                let error = serde_json::from_slice::<serde_json::Value>(&body)
                    .ok()
                    .and_then(|v| v.get("error")?.as_str().map(str::to_string))
                    .unwrap_or_else(|| String::from_utf8_lossy(&body).into_owned());
                return Err(format!("worker {addr} answered {code}: {error}"));
            }
            serde_json::from_slice(&body).map_err(|e| format!("savepoint answer: {e}"))
        })
    }

    fn metrics(&self, addr: SocketAddr) -> BoxFuture<'static, Result<WorkerMetrics, String>> {
        let call = self.call(
            hyper::Method::GET,
            addr,
            "/status",
            Vec::new(),
            STATUS_TIMEOUT,
        );
        Box::pin(async move {
            let (code, body) = call.await?;
            if code != 200 {
                return Err(format!("GET /status: {code}"));
            }
            #[derive(Deserialize)]
            struct Status {
                metrics: WorkerMetrics,
            }
            serde_json::from_slice::<Status>(&body)
                .map(|s| s.metrics)
                .map_err(|e| format!("/status: {e}"))
        })
    }
}
