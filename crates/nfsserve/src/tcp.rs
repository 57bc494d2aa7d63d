use std::io;
use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::time::Duration;

use anyhow;
use async_trait::async_trait;
use tokio::io::AsyncWriteExt;
use tokio::net::TcpListener;
use tokio::sync::{mpsc, watch};
use tracing::{debug, error, info};

use crate::context::RPCContext;
use crate::rpcwire::*;
use crate::transaction_tracker::TransactionTracker;
use crate::vfs::NFSFileSystem;

/// A NFS Tcp Connection Handler
pub struct NFSTcpListener<T: NFSFileSystem + Send + Sync + 'static> {
    listener: TcpListener,
    port: u16,
    arcfs: Arc<T>,
    mount_signal: Option<mpsc::Sender<bool>>,
    export_name: Arc<String>,
    transaction_tracker: Arc<TransactionTracker>,
}

pub fn generate_host_ip(hostnum: u16) -> String {
    format!("127.88.{}.{}", ((hostnum >> 8) & 0xFF) as u8, (hostnum & 0xFF) as u8)
}

/// processes an established socket
///
/// s3nfs patch: when `shutdown` fires, no more bytes are read from the client; the requests
/// already received are answered, then the connection is closed. The in-flight requests each hold
/// a sender of the reply channel, so the channel closes exactly when the last one has answered.
///
/// Reading from the client and writing replies to it are independent: a task reads the client's
/// records and hands each to a task of its own, and may wait there while the connection has its
/// maximum of requests in flight, while this loop keeps writing the replies that free them.
async fn process_socket(
    socket: tokio::net::TcpStream,
    context: RPCContext,
    shutdown: watch::Receiver<bool>,
    in_flight: Arc<tokio::sync::Semaphore>,
) -> Result<(), anyhow::Error> {
    let _ = socket.set_nodelay(true);
    let (from_client, mut to_client) = socket.into_split();
    let reader = tokio::io::BufReader::with_capacity(READ_BUFFER, from_client);
    let (mut message_handler, mut msgrecvchan) = SocketMessageHandler::new(&context, in_flight, reader);

    // Sent when the client closed the connection; dropped unsent when reading stops otherwise
    // (a shutdown, a refused record, a failed read), and the replies in flight are written first.
    let (closed_tx, mut closed_rx) = tokio::sync::oneshot::channel::<()>();
    let mut stop = shutdown;
    let handler = tokio::spawn(async move {
        loop {
            let next = tokio::select! {
                // Shutdown: read nothing more from the socket. The records already in the
                // buffer are answered (reading a record is cancel-safe: one cut short by the
                // shutdown stays where it was, and is dropped with the connection).
                _ = async { let _ = stop.wait_for(|s| *s).await; } => {
                    loop {
                        let buffered = tokio::select! {
                            biased;
                            r = message_handler.next_record() => r,
                            _ = std::future::ready(()) => break,
                        };
                        let Ok(Some(record)) = buffered else { break };
                        if message_handler.handle(record).await.is_err() {
                            break;
                        }
                    }
                    return;
                }
                r = message_handler.next_record() => r,
            };
            match next {
                Ok(Some(record)) => {
                    if let Err(e) = message_handler.handle(record).await {
                        debug!("Message loop broken due to {:?}", e);
                        return;
                    }
                }
                Ok(None) => {
                    let _ = closed_tx.send(());
                    return;
                }
                // A refused record (too long) or a failed read: what is in flight is answered,
                // then the connection is closed, as after a shutdown.
                Err(e) => {
                    debug!("Message loop broken due to {:?}", e);
                    return;
                }
            }
        }
    });
    // Once the connection is gone, the requests it left buffered are not worth serving
    // (nobody will read the replies): stop reading them.
    let _handler = AbortOnDrop(handler);

    let mut reading = true;
    loop {
        tokio::select! {
            closed = &mut closed_rx, if reading => match closed {
                Ok(()) => return Ok(()),
                // Reading stopped otherwise: answer what was received, then close.
                Err(_) => reading = false,
            },
            reply = msgrecvchan.recv() => {
                match reply {
                    Some(Reply { message: Err(e), .. }) => {
                        debug!("Message handling closed : {:?}", e);
                        return Err(e);
                    }
                    Some(Reply { message: Ok(msg), tail, held }) => {
                        // A client that stops reading its replies is dropped rather than
                        // allowed to hold its requests' memory for ever.
                        // The timer is armed only if the reply does not go out at once: a
                        // timer costs clock readings, and nearly every reply fits the socket.
                        let tail = tail.unwrap_or_default();
                        let mut write = std::pin::pin!(write_fragment(&mut to_client, &msg, &tail));
                        let first = std::future::poll_fn(|cx| std::task::Poll::Ready(std::future::Future::poll(write.as_mut(), cx))).await;
                        let written = match first {
                            std::task::Poll::Ready(r) => Ok(r),
                            std::task::Poll::Pending => tokio::time::timeout(REPLY_TIMEOUT, write).await,
                        };
                        match written {
                            Ok(Ok(())) => {}
                            Ok(Err(e)) => {
                                debug!("Write error {:?}", e);
                                return Err(e);
                            }
                            Err(_) => {
                                info!("client {} did not read its replies for {:?}: closing", context.client_addr, REPLY_TIMEOUT);
                                return Err(anyhow::anyhow!("reply not taken within {REPLY_TIMEOUT:?}"));
                            }
                        }
                        drop(held);
                    }
                    // Every request answered and nothing more to read.
                    None => {
                        let _ = to_client.shutdown().await;
                        return Ok(());
                    }
                }
            }
        }
    }
}

struct AbortOnDrop(tokio::task::JoinHandle<()>);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.0.abort();
    }
}

#[async_trait]
pub trait NFSTcp: Send + Sync {
    /// Gets the true listening port. Useful if the bound port number is 0
    fn get_listen_port(&self) -> u16;

    /// Gets the true listening IP. Useful on windows when the IP may be random
    fn get_listen_ip(&self) -> IpAddr;

    /// Sets a mount listener. A "true" signal will be sent on a mount
    /// and a "false" will be sent on an unmount
    fn set_mount_listener(&mut self, signal: mpsc::Sender<bool>);

    /// Loops forever and never returns handling all incoming connections.
    async fn handle_forever(&self) -> io::Result<()>;
}

/// s3nfs patch: how long a reply may wait for the client to read it before the connection is
/// closed (the client reconnects and retransmits, as after any lost connection).
const REPLY_TIMEOUT: Duration = Duration::from_secs(30);

/// s3nfs patch: what one read from a client's socket may take (records are cut from it).
const READ_BUFFER: usize = 128 * 1024;

/// s3nfs patch: connections one listener serves at once; more wait in the listen backlog until
/// one closes (a burst of connections costs queued sockets, not tasks and buffers).
pub const MAX_CONNECTIONS: usize = 512;

/// Longest pause between retries of a failing `accept()` (EMFILE, ENFILE, ENOBUFS...).
const MAX_ACCEPT_BACKOFF: Duration = Duration::from_secs(1);

impl<T: NFSFileSystem + Send + Sync + 'static> NFSTcpListener<T> {
    /// Binds to a ipstr of the form [ip address]:port. For instance
    /// "127.0.0.1:12000". fs is an instance of an implementation
    /// of NFSFileSystem.
    pub async fn bind(ipstr: &str, fs: T) -> io::Result<NFSTcpListener<T>> {
        let (ip, port) = ipstr
            .split_once(':')
            .ok_or_else(|| io::Error::new(io::ErrorKind::AddrNotAvailable, "IP Address must be of form ip:port"))?;
        let port = port
            .parse::<u16>()
            .map_err(|_| io::Error::new(io::ErrorKind::AddrNotAvailable, "Port not in range 0..=65535"))?;

        let arcfs: Arc<T> = Arc::new(fs);

        if ip == "auto" {
            let mut num_tries_left = 32;

            for try_ip in 1u16.. {
                let ip = generate_host_ip(try_ip);

                let result = NFSTcpListener::bind_internal(&ip, port, arcfs.clone()).await;

                match &result {
                    Err(_) => {
                        if num_tries_left == 0 {
                            return result;
                        } else {
                            num_tries_left -= 1;
                            continue;
                        }
                    }
                    Ok(_) => {
                        return result;
                    }
                }
            }
            unreachable!(); // Does not detect automatically that loop above never terminates.
        } else {
            // Otherwise, try this.
            NFSTcpListener::bind_internal(ip, port, arcfs).await
        }
    }

    async fn bind_internal(ip: &str, port: u16, arcfs: Arc<T>) -> io::Result<NFSTcpListener<T>> {
        let ipstr = format!("{ip}:{port}");
        let listener = TcpListener::bind(&ipstr).await?;
        info!("Listening on {:?}", &ipstr);

        let port = match listener.local_addr().unwrap() {
            SocketAddr::V4(s) => s.port(),
            SocketAddr::V6(s) => s.port(),
        };
        Ok(NFSTcpListener {
            listener,
            port,
            arcfs,
            mount_signal: None,
            export_name: Arc::from("/".to_string()),
            transaction_tracker: Arc::new(TransactionTracker::new(Duration::from_secs(60))),
        })
    }

    /// Sets an optional NFS export name.
    ///
    /// - `export_name`: The desired export name without slashes.
    ///
    /// Example: Name `foo` results in the export path `/foo`.
    /// Default path is `/` if not set.
    pub fn with_export_name<S: AsRef<str>>(&mut self, export_name: S) {
        self.export_name = Arc::new(format!(
            "/{}",
            export_name.as_ref().trim_end_matches('/').trim_start_matches('/')
        ))
    }
}

#[async_trait]
impl<T: NFSFileSystem + Send + Sync + 'static> NFSTcp for NFSTcpListener<T> {
    /// Gets the true listening port. Useful if the bound port number is 0
    fn get_listen_port(&self) -> u16 {
        let addr = self.listener.local_addr().unwrap();
        addr.port()
    }

    fn get_listen_ip(&self) -> IpAddr {
        let addr = self.listener.local_addr().unwrap();
        addr.ip()
    }

    /// Sets a mount listener. A "true" signal will be sent on a mount
    /// and a "false" will be sent on an unmount
    fn set_mount_listener(&mut self, signal: mpsc::Sender<bool>) {
        self.mount_signal = Some(signal);
    }

    /// Loops forever and never returns handling all incoming connections.
    async fn handle_forever(&self) -> io::Result<()> {
        let (_never, rx) = watch::channel(false);
        self.accept_until(rx).await
    }
}

impl<T: NFSFileSystem + Send + Sync + 'static> NFSTcpListener<T> {
    /// s3nfs patch: serves until `shutdown` becomes true, then stops accepting, closes the
    /// listening socket, lets every connection answer the requests it has already received, and
    /// returns once all of them are closed. Accept errors (EMFILE under a burst of connections,
    /// a connection reset before it was looked at) are logged and retried with back-off: the
    /// listener never ends on its own.
    pub async fn handle_until(self, shutdown: watch::Receiver<bool>) {
        let _ = self.accept_until(shutdown).await;
    }

    async fn accept_until(&self, mut shutdown: watch::Receiver<bool>) -> io::Result<()> {
        let mut conns = tokio::task::JoinSet::new();
        let mut backoff = Duration::from_millis(10);
        let in_flight = Arc::new(tokio::sync::Semaphore::new(MAX_IN_FLIGHT));
        loop {
            let accepted = tokio::select! {
                _ = shutdown.wait_for(|stop| *stop) => break,
                // Reap finished connections so the set does not grow with the process's age.
                Some(_) = conns.join_next(), if !conns.is_empty() => continue,
                r = self.listener.accept(), if conns.len() < MAX_CONNECTIONS => r,
            };
            let socket = match accepted {
                Ok((socket, _)) => {
                    backoff = Duration::from_millis(10);
                    socket
                }
                Err(e) => {
                    error!("accept failed on port {}: {e}; retrying in {:?}", self.port, backoff);
                    tokio::select! {
                        _ = shutdown.wait_for(|stop| *stop) => break,
                        _ = tokio::time::sleep(backoff) => {}
                    }
                    backoff = (backoff * 2).min(MAX_ACCEPT_BACKOFF);
                    continue;
                }
            };
            let client_addr = match socket.peer_addr() {
                Ok(a) => a.to_string(),
                // Reset before we looked: nothing to serve.
                Err(_) => continue,
            };
            let context = RPCContext {
                local_port: self.port,
                client_addr,
                auth: crate::rpc::auth_unix::default(),
                auth_is_unix: false,
                vfs: self.arcfs.clone(),
                mount_signal: self.mount_signal.clone(),
                export_name: self.export_name.clone(),
                transaction_tracker: self.transaction_tracker.clone(),
                arrived: std::time::Instant::now(),
            };
            info!("Accepting connection from {}", context.client_addr);
            debug!("Accepting socket {:?} {:?}", socket, context);
            let stop = shutdown.clone();
            let in_flight = in_flight.clone();
            conns.spawn(async move {
                let _ = process_socket(socket, context, stop, in_flight).await;
            });
        }
        while conns.join_next().await.is_some() {}
        Ok(())
    }
}
