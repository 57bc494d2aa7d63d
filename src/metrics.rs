//! Metrics: one registry per process, owner of every value, rendered in the Prometheus text
//! format on `--metrics-listen` and exported over OTLP (observable instruments reading the same
//! registry) when OpenTelemetry is configured.
//!
//! - NFS: `s3nfs_nfs_ops_total{op}`, `s3nfs_nfs_errors_total{op}`,
//!   `s3nfs_nfs_op_duration_seconds{op}` (histogram), `s3nfs_nfs_read_bytes_total`,
//!   `s3nfs_nfs_written_bytes_total`, `s3nfs_nfs_refused_records_total` (hostile or broken
//!   clients: records too long or undecodable);
//! - S3: `s3nfs_s3_requests_total{op}`, `s3nfs_s3_errors_total{op}`,
//!   `s3nfs_s3_request_duration_seconds{op}` (histogram), `s3nfs_s3_sent_bytes_total`,
//!   `s3nfs_s3_received_bytes_total`;
//! - per volume: `s3nfs_volume_dirty_bytes`, `s3nfs_volume_upload_queue_depth` (inodes and
//!   deletions with S3 work pending: the journal's length), `s3nfs_volume_pending_seconds` (how
//!   long data has been waiting for S3), `s3nfs_volume_uploads_in_flight`,
//!   `s3nfs_volume_journal_bytes`, `s3nfs_volume_uploaded_bytes_total`,
//!   `s3nfs_volume_upload_errors_total`, `s3nfs_volume_used_bytes`, `s3nfs_volume_files`,
//!   `s3nfs_volume_capacity_bytes` (volumes with a capacity only), `s3nfs_volume_failed`,
//!   `s3nfs_cache_hits_total`, `s3nfs_cache_misses_total`, `s3nfs_cache_hit_ratio`;
//! - ReadWriteMany: `s3nfs_peer_refused_connections_total`, `s3nfs_peer_relayed_connections_total`;
//! - the exporter itself: `s3nfs_otel_spans_exported_total`, `s3nfs_otel_spans_dropped_total`,
//!   `s3nfs_otel_spans_export_failed_total`.
//!
//! Labels are operation and volume names only: never keys, paths, credentials or contents.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, OnceLock, Weak};
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};

use crate::sync::LockExt;

/// Upper bounds of the latency histograms, in seconds.
pub const BUCKETS: [f64; 14] = [
    0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0,
];

/// Count, errors and latency of one kind of operation.
#[derive(Debug, Clone, Default)]
pub struct OpStats {
    pub count: u64,
    pub errors: u64,
    pub sum_secs: f64,
    /// Non-cumulative: `buckets[i]` counts durations in (BUCKETS[i-1], BUCKETS[i]]; the last
    /// slot counts those above every bound.
    pub buckets: [u64; BUCKETS.len() + 1],
}

impl OpStats {
    fn record(&mut self, d: Duration, ok: bool) {
        let s = d.as_secs_f64();
        self.count += 1;
        if !ok {
            self.errors += 1;
        }
        self.sum_secs += s;
        let i = BUCKETS.iter().position(|b| s <= *b).unwrap_or(BUCKETS.len());
        self.buckets[i] += 1;
    }
}

/// A volume as the registry sees it: something that reports a sample when scraped. The volume
/// implements it, so that metrics depends on no volume type (no cycle fs → metrics → fs).
pub trait VolumeSource: Send + Sync {
    /// The volume's figures; the registry fills in the name.
    fn sample(&self) -> VolumeSample;
}

struct VolumeEntry {
    name: String,
    vol: Weak<dyn VolumeSource>,
}

/// The process's metrics.
#[derive(Default)]
pub struct Registry {
    nfs: Mutex<BTreeMap<&'static str, OpStats>>,
    s3: Mutex<BTreeMap<&'static str, OpStats>>,
    pub nfs_read_bytes: AtomicU64,
    pub nfs_written_bytes: AtomicU64,
    pub s3_sent_bytes: AtomicU64,
    pub s3_received_bytes: AtomicU64,
    pub spans_exported: AtomicU64,
    pub spans_dropped: AtomicU64,
    pub spans_export_failed: AtomicU64,
    /// Connections to an owner's cross-node port refused: no client certificate, or the wrong
    /// one (ReadWriteMany).
    pub peer_refused: AtomicU64,
    /// Connections relayed from this node to another node's owner gateway.
    pub peer_relayed: AtomicU64,
    volumes: Mutex<Vec<VolumeEntry>>,
    /// Whether anything reads the NFS operations' figures (the Prometheus endpoint, the OTLP
    /// exporter): until then they are not kept, and an operation does not read the clock to
    /// time itself (a system call where there is no vDSO, as in a user-mode-linux guest).
    nfs_observed: std::sync::atomic::AtomicBool,
}

/// What one volume reports, read when scraped.
#[derive(Debug, Clone, Default)]
pub struct VolumeSample {
    pub name: String,
    pub dirty_bytes: u64,
    pub upload_queue_depth: u64,
    pub journal_bytes: u64,
    pub uploaded_bytes: u64,
    pub upload_errors: u64,
    pub cache_hits: u64,
    pub cache_misses: u64,
    /// How long the volume has held data not in S3 (0 when all of it is there).
    pub pending_seconds: f64,
    pub uploads_in_flight: u64,
    /// `None` for a volume without a capacity (not a CSI volume).
    pub capacity_bytes: Option<u64>,
    pub used_bytes: u64,
    pub files: u64,
    /// A background task of the volume failed (see `s3nfs status`).
    pub failed: bool,
}

pub fn global() -> &'static Registry {
    static R: OnceLock<Registry> = OnceLock::new();
    R.get_or_init(Registry::default)
}

impl Registry {
    /// Whether [`Registry::nfs_op`] is worth calling (see `nfs_observed`).
    pub fn nfs_observed(&self) -> bool {
        self.nfs_observed.load(Ordering::Relaxed)
    }

    /// Something reads the NFS operations' figures from now on.
    pub fn observe_nfs(&self) {
        self.nfs_observed.store(true, Ordering::Relaxed);
    }

    pub fn nfs_op(&self, op: &'static str, d: Duration, ok: bool) {
        self.nfs.locked().entry(op).or_default().record(d, ok);
    }

    pub fn s3_request(&self, op: &'static str, d: Duration, ok: bool) {
        self.s3.locked().entry(op).or_default().record(d, ok);
    }

    pub fn nfs_stats(&self) -> BTreeMap<&'static str, OpStats> {
        self.nfs.locked().clone()
    }

    pub fn s3_stats(&self) -> BTreeMap<&'static str, OpStats> {
        self.s3.locked().clone()
    }

    /// Reports `vol` under `name` until it is dropped.
    pub fn register_volume(&self, name: &str, vol: &Arc<dyn VolumeSource>) {
        let mut v = self.volumes.locked();
        v.retain(|e| e.vol.strong_count() > 0 && e.name != name);
        v.push(VolumeEntry {
            name: name.to_string(),
            vol: Arc::downgrade(vol),
        });
    }

    /// Drops a closed volume's series.
    pub fn unregister_volume(&self, name: &str) {
        self.volumes
            .locked()
            .retain(|e| e.vol.strong_count() > 0 && e.name != name);
    }

    pub fn volumes(&self) -> Vec<VolumeSample> {
        let v = self.volumes.locked();
        v.iter()
            .filter_map(|e| {
                let vol = e.vol.upgrade()?;
                Some(VolumeSample {
                    name: e.name.clone(),
                    ..vol.sample()
                })
            })
            .collect()
    }

    /// The Prometheus text exposition format (version 0.0.4).
    pub fn render(&self) -> String {
        let mut out = String::new();
        let ops = |out: &mut String, prefix: &str, what: &str, stats: &BTreeMap<&'static str, OpStats>| {
            let (total, errors, dur) = match prefix {
                "nfs" => (
                    "s3nfs_nfs_ops_total",
                    "s3nfs_nfs_errors_total",
                    "s3nfs_nfs_op_duration_seconds",
                ),
                _ => (
                    "s3nfs_s3_requests_total",
                    "s3nfs_s3_errors_total",
                    "s3nfs_s3_request_duration_seconds",
                ),
            };
            let _ = writeln!(
                out,
                "# HELP {total} {what} handled, by operation.\n# TYPE {total} counter"
            );
            for (op, s) in stats {
                let _ = writeln!(out, "{total}{{op=\"{op}\"}} {}", s.count);
            }
            let _ = writeln!(
                out,
                "# HELP {errors} {what} that failed, by operation.\n# TYPE {errors} counter"
            );
            for (op, s) in stats {
                let _ = writeln!(out, "{errors}{{op=\"{op}\"}} {}", s.errors);
            }
            let _ = writeln!(
                out,
                "# HELP {dur} Latency of {what}, by operation.\n# TYPE {dur} histogram"
            );
            for (op, s) in stats {
                let mut cum = 0;
                for (i, b) in BUCKETS.iter().enumerate() {
                    cum += s.buckets[i];
                    let _ = writeln!(out, "{dur}_bucket{{op=\"{op}\",le=\"{b}\"}} {cum}");
                }
                let _ = writeln!(out, "{dur}_bucket{{op=\"{op}\",le=\"+Inf\"}} {}", s.count);
                let _ = writeln!(out, "{dur}_sum{{op=\"{op}\"}} {}", s.sum_secs);
                let _ = writeln!(out, "{dur}_count{{op=\"{op}\"}} {}", s.count);
            }
        };
        ops(&mut out, "nfs", "NFS operations", &self.nfs_stats());
        ops(&mut out, "s3", "S3 requests", &self.s3_stats());
        let counter = |out: &mut String, name: &str, help: &str, v: u64| {
            let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} counter\n{name} {v}");
        };
        let l = Ordering::Relaxed;
        counter(
            &mut out,
            "s3nfs_nfs_read_bytes_total",
            "Bytes returned by NFS READ.",
            self.nfs_read_bytes.load(l),
        );
        let w = self.nfs_written_bytes.load(l);
        counter(
            &mut out,
            "s3nfs_nfs_written_bytes_total",
            "Bytes accepted by NFS WRITE.",
            w,
        );
        let s = self.s3_sent_bytes.load(l);
        counter(
            &mut out,
            "s3nfs_s3_sent_bytes_total",
            "Bytes sent to S3 (PUT, UploadPart).",
            s,
        );
        let r = self.s3_received_bytes.load(l);
        counter(
            &mut out,
            "s3nfs_s3_received_bytes_total",
            "Bytes received from S3 (GET).",
            r,
        );
        counter(
            &mut out,
            "s3nfs_nfs_refused_records_total",
            "RPC records refused (too long or undecodable); their connections were closed.",
            nfsserve::REFUSED_RECORDS.load(l),
        );
        counter(
            &mut out,
            "s3nfs_peer_refused_connections_total",
            "Connections to an owner gateway's cross-node port refused (no or a wrong key).",
            self.peer_refused.load(l),
        );
        counter(
            &mut out,
            "s3nfs_peer_relayed_connections_total",
            "Connections relayed from this node to another node's owner gateway.",
            self.peer_relayed.load(l),
        );
        counter(
            &mut out,
            "s3nfs_otel_spans_exported_total",
            "Spans exported over OTLP.",
            self.spans_exported.load(l),
        );
        let d = self.spans_dropped.load(l);
        counter(
            &mut out,
            "s3nfs_otel_spans_dropped_total",
            "Spans dropped: export queue full.",
            d,
        );
        let f = self.spans_export_failed.load(l);
        counter(
            &mut out,
            "s3nfs_otel_spans_export_failed_total",
            "Spans whose export failed.",
            f,
        );

        let vols = self.volumes();
        type Get = fn(&VolumeSample) -> f64;
        let per_volume: [(&str, &str, &str, Get); 13] = [
            (
                "s3nfs_volume_dirty_bytes",
                "gauge",
                "Bytes written but not yet in S3.",
                |v| v.dirty_bytes as f64,
            ),
            (
                "s3nfs_volume_upload_queue_depth",
                "gauge",
                "Inodes with S3 work pending.",
                |v| v.upload_queue_depth as f64,
            ),
            (
                "s3nfs_volume_journal_bytes",
                "gauge",
                "Size of the local journal.",
                |v| v.journal_bytes as f64,
            ),
            (
                "s3nfs_volume_uploaded_bytes_total",
                "counter",
                "Bytes uploaded by the uploader.",
                |v| v.uploaded_bytes as f64,
            ),
            (
                "s3nfs_volume_upload_errors_total",
                "counter",
                "Failed uploads (retried).",
                |v| v.upload_errors as f64,
            ),
            (
                "s3nfs_cache_hits_total",
                "counter",
                "Reads served from the read cache.",
                |v| v.cache_hits as f64,
            ),
            ("s3nfs_cache_misses_total", "counter", "Reads that went to S3.", |v| {
                v.cache_misses as f64
            }),
            (
                "s3nfs_cache_hit_ratio",
                "gauge",
                "Cache hits over lookups (0 before any).",
                |v| hit_ratio(v.cache_hits, v.cache_misses),
            ),
            (
                "s3nfs_volume_pending_seconds",
                "gauge",
                "How long the volume has held data not yet in S3 (0 when all of it is there).",
                |v| v.pending_seconds,
            ),
            (
                "s3nfs_volume_uploads_in_flight",
                "gauge",
                "S3 uploads in flight.",
                |v| v.uploads_in_flight as f64,
            ),
            (
                "s3nfs_volume_used_bytes",
                "gauge",
                "Bytes the volume's files hold.",
                |v| v.used_bytes as f64,
            ),
            ("s3nfs_volume_files", "gauge", "Files in the volume.", |v| {
                v.files as f64
            }),
            (
                "s3nfs_volume_failed",
                "gauge",
                "1 when a background task of the volume has failed (s3nfs status names it).",
                |v| v.failed as u8 as f64,
            ),
        ];
        for (name, kind, help, get) in per_volume {
            let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} {kind}");
            for v in &vols {
                let _ = writeln!(out, "{name}{{volume=\"{}\"}} {}", escape(&v.name), get(v));
            }
        }
        // Only volumes with a capacity have the series: a ratio of use to capacity must not
        // divide by a made-up number.
        let name = "s3nfs_volume_capacity_bytes";
        let _ = writeln!(out, "# HELP {name} The volume's capacity.\n# TYPE {name} gauge");
        for v in &vols {
            if let Some(c) = v.capacity_bytes {
                let _ = writeln!(out, "{name}{{volume=\"{}\"}} {c}", escape(&v.name));
            }
        }
        out
    }
}

fn hit_ratio(h: u64, m: u64) -> f64 {
    if h + m == 0 {
        0.0
    } else {
        h as f64 / (h + m) as f64
    }
}

fn escape(s: &str) -> String {
    s.replace('\\', "\\\\").replace('"', "\\\"").replace('\n', "\\n")
}

/// Serves `GET /metrics` on `addr` for as long as the returned task is held; returns the bound
/// address.
pub async fn serve(addr: SocketAddr) -> std::io::Result<(SocketAddr, crate::tasks::Owned<()>)> {
    let listener = tokio::net::TcpListener::bind(addr).await?;
    let local = listener.local_addr()?;
    global().observe_nfs();
    let server = crate::tasks::owned(async move {
        // Connections end with the server.
        let mut conns = tokio::task::JoinSet::new();
        loop {
            while conns.try_join_next().is_some() {}
            let Ok((mut sock, _)) = listener.accept().await else {
                tokio::time::sleep(Duration::from_millis(50)).await;
                continue;
            };
            conns.spawn(async move {
                let mut buf = Vec::with_capacity(1024);
                let read = tokio::time::timeout(Duration::from_secs(5), async {
                    let mut chunk = [0u8; 1024];
                    while !buf.windows(4).any(|w| w == b"\r\n\r\n") && buf.len() < 16 * 1024 {
                        let n = sock.read(&mut chunk).await?;
                        if n == 0 {
                            break;
                        }
                        buf.extend_from_slice(&chunk[..n]);
                    }
                    Ok::<_, std::io::Error>(())
                })
                .await;
                if !matches!(read, Ok(Ok(()))) {
                    return;
                }
                let line = buf.split(|b| *b == b'\n').next().unwrap_or_default();
                let line = String::from_utf8_lossy(line);
                let mut parts = line.split_whitespace();
                let (method, path) = (parts.next().unwrap_or(""), parts.next().unwrap_or(""));
                let (status, ctype, body) = if method != "GET" && method != "HEAD" {
                    ("405 Method Not Allowed", "text/plain", "GET only\n".to_string())
                } else if path == "/metrics" || path == "/" || path.starts_with("/metrics?") {
                    ("200 OK", "text/plain; version=0.0.4; charset=utf-8", global().render())
                } else {
                    ("404 Not Found", "text/plain", "try /metrics\n".to_string())
                };
                let head = format!(
                    "HTTP/1.1 {status}\r\nContent-Type: {ctype}\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
                    body.len()
                );
                let _ = sock.write_all(head.as_bytes()).await;
                if method != "HEAD" {
                    let _ = sock.write_all(body.as_bytes()).await;
                }
                let _ = sock.shutdown().await;
            });
        }
    });
    Ok((local, server))
}

/// The same values as OTLP observable instruments on `provider`'s meter.
pub fn register_otel(provider: &opentelemetry_sdk::metrics::SdkMeterProvider) {
    use opentelemetry::metrics::MeterProvider as _;
    use opentelemetry::KeyValue;
    let meter = provider.meter("s3nfs");
    global().observe_nfs();
    type StatsFn = fn() -> BTreeMap<&'static str, OpStats>;
    let sources: [(&str, &str, StatsFn); 2] = [
        ("s3nfs.nfs.ops", "s3nfs.nfs.errors", || global().nfs_stats()),
        ("s3nfs.s3.requests", "s3nfs.s3.errors", || global().s3_stats()),
    ];
    for (total, errors, get) in sources {
        meter
            .u64_observable_counter(total)
            .with_callback(move |o| {
                for (op, s) in get() {
                    o.observe(s.count, &[KeyValue::new("op", op)]);
                }
            })
            .build();
        meter
            .u64_observable_counter(errors)
            .with_callback(move |o| {
                for (op, s) in get() {
                    o.observe(s.errors, &[KeyValue::new("op", op)]);
                }
            })
            .build();
        meter
            .f64_observable_counter(format!("{total}.duration_sum"))
            .with_unit("s")
            .with_callback(move |o| {
                for (op, s) in get() {
                    o.observe(s.sum_secs, &[KeyValue::new("op", op)]);
                }
            })
            .build();
    }
    type CounterFn = fn(&Registry) -> u64;
    let counters: [(&str, CounterFn); 7] = [
        ("s3nfs.nfs.read_bytes", |r| r.nfs_read_bytes.load(Ordering::Relaxed)),
        ("s3nfs.nfs.written_bytes", |r| {
            r.nfs_written_bytes.load(Ordering::Relaxed)
        }),
        ("s3nfs.s3.sent_bytes", |r| r.s3_sent_bytes.load(Ordering::Relaxed)),
        ("s3nfs.s3.received_bytes", |r| {
            r.s3_received_bytes.load(Ordering::Relaxed)
        }),
        ("s3nfs.otel.spans_exported", |r| {
            r.spans_exported.load(Ordering::Relaxed)
        }),
        ("s3nfs.otel.spans_dropped", |r| r.spans_dropped.load(Ordering::Relaxed)),
        ("s3nfs.otel.spans_export_failed", |r| {
            r.spans_export_failed.load(Ordering::Relaxed)
        }),
    ];
    for (name, get) in counters {
        meter
            .u64_observable_counter(name)
            .with_callback(move |o| o.observe(get(global()), &[]))
            .build();
    }
    type VolFn = fn(&VolumeSample) -> u64;
    let gauges: [(&str, VolFn); 3] = [
        ("s3nfs.volume.dirty_bytes", |v| v.dirty_bytes),
        ("s3nfs.volume.upload_queue_depth", |v| v.upload_queue_depth),
        ("s3nfs.volume.journal_bytes", |v| v.journal_bytes),
    ];
    for (name, get) in gauges {
        meter
            .u64_observable_gauge(name)
            .with_callback(move |o| {
                for v in global().volumes() {
                    o.observe(get(&v), &[KeyValue::new("volume", v.name.clone())]);
                }
            })
            .build();
    }
    let vol_counters: [(&str, VolFn); 4] = [
        ("s3nfs.volume.uploaded_bytes", |v| v.uploaded_bytes),
        ("s3nfs.volume.upload_errors", |v| v.upload_errors),
        ("s3nfs.cache.hits", |v| v.cache_hits),
        ("s3nfs.cache.misses", |v| v.cache_misses),
    ];
    for (name, get) in vol_counters {
        meter
            .u64_observable_counter(name)
            .with_callback(move |o| {
                for v in global().volumes() {
                    o.observe(get(&v), &[KeyValue::new("volume", v.name.clone())]);
                }
            })
            .build();
    }
    meter
        .f64_observable_gauge("s3nfs.cache.hit_ratio")
        .with_callback(|o| {
            for v in global().volumes() {
                o.observe(
                    hit_ratio(v.cache_hits, v.cache_misses),
                    &[KeyValue::new("volume", v.name.clone())],
                );
            }
        })
        .build();
}
