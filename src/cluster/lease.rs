//! The lease that names a ReadWriteMany volume's one owner, and the store that keeps it.
//!
//! A lease is a record with a version: every change is a compare-and-swap on the version the
//! writer last read, so two contenders cannot both win. [`LeaseApi`] is that store's seam; the
//! Kubernetes API server's `coordination.k8s.io/v1` Lease ([`super::kube`]) is the one s3nfs
//! ships, and `resourceVersion` is its version.
//!
//! The record carries what every node needs: who holds the volume and where to reach it
//! ([`Holder`], in `holderIdentity`), how long a renewal lasts, and the number of hand-overs
//! (`leaseTransitions`), which is the owner's epoch.

use std::time::SystemTime;

/// Who holds a lease: the node's name and the address where its owner gateway takes
/// connections from other nodes' relays. Written as `node@address` in `holderIdentity`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Holder {
    pub node: String,
    pub addr: std::net::SocketAddr,
}

impl Holder {
    pub fn identity(&self) -> String {
        format!("{}@{}", self.node, self.addr)
    }

    /// `None` for an identity another program wrote (it holds the lease all the same).
    pub fn parse(identity: &str) -> Option<Holder> {
        let (node, addr) = identity.rsplit_once('@')?;
        Some(Holder {
            node: node.to_string(),
            addr: addr.parse().ok()?,
        })
    }
}

/// A lease's content (`spec` of a Kubernetes Lease).
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct LeaseRecord {
    /// `holderIdentity`; `None` or empty when released.
    pub holder: Option<String>,
    /// `leaseDurationSeconds`: how long after a renewal the others wait before they take over.
    pub duration_secs: u32,
    /// `acquireTime`: when the current holder took it.
    pub acquire_time: Option<SystemTime>,
    /// `renewTime`: the holder's last renewal, by the holder's clock. Contenders do not compare
    /// it with their own clocks (see [`super::elect`]); it is for people reading the lease.
    pub renew_time: Option<SystemTime>,
    /// `leaseTransitions`: how many times the lease changed hands; the owner's epoch.
    pub transitions: u32,
}

/// A record as stored, with the version a compare-and-swap must name.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Versioned {
    pub record: LeaseRecord,
    /// `metadata.resourceVersion`: opaque, compared for equality only.
    pub version: String,
}

#[derive(Debug, Clone, thiserror::Error, PartialEq, Eq)]
pub enum LeaseError {
    /// Another writer got there first (HTTP 409: the lease exists, or its version moved on).
    #[error("conflict: the lease changed since it was read")]
    Conflict,
    /// The store did not answer, or answered with a server error: try again.
    #[error("lease store unavailable: {0}")]
    Unavailable(String),
    /// The store refused the request (credentials, permissions, a malformed lease): retrying
    /// will not help until someone fixes the cause.
    #[error("lease store refused the request: {0}")]
    Refused(String),
}

/// A store of versioned lease records, one per name.
#[async_trait::async_trait]
pub trait LeaseApi: Send + Sync {
    /// The lease, or `None` if there is none.
    async fn get(&self, name: &str) -> Result<Option<Versioned>, LeaseError>;
    /// Creates the lease; [`LeaseError::Conflict`] if it exists.
    async fn create(&self, name: &str, record: &LeaseRecord) -> Result<Versioned, LeaseError>;
    /// Replaces the lease if its version is still `version`; [`LeaseError::Conflict`] if not.
    async fn update(&self, name: &str, record: &LeaseRecord, version: &str) -> Result<Versioned, LeaseError>;
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn holder_identity_round_trips_and_foreign_identities_are_none() {
        let h = Holder {
            node: "node-a".into(),
            addr: "10.0.0.7:20501".parse().unwrap(),
        };
        assert_eq!(h.identity(), "node-a@10.0.0.7:20501");
        assert_eq!(Holder::parse(&h.identity()), Some(h));
        let v6 = Holder::parse("n@[fd00::1]:7").unwrap();
        assert_eq!(v6.addr, "[fd00::1]:7".parse().unwrap());
        assert_eq!(Holder::parse("some-controller-7f9c"), None);
        assert_eq!(Holder::parse("n@not-an-address"), None);
    }
}
