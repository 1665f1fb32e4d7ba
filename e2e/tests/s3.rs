//! S3 round trip against the test bed's MinIO: put, get, list, delete.
//!
//! Needs the test bed: `make testbed-up && eval "$(e2e/testbed/testbed env)"`.

use std::time::{SystemTime, UNIX_EPOCH};

use aws_sdk_s3::config::{BehaviorVersion, Credentials, Region};
use aws_sdk_s3::primitives::ByteStream;
use aws_sdk_s3::Client;

/// A variable printed by `testbed env`; a missing one is a failure, not a skip.
fn env(name: &str) -> String {
    std::env::var(name).unwrap_or_else(|_| {
        panic!(
            "{name} is not set: test bed not running: run `make testbed-up` \
             and `eval \"$(e2e/testbed/testbed env)\"`"
        )
    })
}

/// Static credentials and an explicit endpoint: nothing is looked up anywhere
/// else (no profile files, no instance metadata). MinIO needs path-style URLs.
fn client() -> Client {
    let creds = Credentials::new(
        env("AWS_ACCESS_KEY_ID"),
        env("AWS_SECRET_ACCESS_KEY"),
        None,
        None,
        "testbed",
    );
    // The workspace builds the SDK without its default (aws-lc) HTTPS client: rustls<ring>.
    let http = aws_smithy_http_client::Builder::new()
        .tls_provider(aws_smithy_http_client::tls::Provider::Rustls(
            aws_smithy_http_client::tls::rustls_provider::CryptoMode::Ring,
        ))
        .build_https();
    let config = aws_sdk_s3::Config::builder()
        .behavior_version(BehaviorVersion::latest())
        .http_client(http)
        .endpoint_url(env("S3_ENDPOINT"))
        .region(Region::new(env("AWS_REGION")))
        .credentials_provider(creds)
        .force_path_style(true)
        .build();
    Client::from_conf(config)
}

async fn list_keys(s3: &Client, bucket: &str, prefix: &str) -> Vec<String> {
    let out = s3
        .list_objects_v2()
        .bucket(bucket)
        .prefix(prefix)
        .send()
        .await
        .unwrap_or_else(|e| panic!("list {bucket}/{prefix}: {e:?}"));
    out.contents()
        .iter()
        .filter_map(|o| o.key().map(str::to_owned))
        .collect()
}

#[tokio::test]
async fn put_get_list_delete_round_trip() {
    let s3 = client();
    let bucket = env("S3_BUCKET");
    let nanos = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_nanos();
    // Unique per run so re-runs (and concurrent runs) never see each other's objects.
    let prefix = format!("e2e-s3-{}-{nanos}/", std::process::id());
    let keys = [format!("{prefix}a.bin"), format!("{prefix}nested/b.bin")];
    let bodies: [Vec<u8>; 2] = [
        b"hello riffle".to_vec(),
        (0..=255u8).cycle().take(1 << 20).collect(),
    ];

    for (key, body) in keys.iter().zip(&bodies) {
        s3.put_object()
            .bucket(&bucket)
            .key(key)
            .body(ByteStream::from(body.clone()))
            .send()
            .await
            .unwrap_or_else(|e| {
                panic!("put {bucket}/{key} (is the test bed running? `make testbed-up`): {e:?}")
            });
    }

    for (key, body) in keys.iter().zip(&bodies) {
        let got = s3
            .get_object()
            .bucket(&bucket)
            .key(key)
            .send()
            .await
            .expect("get_object");
        let data = got.body.collect().await.expect("read body").into_bytes();
        assert_eq!(data.as_ref(), body.as_slice(), "body of {key} differs");
    }

    let mut listed = list_keys(&s3, &bucket, &prefix).await;
    listed.sort();
    assert_eq!(
        listed,
        keys.to_vec(),
        "list must return exactly the objects just put"
    );

    for key in &keys {
        s3.delete_object()
            .bucket(&bucket)
            .key(key)
            .send()
            .await
            .expect("delete_object");
    }
    assert!(
        list_keys(&s3, &bucket, &prefix).await.is_empty(),
        "objects left after delete"
    );

    let err = s3
        .get_object()
        .bucket(&bucket)
        .key(&keys[0])
        .send()
        .await
        .expect_err("get after delete must fail");
    assert!(
        err.as_service_error().is_some_and(|e| e.is_no_such_key()),
        "expected NoSuchKey after delete, got {err:?}"
    );
}
