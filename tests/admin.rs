//! `s3nfs status` and `s3nfs flush` against a running `s3nfs serve` on Garage, with writes
//! pending (a flush delay of an hour keeps them local until asked): the figures `status` gives
//! are checked against what was written and what S3 holds, `flush` must put everything in S3,
//! and with S3 unreachable it must fail with S3's reason and leave the writes pending.

mod common;
#[path = "common/delay_proxy.rs"]
mod delay_proxy;

use std::net::SocketAddr;
use std::path::Path;
use std::process::{Command, Output};
use std::time::Duration;

use common::garage;
use common::gateway::{Proc, S3Side};
use common::nfs::Client;
use delay_proxy::DelayProxy;
use s3nfs::admin::{FlushEvent, StatusReply};

fn cli(args: &[&str], socket: &Path) -> Output {
    Command::new(env!("CARGO_BIN_EXE_s3nfs"))
        .args(args)
        .arg("--admin-socket")
        .arg(socket)
        .output()
        .unwrap()
}

fn status(socket: &Path) -> StatusReply {
    let out = cli(&["status", "--json"], socket);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    serde_json::from_slice(&out.stdout).unwrap()
}

/// Flushes; returns the events, whether it succeeded, and its stderr.
fn flush(socket: &Path) -> (Vec<FlushEvent>, bool, String) {
    let out = cli(&["flush", "--json"], socket);
    let events = String::from_utf8(out.stdout)
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("{e}: {l}")))
        .collect();
    (events, out.status.success(), String::from_utf8(out.stderr).unwrap())
}

/// A proxy to Garage at `addr`, once the port is free again (a proxy just dropped lets go of it
/// when its task has ended).
async fn proxy_at(addr: SocketAddr, garage: SocketAddr) -> DelayProxy {
    for _ in 0..200 {
        if let Ok(p) = DelayProxy::start_at(addr, garage, Duration::ZERO).await {
            return p;
        }
        tokio::task::yield_now().await;
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    panic!("{addr} stays taken");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn status_and_flush_report_and_upload_what_is_pending() {
    let g = garage::shared();
    let bucket = g.unique_bucket();
    let garage_addr: SocketAddr = g.endpoint.trim_start_matches("http://").parse().unwrap();
    let proxy = DelayProxy::start(garage_addr, Duration::ZERO).await.unwrap();
    let proxy_addr = proxy.addr();
    let dir = tempfile::tempdir().unwrap();
    let socket = dir.path().join("admin.sock");
    let url = proxy.url();
    let gw = Proc::start_with(
        &bucket,
        "",
        "1h",
        &["--endpoint", &url, "--admin-socket", socket.to_str().unwrap()],
    );
    let s3 = S3Side::for_bucket(&bucket).await;

    // Nothing written yet.
    let st = status(&socket);
    assert_eq!(st.volumes.len(), 1);
    let v = &st.volumes[0];
    assert_eq!((v.pending_files, v.pending_bytes, v.last_upload_at), (0, 0, None));
    assert_eq!(v.port, gw.addr().port());
    assert!(v.local && v.role == "single-node");
    // Only the owner may talk to the socket.
    use std::os::unix::fs::PermissionsExt;
    assert_eq!(std::fs::metadata(&socket).unwrap().permissions().mode() & 0o777, 0o600);

    let files: [(&str, usize); 3] = [("a.bin", 100 << 10), ("b.bin", 1 << 20), ("c.txt", 5)];
    let mut c = Client::connect(gw.addr()).await;
    let root = c.root.clone();
    for (name, size) in files {
        let fh = c.create(&root, name, 0o644).await.unwrap();
        let data = vec![b'x'; size];
        for (i, chunk) in data.chunks(64 << 10).enumerate() {
            c.write(&fh, (i * (64 << 10)) as u64, chunk).await.unwrap();
        }
        c.commit(&fh).await.unwrap();
    }
    let written: u64 = files.iter().map(|f| f.1 as u64).sum();

    // The dirty-byte figure is the uploader's last round's (a tick, 200 ms, old at most).
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    let v = loop {
        let v = status(&socket).volumes.remove(0);
        if v.pending_bytes == written || std::time::Instant::now() > deadline {
            break v;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    assert!(v.pending_files >= 3, "{v:?}");
    assert_eq!(v.pending_bytes, written, "{v:?}");
    // Created files are counted at once, not at the next recount.
    assert_eq!(v.files, 3, "{v:?}");
    assert!(v.pending_seconds > 0.0, "{v:?}");
    for (name, _) in files {
        assert!(s3.head(name).await.is_none(), "{name} is in S3 before any flush");
    }
    let text = cli(&["status"], &socket);
    let text = String::from_utf8(text.stdout).unwrap();
    assert!(text.contains("not in S3") && text.contains("1.1 MiB"), "{text}");

    // S3 unreachable: the flush fails with the reason, nothing is lost.
    drop(proxy);
    let (events, ok, err) = flush(&socket);
    assert!(!ok, "a flush with S3 down succeeded: {events:?}");
    assert!(err.starts_with("error: ") && err.contains("default"), "{err}");
    assert!(
        events.iter().any(|e| matches!(e, FlushEvent::Failed { .. })),
        "{events:?}"
    );
    let v = &status(&socket).volumes[0];
    assert_eq!(v.pending_bytes, written);
    assert!(v.last_error.is_some() && v.last_error_at.is_some(), "{v:?}");
    // The reason as a person reads it: the causes, not the SDK's Debug dump.
    let reason = v.last_error.as_deref().unwrap_or_default();
    assert!(
        reason.contains("Connection refused") && !reason.contains("DispatchFailure("),
        "{reason}"
    );

    // S3 back: everything goes, with progress shown first.
    let _proxy = proxy_at(proxy_addr, garage_addr).await;
    let (events, ok, err) = flush(&socket);
    assert!(ok, "{err} {events:?}");
    match events.first() {
        Some(FlushEvent::Progress { files, bytes, .. }) => {
            assert!(*files >= 3 && *bytes == written, "{events:?}")
        }
        other => panic!("no progress before the end: {other:?}"),
    }
    assert!(
        events
            .iter()
            .any(|e| matches!(e, FlushEvent::Done { uploaded_bytes, .. } if *uploaded_bytes >= written)),
        "{events:?}"
    );
    assert_eq!(events.last(), Some(&FlushEvent::End { ok: true }));
    for (name, size) in files {
        let h = s3
            .head(name)
            .await
            .unwrap_or_else(|| panic!("{name} not in S3 after the flush"));
        assert_eq!(h.size, size as u64);
    }
    let v = &status(&socket).volumes[0];
    assert_eq!((v.pending_files, v.pending_bytes), (0, 0), "{v:?}");
    assert!(v.last_upload_at.is_some());

    // The same for a person: text status and flush (shown with --nocapture).
    let fh = c.create(&root, "d.bin", 0o644).await.unwrap();
    c.write_all(&fh, 0, &vec![b'y'; 3 << 20]).await.unwrap();
    c.commit(&fh).await.unwrap();
    let out = cli(&["status"], &socket);
    let text = String::from_utf8(out.stdout).unwrap();
    eprintln!("$ s3nfs status\n{text}");
    assert!(text.contains("last upload") && text.contains("last S3 error"), "{text}");
    let out = cli(&["flush"], &socket);
    let text = String::from_utf8(out.stdout).unwrap();
    eprintln!("$ s3nfs flush\n{text}");
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    assert!(
        text.contains(" left, ") && text.contains("default: all in S3"),
        "{text}"
    );
    assert_eq!(s3.head("d.bin").await.map(|h| h.size), Some(3 << 20));

    // A volume that does not exist is refused by name.
    let out = cli(&["flush", "nope"], &socket);
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("no volume named \"nope\""));
    drop(gw);
}

#[test]
fn status_without_a_process_says_what_to_check() {
    let dir = tempfile::tempdir().unwrap();
    let out = cli(&["status"], &dir.path().join("none.sock"));
    assert!(!out.status.success());
    let err = String::from_utf8(out.stderr).unwrap();
    assert!(err.starts_with("error: nothing answers on"), "{err}");
    assert_eq!(err.trim_end().lines().count(), 1, "{err}");
}

/// Two gateways given one admin socket: the first keeps it, the second serves without one; a
/// gateway started after the first was killed (its socket file left behind) takes it over.
#[test]
fn one_process_serves_an_admin_socket_and_a_dead_ones_is_taken_over() {
    let bucket = garage::shared().unique_bucket();
    let dir = tempfile::tempdir().unwrap();
    let socket = dir.path().join("admin.sock");
    let args = ["--admin-socket", socket.to_str().unwrap()];
    let mut first = Proc::start_with(&bucket, "one/", "1s", &args);
    let second = Proc::start_with(&bucket, "two/", "1s", &args);
    let port = |st: StatusReply| st.volumes[0].port;
    assert_eq!(port(status(&socket)), first.addr().port());
    assert!(
        second.log().contains("another process serves the admin socket"),
        "{}",
        second.log()
    );
    first.kill9();
    assert!(
        socket.exists(),
        "the killed gateway's socket file is gone: the takeover below proves nothing"
    );
    let third = Proc::start_with(&bucket, "three/", "1s", &args);
    assert_eq!(port(status(&socket)), third.addr().port());
    drop((second, third));
}
