//! Large files through the core: multipart uploads that stream while the file is written, parts
//! rewritten after they were uploaded, truncation in the middle of an upload, and a restart with
//! an upload in flight. The object in the store must always end up equal to the file.

mod common;

use std::sync::Arc;

use s3nfs::fs::{SetAttr, Volume, VolumeConfig};
use s3nfs::store::faulty::{Faults, FaultyStore, Op};
use s3nfs::store::local::LocalStore;
use s3nfs::store::ObjectStore;

/// The core called directly acts as root (permission checks are tested through NFS).
static ROOT: std::sync::LazyLock<s3nfs::fs::Cred> = std::sync::LazyLock::new(s3nfs::fs::Cred::root);

const MIB: usize = 1 << 20;
const PART: u64 = 5 << 20;

/// An embedded store in a directory of its own, and the same store behind a FaultyStore:
/// (the directory, the store, the store under faults, the faults).
fn embedded_with_faults() -> (tempfile::TempDir, Arc<dyn ObjectStore>, Arc<dyn ObjectStore>, Faults) {
    let objects = tempfile::tempdir().unwrap();
    let local: Arc<dyn ObjectStore> = Arc::new(LocalStore::open(objects.path()).unwrap());
    let (faulty, faults) = FaultyStore::new(local.clone());
    (objects, local, Arc::new(faulty), faults)
}

/// A volume's configuration in `state` that lists only when `clock` moves on past the
/// refresh interval (a minute), and uploads only what the test flushes (a flush delay of an
/// hour).
fn by_hand(state: &std::path::Path, clock: &s3nfs::clock::Clock) -> VolumeConfig {
    let mut cfg = VolumeConfig::new(state.to_path_buf());
    cfg.flush_delay = std::time::Duration::from_secs(3600);
    cfg.refresh = std::time::Duration::from_secs(60);
    cfg.clock = clock.clone();
    cfg
}

/// A new empty file in the root, as root; its inode number.
async fn create_file(vol: &Volume, name: &[u8]) -> u64 {
    vol.create(&ROOT, vol.root(), name, SetAttr::default(), true)
        .await
        .unwrap()
        .ino
}

async fn open(state: &std::path::Path, store: &Arc<dyn ObjectStore>) -> Arc<Volume> {
    let mut cfg = VolumeConfig::new(state.to_path_buf());
    cfg.part_size = PART;
    Volume::open(cfg, store.clone()).await.unwrap()
}

fn pattern(len: usize, seed: u8) -> Vec<u8> {
    (0..len)
        .map(|i| (i as u32).wrapping_mul(2654435761).to_le_bytes()[1] ^ seed)
        .collect()
}

/// `bytes` put at `key` directly, as another S3 client would.
async fn put_object(s3: &dyn ObjectStore, key: &str, bytes: Vec<u8>) {
    s3.put(key, s3nfs::store::Body::Bytes(bytes.into()), &Default::default())
        .await
        .unwrap();
}

/// Multipart parts sent (UploadPart) and copied server-side (UploadPartCopy) so far.
fn sent_and_copied(faults: &Faults) -> (u64, u64) {
    (faults.calls(Op::UploadPart), faults.calls(Op::UploadPartCopy))
}

/// GETs so far, then [`sent_and_copied`].
fn fetched_sent_copied(faults: &Faults) -> (u64, u64, u64) {
    let (sent, copied) = sent_and_copied(faults);
    (faults.calls(Op::Get), sent, copied)
}

/// `op`'s answer, once it stops answering "retry later" (JUKEBOX over NFS), which it may
/// until `deadline`; any other error fails the test.
async fn until_not_retry<T, F>(deadline: std::time::Instant, what: &str, mut op: impl FnMut() -> F) -> T
where
    F: std::future::Future<Output = Result<T, s3nfs::fs::FsError>>,
{
    loop {
        match op().await {
            Ok(v) => return v,
            Err(s3nfs::fs::FsError::Retry(_)) if std::time::Instant::now() < deadline => continue,
            Err(e) => panic!("{what}: {e:?}"),
        }
    }
}

async fn object(store: &Arc<dyn ObjectStore>, key: &str) -> Vec<u8> {
    let size = store.head(key).await.unwrap().expect("object exists").size;
    store.get_range(key, 0..size).await.unwrap().to_vec()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn streamed_multipart_upload_matches_the_file_after_rewrites_and_truncation() {
    let objects = tempfile::tempdir().unwrap();
    let state = tempfile::tempdir().unwrap();
    let store: Arc<dyn ObjectStore> = Arc::new(LocalStore::open(objects.path()).unwrap());
    let vol = open(state.path(), &store).await;
    let ino = create_file(&vol, b"big").await;

    // 40 MiB written sequentially, flusher rounds in between: parts stream out as they settle.
    let mut want = pattern(40 * MIB, 1);
    for (i, chunk) in want.chunks(MIB).enumerate() {
        vol.write(&ROOT, ino, (i * MIB) as u64, chunk).await.unwrap();
        if i % 4 == 3 {
            vol.flush_round(false).await.unwrap();
        }
    }
    // Rewrite bytes inside parts that have (most likely) been uploaded already, and across a
    // part boundary.
    for (off, seed) in [(MIB, 7u8), (PART as usize - 100, 9), (17 * MIB, 11)] {
        let data = pattern(300_000, seed);
        vol.write(&ROOT, ino, off as u64, &data).await.unwrap();
        want[off..off + data.len()].copy_from_slice(&data);
    }
    vol.flush_all().await.unwrap();
    assert_eq!(object(&store, "big").await, want, "object after streaming and rewrites");

    // Shrink to a size that is not a multiple of the part size, grow again, flush.
    vol.setattr(
        &ROOT,
        ino,
        SetAttr {
            size: Some(23 * MIB as u64 + 123),
            ..Default::default()
        },
    )
    .await
    .unwrap();
    want.truncate(23 * MIB + 123);
    vol.write(&ROOT, ino, 30 * MIB as u64, b"tail").await.unwrap();
    want.resize(30 * MIB, 0);
    want.extend_from_slice(b"tail");
    vol.flush_all().await.unwrap();
    assert_eq!(object(&store, "big").await, want, "object after truncate and regrow");

    // A restart with a multipart upload started but not completed: the staged file and the
    // journal bring it back, the interrupted upload is aborted, the object ends up right.
    let more = pattern(12 * MIB, 3);
    vol.write(&ROOT, ino, want.len() as u64, &more).await.unwrap();
    want.extend_from_slice(&more);
    vol.flush_round(false).await.unwrap();
    drop(vol);
    let vol = open(state.path(), &store).await;
    let (read, _) = vol.read(&ROOT, ino, 0, want.len() as u32).await.unwrap();
    assert!(read == want, "the file reads back whole after the restart");
    vol.flush_all().await.unwrap();
    assert_eq!(object(&store, "big").await, want, "object after a restart mid-upload");
}

/// A staged copy that S3 already holds whole (written, uploaded, kept) is not taken up again at
/// a restart: its bytes were never synced (a download is renamed into place unsynced, and an
/// uploaded file needs no sync), so after a power cut they may be zeros, and reads would
/// serve them. Here the copy's bytes are overwritten while the gateway is down, as a lost page
/// cache would leave them; the file must still read as its object.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_copy_of_what_s3_holds_is_not_trusted_after_a_restart() {
    let objects = tempfile::tempdir().unwrap();
    let state = tempfile::tempdir().unwrap();
    let store: Arc<dyn ObjectStore> = Arc::new(LocalStore::open(objects.path()).unwrap());
    let vol = open(state.path(), &store).await;
    let ino = create_file(&vol, b"f").await;
    let want = pattern(3 * MIB, 5);
    vol.write(&ROOT, ino, 0, &want).await.unwrap();
    vol.flush_all().await.unwrap();
    drop(vol);
    let copy = state.path().join("staging").join(ino.to_string());
    assert!(copy.exists(), "the uploaded file's copy is not kept: nothing to check");
    std::fs::write(&copy, vec![0u8; want.len()]).unwrap();

    let vol = open(state.path(), &store).await;
    let (got, _) = vol.read(&ROOT, ino, 0, want.len() as u32).await.unwrap();
    assert!(got == want, "the file reads as the stale copy, not its object");
    vol.write(&ROOT, ino, 0, b"x").await.unwrap();
    vol.flush_all().await.unwrap();
    let mut want = want;
    want[0] = b'x';
    assert!(
        object(&store, "f").await == want,
        "a write after the restart uploaded the stale copy"
    );
}

/// A write to a file while the gateway copies its object server-side (an attribute change
/// going up, on a file whose uploaded copy is kept) is uploaded after the copy: the copy
/// finishing must not take the file for clean. It did (the write found the file's journal
/// record standing and added none, and the copy's end cleared it), and the write never reached
/// S3.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_write_during_a_server_side_copy_of_the_file_is_uploaded() {
    use std::time::Duration;
    let (_objects, _local, store, faults) = embedded_with_faults();
    let state = tempfile::tempdir().unwrap();
    let vol = open(state.path(), &store).await;
    let ino = create_file(&vol, b"f").await;
    let mut want = pattern(MIB, 4);
    vol.write(&ROOT, ino, 0, &want).await.unwrap();
    vol.flush_all().await.unwrap();
    let mode = SetAttr {
        mode: Some(0o600),
        ..Default::default()
    };
    vol.setattr(&ROOT, ino, mode).await.unwrap();

    faults.set_delay(Duration::from_secs(1));
    let flusher = {
        let vol = vol.clone();
        tokio::spawn(async move { vol.flush_all().await })
    };
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    while faults.calls(Op::Copy) == 0 {
        assert!(std::time::Instant::now() < deadline, "no server-side copy");
        tokio::task::yield_now().await;
    }
    assert_eq!(faults.reached(Op::Copy), 0, "the copy was not held: nothing checked");
    vol.write(&ROOT, ino, 10, b"during the copy").await.unwrap();
    want[10..25].copy_from_slice(b"during the copy");
    faults.set_delay(Duration::ZERO);
    flusher.await.unwrap().unwrap();
    vol.flush_all().await.unwrap();
    assert!(
        object(&store, "f").await == want,
        "the write during the copy is not in S3"
    );
}

/// A slow S3 holds up only the file waiting for it, and that for a bounded time: a write that
/// needs a cold file fetched answers "retry later" (JUKEBOX over NFS) after `stage_wait`, while
/// writes to other files go on; and no write waits for a CompleteMultipartUpload.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_slow_s3_holds_up_only_the_file_that_waits_for_it() {
    use s3nfs::fs::FsError;
    use std::time::Duration;

    let (_objects, local, store, faults) = embedded_with_faults();
    let state = tempfile::tempdir().unwrap();
    let mut cfg = VolumeConfig::new(state.path().to_path_buf());
    cfg.part_size = PART;
    cfg.stage_wait = Duration::from_millis(200);
    let vol = Volume::open(cfg, store.clone()).await.unwrap();
    let root = vol.root();
    let cold_bytes = pattern(3 * MIB, 7);
    local
        .put(
            "cold",
            s3nfs::store::Body::Bytes(cold_bytes.clone().into()),
            &Default::default(),
        )
        .await
        .unwrap();
    let cold = vol.lookup(&ROOT, root, b"cold").await.unwrap();
    let hot = create_file(&vol, b"hot").await;
    vol.write(&ROOT, hot, 0, b"x").await.unwrap();

    faults.set_delay(Duration::from_secs(2));
    let r = vol.write(&ROOT, cold, 0, b"y").await;
    assert!(matches!(r, Err(FsError::Retry(_))), "{r:?}");
    vol.write(&ROOT, hot, 1, b"z").await.unwrap();
    assert_eq!(
        faults.reached(Op::Get),
        0,
        "the other file was written while the cold one's GET was still held up"
    );
    // The fetch went on meanwhile: the retried write lands.
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    until_not_retry(deadline, "write to the cold file", || vol.write(&ROOT, cold, 0, b"y")).await;
    let mut want = cold_bytes;
    want[0] = b'y';
    assert_eq!(vol.read(&ROOT, cold, 0, want.len() as u32).await.unwrap().0, want);

    // The same for a part of a large file staged with holes: its fill, not the staging, is
    // what waits for S3.
    let large_bytes = pattern(2 * PART as usize, 8);
    put_object(&*local, "large", large_bytes.clone()).await;
    let large_state = tempfile::tempdir().unwrap();
    let mut cfg = VolumeConfig::new(large_state.path().to_path_buf());
    cfg.part_size = PART;
    cfg.sparse_from = PART;
    cfg.stage_wait = Duration::from_millis(200);
    let holes = Volume::open(cfg, store.clone()).await.unwrap();
    let large = holes.lookup(&ROOT, holes.root(), b"large").await.unwrap();
    faults.set_delay(Duration::from_secs(2));
    let r = holes.write(&ROOT, large, PART + 7, b"y").await;
    assert!(
        matches!(r, Err(FsError::Retry(_))),
        "a hole's fill held the write: {r:?}"
    );
    let r = holes.read(&ROOT, large, 5, 10).await;
    assert!(
        matches!(r, Err(FsError::Retry(_))),
        "a hole's fill held the read: {r:?}"
    );
    let deadline = std::time::Instant::now() + Duration::from_secs(60);
    until_not_retry(deadline, "write to the large file", || {
        holes.write(&ROOT, large, PART + 7, b"y")
    })
    .await;
    faults.set_delay(Duration::ZERO);
    let mut want = large_bytes;
    want[PART as usize + 7] = b'y';
    // The first part's fill, which the READ above started, may still be in a delayed GET.
    let (got, _) = until_not_retry(deadline, "read of the large file", || {
        holes.read(&ROOT, large, 0, want.len() as u32)
    })
    .await;
    assert!(got == want, "the large file does not read back with the write");
    drop(holes);

    // A large file's CompleteMultipartUpload held up by S3: writes to that file go on.
    faults.set_delay(Duration::ZERO);
    let big = create_file(&vol, b"big").await;
    for i in 0..12 {
        vol.write(&ROOT, big, (i * MIB) as u64, &pattern(MIB, i as u8))
            .await
            .unwrap();
    }
    let flusher = {
        let vol = vol.clone();
        tokio::spawn(async move { vol.flush_all().await })
    };
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    while faults.calls(Op::Complete) == 0 {
        assert!(std::time::Instant::now() < deadline, "no CompleteMultipartUpload");
        if faults.calls(Op::UploadPart) > 0 {
            faults.set_delay(Duration::from_secs(3));
        }
        tokio::task::yield_now().await;
    }
    vol.write(&ROOT, big, 0, b"during the complete").await.unwrap();
    assert!(
        !flusher.is_finished(),
        "the write waited for the CompleteMultipartUpload"
    );
    faults.set_delay(Duration::ZERO);
    flusher.await.unwrap().unwrap();
    vol.flush_all().await.unwrap();
    let got = object(&store, "big").await;
    assert_eq!(&got[..19], b"during the complete", "the later write is uploaded too");
}

/// A file renamed away from a name that a new file then takes: the renamed file's object must
/// be copied from the old key before the new file's upload replaces it, even when the copy
/// fails the first time and the new file's upload goes first.
#[tokio::test]
async fn a_new_file_under_a_renamed_files_old_name_never_takes_its_bytes() {
    use s3nfs::store::StoreError;

    let (_objects, _local, store, faults) = embedded_with_faults();
    let state = tempfile::tempdir().unwrap();
    let vol = Volume::open(VolumeConfig::new(state.path().to_path_buf()), store.clone())
        .await
        .unwrap();
    let root = vol.root();
    let a = create_file(&vol, b"a").await;
    vol.write(&ROOT, a, 0, b"old bytes").await.unwrap();
    vol.flush_all().await.unwrap();
    vol.rename(&ROOT, root, b"a", root, b"b").await.unwrap();
    let new = create_file(&vol, b"a").await;
    vol.write(&ROOT, new, 0, b"new bytes").await.unwrap();
    faults.fail_next(Op::Copy, 1, StoreError::Unavailable("injected".into()));
    let _ = vol.flush_round(true).await; // the move fails; the new file's upload does not
    vol.flush_all().await.unwrap();
    assert_eq!(object(&store, "b").await, b"old bytes");
    assert_eq!(object(&store, "a").await, b"new bytes");
}

/// A file renamed while its move is copied in S3: a volume on the embedded store that lists
/// only when the test moves the clock (see [`Between::names`]) and uploads only what the test
/// flushes, with a file "a" in S3, renamed to b, and renamed to c while the copy to b was held.
/// The copy has landed at b; the file is at c.
struct Between {
    _dirs: [tempfile::TempDir; 2],
    local: Arc<dyn ObjectStore>,
    store: Arc<dyn ObjectStore>,
    faults: Faults,
    clock: s3nfs::clock::Clock,
    vol: Arc<Volume>,
}

impl Between {
    async fn moves() -> Between {
        let (t, mover) = Between::held().await;
        t.faults.set_delay(std::time::Duration::ZERO);
        mover.await.unwrap().unwrap();
        assert!(
            t.store.head("b").await.unwrap().is_some() && t.store.head("c").await.unwrap().is_none(),
            "not between the two moves in S3: nothing checked"
        );
        t
    }

    /// As far as the rename to c, with the copy to b still held: every request waits a second
    /// until the test clears the delay. Also the round that copies, to be awaited.
    async fn held() -> (Between, tokio::task::JoinHandle<Result<usize, s3nfs::fs::FsError>>) {
        use std::time::Duration;
        let (objects, local, store, faults) = embedded_with_faults();
        let state = tempfile::tempdir().unwrap();
        let clock = s3nfs::clock::Clock::manual();
        // Local durability: the renames below are answered from the journal while the copy
        // is held (with `s3` they would wait for it).
        let cfg = by_hand(state.path(), &clock);
        let vol = Volume::open(cfg, store.clone()).await.unwrap();
        let root = vol.root();
        let ino = create_file(&vol, b"a").await;
        vol.write(&ROOT, ino, 0, b"the bytes").await.unwrap();
        vol.flush_all().await.unwrap();
        vol.rename(&ROOT, root, b"a", root, b"b").await.unwrap();

        faults.set_delay(Duration::from_secs(1));
        let mover = {
            let vol = vol.clone();
            // One round: one sync of the file.
            tokio::spawn(async move { vol.flush_round(true).await })
        };
        let deadline = std::time::Instant::now() + Duration::from_secs(30);
        while faults.calls(Op::Copy) == 0 {
            assert!(std::time::Instant::now() < deadline, "no server-side copy");
            tokio::task::yield_now().await;
        }
        vol.rename(&ROOT, root, b"b", root, b"c").await.unwrap();
        assert_eq!(faults.reached(Op::Copy), 0, "the copy was not held: nothing checked");
        let t = Between {
            _dirs: [objects, state],
            local,
            store,
            faults,
            clock,
            vol,
        };
        (t, mover)
    }

    /// The root's names, as listed from S3 past the refresh interval.
    async fn names(&self) -> Vec<Vec<u8>> {
        self.clock.advance(std::time::Duration::from_secs(60));
        let lists = self.faults.calls(Op::List);
        let (entries, _) = self.vol.readdir(&ROOT, self.vol.root(), 0, 100).await.unwrap();
        assert!(self.faults.calls(Op::List) > lists, "no listing: nothing checked");
        entries.into_iter().map(|e| e.name).collect()
    }
}

/// A file renamed again while its first move is copied in S3 (a to b in flight, then b to c):
/// the object the copy left at b is the file's until it moves on to c, and a listing meanwhile
/// must not take it for a new file b. It did (the move's record dropped the mark on a and set
/// none on b), and that stray file then kept b from being deleted.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_file_renamed_again_while_its_move_is_copied_is_listed_once() {
    let t = Between::moves().await;
    assert_eq!(
        t.names().await,
        [b"c".to_vec()],
        "the object on its way to c listed as a file"
    );
    t.vol.flush_all().await.unwrap();
    assert_eq!(object(&t.store, "c").await, b"the bytes");
    assert_eq!(t.store.head("b").await.unwrap(), None, "the middle name stays in S3");
    assert_eq!(t.store.head("a").await.unwrap(), None, "the first name stays in S3");
    assert_eq!(t.names().await, [b"c".to_vec()]);
}

/// A file moved back to the key its move's copy left it at (a to b in flight, b to c, then c
/// to b) leaves no mark on that key: once the file is gone, what another client puts there is
/// listed. The mark stayed, and hid the key from every listing for good.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_file_moved_back_during_its_move_leaves_no_mark_on_its_key() {
    let t = Between::moves().await;
    let root = t.vol.root();
    t.vol.rename(&ROOT, root, b"c", root, b"b").await.unwrap();
    t.vol.flush_all().await.unwrap();
    assert_eq!(object(&t.store, "b").await, b"the bytes");
    // Another client deletes the file, then puts a new one under its name.
    t.local.delete("b").await.unwrap();
    assert!(t.names().await.is_empty(), "the deleted file is still listed");
    put_object(&*t.local, "b", b"theirs".to_vec()).await;
    assert_eq!(t.names().await, [b"b".to_vec()], "their new file is hidden");
}

/// A new file written where a file's move is landing (a to b in flight, b to c, then a new b):
/// both files keep their bytes. The new file's upload checked for files still to move away
/// from b before the copy's record said the old file was one, and its PUT, made once the copy
/// let go of the key, replaced the bytes the old file was to copy on to c: both names ended up
/// with the new bytes.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_new_file_where_a_move_is_landing_keeps_both_files() {
    let (t, mover) = Between::held().await;
    let theirs = create_file(&t.vol, b"b").await;
    t.vol.write(&ROOT, theirs, 0, b"the new file").await.unwrap();
    let committed = {
        let vol = t.vol.clone();
        // One file's sync while a round runs, as a COMMIT with `durability s3` makes it.
        tokio::spawn(async move { vol.flush_inode(theirs).await })
    };
    t.faults.set_delay(std::time::Duration::ZERO);
    mover.await.unwrap().unwrap();
    committed.await.unwrap().unwrap();
    t.vol.flush_all().await.unwrap();
    assert_eq!(object(&t.store, "b").await, b"the new file");
    assert_eq!(
        object(&t.store, "c").await,
        b"the bytes",
        "the moved file lost its bytes"
    );
    assert_eq!(t.store.head("a").await.unwrap(), None, "the first name stays in S3");
    let mut names = t.names().await;
    names.sort();
    assert_eq!(names, [b"b".to_vec(), b"c".to_vec()]);
}

/// Files the gateway holds no copy of (only S3 has their bytes), truncated to nothing: the
/// empty file goes up. Staged empty for the truncation, the copy was taken for the object's
/// own (nothing had changed its size), and the object was copied onto itself, old bytes and all.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_file_only_in_s3_truncated_to_nothing_is_empty_in_s3() {
    let objects = tempfile::tempdir().unwrap();
    let state = tempfile::tempdir().unwrap();
    let store: Arc<dyn ObjectStore> = Arc::new(LocalStore::open(objects.path()).unwrap());
    // A small file and one large enough to be staged with holes.
    put_object(&*store, "small", b"old bytes".to_vec()).await;
    put_object(&*store, "large", pattern(2 * PART as usize + 3, 4)).await;
    let vol = open(state.path(), &store).await;
    for name in ["small", "large"] {
        let ino = vol.lookup(&ROOT, vol.root(), name.as_bytes()).await.unwrap();
        let empty = SetAttr {
            size: Some(0),
            ..Default::default()
        };
        vol.setattr(&ROOT, ino, empty).await.unwrap();
        vol.flush_all().await.unwrap();
        assert_eq!(store.head(name).await.unwrap().map(|h| h.size), Some(0), "{name}");
        assert!(
            vol.read(&ROOT, ino, 0, 100).await.unwrap().0.is_empty(),
            "{name} reads bytes"
        );
    }
    // Read by another gateway: empty too.
    drop(vol);
    let state = tempfile::tempdir().unwrap();
    let vol = open(state.path(), &store).await;
    for name in ["small", "large"] {
        let ino = vol.lookup(&ROOT, vol.root(), name.as_bytes()).await.unwrap();
        assert!(
            vol.read(&ROOT, ino, 0, 100).await.unwrap().0.is_empty(),
            "{name} reads bytes"
        );
    }
}

/// A small file's bytes the journal carries never come back, after a crash, over a change
/// that reached the file other than by WRITE: a truncation (acknowledged durable, as NFSv3's
/// SETATTR is), or another S3 client's version taken up from a listing. Replay wrote the old
/// bytes into the staged copy, and the upload sent them.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn journalled_bytes_never_come_back_over_a_truncation_or_another_clients_version() {
    let objects = tempfile::tempdir().unwrap();
    let state = tempfile::tempdir().unwrap();
    let store: Arc<dyn ObjectStore> = Arc::new(LocalStore::open(objects.path()).unwrap());
    let clock = s3nfs::clock::Clock::manual();
    let cfg = by_hand(state.path(), &clock);
    let vol = Volume::open(cfg.clone(), store.clone()).await.unwrap();
    let size = |n: u64| SetAttr {
        size: Some(n),
        ..Default::default()
    };

    // Replaced: journalled and uploaded, then replaced by another client, the new version
    // taken up by a listing, and its mode changed (so that it waits for an upload).
    let theirs = create_file(&vol, b"theirs").await;
    vol.write(&ROOT, theirs, 0, b"the gateway's bytes").await.unwrap();
    vol.sync_durable().await.unwrap();
    vol.flush_all().await.unwrap();
    put_object(&*store, "theirs", b"another client's bytes".to_vec()).await;
    clock.advance(std::time::Duration::from_secs(60));
    vol.readdir(&ROOT, vol.root(), 0, 100).await.unwrap();
    assert_eq!(
        vol.getattr(theirs).await.unwrap().size,
        22,
        "the other client's version was not taken up: nothing checked"
    );
    let mode = SetAttr {
        mode: Some(0o600),
        ..Default::default()
    };
    vol.setattr(&ROOT, theirs, mode).await.unwrap();

    // Cut: journalled at 10 KiB, then truncated to 3 bytes, to nothing, and to nothing and
    // back to 10 KiB (of zeros), with no sync since.
    let mut cut = Vec::new();
    let names = [&b"cut"[..], b"emptied", b"regrown"];
    for name in names {
        let ino = create_file(&vol, name).await;
        vol.write(&ROOT, ino, 0, &pattern(10 << 10, 6)).await.unwrap();
        cut.push(ino);
    }
    vol.sync_durable().await.unwrap();
    let mut cut: Vec<(u64, Vec<u8>)> = cut
        .into_iter()
        .zip([3, 0, 0])
        .map(|(ino, to)| (ino, pattern(to, 6)))
        .collect();
    for (ino, want) in &cut {
        vol.setattr(&ROOT, *ino, size(want.len() as u64)).await.unwrap();
    }
    vol.setattr(&ROOT, cut[2].0, size(10 << 10)).await.unwrap();
    cut[2].1 = vec![0; 10 << 10];

    // A crash: the state as the disk holds it now.
    let crashed = tempfile::tempdir().unwrap();
    common::copy_tree(state.path(), crashed.path());
    let mut cfg = cfg.clone();
    cfg.state_dir = crashed.path().to_path_buf();
    let vol = Volume::open(cfg, store.clone()).await.unwrap();
    let mut lost = Vec::new();
    for (ino, want) in &cut {
        if read_all(&vol, *ino, 64 << 10).await != *want {
            lost.push(format!("read after a truncation to {}", want.len()));
        }
    }
    if read_all(&vol, theirs, 100).await != b"another client's bytes" {
        lost.push("read of the other client's version".into());
    }
    vol.flush_all().await.unwrap();
    for (key, ino) in [("cut", 0), ("emptied", 1), ("regrown", 2)] {
        if object(&store, key).await != cut[ino].1 {
            lost.push(format!("{key} in S3"));
        }
    }
    if object(&store, "theirs").await != b"another client's bytes" {
        lost.push("the other client's version in S3".into());
    }
    assert!(lost.is_empty(), "the old journalled bytes came back: {lost:?}");
}

/// A file removed while its upload is on its way, the PUT reaching S3 but its reply lost: the
/// object it may have left is deleted, and no listing brings the file back. Nothing remembered
/// the key (the inode was gone), so the object stayed, and the next listing showed the file
/// again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_file_removed_while_its_upload_is_on_its_way_stays_removed() {
    let (_objects, local, store, faults) = embedded_with_faults();
    let state = tempfile::tempdir().unwrap();
    let clock = s3nfs::clock::Clock::manual();
    let cfg = by_hand(state.path(), &clock);
    let vol = Volume::open(cfg, store.clone()).await.unwrap();
    let root = vol.root();
    let ino = create_file(&vol, b"gone").await;
    vol.write(&ROOT, ino, 0, b"short-lived").await.unwrap();

    faults.drop_next(Op::Put, 1);
    let mut hold = faults.hold_reply(Op::Put, "gone");
    let uploading = {
        let vol = vol.clone();
        tokio::spawn(async move { vol.flush_round(true).await })
    };
    assert!(
        hold.reached(std::time::Duration::from_secs(30)).await,
        "no upload: nothing checked"
    );
    vol.remove(&ROOT, root, b"gone").await.unwrap();
    hold.release();
    let _ = uploading.await.unwrap();
    vol.flush_all().await.unwrap();
    assert_eq!(local.head("gone").await.unwrap(), None, "the object is left in S3");
    clock.advance(std::time::Duration::from_secs(60));
    let (names, _) = vol.readdir(&ROOT, root, 0, 100).await.unwrap();
    assert!(names.is_empty(), "the removed file came back");
}

/// A file moved over another (a to b) whose object another client deletes before the move
/// reaches S3: the deletion wins, and the file is gone, without the replaced file's bytes
/// coming back under its name. The replaced file's object at b was spared for the move, which
/// then never came, and a listing took it up as the moved file's content.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_move_over_a_file_whose_source_another_client_deleted_leaves_neither() {
    let objects = tempfile::tempdir().unwrap();
    let state = tempfile::tempdir().unwrap();
    let local: Arc<dyn ObjectStore> = Arc::new(LocalStore::open(objects.path()).unwrap());
    let clock = s3nfs::clock::Clock::manual();
    let cfg = by_hand(state.path(), &clock);
    let vol = Volume::open(cfg, local.clone()).await.unwrap();
    for (name, bytes) in [(&b"a"[..], &b"moved"[..]), (b"b", b"replaced")] {
        let ino = create_file(&vol, name).await;
        vol.write(&ROOT, ino, 0, bytes).await.unwrap();
    }
    vol.flush_all().await.unwrap();
    // Another gateway, which holds no copy of either file.
    drop(vol);
    let state = tempfile::tempdir().unwrap();
    let cfg = by_hand(state.path(), &clock);
    let vol = Volume::open(cfg, local.clone()).await.unwrap();
    let root = vol.root();
    vol.rename(&ROOT, root, b"a", root, b"b").await.unwrap();
    local.delete("a").await.unwrap();
    vol.flush_all().await.unwrap();
    clock.advance(std::time::Duration::from_secs(60));
    vol.readdir(&ROOT, root, 0, 100).await.unwrap();
    vol.flush_all().await.unwrap();
    clock.advance(std::time::Duration::from_secs(60));
    let (names, _) = vol.readdir(&ROOT, root, 0, 100).await.unwrap();
    let names: Vec<_> = names.into_iter().map(|e| String::from_utf8(e.name).unwrap()).collect();
    let b = local.head("b").await.unwrap();
    assert!(names.is_empty() && b.is_none(), "left: names {names:?}, b in S3: {b:?}");
}

/// A large file renamed from b to c while its upload to b is under way (a part sent, the
/// upload not completed), and a new file written at b and uploaded meanwhile: the old upload
/// must not complete at b, over the new file's object. Its completion checks, under the key's
/// lock, that b is still its file's key; the file goes up at c instead.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_upload_overtaken_by_a_rename_does_not_land_on_the_new_file_at_its_old_name() {
    use std::time::Duration;
    let within = |what: &'static str| (Duration::from_secs(30), what);
    let (_objects, _local, store, faults) = embedded_with_faults();
    let state = tempfile::tempdir().unwrap();
    let mut cfg = VolumeConfig::new(state.path().to_path_buf());
    cfg.part_size = PART;
    cfg.flush_delay = Duration::from_secs(3600);
    let vol = Volume::open(cfg, store.clone()).await.unwrap();
    let root = vol.root();

    let big = pattern(2 * PART as usize + 7, 9);
    let old = create_file(&vol, b"b").await;
    for (i, chunk) in big.chunks(MIB).enumerate() {
        vol.write(&ROOT, old, (i * MIB) as u64, chunk).await.unwrap();
    }
    // The first part's reply is held: the upload stops there, its key read and parts under way.
    let mut hold = faults.hold_reply(Op::UploadPart, "b");
    let uploading = {
        let vol = vol.clone();
        tokio::spawn(async move { vol.flush_round(true).await })
    };
    let (t, what) = within("no part of b was sent: nothing checked");
    assert!(hold.reached(t).await, "{what}");
    vol.rename(&ROOT, root, b"b", root, b"c").await.unwrap();
    let new = create_file(&vol, b"b").await;
    vol.write(&ROOT, new, 0, b"the new file").await.unwrap();
    // The new file's sync, as a COMMIT with `durability s3` makes it.
    let (t, what) = within("the new file's sync waited for the old upload");
    tokio::time::timeout(t, vol.flush_inode(new))
        .await
        .expect(what)
        .unwrap();
    assert_eq!(object(&store, "b").await, b"the new file");

    hold.release();
    let (t, what) = within("the held upload never ended");
    let _ = tokio::time::timeout(t, uploading).await.expect(what).unwrap();
    vol.flush_all().await.unwrap();
    assert!(
        object(&store, "b").await == b"the new file",
        "the old file's upload completed over the new file"
    );
    assert!(object(&store, "c").await == big, "the renamed file is not whole at c");
    assert_eq!(faults.calls(Op::Abort), 1, "the upload begun at b is not aborted");
    vol.tasks().stop().await; // nothing left to write into the store's directory
}

/// A volume whose store counts requests, with parts of [`PART`] and a flush delay of an hour
/// (nothing is due: only streams upload), and an empty file "big" in it; `tweak` sets the rest.
async fn streams_only(tweak: impl FnOnce(&mut VolumeConfig)) -> ([tempfile::TempDir; 2], Arc<Volume>, Faults, u64) {
    let objects = tempfile::tempdir().unwrap();
    let state = tempfile::tempdir().unwrap();
    let local: Arc<dyn ObjectStore> = Arc::new(LocalStore::open(objects.path()).unwrap());
    let (faulty, faults) = FaultyStore::new(local);
    let mut cfg = VolumeConfig::new(state.path().to_path_buf());
    cfg.part_size = PART;
    cfg.flush_delay = std::time::Duration::from_secs(3600);
    tweak(&mut cfg);
    let vol = Volume::open(cfg, Arc::new(faulty)).await.unwrap();
    let ino = create_file(&vol, b"big").await;
    ([objects, state], vol, faults, ino)
}

/// Flush rounds until a part upload has been made (streams run in the background), or fails
/// with `why` after 30 s.
async fn flush_until_a_part_is_uploaded(vol: &Arc<Volume>, faults: &Faults, why: &str) {
    tokio::time::timeout(std::time::Duration::from_secs(30), async {
        while faults.calls(Op::UploadPart) == 0 {
            vol.flush_round(false).await.unwrap();
            tokio::task::yield_now().await;
        }
    })
    .await
    .expect(why);
}

/// Only a writer at the end of a file streams it to S3 while writing: rewriting the middle of a
/// big file would upload the same parts again and again. Once the writer appends, it streams.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_file_rewritten_in_the_middle_is_not_streamed_while_written() {
    let (_dirs, vol, faults, ino) = streams_only(|_| {}).await;
    vol.setattr(
        &ROOT,
        ino,
        SetAttr {
            size: Some(40 * MIB as u64),
            ..Default::default()
        },
    )
    .await
    .unwrap();
    let data = pattern(MIB, 5);
    for i in 0..20u64 {
        vol.write(&ROOT, ino, (i * 7 % 38) * MIB as u64, &data).await.unwrap();
        vol.flush_round(false).await.unwrap();
    }
    assert_eq!(
        faults.calls(Op::UploadPart),
        0,
        "parts uploaded while the middle was rewritten"
    );

    // Appending: the stream starts.
    for i in 40..60u64 {
        vol.write(&ROOT, ino, i * MIB as u64, &data).await.unwrap();
        vol.flush_round(false).await.unwrap();
    }
    flush_until_a_part_is_uploaded(&vol, &faults, "an appended file was not streamed").await;
    // The stream's parts still on their way would write into the store's directory while it is
    // removed, and leave their files behind.
    vol.tasks().stop().await;
}

/// With one CPU (`stream_while_busy` off), a file written in one go does not stream to S3 while
/// its writer is busy (the upload would only take the CPU from the writer), and starts
/// streaming once the writer pauses, not a flush delay later.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn without_a_spare_cpu_a_stream_waits_for_the_writer_to_pause() {
    let clock = s3nfs::clock::Clock::manual();
    let (_dirs, vol, faults, ino) = streams_only(|cfg| {
        cfg.stream_while_busy = false;
        cfg.clock = clock.clone();
    })
    .await;
    let data = pattern(MIB, 3);
    for i in 0..30u64 {
        vol.note_activity(); // what each NFS call does
        vol.write(&ROOT, ino, i * MIB as u64, &data).await.unwrap();
        vol.flush_round(false).await.unwrap();
    }
    assert_eq!(faults.calls(Op::UploadPart), 0, "streamed while the writer was busy");

    // The writer pauses: the next rounds start the stream.
    clock.advance(std::time::Duration::from_secs(1));
    flush_until_a_part_is_uploaded(&vol, &faults, "the stream did not start when the writer paused").await;
    vol.tasks().stop().await; // as above
}

/// Staged copies of files S3 already holds are a cache, bounded in bytes as well as in number:
/// once a large file is uploaded, the least recently written copies go until the rest fit, and
/// the files whose copies went read back from S3.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn uploaded_copies_are_dropped_past_their_byte_bound_oldest_first() {
    let objects = tempfile::tempdir().unwrap();
    let state = tempfile::tempdir().unwrap();
    let store: Arc<dyn ObjectStore> = Arc::new(LocalStore::open(objects.path()).unwrap());
    let mut cfg = VolumeConfig::new(state.path().to_path_buf());
    cfg.part_size = PART;
    cfg.max_staged_clean_bytes = 5 * MIB as u64;
    let vol = Volume::open(cfg, store.clone()).await.unwrap();
    let staged = || -> Vec<String> {
        let mut names: Vec<String> = std::fs::read_dir(state.path().join("staging"))
            .unwrap()
            .map(|e| e.unwrap().file_name().into_string().unwrap())
            .collect();
        names.sort();
        names
    };
    let mut files = Vec::new();
    for (i, name) in ["a", "b", "c"].iter().enumerate() {
        let ino = create_file(&vol, name.as_bytes()).await;
        let data = pattern(2 * MIB, i as u8);
        vol.write(&ROOT, ino, 0, &data).await.unwrap();
        vol.flush_all().await.unwrap();
        files.push((ino, data));
    }
    // 6 MiB of uploaded copies against a bound of 5: the oldest, a's, went.
    let (a, b, c) = (files[0].0, files[1].0, files[2].0);
    assert_eq!(
        staged(),
        vec![b.to_string(), c.to_string()],
        "a's copy dropped, b's and c's kept"
    );
    for (ino, data) in &files {
        let (read, _) = vol.read(&ROOT, *ino, 0, data.len() as u32).await.unwrap();
        assert!(read == *data, "inode {ino} reads back whole");
    }
    assert!(
        !staged().contains(&a.to_string()),
        "reading does not stage the file again"
    );
}

/// A large file changed in place sends S3 only the parts it changed: the others are copied
/// server-side (UploadPartCopy) from the object that holds them, whether the staged copy was
/// uploaded by this gateway or fetched from S3, after the file moved to another key too, and
/// only from the version the staged copy holds.
/// On Garage.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_large_file_changed_in_place_sends_only_the_parts_it_changed() {
    let (s3, _bucket) = common::gateway::garage_store().await;
    let s3: Arc<dyn ObjectStore> = s3;
    let (faulty, faults) = FaultyStore::new(s3.clone());
    let store: Arc<dyn ObjectStore> = Arc::new(faulty);
    let sent = |what: &str| {
        let counts = sent_and_copied(&faults);
        faults.reset_counts();
        eprintln!("{what}: {counts:?} (parts sent, parts copied)");
        counts
    };

    // 12 MiB in parts of 5 MiB: 5 + 5 + 2.
    let state = tempfile::tempdir().unwrap();
    let vol = open(state.path(), &store).await;
    let ino = create_file(&vol, b"big").await;
    let mut want = pattern(12 * MIB, 1);
    vol.write(&ROOT, ino, 0, &want).await.unwrap();
    vol.flush_all().await.unwrap();
    assert_eq!(sent("first upload"), (3, 0));

    // Ten bytes in the middle part: that part is sent, the two others copied.
    vol.write(&ROOT, ino, 7 * MIB as u64, b"0123456789").await.unwrap();
    want[7 * MIB..7 * MIB + 10].copy_from_slice(b"0123456789");
    vol.flush_all().await.unwrap();
    assert_eq!(object(&store, "big").await, want, "after a write in the middle part");
    assert_eq!(sent("one part changed"), (1, 2));

    // Appended to: the parts before the old end are copied; the old last part, which the append
    // extends, and the new one are sent.
    let more = pattern(5 * MIB, 2);
    vol.write(&ROOT, ino, want.len() as u64, &more).await.unwrap();
    want.extend_from_slice(&more);
    vol.flush_all().await.unwrap();
    assert_eq!(object(&store, "big").await, want, "after an append");
    assert_eq!(sent("appended"), (2, 2));

    // Another gateway (a fresh state directory), whose staged copy is fetched from S3: the same.
    drop(vol);
    let state = tempfile::tempdir().unwrap();
    let vol = open(state.path(), &store).await;
    let ino = vol.lookup(&ROOT, vol.root(), b"big").await.unwrap();
    vol.write(&ROOT, ino, 1, b"x").await.unwrap();
    want[1] = b'x';
    vol.flush_all().await.unwrap();
    assert_eq!(
        object(&store, "big").await,
        want,
        "after a write to a file fetched from S3"
    );
    assert_eq!(sent("fetched, one part changed"), (1, 3));

    // Renamed: S3 copies the object to the new key and the old one is deleted; the parts a
    // later change leaves alone come from the new key.
    vol.rename(&ROOT, vol.root(), b"big", vol.root(), b"big2")
        .await
        .unwrap();
    vol.flush_all().await.unwrap();
    assert_eq!(store.head("big").await.unwrap(), None, "the old key stays");
    faults.reset_counts();
    vol.write(&ROOT, ino, 3, b"z").await.unwrap();
    want[3] = b'z';
    vol.flush_all().await.unwrap();
    assert_eq!(object(&store, "big2").await, want, "after a write to the renamed file");
    assert_eq!(sent("renamed, one part changed"), (1, 3));

    // The object replaced behind the gateway's back (same size, other bytes): no part may come
    // from that version. The gateway's bytes win, as for any file it uploads.
    let theirs = pattern(want.len(), 3);
    put_object(&*s3, "big2", theirs).await;
    vol.write(&ROOT, ino, 2, b"y").await.unwrap();
    want[2] = b'y';
    vol.flush_all().await.unwrap();
    assert!(
        object(&store, "big2").await == want,
        "a part was copied from a version not staged"
    );
    let (parts, _) = sent("replaced behind its back");
    assert_eq!(parts, 4, "every part sent once the copy source was found replaced");
}

/// Replaces `key` in `bucket` with `bytes` from a thread of its own, with its own runtime and
/// client, and returns once it is done: a FaultyStore callback (synchronous) can call it, so
/// the replacement lands between two requests of the gateway, exactly.
fn replace_now(bucket: &str, key: &str, bytes: Vec<u8>) {
    let cfg = common::garage::shared().s3_config(bucket);
    let key = key.to_string();
    std::thread::spawn(move || {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        rt.block_on(async {
            let s3 = s3nfs::store::s3::S3Store::connect(cfg).await.unwrap();
            put_object(&s3, &key, bytes).await;
        })
    })
    .join()
    .unwrap();
}

/// A volume on `store` whose listings stay fresh for an hour (so only reads can notice another
/// client's change), reading S3 in chunks of 1 MiB.
async fn open_reading_in_mib(state: &std::path::Path, store: &Arc<dyn ObjectStore>) -> Arc<Volume> {
    let mut cfg = VolumeConfig::new(state.to_path_buf());
    cfg.part_size = PART;
    cfg.read_chunk = MIB as u64;
    cfg.refresh = std::time::Duration::from_secs(3600);
    Volume::open(cfg, store.clone()).await.unwrap()
}

/// A sequential reader of a cold file gets its read-ahead in streamed GETs of several chunks:
/// 24 chunks in at most 12 GETs (a GET per chunk made 24), every byte as S3 has it, though the
/// next READs arrive while the GETs are still streaming. On Garage.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_sequential_reader_gets_several_chunks_a_get() {
    let (s3, _bucket) = common::gateway::garage_store().await;
    let data = pattern(24 * MIB, 5);
    put_object(&*s3, "seq", data.clone()).await;
    let (faulty, faults) = FaultyStore::new(s3.clone());
    let store: Arc<dyn ObjectStore> = Arc::new(faulty);
    let state = tempfile::tempdir().unwrap();
    let mut cfg = VolumeConfig::new(state.path().to_path_buf());
    cfg.read_chunk = MIB as u64;
    cfg.read_ahead = 8;
    cfg.read_run = 4;
    let vol = Volume::open(cfg, store).await.unwrap();
    let ino = vol.lookup(&ROOT, vol.root(), b"seq").await.unwrap();
    let step = 256 << 10;
    for off in (0..data.len()).step_by(step) {
        let (got, _) = vol.read(&ROOT, ino, off as u64, step as u32).await.unwrap();
        assert!(got[..] == data[off..off + step], "bytes at {off}");
    }
    let gets = faults.calls(Op::Get);
    assert!((2..=12).contains(&gets), "{gets} GETs for 24 chunks read in order");
}

/// Another S3 client replaces a file's object between two READs: the second takes up the new
/// version, and nothing cached from the old one is served with it. Without the ETag
/// condition on every GET of a file's bytes, the first chunk stays cached as the old version
/// and the file reads back as a mix of both. On Garage.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_file_replaced_by_another_client_between_reads_is_never_read_as_a_mix() {
    let (s3, bucket) = common::gateway::garage_store().await;
    let store: Arc<dyn ObjectStore> = s3.clone();
    let old = pattern(8 * MIB, 1);
    put_object(&*s3, "f", old.clone()).await;
    let state = tempfile::tempdir().unwrap();
    let vol = open_reading_in_mib(state.path(), &store).await;
    let ino = vol.lookup(&ROOT, vol.root(), b"f").await.unwrap();
    let (first, _) = vol.read(&ROOT, ino, 0, MIB as u32).await.unwrap();
    assert!(first[..] == old[..MIB], "first chunk, before the change");

    // A new version of another length.
    let new = pattern(9 * MIB, 2);
    replace_now(&bucket, "f", new.clone());
    let (later, _) = vol.read(&ROOT, ino, 6 * MIB as u64, MIB as u32).await.unwrap();
    assert!(
        later[..] == new[6 * MIB..7 * MIB],
        "a READ after the change reads the new version"
    );
    let (again, _) = vol.read(&ROOT, ino, 0, MIB as u32).await.unwrap();
    assert!(
        again[..] == new[..MIB],
        "the first chunk was served from the old version after the new one was read"
    );
    assert_eq!(
        vol.getattr(ino).await.unwrap().size,
        new.len() as u64,
        "the new version's size"
    );
}

/// Another S3 client replaces a cold file's object just as the gateway fetches it into staging
/// for a write: the fetch, of the version the gateway knew, is refused, starts over on the new
/// version, and the write lands on it. Without the ETag condition, the gateway would stage the
/// new bytes as the old version (or, fetching in several GETs, a mix of both) and upload them
/// under the old version's size. On Garage.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_file_replaced_while_it_is_fetched_for_a_write_is_staged_whole_from_one_version() {
    let (s3, bucket) = common::gateway::garage_store().await;
    let old = pattern(6 * MIB, 1);
    put_object(&*s3, "f", old).await;
    let (faulty, faults) = FaultyStore::new(s3.clone());
    let store: Arc<dyn ObjectStore> = Arc::new(faulty);
    let state = tempfile::tempdir().unwrap();
    let vol = open_reading_in_mib(state.path(), &store).await;
    let ino = vol.lookup(&ROOT, vol.root(), b"f").await.unwrap();

    // Replaced just before the fetch's GET, with a version of another length.
    let mut new = pattern(7 * MIB, 2);
    let gets = Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let (seen, replacement) = (gets.clone(), std::sync::Mutex::new(Some(new.clone())));
    faults.set_callback(move |call| {
        if call.op == Op::Get && seen.fetch_add(1, std::sync::atomic::Ordering::SeqCst) == 0 {
            let bytes = replacement.lock().unwrap().take().unwrap();
            replace_now(&bucket, "f", bytes);
        }
        None
    });
    vol.write(&ROOT, ino, 10, b"0123456789").await.unwrap();
    faults.clear_callback();
    assert!(
        gets.load(std::sync::atomic::Ordering::SeqCst) >= 2,
        "the fetch did not start over on the new version"
    );
    new[10..20].copy_from_slice(b"0123456789");
    vol.flush_all().await.unwrap();
    assert!(
        object(&store, "f").await == new,
        "the file in S3 is not the new version with the write on it"
    );
}

/// A file renamed through the gateway whose object another S3 client replaces before the move
/// reaches S3: the move carries the version S3 holds, and the file takes up that version's size
/// with it. Without the ETag condition on the copy, the new name holds their bytes under the
/// old version's size, and READs of the file stop at the old length. On Garage.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_file_replaced_by_another_client_before_its_move_reaches_s3_moves_whole() {
    let (s3, _bucket) = common::gateway::garage_store().await;
    let store: Arc<dyn ObjectStore> = s3.clone();
    put_object(&*s3, "a", pattern(MIB, 1)).await;
    let state = tempfile::tempdir().unwrap();
    let vol = open_reading_in_mib(state.path(), &store).await;
    let ino = vol.lookup(&ROOT, vol.root(), b"a").await.unwrap();
    vol.rename(&ROOT, vol.root(), b"a", vol.root(), b"b").await.unwrap();

    let theirs = pattern(MIB + 12_345, 2);
    put_object(&*s3, "a", theirs.clone()).await;
    vol.flush_all().await.unwrap();
    assert!(
        object(&store, "b").await == theirs,
        "the moved object is not the version S3 held"
    );
    assert_eq!(store.head("a").await.unwrap(), None, "the old name stays in S3");
    let size = vol.getattr(ino).await.unwrap().size;
    assert_eq!(size, theirs.len() as u64, "the file's size is not its object's");
    let (read, eof) = vol.read(&ROOT, ino, 0, 2 * MIB as u32).await.unwrap();
    assert!(read[..] == theirs[..] && eof, "the file reads back as its object");
}

/// Another S3 client deletes a file's object before the gateway's rename of it reaches S3. If
/// the gateway holds the file's bytes (a staged copy), they go up under the new name; if not,
/// the deletion wins and the file goes, as when a listing finds an object gone. Either way the
/// work is done: retried for ever, it would keep `s3nfs flush` (and a Kubernetes unstage)
/// waiting. On Garage.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_file_deleted_by_another_client_before_its_move_reaches_s3_does_not_stall_uploads() {
    let (s3, _bucket) = common::gateway::garage_store().await;
    let store: Arc<dyn ObjectStore> = s3.clone();
    let state = tempfile::tempdir().unwrap();
    let mut cfg = VolumeConfig::new(state.path().to_path_buf());
    cfg.refresh = std::time::Duration::ZERO;
    let vol = Volume::open(cfg, store.clone()).await.unwrap();

    // Written through the gateway, uploaded: its staged copy stays.
    let ours = pattern(MIB, 1);
    let ino = create_file(&vol, b"staged").await;
    vol.write(&ROOT, ino, 0, &ours).await.unwrap();
    vol.flush_all().await.unwrap();
    // Only named: the gateway never read its bytes.
    put_object(&*s3, "named", pattern(MIB, 2)).await;
    vol.lookup(&ROOT, vol.root(), b"named").await.unwrap();

    for (from, to) in [(&b"staged"[..], &b"staged2"[..]), (b"named", b"named2")] {
        vol.rename(&ROOT, vol.root(), from, vol.root(), to).await.unwrap();
        s3.delete(std::str::from_utf8(from).unwrap()).await.unwrap();
    }
    vol.flush_all().await.expect("uploads stall on the deleted objects");
    assert!(
        object(&store, "staged2").await == ours,
        "the staged bytes are not under the new name"
    );
    assert_eq!(store.head("named2").await.unwrap(), None);
    let gone = vol.lookup(&ROOT, vol.root(), b"named2").await;
    assert!(
        matches!(gone, Err(s3nfs::fs::FsError::NotFound)),
        "the file whose object was deleted is still listed: {gone:?}"
    );
    let kept = vol.lookup(&ROOT, vol.root(), b"staged2").await.unwrap();
    assert_eq!(vol.getattr(kept).await.unwrap().size, MIB as u64);

    // Hard links made through the gateway to a file it never read, whose object is deleted
    // before the links' copies of it reach S3: the deletion wins for every name. Without it,
    // a link's copy was retried every round and the flush stalled; or, once the file was
    // emptied, the next link put it back as an empty object under every name.
    put_object(&*s3, "linked", pattern(MIB, 3)).await;
    let file = vol.lookup(&ROOT, vol.root(), b"linked").await.unwrap();
    vol.link(&ROOT, file, vol.root(), b"linked2").await.unwrap();
    vol.link(&ROOT, file, vol.root(), b"linked3").await.unwrap();
    s3.delete("linked").await.unwrap();
    vol.flush_all()
        .await
        .expect("uploads stall on the hard links of a deleted object");
    for key in ["linked", "linked2", "linked3"] {
        assert_eq!(
            store.head(key).await.unwrap(),
            None,
            "{key}: the deleted object came back"
        );
    }
    for name in [&b"linked"[..], b"linked2", b"linked3"] {
        match vol.lookup(&ROOT, vol.root(), name).await {
            Err(s3nfs::fs::FsError::NotFound) => {}
            Ok(ino) => assert_eq!(
                vol.getattr(ino).await.unwrap().size,
                0,
                "{} still has the deleted object's size",
                String::from_utf8_lossy(name)
            ),
            Err(e) => panic!("lookup: {e:?}"),
        }
    }
}

/// A volume on `store` that stages every file of a part or more with holes (see
/// `src/fs/holes.rs`), reading S3 in chunks of 1 MiB.
async fn open_with_holes(state: &std::path::Path, store: &Arc<dyn ObjectStore>) -> Arc<Volume> {
    open_with_holes_and(state, store, |_| {}).await
}

/// [`open_with_holes`], with the configuration changed further by `tweak`.
async fn open_with_holes_and(
    state: &std::path::Path,
    store: &Arc<dyn ObjectStore>,
    tweak: impl FnOnce(&mut VolumeConfig),
) -> Arc<Volume> {
    let mut cfg = VolumeConfig::new(state.to_path_buf());
    cfg.part_size = PART;
    cfg.sparse_from = PART;
    cfg.read_chunk = MIB as u64;
    tweak(&mut cfg);
    Volume::open(cfg, store.clone()).await.unwrap()
}

/// Reads the whole file through the volume, a MiB at a time.
async fn read_all(vol: &Volume, ino: u64, len: usize) -> Vec<u8> {
    let mut out = Vec::with_capacity(len);
    while out.len() < len {
        let (b, eof) = vol.read(&ROOT, ino, out.len() as u64, MIB as u32).await.unwrap();
        out.extend_from_slice(&b);
        if eof {
            break;
        }
    }
    out
}

/// 28 MiB in parts of 5 MiB (5 x 5 + 3), put by another client, and a volume with holes.
async fn cold_file_with_holes(
    s3: &Arc<dyn ObjectStore>,
    state: &std::path::Path,
) -> (Arc<Volume>, Faults, u64, Vec<u8>) {
    cold_file_with_holes_and(s3, state, |_| {}).await
}

/// [`cold_file_with_holes`], the volume's configuration changed further by `tweak`.
async fn cold_file_with_holes_and(
    s3: &Arc<dyn ObjectStore>,
    state: &std::path::Path,
    tweak: impl FnOnce(&mut VolumeConfig),
) -> (Arc<Volume>, Faults, u64, Vec<u8>) {
    let want = pattern(28 * MIB, 1);
    put_object(&**s3, "cold", want.clone()).await;
    let (faulty, faults) = FaultyStore::new(s3.clone());
    let store: Arc<dyn ObjectStore> = Arc::new(faulty);
    let vol = open_with_holes_and(state, &store, tweak).await;
    let ino = vol.lookup(&ROOT, vol.root(), b"cold").await.unwrap();
    faults.reset_counts();
    (vol, faults, ino, want)
}

/// A write into a cold large file fetches the one part it touches, not the file; the upload
/// sends that part and copies the others server-side; a read of the holes fetches them. On
/// Garage. Without holes the write fetched all 28 MiB (28 GETs of 1 MiB).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_write_to_a_cold_large_file_fetches_only_the_part_it_touches() {
    let (s3, _bucket) = common::gateway::garage_store().await;
    let s3: Arc<dyn ObjectStore> = s3;
    let state = tempfile::tempdir().unwrap();
    let (vol, faults, ino, mut want) = cold_file_with_holes(&s3, state.path()).await;

    vol.write(&ROOT, ino, 12 * MIB as u64, b"0123456789").await.unwrap();
    want[12 * MIB..12 * MIB + 10].copy_from_slice(b"0123456789");
    assert_eq!(faults.calls(Op::Get), 1, "one GET, of part 3, for a write into it");
    vol.flush_all().await.unwrap();
    assert!(object(&s3, "cold").await == want, "the object after the upload");
    assert_eq!(sent_and_copied(&faults), (1, 5), "parts sent and parts copied");

    // Written again: the copy keeps its holes, which the upload re-pointed at the new object
    // (the old version is gone); the last part (3 MiB) comes from there. A read of the whole
    // file fills the other holes as it goes.
    faults.reset_counts();
    vol.write(&ROOT, ino, want.len() as u64 - 3, b"end").await.unwrap();
    want.truncate(want.len() - 3);
    want.extend_from_slice(b"end");
    assert_eq!(faults.calls(Op::Get), 1, "only the last part fetched");
    assert!(
        read_all(&vol, ino, want.len()).await == want,
        "read back while it has holes"
    );
    assert_eq!(faults.calls(Op::Get), 5, "each hole fetched once, in one GET");
    vol.flush_all().await.unwrap();
    assert!(object(&s3, "cold").await == want);
    assert_eq!(
        sent_and_copied(&faults),
        (1, 5),
        "parts filled by reads are copied, not sent"
    );
}

/// A file with holes whose CompleteMultipartUpload succeeded in S3 but whose reply was lost:
/// the holes' bytes are in the new object now, and the old version is gone. A read of a hole
/// before the upload is tried again, and a write after it, keep the file whole. The holes
/// still named the old version: the read found it gone and the copy was dropped as lost,
/// with the write made after the upload's snapshot.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_lost_completion_reply_keeps_a_file_with_holes_whole() {
    let objects = tempfile::tempdir().unwrap();
    let s3: Arc<dyn ObjectStore> = Arc::new(LocalStore::open(objects.path()).unwrap());
    let state = tempfile::tempdir().unwrap();
    let (vol, faults, ino, mut want) = cold_file_with_holes(&s3, state.path()).await;
    vol.write(&ROOT, ino, 12 * MIB as u64, b"0123456789").await.unwrap();
    want[12 * MIB..12 * MIB + 10].copy_from_slice(b"0123456789");
    faults.drop_next(Op::Complete, 1);
    let _ = vol.flush_round(true).await; // one try
    assert_eq!(faults.reached(Op::Complete), 1, "no completion: nothing checked");
    vol.write(&ROOT, ino, 20 * MIB as u64, b"after").await.unwrap();
    want[20 * MIB..20 * MIB + 5].copy_from_slice(b"after");
    assert!(read_all(&vol, ino, want.len()).await == want, "read back");
    assert_eq!(
        faults.calls(Op::Complete),
        1,
        "the upload was tried again before the read"
    );
    vol.flush_all().await.unwrap();
    assert!(object(&s3, "cold").await == want, "in S3");
}

/// 4 KiB READs of a cold file at offsets all over it, each checked: the GETs they took, and
/// whether an upload followed.
async fn random_reads(vol: &Volume, faults: &Faults, ino: u64, want: &[u8], reads: usize) -> u64 {
    let mut x: u64 = 0x9e37_79b9_7f4a_7c15;
    for _ in 0..reads {
        x = x.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
        let off = (x >> 33) % (want.len() as u64 - 4096);
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(60);
        let (b, _) = until_not_retry(deadline, "a random read", || vol.read(&ROOT, ino, off, 4096)).await;
        assert!(b[..] == want[off as usize..off as usize + 4096], "the bytes at {off}");
    }
    faults.calls(Op::Get)
}

/// A random reader of a cold file gets ranged GETs of its own until they are as many as
/// fetching the file takes (6 GETs, one per part, here), then the file is staged with holes
/// and each part comes once, in one GET: never much more than twice the GETs of either way
/// alone (ranged GETs alone took one per READ, 200). The copy is never uploaded. A file over half the bound
/// on clean copies is never staged for a reader. On Garage.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_random_reader_of_a_cold_file_has_it_staged_once_ranged_gets_cost_more() {
    let (s3, _bucket) = common::gateway::garage_store().await;
    let s3: Arc<dyn ObjectStore> = s3;
    let state = tempfile::tempdir().unwrap();
    let (vol, faults, ino, want) = cold_file_with_holes(&s3, state.path()).await;
    let gets = random_reads(&vol, &faults, ino, &want, 200).await;
    // The first READ takes a chunk (it may be a sequential reader's), 6 ranged GETs, at most 6
    // to fill the parts, and ranged GETs for the READs that come while the copy is being made
    // (it is not waited for): a few, more while other tests share the CPU. Due after as many
    // ranged GETs as 1 MiB chunks, with a part in five GETs, the count was 57.
    assert!(gets <= 1 + 6 + 6 + 12, "{gets} GETs for 200 random READs");
    assert!(gets > 6, "{gets} GETs: staged before the ranged GETs cost as much");
    eprintln!("{gets} GETs for 200 random READs");
    faults.reset_counts();
    vol.flush_all().await.unwrap();
    assert_eq!(
        faults.calls(Op::Put) + faults.calls(Op::CreateMultipart),
        0,
        "a copy staged for a reader was uploaded"
    );
    drop(vol);

    // Bound clean copies to 40 MiB: the 28 MiB file is more than half of it.
    let state = tempfile::tempdir().unwrap();
    let (vol, faults, ino, want) =
        cold_file_with_holes_and(&s3, state.path(), |cfg| cfg.max_staged_clean_bytes = 40 << 20).await;
    let gets = random_reads(&vol, &faults, ino, &want, 200).await;
    // Ranged GETs all along (a READ that lands next to the one before may take a chunk), far
    // more than staged: past the bound, the file was not.
    assert!(gets > 100, "{gets} GETs for 200 random READs: staged past the bound");
}

/// A hole's part comes in one GET, streamed to the copy: a WRITE (or READ) that lands in a
/// hole costs one request, as the part's upload does, whatever the read chunk (1 MiB here,
/// where a fill in chunks took five).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_holes_part_comes_in_one_get() {
    let (s3, _bucket) = common::gateway::garage_store().await;
    let s3: Arc<dyn ObjectStore> = s3;
    let state = tempfile::tempdir().unwrap();
    let (vol, faults, ino, mut want) = cold_file_with_holes(&s3, state.path()).await;
    // A write into part 2 (bytes 5..10 MiB).
    vol.write(&ROOT, ino, 6 * MIB as u64, b"x").await.unwrap();
    assert_eq!(faults.calls(Op::Get), 1, "GETs for the part");
    want[6 * MIB] = b'x';
    assert!(read_all(&vol, ino, want.len()).await == want, "the file after the fill");
    assert_eq!(faults.calls(Op::Get), 6, "one GET per part of the file");
}

/// A gateway restarted while a copy has holes and a change not yet in S3: the sidecar brings
/// the holes back, reads fill them, and the upload sends the part present at the restart (it may
/// have been written) and copies the others. Taking the copy as whole would upload zeros;
/// taking its parts as unwritten would lose the write. On Garage.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_copy_with_holes_survives_a_restart_with_its_write() {
    let (s3, _bucket) = common::gateway::garage_store().await;
    let s3: Arc<dyn ObjectStore> = s3;
    let state = tempfile::tempdir().unwrap();
    let (vol, _faults, ino, mut want) = cold_file_with_holes(&s3, state.path()).await;
    vol.write(&ROOT, ino, 7 * MIB as u64, b"abc").await.unwrap();
    want[7 * MIB..7 * MIB + 3].copy_from_slice(b"abc");
    vol.sync_durable().await.unwrap();
    drop(vol);

    let (faulty, faults) = FaultyStore::new(s3.clone());
    let store: Arc<dyn ObjectStore> = Arc::new(faulty);
    let vol = open_with_holes(state.path(), &store).await;
    assert!(
        read_all(&vol, ino, want.len()).await == want,
        "read back after the restart"
    );
    assert_eq!(faults.calls(Op::Get), 5, "the holes fetched, the part present not");
    vol.flush_all().await.unwrap();
    assert!(object(&s3, "cold").await == want, "the object after the restart");
    assert_eq!(
        sent_and_copied(&faults),
        (1, 5),
        "the part present at the restart sent, the others copied"
    );
}

/// Truncation and a write past the end of a copy with holes: the parts that stay are filled
/// first, so no hole's zeros reach S3. On Garage.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_copy_with_holes_truncated_or_extended_keeps_its_bytes() {
    let (s3, _bucket) = common::gateway::garage_store().await;
    let s3: Arc<dyn ObjectStore> = s3;
    let state = tempfile::tempdir().unwrap();
    let (vol, faults, ino, mut want) = cold_file_with_holes(&s3, state.path()).await;
    let counts = |what: &str| {
        let c = fetched_sent_copied(&faults);
        faults.reset_counts();
        eprintln!("{what}: {c:?} (parts fetched, parts sent, parts copied)");
        c
    };

    // Cut to 12 MiB, in the middle of part 3: that part is fetched and sent, the two below it
    // copied.
    let cut = SetAttr {
        size: Some(12 * MIB as u64),
        ..Default::default()
    };
    vol.setattr(&ROOT, ino, cut).await.unwrap();
    want.truncate(12 * MIB);
    vol.flush_all().await.unwrap();
    assert!(object(&s3, "cold").await == want, "after the truncation");
    assert_eq!(counts("cut"), (1, 1, 2));

    // Another gateway (its copy cold) writes past the end of a new copy with holes, beyond the
    // old last part (10-12 MiB), which then reaches past the object and cannot be copied: it
    // keeps its bytes.
    drop(vol);
    let (faulty, faults) = FaultyStore::new(s3.clone());
    let store: Arc<dyn ObjectStore> = Arc::new(faulty);
    let state = tempfile::tempdir().unwrap();
    let vol = open_with_holes(state.path(), &store).await;
    let ino = vol.lookup(&ROOT, vol.root(), b"cold").await.unwrap();
    faults.reset_counts();
    vol.write(&ROOT, ino, 17 * MIB as u64, b"tail").await.unwrap();
    want.resize(17 * MIB, 0);
    want.extend_from_slice(b"tail");
    vol.flush_all().await.unwrap();
    assert!(object(&s3, "cold").await == want, "after the write past the end");
    assert_eq!(fetched_sent_copied(&faults), (1, 2, 2), "written past the end");

    // And a third, with a copy of its own, grows it by SETATTR: the old last part is fetched
    // and sent, and so are the new ones (zeros); the parts below are copied.
    drop(vol);
    let state = tempfile::tempdir().unwrap();
    let vol = open_with_holes(state.path(), &store).await;
    let ino = vol.lookup(&ROOT, vol.root(), b"cold").await.unwrap();
    faults.reset_counts();
    let grow = SetAttr {
        size: Some(30 * MIB as u64),
        ..Default::default()
    };
    vol.setattr(&ROOT, ino, grow).await.unwrap();
    want.resize(30 * MIB, 0);
    vol.flush_all().await.unwrap();
    assert!(object(&s3, "cold").await == want, "after growing");
    assert_eq!(fetched_sent_copied(&faults), (1, 3, 3), "grown");
}

/// Another S3 client replaces the object while the gateway's copy of it has holes: the copy
/// can never be completed, so the other client's version stands, whole (no zeros from the
/// holes, no mix), and the gateway's uploads go on. On Garage.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_copy_with_holes_whose_object_is_replaced_gives_way_whole() {
    let (s3, bucket) = common::gateway::garage_store().await;
    let s3: Arc<dyn ObjectStore> = s3;
    let state = tempfile::tempdir().unwrap();
    let (vol, _faults, ino, _want) = cold_file_with_holes(&s3, state.path()).await;
    vol.write(&ROOT, ino, 7 * MIB as u64, b"abc").await.unwrap();

    let theirs = pattern(11 * MIB, 9);
    replace_now(&bucket, "cold", theirs.clone());
    vol.flush_all().await.unwrap();
    assert!(
        object(&s3, "cold").await == theirs,
        "the other client's version is not what S3 holds"
    );
    assert!(
        read_all(&vol, ino, theirs.len() + 1).await == theirs,
        "the file reads as their version"
    );

    // Later writes land on their version.
    let mut want = theirs;
    vol.write(&ROOT, ino, 1, b"x").await.unwrap();
    want[1] = b'x';
    vol.flush_all().await.unwrap();
    assert!(object(&s3, "cold").await == want);
}

/// Two large cold files swap names: each one's bytes must be brought in whole before the other
/// is written over its key, holes included (a hole would be copied from a key that holds the
/// other file by then). On Garage.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn large_cold_files_that_swap_names_keep_their_bytes() {
    let (s3, _bucket) = common::gateway::garage_store().await;
    let s3: Arc<dyn ObjectStore> = s3;
    let (a, b) = (pattern(12 * MIB, 1), pattern(11 * MIB, 2));
    put_object(&*s3, "a", a.clone()).await;
    put_object(&*s3, "b", b.clone()).await;
    let state = tempfile::tempdir().unwrap();
    let vol = open_with_holes(state.path(), &s3).await;
    let root = vol.root();
    vol.lookup(&ROOT, root, b"a").await.unwrap();
    vol.lookup(&ROOT, root, b"b").await.unwrap();
    vol.rename(&ROOT, root, b"a", root, b"t").await.unwrap();
    vol.rename(&ROOT, root, b"b", root, b"a").await.unwrap();
    vol.rename(&ROOT, root, b"t", root, b"b").await.unwrap();
    vol.flush_all().await.unwrap();
    assert!(object(&s3, "a").await == b, "a holds b's bytes");
    assert!(object(&s3, "b").await == a, "b holds a's bytes");
    assert_eq!(s3.head("a").await.unwrap().unwrap().size, b.len() as u64);
    assert_eq!(s3.head("b").await.unwrap().unwrap().size, a.len() as u64);
}

/// A write lands while the upload of a copy with holes completes: the completed object replaces
/// the holes' base, so the holes are re-pointed at it, and the next upload copies them from
/// there. Left pointing at the replaced version, every copy of a hole is refused, and the copy,
/// with that write, is given up for lost. On Garage.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_write_during_the_upload_of_a_copy_with_holes_is_kept() {
    let (s3, _bucket) = common::gateway::garage_store().await;
    let s3: Arc<dyn ObjectStore> = s3;
    let state = tempfile::tempdir().unwrap();
    let (vol, faults, ino, mut want) = cold_file_with_holes(&s3, state.path()).await;
    vol.write(&ROOT, ino, 12 * MIB as u64, b"first").await.unwrap();
    want[12 * MIB..12 * MIB + 5].copy_from_slice(b"first");

    // Just as the first upload completes, another write into the same part (present already,
    // so it needs nothing from S3), from a thread of its own.
    let (writer, once) = (vol.clone(), std::sync::atomic::AtomicBool::new(false));
    faults.set_callback(move |call| {
        if call.op == Op::Complete && !once.swap(true, std::sync::atomic::Ordering::SeqCst) {
            let vol = writer.clone();
            std::thread::spawn(move || {
                let rt = tokio::runtime::Builder::new_current_thread()
                    .enable_all()
                    .build()
                    .unwrap();
                rt.block_on(vol.write(&ROOT, ino, 13 * MIB as u64, b"second")).unwrap();
            })
            .join()
            .unwrap();
        }
        None
    });
    vol.flush_all().await.unwrap();
    faults.clear_callback();
    want[13 * MIB..13 * MIB + 6].copy_from_slice(b"second");
    assert!(object(&s3, "cold").await == want, "the object lacks a write");
    assert!(read_all(&vol, ino, want.len()).await == want);
}

/// A stable WRITE (FILE_SYNC: a database's log write and its fsync in one) into a large file
/// goes to disk on its own when nothing else needs syncing for it, and through the sync group
/// when something does. Here the journal still carries the file's older bytes from when it was
/// small (it grew since, unstably): the stable WRITE must not leave them there, to be replayed
/// over the file at the restart after a crash (its name, synced before, is no reason to sync). And stable WRITEs into a file already durable,
/// in its middle and past its end, are there after one.
#[tokio::test]
async fn stable_writes_survive_a_crash_and_never_bring_back_older_journalled_bytes() {
    let objects = tempfile::tempdir().unwrap();
    let state = tempfile::tempdir().unwrap();
    let store: Arc<dyn ObjectStore> = Arc::new(LocalStore::open(objects.path()).unwrap());
    let mut cfg = VolumeConfig::new(state.path().to_path_buf());
    cfg.flush_delay = std::time::Duration::from_secs(3600);
    let vol = Volume::open(cfg.clone(), store.clone()).await.unwrap();

    // Large and durable already: each stable WRITE needs only its own bytes on disk.
    let durable = create_file(&vol, b"durable").await;
    let mut want_durable = pattern(256 << 10, 4);
    vol.write(&ROOT, durable, 0, &want_durable).await.unwrap();
    vol.sync_durable().await.unwrap();
    for i in 0..4u8 {
        let log = pattern(8 << 10, 10 + i);
        let at = (200 << 10) + i as usize * (24 << 10); // in the middle, then past the end
        vol.write_stable(&ROOT, durable, at as u64, &log).await.unwrap();
        want_durable.resize(want_durable.len().max(at + log.len()), 0);
        want_durable[at..at + log.len()].copy_from_slice(&log);
    }
    assert!(!vol.needs_local_sync(), "stable WRITEs left something to sync");

    // Synced on its own when large (its name with it), journalled when cut small, then grown
    // past the journal's limit again and not synced since.
    let carried = create_file(&vol, b"carried").await;
    vol.write(&ROOT, carried, 0, &pattern(100 << 10, 5)).await.unwrap();
    vol.sync_durable().await.unwrap();
    let cut = SetAttr {
        size: Some(0),
        ..Default::default()
    };
    vol.setattr(&ROOT, carried, cut).await.unwrap();
    let mut want_carried = pattern(10 << 10, 1);
    vol.write(&ROOT, carried, 0, &want_carried).await.unwrap();
    vol.sync_durable().await.unwrap();
    let rest = pattern(100 << 10, 2);
    vol.write(&ROOT, carried, want_carried.len() as u64, &rest)
        .await
        .unwrap();
    want_carried.extend_from_slice(&rest);
    let log = pattern(8 << 10, 3);
    vol.write_stable(&ROOT, carried, 4096, &log).await.unwrap();
    want_carried[4096..4096 + log.len()].copy_from_slice(&log);

    // A crash: the state as the disk holds it now (the core alone runs no background task, and
    // the journal's database writes only at a checkpoint), with no flush and no checkpoint.
    let crashed = tempfile::tempdir().unwrap();
    common::copy_tree(state.path(), crashed.path());
    let mut cfg = cfg.clone();
    cfg.state_dir = crashed.path().to_path_buf();
    let vol = Volume::open(cfg, store.clone()).await.unwrap();
    assert!(
        read_all(&vol, carried, want_carried.len()).await == want_carried,
        "the older journalled bytes came back over a stable WRITE"
    );
    assert!(
        read_all(&vol, durable, want_durable.len()).await == want_durable,
        "stable WRITEs lost in a crash"
    );
    vol.flush_all().await.unwrap();
    assert!(object(&store, "carried").await == want_carried, "in S3");
    assert!(object(&store, "durable").await == want_durable, "in S3");
}

/// With durability s3 a RENAME waits for its move to reach S3; if the gateway's fence goes up
/// meanwhile (a ReadWriteMany owner lost its lease: its journal is thrown away), the RENAME is
/// answered JUKEBOX, so that the client sends it again to the next owner. It was answered OK,
/// and the change, only in the journal of a term that was over, was lost.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_rename_waiting_for_s3_when_the_fence_goes_up_is_not_answered_ok() {
    use s3nfs::store::fenced::{Fence, FencedStore};
    use std::time::Duration;
    let (_objects, _local, store, faults) = embedded_with_faults();
    let fence = Fence::default();
    let state = tempfile::tempdir().unwrap();
    let mut cfg = VolumeConfig::new(state.path().to_path_buf());
    cfg.durability = s3nfs::fs::durable::Durability::S3;
    let vol = Volume::open(cfg, FencedStore::wrap(store, fence.clone()))
        .await
        .unwrap();
    let root = vol.root();
    let ino = create_file(&vol, b"a").await;
    vol.write(&ROOT, ino, 0, b"committed").await.unwrap();
    vol.commit(ino).await.unwrap();

    let mut hold = faults.hold_reply(Op::Copy, "b");
    let renaming = {
        let vol = vol.clone();
        tokio::spawn(async move { vol.rename(&ROOT, root, b"a", root, b"b").await })
    };
    assert!(
        hold.reached(Duration::from_secs(30)).await,
        "the rename sent no copy: nothing checked"
    );
    fence.raise();
    let r = tokio::time::timeout(Duration::from_secs(30), renaming)
        .await
        .expect("the rename still waits after the fence went up")
        .unwrap();
    assert!(
        matches!(r, Err(s3nfs::fs::FsError::Retry(_))),
        "answered {r:?} with the change lost to the fence"
    );
    vol.tasks().abort_all();
}
