//! Logging and tracing: `tracing-subscriber` with an env filter (`RUST_LOG`,
//! else the configured level, noisy dependencies quieted) writing JSON or
//! console lines, and OpenTelemetry spans exported over OTLP/gRPC when
//! `OTEL_EXPORTER_OTLP_ENDPOINT` is set. Without it no OpenTelemetry layer
//! exists and the trace-context helpers below return at once.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, Ordering};

use opentelemetry::propagation::{Extractor, Injector, TextMapPropagator};
use opentelemetry::trace::{TraceContextExt, TracerProvider as _};
use opentelemetry_sdk::propagation::TraceContextPropagator;
use opentelemetry_sdk::trace::SdkTracerProvider;
use tracing_opentelemetry::OpenTelemetrySpanExt;
use tracing_subscriber::EnvFilter;
use tracing_subscriber::layer::SubscriberExt;
use tracing_subscriber::util::SubscriberInitExt;

use mts_config::{Config, LogFormat};

/// The environment variable that turns span export on (the OTLP standard one).
pub const OTLP_ENDPOINT_ENV: &str = "OTEL_EXPORTER_OTLP_ENDPOINT";

/// Whether spans are exported; checked before any trace-context work.
static EXPORTING: AtomicBool = AtomicBool::new(false);

/// Whether spans are exported, so callers can skip trace-context work.
pub fn exporting() -> bool {
    EXPORTING.load(Ordering::Relaxed)
}

/// Keeps the span exporter alive; `shutdown` flushes what is queued.
#[must_use = "dropping the guard without shutdown loses the last spans"]
pub struct Telemetry {
    provider: Option<SdkTracerProvider>,
}

impl Telemetry {
    /// Flushes queued spans and stops the exporter.
    pub async fn shutdown(self) {
        let Some(provider) = self.provider else {
            return;
        };
        // The SDK's shutdown blocks until the exporter's thread is done.
        let flushed = tokio::task::spawn_blocking(move || provider.shutdown()).await;
        if let Ok(Err(err)) = flushed {
            eprintln!("span export: {err}");
        }
    }
}

/// Installs the global subscriber for the service `name`. Call once, from
/// `main`, inside the Tokio runtime (the OTLP client needs it).
pub fn init(config: &Config, name: &str) -> Telemetry {
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| {
        EnvFilter::new(format!(
            "{},h2=warn,hyper=warn,tower=warn,aws_smithy_runtime=warn,aws_sdk_s3=warn,aws_config=warn,tarant=warn,opentelemetry=warn",
            config.telemetry.log_level
        ))
    });
    let (provider, export_error) = match span_exporter(name) {
        Ok(provider) => (provider, None),
        Err(err) => (None, Some(err)),
    };
    let otel = provider.as_ref().map(|provider| {
        tracing_opentelemetry::layer().with_tracer(provider.tracer("minitoolstream"))
    });
    let fmt = tracing_subscriber::fmt::layer()
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stdout()));
    let registry = tracing_subscriber::registry().with(filter).with(otel);
    match config.telemetry.log_format {
        LogFormat::Json => registry.with(fmt.json().with_current_span(true)).init(),
        LogFormat::Console => registry.with(fmt).init(),
    }
    if let Some(err) = export_error {
        tracing::error!(%err, "span export is off: the OTLP exporter cannot be built");
    }
    EXPORTING.store(provider.is_some(), Ordering::Relaxed);
    if provider.is_some() {
        tracing::info!(
            endpoint = %std::env::var(OTLP_ENDPOINT_ENV).unwrap_or_default(),
            "exporting spans over OTLP"
        );
    }
    Telemetry { provider }
}

/// An OTLP/gRPC span exporter when the endpoint is configured. The SDK reads
/// the standard variables (endpoint, headers, timeout, batch sizes and
/// `OTEL_SERVICE_NAME`) itself.
fn span_exporter(
    name: &str,
) -> Result<Option<SdkTracerProvider>, opentelemetry_otlp::ExporterBuildError> {
    if std::env::var(OTLP_ENDPOINT_ENV).is_ok_and(|v| !v.trim().is_empty()) {
        let exporter = opentelemetry_otlp::SpanExporter::builder()
            .with_tonic()
            .build()?;
        let mut resource = opentelemetry_sdk::Resource::builder();
        if std::env::var("OTEL_SERVICE_NAME").is_err() {
            resource = resource.with_service_name(format!("minitoolstream-{name}"));
        }
        Ok(Some(
            SdkTracerProvider::builder()
                .with_batch_exporter(exporter)
                .with_resource(resource.build())
                .build(),
        ))
    } else {
        Ok(None)
    }
}

/// Makes `span` a child of the W3C trace context in `headers` (a gRPC
/// request's), when spans are exported.
pub fn set_remote_parent(span: &tracing::Span, headers: &http::HeaderMap) {
    if !exporting() {
        return;
    }
    let parent = TraceContextPropagator::new().extract(&HeaderExtractor(headers));
    if parent.span().span_context().is_valid() {
        // Fails only when the span is disabled, which leaves nothing to link.
        let _ = span.set_parent(parent);
    }
}

/// The W3C trace context (`traceparent`, maybe `tracestate`) of `span`, to
/// store with a message; empty when spans are not exported.
pub fn context_of(span: &tracing::Span) -> Vec<(String, String)> {
    if !exporting() {
        return Vec::new();
    }
    let context = span.context();
    if !context.span().span_context().is_valid() {
        return Vec::new();
    }
    let mut fields = HashMap::new();
    TraceContextPropagator::new().inject_context(&context, &mut MapInjector(&mut fields));
    let mut fields: Vec<_> = fields.into_iter().collect();
    fields.sort();
    fields
}

/// Links `span` to the trace context stored in a message's `headers`, so a
/// delivery points back at the publish that stored it.
pub fn link_to_stored(span: &tracing::Span, headers: &HashMap<String, String>) {
    if !exporting() {
        return;
    }
    let stored = TraceContextPropagator::new().extract(&MapExtractor(headers));
    let stored = stored.span().span_context().clone();
    if stored.is_valid() {
        span.add_link(stored);
    }
}

struct HeaderExtractor<'a>(&'a http::HeaderMap);

impl Extractor for HeaderExtractor<'_> {
    fn get(&self, key: &str) -> Option<&str> {
        self.0.get(key).and_then(|v| v.to_str().ok())
    }

    fn keys(&self) -> Vec<&str> {
        self.0.keys().map(http::HeaderName::as_str).collect()
    }
}

struct MapExtractor<'a>(&'a HashMap<String, String>);

impl Extractor for MapExtractor<'_> {
    fn get(&self, key: &str) -> Option<&str> {
        self.0.get(key).map(String::as_str)
    }

    fn keys(&self) -> Vec<&str> {
        self.0.keys().map(String::as_str).collect()
    }
}

struct MapInjector<'a>(&'a mut HashMap<String, String>);

impl Injector for MapInjector<'_> {
    fn set(&mut self, key: &str, value: String) {
        self.0.insert(key.to_owned(), value);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn without_export_the_helpers_do_nothing() {
        assert!(!exporting());
        let span = tracing::info_span!("test");
        assert!(context_of(&span).is_empty());
        let mut headers = http::HeaderMap::new();
        headers.insert(
            "traceparent",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01"
                .parse()
                .unwrap(),
        );
        set_remote_parent(&span, &headers);
        link_to_stored(&span, &HashMap::new());
    }
}
