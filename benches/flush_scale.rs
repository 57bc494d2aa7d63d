//! What a background flush round costs as the journal grows: a round looks at a bounded share
//! of the pending inodes (`ROUND_SCAN`), so a 200 ms tick must cost about the same with a
//! million pending inodes as with 4,096 (one round's share).
//!
//! The journal is filled directly (inodes marked pending, no staged data) and S3 is down (a
//! FaultyStore in outage over the embedded store), so each round does what a tick does while
//! work piles up: look at its share of the journal and try it. Prints the median round time for
//! each journal size and the ratio to the smallest.
//!
//! Run: `cargo bench --bench flush_scale` (`S3NFS_BENCH_QUICK=1`: 100,000 instead of 1,000,000).

use std::sync::Arc;
use std::time::{Duration, Instant};

use s3nfs::fs::{Volume, VolumeConfig};
use s3nfs::meta::{Batch, Inode, Kind, MetaDb, Time, ROOT_INO};
use s3nfs::store::faulty::FaultyStore;
use s3nfs::store::local::LocalStore;
use s3nfs::store::ObjectStore;

fn fill(state: &std::path::Path, n: u64) {
    let meta = MetaDb::open(&state.join("meta")).unwrap();
    let mut b = Batch::new();
    b.put_inode(&Inode::new(
        ROOT_INO,
        ROOT_INO,
        b"",
        Kind::Dir,
        0o755,
        (0, 0),
        Time::now(),
    ));
    let first = ROOT_INO + 1;
    for i in 0..n {
        let ino = first + i;
        let name = format!("f{i:07}");
        b.put_inode(&Inode::new(
            ino,
            ROOT_INO,
            name.as_bytes(),
            Kind::File,
            0o644,
            (0, 0),
            Time::now(),
        ));
        b.link(ROOT_INO, name.as_bytes(), ino, Kind::File);
        b.mark_pending(ino, ino);
        if i % 20_000 == 19_999 {
            meta.commit(std::mem::take(&mut b)).unwrap();
        }
    }
    b.set_counter("ino_limit", first + n + 1);
    b.set_counter("seq_limit", first + n + 1);
    meta.commit(b).unwrap();
    meta.checkpoint().unwrap();
}

#[tokio::main]
async fn main() {
    let big: u64 = if std::env::var("S3NFS_BENCH_QUICK").is_ok() {
        100_000
    } else {
        1_000_000
    };
    let mut rows = Vec::new();
    // 4,096 is one round's share (ROUND_SCAN): the baseline where a round looks at everything.
    for n in [4_096, big] {
        let state = tempfile::tempdir().unwrap();
        let objects = tempfile::tempdir().unwrap();
        let t = Instant::now();
        fill(state.path(), n);
        let filled = t.elapsed();
        let local: Arc<dyn ObjectStore> = Arc::new(LocalStore::open(objects.path()).unwrap());
        let (faulty, faults) = FaultyStore::new(local);
        faults.set_outage(true);
        let vol = Volume::open(VolumeConfig::new(state.path().to_path_buf()), Arc::new(faulty))
            .await
            .unwrap();
        assert_eq!(vol.stats().pending_inodes, n);
        let mut times: Vec<Duration> = Vec::new();
        for _ in 0..9 {
            let t = Instant::now();
            vol.flush_round(false).await.unwrap();
            times.push(t.elapsed());
        }
        times.sort();
        let stats = Instant::now();
        let pending = vol.stats().pending_inodes;
        let stats_time = stats.elapsed();
        assert_eq!(pending, n, "nothing can have reached S3");
        rows.push((n, times[times.len() / 2], stats_time, filled));
    }
    let base = rows[0].1.as_secs_f64();
    println!(
        "\n{:>12} {:>16} {:>10} {:>16} {:>14}",
        "pending", "flush round", "ratio", "stats (scrape)", "journal fill"
    );
    for (n, round, stats, filled) in rows {
        println!(
            "{n:>12} {:>13.1} ms {:>9.2}x {:>13.3} ms {:>12.1} s",
            round.as_secs_f64() * 1e3,
            round.as_secs_f64() / base,
            stats.as_secs_f64() * 1e3,
            filled.as_secs_f64()
        );
    }
}
