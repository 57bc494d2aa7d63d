//! A real OTLP/gRPC receiver (traces and metrics) on loopback, for the telemetry test and the
//! tracing-cost benchmark: it keeps every request (decoded, and its encoded bytes) or, with
//! `keep = false`, only counts spans.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use opentelemetry_proto::tonic::collector::metrics::v1::metrics_service_server::{
    MetricsService, MetricsServiceServer,
};
use opentelemetry_proto::tonic::collector::metrics::v1::{ExportMetricsServiceRequest, ExportMetricsServiceResponse};
use opentelemetry_proto::tonic::collector::trace::v1::trace_service_server::{TraceService, TraceServiceServer};
use opentelemetry_proto::tonic::collector::trace::v1::{ExportTraceServiceRequest, ExportTraceServiceResponse};
use prost::Message;

#[derive(Default)]
pub struct Received {
    pub traces: Mutex<Vec<ExportTraceServiceRequest>>,
    pub metrics: Mutex<Vec<ExportMetricsServiceRequest>>,
    /// Every request as it came over the wire (re-encoded), for "this never appears" checks.
    pub raw: Mutex<Vec<Vec<u8>>>,
    pub spans: AtomicU64,
    pub keep: bool,
}

impl Received {
    /// The names of every metric received so far.
    pub fn metric_names(&self) -> std::collections::HashSet<String> {
        self.metrics
            .lock()
            .unwrap()
            .iter()
            .flat_map(|r| &r.resource_metrics)
            .flat_map(|r| &r.scope_metrics)
            .flat_map(|s| &s.metrics)
            .map(|m| m.name.clone())
            .collect()
    }
}

#[derive(Clone)]
struct Svc(Arc<Received>);

#[tonic::async_trait]
impl TraceService for Svc {
    async fn export(
        &self,
        req: tonic::Request<ExportTraceServiceRequest>,
    ) -> Result<tonic::Response<ExportTraceServiceResponse>, tonic::Status> {
        let req = req.into_inner();
        let n: usize = req
            .resource_spans
            .iter()
            .flat_map(|r| &r.scope_spans)
            .map(|s| s.spans.len())
            .sum();
        self.0.spans.fetch_add(n as u64, Ordering::Relaxed);
        if self.0.keep {
            self.0.raw.lock().unwrap().push(req.encode_to_vec());
            self.0.traces.lock().unwrap().push(req);
        }
        Ok(tonic::Response::new(ExportTraceServiceResponse {
            partial_success: None,
        }))
    }
}

#[tonic::async_trait]
impl MetricsService for Svc {
    async fn export(
        &self,
        req: tonic::Request<ExportMetricsServiceRequest>,
    ) -> Result<tonic::Response<ExportMetricsServiceResponse>, tonic::Status> {
        let req = req.into_inner();
        if self.0.keep {
            self.0.raw.lock().unwrap().push(req.encode_to_vec());
            self.0.metrics.lock().unwrap().push(req);
        }
        Ok(tonic::Response::new(ExportMetricsServiceResponse {
            partial_success: None,
        }))
    }
}

pub struct Sink {
    pub addr: SocketAddr,
    pub received: Arc<Received>,
    _stop: tokio::sync::oneshot::Sender<()>,
}

impl Sink {
    /// `http://127.0.0.1:PORT`, for `OTEL_EXPORTER_OTLP_ENDPOINT`.
    pub fn endpoint(&self) -> String {
        format!("http://{}", self.addr)
    }
}

/// Starts the receiver on 127.0.0.1:0 in the current tokio runtime.
pub async fn start(keep: bool) -> Sink {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let received = Arc::new(Received {
        keep,
        ..Default::default()
    });
    let svc = Svc(received.clone());
    let (tx, rx) = tokio::sync::oneshot::channel::<()>();
    let incoming = tokio_stream_from(listener);
    tokio::spawn(async move {
        let _ = tonic::transport::Server::builder()
            .add_service(TraceServiceServer::new(svc.clone()).max_decoding_message_size(64 << 20))
            .add_service(MetricsServiceServer::new(svc).max_decoding_message_size(64 << 20))
            .serve_with_incoming_shutdown(incoming, async {
                let _ = rx.await;
            })
            .await;
    });
    Sink {
        addr,
        received,
        _stop: tx,
    }
}

fn tokio_stream_from(
    listener: tokio::net::TcpListener,
) -> impl futures::Stream<Item = std::io::Result<tokio::net::TcpStream>> {
    futures::stream::unfold(listener, |l| async move {
        let r = l.accept().await.map(|(s, _)| s);
        Some((r, l))
    })
}

/// Starts an OTLP/HTTP (protobuf) receiver on 127.0.0.1:0: `POST /v1/traces` and
/// `POST /v1/metrics`, HTTP/1.1 with a Content-Length body.
pub async fn start_http(keep: bool) -> Sink {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let received = Arc::new(Received {
        keep,
        ..Default::default()
    });
    let (tx, mut rx) = tokio::sync::oneshot::channel::<()>();
    let rec = received.clone();
    tokio::spawn(async move {
        loop {
            let (mut sock, _) = tokio::select! {
                r = listener.accept() => match r { Ok(s) => s, Err(_) => continue },
                _ = &mut rx => return,
            };
            let rec = rec.clone();
            tokio::spawn(async move {
                let mut buf = Vec::new();
                loop {
                    // One request: headers, then Content-Length bytes.
                    let head_end = loop {
                        if let Some(i) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
                            break i + 4;
                        }
                        let mut chunk = [0u8; 8192];
                        match sock.read(&mut chunk).await {
                            Ok(0) | Err(_) => return,
                            Ok(n) => buf.extend_from_slice(&chunk[..n]),
                        }
                    };
                    let head = String::from_utf8_lossy(&buf[..head_end]).to_string();
                    let len: usize = head
                        .lines()
                        .find_map(|l| {
                            let (k, v) = l.split_once(':')?;
                            k.eq_ignore_ascii_case("content-length")
                                .then(|| v.trim().parse().ok())?
                        })
                        .unwrap_or(0);
                    while buf.len() < head_end + len {
                        let mut chunk = [0u8; 65536];
                        match sock.read(&mut chunk).await {
                            Ok(0) | Err(_) => return,
                            Ok(n) => buf.extend_from_slice(&chunk[..n]),
                        }
                    }
                    let body: Vec<u8> = buf[head_end..head_end + len].to_vec();
                    buf.drain(..head_end + len);
                    let path = head.split_whitespace().nth(1).unwrap_or("").to_string();
                    let ok = if path.ends_with("/v1/traces") {
                        match ExportTraceServiceRequest::decode(body.as_slice()) {
                            Ok(req) => {
                                let n: usize = req
                                    .resource_spans
                                    .iter()
                                    .flat_map(|r| &r.scope_spans)
                                    .map(|s| s.spans.len())
                                    .sum();
                                rec.spans.fetch_add(n as u64, Ordering::Relaxed);
                                if rec.keep {
                                    rec.raw.lock().unwrap().push(body);
                                    rec.traces.lock().unwrap().push(req);
                                }
                                true
                            }
                            Err(_) => false,
                        }
                    } else if path.ends_with("/v1/metrics") {
                        match ExportMetricsServiceRequest::decode(body.as_slice()) {
                            Ok(req) => {
                                if rec.keep {
                                    rec.raw.lock().unwrap().push(body);
                                    rec.metrics.lock().unwrap().push(req);
                                }
                                true
                            }
                            Err(_) => false,
                        }
                    } else {
                        false
                    };
                    let resp: &[u8] = if ok {
                        b"HTTP/1.1 200 OK\r\nContent-Type: application/x-protobuf\r\nContent-Length: 0\r\n\r\n"
                    } else {
                        b"HTTP/1.1 400 Bad Request\r\nContent-Length: 0\r\n\r\n"
                    };
                    if sock.write_all(resp).await.is_err() {
                        return;
                    }
                }
            });
        }
    });
    Sink {
        addr,
        received,
        _stop: tx,
    }
}
