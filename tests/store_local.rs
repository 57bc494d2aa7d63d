//! LocalStore against S3's semantics.

use std::collections::BTreeMap;
use std::io::Write;

use bytes::Bytes;
use s3nfs::store::local::{LocalStore, MIN_PART_SIZE};
use s3nfs::store::{Body, ObjectStore, Part, StoreError, UserMeta};

fn open() -> (tempfile::TempDir, LocalStore) {
    let dir = tempfile::tempdir().unwrap();
    let s = LocalStore::open(dir.path()).unwrap();
    (dir, s)
}

fn b(s: &str) -> Body {
    Body::Bytes(Bytes::from(s.to_string()))
}

fn none() -> UserMeta {
    UserMeta::new()
}

fn meta(pairs: &[(&str, &str)]) -> UserMeta {
    pairs
        .iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect::<BTreeMap<_, _>>()
}

async fn keys(s: &LocalStore, prefix: &str) -> Vec<String> {
    let page = s.list(prefix, None, None, 1000).await.unwrap();
    page.objects.into_iter().map(|o| o.key).collect()
}

#[tokio::test]
async fn key_beside_its_children_and_markers() {
    let (_d, s) = open();
    s.put("a", b("file a"), &none()).await.unwrap();
    s.put("a/b", b("file a/b"), &none()).await.unwrap();
    s.put("d/", b(""), &none()).await.unwrap();
    s.put("d/x", b("x"), &none()).await.unwrap();

    assert_eq!(s.get_range("a", 0..100).await.unwrap(), "file a");
    assert_eq!(s.get_range("a/b", 0..100).await.unwrap(), "file a/b");
    let marker = s.head("d/").await.unwrap().unwrap();
    assert_eq!(marker.key, "d/");
    assert_eq!(marker.size, 0);
    assert_eq!(s.head("d").await.unwrap(), None);
    assert_eq!(keys(&s, "").await, ["a", "a/b", "d/", "d/x"]);

    // Deleting one leaves the other.
    s.delete("a").await.unwrap();
    assert_eq!(s.head("a").await.unwrap(), None);
    assert!(s.head("a/b").await.unwrap().is_some());
    s.delete("a").await.unwrap(); // idempotent
    s.delete("d/").await.unwrap();
    assert_eq!(keys(&s, "").await, ["a/b", "d/x"]);
}

#[tokio::test]
async fn odd_and_long_keys() {
    let (_d, s) = open();
    let long = "k".repeat(1024);
    let odd = "über/../ späß \u{1F600}/./\\x\n";
    s.put(&long, b("1"), &none()).await.unwrap();
    s.put(odd, b("2"), &none()).await.unwrap();
    assert_eq!(s.head(&long).await.unwrap().unwrap().size, 1);
    assert_eq!(s.get_range(odd, 0..1).await.unwrap(), "2");
    let too_long = "k".repeat(1025);
    assert!(matches!(
        s.put(&too_long, b("1"), &none()).await,
        Err(StoreError::Invalid(_))
    ));
    assert!(matches!(s.put("", b("1"), &none()).await, Err(StoreError::Invalid(_))));
}

#[tokio::test]
async fn overwrite_replaces() {
    let (_d, s) = open();
    let e1 = s.put("k", b("one"), &none()).await.unwrap();
    let e2 = s.put("k", b("second"), &none()).await.unwrap();
    assert_ne!(e1, e2);
    assert_eq!(s.get_range("k", 0..100).await.unwrap(), "second");
    assert_eq!(s.head("k").await.unwrap().unwrap().etag, e2);
    assert_eq!(keys(&s, "").await, ["k"]);
    // Equal contents, equal ETags.
    assert_eq!(s.put("k2", b("second"), &none()).await.unwrap(), e2);
}

#[tokio::test]
async fn delimiter_listing_with_common_prefixes() {
    let (_d, s) = open();
    for k in ["a", "a/b", "a/c/d", "a0", "b/", "b/x", "c", "dir/sub/f", "dir/g"] {
        s.put(k, b(k), &none()).await.unwrap();
    }
    let p = s.list("", Some("/"), None, 1000).await.unwrap();
    let objs: Vec<_> = p.objects.iter().map(|o| o.key.as_str()).collect();
    assert_eq!(objs, ["a", "a0", "c"]);
    assert_eq!(p.prefixes, ["a/", "b/", "dir/"]);
    assert_eq!(p.next, None);

    let p = s.list("a/", Some("/"), None, 1000).await.unwrap();
    let objs: Vec<_> = p.objects.iter().map(|o| o.key.as_str()).collect();
    assert_eq!(objs, ["a/b"]);
    assert_eq!(p.prefixes, ["a/c/"]);

    // The marker itself is an object of its own prefix.
    let p = s.list("b/", Some("/"), None, 1000).await.unwrap();
    let objs: Vec<_> = p.objects.iter().map(|o| o.key.as_str()).collect();
    assert_eq!(objs, ["b/", "b/x"]);
    assert!(p.prefixes.is_empty());

    // A prefix that is not a directory.
    let p = s.list("a", Some("/"), None, 1000).await.unwrap();
    let objs: Vec<_> = p.objects.iter().map(|o| o.key.as_str()).collect();
    assert_eq!(objs, ["a", "a0"]);
    assert_eq!(p.prefixes, ["a/"]);

    // Without a delimiter: everything under the prefix.
    assert_eq!(keys(&s, "dir/").await, ["dir/g", "dir/sub/f"]);
    assert!(keys(&s, "zzz").await.is_empty());
}

#[tokio::test]
async fn pagination_25_keys_10_per_page() {
    let (_d, s) = open();
    // 20 plain objects and 5 directories of 3 objects each, interleaved in key order.
    let mut expected = Vec::new();
    for i in 0..25 {
        if i % 5 == 2 {
            // directory entries
            for j in 0..3 {
                s.put(&format!("p/k{i:02}/f{j}"), b("x"), &none()).await.unwrap();
            }
            expected.push(format!("p/k{i:02}/"));
        } else {
            s.put(&format!("p/k{i:02}"), b("x"), &none()).await.unwrap();
            expected.push(format!("p/k{i:02}"));
        }
    }
    s.put("q", b("outside"), &none()).await.unwrap();
    s.put("o", b("outside"), &none()).await.unwrap();

    let mut got = Vec::new();
    let mut token = None;
    let mut pages = 0;
    loop {
        let p = s.list("p/", Some("/"), token, 10).await.unwrap();
        pages += 1;
        assert!(p.objects.len() + p.prefixes.len() <= 10);
        // Merge the page's objects and prefixes back into key order.
        let mut page: Vec<String> = p
            .objects
            .iter()
            .map(|o| o.key.clone())
            .chain(p.prefixes.iter().cloned())
            .collect();
        page.sort();
        got.extend(page);
        match p.next {
            Some(t) => token = Some(t),
            None => break,
        }
    }
    assert_eq!(pages, 3);
    assert_eq!(got, expected);

    // Without delimiter: 20 + 5 * 3 = 35 objects, pages of 10.
    let mut n = 0;
    let mut token = None;
    let mut last = String::new();
    loop {
        let p = s.list("p/", None, token, 10).await.unwrap();
        for o in &p.objects {
            assert!(o.key > last);
            last = o.key.clone();
        }
        n += p.objects.len();
        match p.next {
            Some(t) => token = Some(t),
            None => break,
        }
    }
    assert_eq!(n, 35);

    // A full page exactly at the end reports no next page.
    let p = s.list("p/k0", None, None, 5).await.unwrap();
    let all = s.list("p/k0", None, None, 1000).await.unwrap();
    assert_eq!(p.next.is_some(), all.objects.len() > 5);
}

#[tokio::test]
async fn metadata_round_trip_and_copy() {
    let (_d, s) = open();
    let m1 = meta(&[
        ("mode", "33188"),
        ("uid", "1000"),
        ("gid", "1000"),
        ("mtime", "1700000000"),
    ]);
    let etag = s.put("f", b("payload"), &m1).await.unwrap();
    let h = s.head("f").await.unwrap().unwrap();
    assert_eq!(h.user, m1);
    assert_eq!(h.etag, etag);
    assert_eq!(h.size, 7);
    assert!(h.last_modified > 1_600_000_000);

    // Copy elsewhere with new metadata.
    let m2 = meta(&[("mode", "33261")]);
    let e2 = s.copy("f", None, "g", &m2).await.unwrap();
    assert_eq!(e2, etag);
    assert_eq!(s.head("g").await.unwrap().unwrap().user, m2);
    assert_eq!(s.head("f").await.unwrap().unwrap().user, m1);
    assert_eq!(s.get_range("g", 0..7).await.unwrap(), "payload");

    // Copy onto itself replaces the metadata and keeps the content.
    let m3 = meta(&[("mode", "16877"), ("mtime", "1")]);
    s.copy("f", None, "f", &m3).await.unwrap();
    let h = s.head("f").await.unwrap().unwrap();
    assert_eq!(h.user, m3);
    assert_eq!(s.get_range("f", 0..100).await.unwrap(), "payload");
    assert_eq!(keys(&s, "").await, ["f", "g"]);

    // Deleting the copy leaves the source (copies share data by hard link).
    s.delete("g").await.unwrap();
    assert_eq!(s.get_range("f", 0..100).await.unwrap(), "payload");

    assert!(matches!(
        s.copy("missing", None, "x", &none()).await,
        Err(StoreError::NotFound(_))
    ));
}

#[tokio::test]
async fn ranged_get() {
    let (_d, s) = open();
    s.put("r", b("0123456789"), &none()).await.unwrap();
    assert_eq!(s.get_range("r", 2..5).await.unwrap(), "234");
    assert_eq!(s.get_range("r", 8..100).await.unwrap(), "89");
    assert_eq!(s.get_range("r", 10..20).await.unwrap(), "");
    assert_eq!(s.get_range("r", 50..60).await.unwrap(), "");
    assert!(matches!(s.get_range("nope", 0..1).await, Err(StoreError::NotFound(_))));
}

fn filled(len: usize, seed: u8) -> Bytes {
    Bytes::from(
        (0..len)
            .map(|i| (i as u8).wrapping_mul(31).wrapping_add(seed))
            .collect::<Vec<_>>(),
    )
}

#[tokio::test]
async fn multipart() {
    let (_d, s) = open();
    let m = meta(&[("mode", "33188")]);
    let id = s.create_multipart("big", &m).await.unwrap();
    let p1 = filled(MIN_PART_SIZE as usize, 1);
    let p2 = filled(MIN_PART_SIZE as usize, 2);
    let p3 = filled(1000, 3);
    // A first upload of part 1, then replaced.
    s.upload_part("big", &id, 1, Body::Bytes(filled(10, 9))).await.unwrap();
    let e1 = s.upload_part("big", &id, 1, Body::Bytes(p1.clone())).await.unwrap();
    let e3 = s.upload_part("big", &id, 3, Body::Bytes(p3.clone())).await.unwrap();
    let e2 = s.upload_part("big", &id, 2, Body::Bytes(p2.clone())).await.unwrap();
    // Not visible before completion.
    assert_eq!(s.head("big").await.unwrap(), None);

    // Out of order, and a wrong ETag, are refused.
    let bad_order = [
        Part {
            number: 2,
            etag: e2.clone(),
        },
        Part {
            number: 1,
            etag: e1.clone(),
        },
    ];
    assert!(matches!(
        s.complete_multipart("big", &id, &bad_order).await,
        Err(StoreError::Invalid(m)) if m.contains("InvalidPartOrder")
    ));
    let bad_etag = [Part {
        number: 1,
        etag: e2.clone(),
    }];
    assert!(matches!(
        s.complete_multipart("big", &id, &bad_etag).await,
        Err(StoreError::Invalid(m)) if m.contains("InvalidPart")
    ));

    let parts = [
        Part { number: 1, etag: e1 },
        Part { number: 2, etag: e2 },
        Part { number: 3, etag: e3 },
    ];
    let etag = s.complete_multipart("big", &id, &parts).await.unwrap();
    assert!(etag.ends_with("-3"), "{etag}");
    let h = s.head("big").await.unwrap().unwrap();
    assert_eq!(h.size, 2 * MIN_PART_SIZE + 1000);
    assert_eq!(h.user, m);
    assert_eq!(h.etag, etag);
    let n = MIN_PART_SIZE;
    assert_eq!(s.get_range("big", 0..n).await.unwrap(), p1);
    assert_eq!(s.get_range("big", n..2 * n).await.unwrap(), p2);
    assert_eq!(s.get_range("big", 2 * n..3 * n).await.unwrap(), p3);
    // A retried completion (the first reply lost) answers the same.
    assert_eq!(s.complete_multipart("big", &id, &parts).await.unwrap(), etag);
    // The upload is gone.
    assert!(matches!(
        s.upload_part("big", &id, 4, b("x")).await,
        Err(StoreError::NotFound(_))
    ));
}

#[tokio::test]
async fn multipart_entity_too_small_abort_and_part_copy() {
    let (d, s) = open();
    let id = s.create_multipart("small", &none()).await.unwrap();
    let e1 = s.upload_part("small", &id, 1, b("tiny")).await.unwrap();
    let e2 = s.upload_part("small", &id, 2, b("last")).await.unwrap();
    let parts = [
        Part {
            number: 1,
            etag: e1.clone(),
        },
        Part { number: 2, etag: e2 },
    ];
    assert!(matches!(
        s.complete_multipart("small", &id, &parts).await,
        Err(StoreError::Invalid(m)) if m.contains("EntityTooSmall")
    ));
    // A single small part is fine: the last part may be small.
    let one = [Part { number: 1, etag: e1 }];
    let etag = s.complete_multipart("small", &id, &one).await.unwrap();
    assert!(etag.ends_with("-1"));
    assert_eq!(s.get_range("small", 0..10).await.unwrap(), "tiny");

    // Part copy from a range of an existing object.
    s.put("src", Body::Bytes(filled(MIN_PART_SIZE as usize + 10, 7)), &none())
        .await
        .unwrap();
    let id = s.create_multipart("dst", &none()).await.unwrap();
    let src = s.head("src").await.unwrap().unwrap().etag;
    let c1 = s
        .upload_part_copy("dst", &id, 1, "src", &src, 0..MIN_PART_SIZE)
        .await
        .unwrap();
    let c2 = s
        .upload_part_copy("dst", &id, 2, "src", &src, MIN_PART_SIZE..MIN_PART_SIZE + 10)
        .await
        .unwrap();
    assert!(matches!(
        s.upload_part_copy("dst", &id, 3, "src", &src, 0..MIN_PART_SIZE + 11)
            .await,
        Err(StoreError::Invalid(_))
    ));
    s.complete_multipart(
        "dst",
        &id,
        &[Part { number: 1, etag: c1 }, Part { number: 2, etag: c2 }],
    )
    .await
    .unwrap();
    assert_eq!(
        s.get_range("dst", 0..u64::MAX).await.unwrap(),
        s.get_range("src", 0..u64::MAX).await.unwrap()
    );

    // Abort removes the upload; aborting again succeeds.
    let id = s.create_multipart("gone", &none()).await.unwrap();
    s.upload_part("gone", &id, 1, b("x")).await.unwrap();
    s.abort_multipart("gone", &id).await.unwrap();
    s.abort_multipart("gone", &id).await.unwrap();
    assert!(matches!(
        s.upload_part("gone", &id, 2, b("x")).await,
        Err(StoreError::NotFound(_))
    ));
    assert_eq!(s.head("gone").await.unwrap(), None);
    assert_eq!(std::fs::read_dir(d.path().join("uploads")).unwrap().count(), 0);

    // Bad part numbers and unknown uploads.
    let id = s.create_multipart("k", &none()).await.unwrap();
    assert!(matches!(
        s.upload_part("k", &id, 0, b("x")).await,
        Err(StoreError::Invalid(_))
    ));
    assert!(matches!(
        s.upload_part("k", "0123abcd", 1, b("x")).await,
        Err(StoreError::NotFound(_))
    ));
    assert!(matches!(
        s.upload_part("k", "../../etc", 1, b("x")).await,
        Err(StoreError::NotFound(_))
    ));
    assert!(matches!(
        s.upload_part("other-key", &id, 1, b("x")).await,
        Err(StoreError::NotFound(_))
    ));
}

/// Every file under objects/, sorted.
fn object_files(root: &std::path::Path) -> Vec<std::path::PathBuf> {
    let mut v = Vec::new();
    for fan in std::fs::read_dir(root.join("objects")).unwrap() {
        for f in std::fs::read_dir(fan.unwrap().path()).unwrap() {
            v.push(f.unwrap().path());
        }
    }
    v.sort();
    v
}

#[tokio::test]
async fn reopen_keeps_objects_and_cleans_orphans() {
    let dir = tempfile::tempdir().unwrap();
    let m = meta(&[("uid", "7")]);
    let a_files;
    let ab_files;
    let saved: Vec<(std::path::PathBuf, Vec<u8>)>;
    {
        let s = LocalStore::open(dir.path()).unwrap();
        // The root is locked while open.
        assert!(LocalStore::open(dir.path()).is_err());
        s.put("a", b("A"), &m).await.unwrap();
        let files = object_files(dir.path());
        a_files = (files[0].clone(), files[1].clone());
        s.put("a/b", b("AB"), &none()).await.unwrap();
        ab_files = object_files(dir.path());
        s.put("x", b("old"), &none()).await.unwrap();
        // Keep the old version's files, to bring them back as a crash between the new
        // version's commit and the old one's removal would leave them.
        saved = object_files(dir.path())
            .into_iter()
            .filter(|p| p.file_name() != a_files.0.file_name() && p.file_name() != a_files.1.file_name())
            .filter(|p| !ab_files.contains(p))
            .map(|p| (p.clone(), std::fs::read(&p).unwrap()))
            .collect();
        assert_eq!(saved.len(), 2);
        s.put("x", b("new"), &none()).await.unwrap();
        s.put("del", b("d"), &none()).await.unwrap();
        s.delete("del").await.unwrap();
        s.check().await.unwrap();
    }
    // Leftovers of a crash: the replaced version of "x" still on disk,
    for (p, bytes) in &saved {
        std::fs::write(p, bytes).unwrap();
    }
    // a half-written temp file and a data file without a sidecar.
    std::fs::write(dir.path().join("tmp/00000000000000ff.data"), b"half").unwrap();
    let orphan = dir.path().join("objects/fe/00000000000000fe.data");
    std::fs::create_dir_all(orphan.parent().unwrap()).unwrap();
    std::fs::write(&orphan, b"orphan").unwrap();

    let s = LocalStore::open(dir.path()).unwrap();
    assert_eq!(keys(&s, "").await, ["a", "a/b", "x"]);
    assert_eq!(s.head("a").await.unwrap().unwrap().user, m);
    assert_eq!(s.get_range("x", 0..10).await.unwrap(), "new");
    assert!(!orphan.exists());
    for (p, _) in &saved {
        assert!(!p.exists(), "{} survived", p.display());
    }
    assert_eq!(std::fs::read_dir(dir.path().join("tmp")).unwrap().count(), 0);
    // New writes after reopen do not collide with old ids.
    s.put("y", b("Y"), &none()).await.unwrap();
    assert_eq!(s.get_range("a", 0..10).await.unwrap(), "A");
    assert_eq!(keys(&s, "").await, ["a", "a/b", "x", "y"]);
}

#[tokio::test]
async fn file_body_is_streamed_from_disk() {
    let (_d, s) = open();
    let src = tempfile::NamedTempFile::new().unwrap();
    // 3.5 MiB: several 1 MiB chunks, the last partial.
    let data = filled(3 * 1024 * 1024 + 512 * 1024, 5);
    src.as_file().write_all(&data).unwrap();
    let off = 1000u64;
    let len = data.len() as u64 - 5000;
    let etag = s
        .put(
            "f",
            Body::File {
                path: src.path().to_path_buf(),
                offset: off,
                len,
            },
            &none(),
        )
        .await
        .unwrap();
    let h = s.head("f").await.unwrap().unwrap();
    assert_eq!(h.size, len);
    let got = s.get_range("f", 0..len).await.unwrap();
    assert_eq!(got, data.slice(off as usize..(off + len) as usize));
    // Same bytes as a Bytes body: same ETag.
    let e2 = s
        .put(
            "g",
            Body::Bytes(data.slice(off as usize..(off + len) as usize)),
            &none(),
        )
        .await
        .unwrap();
    assert_eq!(etag, e2);

    // A file part for multipart.
    let id = s.create_multipart("mp", &none()).await.unwrap();
    let e = s
        .upload_part(
            "mp",
            &id,
            1,
            Body::File {
                path: src.path().to_path_buf(),
                offset: 0,
                len: 10,
            },
        )
        .await
        .unwrap();
    s.complete_multipart("mp", &id, &[Part { number: 1, etag: e }])
        .await
        .unwrap();
    assert_eq!(s.get_range("mp", 0..100).await.unwrap(), data.slice(0..10));

    // A body file shorter than its stated length fails and leaves nothing behind.
    let r = s
        .put(
            "short",
            Body::File {
                path: src.path().to_path_buf(),
                offset: 0,
                len: data.len() as u64 + 1,
            },
            &none(),
        )
        .await;
    assert!(matches!(r, Err(StoreError::Io(_))));
    assert_eq!(s.head("short").await.unwrap(), None);
    let missing = s
        .put(
            "m",
            Body::File {
                path: "/nonexistent/file".into(),
                offset: 0,
                len: 1,
            },
            &none(),
        )
        .await;
    assert!(matches!(missing, Err(StoreError::Io(_))));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_overwrites_and_reads() {
    let (d, s) = open();
    s.put("hot", b("v0"), &none()).await.unwrap();
    let mut tasks = Vec::new();
    for i in 0..8 {
        let s = s.clone();
        tasks.push(tokio::spawn(async move {
            for j in 0..20 {
                if i % 2 == 0 {
                    s.put("hot", b(&format!("w{i}-{j}")), &none()).await.unwrap();
                } else {
                    let v = s.get_range("hot", 0..100).await.unwrap();
                    assert!(!v.is_empty());
                    s.copy("hot", None, &format!("c{i}"), &none()).await.unwrap();
                }
            }
        }));
    }
    for t in tasks {
        t.await.unwrap();
    }
    let final_value = s.get_range("hot", 0..100).await.unwrap();
    drop(s);
    let s = LocalStore::open(d.path()).unwrap();
    assert_eq!(s.get_range("hot", 0..100).await.unwrap(), final_value);
    // One data file and one sidecar per object: nothing leaked.
    let mut files = 0;
    for fan in std::fs::read_dir(d.path().join("objects")).unwrap() {
        files += std::fs::read_dir(fan.unwrap().path()).unwrap().count();
    }
    assert_eq!(files, 2 * keys(&s, "").await.len());
}
