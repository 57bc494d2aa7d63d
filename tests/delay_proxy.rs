//! The delay proxy used by benchmarks to simulate S3's round trip.

#[path = "common/delay_proxy.rs"]
mod delay_proxy;

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use delay_proxy::DelayProxy;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

/// An echo server on 127.0.0.1; runs until the test's runtime ends.
async fn echo_server() -> SocketAddr {
    let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = l.local_addr().unwrap();
    tokio::spawn(async move {
        loop {
            let (mut s, _) = l.accept().await.unwrap();
            tokio::spawn(async move {
                let (mut r, mut w) = s.split();
                let _ = tokio::io::copy(&mut r, &mut w).await;
            });
        }
    });
    addr
}

async fn round_trip(s: &mut TcpStream, msg: &[u8]) -> Vec<u8> {
    s.write_all(msg).await.unwrap();
    let mut got = vec![0u8; msg.len()];
    s.read_exact(&mut got).await.unwrap();
    got
}

#[tokio::test]
async fn each_request_is_delayed() {
    let echo = echo_server().await;
    let d = Duration::from_millis(50);
    let proxy = DelayProxy::start(echo, d).await.unwrap();
    assert_eq!(proxy.addr().ip().to_string(), "127.0.0.1");
    assert_ne!(proxy.addr().port(), 0);
    assert_eq!(proxy.target(), echo);

    let mut c = TcpStream::connect(proxy.addr()).await.unwrap();
    for i in 0..3 {
        let msg = format!("request {i}");
        let start = Instant::now();
        assert_eq!(round_trip(&mut c, msg.as_bytes()).await, msg.as_bytes());
        assert!(start.elapsed() >= d, "round trip {:?} < {d:?}", start.elapsed());
    }

    // A second connection at the same time.
    let mut c2 = TcpStream::connect(proxy.addr()).await.unwrap();
    let start = Instant::now();
    assert_eq!(round_trip(&mut c2, b"other").await, b"other");
    assert!(start.elapsed() >= d);
}

#[tokio::test]
async fn large_transfer_is_intact() {
    let echo = echo_server().await;
    let proxy = DelayProxy::start(echo, Duration::from_millis(5)).await.unwrap();
    let mut c = TcpStream::connect(proxy.addr()).await.unwrap();
    let data: Vec<u8> = (0..4 * 1024 * 1024).map(|i: u32| (i % 251) as u8).collect();
    let (mut r, mut w) = c.split();
    let send = async {
        w.write_all(&data).await.unwrap();
        w.shutdown().await.unwrap();
    };
    let mut got = Vec::new();
    let recv = async {
        r.read_to_end(&mut got).await.unwrap();
    };
    tokio::join!(send, recv);
    assert_eq!(got.len(), data.len());
    assert!(got == data);
}

#[tokio::test]
async fn drop_stops_the_proxy() {
    let echo = echo_server().await;
    let proxy = DelayProxy::start(echo, Duration::from_millis(1)).await.unwrap();
    let addr = proxy.addr();
    let mut c = TcpStream::connect(addr).await.unwrap();
    assert_eq!(round_trip(&mut c, b"hi").await, b"hi");
    drop(proxy);
    // The open connection is closed and new ones are refused.
    let mut buf = [0u8; 1];
    let closed = tokio::time::timeout(Duration::from_secs(5), async {
        let _ = c.write_all(b"x").await;
        c.read(&mut buf).await
    })
    .await
    .expect("connection still open after drop");
    assert!(matches!(closed, Ok(0) | Err(_)));
    tokio::time::sleep(Duration::from_millis(20)).await;
    assert!(TcpStream::connect(addr).await.is_err());
}
