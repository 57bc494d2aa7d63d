use std::cmp::Ordering;
use std::sync::Once;
use std::time::SystemTime;

use async_trait::async_trait;

use crate::nfs;
use crate::nfs::*;
#[derive(Default, Debug)]
pub struct DirEntrySimple {
    pub fileid: fileid3,
    pub name: filename3,
    /// Where a listing resumes after this entry (s3nfs patch, see `DirEntry::cookie`).
    pub cookie: cookie3,
}
#[derive(Default, Debug)]
pub struct ReadDirSimpleResult {
    pub entries: Vec<DirEntrySimple>,
    pub end: bool,
}

#[derive(Default, Debug)]
pub struct DirEntry {
    pub fileid: fileid3,
    pub name: filename3,
    pub attr: fattr3,
    /// Where a listing resumes after this entry, passed back to `readdir` as `start_after`
    /// (s3nfs patch: 0.11.0 used the fileid, so two names of one file, hard links, could not
    /// both be in a directory).
    pub cookie: cookie3,
}
/// s3nfs patch: what FSSTAT reports, from the filesystem (0.11.0 answered a fixed 1 TiB).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct FsStat {
    /// Size of the filesystem, free bytes, and free bytes for unprivileged users.
    pub tbytes: u64,
    pub fbytes: u64,
    pub abytes: u64,
    /// File slots in all, free, and free for unprivileged users.
    pub tfiles: u64,
    pub ffiles: u64,
    pub afiles: u64,
}

impl Default for FsStat {
    fn default() -> Self {
        FsStat {
            tbytes: 1 << 40,
            fbytes: 1 << 40,
            abytes: 1 << 40,
            tfiles: 1 << 30,
            ffiles: 1 << 30,
            afiles: 1 << 30,
        }
    }
}

#[derive(Default, Debug)]
pub struct ReadDirResult {
    pub entries: Vec<DirEntry>,
    pub end: bool,
}

impl ReadDirSimpleResult {
    pub(crate) fn from_readdir_result(result: &ReadDirResult) -> ReadDirSimpleResult {
        let entries: Vec<DirEntrySimple> = result
            .entries
            .iter()
            .map(|e| DirEntrySimple {
                fileid: e.fileid,
                name: e.name.clone(),
                cookie: e.cookie,
            })
            .collect();
        ReadDirSimpleResult {
            entries,
            end: result.end,
        }
    }
}

/// The AUTH_UNIX identity of a call's caller (s3nfs patch).
/// A call without AUTH_UNIX credentials (AUTH_NONE) has `unix: false` and ids 65534.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Caller {
    pub uid: u32,
    pub gid: u32,
    /// Supplementary groups (AUTH_UNIX carries at most 16).
    pub gids: Vec<u32>,
    /// Whether the call carried AUTH_UNIX credentials.
    pub unix: bool,
}

impl Caller {
    /// The caller of a call without AUTH_UNIX credentials: nobody (65534), not uid 0.
    pub fn nobody() -> Caller {
        Caller {
            uid: 65534,
            gid: 65534,
            gids: Vec::new(),
            unix: false,
        }
    }
}

/// The call an [`NFSFileSystem`] method serves (s3nfs patch): who sent it and when it arrived.
/// The library builds one per RPC call and passes it to every method that does work for that
/// call (MOUNT's path walk included); the methods that describe the file system itself
/// (`capabilities`, `root_dir`, `linkmax`, `write_verifier`, `id_to_fh`, `serverid`) take none.
#[derive(Clone, Debug)]
pub struct CallContext {
    /// The caller's credentials.
    pub caller: Caller,
    /// When the call was received: the one clock reading a call costs the library, for the
    /// file system to reuse.
    pub arrived: std::time::Instant,
}

impl CallContext {
    pub fn new(caller: Caller, arrived: std::time::Instant) -> CallContext {
        CallContext { caller, arrived }
    }
}

static mut GENERATION_NUMBER: u64 = 0;
static GENERATION_NUMBER_INIT: Once = Once::new();

fn get_generation_number() -> u64 {
    unsafe {
        GENERATION_NUMBER_INIT.call_once(|| {
            GENERATION_NUMBER = SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .unwrap()
                .as_millis() as u64;
        });
        GENERATION_NUMBER
    }
}

/// What capabilities are supported
pub enum VFSCapabilities {
    ReadOnly,
    ReadWrite,
}

/// The basic API to implement to provide an NFS file system
///
/// Opaque FH
/// ---------
/// Files are only uniquely identified by a 64-bit file id. (basically an inode number)
/// We automatically produce internally the opaque filehandle which is comprised of
///  - A 64-bit generation number derived from the server startup time
///   (i.e. so the opaque file handle expires when the NFS server restarts)
///  - The 64-bit file id
//
/// readdir pagination
/// ------------------
/// We do not use cookie verifier. We just use the start_after.  The
/// implementation should allow startat to start at any position. That is,
/// the next query to readdir may be the last entry in the previous readdir
/// response.
//
/// There is a wierd annoying thing about readdir that limits the number
/// of bytes in the response (instead of the number of entries). The caller
/// will have to truncate the readdir response / issue more calls to readdir
/// accordingly to fill up the expected number of bytes without exceeding it.
//
/// Other requirements
/// ------------------
///  getattr needs to be fast. NFS uses that a lot
//
///  The 0 fileid is reserved and should not be used
//
/// The call being served
/// ---------------------
/// Every method that does work for an RPC call receives that call's [`CallContext`]: the
/// caller's credentials (for permission checks and the owner of new files) and when the call
/// arrived. Methods describing the file system itself take none.
#[async_trait]
pub trait NFSFileSystem: Sync {
    /// Returns the set of capabilities supported
    fn capabilities(&self) -> VFSCapabilities;
    /// Returns the ID the of the root directory "/"
    fn root_dir(&self) -> fileid3;
    /// Look up the id of a path in a directory
    ///
    /// i.e. given a directory dir/ containing a file a.txt
    /// this may call lookup(id_of("dir/"), "a.txt")
    /// and this should return the id of the file "dir/a.txt"
    ///
    /// This method should be fast as it is used very frequently.
    async fn lookup(&self, cx: &CallContext, dirid: fileid3, filename: &filename3) -> Result<fileid3, nfsstat3>;

    /// Returns the attributes of an id.
    /// This method should be fast as it is used very frequently.
    async fn getattr(&self, cx: &CallContext, id: fileid3) -> Result<fattr3, nfsstat3>;

    /// The attributes a reply carries beside its result (s3nfs patch): the pre- and post-op
    /// attributes of LOOKUP, CREATE, WRITE, REMOVE and the like, as opposed to the GETATTR
    /// procedure itself. A filesystem that does more for GETATTR (revalidation, accounting)
    /// can answer these from what it holds. Default: `getattr`.
    async fn reply_attr(&self, cx: &CallContext, id: fileid3) -> Result<fattr3, nfsstat3> {
        self.getattr(cx, id).await
    }

    /// Sets the attributes of an id
    /// this should return Err(nfsstat3::NFS3ERR_ROFS) if readonly
    async fn setattr(&self, cx: &CallContext, id: fileid3, setattr: sattr3) -> Result<fattr3, nfsstat3>;

    /// Reads the contents of a file returning (bytes, EOF)
    /// Note that offset/count may go past the end of the file and that
    /// in that case, all bytes till the end of file are returned.
    /// EOF must be flagged if the end of the file is reached by the read.
    async fn read(&self, cx: &CallContext, id: fileid3, offset: u64, count: u32) -> Result<(Vec<u8>, bool), nfsstat3>;

    /// s3nfs patch: [`read`](Self::read) as shared bytes, which the READ reply sends as they are
    /// instead of copying them into the reply buffer. Defaults to `read`.
    async fn read_bytes(
        &self,
        cx: &CallContext,
        id: fileid3,
        offset: u64,
        count: u32,
    ) -> Result<(bytes::Bytes, bool), nfsstat3> {
        self.read(cx, id, offset, count)
            .await
            .map(|(v, eof)| (bytes::Bytes::from(v), eof))
    }

    /// Writes the contents of a file returning (bytes, EOF)
    /// Note that offset/count may go past the end of the file and that
    /// in that case, the file is extended.
    /// If not supported due to readonly file system
    /// this should return Err(nfsstat3::NFS3ERR_ROFS)
    async fn write(&self, cx: &CallContext, id: fileid3, offset: u64, data: &[u8]) -> Result<fattr3, nfsstat3>;

    /// Creates a file with the following attributes.
    /// If not supported due to readonly file system
    /// this should return Err(nfsstat3::NFS3ERR_ROFS)
    async fn create(
        &self,
        cx: &CallContext,
        dirid: fileid3,
        filename: &filename3,
        attr: sattr3,
    ) -> Result<(fileid3, fattr3), nfsstat3>;

    /// Creates a file if it does not already exist
    /// this should return Err(nfsstat3::NFS3ERR_ROFS)
    ///
    /// s3nfs patch: `verifier` is the client's, to be kept with the new file: an exclusive
    /// CREATE sent again (its reply lost to a restart or a broken connection) that finds a file
    /// with its own verifier has created that file, and succeeds (RFC 1813, 3.3.8). Returns the
    /// file's attributes, as `create` does: the reply carries them.
    async fn create_exclusive(
        &self,
        cx: &CallContext,
        dirid: fileid3,
        filename: &filename3,
        verifier: nfs::createverf3,
    ) -> Result<(fileid3, fattr3), nfsstat3>;

    /// Makes a directory with the following attributes.
    /// If not supported dur to readonly file system
    /// this should return Err(nfsstat3::NFS3ERR_ROFS)
    async fn mkdir(&self, cx: &CallContext, dirid: fileid3, dirname: &filename3)
        -> Result<(fileid3, fattr3), nfsstat3>;

    /// Makes a directory with the attributes MKDIR carried (s3nfs patch: upstream drops them).
    async fn mkdir_with_attr(
        &self,
        cx: &CallContext,
        dirid: fileid3,
        dirname: &filename3,
        attr: &sattr3,
    ) -> Result<(fileid3, fattr3), nfsstat3> {
        let _ = attr;
        self.mkdir(cx, dirid, dirname).await
    }

    /// Removes a file.
    /// If not supported due to readonly file system
    /// this should return Err(nfsstat3::NFS3ERR_ROFS)
    async fn remove(&self, cx: &CallContext, dirid: fileid3, filename: &filename3) -> Result<(), nfsstat3>;

    /// s3nfs patch: RMDIR (0.11.0 sent it to `remove`, so RMDIR of a file removed the file).
    /// Defaults to `remove`.
    async fn rmdir(&self, cx: &CallContext, dirid: fileid3, filename: &filename3) -> Result<(), nfsstat3> {
        self.remove(cx, dirid, filename).await
    }

    /// Removes a file.
    /// If not supported due to readonly file system
    /// this should return Err(nfsstat3::NFS3ERR_ROFS)
    async fn rename(
        &self,
        cx: &CallContext,
        from_dirid: fileid3,
        from_filename: &filename3,
        to_dirid: fileid3,
        to_filename: &filename3,
    ) -> Result<(), nfsstat3>;

    /// Returns the contents of a directory with pagination.
    /// Directory listing should be deterministic.
    /// Up to max_entries may be returned, and start_after is used
    /// to determine where to start returning entries from.
    ///
    /// For instance if the directory has entry with ids [1,6,2,11,8,9]
    /// and start_after=6, readdir should returning 2,11,8,...
    //
    async fn readdir(
        &self,
        cx: &CallContext,
        dirid: fileid3,
        start_after: fileid3,
        max_entries: usize,
    ) -> Result<ReadDirResult, nfsstat3>;

    /// Simple version of readdir.
    /// Only need to return filename and id
    async fn readdir_simple(
        &self,
        cx: &CallContext,
        dirid: fileid3,
        count: usize,
    ) -> Result<ReadDirSimpleResult, nfsstat3> {
        Ok(ReadDirSimpleResult::from_readdir_result(
            &self.readdir(cx, dirid, 0, count).await?,
        ))
    }

    /// Makes a symlink with the following attributes.
    /// If not supported due to readonly file system
    /// this should return Err(nfsstat3::NFS3ERR_ROFS)
    async fn symlink(
        &self,
        cx: &CallContext,
        dirid: fileid3,
        linkname: &filename3,
        symlink: &nfspath3,
        attr: &sattr3,
    ) -> Result<(fileid3, fattr3), nfsstat3>;

    /// Reads a symlink
    async fn readlink(&self, cx: &CallContext, id: fileid3) -> Result<nfspath3, nfsstat3>;

    /// MKNOD (s3nfs patch): a fifo, socket, or character or block device (`spec` holds the
    /// major and minor numbers of a device).
    async fn mknod(
        &self,
        _cx: &CallContext,
        _dirid: fileid3,
        _filename: &filename3,
        _ftype: ftype3,
        _attr: &sattr3,
        _spec: specdata3,
    ) -> Result<(fileid3, fattr3), nfsstat3> {
        Err(nfsstat3::NFS3ERR_NOTSUPP)
    }

    /// LINK (s3nfs patch): a new name `linkname` in `dirid` for the file `id`.
    async fn link(
        &self,
        _cx: &CallContext,
        _id: fileid3,
        _dirid: fileid3,
        _linkname: &filename3,
    ) -> Result<(), nfsstat3> {
        Err(nfsstat3::NFS3ERR_NOTSUPP)
    }

    /// The most hard links a file may have, reported by PATHCONF (s3nfs patch).
    fn linkmax(&self) -> u32 {
        0
    }

    /// WRITE honouring the client's `stable` (s3nfs patch): returns the attributes after the
    /// write and how stable the data is now, which may be more but never less than asked.
    async fn write_stable(
        &self,
        cx: &CallContext,
        id: fileid3,
        offset: u64,
        data: &[u8],
        _stable: stable_how,
    ) -> Result<(fattr3, stable_how), nfsstat3> {
        Ok((self.write(cx, id, offset, data).await?, stable_how::FILE_SYNC))
    }

    /// COMMIT (s3nfs patch): makes what was written UNSTABLE to `id` stable; returns its
    /// attributes afterwards.
    async fn commit(&self, cx: &CallContext, id: fileid3, _offset: u64, _count: u32) -> Result<fattr3, nfsstat3> {
        self.getattr(cx, id).await
    }

    /// The write verifier (s3nfs patch): it must change whenever data answered UNSTABLE may
    /// have been lost (a restart of the server), so that clients send such data again.
    fn write_verifier(&self) -> writeverf3 {
        self.serverid()
    }

    /// ACCESS (s3nfs patch): which of the `requested` ACCESS3_* bits the caller holds on `id`.
    async fn access(&self, _cx: &CallContext, _id: fileid3, requested: u32) -> Result<u32, nfsstat3> {
        Ok(requested)
    }

    /// s3nfs patch: space and file counts for FSSTAT (`df`).
    async fn fsstat(&self, _cx: &CallContext, _root_fileid: fileid3) -> Result<FsStat, nfsstat3> {
        Ok(FsStat::default())
    }

    /// Get static file system Information
    async fn fsinfo(&self, cx: &CallContext, root_fileid: fileid3) -> Result<fsinfo3, nfsstat3> {
        let dir_attr: nfs::post_op_attr = match self.getattr(cx, root_fileid).await {
            Ok(v) => nfs::post_op_attr::attributes(v),
            Err(_) => nfs::post_op_attr::Void,
        };

        let res = fsinfo3 {
            obj_attributes: dir_attr,
            rtmax: 1024 * 1024,
            // s3nfs patch: 1 MiB, as rtmax (was 124 KiB). The Linux client takes rtpref as its
            // rsize, so a sequential read cost eight times the calls it needed.
            rtpref: 1024 * 1024,
            rtmult: 1024 * 1024,
            wtmax: 1024 * 1024,
            wtpref: 1024 * 1024,
            wtmult: 1024 * 1024,
            dtpref: 1024 * 1024,
            maxfilesize: 128 * 1024 * 1024 * 1024,
            time_delta: nfs::nfstime3 {
                seconds: 0,
                nseconds: 1000000,
            },
            properties: nfs::FSF_SYMLINK | nfs::FSF_HOMOGENEOUS | nfs::FSF_CANSETTIME,
        };
        Ok(res)
    }

    /// Converts the fileid to an opaque NFS file handle. Optional.
    fn id_to_fh(&self, id: fileid3) -> nfs_fh3 {
        let gennum = get_generation_number();
        let mut ret: Vec<u8> = Vec::new();
        ret.extend_from_slice(&gennum.to_le_bytes());
        ret.extend_from_slice(&id.to_le_bytes());
        nfs_fh3 { data: ret }
    }
    /// Converts an opaque NFS file handle to a fileid.  Optional. Async: a file system may
    /// have to look for a handle it does not know yet (one another server gave out).
    async fn fh_to_id(&self, _cx: &CallContext, id: &nfs_fh3) -> Result<fileid3, nfsstat3> {
        if id.data.len() != 16 {
            return Err(nfsstat3::NFS3ERR_BADHANDLE);
        }
        let gen = u64::from_le_bytes(id.data[0..8].try_into().unwrap());
        let id = u64::from_le_bytes(id.data[8..16].try_into().unwrap());
        let gennum = get_generation_number();
        match gen.cmp(&gennum) {
            Ordering::Less => Err(nfsstat3::NFS3ERR_STALE),
            Ordering::Greater => Err(nfsstat3::NFS3ERR_BADHANDLE),
            Ordering::Equal => Ok(id),
        }
    }
    /// Converts a complete path to a fileid.  Optional.
    /// The default implementation walks the directory structure with lookup()
    async fn path_to_id(&self, cx: &CallContext, path: &[u8]) -> Result<fileid3, nfsstat3> {
        let splits = path.split(|&r| r == b'/');
        let mut fid = self.root_dir();
        for component in splits {
            if component.is_empty() {
                continue;
            }
            fid = self.lookup(cx, fid, &component.into()).await?;
        }
        Ok(fid)
    }

    fn serverid(&self) -> cookieverf3 {
        let gennum = get_generation_number();
        gennum.to_le_bytes()
    }
}
