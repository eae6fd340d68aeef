"""Admission.batch(): a batch request or stream read is staged as ONE change set, and what
the store ends up holding is exactly what admitting the reports one by one would leave."""

from __future__ import annotations

from pathlib import Path

import pytest
import trio
from relay_helpers import memory_relay

from relay_trio.core.model import Accepted
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
