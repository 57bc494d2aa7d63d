//! A store that stops writing the moment its fence is raised: a ReadWriteMany owner that
//! loses its lease raises it before anything else, so that nothing it still has queued (an
//! upload round, a streaming part, a deletion) reaches S3 after a new owner may have started.
//!
//! Reads go on: they change nothing. A request already sent when the fence goes up cannot be
//! recalled; the owner raises it `duration - renew_deadline` (5 s by default) before any other
//! node may take over (see [`crate::cluster::elect`]).

use std::ops::Range;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use async_trait::async_trait;
use bytes::Bytes;

use super::{Body, ByteSink, ListPage, ObjectMeta, ObjectStore, Part, StoreError, StoreResult, UserMeta};

/// Raised once, never lowered: a fenced gateway is thrown away.
#[derive(Debug, Clone, Default)]
pub struct Fence(Arc<AtomicBool>);

impl Fence {
    pub fn raise(&self) {
        self.0.store(true, Ordering::Release);
    }

    pub fn is_raised(&self) -> bool {
        self.0.load(Ordering::Acquire)
    }
}

pub struct FencedStore {
    inner: Arc<dyn ObjectStore>,
    fence: Fence,
}

impl FencedStore {
    pub fn wrap(inner: Arc<dyn ObjectStore>, fence: Fence) -> Arc<dyn ObjectStore> {
        Arc::new(FencedStore { inner, fence })
    }

    fn writable(&self) -> StoreResult<()> {
        if self.fence.is_raised() {
            return Err(StoreError::Unavailable(
                "fenced: this gateway no longer owns the volume".into(),
            ));
        }
        Ok(())
    }
}

#[async_trait]
impl ObjectStore for FencedStore {
    fn describe(&self) -> String {
        self.inner.describe()
    }
    async fn check(&self) -> StoreResult<()> {
        self.inner.check().await
    }
    async fn head(&self, key: &str) -> StoreResult<Option<ObjectMeta>> {
        self.inner.head(key).await
    }
    async fn head_and_get(&self, key: &str, max: u64) -> StoreResult<Option<(ObjectMeta, Option<Bytes>)>> {
        self.inner.head_and_get(key, max).await
    }
    async fn get_range(&self, key: &str, range: Range<u64>) -> StoreResult<Bytes> {
        self.inner.get_range(key, range).await
    }
    async fn get_version_range(&self, key: &str, etag: &str, range: Range<u64>) -> StoreResult<Bytes> {
        self.inner.get_version_range(key, etag, range).await
    }
    async fn stream_range(
        &self,
        key: &str,
        etag: Option<&str>,
        range: Range<u64>,
        sink: &mut ByteSink<'_>,
    ) -> StoreResult<u64> {
        self.inner.stream_range(key, etag, range, sink).await
    }
    async fn put(&self, key: &str, body: Body, meta: &UserMeta) -> StoreResult<String> {
        self.writable()?;
        self.inner.put(key, body, meta).await
    }
    async fn copy(&self, src: &str, src_etag: Option<&str>, dst: &str, meta: &UserMeta) -> StoreResult<String> {
        self.writable()?;
        self.inner.copy(src, src_etag, dst, meta).await
    }
    async fn delete(&self, key: &str) -> StoreResult<()> {
        self.writable()?;
        self.inner.delete(key).await
    }
    async fn delete_many(&self, keys: &[String]) -> StoreResult<()> {
        self.writable()?;
        self.inner.delete_many(keys).await
    }
    async fn create_bucket(&self, region: &str) -> StoreResult<()> {
        self.writable()?;
        self.inner.create_bucket(region).await
    }
    async fn delete_bucket(&self) -> StoreResult<()> {
        self.writable()?;
        self.inner.delete_bucket().await
    }
    async fn list(
        &self,
        prefix: &str,
        delimiter: Option<&str>,
        continuation: Option<String>,
        max_keys: usize,
    ) -> StoreResult<ListPage> {
        self.inner.list(prefix, delimiter, continuation, max_keys).await
    }
    async fn create_multipart(&self, key: &str, meta: &UserMeta) -> StoreResult<String> {
        self.writable()?;
        self.inner.create_multipart(key, meta).await
    }
    async fn upload_part(&self, key: &str, upload_id: &str, number: i32, body: Body) -> StoreResult<String> {
        self.writable()?;
        self.inner.upload_part(key, upload_id, number, body).await
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
        self.writable()?;
        self.inner
            .upload_part_copy(key, upload_id, number, src, src_etag, range)
            .await
    }
    async fn complete_multipart(&self, key: &str, upload_id: &str, parts: &[Part]) -> StoreResult<String> {
        self.writable()?;
        self.inner.complete_multipart(key, upload_id, parts).await
    }
    async fn abort_multipart(&self, key: &str, upload_id: &str) -> StoreResult<()> {
        // Aborting only undoes: harmless after the fence, and it frees the parts.
        self.inner.abort_multipart(key, upload_id).await
    }
}
