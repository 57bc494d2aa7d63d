//! The keys S3 and the journal disagree about for a moment, which listings must not take at
//! S3's word:
//! - keys an upload is writing, from before its request until its result is in the journal: a
//!   listing in that window sees the object but not yet the journal entry that explains it;
//! - keys deleted while a listing was under way: a listing that started before a deletion may
//!   still show the object, and must not bring it back.
//!
//! The uploader writes both (through [`KeyLedger::writing_guard`] and
//! [`KeyLedger::note_deleted`]); the listing code only asks.

use std::collections::{BTreeMap, HashMap};
use std::sync::Mutex;
use std::time::Instant;

use crate::sync::LockExt;

pub(crate) struct KeyLedger {
    /// Keys being written, with how many writers each.
    in_flight: Mutex<HashMap<String, usize>>,
    recent_deletes: Mutex<RecentDeletes>,
    clock: crate::clock::Clock,
}

/// Keys deleted while a listing was under way, and when. Only deletions newer than the oldest
/// listing under way are kept, so the map holds what those listings can still see, not a
/// history.
#[derive(Default)]
struct RecentDeletes {
    /// Ordered by key, so that "anything under this prefix" is a range, not a scan.
    keys: BTreeMap<String, Instant>,
    /// Start times of the listings under way (a multiset).
    listings: BTreeMap<Instant, usize>,
    /// Size of `keys` after the last pruning.
    pruned_at: usize,
}

/// A listing under way; see [`KeyLedger::begin_listing`].
pub(crate) struct Listing<'a> {
    ledger: &'a KeyLedger,
    pub started: Instant,
}

impl Drop for Listing<'_> {
    fn drop(&mut self) {
        let mut d = self.ledger.recent_deletes.locked();
        if let Some(n) = d.listings.get_mut(&self.started) {
            *n -= 1;
            if *n == 0 {
                d.listings.remove(&self.started);
            }
        }
    }
}

/// Marks a key as being written for as long as it lives.
pub(crate) struct InFlight<'a> {
    ledger: &'a KeyLedger,
    key: String,
}

impl Drop for InFlight<'_> {
    fn drop(&mut self) {
        let mut f = self.ledger.in_flight.locked();
        if let Some(n) = f.get_mut(&self.key) {
            *n -= 1;
            if *n == 0 {
                f.remove(&self.key);
            }
        }
    }
}

impl KeyLedger {
    pub(crate) fn new(clock: crate::clock::Clock) -> KeyLedger {
        KeyLedger {
            in_flight: Mutex::new(HashMap::new()),
            recent_deletes: Mutex::new(RecentDeletes::default()),
            clock,
        }
    }

    /// Marks the start of a listing: deletions from now on until the returned guard is dropped
    /// are remembered for [`KeyLedger::deleted_since`].
    pub(crate) fn begin_listing(&self) -> Listing<'_> {
        let started = self.clock.now();
        *self.recent_deletes.locked().listings.entry(started).or_insert(0) += 1;
        Listing { ledger: self, started }
    }

    /// Whether `key` (or, for a directory prefix, anything under it) was deleted after `since`.
    pub(crate) fn deleted_since(&self, key: &str, is_prefix: bool, since: Instant) -> bool {
        let d = self.recent_deletes.locked();
        if is_prefix {
            d.keys
                .range::<str, _>((std::ops::Bound::Included(key), std::ops::Bound::Unbounded))
                .take_while(|(k, _)| k.starts_with(key))
                .any(|(_, t)| *t >= since)
        } else {
            d.keys.get(key).is_some_and(|t| *t >= since)
        }
    }

    /// Records that `key` was deleted from S3 now.
    pub(crate) fn note_deleted(&self, key: &str) {
        let now = self.clock.now();
        let mut d = self.recent_deletes.locked();
        let Some(oldest) = d.listings.keys().next().copied() else {
            // No listing is under way, and one that starts later cannot show the object.
            d.keys.clear();
            return;
        };
        // Entries older than every listing under way are no longer needed. Pruned in batches,
        // so the cost per deletion stays constant.
        if d.keys.len() >= d.pruned_at.max(1024) * 2 {
            d.keys.retain(|_, t| *t >= oldest);
            d.pruned_at = d.keys.len();
        }
        d.keys.insert(key.to_string(), now);
    }

    /// Marks `key` as being written until the guard is dropped.
    pub(crate) fn writing_guard(&self, key: &str) -> InFlight<'_> {
        *self.in_flight.locked().entry(key.to_string()).or_default() += 1;
        InFlight {
            ledger: self,
            key: key.to_string(),
        }
    }

    /// Whether an upload is writing `key` (or, for a directory prefix, anything under it).
    pub(crate) fn writing(&self, key: &str, is_prefix: bool) -> bool {
        let f = self.in_flight.locked();
        if is_prefix {
            f.keys().any(|k| k.starts_with(key))
        } else {
            f.contains_key(key)
        }
    }

    #[cfg(test)]
    fn recent_deletes_len(&self) -> usize {
        self.recent_deletes.locked().keys.len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::clock::Clock;
    use std::time::Duration;

    /// Deletions are remembered only as long as a listing that started before them runs, so the
    /// map stays bounded by what listings can still see, however many files are deleted.
    #[test]
    fn recent_deletes_outlive_only_the_listings_that_can_see_them() {
        let clock = Clock::manual();
        let f = KeyLedger::new(clock.clone());
        for i in 0..10_000 {
            f.note_deleted(&format!("idle/{i}"));
        }
        assert_eq!(f.recent_deletes_len(), 0, "kept with no listing under way");

        let old = f.begin_listing();
        clock.advance(Duration::from_secs(1));
        f.note_deleted("d/a");
        assert!(f.deleted_since("d/a", false, old.started));
        assert!(f.deleted_since("d/", true, old.started));
        assert!(!f.deleted_since("e/", true, old.started));
        clock.advance(Duration::from_secs(1));
        let young = f.begin_listing();
        assert!(
            !f.deleted_since("d/a", false, young.started),
            "deleted before the listing began"
        );
        drop(old);
        clock.advance(Duration::from_secs(1));
        for i in 0..100_000 {
            f.note_deleted(&format!("busy/{i}"));
        }
        // Every one of them is newer than `young`, so all stay while it runs...
        assert!(f.deleted_since("busy/99999", false, young.started));
        drop(young);
        // ... and the first deletion after it ends lets them all go.
        f.note_deleted("last");
        assert_eq!(f.recent_deletes_len(), 0);
    }
}
