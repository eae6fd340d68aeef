"""The relay's admission path in virtual time: limiter, stale ACK, eviction, payload cache."""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import pytest
import trio
import trio.testing
from relay_helpers import MemoryUpstream, memory_relay

from relay_trio.core.model import Accepted, Problem
from relay_trio.relay import Relay


@asynccontextmanager
async def started(relay: Relay) -> AsyncIterator[Relay]:
    async with trio.open_nursery() as nursery:
        await nursery.start(relay.run)
        yield relay
        nursery.cancel_scope.cancel()


def report(rid: str = "vm-1", payload: Any = None, kind: str | None = None) -> dict[str, Any]:
    body: dict[str, Any] = {
        "resource_id": rid,
        "payload": payload if payload is not None else {"n": 1},
    }
    if kind:
        body["kind"] = kind
    return body


def only_upstream(ups: dict[str, MemoryUpstream]) -> MemoryUpstream:
    (up,) = ups.values()
    return up


async def test_second_report_is_rate_limited_until_exactly_sixty_seconds(
    tmp_path: Path, autojump_clock: trio.testing.MockClock
) -> None:
    relay, _ = memory_relay(tmp_path)
    async with started(relay):
        t0 = trio.current_time()
        first = relay.admit(report())
        assert isinstance(first, Accepted) and first.message_id == "vm-1:1"
        second = relay.admit(report())
        assert isinstance(second, Problem)
        assert (second.status, second.extra["reason"], second.retry_after) == (
            429,
            "rate_limited",
            60.0,
        )
        await trio.sleep_until(t0 + 59.999)
        third = relay.admit(report())
        assert isinstance(third, Problem) and third.retry_after == pytest.approx(0.001)
        await trio.sleep_until(t0 + 60)
        fourth = relay.admit(report())
        assert isinstance(fourth, Accepted) and fourth.message_id == "vm-1:2"


async def test_report_reaches_upstream_and_sync_ack_clears_pending(
    tmp_path: Path, autojump_clock: trio.testing.MockClock
) -> None:
    relay, ups = memory_relay(tmp_path)
    async with started(relay):
        relay.admit(report(payload={"cpu": 3}, kind="scan"))
        await trio.sleep(1)
        up = only_upstream(ups)
        assert [(m.message_id, m.payload, m.kind, m.attempt) for m in up.received] == [
            ("vm-1:1", {"cpu": 3}, "scan", 1)
        ]
        state = relay.resources.get("vm-1")
        assert state is not None
        assert state.pending_message_id is None and state.last_acked_at is not None
        assert state.payload is None  # released: the acked message carried it
        assert relay.umh.pending_count() == 0


async def test_stale_ack_rejects_after_threshold_until_an_ack_arrives(
    tmp_path: Path, autojump_clock: trio.testing.MockClock
) -> None:
    relay, _ = memory_relay(
        tmp_path,
        mode="sent",
        stale_ack_threshold=100,
        rate_per_minute=600,
        burst=100,
        ack_timeout=1000,
    )
    async with started(relay):
        t0 = trio.current_time()
        assert isinstance(relay.admit(report()), Accepted)
        await trio.sleep_until(t0 + 99.9)
        assert isinstance(relay.admit(report()), Accepted)  # "vm-1:2" supersedes "vm-1:1"
        await trio.sleep_until(t0 + 100)
        stale = relay.admit(report(payload={"latest": True}))
        assert isinstance(stale, Problem)
        assert (stale.status, stale.extra["reason"]) == (429, "stale_ack")
        # The ACK for the superseded message is late and does not clear the newer one.
        assert relay.acknowledge("vm-1:1", "ack", None, None) == "late"
        assert isinstance(relay.admit(report()), Problem)
        assert relay.acknowledge("vm-1:2", "ack", None, None) == "acked"
        assert isinstance(relay.admit(report()), Accepted)


async def test_rejected_report_refreshes_payload_that_the_retry_resends(
    tmp_path: Path, autojump_clock: trio.testing.MockClock
) -> None:
    relay, ups = memory_relay(tmp_path, mode="sent", ack_timeout=30, retry_base=5, retry_cap=5)
    async with started(relay):
        relay.admit(report(payload="A"))
        rejected = relay.admit(report(payload="B"))
        assert isinstance(rejected, Problem)
        up = only_upstream(ups)
        await trio.sleep(40)
        assert [(m.message_id, m.payload, m.attempt) for m in up.received] == [
            ("vm-1:1", "A", 1),
            ("vm-1:1", "B", 2),
        ]


async def test_dry_run_counts_but_admits(
    tmp_path: Path, autojump_clock: trio.testing.MockClock
) -> None:
    relay, _ = memory_relay(tmp_path, dry_run=True)
    async with started(relay):
        results = [relay.admit(report()) for _ in range(3)]
        assert all(isinstance(r, Accepted) for r in results)
        assert relay.metrics.value("relay_dry_run_would_reject_total") == 2


async def test_idle_resource_evicted_at_the_exact_tick_and_active_bucket_kept(
    tmp_path: Path, autojump_clock: trio.testing.MockClock
) -> None:
    relay, _ = memory_relay(tmp_path, resource_ttl=100, stale_ack_threshold=200)
    assert relay.config.effective_eviction_interval == 100
    async with started(relay):
        t0 = trio.current_time()
        relay.admit(report("idle"))
        await trio.sleep_until(t0 + 50)
        relay.admit(report("active"))
        await trio.sleep_until(t0 + 99.999)
        assert relay.resources.get("idle") is not None
        await trio.sleep_until(t0 + 100.001)
        assert relay.resources.get("idle") is None
        # "active" was updated at t=50: kept, and its bucket still remembers that report.
        state = relay.resources.get("active")
        assert state is not None
        again = relay.admit(report("active"))
        assert isinstance(again, Problem) and again.retry_after == pytest.approx(10 - 0.001)
        assert relay.resources.evicted_idle == 1


async def test_full_send_queue_is_back_pressure_not_loss(
    tmp_path: Path, autojump_clock: trio.testing.MockClock
) -> None:
    relay, ups = memory_relay(tmp_path, send_queue_size=1, sender_tasks=1)
    async with started(relay):
        only_upstream(ups).delay = 5
        relay.admit(report("a"))
        await trio.sleep(0.1)  # the sender takes "a" and stalls
        assert isinstance(relay.admit(report("b")), Accepted)  # fills the queue
        full = relay.admit(report("c"))
        assert isinstance(full, Problem) and full.status == 503 and full.slug == "overloaded"
        assert relay.resources.get("c") is not None and relay.resources.get("c").seq == 0  # type: ignore[union-attr]
        await trio.sleep(10)
        assert isinstance(relay.admit(report("c")), Accepted)


async def test_invalid_reports_are_422_and_never_touch_state(
    tmp_path: Path, autojump_clock: trio.testing.MockClock
) -> None:
    relay, _ = memory_relay(tmp_path)
    async with started(relay):
        bad: object
        for bad in (
            [],
            {"resource_id": "", "payload": 1},
            {"resource_id": "a" * 129, "payload": 1},
            {"resource_id": "bad id", "payload": 1},
            {"resource_id": 5, "payload": 1},
            {"resource_id": "ok"},
            {"resource_id": "ok", "payload": 1, "kind": 3},
            {"resource_id": "ok", "payload": 1, "extra": 1},
        ):
            result = relay.admit(bad)
            assert isinstance(result, Problem) and result.status == 422, bad
        assert len(relay.resources) == 0


async def test_file_upstream_moves_to_a_thread_after_a_slow_append(
    tmp_path: Path, mock_clock: trio.testing.MockClock, monkeypatch: pytest.MonkeyPatch
) -> None:
    # A manual clock (no autojump): worker threads must not make virtual time run away.
    from relay_trio.upstreams.base import Outbound
    from relay_trio.upstreams.file import SLOW_WRITE_BACKOFF, FileUpstream

    up = FileUpstream(f"file://{tmp_path}/sink.jsonl")
    msg = Outbound("r:1", "r", None, {"x": 1}, 1, 0)
    await up.send_batch([msg], 5)  # first write opens the file (thread)
    await up.send_batch([msg], 5)  # small append: on the Trio thread
    assert up.slow_writes == 0
    real_write = FileUpstream._write

    def stalled(self: FileUpstream, data: bytes) -> None:
        mock_clock.jump(0.5)  # the disk stalls for half a second
        real_write(self, data)

    monkeypatch.setattr(FileUpstream, "_write", stalled)
    await up.send_batch([msg], 5)
    assert up.slow_writes == 1
    monkeypatch.setattr(FileUpstream, "_write", real_write)
    threaded: list[bool] = []
    original_run_sync = trio.to_thread.run_sync

    async def spy(fn: Any, *args: Any, **kw: Any) -> Any:
        threaded.append(True)
        return await original_run_sync(fn, *args, **kw)

    monkeypatch.setattr(trio.to_thread, "run_sync", spy)
    await up.send_batch([msg], 5)
    assert threaded == [True]  # the next write went to the worker thread
    mock_clock.jump(SLOW_WRITE_BACKOFF)
    await up.send_batch([msg], 5)
    assert threaded == [True]  # after the backoff, back on the fast path
    assert len((tmp_path / "sink.jsonl").read_bytes().splitlines()) == 5
    await up.aclose()


async def test_file_upstream_tolerates_one_slow_append_but_not_a_streak(
    tmp_path: Path, mock_clock: trio.testing.MockClock, monkeypatch: pytest.MonkeyPatch
) -> None:
    # One append just over SLOW_WRITE (the process was preempted) keeps the fast path;
    # SLOW_STREAK of them in a row move writes to the worker thread.
    from relay_trio.upstreams.base import Outbound
    from relay_trio.upstreams.file import SLOW_STREAK, SLOW_WRITE, FileUpstream

    up = FileUpstream(f"file://{tmp_path}/sink.jsonl")
    msg = Outbound("r:1", "r", None, {"x": 1}, 1, 0)
    await up.send_batch([msg], 5)  # opens the file (thread)
    real_write = FileUpstream._write
    delays: list[float] = []

    def timed(self: FileUpstream, data: bytes) -> None:
        mock_clock.jump(delays.pop(0))
        real_write(self, data)

    monkeypatch.setattr(FileUpstream, "_write", timed)
    slow = SLOW_WRITE * 2
    delays[:] = [slow, 0.0] + [slow] * (SLOW_STREAK - 1)
    for _ in delays[:]:
        await up.send_batch([msg], 5)
    assert up.slow_writes == 0  # a fast append broke the first streak
    delays[:] = [slow]
    await up.send_batch([msg], 5)  # the SLOW_STREAK-th slow append in a row
    assert up.slow_writes == 1
    assert up._threaded_until > trio.current_time()
    monkeypatch.setattr(FileUpstream, "_write", real_write)
    await up.aclose()
