//! The worker's HTTP API: what probes, Prometheus, the operator and `riffle savepoint` call.
//! `GET /healthz`, `GET /readyz`, `GET /metrics`, `GET /status`, `POST /savepoint`.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use axum::extract::State;
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use crossbeam_channel::Sender;
use serde_json::json;

use crate::distributed::WorkerControl;
use crate::engine::Control;
use crate::metrics::Metrics;

/// Where savepoint requests go: the local engine or a distributed worker.
#[derive(Clone)]
pub enum ControlSender {
    Local(Sender<Control>),
    Worker(Sender<WorkerControl>),
}

#[derive(Clone)]
struct Api {
    job: String,
    metrics: Arc<Metrics>,
    control: ControlSender,
}

pub fn router(job: String, metrics: Arc<Metrics>, control: impl Into<ControlSender>) -> Router {
    Router::new()
        .route("/healthz", get(|| async { "ok\n" }))
        .route("/readyz", get(readyz))
        .route("/metrics", get(prometheus))
        .route("/status", get(status))
        .route("/savepoint", post(savepoint))
        .with_state(Api {
            job,
            metrics,
            control: control.into(),
        })
}

impl From<Sender<Control>> for ControlSender {
    fn from(s: Sender<Control>) -> Self {
        Self::Local(s)
    }
}

impl From<Sender<WorkerControl>> for ControlSender {
    fn from(s: Sender<WorkerControl>) -> Self {
        Self::Worker(s)
    }
}

async fn readyz(State(api): State<Api>) -> Response {
    if api.metrics.ready.load(std::sync::atomic::Ordering::Relaxed) {
        "ready\n".into_response()
    } else {
        (StatusCode::SERVICE_UNAVAILABLE, "restoring\n").into_response()
    }
}

async fn prometheus(State(api): State<Api>) -> Response {
    (
        [("content-type", "text/plain; version=0.0.4")],
        api.metrics.render_prometheus(),
    )
        .into_response()
}

async fn status(State(api): State<Api>) -> Json<serde_json::Value> {
    Json(json!({ "job": api.job, "metrics": api.metrics.snapshot() }))
}

/// `POST /savepoint` with an optional JSON body `{"id": "...", "stop": true}`.
#[derive(Debug, Default, serde::Deserialize)]
#[serde(deny_unknown_fields)]
struct SavepointRequest {
    #[serde(default)]
    id: Option<String>,
    #[serde(default)]
    stop: bool,
}

async fn savepoint(State(api): State<Api>, body: axum::body::Bytes) -> Response {
    let err = |code: StatusCode, e: String| (code, Json(json!({ "error": e }))).into_response();
    let req: SavepointRequest = if body.iter().all(u8::is_ascii_whitespace) {
        SavepointRequest::default()
    } else {
        match serde_json::from_slice(&body) {
            Ok(r) => r,
            Err(e) => return err(StatusCode::BAD_REQUEST, format!("request body: {e}")),
        }
    };
    let m = &api.metrics;
    // A stopped distributed worker still answers a repeat of the savepoint that stopped it.
    let worker = matches!(api.control, ControlSender::Worker(_));
    if m.finished.load(std::sync::atomic::Ordering::Relaxed)
        || (m.stopped.load(std::sync::atomic::Ordering::Relaxed) && !worker)
    {
        return err(
            StatusCode::CONFLICT,
            "job already finished or stopped".into(),
        );
    }
    let (tx, rx) = crossbeam_channel::bounded(1);
    let sent = match &api.control {
        ControlSender::Local(c) => {
            let (ltx, lrx) = crossbeam_channel::bounded(1);
            let ok = c
                .send(Control::Savepoint {
                    stop: req.stop,
                    reply: ltx,
                })
                .is_ok();
            std::thread::spawn(move || {
                if let Ok(r) = lrx.recv() {
                    let _ = tx.send(r.map(|i| json!(i)));
                }
            });
            ok
        }
        ControlSender::Worker(c) => {
            let (wtx, wrx) = crossbeam_channel::bounded(1);
            let ok = c
                .send(WorkerControl::Savepoint {
                    id: req.id,
                    stop: req.stop,
                    reply: wtx,
                })
                .is_ok();
            std::thread::spawn(move || {
                if let Ok(r) = wrx.recv() {
                    let _ = tx.send(r.map(|i| json!(i)));
                }
            });
            ok
        }
    };
    if !sent {
        return err(StatusCode::SERVICE_UNAVAILABLE, "engine stopped".into());
    }
    // The engine answers at its next batch boundary; a distributed savepoint waits for every
    // worker's barrier and part.
    let answer =
        tokio::task::spawn_blocking(move || rx.recv_timeout(Duration::from_secs(300))).await;
    match answer {
        Ok(Ok(Ok(info))) => (StatusCode::OK, Json(info)).into_response(),
        Ok(Ok(Err(e))) => err(StatusCode::INTERNAL_SERVER_ERROR, e),
        _ => err(
            StatusCode::GATEWAY_TIMEOUT,
            "no answer from the engine".into(),
        ),
    }
}

/// The address to bind: `listen`, or `port` on `$POD_IP` (the downward API: on a cluster, and
/// on the test bed where every pod has its own loopback address), or on 127.0.0.1.
pub fn listen_addr(cfg: &crate::config::HttpConfig) -> crate::Result<SocketAddr> {
    if let Some(addr) = cfg.listen {
        return Ok(addr);
    }
    let port = cfg.port.unwrap_or(0);
    let ip = match std::env::var("POD_IP") {
        Ok(ip) if !ip.is_empty() => ip
            .parse()
            .map_err(|_| crate::Error::Config(format!("POD_IP {ip:?} is not an IP address")))?,
        _ => std::net::IpAddr::from([127, 0, 0, 1]),
    };
    Ok(SocketAddr::new(ip, port))
}

/// Serve the API on a background thread with its own small runtime; returns the bound address.
pub fn spawn(listen: SocketAddr, router: Router) -> std::io::Result<SocketAddr> {
    let listener = std::net::TcpListener::bind(listen)?;
    listener.set_nonblocking(true)?;
    let addr = listener.local_addr()?;
    std::thread::Builder::new()
        .name("riffle-http".into())
        .spawn(move || {
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .expect("tokio runtime");
            rt.block_on(async move {
                let listener = tokio::net::TcpListener::from_std(listener).expect("listener");
                if let Err(e) = axum::serve(listener, router).await {
                    tracing::error!(error = %e, "HTTP API stopped");
                }
            });
        })?;
    Ok(addr)
}
