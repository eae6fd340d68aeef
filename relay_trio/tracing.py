"""Trace context for reports and spans for admission and delivery attempts.

Every admitted message belongs to a W3C trace: the one its report named (``traceparent``),
or a new one the relay starts. Each HTTP delivery attempt sends ``traceparent`` with that
trace id and a span id of its own, so an upstream sees every attempt as a child of the
relay's admission.

:class:`Tracing` without an exporter costs two random numbers per message and one per
attempt: OpenTelemetry is never imported. :func:`open_tracing` with an ``otel_endpoint``
imports the SDK (the ``otel`` extra) and exports a span for the admission and for every
attempt through OTLP/HTTP in a background thread (the SDK's ``BatchSpanProcessor``, which
never blocks the caller: a full queue drops spans). Tests pass their own span processor.
"""

from __future__ import annotations

import random
from typing import TYPE_CHECKING, Any

import attrs

from .core.model import new_tuple
from .core.webhooks import TraceContext, new_trace

if TYPE_CHECKING:  # pragma: no cover - types only
    from opentelemetry.sdk.trace import SpanProcessor

# Not the relay's injected rng: trace ids must not shift the retry jitter tests rely on.
_ids = random.Random()
_ZERO_TRACE = "0" * 32
_ZERO_SPAN = "0" * 16


class _HexPool:
    """Random hex digits drawn in bulk (one ``randbytes`` per 12 KiB of digits) and handed
    out in order, each digit once: a trace id and a span id per admitted report cost two
    slices instead of a random draw each."""

    __slots__ = ("_at", "_digits")

    def __init__(self) -> None:
        self._digits = ""
        self._at = 0

    def take(self, n: int) -> str:
        """``n`` fresh random hex digits. Never blocks."""
        at = self._at
        end = at + n
        if end > len(self._digits):
            self._digits = _ids.randbytes(max(6144, n)).hex()
            at, end = 0, n
        self._at = end
        return self._digits[at:end]


_hex = _HexPool()


def _span_id() -> str:
    return f"{_ids.getrandbits(64) or 1:016x}"


def start_trace() -> TraceContext:
    """A new sampled trace with a random id (no parent). Never blocks."""
    return new_trace(_ids.getrandbits(128))


@attrs.define(eq=False)
class AttemptSpan:
    """One delivery attempt's span: its id (the ``traceparent`` parent id the upstream
    receives) and :meth:`end`, called once with how the attempt ended."""

    span_id: str
    _span: Any = None

    def end(self, outcome: str, detail: str = "") -> None:
        """Finish the span (a no-op without an exporter). Never blocks."""
        span = self._span
        if span is not None:
            span.set_attribute("relay.outcome", outcome)
            if detail:
                span.set_attribute("relay.detail", detail)
            if outcome == "failed":
                from opentelemetry.trace import Status, StatusCode

                span.set_status(Status(StatusCode.ERROR, detail))
            span.end()


@attrs.define(eq=False)
class Tracing:
    """Starts traces and spans; exports them when built with an OpenTelemetry tracer."""

    #: An ``opentelemetry.trace.Tracer``, or ``None``: ids only, nothing exported.
    tracer: Any = None
    provider: Any = None

    @property
    def exporting(self) -> bool:
        return self.tracer is not None

    def admitted(
        self, incoming: TraceContext | None, message_id: str, resource_id: str
    ) -> TraceContext:
        """The trace of a newly admitted message: ``incoming`` or a new one, with
        ``parent_id`` set to the admission span's id. Never blocks."""
        if self.tracer is None:
            # Hot path (once per admitted report): the ids are cut from a pool of random
            # hex digits drawn in bulk, and the context is built without the named tuple's
            # Python-level __new__.
            ids = _hex.take(48)
            span_id = ids[32:]
            if span_id == _ZERO_SPAN:  # W3C: never all zeros (p = 2^-64)
                span_id = _span_id()
            if incoming is None:
                trace_id = ids[:32]
                if trace_id == _ZERO_TRACE:
                    return start_trace()._replace(parent_id=span_id)
                return new_tuple(TraceContext, (trace_id, span_id, "01", None))
            return TraceContext(incoming.trace_id, span_id, incoming.flags, incoming.tracestate)
        span = self.tracer.start_span(
            "relay.admit",
            context=_parent_context(incoming),
            attributes={"relay.message_id": message_id, "relay.resource_id": resource_id},
        )
        span.end()
        sc = span.get_span_context()
        return TraceContext(
            f"{sc.trace_id:032x}",
            f"{sc.span_id:016x}",
            f"{int(sc.trace_flags):02x}",
            incoming.tracestate if incoming is not None else None,
        )

    def attempt(
        self, ctx: TraceContext, message_id: str, attempt: int, upstream: str
    ) -> AttemptSpan:
        """A span for one delivery attempt, child of the admission span. Never blocks."""
        if self.tracer is None:
            return AttemptSpan(_span_id())
        from opentelemetry.trace import SpanKind

        span = self.tracer.start_span(
            "relay.deliver",
            context=_parent_context(ctx),
            kind=SpanKind.CLIENT,
            attributes={
                "relay.message_id": message_id,
                "relay.attempt": attempt,
                "server.address": upstream,
            },
        )
        return AttemptSpan(f"{span.get_span_context().span_id:016x}", span)

    def shutdown(self) -> None:
        """Flush and stop the exporter (bounded by the SDK's own timeout). Blocks: call it
        from a worker thread or at exit."""
        if self.provider is not None:
            self.provider.shutdown()


def _parent_context(ctx: TraceContext | None) -> Any:
    if ctx is None or ctx.parent_id is None:
        return None
    from opentelemetry import trace

    parent = trace.SpanContext(
        trace_id=int(ctx.trace_id, 16),
        span_id=int(ctx.parent_id, 16),
        is_remote=True,
        trace_flags=trace.TraceFlags(int(ctx.flags, 16)),
    )
    return trace.set_span_in_context(trace.NonRecordingSpan(parent))


NO_TRACING = Tracing()
"""Ids only: nothing is exported and OpenTelemetry is never imported."""


def open_tracing(
    endpoint: str | None, *, processor: SpanProcessor | None = None, service: str = "relay-trio"
) -> Tracing:
    """Tracing that exports to ``endpoint`` (OTLP/HTTP) or through ``processor``; without
    either, :data:`NO_TRACING`. Raises ``RuntimeError`` naming the ``otel`` extra when an
    endpoint is set but the SDK is not installed. Never blocks."""
    if endpoint is None and processor is None:
        return NO_TRACING
    try:
        from opentelemetry.sdk.resources import Resource
        from opentelemetry.sdk.trace import TracerProvider
        from opentelemetry.sdk.trace.export import BatchSpanProcessor
    except ImportError:
        raise RuntimeError(
            "otel_endpoint needs the OpenTelemetry SDK: pip install 'relay-trio[otel]'"
        ) from None
    provider = TracerProvider(resource=Resource.create({"service.name": service}))
    if processor is None:
        from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter

        processor = BatchSpanProcessor(OTLPSpanExporter(endpoint=endpoint))
    provider.add_span_processor(processor)
    return Tracing(provider.get_tracer("relay_trio"), provider)


__all__ = ["NO_TRACING", "AttemptSpan", "Tracing", "open_tracing", "start_trace"]
