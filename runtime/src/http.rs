//! The worker's HTTP API: what probes, Prometheus and (later) the operator call.
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

use crate::engine::Control;
use crate::metrics::Metrics;

#[derive(Clone)]
struct Api {
    job: String,
    metrics: Arc<Metrics>,
    control: Sender<Control>,
}

pub fn router(job: String, metrics: Arc<Metrics>, control: Sender<Control>) -> Router {
    Router::new()
        .route("/healthz", get(|| async { "ok\n" }))
        .route("/readyz", get(readyz))
        .route("/metrics", get(prometheus))
        .route("/status", get(status))
        .route("/savepoint", post(savepoint))
        .with_state(Api {
            job,
            metrics,
            control,
        })
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

async fn savepoint(State(api): State<Api>) -> Response {
    if api
        .metrics
        .finished
        .load(std::sync::atomic::Ordering::Relaxed)
    {
        return (
            StatusCode::CONFLICT,
            Json(json!({"error": "job already finished"})),
        )
            .into_response();
    }
    let (tx, rx) = crossbeam_channel::bounded(1);
    if api.control.send(Control::Savepoint(tx)).is_err() {
        return (
            StatusCode::SERVICE_UNAVAILABLE,
            Json(json!({"error": "engine stopped"})),
        )
            .into_response();
    }
    // The engine answers at its next batch boundary.
    let answer =
        tokio::task::spawn_blocking(move || rx.recv_timeout(Duration::from_secs(120))).await;
    match answer {
        Ok(Ok(Ok(info))) => (StatusCode::OK, Json(json!(info))).into_response(),
        Ok(Ok(Err(e))) => {
            (StatusCode::INTERNAL_SERVER_ERROR, Json(json!({"error": e}))).into_response()
        }
        _ => (
            StatusCode::GATEWAY_TIMEOUT,
            Json(json!({"error": "no answer from the engine"})),
        )
            .into_response(),
    }
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
