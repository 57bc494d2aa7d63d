//! How fresh the volume's picture of each directory is: when it was last listed from S3, and
//! which directories are being relisted in the background now. Memory only: after a restart,
//! every directory is listed again at its next access.

use std::collections::{HashMap, HashSet};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use crate::clock::Clock;
use crate::meta::Ino;
use crate::sync::LockExt;

/// Directories whose listing time is kept (see [`Freshness::note_listed`]).
pub const MAX_LISTED: usize = 65_536;

/// How long a subtree found too large to list at once is listed by directory before it is
/// tried again: a tree shrinks (`rm -r`, another client's deletions), and the listing by
/// directory cannot tell. A try that fails costs three LISTs per this long at most.
pub const TOO_LARGE_FOR: Duration = Duration::from_secs(15 * 60);

pub struct Freshness {
    listed: Mutex<HashMap<Ino, Instant>>,
    relisting: Mutex<HashSet<Ino>>,
    /// Directories whose subtree a listing found too large to list at once (see
    /// `Volume::list_subtree`), and when: listed by directory for [`TOO_LARGE_FOR`] from then.
    too_large: Mutex<HashMap<Ino, Instant>>,
    /// S3 refused a listing without a delimiter: every directory is listed on its own.
    subtrees_refused: AtomicBool,
    clock: Clock,
    refresh: Duration,
}

impl Freshness {
    pub fn new(clock: Clock, refresh: Duration) -> Freshness {
        Freshness {
            listed: Default::default(),
            relisting: Default::default(),
            too_large: Default::default(),
            subtrees_refused: AtomicBool::new(false),
            clock,
            refresh,
        }
    }

    /// Records when a directory was listed. At most [`MAX_LISTED`] directories are kept: past
    /// it, the stale entries go (a stale entry means what no entry means), then, if needed,
    /// arbitrary ones (those directories are listed again at their next access).
    pub fn note_listed(&self, dir: Ino, at: Instant) {
        let mut listed = self.listed.locked();
        listed.insert(dir, at);
        if listed.len() > MAX_LISTED {
            let (clock, refresh) = (&self.clock, self.refresh);
            listed.retain(|_, t| clock.elapsed(*t) < refresh);
            if listed.len() > MAX_LISTED / 2 {
                let excess: Vec<Ino> = listed.keys().copied().take(listed.len() - MAX_LISTED / 2).collect();
                for ino in excess {
                    listed.remove(&ino);
                }
            }
        }
    }

    /// Whether `dir`'s listing is older than the refresh interval (or there is none), as of
    /// the operation being served.
    pub fn stale(&self, dir: Ino) -> bool {
        match self.listed.locked().get(&dir) {
            Some(at) => self.clock.op_now().saturating_duration_since(*at) >= self.refresh,
            None => true,
        }
    }

    /// Whether `dir` was listed after `at` (a listing that started later).
    pub fn listed_since(&self, dir: Ino, at: Instant) -> bool {
        self.listed.locked().get(&dir).is_some_and(|t| *t > at)
    }

    pub fn ever_listed(&self, dir: Ino) -> bool {
        self.listed.locked().contains_key(&dir)
    }

    /// Forgets `dir` (removed): its number is not reused, the entry would only take room.
    pub fn forget(&self, dir: Ino) {
        self.listed.locked().remove(&dir);
        self.too_large.locked().remove(&dir);
    }

    /// Notes that S3 refused a listing without a delimiter; true the first time.
    pub fn refuse_subtrees(&self) -> bool {
        !self.subtrees_refused.swap(true, Ordering::Relaxed)
    }

    pub fn subtrees_refused(&self) -> bool {
        self.subtrees_refused.load(Ordering::Relaxed)
    }

    pub fn subtree_too_large(&self, dir: Ino) -> bool {
        let now = self.clock.now();
        let mut too_large = self.too_large.locked();
        match too_large.get(&dir) {
            Some(at) if now.saturating_duration_since(*at) < TOO_LARGE_FOR => true,
            Some(_) => {
                too_large.remove(&dir);
                false
            }
            None => false,
        }
    }

    /// Notes that `dir`'s subtree is too large to list at once. At most [`MAX_LISTED`] are
    /// kept; past it they are all forgotten, and each costs one more try.
    pub fn note_subtree_too_large(&self, dir: Ino) {
        let mut too_large = self.too_large.locked();
        if too_large.len() >= MAX_LISTED {
            too_large.clear();
        }
        too_large.insert(dir, self.clock.now());
    }

    /// Claims the relisting of `dir`; false when one is under way already.
    pub fn start_relisting(&self, dir: Ino) -> bool {
        self.relisting.locked().insert(dir)
    }

    pub fn end_relisting(&self, dir: Ino) {
        self.relisting.locked().remove(&dir);
    }
}
