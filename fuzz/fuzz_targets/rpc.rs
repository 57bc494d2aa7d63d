//! One RPC record through decoding, dispatch and a real volume on the embedded store (see
//! tests/fuzz_rpc.rs, which runs the same path on stable Rust with mutations of the corpus).
#![no_main]

use std::sync::{Arc, OnceLock};

use libfuzzer_sys::fuzz_target;
use s3nfs::fs::{Volume, VolumeConfig};
use s3nfs::nfs::NfsAdapter;
use s3nfs::store::local::LocalStore;

struct Target {
    rt: tokio::runtime::Runtime,
    fs: Arc<dyn nfsserve::vfs::NFSFileSystem + Send + Sync>,
    volume_id: u64,
    _dirs: (tempfile::TempDir, tempfile::TempDir),
}

fn target() -> &'static Target {
    static T: OnceLock<Target> = OnceLock::new();
    T.get_or_init(|| {
        let rt = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build().unwrap();
        let state = tempfile::tempdir().unwrap();
        let objects = tempfile::tempdir().unwrap();
        let store = Arc::new(LocalStore::open(objects.path()).unwrap());
        let vol = rt.block_on(Volume::open(VolumeConfig::new(state.path().to_path_buf()), store)).unwrap();
        let volume_id = vol.volume_id();
        let fs: Arc<dyn nfsserve::vfs::NFSFileSystem + Send + Sync> = Arc::new(NfsAdapter::new(vol));
        Target { rt, fs, volume_id, _dirs: (state, objects) }
    })
}

fuzz_target!(|data: &[u8]| {
    let t = target();
    // Corpus handles carry a placeholder volume id (0xAA x 8): give them the real one.
    let mut record = data.to_vec();
    let mut i = 0;
    while i + 12 <= record.len() {
        if &record[i..i + 4] == b"S3NF" && record[i + 4..i + 12] == [0xAA; 8] {
            record[i + 4..i + 12].copy_from_slice(&t.volume_id.to_be_bytes());
        }
        i += 1;
    }
    let _ = t.rt.block_on(nfsserve::process_record(t.fs.clone(), &record));
});
