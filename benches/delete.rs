//! Deleting a volume's objects, as DeleteVolume does: one DeleteObjects request per 1,000 keys
//! against the baseline of one DeleteObject per key (16 in flight), on the same Garage, in the
//! same run, on 10,000 objects each.
//!
//! `cargo bench --bench delete` (S3NFS_DELETE_OBJECTS=N for another count).

#[path = "../tests/common/mod.rs"]
mod common;

use std::time::Instant;

use bytes::Bytes;
use common::garage;
use futures::StreamExt;
use s3nfs::store::s3::S3Store;
use s3nfs::store::{Body, ObjectStore};

async fn fill(s3: &S3Store, prefix: &str, n: usize) -> Vec<String> {
    let keys: Vec<String> = (0..n).map(|i| format!("{prefix}/{i:06}")).collect();
    futures::stream::iter(keys.iter())
        .map(|k| async move {
            s3.put(k, Body::Bytes(Bytes::from_static(b"x")), &Default::default())
                .await
                .unwrap()
        })
        .buffer_unordered(32)
        .collect::<Vec<_>>()
        .await;
    keys
}

async fn left(s3: &S3Store, prefix: &str) -> usize {
    s3.list(prefix, None, None, 1000).await.unwrap().objects.len()
}

fn main() {
    let n: usize = std::env::var("S3NFS_DELETE_OBJECTS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(10_000);
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(async {
        let bucket = garage::shared().unique_bucket();
        let s3 = S3Store::connect(garage::shared().s3_config(&bucket)).await.unwrap();
        eprintln!("putting 2 x {n} objects");
        let one = fill(&s3, "one", n).await;
        let batch = fill(&s3, "batch", n).await;

        let t = Instant::now();
        futures::stream::iter(one.iter())
            .map(|k| s3.delete(k))
            .buffer_unordered(16)
            .collect::<Vec<_>>()
            .await
            .into_iter()
            .collect::<Result<Vec<_>, _>>()
            .unwrap();
        let singles = t.elapsed();
        assert_eq!(left(&s3, "one/").await, 0);

        let t = Instant::now();
        s3.delete_many(&batch).await.unwrap();
        let batched = t.elapsed();
        assert_eq!(left(&s3, "batch/").await, 0);

        println!("| deleting {n} objects | time | requests |");
        println!("|---|---|---|");
        println!(
            "| DeleteObject each, 16 in flight (baseline) | {:.2} s | {n} |",
            singles.as_secs_f64()
        );
        println!(
            "| DeleteObjects, 1,000 keys a request | {:.2} s | {} |",
            batched.as_secs_f64(),
            n.div_ceil(s3nfs::store::DELETE_BATCH)
        );
        println!(
            "ratio: batched takes {:.2}x the baseline's time",
            batched.as_secs_f64() / singles.as_secs_f64()
        );
    });
}
