//! `s3nfs`: the command line.

use std::net::SocketAddr;
use std::path::PathBuf;

use actix::Actor;
use clap::{Parser, Subcommand};

use s3nfs::actors::{self, FlushAll, Register, Supervisor, VolumeActor};
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
}

#[derive(Subcommand)]
enum Cmd {
    /// Serve one export (from flags) or several (from --config) over NFSv3.
    Serve(ServeArgs),
}

#[derive(Parser)]
struct ServeArgs {
    /// Address to listen on. Loopback by default: exposing the share is a deliberate choice.
    #[arg(long, default_value = "127.0.0.1:20490")]
    listen: SocketAddr,
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
    /// Local state: metadata database, journal, staged files (default: DATA_DIR/state).
    #[arg(long)]
    state_dir: Option<PathBuf>,
    /// Upload a modified file once it has been idle this long.
    #[arg(long, default_value = "2s", value_parser = config::parse_duration)]
    flush_delay: std::time::Duration,
    /// See changes made in the bucket by other tools within this interval.
    #[arg(long, default_value = "5s", value_parser = config::parse_duration)]
    refresh: std::time::Duration,
    /// Serve Prometheus metrics at http://ADDR/metrics (e.g. 127.0.0.1:9464). Off unless given.
    #[arg(long, env = "S3NFS_METRICS_LISTEN")]
    metrics_listen: Option<SocketAddr>,
    /// Several exports from a TOML file (see README); the flags above give credentials and defaults.
    #[arg(long)]
    config: Option<PathBuf>,
}

fn exports(a: &ServeArgs) -> anyhow::Result<Vec<Export>> {
    let state = a.state_dir.clone().unwrap_or_else(|| a.data_dir.join("state"));
    let creds = S3Config {
        endpoint: None,
        bucket: String::new(),
        region: a.region.clone(),
        path_style: !a.virtual_hosted,
        access_key: a.access_key.clone(),
        secret_key: a.secret_key.clone().map(Secret),
        session_token: std::env::var("AWS_SESSION_TOKEN").ok().map(Secret),
    };
    if let Some(path) = &a.config {
        return config::load(path, &state, &creds);
    }
    let backend = match (&a.endpoint, &a.bucket) {
        (None, None) => Backend::Local {
            dir: a.data_dir.join("objects"),
        },
        (_, Some(bucket)) => Backend::S3(S3Config {
            endpoint: a.endpoint.clone(),
            bucket: bucket.clone(),
            ..creds
        }),
        (Some(_), None) => anyhow::bail!("--endpoint needs --bucket"),
    };
    Ok(vec![Export {
        name: "default".into(),
        listen: a.listen,
        backend,
        prefix: config::normalize_prefix(&a.prefix),
        state_dir: state.join("default"),
        flush_delay: a.flush_delay,
        refresh: a.refresh,
    }])
}

async fn serve(a: ServeArgs) -> anyhow::Result<()> {
    let exports = exports(&a)?;
    if let Some(l) = a.metrics_listen {
        let addr = s3nfs::metrics::serve(l)
            .await
            .map_err(|e| anyhow::anyhow!("cannot serve metrics on {l}: {e}"))?;
        println!("s3nfs: metrics on http://{addr}/metrics");
    }
    let sup = Supervisor::default().start();
    for e in &exports {
        if !e.listen.ip().is_loopback() {
            tracing::warn!(listen = %e.listen, "listening beyond loopback: anyone who can reach this address can mount the share");
        }
        let store = actors::open_store(e).await?;
        let actor = VolumeActor::start(e, store).await?;
        let addr = actor.addr;
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
        sup.send(Register(e.name.clone(), actor.start())).await?;
    }
    use tokio::signal::unix::{signal, SignalKind};
    let mut term = signal(SignalKind::terminate())?;
    tokio::select! {
        _ = tokio::signal::ctrl_c() => {}
        _ = term.recv() => {}
    }
    tracing::info!("shutting down: uploading what is pending");
    let mut failed = false;
    for (name, r) in sup.send(FlushAll).await? {
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

fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    match cli.cmd {
        Cmd::Serve(a) => {
            let sys = actix_rt::System::with_tokio_rt(|| {
                tokio::runtime::Builder::new_multi_thread()
                    .enable_all()
                    .build()
                    .expect("tokio runtime")
            });
            // The exporters live on the runtime: set up inside it, shut down (flushing what is
            // queued) after serving ends but before the runtime goes away.
            let mut telemetry = sys.block_on(async { s3nfs::telemetry::init() });
            let r = sys.block_on(serve(a));
            telemetry.shutdown();
            r
        }
    }
}
