"""The HTTP API against a real hypercorn server on 127.0.0.1:0, with httpx."""

from __future__ import annotations

import math
import re
from pathlib import Path

import orjson
import trio
from fake_upstream import Behaviour, run_fake_upstream
from relay_helpers import eventually, make_config, running_server

PROBLEM = "application/problem+json"


async def test_post_admits_then_rate_limits_and_reaches_jsonl_sink(tmp_path: Path) -> None:
    config = make_config(tmp_path)
    async with running_server(config) as (server, client):
        first = await client.post(
            "/v1/reports", json={"resource_id": "vm-1", "payload": {"os": "linux"}}
        )
        assert first.status_code == 202
        assert first.json() == {"message_id": "vm-1:1"}
        second = await client.post(
            "/v1/reports", json={"resource_id": "vm-1", "payload": {"os": "bsd"}}
        )
        assert second.status_code == 429
        assert second.headers["content-type"] == PROBLEM
        problem = second.json()
        assert problem["reason"] == "rate_limited"
        # One report per minute: the wait is a minute minus the time between the POSTs.
        assert 50 < problem["retry_after"] <= 60
        assert second.headers["retry-after"] == str(math.ceil(problem["retry_after"]))
        sink = Path(config.data_dir) / "upstream.jsonl"
        await eventually(lambda: sink.exists() and bool(sink.read_bytes()))
        line = orjson.loads(sink.read_bytes().splitlines()[0])
        assert line["message_id"] == "vm-1:1" and line["payload"] == {"os": "linux"}
        await eventually(lambda: server.relay.umh.pending_count() == 0)
        state = (await client.get("/v1/resources/vm-1")).json()
        assert state["seq"] == 1 and state["rejected"] == 1 and state["last_acked_at"] is not None
        missing = await client.get("/v1/resources/nope")
        assert missing.status_code == 404 and missing.headers["content-type"] == PROBLEM


async def test_http_upstream_receives_reports_and_sync_ack(tmp_path: Path) -> None:
    async with run_fake_upstream() as up:
        up.behaviour = Behaviour(sync_ack=True)
        config = make_config(tmp_path, upstreams=[up.url], rate_per_minute=6000, burst=10)
        async with running_server(config) as (server, client):
            for i in range(5):
                r = await client.post(
                    "/v1/reports", json={"resource_id": f"r{i}", "payload": i, "kind": "scan"}
                )
                assert r.status_code == 202
            with trio.fail_after(5):
                await up.wait_received(5)
            bodies = sorted(
                (rec.body["message_id"], rec.body["payload"], rec.body["kind"])
                for rec in up.received
            )
            assert bodies == [(f"r{i}:1", i, "scan") for i in range(5)]
            await eventually(lambda: server.relay.umh.pending_count() == 0)
            assert server.relay.umh.acked == 5


async def test_bad_input_gets_the_right_4xx_and_the_server_keeps_serving(tmp_path: Path) -> None:
    config = make_config(tmp_path, max_body_bytes=1024)
    async with running_server(config) as (_, client):
        cases = [
            ("POST", "/v1/reports", b"{not json", 400),
            ("POST", "/v1/reports", b"", 400),
            ("POST", "/v1/reports", b"[" * 100 + b"]" * 100, 400),
            (
                "POST",
                "/v1/reports",
                b'{"resource_id": "x", "payload": "' + b"a" * 2000 + b'"}',
                413,
            ),
            ("POST", "/v1/reports", b'{"resource_id": 7, "payload": 1}', 422),
            ("POST", "/v1/reports", b'{"resource_id": "has space", "payload": 1}', 422),
            ("POST", "/v1/reports", b'{"resource_id": "ok"}', 422),
            ("POST", "/v1/reports", b'"just a string"', 422),
            ("POST", "/v1/reports", b"\xff\xfe", 400),
            ("POST", "/v1/acks", b'{"message_id": "nocolon", "status": "ack"}', 422),
            ("POST", "/v1/acks", b'{"message_id": "a:1", "status": "maybe"}', 422),
            (
                "POST",
                "/v1/acks",
                b'{"message_id": "a:1", "status": "nack", "retry_after": -1}',
                422,
            ),
            ("GET", "/v1/events?limit=5000", b"", 422),
            ("GET", "/v1/events?after=-1", b"", 422),
            ("GET", "/v1/events?topic=nope", b"", 422),
            ("GET", "/v1/deadletters?limit=0", b"", 422),
            ("GET", "/no/such/route", b"", 404),
            ("DELETE", "/v1/reports", b"", 405),
            ("GET", "/v1/reports", b"", 405),
        ]
        for method, path, body, status in cases:
            r = await client.request(method, path, content=body)
            assert r.status_code == status, (method, path, body[:40], r.status_code, r.text)
            assert r.headers["content-type"] == PROBLEM
            problem = r.json()
            assert problem["status"] == status and problem["type"].startswith("https://")
        chunked = await client.post(
            "/v1/reports",
            content=iter_chunks([b'{"resource_id": "x", "payload": "', b"a" * 4000, b'"}']),
        )
        assert chunked.status_code == 413
        ok = await client.post("/v1/reports", json={"resource_id": "still-alive", "payload": 1})
        assert ok.status_code == 202
        assert (await client.get("/healthz")).status_code == 200
        assert (await client.get("/readyz")).json() == {"ready": True}


async def iter_chunks(chunks: list[bytes]):  # type: ignore[no-untyped-def]
    for chunk in chunks:
        yield chunk


async def test_openapi_lists_every_real_route(tmp_path: Path) -> None:
    async with running_server(make_config(tmp_path)) as (_, client):
        doc = (await client.get("/openapi.json")).json()
        assert doc["openapi"].startswith("3.")
        for path, method in [
            ("/v1/reports", "post"),
            ("/v1/reports:batch", "post"),
            ("/v1/acks", "post"),
            ("/v1/resources/{resource_id}", "get"),
            ("/v1/events", "get"),
            ("/v1/events/stream", "get"),
            ("/metrics", "get"),
            ("/admin/shutdown", "post"),
        ]:
            assert method in doc["paths"][path], path


async def test_batch_answers_one_result_per_line_in_order(tmp_path: Path) -> None:
    config = make_config(tmp_path, max_body_bytes=200, batch_max_lines=10)
    async with running_server(config) as (server, client):
        body = b"\n".join(
            [
                b'{"resource_id": "b1", "payload": 1}',
                b'{"resource_id": "b1", "payload": 2}',
                b"{broken",
                b'{"resource_id": "no space allowed", "payload": 3}',
                b'{"resource_id": "b2", "payload": "' + b"x" * 300 + b'"}',
                b"",
                b'{"resource_id": "b3", "payload": 4}',
            ]
        )
        r = await client.post("/v1/reports:batch", content=body)
        assert r.status_code == 200 and r.headers["content-type"] == "application/x-ndjson"
        replies = [orjson.loads(line) for line in r.content.splitlines()]
        assert [reply.get("message_id") or reply["status"] for reply in replies] == [
            "b1:1",
            429,
            400,
            422,
            413,
            "b3:1",
        ]
        assert replies[1]["reason"] == "rate_limited" and replies[1]["retry_after"] > 59
        too_many = await client.post(
            "/v1/reports:batch", content=b'{"resource_id":"x","payload":1}\n' * 11
        )
        assert too_many.status_code == 413 and too_many.headers["content-type"] == PROBLEM
        assert server.relay.metrics.value("relay_reports_admitted_total") == 2


async def test_status_page_is_self_contained_and_its_assets_are_served(tmp_path: Path) -> None:
    async with running_server(make_config(tmp_path)) as (_, client):
        page = await client.get("/")
        assert page.status_code == 200 and page.headers["content-type"].startswith("text/html")
        html = page.text
        assets = re.findall(r'(?:src|href)="([^"]+)"', html)
        # Everything from the package itself: no CDN, works offline.
        assert sorted(assets) == [
            "/static/statuspage.css",
            "/static/statuspage.js",
            "/static/uPlot.iife.min.js",
            "/static/uPlot.min.css",
        ]
        assert "http://" not in html and "https://" not in html
        for path in assets:
            r = await client.get(path)
            assert r.status_code == 200 and len(r.content) > 1000, path
            kind = "text/javascript" if path.endswith(".js") else "text/css"
            assert r.headers["content-type"].startswith(kind), path
        script = (await client.get("/static/statuspage.js")).text
        assert "fetch('/v1/events/stream'" in script and "fetch('/v1/status'" in script
        licence = await client.get("/static/uPlot.LICENSE")
        assert licence.status_code == 200 and "Leon Sorokin" in licence.text
        for bad in ("/static/nope.js", "/static/..%2F_app.py", "/static/"):
            r = await client.get(bad)
            assert r.status_code == 404 and r.headers["content-type"] == PROBLEM, bad
        assert "/static/{name}" not in (await client.get("/openapi.json")).json()["paths"]
        status = (await client.get("/v1/status")).json()
        assert {"counters", "gauges", "events", "upstreams", "config"} <= set(status)
