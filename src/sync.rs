//! Locking without poison. A panic in one NFS request (a bug) must not turn every later request
//! that takes the same lock into a panic as well: the state behind these locks (maps, sets,
//! counters) stays consistent between statements, so the next holder carries on with it.
//!
//! And [`Bell`]: how one waiter sleeps until a condition that others make true may hold.

use std::sync::{Mutex, MutexGuard};

/// Rung by whoever may have made a condition true, for one waiter that sleeps until it holds
/// (the local syncer, until something is unsynced): no timer, no polling.
#[derive(Default)]
pub struct Bell(tokio::sync::Notify);

impl Bell {
    /// Wakes the waiter, or leaves it a permit if it is not waiting yet.
    pub fn ring(&self) {
        self.0.notify_one();
    }

    /// Returns once `holds` does (at once if it does now).
    pub async fn until(&self, holds: impl Fn() -> bool) {
        loop {
            // Armed before the check: a ring between the two leaves its permit for the wait.
            let rung = self.0.notified();
            if holds() {
                return;
            }
            rung.await;
        }
    }
}

pub trait LockExt<T> {
    /// `lock()`, taking over a lock whose last holder panicked.
    fn locked(&self) -> MutexGuard<'_, T>;
}

impl<T> LockExt<T> for Mutex<T> {
    fn locked(&self) -> MutexGuard<'_, T> {
        self.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_panic_while_holding_the_lock_does_not_poison_it_for_others() {
        let m = std::sync::Arc::new(Mutex::new(1));
        let m2 = m.clone();
        let _ = std::thread::spawn(move || {
            let _g = m2.locked();
            panic!("a bug in one request");
        })
        .join();
        assert!(m.is_poisoned());
        *m.locked() += 1;
        assert_eq!(*m.locked(), 2);
    }
}
