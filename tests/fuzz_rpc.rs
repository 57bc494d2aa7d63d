//! Fuzzing of the RPC record and XDR decoding and of the dispatch, with a real volume (on the
//! embedded store) behind it: a corpus of valid requests (`tests/fuzz/corpus/`, one record per
//! file, written by `write_corpus` below) is mutated (bit flips, overwritten and inserted
//! bytes, truncation, lying length fields) and every mutant goes through
//! `nfsserve::process_record`, the path a connection's records take. Nothing may panic, and
//! the volume must still answer a valid request afterwards.
//!
//! In the suite it runs a bounded number of cases (`S3NFS_FUZZ_CASES`, default 3,000). For a
//! long run: `S3NFS_FUZZ_CASES=1000000 cargo test --release --test fuzz_rpc`. The same corpus
//! feeds the libFuzzer target in `fuzz/` (`cargo +nightly fuzz run rpc`), for those with a
//! nightly toolchain.

mod common;

use std::path::PathBuf;
use std::sync::Arc;

use proptest::prelude::*;
use s3nfs::fs::{Volume, VolumeConfig};
use s3nfs::nfs::NfsAdapter;
use s3nfs::store::local::LocalStore;

use common::rpc::{call, with_volume_id, X};

fn corpus_dir() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/fuzz/corpus")
}

/// One valid request per procedure (and a few variants), against the root (inode 1) and the
/// first inodes a fresh volume hands out.
fn corpus() -> Vec<(&'static str, Vec<u8>)> {
    const NFS: u32 = 100003;
    let n = |p, a| call(7, NFS, 3, p, a);
    let x = X::default;
    vec![
        ("null", n(0, x())),
        ("getattr", n(1, x().fh(1))),
        ("setattr", n(2, x().fh(2).sattr(0o600).u32(0))),
        ("lookup", n(3, x().fh(1).opaque(b"f"))),
        ("access", n(4, x().fh(1).u32(0x3f))),
        ("readlink", n(5, x().fh(3))),
        ("read", n(6, x().fh(2).u64(0).u32(4096))),
        ("write", n(7, x().fh(2).u64(0).u32(5).u32(0).opaque(b"hello"))),
        ("create", n(8, x().fh(1).opaque(b"f").u32(0).sattr(0o644))),
        ("create_exclusive", n(8, x().fh(1).opaque(b"g").u32(2).u64(42))),
        ("mkdir", n(9, x().fh(1).opaque(b"d").sattr(0o755))),
        ("symlink", n(10, x().fh(1).opaque(b"l").sattr(0o777).opaque(b"f"))),
        ("mknod_fifo", n(11, x().fh(1).opaque(b"p").u32(7).sattr(0o644))),
        (
            "mknod_chr",
            n(11, x().fh(1).opaque(b"c").u32(4).sattr(0o644).u32(1).u32(3)),
        ),
        ("remove", n(12, x().fh(1).opaque(b"f"))),
        ("rmdir", n(13, x().fh(1).opaque(b"d"))),
        ("rename", n(14, x().fh(1).opaque(b"f").fh(1).opaque(b"f2"))),
        ("link", n(15, x().fh(2).fh(1).opaque(b"h"))),
        ("readdir", n(16, x().fh(1).u64(0).u64(0).u32(4096))),
        ("readdirplus", n(17, x().fh(1).u64(0).u64(0).u32(4096).u32(65536))),
        ("fsstat", n(18, x().fh(1))),
        ("fsinfo", n(19, x().fh(1))),
        ("pathconf", n(20, x().fh(1))),
        ("commit", n(21, x().fh(2).u64(0).u32(0))),
        ("mount", call(8, 100005, 3, 1, x().opaque(b"/"))),
        ("umount", call(9, 100005, 3, 3, x().opaque(b"/"))),
        (
            "portmap_getport",
            call(10, 100000, 2, 3, x().u32(100003).u32(3).u32(6).u32(0)),
        ),
    ]
}

/// Rewrites the corpus files (run when the corpus changes: `cargo test --test fuzz_rpc --
/// --ignored write_corpus`).
#[test]
#[ignore]
fn write_corpus() {
    std::fs::create_dir_all(corpus_dir()).unwrap();
    for (name, bytes) in corpus() {
        std::fs::write(corpus_dir().join(format!("{name}.bin")), bytes).unwrap();
    }
}

fn read_corpus() -> Vec<Vec<u8>> {
    let mut files: Vec<_> = std::fs::read_dir(corpus_dir())
        .expect("tests/fuzz/corpus")
        .map(|e| e.unwrap().path())
        .collect();
    files.sort();
    files.into_iter().map(|p| std::fs::read(p).unwrap()).collect()
}

/// The corpus on disk is what `corpus()` builds: a change to one without the other fails here.
#[test]
fn the_checked_in_corpus_is_current() {
    let mut built: Vec<Vec<u8>> = {
        let mut c = corpus();
        c.sort_by(|a, b| a.0.cmp(b.0));
        c.into_iter().map(|(_, b)| b).collect()
    };
    let mut on_disk = read_corpus();
    built.sort();
    on_disk.sort();
    assert_eq!(built, on_disk, "rerun write_corpus");
}

#[derive(Debug, Clone)]
enum Mutation {
    Flip(usize, u8),
    Set(usize, u8),
    Insert(usize, Vec<u8>),
    Truncate(usize),
    /// A 32-bit field made huge (a length that lies).
    Huge(usize),
}

fn mutation() -> impl Strategy<Value = Mutation> {
    prop_oneof![
        (any::<usize>(), 0u8..8).prop_map(|(i, b)| Mutation::Flip(i, b)),
        (any::<usize>(), any::<u8>()).prop_map(|(i, v)| Mutation::Set(i, v)),
        (any::<usize>(), proptest::collection::vec(any::<u8>(), 1..16)).prop_map(|(i, v)| Mutation::Insert(i, v)),
        any::<usize>().prop_map(Mutation::Truncate),
        any::<usize>().prop_map(Mutation::Huge),
    ]
}

fn mutate(mut b: Vec<u8>, ms: &[Mutation]) -> Vec<u8> {
    for m in ms {
        let len = b.len().max(1);
        match m {
            Mutation::Flip(i, bit) if !b.is_empty() => b[i % len] ^= 1 << bit,
            Mutation::Set(i, v) if !b.is_empty() => b[i % len] = *v,
            Mutation::Insert(i, v) => {
                let at = i % (b.len() + 1);
                b.splice(at..at, v.iter().copied());
            }
            Mutation::Truncate(i) => b.truncate(i % len),
            Mutation::Huge(i) if b.len() >= 4 => {
                let at = (i % (b.len() / 4)) * 4;
                b[at..at + 4].copy_from_slice(&0xffff_fff0u32.to_be_bytes());
            }
            _ => {}
        }
    }
    b
}

struct Target {
    rt: tokio::runtime::Runtime,
    vol: Arc<Volume>,
    fs: Arc<dyn nfsserve::vfs::NFSFileSystem + Send + Sync>,
    _dirs: (tempfile::TempDir, tempfile::TempDir),
}

fn target() -> Target {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    let state = tempfile::tempdir().unwrap();
    let objects = tempfile::tempdir().unwrap();
    let store = Arc::new(LocalStore::open(objects.path()).unwrap());
    let vol = rt
        .block_on(Volume::open(VolumeConfig::new(state.path().to_path_buf()), store))
        .unwrap();
    let fs: Arc<dyn nfsserve::vfs::NFSFileSystem + Send + Sync> = Arc::new(NfsAdapter::new(vol.clone()));
    // Something to find: the corpus's requests, valid, once; most succeed.
    let mut ok = 0;
    for r in read_corpus() {
        let reply = rt.block_on(nfsserve::process_record(
            fs.clone(),
            &with_volume_id(r, vol.volume_id()),
        ));
        ok += reply.is_some_and(|r| r.len() >= 28 && r[20..28] == [0; 8]) as usize;
    }
    assert!(ok >= 15, "only {ok} corpus requests succeeded");
    Target {
        rt,
        vol,
        fs,
        _dirs: (state, objects),
    }
}

#[test]
fn mutated_requests_never_panic_and_the_volume_keeps_answering() {
    let t = target();
    let corpus = read_corpus();
    let cases: u32 = std::env::var("S3NFS_FUZZ_CASES")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(3000);
    let mut runner = proptest::test_runner::TestRunner::new(ProptestConfig {
        cases,
        failure_persistence: None,
        ..ProptestConfig::default()
    });
    let strategy = (0..corpus.len(), proptest::collection::vec(mutation(), 1..6));
    let started = std::time::Instant::now();
    let answered = std::sync::atomic::AtomicU32::new(0);
    let ok = std::sync::atomic::AtomicU32::new(0);
    runner
        .run(&strategy, |(i, ms)| {
            let record = with_volume_id(mutate(corpus[i].clone(), &ms), t.vol.volume_id());
            let fs = t.fs.clone();
            // A panic anywhere on the path fails the case (and proptest shrinks it).
            let reply = t.rt.block_on(nfsserve::process_record(fs, &record));
            if let Some(r) = reply {
                prop_assert!(r.len() <= (2 << 20), "a {}-byte reply", r.len());
                answered.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                if r.len() >= 28 && r[20..28] == [0; 8] {
                    ok.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                }
            }
            Ok(())
        })
        .unwrap();
    let (answered, ok) = (answered.into_inner(), ok.into_inner());
    eprintln!(
        "{cases} mutated requests in {:?}: {answered} answered, {ok} of them successfully",
        started.elapsed()
    );
    // The mutants must reach past the decoding: a share of them are still valid calls.
    assert!(
        ok > cases / 100,
        "only {ok} mutants succeeded: the corpus does not reach the filesystem"
    );
    // Still answering: a valid GETATTR of the root gets NFS3_OK.
    let getattr = with_volume_id(call(99, 100003, 3, 1, X::default().fh(1)), t.vol.volume_id());
    let reply = t.rt.block_on(nfsserve::process_record(t.fs.clone(), &getattr)).unwrap();
    assert_eq!(&reply[0..4], &99u32.to_be_bytes());
    assert_eq!(&reply[20..28], &[0; 8], "GETATTR of the root after the fuzzing");
}
