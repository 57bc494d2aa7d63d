//! ReadWriteMany's cross-node path against the owner's own mount, both measured in one run.
//!
//! Two nodes in this process, as tests/rwx_members.rs runs them: each a `Member` with its own
//! supervisor and state directory, one Lease (the API server stand-in), one TLS pair made by
//! the `openssl` CLI, cross-node addresses 127.0.0.2 (A) and 127.0.0.3 (B), endpoints on
//! 127.0.0.1, one Garage. A owns the volume; B's endpoint relays over mutual TLS to A's
//! cross-node port. Each workload runs through A's endpoint (the baseline) and B's, A and B
//! alternately, RUNS times each; figures are medians, and the ratio is follower/owner
//! throughput (owner/follower time), so >1 would mean the follower is faster.
//!
//! - sequential write of 256 MiB in 1 MiB UNSTABLE WRITEs and one COMMIT, until it returns
//!   (the volume's durability is S3: the upload is included);
//! - cold sequential read of 256 MiB in 1 MiB READs: a different file each run, put in S3
//!   directly before the nodes start, so the gateway never held its bytes;
//! - 500 files, each CREATE + 4 KiB UNSTABLE WRITE + COMMIT;
//! - 2,000 serial GETATTRs of one file: the round trip of the extra hop;
//! - 200 RENAMEs of committed 4 KiB files, each answered once the move is in S3 (an owner's
//!   namespace changes are), through the owner's endpoint, against the same moves made in
//!   raw S3 in the same run (a CopyObject and a DeleteObject each, one move after the other).
//!
//! Both nodes, Garage and the client share this host's CPUs: the TLS hop costs CPU on the same
//! cores. Run: `cargo bench --bench rwx`; writes `target/rwx.json`.

#[allow(dead_code)]
#[path = "../tests/common/mod.rs"]
mod common;

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use actix::Actor;
use nfs3_client::nfs3_types::nfs3::stable_how::UNSTABLE;
use s3nfs::actors::Supervisor;
use s3nfs::clock::Clock;
use s3nfs::cluster::elect::{Role, Timing};
use s3nfs::cluster::kube::KubeLeases;
use s3nfs::cluster::lease::Holder;
use s3nfs::cluster::member::{Member, MemberConfig};
use s3nfs::cluster::tls::PeerTls;
use s3nfs::config::{Backend, Export};
use s3nfs::csi::shared::{lease_name, SupervisedOwner};
use s3nfs::store::s3::S3Store;
use s3nfs::store::{Body, ObjectStore, UserMeta};

use common::gateway::{free_port, wait_for};
use common::kube_api::KubeApi;
use common::nfs::{Client, Fh};
use common::{garage, pattern};

const MIB: usize = 1 << 20;
const SEQ: usize = 256 * MIB;
const SMALL: usize = 500;
const GETATTRS: usize = 2000;
const RUNS: usize = 3;
const RENAMES: usize = 200;
const PREFIX: &str = "vol/";

/// One node: its member (campaign, endpoint, relay) and the owner gateway it may run.
struct Node {
    member: Member,
    endpoint: SocketAddr,
    _owner: Arc<SupervisedOwner>,
    _state: tempfile::TempDir,
}

async fn node(n: u8, volume: &str, bucket: &str, api: &KubeApi, tls: &PeerTls) -> Node {
    let state = tempfile::tempdir().unwrap();
    let export = Export {
        name: volume.to_string(),
        listen: "127.0.0.1:0".parse().unwrap(),
        backend: Backend::S3(garage::shared().s3_config(bucket)),
        prefix: PREFIX.into(),
        state_dir: state.path().join("owner"),
        flush_delay: Duration::from_millis(200),
        refresh: Duration::from_secs(5), // the CSI default
        busy_defer: s3nfs::fs::defer::MAX_DEFER,
        capacity: None,
        defaults: Default::default(),
        durability: Default::default(), // SupervisedOwner makes it S3
        squash: Default::default(),
    };
    let store = s3nfs::actors::open_store(&export, false).await.unwrap();
    let owner = Arc::new(SupervisedOwner::new(Supervisor::default().start(), export, store));
    let endpoint = SocketAddr::from(([127, 0, 0, 1], free_port()));
    let cfg = MemberConfig {
        lease: lease_name(volume),
        me: Holder {
            node: format!("node-{n}"),
            addr: SocketAddr::from(([127, 0, 0, n], free_port())),
        },
        endpoint,
        timing: Timing::default(), // the chart's 15 s / 10 s / 2 s: no failover under load
    };
    let leases = Arc::new(KubeLeases::new(&api.url(), "s3nfs", None, None).unwrap());
    let member = Member::start(cfg, leases, tls.clone(), owner.clone(), Clock::system())
        .await
        .unwrap();
    Node {
        member,
        endpoint,
        _owner: owner,
        _state: state,
    }
}

async fn wait_role(n: &Node, what: &str, want: impl Fn(&Role) -> bool) {
    wait_for(Duration::from_secs(60), what, || {
        let ok = want(&n.member.role());
        async move { ok.then_some(()) }
    })
    .await
}

/// The driver's key pair, made as an operator makes the chart's Secret.
fn tls_pair(dir: &std::path::Path) -> PeerTls {
    let (key, cert) = (dir.join("peer.key"), dir.join("peer.crt"));
    let out = std::process::Command::new("openssl")
        .args(["req", "-x509", "-nodes", "-days", "1", "-subj", "/CN=s3nfs-peer"])
        .args(["-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-256", "-keyout"])
        .arg(&key)
        .arg("-out")
        .arg(&cert)
        .output()
        .expect("this bench needs the openssl CLI");
    assert!(
        out.status.success(),
        "openssl req: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    PeerTls::from_files(&cert, &key).unwrap()
}

/// Block `i` of a test file: the template with `i` in its first 8 bytes.
fn stamp(buf: &mut [u8], i: usize) {
    buf[..8].copy_from_slice(&(i as u64).to_le_bytes());
}

/// A cold file in S3, put in one request.
async fn put_cold(s3: &S3Store, key: &str, block: &mut [u8]) {
    let mut body = Vec::with_capacity(SEQ);
    for i in 0..SEQ / MIB {
        stamp(block, i);
        body.extend_from_slice(block);
    }
    s3.put(key, Body::Bytes(body.into()), &UserMeta::new()).await.unwrap();
}

/// MiB/s of a sequential write of SEQ bytes in 1 MiB UNSTABLE WRITEs, until the COMMIT returns.
async fn seq_write(c: &mut Client, name: &str, block: &mut [u8]) -> f64 {
    let root = c.root.clone();
    let fh = c.create(&root, name, 0o644).await.unwrap();
    let t = Instant::now();
    for i in 0..SEQ / MIB {
        stamp(block, i);
        let (n, ..) = c.write_how(&fh, (i * MIB) as u64, block, UNSTABLE).await.unwrap();
        assert_eq!(n as usize, MIB, "short WRITE");
    }
    c.commit(&fh).await.unwrap();
    SEQ as f64 / MIB as f64 / t.elapsed().as_secs_f64()
}

/// MiB/s of a sequential read of a cold file in 1 MiB READs, every block's stamp checked.
async fn seq_read(c: &mut Client, name: &str) -> f64 {
    let root = c.root.clone();
    let fh = c.lookup(&root, name).await.unwrap();
    let (t, mut off) = (Instant::now(), 0usize);
    loop {
        let (data, eof) = c.read(&fh, off as u64, MIB as u32).await.unwrap();
        if !data.is_empty() {
            assert_eq!(&data[..8], &((off / MIB) as u64).to_le_bytes(), "wrong bytes at {off}");
        }
        off += data.len();
        if eof {
            break;
        }
        assert_eq!(data.len(), MIB, "short READ at {off}");
    }
    assert_eq!(off, SEQ, "{name}: wrong size");
    SEQ as f64 / MIB as f64 / t.elapsed().as_secs_f64()
}

/// Seconds for SMALL files, each CREATE + 4 KiB UNSTABLE WRITE + COMMIT, in a new directory.
async fn small_files(c: &mut Client, dir: &str) -> f64 {
    let root = c.root.clone();
    let dir = c.mkdir(&root, dir).await.unwrap();
    let body = [7u8; 4096];
    let t = Instant::now();
    for i in 0..SMALL {
        let fh = c.create(&dir, format!("f{i}"), 0o644).await.unwrap();
        c.write_how(&fh, 0, &body, UNSTABLE).await.unwrap();
        c.commit(&fh).await.unwrap();
    }
    t.elapsed().as_secs_f64()
}

/// Seconds for RENAMES renames in a new directory `dir` of committed 4 KiB files, one after
/// the other; every move is checked in S3 afterwards.
async fn renames(c: &mut Client, s3: &S3Store, dir: &str) -> f64 {
    let root = c.root.clone();
    let d = c.mkdir(&root, dir).await.unwrap();
    let body = [5u8; 4096];
    for i in 0..RENAMES {
        let fh = c.create(&d, format!("f{i}"), 0o644).await.unwrap();
        c.write_how(&fh, 0, &body, UNSTABLE).await.unwrap();
        c.commit(&fh).await.unwrap();
    }
    let t = Instant::now();
    for i in 0..RENAMES {
        c.rename(&d, format!("f{i}"), &d, format!("g{i}")).await.unwrap();
    }
    let took = t.elapsed().as_secs_f64();
    let listed = s3.list(&format!("{PREFIX}{dir}/"), None, None, 1000).await.unwrap();
    let moved = listed.objects.iter().filter(|o| o.key.contains("/g")).count();
    assert_eq!(
        (moved, listed.objects.len()),
        (RENAMES, RENAMES),
        "{dir}: not every move in S3 when answered"
    );
    took
}

/// The same moves in raw S3: RENAMES objects of 4 KiB, each copied to its new key and deleted.
async fn raw_moves(s3: &S3Store, dir: &str) -> f64 {
    let body = bytes::Bytes::from(vec![5u8; 4096]);
    for i in 0..RENAMES {
        let key = format!("{PREFIX}{dir}/f{i}");
        s3.put(&key, Body::Bytes(body.clone()), &UserMeta::new()).await.unwrap();
    }
    let t = Instant::now();
    for i in 0..RENAMES {
        let (from, to) = (format!("{PREFIX}{dir}/f{i}"), format!("{PREFIX}{dir}/g{i}"));
        s3.copy(&from, None, &to, &UserMeta::new()).await.unwrap();
        s3.delete(&from).await.unwrap();
    }
    t.elapsed().as_secs_f64()
}

/// Microseconds per GETATTR, GETATTRS of them one after the other.
async fn getattrs(c: &mut Client, fh: &Fh) -> f64 {
    let t = Instant::now();
    for _ in 0..GETATTRS {
        c.getattr(fh).await.unwrap();
    }
    t.elapsed().as_secs_f64() * 1e6 / GETATTRS as f64
}

fn median(v: &[f64]) -> f64 {
    let mut v = v.to_vec();
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

/// A table row: name, unit, whether higher is better, and per side (A, B) every run's figure.
type Row = (&'static str, &'static str, bool, [Vec<f64>; 2]);

fn main() {
    let bucket = garage::shared().unique_bucket();
    common::csi::run(bench(bucket));
}

async fn bench(bucket: String) {
    let s3 = S3Store::connect(garage::shared().s3_config(&bucket)).await.unwrap();
    let mut block = pattern(7, MIB);
    eprintln!("putting {} cold files of {} MiB in S3", 2 * RUNS, SEQ / MIB);
    for i in 0..2 * RUNS {
        put_cold(&s3, &format!("{PREFIX}cold-{i}.bin"), &mut block).await;
    }
    let dir = tempfile::tempdir().unwrap();
    let (volume, tls) = (format!("{bucket}/rwx"), tls_pair(dir.path()));
    let api = KubeApi::start("127.0.0.1:0".parse().unwrap()).await;
    let a = node(2, &volume, &bucket, &api, &tls).await;
    wait_role(&a, "A to own the volume", |r| matches!(r, Role::Owner { .. })).await;
    let b = node(3, &volume, &bucket, &api, &tls).await;
    wait_role(&b, "B to follow A", |r| matches!(r, Role::Follower { .. })).await;
    let mut clients = [Client::connect(a.endpoint).await, Client::connect(b.endpoint).await];
    const SIDE: [&str; 2] = ["A", "B"];

    // `$e` RUNS times through A's endpoint and B's, alternately: every run's figure per side.
    macro_rules! alternate {
        (|$c:ident, $s:ident, $r:ident| $e:expr) => {{
            let mut runs: [Vec<f64>; 2] = Default::default();
            for $r in 0..RUNS {
                for $s in 0..2 {
                    let $c = &mut clients[$s];
                    runs[$s].push($e);
                }
            }
            runs
        }};
    }
    let write = alternate!(|c, s, r| {
        let name = format!("seq-{}{r}.bin", SIDE[s]);
        let v = seq_write(c, &name, &mut block).await;
        let head = s3.head(&format!("{PREFIX}{name}")).await.unwrap();
        assert_eq!(head.map(|h| h.size), Some(SEQ as u64), "{name} not in S3 after COMMIT");
        v
    });
    let read = alternate!(|c, s, r| seq_read(c, &format!("cold-{}.bin", 2 * r + s)).await);
    let small = alternate!(|c, s, r| {
        let dir = format!("small-{}{r}", SIDE[s]);
        let v = small_files(c, &dir).await;
        let listed = s3.list(&format!("{PREFIX}{dir}/f"), None, None, 1000).await.unwrap();
        assert_eq!(
            listed.objects.len(),
            SMALL,
            "{dir}: not every file in S3 after its COMMIT"
        );
        v
    });
    let root = clients[0].root.clone();
    let fh = clients[0].lookup(&root, "seq-A0.bin").await.unwrap();
    let attr = alternate!(|c, _s, _r| getattrs(c, &fh).await);
    // Through the owner's endpoint only: the hop is measured above; this is S3's share.
    let (mut moved, mut raw) = (Vec::new(), Vec::new());
    for r in 0..RUNS {
        moved.push(renames(&mut clients[0], &s3, &format!("renamed-{r}")).await);
        raw.push(raw_moves(&s3, &format!("raw-{r}")).await);
    }
    let relayed = s3nfs::metrics::global()
        .peer_relayed
        .load(std::sync::atomic::Ordering::Relaxed);
    assert!(relayed >= 1, "B's endpoint never relayed to A");
    assert!(
        matches!(a.member.role(), Role::Owner { .. }) && matches!(b.member.role(), Role::Follower { .. }),
        "the roles changed during the run: the figures mix owners"
    );
    report(&[
        ("sequential write 256 MiB + COMMIT", "MiB/s", true, write),
        ("cold sequential read 256 MiB", "MiB/s", true, read),
        ("500 x (CREATE + 4 KiB WRITE + COMMIT)", "s", false, small),
        ("GETATTR, 2,000 serial", "us/op", false, attr),
    ]);
    let (m, r) = (median(&moved), median(&raw));
    println!(
        "\n{RENAMES} RENAMEs of 4 KiB files through the owner, each answered once in S3: {m:.2} s; \
         the same moves in raw S3 (CopyObject + DeleteObject each): {r:.2} s; ratio {:.2}x",
        r / m
    );
    println!("ratio: raw S3's time / s3nfs's (1 would be S3's own cost, nothing serial around it).");
}

fn report(rows: &[Row]) {
    let nproc = std::thread::available_parallelism().map_or(0, |n| n.get());
    println!("\nReadWriteMany: owner A's endpoint vs follower B's (relayed over mutual TLS to A)");
    println!("machine: {nproc} CPUs (nproc); nodes A and B, Garage and the client all run on this one host,");
    println!("so the TLS hop costs CPU on the same {nproc} cores. Median of {RUNS} runs each, A and B alternating.\n");
    println!(
        "{:<40} {:>18} {:>20} {:>7}",
        "workload", "owner's endpoint", "follower's endpoint", "ratio"
    );
    let mut json = serde_json::Map::new();
    for (name, unit, higher_is_better, runs) in rows {
        let (a, b) = (median(&runs[0]), median(&runs[1]));
        let ratio = if *higher_is_better { b / a } else { a / b };
        let goal = match (*unit == "MiB/s", ratio >= 0.8) {
            (true, true) => "  (goal >=0.8x: met)",
            (true, false) => "  (goal >=0.8x: MISSED)",
            _ => "",
        };
        let fmt = |v: f64| {
            if *unit == "s" {
                format!("{v:.2} s")
            } else {
                format!("{v:.0} {unit}")
            }
        };
        println!("{name:<40} {:>18} {:>20} {ratio:>6.2}x{goal}", fmt(a), fmt(b));
        let figures = serde_json::json!({"unit": unit, "owner_runs": runs[0], "follower_runs": runs[1],
            "owner": a, "follower": b, "ratio": ratio});
        json.insert(name.to_string(), figures);
    }
    println!("\nratio: follower/owner throughput or owner/follower time (>1: the follower is faster).");
    println!("goal: >=0.8x for sequential I/O.");
    json.insert("nproc".into(), nproc.into());
    json.insert("one_host".into(), true.into());
    let path = concat!(env!("CARGO_MANIFEST_DIR"), "/target/rwx.json");
    std::fs::write(path, serde_json::to_string_pretty(&json).unwrap() + "\n").unwrap();
    println!("wrote {path}");
}
