"""Dead-letter redrive: send dead letters again, keeping their message ids.

A redriven message starts a fresh attempt count and age and goes through delivery like a
new one. It is skipped as ``superseded`` when the upstream has since acknowledged a newer
message of its resource (unless ``force``), and as ``pending`` while its resource has a
message in flight (that message carries the latest payload already). Every redrive is
committed before the answer and published as a ``deadletter`` event (``redriven``).
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Mapping
from typing import Any

import attrs
import orjson
import trio

from ..core import event_schemas as ev
from ..core.resources import ResourceTable
from ..stores.base import Changes, DeadLetterQuery, Store
from .delivery import Delivery, message_record
from .publisher import EventPublisher


@attrs.frozen
class RedriveRequest:
    """Which dead letters to redrive (a filter or message ids, at most ``query.limit``)."""

    query: DeadLetterQuery
    dry_run: bool = False
    force: bool = False


async def redrive(
    request: RedriveRequest,
    store: Store,
    delivery: Delivery,
    resources: ResourceTable,
    events: EventPublisher,
) -> dict[str, Any]:
    """Redrive the matching dead letters; returns ``{matched, redriven, skipped, ...}``.

    With ``dry_run`` nothing changes and ``redriven`` counts what would be. Waits for the
    store to commit the redrive (a checkpoint); raises ``StoreError`` if it cannot.
    """
    page = await store.query_dead_letters(request.query)
    now = trio.current_time()
    offset = delivery.wall_clock() - now
    skipped: Counter[str] = Counter()
    redriven: list[str] = []
    changes = Changes()
    for dead in page.items:
        state = resources.get(dead.resource_id)
        if delivery.umh.pending_for(dead.resource_id) is not None:
            skipped["pending"] += 1
            continue
        if state is not None and state.acked_seq > dead.seq and not request.force:
            skipped["superseded"] += 1
            continue
        redriven.append(dead.message_id)
        if request.dry_run:
            continue
        if state is None:
            state = resources.touch(dead.resource_id, now)
        state.seq = max(state.seq, dead.seq)
        delivery.readmit(
            dead.message_id,
            state,
            kind=dead.kind,
            payload=orjson.loads(dead.payload or b"null"),
            admitted_at=now,
            now=now,
        )
        changes.delete_dead_letters([dead.message_id])
        changes.put_message(
            message_record(
                dead.message_id,
                state,
                kind=dead.kind,
                payload_json=dead.payload,
                admitted_at=now + offset,
                upstream=dead.upstream,
            )._replace(seq=dead.seq)
        )
        events.emit(ev.redriven(dead.message_id, dead.resource_id, dead.reason))
    if changes:
        await store.durable(store.stage(changes))
    return redrive_answer(len(page.items), redriven, skipped, dry_run=request.dry_run)


def redrive_answer(
    matched: int, redriven: list[str], skipped: Mapping[str, int], *, dry_run: bool
) -> dict[str, Any]:
    """The ``POST /v1/deadletters:redrive`` answer (the same on a node and in a cluster)."""
    return {
        "matched": matched,
        "redriven": len(redriven),
        "skipped": sum(skipped.values()),
        "skipped_by_reason": dict(skipped),
        "message_ids": redriven,
        "dry_run": dry_run,
    }
