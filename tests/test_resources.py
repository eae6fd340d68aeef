"""Resources table: LRU cap and idle eviction (pure)."""

from __future__ import annotations

from relay_trio.core.resources import ResourceState, ResourceTable


def test_cap_evicts_least_recently_used_and_reports_it() -> None:
    table = ResourceTable(3)
    for i, rid in enumerate("abc"):
        table.touch(rid, float(i))
    table.touch("a", 10.0)  # "a" is now most recent: "b" is the LRU
    table.touch("d", 11.0)
    assert [s.resource_id for s in table] == ["c", "a", "d"]
    assert [s.resource_id for s in table.take_evicted()] == ["b"]
    assert table.take_evicted() == []  # reported once
    assert table.evicted_lru == 1


def test_idle_eviction_keeps_pending_and_recent_entries() -> None:
    table = ResourceTable(10)
    table.touch("old", 0.0)
    pending = table.touch("old-pending", 1.0)
    pending.pending_message_id = "old-pending:1"
    table.touch("recent", 60.0)
    removed = table.evict_idle(now=100.0, ttl=50.0)
    assert [s.resource_id for s in removed] == ["old"]
    assert {s.resource_id for s in table} == {"old-pending", "recent"}
    # Exactly at the TTL boundary an entry is idle.
    assert [s.resource_id for s in table.evict_idle(now=110.0, ttl=50.0)] == ["recent"]


def _next_id(state: ResourceState) -> str:
    state.seq += 1
    return f"{state.resource_id}:{state.seq}"


def test_new_resources_start_above_the_store_floor() -> None:
    table = ResourceTable(2, seq_floor=41)
    assert _next_id(table.touch("fresh", 0.0)) == "fresh:42"


def test_a_returning_resource_continues_its_message_ids() -> None:
    table = ResourceTable(2)
    state = table.touch("vm-1", 0.0)
    _next_id(state)
    _next_id(state)
    table.evict_idle(now=100.0, ttl=10.0)
    assert table.get("vm-1") is None
    back = table.touch("vm-1", 200.0)
    assert _next_id(back) == "vm-1:3"
    # LRU eviction retires too, and the retired map is bounded by the table's cap.
    for rid in ("a", "b", "c", "d"):
        _next_id(table.touch(rid, 300.0))
    assert len(table._retired) <= 2
