//! OpenTelemetry and metrics, end to end: a real OTLP/gRPC receiver in this process collects
//! what the gateway (a subprocess, on Garage) exports while a client writes and reads a file
//! over NFS; the Prometheus endpoint is scraped over HTTP.

mod common;
use common::rpc::root_cred;
#[path = "common/otlp_sink.rs"]
mod otlp_sink;

use std::collections::{BTreeMap, HashMap, HashSet};
use std::io::{BufRead, BufReader};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use nfs3_client::nfs3_types::nfs3::{
    self, createhow3, diropargs3, nfs_fh3, sattr3, stable_how, CREATE3args, Nfs3Option, READ3args, WRITE3args,
};
use nfs3_client::nfs3_types::xdr_codec::Opaque;
use nfs3_client::tokio::TokioConnector;
use nfs3_client::Nfs3ConnectionBuilder;
use opentelemetry_proto::tonic::common::v1::any_value::Value;
use opentelemetry_proto::tonic::common::v1::AnyValue;
use s3nfs::store::ObjectStore;

use common::garage;

const CONTENT_MARKER: &str = "FILE-CONTENT-MARKER-7f3a9c";
const BLOCK: usize = 64 * 1024;
const WRITES: usize = 3;

struct Gateway {
    child: Child,
    port: u16,
    metrics: String,
    _state: tempfile::TempDir,
}

impl Drop for Gateway {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Where the gateway stores objects.
enum Backend<'a> {
    Garage(&'a garage::Garage, String),
    /// The embedded store, in this directory; no credentials are used, but a marker secret is
    /// given in the environment all the same.
    Embedded(tempfile::TempDir),
}

const MARKER_SECRET: &str = "MARKER-SECRET-do-not-export-0b5e2f";

fn start_gateway(backend: &Backend, protocol: &str, otlp: &str, extra: &[(&str, &str)]) -> Gateway {
    let state = tempfile::tempdir().unwrap();
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_s3nfs"));
    cmd.args(["serve", "--listen", "127.0.0.1:0"]);
    match backend {
        Backend::Garage(g, bucket) => {
            cmd.args(["--endpoint", &g.endpoint, "--bucket", bucket, "--region", &g.region])
                .env("AWS_ACCESS_KEY_ID", &g.access_key)
                .env("AWS_SECRET_ACCESS_KEY", &g.secret_key);
        }
        Backend::Embedded(dir) => {
            cmd.arg("--data-dir")
                .arg(dir.path())
                .env("AWS_ACCESS_KEY_ID", "MARKER-ACCESS-KEY")
                .env("AWS_SECRET_ACCESS_KEY", MARKER_SECRET);
        }
    }
    let mut child = cmd
        .args(["--flush-delay", "100ms", "--metrics-listen", "127.0.0.1:0"])
        .arg("--state-dir")
        .arg(state.path())
        .env("OTEL_EXPORTER_OTLP_ENDPOINT", otlp)
        .env("OTEL_EXPORTER_OTLP_PROTOCOL", protocol)
        .env("OTEL_SERVICE_NAME", "s3nfs-test")
        .env("OTEL_TRACES_SAMPLER", "always_on")
        .env("OTEL_BSP_SCHEDULE_DELAY", "100")
        .env("OTEL_METRIC_EXPORT_INTERVAL", "300")
        // Logs at warn: what is exported does not depend on RUST_LOG.
        .env("RUST_LOG", "warn")
        .envs(extra.iter().copied())
        .stdout(Stdio::piped())
        .spawn()
        .expect("start s3nfs");
    let mut out = BufReader::new(child.stdout.take().unwrap()).lines();
    let (mut port, mut metrics) = (0, String::new());
    for line in out.by_ref() {
        let line = line.unwrap();
        if let Some(rest) = line.split("metrics on http://").nth(1) {
            metrics = rest.trim_end_matches("/metrics").to_string();
        }
        if let Some(rest) = line.split("port=").nth(1) {
            port = rest.split(',').next().unwrap().parse().unwrap();
            break;
        }
    }
    // Keep draining stdout so the gateway never writes into a closed pipe.
    std::thread::spawn(move || for _ in out {});
    assert_ne!(port, 0, "gateway did not print its mount command");
    assert!(!metrics.is_empty(), "gateway did not print its metrics address");
    Gateway {
        child,
        port,
        metrics,
        _state: state,
    }
}

async fn scrape(addr: &str) -> String {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut s = tokio::net::TcpStream::connect(addr).await.unwrap();
    s.write_all(b"GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n").await.unwrap();
    let mut buf = String::new();
    s.read_to_string(&mut buf).await.unwrap();
    assert!(buf.starts_with("HTTP/1.1 200"), "{buf}");
    assert!(buf.contains("Content-Type: text/plain; version=0.0.4"));
    buf.split("\r\n\r\n").nth(1).unwrap().to_string()
}

/// `name{labels}` → value.
fn parse_prom(text: &str) -> HashMap<String, f64> {
    text.lines()
        .filter(|l| !l.starts_with('#') && !l.is_empty())
        .filter_map(|l| {
            let (k, v) = l.rsplit_once(' ')?;
            Some((k.to_string(), v.parse().ok()?))
        })
        .collect()
}

fn val(v: &Option<AnyValue>) -> String {
    match v.as_ref().and_then(|v| v.value.as_ref()) {
        Some(Value::StringValue(s)) => s.clone(),
        Some(Value::IntValue(i)) => i.to_string(),
        Some(Value::BoolValue(b)) => b.to_string(),
        Some(Value::DoubleValue(d)) => d.to_string(),
        other => format!("{other:?}"),
    }
}

#[derive(Debug, Clone)]
struct Span {
    trace: Vec<u8>,
    id: Vec<u8>,
    parent: Vec<u8>,
    name: String,
    attrs: BTreeMap<String, String>,
    links: Vec<Vec<u8>>,
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn grpc_export_on_garage() {
    let g = garage::shared();
    assert!(g.secret_key.len() >= 16, "the secret must be recognisable");
    let sink = otlp_sink::start(true).await;
    scenario(Backend::Garage(g, g.unique_bucket()), "grpc", sink).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn http_export_on_the_embedded_store() {
    let sink = otlp_sink::start_http(true).await;
    scenario(Backend::Embedded(tempfile::tempdir().unwrap()), "http/protobuf", sink).await;
}

/// Writes a file in WRITES blocks, waits for its upload, reads it back, scrapes the metrics,
/// stops the gateway and checks what `sink` received.
async fn scenario(backend: Backend<'_>, protocol: &str, sink: otlp_sink::Sink) {
    let (secret, bucket) = match &backend {
        Backend::Garage(g, b) => (g.secret_key.clone(), Some(b.clone())),
        Backend::Embedded(_) => (MARKER_SECRET.to_string(), None),
    };
    let gw = start_gateway(&backend, protocol, &sink.endpoint(), &[]);

    // Write a file in WRITES blocks, then read it back.
    let mut c = Nfs3ConnectionBuilder::new(TokioConnector, "127.0.0.1", "/")
        .mount_port(gw.port)
        .nfs3_port(gw.port)
        .connect_from_privileged_port(false)
        .credential(root_cred())
        .mount()
        .await
        .expect("NFS mount");
    let root = c.root_nfs_fh3();
    let res = c
        .create(&CREATE3args {
            where_: diropargs3 {
                dir: root.clone(),
                name: b"traced.bin".as_slice().into(),
            },
            how: createhow3::UNCHECKED(sattr3::default()),
        })
        .await
        .unwrap()
        .unwrap();
    let fh: nfs_fh3 = match res.obj {
        Nfs3Option::Some(fh) => fh,
        Nfs3Option::None => panic!("CREATE returned no handle"),
    };
    let mut content = Vec::new();
    for i in 0..WRITES {
        let mut block = CONTENT_MARKER.repeat(BLOCK / CONTENT_MARKER.len() + 1).into_bytes();
        block.truncate(BLOCK);
        block[0] = i as u8;
        content.extend_from_slice(&block);
        c.write(&WRITE3args {
            file: fh.clone(),
            offset: (i * BLOCK) as u64,
            count: BLOCK as u32,
            stable: stable_how::FILE_SYNC,
            data: Opaque::owned(block),
        })
        .await
        .unwrap()
        .unwrap();
    }
    let size = content.len() as u64;

    // Wait for the upload (the volume is clean), then read the file back.
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let m = parse_prom(&scrape(&gw.metrics).await);
        if m.get("s3nfs_volume_dirty_bytes{volume=\"default\"}") == Some(&0.0)
            && m.get("s3nfs_volume_upload_queue_depth{volume=\"default\"}") == Some(&0.0)
            && m.get("s3nfs_volume_uploaded_bytes_total{volume=\"default\"}")
                .copied()
                .unwrap_or(0.0)
                >= size as f64
        {
            break;
        }
        assert!(Instant::now() < deadline, "the file was never uploaded: {m:?}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    if let Backend::Garage(g, bucket) = &backend {
        let store = s3nfs::store::s3::S3Store::connect(g.s3_config(bucket)).await.unwrap();
        let h = store.head("traced.bin").await.unwrap().expect("the object is in S3");
        assert_eq!(h.size, size);
    }
    let mut read = Vec::new();
    while (read.len() as u64) < size {
        let r = c
            .read(&READ3args {
                file: fh.clone(),
                offset: read.len() as u64,
                count: BLOCK as u32,
            })
            .await
            .unwrap()
            .unwrap();
        assert!(!r.data.0.is_empty());
        read.extend_from_slice(&r.data.0);
    }
    assert_eq!(read, content);
    c.lookup(&nfs3::LOOKUP3args {
        what: diropargs3 {
            dir: root,
            name: b"traced.bin".as_slice().into(),
        },
    })
    .await
    .unwrap()
    .unwrap();

    // The Prometheus endpoint, against the work done.
    let m = parse_prom(&scrape(&gw.metrics).await);
    let get = |k: &str| *m.get(k).unwrap_or_else(|| panic!("metric {k} missing"));
    assert!(get("s3nfs_nfs_ops_total{op=\"WRITE\"}") >= WRITES as f64);
    assert!(get("s3nfs_nfs_ops_total{op=\"READ\"}") >= 1.0);
    assert!(get("s3nfs_nfs_ops_total{op=\"CREATE\"}") >= 1.0);
    assert_eq!(get("s3nfs_nfs_errors_total{op=\"WRITE\"}"), 0.0);
    assert_eq!(
        get("s3nfs_nfs_op_duration_seconds_count{op=\"WRITE\"}"),
        get("s3nfs_nfs_ops_total{op=\"WRITE\"}")
    );
    assert!(get("s3nfs_nfs_written_bytes_total") >= size as f64);
    assert!(get("s3nfs_nfs_read_bytes_total") >= size as f64);
    let puts = m
        .get("s3nfs_s3_requests_total{op=\"PutObject\"}")
        .copied()
        .unwrap_or(0.0)
        + m.get("s3nfs_s3_requests_total{op=\"UploadPart\"}")
            .copied()
            .unwrap_or(0.0);
    assert!(puts >= 1.0, "no upload counted");
    assert!(get("s3nfs_s3_sent_bytes_total") >= size as f64);
    assert!(get("s3nfs_volume_uploaded_bytes_total{volume=\"default\"}") >= size as f64);
    assert!(m.contains_key("s3nfs_cache_hits_total{volume=\"default\"}"));
    assert!(m.contains_key("s3nfs_cache_hit_ratio{volume=\"default\"}"));
    assert!(m.contains_key("s3nfs_volume_journal_bytes{volume=\"default\"}"));
    assert_eq!(get("s3nfs_otel_spans_dropped_total"), 0.0);

    // A periodic OTLP export while the volume is open carries its series (the last export,
    // at exit, comes after the volume has closed). Waited for, not assumed: the work above can
    // take less than one export interval.
    let deadline = Instant::now() + Duration::from_secs(20);
    while !sink.received.metric_names().contains("s3nfs.volume.dirty_bytes") {
        assert!(Instant::now() < deadline, "no OTLP export with the volume's series");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }

    // SIGTERM: uploads what is pending, flushes telemetry, exits 0.
    let mut gw = gw;
    unsafe { libc::kill(gw.child.id() as i32, libc::SIGTERM) };
    let deadline = Instant::now() + Duration::from_secs(30);
    let status = loop {
        if let Some(s) = gw.child.try_wait().unwrap() {
            break s;
        }
        assert!(Instant::now() < deadline, "gateway did not exit on SIGTERM");
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    assert!(status.success(), "{status:?}");

    // The export: flatten spans.
    let rec = &sink.received;
    let mut spans = Vec::new();
    for req in rec.traces.lock().unwrap().iter() {
        for rs in &req.resource_spans {
            let service = rs
                .resource
                .as_ref()
                .and_then(|r| r.attributes.iter().find(|a| a.key == "service.name"))
                .map(|a| val(&a.value));
            assert_eq!(service.as_deref(), Some("s3nfs-test"));
            for ss in &rs.scope_spans {
                for s in &ss.spans {
                    spans.push(Span {
                        trace: s.trace_id.clone(),
                        id: s.span_id.clone(),
                        parent: s.parent_span_id.clone(),
                        name: s.name.clone(),
                        attrs: s.attributes.iter().map(|a| (a.key.clone(), val(&a.value))).collect(),
                        links: s.links.iter().map(|l| l.span_id.clone()).collect(),
                    });
                }
            }
        }
    }
    assert!(!spans.is_empty(), "no spans exported");
    let writes: Vec<&Span> = spans
        .iter()
        .filter(|s| s.name == "nfs" && s.attrs.get("op").map(String::as_str) == Some("WRITE"))
        .collect();
    assert!(writes.len() >= WRITES, "WRITE spans: {}", writes.len());
    for w in &writes {
        for k in ["ino", "offset", "count", "bytes", "volume", "status"] {
            assert!(w.attrs.contains_key(k), "WRITE span without {k}: {w:?}");
        }
        assert_eq!(w.attrs["status"], "NFS3_OK");
        assert_eq!(w.attrs["volume"], "default");
        assert_eq!(w.attrs["bytes"], BLOCK.to_string());
    }
    assert!(spans
        .iter()
        .any(|s| s.name == "nfs" && s.attrs.get("op").map(String::as_str) == Some("READ")));

    // The upload that carried the bytes: an S3 PutObject/UploadPart of the key, whose own links
    // or ancestors' links lead to the WRITE spans (uploads run after the flush delay, in their
    // own trace, linked to the operations that caused them).
    let by_id: HashMap<(&[u8], &[u8]), &Span> = spans
        .iter()
        .map(|s| ((s.trace.as_slice(), s.id.as_slice()), s))
        .collect();
    let write_ids: HashSet<&[u8]> = writes.iter().map(|w| w.id.as_slice()).collect();
    let uploads: Vec<&Span> = spans
        .iter()
        .filter(|s| {
            s.name == "s3.request"
                && matches!(s.attrs.get("op").map(String::as_str), Some("PutObject" | "UploadPart"))
                && s.attrs.get("key").map(String::as_str) == Some("traced.bin")
        })
        .collect();
    assert!(!uploads.is_empty(), "no upload span of traced.bin");
    let mut linked = false;
    for u in &uploads {
        assert!(u.attrs.contains_key("bytes"), "{u:?}");
        if let Some(bucket) = &bucket {
            // The S3 client's spans: bucket, HTTP status and attempts.
            assert_eq!(u.attrs.get("bucket"), Some(bucket));
            assert_eq!(u.attrs.get("status").map(String::as_str), Some("200"));
            assert!(u.attrs.contains_key("attempts"));
        }
        let mut cur = Some(*u);
        let mut seen_links = HashSet::new();
        while let Some(s) = cur {
            if write_ids.contains(s.id.as_slice()) {
                seen_links.insert(s.id.clone());
            }
            for l in &s.links {
                seen_links.insert(l.clone());
            }
            cur = by_id.get(&(s.trace.as_slice(), s.parent.as_slice())).copied();
        }
        let found = seen_links.iter().filter(|l| write_ids.contains(l.as_slice())).count();
        if found > 0 {
            linked = true;
            // Every WRITE of that file is among the causes.
            assert_eq!(
                found,
                writes.len(),
                "upload linked to {found} of {} WRITEs",
                writes.len()
            );
        }
    }
    assert!(linked, "no upload of traced.bin is linked to the WRITEs: {uploads:?}");
    assert!(spans.iter().any(|s| s.name == "sync_inode" && !s.links.is_empty()));

    // OTLP metrics arrived too.
    let names = rec.metric_names();
    for n in [
        "s3nfs.nfs.ops",
        "s3nfs.s3.requests",
        "s3nfs.volume.dirty_bytes",
        "s3nfs.cache.hits",
    ] {
        assert!(names.contains(n), "OTLP metric {n} missing: {names:?}");
    }

    // No secret and no file contents anywhere in any exported byte.
    let raw = rec.raw.lock().unwrap();
    assert!(!raw.is_empty());
    let needle = |hay: &[u8], n: &[u8]| hay.windows(n.len()).any(|w| w == n);
    for r in raw.iter() {
        assert!(!needle(r, secret.as_bytes()), "the secret key was exported");
        assert!(!needle(r, CONTENT_MARKER.as_bytes()), "file contents were exported");
    }
}

/// A collector that accepts connections and never answers: NFS operations go on at full speed,
/// the spans that do not fit the bounded queue are dropped and counted, and shutdown is bounded.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_stuck_collector_never_blocks_io() {
    let hole = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let endpoint = format!("http://{}", hole.local_addr().unwrap());
    tokio::spawn(async move {
        let mut held = Vec::new();
        while let Ok((s, _)) = hole.accept().await {
            held.push(s); // never read, never answered
        }
    });
    let backend = Backend::Embedded(tempfile::tempdir().unwrap());
    let extra = [
        ("OTEL_BSP_MAX_QUEUE_SIZE", "64"),
        ("OTEL_BSP_SCHEDULE_DELAY", "20"),
        ("OTEL_EXPORTER_OTLP_TIMEOUT", "30000"),
    ];
    let mut gw = start_gateway(&backend, "grpc", &endpoint, &extra);
    let mut c = Nfs3ConnectionBuilder::new(TokioConnector, "127.0.0.1", "/")
        .mount_port(gw.port)
        .nfs3_port(gw.port)
        .connect_from_privileged_port(false)
        .credential(root_cred())
        .mount()
        .await
        .expect("NFS mount");
    let root = c.root_nfs_fh3();
    const OPS: usize = 2000;
    let t = Instant::now();
    for _ in 0..OPS {
        c.getattr(&nfs3::GETATTR3args { object: root.clone() })
            .await
            .unwrap()
            .unwrap();
    }
    let took = t.elapsed();
    // 2000 local GETATTRs take well under a second here; a blocked exporter would stall them.
    assert!(took < Duration::from_secs(20), "{OPS} GETATTRs took {took:?}");
    let m = parse_prom(&scrape(&gw.metrics).await);
    assert!(m["s3nfs_nfs_ops_total{op=\"GETATTR\"}"] >= OPS as f64);
    let dropped = m["s3nfs_otel_spans_dropped_total"];
    assert!(dropped > 0.0, "nothing counted as dropped: {m:?}");
    assert_eq!(m["s3nfs_otel_spans_exported_total"], 0.0);

    unsafe { libc::kill(gw.child.id() as i32, libc::SIGTERM) };
    let deadline = Instant::now() + Duration::from_secs(40);
    loop {
        if let Some(s) = gw.child.try_wait().unwrap() {
            assert!(s.success(), "{s:?}");
            break;
        }
        assert!(
            Instant::now() < deadline,
            "gateway did not exit on SIGTERM with a stuck collector"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}
