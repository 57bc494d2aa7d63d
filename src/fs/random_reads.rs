//! A random reader of a file only S3 has: its READs are ranged GETs of their own (see
//! `read.rs`) for as long as those cost less than having the file, then the file is staged and
//! they are served from the copy.
//!
//! Ranged GETs are right for a few reads of a big file, and wrong for a database or an index
//! read all over: fio's random 4 KiB reads of a cold 128 MiB file made 491 GETs, where the FUSE
//! peers, which fetch whole files, made 13 to 50. The rule is the ski-rental one: once a file's
//! own GETs are as many as fetching it takes (one GET per part, each streamed to disk), it is
//! staged, so a reader never makes more than about twice the GETs of either way alone. A file
//! from `sparse_from` on is staged with holes (`holes.rs`): each part comes in one GET when a
//! READ first touches it, and parts never read are never fetched, so from then on a READ costs
//! at most the one GET it would have cost anyway. A smaller file comes whole, in one GET.
//!
//! The copy holds nothing S3 lacks, so it is never uploaded, and it counts against
//! `max_staged_clean_bytes` with the copies S3 already holds: only a file up to half of that
//! is staged for its readers (a larger one would push out the others, or itself, while it is
//! read), and only with twice its size free on the staging disk.

use super::*;
use crate::meta::Remote;

/// Whether a file of `size` bytes, whose READs made `ranged` GETs of their own so far, is due
/// to be staged: those GETs are as many as it has parts of `part` bytes (at least two: one read
/// may be all there is), and it fits the bound on clean copies (`max_clean`).
pub(super) fn due(size: u64, ranged: u32, part: u64, max_clean: u64) -> bool {
    let whole = size.div_ceil(part.max(1)).max(2);
    u64::from(ranged) >= whole && size <= max_clean / 2
}

/// Whether the staging disk, with `free` bytes (if known), has room for a copy of `size`.
pub(super) fn room(size: u64, free: Option<u64>) -> bool {
    free.is_some_and(|f| f / 2 >= size)
}

impl Volume {
    /// Starts staging `ino` (version `remote`) for its random reader if it is [`due`] and there
    /// is [`room`]. Not waited for: the READ that found it due is answered by its own ranged GET,
    /// and those after it read the copy once it is there (a large file's copy with holes at
    /// once; a smaller one once it is fetched whole). Should staging fail (a full disk, S3), the
    /// reader goes on with ranged GETs, and the count starts over.
    pub(super) fn stage_for_random_reader(&self, ino: Ino, remote: &Remote) {
        let ranged = self.cache.ranged_reads(ino);
        if !due(remote.size, ranged, self.cfg.part_size, self.cfg.max_staged_clean_bytes) {
            return;
        }
        // From here the count starts over, whatever happens: the disk is asked (a system call)
        // once per count, not at every READ while it has no room.
        self.cache.reset_ranged_reads(ino);
        if !room(remote.size, self.staging.disk_free()) {
            return;
        }
        // Room first, among the copies S3 already holds.
        self.trim_staged(true);
        let core = self.core.clone();
        let size = remote.size;
        self.spawn_background("staging for a random reader", async move {
            // The fetch is a job of its own (`Core::stage`): a wait that ends first (a slow
            // fetch, told to retry) leaves it running.
            match core.stage(ino, false).await {
                Ok(_) => tracing::debug!(ino, ranged, size, "staged for a random reader"),
                // Still coming, or the file went meanwhile.
                Err(FsError::Retry(_) | FsError::NotFound | FsError::Stale) => {}
                Err(e) => {
                    tracing::warn!(ino, error = %e, "could not stage a file for its random reader; reading ranges from S3")
                }
            }
        });
    }
}

#[cfg(test)]
mod tests {
    use super::{due, room};

    const MIB: u64 = 1 << 20;

    #[test]
    fn a_file_is_staged_once_its_ranged_gets_match_a_whole_fetch_and_it_fits() {
        // 128 MiB in 16 MiB parts: 8 GETs whole.
        assert!(!due(128 * MIB, 7, 16 * MIB, 1 << 30));
        assert!(due(128 * MIB, 8, 16 * MIB, 1 << 30));
        // A file of one part still waits for two reads: one may be all there is.
        assert!(!due(MIB, 1, 16 * MIB, 1 << 30));
        assert!(due(MIB, 2, 16 * MIB, 1 << 30));
        // Over half the bound on clean copies: never.
        assert!(!due(600 * MIB, u32::MAX, 16 * MIB, 1 << 30));
        // Twice its size free on the disk, known.
        assert!(!room(128 * MIB, Some(255 * MIB)));
        assert!(room(128 * MIB, Some(256 * MIB)));
        assert!(!room(128 * MIB, None));
    }
}
