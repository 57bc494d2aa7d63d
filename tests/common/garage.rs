//! A real single-node Garage S3 server for tests, and a three-node cluster.
//!
//! `Garage::start()` runs one in a temporary directory on free loopback ports, with a layout,
//! an access key and bucket permissions; `shared()` starts one per test process and reuses it,
//! with `unique_bucket()` giving each test a bucket of its own. `GarageCluster::start()` runs
//! three nodes with replication factor 3, any of which a test can kill and restart.
//!
//! Each server is a child of a dedicated thread that lives as long as the server does, and it
//! is started with `PR_SET_PDEATHSIG`: it dies with the test process even when the shared
//! instance (a static, never dropped) is never torn down. Directories of earlier test
//! processes that are gone are removed at the next start.

use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{mpsc, Mutex, OnceLock};
use std::thread;
use std::time::{Duration, Instant};

use s3nfs::store::s3::{S3Config, Secret};

const INSTALL_HINT: &str = "cargo install garage --no-default-features --features bundled-libs,sqlite,lmdb --locked";
const DIR_PREFIX: &str = "s3nfs-garage-";
const READY_TIMEOUT: Duration = Duration::from_secs(60);

pub struct Garage {
    /// `http://127.0.0.1:PORT`
    pub endpoint: String,
    pub region: String,
    pub access_key: String,
    pub secret_key: String,
    /// The temporary directory: `config.toml`, `garage.log`, `meta/`, `data/`.
    pub dir: PathBuf,
    bin: PathBuf,
    config: PathBuf,
    stop: Mutex<Option<mpsc::Sender<()>>>,
    keeper: Mutex<Option<thread::JoinHandle<()>>>,
    next_bucket: AtomicU32,
}

/// The `garage` binary: `$GARAGE_BIN`, else `~/.cargo/bin/garage`, else the first on `PATH`.
pub fn garage_bin() -> PathBuf {
    if let Some(bin) = std::env::var_os("GARAGE_BIN").filter(|v| !v.is_empty()) {
        return PathBuf::from(bin);
    }
    let mut candidates = Vec::new();
    if let Some(cargo_home) = std::env::var_os("CARGO_HOME") {
        candidates.push(PathBuf::from(cargo_home).join("bin/garage"));
    }
    if let Some(home) = std::env::var_os("HOME") {
        candidates.push(PathBuf::from(home).join(".cargo/bin/garage"));
    }
    if let Some(path) = std::env::var_os("PATH") {
        candidates.extend(std::env::split_paths(&path).map(|d| d.join("garage")));
    }
    candidates
        .into_iter()
        .find(|p| p.is_file())
        .unwrap_or_else(|| panic!("the garage binary was not found (set GARAGE_BIN, or install it: {INSTALL_HINT})"))
}

fn free_port() -> TcpListener {
    TcpListener::bind("127.0.0.1:0").expect("binding a free loopback port")
}

fn random_hex(bytes: usize) -> String {
    use std::io::Read;
    let mut buf = vec![0u8; bytes];
    std::fs::File::open("/dev/urandom")
        .and_then(|mut f| f.read_exact(&mut buf))
        .expect("reading /dev/urandom");
    buf.iter().map(|b| format!("{b:02x}")).collect()
}

/// An empty directory of this process for a new server (`label` tells clusters apart), after
/// removing those of earlier test processes that are gone.
fn fresh_dir(label: &str) -> PathBuf {
    static STARTED: AtomicU32 = AtomicU32::new(0);
    let base = std::env::temp_dir();
    remove_stale_dirs(&base);
    let dir = base.join(format!(
        "{DIR_PREFIX}{}-{label}{}",
        std::process::id(),
        STARTED.fetch_add(1, Ordering::SeqCst)
    ));
    let _ = std::fs::remove_dir_all(&dir);
    dir
}

/// Removes the directories of earlier test processes that no longer run.
fn remove_stale_dirs(base: &Path) {
    let Ok(entries) = std::fs::read_dir(base) else {
        return;
    };
    for entry in entries.flatten() {
        let name = entry.file_name().to_string_lossy().into_owned();
        let Some(rest) = name.strip_prefix(DIR_PREFIX) else {
            continue;
        };
        let Some(pid) = rest.split('-').next().and_then(|p| p.parse::<u32>().ok()) else {
            continue;
        };
        if pid != std::process::id() && !Path::new(&format!("/proc/{pid}")).exists() {
            let _ = std::fs::remove_dir_all(entry.path());
        }
    }
}

/// Runs `garage -c CONFIG server`, output to `log`, as the child of a dedicated keeper thread;
/// returns the keeper's stop channel and handle. Sending on (or dropping) the sender makes the
/// keeper SIGKILL the server and reap it; joining the handle then waits for that. The thread
/// owns the child because PR_SET_PDEATHSIG fires when the thread that forked ends, so it must
/// outlive the server (test threads come and go). Panics when the binary cannot be started.
fn keep_server(bin: &Path, config: &Path, log: std::fs::File) -> (mpsc::Sender<()>, thread::JoinHandle<()>) {
    let (stop_tx, stop_rx) = mpsc::channel::<()>();
    let (started_tx, started_rx) = mpsc::channel::<std::io::Result<()>>();
    let (bin2, config2) = (bin.to_path_buf(), config.to_path_buf());
    let keeper = thread::Builder::new()
        .name("garage-keeper".into())
        .spawn(move || {
            let mut cmd = Command::new(&bin2);
            cmd.arg("-c")
                .arg(&config2)
                .arg("server")
                .env("RUST_LOG", "garage=info")
                .stdin(Stdio::null())
                .stdout(log.try_clone().expect("cloning the log file"))
                .stderr(log);
            unsafe {
                use std::os::unix::process::CommandExt;
                cmd.pre_exec(|| {
                    if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL) != 0 {
                        return Err(std::io::Error::last_os_error());
                    }
                    Ok(())
                });
            }
            let mut child = match cmd.spawn() {
                Ok(c) => c,
                Err(e) => {
                    let _ = started_tx.send(Err(e));
                    return;
                }
            };
            let _ = started_tx.send(Ok(()));
            // Until stopped (or the owner is dropped and the sender with it).
            let _ = stop_rx.recv();
            let _ = child.kill();
            let _ = child.wait();
        })
        .expect("spawning the garage keeper thread");
    if let Err(e) = started_rx.recv().expect("garage keeper thread died") {
        panic!("starting {}: {e}", bin.display());
    }
    (stop_tx, keeper)
}

/// Runs `garage -c CONFIG ARGS`; returns the output whatever the exit status.
fn run_cli(bin: &Path, config: &Path, args: &[&str]) -> Output {
    Command::new(bin)
        .arg("-c")
        .arg(config)
        .args(args)
        .env("RUST_LOG", "warn")
        .stdin(Stdio::null())
        .output()
        .unwrap_or_else(|e| panic!("running {}: {e}", bin.display()))
}

/// Runs a CLI command until it succeeds, for up to a minute (the server may still be starting);
/// panics with the outputs and the last lines of `log` after that.
fn retry_cli(bin: &Path, config: &Path, log: &Path, args: &[&str]) -> Output {
    let deadline = Instant::now() + READY_TIMEOUT;
    let mut pause = Duration::from_millis(50);
    loop {
        let out = run_cli(bin, config, args);
        if out.status.success() {
            return out;
        }
        if Instant::now() >= deadline {
            panic!(
                "`garage {}` kept failing: {}\nstdout: {}\nstderr: {}\nserver log ({}):\n{}",
                args.join(" "),
                out.status,
                String::from_utf8_lossy(&out.stdout),
                String::from_utf8_lossy(&out.stderr),
                log.display(),
                log_tail(log),
            );
        }
        thread::sleep(pause);
        pause = (pause * 2).min(Duration::from_millis(500));
    }
}

/// The last 40 lines of a server log.
fn log_tail(log: &Path) -> String {
    let log = std::fs::read_to_string(log).unwrap_or_default();
    let lines: Vec<&str> = log.lines().collect();
    lines[lines.len().saturating_sub(40)..].join("\n")
}

/// The access key and secret from `garage key create` output.
fn parse_key(out: &Output) -> (String, String) {
    let key = String::from_utf8_lossy(&out.stdout);
    let field = |name: &str| {
        key.lines()
            .find_map(|l| l.trim().strip_prefix(name))
            .map(|v| v.trim().to_string())
            .unwrap_or_else(|| panic!("no {name:?} in `garage key create` output:\n{key}"))
    };
    (field("Key ID:"), field("Secret key:"))
}

/// The node id from `garage node id -q` output (`<id>@<addr>`).
fn parse_node_id(out: &Output) -> String {
    let node = String::from_utf8_lossy(&out.stdout);
    node.trim()
        .split('@')
        .next()
        .filter(|id| !id.is_empty())
        .unwrap_or_else(|| panic!("unexpected `garage node id` output: {node:?}"))
        .to_string()
}

impl Garage {
    /// Starts a fresh single-node Garage with a layout and an access key `test-key`.
    /// Panics (with the server's log) when it does not come up within a minute.
    pub fn start() -> Garage {
        let bin = garage_bin();
        let dir = fresh_dir("");
        std::fs::create_dir_all(&dir).expect("creating the garage directory");

        let s3 = free_port();
        let rpc = free_port();
        let s3_port = s3.local_addr().unwrap().port();
        let rpc_port = rpc.local_addr().unwrap().port();
        let region = "garage".to_string();
        let config = dir.join("config.toml");
        std::fs::write(
            &config,
            format!(
                r#"metadata_dir = "{dir}/meta"
data_dir = "{dir}/data"
db_engine = "sqlite"
replication_factor = 1
rpc_bind_addr = "127.0.0.1:{rpc_port}"
rpc_public_addr = "127.0.0.1:{rpc_port}"
rpc_secret = "{secret}"

[s3_api]
s3_region = "{region}"
api_bind_addr = "127.0.0.1:{s3_port}"
root_domain = ".s3.garage.localhost"
"#,
                dir = dir.display(),
                secret = random_hex(32),
            ),
        )
        .expect("writing the garage config");
        let log = std::fs::File::create(dir.join("garage.log")).expect("creating garage.log");
        // Free the ports just before garage binds them.
        drop((s3, rpc));

        let (stop_tx, keeper) = keep_server(&bin, &config, log);

        let mut garage = Garage {
            endpoint: format!("http://127.0.0.1:{s3_port}"),
            region,
            access_key: String::new(),
            secret_key: String::new(),
            dir,
            bin,
            config,
            stop: Mutex::new(Some(stop_tx)),
            keeper: Mutex::new(Some(keeper)),
            next_bucket: AtomicU32::new(0),
        };
        garage.setup();
        garage
    }

    fn setup(&mut self) {
        // Ready when `garage status` answers over RPC.
        self.retry(&["status"]);
        let node_id = parse_node_id(&self.retry(&["node", "id", "-q"]));
        self.retry(&["layout", "assign", "-z", "dc1", "-c", "1G", &node_id]);
        self.retry(&["layout", "apply", "--version", "1"]);
        (self.access_key, self.secret_key) = parse_key(&self.retry(&["key", "create", "test-key"]));
        // The CSI controller makes a bucket per volume.
        self.retry(&["key", "allow", "--create-bucket", "test-key"]);
    }

    /// Runs `garage -c CONFIG ARGS`; returns the output whatever the exit status.
    pub fn cli(&self, args: &[&str]) -> Output {
        run_cli(&self.bin, &self.config, args)
    }

    /// Runs a CLI command until it succeeds, for up to a minute (the server may still be
    /// starting); panics with the outputs and the server log after that.
    fn retry(&self, args: &[&str]) -> Output {
        retry_cli(&self.bin, &self.config, &self.dir.join("garage.log"), args)
    }

    /// The last lines of the server's log.
    pub fn log_tail(&self) -> String {
        log_tail(&self.dir.join("garage.log"))
    }

    /// Creates bucket `name` and gives `test-key` read, write and owner rights on it.
    pub fn create_bucket(&self, name: &str) {
        self.retry(&["bucket", "create", name]);
        self.retry(&[
            "bucket", "allow", "--read", "--write", "--owner", name, "--key", "test-key",
        ]);
    }

    /// Creates a bucket no other test of this process uses, and returns its name.
    pub fn unique_bucket(&self) -> String {
        let n = self.next_bucket.fetch_add(1, Ordering::SeqCst);
        let name = format!("test-{}-{n}", std::process::id());
        self.create_bucket(&name);
        name
    }

    /// The test key as a csi-s3 style Secret (`accessKeyID`, `secretAccessKey`, `endpoint`,
    /// `region`).
    pub fn csi_secret(&self) -> std::collections::HashMap<String, String> {
        [
            ("accessKeyID", self.access_key.as_str()),
            ("secretAccessKey", self.secret_key.as_str()),
            ("endpoint", self.endpoint.as_str()),
            ("region", self.region.as_str()),
        ]
        .into_iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect()
    }

    /// Configuration for an `S3Store` on `bucket` with the test key.
    pub fn s3_config(&self, bucket: &str) -> S3Config {
        S3Config {
            endpoint: Some(self.endpoint.clone()),
            bucket: bucket.to_string(),
            region: self.region.clone(),
            path_style: true,
            access_key: Some(self.access_key.clone()),
            secret_key: Some(Secret(self.secret_key.clone())),
            session_token: None,
        }
    }
}

impl Garage {
    /// Kills the server and removes its directory. Idempotent.
    fn stop(&self) {
        // Dropping the sender wakes the keeper, which kills and reaps the server.
        drop(self.stop.lock().unwrap().take());
        if let Some(keeper) = self.keeper.lock().unwrap().take() {
            let _ = keeper.join();
        }
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

impl Drop for Garage {
    fn drop(&mut self) {
        self.stop();
    }
}

static SHARED: OnceLock<Garage> = OnceLock::new();

extern "C" fn stop_shared() {
    if let Some(garage) = SHARED.get() {
        garage.stop();
    }
}

/// One Garage per test process, started on first use and stopped (directory removed) when the
/// process exits.
pub fn shared() -> &'static Garage {
    SHARED.get_or_init(|| {
        let garage = Garage::start();
        // Statics are never dropped; libtest ends with exit(3), which runs atexit handlers.
        unsafe { libc::atexit(stop_shared) };
        garage
    })
}

/// Nodes of a [`GarageCluster`].
pub const CLUSTER_NODES: usize = 3;

/// One node of a [`GarageCluster`].
pub struct ClusterNode {
    /// `http://127.0.0.1:PORT`: this node's S3 API.
    pub endpoint: String,
    /// `127.0.0.1:PORT`: this node's RPC address.
    pub rpc_addr: String,
    /// The node id (hex), known once the node has started the first time.
    pub id: String,
    /// `config.toml`, `garage.log`, `meta/`, `data/`.
    pub dir: PathBuf,
    config: PathBuf,
    /// The running server's keeper (stop channel, thread); `None` while the node is down.
    server: Mutex<Option<(mpsc::Sender<()>, thread::JoinHandle<()>)>>,
}

impl ClusterNode {
    fn log(&self) -> PathBuf {
        self.dir.join("garage.log")
    }

    fn start_server(&self, bin: &Path) {
        let mut server = self.server.lock().unwrap();
        assert!(server.is_none(), "garage node {} is already running", self.rpc_addr);
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.log())
            .expect("opening garage.log");
        *server = Some(keep_server(bin, &self.config, log));
    }

    /// SIGKILLs the server and reaps it; false when it was not running.
    fn kill_server(&self) -> bool {
        let Some((stop, keeper)) = self.server.lock().unwrap().take() else {
            return false;
        };
        drop(stop);
        let _ = keeper.join();
        true
    }
}

/// The figures of `garage json-api GetClusterHealth` this module looks at.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Health {
    /// `healthy`, `degraded` or `unavailable`.
    pub status: String,
    pub connected_nodes: u64,
    pub storage_nodes_up: u64,
}

impl Health {
    fn parse(json: &str) -> Option<Health> {
        let number = |name: &str| -> Option<u64> {
            let rest = &json[json.find(&format!("\"{name}\""))? + name.len() + 2..];
            let rest = rest.trim_start().strip_prefix(':')?.trim_start();
            let end = rest.find(|c: char| !c.is_ascii_digit()).unwrap_or(rest.len());
            rest[..end].parse().ok()
        };
        let status = {
            let rest = &json[json.find("\"status\"")? + "\"status\"".len()..];
            let rest = rest.trim_start().strip_prefix(':')?.trim_start().strip_prefix('"')?;
            rest[..rest.find('"')?].to_string()
        };
        Some(Health {
            status,
            connected_nodes: number("connectedNodes")?,
            storage_nodes_up: number("storageNodesUp")?,
        })
    }

    /// Every node connected and up, every partition with all its replicas.
    pub fn all_up(&self) -> bool {
        self.status == "healthy"
            && self.connected_nodes == CLUSTER_NODES as u64
            && self.storage_nodes_up == CLUSTER_NODES as u64
    }
}

/// Three Garage nodes on loopback with `replication_factor = 3` (Garage's default consistency
/// mode: writes and reads need 2 of the 3 replicas), one zone, a layout with all three, and an
/// access key `test-key` allowed to create buckets.
///
/// Each node has its own directory, ports and config (the same `rpc_secret`); once the node ids
/// are known, every config gets `bootstrap_peers` with all three, so that a node started again
/// joins the others at once instead of after Garage's reconnection back-off (about 10 s).
/// [`GarageCluster::kill`] SIGKILLs one node, [`GarageCluster::restart`] starts it again on the
/// same config, ports and directories. Servers are children of keeper threads with
/// `PR_SET_PDEATHSIG`, as for [`Garage`]; dropping the cluster kills them and removes its
/// directory, and directories of earlier test processes that are gone are removed at start.
pub struct GarageCluster {
    pub region: String,
    pub access_key: String,
    pub secret_key: String,
    /// `n0/`, `n1/`, `n2/`.
    pub dir: PathBuf,
    pub nodes: Vec<ClusterNode>,
    bin: PathBuf,
    next_bucket: AtomicU32,
}

impl GarageCluster {
    /// Starts a fresh cluster and waits until every node sees all three up with every
    /// partition fully replicated. Panics (with a server log) when that takes over a minute.
    pub fn start() -> GarageCluster {
        let bin = garage_bin();
        let dir = fresh_dir("cluster");
        let secret = random_hex(32);
        let region = "garage".to_string();

        // Hold every port until the configs are written, so that no two nodes get the same.
        let ports: Vec<(TcpListener, TcpListener)> = (0..CLUSTER_NODES).map(|_| (free_port(), free_port())).collect();
        let mut nodes = Vec::new();
        for (i, (s3, rpc)) in ports.iter().enumerate() {
            let ndir = dir.join(format!("n{i}"));
            std::fs::create_dir_all(&ndir).expect("creating a garage node directory");
            let s3_port = s3.local_addr().unwrap().port();
            let rpc_port = rpc.local_addr().unwrap().port();
            nodes.push(ClusterNode {
                endpoint: format!("http://127.0.0.1:{s3_port}"),
                rpc_addr: format!("127.0.0.1:{rpc_port}"),
                id: String::new(),
                config: ndir.join("config.toml"),
                dir: ndir,
                server: Mutex::new(None),
            });
        }
        let write_configs = |nodes: &[ClusterNode], peers: &str| {
            for n in nodes {
                let s3_addr = n.endpoint.trim_start_matches("http://");
                std::fs::write(
                    &n.config,
                    format!(
                        r#"metadata_dir = "{dir}/meta"
data_dir = "{dir}/data"
db_engine = "sqlite"
replication_factor = 3
rpc_bind_addr = "{rpc}"
rpc_public_addr = "{rpc}"
rpc_secret = "{secret}"
bootstrap_peers = [{peers}]

[s3_api]
s3_region = "{region}"
api_bind_addr = "{s3_addr}"
root_domain = ".s3.garage.localhost"
"#,
                        dir = n.dir.display(),
                        rpc = n.rpc_addr,
                    ),
                )
                .expect("writing a garage config");
            }
        };
        write_configs(&nodes, "");
        // Free the ports just before garage binds them.
        drop(ports);
        let mut cluster = GarageCluster {
            region: region.clone(),
            access_key: String::new(),
            secret_key: String::new(),
            dir,
            nodes,
            bin,
            next_bucket: AtomicU32::new(0),
        };
        for n in &cluster.nodes {
            n.start_server(&cluster.bin);
        }
        for i in 0..CLUSTER_NODES {
            let id = parse_node_id(&cluster.retry(i, &["node", "id", "-q"]));
            cluster.nodes[i].id = id;
        }
        let peers: Vec<String> = cluster
            .nodes
            .iter()
            .map(|n| format!("\"{}@{}\"", n.id, n.rpc_addr))
            .collect();
        // Read at the next start of each node; the running ones are connected by hand.
        write_configs(&cluster.nodes, &peers.join(", "));
        for i in 1..CLUSTER_NODES {
            let peer = format!("{}@{}", cluster.nodes[i].id, cluster.nodes[i].rpc_addr);
            cluster.retry(0, &["node", "connect", &peer]);
        }
        for i in 0..CLUSTER_NODES {
            let id = cluster.nodes[i].id.clone();
            cluster.retry(0, &["layout", "assign", "-z", "dc1", "-c", "1G", &id]);
        }
        cluster.retry(0, &["layout", "apply", "--version", "1"]);
        for i in 0..CLUSTER_NODES {
            cluster.wait_all_up(i);
        }
        (cluster.access_key, cluster.secret_key) = parse_key(&cluster.retry(0, &["key", "create", "test-key"]));
        cluster.retry(0, &["key", "allow", "--create-bucket", "test-key"]);
        cluster
    }

    /// The S3 endpoint of node `i`.
    pub fn endpoint(&self, i: usize) -> &str {
        &self.nodes[i].endpoint
    }

    /// Runs `garage -c <node i's config> ARGS` (the CLI talks to node `i` over RPC); returns the
    /// output whatever the exit status.
    pub fn cli(&self, i: usize, args: &[&str]) -> Output {
        run_cli(&self.bin, &self.nodes[i].config, args)
    }

    /// [`GarageCluster::cli`] until it succeeds, for up to a minute.
    fn retry(&self, i: usize, args: &[&str]) -> Output {
        let n = &self.nodes[i];
        retry_cli(&self.bin, &n.config, &n.log(), args)
    }

    /// The last lines of node `i`'s log.
    pub fn log_tail(&self, i: usize) -> String {
        log_tail(&self.nodes[i].log())
    }

    /// The cluster as node `i` sees it; `None` when the node does not answer.
    pub fn health(&self, i: usize) -> Option<Health> {
        let out = self.cli(i, &["json-api", "GetClusterHealth"]);
        if !out.status.success() {
            return None;
        }
        Health::parse(&String::from_utf8_lossy(&out.stdout))
    }

    /// Waits until node `i` sees all three nodes up and its S3 port accepts connections.
    fn wait_all_up(&self, i: usize) {
        let deadline = Instant::now() + READY_TIMEOUT;
        let s3_addr = self.nodes[i].endpoint.trim_start_matches("http://").to_string();
        loop {
            let health = self.health(i);
            if health.as_ref().is_some_and(Health::all_up) && std::net::TcpStream::connect(&s3_addr).is_ok() {
                return;
            }
            if Instant::now() >= deadline {
                panic!(
                    "garage node {i} did not see the whole cluster up within {READY_TIMEOUT:?} \
                     (last health: {health:?})\nits log:\n{}",
                    self.log_tail(i)
                );
            }
            thread::sleep(Duration::from_millis(50));
        }
    }

    /// Whether node `i`'s server is running (started and not killed).
    pub fn is_running(&self, i: usize) -> bool {
        self.nodes[i].server.lock().unwrap().is_some()
    }

    /// SIGKILLs node `i` and waits until the process is gone (reaped). Panics when the node is
    /// not running.
    pub fn kill(&self, i: usize) {
        assert!(
            self.nodes[i].kill_server(),
            "kill of garage node {i}, which is not running"
        );
    }

    /// Starts node `i` again with the same config, ports and directories, and waits until
    /// every running node sees all three up (and node `i`'s S3 port accepts connections).
    ///
    /// The node rejoins through its `bootstrap_peers` at once, but a peer that already noticed
    /// its death counts it as down until its own next reconnection attempt, 30 s later in Garage
    /// 2.5, even though the restarted node's connection to it is up. An operator's `garage node
    /// connect` from each peer ends that wait; without it the whole cluster is healthy only
    /// after those 30 s.
    pub fn restart(&self, i: usize) {
        self.nodes[i].start_server(&self.bin);
        self.wait_all_up(i);
        let me = format!("{}@{}", self.nodes[i].id, self.nodes[i].rpc_addr);
        for j in (0..CLUSTER_NODES).filter(|&j| j != i && self.is_running(j)) {
            self.retry(j, &["node", "connect", &me]);
        }
        for j in (0..CLUSTER_NODES).filter(|&j| self.is_running(j)) {
            self.wait_all_up(j);
        }
    }

    /// Creates bucket `name` and gives `test-key` read, write and owner rights on it.
    pub fn create_bucket(&self, name: &str) {
        let i = (0..CLUSTER_NODES)
            .find(|&i| self.is_running(i))
            .expect("no garage node running");
        self.retry(i, &["bucket", "create", name]);
        self.retry(
            i,
            &[
                "bucket", "allow", "--read", "--write", "--owner", name, "--key", "test-key",
            ],
        );
    }

    /// Creates a bucket no other test of this process uses, and returns its name.
    pub fn unique_bucket(&self) -> String {
        let n = self.next_bucket.fetch_add(1, Ordering::SeqCst);
        let name = format!("cluster-{}-{n}", std::process::id());
        self.create_bucket(&name);
        name
    }

    /// Configuration for an `S3Store` on `bucket` through node `i`'s S3 API, with the test key.
    pub fn s3_config(&self, i: usize, bucket: &str) -> S3Config {
        S3Config {
            endpoint: Some(self.nodes[i].endpoint.clone()),
            bucket: bucket.to_string(),
            region: self.region.clone(),
            path_style: true,
            access_key: Some(self.access_key.clone()),
            secret_key: Some(Secret(self.secret_key.clone())),
            session_token: None,
        }
    }
}

impl Drop for GarageCluster {
    fn drop(&mut self) {
        for n in &self.nodes {
            n.kill_server();
        }
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}
