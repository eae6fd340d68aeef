"""One event log across instances: the cluster's event publisher, outbox and mirror.

In cluster mode an event is not numbered by the instance that produces it. The
:class:`ClusterEventPublisher` encodes it once (with the producing ``instance``) into the
bounded :class:`EventOutbox` and returns: admission never waits for NATS. One task
publishes the outbox in pipelined batches to the ``RELAY_EVENTS`` stream, whose sequence
becomes the event id. Every instance (the producer included) runs one ordered consumer over
the stream and appends what it delivers to its local ring, so every ring holds the same
ids and bytes; paging and SSE fan-out stay local. Ids older than the ring are read from the
stream (:meth:`ClusterEventLog.page`, the hub's ``older`` port).

While NATS is unreachable the outbox keeps this instance's events in order; if it
overflows, the oldest are dropped, counted (``relay_cluster_events_lost_total``) and
reported by a ``system`` ``events_lost`` event published ahead of the kept ones.
"""

from __future__ import annotations

import logging
import os
import time
from collections import deque
from collections.abc import Callable, Mapping
from typing import Any, Final

import attrs
import trio
import trio_util

from ..core import event_schemas as ev
from ..core.event_schemas import EventData
from ..core.events import TOPICS, Event, Page, envelope, mirrored
from ..core.views import rfc3339
from ..services.hub import EventHub, HistoryUnavailable
from ..services.publisher import EventPublisher
from .bridge import AsyncioThread
from .names import event_subject
from .node import ClusterUnavailable

log = logging.getLogger("relay_trio")

#: Events published per bridged call (pipelined: one acknowledgement wait per batch).
PUBLISH_BATCH: Final = 256
#: Seconds the publishing task lets events accumulate after the first one arrives (a
#: batch that fills goes at once): one bridged call per burst instead of one per event.
PUBLISH_LINGER: Final = 0.005
#: Seconds before a failed batch is tried again (the connection is usually being restored).
RETRY_DELAY: Final = 0.25
#: Seconds the mirror may take to reach the stream's end at start before the relay is
#: declared ready anyway (SSE clients then see the rest arrive as live events).
CATCH_UP: Final = 10.0
#: Mirrored events appended to the ring between two checkpoints.
MIRROR_SLICE: Final = 1000

_Item = tuple[str, str, bytes]


@attrs.define(eq=False)
class EventOutbox:
    """This instance's events not yet stored in the stream, oldest first; at most
    ``capacity`` (then the oldest is dropped and counted). Sans-I/O but for one
    ``trio.Event`` that tells the publishing task there is work."""

    capacity: int
    #: ``Nats-Msg-Id`` prefix: unique per process, so ids never repeat across restarts.
    prefix: str
    items: deque[_Item] = attrs.field(init=False, factory=deque)
    lost: int = attrs.field(init=False, default=0)
    #: Lost events not yet reported by an ``events_lost`` event.
    unreported: int = attrs.field(init=False, default=0)
    _count: int = attrs.field(init=False, default=0)
    _ready: trio.Event = attrs.field(init=False, factory=trio.Event)

    def put(self, subject: str, body: bytes) -> None:
        """Queue one encoded event. Never blocks."""
        self._count += 1
        items = self.items
        items.append((f"{self.prefix}-{self._count}", subject, body))
        if len(items) > self.capacity:
            items.popleft()
            self.lost += 1
            self.unreported += 1
        elif len(items) == 1:
            self._ready.set()

    def take(self, n: int) -> list[_Item]:
        """Remove and return up to ``n`` of the oldest items (give back with :meth:`restore`)."""
        items = self.items
        return [items.popleft() for _ in range(min(n, len(items)))]

    def restore(self, rest: list[_Item]) -> None:
        """Put items that were taken but not stored back in front, in order, then drop
        the oldest beyond ``capacity``."""
        self.items.extendleft(reversed(rest))
        while len(self.items) > self.capacity:
            self.items.popleft()
            self.lost += 1
            self.unreported += 1

    async def wait(self) -> None:
        """Return once there is an item (a checkpoint)."""
        while not self.items:
            self._ready = trio.Event()
            await self._ready.wait()
        await trio.lowlevel.checkpoint()


@attrs.define(eq=False)
class ClusterEventPublisher(EventPublisher):
    """The :class:`EventPublisher` of cluster mode: events go to the outbox, not the ring.

    The single-node publisher is untouched (no branch on its path); ids come from the
    stream, so nothing is reserved in the store. Both entry points (``emit`` and
    ``publish``) are overridden: the single-node ``emit`` may not go through ``publish``.
    """

    outbox: EventOutbox = attrs.field(kw_only=True)
    instance_id: str = attrs.field(kw_only=True)

    def resume(self, reserved: int) -> None:
        """Nothing to resume: the event stream numbers the events."""

    def emit(self, event: EventData) -> None:
        """:meth:`publish` a constructor's payload (never blocks)."""
        self.publish(event.topic, event.data)

    def publish(self, topic: str, data: Mapping[str, Any]) -> None:
        """Encode one event with this instance's id and queue it for the stream.

        Never blocks; raises ``ValueError`` for an unknown topic before queueing."""
        body = envelope(topic, rfc3339(self.wall_clock()), self.instance_id, data)
        self.outbox.put(event_subject(topic), body)
        self.metrics.events_published.inc()


def outbox_prefix(instance_id: str) -> str:
    """A message-id prefix unique to this process: instance, pid and start time."""
    return f"{instance_id}-{os.getpid()}-{time.time_ns():x}"


@attrs.define(eq=False)
class ClusterEventLog:
    """Publishes the outbox, mirrors the stream into the hub's ring, reads older ids.

    Start with ``await nursery.start(log.run, bridge, link, connected)`` once the NATS
    link (:class:`~relay_trio.cluster.link.NatsLink`) is connected; it is the hub's ``older`` port (:class:`~relay_trio.services.hub.OlderEvents`).
    """

    hub: EventHub
    outbox: EventOutbox
    instance_id: str
    wall_clock: Callable[[], float]
    published: int = attrs.field(init=False, default=0)
    mirrored: int = attrs.field(init=False, default=0)
    _bridge: AsyncioThread | None = attrs.field(init=False, default=None)
    _link: Any = attrs.field(init=False, default=None)
    _connected: trio_util.AsyncBool | None = attrs.field(init=False, default=None)
    _arrived: trio.Event = attrs.field(init=False, factory=trio.Event)
    _in_flight: int = attrs.field(init=False, default=0)
    _settled: trio.Event = attrs.field(init=False, factory=trio.Event)

    async def run(
        self,
        bridge: AsyncioThread,
        nats: Any,
        connected: trio_util.AsyncBool,
        *,
        task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED,
    ) -> None:
        """Mirror the stream and publish the outbox until cancelled.

        Reports started once the mirror has reached the stream's end as it was at start
        (at most :data:`CATCH_UP` seconds), so a ready instance pages the same ids as the
        others. Raises :class:`~relay_trio.cluster.node.ClusterUnavailable` (one line) if
        the mirror cannot be started (NATS gone since connecting).
        """
        from .eventlink import EventLink

        self._bridge = bridge
        self._connected = connected
        link = EventLink(nats.nc, nats.js, lambda: bridge.to_trio(self._wake_mirror))
        try:
            async with trio.open_nursery() as nursery:
                nursery.start_soon(self._mirror, link)
                try:
                    last = await bridge.call(link.follow)
                except Exception as exc:
                    raise ClusterUnavailable(
                        f"cannot follow the event stream: {type(exc).__name__} {exc}".strip()
                    ) from None
                self._link = link
                if not await self.hub.wait_for(last, CATCH_UP):
                    log.warning(
                        "event mirror at id %d of %d after %.0f s: serving anyway",
                        self.hub.ring.last_id,
                        last,
                        CATCH_UP,
                    )
                nursery.start_soon(self._publish, link, bridge, connected)
                nursery.start_soon(self._refollow, link, bridge, connected)
                task_status.started()
        finally:
            self._link = None
            with trio.CancelScope(shield=True), trio.move_on_after(1):
                try:
                    await bridge.call(link.stop)
                except Exception:  # closing on a dead connection: nothing to save
                    log.debug("stopping the event mirror failed", exc_info=True)

    # -- the mirror ----------------------------------------------------------------------

    def _wake_mirror(self) -> None:  # on the Trio thread, from the loop thread
        self._arrived.set()

    async def _mirror(self, link: Any) -> None:
        arrived = link.arrived
        hub = self.hub
        while True:
            await self._arrived.wait()
            self._arrived = trio.Event()
            n = 0
            while arrived:
                seq, topic, body = arrived.popleft()
                try:
                    hub.publish_event(mirrored(seq, topic, body))
                except ValueError:
                    log.warning("event %d has unknown topic %r: not mirrored", seq, topic)
                n += 1
                if n % MIRROR_SLICE == 0:
                    await trio.lowlevel.checkpoint()
            self.mirrored += n

    async def _refollow(
        self, link: Any, bridge: AsyncioThread, connected: trio_util.AsyncBool
    ) -> None:
        # After a reconnect the mirror's consumer may be gone (a restarted server keeps
        # the stream, not an in-memory consumer): start a new one where the mirror is.
        while True:
            await connected.wait_value(False)
            await connected.wait_value(True)
            while connected.value:
                try:
                    await bridge.call(link.follow)
                except Exception as exc:
                    log.debug("restarting the event mirror failed: %s", exc)
                    await trio.sleep(RETRY_DELAY)
                else:
                    break

    # -- publishing ----------------------------------------------------------------------

    async def _publish(
        self, link: Any, bridge: AsyncioThread, connected: trio_util.AsyncBool
    ) -> None:
        outbox = self.outbox
        while True:
            await outbox.wait()
            if not connected.value:
                await connected.wait_value(True)
                continue
            if len(outbox.items) < PUBLISH_BATCH:
                await trio.sleep(PUBLISH_LINGER)
            batch = outbox.take(PUBLISH_BATCH)
            reported = outbox.unreported
            if reported:
                # Ahead of the kept events: where the lost ones would have been.
                body = envelope(
                    "system",
                    rfc3339(self.wall_clock()),
                    self.instance_id,
                    ev.events_lost(self.instance_id, reported).data,
                )
                marker = (f"{outbox.prefix}-lost-{outbox.lost}", event_subject("system"), body)
                batch.insert(0, marker)
            self._in_flight = len(batch)
            try:
                done = await bridge.call(link.publish, batch)
            except Exception as exc:
                log.debug("event publish failed: %s", exc)
                done = 0
            finally:
                self._in_flight = 0
            if reported and done:
                outbox.unreported -= reported
                batch.pop(0)
                done -= 1
            elif reported:
                batch.pop(0)
            self.published += done
            outbox.restore(batch[done:])
            self._settled.set()
            self._settled = trio.Event()
            if outbox.items and done == 0:
                await trio.sleep(RETRY_DELAY)

    async def flush(self) -> None:
        """Wait until every queued event is stored, or the connection is lost (nothing more
        can be stored then: the outbox is lost with the process). The caller bounds it.
        A checkpoint."""
        connected = self._connected
        while (self.outbox.items or self._in_flight) and connected and connected.value:
            with trio.move_on_after(RETRY_DELAY):
                await self._settled.wait()
        await trio.lowlevel.checkpoint()

    # -- older events ----------------------------------------------------------------------

    async def page(self, after: int, limit: int, topic: str | None, before: int) -> Page:
        """Events with ``after < id < before`` read from the stream (the hub's ``older``).

        Raises :class:`HistoryUnavailable` without a NATS connection or if the read fails.
        """
        link, bridge = self._link, self._bridge
        if link is None or bridge is None or not (self._connected and self._connected.value):
            raise HistoryUnavailable("no NATS connection")
        try:
            stored, next_after, gap = await bridge.call(link.history, after, before, limit, topic)
        except Exception as exc:
            raise HistoryUnavailable(f"reading the event stream: {type(exc).__name__}") from None
        events: list[Event] = []
        for seq, t, body in stored:
            if t in TOPICS:  # anything else was published by hand: not an event
                events.append(mirrored(seq, t, body))
        return Page(events, next_after, gap)

    def status(self) -> dict[str, Any]:
        """The ``cluster.events`` section of ``/v1/status``."""
        return {
            "outbox": len(self.outbox.items) + self._in_flight,
            "published": self.published,
            "lost": self.outbox.lost,
            "mirrored": self.mirrored,
            "last_id": self.hub.ring.last_id,
        }
