"""Fault injection with real servers: failing, NACKing, ACK-dropping and flapping upstreams.

Every admitted report must end acked or dead-lettered (zero lost), and failover must move
only the resources of the upstream that went down.
"""

from __future__ import annotations

from collections import Counter
from pathlib import Path

import httpx
import trio
from fake_upstream import Behaviour, FakeUpstream, run_fake_upstream
from relay_helpers import eventually, make_config, running_server

from relay_trio.core.umh import MessageState


def fast_retry_config(tmp_path: Path, urls: list[str], **overrides: object) -> dict[str, object]:
    base: dict[str, object] = {
        "upstreams": urls,
        "rate_per_minute": 60000,
        "burst": 100,
        "ack_timeout": 0.5,
        "retry_base": 0.05,
        "retry_cap": 0.3,
        "max_attempts": 8,
        "send_timeout": 2,
        "probe_interval": 0.1,
        "send_queue_size": 20000,
        # The fakes run in this process and share its CPU with the relay: with 3 x 64
        # requests in flight, a 2 s send_timeout would measure the test machine's load.
        "upstream_concurrency": 8,
    }
    base.update(overrides)
    return base


async def post_many(client: httpx.AsyncClient, rids: list[str]) -> list[str]:
    """POST one report per resource id via the batch endpoint; return admitted message ids."""
    admitted: list[str] = []
    for start in range(0, len(rids), 500):
        body = b"".join(
            b'{"resource_id": "%s", "payload": {"i": %d}}\n' % (rid.encode(), i)
            for i, rid in enumerate(rids[start : start + 500], start)
        )
        r = await client.post("/v1/reports:batch", content=body)
        assert r.status_code == 200
        for line in r.text.splitlines():
            reply = httpx.Response(200, content=line).json()
            assert "message_id" in reply, reply
            admitted.append(reply["message_id"])
    return admitted


def receiver_of(ups: list[FakeUpstream], message_id: str) -> set[int]:
    return {i for i, up in enumerate(ups) if message_id in up.message_ids()}


async def test_every_admitted_report_ends_acked_or_dead_lettered(tmp_path: Path) -> None:
    with trio.fail_after(60):
        async with run_fake_upstream() as u0, run_fake_upstream() as u1, run_fake_upstream() as u2:
            ups = [u0, u1, u2]
            config = make_config(tmp_path, **fast_retry_config(tmp_path, [u.url for u in ups]))
            async with running_server(config) as (server, client):
                relay = server.relay
                ack_url = str(client.base_url) + "/v1/acks"
                u0.behaviour = Behaviour(fail_first=40)
                u1.behaviour = Behaviour(
                    sync_ack=False, ack_callback_url=ack_url, drop_acks_first=30
                )
                u2.behaviour = Behaviour(
                    sync_ack=False, ack_callback_url=ack_url, nack_first=25, nack_retry_after=0.1
                )
                admitted = await post_many(client, [f"res-{i}" for i in range(2500)])
                assert len(admitted) == 2500
                await eventually(lambda: relay.umh.pending_count() == 0, within=40)
                states = Counter(relay.umh.state_of(mid) for mid in admitted)
                assert states[MessageState.ACKED] + states[MessageState.DEAD] == 2500, states
                assert states[None] == 0
                # The faults really happened and were retried, not silently dropped.
                assert relay.umh.retries >= 40 + 30 + 25
                assert relay.umh.nacks >= 25 and relay.umh.ack_timeouts >= 30
                assert states[MessageState.ACKED] == 2500  # 8 attempts outlast every fault here
                dead = await client.get("/v1/deadletters")
                assert dead.json()["dead_letters"] == []


async def test_failover_moves_only_the_failed_upstreams_resources(tmp_path: Path) -> None:
    with trio.fail_after(60):
        async with run_fake_upstream() as u0, run_fake_upstream() as u1, run_fake_upstream() as u2:
            ups = [u0, u1, u2]
            config = make_config(tmp_path, **fast_retry_config(tmp_path, [u.url for u in ups]))
            async with running_server(config) as (server, client):
                relay = server.relay
                router = relay.router
                # Phase 1: u0 is down. Push enough to trip it, then more.
                u0.behaviour = Behaviour(fail_all=True)
                tripping = await post_many(client, [f"trip-{i}" for i in range(30)])
                await eventually(lambda: not router.is_up(0), within=10)
                rids = [f"p1-{i}" for i in range(600)]
                phase1 = await post_many(client, rids)
                await eventually(lambda: relay.umh.pending_count() == 0, within=30)
                for rid, mid in zip(rids, phase1, strict=True):
                    ranking = router.ranking(rid)
                    expected = ranking[1] if ranking[0] == 0 else ranking[0]
                    assert receiver_of(ups, mid) == {expected}, (rid, ranking)
                for mid in tripping:
                    assert relay.umh.state_of(mid) is MessageState.ACKED
                # Phase 2: u0 recovers; probes bring it back after 3 successes.
                u0.behaviour = Behaviour()
                await eventually(lambda: router.is_up(0), within=10)
                assert u0.probes >= 3
                rids2 = [f"p2-{i}" for i in range(600)]
                phase2 = await post_many(client, rids2)
                await eventually(lambda: relay.umh.pending_count() == 0, within=30)
                for rid, mid in zip(rids2, phase2, strict=True):
                    assert receiver_of(ups, mid) == {router.ranking(rid)[0]}
                moved = sum(1 for rid in rids if router.ranking(rid)[0] == 0)
                assert 120 < moved < 280  # about a third of the resources had u0 first


async def test_exhausted_message_is_dead_lettered_with_history(tmp_path: Path) -> None:
    with trio.fail_after(30):
        async with run_fake_upstream(Behaviour(fail_all=True)) as up:
            config = make_config(tmp_path, **fast_retry_config(tmp_path, [up.url], max_attempts=3))
            async with running_server(config) as (server, client):
                r = await client.post(
                    "/v1/reports", json={"resource_id": "doomed", "payload": {"x": 1}}
                )
                assert r.status_code == 202
                await eventually(lambda: server.relay.umh.pending_count() == 0, within=10)
                page = (await client.get("/v1/deadletters")).json()
                (dead,) = page["dead_letters"]
                assert dead["message_id"] == "doomed:1" and dead["reason"] == "max_attempts"
                assert len(dead["attempts"]) == 3 and dead["payload"] == {"x": 1}
                view = (await client.get("/v1/resources/doomed")).json()
                assert view["last_dead_letter"]["message_id"] == "doomed:1"
                assert view["pending"] is None
                # Dead letters live in the store (they replaced the JSONL spool).
                assert server.relay.store.stats().dead_letters == 1
