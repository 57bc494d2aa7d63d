//! s3nfs: S3 buckets served over NFSv3 to the kernel's own NFS client.
//!
//! # Layout
//! - [`store`]: the object-store trait and its three implementations (S3, embedded, faulty).
//! - [`meta`]: the per-volume sled namespace and the write-ahead journal in front of it.
//! - [`fs`]: the protocol-free filesystem core: namespace operations, staging, uploads, reads.
//! - [`nfs`]: the thin nfsserve adapter over [`fs`].
//! - [`actors`]: the supervisor and per-volume actors (actix) that own volumes and listeners.
//! - [`csi`]: the Kubernetes CSI plugin (controller and node services over gRPC).
//! - [`cluster`]: ReadWriteMany volumes: the owner's lease, the relays of other nodes.
//! - [`clock`]: the injectable time source of flush delays, refreshes and back-offs.
//! - [`config`]: exports, from flags or a config file.
//! - [`telemetry`], [`metrics`]: logs, OpenTelemetry traces, Prometheus/OTLP metrics.

pub mod actors;
pub mod admin;
pub mod clock;
pub mod cluster;
pub mod config;
pub mod csi;
pub mod fs;
pub mod meta;
pub mod metrics;
pub mod nfs;
pub mod store;
pub mod sync;
pub mod tasks;
pub mod telemetry;
