//! Staged copies with holes: a write to a large file that is only in S3 fetches the parts it
//! touches, not the whole file. A 4 KiB write into a cold 10 GiB file, or a database changing
//! a page of a 1 GiB segment, waits for one part (16 MiB) instead of the file.
//!
//! The copy is created at the file's length with every part a hole. A hole is filled (its
//! bytes fetched from the base object, on the condition that it is still that version) before
//! anything reads or writes it; parts never touched stay holes, and an upload copies them from
//! the base server-side (UploadPartCopy), as it copies any part not written.
//!
//! Which parts are holes survives a crash: a sidecar file next to the copy lists them with the
//! base, and a part leaves the list only once its bytes are on disk. Writers wait for the fill,
//! so a part is never written while it is still listed: a crash at any point leaves holes that
//! are the base's bytes and parts that are the copy's.
//!
//! When the gateway itself replaces or moves the base (an upload of the copy completes, a
//! rename or an attribute change is copied server-side), the new object holds the holes' bytes
//! at the same offsets: the sidecar names it, durably, before the old object can go, and no
//! fill reads meanwhile (`Staged::move_base`, under `fill_lock`). Should another S3 client
//! replace or delete the base while the copy has holes, the copy can never be completed: the
//! other client's version stands, and the gateway's changes to the file since its copy was
//! made are lost (see [`Core::holes_lost`]).

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use super::staging::Staged;
use super::{Core, FsError, FsResult};
use crate::meta::{Ino, Remote};
use crate::sync::LockExt;

const MAGIC: &str = "s3nfs-holes 1";

/// A fill started for a client's request, shared by those that wait for it.
pub(crate) type FillJob = super::core::SharedJob<bool>;

pub(crate) fn sidecar_path(dir: &Path, ino: Ino) -> PathBuf {
    dir.join(format!("{ino}.holes"))
}

/// Whether `name` is a sidecar's, and of which inode.
pub(crate) fn sidecar_ino(name: &str) -> Option<Ino> {
    let n = name.strip_suffix(".holes")?;
    n.parse::<Ino>().ok().filter(|i| i.to_string() == n)
}

/// Writes the sidecar of `ino`'s copy durably (a new file renamed over the old, then the
/// directory synced), or removes it once no hole is left.
pub(crate) fn write_sidecar(
    dir: &Path,
    ino: Ino,
    base: &Remote,
    missing: &BTreeSet<i32>,
    part_size: u64,
) -> std::io::Result<()> {
    use std::io::Write;
    if missing.is_empty() {
        remove_sidecar(dir, ino);
        return Ok(());
    }
    let parts: Vec<String> = missing.iter().map(|p| p.to_string()).collect();
    // The key last: it is the only field that may hold a line break.
    let text = format!(
        "{MAGIC}\n{}\n{}\n{part_size}\n{}\n{}",
        base.etag,
        base.size,
        parts.join(" "),
        base.key
    );
    let tmp = dir.join(format!("{ino}.holes.new"));
    let mut f = std::fs::File::create(&tmp)?;
    f.write_all(text.as_bytes())?;
    f.sync_data()?;
    std::fs::rename(&tmp, sidecar_path(dir, ino))?;
    sync_dir(dir)
}

/// Makes renames in `dir` durable.
pub(crate) fn sync_dir(dir: &Path) -> std::io::Result<()> {
    std::fs::File::open(dir)?.sync_all()
}

pub(crate) fn remove_sidecar(dir: &Path, ino: Ino) {
    let _ = std::fs::remove_file(sidecar_path(dir, ino));
}

/// The base and holes a sidecar lists. An error for a sidecar that cannot be read, or that
/// numbers parts in another size than `part_size`: the copy's holes are then unknown, and taking
/// them for bytes would upload zeros.
pub(crate) fn read_sidecar(dir: &Path, ino: Ino, part_size: u64) -> std::io::Result<Option<(Remote, BTreeSet<i32>)>> {
    let text = match std::fs::read(sidecar_path(dir, ino)) {
        Ok(t) => t,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(e),
    };
    let bad = |what: &str| std::io::Error::other(format!("staged copy {ino}'s list of holes: {what}"));
    let text = String::from_utf8(text).map_err(|_| bad("not UTF-8"))?;
    let mut lines = text.splitn(6, '\n');
    let mut next = |what: &str| lines.next().ok_or_else(|| bad(what));
    if next("no header")? != MAGIC {
        return Err(bad("unknown format"));
    }
    let etag = next("no ETag")?.to_string();
    let size = next("no size")?.parse::<u64>().map_err(|_| bad("bad size"))?;
    let ps = next("no part size")?.parse::<u64>().map_err(|_| bad("bad part size"))?;
    if ps != part_size {
        return Err(bad(&format!("parts of {ps} bytes, and this gateway's are {part_size}")));
    }
    let missing = next("no parts")?
        .split(' ')
        .filter(|p| !p.is_empty())
        .map(|p| p.parse::<i32>().map_err(|_| bad("bad part number")))
        .collect::<std::io::Result<BTreeSet<i32>>>()?;
    let key = next("no key")?.to_string();
    Ok(Some((Remote { key, etag, size }, missing)))
}

impl Core {
    /// Creates `ino`'s staged copy of `base` with every part a hole: the file at its length,
    /// its sidecar written first (a copy found at a restart without one is taken as whole).
    pub(super) fn stage_with_holes(&self, ino: Ino, base: &Remote) -> FsResult<Arc<Staged>> {
        let parts = base.size.div_ceil(self.cfg.part_size) as i32;
        let missing: BTreeSet<i32> = (1..=parts).collect();
        let tmp = self.staging.download_path(ino);
        // Its length durable before it is in place: a copy restored shorter would be uploaded
        // shorter, its holes past the end forgotten.
        let f = std::fs::File::create(&tmp)?;
        f.set_len(base.size)?;
        f.sync_all()?;
        let dir = self.staging.shared_dir();
        write_sidecar(&dir, ino, base, &missing, self.cfg.part_size)?;
        std::fs::rename(&tmp, self.staging.path(ino))?;
        sync_dir(&dir)?;
        let st = Staged::open(ino, dir, false, &self.cfg)?;
        st.set_holes(base, missing);
        Ok(Arc::new(st))
    }

    /// Fills the holes among the parts that bytes `range` of `st` touch. The caller does not
    /// hold `st.lock`. An error with `st` retired: the copy was dropped meanwhile (its base
    /// replaced, see [`Core::holes_lost`]): look again.
    pub(crate) async fn fill(&self, st: &Arc<Staged>, range: std::ops::Range<u64>) -> FsResult<()> {
        if st.holes_in(range.clone()).is_none() {
            return Ok(());
        }
        let _f = st.fill_lock.lock().await;
        let Some((_, holes)) = st.holes_in(range) else {
            return Ok(()); // filled while we waited
        };
        let part = st.part_size();
        for p in holes {
            let start = (p as u64 - 1) * part;
            // Once more should the base be re-pointed meanwhile (a move or an upload of the
            // copy's own), bounded.
            let mut moved = 0;
            loop {
                let _r = st.lock.read().await;
                if st.is_retired() {
                    return Err(FsError::Stale);
                }
                let Some((base, _)) = st.holes_in(start..start + 1) else {
                    break; // not a hole any more
                };
                match self.fill_part(st, &base, start..(start + part).min(base.size)).await {
                    Err(FsError::NotFound) => {
                        let now = st.holes_in(start..start + 1).map(|(b, _)| b);
                        if now.as_ref().is_some_and(|b| *b != base) && moved < 3 {
                            moved += 1;
                            continue;
                        }
                        drop(_r);
                        return Err(self.holes_lost(st, &base).await);
                    }
                    r => r?,
                }
                st.filled(p)?;
                break;
            }
        }
        Ok(())
    }

    /// [`Core::fill`] for a caller that looks again when the copy is dropped meanwhile: false
    /// then.
    pub(crate) async fn fill_unless_dropped(&self, st: &Arc<Staged>, range: std::ops::Range<u64>) -> FsResult<bool> {
        match self.fill(st, range).await {
            Err(_) if st.is_retired() => Ok(false),
            r => r.map(|()| true),
        }
    }

    /// [`Core::fill_unless_dropped`] for a client's READ, WRITE or SETATTR, bounded by
    /// `stage_wait` as a download into staging is: past it the fill goes on in the background
    /// and the client is told to retry later (JUKEBOX), instead of its request (and its
    /// retransmissions) being held for as long as S3 takes. One fill runs per copy at a time:
    /// the retry, and any other request meanwhile, waits on the one under way.
    pub(crate) async fn fill_for_client(&self, st: &Arc<Staged>, range: std::ops::Range<u64>) -> FsResult<bool> {
        // On the volume's clock, as `stage`'s wait is.
        let deadline = self.cfg.clock.sleep(self.cfg.stage_wait);
        tokio::pin!(deadline);
        loop {
            if st.is_retired() {
                return Ok(false);
            }
            if st.holes_in(range.clone()).is_none() {
                return Ok(true);
            }
            let (job, ours) = {
                let mut slot = st.fill_job.locked();
                match slot.as_ref().filter(|j| j.peek().is_none()) {
                    Some(j) => (j.clone(), false),
                    None => {
                        let (s, r) = (st.clone(), range.clone());
                        let job: FillJob =
                            self.shared_job("hole fill", |v| async move { v.fill_unless_dropped(&s, r).await })?;
                        *slot = Some(job.clone());
                        (job, true)
                    }
                }
            };
            tokio::select! {
                r = job => match r {
                    Ok(true) => {} // look again: it may have filled another range
                    Ok(false) => return Ok(false),
                    Err(e) if ours => return Err(e),
                    Err(_) => {} // another request's fill failed: try ours
                },
                _ = &mut deadline => {
                    return Err(FsError::Retry("the file's part is still coming from S3".into()));
                }
            }
        }
    }

    /// Bytes `range` of `base` (a part) written into `st` in one GET, streamed to disk: a part
    /// costs one request, as an upload's part does, and memory holds a MiB of it at a time.
    /// [`FsError::NotFound`] when `base` is gone or another version now.
    async fn fill_part(&self, st: &Staged, base: &Remote, range: std::ops::Range<u64>) -> FsResult<()> {
        let want = range.end - range.start;
        let got =
            super::versions::stream_version(&*self.store, base, range.clone(), &|at, bytes| st.fill_at(at, bytes))
                .await?;
        if got != want {
            return Err(FsError::Io(format!(
                "{} answered {got} bytes for bytes {}..{} of its version {}",
                base.key, range.start, range.end, base.etag
            )));
        }
        Ok(())
    }

    /// `st`'s base object, the only holder of its holes' bytes, was replaced or deleted by
    /// another S3 client: the copy cannot be completed, and uploading it would put zeros where
    /// the holes are. The other client's version stands (as when it replaces a file the gateway
    /// has not changed): the copy is dropped, with the gateway's changes to the file since it
    /// was made, and the file takes up what S3 holds now. Returns the error for the caller,
    /// with `st` retired.
    pub(crate) async fn holes_lost(&self, st: &Arc<Staged>, base: &Remote) -> FsError {
        let ino = st.ino;
        let ours = self.staged(ino).is_some_and(|s| Arc::ptr_eq(&s, st));
        if ours {
            if st.is_dirty() {
                tracing::error!(
                    ino,
                    key = %base.key,
                    "another S3 client replaced or deleted the file's object while the gateway held only part of it; \
                     the gateway's changes to the file since it was fetched are lost, and the object in S3 stands"
                );
            } else {
                tracing::info!(ino, key = %base.key, "the object was replaced in S3; its new version is the file's content now");
            }
            self.drop_staged(ino);
            // A multipart upload of the copy will never be completed.
            let upload = st.multipart.locked().take();
            if let Some(m) = upload {
                if let Err(e) = self.store.abort_multipart(&m.key, &m.upload_id).await {
                    tracing::warn!(key = %m.key, error = %e, "could not abort a multipart upload; the next start retries");
                } else {
                    let mut b = crate::meta::Batch::new();
                    b.clear_upload(ino);
                    if let Err(e) = self.meta.commit(b) {
                        tracing::warn!(ino, error = %e, "could not record an aborted upload");
                    }
                }
            }
            if let Err(e) = self.take_up_current_version(ino, base).await {
                tracing::warn!(ino, error = %e, "could not take up the object's new version; the next listing will");
            }
        }
        FsError::Stale
    }
}
