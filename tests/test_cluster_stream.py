"""The NDJSON stream door in cluster mode, on a real nats-server: lines admitted through the
cluster (one bucket, unique ids across instances), a reply only once JetStream has the
report, 503 ``cluster-unavailable`` lines while NATS is down."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import orjson
import pytest
import trio
from nats_helpers import NatsServer, instances, running_nats
from relay_helpers import eventually

from relay_trio.core.listen import parse_listen

pytestmark = pytest.mark.slow

STREAM: dict[str, Any] = {"stream_listen": ["tcp://127.0.0.1:0"]}


@pytest.fixture
def nats_server(tmp_path: Path) -> Iterator[NatsServer]:
    yield from running_nats(tmp_path)


def line(rid: str, n: int) -> bytes:
    return orjson.dumps({"resource_id": rid, "payload": {"n": n}}) + b"\n"


async def connect(server: Any) -> trio.SocketStream:
    assert server.receiver is not None
    (url,) = server.receiver.bound
    address = parse_listen(url)
    return await trio.open_tcp_stream(address.host, address.port)


async def read_lines(stream: trio.SocketStream, n: int, buffer: bytearray) -> list[Any]:
    """The next ``n`` reply lines (``buffer`` keeps a partial line for the next call)."""
    with trio.fail_after(10):
        while buffer.count(b"\n") < n:
            chunk = await stream.receive_some()
            assert chunk, f"closed after {bytes(buffer)!r}"
            buffer += chunk
    lines = bytes(buffer).split(b"\n")
    del buffer[: sum(len(x) + 1 for x in lines[:n])]
    return [orjson.loads(x) for x in lines[:n]]


async def test_two_instances_streams_share_one_bucket_and_unique_ids(
    tmp_path: Path, nats_server: NatsServer
) -> None:
    async with instances(tmp_path, nats_server, ["a", "b"], **STREAM) as nodes:
        (sa, _, ua), (sb, _, ub) = nodes
        a, b = await connect(sa), await connect(sb)
        ba, bb = bytearray(), bytearray()
        # The default bucket (burst 1): the first line for vm-1 on a, the second on b → 429.
        await a.send_all(line("vm-1", 1))
        assert await read_lines(a, 1, ba) == [{"message_id": "vm-1:1", "line": 1}]
        await b.send_all(line("vm-1", 2))
        (refused,) = await read_lines(b, 1, bb)
        assert (refused["status"], refused["reason"], refused["line"]) == (429, "rate_limited", 1)
        await eventually(lambda: [o.message_id for o in ua.received + ub.received] == ["vm-1:1"])
        await a.aclose()
        await b.aclose()


async def test_concurrent_stream_windows_on_two_instances_hand_out_unique_ids(
    tmp_path: Path, nats_server: NatsServer
) -> None:
    async with instances(
        tmp_path, nats_server, ["a", "b"], rate_per_minute=600000.0, burst=1000, **STREAM
    ) as nodes:
        ids: list[str] = []

        async def push(server: Any, name: str) -> None:
            stream = await connect(server)
            buffer = bytearray()
            for window in range(5):  # several reads: one admit_many call each
                await stream.send_all(b"".join(line("hot", 20 * window + i) for i in range(20)))
                replies = await read_lines(stream, 20, buffer)
                assert [r["line"] for r in replies] == list(
                    range(20 * window + 1, 20 * window + 21)
                ), name
                ids.extend(r["message_id"] for r in replies)
            await stream.aclose()

        async with trio.open_nursery() as nursery:
            for server, _, _ in nodes:
                nursery.start_soon(push, server, server.config.instance_id)
        assert sorted(int(i.rsplit(":", 1)[1]) for i in ids) == list(range(1, 201))
        assert nodes[0][0].receiver is not None
        assert nodes[0][0].receiver.lines_ok == 100


async def test_nats_down_answers_503_lines_and_every_answered_id_is_delivered(
    tmp_path: Path, nats_server: NatsServer
) -> None:
    async with instances(
        tmp_path, nats_server, ["a"], rate_per_minute=600000.0, burst=1000, **STREAM
    ) as [(server, client, up)]:
        stream = await connect(server)
        buffer = bytearray()
        answered: list[str] = []
        n = 0

        async def send(count: int) -> list[Any]:
            nonlocal n
            await stream.send_all(b"".join(line(f"r{n + i}", n + i) for i in range(count)))
            n += count
            replies = await read_lines(stream, count, buffer)
            answered.extend(r["message_id"] for r in replies if "message_id" in r)
            return replies

        assert all("message_id" in r for r in await send(10))
        nats_server.stop()
        await eventually(
            lambda: not server.relay.cluster or not server.relay.cluster.connected.value
        )
        down = await send(5)
        assert {(r["status"], r["type"].rsplit("/", 1)[-1]) for r in down} == {
            (503, "cluster-unavailable")
        }
        assert (await client.get("/readyz")).status_code == 503
        nats_server.start()
        with trio.fail_after(20):
            while not all("message_id" in r for r in await send(5)):  # noqa: ASYNC110 - NATS state
                await trio.sleep(0.1)
        await eventually(lambda: {o.message_id for o in up.received} >= set(answered), within=20)
        await stream.aclose()
