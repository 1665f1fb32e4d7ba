//! `riffle-operator`: reconciles `StreamJob` resources (riffle.dev/v1alpha1) into worker pods.
//! Runs as one or more replicas; only the holder of the leader Lease reconciles.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context as _;
use clap::Parser;
use kube::runtime::events::Reporter;
use kube::Client;
use riffle_operator::controller::{self, Context};
use riffle_operator::lag::KafkaLag;
use riffle_operator::leader::{Elector, Timing};
use riffle_operator::metrics::Metrics;
use riffle_operator::savepoints::ObjectStoreSavepoints;
use riffle_operator::workers::HttpWorkers;

mod check;

#[derive(Parser)]
#[command(
    name = "riffle-operator",
    version,
    about = "Reconciles Riffle StreamJobs into worker pods"
)]
struct Args {
    /// Without a subcommand the operator runs.
    #[command(subcommand)]
    command: Option<Command>,
    /// Watch only these namespaces, comma-separated (default: all namespaces).
    #[arg(
        long = "namespace",
        env = "RIFFLE_WATCH_NAMESPACE",
        value_delimiter = ','
    )]
    namespaces: Vec<String>,
    /// Address of `/metrics` and `/healthz` (default: port 8080 on $POD_IP, else 127.0.0.1).
    #[arg(long)]
    metrics_listen: Option<SocketAddr>,
    /// Run without leader election (a single replica).
    #[arg(long)]
    no_leader_election: bool,
    /// The Lease that elects the leader.
    #[arg(long, default_value = "riffle-operator")]
    lease_name: String,
    /// The Lease's namespace (default: $POD_NAMESPACE, else `default`).
    #[arg(long)]
    lease_namespace: Option<String>,
    /// This replica's identity in the Lease (default: $POD_NAME, else host name and PID).
    #[arg(long)]
    identity: Option<String>,
    #[arg(long, default_value = "15", value_name = "SECONDS")]
    lease_duration: u64,
    #[arg(long, default_value = "10", value_name = "SECONDS")]
    renew_deadline: u64,
    #[arg(long, default_value = "2", value_name = "SECONDS")]
    retry_period: u64,
}

#[derive(clap::Subcommand)]
enum Command {
    /// Check a running installation: a Ready replica, exactly one leader, the CRD served
    /// (the Helm chart's `helm test`).
    Check(check::CheckArgs),
}

/// The namespaces to watch; none means all.
fn watched(list: &[String]) -> Vec<String> {
    list.iter()
        .map(|n| n.trim().to_string())
        .filter(|n| !n.is_empty())
        .collect()
}

fn env(name: &str) -> Option<String> {
    std::env::var(name).ok().filter(|v| !v.is_empty())
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| "info,kube=warn".into()),
        )
        .init();
    // kube's TLS and the S3 client both use rustls with ring; make it the process default.
    let _ = rustls::crypto::ring::default_provider().install_default();
    let args = Args::parse();
    if let Some(Command::Check(check)) = args.command {
        return check::run(check).await;
    }
    let identity = args
        .identity
        .clone()
        .or_else(|| env("POD_NAME"))
        .unwrap_or_else(|| {
            let host = env("HOSTNAME").unwrap_or_else(|| "riffle-operator".into());
            format!("{host}-{}", std::process::id())
        });

    let client = Client::try_default()
        .await
        .context("connecting to the API server")?;
    let metrics = Arc::new(Metrics::default());
    let listen = args.metrics_listen.unwrap_or_else(|| {
        let ip = env("POD_IP")
            .and_then(|ip| ip.parse().ok())
            .unwrap_or([127, 0, 0, 1].into());
        SocketAddr::new(ip, 8080)
    });
    let listener = tokio::net::TcpListener::bind(listen)
        .await
        .with_context(|| format!("binding the metrics endpoint {listen}"))?;
    tracing::info!(addr = %listener.local_addr()?, "metrics listening");
    let served = metrics.clone();
    let router = axum::Router::new()
        .route("/healthz", axum::routing::get(|| async { "ok\n" }))
        .route(
            "/metrics",
            axum::routing::get(move || {
                let m = served.clone();
                async move { m.render() }
            }),
        );
    tokio::spawn(async move {
        if let Err(e) = axum::serve(listener, router).await {
            tracing::error!(error = %e, "metrics endpoint stopped");
        }
    });

    let ctx = Arc::new(Context::new(
        client.clone(),
        Reporter {
            controller: "riffle-operator".into(),
            instance: Some(identity.clone()),
        },
        Arc::new(HttpWorkers::default()),
        Arc::new(ObjectStoreSavepoints),
        metrics.clone(),
        Arc::new(KafkaLag),
    ));
    let shutdown = async {
        let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
            .expect("SIGTERM handler");
        tokio::select! {
            _ = tokio::signal::ctrl_c() => {}
            _ = term.recv() => {}
        }
    };

    if args.no_leader_election {
        metrics.set_leader(true);
        controller::run(ctx, watched(&args.namespaces), shutdown).await;
        return Ok(());
    }
    let lease_ns = args
        .lease_namespace
        .clone()
        .or_else(|| env("POD_NAMESPACE"))
        .unwrap_or_else(|| "default".into());
    let elector = Elector::new(
        client,
        &lease_ns,
        &args.lease_name,
        &identity,
        Timing {
            lease_duration: Duration::from_secs(args.lease_duration),
            renew_deadline: Duration::from_secs(args.renew_deadline),
            retry_period: Duration::from_secs(args.retry_period),
        },
    );
    tracing::info!(identity = %elector.identity(), lease = %args.lease_name, namespace = %lease_ns, "waiting for the leader lease");
    let (stop_tx, stop_rx) = tokio::sync::oneshot::channel::<()>();
    let mut stop_tx = Some(stop_tx);
    tokio::select! {
        _ = elector.acquire() => {}
        _ = shutdown => return Ok(()),
    }
    metrics.set_leader(true);
    let run = controller::run(ctx, watched(&args.namespaces), async move {
        let _ = stop_rx.await;
    });
    tokio::pin!(run);
    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())?;
    tokio::select! {
        () = &mut run => {}
        lost = elector.hold() => {
            // Another replica may already act: stop at once, write nothing more.
            tracing::error!(error = %lost, "lost leadership; exiting");
            std::process::exit(1);
        }
        _ = tokio::signal::ctrl_c() => {}
        _ = term.recv() => {}
    }
    if let Some(tx) = stop_tx.take() {
        let _ = tx.send(());
        let _ = tokio::time::timeout(Duration::from_secs(10), run).await;
    }
    elector.release().await;
    metrics.set_leader(false);
    Ok(())
}
