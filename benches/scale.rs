//! Scale: create, `ls -l` (READDIRPLUS), `find` (READDIR), `stat` (LOOKUP + GETATTR) and
//! `rm -r` of a directory of 1,000, 10,000 and 100,000 files, and of a tree of 100,000 files in
//! 1,000 directories, through one NFS client connection (one request at a time: per-request
//! cost, not parallelism), on a gateway process of its own per size, on Garage.
//!
//! Reported per size: microseconds per file for each step, the time until the created files
//! are all in S3 (`s3nfs flush`), and the gateway's peak resident memory. Cost is linear when
//! the time per file stays flat as the count grows ×100; the last line gives that ratio for
//! each step (the largest size against the smallest, same run).
//!
//! `cargo bench --bench scale` (S3NFS_SCALE_MAX=10000 stops at 10,000 files;
//! S3NFS_SCALE_MIN=100000 runs only the 100,000-file cases).

#[path = "../tests/common/mod.rs"]
mod common;

use std::time::Instant;

use common::garage;
use common::gateway::Proc;
use common::nfs::{Client, Fh};

const STEPS: [&str; 6] = ["create", "in S3", "ls -l", "find", "stat", "rm -r"];

struct Row {
    what: String,
    files: usize,
    /// Seconds per step, in `STEPS` order.
    secs: [f64; 6],
    /// The gateway's peak resident memory at the end of each step (`STEPS` order): where it
    /// rises is the step that needed the memory.
    peak_rss_kib: [u64; 6],
}

fn peak_rss_kib(pid: u32) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .ok()
        .and_then(|s| {
            s.lines()
                .find_map(|l| l.strip_prefix("VmHWM:"))
                .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        })
        .unwrap_or(0)
}

/// `dirs` directories (0: the files go straight into one directory) holding `files` in all.
async fn run(bucket: &str, dirs: usize, files: usize) -> Row {
    let dir = tempfile::tempdir().unwrap();
    let socket = dir.path().join("admin.sock");
    let gw = Proc::start_with(
        bucket,
        &format!("scale-{dirs}-{files}/"),
        "2s",
        &["--admin-socket", socket.to_str().unwrap()],
    );
    let mut c = Client::connect(gw.addr()).await;
    let top = c.mkdir(&c.root.clone(), "top").await.unwrap();
    let parents: Vec<Fh> = if dirs == 0 {
        vec![top.clone()]
    } else {
        let mut v = Vec::new();
        for d in 0..dirs {
            v.push(c.mkdir(&top, format!("d{d:04}")).await.unwrap());
        }
        v
    };
    let per = files / parents.len();
    let name = |i: usize| format!("f{i:06}");
    let mut secs = [0.0; 6];
    let mut peak = [0u64; 6];
    let pid = gw.pid();
    let hwm = || pid.map(peak_rss_kib).unwrap_or(0);

    let t = Instant::now();
    for p in &parents {
        for i in 0..per {
            if let Err(e) = c.create(p, name(i), 0o644).await {
                let log = gw.log();
                let tail: Vec<&str> = log.lines().rev().take(20).collect();
                panic!("create {i}: {e:?}; the gateway's log ends:\n{}", tail.join("\n"));
            }
        }
    }
    secs[0] = t.elapsed().as_secs_f64();
    peak[0] = hwm();

    let t = Instant::now();
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_s3nfs"))
        .args(["flush", "--admin-socket", socket.to_str().unwrap()])
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    secs[1] = t.elapsed().as_secs_f64();
    peak[1] = hwm();

    let t = Instant::now();
    let mut listed = 0;
    for p in &parents {
        listed += c.readdirplus_all(p, 64 << 10).await.unwrap().len();
    }
    secs[2] = t.elapsed().as_secs_f64();
    peak[2] = hwm();
    assert!(listed >= files, "ls -l saw {listed} of {files}");

    let t = Instant::now();
    let mut found = c.readdir_all_plain(&top, 64 << 10).await.unwrap().len();
    if dirs > 0 {
        found = 0;
        for p in &parents {
            found += c.readdir_all_plain(p, 64 << 10).await.unwrap().len();
        }
    }
    secs[3] = t.elapsed().as_secs_f64();
    peak[3] = hwm();
    assert!(found >= files, "find saw {found} of {files}");

    let t = Instant::now();
    for p in &parents {
        for i in 0..per {
            let fh = c.lookup(p, name(i)).await.unwrap();
            c.getattr(&fh).await.unwrap();
        }
    }
    secs[4] = t.elapsed().as_secs_f64();
    peak[4] = hwm();

    let t = Instant::now();
    for (d, p) in parents.iter().enumerate() {
        for i in 0..per {
            c.remove(p, name(i)).await.unwrap();
        }
        if dirs > 0 {
            c.rmdir(&top, format!("d{d:04}")).await.unwrap();
        }
    }
    c.rmdir(&c.root.clone(), "top").await.unwrap();
    secs[5] = t.elapsed().as_secs_f64();
    peak[5] = hwm();
    drop(gw);
    Row {
        what: if dirs == 0 {
            "one directory".into()
        } else {
            format!("{dirs} directories")
        },
        files,
        secs,
        peak_rss_kib: peak,
    }
}

fn main() {
    let max: usize = std::env::var("S3NFS_SCALE_MAX")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(100_000);
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .unwrap();
    let rows = rt.block_on(async {
        let bucket = garage::shared().unique_bucket();
        let mut rows = Vec::new();
        let min: usize = std::env::var("S3NFS_SCALE_MIN")
            .ok()
            .and_then(|v| v.parse().ok())
            .unwrap_or(0);
        for n in [1_000, 10_000, 100_000].into_iter().filter(|n| *n <= max && *n >= min) {
            eprintln!("{n} files in one directory");
            rows.push(run(&bucket, 0, n).await);
        }
        if max >= 100_000 {
            eprintln!("100000 files in 1000 directories");
            rows.push(run(&bucket, 1000, 100_000).await);
        }
        rows
    });
    println!(
        "| files | layout | {} | peak RSS | peak RSS after each step (MiB) |",
        STEPS.map(|s| format!("{s} µs/file")).join(" | ")
    );
    println!("|---|---|{}---|---|", "---|".repeat(STEPS.len()));
    for r in &rows {
        let cells: Vec<String> = r
            .secs
            .iter()
            .map(|s| format!("{:.0}", s * 1e6 / r.files as f64))
            .collect();
        let steps: Vec<String> = r.peak_rss_kib.iter().map(|k| (k / 1024).to_string()).collect();
        println!(
            "| {} | {} | {} | {} MiB | {} |",
            r.files,
            r.what,
            cells.join(" | "),
            r.peak_rss_kib[5] / 1024,
            steps.join(" / ")
        );
    }
    let flat: Vec<&Row> = rows.iter().filter(|r| r.what == "one directory").collect();
    if let (Some(small), Some(large)) = (flat.first(), flat.last()) {
        if large.files > small.files {
            let ratios: Vec<String> = (0..STEPS.len())
                .map(|i| {
                    let per = |r: &Row| r.secs[i] / r.files as f64;
                    format!("{} {:.2}x", STEPS[i], per(large) / per(small))
                })
                .collect();
            println!(
                "time per file, {} files against {} (1.00x is linear): {}",
                large.files,
                small.files,
                ratios.join(", ")
            );
        }
    }
}
