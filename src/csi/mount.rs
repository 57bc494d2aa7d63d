//! Mounting, behind a trait: the node service's one edge to the kernel. [`SysMounter`] calls
//! mount(2) and umount2(2) directly (no `mount.nfs` helper needed in the image) and reads
//! `/proc/self/mountinfo`; [`FakeMounter`] keeps mounts in memory, for tests of the gRPC
//! services on machines whose kernel has no NFS client (as csi-driver-nfs's fake mounter).

use crate::sync::LockExt;
use std::collections::HashMap;
use std::ffi::CString;
use std::io;
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};
use std::sync::Mutex;

/// One entry of the mount table, as far as the node service looks.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MountEntry {
    pub fstype: String,
    /// `127.0.0.1:/` for our NFS mounts.
    pub source: String,
    /// The NFS port, from the `port=` option, for NFS mounts.
    pub port: Option<u16>,
    /// major:minor: a bind mount of a mount has the same.
    pub device: String,
    pub read_only: bool,
}

pub trait Mounter: Send + Sync + 'static {
    /// A kernel NFSv3 mount of the gateway at 127.0.0.1:`port` on `target` (hard, TCP, no
    /// locking: the gateway offers no NLM).
    fn mount_nfs(&self, port: u16, target: &Path) -> io::Result<()>;
    /// Binds `source` on `target`, read-only when asked.
    fn bind(&self, source: &Path, target: &Path, read_only: bool) -> io::Result<()>;
    /// Unmounts `target`; Ok when nothing is mounted there.
    fn unmount(&self, target: &Path) -> io::Result<()>;
    /// What is mounted at exactly `target`, if anything (the last mount on it).
    fn mounted(&self, target: &Path) -> io::Result<Option<MountEntry>>;
}

/// The NFS mount options: hard (applications wait through a restart of the gateway instead of
/// getting errors), TCP, MOUNT on the same port, no NLM.
pub fn nfs_options(port: u16) -> String {
    format!(
        "vers=3,proto=tcp,port={port},mountport={port},mountproto=tcp,nolock,hard,addr=127.0.0.1,mountaddr=127.0.0.1"
    )
}

fn cstr(p: &Path) -> io::Result<CString> {
    CString::new(p.as_os_str().as_bytes()).map_err(|_| io::Error::new(io::ErrorKind::InvalidInput, "path has NUL"))
}

fn check(rc: libc::c_int) -> io::Result<()> {
    if rc == 0 {
        Ok(())
    } else {
        Err(io::Error::last_os_error())
    }
}

pub struct SysMounter;

impl Mounter for SysMounter {
    fn mount_nfs(&self, port: u16, target: &Path) -> io::Result<()> {
        let src = CString::new("127.0.0.1:/").unwrap();
        let fs = CString::new("nfs").unwrap();
        let opts = CString::new(nfs_options(port)).unwrap();
        let t = cstr(target)?;
        // SAFETY: every pointer is a valid NUL-terminated string that outlives the call.
        check(unsafe { libc::mount(src.as_ptr(), t.as_ptr(), fs.as_ptr(), 0, opts.as_ptr().cast()) })
    }

    fn bind(&self, source: &Path, target: &Path, read_only: bool) -> io::Result<()> {
        let (s, t) = (cstr(source)?, cstr(target)?);
        // SAFETY: valid strings; null fstype and data are allowed for bind mounts.
        check(unsafe {
            libc::mount(
                s.as_ptr(),
                t.as_ptr(),
                std::ptr::null(),
                libc::MS_BIND,
                std::ptr::null(),
            )
        })?;
        if read_only {
            // A bind mount takes the flags of its source; read-only needs a remount of the bind.
            let flags = libc::MS_BIND | libc::MS_REMOUNT | libc::MS_RDONLY;
            // SAFETY: as above.
            let r =
                check(unsafe { libc::mount(std::ptr::null(), t.as_ptr(), std::ptr::null(), flags, std::ptr::null()) });
            if let Err(e) = r {
                let _ = self.unmount(target);
                return Err(e);
            }
        }
        Ok(())
    }

    fn unmount(&self, target: &Path) -> io::Result<()> {
        if self.mounted(target)?.is_none() {
            return Ok(());
        }
        let t = cstr(target)?;
        // SAFETY: valid string.
        check(unsafe { libc::umount2(t.as_ptr(), 0) })
    }

    fn mounted(&self, target: &Path) -> io::Result<Option<MountEntry>> {
        let target = target.canonicalize().unwrap_or_else(|_| target.to_path_buf());
        let info = std::fs::read_to_string("/proc/self/mountinfo")?;
        Ok(info
            .lines()
            .filter_map(parse_mountinfo)
            .filter(|(p, _)| *p == target)
            .map(|(_, e)| e)
            .next_back())
    }
}

/// One line of /proc/self/mountinfo: `id parent major:minor root mountpoint options [optional
/// fields] - fstype source superoptions`.
fn parse_mountinfo(line: &str) -> Option<(PathBuf, MountEntry)> {
    let (left, right) = line.split_once(" - ")?;
    let l: Vec<&str> = left.split(' ').collect();
    let r: Vec<&str> = right.split(' ').collect();
    let unescape = |s: &str| {
        s.replace("\\040", " ")
            .replace("\\011", "\t")
            .replace("\\012", "\n")
            .replace("\\134", "\\")
    };
    let opts = l.get(5)?;
    let port = r
        .get(2)
        .and_then(|o| o.split(',').find_map(|kv| kv.strip_prefix("port=")))
        .and_then(|p| p.parse().ok());
    Some((
        PathBuf::from(unescape(l.get(4)?)),
        MountEntry {
            fstype: r.first()?.to_string(),
            source: unescape(r.get(1)?),
            port,
            device: l.get(2)?.to_string(),
            read_only: opts.split(',').any(|o| o == "ro"),
        },
    ))
}

/// Mounts kept in memory. A path containing `fail-mount` fails to mount, as csi-driver-nfs's
/// fake does, for the error paths.
#[derive(Default)]
pub struct FakeMounter {
    mounts: Mutex<HashMap<PathBuf, MountEntry>>,
}

impl Mounter for FakeMounter {
    fn mount_nfs(&self, port: u16, target: &Path) -> io::Result<()> {
        if target.to_string_lossy().contains("fail-mount") {
            return Err(io::Error::other("fake mount failure"));
        }
        self.mounts.locked().insert(
            target.to_path_buf(),
            MountEntry {
                fstype: "nfs".into(),
                source: "127.0.0.1:/".into(),
                port: Some(port),
                device: format!("0:{port}"),
                read_only: false,
            },
        );
        Ok(())
    }

    fn bind(&self, source: &Path, target: &Path, read_only: bool) -> io::Result<()> {
        let mut m = self.mounts.locked();
        let src = m
            .get(source)
            .cloned()
            .ok_or_else(|| io::Error::new(io::ErrorKind::NotFound, "source not mounted"))?;
        m.insert(target.to_path_buf(), MountEntry { read_only, ..src });
        Ok(())
    }

    fn unmount(&self, target: &Path) -> io::Result<()> {
        self.mounts.locked().remove(target);
        Ok(())
    }

    fn mounted(&self, target: &Path) -> io::Result<Option<MountEntry>> {
        Ok(self.mounts.locked().get(target).cloned())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn mountinfo_lines_are_read() {
        let l = "36 35 0:52 / /var/lib/kubelet/x\\040y rw,relatime shared:1 - nfs 127.0.0.1:/ rw,vers=3,port=20501,mountport=20501";
        let (p, e) = parse_mountinfo(l).unwrap();
        assert_eq!(p, PathBuf::from("/var/lib/kubelet/x y"));
        assert_eq!((e.fstype.as_str(), e.port, e.read_only), ("nfs", Some(20501), false));
        let l = "40 35 0:52 / /t ro,relatime - nfs 127.0.0.1:/ ro,port=1";
        assert!(parse_mountinfo(l).unwrap().1.read_only);
    }
}
