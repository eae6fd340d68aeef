"""Dead letters in the store: filters, cursor paging, redrive (dry run, limit, superseded,
force, pending), events, the CLI, and "no 2xx before the commit".

Real hypercorn server on 127.0.0.1:0, httpx, and the controllable fake upstream.
"""

from __future__ import annotations

import sys
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import attrs
import httpx
import orjson
import trio
from fake_upstream import Behaviour, FakeUpstream, run_fake_upstream
from relay_helpers import eventually, make_config, running_server

from relay_trio.relay import Relay
from relay_trio.server import RelayServer
from relay_trio.stores.base import Changes, DeadLetterQuery, DeadLetterRecord, Ticket
from relay_trio.stores.memory import MemoryStore

ADMIN = {"Authorization": "Bearer admin-Token-77"}


def _config(tmp_path: Path, up: FakeUpstream, **overrides: Any) -> Any:
    base: dict[str, Any] = {
        "upstreams": [up.url],
        "rate_per_minute": 60000,
        "burst": 100,
        "max_attempts": 1,  # the first failure dead-letters: fast and deterministic
        "failures_to_down": 1000,
        "admin_token": "admin-Token-77",
    }
    base.update(overrides)
    return make_config(tmp_path, **base)


@asynccontextmanager
async def failing_relay(
    tmp_path: Path,
) -> AsyncIterator[tuple[FakeUpstream, RelayServer, httpx.AsyncClient]]:
    """A relay (admin token set, one attempt per message) whose upstream fails everything."""
    async with (
        run_fake_upstream(Behaviour(fail_all=True)) as up,
        running_server(_config(tmp_path, up)) as (server, client),
    ):
        yield up, server, client


async def _dead_letter(client: httpx.AsyncClient, relay: Relay, *rids: str) -> list[str]:
    ids = []
    for rid in rids:
        r = await client.post("/v1/reports", json={"resource_id": rid, "payload": {"rid": rid}})
        assert r.status_code == 202
        ids.append(r.json()["message_id"])
    await eventually(lambda: relay.store.stats().dead_letters >= len(rids))
    return ids


async def _list(client: httpx.AsyncClient, **params: Any) -> dict[str, Any]:
    r = await client.get("/v1/deadletters", params=params)
    assert r.status_code == 200, r.text
    body: dict[str, Any] = r.json()
    return body


async def test_filters_and_cursor_paging(tmp_path: Path) -> None:
    with trio.fail_after(30):
        async with failing_relay(tmp_path) as (up, server, client):
            before = datetime.now(UTC).isoformat()
            ids = await _dead_letter(client, server.relay, "a", "b", "c", "d")
            everything = await _list(client)
            assert [d["message_id"] for d in everything["dead_letters"]] == ids
            first = everything["dead_letters"][0]
            assert first["payload"] == {"rid": "a"} and first["reason"] == "max_attempts"
            assert first["upstream"] == up.url and len(first["attempts"]) == 1
            assert everything["next_cursor"] is None
            # Paging at an exact multiple of the page size: 2 + 2, then nothing.
            page1 = await _list(client, limit=2)
            page2 = await _list(client, limit=2, cursor=page1["next_cursor"])
            assert [d["message_id"] for d in page1["dead_letters"] + page2["dead_letters"]] == ids
            assert (
                page2["next_cursor"] is None
                or not (await _list(client, limit=2, cursor=page2["next_cursor"]))["dead_letters"]
            )
            assert [
                d["message_id"] for d in (await _list(client, resource_id="c"))["dead_letters"]
            ] == ["c:1"]
            assert (await _list(client, reason="max_age"))["dead_letters"] == []
            assert len((await _list(client, upstream=up.url))["dead_letters"]) == 4
            assert len((await _list(client, since=before))["dead_letters"]) == 4
            assert (await _list(client, until=before))["dead_letters"] == []
            bad = await client.get("/v1/deadletters", params={"since": "yesterday"})
            assert bad.status_code == 422
            assert bad.headers["content-type"] == "application/problem+json"


async def test_redrive_dry_run_limit_and_events(tmp_path: Path) -> None:
    with trio.fail_after(30):
        async with failing_relay(tmp_path) as (up, server, client):
            relay = server.relay
            ids = await _dead_letter(client, relay, "a", "b", "c")
            r = await client.post(
                "/v1/deadletters:redrive", json={"reason": "max_attempts", "dry_run": True}
            )
            assert r.status_code == 401  # the admin token guards redrive
            r = await client.post(
                "/v1/deadletters:redrive",
                json={"reason": "max_attempts", "dry_run": True},
                headers=ADMIN,
            )
            assert r.json()["matched"] == 3 and r.json()["redriven"] == 3
            assert len((await _list(client))["dead_letters"]) == 3  # nothing changed
            up.behaviour = Behaviour()  # the upstream is back
            up.clear()
            r = await client.post(
                "/v1/deadletters:redrive",
                json={"reason": "max_attempts", "limit": 2},
                headers=ADMIN,
            )
            assert r.json()["redriven"] == 2 and r.json()["message_ids"] == ids[:2]
            with trio.fail_after(10):
                await up.wait_until(lambda u: set(ids[:2]) <= set(u.message_ids()))
            # Same message ids, a fresh attempt count.
            assert [r.body["attempt"] for r in up.received] == [1, 1]
            assert [d["message_id"] for d in (await _list(client))["dead_letters"]] == [ids[2]]
            events = (await client.get("/v1/events", params={"topic": "deadletter"})).json()
            actions = [(e["data"]["action"], e["data"]["message_id"]) for e in events["events"]]
            assert ("redriven", ids[0]) in actions and ("redriven", ids[2]) not in actions


async def test_redrive_skips_superseded_unless_forced_and_pending(tmp_path: Path) -> None:
    with trio.fail_after(30):
        async with failing_relay(tmp_path) as (up, server, client):
            (old,) = await _dead_letter(client, server.relay, "vm")
            up.behaviour = Behaviour()  # acks the newer report
            r = await client.post("/v1/reports", json={"resource_id": "vm", "payload": 2})
            assert r.json()["message_id"] == "vm:2"
            await eventually(lambda: server.relay.umh.pending_count() == 0)
            body = {"message_ids": [old]}
            r = await client.post("/v1/deadletters:redrive", json=body, headers=ADMIN)
            assert r.json()["skipped_by_reason"] == {"superseded": 1}
            assert r.json()["redriven"] == 0
            up.behaviour = Behaviour(stall=30)  # keep the forced one pending
            r = await client.post(
                "/v1/deadletters:redrive", json={**body, "force": True}, headers=ADMIN
            )
            assert r.json()["redriven"] == 1
            with trio.fail_after(10):
                await up.wait_until(lambda u: old in u.message_ids())
            # A message in flight for the resource: a second redrive is skipped as pending.
            await _dead_letter_again(server.relay, old)
            r = await client.post("/v1/deadletters:redrive", json=body, headers=ADMIN)
            assert r.json()["skipped_by_reason"] == {"pending": 1}


async def _dead_letter_again(relay: Relay, message_id: str) -> None:
    """Put ``message_id`` back into the dead letters while it is pending (store only)."""
    page = await relay.store.query_dead_letters(DeadLetterQuery())
    assert not page.items
    changes = Changes()
    changes.dead_letter(
        DeadLetterRecord(0, message_id, "vm", 1, None, b"1", "max_attempts", "u", 0.0, 1.0, ())
    )
    await relay.store.durable(relay.store.stage(changes))


async def test_cli_list_and_redrive(tmp_path: Path) -> None:
    with trio.fail_after(60):
        async with failing_relay(tmp_path) as (_up, server, client):
            ids = await _dead_letter(client, server.relay, "x", "y")
            url = str(client.base_url)
            listed = await trio.run_process(
                [sys.executable, "-m", "relay_trio", "deadletters", "list", "--url", url],
                capture_stdout=True,
            )
            rows = [orjson.loads(line) for line in listed.stdout.splitlines()]
            assert [row["message_id"] for row in rows] == ids
            dry = await trio.run_process(
                [
                    sys.executable,
                    "-m",
                    "relay_trio",
                    "deadletters",
                    "redrive",
                    "--url",
                    url,
                    "--resource-id",
                    "y",
                    "--dry-run",
                    "--token",
                    "admin-Token-77",
                ],
                capture_stdout=True,
            )
            answer = orjson.loads(dry.stdout)
            assert answer["matched"] == 1 and answer["dry_run"] is True
            denied = await trio.run_process(
                [
                    sys.executable,
                    "-m",
                    "relay_trio",
                    "deadletters",
                    "redrive",
                    "--url",
                    url,
                    "--resource-id",
                    "y",
                ],
                capture_stdout=True,
                capture_stderr=True,
                check=False,
            )
            assert denied.returncode == 1 and b"HTTP 401" in denied.stderr


@attrs.define(eq=False)
class HeldStore(MemoryStore):
    """A memory store whose commits complete only when the test releases them."""

    release: trio.Event = attrs.field(init=False, factory=trio.Event)
    waiting: int = attrs.field(init=False, default=0)

    async def durable(self, ticket: Ticket) -> None:
        self.waiting += 1
        await self.release.wait()
        await super().durable(ticket)


async def test_no_2xx_before_the_store_commits(tmp_path: Path) -> None:
    config = make_config(tmp_path, rate_per_minute=60000, burst=100)
    store = HeldStore(config.max_dead_letters)
    relay = Relay(config, store=store)
    with trio.fail_after(20):
        async with running_server(config, relay) as (_server, client):
            answers: list[int] = []

            async def post() -> None:
                r = await client.post("/v1/reports", json={"resource_id": "h", "payload": 1})
                answers.append(r.status_code)

            async def batch() -> None:
                r = await client.post(
                    "/v1/reports:batch", content=b'{"resource_id": "hb", "payload": 1}\n'
                )
                answers.append(r.status_code)

            async with trio.open_nursery() as nursery:
                nursery.start_soon(post)
                nursery.start_soon(batch)
                await eventually(lambda: store.waiting == 2)
                await trio.sleep(0.2)
                assert answers == []  # admitted, but no answer while the commit is held
                assert relay.metrics.reports_admitted.value == 2
                store.release.set()
            assert sorted(answers) == [200, 202]
