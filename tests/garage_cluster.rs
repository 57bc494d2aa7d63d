//! The gateway on a real distributed S3: a three-node Garage cluster on loopback with
//! replication factor 3 (writes and reads need 2 of the 3 replicas).
//!
//! Phase 1: a large file (48 MiB in 1 MiB WRITEs: a multipart upload streams while it is
//! written) and a burst of 200 small files are written through NFS while node 1, a replica the
//! gateway does not talk to, is SIGKILLed in the middle of a part upload and started again.
//! Phase 2: a second large file and burst while node 0, the gateway's own S3 endpoint, is
//! SIGKILLed and started again: the writes are acknowledged from the gateway's local staging and
//! the uploads resume once the node is back.
//!
//! Checked: every NFS request was answered with success (JUKEBOX, "retry later", would be
//! retried after a pause, as the kernel client does, and counted; nothing else is accepted), every acknowledged file ends up in
//! S3 byte for byte, read through a node that was never killed and directly from each node, and
//! the bucket holds nothing else. The slowest request of each kind in each stage is printed (the
//! "writers only paused" figure), not asserted: timing depends on the machine.
//!
//! Progress is followed by counters the writers and the store update, never by time: the
//! writers wait at fixed points for the node to have been killed (so that the kill lands in the
//! middle of their work whatever the machine's speed), and a node is killed only once a part
//! upload of the large file has started.

mod common;

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicU32, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use common::garage::{GarageCluster, CLUSTER_NODES};
use common::gateway::{wait_for, InProc, Opts};
use common::nfs::{Client, Fh, Status};
use futures::StreamExt;
use s3nfs::store::faulty::{FaultyStore, Op};
use s3nfs::store::s3::S3Store;
use s3nfs::store::ObjectStore;
use tokio::sync::watch;

const MIB: usize = 1 << 20;
/// The large file of phase 1 and of phase 2, in MiB. Past 32 MiB (two 16 MiB parts, the
/// gateway's default) a file streams to S3 as a multipart upload while it is written. Its writer
/// waits before MiB `*_GATE` until the node has been killed.
const BIG_1: usize = 48;
const BIG_1_GATE: usize = 40;
const BIG_2: usize = 36;
const BIG_2_GATE: usize = 34;
/// Small files of phase 1; node 1 is killed when this many are written, and restarted when
/// that many are.
const SMALL_1: usize = 200;
const SMALL_1_KILL: usize = 60;
const SMALL_1_RESTART: usize = 140;
/// Small files of phase 2, and those written while node 0 is down: few, since each request
/// can wait there for a directory listing that fails only after the S3 client's retries.
const SMALL_2: usize = 40;
const SMALL_2_KILL: usize = 20;
const SMALL_2_RESTART: usize = 26;
const SMALL_SIZE: usize = 4096;
/// How long any one wait of the test may take before it fails.
const STEP: Duration = Duration::from_secs(90);

/// Where the cluster is, for the latency report; writers read it when a request starts.
const STAGES: [&str; 5] = [
    "all 3 up",
    "node 1 down",
    "node 1 restarting/back",
    "node 0 (endpoint) down",
    "node 0 restarting/back",
];

use common::pattern;

/// The `i`-th MiB of large file `seed`.
fn big_chunk(seed: u64, i: usize) -> Vec<u8> {
    pattern(seed << 20 | i as u64, MIB)
}

/// What a file acknowledged through NFS must contain.
#[derive(Clone, Copy, Debug)]
enum Content {
    Big { seed: u64, mib: usize },
    Small { seed: u64 },
}

impl Content {
    fn bytes(self) -> Vec<u8> {
        match self {
            Content::Big { seed, mib } => (0..mib).flat_map(|i| big_chunk(seed, i)).collect(),
            Content::Small { seed } => pattern(seed, SMALL_SIZE),
        }
    }
}

/// Per (request kind, cluster stage): count, slowest time, and what it was.
type Latencies = BTreeMap<(&'static str, usize), (u64, Duration, String)>;

/// What the writers saw, as NFS clients.
#[derive(Default)]
struct Tally {
    /// Files whose CREATE and every WRITE were acknowledged.
    acked: Mutex<BTreeMap<String, Content>>,
    /// Requests answered with an error other than JUKEBOX.
    failures: Mutex<Vec<String>>,
    /// JUKEBOX answers (each retried).
    jukebox: AtomicU64,
    /// Requests acknowledged.
    ops: AtomicU64,
    /// Per (request kind, stage): (count, slowest, which).
    latency: Mutex<Latencies>,
    /// Index into STAGES.
    stage: AtomicU32,
}

impl Tally {
    fn record(&self, kind: &'static str, stage: usize, took: Duration, what: &str) {
        self.ops.fetch_add(1, Ordering::Relaxed);
        let mut l = self.latency.lock().unwrap();
        let e = l.entry((kind, stage)).or_insert((0, Duration::ZERO, String::new()));
        e.0 += 1;
        if took > e.1 {
            e.1 = took;
            e.2 = what.to_string();
        }
    }

    fn fail(&self, what: String) {
        eprintln!("NFS request failed: {what}");
        self.failures.lock().unwrap().push(what);
    }
}

/// A pause before sending a request again after JUKEBOX, as the kernel client makes.
const JUKEBOX_RETRY: Duration = Duration::from_millis(50);

/// CREATE until answered (JUKEBOX retried); `None` after a failure (recorded).
async fn create(c: &mut Client, t: &Tally, dir: &Fh, name: &str) -> Option<Fh> {
    let stage = t.stage.load(Ordering::Acquire) as usize;
    let start = Instant::now();
    loop {
        match c.create(dir, name, 0o644).await {
            Ok(fh) => {
                t.record("CREATE", stage, start.elapsed(), name);
                return Some(fh);
            }
            Err(Status::NFS3ERR_JUKEBOX) => {
                t.jukebox.fetch_add(1, Ordering::Relaxed);
                tokio::time::sleep(JUKEBOX_RETRY).await;
            }
            Err(e) => {
                t.fail(format!("CREATE {name}: {e:?}"));
                return None;
            }
        }
    }
}

/// WRITE (FILE_SYNC) of all of `data` at `offset`, until acknowledged (JUKEBOX retried, short
/// writes continued); false after a failure (recorded).
async fn write(c: &mut Client, t: &Tally, fh: &Fh, what: &str, kind: &'static str, offset: u64, data: &[u8]) -> bool {
    let stage = t.stage.load(Ordering::Acquire) as usize;
    let start = Instant::now();
    let mut done = 0;
    while done < data.len() {
        match c.write(fh, offset + done as u64, &data[done..]).await {
            Ok(0) => {
                t.fail(format!(
                    "WRITE {what} at {}: acknowledged 0 bytes",
                    offset + done as u64
                ));
                return false;
            }
            Ok(n) => done += n as usize,
            Err(Status::NFS3ERR_JUKEBOX) => {
                t.jukebox.fetch_add(1, Ordering::Relaxed);
                tokio::time::sleep(JUKEBOX_RETRY).await;
            }
            Err(e) => {
                t.fail(format!("WRITE {what} at {}: {e:?}", offset + done as u64));
                return false;
            }
        }
    }
    t.record(kind, stage, start.elapsed(), what);
    true
}

/// Waits until the test has reached `stage` (a node was killed or restarted).
async fn reach(stage: &mut watch::Receiver<u32>, want: u32) {
    tokio::time::timeout(STEP, stage.wait_for(|s| *s >= want))
        .await
        .unwrap_or_else(|_| panic!("a writer waited {STEP:?} for stage {want}"))
        .expect("the stage channel closed");
}

/// Writes a large file of `mib` MiB, 1 MiB per WRITE; `progress` counts MiB acknowledged.
/// Before MiB `at` of each `(at, stage)` in `gates`, waits for that stage.
#[allow(clippy::too_many_arguments)]
async fn big_writer(
    addr: std::net::SocketAddr,
    t: Arc<Tally>,
    name: String,
    seed: u64,
    mib: usize,
    progress: Arc<AtomicUsize>,
    gates: Vec<(usize, u32)>,
    mut stage: watch::Receiver<u32>,
) {
    let mut c = Client::connect(addr).await;
    let root = c.root.clone();
    let Some(fh) = create(&mut c, &t, &root, &name).await else {
        return;
    };
    for i in 0..mib {
        for &(at, s) in &gates {
            if at == i {
                reach(&mut stage, s).await;
            }
        }
        let what = format!("{name} MiB {i}");
        if !write(
            &mut c,
            &t,
            &fh,
            &what,
            "WRITE 1 MiB",
            (i * MIB) as u64,
            &big_chunk(seed, i),
        )
        .await
        {
            return;
        }
        progress.store(i + 1, Ordering::Release);
    }
    t.acked.lock().unwrap().insert(name, Content::Big { seed, mib });
}

/// Creates and writes `count` small files `<prefix>-NNN`; `progress` counts files done.
/// Before file `at` of each `(at, stage)` in `gates`, waits for that stage.
#[allow(clippy::too_many_arguments)]
async fn small_writer(
    addr: std::net::SocketAddr,
    t: Arc<Tally>,
    prefix: &'static str,
    seed: u64,
    count: usize,
    progress: Arc<AtomicUsize>,
    gates: Vec<(usize, u32)>,
    mut stage: watch::Receiver<u32>,
) {
    let mut c = Client::connect(addr).await;
    let root = c.root.clone();
    for j in 0..count {
        for &(at, s) in &gates {
            if at == j {
                reach(&mut stage, s).await;
            }
        }
        let name = format!("{prefix}-{j:03}");
        let content = Content::Small { seed: seed + j as u64 };
        if let Some(fh) = create(&mut c, &t, &root, &name).await {
            if write(&mut c, &t, &fh, &name, "WRITE 4 KiB", 0, &content.bytes()).await {
                t.acked.lock().unwrap().insert(name, content);
            }
        }
        progress.store(j + 1, Ordering::Release);
    }
}

/// UploadPart requests started per key, seen by a pass-through wrapper (no fault is injected).
type PartsStarted = Arc<Mutex<BTreeMap<String, u64>>>;

fn parts_started(p: &PartsStarted, key: &str) -> u64 {
    p.lock().unwrap().get(key).copied().unwrap_or(0)
}

/// S3 requests completed and failed so far (the process's metrics of the gateway's store).
fn s3_totals() -> (u64, u64) {
    s3nfs::metrics::global()
        .s3_stats()
        .values()
        .fold((0, 0), |(n, e), s| (n + s.count, e + s.errors))
}

fn s3_completed(op: &str) -> u64 {
    s3nfs::metrics::global().s3_stats().get(op).map_or(0, |s| s.count)
}

/// Every (key, size) in the bucket, sorted by key.
async fn list_all(store: &S3Store) -> Vec<(String, u64)> {
    let mut out = Vec::new();
    let mut token = None;
    loop {
        let page = store.list("", None, token, 1000).await.expect("LIST");
        out.extend(page.objects.into_iter().map(|o| (o.key, o.size)));
        token = page.next;
        if token.is_none() {
            break;
        }
    }
    out.sort();
    out
}

/// Polls `cond` until it holds, for at most STEP; fails at once when an NFS request has
/// failed (a writer that gave up would make the wait time out).
async fn until(t: &Tally, what: &str, mut cond: impl FnMut() -> bool) {
    wait_for(STEP, what, || {
        let failures = t.failures.lock().unwrap().clone();
        assert!(
            failures.is_empty(),
            "NFS requests failed, waiting for {what}: {failures:#?}"
        );
        std::future::ready(cond().then_some(()))
    })
    .await
}

/// Runs a blocking cluster operation off the runtime's workers; returns how long it took.
async fn on_cluster(cluster: &Arc<GarageCluster>, f: impl FnOnce(&GarageCluster) + Send + 'static) -> Duration {
    let c = cluster.clone();
    let start = Instant::now();
    tokio::task::spawn_blocking(move || f(&c))
        .await
        .expect("cluster operation panicked");
    start.elapsed()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn garage_nodes_killed_mid_write_lose_nothing_acknowledged() {
    let t0 = Instant::now();
    let cluster = Arc::new(tokio::task::spawn_blocking(GarageCluster::start).await.unwrap());
    let bucket = {
        let c = cluster.clone();
        tokio::task::spawn_blocking(move || c.unique_bucket()).await.unwrap()
    };
    println!(
        "cluster of {CLUSTER_NODES} up with bucket {bucket} after {:?}",
        t0.elapsed()
    );

    // The gateway talks to node 0 only.
    let s3 = Arc::new(S3Store::connect(cluster.s3_config(0, &bucket)).await.unwrap());
    let (watcher, faults) = FaultyStore::new(s3);
    let parts: PartsStarted = Default::default();
    {
        let parts = parts.clone();
        faults.set_callback(move |call| {
            if call.op == Op::UploadPart {
                *parts.lock().unwrap().entry(call.key.to_string()).or_default() += 1;
            }
            None
        });
    }
    let store = s3nfs::store::metered::MeteredStore::wrap(Arc::new(watcher));
    let mut gw = InProc::start(
        store,
        Opts {
            flush_delay: Duration::from_millis(100),
            ..Default::default()
        },
    )
    .await;
    let addr = gw.addr;
    let vol = gw.vol.clone();
    let tally = Arc::new(Tally::default());
    let (stage_tx, stage_rx) = watch::channel(0u32);
    let set_stage = |s: u32| {
        tally.stage.store(s, Ordering::Release);
        stage_tx.send_replace(s);
    };

    // ---- Phase 1: node 1, a replica, dies in the middle of a part upload and comes back.
    let (big1, small1) = (Arc::new(AtomicUsize::new(0)), Arc::new(AtomicUsize::new(0)));
    let writers1 = [
        tokio::spawn(big_writer(
            addr,
            tally.clone(),
            "big-1".into(),
            1,
            BIG_1,
            big1.clone(),
            vec![(BIG_1_GATE, 1)],
            stage_rx.clone(),
        )),
        tokio::spawn(small_writer(
            addr,
            tally.clone(),
            "small-1",
            1_000,
            SMALL_1,
            small1.clone(),
            vec![(SMALL_1_KILL, 1), (SMALL_1_RESTART, 2)],
            stage_rx.clone(),
        )),
    ];
    until(&tally, "a part upload of big-1 and the first small files", || {
        parts_started(&parts, "big-1") >= 1 && small1.load(Ordering::Acquire) >= SMALL_1_KILL
    })
    .await;
    let uploaded_at_kill = vol.stats().uploaded_bytes;
    let (_, s3_errors_before_1) = s3_totals();
    let in_flight = faults.calls(Op::UploadPart) - s3_completed("UploadPart");
    let took = on_cluster(&cluster, |c| c.kill(1)).await;
    set_stage(1);
    println!(
        "[{:>6.2?}] node 1 killed ({took:?}): big-1 at {} MiB, {} small files, {in_flight} part upload(s) in flight",
        t0.elapsed(),
        big1.load(Ordering::Acquire),
        small1.load(Ordering::Acquire),
    );
    // With 2 of 3 replicas Garage still takes writes: a whole part (16 MiB) more reaches S3
    // before node 1 comes back.
    until(
        &tally,
        "big-1 written, more small files, 16 MiB uploaded with node 1 down",
        || {
            big1.load(Ordering::Acquire) == BIG_1
                && small1.load(Ordering::Acquire) >= SMALL_1_RESTART
                && vol.stats().uploaded_bytes >= uploaded_at_kill + 16 * MIB as u64
        },
    )
    .await;
    println!(
        "[{:>6.2?}] with node 1 down: {} MiB uploaded since the kill, {} upload errors so far",
        t0.elapsed(),
        (vol.stats().uploaded_bytes - uploaded_at_kill) / MIB as u64,
        vol.stats().upload_errors,
    );
    set_stage(2);
    let took = on_cluster(&cluster, |c| c.restart(1)).await;
    println!(
        "[{:>6.2?}] node 1 back, all 3 nodes see 3 up (restart took {took:?})",
        t0.elapsed()
    );
    for w in writers1 {
        w.await.expect("a phase 1 writer panicked");
    }
    // Two replicas of three are a quorum: the gateway never saw the replica go.
    let (_, s3_errors_after_1) = s3_totals();
    assert_eq!(
        s3_errors_after_1, s3_errors_before_1,
        "S3 requests of the gateway failed while node 1, a replica, was down or coming back"
    );

    // ---- Phase 2: node 0, the gateway's endpoint, dies in the middle of a part upload.
    let (big2, small2) = (Arc::new(AtomicUsize::new(0)), Arc::new(AtomicUsize::new(0)));
    let writers2 = [
        tokio::spawn(big_writer(
            addr,
            tally.clone(),
            "big-2".into(),
            2,
            BIG_2,
            big2.clone(),
            vec![(BIG_2_GATE, 3)],
            stage_rx.clone(),
        )),
        tokio::spawn(small_writer(
            addr,
            tally.clone(),
            "small-2",
            2_000,
            SMALL_2,
            small2.clone(),
            vec![(SMALL_2_KILL, 3), (SMALL_2_RESTART, 4)],
            stage_rx.clone(),
        )),
    ];
    until(&tally, "a part upload of big-2 and the first small files", || {
        parts_started(&parts, "big-2") >= 1 && small2.load(Ordering::Acquire) >= SMALL_2_KILL
    })
    .await;
    let (_, s3_errors_at_kill) = s3_totals();
    let upload_errors_at_kill = vol.stats().upload_errors;
    let in_flight = faults.calls(Op::UploadPart) - s3_completed("UploadPart");
    let took = on_cluster(&cluster, |c| c.kill(0)).await;
    set_stage(3);
    let killed0 = Instant::now();
    println!(
        "[{:>6.2?}] node 0 killed ({took:?}): big-2 at {} MiB, {} small files, {in_flight} part upload(s) in flight",
        t0.elapsed(),
        big2.load(Ordering::Acquire),
        small2.load(Ordering::Acquire),
    );
    // The writes go on from staging while the gateway's uploads fail (and stay journalled).
    until(
        &tally,
        "big-2 written, more small files, an upload failed with node 0 down",
        || {
            big2.load(Ordering::Acquire) == BIG_2
                && small2.load(Ordering::Acquire) >= SMALL_2_RESTART
                && vol.stats().upload_errors > upload_errors_at_kill
        },
    )
    .await;
    let st = vol.stats();
    println!(
        "[{:>6.2?}] with node 0 down for {:?}: {} S3 requests and {} uploads failed, {} inodes and {} MiB waiting",
        t0.elapsed(),
        killed0.elapsed(),
        s3_totals().1 - s3_errors_at_kill,
        st.upload_errors - upload_errors_at_kill,
        st.pending_inodes,
        st.dirty_bytes / MIB as u64,
    );
    assert!(
        st.pending_inodes > 0,
        "nothing was waiting for S3 while the endpoint was down"
    );
    set_stage(4);
    let took = on_cluster(&cluster, |c| c.restart(0)).await;
    let back0 = Instant::now();
    println!("[{:>6.2?}] node 0 back (restart took {took:?})", t0.elapsed());
    for w in writers2 {
        w.await.expect("a phase 2 writer panicked");
    }

    // The background flusher (not a forced flush) catches up once the endpoint is back.
    until(
        &tally,
        "the gateway to upload everything after node 0 came back",
        || {
            let s = vol.stats();
            s.pending_inodes == 0 && s.dirty_bytes == 0
        },
    )
    .await;
    println!(
        "[{:>6.2?}] everything uploaded {:?} after node 0 came back",
        t0.elapsed(),
        back0.elapsed()
    );
    gw.close().await;
    let (s3_requests, s3_errors) = s3_totals();

    // ---- The report: did the writers only pause?
    let failures = tally.failures.lock().unwrap().clone();
    println!(
        "NFS requests acknowledged: {}, failed: {}, JUKEBOX (retried): {}",
        tally.ops.load(Ordering::Relaxed),
        failures.len(),
        tally.jukebox.load(Ordering::Relaxed)
    );
    let latency = tally.latency.lock().unwrap().clone();
    if let Some(((kind, stage), (_, max, what))) = latency.iter().max_by_key(|(_, v)| v.1) {
        println!("slowest NFS request: {kind} {what}, {max:.2?}, with {}", STAGES[*stage]);
    }
    println!("slowest request per kind and stage:");
    for ((kind, stage), (n, max, what)) in &latency {
        println!("  {kind:<12} {:<24} n={n:<4} max {max:>10.2?} ({what})", STAGES[*stage]);
    }
    println!("S3 requests of the gateway: {s3_requests}, failed {s3_errors}; per op:");
    for (op, s) in s3nfs::metrics::global().s3_stats() {
        println!("  {op:<24} {:>5} ({} failed)", s.count, s.errors);
    }
    assert!(failures.is_empty(), "NFS requests failed: {failures:#?}");

    // ---- Nothing acknowledged is lost: through node 2 (never killed), then each node.
    let acked = tally.acked.lock().unwrap().clone();
    assert_eq!(acked.len(), 2 + SMALL_1 + SMALL_2, "files acknowledged");
    let want: BTreeMap<String, Vec<u8>> = acked.iter().map(|(k, c)| (k.clone(), c.bytes())).collect();
    let verify = Instant::now();
    for i in [2, 0, 1] {
        let store = S3Store::connect(cluster.s3_config(i, &bucket)).await.unwrap();
        let listed = list_all(&store).await;
        assert_eq!(
            listed.iter().map(|(k, _)| k.clone()).collect::<Vec<_>>(),
            want.keys().cloned().collect::<Vec<_>>(),
            "the bucket's keys, listed through node {i}"
        );
        let store = &store;
        let want = &want;
        futures::stream::iter(listed)
            .map(|(key, size)| async move {
                let bytes = &want[&key];
                assert_eq!(size, bytes.len() as u64, "size of {key} listed through node {i}");
                let got = if size == 0 {
                    Vec::new()
                } else {
                    store
                        .get_range(&key, 0..size)
                        .await
                        .unwrap_or_else(|e| panic!("GET {key} through node {i}: {e}"))
                        .to_vec()
                };
                assert!(
                    got == *bytes,
                    "{key} through node {i}: {} bytes, {} acknowledged, first difference at {:?}",
                    got.len(),
                    bytes.len(),
                    got.iter().zip(bytes).position(|(a, b)| a != b)
                );
            })
            .buffer_unordered(8)
            .collect::<Vec<()>>()
            .await;
    }
    println!(
        "[{:>6.2?}] every object read back through each node ({:?})",
        t0.elapsed(),
        verify.elapsed()
    );
    for i in 0..CLUSTER_NODES {
        let h = cluster.health(i);
        assert!(h.as_ref().is_some_and(|h| h.all_up()), "node {i} at the end: {h:?}");
    }
    println!(
        "all {} objects identical through each of the 3 nodes; total {:?}",
        want.len(),
        t0.elapsed()
    );
}
