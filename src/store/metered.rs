//! A store decorator that counts and times every request of the store it wraps, into the
//! process's metrics registry (`s3nfs_s3_*`, see [`crate::metrics`]). Every volume's store is
//! wrapped in it once, where the store is built.

use std::ops::Range;
use std::sync::atomic::Ordering;
use std::sync::Arc;

use async_trait::async_trait;
use bytes::Bytes;

use super::{Body, ByteSink, ListPage, ObjectMeta, ObjectStore, Part, StoreError, StoreResult, UserMeta};
use crate::metrics::global;

/// Counts and times every request of the store it wraps (`s3nfs_s3_*`).
pub struct MeteredStore {
    inner: Arc<dyn ObjectStore>,
}

impl MeteredStore {
    pub fn wrap(inner: Arc<dyn ObjectStore>) -> Arc<dyn ObjectStore> {
        Arc::new(MeteredStore { inner })
    }
}

async fn metered<T>(op: &'static str, f: impl std::future::Future<Output = StoreResult<T>>) -> StoreResult<T> {
    let start = crate::clock::stopwatch();
    let r = f.await;
    // A missing object is an answer, not a failure worth alerting on.
    let ok = matches!(&r, Ok(_) | Err(StoreError::NotFound(_)));
    global().s3_request(op, start.elapsed(), ok);
    r
}

#[async_trait]
impl ObjectStore for MeteredStore {
    fn describe(&self) -> String {
        self.inner.describe()
    }
    async fn check(&self) -> StoreResult<()> {
        self.inner.check().await
    }
    async fn head(&self, key: &str) -> StoreResult<Option<ObjectMeta>> {
        metered("HeadObject", self.inner.head(key)).await
    }
    async fn head_and_get(&self, key: &str, max: u64) -> StoreResult<Option<(ObjectMeta, Option<Bytes>)>> {
        let op = if max == 0 { "HeadObject" } else { "GetObject" };
        let r = metered(op, self.inner.head_and_get(key, max)).await;
        if let Ok(Some((_, Some(b)))) = &r {
            global().s3_received_bytes.fetch_add(b.len() as u64, Ordering::Relaxed);
        }
        r
    }
    async fn get_range(&self, key: &str, range: Range<u64>) -> StoreResult<Bytes> {
        let r = metered("GetObject", self.inner.get_range(key, range)).await;
        if let Ok(b) = &r {
            global().s3_received_bytes.fetch_add(b.len() as u64, Ordering::Relaxed);
        }
        r
    }
    async fn get_version_range(&self, key: &str, etag: &str, range: Range<u64>) -> StoreResult<Bytes> {
        let r = metered("GetObject", self.inner.get_version_range(key, etag, range)).await;
        if let Ok(b) = &r {
            global().s3_received_bytes.fetch_add(b.len() as u64, Ordering::Relaxed);
        }
        r
    }
    async fn stream_range(
        &self,
        key: &str,
        etag: Option<&str>,
        range: Range<u64>,
        sink: &mut ByteSink<'_>,
    ) -> StoreResult<u64> {
        let r = metered("GetObject", self.inner.stream_range(key, etag, range, sink)).await;
        if let Ok(n) = &r {
            global().s3_received_bytes.fetch_add(*n, Ordering::Relaxed);
        }
        r
    }
    async fn put(&self, key: &str, body: Body, meta: &UserMeta) -> StoreResult<String> {
        let n = body.len();
        let r = metered("PutObject", self.inner.put(key, body, meta)).await;
        if r.is_ok() {
            global().s3_sent_bytes.fetch_add(n, Ordering::Relaxed);
        }
        r
    }
    async fn copy(&self, src: &str, src_etag: Option<&str>, dst: &str, meta: &UserMeta) -> StoreResult<String> {
        metered("CopyObject", self.inner.copy(src, src_etag, dst, meta)).await
    }
    async fn delete(&self, key: &str) -> StoreResult<()> {
        metered("DeleteObject", self.inner.delete(key)).await
    }
    async fn delete_many(&self, keys: &[String]) -> StoreResult<()> {
        metered("DeleteObjects", self.inner.delete_many(keys)).await
    }
    async fn create_bucket(&self, region: &str) -> StoreResult<()> {
        metered("CreateBucket", self.inner.create_bucket(region)).await
    }
    async fn delete_bucket(&self) -> StoreResult<()> {
        metered("DeleteBucket", self.inner.delete_bucket()).await
    }
    async fn list(
        &self,
        prefix: &str,
        delimiter: Option<&str>,
        continuation: Option<String>,
        max_keys: usize,
    ) -> StoreResult<ListPage> {
        metered(
            "ListObjectsV2",
            self.inner.list(prefix, delimiter, continuation, max_keys),
        )
        .await
    }
    async fn create_multipart(&self, key: &str, meta: &UserMeta) -> StoreResult<String> {
        metered("CreateMultipartUpload", self.inner.create_multipart(key, meta)).await
    }
    async fn upload_part(&self, key: &str, upload_id: &str, number: i32, body: Body) -> StoreResult<String> {
        let n = body.len();
        let r = metered("UploadPart", self.inner.upload_part(key, upload_id, number, body)).await;
        if r.is_ok() {
            global().s3_sent_bytes.fetch_add(n, Ordering::Relaxed);
        }
        r
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
        metered(
            "UploadPartCopy",
            self.inner
                .upload_part_copy(key, upload_id, number, src, src_etag, range),
        )
        .await
    }
    async fn complete_multipart(&self, key: &str, upload_id: &str, parts: &[Part]) -> StoreResult<String> {
        metered(
            "CompleteMultipartUpload",
            self.inner.complete_multipart(key, upload_id, parts),
        )
        .await
    }
    async fn abort_multipart(&self, key: &str, upload_id: &str) -> StoreResult<()> {
        metered("AbortMultipartUpload", self.inner.abort_multipart(key, upload_id)).await
    }
}
