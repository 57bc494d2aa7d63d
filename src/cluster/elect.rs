//! Who owns a ReadWriteMany volume: a campaign for its lease, as client-go's leader election
//! runs one, and the role it gives this node.
//!
//! # The rules, and why they keep one writer
//! - **Taking over.** A contender takes the lease only when it is free, or when its record has
//!   not changed for `duration` as measured by the contender's own clock from the moment it
//!   saw that record appear. The holder's `renewTime` is never compared with a local clock, so
//!   clocks need not agree on the time of day.
//! - **Stepping down.** The owner counts from the moment it *sent* its last successful renewal.
//!   If `renew_deadline` passes without another, it stops serving ([`Role::Unknown`]) at once,
//!   also while a round of requests is still under way. A contender counts from the moment
//!   the record *reached* it, which cannot be before the owner sent it, so it waits at least
//!   `duration` from then: the owner stops `duration - renew_deadline` (5 s by default) before
//!   anyone may start.
//! - **Clock assumption.** Only the *rate* of the nodes' monotonic clocks matters: the margin
//!   holds while no clock runs more than `(duration - renew_deadline) / duration` (a third, by
//!   default) faster or slower than another over one lease duration, minus the time the owner
//!   takes to stop its gateway. Wall-clock offsets do not matter.
//! - **Every write is a compare-and-swap** on the version last read ([`LeaseApi::update`]),
//!   so of two contenders that saw the same expired record, one wins and the other sees a
//!   conflict.
//! - **Epoch.** `leaseTransitions` counts hand-overs; an owner that finds the lease held by
//!   anyone else stops at once, whatever its deadline says.
//!
//! [`Campaign`] is the rule, free of I/O and timers, so that tests drive it with explicit
//! instants; [`run`] is the loop that reads and writes the lease every `retry`.

use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

use tokio::sync::watch;

use super::lease::{Holder, LeaseApi, LeaseError, LeaseRecord, Versioned};
use crate::clock::Clock;

/// The campaign's periods. The defaults are client-go's recommended ratios, shortened: a
/// lease of 15 s, renewed every 2 s, given up 10 s after the last renewal.
#[derive(Debug, Clone, Copy)]
pub struct Timing {
    pub duration: Duration,
    pub renew_deadline: Duration,
    pub retry: Duration,
}

impl Default for Timing {
    fn default() -> Self {
        Timing {
            duration: Duration::from_secs(15),
            renew_deadline: Duration::from_secs(10),
            retry: Duration::from_secs(2),
        }
    }
}

impl Timing {
    pub fn check(&self) -> Result<(), String> {
        if self.retry.is_zero() || self.retry >= self.renew_deadline || self.renew_deadline >= self.duration {
            return Err(format!(
                "lease timing must have 0 < retry < renew deadline < duration, not {:?} / {:?} / {:?}",
                self.retry, self.renew_deadline, self.duration
            ));
        }
        Ok(())
    }
}

/// What this node is for the volume.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Role {
    /// Not known, or the lease was lost: serve nothing, neither as owner nor as relay.
    Unknown,
    /// This node owns the volume; `epoch` is the lease's `leaseTransitions`.
    Owner { epoch: u32 },
    /// Another node owns it and takes relayed connections at `owner.addr`.
    Follower { owner: Holder },
}

/// What the campaign asks of the lease store next.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Step {
    Create(LeaseRecord),
    Update(LeaseRecord, String),
    /// Someone else holds a live lease: nothing to write.
    Wait,
}

/// The election rule for one node and one lease.
#[derive(Debug)]
pub struct Campaign {
    me: Holder,
    timing: Timing,
    /// The version last seen and when (by this node's clock) it was first seen.
    observed: Option<(String, Instant)>,
    /// The last record seen.
    record: Option<LeaseRecord>,
    /// When the last successful write as holder was sent.
    renewed: Option<Instant>,
}

impl Campaign {
    pub fn new(me: Holder, timing: Timing) -> Campaign {
        Campaign {
            me,
            timing,
            observed: None,
            record: None,
            renewed: None,
        }
    }

    fn holds(&self, r: &LeaseRecord) -> bool {
        r.holder.as_deref() == Some(self.me.identity().as_str())
    }

    /// Takes in the lease as read at `now` and says what to write.
    pub fn next(&mut self, read: Option<&Versioned>, now: Instant, wall: SystemTime) -> Step {
        let duration_secs = self.timing.duration.as_secs().max(1) as u32;
        let Some(v) = read else {
            // No lease (never made, or deleted by hand). Another holder seen lately may still
            // be serving: it is waited out as its lease would have been, from when it was last
            // seen, and the epoch goes on from its.
            let mut transitions = 0;
            if let (Some(r), Some((_, seen))) = (&self.record, &self.observed) {
                let other = !self.holds(r) && !r.holder.as_deref().unwrap_or("").is_empty();
                let live = now.saturating_duration_since(*seen) < Duration::from_secs(r.duration_secs.into());
                if other && live {
                    return Step::Wait;
                }
                transitions = if self.holds(r) {
                    r.transitions
                } else {
                    r.transitions.wrapping_add(1)
                };
            }
            return Step::Create(LeaseRecord {
                holder: Some(self.me.identity()),
                duration_secs,
                acquire_time: Some(wall),
                renew_time: Some(wall),
                transitions,
            });
        };
        if self.observed.as_ref().map(|(ver, _)| ver) != Some(&v.version) {
            self.observed = Some((v.version.clone(), now));
        }
        self.record = Some(v.record.clone());
        let r = &v.record;
        let ours = self.holds(r);
        if !ours {
            // A lost lease stops the owner at once.
            self.renewed = None;
        }
        let free = r.holder.as_deref().unwrap_or("").is_empty();
        let seen_at = self.observed.as_ref().map(|(_, t)| *t).unwrap_or(now);
        // The record's own duration decides, not ours: the holder promised to stop within it.
        let expired = now.saturating_duration_since(seen_at) >= Duration::from_secs(r.duration_secs.into());
        if !ours && !free && !expired {
            return Step::Wait;
        }
        let record = LeaseRecord {
            holder: Some(self.me.identity()),
            duration_secs,
            acquire_time: if ours { r.acquire_time } else { Some(wall) },
            renew_time: Some(wall),
            transitions: if ours {
                r.transitions
            } else {
                r.transitions.wrapping_add(1)
            },
        };
        Step::Update(record, v.version.clone())
    }

    /// A write sent at `sent` succeeded and stored `v`.
    pub fn written(&mut self, v: &Versioned, sent: Instant) {
        self.observed = Some((v.version.clone(), sent));
        self.record = Some(v.record.clone());
        self.renewed = Some(sent);
    }

    /// The role at `now`, from what was last read or written.
    pub fn role(&self, now: Instant) -> Role {
        let Some(r) = &self.record else {
            return Role::Unknown;
        };
        if self.holds(r) {
            return match self.renewed {
                Some(t) if now.saturating_duration_since(t) < self.timing.renew_deadline => {
                    Role::Owner { epoch: r.transitions }
                }
                _ => Role::Unknown,
            };
        }
        match r.holder.as_deref().and_then(Holder::parse) {
            Some(owner) => Role::Follower { owner },
            None => Role::Unknown,
        }
    }

    /// The record to write to hand the lease over at once, if this node holds it.
    pub fn release(&self) -> Option<(LeaseRecord, String)> {
        let r = self.record.as_ref()?;
        if !self.holds(r) {
            return None;
        }
        let version = self.observed.as_ref()?.0.clone();
        Some((
            LeaseRecord {
                holder: None,
                duration_secs: 1,
                acquire_time: None,
                renew_time: None,
                transitions: r.transitions,
            },
            version,
        ))
    }

    /// When the owner must stop if no renewal succeeds before.
    pub fn deadline(&self) -> Option<Instant> {
        self.renewed.map(|t| t + self.timing.renew_deadline)
    }
}

/// Campaigns for `lease` until `stop` turns true, publishing the role on `role`. On stop,
/// a lease this node holds is released so that another node takes over without waiting.
pub async fn run(
    api: Arc<dyn LeaseApi>,
    lease: String,
    mut campaign: Campaign,
    clock: Clock,
    role: watch::Sender<Role>,
    mut stop: watch::Receiver<bool>,
) {
    let retry = campaign.timing.retry;
    let mut logged_error = false;
    let publish = |new: Role| {
        role.send_if_modified(|r| {
            if *r != new {
                tracing::info!(lease = %lease, from = ?r, to = ?new, "lease: role changed");
                *r = new;
                true
            } else {
                false
            }
        });
    };
    loop {
        let sent = clock.now();
        // Before the round, not only after it: a round begun at the deadline (the owner wakes
        // for it) may take as long as its requests' timeouts, and the owner must not serve
        // meanwhile.
        publish(campaign.role(sent));
        // A request that hangs must not keep the owner serving past its deadline: the round
        // is given up when the deadline comes (the role below is then Unknown).
        let outcome = match campaign.deadline() {
            Some(deadline) if deadline > sent => {
                tokio::select! {
                    r = round(&*api, &lease, &mut campaign, &clock, sent) => r,
                    _ = clock.sleep_until(deadline) => Err(LeaseError::Unavailable("no answer before the renew deadline".into())),
                }
            }
            _ => round(&*api, &lease, &mut campaign, &clock, sent).await,
        };
        match outcome {
            Ok(()) => logged_error = false,
            Err(e) if !logged_error => {
                tracing::warn!(lease = %lease, error = %e, "lease: no answer from the lease store; retrying");
                logged_error = true;
            }
            Err(_) => {}
        }
        let now = clock.now();
        publish(campaign.role(now));
        // The owner wakes for its deadline too: it must step down on time even while a
        // request hangs or the store is away.
        let wake = match campaign.deadline() {
            Some(d) if d > now && d < now + retry => d,
            _ => now + retry,
        };
        tokio::select! {
            _ = clock.sleep_until(wake) => {}
            // Only a stop sent: a stop handle dropped with its member, as in a crash, must not
            // release a lease that the gateway may still be serving under.
            Ok(_) = stop.wait_for(|s| *s) => break,
        }
    }
    if let Some((record, version)) = campaign.release() {
        // Stopped serving first (the caller stops the gateway before it stops the campaign).
        match api.update(&lease, &record, &version).await {
            Ok(_) => tracing::info!(lease = %lease, "lease: released"),
            Err(e) => {
                tracing::warn!(lease = %lease, error = %e, "lease: release failed; others take over when it expires")
            }
        }
    }
    role.send_replace(Role::Unknown);
}

/// One read and at most one write, bounded so that the owner's deadline is kept.
///
/// The record read counts as seen when its answer came, not when the request went: it may
/// have been written while the request was on its way, and a contender that counted from
/// before then would wait less than a lease's duration from the owner's renewal. A write
/// counts from when it was sent (`sent`): the owner's deadline runs from the earlier instant.
async fn round(
    api: &dyn LeaseApi,
    lease: &str,
    campaign: &mut Campaign,
    clock: &Clock,
    sent: Instant,
) -> Result<(), LeaseError> {
    let read = api.get(lease).await?;
    let step = campaign.next(read.as_ref(), clock.now(), crate::clock::wall_now());
    let written = match step {
        Step::Wait => return Ok(()),
        Step::Create(r) => api.create(lease, &r).await,
        Step::Update(r, v) => api.update(lease, &r, &v).await,
    };
    match written {
        Ok(v) => {
            campaign.written(&v, sent);
            Ok(())
        }
        // Someone else wrote first: the next read shows who.
        Err(LeaseError::Conflict) => Ok(()),
        Err(e) => Err(e),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn holder(n: &str, port: u16) -> Holder {
        Holder {
            node: n.into(),
            addr: std::net::SocketAddr::from(([10, 0, 0, 1], port)),
        }
    }

    fn versioned(r: &LeaseRecord, v: &str) -> Versioned {
        Versioned {
            record: r.clone(),
            version: v.into(),
        }
    }

    const S: Duration = Duration::from_secs(1);

    #[test]
    fn a_free_lease_is_created_and_the_creator_owns_it_until_its_deadline() {
        let t0 = Instant::now();
        let mut a = Campaign::new(holder("a", 1), Timing::default());
        let Step::Create(r) = a.next(None, t0, SystemTime::now()) else {
            panic!("expected create")
        };
        assert_eq!(r.holder.as_deref(), Some("a@10.0.0.1:1"));
        assert_eq!(r.duration_secs, 15);
        a.written(&versioned(&r, "1"), t0);
        assert_eq!(a.role(t0 + 9 * S), Role::Owner { epoch: 0 });
        // No renewal for the renew deadline: it stops serving.
        assert_eq!(a.role(t0 + 10 * S), Role::Unknown);
        assert_eq!(a.deadline(), Some(t0 + 10 * S));
    }

    #[test]
    fn a_contender_waits_a_full_duration_from_when_it_saw_the_record_whatever_renew_time_says() {
        let t0 = Instant::now();
        let a = holder("a", 1);
        // The holder's wall clock is far behind: renewTime looks an hour old.
        let held = LeaseRecord {
            holder: Some(a.identity()),
            duration_secs: 15,
            acquire_time: Some(SystemTime::now() - 3600 * S),
            renew_time: Some(SystemTime::now() - 3600 * S),
            transitions: 4,
        };
        let mut b = Campaign::new(holder("b", 2), Timing::default());
        assert_eq!(b.next(Some(&versioned(&held, "7")), t0, SystemTime::now()), Step::Wait);
        assert_eq!(b.role(t0), Role::Follower { owner: a.clone() });
        // The same record 14 s later: still live.
        assert_eq!(
            b.next(Some(&versioned(&held, "7")), t0 + 14 * S, SystemTime::now()),
            Step::Wait
        );
        // A renewal (new version) restarts the wait.
        assert_eq!(
            b.next(Some(&versioned(&held, "8")), t0 + 14 * S, SystemTime::now()),
            Step::Wait
        );
        assert_eq!(
            b.next(Some(&versioned(&held, "8")), t0 + 28 * S, SystemTime::now()),
            Step::Wait
        );
        // 15 s without a change: taken over, epoch + 1, on the version read.
        match b.next(Some(&versioned(&held, "8")), t0 + 29 * S, SystemTime::now()) {
            Step::Update(r, v) => {
                assert_eq!(v, "8");
                assert_eq!(r.transitions, 5);
                assert_eq!(r.holder.as_deref(), Some("b@10.0.0.1:2"));
            }
            s => panic!("expected takeover, got {s:?}"),
        }
    }

    #[test]
    fn the_owner_stops_before_any_contender_may_start() {
        let timing = Timing::default();
        let t0 = Instant::now();
        let mut a = Campaign::new(holder("a", 1), timing);
        let Step::Create(r) = a.next(None, t0, SystemTime::now()) else {
            panic!()
        };
        let stored = versioned(&r, "1");
        a.written(&stored, t0);
        // The contender sees the record at the earliest moment possible: when it was sent.
        let mut b = Campaign::new(holder("b", 2), timing);
        assert_eq!(b.next(Some(&stored), t0, SystemTime::now()), Step::Wait);
        let first_takeover = (0..60)
            .map(|s| t0 + s * S)
            .find(|&t| b.next(Some(&stored), t, SystemTime::now()) != Step::Wait)
            .unwrap();
        let last_owned = (0..60)
            .map(|s| t0 + s * S)
            .filter(|&t| a.role(t) != Role::Unknown)
            .last()
            .unwrap();
        assert!(
            first_takeover - last_owned >= timing.duration - timing.renew_deadline,
            "owner serves until {:?}, contender starts at {:?}",
            last_owned - t0,
            first_takeover - t0
        );
    }

    #[test]
    fn a_released_lease_is_taken_at_once_and_an_owner_that_sees_another_holder_stops_at_once() {
        let t0 = Instant::now();
        let mut a = Campaign::new(holder("a", 1), Timing::default());
        let Step::Create(r) = a.next(None, t0, SystemTime::now()) else {
            panic!()
        };
        a.written(&versioned(&r, "1"), t0);
        let (released, ver) = a.release().unwrap();
        assert_eq!(ver, "1");
        assert_eq!(released.holder, None);
        let mut b = Campaign::new(holder("b", 2), Timing::default());
        let Step::Update(taken, _) = b.next(Some(&versioned(&released, "2")), t0, SystemTime::now()) else {
            panic!("a released lease must be taken without waiting")
        };
        assert_eq!(taken.transitions, 1);
        // a reads b's record within its own deadline: it stops now.
        assert_eq!(
            a.next(Some(&versioned(&taken, "3")), t0 + S, SystemTime::now()),
            Step::Wait
        );
        assert_eq!(a.role(t0 + S), Role::Follower { owner: holder("b", 2) });
        assert_eq!(a.release(), None);
    }

    /// A lease deleted (by hand) while another node held it: that node may still be serving,
    /// so a contender waits out its duration from when it last saw it, and the epoch goes on.
    #[test]
    fn a_deleted_lease_is_taken_only_once_its_last_holder_is_waited_out() {
        let t0 = Instant::now();
        let held = LeaseRecord {
            holder: Some(holder("a", 1).identity()),
            duration_secs: 15,
            acquire_time: None,
            renew_time: None,
            transitions: 6,
        };
        let mut b = Campaign::new(holder("b", 2), Timing::default());
        assert_eq!(b.next(Some(&versioned(&held, "7")), t0, SystemTime::now()), Step::Wait);
        assert_eq!(b.next(None, t0 + S, SystemTime::now()), Step::Wait);
        assert_eq!(b.role(t0 + S), Role::Follower { owner: holder("a", 1) });
        assert_eq!(b.next(None, t0 + 14 * S, SystemTime::now()), Step::Wait);
        match b.next(None, t0 + 15 * S, SystemTime::now()) {
            Step::Create(r) => {
                assert_eq!(r.transitions, 7, "the epoch goes on from the last holder's");
                assert_eq!(r.holder.as_deref(), Some("b@10.0.0.1:2"));
            }
            s => panic!("expected the lease made again, got {s:?}"),
        }
        // A node that never saw a holder makes it at once.
        let mut c = Campaign::new(holder("c", 3), Timing::default());
        assert!(matches!(c.next(None, t0, SystemTime::now()), Step::Create(r) if r.transitions == 0));
    }

    #[test]
    fn the_owner_renews_on_the_version_it_read_and_keeps_its_epoch() {
        let t0 = Instant::now();
        let mut a = Campaign::new(holder("a", 1), Timing::default());
        let held = LeaseRecord {
            holder: Some(holder("a", 1).identity()),
            duration_secs: 15,
            acquire_time: None,
            renew_time: None,
            transitions: 9,
        };
        match a.next(Some(&versioned(&held, "40")), t0, SystemTime::now()) {
            Step::Update(r, v) => {
                assert_eq!((r.transitions, v.as_str()), (9, "40"));
                // Not owner until the write succeeds.
                assert_eq!(a.role(t0), Role::Unknown);
                a.written(&versioned(&r, "41"), t0);
                assert_eq!(a.role(t0), Role::Owner { epoch: 9 });
            }
            s => panic!("{s:?}"),
        }
    }

    /// A lease store in memory with the API server's compare-and-swap, which can be made to
    /// stop answering, to refuse, or to answer a read late.
    #[derive(Default)]
    struct Mem {
        lease: std::sync::Mutex<Option<Versioned>>,
        version: std::sync::atomic::AtomicU64,
        hang: std::sync::atomic::AtomicBool,
        fail: std::sync::atomic::AtomicBool,
        /// The next read reaches the store this long after it was sent, on this clock.
        late_read: std::sync::Mutex<Option<(Clock, Duration)>>,
    }

    impl Mem {
        async fn answer(&self) -> Result<(), LeaseError> {
            if self.fail.load(std::sync::atomic::Ordering::Acquire) {
                return Err(LeaseError::Unavailable("refused".into()));
            }
            if self.hang.load(std::sync::atomic::Ordering::Acquire) {
                std::future::pending::<()>().await;
            }
            Ok(())
        }
        fn stored(&self, r: &LeaseRecord) -> Versioned {
            let v = self.version.fetch_add(1, std::sync::atomic::Ordering::AcqRel) + 1;
            let stored = versioned(r, &v.to_string());
            *self.lease.lock().unwrap() = Some(stored.clone());
            stored
        }
    }

    #[async_trait::async_trait]
    impl LeaseApi for Mem {
        async fn get(&self, _: &str) -> Result<Option<Versioned>, LeaseError> {
            self.answer().await?;
            let late = self.late_read.lock().unwrap().take();
            if let Some((clock, by)) = late {
                clock.sleep(by).await;
            }
            Ok(self.lease.lock().unwrap().clone())
        }
        async fn create(&self, _: &str, r: &LeaseRecord) -> Result<Versioned, LeaseError> {
            self.answer().await?;
            if self.lease.lock().unwrap().is_some() {
                return Err(LeaseError::Conflict);
            }
            Ok(self.stored(r))
        }
        async fn update(&self, _: &str, r: &LeaseRecord, version: &str) -> Result<Versioned, LeaseError> {
            self.answer().await?;
            if self.lease.lock().unwrap().as_ref().map(|v| v.version.as_str()) != Some(version) {
                return Err(LeaseError::Conflict);
            }
            Ok(self.stored(r))
        }
    }

    /// A campaign of `me` for lease "l" in `api`, started: the task, its role and its stop
    /// handle.
    fn campaign(
        me: Holder,
        clock: &Clock,
        api: &Arc<Mem>,
    ) -> (crate::tasks::Owned<()>, watch::Receiver<Role>, watch::Sender<bool>) {
        let (tx, role) = watch::channel(Role::Unknown);
        let (stop, stop_rx) = watch::channel(false);
        let task = crate::tasks::owned(run(
            api.clone(),
            "l".into(),
            Campaign::new(me, Timing::default()),
            clock.clone(),
            tx,
            stop_rx,
        ));
        (task, role, stop)
    }

    /// The [`campaign`] of node "a", once it owns the lease.
    async fn owner(
        clock: &Clock,
        api: &Arc<Mem>,
    ) -> (crate::tasks::Owned<()>, watch::Receiver<Role>, watch::Sender<bool>) {
        let (task, mut role, stop) = campaign(holder("a", 1), clock, api);
        role.wait_for(|r| matches!(r, Role::Owner { .. })).await.unwrap();
        (task, role, stop)
    }

    #[tokio::test]
    async fn an_owner_whose_lease_store_hangs_steps_down_at_its_deadline() {
        let (clock, api) = (Clock::manual(), Arc::new(Mem::default()));
        let t0 = clock.now();
        let (_campaign, mut role, _stop) = owner(&clock, &api).await;
        // The store stops answering; requests hang rather than fail.
        api.hang.store(true, std::sync::atomic::Ordering::Release);
        let mut owned_until = t0;
        while matches!(*role.borrow(), Role::Owner { .. }) {
            owned_until = clock.now();
            // One step of time at a time, each once the campaign sleeps.
            // A campaign stuck in the hanging request would never sleep again.
            tokio::time::timeout(Duration::from_secs(10), clock.until_sleeping(|s| !s.is_empty()))
                .await
                .expect("the campaign is stuck in a request instead of keeping its deadline");
            clock.advance(Duration::from_millis(500));
            tokio::task::yield_now().await;
            assert!(
                clock.elapsed(t0) < Duration::from_secs(30),
                "still owner after 30 s without a renewal"
            );
        }
        role.wait_for(|r| *r == Role::Unknown).await.unwrap();
        // Renewed at t0, deadline 10 s: stopped by then, however long the request hangs.
        assert!(
            owned_until.saturating_duration_since(t0) <= Duration::from_secs(10),
            "served until {:?} after the last renewal",
            owned_until - t0
        );
    }

    /// The member's stop handle dropped without a stop sent (the member dropped, its tasks
    /// about to be aborted): the campaign goes on until it is aborted, and never releases the
    /// lease. It took the closed channel for a stop, and released the lease while the gateway
    /// could still be serving: another node could take over at once.
    #[tokio::test]
    async fn a_campaign_whose_stop_handle_is_dropped_keeps_the_lease() {
        let (clock, api) = (Clock::manual(), Arc::new(Mem::default()));
        let (_campaign, role, stop) = owner(&clock, &api).await;
        let renewals = || api.version.load(std::sync::atomic::Ordering::Acquire);
        let before = renewals();
        drop(stop);
        // Two renewals more, each once the campaign sleeps and its retry period has passed.
        while renewals() < before + 2 {
            tokio::time::timeout(Duration::from_secs(10), clock.until_sleeping(|s| !s.is_empty()))
                .await
                .expect("the campaign ended when its stop handle was dropped");
            clock.advance(Timing::default().retry);
            tokio::task::yield_now().await;
        }
        assert!(matches!(*role.borrow(), Role::Owner { .. }));
        let held = api.lease.lock().unwrap().as_ref().unwrap().record.holder.clone();
        assert_eq!(
            held.as_deref(),
            Some(holder("a", 1).identity().as_str()),
            "the lease was released"
        );
    }

    /// Requests refused at once until the deadline, then a round begun at the deadline (the
    /// owner wakes for it) that hangs: the owner is none from its deadline on, not only once
    /// that round ends, which may take its requests' timeouts (10 s against the API server).
    #[tokio::test]
    async fn an_owner_stops_at_its_deadline_while_a_round_begun_there_hangs() {
        use std::sync::atomic::Ordering::Release;
        let (clock, api) = (Clock::manual(), Arc::new(Mem::default()));
        let t0 = clock.now();
        let (_campaign, mut role, _stop) = owner(&clock, &api).await;
        let timing = Timing::default();
        let deadline = t0 + timing.renew_deadline;
        api.fail.store(true, Release);
        while clock.now() < deadline {
            tokio::time::timeout(Duration::from_secs(10), clock.until_sleeping(|s| !s.is_empty()))
                .await
                .expect("the campaign is stuck in a request");
            assert!(
                matches!(*role.borrow(), Role::Owner { .. }),
                "stepped down before its deadline"
            );
            if clock.now() + timing.retry >= deadline {
                // The next round, at the deadline, hangs.
                api.fail.store(false, Release);
                api.hang.store(true, Release);
            }
            clock.advance(timing.retry);
            tokio::task::yield_now().await;
        }
        tokio::time::timeout(Duration::from_secs(10), role.wait_for(|r| *r == Role::Unknown))
            .await
            .expect("still owner past its deadline, while the round begun there hangs")
            .unwrap();
    }

    /// A read that reaches the lease store late (5 s on its way) answers with a renewal made
    /// just before: a contender counts the lease's duration from that answer, not from when its
    /// request went, since the renewal may be that recent. Counted from the request, it took
    /// over as the owner's renew deadline ran out, the 5 s margin gone.
    #[tokio::test]
    async fn a_contender_counts_from_when_the_record_reached_it() {
        let clock = Clock::manual();
        let api = Arc::new(Mem::default());
        let held = LeaseRecord {
            holder: Some(holder("a", 1).identity()),
            duration_secs: 15,
            acquire_time: None,
            renew_time: None,
            transitions: 3,
        };
        api.stored(&held);
        let t0 = clock.now();
        *api.late_read.lock().unwrap() = Some((clock.clone(), Duration::from_secs(5)));
        let (_campaign, _role, _stop) = campaign(holder("b", 2), &clock, &api);
        let step = Duration::from_millis(100);
        let renewed = t0 + Duration::from_millis(4900);
        let taken = loop {
            tokio::time::timeout(Duration::from_secs(10), clock.until_sleeping(|s| !s.is_empty()))
                .await
                .expect("the campaign is stuck");
            let holder_now = api.lease.lock().unwrap().as_ref().unwrap().record.holder.clone();
            if holder_now.as_deref() == Some(holder("b", 2).identity().as_str()) {
                break clock.now();
            }
            if clock.now() == renewed {
                api.stored(&held); // a's renewal, while b's read is on its way
            }
            assert!(clock.elapsed(t0) < Duration::from_secs(60), "never taken over");
            clock.advance(step);
            tokio::task::yield_now().await;
        };
        assert!(
            taken - renewed >= Duration::from_secs(15),
            "taken over {:?} after the renewal it read, within the lease's duration",
            taken - renewed
        );
    }

    #[test]
    fn timing_must_leave_a_margin() {
        assert!(Timing::default().check().is_ok());
        let bad = Timing {
            duration: Duration::from_secs(10),
            renew_deadline: Duration::from_secs(10),
            retry: Duration::from_secs(2),
        };
        assert!(bad.check().is_err());
    }
}
