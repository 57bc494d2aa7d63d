//! Changing the namespace: create, mkdir, symlink, mknod, remove, rename, setattr. Each change
//! is one journal batch under the namespace lock (`ns`), with a `P` record for the uploader.

use super::*;

impl Volume {
    /// A new inode in `dir`, owned as `cred` creates it there (see [`perm::new_owner`]).
    pub(super) fn new_inode(
        &self,
        batch: &mut Batch,
        cred: &Cred,
        dir: &Inode,
        name: &[u8],
        kind: Kind,
        mode: u32,
    ) -> Inode {
        let (uid, gid, mode) = perm::new_owner(cred, dir, kind, mode);
        let ino = self.alloc_ino_at(batch, || {
            let slash = if kind == Kind::Dir { "/" } else { "" };
            Some(format!(
                "{}{}{slash}",
                self.dir_prefix(dir).ok()?,
                std::str::from_utf8(name).ok()?
            ))
        });
        Inode::new(ino, dir.ino, name, kind, mode, (uid, gid), Time::now())
    }

    /// Common checks for a new entry: the directory exists, is fresh and `cred` may write in
    /// it, the name is valid, the key fits in S3.
    pub(super) async fn prepare_new(&self, cred: &Cred, dir: Ino, name: &[u8]) -> FsResult<Inode> {
        let d = self.inode(dir)?;
        if d.kind != Kind::Dir {
            return Err(FsError::NotDir);
        }
        perm::check(cred, &d, perm::W | perm::X)?;
        let n = check_name(name)?;
        if self.dir_prefix(&d)?.len() + n.len() + 1 > names::KEY_MAX {
            return Err(FsError::NameTooLong);
        }
        self.refresh_dir(&d, false).await?;
        Ok(d)
    }

    /// Updates a directory's times. Reads it afresh (the caller holds `ns`): a copy read before
    /// the lock could carry stale fields over what an upload recorded meanwhile.
    pub(super) fn touch_dir(&self, batch: &mut Batch, dir: Ino) -> FsResult<()> {
        let mut d = self.inode(dir)?;
        d.mtime = Time::now();
        d.ctime = d.mtime;
        batch.put_inode(&d);
        Ok(())
    }

    /// Enters a new inode in its directory, to be created in S3 by the flusher.
    pub(super) fn commit_new(&self, mut batch: Batch, inode: &Inode) -> FsResult<()> {
        batch.put_inode(inode);
        batch.link(inode.parent, &inode.name, inode.ino, inode.kind);
        batch.mark_pending(inode.ino, self.next_seq());
        self.touch_dir(&mut batch, inode.parent)?;
        self.meta.commit(batch)?;
        self.usage.created();
        Ok(())
    }

    pub async fn create(&self, cred: &Cred, dir: Ino, name: &[u8], attr: SetAttr, exclusive: bool) -> FsResult<Attr> {
        let how = if exclusive { How::Guarded } else { How::Unchecked };
        self.create_as(cred, dir, name, attr, how).await
    }

    /// NFS's exclusive CREATE: the client's `verifier` is kept in the new file's access and
    /// modification times (seconds; as knfsd keeps it), until the client sets them, which the
    /// Linux client does at once. The same CREATE sent again (its reply lost to a restart of the
    /// gateway or a broken connection) finds the file with its verifier and succeeds, where
    /// any other exclusive CREATE of the name fails with EXIST.
    pub async fn create_exclusive(&self, cred: &Cred, dir: Ino, name: &[u8], verifier: u64) -> FsResult<Attr> {
        self.create_as(cred, dir, name, SetAttr::default(), How::Exclusive(verifier))
            .await
    }

    async fn create_as(&self, cred: &Cred, dir: Ino, name: &[u8], attr: SetAttr, how: How) -> FsResult<Attr> {
        let d = self.prepare_new(cred, dir, name).await?;
        let g = self.ns.lock().await;
        if let Some(existing) = self.meta.lookup(dir, name)? {
            let existing = self.file_of(existing)?;
            let inode = self.inode(existing)?;
            match how {
                How::Exclusive(v) if inode.kind == Kind::File && verifier_times(v) == (inode.atime, inode.mtime) => {
                    return Ok(self.attr_of(&inode)); // our own CREATE, sent again
                }
                How::Exclusive(_) | How::Guarded => return Err(FsError::Exists),
                How::Unchecked => {}
            }
            if inode.kind == Kind::Dir {
                return Err(FsError::IsDir);
            }
            drop(g);
            // UNCHECKED create of an existing file is an open(O_CREAT) of it: only O_TRUNC's
            // size 0 applies, as knfsd does; the mode and owner asked for are for a new file.
            let only_size = SetAttr {
                size: attr.size,
                ..SetAttr::default()
            };
            return self.setattr(cred, existing, only_size).await;
        }
        let mut batch = Batch::new();
        let mut inode = self.new_inode(&mut batch, cred, &d, name, Kind::File, attr.mode.unwrap_or(0o644));
        apply_owner(&mut inode, cred, &attr);
        if let Some(SetTime::At(t)) = attr.mtime {
            inode.mtime = t;
        }
        if let How::Exclusive(v) = how {
            (inode.atime, inode.mtime) = verifier_times(v);
        }
        let st = Staged::open(inode.ino, self.staging.shared_dir(), true, &self.cfg)?;
        st.changed();
        *st.mtime.locked() = inode.mtime;
        self.commit_new(batch, &inode)?;
        self.staging.insert(Arc::new(st));
        drop(g);
        Ok(self.attr_of(&inode))
    }

    pub async fn mkdir(&self, cred: &Cred, dir: Ino, name: &[u8], attr: SetAttr) -> FsResult<Attr> {
        let d = self.prepare_new(cred, dir, name).await?;
        let _g = self.ns.lock().await;
        if self.meta.lookup(dir, name)?.is_some() {
            return Err(FsError::Exists);
        }
        let mut batch = Batch::new();
        let mut inode = self.new_inode(&mut batch, cred, &d, name, Kind::Dir, attr.mode.unwrap_or(0o755));
        apply_owner(&mut inode, cred, &attr);
        self.commit_new(batch, &inode)?;
        // A new directory has nothing in S3 to list.
        self.freshness.note_listed(inode.ino, self.cfg.clock.now());
        drop(_g);
        self.in_s3(&[], vec![inode.ino]).await?;
        Ok(self.attr_of(&inode))
    }

    pub async fn symlink(&self, cred: &Cred, dir: Ino, name: &[u8], target: &[u8], attr: SetAttr) -> FsResult<Attr> {
        let d = self.prepare_new(cred, dir, name).await?;
        if target.is_empty() || target.len() > 4095 {
            return Err(FsError::Invalid("symlink target must be 1 to 4095 bytes".into()));
        }
        let _g = self.ns.lock().await;
        if self.meta.lookup(dir, name)?.is_some() {
            return Err(FsError::Exists);
        }
        let mut batch = Batch::new();
        let mut inode = self.new_inode(&mut batch, cred, &d, name, Kind::Symlink, attr.mode.unwrap_or(0o777));
        apply_owner(&mut inode, cred, &attr);
        inode.target = target.to_vec();
        inode.size = target.len() as u64;
        self.commit_new(batch, &inode)?;
        drop(_g);
        self.in_s3(&[], vec![inode.ino]).await?;
        Ok(self.attr_of(&inode))
    }

    /// MKNOD: a fifo, a socket or a device, stored as an empty object whose metadata gives its
    /// type (and device number) the way s3fs writes them.
    pub async fn mknod(&self, cred: &Cred, dir: Ino, name: &[u8], kind: Kind, attr: SetAttr) -> FsResult<Attr> {
        if !kind.is_special() {
            return Err(FsError::Invalid("mknod makes fifos, sockets and devices only".into()));
        }
        if matches!(kind, Kind::CharDev(_) | Kind::BlockDev(_)) && !cred.is_root() {
            return Err(FsError::NotOwner);
        }
        let d = self.prepare_new(cred, dir, name).await?;
        let _g = self.ns.lock().await;
        if self.meta.lookup(dir, name)?.is_some() {
            return Err(FsError::Exists);
        }
        let mut batch = Batch::new();
        let mut inode = self.new_inode(&mut batch, cred, &d, name, kind, attr.mode.unwrap_or(0o644));
        apply_owner(&mut inode, cred, &attr);
        self.commit_new(batch, &inode)?;
        drop(_g);
        self.in_s3(&[], vec![inode.ino]).await?;
        Ok(self.attr_of(&inode))
    }

    /// Removes an entry of any kind (an empty directory included).
    pub async fn remove(&self, cred: &Cred, dir: Ino, name: &[u8]) -> FsResult<()> {
        self.remove_entry(cred, dir, name, None).await
    }

    /// REMOVE: anything but a directory (ISDIR for one).
    pub async fn unlink(&self, cred: &Cred, dir: Ino, name: &[u8]) -> FsResult<()> {
        self.remove_entry(cred, dir, name, Some(false)).await
    }

    /// RMDIR: an empty directory only (NOTDIR for anything else).
    pub async fn rmdir(&self, cred: &Cred, dir: Ino, name: &[u8]) -> FsResult<()> {
        self.remove_entry(cred, dir, name, Some(true)).await
    }

    /// `want_dir`: Some(true) for RMDIR, Some(false) for REMOVE, None for either.
    pub(super) async fn remove_entry(
        &self,
        cred: &Cred,
        dir: Ino,
        name: &[u8],
        want_dir: Option<bool>,
    ) -> FsResult<()> {
        let d = self.inode(dir)?;
        if d.kind != Kind::Dir {
            return Err(FsError::NotDir);
        }
        perm::check(cred, &d, perm::X)?;
        self.refresh_dir(&d, false).await?;
        let ino = self.meta.lookup(dir, name)?.ok_or(FsError::NotFound)?;
        let victim = self.inode(ino)?;
        match (want_dir, victim.kind == Kind::Dir) {
            (Some(true), false) => return Err(FsError::NotDir),
            (Some(false), true) => return Err(FsError::IsDir),
            _ => {}
        }
        if victim.kind == Kind::Dir {
            // Children only S3 knows about count too, as of a listing younger than the refresh
            // interval like every other access: `rm -r` has just listed each directory for
            // READDIRPLUS. A child another client adds within that interval is not lost: the
            // marker's deletion leaves it, and the directory shows again at the next listing.
            self.refresh_dir(&victim, false).await?;
        }
        let _g = self.ns.lock().await;
        if self.meta.lookup(dir, name)? != Some(ino) {
            return Err(FsError::NotFound);
        }
        // Read again under the lock: an upload may have recorded a new object for it meanwhile,
        // and that is the object to delete.
        let victim = self.inode(ino)?;
        perm::check_delete(cred, &self.inode(dir)?, &self.inode(self.file_of(ino)?)?)?;
        if victim.kind == Kind::Dir && self.meta.has_children(ino)? {
            return Err(FsError::NotEmpty);
        }
        let mut batch = Batch::new();
        self.drop_name(&mut batch, &victim)?;
        self.touch_dir(&mut batch, dir)?;
        self.meta.commit(batch)?;
        self.usage.changed();
        drop(_g);
        // A file with other names lives on, moved to one of them: that move is this change too.
        self.in_s3(&[], vec![victim.ino]).await?;
        Ok(())
    }

    pub async fn rename(&self, cred: &Cred, from_dir: Ino, from: &[u8], to_dir: Ino, to: &[u8]) -> FsResult<()> {
        let moved = self.rename_in_journal(cred, from_dir, from, to_dir, to).await?;
        self.in_s3(&[], moved).await
    }

    /// RENAME's change, journalled; the inodes it left to move in S3: the one renamed,
    /// everything under it, and the file it replaced, which moves to another of its names if
    /// it has one (none when nothing moved).
    async fn rename_in_journal(
        &self,
        cred: &Cred,
        from_dir: Ino,
        from: &[u8],
        to_dir: Ino,
        to: &[u8],
    ) -> FsResult<Vec<Ino>> {
        let fd = self.inode(from_dir)?;
        if fd.kind != Kind::Dir {
            return Err(FsError::NotDir);
        }
        perm::check(cred, &fd, perm::X)?;
        let _ = self.prepare_new(cred, to_dir, to).await?;
        self.refresh_dir(&fd, false).await?;
        let ino = self.meta.lookup(from_dir, from)?.ok_or(FsError::NotFound)?;
        let src = self.inode(ino)?;
        if src.kind == Kind::Dir {
            // Every object under it moves: the whole subtree must be known first.
            self.load_subtree(&src).await?;
        }
        if let Some(t) = self.meta.lookup(to_dir, to)? {
            let t = self.inode(t)?;
            if t.kind == Kind::Dir {
                self.refresh_dir(&t, true).await?;
            }
        }
        let _g = self.ns.lock().await;
        let mut src = self.inode(ino)?;
        if self.meta.lookup(from_dir, from)? != Some(ino) {
            return Err(FsError::NotFound);
        }
        let src_file = self.inode(self.file_of(ino)?)?;
        perm::check_delete(cred, &self.inode(from_dir)?, &src_file)?;
        if from_dir == to_dir && from == to {
            return Ok(Vec::new());
        }
        // No directory may move under itself.
        if src.kind == Kind::Dir {
            let mut cur = to_dir;
            loop {
                if cur == ino {
                    return Err(FsError::Invalid("cannot move a directory into itself".into()));
                }
                if cur == ROOT_INO {
                    break;
                }
                cur = self.inode(cur)?.parent;
            }
            // Its ".." changes: that is a write to it.
            if to_dir != from_dir {
                perm::check(cred, &src, perm::W)?;
            }
        }
        let mut batch = Batch::new();
        let mut moved = Vec::new();
        if let Some(tino) = self.meta.lookup(to_dir, to)? {
            let target = self.inode(tino)?;
            if self.file_of(tino)? == src_file.ino {
                // Two names of one file: rename(2) does nothing and succeeds.
                return Ok(Vec::new());
            }
            perm::check_delete(cred, &self.inode(to_dir)?, &self.inode(self.file_of(tino)?)?)?;
            match (src.kind == Kind::Dir, target.kind == Kind::Dir) {
                (true, false) => return Err(FsError::NotDir),
                (false, true) => return Err(FsError::IsDir),
                (true, true) if self.meta.has_children(tino)? => return Err(FsError::NotEmpty),
                _ => {}
            }
            // The moved object lands on the target's key, replacing it; only a directory's
            // marker needs deleting (the source's key differs from it only by being elsewhere).
            self.drop_name(&mut batch, &target)?;
            moved.push(target.ino);
        }
        batch.unlink(from_dir, from, ino, src.kind);
        batch.link(to_dir, to, ino, src.kind);
        src.parent = to_dir;
        src.name = to.to_vec();
        src.ctime = Time::now();
        batch.put_inode(&src);
        self.touch_dir(&mut batch, from_dir)?;
        if to_dir != from_dir {
            self.touch_dir(&mut batch, to_dir)?;
        }
        // Everything under the moved inode has a new key: each is moved in the background, and
        // until then its old object is known to be leaving (see `list_dir`).
        let mut stack = vec![ino];
        while let Some(i) = stack.pop() {
            batch.mark_pending(i, self.next_seq());
            moved.push(i);
            let remote = self.meta.inode(i)?.and_then(|n| n.remote);
            if let Some(r) = &remote {
                batch.moving_from(&r.key, i);
            }
            // Keys it may have written or was handed (an old object at its former name that it
            // was to overwrite) are no longer its to overwrite: they go. Never its own object,
            // which the move copies from.
            self.release_maybe_written(&mut batch, i, remote.as_ref().map(|r| r.key.as_str()))?;
            for ino in self.meta.child_inos(i) {
                stack.push(ino?);
            }
        }
        self.meta.commit(batch)?;
        self.usage.changed();
        Ok(moved)
    }

    /// Lists a directory recursively (no delimiter) so every object under it is in the namespace.
    pub(super) async fn load_subtree(&self, dir: &Inode) -> FsResult<()> {
        self.refresh_dir(dir, true).await?;
        let mut stack = vec![dir.ino];
        while let Some(d) = stack.pop() {
            // The index is read before the listings below change it.
            let mut subdirs = Vec::new();
            for ino in self.meta.child_inos(d) {
                if let Some(i) = self.meta.inode(ino?)?.filter(|i| i.kind == Kind::Dir) {
                    subdirs.push(i);
                }
            }
            for i in subdirs {
                self.refresh_dir(&i, false).await?;
                stack.push(i.ino);
            }
        }
        Ok(())
    }

    pub async fn setattr(&self, cred: &Cred, ino: Ino, attr: SetAttr) -> FsResult<Attr> {
        let mut inode = self.inode(ino)?;
        if !inode.meta_loaded {
            inode = self.load_meta(inode).await?;
        }
        // Checked before anything changes: a refused SETATTR changes nothing, ctime included.
        perm::check_chattr(cred, &inode, attr.mode, attr.uid, attr.gid)?;
        if attr.atime.is_some() || attr.mtime.is_some() {
            let to_now = !matches!(attr.atime, Some(SetTime::At(_))) && !matches!(attr.mtime, Some(SetTime::At(_)));
            perm::check_times(cred, &inode, to_now)?;
        }
        if let Some(size) = attr.size {
            if inode.kind == Kind::Dir {
                return Err(FsError::IsDir);
            }
            if inode.kind != Kind::File {
                return Err(FsError::Invalid("size of a symlink or special file".into()));
            }
            perm::check_io(cred, &inode, perm::W)?;
            loop {
                let st = self.stage(ino, size == 0).await?;
                // The part cut or extended changes, and must be whole first; the others stay
                // holes or copies of the base.
                if !self.fill_for_client(&st, st.boundary(size).unwrap_or(0..0)).await? {
                    continue; // dropped under us: look again
                }
                let _w = st.lock.write().await;
                if st.is_retired() {
                    continue; // dropped (uploaded and evicted, say) while we waited: look again
                }
                if st.boundary(size).is_some_and(|r| st.holes_in(r).is_some()) {
                    continue; // written past the end meanwhile: another part to fill
                }
                // Staged empty for this truncation, the copy of a file whose object has bytes
                // is already the size asked for, and no longer the object: it changes all the
                // same (else the object would be copied onto itself, bytes and all).
                let emptied = size == 0 && !st.is_dirty() && inode.remote.as_ref().is_some_and(|r| r.size > 0);
                if st.size() != size || emptied {
                    let growth = size.saturating_sub(st.size());
                    self.usage.check_growth(growth).map_err(FsError::NoSpace)?;
                    st.set_len(size)?;
                    self.usage.grew(growth);
                    if growth == 0 {
                        self.usage.changed();
                    }
                    self.note_unsynced(&st);
                    // Bytes of the file the journal carries are older than this change, which
                    // is acknowledged durable: replayed after a crash, they would undo it. The
                    // new bytes go in, under the file's lock, so that no write lands between
                    // their read and their record (or, grown past what the journal carries,
                    // the file is synced on its own and they go). Before the new size's record:
                    // a crash between the two leaves a truncation not yet acknowledged, done.
                    if self.meta.carries_bytes(ino) {
                        let mut b = Batch::new();
                        if size <= super::bytes_in_journal::JOURNAL_MAX {
                            b.put_bytes(ino, st.contents()?);
                        } else {
                            st.sync()?;
                            b.drop_bytes(ino);
                        }
                        self.meta.commit(b)?;
                    }
                }
                break;
            }
        }
        let _g = self.ns.lock().await;
        let mut inode = self.inode(ino)?;
        inode.mode = perm::check_chattr(cred, &inode, attr.mode, attr.uid, attr.gid)?;
        if attr.size.is_some() {
            inode.mode = perm::mode_after_write(cred, inode.mode);
        }
        if let Some(u) = attr.uid {
            inode.uid = u;
        }
        if let Some(g) = attr.gid {
            inode.gid = g;
        }
        let resolve = |t: SetTime| match t {
            SetTime::Now => Time::now(),
            SetTime::At(t) => t,
        };
        if let Some(t) = attr.atime {
            inode.atime = resolve(t);
        }
        let staged = self.staged(ino);
        if let Some(t) = attr.mtime {
            inode.mtime = resolve(t);
            if let Some(st) = &staged {
                *st.mtime.locked() = inode.mtime;
            }
        } else if let Some(st) = &staged {
            inode.mtime = st.mtime();
        }
        if let Some(st) = &staged {
            inode.size = st.size();
        }
        inode.ctime = Time::now();
        let mut batch = Batch::new();
        batch.put_inode(&inode);
        // atime alone is not worth an S3 request.
        let s3_visible = attr.mode.is_some()
            || attr.uid.is_some()
            || attr.gid.is_some()
            || attr.mtime.is_some()
            || attr.size.is_some();
        if s3_visible && inode.ino != ROOT_INO {
            batch.mark_pending(ino, self.next_seq());
            if let Some(st) = &staged {
                st.journalled();
            }
        }
        self.meta.commit(batch)?;
        self.usage.changed();
        drop(_g);
        // A new size is the file's bytes: they go up with its COMMIT, as a WRITE's do.
        if s3_visible && attr.size.is_none() {
            self.in_s3(&[], vec![ino]).await?;
        }
        Ok(self.attr_of(&inode))
    }

    /// Which of read, write and execute (`perm::R|W|X`) `cred` holds on `ino` (ACCESS).
    pub fn permissions(&self, cred: &Cred, ino: Ino) -> FsResult<u32> {
        Ok(perm::granted(cred, &self.inode(ino)?))
    }
}

/// What CREATE does with a name that exists (NFS's createmode3).
#[derive(Clone, Copy)]
enum How {
    /// Opens the file (an `open(O_CREAT)` without `O_EXCL`).
    Unchecked,
    /// Fails with EXIST.
    Guarded,
    /// Fails with EXIST, unless the file keeps this verifier: see [`Volume::create_exclusive`].
    Exclusive(u64),
}

/// An exclusive CREATE's verifier as the access and modification times that keep it.
fn verifier_times(v: u64) -> (Time, Time) {
    let secs = |x: u64| Time {
        secs: x as i64,
        nanos: 0,
    };
    (secs(v >> 32), secs(v & 0xffff_ffff))
}
