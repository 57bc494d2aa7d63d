//! What every part of a volume shares: its configuration, the store, the metadata database
//! and the namespace lock, the staging area, the numbers it hands out and its task owner. Each
//! is owned here once and reached by the parts through an `Arc<Core>`; the state each part
//! changes alone stays in that part ([`super::upload::Uploader`], [`super::Volume`]'s others).

use std::sync::{Arc, OnceLock, Weak};

use super::area::StagingArea;
use super::numbers::Numbers;
use super::staging::Staged;
use super::{FsError, FsResult, VolumeConfig};
use crate::meta::{Batch, Ino, Inode, Kind, MetaDb, ROOT_INO};
use crate::store::ObjectStore;
use crate::sync::LockExt;

/// A background job's answer, shared by those who wait for it (see [`Core::shared_job`]).
pub(crate) type SharedJob<T> = futures::future::Shared<futures::future::BoxFuture<'static, FsResult<T>>>;

pub struct Core {
    pub cfg: VolumeConfig,
    pub(crate) store: Arc<dyn ObjectStore>,
    pub(crate) meta: MetaDb,
    /// Serialises namespace changes (see the module docs of [`super`] for the lock order).
    pub(crate) ns: tokio::sync::Mutex<()>,
    /// Staged files, their downloads and fsync queue (see [`super::area`]).
    pub(crate) staging: StagingArea,
    /// Inode numbers and change sequences (see [`super::numbers`]).
    numbers: Numbers,
    /// Owner of the volume's background work (see [`crate::tasks`]).
    tasks: crate::tasks::Tasks,
    volume_id: u64,
    /// A handle on itself, for downloads into staging started from `&self` methods.
    pub(super) this: OnceLock<Weak<Core>>,
}

impl Core {
    pub(super) fn new(
        cfg: VolumeConfig,
        store: Arc<dyn ObjectStore>,
        meta: MetaDb,
        staging: StagingArea,
        numbers: Numbers,
        volume_id: u64,
    ) -> Arc<Core> {
        let core = Arc::new(Core {
            cfg,
            store,
            meta,
            ns: tokio::sync::Mutex::new(()),
            staging,
            numbers,
            tasks: crate::tasks::Tasks::new(),
            volume_id,
            this: OnceLock::new(),
        });
        let _ = core.this.set(Arc::downgrade(&core));
        core
    }

    pub(super) fn alloc_ino(&self, batch: &mut Batch) -> Ino {
        self.numbers.ino(batch)
    }

    /// Runs `f` in the background under the volume's task owner.
    pub(crate) fn spawn_background(
        &self,
        what: &'static str,
        f: impl std::future::Future<Output = ()> + Send + 'static,
    ) {
        self.tasks.spawn(what, f);
    }

    /// Runs `work` (given the volume) as a background job of its own, and returns its answer
    /// as a future any number of waiters share: a waiter that stops waiting (a client told to
    /// retry later) does not stop the job. `what` names it in the volume's tasks and errors.
    pub(crate) fn shared_job<T, F>(
        &self,
        what: &'static str,
        work: impl FnOnce(Arc<Core>) -> F,
    ) -> FsResult<SharedJob<T>>
    where
        T: Clone + Send + Sync + 'static,
        F: std::future::Future<Output = FsResult<T>> + Send + 'static,
    {
        use futures::FutureExt;
        let vol = self
            .this
            .get()
            .and_then(|w| w.upgrade())
            .ok_or_else(|| FsError::Io("volume closing".into()))?;
        let (tx, rx) = tokio::sync::oneshot::channel();
        let work = work(vol.clone());
        vol.spawn_background(what, async move {
            let _ = tx.send(work.await);
        });
        Ok(async move {
            rx.await
                .unwrap_or_else(|_| Err(FsError::Io(format!("{what} ended without an answer"))))
        }
        .boxed()
        .shared())
    }

    /// The owner of the volume's background work: the gateway starts its loops there and stops
    /// them all through it.
    pub fn tasks(&self) -> &crate::tasks::Tasks {
        &self.tasks
    }

    pub fn volume_id(&self) -> u64 {
        self.volume_id
    }

    pub(crate) fn next_seq(&self) -> u64 {
        self.numbers.seq()
    }

    pub(crate) fn staged(&self, ino: Ino) -> Option<Arc<Staged>> {
        self.staging.get(ino)
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

    /// Queues deletion of whatever S3 holds for an inode that leaves the namespace.
    pub(crate) fn queue_remote_delete(&self, batch: &mut Batch, inode: &Inode) {
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

    pub(crate) fn drop_staged(&self, ino: Ino) {
        self.staging.drop_file(ino);
    }

    /// Keeps at most `max_staged_files` staged copies, and, with `by_bytes` (a large file has
    /// become clean, or a copy is made for a random reader), at most `max_staged_clean_bytes` of
    /// copies S3 already holds: the least recently written of those are dropped (their disk
    /// space and file descriptors freed). Recent ones stay, so a file written again soon, or
    /// while S3 is unreachable, needs no download.
    pub(crate) fn trim_staged(&self, by_bytes: bool) {
        let excess = self
            .staging
            .excess_clean(self.cfg.max_staged_files, self.cfg.max_staged_clean_bytes, by_bytes);
        // The records that made them clean (their uploads) on disk first: after a power cut
        // that kept a removal and lost those records, a file would come back waiting for an
        // upload with no copy to upload from, and its object be replaced by an empty one.
        if !excess.is_empty() {
            if let Err(e) = self.meta.sync() {
                tracing::warn!(error = %e, "cannot sync the journal; staged copies kept");
                return;
            }
        }
        for st in excess {
            // Writers hold the lock shared: one busy right now keeps its copy.
            if let Ok(_w) = st.lock.try_write() {
                if st.is_clean() {
                    self.drop_staged(st.ino);
                }
            }
        }
    }

    /// Picks up staged files left by the previous run.
    pub(super) fn restore_staged(&self) -> FsResult<()> {
        self.restore_journalled_bytes()?;
        let mut restored = 0;
        let dir = self.staging.shared_dir();
        let mut sidecars = Vec::new();
        for entry in std::fs::read_dir(&dir)? {
            let entry = entry?;
            let name = entry.file_name();
            if let Some(ino) = name.to_str().and_then(super::holes::sidecar_ino) {
                sidecars.push(ino); // read with its copy
                continue;
            }
            // Only the names `StagingArea::path` gives (a staged file's path is computed from
            // its inode number, so "012" would not be found again as 12).
            let Some(ino) = name
                .to_str()
                .and_then(|n| n.parse::<Ino>().ok().filter(|i| i.to_string() == n))
            else {
                // Leftover temporary download: never acknowledged to anyone.
                let _ = std::fs::remove_file(entry.path());
                continue;
            };
            let Some(inode) = self.meta.inode(ino)? else {
                let _ = std::fs::remove_file(entry.path());
                continue;
            };
            let pending = self.meta.pending(ino)?.is_some();
            if !pending {
                // Nothing of it to upload: S3 has every byte, and the next write fetches them
                // again. Nor is it to be trusted as a copy of S3's: the clearing of its `P`
                // record and its own last writes reach the disk in separate syncs, so after a
                // power cut its bytes may be older than S3's, or zeros. A copy whose bytes
                // differ from S3 is always pending: `P` is journalled before a write is
                // answered, and stays until those bytes are uploaded.
                let _ = std::fs::remove_file(entry.path());
                super::holes::remove_sidecar(&dir, ino);
                continue;
            }
            let holes = super::holes::read_sidecar(&dir, ino, self.cfg.part_size)?;
            let st = Staged::open(ino, dir.clone(), false, &self.cfg)?;
            if let Some((base, missing)) = holes {
                st.set_holes(&base, missing);
            }
            // Whatever is staged may be newer than S3: upload it again.
            st.changed();
            if st.mtime() < inode.mtime {
                *st.mtime.locked() = inode.mtime;
            }
            self.staging.insert(Arc::new(st));
            restored += 1;
        }
        // A sidecar outlives its copy only by a crash between their removals.
        for ino in sidecars {
            if self.staged(ino).is_none() {
                super::holes::remove_sidecar(&dir, ino);
            }
        }
        if restored > 0 {
            tracing::info!(restored, "restored staged files");
        }
        Ok(())
    }

    pub(super) async fn abort_orphan_uploads(&self) {
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
}
