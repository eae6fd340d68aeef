"""Dead letters, redrive and the resource view in cluster mode, on a real nats-server: the
same answers as a single node (dry run, limit, superseded, force, pending), on any instance."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import orjson
import pytest
import trio
from nats_helpers import NatsServer, instances, running_nats
from relay_helpers import MemoryUpstream, eventually

pytestmark = pytest.mark.slow

ADMIN = {"Authorization": "Bearer admin-Token-77"}
SETTINGS: dict[str, Any] = {
    "max_attempts": 1,  # the first failure dead-letters
    "rate_per_minute": 60000.0,
    "burst": 100,
    "failures_to_down": 1000,
    "admin_token": "admin-Token-77",
}


@pytest.fixture
def nats_server(tmp_path: Path) -> Iterator[NatsServer]:
    yield from running_nats(tmp_path)


async def dead_letters(client: httpx.AsyncClient, **params: Any) -> list[dict[str, Any]]:
    r = await client.get("/v1/deadletters", params=params)
    assert r.status_code == 200, r.text
    return list(r.json()["dead_letters"])


async def dead_letter(client: httpx.AsyncClient, *rids: str) -> list[str]:
    ids = []
    for rid in rids:
        r = await client.post("/v1/reports", json={"resource_id": rid, "payload": {"rid": rid}})
        assert r.status_code == 202, r.text
        ids.append(r.json()["message_id"])
    with trio.fail_after(10):
        while len(await dead_letters(client)) < len(rids):  # noqa: ASYNC110 - NATS state
            await trio.sleep(0.05)
    return ids


async def redrive(client: httpx.AsyncClient, **body: Any) -> dict[str, Any]:
    r = await client.post("/v1/deadletters:redrive", json=body, headers=ADMIN)
    assert r.status_code == 200, r.text
    answer: dict[str, Any] = r.json()
    return answer


def received(ups: list[MemoryUpstream]) -> list[tuple[str, int]]:
    return [(o.message_id, o.attempt) for u in ups for o in u.received]


async def test_redrive_on_another_instance_keeps_ids_with_a_fresh_attempt_count(
    tmp_path: Path, nats_server: NatsServer
) -> None:
    async with instances(tmp_path, nats_server, ["a", "b"], mode="fail", **SETTINGS) as nodes:
        (_, a, ua), (_, b, ub) = nodes
        ups = [ua, ub]
        admitted = await dead_letter(a, "x", "y", "z")
        ids = [d["message_id"] for d in await dead_letters(b)]  # in dead-letter order
        assert sorted(ids) == admitted
        dry = await redrive(b, reason="max_attempts", dry_run=True)
        assert (dry["matched"], dry["redriven"], dry["message_ids"]) == (3, 3, ids)
        assert len(await dead_letters(a)) == 3  # a dry run changes nothing
        for u in ups:
            u.mode = "ack"
            u.received.clear()
        done = await redrive(b, reason="max_attempts", limit=2)
        assert (done["matched"], done["redriven"], done["message_ids"]) == (2, 2, ids[:2])
        # Same ids, attempt 1 again; the redriven ones are gone from the dead letters.
        await eventually(lambda: sorted(received(ups)) == sorted([(ids[0], 1), (ids[1], 1)]))
        assert [d["message_id"] for d in await dead_letters(a)] == [ids[2]]
        # The redrive events reach B's page once B's mirror has them (a page is what the
        # instance has mirrored so far): wait for both, then nothing for the third.
        ring = nodes[1][0].relay.hub.ring
        redriven = {("redriven", ids[0]), ("redriven", ids[1])}

        def mirrored() -> set[tuple[str, str]]:
            data = [orjson.loads(e.json)["data"] for e in ring.page(0, 1000, "deadletter").events]
            return {(d["action"], d["message_id"]) for d in data}

        await eventually(lambda: redriven <= mirrored())
        events = (await b.get("/v1/events", params={"topic": "deadletter"})).json()["events"]
        actions = [(e["data"].get("action"), e["data"]["message_id"]) for e in events]
        assert redriven <= set(actions) and ("redriven", ids[2]) not in actions
        # Delivered and acknowledged: nothing left to redrive for them.
        again = await redrive(a, message_ids=ids[:2])
        assert again["matched"] == 0


async def test_redrive_skips_superseded_unless_forced_and_pending(
    tmp_path: Path, nats_server: NatsServer
) -> None:
    async with instances(
        tmp_path, nats_server, ["a", "b"], mode="fail", ack_timeout=30.0, **SETTINGS
    ) as nodes:
        (_, a, ua), (_, b, ub) = nodes
        ups = [ua, ub]
        (old,) = await dead_letter(a, "vm")
        for u in ups:
            u.mode = "ack"  # acknowledges the newer report
        r = await b.post("/v1/reports", json={"resource_id": "vm", "payload": 2})
        assert r.json()["message_id"] == "vm:2"
        await eventually(lambda: ("vm:2", 1) in received(ups))
        with trio.fail_after(10):
            while (await a.get("/v1/resources/vm")).json()["last_acked_seq"] != 2:  # noqa: ASYNC110
                await trio.sleep(0.05)
        body: dict[str, Any] = {"message_ids": [old]}
        skipped = await redrive(a, **body)
        assert (skipped["redriven"], skipped["skipped_by_reason"]) == (0, {"superseded": 1})
        # A message waiting in the stream for its ACK: a redrive would replace it → pending.
        for u in ups:
            u.mode = "sent"
        r = await a.post("/v1/reports", json={"resource_id": "vm", "payload": 3})
        assert r.json()["message_id"] == "vm:3"
        await eventually(lambda: ("vm:3", 1) in received(ups))
        pending = await redrive(b, force=True, **body)
        assert (pending["redriven"], pending["skipped_by_reason"]) == (0, {"pending": 1})
        dry = await redrive(b, force=True, dry_run=True, **body)
        assert dry["skipped_by_reason"] == {"pending": 1}
        ack = await b.post("/v1/acks", json={"message_id": "vm:3", "status": "ack"})
        assert ack.json()["outcome"] == "acked"
        with trio.fail_after(10):
            while (await a.get("/v1/resources/vm")).json()["pending"] is not None:  # noqa: ASYNC110
                await trio.sleep(0.05)
        forced = await redrive(b, force=True, **body)
        assert (forced["redriven"], forced["message_ids"]) == (1, [old])
        await eventually(lambda: (old, 1) in received(ups))
        assert await dead_letters(a) == []


async def test_resource_view_from_the_cluster_state(
    tmp_path: Path, nats_server: NatsServer
) -> None:
    async with instances(
        tmp_path, nats_server, ["a", "b"], mode="sent", ack_timeout=30.0, burst=2
    ) as nodes:
        (_, a, ua), (_, b, ub) = nodes
        assert (await b.get("/v1/resources/nobody")).status_code == 404
        for n in (1, 2):
            r = await a.post("/v1/reports", json={"resource_id": "vm-9", "payload": n})
            assert r.status_code == 202
        await eventually(lambda: ("vm-9:2", 1) in received([ua, ub]))
        view = (await b.get("/v1/resources/vm-9")).json()
        assert view["seq"] == 2 and view["last_acked_at"] is None
        assert view["bucket"]["burst"] == 2 and view["bucket"]["available"] < 1
        assert view["pending"]["message_id"] == "vm-9:2"  # latest wins: one per resource
        assert view["pending"]["attempts"] == 1
        assert [h["outcome"] for h in view["pending"]["history"]] == ["sent"]
        ack = await a.post("/v1/acks", json={"message_id": "vm-9:2", "status": "ack"})
        assert ack.json()["outcome"] == "acked"
        view = (await b.get("/v1/resources/vm-9")).json()
        assert view["last_acked_seq"] == 2 and view["awaiting_ack_since"] is None
        assert view["last_acked_at"] is not None
