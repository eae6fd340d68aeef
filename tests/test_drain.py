"""Staged drain per flush mode, in virtual time with in-memory upstreams."""

from __future__ import annotations

from pathlib import Path

import orjson
import pytest
import trio
import trio.testing
from relay_helpers import memory_relay

from relay_trio.core.umh import MessageState
from relay_trio.relay import Relay


def system_kinds(relay: Relay) -> list[str]:
    page = relay.hub.ring.page(None, 1000, "system")
    kinds = [orjson.loads(e.json)["data"]["kind"] for e in page.events]
    return [k for k in kinds if not k.startswith("upstream_")]  # health flips are incidental


async def run_drain(tmp_path: Path, mode: str, ups_delay: float) -> tuple[Relay, list[str], float]:
    relay, ups = memory_relay(
        tmp_path,
        mode="fail",
        upstreams=["http://up-a", "http://up-b"],
        shutdown_flush=mode,
        shutdown_timeout=40,
        rate_per_minute=6000,
        burst=10,
        retry_base=100,
        retry_cap=100,
    )
    ids: list[str] = []
    async with trio.open_nursery() as nursery:
        await nursery.start(relay.run)
        for i in range(40):
            result = relay.admit({"resource_id": f"r{i}", "payload": i})
            ids.append(result.message_id)  # type: ignore[union-attr]
        await trio.sleep(1)  # every first send fails: all 40 wait for a retry
        assert relay.umh.pending_count() == 40
        for up in ups.values():
            up.mode, up.delay = "ack", ups_delay
        start = trio.current_time()
        await relay.drain()
        took = trio.current_time() - start
        relay.finish_shutdown()
        nursery.cancel_scope.cancel()
    return relay, ids, took


@pytest.mark.parametrize(
    ("mode", "expected_took"),
    [
        ("sequential", 10),  # two upstreams, one after the other, 5 s each
        ("parallel", 5),  # both at once
    ],
)
async def test_flush_delivers_pending_per_mode(
    tmp_path: Path, autojump_clock: trio.testing.MockClock, mode: str, expected_took: float
) -> None:
    relay, ids, took = await run_drain(tmp_path, mode, ups_delay=5)
    assert took == expected_took
    assert all(relay.umh.state_of(m) is MessageState.ACKED for m in ids)
    assert system_kinds(relay) == ["started", "draining", "flush", "shutdown"]


async def test_none_flush_reports_pending_as_shutdown_dead_letters(
    tmp_path: Path, autojump_clock: trio.testing.MockClock
) -> None:
    relay, ids, took = await run_drain(tmp_path, "none", ups_delay=5)
    assert took == 0
    assert all(relay.umh.state_of(m) is MessageState.DEAD for m in ids)
    assert {d.reason for d in relay.umh.dead_letters} == {"shutdown"}
    assert system_kinds(relay) == ["started", "draining", "shutdown"]
    kinds = [
        orjson.loads(e.json)["topic"] for e in relay.hub.ring.page(None, 1000, "deadletter").events
    ]
    assert len(kinds) == 40


async def test_admission_is_refused_while_draining(
    tmp_path: Path, autojump_clock: trio.testing.MockClock
) -> None:
    relay, _ = memory_relay(tmp_path)
    async with trio.open_nursery() as nursery:
        await nursery.start(relay.run)
        assert relay.ready.value
        await relay.drain()
        assert not relay.ready.value
        refused = relay.admit({"resource_id": "late", "payload": 1})
        assert refused.status == 503  # type: ignore[union-attr]
        nursery.cancel_scope.cancel()
