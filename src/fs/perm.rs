//! Who may do what: the permission checks a kernel NFS server makes, from the mode bits, the
//! owner and the caller's uid and groups (AUTH_UNIX). Pure functions over attributes; the
//! volume calls them under the lock that makes the operation atomic.

use crate::meta::{Inode, Kind};

use super::{FsError, FsResult};

pub const R: u32 = 4;
pub const W: u32 = 2;
pub const X: u32 = 1;

pub const S_ISUID: u32 = 0o4000;
pub const S_ISGID: u32 = 0o2000;
pub const S_ISVTX: u32 = 0o1000;

/// The identity an operation runs as, after squashing (see `crate::nfs::Squash`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Cred {
    pub uid: u32,
    pub gid: u32,
    /// Supplementary groups.
    pub groups: Vec<u32>,
}

impl Cred {
    /// The superuser: what the gateway's own callers (tests, tools) act as.
    pub fn root() -> Cred {
        Cred::user(0, 0)
    }

    pub fn user(uid: u32, gid: u32) -> Cred {
        Cred {
            uid,
            gid,
            groups: Vec::new(),
        }
    }

    pub fn is_root(&self) -> bool {
        self.uid == 0
    }

    pub fn in_group(&self, gid: u32) -> bool {
        self.gid == gid || self.groups.contains(&gid)
    }

    pub fn owns(&self, inode: &Inode) -> bool {
        self.uid == inode.uid
    }
}

/// The rwx bits (`R|W|X`) `cred` holds on `inode`, as Linux's `generic_permission`: the owner
/// class if it owns the inode, else the group class if it is in the group, else the others.
/// Root may read and write anything, and execute what anyone may execute (and search any
/// directory).
pub fn granted(cred: &Cred, inode: &Inode) -> u32 {
    if cred.is_root() {
        let any_x = inode.kind == Kind::Dir || inode.mode & 0o111 != 0;
        return R | W | if any_x { X } else { 0 };
    }
    let shift = if cred.owns(inode) {
        6
    } else if cred.in_group(inode.gid) {
        3
    } else {
        0
    };
    (inode.mode >> shift) & 7
}

/// EACCES unless `cred` holds every bit of `want` on `inode`.
pub fn check(cred: &Cred, inode: &Inode, want: u32) -> FsResult<()> {
    if granted(cred, inode) & want == want {
        Ok(())
    } else {
        Err(FsError::Denied)
    }
}

/// READ and WRITE of file data. Like knfsd, the owner may always read and write its file: a
/// process that created a file with mode 0444, or chmod'ed it after opening it, still writes
/// through the descriptor it holds, and the NFS server sees only the WRITEs. Reading is allowed
/// with execute permission too (the client reads a program to execute it).
pub fn check_io(cred: &Cred, inode: &Inode, want: u32) -> FsResult<()> {
    if cred.owns(inode) {
        return Ok(());
    }
    let g = granted(cred, inode);
    let ok = if want == R { g & (R | X) != 0 } else { g & want == want };
    if ok {
        Ok(())
    } else {
        Err(FsError::Denied)
    }
}

/// Removing or replacing `victim` in `dir`: write and search on the directory, and with the
/// sticky bit set only the owner of the victim or of the directory (or root) may (EPERM, as
/// Linux answers).
pub fn check_delete(cred: &Cred, dir: &Inode, victim: &Inode) -> FsResult<()> {
    check(cred, dir, W | X)?;
    if dir.mode & S_ISVTX != 0 && !cred.is_root() && !cred.owns(dir) && !cred.owns(victim) {
        return Err(FsError::NotOwner);
    }
    Ok(())
}

/// The owner and group of a new inode in `dir`: the caller's, except that a directory with
/// the set-group-ID bit gives its group (and, to new directories, the bit itself).
pub fn new_owner(cred: &Cred, dir: &Inode, kind: Kind, mode: u32) -> (u32, u32, u32) {
    let mut mode = mode & 0o7777;
    let gid = if dir.mode & S_ISGID != 0 {
        if kind == Kind::Dir {
            mode |= S_ISGID;
        }
        dir.gid
    } else {
        cred.gid
    };
    // A non-member may not create a set-group-ID file in a group it is not in.
    if kind != Kind::Dir && mode & S_ISGID != 0 && !cred.is_root() && !cred.in_group(gid) {
        mode &= !S_ISGID;
    }
    (cred.uid, gid, mode)
}

/// Checks a change of mode, owner or group, and returns the mode the inode must have after it.
pub fn check_chattr(
    cred: &Cred,
    inode: &Inode,
    mode: Option<u32>,
    uid: Option<u32>,
    gid: Option<u32>,
) -> FsResult<u32> {
    let new_uid = uid.unwrap_or(inode.uid);
    let new_gid = gid.unwrap_or(inode.gid);
    if !cred.is_root() {
        // chown: root only (a no-op chown to oneself is allowed).
        if new_uid != inode.uid || (uid.is_some() && !cred.owns(inode)) {
            return Err(FsError::NotOwner);
        }
        // chgrp: the owner, to a group it is in.
        if gid.is_some() && (!cred.owns(inode) || (new_gid != inode.gid && !cred.in_group(new_gid))) {
            return Err(FsError::NotOwner);
        }
        // chmod: the owner.
        if mode.is_some() && !cred.owns(inode) {
            return Err(FsError::NotOwner);
        }
    }
    let mut m = mode.map(|m| m & 0o7777).unwrap_or(inode.mode);
    if let Some(requested) = mode {
        // A non-member setting the set-group-ID bit loses it silently, as on Linux.
        if requested & S_ISGID != 0 && !cred.is_root() && !cred.in_group(new_gid) && inode.kind != Kind::Dir {
            m &= !S_ISGID;
        }
    }
    // As knfsd: any chown of a non-directory, by root too, revokes the set-ID bits (from the
    // mode set along with it, if any).
    if (uid.is_some() || gid.is_some()) && inode.kind != Kind::Dir {
        m = kill_suid(m);
    }
    Ok(m)
}

/// The mode after a write by `cred`: a write by anyone but root clears set-user-ID, and
/// set-group-ID where it means "set group on execution" (with group execute).
pub fn mode_after_write(cred: &Cred, mode: u32) -> u32 {
    if cred.is_root() {
        mode
    } else {
        kill_suid(mode)
    }
}

fn kill_suid(mode: u32) -> u32 {
    let mut m = mode & !S_ISUID;
    if m & 0o010 != 0 {
        m &= !S_ISGID;
    }
    m
}

/// Setting times: to "now" needs write permission or ownership; to any other time ownership
/// (EPERM otherwise, as utimensat(2)).
pub fn check_times(cred: &Cred, inode: &Inode, to_now: bool) -> FsResult<()> {
    if cred.is_root() || cred.owns(inode) {
        return Ok(());
    }
    if to_now {
        check(cred, inode, W)
    } else {
        Err(FsError::NotOwner)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::meta::Time;

    fn file(mode: u32, uid: u32, gid: u32) -> Inode {
        Inode::new(2, 1, b"f", Kind::File, mode, (uid, gid), Time::default())
    }

    #[test]
    fn classes_are_exclusive_as_in_unix() {
        let f = file(0o604, 1000, 100);
        // The owner gets the owner bits even where others have more.
        assert_eq!(granted(&Cred::user(1000, 5), &f), R | W);
        // A group member with no group bits gets nothing, though others may read.
        assert_eq!(granted(&Cred::user(7, 100), &f), 0);
        assert_eq!(granted(&Cred::user(7, 7), &f), R);
        let mut in_supp = Cred::user(7, 7);
        in_supp.groups.push(100);
        assert_eq!(granted(&in_supp, &f), 0);
        assert_eq!(granted(&Cred::root(), &f), R | W);
        assert_eq!(granted(&Cred::root(), &file(0o100, 1, 1)), R | W | X);
    }

    #[test]
    fn ownership_changes_follow_linux() {
        let f = file(0o6755, 1000, 100);
        let owner = Cred {
            uid: 1000,
            gid: 100,
            groups: vec![200],
        };
        assert!(matches!(
            check_chattr(&owner, &f, None, Some(0), None),
            Err(FsError::NotOwner)
        ));
        assert!(matches!(
            check_chattr(&owner, &f, None, None, Some(300)),
            Err(FsError::NotOwner)
        ));
        assert_eq!(check_chattr(&owner, &f, None, None, Some(200)).unwrap(), 0o755);
        assert!(matches!(
            check_chattr(&Cred::user(5, 5), &f, Some(0o777), None, None),
            Err(FsError::NotOwner)
        ));
        assert_eq!(check_chattr(&Cred::root(), &f, None, Some(5), None).unwrap(), 0o755);
        assert_eq!(mode_after_write(&Cred::user(5, 5), 0o6755), 0o755);
        assert_eq!(mode_after_write(&Cred::user(5, 5), 0o2745), 0o2745);
        assert_eq!(mode_after_write(&Cred::root(), 0o6755), 0o6755);
    }

    #[test]
    fn sticky_directories_protect_other_users_files() {
        let dir = Inode::new(3, 1, b"d", Kind::Dir, 0o1777, (0, 0), Time::default());
        let theirs = file(0o644, 1000, 1000);
        assert!(matches!(
            check_delete(&Cred::user(2000, 2000), &dir, &theirs),
            Err(FsError::NotOwner)
        ));
        assert!(check_delete(&Cred::user(1000, 1000), &dir, &theirs).is_ok());
        assert!(check_delete(&Cred::root(), &dir, &theirs).is_ok());
    }
}
