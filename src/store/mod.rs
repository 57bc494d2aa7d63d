//! The object store: the one seam between the filesystem and S3.
//!
//! Everything above this trait (namespace, staging, uploads, reads) is the same code whichever
//! store sits below it, as Mountpoint's `ObjectClient` is. Three implementations:
//! - [`s3::S3Store`]: aws-sdk-s3 against any S3-compatible service (AWS, MinIO, Garage);
//! - [`local::LocalStore`]: the embedded default, objects in a local directory, with S3's key
//!   semantics (`a` beside `a/b`, `d/` markers, delimiter listings with common prefixes);
//! - [`faulty::FaultyStore`]: wraps another store and injects errors, delays and dropped
//!   connections, for the error-path tests.
//!
//! [`metered::MeteredStore`] wraps any of them to count and time its requests.
//!
//! Keys passed here are full keys (the volume prefix already applied). User metadata is given
//! without the `x-amz-meta-` prefix (`mode`, `uid`, `gid`, `mtime`), as s3fs and geesefs name it.

use std::collections::BTreeMap;
use std::ops::Range;
use std::path::PathBuf;

use async_trait::async_trait;
use bytes::Bytes;

pub mod connect;
mod etag;
pub mod faulty;
pub mod fenced;
pub mod local;
pub mod metered;
pub mod pool;
pub mod s3;

pub use etag::multipart_etag;

/// User metadata, keys without the `x-amz-meta-` prefix, lower case.
pub type UserMeta = BTreeMap<String, String>;

/// What HEAD tells about one object.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ObjectMeta {
    pub key: String,
    pub size: u64,
    /// ETag as the service returns it, quotes stripped.
    pub etag: String,
    /// Last-Modified, seconds since the epoch.
    pub last_modified: i64,
    pub user: UserMeta,
}

/// One object in a listing (listings carry no user metadata in S3).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ObjectSummary {
    pub key: String,
    pub size: u64,
    pub etag: String,
    pub last_modified: i64,
}

/// One page of ListObjectsV2.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ListPage {
    /// Objects, in key order.
    pub objects: Vec<ObjectSummary>,
    /// Common prefixes (each ends with the delimiter), in key order. Empty without a delimiter.
    pub prefixes: Vec<String>,
    /// Continuation token for the next page; `None` when this page is the last.
    pub next: Option<String>,
}

/// The bytes of a PUT or UploadPart. Bodies are held in memory at most one part at a time:
/// callers read a part from the staging file and hand it over as `Bytes`.
#[derive(Debug, Clone)]
pub enum Body {
    Bytes(Bytes),
    /// `len` bytes of a local file starting at `offset`, streamed from disk.
    File {
        path: PathBuf,
        offset: u64,
        len: u64,
    },
}

impl Body {
    pub fn len(&self) -> u64 {
        match self {
            Body::Bytes(b) => b.len() as u64,
            Body::File { len, .. } => *len,
        }
    }
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// A completed part of a multipart upload.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Part {
    pub number: i32,
    pub etag: String,
}

/// Store errors, classified by what the caller can do about them.
#[derive(Debug, Clone, thiserror::Error, PartialEq, Eq)]
pub enum StoreError {
    /// The object (or upload) does not exist.
    #[error("not found: {0}")]
    NotFound(String),
    /// The bucket does not exist.
    #[error("bucket {0:?} does not exist: create it or fix --bucket")]
    NoSuchBucket(String),
    /// 403, bad signature, unknown access key.
    #[error("access denied ({0}): check the access key, secret key and the bucket policy")]
    AccessDenied(String),
    /// 5xx, throttling, timeouts, refused or dropped connections: worth retrying later.
    #[error("S3 unavailable: {0}")]
    Unavailable(String),
    /// The service refused the request as invalid (e.g. key too long, part too small).
    #[error("invalid request: {0}")]
    Invalid(String),
    /// A local I/O error (embedded store, or reading a body file).
    #[error("local I/O error: {0}")]
    Io(String),
}

impl StoreError {
    /// True when trying again later may succeed.
    pub fn is_transient(&self) -> bool {
        matches!(self, StoreError::Unavailable(_) | StoreError::Io(_))
    }
}

impl From<std::io::Error> for StoreError {
    fn from(e: std::io::Error) -> Self {
        StoreError::Io(e.to_string())
    }
}

pub type StoreResult<T> = Result<T, StoreError>;

/// Where [`ObjectStore::stream_range`] hands the bytes it receives, in order.
pub type ByteSink<'a> = dyn for<'b> FnMut(&'b [u8]) -> std::io::Result<()> + Send + 'a;

/// The operations the filesystem needs from S3, and nothing more.
#[async_trait]
pub trait ObjectStore: Send + Sync + 'static {
    /// A short description for logs and the start-up banner (never credentials).
    fn describe(&self) -> String;

    /// Whether this store refuses every write for good: a fenced gateway's (see [`fenced`]).
    fn fenced(&self) -> bool {
        false
    }

    /// Checks that the bucket exists and the credentials may list it. Called once at start-up
    /// so a wrong bucket or key stops the gateway with a clear message instead of serving errors.
    async fn check(&self) -> StoreResult<()>;

    /// HEAD. `Ok(None)` when the object does not exist.
    async fn head(&self, key: &str) -> StoreResult<Option<ObjectMeta>>;

    /// What HEAD says of an object, and its first `max` bytes when the store can have both from
    /// one request (S3: a ranged GET carries the object's metadata headers), so that opening a
    /// small file costs one round trip, not a HEAD and then a GET. The bytes are of the same
    /// version as the metadata. `Ok(None)` when the object does not exist. Stores without such
    /// a request answer a HEAD and no bytes.
    async fn head_and_get(&self, key: &str, max: u64) -> StoreResult<Option<(ObjectMeta, Option<Bytes>)>> {
        let _ = max;
        Ok(self.head(key).await?.map(|h| (h, None)))
    }

    /// Ranged GET of `range` (end exclusive). A range past the end returns the bytes that exist
    /// (possibly none). `NotFound` when the object does not exist.
    async fn get_range(&self, key: &str, range: Range<u64>) -> StoreResult<Bytes>;

    /// [`ObjectStore::get_range`] of the version whose ETag is `etag` only (S3: `If-Match`):
    /// [`StoreError::NotFound`] when the object is gone or is another version now. A file read
    /// in several requests is then all of one version, never a mix of two.
    async fn get_version_range(&self, key: &str, etag: &str, range: Range<u64>) -> StoreResult<Bytes>;

    /// Bytes `range` of `key` (of the version `etag` only, when given, as
    /// [`ObjectStore::get_version_range`]) handed to `sink` in order as they arrive: one request
    /// however large the range, with memory holding what the connection delivers at a time, not
    /// the range. Returns how many bytes `sink` took (fewer than asked past the end). A failure
    /// part-way leaves `sink` with some of the bytes: the caller takes the range as not read.
    /// Stores without a streamed body hand over the whole range at once.
    async fn stream_range(
        &self,
        key: &str,
        etag: Option<&str>,
        range: Range<u64>,
        sink: &mut ByteSink<'_>,
    ) -> StoreResult<u64> {
        let bytes = match etag {
            Some(e) => self.get_version_range(key, e, range).await?,
            None => self.get_range(key, range).await?,
        };
        sink(&bytes)?;
        Ok(bytes.len() as u64)
    }

    /// PUT with user metadata; returns the new ETag.
    async fn put(&self, key: &str, body: Body, meta: &UserMeta) -> StoreResult<String>;

    /// Server-side copy with the metadata replaced (`x-amz-metadata-directive: REPLACE`).
    /// `src == dst` is allowed and rewrites the metadata. Returns the new ETag. Any size: S3
    /// copies sources past 5 GiB in parts (see `S3Store::copy_in_parts`). With `src_etag`, only
    /// that version of `src` is copied (`x-amz-copy-source-if-match`): [`StoreError::NotFound`]
    /// when `src` is gone or is another version now.
    async fn copy(&self, src: &str, src_etag: Option<&str>, dst: &str, meta: &UserMeta) -> StoreResult<String>;

    /// DELETE. Succeeds when the object does not exist.
    async fn delete(&self, key: &str) -> StoreResult<()>;

    /// ListObjectsV2 of `prefix`, with an optional delimiter, at most `max_keys` entries.
    async fn list(
        &self,
        prefix: &str,
        delimiter: Option<&str>,
        continuation: Option<String>,
        max_keys: usize,
    ) -> StoreResult<ListPage>;

    /// Starts a multipart upload; returns its upload id.
    async fn create_multipart(&self, key: &str, meta: &UserMeta) -> StoreResult<String>;

    /// Uploads (or replaces) part `number` (1-based); returns its ETag.
    async fn upload_part(&self, key: &str, upload_id: &str, number: i32, body: Body) -> StoreResult<String>;

    /// Part `number` taken server-side from `range` of `src`, provided `src` is still the version
    /// whose ETag is `src_etag` (`x-amz-copy-source-if-match`); returns the part's ETag.
    /// [`StoreError::NotFound`] when `src` is gone or is another version now.
    async fn upload_part_copy(
        &self,
        key: &str,
        upload_id: &str,
        number: i32,
        src: &str,
        src_etag: &str,
        range: Range<u64>,
    ) -> StoreResult<String>;

    /// Completes the upload from `parts` (ascending numbers); returns the object's ETag.
    async fn complete_multipart(&self, key: &str, upload_id: &str, parts: &[Part]) -> StoreResult<String>;

    /// Aborts the upload. Succeeds when it no longer exists.
    async fn abort_multipart(&self, key: &str, upload_id: &str) -> StoreResult<()>;

    /// Deletes `keys` (S3: DeleteObjects, up to [`DELETE_BATCH`] keys a request). Keys that do
    /// not exist count as deleted. Stores without a batch request delete one key at a time.
    async fn delete_many(&self, keys: &[String]) -> StoreResult<()> {
        for k in keys {
            self.delete(k).await?;
        }
        Ok(())
    }

    /// Bucket administration (the CSI controller's CreateVolume): creates the store's bucket in
    /// `region`. Succeeds when it exists already and belongs to the caller.
    async fn create_bucket(&self, region: &str) -> StoreResult<()> {
        let _ = region;
        Err(StoreError::Invalid(format!(
            "{} cannot create buckets",
            self.describe()
        )))
    }

    /// Bucket administration (DeleteVolume): deletes the store's bucket, which must be empty.
    /// Succeeds when it does not exist.
    async fn delete_bucket(&self) -> StoreResult<()> {
        Err(StoreError::Invalid(format!(
            "{} cannot delete buckets",
            self.describe()
        )))
    }
}

/// Keys per DeleteObjects request: S3's limit.
pub const DELETE_BATCH: usize = 1000;
