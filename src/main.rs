//! `s3nfs`: the command line.

use std::net::SocketAddr;
use std::path::PathBuf;

use actix::Actor;
use clap::{Parser, Subcommand};

use s3nfs::actors::{self, StartVolume, StopAll, Supervisor};
use s3nfs::config::{self, Backend, Export};
use s3nfs::store::s3::{S3Config, Secret};

#[derive(Parser)]
#[command(
    name = "s3nfs",
    version,
    about = "S3 buckets as NFSv3 shares, mounted by the kernel's own NFS client"
)]
struct Cli {
    #[command(subcommand)]
    cmd: Cmd,
    /// Log lines on stderr: `text` (coloured only on a terminal) or `json` (one object per
    /// line, for log shippers).
    #[arg(long, global = true, env = "S3NFS_LOG_FORMAT", default_value = "text")]
    log_format: s3nfs::telemetry::LogFormat,
}

#[derive(Subcommand)]
enum Cmd {
    /// Serve one export (from flags) or several (from --config) over NFSv3.
    Serve(ServeArgs),
    /// List the objects of a volume as S3 holds them: size, key, and with --long the
    /// attributes in their x-amz-meta-* keys. Reads the bucket, not the gateway.
    Ls {
        #[command(flatten)]
        store: StoreArgs,
        /// Also HEAD each object for its mode, uid, gid and mtime.
        #[arg(long)]
        long: bool,
    },
    /// Write one object's bytes to stdout (the key is relative to --prefix).
    Cat {
        #[command(flatten)]
        store: StoreArgs,
        key: String,
    },
    /// Uploads a local file as one object (a single PUT) under the volume's prefix.
    Put {
        #[command(flatten)]
        store: StoreArgs,
        key: String,
        file: PathBuf,
    },
    /// What each volume of the running gateway or node plugin holds that is not yet in S3, its
    /// uploads, last S3 error, use and (ReadWriteMany) owner.
    Status {
        /// Machine-readable output.
        #[arg(long)]
        json: bool,
        /// The admin socket of the process to ask (default: as `serve` and `csi` choose it).
        #[arg(long, env = "S3NFS_ADMIN_SOCKET")]
        admin_socket: Option<PathBuf>,
    },
    /// Uploads everything pending now (of VOLUME, or of every volume), showing what is left;
    /// fails if S3 refuses.
    Flush {
        volume: Option<String>,
        /// One JSON event per line.
        #[arg(long)]
        json: bool,
        #[arg(long, env = "S3NFS_ADMIN_SOCKET")]
        admin_socket: Option<PathBuf>,
    },
    /// The Kubernetes CSI plugin: Identity, Controller and/or Node services on a Unix socket.
    /// In node mode it hosts the gateways of the volumes staged on this node.
    Csi(CsiArgs),
}

#[derive(Parser)]
struct CsiArgs {
    #[arg(long, value_enum, default_value = "all")]
    mode: s3nfs::csi::Mode,
    /// Where to serve gRPC: unix:///path/csi.sock.
    #[arg(long, env = "CSI_ENDPOINT", default_value = "unix:///csi/csi.sock")]
    endpoint: String,
    /// This node's name (node mode), e.g. from the downward API's spec.nodeName.
    #[arg(long, env = "NODE_ID", default_value = "")]
    node_id: String,
    /// The node plugin's records of staged volumes and their gateways' local state. Must
    /// outlive the plugin (a hostPath): a restarted plugin restores every gateway from it.
    #[arg(long, default_value = "/var/lib/kubelet/plugins/csi.s3nfs.io/state")]
    state_dir: PathBuf,
    /// Ports for the gateways on 127.0.0.1, FIRST-LAST.
    #[arg(long, default_value = "20500-20999", value_parser = parse_ports)]
    ports: std::ops::Range<u16>,
    /// ReadWriteMany volumes: where their Leases are kept. `in-cluster` (the pod's service
    /// account), or the API server's URL. Without it, MULTI_NODE writer modes are refused.
    #[arg(long, env = "S3NFS_LEASE_API")]
    lease_api: Option<String>,
    /// The namespace of the Leases (default: the pod's own).
    #[arg(long, env = "POD_NAMESPACE")]
    lease_namespace: Option<String>,
    /// How long a Lease lasts without renewal: a dead owner is replaced after this. The owner
    /// stops serving after two thirds of it.
    #[arg(long, default_value = "15s", value_parser = config::parse_duration)]
    lease_duration: std::time::Duration,
    /// This node's address, where its owner gateways take other nodes' connections (e.g. the
    /// downward API's status.hostIP).
    #[arg(long, env = "NODE_IP")]
    node_address: Option<std::net::IpAddr>,
    /// The driver's key pair for traffic between nodes (mutual TLS; PEM files).
    #[arg(long, env = "S3NFS_PEER_CERT")]
    peer_cert: Option<PathBuf>,
    #[arg(long, env = "S3NFS_PEER_KEY")]
    peer_key: Option<PathBuf>,
    /// Serve Prometheus metrics at http://ADDR/metrics (e.g. 0.0.0.0:9464). Off unless given.
    #[arg(long, env = "S3NFS_METRICS_LISTEN")]
    metrics_listen: Option<SocketAddr>,
    /// The admin socket `s3nfs status` and `s3nfs flush` talk to (node mode; default
    /// /run/s3nfs/admin.sock for root).
    #[arg(long, env = "S3NFS_ADMIN_SOCKET")]
    admin_socket: Option<PathBuf>,
}

/// The ReadWriteMany part of a node plugin, when `--lease-api` is given.
fn cluster_of(a: &CsiArgs) -> anyhow::Result<Option<s3nfs::csi::shared::Cluster>> {
    let Some(api) = &a.lease_api else { return Ok(None) };
    let leases: std::sync::Arc<dyn s3nfs::cluster::lease::LeaseApi> = if api == "in-cluster" {
        std::sync::Arc::new(s3nfs::cluster::kube::KubeLeases::in_cluster(a.lease_namespace.clone())?)
    } else {
        let ns = a.lease_namespace.clone().unwrap_or_else(|| "default".into());
        std::sync::Arc::new(s3nfs::cluster::kube::KubeLeases::new(api, &ns, None, None)?)
    };
    let address = a
        .node_address
        .ok_or_else(|| anyhow::anyhow!("--lease-api needs --node-address (or NODE_IP)"))?;
    let (Some(cert), Some(key)) = (&a.peer_cert, &a.peer_key) else {
        anyhow::bail!("--lease-api needs --peer-cert and --peer-key: traffic between nodes is authenticated");
    };
    let tls = s3nfs::cluster::tls::PeerTls::from_files(cert, key)?;
    let d = a.lease_duration;
    let timing = s3nfs::cluster::elect::Timing {
        duration: d,
        renew_deadline: d * 2 / 3,
        retry: d / 7,
    };
    timing.check().map_err(anyhow::Error::msg)?;
    Ok(Some(s3nfs::csi::shared::Cluster {
        leases,
        tls,
        address,
        timing,
    }))
}

fn parse_ports(s: &str) -> Result<std::ops::Range<u16>, String> {
    let (a, b) = s.split_once('-').ok_or("expected FIRST-LAST")?;
    let (a, b): (u16, u16) = (
        a.parse().map_err(|_| format!("{a:?} is not a port"))?,
        b.parse().map_err(|_| format!("{b:?} is not a port"))?,
    );
    if a == 0 || b < a || b == u16::MAX {
        return Err(format!("{s:?} is not a range of ports"));
    }
    Ok(a..b + 1)
}

#[derive(Parser)]
// A flag given twice takes its last value (a wrapper script sets defaults, the user overrides).
#[command(args_override_self = true)]
struct ServeArgs {
    /// Address to listen on. Loopback by default: exposing the share is a deliberate choice.
    #[arg(long, default_value = "127.0.0.1:20490")]
    listen: SocketAddr,
    #[command(flatten)]
    store: StoreArgs,
    /// Local state: metadata database, journal, staged files (default: DATA_DIR/state).
    #[arg(long)]
    state_dir: Option<PathBuf>,
    /// Upload a modified file once it has been idle this long.
    #[arg(long, default_value = "2s", value_parser = config::parse_duration)]
    flush_delay: std::time::Duration,
    /// See changes made in the bucket by other tools within this interval.
    #[arg(long, default_value = "5s", value_parser = config::parse_duration)]
    refresh: std::time::Duration,
    /// How long uploads that are due may wait for busy clients to pause (0s: never wait).
    #[arg(long, default_value = "10s", value_parser = config::parse_duration)]
    busy_defer: std::time::Duration,
    /// Serve Prometheus metrics at http://ADDR/metrics (e.g. 127.0.0.1:9464). Off unless given.
    #[arg(long, env = "S3NFS_METRICS_LISTEN")]
    metrics_listen: Option<SocketAddr>,
    /// The admin socket `s3nfs status` and `s3nfs flush` talk to (default
    /// /run/s3nfs/admin.sock for root, else under $XDG_RUNTIME_DIR).
    #[arg(long, env = "S3NFS_ADMIN_SOCKET")]
    admin_socket: Option<PathBuf>,
    /// Several exports from a TOML file (see README); the flags above give credentials and defaults.
    #[arg(long)]
    config: Option<PathBuf>,
    /// Size of the share as `df` shows it; writes past it get ENOSPC (e.g. 100G, 1Ti).
    #[arg(long, value_parser = config::parse_size)]
    capacity: Option<u64>,
    /// What an fsync or close on a client waits for: `local` (the gateway's disk: survives a
    /// crash of the gateway or a reboot) or `s3` (the file's bytes are in S3).
    #[arg(long, default_value = "local")]
    durability: s3nfs::fs::durable::Durability,
    /// Whose identity the gateway trusts, as exportfs: `none` (every uid as sent, root too),
    /// `root` (uid 0 acts as the anonymous user) or `all` (everyone does).
    #[arg(long, default_value = "none")]
    squash: config::SquashMode,
    /// The anonymous user and group (for --squash and for calls without AUTH_UNIX).
    #[arg(long, default_value_t = 65534)]
    anon_uid: u32,
    #[arg(long, default_value_t = 65534)]
    anon_gid: u32,
}

/// Which object store, and where in it.
#[derive(clap::Args)]
struct StoreArgs {
    /// S3 endpoint (e.g. http://127.0.0.1:9000). Without it, the embedded store in --data-dir.
    #[arg(long)]
    endpoint: Option<String>,
    /// Bucket (required with --endpoint).
    #[arg(long)]
    bucket: Option<String>,
    /// Key prefix inside the bucket that the export shows as its root.
    #[arg(long, default_value = "")]
    prefix: String,
    #[arg(long, env = "AWS_REGION", default_value = "us-east-1")]
    region: String,
    /// Virtual-hosted-style addressing instead of path-style (AWS wants it; MinIO and Garage not).
    #[arg(long)]
    virtual_hosted: bool,
    /// Access key (default: AWS_ACCESS_KEY_ID).
    #[arg(long, env = "AWS_ACCESS_KEY_ID", hide_env_values = true)]
    access_key: Option<String>,
    /// Secret key (default: AWS_SECRET_ACCESS_KEY). Prefer the environment: flags show in `ps`.
    #[arg(long, env = "AWS_SECRET_ACCESS_KEY", hide_env_values = true)]
    secret_key: Option<String>,
    /// Where the embedded store keeps objects, and local state by default.
    #[arg(long, default_value = "s3nfs-data")]
    data_dir: PathBuf,
}

impl StoreArgs {
    fn creds(&self) -> S3Config {
        S3Config {
            endpoint: None,
            bucket: String::new(),
            region: self.region.clone(),
            path_style: !self.virtual_hosted,
            access_key: self.access_key.clone(),
            secret_key: self.secret_key.clone().map(Secret),
            session_token: std::env::var("AWS_SESSION_TOKEN").ok().map(Secret),
        }
    }

    fn backend(&self) -> anyhow::Result<Backend> {
        Ok(match (&self.endpoint, &self.bucket) {
            (None, None) => Backend::Local {
                dir: self.data_dir.join("objects"),
            },
            (_, Some(bucket)) => Backend::S3(S3Config {
                endpoint: self.endpoint.clone(),
                bucket: bucket.clone(),
                ..self.creds()
            }),
            (Some(_), None) => anyhow::bail!("--endpoint needs --bucket"),
        })
    }

    /// A one-export description of these flags, for the object commands.
    fn export(&self) -> anyhow::Result<Export> {
        Ok(Export {
            name: "default".into(),
            listen: "127.0.0.1:0".parse().unwrap(),
            backend: self.backend()?,
            prefix: config::normalize_prefix(&self.prefix),
            state_dir: PathBuf::new(),
            flush_delay: Default::default(),
            refresh: Default::default(),
            busy_defer: Default::default(),
            capacity: None,
            defaults: Default::default(),
            durability: Default::default(),
            squash: Default::default(),
        })
    }
}

async fn ls(a: StoreArgs, long: bool) -> anyhow::Result<()> {
    let e = a.export()?;
    let store = actors::open_store(&e, true).await?;
    let mut token = None;
    loop {
        let page = store.list(&e.prefix, None, token, 1000).await?;
        for o in page.objects {
            let rel = &o.key[e.prefix.len()..];
            if long {
                let user = store.head(&o.key).await?.map(|h| h.user).unwrap_or_default();
                let attrs: Vec<String> = user.iter().map(|(k, v)| format!("{k}={v}")).collect();
                println!("{}\t{rel}\t{}", o.size, attrs.join(","));
            } else {
                println!("{}\t{rel}", o.size);
            }
        }
        token = page.next;
        if token.is_none() {
            return Ok(());
        }
    }
}

async fn put(a: StoreArgs, key: String, file: PathBuf) -> anyhow::Result<()> {
    let e = a.export()?;
    let store = actors::open_store(&e, true).await?;
    let len = std::fs::metadata(&file)
        .map_err(|err| anyhow::anyhow!("{}: {err}", file.display()))?
        .len();
    let key = format!("{}{key}", e.prefix);
    let body = s3nfs::store::Body::File {
        path: file,
        offset: 0,
        len,
    };
    store.put(&key, body, &Default::default()).await?;
    Ok(())
}

async fn cat(a: StoreArgs, key: String) -> anyhow::Result<()> {
    use tokio::io::AsyncWriteExt;
    let e = a.export()?;
    let store = actors::open_store(&e, true).await?;
    let key = format!("{}{key}", e.prefix);
    let head = store
        .head(&key)
        .await?
        .ok_or_else(|| anyhow::anyhow!("no object {key:?}"))?;
    let size = head.size;
    let mut out = tokio::io::stdout();
    let mut off = 0;
    while off < size {
        // Every chunk of the version the HEAD saw: a replaced object is an error, not a mix.
        let chunk = store
            .get_version_range(&key, &head.etag, off..(off + (8 << 20)).min(size))
            .await
            .map_err(|e| anyhow::anyhow!("{key:?} changed while being read ({e})"))?;
        if chunk.is_empty() {
            anyhow::bail!("{key:?} shrank while being read");
        }
        off += chunk.len() as u64;
        out.write_all(&chunk).await?;
    }
    out.flush().await?;
    Ok(())
}

fn exports(a: &ServeArgs) -> anyhow::Result<Vec<Export>> {
    let state = a.state_dir.clone().unwrap_or_else(|| a.store.data_dir.join("state"));
    if let Some(path) = &a.config {
        return config::load(path, &state, &a.store.creds());
    }
    Ok(vec![Export {
        listen: a.listen,
        state_dir: state.join("default"),
        flush_delay: a.flush_delay,
        refresh: a.refresh,
        busy_defer: a.busy_defer,
        capacity: a.capacity,
        durability: a.durability,
        squash: config::Squash {
            mode: a.squash,
            anon_uid: a.anon_uid,
            anon_gid: a.anon_gid,
        },
        ..a.store.export()?
    }])
}

async fn serve(a: ServeArgs) -> anyhow::Result<()> {
    // Handlers first: a SIGTERM that arrives while exports start (say, just after the mount
    // command is printed) must flush and exit, not kill the process with work pending.
    use tokio::signal::unix::{signal, SignalKind};
    let mut term = signal(SignalKind::terminate())?;
    let mut int = signal(SignalKind::interrupt())?;
    let exports = exports(&a)?;
    // Served for as long as this function runs: until the process exits.
    let _metrics = match a.metrics_listen {
        Some(l) => {
            let (addr, server) = s3nfs::metrics::serve(l)
                .await
                .map_err(|e| anyhow::anyhow!("cannot serve metrics on {l}: {e}"))?;
            println!("s3nfs: metrics on http://{addr}/metrics");
            Some(server)
        }
        None => None,
    };
    let sup = Supervisor::default().start();
    let mut started = Vec::new();
    for e in &exports {
        if !e.listen.ip().is_loopback() {
            tracing::warn!(listen = %e.listen, "listening beyond loopback: anyone who can reach this address can mount the share");
        }
        let addr = sup
            .send(StartVolume {
                export: e.clone(),
                check: true,
                term: None,
                store: None,
            })
            .await??;
        started.push((e, addr));
    }
    // Once the exports serve (a start that fails has nothing to report on), and before the
    // mount commands are printed: whoever waits for them finds everything ready.
    let admin_socket = a.admin_socket.clone().unwrap_or_else(s3nfs::admin::default_socket);
    let _admin = s3nfs::admin::server::serve(&admin_socket, s3nfs::admin::source::Source::new(sup.clone())).await?;
    for (e, addr) in started {
        let what = match &e.backend {
            Backend::Local { dir } => format!("embedded store in {}", dir.display()),
            Backend::S3(c) => format!(
                "s3://{}/{} at {}",
                c.bucket,
                e.prefix,
                c.endpoint.as_deref().unwrap_or("AWS")
            ),
        };
        println!("s3nfs: export {:?} ({what}) on {addr}", e.name);
        println!(
            "  mount -t nfs -o vers=3,proto=tcp,port={p},mountport={p},nolock,hard {ip}:/ /mnt/{n}",
            p = addr.port(),
            ip = addr.ip(),
            n = e.name
        );
    }
    tokio::select! {
        _ = int.recv() => {}
        _ = term.recv() => {}
    }
    // Each volume stops taking requests first, then uploads: nothing is acknowledged after
    // its last upload.
    tracing::info!("shutting down: uploading what is pending");
    let mut failed = false;
    for (name, r) in sup.send(StopAll).await? {
        if let Err(e) = r {
            failed = true;
            tracing::error!(export = %name, error = %e, "data is still pending; it stays journalled in the state directory and is uploaded at the next start");
        }
    }
    actix::System::current().stop();
    if failed {
        anyhow::bail!("some data could not be uploaded before shutdown");
    }
    Ok(())
}

async fn csi(a: CsiArgs) -> anyhow::Result<()> {
    use tokio::signal::unix::{signal, SignalKind};
    let mut term = signal(SignalKind::terminate())?;
    let mut int = signal(SignalKind::interrupt())?;
    let socket = s3nfs::csi::socket_path(&a.endpoint).map_err(anyhow::Error::msg)?;
    let sup = Supervisor::default().start();
    let cluster = cluster_of(&a)?;
    // Served for as long as this function runs: until the process exits.
    let _metrics = match a.metrics_listen {
        Some(l) => Some(
            s3nfs::metrics::serve(l)
                .await
                .map_err(|e| anyhow::anyhow!("cannot serve metrics on {l}: {e}"))?
                .1,
        ),
        None => None,
    };
    let opts = s3nfs::csi::CsiOptions {
        admin_socket: a
            .mode
            .node()
            .then(|| a.admin_socket.clone().unwrap_or_else(s3nfs::admin::default_socket)),
        cluster,
        mode: a.mode,
        socket,
        node_id: a.node_id,
        state_dir: a.state_dir,
        ports: a.ports,
        mounter: std::sync::Arc::new(s3nfs::csi::mount::SysMounter),
        stores: std::sync::Arc::new(s3nfs::store::connect::S3Connector),
    };
    let shutdown = async move {
        tokio::select! {
            _ = int.recv() => {}
            _ = term.recv() => {}
        }
    };
    s3nfs::csi::serve(opts, sup.clone(), shutdown).await?;
    // The plugin is going away (an upgrade, a restart): staged volumes stay staged and their
    // records stay, so the next plugin brings them back. Upload what is pending meanwhile, as
    // far as the grace period allows; the rest stays journalled for the next start.
    tracing::info!("CSI plugin stopping: uploading what is pending; volumes stay staged");
    match tokio::time::timeout(std::time::Duration::from_secs(20), sup.send(StopAll)).await {
        Ok(Ok(rs)) => {
            for (name, r) in rs {
                if let Err(e) = r {
                    tracing::warn!(volume = %name, error = %e, "still pending; uploaded after the restart");
                }
            }
        }
        _ => tracing::warn!("uploads did not finish in time; they resume after the restart"),
    }
    actix::System::current().stop();
    Ok(())
}

/// Staged files, sockets and sled each take descriptors; the default soft limit of 1024 is far
/// below what a busy volume needs. Raise it as far as the hard limit (or the kernel) allows.
fn raise_fd_limit() {
    let mut lim = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit/setrlimit only read and write the struct passed.
    unsafe {
        if libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim) != 0 {
            return;
        }
        let want = libc::rlimit {
            rlim_cur: 1 << 20,
            rlim_max: lim.rlim_max.max(1 << 20),
        };
        if libc::setrlimit(libc::RLIMIT_NOFILE, &want) != 0 {
            lim.rlim_cur = lim.rlim_max;
            libc::setrlimit(libc::RLIMIT_NOFILE, &lim);
        }
    }
}

/// Runs a long-lived command (the gateway, the CSI plugin): actors on a tokio runtime.
fn in_actix_system(f: impl std::future::Future<Output = anyhow::Result<()>>) -> anyhow::Result<()> {
    let sys = actix_rt::System::with_tokio_rt(|| {
        // With one CPU the multi-threaded scheduler has no one to share work with, and its
        // bookkeeping reads the clock four times per wake-up (the current-thread one, twice).
        // Where a clock reading is a system call (a guest without vDSO), that was 5% of a small
        // file's creation. Blocking work still goes to blocking threads either way.
        if s3nfs::fs::one_cpu() && std::env::var_os("TOKIO_WORKER_THREADS").is_none() {
            tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .expect("tokio runtime")
        } else {
            tokio::runtime::Builder::new_multi_thread()
                .enable_all()
                .build()
                .expect("tokio runtime")
        }
    });
    // The exporters live on the runtime: set up inside it, shut down (flushing what is queued)
    // after serving ends but before the runtime goes away.
    let mut telemetry = sys.block_on(async { s3nfs::telemetry::init() });
    let r = sys.block_on(f);
    telemetry.shutdown();
    r
}

fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("tokio runtime")
}

/// Every error that stops the program: one line, `error: what: cause: cause`, never a
/// backtrace (`RUST_BACKTRACE` is for panics, which are bugs).
fn main() -> std::process::ExitCode {
    match run() {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e:#}");
            std::process::ExitCode::FAILURE
        }
    }
}

fn run() -> anyhow::Result<()> {
    // glibc gives each thread that allocates its own arena; with a multi-threaded runtime moving
    // megabyte buffers between threads, freed memory strands in many arenas and RSS creeps up.
    // A few arenas keep the gateway inside its memory budget at no measurable cost.
    // SAFETY: mallopt only tunes the allocator; called before any other thread exists.
    //
    // Buffers of 1 to 16 MiB (READ and WRITE payloads, cached chunks, upload parts) are taken
    // and freed all the time. glibc's defaults hand each back to the kernel (mmap below 32 MiB
    // once its threshold adapts, or trimming the heap's top), so the next one starts on fresh
    // pages and takes a page fault per 4 KiB: 28,000 faults for a 256 MiB cold read, which
    // under a hypervisor that traps faults was most of the gateway's CPU for it. Buffers up to
    // 32 MiB come from the heap, and up to 64 MiB of free heap is kept for reuse.
    unsafe {
        libc::mallopt(libc::M_ARENA_MAX, 2);
        libc::mallopt(libc::M_MMAP_THRESHOLD, 32 << 20);
        libc::mallopt(libc::M_TRIM_THRESHOLD, 64 << 20);
    }
    let cli = Cli::parse();
    s3nfs::telemetry::set_log_format(cli.log_format);
    raise_fd_limit();
    match cli.cmd {
        Cmd::Serve(a) => in_actix_system(serve(a)),
        Cmd::Csi(a) => in_actix_system(csi(a)),
        Cmd::Ls { store, long } => {
            let _log = s3nfs::telemetry::init();
            runtime().block_on(ls(store, long))
        }
        Cmd::Cat { store, key } => {
            let _log = s3nfs::telemetry::init();
            runtime().block_on(cat(store, key))
        }
        Cmd::Put { store, key, file } => {
            let _log = s3nfs::telemetry::init();
            runtime().block_on(put(store, key, file))
        }
        Cmd::Status { json, admin_socket } => {
            let socket = admin_socket.unwrap_or_else(s3nfs::admin::default_socket);
            runtime().block_on(s3nfs::admin::cli::status(&socket, json, &mut std::io::stdout()))
        }
        Cmd::Flush {
            volume,
            json,
            admin_socket,
        } => {
            let socket = admin_socket.unwrap_or_else(s3nfs::admin::default_socket);
            runtime().block_on(s3nfs::admin::cli::flush(&socket, volume, json, &mut std::io::stdout()))
        }
    }
}
