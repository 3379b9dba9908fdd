//! The S3 backend: the same keys as the local directory, as objects under `s3://BUCKET/PREFIX/`,
//! on any S3-compatible server (AWS, MinIO, Ceph RGW, Garage, s3s-fs).
//!
//! - Writes are conditional (`If-None-Match: *`), so a pack or manifest is never overwritten. A
//!   412 after a retried write is checked against the bytes we meant to write (the first try
//!   may have landed). Servers that do not implement the condition get a HEAD before the PUT.
//! - Objects above `multipart_threshold` go up as multipart uploads with several parts in
//!   flight; a failed upload is aborted.
//! - The SDK retries throttling, 5xx and timeouts with backoff and jitter; a body cut short
//!   mid-transfer is retried here, and a range that still comes back short is an error.
//! - Every request is counted by type, with bytes up and down, for `holdfast stats`.
//!
//! The trait is blocking: each call runs on this store's own runtime and the caller's thread
//! waits, so it works from plain threads and from a tokio blocking pool alike.

use super::{check_key, ObjectStore, StoreError, StoreResult};
use aws_sdk_s3::config::retry::RetryConfig;
use aws_sdk_s3::config::timeout::TimeoutConfig;
use aws_sdk_s3::config::{Region, RequestChecksumCalculation, ResponseChecksumValidation};
use aws_sdk_s3::error::{ProvideErrorMetadata, SdkError};
use aws_sdk_s3::primitives::ByteStream;
use aws_sdk_s3::types::{CompletedMultipartUpload, CompletedPart};
use serde::{Deserialize, Serialize};
use std::future::Future;
use std::sync::atomic::{AtomicU64, AtomicU8, Ordering};
use std::sync::Arc;
use std::time::Duration;

/// Where a repository's store lives in S3 (kept in the local repository directory).
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
pub struct S3Location {
    pub bucket: String,
    /// Key prefix without leading or trailing `/`; may be empty.
    pub prefix: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub endpoint: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub region: Option<String>,
    #[serde(default)]
    pub path_style: bool,
}

impl S3Location {
    /// Parse `s3://BUCKET[/PREFIX]`.
    pub fn parse(url: &str) -> Result<S3Location, String> {
        let rest = url
            .strip_prefix("s3://")
            .ok_or_else(|| format!("{url:?} is not an S3 URL; write it as s3://BUCKET/PREFIX"))?;
        let (bucket, prefix) = rest.split_once('/').unwrap_or((rest, ""));
        let prefix = prefix.trim_matches('/');
        let valid_bucket = (3..=63).contains(&bucket.len())
            && bucket
                .bytes()
                .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-' || b == b'.');
        if !valid_bucket {
            return Err(format!("{bucket:?} is not a valid bucket name (3-63 characters: a-z, 0-9, '-', '.'); e.g. s3://backups/holdfast"));
        }
        if prefix.split('/').any(|p| p == "." || p == "..") || prefix.contains("//") {
            return Err(format!(
                "prefix {prefix:?} in {url} has empty, '.' or '..' parts"
            ));
        }
        Ok(S3Location {
            bucket: bucket.to_string(),
            prefix: prefix.to_string(),
            endpoint: None,
            region: None,
            path_style: false,
        })
    }

    pub fn url(&self) -> String {
        if self.prefix.is_empty() {
            format!("s3://{}", self.bucket)
        } else {
            format!("s3://{}/{}", self.bucket, self.prefix)
        }
    }
}

/// Requests by type and bytes moved, since the store was opened.
#[derive(Default, Debug)]
pub struct RequestStats {
    pub put: AtomicU64,
    pub get: AtomicU64,
    pub head: AtomicU64,
    pub list: AtomicU64,
    pub delete: AtomicU64,
    pub bytes_up: AtomicU64,
    pub bytes_down: AtomicU64,
}

/// A snapshot of [`RequestStats`], as stored and shown.
#[derive(Clone, Copy, Debug, Default, Serialize, Deserialize, PartialEq, Eq)]
pub struct RequestCounts {
    /// PUT-type requests: PutObject, and CreateMultipartUpload/UploadPart/Complete/Abort.
    pub put: u64,
    pub get: u64,
    pub head: u64,
    pub list: u64,
    pub delete: u64,
    pub bytes_up: u64,
    pub bytes_down: u64,
}

impl RequestCounts {
    pub fn minus(&self, earlier: &RequestCounts) -> RequestCounts {
        RequestCounts {
            put: self.put.saturating_sub(earlier.put),
            get: self.get.saturating_sub(earlier.get),
            head: self.head.saturating_sub(earlier.head),
            list: self.list.saturating_sub(earlier.list),
            delete: self.delete.saturating_sub(earlier.delete),
            bytes_up: self.bytes_up.saturating_sub(earlier.bytes_up),
            bytes_down: self.bytes_down.saturating_sub(earlier.bytes_down),
        }
    }
    pub fn plus(&self, o: &RequestCounts) -> RequestCounts {
        RequestCounts {
            put: self.put + o.put,
            get: self.get + o.get,
            head: self.head + o.head,
            list: self.list + o.list,
            delete: self.delete + o.delete,
            bytes_up: self.bytes_up + o.bytes_up,
            bytes_down: self.bytes_down + o.bytes_down,
        }
    }
}

impl RequestStats {
    pub fn snapshot(&self) -> RequestCounts {
        let g = |a: &AtomicU64| a.load(Ordering::Relaxed);
        RequestCounts {
            put: g(&self.put),
            get: g(&self.get),
            head: g(&self.head),
            list: g(&self.list),
            delete: g(&self.delete),
            bytes_up: g(&self.bytes_up),
            bytes_down: g(&self.bytes_down),
        }
    }
}

/// Tunables; the defaults suit AWS and self-hosted servers alike.
#[derive(Clone, Debug)]
pub struct S3Options {
    /// Objects larger than this go up as multipart uploads (packs are ~16 MiB: one PUT each).
    pub multipart_threshold: usize,
    pub part_size: usize,
    pub parts_in_flight: usize,
    /// Attempts per request (the first try included), with exponential backoff and jitter.
    pub attempts: u32,
    pub attempt_timeout: Duration,
}

impl Default for S3Options {
    fn default() -> Self {
        S3Options {
            multipart_threshold: 32 << 20,
            part_size: 8 << 20,
            parts_in_flight: 4,
            attempts: 5,
            attempt_timeout: Duration::from_secs(60),
        }
    }
}

impl S3Options {
    /// Defaults, overridden by HOLDFAST_S3_ATTEMPTS, HOLDFAST_S3_MULTIPART_THRESHOLD and
    /// HOLDFAST_S3_PART_SIZE (bytes).
    pub fn from_env() -> Self {
        let mut o = S3Options::default();
        let num = |k: &str| std::env::var(k).ok().and_then(|v| v.parse::<u64>().ok());
        if let Some(v) = num("HOLDFAST_S3_ATTEMPTS") {
            o.attempts = v.clamp(1, 100) as u32;
        }
        if let Some(v) = num("HOLDFAST_S3_MULTIPART_THRESHOLD") {
            o.multipart_threshold = v.max(5 << 20) as usize;
        }
        if let Some(v) = num("HOLDFAST_S3_PART_SIZE") {
            o.part_size = v.max(5 << 20) as usize; // S3's minimum part size
        }
        o
    }
}

/// Ranges closer than this are fetched in one GET (the bytes between are cheaper than a request).
pub const SPAN_GAP: u64 = 256 << 10;
/// The largest span one coalesced GET fetches.
pub const SPAN_MAX: u64 = 16 << 20;

const COND_UNKNOWN: u8 = 0;
const COND_YES: u8 = 1;
const COND_NO: u8 = 2;

pub struct S3Store {
    rt: tokio::runtime::Runtime,
    client: aws_sdk_s3::Client,
    loc: S3Location,
    opts: S3Options,
    conditional: AtomicU8,
    pub stats: Arc<RequestStats>,
}

/// What to set when no credentials are found.
const NO_CREDENTIALS: &str = "no S3 credentials: set AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY \
     (or AWS_PROFILE with a profile in ~/.aws, or AWS_WEB_IDENTITY_TOKEN_FILE with AWS_ROLE_ARN; \
     HOLDFAST_S3_IMDS=1 lets holdfast ask the EC2 instance metadata service)";

/// True when an SDK error chain says no provider had credentials.
fn no_credentials(chain: &str) -> bool {
    chain.contains("no credentials found in chain")
        || chain.contains("credentials provider was not enabled")
        || chain.contains("credential provider was not enabled")
}

/// Where credentials come from: the environment, the profile files, web identity (and a
/// container's credentials endpoint when its variables are set). Never the EC2 instance
/// metadata service, an address off loopback, unless the operator asks (`HOLDFAST_S3_IMDS=1`):
/// a machine that is not on EC2 must not send requests to 169.254.169.254 looking for keys.
fn credentials_chain() -> aws_config::meta::credentials::CredentialsProviderChain {
    use aws_config::meta::credentials::CredentialsProviderChain;
    let set = |k: &str| std::env::var_os(k).is_some_and(|v| !v.is_empty());
    let mut chain = CredentialsProviderChain::first_try(
        "environment",
        aws_config::environment::EnvironmentVariableCredentialsProvider::new(),
    )
    .or_else(
        "profile",
        aws_config::profile::ProfileFileCredentialsProvider::builder().build(),
    )
    .or_else(
        "web-identity",
        aws_config::web_identity_token::WebIdentityTokenCredentialsProvider::builder().build(),
    );
    if set("AWS_CONTAINER_CREDENTIALS_RELATIVE_URI") || set("AWS_CONTAINER_CREDENTIALS_FULL_URI") {
        chain = chain.or_else(
            "container",
            aws_config::ecs::EcsCredentialsProvider::builder().build(),
        );
    }
    if std::env::var("HOLDFAST_S3_IMDS").is_ok_and(|v| v == "1") {
        chain = chain.or_else(
            "ec2-instance-metadata",
            aws_config::imds::credentials::ImdsCredentialsProvider::builder().build(),
        );
    }
    chain
}

impl S3Store {
    /// Build a client (credentials from the environment, the profile files or web identity;
    /// see [`credentials_chain`]). No request is made; [`S3Store::check`] is the first.
    pub fn open(loc: &S3Location, opts: S3Options) -> StoreResult<S3Store> {
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .thread_name("holdfast-s3")
            .enable_all()
            .build()
            .map_err(|e| StoreError::io("s3 runtime", e))?;
        let region = loc
            .region
            .clone()
            .or_else(|| std::env::var("AWS_REGION").ok())
            .or_else(|| std::env::var("AWS_DEFAULT_REGION").ok());
        let shared = rt.block_on(async {
            let mut l = aws_config::defaults(aws_config::BehaviorVersion::latest())
                .credentials_provider(credentials_chain());
            // A custom endpoint (MinIO, Garage, …) rarely cares about the region, but SigV4 needs one.
            l = l.region(Region::new(
                region.unwrap_or_else(|| "us-east-1".to_string()),
            ));
            l.load().await
        });
        let mut b = aws_sdk_s3::config::Builder::from(&shared)
            .force_path_style(loc.path_style)
            .retry_config(
                RetryConfig::standard()
                    .with_max_attempts(opts.attempts)
                    .with_initial_backoff(Duration::from_millis(200))
                    .with_max_backoff(Duration::from_secs(5)),
            )
            .timeout_config(
                TimeoutConfig::builder()
                    .connect_timeout(Duration::from_secs(5))
                    .operation_attempt_timeout(opts.attempt_timeout)
                    .build(),
            )
            // Blobs are verified by their keyed hashes; extra checksums only narrow which
            // servers work.
            .request_checksum_calculation(RequestChecksumCalculation::WhenRequired)
            .response_checksum_validation(ResponseChecksumValidation::WhenRequired);
        if let Some(e) = &loc.endpoint {
            b = b.endpoint_url(e);
        }
        let client = aws_sdk_s3::Client::from_conf(b.build());
        Ok(S3Store {
            rt,
            client,
            loc: loc.clone(),
            opts,
            conditional: AtomicU8::new(COND_UNKNOWN),
            stats: Arc::default(),
        })
    }

    pub fn location(&self) -> &S3Location {
        &self.loc
    }

    /// Run `f` on this store's runtime and wait for it, from any thread.
    fn run<T: Send + 'static>(&self, f: impl Future<Output = T> + Send + 'static) -> T {
        let (tx, rx) = std::sync::mpsc::sync_channel(1);
        self.rt.spawn(async move {
            let _ = tx.send(f.await);
        });
        rx.recv().expect("the S3 runtime dropped a request")
    }

    fn full_key(&self, key: &str) -> String {
        if self.loc.prefix.is_empty() {
            key.to_string()
        } else {
            format!("{}/{key}", self.loc.prefix)
        }
    }

    fn where_(&self, key: &str) -> String {
        format!("{}/{key}", self.loc.url())
    }

    /// One cheap request that proves the endpoint answers, the credentials work and the bucket
    /// exists; its error says which of these is wrong.
    pub fn check(&self) -> StoreResult<()> {
        let (c, bucket) = (self.client.clone(), self.loc.bucket.clone());
        self.stats.head.fetch_add(1, Ordering::Relaxed);
        let r = self.run(async move { c.head_bucket().bucket(bucket).send().await });
        r.map(|_| ())
            .map_err(|e| match self.classify(&self.loc.url(), e) {
                StoreError::NotFound(_) => self.no_bucket(),
                e => e,
            })
    }

    fn no_bucket(&self) -> StoreError {
        let endpoint = self.loc.endpoint.as_deref().unwrap_or("AWS S3");
        StoreError::Remote {
            key: self.loc.url(),
            msg: format!(
                "bucket {} does not exist at {endpoint}; create it first, or fix the s3:// URL",
                self.loc.bucket
            ),
        }
    }

    /// Turn an SDK error into a one-line store error that says what to do.
    fn classify<E: ProvideErrorMetadata + std::error::Error + Send + Sync + 'static>(
        &self,
        key: &str,
        e: SdkError<E, aws_sdk_s3::config::http::HttpResponse>,
    ) -> StoreError {
        let endpoint = self.loc.endpoint.as_deref().unwrap_or("AWS S3");
        let status = e.raw_response().map(|r| r.status().as_u16());
        let code = e.code().map(str::to_string);
        let remote = |msg: String| StoreError::Remote {
            key: key.to_string(),
            msg,
        };
        match (&e, status, code.as_deref()) {
            _ if no_credentials(&error_chain(&e)) => remote(NO_CREDENTIALS.to_string()),
            (SdkError::DispatchFailure(_) | SdkError::TimeoutError(_), _, _) => remote(format!(
                "cannot reach the S3 endpoint {endpoint} ({}); check that it is running and reachable, and the --endpoint URL",
                error_chain(&e)
            )),
            (_, _, Some("NoSuchBucket")) => self.no_bucket(),
            (_, _, Some("NoSuchKey" | "NotFound")) | (_, Some(404), _) => StoreError::NotFound(key.to_string()),
            (_, _, Some("InvalidAccessKeyId" | "SignatureDoesNotMatch" | "AccessDenied" | "ExpiredToken" | "InvalidToken")) | (_, Some(401 | 403), _) => remote(format!(
                "access denied by {endpoint} ({}); check the credentials (AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY or AWS_PROFILE) and their rights on bucket {}",
                code.as_deref().unwrap_or("HTTP 403"),
                self.loc.bucket
            )),
            (_, Some(412), _) => StoreError::Exists(key.to_string()),
            (_, Some(416), _) | (_, _, Some("InvalidRange")) => StoreError::Corrupt { key: key.to_string(), what: "shorter than the range asked for".into() },
            _ => remote(format!("S3 request failed after {} attempts: {}", self.opts.attempts, error_chain(&e))),
        }
    }

    fn put_small(&self, key: &str, data: &[u8], conditional: bool) -> StoreResult<()> {
        let (c, bucket, k) = (
            self.client.clone(),
            self.loc.bucket.clone(),
            self.full_key(key),
        );
        let body = ByteStream::from(data.to_vec());
        self.stats.put.fetch_add(1, Ordering::Relaxed);
        self.stats
            .bytes_up
            .fetch_add(data.len() as u64, Ordering::Relaxed);
        let r = self.run(async move {
            let mut req = c.put_object().bucket(bucket).key(k).body(body);
            if conditional {
                req = req.if_none_match("*");
            }
            req.send().await
        });
        r.map(|_| ())
            .map_err(|e| self.classify(&self.where_(key), e))
    }

    fn put_multipart(&self, key: &str, data: &[u8], conditional: bool) -> StoreResult<()> {
        let (c, bucket, k) = (
            self.client.clone(),
            self.loc.bucket.clone(),
            self.full_key(key),
        );
        self.stats.put.fetch_add(1, Ordering::Relaxed);
        let created = self.run({
            let (c, bucket, k) = (c.clone(), bucket.clone(), k.clone());
            async move {
                c.create_multipart_upload()
                    .bucket(bucket)
                    .key(k)
                    .send()
                    .await
            }
        });
        let upload_id = created
            .map_err(|e| self.classify(&self.where_(key), e))?
            .upload_id
            .unwrap_or_default();
        let parts: Vec<Vec<u8>> = data
            .chunks(self.opts.part_size)
            .map(<[u8]>::to_vec)
            .collect();
        self.stats
            .put
            .fetch_add(parts.len() as u64 + 1, Ordering::Relaxed);
        self.stats
            .bytes_up
            .fetch_add(data.len() as u64, Ordering::Relaxed);
        let upload = Multipart {
            client: c.clone(),
            bucket: bucket.clone(),
            key: k.clone(),
            id: upload_id.clone(),
        };
        let in_flight = self.opts.parts_in_flight.max(1);
        let uploaded = self.run(upload.send(parts, in_flight, conditional));
        if let Err(e) = uploaded {
            self.stats.put.fetch_add(1, Ordering::Relaxed);
            let (c, bucket, k) = (c.clone(), bucket.clone(), k.clone());
            let _ = self.run(async move {
                c.abort_multipart_upload()
                    .bucket(bucket)
                    .key(k)
                    .upload_id(upload_id)
                    .send()
                    .await
            });
            return Err(match e {
                PartError::Part(e) => self.classify(&self.where_(key), e),
                PartError::Complete(e) => self.classify(&self.where_(key), e),
                PartError::Panicked => StoreError::Remote {
                    key: self.where_(key),
                    msg: "an upload task failed".into(),
                },
            });
        }
        Ok(())
    }

    fn get_inner(&self, key: &str, range: Option<(u64, usize)>) -> StoreResult<Vec<u8>> {
        // The SDK retries until the response starts; a body cut short is retried here.
        let mut last = None;
        for _ in 0..self.opts.attempts.max(1) {
            let (c, bucket, k) = (
                self.client.clone(),
                self.loc.bucket.clone(),
                self.full_key(key),
            );
            self.stats.get.fetch_add(1, Ordering::Relaxed);
            let r = self.run(async move {
                let mut req = c.get_object().bucket(bucket).key(k);
                if let Some((off, len)) = range {
                    req = req.range(format!("bytes={}-{}", off, off + len as u64 - 1));
                }
                match req.send().await {
                    Ok(o) => Ok(o.body.collect().await.map(|b| b.into_bytes().to_vec())),
                    Err(e) => Err(e),
                }
            });
            match r {
                Ok(Ok(bytes)) => {
                    self.stats
                        .bytes_down
                        .fetch_add(bytes.len() as u64, Ordering::Relaxed);
                    if let Some((off, len)) = range {
                        if bytes.len() != len {
                            return Err(StoreError::Corrupt {
                                key: key.to_string(),
                                what: format!("shorter than {} bytes", off + len as u64),
                            });
                        }
                    }
                    return Ok(bytes);
                }
                Ok(Err(body_err)) => last = Some(body_err.to_string()),
                Err(e) => return Err(self.classify(&self.where_(key), e)),
            }
        }
        Err(StoreError::Remote {
            key: self.where_(key),
            msg: format!(
                "the download was cut short {} times: {}",
                self.opts.attempts,
                last.unwrap_or_default()
            ),
        })
    }
}

/// One multipart upload in progress.
struct Multipart {
    client: aws_sdk_s3::Client,
    bucket: String,
    key: String,
    id: String,
}

impl Multipart {
    /// Upload `parts` (at most `in_flight` at once) and complete the upload (conditionally:
    /// refused when the key exists).
    async fn send(
        self,
        parts: Vec<Vec<u8>>,
        in_flight: usize,
        conditional: bool,
    ) -> Result<(), PartError> {
        let sem = Arc::new(tokio::sync::Semaphore::new(in_flight));
        let mut set = tokio::task::JoinSet::new();
        for (i, p) in parts.into_iter().enumerate() {
            let (c, bucket, k, id, sem) = (
                self.client.clone(),
                self.bucket.clone(),
                self.key.clone(),
                self.id.clone(),
                sem.clone(),
            );
            set.spawn(async move {
                let _permit = sem.acquire_owned().await;
                let n = i as i32 + 1;
                let r = c
                    .upload_part()
                    .bucket(bucket)
                    .key(k)
                    .upload_id(id)
                    .part_number(n)
                    .body(ByteStream::from(p))
                    .send()
                    .await;
                r.map(|o| {
                    CompletedPart::builder()
                        .part_number(n)
                        .set_e_tag(o.e_tag)
                        .build()
                })
            });
        }
        let mut done = Vec::new();
        while let Some(r) = set.join_next().await {
            match r {
                Ok(Ok(p)) => done.push(p),
                Ok(Err(e)) => return Err(PartError::Part(e)),
                Err(_) => return Err(PartError::Panicked),
            }
        }
        done.sort_by_key(|p| p.part_number);
        let mut req = self
            .client
            .complete_multipart_upload()
            .bucket(self.bucket)
            .key(self.key)
            .upload_id(self.id)
            .multipart_upload(
                CompletedMultipartUpload::builder()
                    .set_parts(Some(done))
                    .build(),
            );
        if conditional {
            req = req.if_none_match("*");
        }
        req.send().await.map(|_| ()).map_err(PartError::Complete)
    }
}

enum PartError {
    Part(
        SdkError<
            aws_sdk_s3::operation::upload_part::UploadPartError,
            aws_sdk_s3::config::http::HttpResponse,
        >,
    ),
    Complete(
        SdkError<
            aws_sdk_s3::operation::complete_multipart_upload::CompleteMultipartUploadError,
            aws_sdk_s3::config::http::HttpResponse,
        >,
    ),
    Panicked,
}

/// `text` with its lines joined (SDK errors list attempts one per line).
fn one_line(text: &str) -> String {
    text.split_whitespace().collect::<Vec<_>>().join(" ")
}

/// An error and its sources on one line.
fn error_chain(e: &dyn std::error::Error) -> String {
    let mut s = one_line(&e.to_string());
    let mut cur = e.source();
    while let Some(c) = cur {
        let m = one_line(&c.to_string());
        if !s.contains(&m) {
            s.push_str(": ");
            s.push_str(&m);
        }
        cur = c.source();
    }
    s
}

impl ObjectStore for S3Store {
    fn put(&self, key: &str, data: &[u8]) -> StoreResult<()> {
        check_key(key)?;
        let multipart = data.len() > self.opts.multipart_threshold;
        let put = |cond: bool| {
            if multipart {
                self.put_multipart(key, data, cond)
            } else {
                self.put_small(key, data, cond)
            }
        };
        let r = match self.conditional.load(Ordering::Relaxed) {
            COND_NO => {
                if self.exists(key)? {
                    return self.same_or_exists(key, data);
                }
                put(false)
            }
            _ => match put(true) {
                Err(StoreError::Remote { msg, .. })
                    if msg.contains("NotImplemented") || msg.contains("not implemented") =>
                {
                    // This server has no conditional writes: check, then write.
                    self.conditional.store(COND_NO, Ordering::Relaxed);
                    tracing::info!(
                        "{} does not support If-None-Match; falling back to HEAD before PUT",
                        self.loc.url()
                    );
                    return self.put(key, data);
                }
                r => {
                    if r.is_ok() {
                        self.conditional.store(COND_YES, Ordering::Relaxed);
                    }
                    r
                }
            },
        };
        match r {
            Err(StoreError::Exists(_)) => self.same_or_exists(key, data),
            r => r,
        }
    }

    fn get(&self, key: &str) -> StoreResult<Vec<u8>> {
        check_key(key)?;
        self.get_inner(key, None)
    }

    fn get_range(&self, key: &str, offset: u64, len: usize) -> StoreResult<Vec<u8>> {
        check_key(key)?;
        if len == 0 {
            return Ok(Vec::new());
        }
        self.get_inner(key, Some((offset, len)))
    }

    /// Nearby ranges (gaps up to [`SPAN_GAP`]) share one GET of at most [`SPAN_MAX`] bytes:
    /// a restore asks for a segment's chunks, which a backup wrote next to each other.
    fn get_ranges(&self, key: &str, ranges: &[(u64, usize)]) -> StoreResult<Vec<Vec<u8>>> {
        check_key(key)?;
        let mut order: Vec<usize> = (0..ranges.len()).filter(|&i| ranges[i].1 > 0).collect();
        order.sort_by_key(|&i| ranges[i].0);
        let mut spans: Vec<(u64, u64, Vec<usize>)> = Vec::new();
        for i in order {
            let (off, len) = ranges[i];
            let end = off
                .checked_add(len as u64)
                .ok_or_else(|| StoreError::Corrupt {
                    key: key.to_string(),
                    what: format!("range at {off} overflows"),
                })?;
            match spans.last_mut() {
                Some(s)
                    if off <= s.1.saturating_add(SPAN_GAP) && end.max(s.1) - s.0 <= SPAN_MAX =>
                {
                    s.1 = s.1.max(end);
                    s.2.push(i);
                }
                _ => spans.push((off, end, vec![i])),
            }
        }
        let mut out = vec![Vec::new(); ranges.len()];
        for (start, end, members) in spans {
            let bytes = self.get_inner(key, Some((start, (end - start) as usize)))?;
            for i in members {
                let (off, len) = ranges[i];
                let a = (off - start) as usize;
                out[i] = bytes[a..a + len].to_vec();
            }
        }
        Ok(out)
    }

    fn size(&self, key: &str) -> StoreResult<u64> {
        check_key(key)?;
        let (c, bucket, k) = (
            self.client.clone(),
            self.loc.bucket.clone(),
            self.full_key(key),
        );
        self.stats.head.fetch_add(1, Ordering::Relaxed);
        let r = self.run(async move { c.head_object().bucket(bucket).key(k).send().await });
        match r {
            Ok(o) => Ok(o.content_length.unwrap_or(0).max(0) as u64),
            Err(e) => Err(self.classify(&self.where_(key), e)),
        }
    }

    fn list(&self, prefix: &str) -> StoreResult<Vec<String>> {
        let full = self.full_key(prefix);
        let strip = if self.loc.prefix.is_empty() {
            0
        } else {
            self.loc.prefix.len() + 1
        };
        let mut out = Vec::new();
        let mut token: Option<String> = None;
        loop {
            let (c, bucket, p, t) = (
                self.client.clone(),
                self.loc.bucket.clone(),
                full.clone(),
                token.clone(),
            );
            self.stats.list.fetch_add(1, Ordering::Relaxed);
            let r = self.run(async move {
                c.list_objects_v2()
                    .bucket(bucket)
                    .prefix(p)
                    .set_continuation_token(t)
                    .send()
                    .await
            });
            let page = r.map_err(|e| self.classify(&self.where_(prefix), e))?;
            for o in page.contents() {
                if let Some(k) = o.key() {
                    if k.len() > strip {
                        out.push(k[strip..].to_string());
                    }
                }
            }
            match page.next_continuation_token() {
                Some(t) if page.is_truncated() == Some(true) => token = Some(t.to_string()),
                _ => break,
            }
        }
        out.sort();
        Ok(out)
    }

    fn delete(&self, key: &str) -> StoreResult<()> {
        check_key(key)?;
        let (c, bucket, k) = (
            self.client.clone(),
            self.loc.bucket.clone(),
            self.full_key(key),
        );
        self.stats.delete.fetch_add(1, Ordering::Relaxed);
        let r = self.run(async move { c.delete_object().bucket(bucket).key(k).send().await });
        match r {
            Ok(_) => Ok(()),
            Err(e) => match self.classify(&self.where_(key), e) {
                StoreError::NotFound(_) => Ok(()),
                e => Err(e),
            },
        }
    }
}

impl S3Store {
    /// A write met an existing object: fine if it holds exactly our bytes (an earlier try of
    /// this same write landed), an error otherwise.
    fn same_or_exists(&self, key: &str, data: &[u8]) -> StoreResult<()> {
        match self.get(key) {
            Ok(have) if have == data => Ok(()),
            Ok(_) => Err(StoreError::Exists(self.where_(key))),
            Err(e) => Err(e),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_urls() {
        let l = S3Location::parse("s3://my-bucket/a/b/").unwrap();
        assert_eq!((l.bucket.as_str(), l.prefix.as_str()), ("my-bucket", "a/b"));
        assert_eq!(l.url(), "s3://my-bucket/a/b");
        assert_eq!(S3Location::parse("s3://bkt").unwrap().prefix, "");
        for bad in [
            "http://x/y",
            "s3://",
            "s3://B/x",
            "s3://ab",
            "s3://bkt/a//b",
            "s3://bkt/../x",
        ] {
            assert!(S3Location::parse(bad).is_err(), "{bad}");
        }
    }
}
