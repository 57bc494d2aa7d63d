//! Shared helpers for the integration tests. Each test binary uses only some of them.
#![allow(dead_code)]

pub mod contract;
pub mod csi;
pub mod garage;
pub mod gateway;
pub mod guest;
pub mod nfs;
pub mod rpc;
pub mod uml;
