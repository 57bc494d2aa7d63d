//! aws-sdk-s3 implementation of [`ObjectStore`](super::ObjectStore).

use std::cell::Cell;
use std::collections::HashMap;
use std::fmt;
use std::future::Future;
use std::ops::Range;
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use aws_sdk_s3::config::interceptors::{
    BeforeDeserializationInterceptorContextRef, BeforeTransmitInterceptorContextRef,
};
use aws_sdk_s3::config::retry::RetryConfig;
use aws_sdk_s3::config::timeout::TimeoutConfig;
use aws_sdk_s3::config::{
    BehaviorVersion, ConfigBag, Credentials, Intercept, Region, RequestChecksumCalculation, ResponseChecksumValidation,
    RuntimeComponents,
};
use aws_sdk_s3::error::{BoxError, ProvideErrorMetadata, SdkError};
use aws_sdk_s3::primitives::{ByteStream, DateTime, Length};
use aws_sdk_s3::types::{CompletedMultipartUpload, CompletedPart, MetadataDirective};
use aws_sdk_s3::Client;
use aws_smithy_http_client::tls;
use aws_smithy_runtime_api::client::orchestrator::HttpResponse;
use bytes::Bytes;
use futures::FutureExt;
use tracing::{Instrument, Span};

use super::pool::BufPool;
use super::{
    Body, ByteSink, ListPage, ObjectMeta, ObjectStore, ObjectSummary, Part, StoreError, StoreResult, UserMeta,
};

/// A secret string: never printed, never logged.
#[derive(Clone, Default, PartialEq, Eq)]
pub struct Secret(pub String);

impl fmt::Debug for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("Secret(***)")
    }
}

/// Where and how to reach an S3 service.
#[derive(Debug, Clone, Default)]
pub struct S3Config {
    /// e.g. `http://127.0.0.1:9000`; `None` means AWS's own endpoint for `region`.
    pub endpoint: Option<String>,
    pub bucket: String,
    pub region: String,
    /// Path-style addressing (`endpoint/bucket/key`), as MinIO and Garage want.
    pub path_style: bool,
    /// Credentials; when absent, `AWS_ACCESS_KEY_ID`, `AWS_SECRET_ACCESS_KEY` and
    /// `AWS_SESSION_TOKEN` are read from the environment.
    pub access_key: Option<String>,
    pub secret_key: Option<Secret>,
    pub session_token: Option<Secret>,
}

/// An [`ObjectStore`] over aws-sdk-s3: AWS, MinIO, Garage, or any S3-compatible service.
///
/// Built without aws-config: region, endpoint, path style and credentials come from
/// [`S3Config`] (credentials fall back to the `AWS_*` environment variables). HTTPS works
/// through rustls with ring and the platform's root certificates. Connect timeout 5 s,
/// attempt timeout 60 s, the SDK's standard retry with 3 attempts.
///
/// Every request runs in a `tracing` span `s3.request` with the fields `op`, `bucket`, `key`,
/// `bytes`, `status` (the last HTTP status seen), `attempts` and `error`.
///
/// The SDK's request futures (`send()`) are boxed where they are made: each is about 10 KB,
/// and unboxed it was copied again by every layer wrapping it (the span, the request scope,
/// the store trait), three to four times per request.
#[derive(Clone)]
pub struct S3Store {
    client: Client,
    bucket: String,
    endpoint: String,
    /// Buffers for large GET bodies (see [`super::pool`]).
    bodies: Arc<BufPool>,
    /// Whether PUT and UploadPart sign their payload (its SHA-256 in the signature). Only over
    /// plain HTTP: over HTTPS, TLS already protects the bytes in transit, and hashing them cost
    /// a quarter of a small PUT's CPU (callgrind: 25% of an 8 KiB upload's instructions, in
    /// the payload's SHA-256). The request itself stays signed either way.
    sign_payloads: bool,
}

/// Body buffers kept for reuse per store: the read path's read-ahead window of 4 MiB chunks.
const KEPT_BODY_BYTES: usize = 32 << 20;

impl fmt::Debug for S3Store {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("S3Store")
            .field("endpoint", &self.endpoint)
            .field("bucket", &self.bucket)
            .finish()
    }
}

/// The largest source one CopyObject copies (S3's limit, 5 GiB).
const MAX_COPY_OBJECT: u64 = 5 << 30;
/// Part size of a copy past [`MAX_COPY_OBJECT`]: 1 GiB, so a copy of S3's largest object (5 TiB)
/// takes 5,120 of the 10,000 parts allowed.
const COPY_PART: u64 = 1 << 30;

/// Connect timeout of every connection.
pub const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);
/// Timeout of one attempt of one request (the body included).
pub const ATTEMPT_TIMEOUT: Duration = Duration::from_secs(60);
/// Attempts per request, the first included.
pub const MAX_ATTEMPTS: u32 = 3;

impl S3Store {
    /// Builds the client. Makes no request: call [`ObjectStore::check`] to find out whether the
    /// bucket and the credentials work. Fails when no credentials are configured or found in
    /// the environment, or when the bucket name is empty.
    pub async fn connect(cfg: S3Config) -> anyhow::Result<S3Store> {
        anyhow::ensure!(!cfg.bucket.is_empty(), "no bucket given");
        let credentials = credentials(&cfg)?;
        let region = if cfg.region.is_empty() {
            "us-east-1".to_string()
        } else {
            cfg.region.clone()
        };
        let http = aws_smithy_http_client::Builder::new()
            .tls_provider(tls::Provider::Rustls(tls::rustls_provider::CryptoMode::Ring))
            .build_https();
        let mut builder = aws_sdk_s3::Config::builder()
            .behavior_version(BehaviorVersion::latest())
            .region(Region::new(region.clone()))
            .credentials_provider(credentials)
            .http_client(http)
            .force_path_style(cfg.path_style)
            .timeout_config(
                TimeoutConfig::builder()
                    .connect_timeout(CONNECT_TIMEOUT)
                    .operation_attempt_timeout(ATTEMPT_TIMEOUT)
                    .build(),
            )
            .retry_config(RetryConfig::standard().with_max_attempts(MAX_ATTEMPTS))
            // Checksums only where S3 requires them: with the SDK's "when supported" default,
            // streamed bodies (`Body::File`) go out aws-chunked with a trailing CRC32, which
            // Garage 2.5 refuses ("Invalid payload signature"), as do other S3-compatibles.
            .request_checksum_calculation(RequestChecksumCalculation::WhenRequired)
            .response_checksum_validation(ResponseChecksumValidation::WhenRequired)
            .interceptor(StatusRecorder);
        if let Some(endpoint) = &cfg.endpoint {
            builder = builder.endpoint_url(endpoint.clone());
        }
        let endpoint = cfg
            .endpoint
            .clone()
            .unwrap_or_else(|| format!("https://s3.{region}.amazonaws.com"));
        Ok(S3Store {
            client: Client::from_conf(builder.build()),
            bucket: cfg.bucket,
            sign_payloads: !endpoint.starts_with("https://"),
            endpoint,
            bodies: BufPool::new(KEPT_BODY_BYTES),
        })
    }

    /// Overrides whether payloads are signed (see `sign_payloads`): the tests and benchmarks
    /// reach S3 over plain HTTP only, and check the unsigned requests against it.
    pub fn signing_payloads(mut self, on: bool) -> S3Store {
        self.sign_payloads = on;
        self
    }

    async fn copy_object(&self, src: &str, src_etag: Option<&str>, dst: &str, meta: &UserMeta) -> StoreResult<String> {
        let span = self.span("CopyObject", dst);
        traced(span, async {
            let out = self
                .client
                .copy_object()
                .bucket(&self.bucket)
                .key(dst)
                .copy_source(self.copy_source(src))
                .set_copy_source_if_match(src_etag.map(|e| format!("\"{e}\"")))
                .metadata_directive(MetadataDirective::Replace)
                .set_metadata(Some(to_map(meta)))
                .send()
                .boxed()
                .await
                .map_err(|e| {
                    if is_precondition_failed(&e) {
                        return not_version(src, src_etag);
                    }
                    self.classify(e, src)
                })?;
            Ok(strip_etag(out.copy_object_result().and_then(|r| r.e_tag())))
        })
        .await
    }

    /// `src` copied to `dst` as a multipart upload whose parts (`part` bytes each) S3 copies
    /// from `src`, each on the condition that `src` is still the version read at the start: what
    /// [`ObjectStore::copy`] does for a source larger than one CopyObject takes. Public for the
    /// tests, which cannot make a server refuse a CopyObject.
    pub async fn copy_in_parts(&self, src: &str, dst: &str, meta: &UserMeta, part: u64) -> StoreResult<String> {
        let h = self
            .head(src)
            .await?
            .ok_or_else(|| StoreError::NotFound(src.to_string()))?;
        self.copy_version_in_parts(src, &h, dst, meta, part).await
    }

    /// [`S3Store::copy_in_parts`] of the version of `src` that `h` (its HEAD) describes.
    async fn copy_version_in_parts(
        &self,
        src: &str,
        h: &ObjectMeta,
        dst: &str,
        meta: &UserMeta,
        part: u64,
    ) -> StoreResult<String> {
        if h.size == 0 {
            return self.copy_object(src, Some(&h.etag), dst, meta).await; // no range to copy
        }
        let id = self.create_multipart(dst, meta).await?;
        let copied = async {
            let mut parts = Vec::new();
            for (i, start) in (0..h.size).step_by(part as usize).enumerate() {
                let number = i as i32 + 1;
                let range = start..(start + part).min(h.size);
                let etag = self.upload_part_copy(dst, &id, number, src, &h.etag, range).await?;
                parts.push(Part { number, etag });
            }
            self.complete_multipart(dst, &id, &parts).await
        }
        .await;
        if copied.is_err() {
            let _ = self.abort_multipart(dst, &id).await;
        }
        copied
    }

    /// The bucket this store works in.
    pub fn bucket(&self) -> &str {
        &self.bucket
    }

    fn span(&self, op: &'static str, key: &str) -> Span {
        tracing::info_span!(
            "s3.request",
            op,
            bucket = %self.bucket,
            key = %key,
            bytes = tracing::field::Empty,
            status = tracing::field::Empty,
            attempts = tracing::field::Empty,
            error = tracing::field::Empty,
        )
    }

    /// A ranged GET, of version `if_match` only when given (412 from S3 is then `NotFound`).
    async fn get_object_range(&self, key: &str, range: Range<u64>, if_match: Option<&str>) -> StoreResult<Bytes> {
        let span = self.span("GetObject", key);
        traced(span.clone(), async {
            let Some(out) = self.send_range_get(key, range, if_match).await? else {
                return Ok(Bytes::new());
            };
            let len = out.content_length();
            read_body(out.body, len, &self.bodies, key, &span).await
        })
        .await
    }

    /// Sends a ranged GET (of the version `if_match` only, when given). `None` when there are no
    /// bytes to read: an empty range of an object that exists (and is that version), or a range
    /// starting at or past its end.
    async fn send_range_get(
        &self,
        key: &str,
        range: Range<u64>,
        if_match: Option<&str>,
    ) -> StoreResult<Option<aws_sdk_s3::operation::get_object::GetObjectOutput>> {
        if range.start >= range.end {
            // No bytes asked for; S3 has no empty range, so only check the object exists.
            return match self.head(key).await? {
                Some(h) if if_match.is_none_or(|e| e == h.etag) => Ok(None),
                _ => Err(not_version(key, if_match)),
            };
        }
        match self
            .client
            .get_object()
            .bucket(&self.bucket)
            .key(key)
            .range(format!("bytes={}-{}", range.start, range.end - 1))
            .set_if_match(if_match.map(|e| format!("\"{e}\"")))
            .send()
            .boxed()
            .await
        {
            Ok(out) => Ok(Some(out)),
            // The range starts at or past the end: the object exists, no bytes there.
            Err(e) if is_invalid_range(&e) => Ok(None),
            Err(e) if is_precondition_failed(&e) => Err(not_version(key, if_match)),
            Err(e) => Err(self.classify(e, key)),
        }
    }

    fn classify<E>(&self, err: SdkError<E, HttpResponse>, key: &str) -> StoreError
    where
        E: ProvideErrorMetadata + std::error::Error + Send + Sync + 'static,
    {
        classify(err, &self.bucket, key)
    }

    fn copy_source(&self, key: &str) -> String {
        format!("{}/{}", self.bucket, encode_key(key))
    }
}

/// Runs one request future inside its span, with the span reachable by [`StatusRecorder`].
async fn traced<T, F>(span: Span, fut: F) -> StoreResult<T>
where
    F: Future<Output = StoreResult<T>>,
{
    let request = Request {
        span: span.clone(),
        attempts: Cell::new(0),
    };
    let result = REQUEST.scope(request, fut).instrument(span.clone()).await;
    if let Err(e) = &result {
        span.record("error", tracing::field::display(e));
        if !matches!(e, StoreError::NotFound(_)) {
            span.in_scope(|| tracing::debug!(error = %e, "s3 request failed"));
        }
    }
    result
}

struct Request {
    span: Span,
    attempts: Cell<u32>,
}

tokio::task_local! {
    static REQUEST: Request;
}

/// Records the attempt count and each response's status on the request's span.
#[derive(Debug)]
struct StatusRecorder;

impl Intercept for StatusRecorder {
    fn name(&self) -> &'static str {
        "s3nfs::StatusRecorder"
    }

    fn read_before_attempt(
        &self,
        _ctx: &BeforeTransmitInterceptorContextRef<'_>,
        _rc: &RuntimeComponents,
        _cfg: &mut ConfigBag,
    ) -> Result<(), BoxError> {
        let _ = REQUEST.try_with(|r| {
            let n = r.attempts.get() + 1;
            r.attempts.set(n);
            r.span.record("attempts", n);
        });
        Ok(())
    }

    fn read_before_deserialization(
        &self,
        ctx: &BeforeDeserializationInterceptorContextRef<'_>,
        _rc: &RuntimeComponents,
        _cfg: &mut ConfigBag,
    ) -> Result<(), BoxError> {
        let status = ctx.response().status().as_u16();
        let _ = REQUEST.try_with(|r| {
            r.span.record("status", status);
        });
        Ok(())
    }
}

fn credentials(cfg: &S3Config) -> anyhow::Result<Credentials> {
    let env = |name: &str| std::env::var(name).ok().filter(|v| !v.is_empty());
    let (access, secret, token) = match (&cfg.access_key, &cfg.secret_key) {
        (Some(a), Some(s)) => (a.clone(), s.0.clone(), cfg.session_token.as_ref().map(|t| t.0.clone())),
        (Some(_), None) | (None, Some(_)) => {
            anyhow::bail!("give both the access key and the secret key, or neither")
        }
        (None, None) => match (env("AWS_ACCESS_KEY_ID"), env("AWS_SECRET_ACCESS_KEY")) {
            (Some(a), Some(s)) => (a, s, env("AWS_SESSION_TOKEN")),
            _ => anyhow::bail!(
                "no S3 credentials: give an access key and secret key, \
                 or set AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY"
            ),
        },
    };
    Ok(Credentials::new(access, secret, token, None, "s3nfs"))
}

/// Percent-encodes a key for `x-amz-copy-source`: everything but unreserved characters and `/`.
pub fn encode_key(key: &str) -> String {
    let mut out = String::with_capacity(key.len());
    for &b in key.as_bytes() {
        if b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.' | b'~' | b'/') {
            out.push(b as char);
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

fn strip_etag(etag: Option<&str>) -> String {
    etag.unwrap_or_default().trim_matches('"').to_string()
}

fn quote_etag(etag: &str) -> String {
    if etag.starts_with('"') {
        etag.to_string()
    } else {
        format!("\"{etag}\"")
    }
}

fn secs(t: Option<&DateTime>) -> i64 {
    t.map(|t| t.secs()).unwrap_or(0)
}

fn to_map(meta: &UserMeta) -> HashMap<String, String> {
    meta.iter().map(|(k, v)| (k.clone(), v.clone())).collect()
}

fn from_map(meta: Option<&HashMap<String, String>>) -> UserMeta {
    meta.into_iter()
        .flatten()
        .map(|(k, v)| (k.to_ascii_lowercase(), v.clone()))
        .collect()
}

async fn byte_stream(body: Body) -> StoreResult<ByteStream> {
    match body {
        Body::Bytes(b) => Ok(ByteStream::from(b)),
        // 1 MiB reads (the SDK's default is 64 KiB): each read is a hand-off to a blocking
        // thread and back, which cost 16 times the system calls per part.
        Body::File { path, offset, len } => ByteStream::read_from()
            .path(&path)
            .buffer_size(1 << 20)
            .offset(offset)
            .length(Length::Exact(len))
            .build()
            .await
            .map_err(|e| StoreError::Io(format!("{}: {e}", path.display()))),
    }
}

/// The answer when `key` is gone, or (with `etag`) is not that version now.
fn not_version(key: &str, etag: Option<&str>) -> StoreError {
    match etag {
        Some(e) => StoreError::NotFound(format!("{key} (not version {e})")),
        None => StoreError::NotFound(key.to_string()),
    }
}

/// Maps an SDK error to a [`StoreError`].
fn classify<E>(err: SdkError<E, HttpResponse>, bucket: &str, key: &str) -> StoreError
where
    E: ProvideErrorMetadata + std::error::Error + Send + Sync + 'static,
{
    match &err {
        SdkError::ConstructionFailure(_) => StoreError::Invalid(causes(&err)),
        SdkError::TimeoutError(_) => StoreError::Unavailable(format!("request timed out: {}", causes(&err))),
        SdkError::DispatchFailure(_) | SdkError::ResponseError(_) => StoreError::Unavailable(causes(&err)),
        SdkError::ServiceError(service) => {
            let status = service.raw().status().as_u16();
            let e = service.err();
            let code = e.code().unwrap_or_default();
            let message = e.message().unwrap_or_default();
            let text = if code.is_empty() && message.is_empty() {
                format!("HTTP {status}")
            } else {
                format!("HTTP {status} {code}: {message}")
            };
            match code {
                "NoSuchBucket" => return StoreError::NoSuchBucket(bucket.to_string()),
                "NoSuchKey" | "NotFound" | "NoSuchUpload" => return StoreError::NotFound(key.to_string()),
                "AccessDenied"
                | "InvalidAccessKeyId"
                | "SignatureDoesNotMatch"
                | "Forbidden"
                | "InvalidToken"
                | "ExpiredToken"
                | "AccountProblem"
                | "AllAccessDisabled" => return StoreError::AccessDenied(code.to_string()),
                "SlowDown"
                | "ServiceUnavailable"
                | "InternalError"
                | "RequestTimeout"
                | "Throttling"
                | "ThrottlingException"
                | "RequestTimeTooSkewed" => return StoreError::Unavailable(text),
                _ => {}
            }
            match status {
                404 => StoreError::NotFound(key.to_string()),
                401 | 403 => StoreError::AccessDenied(if code.is_empty() {
                    format!("HTTP {status}")
                } else {
                    code.to_string()
                }),
                408 | 429 | 500..=599 => StoreError::Unavailable(text),
                _ => StoreError::Invalid(text),
            }
        }
        _ => StoreError::Unavailable(causes(&err)),
    }
}

/// An error and its causes, each once, joined by ": " ("dispatch failure: io error: ... :
/// Connection refused"): what `s3nfs status` and the logs show. The SDK's own
/// `DisplayErrorContext` appends the whole error's Debug form, which no reader needs.
fn causes(err: &(dyn std::error::Error + 'static)) -> String {
    let mut out = err.to_string();
    let mut cur = err.source();
    while let Some(e) = cur {
        let s = e.to_string();
        if !out.contains(&s) {
            out.push_str(": ");
            out.push_str(&s);
        }
        cur = e.source();
    }
    out
}

/// A GET's body, whole; its length recorded on the request's span.
/// Reads a GET's body into one buffer (from `pool`, sized by the body's announced length) as
/// its frames arrive.
async fn read_body(
    body: aws_sdk_s3::primitives::ByteStream,
    len: Option<i64>,
    pool: &Arc<BufPool>,
    key: &str,
    span: &Span,
) -> StoreResult<Bytes> {
    let mut buf = pool.take(len.unwrap_or(0).clamp(0, 64 << 20) as usize);
    drain_body(body, key, span, &mut |frame: &[u8]| {
        buf.extend_from_slice(frame);
        Ok(())
    })
    .await?;
    Ok(pool.wrap(buf))
}

/// Hands a GET body's frames to `sink` as they arrive; returns how many bytes it took.
async fn drain_body(
    mut body: aws_sdk_s3::primitives::ByteStream,
    key: &str,
    span: &Span,
    sink: &mut ByteSink<'_>,
) -> StoreResult<u64> {
    let mut n = 0u64;
    while let Some(frame) = body.next().await {
        let frame = frame.map_err(|e| StoreError::Unavailable(format!("reading {key}: {e}")))?;
        sink(&frame)?;
        n += frame.len() as u64;
    }
    span.record("bytes", n);
    Ok(n)
}

fn is_invalid_range<E: ProvideErrorMetadata>(err: &SdkError<E, HttpResponse>) -> bool {
    match err {
        SdkError::ServiceError(s) => s.raw().status().as_u16() == 416 || s.err().code() == Some("InvalidRange"),
        _ => false,
    }
}

/// 412: the object named in an `If-Match` (or `x-amz-copy-source-if-match`) is another version.
fn is_precondition_failed<E>(err: &SdkError<E, HttpResponse>) -> bool {
    err.raw_response().is_some_and(|r| r.status().as_u16() == 412)
}

#[async_trait]
impl ObjectStore for S3Store {
    fn describe(&self) -> String {
        format!("s3 bucket {:?} at {}", self.bucket, self.endpoint)
    }

    async fn create_bucket(&self, region: &str) -> StoreResult<()> {
        let span = self.span("CreateBucket", "");
        traced(span, async {
            let mut req = self.client.create_bucket().bucket(&self.bucket);
            // us-east-1 is the one region that must not be named.
            if !region.is_empty() && region != "us-east-1" {
                req = req.create_bucket_configuration(
                    aws_sdk_s3::types::CreateBucketConfiguration::builder()
                        .location_constraint(aws_sdk_s3::types::BucketLocationConstraint::from(region))
                        .build(),
                );
            }
            match req.send().boxed().await {
                Ok(_) => Ok(()),
                Err(e) => {
                    let code = e
                        .as_service_error()
                        .and_then(|s| s.code())
                        .unwrap_or_default()
                        .to_string();
                    match code.as_str() {
                        "BucketAlreadyOwnedByYou" => Ok(()),
                        "BucketAlreadyExists" => Err(StoreError::Invalid(format!(
                            "bucket {} exists and belongs to someone else",
                            self.bucket
                        ))),
                        _ => Err(self.classify(e, "")),
                    }
                }
            }
        })
        .await
    }

    async fn delete_bucket(&self) -> StoreResult<()> {
        let span = self.span("DeleteBucket", "");
        traced(span, async {
            match self.client.delete_bucket().bucket(&self.bucket).send().boxed().await {
                Ok(_) => Ok(()),
                Err(e) => match self.classify(e, "") {
                    StoreError::NoSuchBucket(_) | StoreError::NotFound(_) => Ok(()),
                    other => Err(other),
                },
            }
        })
        .await
    }

    async fn delete_many(&self, keys: &[String]) -> StoreResult<()> {
        use aws_sdk_s3::types::{Delete, ObjectIdentifier};
        for batch in keys.chunks(super::DELETE_BATCH) {
            let span = self.span("DeleteObjects", batch.first().map_or("", |k| k.as_str()));
            traced(span, async {
                let objects = batch
                    .iter()
                    .map(|k| ObjectIdentifier::builder().key(k).build())
                    .collect::<Result<Vec<_>, _>>()
                    .map_err(|e| StoreError::Invalid(e.to_string()))?;
                // Quiet: the reply lists only the keys that failed.
                let delete = Delete::builder()
                    .set_objects(Some(objects))
                    .quiet(true)
                    .build()
                    .map_err(|e| StoreError::Invalid(e.to_string()))?;
                let out = self
                    .client
                    .delete_objects()
                    .bucket(&self.bucket)
                    .delete(delete)
                    .send()
                    .boxed()
                    .await
                    .map_err(|e| self.classify(e, ""))?;
                // A key that does not exist is deleted as far as S3 says; anything else failed.
                let Some(e) = out.errors().iter().find(|e| e.code() != Some("NoSuchKey")) else {
                    return Ok(());
                };
                let what = format!(
                    "DeleteObjects: {} of {} keys not deleted, first {:?}: {} {}",
                    out.errors().len(),
                    batch.len(),
                    e.key().unwrap_or_default(),
                    e.code().unwrap_or_default(),
                    e.message().unwrap_or_default()
                );
                Err(match e.code() {
                    Some("AccessDenied") => StoreError::AccessDenied(what),
                    _ => StoreError::Unavailable(what),
                })
            })
            .await?;
        }
        Ok(())
    }

    async fn check(&self) -> StoreResult<()> {
        let span = self.span("ListObjectsV2", "");
        traced(span, async {
            self.client
                .list_objects_v2()
                .bucket(&self.bucket)
                .max_keys(1)
                .send()
                .boxed()
                .await
                .map_err(|e| self.classify(e, ""))?;
            Ok(())
        })
        .await
    }

    async fn head(&self, key: &str) -> StoreResult<Option<ObjectMeta>> {
        let span = self.span("HeadObject", key);
        traced(span, async {
            let out = match self
                .client
                .head_object()
                .bucket(&self.bucket)
                .key(key)
                .send()
                .boxed()
                .await
            {
                Ok(out) => out,
                Err(e) => {
                    return match self.classify(e, key) {
                        StoreError::NotFound(_) => Ok(None),
                        other => Err(other),
                    }
                }
            };
            Ok(Some(ObjectMeta {
                key: key.to_string(),
                size: out.content_length().unwrap_or(0).max(0) as u64,
                etag: strip_etag(out.e_tag()),
                last_modified: secs(out.last_modified()),
                user: from_map(out.metadata()),
            }))
        })
        .await
    }

    async fn head_and_get(&self, key: &str, max: u64) -> StoreResult<Option<(ObjectMeta, Option<Bytes>)>> {
        if max == 0 {
            return Ok(self.head(key).await?.map(|h| (h, None)));
        }
        let span = self.span("GetObject", key);
        traced(span.clone(), async {
            let out = match self
                .client
                .get_object()
                .bucket(&self.bucket)
                .key(key)
                .range(format!("bytes=0-{}", max - 1))
                .send()
                .boxed()
                .await
            {
                Ok(out) => out,
                // An empty object has no byte 0.
                Err(e) if is_invalid_range(&e) => return Ok(self.head(key).await?.map(|h| (h, Some(Bytes::new())))),
                Err(e) => {
                    return match self.classify(e, key) {
                        StoreError::NotFound(_) => Ok(None),
                        other => Err(other),
                    }
                }
            };
            // "bytes 0-4095/4096": the object's size is after the slash. Without a range in the
            // answer, the whole object came.
            let size = out
                .content_range()
                .and_then(|r| r.rsplit('/').next()?.parse::<u64>().ok())
                .unwrap_or(out.content_length().unwrap_or(0).max(0) as u64);
            let meta = ObjectMeta {
                key: key.to_string(),
                size,
                etag: strip_etag(out.e_tag()),
                last_modified: secs(out.last_modified()),
                user: from_map(out.metadata()),
            };
            let len = out.content_length();
            let data = read_body(out.body, len, &self.bodies, key, &span).await?;
            Ok(Some((meta, Some(data))))
        })
        .await
    }

    async fn get_range(&self, key: &str, range: Range<u64>) -> StoreResult<Bytes> {
        self.get_object_range(key, range, None).await
    }

    async fn get_version_range(&self, key: &str, etag: &str, range: Range<u64>) -> StoreResult<Bytes> {
        self.get_object_range(key, range, Some(etag)).await
    }

    async fn stream_range(
        &self,
        key: &str,
        etag: Option<&str>,
        range: Range<u64>,
        sink: &mut ByteSink<'_>,
    ) -> StoreResult<u64> {
        let span = self.span("GetObject", key);
        traced(span.clone(), async {
            let Some(out) = self.send_range_get(key, range, etag).await? else {
                return Ok(0);
            };
            drain_body(out.body, key, &span, sink).await
        })
        .await
    }

    async fn put(&self, key: &str, body: Body, meta: &UserMeta) -> StoreResult<String> {
        let span = self.span("PutObject", key);
        span.record("bytes", body.len());
        traced(span, async {
            let len = body.len();
            let req = self
                .client
                .put_object()
                .bucket(&self.bucket)
                .key(key)
                .content_length(len as i64)
                .set_metadata(Some(to_map(meta)))
                .body(byte_stream(body).await?);
            let sent = if self.sign_payloads {
                req.send().boxed()
            } else {
                req.customize().disable_payload_signing().send().boxed()
            };
            let out = sent.await.map_err(|e| self.classify(e, key))?;
            Ok(strip_etag(out.e_tag()))
        })
        .await
    }

    async fn copy(&self, src: &str, src_etag: Option<&str>, dst: &str, meta: &UserMeta) -> StoreResult<String> {
        match self.copy_object(src, src_etag, dst, meta).await {
            // S3 copies at most 5 GiB in one CopyObject (and refuses larger sources as an
            // invalid request): those go as a multipart upload of parts copied server-side.
            Err(StoreError::Invalid(e)) => match self.head(src).await? {
                Some(h) if src_etag.is_some_and(|e| e != h.etag) => Err(not_version(src, src_etag)),
                Some(h) if h.size > MAX_COPY_OBJECT => self.copy_version_in_parts(src, &h, dst, meta, COPY_PART).await,
                _ => Err(StoreError::Invalid(e)),
            },
            r => r,
        }
    }

    async fn delete(&self, key: &str) -> StoreResult<()> {
        let span = self.span("DeleteObject", key);
        traced(span, async {
            match self
                .client
                .delete_object()
                .bucket(&self.bucket)
                .key(key)
                .send()
                .boxed()
                .await
            {
                Ok(_) => Ok(()),
                Err(e) => match self.classify(e, key) {
                    StoreError::NotFound(_) => Ok(()),
                    other => Err(other),
                },
            }
        })
        .await
    }

    async fn list(
        &self,
        prefix: &str,
        delimiter: Option<&str>,
        continuation: Option<String>,
        max_keys: usize,
    ) -> StoreResult<ListPage> {
        let span = self.span("ListObjectsV2", prefix);
        traced(span, async {
            let out = self
                .client
                .list_objects_v2()
                .bucket(&self.bucket)
                .prefix(prefix)
                .set_delimiter(delimiter.map(str::to_string))
                .set_continuation_token(continuation)
                .max_keys(max_keys.clamp(1, 1000) as i32)
                .send()
                .boxed()
                .await
                .map_err(|e| self.classify(e, prefix))?;
            let objects = out
                .contents()
                .iter()
                .map(|o| ObjectSummary {
                    key: o.key().unwrap_or_default().to_string(),
                    size: o.size().unwrap_or(0).max(0) as u64,
                    etag: strip_etag(o.e_tag()),
                    last_modified: secs(o.last_modified()),
                })
                .collect();
            let prefixes = out
                .common_prefixes()
                .iter()
                .filter_map(|p| p.prefix().map(str::to_string))
                .collect();
            let next = if out.is_truncated() == Some(true) {
                out.next_continuation_token().map(str::to_string)
            } else {
                None
            };
            Ok(ListPage {
                objects,
                prefixes,
                next,
            })
        })
        .await
    }

    async fn create_multipart(&self, key: &str, meta: &UserMeta) -> StoreResult<String> {
        let span = self.span("CreateMultipartUpload", key);
        traced(span, async {
            let out = self
                .client
                .create_multipart_upload()
                .bucket(&self.bucket)
                .key(key)
                .set_metadata(Some(to_map(meta)))
                .send()
                .boxed()
                .await
                .map_err(|e| self.classify(e, key))?;
            out.upload_id()
                .map(str::to_string)
                .ok_or_else(|| StoreError::Invalid("CreateMultipartUpload returned no upload id".into()))
        })
        .await
    }

    async fn upload_part(&self, key: &str, upload_id: &str, number: i32, body: Body) -> StoreResult<String> {
        let span = self.span("UploadPart", key);
        span.record("bytes", body.len());
        traced(span, async {
            let len = body.len();
            let req = self
                .client
                .upload_part()
                .bucket(&self.bucket)
                .key(key)
                .upload_id(upload_id)
                .part_number(number)
                .content_length(len as i64)
                .body(byte_stream(body).await?);
            let sent = if self.sign_payloads {
                req.send().boxed()
            } else {
                req.customize().disable_payload_signing().send().boxed()
            };
            let out = sent.await.map_err(|e| self.classify(e, key))?;
            Ok(strip_etag(out.e_tag()))
        })
        .await
    }

    async fn upload_part_copy(
        &self,
        key: &str,
        upload_id: &str,
        number: i32,
        src: &str,
        src_etag: &str,
        range: Range<u64>,
    ) -> StoreResult<String> {
        let span = self.span("UploadPartCopy", key);
        span.record("bytes", range.end.saturating_sub(range.start));
        traced(span, async {
            if range.start >= range.end {
                return Err(StoreError::Invalid(format!(
                    "empty range {range:?} for UploadPartCopy from {src}"
                )));
            }
            let out = self
                .client
                .upload_part_copy()
                .bucket(&self.bucket)
                .key(key)
                .upload_id(upload_id)
                .part_number(number)
                .copy_source(self.copy_source(src))
                .copy_source_if_match(format!("\"{src_etag}\""))
                .copy_source_range(format!("bytes={}-{}", range.start, range.end - 1))
                .send()
                .boxed()
                .await
                .map_err(|e| {
                    // 412: the source is another version now.
                    if is_precondition_failed(&e) {
                        return not_version(src, Some(src_etag));
                    }
                    self.classify(e, src)
                })?;
            Ok(strip_etag(out.copy_part_result().and_then(|r| r.e_tag())))
        })
        .await
    }

    async fn complete_multipart(&self, key: &str, upload_id: &str, parts: &[Part]) -> StoreResult<String> {
        let span = self.span("CompleteMultipartUpload", key);
        traced(span, async {
            let completed = CompletedMultipartUpload::builder()
                .set_parts(Some(
                    parts
                        .iter()
                        .map(|p| {
                            CompletedPart::builder()
                                .part_number(p.number)
                                .e_tag(quote_etag(&p.etag))
                                .build()
                        })
                        .collect(),
                ))
                .build();
            let out = self
                .client
                .complete_multipart_upload()
                .bucket(&self.bucket)
                .key(key)
                .upload_id(upload_id)
                .multipart_upload(completed)
                .send()
                .boxed()
                .await
                .map_err(|e| self.classify(e, key))?;
            Ok(strip_etag(out.e_tag()))
        })
        .await
    }

    async fn abort_multipart(&self, key: &str, upload_id: &str) -> StoreResult<()> {
        let span = self.span("AbortMultipartUpload", key);
        traced(span, async {
            match self
                .client
                .abort_multipart_upload()
                .bucket(&self.bucket)
                .key(key)
                .upload_id(upload_id)
                .send()
                .boxed()
                .await
            {
                Ok(_) => Ok(()),
                Err(e) => match self.classify(e, key) {
                    StoreError::NotFound(_) => Ok(()),
                    other => Err(other),
                },
            }
        })
        .await
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn copy_source_encoding() {
        assert_eq!(encode_key("a/b c+d%é"), "a/b%20c%2Bd%25%C3%A9");
        assert_eq!(encode_key("x-y_z.~/"), "x-y_z.~/");
    }

    #[test]
    fn secret_is_not_printed() {
        let cfg = S3Config {
            secret_key: Some(Secret("hunter2".into())),
            ..Default::default()
        };
        assert!(!format!("{cfg:?}").contains("hunter2"));
    }

    #[test]
    fn etags() {
        assert_eq!(strip_etag(Some("\"abc\"")), "abc");
        assert_eq!(quote_etag("abc"), "\"abc\"");
        assert_eq!(quote_etag("\"abc\""), "\"abc\"");
    }
}
