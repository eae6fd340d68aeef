"""Dead letters: recorded in the store with payload and history, queried by filter.

A dead letter is a message the relay gave up on (attempts or age exhausted, evicted, or
abandoned at the shutdown of a memory store). :class:`DeadLetterBook` records one in a single
synchronous step: the store row (payload, attempts, upstream; the pending row is removed in
the same change set), the metric, the ``deadletter`` event and one log line. Queries read the
store, so the API shows dead letters of earlier runs too.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any

import attrs
import orjson

from ..core import event_schemas as ev
from ..core.ids import MessageId
from ..core.umh import DeadLetter
from ..core.views import rfc3339
from ..metrics import RelayMetrics
from ..stores.base import AttemptRecord, Changes, DeadLetterPage, DeadLetterRecord, Store
from .publisher import EventPublisher

log = logging.getLogger("relay_trio")


def record_view(record: DeadLetterRecord) -> dict[str, Any]:
    """A stored dead letter as JSON (times in RFC 3339, payload decoded)."""
    return {
        "index": record.index,
        "message_id": record.message_id,
        "resource_id": record.resource_id,
        "kind": record.kind,
        "reason": record.reason,
        "upstream": record.upstream,
        "admitted_at": rfc3339(record.admitted_at),
        "dead_at": rfc3339(record.dead_at),
        "attempts": [
            {"at": rfc3339(a.at), "outcome": a.outcome, "detail": a.detail} for a in record.attempts
        ],
        "payload": orjson.loads(record.payload) if record.payload else None,
    }


def page_view(page: DeadLetterPage, pruned: int) -> dict[str, Any]:
    """``GET /v1/deadletters`` body: the page, the cursor for the next one, the pruned count."""
    return {
        "dead_letters": [record_view(r) for r in page.items],
        "next_cursor": page.next_cursor,
        "pruned": pruned,
    }


@attrs.define(eq=False)
class DeadLetterBook:
    """Records dead letters in the store and tells operators (metric, event, log)."""

    store: Store
    events: EventPublisher
    metrics: RelayMetrics
    wall_clock: Callable[[], float]

    def record(
        self, dead: DeadLetter, kind: str | None, payload: bytes, upstream: str, now: float
    ) -> None:
        """Stage the dead letter (and the removal of its pending row). Never blocks."""
        offset = self.wall_clock() - now
        changes = Changes()
        changes.dead_letter(
            DeadLetterRecord(
                index=0,
                message_id=dead.message_id,
                resource_id=dead.resource_id,
                seq=MessageId.of(dead.message_id).seq,
                kind=kind,
                payload=payload,
                reason=dead.reason,
                upstream=upstream,
                admitted_at=dead.admitted_at + offset,
                dead_at=dead.dead_at + offset,
                attempts=tuple(
                    AttemptRecord(a.at + offset, a.outcome, a.detail) for a in dead.attempts
                ),
            )
        )
        self.store.stage(changes)
        reason = dead.reason if dead.reason in self.metrics.dead_letters else "max_attempts"
        self.metrics.dead_letters[reason].inc()
        log.warning(
            "dead letter %s (%s)",
            dead.message_id,
            dead.reason,
            extra={"message_id": dead.message_id, "resource_id": dead.resource_id},
        )
        self.events.emit(
            ev.dead_lettered(dead.message_id, dead.resource_id, dead.reason, len(dead.attempts))
        )
