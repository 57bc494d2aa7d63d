//! Large files: the multipart upload of a staged file (parts copied server-side where the
//! object already holds them), and streaming a file to S3 while it is still being written.

use std::sync::Arc;

use bytes::Bytes;
use futures::StreamExt;
use tracing::Instrument;

use super::{Synced, WakeOnDrop};
use crate::fs::names::user_meta;
use crate::fs::staging::{Multipart, Staged};
use crate::fs::{FsError, FsResult};
use crate::meta::{Batch, Ino, Inode, Remote};
use crate::store::{Body, Part};
use crate::sync::LockExt;

impl super::Uploader {
    /// Uploads a staged file: one PUT of a consistent snapshot when small, else the multipart
    /// upload (continuing what streaming started). `None` when writes raced it: try next round.
    pub(super) async fn upload_staged(
        self: &Arc<Self>,
        st: &Arc<Staged>,
        inode: &Inode,
        key: &str,
        meta: &crate::store::UserMeta,
    ) -> FsResult<Option<Synced<'_>>> {
        if st.size() < self.cfg.part_size && st.multipart.locked().is_none() {
            let (bytes, gen) = {
                let _w = st.lock.write().await;
                let (bytes, _) = st.read_at(0, st.size() as u32)?;
                (Bytes::from(bytes), st.gen())
            };
            let s = self.put_small(inode.ino, key, bytes, meta).await?;
            return Ok(s.map(|s| Synced { gen: Some(gen), ..s }));
        }
        // Large: bring every part up to date, then complete with writers held off.
        for _round in 0..3 {
            self.upload_parts(st, key, meta, true).await?;
            // Parts a streaming pass started are still on their way: wait for them.
            loop {
                let done = st.part_done.notified();
                if st.multipart.locked().as_ref().is_none_or(|m| m.in_flight.is_empty()) {
                    break;
                }
                done.await;
            }
            // Writers are held off only while the part list is taken: every part in S3 then
            // holds the file's bytes as of `gen`, so completing them yields that version whatever
            // is written meanwhile (a later write leaves the file dirty, see `record`). No writer
            // waits for the CompleteMultipartUpload itself.
            let w = st.lock.write().await;
            let size = st.size();
            let n = size.div_ceil(self.cfg.part_size).max(1) as i32;
            let (upload_id, mkey, parts) = {
                let mut m = st.multipart.locked();
                let Some(m) = m.as_mut() else { continue };
                let mut parts = Vec::new();
                for p in 1..=n {
                    match m.done.get(&p) {
                        Some((etag, len)) if *len == self.part_len(size, p) => parts.push(Part {
                            number: p,
                            etag: etag.clone(),
                        }),
                        _ => break,
                    }
                }
                (m.upload_id.clone(), m.key.clone(), parts)
            };
            if parts.len() != n as usize {
                continue; // written to meanwhile
            }
            let gen = st.gen();
            // However this ends (an error, a cancelled flush), streaming passes send parts
            // again afterwards; once completed, the upload is gone and this does nothing.
            let _completing = Completing::start(st);
            drop(w);
            let Some(written) = self.lock_to_write(st.ino, &mkey).await? else {
                return Ok(None); // moved: the next upload starts over at the new key
            };
            // No fill reads the base between its replacement by this upload and `move_base`.
            let _f = st.fill_lock.lock().await;
            let completed = self.store.complete_multipart(&mkey, &upload_id, &parts).await;
            let etag = match completed {
                Ok(etag) => etag,
                // The upload is gone: maybe our own earlier CompleteMultipartUpload succeeded and
                // only its reply was lost (S3 then answers NoSuchUpload). The object says so by
                // its ETag, which S3 derives from the parts' ETags.
                Err(crate::store::StoreError::NotFound(_)) => {
                    let head = self.store.head(&mkey).await?;
                    match head.filter(|h| h.size == size && h.etag == crate::store::multipart_etag(&parts)) {
                        Some(h) => h.etag,
                        None => {
                            // Not ours: start over with a new upload.
                            *st.multipart.locked() = None;
                            let mut b = Batch::new();
                            b.clear_upload(st.ino);
                            self.meta.commit(b)?;
                            return Err(FsError::Retry(format!(
                                "multipart upload of {mkey} vanished; starting again"
                            )));
                        }
                    }
                }
                Err(e) => return Err(e.into()),
            };
            // Before the upload goes: a streaming pass must not start another one for the bytes
            // that were just completed.
            st.note_completed(gen);
            *st.multipart.locked() = None;
            let mut b = Batch::new();
            b.clear_upload(st.ino);
            self.meta.commit(b)?;
            let remote = Remote { key: mkey, etag, size };
            // The new object replaced the base (or is about to, after a move): what was copied
            // from the base comes from it now, written to meanwhile or not.
            st.move_base(None, &remote)?;
            return Ok(Some(Synced {
                remote,
                gen: Some(gen),
                written,
            }));
        }
        Ok(None)
    }

    /// One part of a multipart upload: copied server-side from the object that holds its bytes
    /// already (see `Staged::copy_source`), else sent from the staged copy. A copy refused
    /// because that object is gone or was replaced sends the part instead, unless the part is a
    /// hole in the copy (see `holes.rs`): then the copy is lost.
    async fn send_part(
        &self,
        st: &Arc<Staged>,
        key: &str,
        upload_id: &str,
        p: i32,
        range: std::ops::Range<u64>,
    ) -> crate::store::StoreResult<String> {
        if let Some((src, etag)) = st.copy_source(p, &range) {
            match self
                .store
                .upload_part_copy(key, upload_id, p, &src, &etag, range.clone())
                .await
            {
                Err(crate::store::StoreError::NotFound(m)) => {
                    // Kept while the copy has holes; a part that is not one is sent from here.
                    if !st.drop_base() {
                        // (The range is part `p`'s alone.)
                        if let Some((base, _)) = st.holes_in(range.clone()) {
                            self.holes_lost(st, &base).await;
                            return Err(crate::store::StoreError::NotFound(m));
                        }
                    }
                }
                r => return r,
            }
        }
        if st.is_hole(p) {
            // Its bytes are not in the copy, and no copy from the base fits (never the case: a
            // write past the end fills the old last part). Never send the hole's zeros.
            return Err(crate::store::StoreError::Io(format!(
                "part {p} of {key} is a hole in the staged copy, and cannot be copied from its base"
            )));
        }
        let body = Body::File {
            path: st.path(),
            offset: range.start,
            len: range.end - range.start,
        };
        self.store.upload_part(key, upload_id, p, body).await
    }

    fn part_len(&self, size: u64, p: i32) -> u64 {
        let start = (p as u64 - 1) * self.cfg.part_size;
        (size - start.min(size)).min(self.cfg.part_size)
    }

    /// Uploads parts not yet in S3: all of them when `all`, else only parts that writing has
    /// left behind (a full part with another part written after it).
    async fn upload_parts(
        self: &Arc<Self>,
        st: &Arc<Staged>,
        key: &str,
        meta: &crate::store::UserMeta,
        all: bool,
    ) -> FsResult<()> {
        // Start (or restart, if the file moved) the multipart upload.
        let init = st.multipart_init.lock().await;
        if st.is_retired() {
            // Dropped (removed, or its holes lost, see `holes.rs`): an upload started now would
            // never be completed. A streaming pass just stops; an upload looks again.
            return if all { Err(FsError::Stale) } else { Ok(()) };
        }
        let existing = st
            .multipart
            .locked()
            .as_ref()
            .map(|m| (m.key.clone(), m.upload_id.clone(), m.meta == *meta));
        if let Some((k, id, same_meta)) = &existing {
            // Moved, or its attributes changed (a chmod while it streamed): the object must
            // get the new ones, which only a new upload can give it.
            if (k != key || !same_meta) && all {
                let _ = self.store.abort_multipart(k, id).await;
                *st.multipart.locked() = None;
            }
        }
        if st.multipart.locked().is_none() {
            if !all && st.completed_since_write() {
                return Ok(()); // a streaming pass after the upload was completed: nothing new
            }
            let id = self.store.create_multipart(key, meta).await?;
            let mut b = Batch::new();
            b.set_upload(st.ino, key, &id);
            self.meta.commit(b)?;
            *st.multipart.locked() = Some(Box::new(Multipart {
                key: key.to_string(),
                upload_id: id,
                meta: meta.clone(),
                ..Default::default()
            }));
        }
        drop(init);
        let size = st.size();
        let n = size.div_ceil(self.cfg.part_size).max(1) as i32;
        let todo: Vec<i32> = {
            let mut m = st.multipart.locked();
            let Some(m) = m.as_mut() else {
                return Ok(()); // completed (or aborted) meanwhile
            };
            if m.completing {
                return Ok(()); // being completed: the next upload takes what is written now
            }
            (1..=n)
                .filter(|p| {
                    let fits = m
                        .done
                        .get(p)
                        .map(|(_, len)| *len == self.part_len(size, *p))
                        .unwrap_or(false);
                    let settled = all || (*p as u64) * self.cfg.part_size + self.cfg.part_size <= size;
                    !fits && !m.in_flight.contains(p) && settled
                })
                .collect::<Vec<_>>()
                .into_iter()
                .inspect(|p| {
                    m.in_flight.insert(*p);
                    m.dirtied.remove(p);
                })
                .collect()
        };
        let (mkey, upload_id) = {
            let m = st.multipart.locked();
            let Some(m) = m.as_ref() else { return Ok(()) };
            (m.key.clone(), m.upload_id.clone())
        };
        let results: Vec<FsResult<()>> = futures::stream::iter(todo.into_iter().map(|p| {
            let mkey = mkey.clone();
            let upload_id = upload_id.clone();
            async move {
                let _permit = self.uploads.acquire().await.expect("semaphore never closed");
                let offset = (p as u64 - 1) * self.cfg.part_size;
                let len = self.part_len(size, p);
                let r = self.send_part(st, &mkey, &upload_id, p, offset..offset + len).await;
                let _wake = WakeOnDrop(&st.part_done);
                let mut m = st.multipart.locked();
                let Some(m) = m.as_mut() else { return Ok(()) };
                m.in_flight.remove(&p);
                let etag = r?;
                self.note_uploaded(len);
                if !m.dirtied.remove(&p) && m.upload_id == upload_id {
                    m.done.insert(p, (etag, len));
                }
                Ok(())
            }
        }))
        .buffer_unordered(self.cfg.upload_concurrency)
        .collect()
        .await;
        results.into_iter().collect()
    }

    /// Starts streaming uploads for files being written past two parts.
    pub(super) fn start_streams(self: &Arc<Self>) {
        let wanted: Vec<Ino> = self.stream_wanted.locked().drain().collect();
        for ino in wanted {
            if !self.streaming.locked().insert(ino) {
                continue;
            }
            let vol = self.clone();
            let span = tracing::info_span!(parent: None, "stream_upload", ino);
            crate::telemetry::link_causes(&span, self.volume_id(), ino, false);
            self.spawn_background(
                "streaming upload",
                async move {
                    let r = vol.stream_file(ino).await;
                    vol.streaming.locked().remove(&ino);
                    match r {
                        // Yielded to busy clients: a round after they pause takes it up again.
                        Ok(true) => {
                            vol.stream_wanted.locked().insert(ino);
                        }
                        Ok(false) => {}
                        Err(e) => {
                            tracing::warn!(ino, error = %e, "streaming upload paused; the file is uploaded when idle")
                        }
                    }
                    vol.kick();
                }
                .instrument(span),
            );
        }
    }

    /// Keeps parts flowing to S3 while a large file is written: each pass starts the parts the
    /// writer has left behind without waiting for earlier ones (the upload semaphore bounds how
    /// many are in flight), so the pipeline never drains between batches.
    ///
    /// Returns whether it stopped to yield to busy clients (see `VolumeConfig::stream_while_busy`).
    async fn stream_file(self: &Arc<Self>, ino: Ino) -> FsResult<bool> {
        // Passes run as tasks of their own (each hashes and sends its parts on whichever CPU
        // is free), owned by this call: cancelled with it, awaited before it returns.
        let mut passes: tokio::task::JoinSet<FsResult<()>> = tokio::task::JoinSet::new();
        let mut failed = None;
        let mut yielded = false;
        loop {
            if !self.cfg.stream_while_busy && self.defers_background() {
                yielded = true;
                break;
            }
            let Some(st) = self.staged(ino) else { break };
            let Some(inode) = self.meta.inode(ino)? else { break };
            let key = self.key_of(&inode)?;
            let vol = self.clone();
            let pass_st = st.clone();
            // Reap the passes that ended; a failure is reported once the others have ended.
            while let Some(done) = passes.try_join_next() {
                failed = failed.or(pass_failure(done));
            }
            passes.spawn(async move { vol.upload_parts(&pass_st, &key, &user_meta(&inode), false).await });
            // Stop once the writer pauses; the flusher completes the upload when the file is idle.
            if st.idle_at(self.cfg.clock.now()) >= std::time::Duration::from_millis(200) {
                break;
            }
            self.cfg.clock.sleep(std::time::Duration::from_millis(20)).await;
        }
        while let Some(done) = passes.join_next().await {
            failed = failed.or(pass_failure(done));
        }
        failed.map_or(Ok(yielded), Err)
    }
}

fn pass_failure(done: Result<FsResult<()>, tokio::task::JoinError>) -> Option<FsError> {
    match done {
        Ok(Ok(())) => None,
        Ok(Err(e)) => Some(e),
        Err(e) => Some(FsError::Io(format!("upload task failed: {e}"))),
    }
}

/// Held while a multipart upload is being completed (`Multipart::completing`); its drop ends
/// that state.
struct Completing<'a>(&'a Staged);

impl<'a> Completing<'a> {
    fn start(st: &'a Staged) -> Completing<'a> {
        if let Some(m) = st.multipart.locked().as_mut() {
            m.completing = true;
        }
        Completing(st)
    }
}

impl Drop for Completing<'_> {
    fn drop(&mut self) {
        if let Some(m) = self.0.multipart.locked().as_mut() {
            m.completing = false;
        }
    }
}
