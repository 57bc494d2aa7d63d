//! Clients that misbehave on purpose, through raw TCP sockets: a client pipelining a gigabyte
//! of READs and never reading the replies, and thousands of connections opened and dropped.
//! After each, a well-behaved client still gets answers, and the gateway's memory and
//! descriptors stay within their bounds. A test binary of its own, so that nothing else runs
//! in the process while its memory is measured.

mod common;

use std::time::Duration;

use common::csi::fds_and_rss;
use common::gateway::{self, wait_for, Opts};
use common::nfs::Client;
use tokio::io::AsyncWriteExt;

const MIB: usize = 1 << 20;

/// An NFSv3 READ call of `count` bytes at `offset` of the file handle `fh`, with AUTH_NONE,
/// as one record.
fn read_call(xid: u32, fh: &[u8], offset: u64, count: u32) -> Vec<u8> {
    let mut body: Vec<u8> = [xid, 0, 2, 100003, 3, 6, 0, 0, 0, 0]
        .iter()
        .flat_map(|v| v.to_be_bytes())
        .collect();
    body.extend_from_slice(&(fh.len() as u32).to_be_bytes());
    body.extend_from_slice(fh);
    body.resize(body.len().div_ceil(4) * 4, 0);
    body.extend_from_slice(&offset.to_be_bytes());
    body.extend_from_slice(&count.to_be_bytes());
    [((body.len() as u32) | 1 << 31).to_be_bytes().to_vec(), body].concat()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_that_never_reads_its_replies_holds_a_bounded_amount() {
    let (gw, _dir) = gateway::on_local(Opts::default()).await;
    let mut c = Client::connect(gw.addr).await;
    let root = c.root.clone();
    let f = c.create(&root, "big", 0o644).await.unwrap();
    c.write_all(&f, 0, &vec![7u8; 4 * MIB]).await.unwrap();
    // Warm up: the staged file is read into the page cache, the runtime has its threads.
    assert_eq!(c.read_all(&f).await.unwrap().len(), 4 * MIB);
    let (_, rss0) = fds_and_rss();

    let read_bytes = || {
        s3nfs::metrics::global()
            .nfs_read_bytes
            .load(std::sync::atomic::Ordering::Relaxed)
    };
    let before = read_bytes();

    // 1,000 READs of 1 MiB (a gigabyte of replies) sent in one go, and never a reply read.
    let mut greedy = tokio::net::TcpStream::connect(gw.addr).await.unwrap();
    let fh = f.bytes();
    let calls: Vec<u8> = (0..1000u32)
        .flat_map(|i| read_call(i + 1, &fh, (i as u64 % 4) * MIB as u64, MIB as u32))
        .collect();
    // The gateway stops reading from this socket once the connection's bound is reached, so
    // the write itself may block: send from a task of its own.
    let sender = tokio::spawn(async move {
        let _ = greedy.write_all(&calls).await;
        greedy
    });

    // Meanwhile others are served: the greedy client holds only its connection's share.
    let mut other = Client::connect(gw.addr).await;
    for _ in 0..20 {
        assert_eq!(other.read(&f, 0, 4096).await.unwrap().0.len(), 4096);
        assert_eq!(other.getattr(&f).await.unwrap().size, 4 * MIB as u64);
    }
    // The greedy connection is served until its bound is reached, then no more: wait until
    // the bytes the gateway has read for clients stop growing.
    let mut last = u64::MAX;
    let deadline = std::time::Instant::now() + Duration::from_secs(60);
    loop {
        let now = read_bytes();
        if now == last && now >= before + 16 * MIB as u64 {
            break;
        }
        assert!(std::time::Instant::now() < deadline, "reads never settled");
        last = now;
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let served = (read_bytes() - before) as usize / MIB;
    assert!(
        served <= 64,
        "{served} MiB of replies produced for a client that reads none (the bound is 32 requests)"
    );
    let (_, rss1) = fds_and_rss();
    // Bound: 32 requests in flight on a connection, each with a reply of 1 MiB, plus socket
    // buffers; unbounded, the gigabyte of replies would queue in the gateway.
    assert!(
        rss1 < rss0 + 160 * MIB as u64,
        "RSS grew from {} to {} MiB with a client that reads nothing",
        rss0 >> 20,
        rss1 >> 20
    );
    sender.abort();
    assert_eq!(c.read(&f, 0, 10).await.unwrap().0, vec![7u8; 10]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn thousands_of_connections_opened_and_dropped_leave_nothing_behind() {
    let (gw, _dir) = gateway::on_local(Opts::default()).await;
    let mut c = Client::connect(gw.addr).await;
    let root = c.root.clone();
    let f = c.create(&root, "f", 0o644).await.unwrap();
    c.write_all(&f, 0, b"still here").await.unwrap();
    let (fds0, _) = fds_and_rss();

    for round in 0..4 {
        // 500 at once (more than the listener serves at a time: the rest wait in the backlog),
        // some with half a request sent.
        let mut conns = Vec::new();
        for i in 0..500 {
            let mut s = tokio::net::TcpStream::connect(gw.addr).await.unwrap();
            if i % 3 == 0 {
                let _ = s.write_all(&read_call(1, &f.bytes(), 0, 10)[..30]).await;
            }
            conns.push(s);
        }
        assert_eq!(c.read_all(&f).await.unwrap(), b"still here", "round {round}");
        drop(conns);
    }
    // Every dropped connection is closed on the gateway's side too (its socket and task gone).
    wait_for(
        Duration::from_secs(20),
        "the dropped connections' descriptors",
        || async {
            let (fds, _) = fds_and_rss();
            (fds <= fds0 + 8).then_some(())
        },
    )
    .await;
    let mut fresh = Client::connect(gw.addr).await;
    assert_eq!(fresh.read_all(&f).await.unwrap(), b"still here");
}

/// An NFSv3 WRITE call (UNSTABLE) of `data` at `offset`, with AUTH_UNIX root, as one record.
fn write_call(xid: u32, fh: &[u8], offset: u64, data: &[u8]) -> Vec<u8> {
    // AUTH_UNIX body: stamp, machine name "t", uid 0, gid 0, no groups.
    let cred: Vec<u8> = [0u32, 1]
        .iter()
        .flat_map(|v| v.to_be_bytes())
        .chain(*b"t\0\0\0")
        .chain([0u32, 0, 0].iter().flat_map(|v| v.to_be_bytes()))
        .collect();
    let mut body: Vec<u8> = [xid, 0, 2, 100003, 3, 7, 1, cred.len() as u32]
        .iter()
        .flat_map(|v| v.to_be_bytes())
        .collect();
    body.extend_from_slice(&cred);
    body.extend_from_slice(&[0; 8]);
    body.extend_from_slice(&(fh.len() as u32).to_be_bytes());
    body.extend_from_slice(fh);
    body.resize(body.len().div_ceil(4) * 4, 0);
    body.extend_from_slice(&offset.to_be_bytes());
    body.extend_from_slice(&(data.len() as u32).to_be_bytes());
    body.extend_from_slice(&0u32.to_be_bytes());
    body.extend_from_slice(&(data.len() as u32).to_be_bytes());
    body.extend_from_slice(data);
    body.resize(body.len().div_ceil(4) * 4, 0);
    [((body.len() as u32) | 1 << 31).to_be_bytes().to_vec(), body].concat()
}

/// A client with far more large WRITEs outstanding than a connection may have in flight (the
/// kernel client's writeback does this) gets every one answered: the bound holds the rest back
/// in the socket; it must never stop the replies that free it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pipelined_writes_past_the_in_flight_bound_are_all_answered() {
    use tokio::io::AsyncReadExt;
    let (gw, _dir) = gateway::on_local(Opts::default()).await;
    let mut c = Client::connect(gw.addr).await;
    let root = c.root.clone();
    let f = c.create(&root, "w", 0o644).await.unwrap();
    let s = tokio::net::TcpStream::connect(gw.addr).await.unwrap();
    let (mut rx, mut tx) = s.into_split();
    let fh = f.bytes();
    const N: u32 = 100;
    let sender = tokio::spawn(async move {
        let block = vec![5u8; MIB];
        for i in 0..N {
            tx.write_all(&write_call(i + 1, &fh, i as u64 * MIB as u64, &block))
                .await
                .unwrap();
        }
        tx
    });
    let mut replies = 0;
    let reading = async {
        while replies < N {
            let mut head = [0u8; 4];
            rx.read_exact(&mut head).await.unwrap();
            let len = (u32::from_be_bytes(head) & 0x7fff_ffff) as usize;
            let mut body = vec![0u8; len];
            rx.read_exact(&mut body).await.unwrap();
            // accept_stat SUCCESS, then nfsstat3 NFS3_OK
            assert_eq!(&body[20..28], &[0; 8], "WRITE {} failed", replies + 1);
            replies += 1;
        }
    };
    tokio::time::timeout(Duration::from_secs(120), reading)
        .await
        .unwrap_or_else(|_| panic!("only {replies} of {N} WRITEs answered"));
    sender.await.unwrap();
    assert_eq!(c.getattr(&f).await.unwrap().size, N as u64 * MIB as u64);
    // The file streams to the store in parts; those still on their way would write into the
    // store's directory while it is removed, and leave their files in /tmp.
    gw.vol.tasks().stop().await;
}
