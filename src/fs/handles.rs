//! File handles that any gateway of a volume reproduces from S3 alone: the ReadWriteMany
//! owner's (`VolumeConfig::keyed_handles`).
//!
//! A handle is the volume id and an inode number. A single-node gateway numbers inodes in the
//! order it meets them and keeps the numbers in its journal. A new owner of a ReadWriteMany
//! volume starts with no journal, yet the kernels of other nodes still hold the handles the
//! previous owner gave out, and must not get ESTALE for files that are in S3. So there:
//! - the volume id comes from the CSI volume id, not from a random draw;
//! - an inode's number is a hash of the S3 key where it was first seen or created (the top
//!   bit set, so it can never be the root's 1 or a journal-allocated number);
//! - a handle this gateway does not know is looked for: the volume is walked from the root,
//!   listing each directory from S3 (which numbers its entries by the same rule), until the
//!   number shows up ([`Volume::find_lost`]).
//!
//! What a new owner does not reproduce: the handle of a file renamed after the old owner first
//! saw it (its number is its old key's hash, and the new owner hashes the new key), of a file
//! under a renamed directory, and of a file created where such a renamed file used to be (its
//! number moved one up to avoid the renamed one). Those answer ESTALE after a failover, and a
//! kernel looks the path up again on its next open. A file removed and created again under
//! the same key gets the same number, so a handle kept from before the removal finds the new
//! file instead of ESTALE.

use super::Volume;
use crate::meta::{Batch, Ino, Kind, ROOT_INO};

/// Keyed inode numbers have this bit set; journal-allocated ones never reach it.
const KEYED: u64 = 1 << 63;

/// FNV-1a, 64 bits: fixed by its definition, so every build and every node computes the
/// same number for a key.
fn fnv1a(key: &str) -> u64 {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for b in key.bytes() {
        h ^= b as u64;
        h = h.wrapping_mul(0x0000_0100_0000_01b3);
    }
    h
}

/// The volume id in the handles of a keyed volume named `name`: the same on every gateway.
pub fn keyed_volume_id(name: &str) -> u64 {
    fnv1a(name) | 1
}

impl Volume {
    /// Whether handles are keyed (a ReadWriteMany owner).
    pub fn keyed_handles(&self) -> bool {
        self.cfg.keyed_handles.is_some()
    }

    /// Whether the journal knows this inode now.
    pub fn knows(&self, ino: Ino) -> bool {
        matches!(self.meta.inode(ino), Ok(Some(_)))
    }

    /// A number for a new inode: from its key when handles are keyed and the key is known,
    /// else the next one of the journal's.
    pub(crate) fn alloc_ino_at(&self, batch: &mut Batch, key: impl FnOnce() -> Option<String>) -> Ino {
        if self.keyed_handles() {
            if let Some(k) = key() {
                let mut ino = fnv1a(&k) | KEYED;
                // Taken: a renamed inode keeps its number, or two keys collide.
                while self.knows(ino) {
                    ino = ino.wrapping_add(1) | KEYED;
                }
                return ino;
            }
        }
        self.alloc_ino(batch)
    }

    /// Looks for an inode another gateway of the volume numbered, by walking the volume from
    /// its root and listing every directory not listed yet. True if it is known now.
    pub async fn find_lost(&self, ino: Ino) -> bool {
        if !self.keyed_handles() || ino & KEYED == 0 {
            return self.knows(ino);
        }
        let mut last_miss = self.lost_search.lock().await;
        if self.knows(ino) {
            return true;
        }
        if last_miss.is_some_and(|t| self.cfg.clock.elapsed(t) < self.cfg.refresh) {
            return false;
        }
        let started = self.cfg.clock.now();
        let mut dirs = vec![ROOT_INO];
        let mut walked = 0usize;
        while let Some(d) = dirs.pop() {
            let Ok(dir) = self.inode(d) else { continue };
            if let Err(e) = self.refresh_dir(&dir, false).await {
                tracing::warn!(ino = d, error = %e, "looking for a lost handle: cannot list a directory");
                continue;
            }
            walked += 1;
            let mut after = 0;
            loop {
                let Ok(children) = self.meta.children(d, after, 1000) else {
                    break;
                };
                let Some(last) = children.last() else { break };
                after = last.0;
                for (c, _) in &children {
                    if *c == ino {
                        tracing::info!(
                            ino,
                            dirs = walked,
                            ms = self.cfg.clock.elapsed(started).as_millis() as u64,
                            "lost handle found"
                        );
                        return true;
                    }
                    if matches!(self.meta.inode(*c), Ok(Some(i)) if i.kind == Kind::Dir) {
                        dirs.push(*c);
                    }
                }
            }
        }
        tracing::info!(ino, dirs = walked, "lost handle not in the volume: stale");
        *last_miss = Some(self.cfg.clock.now());
        false
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fnv1a_is_the_published_function() {
        // The reference values of FNV-1a 64.
        assert_eq!(fnv1a(""), 0xcbf2_9ce4_8422_2325);
        assert_eq!(fnv1a("a"), 0xaf63_dc4c_8601_ec8c);
        assert_eq!(fnv1a("foobar"), 0x8594_4171_f739_67e8);
    }
}
