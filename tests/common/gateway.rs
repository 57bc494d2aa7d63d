//! Gateways for tests: in-process (`Gateway::start` on any store) or the `s3nfs` binary as
//! a subprocess (killable with SIGKILL, restartable on the same port and state directory), plus
//! S3-side helpers that look at the bucket directly.

use std::io::BufRead;
use std::net::{SocketAddr, TcpListener};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::{mpsc, Arc};
use std::time::{Duration, Instant};

use s3nfs::actors::Gateway;
use s3nfs::config::{Backend, Export};
use s3nfs::fs::Volume;
use s3nfs::store::faulty::{Faults, FaultyStore};
use s3nfs::store::local::LocalStore;
use s3nfs::store::s3::S3Store;
use s3nfs::store::{Body, ObjectMeta, ObjectStore, UserMeta};

use super::garage;

/// Polls `f` until it returns `Some`, for at most `timeout`; panics with `what` after that.
pub async fn wait_for<T, F, Fut>(timeout: Duration, what: &str, mut f: F) -> T
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Option<T>>,
{
    let deadline = Instant::now() + timeout;
    loop {
        if let Some(v) = f().await {
            return v;
        }
        if Instant::now() >= deadline {
            panic!("timed out after {timeout:?} waiting for {what}");
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

#[derive(Clone, Debug)]
pub struct Opts {
    pub prefix: String,
    pub flush_delay: Duration,
    pub refresh: Duration,
    pub durability: s3nfs::fs::durable::Durability,
    pub squash: s3nfs::config::Squash,
    /// The volume's clock: the system's unless a test drives time itself.
    pub clock: s3nfs::clock::Clock,
}

impl Default for Opts {
    fn default() -> Self {
        Opts {
            prefix: String::new(),
            flush_delay: Duration::from_millis(200),
            refresh: Duration::from_millis(200),
            durability: Default::default(),
            squash: Default::default(),
            clock: Default::default(),
        }
    }
}

/// A gateway running inside the test process.
pub struct InProc {
    pub addr: SocketAddr,
    pub vol: Arc<Volume>,
    pub state: tempfile::TempDir,
    pub export: Export,
    actor: Option<Gateway>,
}

impl InProc {
    pub async fn start(store: Arc<dyn ObjectStore>, opts: Opts) -> InProc {
        let state = tempfile::tempdir().unwrap();
        let export = Export {
            name: "test".into(),
            listen: "127.0.0.1:0".parse().unwrap(),
            backend: Backend::Local {
                dir: state.path().join("unused"),
            },
            prefix: s3nfs::config::normalize_prefix(&opts.prefix),
            state_dir: state.path().join("state"),
            flush_delay: opts.flush_delay,
            refresh: opts.refresh,
            busy_defer: s3nfs::fs::defer::MAX_DEFER,
            capacity: None,
            defaults: Default::default(),
            durability: opts.durability,
            squash: opts.squash,
        };
        let actor = Gateway::start_with_clock(&export, store, opts.clock.clone())
            .await
            .expect("starting the volume");
        InProc {
            addr: actor.addr,
            vol: actor.vol.clone(),
            state,
            export,
            actor: Some(actor),
        }
    }

    /// Stops serving (aborts the listener and background tasks).
    pub fn stop(&mut self) {
        self.actor.take();
    }

    /// The clean stop: no more requests, those in flight answered, everything uploaded, the
    /// volume closed.
    pub async fn close(&mut self) {
        let gw = self.actor.take().expect("gateway already stopped");
        if let Err((_, e)) = gw.close().await {
            panic!("close failed: {e}");
        }
    }
}

/// An S3Store on a fresh Garage bucket: (store, bucket).
pub async fn garage_store() -> (Arc<S3Store>, String) {
    let g = garage::shared();
    let bucket = g.unique_bucket();
    let s3 = S3Store::connect(g.s3_config(&bucket)).await.unwrap();
    (Arc::new(s3), bucket)
}

/// A gateway on a fresh Garage bucket, with an S3 view of the bucket.
pub async fn on_garage(opts: Opts) -> (InProc, S3Side) {
    let (s3, bucket) = garage_store().await;
    let gw = InProc::start(s3.clone(), opts).await;
    (gw, S3Side { store: s3, bucket })
}

/// A gateway on a fresh Garage bucket behind a FaultyStore.
pub async fn on_faulty_garage(opts: Opts) -> (InProc, S3Side, Faults) {
    let (s3, bucket) = garage_store().await;
    let (faulty, faults) = FaultyStore::new(s3.clone());
    let gw = InProc::start(Arc::new(faulty), opts).await;
    (gw, S3Side { store: s3, bucket }, faults)
}

/// A gateway on the embedded store in a temporary directory: (gateway, store dir).
pub async fn on_local(opts: Opts) -> (InProc, tempfile::TempDir) {
    let dir = tempfile::tempdir().unwrap();
    let store = LocalStore::open(dir.path()).unwrap();
    (InProc::start(Arc::new(store), opts).await, dir)
}

/// Direct access to the bucket, bypassing the gateway.
pub struct S3Side {
    pub store: Arc<S3Store>,
    pub bucket: String,
}

impl S3Side {
    pub async fn for_bucket(bucket: &str) -> S3Side {
        let g = garage::shared();
        S3Side {
            store: Arc::new(S3Store::connect(g.s3_config(bucket)).await.unwrap()),
            bucket: bucket.to_string(),
        }
    }

    /// The object's bytes, `None` when it does not exist.
    pub async fn get(&self, key: &str) -> Option<Vec<u8>> {
        let head = self.store.head(key).await.expect("HEAD")?;
        if head.size == 0 {
            return Some(Vec::new());
        }
        match self.store.get_range(key, 0..head.size).await {
            Ok(b) => Some(b.to_vec()),
            Err(s3nfs::store::StoreError::NotFound(_)) => None,
            Err(e) => panic!("GET {key}: {e}"),
        }
    }

    pub async fn head(&self, key: &str) -> Option<ObjectMeta> {
        self.store.head(key).await.expect("HEAD")
    }

    /// Every key under `prefix` (no delimiter), sorted.
    pub async fn keys(&self, prefix: &str) -> Vec<String> {
        let mut out = Vec::new();
        let mut token = None;
        loop {
            let page = self.store.list(prefix, None, token, 1000).await.expect("LIST");
            out.extend(page.objects.into_iter().map(|o| o.key));
            token = page.next;
            if token.is_none() {
                break;
            }
        }
        out.sort();
        out
    }

    pub async fn put(&self, key: &str, data: &[u8]) {
        self.store
            .put(key, Body::Bytes(bytes::Bytes::copy_from_slice(data)), &UserMeta::new())
            .await
            .expect("PUT");
    }

    pub async fn delete(&self, key: &str) {
        self.store.delete(key).await.expect("DELETE");
    }
}

/// A free loopback port (bound and released).
pub fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port()
}

/// The `s3nfs` binary serving one Garage bucket, as a child process.
pub struct Proc {
    pub port: u16,
    pub bucket: String,
    pub prefix: String,
    pub dir: tempfile::TempDir,
    pub flush_delay: String,
    /// More `s3nfs serve` arguments.
    pub args: Vec<String>,
    child: Option<Child>,
}

/// The `s3nfs` binary, or, when S3NFS_GATEWAY_WRAPPER is set, that command with the binary
/// as its last argument: a profiler for benches (e.g. "heaptrack -o /tmp/ht" or
/// "strace -f -c -o /tmp/st"). The pid and peak RSS then are the wrapper's.
pub fn s3nfs_command() -> Command {
    match std::env::var("S3NFS_GATEWAY_WRAPPER") {
        Ok(w) if !w.trim().is_empty() => {
            let mut words = w.split_whitespace();
            let mut c = Command::new(words.next().unwrap());
            c.args(words).arg(env!("CARGO_BIN_EXE_s3nfs"));
            c
        }
        _ => Command::new(env!("CARGO_BIN_EXE_s3nfs")),
    }
}

impl Proc {
    pub fn addr(&self) -> SocketAddr {
        SocketAddr::from(([127, 0, 0, 1], self.port))
    }

    /// The gateway process's id, while it runs.
    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(|c| c.id())
    }

    pub fn state_dir(&self) -> PathBuf {
        self.dir.path().join("state")
    }

    /// Starts the binary on a fresh port and state directory.
    pub fn start(bucket: &str, prefix: &str, flush_delay: &str) -> Proc {
        Self::start_with(bucket, prefix, flush_delay, &[])
    }

    /// [`Proc::start`] with more `s3nfs serve` arguments.
    pub fn start_with(bucket: &str, prefix: &str, flush_delay: &str, args: &[&str]) -> Proc {
        let mut p = Proc {
            port: free_port(),
            bucket: bucket.into(),
            prefix: prefix.into(),
            dir: tempfile::tempdir().unwrap(),
            flush_delay: flush_delay.into(),
            args: args.iter().map(|a| a.to_string()).collect(),
            child: None,
        };
        p.spawn();
        p
    }

    /// The command line, with the test key in the environment.
    pub fn command(bucket: &str, port: u16, dir: &Path, secret: Option<&str>) -> Command {
        let g = garage::shared();
        let mut cmd = s3nfs_command();
        cmd.arg("serve")
            .arg("--listen")
            .arg(format!("127.0.0.1:{port}"))
            .arg("--endpoint")
            .arg(&g.endpoint)
            .arg("--bucket")
            .arg(bucket)
            .arg("--region")
            .arg(&g.region)
            .arg("--data-dir")
            .arg(dir.join("data"))
            .arg("--state-dir")
            .arg(dir.join("state"))
            .env("AWS_ACCESS_KEY_ID", &g.access_key)
            .env("AWS_SECRET_ACCESS_KEY", secret.unwrap_or(&g.secret_key))
            .env_remove("AWS_SESSION_TOKEN")
            .env("RUST_LOG", "s3nfs=info")
            .stdin(Stdio::null());
        cmd
    }

    fn spawn(&mut self) {
        let mut cmd = Self::command(&self.bucket, self.port, self.dir.path(), None);
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.dir.path().join("stderr.log"))
            .unwrap();
        cmd.arg("--prefix")
            .arg(&self.prefix)
            .arg("--flush-delay")
            .arg(&self.flush_delay)
            .arg("--refresh")
            .arg("1s")
            .args(&self.args)
            .stdout(Stdio::piped())
            .stderr(log);
        let mut child = cmd.spawn().expect("spawning s3nfs");
        let stdout = child.stdout.take().unwrap();
        let (tx, rx) = mpsc::channel();
        std::thread::spawn(move || {
            for line in std::io::BufReader::new(stdout).lines() {
                let Ok(line) = line else { break };
                if line.trim_start().starts_with("mount ") {
                    let _ = tx.send(());
                }
            }
        });
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            match rx.recv_timeout(Duration::from_millis(50)) {
                Ok(()) => break,
                Err(mpsc::RecvTimeoutError::Timeout) => {}
                Err(mpsc::RecvTimeoutError::Disconnected) => {
                    let st = child.wait().unwrap();
                    panic!("s3nfs exited ({st}) before serving:\n{}", self.log());
                }
            }
            if let Ok(Some(st)) = child.try_wait() {
                panic!("s3nfs exited ({st}) before serving:\n{}", self.log());
            }
            if Instant::now() >= deadline {
                let _ = child.kill();
                panic!("s3nfs did not come up within a minute:\n{}", self.log());
            }
        }
        self.child = Some(child);
    }

    /// The gateway's stderr so far.
    pub fn log(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("stderr.log")).unwrap_or_default()
    }

    fn signal(&mut self, sig: i32) -> ExitStatus {
        let mut child = self.child.take().expect("gateway not running");
        unsafe {
            libc::kill(child.id() as i32, sig);
        }
        let deadline = Instant::now() + Duration::from_secs(120);
        loop {
            if let Some(st) = child.try_wait().unwrap() {
                return st;
            }
            if Instant::now() >= deadline {
                let _ = child.kill();
                panic!("s3nfs did not exit after signal {sig}:\n{}", self.log());
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// SIGKILL: no flush, no clean-up.
    pub fn kill9(&mut self) {
        self.signal(libc::SIGKILL);
    }

    /// SIGTERM: uploads what is pending, then exits; returns the exit status.
    pub fn term(&mut self) -> ExitStatus {
        self.signal(libc::SIGTERM)
    }

    /// Starts again on the same port and state directory.
    pub fn restart(&mut self) {
        assert!(self.child.is_none(), "restart of a running gateway");
        self.spawn();
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}
