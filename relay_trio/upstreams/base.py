"""The upstream port: what one send is (:class:`Outbound`), how it ended (:class:`SendResult`)
and what every upstream client implements (:class:`Upstream`).

An upstream makes exactly one attempt per message under the deadline it is given and never
retries on its own (seed 000): delivery hands a failure to the unconfirmed-message handler.
"""

from __future__ import annotations

import enum
from collections.abc import Sequence
from typing import Any, Final, NamedTuple, Protocol

import attrs

from ..core.webhooks import TraceContext


class Outbound(NamedTuple):
    """One send: the message, the payload to deliver and which attempt this is.

    A named tuple: one is built per admitted report and per retry."""

    message_id: str
    resource_id: str
    kind: str | None
    payload: Any
    attempt: int
    upstream: int
    #: The message's trace (``traceparent`` of every attempt); ``None`` starts a new one.
    trace: TraceContext | None = None

    def body(self) -> dict[str, Any]:
        """The JSON object the upstream receives."""
        return {
            "message_id": self.message_id,
            "resource_id": self.resource_id,
            "kind": self.kind,
            "payload": self.payload,
            "attempt": self.attempt,
        }


class SendStatus(enum.Enum):
    """How one attempt ended."""

    ACKED = "acked"  # upstream acknowledged synchronously
    SENT = "sent"  # upstream accepted it; the ACK comes later via POST /v1/acks
    FAILED = "failed"  # error status, network error or deadline


@attrs.frozen
class SendResult:
    """The outcome of one attempt, with a short reason when it failed.

    ``retry_after`` (seconds, from an upstream's ``Retry-After`` on a 429 or 503) asks
    that the next attempt wait at least that long; ``None`` means normal backoff.
    """

    status: SendStatus
    detail: str = ""
    retry_after: float | None = None


class Upstream(Protocol):
    """Where reports go. ``send_batch`` makes one attempt per message."""

    url: str

    async def send_batch(
        self, batch: Sequence[Outbound], attempt_deadline: float
    ) -> list[SendResult]:
        """Deliver each message once, each attempt within ``attempt_deadline`` seconds.

        Returns one result per message, in order. Raises nothing for delivery failures:
        a deadline miss is a ``FAILED`` result with detail ``send_timeout``.
        """
        ...

    async def probe(self) -> bool:
        """One health probe of a down upstream; True when it answered. Caller bounds it."""
        ...

    async def aclose(self) -> None: ...


#: The result of an attempt the upstream acknowledged synchronously (shared: immutable).
ACKED: Final = SendResult(SendStatus.ACKED)
#: The result of an attempt cut by ``send_timeout`` (shared: immutable).
TIMED_OUT: Final = SendResult(SendStatus.FAILED, "send_timeout")
