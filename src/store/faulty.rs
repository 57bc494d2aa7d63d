//! A store wrapper that injects failures for the error-path tests.
//!
//! [`FaultyStore::new`] wraps any store and returns a [`Faults`] handle (cheap to clone, usable
//! from the test while the filesystem uses the store) that controls, at runtime:
//! - [`Faults::fail_next`]: the next N calls of one [`Op`] fail with a given error, before they
//!   reach the inner store;
//! - [`Faults::set_outage`]: every call fails with `Unavailable` until switched off;
//! - [`Faults::set_delay`]: a delay added to every call (`tokio::time::sleep`, so tests can run
//!   on tokio's paused clock);
//! - [`Faults::drop_next`]: the next N calls of one op run on the inner store and then fail with
//!   `Unavailable("connection reset")`: the request reached S3 but the reply was lost, which is
//!   how tests check that callers retry idempotently;
//! - [`Faults::set_callback`]: a callback that sees every call (op and key) and may fail it or
//!   drop its reply, as Mountpoint's failure client does, for anything the switches don't cover;
//! - [`Faults::hold_reply`]: the next call of one op on one key runs on the inner store, and
//!   its reply waits until the test lets it go: a request's answer made at one moment and used
//!   at a later one, with the test acting in between;
//! - counters: [`Faults::calls`] (calls made, as the caller sees S3 requests) and
//!   [`Faults::reached`] (calls that reached the inner store).
//!
//! Per call, in order: count it, sleep the delay, then outage, callback, `fail_next`, then run
//! it on the inner store, then `hold_reply`, then `drop_next`.

use std::collections::{HashMap, VecDeque};
use std::fmt;
use std::ops::Range;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use async_trait::async_trait;
use bytes::Bytes;

use super::{Body, ByteSink, ListPage, ObjectMeta, ObjectStore, Part, StoreError, StoreResult, UserMeta};

/// One kind of store request.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Op {
    Head,
    Get,
    Put,
    Copy,
    Delete,
    List,
    CreateMultipart,
    UploadPart,
    UploadPartCopy,
    Complete,
    Abort,
    Check,
    DeleteMany,
    CreateBucket,
    DeleteBucket,
}

impl Op {
    pub const ALL: [Op; 15] = [
        Op::Head,
        Op::Get,
        Op::Put,
        Op::Copy,
        Op::Delete,
        Op::List,
        Op::CreateMultipart,
        Op::UploadPart,
        Op::UploadPartCopy,
        Op::Complete,
        Op::Abort,
        Op::Check,
        Op::DeleteMany,
        Op::CreateBucket,
        Op::DeleteBucket,
    ];

    fn index(self) -> usize {
        self as usize
    }

    /// The S3 API name of the operation.
    pub fn s3_name(self) -> &'static str {
        match self {
            Op::Head => "HeadObject",
            Op::Get => "GetObject",
            Op::Put => "PutObject",
            Op::Copy => "CopyObject",
            Op::Delete => "DeleteObject",
            Op::List => "ListObjectsV2",
            Op::CreateMultipart => "CreateMultipartUpload",
            Op::UploadPart => "UploadPart",
            Op::UploadPartCopy => "UploadPartCopy",
            Op::Complete => "CompleteMultipartUpload",
            Op::Abort => "AbortMultipartUpload",
            Op::Check => "Check",
            Op::DeleteMany => "DeleteObjects",
            Op::CreateBucket => "CreateBucket",
            Op::DeleteBucket => "DeleteBucket",
        }
    }
}

impl fmt::Display for Op {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.s3_name())
    }
}

/// What a callback sees of a call.
#[derive(Debug, Clone)]
pub struct Call<'a> {
    pub op: Op,
    /// The object key (the destination for copies, the prefix for listings, "" for check).
    pub key: &'a str,
}

/// What a callback decides for a call.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Fault {
    /// Fail the call with this error before it reaches the inner store.
    Fail(StoreError),
    /// Run the call on the inner store, then fail it with `Unavailable("connection reset")`.
    Drop,
}

type Callback = Arc<dyn Fn(&Call<'_>) -> Option<Fault> + Send + Sync>;

#[derive(Default)]
struct Rules {
    outage: bool,
    delay: Duration,
    /// Per op: queued (remaining count, error).
    fail: HashMap<Op, VecDeque<(u64, StoreError)>>,
    /// Per op: how many more replies to drop.
    drop: HashMap<Op, u64>,
    callback: Option<Callback>,
    /// Replies to hold: (op, key, the held side of the hold).
    holds: Vec<(Op, String, Held)>,
}

/// The store's side of a [`Hold`].
struct Held {
    reached: tokio::sync::watch::Sender<bool>,
    release: tokio::sync::watch::Receiver<bool>,
}

impl Held {
    /// Says the reply is here and waits until it may go (or the test's handle is gone).
    async fn wait(mut self) {
        self.reached.send_replace(true);
        let _ = self.release.wait_for(|go| *go).await;
    }
}

/// The test's side of a held reply (see [`Faults::hold_reply`]). Dropping it lets the reply
/// go, so a test that fails leaves no call waiting.
pub struct Hold {
    reached: tokio::sync::watch::Receiver<bool>,
    release: tokio::sync::watch::Sender<bool>,
}

impl Hold {
    /// Waits until the call has reached the inner store and got its reply, at most `within`:
    /// false if it has not.
    pub async fn reached(&mut self, within: Duration) -> bool {
        matches!(
            tokio::time::timeout(within, self.reached.wait_for(|r| *r)).await,
            Ok(Ok(_))
        )
    }

    /// Lets the reply go.
    pub fn release(&self) {
        self.release.send_replace(true);
    }
}

impl Drop for Hold {
    fn drop(&mut self) {
        self.release();
    }
}

struct State {
    rules: Mutex<Rules>,
    calls: [AtomicU64; 15],
    reached: [AtomicU64; 15],
}

/// The control handle of a [`FaultyStore`]. Clones control the same store.
#[derive(Clone)]
pub struct Faults {
    state: Arc<State>,
}

impl Default for Faults {
    /// Faults for stores to share ([`FaultyStore::sharing`]): none injected yet.
    fn default() -> Faults {
        Faults {
            state: Arc::new(State {
                rules: Mutex::new(Rules::default()),
                calls: Default::default(),
                reached: Default::default(),
            }),
        }
    }
}

impl fmt::Debug for Faults {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let r = self.rules();
        f.debug_struct("Faults")
            .field("outage", &r.outage)
            .field("delay", &r.delay)
            .field("fail", &r.fail)
            .field("drop", &r.drop)
            .field("callback", &r.callback.is_some())
            .field(
                "holds",
                &r.holds.iter().map(|(op, key, _)| (op, key)).collect::<Vec<_>>(),
            )
            .finish()
    }
}

impl Faults {
    fn rules(&self) -> MutexGuard<'_, Rules> {
        self.state.rules.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// The next `n` calls of `op` fail with `err` without reaching the inner store. Repeated
    /// calls queue up: `fail_next(Put, 1, a); fail_next(Put, 1, b)` fails one PUT with `a`,
    /// then one with `b`.
    pub fn fail_next(&self, op: Op, n: u64, err: StoreError) {
        if n > 0 {
            self.rules().fail.entry(op).or_default().push_back((n, err));
        }
    }

    /// How many injected failures of `op` are still queued.
    pub fn pending_failures(&self, op: Op) -> u64 {
        self.rules().fail.get(&op).map_or(0, |q| q.iter().map(|(n, _)| n).sum())
    }

    /// Outage switch: while on, every call fails with `Unavailable` (after the delay).
    pub fn set_outage(&self, on: bool) {
        self.rules().outage = on;
    }

    pub fn outage(&self) -> bool {
        self.rules().outage
    }

    /// A delay added to every call, before anything else happens to it.
    pub fn set_delay(&self, delay: Duration) {
        self.rules().delay = delay;
    }

    /// The next `n` calls of `op` run on the inner store and then fail with
    /// `Unavailable("connection reset")`: the request happened, its reply was lost.
    pub fn drop_next(&self, op: Op, n: u64) {
        *self.rules().drop.entry(op).or_default() += n;
    }

    /// A callback consulted on every call (after the outage switch, before `fail_next`);
    /// returning `Some` injects that fault. Replaces any earlier callback.
    pub fn set_callback(&self, f: impl Fn(&Call<'_>) -> Option<Fault> + Send + Sync + 'static) {
        self.rules().callback = Some(Arc::new(f));
    }

    pub fn clear_callback(&self) {
        self.rules().callback = None;
    }

    /// The next call of `op` on `key` (exactly: a listing's prefix, a copy's destination) runs
    /// on the inner store, and its reply is held until the returned [`Hold`] releases it or is
    /// dropped. Repeated holds of one op and key hold the calls one after another.
    pub fn hold_reply(&self, op: Op, key: &str) -> Hold {
        let (reached_tx, reached_rx) = tokio::sync::watch::channel(false);
        let (release_tx, release_rx) = tokio::sync::watch::channel(false);
        let held = Held {
            reached: reached_tx,
            release: release_rx,
        };
        self.rules().holds.push((op, key.to_string(), held));
        Hold {
            reached: reached_rx,
            release: release_tx,
        }
    }

    /// Removes every fault (outage, delay, queued failures and drops, callback, holds not yet
    /// taken up); counters stay.
    pub fn clear(&self) {
        *self.rules() = Rules::default();
    }

    /// Calls of `op` made on the store (including failed and dropped ones).
    pub fn calls(&self, op: Op) -> u64 {
        self.state.calls[op.index()].load(Ordering::SeqCst)
    }

    /// Calls of `op` that reached the inner store (including dropped ones).
    pub fn reached(&self, op: Op) -> u64 {
        self.state.reached[op.index()].load(Ordering::SeqCst)
    }

    /// Calls of every op made on the store.
    pub fn total_calls(&self) -> u64 {
        Op::ALL.iter().map(|&op| self.calls(op)).sum()
    }

    /// Calls of every op, those never made left out, in `Op` order.
    pub fn call_counts(&self) -> Vec<(Op, u64)> {
        Op::ALL
            .iter()
            .map(|&op| (op, self.calls(op)))
            .filter(|&(_, n)| n > 0)
            .collect()
    }

    /// Sets every counter back to zero.
    pub fn reset_counts(&self) {
        for c in self.state.calls.iter().chain(self.state.reached.iter()) {
            c.store(0, Ordering::SeqCst);
        }
    }
}

/// What the rules decided before the call reaches the inner store.
enum Plan {
    Run { drop: bool, hold: Option<Held> },
    Fail(StoreError),
}

/// A store that injects the faults its [`Faults`] handle asks for.
pub struct FaultyStore {
    inner: Arc<dyn ObjectStore>,
    faults: Faults,
}

impl FaultyStore {
    pub fn new(inner: Arc<dyn ObjectStore>) -> (FaultyStore, Faults) {
        let faults = Faults::default();
        (FaultyStore::sharing(inner, faults.clone()), faults)
    }

    /// A store under the same faults (and counters) as another: every bucket a test's CSI
    /// services connect to, under one switch.
    pub fn sharing(inner: Arc<dyn ObjectStore>, faults: Faults) -> FaultyStore {
        FaultyStore { inner, faults }
    }

    /// Another handle on this store's faults.
    pub fn faults(&self) -> Faults {
        self.faults.clone()
    }

    /// Counts the call, waits the delay and decides its fate.
    async fn before(&self, op: Op, key: &str) -> Plan {
        self.faults.state.calls[op.index()].fetch_add(1, Ordering::SeqCst);
        let delay = self.faults.rules().delay;
        if !delay.is_zero() {
            tokio::time::sleep(delay).await;
        }
        let callback = {
            let r = self.faults.rules();
            if r.outage {
                return Plan::Fail(StoreError::Unavailable(format!("injected outage ({op})")));
            }
            r.callback.clone()
        };
        // Called without the lock held, so the callback may use the handle.
        let mut drop = false;
        if let Some(cb) = callback {
            match cb(&Call { op, key }) {
                Some(Fault::Fail(e)) => return Plan::Fail(e),
                Some(Fault::Drop) => drop = true,
                None => {}
            }
        }
        let mut r = self.faults.rules();
        if let Some(q) = r.fail.get_mut(&op) {
            if let Some((n, err)) = q.front_mut() {
                let err = err.clone();
                *n -= 1;
                if *n == 0 {
                    q.pop_front();
                }
                return Plan::Fail(err);
            }
        }
        if let Some(n) = r.drop.get_mut(&op) {
            if *n > 0 {
                *n -= 1;
                drop = true;
            }
        }
        let hold = r
            .holds
            .iter()
            .position(|(o, k, _)| *o == op && k == key)
            .map(|i| r.holds.remove(i).2);
        Plan::Run { drop, hold }
    }

    async fn call<T, Fut>(&self, op: Op, key: &str, f: impl FnOnce() -> Fut) -> StoreResult<T>
    where
        Fut: std::future::Future<Output = StoreResult<T>>,
    {
        match self.before(op, key).await {
            Plan::Fail(e) => {
                tracing::debug!(%op, key, error = %e, "injected failure");
                Err(e)
            }
            Plan::Run { drop, hold } => {
                self.faults.state.reached[op.index()].fetch_add(1, Ordering::SeqCst);
                let res = f().await;
                if let Some(held) = hold {
                    held.wait().await;
                }
                if drop {
                    tracing::debug!(%op, key, "injected dropped reply");
                    Err(StoreError::Unavailable("connection reset".into()))
                } else {
                    res
                }
            }
        }
    }
}

#[async_trait]
impl ObjectStore for FaultyStore {
    fn describe(&self) -> String {
        format!("faulty({})", self.inner.describe())
    }

    async fn check(&self) -> StoreResult<()> {
        self.call(Op::Check, "", || self.inner.check()).await
    }

    async fn delete_many(&self, keys: &[String]) -> StoreResult<()> {
        let first = keys.first().map_or("", |k| k.as_str());
        self.call(Op::DeleteMany, first, || self.inner.delete_many(keys)).await
    }

    async fn create_bucket(&self, region: &str) -> StoreResult<()> {
        self.call(Op::CreateBucket, "", || self.inner.create_bucket(region))
            .await
    }

    async fn delete_bucket(&self) -> StoreResult<()> {
        self.call(Op::DeleteBucket, "", || self.inner.delete_bucket()).await
    }

    async fn head(&self, key: &str) -> StoreResult<Option<ObjectMeta>> {
        self.call(Op::Head, key, || self.inner.head(key)).await
    }

    async fn get_range(&self, key: &str, range: Range<u64>) -> StoreResult<Bytes> {
        self.call(Op::Get, key, || self.inner.get_range(key, range)).await
    }

    async fn get_version_range(&self, key: &str, etag: &str, range: Range<u64>) -> StoreResult<Bytes> {
        self.call(Op::Get, key, || self.inner.get_version_range(key, etag, range))
            .await
    }

    async fn stream_range(
        &self,
        key: &str,
        etag: Option<&str>,
        range: Range<u64>,
        sink: &mut ByteSink<'_>,
    ) -> StoreResult<u64> {
        self.call(Op::Get, key, || self.inner.stream_range(key, etag, range, sink))
            .await
    }

    async fn head_and_get(&self, key: &str, max: u64) -> StoreResult<Option<(ObjectMeta, Option<Bytes>)>> {
        // One request to the inner store: a GET when bytes are asked for, a HEAD when not.
        let op = if max == 0 { Op::Head } else { Op::Get };
        self.call(op, key, || self.inner.head_and_get(key, max)).await
    }

    async fn put(&self, key: &str, body: Body, meta: &UserMeta) -> StoreResult<String> {
        self.call(Op::Put, key, || self.inner.put(key, body, meta)).await
    }

    async fn copy(&self, src: &str, src_etag: Option<&str>, dst: &str, meta: &UserMeta) -> StoreResult<String> {
        self.call(Op::Copy, dst, || self.inner.copy(src, src_etag, dst, meta))
            .await
    }

    async fn delete(&self, key: &str) -> StoreResult<()> {
        self.call(Op::Delete, key, || self.inner.delete(key)).await
    }

    async fn list(
        &self,
        prefix: &str,
        delimiter: Option<&str>,
        continuation: Option<String>,
        max_keys: usize,
    ) -> StoreResult<ListPage> {
        self.call(Op::List, prefix, || {
            self.inner.list(prefix, delimiter, continuation, max_keys)
        })
        .await
    }

    async fn create_multipart(&self, key: &str, meta: &UserMeta) -> StoreResult<String> {
        self.call(Op::CreateMultipart, key, || self.inner.create_multipart(key, meta))
            .await
    }

    async fn upload_part(&self, key: &str, upload_id: &str, number: i32, body: Body) -> StoreResult<String> {
        self.call(Op::UploadPart, key, || {
            self.inner.upload_part(key, upload_id, number, body)
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
        self.call(Op::UploadPartCopy, key, || {
            self.inner
                .upload_part_copy(key, upload_id, number, src, src_etag, range)
        })
        .await
    }

    async fn complete_multipart(&self, key: &str, upload_id: &str, parts: &[Part]) -> StoreResult<String> {
        self.call(Op::Complete, key, || {
            self.inner.complete_multipart(key, upload_id, parts)
        })
        .await
    }

    async fn abort_multipart(&self, key: &str, upload_id: &str) -> StoreResult<()> {
        self.call(Op::Abort, key, || self.inner.abort_multipart(key, upload_id))
            .await
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::local::LocalStore;
    use std::time::Instant;

    fn store() -> (tempfile::TempDir, FaultyStore, Faults) {
        let dir = tempfile::tempdir().unwrap();
        let local = LocalStore::open(dir.path()).unwrap();
        let (s, f) = FaultyStore::new(Arc::new(local));
        (dir, s, f)
    }

    fn body(s: &str) -> Body {
        Body::Bytes(Bytes::from(s.to_string()))
    }

    #[tokio::test]
    async fn fail_next_fails_n_calls_then_passes() {
        let (_d, s, f) = store();
        let m = UserMeta::new();
        f.fail_next(Op::Put, 2, StoreError::Unavailable("503".into()));
        assert_eq!(f.pending_failures(Op::Put), 2);
        assert_eq!(
            s.put("k", body("x"), &m).await,
            Err(StoreError::Unavailable("503".into()))
        );
        // Other ops are unaffected.
        assert_eq!(s.head("k").await, Ok(None));
        assert!(s.put("k", body("x"), &m).await.is_err());
        assert!(s.put("k", body("x"), &m).await.is_ok());
        assert_eq!(f.calls(Op::Put), 3);
        assert_eq!(f.reached(Op::Put), 1);
        assert_eq!(f.calls(Op::Head), 1);
        assert_eq!(f.total_calls(), 4);
        assert_eq!(f.call_counts(), vec![(Op::Head, 1), (Op::Put, 3)]);
    }

    #[tokio::test]
    async fn failures_queue_in_order() {
        let (_d, s, f) = store();
        f.fail_next(Op::Get, 1, StoreError::AccessDenied("a".into()));
        f.fail_next(Op::Get, 1, StoreError::Io("b".into()));
        assert_eq!(s.get_range("k", 0..1).await, Err(StoreError::AccessDenied("a".into())));
        assert_eq!(s.get_range("k", 0..1).await, Err(StoreError::Io("b".into())));
        assert!(matches!(s.get_range("k", 0..1).await, Err(StoreError::NotFound(_))));
    }

    #[tokio::test]
    async fn outage_fails_everything_until_off() {
        let (_d, s, f) = store();
        let m = UserMeta::new();
        s.put("k", body("x"), &m).await.unwrap();
        f.set_outage(true);
        assert!(f.outage());
        assert!(matches!(s.head("k").await, Err(StoreError::Unavailable(_))));
        assert!(matches!(s.check().await, Err(StoreError::Unavailable(_))));
        assert!(matches!(
            s.list("", None, None, 10).await,
            Err(StoreError::Unavailable(_))
        ));
        assert!(s.head("k").await.unwrap_err().is_transient());
        f.set_outage(false);
        assert!(s.head("k").await.unwrap().is_some());
        s.check().await.unwrap();
        assert_eq!(f.reached(Op::Head), 1);
        assert_eq!(f.calls(Op::Head), 3);
    }

    #[tokio::test]
    async fn dropped_reply_still_runs_the_call() {
        let (_d, s, f) = store();
        let m = UserMeta::new();
        f.drop_next(Op::Put, 1);
        assert_eq!(
            s.put("k", body("hello"), &m).await,
            Err(StoreError::Unavailable("connection reset".into()))
        );
        // The request reached the store: the object exists.
        assert_eq!(s.head("k").await.unwrap().unwrap().size, 5);
        f.drop_next(Op::Delete, 1);
        assert!(s.delete("k").await.is_err());
        assert_eq!(s.head("k").await.unwrap(), None);
        // A retried delete is idempotent.
        s.delete("k").await.unwrap();
        assert_eq!(f.reached(Op::Delete), 2);
    }

    #[tokio::test]
    async fn dropped_complete_can_be_retried() {
        let (_d, s, f) = store();
        let m = UserMeta::new();
        let id = s.create_multipart("big", &m).await.unwrap();
        let e = s.upload_part("big", &id, 1, body("abc")).await.unwrap();
        let parts = [Part { number: 1, etag: e }];
        f.drop_next(Op::Complete, 1);
        assert!(s.complete_multipart("big", &id, &parts).await.is_err());
        let etag = s.complete_multipart("big", &id, &parts).await.unwrap();
        assert_eq!(s.head("big").await.unwrap().unwrap().etag, etag);
        assert_eq!(f.calls(Op::Complete), 2);
    }

    // Real time here: tokio's paused clock (`start_paused`) needs tokio's `test-util` feature,
    // which the crate does not enable; the delay is a `tokio::time::sleep`, so it works there.
    #[tokio::test]
    async fn delay_is_added_to_every_call() {
        let (_d, s, f) = store();
        let d = Duration::from_millis(50);
        f.set_delay(d);
        let start = Instant::now();
        assert_eq!(s.head("nope").await, Ok(None));
        assert!(start.elapsed() >= d);
        // The delay applies to injected failures too (the round trip happens).
        f.set_outage(true);
        let start = Instant::now();
        assert!(s.head("nope").await.is_err());
        assert!(start.elapsed() >= d);
        f.clear();
        assert!(!f.outage());
        s.head("nope").await.unwrap();
        assert_eq!(f.calls(Op::Head), 3);
    }

    #[tokio::test]
    async fn callback_targets_keys() {
        let (_d, s, f) = store();
        let m = UserMeta::new();
        f.set_callback(|c| match (c.op, c.key) {
            (Op::Put, "bad") => Some(Fault::Fail(StoreError::Invalid("nope".into()))),
            (Op::Put, "lost") => Some(Fault::Drop),
            _ => None,
        });
        assert!(s.put("good", body("1"), &m).await.is_ok());
        assert_eq!(
            s.put("bad", body("1"), &m).await,
            Err(StoreError::Invalid("nope".into()))
        );
        assert!(s.put("lost", body("1"), &m).await.is_err());
        assert!(s.head("lost").await.unwrap().is_some());
        assert!(s.head("bad").await.unwrap().is_none());
        f.clear_callback();
        assert!(s.put("bad", body("1"), &m).await.is_ok());
        f.reset_counts();
        assert_eq!(f.total_calls(), 0);
    }

    #[tokio::test]
    async fn a_held_reply_is_the_stores_answer_when_it_ran() {
        let (_d, s, f) = store();
        let s = Arc::new(s);
        let m = UserMeta::new();
        s.put("d/a", body("1"), &m).await.unwrap();
        let mut hold = f.hold_reply(Op::List, "d/");
        // Another key's call passes.
        assert!(s.list("e/", None, None, 10).await.unwrap().objects.is_empty());
        let lister = {
            let s = s.clone();
            tokio::spawn(async move { s.list("d/", None, None, 10).await })
        };
        assert!(hold.reached(Duration::from_secs(10)).await);
        s.put("d/b", body("2"), &m).await.unwrap();
        assert!(!lister.is_finished());
        hold.release();
        let page = lister.await.unwrap().unwrap();
        let keys: Vec<_> = page.objects.iter().map(|o| o.key.as_str()).collect();
        assert_eq!(keys, ["d/a"], "the reply is what the store had when the call ran");
        // Taken up: the next call is not held.
        assert_eq!(s.list("d/", None, None, 10).await.unwrap().objects.len(), 2);
        // A hold never taken up is not reached; one dropped lets its call go.
        let mut unused = f.hold_reply(Op::Head, "x");
        assert!(!unused.reached(Duration::from_millis(10)).await);
        drop(unused);
        assert_eq!(s.head("x").await, Ok(None));
    }

    #[tokio::test]
    async fn handle_clones_share_state() {
        let (_d, s, f) = store();
        let g = s.faults();
        f.fail_next(Op::Check, 1, StoreError::NoSuchBucket("b".into()));
        assert_eq!(s.check().await, Err(StoreError::NoSuchBucket("b".into())));
        assert_eq!(g.calls(Op::Check), 1);
        assert!(s.describe().starts_with("faulty("));
    }
}
