"""EventHub: fan-out, coalescing, heartbeats, overflow, caps, resume, shutdown (virtual time)."""

from __future__ import annotations

import gc
from collections.abc import AsyncIterator
from contextlib import aclosing, asynccontextmanager
from typing import Any

import orjson
import pytest
import trio
import trio.testing

from relay_trio.core.events import EventRing
from relay_trio.services.hub import HEARTBEAT, JOIN_LIMIT, REPLAY_PAGE, EventHub, SubscriberLimit

AT = "2026-01-01T00:00:00Z"


def parse(chunk: bytes) -> list[dict[str, str]]:
    """SSE frames in a chunk as dicts (``comment`` for ``:`` lines)."""
    frames = []
    assert chunk.endswith(b"\n\n")
    for block in chunk[:-2].split(b"\n\n"):
        frame: dict[str, str] = {}
        for line in block.decode().split("\n"):
            if line.startswith(":"):
                frame["comment"] = line[1:].strip()
            else:
                key, _, value = line.partition(": ")
                frame[key] = value
        frames.append(frame)
    return frames


def ids(chunks: list[bytes]) -> list[int]:
    return [int(f["id"]) for c in chunks for f in parse(c) if "id" in f]


@asynccontextmanager
async def running(hub: EventHub) -> AsyncIterator[trio.Nursery]:
    async with trio.open_nursery() as nursery:
        await nursery.start(hub.run)
        yield nursery
        nursery.cancel_scope.cancel()


def publish_n(hub: EventHub, n: int, topic: str = "reports") -> None:
    for i in range(n):
        hub.publish(topic, {"i": i}, AT)


async def test_heartbeat_cadence_is_exact(autojump_clock: trio.testing.MockClock) -> None:
    hub = EventHub()
    async with running(hub), hub.subscribe() as sub, aclosing(sub.stream()) as stream:
        for expected in (15, 30, 45):
            assert await anext(stream) == HEARTBEAT
            assert trio.current_time() == expected
        await trio.sleep(5)
        hub.publish("acks", {"n": 1}, AT)
        assert ids([await anext(stream)]) == [1]
        assert trio.current_time() == 50
        # Any write restarts the heartbeat clock.
        assert await anext(stream) == HEARTBEAT
        assert trio.current_time() == 65


async def test_lone_event_is_delivered_without_tick_delay(
    autojump_clock: trio.testing.MockClock,
) -> None:
    hub = EventHub(coalesce_interval=0.05)
    async with running(hub), hub.subscribe() as sub, aclosing(sub.stream()) as stream:
        await trio.sleep(7)
        hub.publish("reports", {"n": 1}, AT)
        assert ids([await anext(stream)]) == [1]
        assert trio.current_time() == 7
        # Within the throttle window the next event waits for the window to end...
        await trio.sleep(0.01)
        hub.publish("reports", {"n": 2}, AT)
        assert ids([await anext(stream)]) == [2]
        assert trio.current_time() == 7 + 0.05
        # ...but once the hub is quiet again, delivery is immediate.
        await trio.sleep(1)
        hub.publish("reports", {"n": 3}, AT)
        assert ids([await anext(stream)]) == [3]
        assert trio.current_time() == 7 + 0.05 + 1


async def test_burst_is_coalesced_into_few_chunks(autojump_clock: trio.testing.MockClock) -> None:
    hub = EventHub(coalesce_interval=0.025)
    got: list[bytes] = []
    done = trio.Event()
    async with running(hub) as nursery, hub.subscribe() as sub:

        async def read() -> None:
            async with aclosing(sub.stream()) as stream:
                async for chunk in stream:
                    got.append(chunk)
                    if ids(got)[-1:] == [1000]:
                        done.set()

        nursery.start_soon(read)
        for i in range(1000):  # one event per ms for one second
            hub.publish("reports", {"i": i}, AT)
            await trio.sleep(0.001)
        with trio.fail_after(1):
            await done.wait()
    assert ids(got) == list(range(1, 1001))
    # Leading edge + one flush per 25 ms window: ~41 writes for 1000 events.
    assert 30 <= len(got) <= 45
    assert hub.chunks == len(got)


async def test_full_batch_flushes_early_and_pending_is_bounded() -> None:
    hub = EventHub(max_batch=100, subscriber_buffer=10_000)
    sub = hub.subscribe()
    # The flusher is not running: publish must still never buffer without bound.
    publish_n(hub, 1000)
    assert len(hub._pending) < 400
    assert hub.flushes == 2
    sub.close()


async def test_slow_subscriber_is_overflowed_fast_one_gets_all(
    autojump_clock: trio.testing.MockClock,
) -> None:
    hub = EventHub(subscriber_buffer=50)
    fast_chunks: list[bytes] = []
    async with running(hub) as nursery, hub.subscribe() as fast, hub.subscribe() as slow:

        async def read_fast() -> None:
            async with aclosing(fast.stream()) as stream:
                async for chunk in stream:
                    fast_chunks.append(chunk)

        nursery.start_soon(read_fast)
        for _ in range(10):
            publish_n(hub, 50)
            await trio.sleep(0.1)
        assert ids(fast_chunks) == list(range(1, 501))
        assert (hub.overflowed, hub.dropped) == (1, 50)
        assert hub.subscriber_count() == 1
        # The slow one gets what fit in its buffer, then `overflow`, then its stream ends.
        async with aclosing(slow.stream()) as stream:
            slow_chunks = [c async for c in stream]
        frames = [f for c in slow_chunks for f in parse(c)]
        assert [int(f["id"]) for f in frames[:-1]] == list(range(1, 51))
        assert frames[-1]["event"] == "overflow"
        assert "id" not in frames[-1]
        assert orjson.loads(frames[-1]["data"]) == {
            "reason": "slow_subscriber",
            "buffer": 50,
            "last_id": 50,
        }


async def test_byte_cap_also_overflows(autojump_clock: trio.testing.MockClock) -> None:
    hub = EventHub()
    async with running(hub), hub.subscribe() as sub:
        for _ in range(3):
            size = len(hub.publish("reports", {"pad": "x" * 900}, AT).sse)
            hub.subscriber_buffer_bytes = 2 * size + 10  # room for two events, not three
            await trio.sleep(1)
        assert hub.overflowed == 1 and hub.subscriber_count() == 0
        async with aclosing(sub.stream()) as stream:
            frames = [f for c in [c async for c in stream] for f in parse(c)]
        assert [f.get("id") for f in frames] == ["1", "2", None]
        assert frames[-1]["event"] == "overflow"


async def test_caps_raise_with_scope() -> None:
    hub = EventHub(max_subscribers=3, max_subscribers_per_topic=1, retry_after=7)
    a = hub.subscribe(frozenset({"reports"}))
    with pytest.raises(SubscriberLimit) as info:
        hub.subscribe(None)  # all topics includes the full "reports"
    assert (info.value.scope, info.value.topic, info.value.limit) == ("topic", "reports", 1)
    problem = info.value.to_problem()
    assert (problem.status, problem.retry_after, problem.extra["scope"]) == (503, 7, "topic")
    # Kept referenced: a dropped Subscription would be pruned as dead.
    kept = [hub.subscribe(frozenset({"acks"})), hub.subscribe(frozenset({"drops", "system"}))]
    with pytest.raises(SubscriberLimit) as info:
        hub.subscribe(frozenset({"deadletter"}))
    assert (info.value.scope, info.value.limit, info.value.retry_after) == ("global", 3, 7)
    assert hub.subscriber_count() == 3
    assert hub.subscriber_count("reports") == 1 and hub.subscriber_count("deadletter") == 0
    a.close()
    kept.append(hub.subscribe(frozenset({"deadletter"})))
    with pytest.raises(ValueError):
        hub.subscribe(frozenset({"nope"}))
    with pytest.raises(ValueError):
        hub.subscribe(frozenset())


async def test_disconnected_subscribers_leave_the_count_at_once(
    autojump_clock: trio.testing.MockClock,
) -> None:
    hub = EventHub(max_subscribers=1)
    async with running(hub):
        async with hub.subscribe() as sub:
            assert hub.subscriber_count() == 1
            # A client disconnect arrives as cancellation of the body generator.
            with trio.move_on_after(3):
                async with aclosing(sub.stream()) as stream:
                    async for _ in stream:
                        pass
            assert hub.subscriber_count() == 0
        assert hub.subscriber_count() == 0
        # A subscription dropped without any cleanup is pruned at admission (seed 004).
        hub.subscribe()
        gc.collect()
        async with hub.subscribe():
            assert hub.subscriber_count() == 1
        assert hub.subscriber_count("reports") == 0


async def test_resume_yields_exactly_the_missed_events(
    autojump_clock: trio.testing.MockClock,
) -> None:
    hub = EventHub()
    publish_n(hub, 10)
    async with (
        running(hub),
        hub.subscribe(last_event_id=6) as sub,
        aclosing(sub.stream()) as stream,
    ):
        assert ids([await anext(stream)]) == [7, 8, 9, 10]
        hub.publish("reports", {}, AT)
        assert ids([await anext(stream)]) == [11]


async def test_resume_point_left_the_ring_gives_gap(
    autojump_clock: trio.testing.MockClock,
) -> None:
    hub = EventHub(EventRing(5, 1 << 20))
    for i in range(10):
        hub.publish("acks" if i % 2 else "reports", {"i": i}, AT)
    # Retained: 6..10. Ids 3, 4, 5 were missed by a client that saw 2.
    async with (
        running(hub),
        hub.subscribe(frozenset({"acks"}), last_event_id=2) as sub,
        aclosing(sub.stream()) as stream,
    ):
        frames = parse(await anext(stream))
    assert frames[0] == {"event": "gap", "data": '{"missed":3}'}
    assert [int(f["id"]) for f in frames[1:]] == [6, 8, 10]
    assert {f["event"] for f in frames[1:]} == {"acks"}


async def test_gap_excludes_ids_that_arrive_live(autojump_clock: trio.testing.MockClock) -> None:
    hub = EventHub(EventRing(5, 1 << 20))
    publish_n(hub, 10)
    async with running(hub), hub.subscribe(last_event_id=2) as sub:
        # The ring turns over before the replay starts: 11..20 reach the subscriber live,
        # so only 3..10 are missed.
        publish_n(hub, 10)
        async with aclosing(sub.stream()) as stream:
            frames = parse(await anext(stream))
            assert frames == [{"event": "gap", "data": '{"missed":8}'}]
            assert ids([await anext(stream)]) == list(range(11, 21))


async def test_future_last_event_id_is_a_fresh_start(
    autojump_clock: trio.testing.MockClock,
) -> None:
    hub = EventHub()
    publish_n(hub, 3)
    async with (
        running(hub),
        hub.subscribe(last_event_id=900) as sub,  # an id from before a restart
        aclosing(sub.stream()) as stream,
    ):
        hub.publish("reports", {}, AT)
        assert ids([await anext(stream)]) == [4]


async def test_events_pending_at_subscribe_are_not_duplicated(
    autojump_clock: trio.testing.MockClock,
) -> None:
    hub = EventHub()
    async with running(hub), hub.subscribe() as other:
        publish_n(hub, 5)  # pending, not yet flushed
        async with hub.subscribe(last_event_id=2) as sub, aclosing(sub.stream()) as stream:
            assert ids([await anext(stream)]) == [3, 4, 5]  # from the ring
            hub.publish("reports", {}, AT)
            assert ids([await anext(stream)]) == [6]  # live, 3..5 not repeated
        async with aclosing(other.stream()) as stream:
            assert ids([await anext(stream)]) == [1, 2, 3, 4, 5, 6]


async def test_publishing_during_a_long_replay_loses_nothing(
    autojump_clock: trio.testing.MockClock,
) -> None:
    hub = EventHub(subscriber_buffer=5000)
    total = 2 * REPLAY_PAGE + 200
    publish_n(hub, total)
    seen: list[int] = []
    async with (
        running(hub),
        hub.subscribe(last_event_id=0) as sub,
        aclosing(sub.stream()) as stream,
    ):
        seen += ids([await anext(stream)])
        assert seen == list(range(1, REPLAY_PAGE + 1))
        publish_n(hub, 5)
        await trio.sleep(1)
        while len(seen) < total + 5:
            seen += ids([await anext(stream)])
    assert seen == list(range(1, total + 6))


async def test_close_sends_shutdown_and_ends_streams(
    autojump_clock: trio.testing.MockClock,
) -> None:
    hub = EventHub()
    async with trio.open_nursery() as nursery:
        await nursery.start(hub.run)
        async with (
            hub.subscribe(frozenset({"reports"})) as sub,
            aclosing(sub.stream()) as stream,
        ):
            hub.publish("reports", {}, AT)
            hub.publish("reports", {}, AT)
            event = hub.close("sigterm", AT)
            chunks = [c async for c in stream]
        # run() returned by itself: the nursery exits without a cancel.
    assert event is not None and event.topic == "system" and event.id == 3
    frames = [f for c in chunks for f in parse(c)]
    assert [f["id"] for f in frames] == ["1", "2", "3"]
    assert frames[-1]["event"] == "shutdown"
    assert orjson.loads(frames[-1]["data"])["data"] == {"kind": "shutdown", "reason": "sigterm"}
    assert hub.ring.last_id == 3 and hub.subscriber_count() == 0
    assert hub.close("", AT) is None
    with pytest.raises(SubscriberLimit) as info:
        hub.subscribe()
    assert info.value.scope == "closed"


async def test_topic_filter_and_shared_chunks(autojump_clock: trio.testing.MockClock) -> None:
    hub = EventHub()
    async with running(hub):
        subs = [hub.subscribe(frozenset({"acks"})) for _ in range(3)]
        everything = hub.subscribe(None)
        hub.publish("reports", {}, AT)
        hub.publish("acks", {}, AT)
        hub.publish("drops", {}, AT)
        await trio.testing.wait_all_tasks_blocked()
        got: list[Any] = [s._receive.receive_nowait() for s in subs]
        # One joined chunk per distinct filter, shared by every subscriber with that filter.
        assert got[0][0] is got[1][0] is got[2][0]
        assert ids([got[0][0]]) == [2]
        assert ids([everything._receive.receive_nowait()[0]]) == [1, 2, 3]
        for s in [*subs, everything]:
            s.close()


async def test_invalid_settings() -> None:
    with pytest.raises(ValueError):
        EventHub(heartbeat_interval=0)
    with pytest.raises(ValueError):
        EventHub(subscriber_buffer=0)


async def test_stream_can_be_iterated_once() -> None:
    hub = EventHub()
    sub = hub.subscribe()
    sub.close()
    async with aclosing(sub.stream()) as stream:
        assert [c async for c in stream] == []
    with pytest.raises(RuntimeError):
        await anext(sub.stream())


async def test_lagging_subscriber_gets_one_joined_write(
    autojump_clock: trio.testing.MockClock,
) -> None:
    hub = EventHub(coalesce_interval=0.025)
    async with running(hub), hub.subscribe() as sub, aclosing(sub.stream()) as stream:
        # Three flushes (leading edge at 0, then 0.025 and 0.05) while the reader is busy.
        hub.publish("reports", {}, AT)
        await trio.sleep(0.01)
        hub.publish("reports", {}, AT)
        await trio.sleep(0.02)
        hub.publish("reports", {}, AT)
        await trio.sleep(1)
        assert hub.chunks == 3
        chunk = await anext(stream)
        assert ids([chunk]) == [1, 2, 3]
        assert trio.current_time() == 1.03
        assert sub._state.buffered_events == 0 and sub._state.buffered_bytes == 0
        hub.publish("reports", {}, AT)
        assert ids([await anext(stream)]) == [4]
        assert trio.current_time() == 1.03


async def test_join_is_bounded_by_join_limit(autojump_clock: trio.testing.MockClock) -> None:
    hub = EventHub(coalesce_interval=0.025)
    async with running(hub), hub.subscribe() as sub, aclosing(sub.stream()) as stream:
        sizes = []
        for i in range(15):
            sizes.append(len(hub.publish("reports", {"pad": "x" * 100_000, "i": i}, AT).sse))
            await trio.sleep(0.1)  # one flush (one chunk) per event
        assert hub.chunks == 15
        first = await anext(stream)
        # Joining stops at the first chunk that takes the write to JOIN_LIMIT or beyond.
        k = next(i for i in range(1, 16) if sum(sizes[:i]) >= JOIN_LIMIT)
        assert k < 15
        assert ids([first]) == list(range(1, k + 1))
        assert ids([await anext(stream)]) == list(range(k + 1, 16))


async def test_lone_event_reaches_many_subscribers_at_once(
    autojump_clock: trio.testing.MockClock,
) -> None:
    hub = EventHub(coalesce_interval=0.1)
    got: dict[int, float] = {}
    async with running(hub) as nursery:
        subs = [hub.subscribe() for _ in range(200)]

        async def read(i: int) -> None:
            async with aclosing(subs[i].stream()) as stream:
                async for chunk in stream:
                    if chunk != HEARTBEAT:
                        got[i] = trio.current_time()
                        return

        for i in range(len(subs)):
            nursery.start_soon(read, i)
        await trio.sleep(3)
        hub.publish("system", {}, AT)
        await trio.sleep(1)
        assert got == dict.fromkeys(range(200), 3.0)
        assert hub.flushes == 1


async def test_heartbeats_are_per_subscriber_and_skip_busy_ones(
    autojump_clock: trio.testing.MockClock,
) -> None:
    hub = EventHub(heartbeat_interval=10)
    beats: dict[str, list[float]] = {"a": [], "b": []}
    async with running(hub) as nursery:
        a = hub.subscribe()
        await trio.sleep(4)
        b = hub.subscribe()

        async def read(name: str, sub: Any) -> None:
            async with aclosing(sub.stream()) as stream:
                async for chunk in stream:
                    if chunk == HEARTBEAT:
                        beats[name].append(trio.current_time())

        nursery.start_soon(read, "a", a)
        nursery.start_soon(read, "b", b)
        await trio.sleep(8)  # t=12: a beat at 10, b (subscribed at 4) is due at 14...
        assert beats == {"a": [10], "b": []}
        hub.publish("reports", {}, AT)  # ...but this write restarts both clocks
        await trio.sleep(23)  # t=35
        assert beats == {"a": [10, 22, 32], "b": [22, 32]}
        # A subscriber that never reads keeps at most one heartbeat queued...
        stuck = hub.subscribe()
        await trio.sleep(100)
        assert stuck._state.buffered_bytes == len(HEARTBEAT)
        assert stuck._receive.statistics().current_buffer_used == 1
        # ...and none while data is queued for it.
        hub.publish("acks", {}, AT)
        await trio.sleep(50)
        assert stuck._receive.statistics().current_buffer_used == 2
        async with aclosing(stuck.stream()) as stream:
            chunk = await anext(stream)
        assert chunk.startswith(HEARTBEAT) and ids([chunk[len(HEARTBEAT) :]]) == [2]
        nursery.cancel_scope.cancel()


async def test_flush_window_widens_with_the_writes_a_flush_caused(
    autojump_clock: trio.testing.MockClock,
) -> None:
    # 100 subscribers at 1000 writes/s: after a flush to all of them the next waits 0.1 s.
    hub = EventHub(coalesce_interval=0.025, sse_write_budget=1000)
    seen: dict[int, list[tuple[float, list[int]]]] = {i: [] for i in range(100)}
    async with running(hub) as nursery:
        subs = [hub.subscribe() for _ in range(100)]

        async def read(i: int) -> None:
            async with aclosing(subs[i].stream()) as stream:
                async for chunk in stream:
                    seen[i].append((trio.current_time(), ids([chunk])))

        for i in range(100):
            nursery.start_soon(read, i)
        await trio.sleep(1)
        hub.publish("reports", {}, AT)  # quiet hub: out at once
        await trio.sleep(0.01)
        hub.publish("reports", {}, AT)  # waits for the 0.1 s window
        await trio.sleep(0.2)
        assert hub.flush_window() == 0.1
        expected = [(1.0, [1]), (1.1, [2])]
        assert all(got == expected for got in seen.values())
        # With 10 subscribers the floor (coalesce_interval) applies again.
        for sub in subs[10:]:
            sub.close()
        hub.publish("reports", {}, AT)  # t=1.21: quiet again, out at once
        hub.publish("reports", {}, AT)
        await trio.sleep(0.001)
        hub.publish("reports", {}, AT)
        await trio.sleep(0.1)
        assert hub.last_flush_writes == 10 and hub.flush_window() == 0.025
        # (Virtual times summed from floats: compare to the nanosecond.)
        assert [got for _, got in seen[0][2:]] == [[3, 4], [5]]
        assert [t for t, _ in seen[0][2:]] == pytest.approx([1.21, 1.235], abs=1e-9)
        nursery.cancel_scope.cancel()
