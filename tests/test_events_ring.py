"""EventRing: encoding once, trimming by count and bytes, paging, gaps (plus a model-based test)."""

from __future__ import annotations

import orjson
import pytest
from hypothesis import settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, precondition, rule

from relay_trio.core.events import (
    EVENT_OVERHEAD,
    TOPICS,
    Event,
    EventRing,
    Page,
    format_sse,
    render_page,
)

AT = "2026-01-01T00:00:00Z"


def test_topics() -> None:
    assert frozenset({"reports", "acks", "drops", "deadletter", "system"}) == TOPICS


def test_publish_encodes_json_and_sse_once() -> None:
    ring = EventRing(10, 1 << 20)
    ev = ring.publish("reports", {"resource_id": "vm-1", "n": 1}, AT)
    assert ev.id == 1
    assert orjson.loads(ev.json) == {
        "id": 1,
        "topic": "reports",
        "at": AT,
        "data": {"resource_id": "vm-1", "n": 1},
    }
    assert ev.sse == b"id: 1\nevent: reports\ndata: " + ev.json + b"\n\n"
    assert ev.nbytes == len(ev.json) + len(ev.sse) + EVENT_OVERHEAD
    # Pages hand out the very same bytes objects: nothing is re-encoded.
    assert ring.page(None, 10).events[0].json is ev.json
    assert ring.publish("acks", {}, AT).id == 2


def test_publish_many_equals_publishing_one_by_one() -> None:
    items = [("reports", {"n": i, "pad": "p" * (i * 37 % 300)}) for i in range(40)]
    items[7] = ("acks", {"message_id": "r:1"})
    one, many = EventRing(25, 6000), EventRing(25, 6000)
    singles = [one.publish(topic, data, AT) for topic, data in items]
    batch = many.publish_many(items, AT)
    assert batch == singles
    assert all(type(e) is Event for e in batch)
    assert (len(many), many.first_id, many.last_id, many.bytes_used) == (
        len(one),
        one.first_id,
        one.last_id,
        one.bytes_used,
    )
    for topic in (None, "reports", "acks"):
        assert many.page(None, 1000, topic) == one.page(None, 1000, topic)
    assert many.publish_many([], AT) == []
    assert many.last_id == 40


def test_bad_publish_many_leaves_ring_unchanged() -> None:
    ring = EventRing(3, 1000)
    ring.publish("reports", {}, AT)
    with pytest.raises(ValueError, match="unknown topic"):
        ring.publish_many([("reports", {}), ("nope", {})], AT)
    with pytest.raises(TypeError):
        ring.publish_many([("reports", {}), ("reports", {"x": object()})], AT)
    assert (len(ring), ring.last_id) == (1, 1)
    assert [e.id for e in ring.publish_many([("acks", {}), ("drops", {})], AT)] == [2, 3]


def test_empty_ring() -> None:
    ring = EventRing(3, 1000)
    assert (len(ring), ring.first_id, ring.last_id, ring.bytes_used) == (0, 1, 0, 0)
    assert ring.page(None, 5) == Page([], 0, 0)
    assert ring.page(7, 5) == Page([], 7, 0)
    assert ring.get(1) is None


def test_bad_publish_leaves_ring_unchanged() -> None:
    ring = EventRing(3, 1000)
    with pytest.raises(ValueError, match="unknown topic"):
        ring.publish("nope", {}, AT)
    with pytest.raises(TypeError):
        ring.publish("reports", {"x": object()}, AT)
    assert (len(ring), ring.last_id) == (0, 0)
    assert ring.publish("reports", {}, AT).id == 1


def test_trim_by_count() -> None:
    ring = EventRing(3, 1 << 20)
    for i in range(5):
        ring.publish("reports", {"i": i}, AT)
    assert (len(ring), ring.first_id, ring.last_id) == (3, 3, 5)
    assert [e.id for e in ring.page(None, 10).events] == [3, 4, 5]
    assert ring.get(2) is None
    got = ring.get(4)
    assert got is not None and got.id == 4
    assert ring.bytes_used == sum(e.nbytes for e in ring.page(None, 10).events)


def test_trim_by_bytes() -> None:
    ring = EventRing(1000, 1)  # placeholder to learn an event's size
    size = ring.publish("reports", {"pad": "x" * 100}, AT).nbytes
    ring = EventRing(1000, 3 * size + size // 2)
    for _ in range(6):
        ring.publish("reports", {"pad": "x" * 100}, AT)
    assert (len(ring), ring.first_id, ring.last_id) == (3, 4, 6)
    assert ring.bytes_used == 3 * size <= ring.max_bytes


def test_newest_event_is_kept_even_if_over_byte_cap() -> None:
    ring = EventRing(10, 50)
    ring.publish("reports", {}, AT)
    big = ring.publish("reports", {"pad": "y" * 500}, AT)
    assert len(ring) == 1 and ring.first_id == big.id == 2
    assert ring.bytes_used == big.nbytes


def test_gap_accounting() -> None:
    ring = EventRing(4, 1 << 20)
    for i in range(10):
        ring.publish("acks" if i % 2 else "reports", {"i": i}, AT)
    # retained: 7, 8, 9, 10; ids 1..6 left the ring
    page = ring.page(2, 2)
    assert ([e.id for e in page.events], page.gap, page.next_after) == ([7, 8], 4, 8)
    page = ring.page(page.next_after, 2)
    assert ([e.id for e in page.events], page.gap, page.next_after) == ([9, 10], 0, 10)
    assert ring.page(0, 10).gap == 6
    assert ring.page(6, 10).gap == 0
    assert ring.page(None, 10).gap == 0
    assert ring.page(-5, 10).gap == 6
    # Topic pages count every id that left (an upper bound for the topic).
    page = ring.page(3, 10, "acks")
    assert ([e.id for e in page.events], page.gap, page.next_after) == ([8, 10], 3, 10)


def test_page_limit_and_topic_filter() -> None:
    ring = EventRing(100, 1 << 20)
    for i in range(30):
        ring.publish(["reports", "acks", "drops"][i % 3], {"i": i}, AT)
    page = ring.page(None, 4, "drops")
    assert [e.id for e in page.events] == [3, 6, 9, 12] and page.next_after == 12
    page = ring.page(12, 1000, "drops")
    assert [e.id for e in page.events] == [15, 18, 21, 24, 27, 30]
    assert page.next_after == 30
    page = ring.page(None, 1000, "system")
    assert page == Page([], 30, 0)
    assert len(ring.page(None, 7).events) == 7
    with pytest.raises(ValueError):
        ring.page(None, 0)
    with pytest.raises(ValueError):
        ring.page(None, 5, "nope")


def test_ring_storage_is_compacted() -> None:
    ring = EventRing(10, 1 << 20, compact_min=16)
    for i in range(5000):
        ring.publish("reports" if i % 7 else "system", {}, AT)
    # The dead prefix is dropped: storage stays O(max_count + compact_min), not O(published).
    assert len(ring._events) <= 2 * 16 + 10
    assert all(len(ix.ids) <= 2 * 16 + 10 for ix in ring._by_topic.values())
    assert [e.id for e in ring.page(None, 100).events] == list(range(4991, 5001))


def test_format_sse() -> None:
    assert format_sse("gap", b'{"missed":3}') == b'event: gap\ndata: {"missed":3}\n\n'
    assert format_sse("x", b"1", 7) == b"id: 7\nevent: x\ndata: 1\n\n"
    assert format_sse("x", b"a\nb\r\nc") == b"event: x\ndata: a\ndata: b\ndata: c\n\n"
    with pytest.raises(ValueError):
        format_sse("x\ndata: evil", b"1")


def test_render_page_joins_raw_json() -> None:
    ring = EventRing(10, 1 << 20)
    for i in range(3):
        ring.publish("reports", {"i": i, "s": 'q"\n'}, AT)
    page = ring.page(1, 10)
    body = render_page(page)
    assert orjson.loads(body) == {
        "events": [orjson.loads(e.json) for e in page.events],
        "next_after": 3,
        "gap": 0,
    }
    assert orjson.loads(render_page(Page([], 5, 2))) == {"events": [], "next_after": 5, "gap": 2}


def test_invalid_ring_caps() -> None:
    with pytest.raises(ValueError):
        EventRing(0, 10)
    with pytest.raises(ValueError):
        EventRing(10, 0)


# -- model-based test ----------------------------------------------------------------

TOPIC_LIST = sorted(TOPICS)


class RingMachine(RuleBasedStateMachine):
    """Compares EventRing to a list of every event ever published."""

    def __init__(self) -> None:
        super().__init__()
        self.ring = EventRing(1, 1)
        self.all: list[Event] = []

    @initialize(
        max_count=st.integers(1, 12),
        max_bytes=st.integers(1, 4000),
        compact_min=st.integers(1, 8),
    )
    def setup(self, max_count: int, max_bytes: int, compact_min: int) -> None:
        self.ring = EventRing(max_count, max_bytes, compact_min=compact_min)

    def retained(self) -> list[Event]:
        # Longest suffix within both caps, never empty once something was published.
        kept: list[Event] = []
        total = 0
        for ev in reversed(self.all):
            if kept and (
                len(kept) + 1 > self.ring.max_count or total + ev.nbytes > self.ring.max_bytes
            ):
                break
            kept.append(ev)
            total += ev.nbytes
        return kept[::-1]

    def model_page(self, after: int | None, limit: int, topic: str | None) -> Page:
        kept = self.retained()
        first = kept[0].id if kept else len(self.all) + 1
        lo = first - 1 if after is None else max(after, 0)
        gap = max(0, first - 1 - lo)
        match = [e for e in kept if e.id > lo and (topic is None or e.topic == topic)]
        events = match[:limit]
        nxt = events[-1].id if len(events) == limit else max(lo, first - 1, len(self.all))
        return Page(events, nxt, gap)

    @rule(topic=st.sampled_from(TOPIC_LIST), size=st.integers(0, 600))
    def publish(self, topic: str, size: int) -> None:
        ev = self.ring.publish(topic, {"pad": "p" * size}, AT)
        assert ev.id == len(self.all) + 1
        self.all.append(ev)

    @rule(items=st.lists(st.tuples(st.sampled_from(TOPIC_LIST), st.integers(0, 600)), max_size=8))
    def publish_many(self, items: list[tuple[str, int]]) -> None:
        made = self.ring.publish_many([(t, {"pad": "p" * size}) for t, size in items], AT)
        assert [e.id for e in made] == list(
            range(len(self.all) + 1, len(self.all) + 1 + len(items))
        )
        self.all.extend(made)

    @rule(
        after=st.none() | st.integers(-2, 60),
        limit=st.integers(1, 15),
        topic=st.none() | st.sampled_from(TOPIC_LIST),
    )
    def page(self, after: int | None, limit: int, topic: str | None) -> None:
        got = self.ring.page(after, limit, topic)
        assert len(got.events) <= limit
        assert got == self.model_page(after, limit, topic)

    @precondition(lambda self: bool(self.all))
    @rule(
        after=st.none() | st.integers(-2, 60),
        limit=st.integers(1, 5),
        topic=st.none() | st.sampled_from(TOPIC_LIST),
    )
    def cursor_walk(self, after: int | None, limit: int, topic: str | None) -> None:
        seen: list[int] = []
        cursor = after
        gaps = 0
        for _ in range(len(self.all) + 2):
            got = self.ring.page(cursor, limit, topic)
            assert len(got.events) <= limit
            gaps += got.gap
            seen.extend(e.id for e in got.events)
            assert cursor is None or got.next_after >= cursor
            if not got.events:
                break
            cursor = got.next_after
        else:
            raise AssertionError("cursor walk did not terminate")
        expected = self.model_page(after, len(self.all) + 1, topic)
        assert seen == [e.id for e in expected.events]  # ordered, contiguous, no duplicates
        assert gaps == expected.gap  # reported once, exactly

    @invariant()
    def accounting(self) -> None:
        kept = self.retained()
        assert len(self.ring) == len(kept)
        assert self.ring.last_id == len(self.all)
        assert self.ring.first_id == (kept[0].id if kept else len(self.all) + 1)
        assert self.ring.bytes_used == sum(e.nbytes for e in kept)
        assert len(self.ring) <= self.ring.max_count


RingMachine.TestCase.settings = settings(max_examples=150, stateful_step_count=40, deadline=None)
test_ring_machine = RingMachine.TestCase
