//! Shared helpers for the integration tests. Each test binary uses only some of them.
#![allow(dead_code)]

pub mod bed;
pub mod contract;
pub mod csi;
pub mod garage;
pub mod gateway;
pub mod guest;
pub mod kube_api;
pub mod nfs;
pub mod peer;
pub mod rpc;

/// Deterministic bytes for (seed, length): a xorshift stream, so that a misplaced block shows.
pub fn pattern(seed: u64, len: usize) -> Vec<u8> {
    let mut x = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    let mut out = Vec::with_capacity(len + 8);
    while out.len() < len {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        out.extend_from_slice(&x.to_le_bytes());
    }
    out.truncate(len);
    out
}

/// Copies a directory tree: the state directory as a crash would leave it on disk.
pub fn copy_tree(from: &std::path::Path, to: &std::path::Path) {
    std::fs::create_dir_all(to).unwrap();
    for e in std::fs::read_dir(from).unwrap() {
        let e = e.unwrap();
        let dst = to.join(e.file_name());
        if e.file_type().unwrap().is_dir() {
            copy_tree(&e.path(), &dst);
        } else {
            std::fs::copy(e.path(), dst).unwrap();
        }
    }
}
