"""The ASGI fast lane (relay_trio/http/fast_lane.py) against Quart, on a real server.

The fast lane answers ordinary ingest requests; a chunked body (no Content-Length) is
always left to Quart. Sending the same input both ways must give the same answer: same
status, body, media type and the headers that carry meaning.
"""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator
from pathlib import Path

import httpx
import orjson
import pytest
import trio
from relay_helpers import eventually, make_config, memory_relay, running_server

from relay_trio.http.fast_lane import FastLane

MEANINGFUL = ("content-type", "retry-after", "idempotent-replayed", "connection")


def lane(server: object) -> FastLane:
    app = getattr(server, "http_app", None)
    assert isinstance(app, FastLane)
    return app


async def chunked(body: bytes) -> AsyncIterator[bytes]:
    """A request body httpx sends with ``Transfer-Encoding: chunked`` (Quart's lane)."""
    yield body


def answer(response: httpx.Response) -> tuple[int, object, dict[str, str]]:
    kept = {k: v for k, v in response.headers.items() if k in MEANINGFUL}
    body: object = response.content
    if response.headers.get("content-type") == "application/x-ndjson":
        body = [orjson.loads(line) for line in response.content.splitlines()]
    elif response.headers.get("content-type", "").endswith("json") and response.content:
        body = orjson.loads(response.content)
    return response.status_code, body, kept


#: (name, path, body, headers): inputs answered 2xx and 4xx alike.
CASES: list[tuple[str, str, bytes, dict[str, str]]] = [
    ("accepted", "/v1/reports", b'{"resource_id": "%s", "payload": 1}', {}),
    ("malformed", "/v1/reports", b'{"resource_id": ', {}),
    ("invalid", "/v1/reports", b'{"resource_id": "", "payload": 1}', {}),
    ("not an object", "/v1/reports", b"[1, 2]", {}),
    ("empty body", "/v1/reports", b"", {}),
    (
        "bad key",
        "/v1/reports",
        b'{"resource_id": "%s", "payload": 1}',
        {"Idempotency-Key": "k" * 1000},
    ),
    ("batch", "/v1/reports:batch", b'{"resource_id": "%s", "payload": 1}\n\nnot json\n', {}),
    ("empty batch", "/v1/reports:batch", b"\n\n", {}),
]


@pytest.mark.parametrize(("name", "path", "body", "headers"), CASES, ids=[c[0] for c in CASES])
async def test_fast_lane_answers_like_quart(
    tmp_path: Path, name: str, path: str, body: bytes, headers: dict[str, str]
) -> None:
    relay, _ = memory_relay(tmp_path)
    async with running_server(relay.config, relay) as (server, client):
        fast = lane(server)
        answers = []
        for via, rid in (("fast", b"r-fast"), ("quart", b"r-quart")):
            content = body.replace(b"%s", rid)
            before = fast.served
            if via == "fast":
                r = await client.post(path, content=content, headers=headers)
            else:
                r = await client.post(path, content=chunked(content), headers=headers)
            assert fast.served == before + (1 if via == "fast" else 0), via
            answers.append(answer(r))
        (s1, b1, h1), (s2, b2, h2) = answers
        assert (s1, h1) == (s2, h2)
        assert s1 != 500
        if s1 == 202:
            # Each lane admitted its own resource's first message.
            assert (b1, b2) == ({"message_id": "r-fast:1"}, {"message_id": "r-quart:1"})
        elif path.endswith(":batch") and s1 == 200:
            assert b1 == orjson.loads(orjson.dumps(b2).replace(b"r-quart", b"r-fast"))
        else:
            assert b1 == b2


async def test_rate_limited_and_replayed_headers_on_the_fast_lane(tmp_path: Path) -> None:
    relay, _ = memory_relay(tmp_path, burst=1, rate_per_minute=1)
    async with running_server(relay.config, relay) as (server, client):
        report = b'{"resource_id": "r1", "payload": 1}'
        first = await client.post("/v1/reports", content=report, headers={"Idempotency-Key": "k1"})
        again = await client.post("/v1/reports", content=report, headers={"Idempotency-Key": "k1"})
        limited = await client.post("/v1/reports", content=report)
        assert lane(server).served == 3
    assert first.status_code == again.status_code == 202
    assert again.headers["idempotent-replayed"] == "true"
    assert "idempotent-replayed" not in first.headers
    assert again.json() == first.json() == {"message_id": "r1:1"}
    assert limited.status_code == 429
    assert limited.headers["content-type"] == "application/problem+json"
    assert int(limited.headers["retry-after"]) >= 1
    assert limited.json()["type"].endswith("rate-limited")


async def test_requests_the_fast_lane_does_not_take_go_to_quart(tmp_path: Path) -> None:
    token = "ingest-Tok-0123456789"
    config = make_config(tmp_path, store="memory", ingest_token=token, max_body_bytes=100)
    async with running_server(config) as (server, client):
        fast = lane(server)
        ok = {"Authorization": f"Bearer {token}"}
        report = b'{"resource_id": "r1", "payload": 1}'
        assert (await client.post("/v1/reports", content=report, headers=ok)).status_code == 202
        assert fast.served == 1
        missing = await client.post("/v1/reports", content=report)
        wrong = await client.post(
            "/v1/reports", content=report, headers={"Authorization": "Bearer nope"}
        )
        at_limit = b'{"resource_id": "r2", "payload": "' + b"x" * 64 + b'"}'
        assert len(at_limit) == 100
        exact = await client.post("/v1/reports", content=at_limit, headers=ok)
        over = await client.post("/v1/reports", content=at_limit + b" ", headers=ok)
        # Only the request exactly at the limit was the fast lane's.
        assert fast.served == 2
    assert (missing.status_code, wrong.status_code) == (401, 403)
    # Quart closes a connection whose body it did not read, as before the fast lane.
    assert missing.headers["connection"] == wrong.headers["connection"] == "close"
    assert exact.status_code == 202
    assert over.status_code == 413
    assert over.json()["type"].endswith("too-large")


async def test_latency_is_observed_for_the_route(tmp_path: Path) -> None:
    relay, _ = memory_relay(tmp_path)
    async with running_server(relay.config, relay) as (server, client):
        for i in range(3):
            await client.post("/v1/reports", content=b'{"resource_id": "r%d", "payload": 1}' % i)
        metrics = (await client.get("/metrics")).text
        assert lane(server).served == 3
    line = next(
        x
        for x in metrics.splitlines()
        if x.startswith("relay_http_request_duration_seconds_count") and 'route="/v1/reports"' in x
    )
    assert float(line.rsplit(" ", 1)[1]) == 3.0


async def test_client_leaving_mid_body_is_not_an_error(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    relay, _ = memory_relay(tmp_path)
    async with running_server(relay.config, relay) as (server, client):
        port = int(str(client.base_url).rsplit(":", 1)[1].rstrip("/"))
        with caplog.at_level(logging.ERROR):
            stream = await trio.open_tcp_stream("127.0.0.1", port)
            await stream.send_all(
                b'POST /v1/reports HTTP/1.1\r\nHost: x\r\nContent-Length: 50\r\n\r\n{"resou'
            )
            await trio.sleep(0.05)
            await stream.aclose()
            await trio.sleep(0.05)
            after = await client.post("/v1/reports", content=b'{"resource_id": "r9", "payload": 1}')
        assert after.status_code == 202
        assert relay.metrics.reports_admitted.value == 1
        assert lane(server).served == 1  # the abandoned request got no answer
    assert not [r for r in caplog.records if r.levelno >= logging.ERROR]


async def test_acks_on_the_fast_lane_answer_like_quart(tmp_path: Path) -> None:
    # The upstream acknowledges later: each lane ACKs its own pending message, then the
    # same bad inputs go both ways.
    relay, ups = memory_relay(tmp_path, mode="sent")
    async with running_server(relay.config, relay) as (server, client):
        fast = lane(server)
        for rid in ("r-fast", "r-quart"):
            r = await client.post(
                "/v1/reports", content=b'{"resource_id": "%s", "payload": 1}' % rid.encode()
            )
            assert r.status_code == 202
        await eventually(lambda: sum(len(u.received) for u in ups.values()) == 2)
        cases = [
            b'{"message_id": "%s:1", "status": "ack"}',  # clears the pending message
            b'{"message_id": "%s:1", "status": "ack"}',  # again: nothing pending any more
            b'{"message_id": "%s:9", "status": "nack", "reason": "busy"}',  # unknown id
            b'{"message_id": "%s", "status": "ack"}',  # not a message id: 422
            b'{"message_id": "%s:1", "status": "maybe"}',  # bad status: 422
            b'{"message_id": ',  # malformed: 400
        ]
        for body in cases:
            got = []
            for via, mine in (("fast", b"r-fast"), ("quart", b"r-quart")):
                content = body.replace(b"%s", mine)
                before = fast.served
                if via == "fast":
                    r = await client.post("/v1/acks", content=content)
                else:
                    r = await client.post("/v1/acks", content=chunked(content))
                assert fast.served == before + (via == "fast")
                status, answer_body, headers = answer(r)
                if isinstance(answer_body, dict) and "message_id" in answer_body:
                    answer_body = {**answer_body, "message_id": "*"}
                got.append((status, answer_body, headers))
            assert got[0] == got[1], body
            assert got[0][0] != 500
        assert relay.metrics.acks["acked"].value == 2


async def test_the_ack_lane_needs_the_ack_token(tmp_path: Path) -> None:
    config = make_config(tmp_path, store="memory", ack_token="ack-Tok-0123456789")
    async with running_server(config) as (server, client):
        fast = lane(server)
        body = b'{"message_id": "r:1", "status": "ack"}'
        ok = await client.post(
            "/v1/acks", content=body, headers={"Authorization": "Bearer ack-Tok-0123456789"}
        )
        assert fast.served == 1
        missing = await client.post("/v1/acks", content=body)
        wrong = await client.post(
            "/v1/acks", content=body, headers={"Authorization": "Bearer ingest-token"}
        )
        assert fast.served == 1
    assert ok.status_code == 200
    assert (missing.status_code, wrong.status_code) == (401, 403)
    assert missing.headers["connection"] == "close"
