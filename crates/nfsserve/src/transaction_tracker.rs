use std::collections::{hash_map, HashMap, VecDeque};
use std::sync::Mutex;
use std::time::{Duration, Instant};

/// s3nfs patch: how long a request may stay in progress before it is forgotten (one whose
/// connection was closed under it never completes).
const MAX_IN_PROGRESS: Duration = Duration::from_secs(600);
/// s3nfs patch: transactions remembered at most; past it the oldest completed ones go first.
const MAX_TRACKED: usize = 1 << 16;

/// (xid, the client's address hashed). s3nfs patch: a hash in place of the address's text,
/// which each of the three places that hold a key (the map and both queues) allocated anew: the
/// tracker held about 16 MB at its cap of 65,536 transactions, and holds 6 MB now. Two clients
/// whose addresses hash alike (one chance in 2^64) and that use the same xid at once would see
/// one of their calls taken for the other's retransmission and answered late.
type Key = (u32, u64);

fn key(xid: u32, client_addr: &str) -> Key {
    use std::hash::{Hash, Hasher};
    let mut h = std::collections::hash_map::DefaultHasher::new();
    client_addr.hash(&mut h);
    (xid, h.finish())
}

/// `TransactionTracker` tracks the state of transactions to detect retransmissions.
///
/// s3nfs patch: 0.11.0 scanned the whole map on every request (`retain`), which made a burst of
/// requests quadratic (3% of the gateway's CPU creating 1,000 small files) and kept as many
/// entries as clients could send in the retention period. Expiry now pops from two queues in
/// time order (amortised constant work per request), and the map is capped.
pub struct TransactionTracker {
    retention_period: Duration,
    inner: Mutex<Inner>,
}

#[derive(Default)]
struct Inner {
    states: HashMap<Key, TransactionState>,
    /// (when it may be forgotten, key), in time order, for requests started and completed.
    started: VecDeque<(Instant, Key)>,
    completed: VecDeque<(Instant, Key)>,
}

impl TransactionTracker {
    pub fn new(retention_period: Duration) -> Self {
        Self {
            retention_period,
            inner: Mutex::new(Inner::default()),
        }
    }

    /// Checks if the transaction is a retransmission.
    /// If it's a new transaction, it is marked as `InProgress`.
    ///
    /// Returns `true` if the transaction is a retransmission, `false` otherwise.
    /// `now`: when the call arrived (s3nfs patch: the caller's one clock reading per call).
    pub fn is_retransmission(&self, xid: u32, client_addr: &str, now: Instant) -> bool {
        let key = key(xid, client_addr);
        let mut inner = self.inner.lock().unwrap_or_else(|p| p.into_inner());
        inner.housekeeping(now);
        match inner.states.entry(key) {
            hash_map::Entry::Vacant(e) => {
                e.insert(TransactionState::InProgress(now));
                inner.started.push_back((now + MAX_IN_PROGRESS, key));
                false
            }
            hash_map::Entry::Occupied(_) => true,
        }
    }

    /// Marks the transaction as processed. It is remembered for the retention period counted
    /// from `arrived`, when the call came in (no clock reading of its own).
    pub fn mark_processed(&self, xid: u32, client_addr: &str, arrived: Instant) {
        let key = key(xid, client_addr);
        let now = arrived;
        let mut inner = self.inner.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(tx) = inner.states.get_mut(&key) {
            *tx = TransactionState::Completed;
            inner.completed.push_back((now + self.retention_period, key));
        }
    }
}

impl Inner {
    fn housekeeping(&mut self, now: Instant) {
        while let Some((due, _)) = self.completed.front() {
            if *due > now && self.completed.len() < MAX_TRACKED {
                break;
            }
            let (_, key) = self.completed.pop_front().unwrap();
            self.states.remove(&key);
        }
        while let Some((due, _)) = self.started.front() {
            if *due > now && self.started.len() < MAX_TRACKED {
                break;
            }
            let (due, key) = self.started.pop_front().unwrap();
            // Only if it is still the same request, in progress since then.
            if let Some(TransactionState::InProgress(since)) = self.states.get(&key) {
                if *since + MAX_IN_PROGRESS == due {
                    self.states.remove(&key);
                }
            }
        }
    }
}

pub enum TransactionState {
    InProgress(Instant),
    Completed,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_retransmission_is_caught_until_the_retention_passes_and_the_map_stays_bounded() {
        let t = TransactionTracker::new(Duration::from_secs(60));
        let now = Instant::now();
        assert!(!t.is_retransmission(1, "a", now));
        assert!(t.is_retransmission(1, "a", now), "in progress");
        t.mark_processed(1, "a", now);
        assert!(
            t.is_retransmission(1, "a", now + Duration::from_secs(59)),
            "completed lately"
        );
        assert!(
            !t.is_retransmission(1, "a", now + Duration::from_secs(61)),
            "retention passed"
        );
        assert!(!t.is_retransmission(1, "b", now), "another client");
        for xid in 0..3 * MAX_TRACKED as u32 {
            assert!(!t.is_retransmission(xid + 10, "c", now));
            t.mark_processed(xid + 10, "c", now);
        }
        let inner = t.inner.lock().unwrap();
        assert!(inner.states.len() <= MAX_TRACKED);
        assert!(inner.started.len() <= MAX_TRACKED && inner.completed.len() <= MAX_TRACKED);
    }
}
