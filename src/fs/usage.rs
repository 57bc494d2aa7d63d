//! What a volume holds against its capacity: the figures behind FSSTAT (`df`), CSI's
//! NodeGetVolumeStats, and the ENOSPC of a write past the capacity.
//!
//! Bytes are the logical sizes of the volume's files (what `ls -l` adds up to), not what S3
//! bills: that is what a user compares with the PVC's size. Exact counting at every namespace
//! change would put a read of the old size on every path that changes one (remove, rename over a
//! file, truncate, a relisting that finds an object changed by another tool). Instead:
//! - a full count from the metadata at open, and again at most every [`RECOUNT_INTERVAL`] once
//!   something changed (the flusher's tick drives it);
//! - growth by writes and truncates is added at once, so the capacity check on the write path is
//!   never behind: a write that would pass the capacity gets ENOSPC before a byte is staged.
//!
//! So `df` may show space freed by a removal a few seconds late, and a write right after a large
//! removal may still get ENOSPC until the next count. Never the other way round.

use crate::sync::LockExt;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Mutex;
use std::time::{Duration, Instant};

/// How often at most the volume's usage is counted again from its metadata.
pub const RECOUNT_INTERVAL: Duration = Duration::from_secs(2);

/// Reported as the size of a volume without a capacity: 1 PiB, as big as `df` shows nicely.
pub const UNLIMITED: u64 = 1 << 50;
/// File slots reported: S3 has no inode table; 2^32 keeps 32-bit `statfs` callers happy.
pub const FILE_SLOTS: u64 = 1 << 32;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct UsageSnapshot {
    /// The volume's capacity in bytes, or [`UNLIMITED`].
    pub capacity: u64,
    pub used_bytes: u64,
    pub files: u64,
}

impl UsageSnapshot {
    /// Whether the volume has a capacity (a CSI volume), not [`UNLIMITED`].
    pub fn limited(&self) -> bool {
        self.capacity < UNLIMITED
    }

    pub fn free_bytes(&self) -> u64 {
        self.capacity.saturating_sub(self.used_bytes)
    }
    pub fn free_files(&self) -> u64 {
        FILE_SLOTS.saturating_sub(self.files)
    }
}

pub struct Usage {
    /// 0: no capacity set.
    capacity: AtomicU64,
    bytes: AtomicU64,
    files: AtomicU64,
    changed: AtomicBool,
    last_count: Mutex<Instant>,
    clock: crate::clock::Clock,
}

impl Usage {
    pub fn new(capacity: Option<u64>, clock: crate::clock::Clock) -> Usage {
        Usage {
            capacity: AtomicU64::new(capacity.unwrap_or(0)),
            bytes: AtomicU64::new(0),
            files: AtomicU64::new(0),
            changed: AtomicBool::new(true),
            last_count: Mutex::new(clock.now()),
            clock,
        }
    }

    pub fn capacity(&self) -> Option<u64> {
        match self.capacity.load(Ordering::Acquire) {
            0 => None,
            c => Some(c),
        }
    }

    pub fn set_capacity(&self, capacity: Option<u64>) {
        self.capacity.store(capacity.unwrap_or(0), Ordering::Release);
    }

    pub fn snapshot(&self) -> UsageSnapshot {
        UsageSnapshot {
            capacity: self.capacity().unwrap_or(UNLIMITED),
            used_bytes: self.bytes.load(Ordering::Acquire),
            files: self.files.load(Ordering::Acquire),
        }
    }

    /// Refuses growth by `more` bytes that would pass the capacity.
    pub fn check_growth(&self, more: u64) -> Result<(), String> {
        let Some(cap) = self.capacity() else {
            return Ok(());
        };
        let used = self.bytes.load(Ordering::Acquire);
        if more > 0 && used.saturating_add(more) > cap {
            return Err(format!("volume capacity of {cap} bytes reached ({used} used)"));
        }
        Ok(())
    }

    /// Files grew by `more` bytes.
    pub fn grew(&self, more: u64) {
        if more > 0 {
            self.bytes.fetch_add(more, Ordering::AcqRel);
        }
    }

    /// A file, directory or other inode was created: counted at once (what `df -i` and
    /// `s3nfs status` show right after), exactly by the next count.
    pub fn created(&self) {
        self.files.fetch_add(1, Ordering::AcqRel);
        self.changed();
    }

    /// Something changed that the next count should see (a removal, a rename, a relisting).
    pub fn changed(&self) {
        self.changed.store(true, Ordering::Release);
    }

    /// Whether a count is due: something changed and the last count is old enough.
    pub fn count_due(&self) -> bool {
        self.changed.load(Ordering::Acquire) && self.clock.elapsed(*self.last_count.locked()) >= RECOUNT_INTERVAL
    }

    /// Takes the result of a full count. Call [`Usage::begin_count`] before counting.
    pub fn set_counted(&self, bytes: u64, files: u64) {
        self.bytes.store(bytes, Ordering::Release);
        self.files.store(files, Ordering::Release);
    }

    /// Marks the start of a count: changes from now on make the next one due.
    pub fn begin_count(&self) {
        self.changed.store(false, Ordering::Release);
        *self.last_count.locked() = self.clock.now();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn growth_past_the_capacity_is_refused_and_raising_it_allows_it() {
        let u = Usage::new(Some(1000), crate::clock::Clock::system());
        u.set_counted(900, 3);
        assert!(u.check_growth(100).is_ok());
        assert!(u.check_growth(101).is_err());
        u.grew(100);
        assert!(u.check_growth(1).is_err());
        assert!(u.check_growth(0).is_ok(), "rewriting in place needs no space");
        u.set_capacity(Some(2000));
        assert!(u.check_growth(1000).is_ok());
        assert_eq!(u.snapshot().free_bytes(), 1000);
        u.set_capacity(None);
        assert_eq!(u.snapshot().capacity, UNLIMITED);
    }

    #[test]
    fn a_count_is_due_after_a_change_once_the_interval_has_passed() {
        let clock = crate::clock::Clock::manual();
        let u = Usage::new(None, clock.clone());
        u.begin_count();
        u.changed();
        assert!(!u.count_due(), "due before the interval");
        clock.advance(RECOUNT_INTERVAL);
        assert!(u.count_due());
        u.begin_count();
        clock.advance(RECOUNT_INTERVAL);
        assert!(!u.count_due(), "due with nothing changed");
    }
}
