//! `riffle-node-agent`: a small kubelet for the test bed (see `e2e/README.md`).

use std::path::PathBuf;

use anyhow::Context as _;
use clap::{Parser, Subcommand};
use riffle_e2e::node_agent::{self, AgentConfig};
use tokio::signal::unix::{signal, SignalKind};

#[derive(Parser, Debug)]
#[command(
    name = "riffle-node-agent",
    about = "Runs pods bound to a Node as local processes"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand, Debug)]
enum Command {
    /// Register the node and run its pods until SIGINT/SIGTERM.
    Run {
        /// Node name to register.
        #[arg(long, default_value = "riffle-node")]
        node_name: String,
        /// Image mapping file (YAML: `images: {"<glob>": /path/to/binary}`).
        #[arg(long)]
        image_map: PathBuf,
        /// State directory [default: $HOME/.cache/riffle/testbed].
        #[arg(long)]
        state_dir: Option<PathBuf>,
        /// Kubeconfig (admin credentials) [default: $KUBECONFIG, then ~/.kube/config].
        #[arg(long)]
        kubeconfig: Option<PathBuf>,
        /// The node's IP, reported as InternalIP and as the pods' hostIP.
        #[arg(long, default_value = "127.0.0.1")]
        host_ip: String,
        /// Delete the Node and its Lease on shutdown.
        #[arg(long)]
        delete_node_on_exit: bool,
    },
    /// Print the log of a pod's container.
    Logs {
        /// `<namespace>/<pod>`.
        pod: String,
        /// Container name (optional when the pod has one container).
        container: Option<String>,
        /// State directory [default: $HOME/.cache/riffle/testbed].
        #[arg(long)]
        state_dir: Option<PathBuf>,
    },
}

async fn shutdown_signal() {
    let (Ok(mut int), Ok(mut term)) = (
        signal(SignalKind::interrupt()),
        signal(SignalKind::terminate()),
    ) else {
        tracing::error!("cannot install signal handlers");
        return std::future::pending().await;
    };
    tokio::select! {
        _ = int.recv() => tracing::info!("SIGINT received"),
        _ = term.recv() => tracing::info!("SIGTERM received"),
    }
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    match cli.command {
        Command::Run {
            node_name,
            image_map,
            state_dir,
            kubeconfig,
            host_ip,
            delete_node_on_exit,
        } => {
            tracing_subscriber::fmt()
                .with_env_filter(
                    tracing_subscriber::EnvFilter::try_from_default_env()
                        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info")),
                )
                .init();
            let config = AgentConfig {
                node_name,
                state_dir: state_dir.unwrap_or_else(node_agent::default_state_dir),
                image_map,
                kubeconfig,
                host_ip,
                delete_node_on_exit,
            };
            node_agent::run(config, shutdown_signal())
                .await
                .context("node agent failed")
        }
        Command::Logs {
            pod,
            container,
            state_dir,
        } => {
            let (namespace, name) = pod
                .split_once('/')
                .context("the pod must be given as <namespace>/<pod>")?;
            let state_dir = state_dir.unwrap_or_else(node_agent::default_state_dir);
            let text = node_agent::read_logs(&state_dir, namespace, name, container.as_deref())?;
            print!("{text}");
            Ok(())
        }
    }
}
