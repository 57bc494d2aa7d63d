//! ReadWriteMany volumes on the node: the node plugin's side of [`crate::cluster`].
//!
//! A volume staged in a MULTI_NODE writer mode gets a [`Member`](crate::cluster::member::Member) instead of a gateway of its
//! own: the kernel mounts the member's endpoint on 127.0.0.1 at the volume's port, and the
//! member runs the owner gateway through the [`Supervisor`] only while this node holds the
//! volume's lease. That gateway differs from a single-node one in four ways, each needed for
//! a new owner to take over in seconds without losing what was acknowledged:
//! - COMMIT waits for S3 (`Durability::S3`): what an fsync or close acknowledged survives the
//!   owner's node;
//! - namespace changes are uploaded within [`SHARED_FLUSH_DELAY`];
//! - file handles are keyed (see `fs::handles`), so a new owner answers the old owner's;
//! - every term starts with no local state and ends by throwing its local state away.

use std::net::{IpAddr, SocketAddr};
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use actix::Addr;

use crate::actors::{AbandonVolume, OwnerTerm, StartVolume, StopVolume, Supervisor};
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
            export,
            store,
            fence: Mutex::new(None),
        }
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
        let fence = Fence::default();
        *self.fence.locked() = Some(fence.clone());
        let term = OwnerTerm {
            volume_id: crate::fs::keyed_volume_id(&export.name),
            fence,
        };
        self.supervisor
            .send(StartVolume {
                export,
                check: false,
                term: Some(term),
                store: Some(self.store.clone()),
            })
            .await
            .map_err(|e| anyhow::anyhow!("supervisor: {e}"))?
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
