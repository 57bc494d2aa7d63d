//! One volume being served: the core ([`Volume`]), its NFS listener, and its background work
//! (the uploader's rounds and the local sync ticker), with one lifecycle for all of them.
//!
//! Everything a gateway starts it also stops, in this order ([`Gateway::close`]):
//! 1. the NFS listener stops accepting; each connection answers the requests it has already
//!    received and is closed (nfsserve's `handle_until`);
//! 2. everything pending is uploaded to S3 (`flush_all`); if S3 refuses, the close fails and the
//!    gateway stays open (still flushing in the background) for the caller to try again;
//! 3. the background tasks are told to stop and awaited; the journal and staging are fsync'd;
//! 4. the volume is dropped: the database closes (checkpointing its journal), staging files
//!    are closed, the read cache is freed, and its metric series disappear.
//!
//! The background work runs under the volume's task owner ([`crate::tasks::Tasks`]), which
//! records the first failure ([`Gateway::failure`]). Dropping a `Gateway` without `close` aborts
//! everything at once, as a crash would: acknowledged writes are safe in the journal and
//! staging, nothing is uploaded.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use nfsserve::tcp::{NFSTcp, NFSTcpListener};
use tokio::sync::watch;
use tracing::Instrument;

use crate::config::Export;
use crate::fs::{Volume, VolumeConfig};
use crate::nfs::NfsAdapter;
use crate::store::ObjectStore;
use crate::tasks::Owned;

/// How often staged data and the journal are fsync'd: the most a node reboot can lose.
pub const LOCAL_SYNC_INTERVAL: Duration = Duration::from_millis(20);

pub fn volume_config(export: &Export) -> VolumeConfig {
    let mut cfg = VolumeConfig::new(export.state_dir.clone());
    cfg.prefix = export.prefix.clone();
    cfg.flush_delay = export.flush_delay;
    cfg.refresh = export.refresh;
    cfg.busy_defer = export.busy_defer;
    cfg.capacity = export.capacity;
    cfg.default_uid = export.defaults.uid;
    cfg.default_gid = export.defaults.gid;
    cfg.default_file_mode = export.defaults.file_mode;
    cfg.default_dir_mode = export.defaults.dir_mode;
    cfg.durability = export.durability;
    cfg
}

pub struct Gateway {
    pub name: String,
    pub vol: Arc<Volume>,
    pub addr: SocketAddr,
    stop_listener: watch::Sender<bool>,
    listener: Option<Owned<()>>,
}

impl Gateway {
    /// Opens the volume and binds its listener (on the export's port, so that clients holding
    /// handles from before a restart find it again).
    pub async fn start(export: &Export, store: Arc<dyn ObjectStore>) -> anyhow::Result<Gateway> {
        Self::start_with_clock(export, store, crate::clock::Clock::system()).await
    }

    /// [`Gateway::start`] on a given clock (a manual one in tests of time-based behaviour).
    pub async fn start_with_clock(
        export: &Export,
        store: Arc<dyn ObjectStore>,
        clock: crate::clock::Clock,
    ) -> anyhow::Result<Gateway> {
        Self::start_with(export, store, clock, None).await
    }

    /// [`Gateway::start_with_clock`], with `keyed_handles` for a ReadWriteMany owner (see
    /// [`crate::fs::VolumeConfig::keyed_handles`]).
    pub async fn start_with(
        export: &Export,
        store: Arc<dyn ObjectStore>,
        clock: crate::clock::Clock,
        keyed_handles: Option<u64>,
    ) -> anyhow::Result<Gateway> {
        // A root span of its own: the journal replay and the restore of in-flight uploads.
        let span = tracing::info_span!(parent: None, "volume_open", volume = %export.name);
        let mut cfg = volume_config(export);
        cfg.clock = clock;
        cfg.keyed_handles = keyed_handles;
        let vol = Volume::open(cfg, store).instrument(span).await?;
        let adapter = NfsAdapter::named(vol.clone(), &export.name).with_squash(export.squash);
        let listener = NFSTcpListener::bind(&export.listen.to_string(), adapter)
            .await
            .map_err(|e| anyhow::anyhow!("export {}: cannot listen on {}: {e}", export.name, export.listen))?;
        let addr = SocketAddr::new(listener.get_listen_ip(), listener.get_listen_port());
        let source: Arc<dyn crate::metrics::VolumeSource> = vol.clone();
        crate::metrics::global().register_volume(&export.name, &source);

        let (stop_listener, rx) = watch::channel(false);
        let listener = crate::tasks::owned(listener.handle_until(rx));
        let tasks = vol.tasks();
        tasks.spawn_loop("upload rounds", upload_rounds(vol.clone(), tasks.stopping()));
        tasks.spawn_loop("local sync", local_sync(vol.clone(), tasks.stopping()));
        Ok(Gateway {
            name: export.name.clone(),
            vol,
            addr,
            stop_listener,
            listener: Some(listener),
        })
    }

    /// The first failure of a background task, if any.
    pub fn failure(&self) -> Option<String> {
        self.vol.tasks().failure()
    }

    /// Stops taking NFS requests and waits for those in flight. Idempotent.
    pub async fn stop_serving(&mut self) {
        let _ = self.stop_listener.send(true);
        if let Some(l) = self.listener.take() {
            let _ = l.await;
        }
    }

    /// The whole stop sequence (see the module docs). On failure to upload, the gateway is
    /// handed back, no longer serving NFS but still flushing in the background.
    pub async fn close(mut self) -> Result<(), (Gateway, anyhow::Error)> {
        self.stop_serving().await;
        let span = tracing::info_span!("volume_close", volume = %self.name);
        if let Err(e) = flush_logging_progress(&self.vol, &self.name).instrument(span).await {
            let e = anyhow::anyhow!("volume {}: data still pending: {e}", self.name);
            return Err((self, e));
        }
        // The loops, and the relistings, streaming uploads and read-ahead the volume started.
        self.vol.tasks().stop().await;
        let vol = self.vol.clone();
        let synced = tokio::task::spawn_blocking(move || vol.sync_local()).await;
        if let Ok(Err(e)) = synced {
            tracing::warn!(volume = %self.name, error = %e, "final local sync failed");
        }
        crate::metrics::global().unregister_volume(&self.name);
        let name = self.name.clone();
        let vol = self.vol.clone();
        drop(self);
        // Every task holding the volume has ended; this is the last handle, and dropping it
        // closes the database.
        let holders = Arc::strong_count(&vol);
        if holders != 1 {
            tracing::warn!(volume = %name, holders, "volume still referenced after close");
        }
        drop(vol);
        Ok(())
    }
}

impl Gateway {
    /// Stops at once, uploading nothing more: the end of a ReadWriteMany owner's term, whose
    /// store's fence the caller has raised already. What was not in S3 is dropped with the
    /// local state; only writes no COMMIT acknowledged can be in it (the owner's durability
    /// is S3).
    pub fn abandon(self) {
        crate::metrics::global().unregister_volume(&self.name);
        tracing::warn!(volume = %self.name, "gateway abandoned: this node no longer owns the volume");
        drop(self);
    }
}

impl Drop for Gateway {
    fn drop(&mut self) {
        if let Some(l) = &self.listener {
            l.abort();
        }
        self.vol.tasks().abort_all();
    }
}

/// How often the final flush logs what is left.
const CLOSE_PROGRESS_EVERY: Duration = Duration::from_secs(5);

/// `flush_all`, logging what is left every few seconds while it takes long (a shutdown with
/// gigabytes pending: the operator sees it move, as `s3nfs flush` shows it).
async fn flush_logging_progress(vol: &Arc<Volume>, name: &str) -> crate::fs::FsResult<()> {
    let progress = crate::fs::FlushProgress::new(vol);
    let flushing = vol.flush_all();
    tokio::pin!(flushing);
    loop {
        tokio::select! {
            r = &mut flushing => return r,
            _ = tokio::time::sleep(CLOSE_PROGRESS_EVERY) => {
                let p = progress.sample();
                tracing::info!(
                    volume = %name,
                    files = p.files,
                    bytes = p.bytes,
                    bytes_per_second = p.bytes_per_second as u64,
                    "uploading what is pending before stopping"
                );
            }
        }
    }
}

/// The uploader's rounds at its own pace (see [`crate::fs::upload::Pace`]), and the usage
/// recount that rides on its tick.
async fn upload_rounds(vol: Arc<Volume>, mut stop: watch::Receiver<bool>) {
    let mut pace = crate::fs::upload::Pace::default();
    while vol.next_upload_round(&mut pace, &mut stop).await {
        if vol.recount_due() {
            let v = vol.clone();
            if let Ok(Err(e)) = tokio::task::spawn_blocking(move || v.recount_usage_if_due()).await {
                vol.tasks().fail(format!("counting usage: {e}"));
            }
        }
    }
}

async fn local_sync(vol: Arc<Volume>, mut stop: watch::Receiver<bool>) {
    let clock = vol.cfg.clock.clone();
    loop {
        // Idle, the loop sleeps until something is written (on no timer: it makes no system
        // call while the volume is idle); then it waits out the interval, so that the writes of
        // that interval share one sync.
        tokio::select! {
            _ = stop.wait_for(|s| *s) => return,
            _ = vol.until_local_sync_needed() => {}
        }
        tokio::select! {
            _ = stop.wait_for(|s| *s) => return,
            _ = clock.sleep(LOCAL_SYNC_INTERVAL) => {}
        }
        if let Err(e) = vol.sync_tick().await {
            tracing::error!(error = %e, "local sync failed");
            vol.tasks().fail(format!("local sync: {e}"));
        }
    }
}
