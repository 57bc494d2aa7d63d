//! A random reader of a file only S3 has: its READs are ranged GETs of their own (see
//! `read.rs`) for as long as those cost less than having the file, then the file is staged and
//! they are served from the copy.
//!
//! Ranged GETs are right for a few reads of a big file, and wrong for a database or an index
//! read all over: fio's random 4 KiB reads of a cold 128 MiB file made 491 GETs, where the FUSE
//! peers, which fetch whole files, made 13 to 50. The rule is the ski-rental one: once a file's
//! own GETs are as many as fetching it whole takes (its size in read chunks), it is staged, so a
//! reader never makes more than about twice the GETs of either way alone. A file from
//! `sparse_from` on is staged with holes (`holes.rs`): each part comes when a READ first touches
//! it, and parts never read are never fetched.
//!
//! The copy holds nothing S3 lacks, so it is never uploaded, and it counts against
//! `max_staged_clean_bytes` with the copies S3 already holds: only a file up to half of that
//! is staged for its readers (a larger one would push out the others, or itself, while it is
//! read), and only with twice its size free on the staging disk.

use super::*;
use crate::meta::Remote;

/// Whether a file of `size` bytes, whose READs made `ranged` GETs of their own so far, is better
/// staged: those GETs are as many as fetching it whole in chunks of `chunk` takes, and it fits
/// the bound on clean copies (`max_clean`) and the disk (`free`).
pub(super) fn worth_staging(size: u64, ranged: u32, chunk: u64, max_clean: u64, free: Option<u64>) -> bool {
    let whole = size.div_ceil(chunk.max(1)).max(2);
    u64::from(ranged) >= whole && size <= max_clean / 2 && free.is_some_and(|f| f / 2 >= size)
}

impl Volume {
    /// Stages `ino` (version `remote`) for its random reader if [`worth_staging`] says so;
    /// whether reads should look for the copy now. A download not done within `stage_wait` is
    /// [`FsError::Retry`], as for a write. Should staging fail otherwise (a full disk, an S3
    /// error), the reader goes on with ranged GETs and the count starts over.
    pub(super) async fn stage_for_random_reader(&self, ino: Ino, remote: &Remote) -> FsResult<bool> {
        let ranged = self.cache.ranged_reads(ino);
        if ranged == 0 {
            return Ok(false);
        }
        let free = self.staging.disk_free();
        if !worth_staging(
            remote.size,
            ranged,
            self.cfg.read_chunk,
            self.cfg.max_staged_clean_bytes,
            free,
        ) {
            return Ok(false);
        }
        // Room first, among the copies S3 already holds.
        self.trim_staged(true);
        self.cache.reset_ranged_reads(ino);
        match self.stage(ino, false).await {
            Ok(_) => {
                tracing::debug!(ino, ranged, size = remote.size, "staged for a random reader");
                Ok(true)
            }
            Err(e @ FsError::Retry(_)) => Err(e),
            Err(e) => {
                tracing::warn!(ino, error = %e, "could not stage a file for its random reader; reading ranges from S3");
                Ok(false)
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::worth_staging;

    const MIB: u64 = 1 << 20;

    #[test]
    fn a_file_is_staged_once_its_ranged_gets_match_a_whole_fetch_and_it_fits() {
        let free = Some(100 << 30);
        // 128 MiB in 4 MiB chunks: 32 GETs whole.
        assert!(!worth_staging(128 * MIB, 31, 4 * MIB, 1 << 30, free));
        assert!(worth_staging(128 * MIB, 32, 4 * MIB, 1 << 30, free));
        // A file of one chunk still waits for two reads: one may be all there is.
        assert!(!worth_staging(MIB, 1, 4 * MIB, 1 << 30, free));
        assert!(worth_staging(MIB, 2, 4 * MIB, 1 << 30, free));
        // Over half the bound on clean copies: never.
        assert!(!worth_staging(600 * MIB, u32::MAX, 4 * MIB, 1 << 30, free));
        // Without twice its size free on the disk, or when that is unknown: never.
        assert!(!worth_staging(128 * MIB, 32, 4 * MIB, 1 << 30, Some(255 * MIB)));
        assert!(worth_staging(128 * MIB, 32, 4 * MIB, 1 << 30, Some(256 * MIB)));
        assert!(!worth_staging(128 * MIB, 32, 4 * MIB, 1 << 30, None));
    }
}
