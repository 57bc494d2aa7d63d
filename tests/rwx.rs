//! ReadWriteMany across three nodes, with real kernel NFS mounts, inside the guest test bed.
//!
//! Each "node" is a network namespace of the guest with its own address on a bridge
//! (10.99.0.2-4), its own `s3nfs csi` node plugin (own state directory, own kernel mounts
//! through its own 127.0.0.1), and all share one Garage on the bridge (10.99.0.1). The
//! Kubernetes API server cannot run here: a stand-in serving the Lease resource
//! (`tests/common/kube_api.rs`) runs in this test's process, on the bridge too.
//!
//! The host side boots the guest, starts Garage and builds the network; the guest side is this
//! binary run again in the guest (`--ignored --exact guest_side`), acting as kubelet for the
//! three nodes over their CSI sockets, and as the pods, through the mounts.

mod common;

use std::collections::HashMap;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use common::bed::{guest_path, require_guest, run_guest, s3nfs_bin, sh_quote, GuestOpts};
use common::csi::{connect, mount_cap, publish_req, stage_req, unpublish_req, unstage_req, Clients};
use common::guest::{guest_env as env, guest_s3, guest_secret, prelude, s3_get, statvfs_total};
use common::kube_api::KubeApi;
use s3nfs::csi::pb::{self, volume_capability::access_mode::Mode};
use s3nfs::store::ObjectStore;

#[test]
fn read_write_many_across_three_nodes_with_failover() {
    if !require_guest("read_write_many_across_three_nodes_with_failover") {
        return;
    }
    let exe = std::env::current_exe().unwrap();
    let body = format!(
        r#"
export S3NFS_BIN={bin} S3NFS_IN_GUEST=1 RUST_BACKTRACE=1
for m in veth bridge; do modprobe -d "$S3NFS_MODROOT" $m 2>/dev/null; done
net() {{
  ip link add br0 type bridge && ip addr add 10.99.0.1/24 dev br0 && ip link set br0 up || return 1
  i=2
  for node in a b c; do
    ip netns add $node && ip link add h$node type veth peer name eth0 netns $node || return 1
    ip link set h$node master br0 up && ip -n $node addr add 10.99.0.$i/24 dev eth0 || return 1
    ip -n $node link set eth0 up && ip -n $node link set lo up || return 1
    i=$((i+1))
  done
  nsenter --net=/run/netns/a bash -c "exec 3<>/dev/tcp/10.99.0.1/3900" || {{ echo "node a cannot reach Garage"; return 1; }}
}}
step net net
step rwx {exe} --exact guest_side --ignored --nocapture --test-threads=1
"#,
        bin = sh_quote(&guest_path(s3nfs_bin())),
        exe = sh_quote(&guest_path(&exe)),
    );
    let script = format!("{}{body}", prelude());
    let slow = common::bed::backend().map(|b| b.slowdown()).unwrap_or(1) as u64;
    let out = run_guest(
        &script,
        &GuestOpts::default()
            .mem("1600M")
            .env("GARAGE_API", "0.0.0.0:3900")
            .timeout_secs(900 * slow),
    );
    for (k, v) in &out.values {
        eprintln!("rwx: {k} = {v}");
    }
    if !out.step("rwx").ok() {
        let console = out.console_tail(usize::MAX);
        let lines: Vec<&str> = console.lines().collect();
        let why: Vec<String> = lines
            .iter()
            .enumerate()
            .filter(|(_, l)| l.contains("thread 'guest_side'"))
            .flat_map(|(i, _)| lines[i..(i + 3).min(lines.len())].iter().map(|l| l.to_string()))
            .collect();
        eprintln!("guest side failed:\n{}", why.join("\n"));
    }
    out.assert_steps(&["garage_up", "garage_layout", "garage_bucket", "net", "rwx"]);
}

// ------------------------------------------------------------------ inside the guest

const VOLUME: &str = "vol/shared";
const ROOT: &str = "/tmp/rwx";
const NAMESPACE: &str = "s3nfs";
const NODES: [&str; 3] = ["a", "b", "c"];
/// The size the volume is expanded to: room for everything the scenario writes.
const CAPACITY: u64 = 1 << 30;

/// How much slower than user-mode-linux this guest runs: bounds on waits scale with it.
fn slow() -> u64 {
    std::env::var("S3NFS_GUEST_SLOWDOWN")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(1)
}

fn kv(k: &str, v: impl std::fmt::Display) {
    println!("@@{}@@ KV {k}={v}", env("S3NFS_TOKEN"));
}

fn secret() -> HashMap<String, String> {
    // Garage on the bridge, where every node reaches it.
    guest_secret("http://10.99.0.1:3900")
}

fn rwx() -> pb::VolumeCapability {
    mount_cap(Mode::MultiNodeMultiWriter)
}

/// One node: its network namespace, plugin process and paths. All nodes share the guest's
/// mount namespace, as pods on a node share the node's.
struct Node {
    name: &'static str,
    ip: String,
    plugin: Option<Child>,
}

impl Node {
    fn dir(&self) -> PathBuf {
        Path::new(ROOT).join(self.name)
    }
    fn socket(&self) -> PathBuf {
        self.dir().join("csi.sock")
    }
    fn staging(&self) -> PathBuf {
        self.dir().join("staging")
    }
    /// Pod `i`'s view of the volume on this node.
    fn pod(&self, i: usize) -> PathBuf {
        self.dir().join(format!("pod{i}"))
    }
    fn log(&self) -> String {
        std::fs::read_to_string(self.dir().join("plugin.log")).unwrap_or_default()
    }

    /// Starts the node plugin in the node's namespace, as the DaemonSet runs it.
    fn start(&mut self) {
        std::fs::create_dir_all(self.dir()).unwrap();
        let _ = std::fs::remove_file(self.socket());
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.dir().join("plugin.log"))
            .unwrap();
        // nsenter, not `ip netns exec`: that one also gives the program a mount namespace of
        // its own, where the plugin's mounts would be invisible to the pods (this process).
        let child = Command::new("nsenter")
            .arg(format!("--net=/run/netns/{}", self.name))
            .arg("--")
            .arg(env("S3NFS_BIN"))
            .args(["csi", "--mode", "node", "--node-id", self.name])
            .arg("--endpoint")
            .arg(format!("unix://{}", self.socket().display()))
            .arg("--state-dir")
            .arg(self.dir().join("state"))
            .args(["--ports", "20600-20610"])
            .args(["--lease-api", "http://10.99.0.1:6443", "--lease-namespace", NAMESPACE])
            .args(["--node-address", &self.ip])
            .arg("--peer-cert")
            .arg(Path::new(ROOT).join("peer.crt"))
            .arg("--peer-key")
            .arg(Path::new(ROOT).join("peer.key"))
            .env("RUST_LOG", "info")
            .stdin(Stdio::null())
            .stdout(log.try_clone().unwrap())
            .stderr(log)
            .spawn()
            .unwrap();
        self.plugin = Some(child);
    }

    fn kill9(&mut self) {
        if let Some(mut c) = self.plugin.take() {
            c.kill().unwrap();
            c.wait().unwrap();
        }
    }

    async fn clients(&self) -> Clients {
        connect(&self.socket()).await
    }

    async fn stage_and_publish(&self) {
        let mut c = self.clients().await;
        c.node
            .node_stage_volume(stage_req(VOLUME, &self.staging(), rwx(), secret(), &[]))
            .await
            .unwrap_or_else(|e| panic!("NodeStage on {}: {e}\n{}", self.name, self.log()));
        for i in 0..2 {
            c.node
                .node_publish_volume(publish_req(
                    VOLUME,
                    &self.staging(),
                    &self.pod(i),
                    rwx(),
                    false,
                    HashMap::new(),
                ))
                .await
                .unwrap_or_else(|e| panic!("NodePublish on {}: {e}", self.name));
        }
    }

    /// NodeExpandVolume, as kubelet calls it on every node with the volume staged.
    async fn expand(&self, bytes: u64) {
        let mut c = self.clients().await;
        let r = c
            .node
            .node_expand_volume(pb::NodeExpandVolumeRequest {
                volume_id: VOLUME.into(),
                volume_path: self.pod(0).to_string_lossy().into(),
                capacity_range: Some(pb::CapacityRange {
                    required_bytes: bytes as i64,
                    limit_bytes: 0,
                }),
                ..Default::default()
            })
            .await
            .unwrap_or_else(|e| panic!("NodeExpandVolume on {}: {e}", self.name))
            .into_inner();
        assert_eq!(r.capacity_bytes, bytes as i64, "on {}", self.name);
    }

    /// What NodeGetVolumeStats says of the volume's condition.
    async fn condition(&self) -> String {
        let mut c = self.clients().await;
        let st = c
            .node
            .node_get_volume_stats(pb::NodeGetVolumeStatsRequest {
                volume_id: VOLUME.into(),
                volume_path: self.pod(0).to_string_lossy().into(),
                ..Default::default()
            })
            .await
            .unwrap()
            .into_inner();
        st.volume_condition.map(|c| c.message).unwrap_or_default()
    }
}

impl Drop for Node {
    fn drop(&mut self) {
        if std::thread::panicking() {
            let log = self.log();
            let lines: Vec<_> = log.lines().collect();
            eprintln!(
                "----- plugin {} -----\n{}\n----- end plugin {} -----",
                self.name,
                lines[lines.len().saturating_sub(40)..].join("\n"),
                self.name
            );
        }
        if let Some(c) = &mut self.plugin {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

/// The node holding the lease, from the stand-in API server.
fn holder(api: &KubeApi) -> Option<String> {
    let lease = api.lease(NAMESPACE, &s3nfs::csi::shared::lease_name(VOLUME))?;
    let id = lease["spec"]["holderIdentity"].as_str()?.to_string();
    Some(id.split('@').next()?.to_string())
}

fn transitions(api: &KubeApi) -> u64 {
    api.lease(NAMESPACE, &s3nfs::csi::shared::lease_name(VOLUME))
        .and_then(|l| l["spec"]["leaseTransitions"].as_u64())
        .unwrap_or(0)
}

/// Polls `cond` every 50 ms for at most `limit` (scaled by the guest's slowness).
async fn until(what: &str, limit: Duration, mut cond: impl FnMut() -> bool) {
    let deadline = Instant::now() + limit * slow() as u32;
    while !cond() {
        assert!(
            Instant::now() < deadline,
            "timed out after {limit:?} (x{}) waiting for {what}",
            slow()
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// A pod's writer: this binary again (`writer_side`), a process of its own as a pod's would be
/// (a process holding files on a mount must not be the one that restarts a plugin). It
/// appends numbered lines to `file` through one descriptor, fsyncs each, and reports each
/// acknowledged line with its time in `progress` (on local tmpfs).
fn writer(file: &Path, progress: &Path, lines: u64) -> Child {
    Command::new(std::env::current_exe().unwrap())
        .args(["--exact", "writer_side", "--ignored", "--nocapture", "--test-threads=1"])
        .env("RWX_FILE", file)
        .env("RWX_PROGRESS", progress)
        .env("RWX_LINES", lines.to_string())
        .stdout(Stdio::null())
        .spawn()
        .unwrap()
}

fn line(i: u64) -> String {
    format!("line {i:06}\n")
}

/// (count, last time in ms since the epoch) of the lines a writer had acknowledged.
fn progress(p: &Path) -> Vec<(u64, u128)> {
    std::fs::read_to_string(p)
        .unwrap_or_default()
        .lines()
        .filter_map(|l| {
            let (i, t) = l.split_once(' ')?;
            Some((i.parse().ok()?, t.parse().ok()?))
        })
        .collect()
}

fn epoch_ms() -> u128 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_millis()
}

#[test]
#[ignore = "a pod's writer, started by guest_side"]
fn writer_side() {
    let file = std::env::var("RWX_FILE").expect("started by guest_side");
    let progress = std::env::var("RWX_PROGRESS").unwrap();
    let n: u64 = std::env::var("RWX_LINES").unwrap().parse().unwrap();
    let mut f = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(&file)
        .unwrap();
    let mut p = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(&progress)
        .unwrap();
    for i in 0..n {
        f.write_all(line(i).as_bytes()).unwrap();
        // Any error here (ESTALE above all) fails the writer, and so the test.
        f.sync_data()
            .unwrap_or_else(|e| panic!("fsync of line {i} of {file}: {e}"));
        writeln!(p, "{i} {}", epoch_ms()).unwrap();
    }
}

#[test]
#[ignore = "runs inside the guest (see read_write_many_across_three_nodes_with_failover)"]
fn guest_side() {
    assert!(
        std::env::var_os("S3NFS_IN_GUEST").is_some(),
        "run by the host side only"
    );
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(scenario());
}

async fn scenario() {
    std::fs::create_dir_all(ROOT).unwrap();
    common::peer::openssl_pair(Path::new(ROOT), "peer");
    common::peer::openssl_pair(Path::new(ROOT), "stranger");
    let api = KubeApi::start("10.99.0.1:6443".parse().unwrap()).await;
    let mut nodes: Vec<Node> = NODES
        .iter()
        .enumerate()
        .map(|(i, n)| Node {
            name: n,
            ip: format!("10.99.0.{}", i + 2),
            plugin: None,
        })
        .collect();
    for n in &mut nodes {
        n.start();
    }

    // 1. Staged on all three, two pods each. The first to stage takes the free lease.
    for n in &nodes {
        n.stage_and_publish().await;
    }
    let owner = holder(&api).expect("a lease holder");
    kv("first_owner", &owner);
    // kubelet repeats calls after its own restart: the same answers, nothing new started.
    nodes[2].stage_and_publish().await;
    assert_eq!(holder(&api).as_deref(), Some(owner.as_str()));
    for n in &nodes {
        let cond = n.condition().await;
        if n.name == owner {
            assert!(cond.contains("owned by this node"), "{}: {cond}", n.name);
        } else {
            assert!(cond.contains(&format!("owned by node {owner}")), "{}: {cond}", n.name);
        }
    }

    // 2. Close-to-open: written and closed on one node, opened on the others.
    let (a, b, c) = (&nodes[0], &nodes[1], &nodes[2]);
    std::fs::write(a.pod(0).join("hello.txt"), b"from a\n").unwrap();
    assert_eq!(std::fs::read(b.pod(1).join("hello.txt")).unwrap(), b"from a\n");
    assert_eq!(std::fs::read(c.pod(0).join("hello.txt")).unwrap(), b"from a\n");
    std::fs::write(c.pod(1).join("hello.txt"), b"then from c\n").unwrap();
    assert_eq!(std::fs::read(a.pod(1).join("hello.txt")).unwrap(), b"then from c\n");

    // A directory renamed on one node is seen whole on the others.
    std::fs::create_dir(a.pod(0).join("d1")).unwrap();
    for f in ["x", "y", "z"] {
        std::fs::write(a.pod(0).join("d1").join(f), f.as_bytes()).unwrap();
    }
    std::fs::rename(b.pod(0).join("d1"), b.pod(0).join("d2")).unwrap();
    for n in [a, c] {
        let mut names: Vec<String> = std::fs::read_dir(n.pod(1).join("d2"))
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .collect();
        names.sort();
        assert_eq!(names, ["x", "y", "z"], "d2 on {}", n.name);
        assert_eq!(std::fs::read(n.pod(1).join("d2/y")).unwrap(), b"y");
    }
    assert!(!c.pod(0).join("d1").exists(), "d1 still seen on c");

    // Concurrent appends from the three nodes to their own files in one directory.
    std::fs::create_dir(a.pod(0).join("logs")).unwrap();
    let t0 = Instant::now();
    let mut writers: Vec<Child> = nodes
        .iter()
        .map(|n| {
            writer(
                &n.pod(1).join(format!("logs/{}.log", n.name)),
                &n.dir().join("appends.progress"),
                200,
            )
        })
        .collect();
    for w in &mut writers {
        assert!(w.wait().unwrap().success(), "an appending writer failed");
    }
    kv("appends_ms", t0.elapsed().as_millis());
    let want: String = (0..200).map(line).collect();
    for reader in &nodes {
        for n in &nodes {
            let got = std::fs::read_to_string(reader.pod(0).join(format!("logs/{}.log", n.name))).unwrap();
            assert!(
                got == want,
                "{}'s log read on {}: {} bytes, not {}",
                n.name,
                reader.name,
                got.len(),
                want.len()
            );
        }
    }
    let bucket = guest_s3("vol").await;
    for n in &nodes {
        // fsync'd on a ReadWriteMany volume: in S3.
        let got = s3_get(&bucket, &format!("shared/logs/{}.log", n.name)).await;
        assert!(
            got.as_deref() == Some(want.as_bytes()),
            "{}'s log in S3: {:?} bytes, {} acknowledged; keys {:?}",
            n.name,
            got.as_ref().map(|g| g.len()),
            want.len(),
            bucket.list("shared/logs/", None, None, 100).await.map(|p| p
                .objects
                .into_iter()
                .map(|o| (o.key, o.size))
                .collect::<Vec<_>>())
        );
    }

    // An expansion, on every node as kubelet does it: df shows it everywhere (the owner's).
    for n in &nodes {
        n.expand(CAPACITY).await;
    }
    for n in &nodes {
        assert_eq!(
            statvfs_total(&n.pod(1)),
            CAPACITY,
            "df on {} after the expansion",
            n.name
        );
    }

    // 3. SIGKILL a non-owner's plugin while its pod writes: it comes back, the writer resumes.
    let fi = nodes.iter().position(|n| n.name != owner).unwrap();
    let restart_p = nodes[fi].dir().join("restart.progress");
    let mut w = writer(&nodes[fi].pod(0).join("restart.log"), &restart_p, 400);
    until(
        "the writer on a non-owner to get going",
        Duration::from_secs(60),
        || progress(&restart_p).len() >= 50,
    )
    .await;
    nodes[fi].kill9();
    nodes[fi].start();
    // Waits for the socket: the plugin restores the volume's member before it serves.
    let _ = nodes[fi].clients().await;
    assert!(
        w.wait().unwrap().success(),
        "the writer failed across its node plugin's restart"
    );
    let want: String = (0..400).map(line).collect();
    let other = nodes.iter().find(|n| n.name != nodes[fi].name).unwrap();
    assert!(
        std::fs::read_to_string(other.pod(0).join("restart.log")).unwrap() == want,
        "restart.log read elsewhere"
    );
    assert_eq!(
        holder(&api).as_deref(),
        Some(owner.as_str()),
        "a follower's restart moved the lease"
    );

    //    And the owner's plugin: it finds the lease still its own and serves again at once,
    //    from S3 alone; writers on the owner and on a follower resume.
    let oi = nodes.iter().position(|n| n.name == owner).unwrap();
    // The third node reads what the other two wrote.
    let ri = (0..nodes.len()).find(|i| *i != oi && *i != fi).unwrap();
    let writers: Vec<(PathBuf, Child)> = [oi, fi]
        .iter()
        .map(|&i| {
            let p = nodes[i].dir().join("owner-restart.progress");
            let w = writer(
                &nodes[i].pod(1).join(format!("owner-restart-{}.log", nodes[i].name)),
                &p,
                300,
            );
            (p, w)
        })
        .collect();
    for (p, _) in &writers {
        until("the writers to get going", Duration::from_secs(60), || {
            progress(p).len() >= 30
        })
        .await;
    }
    let t = Instant::now();
    nodes[oi].kill9();
    nodes[oi].start();
    let _ = nodes[oi].clients().await;
    for (_, mut w) in writers {
        assert!(
            w.wait().unwrap().success(),
            "a writer failed across the owner's plugin restart"
        );
    }
    kv("owner_restart_writers_done_ms", t.elapsed().as_millis());
    assert_eq!(
        holder(&api).as_deref(),
        Some(owner.as_str()),
        "the owner's restart moved the lease"
    );
    let want: String = (0..300).map(line).collect();
    for &i in &[oi, fi] {
        let f = format!("owner-restart-{}.log", nodes[i].name);
        let got = std::fs::read_to_string(nodes[ri].pod(1).join(&f)).unwrap();
        assert!(got == want, "{f} after the owner's restart: {} bytes", got.len());
    }

    // 4. The owner's node is cut off while all three write. A survivor takes over; the writers
    //    on the survivors go on through the same open files (the old owner's handles).
    let before = transitions(&api);
    let mut fail_writers = Vec::new();
    for n in &nodes {
        let p = n.dir().join("failover.progress");
        fail_writers.push((
            n.name,
            p.clone(),
            writer(&n.pod(0).join(format!("failover-{}.log", n.name)), &p, 1_000_000),
        ));
    }
    for (_, p, _) in &fail_writers {
        until("every writer to get going", Duration::from_secs(60), || {
            progress(p).len() >= 20
        })
        .await;
    }
    let cut = epoch_ms();
    let st = Command::new("ip")
        .args(["link", "set", &format!("h{owner}"), "down"])
        .status()
        .unwrap();
    assert!(st.success());
    let acked_at_cut: HashMap<&str, u64> = fail_writers
        .iter()
        .map(|(n, p, _)| (*n, progress(p).len() as u64))
        .collect();
    // Each survivor's writer: the first line acknowledged after the cut, then 20 more.
    let mut blocked = Vec::new();
    for (n, p, _) in fail_writers.iter().filter(|(n, _, _)| **n != owner) {
        until(
            &format!("{n}'s writer to resume after the owner was cut off"),
            Duration::from_secs(90),
            || progress(p).len() as u64 > acked_at_cut[n] + 20,
        )
        .await;
        // The longest wait for an acknowledgement from the cut on: the time writes were blocked.
        let mut last = cut;
        let mut longest = 0;
        for (_, t) in progress(p).into_iter().filter(|(_, t)| *t > cut) {
            longest = longest.max(t - last);
            last = t;
        }
        blocked.push(longest);
    }
    let new_owner = holder(&api).unwrap();
    assert_ne!(new_owner, owner, "the lease did not move");
    assert!(transitions(&api) > before, "leaseTransitions did not grow");
    let worst = *blocked.iter().max().unwrap();
    kv("failover_blocked_ms", worst);
    kv("new_owner", &new_owner);
    // A hang bound, not the goal (20 s with the default 15 s lease): the figure is reported.
    assert!(worst < 60_000 * slow() as u128, "writers blocked {worst} ms");

    // The cut-off owner stopped serving (fenced) before the new one started.
    let fenced_at = log_time(&nodes[oi].log(), "gateway abandoned").expect("the cut-off owner never fenced itself");
    let new = nodes.iter().find(|n| n.name == new_owner).unwrap();
    let owns_at = log_time(&new.log(), "this node owns the volume now").expect("the new owner's log");
    assert_eq!(
        statvfs_total(&new.pod(0)),
        CAPACITY,
        "df under the new owner: the expansion holds in its term"
    );
    kv("fence_margin_ms", owns_at.saturating_sub(fenced_at));
    assert!(
        fenced_at < owns_at,
        "the old owner fenced at {fenced_at}, the new one started at {owns_at}"
    );

    // Every line acknowledged before the cut is intact, read on the survivors.
    for (n, _, _) in &fail_writers {
        let got = std::fs::read_to_string(new.pod(1).join(format!("failover-{n}.log"))).unwrap();
        let acked = acked_at_cut[n];
        let want: String = (0..acked).map(line).collect();
        assert!(
            got.starts_with(&want),
            "{n}'s fsync'd lines before the cut are not all there ({} bytes)",
            got.len()
        );
    }

    // 5. The old owner comes back: it follows the new owner, and its writer resumes.
    let st = Command::new("ip")
        .args(["link", "set", &format!("h{owner}"), "up"])
        .status()
        .unwrap();
    assert!(st.success());
    let (_, op, _) = fail_writers.iter().find(|(n, _, _)| **n == owner).unwrap();
    until("the old owner's writer to resume", Duration::from_secs(120), || {
        progress(op).len() as u64 > acked_at_cut[owner.as_str()] + 20
    })
    .await;
    assert!(nodes[oi]
        .condition()
        .await
        .contains(&format!("owned by node {new_owner}")));
    for (_, _, w) in &mut fail_writers {
        let _ = w.kill();
        let _ = w.wait();
    }
    // Each writer's file holds its lines in order, none lost or doubled, in S3 too.
    for (n, p, _) in &fail_writers {
        let acked = progress(p).len() as u64;
        let got = std::fs::read_to_string(new.pod(0).join(format!("failover-{n}.log"))).unwrap();
        let want: String = (0..acked).map(line).collect();
        assert!(
            got.starts_with(&want),
            "{n}'s log after the failover: {} bytes, {acked} lines acknowledged",
            got.len()
        );
        let in_s3 = s3_get(&bucket, &format!("shared/failover-{n}.log")).await.unwrap();
        assert!(in_s3.starts_with(want.as_bytes()), "{n}'s log in S3");
    }

    // 6. The owner's cross-node port refuses a connection without the key, and one with
    //    another key pair.
    let owner_node = nodes.iter().find(|n| n.name == new_owner).unwrap();
    let port = endpoint_port(owner_node);
    let addr: std::net::SocketAddr = format!("{}:{port}", owner_node.ip).parse().unwrap();
    let mut plain = tokio::net::TcpStream::connect(addr).await.unwrap();
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    // An NFS NULL call, record-marked.
    let null: [u8; 44] = [
        0x80, 0, 0, 40, 0, 0, 0, 1, 0, 0, 0, 0, 0, 0, 0, 2, 0, 1, 0x86, 0xa3, 0, 0, 0, 3, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0,
        0, 0, 0, 0, 0, 0, 0, 0, 0, 0,
    ];
    plain.write_all(&null).await.unwrap();
    let mut buf = [0u8; 64];
    let n = tokio::time::timeout(Duration::from_secs(30 * slow()), plain.read(&mut buf))
        .await
        .expect("the cross-node port neither answered nor closed")
        .unwrap_or(0);
    assert!(
        n == 0 || buf[..n].iter().all(|b| *b != 0x86),
        "a plain connection got an answer"
    );
    let stranger = s3nfs::cluster::tls::PeerTls::from_files(
        &Path::new(ROOT).join("stranger.crt"),
        &Path::new(ROOT).join("stranger.key"),
    )
    .unwrap();
    let s = tokio::net::TcpStream::connect(addr).await.unwrap();
    let shaken = stranger
        .connector()
        .connect(s3nfs::cluster::tls::PeerTls::server_name(), s)
        .await;
    match shaken {
        Err(_) => {}
        Ok(mut tls) => {
            // TLS 1.3: the server's refusal of the client's certificate arrives after the
            // client's side of the handshake is done.
            let _ = tls.write_all(&null).await;
            let n = tokio::time::timeout(Duration::from_secs(30 * slow()), tls.read(&mut buf))
                .await
                .expect("the cross-node port neither answered nor closed")
                .unwrap_or(0);
            assert_eq!(n, 0, "a connection with another key pair got an answer");
        }
    }
    assert!(
        owner_node.log().contains("cross-node connection refused"),
        "the refusals are not in the owner's log"
    );

    // 7. Unstage everywhere, the owner first: it uploads what is pending and releases the
    //    lease, and a remaining node takes over at once (well within a lease duration).
    let order: Vec<usize> = {
        let mut o: Vec<usize> = (0..nodes.len()).collect();
        o.sort_by_key(|&i| nodes[i].name != new_owner);
        o
    };
    for (k, &i) in order.iter().enumerate() {
        let n = &nodes[i];
        let mut c = n.clients().await;
        for p in 0..2 {
            c.node
                .node_unpublish_volume(unpublish_req(VOLUME, &n.pod(p)))
                .await
                .unwrap_or_else(|e| panic!("NodeUnpublish on {}: {e}", n.name));
        }
        let t = Instant::now();
        c.node
            .node_unstage_volume(unstage_req(VOLUME, &n.staging()))
            .await
            .unwrap_or_else(|e| panic!("NodeUnstage on {}: {e}", n.name));
        // Again, as kubelet may: still fine.
        c.node
            .node_unstage_volume(unstage_req(VOLUME, &n.staging()))
            .await
            .unwrap_or_else(|e| panic!("NodeUnstage again on {}: {e}", n.name));
        if k == 0 {
            kv("owner_unstage_ms", t.elapsed().as_millis());
            let left = n.name;
            until(
                "a remaining node to own the volume after the owner left",
                Duration::from_secs(8),
                || holder(&api).is_some_and(|h| h != left),
            )
            .await;
        }
    }
    // The last one out released the lease.
    let lease = api.lease(NAMESPACE, &s3nfs::csi::shared::lease_name(VOLUME)).unwrap();
    assert!(
        lease["spec"]["holderIdentity"].as_str().unwrap_or("").is_empty(),
        "the lease is still held after every node unstaged: {lease}"
    );
    drop(api);
}

/// The volume's port on a node, from its plugin's log ("volume staged ... port=N").
fn endpoint_port(n: &Node) -> u16 {
    let log = n.log();
    let l = log
        .lines()
        .find(|l| l.contains("volume staged"))
        .expect("volume staged in the log");
    let p = l.split("port=").nth(1).expect("port= in the staged line");
    p.trim_start_matches(|c: char| !c.is_ascii_digit())
        .split(|c: char| !c.is_ascii_digit())
        .next()
        .unwrap()
        .parse()
        .unwrap()
}

/// The time (ms since the epoch) of the first log line containing `what`.
fn log_time(log: &str, what: &str) -> Option<u128> {
    let l = log.lines().find(|l| l.contains(what))?;
    // Lines start with an RFC 3339 time, perhaps inside ANSI colour codes.
    let start = l.find("20")?;
    let stamp: String = l[start..]
        .chars()
        .take_while(|c| !c.is_whitespace() && *c != '\x1b')
        .collect();
    let t = aws_smithy_types::DateTime::from_str(&stamp, aws_smithy_types::date_time::Format::DateTime).ok()?;
    Some(t.to_millis().ok()? as u128)
}
