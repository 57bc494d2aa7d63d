//! The filesystem core: one [`Volume`] per export, free of any NFS type.
//!
//! # Design
//! - **State.** sled (through [`MetaDb`]) is the desired state of the namespace; S3 catches up.
//!   Every namespace change is one atomic [`Batch`] committed under `ns`, the one lock that
//!   serialises namespace changes. File data does not queue behind it: WRITE and READ go to the
//!   inode's staged file (see [`staging`]) or the read cache.
//! - **Pending work.** An inode whose S3 object is behind has a `P` record; an object to delete
//!   has an `X` record. The uploader ([`upload`]) turns them into S3 requests and clears them.
//! - **Seeing S3.** A directory is listed from S3 (one delimiter listing) the first time it is
//!   used and again when its listing is older than the refresh interval, so objects put, changed
//!   or deleted by other tools show up. Local changes not yet in S3 always win over a listing.
//! - **Lock order.** A staged file's `lock` before `ns`, never the other way round.

pub mod defer;
pub mod durable;
mod handles;
mod ledger;
pub mod links;
mod listing;
pub mod names;
pub mod perm;
mod prefetch;
pub mod read;
pub mod staging;
pub mod upload;
pub mod usage;

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::Bytes;

use crate::meta::{Batch, Ino, Inode, Kind, MetaDb, MetaError, Time, ROOT_INO};
use crate::store::{ObjectStore, StoreError};
use crate::sync::LockExt;
pub use handles::keyed_volume_id;
use names::check_name;
pub use perm::Cred;
use staging::Staged;

#[derive(Debug, Clone, thiserror::Error)]
pub enum FsError {
    #[error("no such file or directory")]
    NotFound,
    #[error("file exists")]
    Exists,
    #[error("not a directory")]
    NotDir,
    #[error("is a directory")]
    IsDir,
    #[error("directory not empty")]
    NotEmpty,
    #[error("name too long")]
    NameTooLong,
    #[error("invalid argument: {0}")]
    Invalid(String),
    #[error("stale file handle")]
    Stale,
    #[error("no space left: {0}")]
    NoSpace(String),
    /// Temporarily impossible (S3 unreachable and the staging bound reached): retry later.
    #[error("try again later: {0}")]
    Retry(String),
    #[error("permission denied by S3: {0}")]
    Access(String),
    #[error("I/O error: {0}")]
    Io(String),
    #[error("not supported: {0}")]
    NotSupported(&'static str),
    /// The caller lacks a permission the mode bits give (EACCES).
    #[error("permission denied")]
    Denied,
    /// Only the owner or root may do this (EPERM).
    #[error("operation not permitted")]
    Perm,
    #[error("too many links")]
    TooManyLinks,
}

impl From<MetaError> for FsError {
    fn from(e: MetaError) -> Self {
        tracing::error!(error = %e, "metadata database failed");
        FsError::Io(e.to_string())
    }
}

impl From<std::io::Error> for FsError {
    fn from(e: std::io::Error) -> Self {
        if e.kind() == std::io::ErrorKind::StorageFull || e.raw_os_error() == Some(libc::ENOSPC) {
            FsError::NoSpace(format!("staging disk full: {e}"))
        } else {
            FsError::Io(e.to_string())
        }
    }
}

impl From<StoreError> for FsError {
    fn from(e: StoreError) -> Self {
        match e {
            StoreError::NotFound(_) => FsError::NotFound,
            StoreError::AccessDenied(m) => FsError::Access(m),
            StoreError::Unavailable(m) => FsError::Retry(m),
            StoreError::NoSuchBucket(b) => FsError::Io(format!("bucket {b} is gone")),
            StoreError::Invalid(m) => FsError::Invalid(m),
            StoreError::Io(m) => FsError::Io(m),
        }
    }
}

pub type FsResult<T> = Result<T, FsError>;

/// Attributes as the core reports them; the NFS adapter turns them into `fattr3`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Attr {
    pub ino: Ino,
    pub kind: Kind,
    pub mode: u32,
    pub uid: u32,
    pub gid: u32,
    pub size: u64,
    pub atime: Time,
    pub mtime: Time,
    pub ctime: Time,
    pub nlink: u32,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SetTime {
    Now,
    At(Time),
}

#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct SetAttr {
    pub mode: Option<u32>,
    pub uid: Option<u32>,
    pub gid: Option<u32>,
    pub size: Option<u64>,
    pub atime: Option<SetTime>,
    pub mtime: Option<SetTime>,
}

#[derive(Debug, Clone)]
pub struct DirEntry {
    /// The file's inode number (for a hard link, the file's, not the entry's).
    pub ino: Ino,
    pub name: Vec<u8>,
    pub attr: Attr,
    /// Where a listing resumes after this entry (`readdir`'s `after`).
    pub cookie: Ino,
}

/// A snapshot of a volume's counters (see [`Volume::stats`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct VolumeStats {
    /// Inodes with S3 work pending (the journal's length).
    pub pending_inodes: u64,
    /// Written but not yet in S3.
    pub dirty_bytes: u64,
    pub journal_bytes: u64,
    pub uploaded_bytes: u64,
    pub upload_errors: u64,
    pub cache_hits: u64,
    pub cache_misses: u64,
    pub usage: usage::UsageSnapshot,
}

impl crate::metrics::VolumeSource for Volume {
    fn sample(&self) -> crate::metrics::VolumeSample {
        let s = self.stats();
        crate::metrics::VolumeSample {
            name: String::new(),
            dirty_bytes: s.dirty_bytes,
            upload_queue_depth: s.pending_inodes,
            journal_bytes: s.journal_bytes,
            uploaded_bytes: s.uploaded_bytes,
            upload_errors: s.upload_errors,
            cache_hits: s.cache_hits,
            cache_misses: s.cache_misses,
        }
    }
}

#[derive(Debug, Clone)]
pub struct VolumeConfig {
    /// Key prefix of the volume: empty, or ending in '/'.
    pub prefix: String,
    /// Local state: sled database, journal, staging files.
    pub state_dir: PathBuf,
    /// A dirty file is uploaded once it has been idle this long.
    pub flush_delay: Duration,
    /// How long due uploads may wait for busy clients to pause ([`defer::MAX_DEFER`]).
    pub busy_defer: Duration,
    /// A directory listing older than this is refreshed from S3 on next use.
    pub refresh: Duration,
    /// Multipart part size; also the dirty size past which a file streams to S3 as it is written.
    pub part_size: u64,
    /// Whether a file streams to S3 while clients are busy. On by default with more than one
    /// CPU, where the upload runs beside the writer; with one, it would only take the CPU from
    /// the writer, so the stream waits for the clients to pause (as due uploads do, bounded by
    /// `busy_defer`) and then catches up.
    pub stream_while_busy: bool,
    /// S3 uploads in flight per volume.
    pub upload_concurrency: usize,
    /// Bytes per ranged GET of the read path.
    pub read_chunk: u64,
    /// Chunks fetched ahead of a sequential reader (in parallel GETs). 8 by default, 2 with one
    /// CPU: there each GET in flight costs the S3 server more CPU when it runs on the node too
    /// (Garage in the benchmark guest spent 1.9 s of CPU on a cold read of 256 MiB with 8 in
    /// flight, 1.45 s with 2, and the read took 3.4-3.6 s against 2.9 s), and 8 MiB in flight
    /// still carry 160 MiB/s over 50 ms of round trip, more than one CPU serves over NFS.
    pub read_ahead: usize,
    /// Memory for cached read chunks.
    pub cache_bytes: u64,
    /// How long an NFS operation waits for a file to come from S3 into staging before it is
    /// told to retry (JUKEBOX); the fetch goes on meanwhile. 10 s: a Linux client waits a fixed
    /// 5 s after a JUKEBOX before it retries, so with a 5 s wait a fetch of 5.1 s cost 10 s
    /// (fio's random writes to a cold 256 MiB file took 11.5 s when its fetch took 4.4 s, and
    /// 21.8 s when 64 WRITEs got JUKEBOX). Not longer: held requests take the connection's
    /// request slots (32), so a client that sends many to a cold file stalls its other requests
    /// on that connection until the wait ends.
    pub stage_wait: Duration,
    /// Staged bytes not yet in S3 past which writes are told to retry later.
    pub max_dirty_bytes: u64,
    /// Staged copies kept once S3 has their bytes (each holds a file descriptor and disk space).
    pub max_staged_files: usize,
    /// Owner reported for objects without `x-amz-meta-uid`/`gid`.
    pub default_uid: u32,
    pub default_gid: u32,
    /// Permission bits reported for objects and prefixes without `x-amz-meta-mode`.
    pub default_file_mode: u32,
    pub default_dir_mode: u32,
    /// The volume's size: `df` shows it and writes past it get ENOSPC. None: unlimited.
    pub capacity: Option<u64>,
    /// What a COMMIT (an fsync or close on the client) waits for.
    pub durability: durable::Durability,
    /// Time for the flush delay, the refresh interval and back-offs (manual in tests).
    pub clock: crate::clock::Clock,
    /// `Some(volume id)`: file handles any gateway of the volume reproduces from S3 alone
    /// (ReadWriteMany owners; see [`handles`]). `None`: handles from this gateway's journal.
    pub keyed_handles: Option<u64>,
}

/// Whether this process may run on one CPU only, where work done beside the clients' (uploads,
/// parallel GETs) competes with them instead of running alongside.
pub fn one_cpu() -> bool {
    std::thread::available_parallelism().is_ok_and(|n| n.get() == 1)
}

impl VolumeConfig {
    pub fn new(state_dir: PathBuf) -> VolumeConfig {
        // Read once: it looks at the affinity mask and the cgroup's CPU quota.
        let one_cpu = one_cpu();
        VolumeConfig {
            prefix: String::new(),
            state_dir,
            flush_delay: Duration::from_secs(2),
            busy_defer: defer::MAX_DEFER,
            refresh: Duration::from_secs(5),
            part_size: 16 << 20,
            stream_while_busy: !one_cpu,
            upload_concurrency: 8,
            read_chunk: 4 << 20,
            read_ahead: if one_cpu { 2 } else { 8 },
            cache_bytes: 48 << 20,
            stage_wait: Duration::from_secs(10),
            max_dirty_bytes: 16 << 30,
            max_staged_files: 4096,
            default_uid: 0,
            default_gid: 0,
            default_file_mode: 0o644,
            default_dir_mode: 0o755,
            capacity: None,
            durability: durable::Durability::Local,
            clock: crate::clock::Clock::system(),
            keyed_handles: None,
        }
    }
}

pub struct Volume {
    pub cfg: VolumeConfig,
    pub(crate) store: Arc<dyn ObjectStore>,
    pub(crate) meta: MetaDb,
    /// Serialises namespace changes (see the module docs for the lock order).
    pub(crate) ns: tokio::sync::Mutex<()>,
    pub(crate) staged: Mutex<HashMap<Ino, Arc<Staged>>>,
    /// Files being brought from S3 into staging now, one job per file (see [`staging`]).
    staging_jobs: Mutex<HashMap<Ino, staging::StagingJob>>,
    staging_dir: PathBuf,
    /// When each directory was last listed from S3 (memory only: after a restart, relist).
    listed: Mutex<HashMap<Ino, Instant>>,
    /// Staged files written since the last local fsync.
    unsynced: Mutex<Vec<Arc<Staged>>>,
    /// Directories being relisted in the background right now.
    relisting: Mutex<std::collections::HashSet<Ino>>,
    /// A handle on itself, for background work started from `&self` methods.
    this: std::sync::OnceLock<std::sync::Weak<Volume>>,
    pub(crate) cache: read::ReadCache,
    /// Reading ahead across directories (see [`prefetch`]).
    prefetch: prefetch::Prefetch,
    pub(crate) uploader: upload::Uploader,
    pub(crate) usage: usage::Usage,
    /// Work the volume started in the background (relistings, streaming uploads).
    background: Arc<Background>,
    volume_id: u64,
    next_ino: AtomicU64,
    /// The persisted `ino_limit` counter, kept here so allocation does not read the database.
    ino_limit: AtomicU64,
    next_seq: AtomicU64,
    /// Group commit of COMMITs (see [`durable`]).
    sync_group: durable::SyncGroup,
    /// When the last search for a lost handle found nothing (see [`handles`]): searches are
    /// a walk of the whole volume, at most one per refresh interval for handles that stay lost.
    lost_search: tokio::sync::Mutex<Option<Instant>>,
}

/// Counts the tasks a volume runs in the background, so that closing it can wait for the last
/// one: each holds the volume, and the database closes only when the last holder lets go.
#[derive(Default)]
struct Background {
    running: std::sync::atomic::AtomicUsize,
    idle: tokio::sync::Notify,
}

struct BackgroundGuard(Arc<Background>);

impl Drop for BackgroundGuard {
    fn drop(&mut self) {
        if self.0.running.fetch_sub(1, Ordering::AcqRel) == 1 {
            self.0.idle.notify_waiters();
        }
    }
}

/// A directory with at most this many entries is relisted before an access that finds its
/// listing stale: one LIST request (S3 returns up to 1,000 keys a page).
const SMALL_DIR: usize = 1000;

/// Objects up to this size are fetched whole when their metadata is first needed (one GET
/// instead of a HEAD, then a GET): about what a HEAD's round trip costs on most S3s.
pub(crate) const SMALL_OBJECT: u64 = 64 << 10;

/// The same for the attributes a listing (READDIRPLUS) loads: smaller, since `ls -l` of a large
/// directory must not transfer every file. A GET this small costs what a HEAD does.
const LISTED_SMALL_OBJECT: u64 = 8 << 10;

/// Inode numbers are taken from the database in blocks, so a create commits one counter update
/// per block, not per file; the unused rest of a block after a crash is simply skipped.
const INO_BLOCK: u64 = 1024;

impl Volume {
    /// Opens the volume's local state (replaying its journal), restores staged files and
    /// in-flight uploads, and creates the root on first use.
    pub async fn open(cfg: VolumeConfig, store: Arc<dyn ObjectStore>) -> anyhow::Result<Arc<Volume>> {
        std::fs::create_dir_all(&cfg.state_dir)?;
        let staging_dir = cfg.state_dir.join("staging");
        std::fs::create_dir_all(&staging_dir)?;
        let meta = MetaDb::open(&cfg.state_dir.join("meta"))?;
        let mut volume_id = meta.counter("volume_id")?;
        let mut batch = Batch::new();
        if let Some(id) = cfg.keyed_handles {
            volume_id = id;
        } else if volume_id == 0 {
            volume_id = rand_u64() | 1;
            batch.set_counter("volume_id", volume_id);
        }
        if meta.inode(ROOT_INO)?.is_none() {
            let owner = (cfg.default_uid, cfg.default_gid);
            batch.put_inode(&Inode::new(
                ROOT_INO,
                ROOT_INO,
                b"",
                Kind::Dir,
                0o755,
                owner,
                Time::now(),
            ));
        }
        // Start past every number a previous run may have handed out.
        let ino_base = meta.counter("ino_limit")?.max(ROOT_INO + 1);
        batch.set_counter("ino_limit", ino_base + INO_BLOCK);
        let seq_base = meta.counter("seq_limit")? + 1;
        batch.set_counter("seq_limit", seq_base + (1 << 32));
        meta.commit(batch)?;
        meta.sync()?;

        let cache = read::ReadCache::new(cfg.read_chunk, cfg.cache_bytes, cfg.read_ahead);
        let uploader = upload::Uploader::new(cfg.upload_concurrency, cfg.clock.clone());
        let vol = Volume {
            store,
            meta,
            ns: tokio::sync::Mutex::new(()),
            staged: Mutex::new(HashMap::new()),
            staging_jobs: Mutex::new(HashMap::new()),
            staging_dir,
            listed: Mutex::new(HashMap::new()),
            relisting: Mutex::new(Default::default()),
            prefetch: Default::default(),
            unsynced: Mutex::new(Vec::new()),
            this: std::sync::OnceLock::new(),
            cache,
            uploader,
            usage: usage::Usage::new(cfg.capacity, cfg.clock.clone()),
            background: Arc::new(Background::default()),
            volume_id,
            next_ino: AtomicU64::new(ino_base),
            ino_limit: AtomicU64::new(ino_base + INO_BLOCK),
            next_seq: AtomicU64::new(seq_base),
            sync_group: durable::SyncGroup::new(),
            lost_search: tokio::sync::Mutex::new(None),
            cfg,
        };
        vol.restore_staged()?;
        vol.count_usage()?;
        let vol = Arc::new(vol);
        let _ = vol.this.set(Arc::downgrade(&vol));
        vol.abort_orphan_uploads().await;
        Ok(vol)
    }

    /// Picks up staged files left by the previous run.
    fn restore_staged(&self) -> FsResult<()> {
        let mut restored = 0;
        for entry in std::fs::read_dir(&self.staging_dir)? {
            let entry = entry?;
            let name = entry.file_name();
            let Some(ino) = name.to_str().and_then(|n| n.parse::<Ino>().ok()) else {
                // Leftover temporary download: never acknowledged to anyone.
                let _ = std::fs::remove_file(entry.path());
                continue;
            };
            let Some(inode) = self.meta.inode(ino)? else {
                let _ = std::fs::remove_file(entry.path());
                continue;
            };
            let st = Staged::open(ino, entry.path(), false, &self.cfg)?;
            if self.meta.pending(ino)?.is_some() {
                // Whatever is staged may be newer than S3: upload it again.
                st.changed();
                if st.mtime() < inode.mtime {
                    *st.mtime.locked() = inode.mtime;
                }
            } else {
                *st.mtime.locked() = inode.mtime;
            }
            self.staged.locked().insert(ino, Arc::new(st));
            restored += 1;
        }
        if restored > 0 {
            tracing::info!(restored, "restored staged files");
        }
        Ok(())
    }

    async fn abort_orphan_uploads(&self) {
        let Ok(uploads) = self.meta.all_uploads() else {
            return;
        };
        for (ino, key, id) in uploads {
            if let Err(e) = self.store.abort_multipart(&key, &id).await {
                tracing::warn!(%key, error = %e, "could not abort an interrupted multipart upload");
            }
            let mut b = Batch::new();
            b.clear_upload(ino);
            let _ = self.meta.commit(b);
        }
    }

    /// Runs `f` in the background, counted (see [`Volume::background_idle`]).
    pub(crate) fn spawn_background(&self, f: impl std::future::Future<Output = ()> + Send + 'static) {
        self.background.running.fetch_add(1, Ordering::AcqRel);
        let guard = BackgroundGuard(self.background.clone());
        tokio::spawn(async move {
            f.await;
            drop(guard);
        });
    }

    /// Waits until no background task of the volume runs. Call it once nothing starts new ones
    /// (the NFS listener stopped, everything flushed).
    pub async fn background_idle(&self) {
        loop {
            let idle = self.background.idle.notified();
            if self.background.running.load(Ordering::Acquire) == 0 {
                return;
            }
            idle.await;
        }
    }

    /// Counts bytes and files from the metadata (see [`usage`]).
    fn count_usage(&self) -> FsResult<()> {
        self.usage.begin_count();
        let (mut bytes, mut files) = (0u64, 0u64);
        let staged = self.staged.locked().clone();
        self.meta.for_each_inode(|inode| {
            if inode.ino == ROOT_INO || matches!(inode.kind, Kind::Link(_)) {
                return;
            }
            files += 1;
            if inode.kind == Kind::File {
                bytes += staged.get(&inode.ino).map(|st| st.size()).unwrap_or(inode.size);
            }
        })?;
        self.usage.set_counted(bytes, files);
        Ok(())
    }

    /// Counts usage again if something changed since the last count and it is old enough.
    /// Reads the whole namespace: call it from background work, not from an NFS operation.
    pub fn recount_usage_if_due(&self) -> FsResult<()> {
        if self.usage.count_due() {
            self.count_usage()?;
        }
        Ok(())
    }

    /// What the volume has waiting for S3 and has done, for operators and metrics.
    pub fn stats(&self) -> VolumeStats {
        let (cache_hits, cache_misses) = self.cache.stats();
        VolumeStats {
            pending_inodes: self.meta.pending_count() as u64,
            dirty_bytes: self.uploader.dirty_bytes(),
            journal_bytes: self.meta.journal_bytes(),
            uploaded_bytes: self.uploader.uploaded_bytes(),
            upload_errors: self.uploader.errors(),
            cache_hits,
            cache_misses,
            usage: self.usage(),
        }
    }

    /// Capacity, bytes and files in use.
    pub fn usage(&self) -> usage::UsageSnapshot {
        self.usage.snapshot()
    }

    /// Changes the capacity of a volume in use (online expansion).
    pub fn set_capacity(&self, capacity: Option<u64>) {
        self.usage.set_capacity(capacity);
    }

    pub fn volume_id(&self) -> u64 {
        self.volume_id
    }

    pub fn root(&self) -> Ino {
        ROOT_INO
    }

    fn alloc_ino(&self, batch: &mut Batch) -> Ino {
        let ino = self.next_ino.fetch_add(1, Ordering::AcqRel);
        // Allocation happens under `ns`, so reading and raising the limit do not race.
        if ino + 1 >= self.ino_limit.load(Ordering::Acquire) {
            let limit = ino + 1 + INO_BLOCK;
            batch.set_counter("ino_limit", limit);
            self.ino_limit.store(limit, Ordering::Release);
        }
        ino
    }

    pub(crate) fn next_seq(&self) -> u64 {
        self.next_seq.fetch_add(1, Ordering::AcqRel)
    }

    fn staged(&self, ino: Ino) -> Option<Arc<Staged>> {
        self.staged.locked().get(&ino).cloned()
    }

    pub(crate) fn inode(&self, ino: Ino) -> FsResult<Inode> {
        self.meta.inode(ino)?.ok_or(FsError::Stale)
    }

    /// The S3 key of an inode: the volume prefix and its path; directories end in '/'.
    pub(crate) fn key_of(&self, inode: &Inode) -> FsResult<String> {
        let mut parts: Vec<Vec<u8>> = Vec::new();
        let mut cur = inode.clone();
        while cur.ino != ROOT_INO {
            parts.push(cur.name.clone());
            cur = self.inode(cur.parent)?;
        }
        let mut key = self.cfg.prefix.clone();
        for (i, p) in parts.iter().rev().enumerate() {
            if i > 0 {
                key.push('/');
            }
            key.push_str(std::str::from_utf8(p).map_err(|_| FsError::Invalid("non UTF-8 name".into()))?);
        }
        if inode.kind == Kind::Dir && inode.ino != ROOT_INO {
            key.push('/');
        }
        Ok(key)
    }

    /// The key prefix under which a directory's children live.
    fn dir_prefix(&self, dir: &Inode) -> FsResult<String> {
        if dir.ino == ROOT_INO {
            Ok(self.cfg.prefix.clone())
        } else {
            self.key_of(dir)
        }
    }

    pub(crate) fn attr_of(&self, inode: &Inode) -> Attr {
        let (size, mtime) = match self.staged(inode.ino) {
            Some(st) if inode.kind == Kind::File => (st.size(), st.mtime()),
            _ => (inode.size, inode.mtime),
        };
        Attr {
            ino: inode.ino,
            kind: inode.kind,
            mode: inode.mode,
            uid: inode.uid,
            gid: inode.gid,
            size: if inode.kind == Kind::Symlink {
                inode.target.len() as u64
            } else {
                size
            },
            atime: inode.atime,
            mtime,
            ctime: inode.ctime.max(mtime),
            nlink: match inode.kind {
                Kind::Dir => 2 + self.meta.subdirs(inode.ino) as u32,
                _ => 1 + self.meta.link_count(inode.ino),
            },
        }
    }

    // ---------------------------------------------------------------- namespace reads

    pub async fn getattr(&self, ino: Ino) -> FsResult<Attr> {
        let mut inode = self.inode(ino)?;
        // A client revalidating an open file asks its handle, not its directory: refresh the
        // directory (once per refresh interval) so changes made in S3 by others reach it too.
        if ino != ROOT_INO && self.listing_stale(inode.parent) {
            if let Ok(parent) = self.inode(inode.parent) {
                self.refresh_dir(&parent, false).await?;
                inode = self.inode(ino)?;
            }
        }
        if !inode.meta_loaded {
            inode = self.load_meta(inode).await?;
        } else {
            self.note_open(&inode);
        }
        Ok(self.attr_of(&inode))
    }

    /// An inode's attributes as the volume holds them, for the attributes an NFS reply carries
    /// beside its result: no revalidation against S3 (the operation did its own), unless the
    /// object's metadata was never read.
    pub async fn reply_attr(&self, ino: Ino) -> FsResult<Attr> {
        let inode = self.inode(ino)?;
        if !inode.meta_loaded {
            return self.getattr(ino).await;
        }
        self.note_open(&inode); // LOOKUP's attributes may be all an open asks for
        Ok(self.attr_of(&inode))
    }

    /// Reads the `x-amz-meta-*` attributes of an object found by a listing (once): a HEAD, or
    /// for a small object a GET that brings its bytes too (the READ that usually follows an
    /// open then finds them in the cache).
    async fn load_meta(&self, inode: Inode) -> FsResult<Inode> {
        let loaded = self.fetch_meta(inode, SMALL_OBJECT).await?;
        self.note_cold_open(&loaded);
        Ok(loaded)
    }

    /// [`Volume::load_meta`] without telling the read-ahead about it (a listing's loads);
    /// objects up to `small` bytes come whole.
    async fn fetch_meta(&self, inode: Inode, small: u64) -> FsResult<Inode> {
        if inode.meta_loaded {
            return Ok(inode);
        }
        let Some(remote) = inode.remote.clone() else {
            return Ok(inode);
        };
        let max = if remote.size <= small { small } else { 0 };
        let fetched = self.store.head_and_get(&remote.key, max).await?;
        self.apply_meta(inode.ino, &remote, fetched).await
    }

    /// Takes what [`ObjectStore::head_and_get`] brought for `ino`'s object `remote`: its
    /// attributes (and a symlink's target) into the namespace, its bytes into the read cache.
    pub(crate) async fn apply_meta(
        &self,
        ino: Ino,
        remote: &crate::meta::Remote,
        fetched: Option<(crate::store::ObjectMeta, Option<bytes::Bytes>)>,
    ) -> FsResult<Inode> {
        let _g = self.ns.lock().await;
        let mut cur = self.inode(ino)?;
        // The bytes are the listed version's only if the ETag says so.
        let bytes = fetched.as_ref().and_then(|(h, b)| {
            b.clone()
                .filter(|b| b.len() as u64 == remote.size && h.etag == remote.etag)
        });
        if let (Some(b), Kind::File) = (&bytes, cur.kind) {
            self.cache.prime(cur.ino, &remote.etag, b.clone());
        }
        if cur.meta_loaded || cur.remote.as_ref().is_some_and(|r| r.etag != remote.etag) {
            return Ok(cur); // loaded meanwhile, or another version now: its own load will come
        }
        if let Some((h, _)) = fetched {
            names::apply_user_meta(&mut cur, &h.user);
            if cur.kind == Kind::Symlink && cur.target.is_empty() {
                drop(_g);
                let target = match bytes {
                    Some(b) => b.slice(..b.len().min(4096)),
                    None => self.store.get_range(&remote.key, 0..4096).await?,
                };
                let _g = self.ns.lock().await;
                let mut again = self.inode(ino)?;
                again.kind = Kind::Symlink;
                again.mode = cur.mode;
                again.uid = cur.uid;
                again.gid = cur.gid;
                again.mtime = cur.mtime;
                again.target = target.to_vec();
                again.meta_loaded = true;
                let mut b = Batch::new();
                b.put_inode(&again);
                self.meta.commit(b)?;
                return Ok(again);
            }
            if cur.kind != Kind::File {
                self.cache.forget(cur.ino); // a special file after all: no bytes to read
            }
        } // None: deleted meanwhile; the next listing removes it
        cur.meta_loaded = true;
        let mut b = Batch::new();
        b.put_inode(&cur);
        self.meta.commit(b)?;
        Ok(cur)
    }

    pub async fn lookup(&self, cred: &Cred, dir: Ino, name: &[u8]) -> FsResult<Ino> {
        let d = self.inode(dir)?;
        if d.kind != Kind::Dir {
            return Err(FsError::NotDir);
        }
        perm::check(cred, &d, perm::X)?;
        if name == b"." {
            return Ok(dir);
        }
        if name == b".." {
            return Ok(d.parent);
        }
        self.refresh_dir(&d, false).await?;
        let entry = match self.meta.lookup(dir, name)? {
            Some(ino) => ino,
            // Still stale: a large directory relisting in the background. A name it lacks may
            // be new in S3: NOENT only after S3 said so.
            None if self.listing_stale(dir) => {
                self.list_dir(&d).await?;
                self.meta.lookup(dir, name)?.ok_or(FsError::NotFound)?
            }
            None => return Err(FsError::NotFound),
        };
        self.file_of(entry)
    }

    pub async fn readlink(&self, ino: Ino) -> FsResult<Vec<u8>> {
        let mut inode = self.inode(ino)?;
        if !inode.meta_loaded {
            inode = self.load_meta(inode).await?;
        }
        if inode.kind != Kind::Symlink {
            return Err(FsError::Invalid("not a symlink".into()));
        }
        Ok(inode.target)
    }

    /// Entries of `dir` after the one with inode number `after` (0: from the start).
    pub async fn readdir(&self, cred: &Cred, dir: Ino, after: Ino, max: usize) -> FsResult<(Vec<DirEntry>, bool)> {
        let d = self.inode(dir)?;
        if d.kind != Kind::Dir {
            return Err(FsError::NotDir);
        }
        perm::check(cred, &d, perm::R)?;
        // Refresh only when a listing starts: a listing in progress resumes over a stable order.
        if after == 0 {
            self.refresh_dir(&d, false).await?;
        }
        let kids = self.meta.children(dir, after, max + 1)?;
        let end = kids.len() <= max;
        let mut out = Vec::with_capacity(kids.len().min(max));
        let mut unloaded = Vec::new();
        for (cookie, name) in kids.into_iter().take(max) {
            let Some(mut inode) = self.meta.inode(cookie)? else {
                continue;
            };
            if let Kind::Link(file) = inode.kind {
                let Some(f) = self.meta.inode(file)? else {
                    continue;
                };
                inode = f;
            }
            if !inode.meta_loaded {
                unloaded.push(out.len());
            }
            out.push(DirEntry {
                ino: inode.ino,
                name,
                attr: self.attr_of(&inode),
                cookie,
            });
        }
        // Objects found by a listing: read their attributes in parallel, not one HEAD at a time.
        use futures::StreamExt;
        let todo: Vec<(usize, Ino)> = unloaded.into_iter().map(|i| (i, out[i].ino)).collect();
        // Not as opens: what a listing loads says nothing about the order files are read in.
        let loaded: Vec<(usize, FsResult<Attr>)> = futures::stream::iter(todo)
            .map(|(i, ino)| async move {
                let attr = match self.inode(ino) {
                    Ok(inode) => self
                        .fetch_meta(inode, LISTED_SMALL_OBJECT)
                        .await
                        .map(|i| self.attr_of(&i)),
                    Err(e) => Err(e),
                };
                (i, attr)
            })
            .buffer_unordered(32)
            .collect()
            .await;
        for (i, attr) in loaded {
            if let Ok(a) = attr {
                out[i].attr = a;
            }
        }
        Ok((out, end))
    }

    /// Removes an inode and everything under it from the namespace (not from S3).
    fn forget_subtree(&self, batch: &mut Batch, inode: &Inode) -> FsResult<()> {
        let mut stack = vec![inode.clone()];
        while let Some(i) = stack.pop() {
            if i.kind == Kind::Dir {
                for ino in self.meta.child_inos(i.ino) {
                    if let Some(c) = self.meta.inode(ino?)? {
                        stack.push(c);
                    }
                }
                self.listed.locked().remove(&i.ino);
            }
            self.forget_links(batch, &i)?;
            // Keys failed uploads of it may have written: S3 no longer has its object, so
            // whatever else it may have left there goes too.
            self.release_maybe_written(batch, i.ino, i.remote.as_ref().map(|r| r.key.as_str()))?;
            batch.unlink(i.parent, &i.name, i.ino, i.kind);
            batch.del_inode(i.ino);
            self.drop_staged(i.ino);
        }
        Ok(())
    }

    fn drop_staged(&self, ino: Ino) {
        if let Some(st) = self.staged.locked().remove(&ino) {
            st.retire();
            let _ = std::fs::remove_file(&st.path);
        }
    }

    // ---------------------------------------------------------------- namespace changes

    /// A new inode in `dir`, owned as `cred` creates it there (see [`perm::new_owner`]).
    fn new_inode(&self, batch: &mut Batch, cred: &Cred, dir: &Inode, name: &[u8], kind: Kind, mode: u32) -> Inode {
        let (uid, gid, mode) = perm::new_owner(cred, dir, kind, mode);
        let ino = self.alloc_ino_at(batch, || {
            let slash = if kind == Kind::Dir { "/" } else { "" };
            Some(format!(
                "{}{}{slash}",
                self.dir_prefix(dir).ok()?,
                std::str::from_utf8(name).ok()?
            ))
        });
        Inode::new(ino, dir.ino, name, kind, mode, (uid, gid), Time::now())
    }

    /// Common checks for a new entry: the directory exists, is fresh and `cred` may write in
    /// it, the name is valid, the key fits in S3.
    async fn prepare_new(&self, cred: &Cred, dir: Ino, name: &[u8]) -> FsResult<Inode> {
        let d = self.inode(dir)?;
        if d.kind != Kind::Dir {
            return Err(FsError::NotDir);
        }
        perm::check(cred, &d, perm::W | perm::X)?;
        let n = check_name(name)?;
        if self.dir_prefix(&d)?.len() + n.len() + 1 > names::KEY_MAX {
            return Err(FsError::NameTooLong);
        }
        self.refresh_dir(&d, false).await?;
        Ok(d)
    }

    /// Updates a directory's times. Reads it afresh (the caller holds `ns`): a copy read before
    /// the lock could carry stale fields over what an upload recorded meanwhile.
    fn touch_dir(&self, batch: &mut Batch, dir: Ino) -> FsResult<()> {
        let mut d = self.inode(dir)?;
        d.mtime = Time::now();
        d.ctime = d.mtime;
        batch.put_inode(&d);
        Ok(())
    }

    /// Enters a new inode in its directory, to be created in S3 by the flusher.
    fn commit_new(&self, mut batch: Batch, inode: &Inode) -> FsResult<()> {
        batch.put_inode(inode);
        batch.link(inode.parent, &inode.name, inode.ino, inode.kind);
        batch.mark_pending(inode.ino, self.next_seq());
        self.touch_dir(&mut batch, inode.parent)?;
        self.meta.commit(batch)?;
        self.usage.changed();
        Ok(())
    }

    pub async fn create(&self, cred: &Cred, dir: Ino, name: &[u8], attr: SetAttr, exclusive: bool) -> FsResult<Attr> {
        let d = self.prepare_new(cred, dir, name).await?;
        let g = self.ns.lock().await;
        if let Some(existing) = self.meta.lookup(dir, name)? {
            let existing = self.file_of(existing)?;
            let inode = self.inode(existing)?;
            if exclusive {
                return Err(FsError::Exists);
            }
            if inode.kind == Kind::Dir {
                return Err(FsError::IsDir);
            }
            drop(g);
            // UNCHECKED create of an existing file is an open(O_CREAT) of it: only O_TRUNC's
            // size 0 applies, as knfsd does; the mode and owner asked for are for a new file.
            let only_size = SetAttr {
                size: attr.size,
                ..SetAttr::default()
            };
            return self.setattr(cred, existing, only_size).await;
        }
        let mut batch = Batch::new();
        let mut inode = self.new_inode(&mut batch, cred, &d, name, Kind::File, attr.mode.unwrap_or(0o644));
        apply_owner(&mut inode, cred, &attr);
        if let Some(SetTime::At(t)) = attr.mtime {
            inode.mtime = t;
        }
        let st = Staged::open(inode.ino, self.staging_dir.join(inode.ino.to_string()), true, &self.cfg)?;
        st.changed();
        *st.mtime.locked() = inode.mtime;
        self.commit_new(batch, &inode)?;
        self.staged.locked().insert(inode.ino, Arc::new(st));
        drop(g);
        Ok(self.attr_of(&inode))
    }

    pub async fn mkdir(&self, cred: &Cred, dir: Ino, name: &[u8], attr: SetAttr) -> FsResult<Attr> {
        let d = self.prepare_new(cred, dir, name).await?;
        let _g = self.ns.lock().await;
        if self.meta.lookup(dir, name)?.is_some() {
            return Err(FsError::Exists);
        }
        let mut batch = Batch::new();
        let mut inode = self.new_inode(&mut batch, cred, &d, name, Kind::Dir, attr.mode.unwrap_or(0o755));
        apply_owner(&mut inode, cred, &attr);
        self.commit_new(batch, &inode)?;
        // A new directory has nothing in S3 to list.
        self.note_listed(inode.ino, self.cfg.clock.now());
        Ok(self.attr_of(&inode))
    }

    pub async fn symlink(&self, cred: &Cred, dir: Ino, name: &[u8], target: &[u8], attr: SetAttr) -> FsResult<Attr> {
        let d = self.prepare_new(cred, dir, name).await?;
        if target.is_empty() || target.len() > 4095 {
            return Err(FsError::Invalid("symlink target must be 1 to 4095 bytes".into()));
        }
        let _g = self.ns.lock().await;
        if self.meta.lookup(dir, name)?.is_some() {
            return Err(FsError::Exists);
        }
        let mut batch = Batch::new();
        let mut inode = self.new_inode(&mut batch, cred, &d, name, Kind::Symlink, attr.mode.unwrap_or(0o777));
        apply_owner(&mut inode, cred, &attr);
        inode.target = target.to_vec();
        inode.size = target.len() as u64;
        self.commit_new(batch, &inode)?;
        Ok(self.attr_of(&inode))
    }

    /// MKNOD: a fifo, a socket or a device, stored as an empty object whose metadata gives its
    /// type (and device number) the way s3fs writes them.
    pub async fn mknod(&self, cred: &Cred, dir: Ino, name: &[u8], kind: Kind, attr: SetAttr) -> FsResult<Attr> {
        if !kind.is_special() {
            return Err(FsError::Invalid("mknod makes fifos, sockets and devices only".into()));
        }
        if matches!(kind, Kind::CharDev(_) | Kind::BlockDev(_)) && !cred.is_root() {
            return Err(FsError::Perm);
        }
        let d = self.prepare_new(cred, dir, name).await?;
        let _g = self.ns.lock().await;
        if self.meta.lookup(dir, name)?.is_some() {
            return Err(FsError::Exists);
        }
        let mut batch = Batch::new();
        let mut inode = self.new_inode(&mut batch, cred, &d, name, kind, attr.mode.unwrap_or(0o644));
        apply_owner(&mut inode, cred, &attr);
        self.commit_new(batch, &inode)?;
        Ok(self.attr_of(&inode))
    }

    /// Queues deletion of whatever S3 holds for an inode that leaves the namespace.
    fn queue_remote_delete(&self, batch: &mut Batch, inode: &Inode) {
        if let Some(r) = &inode.remote {
            batch.queue_delete(self.next_seq(), &r.key);
            batch.moved_from(&r.key, inode.ino);
        }
        // And whatever failed uploads of it may have written.
        let keep = inode.remote.as_ref().map(|r| r.key.as_str());
        if let Err(e) = self.release_maybe_written(batch, inode.ino, keep) {
            tracing::warn!(ino = inode.ino, error = %e, "could not read the keys it may have written");
        }
    }

    /// Gives up the keys `ino` may have written or was handed (see `Batch::maybe_written`):
    /// each is queued for deletion, except `keep`, the object that is `ino`'s own.
    pub(crate) fn release_maybe_written(&self, batch: &mut Batch, ino: Ino, keep: Option<&str>) -> FsResult<()> {
        for k in self.meta.maybe_written_keys(ino)? {
            batch.forget_maybe_written(ino, &k);
            if keep != Some(k.as_str()) {
                batch.queue_delete(self.next_seq(), &k);
            }
        }
        Ok(())
    }

    /// Removes an entry of any kind (an empty directory included).
    pub async fn remove(&self, cred: &Cred, dir: Ino, name: &[u8]) -> FsResult<()> {
        self.remove_entry(cred, dir, name, None).await
    }

    /// REMOVE: anything but a directory (ISDIR for one).
    pub async fn unlink(&self, cred: &Cred, dir: Ino, name: &[u8]) -> FsResult<()> {
        self.remove_entry(cred, dir, name, Some(false)).await
    }

    /// RMDIR: an empty directory only (NOTDIR for anything else).
    pub async fn rmdir(&self, cred: &Cred, dir: Ino, name: &[u8]) -> FsResult<()> {
        self.remove_entry(cred, dir, name, Some(true)).await
    }

    /// `want_dir`: Some(true) for RMDIR, Some(false) for REMOVE, None for either.
    async fn remove_entry(&self, cred: &Cred, dir: Ino, name: &[u8], want_dir: Option<bool>) -> FsResult<()> {
        let d = self.inode(dir)?;
        if d.kind != Kind::Dir {
            return Err(FsError::NotDir);
        }
        perm::check(cred, &d, perm::X)?;
        self.refresh_dir(&d, false).await?;
        let ino = self.meta.lookup(dir, name)?.ok_or(FsError::NotFound)?;
        let victim = self.inode(ino)?;
        match (want_dir, victim.kind == Kind::Dir) {
            (Some(true), false) => return Err(FsError::NotDir),
            (Some(false), true) => return Err(FsError::IsDir),
            _ => {}
        }
        if victim.kind == Kind::Dir {
            // Children only S3 knows about count too, as of a listing younger than the refresh
            // interval like every other access: `rm -r` has just listed each directory for
            // READDIRPLUS. A child another client adds within that interval is not lost: the
            // marker's deletion leaves it, and the directory shows again at the next listing.
            self.refresh_dir(&victim, false).await?;
        }
        let _g = self.ns.lock().await;
        if self.meta.lookup(dir, name)? != Some(ino) {
            return Err(FsError::NotFound);
        }
        // Read again under the lock: an upload may have recorded a new object for it meanwhile,
        // and that is the object to delete.
        let victim = self.inode(ino)?;
        perm::check_delete(cred, &self.inode(dir)?, &self.inode(self.file_of(ino)?)?)?;
        if victim.kind == Kind::Dir && self.meta.has_children(ino)? {
            return Err(FsError::NotEmpty);
        }
        let mut batch = Batch::new();
        self.drop_name(&mut batch, &victim)?;
        self.touch_dir(&mut batch, dir)?;
        self.meta.commit(batch)?;
        self.usage.changed();
        Ok(())
    }

    pub async fn rename(&self, cred: &Cred, from_dir: Ino, from: &[u8], to_dir: Ino, to: &[u8]) -> FsResult<()> {
        let fd = self.inode(from_dir)?;
        if fd.kind != Kind::Dir {
            return Err(FsError::NotDir);
        }
        perm::check(cred, &fd, perm::X)?;
        let _ = self.prepare_new(cred, to_dir, to).await?;
        self.refresh_dir(&fd, false).await?;
        let ino = self.meta.lookup(from_dir, from)?.ok_or(FsError::NotFound)?;
        let src = self.inode(ino)?;
        if src.kind == Kind::Dir {
            // Every object under it moves: the whole subtree must be known first.
            self.load_subtree(&src).await?;
        }
        if let Some(t) = self.meta.lookup(to_dir, to)? {
            let t = self.inode(t)?;
            if t.kind == Kind::Dir {
                self.refresh_dir(&t, true).await?;
            }
        }
        let _g = self.ns.lock().await;
        let mut src = self.inode(ino)?;
        if self.meta.lookup(from_dir, from)? != Some(ino) {
            return Err(FsError::NotFound);
        }
        let src_file = self.inode(self.file_of(ino)?)?;
        perm::check_delete(cred, &self.inode(from_dir)?, &src_file)?;
        if from_dir == to_dir && from == to {
            return Ok(());
        }
        // No directory may move under itself.
        if src.kind == Kind::Dir {
            let mut cur = to_dir;
            loop {
                if cur == ino {
                    return Err(FsError::Invalid("cannot move a directory into itself".into()));
                }
                if cur == ROOT_INO {
                    break;
                }
                cur = self.inode(cur)?.parent;
            }
            // Its ".." changes: that is a write to it.
            if to_dir != from_dir {
                perm::check(cred, &src, perm::W)?;
            }
        }
        let mut batch = Batch::new();
        if let Some(tino) = self.meta.lookup(to_dir, to)? {
            let target = self.inode(tino)?;
            if self.file_of(tino)? == src_file.ino {
                // Two names of one file: rename(2) does nothing and succeeds.
                return Ok(());
            }
            perm::check_delete(cred, &self.inode(to_dir)?, &self.inode(self.file_of(tino)?)?)?;
            match (src.kind == Kind::Dir, target.kind == Kind::Dir) {
                (true, false) => return Err(FsError::NotDir),
                (false, true) => return Err(FsError::IsDir),
                (true, true) if self.meta.has_children(tino)? => return Err(FsError::NotEmpty),
                _ => {}
            }
            // The moved object lands on the target's key, replacing it; only a directory's
            // marker needs deleting (the source's key differs from it only by being elsewhere).
            self.drop_name(&mut batch, &target)?;
        }
        batch.unlink(from_dir, from, ino, src.kind);
        batch.link(to_dir, to, ino, src.kind);
        src.parent = to_dir;
        src.name = to.to_vec();
        src.ctime = Time::now();
        batch.put_inode(&src);
        self.touch_dir(&mut batch, from_dir)?;
        if to_dir != from_dir {
            self.touch_dir(&mut batch, to_dir)?;
        }
        // Everything under the moved inode has a new key: each is moved in the background, and
        // until then its old object is known to be leaving (see `list_dir`).
        let mut stack = vec![ino];
        while let Some(i) = stack.pop() {
            batch.mark_pending(i, self.next_seq());
            let remote = self.meta.inode(i)?.and_then(|n| n.remote);
            if let Some(r) = &remote {
                batch.moving_from(&r.key, i);
            }
            // Keys it may have written or was handed (an old object at its former name that it
            // was to overwrite) are no longer its to overwrite: they go. Never its own object,
            // which the move copies from.
            self.release_maybe_written(&mut batch, i, remote.as_ref().map(|r| r.key.as_str()))?;
            for ino in self.meta.child_inos(i) {
                stack.push(ino?);
            }
        }
        self.meta.commit(batch)?;
        self.usage.changed();
        Ok(())
    }

    /// Lists a directory recursively (no delimiter) so every object under it is in the namespace.
    async fn load_subtree(&self, dir: &Inode) -> FsResult<()> {
        self.refresh_dir(dir, true).await?;
        let mut stack = vec![dir.ino];
        while let Some(d) = stack.pop() {
            // The index is read before the listings below change it.
            let mut subdirs = Vec::new();
            for ino in self.meta.child_inos(d) {
                if let Some(i) = self.meta.inode(ino?)?.filter(|i| i.kind == Kind::Dir) {
                    subdirs.push(i);
                }
            }
            for i in subdirs {
                self.refresh_dir(&i, false).await?;
                stack.push(i.ino);
            }
        }
        Ok(())
    }

    pub async fn setattr(&self, cred: &Cred, ino: Ino, attr: SetAttr) -> FsResult<Attr> {
        let mut inode = self.inode(ino)?;
        if !inode.meta_loaded {
            inode = self.load_meta(inode).await?;
        }
        // Checked before anything changes: a refused SETATTR changes nothing, ctime included.
        perm::check_chattr(cred, &inode, attr.mode, attr.uid, attr.gid)?;
        if attr.atime.is_some() || attr.mtime.is_some() {
            let to_now = !matches!(attr.atime, Some(SetTime::At(_))) && !matches!(attr.mtime, Some(SetTime::At(_)));
            perm::check_times(cred, &inode, to_now)?;
        }
        if let Some(size) = attr.size {
            if inode.kind == Kind::Dir {
                return Err(FsError::IsDir);
            }
            if inode.kind != Kind::File {
                return Err(FsError::Invalid("size of a symlink or special file".into()));
            }
            perm::check_io(cred, &inode, perm::W)?;
            let st = self.stage(ino, size == 0).await?;
            let _w = st.lock.write().await;
            if st.size() != size {
                let growth = size.saturating_sub(st.size());
                self.usage.check_growth(growth).map_err(FsError::NoSpace)?;
                st.set_len(size)?;
                self.usage.grew(growth);
                if growth == 0 {
                    self.usage.changed();
                }
                self.note_unsynced(&st);
            }
        }
        let _g = self.ns.lock().await;
        let mut inode = self.inode(ino)?;
        inode.mode = perm::check_chattr(cred, &inode, attr.mode, attr.uid, attr.gid)?;
        if attr.size.is_some() {
            inode.mode = perm::mode_after_write(cred, inode.mode);
        }
        if let Some(u) = attr.uid {
            inode.uid = u;
        }
        if let Some(g) = attr.gid {
            inode.gid = g;
        }
        let resolve = |t: SetTime| match t {
            SetTime::Now => Time::now(),
            SetTime::At(t) => t,
        };
        if let Some(t) = attr.atime {
            inode.atime = resolve(t);
        }
        let staged = self.staged(ino);
        if let Some(t) = attr.mtime {
            inode.mtime = resolve(t);
            if let Some(st) = &staged {
                *st.mtime.locked() = inode.mtime;
            }
        } else if let Some(st) = &staged {
            inode.mtime = st.mtime();
        }
        if let Some(st) = &staged {
            inode.size = st.size();
        }
        inode.ctime = Time::now();
        let mut batch = Batch::new();
        batch.put_inode(&inode);
        // atime alone is not worth an S3 request.
        let s3_visible = attr.mode.is_some()
            || attr.uid.is_some()
            || attr.gid.is_some()
            || attr.mtime.is_some()
            || attr.size.is_some();
        if s3_visible && inode.ino != ROOT_INO {
            batch.mark_pending(ino, self.next_seq());
            if let Some(st) = &staged {
                st.journalled();
            }
        }
        self.meta.commit(batch)?;
        self.usage.changed();
        drop(_g);
        Ok(self.attr_of(&inode))
    }

    /// Which of read, write and execute (`perm::R|W|X`) `cred` holds on `ino` (ACCESS).
    pub fn permissions(&self, cred: &Cred, ino: Ino) -> FsResult<u32> {
        Ok(perm::granted(cred, &self.inode(ino)?))
    }

    // ---------------------------------------------------------------- data

    pub async fn write(&self, cred: &Cred, ino: Ino, offset: u64, data: &[u8]) -> FsResult<Attr> {
        if self.uploader.dirty_bytes() > self.cfg.max_dirty_bytes {
            return Err(FsError::Retry("too much data waiting for S3".into()));
        }
        if !cred.is_root() {
            let inode = self.inode(ino)?;
            perm::check_io(cred, &inode, perm::W)?;
            if perm::mode_after_write(cred, inode.mode) != inode.mode {
                self.kill_suid(cred, ino).await?;
            }
        }
        loop {
            let st = self.stage(ino, false).await?;
            {
                let _r = st.lock.read().await;
                if st.is_retired() {
                    continue; // removed or evicted under us: look again
                }
                let growth = offset.saturating_add(data.len() as u64).saturating_sub(st.size());
                self.usage.check_growth(growth).map_err(FsError::NoSpace)?;
                st.write_at(offset, data)?;
                self.usage.grew(growth);
            }
            self.note_unsynced(&st);
            if !st.is_journalled() {
                let _g = self.ns.lock().await;
                if !st.is_journalled() {
                    let mut b = Batch::new();
                    b.mark_pending(ino, self.next_seq());
                    self.meta.commit(b)?;
                    st.journalled();
                }
            }
            // Only a writer at the end of the file (copying, appending) is streamed to S3 while
            // it writes; one rewriting the middle of a big file would have the same parts
            // uploaded again and again (fio's random writes to a 256 MiB file sent 117 MB).
            let appending = offset.saturating_add(data.len() as u64) >= st.size();
            self.uploader.note_write(&st, self.cfg.part_size, appending);
            let inode = self.inode(ino)?;
            return Ok(self.attr_of(&inode));
        }
    }

    /// The bytes may be a slice of a cached chunk: no copy on the way to the reply.
    pub async fn read(&self, cred: &Cred, ino: Ino, offset: u64, count: u32) -> FsResult<(Bytes, bool)> {
        if !cred.is_root() {
            perm::check_io(cred, &self.inode(ino)?, perm::R)?;
        }
        if let Some(st) = self.staged(ino) {
            if !st.is_retired() {
                let (data, eof) = st.read_at(offset, count)?;
                return Ok((data.into(), eof));
            }
        }
        let inode = self.inode(ino)?;
        match inode.kind {
            Kind::Dir => return Err(FsError::IsDir),
            Kind::File => {}
            _ => return Err(FsError::Invalid("read of a symlink or special file".into())),
        }
        let Some(remote) = inode.remote.clone() else {
            return Ok((Bytes::new(), true));
        };
        if offset == 0 && remote.size <= SMALL_OBJECT && !self.cache.has_small(ino, &remote.etag) {
            self.note_cold_open(&inode); // a reader going through a directory, perhaps
        }
        self.cache
            .read(&self.store, ino, &remote, offset, count, &|f| self.spawn_background(f))
            .await
    }

    /// Whether [`Volume::sync_local`] has anything to do (the sync tick skips an idle volume
    /// without waking a blocking thread).
    pub fn needs_local_sync(&self) -> bool {
        self.meta.unsynced() || !self.unsynced.locked().is_empty()
    }

    /// Whether the usage count is due (see [`Volume::recount_usage_if_due`]).
    pub fn recount_due(&self) -> bool {
        self.usage.count_due()
    }

    /// Makes staged data and the journal durable against a reboot of the node.
    /// Only files written since the last call are fsync'd: with thousands of staged files,
    /// syncing them all every tick would keep the disk busy doing nothing.
    pub fn sync_local(&self) -> FsResult<()> {
        self.meta.sync()?;
        let unsynced = std::mem::take(&mut *self.unsynced.locked());
        for st in unsynced {
            // Cleared first: a write landing during the fsync queues the file again.
            st.unsynced.store(false, Ordering::Release);
            if !st.is_retired() {
                st.sync()?;
            }
        }
        Ok(())
    }

    /// A write by someone other than root revokes the set-user-ID and set-group-ID bits.
    async fn kill_suid(&self, cred: &Cred, ino: Ino) -> FsResult<()> {
        let _g = self.ns.lock().await;
        let mut inode = self.inode(ino)?;
        inode.mode = perm::mode_after_write(cred, inode.mode);
        inode.ctime = Time::now();
        let mut b = Batch::new();
        b.put_inode(&inode);
        b.mark_pending(ino, self.next_seq());
        if let Some(st) = self.staged(ino) {
            st.journalled();
        }
        self.meta.commit(b)?;
        Ok(())
    }

    /// Queues a staged file for the next local fsync.
    fn note_unsynced(&self, st: &Arc<Staged>) {
        if !st.unsynced.swap(true, Ordering::AcqRel) {
            self.unsynced.locked().push(st.clone());
        }
    }
}

/// An owner the client named for a new inode: taken from root only (anyone else gets what
/// [`perm::new_owner`] decided, as a local filesystem ignores what it cannot grant).
fn apply_owner(inode: &mut Inode, cred: &Cred, attr: &SetAttr) {
    if !cred.is_root() {
        return;
    }
    if let Some(uid) = attr.uid {
        inode.uid = uid;
    }
    if let Some(gid) = attr.gid {
        inode.gid = gid;
    }
}

fn rand_u64() -> u64 {
    use std::hash::{BuildHasher, Hasher};
    let mut h = std::collections::hash_map::RandomState::new().build_hasher();
    h.write_u128(
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap_or_default()
            .as_nanos(),
    );
    h.finish()
}
