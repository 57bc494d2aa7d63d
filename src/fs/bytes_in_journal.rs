//! Small files made durable through the metadata journal: a sync appends the whole content of
//! each small staged file written since the last sync to the journal (one record for all of
//! them), and the journal's own sync, which comes after, makes them durable.
//!
//! Why: a new small file's own `fdatasync` commits the file system's journal (its inode, its
//! directory entry, its first block: about 0.27 ms on ext4 here), while the journal's sync
//! overwrites blocks already allocated (about 0.13 ms, see `meta/wal.rs`), and one sync covers
//! every file of the group. A COMMIT of a small file then waits for that one sync.
//!
//! The rules that keep it safe:
//! - Before the journal is emptied (a checkpoint), the staged files whose bytes it carries are
//!   synced on their own (the syncer set at open, [`MetaDb::set_bytes_syncer`]).
//! - A file whose bytes the journal carries and that is later synced on its own (it grew past
//!   [`JOURNAL_MAX`]) gets a drop record after that sync, and the journal's sync after it: an
//!   older content is never replayed over a newer one that a COMMIT acknowledged.
//! - Every sync runs in the volume's sync group, one at a time (see `durable.rs`), so a sync
//!   that journals a file and one that syncs it on its own never interleave.
//! - After a crash, replay hands back the last bytes of each file, and they are written into
//!   its staged file before anything reads it. A file no longer waiting for upload (its bytes
//!   are in S3) loses its staged copy instead, which may be whatever a power cut left.
//!
//! [`MetaDb::set_bytes_syncer`]: crate::meta::MetaDb::set_bytes_syncer

use std::fs::File;
use std::io::Write;
use std::os::fd::AsRawFd;
use std::sync::atomic::Ordering;
use std::sync::Arc;

use super::area::StagingArea;
use super::staging::{over_fd_budget, Staged};
use super::{Core, FsResult, Volume};
use crate::meta::{Batch, Ino, Kind};

/// Staged files up to this size are made durable by the journal.
pub(super) const JOURNAL_MAX: u64 = 64 << 10;

/// Bytes per journal record of file contents (a record is read back whole at replay).
const RECORD_BYTES: u64 = 4 << 20;

impl Volume {
    /// Takes the files written since the last sync, appends the small ones' bytes to the
    /// journal, and returns the others, to be synced on their own ([`Volume::sync_files`]).
    /// The journal's sync must follow. Reads come from the page cache: no disk wait here.
    pub(super) fn journal_small_files(&self) -> FsResult<Vec<Arc<Staged>>> {
        let taken = self.staging.take_unsynced();
        for st in &taken {
            // Cleared first: a write landing meanwhile queues the file again.
            st.unsynced.store(false, Ordering::Release);
        }
        self.journal_files(&taken).inspect_err(|_| self.requeue(&taken))
    }

    fn journal_files(&self, taken: &[Arc<Staged>]) -> FsResult<Vec<Arc<Staged>>> {
        let mut large = Vec::new();
        let mut batch = Batch::new();
        let mut in_batch = 0;
        // Each file's lock, held from the read of its bytes until the batch carrying them is in
        // the journal: a stable WRITE made durable on its own in between (see `alone_durable`:
        // the journal did not carry the file's bytes yet) would be undone by the older bytes
        // at a replay. A file a writer holds right now is synced on its own instead.
        let mut held = Vec::new();
        for st in taken {
            if st.is_retired() || !st.on_disk() {
                continue; // removed, or never written: nothing on disk to keep
            }
            let Ok(guard) = st.lock.try_write() else {
                large.push(st.clone());
                continue;
            };
            if st.size() > JOURNAL_MAX {
                large.push(st.clone());
                continue;
            }
            // A write before this read is in it; one after it queued the file again, and the
            // next sync has it.
            let bytes = st.contents()?;
            in_batch += bytes.len() as u64;
            batch.put_bytes(st.ino, bytes);
            held.push(guard);
            if over_fd_budget() {
                st.close_fd(); // the syncer opens it by name
            }
            if in_batch >= RECORD_BYTES {
                self.meta.commit(std::mem::take(&mut batch))?;
                held.clear();
                in_batch = 0;
            }
        }
        self.meta.commit(batch)?;
        drop(held);
        Ok(large)
    }

    /// Syncs `files` on their own; for those whose bytes the journal carries, a drop record
    /// follows, synced before this returns.
    /// Whether a write into `st` made durable on its own (a stable WRITE, see
    /// [`Volume::write_stable`]) is all a COMMIT would need for it: by the rules above, the rest
    /// of what makes it found again after a power cut is already on disk. The caller
    /// holds `st.lock` shared (no truncation moves the file under the journal's size limit).
    pub(super) fn alone_durable(&self, st: &Staged) -> bool {
        st.size() > JOURNAL_MAX
            && st.on_disk()
            && !st.name_pending()
            && st.is_journalled()
            && !self.meta.carries_bytes(st.ino)
    }

    pub(super) fn sync_files(&self, files: Vec<Arc<Staged>>) -> FsResult<()> {
        self.sync_each(&files).inspect_err(|_| self.requeue(&files))
    }

    fn sync_each(&self, files: &[Arc<Staged>]) -> FsResult<()> {
        let mut drops = Batch::new();
        let mut new_names = false;
        for st in files {
            if st.is_retired() {
                continue;
            }
            st.sync()?;
            new_names |= st.take_new_name();
            if self.meta.carries_bytes(st.ino) {
                drops.drop_bytes(st.ino);
            }
            if over_fd_budget() {
                st.close_fd();
            }
        }
        if new_names {
            // The files' names too: a file created since the last sync, or a download renamed
            // into place, is otherwise not found again after a power cut, and its bytes with
            // it. One directory sync for the whole group, and none when no name is new (a
            // database's COMMITs of the same files).
            if let Err(e) = super::holes::sync_dir(self.staging.dir()) {
                files.iter().for_each(|st| st.new_name());
                return Err(e.into());
            }
        }
        if !drops.is_empty() {
            self.meta.commit(drops)?;
            self.meta.sync()?;
        }
        Ok(())
    }

    /// After a failed sync: the files it took wait for the next one (which the COMMIT that saw
    /// the failure, or the tick, will start), rather than being forgotten.
    fn requeue(&self, files: &[Arc<Staged>]) {
        for st in files {
            self.note_unsynced(st);
        }
    }
}

impl Core {
    /// At open, before staged files are taken up: puts back the bytes the journal carried into
    /// their staged files, and sets the syncer that the journal calls before it empties.
    pub(super) fn restore_journalled_bytes(&self) -> FsResult<()> {
        let dir = self.staging.dir().to_path_buf();
        self.meta
            .set_bytes_syncer(Box::new(move |inos| sync_by_name(&dir, inos)));
        let carried = self.meta.take_journalled_bytes();
        if carried.is_empty() {
            return Ok(());
        }
        let mut restored = 0;
        for (ino, bytes) in &carried {
            let path = self.staging.path(*ino);
            let waiting =
                matches!(self.meta.inode(*ino)?, Some(i) if i.kind == Kind::File) && self.meta.pending(*ino)?.is_some();
            if waiting {
                let mut f = File::create(&path)?;
                f.write_all(bytes)?;
                f.sync_data()?;
                restored += 1;
            } else {
                match std::fs::remove_file(&path) {
                    Err(e) if e.kind() != std::io::ErrorKind::NotFound => return Err(e.into()),
                    _ => {}
                }
            }
        }
        super::holes::sync_dir(self.staging.dir())?; // the names of the files created
        self.meta.checkpoint()?;
        tracing::info!(
            restored,
            carried = carried.len(),
            "restored small files from the journal"
        );
        Ok(())
    }
}

/// Syncs the staged files of `inos` found in `dir` (one removed or evicted since is skipped).
/// All are written out first and then waited for, so their writes overlap.
fn sync_by_name(dir: &std::path::Path, inos: &[Ino]) -> std::io::Result<()> {
    let mut files = Vec::with_capacity(inos.len());
    for ino in inos {
        let path = StagingArea::path_in(dir, *ino);
        match File::open(&path) {
            Ok(f) => files.push(f),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => return Err(e),
        }
    }
    for f in &files {
        // SAFETY: a plain system call on a descriptor this function owns; no memory is passed.
        unsafe { libc::sync_file_range(f.as_raw_fd(), 0, 0, libc::SYNC_FILE_RANGE_WRITE) };
    }
    for f in &files {
        f.sync_data()?;
    }
    if !files.is_empty() {
        // Their names too (see `sync_each`): the journal that carried their bytes is emptied
        // next.
        super::holes::sync_dir(dir)?;
    }
    Ok(())
}
