//! OpenTelemetry traces: one trace per import, from the producer's request to the
//! receiver's webhook, exported over OTLP/HTTP when an endpoint is configured.
//!
//! DataFlow's spans are `tracing` spans; [`Exporter::layer`] bridges them to OpenTelemetry.
//! Without an endpoint no such layer is installed and [`current`] answers `None` at once,
//! so tracing costs what the log spans always cost, and nothing is stored or sent.
//!
//! The context crosses each hop as a W3C `traceparent`, written and read by the
//! OpenTelemetry [`TraceContextPropagator`]: the request's HTTP header, the `batches`,
//! `outbox` and `jobs` rows (the ledger carries it between processes, whichever way a
//! batch or a job is taken), the AMQP message headers, the job message, and the webhook
//! request's header. Span names and attributes of the broker and the job queue follow the
//! OpenTelemetry messaging conventions (`messaging.system`, `messaging.operation.type`,
//! `messaging.destination.name`, producer and consumer span kinds).

use std::sync::atomic::{AtomicBool, Ordering};

use opentelemetry::propagation::{Extractor, Injector, TextMapPropagator};
use opentelemetry::trace::{TraceContextExt, TracerProvider as _};
use opentelemetry_otlp::{SpanExporter, WithExportConfig};
use opentelemetry_sdk::Resource;
use opentelemetry_sdk::propagation::TraceContextPropagator;
use opentelemetry_sdk::trace::SdkTracerProvider;
use tracing::Subscriber;
use tracing_opentelemetry::{OpenTelemetrySpanExt, OtelData};
use tracing_subscriber::fmt::format::Writer;
use tracing_subscriber::fmt::{FmtContext, FormatEvent, FormatFields};
use tracing_subscriber::registry::LookupSpan;

use crate::{Error, Result};

/// The header (and column) name of the W3C trace context.
pub const TRACEPARENT: &str = "traceparent";

/// The service name when neither `OTEL_SERVICE_NAME` nor `OTEL_RESOURCE_ATTRIBUTES` names one.
const SERVICE_NAME: &str = "dataflow";

/// Whether this process exports traces: set once, by [`Exporter::start`].
static EXPORTING: AtomicBool = AtomicBool::new(false);

/// The OTLP exporter of this process, when `OTEL_EXPORTER_OTLP_ENDPOINT` or
/// `OTEL_EXPORTER_OTLP_TRACES_ENDPOINT` names an endpoint (and `OTEL_SDK_DISABLED` or
/// `OTEL_TRACES_EXPORTER=none` does not turn it off). Everything else the SDK reads from
/// the standard variables itself: headers, timeout, compression, `OTEL_SERVICE_NAME`,
/// `OTEL_RESOURCE_ATTRIBUTES`, the batch processor's `OTEL_BSP_*`, the sampler's
/// `OTEL_TRACES_SAMPLER*`.
pub struct Exporter {
    provider: SdkTracerProvider,
}

impl Exporter {
    /// Starts the exporter, or `Ok(None)` when no endpoint is configured.
    pub fn start() -> Result<Option<Exporter>> {
        let set = |name: &str| std::env::var(name).is_ok_and(|v| !v.trim().is_empty());
        let off = std::env::var("OTEL_SDK_DISABLED").is_ok_and(|v| v.eq_ignore_ascii_case("true"))
            || std::env::var("OTEL_TRACES_EXPORTER").is_ok_and(|v| v.eq_ignore_ascii_case("none"));
        if off || !(set("OTEL_EXPORTER_OTLP_ENDPOINT") || set("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT"))
        {
            return Ok(None);
        }
        let exporter = SpanExporter::builder()
            .with_http()
            .with_protocol(opentelemetry_otlp::Protocol::HttpBinary)
            .build()
            .map_err(|e| Error::internal("starting the OTLP trace exporter", e))?;
        let mut resource = Resource::builder().build();
        let named = resource
            .get(&opentelemetry::Key::from_static_str("service.name"))
            .is_some_and(|name| !name.as_str().starts_with("unknown_service"));
        if !named {
            resource = Resource::builder().with_service_name(SERVICE_NAME).build();
        }
        let provider = SdkTracerProvider::builder()
            .with_resource(resource)
            .with_batch_exporter(exporter)
            .build();
        EXPORTING.store(true, Ordering::Relaxed);
        Ok(Some(Exporter { provider }))
    }

    /// The layer that turns this process's `tracing` spans into exported spans.
    pub fn layer<S>(
        &self,
    ) -> tracing_opentelemetry::OpenTelemetryLayer<S, opentelemetry_sdk::trace::SdkTracer>
    where
        S: Subscriber + for<'a> LookupSpan<'a>,
    {
        tracing_opentelemetry::layer()
            .with_tracer(self.provider.tracer("dataflow"))
            // Thread and source location of every span: more bytes per span than a trace
            // of an import needs.
            .with_threads(false)
            .with_location(false)
    }

    /// Exports what is still buffered and stops (at the end of the process).
    pub fn shutdown(self) {
        if let Err(e) = self.provider.shutdown() {
            tracing::warn!(error = %e, "traces not all exported at shutdown");
        }
    }
}

/// Whether this process exports traces.
pub fn exporting() -> bool {
    EXPORTING.load(Ordering::Relaxed)
}

/// The `traceparent` of the current span, to carry to the next hop; `None` when traces are
/// not exported (or no span is current).
pub fn current() -> Option<String> {
    of(&tracing::Span::current())
}

/// The `traceparent` of `span`, as [`current`].
pub fn of(span: &tracing::Span) -> Option<String> {
    if !exporting() {
        return None;
    }
    let cx = span.context();
    if !cx.span().span_context().is_valid() {
        return None;
    }
    let mut carried = Carried(None);
    TraceContextPropagator::new().inject_context(&cx, &mut carried);
    carried.0
}

/// Makes `span` continue the trace `traceparent` names. Call it before the span is first
/// entered: a started span keeps its parent. A missing or malformed `traceparent` leaves
/// the span where it is (under the current span, or the root of a new trace).
pub fn follow(span: &tracing::Span, traceparent: Option<&str>) {
    let Some(traceparent) = traceparent.filter(|_| exporting()) else {
        return;
    };
    let cx = TraceContextPropagator::new().extract(&Carried(Some(traceparent.to_owned())));
    if cx.span().span_context().is_valid() {
        // Fails only for a span no exporter sees (filtered out): nothing to link then.
        let _ = span.set_parent(cx);
    }
}

/// A `traceparent` on its way in or out of the propagator.
struct Carried(Option<String>);

impl Injector for Carried {
    fn set(&mut self, key: &str, value: String) {
        if key == TRACEPARENT {
            self.0 = Some(value);
        }
    }
}

impl Extractor for Carried {
    fn get(&self, key: &str) -> Option<&str> {
        (key == TRACEPARENT).then_some(self.0.as_deref()).flatten()
    }

    fn keys(&self) -> Vec<&str> {
        vec![TRACEPARENT]
    }
}

/// A log line format that ends each line written inside an exported span with its
/// `trace_id=… span_id=…`, so a line leads to its trace. Lines outside any exported span
/// are written as the inner format writes them.
pub struct WithTraceIds<F>(pub F);

impl<S, N, F> FormatEvent<S, N> for WithTraceIds<F>
where
    S: Subscriber + for<'a> LookupSpan<'a>,
    N: for<'a> FormatFields<'a> + 'static,
    F: FormatEvent<S, N>,
{
    fn format_event(
        &self,
        ctx: &FmtContext<'_, S, N>,
        mut writer: Writer<'_>,
        event: &tracing::Event<'_>,
    ) -> std::fmt::Result {
        // The nearest span the exporter sees: a library's span inside it may be filtered out.
        let ids = ctx.event_scope().and_then(|scope| {
            scope.into_iter().find_map(|span| {
                let extensions = span.extensions();
                let data = extensions.get::<OtelData>()?;
                Some((data.trace_id()?, data.span_id()?))
            })
        });
        let Some((trace_id, span_id)) = ids else {
            return self.0.format_event(ctx, writer, event);
        };
        let mut line = String::new();
        self.0.format_event(ctx, Writer::new(&mut line), event)?;
        writeln!(
            writer,
            "{} trace_id={trace_id} span_id={span_id}",
            line.trim_end_matches('\n')
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_traceparent_goes_through_the_carrier_unchanged() {
        let traceparent = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";
        let cx = TraceContextPropagator::new().extract(&Carried(Some(traceparent.into())));
        assert!(cx.span().span_context().is_valid());
        let mut out = Carried(None);
        TraceContextPropagator::new().inject_context(&cx, &mut out);
        assert_eq!(out.0.as_deref(), Some(traceparent));
        let junk = TraceContextPropagator::new().extract(&Carried(Some("00-nonsense".into())));
        assert!(!junk.span().span_context().is_valid());
    }

    #[test]
    fn without_an_exporter_nothing_is_carried() {
        let span = tracing::info_span!("anything");
        assert_eq!(of(&span), None);
    }
}
