//! A store that stops writing the moment its fence is raised: a ReadWriteMany owner that
//! loses its lease raises it before anything else, so that nothing it still has queued (an
//! upload round, a streaming part, a deletion) reaches S3 after a new owner may have started.
//!
//! Reads go on: they change nothing. A write under way when the fence goes up is given up at
//! once: its request is cancelled, and the retries the S3 client would make (for minutes, as
//! its timeouts allow) are never sent. One whose bytes had all reached S3 may still land; the
//! owner raises the fence `duration - renew_deadline` (5 s by default) before any other node
//! may take over (see [`crate::cluster::elect`]), which is the margin for those.

use std::future::Future;
use std::ops::Range;
use std::sync::Arc;

use async_trait::async_trait;
use bytes::Bytes;

use super::{Body, ByteSink, ListPage, ObjectMeta, ObjectStore, Part, StoreError, StoreResult, UserMeta};

/// Raised once, never lowered: a fenced gateway is thrown away.
#[derive(Debug, Clone)]
pub struct Fence(Arc<tokio::sync::watch::Sender<bool>>);

impl Default for Fence {
    fn default() -> Fence {
        Fence(Arc::new(tokio::sync::watch::Sender::new(false)))
    }
}

impl Fence {
    pub fn raise(&self) {
        self.0.send_replace(true);
    }

    pub fn is_raised(&self) -> bool {
        *self.0.borrow()
    }

    /// Returns once the fence is up.
    pub async fn raised(&self) {
        let mut up = self.0.subscribe();
        let _ = up.wait_for(|r| *r).await;
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

    /// Runs `write` unless the fence is up, and gives it up the moment the fence goes up.
    async fn write<T>(&self, write: impl Future<Output = StoreResult<T>>) -> StoreResult<T> {
        let fenced = || {
            Err(StoreError::Unavailable(
                "fenced: this gateway no longer owns the volume".into(),
            ))
        };
        if self.fence.is_raised() {
            return fenced();
        }
        tokio::select! {
            biased;
            () = self.fence.raised() => fenced(),
            r = write => r,
        }
    }
}

#[async_trait]
impl ObjectStore for FencedStore {
    fn describe(&self) -> String {
        self.inner.describe()
    }
    fn fenced(&self) -> bool {
        self.fence.is_raised()
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
        self.write(self.inner.put(key, body, meta)).await
    }
    async fn copy(&self, src: &str, src_etag: Option<&str>, dst: &str, meta: &UserMeta) -> StoreResult<String> {
        self.write(self.inner.copy(src, src_etag, dst, meta)).await
    }
    async fn delete(&self, key: &str) -> StoreResult<()> {
        self.write(self.inner.delete(key)).await
    }
    async fn delete_many(&self, keys: &[String]) -> StoreResult<()> {
        self.write(self.inner.delete_many(keys)).await
    }
    async fn create_bucket(&self, region: &str) -> StoreResult<()> {
        self.write(self.inner.create_bucket(region)).await
    }
    async fn delete_bucket(&self) -> StoreResult<()> {
        self.write(self.inner.delete_bucket()).await
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
        self.write(self.inner.create_multipart(key, meta)).await
    }
    async fn upload_part(&self, key: &str, upload_id: &str, number: i32, body: Body) -> StoreResult<String> {
        self.write(self.inner.upload_part(key, upload_id, number, body)).await
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
        self.write(
            self.inner
                .upload_part_copy(key, upload_id, number, src, src_etag, range),
        )
        .await
    }
    async fn complete_multipart(&self, key: &str, upload_id: &str, parts: &[Part]) -> StoreResult<String> {
        self.write(self.inner.complete_multipart(key, upload_id, parts)).await
    }
    async fn abort_multipart(&self, key: &str, upload_id: &str) -> StoreResult<()> {
        // Aborting only undoes: harmless after the fence, and it frees the parts.
        self.inner.abort_multipart(key, upload_id).await
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::faulty::{FaultyStore, Op};
    use crate::store::local::LocalStore;
    use std::time::Duration;

    /// A write on its way when the fence goes up (here, held up before it reaches the store, as
    /// a request the S3 client retries is) is given up at once and never reaches the store; a
    /// write after it is refused; reads go on.
    #[tokio::test]
    async fn a_write_under_way_is_given_up_when_the_fence_goes_up() {
        let dir = tempfile::tempdir().unwrap();
        let local: Arc<dyn ObjectStore> = Arc::new(LocalStore::open(dir.path()).unwrap());
        let (faulty, faults) = FaultyStore::new(local.clone());
        let fence = Fence::default();
        let store = FencedStore::wrap(Arc::new(faulty), fence.clone());
        let body = || Body::Bytes(Bytes::from_static(b"x"));
        store.put("before", body(), &UserMeta::new()).await.unwrap();

        faults.set_delay(Duration::from_secs(3600));
        let put = {
            let store = store.clone();
            tokio::spawn(async move { store.put("k", body(), &UserMeta::new()).await })
        };
        while faults.calls(Op::Put) < 2 {
            tokio::task::yield_now().await;
        }
        fence.raise();
        let r = tokio::time::timeout(Duration::from_secs(10), put)
            .await
            .expect("the write under way went on after the fence went up")
            .unwrap();
        assert!(matches!(r, Err(StoreError::Unavailable(m)) if m.contains("fenced")));
        assert_eq!(faults.reached(Op::Put), 1, "only the write before the fence");
        assert!(matches!(store.delete("before").await, Err(StoreError::Unavailable(_))));
        faults.set_delay(Duration::ZERO);
        assert!(store.head("before").await.unwrap().is_some(), "reads go on");
        assert!(local.head("k").await.unwrap().is_none());
    }
}
