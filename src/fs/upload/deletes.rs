//! Deleting the objects of names that are gone, removed or moved away from: each key under its
//! lock, and only when no live inode maps to it any more. A round's deletions go in
//! DeleteObjects requests of up to [`DELETE_BATCH`] keys: a DeleteObject per key made `rm -r`
//! or `mv` of 1,000 files 1,000 requests more, where S3 takes a thousand keys a request.

use futures::StreamExt;

use super::KeyGuard;
use crate::fs::{FsError, FsResult};
use crate::meta::{Batch, Ino, Kind, ROOT_INO};
use crate::store::DELETE_BATCH;

impl super::Uploader {
    /// The inode whose key is `key` now, if any.
    fn resolve_key(&self, key: &str) -> FsResult<Option<Ino>> {
        let Some(rest) = key.strip_prefix(self.cfg.prefix.as_str()) else {
            return Ok(None);
        };
        let is_dir = rest.ends_with('/');
        let mut cur = ROOT_INO;
        for comp in rest.trim_end_matches('/').split('/') {
            match self.meta.lookup(cur, comp.as_bytes())? {
                Some(i) => cur = i,
                None => return Ok(None),
            }
        }
        let inode = self.meta.inode(cur)?;
        Ok(inode.filter(|i| (i.kind == Kind::Dir) == is_dir).map(|i| i.ino))
    }

    /// Whether `key`'s object may go, asked with the key's lock held. Not when a live inode maps
    /// to it, or an inode still has to copy its object from there: that one queues the key's
    /// deletion once it has moved (see `record`). A hard link's name dropped after its file
    /// took over its old key queues that key's deletion, and the file may be leaving the key at
    /// the same time.
    ///
    /// The caller holds the namespace lock (after the key's: the lock order), so that the
    /// name it resolves cannot be removed before what it records for it is in the journal.
    fn may_delete(&self, key: &str) -> FsResult<bool> {
        if let Some(owner) = self.resolve_key(key)? {
            let Some(inode) = self.meta.inode(owner)? else {
                return Ok(true);
            };
            if inode.remote.as_ref().is_some_and(|r| r.key == key) {
                return Ok(false); // its own object
            }
            // A live inode holds the key now and will write it. Until it has, the old object
            // is its to deal with: if it goes (or moves) before writing, the key is deleted
            // then (see `maybe_written`).
            let file = match inode.kind {
                Kind::Link(file) => file,
                _ => owner,
            };
            if self.meta.pending(owner)?.is_some() || self.meta.pending(file)?.is_some() {
                let mut b = Batch::new();
                b.maybe_written(owner, key);
                self.meta.commit(b)?;
                return Ok(false);
            }
            // A name with nothing to write (its file's object was deleted by another client,
            // see `object_deleted_elsewhere`): what the key holds is no longer any file's.
        }
        for m in self.meta.movers(key)? {
            if self
                .meta
                .inode(m)?
                .is_some_and(|i| i.remote.is_some_and(|r| r.key == key))
            {
                return Ok(false);
            }
        }
        Ok(true)
    }

    /// Deletes `key` if it may go (see [`Self::may_delete`]).
    async fn delete_key(&self, key: &str) -> FsResult<()> {
        let _k = self.key_lock(key).await;
        let may = {
            let _g = self.ns.lock().await;
            self.may_delete(key)?
        };
        if may {
            self.store.delete(key).await?;
            self.ledger.note_deleted(key);
        }
        Ok(())
    }

    /// Carries out the journal's deletions `deletes` (sequence, key), and clears each one done.
    /// Deletions not begun when `yields` says so stay in the journal for a later round.
    ///
    /// Each batch of up to [`DELETE_BATCH`] keys is one DeleteObjects request, sent with the
    /// locks of all its keys held (a DeleteObject per key when that request fails). A key whose
    /// lock is busy (an upload or another deletion of it under way) is not waited for while
    /// others are held: it is deleted on its own afterwards, as is a batch's only key.
    pub(super) async fn delete_keys(
        &self,
        deletes: Vec<(u64, String)>,
        yields: impl Fn() -> bool,
    ) -> Vec<FsResult<()>> {
        if deletes.is_empty() {
            return Vec::new();
        }
        // The records that queued these deletions reach the disk first. A deletion sent for a
        // record that a crash then loses takes an object the replayed journal still points to:
        // a move's old key, which the replayed inode would copy from again and find gone.
        let core = self.core.clone();
        match tokio::task::spawn_blocking(move || core.meta.sync()).await {
            Ok(Ok(())) => {}
            Ok(Err(e)) => return vec![Err(e.into())],
            Err(e) => return vec![Err(FsError::Io(format!("journal sync failed: {e}")))],
        }
        let yields = &yields;
        let batches: Vec<_> = deletes.chunks(DELETE_BATCH).map(<[_]>::to_vec).collect();
        let batched = futures::stream::iter(batches.into_iter().map(|batch| async move {
            if yields() {
                return (Ok(()), Vec::new());
            }
            self.delete_batch(batch).await
        }))
        .buffer_unordered(self.cfg.upload_concurrency)
        .collect::<Vec<_>>()
        .await;
        let mut results = Vec::new();
        let mut alone = Vec::new();
        for (r, rest) in batched {
            results.push(r);
            alone.extend(rest);
        }
        let single = futures::stream::iter(alone.into_iter().map(|(seq, key)| async move {
            if yields() {
                return Ok(());
            }
            self.delete_key(&key).await?;
            let mut b = Batch::new();
            b.done_delete(seq, &key);
            Ok(self.meta.commit(b)?)
        }))
        .buffer_unordered(self.cfg.upload_concurrency)
        .collect::<Vec<_>>()
        .await;
        results.extend(single);
        results
    }

    /// One DeleteObjects request for the keys of `batch` that may go and whose locks are free.
    /// Returns its result and the deletions left to be done one at a time.
    async fn delete_batch(&self, batch: Vec<(u64, String)>) -> (FsResult<()>, Vec<(u64, String)>) {
        let mut locked: Vec<(u64, String, KeyGuard<'_>)> = Vec::with_capacity(batch.len());
        // A key queued twice: its other records are cleared with it.
        let mut twice: Vec<(u64, String)> = Vec::new();
        let mut seen = std::collections::HashSet::new();
        let mut alone = Vec::new();
        for (seq, key) in batch {
            if seen.contains(&key) {
                twice.push((seq, key));
                continue;
            }
            match self.try_key_lock(&key) {
                Some(g) => {
                    seen.insert(key.clone());
                    locked.push((seq, key, g));
                }
                None => alone.push((seq, key)),
            }
        }
        if locked.len() < 2 {
            // No request to share: the keys go the usual way.
            alone.extend(locked.into_iter().map(|(seq, key, _)| (seq, key)));
            alone.extend(twice);
            return (Ok(()), alone);
        }
        let r = async {
            let mut kept = Batch::new();
            let mut doomed = Vec::with_capacity(locked.len());
            {
                let _g = self.ns.lock().await;
                for (seq, key, _) in &locked {
                    if self.may_delete(key)? {
                        doomed.push((*seq, key.clone()));
                    } else {
                        kept.done_delete(*seq, key);
                    }
                }
            }
            // The keys that stay are settled whatever becomes of the request.
            self.meta.commit(kept)?;
            let (gone, failed) = self.send_deletes(doomed).await;
            let mut done = Batch::new();
            for (seq, key) in &gone {
                done.done_delete(*seq, key);
            }
            if failed.is_none() {
                for (seq, key) in &twice {
                    done.done_delete(*seq, key);
                }
            }
            self.meta.commit(done)?;
            failed.map_or(Ok(()), |e| Err(e.into()))
        }
        .await;
        (r, alone)
    }

    /// Deletes `doomed` (their locks held): one DeleteObjects request, or a DeleteObject per key
    /// should it fail. Returns the deletions S3 confirmed, and the first failure.
    async fn send_deletes(&self, doomed: Vec<(u64, String)>) -> (Vec<(u64, String)>, Option<crate::store::StoreError>) {
        if doomed.is_empty() {
            return (Vec::new(), None);
        }
        let keys: Vec<String> = doomed.iter().map(|(_, k)| k.clone()).collect();
        let sent = self.store.delete_many(&keys).await;
        // Noted even if the request failed: it may have deleted some of the keys, and a listing
        // must not bring those back. Their names are gone either way, and their deletions stay
        // in the journal until S3 confirms them.
        for key in &keys {
            self.ledger.note_deleted(key);
        }
        let Err(e) = sent else {
            return (doomed, None);
        };
        // Not every S3-compatible store has DeleteObjects, and one refused key fails the whole
        // request: each key on its own then. Should those fail too, S3 is out, and a later
        // round tries the batch again.
        tracing::debug!(error = %e, keys = keys.len(), "DeleteObjects failed; deleting the keys one at a time");
        let each: Vec<_> = futures::stream::iter(doomed.into_iter().map(|(seq, key)| async move {
            let r = self.store.delete(&key).await;
            ((seq, key), r)
        }))
        .buffer_unordered(self.cfg.upload_concurrency)
        .collect()
        .await;
        let mut gone = Vec::with_capacity(each.len());
        let mut failed = None;
        for (d, r) in each {
            match r {
                Ok(()) => gone.push(d),
                Err(e) => failed = failed.or(Some(e)),
            }
        }
        (gone, failed)
    }
}

#[cfg(test)]
mod tests {
    use std::sync::{Arc, Mutex};

    use crate::fs::{Cred, SetAttr, Volume, VolumeConfig};
    use crate::store::faulty::{FaultyStore, Op};
    use crate::store::ObjectStore;

    /// A deletion reaches S3 only once the journal records that queued it are on disk: the
    /// removals' and a move's. Sent before, a crash that lost the records would leave the
    /// replayed journal pointing at objects that are gone.
    #[tokio::test]
    async fn deletions_go_only_once_their_records_are_on_disk() {
        let dir = tempfile::tempdir().unwrap();
        let local: Arc<dyn ObjectStore> =
            Arc::new(crate::store::local::LocalStore::open(&dir.path().join("s3")).unwrap());
        let (faulty, faults) = FaultyStore::new(local);
        let vol = Volume::open(VolumeConfig::new(dir.path().join("state")), Arc::new(faulty))
            .await
            .unwrap();
        let root = Cred::root();
        for name in [&b"a"[..], b"b", b"c"] {
            let ino = vol
                .create(&root, vol.root(), name, SetAttr::default(), true)
                .await
                .unwrap()
                .ino;
            vol.write(&root, ino, 0, name).await.unwrap();
        }
        vol.flush_all().await.unwrap();
        // Whether the journal had records not yet on disk, at each deletion sent.
        let unsynced_at_delete = Arc::new(Mutex::new(Vec::new()));
        let (seen, weak) = (unsynced_at_delete.clone(), Arc::downgrade(&vol));
        faults.set_callback(move |c| {
            if matches!(c.op, Op::Delete | Op::DeleteMany) {
                let vol = weak.upgrade().expect("the volume");
                seen.lock().unwrap().push(vol.meta.unsynced());
            }
            None
        });
        vol.remove(&root, vol.root(), b"a").await.unwrap();
        vol.remove(&root, vol.root(), b"b").await.unwrap();
        vol.rename(&root, vol.root(), b"c", vol.root(), b"d").await.unwrap();
        vol.flush_all().await.unwrap();
        let seen = unsynced_at_delete.lock().unwrap().clone();
        assert!(seen.len() >= 2, "deletions sent: {seen:?}");
        assert!(
            seen.iter().all(|u| !u),
            "a deletion went before its record was on disk: {seen:?}"
        );
        let page = vol.store.list("", None, None, 1000).await.unwrap();
        let keys: Vec<String> = page.objects.into_iter().map(|o| o.key).collect();
        assert_eq!(keys, vec!["d".to_string()]);
    }
}
