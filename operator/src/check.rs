//! `riffle-operator check`: is an installation working? Used by the Helm chart's `helm test`.
//!
//! Passes when, in the operator's namespace, at least one operator pod (by label selector) is
//! Ready, every Ready one serves `/metrics`, exactly one of them reports
//! `riffle_operator_leader 1`, and StreamJobs can be listed there (the CRD is served). A fresh
//! install needs a moment to elect its leader, so failures are retried until `--timeout`.
//! Needs only `list` on pods and on streamjobs in that namespace.

use std::net::{IpAddr, SocketAddr};
use std::time::{Duration, Instant};

use anyhow::{bail, Context as _};
use http_body_util::{BodyExt, Empty};
use hyper::body::Bytes;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::client::legacy::Client as HttpClient;
use hyper_util::rt::TokioExecutor;
use k8s_openapi::api::core::v1::Pod;
use kube::api::{ApiResource, DynamicObject, ListParams};
use kube::{Api, Client, ResourceExt};
use riffle_operator::crd::StreamJob;

/// The gauge each replica exports: 1 on the leader, 0 on a standby.
const LEADER_METRIC: &str = "riffle_operator_leader";
/// Bound of one `/metrics` request.
const HTTP_TIMEOUT: Duration = Duration::from_secs(3);
/// Time between attempts while the check fails.
const RETRY_EVERY: Duration = Duration::from_secs(1);

#[derive(clap::Args)]
pub struct CheckArgs {
    /// Label selector of the operator's pods, e.g.
    /// `app.kubernetes.io/instance=riffle,app.kubernetes.io/component=operator`.
    #[arg(long)]
    selector: String,
    /// Namespace of the operator's pods.
    #[arg(long, env = "POD_NAMESPACE")]
    namespace_of_operator: String,
    /// Port of the replicas' metrics endpoint.
    #[arg(long, default_value = "8080")]
    metrics_port: u16,
    /// Keep retrying a failing check for this long.
    #[arg(long, default_value = "60", value_name = "SECONDS")]
    timeout: u64,
}

/// Runs the check; an error says what failed last.
pub async fn run(args: CheckArgs) -> anyhow::Result<()> {
    let client = Client::try_default()
        .await
        .context("connecting to the API server")?;
    let mut connector = HttpConnector::new();
    connector.set_connect_timeout(Some(HTTP_TIMEOUT));
    let http = HttpClient::builder(TokioExecutor::new()).build(connector);
    let deadline = Instant::now() + Duration::from_secs(args.timeout);
    loop {
        match attempt(&client, &http, &args).await {
            Ok(report) => {
                for line in report {
                    println!("ok: {line}");
                }
                println!("check passed");
                return Ok(());
            }
            Err(e) if Instant::now() >= deadline => {
                bail!("check failed (retried for {} s): {e:#}", args.timeout)
            }
            Err(e) => {
                println!("not yet: {e:#}");
                tokio::time::sleep(RETRY_EVERY).await;
            }
        }
    }
}

type Http = HttpClient<HttpConnector, Empty<Bytes>>;

/// One pass over everything; the lines say what was checked.
async fn attempt(client: &Client, http: &Http, args: &CheckArgs) -> anyhow::Result<Vec<String>> {
    let ns = &args.namespace_of_operator;
    let mut report = Vec::new();
    let pods = Api::<Pod>::namespaced(client.clone(), ns)
        .list(&ListParams::default().labels(&args.selector))
        .await
        .with_context(|| format!("listing pods {:?} in {ns}", args.selector))?
        .items;
    let ready: Vec<&Pod> = pods.iter().filter(|p| is_ready(p)).collect();
    if ready.is_empty() {
        bail!(
            "none of the {} operator pods matching {:?} in {ns} is Ready",
            pods.len(),
            args.selector
        );
    }
    report.push(format!(
        "{} of {} operator pods Ready in {ns} ({:?}): {}",
        ready.len(),
        pods.len(),
        args.selector,
        names(&ready)
    ));

    let mut leaders = Vec::new();
    for pod in &ready {
        let ip: IpAddr = pod
            .status
            .as_ref()
            .and_then(|s| s.pod_ip.as_deref())
            .and_then(|ip| ip.parse().ok())
            .with_context(|| format!("pod {} is Ready but has no pod IP", pod.name_any()))?;
        let addr = SocketAddr::new(ip, args.metrics_port);
        let text = get_metrics(http, addr)
            .await
            .with_context(|| format!("GET http://{addr}/metrics of pod {}", pod.name_any()))?;
        let leader = leader_gauge(&text)
            .with_context(|| format!("pod {} exports no {LEADER_METRIC} gauge", pod.name_any()))?;
        report.push(format!(
            "pod {} serves /metrics at {addr}: {LEADER_METRIC} {}",
            pod.name_any(),
            u8::from(leader)
        ));
        if leader {
            leaders.push(*pod);
        }
    }
    match leaders.len() {
        1 => report.push(format!("exactly one leader: {}", leaders[0].name_any())),
        0 => bail!("no Ready replica is the leader ({LEADER_METRIC} 0 on all)"),
        n => bail!("{n} replicas report being the leader: {}", names(&leaders)),
    }

    // Through the resource's own API: the CRD is installed, established and served here.
    let ar = ApiResource::erase::<StreamJob>(&());
    let jobs = Api::<DynamicObject>::namespaced_with(client.clone(), ns, &ar)
        .list(&ListParams::default().limit(50))
        .await
        .with_context(|| format!("listing {} in {ns}", ar.plural))?;
    report.push(format!(
        "{}.{}/{} served: {} listed in {ns}",
        ar.plural,
        ar.group,
        ar.version,
        jobs.items.len()
    ));
    Ok(report)
}

fn is_ready(pod: &Pod) -> bool {
    pod.metadata.deletion_timestamp.is_none()
        && pod
            .status
            .as_ref()
            .and_then(|s| s.conditions.as_ref())
            .is_some_and(|cs| cs.iter().any(|c| c.type_ == "Ready" && c.status == "True"))
}

fn names(pods: &[&Pod]) -> String {
    pods.iter()
        .map(|p| p.name_any())
        .collect::<Vec<_>>()
        .join(", ")
}

async fn get_metrics(http: &Http, addr: SocketAddr) -> anyhow::Result<String> {
    let req = hyper::Request::get(format!("http://{addr}/metrics")).body(Empty::new())?;
    let call = async {
        let resp = http.request(req).await?;
        let status = resp.status();
        let body = resp.into_body().collect().await?.to_bytes();
        if !status.is_success() {
            bail!("answered {status}");
        }
        Ok(String::from_utf8_lossy(&body).into_owned())
    };
    tokio::time::timeout(HTTP_TIMEOUT, call)
        .await
        .map_err(|_| anyhow::anyhow!("no answer within {HTTP_TIMEOUT:?}"))?
}

/// The leader gauge's value in a text exposition (`None` if it is not there).
fn leader_gauge(text: &str) -> Option<bool> {
    text.lines()
        .filter(|l| !l.starts_with('#'))
        .find_map(|l| {
            let mut parts = l.split_whitespace();
            (parts.next()? == LEADER_METRIC).then(|| parts.next())?
        })
        .and_then(|v| v.parse::<f64>().ok())
        .map(|v| v == 1.0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_the_leader_gauge_and_not_its_neighbours() {
        let m = riffle_operator::metrics::Metrics::default();
        assert_eq!(leader_gauge(&m.render()), Some(false));
        m.set_leader(true);
        assert_eq!(leader_gauge(&m.render()), Some(true));
        // The transitions counter shares the prefix; it must not be taken for the gauge.
        assert_eq!(
            leader_gauge("riffle_operator_leader_transitions_total 1\n"),
            None
        );
        assert_eq!(leader_gauge("riffle_operator_leader 0\n"), Some(false));
    }
}
