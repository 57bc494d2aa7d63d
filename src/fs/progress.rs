//! What a flush has left and its pace, sampled while it runs: `s3nfs flush` shows it, and the
//! final flush at shutdown logs it.

use std::sync::Mutex;
use std::time::{Duration, Instant};

use super::Volume;
use crate::sync::LockExt;

pub struct FlushProgress<'a> {
    vol: &'a Volume,
    start: Instant,
    uploaded_at_start: u64,
    /// The previous sample: when, and the bytes uploaded by then.
    last: Mutex<(Instant, u64)>,
}

#[derive(Debug, Clone, Copy)]
pub struct Progress {
    /// Files and deletions not yet in S3.
    pub files: u64,
    /// Bytes not yet in S3.
    pub bytes: u64,
    /// Upload rate since the previous sample.
    pub bytes_per_second: f64,
    /// Bytes uploaded since the flush began.
    pub uploaded: u64,
    pub elapsed: Duration,
}

impl<'a> FlushProgress<'a> {
    pub fn new(vol: &'a Volume) -> FlushProgress<'a> {
        // A measurement, on the real clock: a manual test clock does not move while S3 works.
        let now = crate::clock::stopwatch();
        let uploaded = vol.uploader.uploaded_bytes();
        FlushProgress {
            vol,
            start: now,
            uploaded_at_start: uploaded,
            last: Mutex::new((now, uploaded)),
        }
    }

    pub fn sample(&self) -> Progress {
        let now = crate::clock::stopwatch();
        let s = self.vol.stats();
        let (then, before) = std::mem::replace(&mut *self.last.locked(), (now, s.uploaded_bytes));
        let secs = now.duration_since(then).as_secs_f64();
        Progress {
            files: s.pending_inodes,
            bytes: s.dirty_bytes,
            bytes_per_second: if secs > 0.0 {
                s.uploaded_bytes.saturating_sub(before) as f64 / secs
            } else {
                0.0
            },
            uploaded: s.uploaded_bytes.saturating_sub(self.uploaded_at_start),
            elapsed: now.duration_since(self.start),
        }
    }
}
