//! Readiness/liveness probes: configuration, result tracking (pure) and the checks themselves.

use std::net::IpAddr;
use std::time::Duration;

use k8s_openapi::api::core::v1::{Container, Probe};
use k8s_openapi::apimachinery::pkg::util::intstr::IntOrString;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::time::Instant;

/// What a probe checks.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ProbeAction {
    /// `httpGet`: a 2xx/3xx answer is a success.
    Http {
        /// Port on the pod IP.
        port: u16,
        /// Request path.
        path: String,
        /// `Host` header value (defaults to the pod IP).
        host: Option<String>,
        /// Extra headers.
        headers: Vec<(String, String)>,
    },
    /// `tcpSocket`: a successful connect is a success.
    Tcp {
        /// Port on the pod IP.
        port: u16,
    },
    /// `exec`: exit code 0 is a success (the command runs on the host with the container env).
    Exec {
        /// The command line.
        command: Vec<String>,
    },
    /// A probe the agent cannot run (e.g. gRPC, HTTPS): always fails, with this message.
    Unsupported(String),
}

/// A probe's configuration with the API defaults applied.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ProbeSpec {
    /// The check.
    pub action: ProbeAction,
    /// `initialDelaySeconds` (default 0).
    pub initial_delay: Duration,
    /// `periodSeconds` (default 10).
    pub period: Duration,
    /// `timeoutSeconds` (default 1).
    pub timeout: Duration,
    /// `failureThreshold` (default 3).
    pub failure_threshold: u32,
    /// `successThreshold` (default 1).
    pub success_threshold: u32,
}

fn seconds(value: Option<i32>, default: u64, min: u64) -> Duration {
    Duration::from_secs(
        value
            .map_or(default, |v| u64::try_from(v).unwrap_or(0))
            .max(min),
    )
}

fn threshold(value: Option<i32>, default: u32) -> u32 {
    value
        .map_or(default, |v| u32::try_from(v).unwrap_or(1))
        .max(1)
}

fn resolve_port(port: &IntOrString, container: &Container) -> Option<u16> {
    match port {
        IntOrString::Int(p) => u16::try_from(*p).ok(),
        IntOrString::String(name) => name.parse().ok().or_else(|| {
            container
                .ports
                .iter()
                .flatten()
                .find(|p| p.name.as_deref() == Some(name))
                .and_then(|p| u16::try_from(p.container_port).ok())
        }),
    }
}

impl ProbeSpec {
    /// Converts an API probe of `container`.
    pub fn from_api(probe: &Probe, container: &Container) -> Self {
        let action = if let Some(http) = &probe.http_get {
            let scheme = http.scheme.as_deref().unwrap_or("HTTP");
            match resolve_port(&http.port, container) {
                Some(port) if scheme.eq_ignore_ascii_case("http") => ProbeAction::Http {
                    port,
                    path: http.path.clone().unwrap_or_else(|| "/".to_owned()),
                    host: http.host.clone().filter(|h| !h.is_empty()),
                    headers: http
                        .http_headers
                        .iter()
                        .flatten()
                        .map(|h| (h.name.clone(), h.value.clone()))
                        .collect(),
                },
                Some(_) => {
                    ProbeAction::Unsupported(format!("httpGet scheme {scheme} is not supported"))
                }
                None => {
                    ProbeAction::Unsupported(format!("cannot resolve probe port {:?}", http.port))
                }
            }
        } else if let Some(tcp) = &probe.tcp_socket {
            match resolve_port(&tcp.port, container) {
                Some(port) => ProbeAction::Tcp { port },
                None => {
                    ProbeAction::Unsupported(format!("cannot resolve probe port {:?}", tcp.port))
                }
            }
        } else if let Some(exec) = &probe.exec {
            ProbeAction::Exec {
                command: exec.command.clone().unwrap_or_default(),
            }
        } else {
            ProbeAction::Unsupported("only httpGet, tcpSocket and exec probes are supported".into())
        };
        Self {
            action,
            initial_delay: seconds(probe.initial_delay_seconds, 0, 0),
            period: seconds(probe.period_seconds, 10, 1),
            timeout: seconds(probe.timeout_seconds, 1, 1),
            failure_threshold: threshold(probe.failure_threshold, 3),
            success_threshold: threshold(probe.success_threshold, 1),
        }
    }
}

/// Tracks consecutive results of one probe for one container run and decides its verdict.
#[derive(Debug, Clone)]
pub struct ProbeTracker {
    spec: ProbeSpec,
    successes: u32,
    failures: u32,
    healthy: bool,
    next_due: Instant,
    in_flight: bool,
}

impl ProbeTracker {
    /// A tracker for a container started at `started`; `initially_healthy` is false for
    /// readiness (not ready until proven) and true for liveness.
    pub fn new(spec: ProbeSpec, started: Instant, initially_healthy: bool) -> Self {
        Self {
            next_due: started + spec.initial_delay,
            spec,
            successes: 0,
            failures: 0,
            healthy: initially_healthy,
            in_flight: false,
        }
    }

    /// The probe configuration.
    pub fn spec(&self) -> &ProbeSpec {
        &self.spec
    }

    /// Current verdict.
    pub fn healthy(&self) -> bool {
        self.healthy
    }

    /// Whether a probe should be started now; if so it is marked in flight until
    /// [`ProbeTracker::record`] is called.
    pub fn start_if_due(&mut self, now: Instant) -> bool {
        if self.in_flight || now < self.next_due {
            return false;
        }
        self.in_flight = true;
        self.next_due = now + self.spec.period;
        true
    }

    /// Records a result; returns the verdict if it changed.
    pub fn record(&mut self, success: bool) -> Option<bool> {
        self.in_flight = false;
        if success {
            self.failures = 0;
            self.successes = self.successes.saturating_add(1);
            if !self.healthy && self.successes >= self.spec.success_threshold {
                self.healthy = true;
                return Some(true);
            }
        } else {
            self.successes = 0;
            self.failures = self.failures.saturating_add(1);
            if self.healthy && self.failures >= self.spec.failure_threshold {
                self.healthy = false;
                return Some(false);
            }
        }
        None
    }
}

/// Runs an HTTP GET against `ip:port` and returns `Ok(status)` or an error message.
pub async fn http_get(
    ip: IpAddr,
    port: u16,
    path: &str,
    host: Option<&str>,
    headers: &[(String, String)],
) -> Result<u16, String> {
    let mut stream = TcpStream::connect((ip, port))
        .await
        .map_err(|e| format!("connect {ip}:{port}: {e}"))?;
    let host = host.map_or_else(|| format!("{ip}:{port}"), str::to_owned);
    let mut request = format!(
        "GET {path} HTTP/1.1\r\nHost: {host}\r\nUser-Agent: riffle-node-agent/probe\r\nAccept: */*\r\nConnection: close\r\n"
    );
    for (name, value) in headers {
        request.push_str(&format!("{name}: {value}\r\n"));
    }
    request.push_str("\r\n");
    stream
        .write_all(request.as_bytes())
        .await
        .map_err(|e| format!("write: {e}"))?;
    // Read only the status line.
    let mut buf = Vec::with_capacity(256);
    let mut chunk = [0u8; 256];
    while !buf.contains(&b'\n') && buf.len() < 4096 {
        let n = stream
            .read(&mut chunk)
            .await
            .map_err(|e| format!("read: {e}"))?;
        if n == 0 {
            break;
        }
        buf.extend_from_slice(&chunk[..n]);
    }
    parse_status_line(&buf).ok_or_else(|| "malformed HTTP response".to_owned())
}

/// Extracts the status code of an HTTP/1.x response.
pub fn parse_status_line(response: &[u8]) -> Option<u16> {
    let text = std::str::from_utf8(response.split(|&b| b == b'\n').next()?).ok()?;
    let mut parts = text.split_whitespace();
    parts.next().filter(|v| v.starts_with("HTTP/"))?;
    parts.next()?.parse().ok()
}

/// Runs a probe action once (bounded by the probe timeout); `Ok(())` on success.
pub async fn run_probe(
    spec: &ProbeSpec,
    ip: IpAddr,
    env: &[(String, String)],
) -> Result<(), String> {
    let check = async {
        match &spec.action {
            ProbeAction::Http {
                port,
                path,
                host,
                headers,
            } => {
                let code = http_get(ip, *port, path, host.as_deref(), headers).await?;
                if (200..400).contains(&code) {
                    Ok(())
                } else {
                    Err(format!("HTTP probe failed with statuscode: {code}"))
                }
            }
            ProbeAction::Tcp { port } => TcpStream::connect((ip, *port))
                .await
                .map(drop)
                .map_err(|e| format!("dial tcp {ip}:{port}: {e}")),
            ProbeAction::Exec { command } => {
                let (program, args) = command.split_first().ok_or("empty exec probe command")?;
                let status = tokio::process::Command::new(program)
                    .args(args)
                    .env_clear()
                    .envs(env.iter().map(|(k, v)| (k, v)))
                    .stdin(std::process::Stdio::null())
                    .stdout(std::process::Stdio::null())
                    .stderr(std::process::Stdio::null())
                    .kill_on_drop(true)
                    .status()
                    .await
                    .map_err(|e| format!("exec {program}: {e}"))?;
                if status.success() {
                    Ok(())
                } else {
                    Err(format!("exec probe exited with {status}"))
                }
            }
            ProbeAction::Unsupported(message) => Err(message.clone()),
        }
    };
    match tokio::time::timeout(spec.timeout, check).await {
        Ok(result) => result,
        Err(_) => Err(format!("probe timed out after {:?}", spec.timeout)),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use k8s_openapi::api::core::v1::{ContainerPort, HTTPGetAction};

    fn spec(failure: u32, success: u32) -> ProbeSpec {
        ProbeSpec {
            action: ProbeAction::Tcp { port: 1 },
            initial_delay: Duration::from_secs(5),
            period: Duration::from_secs(2),
            timeout: Duration::from_secs(1),
            failure_threshold: failure,
            success_threshold: success,
        }
    }

    #[test]
    fn defaults_and_named_ports() {
        let container = Container {
            name: "c".into(),
            ports: Some(vec![ContainerPort {
                name: Some("http".into()),
                container_port: 8080,
                ..Default::default()
            }]),
            ..Default::default()
        };
        let probe = Probe {
            http_get: Some(HTTPGetAction {
                port: IntOrString::String("http".into()),
                path: Some("/healthz".into()),
                ..Default::default()
            }),
            ..Default::default()
        };
        let s = ProbeSpec::from_api(&probe, &container);
        assert_eq!(s.period, Duration::from_secs(10));
        assert_eq!(s.timeout, Duration::from_secs(1));
        assert_eq!((s.failure_threshold, s.success_threshold), (3, 1));
        assert!(
            matches!(s.action, ProbeAction::Http { port: 8080, ref path, .. } if path == "/healthz")
        );
        let grpc = ProbeSpec::from_api(&Probe::default(), &container);
        assert!(matches!(grpc.action, ProbeAction::Unsupported(_)));
    }

    #[test]
    fn tracker_thresholds_and_schedule() {
        let t0 = Instant::now();
        let mut liveness = ProbeTracker::new(spec(2, 1), t0, true);
        assert!(!liveness.start_if_due(t0 + Duration::from_secs(4)));
        assert!(liveness.start_if_due(t0 + Duration::from_secs(5)));
        assert!(
            !liveness.start_if_due(t0 + Duration::from_secs(6)),
            "in flight"
        );
        assert_eq!(liveness.record(false), None);
        assert!(
            !liveness.start_if_due(t0 + Duration::from_secs(6)),
            "period not elapsed"
        );
        assert!(liveness.start_if_due(t0 + Duration::from_secs(7)));
        assert_eq!(liveness.record(false), Some(false));
        assert!(!liveness.healthy());

        let mut readiness = ProbeTracker::new(spec(3, 2), t0, false);
        assert_eq!(readiness.record(true), None);
        assert_eq!(readiness.record(true), Some(true));
        assert_eq!(readiness.record(false), None);
        assert_eq!(readiness.record(true), None);
        assert_eq!(readiness.record(false), None);
        assert_eq!(readiness.record(false), None);
        assert_eq!(readiness.record(false), Some(false));
    }

    #[test]
    fn status_line() {
        assert_eq!(parse_status_line(b"HTTP/1.1 204 No Content\r\n"), Some(204));
        assert_eq!(parse_status_line(b"HTTP/1.0 500\r\n"), Some(500));
        assert_eq!(parse_status_line(b"garbage"), None);
    }

    #[tokio::test]
    async fn http_probe_against_a_local_server() {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = listener.local_addr().unwrap().port();
        tokio::spawn(async move {
            for code in [200, 503] {
                let (mut s, _) = listener.accept().await.unwrap();
                let mut buf = [0u8; 1024];
                let _ = s.read(&mut buf).await.unwrap();
                let reply = format!("HTTP/1.1 {code} X\r\nContent-Length: 0\r\n\r\n");
                s.write_all(reply.as_bytes()).await.unwrap();
            }
        });
        let ip: IpAddr = "127.0.0.1".parse().unwrap();
        let spec = ProbeSpec {
            action: ProbeAction::Http {
                port,
                path: "/healthz".into(),
                host: None,
                headers: vec![],
            },
            ..spec(1, 1)
        };
        assert_eq!(run_probe(&spec, ip, &[]).await, Ok(()));
        assert!(run_probe(&spec, ip, &[]).await.unwrap_err().contains("503"));
    }
}
