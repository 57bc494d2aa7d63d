//! What an acknowledged write survives: WRITE's `stable`, COMMIT, and the write verifier.
//!
//! The contract is NFS's own. A WRITE answered UNSTABLE is in the staged file but perhaps not
//! on disk; a COMMIT (the client's fsync or close) returns once everything written to the file
//! before it is on the gateway's disk (or, with [`Durability::S3`], in S3). The write verifier
//! is drawn anew each time a volume opens, so after a crash of the gateway the client sees it
//! change and sends again whatever it had not had committed.
//!
//! Concurrent COMMITs share one sync (group commit): a COMMIT waits for a sync that started
//! after it arrived, and whoever finds none running starts one.
//!
//! A sync runs on a blocking thread, unless the recent ones were fast (the state directory on
//! tmpfs, or a disk with power-loss protection): then it runs where the COMMIT is served. The
//! hand-off to a blocking thread and back costs more than such a sync (in the benchmark guest,
//! about 14 system calls, against 2 for the sync), and a FILE_SYNC WRITE of a small file pays
//! it every time. A slow sync moves the next ones back to a blocking thread. Inline syncs are
//! timed one in [`TIME_EVERY`] (two clock readings are two more system calls where a clock
//! reading is one): a disk that turns slow is noticed within that many syncs.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use crate::meta::{Ino, Kind};

use super::{Attr, Cred, FsError, FsResult, Volume};

/// What COMMIT waits for.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Durability {
    /// The gateway's disk (the staged file and the journal): survives a crash of the gateway
    /// and a reboot of the node, not the loss of the node's disk.
    #[default]
    Local,
    /// S3: the file's bytes are uploaded before COMMIT returns.
    S3,
}

impl std::str::FromStr for Durability {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "local" => Ok(Durability::Local),
            "s3" => Ok(Durability::S3),
            other => Err(format!("durability must be local or s3, not {other:?}")),
        }
    }
}

/// Group commit state.
pub(crate) struct SyncGroup {
    lock: tokio::sync::Mutex<()>,
    /// Syncs started so far; a COMMIT notes it on arrival.
    started: AtomicU64,
    /// The number of the last sync that finished.
    done: AtomicU64,
    /// Drawn at open: the write verifier.
    verifier: u64,
    /// How long recent syncs took (nanoseconds, a moving average); starts slow.
    recent_ns: AtomicU64,
    /// Inline syncs so far, to time one in [`TIME_EVERY`].
    inline_syncs: AtomicU64,
}

/// One inline sync in this many is timed.
const TIME_EVERY: u64 = 8;

/// Syncs that recently took less than this on average run without a hand-off.
const INLINE_SYNC: Duration = Duration::from_micros(200);

impl SyncGroup {
    pub(crate) fn new() -> SyncGroup {
        SyncGroup {
            lock: tokio::sync::Mutex::new(()),
            started: AtomicU64::new(0),
            done: AtomicU64::new(0),
            verifier: super::rand_u64(),
            recent_ns: AtomicU64::new(u64::MAX),
            inline_syncs: AtomicU64::new(0),
        }
    }
}

impl SyncGroup {
    /// Whether the next sync runs without a hand-off to a blocking thread.
    fn inline(&self) -> bool {
        self.recent_ns.load(Ordering::Relaxed) < INLINE_SYNC.as_nanos() as u64
    }

    /// Notes how long a sync took (the average of the last eight or so).
    fn record(&self, took: Duration) {
        let took = took.as_nanos().min(u64::MAX as u128 / 2) as u64;
        let avg = match self.recent_ns.load(Ordering::Relaxed) {
            u64::MAX => took,
            prev => prev - prev / 8 + took / 8,
        };
        self.recent_ns.store(avg, Ordering::Relaxed);
    }
}

impl Volume {
    /// The write verifier: the same for as long as the volume stays open, different after.
    pub fn write_verifier(&self) -> [u8; 8] {
        self.sync_group.verifier.to_be_bytes()
    }

    /// Makes everything written so far durable on the gateway's disk. Concurrent callers share
    /// one sync.
    pub async fn sync_durable(&self) -> FsResult<()> {
        self.sync_in_group(true).await
    }

    /// The local sync tick's [`Volume::sync_durable`]: in the group, so a COMMIT arriving
    /// meanwhile waits for it rather than answering before the files it took are on disk, but
    /// always on blocking threads and left out of the timing that decides where COMMITs sync.
    /// What it syncs is whatever was written in the last interval (megabytes, for a copy under
    /// way): held on an async worker, that would stall the requests queued behind it.
    pub async fn sync_tick(&self) -> FsResult<()> {
        self.sync_in_group(false).await
    }

    async fn sync_in_group(&self, from_commit: bool) -> FsResult<()> {
        let g = &self.sync_group;
        let arrived = g.started.load(Ordering::Acquire);
        let _l = g.lock.lock().await;
        if g.done.load(Ordering::Acquire) > arrived {
            return Ok(()); // a sync that started after we arrived has finished
        }
        let n = g.started.fetch_add(1, Ordering::AcqRel) + 1;
        let (r, took) = if from_commit && g.inline() {
            if g.inline_syncs
                .fetch_add(1, Ordering::Relaxed)
                .is_multiple_of(TIME_EVERY)
            {
                let start = crate::clock::stopwatch();
                (self.sync_local(), Some(start.elapsed()))
            } else {
                (self.sync_local(), None)
            }
        } else {
            let vol = self
                .this
                .get()
                .and_then(|w| w.upgrade())
                .ok_or_else(|| FsError::Io("volume closing".into()))?;
            let (r, took) = Self::sync_local_blocking(vol).await?;
            (r, from_commit.then_some(took))
        };
        if let Some(took) = took {
            g.record(took);
        }
        r?;
        g.done.store(n, Ordering::Release);
        Ok(())
    }

    /// [`Volume::sync_local`] with its waits on blocking threads, timed. Small files' bytes
    /// go into the journal first, where the COMMIT is served (page-cache reads and one append).
    /// Then the journal and the larger staged files are different files on the same disk, and
    /// a disk takes their flushes side by side: one after the other, a COMMIT would wait for two
    /// syncs. The order between those two never mattered: a crash may come between them either
    /// way, and COMMIT answers only once both are done.
    async fn sync_local_blocking(vol: Arc<Volume>) -> FsResult<(FsResult<()>, Duration)> {
        fn timed(f: impl FnOnce() -> FsResult<()>) -> (FsResult<()>, Duration) {
            let start = crate::clock::stopwatch();
            let r = f();
            (r, start.elapsed())
        }
        let failed = |e: tokio::task::JoinError| FsError::Io(format!("sync task failed: {e}"));
        let large = vol.journal_small_files()?;
        let (r, took) = if vol.meta.unsynced() && !large.is_empty() {
            let v = vol.clone();
            let journal = tokio::task::spawn_blocking(move || timed(|| Ok(v.meta.sync()?)));
            let staged = tokio::task::spawn_blocking(move || timed(|| vol.sync_files(large)));
            let (j, s) = tokio::join!(journal, staged);
            let ((jr, jt), (sr, st)) = (j.map_err(failed)?, s.map_err(failed)?);
            (jr.and(sr), jt.max(st))
        } else {
            tokio::task::spawn_blocking(move || {
                timed(|| {
                    vol.meta.sync()?;
                    vol.sync_files(large)
                })
            })
            .await
            .map_err(failed)?
        };
        Ok((r, took))
    }

    /// A stable WRITE (FILE_SYNC or DATA_SYNC, the kernel client's choice when an fsync has one
    /// WRITE to send: a database's log): durable on return, as a COMMIT after it would make it.
    ///
    /// With [`Durability::Local`], a write into a large staged file that is already known
    /// durably (its name, its pending mark in the journal, no bytes of it in the journal) needs
    /// only its own bytes on disk: one `pwritev2(RWF_DSYNC)`, instead of a write, the sync
    /// group and an `fdatasync` (in a guest where each system call is a trap, about a tenth of
    /// such a WRITE's cost). Anything else waiting to be synced goes through the group, as a
    /// COMMIT.
    pub async fn write_stable(self: &Arc<Self>, cred: &Cred, ino: Ino, offset: u64, data: &[u8]) -> FsResult<Attr> {
        let local = self.cfg.durability == Durability::Local;
        if self.write_staged(cred, ino, offset, data, local).await? {
            if let Some(st) = self.staged(ino) {
                st.note_commit();
            }
            return Ok(self.attr_of(&self.inode(ino)?));
        }
        self.commit(ino).await
    }

    /// COMMIT of a file: durable as the volume's [`Durability`] says; returns its attributes.
    /// With [`Durability::S3`], the upload and the local sync run side by side: the journal's
    /// sync keeps the file's name and attributes, the upload its bytes, and neither waits for
    /// the other (in turn, a small file's COMMIT would cost two syncs and a PUT, not one PUT).
    pub async fn commit(self: &Arc<Self>, ino: Ino) -> FsResult<Attr> {
        if let Some(st) = self.staged(ino) {
            st.note_commit();
        }
        if self.cfg.durability == Durability::S3 {
            // Boxed: the upload's state is large, and without the box every COMMIT and stable
            // WRITE (all of them with `local`) would carry it and copy it from layer to layer.
            let (synced, uploaded) = tokio::join!(self.sync_durable(), Box::pin(self.flush_inode(ino)));
            synced.and(uploaded)?;
        } else {
            self.sync_durable().await?;
        }
        Ok(self.attr_of(&self.inode(ino)?))
    }
}

/// How long a namespace change waits for S3 before it is answered from the journal: below
/// the kernel client's 60 s before it sends the call again, which would find the name moved.
const NS_WAIT: Duration = Duration::from_secs(20);

impl Volume {
    /// With [`Durability::S3`], a namespace change (RENAME, REMOVE, RMDIR, MKDIR, SYMLINK,
    /// MKNOD, LINK, a SETATTR of mode, owner or mtime) is answered once it is in S3, as RFC 1813
    /// asks of these operations and of stable storage: what the change left pending goes up
    /// (`first` one after the other, then `inos` side by side: a directory's moves), then every
    /// deletion queued so far. An inode gone or with nothing pending is passed over. A new owner of a ReadWriteMany volume starts from S3
    /// alone, and a change only in the old owner's journal was lost with its node.
    ///
    /// Not waited for, because they go up with the file's next COMMIT, name and bytes in one
    /// request, and a wait here would cost a second one (or a whole upload): CREATE; a file
    /// never uploaded; a file with bytes written and not yet uploaded. If S3 fails or takes
    /// longer than [`NS_WAIT`], the change is answered once journalled (logged): it is done,
    /// it goes up with the next rounds, and a client that took an error for a failure would
    /// send it again and find the name moved or gone. The one exception is a fenced gateway
    /// (its ReadWriteMany term is over and its journal is thrown away): the change is answered
    /// JUKEBOX, and the client sends it again, to the next owner.
    pub(crate) async fn in_s3(&self, first: &[Ino], inos: Vec<Ino>) -> FsResult<()> {
        if self.cfg.durability != Durability::S3 {
            return Ok(());
        }
        let r = tokio::select! {
            r = self.bring_to_s3(first, inos) => r,
            () = self.cfg.clock.sleep(NS_WAIT) => Err(FsError::Retry(format!("not in S3 within {NS_WAIT:?}"))),
        };
        match r {
            Ok(()) => Ok(()),
            Err(_) if self.store.fenced() => Err(FsError::Retry(
                "this gateway no longer owns the volume: the change is not kept".into(),
            )),
            Err(e) => {
                tracing::warn!(error = %e, "a namespace change is journalled but not yet in S3; it goes up with the next flush");
                Ok(())
            }
        }
    }

    async fn bring_to_s3(&self, first: &[Ino], inos: Vec<Ino>) -> FsResult<()> {
        use futures::StreamExt;
        // A hard link's file goes before the link, which copies from the file's object.
        for &i in first {
            if self.waits_for(i)? {
                self.flush_inode(i).await?;
            }
        }
        let mut waited = Vec::with_capacity(inos.len());
        for i in inos {
            if self.waits_for(i)? {
                waited.push(i);
            }
        }
        // A directory's moves side by side, as a round would send them.
        let results: Vec<FsResult<()>> = futures::stream::iter(waited.into_iter().map(|i| self.flush_inode(i)))
            .buffer_unordered(self.cfg.upload_concurrency)
            .collect()
            .await;
        results.into_iter().collect::<FsResult<()>>()?;
        self.flush_deletes().await
    }

    /// Whether a namespace change waits for `ino`'s pending work (see [`Volume::in_s3`]).
    fn waits_for(&self, ino: Ino) -> FsResult<bool> {
        if self.meta.pending(ino)?.is_none() {
            return Ok(false);
        }
        let Some(inode) = self.meta.inode(ino)? else {
            return Ok(false);
        };
        if inode.kind == Kind::File {
            if inode.remote.is_none() {
                return Ok(false);
            }
            if self.staged(ino).is_some_and(|st| st.is_dirty()) {
                return Ok(false);
            }
        }
        Ok(true)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn syncs_run_inline_only_while_recent_ones_were_fast() {
        let g = SyncGroup::new();
        assert!(!g.inline(), "before any sync, the disk is assumed slow");
        g.record(Duration::from_micros(30));
        assert!(g.inline(), "after a fast sync");
        g.record(Duration::from_millis(5));
        assert!(!g.inline(), "one slow sync sends the next ones to a blocking thread");
        let mut fast = 0;
        while !g.inline() {
            g.record(Duration::from_micros(30));
            fast += 1;
        }
        assert!((10..40).contains(&fast), "back inline after {fast} fast syncs");
    }

    /// The local syncer's wait (`until_local_sync_needed`) returns only once there is something
    /// to sync, a journal record or a write's bytes: an idle volume's syncer sleeps on no timer,
    /// and a write while it sleeps wakes it.
    #[tokio::test]
    async fn the_local_syncer_sleeps_until_a_namespace_change_or_a_write() {
        use crate::fs::{SetAttr, VolumeConfig};
        let dir = tempfile::tempdir().unwrap();
        let store: Arc<dyn crate::store::ObjectStore> =
            Arc::new(crate::store::local::LocalStore::open(&dir.path().join("s3")).unwrap());
        let vol = Volume::open(VolumeConfig::new(dir.path().join("state")), store)
            .await
            .unwrap();
        let root = Cred::root();
        vol.sync_local().unwrap();

        let mut wait = Box::pin(vol.until_local_sync_needed());
        assert!(
            futures::poll!(&mut wait).is_pending(),
            "nothing to sync, and the wait returned"
        );
        let ino = vol
            .create(&root, vol.root(), b"f", SetAttr::default(), true)
            .await
            .unwrap()
            .ino;
        assert!(
            futures::poll!(&mut wait).is_ready(),
            "a create (a journal record) did not wake it"
        );
        // A large file's write: its bytes go to the staged copy, not the journal.
        let big = vec![7u8; 1 << 20];
        vol.write(&root, ino, 0, &big).await.unwrap();
        vol.sync_local().unwrap();

        let mut wait = Box::pin(vol.until_local_sync_needed());
        assert!(futures::poll!(&mut wait).is_pending(), "synced, and the wait returned");
        vol.write(&root, ino, 4096, b"bytes").await.unwrap();
        assert!(futures::poll!(&mut wait).is_ready(), "a write did not wake it");
    }
}
