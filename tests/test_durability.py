"""A 2xx survives a crash: subprocess relays on the default SQLite store, killed with -9 and
restarted, deliver everything they acknowledged, with the original message ids.

Real processes, real sockets, real files; the fake upstream (tests/fake_upstream.py) lives in
the test process and stays up across the relay's restarts.
"""

from __future__ import annotations

import itertools
import os
import signal
import socket
import sys
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path

import attrs
import httpx
import orjson
import pytest
import trio
from fake_upstream import Behaviour, FakeUpstream, run_fake_upstream
from relay_helpers import relay_subprocess

_runs = itertools.count()


@attrs.define
class RelayProcess:
    proc: trio.Process
    url: str
    stderr: Path


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


@asynccontextmanager
async def relay_process(tmp: Path, upstream: str, **settings: str) -> AsyncIterator[RelayProcess]:
    """``relay-trio run`` in a child process on the data dir ``tmp/data``; killed on exit."""
    env = {
        **os.environ,
        "RELAY_TRIO_PORT": "0",
        "RELAY_TRIO_DATA_DIR": str(tmp / "data"),
        "RELAY_TRIO_UPSTREAMS": upstream,
        "RELAY_TRIO_RATE_PER_MINUTE": "600000",
        "RELAY_TRIO_BURST": "1000",
        "RELAY_TRIO_RETRY_BASE": "0.5",
        "RELAY_TRIO_RETRY_CAP": "1",
        "RELAY_TRIO_SEND_TIMEOUT": "2",
        "RELAY_TRIO_FAILURES_TO_DOWN": "1000000",
        **{f"RELAY_TRIO_{k.upper()}": v for k, v in settings.items()},
    }
    stderr = tmp / f"stderr-{next(_runs)}.log"
    async with relay_subprocess(env, stderr, cwd=tmp) as (proc, url):
        yield RelayProcess(proc, url, stderr)


async def _kill9(relay: RelayProcess) -> None:
    relay.proc.send_signal(signal.SIGKILL)
    with trio.fail_after(10):
        await relay.proc.wait()


async def _admit_all_doors(client: httpx.AsyncClient, stream_port: int, n: int) -> list[str]:
    """``n`` reports through each door (single POST, batch, stream); all must be 2xx."""
    ids: list[str] = []
    for i in range(n):
        r = await client.post("/v1/reports", json={"resource_id": f"single-{i}", "payload": i})
        assert r.status_code == 202, r.text
        ids.append(r.json()["message_id"])
    body = b"".join(
        orjson.dumps({"resource_id": f"batch-{i}", "payload": {"n": i}}) + b"\n" for i in range(n)
    )
    r = await client.post("/v1/reports:batch", content=body)
    assert r.status_code == 200
    for line in r.text.splitlines():
        ids.append(orjson.loads(line)["message_id"])
    stream = await trio.open_tcp_stream("127.0.0.1", stream_port)
    async with stream:
        await stream.send_all(
            b"".join(
                orjson.dumps({"resource_id": f"stream-{i}", "payload": [i]}) + b"\n"
                for i in range(n)
            )
        )
        replies = b""
        with trio.fail_after(10):
            while replies.count(b"\n") < n:
                replies += await stream.receive_some(65536)
    for reply in replies.splitlines():
        ids.append(orjson.loads(reply)["message_id"])
    assert len(ids) == 3 * n
    return ids


def _delivered_ok(up: FakeUpstream) -> dict[str, object]:
    """message id -> payload of every POST the upstream answered with a 2xx."""
    return {
        r.body["message_id"]: r.body["payload"]
        for r in up.received
        if r.outcome in ("ack", "accepted")
    }


@pytest.mark.slow
async def test_kill9_after_2xx_loses_nothing_and_ids_continue(tmp_path: Path) -> None:
    n = 20
    async with run_fake_upstream() as up:
        up.behaviour = Behaviour(fail_all=True)
        stream_port = _free_port()
        listen = f"tcp://127.0.0.1:{stream_port}"
        async with relay_process(tmp_path, up.url, stream_listen=listen) as relay:
            async with httpx.AsyncClient(base_url=relay.url, timeout=10) as client:
                admitted = await _admit_all_doors(client, stream_port, n)
            await _kill9(relay)
        assert not _delivered_ok(up)

        up.behaviour = Behaviour(sync_ack=False)  # 202: the ACK comes later, by POST /v1/acks
        async with relay_process(tmp_path, up.url, stream_listen=listen) as relay:
            with trio.fail_after(30):
                await up.wait_until(lambda u: set(admitted) <= set(_delivered_ok(u)))
            delivered = _delivered_ok(up)
            # Original ids with their original payloads.
            assert delivered["single-3:1"] == 3
            assert delivered["batch-4:1"] == {"n": 4}
            assert delivered["stream-5:1"] == [5]
            async with httpx.AsyncClient(base_url=relay.url, timeout=10) as client:
                # A new report for a pre-restart resource never reuses an id.
                r = await client.post(
                    "/v1/reports", json={"resource_id": "single-0", "payload": "new"}
                )
                assert r.status_code == 202
                assert r.json()["message_id"] == "single-0:2"
                # An ACK for a message admitted before the restart clears it.
                r = await client.post(
                    "/v1/acks", json={"message_id": "single-1:1", "status": "ack"}
                )
                assert r.json()["outcome"] == "acked"
                view = (await client.get("/v1/resources/single-1")).json()
                assert view["pending"] is None
            await _kill9(relay)

        # The ACK and the new report survived the second crash too.
        async with (
            relay_process(tmp_path, up.url, stream_listen=listen) as relay,
            httpx.AsyncClient(base_url=relay.url, timeout=10) as client,
        ):
            assert (await client.get("/v1/resources/single-1")).json()["pending"] is None
            pending = (await client.get("/v1/resources/single-0")).json()["pending"]
            assert pending["message_id"] == "single-0:2"


@pytest.mark.slow
@pytest.mark.parametrize("flush", ["sequential", "parallel", "none"])
async def test_sigterm_keeps_undelivered_for_the_next_start(tmp_path: Path, flush: str) -> None:
    async with run_fake_upstream() as up:
        up.behaviour = Behaviour(fail_all=True)
        settings = {"shutdown_flush": flush, "shutdown_timeout": "8", "write_timeout": "2"}
        async with relay_process(tmp_path, up.url, **settings) as relay:
            async with httpx.AsyncClient(base_url=relay.url, timeout=10) as client:
                ids = []
                for i in range(5):
                    r = await client.post(
                        "/v1/reports", json={"resource_id": f"r{i}", "payload": i}
                    )
                    ids.append(r.json()["message_id"])
            relay.proc.send_signal(signal.SIGTERM)
            with trio.fail_after(20):
                assert await relay.proc.wait() == 0
        assert "dead-lettered" not in relay.stderr.read_text()
        up.behaviour = Behaviour()
        async with relay_process(tmp_path, up.url, **settings):
            with trio.fail_after(30):
                await up.wait_until(lambda u: set(ids) <= set(_delivered_ok(u)))


@pytest.mark.slow
async def test_sse_resume_after_restart_gets_gap_and_ids_continue(tmp_path: Path) -> None:
    async with run_fake_upstream() as up:
        async with relay_process(tmp_path, up.url) as relay:
            async with httpx.AsyncClient(base_url=relay.url, timeout=10) as client:
                for i in range(3):
                    await client.post("/v1/reports", json={"resource_id": f"e{i}", "payload": i})
                events = (await client.get("/v1/events")).json()["events"]
                last_id = events[-1]["id"]
            await _kill9(relay)
        async with (
            relay_process(tmp_path, up.url) as relay,
            httpx.AsyncClient(base_url=relay.url, timeout=10) as client,
        ):
            await client.post("/v1/reports", json={"resource_id": "after", "payload": 1})
            frames: list[str] = []
            with trio.fail_after(10):
                async with client.stream(
                    "GET", "/v1/events/stream", headers={"Last-Event-ID": str(last_id)}
                ) as response:
                    async for line in response.aiter_lines():
                        frames.append(line)
                        if line.startswith("id:") and len(frames) > 3:
                            break
        assert "event: gap" in frames
        ids = [int(f.removeprefix("id:").strip()) for f in frames if f.startswith("id:")]
        assert ids and min(ids) > last_id


@pytest.mark.parametrize(
    ("content", "expected"),
    [
        (b"this is not a database at all, just some bytes" * 100, "relay.db"),
        (None, "newer than this relay supports"),
    ],
)
async def test_bad_store_file_stops_start_with_exit_2_and_is_untouched(
    tmp_path: Path, content: bytes | None, expected: str
) -> None:
    data = tmp_path / "data"
    data.mkdir()
    db = data / "relay.db"
    if content is None:
        import sqlite3

        conn = sqlite3.connect(db)
        conn.execute("PRAGMA user_version = 99")
        conn.execute("CREATE TABLE future (x)")
        conn.commit()
        conn.close()
    else:
        db.write_bytes(content)
    before = (db.read_bytes(), db.stat().st_mtime_ns)
    env = {**os.environ, "RELAY_TRIO_PORT": "0", "RELAY_TRIO_DATA_DIR": str(data)}
    result = await trio.run_process(
        [sys.executable, "-m", "relay_trio", "run"],
        cwd=tmp_path,
        env=env,
        capture_stdout=True,
        capture_stderr=True,
        check=False,
    )
    assert result.returncode == 2
    err = result.stderr.decode().strip()
    assert len(err.splitlines()) == 1, err
    assert expected in err and "Traceback" not in err
    assert (db.read_bytes(), db.stat().st_mtime_ns) == before
    assert not (data / "relay.db-wal").exists() or content is None
