//! `KubeLeases` against the Lease stand-in, over real HTTP on 127.0.0.1: the requests it
//! sends, the compare-and-swap the API server does, and how each failure surfaces.

mod common;

use std::net::SocketAddr;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use common::kube_api::KubeApi;
use s3nfs::cluster::kube::KubeLeases;
use s3nfs::cluster::lease::{LeaseApi, LeaseError, LeaseRecord};

const NS: &str = "s3nfs";
const ANY_PORT: &str = "127.0.0.1:0";

fn any_port() -> SocketAddr {
    ANY_PORT.parse().unwrap()
}

fn client(api: &KubeApi) -> KubeLeases {
    KubeLeases::new(&api.url(), NS, None, None).unwrap()
}

/// Times at whole microseconds, as MicroTime keeps them.
fn at(secs: u64, micros: u32) -> SystemTime {
    UNIX_EPOCH + Duration::new(secs, micros * 1_000)
}

fn held_by(node: &str, transitions: u32) -> LeaseRecord {
    LeaseRecord {
        holder: Some(format!("{node}@10.0.0.7:20501")),
        duration_secs: 15,
        acquire_time: Some(at(1_796_419_800, 123_456)),
        renew_time: Some(at(1_796_419_810, 7)),
        transitions,
    }
}

#[tokio::test]
async fn create_then_get_returns_the_record_and_version() {
    let api = KubeApi::start(any_port()).await;
    let leases = client(&api);
    assert_eq!(leases.get("pvc-1").await.unwrap(), None);
    let created = leases.create("pvc-1", &held_by("a", 0)).await.unwrap();
    assert_eq!(created.record, held_by("a", 0));
    let read = leases.get("pvc-1").await.unwrap().expect("the lease exists");
    assert_eq!(read, created);
    let stored = api.lease(NS, "pvc-1").unwrap();
    assert_eq!(stored["spec"]["renewTime"], "2026-12-04T21:30:10.000007Z");
    assert_eq!(stored["metadata"]["resourceVersion"], created.version.as_str());
    // Another namespace holds other leases.
    let elsewhere = KubeLeases::new(&api.url(), "other", None, None).unwrap();
    assert_eq!(elsewhere.get("pvc-1").await.unwrap(), None);
}

#[tokio::test]
async fn creating_an_existing_lease_conflicts() {
    let api = KubeApi::start(any_port()).await;
    let leases = client(&api);
    let first = leases.create("pvc-1", &held_by("a", 0)).await.unwrap();
    assert_eq!(
        leases.create("pvc-1", &held_by("b", 0)).await,
        Err(LeaseError::Conflict)
    );
    assert_eq!(leases.get("pvc-1").await.unwrap().unwrap(), first);
}

#[tokio::test]
async fn update_with_the_current_version_moves_it_on() {
    let api = KubeApi::start(any_port()).await;
    let leases = client(&api);
    let v1 = leases.create("pvc-1", &held_by("a", 0)).await.unwrap();
    let v2 = leases.update("pvc-1", &held_by("b", 1), &v1.version).await.unwrap();
    assert_ne!(v2.version, v1.version);
    assert_eq!(v2.record, held_by("b", 1));
    assert_eq!(leases.get("pvc-1").await.unwrap().unwrap(), v2);
}

#[tokio::test]
async fn update_with_a_stale_version_conflicts_and_changes_nothing() {
    let api = KubeApi::start(any_port()).await;
    let leases = client(&api);
    let v1 = leases.create("pvc-1", &held_by("a", 0)).await.unwrap();
    let v2 = leases.update("pvc-1", &held_by("a", 0), &v1.version).await.unwrap();
    let before = api.lease(NS, "pvc-1").unwrap();
    assert_eq!(
        leases.update("pvc-1", &held_by("b", 1), &v1.version).await,
        Err(LeaseError::Conflict)
    );
    assert_eq!(api.lease(NS, "pvc-1").unwrap(), before);
    assert_eq!(leases.get("pvc-1").await.unwrap().unwrap(), v2);
}

#[tokio::test]
async fn of_two_updates_from_the_same_read_exactly_one_wins() {
    let api = KubeApi::start(any_port()).await;
    let (a, b) = (client(&api), client(&api));
    a.create("pvc-1", &held_by("a", 0)).await.unwrap();
    let read = b.get("pvc-1").await.unwrap().unwrap();
    let (for_a, for_b) = (held_by("a", 1), held_by("b", 1));
    let (ra, rb) = tokio::join!(
        a.update("pvc-1", &for_a, &read.version),
        b.update("pvc-1", &for_b, &read.version),
    );
    let winner = match (ra, rb) {
        (Ok(w), Err(LeaseError::Conflict)) | (Err(LeaseError::Conflict), Ok(w)) => w,
        other => panic!("expected one winner and one conflict, got {other:?}"),
    };
    assert_eq!(a.get("pvc-1").await.unwrap().unwrap(), winner);
}

#[tokio::test]
async fn server_errors_are_unavailable_and_refusals_refused() {
    let api = KubeApi::start(any_port()).await;
    let leases = client(&api);
    api.fail_next(1, 503);
    assert!(matches!(leases.get("pvc-1").await, Err(LeaseError::Unavailable(_))));
    api.fail_next(1, 429);
    assert!(matches!(
        leases.create("pvc-1", &held_by("a", 0)).await,
        Err(LeaseError::Unavailable(_))
    ));
    assert_eq!(api.lease(NS, "pvc-1"), None, "a failed create stores nothing");
    api.fail_next(1, 403);
    match leases.create("pvc-1", &held_by("a", 0)).await {
        Err(LeaseError::Refused(m)) => assert!(m.contains("403") && m.contains("injected by the test"), "{m}"),
        other => panic!("{other:?}"),
    }
    // The failures were only the ones injected: the next request goes through.
    leases.create("pvc-1", &held_by("a", 0)).await.unwrap();
}

#[tokio::test]
async fn a_closed_port_is_unavailable() {
    // A port that was just bound and released: nothing listens there.
    let addr = std::net::TcpListener::bind(ANY_PORT).unwrap().local_addr().unwrap();
    let leases = KubeLeases::new(&format!("http://{addr}"), NS, None, None).unwrap();
    let result = leases.get("pvc-1").await;
    assert!(matches!(result, Err(LeaseError::Unavailable(_))), "{result:?}");
}

#[tokio::test]
async fn the_token_file_is_sent_as_a_bearer_token() {
    let secret = "eyJhbGciOiJSUzI1NiJ9.s3nfs-test-token";
    let api = KubeApi::start_with_token(any_port(), secret).await;
    let without = client(&api);
    match without.get("pvc-1").await {
        Err(LeaseError::Refused(m)) => assert!(m.contains("401"), "{m}"),
        other => panic!("{other:?}"),
    }
    let dir = tempfile::tempdir().unwrap();
    let token = dir.path().join("token");
    std::fs::write(&token, format!("{secret}\n")).unwrap();
    let with = KubeLeases::new(&api.url(), NS, Some(token.clone()), None).unwrap();
    with.create("pvc-1", &held_by("a", 0)).await.unwrap();
    assert!(with.get("pvc-1").await.unwrap().is_some());
    // Read on every request: a rotated token is used at once, and a wrong one stays secret.
    std::fs::write(&token, "rotated-but-wrong").unwrap();
    match with.get("pvc-1").await {
        Err(LeaseError::Refused(m)) => assert!(m.contains("401") && !m.contains("rotated-but-wrong"), "{m}"),
        other => panic!("{other:?}"),
    }
    std::fs::remove_file(&token).unwrap();
    match with.get("pvc-1").await {
        Err(LeaseError::Refused(m)) => assert!(m.contains("token file"), "{m}"),
        other => panic!("{other:?}"),
    }
}

#[tokio::test]
async fn names_that_are_not_dns_subdomains_are_refused_without_a_request() {
    let api = KubeApi::start(any_port()).await;
    let leases = client(&api);
    for name in ["PVC-1", "pvc_1", "../leases", "", "pvc-1/status"] {
        assert!(matches!(leases.get(name).await, Err(LeaseError::Refused(_))), "{name}");
        assert!(
            matches!(leases.create(name, &held_by("a", 0)).await, Err(LeaseError::Refused(_))),
            "{name}"
        );
        assert!(
            matches!(
                leases.update(name, &held_by("a", 0), "1").await,
                Err(LeaseError::Refused(_))
            ),
            "{name}"
        );
    }
    assert_eq!(api.requests(), 0);
}

/// The stand-in itself, for what the client never sends: a PUT without a resourceVersion is
/// refused (Leases allow no unconditional update), and a PUT of an absent lease creates it.
#[tokio::test]
async fn stand_in_put_semantics_follow_the_lease_strategy() {
    let api = KubeApi::start(any_port()).await;
    let leases = client(&api);
    leases.create("pvc-1", &held_by("a", 0)).await.unwrap();
    let before = api.lease(NS, "pvc-1").unwrap();
    let mut unversioned = before.clone();
    unversioned["metadata"]
        .as_object_mut()
        .unwrap()
        .remove("resourceVersion");
    unversioned["spec"]["holderIdentity"] = "b@10.0.0.8:20501".into();
    let (code, reply) = put(&api, "pvc-1", &unversioned).await;
    assert_eq!(code, 422, "{reply}");
    assert_eq!(reply["reason"], "Invalid");
    assert_eq!(api.lease(NS, "pvc-1").unwrap(), before);
    // The client refuses to send one at all.
    assert!(matches!(
        leases.update("pvc-1", &held_by("b", 1), "").await,
        Err(LeaseError::Refused(_))
    ));

    let recreated = leases.update("pvc-2", &held_by("b", 3), "41").await.unwrap();
    assert_eq!(recreated.record, held_by("b", 3));
    assert_eq!(leases.get("pvc-2").await.unwrap().unwrap(), recreated);
}

/// A bare PUT with `body`, for requests `KubeLeases` does not make.
async fn put(api: &KubeApi, name: &str, body: &serde_json::Value) -> (u16, serde_json::Value) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let addr = api.url().trim_start_matches("http://").to_string();
    let mut stream = tokio::net::TcpStream::connect(&addr).await.unwrap();
    let body = serde_json::to_vec(body).unwrap();
    let head = format!(
        "PUT /apis/coordination.k8s.io/v1/namespaces/{NS}/leases/{name} HTTP/1.1\r\nHost: {addr}\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n",
        body.len()
    );
    stream.write_all(&[head.as_bytes(), &body].concat()).await.unwrap();
    let mut reply = Vec::new();
    stream.read_to_end(&mut reply).await.unwrap();
    let reply = String::from_utf8(reply).unwrap();
    let (head, json) = reply.split_once("\r\n\r\n").unwrap();
    let code = head.split(' ').nth(1).unwrap().parse().unwrap();
    (code, serde_json::from_str(json).unwrap())
}
