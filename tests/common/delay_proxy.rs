//! A TCP proxy that delays the client-to-server direction, to simulate S3's round trip.
//!
//! This kernel has no netem, so benchmarks and tests put this proxy between the S3 client and
//! a local S3 server (MinIO, Garage) to get a realistic ~20 ms per request:
//!
//! ```ignore
//! let proxy = DelayProxy::start(minio_addr, Duration::from_millis(20)).await?;
//! let endpoint = format!("http://{}", proxy.addr());
//! ```
//!
//! Every chunk read from the client is written to the server `delay` after it arrived. Chunks
//! are pipelined (a timestamped queue, not a sleep per chunk in the read loop), so the delay is
//! pure latency: a large PUT is not slowed by `delay` per chunk. The server-to-client direction
//! is copied as is. The proxy runs on the current tokio runtime and stops, closing all its
//! connections, when the `DelayProxy` is dropped.
//!
//! Include it with `mod common;` (through `tests/common/mod.rs`) or
//! `#[path = "common/delay_proxy.rs"] mod delay_proxy;`; it depends on tokio only.
#![allow(dead_code)]

use std::io;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::mpsc;
use tokio::task::{JoinHandle, JoinSet};
use tokio::time::Instant;

/// Chunks in flight per connection: bounds memory to `QUEUE * CHUNK` per connection.
const QUEUE: usize = 256;
const CHUNK: usize = 64 * 1024;

/// A running delay proxy. Dropping it stops the listener and every connection.
pub struct DelayProxy {
    addr: SocketAddr,
    target: SocketAddr,
    delay: Duration,
    task: JoinHandle<()>,
}

impl DelayProxy {
    /// Listens on 127.0.0.1 (a free port) and forwards each connection to `target`, delaying
    /// the client-to-server bytes by `delay`.
    pub async fn start(target: SocketAddr, delay: Duration) -> io::Result<DelayProxy> {
        Self::start_at(SocketAddr::from(([127, 0, 0, 1], 0)), target, delay).await
    }

    /// [`DelayProxy::start`] on a given address: a proxy dropped (S3 gone) and started again
    /// at its address (S3 back) makes an outage for a client that keeps its endpoint.
    pub async fn start_at(listen: SocketAddr, target: SocketAddr, delay: Duration) -> io::Result<DelayProxy> {
        Self::spawn(listen, target, delay, None).await
    }

    /// Without delay, keeping a copy of every byte the clients send (requests as they go on
    /// the wire), for tests that check what a client puts there.
    pub async fn recording(target: SocketAddr) -> io::Result<(DelayProxy, Arc<Mutex<Vec<u8>>>)> {
        let sent = Arc::new(Mutex::new(Vec::new()));
        let proxy = Self::spawn(
            SocketAddr::from(([127, 0, 0, 1], 0)),
            target,
            Duration::ZERO,
            Some(sent.clone()),
        )
        .await?;
        Ok((proxy, sent))
    }

    async fn spawn(
        listen: SocketAddr,
        target: SocketAddr,
        delay: Duration,
        sent: Option<Arc<Mutex<Vec<u8>>>>,
    ) -> io::Result<DelayProxy> {
        let listener = TcpListener::bind(listen).await?;
        let addr = listener.local_addr()?;
        let task = tokio::spawn(async move {
            // Dropping the JoinSet (when this task is aborted) aborts every connection task.
            let mut conns = JoinSet::new();
            loop {
                tokio::select! {
                    accepted = listener.accept() => match accepted {
                        Ok((client, _)) => {
                            let sent = sent.clone();
                            conns.spawn(async move {
                                if let Err(e) = proxy_conn(client, target, delay, sent).await {
                                    tracing::debug!("delay proxy connection ended: {e}");
                                }
                            });
                        }
                        Err(e) => {
                            tracing::warn!("delay proxy accept failed: {e}");
                            tokio::time::sleep(Duration::from_millis(10)).await;
                        }
                    },
                    // Reap finished connections so the set does not grow forever.
                    Some(_) = conns.join_next(), if !conns.is_empty() => {}
                }
            }
        });
        Ok(DelayProxy {
            addr,
            target,
            delay,
            task,
        })
    }

    /// The address clients connect to (127.0.0.1:<port>).
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// `http://127.0.0.1:<port>`, handy as an S3 endpoint.
    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    pub fn target(&self) -> SocketAddr {
        self.target
    }

    pub fn delay(&self) -> Duration {
        self.delay
    }
}

impl Drop for DelayProxy {
    fn drop(&mut self) {
        self.task.abort();
    }
}

async fn proxy_conn(
    client: TcpStream,
    target: SocketAddr,
    delay: Duration,
    sent: Option<Arc<Mutex<Vec<u8>>>>,
) -> io::Result<()> {
    let server = TcpStream::connect(target).await?;
    let _ = client.set_nodelay(true);
    let _ = server.set_nodelay(true);
    let (mut client_rd, mut client_wr) = client.into_split();
    let (mut server_rd, mut server_wr) = server.into_split();

    let (tx, mut rx) = mpsc::channel::<(Instant, Vec<u8>)>(QUEUE);
    // Client -> queue: timestamp each chunk as it arrives.
    let reader = async move {
        let mut buf = vec![0u8; CHUNK];
        loop {
            let n = client_rd.read(&mut buf).await?;
            if n == 0 {
                return Ok::<_, io::Error>(()); // dropping tx ends the writer
            }
            if let Some(sent) = &sent {
                sent.lock().unwrap().extend_from_slice(&buf[..n]);
            }
            if tx.send((Instant::now() + delay, buf[..n].to_vec())).await.is_err() {
                return Ok(());
            }
        }
    };
    // Queue -> server: each chunk no sooner than `delay` after it arrived.
    let writer = async move {
        while let Some((due, chunk)) = rx.recv().await {
            tokio::time::sleep_until(due).await;
            server_wr.write_all(&chunk).await?;
        }
        server_wr.shutdown().await
    };
    // Server -> client, undelayed.
    let back = async move {
        tokio::io::copy(&mut server_rd, &mut client_wr).await?;
        client_wr.shutdown().await
    };
    let upstream = async {
        let (r, w) = tokio::join!(reader, writer);
        r.and(w)
    };
    let (up, down) = tokio::join!(upstream, back);
    up.and(down)
}
