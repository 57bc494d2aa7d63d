//! The uploader: turns pending journal records into S3 requests.
//!
//! - `X` records (objects to delete) go first, each under the lock of its key and only when no
//!   live inode maps to that key any more (a file created again under the same name, or moved onto
//!   it, must not lose its new object to the old one's deletion), a thousand keys a request.
//! - `P` records: directories and symlinks are PUT at once; a file's staged bytes are uploaded
//!   once the file has been idle for the flush delay (or at once when forced: shutdown, unpublish,
//!   an operator's flush). Files past two parts stream as a multipart upload while they are still
//!   being written. A file whose bytes are already in S3 but whose key or attributes changed is
//!   moved or rewritten server-side by CopyObject.
//! - A record is cleared only if nothing changed while its S3 request was in flight (the change
//!   sequence in `P` and the staged file's generation are compared), so a write racing an upload
//!   is never marked clean.
//!
//! The uploader is a part of its own: it owns the state below and works on the volume's shared
//! [`Core`] (store, database, staging area), never on the rest of the `Volume`, which hands it
//! work and asks it questions through its methods.
//!
//! Here: the uploader's state ([`Uploader`]), its pace ([`Pace`]: tick, kick, back-off) and a
//! round over the journal. One inode's way to S3 is in `sync.rs`, large files in
//! `multipart.rs`, deletions in `deletes.rs`; what listings must not take at S3's word is in `fs/ledger.rs`, and when due
//! work waits for busy clients in `fs/defer.rs`.

use std::collections::{HashMap, HashSet};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use futures::StreamExt;
use tracing::Instrument;

use super::defer::BusyClients;
use super::ledger::KeyLedger;
use super::staging::Staged;
use super::{Core, FsError, FsResult};
use crate::meta::{Ino, Remote};
use crate::sync::LockExt;

mod deletes;
mod health;
mod multipart;
mod sync;

pub use health::Health;

/// The state the uploader alone changes: its concurrency, its wake-ups, the dirty-byte count,
/// streams wanted and running, per-key locks, the round cursor and its counters.
pub struct Uploader {
    /// What the uploader shares with the volume's other parts.
    core: Arc<Core>,
    pub(crate) uploads: tokio::sync::Semaphore,
    notify: tokio::sync::Notify,
    /// Bumped every time S3 catches up with an inode; listings older than an inode's epoch do
    /// not override it.
    epoch: AtomicU64,
    dirty_bytes: AtomicU64,
    stream_wanted: Mutex<HashSet<Ino>>,
    streaming: Mutex<HashSet<Ino>>,
    key_locks: Mutex<HashMap<String, Arc<tokio::sync::Mutex<()>>>>,
    /// What listings must not take at S3's word (see [`KeyLedger`]).
    ledger: KeyLedger,
    /// Where the next round's share of the pending inodes starts (see `flush_round`).
    cursor: AtomicU64,
    /// Dirty bytes counted so far in the sweep under way.
    dirty_sweep: AtomicU64,
    /// One flush round at a time: the background flusher and `flush_all` must not sync the same
    /// inode concurrently (the loser of a rename's copy would find its source already gone).
    round: tokio::sync::Mutex<()>,
    /// Whether due work waits for the clients (see [`BusyClients`]).
    busy: BusyClients,
    /// Counters for status and metrics.
    uploaded_bytes: AtomicU64,
    errors: AtomicU64,
    /// Uploads allowed in flight (the semaphore's size).
    concurrency: usize,
    /// What an operator asks about (see [`Health`]).
    health: Health,
}

impl std::ops::Deref for Uploader {
    type Target = Core;
    fn deref(&self) -> &Core {
        &self.core
    }
}

impl Uploader {
    pub fn new(core: Arc<Core>) -> Uploader {
        let (concurrency, clock) = (core.cfg.upload_concurrency, core.cfg.clock.clone());
        Uploader {
            core,
            concurrency: concurrency.max(1),
            health: Health::new(clock.now()),
            uploads: tokio::sync::Semaphore::new(concurrency.max(1)),
            notify: tokio::sync::Notify::new(),
            epoch: AtomicU64::new(1),
            dirty_bytes: AtomicU64::new(0),
            stream_wanted: Mutex::new(HashSet::new()),
            streaming: Mutex::new(HashSet::new()),
            key_locks: Mutex::new(HashMap::new()),
            ledger: KeyLedger::new(clock),
            round: tokio::sync::Mutex::new(()),
            cursor: AtomicU64::new(0),
            dirty_sweep: AtomicU64::new(0),
            busy: BusyClients::default(),
            uploaded_bytes: AtomicU64::new(0),
            errors: AtomicU64::new(0),
        }
    }

    /// The last error, the last upload, how long work has been pending.
    pub fn health(&self) -> &Health {
        &self.health
    }

    /// S3 uploads (PUTs, parts, copies) in flight now.
    pub fn in_flight(&self) -> usize {
        self.concurrency.saturating_sub(self.uploads.available_permits())
    }

    /// Counts `len` bytes uploaded now.
    fn note_uploaded(&self, len: u64) {
        self.uploaded_bytes.fetch_add(len, Ordering::Relaxed);
        self.health.uploaded();
    }

    /// What listings must not take at S3's word.
    pub(crate) fn ledger(&self) -> &KeyLedger {
        &self.ledger
    }

    /// Bytes uploaded since the volume opened.
    pub fn uploaded_bytes(&self) -> u64 {
        self.uploaded_bytes.load(Ordering::Relaxed)
    }

    /// S3 requests of the uploader that failed since the volume opened (the work stays
    /// journalled and is retried).
    pub fn errors(&self) -> u64 {
        self.errors.load(Ordering::Relaxed)
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

    pub(crate) fn note_write(&self, st: &Staged, part_size: u64, appending: bool) {
        if appending && st.size() >= 2 * part_size && !self.streaming.locked().contains(&st.ino) {
            self.stream_wanted.locked().insert(st.ino);
            self.notify.notify_one();
        }
    }

    /// Counts and logs failed S3 work (which stays journalled), keeping the first error.
    fn note_failures(&self, what: &str, results: Vec<FsResult<()>>, first: &mut Option<FsError>) {
        for e in results.into_iter().filter_map(Result::err) {
            self.errors.fetch_add(1, Ordering::Relaxed);
            self.health.failed(&e);
            tracing::warn!(error = %e, "{what} failed; it stays journalled and is retried");
            first.get_or_insert(e);
        }
    }

    pub async fn wait(&self) {
        self.notify.notified().await
    }

    /// Held for the whole of one inode's sync, from reading its bytes to recording the result:
    /// two syncs of one inode (an upload round's and a COMMIT's) would otherwise read in one
    /// order and PUT in the other, leaving S3 with the older bytes after the COMMIT returned.
    /// Same map as the key locks; the NUL that no key holds keeps the names apart.
    async fn sync_lock(&self, ino: Ino) -> KeyGuard<'_> {
        self.key_lock(&format!("\0sync {ino}")).await
    }

    /// The lock of `key` if no one holds it, without waiting.
    fn try_key_lock(&self, key: &str) -> Option<KeyGuard<'_>> {
        let mut g = self.unlocked_guard(key);
        // Without the lock, `g` dropped still takes the map's entry away if no one else wants it.
        g._guard = Some(g.m.clone().try_lock_owned().ok()?);
        Some(g)
    }

    async fn key_lock(&self, key: &str) -> KeyGuard<'_> {
        let mut g = self.unlocked_guard(key);
        g._guard = Some(g.m.clone().lock_owned().await);
        g
    }

    /// A guard of `key`'s entry in the lock map (made if missing), not holding the lock yet.
    fn unlocked_guard(&self, key: &str) -> KeyGuard<'_> {
        let m = self.key_locks.locked().entry(key.to_string()).or_default().clone();
        KeyGuard {
            state: self,
            key: key.to_string(),
            _guard: None,
            m,
        }
    }
}

struct KeyGuard<'a> {
    state: &'a Uploader,
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

/// What an upload produced, to be recorded if nothing changed meanwhile.
struct Synced<'a> {
    remote: Remote,
    /// Staged file generation the upload was taken from.
    gen: Option<u64>,
    /// The lock of the key written, released by `record` once the journal says whose object
    /// the key holds (see `lock_to_write`).
    written: KeyGuard<'a>,
}

/// How often the uploader looks for files that went idle.
pub const FLUSH_TICK: std::time::Duration = std::time::Duration::from_millis(200);
/// Longest pause between rounds while S3 keeps failing.
pub const MAX_BACKOFF: std::time::Duration = std::time::Duration::from_secs(10);

/// When the background uploader runs its next round: every [`FLUSH_TICK`], or at once when
/// kicked; while S3 keeps failing, it backs off, doubling up to [`MAX_BACKOFF`], instead of
/// retrying every tick (and a kick does not cut a back-off short).
pub struct Pace {
    wait: std::time::Duration,
}

impl Default for Pace {
    fn default() -> Pace {
        Pace { wait: FLUSH_TICK }
    }
}

/// Journal records one background flush round looks at.
const ROUND_SCAN: usize = 4096;

impl Uploader {
    /// Waits for the next background round at `pace`, runs it, and sets the pace from its
    /// outcome. False once `stop` is set (checked before the round, never during one).
    pub async fn next_upload_round(
        self: &Arc<Self>,
        pace: &mut Pace,
        stop: &mut tokio::sync::watch::Receiver<bool>,
    ) -> bool {
        tokio::select! {
            _ = stop.wait_for(|s| *s) => return false,
            _ = self.wait(), if pace.wait == FLUSH_TICK => {}
            _ = self.cfg.clock.sleep(pace.wait) => {}
        }
        let errors = self.errors();
        let failed = match self.flush_round(false).await {
            Err(e) => {
                tracing::warn!(error = %e, "flush round failed; retrying");
                self.health.failed(&e);
                true
            }
            Ok(left) => {
                if left == 0 {
                    self.health.clean(self.cfg.clock.now());
                }
                self.errors() != errors
            }
        };
        pace.wait = if failed {
            (pace.wait * 2).min(MAX_BACKOFF)
        } else {
            FLUSH_TICK
        };
        true
    }

    /// Uploads everything pending now, ignoring the flush delay; returns when nothing is pending
    /// or an S3 error stops progress (the error is returned; the work stays journalled).
    pub async fn flush_all(self: &Arc<Self>) -> FsResult<()> {
        // A round can end with work still pending for good reasons (a write raced an upload, an
        // upload's result was recorded as a delete of what it wrote), or with an error the next
        // round clears (S3 unavailable for a moment, a sync that raced a client's change): only
        // several rounds in a row without progress mean S3 keeps refusing.
        const MAX_STALLS: u32 = 5;
        let (mut last, mut stalls) = (usize::MAX, 0);
        loop {
            let left = match self.flush_round(true).await {
                Ok(left) => left,
                Err(e) => {
                    self.health.failed(&e);
                    stalls += 1;
                    if !matches!(e, FsError::Retry(_) | FsError::Io(_)) || stalls >= MAX_STALLS {
                        return Err(e);
                    }
                    tracing::debug!(error = %e, "a flush round failed; trying again");
                    self.cfg
                        .clock
                        .sleep(std::time::Duration::from_millis(20 << stalls))
                        .await;
                    continue;
                }
            };
            if left == 0 {
                // Nothing pending is nothing dirty: the figure need not wait for the next sweep.
                self.dirty_bytes.store(0, Ordering::Release);
                self.health.clean(self.cfg.clock.now());
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

    /// Sends every deletion queued so far, now (a namespace change waiting for S3, see
    /// `Volume::in_s3`). Those that fail stay journalled for the rounds; the first failure is
    /// returned.
    pub async fn flush_deletes(self: &Arc<Self>) -> FsResult<()> {
        let results = self.delete_keys(self.meta.all_deletes()?, || false).await;
        let mut first = None;
        self.note_failures("delete", results, &mut first);
        first.map_or(Ok(()), Err)
    }

    /// Notes that a client operation arrived (see [`BusyClients::defers`]); called within the
    /// operation, whose arrival is the time.
    pub fn note_activity(&self) {
        self.busy.note_activity(self.cfg.clock.op_now(), self.quiet());
    }

    fn quiet(&self) -> std::time::Duration {
        super::defer::QUIET.min(self.cfg.flush_delay / 4)
    }

    /// How long a dirty file goes unwritten before it is uploaded: the flush delay, but only the
    /// quiet interval for a file whose upload streamed parts while it was written and that the
    /// client has committed (closed or fsync'd) since its last write. What is left of such an
    /// upload is its last part and the completion: waiting the whole flush delay for them, a
    /// copied 1 GiB file reached S3 0.74 s after the copy's COMMIT with the bench's 500 ms
    /// delay (over 2 s with the default), against 0.30 s with the quiet interval.
    ///
    /// Any other file keeps the whole delay, committed or not: a database fsyncs its files after
    /// each transaction, and with a transaction a second its 16 MiB WAL segment would be sent
    /// again after every one of them; programs that close a small file and reopen it to append
    /// would send a PUT per close.
    fn due_after(&self, st: &Staged) -> std::time::Duration {
        if st.committed_since_write() && st.streamed() {
            self.quiet()
        } else {
            self.cfg.flush_delay
        }
    }

    /// Whether due uploads and deletions wait for the clients to pause. Not when the dirty
    /// bytes near their bound: writers would be held up waiting for uploads that wait for them.
    fn defers_background(&self) -> bool {
        self.dirty_bytes() <= self.cfg.max_dirty_bytes / 2
            && self
                .busy
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
            let _round = self.round.lock().await;
            if !force
                && self.meta.pending_count() == 0
                && self.meta.delete_count() == 0
                && self.stream_wanted.locked().is_empty()
            {
                // An idle tick: nothing to look at, and nothing pending is nothing dirty.
                self.dirty_bytes.store(0, Ordering::Release);
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
            let results = self.delete_keys(deletes, yields).await;
            self.note_failures("delete", results, &mut first_err);

            let (pending, sweep_start, sweep_end) = if force {
                (self.meta.all_pending()?, true, true)
            } else {
                let after = self.cursor.load(Ordering::Acquire);
                let page = self.meta.pending_after(after, ROUND_SCAN)?;
                let end = page.len() < ROUND_SCAN;
                let next = if end { 0 } else { page.last().map_or(0, |p| p.0) };
                self.cursor.store(next, Ordering::Release);
                (page, after == 0, end)
            };
            tracing::Span::current().record("pending", pending.len());
            let mut dirty = if sweep_start {
                0
            } else {
                self.dirty_sweep.load(Ordering::Acquire)
            };
            let mut due = Vec::new();
            let now = self.cfg.clock.now();
            for (ino, seq) in pending {
                let st = self.staged(ino);
                if let Some(st) = &st {
                    if st.is_dirty() {
                        dirty += st.present_bytes();
                        let idle = st.idle_at(now);
                        if !force && (idle < self.due_after(st) || self.streaming.locked().contains(&ino)) {
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
                self.dirty_bytes.store(dirty, Ordering::Release);
            } else {
                self.dirty_sweep.store(dirty, Ordering::Release);
            }
            if !due.is_empty() && !sweep_end {
                self.kick(); // more of the journal to look at, and it had work
            }
            let results: Vec<_> = futures::stream::iter(due.into_iter().map(|(ino, _seq)| async move {
                if yields() {
                    return Ok(()); // still pending: a later round uploads it
                }
                self.sync_inode(ino).await
            }))
            .buffer_unordered(self.cfg.upload_concurrency)
            .collect()
            .await;
            self.note_failures("upload", results, &mut first_err);
            let left = self.meta.pending_count() + self.meta.delete_count();
            match first_err {
                Some(e) if force => Err(e),
                _ => Ok(left),
            }
        }
        .instrument(span)
        .await
    }
}
