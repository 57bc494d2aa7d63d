//! What an acknowledged write survives: WRITE's `stable`, COMMIT, and the write verifier.
//!
//! The contract is NFS's own. A WRITE answered UNSTABLE is in the staged file but perhaps not
//! on disk; a COMMIT (the client's fsync or close) returns once everything written to the file
//! before it is on the gateway's disk (or, with [`Durability::S3`], in S3). The write verifier
//! is drawn anew each time a volume opens, so after a crash of the gateway the client sees it
//! change and sends again whatever it had not had committed.
//!
//! Concurrent COMMITs share one sync (group commit): a COMMIT waits for a sync that started
//! after it arrived, and whoever finds none running starts one.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use crate::meta::Ino;

use super::{Attr, FsError, FsResult, Volume};

/// What COMMIT waits for.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Durability {
    /// The gateway's disk (the staged file and the journal): survives a crash of the gateway
    /// and a reboot of the node, not the loss of the node's disk.
    #[default]
    Local,
    /// S3: the file's bytes are uploaded before COMMIT returns.
    S3,
}

impl std::str::FromStr for Durability {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "local" => Ok(Durability::Local),
            "s3" => Ok(Durability::S3),
            other => Err(format!("durability must be local or s3, not {other:?}")),
        }
    }
}

/// Group commit state.
pub(crate) struct SyncGroup {
    lock: tokio::sync::Mutex<()>,
    /// Syncs started so far; a COMMIT notes it on arrival.
    started: AtomicU64,
    /// The number of the last sync that finished.
    done: AtomicU64,
    /// Drawn at open: the write verifier.
    verifier: u64,
}

impl SyncGroup {
    pub(crate) fn new() -> SyncGroup {
        SyncGroup {
            lock: tokio::sync::Mutex::new(()),
            started: AtomicU64::new(0),
            done: AtomicU64::new(0),
            verifier: super::rand_u64(),
        }
    }
}

impl Volume {
    /// The write verifier: the same for as long as the volume stays open, different after.
    pub fn write_verifier(&self) -> [u8; 8] {
        self.sync_group.verifier.to_be_bytes()
    }

    /// Makes everything written so far durable on the gateway's disk. Concurrent callers share
    /// one sync.
    pub async fn sync_durable(&self) -> FsResult<()> {
        let g = &self.sync_group;
        let arrived = g.started.load(Ordering::Acquire);
        let _l = g.lock.lock().await;
        if g.done.load(Ordering::Acquire) > arrived {
            return Ok(()); // a sync that started after we arrived has finished
        }
        let n = g.started.fetch_add(1, Ordering::AcqRel) + 1;
        let vol = self
            .this
            .get()
            .and_then(|w| w.upgrade())
            .ok_or_else(|| FsError::Io("volume closing".into()))?;
        tokio::task::spawn_blocking(move || vol.sync_local())
            .await
            .map_err(|e| FsError::Io(format!("sync task failed: {e}")))??;
        g.done.store(n, Ordering::Release);
        Ok(())
    }

    /// COMMIT of a file: durable as the volume's [`Durability`] says; returns its attributes.
    pub async fn commit(self: &Arc<Self>, ino: Ino) -> FsResult<Attr> {
        self.sync_durable().await?;
        if self.cfg.durability == Durability::S3 {
            self.flush_inode(ino).await?;
        }
        Ok(self.attr_of(&self.inode(ino)?))
    }
}
