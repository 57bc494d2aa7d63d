//! Many files written while their uploads wait must not run the gateway out of file
//! descriptors: staged files keep a descriptor only within a budget (a quarter of the limit),
//! and a created file holds none until it is written.
//!
//! This test binary lowers its own descriptor limit to 1,024 before anything opens a volume, and
//! writes 3,000 files with uploads held back (a flush delay of an hour): one descriptor per
//! staged file would fail with EMFILE long before the end.

mod common;

use std::time::Duration;

use common::gateway::{on_local, Opts};
use common::nfs::Client;

fn open_fds() -> usize {
    std::fs::read_dir("/proc/self/fd").unwrap().count()
}

#[test]
fn thousands_of_files_written_while_uploads_wait_stay_within_the_descriptor_budget() {
    let limit = libc::rlimit {
        rlim_cur: 1024,
        rlim_max: 1024,
    };
    // SAFETY: setrlimit only reads the struct passed; no other thread runs yet.
    assert_eq!(unsafe { libc::setrlimit(libc::RLIMIT_NOFILE, &limit) }, 0);
    let budget = s3nfs::fs::staging::fd_budget();
    assert_eq!(budget, 256);

    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(async {
        let (gw, _store) = on_local(Opts {
            flush_delay: Duration::from_secs(3600),
            ..Default::default()
        })
        .await;
        let before = open_fds();
        let mut c = Client::connect(gw.addr).await;
        let root = c.root.clone();
        // Created only: no descriptor at all.
        for i in 0..1000 {
            c.create(&root, format!("empty{i:04}"), 0o644).await.unwrap();
        }
        assert!(
            open_fds() < before + 64,
            "created files hold descriptors: {} open, {before} before",
            open_fds()
        );
        // Written: past the budget, descriptors are closed once the files are fsync'd.
        for i in 0..3000 {
            let fh = c.create(&root, format!("f{i:04}"), 0o644).await.unwrap();
            c.write(&fh, 0, format!("file {i}").as_bytes()).await.unwrap();
        }
        let deadline = std::time::Instant::now() + Duration::from_secs(10);
        while open_fds() > before + budget + 64 && std::time::Instant::now() < deadline {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        assert!(open_fds() <= before + budget + 64, "{} descriptors open", open_fds());
        // Every file reads back what was written, through descriptors opened again.
        for i in (0..3000).step_by(97) {
            let fh = c.lookup(&root, format!("f{i:04}")).await.unwrap();
            assert_eq!(c.read_all(&fh).await.unwrap(), format!("file {i}").as_bytes());
        }
        assert_eq!(gw.vol.stats().pending_inodes, 4000, "every file still waits for S3");
    });
}
