"""Idempotent ingest (issue 16): a repeated ``Idempotency-Key`` gets the original answer.

Virtual time (MemoryStore, in-memory upstream) for the window, the bound and the bucket; a
real SQLite file for the restart; a v1 database for the migration; a real server for the
HTTP header and the batch line marker.
"""

from __future__ import annotations

import sqlite3
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import orjson
import trio
import trio.testing
from relay_helpers import MemoryUpstream, make_config, memory_relay, running_server

from relay_trio.core.idempotency import IdempotencyKeys, fingerprint
from relay_trio.core.model import Accepted, Problem
from relay_trio.relay import Relay
from relay_trio.stores.base import Changes, IdempotencyRecord, MessageRecord
from relay_trio.stores.memory import MemoryStore
from relay_trio.stores.sqlite_file import MIGRATIONS, SCHEMA_VERSION, SqliteFile


@asynccontextmanager
async def started(relay: Relay) -> AsyncIterator[Relay]:
    async with trio.open_nursery() as nursery:
        await nursery.start(relay.run)
        yield relay
        nursery.cancel_scope.cancel()


def report(key: str | None, rid: str = "vm-1", n: int = 1) -> dict[str, Any]:
    body: dict[str, Any] = {"resource_id": rid, "payload": {"n": n}}
    if key is not None:
        body["idempotency_key"] = key
    return body


def only(ups: dict[str, MemoryUpstream]) -> MemoryUpstream:
    (up,) = ups.values()
    return up


def sample(relay: Relay, name: str, **labels: str) -> float | None:
    value = relay.metrics.registry.get_sample_value(name, labels)
    return value


async def test_repeat_gets_original_answer_not_admitted_nor_charged_one_delivery(
    tmp_path: Path, autojump_clock: trio.testing.MockClock
) -> None:
    relay, ups = memory_relay(tmp_path)  # 1 report/min, burst 1
    async with started(relay):
        first = relay.admit(report("k-1"))
        assert isinstance(first, Accepted) and not first.replayed
        await trio.sleep(1)
        # The bucket is full now: a new report is refused, the repeat is not.
        assert isinstance(relay.admit(report(None, n=2)), Problem)
        again = relay.admit(report("k-1"))
        assert again == Accepted(first.message_id, "vm-1", first.seq, replayed=True)
        # Members in another order are the same report.
        again2 = relay.admit({"payload": {"n": 1}, "idempotency_key": "k-1", "resource_id": "vm-1"})
        assert isinstance(again2, Accepted) and again2.replayed
        await trio.sleep(5)
        assert [o.message_id for o in only(ups).received] == [first.message_id]
        state = relay.resource_view("vm-1")
        assert state is not None
        assert sample(relay, "relay_reports_admitted_total") == 1
        assert sample(relay, "relay_idempotent_replays_total") == 2


async def test_same_key_other_report_is_422_idempotency_mismatch(
    tmp_path: Path, autojump_clock: trio.testing.MockClock
) -> None:
    relay, _ = memory_relay(tmp_path, rate_per_minute=600.0)
    async with started(relay):
        assert isinstance(relay.admit(report("k-1")), Accepted)
        for other in (
            report("k-1", n=2),
            report("k-1", rid="vm-2"),
            {**report("k-1"), "kind": "x"},
        ):
            refused = relay.admit(other)
            assert isinstance(refused, Problem)
            assert refused.status == 422
            assert refused.slug == "idempotency-mismatch"
            assert refused.to_dict()["reason"] == "idempotency_mismatch"
        assert sample(relay, "relay_idempotency_mismatches_total") == 3


async def test_key_expires_exactly_at_the_window(
    tmp_path: Path, autojump_clock: trio.testing.MockClock
) -> None:
    relay, _ = memory_relay(tmp_path, rate_per_minute=600.0, idempotency_window=100.0)
    async with started(relay):
        t0 = trio.current_time()
        first = relay.admit(report("k-1"))
        assert isinstance(first, Accepted)
        await trio.sleep_until(t0 + 99.999)
        replay = relay.admit(report("k-1"))
        assert isinstance(replay, Accepted) and replay.replayed
        await trio.sleep_until(t0 + 100)
        fresh = relay.admit(report("k-1"))
        assert isinstance(fresh, Accepted) and not fresh.replayed
        assert fresh.message_id != first.message_id
        assert sample(relay, "relay_idempotency_keys_removed_total", cause="expired") == 1
        assert sample(relay, "relay_idempotency_keys") == 1
        assert list(relay.store.idempotency) == ["k-1"]  # type: ignore[attr-defined]


async def test_bound_forgets_oldest_first_and_counts_it(
    tmp_path: Path, autojump_clock: trio.testing.MockClock
) -> None:
    relay, _ = memory_relay(tmp_path, rate_per_minute=600.0, idempotency_max_keys=2)
    async with started(relay):
        ids = []
        for i, key in enumerate(("a", "b", "c")):
            result = relay.admit(report(key, rid=f"vm-{i}"))
            assert isinstance(result, Accepted)
            ids.append(result.message_id)
            await trio.sleep(1)
        assert sample(relay, "relay_idempotency_keys_removed_total", cause="capacity") == 1
        assert sample(relay, "relay_idempotency_keys") == 2
        store = relay.store
        assert isinstance(store, MemoryStore)
        assert sorted(store.idempotency) == ["b", "c"]
        # "a" was forgotten: admitted again; "c" is still remembered.
        again_a = relay.admit(report("a", rid="vm-0"))
        assert isinstance(again_a, Accepted) and not again_a.replayed
        assert again_a.message_id != ids[0]
        again_c = relay.admit(report("c", rid="vm-2"))
        assert isinstance(again_c, Accepted) and again_c.replayed


async def test_rejected_attempt_is_not_remembered(
    tmp_path: Path, autojump_clock: trio.testing.MockClock
) -> None:
    relay, _ = memory_relay(tmp_path)
    async with started(relay):
        assert isinstance(relay.admit(report(None)), Accepted)
        limited = relay.admit(report("k-9", n=5))
        assert isinstance(limited, Problem) and limited.status == 429
        await trio.sleep(60)
        admitted = relay.admit(report("k-9", n=5))
        assert isinstance(admitted, Accepted) and not admitted.replayed


async def test_key_survives_a_restart_with_sqlite(tmp_path: Path) -> None:
    def factory(url: str, _deadline: float) -> MemoryUpstream:
        return MemoryUpstream(url, "ack")

    config = make_config(tmp_path, store="sqlite", rate_per_minute=600.0)
    first_relay = Relay(config, upstream_factory=factory)
    async with started(first_relay):
        first = first_relay.admit(report("k-1"))
        assert isinstance(first, Accepted)
        await first_relay.durable()
    second_relay = Relay(config, upstream_factory=factory)
    async with started(second_relay):
        again = second_relay.admit(report("k-1"))
        assert again == Accepted(first.message_id, "vm-1", first.seq, replayed=True)
        other = second_relay.admit(report("k-1", n=2))
        assert isinstance(other, Problem) and other.status == 422


async def test_expired_keys_are_dropped_from_the_store_at_start(tmp_path: Path) -> None:
    store = MemoryStore(10)
    changes = Changes()
    now = 1_000_000.0
    fp = fingerprint("vm-1", None, {"n": 1})
    changes.put_idempotency_key(IdempotencyRecord("old", fp, "vm-1:1", now - 200))
    changes.put_idempotency_key(IdempotencyRecord("new", fp, "vm-1:2", now - 50))
    store.stage(changes)
    config = make_config(tmp_path, store="memory", idempotency_window=100.0)
    relay = Relay(config, wall_clock=lambda: now, store=store, upstream_factory=_memory)
    async with started(relay):
        assert sorted(store.idempotency) == ["new"]
        replay = relay.admit(report("new"))
        assert replay == Accepted("vm-1:2", "vm-1", 2, replayed=True)
        fresh = relay.admit(report("old"))
        assert isinstance(fresh, Accepted) and not fresh.replayed


def _memory(url: str, _deadline: float) -> MemoryUpstream:
    return MemoryUpstream(url, "ack")


def test_version_1_database_migrates_and_keeps_its_rows(tmp_path: Path) -> None:
    path = tmp_path / "relay.db"
    conn = sqlite3.connect(path)
    MIGRATIONS[0](conn)
    conn.execute("PRAGMA user_version = 1")
    conn.execute(
        "INSERT INTO messages VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
        ("vm-1:1", "vm-1", 1, None, b'{"n":1}', 10.0, b"[]", None, "file:///x", b""),
    )
    conn.commit()
    conn.close()
    db = SqliteFile(path, "normal", 100)
    recovered = db.open()
    assert [m.message_id for m in recovered.messages] == ["vm-1:1"]
    assert recovered.idempotency == []
    record = IdempotencyRecord("k", b"\x01" * 16, "vm-1:1", 11.0)
    changes = Changes()
    changes.put_idempotency_key(record)
    changes.put_idempotency_key(IdempotencyRecord("gone", b"\x02" * 16, "vm-1:1", 12.0))
    changes.delete_idempotency_keys(["gone"])
    db.apply([changes])
    db.close()
    conn = sqlite3.connect(path)
    assert conn.execute("PRAGMA user_version").fetchone() == (SCHEMA_VERSION,) == (2,)
    conn.close()
    again = SqliteFile(path, "normal", 100)
    assert again.open().idempotency == [record]
    again.close()


def test_memory_store_applies_key_ops_like_sqlite(tmp_path: Path) -> None:
    ops = Changes()
    a = IdempotencyRecord("a", b"1" * 16, "r:1", 1.0)
    b = IdempotencyRecord("b", b"2" * 16, "r:2", 2.0)
    ops.put_idempotency_key(b)
    ops.put_idempotency_key(a)
    ops.delete_idempotency_keys(["b", "absent"])
    ops.put_idempotency_key(b._replace(message_id="r:3"))
    ops.put_message(MessageRecord("r:3", "r", 3, None, b"1", 2.0, (), None, "u"))
    memory = MemoryStore(10)
    memory.stage(ops)
    db = SqliteFile(tmp_path / "relay.db", "normal", 10)
    db.open()
    db.apply([ops])
    db.close()
    loaded = SqliteFile(tmp_path / "relay.db", "normal", 10).open().idempotency
    assert loaded == memory.snapshot().idempotency == [a, b._replace(message_id="r:3")]


def test_keys_pure_window_and_bound() -> None:
    keys = IdempotencyKeys(window=10.0, max_keys=2)
    assert keys.remember("a", b"x", "r:1", 0.0) == []
    assert keys.lookup("a", 9.999) is not None
    assert keys.lookup("a", 10.0) is None
    assert keys.remember("b", b"x", "r:2", 5.0) == []
    assert keys.remember("c", b"x", "r:3", 6.0) == ["a"]
    assert (keys.evicted, keys.expired) == (1, 0)
    assert keys.remember("d", b"x", "r:4", 15.0) == ["b"]
    assert (keys.evicted, keys.expired) == (1, 1)


async def test_http_header_replay_and_batch_line_marker(tmp_path: Path) -> None:
    relay, ups = memory_relay(tmp_path, rate_per_minute=600.0)
    async with running_server(relay.config, relay) as (_server, client):
        body = {"resource_id": "vm-1", "payload": {"n": 1}}
        first = await client.post("/v1/reports", json=body, headers={"Idempotency-Key": "h-1"})
        assert first.status_code == 202
        assert "Idempotent-Replayed" not in first.headers
        again = await client.post("/v1/reports", json=body, headers={"Idempotency-Key": "h-1"})
        assert again.status_code == 202
        assert again.headers["Idempotent-Replayed"] == "true"
        assert again.json() == first.json()
        other = await client.post(
            "/v1/reports",
            json={**body, "payload": {"n": 2}},
            headers={"Idempotency-Key": "h-1"},
        )
        assert other.status_code == 422
        assert other.json()["type"].endswith("/idempotency-mismatch")
        bad = await client.post("/v1/reports", json=body, headers={"Idempotency-Key": "x" * 256})
        assert bad.status_code == 422 and bad.json()["parameter"] == "Idempotency-Key"
        bad_body = await client.post(
            "/v1/reports",
            json={**body, "idempotency_key": "has space"},
            headers={"Idempotency-Key": "h-2"},
        )
        assert bad_body.status_code == 422 and bad_body.json()["field"] == "idempotency_key"
        lines = [
            {"resource_id": "vm-2", "payload": 1, "idempotency_key": "b-1"},
            {"resource_id": "vm-2", "payload": 1, "idempotency_key": "b-1"},
        ]
        batch = await client.post(
            "/v1/reports:batch",
            content=b"\n".join(orjson.dumps(line) for line in lines),
            headers={"content-type": "application/x-ndjson"},
        )
        results = [orjson.loads(line) for line in batch.content.splitlines()]
        assert results[0] == {"message_id": results[0]["message_id"], "line": 1}
        assert results[1] == {"message_id": results[0]["message_id"], "replayed": True, "line": 2}
        await trio.sleep(0.2)
        assert sorted(o.message_id for o in only(ups).received) == sorted(
            [first.json()["message_id"], results[0]["message_id"]]
        )


async def test_stream_lines_replay_with_marker(
    tmp_path: Path, autojump_clock: trio.testing.MockClock
) -> None:
    from relay_trio.core.line_protocol import LineConnection

    relay, ups = memory_relay(tmp_path, rate_per_minute=600.0)
    async with started(relay):
        conn = LineConnection(relay.admit, max_frame=4096)
        line = orjson.dumps(report("s-1")) + b"\n"
        replies = [orjson.loads(r) for r in conn.receive_data(line + line).splitlines()]
        mid = replies[0]["message_id"]
        assert replies == [
            {"message_id": mid, "line": 1},
            {"message_id": mid, "replayed": True, "line": 2},
        ]
        await trio.sleep(1)
        assert [o.message_id for o in only(ups).received] == [mid]
