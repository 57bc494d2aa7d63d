//! s3fs-fuse compatibility, checked with s3fs itself (Debian's `s3fs`, over FUSE on the host):
//! a tree written through s3nfs is mounted with s3fs and compared (mode, owner, mtime,
//! symlinks, special files, hard links); then a tree written through s3fs is read through
//! s3nfs. Both sides use one Garage bucket.
//!
//! Needs `s3fs` and `/dev/fuse` (`.ci/run` installs s3fs); `S3NFS_SKIP_S3FS=1` skips instead
//! of failing where they cannot exist.

mod common;

use std::os::unix::fs::{FileTypeExt, MetadataExt};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use common::gateway::{on_garage, wait_for, Opts};
use common::nfs::{mknoddata3, Client, Set};
use nfs3_client::nfs3_types::nfs3::ftype3;

/// An s3fs mount of `bucket`, unmounted on drop.
struct S3fs {
    dir: tempfile::TempDir,
    child: Child,
    _passwd: tempfile::NamedTempFile,
}

impl S3fs {
    async fn mount(bucket: &str) -> Option<S3fs> {
        if Command::new("s3fs").arg("--version").output().is_err() || !Path::new("/dev/fuse").exists() {
            if std::env::var("S3NFS_SKIP_S3FS").as_deref() == Ok("1") {
                eprintln!("SKIPPED: s3fs or /dev/fuse missing");
                return None;
            }
            panic!("s3fs and /dev/fuse are needed (apt-get install s3fs), or set S3NFS_SKIP_S3FS=1");
        }
        let g = common::garage::shared();
        let passwd = tempfile::NamedTempFile::new().unwrap();
        std::fs::write(passwd.path(), format!("{}:{}\n", g.access_key, g.secret_key)).unwrap();
        let dir = tempfile::tempdir().unwrap();
        let child = Command::new("s3fs")
            .arg(bucket)
            .arg(dir.path())
            .arg("-f")
            .arg("-o")
            .arg(format!(
                "passwd_file={},url={},endpoint={},use_path_request_style,stat_cache_expire=1,dbglevel=warn",
                passwd.path().display(),
                g.endpoint,
                g.region
            ))
            // s3fs's curl reads the CA variables of this environment even for http.
            .env_remove("AWS_CA_BUNDLE")
            .env_remove("CURL_CA_BUNDLE")
            .stdout(Stdio::null())
            .stderr(Stdio::inherit())
            .spawn()
            .expect("starting s3fs");
        let m = S3fs {
            dir,
            child,
            _passwd: passwd,
        };
        let path = m.dir.path().to_path_buf();
        wait_for(Duration::from_secs(20), "the s3fs mount", || {
            let p = path.clone();
            async move { is_mounted(&p).then_some(()) }
        })
        .await;
        Some(m)
    }

    fn path(&self, rel: &str) -> PathBuf {
        self.dir.path().join(rel)
    }
}

fn is_mounted(p: &Path) -> bool {
    let p = p.canonicalize().unwrap_or_else(|_| p.to_path_buf());
    std::fs::read_to_string("/proc/self/mountinfo")
        .unwrap_or_default()
        .lines()
        .any(|l| l.split(' ').nth(4) == Some(p.to_str().unwrap()))
}

impl Drop for S3fs {
    fn drop(&mut self) {
        let _ = Command::new("fusermount").arg("-u").arg(self.dir.path()).status();
        let _ = Command::new("umount").arg("-l").arg(self.dir.path()).status();
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn s3fs_and_s3nfs_see_the_same_files() {
    let (gw, s3) = on_garage(Opts::default()).await;
    let mut c = Client::connect(gw.addr).await;
    let top = c.root.clone();

    // Written through s3nfs.
    let d = c.mkdir(&top, "dir").await.unwrap();
    c.setattr(
        &d,
        Set {
            mode: Some(0o750),
            uid: Some(1000),
            gid: Some(100),
            ..Default::default()
        },
    )
    .await
    .unwrap();
    let f = c.create(&d, "file", 0o640).await.unwrap();
    c.write_all(&f, 0, b"same bytes").await.unwrap();
    c.setattr(
        &f,
        Set {
            uid: Some(1000),
            gid: Some(100),
            mtime: Some(1_500_000_000),
            ..Default::default()
        },
    )
    .await
    .unwrap();
    c.symlink(&top, "link", "dir/file").await.unwrap();
    let fifo = Set {
        mode: Some(0o600),
        ..Default::default()
    };
    c.mknod(&top, "fifo", mknoddata3::NF3FIFO(fifo.sattr())).await.unwrap();
    c.link(&f, &top, "hard").await.unwrap();
    gw.vol.flush_all().await.unwrap();

    let Some(m) = S3fs::mount(&s3.bucket).await else {
        return;
    };
    let md = std::fs::symlink_metadata(m.path("dir")).unwrap();
    assert!(md.is_dir());
    assert_eq!((md.mode() & 0o7777, md.uid(), md.gid()), (0o750, 1000, 100));
    let mf = std::fs::symlink_metadata(m.path("dir/file")).unwrap();
    assert!(mf.is_file());
    assert_eq!((mf.mode() & 0o7777, mf.uid(), mf.gid()), (0o640, 1000, 100));
    assert_eq!(mf.mtime(), 1_500_000_000);
    assert_eq!(std::fs::read(m.path("dir/file")).unwrap(), b"same bytes");
    assert_eq!(std::fs::read_link(m.path("link")).unwrap(), Path::new("dir/file"));
    let mp = std::fs::symlink_metadata(m.path("fifo")).unwrap();
    assert!(
        mp.file_type().is_fifo(),
        "s3fs shows the fifo as a fifo: {:?}",
        mp.file_type()
    );
    assert_eq!(mp.mode() & 0o7777, 0o600);
    // A hard link is, to any other S3 client, a second file with the same bytes and attributes.
    let mh = std::fs::symlink_metadata(m.path("hard")).unwrap();
    assert!(mh.is_file());
    assert_eq!((mh.mode() & 0o7777, mh.uid(), mh.len()), (0o640, 1000, 10));
    assert_eq!(std::fs::read(m.path("hard")).unwrap(), b"same bytes");

    // Written through s3fs, read through s3nfs.
    std::fs::create_dir(m.path("from-s3fs")).unwrap();
    std::fs::write(m.path("from-s3fs/data"), b"written by s3fs").unwrap();
    std::os::unix::fs::chown(m.path("from-s3fs/data"), Some(1000), Some(100)).unwrap();
    std::fs::set_permissions(
        m.path("from-s3fs/data"),
        std::os::unix::fs::PermissionsExt::from_mode(0o604),
    )
    .unwrap();
    std::os::unix::fs::symlink("data", m.path("from-s3fs/sym")).unwrap();
    let st = Command::new("mkfifo")
        .arg("-m")
        .arg("0620")
        .arg(m.path("from-s3fs/pipe"))
        .status()
        .unwrap();
    assert!(st.success());
    let s3fs_mtime = std::fs::symlink_metadata(m.path("from-s3fs/data")).unwrap().mtime();
    drop(m);

    let sd = wait_for(Duration::from_secs(10), "s3fs's directory through s3nfs", || {
        let c = Client::connect_as(gw.addr, 0, 0, vec![0]);
        let top = top.clone();
        async move { c.await.lookup(&top, "from-s3fs").await.ok() }
    })
    .await;
    let data = c.lookup(&sd, "data").await.unwrap();
    let a = c.getattr(&data).await.unwrap();
    assert_eq!(a.type_, ftype3::NF3REG);
    assert_eq!((a.mode, a.uid, a.gid, a.size), (0o604, 1000, 100, 15));
    assert_eq!(a.mtime.seconds as i64, s3fs_mtime);
    assert_eq!(c.read_all(&data).await.unwrap(), b"written by s3fs");
    let sym = c.lookup(&sd, "sym").await.unwrap();
    assert_eq!(c.getattr(&sym).await.unwrap().type_, ftype3::NF3LNK);
    assert_eq!(c.readlink(&sym).await.unwrap(), b"data");
    let pipe = c.lookup(&sd, "pipe").await.unwrap();
    let a = c.getattr(&pipe).await.unwrap();
    assert_eq!((a.type_, a.mode), (ftype3::NF3FIFO, 0o620));
}
