//! Background work under an owner: nothing in `src/` starts a task that nobody stops.
//!
//! - [`Tasks`] is the owner of a volume's background work: the uploader's rounds, the local
//!   sync ticker, relistings, streaming uploads, read-ahead and staging downloads. Each is
//!   started here, told to stop here ([`Tasks::stopping`]), awaited here ([`Tasks::stop`]) and
//!   aborted here when the volume is dropped without a close, as a crash would. The first
//!   failure, an error a task reports or a panic, is recorded ([`Tasks::failure`]) instead of
//!   being lost in a detached task.
//! - [`Owned`] is one task whose life is one value's: a ReadWriteMany member's campaign, an
//!   owner term's cross-node port, the metrics server of a process. Dropping the handle aborts
//!   the task.
//!
//! `tokio::spawn` and `std::thread::spawn` are refused by clippy (`clippy.toml`) everywhere
//! else, so a new background task has to pick one of the two.

use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};

use tokio::sync::{watch, Notify};
use tokio::task::{JoinError, JoinHandle, JoinSet};

use crate::sync::LockExt;

/// The owner of a volume's background work (see the module docs).
pub struct Tasks {
    set: Mutex<JoinSet<()>>,
    running: Arc<Running>,
    stop: watch::Sender<bool>,
    failure: Arc<Mutex<Option<String>>>,
}

/// How many tasks have not ended, jobs and loops apart, and a wake-up for those waiting.
#[derive(Default)]
struct Running {
    jobs: AtomicUsize,
    loops: AtomicUsize,
    changed: Notify,
}

impl Running {
    fn count(&self, kind: Kind) -> &AtomicUsize {
        match kind {
            Kind::Job => &self.jobs,
            Kind::Loop => &self.loops,
        }
    }
}

/// A job is work with an end (a relisting, a streaming upload, a read-ahead); a loop runs until
/// told to stop (the uploader's rounds, the sync ticker).
#[derive(Clone, Copy)]
enum Kind {
    Job,
    Loop,
}

/// Held by a running task; its drop (the task's end, abort or panic) counts the task out.
struct Ticket {
    running: Arc<Running>,
    failure: Arc<Mutex<Option<String>>>,
    what: &'static str,
    kind: Kind,
}

impl Drop for Ticket {
    fn drop(&mut self) {
        if std::thread::panicking() {
            record(&self.failure, format!("{}: panicked", self.what));
        }
        if self.running.count(self.kind).fetch_sub(1, Ordering::AcqRel) == 1 {
            self.running.changed.notify_waiters();
        }
    }
}

fn record(failure: &Mutex<Option<String>>, what: String) {
    let mut f = failure.locked();
    if f.is_none() {
        tracing::error!(failure = %what, "background task failed");
        *f = Some(what);
    }
}

impl Default for Tasks {
    fn default() -> Self {
        Tasks::new()
    }
}

impl Tasks {
    pub fn new() -> Tasks {
        Tasks {
            set: Mutex::new(JoinSet::new()),
            running: Arc::new(Running::default()),
            stop: watch::channel(false).0,
            failure: Arc::new(Mutex::new(None)),
        }
    }

    /// Runs job `f` in the background until it ends, [`Tasks::abort_all`] or the owner's drop.
    /// `what` names it in a recorded failure.
    pub fn spawn(&self, what: &'static str, f: impl Future<Output = ()> + Send + 'static) {
        self.start(Kind::Job, what, f)
    }

    /// Runs `f`, a loop that ends once [`Tasks::stopping`] says so, in the background.
    pub fn spawn_loop(&self, what: &'static str, f: impl Future<Output = ()> + Send + 'static) {
        self.start(Kind::Loop, what, f)
    }

    fn start(&self, kind: Kind, what: &'static str, f: impl Future<Output = ()> + Send + 'static) {
        self.running.count(kind).fetch_add(1, Ordering::AcqRel);
        let ticket = Ticket {
            running: self.running.clone(),
            failure: self.failure.clone(),
            what,
            kind,
        };
        let mut set = self.set.locked();
        // Reap what has ended, so that the set holds only live tasks.
        while set.try_join_next().is_some() {}
        set.spawn(async move {
            let _ticket = ticket;
            f.await;
        });
    }

    /// [`Tasks::spawn`] for work that can fail: its error is recorded as the failure if it is
    /// the first.
    pub fn spawn_fallible<E: std::fmt::Display>(
        &self,
        what: &'static str,
        f: impl Future<Output = Result<(), E>> + Send + 'static,
    ) {
        let failure = self.failure.clone();
        self.spawn(what, async move {
            if let Err(e) = f.await {
                record(&failure, format!("{what}: {e}"));
            }
        });
    }

    /// Becomes true when the owner asks its tasks to stop; long-running tasks watch it.
    pub fn stopping(&self) -> watch::Receiver<bool> {
        self.stop.subscribe()
    }

    /// Records a failure seen outside a task (the first one wins).
    pub fn fail(&self, what: impl Into<String>) {
        record(&self.failure, what.into());
    }

    /// The first failure of a task, if any.
    pub fn failure(&self) -> Option<String> {
        self.failure.locked().clone()
    }

    /// Jobs and loops not yet ended.
    pub fn running(&self) -> usize {
        self.running.jobs.load(Ordering::Acquire) + self.running.loops.load(Ordering::Acquire)
    }

    /// Waits until no job runs (loops go on). Jobs may start jobs while it waits; it returns
    /// once the last of them has ended.
    pub async fn idle(&self) {
        self.until(|r| r.jobs.load(Ordering::Acquire) == 0).await
    }

    /// Tells the tasks to stop and waits for every one, jobs and loops, to end.
    pub async fn stop(&self) {
        let _ = self.stop.send(true);
        self.until(|_| self.running() == 0).await
    }

    async fn until(&self, done: impl Fn(&Running) -> bool) {
        loop {
            let changed = self.running.changed.notified();
            if done(&self.running) {
                return;
            }
            changed.await;
        }
    }

    /// Ends every task at its next await point, uploading or syncing nothing more.
    pub fn abort_all(&self) {
        self.set.locked().abort_all();
    }
}

impl Drop for Tasks {
    fn drop(&mut self) {
        self.abort_all();
    }
}

/// A task that ends with its handle (see the module docs). Awaiting it gives the task's
/// output.
pub struct Owned<T>(JoinHandle<T>);

/// Starts `f` as a task owned by the returned handle.
pub fn owned<T: Send + 'static>(f: impl Future<Output = T> + Send + 'static) -> Owned<T> {
    #[allow(clippy::disallowed_methods, reason = "the one place a task is started for a handle")]
    Owned(tokio::spawn(f))
}

impl<T> Owned<T> {
    pub fn abort(&self) {
        self.0.abort();
    }

    pub fn is_finished(&self) -> bool {
        self.0.is_finished()
    }
}

impl<T> Future for Owned<T> {
    type Output = Result<T, JoinError>;

    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        Pin::new(&mut self.0).poll(cx)
    }
}

impl<T> Drop for Owned<T> {
    fn drop(&mut self) {
        self.0.abort();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn stop_waits_for_every_task_including_those_started_by_tasks() {
        let tasks = Arc::new(Tasks::new());
        let (done_tx, mut done_rx) = tokio::sync::mpsc::unbounded_channel();
        let mut stopping = tasks.stopping();
        let t2 = tasks.clone();
        let tx = done_tx.clone();
        tasks.spawn("outer", async move {
            let _ = stopping.wait_for(|s| *s).await;
            let tx2 = tx.clone();
            t2.spawn("inner", async move {
                tokio::task::yield_now().await;
                let _ = tx2.send("inner");
            });
            let _ = tx.send("outer");
        });
        assert_eq!(tasks.running(), 1);
        tasks.stop().await;
        assert_eq!(tasks.running(), 0);
        let mut seen = vec![done_rx.recv().await.unwrap(), done_rx.recv().await.unwrap()];
        seen.sort();
        assert_eq!(seen, ["inner", "outer"]);
        assert_eq!(tasks.failure(), None);
    }

    #[tokio::test]
    async fn idle_waits_for_jobs_and_stop_for_loops_too() {
        let tasks = Tasks::new();
        let mut stopping = tasks.stopping();
        let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel();
        tasks.spawn_loop("ticker", async move {
            let _ = stopping.wait_for(|s| *s).await;
            let _ = tx.send(());
        });
        tasks.spawn("job", tokio::task::yield_now());
        tasks.idle().await;
        assert_eq!(tasks.running(), 1, "the loop ended with the jobs");
        assert!(rx.try_recv().is_err());
        tasks.stop().await;
        assert_eq!(tasks.running(), 0);
        assert!(rx.try_recv().is_ok(), "stop returned before the loop ended");
    }

    #[tokio::test]
    async fn the_first_failure_is_kept_and_a_panic_counts_as_one() {
        let tasks = Tasks::new();
        tasks.spawn("panicking", async { panic!("a bug") });
        tasks.idle().await;
        assert_eq!(tasks.failure().as_deref(), Some("panicking: panicked"));
        tasks.spawn_fallible("failing", async { Err::<(), _>("S3 refused") });
        tasks.idle().await;
        assert_eq!(tasks.failure().as_deref(), Some("panicking: panicked"));

        let tasks = Tasks::new();
        tasks.spawn_fallible("failing", async { Err::<(), _>("S3 refused") });
        tasks.idle().await;
        assert_eq!(tasks.failure().as_deref(), Some("failing: S3 refused"));
    }

    #[tokio::test]
    async fn dropping_the_owner_aborts_what_runs() {
        let tasks = Tasks::new();
        let (tx, rx) = tokio::sync::oneshot::channel::<()>();
        let running = tasks.running.clone();
        tasks.spawn("forever", async move {
            let _tx = tx;
            std::future::pending::<()>().await;
        });
        drop(tasks);
        // The sender is dropped with the aborted task.
        assert!(rx.await.is_err());
        assert_eq!(running.jobs.load(Ordering::Acquire), 0);
    }

    #[tokio::test]
    async fn an_owned_task_ends_with_its_handle() {
        let (tx, rx) = tokio::sync::oneshot::channel::<()>();
        let task = owned(async move {
            let _tx = tx;
            std::future::pending::<()>().await;
        });
        assert!(!task.is_finished());
        drop(task);
        assert!(rx.await.is_err());
        assert_eq!(owned(async { 7 }).await.unwrap(), 7);
    }
}
