//! Any `:authority` is accepted on the CSI socket.
//!
//! # Why
//! h2 (under hyper and tonic) resets a stream with PROTOCOL_ERROR when its `:authority` does
//! not parse as an [`http::uri::Authority`], and nothing in h2, hyper or tonic turns that check
//! off. gRPC's C core (Python's and Ruby's grpcio, PHP, C++), given a `unix:///path` target,
//! sends the socket's path, percent-encoded and without its leading slash:
//! `var%2Flib%2Fkubelet%2Fplugins%2Fcsi.s3nfs.io%2Fcsi.sock`. `%` outside the userinfo is not
//! an authority, so every call failed with `INTERNAL: Stream removed (RST_STREAM ... error
//! code 1)`. The name means nothing on a Unix socket (no host, no virtual hosting: the
//! services never read it), so it is made acceptable before h2 reads it.
//!
//! # How
//! [`AnyAuthority`] sits between each accepted connection and h2, on the read side only. It
//! follows the client's HTTP/2 frames and keeps the HPACK dynamic table's bookkeeping in step
//! with h2's decoder (each entry's name length, whether the name is `:authority`, its size). In
//! a header block whose `:authority` h2 would refuse, the value's bytes that are not letters,
//! digits, `-`, `.`, `_` or `~` become `_` (the C core's value above becomes
//! `var_2Flib_2F..._2Fcsi.sock`): the length is kept, so an entry the client adds to the
//! dynamic table has the same size on both ends (name + value + 32) and both tables evict in
//! step. A Huffman-coded value is written back as a plain literal of the same decoded length.
//! An empty `:authority` (no same-length fix) is dropped where that leaves the table alone;
//! h2 takes a request without one. The rewritten block goes out as a HEADERS frame (padding
//! dropped, priority kept) and CONTINUATION frames if it needs more than one.
//!
//! Everything else goes through byte for byte: frames other than HEADERS and CONTINUATION,
//! and header blocks whose `:authority` h2 accepts (Go's and tonic's clients send `localhost`
//! or the like). What this cannot follow (not HTTP/2, bad HPACK, frames interleaved in a
//! header block, a HEADERS frame larger than h2 takes, a header block over [`MAX_BLOCK`]) is
//! handed to h2 unchanged and the connection is followed no further: h2 answers it as it
//! would without this.

use std::borrow::Cow;
use std::collections::VecDeque;
use std::io;
use std::pin::Pin;
use std::task::{ready, Context, Poll};

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tonic::transport::server::Connected;

/// The largest frame h2 takes: its SETTINGS_MAX_FRAME_SIZE, which server.rs sets to this (the
/// protocol's smallest, h2's default). Rewritten blocks are cut into frames of at most this.
pub const MAX_FRAME: usize = 16_384;

/// The largest header block (all its frames) held to be rewritten. h2 takes 16 KiB of decoded
/// header list (hyper's default), far below.
pub const MAX_BLOCK: usize = 1 << 20;

const PREFACE: &[u8] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";
const HEADERS: u8 = 0x1;
const CONTINUATION: u8 = 0x9;
const END_STREAM: u8 = 0x1;
const END_HEADERS: u8 = 0x4;
const PADDED: u8 = 0x8;
const PRIORITY: u8 = 0x20;

/// A connection whose HTTP/2 header blocks reach h2 with an `:authority` it accepts.
pub struct AnyAuthority<S> {
    io: S,
    rewriter: Rewriter,
    /// Bytes for h2, from `ready[taken..]`.
    ready: Vec<u8>,
    taken: usize,
    eof: bool,
}

impl<S> AnyAuthority<S> {
    pub fn new(io: S) -> Self {
        AnyAuthority {
            io,
            rewriter: Rewriter::default(),
            ready: Vec::new(),
            taken: 0,
            eof: false,
        }
    }
}

impl<S: AsyncRead + Unpin> AsyncRead for AnyAuthority<S> {
    fn poll_read(self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        loop {
            if this.taken < this.ready.len() {
                let n = buf.remaining().min(this.ready.len() - this.taken);
                buf.put_slice(&this.ready[this.taken..this.taken + n]);
                this.taken += n;
                if this.taken == this.ready.len() {
                    this.ready.clear();
                    this.taken = 0;
                }
                return Poll::Ready(Ok(()));
            }
            if this.eof {
                return Poll::Ready(Ok(()));
            }
            let mut chunk = [0u8; 8192];
            let mut read = ReadBuf::new(&mut chunk);
            ready!(Pin::new(&mut this.io).poll_read(cx, &mut read))?;
            if read.filled().is_empty() {
                this.eof = true;
                this.rewriter.finish(&mut this.ready);
            } else {
                this.rewriter.feed(read.filled(), &mut this.ready);
            }
        }
    }
}

impl<S: AsyncWrite + Unpin> AsyncWrite for AnyAuthority<S> {
    fn poll_write(self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &[u8]) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.get_mut().io).poll_write(cx, buf)
    }
    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.get_mut().io).poll_write_vectored(cx, bufs)
    }
    fn is_write_vectored(&self) -> bool {
        self.io.is_write_vectored()
    }
    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().io).poll_flush(cx)
    }
    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().io).poll_shutdown(cx)
    }
}

impl<S: Connected> Connected for AnyAuthority<S> {
    type ConnectInfo = S::ConnectInfo;
    fn connect_info(&self) -> Self::ConnectInfo {
        self.io.connect_info()
    }
}

#[derive(Default, Debug, Clone, Copy, PartialEq, Eq)]
enum Stage {
    #[default]
    Preface,
    Frames,
    /// Not followed any more: everything goes to h2 as it came.
    Through,
}

/// The client-to-server byte stream's rewriting, apart from any IO.
#[derive(Default)]
pub(crate) struct Rewriter {
    stage: Stage,
    /// Received, not yet looked at (an incomplete frame header, preface or header frame).
    pending: Vec<u8>,
    /// Payload bytes of a frame being passed through that are still to come.
    skip: usize,
    block: Option<Block>,
    table: Table,
}

/// A header block being gathered: HEADERS, then CONTINUATION frames until END_HEADERS.
struct Block {
    stream: u32,
    /// END_STREAM and PRIORITY of the HEADERS frame, and its priority fields.
    flags: u8,
    priority: Vec<u8>,
    fragment: Vec<u8>,
    /// The frames as they came, sent on unchanged if nothing needs rewriting.
    frames: Vec<u8>,
}

impl Rewriter {
    /// Takes bytes from the client; appends to `out` what h2 is to read.
    pub(crate) fn feed(&mut self, input: &[u8], out: &mut Vec<u8>) {
        if self.stage == Stage::Through {
            out.extend_from_slice(input);
            return;
        }
        self.pending.extend_from_slice(input);
        let buf = std::mem::take(&mut self.pending);
        let mut at = 0;
        while at < buf.len() {
            let rest = &buf[at..];
            match self.stage {
                Stage::Through => {
                    out.extend_from_slice(rest);
                    at = buf.len();
                }
                Stage::Preface => {
                    let n = rest.len().min(PREFACE.len());
                    if rest[..n] != PREFACE[..n] {
                        self.stage = Stage::Through;
                    } else if n < PREFACE.len() {
                        break;
                    } else {
                        out.extend_from_slice(PREFACE);
                        at += n;
                        self.stage = Stage::Frames;
                    }
                }
                Stage::Frames if self.skip > 0 => {
                    let n = self.skip.min(rest.len());
                    out.extend_from_slice(&rest[..n]);
                    self.skip -= n;
                    at += n;
                }
                Stage::Frames => {
                    if rest.len() < 9 {
                        break;
                    }
                    let len = usize::from(rest[0]) << 16 | usize::from(rest[1]) << 8 | usize::from(rest[2]);
                    let kind = rest[3];
                    let stream = u32::from_be_bytes([rest[5], rest[6], rest[7], rest[8]]) & 0x7fff_ffff;
                    let header_frame = match &self.block {
                        None => kind == HEADERS,
                        Some(b) => kind == CONTINUATION && stream == b.stream,
                    };
                    if header_frame {
                        let held = self.block.as_ref().map_or(0, |b| b.frames.len());
                        if len > MAX_FRAME || held + 9 + len > MAX_BLOCK {
                            self.give_up(out);
                        } else if rest.len() < 9 + len {
                            break;
                        } else {
                            self.gather(&rest[..9 + len], out);
                            at += 9 + len;
                        }
                    } else if self.block.is_some() {
                        // Only CONTINUATION frames of that stream may follow an unfinished
                        // header block: a connection error, h2's to answer.
                        self.give_up(out);
                    } else {
                        out.extend_from_slice(&rest[..9]);
                        self.skip = len;
                        at += 9;
                    }
                }
            }
        }
        self.pending = buf[at..].to_vec();
    }

    /// The client has closed its side: whatever is held goes to h2 as it came.
    pub(crate) fn finish(&mut self, out: &mut Vec<u8>) {
        if let Some(b) = self.block.take() {
            out.extend_from_slice(&b.frames);
        }
        out.append(&mut self.pending);
        self.stage = Stage::Through;
    }

    /// Hands what is held to h2 unchanged and follows the connection no further.
    fn give_up(&mut self, out: &mut Vec<u8>) {
        if self.stage == Stage::Frames {
            tracing::debug!("CSI socket: a client's HTTP/2 not followed further, h2 reads it as it is");
        }
        if let Some(b) = self.block.take() {
            out.extend_from_slice(&b.frames);
        }
        self.stage = Stage::Through;
    }

    /// One whole HEADERS or CONTINUATION frame.
    fn gather(&mut self, frame: &[u8], out: &mut Vec<u8>) {
        let flags = frame[4];
        let payload = &frame[9..];
        let block = self.block.get_or_insert_with(|| Block {
            stream: u32::from_be_bytes([frame[5], frame[6], frame[7], frame[8]]) & 0x7fff_ffff,
            flags: 0,
            priority: Vec::new(),
            fragment: Vec::new(),
            frames: Vec::new(),
        });
        block.frames.extend_from_slice(frame);
        let fragment = if frame[3] == HEADERS {
            block.flags = flags & (END_STREAM | PRIORITY);
            let (pad, body) = match flags & PADDED != 0 {
                true => match payload.split_first() {
                    Some((&pad, body)) => (usize::from(pad), body),
                    None => return self.give_up(out),
                },
                false => (0, payload),
            };
            let prio = if flags & PRIORITY != 0 { 5 } else { 0 };
            if prio + pad > body.len() {
                return self.give_up(out);
            }
            block.priority = body[..prio].to_vec();
            &body[prio..body.len() - pad]
        } else {
            payload
        };
        block.fragment.extend_from_slice(fragment);
        if flags & END_HEADERS == 0 {
            return;
        }
        let Some(block) = self.block.take() else { return };
        match self.table.rewrite(&block.fragment) {
            Ok(None) => out.extend_from_slice(&block.frames),
            Ok(Some(fragment)) => {
                tracing::debug!(stream = block.stream, "CSI socket: :authority rewritten for h2");
                write_frames(&block, &fragment, out);
            }
            Err(Malformed) => {
                out.extend_from_slice(&block.frames);
                self.stage = Stage::Through;
            }
        }
    }
}

/// The block's new fragment as HEADERS and CONTINUATION frames of at most [`MAX_FRAME`].
fn write_frames(block: &Block, fragment: &[u8], out: &mut Vec<u8>) {
    let mut rest = fragment;
    let mut first = true;
    loop {
        let room = MAX_FRAME - if first { block.priority.len() } else { 0 };
        let (chunk, next) = rest.split_at(rest.len().min(room));
        let (kind, mut flags, prio) = match first {
            true => (HEADERS, block.flags, &block.priority[..]),
            false => (CONTINUATION, 0, &[][..]),
        };
        if next.is_empty() {
            flags |= END_HEADERS;
        }
        let len = prio.len() + chunk.len();
        out.extend_from_slice(&[(len >> 16) as u8, (len >> 8) as u8, len as u8, kind, flags]);
        out.extend_from_slice(&block.stream.to_be_bytes());
        out.extend_from_slice(prio);
        out.extend_from_slice(chunk);
        if next.is_empty() {
            return;
        }
        rest = next;
        first = false;
    }
}

/// Not HPACK h2 would decode: h2 is to answer it.
#[derive(Debug, PartialEq, Eq)]
pub(crate) struct Malformed;

/// What the HPACK dynamic table holds, as far as `:authority` is concerned, in step with h2's
/// decoder: the same insertions, size updates and evictions (RFC 7541 section 4).
struct Table {
    /// Newest first: index 62 is `entries[0]`.
    entries: VecDeque<Entry>,
    size: usize,
    max: usize,
}

#[derive(Clone, Copy)]
struct Entry {
    name_len: usize,
    authority: bool,
    empty: bool,
    size: usize,
}

impl Default for Table {
    fn default() -> Self {
        // SETTINGS_HEADER_TABLE_SIZE's initial value; h2's decoder starts there and the server
        // announces no other.
        Table {
            entries: VecDeque::new(),
            size: 0,
            max: 4096,
        }
    }
}

impl Table {
    fn get(&self, index: usize) -> Result<Entry, Malformed> {
        match index {
            0 => Err(Malformed),
            1..=61 => Ok(Entry {
                name_len: STATIC_NAMES[index - 1].len(),
                authority: index == 1,
                empty: index == 1,
                size: 0,
            }),
            _ => self.entries.get(index - 62).copied().ok_or(Malformed),
        }
    }

    fn insert(&mut self, name_len: usize, authority: bool, value_len: usize) {
        let size = name_len + value_len + 32;
        while self.size + size > self.max {
            match self.entries.pop_back() {
                Some(e) => self.size -= e.size,
                None => break,
            }
        }
        if size <= self.max {
            self.size += size;
            self.entries.push_front(Entry {
                name_len,
                authority,
                empty: value_len == 0,
                size,
            });
        }
    }

    fn resize(&mut self, max: usize) {
        self.max = max;
        while self.size > self.max {
            match self.entries.pop_back() {
                Some(e) => self.size -= e.size,
                None => break,
            }
        }
    }

    /// Follows one header block; the block to send instead if its `:authority` needs fixing.
    fn rewrite(&mut self, block: &[u8]) -> Result<Option<Vec<u8>>, Malformed> {
        let mut out = Vec::with_capacity(block.len());
        let mut changed = false;
        let mut pos = 0;
        while pos < block.len() {
            let start = pos;
            let first = block[pos];
            if first & 0x80 != 0 {
                // Indexed field: the table is left alone.
                let e = self.get(integer(block, &mut pos, 7)?)?;
                if e.authority && e.empty {
                    changed = true;
                    continue;
                }
            } else if first & 0xe0 == 0x20 {
                let max = integer(block, &mut pos, 5)?;
                self.resize(max);
            } else {
                // A literal: with incremental indexing (01), without (0000) or never (0001).
                let indexing = first & 0x40 != 0;
                let index = integer(block, &mut pos, if indexing { 6 } else { 4 })?;
                let (name_len, authority) = match index {
                    0 => {
                        let name = string(block, &mut pos)?;
                        (name.len(), &name[..] == b":authority")
                    }
                    i => {
                        let e = self.get(i)?;
                        (e.name_len, e.authority)
                    }
                };
                let value_at = pos;
                let value = string(block, &mut pos)?;
                if indexing {
                    self.insert(name_len, authority, value.len());
                }
                if authority && tonic::codegen::http::uri::Authority::try_from(&value[..]).is_err() {
                    if !value.is_empty() {
                        out.extend_from_slice(&block[start..value_at]);
                        let fixed: Vec<u8> = value
                            .iter()
                            .map(|&b| match b {
                                b'a'..=b'z' | b'A'..=b'Z' | b'0'..=b'9' | b'-' | b'.' | b'_' | b'~' => b,
                                _ => b'_',
                            })
                            .collect();
                        put_integer(&mut out, 0, 7, fixed.len());
                        out.extend_from_slice(&fixed);
                        changed = true;
                        continue;
                    }
                    if !indexing {
                        changed = true;
                        continue;
                    }
                    // An empty one added to the table cannot be fixed at the same size: h2
                    // refuses the stream as before. No client is known to send it (the static
                    // table's entry 1 is that field).
                }
            }
            out.extend_from_slice(&block[start..pos]);
        }
        Ok(changed.then_some(out))
    }
}

/// An HPACK integer with an `n`-bit prefix (RFC 7541 section 5.1).
fn integer(buf: &[u8], pos: &mut usize, n: u8) -> Result<usize, Malformed> {
    let mask = (1usize << n) - 1;
    let mut value = usize::from(*buf.get(*pos).ok_or(Malformed)?) & mask;
    *pos += 1;
    if value < mask {
        return Ok(value);
    }
    let mut shift = 0;
    loop {
        let b = *buf.get(*pos).ok_or(Malformed)?;
        *pos += 1;
        // h2 takes at most 5 bytes after the prefix; a header block never needs more.
        if shift > 28 {
            return Err(Malformed);
        }
        value += usize::from(b & 0x7f) << shift;
        shift += 7;
        if b & 0x80 == 0 {
            return Ok(value);
        }
    }
}

fn put_integer(out: &mut Vec<u8>, flags: u8, n: u8, value: usize) {
    let mask = (1usize << n) - 1;
    if value < mask {
        out.push(flags | value as u8);
        return;
    }
    out.push(flags | mask as u8);
    let mut rest = value - mask;
    while rest >= 0x80 {
        out.push((rest & 0x7f) as u8 | 0x80);
        rest >>= 7;
    }
    out.push(rest as u8);
}

/// An HPACK string literal, decoded (RFC 7541 section 5.2).
fn string<'a>(buf: &'a [u8], pos: &mut usize) -> Result<Cow<'a, [u8]>, Malformed> {
    let huffman = *buf.get(*pos).ok_or(Malformed)? & 0x80 != 0;
    let len = integer(buf, pos, 7)?;
    let raw = buf.get(*pos..pos.checked_add(len).ok_or(Malformed)?).ok_or(Malformed)?;
    *pos += len;
    match huffman {
        true => huffman_decode(raw).map(Cow::Owned),
        false => Ok(Cow::Borrowed(raw)),
    }
}

/// The static table's names (RFC 7541 appendix A): their lengths count in entry sizes.
#[rustfmt::skip]
const STATIC_NAMES: [&str; 61] = [
    ":authority", ":method", ":method", ":path", ":path", ":scheme", ":scheme", ":status", ":status",
    ":status", ":status", ":status", ":status", ":status", "accept-charset", "accept-encoding",
    "accept-language", "accept-ranges", "accept", "access-control-allow-origin", "age", "allow",
    "authorization", "cache-control", "content-disposition", "content-encoding", "content-language",
    "content-length", "content-location", "content-range", "content-type", "cookie", "date", "etag",
    "expect", "expires", "from", "host", "if-match", "if-modified-since", "if-none-match", "if-range",
    "if-unmodified-since", "last-modified", "link", "location", "max-forwards", "proxy-authenticate",
    "proxy-authorization", "range", "referer", "refresh", "retry-after", "server", "set-cookie",
    "strict-transport-security", "transfer-encoding", "user-agent", "vary", "via", "www-authenticate",
];

/// The Huffman code's lengths in bits, symbols 0 to 256 (EOS) (RFC 7541 appendix B). The code
/// is canonical: codes of one length are consecutive, in symbol order, so lengths suffice.
#[rustfmt::skip]
const CODE_LENGTHS: [u8; 257] = [
    13, 23, 28, 28, 28, 28, 28, 28, 28, 24, 30, 28, 28, 30, 28, 28, 28, 28, 28, 28, 28, 28, 30, 28,
    28, 28, 28, 28, 28, 28, 28, 28, 6, 10, 10, 12, 13, 6, 8, 11, 10, 10, 8, 11, 8, 6, 6, 6, 5, 5, 5,
    6, 6, 6, 6, 6, 6, 6, 7, 8, 15, 6, 12, 10, 13, 6, 7, 7, 7, 7, 7, 7, 7, 7, 7, 7, 7, 7, 7, 7, 7, 7,
    7, 7, 7, 7, 7, 7, 8, 7, 8, 13, 19, 13, 14, 6, 15, 5, 6, 5, 6, 5, 6, 6, 6, 5, 7, 7, 6, 6, 6, 5,
    6, 7, 6, 5, 5, 6, 7, 7, 7, 7, 7, 15, 11, 14, 13, 28, 20, 22, 20, 20, 22, 22, 22, 23, 22, 23, 23,
    23, 23, 23, 24, 23, 24, 24, 22, 23, 24, 23, 23, 23, 23, 21, 22, 23, 22, 23, 23, 24, 22, 21, 20,
    22, 22, 23, 23, 21, 23, 22, 22, 24, 21, 22, 23, 23, 21, 21, 22, 21, 23, 22, 23, 23, 20, 22, 22,
    22, 23, 22, 22, 23, 26, 26, 20, 19, 22, 23, 22, 25, 26, 26, 26, 27, 27, 26, 24, 25, 19, 21, 26,
    27, 27, 26, 27, 24, 21, 21, 26, 26, 28, 27, 27, 27, 20, 24, 20, 21, 22, 21, 21, 23, 22, 22, 25,
    25, 24, 24, 26, 23, 26, 27, 26, 26, 27, 27, 27, 27, 27, 28, 27, 27, 27, 27, 27, 26, 30,
];

/// Decodes a Huffman-coded string: canonical decoding, a bit at a time (header blocks are
/// small). Refuses EOS inside, and padding longer than 7 bits or not all ones, as h2 does.
fn huffman_decode(src: &[u8]) -> Result<Vec<u8>, Malformed> {
    let code_book = huffman_code_book();
    let mut out = Vec::with_capacity(src.len() * 8 / 5);
    let (mut code, mut len, mut ones) = (0u32, 0usize, true);
    for byte in src {
        for bit in (0..8).rev() {
            let b = u32::from(byte >> bit & 1);
            code = code << 1 | b;
            ones &= b == 1;
            len += 1;
            let offset = code.wrapping_sub(code_book.first[len]);
            if offset < code_book.count[len] {
                match code_book.symbols[code_book.start[len] + offset as usize] {
                    256 => return Err(Malformed),
                    s => out.push(s as u8),
                }
                (code, len, ones) = (0, 0, true);
            } else if len == 30 {
                return Err(Malformed);
            }
        }
    }
    match len <= 7 && ones {
        true => Ok(out),
        false => Err(Malformed),
    }
}

/// The canonical code per length: its first code, how many codes, where its symbols start in
/// `symbols` (sorted by length, then symbol).
struct CodeBook {
    symbols: Vec<u16>,
    first: [u32; 31],
    count: [u32; 31],
    start: [usize; 31],
}

fn huffman_code_book() -> &'static CodeBook {
    static BOOK: std::sync::OnceLock<CodeBook> = std::sync::OnceLock::new();
    BOOK.get_or_init(|| {
        let mut symbols: Vec<u16> = (0..257).collect();
        symbols.sort_by_key(|&s| (CODE_LENGTHS[usize::from(s)], s));
        let mut book = CodeBook {
            symbols,
            first: [0; 31],
            count: [0; 31],
            start: [0; 31],
        };
        for &len in &CODE_LENGTHS {
            book.count[usize::from(len)] += 1;
        }
        let (mut code, mut index) = (0u32, 0usize);
        for len in 1..31 {
            book.first[len] = code;
            book.start[len] = index;
            code = (code + book.count[len]) << 1;
            index += book.count[len] as usize;
        }
        book
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn hex(s: &str) -> Vec<u8> {
        (0..s.len())
            .step_by(2)
            .map(|i| u8::from_str_radix(&s[i..i + 2], 16).unwrap())
            .collect()
    }

    #[test]
    fn huffman_decodes_the_rfc_examples_and_refuses_bad_padding() {
        // RFC 7541 C.4.1 and C.4.2.
        assert_eq!(
            huffman_decode(&hex("f1e3c2e5f23a6ba0ab90f4ff")).unwrap(),
            b"www.example.com"
        );
        assert_eq!(huffman_decode(&hex("a8eb10649cbf")).unwrap(), b"no-cache");
        assert_eq!(huffman_decode(&hex("b83b5339ec327d7f")).unwrap(), b":authority");
        // "a" is 00011: padded with zeros, or a whole byte of padding, is refused.
        assert_eq!(huffman_decode(&[0b0001_1000]), Err(Malformed));
        assert_eq!(huffman_decode(&[0b0001_1111, 0xff]), Err(Malformed));
        assert_eq!(huffman_decode(&[0b0001_1111]).unwrap(), b"a");
        // EOS (30 ones) inside a string.
        assert_eq!(huffman_decode(&[0xff, 0xff, 0xff, 0xff]), Err(Malformed));
    }

    fn frame(kind: u8, flags: u8, stream: u32, payload: &[u8]) -> Vec<u8> {
        let len = payload.len();
        let mut f = vec![(len >> 16) as u8, (len >> 8) as u8, len as u8, kind, flags];
        f.extend_from_slice(&stream.to_be_bytes());
        f.extend_from_slice(payload);
        f
    }

    fn run(input: &[u8], step: usize) -> Vec<u8> {
        let mut r = Rewriter::default();
        let mut out = Vec::new();
        for chunk in input.chunks(step) {
            r.feed(chunk, &mut out);
        }
        r.finish(&mut out);
        out
    }

    /// The header block grpcio 1.85.3 (C core 58) sent for `unix:///tmp/authcap/csi.sock`.
    const GRPCIO: &str = "40053a706174681e2f6373692e76312e4964656e746974792f476574506c7567696e496e666f\
        400a3a617574686f7269747918746d70253246617574686361702532466373692e736f636b8386";

    #[test]
    fn the_c_cores_authority_is_rewritten_at_the_same_length_and_stays_in_the_table() {
        let block = hex(GRPCIO);
        let mut input = PREFACE.to_vec();
        input.extend(frame(4, 0, 0, &[]));
        input.extend(frame(HEADERS, END_HEADERS, 1, &block));
        // The next call refers to the entry (62: the :authority one, added last).
        input.extend(frame(HEADERS, END_HEADERS | END_STREAM, 3, &[0xbe, 0x83]));
        for step in [1, 7, input.len()] {
            let out = run(&input, step);
            let want = String::from_utf8_lossy(&block).replace("tmp%2Fauthcap%2Fcsi.sock", "tmp_2Fauthcap_2Fcsi.sock");
            assert_eq!(out.len(), input.len());
            assert!(String::from_utf8_lossy(&out).contains(&want));
            assert!(out.ends_with(&frame(HEADERS, END_HEADERS | END_STREAM, 3, &[0xbe, 0x83])));
        }
    }

    #[test]
    fn valid_authorities_and_other_frames_pass_byte_for_byte() {
        let mut input = PREFACE.to_vec();
        input.extend(frame(4, 0, 0, &[0, 3, 0, 0, 0, 100]));
        // :authority localhost (name index 1, incremental indexing), :method POST.
        input.extend(frame(
            HEADERS,
            END_HEADERS,
            1,
            &[&[0x41, 9][..], b"localhost", &[0x83]].concat(),
        ));
        input.extend(frame(0, END_STREAM, 1, &[0, 0, 0, 0, 0]));
        assert_eq!(run(&input, 3), input);
        // Not HTTP/2 at all.
        assert_eq!(run(b"GET / HTTP/1.1\r\n\r\n", 2), b"GET / HTTP/1.1\r\n\r\n");
    }

    #[test]
    fn huffman_continuation_padding_and_empty_authorities() {
        // Padded HEADERS with priority, the block split into a CONTINUATION: `:authority`
        // by name index 1, with incremental indexing, Huffman "var%2Frun%2Fcsi.sock".
        let value = hex("ee3b15161b2da95161220cba0e4ebf");
        let block = [&[0x83, 0x41, 0x80 | value.len() as u8][..], &value].concat();
        let mut headers = vec![2u8]; // pad length
        headers.extend([0, 0, 0, 0, 15]); // priority
        headers.extend(&block[..4]);
        headers.extend([0, 0]);
        let mut input = PREFACE.to_vec();
        input.extend(frame(HEADERS, PADDED | PRIORITY | END_STREAM, 1, &headers));
        input.extend(frame(CONTINUATION, END_HEADERS, 1, &block[4..]));
        // Then: the static empty :authority (dropped), the dynamic one (kept: the fixed
        // value is in h2's table), a literal empty one without indexing (dropped).
        input.extend(frame(HEADERS, END_HEADERS, 3, &[0x81, 0xbe, 0x01, 0x00, 0x83]));
        let out = run(&input, 5);

        let mut want = PREFACE.to_vec();
        let fixed = [&[0x83, 0x41, 20][..], b"var_2Frun_2Fcsi.sock"].concat();
        want.extend(frame(
            HEADERS,
            PRIORITY | END_STREAM | END_HEADERS,
            1,
            &[&[0, 0, 0, 0, 15][..], &fixed].concat(),
        ));
        want.extend(frame(HEADERS, END_HEADERS, 3, &[0xbe, 0x83]));
        assert_eq!(out, want);
    }

    #[test]
    fn dynamic_table_evictions_follow_the_sizes() {
        let mut t = Table::default();
        t.resize(100);
        t.insert(10, true, 10); // 52
        t.insert(4, false, 10); // 46: 98 in all
        assert!(t.get(63).unwrap().authority);
        t.insert(4, false, 0); // 36: evicts the oldest
        assert!(t.get(64).is_err());
        assert!(!t.get(63).unwrap().authority);
        t.resize(0);
        assert!(t.get(62).is_err());
    }

    #[test]
    fn a_large_rewritten_block_is_cut_into_frames() {
        let value = "%".repeat(40_000);
        let mut block = vec![0x41];
        put_integer(&mut block, 0, 7, value.len());
        block.extend(value.as_bytes());
        let mut input = PREFACE.to_vec();
        for (i, chunk) in block.chunks(MAX_FRAME).enumerate() {
            let last = (i + 1) * MAX_FRAME >= block.len();
            let kind = if i == 0 { HEADERS } else { CONTINUATION };
            input.extend(frame(kind, if last { END_HEADERS } else { 0 }, 1, chunk));
        }
        let out = run(&input, 4096);
        assert_eq!(out.len(), input.len());
        assert!(!out.contains(&b'%'));
        assert_eq!(out[PREFACE.len() + 3], HEADERS);
        assert_eq!(out[PREFACE.len() + 9 + MAX_FRAME + 3], CONTINUATION);
    }
}
