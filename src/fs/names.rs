//! Names, keys and the s3fs-compatible attribute metadata.

use crate::meta::{Inode, Kind, Time};
use crate::store::UserMeta;

use super::FsError;

/// Longest name of one path component, as Linux allows.
pub const NAME_MAX: usize = 255;
/// Longest S3 key.
pub const KEY_MAX: usize = 1024;

/// The object at the root of a volume where the CSI controller records what it knows of the
/// volume (capacity, what to do on delete). Reserved in every directory: never shown as a file
/// and never created through the share, so the record cannot be read, overwritten or removed
/// by the volume's users.
pub const VOLUME_RECORD: &str = ".s3nfs-volume.toml";

/// File type bits of `st_mode`, stored in `x-amz-meta-mode` as s3fs does.
const S_IFMT: u32 = 0o170000;
const S_IFREG: u32 = 0o100000;
const S_IFDIR: u32 = 0o040000;
const S_IFLNK: u32 = 0o120000;
const S_IFIFO: u32 = 0o010000;
const S_IFSOCK: u32 = 0o140000;
const S_IFCHR: u32 = 0o020000;
const S_IFBLK: u32 = 0o060000;

/// Checks that `name` can be one component of an S3 key and of an NFS path.
pub fn check_name(name: &[u8]) -> Result<&str, FsError> {
    if name.is_empty() || name == b"." || name == b".." {
        return Err(FsError::Invalid(format!(
            "reserved name {:?}",
            String::from_utf8_lossy(name)
        )));
    }
    if name.len() > NAME_MAX {
        return Err(FsError::NameTooLong);
    }
    if name.contains(&b'/') || name.contains(&0) {
        return Err(FsError::Invalid("name contains '/' or NUL".into()));
    }
    if name == VOLUME_RECORD.as_bytes() {
        return Err(FsError::Invalid(format!(
            "{VOLUME_RECORD} is reserved for s3nfs's volume record"
        )));
    }
    std::str::from_utf8(name).map_err(|_| FsError::Invalid("S3 keys must be UTF-8; this name is not".into()))
}

/// Whether a key component found in a listing can be shown as a file name.
pub fn listable(name: &str) -> bool {
    !name.is_empty()
        && name != "."
        && name != ".."
        && name != VOLUME_RECORD
        && name.len() <= NAME_MAX
        && !name.contains('\0')
}

pub fn kind_bits(kind: Kind) -> u32 {
    match kind {
        Kind::File | Kind::Link(_) => S_IFREG,
        Kind::Dir => S_IFDIR,
        Kind::Symlink => S_IFLNK,
        Kind::Fifo => S_IFIFO,
        Kind::Socket => S_IFSOCK,
        Kind::CharDev(_) => S_IFCHR,
        Kind::BlockDev(_) => S_IFBLK,
    }
}

/// The user metadata s3fs and geesefs write for an inode.
pub fn user_meta(inode: &Inode) -> UserMeta {
    let mut m = UserMeta::new();
    m.insert(
        "mode".into(),
        (kind_bits(inode.kind) | (inode.mode & 0o7777)).to_string(),
    );
    m.insert("uid".into(), inode.uid.to_string());
    m.insert("gid".into(), inode.gid.to_string());
    m.insert("mtime".into(), inode.mtime.secs.to_string());
    if let Kind::CharDev(rdev) | Kind::BlockDev(rdev) = inode.kind {
        m.insert("rdev".into(), rdev.to_string());
    }
    m
}

/// Applies metadata found on an object (ours, s3fs's, or none at all) to an inode.
pub fn apply_user_meta(inode: &mut Inode, meta: &UserMeta) {
    if let Some(mode) = meta.get("mode").and_then(|v| v.parse::<u32>().ok()) {
        inode.mode = mode & 0o7777;
        // The file type, for what a listing showed as a plain object.
        if inode.kind == Kind::File {
            let rdev = meta.get("rdev").and_then(|v| v.parse::<u64>().ok()).unwrap_or(0);
            inode.kind = match mode & S_IFMT {
                S_IFLNK => Kind::Symlink,
                S_IFIFO => Kind::Fifo,
                S_IFSOCK => Kind::Socket,
                S_IFCHR => Kind::CharDev(rdev),
                S_IFBLK => Kind::BlockDev(rdev),
                _ => Kind::File,
            };
        }
    }
    if let Some(uid) = meta.get("uid").and_then(|v| v.parse().ok()) {
        inode.uid = uid;
    }
    if let Some(gid) = meta.get("gid").and_then(|v| v.parse().ok()) {
        inode.gid = gid;
    }
    // s3fs writes whole seconds; geesefs may write fractions.
    if let Some(mtime) = meta.get("mtime").and_then(|v| v.parse::<f64>().ok()) {
        inode.mtime = Time {
            secs: mtime.trunc() as i64,
            nanos: (mtime.fract() * 1e9) as u32,
        };
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_s3_or_nfs_cannot_hold_are_refused() {
        assert!(check_name(b"ok name.txt").is_ok());
        assert!(check_name("ünïcødé".as_bytes()).is_ok());
        assert!(matches!(check_name(&[0xff, 0xfe]), Err(FsError::Invalid(_))));
        assert!(matches!(check_name(&[b'a'; 256]), Err(FsError::NameTooLong)));
        assert!(matches!(check_name(b".."), Err(FsError::Invalid(_))));
        assert!(matches!(check_name(b"a\0b"), Err(FsError::Invalid(_))));
        assert!(matches!(check_name(VOLUME_RECORD.as_bytes()), Err(FsError::Invalid(_))));
        assert!(!listable(VOLUME_RECORD));
    }
}
