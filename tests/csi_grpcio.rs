//! Clients other than Go's and tonic's on the CSI socket: the CSI spec has COs connect over the
//! Unix socket, whatever their gRPC implementation. gRPC's C core (Python's grpcio here, with
//! its default options) sends the socket's percent-encoded path as `:authority`, which h2
//! refused (`INTERNAL: Stream removed`, RST_STREAM PROTOCOL_ERROR) until src/csi/authority.rs.
//! Then the same over raw HTTP/2, with the header block forms a client may use for
//! `:authority` (Huffman-coded, from the dynamic table, split by CONTINUATION, padded, empty).
//!
//! Runs the real binary in controller mode (no S3 needed for these calls). Needs python3 with
//! grpcio: `.ci/run` installs it.

use std::collections::HashMap;
use std::io::{Read, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

const PLUGIN_NAME: &str = "csi.s3nfs.io";

/// The plugin binary in controller mode on a socket in a temporary directory.
struct Plugin {
    child: Child,
    socket: PathBuf,
    log: PathBuf,
    _dir: tempfile::TempDir,
}

impl Plugin {
    fn start() -> Plugin {
        let dir = tempfile::tempdir().unwrap();
        let socket = dir.path().join("csi.sock");
        let log = dir.path().join("plugin.log");
        let out = std::fs::File::create(&log).unwrap();
        let child = Command::new(env!("CARGO_BIN_EXE_s3nfs"))
            .args(["csi", "--mode", "controller", "--endpoint"])
            .arg(format!("unix://{}", socket.display()))
            .env("RUST_LOG", "info,s3nfs::csi=debug")
            .stdout(out.try_clone().unwrap())
            .stderr(out)
            .spawn()
            .unwrap();
        let mut p = Plugin {
            child,
            socket,
            log,
            _dir: dir,
        };
        // Ready once the socket takes connections.
        let start = Instant::now();
        while UnixStream::connect(&p.socket).is_err() {
            if let Some(status) = p.child.try_wait().unwrap() {
                panic!("the plugin exited ({status}):\n{}", p.log());
            }
            assert!(
                start.elapsed() < Duration::from_secs(60),
                "no socket after 60 s:\n{}",
                p.log()
            );
            std::thread::sleep(Duration::from_millis(20));
        }
        p
    }

    fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }
}

impl Drop for Plugin {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// python3 with grpcio, or a failure that says how to get it (never a silent skip).
fn python_with_grpcio() -> &'static str {
    let out = Command::new("python3")
        .args(["-c", "import grpc; print(grpc.__version__)"])
        .output();
    match out {
        Ok(o) if o.status.success() => "python3",
        Ok(o) => panic!(
            "python3 has no grpcio ({}): run .ci/run, which installs it (pip install grpcio==1.85.3)",
            String::from_utf8_lossy(&o.stderr).lines().last().unwrap_or("")
        ),
        Err(e) => panic!("no python3 ({e}): run .ci/run, which installs python3's grpcio"),
    }
}

#[test]
fn python_grpcio_with_default_options_gets_answers() {
    let python = python_with_grpcio();
    let plugin = Plugin::start();
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/csi_grpcio/client.py");
    let out = Command::new(python)
        .arg(&script)
        .arg(&plugin.socket)
        .stderr(Stdio::inherit())
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(
        out.status.success(),
        "client.py failed ({}):\n{text}\n{}",
        out.status,
        plugin.log()
    );
    let answers: HashMap<&str, (&str, &str)> = text
        .lines()
        .filter_map(|l| {
            let mut it = l.splitn(3, ' ');
            Some((it.next()?, (it.next()?, it.next().unwrap_or(""))))
        })
        .collect();
    let answer = |m: &str| {
        *answers
            .get(m)
            .unwrap_or_else(|| panic!("no answer for {m}:\n{text}\n{}", plugin.log()))
    };

    let (code, reply) = answer("/csi.v1.Identity/GetPluginInfo");
    assert_eq!(code, "OK", "GetPluginInfo: {reply}\n{}", plugin.log());
    let name_hex: String = PLUGIN_NAME.bytes().map(|b| format!("{b:02x}")).collect();
    assert!(
        reply.contains(&name_hex),
        "GetPluginInfo's reply lacks {PLUGIN_NAME}: {reply}"
    );

    let (code, reply) = answer("/csi.v1.Identity/Probe");
    assert_eq!(code, "OK", "Probe: {reply}");

    let (code, detail) = answer("/csi.v1.Controller/CreateVolume");
    assert_eq!(code, "INVALID_ARGUMENT", "CreateVolume without a name: {detail}");
    assert!(detail.contains("name"), "CreateVolume's message: {detail}");
}

// Raw HTTP/2 (RFC 9113) and HPACK (RFC 7541).

const PREFACE: &[u8] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";
const DATA: u8 = 0x0;
const HEADERS: u8 = 0x1;
const RST_STREAM: u8 = 0x3;
const SETTINGS: u8 = 0x4;
const PING: u8 = 0x6;
const GOAWAY: u8 = 0x7;
const CONTINUATION: u8 = 0x9;
const END_STREAM: u8 = 0x1;
const ACK: u8 = 0x1;
const END_HEADERS: u8 = 0x4;
const PADDED: u8 = 0x8;
const PRIORITY: u8 = 0x20;

fn frame(kind: u8, flags: u8, stream: u32, payload: &[u8]) -> Vec<u8> {
    let len = payload.len();
    let mut f = vec![(len >> 16) as u8, (len >> 8) as u8, len as u8, kind, flags];
    f.extend_from_slice(&stream.to_be_bytes());
    f.extend_from_slice(payload);
    f
}

/// A raw (not Huffman-coded) string literal, shorter than 127 bytes.
fn lit(s: &str) -> Vec<u8> {
    assert!(s.len() < 127);
    [&[s.len() as u8][..], s.as_bytes()].concat()
}

/// A GetPluginInfo request's header block around `authority` (some HPACK representations of
/// `:authority`, or none). The other fields leave the dynamic table alone.
fn request(authority: &[u8]) -> Vec<u8> {
    let mut b = vec![0x83, 0x86]; // :method POST, :scheme http (static table)
    b.push(0x04); // :path (static name 4), without indexing
    b.extend(lit("/csi.v1.Identity/GetPluginInfo"));
    b.extend(authority);
    b.extend([0x0f, 0x10]); // content-type (static name 31), without indexing
    b.extend(lit("application/grpc"));
    b.push(0x00); // te, new name, without indexing
    b.extend(lit("te"));
    b.extend(lit("trailers"));
    b
}

/// The Huffman code (RFC 7541 appendix B) of "var%2Frun%2Fcsi.sock", as an HPACK string.
fn huffman_var_run() -> Vec<u8> {
    let code = [
        0xee, 0x3b, 0x15, 0x16, 0x1b, 0x2d, 0xa9, 0x51, 0x61, 0x22, 0x0c, 0xba, 0x0e, 0x4e, 0xbf,
    ];
    [&[0x80 | code.len() as u8][..], &code].concat()
}

#[derive(Debug, Default)]
struct Answer {
    data: Vec<u8>,
    ended: bool,
    reset: Option<u32>,
}

#[test]
fn every_hpack_form_of_a_bad_authority_is_answered() {
    let plugin = Plugin::start();
    let mut s = UnixStream::connect(&plugin.socket).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(30))).unwrap();

    let c_core = "var%2Flib%2Fkubelet%2Fplugins%2Fcsi.s3nfs.io%2Fcsi.sock";
    let mut out = PREFACE.to_vec();
    out.extend(frame(SETTINGS, 0, 0, &[]));
    let mut blocks: Vec<(u32, Vec<u8>)> = vec![
        // What the C core sends: a new name, raw, added to the dynamic table (entry 62).
        (1, request(&[&[0x40][..], &lit(":authority"), &lit(c_core)].concat())),
        // That entry again.
        (3, request(&[0xbe])),
        // Its name (entry 62), a Huffman-coded value, not added.
        (5, request(&[&[0x0f, 0x2f][..], &huffman_var_run()].concat())),
        // The static table's empty :authority; and a literal empty one.
        (7, request(&[0x81])),
        (9, request(&[0x01, 0x00])),
    ];
    // Name from the static table, Huffman-coded value, added (entry 62; the first is now 63).
    let split = request(&[&[0x41][..], &huffman_var_run()].concat());
    // Both dynamic entries; and one h2 always took.
    blocks.push((13, request(&[0xbf])));
    blocks.push((15, request(&[0xbe])));
    blocks.push((17, request(&[&[0x41][..], &lit("localhost")].concat())));
    for (stream, block) in &blocks[..5] {
        out.extend(frame(HEADERS, END_HEADERS, *stream, block));
        out.extend(frame(DATA, END_STREAM, *stream, &[0; 5]));
    }
    // Stream 11: padded, with priority, the block cut in two by a CONTINUATION frame.
    let mut first = vec![3]; // pad length
    first.extend([0, 0, 0, 0, 15]); // depends on nothing, weight 16
    first.extend(&split[..20]);
    first.extend([0; 3]);
    out.extend(frame(HEADERS, PADDED | PRIORITY, 11, &first));
    out.extend(frame(CONTINUATION, END_HEADERS, 11, &split[20..]));
    out.extend(frame(DATA, END_STREAM, 11, &[0; 5]));
    for (stream, block) in &blocks[5..] {
        out.extend(frame(HEADERS, END_HEADERS, *stream, block));
        out.extend(frame(DATA, END_STREAM, *stream, &[0; 5]));
    }
    s.write_all(&out).unwrap();

    let streams: Vec<u32> = vec![1, 3, 5, 7, 9, 11, 13, 15, 17];
    let mut answers: HashMap<u32, Answer> = HashMap::new();
    let mut buf = Vec::new();
    let mut chunk = [0u8; 16384];
    while !streams.iter().all(|id| answers.get(id).is_some_and(|a| a.ended)) {
        let n = s
            .read(&mut chunk)
            .unwrap_or_else(|e| panic!("reading: {e}; so far {answers:?}\n{}", plugin.log()));
        assert!(
            n > 0,
            "the plugin closed the connection; so far {answers:?}\n{}",
            plugin.log()
        );
        buf.extend_from_slice(&chunk[..n]);
        while buf.len() >= 9 {
            let len = usize::from(buf[0]) << 16 | usize::from(buf[1]) << 8 | usize::from(buf[2]);
            if buf.len() < 9 + len {
                break;
            }
            let (kind, flags) = (buf[3], buf[4]);
            let stream = u32::from_be_bytes([buf[5], buf[6], buf[7], buf[8]]) & 0x7fff_ffff;
            let payload = buf[9..9 + len].to_vec();
            buf.drain(..9 + len);
            let a = answers.entry(stream).or_default();
            match kind {
                SETTINGS if flags & ACK == 0 => s.write_all(&frame(SETTINGS, ACK, 0, &[])).unwrap(),
                PING if flags & ACK == 0 => s.write_all(&frame(PING, ACK, 0, &payload)).unwrap(),
                GOAWAY => panic!("GOAWAY {payload:02x?}; so far {answers:?}\n{}", plugin.log()),
                RST_STREAM => {
                    a.reset = Some(u32::from_be_bytes(payload[..4].try_into().unwrap()));
                    a.ended = true;
                }
                DATA => {
                    a.data.extend(&payload);
                    a.ended |= flags & END_STREAM != 0;
                }
                HEADERS => a.ended |= flags & END_STREAM != 0,
                _ => {}
            }
        }
    }
    for id in streams {
        let a = &answers[&id];
        assert_eq!(
            a.reset,
            None,
            "stream {id} was reset (1: PROTOCOL_ERROR)\n{}",
            plugin.log()
        );
        let reply = String::from_utf8_lossy(&a.data);
        assert!(reply.contains(PLUGIN_NAME), "stream {id}: no plugin name in {reply:?}");
    }
}
