"""The event hub: Trio fan-out of the event ring to SSE subscribers.

Shape: ``publish()`` is synchronous (ring append + pending batch); one flusher task
(``run``) delivers batches with a leading-edge throttle: the first event on a quiet hub
is delivered at once, later events accumulate for ``coalesce_interval`` and go out as
one joined byte chunk per subscriber. On this stack each SSE write dominates the cost,
so writes per subscriber, not events, are what we minimise. Each batch's pre-encoded
SSE frames are joined once per distinct topic filter and shared by every subscriber
with that filter.

Every subscriber has its own bounded memory channel and counted buffer. A subscriber
that falls behind is overflowed: it gets a final ``overflow`` event and its stream
ends; it never grows memory or slows the publisher (seed 004). Dead subscribers are
pruned at admission, so they never count against the caps.

Under load a subscriber's task may still be writing when the next flush arrives: its
stream then joins every chunk already queued into one write (bounded by
``JOIN_LIMIT``), so a lagging subscriber catches up with one write instead of several
and the number of writes per second never exceeds what the server can do. Heartbeats
come from the flusher task too (the subscriber list is kept in last-write order), so
the per-write path has no cancel scope: a deadline per receive cost ~15 us, more than
10% of an SSE write on this stack.

In cluster mode the ring is a mirror of the shared event stream: events arrive numbered
(:meth:`EventHub.publish_event`), and ids older than the ring are read from the stream
through the :class:`OlderEvents` port, for pages and for SSE resumption alike.

Longer than 400 lines: one fan-out engine (coalescing, per-subscriber buffers,
heartbeats, overflow, resumption) whose parts share the subscriber table.
"""

from __future__ import annotations

import weakref
from collections.abc import AsyncGenerator, Mapping, Sequence
from types import TracebackType
from typing import Any, Final, Literal, Protocol

import attrs
import orjson
import trio

from ..core.event_schemas import overflow, shutdown
from ..core.events import TOPICS, Event, EventRing, Page, format_sse
from ..core.model import Problem

HEARTBEAT: Final = b": heartbeat\n\n"

#: Events per replay chunk read from the ring (one write each).
REPLAY_PAGE: Final = 500

#: A stream stops joining queued chunks into one write once it holds this many bytes.
JOIN_LIMIT: Final = 1024 * 1024

# Joined SSE frames and how many events they hold.
_Chunk = tuple[bytes, int]
_Filter = frozenset[str] | None


class HistoryUnavailable(Exception):
    """Events older than the ring exist but cannot be read now (cluster: no NATS)."""


class OlderEvents(Protocol):
    """Where events older than the ring are read (cluster mode: the event stream)."""

    async def page(self, after: int, limit: int, topic: str | None, before: int) -> Page:
        """Up to ``limit`` events with ``after < id < before`` (oldest first), with
        :meth:`EventRing.page`'s ``gap`` and ``next_after`` meaning. A checkpoint; raises
        :class:`HistoryUnavailable` when the store of older events cannot be reached."""
        ...


@attrs.define(eq=False)
class SubscriberLimit(Exception):
    """Admission refused: a subscriber cap is reached or the hub is closed (→ HTTP 503).

    ``scope`` names the cap (``"global"``, ``"topic"``, or ``"closed"`` while shutting
    down), ``topic`` the full topic for a topic cap, ``retry_after`` a hint in seconds.
    """

    scope: Literal["global", "topic", "closed"]
    limit: int
    retry_after: float
    topic: str | None = None

    def __str__(self) -> str:
        if self.scope == "closed":
            return "event hub is shutting down"
        where = f"topic {self.topic!r}" if self.topic else "global"
        return f"{where} subscriber limit of {self.limit} reached"

    def to_problem(self) -> Problem:
        """A 503 problem (``type`` slug ``subscriber-limit``) carrying ``retry_after``."""
        extra: dict[str, Any] = {"scope": self.scope, "limit": self.limit}
        if self.topic is not None:
            extra["topic"] = self.topic
        return Problem(
            503, "subscriber-limit", "Too many subscribers", str(self), extra, self.retry_after
        )


@attrs.define(eq=False)
class _Subscriber:
    """Hub-side state of one subscriber. Only the hub and its own Subscription touch it."""

    topics: _Filter
    send: trio.MemorySendChannel[_Chunk]
    # Live events with id <= live_after are covered by the ring replay (replay/live race).
    live_after: int
    owner: weakref.ref[Subscription] | None = None
    buffered_events: int = 0
    # Bytes queued in the channel, heartbeats included (0 = nothing queued).
    buffered_bytes: int = 0
    # When the stream last finished a write (or subscribed): the heartbeat clock.
    wrote_at: float = 0.0
    # Newest id handed to this subscriber (replay bound or live).
    last_id: int = 0
    # Frame the stream yields once the channel is drained (overflow or shutdown).
    end: bytes | None = None


def _canonical_filter(topics: frozenset[str] | None) -> _Filter:
    if topics is None:
        return None
    unknown = topics - TOPICS
    if unknown:
        raise ValueError(f"unknown topic(s): {', '.join(sorted(unknown))}")
    if not topics:
        raise ValueError("topics must be None (all) or a non-empty set")
    # All topics and "no filter" share one cached chunk per flush.
    return None if topics == TOPICS else topics


def _join(events: list[Event], topics: _Filter) -> tuple[bytes, int, int] | None:
    """Joined SSE frames of the events matching ``topics``: (bytes, count, last id)."""
    if topics is not None:
        events = [e for e in events if e.topic in topics]
    if not events:
        return None
    return b"".join([e.sse for e in events]), len(events), events[-1].id


@attrs.define(eq=False)
class Subscription:
    """One SSE subscriber. Use as ``async with``; exiting unregisters it at once.

    Get it from :meth:`EventHub.subscribe`; iterate :meth:`stream` once.
    """

    _hub: EventHub
    _state: _Subscriber
    _receive: trio.MemoryReceiveChannel[_Chunk]
    # Replay ring events in (resume_after, replay_until]; None = no replay.
    _resume_after: int | None
    _replay_until: int
    _streamed: bool = False

    @property
    def topics(self) -> frozenset[str] | None:
        """The topic filter (``None`` = every topic)."""
        return self._state.topics

    def close(self) -> None:
        """Unregister from the hub and close the channel. Idempotent; never blocks or raises."""
        self._hub._unregister(self._state)
        self._receive.close()

    async def __aenter__(self) -> Subscription:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        # Synchronous cleanup: a client disconnect arrives as cancellation, and an
        # await here would just re-raise Cancelled before unregistering.
        self.close()

    async def stream(self) -> AsyncGenerator[bytes, None]:
        """SSE body bytes: ring replay (after a ``gap`` event if needed), then live chunks.

        Every chunk already queued when the stream wakes is joined into one yielded
        ``bytes`` (up to ``JOIN_LIMIT``, then the rest in the next one). Yields a
        ``: heartbeat`` comment whenever nothing was written for ``heartbeat_interval``
        seconds (needs the hub's ``run`` task). Ends after the ``overflow`` or
        ``shutdown`` event, or when the subscription is closed. Unregisters on exit
        (including cancellation or ``aclose``). Each ``__anext__`` is a checkpoint while
        waiting for live data. Raises ``RuntimeError`` if iterated a second time.
        """
        if self._streamed:
            raise RuntimeError("Subscription.stream() may be iterated only once")
        self._streamed = True
        hub = self._hub
        state = self._state
        receive = self._receive
        try:
            cursor = self._resume_after
            while cursor is not None and cursor < self._replay_until:
                try:
                    chunk, cursor = await self._replay_page(cursor)
                except HistoryUnavailable:
                    # Ending the stream makes the client reconnect with its last id; a
                    # gap event here would tell it events it can still get were lost.
                    return
                if chunk:
                    yield chunk
                    hub._wrote(state)
                else:
                    await trio.lowlevel.checkpoint()
            while True:
                try:
                    data, n = await receive.receive()
                except (trio.EndOfChannel, trio.ClosedResourceError):
                    break
                # Whatever else is queued goes out in the same write: a subscriber that
                # fell behind by k flushes catches up with one write, not k.
                if state.buffered_bytes > len(data):
                    parts = [data]
                    size = len(data)
                    while size < JOIN_LIMIT:
                        try:
                            more, k = receive.receive_nowait()
                        except (trio.WouldBlock, trio.EndOfChannel, trio.ClosedResourceError):
                            break
                        parts.append(more)
                        size += len(more)
                        n += k
                    data = b"".join(parts)
                state.buffered_events -= n
                state.buffered_bytes -= len(data)
                yield data
                hub._wrote(state)
            if state.end is not None:
                yield state.end
        finally:
            self.close()

    async def _replay_page(self, cursor: int) -> tuple[bytes, int]:
        # One page after `cursor`, from the ring or (ids it no longer holds) from `older`,
        # as joined SSE frames (b"" when nothing matches the filter) and the next cursor.
        # The source is chosen right before the synchronous ring read, so ids the ring
        # drops while a stream page is fetched are fetched from the stream next time.
        hub = self._hub
        ring = hub.ring
        topics = self._state.topics
        single = next(iter(topics)) if topics is not None and len(topics) == 1 else None
        until = self._replay_until
        if hub.older is not None and cursor < ring.first_id - 1:
            before = min(ring.first_id, until + 1)
            page = await hub.older.page(cursor, REPLAY_PAGE, single, before)
        else:
            page = ring.page(cursor, REPLAY_PAGE, single)
        frames: list[bytes] = []
        # Ids above `until` that left the ring were delivered live, not missed.
        missed = min(page.gap, until - cursor)
        if missed > 0:
            frames.append(format_sse("gap", orjson.dumps({"missed": missed})))
        for event in page.events:
            if event.id > until:
                break
            if topics is None or event.topic in topics:
                frames.append(event.sse)
        return b"".join(frames), page.next_after


@attrs.define(eq=False)
class EventHub:
    """Owns the event ring, the subscribers and their caps; fans events out to SSE streams.

    ``publish`` and ``close`` are synchronous and never block; ``run`` is the flusher task
    and must be running for live delivery (``await nursery.start(hub.run)``).
    """

    ring: EventRing = attrs.field(factory=lambda: EventRing(10_000, 64 * 1024 * 1024))
    max_subscribers: int = attrs.field(default=1000, kw_only=True)
    #: ``None`` means the same as ``max_subscribers``.
    max_subscribers_per_topic: int | None = attrs.field(default=None, kw_only=True)
    #: Events buffered per subscriber before it is overflowed.
    subscriber_buffer: int = attrs.field(default=1000, kw_only=True)
    #: Bytes buffered per subscriber before it is overflowed.
    subscriber_buffer_bytes: int = attrs.field(default=16 * 1024 * 1024, kw_only=True)
    heartbeat_interval: float = attrs.field(default=15.0, kw_only=True)
    #: Minimum time between two flushes while events keep coming.
    coalesce_interval: float = attrs.field(default=0.025, kw_only=True)
    #: SSE writes per second the flusher aims to stay under: after a flush that woke
    #: ``n`` subscribers, the next one waits at least ``n / sse_write_budget`` seconds. Each
    #: flush costs one write per subscriber, and rounds of writes run back to back
    #: delay the publisher and the flusher themselves (measured: 1000 subscribers x 100
    #: events/s on 2 slow cores, a 25 ms tick gave p99 ~280 ms at ~83% CPU, a 120 ms
    #: one ~205 ms at ~66%). A lone event on a quiet hub still goes out at once.
    sse_write_budget: float = attrs.field(default=8000.0, kw_only=True)
    #: A pending batch this large wakes the flusher early; 4x this flushes inline.
    max_batch: int = attrs.field(default=512, kw_only=True)
    #: ``Retry-After`` hint for refused subscribers, seconds.
    retry_after: float = attrs.field(default=5.0, kw_only=True)
    #: Cluster mode: where ids older than the ring (the mirror) are read.
    older: OlderEvents | None = attrs.field(default=None, kw_only=True)

    published: int = attrs.field(init=False, default=0)
    overflowed: int = attrs.field(init=False, default=0)
    dropped: int = attrs.field(init=False, default=0)
    chunks: int = attrs.field(init=False, default=0)
    flushes: int = attrs.field(init=False, default=0)
    #: Subscribers the last flush handed a chunk to (the writes it caused).
    last_flush_writes: int = attrs.field(init=False, default=0)

    # Ordered by wrote_at (a write moves its subscriber to the end): the first entry
    # is always the next one due a heartbeat.
    _subs: dict[_Subscriber, None] = attrs.field(init=False, factory=dict)
    _topic_counts: dict[str, int] = attrs.field(
        init=False, factory=lambda: dict.fromkeys(TOPICS, 0)
    )
    _pending: list[Event] = attrs.field(init=False, factory=list)
    _wake: trio.Event = attrs.field(init=False, factory=trio.Event)
    _full: trio.Event = attrs.field(init=False, factory=trio.Event)
    _joined: trio.Event = attrs.field(init=False, factory=trio.Event)
    _closed: bool = attrs.field(init=False, default=False)
    # Set (and replaced) by publish_event while a resuming subscriber waits for an id.
    _advanced: trio.Event | None = attrs.field(init=False, default=None)

    def __attrs_post_init__(self) -> None:
        if self.heartbeat_interval <= 0 or self.coalesce_interval < 0 or self.sse_write_budget <= 0:
            raise ValueError(
                "heartbeat_interval and sse_write_budget must be > 0, coalesce_interval >= 0"
            )
        if min(self.subscriber_buffer, self.subscriber_buffer_bytes, self.max_batch) < 1:
            raise ValueError("subscriber_buffer, subscriber_buffer_bytes, max_batch must be >= 1")
        if self.max_subscribers < 0 or (self.max_subscribers_per_topic or 0) < 0:
            raise ValueError("subscriber caps must be >= 0")

    @property
    def per_topic_cap(self) -> int:
        cap = self.max_subscribers_per_topic
        return self.max_subscribers if cap is None else cap

    @property
    def closed(self) -> bool:
        return self._closed

    # -- publishing ------------------------------------------------------------------

    def publish(self, topic: str, data: Mapping[str, Any], at: str) -> Event:
        """Append an event to the ring and queue it for live delivery.

        Synchronous: never blocks, never awaits. Raises like :meth:`EventRing.publish`
        (unknown topic, unserialisable data) without side effects. After :meth:`close`
        events still reach the ring but no subscriber.
        """
        event = self.ring.publish(topic, data, at)
        self.published += 1
        if self._subs:
            self._queue_live(event)
        return event

    def publish_many(self, items: Sequence[tuple[str, Mapping[str, Any]]], at: str) -> list[Event]:
        """:meth:`publish` each ``(topic, data)`` in order (see
        :meth:`EventRing.publish_many`). Synchronous; raises before anything is published."""
        events = self.ring.publish_many(items, at)
        self.published += len(events)
        if self._subs:
            for event in events:
                self._queue_live(event)
        return events

    def _queue_live(self, event: Event) -> None:
        """Queue ``event`` for the subscribers' next flush (wakes the flusher)."""
        pending = self._pending
        pending.append(event)
        n = len(pending)
        if n == 1:
            self._wake.set()
        elif n >= self.max_batch:
            self._full.set()
            # Bounds the batch even if the flusher is not running or starved.
            if n >= 4 * self.max_batch:
                self._flush()

    def publish_event(self, event: Event) -> bool:
        """Cluster mirror: append an event numbered by the event stream and queue it for
        live delivery (see :meth:`EventRing.append`; False if its id was already reached).
        Ids skipped since the previous event reach live subscribers as a ``gap`` frame.

        Synchronous, never blocks; raises ``ValueError`` for an unknown topic.
        """
        last = self.ring.last_id
        if not self.ring.append(event):
            return False
        self.published += 1
        if last and event.id > last + 1 and self._subs:
            self._missed(event.id - last - 1)
        if self._advanced is not None:
            self._advanced.set()
            self._advanced = None
        if self._subs:
            self._queue_live(event)
        return True

    def _missed(self, n: int) -> None:
        # The mirror skipped ids (gone from the stream before it saw them): live streams
        # get a gap frame where they are, as a resumption would.
        self._flush()
        frame = format_sse("gap", orjson.dumps({"missed": n}))
        for sub in list(self._subs):
            self._deliver(sub, (frame, 0, sub.last_id))

    async def wait_for(self, event_id: int, timeout: float) -> bool:  # noqa: ASYNC109
        """Wait until the ring has reached ``event_id`` (at most ``timeout`` seconds).

        Cluster mode: a client resuming with an id another instance gave it may be a few
        milliseconds ahead of this instance's mirror; subscribing before the mirror has the
        id would treat it as no resume point and send those events again. A checkpoint;
        returns whether the id was reached.
        """
        with trio.move_on_after(timeout):
            while self.ring.last_id < event_id:
                if self._advanced is None:
                    self._advanced = trio.Event()
                await self._advanced.wait()
        await trio.lowlevel.checkpoint()
        return self.ring.last_id >= event_id

    async def page(self, after: int | None, limit: int, topic: str | None = None) -> Page:
        """``GET /v1/events``: :meth:`EventRing.page`, except that ids older than the ring
        are read through :attr:`older` when there is one (cluster mode), so a page is the
        same on every instance. A checkpoint only when it reads older events; raises
        :class:`HistoryUnavailable` then if they cannot be read, and like ``ring.page``.
        """
        ring = self.ring
        if self.older is None or after is None or after >= ring.first_id - 1:
            return ring.page(after, limit, topic)
        events: list[Event] = []
        gap = 0
        cursor = after
        while len(events) < limit:
            if cursor < ring.first_id - 1:
                part = await self.older.page(cursor, limit - len(events), topic, ring.first_id)
            else:
                part = ring.page(cursor, limit - len(events), topic)
            events += part.events
            gap += part.gap
            if part.next_after <= cursor or part.next_after >= ring.last_id:
                cursor = max(cursor, part.next_after)
                break
            cursor = part.next_after
        return Page(events, cursor, gap)

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """The hub's tasks: leading-edge throttled delivery and heartbeats.

        Returns after :meth:`close`. Without it running, subscribers get no live events
        (beyond the inline flush that bounds the pending batch) and no heartbeats.
        """
        async with trio.open_nursery() as nursery:
            nursery.start_soon(self._heartbeats)
            task_status.started()
            while not self._closed:
                if not self._pending:
                    await self._wake.wait()
                    continue
                # Straight from the throttle into the flush, without another checkpoint:
                # under load every extra wake-up of this task waits a whole scheduler
                # batch (all subscriber tasks), which is what sets the flush rate.
                self._wake = trio.Event()
                self._full = trio.Event()
                self._flush()
                # The throttle: a lone event was delivered at once above; whatever
                # arrives now waits for the window (less if the batch fills), which
                # widens with the writes the flush caused.
                with trio.move_on_after(self.flush_window()):
                    await self._full.wait()
            nursery.cancel_scope.cancel()

    def flush_window(self) -> float:
        """Seconds the flusher waits after a flush before the next one (batch not full)."""
        return max(self.coalesce_interval, self.last_flush_writes / self.sse_write_budget)

    async def _heartbeats(self) -> None:
        # One timer for all subscribers: sleep until the least recently written one is
        # due, queue a heartbeat for each due one, repeat.
        interval = self.heartbeat_interval
        while not self._closed:
            first = next(iter(self._subs), None)
            if first is None:
                await self._joined.wait()
                self._joined = trio.Event()
                continue
            due = first.wrote_at + interval
            if trio.current_time() < due:
                await trio.sleep_until(due)
                continue
            now = trio.current_time()
            due_subs: list[_Subscriber] = []
            for sub in self._subs:
                if sub.wrote_at + interval > now:
                    break
                due_subs.append(sub)
            for sub in due_subs:
                self._heartbeat(sub, now)

    def _heartbeat(self, sub: _Subscriber, now: float) -> None:
        # Only an idle subscriber needs one: queued data will be written soon anyway,
        # and a stream that is stuck keeps at most this one heartbeat queued.
        if sub.buffered_bytes == 0:
            try:
                sub.send.send_nowait((HEARTBEAT, 0))
            except trio.WouldBlock:  # pragma: no cover - buffered_bytes == 0 means empty
                pass
            except (trio.BrokenResourceError, trio.ClosedResourceError):
                self._unregister(sub)
                return
            else:
                sub.buffered_bytes += len(HEARTBEAT)
        sub.wrote_at = now
        self._to_end(sub)

    def _wrote(self, sub: _Subscriber) -> None:
        # Called by the stream after each write: restarts the subscriber's heartbeat clock.
        sub.wrote_at = trio.current_time()
        self._to_end(sub)

    def _to_end(self, sub: _Subscriber) -> None:
        subs = self._subs
        if sub in subs:
            del subs[sub]
            subs[sub] = None

    def _flush(self) -> None:
        batch = self._pending
        if not batch:
            return
        self._pending = []
        self.flushes += 1
        cache: dict[_Filter, tuple[bytes, int, int] | None] = {}
        first_id = batch[0].id
        chunks_before = self.chunks
        for sub in list(self._subs):
            if sub.owner is not None and sub.owner() is None:
                self._unregister(sub)
                continue
            if first_id <= sub.live_after:
                # Registered while this batch was pending: its ring replay covers these.
                joined = _join([e for e in batch if e.id > sub.live_after], sub.topics)
            elif sub.topics in cache:
                joined = cache[sub.topics]
            else:
                joined = cache[sub.topics] = _join(batch, sub.topics)
            if joined is not None:
                self._deliver(sub, joined)
        self.last_flush_writes = self.chunks - chunks_before

    def _deliver(self, sub: _Subscriber, joined: tuple[bytes, int, int]) -> None:
        data, n, last = joined
        if (
            sub.buffered_events + n > self.subscriber_buffer
            or sub.buffered_bytes + len(data) > self.subscriber_buffer_bytes
        ):
            self._overflow(sub, n)
            return
        try:
            sub.send.send_nowait((data, n))
        except trio.WouldBlock:
            self._overflow(sub, n)
            return
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            self._unregister(sub)
            return
        sub.buffered_events += n
        sub.buffered_bytes += len(data)
        sub.last_id = last
        self.chunks += 1

    def _overflow(self, sub: _Subscriber, n: int) -> None:
        # Policy for a slow consumer: disconnect it with a final event, never buffer more.
        self.overflowed += 1
        self.dropped += n
        sub.end = format_sse(
            "overflow",
            orjson.dumps(overflow(self.subscriber_buffer, sub.last_id)),
        )
        self._unregister(sub)

    # -- subscribers -----------------------------------------------------------------

    def subscribe(
        self, topics: frozenset[str] | None = None, last_event_id: int | None = None
    ) -> Subscription:
        """Admit a subscriber for ``topics`` (``None`` = all), resuming after ``last_event_id``.

        Synchronous. Prunes dead subscribers first, then enforces the global and
        per-topic caps. Raises :class:`SubscriberLimit` when a cap is reached or the hub
        is closed, ``ValueError`` for unknown or empty topics. A ``last_event_id`` newer
        than the ring (e.g. from before a restart) is treated as no resume point.

        The subscriber is registered before the ring is read, and live events up to the
        current ring end are dropped for it, so replay and live never lose or repeat one.
        """
        filt = _canonical_filter(topics)
        if self._closed:
            raise SubscriberLimit("closed", 0, self.retry_after)
        self._prune()
        if len(self._subs) >= self.max_subscribers:
            raise SubscriberLimit("global", self.max_subscribers, self.retry_after)
        cap = self.per_topic_cap
        for topic in sorted(TOPICS if filt is None else filt):
            if self._topic_counts[topic] >= cap:
                raise SubscriberLimit("topic", cap, self.retry_after, topic)
        live_after = self.ring.last_id
        send, receive = trio.open_memory_channel[_Chunk](self.subscriber_buffer)
        state = _Subscriber(
            filt, send, live_after, last_id=live_after, wrote_at=trio.current_time()
        )
        resume = last_event_id if last_event_id is not None and last_event_id < live_after else None
        sub = Subscription(self, state, receive, resume, live_after)
        state.owner = weakref.ref(sub)
        self._subs[state] = None
        self._joined.set()
        for topic in TOPICS if filt is None else filt:
            self._topic_counts[topic] += 1
        return sub

    def _unregister(self, sub: _Subscriber) -> None:
        if sub in self._subs:
            del self._subs[sub]
            for topic in TOPICS if sub.topics is None else sub.topics:
                self._topic_counts[topic] -= 1
        sub.send.close()

    def _prune(self) -> None:
        # Seed 004: a subscription dropped without cleanup must not count against the
        # caps until some later publish happens to notice it.
        for sub in list(self._subs):
            if sub.owner is not None and sub.owner() is None:
                self._unregister(sub)

    def subscriber_count(self, topic: str | None = None) -> int:
        """Live subscribers (all, or those receiving ``topic``), after pruning dead ones."""
        self._prune()
        if topic is None:
            return len(self._subs)
        return self._topic_counts[topic]

    def close(self, reason: str, at: str, *, numbered: bool = True) -> Event | None:
        """Graceful shutdown: deliver pending events, then a ``system`` shutdown event to
        every subscriber (SSE ``event: shutdown``, with its id), and end their streams.

        ``numbered=False`` (cluster mode, where ids belong to the shared stream): the
        frame has no ``id:`` line and the event is not kept in the ring, so a client
        resuming elsewhere with its last id misses nothing. Returns ``None`` then.

        Synchronous, never blocks. The event's data is ``{"kind": "shutdown", "reason":
        reason}`` (:func:`~relay_trio.core.event_schemas.shutdown`) and is also kept in the ring. Later subscribes raise
        :class:`SubscriberLimit` (scope ``"closed"``); ``run`` returns. Returns the event,
        or ``None`` if the hub was already closed.
        """
        if self._closed:
            return None
        self._flush()
        final = shutdown(reason)
        event: Event | None = None
        if numbered:
            event = self.ring.publish(final.topic, final.data, at)
            self.published += 1
            frame = format_sse("shutdown", event.json, event.id)
        else:
            body = orjson.dumps({"topic": final.topic, "at": at, "data": final.data})
            frame = format_sse("shutdown", body)
        self._closed = True
        for sub in list(self._subs):
            sub.end = frame
            self._unregister(sub)
        self._wake.set()
        self._full.set()
        self._joined.set()
        return event
