//! Hard links. Every name of a file is an entry of its own in its directory and an object of
//! its own in S3 (other S3 tools see a plain file under each name); one inode, the file, holds
//! the data and attributes, and each further name is a `Kind::Link` inode pointing at it. NFS
//! sees only the file's inode number. When the file is uploaded, every other name is marked
//! pending and the flusher copies the file's object onto it, so all names end up the same
//! version (see `upload::sync`).

use crate::meta::{Batch, Ino, Inode, Kind, Time};

use super::{Attr, Cred, FsError, FsResult, Volume};

/// Most names one file may have (PATHCONF's `linkmax`): each is an object to copy on upload.
pub const LINK_MAX: u32 = 1000;

impl Volume {
    /// The file an entry stands for: itself, or for a hard link the file it names.
    pub(crate) fn file_of(&self, entry: Ino) -> FsResult<Ino> {
        match self.inode(entry)?.kind {
            Kind::Link(file) => Ok(file),
            _ => Ok(entry),
        }
    }

    /// LINK: `name` in `dir` becomes another name of the file `ino`.
    pub async fn link(&self, cred: &Cred, ino: Ino, dir: Ino, name: &[u8]) -> FsResult<Attr> {
        if self.inode(ino)?.kind == Kind::Dir {
            return Err(FsError::NotOwner); // link(2) of a directory: EPERM
        }
        self.prepare_new(cred, dir, name).await?;
        let _g = self.ns.lock().await;
        if self.meta.lookup(dir, name)?.is_some() {
            return Err(FsError::Exists);
        }
        let mut file = self.inode(ino)?;
        if self.meta.links(ino)?.len() as u32 + 1 >= LINK_MAX {
            return Err(FsError::TooManyLinks);
        }
        let mut batch = Batch::new();
        let now = Time::now();
        let name_ino = self.alloc_ino_at(&mut batch, || {
            let d = self.inode(dir).ok()?;
            Some(format!(
                "{}{}",
                self.dir_prefix(&d).ok()?,
                std::str::from_utf8(name).ok()?
            ))
        });
        let entry = Inode::new(
            name_ino,
            dir,
            name,
            Kind::Link(ino),
            file.mode,
            (file.uid, file.gid),
            now,
        );
        batch.put_inode(&entry);
        batch.link(dir, name, name_ino, entry.kind);
        batch.add_link(ino, name_ino);
        batch.mark_pending(name_ino, self.next_seq());
        file.ctime = now;
        batch.put_inode(&file);
        self.touch_dir(&mut batch, dir)?;
        self.meta.commit(batch)?;
        self.usage.changed();
        drop(_g);
        self.in_s3(&[ino], vec![name_ino]).await?;
        Ok(self.attr_of(&self.inode(ino)?))
    }

    /// Takes the entry `victim` out of its directory (REMOVE, RMDIR, or a RENAME replacing it)
    /// and queues the deletion of its object. A file with other names lives on: if `victim` is
    /// the file's own entry, one of its other names becomes the file's entry.
    pub(crate) fn drop_name(&self, batch: &mut Batch, victim: &Inode) -> FsResult<()> {
        batch.unlink(victim.parent, &victim.name, victim.ino, victim.kind);
        let now = Time::now();
        if let Kind::Link(file) = victim.kind {
            self.queue_remote_delete(batch, victim);
            batch.del_inode(victim.ino);
            batch.del_link(file, victim.ino);
            if let Some(mut f) = self.meta.inode(file)? {
                f.ctime = now;
                batch.put_inode(&f);
            }
            return Ok(());
        }
        let heir = match victim.kind {
            Kind::Dir => None,
            _ => self.meta.links(victim.ino)?.first().copied(),
        };
        let Some(heir) = heir else {
            self.queue_remote_delete(batch, victim);
            batch.del_inode(victim.ino);
            self.drop_staged(victim.ino);
            self.cache.forget(victim.ino);
            return Ok(());
        };
        // The heir's place becomes the file's. The file's object moves there as in a rename (copied
        // over whatever copy the heir had, which may be older or not made yet, then deleted at
        // the old key), so no version of the file is lost on the way.
        let h = self.inode(heir)?;
        // The heir's own copy goes, unless the file is at that key by then (the deletion
        // spares a key a live inode holds, see `upload::sync::delete_key`).
        self.queue_remote_delete(batch, &h);
        batch.unlink(h.parent, &h.name, heir, h.kind);
        batch.del_inode(heir);
        batch.del_link(victim.ino, heir);
        let mut f = victim.clone();
        f.parent = h.parent;
        f.name = h.name;
        f.ctime = now;
        if let Some(r) = &f.remote {
            batch.moving_from(&r.key, f.ino);
        }
        batch.link(f.parent, &f.name, f.ino, f.kind);
        batch.put_inode(&f);
        batch.mark_pending(f.ino, self.next_seq());
        if let Some(st) = self.staged(f.ino) {
            st.journalled();
        }
        Ok(())
    }

    /// `inode` leaves the namespace because S3 no longer has it: a link entry stops counting
    /// as a name of its file, and the other names of a file become files of their own (each
    /// still has its object in S3).
    pub(crate) fn forget_links(&self, batch: &mut Batch, inode: &Inode) -> FsResult<()> {
        match inode.kind {
            Kind::Link(file) => batch.del_link(file, inode.ino),
            Kind::Dir => {}
            _ => {
                for l in self.meta.links(inode.ino)? {
                    batch.del_link(inode.ino, l);
                    if let Some(mut e) = self.meta.inode(l)? {
                        e.kind = Kind::File;
                        e.meta_loaded = false;
                        batch.put_inode(&e);
                    }
                }
            }
        }
        Ok(())
    }
}
