//! The reconciler's error paths, against a scripted API server.
//!
//! A real API server (the test bed's) cannot be made to answer 409 to one status write, 429 to
//! one list, 500 to the second of two pod applies, or to stall one read, on demand. Those are
//! the answers that decide whether the reconciler keeps its promises: nothing acts before the
//! record is persisted, a failed step resumes, an error never hangs a reconcile. So these
//! tests, and only these, call `reconcile` against an in-process HTTP server answering from a
//! script:
//!
//! - a rule is (method, path prefix) → answers; the newest matching rule wins, its answers are
//!   used in order and the last one repeats;
//! - an answer is a status code and a JSON body (a Kubernetes `Status` for errors, or the
//!   request body echoed back, as the API server does for applies and creates), optionally
//!   late;
//! - a request no rule matches is answered 500 "unscripted", so a new call cannot go unseen;
//! - every request is recorded (method, path, query, content type, body) for the assertions.
//!
//! The client is built with kube's own retry layer off (`default_retry = false`): in
//! production the client itself retries 429, 503 and 504 (up to 15 times, honouring
//! `Retry-After`) before the reconciler sees them; these tests script what gets past that
//! layer. The workers' HTTP API and the savepoint store are stand-ins answering Ok at once.

use std::collections::VecDeque;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use axum::body::Bytes;
use axum::extract::State;
use axum::http::{header, HeaderMap, Method, StatusCode, Uri};
use axum::response::{IntoResponse, Response};
use futures::future::BoxFuture;
use kube::runtime::controller::Action;
use kube::runtime::events::Reporter;
use kube::Client;
use riffle_config::{KafkaConfig, S3Config};
use riffle_operator::controller::{error_policy, reconcile, Context, FIELD_MANAGER, FINALIZER};
use riffle_operator::crd::StreamJob;
use riffle_operator::lag::{LagSource, Offsets};
use riffle_operator::metrics::Metrics;
use riffle_operator::savepoints::SavepointStore;
use riffle_operator::workers::{SavepointReply, WorkerApi, WorkerMetrics};
use serde_json::{json, Value};

const JOB: &str = "/apis/riffle.dev/v1alpha1/namespaces/ns/streamjobs/job";
const STATUS: &str = "/apis/riffle.dev/v1alpha1/namespaces/ns/streamjobs/job/status";
const SERVICE: &str = "/api/v1/namespaces/ns/services/job-workers";
const PODS: &str = "/api/v1/namespaces/ns/pods";
const CONFIG_MAPS: &str = "/api/v1/namespaces/ns/configmaps";
const EVENTS: &str = "/apis/events.k8s.io/v1/namespaces/ns/events";

fn pod(name: &str) -> String {
    format!("{PODS}/{name}")
}

// ---- the scripted API server ----

/// One scripted answer.
#[derive(Clone, Debug)]
struct Answer {
    code: u16,
    /// `None`: the request body, echoed.
    body: Option<Value>,
    delay: Duration,
}

impl Answer {
    fn json(code: u16, body: Value) -> Self {
        Self {
            code,
            body: Some(body),
            delay: Duration::ZERO,
        }
    }

    fn echo(code: u16) -> Self {
        Self {
            code,
            body: None,
            delay: Duration::ZERO,
        }
    }

    /// A Kubernetes `Status` failure, as the API server sends it.
    fn status(code: u16, reason: &str, message: &str) -> Self {
        Self::json(
            code,
            json!({
                "kind": "Status", "apiVersion": "v1", "metadata": {},
                "status": "Failure", "message": message, "reason": reason, "code": code,
            }),
        )
    }

    fn late(mut self, delay: Duration) -> Self {
        self.delay = delay;
        self
    }
}

/// A recorded request.
#[derive(Clone, Debug)]
struct Call {
    method: Method,
    path: String,
    query: String,
    content_type: String,
    body: Value,
}

impl Call {
    fn is(&self, method: Method, path: &str) -> bool {
        self.method == method && self.path == path
    }

    /// A request that carries out an action (applies a child, publishes an event).
    fn acts(&self) -> bool {
        (self.method == Method::PATCH
            && (self.path.starts_with(&format!("{PODS}/"))
                || self.path.starts_with(&format!("{CONFIG_MAPS}/"))))
            || self.path.starts_with(EVENTS)
    }
}

struct Rule {
    method: Method,
    prefix: String,
    answers: VecDeque<Answer>,
}

#[derive(Default)]
struct Script {
    rules: Vec<Rule>,
    calls: Vec<Call>,
}

impl Script {
    fn answer(&mut self, method: &Method, path: &str) -> Option<Answer> {
        let rule = self
            .rules
            .iter_mut()
            .rev()
            .find(|r| r.method == method && path.starts_with(&r.prefix))?;
        if rule.answers.len() > 1 {
            rule.answers.pop_front()
        } else {
            rule.answers.front().cloned()
        }
    }
}

struct ApiServer {
    addr: SocketAddr,
    script: Arc<Mutex<Script>>,
}

impl ApiServer {
    async fn start() -> Self {
        let script = Arc::new(Mutex::new(Script::default()));
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let app = axum::Router::new()
            .fallback(serve)
            .with_state(script.clone());
        tokio::spawn(async move { axum::serve(listener, app).await.unwrap() });
        Self { addr, script }
    }

    /// Every call of a reconcile answered as the API server would for a new job.
    async fn happy(sj: &StreamJob) -> Self {
        let server = Self::start().await;
        server
            .on(Method::GET, JOB, [Answer::json(200, to_json(sj))])
            .on(Method::PATCH, SERVICE, [Answer::echo(200)])
            .on(Method::GET, PODS, [Answer::json(200, pod_list(vec![]))])
            .on(Method::PUT, STATUS, [Answer::echo(200)])
            // A new generation's ConfigMap does not exist yet (it is created once).
            .on(
                Method::GET,
                CONFIG_MAPS,
                [Answer::status(404, "NotFound", "configmaps not found")],
            )
            .on(Method::PATCH, CONFIG_MAPS, [Answer::echo(200)])
            .on(Method::PATCH, PODS, [Answer::echo(200)])
            .on(Method::POST, EVENTS, [Answer::echo(201)])
            .on(Method::PATCH, EVENTS, [Answer::echo(200)]);
        server
    }

    /// Answer requests of `method` under `prefix` with `answers` (in order, the last repeats);
    /// overrides older rules.
    fn on(&self, method: Method, prefix: &str, answers: impl IntoIterator<Item = Answer>) -> &Self {
        let answers: VecDeque<Answer> = answers.into_iter().collect();
        assert!(!answers.is_empty(), "a rule needs an answer");
        self.script.lock().unwrap().rules.push(Rule {
            method,
            prefix: prefix.into(),
            answers,
        });
        self
    }

    fn calls(&self) -> Vec<Call> {
        self.script.lock().unwrap().calls.clone()
    }

    fn client(&self) -> Client {
        let _ = rustls::crypto::ring::default_provider().install_default();
        let mut config = kube::Config::new(format!("http://{}", self.addr).parse().unwrap());
        config.default_namespace = "ns".into();
        config.connect_timeout = Some(Duration::from_secs(2));
        config.read_timeout = Some(Duration::from_secs(2));
        // The read timeout counts from the request, not from when a pooled connection idled.
        config.reset_reader_on_write = true;
        config.default_retry = false;
        Client::try_from(config).unwrap()
    }
}

async fn serve(
    State(script): State<Arc<Mutex<Script>>>,
    method: Method,
    uri: Uri,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    let body = if body.is_empty() {
        Value::Null
    } else {
        serde_json::from_slice(&body)
            .unwrap_or_else(|_| Value::String(String::from_utf8_lossy(&body).into_owned()))
    };
    let call = Call {
        method: method.clone(),
        path: uri.path().into(),
        query: uri.query().unwrap_or_default().into(),
        content_type: headers
            .get(header::CONTENT_TYPE)
            .and_then(|v| v.to_str().ok())
            .unwrap_or_default()
            .into(),
        body: body.clone(),
    };
    let answer = {
        let mut script = script.lock().unwrap();
        script.calls.push(call);
        script.answer(&method, uri.path())
    }
    .unwrap_or_else(|| Answer::status(500, "InternalError", "unscripted request"));
    tokio::time::sleep(answer.delay).await;
    let status = StatusCode::from_u16(answer.code).unwrap();
    let body = answer.body.unwrap_or(body);
    (
        status,
        [(header::CONTENT_TYPE, "application/json")],
        body.to_string(),
    )
        .into_response()
}

// ---- the rest of the context: workers and savepoint store that answer Ok at once ----

struct Idle;

impl WorkerApi for Idle {
    fn savepoint(
        &self,
        _: SocketAddr,
        id: String,
        _: bool,
    ) -> BoxFuture<'static, Result<SavepointReply, String>> {
        Box::pin(async move {
            Ok(SavepointReply {
                location: format!("s3://riffle/jobs/recs/savepoints/{id}"),
                id,
            })
        })
    }

    fn metrics(&self, _: SocketAddr) -> BoxFuture<'static, Result<WorkerMetrics, String>> {
        Box::pin(async { Ok(WorkerMetrics::default()) })
    }
}

impl LagSource for Idle {
    fn offsets(
        &self,
        _: &KafkaConfig,
        _: &str,
        _: &[String],
    ) -> BoxFuture<'static, Result<Offsets, String>> {
        Box::pin(async { Err("no Kafka in this test".into()) })
    }
}

impl SavepointStore for Idle {
    fn is_complete(
        &self,
        _: String,
        _: Option<S3Config>,
    ) -> BoxFuture<'static, Result<bool, String>> {
        Box::pin(async { Ok(false) })
    }

    fn dispose(&self, _: String, _: Option<S3Config>) -> BoxFuture<'static, Result<usize, String>> {
        Box::pin(async { Ok(0) })
    }
}

fn context(server: &ApiServer) -> Arc<Context> {
    Arc::new(Context::new(
        server.client(),
        Reporter {
            controller: "test".into(),
            instance: None,
        },
        Arc::new(Idle),
        Arc::new(Idle),
        Arc::new(Metrics::default()),
        Arc::new(Idle),
    ))
}

// ---- objects ----

/// The example StreamJob as stored: `ns/job`, resourceVersion 1, with or without the
/// operator's finalizer.
fn job(finalized: bool) -> StreamJob {
    let mut sj: StreamJob = serde_yaml::from_str(include_str!("../../examples/streamjob.yaml"))
        .expect("the example parses");
    sj.metadata.name = Some("job".into());
    sj.metadata.namespace = Some("ns".into());
    sj.metadata.uid = Some("0d3f6a52-7c1e-4b8a-9f27-5e6d4c3b2a10".into());
    sj.metadata.resource_version = Some("1".into());
    sj.metadata.generation = Some(1);
    if finalized {
        sj.metadata.finalizers = Some(vec![FINALIZER.into()]);
    }
    sj
}

fn to_json(sj: &StreamJob) -> Value {
    serde_json::to_value(sj).unwrap()
}

fn pod_list(items: Vec<Value>) -> Value {
    json!({"apiVersion": "v1", "kind": "PodList", "metadata": {"resourceVersion": "7"}, "items": items})
}

/// A worker pod as the API server lists it (created, not ready).
fn worker(name: &str, generation: u32, workers: u32) -> Value {
    json!({
        "apiVersion": "v1", "kind": "Pod",
        "metadata": {
            "name": name, "namespace": "ns", "resourceVersion": "5",
            "labels": {"riffle.dev/job": "job", "riffle.dev/generation": generation.to_string()},
            "annotations": {"riffle.dev/workers": workers.to_string()},
        },
        "spec": {"containers": [{"name": "worker", "image": "riffle-runtime:dev"}]},
        "status": {"phase": "Pending"},
    })
}

fn lines(calls: &[Call]) -> Vec<String> {
    calls
        .iter()
        .map(|c| format!("{} {}", c.method, c.path))
        .collect()
}

// ---- the cases ----

#[tokio::test]
async fn a_new_job_is_recorded_before_anything_is_started() {
    let sj = job(true);
    let server = ApiServer::happy(&sj).await;
    let ctx = context(&server);

    let action = reconcile(Arc::new(sj), ctx).await.expect("reconcile");
    assert_eq!(action, Action::requeue(Duration::from_secs(2)));

    let calls = server.calls();
    assert_eq!(
        lines(&calls[..3]),
        [
            format!("GET {JOB}"),
            format!("PATCH {SERVICE}"),
            format!("GET {PODS}")
        ],
        "fresh read, service, pods: {:#?}",
        lines(&calls)
    );
    assert!(
        calls[1].query.contains("fieldManager=riffle-operator")
            && calls[1].query.contains("force=true"),
        "{}",
        calls[1].query
    );
    assert!(
        calls[2]
            .query
            .contains("labelSelector=riffle.dev%2Fjob%3Djob"),
        "{}",
        calls[2].query
    );

    let puts: Vec<usize> = (0..calls.len())
        .filter(|&i| calls[i].is(Method::PUT, STATUS))
        .collect();
    assert_eq!(puts.len(), 1, "one status write: {:#?}", lines(&calls));
    let put = &calls[puts[0]];
    assert_eq!(put.body["metadata"]["resourceVersion"], "1", "optimistic");
    assert_eq!(put.body["status"]["lifecycle"]["deployed"]["generation"], 1);
    assert_eq!(put.body["status"]["phase"], "Pending");
    assert!(put.query.contains(&format!("fieldManager={FIELD_MANAGER}")));

    // Everything after the write acts, and nothing acts before it.
    let first_action = calls.iter().position(Call::acts).expect("actions");
    assert!(
        first_action > puts[0],
        "acted before the record was persisted: {:#?}",
        lines(&calls)
    );
    let pods: Vec<&Call> = calls
        .iter()
        .filter(|c| c.method == Method::PATCH && c.path.starts_with(&format!("{PODS}/")))
        .collect();
    assert_eq!(
        pods.iter().map(|c| c.path.as_str()).collect::<Vec<_>>(),
        [pod("job-g1-w0"), pod("job-g1-w1")]
    );
    for p in &pods {
        assert!(
            p.query.contains("fieldManager=riffle-operator") && p.query.contains("force=true"),
            "{}",
            p.query
        );
        assert_eq!(p.content_type, "application/apply-patch+yaml");
        assert_eq!(p.body["metadata"]["labels"]["riffle.dev/generation"], "1");
    }
    assert!(calls
        .iter()
        .any(|c| c.is(Method::PATCH, &format!("{CONFIG_MAPS}/job-g1"))));
    let event = calls
        .iter()
        .find(|c| c.is(Method::POST, EVENTS))
        .expect("an event");
    assert_eq!(event.body["reason"], "Starting");
}

#[tokio::test]
async fn a_conflict_on_the_status_write_acts_on_nothing_and_retries_soon() {
    let sj = job(true);
    let server = ApiServer::happy(&sj).await;
    server.on(
        Method::PUT,
        STATUS,
        [Answer::status(
            409,
            "Conflict",
            "Operation cannot be fulfilled on streamjobs.riffle.dev \"job\": the object has been \
             modified; please apply your changes to the latest version and try again",
        )],
    );
    let ctx = context(&server);
    let sj = Arc::new(sj);

    let err = reconcile(sj.clone(), ctx.clone()).await.unwrap_err();
    assert_eq!(err.api_code(), Some(409), "{err}");
    let calls = server.calls();
    assert!(
        calls.iter().any(|c| c.is(Method::PUT, STATUS)),
        "{:#?}",
        lines(&calls)
    );
    assert!(
        !calls.iter().any(Call::acts),
        "acted although the record was not persisted: {:#?}",
        lines(&calls)
    );
    assert_eq!(
        error_policy(sj, &err, ctx.clone()),
        Action::requeue(Duration::from_millis(500))
    );
    assert!(ctx
        .metrics
        .render()
        .contains("riffle_operator_reconcile_failures_total 1\n"));
}

#[tokio::test]
async fn throttling_on_the_pod_list_stops_before_the_record_and_backs_off() {
    let sj = job(true);
    let server = ApiServer::happy(&sj).await;
    server.on(
        Method::GET,
        PODS,
        [Answer::status(
            429,
            "TooManyRequests",
            "Too many requests, please try again later.",
        )],
    );
    let ctx = context(&server);
    let sj = Arc::new(sj);

    let err = reconcile(sj.clone(), ctx.clone()).await.unwrap_err();
    assert_eq!(err.api_code(), Some(429), "{err}");
    assert_eq!(
        lines(&server.calls()),
        [
            format!("GET {JOB}"),
            format!("PATCH {SERVICE}"),
            format!("GET {PODS}")
        ],
        "no status write, no action"
    );
    assert_eq!(
        error_policy(sj, &err, ctx),
        Action::requeue(Duration::from_secs(5))
    );
}

#[tokio::test]
async fn a_failed_service_apply_stops_the_reconcile() {
    let sj = job(true);
    let server = ApiServer::happy(&sj).await;
    server.on(
        Method::PATCH,
        SERVICE,
        [Answer::status(
            500,
            "InternalError",
            "Internal error occurred: resource quota evaluation timed out",
        )],
    );
    let ctx = context(&server);
    let sj = Arc::new(sj);

    let err = reconcile(sj.clone(), ctx.clone()).await.unwrap_err();
    assert_eq!(err.api_code(), Some(500), "{err}");
    assert_eq!(
        lines(&server.calls()),
        [format!("GET {JOB}"), format!("PATCH {SERVICE}")]
    );
    assert_eq!(
        error_policy(sj, &err, ctx),
        Action::requeue(Duration::from_secs(3))
    );
}

/// What the reconcile after a failed pod apply does: the first reconcile records generation 1
/// and applies w0, then the API server fails w1 with 500; the second reads the persisted
/// record (resourceVersion 2) and sees w0 in the pod list.
async fn resume_after_a_failed_pod_apply() -> (Vec<Call>, Result<Action, riffle_operator::Error>) {
    let sj = job(true);
    let server = ApiServer::happy(&sj).await;
    server.on(
        Method::PATCH,
        &pod("job-g1-w1"),
        [Answer::status(
            500,
            "InternalError",
            "etcdserver: request timed out",
        )],
    );
    let ctx = context(&server);

    let err = reconcile(Arc::new(sj), ctx.clone()).await.unwrap_err();
    assert_eq!(err.api_code(), Some(500), "{err}");
    let calls = server.calls();
    let put = calls
        .iter()
        .find(|c| c.is(Method::PUT, STATUS))
        .expect("the record was written before acting");
    assert!(calls.iter().any(|c| c.is(Method::PATCH, &pod("job-g1-w0"))));

    let mut persisted: StreamJob = serde_json::from_value(put.body.clone()).unwrap();
    persisted.metadata.resource_version = Some("2".into());
    server
        .on(Method::GET, JOB, [Answer::json(200, to_json(&persisted))])
        .on(
            Method::GET,
            PODS,
            [Answer::json(200, pod_list(vec![worker("job-g1-w0", 1, 2)]))],
        )
        .on(Method::PATCH, &pod("job-g1-w1"), [Answer::echo(200)]);
    let before = calls.len();
    let result = reconcile(Arc::new(persisted), ctx).await;
    (server.calls().split_off(before), result)
}

#[tokio::test]
async fn after_a_failed_pod_apply_the_next_reconcile_continues_the_same_generation() {
    let (calls, result) = resume_after_a_failed_pod_apply().await;
    result.expect("second reconcile");
    assert!(
        !calls.iter().any(|c| c.is(Method::PATCH, &pod("job-g1-w0"))),
        "an existing pod was applied again: {:#?}",
        lines(&calls)
    );
    assert!(
        !calls.iter().any(|c| c.path.contains("job-g2")),
        "a new generation was started: {:#?}",
        lines(&calls)
    );
    if let Some(put) = calls.iter().find(|c| c.is(Method::PUT, STATUS)) {
        assert_eq!(put.body["metadata"]["resourceVersion"], "2");
        assert_eq!(put.body["status"]["lifecycle"]["deployed"]["generation"], 1);
        assert_eq!(put.body["status"]["lifecycle"]["maxGeneration"], 1);
    }
}

/// A generation left with 1 of its 2 pods (the apply failed half-way) is completed by the
/// next reconcile: `decide` re-issues `StartGeneration` while a generation has fewer pods than
/// its worker count, and `act` skips the pods that exist.
#[tokio::test]
async fn after_a_failed_pod_apply_the_next_reconcile_applies_the_missing_pod() {
    let (calls, result) = resume_after_a_failed_pod_apply().await;
    result.expect("second reconcile");
    let pods: Vec<&str> = calls
        .iter()
        .filter(|c| c.method == Method::PATCH && c.path.starts_with(&format!("{PODS}/")))
        .map(|c| c.path.as_str())
        .collect();
    assert_eq!(pods, [pod("job-g1-w1")], "{:#?}", lines(&calls));
}

#[tokio::test]
async fn an_api_server_that_does_not_answer_fails_the_reconcile_instead_of_hanging_it() {
    let sj = job(true);
    let server = ApiServer::happy(&sj).await;
    server.on(
        Method::GET,
        JOB,
        [Answer::json(200, to_json(&sj)).late(Duration::from_secs(6))],
    );
    let ctx = context(&server);
    let sj = Arc::new(sj);

    let started = Instant::now();
    let result = tokio::time::timeout(Duration::from_secs(10), reconcile(sj.clone(), ctx.clone()))
        .await
        .expect("the reconcile hung");
    let err = result.unwrap_err();
    assert!(
        started.elapsed() < Duration::from_secs(5),
        "gave up only after {:?}, not at the 2 s read timeout",
        started.elapsed()
    );
    assert_eq!(err.api_code(), None, "{err}");
    assert_eq!(lines(&server.calls()), [format!("GET {JOB}")]);
    assert_eq!(
        error_policy(sj, &err, ctx),
        Action::requeue(Duration::from_secs(3))
    );
}

#[tokio::test]
async fn a_job_gone_since_the_cache_saw_it_is_left_alone() {
    let sj = job(true);
    let server = ApiServer::happy(&sj).await;
    server.on(
        Method::GET,
        JOB,
        [Answer::status(
            404,
            "NotFound",
            "streamjobs.riffle.dev \"job\" not found",
        )],
    );
    let ctx = context(&server);

    let action = reconcile(Arc::new(sj), ctx).await.expect("reconcile");
    assert_eq!(action, Action::await_change());
    assert_eq!(lines(&server.calls()), [format!("GET {JOB}")]);
}

#[tokio::test]
async fn the_finalizer_comes_first_and_a_conflict_adding_it_is_a_409() {
    let sj = job(false);
    let server = ApiServer::happy(&sj).await;
    server.on(
        Method::PATCH,
        JOB,
        [Answer::status(
            409,
            "Conflict",
            "the object has been modified",
        )],
    );
    let ctx = context(&server);

    let err = reconcile(Arc::new(sj), ctx).await.unwrap_err();
    assert_eq!(err.api_code(), Some(409), "{err}");
    let calls = server.calls();
    assert_eq!(
        lines(&calls),
        [format!("PATCH {JOB}")],
        "nothing but the finalizer"
    );
    assert_eq!(calls[0].content_type, "application/json-patch+json");
    assert_eq!(
        calls[0].body,
        json!([
            {"op": "test", "path": "/metadata/finalizers", "value": null},
            {"op": "add", "path": "/metadata/finalizers", "value": [FINALIZER]},
        ])
    );
}

#[tokio::test]
async fn once_the_finalizer_is_added_the_reconcile_waits_for_that_change() {
    let sj = job(false);
    let server = ApiServer::happy(&sj).await;
    server.on(Method::PATCH, JOB, [Answer::json(200, to_json(&job(true)))]);
    let ctx = context(&server);

    let action = reconcile(Arc::new(sj), ctx).await.expect("reconcile");
    assert_eq!(action, Action::await_change());
    assert_eq!(lines(&server.calls()), [format!("PATCH {JOB}")]);
}
