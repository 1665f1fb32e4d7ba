//! S3 and S3-compatible stores (MinIO): `s3://bucket/prefix`.
//!
//! The [`ObjectStore`] interface is blocking; the store owns a small multi-thread tokio
//! runtime and every call spawns its work there and parks the calling thread until it is
//! done. Any thread can call it: the runtime's uploader thread, a test, even (at the cost of
//! blocking one worker) a task of another tokio runtime, because nothing here enters the
//! caller's runtime.
//!
//! - Credentials come from the AWS default chain (environment, profile files, web identity /
//!   IRSA, container and instance metadata). The region is [`S3Config::region`], else the
//!   default chain, else `us-east-1`. [`S3Config::endpoint`] and
//!   [`S3Config::force_path_style`] point the client at MinIO and friends.
//! - TLS is rustls with the `ring` provider, the same one kube uses, through an explicit
//!   HTTP client: the SDK's default client would pull in `aws-lc-rs`. Proxy environment
//!   variables (`HTTPS_PROXY`, ...) are not consulted.
//!   Without a configured region the default chain may probe instance metadata (IMDS),
//!   which costs a moment when opening the store off EC2.
//! - Every request attempt is bounded (3 s to connect, 30 s per attempt, at most 3 attempts
//!   with the standard backoff; see [`S3Store::with_timeouts`]): a refused connection fails
//!   within seconds, an endpoint that accepts and never answers (a stopped server) within
//!   about 100 s, never a hang. Streamed bodies are guarded by the SDK's stalled-stream
//!   protection. Callers retry at their level.
//! - `put_files` runs 8 uploads at a time and returns the first error; `get_file` streams to
//!   a temporary file beside the target and renames it into place.
//! - Files larger than the multipart threshold (16 MiB) upload in parts (16 MiB, 4 at a time,
//!   CRC32-checksummed); a failed upload is aborted. An upload whose process dies midway
//!   leaves an incomplete multipart upload behind: give the bucket a lifecycle rule that
//!   aborts incomplete multipart uploads after a day or so.
//! - Copies are server-side: one CopyObject up to the copy part size (128 MiB), above that a
//!   multipart copy (UploadPartCopy, 4 parts at a time), so objects of any size (up to S3's
//!   5 TiB) copy and no single request has to move more than 128 MiB inside the attempt
//!   timeout. A multipart copy does not carry the source's user metadata or content type
//!   over; Riffle stores none.

use std::future::Future;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use aws_config::retry::RetryConfig;
use aws_config::timeout::TimeoutConfig;
use aws_config::BehaviorVersion;
use aws_sdk_s3::config::http::HttpResponse;
use aws_sdk_s3::config::Region;
use aws_sdk_s3::error::{DisplayErrorContext, ProvideErrorMetadata, SdkError};
use aws_sdk_s3::primitives::{ByteStream, Length};
use aws_sdk_s3::types::{ChecksumAlgorithm, CompletedMultipartUpload, CompletedPart};
use aws_sdk_s3::Client;
use aws_smithy_http_client::tls;
use futures::{StreamExt, TryStreamExt};
use riffle_config::S3Config;
use tokio::io::AsyncWriteExt;

use crate::{check_key, IoContext, ObjectStore, Result, StoreError};

const MIB: u64 = 1024 * 1024;
/// S3's smallest part (all but the last).
const MIN_PART_SIZE: u64 = 5 * MIB;
/// S3's largest part, and its largest single PutObject / CopyObject.
const MAX_PART_SIZE: u64 = 5 * 1024 * MIB;
/// S3's most parts in one multipart upload.
const MAX_PARTS: u64 = 10_000;

const DEFAULT_MULTIPART_THRESHOLD: u64 = 16 * MIB;
const DEFAULT_PART_SIZE: u64 = 16 * MIB;
const DEFAULT_COPY_PART_SIZE: u64 = 128 * MIB;
/// Parts of one multipart upload or copy in flight at once.
const PART_CONCURRENCY: usize = 4;
/// Files of one `put_files` in flight at once.
const FILE_CONCURRENCY: usize = 8;

const CONNECT_TIMEOUT: Duration = Duration::from_secs(3);
const ATTEMPT_TIMEOUT: Duration = Duration::from_secs(30);
const MAX_ATTEMPTS: u32 = 3;
const RUNTIME_THREADS: usize = 2;
const DEFAULT_REGION: &str = "us-east-1";

pub struct S3Store {
    inner: Arc<Inner>,
    /// Always `Some` until drop, which shuts it down without blocking.
    rt: Option<tokio::runtime::Runtime>,
}

struct Inner {
    client: Client,
    bucket: String,
    /// No leading or trailing `/`; "" is the bucket root.
    prefix: String,
    multipart_threshold: u64,
    part_size: u64,
    copy_part_size: u64,
}

impl S3Store {
    pub fn new(bucket: &str, prefix: &str, cfg: S3Config) -> Result<Self> {
        let prefix = prefix.trim_matches('/').to_string();
        let location = format!("s3://{bucket}/{prefix}");
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(RUNTIME_THREADS)
            .thread_name("riffle-s3")
            .enable_all()
            .build()
            .map_err(|e| StoreError::S3 {
                op: "open",
                location: location.clone(),
                message: format!("cannot start the S3 client runtime: {e}"),
            })?;
        let client = futures::executor::block_on(rt.spawn(make_client(cfg))).map_err(|e| {
            StoreError::S3 {
                op: "open",
                location,
                message: format!("client setup failed: {e}"),
            }
        })?;
        Ok(Self {
            inner: Arc::new(Inner {
                client,
                bucket: bucket.to_string(),
                prefix,
                multipart_threshold: DEFAULT_MULTIPART_THRESHOLD,
                part_size: DEFAULT_PART_SIZE,
                copy_part_size: DEFAULT_COPY_PART_SIZE,
            }),
            rt: Some(rt),
        })
    }

    /// Files strictly larger than this upload in parts (default 16 MiB; at least 1 byte).
    pub fn with_multipart_threshold(mut self, bytes: u64) -> Self {
        self.inner_mut().multipart_threshold = bytes.max(1);
        self
    }

    /// The part size of multipart uploads (default 16 MiB, clamped to S3's 5 MiB..5 GiB; grown
    /// as needed to stay within 10,000 parts).
    pub fn with_part_size(mut self, bytes: u64) -> Self {
        self.inner_mut().part_size = bytes.clamp(MIN_PART_SIZE, MAX_PART_SIZE);
        self
    }

    /// Objects larger than this copy in parts of this size (default 128 MiB, clamped to
    /// 5 MiB..5 GiB).
    pub fn with_copy_part_size(mut self, bytes: u64) -> Self {
        self.inner_mut().copy_part_size = bytes.clamp(MIN_PART_SIZE, MAX_PART_SIZE);
        self
    }

    /// Bound each request attempt: `connect` to open the connection, `attempt` for the whole
    /// request up to its response (defaults 3 s and 30 s; 3 attempts either way).
    pub fn with_timeouts(mut self, connect: Duration, attempt: Duration) -> Self {
        let inner = self.inner_mut();
        let conf = inner
            .client
            .config()
            .to_builder()
            .timeout_config(timeouts(connect, attempt))
            .build();
        inner.client = Client::from_conf(conf);
        self
    }

    fn inner_mut(&mut self) -> &mut Inner {
        Arc::get_mut(&mut self.inner).expect("builders run before the store is shared")
    }

    /// Run `op` on the store's runtime and wait for it on the calling thread.
    fn run<T, F>(&self, op: F) -> Result<T>
    where
        F: Future<Output = Result<T>> + Send + 'static,
        T: Send + 'static,
    {
        let rt = self.rt.as_ref().expect("runtime lives until drop");
        match futures::executor::block_on(rt.spawn(op)) {
            Ok(result) => result,
            Err(e) if e.is_panic() => std::panic::resume_unwind(e.into_panic()),
            Err(e) => Err(StoreError::S3 {
                op: "run",
                location: self.location(""),
                message: format!("S3 client runtime stopped: {e}"),
            }),
        }
    }
}

impl Drop for S3Store {
    fn drop(&mut self) {
        // Not `Runtime::drop`: that blocks, and panics when the store is dropped inside
        // another runtime's task.
        if let Some(rt) = self.rt.take() {
            rt.shutdown_background();
        }
    }
}

fn timeouts(connect: Duration, attempt: Duration) -> TimeoutConfig {
    TimeoutConfig::builder()
        .connect_timeout(connect)
        .operation_attempt_timeout(attempt)
        .build()
}

async fn make_client(cfg: S3Config) -> Client {
    // rustls with ring: the provider kube uses, and no aws-lc-rs in the build.
    let http_client = aws_smithy_http_client::Builder::new()
        .tls_provider(tls::Provider::Rustls(
            tls::rustls_provider::CryptoMode::Ring,
        ))
        .build_https();
    let mut loader = aws_config::defaults(BehaviorVersion::latest())
        .http_client(http_client)
        .timeout_config(timeouts(CONNECT_TIMEOUT, ATTEMPT_TIMEOUT))
        .retry_config(RetryConfig::standard().with_max_attempts(MAX_ATTEMPTS));
    // Not a `RegionProviderChain` with `or_default_provider()`: that chain would be built
    // without the loader's HTTP client (and panic for want of one when it asks IMDS).
    if let Some(region) = &cfg.region {
        loader = loader.region(Region::new(region.clone()));
    }
    let sdk = loader.load().await;
    let mut s3 = aws_sdk_s3::config::Builder::from(&sdk).force_path_style(cfg.force_path_style);
    if sdk.region().is_none() {
        s3 = s3.region(Region::from_static(DEFAULT_REGION));
    }
    if let Some(endpoint) = &cfg.endpoint {
        s3 = s3.endpoint_url(endpoint);
    }
    tracing::debug!(
        endpoint = cfg.endpoint.as_deref().unwrap_or("(AWS)"),
        region = sdk.region().map(|r| r.as_ref()).unwrap_or(DEFAULT_REGION),
        force_path_style = cfg.force_path_style,
        "S3 client configured"
    );
    Client::from_conf(s3.build())
}

impl ObjectStore for S3Store {
    fn put_file(&self, key: &str, local: &Path) -> Result<()> {
        let (inner, key, local) = (self.inner.clone(), key.to_string(), local.to_path_buf());
        self.run(async move { inner.put_file(&key, &local).await })
    }

    fn put_files(&self, files: &[(String, PathBuf)]) -> Result<()> {
        let (inner, files) = (self.inner.clone(), files.to_vec());
        self.run(async move { inner.put_files(files).await })
    }

    fn put_bytes(&self, key: &str, bytes: &[u8]) -> Result<()> {
        let (inner, key, bytes) = (self.inner.clone(), key.to_string(), bytes.to_vec());
        self.run(async move { inner.put_bytes(&key, bytes).await })
    }

    fn get_file(&self, key: &str, local: &Path) -> Result<()> {
        let (inner, key, local) = (self.inner.clone(), key.to_string(), local.to_path_buf());
        self.run(async move { inner.get_file(&key, &local).await })
    }

    fn get_bytes(&self, key: &str) -> Result<Vec<u8>> {
        let (inner, key) = (self.inner.clone(), key.to_string());
        self.run(async move { inner.get_bytes(&key).await })
    }

    fn copy(&self, from: &str, to: &str) -> Result<()> {
        let (inner, from, to) = (self.inner.clone(), from.to_string(), to.to_string());
        self.run(async move { inner.copy(&from, &to).await })
    }

    fn list(&self, prefix: &str) -> Result<Vec<String>> {
        let (inner, prefix) = (self.inner.clone(), prefix.to_string());
        self.run(async move { inner.list(&prefix).await })
    }

    fn delete(&self, key: &str) -> Result<()> {
        let (inner, key) = (self.inner.clone(), key.to_string());
        self.run(async move { inner.delete(&key).await })
    }

    fn location(&self, key: &str) -> String {
        self.inner.location(key)
    }
}

impl Inner {
    fn location(&self, key: &str) -> String {
        format!(
            "s3://{}/{}",
            self.bucket,
            crate::join_key(&self.prefix, key)
        )
    }

    /// The bucket key of a store key.
    fn object_key(&self, key: &str) -> Result<String> {
        check_key(key)?;
        Ok(object_key(&self.prefix, key))
    }

    fn err(&self, op: &'static str, key: &str, message: impl Into<String>) -> StoreError {
        StoreError::S3 {
            op,
            location: self.location(key),
            message: message.into(),
        }
    }

    /// An SDK error as a [`StoreError`]: a missing object is [`StoreError::NotFound`].
    fn sdk_err<E>(&self, op: &'static str, key: &str, e: SdkError<E, HttpResponse>) -> StoreError
    where
        E: ProvideErrorMetadata + std::error::Error + Send + Sync + 'static,
    {
        if is_not_found(&e) {
            return StoreError::NotFound {
                location: self.location(key),
            };
        }
        self.err(op, key, DisplayErrorContext(&e).to_string())
    }

    async fn put_bytes(&self, key: &str, bytes: Vec<u8>) -> Result<()> {
        let object = self.object_key(key)?;
        let (start, len) = (Instant::now(), bytes.len());
        self.client
            .put_object()
            .bucket(&self.bucket)
            .key(&object)
            .body(ByteStream::from(bytes))
            .send()
            .await
            .map_err(|e| self.sdk_err("put", key, e))?;
        tracing::debug!(
            op = "put",
            location = %self.location(key),
            bytes = len,
            elapsed_ms = start.elapsed().as_millis() as u64,
            "S3 object written"
        );
        Ok(())
    }

    async fn put_file(&self, key: &str, local: &Path) -> Result<()> {
        let object = self.object_key(key)?;
        let start = Instant::now();
        let size = tokio::fs::metadata(local).await.at(local)?.len();
        let parts = if size > self.multipart_threshold {
            self.put_multipart(key, &object, local, size).await?
        } else {
            let body = ByteStream::from_path(local)
                .await
                .map_err(std::io::Error::other)
                .at(local)?;
            self.client
                .put_object()
                .bucket(&self.bucket)
                .key(&object)
                .body(body)
                .send()
                .await
                .map_err(|e| self.sdk_err("put", key, e))?;
            1
        };
        tracing::debug!(
            op = "put",
            location = %self.location(key),
            bytes = size,
            parts,
            elapsed_ms = start.elapsed().as_millis() as u64,
            "S3 object uploaded"
        );
        Ok(())
    }

    /// Upload `local` in parts; returns the number of parts. Aborts the upload on failure.
    async fn put_multipart(
        &self,
        key: &str,
        object: &str,
        local: &Path,
        size: u64,
    ) -> Result<usize> {
        let created = self
            .client
            .create_multipart_upload()
            .bucket(&self.bucket)
            .key(object)
            .checksum_algorithm(ChecksumAlgorithm::Crc32)
            .send()
            .await
            .map_err(|e| self.sdk_err("put", key, e))?;
        let upload_id = created
            .upload_id()
            .ok_or_else(|| self.err("put", key, "CreateMultipartUpload returned no upload id"))?
            .to_string();
        let plan = plan_parts(size, self.part_size);
        let n = plan.len();
        let uploaded = futures::stream::iter(plan)
            .map(|part| self.upload_part(key, object, &upload_id, local, part))
            .buffer_unordered(PART_CONCURRENCY)
            .try_collect::<Vec<_>>()
            .await;
        let result = match uploaded {
            Ok(parts) => self.complete(key, object, &upload_id, parts).await,
            Err(e) => Err(e),
        };
        if let Err(e) = result {
            self.abort(key, object, &upload_id).await;
            return Err(e);
        }
        Ok(n)
    }

    async fn upload_part(
        &self,
        key: &str,
        object: &str,
        upload_id: &str,
        local: &Path,
        part: Part,
    ) -> Result<CompletedPart> {
        let body = ByteStream::read_from()
            .path(local)
            .offset(part.offset)
            .length(Length::Exact(part.len))
            .build()
            .await
            .map_err(std::io::Error::other)
            .at(local)?;
        let out = self
            .client
            .upload_part()
            .bucket(&self.bucket)
            .key(object)
            .upload_id(upload_id)
            .part_number(part.number)
            .content_length(part.len as i64)
            .checksum_algorithm(ChecksumAlgorithm::Crc32)
            .body(body)
            .send()
            .await
            .map_err(|e| self.sdk_err("put part", key, e))?;
        Ok(CompletedPart::builder()
            .part_number(part.number)
            .set_e_tag(out.e_tag().map(str::to_owned))
            .set_checksum_crc32(out.checksum_crc32().map(str::to_owned))
            .build())
    }

    async fn complete(
        &self,
        key: &str,
        object: &str,
        upload_id: &str,
        mut parts: Vec<CompletedPart>,
    ) -> Result<()> {
        parts.sort_by_key(|p| p.part_number());
        self.client
            .complete_multipart_upload()
            .bucket(&self.bucket)
            .key(object)
            .upload_id(upload_id)
            .multipart_upload(
                CompletedMultipartUpload::builder()
                    .set_parts(Some(parts))
                    .build(),
            )
            .send()
            .await
            .map_err(|e| self.sdk_err("complete multipart", key, e))?;
        Ok(())
    }

    /// Best effort: a failed abort leaves an incomplete upload for the bucket's lifecycle rule.
    async fn abort(&self, key: &str, object: &str, upload_id: &str) {
        if let Err(e) = self
            .client
            .abort_multipart_upload()
            .bucket(&self.bucket)
            .key(object)
            .upload_id(upload_id)
            .send()
            .await
        {
            tracing::warn!(
                location = %self.location(key),
                upload_id,
                error = %DisplayErrorContext(&e),
                "could not abort a failed multipart upload"
            );
        }
    }

    async fn put_files(self: Arc<Self>, files: Vec<(String, PathBuf)>) -> Result<()> {
        for (key, _) in &files {
            check_key(key)?;
        }
        // After the first failure, uploads not yet started are skipped; those in flight finish
        // (or abort) rather than being cancelled midway.
        let failed = Arc::new(AtomicBool::new(false));
        let uploads: Vec<_> = files
            .into_iter()
            .map(|(key, local)| {
                let (inner, failed) = (self.clone(), failed.clone());
                async move {
                    if failed.load(Ordering::Relaxed) {
                        return Ok(());
                    }
                    let result = inner.put_file(&key, &local).await;
                    if result.is_err() {
                        failed.store(true, Ordering::Relaxed);
                    }
                    result
                }
            })
            .collect();
        let mut results = futures::stream::iter(uploads).buffer_unordered(FILE_CONCURRENCY);
        let mut first = None;
        while let Some(result) = results.next().await {
            if let Err(e) = result {
                first.get_or_insert(e);
            }
        }
        first.map_or(Ok(()), Err)
    }

    async fn get_bytes(&self, key: &str) -> Result<Vec<u8>> {
        let object = self.object_key(key)?;
        let out = self
            .client
            .get_object()
            .bucket(&self.bucket)
            .key(&object)
            .send()
            .await
            .map_err(|e| self.sdk_err("get", key, e))?;
        let bytes = out
            .body
            .collect()
            .await
            .map_err(|e| self.err("get", key, DisplayErrorContext(&e).to_string()))?;
        Ok(bytes.into_bytes().to_vec())
    }

    /// Stream the object into a temporary file beside `local`, then rename it into place.
    async fn get_file(&self, key: &str, local: &Path) -> Result<()> {
        let object = self.object_key(key)?;
        let start = Instant::now();
        let out = self
            .client
            .get_object()
            .bucket(&self.bucket)
            .key(&object)
            .send()
            .await
            .map_err(|e| self.sdk_err("get", key, e))?;
        let expected = out.content_length().and_then(|n| u64::try_from(n).ok());
        let tmp = download_tmp_path(local);
        let result = async {
            let mut file = tokio::fs::File::create(&tmp).await.at(&tmp)?;
            let mut body = out.body;
            let mut written = 0u64;
            while let Some(chunk) = body
                .try_next()
                .await
                .map_err(|e| self.err("get", key, DisplayErrorContext(&e).to_string()))?
            {
                file.write_all(&chunk).await.at(&tmp)?;
                written += chunk.len() as u64;
            }
            file.flush().await.at(&tmp)?;
            drop(file);
            if let Some(expected) = expected.filter(|&n| n != written) {
                return Err(self.err(
                    "get",
                    key,
                    format!("body ended after {written} of {expected} bytes"),
                ));
            }
            tokio::fs::rename(&tmp, local).await.at(local)?;
            Ok(written)
        }
        .await;
        match result {
            Ok(bytes) => {
                tracing::debug!(
                    op = "get",
                    location = %self.location(key),
                    bytes,
                    elapsed_ms = start.elapsed().as_millis() as u64,
                    "S3 object downloaded"
                );
                Ok(())
            }
            Err(e) => {
                let _ = tokio::fs::remove_file(&tmp).await;
                Err(e)
            }
        }
    }

    async fn copy(&self, from: &str, to: &str) -> Result<()> {
        let (src, dst) = (self.object_key(from)?, self.object_key(to)?);
        let start = Instant::now();
        let head = self
            .client
            .head_object()
            .bucket(&self.bucket)
            .key(&src)
            .send()
            .await
            .map_err(|e| self.sdk_err("copy", from, e))?;
        if src == dst {
            return Ok(()); // S3 refuses a plain copy onto itself; the file store's is a no-op.
        }
        let size = head
            .content_length()
            .and_then(|n| u64::try_from(n).ok())
            .ok_or_else(|| self.err("copy", from, "HeadObject returned no content length"))?;
        let copy_source = copy_source(&self.bucket, &src);
        let parts = if size > self.copy_part_size {
            self.copy_multipart(from, to, &dst, &copy_source, size)
                .await?
        } else {
            self.client
                .copy_object()
                .bucket(&self.bucket)
                .key(&dst)
                .copy_source(&copy_source)
                .send()
                .await
                .map_err(|e| self.sdk_err("copy", from, e))?;
            1
        };
        tracing::debug!(
            op = "copy",
            from = %self.location(from),
            to = %self.location(to),
            bytes = size,
            parts,
            elapsed_ms = start.elapsed().as_millis() as u64,
            "S3 object copied"
        );
        Ok(())
    }

    /// Server-side copy in parts (UploadPartCopy); returns the number of parts.
    async fn copy_multipart(
        &self,
        from: &str,
        to: &str,
        dst: &str,
        copy_source: &str,
        size: u64,
    ) -> Result<usize> {
        let created = self
            .client
            .create_multipart_upload()
            .bucket(&self.bucket)
            .key(dst)
            .send()
            .await
            .map_err(|e| self.sdk_err("copy", to, e))?;
        let upload_id = created
            .upload_id()
            .ok_or_else(|| self.err("copy", to, "CreateMultipartUpload returned no upload id"))?
            .to_string();
        let plan = plan_parts(size, self.copy_part_size);
        let n = plan.len();
        let copied = futures::stream::iter(plan)
            .map(|part| {
                let upload_id = &upload_id;
                async move {
                    let out = self
                        .client
                        .upload_part_copy()
                        .bucket(&self.bucket)
                        .key(dst)
                        .upload_id(upload_id)
                        .part_number(part.number)
                        .copy_source(copy_source)
                        .copy_source_range(part.range())
                        .send()
                        .await
                        // NoSuchKey here is the source's.
                        .map_err(|e| self.sdk_err("copy part", from, e))?;
                    Ok(CompletedPart::builder()
                        .part_number(part.number)
                        .set_e_tag(
                            out.copy_part_result()
                                .and_then(|r| r.e_tag())
                                .map(str::to_owned),
                        )
                        .build())
                }
            })
            .buffer_unordered(PART_CONCURRENCY)
            .try_collect::<Vec<_>>()
            .await;
        let result = match copied {
            Ok(parts) => self.complete(to, dst, &upload_id, parts).await,
            Err(e) => Err(e),
        };
        if let Err(e) = result {
            self.abort(to, dst, &upload_id).await;
            return Err(e);
        }
        Ok(n)
    }

    async fn list(&self, prefix: &str) -> Result<Vec<String>> {
        let start = Instant::now();
        let mut pages = self
            .client
            .list_objects_v2()
            .bucket(&self.bucket)
            .prefix(list_prefix(&self.prefix, prefix))
            .into_paginator()
            .send();
        let mut keys = Vec::new();
        while let Some(page) = pages.next().await {
            let page =
                page.map_err(|e| self.err("list", prefix, DisplayErrorContext(&e).to_string()))?;
            keys.extend(
                page.contents()
                    .iter()
                    .filter_map(|o| o.key())
                    .filter_map(|k| relative_key(&self.prefix, k))
                    .map(str::to_owned),
            );
        }
        keys.sort();
        tracing::debug!(
            op = "list",
            location = %self.location(prefix),
            keys = keys.len(),
            elapsed_ms = start.elapsed().as_millis() as u64,
            "S3 keys listed"
        );
        Ok(keys)
    }

    async fn delete(&self, key: &str) -> Result<()> {
        let object = self.object_key(key)?;
        match self
            .client
            .delete_object()
            .bucket(&self.bucket)
            .key(&object)
            .send()
            .await
        {
            Ok(_) => Ok(()),
            Err(e) if is_not_found(&e) => Ok(()),
            Err(e) => Err(self.sdk_err("delete", key, e)),
        }
    }
}

/// A missing object: `NoSuchKey` (GET), `NotFound` (HEAD), or a bare 404. A missing bucket
/// (`NoSuchBucket`, also a 404) is a configuration error, not a missing object.
fn is_not_found<E: ProvideErrorMetadata>(e: &SdkError<E, HttpResponse>) -> bool {
    match e.code() {
        Some("NoSuchKey" | "NotFound") => true,
        Some(_) => false,
        None => e.raw_response().is_some_and(|r| r.status().as_u16() == 404),
    }
}

/// The bucket key of a (checked) store key.
fn object_key(store_prefix: &str, key: &str) -> String {
    crate::join_key(store_prefix, key)
}

/// The bucket prefix that lists store keys starting with `prefix`. Not `join_key`: listing
/// "" under store prefix `a` must not return `ab/...`.
fn list_prefix(store_prefix: &str, prefix: &str) -> String {
    if store_prefix.is_empty() {
        prefix.to_string()
    } else {
        format!("{store_prefix}/{prefix}")
    }
}

/// The store key of a bucket key, if it is below the store prefix.
fn relative_key<'a>(store_prefix: &str, object: &'a str) -> Option<&'a str> {
    if store_prefix.is_empty() {
        return Some(object);
    }
    object
        .strip_prefix(store_prefix)?
        .strip_prefix('/')
        .filter(|k| !k.is_empty())
}

/// `x-amz-copy-source`: `bucket/key`, URL-encoded except for the `/` separators.
fn copy_source(bucket: &str, object: &str) -> String {
    let mut out = String::with_capacity(bucket.len() + object.len() + 1);
    for b in bucket.bytes().chain([b'/']).chain(object.bytes()) {
        if b.is_ascii_alphanumeric() || matches!(b, b'-' | b'.' | b'_' | b'~' | b'/') {
            out.push(b as char);
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

/// A unique temporary name beside `local`, for downloads.
fn download_tmp_path(local: &Path) -> PathBuf {
    static SEQ: AtomicU64 = AtomicU64::new(0);
    let name = local
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_else(|| "download".into());
    local.with_file_name(format!(
        ".tmp-{}-{}-{name}",
        std::process::id(),
        SEQ.fetch_add(1, Ordering::Relaxed)
    ))
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct Part {
    /// 1-based, as S3 numbers them.
    number: i32,
    offset: u64,
    len: u64,
}

impl Part {
    /// `x-amz-copy-source-range` (inclusive).
    fn range(&self) -> String {
        format!(
            "bytes={}-{}",
            self.offset,
            self.offset + self.len.max(1) - 1
        )
    }
}

/// Split `size` bytes into parts of `part_size` (the last one shorter), growing the part size
/// as needed to stay within S3's 10,000 parts. At least one part, even for 0 bytes.
fn plan_parts(size: u64, part_size: u64) -> Vec<Part> {
    let part_size = part_size.max(size.div_ceil(MAX_PARTS)).max(1);
    let count = size.div_ceil(part_size).max(1);
    (0..count)
        .map(|i| {
            let offset = i * part_size;
            Part {
                number: i as i32 + 1,
                offset,
                len: part_size.min(size - offset.min(size)),
            }
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_map_below_the_prefix() {
        assert_eq!(object_key("", "chk-1/a.sst"), "chk-1/a.sst");
        assert_eq!(object_key("jobs/j1", "chk-1/a.sst"), "jobs/j1/chk-1/a.sst");

        assert_eq!(list_prefix("", ""), "");
        assert_eq!(list_prefix("", "chk-"), "chk-");
        assert_eq!(list_prefix("jobs/j1", ""), "jobs/j1/");
        assert_eq!(list_prefix("jobs/j1", "chk-"), "jobs/j1/chk-");

        assert_eq!(relative_key("", "chk-1/a"), Some("chk-1/a"));
        assert_eq!(relative_key("jobs/j1", "jobs/j1/chk-1/a"), Some("chk-1/a"));
        assert_eq!(relative_key("jobs/j1", "jobs/j10/chk-1/a"), None);
        assert_eq!(relative_key("jobs/j1", "jobs/j1/"), None);
        assert_eq!(relative_key("jobs/j1", "other"), None);
    }

    #[test]
    fn copy_source_is_url_encoded() {
        assert_eq!(copy_source("b", "p/chk-1/a.sst"), "b/p/chk-1/a.sst");
        assert_eq!(
            copy_source("b", "a b+c=d&é/~x_y-z"),
            "b/a%20b%2Bc%3Dd%26%C3%A9/~x_y-z"
        );
    }

    #[test]
    fn parts_cover_the_object() {
        let p = plan_parts(10, 4);
        assert_eq!(
            p,
            [
                Part {
                    number: 1,
                    offset: 0,
                    len: 4
                },
                Part {
                    number: 2,
                    offset: 4,
                    len: 4
                },
                Part {
                    number: 3,
                    offset: 8,
                    len: 2
                },
            ]
        );
        assert_eq!(p[2].range(), "bytes=8-9");
        assert_eq!(plan_parts(8, 4).len(), 2);
        assert_eq!(plan_parts(8, 4)[1].len, 4);
        assert_eq!(
            plan_parts(0, 4),
            [Part {
                number: 1,
                offset: 0,
                len: 0
            }]
        );
        assert_eq!(
            plan_parts(3, 4),
            [Part {
                number: 1,
                offset: 0,
                len: 3
            }]
        );

        // 1 TiB in 16 MiB parts would be 65,536 parts: the part size grows instead.
        let size = 1 << 40;
        let p = plan_parts(size, DEFAULT_PART_SIZE);
        assert!(p.len() as u64 <= MAX_PARTS);
        assert_eq!(p.iter().map(|p| p.len).sum::<u64>(), size);
        assert!(p.windows(2).all(|w| w[0].offset + w[0].len == w[1].offset));
        assert_eq!(p.last().unwrap().number as usize, p.len());
    }

    #[test]
    fn download_tmp_paths_are_unique_siblings() {
        let a = download_tmp_path(Path::new("/x/y/a.sst"));
        let b = download_tmp_path(Path::new("/x/y/a.sst"));
        assert_ne!(a, b);
        assert_eq!(a.parent(), Some(Path::new("/x/y")));
        assert!(a
            .file_name()
            .unwrap()
            .to_str()
            .unwrap()
            .starts_with(".tmp-"));
    }
}
