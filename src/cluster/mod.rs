//! ReadWriteMany: one owner gateway per volume, chosen by a lease; every other node relays to it.
//!
//! - [`lease`]: the lease record and the store seam (compare-and-swap on a version);
//! - [`kube`]: that store on the Kubernetes API server (`coordination.k8s.io/v1` Lease);
//! - [`elect`]: the campaign's rules (take over after expiry, stop before it) and its loop;
//! - [`member`]: one node's part in one volume, acting on its role;
//! - [`relay`]: the node-local endpoint and the owner's cross-node port;
//! - [`tls`]: the mutual TLS between nodes, with the driver's pinned key pair.
pub mod elect;
pub mod kube;
pub mod lease;
pub mod member;
pub mod relay;
pub mod tls;
