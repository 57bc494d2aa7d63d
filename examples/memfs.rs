//! A tiny in-memory NFSv3 server, used only as a stand-in by the user-mode-linux harness
//! self-test (`tests/kernel_mount.rs`). Not part of s3nfs.
//!
//! usage: memfs 127.0.0.1:PORT
//! Prints `mount -t nfs -o vers=3,proto=tcp,port=P,mountport=P,nolock,hard 127.0.0.1:/ <mountpoint>`
//! once it listens, like `s3nfs serve` will.

use std::collections::{BTreeMap, HashMap};
use std::sync::Mutex;
use std::time::SystemTime;

use async_trait::async_trait;
use nfsserve::nfs::{
    fattr3, fileid3, filename3, ftype3, nfspath3, nfsstat3, nfstime3, sattr3, set_atime, set_gid3, set_mode3,
    set_mtime, set_size3, set_uid3, specdata3,
};
use nfsserve::tcp::{NFSTcp, NFSTcpListener};
use nfsserve::vfs::{DirEntry, NFSFileSystem, ReadDirResult, VFSCapabilities};

enum Body {
    File(Vec<u8>),
    Dir(BTreeMap<Vec<u8>, fileid3>),
    Link(Vec<u8>),
}

struct Node {
    attr: fattr3,
    parent: fileid3,
    body: Body,
}

struct Fs {
    nodes: Mutex<(HashMap<fileid3, Node>, fileid3)>,
}

fn now() -> nfstime3 {
    let d = SystemTime::now().duration_since(SystemTime::UNIX_EPOCH).unwrap();
    nfstime3 {
        seconds: d.as_secs() as u32,
        nseconds: d.subsec_nanos(),
    }
}

fn new_attr(id: fileid3, ftype: ftype3, mode: u32) -> fattr3 {
    let t = now();
    fattr3 {
        ftype,
        mode,
        nlink: 1,
        uid: 0,
        gid: 0,
        size: 0,
        used: 0,
        rdev: specdata3::default(),
        fsid: 0,
        fileid: id,
        atime: t,
        mtime: t,
        ctime: t,
    }
}

fn apply(attr: &mut fattr3, body: &mut Body, s: &sattr3) {
    if let set_mode3::mode(m) = s.mode {
        attr.mode = m;
    }
    if let set_uid3::uid(u) = s.uid {
        attr.uid = u;
    }
    if let set_gid3::gid(g) = s.gid {
        attr.gid = g;
    }
    if let (set_size3::size(n), Body::File(data)) = (s.size, &mut *body) {
        data.resize(n as usize, 0);
        attr.size = n;
        attr.used = n;
        attr.mtime = now();
    }
    match s.atime {
        set_atime::SET_TO_CLIENT_TIME(t) => attr.atime = t,
        set_atime::SET_TO_SERVER_TIME => attr.atime = now(),
        set_atime::DONT_CHANGE => {}
    }
    match s.mtime {
        set_mtime::SET_TO_CLIENT_TIME(t) => attr.mtime = t,
        set_mtime::SET_TO_SERVER_TIME => attr.mtime = now(),
        set_mtime::DONT_CHANGE => {}
    }
    attr.ctime = now();
}

impl Fs {
    fn new() -> Fs {
        let mut m = HashMap::new();
        m.insert(
            1,
            Node {
                attr: new_attr(1, ftype3::NF3DIR, 0o777),
                parent: 1,
                body: Body::Dir(BTreeMap::new()),
            },
        );
        Fs {
            nodes: Mutex::new((m, 2)),
        }
    }

    fn add(
        &self,
        dir: fileid3,
        name: &filename3,
        ftype: ftype3,
        mode: u32,
        body: Body,
    ) -> Result<(fileid3, fattr3), nfsstat3> {
        let mut g = self.nodes.lock().unwrap();
        let (nodes, next) = &mut *g;
        let id = *next;
        match nodes.get_mut(&dir).map(|n| &mut n.body) {
            Some(Body::Dir(entries)) => {
                if entries.contains_key(&name.0) {
                    return Err(nfsstat3::NFS3ERR_EXIST);
                }
                entries.insert(name.0.clone(), id);
            }
            Some(_) => return Err(nfsstat3::NFS3ERR_NOTDIR),
            None => return Err(nfsstat3::NFS3ERR_NOENT),
        }
        *next += 1;
        let mut attr = new_attr(id, ftype, mode);
        if let Body::Link(t) = &body {
            attr.size = t.len() as u64;
        }
        nodes.insert(
            id,
            Node {
                attr,
                parent: dir,
                body,
            },
        );
        Ok((id, attr))
    }

    fn remove_subtree(nodes: &mut HashMap<fileid3, Node>, id: fileid3) {
        if let Some(n) = nodes.remove(&id) {
            if let Body::Dir(e) = n.body {
                for (_, c) in e {
                    Self::remove_subtree(nodes, c);
                }
            }
        }
    }
}

#[async_trait]
impl NFSFileSystem for Fs {
    fn capabilities(&self) -> VFSCapabilities {
        VFSCapabilities::ReadWrite
    }
    fn root_dir(&self) -> fileid3 {
        1
    }

    async fn lookup(&self, dirid: fileid3, filename: &filename3) -> Result<fileid3, nfsstat3> {
        let g = self.nodes.lock().unwrap();
        let n = g.0.get(&dirid).ok_or(nfsstat3::NFS3ERR_NOENT)?;
        match &n.body {
            Body::Dir(e) => match filename.0.as_slice() {
                b"." => Ok(dirid),
                b".." => Ok(n.parent),
                name => e.get(name).copied().ok_or(nfsstat3::NFS3ERR_NOENT),
            },
            _ => Err(nfsstat3::NFS3ERR_NOTDIR),
        }
    }

    async fn getattr(&self, id: fileid3) -> Result<fattr3, nfsstat3> {
        let g = self.nodes.lock().unwrap();
        g.0.get(&id).map(|n| n.attr).ok_or(nfsstat3::NFS3ERR_NOENT)
    }

    async fn setattr(&self, id: fileid3, setattr: sattr3) -> Result<fattr3, nfsstat3> {
        let mut g = self.nodes.lock().unwrap();
        let n = g.0.get_mut(&id).ok_or(nfsstat3::NFS3ERR_NOENT)?;
        apply(&mut n.attr, &mut n.body, &setattr);
        Ok(n.attr)
    }

    async fn read(&self, id: fileid3, offset: u64, count: u32) -> Result<(Vec<u8>, bool), nfsstat3> {
        let g = self.nodes.lock().unwrap();
        match &g.0.get(&id).ok_or(nfsstat3::NFS3ERR_NOENT)?.body {
            Body::File(d) => {
                let s = (offset as usize).min(d.len());
                let e = (s + count as usize).min(d.len());
                Ok((d[s..e].to_vec(), e == d.len()))
            }
            Body::Dir(_) => Err(nfsstat3::NFS3ERR_ISDIR),
            Body::Link(_) => Err(nfsstat3::NFS3ERR_INVAL),
        }
    }

    async fn write(&self, id: fileid3, offset: u64, data: &[u8]) -> Result<fattr3, nfsstat3> {
        let mut g = self.nodes.lock().unwrap();
        let n = g.0.get_mut(&id).ok_or(nfsstat3::NFS3ERR_NOENT)?;
        match &mut n.body {
            Body::File(d) => {
                let end = offset as usize + data.len();
                if d.len() < end {
                    d.resize(end, 0);
                }
                d[offset as usize..end].copy_from_slice(data);
                n.attr.size = d.len() as u64;
                n.attr.used = d.len() as u64;
                n.attr.mtime = now();
                n.attr.ctime = n.attr.mtime;
                Ok(n.attr)
            }
            Body::Dir(_) => Err(nfsstat3::NFS3ERR_ISDIR),
            Body::Link(_) => Err(nfsstat3::NFS3ERR_INVAL),
        }
    }

    async fn create(&self, dirid: fileid3, filename: &filename3, attr: sattr3) -> Result<(fileid3, fattr3), nfsstat3> {
        let (id, _) = self.add(dirid, filename, ftype3::NF3REG, 0o644, Body::File(Vec::new()))?;
        let a = self.setattr(id, attr).await?;
        Ok((id, a))
    }

    async fn create_exclusive(&self, dirid: fileid3, filename: &filename3) -> Result<fileid3, nfsstat3> {
        Ok(self
            .add(dirid, filename, ftype3::NF3REG, 0o644, Body::File(Vec::new()))?
            .0)
    }

    async fn mkdir(&self, dirid: fileid3, dirname: &filename3) -> Result<(fileid3, fattr3), nfsstat3> {
        self.add(dirid, dirname, ftype3::NF3DIR, 0o755, Body::Dir(BTreeMap::new()))
    }

    async fn remove(&self, dirid: fileid3, filename: &filename3) -> Result<(), nfsstat3> {
        let mut g = self.nodes.lock().unwrap();
        let nodes = &mut g.0;
        let id = match nodes.get_mut(&dirid).map(|n| &mut n.body) {
            Some(Body::Dir(e)) => e.remove(&filename.0).ok_or(nfsstat3::NFS3ERR_NOENT)?,
            _ => return Err(nfsstat3::NFS3ERR_NOTDIR),
        };
        Self::remove_subtree(nodes, id);
        Ok(())
    }

    async fn rename(
        &self,
        from_dirid: fileid3,
        from_filename: &filename3,
        to_dirid: fileid3,
        to_filename: &filename3,
    ) -> Result<(), nfsstat3> {
        let mut g = self.nodes.lock().unwrap();
        let nodes = &mut g.0;
        let id = match nodes.get_mut(&from_dirid).map(|n| &mut n.body) {
            Some(Body::Dir(e)) => e.remove(&from_filename.0).ok_or(nfsstat3::NFS3ERR_NOENT)?,
            _ => return Err(nfsstat3::NFS3ERR_NOTDIR),
        };
        let old = match nodes.get_mut(&to_dirid).map(|n| &mut n.body) {
            Some(Body::Dir(e)) => e.insert(to_filename.0.clone(), id),
            _ => return Err(nfsstat3::NFS3ERR_NOTDIR),
        };
        if let Some(old) = old.filter(|&o| o != id) {
            Self::remove_subtree(nodes, old);
        }
        if let Some(n) = nodes.get_mut(&id) {
            n.parent = to_dirid;
        }
        Ok(())
    }

    async fn readdir(
        &self,
        dirid: fileid3,
        start_after: fileid3,
        max_entries: usize,
    ) -> Result<ReadDirResult, nfsstat3> {
        let g = self.nodes.lock().unwrap();
        let nodes = &g.0;
        let entries = match &nodes.get(&dirid).ok_or(nfsstat3::NFS3ERR_NOENT)?.body {
            Body::Dir(e) => e,
            _ => return Err(nfsstat3::NFS3ERR_NOTDIR),
        };
        let mut it = entries.iter().peekable();
        if start_after != 0 {
            // Resume right after the entry with that fileid (names are in a stable order).
            if !entries.values().any(|&v| v == start_after) {
                return Err(nfsstat3::NFS3ERR_BAD_COOKIE);
            }
            for (_, &v) in it.by_ref() {
                if v == start_after {
                    break;
                }
            }
        }
        let mut out = Vec::new();
        while out.len() < max_entries {
            match it.next() {
                Some((name, &id)) => out.push(DirEntry {
                    fileid: id,
                    name: name.clone().into(),
                    attr: nodes[&id].attr,
                }),
                None => break,
            }
        }
        let end = it.peek().is_none();
        Ok(ReadDirResult { entries: out, end })
    }

    async fn fsinfo(&self, root: fileid3) -> Result<nfsserve::nfs::fsinfo3, nfsstat3> {
        let mut info = nfsserve::nfs::fsinfo3 {
            obj_attributes: nfsserve::nfs::post_op_attr::attributes(self.getattr(root).await?),
            rtmax: 1024 * 1024,
            rtpref: 1024 * 1024,
            rtmult: 4096,
            wtmax: 1024 * 1024,
            wtpref: 1024 * 1024,
            wtmult: 4096,
            dtpref: 64 * 1024,
            maxfilesize: 128 * 1024 * 1024 * 1024,
            time_delta: nfstime3 {
                seconds: 0,
                nseconds: 1,
            },
            properties: nfsserve::nfs::FSF_SYMLINK | nfsserve::nfs::FSF_HOMOGENEOUS | nfsserve::nfs::FSF_CANSETTIME,
        };
        if let Some(d) = std::env::var("MEMFS_DTPREF").ok().and_then(|v| v.parse().ok()) {
            info.dtpref = d;
        }
        Ok(info)
    }

    async fn symlink(
        &self,
        dirid: fileid3,
        linkname: &filename3,
        symlink: &nfspath3,
        _attr: &sattr3,
    ) -> Result<(fileid3, fattr3), nfsstat3> {
        self.add(dirid, linkname, ftype3::NF3LNK, 0o777, Body::Link(symlink.0.clone()))
    }

    async fn readlink(&self, id: fileid3) -> Result<nfspath3, nfsstat3> {
        let g = self.nodes.lock().unwrap();
        match &g.0.get(&id).ok_or(nfsstat3::NFS3ERR_NOENT)?.body {
            Body::Link(t) => Ok(t.clone().into()),
            _ => Err(nfsstat3::NFS3ERR_INVAL),
        }
    }
}

#[tokio::main]
async fn main() -> std::io::Result<()> {
    let addr = std::env::args().nth(1).unwrap_or_else(|| "127.0.0.1:11111".into());
    let listener = NFSTcpListener::bind(&addr, Fs::new()).await?;
    let port = listener.get_listen_port();
    println!("mount -t nfs -o vers=3,proto=tcp,port={port},mountport={port},nolock,hard 127.0.0.1:/ <mountpoint>");
    listener.handle_forever().await
}
