"""Side queue: never blocks the producer, isolates sinks, bounds every write (seed 001)."""

from __future__ import annotations

import inspect
import json
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import attrs
import httpx
import pytest
import trio
import trio.testing
from hypercorn.config import Config as HypercornConfig
from hypercorn.trio import serve
from hypothesis import given, settings
from hypothesis import strategies as st

from relay_trio.services.sidequeue import SideQueue
from relay_trio.sinks.audit import AuditFileSink
from relay_trio.sinks.base import SideSink
from relay_trio.sinks.factory import build_sinks
from relay_trio.sinks.udp import UdpSink, parse_udp_target
from relay_trio.sinks.webhook import WebhookSink

# --------------------------------------------------------------------------- test sinks


@attrs.define(eq=False)
class RecordingSink:
    """Accepts everything after one checkpoint."""

    name: str = "healthy"
    batches: list[list[bytes]] = attrs.field(factory=list)
    closed: bool = False

    @property
    def records(self) -> list[bytes]:
        return [r for batch in self.batches for r in batch]

    async def write(self, batch: Sequence[bytes]) -> None:
        await trio.lowlevel.checkpoint()
        self.batches.append(list(batch))

    async def aclose(self) -> None:
        self.closed = True
        await trio.lowlevel.checkpoint()


@attrs.define(eq=False)
class GatedSink:
    """``write`` waits for ``gate`` (an Event that is never set = stalled forever)."""

    name: str = "stalled"
    gate: trio.Event = attrs.field(factory=trio.Event)
    started_at: list[float] = attrs.field(factory=list)
    cancelled_at: list[float] = attrs.field(factory=list)
    batches: list[list[bytes]] = attrs.field(factory=list)
    closed: bool = False

    async def write(self, batch: Sequence[bytes]) -> None:
        self.started_at.append(trio.current_time())
        done = False
        try:
            await self.gate.wait()
            done = True
        finally:
            if not done:
                self.cancelled_at.append(trio.current_time())
        self.batches.append(list(batch))

    async def aclose(self) -> None:
        self.closed = True
        await trio.lowlevel.checkpoint()


@attrs.define(eq=False)
class ScriptedSink:
    """Behaves per ``mode``: ``ok``, ``raise`` or ``hang``; ``delay`` seconds before ``ok``."""

    name: str = "scripted"
    mode: str = "ok"
    delay: float = 0.0
    batches: list[list[bytes]] = attrs.field(factory=list)
    closed: bool = False

    @property
    def records(self) -> list[bytes]:
        return [r for batch in self.batches for r in batch]

    async def write(self, batch: Sequence[bytes]) -> None:
        if self.mode == "raise":
            await trio.lowlevel.checkpoint()
            raise RuntimeError("sink is broken")
        if self.mode == "hang":
            await trio.sleep_forever()
        await trio.sleep(self.delay)
        self.batches.append(list(batch))

    async def aclose(self) -> None:
        self.closed = True
        await trio.lowlevel.checkpoint()


@asynccontextmanager
async def running(queue: SideQueue) -> AsyncIterator[trio.Nursery]:
    """Run ``queue`` in a nursery; a hang fails after 60 s (virtual time under autojump)."""
    with trio.fail_after(60):
        async with trio.open_nursery() as nursery:
            await nursery.start(queue.run)
            yield nursery


def balance(row: dict[str, int]) -> int:
    """offered minus every place a record can be; must always be 0."""
    return row["offered"] - (
        row["written"]
        + row["dropped_full"]
        + row["dropped_closed"]
        + row["failed"]
        + row["queued"]
        + row["in_flight"]
    )


def rec(i: int) -> bytes:
    return json.dumps({"seq": i}).encode()


# --------------------------------------------------------------------------- queue behaviour


def test_offer_is_synchronous() -> None:
    assert not inspect.iscoroutinefunction(SideQueue.offer)


async def test_stalled_sink_fills_queue_and_offer_never_blocks(
    autojump_clock: trio.testing.MockClock,
) -> None:
    stalled, healthy = GatedSink(), RecordingSink()
    queue = SideQueue([stalled, healthy], queue_size=100, timeout=1000, batch_max=10)
    async with running(queue) as nursery:
        queue.offer(rec(0))
        await trio.testing.wait_all_tasks_blocked()
        assert queue.stats()["stalled"]["in_flight"] == 1

        n = 10_000
        t0 = time.perf_counter()
        for i in range(1, n + 1):
            queue.offer(rec(i))
        elapsed = time.perf_counter() - t0
        # No checkpoint happened inside the loop: the healthy worker never got to run, so
        # its queue filled too, and virtual time did not move.
        assert healthy.records == [rec(0)]
        assert trio.current_time() == 0
        assert elapsed < 2.0, elapsed

        offers = n + 1
        s = queue.stats()["stalled"]
        assert s["offered"] == offers
        assert s["queued"] == 100
        assert s["dropped_full"] == offers - (100 + 1)
        assert balance(s) == 0

        await trio.testing.wait_all_tasks_blocked()
        # The idle healthy worker was parked in receive(), so the first offer was handed to it
        # directly: its capacity was queue_size + 1.
        assert healthy.records == [rec(i) for i in range(102)]
        h = queue.stats()["healthy"]
        assert h["written"] == 102
        assert h["dropped_full"] == offers - 102
        assert balance(h) == 0
        nursery.cancel_scope.cancel()


async def test_stalled_sink_does_not_starve_healthy_one(
    autojump_clock: trio.testing.MockClock,
) -> None:
    stalled, healthy = GatedSink(), RecordingSink()
    queue = SideQueue([stalled, healthy], queue_size=10, timeout=1000, batch_max=4)
    async with running(queue) as nursery:
        sent = []
        for burst in range(50):
            for j in range(8):
                sent.append(rec(burst * 8 + j))
                queue.offer(sent[-1])
            await trio.testing.wait_all_tasks_blocked()
        assert healthy.records == sent
        h, s = queue.stats()["healthy"], queue.stats()["stalled"]
        assert (h["written"], h["dropped_full"], h["failed"]) == (400, 0, 0)
        assert s["written"] == 0
        assert s["in_flight"] == 4
        assert s["queued"] == 10
        assert s["dropped_full"] == 400 - 10 - 4
        assert balance(s) == 0
        assert trio.current_time() == 0
        nursery.cancel_scope.cancel()


async def test_timeout_fires_at_exactly_timeout(autojump_clock: trio.testing.MockClock) -> None:
    stalled = GatedSink()
    queue = SideQueue([stalled], queue_size=10, timeout=2.0)
    async with running(queue) as nursery:
        queue.offer(rec(1))
        queue.offer(rec(2))
        await trio.testing.wait_all_tasks_blocked()
        queue.offer(rec(3))
        await trio.sleep(5)
        assert stalled.started_at == [0.0, 2.0]
        assert stalled.cancelled_at == [2.0, 4.0]
        s = queue.stats()["stalled"]
        assert (s["timeouts"], s["failed"], s["errors"], s["written"]) == (2, 3, 0, 0)
        assert balance(s) == 0
        nursery.cancel_scope.cancel()


async def test_stalled_sink_recovers_and_writes_new_records(
    autojump_clock: trio.testing.MockClock,
) -> None:
    stalled = GatedSink()
    queue = SideQueue([stalled], timeout=2.0)
    async with running(queue) as nursery:
        queue.offer(rec(1))
        await trio.sleep(3)
        assert queue.stats()["stalled"]["timeouts"] == 1
        stalled.gate.set()
        queue.offer(rec(2))
        queue.offer(rec(3))
        await trio.testing.wait_all_tasks_blocked()
        assert stalled.batches == [[rec(2), rec(3)]]
        s = queue.stats()["stalled"]
        assert (s["written"], s["failed"], s["timeouts"]) == (2, 1, 1)
        assert trio.current_time() == 3
        nursery.cancel_scope.cancel()


async def test_raising_sink_is_counted_and_worker_continues(
    autojump_clock: trio.testing.MockClock,
) -> None:
    broken = ScriptedSink(mode="raise")
    queue = SideQueue([broken], batch_max=2)
    async with running(queue) as nursery:
        for i in range(3):
            queue.offer(rec(i))
        await trio.testing.wait_all_tasks_blocked()
        s = queue.stats()["scripted"]
        assert (s["errors"], s["failed"], s["written"]) == (2, 3, 0)
        broken.mode = "ok"
        queue.offer(rec(9))
        await trio.testing.wait_all_tasks_blocked()
        assert broken.records == [rec(9)]
        assert balance(queue.stats()["scripted"]) == 0
        nursery.cancel_scope.cancel()


async def test_drain_flushes_queue_and_closes_sinks(
    autojump_clock: trio.testing.MockClock,
) -> None:
    slow = ScriptedSink(delay=1.0)
    queue = SideQueue([slow], batch_max=2, timeout=5)
    async with running(queue) as nursery:
        for i in range(6):
            queue.offer(rec(i))
        assert await queue.drain(10) is True
        assert trio.current_time() == 3
        assert slow.records == [rec(i) for i in range(6)]
        assert slow.closed
        queue.offer(rec(99))
        s = queue.stats()["scripted"]
        assert (s["written"], s["dropped_closed"], s["offered"]) == (6, 1, 7)
        assert balance(s) == 0
    # run() returned by itself: the nursery exited without being cancelled.
    assert not nursery.cancel_scope.cancelled_caught


async def test_drain_budget_exceeded_cancels_workers_and_counts_leftovers(
    autojump_clock: trio.testing.MockClock,
) -> None:
    stalled, healthy = GatedSink(), RecordingSink()
    queue = SideQueue([stalled, healthy], queue_size=10, timeout=100, batch_max=2)
    async with running(queue):
        for i in range(5):
            queue.offer(rec(i))
        await trio.testing.wait_all_tasks_blocked()
        assert await queue.drain(1.5) is False
        assert trio.current_time() == 1.5
    s = queue.stats()["stalled"]
    assert (s["dropped_closed"], s["failed"], s["written"]) == (5, 0, 0)
    assert balance(s) == 0
    assert queue.stats()["healthy"]["written"] == 5
    assert stalled.closed and healthy.closed


async def test_drain_without_run_discards_and_closes() -> None:
    sink = RecordingSink()
    queue = SideQueue([sink])
    queue.offer(rec(1))
    queue.offer(rec(2))
    assert await queue.drain(1) is False
    s = queue.stats()["healthy"]
    assert (s["dropped_closed"], s["queued"]) == (2, 0)
    assert sink.closed
    assert await SideQueue([RecordingSink()]).drain(1) is True


async def test_run_twice_raises() -> None:
    queue = SideQueue([RecordingSink()])
    async with running(queue) as nursery:
        with pytest.raises(RuntimeError):
            await queue.run()
        nursery.cancel_scope.cancel()


def test_validation() -> None:
    with pytest.raises(ValueError, match="unique"):
        SideQueue([RecordingSink(), RecordingSink()])
    with pytest.raises(ValueError, match="queue_size"):
        SideQueue([], queue_size=0)
    with pytest.raises(ValueError, match="timeout"):
        SideQueue([], timeout=float("inf"))
    with pytest.raises(ValueError, match="batch_max"):
        SideQueue([], batch_max=0)
    with pytest.raises(ValueError, match="max_datagram"):
        UdpSink("127.0.0.1", 9, max_datagram=70_000)


# --------------------------------------------------------------------------- property


OPS = st.lists(
    st.one_of(
        st.tuples(st.just("offer"), st.integers(1, 12)),
        st.tuples(st.just("sleep"), st.sampled_from([0.5, 1.0, 2.0, 3.0])),
        st.tuples(st.just("mode"), st.sampled_from(["ok", "raise", "hang"])),
    ),
    max_size=30,
)


@settings(max_examples=150, deadline=None)
@given(
    ops=OPS,
    queue_size=st.integers(1, 12),
    batch_max=st.integers(1, 5),
    drain_budget=st.sampled_from([0.5, 5.0]),
)
def test_accounting_always_balances(
    ops: list[tuple[str, Any]], queue_size: int, batch_max: int, drain_budget: float
) -> None:
    async def main() -> None:
        flaky = ScriptedSink(name="flaky", delay=0.25)
        healthy = RecordingSink()
        queue = SideQueue([flaky, healthy], queue_size=queue_size, timeout=1.0, batch_max=batch_max)
        seq = 0
        async with running(queue):
            for op, arg in ops:
                if op == "offer":
                    # Bursts no larger than the queue never drop on a healthy sink.
                    for _ in range(min(arg, queue_size)):
                        queue.offer(rec(seq))
                        seq += 1
                elif op == "sleep":
                    await trio.sleep(arg)
                else:
                    flaky.mode = arg
                await trio.testing.wait_all_tasks_blocked()
                for row in queue.stats().values():
                    assert balance(row) == 0
            await queue.drain(drain_budget)
        stats = queue.stats()
        for row in stats.values():
            assert balance(row) == 0
            assert row["queued"] == row["in_flight"] == 0
        assert healthy.records == [rec(i) for i in range(seq)]
        assert stats["flaky"]["written"] == len(flaky.records)
        # FIFO per sink: what got written is an ordered subsequence of what was offered.
        written = [json.loads(r)["seq"] for r in flaky.records]
        assert written == sorted(set(written))
        assert flaky.closed and healthy.closed

    trio.run(main, clock=trio.testing.MockClock(autojump_threshold=0))


# --------------------------------------------------------------------------- real sinks


async def test_audit_file_sink_writes_one_json_line_per_record(tmp_path: Path) -> None:
    path = tmp_path / "nested" / "audit.jsonl"
    sink = AuditFileSink(path)
    queue = SideQueue([sink], batch_max=3)
    records = [json.dumps({"seq": i, "text": "é"}, ensure_ascii=False).encode() for i in range(7)]
    with trio.fail_after(10):
        async with running(queue):
            for r in records:
                queue.offer(r)
            assert await queue.drain(5) is True
    lines = path.read_bytes().split(b"\n")
    assert lines[-1] == b""
    assert lines[:-1] == records
    assert [json.loads(line)["seq"] for line in lines[:-1]] == list(range(7))
    assert queue.stats()["audit_file"]["written"] == 7
    with pytest.raises(trio.ClosedResourceError):
        await sink.write([b"{}"])


async def test_audit_file_sink_appends_across_instances(tmp_path: Path) -> None:
    path = tmp_path / "audit.jsonl"
    for i in range(2):
        sink = AuditFileSink(path)
        await sink.write([rec(i)])
        await sink.aclose()
    assert path.read_bytes() == rec(0) + b"\n" + rec(1) + b"\n"


async def test_udp_sink_sends_one_datagram_per_record() -> None:
    receiver = trio.socket.socket(trio.socket.AF_INET, trio.socket.SOCK_DGRAM)
    with receiver, trio.fail_after(10):
        await receiver.bind(("127.0.0.1", 0))
        host, port = receiver.getsockname()
        udp = UdpSink(host, port, max_datagram=100)
        queue = SideQueue([udp])
        records = [rec(i) for i in range(5)]
        async with running(queue):
            queue.offer(records[0])
            queue.offer(b'"' + b"x" * 200 + b'"')  # oversized: dropped, not fragmented
            for r in records[1:]:
                queue.offer(r)
            got = [await receiver.recv(65_536) for _ in records]
            assert await queue.drain(5) is True
        assert got == records
        s = queue.stats()["udp"]
        assert (s["oversized"], s["datagrams_sent"], s["written"]) == (1, 5, 6)


@attrs.define(eq=False)
class WebhookApp:
    """A minimal ASGI app: records POST bodies, answers with the status in the path."""

    bodies: dict[str, list[bytes]] = attrs.field(factory=dict)

    async def __call__(
        self,
        scope: dict[str, Any],
        receive: Callable[[], Awaitable[dict[str, Any]]],
        send: Callable[[dict[str, Any]], Awaitable[None]],
    ) -> None:
        if scope["type"] == "lifespan":
            while True:
                message = await receive()
                if message["type"] == "lifespan.startup":
                    await send({"type": "lifespan.startup.complete"})
                elif message["type"] == "lifespan.shutdown":
                    await send({"type": "lifespan.shutdown.complete"})
                    return
        body = b""
        while True:
            message = await receive()
            body += message.get("body", b"")
            if not message.get("more_body"):
                break
        path = scope["path"]
        self.bodies.setdefault(path, []).append(body)
        status = int(path.rsplit("/", 1)[-1])
        await send({"type": "http.response.start", "status": status, "headers": []})
        await send({"type": "http.response.body", "body": b""})


async def test_webhook_sink_posts_json_array_and_counts_http_failures() -> None:
    app = WebhookApp()
    # Hypercorn types apps with TypedDict events; this hand-written app uses plain dicts.
    asgi_app: Any = app
    config = HypercornConfig()
    config.bind = ["127.0.0.1:0"]
    stop = trio.Event()
    with trio.fail_after(15):
        async with trio.open_nursery() as server_nursery:
            binds = await server_nursery.start(
                lambda task_status: serve(
                    asgi_app, config, shutdown_trigger=stop.wait, task_status=task_status
                )
            )
            base = binds[0]
            async with httpx.AsyncClient() as client:
                ok = WebhookSink(f"{base}/hook/200", client)
                bad = WebhookSink(f"{base}/hook/500", client, name="webhook_500")
                queue = SideQueue([ok, bad], batch_max=10)
                async with running(queue):
                    for i in range(3):
                        queue.offer(rec(i))
                    assert await queue.drain(5) is True
            stop.set()
    assert [json.loads(b) for b in app.bodies["/hook/200"]] == [
        [{"seq": 0}, {"seq": 1}, {"seq": 2}]
    ]
    assert len(app.bodies["/hook/500"]) == 1
    stats = queue.stats()
    assert (stats["webhook"]["written"], stats["webhook"]["errors"]) == (3, 0)
    assert (stats["webhook_500"]["errors"], stats["webhook_500"]["failed"]) == (1, 3)
    assert stats["webhook_500"]["written"] == 0


async def test_webhook_sink_owns_and_closes_its_client() -> None:
    sink = WebhookSink("http://127.0.0.1:9/x", None)
    await sink.aclose()
    with pytest.raises(RuntimeError):
        await sink.write([b"{}"])


# --------------------------------------------------------------------------- config


@pytest.mark.parametrize(
    ("target", "expected"),
    [
        ("127.0.0.1:514", ("127.0.0.1", 514)),
        ("logs.example:9999", ("logs.example", 9999)),
        ("[::1]:514", ("::1", 514)),
        (" localhost:1 ", ("localhost", 1)),
    ],
)
def test_parse_udp_target(target: str, expected: tuple[str, int]) -> None:
    assert parse_udp_target(target) == expected


@pytest.mark.parametrize(
    "target",
    ["", "host", ":514", "host:", "host:0", "host:65536", "host:x1", "::1:514", "[::1:514", "[]:5"],
)
def test_parse_udp_target_rejects(target: str) -> None:
    with pytest.raises(ValueError, match="side_udp"):
        parse_udp_target(target)


async def test_build_sinks() -> None:
    assert build_sinks(None, None, None, None) == []
    assert build_sinks("", "", "", None) == []
    async with httpx.AsyncClient() as client:
        sinks: list[SideSink] = build_sinks(
            "/tmp/a.jsonl", "127.0.0.1:514", "https://hooks.example/x", client
        )
        assert [s.name for s in sinks] == ["audit_file", "udp", "webhook"]
        udp = sinks[1]
        assert isinstance(udp, UdpSink) and (udp.host, udp.port) == ("127.0.0.1", 514)
        for bad in ("ftp://x/y", "not a url", "http://"):
            with pytest.raises(ValueError, match="side_webhook"):
                build_sinks(None, None, bad, client)
        with pytest.raises(ValueError, match="side_udp"):
            build_sinks(None, "nope", None, client)
