//! Locking without poison. A panic in one NFS request (a bug) must not turn every later request
//! that takes the same lock into a panic as well: the state behind these locks (maps, sets,
//! counters) stays consistent between statements, so the next holder carries on with it.

use std::sync::{Mutex, MutexGuard};

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
