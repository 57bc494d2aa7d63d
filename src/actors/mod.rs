//! Actors (actix): a [`Supervisor`] owns the set of volumes in a process; a [`VolumeActor`] per
//! volume owns its [`Gateway`]: store connection, [`crate::fs::Volume`] (sled database, journal,
//! staging), NFS listener and background work, under one lifecycle (see [`gateway`]).
//!
//! Only lifecycle goes through the mailboxes. NFS requests call the volume directly from the
//! listener's tasks: namespace changes are serialised inside the volume, reads and writes of
//! file data are not serialised at all.
//!
//! Why actors here, when background work runs as tasks under [`crate::tasks`]: the life of a
//! volume is a sequence of requests that must not interleave (start, stop, abandon, resize,
//! status), arriving from CSI calls, ReadWriteMany role changes, signals and the admin socket
//! at any time. A mailbox per volume orders them without a lock held across the long awaits of
//! a close (which uploads everything), and a stop that fails hands the gateway back to its actor
//! rather than losing it. actix is also the runtime the design names; the actors stay this thin
//! so that nothing on an I/O path depends on it.

use std::sync::Arc;

use crate::config::{Backend, Export};
use crate::store::ObjectStore;

pub mod gateway;
pub mod supervisor;
pub mod volume;

pub use gateway::{volume_config, Gateway, LOCAL_SYNC_INTERVAL};
pub use supervisor::{
    AbandonVolume, OwnerTerm, ResizeVolume, StartVolume, StatusAll, StopAll, StopVolume, Supervisor, VolumeOf,
    VolumeStatusOf,
};
pub use volume::{VolumeActor, VolumeStatus};

/// Builds the store an export names, and with `check` checks it before anything is served. A
/// refusal keeps the [`crate::store::StoreError`] as the error's source.
pub async fn open_store(export: &Export, check: bool) -> anyhow::Result<Arc<dyn ObjectStore>> {
    let store: Arc<dyn ObjectStore> = match &export.backend {
        Backend::Local { dir } => Arc::new(crate::store::local::LocalStore::open(dir)?),
        Backend::S3(cfg) => Arc::new(crate::store::s3::S3Store::connect(cfg.clone()).await?),
    };
    checked(export, crate::store::metered::MeteredStore::wrap(store), check).await
}

/// `store`, once it has passed the start-up check when `check` is set.
pub async fn checked(
    export: &Export,
    store: Arc<dyn ObjectStore>,
    check: bool,
) -> anyhow::Result<Arc<dyn ObjectStore>> {
    if let Err(e) = if check { store.check().await } else { Ok(()) } {
        let what = format!(
            "export {}: {} refused the start-up check: {e}",
            export.name,
            store.describe()
        );
        return Err(anyhow::Error::new(e).context(what));
    }
    Ok(store)
}
