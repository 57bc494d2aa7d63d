use std::io::{Cursor, Write};

use anyhow::anyhow;
use std::sync::Arc;
use tokio::io::AsyncWriteExt;
use tokio::sync::{mpsc, OwnedSemaphorePermit, Semaphore};
use tracing::{debug, error, trace, warn};

use crate::context::RPCContext;
use crate::rpc::*;
use crate::xdr::*;
use crate::{mount, mount_handlers, nfs, nfs_handlers, portmap, portmap_handlers};

// Information from RFC 5531
// https://datatracker.ietf.org/doc/html/rfc5531

const NFS_ACL_PROGRAM: u32 = 100227;
const NFS_ID_MAP_PROGRAM: u32 = 100270;
const NFS_METADATA_PROGRAM: u32 = 200024;

async fn handle_rpc(
    input: &mut Cursor<impl AsRef<[u8]>>,
    output: &mut impl Write,
    mut context: RPCContext,
) -> Result<bool, anyhow::Error> {
    let mut recv = rpc_msg::default();
    recv.deserialize(input)?;
    let xid = recv.xid;
    if let rpc_body::CALL(call) = recv.body {
        if let auth_flavor::AUTH_UNIX = call.cred.flavor {
            let mut auth = auth_unix::default();
            auth.deserialize(&mut Cursor::new(&call.cred.body))?;
            // s3nfs patch: RFC 5531 allows 16 groups; more is a malformed credential.
            auth.gids.truncate(16);
            context.auth = auth;
            context.auth_is_unix = true;
        } else {
            context.auth_is_unix = false;
        }
        if call.rpcvers != 2 {
            warn!("Invalid RPC version {} != 2", call.rpcvers);
            rpc_vers_mismatch(xid).serialize(output)?;
            return Ok(true);
        }

        context.arrived = std::time::Instant::now();
        if context
            .transaction_tracker
            .is_retransmission(xid, &context.client_addr, context.arrived)
        {
            // This is a retransmission
            // Drop the message and return
            debug!(
                "Retransmission detected, xid: {}, client_addr: {}, call: {:?}",
                xid, context.client_addr, call
            );
            return Ok(false);
        }

        let res = {
            if call.prog == nfs::PROGRAM {
                nfs_handlers::handle_nfs(xid, call, input, output, &context).await
            } else if call.prog == portmap::PROGRAM {
                portmap_handlers::handle_portmap(xid, call, input, output, &context)
            } else if call.prog == mount::PROGRAM {
                mount_handlers::handle_mount(xid, call, input, output, &context).await
            } else if call.prog == NFS_ACL_PROGRAM
                || call.prog == NFS_ID_MAP_PROGRAM
                || call.prog == NFS_METADATA_PROGRAM
            {
                trace!("ignoring NFS_ACL packet");
                prog_unavail_reply_message(xid).serialize(output)?;
                Ok(())
            } else {
                warn!("Unknown RPC Program number {} != {}", call.prog, nfs::PROGRAM);
                prog_unavail_reply_message(xid).serialize(output)?;
                Ok(())
            }
        }
        .map(|_| true);
        context
            .transaction_tracker
            .mark_processed(xid, &context.client_addr, context.arrived);
        res
    } else {
        error!("Unexpectedly received a Reply instead of a Call");
        Err(anyhow!("Bad RPC Call format"))
    }
}

/// RFC 1057 Section 10
/// When RPC messages are passed on top of a byte stream transport
/// protocol (like TCP), it is necessary to delimit one message from
/// another in order to detect and possibly recover from protocol errors.
/// This is called record marking (RM).  Sun uses this RM/TCP/IP
/// transport for passing RPC messages on TCP streams.  One RPC message
/// fits into one RM record.
///
/// A record is composed of one or more record fragments.  A record
/// fragment is a four-byte header followed by 0 to (2**31) - 1 bytes of
/// fragment data.  The bytes encode an unsigned binary number; as with
/// XDR integers, the byte order is from highest to lowest.  The number
/// encodes two values -- a boolean which indicates whether the fragment
/// is the last fragment of the record (bit value 1 implies the fragment
/// is the last fragment) and a 31-bit unsigned binary value which is the
/// length in bytes of the fragment's data.  The boolean value is the
/// highest-order bit of the header; the length is the 31 low-order bits.
/// (Note that this record specification is NOT in XDR standard form!)
/// s3nfs patch: the largest record a legal call needs: a WRITE of `wtmax` (1 MiB, see
/// `fsinfo`) plus its header, credentials and verifier (well under 64 KiB). 0.11.0 trusted the
/// announced length and zero-filled that much before reading a byte: one client announcing
/// 2 GiB fragments could take the process's memory. A longer record now closes the connection.
pub const MAX_RECORD: usize = (1 << 20) + (64 << 10);

/// s3nfs patch: records refused since the process started, too long or undecodable (their
/// connection is closed). Exported as a metric; logged only at the 1st, 2nd, 4th, 8th... so
/// that a hostile client cannot flood the log.
pub static REFUSED_RECORDS: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);

fn refused(what: &dyn std::fmt::Display) {
    let n = REFUSED_RECORDS.fetch_add(1, std::sync::atomic::Ordering::Relaxed) + 1;
    if n.is_power_of_two() {
        warn!("refused an RPC record ({n} so far; logged at powers of two): {what}");
    } else {
        debug!("refused an RPC record: {what}");
    }
}

/// s3nfs patch: the records of one connection, read from its socket through a buffer.
///
/// 0.11.0 had a task copy what the socket gave into an in-process pipe, and the handler copy it
/// out again into the record: two copies of every byte received, and a task woken per read.
/// Records are now cut from the reader's own buffer, one copy.
///
/// [`RecordReader::next`] is cancel-safe: a record read halfway stays here and the next call
/// goes on with it, so a caller may stop waiting (a shutdown) without losing its place.
///
/// Only what arrived is held: room for a fragment is made as its bytes come, at most twice what
/// the record holds so far or 16 KiB, whichever is more (an 8 KiB WRITE gets its room at once),
/// never more than the fragment announced.
#[derive(Debug)]
pub struct RecordReader<R> {
    reader: R,
    record: Vec<u8>,
    /// The header of the next fragment, as far as it arrived.
    header: [u8; 4],
    header_len: usize,
    /// Inside a fragment: the bytes of it still to come, and whether it ends the record.
    fragment: Option<(usize, bool)>,
}

/// Room made at once for a fragment, however little of it arrived.
const FIRST_ROOM: usize = 16 << 10;

impl<R: tokio::io::AsyncBufRead + Unpin> RecordReader<R> {
    pub fn new(reader: R) -> Self {
        RecordReader {
            reader,
            record: Vec::new(),
            header: [0; 4],
            header_len: 0,
            fragment: None,
        }
    }

    /// The next whole record; `None` when the client closed the connection between records.
    pub async fn next(&mut self) -> Result<Option<Vec<u8>>, anyhow::Error> {
        use tokio::io::AsyncBufReadExt;
        loop {
            match self.fragment {
                Some((0, last)) => {
                    self.fragment = None;
                    if last {
                        return Ok(Some(std::mem::take(&mut self.record)));
                    }
                }
                Some((rest, last)) => {
                    let buf = self.reader.fill_buf().await?;
                    if buf.is_empty() {
                        return Err(anyhow!("connection closed inside a fragment"));
                    }
                    let n = buf.len().min(rest);
                    let len = self.record.len();
                    if self.record.capacity() - len < n {
                        let room = (len + rest).min((2 * len).max(FIRST_ROOM)).max(len + n);
                        self.record.reserve_exact(room - len);
                    }
                    self.record.extend_from_slice(&buf[..n]);
                    self.reader.consume(n);
                    self.fragment = Some((rest - n, last));
                }
                None => {
                    let buf = self.reader.fill_buf().await?;
                    if buf.is_empty() {
                        if self.header_len == 0 && self.record.is_empty() {
                            return Ok(None);
                        }
                        return Err(anyhow!("connection closed inside a record"));
                    }
                    let n = buf.len().min(4 - self.header_len);
                    self.header[self.header_len..self.header_len + n].copy_from_slice(&buf[..n]);
                    self.reader.consume(n);
                    self.header_len += n;
                    if self.header_len == 4 {
                        self.header_len = 0;
                        self.fragment = Some(self.fragment_header()?);
                    }
                }
            }
        }
    }

    /// The fragment a complete header announces, if the record may grow by that much.
    fn fragment_header(&self) -> Result<(usize, bool), anyhow::Error> {
        let fragment_header = u32::from_be_bytes(self.header);
        let is_last = (fragment_header & (1 << 31)) > 0;
        let length = (fragment_header & ((1 << 31) - 1)) as usize;
        trace!("Reading fragment length:{}, last:{}", length, is_last);
        if self.record.len() + length > MAX_RECORD {
            let e = anyhow!(
                "record of {} bytes or more announced; at most {MAX_RECORD} accepted",
                self.record.len() + length
            );
            refused(&e);
            return Err(e);
        }
        Ok((length, is_last))
    }
}

/// s3nfs patch: a reply longer than one fragment allows is sent as several (0.11.0 asserted,
/// which killed the connection's task on a READ of 2 GiB).
/// s3nfs patch: `buf` is followed by `tail` (see [`REPLY_TAIL`]), in one vectored write when they
/// fit one fragment.
pub async fn write_fragment<W: tokio::io::AsyncWrite + Unpin>(
    socket: &mut W,
    buf: &[u8],
    tail: &[u8],
) -> Result<(), anyhow::Error> {
    const MAX_FRAGMENT: usize = (1 << 31) - 1;
    if !tail.is_empty() {
        if buf.len() + tail.len() > MAX_FRAGMENT {
            let whole = [buf, tail].concat();
            return Box::pin(write_fragment(socket, &whole, &[])).await;
        }
        let header = ((buf.len() + tail.len()) as u32 | (1u32 << 31)).to_be_bytes();
        let mut slices = [
            std::io::IoSlice::new(&header),
            std::io::IoSlice::new(buf),
            std::io::IoSlice::new(tail),
        ];
        let mut rest: &mut [std::io::IoSlice] = &mut slices;
        while !rest.is_empty() {
            let n = socket.write_vectored(rest).await?;
            if n == 0 {
                return Err(std::io::Error::from(std::io::ErrorKind::WriteZero).into());
            }
            std::io::IoSlice::advance_slices(&mut rest, n);
        }
        return Ok(());
    }
    if buf.is_empty() {
        socket.write_all(&(1u32 << 31).to_be_bytes()).await?;
        return Ok(());
    }
    let mut chunks = buf.chunks(MAX_FRAGMENT).peekable();
    while let Some(chunk) = chunks.next() {
        let last = if chunks.peek().is_none() { 1u32 << 31 } else { 0 };
        let header = (chunk.len() as u32 | last).to_be_bytes();
        trace!("Writing fragment length:{}", chunk.len());
        // s3nfs patch: header and body in one system call (two before, per reply).
        let mut slices = [std::io::IoSlice::new(&header), std::io::IoSlice::new(chunk)];
        let mut rest: &mut [std::io::IoSlice] = &mut slices;
        while !rest.is_empty() {
            let n = socket.write_vectored(rest).await?;
            if n == 0 {
                return Err(std::io::Error::from(std::io::ErrorKind::WriteZero).into());
            }
            std::io::IoSlice::advance_slices(&mut rest, n);
        }
    }
    Ok(())
}

pub type SocketMessageType = Result<Vec<u8>, anyhow::Error>;

tokio::task_local! {
    /// s3nfs patch: bytes that end the reply being built, sent after it on the socket without
    /// being copied into it (a READ's data: one copy of every byte read, and the pages of a
    /// fresh 1 MiB reply buffer, less). Only set where the reply goes to a socket.
    pub(crate) static REPLY_TAIL: std::cell::RefCell<Option<bytes::Bytes>>;
}

/// s3nfs patch: whether the reply being built may end in a [`REPLY_TAIL`].
pub(crate) fn tail_allowed() -> bool {
    REPLY_TAIL.try_with(|_| ()).is_ok()
}

/// s3nfs patch: sets the bytes that end the reply being built (see [`REPLY_TAIL`]).
pub(crate) fn set_tail(tail: bytes::Bytes) {
    let _ = REPLY_TAIL.try_with(|t| *t.borrow_mut() = Some(tail));
}

/// s3nfs patch: requests one connection may have in flight (read from the socket, reply not yet
/// written back); further requests stay in the socket until one is answered. 0.11.0 spawned a
/// task per request without limit and queued replies without limit, so a client pipelining
/// READs and never reading the replies grew the server's memory without end.
pub const MAX_IN_FLIGHT_PER_CONNECTION: usize = 32;
/// s3nfs patch: requests in flight on all connections of one listener together. With requests
/// and replies of at most about 1 MiB each, this bounds what requests hold at about
/// `MAX_IN_FLIGHT` x 2.1 MiB, whatever the clients send.
pub const MAX_IN_FLIGHT: usize = 64;

/// The reply to one request, with what it holds of the in-flight bounds: released once the
/// reply is on the socket.
pub struct Reply {
    pub message: SocketMessageType,
    /// Sent after `message` (see [`REPLY_TAIL`]).
    pub tail: Option<bytes::Bytes>,
    pub held: (OwnedSemaphorePermit, OwnedSemaphorePermit),
}

/// The Socket Message Handler reads records from a connection and spawns off a task to handle
/// each; replies are queued into the reply_send_channel.
#[derive(Debug)]
pub struct SocketMessageHandler<R> {
    records: RecordReader<R>,
    reply_send_channel: mpsc::UnboundedSender<Reply>,
    context: RPCContext,
    /// This connection's and the listener's in-flight bounds.
    local: Arc<Semaphore>,
    global: Arc<Semaphore>,
}

impl<R: tokio::io::AsyncBufRead + Unpin> SocketMessageHandler<R> {
    /// Creates a new SocketMessageHandler reading from `reader`, with the receiver for queued
    /// message replies.
    pub fn new(context: &RPCContext, global: Arc<Semaphore>, reader: R) -> (Self, mpsc::UnboundedReceiver<Reply>) {
        let (msgsend, msgrecv) = mpsc::unbounded_channel();
        (
            Self {
                records: RecordReader::new(reader),
                reply_send_channel: msgsend,
                context: context.clone(),
                local: Arc::new(Semaphore::new(MAX_IN_FLIGHT_PER_CONNECTION)),
                global,
            },
            msgrecv,
        )
    }

    /// The next whole record (see [`RecordReader::next`]; cancel-safe).
    pub async fn next_record(&mut self) -> Result<Option<Vec<u8>>, anyhow::Error> {
        self.records.next().await
    }

    /// Handles one record in a task of its own, once the in-flight bounds allow.
    pub async fn handle(&mut self, fragment: Vec<u8>) -> Result<(), anyhow::Error> {
        // The connection's own bound first: a connection at its limit must not sit on the
        // listener's permits while it waits.
        let local = self.local.clone().acquire_owned().await?;
        let global = self.global.clone().acquire_owned().await?;
        let permits = (local, global);
        let context = self.context.clone();
        let send = self.reply_send_channel.clone();
        tokio::spawn(async move {
            let mut write_buf: Vec<u8> = Vec::new();
            let mut write_cursor = Cursor::new(&mut write_buf);
            let (maybe_reply, tail) = REPLY_TAIL
                .scope(std::cell::RefCell::new(None), async {
                    let r = handle_rpc(&mut Cursor::new(fragment), &mut write_cursor, context).await;
                    (r, REPLY_TAIL.with(|t| t.borrow_mut().take()))
                })
                .await;
            match maybe_reply {
                Err(e) => {
                    refused(&e);
                    let _ = send.send(Reply {
                        message: Err(e),
                        tail: None,
                        held: permits,
                    });
                }
                Ok(true) => {
                    let _ = std::io::Write::flush(&mut write_cursor);
                    let _ = send.send(Reply {
                        message: Ok(write_buf),
                        tail,
                        held: permits,
                    });
                }
                Ok(false) => {
                    // do not reply (a retransmission of a request in progress)
                    drop(permits);
                }
            }
        });
        Ok(())
    }
}

/// s3nfs patch: one RPC record (without its record-marking header) through the whole server
/// side, decoding, dispatch and the filesystem, as a connection would process it; returns the
/// reply record, if any. For fuzzing: the connection machinery is left out, everything else is
/// the real path.
pub async fn process_record(vfs: Arc<dyn crate::vfs::NFSFileSystem + Send + Sync>, record: &[u8]) -> Option<Vec<u8>> {
    let context = RPCContext {
        local_port: 0,
        client_addr: "fuzz".into(),
        auth: auth_unix::default(),
        auth_is_unix: false,
        vfs,
        mount_signal: None,
        export_name: Arc::new("/".into()),
        transaction_tracker: Arc::new(crate::transaction_tracker::TransactionTracker::new(
            std::time::Duration::from_secs(60),
        )),
        arrived: std::time::Instant::now(),
    };
    let mut out = Vec::new();
    match handle_rpc(&mut Cursor::new(record), &mut Cursor::new(&mut out), context).await {
        Ok(true) => Some(out),
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::Ordering;
    use std::time::Duration;

    use tokio::io::AsyncWriteExt;

    use super::*;

    fn header(len: u32, last: bool) -> [u8; 4] {
        (len | if last { 1 << 31 } else { 0 }).to_be_bytes()
    }

    type Reader = RecordReader<tokio::io::BufReader<tokio::io::DuplexStream>>;

    /// The records of a connection whose client sends `bytes`, then closes it if `close` (else
    /// keeps it open until the test ends).
    fn connection(bytes: Vec<u8>, close: bool) -> (Reader, tokio::sync::oneshot::Sender<()>) {
        let (mut client, server) = tokio::io::duplex(64 * 1024);
        let (keep, kept) = tokio::sync::oneshot::channel::<()>();
        tokio::spawn(async move {
            client.write_all(&bytes).await.unwrap();
            if !close {
                let _ = kept.await;
            }
        });
        (RecordReader::new(tokio::io::BufReader::new(server)), keep)
    }

    #[tokio::test]
    async fn a_fragment_marked_last_is_a_whole_record() {
        let (mut r, _keep) = connection([&header(5, true)[..], b"hello"].concat(), true);
        assert_eq!(r.next().await.unwrap().unwrap(), b"hello");
        assert!(r.next().await.unwrap().is_none(), "closed between records");
    }

    #[tokio::test]
    async fn fragments_accumulate_until_the_last() {
        let bytes = [
            &header(3, false)[..],
            b"abc",
            &header(0, false),
            &header(2, true),
            b"de",
            &header(1, true),
            b"f",
        ]
        .concat();
        let (mut r, _keep) = connection(bytes, true);
        assert_eq!(r.next().await.unwrap().unwrap(), b"abcde", "an empty fragment inside");
        assert_eq!(r.next().await.unwrap().unwrap(), b"f");
    }

    #[tokio::test]
    async fn a_record_read_halfway_when_its_reader_stopped_waiting_is_finished_by_the_next_call() {
        let (mut client, server) = tokio::io::duplex(64 * 1024);
        let mut r = RecordReader::new(tokio::io::BufReader::new(server));
        let rec = [&header(6, true)[..], b"abcdef"].concat();
        client.write_all(&rec[..2]).await.unwrap(); // half a header
        assert!(tokio::time::timeout(Duration::from_millis(50), r.next()).await.is_err());
        client.write_all(&rec[2..7]).await.unwrap(); // the rest of it, and one byte
        assert!(tokio::time::timeout(Duration::from_millis(50), r.next()).await.is_err());
        client.write_all(&rec[7..]).await.unwrap();
        assert_eq!(r.next().await.unwrap().unwrap(), b"abcdef");
    }

    #[tokio::test]
    async fn a_record_of_max_record_bytes_is_accepted_with_no_more_room_than_it_needs() {
        let first = MAX_RECORD - 10;
        let bytes = [
            &header(first as u32, false)[..],
            &vec![7u8; first],
            &header(10, true),
            &[8u8; 10],
        ]
        .concat();
        let (mut r, _keep) = connection(bytes, true);
        let rec = r.next().await.unwrap().unwrap();
        assert_eq!(rec.len(), MAX_RECORD);
        assert_eq!(&rec[first..], &[8u8; 10]);
        assert!(rec.capacity() <= MAX_RECORD + FIRST_ROOM, "capacity {}", rec.capacity());
        let (mut r, _keep) = connection([&header(8300, true)[..], &[1u8; 8300]].concat(), true);
        assert_eq!(
            r.next().await.unwrap().unwrap().capacity(),
            8300,
            "a WRITE of 8 KiB: room once"
        );
    }

    #[tokio::test]
    async fn a_record_over_max_record_is_refused_across_fragments() {
        let first = MAX_RECORD - 10;
        let bytes = [
            &header(first as u32, false)[..],
            &vec![7u8; first],
            &header(11, true),
            &[8u8; 11],
        ]
        .concat();
        let (mut r, _keep) = connection(bytes, true);
        let refused_before = REFUSED_RECORDS.load(Ordering::Relaxed);
        let e = r.next().await.unwrap_err();
        assert!(e.to_string().contains("at most"), "{e}");
        assert_eq!(r.record.len(), first, "the refused fragment's bytes were not read");
        assert!(REFUSED_RECORDS.load(Ordering::Relaxed) > refused_before);
    }

    #[tokio::test]
    async fn a_header_announcing_2_gib_is_refused_without_allocating_or_waiting() {
        // The client announces (2^31 - 1) bytes and sends none; the connection stays open, so a
        // reader that waited for the data would never return.
        let (mut r, _keep) = connection(header((1 << 31) - 1, true).to_vec(), false);
        let res = tokio::time::timeout(Duration::from_secs(10), r.next())
            .await
            .expect("refused at once, not waiting for 2 GiB");
        assert!(res.is_err());
        assert_eq!(r.record.capacity(), 0, "nothing reserved for the announced length");
    }

    #[tokio::test]
    async fn a_fragment_cut_short_is_an_error_holding_only_what_arrived() {
        let (mut r, _keep) = connection([&header(100_000, true)[..], &[1u8; 10]].concat(), true);
        let e = r.next().await.unwrap_err();
        assert!(e.to_string().contains("inside a fragment"), "{e}");
        assert_eq!(r.record.len(), 10);
        assert!(r.record.capacity() <= FIRST_ROOM, "capacity {}", r.record.capacity());
        let (mut r, _keep) = connection(header(5, true)[..2].to_vec(), true);
        let e = r.next().await.unwrap_err();
        assert!(e.to_string().contains("inside a record"), "{e}");
    }

    #[tokio::test]
    async fn a_reply_is_one_last_fragment_with_its_tail() {
        let mut out: Vec<u8> = Vec::new();
        write_fragment(&mut out, b"head", b"").await.unwrap();
        assert_eq!(out, [&header(4, true)[..], b"head"].concat());

        let mut out: Vec<u8> = Vec::new();
        write_fragment(&mut out, b"head", b"tail bytes").await.unwrap();
        assert_eq!(out, [&header(14, true)[..], b"head", b"tail bytes"].concat());

        let mut out: Vec<u8> = Vec::new();
        write_fragment(&mut out, b"", b"").await.unwrap();
        assert_eq!(out, header(0, true));
    }
}
