//! Instructions the gateway spends per NFS operation, counted by valgrind's callgrind: unlike
//! times on shared machines, instruction counts repeat, so a regression shows.
//!
//! Each operation is a real request (XDR bytes) going through nfsserve's decoding and dispatch,
//! the NFS adapter and the volume (on the embedded store), in one process with no network. The
//! bench runs itself under callgrind twice per operation, with the same setup and 100 and 300
//! operations, and reports (instructions(300) - instructions(100)) / 200: the setup cancels out.
//! "upload" is the background upload of one small (4 KiB) file, store write included;
//! "upload_s3" the same to a real S3 server (Garage on loopback, started by the bench), through
//! the S3 client the gateway uses: signing, HTTP and the SDK's own layers, which the embedded
//! store has none of; "upload_unsigned_s3" the same with the payload unsigned, as the gateway
//! sends it over HTTPS;
//! "syncwrite8k" is PostgreSQL's write: 8 KiB, FILE_SYNC, into a file already large and dirty;
//! "commit" is a COMMIT after an UNSTABLE 4 KiB WRITE (the WRITE is counted too; the fsyncs
//! run on a blocking thread, which the instruction count leaves out and the system-call count
//! below includes).
//!
//! `S3NFS_OPS_SYSCALLS=1` also counts system calls per operation the same way, under
//! `strace -f -c` (system calls are what costs most in a user-mode-linux guest, where each is
//! a trap into the host).
//!
//! The counted process logs as `s3nfs serve` does (`RUST_LOG=info`, to a discarded stderr), so
//! the per-operation spans count; `S3NFS_OPS_RUST_LOG=off` leaves them out.
//!
//! `S3NFS_OPS_PROFILES=DIR` keeps each op's profile as `DIR/callgrind.OP`, for
//! `callgrind_annotate`.
//!
//! Run: `cargo bench --bench ops` (needs valgrind). The figures recorded in
//! `benches/ops-instructions.txt` are printed beside the new ones; `S3NFS_OPS_UPDATE=1`
//! rewrites that file.

#[allow(dead_code)]
#[path = "../tests/common/rpc.rs"]
mod rpc;

#[allow(dead_code)]
#[path = "../tests/common/garage.rs"]
mod garage;

use std::sync::Arc;

use rpc::{call, with_volume_id, X};
use s3nfs::fs::{Cred, Volume, VolumeConfig};
use s3nfs::nfs::NfsAdapter;
use s3nfs::store::local::LocalStore;
use s3nfs::store::s3::{S3Config, S3Store, Secret};
use s3nfs::store::ObjectStore;

const OPS: &[&str] = &[
    "create",
    "write4k",
    "getattr",
    "lookup",
    "readdirplus",
    "setattr",
    "remove",
    "upload",
    "upload_s3",
    "upload_unsigned_s3",
    "syncwrite8k",
    "commit",
];
const SETUP_FILES: u64 = 300;
const N1: u64 = 100;
const N2: u64 = 300;
const NFS: u32 = 100003;
const RECORD: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/benches/ops-instructions.txt");

fn main() {
    if let Ok(op) = std::env::var("S3NFS_OPS_CHILD") {
        let n: u64 = std::env::var("S3NFS_OPS_N").unwrap().parse().unwrap();
        child(&op, n);
        return;
    }
    if std::process::Command::new("valgrind")
        .arg("--version")
        .output()
        .is_err()
    {
        eprintln!("valgrind is needed (apt-get install valgrind)");
        std::process::exit(1);
    }
    let recorded: std::collections::HashMap<String, u64> = std::fs::read_to_string(RECORD)
        .unwrap_or_default()
        .lines()
        .filter(|l| !l.starts_with('#'))
        .filter_map(|l| {
            let mut it = l.split_whitespace();
            Some((it.next()?.to_string(), it.next()?.parse().ok()?))
        })
        .collect();
    let mut rows = Vec::new();
    let count_syscalls = std::env::var("S3NFS_OPS_SYSCALLS").as_deref() == Ok("1");
    let only = std::env::var("S3NFS_OPS_ONLY").ok();
    for op in OPS {
        if only.as_deref().is_some_and(|o| !o.split(',').any(|x| x == *op)) {
            continue;
        }
        let a = instructions(op, N1);
        let b = instructions(op, N2);
        let per_op = b.saturating_sub(a) / (N2 - N1);
        let was = recorded.get(*op).copied();
        let syscalls = if count_syscalls {
            let (a, b) = (syscalls(op, N1), syscalls(op, N2));
            format!(" {:>6.1} syscalls/op", (b as f64 - a as f64) / (N2 - N1) as f64)
        } else {
            String::new()
        };
        println!(
            "{op:<12} {per_op:>10} instructions/op{syscalls} {}",
            match was {
                Some(w) => format!("(recorded {w}: {:+.1}%)", (per_op as f64 / w as f64 - 1.0) * 100.0),
                None => String::new(),
            }
        );
        rows.push((op, per_op));
    }
    if std::env::var("S3NFS_OPS_UPDATE").as_deref() == Ok("1") {
        let mut text = String::from(
            "# Instructions per NFS operation (cargo bench --bench ops; S3NFS_OPS_UPDATE=1 rewrites this).\n",
        );
        for (op, n) in rows {
            text.push_str(&format!("{op} {n}\n"));
        }
        std::fs::write(RECORD, text).unwrap();
        println!("wrote {RECORD}");
    }
}

/// Runs this binary under `strace -f -c` for `n` operations of `op`; returns the system calls
/// of the whole run.
fn syscalls(op: &str, n: u64) -> u64 {
    let out = tempfile::NamedTempFile::new().unwrap();
    let status = std::process::Command::new("strace")
        .args(["-f", "-c", "-o"])
        .arg(out.path())
        .arg(std::env::current_exe().unwrap())
        .env("S3NFS_OPS_CHILD", op)
        .env("S3NFS_OPS_N", n.to_string())
        .env("RUST_LOG", log_filter())
        .envs(s3_env(op))
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .status()
        .expect("strace is needed for S3NFS_OPS_SYSCALLS=1");
    assert!(status.success(), "strace run of {op} failed");
    let text = std::fs::read_to_string(out.path()).unwrap();
    if std::env::var_os("S3NFS_OPS_SYSCALLS_SHOW").is_some() {
        eprintln!("{op} x{n}:\n{text}");
    }
    // The "total" line: % time, seconds, usecs/call (may be empty), calls, errors, "total".
    text.lines()
        .find(|l| l.trim_end().ends_with("total"))
        .and_then(|l| {
            let nums: Vec<&str> = l.split_whitespace().collect();
            nums.iter().rev().nth(if nums.len() >= 6 { 2 } else { 1 })?.parse().ok()
        })
        .expect("strace summary")
}

/// Runs this binary under callgrind for `n` operations of `op`; returns the instruction total.
fn instructions(op: &str, n: u64) -> u64 {
    let out = tempfile::NamedTempFile::new().unwrap();
    let status = std::process::Command::new("valgrind")
        .arg("--tool=callgrind")
        // Count only inside the measured loop (this thread), not the setup or other threads.
        .arg("--collect-atstart=no")
        .arg("--toggle-collect=*s3nfs_ops_measured_phase*")
        .arg(format!("--callgrind-out-file={}", out.path().display()))
        .arg(std::env::current_exe().unwrap())
        .env("S3NFS_OPS_CHILD", op)
        .env("S3NFS_OPS_N", n.to_string())
        .env("RUST_LOG", log_filter())
        .envs(s3_env(op))
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .status()
        .unwrap();
    assert!(status.success(), "callgrind run of {op} failed");
    let text = std::fs::read_to_string(out.path()).unwrap();
    if let Some(dir) = std::env::var_os("S3NFS_OPS_PROFILES") {
        // For callgrind_annotate: where the instructions of the larger run went.
        if n == N2 {
            std::fs::copy(out.path(), std::path::Path::new(&dir).join(format!("callgrind.{op}"))).unwrap();
        }
    }
    text.lines()
        .find_map(|l| l.strip_prefix("summary: ").or_else(|| l.strip_prefix("totals: ")))
        .and_then(|v| v.split_whitespace().next()?.parse().ok())
        .expect("callgrind summary")
}

/// Where the child of an S3 op finds its server: Garage, started once for the whole bench, and
/// a bucket per run (the child's setup creates its objects anew).
fn s3_env(op: &str) -> Vec<(&'static str, String)> {
    if !op.ends_with("_s3") {
        return Vec::new();
    }
    let g = garage::shared();
    vec![
        ("S3NFS_OPS_S3_ENDPOINT", g.endpoint.clone()),
        ("S3NFS_OPS_S3_REGION", g.region.clone()),
        ("S3NFS_OPS_S3_BUCKET", g.unique_bucket()),
        ("S3NFS_OPS_S3_KEY", g.access_key.clone()),
        ("S3NFS_OPS_S3_SECRET", g.secret_key.clone()),
    ]
}

/// The store the child counts against: the embedded one, or the S3 server [`s3_env`] named.
fn store_for(op: &str, objects: &std::path::Path, rt: &tokio::runtime::Runtime) -> Arc<dyn ObjectStore> {
    if !op.ends_with("_s3") {
        return Arc::new(LocalStore::open(objects).unwrap());
    }
    let env = |k: &str| std::env::var(k).unwrap_or_else(|_| panic!("{k} is set by the parent"));
    let cfg = S3Config {
        endpoint: Some(env("S3NFS_OPS_S3_ENDPOINT")),
        bucket: env("S3NFS_OPS_S3_BUCKET"),
        region: env("S3NFS_OPS_S3_REGION"),
        path_style: true,
        access_key: Some(env("S3NFS_OPS_S3_KEY")),
        secret_key: Some(Secret(env("S3NFS_OPS_S3_SECRET"))),
        session_token: None,
    };
    let store = rt.block_on(S3Store::connect(cfg)).unwrap();
    // As over HTTPS, where payloads go unsigned (Garage here speaks plain HTTP).
    Arc::new(store.signing_payloads(!op.contains("unsigned")))
}

/// The log filter the counted process runs with: `S3NFS_OPS_RUST_LOG`, by default `info`, what
/// `s3nfs serve` runs with unless told otherwise (its per-operation spans are then live and
/// cost what they cost in a gateway; `off` counts the operations alone).
fn log_filter() -> String {
    std::env::var("S3NFS_OPS_RUST_LOG").unwrap_or_else(|_| "info".into())
}

fn child(op: &str, n: u64) {
    // The gateway's own logging (stderr, discarded here), as `s3nfs serve` sets it up.
    let _logging = s3nfs::telemetry::init();
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let state = tempfile::tempdir().unwrap();
    let objects = tempfile::tempdir().unwrap();
    let store = store_for(op, objects.path(), &rt);
    let mut cfg = VolumeConfig::new(state.path().to_path_buf());
    cfg.flush_delay = std::time::Duration::ZERO;
    // No relisting from S3 in the middle of the count (valgrind is slow: the default interval
    // would pass during the run and add a listing to whichever operation came next).
    cfg.refresh = std::time::Duration::from_secs(86400);
    let vol = rt.block_on(Volume::open(cfg, store)).unwrap();
    let fs: Arc<dyn nfsserve::vfs::NFSFileSystem + Send + Sync> = Arc::new(NfsAdapter::new(vol.clone()));
    let id = vol.volume_id();
    let send = |record: Vec<u8>| {
        let reply = rt
            .block_on(nfsserve::process_record(fs.clone(), &with_volume_id(record, id)))
            .expect("a reply");
        assert_eq!(&reply[20..28], &[0; 8], "{op} failed");
    };
    // The same setup for every run: SETUP_FILES files of 4 KiB, in S3.
    let data = vec![7u8; 4096];
    let mut inos = Vec::new();
    for i in 0..SETUP_FILES {
        let name = format!("f{i:04}");
        send(call(
            1,
            NFS,
            3,
            8,
            X::default().fh(1).opaque(name.as_bytes()).u32(0).sattr(0o644),
        ));
        let ino = rt.block_on(vol.lookup(&Cred::root(), 1, name.as_bytes())).unwrap();
        inos.push(ino);
    }
    for &ino in &inos {
        send(call(
            2,
            NFS,
            3,
            7,
            X::default().fh(ino).u64(0).u32(4096).u32(0).opaque(&data),
        ));
    }
    if !op.starts_with("upload") {
        rt.block_on(vol.flush_all()).unwrap();
    }
    if op == "syncwrite8k" {
        // PostgreSQL's files are being written already: dirty, large, and synced.
        for &ino in &inos {
            send(call(
                2,
                NFS,
                3,
                7,
                X::default().fh(ino).u64(1 << 20).u32(8192).u32(0).opaque(&[4u8; 8192]),
            ));
        }
        rt.block_on(vol.sync_durable()).unwrap();
    }
    // The requests, built (volume id and all) before the count starts.
    let requests: Vec<Vec<u8>> = (0..n)
        .map(|i| {
            let ino = inos[i as usize];
            let name = format!("f{i:04}");
            let x = X::default();
            let r = match op {
                "create" => call(
                    3,
                    NFS,
                    3,
                    8,
                    x.fh(1).opaque(format!("n{i}").as_bytes()).u32(0).sattr(0o644),
                ),
                "write4k" => call(3, NFS, 3, 7, x.fh(ino).u64(4096).u32(4096).u32(0).opaque(&data)),
                // PostgreSQL's write: a page (8 KiB), FILE_SYNC, into a file too large for its
                // bytes to go into the journal (so the file itself is synced).
                "syncwrite8k" => call(
                    3,
                    NFS,
                    3,
                    7,
                    x.fh(ino).u64(1 << 20).u32(8192).u32(2).opaque(&[5u8; 8192]),
                ),
                "getattr" => call(3, NFS, 3, 1, x.fh(ino)),
                "lookup" => call(3, NFS, 3, 3, x.fh(1).opaque(name.as_bytes())),
                "readdirplus" => call(3, NFS, 3, 17, x.fh(1).u64(0).u64(0).u32(4096).u32(32768)),
                "setattr" => call(3, NFS, 3, 2, x.fh(ino).sattr(0o600).u32(0)),
                "remove" => call(3, NFS, 3, 12, x.fh(1).opaque(name.as_bytes())),
                "upload" | "upload_s3" | "upload_unsigned_s3" => Vec::new(),
                // The WRITE before each COMMIT is built in the measured loop's pairs below.
                "commit" => call(3, NFS, 3, 21, x.fh(ino).u64(0).u32(0)),
                other => panic!("unknown op {other}"),
            };
            with_volume_id(r, id)
        })
        .collect();
    s3nfs_ops_measured_phase(&fs, &vol, &rt, &inos, &requests, op);
}

/// The operations counted (callgrind collects only inside this function).
#[inline(never)]
fn s3nfs_ops_measured_phase(
    fs: &Arc<dyn nfsserve::vfs::NFSFileSystem + Send + Sync>,
    vol: &Arc<Volume>,
    rt: &tokio::runtime::Runtime,
    inos: &[u64],
    requests: &[Vec<u8>],
    op: &str,
) {
    let data = [9u8; 4096];
    let send = |r: &[u8]| {
        let reply = rt.block_on(nfsserve::process_record(fs.clone(), r)).expect("a reply");
        assert_eq!(&reply[20..28], &[0; 8], "{op} failed");
        reply
    };
    let id = vol.volume_id();
    for (i, r) in requests.iter().enumerate() {
        if op.starts_with("upload") {
            rt.block_on(vol.flush_inode(inos[i])).unwrap();
            continue;
        }
        if op == "commit" {
            // An UNSTABLE WRITE, then its COMMIT.
            let w = call(
                3,
                NFS,
                3,
                7,
                X::default().fh(inos[i]).u64(0).u32(4096).u32(0).opaque(&data),
            );
            send(&with_volume_id(w, id));
        }
        let reply = rt.block_on(nfsserve::process_record(fs.clone(), r)).expect("a reply");
        assert_eq!(&reply[20..28], &[0; 8], "{op} failed");
    }
}
