//! The admin endpoint of a running `serve` or CSI node plugin: `s3nfs status` asks it what each
//! volume holds that is not yet in S3, and `s3nfs flush` has it upload everything now.
//!
//! It is a Unix socket, not a TCP port: only the user the process runs as (root, in a node
//! plugin) may connect (the socket is mode 0600 in a directory of mode 0700). The protocol is
//! one JSON request line, answered by JSON lines: a [`StatusReply`] for `status`, a stream of
//! [`FlushEvent`]s ending with [`FlushEvent::End`] for `flush`.
//!
//! Here: the protocol and where the socket lives. The server is in `server.rs`, what it reports
//! on in `source.rs`, the command line's side in `cli.rs`.

use std::path::PathBuf;

use serde::{Deserialize, Serialize};

pub mod cli;
pub mod server;
pub mod source;

/// Requests are one line of at most this many bytes.
pub const MAX_REQUEST: usize = 4096;

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "op", rename_all = "snake_case")]
pub enum Request {
    Status,
    /// Upload everything pending now: of one volume, or of all with `None`.
    Flush {
        volume: Option<String>,
    },
}

/// One volume, as `s3nfs status` shows it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct VolumeReport {
    pub name: String,
    /// The port clients mount (127.0.0.1 unless the export says otherwise).
    pub port: u16,
    /// `single-node`; for ReadWriteMany volumes `owner`, `follower` or `unknown` (no owner
    /// known yet).
    pub role: String,
    /// ReadWriteMany: the node that owns the volume.
    pub owner: Option<String>,
    /// False where this process holds none of the volume's data (a follower): the figures
    /// below are the owner's to report.
    pub local: bool,
    /// Files and deletions not yet in S3.
    pub pending_files: u64,
    /// Bytes written and not yet in S3.
    pub pending_bytes: u64,
    /// How long the volume has held data not in S3 (0 when all of it is there).
    pub pending_seconds: f64,
    pub uploads_in_flight: u64,
    pub last_error: Option<String>,
    /// Seconds since the Unix epoch.
    pub last_error_at: Option<u64>,
    pub last_upload_at: Option<u64>,
    /// `None`: no capacity (a `serve` export).
    pub capacity_bytes: Option<u64>,
    pub used_bytes: u64,
    pub files: u64,
    /// The first failure of a background task of the volume.
    pub failure: Option<String>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct StatusReply {
    pub volumes: Vec<VolumeReport>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum FlushEvent {
    /// What is left, about once a second.
    Progress {
        volume: String,
        files: u64,
        bytes: u64,
        bytes_per_second: f64,
    },
    /// Everything the volume held is in S3.
    Done {
        volume: String,
        uploaded_bytes: u64,
        seconds: f64,
    },
    /// S3 refused: what is left stays pending and is retried in the background.
    Failed { volume: String, error: String },
    /// Nothing to do here (a ReadWriteMany follower: the owner holds the data).
    Skipped { volume: String, reason: String },
    /// The last line; `ok` when every volume is in S3.
    End { ok: bool },
    /// The request was not understood.
    Refused { error: String },
}

/// Where the admin socket is unless `--admin-socket` or `S3NFS_ADMIN_SOCKET` says: under
/// `/run/s3nfs` for root, else the user's runtime directory.
pub fn default_socket() -> PathBuf {
    if let Some(p) = std::env::var_os("S3NFS_ADMIN_SOCKET") {
        return p.into();
    }
    // SAFETY: geteuid cannot fail.
    let uid = unsafe { libc::geteuid() };
    if uid == 0 {
        return PathBuf::from("/run/s3nfs/admin.sock");
    }
    match std::env::var_os("XDG_RUNTIME_DIR") {
        Some(d) => PathBuf::from(d).join("s3nfs/admin.sock"),
        None => PathBuf::from(format!("/tmp/s3nfs-{uid}/admin.sock")),
    }
}
