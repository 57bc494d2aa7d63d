//! The read path for bytes only S3 has: a bounded in-memory cache of fixed-size chunks, filled
//! by ranged GETs, and read-ahead that grows while a reader stays sequential.
//!
//! A chunk is fetched once however many READs want it (they wait on the same cell), and the
//! cache holds at most `cache_bytes / chunk` chunks, so memory is bounded whatever the file size.
//! Chunks are keyed by ETag as well as inode, so an object rewritten by another tool is never
//! served from the old version's chunks.
//!
//! Read-ahead brings up to `run` chunks in one GET, streamed: each chunk is cached as
//! its bytes complete, and a READ waiting for it goes on then, not at the end of the GET. A READ
//! that finds its chunk neither cached nor coming fetches that chunk alone.

use std::collections::{HashMap, VecDeque};
use std::sync::{Arc, Mutex};

use bytes::Bytes;
use tracing::Instrument;

use super::versions::read_version;
use super::{FsError, FsResult};
use crate::meta::{Ino, Remote};
use crate::store::pool::BufPool;
use crate::store::ObjectStore;
use crate::sync::LockExt;

type Cell = Arc<tokio::sync::OnceCell<Bytes>>;

/// Files whose sequential readers are tracked at once. Past it, the least recently read half is
/// forgotten (those readers start again with a small read-ahead): the map stays bounded however
/// many files are read over a volume's life.
const MAX_STREAMS: usize = 4096;

/// Memory for small objects fetched whole (see [`ReadCache::prime`]).
const SMALL_CACHE_BYTES: u64 = 8 << 20;

/// ... and at most this many of them (the map's own overhead, for tiny objects).
const SMALL_CACHE_OBJECTS: usize = 4096;

/// Chunks a sequential reader of a file larger than the cache leaves behind it, at most. The
/// rest are dropped as it passes: such a file could not stay cached anyway, and the cache
/// filling up with it before its first eviction cost a cold read of 256 MiB 12K page faults
/// (48 MiB of fresh pages, ~50 µs each under user-mode-linux), where a short trail recycles the
/// same few buffers (see `store::pool`). One chunk of trail still serves READs the client sends
/// out of order across a chunk boundary.
const SEQUENTIAL_TRAIL: u64 = 1;

/// What a random reader's READ fetches at least (see [`ReadCache::read_exact_range`]).
const RANDOM_GRAIN: u64 = 64 << 10;

/// Buffers of streamed chunks kept for reuse (see `store::pool`): a read-ahead window's worth.
const KEPT_CHUNK_BYTES: usize = 32 << 20;

pub struct ReadCache {
    chunk: u64,
    /// Buffers for chunks that read-ahead streams in.
    buffers: Arc<BufPool>,
    /// Chunks fetched ahead of a sequential reader, at most.
    read_ahead: usize,
    /// Chunks one read-ahead GET brings at most (see `VolumeConfig::read_run`). A sequential
    /// reader's read-ahead waits until that many chunks of its window are to be fetched (or
    /// the next one is), so its GETs are that large.
    run: u64,
    max_chunks: usize,
    inner: Mutex<Inner>,
}

/// A file never read before is a reader at 0 with no window and no run.
#[derive(Clone, Copy, Default)]
struct Stream {
    /// Where a sequential reader is expected next.
    next: u64,
    /// Its read-ahead window, in chunks.
    window: usize,
    /// When it was last used (a read counter).
    used: u64,
    /// Reads in a row that followed on from the one before.
    run: u32,
    /// READs answered by a ranged GET of their own (a random reader's), since the reader was
    /// first seen: what a staged copy of the file would have saved (see `random_reads.rs`).
    ranges: u32,
    /// The first chunk its read-ahead has not asked for yet.
    ahead: u64,
}

#[derive(Default)]
struct Inner {
    map: HashMap<(Ino, u64), (String, Cell)>,
    order: VecDeque<(Ino, u64)>,
    /// Per inode, what its last reads tell of its reader. At most [`MAX_STREAMS`] entries.
    stream: HashMap<Ino, Stream>,
    reads: u64,
    /// Small objects fetched whole (with their metadata, or ahead of a reader going through a
    /// directory): by inode, with their ETag, oldest first, at most [`SMALL_CACHE_BYTES`] and
    /// [`SMALL_CACHE_OBJECTS`].
    small: HashMap<Ino, (String, Bytes)>,
    small_order: VecDeque<Ino>,
    small_bytes: u64,
    pub hits: u64,
    pub misses: u64,
}

impl ReadCache {
    pub fn new(chunk: u64, cache_bytes: u64, read_ahead: usize, run: u64) -> ReadCache {
        ReadCache {
            chunk,
            buffers: BufPool::new(KEPT_CHUNK_BYTES),
            read_ahead,
            run: run.max(1),
            max_chunks: (cache_bytes / chunk).max(2) as usize,
            inner: Mutex::new(Inner::default()),
        }
    }

    pub fn forget(&self, ino: Ino) {
        let mut inner = self.inner.locked();
        inner.map.retain(|k, _| k.0 != ino);
        inner.stream.remove(&ino);
        if let Some((_, b)) = inner.small.remove(&ino) {
            inner.small_bytes -= b.len() as u64;
            inner.small_order.retain(|i| *i != ino);
        }
    }

    /// Keeps a small object's bytes, fetched whole, for the reads that follow. Bounded by bytes
    /// ([`SMALL_CACHE_BYTES`], oldest out first), apart from the chunk cache.
    pub fn prime(&self, ino: Ino, etag: &str, bytes: Bytes) {
        if bytes.len() as u64 > SMALL_CACHE_BYTES / 16 {
            return;
        }
        let mut inner = self.inner.locked();
        let len = bytes.len() as u64;
        if let Some((_, old)) = inner.small.insert(ino, (etag.to_string(), bytes)) {
            inner.small_bytes -= old.len() as u64;
        } else {
            inner.small_order.push_back(ino);
        }
        inner.small_bytes += len;
        while inner.small_bytes > SMALL_CACHE_BYTES || inner.small.len() > SMALL_CACHE_OBJECTS {
            let Some(old) = inner.small_order.pop_front() else {
                break;
            };
            if let Some((_, b)) = inner.small.remove(&old) {
                inner.small_bytes -= b.len() as u64;
            }
        }
    }

    /// Whether a small object's bytes of version `etag` are here.
    pub fn has_small(&self, ino: Ino, etag: &str) -> bool {
        self.inner.locked().small.get(&ino).is_some_and(|(e, _)| e == etag)
    }

    /// A small object's bytes, if they were fetched whole and are of version `etag`.
    fn small(&self, ino: Ino, etag: &str) -> Option<Bytes> {
        let mut inner = self.inner.locked();
        let b = match inner.small.get(&ino) {
            Some((e, b)) if e == etag => b.clone(),
            _ => return None,
        };
        inner.hits += 1;
        tracing::Span::current().record("cache", "hit");
        Some(b)
    }

    #[cfg(test)]
    fn streams(&self) -> usize {
        self.inner.locked().stream.len()
    }

    /// (hits, misses) so far.
    pub fn stats(&self) -> (u64, u64) {
        let i = self.inner.locked();
        (i.hits, i.misses)
    }

    fn cell(&self, ino: Ino, etag: &str, idx: u64, count: bool) -> Cell {
        self.cell_and_whether_new(ino, etag, idx, count).0
    }

    /// Chunk `idx`'s cell, and whether it was made now: a cell found is being filled already, or
    /// was (or a READ fills it, should its fill have failed).
    fn cell_and_whether_new(&self, ino: Ino, etag: &str, idx: u64, count: bool) -> (Cell, bool) {
        let mut inner = self.inner.locked();
        if let Some((e, cell)) = inner.map.get(&(ino, idx)) {
            if e == etag {
                let cell = cell.clone();
                if count {
                    inner.hits += 1;
                    tracing::Span::current().record("cache", "hit");
                }
                return (cell, false);
            }
        }
        if count {
            inner.misses += 1;
            tracing::Span::current().record("cache", "miss");
        }
        let cell: Cell = Arc::default();
        inner.map.insert((ino, idx), (etag.to_string(), cell.clone()));
        inner.order.push_back((ino, idx));
        while inner.map.len() > self.max_chunks {
            let Some(old) = inner.order.pop_front() else {
                break;
            };
            inner.map.remove(&old);
        }
        // Entries replaced under the same key leave stale positions behind; keep the queue short.
        if inner.order.len() > 4 * self.max_chunks {
            let live: Vec<_> = inner
                .order
                .iter()
                .filter(|k| inner.map.contains_key(k))
                .copied()
                .collect();
            inner.order = live.into();
        }
        (cell, true)
    }

    /// Whether chunk `idx` of this version is in the cache (or being fetched).
    #[cfg(test)]
    fn cached(&self, ino: Ino, etag: &str, idx: u64) -> bool {
        Self::has_chunk(&self.inner.locked(), ino, etag, idx)
    }

    fn has_chunk(inner: &Inner, ino: Ino, etag: &str, idx: u64) -> bool {
        inner.map.get(&(ino, idx)).is_some_and(|(e, _)| e == etag)
    }

    /// READs of `ino` answered by a ranged GET of their own since its reader was first seen.
    pub fn ranged_reads(&self, ino: Ino) -> u32 {
        self.inner.locked().stream.get(&ino).map_or(0, |s| s.ranges)
    }

    /// Starts [`ReadCache::ranged_reads`] of `ino` over from zero.
    pub fn reset_ranged_reads(&self, ino: Ino) {
        if let Some(s) = self.inner.locked().stream.get_mut(&ino) {
            s.ranges = 0;
        }
    }

    /// A random reader's READ: only the range asked for, rounded out to [`RANDOM_GRAIN`], and
    /// not cached. A whole chunk per random 4 KiB read was a thousandfold read amplification
    /// (fio's random 4 KiB reads of a 256 MiB file fetched 4 MiB each).
    async fn read_exact_range(
        store: &dyn ObjectStore,
        remote: &Remote,
        offset: u64,
        end: u64,
    ) -> FsResult<(Bytes, bool)> {
        let from = offset / RANDOM_GRAIN * RANDOM_GRAIN;
        let to = end.div_ceil(RANDOM_GRAIN).saturating_mul(RANDOM_GRAIN).min(remote.size);
        let span = tracing::info_span!("random_read", key = %remote.key, offset = from, len = to - from);
        let bytes = read_version(store, remote, from..to).instrument(span).await?;
        let lo = ((offset - from) as usize).min(bytes.len());
        let hi = ((end - from) as usize).min(bytes.len());
        let out = bytes.slice(lo..hi);
        let eof = offset + out.len() as u64 >= remote.size;
        Ok((out, eof))
    }

    async fn fetch(store: &dyn ObjectStore, cell: &Cell, remote: &Remote, idx: u64, chunk: u64) -> FsResult<Bytes> {
        let start = idx * chunk;
        let end = (start + chunk).min(remote.size);
        let span = tracing::info_span!("cache_fill", key = %remote.key, chunk = idx);
        cell.get_or_try_init(|| async {
            let b = read_version(store, remote, start..end).await?;
            Ok::<_, FsError>(b)
        })
        .instrument(span)
        .await
        .cloned()
    }

    /// Starts fetching chunks `run` of `remote` ahead of a reader: one streamed GET for each
    /// stretch of them with no cell yet. A chunk with one is cached, or on its way.
    fn read_ahead(
        &self,
        store: &Arc<dyn ObjectStore>,
        ino: Ino,
        remote: &Remote,
        run: std::ops::Range<u64>,
        tasks: &crate::tasks::Tasks,
    ) {
        let mut stretch: Vec<(u64, Cell)> = Vec::new();
        let start = |mut stretch: Vec<(u64, Cell)>| {
            let (store, remote, chunk) = (store.clone(), remote.clone(), self.chunk);
            match stretch.len() {
                0 => {}
                // One chunk: a GET into its cell, the READs' own way.
                1 => {
                    let (idx, cell) = stretch.pop().expect("one");
                    tasks.spawn("read-ahead", async move {
                        let _ = Self::fetch(&*store, &cell, &remote, idx, chunk).await;
                    });
                }
                _ => {
                    let first = stretch[0].0;
                    let cells: Vec<Cell> = stretch.into_iter().map(|(_, c)| c).collect();
                    let buffers = self.buffers.clone();
                    tasks.spawn("read-ahead", async move {
                        Self::fetch_run(&*store, &buffers, &remote, first, &cells, chunk).await;
                    });
                }
            }
        };
        for idx in run {
            // Only cells made now: one found is filled, or being filled, by a GET of its own.
            // Taking those into a stretch fetched their bytes twice whenever the client's READs
            // came out of order and the run started over.
            match self.cell_and_whether_new(ino, &remote.etag, idx, false) {
                (cell, true) => stretch.push((idx, cell)),
                _ => start(std::mem::take(&mut stretch)),
            }
        }
        start(stretch);
    }

    /// Fills `cells`, chunks `first..` of `remote`, from one GET streamed into chunk-sized
    /// buffers: each cell is set as its chunk completes. A cell whose fill another READ started
    /// first is left to it. Should the GET fail, the cells it did not fill stay empty, and the
    /// READs that want them fetch them one by one.
    async fn fetch_run(
        store: &dyn ObjectStore,
        buffers: &Arc<BufPool>,
        remote: &Remote,
        first: u64,
        cells: &[Cell],
        chunk: u64,
    ) {
        let start = first * chunk;
        let end = (start + cells.len() as u64 * chunk).min(remote.size);
        let len_of = |k: usize| ((start + (k as u64 + 1) * chunk).min(end) - (start + k as u64 * chunk)) as usize;
        let span = tracing::info_span!("cache_fill", key = %remote.key, chunk = first, chunks = cells.len());
        let mut senders = Vec::with_capacity(cells.len());
        let fills = futures::future::join_all(cells.iter().map(|cell| {
            let (tx, rx) = tokio::sync::oneshot::channel::<Bytes>();
            senders.push(tx);
            cell.get_or_try_init(|| async move {
                rx.await
                    .map_err(|_| FsError::Retry("the read-ahead GET stopped before this chunk".into()))
            })
        }));
        let stream = async {
            let mut senders = senders.into_iter();
            let mut k = 0;
            let mut buf = buffers.take(len_of(0));
            let etag = (!remote.etag.is_empty()).then_some(remote.etag.as_str());
            let r = store
                .stream_range(&remote.key, etag, start..end, &mut |mut frame: &[u8]| {
                    while !frame.is_empty() && k < cells.len() {
                        let n = (len_of(k) - buf.len()).min(frame.len());
                        buf.extend_from_slice(&frame[..n]);
                        frame = &frame[n..];
                        if buf.len() == len_of(k) {
                            let full = std::mem::replace(&mut buf, Vec::new());
                            if let Some(tx) = senders.next() {
                                // No one waits any more: the cell was filled by a READ's own GET.
                                let _ = tx.send(buffers.wrap(full));
                            }
                            k += 1;
                            if k < cells.len() {
                                buf = buffers.take(len_of(k));
                            }
                        }
                    }
                    Ok(())
                })
                .await;
            if let Err(e) = r {
                tracing::debug!(key = %remote.key, error = %e, "read-ahead GET failed; READs fetch their chunks themselves");
            }
            // Whatever did not come: its cells' fills end with an error.
            drop(senders);
        };
        let _ = futures::future::join(fills, stream).instrument(span).await;
    }

    pub async fn read(
        &self,
        store: &Arc<dyn ObjectStore>,
        ino: Ino,
        remote: &Remote,
        offset: u64,
        count: u32,
        // Read-ahead fetches run as the volume's background work.
        tasks: &crate::tasks::Tasks,
    ) -> FsResult<(Bytes, bool)> {
        if offset >= remote.size {
            return Ok((Bytes::new(), true));
        }
        let end = (offset + count as u64).min(remote.size);
        if let Some(b) = self.small(ino, &remote.etag).filter(|b| b.len() as u64 == remote.size) {
            return Ok((b.slice(offset as usize..end as usize), end >= remote.size));
        }
        let first = offset / self.chunk;
        let last = (end - 1) / self.chunk;
        let chunks_in_file = remote.size.div_ceil(self.chunk);
        let (runs, ranged) = {
            let mut inner = self.inner.locked();
            let known = inner.stream.get(&ino).copied();
            let prev = known.unwrap_or_default();
            // Sequential if it starts where the last read ended (or close: the kernel reorders).
            let sequential = offset <= prev.next + self.chunk && offset + self.chunk >= prev.next;
            // A random reader's READs fetch only their range. One is known by its last read:
            // a jump, or a single read that followed on from a jump (landing near the last read
            // by chance is common with big chunks; fio's random reads of 256 MiB fetched 80 MiB
            // when each such landing made the next jump fetch a whole chunk). A first read, or
            // the jump of a reader that had followed on twice, still takes a chunk: it may be a
            // sequential reader starting there.
            let jumping = known.is_some() && if sequential { prev.run == 0 } else { prev.run <= 1 };
            let w = if sequential {
                (prev.window * 2).clamp(1, self.read_ahead)
            } else {
                0
            };
            if sequential && remote.size > self.max_chunks as u64 * self.chunk && first > SEQUENTIAL_TRAIL {
                inner.map.remove(&(ino, first - SEQUENTIAL_TRAIL - 1));
            }
            inner.reads += 1;
            let now = inner.reads;
            let run = if sequential { prev.run.saturating_add(1) } else { 0 };
            let ranged = jumping && first == last && !Self::has_chunk(&inner, ino, &remote.etag, first);
            let window = if jumping { 0 } else { w as u64 };
            // Read-ahead asks for the chunks past this READ up to its window, in runs of up to
            // `self.run` chunks, as soon as a whole run (or the window, when smaller) is to be asked
            // for, or the next chunk is: a reader never waits on a chunk held back for a run.
            // `ahead` out of range (a jump, backwards or past it) starts over after this READ.
            let target = (last + 1 + window).min(chunks_in_file);
            let mut ahead = if prev.ahead <= last || prev.ahead > target {
                last + 1
            } else {
                prev.ahead
            };
            let mut runs = Vec::new();
            let batch = self.run.min(window.max(1));
            while ahead < target && (target - ahead >= batch || ahead == last + 1) {
                let to = (ahead + self.run).min(target);
                runs.push(ahead..to);
                ahead = to;
            }
            inner.stream.insert(
                ino,
                Stream {
                    next: end,
                    window: w,
                    used: now,
                    run,
                    ranges: prev.ranges.saturating_add(u32::from(ranged)),
                    ahead,
                },
            );
            if inner.stream.len() > MAX_STREAMS {
                // Amortised: one pass per MAX_STREAMS / 2 new readers.
                let keep_after = now - (MAX_STREAMS / 2) as u64;
                inner.stream.retain(|_, s| s.used > keep_after);
            }
            (runs, ranged)
        };
        if ranged {
            return Self::read_exact_range(&**store, remote, offset, end).await;
        }
        for run in runs {
            self.read_ahead(store, ino, remote, run, tasks);
        }
        let cells: Vec<_> = (first..=last)
            .map(|i| (i, self.cell(ino, &remote.etag, i, true)))
            .collect();
        let chunks = futures::future::try_join_all(
            cells
                .iter()
                .map(|(i, c)| Self::fetch(&**store, c, remote, *i, self.chunk)),
        )
        .await?;
        // The part of each chunk the READ covers; within one chunk (a sequential reader's READs
        // of 1 MiB in 4 MiB chunks), a slice of it, without a copy.
        let mut parts = (first..=last).zip(chunks).filter_map(|(i, bytes)| {
            let cstart = i * self.chunk;
            let from = offset.max(cstart) - cstart;
            let to = (end.min(cstart + bytes.len() as u64)).saturating_sub(cstart);
            (from < to).then(|| bytes.slice(from as usize..to as usize))
        });
        let out = match (parts.next(), parts.next()) {
            (None, _) => Bytes::new(),
            (Some(one), None) => one,
            (Some(a), Some(b)) => {
                let mut out = Vec::with_capacity((end - offset) as usize);
                out.extend_from_slice(&a);
                out.extend_from_slice(&b);
                parts.for_each(|p| out.extend_from_slice(&p));
                out.into()
            }
        };
        let eof = offset + out.len() as u64 >= remote.size;
        Ok((out, eof))
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    /// A local store holding `data` as the object `k`.
    pub(crate) async fn one_object(data: &[u8]) -> (tempfile::TempDir, Arc<dyn ObjectStore>, Remote) {
        let dir = tempfile::tempdir().unwrap();
        let store: Arc<dyn ObjectStore> = Arc::new(crate::store::local::LocalStore::open(dir.path()).unwrap());
        let body = crate::store::Body::Bytes(Bytes::copy_from_slice(data));
        let etag = store.put("k", body, &Default::default()).await.unwrap();
        let remote = Remote {
            key: "k".into(),
            etag,
            size: data.len() as u64,
        };
        (dir, store, remote)
    }

    /// A random reader gets the ranges it asks for, not whole chunks; a reader that goes on
    /// sequentially after its jumps gets chunks again.
    #[tokio::test]
    async fn a_random_reader_fetches_only_what_it_reads() {
        let data: Vec<u8> = (0..1u32 << 20).map(|i| (i % 251) as u8).collect();
        let (_dir, store, remote) = one_object(&data).await;
        let chunk = 256 << 10;
        let cache = ReadCache::new(chunk, 4 << 20, 2, 1);
        let tasks = crate::tasks::Tasks::new();
        let read = |off: u64| {
            let (cache, store, remote, tasks) = (&cache, &store, &remote, &tasks);
            async move {
                let (b, _) = cache.read(store, 1, remote, off, 4096, tasks).await.unwrap();
                b
            }
        };
        let at = |off: u64| data[off as usize..off as usize + 4096].to_vec();
        // The first jump still takes a chunk (it may be a sequential reader starting there).
        assert_eq!(read(900 << 10).await, at(900 << 10));
        assert!(cache.cached(1, &remote.etag, 3));
        // The next jumps, and a read that happens to follow on, fetch only their range.
        for off in [10 << 10, 500 << 10, 504 << 10] {
            assert_eq!(read(off).await, at(off));
            assert!(
                !cache.cached(1, &remote.etag, off / chunk),
                "chunk fetched for a jump to {off}"
            );
        }
        // A jump after a single follow-on is still a random reader's.
        assert_eq!(read(100 << 10).await, at(100 << 10));
        assert!(
            !cache.cached(1, &remote.etag, 0),
            "chunk fetched for a jump after one follow-on"
        );
        // Following on twice: sequential again, chunks and read-ahead.
        assert_eq!(read(104 << 10).await, at(104 << 10));
        assert!(!cache.cached(1, &remote.etag, 0));
        assert_eq!(read(108 << 10).await, at(108 << 10));
        assert!(cache.cached(1, &remote.etag, 0));
        assert!(cache.cached(1, &remote.etag, 1), "no read-ahead");
    }

    /// A sequential reader of a file larger than the cache keeps only a short trail of chunks
    /// behind it; a file that fits is kept whole for the next reader.
    #[tokio::test]
    async fn a_sequential_reader_of_a_file_larger_than_the_cache_leaves_a_short_trail() {
        let tasks = crate::tasks::Tasks::new();
        let chunk = 64 << 10;
        for (size, whole_kept) in [(1u64 << 20, false), (256 << 10, true)] {
            let data: Vec<u8> = (0..size as u32).map(|i| (i % 251) as u8).collect();
            let (_dir, store, remote) = one_object(&data).await;
            // Room for 8 chunks: 512 KiB.
            let cache = ReadCache::new(chunk, 8 * chunk, 2, 1);
            for off in (0..size).step_by(16 << 10) {
                let (b, _) = cache.read(&store, 1, &remote, off, 16 << 10, &tasks).await.unwrap();
                assert_eq!(&b[..], &data[off as usize..off as usize + (16 << 10)]);
            }
            let last = size / chunk - 1;
            assert!(cache.cached(1, &remote.etag, last) && cache.cached(1, &remote.etag, last - 1));
            let kept = (0..=last).filter(|i| cache.cached(1, &remote.etag, *i)).count() as u64;
            if whole_kept {
                assert_eq!(kept, last + 1, "a file that fits the cache was not kept whole");
            } else {
                assert_eq!(kept, 1 + SEQUENTIAL_TRAIL, "the trail is not short");
            }
        }
    }

    /// A sequential reader's read-ahead comes in GETs of `run` chunks (4), each streamed into
    /// the chunks' cells; should one fail, the READs fetch their chunks themselves. Read-ahead is
    /// waited for after each READ, so the count is exact: fetched a chunk per GET, the 40 chunks
    /// took 40.
    #[tokio::test]
    async fn read_ahead_comes_in_gets_of_several_chunks() {
        use crate::store::faulty::{Fault, FaultyStore, Op};
        let chunk = 64 << 10;
        let data: Vec<u8> = (0..40 * chunk as u32).map(|i| (i % 251) as u8).collect();
        for fail_one in [false, true] {
            let (_dir, local, remote) = one_object(&data).await;
            let (faulty, faults) = FaultyStore::new(local);
            let store: Arc<dyn ObjectStore> = Arc::new(faulty);
            if fail_one {
                // The fourth GET: the first of a full run (see below).
                let n = std::sync::atomic::AtomicU64::new(0);
                faults.set_callback(move |c| {
                    (c.op == Op::Get && n.fetch_add(1, std::sync::atomic::Ordering::SeqCst) == 3)
                        .then(|| Fault::Fail(crate::store::StoreError::Unavailable("injected".into())))
                });
            }
            let cache = ReadCache::new(chunk, 64 * chunk, 8, 4);
            let tasks = crate::tasks::Tasks::new();
            for off in (0..data.len() as u64).step_by(chunk as usize) {
                let (b, _) = cache.read(&store, 1, &remote, off, chunk as u32, &tasks).await.unwrap();
                assert!(b[..] == data[off as usize..(off + chunk) as usize], "bytes at {off}");
                tasks.idle().await;
            }
            // The first READ's chunk; read-ahead as its window grows (1, 2, then 4 and 4 more
            // chunks); then a run of 4 each time 4 chunks of the window of 8 are free: 7 runs.
            let gets = faults.calls(Op::Get);
            if fail_one {
                // The failed run's 4 chunks fetched by their READs, one GET each.
                assert_eq!(gets, 12 + 4, "GETs with one read-ahead GET failed");
            } else {
                assert_eq!(gets, 12, "GETs for 40 chunks read in order");
            }
        }
    }

    /// Read-ahead asked again for chunks already on their way (the client's READs came out of
    /// order, and the run started over) does not fetch them again: that was a second GET of
    /// the same bytes for every chunk in flight.
    #[tokio::test]
    async fn chunks_on_their_way_are_not_fetched_again() {
        use crate::store::faulty::{FaultyStore, Op};
        let chunk = 64 << 10;
        let data: Vec<u8> = (0..8 * chunk as u32).map(|i| (i % 251) as u8).collect();
        let (_dir, local, remote) = one_object(&data).await;
        let (faulty, faults) = FaultyStore::new(local);
        let store: Arc<dyn ObjectStore> = Arc::new(faulty);
        let cache = ReadCache::new(chunk, 64 * chunk, 8, 4);
        let tasks = crate::tasks::Tasks::new();
        // The first GET has not even started (this test's runtime runs one task at a time).
        cache.read_ahead(&store, 1, &remote, 1..5, &tasks);
        cache.read_ahead(&store, 1, &remote, 1..5, &tasks);
        cache.read_ahead(&store, 1, &remote, 3..7, &tasks);
        tasks.idle().await;
        assert_eq!(faults.calls(Op::Get), 2, "GETs for chunks 1 to 6");
        for idx in 1..7 {
            assert!(cache.cached(1, &remote.etag, idx), "chunk {idx}");
        }
        let (b, _) = cache
            .read(&store, 1, &remote, 5 * chunk, chunk as u32, &tasks)
            .await
            .unwrap();
        assert!(b[..] == data[5 * chunk as usize..6 * chunk as usize]);
    }

    /// Every file ever read used to keep its reader's state for the volume's life.
    #[tokio::test]
    async fn the_readers_tracked_stay_bounded_however_many_files_are_read() {
        let (_dir, store, remote) = one_object(b"0123456789").await;
        let cache = ReadCache::new(4, 1 << 20, 2, 1);
        let tasks = crate::tasks::Tasks::new();
        for ino in 0..3 * MAX_STREAMS as u64 {
            let (b, _) = cache.read(&store, ino, &remote, 2, 3, &tasks).await.unwrap();
            assert_eq!(&b[..], b"234");
            assert!(cache.streams() <= MAX_STREAMS);
        }
        // The most recent reader is still known: its next read is sequential.
        let last = 3 * MAX_STREAMS as u64 - 1;
        let w = cache.inner.locked().stream[&last].window;
        assert_eq!(w, 1);
    }
}
