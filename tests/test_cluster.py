"""Cluster mode on a real nats-server: N relay instances share admission and delivery."""

from __future__ import annotations

import os
import signal
import sys
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import httpx
import orjson
import pytest
import trio
from fake_upstream import Behaviour, run_fake_upstream
from nats_helpers import NatsServer, free_port, instances, running_nats
from relay_helpers import eventually, relay_subprocess

pytestmark = pytest.mark.slow


@pytest.fixture
def nats_server(tmp_path: Path) -> Iterator[NatsServer]:
    yield from running_nats(tmp_path)


async def test_one_bucket_and_unique_ids_across_two_instances(
    tmp_path: Path, nats_server: NatsServer
) -> None:
    async with instances(tmp_path, nats_server, ["a", "b"]) as [(_, a, _ua), (_, b, _ub)]:
        first = await a.post("/v1/reports", json={"resource_id": "vm-1", "payload": {"n": 1}})
        assert first.status_code == 202, first.text
        second = await b.post("/v1/reports", json={"resource_id": "vm-1", "payload": {"n": 2}})
        assert second.status_code == 429
        assert second.json()["reason"] == "rate_limited"
        assert first.json()["message_id"] == "vm-1:1"


async def test_three_instances_hand_out_unique_ids(tmp_path: Path, nats_server: NatsServer) -> None:
    async with instances(
        tmp_path, nats_server, ["a", "b", "c"], rate_per_minute=6000.0, burst=1000
    ) as nodes:
        clients = [c for _, c, _ in nodes]
        ids: list[str] = []

        async def post(client: httpx.AsyncClient, n: int) -> None:
            body = b"".join(b'{"resource_id": "hot", "payload": {"i": %d}}\n' % i for i in range(n))
            r = await client.post("/v1/reports:batch", content=body)
            lines = list(map(orjson.loads, r.content.splitlines()))
            assert [line for line in lines if "message_id" not in line] == []
            ids.extend(line["message_id"] for line in lines)

        async with trio.open_nursery() as nursery:
            for client in clients:
                for _ in range(3):
                    nursery.start_soon(post, client, 20)
        assert len(ids) == 180
        assert len(set(ids)) == 180
        assert sorted(int(i.rsplit(":", 1)[1]) for i in ids) == list(range(1, 181))


async def test_async_ack_posted_to_b_clears_a_message_sent_by_a(
    tmp_path: Path, nats_server: NatsServer
) -> None:
    # The upstreams answer "sent" (the ACK comes later), so the message waits in JetStream
    # for its ACK; the ACK is posted to the instance that did *not* send it.
    async with instances(tmp_path, nats_server, ["a", "b"], mode="sent", ack_timeout=30.0) as (
        nodes
    ):
        (_, a, ua), (_, b, ub) = nodes
        r = await a.post("/v1/reports", json={"resource_id": "vm-7", "payload": {"x": 1}})
        message_id = r.json()["message_id"]
        await eventually(lambda: len(ua.received) + len(ub.received) == 1)
        other = b if ua.received else a
        ack = await other.post("/v1/acks", json={"message_id": message_id, "status": "ack"})
        assert ack.json() == {"message_id": message_id, "outcome": "acked"}

        async def consumer() -> dict[str, Any]:
            return dict((await other.get("/v1/status")).json()["cluster"]["consumer"])

        with trio.fail_after(10):
            while (await consumer()).get("ack_pending", -1) != 0:  # noqa: ASYNC110 - remote state
                await trio.sleep(0.2)
        assert (await consumer())["pending"] == 0
        again = await other.post("/v1/acks", json={"message_id": message_id, "status": "ack"})
        assert again.json()["outcome"] == "unknown"
        assert [o.message_id for o in ua.received + ub.received] == [message_id]


SHARED = {
    "ack_timeout": "1",
    "retry_base": "0.2",
    "retry_cap": "1",
    "nats_heartbeat": "0.5",
    "rate_per_minute": "600000",
    "burst": "1000",
}


@asynccontextmanager
async def relay_process(tmp: Path, nats: NatsServer, upstream: str) -> AsyncIterator[Any]:
    """``relay-trio run`` with ``store = nats`` in a child process (for kill -9)."""
    env = {
        **os.environ,
        "RELAY_TRIO_PORT": "0",
        "RELAY_TRIO_DATA_DIR": str(tmp / "x"),
        "RELAY_TRIO_UPSTREAMS": upstream,
        "RELAY_TRIO_STORE": "nats",
        "RELAY_TRIO_NATS_URL": nats.url,
        "RELAY_TRIO_INSTANCE_ID": "x",
        **{f"RELAY_TRIO_{k.upper()}": v for k, v in SHARED.items()},
    }
    stderr = tmp / "x-stderr.log"
    async with relay_subprocess(env, stderr) as (proc, url):
        yield proc, url


async def test_kill9_of_an_instance_holding_unacked_messages_loses_none(
    tmp_path: Path, nats_server: NatsServer
) -> None:
    shared: dict[str, Any] = {k: float(v) for k, v in SHARED.items() if k != "burst"}
    shared["burst"] = 1000
    async with (
        run_fake_upstream() as fake,
        relay_process(tmp_path, nats_server, fake.url) as (proc, url),
    ):
        fake.behaviour = Behaviour(sync_ack=False)  # 202: the ACK would come later
        body = b"".join(
            orjson.dumps({"resource_id": f"r{i}", "payload": {"i": i}}) + b"\n" for i in range(40)
        )
        async with httpx.AsyncClient(base_url=url, timeout=10) as x:
            r = await x.post("/v1/reports:batch", content=body)
        sent = {
            line["message_id"]: i
            for i, line in enumerate(map(orjson.loads, r.content.splitlines()))
        }
        assert len(sent) == 40
        await fake.wait_received(40)
        async with instances(tmp_path, nats_server, ["a", "b"], **shared) as nodes:
            proc.send_signal(signal.SIGKILL)
            with trio.fail_after(10):
                await proc.wait()
            ups = [u for _, _, u in nodes]
            await eventually(
                lambda: {o.message_id for u in ups for o in u.received} >= set(sent), within=20
            )
            for o in (o for u in ups for o in u.received):
                assert o.payload == {"i": sent[o.message_id]}
                assert o.attempt >= 2


async def test_nats_restart_under_load_pauses_with_503_and_loses_nothing(
    tmp_path: Path, nats_server: NatsServer
) -> None:
    async with instances(
        tmp_path, nats_server, ["a", "b"], rate_per_minute=600000.0, burst=1000
    ) as nodes:
        clients = [c for _, c, _ in nodes]
        ups = [u for _, _, u in nodes]
        admitted: set[str] = set()
        statuses: list[int] = []
        stop = trio.Event()

        async def load(client: httpx.AsyncClient, name: str) -> None:
            n = 0
            while not stop.is_set():
                n += 1
                try:
                    r = await client.post(
                        "/v1/reports", json={"resource_id": f"{name}-{n}", "payload": {"n": n}}
                    )
                except httpx.HTTPError:
                    continue
                statuses.append(r.status_code)
                if r.status_code == 202:
                    admitted.add(r.json()["message_id"])
                else:
                    assert r.status_code == 503, r.text
                    await trio.sleep(0.05)

        async with trio.open_nursery() as nursery:
            for i, client in enumerate(clients):
                nursery.start_soon(load, client, f"c{i}")
            await eventually(lambda: len(admitted) >= 20)
            nats_server.stop()
            await eventually(lambda: 503 in statuses)
            ready = await clients[0].get("/readyz")
            assert ready.status_code == 503
            before = len(admitted)
            nats_server.start()
            await eventually(lambda: len(admitted) >= before + 20, within=20)
            assert (await clients[0].get("/readyz")).status_code == 200
            stop.set()
        await eventually(
            lambda: {o.message_id for u in ups for o in u.received} >= admitted, within=20
        )
        status = (await clients[1].get("/v1/status")).json()["cluster"]
        assert status["disconnects"] >= 1


async def _run_refused(tmp_path: Path, env: dict[str, str]) -> str:
    """``relay-trio run`` that must refuse to start: exit 2 and one line on stderr."""
    with trio.fail_after(15):
        result = await trio.run_process(
            [sys.executable, "-m", "relay_trio", "run"],
            cwd=tmp_path,
            env={**os.environ, "RELAY_TRIO_PORT": "0", **env},
            capture_stdout=True,
            capture_stderr=True,
            check=False,
        )
    err = result.stderr.decode().strip()
    assert result.returncode == 2, err
    assert len(err.splitlines()) == 1, err
    assert "Traceback" not in err and not result.stdout
    return err


async def test_config_contradicting_an_asset_refuses_to_start_and_changes_nothing(
    tmp_path: Path, nats_server: NatsServer
) -> None:
    async with instances(tmp_path, nats_server, ["a"]) as [(_, a, _)]:
        # max_dead_letters 10000 (the default) made RELAY_DEADLETTERS with max_msgs 10000.
        assert (await a.get("/readyz")).status_code == 200
        env = {
            "RELAY_TRIO_DATA_DIR": str(tmp_path / "b"),
            "RELAY_TRIO_STORE": "nats",
            "RELAY_TRIO_NATS_URL": nats_server.url,
            "RELAY_TRIO_INSTANCE_ID": "b",
            "RELAY_TRIO_ACK_TIMEOUT": "1",
            "RELAY_TRIO_RETRY_BASE": "0.2",
            "RELAY_TRIO_RETRY_CAP": "1",
            "RELAY_TRIO_NATS_HEARTBEAT": "0.5",
            "RELAY_TRIO_MAX_DEAD_LETTERS": "123",
        }
        err = await _run_refused(tmp_path, env)
        assert err == (
            "relay-trio: JetStream stream RELAY_DEADLETTERS has max_msgs=10000 but the config "
            "needs 123; delete it or fix the config"
        )
        # The asset was left as it was: the running instance still works on it, and an
        # instance with the same settings as the first starts.
        r = await a.post("/v1/reports", json={"resource_id": "vm", "payload": 1})
        assert r.status_code == 202
    async with instances(tmp_path, nats_server, ["c"]) as [(_, c, _)]:
        assert (await c.get("/readyz")).status_code == 200


async def test_unreachable_nats_refuses_to_start(tmp_path: Path) -> None:
    env = {
        "RELAY_TRIO_DATA_DIR": str(tmp_path / "x"),
        "RELAY_TRIO_STORE": "nats",
        "RELAY_TRIO_NATS_URL": f"nats://127.0.0.1:{free_port()}",
    }
    err = await _run_refused(tmp_path, env)
    assert err.startswith("relay-trio: cannot use NATS JetStream at nats://127.0.0.1:"), err
