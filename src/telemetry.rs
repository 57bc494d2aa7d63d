//! Logging and tracing set-up. Spans are created throughout (`nfs` per NFS operation, `s3.request` per
//! S3 request under it, `flush`/`sync_inode`/`stream_upload` for background work); this module
//! decides where they go: stderr (filtered by `RUST_LOG`) always, and OpenTelemetry (OTLP over
//! gRPC or HTTP) when `OTEL_EXPORTER_OTLP_ENDPOINT` or `OTEL_EXPORTER_OTLP_TRACES_ENDPOINT` is set.
//!
//! Exporting never slows the I/O path: finished spans go to a bounded queue that a dedicated
//! thread drains; when the queue is full (collector down or slow) spans are dropped and counted
//! (`s3nfs_otel_spans_dropped_total`). The standard variables apply: `OTEL_SERVICE_NAME`,
//! `OTEL_TRACES_SAMPLER(_ARG)`, `OTEL_EXPORTER_OTLP_PROTOCOL` (`grpc`, `http/protobuf`),
//! `OTEL_EXPORTER_OTLP_HEADERS`, `OTEL_EXPORTER_OTLP_TIMEOUT`, `OTEL_BSP_*`,
//! `OTEL_METRIC_EXPORT_INTERVAL`, and `OTEL_SDK_DISABLED=true` turns export off.
//!
//! Background work is linked to its cause: a WRITE or SETATTR notes its span in
//! [`note_cause`]; the upload of that inode ([`link_causes`]) carries OpenTelemetry links to
//! those spans, so "which S3 requests did this write cause" is answered by following the link.

use std::collections::HashMap;
use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::task::{Context as TaskContext, Poll};
use std::time::Duration;

use opentelemetry::trace::{SpanContext, TraceContextExt, TracerProvider as _};
use opentelemetry::Context;
use opentelemetry_sdk::error::OTelSdkResult;
use opentelemetry_sdk::metrics::SdkMeterProvider;
use opentelemetry_sdk::trace::{BatchConfigBuilder, BatchSpanProcessor, SdkTracerProvider, SpanData, SpanProcessor};
use opentelemetry_sdk::Resource;
use tracing_opentelemetry::OpenTelemetrySpanExt;
use tracing_subscriber::layer::{Layer as _, SubscriberExt};
use tracing_subscriber::util::SubscriberInitExt;
use tracing_subscriber::EnvFilter;

use crate::metrics;
use crate::sync::LockExt;

/// Whether spans go to OpenTelemetry (so that causes are worth noting).
static ENABLED: AtomicBool = AtomicBool::new(false);

/// Most causes kept per inode: the first WRITEs after the last upload and the latest ones.
const MAX_CAUSES: usize = 8;
/// Most inodes with causes noted; past it the notes are forgotten (links are best effort).
const MAX_INODES_WITH_CAUSES: usize = 100_000;

/// Flushes and shuts down the exporters when dropped (call it while the tokio runtime that
/// [`init`] ran in is still alive).
#[derive(Default)]
pub struct Guard {
    tracer: Option<SdkTracerProvider>,
    meter: Option<SdkMeterProvider>,
}

impl Guard {
    pub fn shutdown(&mut self) {
        if let Some(t) = self.tracer.take() {
            if let Err(e) = t.shutdown() {
                eprintln!("s3nfs: telemetry: trace export shutdown: {e}");
            }
        }
        if let Some(m) = self.meter.take() {
            if let Err(e) = m.shutdown() {
                eprintln!("s3nfs: telemetry: metrics export shutdown: {e}");
            }
        }
    }
}

impl Drop for Guard {
    fn drop(&mut self) {
        self.shutdown();
    }
}

fn env_set(name: &str) -> bool {
    std::env::var(name).map(|v| !v.trim().is_empty()).unwrap_or(false)
}

/// True when the environment asks for OTLP export.
pub fn otlp_configured() -> bool {
    let disabled = std::env::var("OTEL_SDK_DISABLED")
        .map(|v| v.eq_ignore_ascii_case("true"))
        .unwrap_or(false);
    !disabled
        && (env_set("OTEL_EXPORTER_OTLP_ENDPOINT")
            || env_set("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT")
            || env_set("OTEL_EXPORTER_OTLP_METRICS_ENDPOINT"))
}

/// How log lines are written to stderr.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum LogFormat {
    /// For people: coloured when stderr is a terminal, plain otherwise.
    #[default]
    Text,
    /// For log shippers: one JSON object per line, with the fields of the event and of the
    /// spans it happened in.
    Json,
}

impl std::str::FromStr for LogFormat {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "text" => Ok(LogFormat::Text),
            "json" => Ok(LogFormat::Json),
            _ => Err(format!("log format {s:?}: text or json")),
        }
    }
}

static LOG_FORMAT: std::sync::OnceLock<LogFormat> = std::sync::OnceLock::new();

/// Chooses the log format before [`init`] (the CLI's `--log-format`, or `S3NFS_LOG_FORMAT`).
pub fn set_log_format(f: LogFormat) {
    let _ = LOG_FORMAT.set(f);
}

/// Colour codes only for a person at a terminal: a file or a log shipper would keep them.
fn colour() -> bool {
    use std::io::IsTerminal;
    std::io::stderr().is_terminal()
}

/// What the log on stderr shows: `RUST_LOG` (default `info`), less the per-operation `nfs`
/// spans. Those are for traces: a span live for the log costs every NFS call the formatting of
/// its fields (GETATTR's instructions went up by half, `cargo bench --bench ops`), for a context
/// only a failure's log line would show, and that line names its operation itself. With no
/// OpenTelemetry export, no layer wants the span and it is never created.
fn log_filter<S>() -> impl tracing_subscriber::layer::Filter<S> {
    without_op_spans(EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info")))
}

fn without_op_spans<S>(env: EnvFilter) -> impl tracing_subscriber::layer::Filter<S> {
    use tracing_subscriber::filter::FilterExt;
    env.and(tracing_subscriber::filter::filter_fn(|m| !is_op_span(m)))
}

/// The span of one NFS call (`nfs_span!` in `src/nfs/mod.rs`).
fn is_op_span(m: &tracing::Metadata<'_>) -> bool {
    m.is_span() && m.name() == "nfs" && m.target().starts_with("s3nfs::nfs")
}

/// The stderr layer in the chosen format.
fn log_layer<S>() -> Box<dyn tracing_subscriber::Layer<S> + Send + Sync>
where
    S: tracing::Subscriber + for<'a> tracing_subscriber::registry::LookupSpan<'a>,
{
    let fmt = tracing_subscriber::fmt::layer().with_writer(std::io::stderr);
    match LOG_FORMAT.get().copied().unwrap_or_default() {
        LogFormat::Text => Box::new(fmt.with_ansi(colour())),
        LogFormat::Json => Box::new(fmt.json().with_ansi(false).with_current_span(true).with_span_list(true)),
    }
}

/// Logs to stderr, filtered by `RUST_LOG` (default `info`), and exports spans and metrics over
/// OTLP when configured (see the module docs). Must be called inside a tokio runtime when OTLP
/// is configured: the exporters' connections live on it.
pub fn init() -> Guard {
    let mut guard = Guard::default();
    let handle = tokio::runtime::Handle::try_current().ok();
    if !otlp_configured() || handle.is_none() {
        let _ = tracing_subscriber::registry()
            .with(log_layer().with_filter(log_filter()))
            .try_init();
        return guard;
    }
    let handle = handle.unwrap();
    let _enter = handle.enter();
    let service = std::env::var("OTEL_SERVICE_NAME")
        .ok()
        .filter(|s| !s.is_empty())
        .unwrap_or_else(|| "s3nfs".into());
    let resource = Resource::builder()
        .with_service_name(service)
        .with_attribute(opentelemetry::KeyValue::new(
            "service.version",
            env!("CARGO_PKG_VERSION"),
        ))
        .build();

    let not_none = |v: &str| std::env::var(v).map(|s| s != "none").unwrap_or(true);
    let traces = (env_set("OTEL_EXPORTER_OTLP_ENDPOINT") || env_set("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT"))
        && not_none("OTEL_TRACES_EXPORTER");
    let metrics_on = (env_set("OTEL_EXPORTER_OTLP_ENDPOINT") || env_set("OTEL_EXPORTER_OTLP_METRICS_ENDPOINT"))
        && not_none("OTEL_METRICS_EXPORTER");
    let tracer_provider = if traces {
        match opentelemetry_otlp::SpanExporter::builder().build() {
            Ok(exporter) => {
                let max_queue = std::env::var("OTEL_BSP_MAX_QUEUE_SIZE")
                    .ok()
                    .and_then(|v| v.parse().ok())
                    .unwrap_or(2048usize);
                let in_flight = Arc::new(AtomicUsize::new(0));
                let exporter = CountingExporter {
                    inner: exporter,
                    handle: handle.clone(),
                    in_flight: in_flight.clone(),
                };
                let batch = BatchSpanProcessor::builder(exporter)
                    .with_batch_config(BatchConfigBuilder::default().with_max_queue_size(max_queue).build())
                    .build();
                let processor = BoundedProcessor {
                    inner: batch,
                    in_flight,
                    max: max_queue,
                };
                Some(
                    SdkTracerProvider::builder()
                        .with_span_processor(processor)
                        .with_resource(resource.clone())
                        .build(),
                )
            }
            Err(e) => {
                eprintln!("s3nfs: telemetry: cannot build the OTLP span exporter: {e}");
                None
            }
        }
    } else {
        None
    };

    let meter_provider = if !metrics_on {
        None
    } else {
        match opentelemetry_otlp::MetricExporter::builder().build() {
            Ok(exporter) => {
                let exporter = InRuntimeMetricExporter {
                    inner: exporter,
                    handle: handle.clone(),
                };
                let provider = SdkMeterProvider::builder()
                    .with_periodic_exporter(exporter)
                    .with_resource(resource)
                    .build();
                metrics::register_otel(&provider);
                Some(provider)
            }
            Err(e) => {
                eprintln!("s3nfs: telemetry: cannot build the OTLP metric exporter: {e}");
                None
            }
        }
    };

    // What is exported does not depend on RUST_LOG (which filters the log on stderr): the
    // gateway's own spans at info level, or S3NFS_OTEL_FILTER (same syntax as RUST_LOG).
    let otel_filter = std::env::var("S3NFS_OTEL_FILTER")
        .ok()
        .and_then(|f| EnvFilter::try_new(f).ok())
        .unwrap_or_else(|| EnvFilter::new("s3nfs=info"));
    let otel_layer = tracer_provider.as_ref().map(|p| {
        tracing_opentelemetry::layer()
            .with_tracer(p.tracer("s3nfs"))
            .with_threads(false)
            .with_location(false)
            .with_filter(otel_filter)
    });
    ENABLED.store(tracer_provider.is_some(), Ordering::Relaxed);
    let _ = tracing_subscriber::registry()
        .with(log_layer().with_filter(log_filter()))
        .with(otel_layer)
        .try_init();
    guard.tracer = tracer_provider;
    guard.meter = meter_provider;
    guard
}

/// Polls an exporter's future inside the tokio runtime's context (the SDK drives exports from
/// its own thread; tonic and hyper need the runtime's reactor and timers).
struct InRuntime<F> {
    fut: F,
    handle: tokio::runtime::Handle,
}

impl<F: Future> Future for InRuntime<F> {
    type Output = F::Output;
    fn poll(self: Pin<&mut Self>, cx: &mut TaskContext<'_>) -> Poll<F::Output> {
        // SAFETY: `fut` is structurally pinned; `handle` is never moved out.
        let this = unsafe { self.get_unchecked_mut() };
        let _enter = this.handle.enter();
        unsafe { Pin::new_unchecked(&mut this.fut) }.poll(cx)
    }
}

/// The OTLP span exporter, run in the runtime's context, counting what leaves the queue.
#[derive(Debug)]
struct CountingExporter {
    inner: opentelemetry_otlp::SpanExporter,
    handle: tokio::runtime::Handle,
    in_flight: Arc<AtomicUsize>,
}

impl opentelemetry_sdk::trace::SpanExporter for CountingExporter {
    async fn export(&self, batch: Vec<SpanData>) -> OTelSdkResult {
        let n = batch.len();
        let r = InRuntime {
            fut: self.inner.export(batch),
            handle: self.handle.clone(),
        }
        .await;
        self.in_flight
            .fetch_sub(n.min(self.in_flight.load(Ordering::Relaxed)), Ordering::Relaxed);
        let m = metrics::global();
        match &r {
            Ok(()) => m.spans_exported.fetch_add(n as u64, Ordering::Relaxed),
            Err(_) => m.spans_export_failed.fetch_add(n as u64, Ordering::Relaxed),
        };
        r
    }
    fn shutdown_with_timeout(&self, timeout: Duration) -> OTelSdkResult {
        self.inner.shutdown_with_timeout(timeout)
    }
    fn force_flush(&self) -> OTelSdkResult {
        self.inner.force_flush()
    }
    fn set_resource(&mut self, resource: &Resource) {
        self.inner.set_resource(resource)
    }
}

/// The batch processor behind a bound of our own, so that spans dropped because the collector
/// is down or slow are counted rather than only logged.
#[derive(Debug)]
struct BoundedProcessor {
    inner: BatchSpanProcessor,
    in_flight: Arc<AtomicUsize>,
    max: usize,
}

impl SpanProcessor for BoundedProcessor {
    fn on_start(&self, span: &mut opentelemetry_sdk::trace::Span, cx: &Context) {
        self.inner.on_start(span, cx)
    }
    fn on_end(&self, span: SpanData) {
        if self.in_flight.fetch_add(1, Ordering::Relaxed) >= self.max {
            self.in_flight.fetch_sub(1, Ordering::Relaxed);
            metrics::global().spans_dropped.fetch_add(1, Ordering::Relaxed);
            return;
        }
        self.inner.on_end(span)
    }
    fn force_flush(&self) -> OTelSdkResult {
        self.inner.force_flush()
    }
    fn shutdown_with_timeout(&self, timeout: Duration) -> OTelSdkResult {
        self.inner.shutdown_with_timeout(timeout)
    }
    fn set_resource(&mut self, resource: &Resource) {
        self.inner.set_resource(resource)
    }
}

/// The OTLP metric exporter, run in the runtime's context.
#[derive(Debug)]
struct InRuntimeMetricExporter {
    inner: opentelemetry_otlp::MetricExporter,
    handle: tokio::runtime::Handle,
}

impl opentelemetry_sdk::metrics::exporter::PushMetricExporter for InRuntimeMetricExporter {
    async fn export(&self, m: &opentelemetry_sdk::metrics::data::ResourceMetrics) -> OTelSdkResult {
        InRuntime {
            fut: self.inner.export(m),
            handle: self.handle.clone(),
        }
        .await
    }
    fn force_flush(&self) -> OTelSdkResult {
        self.inner.force_flush()
    }
    fn shutdown_with_timeout(&self, timeout: Duration) -> OTelSdkResult {
        self.inner.shutdown_with_timeout(timeout)
    }
    fn temporality(&self) -> opentelemetry_sdk::metrics::Temporality {
        self.inner.temporality()
    }
}

/// (volume id, inode) → the spans of the operations that gave it pending S3 work.
type Causes = Mutex<HashMap<(u64, u64), Vec<SpanContext>>>;

fn causes() -> &'static Causes {
    static C: std::sync::OnceLock<Causes> = std::sync::OnceLock::new();
    C.get_or_init(Default::default)
}

/// True when spans are exported (worth extra work to note causes).
pub fn enabled() -> bool {
    ENABLED.load(Ordering::Relaxed)
}

/// Notes the current span (an NFS operation) as a cause of the next upload of `ino` of volume
/// `vol`. Free when OpenTelemetry export is off.
pub fn note_cause(vol: u64, ino: u64) {
    if !ENABLED.load(Ordering::Relaxed) {
        return;
    }
    let cx = tracing::Span::current().context();
    let sc = cx.span().span_context().clone();
    if !sc.is_valid() || !sc.is_sampled() {
        return;
    }
    let mut m = causes().locked();
    if m.len() >= MAX_INODES_WITH_CAUSES && !m.contains_key(&(vol, ino)) {
        // Inodes removed before their upload never take theirs: forget rather than grow.
        m.clear();
    }
    let v = m.entry((vol, ino)).or_default();
    if v.iter().any(|c| c.span_id() == sc.span_id()) {
        return;
    }
    if v.len() >= MAX_CAUSES {
        // Keep the first half (what started the dirty period) and the latest ones.
        v.remove(MAX_CAUSES / 2);
    }
    v.push(sc);
}

/// Links `span` (background work on `ino`) to the operations noted by [`note_cause`] since the
/// last upload of that inode; `take` forgets them (the upload that makes the inode clean).
pub fn link_causes(span: &tracing::Span, vol: u64, ino: u64, take: bool) {
    if !ENABLED.load(Ordering::Relaxed) {
        return;
    }
    let found = {
        let mut m = causes().locked();
        if take {
            m.remove(&(vol, ino))
        } else {
            m.get(&(vol, ino)).cloned()
        }
    };
    for sc in found.into_iter().flatten() {
        span.add_link(sc);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tracing_subscriber::registry::LookupSpan;

    /// Notes the name of every span created and every event it is shown.
    struct Seen(Arc<Mutex<Vec<String>>>);

    impl<S: tracing::Subscriber + for<'a> LookupSpan<'a>> tracing_subscriber::Layer<S> for Seen {
        fn on_new_span(
            &self,
            attrs: &tracing::span::Attributes<'_>,
            _: &tracing::span::Id,
            _: tracing_subscriber::layer::Context<'_, S>,
        ) {
            self.0.locked().push(attrs.metadata().name().to_string());
        }
        fn on_event(&self, e: &tracing::Event<'_>, _: tracing_subscriber::layer::Context<'_, S>) {
            self.0.locked().push(format!("event at {}", e.metadata().level()));
        }
    }

    #[test]
    fn the_log_leaves_out_the_per_call_span_and_nothing_else() {
        let seen = Arc::new(Mutex::new(Vec::new()));
        let layer = Seen(seen.clone()).with_filter(without_op_spans(EnvFilter::new("info")));
        let subscriber = tracing_subscriber::registry().with(layer);
        tracing::subscriber::with_default(subscriber, || {
            let call = tracing::info_span!(target: "s3nfs::nfs", "nfs", op = "WRITE");
            let _in_call = call.enter();
            tracing::warn!(target: "s3nfs::nfs", op = "WRITE", "NFS operation failed");
            tracing::debug!(target: "s3nfs::nfs", "below the filter");
            let _upload = tracing::info_span!(target: "s3nfs::fs::upload", "sync_inode").entered();
            let _other = tracing::info_span!(target: "s3nfs::fs", "nfs").entered();
        });
        assert_eq!(*seen.locked(), ["event at WARN", "sync_inode", "nfs"]);
    }
}
