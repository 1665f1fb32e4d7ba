//! The Helm chart `charts/riffle-operator` against the test bed's real API server.
//!
//! - `the_chart_lints_and_renders_what_each_setting_asks_for`: `helm lint --strict`, and
//!   `helm template` with several value sets, the rendered objects read back as YAML: the
//!   `restricted` security contexts, the exact RBAC verbs (and never Secrets), the
//!   cluster-wide vs per-namespace switch, the ServiceMonitor and CRD toggles, the schema
//!   refusing bad values, and the chart's CRD copy matching `crds/streamjob.yaml`.
//! - `the_chart_installs_under_restricted_psa_and_uninstalls_cleanly`: `helm install` into a
//!   namespace enforcing the `restricted` Pod Security Standard, both replicas Ready, one
//!   leader (Lease and metrics), its own ServiceAccount, RBAC proven both by
//!   SubjectAccessReview and with the operator pod's own token (a Secret GET is 403; a real
//!   reconcile of a StreamJob works), `helm test`, and `helm uninstall` leaving no object of
//!   the release behind.
//!
//! Needs the test bed (`eval "$(e2e/testbed/testbed env)"`: `$HELM`, `$KUBECONFIG`) and the
//! workspace's binaries (`cargo build --workspace --bins`).

use std::collections::{BTreeMap, BTreeSet};
use std::fmt::Debug;
use std::hash::Hash;
use std::path::{Path, PathBuf};
use std::process::Output;
use std::time::Instant;

use k8s_openapi::api::apps::v1::{Deployment, ReplicaSet};
use k8s_openapi::api::authentication::v1::SelfSubjectReview;
use k8s_openapi::api::authorization::v1::SubjectAccessReview;
use k8s_openapi::api::coordination::v1::Lease;
use k8s_openapi::api::core::v1::{
    ConfigMap, Endpoints, Namespace, Pod, Secret, Service, ServiceAccount,
};
use k8s_openapi::api::discovery::v1::EndpointSlice;
use k8s_openapi::api::events::v1::Event as KubeEvent;
use k8s_openapi::api::policy::v1::PodDisruptionBudget;
use k8s_openapi::api::rbac::v1::{ClusterRole, ClusterRoleBinding, Role, RoleBinding};
use k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition;
use kube::api::{
    ApiResource, DeleteParams, DynamicObject, ListParams, Patch, PatchParams, PostParams,
};
use kube::config::{KubeConfigOptions, Kubeconfig};
use kube::{Api, Client, CustomResourceExt, Resource, ResourceExt};
use riffle_e2e::node_agent::layout::PodDir;
use riffle_e2e::testbed::{install_crd, NOT_RUNNING};
use riffle_e2e::testenv::{pod_ready, state_dir, TestEnv};
use riffle_operator::crd::StreamJob;
use serde::de::DeserializeOwned;
use serde::Deserialize as _;
use serde_json::json;
use serde_yaml::Value;

const RELEASE: &str = "rop";
/// `<release>-<chart>`: the Deployment, ServiceAccount, Lease and Role names.
const FULLNAME: &str = "rop-riffle-operator";
/// The operator replicas' label selector (the test pod is another component).
const OPERATOR_PODS: &str = "app.kubernetes.io/instance=rop,app.kubernetes.io/component=operator";
const RELEASE_LABEL: &str = "app.kubernetes.io/instance=rop";
/// The test bed's helm is built without Helm's Kubernetes-version ldflags, so offline
/// (`template`, `lint`) it would assume v1.20 and refuse the chart's `kubeVersion`; this is
/// the test bed's API server version.
const KUBE_VERSION: &str = "1.34.4";

fn chart() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../charts/riffle-operator")
}

fn repo_file(path: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("..").join(path)
}

fn helm_bin() -> PathBuf {
    std::env::var_os("HELM")
        .map(PathBuf::from)
        .filter(|p| p.is_file())
        .unwrap_or_else(|| {
            panic!("HELM is not set: {NOT_RUNNING}, then eval \"$(e2e/testbed/testbed env)\"")
        })
}

fn text(out: &Output) -> String {
    format!(
        "exit {:?}\n--- stdout ---\n{}\n--- stderr ---\n{}",
        out.status.code(),
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    )
}

/// `helm template` with `--set` pairs: the rendered objects, or helm's error text.
fn try_render(sets: &[&str]) -> Result<Vec<Value>, String> {
    let mut cmd = std::process::Command::new(helm_bin());
    cmd.args(["template", RELEASE]).arg(chart()).args([
        "--namespace",
        "rel",
        "--kube-version",
        KUBE_VERSION,
    ]);
    for s in sets {
        cmd.args(["--set", s]);
    }
    let out = cmd.output().expect("run helm template");
    if !out.status.success() {
        return Err(text(&out));
    }
    let stream = String::from_utf8(out.stdout).expect("UTF-8 manifests");
    Ok(serde_yaml::Deserializer::from_str(&stream)
        .map(|doc| Value::deserialize(doc).expect("rendered YAML parses"))
        .filter(|v| !v.is_null())
        .collect())
}

fn render(sets: &[&str]) -> Vec<Value> {
    try_render(sets).unwrap_or_else(|e| panic!("helm template {sets:?} failed:\n{e}"))
}

fn of_kind<'a>(docs: &'a [Value], kind: &str) -> Vec<&'a Value> {
    docs.iter().filter(|d| d["kind"] == kind).collect()
}

fn one<'a>(docs: &'a [Value], kind: &str) -> &'a Value {
    let found = of_kind(docs, kind);
    assert_eq!(
        found.len(),
        1,
        "exactly one {kind} expected, got {found:#?}"
    );
    found[0]
}

fn is_hook(d: &Value) -> bool {
    !d["metadata"]["annotations"]["helm.sh/hook"].is_null()
}

fn strs(v: &Value) -> Vec<String> {
    v.as_sequence()
        .map(|s| {
            s.iter()
                .map(|x| x.as_str().expect("a string").to_string())
                .collect()
        })
        .unwrap_or_default()
}

/// A role's rules as (apiGroup, resource) → verbs.
fn grants(role: &Value) -> BTreeMap<(String, String), BTreeSet<String>> {
    let mut out: BTreeMap<(String, String), BTreeSet<String>> = BTreeMap::new();
    for rule in role["rules"].as_sequence().expect("rules") {
        for group in strs(&rule["apiGroups"]) {
            for resource in strs(&rule["resources"]) {
                out.entry((group.clone(), resource))
                    .or_default()
                    .extend(strs(&rule["verbs"]));
            }
        }
    }
    out
}

/// What the operator does through the API server (controller.rs, kube's finalizer and event
/// recorder), verb by verb.
fn operator_grants() -> BTreeMap<(String, String), BTreeSet<String>> {
    [
        (
            "riffle.dev",
            "streamjobs",
            &["get", "list", "watch", "patch"][..],
        ),
        ("riffle.dev", "streamjobs/status", &["update"]),
        ("riffle.dev", "streamjobs/finalizers", &["update"]),
        ("", "pods", &["list", "watch", "create", "patch", "delete"]),
        ("", "configmaps", &["get", "create", "patch", "delete"]),
        ("", "services", &["create", "patch"]),
        ("events.k8s.io", "events", &["create", "patch"]),
    ]
    .into_iter()
    .map(|(g, r, verbs)| {
        (
            (g.to_string(), r.to_string()),
            verbs.iter().map(|v| v.to_string()).collect(),
        )
    })
    .collect()
}

/// The first place where two YAML trees differ, numbers compared by value (`1.0` and `1`
/// are the same number to the API server; Helm's fromYaml/toYaml writes the latter).
fn difference(a: &Value, b: &Value, path: &str) -> Option<String> {
    match (a, b) {
        (Value::Number(x), Value::Number(y)) if x.as_f64() == y.as_f64() => None,
        (Value::Mapping(x), Value::Mapping(y)) => {
            let keys: BTreeSet<String> = x
                .keys()
                .chain(y.keys())
                .map(|k| k.as_str().unwrap_or_default().to_string())
                .collect();
            keys.iter()
                .find_map(|k| difference(&a[k.as_str()], &b[k.as_str()], &format!("{path}.{k}")))
        }
        (Value::Sequence(x), Value::Sequence(y)) if x.len() == y.len() => x
            .iter()
            .zip(y)
            .enumerate()
            .find_map(|(i, (x, y))| difference(x, y, &format!("{path}[{i}]"))),
        _ if a == b => None,
        _ => Some(format!("{path}: {a:?} != {b:?}")),
    }
}

fn env_var<'a>(container: &'a Value, name: &str) -> Option<&'a Value> {
    container["env"]
        .as_sequence()?
        .iter()
        .find(|e| e["name"] == name)
}

fn assert_restricted(pod_spec: &Value, what: &str) {
    let psc = &pod_spec["securityContext"];
    assert_eq!(psc["runAsNonRoot"], true, "{what}: {psc:?}");
    assert_eq!(psc["runAsUser"], 65532, "{what}: {psc:?}");
    assert_eq!(psc["runAsGroup"], 65532, "{what}: {psc:?}");
    assert_eq!(psc["seccompProfile"]["type"], "RuntimeDefault", "{what}");
    for c in pod_spec["containers"].as_sequence().expect("containers") {
        let sc = &c["securityContext"];
        assert_eq!(sc["allowPrivilegeEscalation"], false, "{what}: {sc:?}");
        assert_eq!(sc["readOnlyRootFilesystem"], true, "{what}: {sc:?}");
        assert_eq!(strs(&sc["capabilities"]["drop"]), ["ALL"], "{what}: {sc:?}");
    }
}

#[test]
fn the_chart_lints_and_renders_what_each_setting_asks_for() {
    let started = Instant::now();
    for sets in [
        &[][..],
        &[
            "watchNamespaces={team-a,team-b}",
            "metrics.serviceMonitor.enabled=true",
        ],
        &[
            "replicaCount=1",
            "leaderElection.enabled=false",
            "crds.install=false",
        ],
    ] {
        let mut cmd = std::process::Command::new(helm_bin());
        cmd.args(["lint", "--strict", "--kube-version", KUBE_VERSION])
            .arg(chart());
        for s in sets {
            cmd.args(["--set", s]);
        }
        let out = cmd.output().expect("run helm lint");
        assert!(out.status.success(), "helm lint {sets:?}:\n{}", text(&out));
    }

    // Defaults: two replicas under leader election, cluster-wide RBAC, the CRD kept.
    let docs = render(&[]);
    let deployment = one(&docs, "Deployment");
    assert_eq!(deployment["spec"]["replicas"], 2);
    let pod = &deployment["spec"]["template"]["spec"];
    assert_restricted(pod, "operator pod");
    assert_eq!(pod["serviceAccountName"], FULLNAME);
    assert_eq!(pod["automountServiceAccountToken"], true);
    let container = &pod["containers"][0];
    assert_eq!(
        container["image"], "riffle-operator:0.1.0",
        "tag = appVersion"
    );
    let args = strs(&container["args"]);
    for want in [
        "--lease-name=rop-riffle-operator",
        "--lease-duration=15",
        "--renew-deadline=10",
        "--retry-period=2",
    ] {
        assert!(args.iter().any(|a| a == want), "{want} in {args:?}");
    }
    for (var, field) in [
        ("POD_NAME", "metadata.name"),
        ("POD_NAMESPACE", "metadata.namespace"),
        ("POD_IP", "status.podIP"),
    ] {
        let e = env_var(container, var).unwrap_or_else(|| panic!("{var} missing"));
        assert_eq!(e["valueFrom"]["fieldRef"]["fieldPath"], field);
    }
    assert!(env_var(container, "RIFFLE_WATCH_NAMESPACE").is_none());
    assert_eq!(
        env_var(container, "RUST_LOG").unwrap()["value"],
        "info,kube=warn"
    );
    assert!(container["envFrom"].is_null());
    for probe in ["livenessProbe", "readinessProbe"] {
        assert_eq!(container[probe]["httpGet"]["path"], "/healthz", "{probe}");
        assert_eq!(container[probe]["httpGet"]["port"], "metrics", "{probe}");
    }
    assert_eq!(container["ports"][0]["name"], "metrics");
    assert_eq!(container["ports"][0]["containerPort"], 8080);
    let anti =
        &pod["affinity"]["podAntiAffinity"]["preferredDuringSchedulingIgnoredDuringExecution"][0];
    assert_eq!(
        anti["podAffinityTerm"]["topologyKey"],
        "kubernetes.io/hostname"
    );
    let selector = &deployment["spec"]["selector"]["matchLabels"];
    assert_eq!(selector["app.kubernetes.io/component"], "operator");
    let labels = &deployment["metadata"]["labels"];
    for key in [
        "app.kubernetes.io/name",
        "app.kubernetes.io/instance",
        "app.kubernetes.io/version",
        "app.kubernetes.io/component",
        "app.kubernetes.io/part-of",
        "app.kubernetes.io/managed-by",
        "helm.sh/chart",
    ] {
        assert!(
            labels[key].is_string(),
            "label {key} on the Deployment: {labels:?}"
        );
    }
    let service = one(&docs, "Service");
    assert_eq!(service["spec"]["type"], "ClusterIP");
    assert_eq!(service["spec"]["ports"][0]["port"], 8080);
    assert_eq!(service["spec"]["ports"][0]["name"], "metrics");
    assert_eq!(service["spec"]["selector"], *selector);
    let pdb = one(&docs, "PodDisruptionBudget");
    assert_eq!(pdb["spec"]["minAvailable"], 1);
    assert_eq!(pdb["spec"]["selector"]["matchLabels"], *selector);
    assert!(
        of_kind(&docs, "ServiceMonitor").is_empty(),
        "off by default"
    );

    // RBAC, cluster-wide: the operator's verbs exactly; the Lease in the release namespace.
    let cluster_role = one(&docs, "ClusterRole");
    assert_eq!(grants(cluster_role), operator_grants());
    let crb = one(&docs, "ClusterRoleBinding");
    assert_eq!(crb["roleRef"]["name"], cluster_role["metadata"]["name"]);
    assert_eq!(crb["subjects"][0]["name"], FULLNAME);
    assert_eq!(crb["subjects"][0]["namespace"], "rel");
    let roles: Vec<&Value> = of_kind(&docs, "Role")
        .into_iter()
        .filter(|r| !is_hook(r))
        .collect();
    assert_eq!(roles.len(), 1, "only the leader-election Role: {roles:#?}");
    let lease_role = roles[0];
    assert_eq!(lease_role["metadata"]["namespace"], "rel");
    let lease_grants = grants(lease_role);
    assert_eq!(lease_grants.len(), 1, "{lease_grants:?}");
    assert_eq!(
        lease_grants[&("coordination.k8s.io".into(), "leases".into())],
        BTreeSet::from(["create", "get", "update"].map(String::from))
    );
    let named = lease_role["rules"]
        .as_sequence()
        .unwrap()
        .iter()
        .find(|r| !r["resourceNames"].is_null())
        .expect("get/update limited by resourceNames");
    assert_eq!(strs(&named["resourceNames"]), [FULLNAME]);
    assert_eq!(strs(&named["verbs"]), ["get", "update"]);

    // The helm test hook: restricted, its own account, only what `check` reads.
    let test_pod = of_kind(&docs, "Pod")
        .into_iter()
        .find(|p| is_hook(p))
        .expect("test pod");
    assert_eq!(test_pod["metadata"]["annotations"]["helm.sh/hook"], "test");
    assert_restricted(&test_pod["spec"], "test pod");
    assert_eq!(
        test_pod["spec"]["serviceAccountName"],
        "rop-riffle-operator-test"
    );
    let check_args = strs(&test_pod["spec"]["containers"][0]["args"]);
    assert_eq!(check_args[0], "check");
    assert!(
        check_args.contains(&format!(
            "--selector=app.kubernetes.io/component=operator,app.kubernetes.io/instance={RELEASE},app.kubernetes.io/name=riffle-operator"
        )),
        "{check_args:?}"
    );
    let test_role = of_kind(&docs, "Role")
        .into_iter()
        .find(|r| is_hook(r))
        .unwrap();
    let list = || BTreeSet::from(["list".to_string()]);
    assert_eq!(
        grants(test_role),
        BTreeMap::from([
            (("".to_string(), "pods".to_string()), list()),
            (("riffle.dev".to_string(), "streamjobs".to_string()), list()),
        ])
    );

    // The CRD: rendered from the chart's copy, which is the repository's file byte for byte.
    let repo_crd = std::fs::read(repo_file("crds/streamjob.yaml")).expect("crds/streamjob.yaml");
    let chart_crd =
        std::fs::read(chart().join("files/crds/streamjob.yaml")).expect("the chart's CRD copy");
    assert!(
        repo_crd == chart_crd,
        "charts/riffle-operator/files/crds/streamjob.yaml differs from crds/streamjob.yaml: run `make crds`"
    );
    let crd = one(&docs, "CustomResourceDefinition");
    let repo: Value = serde_yaml::from_slice(&repo_crd).unwrap();
    if let Some(diff) = difference(&crd["spec"], &repo["spec"], "spec") {
        panic!("the template changed the CRD: {diff}");
    }
    assert_eq!(crd["metadata"]["name"], "streamjobs.riffle.dev");
    assert_eq!(
        crd["metadata"]["annotations"]["helm.sh/resource-policy"],
        "keep"
    );
    assert_eq!(
        crd["metadata"]["labels"]["app.kubernetes.io/instance"],
        RELEASE
    );
    let unkept = render(&["crds.keep=false"]);
    assert!(
        one(&unkept, "CustomResourceDefinition")["metadata"]["annotations"]
            ["helm.sh/resource-policy"]
            .is_null()
    );
    let without = render(&["crds.install=false"]);
    assert!(of_kind(&without, "CustomResourceDefinition").is_empty());

    // Watched namespaces: a Role and RoleBinding in each, no cluster-wide grant.
    let scoped = render(&[
        "watchNamespaces={team-a,team-b}",
        "s3.credentialsSecret=operator-s3",
        "extraEnv[0].name=EXTRA",
        "extraEnv[0].value=on",
    ]);
    assert!(of_kind(&scoped, "ClusterRole").is_empty());
    assert!(of_kind(&scoped, "ClusterRoleBinding").is_empty());
    for ns in ["team-a", "team-b"] {
        let role = of_kind(&scoped, "Role")
            .into_iter()
            .find(|r| r["metadata"]["namespace"] == ns)
            .unwrap_or_else(|| panic!("a Role in {ns}"));
        assert_eq!(grants(role), operator_grants(), "{ns}");
        let binding = of_kind(&scoped, "RoleBinding")
            .into_iter()
            .find(|b| b["metadata"]["namespace"] == ns)
            .unwrap_or_else(|| panic!("a RoleBinding in {ns}"));
        assert_eq!(binding["roleRef"]["name"], role["metadata"]["name"]);
        assert_eq!(binding["subjects"][0]["namespace"], "rel");
    }
    let container = &one(&scoped, "Deployment")["spec"]["template"]["spec"]["containers"][0];
    assert_eq!(
        env_var(container, "RIFFLE_WATCH_NAMESPACE").unwrap()["value"],
        "team-a,team-b"
    );
    assert_eq!(env_var(container, "EXTRA").unwrap()["value"], "on");
    assert_eq!(container["envFrom"][0]["secretRef"]["name"], "operator-s3");

    // Optional pieces.
    let monitored = render(&[
        "metrics.serviceMonitor.enabled=true",
        "metrics.serviceMonitor.interval=15s",
        "metrics.serviceMonitor.labels.release=prom",
        "rbac.aggregateToDefaultRoles=true",
    ]);
    let sm = one(&monitored, "ServiceMonitor");
    assert_eq!(sm["spec"]["endpoints"][0]["port"], "metrics");
    assert_eq!(sm["spec"]["endpoints"][0]["interval"], "15s");
    assert_eq!(sm["metadata"]["labels"]["release"], "prom");
    let aggregated: Vec<&Value> = of_kind(&monitored, "ClusterRole")
        .into_iter()
        .filter(|r| {
            !r["metadata"]["labels"]["rbac.authorization.k8s.io/aggregate-to-view"].is_null()
                || !r["metadata"]["labels"]["rbac.authorization.k8s.io/aggregate-to-edit"].is_null()
        })
        .collect();
    assert_eq!(aggregated.len(), 2, "view and edit: {aggregated:#?}");
    let single = render(&["replicaCount=1", "leaderElection.enabled=false"]);
    assert!(
        of_kind(&single, "PodDisruptionBudget").is_empty(),
        "no PDB for one replica"
    );
    let single_args =
        strs(&one(&single, "Deployment")["spec"]["template"]["spec"]["containers"][0]["args"]);
    assert_eq!(single_args, ["--no-leader-election"]);
    assert!(
        of_kind(&single, "Role").iter().all(|r| is_hook(r)),
        "no Lease Role"
    );

    // No role in any of these renderings may touch Secrets, or grant wildcards.
    for docs in [&docs, &unkept, &scoped, &monitored, &single] {
        for role in of_kind(docs, "Role")
            .into_iter()
            .chain(of_kind(docs, "ClusterRole"))
        {
            for ((group, resource), verbs) in grants(role) {
                let name = &role["metadata"]["name"];
                assert_ne!(resource, "secrets", "{name:?} grants secrets");
                assert_ne!(resource, "*", "{name:?}");
                assert_ne!(group, "*", "{name:?}");
                assert!(!verbs.contains("*"), "{name:?}: {verbs:?}");
            }
        }
    }

    // The schema and the templates refuse what cannot work.
    for (sets, says) in [
        (&["replicaCount=two"][..], "/replicaCount"),
        (&["replicaCont=3"], "replicaCont"),
        (&["watchNamespaces={Not_A_Namespace}"], "/watchNamespaces/0"),
        (&["image.pullPolicy=Sometimes"], "/image/pullPolicy"),
        (
            &["extraEnv[0].name=N", "extraEnv[0].value=1"],
            "/extraEnv/0/value",
        ),
        (
            &["leaderElection.enabled=false"],
            "needs leaderElection.enabled",
        ),
        (
            &["leaderElection.renewDeadline=20"],
            "renewDeadline must be less",
        ),
    ] {
        let err = try_render(sets).expect_err(&format!("{sets:?} must be refused"));
        assert!(
            err.contains(says),
            "{sets:?} refused without naming {says:?}:\n{err}"
        );
    }
    eprintln!("lint and template checks took {:?}", started.elapsed());
}

/// `helm …` against the test bed, with its admin kubeconfig.
async fn helm(env: &TestEnv, args: &[&str]) -> Output {
    tokio::process::Command::new(helm_bin())
        .args(args)
        .arg("--kubeconfig")
        .arg(&env.kubeconfig)
        .output()
        .await
        .expect("run helm")
}

/// Uninstalls the release when dropped, also after a failed assertion (before the
/// namespace goes, so its cluster-scoped objects go too). Then StreamJobs a failure left are
/// deleted without their finalizer: with the operator gone nothing would remove it, and the
/// namespace would stay Terminating.
struct Installed {
    kubeconfig: PathBuf,
    ns: String,
    uninstalled: bool,
}

impl Drop for Installed {
    fn drop(&mut self) {
        if self.uninstalled {
            return;
        }
        let (kubeconfig, ns) = (self.kubeconfig.clone(), self.ns.clone());
        // The test's runtime is blocked here: a thread with its own runtime and client.
        let _ = std::thread::spawn(move || {
            let _ = std::process::Command::new(helm_bin())
                .args(["uninstall", RELEASE, "--namespace", &ns, "--kubeconfig"])
                .arg(&kubeconfig)
                .output();
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .expect("cleanup runtime");
            rt.block_on(async {
                let release = async {
                    let client = riffle_e2e::testbed::client(&kubeconfig).await;
                    let ar = ApiResource::erase::<StreamJob>(&());
                    let jobs = Api::<DynamicObject>::namespaced_with(client, &ns, &ar);
                    let left = jobs.list(&ListParams::default()).await.map(|l| l.items);
                    for sj in left.unwrap_or_default() {
                        // Deleting first: a finalizer cannot be added back to an object
                        // being deleted (by an operator replica not yet stopped).
                        let _ = jobs.delete(&sj.name_any(), &DeleteParams::default()).await;
                        let _ = jobs
                            .patch(
                                &sj.name_any(),
                                &PatchParams::default(),
                                &Patch::Merge(json!({"metadata": {"finalizers": null}})),
                            )
                            .await;
                    }
                };
                let _ = tokio::time::timeout(std::time::Duration::from_secs(30), release).await;
            });
        })
        .join();
    }
}

async fn review(
    client: &Client,
    user: &str,
    ns: &str,
    verb: &str,
    group: &str,
    resource: &str,
) -> bool {
    // The groups the API server gives a service account's token.
    let sa_ns = user
        .split(':')
        .nth(2)
        .expect("system:serviceaccount:NS:NAME");
    let sar: SubjectAccessReview = serde_json::from_value(json!({
        "spec": {
            "user": user,
            "groups": [
                "system:serviceaccounts",
                format!("system:serviceaccounts:{sa_ns}"),
                "system:authenticated",
            ],
            "resourceAttributes": {"namespace": ns, "verb": verb, "group": group, "resource": resource},
        }
    }))
    .unwrap();
    let answer = Api::<SubjectAccessReview>::all(client.clone())
        .create(&PostParams::default(), &sar)
        .await
        .expect("SubjectAccessReview");
    answer.status.expect("a review has a status").allowed
}

/// `GET /metrics` of a replica, over plain HTTP/1.0.
async fn metrics_of(pod: &Pod) -> String {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let ip = pod
        .status
        .as_ref()
        .and_then(|s| s.pod_ip.clone())
        .expect("pod IP");
    let get = async {
        let mut s = tokio::net::TcpStream::connect((ip.as_str(), 8080)).await?;
        s.write_all(b"GET /metrics HTTP/1.0\r\nHost: operator\r\n\r\n")
            .await?;
        let mut out = String::new();
        s.read_to_string(&mut out).await?;
        Ok::<_, std::io::Error>(out)
    };
    tokio::time::timeout(std::time::Duration::from_secs(5), get)
        .await
        .expect("metrics answer in time")
        .unwrap_or_else(|e| panic!("GET {ip}:8080/metrics: {e}"))
}

/// Whether `o` is this test's: namespaced objects are (the namespace is the test's);
/// cluster-scoped ones carry the namespace in their name (release names repeat across
/// namespaces, and other runs of this test may be installing a release of the same name).
fn ours<K: Resource>(o: &K, ns: &str) -> bool {
    o.meta().namespace.is_some() || o.meta().name.as_deref().is_some_and(|n| n.contains(ns))
}

/// Waits (watch-based) until no object of `K` in `api` carries the release label.
async fn wait_gone<K>(env: &TestEnv, api: Api<K>, kind: &str)
where
    K: Clone + Debug + Send + Sync + DeserializeOwned + Resource + 'static,
    K::DynamicType: Default + Eq + Hash + Clone,
{
    let ns = env.ns.clone();
    env.wait_list(
        api,
        RELEASE_LABEL,
        &format!("no {kind} of the release"),
        move |o| !o.iter().any(|o| ours(o, &ns)),
    )
    .await;
}

async fn count<K>(api: &Api<K>, ns: &str) -> usize
where
    K: Clone + Debug + DeserializeOwned + Resource,
{
    api.list(&ListParams::default().labels(RELEASE_LABEL))
        .await
        .expect("list")
        .items
        .iter()
        .filter(|o| ours(*o, ns))
        .count()
}

#[tokio::test]
async fn the_chart_installs_under_restricted_psa_and_uninstalls_cleanly() {
    let started = Instant::now();
    let env = TestEnv::start("helm").await;
    let client = env.client.clone();
    install_crd(&client, &StreamJob::crd()).await;
    let ns = env.ns.clone();

    // The namespace enforces the restricted Pod Security Standard before anything is installed.
    Api::<Namespace>::all(client.clone())
        .patch(
            &ns,
            &PatchParams::default(),
            &Patch::Merge(json!({"metadata": {"labels": {
                "pod-security.kubernetes.io/enforce": "restricted",
                "pod-security.kubernetes.io/enforce-version": "latest",
            }}})),
        )
        .await
        .expect("label the namespace");
    // ... and the API server enforces it: a pod without a security context is refused.
    let plain = env.pod(
        "not-restricted",
        json!({"containers": [{"name": "c", "image": "riffle-testbed-probe:test"}]}),
    );
    let refused = env
        .api::<Pod>()
        .create(
            &PostParams {
                dry_run: true,
                ..Default::default()
            },
            &plain,
        )
        .await
        .expect_err("a non-restricted pod must be refused");
    assert!(
        refused
            .to_string()
            .contains("violates PodSecurity \"restricted"),
        "{refused}"
    );

    // Install: watched namespace = this one only (other tests' StreamJobs elsewhere on the
    // test bed are not ours to reconcile), the shared CRD left alone, pods on our node, and
    // the aggregated user roles on so cluster-scoped objects exist to be removed.
    let mut installed = Installed {
        kubeconfig: env.kubeconfig.clone(),
        ns: ns.clone(),
        uninstalled: false,
    };
    let node_selector = format!("nodeSelector.kubernetes\\.io/hostname={}", env.node);
    let watch = format!("watchNamespaces={{{ns}}}");
    let chart = chart().to_string_lossy().into_owned();
    let t = Instant::now();
    let out = helm(
        &env,
        &[
            "install",
            RELEASE,
            &chart,
            "--namespace",
            &ns,
            "--set",
            "crds.install=false",
            "--set",
            "crds.keep=false",
            "--set",
            &node_selector,
            "--set",
            &watch,
            "--set",
            "rbac.aggregateToDefaultRoles=true",
        ],
    )
    .await;
    assert!(out.status.success(), "helm install:\n{}", text(&out));
    eprintln!("helm install: {:?}", t.elapsed());

    // Both replicas Ready: admitted under `restricted`, scheduled, probes passing.
    let pods = env
        .wait_list(
            env.api::<Pod>(),
            OPERATOR_PODS,
            "two Ready operator replicas",
            |p| p.iter().filter(|p| pod_ready(p)).count() == 2,
        )
        .await;
    let names: BTreeSet<String> = pods.iter().map(|p| p.name_any()).collect();
    eprintln!("replicas Ready: {names:?} after {:?}", started.elapsed());
    for pod in &pods {
        let spec = pod.spec.as_ref().unwrap();
        assert_eq!(
            spec.service_account_name.as_deref(),
            Some(FULLNAME),
            "own account"
        );
        assert_eq!(spec.automount_service_account_token, Some(true));
        let sc = spec.security_context.as_ref().unwrap();
        assert_eq!(sc.run_as_non_root, Some(true));
        assert_eq!(sc.run_as_user, Some(65532));
    }
    let sa = env
        .api::<ServiceAccount>()
        .get(FULLNAME)
        .await
        .expect("the ServiceAccount");
    assert_eq!(sa.labels()["app.kubernetes.io/instance"], RELEASE);

    // One leader: the Lease names one of the two pods, and exactly that one says so.
    let lease = env
        .wait_named(
            env.api::<Lease>(),
            FULLNAME,
            "the Lease held by a replica",
            |l: Option<&Lease>| {
                l.and_then(|l| l.spec.as_ref()?.holder_identity.as_ref())
                    .is_some_and(|h| names.contains(h))
            },
        )
        .await
        .unwrap();
    let holder = lease.spec.unwrap().holder_identity.unwrap();
    // The holder sets its gauge just after its Lease write: poll, bounded.
    let deadline = Instant::now() + std::time::Duration::from_secs(30);
    loop {
        let mut leaders = Vec::new();
        let mut seen = Vec::new();
        for pod in &pods {
            let m = metrics_of(pod).await;
            assert!(
                m.starts_with("HTTP/1.0 200") || m.starts_with("HTTP/1.1 200"),
                "{m}"
            );
            if m.lines().any(|l| l == "riffle_operator_leader 1") {
                leaders.push(pod.name_any());
            } else {
                assert!(m.lines().any(|l| l == "riffle_operator_leader 0"), "{m}");
            }
            seen.push(m);
        }
        if leaders == [holder.clone()] {
            break;
        }
        assert!(
            leaders.is_empty(),
            "leaders by metrics {leaders:?}, Lease holder {holder}"
        );
        assert!(
            Instant::now() < deadline,
            "no replica reports leading within 30 s: {seen:#?}"
        );
        tokio::time::sleep(std::time::Duration::from_millis(200)).await;
    }

    // RBAC as the API server decides it for the operator's account.
    let user = format!("system:serviceaccount:{ns}:{FULLNAME}");
    for (verb, group, resource, allowed) in [
        ("list", "riffle.dev", "streamjobs", true),
        ("watch", "riffle.dev", "streamjobs", true),
        ("update", "riffle.dev", "streamjobs/status", true),
        ("create", "", "pods", true),
        ("delete", "", "pods", true),
        ("create", "events.k8s.io", "events", true),
        ("get", "", "secrets", false),
        ("list", "", "secrets", false),
        ("delete", "riffle.dev", "streamjobs", false),
        ("update", "apps", "deployments", false),
    ] {
        assert_eq!(
            review(&client, &user, &ns, verb, group, resource).await,
            allowed,
            "{verb} {resource} in {ns}"
        );
    }
    // Only the watched namespace: nothing in another one.
    assert!(
        !review(
            &client,
            &user,
            "default",
            "list",
            "riffle.dev",
            "streamjobs"
        )
        .await
    );
    assert!(!review(&client, &user, "default", "create", "", "pods").await);

    // The same with the operator pod's own credentials (the kubeconfig and token the node
    // agent wrote for it, as a kubelet mounts them): a Secret is out of reach.
    let leader = pods.iter().find(|p| p.name_any() == holder).unwrap();
    let dir = PodDir::new(
        &state_dir(),
        &ns,
        &holder,
        leader.metadata.uid.as_deref().unwrap(),
    );
    let kc = Kubeconfig::read_from(dir.kubeconfig()).expect("the pod's kubeconfig");
    let config = kube::Config::from_custom_kubeconfig(kc, &KubeConfigOptions::default())
        .await
        .expect("pod kubeconfig");
    let as_operator = Client::try_from(config).expect("client with the pod's token");
    let me = Api::<SelfSubjectReview>::all(as_operator.clone())
        .create(&PostParams::default(), &SelfSubjectReview::default())
        .await
        .expect("SelfSubjectReview");
    let username = me.status.and_then(|s| s.user_info).and_then(|u| u.username);
    assert_eq!(
        username.as_deref(),
        Some(user.as_str()),
        "the token is the operator's"
    );
    env.api::<Secret>()
        .create(
            &PostParams::default(),
            &serde_json::from_value(
                json!({"metadata": {"name": "not-for-the-operator"}, "stringData": {"k": "v"}}),
            )
            .unwrap(),
        )
        .await
        .unwrap();
    match Api::<Secret>::namespaced(as_operator.clone(), &ns)
        .get("not-for-the-operator")
        .await
    {
        Err(kube::Error::Api(s)) => assert_eq!(s.code, 403, "{s:?}"),
        other => panic!("GET secret with the operator's token: expected 403, got {other:?}"),
    }
    let sj_api = ApiResource::erase::<StreamJob>(&());
    Api::<DynamicObject>::namespaced_with(as_operator.clone(), &ns, &sj_api)
        .list(&ListParams::default())
        .await
        .expect("the same token lists StreamJobs");

    // And the operator does its real work with these grants: a StreamJob gets its finalizer,
    // a status, a Service, a ConfigMap and a worker pod; its deletion completes.
    let sj: DynamicObject = serde_json::from_value(json!({
        "apiVersion": "riffle.dev/v1alpha1",
        "kind": "StreamJob",
        "metadata": {"name": "probe"},
        "spec": {
            "image": "riffle-runtime:test",
            "parallelism": 1,
            "keyGroups": 4,
            "source": {"topics": ["helm-chart-probe"]},
            "sink": {"recommendations": "helm-chart-probe-out", "late": "helm-chart-probe-late", "deadLetter": "helm-chart-probe-dlq"},
            "kafka": {"bootstrapServers": std::env::var("KAFKA_BOOTSTRAP").unwrap_or_else(|_| "127.0.0.1:19092".into())},
            "storage": {"checkpoints": format!("s3://riffle/e2e/{ns}/probe")},
            "dataflow": {"windowSize": "10m", "windowSlide": "1m"},
            "savepointOnDeletion": false,
            "podTemplate": {"nodeSelector": {"kubernetes.io/hostname": env.node}},
        }
    }))
    .unwrap();
    let jobs = Api::<DynamicObject>::namespaced_with(client.clone(), &ns, &sj_api);
    jobs.create(&PostParams::default(), &sj)
        .await
        .expect("create StreamJob");
    env.wait_named(
        jobs.clone(),
        "probe",
        "finalizer and status written by the operator",
        |o: Option<&DynamicObject>| {
            o.is_some_and(|o| !o.finalizers().is_empty() && o.data["status"]["phase"].is_string())
        },
    )
    .await;
    env.wait_list(
        env.api::<Pod>(),
        "riffle.dev/job=probe",
        "the worker pod",
        |p| !p.is_empty(),
    )
    .await;
    env.api::<Service>()
        .get("probe-workers")
        .await
        .expect("the workers' Service");
    env.api::<ConfigMap>()
        .get("probe-g1")
        .await
        .expect("generation 1's job file");
    env.wait_list(
        env.api::<KubeEvent>(),
        "",
        "the operator's Starting event about probe",
        |events| {
            events.iter().any(|e| {
                e.reason.as_deref() == Some("Starting")
                    && e.reporting_controller.as_deref() == Some("riffle-operator")
                    && e.regarding.as_ref().and_then(|r| r.name.as_deref()) == Some("probe")
            })
        },
    )
    .await;
    jobs.delete("probe", &DeleteParams::default())
        .await
        .expect("delete StreamJob");
    env.wait_named(
        jobs.clone(),
        "probe",
        "the StreamJob gone (finalizer removed)",
        |o: Option<&DynamicObject>| o.is_none(),
    )
    .await;
    // Nothing the operator tried was refused (a refused Event would only be logged).
    let leader_log = riffle_e2e::node_agent::read_logs(&state_dir(), &ns, &holder, None)
        .expect("the leader's log");
    assert!(leader_log.contains("applied generation"), "{leader_log}");
    assert!(
        !leader_log.to_lowercase().contains("forbidden"),
        "{leader_log}"
    );
    eprintln!(
        "RBAC and reconcile checks done after {:?}",
        started.elapsed()
    );

    // helm test: `riffle-operator check` in a restricted pod of its own.
    let t = Instant::now();
    let out = helm(
        &env,
        &["test", RELEASE, "--namespace", &ns, "--timeout", "2m"],
    )
    .await;
    assert!(out.status.success(), "helm test:\n{}", text(&out));
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        stdout.contains("rop-riffle-operator-test") && stdout.contains("Succeeded"),
        "{stdout}"
    );
    eprintln!("helm test: {:?}", t.elapsed());
    let check_log =
        riffle_e2e::node_agent::read_logs(&state_dir(), &ns, "rop-riffle-operator-test", None)
            .expect("the test pod's log");
    assert!(
        check_log.contains(&format!("exactly one leader: {holder}")),
        "{check_log}"
    );
    assert!(check_log.contains("check passed"), "{check_log}");

    // Before uninstalling: what the release made is there (so "gone" below means something).
    let cluster_roles = Api::<ClusterRole>::all(client.clone());
    let cluster_bindings = Api::<ClusterRoleBinding>::all(client.clone());
    let before = [
        ("Deployment", count(&env.api::<Deployment>(), &ns).await, 1),
        ("ReplicaSet", count(&env.api::<ReplicaSet>(), &ns).await, 1),
        ("Pod", count(&env.api::<Pod>(), &ns).await, 2),
        ("Service", count(&env.api::<Service>(), &ns).await, 1),
        (
            "ServiceAccount",
            count(&env.api::<ServiceAccount>(), &ns).await,
            1,
        ),
        ("Role", count(&env.api::<Role>(), &ns).await, 2),
        (
            "RoleBinding",
            count(&env.api::<RoleBinding>(), &ns).await,
            2,
        ),
        (
            "PodDisruptionBudget",
            count(&env.api::<PodDisruptionBudget>(), &ns).await,
            1,
        ),
        ("Lease", count(&env.api::<Lease>(), &ns).await, 1),
        ("ClusterRole", count(&cluster_roles, &ns).await, 2),
        ("ClusterRoleBinding", count(&cluster_bindings, &ns).await, 0),
    ];
    for (kind, found, want) in before {
        assert_eq!(found, want, "{kind}s of the release before uninstall");
    }

    let t = Instant::now();
    let out = helm(&env, &["uninstall", RELEASE, "--namespace", &ns]).await;
    assert!(out.status.success(), "helm uninstall:\n{}", text(&out));
    installed.uninstalled = true;
    wait_gone(&env, env.api::<Deployment>(), "Deployment").await;
    wait_gone(&env, env.api::<ReplicaSet>(), "ReplicaSet").await;
    wait_gone(&env, env.api::<Pod>(), "Pod").await;
    wait_gone(&env, env.api::<Service>(), "Service").await;
    wait_gone(&env, env.api::<Endpoints>(), "Endpoints").await;
    wait_gone(&env, env.api::<EndpointSlice>(), "EndpointSlice").await;
    wait_gone(&env, env.api::<ServiceAccount>(), "ServiceAccount").await;
    wait_gone(&env, env.api::<Role>(), "Role").await;
    wait_gone(&env, env.api::<RoleBinding>(), "RoleBinding").await;
    wait_gone(
        &env,
        env.api::<PodDisruptionBudget>(),
        "PodDisruptionBudget",
    )
    .await;
    wait_gone(&env, env.api::<Lease>(), "Lease").await;
    wait_gone(&env, env.api::<ConfigMap>(), "ConfigMap").await;
    wait_gone(&env, env.api::<Secret>(), "Secret").await;
    wait_gone(&env, cluster_roles.clone(), "ClusterRole").await;
    wait_gone(&env, cluster_bindings.clone(), "ClusterRoleBinding").await;
    // Helm's own record of the release (Secrets labelled owner=helm) is gone too.
    let records = env
        .api::<Secret>()
        .list(&ListParams::default().labels(&format!("owner=helm,name={RELEASE}")))
        .await
        .unwrap();
    assert!(
        records.items.is_empty(),
        "release records left: {:?}",
        records
            .items
            .iter()
            .map(|s| s.name_any())
            .collect::<Vec<_>>()
    );
    // The shared CRD was not the release's: untouched.
    Api::<CustomResourceDefinition>::all(client.clone())
        .get("streamjobs.riffle.dev")
        .await
        .expect("the StreamJob CRD is still there");
    eprintln!(
        "helm uninstall and everything gone: {:?}; whole test {:?}",
        t.elapsed(),
        started.elapsed()
    );
}
