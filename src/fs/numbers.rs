//! The numbers a volume hands out: inode numbers, and the change sequence that journal records
//! carry (an upload clears a record only if its sequence did not move while the upload ran).
//!
//! Both start past every number a previous run may have handed out. Inode numbers are taken
//! from the database in blocks ([`INO_BLOCK`]), so a create commits one counter update per
//! block, not per file; the unused rest of a block after a crash is simply skipped. Sequences
//! reserve 2^32 per run.

use std::sync::atomic::{AtomicU64, Ordering};

use crate::meta::{Batch, Ino, MetaDb, MetaResult, ROOT_INO};

pub const INO_BLOCK: u64 = 1024;

pub struct Numbers {
    next_ino: AtomicU64,
    /// The persisted `ino_limit` counter, kept here so allocation does not read the database.
    ino_limit: AtomicU64,
    next_seq: AtomicU64,
}

impl Numbers {
    /// Reads the persisted limits and raises them in `batch`, which the caller commits and
    /// syncs before handing out any number.
    pub fn open(meta: &MetaDb, batch: &mut Batch) -> MetaResult<Numbers> {
        let ino_base = meta.counter("ino_limit")?.max(ROOT_INO + 1);
        batch.set_counter("ino_limit", ino_base + INO_BLOCK);
        let seq_base = meta.counter("seq_limit")? + 1;
        batch.set_counter("seq_limit", seq_base + (1 << 32));
        Ok(Numbers {
            next_ino: AtomicU64::new(ino_base),
            ino_limit: AtomicU64::new(ino_base + INO_BLOCK),
            next_seq: AtomicU64::new(seq_base),
        })
    }

    /// A new inode number; raises the persisted limit in `batch` when a block is used up.
    /// Called under the volume's namespace lock, so reading and raising the limit do not race.
    pub fn ino(&self, batch: &mut Batch) -> Ino {
        let ino = self.next_ino.fetch_add(1, Ordering::AcqRel);
        if ino + 1 >= self.ino_limit.load(Ordering::Acquire) {
            let limit = ino + 1 + INO_BLOCK;
            batch.set_counter("ino_limit", limit);
            self.ino_limit.store(limit, Ordering::Release);
        }
        ino
    }

    pub fn seq(&self) -> u64 {
        self.next_seq.fetch_add(1, Ordering::AcqRel)
    }
}
