"""The cluster event mirror's pure parts and the hub's mirror mode, without NATS: events
numbered elsewhere, holes, older pages through the ``older`` port, the bounded outbox."""

from __future__ import annotations

from contextlib import aclosing

import orjson
import pytest
import trio
import trio.testing
from test_hub import parse, running

from relay_trio.cluster.eventlog import EventOutbox
from relay_trio.core.events import Event, EventRing, Page, envelope, mirrored
from relay_trio.services.hub import EventHub, HistoryUnavailable

AT = "2026-01-01T00:00:00Z"


def event(id: int, topic: str = "reports", n: int = 0) -> Event:
    return mirrored(id, topic, envelope(topic, AT, "a", {"n": n}))


def test_a_mirrored_event_is_the_envelope_with_its_id_in_front() -> None:
    e = event(41, "acks", 7)
    body = orjson.loads(e.json)
    assert list(body) == ["id", "topic", "at", "instance", "data"]
    assert body == {"id": 41, "topic": "acks", "at": AT, "instance": "a", "data": {"n": 7}}
    assert e.sse == b"id: 41\nevent: acks\ndata: " + e.json + b"\n\n"
    assert e.nbytes == len(e.json) + len(e.sse) + 192
    with pytest.raises(ValueError, match="unknown topic"):
        envelope("nope", AT, "a", {})


def test_append_takes_ids_from_the_stream_ignores_old_ones_and_restarts_at_a_hole() -> None:
    ring = EventRing(100, 1 << 20)
    assert ring.append(event(7))
    assert ring.append(event(8, "acks"))
    assert (ring.first_id, ring.last_id) == (7, 8)
    assert not ring.append(event(8)) and not ring.append(event(3))
    assert len(ring) == 2
    page = ring.page(0, 10)
    assert [e.id for e in page.events] == [7, 8] and page.gap == 6
    # 9 and 10 are gone from the stream: the ring keeps a contiguous run from 11.
    assert ring.append(event(11))
    assert (ring.first_id, ring.last_id, len(ring)) == (11, 11, 1)
    assert ring.bytes_used == event(11).nbytes
    assert ring.page(8, 10).gap == 2
    assert ring.page(0, 10, "acks").events == []
    with pytest.raises(ValueError, match="unknown topic"):
        ring.append(Event(12, "nope", b"{}", b"", 1))
    assert ring.last_id == 11
    # Trimming works on mirrored events as on published ones.
    small = EventRing(3, 1 << 20)
    for i in range(1, 6):
        small.append(event(i))
    assert [e.id for e in small.page(None, 10).events] == [3, 4, 5]


class Older:
    """An ``older`` port over a dict of stored events (what the stream still has)."""

    def __init__(self, stored: dict[int, Event]) -> None:
        self.stored = stored
        self.calls: list[tuple[int, int, int]] = []
        self.down = False

    async def page(self, after: int, limit: int, topic: str | None, before: int) -> Page:
        await trio.lowlevel.checkpoint()
        if self.down:
            raise HistoryUnavailable("down")
        self.calls.append((after, limit, before))
        first = min(self.stored, default=before)
        out = [
            self.stored[i]
            for i in range(after + 1, before)
            if i in self.stored and (topic is None or self.stored[i].topic == topic)
        ][:limit]
        next_after = out[-1].id if len(out) == limit else before - 1
        return Page(out, next_after, max(0, min(first - 1, next_after) - after))


def mirror_hub(ring_size: int, stream: range, gone_below: int) -> tuple[EventHub, Older]:
    """A hub whose ring holds the last ``ring_size`` of ``stream``; the older port holds
    the ids from ``gone_below`` on."""
    older = Older({i: event(i, n=i) for i in stream if i >= gone_below})
    hub = EventHub(EventRing(ring_size, 1 << 20), older=older)
    for i in stream:
        hub.publish_event(event(i, n=i))
    return hub, older


async def test_pages_below_the_ring_come_from_the_older_port_then_the_ring() -> None:
    hub, older = mirror_hub(5, range(1, 31), gone_below=11)
    assert hub.ring.first_id == 26
    page = await hub.page(0, 1000)
    assert [e.id for e in page.events] == list(range(11, 31))
    assert (page.gap, page.next_after) == (10, 30)
    assert older.calls == [(0, 1000, 26)]
    # A full page from the stream stops there; the cursor walk continues seamlessly.
    page = await hub.page(12, 4)
    assert [e.id for e in page.events] == [13, 14, 15, 16] and page.next_after == 16
    page = await hub.page(24, 4)
    assert [e.id for e in page.events] == [25, 26, 27, 28] and page.gap == 0
    # Ids in the ring never ask the port; a topic page filters both parts.
    calls = len(older.calls)
    assert [e.id for e in (await hub.page(25, 10)).events] == [26, 27, 28, 29, 30]
    assert len(older.calls) == calls
    assert (await hub.page(0, 10, "acks")).events == []
    older.down = True
    with pytest.raises(HistoryUnavailable):
        await hub.page(3, 10)
    assert [e.id for e in (await hub.page(None, 10)).events] == [26, 27, 28, 29, 30]


async def test_sse_resume_below_the_ring_replays_the_stream_then_the_ring_then_live(
    autojump_clock: trio.testing.MockClock,
) -> None:
    hub, _ = mirror_hub(5, range(1, 31), gone_below=11)
    async with running(hub):
        sub = hub.subscribe(None, 2)
        async with sub, aclosing(sub.stream()) as stream:
            frames = parse(await anext(stream))  # the stream's part: gap, then 11..25
            assert frames[0] == {"event": "gap", "data": '{"missed":8}'}
            assert [int(f["id"]) for f in frames[1:]] == list(range(11, 26))
            frames = parse(await anext(stream))  # the ring's part
            assert [int(f["id"]) for f in frames] == list(range(26, 31))
            hub.publish_event(event(31))
            assert [int(f["id"]) for f in parse(await anext(stream))] == [31]
            # The mirror skipped 32..33 (gone before it saw them): a gap where it happened.
            hub.publish_event(event(34))
            got = parse(await anext(stream))
            assert got[0] == {"event": "gap", "data": '{"missed":2}'}
            if len(got) == 1:
                got += parse(await anext(stream))
            assert [int(f["id"]) for f in got[1:]] == [34]


async def test_sse_resume_ends_the_stream_when_older_ids_cannot_be_read(
    autojump_clock: trio.testing.MockClock,
) -> None:
    hub, older = mirror_hub(5, range(1, 31), gone_below=1)
    older.down = True
    async with running(hub):
        sub = hub.subscribe(None, 2)
        async with sub, aclosing(sub.stream()) as stream:
            # No gap frame for events that still exist: the client reconnects and resumes.
            assert [chunk async for chunk in stream] == []


async def test_resuming_at_an_id_the_mirror_has_not_reached_waits_for_it(
    autojump_clock: trio.testing.MockClock,
) -> None:
    hub = EventHub(EventRing(100, 1 << 20))
    hub.publish_event(event(1))

    async def arrive() -> None:
        await trio.sleep(0.3)
        hub.publish_event(event(2))
        await trio.sleep(0.3)
        hub.publish_event(event(3))

    async with trio.open_nursery() as nursery:
        nursery.start_soon(arrive)
        assert await hub.wait_for(3, 2.0)
        assert trio.current_time() == pytest.approx(0.6)
    assert not await hub.wait_for(9, 1.0)
    assert trio.current_time() == pytest.approx(1.6)


async def test_an_unnumbered_close_sends_a_shutdown_frame_without_id(
    autojump_clock: trio.testing.MockClock,
) -> None:
    hub = EventHub(EventRing(100, 1 << 20))
    hub.publish_event(event(5))
    async with running(hub):
        sub = hub.subscribe()
        async with sub, aclosing(sub.stream()) as stream:
            assert hub.close("test", AT, numbered=False) is None
            frames = [f for chunk in [c async for c in stream] for f in parse(chunk)]
    assert frames == [
        {
            "event": "shutdown",
            "data": '{"topic":"system","at":"2026-01-01T00:00:00Z",'
            '"data":{"kind":"shutdown","reason":"test"}}',
        }
    ]
    assert hub.ring.last_id == 5


def test_the_outbox_keeps_the_newest_in_order_and_counts_what_it_dropped() -> None:
    box = EventOutbox(3, "a-1")
    for i in range(5):
        box.put("relay.events.system", b"%d" % i)
    assert [body for _, _, body in box.items] == [b"2", b"3", b"4"]
    assert (box.lost, box.unreported) == (2, 2)
    assert [mid for mid, _, _ in box.items] == ["a-1-3", "a-1-4", "a-1-5"]
    taken = box.take(2)
    assert [b for _, _, b in taken] == [b"2", b"3"]
    box.put("relay.events.system", b"5")
    box.put("relay.events.system", b"6")
    # Two were stored, nothing came back: give back none; then a failed batch returns.
    box.restore([])
    assert [b for _, _, b in box.items] == [b"4", b"5", b"6"]
    again = box.take(3)
    box.put("relay.events.system", b"7")
    box.restore(again)  # not stored: back in front, the oldest beyond capacity dropped
    assert [b for _, _, b in box.items] == [b"5", b"6", b"7"]
    assert box.lost == 3
