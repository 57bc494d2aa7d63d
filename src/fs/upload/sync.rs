//! Bringing one inode's pending work to S3: a file's or a link's
//! upload, a server-side move by CopyObject, and recording the result in the journal only if
//! nothing changed while the request was in flight.

use std::sync::atomic::Ordering;
use std::sync::Arc;

use bytes::Bytes;
use tracing::Instrument;

use super::{KeyGuard, Synced};
use crate::fs::names::user_meta;
use crate::fs::staging::Staged;
use crate::fs::{FsError, FsResult};
use crate::meta::{Batch, Ino, Inode, Kind, Remote, ROOT_INO};
use crate::store::{Body, StoreError};

/// A staged file this large, once clean, has the staged copies checked against their byte bound.
const LARGE_STAGED: u64 = 1 << 20;

impl super::Uploader {
    pub(super) async fn sync_inode(self: &Arc<Self>, ino: Ino) -> FsResult<()> {
        let _one_at_a_time = self.sync_lock(ino).await;
        // Read under the lock: another sync may have run while this one waited.
        let Some(seq) = self.meta.pending(ino)? else {
            return Ok(());
        };
        let Some(inode) = self.meta.inode(ino)? else {
            let mut b = Batch::new();
            b.clear_pending(ino);
            return Ok(self.meta.commit(b)?);
        };
        if ino == ROOT_INO {
            return self.record(ino, seq, None, None).await;
        }
        if let Kind::Link(file) = inode.kind {
            return self.sync_link(inode, file, seq).await;
        }
        let key = self.key_of(&inode)?;
        // Outside the key's lock first: a mover's bytes may take long to fetch, and the key
        // (whose deletions wait for it) is not held meanwhile. `lock_to_write` checks again.
        self.protect_movers(&key, ino).await?;
        let meta = user_meta(&inode);
        let _writing = self.ledger.writing_guard(&key);
        let span = tracing::info_span!("sync_inode", ino, key = %key);
        crate::telemetry::link_causes(&span, self.volume_id(), ino, true);
        // The staged copy an upload was made from: `record` judges that one, not a copy made
        // since.
        let mut sent_from: Option<Arc<Staged>> = None;
        let synced = async {
            match inode.kind {
                Kind::Dir | Kind::Fifo | Kind::Socket | Kind::CharDev(_) | Kind::BlockDev(_) => {
                    self.put_small(ino, &key, Bytes::new(), &meta).await
                }
                Kind::Link(_) => unreachable!("handled by sync_link"),
                Kind::Symlink => {
                    self.put_small(ino, &key, Bytes::from(inode.target.clone()), &meta)
                        .await
                }
                Kind::File => match self.staged(ino) {
                    Some(st) if st.is_dirty() => {
                        sent_from = Some(st.clone());
                        match self.upload_staged(&st, &inode, &key, &meta).await {
                            // Dropped meanwhile (removed, or its holes lost, see `holes.rs`):
                            // the next round looks again.
                            Err(_) if st.is_retired() => {
                                self.failed_write(ino, &inode, &key).await?;
                                Ok(None)
                            }
                            r => r,
                        }
                    }
                    before => match &inode.remote {
                        Some(r) => {
                            let Some(k) = self.lock_to_write(ino, &key).await? else {
                                return Ok(None);
                            };
                            // No fill of the staged copy reads the object while the copy
                            // replaces it (onto itself) or until `move_base`.
                            let _f = match &before {
                                Some(st) => Some(st.fill_lock.lock().await),
                                None => None,
                            };
                            match (
                                self.copy_known_version(ino, r.clone(), k, &meta).await?,
                                self.staged(ino),
                            ) {
                                (Ok(moved), st) => {
                                    // A staged copy's unchanged parts (holes included) come
                                    // from the new object now, if they came from the version
                                    // copied (the inode's until `record`).
                                    if let Some(st) = st {
                                        let copied = self.meta.inode(ino)?.and_then(|i| i.remote);
                                        if let Some(src) = copied {
                                            st.move_base(Some(&src), &moved.remote)?;
                                        }
                                    }
                                    Ok(Some(moved))
                                }
                                // Another client deleted the object; the gateway still holds
                                // its bytes, and they go up from there.
                                (Err(_), Some(st)) => {
                                    if !st.drop_base() {
                                        // Only the deleted object held the holes' bytes.
                                        return Err(self.holes_lost(&st, r).await);
                                    }
                                    st.changed();
                                    // The upload takes the fill lock to complete a large one.
                                    drop(_f);
                                    self.upload_staged(&st, &inode, &key, &meta).await
                                }
                                (Err(gone), None) => {
                                    self.object_deleted_elsewhere(ino, Some(seq), &gone).await?;
                                    Ok(None)
                                }
                            }
                        }
                        None => self.put_small(ino, &key, Bytes::new(), &meta).await,
                    },
                },
            }
        }
        .instrument(span)
        .await;
        let synced = match synced {
            Ok(s) => s,
            Err(e) => {
                self.failed_write(ino, &inode, &key).await?;
                return Err(e);
            }
        };
        let Some(synced) = synced else { return Ok(()) };
        let st = self
            .staged(ino)
            .filter(|cur| sent_from.as_ref().is_none_or(|s| Arc::ptr_eq(s, cur)));
        self.record(ino, seq, Some(synced), st).await
    }

    /// A hard link's object: a copy of its file's, once the file itself is in S3 (until then
    /// the file's upload marks this name pending again when it is done).
    async fn sync_link(self: &Arc<Self>, entry: Inode, file: Ino, seq: u64) -> FsResult<()> {
        let Some(f) = self.meta.inode(file)? else {
            return self.record(entry.ino, seq, None, None).await;
        };
        let src = match &f.remote {
            Some(r) if self.meta.pending(file)?.is_none() => r.clone(),
            // Emptied when another client deleted its object (see `object_deleted_elsewhere`):
            // marked pending, it would be put back as an empty object, under every name.
            None if self.emptied(file)? => return self.link_without_object(entry.ino, seq).await,
            _ => {
                if self.meta.pending(file)?.is_none() {
                    let mut b = Batch::new();
                    b.mark_pending(file, self.next_seq());
                    self.meta.commit(b)?;
                }
                return self.record(entry.ino, seq, None, None).await;
            }
        };
        let key = self.key_of(&entry)?;
        let _writing = self.ledger.writing_guard(&key);
        let copied = {
            let Some(k) = self.lock_to_write(entry.ino, &key).await? else {
                return Ok(()); // renamed meanwhile: the next round copies to the new key
            };
            let _permit = self.uploads.acquire().await.expect("semaphore never closed");
            self.copy_known_version(file, src, k, &user_meta(&f)).await?
        };
        let synced = match copied {
            Ok(synced) => synced,
            // Another client deleted the file's object. Retrying the copy would keep this name
            // pending for ever.
            Err(gone) => {
                if let Some(st) = self.staged(file) {
                    // The gateway holds the file's bytes: they go up again under the file's
                    // own name, and its upload marks this name pending to copy them.
                    let _f = st.fill_lock.lock().await;
                    if !st.drop_base() {
                        return Err(self.holes_lost(&st, &gone).await);
                    }
                    st.changed();
                    let mut b = Batch::new();
                    b.mark_pending(file, self.next_seq());
                    self.meta.commit(b)?;
                    return self.record(entry.ino, seq, None, None).await;
                }
                // It holds none: the deletion wins, for every name of the file. The file is
                // emptied; the next listings, finding no object under its names, forget them.
                // (Or another of its names found so first.)
                if self.object_deleted_elsewhere(file, None, &gone).await? || self.emptied(file)? {
                    return self.link_without_object(entry.ino, seq).await;
                }
                return Err(FsError::Retry("the file's object is gone from S3".into()));
            }
        };
        self.record(entry.ino, seq, Some(synced), None).await
    }

    /// Whether `file` was emptied when another client deleted its object (see
    /// `object_deleted_elsewhere`): no object, nothing to upload, no bytes of its own.
    fn emptied(&self, file: Ino) -> FsResult<bool> {
        Ok(self.meta.inode(file)?.is_some_and(|f| f.remote.is_none())
            && self.meta.pending(file)?.is_none()
            && !self.staged(file).is_some_and(|st| st.is_dirty()))
    }

    /// A hard link's name whose file has no object any more (another client deleted it): the
    /// name has none either. An object it had (a copy of the deleted one) goes too, under
    /// whichever key it was copied to. Nothing changes if the name has new work meanwhile.
    async fn link_without_object(&self, link: Ino, seq: u64) -> FsResult<()> {
        let _g = self.ns.lock().await;
        let Some(mut inode) = self.meta.inode(link)? else {
            return Ok(());
        };
        if self.meta.pending(link)? != Some(seq) {
            return Ok(());
        }
        let mut b = Batch::new();
        self.queue_remote_delete(&mut b, &inode);
        if inode.remote.take().is_some() {
            b.put_inode(&inode);
        }
        b.clear_pending(link);
        self.meta.commit(b)?;
        Ok(())
    }

    /// `ino`'s object `r` copied server-side to `key` (a file moved, or a hard link's name),
    /// as the version the inode knows: another client's version found at `r.key` instead is
    /// taken up first, as a listing would (see `versions.rs`), and then copied with the size it
    /// has; an unconditional copy would carry their bytes under the old version's size.
    /// `Ok(Err(seen))`: the object, last known as `seen`, is gone from S3. `written` is the
    /// lock of the key copied to (see `lock_to_write`).
    async fn copy_known_version<'a>(
        &self,
        ino: Ino,
        mut r: Remote,
        written: KeyGuard<'a>,
        meta: &crate::store::UserMeta,
    ) -> FsResult<Result<Synced<'a>, Remote>> {
        for _ in 0..4 {
            let etag = Some(r.etag.as_str()).filter(|e| !e.is_empty());
            match self.store.copy(&r.key, etag, &written.key, meta).await {
                Ok(etag) => {
                    return Ok(Ok(Synced {
                        remote: Remote {
                            key: written.key.clone(),
                            etag,
                            size: r.size,
                        },
                        gen: None,
                        written,
                    }))
                }
                Err(StoreError::NotFound(_)) => {
                    if !self.take_up_current_version(ino, &r).await? {
                        return Ok(Err(r));
                    }
                    match self.meta.inode(ino)?.and_then(|i| i.remote) {
                        Some(now) if now.key == r.key => r = now,
                        // Emptied meanwhile: found gone by another of its names.
                        None => return Ok(Err(r)),
                        _ => break,
                    }
                }
                Err(e) => return Err(e.into()),
            }
        }
        Err(FsError::Retry(
            "the file kept changing while it was being copied".into(),
        ))
    }

    /// A write of `key` for `ino` (as `inode` was when its sync began) failed, and may have
    /// reached S3 all the same, only its reply lost. Unless the key is the inode's own object,
    /// it is remembered as maybe written, to be deleted should the inode settle elsewhere; for
    /// an inode removed meanwhile, whose records nothing reads any more, its deletion is queued
    /// now (spared, as every deletion is, if a live file holds the key by then).
    async fn failed_write(&self, ino: Ino, inode: &Inode, key: &str) -> FsResult<()> {
        if inode.remote.as_ref().is_some_and(|r| r.key == key) {
            return Ok(());
        }
        let _g = self.ns.lock().await;
        let mut b = Batch::new();
        if self.meta.inode(ino)?.is_some() {
            b.maybe_written(ino, key);
        } else {
            b.queue_delete(self.next_seq(), key);
        }
        self.meta.commit(b)?;
        Ok(())
    }

    /// The lock of `key` for `writer` to write it, held until the result is recorded (it goes
    /// in [`Synced`]). Every writer of a key checks under its lock, and `record` marks under it
    /// what the key holds (the writer's object, or a moved file's still to be copied on): a
    /// check made before a write that just landed is recorded would see none of it, and the
    /// write would replace bytes another file has still to copy.
    ///
    /// `None` when `key` is not the writer's any more (renamed since its sync looked): another
    /// name may hold it now, and the next sync writes the new key instead.
    pub(super) async fn lock_to_write(&self, writer: Ino, key: &str) -> FsResult<Option<KeyGuard<'_>>> {
        let k = self.key_lock(key).await;
        let still = {
            // Under the namespace lock: a rename is all done or not begun.
            let _g = self.ns.lock().await;
            match self.meta.inode(writer)? {
                Some(i) => self.key_of(&i).is_ok_and(|now| now == key),
                None => false,
            }
        };
        if !still {
            return Ok(None);
        }
        self.protect_movers(key, writer).await?;
        Ok(Some(k))
    }

    /// Before `writer` writes `key`: a file still to be moved away from `key` (renamed, or a
    /// name that took over from a removed one, and not yet copied) would copy whatever `writer`
    /// puts there instead of its own bytes. Its bytes are brought into staging first (from
    /// `key`, still untouched), so that it uploads them from there. This also breaks cycles of
    /// renames (a swap of two names) that no order of copies could carry out.
    async fn protect_movers(&self, key: &str, writer: Ino) -> FsResult<()> {
        for m in self.meta.movers(key)? {
            if m == writer {
                continue;
            }
            let needs_bytes = loop {
                let needs = match self.meta.inode(m)? {
                    Some(i) => i.kind == Kind::File && i.remote.as_ref().is_some_and(|r| r.key == key),
                    None => false,
                };
                if !needs {
                    break false;
                }
                let st = self.stage(m, false).await?;
                // Whole: holes would be copied from `key`, which is about to hold other bytes.
                if !self.fill_unless_dropped(&st, 0..st.size()).await? {
                    continue; // dropped meanwhile (the mover's own sync moved its object)
                }
                st.changed();
                break true;
            };
            let mut b = Batch::new();
            b.moved_from(key, m);
            // The mark on the key goes with the mover: the writer's takes its place, so that a
            // writer that gives the key up (removed or renamed before it writes) still has the
            // key's old object deleted, and no listing takes it for a new file meanwhile.
            b.maybe_written(writer, key);
            if needs_bytes {
                b.mark_pending(m, self.next_seq());
            }
            self.meta.commit(b)?;
            if needs_bytes {
                // On disk before the key is overwritten: after a power cut, the mover's bytes
                // and its pending mark must still be here, since S3 will no longer have them.
                if let Some(st) = self.staged(m) {
                    st.sync()?;
                    if st.take_new_name() {
                        if let Err(e) = crate::fs::holes::sync_dir(self.staging.dir()) {
                            st.new_name();
                            return Err(e.into());
                        }
                    }
                }
                self.meta.sync()?;
            }
        }
        Ok(())
    }

    /// Uploads one inode's pending work now (COMMIT of a volume with `--durability s3`).
    pub async fn flush_inode(self: &Arc<Self>, ino: Ino) -> FsResult<()> {
        // A write racing the upload leaves the inode pending under a new number: go again,
        // a bounded number of times.
        for _ in 0..8 {
            if self.meta.pending(ino)?.is_none() {
                return Ok(());
            }
            self.sync_inode(ino).await?;
        }
        Err(FsError::Retry(
            "the file kept changing while it was being committed".into(),
        ))
    }

    /// One PUT of `writer`'s object at `key`; `None` when `key` is not the writer's any more
    /// (see `lock_to_write`).
    pub(super) async fn put_small(
        &self,
        writer: Ino,
        key: &str,
        body: Bytes,
        meta: &crate::store::UserMeta,
    ) -> FsResult<Option<Synced<'_>>> {
        let Some(written) = self.lock_to_write(writer, key).await? else {
            return Ok(None);
        };
        let _permit = self.uploads.acquire().await.expect("semaphore never closed");
        let size = body.len() as u64;
        let etag = self.store.put(key, Body::Bytes(body), meta).await?;
        self.note_uploaded(size);
        Ok(Some(Synced {
            remote: Remote {
                key: key.to_string(),
                etag,
                size,
            },
            gen: None,
            written,
        }))
    }

    /// Records a finished sync: the remote location, and clears `P` if nothing changed meanwhile.
    /// Takes the staged file's lock before `ns` (the lock order).
    async fn record(&self, ino: Ino, seq: u64, synced: Option<Synced<'_>>, st: Option<Arc<Staged>>) -> FsResult<()> {
        let _w = match &st {
            Some(st) => Some(st.lock.write().await),
            None => None,
        };
        let _g = self.ns.lock().await;
        let mut b = Batch::new();
        let Some(mut inode) = self.meta.inode(ino)? else {
            // Removed while uploading: what we just wrote must go too.
            if let Some(s) = &synced {
                b.queue_delete(self.next_seq(), &s.remote.key);
            }
            b.clear_pending(ino);
            return Ok(self.meta.commit(b)?);
        };
        let mut clean = self.meta.pending(ino)? == Some(seq);
        // The written key's lock, let go once this record is in the journal.
        let mut written = None;
        if let Some(s) = synced {
            written = Some(s.written);
            if let Some(old) = &inode.remote {
                if old.key != s.remote.key {
                    // The object left behind goes with the round's other deletions, in one
                    // request (`deletes.rs`), and with this record: a crash cannot keep one
                    // and lose the other.
                    b.moved_from(&old.key, ino);
                    b.queue_delete(self.next_seq(), &old.key);
                }
            }
            // Keys that failed uploads may have written: only the one just written is ours.
            self.release_maybe_written(&mut b, ino, Some(&s.remote.key))?;
            match (&st, s.gen) {
                (Some(st), Some(gen)) => {
                    if st.uploaded(gen) {
                        inode.size = s.remote.size;
                        inode.mtime = st.mtime();
                        st.set_base(&s.remote);
                    } else {
                        clean = false;
                    }
                }
                // A server-side copy (a move, an attribute change) of a file written while it
                // ran: the write added no `P` (one stood), and its bytes are still to go up.
                (Some(st), None) if st.is_dirty() => clean = false,
                _ => {}
            }
            // Renamed again while the request ran (a to b in flight, then b to c): the object
            // just written is the file's until it moves on, and no listing may take it for a
            // new file meanwhile. Back at that key (c to b), the file has nowhere to move: a
            // mark left there would hide whatever S3 holds at the key from listings for good.
            match self.key_of(&inode) {
                Ok(now) if now != s.remote.key => b.moving_from(&s.remote.key, ino),
                Ok(_) => b.moved_from(&s.remote.key, ino),
                Err(_) => {}
            }
            inode.remote = Some(s.remote);
            inode.synced_epoch = self.epoch.fetch_add(1, Ordering::AcqRel) + 1;
            b.put_inode(&inode);
            // The file's other names copy what was just uploaded.
            if !matches!(inode.kind, Kind::Link(_) | Kind::Dir) {
                for l in self.meta.links(ino)? {
                    b.mark_pending(l, self.next_seq());
                }
            }
        }
        if clean {
            b.clear_pending(ino);
            if let Some(st) = &st {
                st.settled();
            }
        }
        self.meta.commit(b)?;
        drop(written);
        drop(_g);
        drop(_w);
        // Small files count against the byte bound too, but only a large one becoming clean
        // pays for the pass over every staged file that the bound takes.
        let large = clean && st.as_ref().is_some_and(|st| st.size() >= LARGE_STAGED);
        self.trim_staged(large);
        Ok(())
    }
}
