//! A volume opened, written and closed a thousand times in one process, through the supervisor
//! as the CSI node plugin does it, leaves the process's descriptors, threads and memory flat:
//! every task, connection, database handle, staging file and cache a volume holds goes with it.
//! A test binary of its own, so nothing else runs in the process while it is measured.

mod common;

use common::csi::{fds_and_rss, run};
use common::garage;
use common::nfs::Client;
use s3nfs::actors::{StartVolume, StatusAll, StopVolume, Supervisor};
use s3nfs::config::{Backend, Export};

use actix::Actor;

fn threads() -> usize {
    std::fs::read_dir("/proc/self/task").unwrap().count()
}

#[test]
fn a_thousand_open_write_close_cycles_leave_descriptors_threads_and_memory_flat() {
    // As `s3nfs` itself runs (see main.rs), so RSS is about us and not glibc's arenas.
    // SAFETY: mallopt only tunes the allocator.
    unsafe {
        libc::mallopt(libc::M_ARENA_MAX, 2);
    }
    const WARM_UP: usize = 200;
    const MEASURED: usize = 800;
    run(async {
        let g = garage::shared();
        let bucket = g.unique_bucket();
        let state = tempfile::tempdir().unwrap();
        let port = common::gateway::free_port();
        let export = Export {
            name: "cycled".into(),
            listen: format!("127.0.0.1:{port}").parse().unwrap(),
            backend: Backend::S3(g.s3_config(&bucket)),
            prefix: String::new(),
            state_dir: state.path().join("vol"),
            flush_delay: std::time::Duration::from_secs(3600),
            refresh: std::time::Duration::from_secs(3600),
            busy_defer: s3nfs::fs::defer::MAX_DEFER,
            capacity: None,
            defaults: Default::default(),
            durability: Default::default(),
            squash: Default::default(),
        };
        let sup = Supervisor::default().start();
        let mut baseline = None;
        for i in 0..WARM_UP + MEASURED {
            if i == WARM_UP {
                baseline = Some((fds_and_rss(), threads()));
            }
            let addr = sup
                .send(StartVolume {
                    export: export.clone(),
                    check: i == 0,
                    term: None,
                    store: None,
                })
                .await
                .unwrap()
                .unwrap_or_else(|e| panic!("cycle {i}: start: {e:#}"));
            {
                let mut c = Client::connect(addr).await;
                let root = c.root.clone();
                // One new file per cycle, and the previous one's bytes read back: the close
                // before must have uploaded it, and this open must see it.
                let fh = c.create(&root, format!("f{i}"), 0o644).await.unwrap();
                c.write_all(&fh, 0, format!("cycle {i}").as_bytes()).await.unwrap();
                if i > 0 {
                    let prev = c.lookup(&root, format!("f{}", i - 1)).await.unwrap();
                    assert_eq!(c.read_all(&prev).await.unwrap(), format!("cycle {}", i - 1).as_bytes());
                }
            }
            sup.send(StopVolume("cycled".into()))
                .await
                .unwrap()
                .unwrap_or_else(|e| panic!("cycle {i}: stop: {e}"));
        }
        let ((fds0, rss0), threads0) = baseline.unwrap();
        let ((fds1, rss1), threads1) = (fds_and_rss(), threads());
        eprintln!(
            "{MEASURED} open/write/close cycles after {WARM_UP} to warm up: fds {fds0} -> {fds1}, \
             threads {threads0} -> {threads1}, RSS {} -> {} MiB",
            rss0 >> 20,
            rss1 >> 20
        );
        assert!(
            sup.send(StatusAll).await.unwrap().is_empty(),
            "a volume is still running"
        );
        assert!(fds1 <= fds0 + 2, "descriptors grew from {fds0} to {fds1}");
        assert!(threads1 <= threads0 + 2, "threads grew from {threads0} to {threads1}");
        assert!(
            rss1.saturating_sub(rss0) < 16 << 20,
            "RSS grew by {} MiB",
            rss1.saturating_sub(rss0) >> 20
        );
        // Everything each cycle wrote is in S3.
        let s3 = common::gateway::S3Side::for_bucket(&bucket).await;
        assert_eq!(s3.keys("").await.len(), WARM_UP + MEASURED);
        assert_eq!(
            s3.get(&format!("f{}", WARM_UP + MEASURED - 1)).await.unwrap(),
            format!("cycle {}", WARM_UP + MEASURED - 1).as_bytes()
        );
    });
}
