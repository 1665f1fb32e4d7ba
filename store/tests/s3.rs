//! The S3 store against the test bed's MinIO: small and multipart uploads, concurrent
//! uploads, paginated listing, server-side (multipart) copies, deletes, missing objects, and
//! a bounded failure against an endpoint nobody listens on.
//!
//! Needs the test bed: `make testbed-up && eval "$(e2e/testbed/testbed env)"`. Credentials
//! reach the store through the AWS default chain (the environment), the endpoint through
//! `S3Config`. Plain `#[test]`s: the store is blocking and must not run inside a runtime.

use std::path::Path;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use riffle_store::{ObjectStore, S3Config, S3Store, StoreError};

const MIB: usize = 1024 * 1024;

/// A variable printed by `testbed env`; a missing one is a failure, not a skip.
fn env(name: &str) -> String {
    std::env::var(name).unwrap_or_else(|_| {
        panic!(
            "{name} is not set: test bed not running: run `make testbed-up` \
             and `eval \"$(e2e/testbed/testbed env)\"`"
        )
    })
}

fn check_env() {
    for name in [
        "S3_ENDPOINT",
        "S3_BUCKET",
        "AWS_REGION",
        "AWS_ACCESS_KEY_ID",
        "AWS_SECRET_ACCESS_KEY",
    ] {
        env(name);
    }
}

/// Unique per test and run, so re-runs and concurrent runs never see each other's objects.
fn unique_prefix(test: &str) -> String {
    let nanos = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_nanos();
    format!("riffle-store-test-{}-{nanos}/{test}", std::process::id())
}

fn config() -> S3Config {
    S3Config {
        endpoint: Some(env("S3_ENDPOINT")),
        // Region from the default chain (AWS_REGION).
        region: None,
        force_path_style: true,
    }
}

fn store(prefix: &str) -> S3Store {
    check_env();
    S3Store::new(&env("S3_BUCKET"), prefix, config()).expect("open S3 store")
}

/// Incompressible, reproducible bytes.
fn data(len: usize, seed: u64) -> Vec<u8> {
    let mut x = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    (0..len)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            (x >> 24) as u8
        })
        .collect()
}

/// An SDK client of our own, to look at what the store wrote (ETags, pending uploads).
struct Raw {
    rt: tokio::runtime::Runtime,
    client: aws_sdk_s3::Client,
    bucket: String,
}

impl Raw {
    fn new() -> Self {
        check_env();
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        let http = aws_smithy_http_client::Builder::new()
            .tls_provider(aws_smithy_http_client::tls::Provider::Rustls(
                aws_smithy_http_client::tls::rustls_provider::CryptoMode::Ring,
            ))
            .build_https();
        let sdk = rt.block_on(
            aws_config::defaults(aws_config::BehaviorVersion::latest())
                .http_client(http)
                .load(),
        );
        let conf = aws_sdk_s3::config::Builder::from(&sdk)
            .endpoint_url(env("S3_ENDPOINT"))
            .force_path_style(true)
            .build();
        Self {
            rt,
            client: aws_sdk_s3::Client::from_conf(conf),
            bucket: env("S3_BUCKET"),
        }
    }

    fn etag(&self, object: &str) -> String {
        let head = self
            .rt
            .block_on(
                self.client
                    .head_object()
                    .bucket(&self.bucket)
                    .key(object)
                    .send(),
            )
            .unwrap_or_else(|e| panic!("head {object}: {e:?}"));
        head.e_tag().expect("etag").trim_matches('"').to_string()
    }

    fn pending_uploads(&self, prefix: &str) -> usize {
        let out = self
            .rt
            .block_on(
                self.client
                    .list_multipart_uploads()
                    .bucket(&self.bucket)
                    .prefix(prefix)
                    .send(),
            )
            .expect("list multipart uploads");
        out.uploads().len()
    }
}

fn write(path: &Path, bytes: &[u8]) {
    std::fs::write(path, bytes).unwrap();
}

#[test]
fn put_get_small_and_multipart() {
    let prefix = unique_prefix("put-get");
    let s = store(&prefix)
        .with_multipart_threshold(6 * MIB as u64)
        .with_part_size(5 * MIB as u64);
    let dir = tempfile::tempdir().unwrap();

    // Small: one PutObject from the file.
    let small = data(100_000, 1);
    write(&dir.path().join("small"), &small);
    s.put_file("chk-1/small.sst", &dir.path().join("small"))
        .unwrap();
    assert_eq!(s.get_bytes("chk-1/small.sst").unwrap(), small);

    // Large: 13 MiB in 5 MiB parts (5 + 5 + 3).
    let big = data(13 * MIB + 12_345, 2);
    write(&dir.path().join("big"), &big);
    s.put_file("chk-1/big.sst", &dir.path().join("big"))
        .unwrap();
    let raw = Raw::new();
    assert!(
        raw.etag(&format!("{prefix}/chk-1/big.sst")).ends_with("-3"),
        "a 13 MiB file over a 6 MiB threshold uploads in 3 parts"
    );
    assert!(
        raw.etag(&format!("{prefix}/chk-1/small.sst"))
            .find('-')
            .is_none(),
        "a small file is a single PutObject"
    );
    assert_eq!(
        raw.pending_uploads(&prefix),
        0,
        "no multipart upload left open"
    );

    // Byte-exact back, streamed to a file and whole.
    let out = dir.path().join("down").join("big.sst");
    std::fs::create_dir(out.parent().unwrap()).unwrap();
    s.get_file("chk-1/big.sst", &out).unwrap();
    assert!(std::fs::read(&out).unwrap() == big, "big file differs");
    assert!(s.get_bytes("chk-1/big.sst").unwrap() == big);
    s.get_file("chk-1/small.sst", &out).unwrap();
    assert_eq!(std::fs::read(&out).unwrap(), small, "get_file replaces");
    let leftovers: Vec<_> = std::fs::read_dir(out.parent().unwrap())
        .unwrap()
        .map(|e| e.unwrap().file_name())
        .collect();
    assert_eq!(leftovers, ["big.sst"], "no temporary download files left");

    // Bytes, overwrite, empty object.
    s.put_bytes("chk-1/_manifest.json", b"{\"v\":1}").unwrap();
    s.put_bytes("chk-1/_manifest.json", b"{\"v\":2}").unwrap();
    assert_eq!(s.get_bytes("chk-1/_manifest.json").unwrap(), b"{\"v\":2}");
    s.put_bytes("chk-1/empty", b"").unwrap();
    assert!(s.get_bytes("chk-1/empty").unwrap().is_empty());

    assert_eq!(
        s.list("chk-1/").unwrap(),
        [
            "chk-1/_manifest.json",
            "chk-1/big.sst",
            "chk-1/empty",
            "chk-1/small.sst"
        ]
    );
    assert_eq!(
        s.location("chk-1/big.sst"),
        format!("s3://{}/{prefix}/chk-1/big.sst", env("S3_BUCKET"))
    );
    for k in s.list("").unwrap() {
        s.delete(&k).unwrap();
    }
    assert!(s.list("").unwrap().is_empty());

    // Invalid keys never reach S3.
    assert!(matches!(
        s.put_bytes("../escape", b"x"),
        Err(StoreError::InvalidKey(_))
    ));
    // A missing local file is an I/O error on that file.
    match s.put_file("x", &dir.path().join("missing")) {
        Err(StoreError::Io { path, .. }) => assert_eq!(path, dir.path().join("missing")),
        other => panic!("expected an I/O error, got {other:?}"),
    }
}

#[test]
fn put_files_uploads_concurrently() {
    let prefix = unique_prefix("put-files");
    let s = store(&prefix)
        .with_multipart_threshold(6 * MIB as u64)
        .with_part_size(5 * MIB as u64);
    let dir = tempfile::tempdir().unwrap();
    let mut files = Vec::new();
    let mut bodies = Vec::new();
    for i in 0..30 {
        // Two over the multipart threshold among small ones.
        let len = if i % 15 == 7 {
            11 * MIB
        } else {
            1000 + i * 997
        };
        let body = data(len, 100 + i as u64);
        let path = dir.path().join(format!("f{i}"));
        write(&path, &body);
        files.push((format!("shared/{i:03}.sst"), path));
        bodies.push(body);
    }
    let start = Instant::now();
    s.put_files(&files).unwrap();
    eprintln!("put_files: 30 files in {:?}", start.elapsed());
    let keys = s.list("shared/").unwrap();
    assert_eq!(
        keys,
        files.iter().map(|(k, _)| k.clone()).collect::<Vec<_>>()
    );
    for ((key, _), body) in files.iter().zip(&bodies) {
        assert!(&s.get_bytes(key).unwrap() == body, "{key} differs");
    }

    // A missing file fails the batch with its error; the others still land.
    let mut bad = files[..3].to_vec();
    bad.insert(1, ("shared/missing".into(), dir.path().join("missing")));
    match s.put_files(&bad) {
        Err(StoreError::Io { path, .. }) => assert_eq!(path, dir.path().join("missing")),
        other => panic!("expected an I/O error, got {other:?}"),
    }
    assert!(s.put_files(&[]).is_ok());

    for k in keys {
        s.delete(&k).unwrap();
    }
    assert!(s.list("").unwrap().is_empty());
}

#[test]
fn list_paginates_past_1000_keys() {
    let prefix = unique_prefix("list");
    let s = store(&prefix);
    // A sibling prefix sharing the string prefix: never listed by `s`.
    let sibling = store(&format!("{prefix}x"));
    sibling.put_bytes("chk-1/a", b"x").unwrap();

    let dir = tempfile::tempdir().unwrap();
    let tiny = dir.path().join("tiny");
    write(&tiny, b"t");
    let n = 1100;
    let files: Vec<_> = (0..n)
        .map(|i| (format!("chk-{}/k-{i:05}", i % 3), tiny.clone()))
        .collect();
    let start = Instant::now();
    s.put_files(&files).unwrap();
    eprintln!("put_files: {n} tiny files in {:?}", start.elapsed());

    let mut expected: Vec<String> = files.iter().map(|(k, _)| k.clone()).collect();
    expected.sort();
    let start = Instant::now();
    let all = s.list("").unwrap();
    eprintln!("list: {} keys in {:?}", all.len(), start.elapsed());
    assert_eq!(all.len(), n, "every page listed");
    assert_eq!(all, expected);
    let chk1 = s.list("chk-1/").unwrap();
    assert_eq!(
        chk1,
        expected
            .iter()
            .filter(|k| k.starts_with("chk-1/"))
            .cloned()
            .collect::<Vec<_>>()
    );
    assert_eq!(
        s.list("chk-1/k-0000").unwrap(),
        ["chk-1/k-00001", "chk-1/k-00004", "chk-1/k-00007"]
    );
    assert!(s.list("nothing-here/").unwrap().is_empty());
    assert_eq!(sibling.list("").unwrap(), ["chk-1/a"]);

    // Delete from several threads at once: the store is shared, blocking and Sync.
    std::thread::scope(|scope| {
        for chunk in all.chunks(n / 8 + 1) {
            let s = &s;
            scope.spawn(move || {
                for k in chunk {
                    s.delete(k).unwrap();
                }
            });
        }
    });
    assert!(s.list("").unwrap().is_empty());
    sibling.delete("chk-1/a").unwrap();
}

#[test]
fn copy_delete_and_not_found() {
    let prefix = unique_prefix("copy");
    let s = store(&prefix).with_copy_part_size(5 * MIB as u64);
    let dir = tempfile::tempdir().unwrap();

    // Small: one CopyObject; keys that need URL-encoding in the copy source.
    s.put_bytes("shared/a b+c=d.sst", b"small").unwrap();
    s.copy("shared/a b+c=d.sst", "sp-1/a b+c=d.sst").unwrap();
    assert_eq!(s.get_bytes("sp-1/a b+c=d.sst").unwrap(), b"small");
    s.copy("shared/a b+c=d.sst", "shared/a b+c=d.sst").unwrap();
    assert_eq!(s.get_bytes("shared/a b+c=d.sst").unwrap(), b"small");

    // Large: over the copy part size, an UploadPartCopy per 5 MiB.
    let big = data(12 * MIB + 1, 3);
    write(&dir.path().join("big"), &big);
    s.put_file("shared/big.sst", &dir.path().join("big"))
        .unwrap();
    s.copy("shared/big.sst", "sp-1/big.sst").unwrap();
    assert!(s.get_bytes("sp-1/big.sst").unwrap() == big, "copy differs");
    let raw = Raw::new();
    assert!(
        raw.etag(&format!("{prefix}/sp-1/big.sst")).ends_with("-3"),
        "a 12 MiB object copies in 3 parts of 5 MiB"
    );
    assert_eq!(
        raw.pending_uploads(&prefix),
        0,
        "no multipart upload left open"
    );

    // Missing objects.
    let e = s.copy("shared/missing", "sp-1/missing").unwrap_err();
    assert!(e.is_not_found(), "copy of a missing key: {e}");
    let e = s.get_bytes("shared/missing").unwrap_err();
    assert!(e.is_not_found(), "get of a missing key: {e}");
    assert_eq!(
        e.to_string(),
        format!(
            "s3://{}/{prefix}/shared/missing: no such object",
            env("S3_BUCKET")
        )
    );
    let local = dir.path().join("missing");
    let e = s.get_file("shared/missing", &local).unwrap_err();
    assert!(e.is_not_found(), "get_file of a missing key: {e}");
    assert!(!local.exists(), "a failed download leaves no file");
    assert_eq!(
        std::fs::read_dir(dir.path()).unwrap().count(),
        1,
        "nor a temporary one"
    );

    // Delete: present, again, never existed.
    s.delete("sp-1/big.sst").unwrap();
    s.delete("sp-1/big.sst").unwrap();
    s.delete("never/was").unwrap();
    assert!(s.get_bytes("sp-1/big.sst").unwrap_err().is_not_found());

    for k in s.list("").unwrap() {
        s.delete(&k).unwrap();
    }
    assert!(s.list("").unwrap().is_empty());
}

#[test]
fn bucket_root_and_open() {
    check_env();
    let bucket = env("S3_BUCKET");
    let name = unique_prefix("root").replace('/', "-");
    // prefix "" is the bucket root; open() parses s3://bucket[/prefix].
    let root = riffle_store::open(&format!("s3://{bucket}"), Some(&config())).unwrap();
    root.put_bytes(&name, b"root").unwrap();
    assert_eq!(root.list(&name).unwrap(), [name.as_str()]);
    assert_eq!(root.location(&name), format!("s3://{bucket}/{name}"));

    let (dir, file) = name.split_at(name.len() / 2);
    let nested = riffle_store::open(&format!("s3://{bucket}/{dir}/"), Some(&config())).unwrap();
    nested.put_bytes(&format!("x/{file}"), b"nested").unwrap();
    assert_eq!(
        root.get_bytes(&format!("{dir}/x/{file}")).unwrap(),
        b"nested"
    );
    assert_eq!(nested.list("").unwrap(), [format!("x/{file}")]);
    nested.delete(&format!("x/{file}")).unwrap();
    root.delete(&name).unwrap();
    assert!(root.get_bytes(&name).unwrap_err().is_not_found());
}

#[test]
fn unreachable_endpoint_fails_in_bounded_time() {
    check_env();
    // A port nobody listens on: bind one, then let it go.
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let cfg = S3Config {
        endpoint: Some(format!("http://127.0.0.1:{port}")),
        region: Some("us-east-1".into()),
        force_path_style: true,
    };
    let s = S3Store::new("riffle", "down", cfg).expect("opening does not connect");
    let dir = tempfile::tempdir().unwrap();
    write(&dir.path().join("f"), b"x");
    type Op<'a> = &'a dyn Fn() -> Result<(), StoreError>;
    let ops: [(&str, Op); 6] = [
        ("put", &|| s.put_bytes("k", b"x")),
        ("put_file", &|| s.put_file("k", &dir.path().join("f"))),
        ("get", &|| s.get_bytes("k").map(drop)),
        ("list", &|| s.list("").map(drop)),
        ("delete", &|| s.delete("k")),
        ("copy", &|| s.copy("k", "k2")),
    ];
    for (op, call) in ops {
        let start = Instant::now();
        let result = call();
        let elapsed = start.elapsed();
        match result {
            Err(StoreError::S3 { message, .. }) => {
                eprintln!("{op} against a closed port failed in {elapsed:?}: {message}")
            }
            other => panic!("{op} against a closed port: expected an S3 error, got {other:?}"),
        }
        // Connection refused, 3 attempts with backoff: a few seconds.
        assert!(
            elapsed < Duration::from_secs(15),
            "{op} against a closed port took {elapsed:?}"
        );
    }
}

#[test]
fn hung_endpoint_fails_in_bounded_time() {
    check_env();
    // Accepts connections (the kernel does, into the backlog) and never answers: a stopped
    // server. The attempt timeout, not the connect timeout, has to end each call.
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let cfg = S3Config {
        endpoint: Some(format!("http://{}", listener.local_addr().unwrap())),
        region: Some("us-east-1".into()),
        force_path_style: true,
    };
    let s = S3Store::new("riffle", "hung", cfg)
        .unwrap()
        .with_timeouts(Duration::from_secs(1), Duration::from_secs(1));
    let start = Instant::now();
    let e = s.get_bytes("k").unwrap_err();
    let elapsed = start.elapsed();
    eprintln!("get against a hung endpoint failed in {elapsed:?}: {e}");
    assert!(matches!(e, StoreError::S3 { .. }), "{e:?}");
    // 3 attempts of 1 s plus backoff.
    assert!(
        elapsed >= Duration::from_secs(3) && elapsed < Duration::from_secs(15),
        "get against a hung endpoint took {elapsed:?}"
    );
    drop(listener);
}
