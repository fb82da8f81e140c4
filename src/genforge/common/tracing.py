"""OpenTelemetry tracing for `genforge serve` and `genforge train`: set up once per process, off by default.

    setup_tracing("console")                        # or "otlp"; "off" (the default) does nothing
    with span("eval", {"genforge.step": 200}):     # a child of whatever span is current
        ...
    record_span("queue_wait", submitted, admitted, parent=gen)   # after the fact, from perf_counter stamps

Off, nothing of OpenTelemetry is imported: `span` hands back one shared no-op context manager and
`record_span` returns at once, so code traces unconditionally and pays a function call. On, the
SDK's TracerProvider (resource `service.name` "genforge") feeds a BatchSpanProcessor: spans are
exported from a background thread, never on the request path, and dropped rather than queued
without bound when the exporter falls behind. Exporters:
- console: one span per line as compact JSON on stdout (the SDK's ConsoleSpanExporter);
- otlp: OTLP/HTTP protobuf to OTEL_EXPORTER_OTLP_TRACES_ENDPOINT, else OTEL_EXPORTER_OTLP_ENDPOINT
  + /v1/traces, else http://localhost:4318/v1/traces (the exporter reads the standard variables,
  headers and timeouts included). The batch processor's OTEL_BSP_* variables apply to both.

`record_span` exists for work that happens where a span cannot be opened cheaply: the engine's
scheduler thread stamps each sequence's submit, admit, first-token and finish times anyway (for the
Prometheus metrics), and the server turns them into queue_wait / prefill / decode spans once the
request ends, so tracing adds nothing per token.
"""

from __future__ import annotations

import sys
import time
from typing import Any

from genforge.common.errors import ConfigError

MODES = ("off", "console", "otlp")
SERVICE_NAME = "genforge"

_tracer: Any = None  # an SDK tracer once set up; None: tracing is off
_provider: Any = None
_offset_ns = 0  # time.time_ns() - time.perf_counter_ns(): perf_counter stamps -> span times


class _NoSpan:
    def __enter__(self) -> None:
        return None

    def __exit__(self, *exc: object) -> bool:
        return False


_NO_SPAN = _NoSpan()


def enabled() -> bool:
    return _tracer is not None


def setup_tracing(mode: str | None, *, service_name: str = SERVICE_NAME) -> None:
    """Trace this process to `mode`'s exporter (see the module docstring); "off"/None: do nothing."""
    global _tracer, _provider, _offset_ns
    if mode in (None, "off"):
        return
    if mode not in MODES:
        raise ConfigError(f"--trace {mode!r}: expected one of {', '.join(MODES)}", param="trace")
    try:
        from opentelemetry import trace
        from opentelemetry.sdk.resources import Resource
        from opentelemetry.sdk.trace import TracerProvider
        from opentelemetry.sdk.trace.export import BatchSpanProcessor, ConsoleSpanExporter
    except ImportError:
        raise ConfigError("--trace needs OpenTelemetry's SDK: pip install 'genforge[trace]'", param="trace") from None
    if mode == "console":
        exporter = ConsoleSpanExporter(out=sys.stdout, formatter=lambda s: s.to_json(indent=None) + "\n")
    else:
        try:
            from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter
        except ImportError:
            raise ConfigError("--trace otlp needs the OTLP exporter: pip install 'genforge[trace]'",
                              param="trace") from None
        exporter = OTLPSpanExporter()
    # shutdown_on_exit (the default): the provider flushes what is queued when the process exits
    provider = TracerProvider(resource=Resource.create({"service.name": service_name}))
    provider.add_span_processor(BatchSpanProcessor(exporter))
    trace.set_tracer_provider(provider)
    _tracer, _provider = provider.get_tracer("genforge"), provider
    _offset_ns = time.time_ns() - time.perf_counter_ns()


def flush(timeout_s: float = 10.0) -> None:
    """Export every span ended so far. A server calls it as it shuts down: uvicorn ends the process
    by raising the SIGTERM it caught again, so exit handlers (the provider's own flush) never run."""
    if _provider is not None:
        _provider.force_flush(int(timeout_s * 1000))


def span(name: str, attributes: dict[str, Any] | None = None) -> Any:
    """A context manager: a span made current for its block (an exception marks it failed)."""
    if _tracer is None:
        return _NO_SPAN
    return _tracer.start_as_current_span(name, attributes=attributes)


def server_span(name: str, headers: list[tuple[bytes, bytes]], attributes: dict[str, Any]) -> Any:
    """The root span of an HTTP request (kind SERVER), continuing the client's trace when its
    headers carry a W3C `traceparent`."""
    if _tracer is None:
        return _NO_SPAN
    from opentelemetry import propagate, trace

    carrier = {k.decode("latin-1"): v.decode("latin-1") for k, v in headers if k in (b"traceparent", b"tracestate")}
    context = propagate.extract(carrier) if carrier else None
    return _tracer.start_as_current_span(name, context=context, kind=trace.SpanKind.SERVER, attributes=attributes,
                                         record_exception=False)


def record_span(name: str, start: float, end: float, attributes: dict[str, Any] | None = None, *,
                parent: Any = None, error: str | None = None) -> Any:
    """A finished span from `time.perf_counter()` stamps, a child of `parent` (a span this function
    returned) or else of the current span. Returns it (None when tracing is off)."""
    if _tracer is None:
        return None
    from opentelemetry import trace
    from opentelemetry.trace import Status, StatusCode

    context = trace.set_span_in_context(parent) if parent is not None else None
    s = _tracer.start_span(name, context=context, attributes=attributes, start_time=int(start * 1e9) + _offset_ns)
    if error is not None:
        s.set_status(Status(StatusCode.ERROR, error))
    s.end(end_time=int(end * 1e9) + _offset_ns)
    return s


def annotate(target: Any, attributes: dict[str, Any], error: str | None = None) -> None:
    """Add attributes (and an error status) to `target`, a span from `span`/`server_span`'s block."""
    if target is None:
        return
    target.set_attributes(attributes)
    if error is not None:
        from opentelemetry.trace import Status, StatusCode

        target.set_status(Status(StatusCode.ERROR, error))
