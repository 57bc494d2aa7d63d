//! The data path: WRITE and READ of file bytes, through the staged copy or the read cache (or
//! a copy staged for a random reader, see `random_reads.rs`).
//! File data never waits for the namespace lock.

use super::*;

impl Volume {
    pub async fn write(&self, cred: &Cred, ino: Ino, offset: u64, data: &[u8]) -> FsResult<Attr> {
        self.write_bytes(cred, ino, offset, data).await?;
        Ok(self.attr_of(&self.inode(ino)?))
    }

    /// [`Volume::write`] without the attributes: for a stable WRITE, whose COMMIT reads them.
    pub async fn write_bytes(&self, cred: &Cred, ino: Ino, offset: u64, data: &[u8]) -> FsResult<()> {
        self.write_staged(cred, ino, offset, data, false).await.map(drop)
    }

    /// Writes into the staged copy. With `durably`, a write that needs nothing else made
    /// durable goes to disk on its own (see [`Volume::write_stable`]); returns whether it did.
    pub(super) async fn write_staged(
        &self,
        cred: &Cred,
        ino: Ino,
        offset: u64,
        data: &[u8],
        durably: bool,
    ) -> FsResult<bool> {
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
            // Holes the write touches are filled first; a write past the end also fills the
            // old last part, which the file's growth takes out of the base's range.
            let end = offset.saturating_add(data.len() as u64);
            let from = if end > st.size() {
                offset.min(st.size().saturating_sub(1))
            } else {
                offset
            };
            if !self.fill_for_client(&st, from..end).await? {
                continue; // dropped under us: look again
            }
            let direct;
            {
                let _r = st.lock.read().await;
                if st.is_retired() {
                    continue; // removed or evicted under us: look again
                }
                let growth = offset.saturating_add(data.len() as u64).saturating_sub(st.size());
                self.usage.check_growth(growth).map_err(FsError::NoSpace)?;
                direct = durably && self.alone_durable(&st);
                let written = if direct {
                    st.write_at_durably(offset, data)
                } else {
                    st.write_at(offset, data)
                };
                match written {
                    Err(_) if st.is_retired() => continue, // dropped under us: look again
                    r => r?,
                }
                if st.is_retired() {
                    continue; // dropped while written: the bytes went with it; again on the new copy
                }
                self.usage.grew(growth);
            }
            if !direct {
                self.note_unsynced(&st);
            }
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
            return Ok(direct && !self.meta.unsynced());
        }
    }

    /// The bytes may be a slice of a cached chunk: no copy on the way to the reply.
    pub async fn read(&self, cred: &Cred, ino: Ino, offset: u64, count: u32) -> FsResult<(Bytes, bool)> {
        if !cred.is_root() {
            perm::check_io(cred, &self.inode(ino)?, perm::R)?;
        }
        // Another S3 client may replace the object between two reads: each read is of one
        // version, and the next takes up the new one (bounded, should it keep changing).
        let mut replaced = 0;
        loop {
            if let Some(st) = self.staged(ino) {
                let end = offset.saturating_add(count as u64);
                if !self.fill_for_client(&st, offset..end).await? {
                    continue; // dropped under us: look again
                }
                if !st.is_retired() {
                    match st.read_at(offset, count) {
                        Err(_) if st.is_retired() => continue, // dropped under us: look again
                        r => {
                            let (data, eof) = r?;
                            return Ok((data.into(), eof));
                        }
                    }
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
            self.stage_for_random_reader(ino, &remote);
            if offset == 0 && remote.size <= SMALL_OBJECT && !self.cache.has_small(ino, &remote.etag) {
                self.note_cold_open(&inode); // a reader going through a directory, perhaps
            }
            match self
                .cache
                .read(&self.store, ino, &remote, offset, count, self.tasks())
                .await
            {
                Err(FsError::NotFound) if replaced < 3 && self.take_up_current_version(ino, &remote).await? => {
                    replaced += 1
                }
                r => return r,
            }
        }
    }

    /// Whether [`Volume::sync_local`] has anything to do (the sync tick skips an idle volume
    /// without waking a blocking thread).
    pub fn needs_local_sync(&self) -> bool {
        self.meta.unsynced() || self.staging.has_unsynced()
    }

    /// Returns once [`Volume::needs_local_sync`] may say yes: the local syncer sleeps here while
    /// the volume is idle, instead of waking every tick to find nothing to do.
    pub async fn until_local_sync_needed(&self) {
        tokio::select! {
            _ = self.meta.until_unsynced() => {}
            _ = self.staging.until_unsynced() => {}
        }
    }

    /// Whether the usage count is due (see [`Volume::recount_usage_if_due`]).
    pub fn recount_due(&self) -> bool {
        self.usage.count_due()
    }

    /// Makes staged data and the journal durable against a reboot of the node.
    /// Only files written since the last call are synced: with thousands of staged files,
    /// syncing them all every tick would keep the disk busy doing nothing. Small ones go into
    /// the journal (see `bytes_in_journal.rs`), the others are fsync'd.
    pub fn sync_local(&self) -> FsResult<()> {
        let large = self.journal_small_files()?;
        self.meta.sync()?;
        self.sync_files(large)
    }

    /// A write by someone other than root revokes the set-user-ID and set-group-ID bits.
    pub(super) async fn kill_suid(&self, cred: &Cred, ino: Ino) -> FsResult<()> {
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
    pub(super) fn note_unsynced(&self, st: &Arc<Staged>) {
        self.staging.note_unsynced(st);
    }
}
