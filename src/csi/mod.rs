//! The CSI plugin: Identity, Controller and Node services (tonic, gRPC on a Unix socket), from
//! the project's own `csi.proto` (the CSI v1 subset it serves, with the spec's field numbers).
//!
//! # Layout
//! - [`params`]: volume ids, Secrets, StorageClass parameters, csi-s3's names throughout;
//! - [`record`]: the volume record in the bucket (capacity, on-delete), so that the controller
//!   keeps no database;
//! - [`identity`], [`controller`], [`node`]: the three services, thin: the controller talks to
//!   S3 through the store, the node sends the [`crate::actors::Supervisor`] messages to start,
//!   stop and resize gateways, and mounts through a [`mount::Mounter`];
//! - [`shared`]: ReadWriteMany volumes: the node's member of each, and its owner gateway;
//! - [`state`]: what the node plugin records of each staged volume, so that a restarted plugin
//!   brings every gateway back on its port before it answers a call.
//!
//! Errors: each request is checked first and answered with the status the CSI spec names, and
//! a message that says what was wrong. S3 refusing the credentials is PermissionDenied; S3
//! unreachable is Unavailable (kubelet and the sidecars retry).

use std::path::PathBuf;

use tonic::Status;

use crate::store::StoreError;

mod authority;
mod calls;
pub mod controller;
pub mod identity;
pub mod mount;
pub mod node;
pub mod params;
pub mod record;
pub mod shared;
pub mod state;

/// The generated CSI v1 messages and services.
pub mod pb {
    #![allow(clippy::all, missing_docs)]
    tonic::include_proto!("csi.v1");
}

/// The driver's name, as the CSIDriver object and StorageClasses name it.
pub const DRIVER_NAME: &str = "csi.s3nfs.io";

/// What runs in this process.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Mode {
    Controller,
    Node,
    All,
}

impl Mode {
    pub fn controller(self) -> bool {
        matches!(self, Mode::Controller | Mode::All)
    }
    pub fn node(self) -> bool {
        matches!(self, Mode::Node | Mode::All)
    }
}

/// The status for a store error; `what` says what was being done.
pub fn store_status(e: &StoreError, what: &str) -> Status {
    match e {
        StoreError::AccessDenied(_) => Status::permission_denied(format!("{what}: {e}")),
        StoreError::Unavailable(_) => Status::unavailable(format!("{what}: {e}")),
        StoreError::NoSuchBucket(_) | StoreError::NotFound(_) => Status::not_found(format!("{what}: {e}")),
        StoreError::Invalid(_) => Status::invalid_argument(format!("{what}: {e}")),
        StoreError::Io(_) => Status::internal(format!("{what}: {e}")),
    }
}

/// The status for a failure that may have a store error among its causes.
pub fn anyhow_status(e: &anyhow::Error, what: &str) -> Status {
    match e.downcast_ref::<StoreError>() {
        Some(se) => store_status(se, &format!("{what}: {e}")),
        None => Status::internal(format!("{what}: {e:#}")),
    }
}

/// Where the plugin listens: `unix:///path` or a plain path.
pub fn socket_path(endpoint: &str) -> Result<PathBuf, String> {
    let p = endpoint.strip_prefix("unix://").unwrap_or(endpoint);
    if p.is_empty() || endpoint.contains("://") && !endpoint.starts_with("unix://") {
        return Err(format!("--endpoint {endpoint:?}: only unix:///path sockets are served"));
    }
    Ok(PathBuf::from(p))
}

pub mod server;
pub use server::{serve, CsiOptions};
