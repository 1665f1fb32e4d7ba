//! Node agent acceptance tests against the real test bed (`make testbed-up`).
//!
//! Every test starts its own `riffle-node-agent` (unique node name, deleted on exit) and
//! works in its own namespace; pods are pinned to the test's node with a `nodeSelector`
//! on `kubernetes.io/hostname`, so tests (and other test binaries) can run in parallel.
//! All waits are watch-based with bounded timeouts. The environment is
//! `riffle_e2e::testenv::TestEnv`.

use std::collections::BTreeMap;
use std::process::Command;
use std::time::Duration;

use k8s_openapi::api::apps::v1::{Deployment, ReplicaSet};
use k8s_openapi::api::core::v1::{ConfigMap, Pod, Secret, ServiceAccount};
use k8s_openapi::api::rbac::v1::{Role, RoleBinding};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::OwnerReference;
use kube::api::{DeleteParams, ListParams, PostParams};
use riffle_e2e::node_agent::{process_exists, read_pid};
use riffle_e2e::testenv::{binary, first_container, phase, pod_ready, state_dir, TestEnv, TIMEOUT};
use serde_json::json;

/// The node agent's CLI (for `logs`).
fn agent_cli() -> Command {
    Command::new(binary("riffle-node-agent"))
}

#[tokio::test]
async fn deployment_runs_on_the_node_agent_and_is_garbage_collected() {
    let env = TestEnv::start("deploy").await;
    let labels = BTreeMap::from([("app".to_string(), "web".to_string())]);
    let template = env.pod(
        "unused",
        json!({
            "containers": [{
                "name": "web",
                "image": "riffle-testbed-probe:test",
                "args": ["serve", "--port", "8080"],
                "env": [{ "name": "POD_IP", "valueFrom": { "fieldRef": { "fieldPath": "status.podIP" } } }],
                "ports": [{ "name": "http", "containerPort": 8080 }],
                "readinessProbe": { "httpGet": { "path": "/healthz", "port": "http" }, "periodSeconds": 1 },
                "livenessProbe": { "httpGet": { "path": "/healthz", "port": 8080 }, "periodSeconds": 2 },
            }],
        }),
    );
    let deployment: Deployment = serde_json::from_value(json!({
        "metadata": { "name": "web", "namespace": env.ns },
        "spec": {
            "replicas": 1,
            "selector": { "matchLabels": labels },
            "template": { "metadata": { "labels": labels }, "spec": template.spec },
        },
    }))
    .unwrap();
    env.api::<Deployment>()
        .create(&PostParams::default(), &deployment)
        .await
        .expect("create deployment");

    let pods = env
        .wait_list(
            env.api::<Pod>(),
            "app=web",
            "a Ready web pod",
            |pods: &[Pod]| pods.iter().any(|p| phase(p) == "Running" && pod_ready(p)),
        )
        .await;
    let pod = pods.into_iter().find(pod_ready).unwrap();
    let name = pod.metadata.name.clone().unwrap();
    let status = pod.status.clone().unwrap();
    assert_eq!(
        pod.spec.as_ref().unwrap().node_name.as_deref(),
        Some(env.node.as_str())
    );
    let ip = status.pod_ip.clone().expect("podIP");
    assert!(ip.starts_with("127.0.") && ip != "127.0.0.1", "pod IP {ip}");
    assert_eq!(status.pod_ips.unwrap()[0].ip, ip);
    assert!(first_container(&pod).ready);

    // The process really serves on its pod IP.
    let code =
        riffle_e2e::node_agent::probe::http_get(ip.parse().unwrap(), 8080, "/healthz", None, &[])
            .await
            .expect("GET /healthz");
    assert_eq!(code, 200);

    // Logs through the library and the CLI.
    let logs = env.logs(&name);
    assert!(
        logs.contains(&format!("listening on {ip}:8080")),
        "logs: {logs}"
    );
    let cli = agent_cli()
        .args(["logs", &format!("{}/{name}", env.ns), "web", "--state-dir"])
        .arg(state_dir())
        .output()
        .unwrap();
    assert!(cli.status.success());
    assert!(String::from_utf8_lossy(&cli.stdout).contains("GET /healthz -> 200"));

    let pid = read_pid(&state_dir(), &env.ns, &name, None).unwrap();
    assert!(process_exists(pid));

    // Background deletion: the garbage collector removes the ReplicaSet, then the pod; the
    // agent terminates the process and removes the pod object.
    env.api::<Deployment>()
        .delete("web", &DeleteParams::background())
        .await
        .expect("delete deployment");
    env.wait_list(
        env.api::<ReplicaSet>(),
        "app=web",
        "ReplicaSets collected",
        |rs: &[ReplicaSet]| rs.is_empty(),
    )
    .await;
    env.wait_list(
        env.api::<Pod>(),
        "app=web",
        "pods gone",
        |pods: &[Pod]| pods.is_empty(),
    )
    .await;
    assert!(!process_exists(pid), "process {pid} survived its pod");
    assert!(
        env.logs(&name).contains("SIGTERM, exiting"),
        "graceful termination"
    );

    // Owner references between plain objects are honoured too.
    let cms = env.api::<ConfigMap>();
    let owner = cms
        .create(
            &PostParams::default(),
            &serde_json::from_value(json!({"metadata": {"name": "owner"}})).unwrap(),
        )
        .await
        .unwrap();
    let mut dependent: ConfigMap =
        serde_json::from_value(json!({"metadata": {"name": "dependent"}})).unwrap();
    dependent.metadata.owner_references = Some(vec![OwnerReference {
        api_version: "v1".into(),
        kind: "ConfigMap".into(),
        name: "owner".into(),
        uid: owner.metadata.uid.clone().unwrap(),
        ..Default::default()
    }]);
    let dependent = cms
        .create(&PostParams::default(), &dependent)
        .await
        .unwrap();
    let dependent_uid = dependent.metadata.uid.clone().unwrap();
    cms.delete("owner", &DeleteParams::background())
        .await
        .unwrap();
    env.wait_named(
        cms,
        "dependent",
        "dependent ConfigMap collected",
        move |c: Option<&ConfigMap>| {
            c.is_none_or(|c| c.metadata.uid.as_deref() != Some(&dependent_uid))
        },
    )
    .await;
}

#[tokio::test]
async fn service_account_permissions_apply_inside_pods() {
    let env = TestEnv::start("rbac").await;
    for sa in ["restricted", "reader"] {
        env.api::<ServiceAccount>()
            .create(
                &PostParams::default(),
                &serde_json::from_value(json!({"metadata": {"name": sa}})).unwrap(),
            )
            .await
            .unwrap();
    }
    let role: Role = serde_json::from_value(json!({
        "metadata": { "name": "secret-reader" },
        "rules": [{ "apiGroups": [""], "resources": ["secrets"], "verbs": ["list"] }],
    }))
    .unwrap();
    env.api::<Role>()
        .create(&PostParams::default(), &role)
        .await
        .unwrap();
    let binding: RoleBinding = serde_json::from_value(json!({
        "metadata": { "name": "reader-secrets" },
        "roleRef": { "apiGroup": "rbac.authorization.k8s.io", "kind": "Role", "name": "secret-reader" },
        "subjects": [{ "kind": "ServiceAccount", "name": "reader", "namespace": env.ns }],
    }))
    .unwrap();
    env.api::<RoleBinding>()
        .create(&PostParams::default(), &binding)
        .await
        .unwrap();
    env.api::<Secret>()
        .create(
            &PostParams::default(),
            &serde_json::from_value(json!({"metadata": {"name": "s"}, "stringData": {"k": "v"}}))
                .unwrap(),
        )
        .await
        .unwrap();

    for (name, sa) in [("denied", "restricted"), ("allowed", "reader")] {
        env.create_pod(env.pod(
            name,
            json!({
                "serviceAccountName": sa,
                "restartPolicy": "Never",
                "containers": [{
                    "name": "check",
                    "image": "riffle-testbed-probe:test",
                    "args": ["kube-can", "list", "secrets"],
                }],
            }),
        ))
        .await;
    }
    let denied = env
        .wait_pod("denied", "denied pod finished", |p| {
            matches!(phase(p), "Succeeded" | "Failed")
        })
        .await;
    let denied_logs = env.logs("denied");
    assert_eq!(phase(&denied), "Failed", "logs: {denied_logs}");
    let terminated = first_container(&denied).state.unwrap().terminated.unwrap();
    assert_eq!(terminated.exit_code, 3, "logs: {denied_logs}");
    assert!(denied_logs.contains("HTTP 403"), "logs: {denied_logs}");
    assert!(
        denied_logs.contains(&format!("system:serviceaccount:{}:restricted", env.ns)),
        "logs: {denied_logs}"
    );

    let allowed = env
        .wait_pod("allowed", "allowed pod finished", |p| {
            matches!(phase(p), "Succeeded" | "Failed")
        })
        .await;
    let allowed_logs = env.logs("allowed");
    assert_eq!(phase(&allowed), "Succeeded", "logs: {allowed_logs}");
    assert!(allowed_logs.contains("HTTP 200"), "logs: {allowed_logs}");

    // Pods may opt out of the token.
    env.create_pod(env.pod(
        "no-token",
        json!({
            "serviceAccountName": "reader",
            "automountServiceAccountToken": false,
            "restartPolicy": "Never",
            "containers": [{ "name": "check", "image": "riffle-testbed-probe:test", "args": ["kube-can", "list", "secrets"] }],
        }),
    ))
    .await;
    let no_token = env
        .wait_pod("no-token", "no-token pod finished", |p| {
            matches!(phase(p), "Succeeded" | "Failed")
        })
        .await;
    assert_eq!(phase(&no_token), "Failed", "logs: {}", env.logs("no-token"));
}

#[tokio::test]
async fn liveness_failures_restart_and_exit_codes_are_reported() {
    let env = TestEnv::start("restart").await;
    env.create_pod(env.pod(
        "unhealthy",
        json!({
            "terminationGracePeriodSeconds": 2,
            "containers": [{
                "name": "web",
                "image": "riffle-testbed-probe:test",
                "args": ["serve", "--port", "8080"],
                "livenessProbe": { "httpGet": { "path": "/unhealthy", "port": 8080 }, "initialDelaySeconds": 1, "periodSeconds": 1, "failureThreshold": 1 },
            }],
        }),
    ))
    .await;
    env.create_pod(env.pod(
        "exit3",
        json!({
            "restartPolicy": "Never",
            "containers": [{ "name": "main", "image": "riffle-testbed-probe:test", "args": ["exit", "3"] }],
        }),
    ))
    .await;

    let exited = env
        .wait_pod("exit3", "exit3 pod Failed", |p| phase(p) == "Failed")
        .await;
    let status = first_container(&exited);
    let terminated = status.state.unwrap().terminated.expect("terminated state");
    assert_eq!(terminated.exit_code, 3);
    assert_eq!(terminated.reason.as_deref(), Some("Error"));
    assert_eq!(status.restart_count, 0);
    assert!(env.logs("exit3").contains("exiting with 3"));

    let restarted = env
        .wait_pod("unhealthy", "two liveness restarts", |p| {
            p.status
                .as_ref()
                .and_then(|s| s.container_statuses.as_ref())
                .and_then(|cs| cs.first())
                .is_some_and(|c| c.restart_count >= 2)
        })
        .await;
    assert_eq!(phase(&restarted), "Running");
    let status = first_container(&restarted);
    assert!(
        status.last_state.and_then(|s| s.terminated).is_some(),
        "lastState.terminated"
    );
    let logs = env.logs("unhealthy");
    assert!(
        logs.matches("listening on").count() >= 2,
        "one start per run: {logs}"
    );
    assert!(logs.contains("GET /unhealthy -> 500"), "{logs}");
}

#[tokio::test]
async fn env_and_volumes_come_from_config_maps_and_secrets() {
    let env = TestEnv::start("volumes").await;
    env.api::<ConfigMap>()
        .create(
            &PostParams::default(),
            &serde_json::from_value(json!({"metadata": {"name": "cfg"}, "data": {"greeting": "hello-from-cm", "MODE": "fast"}})).unwrap(),
        )
        .await
        .unwrap();
    env.api::<Secret>()
        .create(
            &PostParams::default(),
            &serde_json::from_value(
                json!({"metadata": {"name": "creds"}, "stringData": {"password": "s3cret"}}),
            )
            .unwrap(),
        )
        .await
        .unwrap();
    env.create_pod(env.pod(
        "files",
        json!({
            "restartPolicy": "Never",
            "volumes": [
                { "name": "cfg", "configMap": { "name": "cfg" } },
                { "name": "creds", "secret": { "secretName": "creds" } },
                { "name": "scratch", "emptyDir": {} },
            ],
            "containers": [{
                "name": "main",
                "image": "riffle-testbed-probe:test",
                "command": ["sh", "-c", "cat $RIFFLE_MOUNT_ROOT/etc/cfg/greeting; echo; cat \"$1\"; echo; echo pw=$PASSWORD mode=$MODE name=$POD_NAME ns=$MY_NS sa=$SA; test -d $RIFFLE_MOUNT_ROOT/scratch && test -f \"$KUBECONFIG\" && echo ok", "sh", "/etc/creds/password"],
                "env": [
                    { "name": "PASSWORD", "valueFrom": { "secretKeyRef": { "name": "creds", "key": "password" } } },
                    { "name": "MY_NS", "valueFrom": { "fieldRef": { "fieldPath": "metadata.namespace" } } },
                    { "name": "SA", "valueFrom": { "fieldRef": { "fieldPath": "spec.serviceAccountName" } } },
                ],
                "envFrom": [{ "configMapRef": { "name": "cfg" } }],
                "volumeMounts": [
                    { "name": "cfg", "mountPath": "/etc/cfg" },
                    { "name": "creds", "mountPath": "/etc/creds", "readOnly": true },
                    { "name": "scratch", "mountPath": "/scratch" },
                ],
            }],
        }),
    ))
    .await;
    let pod = env
        .wait_pod("files", "files pod finished", |p| {
            matches!(phase(p), "Succeeded" | "Failed")
        })
        .await;
    let logs = env.logs("files");
    assert_eq!(phase(&pod), "Succeeded", "logs: {logs}");
    assert!(logs.contains("hello-from-cm\ns3cret\n"), "{logs}");
    assert!(
        logs.contains(&format!(
            "pw=s3cret mode=fast name=files ns={} sa=default",
            env.ns
        )),
        "{logs}"
    );
    assert!(logs.contains("ok\n"), "{logs}");
    let list = env.api::<Pod>().list(&ListParams::default()).await.unwrap();
    assert_eq!(list.items.len(), 1);
}

#[tokio::test]
async fn a_restarted_agent_kills_what_its_sigkilled_predecessor_left_running() {
    let mut env = TestEnv::start("reap").await;
    let pod = env.pod(
        "server",
        json!({
            "containers": [{
                "name": "main",
                "image": "riffle-testbed-probe:test",
                "args": ["serve", "--port", "8080"],
                "env": [{ "name": "POD_IP", "valueFrom": { "fieldRef": { "fieldPath": "status.podIP" } } }]
            }]
        }),
    );
    env.create_pod(pod).await;
    env.wait_pod("server", "pod Running", |p| phase(p) == "Running")
        .await;
    let old = read_pid(&state_dir(), &env.ns, "server", None).unwrap();

    env.kill_agent();
    assert!(
        process_exists(old),
        "a SIGKILLed agent cannot stop its pods' processes"
    );
    env.agent = Some(env.spawn_agent());
    // The new agent kills the leftover before it runs the pod again.
    let deadline = std::time::Instant::now() + TIMEOUT;
    let mut current = old;
    while process_exists(old) || current == old || !process_exists(current) {
        assert!(
            std::time::Instant::now() < deadline,
            "old process {old} alive: {}, current pid {current}\n--- agent log ---\n{}",
            process_exists(old),
            env.agent_log()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
        current = read_pid(&state_dir(), &env.ns, "server", None).unwrap_or(old);
    }
    assert!(
        env.agent_log()
            .contains("killing a container a previous agent left running"),
        "{}",
        env.agent_log()
    );
}
