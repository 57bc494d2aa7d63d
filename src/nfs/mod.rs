//! The NFSv3 adapter: nfsserve's `NFSFileSystem` over [`Volume`]. One span per operation, one
//! call into the core, one mapping of errors to `nfsstat3`; no storage logic here.
//!
//! File handles are `S3NF` + volume id + inode number, all stable across restarts (the default
//! handles of nfsserve embed the process start time, which would make every handle stale after a
//! restart of the gateway).

use std::sync::Arc;

use async_trait::async_trait;
use nfsserve::nfs::{
    createverf3, fattr3, fileid3, filename3, ftype3, nfs_fh3, nfspath3, nfsstat3, nfstime3, sattr3, set_atime,
    set_gid3, set_mode3, set_mtime, set_size3, set_uid3, specdata3, stable_how, writeverf3,
};
use nfsserve::vfs::{
    CallContext, Caller, DirEntry as NfsDirEntry, FsStat, NFSFileSystem, ReadDirResult, VFSCapabilities,
};
use tracing::Instrument;

use crate::config::{Squash, SquashMode};
use crate::fs::{perm, Attr, Cred, FsError, SetAttr, SetTime, Volume};
use crate::meta::{Kind, Time};

const FH_MAGIC: &[u8; 4] = b"S3NF";

pub struct NfsAdapter {
    vol: Arc<Volume>,
    /// The export's name, on every span.
    name: Arc<str>,
    squash: Squash,
}

/// The identity a call runs as. A call without AUTH_UNIX credentials is anonymous.
pub fn cred_of(squash: &Squash, c: &Caller) -> Cred {
    let anon = Cred::user(squash.anon_uid, squash.anon_gid);
    if !c.unix {
        return anon;
    }
    match squash.mode {
        SquashMode::All => anon,
        SquashMode::Root if c.uid == 0 => anon,
        _ => Cred {
            uid: c.uid,
            gid: c.gid,
            groups: c.gids.clone(),
        },
    }
}

impl NfsAdapter {
    pub fn new(vol: Arc<Volume>) -> NfsAdapter {
        NfsAdapter::named(vol, "default")
    }

    pub fn named(vol: Arc<Volume>, name: &str) -> NfsAdapter {
        NfsAdapter {
            vol,
            name: name.into(),
            squash: Squash::default(),
        }
    }

    pub fn with_squash(mut self, squash: Squash) -> NfsAdapter {
        self.squash = squash;
        self
    }

    /// Who the NFS call `cx` runs as.
    fn cred(&self, cx: &CallContext) -> Cred {
        cred_of(&self.squash, &cx.caller)
    }

    /// Runs one operation of the call `cx` in its span, on the call's arrival time, and records
    /// the outcome on the span and in the metrics.
    async fn op<T>(
        &self,
        cx: &CallContext,
        name: &'static str,
        span: tracing::Span,
        f: impl std::future::Future<Output = Result<T, FsError>>,
    ) -> Result<T, nfsstat3> {
        span.record("volume", &*self.name);
        let start = cx.arrived;
        let r = crate::clock::in_op(start, async {
            self.vol.note_activity();
            op(name, span, f).await
        })
        .await;
        let metrics = crate::metrics::global();
        if metrics.nfs_observed() {
            metrics.nfs_op(name, start.elapsed(), r.is_ok());
        }
        r
    }
}

/// The NFS status for a core error. NFS3ERR_JUKEBOX makes the kernel client wait and retry,
/// which is what a hard mount should do while S3 is unreachable.
pub fn status(e: &FsError) -> nfsstat3 {
    match e {
        FsError::NotFound => nfsstat3::NFS3ERR_NOENT,
        FsError::Exists => nfsstat3::NFS3ERR_EXIST,
        FsError::NotDir => nfsstat3::NFS3ERR_NOTDIR,
        FsError::IsDir => nfsstat3::NFS3ERR_ISDIR,
        FsError::NotEmpty => nfsstat3::NFS3ERR_NOTEMPTY,
        FsError::NameTooLong => nfsstat3::NFS3ERR_NAMETOOLONG,
        FsError::Invalid(_) => nfsstat3::NFS3ERR_INVAL,
        FsError::Stale => nfsstat3::NFS3ERR_STALE,
        FsError::NoSpace(_) => nfsstat3::NFS3ERR_NOSPC,
        FsError::Retry(_) => nfsstat3::NFS3ERR_JUKEBOX,
        FsError::S3Denied(_) => nfsstat3::NFS3ERR_ACCES,
        FsError::Io(_) => nfsstat3::NFS3ERR_IO,
        FsError::NotSupported(_) => nfsstat3::NFS3ERR_NOTSUPP,
        FsError::Denied => nfsstat3::NFS3ERR_ACCES,
        FsError::NotOwner => nfsstat3::NFS3ERR_PERM,
        FsError::TooManyLinks => nfsstat3::NFS3ERR_MLINK,
    }
}

fn t(t: Time) -> nfstime3 {
    nfstime3 {
        seconds: t.secs.clamp(0, u32::MAX as i64) as u32,
        nseconds: t.nanos,
    }
}

fn fattr(vol: &Volume, a: &Attr) -> fattr3 {
    fattr3 {
        ftype: match a.kind {
            Kind::File | Kind::Link(_) => ftype3::NF3REG,
            Kind::Dir => ftype3::NF3DIR,
            Kind::Symlink => ftype3::NF3LNK,
            Kind::Fifo => ftype3::NF3FIFO,
            Kind::Socket => ftype3::NF3SOCK,
            Kind::CharDev(_) => ftype3::NF3CHR,
            Kind::BlockDev(_) => ftype3::NF3BLK,
        },
        mode: a.mode,
        nlink: a.nlink,
        uid: a.uid,
        gid: a.gid,
        size: a.size,
        used: a.size,
        rdev: match a.kind {
            Kind::CharDev(rdev) | Kind::BlockDev(rdev) => {
                let (major, minor) = split_dev(rdev);
                specdata3 {
                    specdata1: major,
                    specdata2: minor,
                }
            }
            _ => specdata3::default(),
        },
        fsid: vol.volume_id(),
        fileid: a.ino,
        atime: t(a.atime),
        mtime: t(a.mtime),
        ctime: t(a.ctime),
    }
}

fn time_of(n: nfstime3) -> Time {
    Time {
        secs: n.seconds as i64,
        nanos: n.nseconds,
    }
}

fn setattr_of(s: &sattr3) -> SetAttr {
    SetAttr {
        mode: match s.mode {
            set_mode3::mode(m) => Some(m),
            set_mode3::Void => None,
        },
        uid: match s.uid {
            set_uid3::uid(u) => Some(u),
            set_uid3::Void => None,
        },
        gid: match s.gid {
            set_gid3::gid(g) => Some(g),
            set_gid3::Void => None,
        },
        size: match s.size {
            set_size3::size(n) => Some(n),
            set_size3::Void => None,
        },
        atime: match s.atime {
            set_atime::DONT_CHANGE => None,
            set_atime::SET_TO_SERVER_TIME => Some(SetTime::Now),
            set_atime::SET_TO_CLIENT_TIME(n) => Some(SetTime::At(time_of(n))),
        },
        mtime: match s.mtime {
            set_mtime::DONT_CHANGE => None,
            set_mtime::SET_TO_SERVER_TIME => Some(SetTime::Now),
            set_mtime::SET_TO_CLIENT_TIME(n) => Some(SetTime::At(time_of(n))),
        },
    }
}

/// Linux's `dev_t` from a major and minor number (glibc's `makedev`).
fn make_dev(major: u32, minor: u32) -> u64 {
    let (ma, mi) = (major as u64, minor as u64);
    ((ma & 0xffff_f000) << 32) | ((ma & 0xfff) << 8) | ((mi & 0xffff_ff00) << 12) | (mi & 0xff)
}

fn split_dev(dev: u64) -> (u32, u32) {
    let major = ((dev >> 32) & 0xffff_f000) | ((dev >> 8) & 0xfff);
    let minor = ((dev >> 12) & 0xffff_ff00) | (dev & 0xff);
    (major as u32, minor as u32)
}

/// Runs one operation in its span and records the outcome.
async fn op<T>(
    name: &'static str,
    span: tracing::Span,
    f: impl std::future::Future<Output = Result<T, FsError>>,
) -> Result<T, nfsstat3> {
    async {
        match f.await {
            Ok(v) => {
                tracing::Span::current().record("status", "NFS3_OK");
                Ok(v)
            }
            Err(e) => {
                let s = status(&e);
                tracing::Span::current().record("status", tracing::field::debug(&s));
                match &e {
                    FsError::Io(_) | FsError::S3Denied(_) | FsError::NoSpace(_) | FsError::Retry(_) => {
                        tracing::warn!(op = name, error = %e, "NFS operation failed")
                    }
                    _ => tracing::debug!(op = name, error = %e, "NFS operation failed"),
                }
                Err(s)
            }
        }
    }
    .instrument(span)
    .await
}

macro_rules! nfs_span {
    ($op:literal $(, $k:ident = $v:expr)*) => {
        tracing::info_span!(
            "nfs",
            op = $op,
            volume = tracing::field::Empty,
            status = tracing::field::Empty
            $(, $k = $v)*
        )
    };
}

#[async_trait]
impl NFSFileSystem for NfsAdapter {
    fn capabilities(&self) -> VFSCapabilities {
        VFSCapabilities::ReadWrite
    }

    fn root_dir(&self) -> fileid3 {
        self.vol.root()
    }

    async fn lookup(&self, cx: &CallContext, dirid: fileid3, filename: &filename3) -> Result<fileid3, nfsstat3> {
        self.op(
            cx,
            "LOOKUP",
            nfs_span!("LOOKUP", ino = dirid),
            self.vol.lookup(&self.cred(cx), dirid, filename),
        )
        .await
    }

    async fn getattr(&self, cx: &CallContext, id: fileid3) -> Result<fattr3, nfsstat3> {
        let a = self
            .op(cx, "GETATTR", nfs_span!("GETATTR", ino = id), self.vol.getattr(id))
            .await?;
        Ok(fattr(&self.vol, &a))
    }

    /// The attributes around another operation's result (pre- and post-op attributes): what the
    /// volume holds, without GETATTR's revalidation, span or metrics; the operation itself
    /// brought its directory up to date.
    async fn reply_attr(&self, cx: &CallContext, id: fileid3) -> Result<fattr3, nfsstat3> {
        let a = crate::clock::in_op(cx.arrived, self.vol.reply_attr(id))
            .await
            .map_err(|e| status(&e))?;
        Ok(fattr(&self.vol, &a))
    }

    async fn setattr(&self, cx: &CallContext, id: fileid3, setattr: sattr3) -> Result<fattr3, nfsstat3> {
        let a = self
            .op(cx, "SETATTR", nfs_span!("SETATTR", ino = id), async {
                crate::telemetry::note_cause(self.vol.volume_id(), id);
                self.vol.setattr(&self.cred(cx), id, setattr_of(&setattr)).await
            })
            .await?;
        Ok(fattr(&self.vol, &a))
    }

    async fn read(&self, cx: &CallContext, id: fileid3, offset: u64, count: u32) -> Result<(Vec<u8>, bool), nfsstat3> {
        self.read_bytes(cx, id, offset, count)
            .await
            .map(|(b, eof)| (b.to_vec(), eof))
    }

    async fn read_bytes(
        &self,
        cx: &CallContext,
        id: fileid3,
        offset: u64,
        count: u32,
    ) -> Result<(bytes::Bytes, bool), nfsstat3> {
        let r = self
            .op(
                cx,
                "READ",
                nfs_span!(
                    "READ",
                    ino = id,
                    offset = offset,
                    count = count,
                    bytes = tracing::field::Empty,
                    cache = tracing::field::Empty
                ),
                async {
                    let r = self.vol.read(&self.cred(cx), id, offset, count).await;
                    if let Ok((data, _)) = &r {
                        tracing::Span::current().record("bytes", data.len());
                    }
                    r
                },
            )
            .await;
        if let Ok((data, _)) = &r {
            crate::metrics::global()
                .nfs_read_bytes
                .fetch_add(data.len() as u64, std::sync::atomic::Ordering::Relaxed);
        }
        r
    }

    async fn write(&self, cx: &CallContext, id: fileid3, offset: u64, data: &[u8]) -> Result<fattr3, nfsstat3> {
        Ok(self.write_stable(cx, id, offset, data, stable_how::FILE_SYNC).await?.0)
    }

    async fn write_stable(
        &self,
        cx: &CallContext,
        id: fileid3,
        offset: u64,
        data: &[u8],
        stable: stable_how,
    ) -> Result<(fattr3, stable_how), nfsstat3> {
        let a = self
            .op(
                cx,
                "WRITE",
                nfs_span!(
                    "WRITE",
                    ino = id,
                    offset = offset,
                    count = data.len(),
                    bytes = data.len()
                ),
                async {
                    crate::telemetry::note_cause(self.vol.volume_id(), id);
                    if stable != stable_how::UNSTABLE {
                        // What COMMIT promises, as the volume's durability says: with `s3`, a
                        // stable WRITE (the kernel's choice for a one-WRITE fsync) is in S3
                        // before it is answered. The attributes are COMMIT's.
                        return self.vol.write_stable(&self.cred(cx), id, offset, data).await;
                    }
                    self.vol.write(&self.cred(cx), id, offset, data).await
                },
            )
            .await?;
        crate::metrics::global()
            .nfs_written_bytes
            .fetch_add(data.len() as u64, std::sync::atomic::Ordering::Relaxed);
        // A DATA_SYNC write is answered FILE_SYNC: the sync covers the journal too.
        let committed = if stable == stable_how::UNSTABLE {
            stable_how::UNSTABLE
        } else {
            stable_how::FILE_SYNC
        };
        Ok((fattr(&self.vol, &a), committed))
    }

    async fn commit(&self, cx: &CallContext, id: fileid3, _offset: u64, _count: u32) -> Result<fattr3, nfsstat3> {
        let a = self
            .op(cx, "COMMIT", nfs_span!("COMMIT", ino = id), self.vol.commit(id))
            .await?;
        Ok(fattr(&self.vol, &a))
    }

    fn write_verifier(&self) -> writeverf3 {
        self.vol.write_verifier()
    }

    async fn access(&self, cx: &CallContext, id: fileid3, requested: u32) -> Result<u32, nfsstat3> {
        const READ: u32 = 0x01;
        const LOOKUP: u32 = 0x02;
        const MODIFY: u32 = 0x04;
        const EXTEND: u32 = 0x08;
        const DELETE: u32 = 0x10;
        const EXECUTE: u32 = 0x20;
        let (rwx, is_dir) = self
            .op(cx, "ACCESS", nfs_span!("ACCESS", ino = id), async {
                let a = self.vol.getattr(id).await?;
                Ok((self.vol.permissions(&self.cred(cx), id)?, a.kind == Kind::Dir))
            })
            .await?;
        let mut granted = 0;
        if rwx & perm::R != 0 {
            granted |= READ;
        }
        if rwx & perm::W != 0 {
            granted |= MODIFY | EXTEND | if is_dir { DELETE } else { 0 };
        }
        if rwx & perm::X != 0 {
            granted |= if is_dir { LOOKUP } else { EXECUTE };
        }
        Ok(requested & granted)
    }

    fn linkmax(&self) -> u32 {
        crate::fs::links::LINK_MAX
    }

    async fn link(&self, cx: &CallContext, id: fileid3, dirid: fileid3, linkname: &filename3) -> Result<(), nfsstat3> {
        self.op(cx, "LINK", nfs_span!("LINK", ino = id, dir = dirid), async {
            self.vol.link(&self.cred(cx), id, dirid, linkname).await.map(|_| ())
        })
        .await
    }

    async fn mknod(
        &self,
        cx: &CallContext,
        dirid: fileid3,
        filename: &filename3,
        ftype: ftype3,
        attr: &sattr3,
        spec: specdata3,
    ) -> Result<(fileid3, fattr3), nfsstat3> {
        let kind = match ftype {
            ftype3::NF3FIFO => Kind::Fifo,
            ftype3::NF3SOCK => Kind::Socket,
            ftype3::NF3CHR => Kind::CharDev(make_dev(spec.specdata1, spec.specdata2)),
            ftype3::NF3BLK => Kind::BlockDev(make_dev(spec.specdata1, spec.specdata2)),
            _ => return Err(nfsstat3::NFS3ERR_BADTYPE),
        };
        let a = self
            .op(cx, "MKNOD", nfs_span!("MKNOD", ino = dirid), async {
                self.vol
                    .mknod(&self.cred(cx), dirid, filename, kind, setattr_of(attr))
                    .await
            })
            .await?;
        Ok((a.ino, fattr(&self.vol, &a)))
    }

    async fn create(
        &self,
        cx: &CallContext,
        dirid: fileid3,
        filename: &filename3,
        attr: sattr3,
    ) -> Result<(fileid3, fattr3), nfsstat3> {
        let a = self
            .op(cx, "CREATE", nfs_span!("CREATE", ino = dirid), async {
                let a = self
                    .vol
                    .create(&self.cred(cx), dirid, filename, setattr_of(&attr), false)
                    .await?;
                crate::telemetry::note_cause(self.vol.volume_id(), a.ino);
                Ok(a)
            })
            .await?;
        Ok((a.ino, fattr(&self.vol, &a)))
    }

    async fn create_exclusive(
        &self,
        cx: &CallContext,
        dirid: fileid3,
        filename: &filename3,
        verifier: createverf3,
    ) -> Result<(fileid3, fattr3), nfsstat3> {
        let a = self
            .op(
                cx,
                "CREATE",
                nfs_span!("CREATE", ino = dirid, exclusive = true),
                async {
                    let v = u64::from_be_bytes(verifier);
                    let a = self.vol.create_exclusive(&self.cred(cx), dirid, filename, v).await?;
                    crate::telemetry::note_cause(self.vol.volume_id(), a.ino);
                    Ok(a)
                },
            )
            .await?;
        Ok((a.ino, fattr(&self.vol, &a)))
    }

    async fn mkdir(
        &self,
        cx: &CallContext,
        dirid: fileid3,
        dirname: &filename3,
    ) -> Result<(fileid3, fattr3), nfsstat3> {
        self.mkdir_with_attr(cx, dirid, dirname, &sattr3::default()).await
    }

    async fn mkdir_with_attr(
        &self,
        cx: &CallContext,
        dirid: fileid3,
        dirname: &filename3,
        attr: &sattr3,
    ) -> Result<(fileid3, fattr3), nfsstat3> {
        let a = self
            .op(cx, "MKDIR", nfs_span!("MKDIR", ino = dirid), async {
                let a = self.vol.mkdir(&self.cred(cx), dirid, dirname, setattr_of(attr)).await?;
                crate::telemetry::note_cause(self.vol.volume_id(), a.ino);
                Ok(a)
            })
            .await?;
        Ok((a.ino, fattr(&self.vol, &a)))
    }

    async fn remove(&self, cx: &CallContext, dirid: fileid3, filename: &filename3) -> Result<(), nfsstat3> {
        self.op(
            cx,
            "REMOVE",
            nfs_span!("REMOVE", ino = dirid),
            self.vol.unlink(&self.cred(cx), dirid, filename),
        )
        .await
    }

    async fn rmdir(&self, cx: &CallContext, dirid: fileid3, filename: &filename3) -> Result<(), nfsstat3> {
        self.op(
            cx,
            "RMDIR",
            nfs_span!("RMDIR", ino = dirid),
            self.vol.rmdir(&self.cred(cx), dirid, filename),
        )
        .await
    }

    async fn rename(
        &self,
        cx: &CallContext,
        from_dirid: fileid3,
        from_filename: &filename3,
        to_dirid: fileid3,
        to_filename: &filename3,
    ) -> Result<(), nfsstat3> {
        self.op(
            cx,
            "RENAME",
            nfs_span!("RENAME", ino = from_dirid, to_ino = to_dirid),
            async {
                let cred = self.cred(cx);
                self.vol
                    .rename(&cred, from_dirid, from_filename, to_dirid, to_filename)
                    .await?;
                // The moved inode's S3 work (copy and delete, or a directory's moves) is linked
                // to this RENAME.
                if crate::telemetry::enabled() {
                    if let Ok(ino) = self.vol.lookup(&cred, to_dirid, to_filename).await {
                        crate::telemetry::note_cause(self.vol.volume_id(), ino);
                    }
                }
                Ok(())
            },
        )
        .await
    }

    async fn readdir(
        &self,
        cx: &CallContext,
        dirid: fileid3,
        start_after: fileid3,
        max_entries: usize,
    ) -> Result<ReadDirResult, nfsstat3> {
        let (entries, end) = self
            .op(
                cx,
                "READDIR",
                nfs_span!("READDIR", ino = dirid, cookie = start_after),
                self.vol.readdir(&self.cred(cx), dirid, start_after, max_entries),
            )
            .await?;
        Ok(ReadDirResult {
            entries: entries
                .into_iter()
                .map(|e| NfsDirEntry {
                    fileid: e.ino,
                    name: e.name.into(),
                    attr: fattr(&self.vol, &e.attr),
                    cookie: e.cookie,
                })
                .collect(),
            end,
        })
    }

    async fn symlink(
        &self,
        cx: &CallContext,
        dirid: fileid3,
        linkname: &filename3,
        symlink: &nfspath3,
        attr: &sattr3,
    ) -> Result<(fileid3, fattr3), nfsstat3> {
        let a = self
            .op(cx, "SYMLINK", nfs_span!("SYMLINK", ino = dirid), async {
                let a = self
                    .vol
                    .symlink(&self.cred(cx), dirid, linkname, symlink, setattr_of(attr))
                    .await?;
                crate::telemetry::note_cause(self.vol.volume_id(), a.ino);
                Ok(a)
            })
            .await?;
        Ok((a.ino, fattr(&self.vol, &a)))
    }

    async fn readlink(&self, cx: &CallContext, id: fileid3) -> Result<nfspath3, nfsstat3> {
        let t = self
            .op(cx, "READLINK", nfs_span!("READLINK", ino = id), self.vol.readlink(id))
            .await?;
        Ok(t.into())
    }

    async fn fsstat(&self, _cx: &CallContext, _root: fileid3) -> Result<FsStat, nfsstat3> {
        let u = self.vol.usage();
        Ok(FsStat {
            tbytes: u.capacity,
            fbytes: u.free_bytes(),
            abytes: u.free_bytes(),
            tfiles: crate::fs::usage::FILE_SLOTS,
            ffiles: u.free_files(),
            afiles: u.free_files(),
        })
    }

    fn id_to_fh(&self, id: fileid3) -> nfs_fh3 {
        let mut data = Vec::with_capacity(20);
        data.extend_from_slice(FH_MAGIC);
        data.extend_from_slice(&self.vol.volume_id().to_be_bytes());
        data.extend_from_slice(&id.to_be_bytes());
        nfs_fh3 { data }
    }

    async fn fh_to_id(&self, _cx: &CallContext, fh: &nfs_fh3) -> Result<fileid3, nfsstat3> {
        if fh.data.len() != 20 || &fh.data[..4] != FH_MAGIC {
            return Err(nfsstat3::NFS3ERR_BADHANDLE);
        }
        let vol = u64::from_be_bytes(fh.data[4..12].try_into().unwrap());
        if vol != self.vol.volume_id() {
            // A handle from another volume (or one recreated from scratch): not ours any more.
            return Err(nfsstat3::NFS3ERR_STALE);
        }
        let ino = u64::from_be_bytes(fh.data[12..20].try_into().unwrap());
        // A ReadWriteMany volume's handle that an earlier owner gave out: look for it in S3
        // before the operation runs (see `fs::handles`). Unknown handles of other volumes are
        // answered STALE by the operation itself.
        if self.vol.keyed_handles() && !self.vol.knows(ino) {
            self.vol.find_lost(ino).await;
        }
        Ok(ino)
    }

    fn serverid(&self) -> nfsserve::nfs::cookieverf3 {
        self.vol.volume_id().to_be_bytes()
    }
}
