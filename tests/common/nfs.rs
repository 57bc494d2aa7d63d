//! A small NFSv3 client for the gateway tests, over the `nfs3_client` crate.
//!
//! Every operation returns `Result<_, nfsstat3>` so tests can assert exact statuses; RPC-level
//! failures (connection lost, garbage reply) panic, since no test expects them.

use std::net::SocketAddr;

use nfs3_client::nfs3_types::nfs3::{
    cookieverf3, createhow3, createverf3, diropargs3, fattr3, filename3, nfs_fh3, nfspath3, nfsstat3, nfstime3, sattr3,
    set_atime, set_gid3, set_mode3, set_mtime, set_size3, set_uid3, stable_how, symlinkdata3, ACCESS3args, COMMIT3args,
    CREATE3args, FSSTAT3args, FSSTAT3resok, GETATTR3args, LINK3args, LOOKUP3args, MKDIR3args, MKNOD3args, Nfs3Result,
    READ3args, READDIR3args, READDIRPLUS3args, READLINK3args, REMOVE3args, RENAME3args, RMDIR3args, SETATTR3args,
    SYMLINK3args, WRITE3args,
};
#[allow(unused_imports)]
pub use nfs3_client::nfs3_types::nfs3::{devicedata3, mknoddata3, specdata3};
use nfs3_client::nfs3_types::rpc::{auth_unix, opaque_auth};
use nfs3_client::nfs3_types::xdr_codec::Opaque;
use nfs3_client::{Nfs3Connection, Nfs3ConnectionBuilder};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

/// A TCP connection for nfs3_client that reports end of stream as an error. (nfs3_client's
/// `TokioIo` returns `Ok(0)` at EOF and its `async_read_exact` then loops forever, so a client
/// whose server died would spin instead of failing.)
pub struct Io(TcpStream);

impl nfs3_client::io::AsyncRead for Io {
    async fn async_read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        let n = self.0.read(buf).await?;
        if n == 0 && !buf.is_empty() {
            return Err(std::io::ErrorKind::UnexpectedEof.into());
        }
        Ok(n)
    }
}

impl nfs3_client::io::AsyncWrite for Io {
    async fn async_write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.0.write(buf).await
    }
}

pub struct Connector;

impl nfs3_client::net::Connector for Connector {
    type Connection = Io;
    async fn connect(&self, addr: SocketAddr) -> std::io::Result<Io> {
        Ok(Io(TcpStream::connect(addr).await?))
    }
    async fn connect_with_port(&self, addr: SocketAddr, port: u16) -> std::io::Result<Io> {
        let s = tokio::net::TcpSocket::new_v4()?;
        s.bind(SocketAddr::from(([0, 0, 0, 0], port)))?;
        Ok(Io(s.connect(addr).await?))
    }
}

#[allow(unused_imports)] // used by some test binaries only
pub use nfs3_client::nfs3_types::nfs3::nfsstat3 as Status;

/// A file handle; `bytes()`/`from_bytes()` let a test keep one across restarts.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Fh(pub nfs_fh3);

impl Fh {
    pub fn bytes(&self) -> Vec<u8> {
        self.0.data.to_vec()
    }
    pub fn from_bytes(b: &[u8]) -> Fh {
        Fh(nfs_fh3 {
            data: Opaque::owned(b.to_vec()),
        })
    }
}

/// Attribute changes for SETATTR (and CREATE / MKDIR / SYMLINK).
#[derive(Clone, Debug, Default)]
pub struct Set {
    pub mode: Option<u32>,
    pub uid: Option<u32>,
    pub gid: Option<u32>,
    pub size: Option<u64>,
    /// Seconds since the epoch (client time).
    pub mtime: Option<u32>,
    pub atime: Option<u32>,
    /// Set the time to the server's "now" (SET_TO_SERVER_TIME), as `touch` does.
    pub mtime_now: bool,
    pub atime_now: bool,
}

impl Set {
    pub fn sattr(&self) -> sattr3 {
        sattr3 {
            mode: self.mode.map_or(set_mode3::None, set_mode3::Some),
            uid: self.uid.map_or(set_uid3::None, set_uid3::Some),
            gid: self.gid.map_or(set_gid3::None, set_gid3::Some),
            size: self.size.map_or(set_size3::None, set_size3::Some),
            atime: if self.atime_now {
                set_atime::SET_TO_SERVER_TIME
            } else {
                self.atime.map_or(set_atime::DONT_CHANGE, |s| {
                    set_atime::SET_TO_CLIENT_TIME(nfstime3 {
                        seconds: s,
                        nseconds: 0,
                    })
                })
            },
            mtime: if self.mtime_now {
                set_mtime::SET_TO_SERVER_TIME
            } else {
                self.mtime.map_or(set_mtime::DONT_CHANGE, |s| {
                    set_mtime::SET_TO_CLIENT_TIME(nfstime3 {
                        seconds: s,
                        nseconds: 0,
                    })
                })
            },
        }
    }
}

pub type R<T> = Result<T, nfsstat3>;

fn res<T, E>(r: Result<Nfs3Result<T, E>, nfs3_client::RpcError>, what: &str) -> R<T> {
    match r {
        Ok(Nfs3Result::Ok(v)) => Ok(v),
        Ok(Nfs3Result::Err((s, _))) => Err(s),
        Err(e) => panic!("NFS {what}: RPC failed: {e}"),
    }
}

pub struct Client {
    conn: Nfs3Connection<Io>,
    pub root: Fh,
    pub addr: SocketAddr,
}

/// Biggest READ / WRITE this client sends in one request.
pub const IO_SIZE: usize = 256 * 1024;

impl Client {
    /// Mounts `/` from a gateway at `addr` (MOUNT and NFS on the same port), with AUTH_UNIX
    /// credentials of root, from an unprivileged source port.
    pub async fn connect(addr: SocketAddr) -> Client {
        Self::try_connect(addr)
            .await
            .unwrap_or_else(|e| panic!("mounting {addr}: {e}"))
    }

    pub async fn try_connect(addr: SocketAddr) -> Result<Client, nfs3_client::ConnectError> {
        Self::try_connect_as(addr, 0, 0, vec![0]).await
    }

    /// Like [`Client::connect`], with the AUTH_UNIX credentials of `uid`, `gid` and `gids`.
    pub async fn connect_as(addr: SocketAddr, uid: u32, gid: u32, gids: Vec<u32>) -> Client {
        Self::try_connect_as(addr, uid, gid, gids)
            .await
            .unwrap_or_else(|e| panic!("mounting {addr} as {uid}: {e}"))
    }

    pub async fn try_connect_as(
        addr: SocketAddr,
        uid: u32,
        gid: u32,
        gids: Vec<u32>,
    ) -> Result<Client, nfs3_client::ConnectError> {
        let cred = opaque_auth::auth_unix(&auth_unix {
            stamp: 1,
            machinename: Opaque::owned(b"s3nfs-test".to_vec()),
            uid,
            gid,
            gids,
        });
        let conn = Nfs3ConnectionBuilder::new(Connector, addr.ip().to_string(), "/")
            .mount_port(addr.port())
            .nfs3_port(addr.port())
            .connect_from_privileged_port(false)
            .credential(cred)
            .mount()
            .await?;
        let root = Fh(conn.root_nfs_fh3());
        Ok(Client { conn, root, addr })
    }

    pub async fn getattr(&mut self, fh: &Fh) -> R<fattr3> {
        let r = self.conn.getattr(&GETATTR3args { object: fh.0.clone() }).await;
        res(r, "GETATTR").map(|o| o.obj_attributes)
    }

    /// FSSTAT: what `df` shows.
    #[allow(dead_code)]
    pub async fn fsstat(&mut self, fh: &Fh) -> R<FSSTAT3resok> {
        let r = self.conn.fsstat(&FSSTAT3args { fsroot: fh.0.clone() }).await;
        res(r, "FSSTAT")
    }

    pub async fn setattr(&mut self, fh: &Fh, set: Set) -> R<()> {
        let r = self
            .conn
            .setattr(&SETATTR3args {
                object: fh.0.clone(),
                new_attributes: set.sattr(),
                guard: Default::default(),
            })
            .await;
        res(r, "SETATTR").map(|_| ())
    }

    pub async fn lookup(&mut self, dir: &Fh, name: impl AsRef<[u8]>) -> R<Fh> {
        let r = self
            .conn
            .lookup(&LOOKUP3args {
                what: diropargs3 {
                    dir: dir.0.clone(),
                    name: filename3(Opaque::borrowed(name.as_ref())),
                },
            })
            .await;
        res(r, "LOOKUP").map(|o| Fh(o.object))
    }

    /// `a/b/c` from the root.
    pub async fn lookup_path(&mut self, path: &str) -> R<Fh> {
        let mut cur = self.root.clone();
        for part in path.split('/').filter(|p| !p.is_empty()) {
            cur = self.lookup(&cur, part).await?;
        }
        Ok(cur)
    }

    async fn create_how(&mut self, dir: &Fh, name: &[u8], how: createhow3) -> R<Fh> {
        let r = self
            .conn
            .create(&CREATE3args {
                where_: diropargs3 {
                    dir: dir.0.clone(),
                    name: filename3(Opaque::borrowed(name)),
                },
                how,
            })
            .await;
        let ok = res(r, "CREATE")?;
        match ok.obj {
            nfs3_client::nfs3_types::nfs3::Nfs3Option::Some(fh) => Ok(Fh(fh)),
            _ => self.lookup(dir, name).await,
        }
    }

    /// UNCHECKED create with a mode.
    pub async fn create(&mut self, dir: &Fh, name: impl AsRef<[u8]>, mode: u32) -> R<Fh> {
        let set = Set {
            mode: Some(mode),
            ..Default::default()
        };
        self.create_how(dir, name.as_ref(), createhow3::UNCHECKED(set.sattr()))
            .await
    }

    pub async fn create_guarded(&mut self, dir: &Fh, name: impl AsRef<[u8]>, mode: u32) -> R<Fh> {
        let set = Set {
            mode: Some(mode),
            ..Default::default()
        };
        self.create_how(dir, name.as_ref(), createhow3::GUARDED(set.sattr()))
            .await
    }

    pub async fn create_exclusive(&mut self, dir: &Fh, name: impl AsRef<[u8]>) -> R<Fh> {
        self.create_exclusive_with(dir, name, *b"s3nfsvrf").await
    }

    /// An exclusive CREATE with the verifier given.
    pub async fn create_exclusive_with(&mut self, dir: &Fh, name: impl AsRef<[u8]>, verifier: [u8; 8]) -> R<Fh> {
        self.create_how(dir, name.as_ref(), createhow3::EXCLUSIVE(createverf3(verifier)))
            .await
    }

    /// One WRITE (FILE_SYNC); returns the count the server acknowledged.
    pub async fn write(&mut self, fh: &Fh, offset: u64, data: &[u8]) -> R<u32> {
        let r = self
            .conn
            .write(&WRITE3args {
                file: fh.0.clone(),
                offset,
                count: data.len() as u32,
                stable: stable_how::FILE_SYNC,
                data: Opaque::borrowed(data),
            })
            .await;
        res(r, "WRITE").map(|o| o.count)
    }

    /// One WRITE with the given `stable`: (count, committed, verifier).
    pub async fn write_how(
        &mut self,
        fh: &Fh,
        offset: u64,
        data: &[u8],
        stable: stable_how,
    ) -> R<(u32, stable_how, [u8; 8])> {
        let r = self
            .conn
            .write(&WRITE3args {
                file: fh.0.clone(),
                offset,
                count: data.len() as u32,
                stable,
                data: Opaque::borrowed(data),
            })
            .await;
        res(r, "WRITE").map(|o| (o.count, o.committed, o.verf.0))
    }

    /// COMMIT of a whole file: the write verifier.
    pub async fn commit(&mut self, fh: &Fh) -> R<[u8; 8]> {
        let r = self
            .conn
            .commit(&COMMIT3args {
                file: fh.0.clone(),
                offset: 0,
                count: 0,
            })
            .await;
        res(r, "COMMIT").map(|o| o.verf.0)
    }

    /// ACCESS: which of the `bits` asked for are granted.
    pub async fn access(&mut self, fh: &Fh, bits: u32) -> R<u32> {
        let r = self
            .conn
            .access(&ACCESS3args {
                object: fh.0.clone(),
                access: bits,
            })
            .await;
        res(r, "ACCESS").map(|o| o.access)
    }

    /// LINK: `name` in `dir` becomes another name of `fh`; returns the file's nlink after.
    pub async fn link(&mut self, fh: &Fh, dir: &Fh, name: impl AsRef<[u8]>) -> R<u32> {
        let r = self
            .conn
            .link(&LINK3args {
                file: fh.0.clone(),
                link: diropargs3 {
                    dir: dir.0.clone(),
                    name: filename3(Opaque::borrowed(name.as_ref())),
                },
            })
            .await;
        let ok = res(r, "LINK")?;
        match ok.file_attributes {
            nfs3_client::nfs3_types::nfs3::post_op_attr::Some(a) => Ok(a.nlink),
            _ => panic!("LINK returned no attributes of the file"),
        }
    }

    /// MKNOD of any `what`; the new object's attributes.
    pub async fn mknod(&mut self, dir: &Fh, name: impl AsRef<[u8]>, what: mknoddata3) -> R<fattr3> {
        let name = name.as_ref();
        let r = self
            .conn
            .mknod(&MKNOD3args {
                where_: diropargs3 {
                    dir: dir.0.clone(),
                    name: filename3(Opaque::borrowed(name)),
                },
                what,
            })
            .await;
        let ok = res(r, "MKNOD")?;
        match ok.obj_attributes {
            nfs3_client::nfs3_types::nfs3::post_op_attr::Some(a) => Ok(a),
            _ => panic!("MKNOD returned no attributes"),
        }
    }

    /// Writes all of `data` in requests of at most `IO_SIZE` (FILE_SYNC).
    pub async fn write_all(&mut self, fh: &Fh, offset: u64, data: &[u8]) -> R<()> {
        self.write_all_how(fh, offset, data, stable_how::FILE_SYNC).await
    }

    /// Writes all of `data` in requests of at most `IO_SIZE`, each with the given `stable`.
    pub async fn write_all_how(&mut self, fh: &Fh, mut offset: u64, mut data: &[u8], stable: stable_how) -> R<()> {
        while !data.is_empty() {
            let n = data.len().min(IO_SIZE);
            let done = self.write_how(fh, offset, &data[..n], stable).await?.0 as usize;
            assert!(done > 0, "WRITE acknowledged 0 bytes");
            offset += done as u64;
            data = &data[done..];
        }
        Ok(())
    }

    pub async fn read(&mut self, fh: &Fh, offset: u64, count: u32) -> R<(Vec<u8>, bool)> {
        let r = self
            .conn
            .read(&READ3args {
                file: fh.0.clone(),
                offset,
                count,
            })
            .await;
        res(r, "READ").map(|o| (o.data.to_vec(), o.eof))
    }

    /// Reads until EOF.
    pub async fn read_all(&mut self, fh: &Fh) -> R<Vec<u8>> {
        let mut out = Vec::new();
        loop {
            let (data, eof) = self.read(fh, out.len() as u64, IO_SIZE as u32).await?;
            out.extend_from_slice(&data);
            if eof {
                return Ok(out);
            }
            assert!(!data.is_empty(), "READ returned no data and no EOF");
        }
    }

    pub async fn mkdir(&mut self, dir: &Fh, name: impl AsRef<[u8]>) -> R<Fh> {
        let name = name.as_ref();
        let r = self
            .conn
            .mkdir(&MKDIR3args {
                where_: diropargs3 {
                    dir: dir.0.clone(),
                    name: filename3(Opaque::borrowed(name)),
                },
                attributes: Set {
                    mode: Some(0o755),
                    ..Default::default()
                }
                .sattr(),
            })
            .await;
        let ok = res(r, "MKDIR")?;
        match ok.obj {
            nfs3_client::nfs3_types::nfs3::Nfs3Option::Some(fh) => Ok(Fh(fh)),
            _ => self.lookup(dir, name).await,
        }
    }

    pub async fn symlink(&mut self, dir: &Fh, name: impl AsRef<[u8]>, target: impl AsRef<[u8]>) -> R<Fh> {
        let name = name.as_ref();
        let r = self
            .conn
            .symlink(&SYMLINK3args {
                where_: diropargs3 {
                    dir: dir.0.clone(),
                    name: filename3(Opaque::borrowed(name)),
                },
                symlink: symlinkdata3 {
                    symlink_attributes: Set::default().sattr(),
                    symlink_data: nfspath3(Opaque::borrowed(target.as_ref())),
                },
            })
            .await;
        let ok = res(r, "SYMLINK")?;
        match ok.obj {
            nfs3_client::nfs3_types::nfs3::Nfs3Option::Some(fh) => Ok(Fh(fh)),
            _ => self.lookup(dir, name).await,
        }
    }

    pub async fn readlink(&mut self, fh: &Fh) -> R<Vec<u8>> {
        let r = self.conn.readlink(&READLINK3args { symlink: fh.0.clone() }).await;
        res(r, "READLINK").map(|o| o.data.0.to_vec())
    }

    pub async fn remove(&mut self, dir: &Fh, name: impl AsRef<[u8]>) -> R<()> {
        let r = self
            .conn
            .remove(&REMOVE3args {
                object: diropargs3 {
                    dir: dir.0.clone(),
                    name: filename3(Opaque::borrowed(name.as_ref())),
                },
            })
            .await;
        res(r, "REMOVE").map(|_| ())
    }

    pub async fn rmdir(&mut self, dir: &Fh, name: impl AsRef<[u8]>) -> R<()> {
        let r = self
            .conn
            .rmdir(&RMDIR3args {
                object: diropargs3 {
                    dir: dir.0.clone(),
                    name: filename3(Opaque::borrowed(name.as_ref())),
                },
            })
            .await;
        res(r, "RMDIR").map(|_| ())
    }

    pub async fn rename(&mut self, from_dir: &Fh, from: impl AsRef<[u8]>, to_dir: &Fh, to: impl AsRef<[u8]>) -> R<()> {
        let r = self
            .conn
            .rename(&RENAME3args {
                from: diropargs3 {
                    dir: from_dir.0.clone(),
                    name: filename3(Opaque::borrowed(from.as_ref())),
                },
                to: diropargs3 {
                    dir: to_dir.0.clone(),
                    name: filename3(Opaque::borrowed(to.as_ref())),
                },
            })
            .await;
        res(r, "RENAME").map(|_| ())
    }

    /// One READDIRPLUS page: (entries (name, fileid, cookie), eof).
    pub async fn readdirplus_page(
        &mut self,
        dir: &Fh,
        cookie: u64,
        verf: [u8; 8],
        dircount: u32,
        maxcount: u32,
    ) -> R<(Vec<(Vec<u8>, u64, u64)>, bool, [u8; 8])> {
        let r = self
            .conn
            .readdirplus(&READDIRPLUS3args {
                dir: dir.0.clone(),
                cookie,
                cookieverf: cookieverf3(verf),
                dircount,
                maxcount,
            })
            .await;
        let ok = res(r, "READDIRPLUS")?;
        let entries = ok
            .reply
            .entries
            .0
            .into_iter()
            .map(|e| (e.name.0.to_vec(), e.fileid, e.cookie))
            .collect();
        Ok((entries, ok.reply.eof, ok.cookieverf.0))
    }

    /// One READDIR page: (entries (name, fileid, cookie), eof).
    pub async fn readdir_page(
        &mut self,
        dir: &Fh,
        cookie: u64,
        verf: [u8; 8],
        count: u32,
    ) -> R<(Vec<(Vec<u8>, u64, u64)>, bool, [u8; 8])> {
        let r = self
            .conn
            .readdir(&READDIR3args {
                dir: dir.0.clone(),
                cookie,
                cookieverf: cookieverf3(verf),
                count,
            })
            .await;
        let ok = res(r, "READDIR")?;
        let entries = ok
            .reply
            .entries
            .0
            .into_iter()
            .map(|e| (e.name.0.to_vec(), e.fileid, e.cookie))
            .collect();
        Ok((entries, ok.reply.eof, ok.cookieverf.0))
    }

    /// A whole listing through READDIRPLUS pages of `dircount` bytes; (name, fileid), without
    /// `.` and `..`. Panics when a page makes no progress (the cookie is not honoured).
    pub async fn readdirplus_all(&mut self, dir: &Fh, dircount: u32) -> R<Vec<(Vec<u8>, u64)>> {
        let mut out = Vec::new();
        let (mut cookie, mut verf) = (0, [0; 8]);
        loop {
            let (page, eof, v) = self.readdirplus_page(dir, cookie, verf, dircount, dircount * 8).await?;
            verf = v;
            let last = page.last().map(|e| e.2);
            out.extend(page.into_iter().map(|e| (e.0, e.1)));
            if eof {
                break;
            }
            let next = last.expect("READDIRPLUS page with no entries and no EOF");
            assert_ne!(next, cookie, "READDIRPLUS made no progress past cookie {cookie}");
            cookie = next;
        }
        out.retain(|e| e.0 != b"." && e.0 != b"..");
        Ok(out)
    }

    /// A whole listing through READDIR pages of `count` bytes; see `readdirplus_all`.
    pub async fn readdir_all_plain(&mut self, dir: &Fh, count: u32) -> R<Vec<(Vec<u8>, u64)>> {
        let mut out = Vec::new();
        let (mut cookie, mut verf) = (0, [0; 8]);
        loop {
            let (page, eof, v) = self.readdir_page(dir, cookie, verf, count).await?;
            verf = v;
            let last = page.last().map(|e| e.2);
            out.extend(page.into_iter().map(|e| (e.0, e.1)));
            if eof {
                break;
            }
            let next = last.expect("READDIR page with no entries and no EOF");
            assert_ne!(next, cookie, "READDIR made no progress past cookie {cookie}");
            if out.len() > 10_000_000 {
                panic!("READDIR listing does not end");
            }
            cookie = next;
        }
        out.retain(|e| e.0 != b"." && e.0 != b"..");
        Ok(out)
    }

    /// Names in a directory (READDIRPLUS, large pages), sorted.
    pub async fn names(&mut self, dir: &Fh) -> R<Vec<String>> {
        let mut v: Vec<String> = self
            .readdirplus_all(dir, 64 * 1024)
            .await?
            .into_iter()
            .map(|(n, _)| String::from_utf8_lossy(&n).into_owned())
            .collect();
        v.sort();
        Ok(v)
    }
}
