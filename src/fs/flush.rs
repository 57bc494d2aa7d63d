//! The flusher: turns pending journal records into S3 requests.
//!
//! - `X` records (objects to delete) go first, each under the lock of its key and only when no
//!   live inode maps to that key any more (a file created again under the same name, or moved onto
//!   it, must not lose its new object to the old one's deletion).
//! - `P` records: directories and symlinks are PUT at once; a file's staged bytes are uploaded
//!   once the file has been idle for the flush delay (or at once when forced: shutdown, unpublish,
//!   an operator's flush). Files past two parts stream as a multipart upload while they are still
//!   being written. A file whose bytes are already in S3 but whose key or attributes changed is
//!   moved or rewritten server-side by CopyObject.
//! - A record is cleared only if nothing changed while its S3 request was in flight (the change
//!   sequence in `P` and the staged file's generation are compared), so a write racing an upload
//!   is never marked clean.

use std::collections::{HashMap, HashSet};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use bytes::Bytes;
use futures::StreamExt;
use tracing::Instrument;

use super::names::user_meta;
use super::staging::{Multipart, Staged};
use super::{FsError, FsResult, Volume};
use crate::meta::{Batch, Ino, Inode, Kind, Remote, ROOT_INO};
use crate::store::{Body, Part};
use crate::sync::LockExt;

pub struct FlushState {
    pub(crate) uploads: tokio::sync::Semaphore,
    notify: tokio::sync::Notify,
    /// Bumped every time S3 catches up with an inode; listings older than an inode's epoch do
    /// not override it.
    epoch: AtomicU64,
    dirty_bytes: AtomicU64,
    stream_wanted: Mutex<HashSet<Ino>>,
    streaming: Mutex<HashSet<Ino>>,
    key_locks: Mutex<HashMap<String, Arc<tokio::sync::Mutex<()>>>>,
    /// Keys an inode sync is writing, from before its request until its result is recorded: a
    /// listing in that window sees the object but not yet the journal entry that explains it.
    in_flight: Mutex<HashMap<String, usize>>,
    /// Keys deleted while a listing was under way (see [`RecentDeletes`]).
    recent_deletes: Mutex<RecentDeletes>,
    clock: crate::clock::Clock,
    /// Where the next round's share of the pending inodes starts (see `flush_round`).
    cursor: AtomicU64,
    /// Dirty bytes counted so far in the sweep under way.
    dirty_sweep: AtomicU64,
    /// One flush round at a time: the background flusher and `flush_all` must not sync the same
    /// inode concurrently (the loser of a rename's copy would find its source already gone).
    round: tokio::sync::Mutex<()>,
    /// When clients last sent an operation, and since when they have been busy without a quiet
    /// pause (see [`FlushState::defers`]).
    activity: Mutex<Activity>,
    /// Counters for status and metrics.
    pub uploaded_bytes: AtomicU64,
    pub errors: AtomicU64,
}

/// How long the volume must go without an NFS operation to count as quiet (or a quarter of the
/// flush delay, if that is shorter).
pub const QUIET: std::time::Duration = std::time::Duration::from_millis(500);
/// How long uploads and deletions that are due wait for a quiet volume, at most, by default
/// (`VolumeConfig::busy_defer`): past this in one busy stretch, they run alongside the clients'
/// operations.
pub const MAX_DEFER: std::time::Duration = std::time::Duration::from_secs(10);

#[derive(Default)]
struct Activity {
    last: Option<std::time::Instant>,
    busy_since: Option<std::time::Instant>,
}

/// Keys deleted while a listing was under way, and when: a listing that started before a
/// deletion may still show the object, and must not bring it back. Only deletions newer than
/// the oldest listing under way are kept, so the map holds what those listings can still see,
/// not a history.
#[derive(Default)]
struct RecentDeletes {
    /// Ordered by key, so that "anything under this prefix" is a range, not a scan.
    keys: std::collections::BTreeMap<String, std::time::Instant>,
    /// Start times of the listings under way (a multiset).
    listings: std::collections::BTreeMap<std::time::Instant, usize>,
    /// Size of `keys` after the last pruning.
    pruned_at: usize,
}

/// A listing under way; see [`FlushState::begin_listing`].
pub(crate) struct Listing<'a> {
    flusher: &'a FlushState,
    pub started: std::time::Instant,
}

impl Drop for Listing<'_> {
    fn drop(&mut self) {
        let mut d = self.flusher.recent_deletes.locked();
        if let Some(n) = d.listings.get_mut(&self.started) {
            *n -= 1;
            if *n == 0 {
                d.listings.remove(&self.started);
            }
        }
    }
}

impl FlushState {
    pub fn new(concurrency: usize, clock: crate::clock::Clock) -> FlushState {
        FlushState {
            uploads: tokio::sync::Semaphore::new(concurrency.max(1)),
            notify: tokio::sync::Notify::new(),
            epoch: AtomicU64::new(1),
            dirty_bytes: AtomicU64::new(0),
            stream_wanted: Mutex::new(HashSet::new()),
            streaming: Mutex::new(HashSet::new()),
            key_locks: Mutex::new(HashMap::new()),
            in_flight: Mutex::new(HashMap::new()),
            recent_deletes: Mutex::new(Default::default()),
            clock,
            round: tokio::sync::Mutex::new(()),
            cursor: AtomicU64::new(0),
            dirty_sweep: AtomicU64::new(0),
            activity: Mutex::new(Activity::default()),
            uploaded_bytes: AtomicU64::new(0),
            errors: AtomicU64::new(0),
        }
    }

    pub fn epoch(&self) -> u64 {
        self.epoch.load(Ordering::Acquire)
    }

    pub fn dirty_bytes(&self) -> u64 {
        self.dirty_bytes.load(Ordering::Acquire)
    }

    /// Wakes the flusher now rather than at its next tick. Namespace operations do not call
    /// this: a round looks at every pending inode, and one round per operation made creating
    /// 10,000 files quadratic. The tick (200 ms) is soon enough for them.
    pub fn kick(&self) {
        self.notify.notify_one();
    }

    /// An NFS operation arrived at `at`; a gap of `quiet` or more since the last one starts a
    /// new busy stretch.
    pub(crate) fn note_activity(&self, at: std::time::Instant, quiet: std::time::Duration) {
        let mut a = self.activity.locked();
        if a.last.is_none_or(|l| at.saturating_duration_since(l) >= quiet) {
            a.busy_since = Some(at);
        }
        if a.last.is_none_or(|l| at > l) {
            a.last = Some(at);
        }
    }

    /// Whether background uploads and deletions that are due should wait: clients sent an
    /// operation within `quiet` of `now`, and have not been busy for `max` already.
    ///
    /// Why: an upload costs CPU on the node (the request, and all of the S3 server's work when
    /// it runs on the node too, as a local MinIO does), and the clients' operations wait behind
    /// it. Measured in the benchmark guest, where Garage shares the CPU: an untar of 1,195 files
    /// took 10 s with uploads interleaved and 5.7 s with them after it, and the files were in S3
    /// no later. The wait is bounded, so a volume that is never quiet still uploads.
    fn defers(&self, now: std::time::Instant, quiet: std::time::Duration, max: std::time::Duration) -> bool {
        let a = self.activity.locked();
        match (a.last, a.busy_since) {
            (Some(last), Some(since)) => {
                now.saturating_duration_since(last) < quiet && now.saturating_duration_since(since) < max
            }
            _ => false,
        }
    }

    pub(crate) fn note_write(&self, st: &Staged, part_size: u64, appending: bool) {
        if appending && st.size() >= 2 * part_size && !self.streaming.locked().contains(&st.ino) {
            self.stream_wanted.locked().insert(st.ino);
            self.notify.notify_one();
        }
    }

    /// Marks the start of a listing: deletions from now on until the returned guard is dropped
    /// are remembered for [`FlushState::deleted_since`].
    pub(crate) fn begin_listing(&self) -> Listing<'_> {
        let started = self.clock.now();
        *self.recent_deletes.locked().listings.entry(started).or_insert(0) += 1;
        Listing { flusher: self, started }
    }

    /// Whether `key` (or, for a directory prefix, anything under it) was deleted after `since`.
    pub(crate) fn deleted_since(&self, key: &str, is_prefix: bool, since: std::time::Instant) -> bool {
        let d = self.recent_deletes.locked();
        if is_prefix {
            d.keys
                .range::<str, _>((std::ops::Bound::Included(key), std::ops::Bound::Unbounded))
                .take_while(|(k, _)| k.starts_with(key))
                .any(|(_, t)| *t >= since)
        } else {
            d.keys.get(key).is_some_and(|t| *t >= since)
        }
    }

    fn note_deleted(&self, key: &str) {
        let now = self.clock.now();
        let mut d = self.recent_deletes.locked();
        let Some(oldest) = d.listings.keys().next().copied() else {
            // No listing is under way, and one that starts later cannot show the object.
            d.keys.clear();
            return;
        };
        // Entries older than every listing under way are no longer needed. Pruned in batches,
        // so the cost per deletion stays constant.
        if d.keys.len() >= d.pruned_at.max(1024) * 2 {
            d.keys.retain(|_, t| *t >= oldest);
            d.pruned_at = d.keys.len();
        }
        d.keys.insert(key.to_string(), now);
    }

    #[cfg(test)]
    fn recent_deletes_len(&self) -> usize {
        self.recent_deletes.locked().keys.len()
    }

    /// Whether a sync is writing `key` (or, for a directory prefix, anything under it).
    pub(crate) fn writing(&self, key: &str, is_prefix: bool) -> bool {
        let f = self.in_flight.locked();
        if is_prefix {
            f.keys().any(|k| k.starts_with(key))
        } else {
            f.contains_key(key)
        }
    }

    /// Counts and logs failed S3 work (which stays journalled), keeping the first error.
    fn note_failures(&self, what: &str, results: Vec<FsResult<()>>, first: &mut Option<FsError>) {
        for e in results.into_iter().filter_map(Result::err) {
            self.errors.fetch_add(1, Ordering::Relaxed);
            tracing::warn!(error = %e, "{what} failed; it stays journalled and is retried");
            first.get_or_insert(e);
        }
    }

    pub async fn wait(&self) {
        self.notify.notified().await
    }

    async fn key_lock(&self, key: &str) -> KeyGuard<'_> {
        let m = self.key_locks.locked().entry(key.to_string()).or_default().clone();
        let guard = m.clone().lock_owned().await;
        KeyGuard {
            state: self,
            key: key.to_string(),
            _guard: Some(guard),
            m,
        }
    }
}

struct KeyGuard<'a> {
    state: &'a FlushState,
    key: String,
    _guard: Option<tokio::sync::OwnedMutexGuard<()>>,
    m: Arc<tokio::sync::Mutex<()>>,
}

impl Drop for KeyGuard<'_> {
    fn drop(&mut self) {
        self._guard.take();
        let mut locks = self.state.key_locks.locked();
        // The map's own reference and ours: nobody else waits for this key.
        if Arc::strong_count(&self.m) == 2 {
            locks.remove(&self.key);
        }
    }
}

/// Wakes everyone waiting on a `Notify` when dropped (after the state it guards is updated).
struct WakeOnDrop<'a>(&'a tokio::sync::Notify);

impl Drop for WakeOnDrop<'_> {
    fn drop(&mut self) {
        self.0.notify_waiters();
    }
}

/// Marks a key as being written for as long as it lives.
struct InFlight<'a> {
    state: &'a FlushState,
    key: String,
}

impl<'a> InFlight<'a> {
    fn new(state: &'a FlushState, key: &str) -> InFlight<'a> {
        *state.in_flight.locked().entry(key.to_string()).or_default() += 1;
        InFlight {
            state,
            key: key.to_string(),
        }
    }
}

impl Drop for InFlight<'_> {
    fn drop(&mut self) {
        let mut f = self.state.in_flight.locked();
        if let Some(n) = f.get_mut(&self.key) {
            *n -= 1;
            if *n == 0 {
                f.remove(&self.key);
            }
        }
    }
}

/// What an upload produced, to be recorded if nothing changed meanwhile.
struct Synced {
    remote: Remote,
    /// Staged file generation the upload was taken from.
    gen: Option<u64>,
}

/// The ETag S3 gives an object completed from `parts`: the MD5 of the parts' MD5s, then
/// `-<number of parts>` (empty when a part's ETag is not an MD5, as on some stores).
fn multipart_etag(parts: &[Part]) -> String {
    use md5::Digest;
    let mut h = md5::Md5::new();
    for p in parts {
        let Some(bytes) = hex_bytes(&p.etag) else {
            return String::new();
        };
        h.update(bytes);
    }
    let digest = h.finalize();
    let hex: String = digest.iter().map(|b| format!("{b:02x}")).collect();
    format!("{hex}-{}", parts.len())
}

fn hex_bytes(s: &str) -> Option<Vec<u8>> {
    if s.len() != 32 {
        return None;
    }
    (0..16)
        .map(|i| u8::from_str_radix(&s[2 * i..2 * i + 2], 16).ok())
        .collect()
}

/// Journal records one background flush round looks at.
const ROUND_SCAN: usize = 4096;

impl Volume {
    /// Uploads everything pending now, ignoring the flush delay; returns when nothing is pending
    /// or an S3 error stops progress (the error is returned; the work stays journalled).
    pub async fn flush_all(self: &Arc<Self>) -> FsResult<()> {
        // A round can end with work still pending for good reasons (a write raced an upload, an
        // upload's result was recorded as a delete of what it wrote): only several rounds in a
        // row without progress mean S3 keeps refusing.
        const MAX_STALLS: u32 = 5;
        let (mut last, mut stalls) = (usize::MAX, 0);
        loop {
            let left = self.flush_round(true).await?;
            if left == 0 {
                return Ok(());
            }
            stalls = if left >= last { stalls + 1 } else { 0 };
            if stalls >= MAX_STALLS {
                return Err(FsError::Retry(format!(
                    "{left} inodes still pending after {MAX_STALLS} flush rounds"
                )));
            }
            last = left;
            if stalls > 0 {
                self.cfg
                    .clock
                    .sleep(std::time::Duration::from_millis(20 << stalls))
                    .await;
            }
        }
    }

    /// Notes that a client operation arrived (see [`FlushState::defers`]); called within the
    /// operation, whose arrival is the time.
    pub fn note_activity(&self) {
        self.flusher.note_activity(self.cfg.clock.op_now(), self.quiet());
    }

    fn quiet(&self) -> std::time::Duration {
        QUIET.min(self.cfg.flush_delay / 4)
    }

    /// Whether due uploads and deletions wait for the clients to pause. Not when the dirty
    /// bytes near their bound: writers would be held up waiting for uploads that wait for them.
    fn defers_background(&self) -> bool {
        self.flusher.dirty_bytes() <= self.cfg.max_dirty_bytes / 2
            && self
                .flusher
                .defers(self.cfg.clock.now(), self.quiet(), self.cfg.busy_defer)
    }

    /// One pass over the journal. Returns how many inodes and deletions are still pending.
    pub async fn flush_round(self: &Arc<Self>, force: bool) -> FsResult<usize> {
        let span = tracing::info_span!(
            "flush",
            force,
            pending = tracing::field::Empty,
            deferred = tracing::field::Empty
        );
        async move {
            let _round = self.flusher.round.lock().await;
            if !force
                && self.meta.pending_count() == 0
                && self.meta.delete_count() == 0
                && self.flusher.stream_wanted.locked().is_empty()
            {
                // An idle tick: nothing to look at, and nothing pending is nothing dirty.
                self.flusher.dirty_bytes.store(0, Ordering::Release);
                return Ok(0);
            }
            let defer = !force && self.defers_background();
            tracing::Span::current().record("deferred", defer);
            // Streams (large files being written) keep up with a writer, unless the writer
            // would lose the CPU to them (see `VolumeConfig::stream_while_busy`).
            if !defer || self.cfg.stream_while_busy {
                self.start_streams();
            }
            let mut first_err: Option<FsError> = None;
            // A round looks at a bounded share of the journal (ROUND_SCAN records), so that a
            // million pending inodes do not make every 200 ms tick read a million records; the
            // next round goes on where this one stopped. A forced round (flush_all) takes all.
            let deletes = if force {
                self.meta.all_deletes()?
            } else if defer {
                Vec::new()
            } else {
                self.meta.some_deletes(ROUND_SCAN)?
            };
            // Each item looks again: clients that start while a round runs come first too.
            let yields = move || !force && self.defers_background();
            let results: Vec<_> = futures::stream::iter(deletes.into_iter().map(|(seq, key)| async move {
                if yields() {
                    return Ok(()); // still in the journal: a later round deletes it
                }
                let r = self.delete_key(&key, None).await;
                if r.is_ok() {
                    let mut b = Batch::new();
                    b.done_delete(seq, &key);
                    self.meta.commit(b)?;
                }
                r
            }))
            .buffer_unordered(self.cfg.upload_concurrency)
            .collect()
            .await;
            self.flusher.note_failures("delete", results, &mut first_err);

            let (pending, sweep_start, sweep_end) = if force {
                (self.meta.all_pending()?, true, true)
            } else {
                let after = self.flusher.cursor.load(Ordering::Acquire);
                let page = self.meta.pending_after(after, ROUND_SCAN)?;
                let end = page.len() < ROUND_SCAN;
                let next = if end { 0 } else { page.last().map_or(0, |p| p.0) };
                self.flusher.cursor.store(next, Ordering::Release);
                (page, after == 0, end)
            };
            tracing::Span::current().record("pending", pending.len());
            let mut dirty = if sweep_start {
                0
            } else {
                self.flusher.dirty_sweep.load(Ordering::Acquire)
            };
            let mut due = Vec::new();
            let now = self.cfg.clock.now();
            for (ino, seq) in pending {
                let st = self.staged(ino);
                if let Some(st) = &st {
                    if st.content_dirty.load(Ordering::Acquire) {
                        dirty += st.size();
                        let idle = st.idle_at(now);
                        if !force && (idle < self.cfg.flush_delay || self.flusher.streaming.locked().contains(&ino)) {
                            continue;
                        }
                    }
                }
                due.push((ino, seq));
            }
            if defer {
                due.clear(); // the sweep above still counts the dirty bytes
            }
            // Dirty bytes are known once a sweep over every pending inode is complete.
            if sweep_end {
                self.flusher.dirty_bytes.store(dirty, Ordering::Release);
            } else {
                self.flusher.dirty_sweep.store(dirty, Ordering::Release);
            }
            if !due.is_empty() && !sweep_end {
                self.flusher.kick(); // more of the journal to look at, and it had work
            }
            let results: Vec<_> = futures::stream::iter(due.into_iter().map(|(ino, seq)| async move {
                if yields() {
                    return Ok(()); // still pending: a later round uploads it
                }
                self.sync_inode(ino, seq).await
            }))
            .buffer_unordered(self.cfg.upload_concurrency)
            .collect()
            .await;
            self.flusher.note_failures("upload", results, &mut first_err);
            let left = self.meta.pending_count() + self.meta.delete_count();
            match first_err {
                Some(e) if force => Err(e),
                _ => Ok(left),
            }
        }
        .instrument(span)
        .await
    }

    /// The inode whose key is `key` now, if any.
    fn resolve_key(&self, key: &str) -> FsResult<Option<Ino>> {
        let Some(rest) = key.strip_prefix(self.cfg.prefix.as_str()) else {
            return Ok(None);
        };
        let is_dir = rest.ends_with('/');
        let mut cur = ROOT_INO;
        for comp in rest.trim_end_matches('/').split('/') {
            match self.meta.lookup(cur, comp.as_bytes())? {
                Some(i) => cur = i,
                None => return Ok(None),
            }
        }
        let inode = self.meta.inode(cur)?;
        Ok(inode.filter(|i| (i.kind == Kind::Dir) == is_dir).map(|i| i.ino))
    }

    /// Deletes `key` unless a live inode maps to it, or an inode other than `moved` (the one
    /// whose move away from `key` just finished) still has to copy its object from there: that
    /// one deletes the key once it has moved (see `sync_inode`). A hard link's name dropped after
    /// its file took over its old key queues that key's deletion, and the file may be leaving
    /// the key at the same time.
    async fn delete_key(&self, key: &str, moved: Option<Ino>) -> FsResult<()> {
        let _k = self.flusher.key_lock(key).await;
        if let Some(owner) = self.resolve_key(key)? {
            // A live inode holds the key now and will write it. Until it has, the old
            // object is its to deal with: if it goes (or moves) before writing, the key is
            // deleted then (see `maybe_written`).
            let owns_object = self
                .meta
                .inode(owner)?
                .is_some_and(|i| i.remote.as_ref().is_some_and(|r| r.key == key));
            if !owns_object {
                let mut b = Batch::new();
                b.maybe_written(owner, key);
                self.meta.commit(b)?;
            }
            return Ok(());
        }
        for m in self.meta.movers(key)? {
            if Some(m) != moved
                && self
                    .meta
                    .inode(m)?
                    .is_some_and(|i| i.remote.is_some_and(|r| r.key == key))
            {
                return Ok(());
            }
        }
        self.store.delete(key).await?;
        self.flusher.note_deleted(key);
        Ok(())
    }

    async fn sync_inode(self: &Arc<Self>, ino: Ino, seq: u64) -> FsResult<()> {
        let Some(inode) = self.meta.inode(ino)? else {
            let mut b = Batch::new();
            b.clear_pending(ino);
            return Ok(self.meta.commit(b)?);
        };
        if ino == ROOT_INO {
            return self.record(ino, seq, None, None).await;
        }
        if let Kind::Link(file) = inode.kind {
            return self.sync_link(inode, file, seq).await;
        }
        let key = self.key_of(&inode)?;
        self.protect_movers(&key, ino).await?;
        let meta = user_meta(&inode);
        let _writing = InFlight::new(&self.flusher, &key);
        let span = tracing::info_span!("sync_inode", ino, key = %key);
        crate::telemetry::link_causes(&span, self.volume_id(), ino, true);
        let synced = async {
            match inode.kind {
                Kind::Dir | Kind::Fifo | Kind::Socket | Kind::CharDev(_) | Kind::BlockDev(_) => {
                    self.put_small(&key, Bytes::new(), &meta).await.map(Some)
                }
                Kind::Link(_) => unreachable!("handled by sync_link"),
                Kind::Symlink => self
                    .put_small(&key, Bytes::from(inode.target.clone()), &meta)
                    .await
                    .map(Some),
                Kind::File => match self.staged(ino) {
                    Some(st) if st.content_dirty.load(Ordering::Acquire) => {
                        self.upload_staged(&st, &inode, &key, &meta).await
                    }
                    _ => match &inode.remote {
                        Some(r) => {
                            let _k = self.flusher.key_lock(&key).await;
                            let etag = self.store.copy(&r.key, &key, &meta).await?;
                            Ok(Some(Synced {
                                remote: Remote {
                                    key: key.clone(),
                                    etag,
                                    size: r.size,
                                },
                                gen: None,
                            }))
                        }
                        None => self.put_small(&key, Bytes::new(), &meta).await.map(Some),
                    },
                },
            }
        }
        .instrument(span)
        .await;
        let synced = match synced {
            Ok(s) => s,
            Err(e) => {
                // The request may have reached S3 and only its reply been lost: remember the
                // key, so that it is cleaned up if the inode settles elsewhere.
                if inode.remote.as_ref().is_none_or(|r| r.key != key) {
                    let mut b = Batch::new();
                    b.maybe_written(ino, &key);
                    self.meta.commit(b)?;
                }
                return Err(e);
            }
        };
        let Some(synced) = synced else { return Ok(()) };
        if let Some(old) = &inode.remote {
            if old.key != synced.remote.key {
                self.delete_key(&old.key, Some(ino)).await?;
            }
        }
        let st = self.staged(ino);
        self.record(ino, seq, Some(synced), st).await
    }

    /// A hard link's object: a copy of its file's, once the file itself is in S3 (until then
    /// the file's upload marks this name pending again when it is done).
    async fn sync_link(self: &Arc<Self>, entry: Inode, file: Ino, seq: u64) -> FsResult<()> {
        let Some(f) = self.meta.inode(file)? else {
            return self.record(entry.ino, seq, None, None).await;
        };
        let src = match &f.remote {
            Some(r) if self.meta.pending(file)?.is_none() => r.clone(),
            _ => {
                if self.meta.pending(file)?.is_none() {
                    let mut b = Batch::new();
                    b.mark_pending(file, self.next_seq());
                    self.meta.commit(b)?;
                }
                return self.record(entry.ino, seq, None, None).await;
            }
        };
        let key = self.key_of(&entry)?;
        let _writing = InFlight::new(&self.flusher, &key);
        let etag = {
            let _permit = self.flusher.uploads.acquire().await.expect("semaphore never closed");
            let _k = self.flusher.key_lock(&key).await;
            self.store.copy(&src.key, &key, &user_meta(&f)).await?
        };
        if let Some(old) = &entry.remote {
            if old.key != key {
                self.delete_key(&old.key, Some(entry.ino)).await?;
            }
        }
        let synced = Synced {
            remote: Remote {
                key,
                etag,
                size: src.size,
            },
            gen: None,
        };
        self.record(entry.ino, seq, Some(synced), None).await
    }

    /// Before `writer` writes `key`: a file still to be moved away from `key` (renamed, or a
    /// name that took over from a removed one, and not yet copied) would copy whatever `writer`
    /// puts there instead of its own bytes. Its bytes are brought into staging first (from
    /// `key`, still untouched), so that it uploads them from there. This also breaks cycles of
    /// renames (a swap of two names) that no order of copies could carry out.
    async fn protect_movers(&self, key: &str, writer: Ino) -> FsResult<()> {
        for m in self.meta.movers(key)? {
            if m == writer {
                continue;
            }
            let needs_bytes = match self.meta.inode(m)? {
                Some(i) => i.kind == Kind::File && i.remote.as_ref().is_some_and(|r| r.key == key),
                None => false,
            };
            if needs_bytes {
                let st = self.stage(m, false).await?;
                st.content_dirty.store(true, Ordering::Release);
                st.pending_marked.store(true, Ordering::Release);
            }
            let mut b = Batch::new();
            b.moved_from(key, m);
            if needs_bytes {
                b.mark_pending(m, self.next_seq());
            }
            self.meta.commit(b)?;
        }
        Ok(())
    }

    /// Uploads one inode's pending work now (COMMIT of a volume with `--durability s3`).
    pub async fn flush_inode(self: &Arc<Self>, ino: Ino) -> FsResult<()> {
        // A write racing the upload leaves the inode pending under a new number: go again,
        // a bounded number of times.
        for _ in 0..8 {
            let Some(seq) = self.meta.pending(ino)? else {
                return Ok(());
            };
            self.sync_inode(ino, seq).await?;
        }
        Err(FsError::Retry(
            "the file kept changing while it was being committed".into(),
        ))
    }

    async fn put_small(&self, key: &str, body: Bytes, meta: &crate::store::UserMeta) -> FsResult<Synced> {
        let _permit = self.flusher.uploads.acquire().await.expect("semaphore never closed");
        let _k = self.flusher.key_lock(key).await;
        let size = body.len() as u64;
        let etag = self.store.put(key, Body::Bytes(body), meta).await?;
        self.flusher.uploaded_bytes.fetch_add(size, Ordering::Relaxed);
        Ok(Synced {
            remote: Remote {
                key: key.to_string(),
                etag,
                size,
            },
            gen: None,
        })
    }

    /// Uploads a staged file: one PUT of a consistent snapshot when small, else the multipart
    /// upload (continuing what streaming started). `None` when writes raced it: try next round.
    async fn upload_staged(
        self: &Arc<Self>,
        st: &Arc<Staged>,
        inode: &Inode,
        key: &str,
        meta: &crate::store::UserMeta,
    ) -> FsResult<Option<Synced>> {
        let _ = inode;
        if st.size() < self.cfg.part_size && st.multipart.locked().is_none() {
            let (bytes, gen) = {
                let _w = st.lock.write().await;
                let (bytes, _) = st.read_at(0, st.size() as u32)?;
                (Bytes::from(bytes), st.gen())
            };
            let mut s = self.put_small(key, bytes, meta).await?;
            s.gen = Some(gen);
            return Ok(Some(s));
        }
        // Large: bring every part up to date, then complete with writers held off.
        for _round in 0..3 {
            self.upload_parts(st, key, meta, true).await?;
            // Parts a streaming pass started are still on their way: wait for them.
            loop {
                let done = st.part_done.notified();
                if st.multipart.locked().as_ref().is_none_or(|m| m.in_flight.is_empty()) {
                    break;
                }
                done.await;
            }
            // Writers are held off only while the part list is taken: every part in S3 then
            // holds the file's bytes as of `gen`, so completing them yields that version whatever
            // is written meanwhile (a later write leaves the file dirty, see `record`). No writer
            // waits for the CompleteMultipartUpload itself.
            let w = st.lock.write().await;
            let size = st.size();
            let n = size.div_ceil(self.cfg.part_size).max(1) as i32;
            let (upload_id, mkey, parts) = {
                let mut m = st.multipart.locked();
                let Some(m) = m.as_mut() else { continue };
                let mut parts = Vec::new();
                for p in 1..=n {
                    match m.done.get(&p) {
                        Some((etag, len)) if *len == self.part_len(size, p) => parts.push(Part {
                            number: p,
                            etag: etag.clone(),
                        }),
                        _ => break,
                    }
                }
                (m.upload_id.clone(), m.key.clone(), parts)
            };
            if parts.len() != n as usize {
                continue; // written to meanwhile
            }
            let gen = st.gen();
            if let Some(m) = st.multipart.locked().as_mut() {
                m.completing = true;
            }
            drop(w);
            let completed = {
                let _k = self.flusher.key_lock(&mkey).await;
                self.store.complete_multipart(&mkey, &upload_id, &parts).await
            };
            let etag = match completed {
                Ok(etag) => etag,
                // The upload is gone: maybe our own earlier CompleteMultipartUpload succeeded and
                // only its reply was lost (S3 then answers NoSuchUpload). The object says so by
                // its ETag, which S3 derives from the parts' ETags.
                Err(crate::store::StoreError::NotFound(_)) => {
                    let head = self.store.head(&mkey).await?;
                    match head.filter(|h| h.size == size && h.etag == multipart_etag(&parts)) {
                        Some(h) => h.etag,
                        None => {
                            // Not ours: start over with a new upload.
                            *st.multipart.locked() = None;
                            let mut b = Batch::new();
                            b.clear_upload(st.ino);
                            self.meta.commit(b)?;
                            return Err(FsError::Retry(format!(
                                "multipart upload of {mkey} vanished; starting again"
                            )));
                        }
                    }
                }
                Err(e) => {
                    if let Some(m) = st.multipart.locked().as_mut() {
                        m.completing = false;
                    }
                    return Err(e.into());
                }
            };
            *st.multipart.locked() = None;
            let mut b = Batch::new();
            b.clear_upload(st.ino);
            self.meta.commit(b)?;
            return Ok(Some(Synced {
                remote: Remote { key: mkey, etag, size },
                gen: Some(gen),
            }));
        }
        Ok(None)
    }

    fn part_len(&self, size: u64, p: i32) -> u64 {
        let start = (p as u64 - 1) * self.cfg.part_size;
        (size - start.min(size)).min(self.cfg.part_size)
    }

    /// Uploads parts not yet in S3: all of them when `all`, else only parts that writing has
    /// left behind (a full part with another part written after it).
    async fn upload_parts(
        self: &Arc<Self>,
        st: &Arc<Staged>,
        key: &str,
        meta: &crate::store::UserMeta,
        all: bool,
    ) -> FsResult<()> {
        // Start (or restart, if the file moved) the multipart upload.
        let init = st.multipart_init.lock().await;
        let existing = st
            .multipart
            .locked()
            .as_ref()
            .map(|m| (m.key.clone(), m.upload_id.clone()));
        if let Some((k, id)) = &existing {
            if k != key && all {
                let _ = self.store.abort_multipart(k, id).await;
                *st.multipart.locked() = None;
            }
        }
        if st.multipart.locked().is_none() {
            let id = self.store.create_multipart(key, meta).await?;
            let mut b = Batch::new();
            b.set_upload(st.ino, key, &id);
            self.meta.commit(b)?;
            *st.multipart.locked() = Some(Multipart {
                key: key.to_string(),
                upload_id: id,
                ..Default::default()
            });
        }
        drop(init);
        let size = st.size();
        let n = size.div_ceil(self.cfg.part_size).max(1) as i32;
        let todo: Vec<i32> = {
            let mut m = st.multipart.locked();
            let Some(m) = m.as_mut() else {
                return Ok(()); // completed (or aborted) meanwhile
            };
            if m.completing {
                return Ok(()); // being completed: the next upload takes what is written now
            }
            (1..=n)
                .filter(|p| {
                    let fits = m
                        .done
                        .get(p)
                        .map(|(_, len)| *len == self.part_len(size, *p))
                        .unwrap_or(false);
                    let settled = all || (*p as u64) * self.cfg.part_size + self.cfg.part_size <= size;
                    !fits && !m.in_flight.contains(p) && settled
                })
                .collect::<Vec<_>>()
                .into_iter()
                .inspect(|p| {
                    m.in_flight.insert(*p);
                    m.dirtied.remove(p);
                })
                .collect()
        };
        let (mkey, upload_id) = {
            let m = st.multipart.locked();
            let Some(m) = m.as_ref() else { return Ok(()) };
            (m.key.clone(), m.upload_id.clone())
        };
        let results: Vec<FsResult<()>> = futures::stream::iter(todo.into_iter().map(|p| {
            let mkey = mkey.clone();
            let upload_id = upload_id.clone();
            async move {
                let _permit = self.flusher.uploads.acquire().await.expect("semaphore never closed");
                let offset = (p as u64 - 1) * self.cfg.part_size;
                let len = self.part_len(size, p);
                let body = Body::File {
                    path: st.path.clone(),
                    offset,
                    len,
                };
                let r = self.store.upload_part(&mkey, &upload_id, p, body).await;
                let _wake = WakeOnDrop(&st.part_done);
                let mut m = st.multipart.locked();
                let Some(m) = m.as_mut() else { return Ok(()) };
                m.in_flight.remove(&p);
                let etag = r?;
                self.flusher.uploaded_bytes.fetch_add(len, Ordering::Relaxed);
                if !m.dirtied.remove(&p) && m.upload_id == upload_id {
                    m.done.insert(p, (etag, len));
                }
                Ok(())
            }
        }))
        .buffer_unordered(self.cfg.upload_concurrency)
        .collect()
        .await;
        results.into_iter().collect()
    }

    /// Starts streaming uploads for files being written past two parts.
    fn start_streams(self: &Arc<Self>) {
        let wanted: Vec<Ino> = self.flusher.stream_wanted.locked().drain().collect();
        for ino in wanted {
            if !self.flusher.streaming.locked().insert(ino) {
                continue;
            }
            let vol = self.clone();
            let span = tracing::info_span!(parent: None, "stream_upload", ino);
            crate::telemetry::link_causes(&span, self.volume_id(), ino, false);
            self.spawn_background(
                async move {
                    let r = vol.stream_file(ino).await;
                    vol.flusher.streaming.locked().remove(&ino);
                    match r {
                        // Yielded to busy clients: a round after they pause takes it up again.
                        Ok(true) => {
                            vol.flusher.stream_wanted.locked().insert(ino);
                        }
                        Ok(false) => {}
                        Err(e) => {
                            tracing::warn!(ino, error = %e, "streaming upload paused; the file is uploaded when idle")
                        }
                    }
                    vol.flusher.kick();
                }
                .instrument(span),
            );
        }
    }

    /// Keeps parts flowing to S3 while a large file is written: each pass starts the parts the
    /// writer has left behind without waiting for earlier ones (the upload semaphore bounds how
    /// many are in flight), so the pipeline never drains between batches.
    ///
    /// Returns whether it stopped to yield to busy clients (see `VolumeConfig::stream_while_busy`).
    async fn stream_file(self: &Arc<Self>, ino: Ino) -> FsResult<bool> {
        let mut passes: Vec<tokio::task::JoinHandle<FsResult<()>>> = Vec::new();
        let mut yielded = false;
        loop {
            if !self.cfg.stream_while_busy && self.defers_background() {
                yielded = true;
                break;
            }
            let Some(st) = self.staged(ino) else { break };
            let Some(inode) = self.meta.inode(ino)? else { break };
            let key = self.key_of(&inode)?;
            let vol = self.clone();
            let pass_st = st.clone();
            passes.retain(|p| !p.is_finished());
            passes.push(tokio::spawn(async move {
                vol.upload_parts(&pass_st, &key, &user_meta(&inode), false).await
            }));
            // Stop once the writer pauses; the flusher completes the upload when the file is idle.
            if st.idle_at(self.cfg.clock.now()) >= std::time::Duration::from_millis(200) {
                break;
            }
            self.cfg.clock.sleep(std::time::Duration::from_millis(20)).await;
        }
        for p in passes {
            p.await.map_err(|e| FsError::Io(format!("upload task failed: {e}")))??;
        }
        Ok(yielded)
    }

    /// Keeps at most `max_staged_files` staged copies: the least recently written ones that S3
    /// already holds are dropped (their disk space and file descriptors freed). Recent ones stay,
    /// so a file written again soon, or while S3 is unreachable, needs no download.
    fn trim_staged(&self) {
        let max = self.cfg.max_staged_files;
        let mut clean: Vec<(std::time::Instant, Arc<Staged>)> = {
            let staged = self.staged.locked();
            // Some slack, so the sort below runs once per many uploads, not after each.
            if staged.len() <= max + max / 8 {
                return;
            }
            staged
                .values()
                .filter(|st| !st.content_dirty.load(Ordering::Acquire) && !st.pending_marked.load(Ordering::Acquire))
                .map(|st| (*st.last_write.locked(), st.clone()))
                .collect()
        };
        clean.sort_by_key(|c| c.0);
        let excess = self.staged.locked().len().saturating_sub(max);
        for (_, st) in clean.into_iter().take(excess) {
            // Writers hold the lock shared: one busy right now keeps its copy.
            if let Ok(_w) = st.lock.try_write() {
                if !st.content_dirty.load(Ordering::Acquire) && !st.pending_marked.load(Ordering::Acquire) {
                    self.drop_staged(st.ino);
                }
            }
        }
    }

    /// Records a finished sync: the remote location, and clears `P` if nothing changed meanwhile.
    /// Takes the staged file's lock before `ns` (the lock order).
    async fn record(&self, ino: Ino, seq: u64, synced: Option<Synced>, st: Option<Arc<Staged>>) -> FsResult<()> {
        let _w = match &st {
            Some(st) => Some(st.lock.write().await),
            None => None,
        };
        let _g = self.ns.lock().await;
        let mut b = Batch::new();
        let Some(mut inode) = self.meta.inode(ino)? else {
            // Removed while uploading: what we just wrote must go too.
            if let Some(s) = &synced {
                b.queue_delete(self.next_seq(), &s.remote.key);
            }
            b.clear_pending(ino);
            return Ok(self.meta.commit(b)?);
        };
        let mut clean = self.meta.pending(ino)? == Some(seq);
        if let Some(s) = synced {
            if let Some(old) = &inode.remote {
                if old.key != s.remote.key {
                    b.moved_from(&old.key, ino);
                }
            }
            // Keys that failed uploads may have written: only the one just written is ours.
            self.release_maybe_written(&mut b, ino, Some(&s.remote.key))?;
            if let (Some(st), Some(gen)) = (&st, s.gen) {
                if st.gen() == gen {
                    st.content_dirty.store(false, Ordering::Release);
                    inode.size = s.remote.size;
                    inode.mtime = st.mtime();
                } else {
                    clean = false;
                }
            }
            inode.remote = Some(s.remote);
            inode.synced_epoch = self.flusher.epoch.fetch_add(1, Ordering::AcqRel) + 1;
            b.put_inode(&inode);
            // The file's other names copy what was just uploaded.
            if !matches!(inode.kind, Kind::Link(_) | Kind::Dir) {
                for l in self.meta.links(ino)? {
                    b.mark_pending(l, self.next_seq());
                }
            }
        }
        if clean {
            b.clear_pending(ino);
            if let Some(st) = &st {
                st.pending_marked.store(false, Ordering::Release);
            }
        }
        self.meta.commit(b)?;
        drop(_g);
        drop(_w);
        self.trim_staged();
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::clock::Clock;
    use std::time::Duration;

    /// Deletions are remembered only as long as a listing that started before them runs, so the
    /// map stays bounded by what listings can still see, however many files are deleted.
    #[test]
    fn recent_deletes_outlive_only_the_listings_that_can_see_them() {
        let clock = Clock::manual();
        let f = FlushState::new(1, clock.clone());
        for i in 0..10_000 {
            f.note_deleted(&format!("idle/{i}"));
        }
        assert_eq!(f.recent_deletes_len(), 0, "kept with no listing under way");

        let old = f.begin_listing();
        clock.advance(Duration::from_secs(1));
        f.note_deleted("d/a");
        assert!(f.deleted_since("d/a", false, old.started));
        assert!(f.deleted_since("d/", true, old.started));
        assert!(!f.deleted_since("e/", true, old.started));
        clock.advance(Duration::from_secs(1));
        let young = f.begin_listing();
        assert!(
            !f.deleted_since("d/a", false, young.started),
            "deleted before the listing began"
        );
        drop(old);
        clock.advance(Duration::from_secs(1));
        for i in 0..100_000 {
            f.note_deleted(&format!("busy/{i}"));
        }
        // Every one of them is newer than `young`, so all stay while it runs...
        assert!(f.deleted_since("busy/99999", false, young.started));
        drop(young);
        // ... and the first deletion after it ends lets them all go.
        f.note_deleted("last");
        assert_eq!(f.recent_deletes_len(), 0);
    }
}
