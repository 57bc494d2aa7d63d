//! Large files through the core: multipart uploads that stream while the file is written, parts
//! rewritten after they were uploaded, truncation in the middle of an upload, and a restart with
//! an upload in flight. The object in the store must always end up equal to the file.

use std::sync::Arc;

use s3nfs::fs::{SetAttr, Volume, VolumeConfig};
use s3nfs::store::local::LocalStore;
use s3nfs::store::ObjectStore;

/// The core called directly acts as root (permission checks are tested through NFS).
static ROOT: std::sync::LazyLock<s3nfs::fs::Cred> = std::sync::LazyLock::new(s3nfs::fs::Cred::root);

const MIB: usize = 1 << 20;
const PART: u64 = 5 << 20;

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
    let root = vol.root();
    let ino = vol
        .create(&ROOT, root, b"big", SetAttr::default(), true)
        .await
        .unwrap()
        .ino;

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
