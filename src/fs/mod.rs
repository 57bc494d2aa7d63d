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
//!
//! # Where things are
//! This file holds the types and opening a volume. What every part shares (configuration,
//! store, database, namespace lock, staging area, numbers, task owner) is [`Core`], in
//! `core.rs`; `Volume` reaches it through `Deref`, and so does the uploader, which owns its own
//! state and works on `Core` alone. The `Volume`'s operations: `lookup.rs` (reading the
//! namespace), `change.rs` (changing it), `data.rs` (file bytes), [`links`] (hard links),
//! [`durable`] (COMMIT); its parts: `area.rs` and [`staging`] (staged files), [`upload`] (the
//! uploader), [`read`] (the read cache), `prefetch.rs`, `freshness.rs` (listing times),
//! [`usage`], `numbers.rs`, `handles.rs` (handles any gateway of a ReadWriteMany volume
//! reproduces).

mod area;
mod bytes_in_journal;
mod change;
mod core;
mod data;
pub mod defer;
pub mod durable;
mod freshness;
mod handles;
mod holes;
mod ledger;
pub mod links;
mod listing;
mod lookup;
pub mod names;
mod numbers;
pub mod perm;
mod prefetch;
pub mod progress;
mod random_reads;
pub mod read;
pub mod staging;
pub mod upload;
pub mod usage;
mod versions;

use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;

pub use self::core::Core;
use crate::meta::{Batch, Ino, Inode, Kind, MetaDb, MetaError, Time, ROOT_INO};
use crate::store::{ObjectStore, StoreError};
use crate::sync::LockExt;
pub use handles::keyed_volume_id;
use names::check_name;
pub use perm::Cred;
pub use progress::FlushProgress;
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
    /// S3 refused the gateway's credentials (not the caller's permissions: see `Denied`).
    #[error("permission denied by S3: {0}")]
    S3Denied(String),
    #[error("I/O error: {0}")]
    Io(String),
    #[error("not supported: {0}")]
    NotSupported(&'static str),
    /// The caller lacks a permission the mode bits give (EACCES).
    #[error("permission denied")]
    Denied,
    /// Only the owner or root may do this (EPERM).
    #[error("operation not permitted")]
    NotOwner,
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
            StoreError::AccessDenied(m) => FsError::S3Denied(m),
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
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VolumeStats {
    /// Inodes and deletions with S3 work pending (the journal's length).
    pub pending_inodes: u64,
    /// Written but not yet in S3.
    pub dirty_bytes: u64,
    pub journal_bytes: u64,
    pub uploaded_bytes: u64,
    pub upload_errors: u64,
    pub cache_hits: u64,
    pub cache_misses: u64,
    pub usage: usage::UsageSnapshot,
    /// How long the volume has held work not in S3; zero when everything is there.
    pub pending_for: Duration,
    /// S3 uploads in flight now.
    pub uploads_in_flight: usize,
    /// The last S3 error of the uploader, and when.
    pub last_error: Option<(String, std::time::SystemTime)>,
    pub last_upload: Option<std::time::SystemTime>,
    /// The first failure of a background task.
    pub failure: Option<String>,
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
            pending_seconds: s.pending_for.as_secs_f64(),
            uploads_in_flight: s.uploads_in_flight as u64,
            capacity_bytes: s.usage.limited().then_some(s.usage.capacity),
            used_bytes: s.usage.used_bytes,
            files: s.usage.files,
            failed: s.failure.is_some(),
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
    /// Chunks fetched ahead of a sequential reader. 8 by default, 2 with one CPU: there each
    /// GET in flight costs the S3 server more CPU when it runs on the node too (Garage in the
    /// benchmark guest spent 1.9 s of CPU on a cold read of 256 MiB with 8 in flight, 1.45 s
    /// with 2, and the read took 3.4-3.6 s against 2.9 s), and 8 MiB in flight still carry 160
    /// MiB/s over 50 ms of round trip, more than one CPU serves over NFS.
    pub read_ahead: usize,
    /// Chunks one read-ahead GET brings at most, streamed into their cells as the bytes come
    /// (see `read.rs`): 4 (16 MiB), so a cold read of 1 GiB takes 64 GETs, not 256, at the
    /// same speed on two CPUs. 1 with one CPU: there runs of 4 chunks read 256 MiB cold at
    /// 0.91-0.99x raw S3's speed against 1.17-1.20x, with 22-26 MiB more peak memory (the 8
    /// chunks kept ahead that runs need, where one CPU keeps 2).
    pub read_run: u64,
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
    /// Files from this size on are staged with holes for a write: only the parts read or
    /// written are fetched (see `holes.rs`). Smaller ones are fetched whole.
    pub sparse_from: u64,
    /// Staged bytes not yet in S3 past which writes are told to retry later.
    pub max_dirty_bytes: u64,
    /// Staged copies kept once S3 has their bytes (each holds a file descriptor and disk space).
    pub max_staged_files: usize,
    /// The disk those copies may take together: past it, the least recently written go first
    /// (a file is staged whole while it is written, and a 10 GiB file's copy would otherwise
    /// stay until 4,096 other files had been written).
    pub max_staged_clean_bytes: u64,
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
    /// (ReadWriteMany owners; see `handles.rs`). `None`: handles from this gateway's journal.
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
            read_run: if one_cpu { 1 } else { 4 },
            cache_bytes: 48 << 20,
            stage_wait: Duration::from_secs(10),
            sparse_from: 64 << 20,
            max_dirty_bytes: 16 << 30,
            max_staged_files: 4096,
            max_staged_clean_bytes: 1 << 30,
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

/// One volume: the handles its parts share ([`Core`], reached through `Deref`) and the parts
/// that each change only their own state: listing freshness, the read cache and read-ahead,
/// the uploader, usage, the group commit and the lost-handle search. The behaviour is in the
/// files named after them.
pub struct Volume {
    core: Arc<Core>,
    /// When each directory was last listed, which are being relisted (see [`freshness`]).
    freshness: freshness::Freshness,
    /// A handle on itself, for background work started from `&self` methods.
    this: std::sync::OnceLock<std::sync::Weak<Volume>>,
    pub(crate) cache: read::ReadCache,
    /// Reading ahead across directories (see [`prefetch`]).
    prefetch: prefetch::Prefetch,
    pub(crate) uploader: Arc<upload::Uploader>,
    pub(crate) usage: usage::Usage,
    /// Group commit of COMMITs (see [`durable`]).
    sync_group: durable::SyncGroup,
    /// When the last search for a lost handle found nothing (see `handles.rs`): searches are
    /// a walk of the whole volume, at most one per refresh interval for handles that stay lost.
    lost_search: tokio::sync::Mutex<Option<Instant>>,
}

impl std::ops::Deref for Volume {
    type Target = Core;
    fn deref(&self) -> &Core {
        &self.core
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

impl Volume {
    /// Opens the volume's local state (replaying its journal), restores staged files and
    /// in-flight uploads, and creates the root on first use.
    pub async fn open(cfg: VolumeConfig, store: Arc<dyn ObjectStore>) -> anyhow::Result<Arc<Volume>> {
        std::fs::create_dir_all(&cfg.state_dir)?;
        let staging = area::StagingArea::open(cfg.state_dir.join("staging"))?;
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
        let numbers = numbers::Numbers::open(&meta, &mut batch)?;
        meta.commit(batch)?;
        meta.sync()?;

        let cache = read::ReadCache::new(cfg.read_chunk, cfg.cache_bytes, cfg.read_ahead, cfg.read_run);
        let usage = usage::Usage::new(cfg.capacity, cfg.clock.clone());
        let freshness = freshness::Freshness::new(cfg.clock.clone(), cfg.refresh);
        let core = Core::new(cfg, store, meta, staging, numbers, volume_id);
        let uploader = Arc::new(upload::Uploader::new(core.clone()));
        let vol = Volume {
            core,
            freshness,
            prefetch: Default::default(),
            this: std::sync::OnceLock::new(),
            cache,
            uploader,
            usage,
            sync_group: durable::SyncGroup::new(),
            lost_search: tokio::sync::Mutex::new(None),
        };
        vol.restore_staged()?;
        vol.count_usage()?;
        let vol = Arc::new(vol);
        let _ = vol.this.set(Arc::downgrade(&vol));
        vol.abort_orphan_uploads().await;
        Ok(vol)
    }

    /// Waits for the uploader's next round and runs it (see [`upload::Uploader`]); false once
    /// `stop` is set.
    pub async fn next_upload_round(
        &self,
        pace: &mut upload::Pace,
        stop: &mut tokio::sync::watch::Receiver<bool>,
    ) -> bool {
        self.uploader.next_upload_round(pace, stop).await
    }

    /// Uploads everything pending now (see [`upload::Uploader::flush_all`]).
    pub async fn flush_all(&self) -> FsResult<()> {
        self.uploader.flush_all().await
    }

    /// One pass of the uploader over the journal; returns what is still pending.
    pub async fn flush_round(&self, force: bool) -> FsResult<usize> {
        self.uploader.flush_round(force).await
    }

    /// Uploads one inode's pending work now.
    pub async fn flush_inode(&self, ino: Ino) -> FsResult<()> {
        self.uploader.flush_inode(ino).await
    }

    async fn flush_deletes(&self) -> FsResult<()> {
        self.uploader.flush_deletes().await
    }

    /// Notes that a client operation arrived: due uploads may wait for busy clients.
    pub fn note_activity(&self) {
        self.uploader.note_activity();
    }

    /// Counts bytes and files from the metadata (see [`usage`]).
    fn count_usage(&self) -> FsResult<()> {
        self.usage.begin_count();
        let (mut bytes, mut files) = (0u64, 0u64);
        let staged = self.staging.snapshot();
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
        let pending_inodes = (self.meta.pending_count() + self.meta.delete_count()) as u64;
        let dirty_bytes = self.staging.dirty_bytes();
        let health = self.uploader.health();
        VolumeStats {
            pending_inodes,
            dirty_bytes,
            pending_for: if pending_inodes > 0 || dirty_bytes > 0 {
                health.pending_for(self.cfg.clock.now())
            } else {
                Duration::ZERO
            },
            uploads_in_flight: self.uploader.in_flight(),
            last_error: health.last_error(),
            last_upload: health.last_upload(),
            failure: self.tasks().failure(),
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

    pub fn root(&self) -> Ino {
        ROOT_INO
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
        crate::clock::wall_now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap_or_default()
            .as_nanos(),
    );
    h.finish()
}
