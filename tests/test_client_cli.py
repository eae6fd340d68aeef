"""`relay-trio send` and `relay-trio tail` against a real relay."""

from __future__ import annotations

from pathlib import Path

import orjson
import trio
from relay_helpers import make_config, running_server

from relay_trio._client import SseEvent, follow_events, send_reports


async def test_send_over_http_batch_and_tcp_stream(tmp_path: Path) -> None:
    config = make_config(
        tmp_path, stream_listen=["tcp://127.0.0.1:0"], rate_per_minute=6000, burst=5
    )
    async with running_server(config) as (server, _):
        lines = [
            orjson.dumps({"resource_id": f"r{i % 50}", "payload": i}) + b"\n" for i in range(200)
        ]
        lines.append(b"not json\n")
        http_summary = await send_reports(server.urls[0], lines[:100])
        assert (http_summary.read, http_summary.admitted) == (100, 100)
        assert server.receiver is not None
        (stream_url,) = server.receiver.bound
        stream_summary = await send_reports(stream_url, lines[100:])
        assert stream_summary.read == 101 and stream_summary.admitted == 100
        assert dict(stream_summary.rejected) == {"malformed-json": 1}


async def test_send_honours_retry_after(tmp_path: Path) -> None:
    # 60/min with burst 1: the second report for a resource waits ~1 s, then is admitted.
    config = make_config(tmp_path, rate_per_minute=60, burst=1)
    async with running_server(config) as (server, _):
        lines = [orjson.dumps({"resource_id": "same", "payload": i}) for i in range(2)]
        start = trio.current_time()
        summary = await send_reports(server.urls[0], lines)
        assert summary.admitted == 2 and summary.retried == 1
        assert trio.current_time() - start >= 0.9


async def test_tail_resumes_after_being_dropped_without_losing_events(tmp_path: Path) -> None:
    # A 5-event buffer: a burst of 50 overflows the tail's subscription; it reconnects with
    # Last-Event-ID and the ring replays exactly what it missed.
    async with running_server(make_config(tmp_path, subscriber_buffer=5)) as (server, _):
        relay = server.relay
        seen: list[SseEvent] = []
        first = trio.Event()

        def on_event(event: SseEvent) -> bool:
            seen.append(event)
            first.set()
            return sum(e.event == "acks" for e in seen) == 51

        with trio.fail_after(15):
            async with trio.open_nursery() as nursery:
                nursery.start_soon(lambda: follow_events(server.urls[0], on_event, topic="acks"))
                while relay.hub.subscriber_count() == 0:  # noqa: ASYNC110 - test setup
                    await trio.sleep(0.01)
                relay.publish("acks", {"n": 0})
                await first.wait()
                for n in range(1, 51):
                    relay.publish("acks", {"n": n})
        acks = [orjson.loads(e.data)["data"]["n"] for e in seen if e.event == "acks"]
        assert acks == list(range(51))
        assert any(e.event == "overflow" for e in seen)
