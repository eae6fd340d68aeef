"""Every event's payload, defined once: the schema, the constructors, the validator.

Publishers build a payload only through the constructors below (``reports.admitted(...)``
and so on), each returning an :class:`EventData` (topic + data) for
:meth:`~relay_trio.services.publisher.EventPublisher.emit`. :data:`SCHEMAS` describes
every payload (topic, discriminator value, fields and their meaning); docs/events.md is
generated from it (``docs/gen_events.py``) and :func:`validate` checks a published
payload against it (the tests validate every event a run of the relay publishes).

Within a topic, the ``system`` payloads are told apart by ``kind`` and the ``deadletter``
payloads by ``action``; ``reports``, ``acks`` and ``drops`` have one shape each. Reasons
are snake_case tokens, the same as metric labels and problem ``reason`` members.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, Final, NamedTuple

import attrs

from .model import new_tuple

#: JSON types a field may have, by name as shown in docs/events.md.
_TYPES: Final[dict[str, tuple[type, ...]]] = {
    "string": (str,),
    "integer": (int,),
    "number": (int, float),
    "boolean": (bool,),
    "string or null": (str, type(None)),
}


class EventData(NamedTuple):
    """One payload ready to publish: the topic and the event's ``data`` object."""

    topic: str
    data: dict[str, Any]


@attrs.frozen
class Field:
    """One member of a payload: its JSON type, meaning, and whether it is always there."""

    name: str
    type: str
    meaning: str
    optional: bool = False


@attrs.frozen
class EventSchema:
    """The payload of one event: ``topic``; within it the value of ``discriminator``
    (``kind`` or ``action``) this schema covers, if the topic has several shapes."""

    topic: str
    doc: str
    fields: tuple[Field, ...]
    discriminator: str | None = None
    value: str | None = None

    @property
    def key(self) -> tuple[str, str | None]:
        return (self.topic, self.value)


_MESSAGE_ID = Field("message_id", "string", "`<resource_id>:<seq>`")
_RESOURCE_ID = Field("resource_id", "string", "the resource the report is about")
_UPSTREAM = Field("upstream", "string", "the upstream's URL")


def _kind(value: str) -> Field:
    return Field("kind", "string", f"always `{value}`")


def _action(value: str) -> Field:
    return Field("action", "string", f"always `{value}`")


SCHEMAS: Final[tuple[EventSchema, ...]] = (
    EventSchema(
        "reports",
        "A report was admitted (any front door) and handed to delivery.",
        (
            _MESSAGE_ID,
            _RESOURCE_ID,
            Field("kind", "string or null", "the report's `kind`, or null"),
            Field(
                "superseded",
                "string",
                "the pending message of the same resource this one replaced",
                optional=True,
            ),
        ),
    ),
    EventSchema(
        "drops",
        "A report was refused by the limiter (429).",
        (_RESOURCE_ID, Field("reason", "string", "`rate_limited` or `stale_ack`")),
    ),
    EventSchema(
        "acks",
        "An ACK or NACK arrived (`POST /v1/acks`, or an upstream's synchronous `ack: true`).",
        (
            Field("message_id", "string", "the id the ACK names (as sent; may be unknown)"),
            Field("status", "string", "`ack` or `nack`"),
            Field("outcome", "string", "`acked`, `nacked`, `dead`, `late` or `unknown`"),
            Field("synchronous", "boolean", "true when the upstream acknowledged in its answer"),
            Field("reason", "string", "the NACK's reason, when it gave one", optional=True),
        ),
    ),
    EventSchema(
        "deadletter",
        "A message was dead-lettered (kept in the store, see `GET /v1/deadletters`).",
        (
            _action("dead"),
            _MESSAGE_ID,
            _RESOURCE_ID,
            Field("reason", "string", "`max_attempts`, `max_age`, `evicted` or `shutdown`"),
            Field("attempts", "integer", "delivery attempts made"),
        ),
        "action",
        "dead",
    ),
    EventSchema(
        "deadletter",
        "A dead letter was redriven (`POST /v1/deadletters:redrive`) and is pending again.",
        (
            _action("redriven"),
            _MESSAGE_ID,
            _RESOURCE_ID,
            Field("reason", "string", "why it had been dead-lettered"),
        ),
        "action",
        "redriven",
    ),
    EventSchema(
        "system",
        "Every service has started; the relay is ready.",
        (_kind("started"), Field("recovered", "integer", "pending messages recovered")),
        "kind",
        "started",
    ),
    EventSchema(
        "system",
        "Shutdown began: no more admissions.",
        (_kind("draining"), Field("flush", "string", "`shutdown_flush`: none/parallel/sequential")),
        "kind",
        "draining",
    ),
    EventSchema(
        "system",
        "Pending messages are being delivered at shutdown, bypassing backoff.",
        (
            _kind("flush"),
            Field("mode", "string", "`sequential` or `parallel`"),
            Field("messages", "integer", "messages in the flush"),
        ),
        "kind",
        "flush",
    ),
    EventSchema(
        "system",
        "An upstream was marked down after repeated failures.",
        (_kind("upstream_down"), _UPSTREAM),
        "kind",
        "upstream_down",
    ),
    EventSchema(
        "system",
        "An upstream marked down answered again and is back in use.",
        (_kind("upstream_up"), _UPSTREAM),
        "kind",
        "upstream_up",
    ),
    EventSchema(
        "system",
        "Cluster mode: this instance lost its NATS connection (503 until it is back).",
        (_kind("nats_disconnected"), Field("instance", "string", "the `instance_id`")),
        "kind",
        "nats_disconnected",
    ),
    EventSchema(
        "system",
        "Cluster mode: this instance is connected to NATS again.",
        (_kind("nats_connected"), Field("instance", "string", "the `instance_id`")),
        "kind",
        "nats_connected",
    ),
    EventSchema(
        "system",
        "Cluster mode: this instance's event outbox overflowed while NATS was unreachable; "
        "that many of its oldest unpublished events were dropped (published first once "
        "NATS is back, before the events it kept).",
        (
            _kind("events_lost"),
            Field("instance", "string", "the `instance_id` whose events were lost"),
            Field("lost", "integer", "events dropped since the last such event"),
        ),
        "kind",
        "events_lost",
    ),
    EventSchema(
        "system",
        "The last event: every SSE stream ends with it (SSE event name `shutdown`).",
        (_kind("shutdown"), Field("reason", "string", "why (signal name, `admin`, `test`...)")),
        "kind",
        "shutdown",
    ),
)

#: Sent on one SSE stream only, never in the log: the subscriber fell behind and is cut.
OVERFLOW: Final = EventSchema(
    "overflow",
    "SSE event `overflow`, last on a stream that fell `buffer` events behind (not in the log).",
    (
        Field("reason", "string", "always `slow_subscriber`"),
        Field("buffer", "integer", "the subscriber buffer (`subscriber_buffer`) it overran"),
        Field("last_id", "integer", "the id of the last event it was sent"),
    ),
)

_BY_KEY: Final = {schema.key: schema for schema in SCHEMAS}
_DISCRIMINATORS: Final = {s.topic: s.discriminator for s in SCHEMAS}


def schema_for(topic: str, data: Mapping[str, Any]) -> EventSchema | None:
    """The schema a payload claims (by topic and discriminator), or None."""
    if topic not in _DISCRIMINATORS:
        return None
    field = _DISCRIMINATORS[topic]
    value = data.get(field) if field is not None else None
    return _BY_KEY.get((topic, value if isinstance(value, str) else None))


def validate(topic: str, data: Mapping[str, Any], schema: EventSchema | None = None) -> list[str]:
    """What is wrong with ``data`` as a ``topic`` payload (empty when it conforms): an
    unknown shape, a missing or extra member, a member of the wrong JSON type."""
    schema = schema or schema_for(topic, data)
    if schema is None:
        return [f"no schema for topic {topic!r} with {dict(data)!r}"]
    errors = []
    known = {f.name for f in schema.fields}
    errors += [f"{topic}: unexpected member {name!r}" for name in data if name not in known]
    for f in schema.fields:
        if f.name not in data:
            if not f.optional:
                errors.append(f"{topic}: missing {f.name!r}")
            continue
        value = data[f.name]
        types = _TYPES[f.type]
        if isinstance(value, bool) and bool not in types:
            errors.append(f"{topic}: {f.name!r} is a boolean, not {f.type}")
        elif not isinstance(value, types):
            errors.append(f"{topic}: {f.name!r} is {type(value).__name__}, not {f.type}")
    return errors


# -- constructors: the only way publishers build a payload ---------------------------------


def report_admitted(
    message_id: str, resource_id: str, kind: str | None, superseded: str | None
) -> EventData:
    """``reports``: one admitted report."""
    data: dict[str, Any] = {"message_id": message_id, "resource_id": resource_id, "kind": kind}
    if superseded is not None:
        data["superseded"] = superseded
    return new_tuple(EventData, ("reports", data))  # one per admitted report


def report_dropped(resource_id: str, reason: str) -> EventData:
    """``drops``: a report the limiter refused."""
    return EventData("drops", {"resource_id": resource_id, "reason": reason})


def ack_received(
    message_id: str, status: str, outcome: str, synchronous: bool, reason: str | None
) -> EventData:
    """``acks``: one ACK or NACK and what it did."""
    data: dict[str, Any] = {
        "message_id": message_id,
        "status": status,
        "outcome": outcome,
        "synchronous": synchronous,
    }
    if reason:
        data["reason"] = reason
    return new_tuple(EventData, ("acks", data))  # one per ACK


def dead_lettered(message_id: str, resource_id: str, reason: str, attempts: int) -> EventData:
    """``deadletter`` ``dead``."""
    return EventData(
        "deadletter",
        {
            "action": "dead",
            "message_id": message_id,
            "resource_id": resource_id,
            "reason": reason,
            "attempts": attempts,
        },
    )


def redriven(message_id: str, resource_id: str, reason: str) -> EventData:
    """``deadletter`` ``redriven``."""
    return EventData(
        "deadletter",
        {
            "action": "redriven",
            "message_id": message_id,
            "resource_id": resource_id,
            "reason": reason,
        },
    )


def started(recovered: int) -> EventData:
    """``system`` ``started``."""
    return EventData("system", {"kind": "started", "recovered": recovered})


def draining(flush: str) -> EventData:
    """``system`` ``draining``."""
    return EventData("system", {"kind": "draining", "flush": flush})


def flushing(mode: str, messages: int) -> EventData:
    """``system`` ``flush``."""
    return EventData("system", {"kind": "flush", "mode": mode, "messages": messages})


def upstream_down(upstream: str) -> EventData:
    """``system`` ``upstream_down``."""
    return EventData("system", {"kind": "upstream_down", "upstream": upstream})


def upstream_up(upstream: str) -> EventData:
    """``system`` ``upstream_up``."""
    return EventData("system", {"kind": "upstream_up", "upstream": upstream})


def nats_connection(up: bool, instance: str) -> EventData:
    """``system`` ``nats_connected`` / ``nats_disconnected`` (cluster mode)."""
    kind = "nats_connected" if up else "nats_disconnected"
    return EventData("system", {"kind": kind, "instance": instance})


def events_lost(instance: str, lost: int) -> EventData:
    """``system`` ``events_lost`` (cluster mode: the event outbox overflowed)."""
    return EventData("system", {"kind": "events_lost", "instance": instance, "lost": lost})


def shutdown(reason: str) -> EventData:
    """``system`` ``shutdown`` (published by the hub as it closes every stream)."""
    return EventData("system", {"kind": "shutdown", "reason": reason})


def overflow(buffer: int, last_id: int) -> dict[str, Any]:
    """The SSE-only ``overflow`` frame's data (see :data:`OVERFLOW`)."""
    return {"reason": "slow_subscriber", "buffer": buffer, "last_id": last_id}
