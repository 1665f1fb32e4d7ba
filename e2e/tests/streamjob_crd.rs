//! The StreamJob CRD on the test bed's real API server: it installs, a good spec is
//! accepted and defaulted, bad specs are refused with a message that says what to fix, and
//! the scale subresource drives `parallelism` (`kubectl scale sj/NAME --replicas N`).

use std::panic::AssertUnwindSafe;

use futures::FutureExt;

use k8s_openapi::api::core::v1::Namespace;
use kube::api::{ApiResource, DeleteParams, DynamicObject, Patch, PatchParams, PostParams};
use kube::{Api, Client, CustomResourceExt};
use riffle_e2e::testbed::{client, install_crd, kubeconfig_path};
use riffle_operator::crd::StreamJob;
use serde_json::{json, Value};

fn good_spec() -> Value {
    json!({
        "image": "riffle-runtime:test",
        "parallelism": 2,
        "keyGroups": 8,
        "source": {"topics": ["clicks"]},
        "sink": {"recommendations": "recs", "late": "late", "deadLetter": "dlq"},
        "kafka": {"bootstrapServers": "127.0.0.1:19092"},
        "storage": {"checkpoints": "s3://riffle/jobs/t"},
        "dataflow": {"windowSize": "10m", "windowSlide": "1m"}
    })
}

fn job(name: &str, spec: Value) -> DynamicObject {
    let ar = ApiResource::erase::<StreamJob>(&());
    let mut o = DynamicObject::new(name, &ar);
    o.data = json!({ "spec": spec });
    o
}

#[tokio::test]
async fn the_crd_installs_and_the_api_server_enforces_its_rules() {
    let client = client(&kubeconfig_path()).await;
    install_crd(&client, &StreamJob::crd()).await;
    let ns = format!("sj-crd-{}", std::process::id());
    let namespaces = Api::<Namespace>::all(client.clone());
    namespaces
        .create(
            &PostParams::default(),
            &serde_json::from_value(json!({"metadata": {"name": ns}})).unwrap(),
        )
        .await
        .unwrap();
    // The namespace goes whatever the outcome (the client cannot be used from a Drop).
    let outcome = AssertUnwindSafe(checks(&client, &ns)).catch_unwind().await;
    let _ = namespaces.delete(&ns, &DeleteParams::default()).await;
    if let Err(panic) = outcome {
        std::panic::resume_unwind(panic);
    }
}

async fn checks(client: &Client, ns: &str) {
    let ar = ApiResource::erase::<StreamJob>(&());
    let api: Api<DynamicObject> = Api::namespaced_with(client.clone(), ns, &ar);
    let pp = PostParams::default();

    // A good spec is accepted, and the server fills in the defaults.
    let created = api.create(&pp, &job("good", good_spec())).await.unwrap();
    let spec = &created.data["spec"];
    assert_eq!(spec["upgradeMode"], "savepoint", "{spec}");
    assert_eq!(spec["state"], "running");
    assert_eq!(spec["commitInterval"], "100ms");
    assert_eq!(spec["dataflow"]["historyLength"], 20);
    // The typed view reads what the server stored.
    let typed: Api<StreamJob> = Api::namespaced(client.clone(), ns);
    let sj = typed.get("good").await.unwrap();
    assert_eq!(sj.spec.parallelism, 2);
    assert_eq!(sj.spec.dataflow.window_size.0, 600_000);

    // What `kubectl get sj` prints: the server's table view of the resource.
    let table: Value = client
        .request(
            http::Request::get(format!(
                "/apis/riffle.dev/v1alpha1/namespaces/{ns}/streamjobs"
            ))
            .header("Accept", "application/json;as=Table;v=v1;g=meta.k8s.io")
            .body(Vec::new())
            .unwrap(),
        )
        .await
        .unwrap();
    let columns: Vec<&str> = table["columnDefinitions"]
        .as_array()
        .unwrap()
        .iter()
        .map(|c| c["name"].as_str().unwrap())
        .collect();
    for c in ["Name", "Phase", "Parallelism", "Lag", "Age"] {
        assert!(columns.contains(&c), "no {c} column: {columns:?}");
    }
    assert_eq!(table["rows"][0]["cells"][0], "good");

    // The example in the repository is a valid StreamJob.
    let example: DynamicObject = serde_yaml::from_str(
        &std::fs::read_to_string(concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/../examples/streamjob.yaml"
        ))
        .unwrap(),
    )
    .unwrap();
    api.create(&pp, &example)
        .await
        .unwrap_or_else(|e| panic!("examples/streamjob.yaml refused: {e}"));

    // Bad specs: refused, with the message of the rule.
    let cases: Vec<(&str, Value, &str)> = vec![
        (
            "window",
            json!({"dataflow": {"windowSize": "10m", "windowSlide": "3m"}}),
            "windowSize must be a whole multiple of dataflow.windowSlide",
        ),
        (
            "parallelism",
            json!({"parallelism": 9}),
            "parallelism must not exceed keyGroups",
        ),
        (
            "duration",
            json!({"commitInterval": "ten seconds"}),
            "commitInterval",
        ),
        (
            "storage",
            json!({"storage": {"checkpoints": "/tmp/x"}}),
            "storage.checkpoints",
        ),
        (
            "autoscaler",
            json!({"autoscaler": {"minParallelism": 4, "maxParallelism": 2}}),
            "minParallelism must not exceed autoscaler.maxParallelism",
        ),
        ("mode", json!({"upgradeMode": "yolo"}), "upgradeMode"),
    ];
    for (name, patch, message) in cases {
        let mut spec = good_spec();
        merge(&mut spec, &patch);
        let err = api
            .create(&pp, &job(&format!("bad-{name}"), spec))
            .await
            .expect_err(&format!("{name}: accepted {patch}"));
        let text = err.to_string();
        assert!(
            text.contains(message),
            "{name}: the refusal does not say {message:?}: {text}"
        );
    }

    // keyGroups is immutable once set.
    let err = api
        .patch(
            "good",
            &PatchParams::default(),
            &Patch::Merge(json!({"spec": {"keyGroups": 16}})),
        )
        .await
        .expect_err("keyGroups changed");
    assert!(err.to_string().contains("keyGroups is fixed"), "{err}");

    // The scale subresource: what `kubectl scale sj/good --replicas 4` does.
    let scaled = api
        .patch_scale(
            "good",
            &PatchParams::default(),
            &Patch::Merge(json!({"spec": {"replicas": 4}})),
        )
        .await
        .unwrap();
    assert_eq!(scaled.spec.unwrap().replicas, Some(4));
    assert_eq!(typed.get("good").await.unwrap().spec.parallelism, 4);
    let err = api
        .patch_scale(
            "good",
            &PatchParams::default(),
            &Patch::Merge(json!({"spec": {"replicas": 9}})),
        )
        .await
        .expect_err("scaled beyond keyGroups");
    assert!(
        err.to_string().contains("must not exceed keyGroups"),
        "{err}"
    );
}

/// JSON merge of `patch` into `base` (objects merge, anything else replaces).
fn merge(base: &mut Value, patch: &Value) {
    match (base, patch) {
        (Value::Object(b), Value::Object(p)) => {
            for (k, v) in p {
                merge(b.entry(k.clone()).or_insert(Value::Null), v);
            }
        }
        (b, p) => *b = p.clone(),
    }
}
