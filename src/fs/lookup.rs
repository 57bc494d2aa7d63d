//! Reading the namespace: attributes, lookups, listings, symlink targets, and the staged
//! copy's bookkeeping that reads share with changes. Directories are brought in line with S3
//! here, when stale (see [`super::listing`]).

use super::*;

impl Volume {
    pub async fn getattr(&self, ino: Ino) -> FsResult<Attr> {
        let mut inode = self.inode(ino)?;
        // A client revalidating an open file asks its handle, not its directory: refresh the
        // directory (once per refresh interval) so changes made in S3 by others reach it too.
        if ino != ROOT_INO && self.freshness.stale(inode.parent) {
            if let Ok(parent) = self.inode(inode.parent) {
                // Boxed, as is `load_meta` below: these rare paths to S3 hold large states, which
                // every GETATTR's future would otherwise carry and copy.
                Box::pin(self.refresh_dir(&parent, false)).await?;
                inode = self.inode(ino)?;
            }
        }
        if !inode.meta_loaded {
            inode = Box::pin(self.load_meta(inode)).await?;
        } else {
            self.note_open(&inode);
        }
        Ok(self.attr_of(&inode))
    }

    /// An inode's attributes as the volume holds them, for the attributes an NFS reply carries
    /// beside its result: no revalidation against S3 (the operation did its own), unless the
    /// object's metadata was never read.
    pub async fn reply_attr(&self, ino: Ino) -> FsResult<Attr> {
        let inode = self.inode(ino)?;
        if !inode.meta_loaded {
            return Box::pin(self.getattr(ino)).await;
        }
        self.note_open(&inode); // LOOKUP's attributes may be all an open asks for
        Ok(self.attr_of(&inode))
    }

    /// Reads the `x-amz-meta-*` attributes of an object found by a listing (once): a HEAD, or
    /// for a small object a GET that brings its bytes too (the READ that usually follows an
    /// open then finds them in the cache).
    pub(super) async fn load_meta(&self, inode: Inode) -> FsResult<Inode> {
        let loaded = self.fetch_meta(inode, SMALL_OBJECT).await?;
        self.note_cold_open(&loaded);
        Ok(loaded)
    }

    /// [`Volume::load_meta`] without telling the read-ahead about it (a listing's loads);
    /// objects up to `small` bytes come whole.
    pub(super) async fn fetch_meta(&self, inode: Inode, small: u64) -> FsResult<Inode> {
        if inode.meta_loaded {
            return Ok(inode);
        }
        let Some(remote) = inode.remote.clone() else {
            return Ok(inode);
        };
        let max = if remote.size <= small { small } else { 0 };
        let fetched = self.store.head_and_get(&remote.key, max).await?;
        self.apply_meta(inode.ino, &remote, fetched).await
    }

    /// Takes what [`ObjectStore::head_and_get`] brought for `ino`'s object `remote`: its
    /// attributes (and a symlink's target) into the namespace, its bytes into the read cache.
    pub(crate) async fn apply_meta(
        &self,
        ino: Ino,
        remote: &crate::meta::Remote,
        fetched: Option<(crate::store::ObjectMeta, Option<bytes::Bytes>)>,
    ) -> FsResult<Inode> {
        let _g = self.ns.lock().await;
        let mut cur = self.inode(ino)?;
        // The bytes are the listed version's only if the ETag says so.
        let bytes = fetched.as_ref().and_then(|(h, b)| {
            b.clone()
                .filter(|b| b.len() as u64 == remote.size && h.etag == remote.etag)
        });
        if let (Some(b), Kind::File) = (&bytes, cur.kind) {
            self.cache.prime(cur.ino, &remote.etag, b.clone());
        }
        if cur.meta_loaded || cur.remote.as_ref().is_some_and(|r| r.etag != remote.etag) {
            return Ok(cur); // loaded meanwhile, or another version now: its own load will come
        }
        if let Some((h, _)) = fetched {
            names::apply_user_meta(&mut cur, &h.user);
            if cur.kind == Kind::Symlink && cur.target.is_empty() {
                drop(_g);
                let target = match bytes {
                    Some(b) => b.slice(..b.len().min(4096)),
                    None => self.store.get_range(&remote.key, 0..4096).await?,
                };
                let _g = self.ns.lock().await;
                let mut again = self.inode(ino)?;
                again.kind = Kind::Symlink;
                again.mode = cur.mode;
                again.uid = cur.uid;
                again.gid = cur.gid;
                again.mtime = cur.mtime;
                again.target = target.to_vec();
                again.meta_loaded = true;
                let mut b = Batch::new();
                b.put_inode(&again);
                self.meta.commit(b)?;
                return Ok(again);
            }
            if cur.kind != Kind::File {
                self.cache.forget(cur.ino); // a special file after all: no bytes to read
            }
        } else if cur.kind == Kind::Dir {
            // A directory that is only a prefix, with no marker object: the defaults stand,
            // and there is no object of its own to move or delete.
            cur.remote = None;
        } // else a file deleted meanwhile; the next listing removes it
        cur.meta_loaded = true;
        let mut b = Batch::new();
        b.put_inode(&cur);
        self.meta.commit(b)?;
        Ok(cur)
    }

    pub async fn lookup(&self, cred: &Cred, dir: Ino, name: &[u8]) -> FsResult<Ino> {
        let d = self.inode(dir)?;
        if d.kind != Kind::Dir {
            return Err(FsError::NotDir);
        }
        perm::check(cred, &d, perm::X)?;
        if name == b"." {
            return Ok(dir);
        }
        if name == b".." {
            return Ok(d.parent);
        }
        self.refresh_dir(&d, false).await?;
        let entry = match self.meta.lookup(dir, name)? {
            Some(ino) => ino,
            // Still stale: a large directory relisting in the background. A name it lacks may
            // be new in S3: NOENT only after S3 said so.
            None if self.freshness.stale(dir) => {
                self.list_dir(&d).await?;
                self.meta.lookup(dir, name)?.ok_or(FsError::NotFound)?
            }
            None => return Err(FsError::NotFound),
        };
        self.file_of(entry)
    }

    pub async fn readlink(&self, ino: Ino) -> FsResult<Vec<u8>> {
        let mut inode = self.inode(ino)?;
        if !inode.meta_loaded {
            inode = Box::pin(self.load_meta(inode)).await?;
        }
        if inode.kind != Kind::Symlink {
            return Err(FsError::Invalid("not a symlink".into()));
        }
        Ok(inode.target)
    }

    /// Entries of `dir` after the one with inode number `after` (0: from the start).
    pub async fn readdir(&self, cred: &Cred, dir: Ino, after: Ino, max: usize) -> FsResult<(Vec<DirEntry>, bool)> {
        let d = self.inode(dir)?;
        if d.kind != Kind::Dir {
            return Err(FsError::NotDir);
        }
        perm::check(cred, &d, perm::R)?;
        // Refresh only when a listing starts: a listing in progress resumes over a stable order.
        if after == 0 {
            self.refresh_dir(&d, false).await?;
        }
        let kids = self.meta.children(dir, after, max + 1)?;
        let end = kids.len() <= max;
        let mut out = Vec::with_capacity(kids.len().min(max));
        let mut unloaded = Vec::new();
        for (cookie, name) in kids.into_iter().take(max) {
            let Some(mut inode) = self.meta.inode(cookie)? else {
                continue;
            };
            if let Kind::Link(file) = inode.kind {
                let Some(f) = self.meta.inode(file)? else {
                    continue;
                };
                inode = f;
            }
            if !inode.meta_loaded {
                unloaded.push(out.len());
            }
            out.push(DirEntry {
                ino: inode.ino,
                name,
                attr: self.attr_of(&inode),
                cookie,
            });
        }
        // Objects found by a listing: read their attributes in parallel, not one HEAD at a time.
        use futures::StreamExt;
        let todo: Vec<(usize, Ino)> = unloaded.into_iter().map(|i| (i, out[i].ino)).collect();
        // Not as opens: what a listing loads says nothing about the order files are read in.
        let loaded: Vec<(usize, FsResult<Attr>)> = futures::stream::iter(todo)
            .map(|(i, ino)| async move {
                let attr = match self.inode(ino) {
                    Ok(inode) => self
                        .fetch_meta(inode, LISTED_SMALL_OBJECT)
                        .await
                        .map(|i| self.attr_of(&i)),
                    Err(e) => Err(e),
                };
                (i, attr)
            })
            .buffer_unordered(32)
            .collect()
            .await;
        for (i, attr) in loaded {
            if let Ok(a) = attr {
                out[i].attr = a;
            }
        }
        Ok((out, end))
    }

    /// Removes an inode and everything under it from the namespace (not from S3).
    pub(super) fn forget_subtree(&self, batch: &mut Batch, inode: &Inode) -> FsResult<()> {
        let mut stack = vec![inode.clone()];
        while let Some(i) = stack.pop() {
            if i.kind == Kind::Dir {
                for ino in self.meta.child_inos(i.ino) {
                    if let Some(c) = self.meta.inode(ino?)? {
                        stack.push(c);
                    }
                }
                self.freshness.forget(i.ino);
            }
            self.forget_links(batch, &i)?;
            // Keys failed uploads of it may have written: S3 no longer has its object, so
            // whatever else it may have left there goes too.
            self.release_maybe_written(batch, i.ino, i.remote.as_ref().map(|r| r.key.as_str()))?;
            batch.unlink(i.parent, &i.name, i.ino, i.kind);
            batch.del_inode(i.ino);
            self.drop_staged(i.ino);
        }
        Ok(())
    }
}
