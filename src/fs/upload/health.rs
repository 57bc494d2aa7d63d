//! What the uploader tells an operator (`s3nfs status`, metrics, alerts): the last S3 error
//! and when, the last upload, and since when the volume has held work not in S3.
//!
//! "Since when" is the end of the last round that found nothing pending: a bound on the age of
//! the oldest pending change that costs nothing per write (rounds run every tick anyway).

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Mutex;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use crate::sync::LockExt;

pub struct Health {
    last_error: Mutex<Option<(String, SystemTime)>>,
    /// Milliseconds since the epoch of the last upload; 0 before any.
    last_upload_ms: AtomicU64,
    /// When a round last found nothing pending (volume clock).
    clean_at: Mutex<Instant>,
}

impl Health {
    pub fn new(now: Instant) -> Health {
        Health {
            last_error: Mutex::new(None),
            last_upload_ms: AtomicU64::new(0),
            clean_at: Mutex::new(now),
        }
    }

    pub(crate) fn failed(&self, e: &dyn std::fmt::Display) {
        *self.last_error.locked() = Some((e.to_string(), crate::clock::wall_now()));
    }

    pub(crate) fn uploaded(&self) {
        let ms = crate::clock::wall_now()
            .duration_since(UNIX_EPOCH)
            .map_or(0, |d| d.as_millis() as u64);
        self.last_upload_ms.store(ms, Ordering::Relaxed);
    }

    /// A round ended with nothing pending at `now`.
    pub(crate) fn clean(&self, now: Instant) {
        *self.clean_at.locked() = now;
    }

    pub fn last_error(&self) -> Option<(String, SystemTime)> {
        self.last_error.locked().clone()
    }

    pub fn last_upload(&self) -> Option<SystemTime> {
        match self.last_upload_ms.load(Ordering::Relaxed) {
            0 => None,
            ms => Some(UNIX_EPOCH + Duration::from_millis(ms)),
        }
    }

    /// How long the volume has held work not in S3, given that it holds some at `now`.
    pub fn pending_for(&self, now: Instant) -> Duration {
        now.saturating_duration_since(*self.clean_at.locked())
    }
}
