"""Values that cross module boundaries: reports, problems, admission results.

Everything here is an immutable value (``attrs.frozen``) with no I/O.
"""

from __future__ import annotations

from contextlib import AbstractContextManager
from typing import Any, Final, NamedTuple, Protocol

import attrs

from .idempotency import MAX_KEY_LEN, valid_key
from .ids import MessageId, is_valid_resource_id
from .webhooks import TraceContext, parse_traceparent

PROBLEM_BASE: Final = "https://relay-trio.dev/problems/"
MAX_KIND_LEN: Final = 64
MAX_REASON_LEN: Final = 256
#: Longest wait an ACK's ``retry_after`` may ask for (one day).
MAX_RETRY_AFTER: Final = 86400
#: Dead-letter filters (``resource_id``, ``reason``, ``upstream``) and timestamps.
MAX_FILTER_LEN: Final = 2048
MAX_TIMESTAMP_LEN: Final = 40
_REPORT_FIELDS: Final = frozenset(
    {"resource_id", "payload", "kind", "idempotency_key", "traceparent", "tracestate"}
)
#: The fields of a report that carries no delivery-contract field (the common case).
_PLAIN_FIELDS: Final = frozenset({"resource_id", "payload", "kind"})


@attrs.frozen
class Problem:
    """An RFC 9457 problem: a stable ``type`` slug, HTTP status and human text.

    ``extra`` members are merged into the JSON object (e.g. ``reason``, ``retry_after``).
    """

    status: int
    slug: str
    title: str
    detail: str = ""
    extra: dict[str, Any] = attrs.field(factory=dict)
    retry_after: float | None = None

    @property
    def type(self) -> str:
        return PROBLEM_BASE + self.slug

    def to_dict(self) -> dict[str, Any]:
        """The problem as a JSON-ready object (``type``, ``title``, ``status``, ``detail``...)."""
        body: dict[str, Any] = {
            "type": self.type,
            "title": self.title,
            "status": self.status,
        }
        if self.detail:
            body["detail"] = self.detail
        if self.retry_after is not None:
            body["retry_after"] = self.retry_after
        body.update(self.extra)
        return body


#: ``new_tuple(Cls, (every field, in order))`` builds a named tuple without the Python-level
#: call of its generated ``__new__`` (about 0.1 us a call; the ingest path builds several per
#: report). Every field must be given, defaults included: nothing checks the count.
new_tuple = tuple.__new__


class Report(NamedTuple):
    """One validated report as it arrives, before admission (a named tuple: one is built
    per report on the ingest path, where a frozen attrs class costs several times more)."""

    resource_id: str
    payload: Any
    kind: str | None = None
    #: The client's idempotency key (``Idempotency-Key`` header or line field).
    idempotency_key: str | None = None
    #: The W3C trace context it came with (``None``: none, or an invalid one, ignored).
    trace: TraceContext | None = None


class Accepted(NamedTuple):
    """An admitted report: its message id and where it was queued (a named tuple: one is
    built per admitted report).

    ``replayed`` marks the answer to a repeated idempotency key: the original message id,
    nothing admitted again."""

    message_id: str
    resource_id: str
    seq: int
    replayed: bool = False


def validate_report(obj: object) -> Report | Problem:
    """Check a decoded JSON body against the report schema.

    Returns a :class:`Report`, or a 422 :class:`Problem` naming the first bad field.
    Never raises.
    """
    if not isinstance(obj, dict):
        return invalid("body must be a JSON object")
    if len(obj) > len(_REPORT_FIELDS) or not _REPORT_FIELDS.issuperset(obj):
        unknown = set(obj) - _REPORT_FIELDS
        return invalid(f"unknown field(s): {', '.join(sorted(map(str, unknown)))}")
    rid = obj.get("resource_id")
    if not is_valid_resource_id(rid):
        return invalid(
            "resource_id must be 1-128 characters of [A-Za-z0-9._:-]", field="resource_id"
        )
    if "payload" not in obj:
        return invalid("payload is required", field="payload")
    kind = obj.get("kind")
    if kind is not None and (not isinstance(kind, str) or not 0 < len(kind) <= MAX_KIND_LEN):
        return invalid(f"kind must be a string of 1-{MAX_KIND_LEN} characters", field="kind")
    assert isinstance(rid, str)
    if _PLAIN_FIELDS.issuperset(obj):
        # The hot path: no idempotency key, no trace context to check (built with
        # tuple.__new__: a named tuple's own __new__ is a Python-level call).
        return new_tuple(Report, (rid, obj["payload"], kind, None, None))
    refused = contract_fields_problem(obj)
    if refused is not None:
        return refused
    key = obj.get("idempotency_key")
    parent, state = obj.get("traceparent"), obj.get("tracestate")
    # W3C trace context: a malformed traceparent is ignored (a new trace is started).
    trace = None if parent is None else parse_traceparent(parent, state)
    return Report(rid, obj["payload"], kind, key, trace)


def contract_fields_problem(obj: dict[Any, Any]) -> Problem | None:
    """422 when a report's ``idempotency_key`` is not 1-255 visible ASCII characters or its
    ``traceparent``/``tracestate`` is not a string (``null`` is absent); else ``None``."""
    key = obj.get("idempotency_key")
    if key is not None and not valid_key(key):
        return invalid(
            f"idempotency_key must be 1-{MAX_KEY_LEN} visible ASCII characters (no spaces)",
            field="idempotency_key",
        )
    for name in ("traceparent", "tracestate"):
        value = obj.get(name)
        if value is not None and not isinstance(value, str):
            return invalid(f"{name} must be a string", field=name)
    return None


@attrs.frozen
class Ack:
    """One validated ``POST /v1/acks`` body."""

    message_id: str
    status: str  # "ack" or "nack"
    reason: str | None = None
    retry_after: float | None = None


def validate_ack(obj: object) -> Ack | Problem:
    """Check a decoded ACK body ``{message_id, status, reason?, retry_after?}``.

    Returns an :class:`Ack`, or a 422 :class:`Problem` naming the first bad field. ``reason``
    and ``retry_after`` may be ``null`` (absent); unknown members are ignored. Never raises.
    """
    if not isinstance(obj, dict):
        return invalid("body must be a JSON object")
    message_id = obj.get("message_id")
    if not isinstance(message_id, str) or MessageId.split(message_id) is None:
        return invalid(
            "message_id must be <resource_id>:<seq>, seq a decimal in [1, 2**63-1]",
            field="message_id",
        )
    status = obj.get("status")
    if status not in ("ack", "nack"):
        return invalid("status must be ack or nack", field="status")
    reason = obj.get("reason")
    if reason is not None and (not isinstance(reason, str) or len(reason) > MAX_REASON_LEN):
        return invalid(
            f"reason must be a string of at most {MAX_REASON_LEN} characters", field="reason"
        )
    retry_after = obj.get("retry_after")
    if retry_after is not None and (
        isinstance(retry_after, bool)
        or not isinstance(retry_after, int | float)
        or not 0 <= retry_after <= MAX_RETRY_AFTER
    ):
        return invalid(
            f"retry_after must be a number of seconds in [0, {MAX_RETRY_AFTER}]",
            field="retry_after",
        )
    return Ack(message_id, status, reason, None if retry_after is None else float(retry_after))


def idempotency_mismatch(key: str) -> Problem:
    """422: the key was already used for a different report (resource, kind or payload)."""
    return Problem(
        422,
        "idempotency-mismatch",
        "Idempotency key reused",
        f"key {key!r} was used for a different report",
        {"reason": "idempotency_mismatch"},
    )


def invalid(detail: str, *, field: str | None = None) -> Problem:
    """A 422 problem for a well-formed body with an invalid field."""
    extra = {"field": field} if field else {}
    return Problem(422, "invalid-field", "Invalid field", detail, extra)


def invalid_query(name: str, detail: str) -> Problem:
    """A 422 problem for a query parameter or header the route cannot use."""
    return Problem(422, "invalid-query", f"Invalid {name}", detail, {"parameter": name})


def empty_batch() -> Problem:
    """A 400 problem for a batch body with no report line (nothing to answer line by line)."""
    return Problem(400, "empty-batch", "Empty batch", "the body holds no NDJSON report line")


def parse_bounded_int(raw: str, low: int, high: int) -> int | None:
    """The one parser for integers in query parameters and headers (``after``, ``limit``,
    ``Last-Event-ID``): ASCII digits only (no sign, space or other Unicode digit), at most as
    many as ``high`` has (bounded *before* ``int()``), value in ``[low, high]``; else ``None``.
    """
    if not 0 < len(raw) <= len(str(high)) or not raw.isascii() or not raw.isdigit():
        return None
    value = int(raw)
    return value if low <= value <= high else None


def malformed(detail: str) -> Problem:
    """A 400 problem for a body that is not parseable JSON."""
    return Problem(400, "malformed-json", "Malformed JSON", detail)


def too_large(limit: int) -> Problem:
    """A 413 problem for a body or frame over ``limit`` bytes."""
    return Problem(413, "too-large", "Payload too large", f"limit is {limit} bytes")


class Admitter(Protocol):
    """The one admission path every front door (HTTP, batch, stream) feeds.

    ``admit`` validates a decoded JSON value, applies the rate limit and queues an
    admitted report for sending. It is synchronous: it never blocks and never awaits,
    so no front door can hold shared state across a checkpoint. It never raises for
    bad input: it returns a :class:`Problem` instead.
    """

    def admit(self, obj: object) -> Accepted | Problem: ...

    def batch(self) -> AbstractContextManager[None]:
        """A block whose admissions are stored together (one store call for a whole read
        or batch request); enter it around a synchronous run of ``admit`` calls."""
        ...

    async def durable(self) -> None:
        """Wait until everything admitted so far is stored (await before any 2xx reply)."""


def reply_for(result: Accepted | Problem) -> dict[str, Any]:
    """The JSON reply object for one admission result (same shape as the HTTP body)."""
    if isinstance(result, Accepted):
        if result.replayed:
            return {"message_id": result.message_id, "replayed": True}
        return {"message_id": result.message_id}
    return result.to_dict()
