//! A real single-node Garage S3 server for tests.
//!
//! `Garage::start()` runs one in a temporary directory on free loopback ports, with a layout,
//! an access key and bucket permissions; `shared()` starts one per test process and reuses it,
//! with `unique_bucket()` giving each test a bucket of its own.
//!
//! The server is a child of a dedicated thread that lives as long as the `Garage` does, and it
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

impl Garage {
    /// Starts a fresh single-node Garage with a layout and an access key `test-key`.
    /// Panics (with the server's log) when it does not come up within a minute.
    pub fn start() -> Garage {
        static STARTED: AtomicU32 = AtomicU32::new(0);
        let bin = garage_bin();
        let base = std::env::temp_dir();
        remove_stale_dirs(&base);
        let dir = base.join(format!(
            "{DIR_PREFIX}{}-{}",
            std::process::id(),
            STARTED.fetch_add(1, Ordering::SeqCst)
        ));
        let _ = std::fs::remove_dir_all(&dir);
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

        // The keeper thread owns the child: PR_SET_PDEATHSIG fires when the thread that forked
        // ends, so it must outlive the server (test threads come and go).
        let (stop_tx, stop_rx) = mpsc::channel::<()>();
        let (started_tx, started_rx) = mpsc::channel::<std::io::Result<()>>();
        let (bin2, config2) = (bin.clone(), config.clone());
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
                // Until stopped (or the Garage is dropped and the sender with it).
                let _ = stop_rx.recv();
                let _ = child.kill();
                let _ = child.wait();
            })
            .expect("spawning the garage keeper thread");
        if let Err(e) = started_rx.recv().expect("garage keeper thread died") {
            panic!("starting {}: {e}", bin.display());
        }

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
        let node = self.retry(&["node", "id", "-q"]);
        let node = String::from_utf8_lossy(&node.stdout);
        let node_id = node
            .trim()
            .split('@')
            .next()
            .filter(|id| !id.is_empty())
            .unwrap_or_else(|| panic!("unexpected `garage node id` output: {node:?}"))
            .to_string();
        self.retry(&["layout", "assign", "-z", "dc1", "-c", "1G", &node_id]);
        self.retry(&["layout", "apply", "--version", "1"]);
        let key = self.retry(&["key", "create", "test-key"]);
        let key = String::from_utf8_lossy(&key.stdout);
        let field = |name: &str| {
            key.lines()
                .find_map(|l| l.trim().strip_prefix(name))
                .map(|v| v.trim().to_string())
                .unwrap_or_else(|| panic!("no {name:?} in `garage key create` output:\n{key}"))
        };
        self.access_key = field("Key ID:");
        self.secret_key = field("Secret key:");
        // The CSI controller makes a bucket per volume.
        self.retry(&["key", "allow", "--create-bucket", "test-key"]);
    }

    /// Runs `garage -c CONFIG ARGS`; returns the output whatever the exit status.
    pub fn cli(&self, args: &[&str]) -> Output {
        Command::new(&self.bin)
            .arg("-c")
            .arg(&self.config)
            .args(args)
            .env("RUST_LOG", "warn")
            .stdin(Stdio::null())
            .output()
            .unwrap_or_else(|e| panic!("running {}: {e}", self.bin.display()))
    }

    /// Runs a CLI command until it succeeds, for up to a minute (the server may still be
    /// starting); panics with the outputs and the server log after that.
    fn retry(&self, args: &[&str]) -> Output {
        let deadline = Instant::now() + READY_TIMEOUT;
        let mut pause = Duration::from_millis(50);
        loop {
            let out = self.cli(args);
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
                    self.dir.join("garage.log").display(),
                    self.log_tail(),
                );
            }
            thread::sleep(pause);
            pause = (pause * 2).min(Duration::from_millis(500));
        }
    }

    /// The last lines of the server's log.
    pub fn log_tail(&self) -> String {
        let log = std::fs::read_to_string(self.dir.join("garage.log")).unwrap_or_default();
        let lines: Vec<&str> = log.lines().collect();
        lines[lines.len().saturating_sub(40)..].join("\n")
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
