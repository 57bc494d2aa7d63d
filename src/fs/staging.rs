//! Local staging: one file on disk per inode whose bytes are held locally (new or modified
//! files, and files recently uploaded, until evicted). A WRITE is a `pwrite` into it, so once the
//! reply is sent the bytes are in the kernel and survive a crash of the gateway.
//!
//! A staged copy's length is the file's size. It holds every byte of the file, except for a
//! large file brought in for a write: that copy may have holes, parts not fetched yet whose
//! bytes only its base object holds (see `holes.rs`).

use std::collections::BTreeSet;
use std::fs::File;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Instant;

use tracing::Instrument;

use super::{Core, FsError, FsResult};
use crate::meta::{Ino, Kind, Remote, Time};
use crate::sync::LockExt;

/// State of a multipart upload streaming a large staged file to S3 while it is written.
#[derive(Debug, Default)]
pub struct Multipart {
    pub key: String,
    pub upload_id: String,
    /// The metadata the upload was created with, which the object gets at its completion.
    pub meta: crate::store::UserMeta,
    /// Uploaded parts: number → (ETag, length). A part is only here while its bytes are
    /// unchanged since they were read for upload (writes remove the parts they touch); the length
    /// tells whether a part uploaded short, as the last one, still fits the file's size.
    pub done: std::collections::BTreeMap<i32, (String, u64)>,
    /// Parts being uploaded now.
    pub in_flight: BTreeSet<i32>,
    /// Parts written to since their upload started: their upload's result is thrown away.
    pub dirtied: BTreeSet<i32>,
    /// A CompleteMultipartUpload of this upload is under way: no part may be uploaded into it
    /// now (S3 would take the new part's ETag over the one being completed, and refuse).
    pub completing: bool,
}

/// Staged files with a descriptor open, in the whole process (the limit on descriptors is the
/// process's): past [`fd_budget`], descriptors of files just fsync'd are closed (see
/// `Volume::sync_local`), and reopened at their next use.
static OPEN_FDS: AtomicUsize = AtomicUsize::new(0);

/// How many staged files may keep a descriptor open: a quarter of the process's limit, at most
/// 8,192. Creating 100,000 files while uploads wait for busy clients must not run the gateway
/// out of descriptors (EMFILE on every later operation).
pub fn fd_budget() -> usize {
    static BUDGET: std::sync::OnceLock<usize> = std::sync::OnceLock::new();
    *BUDGET.get_or_init(|| {
        let mut lim = libc::rlimit {
            rlim_cur: 0,
            rlim_max: 0,
        };
        // SAFETY: getrlimit only writes the struct passed.
        let cur = if unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim) } == 0 {
            lim.rlim_cur as usize
        } else {
            1024
        };
        (cur / 4).clamp(64, 8192)
    })
}

/// Whether staged files hold more descriptors than [`fd_budget`].
pub fn over_fd_budget() -> bool {
    OPEN_FDS.load(Ordering::Relaxed) > fd_budget()
}

pub struct Staged {
    pub ino: Ino,
    /// The staging area's directory, shared by all its files: the file's own path is computed
    /// when it is opened, not kept (a path per staged file is a heap allocation per file, and a
    /// volume can have 100,000 of them pending).
    dir: Arc<Path>,
    /// Opened at the first use, not at creation: a file created and not yet written has no
    /// staging file at all (an empty upload needs none). Closed again when over the budget.
    fd: Mutex<Option<Arc<File>>>,
    /// The staging file exists (a new file's is created by its first write).
    on_disk: AtomicBool,
    /// Writers take it shared; whoever needs a consistent view of the whole file (a snapshot for
    /// upload, truncation, eviction) takes it exclusively.
    pub lock: tokio::sync::RwLock<()>,
    size: AtomicU64,
    /// Bumped by every change of the bytes.
    gen: AtomicU64,
    /// `gen` when the client last sent a COMMIT for the file (an fsync, or a close): equal to
    /// `gen` while nothing was written since. `u64::MAX`: never.
    committed_gen: AtomicU64,
    /// `gen` of the bytes the last completed multipart upload holds. `u64::MAX`: none.
    completed_gen: AtomicU64,
    /// The bytes differ from what S3 holds. Changed only through the transitions below.
    content_dirty: AtomicBool,
    /// A `P` record is committed for this inode since its last upload.
    pending_marked: AtomicBool,
    /// Set when the staged copy is dropped (file removed or evicted); holders must look again.
    gone: AtomicBool,
    pub mtime: Mutex<Time>,
    pub last_write: Mutex<Instant>,
    /// Boxed: most files never have one, and the record is kept per staged file.
    pub multipart: Mutex<Option<Box<Multipart>>>,
    /// The object in S3 these bytes came from or went to, for a file of a part or more (boxed,
    /// as `multipart`).
    base: Mutex<Option<Box<Base>>>,
    /// Held while holes are filled, so that two fills of one part do not both fetch it.
    pub fill_lock: tokio::sync::Mutex<()>,
    /// The fill a client's READ or WRITE started in the background, which later ones wait on
    /// rather than start their own (see `Core::fill_for_client`).
    pub(crate) fill_job: Mutex<Option<super::holes::FillJob>>,
    /// Its name in the staging directory is new (created, or a download renamed in) and not
    /// yet synced with the directory.
    name_unsynced: AtomicBool,
    /// Held while the multipart upload is started or restarted, so concurrent passes share one.
    pub multipart_init: tokio::sync::Mutex<()>,
    /// Written since the last fsync (see `Volume::sync_local`).
    pub unsynced: AtomicBool,
    /// Signalled whenever a part upload ends.
    pub part_done: tokio::sync::Notify,
    /// Part size of the multipart upload, to map written ranges to part numbers.
    part_size: u64,
    /// The volume's clock, for `last_write` (which the flush delay is measured from).
    clock: crate::clock::Clock,
}

/// An object in S3 that holds the staged copy's bytes but for the parts written since: a new
/// upload takes those others from it server-side (UploadPartCopy) instead of sending them again.
/// An append to a 1 GiB log, or a database rewriting pages of a large file, then sends S3 only
/// the parts it changed.
struct Base {
    remote: Remote,
    /// Parts written since (numbered as the multipart upload numbers them).
    written: BTreeSet<i32>,
    /// Parts not in the staged copy at all: holes, whose bytes only `remote` holds. Never
    /// written (a write fills its parts first); the copy's sidecar file lists them.
    missing: BTreeSet<i32>,
    /// How many of `remote`'s first bytes are still the file's: a truncation cuts the rest,
    /// and what the file grows into there afterwards is not `remote`'s.
    kept: u64,
}

impl Staged {
    /// Where the staged copy lives.
    pub fn path(&self) -> PathBuf {
        super::area::StagingArea::path_in(&self.dir, self.ino)
    }

    pub fn open(ino: Ino, dir: Arc<Path>, create: bool, cfg: &super::VolumeConfig) -> std::io::Result<Staged> {
        // A new file touches no disk until written: no system call at all per file created.
        let (len, mtime) = if create {
            (0, Time::now())
        } else {
            let md = std::fs::metadata(super::area::StagingArea::path_in(&dir, ino))?;
            let mtime = md
                .modified()
                .ok()
                .and_then(|t| t.duration_since(std::time::UNIX_EPOCH).ok())
                .map(|d| Time {
                    secs: d.as_secs() as i64,
                    nanos: d.subsec_nanos(),
                })
                .unwrap_or_else(Time::now);
            (md.len(), mtime)
        };
        Ok(Staged {
            ino,
            dir,
            fd: Mutex::new(None),
            on_disk: AtomicBool::new(!create),
            lock: tokio::sync::RwLock::new(()),
            size: AtomicU64::new(len),
            gen: AtomicU64::new(0),
            committed_gen: AtomicU64::new(u64::MAX),
            completed_gen: AtomicU64::new(u64::MAX),
            base: Mutex::new(None),
            fill_lock: tokio::sync::Mutex::new(()),
            fill_job: Mutex::new(None),
            name_unsynced: AtomicBool::new(false),
            content_dirty: AtomicBool::new(false),
            pending_marked: AtomicBool::new(false),
            gone: AtomicBool::new(false),
            mtime: Mutex::new(mtime),
            last_write: Mutex::new(cfg.clock.op_now()),
            multipart: Mutex::new(None),
            multipart_init: tokio::sync::Mutex::new(()),
            part_done: tokio::sync::Notify::new(),
            unsynced: AtomicBool::new(false),
            part_size: cfg.part_size,
            clock: cfg.clock.clone(),
        })
    }

    // ------------------------------------------------ the upload state, and its transitions
    //
    // Two flags say where the staged bytes stand against S3: `content_dirty` (the bytes differ
    // from the object) and `pending_marked` (a `P` record in the journal says so, so that a
    // restart uploads them). They move only through these methods:
    //
    //   clean --changed()--> dirty+pending --uploaded(gen)--> pending --settled()--> clean
    //   clean --journalled()--> pending (metadata or a name to upload, bytes unchanged)
    //
    // and `retire()` ends the staged copy for good.

    /// Its bytes differ from S3 and the journal has (or is about to have) a `P` record: a new
    /// file, bytes restored after a restart, bytes brought in to be uploaded elsewhere.
    pub fn changed(&self) {
        self.content_dirty.store(true, Ordering::Release);
        self.pending_marked.store(true, Ordering::Release);
    }

    /// The journal has a `P` record for the inode (metadata, a name or bytes to upload).
    pub fn journalled(&self) {
        self.pending_marked.store(true, Ordering::Release);
    }

    /// Whether a `P` record stands for the inode since its last upload.
    pub fn is_journalled(&self) -> bool {
        self.pending_marked.load(Ordering::Acquire)
    }

    /// Whether the bytes differ from what S3 holds.
    pub fn is_dirty(&self) -> bool {
        self.content_dirty.load(Ordering::Acquire)
    }

    /// Neither dirty nor journalled: S3 holds these bytes, and the copy may be dropped.
    pub fn is_clean(&self) -> bool {
        !self.is_dirty() && !self.is_journalled()
    }

    /// An upload of the bytes as of generation `gen` finished: clean if nothing was written
    /// since, which it returns. The caller holds `lock` exclusively.
    pub fn uploaded(&self, gen: u64) -> bool {
        if self.gen() != gen {
            return false;
        }
        self.content_dirty.store(false, Ordering::Release);
        true
    }

    /// The `P` record was cleared: nothing left to upload.
    pub fn settled(&self) {
        self.pending_marked.store(false, Ordering::Release);
    }

    /// The staged copy is dropped (file removed or evicted); holders must look again.
    pub fn retire(&self) {
        self.gone.store(true, Ordering::Release);
    }

    pub fn is_retired(&self) -> bool {
        self.gone.load(Ordering::Acquire)
    }

    /// Time since the last write at `now` (one clock reading serves a whole flush round).
    pub fn idle_at(&self, now: std::time::Instant) -> std::time::Duration {
        now.saturating_duration_since(*self.last_write.locked())
    }

    /// Whether the staging file exists (a new file's is created by its first write).
    pub fn on_disk(&self) -> bool {
        self.on_disk.load(Ordering::Acquire)
    }

    /// The whole file, for a small one (see `bytes_in_journal.rs`).
    pub fn contents(&self) -> std::io::Result<Vec<u8>> {
        let size = u32::try_from(self.size()).map_err(|_| std::io::Error::other("file too large to read whole"))?;
        Ok(self.read_at(0, size)?.0)
    }

    pub fn size(&self) -> u64 {
        self.size.load(Ordering::Acquire)
    }

    pub fn gen(&self) -> u64 {
        self.gen.load(Ordering::Acquire)
    }

    /// The staged bytes are `remote`'s, as fetched from S3 or just uploaded there. The caller
    /// holds `lock` exclusively, or no writer can have the file yet. Kept only for a file of a
    /// part or more: a smaller one is sent whole in one PUT.
    pub fn set_base(&self, remote: &Remote) {
        let mut base = self.base.locked();
        if let Some(b) = base.as_mut().filter(|b| !b.missing.is_empty()) {
            // A copy with holes keeps them, and the base its sidecar names (`move_base`
            // re-pointed it at `remote` when the upload completed): the parts written before
            // are in `remote` too.
            if b.remote == *remote {
                b.written.clear();
            }
            return;
        }
        *base = (remote.size >= self.part_size).then(|| {
            Box::new(Base {
                remote: remote.clone(),
                written: BTreeSet::new(),
                missing: BTreeSet::new(),
                kept: remote.size,
            })
        });
    }

    /// The copy is `remote`'s bytes but for the parts in `missing`, holes that its sidecar file
    /// lists already. Every part present counts as written: after a restart the gateway cannot
    /// tell which of them a client changed, so they are all sent, and only holes are copied.
    pub fn set_holes(&self, remote: &Remote, mut missing: BTreeSet<i32>) {
        // A copy cut short keeps no holes past its end (a crash may have left them listed).
        let len = self.size();
        missing.retain(|p| (*p as u64 - 1) * self.part_size < len);
        let parts = remote.size.div_ceil(self.part_size) as i32;
        let written = (1..=parts).filter(|p| !missing.contains(p)).collect();
        *self.base.locked() = Some(Box::new(Base {
            remote: remote.clone(),
            written,
            missing,
            // Only holes are copied (every part present counts as written), and the list of
            // holes was cut with the file.
            kept: remote.size,
        }));
    }

    /// The bytes of the part that a change of the length to `len` cuts or extends: the one
    /// holding the last byte kept. `None` when nothing is kept.
    pub fn boundary(&self, len: u64) -> Option<std::ops::Range<u64>> {
        let kept = len.min(self.size());
        (kept > 0).then(|| {
            let start = (kept - 1) / self.part_size * self.part_size;
            start..start + self.part_size
        })
    }

    /// The holes among the parts that bytes `range` touch, and the object that holds them.
    pub fn holes_in(&self, range: std::ops::Range<u64>) -> Option<(Remote, Vec<i32>)> {
        let base = self.base.locked();
        let b = base.as_ref().filter(|b| !b.missing.is_empty())?;
        if range.is_empty() {
            return None;
        }
        let first = (range.start / self.part_size) as i32 + 1;
        let last = ((range.end - 1) / self.part_size) as i32 + 1;
        let holes: Vec<i32> = b.missing.range(first..=last).copied().collect();
        (!holes.is_empty()).then(|| (b.remote.clone(), holes))
    }

    /// Bytes of the copy on the staging disk: its length less its holes. What the bounds on
    /// dirty and kept copies count (a 4 KiB write into a cold 10 GiB file is one part there).
    pub fn present_bytes(&self) -> u64 {
        let size = self.size();
        let holes: u64 = self.base.locked().as_ref().map_or(0, |b| {
            b.missing
                .iter()
                .map(|p| {
                    let start = (*p as u64 - 1) * self.part_size;
                    (start + self.part_size).min(size).saturating_sub(start)
                })
                .sum()
        });
        size.saturating_sub(holes)
    }

    pub fn has_holes(&self) -> bool {
        self.base.locked().as_ref().is_some_and(|b| !b.missing.is_empty())
    }

    pub fn is_hole(&self, part: i32) -> bool {
        self.base.locked().as_ref().is_some_and(|b| b.missing.contains(&part))
    }

    pub fn part_size(&self) -> u64 {
        self.part_size
    }

    /// Writes bytes of a hole being filled: they are the base's, so nothing changes for the
    /// file (no new generation, nothing dirty). The caller holds `lock` shared.
    pub fn fill_at(&self, offset: u64, data: &[u8]) -> std::io::Result<()> {
        self.file()?.write_all_at(data, offset)
    }

    /// Part `part` was filled: once its bytes are on disk, the sidecar stops listing it (a
    /// crash in between fetches it again, which is harmless, since nothing was written into it:
    /// writers wait for the fill). The caller holds `lock` shared and `fill_lock`.
    pub fn filled(&self, part: i32) -> std::io::Result<()> {
        self.file()?.sync_data()?;
        let mut base = self.base.locked();
        let Some(b) = base.as_mut().filter(|b| b.missing.contains(&part)) else {
            return Ok(()); // the holes were discarded meanwhile (copy dropped or truncated)
        };
        // The sidecar first: should it fail (a full disk), the part stays a hole everywhere,
        // and no writer is let into it.
        let mut missing = b.missing.clone();
        missing.remove(&part);
        super::holes::write_sidecar(&self.dir, self.ino, &b.remote, &missing, self.part_size)?;
        b.missing = missing;
        Ok(())
    }

    /// Forgets the holes (the copy is dropped, or truncated after the holes it keeps were
    /// filled) and removes the sidecar, under the same lock as [`Staged::filled`] writes it: a
    /// fill ending late cannot bring the sidecar back.
    pub fn discard_holes(&self) {
        let mut base = self.base.locked();
        // The sidecar exists exactly while holes do.
        if let Some(b) = base.as_mut().filter(|b| !b.missing.is_empty()) {
            b.missing.clear();
            super::holes::remove_sidecar(&self.dir, self.ino);
        }
    }

    /// The object and version to copy part `part` (bytes `range` of the file) from, when S3
    /// already holds those bytes there: the part was not written since and lies wholly within
    /// that object.
    pub fn copy_source(&self, part: i32, range: &std::ops::Range<u64>) -> Option<(String, String)> {
        let base = self.base.locked();
        let b = base.as_ref()?;
        (range.end <= b.kept && !b.written.contains(&part)).then(|| (b.remote.key.clone(), b.remote.etag.clone()))
    }

    /// `to` holds the base's bytes at the same offsets, for every part not written since: an
    /// object the gateway made from it (a server-side move of the base, or a completed upload
    /// whose unwritten parts were copied from it). Those parts, holes included, come from `to`
    /// now, since the old object is deleted or replaced. A copy with holes says so in its
    /// sidecar first, durably. Only when the base is `from` (`None`: whatever it is); the
    /// caller holds `fill_lock`, so that no fill reads the old object meanwhile.
    pub fn move_base(&self, from: Option<&Remote>, to: &Remote) -> std::io::Result<()> {
        let mut base = self.base.locked();
        let Some(b) = base.as_mut().filter(|b| from.is_none_or(|f| b.remote == *f)) else {
            return Ok(());
        };
        if !b.missing.is_empty() {
            super::holes::write_sidecar(&self.dir, self.ino, to, &b.missing, self.part_size)?;
        }
        b.remote = to.clone();
        b.kept = b.kept.min(to.size);
        Ok(())
    }

    /// The base object is gone or was replaced: parts are sent from the staged copy. Refused
    /// (false) while the copy has holes: their bytes are nowhere else, and sending the holes
    /// would upload zeros (see `Core::holes_lost`).
    pub fn drop_base(&self) -> bool {
        let mut base = self.base.locked();
        if base.as_ref().is_some_and(|b| !b.missing.is_empty()) {
            return false;
        }
        *base = None;
        true
    }

    /// A multipart upload of the bytes as of generation `gen` was completed.
    pub fn note_completed(&self, gen: u64) {
        self.completed_gen.store(gen, Ordering::Release);
    }

    /// Whether nothing was written since the last multipart upload was completed.
    pub fn completed_since_write(&self) -> bool {
        self.completed_gen.load(Ordering::Acquire) == self.gen()
    }

    /// Whether a multipart upload of the file has parts in S3 or on their way (it streamed while
    /// the file was written).
    pub fn streamed(&self) -> bool {
        self.multipart
            .locked()
            .as_ref()
            .is_some_and(|m| !m.done.is_empty() || !m.in_flight.is_empty())
    }

    /// The client sent a COMMIT for the file: it was closed or fsync'd after its last write.
    pub fn note_commit(&self) {
        self.committed_gen.store(self.gen(), Ordering::Release);
    }

    /// Whether nothing was written since the client's last COMMIT of the file.
    pub fn committed_since_write(&self) -> bool {
        self.committed_gen.load(Ordering::Acquire) == self.gen()
    }

    pub fn mtime(&self) -> Time {
        *self.mtime.locked()
    }

    /// The open staging file, opened (a new file's created, empty: truncated, should a crash
    /// have left one under this inode number) if it is not.
    fn file(&self) -> std::io::Result<Arc<File>> {
        let mut fd = self.fd.locked();
        if let Some(f) = &*fd {
            return Ok(f.clone());
        }
        if self.is_retired() {
            // Its path may be another copy's by now.
            return Err(std::io::Error::other("the staged copy was dropped"));
        }
        let create = !self.on_disk.load(Ordering::Acquire);
        let f = Arc::new(
            std::fs::OpenOptions::new()
                .read(true)
                .write(true)
                .create(create)
                .truncate(create)
                .open(self.path())?,
        );
        self.on_disk.store(true, Ordering::Release);
        if create {
            self.new_name();
        }
        OPEN_FDS.fetch_add(1, Ordering::Relaxed);
        *fd = Some(f.clone());
        Ok(f)
    }

    /// Closes the descriptor (the file stays; the next use opens it again). Call it once the
    /// file is fsync'd or its bytes are in the journal: `sync` syncs only through an open
    /// descriptor (the journal's syncer opens files by name).
    pub fn close_fd(&self) {
        if self.fd.locked().take().is_some() {
            OPEN_FDS.fetch_sub(1, Ordering::Relaxed);
        }
    }

    /// Writes `data` at `offset`. The caller holds `lock` shared.
    pub fn write_at(&self, offset: u64, data: &[u8]) -> std::io::Result<()> {
        self.file()?.write_all_at(data, offset)?;
        self.size.fetch_max(offset + data.len() as u64, Ordering::AcqRel);
        self.touched(offset, data.len() as u64);
        Ok(())
    }

    /// [`Staged::write_at`], on disk when it returns: the bytes and the size that reaches them
    /// (`O_DSYNC`'s promise), nothing else of the file.
    pub fn write_at_durably(&self, offset: u64, data: &[u8]) -> std::io::Result<()> {
        write_all_dsync(&*self.file()?, data, offset)?;
        self.size.fetch_max(offset + data.len() as u64, Ordering::AcqRel);
        self.touched(offset, data.len() as u64);
        Ok(())
    }

    /// Sets the length. The caller holds `lock` exclusively, and filled the boundary part (the
    /// one holding the last byte the file keeps, see [`Staged::boundary`]): that part changes
    /// and is sent at the next upload; the parts below it do not, and stay copies of the base
    /// (holes included); those past the new end are cut off.
    pub fn set_len(&self, len: u64) -> std::io::Result<()> {
        let boundary = self.boundary(len);
        if boundary.clone().is_some_and(|r| self.holes_in(r).is_some()) {
            // Marked written, the hole's zeros would be sent.
            return Err(std::io::Error::other("the part a truncation cuts is not filled"));
        }
        let f = self.file()?;
        f.set_len(len)?;
        {
            let mut base = self.base.locked();
            if let Some(b) = base.as_mut() {
                let keep = boundary.map_or(0, |r| (r.start / self.part_size) as i32 + 1);
                if b.missing.range(keep..).next().is_some() {
                    // Cut before the list of holes changes: a crash in between leaves holes
                    // listed past the end (cut off at the restart), never a copy at its old
                    // length without them.
                    f.sync_data()?;
                    let missing: BTreeSet<i32> = b.missing.range(..keep).copied().collect();
                    super::holes::write_sidecar(&self.dir, self.ino, &b.remote, &missing, self.part_size)?;
                    b.missing = missing;
                }
                if keep == 0 {
                    *base = None;
                } else {
                    b.written.insert(keep);
                    b.kept = b.kept.min(len);
                }
            }
        }
        self.size.store(len, Ordering::Release);
        // Shrinking invalidates the part layout; growing changes the last part. Start over.
        if let Some(m) = self.multipart.locked().as_mut() {
            m.done.clear();
            let in_flight = m.in_flight.clone();
            m.dirtied.extend(in_flight);
        }
        self.touched(0, 0);
        Ok(())
    }

    fn touched(&self, offset: u64, len: u64) {
        self.gen.fetch_add(1, Ordering::AcqRel);
        self.content_dirty.store(true, Ordering::Release);
        *self.mtime.locked() = Time::now();
        *self.last_write.locked() = self.clock.op_now();
        if len > 0 {
            let first = (offset / self.part_size) as i32 + 1;
            let last = ((offset + len - 1) / self.part_size) as i32 + 1;
            if let Some(m) = self.multipart.locked().as_mut() {
                for p in first..=last {
                    m.done.remove(&p);
                    m.dirtied.insert(p);
                }
            }
            if let Some(b) = self.base.locked().as_mut() {
                b.written.extend(first..=last);
            }
        }
    }

    pub fn read_at(&self, offset: u64, count: u32) -> std::io::Result<(Vec<u8>, bool)> {
        let size = self.size();
        if offset >= size {
            return Ok((Vec::new(), true));
        }
        let n = (size - offset).min(count as u64) as usize;
        let mut buf = vec![0u8; n];
        let mut read = 0;
        let file = self.file()?;
        while read < n {
            let r = file.read_at(&mut buf[read..], offset + read as u64)?;
            if r == 0 {
                break;
            }
            read += r;
        }
        buf.truncate(read);
        Ok((buf, offset + read as u64 >= size))
    }

    /// Its name in the staging directory was just made (see [`Staged::take_new_name`]).
    pub fn new_name(&self) {
        self.name_unsynced.store(true, Ordering::Release);
    }

    /// Whether its name was made since the directory's last sync.
    pub fn name_pending(&self) -> bool {
        self.name_unsynced.load(Ordering::Acquire)
    }

    /// Whether its name was made since the last call: the directory needs a sync for the file
    /// to be found after a power cut.
    pub fn take_new_name(&self) -> bool {
        self.name_unsynced.swap(false, Ordering::AcqRel)
    }

    /// Makes what was written durable. Writes go through the open descriptor, and a closed
    /// one was synced before it was closed.
    pub fn sync(&self) -> std::io::Result<()> {
        let fd = self.fd.locked().clone();
        match fd {
            Some(f) => f.sync_data(),
            None => Ok(()),
        }
    }
}

impl Drop for Staged {
    fn drop(&mut self) {
        self.close_fd();
    }
}

/// Writes all of `data` at `offset`, each piece with `RWF_DSYNC`: one system call where a
/// write and an `fdatasync` would be two. Where the kernel or the file system refuses the flag,
/// a write and an `fdatasync`.
fn write_all_dsync(f: &File, mut data: &[u8], mut offset: u64) -> std::io::Result<()> {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    {
        use std::os::fd::AsRawFd;
        while !data.is_empty() {
            let iov = libc::iovec {
                iov_base: data.as_ptr() as *mut libc::c_void,
                iov_len: data.len(),
            };
            // SAFETY: one iovec over `data`, which outlives the call; the kernel only reads it.
            let n = unsafe { libc::pwritev2(f.as_raw_fd(), &iov, 1, offset as libc::off_t, libc::RWF_DSYNC) };
            if n < 0 {
                let e = std::io::Error::last_os_error();
                match e.raw_os_error() {
                    Some(libc::EINTR) => continue,
                    Some(libc::EOPNOTSUPP | libc::ENOSYS | libc::EINVAL) => break, // the fallback below
                    _ => return Err(e),
                }
            }
            if n == 0 {
                return Err(std::io::ErrorKind::WriteZero.into());
            }
            data = &data[n as usize..];
            offset += n as u64;
        }
        if data.is_empty() {
            return Ok(());
        }
    }
    f.write_all_at(data, offset)?;
    f.sync_data()
}

/// A fetch of one file from S3 into staging, shared by everyone who needs that file meanwhile.
pub(crate) type StagingJob = super::core::SharedJob<Arc<Staged>>;

impl Core {
    /// The staged copy of a file, bringing it from S3 first unless `empty` (about to be emptied).
    ///
    /// The fetch runs as a background job of its own, one per file: a cold 10 GiB file delays
    /// only the operations on that file, and those for at most `stage_wait`, after which they
    /// answer "retry later" (JUKEBOX) while the fetch goes on, instead of holding the client's
    /// request (and its retransmissions) for as long as S3 takes.
    pub(crate) async fn stage(&self, ino: Ino, empty: bool) -> FsResult<Arc<Staged>> {
        loop {
            if let Some(st) = self.staged(ino) {
                return Ok(st);
            }
            let job = {
                let mut jobs = self.staging.jobs();
                if let Some(st) = self.staged(ino) {
                    return Ok(st);
                }
                match jobs.get(&ino) {
                    Some(j) => j.clone(),
                    None => {
                        // The job leaves the map under the map's lock, which we hold until it
                        // is in: it cannot leave before it arrived.
                        let job: StagingJob = self.shared_job("staging download", |v| {
                            async move {
                                let r = v.fetch_to_staging(ino, empty).await;
                                v.staging.jobs().remove(&ino);
                                r
                            }
                            .instrument(tracing::info_span!("stage", ino))
                        })?;
                        jobs.insert(ino, job.clone());
                        job
                    }
                }
            };
            // On the volume's clock: a test on the manual clock decides when the wait is over.
            let waited = tokio::select! {
                r = job => Some(r),
                _ = self.cfg.clock.sleep(self.cfg.stage_wait) => None,
            };
            match waited {
                Some(Ok(st)) if !st.is_retired() => return Ok(st),
                Some(Ok(_)) => continue, // removed or evicted since: look again
                Some(Err(e)) => return Err(e),
                None => return Err(FsError::Retry("the file is still coming from S3".into())),
            }
        }
    }

    async fn fetch_to_staging(&self, ino: Ino, empty: bool) -> FsResult<Arc<Staged>> {
        // Another S3 client may replace the object while it is fetched: the fetch then starts
        // over on the new version (bounded, should it keep changing).
        let mut replaced = 0;
        loop {
            if let Some(st) = self.staged(ino) {
                return Ok(st);
            }
            let inode = self.inode(ino)?;
            if inode.kind != Kind::File {
                return Err(FsError::Invalid("not a regular file".into()));
            }
            let fetched = inode.remote.clone().filter(|_| !empty);
            // Holes need a version to fill them from and copy them from (an object listed
            // without an ETag is fetched whole), and parts: a file under one is sent whole.
            let sparse_from = self.cfg.sparse_from.max(self.cfg.part_size);
            if let Some(r) = fetched.as_ref().filter(|r| r.size >= sparse_from && !r.etag.is_empty()) {
                // Large: its parts come when something reads or writes them (see `holes.rs`).
                let st = self.stage_with_holes(ino, r)?;
                *st.mtime.locked() = inode.mtime;
                self.staging.insert(st.clone());
                return Ok(st);
            }
            let tmp = self.staging.download_path(ino);
            match self.download(&tmp, fetched.as_ref()).await {
                Ok(()) => {}
                Err(FsError::NotFound) if replaced < 3 => {
                    let _ = std::fs::remove_file(&tmp);
                    let Some(seen) = fetched.as_ref() else {
                        return Err(FsError::NotFound);
                    };
                    if !self.take_up_current_version(ino, seen).await? {
                        return Err(FsError::NotFound);
                    }
                    replaced += 1;
                    continue;
                }
                Err(e) => {
                    let _ = std::fs::remove_file(&tmp);
                    return Err(e);
                }
            }
            // Removed while it was fetched: nothing to stage.
            let Some(inode) = self.meta.inode(ino)? else {
                let _ = std::fs::remove_file(&tmp);
                return Err(FsError::Stale);
            };
            // A whole copy: no sidecar may say otherwise at a restart.
            super::holes::remove_sidecar(self.staging.dir(), ino);
            std::fs::rename(&tmp, self.staging.path(ino))?;
            let st = Arc::new(Staged::open(ino, self.staging.shared_dir(), false, &self.cfg)?);
            st.new_name();
            *st.mtime.locked() = inode.mtime;
            if let Some(r) = &fetched {
                st.set_base(r);
            }
            self.staging.insert(st.clone());
            return Ok(st);
        }
    }

    /// Writes `remote`'s bytes (none if `None`) into a new file at `tmp`: one GET of that
    /// version, streamed to disk, so memory stays bounded whatever the size.
    async fn download(&self, tmp: &Path, remote: Option<&Remote>) -> FsResult<()> {
        let file = std::fs::File::create(tmp)?;
        let Some(r) = remote else {
            return Ok(());
        };
        let got =
            super::versions::stream_version(&*self.store, r, 0..r.size, &|at, bytes| file.write_all_at(bytes, at))
                .await?;
        // A version named by its ETag has its listed size; an object listed without one may
        // have changed since, and is taken as S3 sends it.
        if got != r.size && !r.etag.is_empty() {
            return Err(FsError::Io(format!(
                "{} answered {got} bytes of its version {}, which has {}",
                r.key, r.etag, r.size
            )));
        }
        // On disk before it is renamed into place: once the file is written and its `P`
        // journalled, a restart uploads the copy, and a power cut must not leave zeros there
        // (a copy with holes is synced part by part, see `holes.rs`).
        file.sync_data()?;
        Ok(())
    }
}
