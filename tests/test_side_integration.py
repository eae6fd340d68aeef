"""Side queue on a real server: the audit file mirrors admitted reports, and a stalled
webhook neither slows ingest nor loses count of what it drops, then resumes."""

from __future__ import annotations

import statistics
from pathlib import Path
from typing import Any

import httpx
import orjson
import trio
from fake_upstream import Behaviour, FakeUpstream, run_fake_upstream
from relay_helpers import eventually, make_config, running_server


async def post_many(
    client: httpx.AsyncClient, prefix: str, n: int
) -> tuple[list[str], list[float]]:
    """POST ``n`` reports (one per resource); message ids and per-request latency."""
    ids: list[str] = []
    latencies: list[float] = []
    for i in range(n):
        start = trio.current_time()
        r = await client.post("/v1/reports", json={"resource_id": f"{prefix}-{i}", "payload": i})
        latencies.append(trio.current_time() - start)
        assert r.status_code == 202, r.text
        ids.append(r.json()["message_id"])
    return ids, latencies


def audit_ids(path: Path) -> list[str]:
    if not path.exists():
        return []
    return [orjson.loads(line)["message_id"] for line in path.read_bytes().splitlines()]


def webhook_ids(up: FakeUpstream) -> set[str]:
    out: set[str] = set()
    for record in up.received:
        if record.outcome == "ack" and isinstance(record.body, list):
            out.update(item["message_id"] for item in record.body)
    return out


async def test_audit_file_mirrors_admitted_reports(tmp_path: Path) -> None:
    audit = tmp_path / "audit" / "side.jsonl"
    config = make_config(tmp_path, side_audit_file=str(audit), rate_per_minute=1)
    with trio.fail_after(20):
        async with running_server(config) as (_, client):
            ids, _ = await post_many(client, "a", 20)
            # Rejected reports are not audited as admitted.
            r = await client.post("/v1/reports", json={"resource_id": "a-0", "payload": 1})
            assert r.status_code == 429
            await eventually(lambda: len(audit_ids(audit)) >= 20)
            assert audit_ids(audit) == ids
            line: dict[str, Any] = orjson.loads(audit.read_bytes().splitlines()[0])
            assert line == {"message_id": "a-0:1", "resource_id": "a-0", "kind": None, "payload": 0}
            status = (await client.get("/v1/status")).json()["side_queue"]["audit_file"]
            assert status["written"] == 20 and status["dropped_full"] == 0


async def test_stalled_webhook_never_slows_ingest_and_recovers(tmp_path: Path) -> None:
    with trio.fail_after(25):
        # Baseline: same relay settings, no webhook.
        base_config = make_config(tmp_path / "base", rate_per_minute=6000)
        async with running_server(base_config) as (_, client):
            await post_many(client, "warm", 20)
            _, baseline = await post_many(client, "b", 200)

        async with run_fake_upstream(Behaviour(stall=60), path="/hook") as hook:
            config = make_config(
                tmp_path / "stalled",
                rate_per_minute=6000,
                side_webhook=hook.url,
                side_queue_size=10,
                # Longer than the 200 POSTs take even on a loaded machine: the stalled
                # POST must still hold the worker while the queue overflows.
                side_timeout=4.0,
            )
            async with running_server(config) as (server, client):
                await post_many(client, "warm", 20)
                with trio.fail_after(2):
                    await hook.wait_received(1)  # the worker is stuck in a stalled POST
                ids, stalled = await post_many(client, "s", 200)
                # Ingest is not blocked by the sink: every POST succeeded, quickly.
                p50_base, p50_stalled = statistics.median(baseline), statistics.median(stalled)
                assert p50_stalled < 3 * p50_base + 0.005, (p50_base, p50_stalled)
                assert max(stalled) < 0.5, max(stalled)
                # Drops are counted, in /v1/status and in /metrics.
                row = (await client.get("/v1/status")).json()["side_queue"]["webhook"]
                assert row["dropped_full"] >= 200 - 10, row
                metrics = (await client.get("/metrics")).text
                drop_line = next(
                    line
                    for line in metrics.splitlines()
                    if line.startswith('relay_side_queue_drops_total{reason="full",sink="webhook"}')
                )
                assert float(drop_line.split()[-1]) >= 190, drop_line
                assert not webhook_ids(hook) & set(ids)

                # The sink recovers: the stalled POST times out (side_timeout), the
                # worker moves on, and new records arrive.
                hook.behaviour = Behaviour()
                await eventually(lambda: row_of(server)["queued"] == 0, within=10)
                fresh, _ = await post_many(client, "r", 5)
                await eventually(lambda: set(fresh) <= webhook_ids(hook), within=5)
                after = row_of(server)
                assert after["timeouts"] >= 1 and after["written"] >= 5, after


def row_of(server: Any) -> dict[str, int]:
    stats: dict[str, dict[str, int]] = server.relay.side.stats()
    return stats["webhook"]
