//! Behaviour that depends on time (the flush delay, the refresh interval, the flusher's back-off
//! while S3 fails), on a manual clock: each test moves time itself and waits for the gateway's
//! background tasks to go back to sleep, so nothing here waits for a real timer or races one.

mod common;

use std::time::Duration;

use common::gateway::{on_faulty_garage, on_garage, InProc, Opts, S3Side};
use common::nfs::{Client, Fh, Status};
use s3nfs::clock::Clock;
use s3nfs::fs::upload::{FLUSH_TICK, MAX_BACKOFF};
use s3nfs::store::faulty::Op as FaultOp;

/// Waits until the flusher has finished a round and sleeps `left` before the next one. Only a
/// sleep registered after the clock last moved can have exactly `left` to go (older ones have
/// less), so this returns after a round that followed the latest `advance`.
async fn flusher_sleeps(clock: &Clock, left: Duration) {
    tokio::time::timeout(Duration::from_secs(30), clock.until_sleeping(|s| s.contains(&left)))
        .await
        .unwrap_or_else(|_| panic!("the flusher never went to sleep for {left:?}"));
}

/// A gateway on Garage with a flush delay of 2 s on a manual clock, and a client of it with the
/// root's handle.
async fn flush_delay_2s() -> (Clock, InProc, S3Side, Client, Fh) {
    let clock = Clock::manual();
    let (gw, s3) = on_garage(Opts {
        flush_delay: Duration::from_secs(2),
        clock: clock.clone(),
        ..Opts::default()
    })
    .await;
    let c = Client::connect(gw.addr).await;
    let root = c.root.clone();
    (clock, gw, s3, c, root)
}

#[tokio::test]
async fn a_file_goes_to_s3_once_idle_for_the_flush_delay_and_not_before() {
    let (clock, _gw, s3, mut c, root) = flush_delay_2s().await;
    let fh = c.create(&root, "f", 0o644).await.unwrap();
    c.write_all(&fh, 0, b"first").await.unwrap();

    clock.advance(Duration::from_millis(1900));
    flusher_sleeps(&clock, FLUSH_TICK).await;
    assert_eq!(s3.get("f").await, None, "uploaded before the flush delay");

    // A write restarts the delay.
    c.write_all(&fh, 5, b", second").await.unwrap();
    clock.advance(Duration::from_millis(1900));
    flusher_sleeps(&clock, FLUSH_TICK).await;
    assert_eq!(s3.get("f").await, None, "a write did not restart the delay");

    clock.advance(FLUSH_TICK);
    flusher_sleeps(&clock, FLUSH_TICK).await;
    assert_eq!(s3.get("f").await.as_deref(), Some(&b"first, second"[..]));
}

#[tokio::test]
async fn a_listing_serves_until_the_refresh_interval_and_s3_is_read_at_the_first_access_after() {
    let clock = Clock::manual();
    let refresh = Duration::from_secs(60);
    let (gw, s3) = on_garage(Opts {
        refresh,
        clock: clock.clone(),
        ..Opts::default()
    })
    .await;
    s3.put("old.txt", b"old").await;
    let mut c = Client::connect(gw.addr).await;
    let root = c.root.clone();
    assert_eq!(c.names(&root).await.unwrap(), vec!["old.txt"]);
    let old = c.lookup(&root, "old.txt").await.unwrap();
    assert_eq!(c.read_all(&old).await.unwrap(), b"old");

    s3.put("new.txt", b"new").await;
    s3.put("old.txt", b"overwritten").await;
    clock.advance(refresh - Duration::from_millis(1));
    assert_eq!(
        c.names(&root).await.unwrap(),
        vec!["old.txt"],
        "the listing was not reused within the refresh interval"
    );
    assert_eq!(c.getattr(&old).await.unwrap().size, 3);

    clock.advance(Duration::from_millis(1));
    assert_eq!(
        c.names(&root).await.unwrap(),
        vec!["new.txt", "old.txt"],
        "the first READDIR past the refresh interval"
    );
    assert_eq!(c.getattr(&old).await.unwrap().size, 11);
    assert_eq!(c.read_all(&old).await.unwrap(), b"overwritten");
}

/// RMDIR trusts a listing younger than the refresh interval, as every other operation does (an
/// `rm -r` then lists each directory once, for READDIRPLUS, not twice), and past it asks S3: a
/// child only S3 has makes the directory not empty.
#[tokio::test]
async fn rmdir_lists_a_directory_only_when_its_listing_is_past_the_refresh_interval() {
    let clock = Clock::manual();
    let refresh = Duration::from_secs(60);
    let (gw, s3, faults) = on_faulty_garage(Opts {
        refresh,
        clock: clock.clone(),
        ..Opts::default()
    })
    .await;
    // The marker of "stale" stays out of S3: a listing of the root then has nothing of "stale"
    // to list with it.
    faults.set_callback(|call| {
        (call.op == FaultOp::Put && call.key == "stale/")
            .then(|| s3nfs::store::faulty::Fault::Fail(s3nfs::store::StoreError::Unavailable("held back".into())))
    });
    let mut c = Client::connect(gw.addr).await;
    let root = c.root.clone();
    c.names(&root).await.unwrap();
    clock.advance(refresh / 2);
    c.mkdir(&root, "stale").await.unwrap();
    clock.advance(refresh / 2);
    c.names(&root).await.unwrap(); // the root listed again
    s3.put("stale/from-another-client", b"x").await;
    clock.advance(refresh / 2);
    // The root's listing is fresh; "stale" was last listed when it was made.
    c.mkdir(&root, "fresh").await.unwrap();

    faults.reset_counts();
    c.rmdir(&root, "fresh").await.unwrap();
    assert_eq!(faults.calls(FaultOp::List), 0, "a fresh listing was not trusted");
    assert_eq!(c.rmdir(&root, "stale").await, Err(Status::NFS3ERR_NOTEMPTY));
    assert_eq!(faults.calls(FaultOp::List), 1, "a stale directory was not listed");
}

/// While S3 refuses uploads, the flusher waits twice as long after each failed round, up to
/// MAX_BACKOFF, and goes back to its normal tick after the first round that succeeds.
#[tokio::test]
async fn the_flusher_backs_off_while_s3_fails_and_recovers_when_it_returns() {
    let clock = Clock::manual();
    let (gw, s3, faults) = on_faulty_garage(Opts {
        flush_delay: Duration::ZERO,
        clock: clock.clone(),
        ..Opts::default()
    })
    .await;
    let mut c = Client::connect(gw.addr).await;
    let root = c.root.clone();
    faults.set_outage(true);
    let fh = c.create(&root, "f", 0o644).await.unwrap();
    c.write_all(&fh, 0, b"kept").await.unwrap();

    let mut wait = FLUSH_TICK;
    let mut waits = Vec::new();
    while wait < MAX_BACKOFF || waits.last() != Some(&MAX_BACKOFF) {
        let puts = faults.total_calls();
        clock.advance(wait);
        wait = (wait * 2).min(MAX_BACKOFF);
        flusher_sleeps(&clock, wait).await;
        assert!(faults.total_calls() > puts, "a round after {waits:?} did not try S3");
        waits.push(wait);
    }
    assert_eq!(
        waits,
        [400, 800, 1600, 3200, 6400, 10_000].map(Duration::from_millis).to_vec()
    );
    assert_eq!(s3.get("f").await, None);

    faults.set_outage(false);
    clock.advance(MAX_BACKOFF);
    flusher_sleeps(&clock, FLUSH_TICK).await;
    assert_eq!(s3.get("f").await.as_deref(), Some(&b"kept"[..]));
}

/// Uploads that are due wait while clients keep the volume busy, for at most MAX_DEFER of one
/// busy stretch, and go at the first round after the clients pause for QUIET.
#[tokio::test]
async fn due_uploads_wait_for_clients_to_pause_but_not_for_ever() {
    use s3nfs::fs::defer::{MAX_DEFER, QUIET};
    let (clock, _gw, s3, mut c, root) = flush_delay_2s().await;
    // One tick of the flusher, with or without a client operation first.
    let mut t = Duration::ZERO;
    let mut tick = async |c: &mut Client, busy: bool| {
        if busy {
            c.getattr(&root).await.unwrap();
        }
        clock.advance(FLUSH_TICK);
        t += FLUSH_TICK;
        flusher_sleeps(&clock, FLUSH_TICK).await;
        t
    };

    // Busy without a pause: "a" is due at 2 s and waits until the stretch is MAX_DEFER long.
    let fh = c.create(&root, "a", 0o644).await.unwrap();
    c.write_all(&fh, 0, b"a").await.unwrap();
    loop {
        let now = tick(&mut c, true).await;
        if now < MAX_DEFER {
            assert_eq!(s3.get("a").await, None, "uploaded at {now:?} while clients were busy");
        } else {
            assert_eq!(
                s3.get("a").await.as_deref(),
                Some(&b"a"[..]),
                "still waiting at {now:?}"
            );
            break;
        }
    }

    // A pause ends the stretch. "b", due while the clients are busy again, goes once they pause.
    for _ in 0..5 {
        tick(&mut c, false).await;
    }
    let fh = c.create(&root, "b", 0o644).await.unwrap();
    c.write_all(&fh, 0, b"b").await.unwrap();
    for _ in 0..15 {
        tick(&mut c, true).await;
    }
    assert_eq!(s3.get("b").await, None, "uploaded while clients were busy");
    // The last operation was one tick ago.
    let mut quiet = FLUSH_TICK;
    while s3.get("b").await.is_none() {
        tick(&mut c, false).await;
        quiet += FLUSH_TICK;
        assert!(quiet <= QUIET + FLUSH_TICK, "not uploaded {quiet:?} into a pause");
    }
    assert!(
        quiet >= QUIET,
        "uploaded {quiet:?} into a pause, before it counted as one"
    );
}

/// A large file whose upload streamed while it was written, and that the client has committed
/// (closed or fsync'd) since its last write, goes to S3 once the volume is quiet, not a whole
/// flush delay later. One written again after its COMMIT, and a committed file too small to
/// stream (a database's 16 MiB WAL segment, fsync'd after every transaction), still wait for
/// the flush delay.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_streamed_file_committed_goes_to_s3_once_the_volume_is_quiet() {
    use nfs3_client::nfs3_types::nfs3::stable_how::UNSTABLE;
    use s3nfs::fs::defer::QUIET;
    let flush_delay = Duration::from_secs(2);
    let (clock, gw, s3, mut c, root) = flush_delay_2s().await;
    // Past two parts of 16 MiB: streamed while written. Written as the kernel client writes:
    // UNSTABLE, then a COMMIT at close (a FILE_SYNC WRITE commits as it writes).
    let big = common::pattern(1, (33 << 20) + 5);
    let wal = common::pattern(2, 16 << 20);
    let mut fh = Vec::new();
    for (name, data) in [("closed", &big), ("rewritten", &big), ("wal", &wal)] {
        let f = c.create(&root, name, 0o644).await.unwrap();
        c.write_all_how(&f, 0, data, UNSTABLE).await.unwrap();
        c.commit(&f).await.unwrap();
        fh.push(f);
    }
    c.write_all_how(&fh[1], big.len() as u64, b"more", UNSTABLE)
        .await
        .unwrap();
    // The streams of "closed" and "rewritten" have each sent their first part (S3's pace is
    // real time, not the test's clock).
    common::gateway::wait_for(Duration::from_secs(60), "the streams' first parts", || async {
        (gw.vol.stats().uploaded_bytes >= 2 * (16 << 20)).then_some(())
    })
    .await;

    // The streams end once the writers have been idle for a moment, and the flusher then looks
    // again: tick until "closed" is in S3, which must be well before the flush delay.
    let mut waited = QUIET;
    clock.advance(QUIET);
    loop {
        flusher_sleeps(&clock, FLUSH_TICK).await;
        if s3.head("closed").await.is_some() {
            break;
        }
        assert!(
            waited + FLUSH_TICK < flush_delay,
            "\"closed\" not in S3 {waited:?} after its COMMIT"
        );
        clock.advance(FLUSH_TICK);
        waited += FLUSH_TICK;
    }
    assert!(
        s3.get("closed").await.as_deref() == Some(&big[..]),
        "\"closed\" in S3 whole"
    );
    assert_eq!(
        s3.head("rewritten").await.map(|h| h.size),
        None,
        "written after its COMMIT, went early"
    );
    assert_eq!(
        s3.head("wal").await.map(|h| h.size),
        None,
        "a file that never streamed went early"
    );

    clock.advance(flush_delay - waited);
    flusher_sleeps(&clock, FLUSH_TICK).await;
    let mut rewritten = big.clone();
    rewritten.extend_from_slice(b"more");
    assert!(s3.get("rewritten").await.as_deref() == Some(&rewritten[..]));
    assert!(s3.get("wal").await.as_deref() == Some(&wal[..]));
}
