//! A tiny in-memory file system for the dispatcher's tests: inode 1 is the root directory, and
//! every method that serves a call records its name and the call's context.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};

use async_trait::async_trait;

use crate::nfs::*;
use crate::vfs::*;

pub(super) struct Node {
    parent: fileid3,
    name: Vec<u8>,
    dir: bool,
    data: Vec<u8>,
}

/// Inode 1 is the root directory. Every method that serves a call records its name and context.
pub(super) struct MemFs {
    nodes: Mutex<BTreeMap<fileid3, Node>>,
    seen: Mutex<Vec<(&'static str, CallContext)>>,
}

impl MemFs {
    pub(super) fn new() -> Arc<MemFs> {
        let mut nodes = BTreeMap::new();
        nodes.insert(
            1,
            Node {
                parent: 1,
                name: Vec::new(),
                dir: true,
                data: Vec::new(),
            },
        );
        Arc::new(MemFs {
            nodes: Mutex::new(nodes),
            seen: Mutex::new(Vec::new()),
        })
    }

    pub(super) fn add(&self, parent: fileid3, name: &[u8], dir: bool) -> fileid3 {
        let mut nodes = self.nodes.lock().unwrap();
        let id = nodes.keys().last().unwrap() + 1;
        nodes.insert(
            id,
            Node {
                parent,
                name: name.to_vec(),
                dir,
                data: Vec::new(),
            },
        );
        id
    }

    pub(super) fn saw(&self, what: &'static str, cx: &CallContext) {
        self.seen.lock().unwrap().push((what, cx.clone()));
    }

    pub(super) fn seen(&self) -> Vec<(&'static str, CallContext)> {
        std::mem::take(&mut *self.seen.lock().unwrap())
    }

    pub(super) fn names_seen(&self) -> Vec<&'static str> {
        self.seen().into_iter().map(|(n, _)| n).collect()
    }

    pub(super) fn attr(id: fileid3, n: &Node) -> fattr3 {
        fattr3 {
            ftype: if n.dir { ftype3::NF3DIR } else { ftype3::NF3REG },
            mode: if n.dir { 0o755 } else { 0o644 },
            nlink: 1,
            size: n.data.len() as u64,
            used: n.data.len() as u64,
            fileid: id,
            ..Default::default()
        }
    }
}

#[async_trait]
impl NFSFileSystem for MemFs {
    fn capabilities(&self) -> VFSCapabilities {
        VFSCapabilities::ReadWrite
    }

    fn root_dir(&self) -> fileid3 {
        1
    }

    async fn lookup(&self, cx: &CallContext, dirid: fileid3, filename: &filename3) -> Result<fileid3, nfsstat3> {
        self.saw("lookup", cx);
        let nodes = self.nodes.lock().unwrap();
        match nodes.get(&dirid) {
            None => return Err(nfsstat3::NFS3ERR_STALE),
            Some(d) if !d.dir => return Err(nfsstat3::NFS3ERR_NOTDIR),
            _ => {}
        }
        nodes
            .iter()
            .find(|(&id, n)| id != 1 && n.parent == dirid && n.name == filename.0)
            .map(|(&id, _)| id)
            .ok_or(nfsstat3::NFS3ERR_NOENT)
    }

    async fn getattr(&self, cx: &CallContext, id: fileid3) -> Result<fattr3, nfsstat3> {
        self.saw("getattr", cx);
        let nodes = self.nodes.lock().unwrap();
        nodes
            .get(&id)
            .map(|n| MemFs::attr(id, n))
            .ok_or(nfsstat3::NFS3ERR_STALE)
    }

    async fn setattr(&self, cx: &CallContext, _id: fileid3, _setattr: sattr3) -> Result<fattr3, nfsstat3> {
        self.saw("setattr", cx);
        Err(nfsstat3::NFS3ERR_NOTSUPP)
    }

    async fn read(&self, cx: &CallContext, id: fileid3, offset: u64, count: u32) -> Result<(Vec<u8>, bool), nfsstat3> {
        self.saw("read", cx);
        let nodes = self.nodes.lock().unwrap();
        let n = nodes.get(&id).ok_or(nfsstat3::NFS3ERR_STALE)?;
        let start = (offset as usize).min(n.data.len());
        let end = (start + count as usize).min(n.data.len());
        Ok((n.data[start..end].to_vec(), end == n.data.len()))
    }

    async fn write(&self, cx: &CallContext, id: fileid3, offset: u64, data: &[u8]) -> Result<fattr3, nfsstat3> {
        self.saw("write", cx);
        let mut nodes = self.nodes.lock().unwrap();
        let n = nodes.get_mut(&id).ok_or(nfsstat3::NFS3ERR_STALE)?;
        let end = offset as usize + data.len();
        if n.data.len() < end {
            n.data.resize(end, 0);
        }
        n.data[offset as usize..end].copy_from_slice(data);
        Ok(MemFs::attr(id, n))
    }

    async fn create(
        &self,
        cx: &CallContext,
        dirid: fileid3,
        filename: &filename3,
        _attr: sattr3,
    ) -> Result<(fileid3, fattr3), nfsstat3> {
        self.saw("create", cx);
        let id = self.add(dirid, filename, false);
        let nodes = self.nodes.lock().unwrap();
        Ok((id, MemFs::attr(id, &nodes[&id])))
    }

    async fn create_exclusive(
        &self,
        cx: &CallContext,
        dirid: fileid3,
        filename: &filename3,
        _verifier: createverf3,
    ) -> Result<(fileid3, fattr3), nfsstat3> {
        self.saw("create_exclusive", cx);
        let id = self.add(dirid, filename, false);
        let nodes = self.nodes.lock().unwrap();
        Ok((id, MemFs::attr(id, &nodes[&id])))
    }

    async fn mkdir(
        &self,
        cx: &CallContext,
        dirid: fileid3,
        dirname: &filename3,
    ) -> Result<(fileid3, fattr3), nfsstat3> {
        self.saw("mkdir", cx);
        let id = self.add(dirid, dirname, true);
        let nodes = self.nodes.lock().unwrap();
        Ok((id, MemFs::attr(id, &nodes[&id])))
    }

    async fn remove(&self, cx: &CallContext, dirid: fileid3, filename: &filename3) -> Result<(), nfsstat3> {
        self.saw("remove", cx);
        let id = self.lookup(cx, dirid, filename).await?;
        self.nodes.lock().unwrap().remove(&id);
        Ok(())
    }

    async fn rmdir(&self, cx: &CallContext, dirid: fileid3, filename: &filename3) -> Result<(), nfsstat3> {
        self.saw("rmdir", cx);
        let id = self.lookup(cx, dirid, filename).await?;
        if !self.nodes.lock().unwrap()[&id].dir {
            return Err(nfsstat3::NFS3ERR_NOTDIR);
        }
        self.nodes.lock().unwrap().remove(&id);
        Ok(())
    }

    async fn rename(
        &self,
        cx: &CallContext,
        _from_dirid: fileid3,
        _from_filename: &filename3,
        _to_dirid: fileid3,
        _to_filename: &filename3,
    ) -> Result<(), nfsstat3> {
        self.saw("rename", cx);
        Err(nfsstat3::NFS3ERR_NOTSUPP)
    }

    /// Entries in inode order; an entry's cookie is its inode number.
    async fn readdir(
        &self,
        cx: &CallContext,
        dirid: fileid3,
        start_after: fileid3,
        max_entries: usize,
    ) -> Result<ReadDirResult, nfsstat3> {
        self.saw("readdir", cx);
        let nodes = self.nodes.lock().unwrap();
        let mut children = nodes
            .iter()
            .filter(|(&id, n)| id != 1 && n.parent == dirid && id > start_after)
            .map(|(&id, n)| DirEntry {
                fileid: id,
                name: n.name.clone().into(),
                attr: MemFs::attr(id, n),
                cookie: id,
            });
        let entries: Vec<DirEntry> = children.by_ref().take(max_entries).collect();
        let end = children.next().is_none();
        Ok(ReadDirResult { entries, end })
    }

    async fn symlink(
        &self,
        cx: &CallContext,
        _dirid: fileid3,
        _linkname: &filename3,
        _symlink: &nfspath3,
        _attr: &sattr3,
    ) -> Result<(fileid3, fattr3), nfsstat3> {
        self.saw("symlink", cx);
        Err(nfsstat3::NFS3ERR_NOTSUPP)
    }

    async fn readlink(&self, cx: &CallContext, _id: fileid3) -> Result<nfspath3, nfsstat3> {
        self.saw("readlink", cx);
        Err(nfsstat3::NFS3ERR_INVAL)
    }
}
