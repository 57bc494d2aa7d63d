//! End-to-end benchmark of the gateway, with its baselines measured in the same run.
//!
//! Sets up everything itself: a Garage S3 server on loopback, the `s3nfs` binary as a separate
//! process (so its memory can be read from /proc), and NFSv3 clients (the nfs3_client crate).
//! Prints one table; figures are ratios against the raw S3 baseline of the same run, because
//! absolute numbers on shared machines mean little.
//!
//! - sequential write of `S3NFS_BENCH_MB` (default 1024) MiB through NFS (UNSTABLE WRITEs and a
//!   COMMIT at the end, as the kernel client copies a file), counted until the object
//!   is complete in S3, against a parallel multipart PUT of the same bytes;
//! - 4 KiB changed in the middle of that file, until the new version is in S3, against sending
//!   the whole file again;
//! - cold sequential read of it through NFS (a fresh gateway state, so every byte comes from S3),
//!   against parallel ranged GETs;
//! - 4 KiB written into it by a gateway that never held it (only the part written is fetched),
//!   until acknowledged and until in S3, against fetching the whole file and sending it again;
//! - 1,000 files of 4 KiB created through NFS, with every S3 request delayed by 20 ms by a proxy,
//!   against 1,000 sequential PUTs through the same proxy; and 100 of them each fsync'd with
//!   `--durability s3`, against as many of those PUTs;
//! - peak RSS of the gateway, and peak disk use of its state directory, while writing and then
//!   reading a 2 GiB file;
//! - both durability modes (`--durability local` and `s3`): a sequential write with one fsync
//!   (COMMIT) at the end, and small files each written and fsync'd, against the same on the
//!   local disk (`std::fs` with `sync_all`) and against raw S3 PUTs.
//!
//! `S3NFS_BENCH_ONLY=durability` runs the last part alone; `S3NFS_BENCH_ONLY=read` the cold read
//! (three times, each beside its baseline); `S3NFS_BENCH_ONLY=large` runs only the
//! large file, of `S3NFS_BENCH_LARGE_MB` (default 10240), with the peak disk use of the
//! gateway's state directory beside its peak memory.
//! Run: `cargo bench --bench gateway` (set `S3NFS_BENCH_QUICK=1` for a smaller, faster run).
//! `S3NFS_BENCH_TRACING=1` runs every gateway with OpenTelemetry on, sampling every trace
//! (`always_on`) to a live OTLP/gRPC receiver in this process: compare with a run without it
//! to get the cost of tracing.

#[path = "../tests/common/mod.rs"]
mod common;
#[allow(dead_code)]
#[path = "../tests/common/delay_proxy.rs"]
mod delay_proxy;
#[allow(dead_code)]
#[path = "../tests/common/otlp_sink.rs"]
mod otlp_sink;
use common::garage;
use common::rpc::root_cred;

/// The OTLP receiver's endpoint when `S3NFS_BENCH_TRACING=1`.
static OTLP: std::sync::OnceLock<String> = std::sync::OnceLock::new();

use std::io::{BufRead, BufReader};
use std::process::{Child, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use futures::StreamExt;
use nfs3_client::nfs3_types::nfs3::{
    self, createhow3, diropargs3, nfs_fh3, sattr3, stable_how, CREATE3args, Nfs3Option, READ3args, WRITE3args,
};
use nfs3_client::nfs3_types::xdr_codec::Opaque;
use nfs3_client::tokio::{TokioConnector, TokioIo};
use nfs3_client::{Nfs3Connection, Nfs3ConnectionBuilder};
use s3nfs::store::s3::S3Store;
use s3nfs::store::{Body, ObjectMeta, ObjectStore, Part, UserMeta};

type Conn = Nfs3Connection<TokioIo<tokio::net::TcpStream>>;

const MIB: u64 = 1 << 20;
const BLOCK: u64 = MIB; // the NFS client's wsize/rsize, as the kernel client negotiates it
const PARALLEL: usize = 8;

struct Gateway {
    child: Child,
    port: u16,
    /// The gateway's `--state-dir`, removed with it.
    state: tempfile::TempDir,
}

impl Gateway {
    fn start(g: &garage::Garage, endpoint: &str, bucket: &str) -> Gateway {
        Gateway::start_with(g, endpoint, bucket, &[])
    }

    fn start_with(g: &garage::Garage, endpoint: &str, bucket: &str, extra: &[&str]) -> Gateway {
        let state = tempfile::tempdir().unwrap();
        let mut cmd = common::gateway::s3nfs_command();
        if let Some(otlp) = OTLP.get() {
            cmd.env("OTEL_EXPORTER_OTLP_ENDPOINT", otlp)
                .env("OTEL_EXPORTER_OTLP_PROTOCOL", "grpc")
                .env("OTEL_TRACES_SAMPLER", "always_on")
                .env("OTEL_METRIC_EXPORT_INTERVAL", "5000");
        }
        let mut child = cmd
            .args([
                "serve",
                "--listen",
                "127.0.0.1:0",
                "--endpoint",
                endpoint,
                "--bucket",
                bucket,
            ])
            .args(["--region", &g.region, "--flush-delay", "500ms"])
            .args(extra)
            .arg("--state-dir")
            .arg(state.path())
            .env("AWS_ACCESS_KEY_ID", &g.access_key)
            .env("AWS_SECRET_ACCESS_KEY", &g.secret_key)
            .env("RUST_LOG", "warn")
            .stdout(Stdio::piped())
            .spawn()
            .expect("start s3nfs");
        let out = BufReader::new(child.stdout.take().unwrap());
        let mut port = 0;
        for line in out.lines() {
            let line = line.unwrap();
            if let Some(rest) = line.split("port=").nth(1) {
                port = rest.split(',').next().unwrap().parse().unwrap();
                break;
            }
        }
        assert_ne!(port, 0, "gateway did not print its mount command");
        Gateway { child, port, state }
    }

    fn peak_rss_mib(&self) -> f64 {
        let status = std::fs::read_to_string(format!("/proc/{}/status", self.child.id())).unwrap();
        let kib: f64 = status
            .lines()
            .find(|l| l.starts_with("VmHWM:"))
            .and_then(|l| l.split_whitespace().nth(1))
            .and_then(|v| v.parse().ok())
            .unwrap();
        kib / 1024.0
    }
}

impl Drop for Gateway {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

async fn connect(port: u16) -> Conn {
    Nfs3ConnectionBuilder::new(TokioConnector, "127.0.0.1", "/")
        .mount_port(port)
        .nfs3_port(port)
        .connect_from_privileged_port(false)
        .credential(root_cred())
        .mount()
        .await
        .expect("NFS mount")
}

async fn create(c: &mut Conn, name: &str) -> nfs_fh3 {
    let root = c.root_nfs_fh3();
    let res = c
        .create(&CREATE3args {
            where_: diropargs3 {
                dir: root,
                name: name.as_bytes().into(),
            },
            how: createhow3::UNCHECKED(sattr3::default()),
        })
        .await
        .unwrap()
        .unwrap();
    match res.obj {
        Nfs3Option::Some(fh) => fh,
        Nfs3Option::None => panic!("CREATE returned no handle"),
    }
}

async fn lookup(c: &mut Conn, name: &str) -> nfs_fh3 {
    let root = c.root_nfs_fh3();
    c.lookup(&nfs3::LOOKUP3args {
        what: diropargs3 {
            dir: root,
            name: name.as_bytes().into(),
        },
    })
    .await
    .unwrap()
    .unwrap()
    .object
}

/// A block whose first bytes say where it belongs, so reads can be checked cheaply.
fn block(template: &Bytes, index: u64) -> Vec<u8> {
    let mut b = template.to_vec();
    b[..8].copy_from_slice(&index.to_le_bytes());
    b
}

/// One WRITE of `data` at `offset`; panics on any failure.
async fn write(c: &mut Conn, fh: &nfs_fh3, offset: u64, data: Vec<u8>, stable: stable_how) {
    c.write(&WRITE3args {
        file: fh.clone(),
        offset,
        count: data.len() as u32,
        stable,
        data: Opaque::owned(data),
    })
    .await
    .unwrap()
    .unwrap();
}

/// Writes `total` bytes in BLOCK-sized WRITEs, PARALLEL connections taking blocks in order.
async fn nfs_write(port: u16, fh: &nfs_fh3, total: u64, template: &Bytes, stable: stable_how) {
    let next = Arc::new(std::sync::atomic::AtomicU64::new(0));
    let tasks: Vec<_> = (0..PARALLEL)
        .map(|_| {
            let (fh, next, template) = (fh.clone(), next.clone(), template.clone());
            tokio::spawn(async move {
                let mut c = connect(port).await;
                loop {
                    let i = next.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                    if i * BLOCK >= total {
                        break;
                    }
                    write(&mut c, &fh, i * BLOCK, block(&template, i), stable).await;
                }
            })
        })
        .collect();
    for t in tasks {
        t.await.unwrap();
    }
}

async fn nfs_read(port: u16, fh: &nfs_fh3, total: u64) {
    let next = Arc::new(std::sync::atomic::AtomicU64::new(0));
    let tasks: Vec<_> = (0..PARALLEL)
        .map(|_| {
            let (fh, next) = (fh.clone(), next.clone());
            tokio::spawn(async move {
                let mut c = connect(port).await;
                loop {
                    let i = next.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                    if i * BLOCK >= total {
                        break;
                    }
                    let r = c
                        .read(&READ3args {
                            file: fh.clone(),
                            offset: i * BLOCK,
                            count: BLOCK as u32,
                        })
                        .await
                        .unwrap()
                        .unwrap();
                    assert_eq!(r.data.0.len() as u64, BLOCK, "short read at block {i}");
                    assert_eq!(&r.data.0[..8], &i.to_le_bytes(), "wrong bytes at block {i}");
                }
            })
        })
        .collect();
    for t in tasks {
        t.await.unwrap();
    }
}

async fn wait_in_s3(store: &S3Store, key: &str, size: u64) {
    wait_for_object(store, key, &format!("{size} bytes"), |h| h.size == size).await
}

/// Waits until `key` in S3 is no longer the version `etag`.
async fn wait_changed_in_s3(store: &S3Store, key: &str, etag: &str) {
    wait_for_object(store, key, &format!("a version other than {etag}"), |h| h.etag != etag).await
}

/// Polls `key`'s HEAD every 20 ms until `done` holds of it, for at most 600 s; panics naming
/// `what` after that.
async fn wait_for_object(store: &S3Store, key: &str, what: &str, done: impl Fn(&ObjectMeta) -> bool) {
    let deadline = Instant::now() + Duration::from_secs(600);
    loop {
        if let Ok(Some(h)) = store.head(key).await {
            if done(&h) {
                return;
            }
        }
        assert!(Instant::now() < deadline, "{key} never reached S3 with {what}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

async fn s3_multipart_put(store: &S3Store, key: &str, total: u64, template: &Bytes) {
    const PART: u64 = 16 * MIB;
    let id = store.create_multipart(key, &UserMeta::new()).await.unwrap();
    let parts: Vec<Part> = futures::stream::iter(0..total.div_ceil(PART))
        .map(|p| {
            let id = id.clone();
            async move {
                let len = PART.min(total - p * PART);
                let mut body = Vec::with_capacity(len as usize);
                for b in 0..len / BLOCK {
                    body.extend_from_slice(&block(template, p * PART / BLOCK + b));
                }
                let etag = store
                    .upload_part(key, &id, p as i32 + 1, Body::Bytes(body.into()))
                    .await
                    .unwrap();
                Part {
                    number: p as i32 + 1,
                    etag,
                }
            }
        })
        .buffered(PARALLEL)
        .collect()
        .await;
    store.complete_multipart(key, &id, &parts).await.unwrap();
}

async fn s3_ranged_get(store: &S3Store, key: &str, total: u64) {
    const RANGE: u64 = 16 * MIB;
    futures::stream::iter(0..total.div_ceil(RANGE))
        .map(|r| async move {
            let b = store
                .get_range(key, r * RANGE..(r * RANGE + RANGE).min(total))
                .await
                .unwrap();
            assert_eq!(&b[..8], &(r * RANGE / BLOCK).to_le_bytes());
        })
        .buffer_unordered(PARALLEL)
        .collect::<Vec<_>>()
        .await;
}

/// The time to read `key` through a gateway with a fresh state directory: nothing staged,
/// nothing cached, every byte from S3.
async fn cold_read(g: &garage::Garage, bucket: &str, key: &str, total: u64) -> Duration {
    let gw = Gateway::start(g, &g.endpoint, bucket);
    let mut c = connect(gw.port).await;
    let fh = lookup(&mut c, key).await;
    settle();
    let t = Instant::now();
    nfs_read(gw.port, &fh, total).await;
    t.elapsed()
}

fn read_row(total: u64, nfs_get: Duration, base_get: Duration) -> (String, String, String) {
    (
        format!("cold sequential read {} MiB", total / MIB),
        format!("{:.0} MiB/s", mbps(total, nfs_get)),
        format!(
            "{:.0} MiB/s ranged GETs: {:.2}x",
            mbps(total, base_get),
            base_get.as_secs_f64() / nfs_get.as_secs_f64()
        ),
    )
}

fn mbps(bytes: u64, d: Duration) -> f64 {
    bytes as f64 / MIB as f64 / d.as_secs_f64()
}

#[tokio::main]
async fn main() {
    let quick = std::env::var("S3NFS_BENCH_QUICK").is_ok();
    let total_mb: u64 = std::env::var("S3NFS_BENCH_MB")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(if quick { 256 } else { 1024 });
    let total = total_mb * MIB;
    let small_files = if quick { 200 } else { 1000 };
    let mem_total = if quick { 512 * MIB } else { 2048 * MIB };

    let sink = match std::env::var("S3NFS_BENCH_TRACING") {
        Ok(v) if v == "1" => {
            let sink = otlp_sink::start(false).await;
            OTLP.set(sink.endpoint()).unwrap();
            Some(sink)
        }
        _ => None,
    };
    let g = garage::Garage::start();
    let bucket = g.unique_bucket();
    let store = S3Store::connect(g.s3_config(&bucket)).await.unwrap();
    // Incompressible bytes, as most of what users store is (media, archives, compressed
    // formats). Garage compresses blocks with zstd: a repeating pattern never reached its disk,
    // so the baseline skipped the disk writes that the gateway's staged copy cannot.
    let template = Bytes::from(common::pattern(1, BLOCK as usize));
    let mut rows: Vec<(String, String, String)> = Vec::new();
    if std::env::var("S3NFS_BENCH_ONLY").as_deref() == Ok("large") {
        let mb: u64 = std::env::var("S3NFS_BENCH_LARGE_MB")
            .ok()
            .and_then(|v| v.parse().ok())
            .unwrap_or(10240);
        large_file(&g, &bucket, &store, &template, mb * MIB, &mut rows).await;
        print_rows(rows);
        return;
    }
    if std::env::var("S3NFS_BENCH_ONLY").as_deref() == Ok("read") {
        // The cold read alone, three times, each beside its own baseline: to compare read paths
        // in minutes. The object is put directly, so the gateway has never held it.
        s3_multipart_put(&store, "baseline.bin", total, &template).await;
        for _ in 0..3 {
            settle();
            let t = Instant::now();
            s3_ranged_get(&store, "baseline.bin", total).await;
            let base_get = t.elapsed();
            let nfs_get = cold_read(&g, &bucket, "baseline.bin", total).await;
            rows.push(read_row(total, nfs_get, base_get));
        }
        print_rows(rows);
        return;
    }
    if std::env::var("S3NFS_BENCH_ONLY").as_deref() == Ok("durability") {
        durability(
            &g,
            &bucket,
            &store,
            &template,
            total.min(256 * MIB),
            small_files.min(200),
            &mut rows,
        )
        .await;
        print_rows(rows);
        return;
    }

    // -- sequential write and cold read, against raw S3 ------------------------------------
    // Each timed phase starts with the disk quiet (see `settle`): the one before it leaves up to
    // a GiB dirty in the page cache, Garage's or the gateway's, and the writes of the next one
    // would wait behind its write-back.
    settle();
    let t = Instant::now();
    s3_multipart_put(&store, "baseline.bin", total, &template).await;
    let base_put = t.elapsed();
    settle();
    let t = Instant::now();
    s3_ranged_get(&store, "baseline.bin", total).await;
    let base_get = t.elapsed();

    let gw = Gateway::start(&g, &g.endpoint, &bucket);
    let mut c = connect(gw.port).await;
    let fh = create(&mut c, "seq.bin").await;
    settle();
    let t = Instant::now();
    // The kernel client's way for a copy: UNSTABLE writes, one COMMIT when the file is closed.
    nfs_write(gw.port, &fh, total, &template, stable_how::UNSTABLE).await;
    commit(&mut c, &fh).await;
    let acked = t.elapsed();
    wait_in_s3(&store, "seq.bin", total).await;
    let nfs_put = t.elapsed();
    // 4 KiB changed in the middle of the file, as a database changes a page: only that part
    // goes to S3 again, the others are copied server-side. Against sending the whole file
    // again, what a client that stores whole objects does.
    let before = store.head("seq.bin").await.unwrap().unwrap().etag;
    settle();
    let t = Instant::now();
    // Past the block's first 8 bytes, which the cold read below checks.
    write(&mut c, &fh, total / 2 + 4096, vec![9u8; 4096], stable_how::UNSTABLE).await;
    commit(&mut c, &fh).await;
    wait_changed_in_s3(&store, "seq.bin", &before).await;
    let nfs_patch = t.elapsed();
    drop(gw);
    settle();
    let t = Instant::now();
    s3_multipart_put(&store, "baseline.bin", total, &template).await;
    let base_patch = t.elapsed();

    let nfs_get = cold_read(&g, &bucket, "seq.bin", total).await;

    // 4 KiB written into the file by a gateway that never held it: only the part written comes
    // from S3. Against what a client that stores whole objects does: the whole file fetched
    // (the ranged GETs above) and sent again (the multipart PUT above).
    let before = store.head("seq.bin").await.unwrap().unwrap().etag;
    let gw = Gateway::start(&g, &g.endpoint, &bucket);
    let mut c = connect(gw.port).await;
    let fh = lookup(&mut c, "seq.bin").await;
    settle();
    let t = Instant::now();
    write(&mut c, &fh, total / 2 + 8192, vec![7u8; 4096], stable_how::UNSTABLE).await;
    commit(&mut c, &fh).await;
    let cold_acked = t.elapsed();
    wait_changed_in_s3(&store, "seq.bin", &before).await;
    let cold_patch = t.elapsed();
    drop(gw);

    rows.push((
        format!("sequential write {total_mb} MiB, until in S3"),
        format!(
            "{:.0} MiB/s (acked {:.0} MiB/s)",
            mbps(total, nfs_put),
            mbps(total, acked)
        ),
        format!(
            "{:.0} MiB/s multipart PUT: {:.2}x",
            mbps(total, base_put),
            base_put.as_secs_f64() / nfs_put.as_secs_f64()
        ),
    ));
    rows.push((
        format!("4 KiB changed in a {total_mb} MiB file, until in S3"),
        format!("{:.2} s", nfs_patch.as_secs_f64()),
        format!(
            "{:.2} s whole file sent again: {:.1}x",
            base_patch.as_secs_f64(),
            base_patch.as_secs_f64() / nfs_patch.as_secs_f64()
        ),
    ));
    rows.push((
        format!("4 KiB written into a cold {total_mb} MiB file, until in S3"),
        format!(
            "{:.2} s (acked in {:.0} ms)",
            cold_patch.as_secs_f64(),
            cold_acked.as_secs_f64() * 1000.0
        ),
        format!(
            "{:.2} s whole file fetched and sent again: {:.1}x",
            (base_get + base_patch).as_secs_f64(),
            (base_get + base_patch).as_secs_f64() / cold_patch.as_secs_f64()
        ),
    ));
    rows.push(read_row(total, nfs_get, base_get));

    // -- small files with a 20 ms S3 round trip --------------------------------------------
    let addr: std::net::SocketAddr = g.endpoint.trim_start_matches("http://").parse().unwrap();
    let proxy = delay_proxy::DelayProxy::start(addr, Duration::from_millis(20))
        .await
        .unwrap();
    let mut slow_cfg = g.s3_config(&bucket);
    slow_cfg.endpoint = Some(proxy.url());
    let slow = S3Store::connect(slow_cfg).await.unwrap();
    let body = Bytes::from(vec![7u8; 4096]);
    let t = Instant::now();
    for i in 0..small_files {
        slow.put(&format!("puts/{i}"), Body::Bytes(body.clone()), &UserMeta::new())
            .await
            .unwrap();
    }
    let base_small = t.elapsed();
    let gw = Gateway::start(&g, &proxy.url(), &bucket);
    let mut c = connect(gw.port).await;
    let t = Instant::now();
    for i in 0..small_files {
        let fh = create(&mut c, &format!("small-{i}")).await;
        write(&mut c, &fh, 0, body.to_vec(), stable_how::FILE_SYNC).await;
    }
    let nfs_small = t.elapsed();
    drop(gw);
    rows.push((
        format!("{small_files} x 4 KiB files, S3 delayed 20 ms"),
        format!("{:.2} s", nfs_small.as_secs_f64()),
        format!(
            "{:.2} s sequential PUTs: {:.1}x",
            base_small.as_secs_f64(),
            base_small.as_secs_f64() / nfs_small.as_secs_f64()
        ),
    ));
    // The same with every file fsync'd under `--durability s3`: with a round trip as long as a
    // real S3's, anything serial around the one PUT (another request, a sync after it) shows.
    let synced_files = small_files.min(100);
    let gw = Gateway::start_with(&g, &proxy.url(), &bucket, &["--durability", "s3"]);
    let mut c = connect(gw.port).await;
    let t = Instant::now();
    for i in 0..synced_files {
        synced_file(&mut c, &format!("synced-{i}"), &body).await;
    }
    let nfs_synced = t.elapsed();
    drop(gw);
    let base_synced = base_small.mul_f64(synced_files as f64 / small_files as f64);
    rows.push((
        format!("--durability s3: {synced_files} x 4 KiB, each fsync'd, S3 delayed 20 ms"),
        format!("{:.2} s", nfs_synced.as_secs_f64()),
        format!(
            "{:.2} s sequential PUTs: {:.2}x",
            base_synced.as_secs_f64(),
            base_synced.as_secs_f64() / nfs_synced.as_secs_f64()
        ),
    ));

    large_file(&g, &bucket, &store, &template, mem_total, &mut rows).await;

    match &sink {
        Some(s) => println!(
            "\ntracing: on, always_on, OTLP/gRPC to a live receiver ({} spans received)",
            s.received.spans.load(std::sync::atomic::Ordering::Relaxed)
        ),
        None => println!("\ntracing: off (S3NFS_BENCH_TRACING=1 turns it on)"),
    }
    durability(
        &g,
        &bucket,
        &store,
        &template,
        total.min(256 * MIB),
        small_files.min(200),
        &mut rows,
    )
    .await;
    print_rows(rows);
}

/// Memory and disk for one large file: written through NFS (FILE_SYNC WRITEs, 8 in flight) until
/// it is in S3, then read back cold by a fresh gateway. Reports the gateway's peak resident
/// memory after each, and the peak of what its state directory took on disk meanwhile (the
/// staged copy, the journal, sled), sampled every 50 ms.
async fn large_file(
    g: &garage::Garage,
    bucket: &str,
    store: &S3Store,
    template: &Bytes,
    size: u64,
    rows: &mut Vec<(String, String, String)>,
) {
    let key = format!("large-{}.bin", size / MIB);
    let gw = Gateway::start(g, &g.endpoint, bucket);
    let disk = DiskPeak::watch(gw.state.path());
    let mut c = connect(gw.port).await;
    let fh = create(&mut c, &key).await;
    let t = Instant::now();
    nfs_write(gw.port, &fh, size, template, stable_how::FILE_SYNC).await;
    wait_in_s3(store, &key, size).await;
    let write = t.elapsed();
    let after_write = gw.peak_rss_mib();
    let disk_write = disk.stop();
    drop(gw);
    let gw = Gateway::start(g, &g.endpoint, bucket);
    let disk = DiskPeak::watch(gw.state.path());
    let mut c = connect(gw.port).await;
    let fh = lookup(&mut c, &key).await;
    let t = Instant::now();
    nfs_read(gw.port, &fh, size).await;
    let read = t.elapsed();
    let after_read = gw.peak_rss_mib();
    let disk_read = disk.stop();
    let mib = size as f64 / MIB as f64;
    rows.push((
        format!("{} MiB file: peak RSS written / read", size / MIB),
        format!("{after_write:.0} MiB / {after_read:.0} MiB"),
        "bound: 150 MiB".into(),
    ));
    rows.push((
        format!("{} MiB file: peak state-dir disk written / read", size / MIB),
        format!(
            "{:.0} MiB / {:.0} MiB",
            disk_write as f64 / MIB as f64,
            disk_read as f64 / MIB as f64
        ),
        format!(
            "write until in S3 {:.0} MiB/s, cold read {:.0} MiB/s",
            mib / write.as_secs_f64(),
            mib / read.as_secs_f64()
        ),
    ));
}

/// The largest disk use (allocated blocks) seen under a directory, sampled by a thread until
/// [`DiskPeak::stop`].
struct DiskPeak {
    stop: Arc<std::sync::atomic::AtomicBool>,
    thread: std::thread::JoinHandle<u64>,
}

impl DiskPeak {
    fn watch(dir: &std::path::Path) -> DiskPeak {
        fn used(dir: &std::path::Path) -> u64 {
            use std::os::unix::fs::MetadataExt;
            let Ok(entries) = std::fs::read_dir(dir) else { return 0 };
            entries
                .flatten()
                .map(|e| match e.metadata() {
                    Ok(m) if m.is_dir() => used(&e.path()),
                    Ok(m) => m.blocks() * 512,
                    Err(_) => 0, // removed meanwhile
                })
                .sum()
        }
        let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
        let (dir, flag) = (dir.to_path_buf(), stop.clone());
        let thread = std::thread::spawn(move || {
            let mut peak = 0;
            while !flag.load(std::sync::atomic::Ordering::Relaxed) {
                peak = peak.max(used(&dir));
                std::thread::sleep(Duration::from_millis(50));
            }
            peak.max(used(&dir))
        });
        DiskPeak { stop, thread }
    }

    fn stop(self) -> u64 {
        self.stop.store(true, std::sync::atomic::Ordering::Relaxed);
        self.thread.join().unwrap()
    }
}

fn print_rows(rows: Vec<(String, String, String)>) {
    println!("\n{:<44} {:<34} {}", "workload", "s3nfs", "baseline (same run): ratio");
    for (a, b, c) in rows {
        println!("{a:<44} {b:<34} {c}");
    }
}

async fn commit(c: &mut Conn, fh: &nfs_fh3) {
    c.commit(&nfs3::COMMIT3args {
        file: fh.clone(),
        offset: 0,
        count: 0,
    })
    .await
    .unwrap()
    .unwrap();
}

/// A small file as an application fsyncs it: CREATE, an UNSTABLE WRITE of `body`, COMMIT.
/// Returns how long each of the three took.
async fn synced_file(c: &mut Conn, name: &str, body: &[u8]) -> [Duration; 3] {
    let t = Instant::now();
    let fh = create(c, name).await;
    let created = t.elapsed();
    let t = Instant::now();
    write(c, &fh, 0, body.to_vec(), stable_how::UNSTABLE).await;
    let written = t.elapsed();
    let t = Instant::now();
    commit(c, &fh).await;
    [created, written, t.elapsed()]
}

/// Writes back every dirty page of the machine, so that a timed phase does not pay for the
/// write-back of the one before (a 256 MiB write leaves hundreds of MB dirty in the page cache,
/// and every fsync after it waits behind them: small-file COMMITs measured 0.7 ms or 4.7 ms
/// depending on what ran just before).
fn settle() {
    // SAFETY: sync(2) takes no arguments and cannot fail.
    unsafe { libc::sync() };
}

/// What fsync costs in each durability mode, against the local disk and raw S3. Each phase
/// starts with the disk quiet (see [`settle`]).
async fn durability(
    g: &garage::Garage,
    bucket: &str,
    store: &S3Store,
    template: &Bytes,
    total: u64,
    files: usize,
    rows: &mut Vec<(String, String, String)>,
) {
    use std::io::Write;
    let total_mb = total / MIB;
    // Local disk: small files each fsync'd; the same bytes as the sequential write, one fsync
    // at the end.
    let dir = tempfile::tempdir().unwrap();
    let body = vec![7u8; 4096];
    settle();
    let t = Instant::now();
    for i in 0..files {
        let mut f = std::fs::File::create(dir.path().join(format!("s{i}"))).unwrap();
        f.write_all(&body).unwrap();
        f.sync_all().unwrap();
    }
    let disk_small = t.elapsed();
    settle();
    let t = Instant::now();
    {
        let mut f = std::fs::File::create(dir.path().join("seq")).unwrap();
        for i in 0..total / BLOCK {
            f.write_all(&block(template, i)).unwrap();
        }
        f.sync_all().unwrap();
    }
    let disk_seq = t.elapsed();
    settle();
    let t = Instant::now();
    for i in 0..files {
        store
            .put(
                &format!("dur-puts/{i}"),
                Body::Bytes(Bytes::from(body.clone())),
                &UserMeta::new(),
            )
            .await
            .unwrap();
    }
    let s3_small = t.elapsed();
    settle();
    let t = Instant::now();
    s3_multipart_put(store, "dur-baseline.bin", total, template).await;
    let s3_seq = t.elapsed();

    for mode in ["local", "s3"] {
        let gw = Gateway::start_with(g, &g.endpoint, bucket, &["--durability", mode]);
        let mut c = connect(gw.port).await;
        settle();
        let t = Instant::now();
        let mut phases = [Duration::ZERO; 3];
        for i in 0..files {
            let took = synced_file(&mut c, &format!("dur-{mode}-{i}"), &body).await;
            for (sum, d) in phases.iter_mut().zip(took) {
                *sum += d;
            }
        }
        let small = t.elapsed();
        let fh = create(&mut c, &format!("dur-{mode}.bin")).await;
        settle();
        let t = Instant::now();
        // The kernel client's way: UNSTABLE writes, then one COMMIT for the fsync.
        nfs_write(gw.port, &fh, total, template, stable_how::UNSTABLE).await;
        commit(&mut c, &fh).await;
        let seq = t.elapsed();
        drop(gw);
        rows.push((
            format!("--durability {mode}: write {total_mb} MiB + fsync"),
            format!("{:.0} MiB/s", mbps(total, seq)),
            format!(
                "disk {:.0} MiB/s: {:.2}x; S3 {:.0} MiB/s: {:.2}x",
                mbps(total, disk_seq),
                disk_seq.as_secs_f64() / seq.as_secs_f64(),
                mbps(total, s3_seq),
                s3_seq.as_secs_f64() / seq.as_secs_f64()
            ),
        ));
        let per = |d: Duration| d.as_secs_f64() * 1e3 / files as f64;
        rows.push((
            format!("--durability {mode}: {files} x 4 KiB, each fsync'd"),
            format!(
                "{:.2} s (per file: CREATE {:.2} ms, WRITE {:.2} ms, COMMIT {:.2} ms)",
                small.as_secs_f64(),
                per(phases[0]),
                per(phases[1]),
                per(phases[2])
            ),
            format!(
                "disk {:.2} s: {:.2}x; S3 PUTs {:.2} s: {:.2}x",
                disk_small.as_secs_f64(),
                disk_small.as_secs_f64() / small.as_secs_f64(),
                s3_small.as_secs_f64(),
                s3_small.as_secs_f64() / small.as_secs_f64()
            ),
        ));
    }
}
