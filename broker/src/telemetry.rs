//! Logs and, when `telemetry.otlp_endpoint` is set, OpenTelemetry traces exported over OTLP
//! (HTTP, protobuf) to a collector. Off by default.
//!
//! Every HTTP request runs in one `request` span carrying its `request_id` (the `x-request-id`
//! header, set or propagated by `http/`), so a trace, its log lines and its audit event share
//! that id. Span fields are the same non-secret fields the logs carry: no header, no body, no
//! token ever becomes a span attribute.
//!
//! Export runs on the batch processor's own thread with a blocking HTTP client, so a slow or
//! absent collector never delays a request; spans that cannot be sent are dropped (and counted
//! by the SDK), never retried on the request path.

use crate::config::{LogFormat, TelemetryConfig};
use opentelemetry::trace::TracerProvider as _;
use opentelemetry_otlp::WithExportConfig;
use opentelemetry_sdk::Resource;
use opentelemetry_sdk::trace::SdkTracerProvider;
use tracing_subscriber::Layer;
use tracing_subscriber::layer::SubscriberExt;
use tracing_subscriber::util::SubscriberInitExt;

/// Why tracing could not be set up.
#[derive(Debug, thiserror::Error)]
pub enum TelemetryError {
    #[error("telemetry.otlp_endpoint: {0}")]
    Exporter(String),
}

/// Keeps the trace pipeline alive; flushes what is buffered when dropped (at shutdown).
#[must_use = "dropping the guard stops trace export"]
pub struct TraceGuard {
    provider: Option<SdkTracerProvider>,
}

impl Drop for TraceGuard {
    fn drop(&mut self) {
        if let Some(p) = self.provider.take()
            && let Err(e) = p.shutdown()
        {
            tracing::warn!(error = %e, "flushing traces at shutdown failed");
        }
    }
}

/// Where spans go: `{endpoint}/v1/traces`.
pub fn traces_url(endpoint: &str) -> String {
    format!("{}/v1/traces", endpoint.trim_end_matches('/'))
}

fn tracer_provider(cfg: &TelemetryConfig) -> Result<Option<SdkTracerProvider>, TelemetryError> {
    let Some(endpoint) = &cfg.otlp_endpoint else {
        return Ok(None);
    };
    let timeout = std::time::Duration::try_from(cfg.export_timeout)
        .unwrap_or(std::time::Duration::from_secs(10));
    let exporter = opentelemetry_otlp::SpanExporter::builder()
        .with_http()
        .with_endpoint(traces_url(endpoint))
        .with_timeout(timeout)
        .build()
        .map_err(|e| TelemetryError::Exporter(e.to_string()))?;
    let resource = Resource::builder()
        .with_service_name(cfg.service_name.clone())
        .with_attribute(opentelemetry::KeyValue::new(
            "service.version",
            crate::VERSION,
        ))
        .build();
    Ok(Some(
        SdkTracerProvider::builder()
            .with_batch_exporter(exporter)
            .with_resource(resource)
            .build(),
    ))
}

/// Install the global subscriber: the log format on stderr, filtered by `level` (or
/// `BROKER_LOG`), plus the OTLP trace layer when configured. Call once, early; keep the guard.
pub fn init(
    format: LogFormat,
    level: &str,
    cfg: &TelemetryConfig,
) -> Result<TraceGuard, TelemetryError> {
    let filter = tracing_subscriber::EnvFilter::try_from_env("BROKER_LOG")
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(level));
    let ansi = std::io::IsTerminal::is_terminal(&std::io::stderr());
    let fmt = tracing_subscriber::fmt::layer()
        .with_ansi(ansi)
        .with_writer(std::io::stderr);
    let fmt = match format {
        LogFormat::Json => fmt.json().flatten_event(true).boxed(),
        LogFormat::Text => fmt.boxed(),
    };
    let provider = tracer_provider(cfg)?;
    let otel = provider.as_ref().map(|p| {
        tracing_opentelemetry::layer()
            .with_tracer(p.tracer("broker"))
            .boxed()
    });
    // A second init (tests, dev mode) keeps the first subscriber.
    // One filter for both: the level chosen for logs also bounds what becomes a span.
    let _ = tracing_subscriber::registry()
        .with(filter)
        .with(fmt)
        .with(otel)
        .try_init();
    if let Some(endpoint) = &cfg.otlp_endpoint {
        tracing::info!(endpoint = %traces_url(endpoint), "exporting traces over OTLP");
    }
    Ok(TraceGuard { provider })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn traces_url_appends_the_signal_path_once() {
        assert_eq!(
            traces_url("http://collector:4318"),
            "http://collector:4318/v1/traces"
        );
        assert_eq!(
            traces_url("http://collector:4318/"),
            "http://collector:4318/v1/traces"
        );
    }

    #[test]
    fn off_by_default() {
        let cfg = TelemetryConfig::default();
        assert!(cfg.otlp_endpoint.is_none());
        assert!(tracer_provider(&cfg).unwrap().is_none());
    }
}
