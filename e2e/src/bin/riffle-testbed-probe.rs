//! `riffle-testbed-probe`: a tiny workload for node agent tests.
//!
//! * `serve [--port N]`: HTTP on `$POD_IP:$PORT` (default 127.0.0.1:8080); `/healthz` and
//!   `/` answer 200, `/unhealthy` answers 500, anything else 404. Exits 0 on SIGTERM.
//! * `exit CODE`: prints a line and exits with `CODE`.
//! * `kube-can VERB RESOURCE [NAME]`: tries the request with `$KUBECONFIG` in the pod's
//!   namespace; prints the HTTP status; exits 0 on success, 3 on 403, 1 otherwise.

use std::net::IpAddr;

use anyhow::Context as _;
use clap::{Parser, Subcommand};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpListener;
use tokio::signal::unix::{signal, SignalKind};

#[derive(Parser, Debug)]
#[command(name = "riffle-testbed-probe")]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand, Debug)]
enum Command {
    /// Serve HTTP on $POD_IP.
    Serve {
        /// Port [default: $PORT, then 8080].
        #[arg(long)]
        port: Option<u16>,
    },
    /// Exit with the given code.
    Exit {
        /// Exit code.
        code: i32,
    },
    /// Check an API permission with the pod's credentials.
    KubeCan {
        /// `list` or `get`.
        verb: String,
        /// Resource (plural), e.g. `secrets`, `configmaps`, `pods`, `deployments.apps`.
        resource: String,
        /// Object name (for `get`).
        name: Option<String>,
        /// Namespace [default: $POD_NAMESPACE, then the kubeconfig's namespace].
        #[arg(long)]
        namespace: Option<String>,
    },
}

async fn serve(port: Option<u16>) -> anyhow::Result<()> {
    let ip: IpAddr = std::env::var("POD_IP")
        .unwrap_or_else(|_| "127.0.0.1".to_owned())
        .parse()
        .context("POD_IP is not an IP address")?;
    let port = match port {
        Some(p) => p,
        None => std::env::var("PORT")
            .ok()
            .and_then(|p| p.parse().ok())
            .unwrap_or(8080),
    };
    let listener = TcpListener::bind((ip, port))
        .await
        .with_context(|| format!("bind {ip}:{port}"))?;
    println!("riffle-testbed-probe listening on {ip}:{port}");
    let mut term = signal(SignalKind::terminate())?;
    loop {
        tokio::select! {
            _ = term.recv() => {
                println!("riffle-testbed-probe: SIGTERM, exiting");
                return Ok(());
            }
            accepted = listener.accept() => {
                let (mut stream, peer) = accepted?;
                tokio::spawn(async move {
                    let mut buf = vec![0u8; 4096];
                    let n = stream.read(&mut buf).await.unwrap_or(0);
                    let request = String::from_utf8_lossy(&buf[..n]);
                    let path = request.split_whitespace().nth(1).unwrap_or("/").to_owned();
                    let (code, body) = match path.as_str() {
                        "/" | "/healthz" => (200, "ok"),
                        "/unhealthy" => (500, "unhealthy"),
                        _ => (404, "not found"),
                    };
                    println!("request from {peer}: GET {path} -> {code}");
                    let reply = format!(
                        "HTTP/1.1 {code} X\r\nContent-Type: text/plain\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
                        body.len()
                    );
                    let _ = stream.write_all(reply.as_bytes()).await;
                });
            }
        }
    }
}

fn resource_path(resource: &str, namespace: &str, name: Option<&str>) -> String {
    let (plural, group) = resource.split_once('.').unwrap_or((resource, ""));
    let prefix = match group {
        "" => "/api/v1".to_owned(),
        "apps" | "batch" | "rbac.authorization.k8s.io" | "coordination.k8s.io" => {
            format!("/apis/{group}/v1")
        }
        other => format!("/apis/{other}/v1"),
    };
    let mut path = format!("{prefix}/namespaces/{namespace}/{plural}");
    if let Some(name) = name {
        path.push('/');
        path.push_str(name);
    }
    path
}

async fn kube_can(
    verb: &str,
    resource: &str,
    name: Option<&str>,
    namespace: Option<String>,
) -> anyhow::Result<i32> {
    riffle_e2e::install_crypto_provider();
    let client = kube::Client::try_default()
        .await
        .context("building a client from KUBECONFIG")?;
    let namespace = namespace
        .or_else(|| std::env::var("POD_NAMESPACE").ok())
        .unwrap_or_else(|| client.default_namespace().to_owned());
    let path = match verb {
        "list" => resource_path(resource, &namespace, None),
        "get" => resource_path(
            resource,
            &namespace,
            Some(name.context("get needs a NAME")?),
        ),
        other => anyhow::bail!("unsupported verb {other:?} (list, get)"),
    };
    let request = http::Request::get(&path).body(Vec::new())?;
    match client.request_text(request).await {
        Ok(_) => {
            println!("kube-can {verb} {resource} in {namespace}: HTTP 200");
            Ok(0)
        }
        Err(kube::Error::Api(status)) => {
            println!(
                "kube-can {verb} {resource} in {namespace}: HTTP {} {}",
                status.code, status.message
            );
            Ok(if status.code == 403 { 3 } else { 1 })
        }
        Err(e) => {
            println!("kube-can {verb} {resource} in {namespace}: error {e}");
            Ok(1)
        }
    }
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    match cli.command {
        Command::Serve { port } => serve(port).await,
        Command::Exit { code } => {
            println!("riffle-testbed-probe: exiting with {code}");
            std::process::exit(code);
        }
        Command::KubeCan {
            verb,
            resource,
            name,
            namespace,
        } => {
            let code = kube_can(&verb, &resource, name.as_deref(), namespace).await?;
            std::process::exit(code);
        }
    }
}
