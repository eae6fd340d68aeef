"""`relay-trio send` and `relay-trio tail` against a real relay."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

import orjson
import pytest
import trio
from relay_helpers import make_config, running_server

from relay_trio.client import SseEvent, describe, follow_events, send_reports


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


def reports(prefix: str, count: int) -> list[bytes]:
    return [
        orjson.dumps({"resource_id": f"{prefix}{i}", "payload": i}) + b"\n" for i in range(count)
    ]


@pytest.mark.parametrize(
    ("count", "batch_size"),
    [(500, None), (1000, None), (14, 7), (15, 7), (6, 7), (0, 7), (0, None)],
    ids=[
        "default-batch",
        "2x-default-batch",
        "2x-batch",
        "one-over",
        "under",
        "empty",
        "empty-default",
    ],
)
async def test_send_finishes_whatever_the_line_count(
    tmp_path: Path, count: int, batch_size: int | None
) -> None:
    """Finding 9: an input ending exactly at a batch boundary crashed after sending it all."""
    token = "ingest-s3cret"
    config = make_config(tmp_path, stream_listen=["tcp://127.0.0.1:0"], ingest_token=token)
    options: dict[str, Any] = {} if batch_size is None else {"batch_size": batch_size}
    async with running_server(config) as (server, _):
        assert server.receiver is not None
        (stream_url,) = server.receiver.bound
        with trio.fail_after(30):
            over_http = await send_reports(
                server.urls[0], reports("h", count), token=token, **options
            )
            # Over the stream, line numbers run on across batches after the handshake line.
            over_stream = await send_reports(
                stream_url, reports("s", count), token=token, **options
            )
        admitted = server.relay.metrics.value("relay_reports_admitted_total")
    for summary in (over_http, over_stream):
        assert (summary.read, summary.admitted, summary.retried) == (count, count, 0)
        assert not summary.rejected
    assert admitted == 2 * count


async def run_send_cli(source: Path, *args: str) -> tuple[int, str, str]:
    result = await trio.run_process(
        [sys.executable, "-m", "relay_trio", "send", str(source), *args],
        capture_stdout=True,
        capture_stderr=True,
        check=False,
    )
    return result.returncode, result.stdout.decode(), result.stderr.decode()


async def test_send_command_exits_cleanly_at_a_batch_multiple_and_on_an_empty_file(
    tmp_path: Path,
) -> None:
    exact = tmp_path / "exact.ndjson"
    exact.write_bytes(b"".join(reports("c", 14)))
    empty = tmp_path / "empty.ndjson"
    empty.write_bytes(b"")
    async with running_server(make_config(tmp_path)) as (server, _):
        url = server.urls[0]
        with trio.fail_after(60):
            exact_run = await run_send_cli(exact, "--url", url, "--batch-size", "7")
            empty_run = await run_send_cli(empty, "--url", url)
        admitted = server.relay.metrics.value("relay_reports_admitted_total")
    code, out, err = exact_run
    assert (code, out) == (0, "read 14, admitted 14, retried 0, rejected: none\n"), err
    assert "Traceback" not in err
    code, out, err = empty_run
    assert (code, out) == (0, "read 0 reports: nothing to send\n"), err
    assert "Traceback" not in err
    assert admitted == 14


def test_tail_lines_name_the_instance_that_produced_the_event() -> None:
    clustered = SseEvent(
        "reports", '{"id":7,"topic":"reports","instance":"relay-b","data":{}}', "7"
    )
    assert describe(clustered) == f"7 reports @relay-b {clustered.data}"
    single = SseEvent("reports", '{"id":7,"topic":"reports","data":{}}', "7")
    assert describe(single) == f"7 reports {single.data}"
    assert describe(SseEvent("gap", "not json")) == "- gap not json"
