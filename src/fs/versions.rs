//! Versions of a file's object written by another S3 client: how the gateway takes them up.
//!
//! The gateway knows each file's object by its ETag (`Remote`). A listing that shows another
//! ETag, or a read of the known version that S3 refuses because the object was replaced, makes
//! the new version the file's content, unless local writes not yet uploaded are newer (then the
//! gateway's version wins at its upload). Every read from S3 of a file's bytes is conditional on
//! the known ETag (`ObjectStore::get_version_range`), so a file is never read, cached or staged
//! as a mix of two versions.

use super::{Core, FsError, FsResult};
use crate::meta::{Batch, Ino, Inode, Kind, Remote, Time};
use crate::store::{ObjectStore, ObjectSummary, StoreResult};

impl Core {
    /// `o`, another version of `inode`'s object than it knew, replaces what the inode knew of
    /// its content (unless local writes not yet uploaded are newer).
    pub(super) fn take_up_version(&self, batch: &mut Batch, mut inode: Inode, o: &ObjectSummary) {
        let changed = inode.remote.as_ref().map(|r| r.etag != o.etag).unwrap_or(true);
        let dirty = self.staged(inode.ino).is_some_and(|s| s.is_dirty());
        if !changed || dirty {
            return;
        }
        if let Kind::Link(file) = inode.kind {
            // Another tool replaced this name's object: it is a file of its own now, no longer
            // a name of `file`.
            batch.del_link(file, inode.ino);
            inode.kind = Kind::File;
        }
        inode.size = o.size;
        inode.mtime = Time::from_secs(o.last_modified);
        inode.remote = Some(Remote {
            key: o.key.clone(),
            etag: o.etag.clone(),
            size: o.size,
        });
        inode.meta_loaded = false;
        inode.target.clear();
        self.drop_staged(inode.ino);
        if self.meta.carries_bytes(inode.ino) {
            // Replayed after a crash, the bytes the gateway wrote would come back over the new
            // version, and go up over it at the next upload.
            batch.drop_bytes(inode.ino);
        }
        batch.put_inode(&inode);
    }

    /// A read of `seen`, the version of `ino`'s object the gateway knew, found it gone or
    /// replaced. Takes up the version S3 holds now, as a listing would have. `Ok(true)`: read
    /// again, the inode knows another version now. `Ok(false)`: the object is gone, and the
    /// read's error stands. [`FsError::Retry`] when S3's HEAD still names `seen`: a store whose
    /// replicas disagree for a moment, which a later try gets past.
    pub(super) async fn take_up_current_version(&self, ino: Ino, seen: &Remote) -> FsResult<bool> {
        let head = self.store.head(&seen.key).await?;
        let _g = self.ns.lock().await;
        let inode = self.inode(ino)?;
        if inode
            .remote
            .as_ref()
            .is_none_or(|r| r.key != seen.key || r.etag != seen.etag)
        {
            return Ok(true); // taken up, renamed or rewritten meanwhile: look again
        }
        let Some(h) = head else {
            return Ok(false);
        };
        if h.etag == seen.etag {
            return Err(FsError::Retry(format!(
                "S3 refused a read of {} as of another version, and then named that version",
                seen.key
            )));
        }
        if self.staged(ino).is_some_and(|s| s.is_dirty()) {
            return Ok(true); // local writes are newer, and reads go to them
        }
        let mut batch = Batch::new();
        let o = ObjectSummary {
            key: seen.key.clone(),
            size: h.size,
            etag: h.etag,
            last_modified: h.last_modified,
        };
        self.take_up_version(&mut batch, inode, &o);
        self.meta.commit(batch)?;
        tracing::info!(ino, key = %seen.key, "the object was replaced in S3; its new version is the file's content now");
        Ok(true)
    }

    /// `seen`, `ino`'s object, is gone from S3 (another client deleted it) while the gateway
    /// had a change of its name or attributes to bring there, and no bytes of it: copying it is
    /// impossible, and retrying would keep the work pending for ever (and `s3nfs flush`, and a
    /// Kubernetes unstage, waiting). The deletion wins, as it does when a listing finds an
    /// object gone: the file is emptied and its work done here, and the next listing of its
    /// directory, finding no object, forgets it. `pending`: the inode's pending work as the
    /// caller saw it (`None` for a file whose other name, a hard link, was being copied).
    /// Nothing changes if the inode moved on meanwhile (the next round decides): false then.
    pub(super) async fn object_deleted_elsewhere(
        &self,
        ino: Ino,
        pending: Option<u64>,
        seen: &Remote,
    ) -> FsResult<bool> {
        let _g = self.ns.lock().await;
        let Some(mut inode) = self.meta.inode(ino)? else {
            return Ok(false);
        };
        if inode.remote.as_ref() != Some(seen) || self.staged(ino).is_some() || self.meta.pending(ino)? != pending {
            return Ok(false);
        }
        tracing::error!(
            ino,
            key = %seen.key,
            "another S3 client deleted the file's object before the gateway's rename, attribute change or hard link of it reached S3; the file is gone"
        );
        inode.remote = None;
        inode.size = 0;
        inode.mtime = Time::now();
        inode.ctime = inode.mtime;
        let mut batch = Batch::new();
        batch.put_inode(&inode);
        // It has no object to move away from the key any more, and will write none: what
        // its name's key holds (a replaced file's object spared for it) goes.
        batch.moved_from(&seen.key, ino);
        self.release_maybe_written(&mut batch, ino, None)?;
        if pending.is_some() {
            batch.clear_pending(ino);
        }
        self.meta.commit(batch)?;
        Ok(true)
    }
}

/// Bytes `range` of `remote`'s version of its object: `NotFound` once the object is another
/// version (or gone). An object listed without an ETag, which some stores do, is read as it is.
pub(crate) async fn read_version(
    store: &dyn ObjectStore,
    remote: &Remote,
    range: std::ops::Range<u64>,
) -> StoreResult<bytes::Bytes> {
    if remote.etag.is_empty() {
        store.get_range(&remote.key, range).await
    } else {
        store.get_version_range(&remote.key, &remote.etag, range).await
    }
}

/// Bytes `range` of `remote`'s version of its object (as [`read_version`]) written through
/// `write(offset, bytes)` in one GET, a MiB at a time: memory holds a MiB, not the range, and
/// each frame the connection delivers (often 16 KiB) is not a write of its own. Returns how many
/// bytes were written. An error part-way leaves some of the range written. A failed write is
/// the error, as the disk gave it: a full disk is [`FsError::NoSpace`], not a failed GET.
pub(crate) async fn stream_version(
    store: &dyn ObjectStore,
    remote: &Remote,
    range: std::ops::Range<u64>,
    write: &(dyn Fn(u64, &[u8]) -> std::io::Result<()> + Sync),
) -> FsResult<u64> {
    const BATCH: usize = 1 << 20;
    let etag = (!remote.etag.is_empty()).then_some(remote.etag.as_str());
    let mut at = range.start;
    let mut buf: Vec<u8> = Vec::with_capacity(BATCH.min((range.end - range.start) as usize));
    let mut write_failed: Option<std::io::Error> = None;
    let streamed = store
        .stream_range(&remote.key, etag, range, &mut |frame: &[u8]| {
            buf.extend_from_slice(frame);
            if buf.len() >= BATCH {
                if let Err(e) = write(at, &buf) {
                    let told = std::io::Error::other(e.to_string());
                    write_failed = Some(e);
                    return Err(told);
                }
                at += buf.len() as u64;
                buf.clear();
            }
            Ok(())
        })
        .await;
    let n = match (streamed, write_failed) {
        (_, Some(e)) => return Err(e.into()),
        (r, None) => r?,
    };
    if !buf.is_empty() {
        write(at, &buf)?;
    }
    Ok(n)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A full disk under a fetch is ENOSPC for the client (NFS3ERR_NOSPC), as a WRITE's is, not
    /// an I/O error of S3's; in whichever batch it happens.
    #[tokio::test]
    async fn a_full_disk_under_a_streamed_fetch_is_no_space() {
        let data = vec![7u8; 3 << 20];
        let (_dir, store, remote) = super::super::read::tests::one_object(&data).await;
        let store = &*store;
        let full = |_: u64, _: &[u8]| Err(std::io::Error::from_raw_os_error(libc::ENOSPC));
        let r = stream_version(store, &remote, 0..remote.size, &full).await;
        assert!(matches!(r, Err(FsError::NoSpace(_))), "{r:?}");
        // The last, short batch too.
        let r = stream_version(store, &remote, 0..4096, &full).await;
        assert!(matches!(r, Err(FsError::NoSpace(_))), "{r:?}");
        // And a fetch that fits goes through.
        let got = std::sync::Mutex::new(Vec::new());
        let n = stream_version(store, &remote, 0..remote.size, &|at, b| {
            let mut g = got.lock().unwrap();
            assert_eq!(at as usize, g.len());
            g.extend_from_slice(b);
            Ok(())
        })
        .await
        .unwrap();
        assert_eq!(n, data.len() as u64);
        assert!(*got.lock().unwrap() == data);
    }
}
