//! The store contract, kept by `S3Store` against a real Garage and by the embedded store, and
//! the error mapping of `S3Store`.

mod common;
#[path = "common/delay_proxy.rs"]
mod delay_proxy;

use common::contract::contract;
use common::garage;
use s3nfs::store::s3::{S3Config, S3Store, Secret};
use s3nfs::store::{ObjectStore, StoreError};

async fn store(cfg: S3Config) -> S3Store {
    S3Store::connect(cfg).await.expect("connect")
}

#[tokio::test]
async fn s3_store_contract() {
    let g = garage::shared();
    let bucket = g.unique_bucket();
    let s3 = store(g.s3_config(&bucket)).await;
    assert!(s3.describe().contains(&bucket));
    assert!(!s3.describe().contains(&g.secret_key));
    contract(&s3).await;
}

/// The embedded store (`s3nfs serve` without an endpoint) keeps the same contract.
#[tokio::test]
async fn local_store_contract() {
    let dir = tempfile::tempdir().unwrap();
    let local = s3nfs::store::local::LocalStore::open(dir.path()).unwrap();
    contract(&local).await;
}

/// The contract again with PUT and UploadPart payloads unsigned, as they go over HTTPS (Garage
/// here speaks plain HTTP, where they are signed by default).
#[tokio::test]
async fn s3_store_contract_with_unsigned_payloads() {
    let g = garage::shared();
    let bucket = g.unique_bucket();
    let s3 = store(g.s3_config(&bucket)).await.signing_payloads(false);
    contract(&s3).await;
}

/// What goes on the wire: with payloads unsigned, a PUT says `UNSIGNED-PAYLOAD` where a signed
/// one carries the body's SHA-256, and the request is still signed (a wrong secret is refused).
#[tokio::test]
async fn unsigned_payloads_leave_the_body_out_of_the_signature_only() {
    let g = garage::shared();
    let bucket = g.unique_bucket();
    let addr: std::net::SocketAddr = g.endpoint.trim_start_matches("http://").parse().unwrap();
    let body = bytes::Bytes::from_static(b"the body");
    for sign in [true, false] {
        let (proxy, sent) = delay_proxy::DelayProxy::recording(addr).await.unwrap();
        let mut cfg = g.s3_config(&bucket);
        cfg.endpoint = Some(proxy.url());
        let s3 = store(cfg).await.signing_payloads(sign);
        s3.put("k", s3nfs::store::Body::Bytes(body.clone()), &Default::default())
            .await
            .expect("PUT");
        let wire = String::from_utf8_lossy(&sent.lock().unwrap()).to_lowercase();
        let unsigned = wire.contains("x-amz-content-sha256: unsigned-payload");
        assert_eq!(
            unsigned, !sign,
            "signing payloads: {sign}; the request went out as:\n{wire}"
        );
    }
    let mut cfg = g.s3_config(&bucket);
    cfg.secret_key = Some(Secret("0".repeat(64)));
    let s3 = store(cfg).await.signing_payloads(false);
    let r = s3.put("k", s3nfs::store::Body::Bytes(body), &Default::default()).await;
    assert!(
        matches!(r, Err(StoreError::AccessDenied(_))),
        "a PUT with a wrong secret: {r:?}"
    );
}

/// A copy past CopyObject's limit (5 GiB on S3) goes as parts copied server-side: the bytes and
/// the new metadata arrive whole, onto another key or onto the source itself.
#[tokio::test]
async fn a_copy_in_parts_copies_bytes_and_replaces_metadata() {
    use s3nfs::store::{Body, UserMeta};
    let g = garage::shared();
    let bucket = g.unique_bucket();
    let s3 = store(g.s3_config(&bucket)).await;
    let data = common::pattern(7, (12 << 20) + 3);
    let mut meta = UserMeta::new();
    meta.insert("mode".into(), "33188".into());
    s3.put("big", Body::Bytes(data.clone().into()), &meta).await.unwrap();
    for (dst, mode) in [("big copy", "33152"), ("big", "33261")] {
        let mut new_meta = UserMeta::new();
        new_meta.insert("mode".into(), mode.into());
        let etag = s3
            .copy_in_parts("big", dst, &new_meta, 5 << 20)
            .await
            .expect("copy in parts");
        assert!(etag.ends_with("-3"), "{dst}: three parts of 5 MiB, ETag {etag}");
        let h = s3.head(dst).await.unwrap().expect("copied");
        assert_eq!(
            (h.size, &h.etag, &h.user),
            (data.len() as u64, &etag, &new_meta),
            "{dst}"
        );
        assert!(s3.get_range(dst, 0..h.size).await.unwrap() == data, "{dst}: bytes");
    }
    assert!(matches!(
        s3.copy_in_parts("no such key", "x", &UserMeta::new(), 5 << 20).await,
        Err(StoreError::NotFound(_))
    ));
}

#[tokio::test]
async fn wrong_secret_is_access_denied() {
    let g = garage::shared();
    let bucket = g.unique_bucket();
    let mut cfg = g.s3_config(&bucket);
    cfg.secret_key = Some(Secret("0".repeat(64)));
    match store(cfg).await.check().await {
        Err(StoreError::AccessDenied(code)) => assert!(!code.is_empty()),
        other => panic!("check with a wrong secret: {other:?}"),
    }
}

#[tokio::test]
async fn unknown_access_key_is_access_denied() {
    let g = garage::shared();
    let bucket = g.unique_bucket();
    let mut cfg = g.s3_config(&bucket);
    cfg.access_key = Some("GK0123456789abcdef01234567".into());
    match store(cfg).await.check().await {
        Err(StoreError::AccessDenied(_)) => {}
        other => panic!("check with an unknown key: {other:?}"),
    }
}

#[tokio::test]
async fn missing_bucket_is_no_such_bucket() {
    let g = garage::shared();
    let s3 = store(g.s3_config("no-such-bucket-here")).await;
    match s3.check().await {
        Err(StoreError::NoSuchBucket(b)) => assert_eq!(b, "no-such-bucket-here"),
        other => panic!("check of a missing bucket: {other:?}"),
    }
}

#[tokio::test]
async fn closed_port_is_unavailable() {
    let port = {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        l.local_addr().unwrap().port()
    };
    let cfg = S3Config {
        endpoint: Some(format!("http://127.0.0.1:{port}")),
        bucket: "b".into(),
        region: "garage".into(),
        path_style: true,
        access_key: Some("GKtest".into()),
        secret_key: Some(Secret("secret".into())),
        session_token: None,
    };
    let s3 = store(cfg).await;
    let err = s3.check().await.expect_err("check against a closed port");
    assert!(matches!(err, StoreError::Unavailable(_)), "{err:?}");
    assert!(err.is_transient());
    let err = s3.head("k").await.expect_err("head against a closed port");
    assert!(matches!(err, StoreError::Unavailable(_)), "{err:?}");
}

#[tokio::test]
async fn connect_without_credentials_fails_clearly() {
    if std::env::var_os("AWS_ACCESS_KEY_ID").is_some() {
        return;
    }
    let cfg = S3Config {
        bucket: "b".into(),
        region: "us-east-1".into(),
        ..Default::default()
    };
    let err = S3Store::connect(cfg).await.expect_err("no credentials");
    assert!(err.to_string().contains("AWS_ACCESS_KEY_ID"), "{err}");
}
