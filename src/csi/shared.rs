//! ReadWriteMany volumes on the node: the node plugin's side of [`crate::cluster`].
//!
//! A volume staged in a MULTI_NODE writer mode gets a [`Member`](crate::cluster::member::Member) instead of a gateway of its
//! own: the kernel mounts the member's endpoint on 127.0.0.1 at the volume's port, and the
//! member runs the owner gateway through the [`Supervisor`] only while this node holds the
//! volume's lease. That gateway differs from a single-node one in four ways, each needed for
//! a new owner to take over in seconds without losing what was acknowledged:
//! - COMMIT waits for S3 (`Durability::S3`): what an fsync or close acknowledged survives the
//!   owner's node;
//! - namespace changes are answered once in S3 too (`durability s3` again, see
//!   `fs::durable`), and what is left pending goes up within [`SHARED_FLUSH_DELAY`];
//! - file handles are keyed (see `fs::handles`), so a new owner answers the old owner's;
//! - every term starts with no local state and ends by throwing its local state away.

use std::net::{IpAddr, SocketAddr};
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use actix::Addr;

use super::params::VolumeId;
use super::record;
use crate::actors::{AbandonVolume, OwnerTerm, ResizeVolume, StartVolume, StopVolume, Supervisor};
use crate::cluster::elect::Timing;
use crate::cluster::lease::LeaseApi;
use crate::cluster::member::OwnerGateway;
use crate::cluster::tls::PeerTls;
use crate::config::Export;
use crate::store::fenced::Fence;
use crate::sync::LockExt;

/// How soon a shared volume's changes go to S3 when idle (a single-node volume's default is 2 s).
pub const SHARED_FLUSH_DELAY: Duration = Duration::from_millis(200);

/// What a node needs to take part in ReadWriteMany volumes.
pub struct Cluster {
    pub leases: Arc<dyn LeaseApi>,
    pub tls: PeerTls,
    /// The node's address, where its owner gateways take other nodes' relays.
    pub address: IpAddr,
    pub timing: Timing,
}

/// The Lease's name for a volume: a DNS subdomain whatever the volume id holds.
pub fn lease_name(volume_id: &str) -> String {
    format!("s3nfs-rwx-{:016x}", crate::fs::keyed_volume_id(volume_id))
}

/// The owner gateway of one volume on this node, through the supervisor.
pub struct SupervisedOwner {
    pub supervisor: Addr<Supervisor>,
    /// The volume's export as a single-node gateway would have it; adapted per term.
    pub export: Export,
    /// The volume's store, one client for every term (each term fences it anew).
    store: Arc<dyn crate::store::ObjectStore>,
    /// Held while a term runs: raised by [`OwnerGateway::fence`].
    fence: Mutex<Option<Fence>>,
    /// The capacity as last raised on this node (NodeExpandVolume), for every term to come.
    capacity: Mutex<Option<u64>>,
    /// The volume whose record each term reads its capacity from (see [`super::record`]):
    /// this node's kubelet may not have expanded the volume yet when the node takes over.
    record: Option<VolumeId>,
}

impl SupervisedOwner {
    pub fn new(
        supervisor: Addr<Supervisor>,
        mut export: Export,
        store: Arc<dyn crate::store::ObjectStore>,
    ) -> SupervisedOwner {
        export.listen = SocketAddr::from(([127, 0, 0, 1], 0));
        export.durability = crate::fs::durable::Durability::S3;
        export.flush_delay = export.flush_delay.min(SHARED_FLUSH_DELAY);
        SupervisedOwner {
            supervisor,
            capacity: Mutex::new(export.capacity),
            export,
            store,
            fence: Mutex::new(None),
            record: None,
        }
    }

    /// Each term reads the capacity in `vol`'s record too.
    pub fn with_record(mut self, vol: VolumeId) -> SupervisedOwner {
        self.record = Some(vol);
        self
    }

    /// Raises the volume's capacity to at least `bytes`, for the term running on this node (if
    /// one is) and for every later one; the capacity now. Every node with the volume staged is
    /// told (kubelet expands it on each), so that whichever owns it next serves the new size.
    pub async fn resize(&self, bytes: u64) -> u64 {
        let now = self.raise(bytes);
        // Sent after the capacity is recorded: a term starting meanwhile either is registered
        // and gets this, or reads the new capacity itself when registered (see `start`).
        if self.fence.locked().is_some() {
            let _ = self
                .supervisor
                .send(ResizeVolume(self.export.name.clone(), Some(now)))
                .await;
        }
        now
    }

    fn raise(&self, bytes: u64) -> u64 {
        let mut c = self.capacity.locked();
        let now = c.map_or(bytes, |c| c.max(bytes));
        *c = Some(now);
        now
    }

    /// The capacity a new term starts with: this node's, raised to the record's. A record that
    /// cannot be read leaves this node's (logged): the term must not wait on it.
    async fn term_capacity(&self) -> Option<u64> {
        if let Some(vol) = &self.record {
            match record::read(&*self.store, vol).await {
                Ok(Some(rec)) => {
                    self.raise(rec.capacity_bytes);
                }
                Ok(None) => {}
                Err(e) => {
                    tracing::warn!(volume = %self.export.name, error = %e, "cannot read the volume's record; the term starts with the capacity this node knows")
                }
            }
        }
        *self.capacity.locked()
    }

    fn base(&self) -> PathBuf {
        self.export.state_dir.clone()
    }

    async fn wipe(&self) {
        let base = self.base();
        let _ = tokio::task::spawn_blocking(move || match std::fs::remove_dir_all(&base) {
            Err(e) if e.kind() != std::io::ErrorKind::NotFound => {
                tracing::warn!(dir = %base.display(), error = %e, "cannot remove an owner term's local state")
            }
            _ => {}
        })
        .await;
    }
}

#[async_trait::async_trait]
impl OwnerGateway for SupervisedOwner {
    async fn start(&self, epoch: u32) -> anyhow::Result<SocketAddr> {
        // Nothing from an earlier term: what it had not uploaded was never acknowledged, and
        // another owner may have changed the volume since.
        self.wipe().await;
        let mut export = self.export.clone();
        export.state_dir = self.base().join(format!("term-{epoch}"));
        export.capacity = self.term_capacity().await;
        let fence = Fence::default();
        *self.fence.locked() = Some(fence.clone());
        let term = OwnerTerm {
            volume_id: crate::fs::keyed_volume_id(&export.name),
            fence,
        };
        let started = export.capacity;
        let addr = self
            .supervisor
            .send(StartVolume {
                export,
                check: false,
                term: Some(term),
                store: Some(self.store.clone()),
            })
            .await
            .map_err(|e| anyhow::anyhow!("supervisor: {e}"))??;
        let now = *self.capacity.locked();
        if now != started {
            let _ = self.supervisor.send(ResizeVolume(self.export.name.clone(), now)).await;
        }
        Ok(addr)
    }

    async fn fence(&self) {
        let Some(f) = self.fence.locked().take() else { return };
        f.raise();
        let _ = self.supervisor.send(AbandonVolume(self.export.name.clone())).await;
        self.wipe().await;
    }

    async fn close(&self) -> anyhow::Result<()> {
        if self.fence.locked().is_none() {
            return Ok(());
        }
        self.supervisor
            .send(StopVolume(self.export.name.clone()))
            .await
            .map_err(|e| anyhow::anyhow!("supervisor: {e}"))?
            .map_err(anyhow::Error::msg)?;
        // The term is over: a gateway of it still starting (the stop found none running) is
        // thrown away when it is up (see the supervisor's StartVolume).
        if let Some(f) = self.fence.locked().take() {
            f.raise();
        }
        self.wipe().await;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lease_names_are_dns_subdomains_whatever_the_volume_id() {
        for id in ["bucket/prefix/with/slashes", "UPPER_case", "x".repeat(600).as_str()] {
            let n = lease_name(id);
            assert!(n.len() <= 63, "{n}");
            assert!(
                n.bytes()
                    .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-'),
                "{n}"
            );
        }
        assert_ne!(lease_name("a/b"), lease_name("a/c"));
        assert_eq!(lease_name("a/b"), lease_name("a/b"));
    }
}
