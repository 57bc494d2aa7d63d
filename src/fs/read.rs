//! The read path for bytes only S3 has: ranged GETs of fixed-size chunks, a bounded in-memory
//! chunk cache, and read-ahead that grows while a reader stays sequential.
//!
//! A chunk is fetched once however many READs want it (they wait on the same cell), and the
//! cache holds at most `cache_bytes / chunk` chunks, so memory is bounded whatever the file size.
//! Chunks are keyed by ETag as well as inode, so an object rewritten by another tool is never
//! served from the old version's chunks.

use std::collections::{HashMap, VecDeque};
use std::sync::{Arc, Mutex};

use bytes::Bytes;
use tracing::Instrument;

use super::versions::read_version;
use super::{FsError, FsResult};
use crate::meta::{Ino, Remote};
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

pub struct ReadCache {
    chunk: u64,
    /// Chunks fetched ahead of a sequential reader, at most.
    read_ahead: usize,
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
    pub fn new(chunk: u64, cache_bytes: u64, read_ahead: usize) -> ReadCache {
        ReadCache {
            chunk,
            read_ahead,
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
        let mut inner = self.inner.locked();
        if let Some((e, cell)) = inner.map.get(&(ino, idx)) {
            if e == etag {
                let cell = cell.clone();
                if count {
                    inner.hits += 1;
                    tracing::Span::current().record("cache", "hit");
                }
                return cell;
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
        cell
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
        let (window, ranged) = {
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
            inner.stream.insert(
                ino,
                Stream {
                    next: end,
                    window: w,
                    used: now,
                    run,
                    ranges: prev.ranges.saturating_add(u32::from(ranged)),
                },
            );
            if inner.stream.len() > MAX_STREAMS {
                // Amortised: one pass per MAX_STREAMS / 2 new readers.
                let keep_after = now - (MAX_STREAMS / 2) as u64;
                inner.stream.retain(|_, s| s.used > keep_after);
            }
            (if jumping { 0 } else { w }, ranged)
        };
        if ranged {
            return Self::read_exact_range(&**store, remote, offset, end).await;
        }
        for idx in last + 1..=last + window as u64 {
            if idx * self.chunk >= remote.size {
                break;
            }
            let cell = self.cell(ino, &remote.etag, idx, false);
            if cell.initialized() {
                continue;
            }
            let store = store.clone();
            let remote = remote.clone();
            let chunk = self.chunk;
            tasks.spawn("read-ahead", async move {
                let _ = Self::fetch(&*store, &cell, &remote, idx, chunk).await;
            });
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
        let cache = ReadCache::new(chunk, 4 << 20, 2);
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
            let cache = ReadCache::new(chunk, 8 * chunk, 2);
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

    /// Every file ever read used to keep its reader's state for the volume's life.
    #[tokio::test]
    async fn the_readers_tracked_stay_bounded_however_many_files_are_read() {
        let (_dir, store, remote) = one_object(b"0123456789").await;
        let cache = ReadCache::new(4, 1 << 20, 2);
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
