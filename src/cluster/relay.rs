//! The byte pipes of a ReadWriteMany volume: the node-local endpoint every node's kernel
//! mounts, and the owner's cross-node port.
//!
//! - **The endpoint** listens on the node's 127.0.0.1 at the port the kernel mounted, for as
//!   long as the volume is staged on the node. Each connection goes to the current [`Target`]:
//!   the owner gateway on this node, or another node's cross-node port over mutual TLS. When
//!   the target changes, every connection is closed; the kernel's hard mount reconnects and
//!   sends again what was not answered, now to the new target. NFSv3 keeps no per-connection
//!   state, so nothing else is needed. While no target is known, connections wait.
//! - **The cross-node port** is the owner's, on the node's own address: a connection that
//!   completes the TLS handshake with the driver's key pair ([`super::tls`]) is joined to the
//!   owner gateway on 127.0.0.1; anything else is refused and counted.
//!
//! Bytes are copied as they come: RPC records are not parsed here, so the relay adds no
//! limits of its own and a hostile client meets the gateway's own checks.

use std::net::SocketAddr;
use std::sync::atomic::Ordering;
use std::time::Duration;

use tokio::io::{AsyncRead, AsyncWrite};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;
use tokio::task::JoinSet;

use super::tls::PeerTls;

/// Where the endpoint sends connections.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Target {
    /// Nowhere yet: connections wait.
    None,
    /// The owner gateway on this node.
    Local(SocketAddr),
    /// Another node's cross-node port.
    Remote(SocketAddr),
}

/// Big enough for a 1 MiB WRITE to cross in a few reads.
const BUF: usize = 256 * 1024;
/// A peer that does not finish its handshake in this long is dropped.
const HANDSHAKE: Duration = Duration::from_secs(10);

/// Serves the node-local endpoint until the task is aborted (which closes every connection).
pub async fn endpoint(listener: TcpListener, target: watch::Receiver<Target>, tls: PeerTls) {
    accept_loop(listener, "relay endpoint", |client, _| {
        endpoint_conn(client, target.clone(), tls.clone())
    })
    .await
}

/// Accepts connections until aborted, each served by `serve` in a task that ends with this
/// one (the set of connection tasks is dropped with it). Accept errors (EMFILE) are retried.
async fn accept_loop<F, Fut>(listener: TcpListener, what: &str, mut serve: F)
where
    F: FnMut(TcpStream, SocketAddr) -> Fut,
    Fut: std::future::Future<Output = ()> + Send + 'static,
{
    let mut conns = JoinSet::new();
    loop {
        tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok((conn, from)) => {
                    let _ = conn.set_nodelay(true);
                    conns.spawn(serve(conn, from));
                }
                Err(e) => {
                    tracing::warn!(error = %e, "{what}: accept failed");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
            },
            Some(_) = conns.join_next(), if !conns.is_empty() => {}
        }
    }
}

/// One kernel connection: joined to the target, and closed when the target changes or the
/// upstream closes. While no upstream can be reached (no owner yet, or a dead one not yet
/// replaced), the connection is held and the upstream tried again: the kernel's requests wait
/// here, and a closed connection would cost the kernel a reconnection back-off of its own
/// (3 s and growing).
async fn endpoint_conn(client: TcpStream, mut target: watch::Receiver<Target>, tls: PeerTls) {
    loop {
        let t = match target.wait_for(|t| *t != Target::None).await {
            Ok(t) => t.clone(),
            Err(_) => return,
        };
        let changed = {
            let mut rx = target.clone();
            let t = t.clone();
            async move {
                let _ = rx.wait_for(|now| *now != t).await;
            }
        };
        match &t {
            Target::None => {}
            Target::Local(addr) => {
                if let Ok(up) = TcpStream::connect(addr).await {
                    let _ = up.set_nodelay(true);
                    return pipe(client, up, changed).await;
                }
            }
            Target::Remote(addr) => {
                // A cut-off owner does not even refuse: give up on it as soon as another is named.
                let attempt = tokio::select! {
                    r = connect_remote(*addr, &tls) => Some(r),
                    _ = target.changed() => None,
                };
                match attempt {
                    Some(Ok(up)) => {
                        crate::metrics::global().peer_relayed.fetch_add(1, Ordering::Relaxed);
                        return pipe(client, up, changed).await;
                    }
                    Some(Err(e)) => {
                        tracing::debug!(owner = %addr, error = %e, "relay: cannot reach the owner gateway yet")
                    }
                    None => continue,
                }
            }
        }
        // Try again soon, or at once if the target changes.
        let _ = tokio::time::timeout(RETRY, target.changed()).await;
    }
}

/// How often a held connection tries an unreachable upstream again.
const RETRY: Duration = Duration::from_millis(250);

/// TLS over a buffered socket: rustls asks for one record (16 KiB at most) per read, and a
/// 1 MiB READ reply would otherwise cost about a hundred system calls on each side.
type Buffered = tokio::io::BufReader<TcpStream>;

async fn connect_remote(addr: SocketAddr, tls: &PeerTls) -> std::io::Result<tokio_rustls::client::TlsStream<Buffered>> {
    let s = tokio::time::timeout(HANDSHAKE, TcpStream::connect(addr))
        .await
        .map_err(|_| std::io::Error::new(std::io::ErrorKind::TimedOut, "connect timed out"))??;
    s.set_nodelay(true)?;
    let s = tokio::io::BufReader::with_capacity(BUF, s);
    tokio::time::timeout(HANDSHAKE, tls.connector().connect(PeerTls::server_name(), s))
        .await
        .map_err(|_| std::io::Error::new(std::io::ErrorKind::TimedOut, "TLS handshake timed out"))?
}

/// Serves the owner's cross-node port until aborted: authenticated connections are joined
/// to the gateway at `gateway`.
pub async fn cross_node(listener: TcpListener, gateway: SocketAddr, tls: PeerTls) {
    accept_loop(listener, "cross-node port", |peer, from| {
        cross_node_conn(peer, from, gateway, tls.acceptor())
    })
    .await
}

async fn cross_node_conn(peer: TcpStream, from: SocketAddr, gateway: SocketAddr, acceptor: tokio_rustls::TlsAcceptor) {
    let peer = tokio::io::BufReader::with_capacity(BUF, peer);
    let peer = match tokio::time::timeout(HANDSHAKE, acceptor.accept(peer)).await {
        Ok(Ok(p)) => p,
        Ok(Err(e)) => {
            crate::metrics::global().peer_refused.fetch_add(1, Ordering::Relaxed);
            tracing::warn!(%from, error = %e, "cross-node connection refused");
            return;
        }
        Err(_) => {
            crate::metrics::global().peer_refused.fetch_add(1, Ordering::Relaxed);
            tracing::warn!(%from, "cross-node connection refused: no TLS handshake");
            return;
        }
    };
    let Ok(up) = TcpStream::connect(gateway).await else {
        return;
    };
    let _ = up.set_nodelay(true);
    pipe(peer, up, std::future::pending::<()>()).await;
}

/// Copies both ways until either side closes or `until` completes.
async fn pipe<A, B>(mut a: A, mut b: B, until: impl std::future::Future<Output = ()>)
where
    A: AsyncRead + AsyncWrite + Unpin,
    B: AsyncRead + AsyncWrite + Unpin,
{
    tokio::select! {
        _ = tokio::io::copy_bidirectional_with_sizes(&mut a, &mut b, BUF, BUF) => {}
        _ = until => {}
    }
}
