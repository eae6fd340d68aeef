"""Publishing events: one place that stamps, counts and keeps event ids moving forward.

Event ids must never go backwards across restarts (an SSE client resuming with
``Last-Event-ID`` would silently miss everything). Persisting the id of every event would
cost a store write per event, so ids are *reserved* in blocks: the store holds
``event_id_reserved``, an id no event has reached; when the ring's next id gets within half
a block of it, the next block is reserved (staged, fire and forget). A restart continues
after the reserved id, so ids skip at most one block and never repeat.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from typing import Any, Final

import attrs

from ..core.event_schemas import EventData
from ..core.views import rfc3339
from ..metrics import RelayMetrics
from ..stores.base import Changes, Store
from .hub import EventHub

#: Event ids reserved per store write.
EVENT_ID_BLOCK: Final = 10_000
META_EVENT_ID: Final = "event_id_reserved"


@attrs.define(eq=False)
class EventPublisher:
    """Publishes events to the hub (never blocks) and reserves event ids in the store."""

    hub: EventHub
    store: Store
    metrics: RelayMetrics
    wall_clock: Callable[[], float]
    reserved: int = 0
    #: Events emitted inside :meth:`batch`, published together when it ends.
    _batched: list[EventData] | None = attrs.field(default=None, init=False)

    def resume(self, reserved: int) -> None:
        """Continue ids after ``reserved`` (from the store at start) and reserve a block."""
        self.hub.ring.continue_after(reserved)
        self.reserved = reserved
        self._reserve()

    def _reserve(self) -> None:
        self.reserved = self.hub.ring.last_id + EVENT_ID_BLOCK
        self._stage_reserved()

    def _stage_reserved(self) -> None:
        changes = Changes()
        changes.set_meta(META_EVENT_ID, self.reserved)
        self.store.stage(changes)

    def emit(self, event: EventData) -> None:
        """Publish one payload built by a constructor of :mod:`relay_trio.core.event_schemas`
        (never blocks; the ring rejects an unknown topic). The one publishing path: two
        events per report come through here. Inside :meth:`batch` the event is published
        when the batch ends, in order with the others."""
        batched = self._batched
        if batched is not None:
            batched.append(event)
            return
        published = self.hub.publish(event.topic, event.data, rfc3339(self.wall_clock()))
        self.metrics.events_published.inc()
        if published.id > self.reserved - EVENT_ID_BLOCK // 2:
            self._reserve()

    @contextmanager
    def batch(self) -> Iterator[None]:
        """Publish every event emitted inside the block together when it ends (same ids,
        same order, one timestamp): a batch request's or a send batch's events cost a
        fraction of publishing each alone. For a synchronous block (no checkpoint inside:
        nobody may look for these events before they are published). Nested blocks publish
        with the outermost."""
        if self._batched is not None:
            yield
            return
        self._batched = []
        try:
            yield
        finally:
            events, self._batched = self._batched, None
            if events:
                self._publish_batch(events)

    def _publish_batch(self, events: list[EventData]) -> None:
        if self.hub.ring.last_id + len(events) > self.reserved - EVENT_ID_BLOCK // 2:
            # Reserve before the ids are used, whatever the batch's size.
            self.reserved = self.hub.ring.last_id + len(events) + EVENT_ID_BLOCK
            self._stage_reserved()
        self.hub.publish_many(events, rfc3339(self.wall_clock()))
        self.metrics.events_published.inc(len(events))

    def publish(self, topic: str, data: Mapping[str, Any]) -> None:
        """Publish an arbitrary payload (tests, benchmarks): :meth:`emit` it."""
        self.emit(EventData(topic, dict(data)))
