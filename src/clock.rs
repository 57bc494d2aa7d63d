//! The volume's time source: the flush delay, the refresh interval, the usage recount and every
//! back-off read it from here, never from `Instant::now()` or `tokio::time` directly.
//!
//! In production it is the monotonic system clock. Tests use [`Clock::manual`]: time stands
//! still until the test calls [`Clock::advance`], and [`Clock::until_sleeping`] tells the test
//! when a background task has gone to sleep (and for how long), so a test of time-based
//! behaviour waits for no real timer and cannot race one. (tokio's paused time was not enough:
//! it advances by itself whenever the runtime idles, which is all the time while a real S3
//! request is in flight.)
//!
//! Latencies reported in metrics and traces stay on the real clock: they measure, not decide.
//!
//! One NFS operation reads the clock once, when it arrives ([`in_op`]): within it,
//! [`Clock::op_now`] and [`wall_now`] answer from that reading. Where a system call is a
//! trap into a hypervisor (no vDSO, as under user-mode-linux and on some virtual machines), a
//! clock reading costs as much as any other system call, and a small-file create used to read
//! the clock about 30 times. Only decisions that tolerate the operation's own age (a listing's
//! freshness, the time of the last write, timestamps) use the operation's time; sleeps and
//! back-offs always read the real clock.

// The one module that reads the system's clocks.
#![allow(clippy::disallowed_methods)]

use std::cell::OnceCell;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime};

use tokio::sync::watch;

use crate::sync::LockExt;

#[derive(Clone, Default)]
pub struct Clock(Option<Arc<Manual>>);

struct Manual {
    base: Instant,
    /// How far the test has moved time; sleepers watch it.
    offset: watch::Sender<Duration>,
    /// Deadlines of the sleeps in progress, with a change counter for `until_sleeping`.
    sleepers: Mutex<Vec<(u64, Instant)>>,
    sleepers_changed: watch::Sender<u64>,
}

impl std::fmt::Debug for Clock {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(if self.0.is_some() {
            "Clock::manual"
        } else {
            "Clock::system"
        })
    }
}

/// The time of the NFS operation being served: its arrival, and the wall-clock time read (at
/// most once) when the operation first needs one.
struct OpTime {
    arrived: Instant,
    wall: OnceCell<SystemTime>,
}

tokio::task_local! {
    static OP_TIME: OpTime;
}

/// Runs one operation with `arrived` as its time (see the module's comment).
pub async fn in_op<F: std::future::Future>(arrived: Instant, f: F) -> F::Output {
    OP_TIME
        .scope(
            OpTime {
                arrived,
                wall: OnceCell::new(),
            },
            f,
        )
        .await
}

/// Wall-clock time: the operation's, within one (every timestamp an operation sets is the same,
/// as on a local filesystem), or read now outside any.
pub fn wall_now() -> SystemTime {
    OP_TIME
        .try_with(|t| *t.wall.get_or_init(|| wall_at(t.arrived)))
        .unwrap_or_else(|_| SystemTime::now())
}

/// A monotonic reading to measure with (latencies in metrics and traces, what a sync cost),
/// never to decide by: decisions read a volume's [`Clock`], which tests move by hand.
pub fn stopwatch() -> Instant {
    Instant::now()
}

/// How old the pairing of the two clocks that [`wall_at`] derives from may get: a step of the
/// system clock (not a slew, which both follow) shows in timestamps within this.
const ANCHOR_AGE: Duration = Duration::from_secs(1);

/// The wall-clock time at monotonic instant `at`, derived from a pairing of the two clocks
/// read at most once per [`ANCHOR_AGE`]: one clock reading per second instead of one per
/// operation.
fn wall_at(at: Instant) -> SystemTime {
    static ANCHOR: Mutex<Option<(Instant, SystemTime)>> = Mutex::new(None);
    let mut anchor = ANCHOR.locked();
    match *anchor {
        Some((mono, wall)) if at >= mono && at - mono < ANCHOR_AGE => wall + (at - mono),
        _ => {
            // `at` is when the operation arrived, a moment ago: pair it with the wall clock now.
            let wall = SystemTime::now();
            *anchor = Some((at, wall));
            wall
        }
    }
}

impl Clock {
    pub fn system() -> Clock {
        Clock(None)
    }

    /// A clock that moves only when told to ([`Clock::advance`]). Clones share it.
    pub fn manual() -> Clock {
        Clock(Some(Arc::new(Manual {
            base: Instant::now(),
            offset: watch::channel(Duration::ZERO).0,
            sleepers: Mutex::new(Vec::new()),
            sleepers_changed: watch::channel(0).0,
        })))
    }

    pub fn now(&self) -> Instant {
        match &self.0 {
            None => Instant::now(),
            Some(m) => m.base + *m.offset.borrow(),
        }
    }

    /// Now, or within an NFS operation on the system clock, when that operation arrived (see the
    /// module's comment): for decisions that tolerate the operation's age, never for sleeps or
    /// for measuring how long something within the operation took.
    pub fn op_now(&self) -> Instant {
        match &self.0 {
            None => OP_TIME.try_with(|t| t.arrived).unwrap_or_else(|_| Instant::now()),
            Some(_) => self.now(),
        }
    }

    pub fn elapsed(&self, since: Instant) -> Duration {
        self.now().saturating_duration_since(since)
    }

    pub async fn sleep(&self, d: Duration) {
        self.sleep_until(self.now() + d).await
    }

    pub async fn sleep_until(&self, deadline: Instant) {
        let Some(m) = &self.0 else {
            return tokio::time::sleep_until(deadline.into()).await;
        };
        let mut offset = m.offset.subscribe();
        let _registered = m.register(deadline);
        while m.base + *offset.borrow_and_update() < deadline {
            if offset.changed().await.is_err() {
                return std::future::pending().await;
            }
        }
    }

    /// Moves a manual clock forward, waking the sleeps that are due. Panics on the system clock.
    pub fn advance(&self, d: Duration) {
        let m = self.0.as_ref().expect("advance() needs a manual clock");
        m.offset.send_modify(|o| *o += d);
    }

    /// Waits until the sleeps in progress on a manual clock, as time left to each, satisfy
    /// `pred`; returns them. This is how a test knows that a background task has finished its
    /// step and is waiting for time to pass.
    pub async fn until_sleeping(&self, mut pred: impl FnMut(&[Duration]) -> bool) -> Vec<Duration> {
        let m = self.0.as_ref().expect("until_sleeping() needs a manual clock");
        let mut changed = m.sleepers_changed.subscribe();
        loop {
            changed.borrow_and_update();
            let now = self.now();
            let mut left: Vec<Duration> = m
                .sleepers
                .locked()
                .iter()
                .map(|(_, d)| d.saturating_duration_since(now))
                .collect();
            left.sort();
            if pred(&left) {
                return left;
            }
            // The clock moving changes what is left, too.
            let mut offset = m.offset.subscribe();
            tokio::select! {
                r = changed.changed() => { let _ = r; }
                r = offset.changed() => { let _ = r; }
            }
        }
    }
}

impl Manual {
    fn register(self: &Arc<Self>, deadline: Instant) -> Registered {
        static NEXT: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
        let id = NEXT.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        self.sleepers.locked().push((id, deadline));
        self.sleepers_changed.send_modify(|n| *n += 1);
        Registered { m: self.clone(), id }
    }
}

/// Removes a sleep from the list when it ends or is dropped (a `select!` that took another arm).
struct Registered {
    m: Arc<Manual>,
    id: u64,
}

impl Drop for Registered {
    fn drop(&mut self) {
        self.m.sleepers.locked().retain(|(id, _)| *id != self.id);
        self.m.sleepers_changed.send_modify(|n| *n += 1);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn a_manual_sleep_ends_when_time_is_advanced_past_it_and_not_before() {
        let clock = Clock::manual();
        let start = clock.now();
        let c = clock.clone();
        let sleeper = tokio::spawn(async move { c.sleep(Duration::from_secs(10)).await });
        assert_eq!(
            clock.until_sleeping(|s| !s.is_empty()).await,
            vec![Duration::from_secs(10)]
        );
        clock.advance(Duration::from_secs(9));
        assert_eq!(
            clock.until_sleeping(|s| s == [Duration::from_secs(1)]).await.len(),
            1,
            "the sleep ended early"
        );
        assert!(!sleeper.is_finished());
        clock.advance(Duration::from_secs(1));
        sleeper.await.unwrap();
        assert!(clock.until_sleeping(|s| s.is_empty()).await.is_empty());
        assert_eq!(clock.elapsed(start), Duration::from_secs(10));
    }

    #[tokio::test]
    async fn within_an_operation_time_is_its_arrival_and_outside_it_is_read() {
        let clock = Clock::system();
        let arrived = Instant::now() - Duration::from_secs(5);
        let (op, wall) = in_op(arrived, async {
            let wall = wall_now();
            tokio::task::yield_now().await;
            assert_eq!(wall_now(), wall, "one wall-clock reading per operation");
            (clock.op_now(), wall)
        })
        .await;
        assert_eq!(op, arrived);
        assert!(
            clock.op_now() >= arrived + Duration::from_secs(5),
            "outside: the real clock"
        );
        assert!(wall_now() >= wall);
        // A manual clock is never bypassed.
        let manual = Clock::manual();
        assert_eq!(in_op(arrived, async { manual.op_now() }).await, manual.now());
    }

    #[tokio::test]
    async fn a_dropped_sleep_is_no_longer_listed() {
        let clock = Clock::manual();
        let c = clock.clone();
        let sleeper = tokio::spawn(async move { c.sleep(Duration::from_secs(1)).await });
        clock.until_sleeping(|s| s.len() == 1).await;
        sleeper.abort();
        let _ = sleeper.await;
        assert!(clock.until_sleeping(|s| s.is_empty()).await.is_empty());
    }
}
