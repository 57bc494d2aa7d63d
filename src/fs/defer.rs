//! When background uploads wait for the clients: the busy-client deferral policy.
//!
//! An upload costs CPU on the node (the request, and all of the S3 server's work when it runs
//! on the node too, as a local MinIO does), and the clients' operations wait behind it.
//! Measured in the benchmark guest, where Garage shares the CPU: an untar of 1,195 files took
//! 10 s with uploads interleaved and 5.7 s with them after it, and the files were in S3 no
//! later. The wait is bounded, so a volume that is never quiet still uploads.

use std::sync::Mutex;
use std::time::{Duration, Instant};

use crate::sync::LockExt;

/// How long the volume must go without an NFS operation to count as quiet (or a quarter of the
/// flush delay, if that is shorter).
pub const QUIET: Duration = Duration::from_millis(500);
/// How long uploads and deletions that are due wait for a quiet volume, at most, by default
/// (`VolumeConfig::busy_defer`): past this in one busy stretch, they run alongside the clients'
/// operations.
pub const MAX_DEFER: Duration = Duration::from_secs(10);

/// When clients last sent an operation, and since when they have been busy without a quiet
/// pause.
#[derive(Default)]
pub(crate) struct BusyClients {
    activity: Mutex<Activity>,
}

#[derive(Default)]
struct Activity {
    last: Option<Instant>,
    busy_since: Option<Instant>,
}

impl BusyClients {
    /// An NFS operation arrived at `at`; a gap of `quiet` or more since the last one starts a
    /// new busy stretch.
    pub(crate) fn note_activity(&self, at: Instant, quiet: Duration) {
        let mut a = self.activity.locked();
        if a.last.is_none_or(|l| at.saturating_duration_since(l) >= quiet) {
            a.busy_since = Some(at);
        }
        if a.last.is_none_or(|l| at > l) {
            a.last = Some(at);
        }
    }

    /// Whether background uploads and deletions that are due should wait: clients sent an
    /// operation within `quiet` of `now`, and have not been busy for `max` already.
    pub(crate) fn defers(&self, now: Instant, quiet: Duration, max: Duration) -> bool {
        let a = self.activity.locked();
        match (a.last, a.busy_since) {
            (Some(last), Some(since)) => {
                now.saturating_duration_since(last) < quiet && now.saturating_duration_since(since) < max
            }
            _ => false,
        }
    }
}
