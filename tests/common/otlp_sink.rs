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
