"""Admission.batch(): a batch request or stream read is staged as ONE change set, and what
the store ends up holding is exactly what admitting the reports one by one would leave."""

from __future__ import annotations

import contextlib
from pathlib import Path

import orjson
import pytest
import trio
from relay_helpers import memory_relay

from relay_trio.core.model import Accepted
from relay_trio.services.publisher import EVENT_ID_BLOCK
from relay_trio.stores.base import Changes, MessageRecord, Ticket
from relay_trio.stores.sqlite import SqliteStore
from relay_trio.stores.sqlite_file import SqliteFile


def report(rid: str, n: int = 0) -> dict[str, object]:
    return {"resource_id": rid, "kind": "scan", "payload": {"n": n}}


async def test_a_batch_is_staged_as_one_change_set(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    relay, _ = memory_relay(tmp_path, mode="sent", store="sqlite")
    staged: list[Changes] = []
    real_stage = SqliteStore.stage

    def spy(self: SqliteStore, changes: Changes) -> Ticket:
        staged.append(changes)
        return real_stage(self, changes)

    monkeypatch.setattr(SqliteStore, "stage", spy)
    async with trio.open_nursery() as nursery:
        await nursery.start(relay.run)
        staged.clear()
        with relay.batch():
            results = [relay.admit(report(f"r{i}", i)) for i in range(500)]
        assert all(isinstance(r, Accepted) for r in results)
        await relay.durable()
        admissions = [c for c in staged if any(isinstance(op, MessageRecord) for op in c.ops)]
        assert len(admissions) == 1
        assert sum(isinstance(op, MessageRecord) for op in admissions[0].ops) == 500
        # Outside a block, each admission is its own change set again.
        staged.clear()
        relay.admit(report("single"))
        await relay.durable()
        assert len([c for c in staged if c.ops]) == 1
        nursery.cancel_scope.cancel()


async def test_an_eviction_inside_a_batch_is_stored_in_order(tmp_path: Path) -> None:
    # max_resources=2: admitting r2 pushes r0 out inside the block. Its pending message is
    # dead-lettered and its rows deleted; that must not be undone by the block's own
    # staging of r0's message, which happened earlier but is staged at the end.
    relay, _ = memory_relay(tmp_path, mode="sent", store="sqlite", max_resources=2)
    async with trio.open_nursery() as nursery:
        await nursery.start(relay.run)
        with relay.batch():
            results = [relay.admit(report(f"r{i}", i)) for i in range(3)]
        assert all(isinstance(r, Accepted) for r in results)
        await relay.all_durable()
        nursery.cancel_scope.cancel()
    recovered = SqliteFile(tmp_path / "data" / "relay.db", "normal", 100).open()
    assert sorted(m.message_id for m in recovered.messages) == ["r1:1", "r2:1"]
    assert sorted(r.resource_id for r in recovered.resources) == ["r1", "r2"]
    assert recovered.dead_letters == 1
    assert recovered.meta["seq_floor"] == 1  # r0's sequence is never reused


async def test_a_batch_publishes_its_events_together_in_order(tmp_path: Path) -> None:
    # max_resources=2 and burst=1: r0 and r1 admitted, r0 again rate-limited (a drops
    # event), r2 evicts a resource (a deadletter event). Inside one block the ring must end
    # up with exactly the events publishing one by one gives, in the same order, and
    # nothing before the block ends.
    async def run(batched: bool, where: Path) -> list[tuple[str, object]]:
        relay, _ = memory_relay(where, mode="sent", max_resources=2, burst=1, rate_per_minute=1)
        async with trio.open_nursery() as nursery:
            await nursery.start(relay.run)
            ring = relay.hub.ring
            start = ring.last_id
            with relay.batch() if batched else contextlib.nullcontext():
                for rid, n in (("r0", 0), ("r1", 0), ("r0", 1), ("r2", 0)):
                    relay.admit(report(rid, n))
                if batched:
                    assert ring.last_id == start  # published when the block ends
            events = ring.page(start, 100).events
            nursery.cancel_scope.cancel()
        assert [e.id for e in events] == list(range(start + 1, start + 1 + len(events)))
        if batched:
            assert len({orjson.loads(e.json)["at"] for e in events}) == 1
        return [(e.topic, orjson.loads(e.json)["data"]) for e in events]

    one_by_one = await run(False, tmp_path / "a")
    together = await run(True, tmp_path / "b")
    assert together == one_by_one
    assert [topic for topic, _ in together] == [
        "reports",
        "reports",
        "drops",
        "reports",
        "deadletter",
    ]


async def test_a_batch_larger_than_the_reserve_margin_reserves_first(tmp_path: Path) -> None:
    relay, _ = memory_relay(tmp_path, mode="sent")
    async with trio.open_nursery() as nursery:
        await nursery.start(relay.run)
        publisher = relay.events
        n = EVENT_ID_BLOCK  # more events than the half block of headroom
        with publisher.batch():
            for i in range(n):
                publisher.publish("system", {"n": i})
        # Every id handed out stays at least half a block below the reserved mark.
        assert relay.hub.ring.last_id <= publisher.reserved - EVENT_ID_BLOCK // 2
        nursery.cancel_scope.cancel()
