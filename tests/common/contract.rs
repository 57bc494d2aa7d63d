//! The S3 semantics the filesystem relies on, as one test body any `ObjectStore` must pass.
//!
//! `contract` works under the key prefix `ct/` and leaves it empty; the store may hold other
//! keys elsewhere.

use std::ops::Range;

use bytes::Bytes;
use s3nfs::store::{Body, ObjectStore, Part, StoreError, UserMeta};

const MIB: usize = 1024 * 1024;

fn meta(pairs: &[(&str, &str)]) -> UserMeta {
    pairs.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect()
}

/// Bytes that differ at every offset, so misplaced ranges show.
fn pattern(len: usize, seed: u8) -> Vec<u8> {
    (0..len)
        .map(|i| (i as u32).wrapping_mul(2_654_435_761).rotate_right(13) as u8 ^ seed)
        .collect()
}

async fn get(store: &dyn ObjectStore, key: &str, range: Range<u64>) -> Bytes {
    store
        .get_range(key, range.clone())
        .await
        .unwrap_or_else(|e| panic!("get {key} {range:?}: {e}"))
}

async fn list_all(
    store: &dyn ObjectStore,
    prefix: &str,
    delimiter: Option<&str>,
    max_keys: usize,
) -> (Vec<String>, Vec<String>, usize) {
    let (mut keys, mut prefixes, mut pages) = (Vec::new(), Vec::new(), 0);
    let mut next = None;
    loop {
        let page = store
            .list(prefix, delimiter, next.take(), max_keys)
            .await
            .unwrap_or_else(|e| panic!("list {prefix}: {e}"));
        pages += 1;
        assert!(
            page.objects.len() + page.prefixes.len() <= max_keys,
            "page over max_keys"
        );
        keys.extend(page.objects.into_iter().map(|o| o.key));
        prefixes.extend(page.prefixes);
        match page.next {
            Some(token) => next = Some(token),
            None => break,
        }
        assert!(pages < 100, "listing does not end");
    }
    (keys, prefixes, pages)
}

pub async fn contract(store: &dyn ObjectStore) {
    store.check().await.expect("check");
    assert!(!store.describe().is_empty());

    // Missing objects.
    assert_eq!(store.head("ct/missing").await.unwrap(), None);
    match store.get_range("ct/missing", 0..10).await {
        Err(StoreError::NotFound(_)) => {}
        other => panic!("get of a missing key: {other:?}"),
    }
    store.delete("ct/missing").await.expect("delete of a missing key");

    // A batch delete: keys that exist go, a missing one is no error, others stay.
    for k in ["ct/batch/1", "ct/batch/2", "ct/batch/3"] {
        store
            .put(k, Body::Bytes(Bytes::from_static(b"b")), &Default::default())
            .await
            .unwrap();
    }
    store
        .delete_many(&["ct/batch/1".into(), "ct/batch/missing".into(), "ct/batch/3".into()])
        .await
        .expect("delete_many");
    let left: Vec<_> = store
        .list("ct/batch/", None, None, 10)
        .await
        .unwrap()
        .objects
        .into_iter()
        .map(|o| o.key)
        .collect();
    assert_eq!(left, ["ct/batch/2"]);
    store.delete("ct/batch/2").await.unwrap();

    // A directory marker, `a` beside `a/b`, user metadata.
    let dir_meta = meta(&[("mode", "16877"), ("uid", "0"), ("gid", "0"), ("mtime", "1700000000")]);
    store
        .put("ct/d/", Body::Bytes(Bytes::new()), &dir_meta)
        .await
        .expect("put marker");
    let marker = store.head("ct/d/").await.unwrap().expect("head of the d/ marker");
    assert_eq!(marker.size, 0);
    assert_eq!(marker.key, "ct/d/");
    assert_eq!(marker.user, dir_meta);

    let file_meta = meta(&[
        ("mode", "33188"),
        ("uid", "1000"),
        ("gid", "100"),
        ("mtime", "1700000000.123456789"),
    ]);
    let etag = store
        .put("ct/a", Body::Bytes(Bytes::from_static(b"hello world")), &file_meta)
        .await
        .expect("put a");
    assert!(!etag.is_empty() && !etag.contains('"'), "etag {etag:?}");
    store
        .put("ct/a/b", Body::Bytes(Bytes::from_static(b"inner")), &UserMeta::new())
        .await
        .expect("put a/b");
    let a = store.head("ct/a").await.unwrap().expect("head a");
    assert_eq!((a.size, a.etag.as_str()), (11, etag.as_str()));
    assert_eq!(a.user, file_meta);
    assert!(a.last_modified > 1_600_000_000, "last_modified {}", a.last_modified);
    let ab = store.head("ct/a/b").await.unwrap().expect("head a/b");
    assert_eq!(ab.size, 5);
    assert!(ab.user.is_empty(), "{:?}", ab.user);
    assert_eq!(get(store, "ct/a/b", 0..100).await, &b"inner"[..]);

    // A ranged GET of one version only: the bytes while it is that version (a range past the
    // end and an empty one as without the condition), NotFound once it is another or gone.
    let of = |e: &str, r: Range<u64>| {
        let e = e.to_string();
        async move { store.get_version_range("ct/a", &e, r).await }
    };
    assert_eq!(of(&etag, 6..100).await.unwrap(), &b"world"[..]);
    assert_eq!(of(&etag, 20..30).await.unwrap(), &b""[..]);
    assert_eq!(of(&etag, 3..3).await.unwrap(), &b""[..]);
    for (e, r) in [
        ("0123456789abcdef0123456789abcdef", 0..5),
        ("0123456789abcdef0123456789abcdef", 5..5),
    ] {
        match of(e, r.clone()).await {
            Err(StoreError::NotFound(_)) => {}
            other => panic!("a GET of {r:?} of a version the object is not: {other:?}"),
        }
    }
    match store.get_version_range("ct/missing", &etag, 0..5).await {
        Err(StoreError::NotFound(_)) => {}
        other => panic!("a GET of a version of a missing key: {other:?}"),
    }

    // The same GETs streamed: the bytes in order, how many, and the same errors.
    let streamed = |e: Option<&str>, key: &'static str, r: Range<u64>| {
        let e = e.map(str::to_string);
        async move {
            let mut got = Vec::new();
            let n = store
                .stream_range(key, e.as_deref(), r, &mut |b: &[u8]| {
                    got.extend_from_slice(b);
                    Ok(())
                })
                .await?;
            assert_eq!(n, got.len() as u64, "the count streamed_range returns");
            Ok::<_, StoreError>(got)
        }
    };
    assert_eq!(streamed(Some(&etag), "ct/a", 6..100).await.unwrap(), b"world");
    assert_eq!(streamed(None, "ct/a", 0..5).await.unwrap(), b"hello");
    assert_eq!(streamed(Some(&etag), "ct/a", 20..30).await.unwrap(), b"");
    for (e, key) in [
        (Some("0123456789abcdef0123456789abcdef"), "ct/a"),
        (Some(etag.as_str()), "ct/missing"),
        (None, "ct/missing"),
    ] {
        match streamed(e, key, 0..5).await {
            Err(StoreError::NotFound(_)) => {}
            other => panic!("a streamed GET of {key} as version {e:?}: {other:?}"),
        }
    }
    // A sink's error ends the GET with it.
    let refused = store
        .stream_range("ct/a", None, 0..5, &mut |_: &[u8]| {
            Err(std::io::Error::other("disk full"))
        })
        .await;
    assert!(
        matches!(refused, Err(StoreError::Io(ref m)) if m.contains("disk full")),
        "{refused:?}"
    );

    // Metadata and bytes in one request: the first `max` bytes (if the store can), of the
    // same version as the metadata; a missing object is None.
    for (max, want) in [(11, &b"hello world"[..]), (64 << 10, b"hello world"), (4, b"hell")] {
        let (h, bytes) = store.head_and_get("ct/a", max).await.unwrap().expect("head_and_get a");
        assert_eq!((h.size, h.etag.as_str()), (11, etag.as_str()));
        assert_eq!(h.user, file_meta);
        if let Some(b) = bytes {
            assert_eq!(b, want, "the first {max} bytes");
        }
    }
    let (h, bytes) = store
        .head_and_get("ct/d/", 4096)
        .await
        .unwrap()
        .expect("head_and_get d/");
    assert_eq!((h.size, h.user), (0, dir_meta.clone()));
    assert!(bytes.is_none_or(|b| b.is_empty()));
    assert_eq!(store.head_and_get("ct/missing", 4096).await.unwrap(), None);

    // Listings: delimiter, common prefixes, the marker inside its own prefix.
    let page = store.list("ct/", Some("/"), None, 1000).await.unwrap();
    let keys: Vec<_> = page.objects.iter().map(|o| o.key.as_str()).collect();
    assert_eq!(keys, ["ct/a"]);
    assert_eq!(page.prefixes, ["ct/a/", "ct/d/"]);
    assert_eq!(page.next, None);
    assert_eq!(page.objects[0].size, 11);
    assert_eq!(page.objects[0].etag, etag);
    let page = store.list("ct/d/", Some("/"), None, 1000).await.unwrap();
    let keys: Vec<_> = page.objects.iter().map(|o| o.key.as_str()).collect();
    assert_eq!(keys, ["ct/d/"]);
    assert!(page.prefixes.is_empty());
    let (keys, prefixes, _) = list_all(store, "ct/", None, 1000).await;
    assert_eq!(keys, ["ct/a", "ct/a/b", "ct/d/"]);
    assert!(prefixes.is_empty());
    let page = store.list("ct/nothing/", Some("/"), None, 10).await.unwrap();
    assert_eq!(page, Default::default());

    // Pagination: 25 keys by 10, then 12 common prefixes by 5.
    let mut expected = Vec::new();
    for i in 0..25 {
        let key = format!("ct/p/k{i:02}");
        store
            .put(&key, Body::Bytes(Bytes::from(vec![i as u8; i])), &UserMeta::new())
            .await
            .unwrap();
        expected.push(key);
    }
    let (keys, prefixes, pages) = list_all(store, "ct/p/", Some("/"), 10).await;
    assert_eq!(keys, expected);
    assert!(prefixes.is_empty());
    assert_eq!(pages, 3);
    let mut expected_prefixes = Vec::new();
    for i in 0..12 {
        let key = format!("ct/q/d{i:02}/x");
        store
            .put(&key, Body::Bytes(Bytes::new()), &UserMeta::new())
            .await
            .unwrap();
        expected_prefixes.push(format!("ct/q/d{i:02}/"));
    }
    store
        .put("ct/q/z", Body::Bytes(Bytes::new()), &UserMeta::new())
        .await
        .unwrap();
    let (keys, prefixes, pages) = list_all(store, "ct/q/", Some("/"), 5).await;
    assert_eq!(prefixes, expected_prefixes);
    assert_eq!(keys, ["ct/q/z"]);
    assert_eq!(pages, 3);

    // Copy onto itself replaces the metadata and keeps the bytes; copy elsewhere.
    let new_meta = meta(&[
        ("mode", "33261"),
        ("uid", "1000"),
        ("gid", "100"),
        ("mtime", "1800000000"),
    ]);
    store
        .copy("ct/a", None, "ct/a", &new_meta)
        .await
        .expect("copy onto itself");
    let a = store.head("ct/a").await.unwrap().unwrap();
    assert_eq!(a.user, new_meta);
    assert_eq!(get(store, "ct/a", 0..11).await, &b"hello world"[..]);
    let copy_meta = meta(&[("mode", "33152")]);
    let copy_etag = store
        .copy("ct/a", None, "ct/copy of a+b", &copy_meta)
        .await
        .expect("copy");
    let c = store.head("ct/copy of a+b").await.unwrap().expect("head of the copy");
    assert_eq!((c.size, c.etag.as_str()), (11, copy_etag.as_str()));
    assert_eq!(c.user, copy_meta);
    assert_eq!(get(store, "ct/copy of a+b", 0..11).await, &b"hello world"[..]);
    match store.copy("ct/missing", None, "ct/x", &UserMeta::new()).await {
        Err(StoreError::NotFound(_)) => {}
        other => panic!("copy of a missing key: {other:?}"),
    }
    // A copy of one version only: done while the source is that version, NotFound (and nothing
    // written) once it is another.
    let stale = "0123456789abcdef0123456789abcdef";
    match store
        .copy("ct/copy of a+b", Some(stale), "ct/x", &UserMeta::new())
        .await
    {
        Err(StoreError::NotFound(_)) => {}
        other => panic!("copy of a version the source is not: {other:?}"),
    }
    assert_eq!(
        store.head("ct/x").await.unwrap(),
        None,
        "a refused copy wrote its destination"
    );
    store
        .copy("ct/copy of a+b", Some(&copy_etag), "ct/x", &UserMeta::new())
        .await
        .expect("copy of the version the source is");
    assert_eq!(get(store, "ct/x", 0..11).await, &b"hello world"[..]);
    store.delete("ct/x").await.unwrap();

    // Ranged GETs, past the end included.
    assert_eq!(get(store, "ct/a", 0..5).await, &b"hello"[..]);
    assert_eq!(get(store, "ct/a", 6..11).await, &b"world"[..]);
    assert_eq!(get(store, "ct/a", 6..100).await, &b"world"[..]);
    assert_eq!(get(store, "ct/a", 10..11).await, &b"d"[..]);
    assert!(get(store, "ct/a", 11..20).await.is_empty());
    assert!(get(store, "ct/a", 50..60).await.is_empty());
    assert!(get(store, "ct/a", 3..3).await.is_empty());
    assert!(get(store, "ct/d/", 0..10).await.is_empty());

    // A body streamed from a file.
    let file_data = pattern(300_000, 7);
    let tmp = tempfile::NamedTempFile::new().unwrap();
    std::fs::write(tmp.path(), &file_data).unwrap();
    let body = Body::File {
        path: tmp.path().to_path_buf(),
        offset: 1000,
        len: 200_000,
    };
    store.put("ct/file", body, &file_meta).await.expect("put from a file");
    let f = store.head("ct/file").await.unwrap().unwrap();
    assert_eq!(f.size, 200_000);
    assert_eq!(get(store, "ct/file", 0..200_000).await, &file_data[1000..201_000]);

    // Multipart: 5 MiB from memory, 5 MiB from a file, a small tail.
    let big = pattern(10 * MIB + 1000, 3);
    std::fs::write(tmp.path(), &big).unwrap();
    let upload = store
        .create_multipart("ct/big", &file_meta)
        .await
        .expect("create multipart");
    let p1 = store
        .upload_part(
            "ct/big",
            &upload,
            1,
            Body::Bytes(Bytes::copy_from_slice(&big[..5 * MIB])),
        )
        .await
        .expect("part 1");
    let p2 = store
        .upload_part(
            "ct/big",
            &upload,
            2,
            Body::File {
                path: tmp.path().to_path_buf(),
                offset: 5 * MIB as u64,
                len: 5 * MIB as u64,
            },
        )
        .await
        .expect("part 2");
    let p3 = store
        .upload_part(
            "ct/big",
            &upload,
            3,
            Body::Bytes(Bytes::copy_from_slice(&big[10 * MIB..])),
        )
        .await
        .expect("part 3");
    let parts = [
        Part { number: 1, etag: p1 },
        Part { number: 2, etag: p2 },
        Part { number: 3, etag: p3 },
    ];
    let big_etag = store
        .complete_multipart("ct/big", &upload, &parts)
        .await
        .expect("complete");
    let b = store.head("ct/big").await.unwrap().expect("head big");
    assert_eq!((b.size, b.etag.as_str()), (big.len() as u64, big_etag.as_str()));
    assert_eq!(b.user, file_meta);
    let edge = (5 * MIB - 10) as u64..(5 * MIB + 10) as u64;
    assert_eq!(
        get(store, "ct/big", edge.clone()).await,
        &big[5 * MIB - 10..5 * MIB + 10]
    );
    assert_eq!(get(store, "ct/big", 0..big.len() as u64 + 5).await, &big[..]);

    // UploadPartCopy: a new object from ranges of the old one, plus a fresh tail.
    let upload = store.create_multipart("ct/big2", &new_meta).await.unwrap();
    let c1 = store
        .upload_part_copy("ct/big2", &upload, 1, "ct/big", &big_etag, 0..5 * MIB as u64)
        .await
        .expect("part copy 1");
    let c2 = store
        .upload_part_copy(
            "ct/big2",
            &upload,
            2,
            "ct/big",
            &big_etag,
            5 * MIB as u64..big.len() as u64,
        )
        .await
        .expect("part copy 2");
    // Only from the version named: another ETag, or a source that is gone, is NotFound.
    let stale = store
        .put("ct/elsewhere", Body::Bytes(Bytes::from_static(b"x")), &UserMeta::new())
        .await
        .unwrap();
    for (src, etag) in [("ct/big", stale.as_str()), ("ct/no-such", big_etag.as_str())] {
        let r = store.upload_part_copy("ct/big2", &upload, 2, src, etag, 0..1).await;
        assert!(
            matches!(r, Err(StoreError::NotFound(_))),
            "part copy from {src} as version {etag}: {r:?}"
        );
    }
    let c3 = store
        .upload_part("ct/big2", &upload, 3, Body::Bytes(Bytes::from_static(b"tail")))
        .await
        .unwrap();
    let parts = [
        Part { number: 1, etag: c1 },
        Part { number: 2, etag: c2 },
        Part { number: 3, etag: c3 },
    ];
    store
        .complete_multipart("ct/big2", &upload, &parts)
        .await
        .expect("complete copy");
    let b2 = store.head("ct/big2").await.unwrap().unwrap();
    assert_eq!(b2.size, big.len() as u64 + 4);
    assert_eq!(b2.user, new_meta);
    let all = get(store, "ct/big2", 0..b2.size).await;
    assert_eq!(&all[..big.len()], &big[..]);
    assert_eq!(&all[big.len()..], b"tail");

    // Abort, twice; the object never appears.
    let upload = store.create_multipart("ct/aborted", &UserMeta::new()).await.unwrap();
    store
        .upload_part("ct/aborted", &upload, 1, Body::Bytes(Bytes::from_static(b"x")))
        .await
        .unwrap();
    store.abort_multipart("ct/aborted", &upload).await.expect("abort");
    store.abort_multipart("ct/aborted", &upload).await.expect("abort again");
    assert_eq!(store.head("ct/aborted").await.unwrap(), None);

    // Delete everything; the prefix is empty again.
    let (keys, _, _) = list_all(store, "ct/", None, 1000).await;
    assert!(!keys.contains(&"ct/aborted".to_string()));
    for key in &keys {
        store.delete(key).await.unwrap_or_else(|e| panic!("delete {key}: {e}"));
    }
    assert_eq!(store.head("ct/a").await.unwrap(), None);
    assert_eq!(store.head("ct/d/").await.unwrap(), None);
    let (keys, prefixes, _) = list_all(store, "ct/", Some("/"), 1000).await;
    assert!(keys.is_empty() && prefixes.is_empty(), "{keys:?} {prefixes:?}");
}
