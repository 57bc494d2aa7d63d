//! Actors (actix): a [`Supervisor`] owns the set of volumes in a process; a [`VolumeActor`] per
//! volume owns its store connection, its [`Volume`] (sled database, journal, staging) and its NFS
//! listener, and runs its background work: the flusher and the local sync ticker.
//!
//! Only lifecycle goes through the mailboxes. NFS requests call the volume directly from the
//! listener's tasks: namespace changes are serialised inside the volume, reads and writes of
//! file data are not serialised at all.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use actix::prelude::*;
use nfsserve::tcp::{NFSTcp, NFSTcpListener};
use tracing::Instrument;

use crate::config::{Backend, Export};
use crate::fs::{Volume, VolumeConfig};
use crate::nfs::NfsAdapter;
use crate::store::ObjectStore;

/// How often staged data and the journal are fsync'd: the most a node reboot can lose.
pub const LOCAL_SYNC_INTERVAL: Duration = Duration::from_millis(20);
/// How often the flusher looks for files that went idle.
const FLUSH_TICK: Duration = Duration::from_millis(200);
/// Longest pause between flush rounds while S3 keeps failing.
const MAX_BACKOFF: Duration = Duration::from_secs(10);

/// Builds the store an export names, and checks it before anything is served.
pub async fn open_store(export: &Export) -> anyhow::Result<Arc<dyn ObjectStore>> {
    let store: Arc<dyn ObjectStore> = match &export.backend {
        Backend::Local { dir } => Arc::new(crate::store::local::LocalStore::open(dir)?),
        Backend::S3(cfg) => Arc::new(crate::store::s3::S3Store::connect(cfg.clone()).await?),
    };
    store.check().await.map_err(|e| {
        anyhow::anyhow!(
            "export {}: {} refused the start-up check: {e}",
            export.name,
            store.describe()
        )
    })?;
    Ok(crate::metrics::MeteredStore::wrap(store))
}

pub fn volume_config(export: &Export) -> VolumeConfig {
    let mut cfg = VolumeConfig::new(export.state_dir.clone());
    cfg.prefix = export.prefix.clone();
    cfg.flush_delay = export.flush_delay;
    cfg.refresh = export.refresh;
    cfg
}

/// A volume being served: the core plus its listener and background tasks.
pub struct VolumeActor {
    pub name: String,
    pub vol: Arc<Volume>,
    pub addr: SocketAddr,
    tasks: Vec<tokio::task::JoinHandle<()>>,
}

impl VolumeActor {
    /// Opens the volume and binds its listener (on the export's port, so that clients holding
    /// handles from before a restart find it again).
    pub async fn start(export: &Export, store: Arc<dyn ObjectStore>) -> anyhow::Result<VolumeActor> {
        // A root span of its own: the journal replay and the restore of in-flight uploads.
        let span = tracing::info_span!(parent: None, "volume_open", volume = %export.name);
        let vol = Volume::open(volume_config(export), store).instrument(span).await?;
        crate::metrics::global().register_volume(&export.name, &vol);
        let adapter = NfsAdapter::named(vol.clone(), &export.name);
        let listener = NFSTcpListener::bind(&export.listen.to_string(), adapter)
            .await
            .map_err(|e| anyhow::anyhow!("export {}: cannot listen on {}: {e}", export.name, export.listen))?;
        let addr = SocketAddr::new(listener.get_listen_ip(), listener.get_listen_port());
        let mut tasks = Vec::new();
        tasks.push(tokio::spawn(async move {
            if let Err(e) = listener.handle_forever().await {
                tracing::error!(error = %e, "NFS listener stopped");
            }
        }));
        let v = vol.clone();
        tasks.push(tokio::spawn(async move {
            // While S3 keeps failing, back off (up to MAX_BACKOFF) instead of retrying every tick.
            let mut backoff = FLUSH_TICK;
            loop {
                tokio::select! {
                    _ = v.flusher.wait(), if backoff == FLUSH_TICK => {}
                    _ = tokio::time::sleep(backoff) => {}
                }
                let errors = v.flusher.errors.load(std::sync::atomic::Ordering::Relaxed);
                let failed = match v.flush_round(false).await {
                    Err(e) => {
                        tracing::warn!(error = %e, "flush round failed; retrying");
                        true
                    }
                    Ok(_) => v.flusher.errors.load(std::sync::atomic::Ordering::Relaxed) != errors,
                };
                backoff = if failed {
                    (backoff * 2).min(MAX_BACKOFF)
                } else {
                    FLUSH_TICK
                };
            }
        }));
        let v = vol.clone();
        tasks.push(tokio::spawn(async move {
            let mut tick = tokio::time::interval(LOCAL_SYNC_INTERVAL);
            loop {
                tick.tick().await;
                let v = v.clone();
                let r = tokio::task::spawn_blocking(move || v.sync_local()).await;
                if let Ok(Err(e)) = r {
                    tracing::error!(error = %e, "local sync failed");
                }
            }
        }));
        Ok(VolumeActor {
            name: export.name.clone(),
            vol,
            addr,
            tasks,
        })
    }
}

impl Actor for VolumeActor {
    type Context = Context<Self>;
}

impl Drop for VolumeActor {
    fn drop(&mut self) {
        for t in &self.tasks {
            t.abort();
        }
    }
}

/// Uploads everything pending now.
#[derive(Message)]
#[rtype(result = "Result<(), String>")]
pub struct Flush;

impl Handler<Flush> for VolumeActor {
    type Result = ResponseFuture<Result<(), String>>;
    fn handle(&mut self, _: Flush, _: &mut Context<Self>) -> Self::Result {
        let vol = self.vol.clone();
        let span = tracing::info_span!("volume_flush", volume = %self.name);
        Box::pin(async move { vol.flush_all().await.map_err(|e| e.to_string()) }.instrument(span))
    }
}

/// What an operator asks: `s3nfs status`.
#[derive(Debug, Clone, serde::Serialize)]
pub struct VolumeStatus {
    pub name: String,
    pub listen: String,
    pub pending_inodes: usize,
    pub dirty_bytes: u64,
    pub uploaded_bytes: u64,
    pub upload_errors: u64,
}

#[derive(Message)]
#[rtype(result = "VolumeStatus")]
pub struct Status;

impl Handler<Status> for VolumeActor {
    type Result = MessageResult<Status>;
    fn handle(&mut self, _: Status, _: &mut Context<Self>) -> Self::Result {
        use std::sync::atomic::Ordering;
        MessageResult(VolumeStatus {
            name: self.name.clone(),
            listen: self.addr.to_string(),
            pending_inodes: self.vol.meta.pending_count(),
            dirty_bytes: self.vol.flusher.dirty_bytes(),
            uploaded_bytes: self.vol.flusher.uploaded_bytes.load(Ordering::Relaxed),
            upload_errors: self.vol.flusher.errors.load(Ordering::Relaxed),
        })
    }
}

/// Owns the volumes of this process.
#[derive(Default)]
pub struct Supervisor {
    volumes: HashMap<String, Addr<VolumeActor>>,
}

impl Actor for Supervisor {
    type Context = Context<Self>;
}

#[derive(Message)]
#[rtype(result = "()")]
pub struct Register(pub String, pub Addr<VolumeActor>);

impl Handler<Register> for Supervisor {
    type Result = ();
    fn handle(&mut self, m: Register, _: &mut Context<Self>) {
        self.volumes.insert(m.0, m.1);
    }
}

/// Flushes every volume (shutdown, operator request). Errors are per volume.
#[derive(Message)]
#[rtype(result = "Vec<(String, Result<(), String>)>")]
pub struct FlushAll;

impl Handler<FlushAll> for Supervisor {
    type Result = ResponseFuture<Vec<(String, Result<(), String>)>>;
    fn handle(&mut self, _: FlushAll, _: &mut Context<Self>) -> Self::Result {
        let vols: Vec<_> = self.volumes.iter().map(|(n, a)| (n.clone(), a.clone())).collect();
        Box::pin(async move {
            let mut out = Vec::new();
            for (name, addr) in vols {
                let r = addr.send(Flush).await.unwrap_or_else(|e| Err(e.to_string()));
                out.push((name, r));
            }
            out
        })
    }
}

#[derive(Message)]
#[rtype(result = "Vec<VolumeStatus>")]
pub struct StatusAll;

impl Handler<StatusAll> for Supervisor {
    type Result = ResponseFuture<Vec<VolumeStatus>>;
    fn handle(&mut self, _: StatusAll, _: &mut Context<Self>) -> Self::Result {
        let vols: Vec<_> = self.volumes.values().cloned().collect();
        Box::pin(async move {
            let mut out = Vec::new();
            for a in vols {
                if let Ok(s) = a.send(Status).await {
                    out.push(s);
                }
            }
            out
        })
    }
}
