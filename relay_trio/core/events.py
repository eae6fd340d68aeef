"""The event log: a bounded ring of pre-encoded events, paged by id.

Pure logic: no Trio, no I/O, no clock (the caller passes the RFC 3339 ``at`` string).

Seed 004 is the failure this module exists to avoid: a relay that deep-copied its whole
event log under a global lock on every ``?limit=1000`` pull, and serialised each event
again per reader. Here every event is JSON-encoded exactly once, at publish, together
with its SSE frame; a page lookup is id arithmetic on a list with a head offset (O(1)
to find the start) and copies only the page; topic-filtered pages use a per-topic id
index with ``bisect`` instead of scanning the log.
"""

from __future__ import annotations

from bisect import bisect_left, bisect_right
from collections import Counter
from collections.abc import Mapping, Sequence
from operator import itemgetter
from typing import Any, Final, NamedTuple

import attrs
import orjson

TOPICS: Final[frozenset[str]] = frozenset({"reports", "acks", "drops", "deadletter", "system"})

#: Estimated per-event bookkeeping beyond the two encoded byte strings: the ``Event``
#: object, two ``bytes`` headers, the ring slot and the per-topic index entry. Counted in
#: ``bytes_used`` so the byte cap bounds real memory, not just payload bytes.
EVENT_OVERHEAD: Final = 192

#: The largest page a caller may ask for (``GET /v1/events?limit=N``); enforced by the caller.
MAX_PAGE: Final = 1000

_COMPACT_MIN: Final = 1024

_TOPIC: Final = itemgetter(1)  # Event.topic
_NBYTES: Final = itemgetter(4)  # Event.nbytes


class Event(NamedTuple):
    """One published event with its bytes encoded once (immutable; a named tuple because
    one is built per event on the report path and attrs' frozen ``__init__`` cost ~1 us).

    ``json`` is ``{"id":..,"topic":..,"at":..,"data":{..}}``; ``sse`` is the ready SSE
    frame ``id: N\\nevent: <topic>\\ndata: <json>\\n\\n``. Both are shared by every
    page and every subscriber: nothing re-encodes an event after publish.
    """

    id: int
    topic: str
    json: bytes
    sse: bytes
    #: Bytes charged against the ring's byte cap: ``len(json) + len(sse) + EVENT_OVERHEAD``.
    nbytes: int


@attrs.frozen
class Page:
    """One page of the log.

    ``next_after`` is the cursor for the next call (pass it back as ``after``); ``gap``
    counts ids greater than the requested ``after`` that had already left the ring.
    """

    events: list[Event]
    next_after: int
    gap: int


def format_sse(event_name: str, data: bytes, id: int | None = None) -> bytes:
    """One SSE frame: optional ``id:`` line, ``event:`` line, ``data:`` line(s), blank line.

    ``data`` containing newlines is split into several ``data:`` lines, as the SSE spec
    requires (compact JSON from orjson never contains one). Raises ``ValueError`` if
    ``event_name`` contains a line break, since that would inject fields.
    """
    if "\n" in event_name or "\r" in event_name:
        raise ValueError("SSE event name must not contain a line break")
    head = b"event: " + event_name.encode() + b"\n"
    if id is not None:
        head = b"id: %d\n" % id + head
    if b"\n" in data or b"\r" in data:
        lines = data.replace(b"\r\n", b"\n").replace(b"\r", b"\n").split(b"\n")
        body = b"".join(b"data: " + line + b"\n" for line in lines)
    else:
        body = b"data: " + data + b"\n"
    return head + body + b"\n"


def envelope(topic: str, at: str, instance: str, data: Mapping[str, Any]) -> bytes:
    """A cluster event as published to the event stream: ``{"topic","at","instance","data"}``
    (no id: the stream's sequence becomes it, see :func:`mirrored`).

    Raises ``ValueError`` for an unknown topic and ``TypeError`` (orjson) for data that is
    not JSON-serialisable, before anything is queued.
    """
    if topic not in TOPICS:
        raise ValueError(f"unknown topic {topic!r}")
    return orjson.dumps({"topic": topic, "at": at, "instance": instance, "data": data})


def mirrored(id: int, topic: str, body: bytes) -> Event:
    """An event numbered elsewhere (cluster mode: ``id`` is the event stream's sequence).

    ``body`` is the published envelope without its id, ``{"topic":..,"at":..,..}`` (a JSON
    object from :func:`envelope`); the id is spliced in front, so nothing is decoded or
    re-encoded. Never raises.
    """
    json = b'{"id":%d,' % id + body[1:]
    sse = b"id: %d\nevent: %s\ndata: %s\n\n" % (id, topic.encode(), json)
    return Event(id, topic, json, sse, len(json) + len(sse) + EVENT_OVERHEAD)


def render_page(page: Page) -> bytes:
    """The ``GET /v1/events`` body ``{"events":[..],"next_after":n,"gap":g}``.

    Joins the events' pre-encoded JSON; nothing is re-encoded. Never raises.
    """
    return (
        b'{"events":['
        + b",".join([e.json for e in page.events])
        + b'],"next_after":%d,"gap":%d}' % (page.next_after, page.gap)
    )


@attrs.define(eq=False)
class _TopicIndex:
    """Ids of one topic's retained events, oldest first, from ``ids[head]`` on."""

    #: The SSE frame between the id and the data: ``\nevent: <topic>\ndata: ``.
    sse_head: bytes
    ids: list[int] = attrs.Factory(list)
    head: int = 0


@attrs.define(eq=False)
class EventRing:
    """A bounded, id-addressed log of events, trimmed oldest-first by count and by bytes.

    Ids are consecutive integers starting at 1, so the event with id ``x`` sits at
    ``self._events[self._head + x - first_id]``. Trimming advances ``_head``; the dead
    prefix is deleted once it is both long and at least half the list, so every
    operation is amortised O(1) in the log size. The newest event is always retained,
    even if it alone exceeds ``max_bytes`` (so ``bytes_used`` may exceed the cap by at
    most one event).
    """

    max_count: int
    max_bytes: int
    compact_min: int = attrs.field(default=_COMPACT_MIN, kw_only=True)
    _events: list[Event] = attrs.field(init=False, factory=list)
    _head: int = attrs.field(init=False, default=0)
    _next_id: int = attrs.field(init=False, default=1)
    _bytes: int = attrs.field(init=False, default=0)
    _by_topic: dict[str, _TopicIndex] = attrs.field(init=False)

    @_by_topic.default
    def _topic_default(self) -> dict[str, _TopicIndex]:
        return {t: _TopicIndex(b"\nevent: %s\ndata: " % t.encode()) for t in TOPICS}

    def __attrs_post_init__(self) -> None:
        # Checked here rather than with attrs validators: validators would also wrap
        # every attribute assignment (on_setattr), which costs ~30% of publish().
        if self.max_count < 1 or self.max_bytes < 1 or self.compact_min < 1:
            raise ValueError("max_count, max_bytes and compact_min must be >= 1")

    # -- inspection ------------------------------------------------------------------

    def __len__(self) -> int:
        return len(self._events) - self._head

    @property
    def first_id(self) -> int:
        """Id of the oldest retained event; ``last_id + 1`` when the ring is empty."""
        return self._next_id - len(self)

    @property
    def last_id(self) -> int:
        """Id of the newest event ever published; 0 before the first publish."""
        return self._next_id - 1

    @property
    def bytes_used(self) -> int:
        """Sum of ``Event.nbytes`` over retained events."""
        return self._bytes

    def get(self, id: int) -> Event | None:
        """The retained event with this id, or ``None``. O(1)."""
        if not self.first_id <= id <= self.last_id:
            return None
        return self._events[self._head + id - self.first_id]

    # -- writing ---------------------------------------------------------------------

    def continue_after(self, last_id: int) -> None:
        """Number the next event ``last_id + 1`` (a restart resuming the id sequence).

        Only before the first publish, and never backwards: raises ``ValueError`` otherwise.
        A reader asking for ids the ring never had gets a gap, as for trimmed ones.
        """
        if len(self._events) or last_id < self.last_id:
            raise ValueError("event ids can only be continued on an empty ring, forwards")
        self._next_id = last_id + 1

    def publish(self, topic: str, data: Mapping[str, Any], at: str) -> Event:
        """Encode and append one event; trim the oldest while over either cap.

        Never blocks; amortised O(1). Raises ``ValueError`` for an unknown topic and
        ``TypeError`` (orjson) if ``data`` is not JSON-serialisable; in both cases the
        ring is unchanged and no id is consumed. (:meth:`publish_many` of one event.)
        """
        return self.publish_many(((topic, data),), at)[0]

    def publish_many(self, items: Sequence[tuple[str, Mapping[str, Any]]], at: str) -> list[Event]:
        """:meth:`publish` each ``(topic, data)`` in order, all stamped ``at``; trim once.

        The same ring as publishing them one by one (ids, bytes, what is retained: the
        newest events within both caps), at a fraction of the cost per event: a batch
        request or a send batch publishes its events through here. Raises like
        :meth:`publish`, before anything is appended (ring unchanged, no id consumed).
        """
        by_topic = self._by_topic
        for topic, _ in items:
            if topic not in by_topic:
                raise ValueError(f"unknown topic {topic!r}")
        dumps = orjson.dumps
        new_event = tuple.__new__  # Event(...) without the named tuple's Python __new__
        first = eid = self._next_id
        made: list[Event] = []
        added = 0
        # The JSON between the id and the data is the same for every event of a topic in
        # one call: formatted once, so each event encodes only its data (same bytes as
        # orjson.dumps of the whole object, keys in the same order).
        middles: dict[str, bytes] = {}
        try:
            for topic, data in items:
                index = by_topic[topic]
                middle = middles.get(topic)
                if middle is None:
                    middle = middles[topic] = b',"topic":%s,"at":%s,"data":' % (
                        dumps(topic),
                        dumps(at),
                    )
                body = b'{"id":%d%s%s}' % (eid, middle, dumps(data))
                sse = b"id: %d%s%s\n\n" % (eid, index.sse_head, body)
                nbytes = len(body) + len(sse) + EVENT_OVERHEAD
                made.append(new_event(Event, (eid, topic, body, sse, nbytes)))
                index.ids.append(eid)
                added += nbytes
                eid += 1
        except BaseException:
            for index in by_topic.values():  # unserialisable data: take the ids back
                del index.ids[bisect_left(index.ids, first, index.head) :]
            raise
        self._next_id = eid
        self._events += made
        self._bytes += added
        if len(self._events) - self._head > self.max_count or self._bytes > self.max_bytes:
            self._trim()
        return made

    def append(self, event: Event) -> bool:
        """Add an event numbered elsewhere (the cluster mirror); trim like :meth:`publish`.

        Ids must grow: an event with an id the ring has reached already is ignored (returns
        False). An id beyond the next one means the ids between are gone for good (deleted
        from the stream, or trimmed before this ring saw them): the retained events are
        dropped, so the ring stays a contiguous run of ids and a reader asking for anything
        older goes to the stream or gets a gap. Raises ``ValueError`` for an unknown topic
        (ring unchanged). Never blocks; amortised O(1) (O(n) once per hole).
        """
        eid = event.id
        if eid < self._next_id:
            return False
        index = self._by_topic.get(event.topic)
        if index is None:
            raise ValueError(f"unknown topic {event.topic!r}")
        if eid > self._next_id:
            self._events.clear()
            self._head = 0
            self._bytes = 0
            for kept in self._by_topic.values():
                kept.ids.clear()
                kept.head = 0
        self._next_id = eid + 1
        self._events.append(event)
        index.ids.append(eid)
        self._bytes += event.nbytes
        self._trim()
        return True

    def _trim(self) -> None:
        events = self._events
        excess = len(events) - self._head - self.max_count
        if excess > 1:
            # Over the count cap by a batch's worth: drop those at once (they are the
            # oldest, and would go one by one below anyway), iterating in C.
            dropped = events[self._head : self._head + excess]
            self._head += excess
            self._bytes -= sum(map(_NBYTES, dropped))
            for topic, n in Counter(map(_TOPIC, dropped)).items():
                self._by_topic[topic].head += n
        while len(events) - self._head > self.max_count or (
            self._bytes > self.max_bytes and len(events) - self._head > 1
        ):
            old = events[self._head]
            self._head += 1
            self._bytes -= old.nbytes
            index = self._by_topic[old.topic]
            # Oldest overall is necessarily the oldest of its topic.
            index.head += 1
            if index.head >= self.compact_min and index.head * 2 >= len(index.ids):
                del index.ids[: index.head]
                index.head = 0
        if excess > 1:
            for index in self._by_topic.values():
                if index.head >= self.compact_min and index.head * 2 >= len(index.ids):
                    del index.ids[: index.head]
                    index.head = 0
        if self._head >= self.compact_min and self._head * 2 >= len(events):
            del events[: self._head]
            self._head = 0

    # -- reading ---------------------------------------------------------------------

    def page(self, after: int | None, limit: int, topic: str | None = None) -> Page:
        """Up to ``limit`` retained events with id > ``after`` (oldest first), optionally of one topic.

        ``after=None`` starts at the oldest retained event. ``gap`` is the number of ids
        greater than ``after`` that have left the ring (for a topic page this counts all
        topics: an upper bound on the matching events missed). ``next_after`` is the id of
        the last returned event when the page is full, otherwise the newest id scanned
        (``max(after, last_id)``), so a cursor walk never repeats an event or a gap.

        Finds the start in O(1) (O(log n) with a topic), copies only the page, never
        returns more than ``limit`` events. Raises ``ValueError`` for ``limit < 1`` or an
        unknown topic. Bounding ``limit`` to ``MAX_PAGE`` is the caller's job.
        """
        if limit < 1:
            raise ValueError("limit must be >= 1")
        first = self.first_id
        gap = 0
        if after is None:
            start_after = first - 1
        else:
            start_after = max(after, 0)
            if start_after < first - 1:
                gap = first - 1 - start_after
                start_after = first - 1
        if topic is None:
            lo = self._head + (start_after + 1 - first)
            events = self._events[lo : lo + limit]
        else:
            index = self._by_topic.get(topic)
            if index is None:
                raise ValueError(f"unknown topic {topic!r}")
            i = bisect_right(index.ids, start_after, lo=index.head)
            base = self._head - first
            events = [self._events[base + eid] for eid in index.ids[i : i + limit]]
        next_after = events[-1].id if len(events) == limit else max(start_after, self.last_id)
        return Page(events, next_after, gap)
