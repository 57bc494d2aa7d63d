//! An NFSv3 server library: ONC RPC over TCP, MOUNT v3, the portmapper's GETPORT and the NFSv3
//! procedures, in front of a file system implementing [`vfs::NFSFileSystem`]. s3nfs's fork of
//! nfsserve 0.11.0; README.md tells what changed since.
#![cfg_attr(feature = "strict", deny(warnings))]

mod context;
mod rpc;
mod rpcwire;
// s3nfs patch: one record through the server side, for fuzzing.
pub use rpcwire::process_record;
// s3nfs patch: refused records, for metrics.
pub use rpcwire::REFUSED_RECORDS;
mod write_counter;
pub mod xdr;

mod mount;
mod mount_handlers;

mod portmap;
mod portmap_handlers;

pub mod nfs;
mod nfs_handlers;

#[cfg(not(target_os = "windows"))]
pub mod fs_util;

pub mod tcp;
mod transaction_tracker;
pub mod vfs;
