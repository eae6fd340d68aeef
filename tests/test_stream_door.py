"""The stream door of a real relay (hypercorn + stream receiver on 127.0.0.1:0): the
ingest token handshake, line numbers on every reply, and refusals counted like HTTP."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import orjson
import trio
from relay_helpers import eventually, make_config, running_server

from relay_trio.core.listen import parse_listen

TOKEN = "s3cret-ingest"


def report(rid: str, n: int = 1) -> bytes:
    return orjson.dumps({"resource_id": rid, "payload": {"n": n}}) + b"\n"


async def connect(url: str) -> trio.SocketStream:
    address = parse_listen(url)
    return await trio.open_tcp_stream(address.host, address.port)


async def read_until_closed(stream: trio.SocketStream) -> list[dict[str, Any]]:
    """Every line the relay sends until it closes (a reset after the data counts as closed)."""
    data = b""
    with trio.fail_after(10):
        try:
            while chunk := await stream.receive_some():
                data += chunk
        except trio.BrokenResourceError:
            pass
    await stream.aclose()
    return [orjson.loads(line) for line in data.splitlines()]


async def read_lines(stream: trio.SocketStream, n: int) -> list[dict[str, Any]]:
    data = b""
    with trio.fail_after(10):
        while data.count(b"\n") < n:
            chunk = await stream.receive_some()
            assert chunk, f"closed after {data!r}"
            data += chunk
    return [orjson.loads(line) for line in data.splitlines()]


def upstream_rids(tmp_path: Path) -> list[str]:
    path = tmp_path / "data" / "upstream.jsonl"
    if not path.exists():
        return []
    return [orjson.loads(line)["resource_id"] for line in path.read_bytes().splitlines()]


def received_equals_admitted_plus_rejected(metrics: Any) -> tuple[int, int, int]:
    received = metrics.value("relay_reports_received_total")
    admitted = metrics.value("relay_reports_admitted_total")
    rejected = sum(int(t.value) for t in metrics.rejected.values())
    assert received == admitted + rejected, (received, admitted, rejected)
    return received, admitted, rejected


async def test_stream_listener_requires_the_ingest_token(tmp_path: Path) -> None:
    config = make_config(
        tmp_path,
        stream_listen=["tcp://127.0.0.1:0"],
        ingest_token=TOKEN,
        rate_per_minute=6000,
        burst=10,
    )
    async with running_server(config) as (server, client):
        assert server.receiver is not None
        (url,) = server.receiver.bound
        refused: list[list[dict[str, Any]]] = []
        for first in (
            report("intruder-1"),  # no handshake at all
            b'{"token": "wrong"}\n' + report("intruder-2"),
            b'{"token": ""}\n' + report("intruder-3"),
            b'{"token": 1}\n' + report("intruder-4"),
        ):
            stream = await connect(url)
            await stream.send_all(first + report("intruder-5"))
            refused.append(await read_until_closed(stream))

        good = await connect(url)
        await good.send_all(b'{"token": "' + TOKEN.encode() + b'"}\n' + report("agent"))
        accepted = await read_lines(good, 2)
        await good.aclose()

        # HTTP with the same token works too; without it, 401 as before.
        ok = await client.post(
            "/v1/reports",
            json={"resource_id": "http-agent", "payload": 1},
            headers={"Authorization": f"Bearer {TOKEN}"},
        )
        assert ok.status_code == 202
        await eventually(lambda: len(upstream_rids(tmp_path)) == 2)
        metrics = server.relay.metrics
        assert metrics.value("relay_reports_admitted_total") == 2
        assert metrics.value("relay_reports_rejected_total", reason="unauthorized") == 4
        received_equals_admitted_plus_rejected(metrics)
    for replies in refused:
        assert len(replies) == 1, replies
        assert replies[0]["status"] == 401
        assert replies[0]["type"].endswith("/unauthorized")
        assert replies[0]["line"] == 1
    assert accepted == [{"ok": True, "line": 1}, {"message_id": "agent:1", "line": 2}]
    # Nothing from an unauthenticated connection was admitted or delivered.
    assert sorted(upstream_rids(tmp_path)) == ["agent", "http-agent"]
    assert server.receiver.auth_failures == 4


async def test_stream_listener_without_ingest_token_is_open(tmp_path: Path) -> None:
    config = make_config(tmp_path, stream_listen=["tcp://127.0.0.1:0"])
    async with running_server(config) as (server, _):
        assert server.receiver is not None
        stream = await connect(server.receiver.bound[0])
        await stream.send_all(report("open"))
        assert await read_lines(stream, 1) == [{"message_id": "open:1", "line": 1}]
        await stream.aclose()


FOURTEEN_LINES = [
    report("n1"),
    report("n2"),
    b"\n",
    b"{broken\n",
    report("n3"),
    b'{"resource_id": "bad id", "payload": 1}\n',
    report("n4"),
    b"   \r\n",
    report("n1", 2),  # rate limited (burst 1)
    report("n5"),
    report("n6"),
    b"[1, 2]\n",
    report("n7"),
    report("n8"),
]
# The 1-based input line of each result: the blank lines 3 and 8 get none.
EXPECTED = [
    (1, "n1:1"),
    (2, "n2:1"),
    (4, 400),
    (5, "n3:1"),
    (6, 422),
    (7, "n4:1"),
    (9, 429),
    (10, "n5:1"),
    (11, "n6:1"),
    (12, 422),
    (13, "n7:1"),
    (14, "n8:1"),
]


def numbered(replies: list[dict[str, Any]]) -> list[tuple[int, str | int]]:
    return [(r["line"], r.get("message_id") or r["status"]) for r in replies]


async def test_batch_results_carry_their_input_line(tmp_path: Path) -> None:
    assert len(FOURTEEN_LINES) == 14
    async with running_server(make_config(tmp_path)) as (_, client):
        r = await client.post("/v1/reports:batch", content=b"".join(FOURTEEN_LINES))
        assert r.status_code == 200
        replies = [orjson.loads(line) for line in r.content.splitlines()]
    assert len(replies) == 12
    assert numbered(replies) == EXPECTED


async def test_stream_replies_carry_their_input_line(tmp_path: Path) -> None:
    config = make_config(tmp_path, stream_listen=["tcp://127.0.0.1:0"])
    async with running_server(config) as (server, _):
        assert server.receiver is not None
        stream = await connect(server.receiver.bound[0])
        # Lines straddle writes: numbering follows input lines, not reads.
        data = b"".join(FOURTEEN_LINES)
        for start in range(0, len(data), 23):
            await stream.send_all(data[start : start + 23])
        replies = await read_lines(stream, 12)
        await stream.aclose()
    assert numbered(replies) == EXPECTED


async def test_stream_refusals_are_counted_like_http(tmp_path: Path) -> None:
    config = make_config(tmp_path, stream_listen=["tcp://127.0.0.1:0"], stream_max_frame=200)
    async with running_server(config) as (server, client):
        assert server.receiver is not None
        url = server.receiver.bound[0]
        stream = await connect(url)
        await stream.send_all(report("s1") + b"{nope\n" + b'{"resource_id": 1}\n' + report("s1"))
        replies = await read_lines(stream, 4)
        await stream.send_all(b'{"resource_id": "s2", "payload": "' + b"x" * 300 + b'"}\n')
        replies += await read_until_closed(stream)
        # The HTTP door, for comparison: the same kinds of refusal.
        assert (await client.post("/v1/reports", content=b"{nope")).status_code == 400
        metrics = server.relay.metrics
        received, admitted, _ = received_equals_admitted_plus_rejected(metrics)
        rejected = {
            reason: metrics.value("relay_reports_rejected_total", reason=reason)
            for reason in ("malformed", "invalid", "rate_limited", "too_large")
        }
    assert [r.get("status") for r in replies] == [None, 400, 422, 429, 413]
    assert [r["line"] for r in replies] == [1, 2, 3, 4, 5]
    assert (received, admitted) == (6, 1)
    assert rejected == {"malformed": 2, "invalid": 1, "rate_limited": 1, "too_large": 1}
