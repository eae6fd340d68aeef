"""Staged shutdown of a real relay process (``python -m relay_trio run``) under load.

Each test starts the relay as a subprocess configured by environment, puts it under steady
load with SSE subscribers connected, stops it (SIGTERM or ``POST /admin/shutdown``) and then
checks, from the outside only, that it exited 0 within ``shutdown_timeout``, that every
admitted report is either in the upstream or still pending in the store (``relay.db``, for
the next start), and that every subscriber saw the ``system`` events in order, ending with
``event: shutdown``.
"""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import sqlite3
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import attrs
import httpx
import orjson
import pytest
import trio
from fake_upstream import Behaviour, FakeUpstream, run_fake_upstream
from relay_helpers import relay_subprocess


@attrs.define(eq=False)
class RelayProcess:
    proc: trio.Process
    url: str
    data_dir: Path
    stderr: Path

    def kept(self) -> set[str]:
        """Message ids the store still holds as pending (read after the process exited)."""
        path = self.data_dir / "relay.db"
        if not path.exists():
            return set()
        with contextlib.closing(sqlite3.connect(path)) as conn:
            return {row[0] for row in conn.execute("SELECT message_id FROM messages")}

    def dead_letters(self) -> set[str]:
        """Message ids the store holds as dead letters."""
        if not (self.data_dir / "relay.db").exists():
            return set()
        with contextlib.closing(sqlite3.connect(self.data_dir / "relay.db")) as conn:
            return {row[0] for row in conn.execute("SELECT message_id FROM dead_letters")}

    def sink_ids(self) -> list[str]:
        path = self.data_dir / "upstream.jsonl"
        if not path.exists():
            return []
        return [orjson.loads(line)["message_id"] for line in path.read_bytes().splitlines()]

    def log(self) -> str:
        return self.stderr.read_text()


@asynccontextmanager
async def relay_process(tmp_path: Path, **settings: object) -> AsyncIterator[RelayProcess]:
    """The relay as a subprocess; ``settings`` become ``RELAY_TRIO_*`` variables."""
    data_dir = tmp_path / "data"
    env = {
        **os.environ,
        "RELAY_TRIO_PORT": "0",
        "RELAY_TRIO_DATA_DIR": str(data_dir),
        "RELAY_TRIO_RATE_PER_MINUTE": "60000",
        "RELAY_TRIO_BURST": "100",
        "RELAY_TRIO_HEARTBEAT_INTERVAL": "1",
        "RELAY_TRIO_FAILURES_TO_DOWN": "1000",
        # Short budgets need a short write deadline (config requires write < shutdown).
        "RELAY_TRIO_WRITE_TIMEOUT": "2",
    }
    env.update({f"RELAY_TRIO_{k.upper()}": str(v) for k, v in settings.items()})
    stderr = tmp_path / "stderr.log"
    async with relay_subprocess(env, stderr, cwd=tmp_path) as (proc, url):
        yield RelayProcess(proc, url, data_dir, stderr)


@attrs.define(eq=False)
class Subscriber:
    """One SSE client reading ``GET /v1/events/stream`` into (event, data) frames."""

    frames: list[tuple[str, dict[str, Any]]] = attrs.field(factory=list)
    ended: bool = False

    def system_kinds(self) -> list[str]:
        return [
            data["data"]["kind"]
            for event, data in self.frames
            if event in ("system", "shutdown")
            and data["data"]["kind"] in ("draining", "flush", "shutdown")
        ]

    async def run(self, url: str, *, task_status: trio.TaskStatus[None]) -> None:
        async with (
            httpx.AsyncClient(base_url=url, timeout=httpx.Timeout(5, read=30)) as client,
            client.stream("GET", "/v1/events/stream") as response,
        ):
            assert response.status_code == 200
            task_status.started()
            buffer = ""
            try:
                async for text in response.aiter_text():
                    buffer += text
                    while "\n\n" in buffer:
                        frame, buffer = buffer.split("\n\n", 1)
                        fields = dict(
                            line.split(": ", 1) for line in frame.splitlines() if ": " in line
                        )
                        if "event" in fields:
                            self.frames.append((fields["event"], orjson.loads(fields["data"])))
            except httpx.HTTPError:
                return
            self.ended = True


@attrs.define(eq=False)
class Load:
    """Posts reports for ever-new resources until the relay refuses (503) or goes away."""

    admitted: list[str] = attrs.field(factory=list)
    refused: int = 0
    stop: trio.Event = attrs.field(factory=trio.Event)

    async def run(self, url: str, prefix: str = "load") -> None:
        async with httpx.AsyncClient(base_url=url, timeout=5) as client:
            i = 0
            while not self.stop.is_set():
                i += 1
                try:
                    r = await client.post(
                        "/v1/reports", json={"resource_id": f"{prefix}-{i}", "payload": {"i": i}}
                    )
                except httpx.HTTPError:
                    return
                if r.status_code == 202:
                    self.admitted.append(r.json()["message_id"])
                else:
                    assert r.status_code == 503, r.text
                    assert r.headers["content-type"] == "application/problem+json"
                    self.refused += 1
                    return


async def wait_exit(relay: RelayProcess, within: float) -> tuple[int, float]:
    """The exit code and how long it took; fails the test if later than ``within``."""
    start = trio.current_time()
    with trio.fail_after(within):
        code = await relay.proc.wait()
    return code, trio.current_time() - start


def assert_accounted(
    admitted: list[str], delivered: set[str], relay: RelayProcess
) -> tuple[set[str], set[str]]:
    """Every admitted id is delivered or kept pending in the store for the next start (a
    durable store never dead-letters at shutdown); returns both sets."""
    assert not relay.dead_letters()
    kept = relay.kept()
    missing = [m for m in admitted if m not in delivered and m not in kept]
    assert not missing, (len(missing), missing[:5])
    return delivered & set(admitted), kept & set(admitted)


def acked_ids(up: FakeUpstream) -> set[str]:
    return {r.body["message_id"] for r in up.received if r.outcome == "ack"}


async def run_flush_mode(
    tmp_path: Path, mode: str
) -> tuple[Load, FakeUpstream, RelayProcess, list[Subscriber], set[str], set[str]]:
    """Steady load against an upstream that first accepts without ACK (and fails twice),
    three SSE subscribers, then SIGTERM with the upstream healthy again."""
    timeout = 8.0
    async with (
        run_fake_upstream(Behaviour(sync_ack=False, fail_first=2)) as up,
        relay_process(
            tmp_path,
            upstreams=up.url,
            shutdown_flush=mode,
            shutdown_timeout=timeout,
            send_timeout=2,
            ack_timeout=60,
            retry_base=60,
            retry_cap=60,
        ) as relay,
    ):
        subs = [Subscriber() for _ in range(3)]
        load = Load()
        async with trio.open_nursery() as nursery:
            for sub in subs:
                await nursery.start(sub.run, relay.url)
            nursery.start_soon(load.run, relay.url)
            with trio.fail_after(10):
                await up.wait_received(50)
            # Pending at shutdown: sent-but-unacked, plus two in retry backoff.
            up.behaviour = Behaviour(sync_ack=True)
            relay.proc.send_signal(signal.SIGTERM)
            code, took = await wait_exit(relay, timeout + 1)
            load.stop.set()
        assert code == 0, relay.log()[-3000:]
        assert took < timeout, took
        delivered, dead = assert_accounted(load.admitted, acked_ids(up), relay)
        for sub in subs:
            assert sub.ended and sub.frames[-1][0] == "shutdown", sub.frames[-3:]
        return load, up, relay, subs, delivered, dead
    raise AssertionError("unreachable")


@pytest.mark.parametrize("mode", ["sequential", "parallel"])
async def test_sigterm_flushes_pending_in_order(tmp_path: Path, mode: str) -> None:
    load, _up, relay, subs, delivered, dead = await run_flush_mode(tmp_path, mode)
    # Everything admitted reached the upstream and was acknowledged: nothing dead.
    assert len(load.admitted) >= 50
    assert delivered == set(load.admitted) and not dead
    for sub in subs:
        assert sub.system_kinds() == ["draining", "flush", "shutdown"], sub.system_kinds()
        flush = next(d["data"] for e, d in sub.frames if d["data"].get("kind") == "flush")
        assert flush["mode"] == mode and flush["messages"] >= 1
    assert "undelivered" not in relay.log()


async def test_sigterm_with_flush_none_keeps_pending_in_the_store(tmp_path: Path) -> None:
    load, _up, relay, subs, delivered, kept = await run_flush_mode(tmp_path, "none")
    # Sent-but-unacknowledged messages stay in the store for the next start.
    assert kept, "expected pending messages at shutdown"
    assert delivered | kept == set(load.admitted)
    for sub in subs:
        assert sub.system_kinds() == ["draining", "shutdown"], sub.system_kinds()
        assert not [d for e, d in sub.frames if e == "deadletter"]
    assert "kept in the sqlite store for the next start" in relay.log()


async def test_admin_shutdown_under_load_with_jsonl_sink(tmp_path: Path) -> None:
    token = "admin-Secret-0451"
    async with relay_process(
        tmp_path, admin_token=token, shutdown_timeout=8, send_timeout=2
    ) as relay:
        subs = [Subscriber() for _ in range(3)]
        load = Load()
        async with trio.open_nursery() as nursery:
            for sub in subs:
                await nursery.start(sub.run, relay.url)
            nursery.start_soon(load.run, relay.url)
            with trio.fail_after(10):
                while len(load.admitted) < 100:  # noqa: ASYNC110 - state in another task
                    await trio.sleep(0.01)
            async with httpx.AsyncClient(base_url=relay.url) as client:
                r = await client.post(
                    "/admin/shutdown", headers={"Authorization": f"Bearer {token}"}
                )
                assert r.status_code == 202
            code, took = await wait_exit(relay, 9)
            load.stop.set()
        assert code == 0 and took < 8
        delivered, _ = assert_accounted(load.admitted, set(relay.sink_ids()), relay)
        assert delivered == set(load.admitted)
        for sub in subs:
            assert sub.system_kinds() == ["draining", "flush", "shutdown"]
            assert sub.frames[-1][1]["data"]["reason"] == "admin"
        assert token not in relay.log()


async def test_sse_client_that_stops_reading_cannot_hold_shutdown(tmp_path: Path) -> None:
    timeout = 6.0
    async with relay_process(
        tmp_path,
        shutdown_timeout=timeout,
        send_timeout=2,
        write_timeout=2,
        subscriber_buffer=100_000,
        event_ring_size=100_000,
    ) as relay:
        host, port = relay.url.removeprefix("http://").split(":")
        stuck = socket.socket()
        stuck.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        stuck.setblocking(False)
        try:
            await trio.socket.from_stdlib_socket(stuck).connect((host, int(port)))
            stuck.send(b"GET /v1/events/stream HTTP/1.1\r\nHost: x\r\n\r\n")
            # A big backlog: 20k report events, never read by the stuck client.
            rid = "r" * 100
            async with httpx.AsyncClient(base_url=relay.url, timeout=10) as client:
                for batch in range(4):
                    lines = b"\n".join(
                        orjson.dumps({"resource_id": f"{rid}-{batch}-{i}", "payload": i})
                        for i in range(5000)
                    )
                    r = await client.post("/v1/reports:batch", content=lines)
                    assert r.status_code == 200
            relay.proc.send_signal(signal.SIGTERM)
            code, took = await wait_exit(relay, timeout + 1)
        finally:
            stuck.close()
    assert code == 0 and took < timeout, (code, took)
    assert len(relay.sink_ids()) == 20_000


async def test_second_sigterm_during_stalled_drain_exits_promptly(tmp_path: Path) -> None:
    async with (
        run_fake_upstream(Behaviour(stall=60)) as up,
        relay_process(tmp_path, upstreams=up.url, send_timeout=20, shutdown_timeout=60) as relay,
    ):
        async with httpx.AsyncClient(base_url=relay.url) as client:
            for i in range(5):
                r = await client.post("/v1/reports", json={"resource_id": f"s{i}", "payload": i})
                assert r.status_code == 202
        with trio.fail_after(5):
            await up.wait_received(5)
        relay.proc.send_signal(signal.SIGTERM)
        await trio.sleep(0.5)
        assert relay.proc.returncode is None  # stalled in the drain
        relay.proc.send_signal(signal.SIGTERM)
        code, took = await wait_exit(relay, 5)
        assert code == 0 and took < 3, (code, took)
        # Even a hard stop keeps what it could not deliver for the next start.
        assert relay.kept() == {f"s{i}:1" for i in range(5)}, relay.log()[-2000:]
        assert "second signal" in relay.log()
