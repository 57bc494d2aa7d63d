//! The staging area: the volume's staged files (local copies of files being written or read
//! for writing, see [`Staged`]), the downloads bringing files into it, and the files written
//! since the last local fsync. It alone changes these sets; a staged file's own state changes
//! through [`Staged`]'s named transitions.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Instant;

use super::staging::{Staged, StagingJob};
use crate::meta::Ino;
use crate::sync::LockExt;

pub struct StagingArea {
    dir: Arc<Path>,
    files: Mutex<HashMap<Ino, Arc<Staged>>>,
    /// Files being brought from S3 into the area now, one job per file (see `staging.rs`).
    jobs: Mutex<HashMap<Ino, StagingJob>>,
    /// Staged files written since the last local fsync.
    unsynced: Mutex<Vec<Arc<Staged>>>,
    /// Rung when that queue gets its first file, for the local syncer waiting for one.
    queued: crate::sync::Bell,
}

impl StagingArea {
    /// The area in `dir`, created if needed. Files left there are not taken up until
    /// [`StagingArea::insert`]: the volume decides which to restore.
    pub fn open(dir: PathBuf) -> std::io::Result<StagingArea> {
        std::fs::create_dir_all(&dir)?;
        Ok(StagingArea {
            dir: dir.into(),
            files: Default::default(),
            jobs: Default::default(),
            unsynced: Default::default(),
            queued: Default::default(),
        })
    }

    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// Bytes an unprivileged writer may still put on the directory's file system, if known.
    pub fn disk_free(&self) -> Option<u64> {
        use std::os::unix::ffi::OsStrExt;
        let path = std::ffi::CString::new(self.dir.as_os_str().as_bytes()).ok()?;
        // SAFETY: `statvfs` only writes into the struct, all of whose fields may be zero.
        let mut st: libc::statvfs = unsafe { std::mem::zeroed() };
        // SAFETY: a NUL-terminated path and a struct of the right type, both outliving the call.
        if unsafe { libc::statvfs(path.as_ptr(), &mut st) } != 0 {
            return None;
        }
        Some((st.f_bavail as u64).saturating_mul(st.f_frsize as u64))
    }

    /// The directory, for a [`Staged`] to keep.
    pub fn shared_dir(&self) -> Arc<Path> {
        self.dir.clone()
    }

    /// Where inode `ino`'s copy lives.
    pub fn path(&self, ino: Ino) -> PathBuf {
        Self::path_in(&self.dir, ino)
    }

    /// Where inode `ino`'s copy lives in an area in `dir`.
    pub fn path_in(dir: &Path, ino: Ino) -> PathBuf {
        dir.join(ino.to_string())
    }

    /// Where a download of `ino` is written before it is renamed into place (a name that
    /// `restore` recognises as never acknowledged).
    pub fn download_path(&self, ino: Ino) -> PathBuf {
        self.dir.join(format!("{ino}.download"))
    }

    pub fn get(&self, ino: Ino) -> Option<Arc<Staged>> {
        self.files.locked().get(&ino).cloned()
    }

    pub fn insert(&self, st: Arc<Staged>) {
        self.files.locked().insert(st.ino, st);
    }

    /// Drops `ino`'s copy: retired (writers holding it see so) and its file removed.
    pub fn drop_file(&self, ino: Ino) {
        if let Some(st) = self.files.locked().remove(&ino) {
            st.retire();
            // The copy before its list of holes: a crash in between leaves the list alone,
            // which a restart removes, never the copy without it (taken for whole).
            let _ = std::fs::remove_file(st.path());
            st.discard_holes();
        }
    }

    /// Every staged file now.
    pub fn snapshot(&self) -> HashMap<Ino, Arc<Staged>> {
        self.files.locked().clone()
    }

    /// With more than `max` files (and some slack, so that the sort runs once per many
    /// uploads), the clean ones beyond `max`, least recently written first. With `by_bytes`,
    /// also as many more of the least recently written clean ones as take the clean copies'
    /// total under `max_bytes` (a pass over every file: the caller asks for it only when a
    /// large file has just become clean).
    pub fn excess_clean(&self, max: usize, max_bytes: u64, by_bytes: bool) -> Vec<Arc<Staged>> {
        let (mut clean, by_count): (Vec<(Instant, Arc<Staged>)>, usize) = {
            let files = self.files.locked();
            let by_count = if files.len() > max + max / 8 {
                files.len() - max
            } else {
                0
            };
            if by_count == 0 && !by_bytes {
                return Vec::new();
            }
            let clean = files
                .values()
                .filter(|st| st.is_clean())
                .map(|st| (*st.last_write.locked(), st.clone()))
                .collect();
            (clean, by_count)
        };
        clean.sort_by_key(|c| c.0);
        let mut bytes: u64 = clean.iter().map(|c| c.1.present_bytes()).sum();
        let mut n = 0;
        while n < clean.len() && (n < by_count || (by_bytes && bytes > max_bytes)) {
            bytes = bytes.saturating_sub(clean[n].1.present_bytes());
            n += 1;
        }
        clean.truncate(n);
        clean.into_iter().map(|c| c.1).collect()
    }

    /// Bytes of the staged files that S3 does not have yet, counted now (for operators: the
    /// uploader's own figure is its last round's).
    pub fn dirty_bytes(&self) -> u64 {
        self.files
            .locked()
            .values()
            .filter(|st| st.is_dirty())
            .map(|st| st.present_bytes())
            .sum()
    }

    /// The downloads under way (`staging.rs` starts and ends them under this lock).
    pub(super) fn jobs(&self) -> MutexGuard<'_, HashMap<Ino, StagingJob>> {
        self.jobs.locked()
    }

    /// Queues `st` for the next local fsync.
    pub fn note_unsynced(&self, st: &Arc<Staged>) {
        if !st.unsynced.swap(true, std::sync::atomic::Ordering::AcqRel) {
            let mut q = self.unsynced.locked();
            q.push(st.clone());
            if q.len() == 1 {
                self.queued.ring();
            }
        }
    }

    /// Returns once a staged file waits for a local fsync (at once if one does). For one
    /// waiter: the local syncer.
    pub async fn until_unsynced(&self) {
        self.queued.until(|| self.has_unsynced()).await
    }

    pub fn has_unsynced(&self) -> bool {
        !self.unsynced.locked().is_empty()
    }

    /// The files to fsync now; the queue starts again empty.
    pub fn take_unsynced(&self) -> Vec<Arc<Staged>> {
        std::mem::take(&mut *self.unsynced.locked())
    }
}
