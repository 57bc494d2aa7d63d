//! Where the CSI services get their stores: one seam, injected ([`Connector`]), so that the
//! same services run on S3 in production and on embedded stores, with or without injected
//! faults, in tests (as csi-driver-nfs's services run on its fake mounter).
//!
//! - [`S3Connector`]: one S3 client per bucket asked for, metered.
//! - [`LocalBuckets`]: buckets as directories under one root, each an embedded store
//!   ([`LocalStore`]), created and deleted as S3 creates and deletes buckets; optionally each
//!   wrapped (a [`super::faulty::FaultyStore`] sharing one switch).

use std::collections::HashMap;
use std::ops::Range;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};

use async_trait::async_trait;
use bytes::Bytes;

use super::local::LocalStore;
use super::s3::{S3Config, S3Store};
use super::{Body, ByteSink, ListPage, ObjectMeta, ObjectStore, Part, StoreError, StoreResult, UserMeta};
use crate::sync::LockExt;

/// Makes the store of one bucket from the settings a CSI Secret and volume id give.
#[async_trait]
pub trait Connector: Send + Sync + 'static {
    /// A client for `cfg.bucket`. It does not check that the bucket exists: the first request
    /// says so (`NoSuchBucket`). An error here is a setting that cannot work (a malformed
    /// endpoint, no credentials).
    async fn connect(&self, cfg: &S3Config) -> anyhow::Result<Arc<dyn ObjectStore>>;
}

/// S3 itself.
pub struct S3Connector;

#[async_trait]
impl Connector for S3Connector {
    async fn connect(&self, cfg: &S3Config) -> anyhow::Result<Arc<dyn ObjectStore>> {
        let store = S3Store::connect(cfg.clone()).await?;
        Ok(super::metered::MeteredStore::wrap(Arc::new(store)))
    }
}

type Wrap = dyn Fn(Arc<dyn ObjectStore>) -> Arc<dyn ObjectStore> + Send + Sync;

/// Buckets as directories under `root` (see the module docs). Endpoints and credentials are
/// ignored: every caller reaches the same buckets.
pub struct LocalBuckets {
    root: PathBuf,
    /// A bucket's store once opened: an embedded store locks its directory, so every client of
    /// one bucket shares one store.
    open: Arc<Mutex<HashMap<String, LocalStore>>>,
    wrap: Option<Box<Wrap>>,
}

impl LocalBuckets {
    pub fn new(root: impl Into<PathBuf>) -> LocalBuckets {
        LocalBuckets {
            root: root.into(),
            open: Default::default(),
            wrap: None,
        }
    }

    /// Every store handed out is `wrap(store)`.
    pub fn wrapped(
        mut self,
        wrap: impl Fn(Arc<dyn ObjectStore>) -> Arc<dyn ObjectStore> + Send + Sync + 'static,
    ) -> Self {
        self.wrap = Some(Box::new(wrap));
        self
    }
}

#[async_trait]
impl Connector for LocalBuckets {
    async fn connect(&self, cfg: &S3Config) -> anyhow::Result<Arc<dyn ObjectStore>> {
        anyhow::ensure!(
            !cfg.bucket.is_empty() && !cfg.bucket.contains(['/', '\0']) && cfg.bucket != "." && cfg.bucket != "..",
            "invalid bucket name {:?}",
            cfg.bucket
        );
        let store: Arc<dyn ObjectStore> = Arc::new(LocalBucket {
            name: cfg.bucket.clone(),
            dir: self.root.join(&cfg.bucket),
            open: self.open.clone(),
        });
        Ok(match &self.wrap {
            Some(w) => w(store),
            None => store,
        })
    }
}

/// One bucket of [`LocalBuckets`]: its directory is the bucket, and requests to a bucket
/// without one fail as S3's do (`NoSuchBucket`).
struct LocalBucket {
    name: String,
    dir: PathBuf,
    open: Arc<Mutex<HashMap<String, LocalStore>>>,
}

impl LocalBucket {
    /// The bucket's store; `NoSuchBucket` when it was never created or has been deleted.
    fn store(&self) -> StoreResult<LocalStore> {
        let mut open = self.open.locked();
        if let Some(s) = open.get(&self.name) {
            return Ok(s.clone());
        }
        if !self.dir.is_dir() {
            return Err(StoreError::NoSuchBucket(self.name.clone()));
        }
        let s = LocalStore::open(&self.dir)?;
        open.insert(self.name.clone(), s.clone());
        Ok(s)
    }
}

#[async_trait]
impl ObjectStore for LocalBucket {
    fn describe(&self) -> String {
        format!("local bucket {:?} in {}", self.name, self.dir.display())
    }
    async fn check(&self) -> StoreResult<()> {
        self.store()?.check().await
    }
    async fn head(&self, key: &str) -> StoreResult<Option<ObjectMeta>> {
        self.store()?.head(key).await
    }
    async fn get_range(&self, key: &str, range: Range<u64>) -> StoreResult<Bytes> {
        self.store()?.get_range(key, range).await
    }
    async fn get_version_range(&self, key: &str, etag: &str, range: Range<u64>) -> StoreResult<Bytes> {
        self.store()?.get_version_range(key, etag, range).await
    }
    async fn stream_range(
        &self,
        key: &str,
        etag: Option<&str>,
        range: Range<u64>,
        sink: &mut ByteSink<'_>,
    ) -> StoreResult<u64> {
        self.store()?.stream_range(key, etag, range, sink).await
    }
    async fn put(&self, key: &str, body: Body, meta: &UserMeta) -> StoreResult<String> {
        self.store()?.put(key, body, meta).await
    }
    async fn copy(&self, src: &str, src_etag: Option<&str>, dst: &str, meta: &UserMeta) -> StoreResult<String> {
        self.store()?.copy(src, src_etag, dst, meta).await
    }
    async fn delete(&self, key: &str) -> StoreResult<()> {
        self.store()?.delete(key).await
    }
    async fn list(
        &self,
        prefix: &str,
        delimiter: Option<&str>,
        continuation: Option<String>,
        max_keys: usize,
    ) -> StoreResult<ListPage> {
        self.store()?.list(prefix, delimiter, continuation, max_keys).await
    }
    async fn create_multipart(&self, key: &str, meta: &UserMeta) -> StoreResult<String> {
        self.store()?.create_multipart(key, meta).await
    }
    async fn upload_part(&self, key: &str, upload_id: &str, number: i32, body: Body) -> StoreResult<String> {
        self.store()?.upload_part(key, upload_id, number, body).await
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
        self.store()?
            .upload_part_copy(key, upload_id, number, src, src_etag, range)
            .await
    }
    async fn complete_multipart(&self, key: &str, upload_id: &str, parts: &[Part]) -> StoreResult<String> {
        self.store()?.complete_multipart(key, upload_id, parts).await
    }
    async fn abort_multipart(&self, key: &str, upload_id: &str) -> StoreResult<()> {
        self.store()?.abort_multipart(key, upload_id).await
    }

    async fn create_bucket(&self, _region: &str) -> StoreResult<()> {
        std::fs::create_dir_all(&self.dir)?;
        self.store().map(drop)
    }

    async fn delete_bucket(&self) -> StoreResult<()> {
        let store = match self.store() {
            Ok(s) => s,
            Err(StoreError::NoSuchBucket(_)) => return Ok(()),
            Err(e) => return Err(e),
        };
        let page = store.list("", None, None, 1).await?;
        if !page.objects.is_empty() {
            // S3 answers 409 BucketNotEmpty.
            return Err(StoreError::Invalid(format!("bucket {} is not empty", self.name)));
        }
        let mut open = self.open.locked();
        open.remove(&self.name);
        drop(store);
        std::fs::remove_dir_all(&self.dir)?;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cfg(bucket: &str) -> S3Config {
        S3Config {
            endpoint: None,
            bucket: bucket.into(),
            region: String::new(),
            path_style: true,
            access_key: None,
            secret_key: None,
            session_token: None,
        }
    }

    #[tokio::test]
    async fn local_buckets_exist_between_their_creation_and_deletion() {
        let dir = tempfile::tempdir().unwrap();
        let buckets = LocalBuckets::new(dir.path());
        let a = buckets.connect(&cfg("a")).await.unwrap();
        assert_eq!(a.head("k").await, Err(StoreError::NoSuchBucket("a".into())));
        a.create_bucket("").await.unwrap();
        a.create_bucket("").await.unwrap(); // ours already: fine, as S3's BucketAlreadyOwnedByYou
        a.put("k", Body::Bytes(Bytes::from_static(b"v")), &Default::default())
            .await
            .unwrap();
        // A second client of the same bucket sees the same objects.
        let a2 = buckets.connect(&cfg("a")).await.unwrap();
        assert_eq!(a2.head("k").await.unwrap().unwrap().size, 1);
        assert!(matches!(a2.delete_bucket().await, Err(StoreError::Invalid(_))));
        a2.delete_many(&["k".to_string(), "absent".to_string()]).await.unwrap();
        a2.delete_bucket().await.unwrap();
        assert_eq!(a.head("k").await, Err(StoreError::NoSuchBucket("a".into())));
        a.delete_bucket().await.unwrap(); // gone already: fine
        assert!(!dir.path().join("a").exists());
        assert!(buckets.connect(&cfg("../x")).await.is_err());
    }
}
