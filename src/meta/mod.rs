//! The per-volume metadata database: namespace and journal of pending S3 work, in sled.
//!
//! # Why a write-ahead log in front of sled
//! The durability contract (README, design section 4) says an acknowledged NFS operation
//! survives a crash of the gateway process. sled keeps recent writes in its own buffers until its
//! flush, so a change applied to sled alone is lost with the process unless we `flush()` (an
//! fsync) before every reply, and an fsync per CREATE makes small files wait on the disk.
//! Instead every commit is first appended to `journal.wal` with one `write(2)`: once that returns
//! the bytes are in the kernel and survive the process. A ticker fsyncs the log in groups (the
//! node-reboot window), and a checkpoint flushes sled and empties the log. Replaying the log at
//! open re-applies whole batches in commit order; a batch is a list of absolute puts and deletes,
//! so replaying one that sled already holds is harmless. A torn tail (a crash in the middle of an
//! append) fails its checksum and is dropped: that commit was never acknowledged.
//!
//! # Key space (one sled tree, so that a batch is atomic)
//! Keys start with a one-byte tag; numbers are big-endian, so keys sort as their numbers do.
//! The key builders are [`by_ino`] (tag, ino), [`by_ino_and`] (tag, ino, bytes) and
//! [`by_object_key`] (tag, S3 key, NUL, number).
//! - `I` ino → [`Inode`]
//! - `D` parent ino, child ino → name: the listing order. Entries are ordered by the child's
//!   inode number, which never changes and is never reused, so a READDIR cookie (the last fileid
//!   returned) stays a valid resume point whatever else is added or removed.
//! - `N` parent ino, name → ino: lookup by name.
//! - `C` parent ino, child ino → (): the subdirectories, so that a directory's link count
//!   (2 + subdirectories) costs no scan of its files.
//! - `H` file ino, name ino → (): the other names (hard links, `Kind::Link`) of a file.
//! - `P` ino → change sequence: the inode has S3 work pending (upload, metadata, move).
//! - `Q`: only the end of `P`'s range in scans, never written.
//! - `X` seq → key: an S3 object to delete.
//! - `Y` key, seq → (): the same queue by object key ("is this key being deleted?").
//! - `Z` key, ino → (): `ino` still has its object at `key` and is moving away from it (a
//!   rename not yet carried out in S3): listings must not take the object for a new file.
//! - `W` ino, key → (): an upload of `ino` to `key` may have written it although it failed
//!   (its reply was lost): if `ino` ends up elsewhere, `key` is deleted.
//! - `U` ino → (key, upload id): a multipart upload in flight, aborted on restart.
//! - `M` name → u64: counters and the volume id.
//! - `B` ino → bytes: the whole content of a small staged file, in the journal only (never
//!   applied to sled) until the staged file itself is synced (see [`Batch::put_bytes`]).

mod record;
mod wal;

use std::collections::{HashMap, HashSet};
use std::path::{Path, PathBuf};
use std::sync::{Mutex, OnceLock};

use crate::sync::LockExt;
use serde::{Deserialize, Serialize};

pub use wal::Wal;

pub type Ino = u64;
pub const ROOT_INO: Ino = 1;

#[derive(Debug, thiserror::Error)]
pub enum MetaError {
    #[error("metadata database: {0}")]
    Sled(#[from] sled::Error),
    #[error("metadata journal: {0}")]
    Io(#[from] std::io::Error),
    #[error("corrupt metadata record: {0}")]
    Corrupt(String),
}

pub type MetaResult<T> = Result<T, MetaError>;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum Kind {
    File,
    Dir,
    Symlink,
    // New variants go last: records are bincode, which numbers variants in order.
    Fifo,
    Socket,
    /// A device with its `dev_t` (Linux encoding, as s3fs stores it in `x-amz-meta-rdev`).
    CharDev(u64),
    BlockDev(u64),
    /// A second (third...) name of the file `Inode::ino` of this value: an entry of its own in
    /// its directory, with its own object in S3 (a copy of the file's), but the file's inode
    /// number, attributes and data everywhere else.
    Link(Ino),
}

impl Kind {
    /// Fifos, sockets and devices: an empty object whose metadata holds the type.
    pub fn is_special(self) -> bool {
        matches!(self, Kind::Fifo | Kind::Socket | Kind::CharDev(_) | Kind::BlockDev(_))
    }
}

/// Seconds and nanoseconds since the epoch.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Default, Serialize, Deserialize)]
pub struct Time {
    pub secs: i64,
    pub nanos: u32,
}

impl Time {
    /// The current NFS operation's time (see [`crate::clock::wall_now`]).
    pub fn now() -> Time {
        let d = crate::clock::wall_now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap_or_default();
        Time {
            secs: d.as_secs() as i64,
            nanos: d.subsec_nanos(),
        }
    }
    pub fn from_secs(secs: i64) -> Time {
        Time { secs, nanos: 0 }
    }
}

/// Where an inode's bytes are in S3 now.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Remote {
    pub key: String,
    pub etag: String,
    pub size: u64,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Inode {
    pub ino: Ino,
    pub parent: Ino,
    pub name: Vec<u8>,
    pub kind: Kind,
    /// Permission bits only (07777); the file type comes from `kind`.
    pub mode: u32,
    pub uid: u32,
    pub gid: u32,
    pub size: u64,
    pub atime: Time,
    pub mtime: Time,
    pub ctime: Time,
    /// Symlink target.
    pub target: Vec<u8>,
    /// The object holding this inode in S3, if any (directories: the `path/` marker).
    pub remote: Option<Remote>,
    /// False for objects found by a listing whose user metadata has not been read yet.
    pub meta_loaded: bool,
    /// The sync epoch at which S3 last caught up with this inode (see `Namespace::refresh`).
    pub synced_epoch: u64,
}

impl Inode {
    /// A new inode with no bytes anywhere yet, every time set to `time`.
    pub fn new(ino: Ino, parent: Ino, name: &[u8], kind: Kind, mode: u32, owner: (u32, u32), time: Time) -> Inode {
        Inode {
            ino,
            parent,
            name: name.to_vec(),
            kind,
            mode: mode & 0o7777,
            uid: owner.0,
            gid: owner.1,
            size: 0,
            atime: time,
            mtime: time,
            ctime: time,
            target: Vec::new(),
            remote: None,
            meta_loaded: true,
            synced_epoch: 0,
        }
    }
}

/// A set of changes applied atomically, in the log and in sled.
/// In the journal as [`record::encode`] lays it out.
#[derive(Debug, Default)]
pub struct Batch {
    ops: Vec<(Vec<u8>, Option<Vec<u8>>)>,
}

/// `tag`, then `ino` (or a sequence number).
fn by_ino(tag: u8, ino: u64) -> Vec<u8> {
    let mut v = Vec::with_capacity(9);
    v.push(tag);
    v.extend_from_slice(&ino.to_be_bytes());
    v
}

/// `tag`, `ino`, then `rest` (a name, a child's number, an object key).
fn by_ino_and(tag: u8, ino: u64, rest: &[u8]) -> Vec<u8> {
    let mut v = by_ino(tag, ino);
    v.extend_from_slice(rest);
    v
}

/// `tag`, then `bytes`, then a NUL and `n`: keys of indexes by object key, where a prefix scan
/// over `tag` + a key prefix finds every entry for the keys under it.
fn by_object_key(tag: u8, bytes: &[u8], n: u64) -> Vec<u8> {
    let mut v = Vec::with_capacity(bytes.len() + 10);
    v.push(tag);
    v.extend_from_slice(bytes);
    v.push(0);
    v.extend_from_slice(&n.to_be_bytes());
    v
}

fn enc<T: Serialize>(v: &T) -> Vec<u8> {
    bincode::serialize(v).expect("in-memory serialization cannot fail")
}

fn dec<T: for<'a> Deserialize<'a>>(b: &[u8]) -> MetaResult<T> {
    bincode::deserialize(b).map_err(|e| MetaError::Corrupt(e.to_string()))
}

impl Batch {
    pub fn new() -> Batch {
        Batch::default()
    }
    pub fn is_empty(&self) -> bool {
        self.ops.is_empty()
    }
    fn put(&mut self, key: Vec<u8>, val: Vec<u8>) {
        self.ops.push((key, Some(val)));
    }
    fn del(&mut self, key: Vec<u8>) {
        self.ops.push((key, None));
    }
    /// The whole content of staged file `ino`, made durable by the journal's sync instead of
    /// the staged file's own (one flush for many small files, and one that overwrites blocks
    /// already allocated). Journal only: never applied to sled; replay hands back the last one
    /// of each file ([`MetaDb::take_journalled_bytes`]), and the journal is not emptied before
    /// the staged files are synced (see [`MetaDb::set_bytes_syncer`]).
    pub fn put_bytes(&mut self, ino: Ino, bytes: Vec<u8>) {
        self.put(by_ino(b'B', ino), bytes);
    }
    /// The staged file of `ino` is synced by its own fsync: an earlier
    /// [`Batch::put_bytes`] is stale, and replaying it would bring back older bytes.
    pub fn drop_bytes(&mut self, ino: Ino) {
        self.del(by_ino(b'B', ino));
    }
    /// The [`Batch::put_bytes`] (bytes) and [`Batch::drop_bytes`] (None) in the batch, in order.
    fn bytes(&self) -> impl Iterator<Item = (Ino, Option<&Vec<u8>>)> {
        self.ops.iter().filter_map(|(key, val)| match key.as_slice() {
            [b'B', ino @ ..] => Some((u64::from_be_bytes(ino.try_into().ok()?), val.as_ref())),
            _ => None,
        })
    }
    pub fn put_inode(&mut self, inode: &Inode) {
        self.put(by_ino(b'I', inode.ino), enc(inode));
    }
    pub fn del_inode(&mut self, ino: Ino) {
        self.del(by_ino(b'I', ino));
        self.del(by_ino(b'P', ino));
        self.del(by_ino(b'U', ino));
    }
    /// Enters `ino` (of kind `kind`) in `parent` as `name`. Subdirectories are indexed apart
    /// too, so that a directory's link count (2 + subdirectories) costs no scan of its files.
    pub fn link(&mut self, parent: Ino, name: &[u8], ino: Ino, kind: Kind) {
        self.put(by_ino_and(b'D', parent, &ino.to_be_bytes()), name.to_vec());
        self.put(by_ino_and(b'N', parent, name), ino.to_be_bytes().to_vec());
        if kind == Kind::Dir {
            self.put(by_ino_and(b'C', parent, &ino.to_be_bytes()), Vec::new());
        }
    }
    pub fn unlink(&mut self, parent: Ino, name: &[u8], ino: Ino, kind: Kind) {
        self.del(by_ino_and(b'D', parent, &ino.to_be_bytes()));
        self.del(by_ino_and(b'N', parent, name));
        if kind == Kind::Dir {
            self.del(by_ino_and(b'C', parent, &ino.to_be_bytes()));
        }
    }
    /// Records that `name_ino` (a `Kind::Link`) is another name of the file `file`.
    pub fn add_link(&mut self, file: Ino, name_ino: Ino) {
        self.put(by_ino_and(b'H', file, &name_ino.to_be_bytes()), Vec::new());
    }
    pub fn del_link(&mut self, file: Ino, name_ino: Ino) {
        self.del(by_ino_and(b'H', file, &name_ino.to_be_bytes()));
    }
    pub fn mark_pending(&mut self, ino: Ino, seq: u64) {
        self.put(by_ino(b'P', ino), seq.to_be_bytes().to_vec());
    }
    pub fn clear_pending(&mut self, ino: Ino) {
        self.del(by_ino(b'P', ino));
    }
    /// Queues the deletion of the object `key`. `Y` indexes the queue by key, so that a listing
    /// asks "is this key being deleted?" without reading the whole queue.
    pub fn queue_delete(&mut self, seq: u64, key: &str) {
        self.put(by_ino(b'X', seq), key.as_bytes().to_vec());
        self.put(by_object_key(b'Y', key.as_bytes(), seq), Vec::new());
    }
    pub fn done_delete(&mut self, seq: u64, key: &str) {
        self.del(by_ino(b'X', seq));
        self.del(by_object_key(b'Y', key.as_bytes(), seq));
    }
    /// Records that the object `key` belongs to `ino` only until `ino` is uploaded under its new
    /// key (a rename not yet carried out in S3): listings must not take it for a new file.
    pub fn moving_from(&mut self, key: &str, ino: Ino) {
        self.put(by_object_key(b'Z', key.as_bytes(), ino), Vec::new());
    }
    pub fn moved_from(&mut self, key: &str, ino: Ino) {
        self.del(by_object_key(b'Z', key.as_bytes(), ino));
    }
    /// An upload of `ino` to `key` failed in a way that may have written it all the same (the
    /// reply was lost): if `ino` ends up elsewhere, `key` is to be deleted.
    pub fn maybe_written(&mut self, ino: Ino, key: &str) {
        self.put(by_ino_and(b'W', ino, key.as_bytes()), Vec::new());
    }
    pub fn forget_maybe_written(&mut self, ino: Ino, key: &str) {
        self.del(by_ino_and(b'W', ino, key.as_bytes()));
    }
    pub fn set_upload(&mut self, ino: Ino, key: &str, upload_id: &str) {
        self.put(by_ino(b'U', ino), enc(&(key.to_string(), upload_id.to_string())));
    }
    pub fn clear_upload(&mut self, ino: Ino) {
        self.del(by_ino(b'U', ino));
    }
    pub fn set_counter(&mut self, name: &str, v: u64) {
        self.put(by_ino_and(b'M', 0, name.as_bytes()), v.to_be_bytes().to_vec());
    }
}

/// The metadata database of one volume. Reads go straight to sled; every change goes through
/// [`MetaDb::commit`].
type OpenDbs = Mutex<std::collections::HashMap<PathBuf, (sled::Db, usize)>>;

fn open_dbs() -> &'static OpenDbs {
    static OPEN: std::sync::OnceLock<OpenDbs> = std::sync::OnceLock::new();
    OPEN.get_or_init(Default::default)
}

pub struct MetaDb {
    _db: sled::Db,
    sled_path: PathBuf,
    tree: sled::Tree,
    wal: Mutex<Wal>,
    /// How many `P` and `X` records there are, kept as they change (under the journal's lock),
    /// so that a flush round or a metrics scrape does not count a million records each time.
    pending_n: std::sync::atomic::AtomicU64,
    deletes_n: std::sync::atomic::AtomicU64,
    /// Commits so far, and how many of them the last `sync` covered: an idle volume's sync
    /// tick does no system call at all.
    commits: std::sync::atomic::AtomicU64,
    synced_commits: std::sync::atomic::AtomicU64,
    /// Rung at each commit, for the local syncer waiting for one (see [`MetaDb::until_unsynced`]).
    committed: crate::sync::Bell,
    /// Per inode: its `H` records (other names of a file) and `C` records (subdirectories of a
    /// directory), kept as they change: a GETATTR's link count is a hash lookup, not a scan.
    /// Only inodes with at least one are present.
    counts: Mutex<HashMap<(u8, Ino), u32>>,
    /// Files whose bytes the journal carries ([`Batch::put_bytes`]) since it was last emptied;
    /// changed under the journal's lock.
    journalled: Mutex<HashSet<Ino>>,
    /// Syncs those files' staged copies before the journal is emptied.
    bytes_syncer: OnceLock<BytesSyncer>,
    /// The bytes replay found, for the volume to put back into its staged files.
    recovered: Mutex<Vec<(Ino, Vec<u8>)>>,
}

/// Makes the staged files of the inodes given durable on their own.
pub type BytesSyncer = Box<dyn Fn(&[Ino]) -> std::io::Result<()> + Send + Sync>;

/// Checkpoint (flush sled, empty the log) once the log grows past this: bounds replay time.
const CHECKPOINT_BYTES: u64 = 16 << 20;

fn be_u64(b: &[u8]) -> MetaResult<u64> {
    b.try_into()
        .map(u64::from_be_bytes)
        .map_err(|_| MetaError::Corrupt("bad u64".into()))
}

impl MetaDb {
    /// Opens (or creates) the database in `dir`, replaying the journal left by a crash.
    pub fn open(dir: &Path) -> MetaResult<MetaDb> {
        std::fs::create_dir_all(dir)?;
        let (db, sled_path) = Self::open_sled(dir)?;
        // From here on the handle is counted: an error must give the count back.
        let opened = (|| {
            let tree = db.open_tree("ns")?;
            let (wal, batches) = Wal::open(&dir.join("journal.wal"))?;
            let replayed = batches.len();
            let mut carried = HashMap::new();
            for b in batches {
                let batch = Batch {
                    ops: record::decode(&b)?,
                };
                for (ino, bytes) in batch.bytes() {
                    carried.insert(ino, bytes.cloned());
                }
                Self::apply(&tree, batch)?;
            }
            let recovered: Vec<(Ino, Vec<u8>)> = carried.into_iter().filter_map(|(i, b)| Some((i, b?))).collect();
            let counts = Self::count_children(&tree)?;
            Ok((tree, wal, replayed, counts, recovered))
        })();
        let (tree, wal, replayed, counts, recovered) = match opened {
            Ok(x) => x,
            Err(e) => {
                Self::close_sled(&sled_path);
                return Err(e);
            }
        };
        let me = MetaDb {
            pending_n: (tree.scan_prefix([b'P']).count() as u64).into(),
            deletes_n: (tree.scan_prefix([b'X']).count() as u64).into(),
            commits: 0.into(),
            synced_commits: 0.into(),
            committed: Default::default(),
            counts: Mutex::new(counts),
            journalled: Mutex::new(recovered.iter().map(|(ino, _)| *ino).collect()),
            bytes_syncer: OnceLock::new(),
            recovered: Mutex::new(recovered),
            _db: db,
            sled_path,
            tree,
            wal: Mutex::new(wal),
        };
        if replayed > 0 {
            tracing::info!(batches = replayed, "replayed metadata journal");
            me.checkpoint()?;
        }
        Ok(me)
    }

    /// One sled handle per path in the process, counted: a volume closed and opened again in
    /// the same process (the CSI node plugin does it all day) must get a fresh handle once the
    /// last one is closed, or it would see a database whose files were since removed, and the
    /// handles of closed volumes would pile up with their caches. sled may keep its file lock a
    /// moment after the last handle is dropped, so an open that finds it locked retries briefly.
    fn open_sled(dir: &Path) -> MetaResult<(sled::Db, PathBuf)> {
        let path = std::fs::canonicalize(dir)?.join("sled");
        let mut open = open_dbs().locked();
        if let Some((db, n)) = open.get_mut(&path) {
            *n += 1;
            return Ok((db.clone(), path));
        }
        // Another process holds the lock: this waits in real time, on no volume's clock.
        let deadline = crate::clock::stopwatch() + std::time::Duration::from_secs(10);
        let db = loop {
            let r = sled::Config::new()
                .path(&path)
                // Our own log carries durability and `checkpoint` flushes sled.
                .flush_every_ms(None)
                // The gateway's memory bound (150 MiB with 100,000 files in one directory)
                // leaves sled this much; a miss costs a read from the page cache and a decode.
                .cache_capacity(16 << 20)
                .open();
            match r {
                Err(sled::Error::Io(e))
                    // sled reports the lock as an `Other` error naming it.
                    if e.to_string().contains("could not acquire lock") && crate::clock::stopwatch() < deadline =>
                {
                    std::thread::sleep(std::time::Duration::from_millis(20));
                }
                r => break r?,
            }
        };
        open.insert(path.clone(), (db.clone(), 1));
        Ok((db, path))
    }

    /// Releases this handle's count (see [`MetaDb::open_sled`]).
    fn close_sled(path: &Path) {
        let mut open = open_dbs().locked();
        if let Some((_, n)) = open.get_mut(path) {
            *n -= 1;
            if *n == 0 {
                open.remove(path);
            }
        }
    }

    /// Applies a committed batch to sled, key by key rather than as a sled batch.
    ///
    /// A sled batch is atomic because sled seals and writes out its log buffer for each one:
    /// a write and two `sync_file_range` on sled's IO threads, and about fourteen thread
    /// hand-offs, for every namespace operation (the most expensive part of a CREATE in a
    /// user-mode-linux guest, where each is a trap into the host). Atomicity across a crash
    /// comes from our own log instead: the batch is in `journal.wal` before it is applied, a
    /// replay re-applies whole batches, and a checkpoint (the only point where the log is
    /// emptied) flushes sled while holding the log's lock, so never in the middle of a batch.
    ///
    /// What concurrent readers can see is kept safe by the order: inode records are written
    /// first and removed last, so an index entry (a name, a listing slot, pending work) never
    /// points at an inode that is not there. A rename may show both names, or the entry in
    /// both directories, for the moment between its puts and its deletes.
    fn apply(tree: &sled::Tree, batch: Batch) -> MetaResult<()> {
        // The last operation on a key is the one that counts, as in the batch.
        let mut last: HashMap<&[u8], usize> = HashMap::with_capacity(batch.ops.len());
        for (i, (key, _)) in batch.ops.iter().enumerate() {
            last.insert(key, i);
        }
        let ops: Vec<&(Vec<u8>, Option<Vec<u8>>)> = batch
            .ops
            .iter()
            .enumerate()
            // File bytes (`B`) live in the journal alone.
            .filter(|(i, (key, _))| key.first() != Some(&b'B') && last.get(key.as_slice()) == Some(i))
            .map(|(_, op)| op)
            .collect();
        let is_inode = |key: &[u8]| key.first() == Some(&b'I');
        for (key, val) in &ops {
            if let (Some(v), true) = (val, is_inode(key)) {
                tree.insert(key, v.as_slice())?;
            }
        }
        for (key, val) in &ops {
            if let (Some(v), false) = (val, is_inode(key)) {
                tree.insert(key, v.as_slice())?;
            }
        }
        for (key, val) in &ops {
            if val.is_none() && !is_inode(key) {
                tree.remove(key)?;
            }
        }
        for (key, val) in &ops {
            if val.is_none() && is_inode(key) {
                tree.remove(key)?;
            }
        }
        Ok(())
    }

    /// Makes `batch` durable against a crash of this process, then visible.
    pub fn commit(&self, batch: Batch) -> MetaResult<()> {
        if batch.is_empty() {
            return Ok(());
        }
        let bytes = record::encode(&batch.ops);
        let mut wal = self.wal.locked();
        wal.append(&bytes)?;
        self.note_carried(&batch);
        let (dp, dx, per_inode) = self.count_changes(&batch)?;
        Self::apply(&self.tree, batch)?;
        if !per_inode.is_empty() {
            let mut counts = self.counts.locked();
            for (k, d) in per_inode {
                let c = counts.entry(k).or_insert(0);
                *c = (*c as i64 + d).max(0) as u32;
                if *c == 0 {
                    counts.remove(&k);
                }
            }
        }
        use std::sync::atomic::Ordering::Relaxed;
        self.pending_n.fetch_add(dp as u64, Relaxed);
        self.deletes_n.fetch_add(dx as u64, Relaxed);
        self.commits.fetch_add(1, std::sync::atomic::Ordering::Release);
        self.committed.ring();
        if wal.len() > CHECKPOINT_BYTES {
            self.checkpoint_locked(&mut wal)?;
        }
        Ok(())
    }

    /// fsyncs the log: everything committed so far survives a reboot of the node.
    pub fn sync(&self) -> MetaResult<()> {
        use std::sync::atomic::Ordering::Acquire;
        let commits = self.commits.load(Acquire);
        if commits == self.synced_commits.load(Acquire) {
            return Ok(()); // nothing committed since the last sync
        }
        // Outside the log's lock, so the fsync does not hold up committers.
        let file = self.wal.locked().handle();
        file.sync_data()?;
        self.synced_commits
            .fetch_max(commits, std::sync::atomic::Ordering::AcqRel);
        Ok(())
    }

    /// Whether something was committed since the last [`MetaDb::sync`].
    pub fn unsynced(&self) -> bool {
        use std::sync::atomic::Ordering::Acquire;
        self.commits.load(Acquire) != self.synced_commits.load(Acquire)
    }

    /// Returns once something is committed that no [`MetaDb::sync`] has covered yet (at once
    /// if something is). For one waiter: the local syncer.
    pub async fn until_unsynced(&self) {
        self.committed.until(|| self.unsynced()).await
    }

    /// Flushes sled and empties the log.
    pub fn checkpoint(&self) -> MetaResult<()> {
        let mut wal = self.wal.locked();
        self.checkpoint_locked(&mut wal)
    }

    /// [`MetaDb::checkpoint`] with the log's lock held. File bytes the log carries are synced
    /// in their staged files first; while nobody can (no syncer yet: the volume is opening),
    /// the log is kept and only sled is flushed.
    fn checkpoint_locked(&self, wal: &mut Wal) -> MetaResult<()> {
        self.tree.flush()?;
        let inos: Vec<Ino> = self.journalled.locked().iter().copied().collect();
        if !inos.is_empty() {
            match self.bytes_syncer.get() {
                Some(sync) => sync(&inos)?,
                None => return Ok(()),
            }
        }
        wal.truncate()?;
        self.journalled.locked().clear();
        Ok(())
    }

    /// Keeps [`MetaDb::carries_bytes`] in step with a batch just appended to the log.
    fn note_carried(&self, batch: &Batch) {
        let mut carried = batch.bytes().peekable();
        if carried.peek().is_none() {
            return; // most batches: no lock taken
        }
        let mut journalled = self.journalled.locked();
        for (ino, bytes) in carried {
            match bytes {
                Some(_) => journalled.insert(ino),
                None => journalled.remove(&ino),
            };
        }
    }

    /// Sets who syncs staged files before the journal drops their bytes (once, at open).
    pub fn set_bytes_syncer(&self, sync: BytesSyncer) {
        let _ = self.bytes_syncer.set(sync);
    }

    /// The file bytes replay found in the journal (the last of each file), once.
    pub fn take_journalled_bytes(&self) -> Vec<(Ino, Vec<u8>)> {
        std::mem::take(&mut *self.recovered.locked())
    }

    /// Whether the journal carries bytes of `ino` (so a sync of its staged file on its own must
    /// be followed by [`Batch::drop_bytes`]).
    pub fn carries_bytes(&self, ino: Ino) -> bool {
        self.journalled.locked().contains(&ino)
    }

    pub fn inode(&self, ino: Ino) -> MetaResult<Option<Inode>> {
        match self.tree.get(by_ino(b'I', ino))? {
            Some(v) => Ok(Some(dec(&v)?)),
            None => Ok(None),
        }
    }

    pub fn lookup(&self, parent: Ino, name: &[u8]) -> MetaResult<Option<Ino>> {
        match self.tree.get(by_ino_and(b'N', parent, name))? {
            Some(v) => Ok(Some(be_u64(&v)?)),
            None => Ok(None),
        }
    }

    /// Children of `parent` by name, in byte order: names above `after` (all when None) up to
    /// and including `upto` (no limit when None), at most `max`.
    pub fn children_by_name(
        &self,
        parent: Ino,
        after: Option<&[u8]>,
        upto: Option<&[u8]>,
        max: usize,
    ) -> MetaResult<Vec<(Vec<u8>, Ino)>> {
        use std::ops::Bound;
        let start = match after {
            Some(a) => Bound::Excluded(by_ino_and(b'N', parent, a)),
            None => Bound::Included(by_ino(b'N', parent)),
        };
        let end = match upto {
            Some(u) => Bound::Included(by_ino_and(b'N', parent, u)),
            None => Bound::Excluded(by_ino(b'N', parent.wrapping_add(1))),
        };
        let mut out = Vec::new();
        if matches!((after, upto), (Some(a), Some(u)) if a >= u) {
            return Ok(out);
        }
        if upto.is_none() && parent == u64::MAX {
            return Ok(out); // no key above the last parent's names to end the range with
        }
        for item in self.tree.range::<Vec<u8>, _>((start, end)) {
            let (key, ino) = item?;
            out.push((key[9..].to_vec(), be_u64(&ino)?));
            if out.len() >= max {
                break;
            }
        }
        Ok(out)
    }

    /// Every child of `parent`, in inode order, read from the index as the iteration goes (the
    /// walk of a subtree, however large its directories).
    pub fn child_inos(&self, parent: Ino) -> impl Iterator<Item = MetaResult<Ino>> + '_ {
        let start = by_ino_and(b'D', parent, &0u64.to_be_bytes());
        let end = by_ino_and(b'D', parent.wrapping_add(1), &0u64.to_be_bytes());
        let range = if parent == u64::MAX {
            None
        } else {
            Some(self.tree.range(start..end))
        };
        range.into_iter().flatten().map(|item| {
            let (key, _) = item?;
            be_u64(&key[9..17])
        })
    }

    /// Children of `parent` with inode numbers above `after`, in inode order, at most `max`.
    pub fn children(&self, parent: Ino, after: Ino, max: usize) -> MetaResult<Vec<(Ino, Vec<u8>)>> {
        let start = by_ino_and(b'D', parent, &(after.saturating_add(1)).to_be_bytes());
        let end = by_ino_and(b'D', parent.wrapping_add(1), &0u64.to_be_bytes());
        let mut out = Vec::new();
        if after == u64::MAX {
            return Ok(out);
        }
        for item in self.tree.range(start..end) {
            let (key, name) = item?;
            out.push((be_u64(&key[9..17])?, name.to_vec()));
            if out.len() >= max {
                break;
            }
        }
        Ok(out)
    }

    /// Calls `f` with every inode of the volume, in inode order.
    pub fn for_each_inode(&self, mut f: impl FnMut(&Inode)) -> MetaResult<()> {
        for item in self.tree.scan_prefix([b'I']) {
            let (_, v) = item?;
            f(&dec::<Inode>(&v)?);
        }
        Ok(())
    }

    /// How many subdirectories `dir` has.
    pub fn subdirs(&self, dir: Ino) -> usize {
        self.counts.locked().get(&(b'C', dir)).copied().unwrap_or(0) as usize
    }

    /// The other names (`Kind::Link` inodes) of the file `file`.
    pub fn links(&self, file: Ino) -> MetaResult<Vec<Ino>> {
        let prefix = by_ino(b'H', file);
        let mut out = Vec::new();
        for kv in self.tree.scan_prefix(&prefix) {
            let (key, _) = kv?;
            out.push(be_u64(&key[prefix.len()..])?);
        }
        Ok(out)
    }

    pub fn has_children(&self, parent: Ino) -> MetaResult<bool> {
        Ok(!self.children(parent, 0, 1)?.is_empty())
    }

    /// The change sequence of a pending inode, if it is pending.
    pub fn pending(&self, ino: Ino) -> MetaResult<Option<u64>> {
        match self.tree.get(by_ino(b'P', ino))? {
            Some(v) => Ok(Some(be_u64(&v)?)),
            None => Ok(None),
        }
    }

    pub fn all_pending(&self) -> MetaResult<Vec<(Ino, u64)>> {
        let mut out = Vec::new();
        for item in self.tree.scan_prefix([b'P']) {
            let (key, v) = item?;
            out.push((be_u64(&key[1..9])?, be_u64(&v)?));
        }
        Ok(out)
    }

    /// Bytes in the write-ahead journal since its last checkpoint.
    pub fn journal_bytes(&self) -> u64 {
        self.wal.locked().len()
    }

    pub fn pending_count(&self) -> usize {
        self.pending_n.load(std::sync::atomic::Ordering::Relaxed) as usize
    }

    pub fn delete_count(&self) -> usize {
        self.deletes_n.load(std::sync::atomic::Ordering::Relaxed) as usize
    }

    /// How a batch changes the numbers of `P` and `X` records (wrapping: a decrease is a
    /// large number that `fetch_add` turns into a subtraction). Called under the journal's lock.
    #[allow(clippy::type_complexity)]
    fn count_changes(&self, batch: &Batch) -> MetaResult<(i64, i64, Vec<((u8, Ino), i64)>)> {
        let mut now: HashMap<&[u8], bool> = HashMap::new();
        let (mut dp, mut dx) = (0i64, 0i64);
        let mut per_inode = Vec::new();
        for (key, val) in &batch.ops {
            let tag = key.first().copied();
            if !matches!(tag, Some(b'P' | b'X' | b'H' | b'C')) {
                continue;
            }
            let was = match now.get(key.as_slice()) {
                Some(b) => *b,
                None => self.tree.contains_key(key)?,
            };
            let is = val.is_some();
            now.insert(key, is);
            let d = is as i64 - was as i64;
            match tag {
                Some(b'P') => dp += d,
                Some(b'X') => dx += d,
                Some(t) if d != 0 && key.len() >= 9 => per_inode.push(((t, be_u64(&key[1..9])?), d)),
                _ => {}
            }
        }
        Ok((dp, dx, per_inode))
    }

    fn count_children(tree: &sled::Tree) -> MetaResult<HashMap<(u8, Ino), u32>> {
        let mut counts = HashMap::new();
        for tag in [b'H', b'C'] {
            for item in tree.scan_prefix([tag]) {
                let (key, _) = item?;
                *counts.entry((tag, be_u64(&key[1..9])?)).or_insert(0) += 1;
            }
        }
        Ok(counts)
    }

    /// How many other names the file `ino` has.
    pub fn link_count(&self, ino: Ino) -> u32 {
        self.counts.locked().get(&(b'H', ino)).copied().unwrap_or(0)
    }

    /// Pending inodes after `after` in inode order, at most `max` (a flush round's share).
    pub fn pending_after(&self, after: Ino, max: usize) -> MetaResult<Vec<(Ino, u64)>> {
        let mut out = Vec::new();
        if after == u64::MAX {
            return Ok(out);
        }
        for item in self.tree.range(by_ino(b'P', after + 1)..by_ino(b'Q', 0)) {
            let (key, v) = item?;
            out.push((be_u64(&key[1..9])?, be_u64(&v)?));
            if out.len() >= max {
                break;
            }
        }
        Ok(out)
    }

    /// The first `max` queued deletions, oldest first.
    pub fn some_deletes(&self, max: usize) -> MetaResult<Vec<(u64, String)>> {
        let mut out = Vec::new();
        for item in self.tree.scan_prefix([b'X']).take(max) {
            let (key, v) = item?;
            out.push((be_u64(&key[1..9])?, String::from_utf8_lossy(&v).into_owned()));
        }
        Ok(out)
    }

    /// Keys an upload of `ino` may have written without our knowing (see `Batch::maybe_written`).
    pub fn maybe_written_keys(&self, ino: Ino) -> MetaResult<Vec<String>> {
        let p = by_ino(b'W', ino);
        let mut out = Vec::new();
        for item in self.tree.scan_prefix(&p) {
            let (key, _) = item?;
            out.push(String::from_utf8_lossy(&key[p.len()..]).into_owned());
        }
        Ok(out)
    }

    /// The inodes still to move their object away from `key` (see `Batch::moving_from`).
    pub fn movers(&self, key: &str) -> MetaResult<Vec<Ino>> {
        let mut p = vec![b'Z'];
        p.extend_from_slice(key.as_bytes());
        p.push(0);
        let mut out = Vec::new();
        for item in self.tree.scan_prefix(&p) {
            let (k, _) = item?;
            out.push(be_u64(&k[p.len()..])?);
        }
        Ok(out)
    }

    /// Whether the object `key` (with `prefix`: any object under it) is queued for deletion or
    /// is where a renamed inode is moving from.
    pub fn key_leaving(&self, key: &str, prefix: bool) -> MetaResult<bool> {
        for tag in [b'Y', b'Z'] {
            let mut p = vec![tag];
            p.extend_from_slice(key.as_bytes());
            if !prefix {
                p.push(0);
            }
            if self.tree.scan_prefix(&p).next().transpose()?.is_some() {
                return Ok(true);
            }
        }
        Ok(false)
    }

    pub fn all_deletes(&self) -> MetaResult<Vec<(u64, String)>> {
        let mut out = Vec::new();
        for item in self.tree.scan_prefix([b'X']) {
            let (key, v) = item?;
            out.push((be_u64(&key[1..9])?, String::from_utf8_lossy(&v).into_owned()));
        }
        Ok(out)
    }

    pub fn all_uploads(&self) -> MetaResult<Vec<(Ino, String, String)>> {
        let mut out = Vec::new();
        for item in self.tree.scan_prefix([b'U']) {
            let (key, v) = item?;
            let (k, id): (String, String) = dec(&v)?;
            out.push((be_u64(&key[1..9])?, k, id));
        }
        Ok(out)
    }

    pub fn counter(&self, name: &str) -> MetaResult<u64> {
        match self.tree.get(by_ino_and(b'M', 0, name.as_bytes()))? {
            Some(v) => be_u64(&v),
            None => Ok(0),
        }
    }
}

impl Drop for MetaDb {
    fn drop(&mut self) {
        // A clean close leaves an empty log; a crash leaves the log to replay.
        if let Err(e) = self.checkpoint() {
            tracing::warn!(error = %e, "could not checkpoint the metadata journal at close");
        }
        Self::close_sled(&self.sled_path);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn inode(ino: Ino, parent: Ino, name: &str) -> Inode {
        Inode::new(ino, parent, name.as_bytes(), Kind::File, 0o644, (0, 0), Time::default())
    }

    /// A database that never saw the commits, and the log as a crash left it.
    fn crashed_copy(dir: &Path) -> tempfile::TempDir {
        let copy = tempfile::tempdir().unwrap();
        std::fs::copy(dir.join("journal.wal"), copy.path().join("journal.wal")).unwrap();
        copy
    }

    #[test]
    fn the_journal_carries_file_bytes_until_their_files_are_synced() {
        let dir = tempfile::tempdir().unwrap();
        let db = MetaDb::open(dir.path()).unwrap();
        let mut b = Batch::new();
        b.put_inode(&inode(5, 1, "a"));
        b.put_bytes(5, b"first".to_vec());
        db.commit(b).unwrap();
        let mut b = Batch::new();
        b.put_bytes(5, b"second".to_vec());
        b.put_bytes(6, b"other".to_vec());
        db.commit(b).unwrap();
        assert!(db.carries_bytes(5) && db.carries_bytes(6));
        assert!(
            db.tree.get(by_ino(b'B', 5)).unwrap().is_none(),
            "bytes never go into sled"
        );

        // Replay hands back the last bytes of each file, and keeps the log while nobody has
        // synced them.
        let crashed = crashed_copy(dir.path());
        let replayed = MetaDb::open(crashed.path()).unwrap();
        let mut got = replayed.take_journalled_bytes();
        got.sort();
        assert_eq!(got, vec![(5, b"second".to_vec()), (6, b"other".to_vec())]);
        assert!(replayed.take_journalled_bytes().is_empty(), "handed back once");
        assert_eq!(replayed.inode(5).unwrap().unwrap().name, b"a");
        replayed.checkpoint().unwrap();
        assert!(std::fs::metadata(crashed.path().join("journal.wal")).unwrap().len() > 0);

        // A drop record (the file synced on its own since) cancels the bytes before it.
        let mut b = Batch::new();
        b.drop_bytes(5);
        db.commit(b).unwrap();
        assert!(!db.carries_bytes(5) && db.carries_bytes(6));
        let crashed = crashed_copy(dir.path());
        let replayed = MetaDb::open(crashed.path()).unwrap();
        assert_eq!(replayed.take_journalled_bytes(), vec![(6, b"other".to_vec())]);

        // A checkpoint syncs the files the log still carries, then empties it.
        let synced = std::sync::Arc::new(Mutex::new(Vec::new()));
        let s = synced.clone();
        db.set_bytes_syncer(Box::new(move |inos| {
            s.locked().extend_from_slice(inos);
            Ok(())
        }));
        db.checkpoint().unwrap();
        assert_eq!(*synced.locked(), vec![6]);
        assert!(!db.carries_bytes(6));
        assert_eq!(std::fs::metadata(dir.path().join("journal.wal")).unwrap().len(), 0);
        // A syncer that fails keeps the log.
        let failing = tempfile::tempdir().unwrap();
        let db2 = MetaDb::open(failing.path()).unwrap();
        let mut b = Batch::new();
        b.put_bytes(8, b"x".to_vec());
        db2.commit(b).unwrap();
        db2.set_bytes_syncer(Box::new(|_| Err(std::io::Error::other("disk gone"))));
        assert!(db2.checkpoint().is_err());
        assert!(db2.carries_bytes(8));
        assert!(std::fs::metadata(failing.path().join("journal.wal")).unwrap().len() > 0);
    }

    #[test]
    fn journal_alone_rebuilds_the_namespace() {
        let dir = tempfile::tempdir().unwrap();
        let wal;
        {
            let db = MetaDb::open(dir.path()).unwrap();
            let mut b = Batch::new();
            b.put_inode(&inode(5, 1, "a"));
            b.link(1, b"a", 5, Kind::File);
            b.mark_pending(5, 9);
            db.commit(b).unwrap();
            wal = std::fs::read(dir.path().join("journal.wal")).unwrap();
            assert!(!wal.is_empty());
        }
        // A database that never saw the commit, and the log as the crash left it.
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("journal.wal"), &wal).unwrap();
        let db = MetaDb::open(dir.path()).unwrap();
        assert_eq!(db.lookup(1, b"a").unwrap(), Some(5));
        assert_eq!(db.inode(5).unwrap().unwrap().name, b"a");
        assert_eq!(db.pending(5).unwrap(), Some(9));
        // Replay checkpointed: the log is empty again.
        assert_eq!(std::fs::metadata(dir.path().join("journal.wal")).unwrap().len(), 0);
    }

    #[test]
    fn children_resume_after_cookie_in_inode_order() {
        let dir = tempfile::tempdir().unwrap();
        let db = MetaDb::open(dir.path()).unwrap();
        let mut b = Batch::new();
        for (ino, name) in [(7, "z"), (3, "y"), (12, "x")] {
            b.link(1, name.as_bytes(), ino, Kind::File);
        }
        b.link(2, b"other", 4, Kind::File);
        db.commit(b).unwrap();
        let all: Vec<_> = db.children(1, 0, 100).unwrap().into_iter().map(|c| c.0).collect();
        assert_eq!(all, vec![3, 7, 12]);
        let rest: Vec<_> = db.children(1, 3, 100).unwrap().into_iter().map(|c| c.0).collect();
        assert_eq!(rest, vec![7, 12]);
        // A cookie naming an entry that has since been removed still resumes in place.
        let mut b = Batch::new();
        b.unlink(1, b"z", 7, Kind::File);
        db.commit(b).unwrap();
        let rest: Vec<_> = db.children(1, 7, 100).unwrap().into_iter().map(|c| c.0).collect();
        assert_eq!(rest, vec![12]);
    }

    #[test]
    fn counts_and_key_indexes_follow_every_change_and_survive_a_reopen() {
        let dir = tempfile::tempdir().unwrap();
        {
            let db = MetaDb::open(dir.path()).unwrap();
            let mut b = Batch::new();
            b.mark_pending(5, 1);
            b.mark_pending(5, 2); // again in one batch: still one record
            b.mark_pending(6, 3);
            b.queue_delete(10, "d/x");
            b.moving_from("old/y", 6);
            db.commit(b).unwrap();
            assert_eq!((db.pending_count(), db.delete_count()), (2, 1));
            let mut b = Batch::new();
            b.mark_pending(6, 4); // already there
            b.clear_pending(7); // never was
            b.del_inode(5); // takes its pending record along
            db.commit(b).unwrap();
            assert_eq!(db.pending_count(), 1);
            assert_eq!(db.pending_after(0, 10).unwrap(), vec![(6, 4)]);
            assert_eq!(db.pending_after(6, 10).unwrap(), vec![]);
            assert!(db.key_leaving("d/x", false).unwrap());
            assert!(!db.key_leaving("d/xy", false).unwrap());
            assert!(!db.key_leaving("d/", false).unwrap());
            assert!(db.key_leaving("d/", true).unwrap());
            assert!(db.key_leaving("old/y", false).unwrap());
            assert!(db.key_leaving("old/", true).unwrap());
            let mut b = Batch::new();
            b.done_delete(10, "d/x");
            b.moved_from("old/y", 6);
            db.commit(b).unwrap();
            assert_eq!(db.delete_count(), 0);
            assert!(!db.key_leaving("d/", true).unwrap());
            assert!(!db.key_leaving("old/y", false).unwrap());
        }
        let db = MetaDb::open(dir.path()).unwrap();
        assert_eq!((db.pending_count(), db.delete_count()), (1, 0));
    }
}

#[cfg(test)]
mod reopen_tests {
    use super::*;

    #[test]
    fn reopen_many_times() {
        let dir = tempfile::tempdir().unwrap();
        for i in 0..200u64 {
            let db = MetaDb::open(dir.path()).unwrap();
            let mut b = Batch::new();
            b.set_counter("x", i);
            db.commit(b).unwrap();
            db.sync().unwrap();
        }
    }
}
