"""Event log and SSE fan-out against a real server with real streaming clients."""

from __future__ import annotations

from collections.abc import AsyncGenerator
from contextlib import aclosing
from pathlib import Path
from typing import Any

import httpx
import orjson
import trio
from relay_helpers import eventually, make_config, running_server


async def sse_events(response: httpx.Response) -> AsyncGenerator[dict[str, Any], None]:
    """Parse an SSE stream into ``{"event", "id", "data"}`` dicts (comments skipped).

    httpx's line iterator is closed with the response (see the pyproject warning filters).
    """
    event: dict[str, Any] = {}
    async for line in response.aiter_lines():
        if line == "":
            if event:
                yield event
            event = {}
        elif not line.startswith(":"):
            field, _, value = line.partition(":")
            value = value.removeprefix(" ")
            event[field] = orjson.loads(value) if field == "data" else value


async def take(response: httpx.Response, n: int, kind: str | None = None) -> list[dict[str, Any]]:
    out: list[dict[str, Any]] = []
    with trio.fail_after(10):
        async with aclosing(sse_events(response)) as events:
            async for event in events:
                if kind is None or event.get("event") == kind:
                    out.append(event)
                    if len(out) == n:
                        return out
    raise AssertionError(f"stream ended after {len(out)} events")


async def test_stream_resume_with_last_event_id_gets_exactly_the_missed_events(
    tmp_path: Path,
) -> None:
    async with running_server(make_config(tmp_path)) as (server, client):
        relay = server.relay
        async with client.stream("GET", "/v1/events/stream?topic=system") as r:
            assert r.status_code == 200
            assert r.headers["content-type"].startswith("text/event-stream")
            assert r.headers["cache-control"] == "no-store"
            assert r.headers["x-accel-buffering"] == "no"
            for i in range(3):
                relay.publish("system", {"kind": "test", "n": i})
            got = await take(r, 3)
        assert [e["data"]["data"]["n"] for e in got] == [0, 1, 2]
        last_id = got[-1]["id"]
        await eventually(lambda: relay.hub.subscriber_count() == 0, within=5)
        for i in range(3, 7):
            relay.publish("system", {"kind": "test", "n": i})
        async with client.stream(
            "GET", "/v1/events/stream?topic=system", headers={"Last-Event-ID": last_id}
        ) as r:
            resumed = await take(r, 4)
        assert [e["data"]["data"]["n"] for e in resumed] == [3, 4, 5, 6]
        ids = [int(e["id"]) for e in got + resumed]
        assert ids == sorted(ids) and len(set(ids)) == 7


async def test_resume_point_that_left_the_ring_gets_a_gap_event(tmp_path: Path) -> None:
    async with running_server(make_config(tmp_path, event_ring_size=5)) as (server, client):
        for i in range(20):
            server.relay.publish("system", {"kind": "test", "n": i})
        async with client.stream("GET", "/v1/events/stream?last_event_id=3") as r:
            first = await take(r, 1)
        assert first[0]["event"] == "gap"
        assert first[0]["data"]["missed"] > 0
        page = (await client.get("/v1/events?after=3&limit=2")).json()
        assert page["gap"] > 0 and len(page["events"]) == 2


async def test_paged_list_is_contiguous_and_bounded(tmp_path: Path) -> None:
    async with running_server(make_config(tmp_path)) as (server, client):
        for i in range(250):
            server.relay.publish("acks", {"n": i})
        seen: list[int] = []
        after = 0
        while True:
            page = (await client.get(f"/v1/events?after={after}&limit=100&topic=acks")).json()
            assert len(page["events"]) <= 100
            if not page["events"]:
                break
            seen += [e["data"]["n"] for e in page["events"]]
            after = page["next_after"]
        assert seen == list(range(250))
        assert (await client.get("/v1/events?limit=1001")).status_code == 422


async def test_slow_reader_is_dropped_while_a_fast_reader_gets_everything(tmp_path: Path) -> None:
    config = make_config(tmp_path, subscriber_buffer=200, write_timeout=1.0)
    async with running_server(config) as (server, client):
        relay = server.relay
        host, port = server.urls[0].removeprefix("http://").split(":")
        slow = await trio.open_tcp_stream(host, int(port))
        # Tiny receive buffer and never read: the server's writes back up.
        await slow.send_all(b"GET /v1/events/stream?topic=system HTTP/1.1\r\nHost: x\r\n\r\n")
        async with client.stream("GET", "/v1/events/stream?topic=system") as fast:
            await eventually(lambda: relay.hub.subscriber_count() == 2, within=5)
            blob = "x" * 4000
            received: list[int] = []

            async def read_fast() -> None:
                async with aclosing(sse_events(fast)) as events:
                    async for event in events:
                        assert event.get("event") != "overflow", "the fast reader fell behind"
                        if event.get("event") == "system":
                            received.append(event["data"]["data"]["n"])
                            if len(received) == 3000:
                                return

            async with trio.open_nursery() as nursery:
                nursery.start_soon(read_fast)
                for i in range(3000):
                    relay.publish("system", {"kind": "load", "n": i, "blob": blob})
                    if i % 20 == 0:
                        # Paced so an in-process reader keeps up; the slow one never reads.
                        await trio.sleep(0.01)
            assert received == list(range(3000))
            assert relay.hub.overflowed >= 1
            await eventually(lambda: relay.hub.subscriber_count() == 1, within=5)
        # Its write blocked on a full socket: the watchdog cuts the connection.
        await eventually(lambda: server.watchdog.closed >= 1, within=5)
        with trio.fail_after(5):
            try:
                while await slow.receive_some(1 << 20):
                    pass
            except trio.BrokenResourceError:
                pass  # a reset is as good as EOF: the server side is gone
        await slow.aclose()


async def test_subscriber_caps_answer_503_and_disconnects_free_the_slot(tmp_path: Path) -> None:
    config = make_config(tmp_path, max_subscribers=2, heartbeat_interval=0.2)
    async with running_server(config) as (server, client):
        async with (
            client.stream("GET", "/v1/events/stream") as a,
            client.stream("GET", "/v1/events/stream") as b,
        ):
            assert a.status_code == b.status_code == 200
            third = await client.get("/v1/events/stream")
            assert third.status_code == 503
            assert third.headers["content-type"] == "application/problem+json"
            assert "retry-after" in third.headers
        # Both clients went away: gone from the count within one heartbeat.
        await eventually(lambda: server.relay.hub.subscriber_count() == 0, within=1.0)
        async with client.stream("GET", "/v1/events/stream") as again:
            assert again.status_code == 200
