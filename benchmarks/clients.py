"""Load-generator processes: ``python -m benchmarks.clients '<json args>'``.

Each runs for a bounded time, then prints one ``RESULT {json}`` line. ``kind`` is one of
``post`` (closed-loop single POSTs, the fallback when wrk is missing), ``probe`` (paced
POSTs measuring latency), ``pull`` (paged ``GET /v1/events`` pullers), ``batch``
(``POST /v1/reports:batch``), ``stream`` (NDJSON over the stream receiver) and ``sse``
(many SSE subscribers on one epoll loop).
"""

from __future__ import annotations

import json
import os
import random
import re
import resource
import selectors
import socket
import sys
import time
from array import array
from typing import Any

import trio

from ._common import HttpConn, emit, percentile, raise_fd_limit, split_url

#: Pause after a window with rejections (503 overloaded): a paced agent, shorter than the
#: relay's 1 s Retry-After so the measurement stays responsive.
BACKOFF = 0.05

REPORT = b'{"resource_id":"%s","kind":"scan","payload":{"os":"linux","n":%d}}'


def _cpu() -> float:
    ru = resource.getrusage(resource.RUSAGE_SELF)
    return ru.ru_utime + ru.ru_stime


def _lat_summary(lat: list[float]) -> dict[str, float]:
    return {
        "p50_ms": round(percentile(lat, 50) * 1000, 3),
        "p99_ms": round(percentile(lat, 99) * 1000, 3),
        "max_ms": round(max(lat) * 1000, 3) if lat else float("nan"),
        "samples": len(lat),
    }


# -- closed-loop POSTs -----------------------------------------------------------------


async def post_load(args: dict[str, Any]) -> dict[str, Any]:
    host, port = split_url(args["url"])
    duration, conns, tag = args["duration"], args["conns"], args.get("tag", "p")
    lat: list[float] = []
    statuses: dict[int, int] = {}
    begin = trio.current_time() + args.get("warmup", 0.0)
    end = begin + duration

    async def worker(i: int) -> None:
        conn = await HttpConn.open(host, port)
        n = 0
        try:
            while trio.current_time() < end:
                n += 1
                body = REPORT % (f"{tag}{os.getpid()}-{i}-{n}".encode(), n)
                t = time.perf_counter()
                status, _ = await conn.request("POST", "/v1/reports", body)
                if t > begin_perf:
                    lat.append(time.perf_counter() - t)
                    statuses[status] = statuses.get(status, 0) + 1
        finally:
            await conn.aclose()

    begin_perf = time.perf_counter() + args.get("warmup", 0.0)
    async with trio.open_nursery() as nursery:
        for i in range(conns):
            nursery.start_soon(worker, i)
    wall = trio.current_time() - begin
    return {
        "requests": len(lat),
        "seconds": wall,
        "rps": len(lat) / wall,
        "statuses": statuses,
        "latencies": [round(x, 6) for x in lat],
    }


# -- paced POST latency probe ----------------------------------------------------------


async def probe(args: dict[str, Any]) -> dict[str, Any]:
    host, port = split_url(args["url"])
    duration, conns, rate = args["duration"], args["conns"], args["rate"]
    lat: list[float] = []
    statuses: dict[int, int] = {}
    t0 = trio.current_time() + 0.05
    total = round(rate * duration)

    async def worker(i: int) -> None:
        conn = await HttpConn.open(host, port)
        try:
            for k in range(i, total, conns):
                await trio.sleep_until(t0 + k / rate)
                body = REPORT % (f"probe{os.getpid()}-{k}".encode(), k)
                t = time.perf_counter()
                status, _ = await conn.request("POST", "/v1/reports", body)
                lat.append(time.perf_counter() - t)
                statuses[status] = statuses.get(status, 0) + 1
        finally:
            await conn.aclose()

    async with trio.open_nursery() as nursery:
        for i in range(conns):
            nursery.start_soon(worker, i)
    return {"statuses": statuses, **_lat_summary(lat)}


# -- event-log pullers -----------------------------------------------------------------

_NEXT_AFTER = re.compile(rb'"next_after":(\d+)')


async def pull(args: dict[str, Any]) -> dict[str, Any]:
    host, port = split_url(args["url"])
    duration, pullers, interval = args["duration"], args["pullers"], args["interval"]
    last_id, limit = args["last_id"], args.get("limit", 1000)
    rng = random.Random(42)
    lat: list[float] = []
    nbytes = [0]
    bad = [0]
    end = trio.current_time() + duration

    async def worker(i: int) -> None:
        conn = await HttpConn.open(host, port)
        after = rng.randrange(0, max(1, last_id - limit))
        next_at = trio.current_time() + rng.random() * max(interval, 0.001)
        try:
            while True:
                if interval:
                    now = trio.current_time()
                    # Fixed schedule; a late puller skips ahead instead of bursting.
                    while next_at < now:
                        next_at += interval
                    await trio.sleep_until(next_at)
                    next_at += interval
                if trio.current_time() >= end:
                    return
                t = time.perf_counter()
                status, body = await conn.request("GET", f"/v1/events?after={after}&limit={limit}")
                lat.append(time.perf_counter() - t)
                nbytes[0] += len(body)
                m = _NEXT_AFTER.search(body, max(0, len(body) - 80))
                if status != 200 or m is None:
                    bad[0] += 1
                    after = 0
                    continue
                after = int(m.group(1))
                if after >= last_id - limit:
                    after = 0
        finally:
            await conn.aclose()

    t0 = time.perf_counter()
    async with trio.open_nursery() as nursery:
        for i in range(pullers):
            nursery.start_soon(worker, i)
    wall = time.perf_counter() - t0
    return {
        "pulls": len(lat),
        "pulls_per_s": round(len(lat) / wall, 1),
        "mib_per_s": round(nbytes[0] / wall / 2**20, 2),
        "errors": bad[0],
        **{f"pull_{k}": v for k, v in _lat_summary(lat).items()},
    }


# -- batch and stream ingest -----------------------------------------------------------


def _lines(prefix: str, start: int, n: int) -> bytes:
    return b"".join(REPORT % (f"{prefix}{k}".encode(), k) + b"\n" for k in range(start, start + n))


async def batch(args: dict[str, Any]) -> dict[str, Any]:
    host, port = split_url(args["url"])
    duration, conns, size = args["duration"], args["conns"], args["batch"]
    warmup = args.get("warmup", 0.0)
    counts = {"ok": 0, "rejected": 0, "requests": 0}
    lat: list[float] = []
    begin = trio.current_time() + warmup
    end = begin + duration

    async def worker(i: int) -> None:
        conn = await HttpConn.open(host, port)
        n = 0
        try:
            while trio.current_time() < end:
                body = _lines(f"b{os.getpid()}-{i}-", n, size)
                n += size
                sent = trio.current_time()
                status, reply = await conn.request(
                    "POST", "/v1/reports:batch", body, "application/x-ndjson"
                )
                ok = reply.count(b'"message_id"') if status == 200 else 0
                if trio.current_time() > begin:
                    lat.append(trio.current_time() - sent)
                    counts["ok"] += ok
                    counts["rejected"] += size - ok
                    counts["requests"] += 1
                if ok < size:
                    await trio.sleep(BACKOFF)
        finally:
            await conn.aclose()

    async with trio.open_nursery() as nursery:
        for i in range(conns):
            nursery.start_soon(worker, i)
    wall = trio.current_time() - begin
    return {
        **counts,
        "seconds": wall,
        "reports_per_s": counts["ok"] / wall,
        **{f"round_trip_{k}": v for k, v in _lat_summary(lat).items()},
    }


async def stream(args: dict[str, Any]) -> dict[str, Any]:
    host, port = split_url(args["url"])
    duration, conns, window = args["duration"], args["conns"], args["window"]
    warmup = args.get("warmup", 0.0)
    counts = {"ok": 0, "rejected": 0}
    sample: list[bytes] = []
    lat: list[float] = []
    begin = trio.current_time() + warmup
    end = begin + duration

    async def worker(i: int) -> None:
        sock = await trio.open_tcp_stream(host, port)
        n = 0
        try:
            while trio.current_time() < end:
                sent = trio.current_time()
                await sock.send_all(_lines(f"s{os.getpid()}-{i}-", n, window))
                n += window
                got = 0
                buf = b""
                while got < window:
                    chunk = await sock.receive_some(1 << 20)
                    if not chunk:
                        raise ConnectionError("stream receiver closed the connection")
                    got += chunk.count(b"\n")
                    buf += chunk
                ok = buf.count(b'"message_id"')
                if ok < window and not sample:
                    sample.extend(x for x in buf.split(b"\n") if x and b"message_id" not in x)
                if trio.current_time() > begin:
                    lat.append(trio.current_time() - sent)
                    counts["ok"] += ok
                    counts["rejected"] += window - ok
                if ok < window:
                    await trio.sleep(BACKOFF)
        finally:
            await sock.aclose()

    async with trio.open_nursery() as nursery:
        for i in range(conns):
            nursery.start_soon(worker, i)
    wall = trio.current_time() - begin
    return {
        **counts,
        "seconds": wall,
        "reports_per_s": counts["ok"] / wall,
        **{f"round_trip_{k}": v for k, v in _lat_summary(lat).items()},
        "rejection_sample": sample[0].decode()[:300] if sample else None,
    }


# -- SSE subscribers -------------------------------------------------------------------

_EVENT = re.compile(rb'"seq":(\d+),"t":([0-9.e+-]+)')


def sse(args: dict[str, Any]) -> dict[str, Any]:
    """``n`` subscribers on one epoll loop; records every bench event's delivery delay.

    Stops at the planned end of the schedule plus ``grace`` (estimated from the first
    bench event seen), or after ``max_seconds``.
    """
    # Subscribers are spread round-robin over `urls` (cluster instances) when given.
    servers = [split_url(u) for u in args.get("urls") or [args["url"]]]
    n, path = args["subscribers"], args["path"]
    rate, duration, grace = args["rate"], args["duration"], args["grace"]
    planned = round(rate * duration)
    sel = selectors.DefaultSelector()
    bufs: dict[int, bytes] = {}
    seen: dict[int, int] = {}
    statuses: dict[str, int] = {}
    closed = [0]
    socks: list[socket.socket] = []
    connect_deadline = time.monotonic() + 60
    for i in range(n):
        host, port = servers[i % len(servers)]
        request = f"GET {path} HTTP/1.1\r\nHost: {host}:{port}\r\nAccept: text/event-stream\r\n\r\n"
        s = socket.create_connection(
            (host, port), timeout=max(1.0, connect_deadline - time.monotonic())
        )
        s.sendall(request.encode())
        s.setblocking(False)
        sel.register(s, selectors.EVENT_READ)
        bufs[s.fileno()] = b""
        seen[s.fileno()] = 0
        socks.append(s)
    lat = array("d")
    cpu0, wall0 = _cpu(), time.monotonic()
    header_pending = {s.fileno() for s in socks}
    deadline: float | None = None
    hard_stop = time.time() + args.get("max_seconds", duration + 90)
    # The client must stay cheap next to the server (they share the machine): one
    # recv_into a reused buffer per readable socket (recv(256 KiB) allocated a fresh
    # mmap-sized bytes object each time), rfind for the last complete frame instead of
    # iterating every separator, and one C-level findall per read.
    rbuf = bytearray(65536)
    view = memoryview(rbuf)
    while True:
        now = time.time()
        stop_at = hard_stop if deadline is None else min(deadline, hard_stop)
        if now >= stop_at:
            break
        for key, _ in sel.select(timeout=min(0.5, stop_at - now)):
            sock = key.fileobj
            assert isinstance(sock, socket.socket)
            s = sock
            fd = s.fileno()
            try:
                size = s.recv_into(rbuf)
            except BlockingIOError:
                continue
            except OSError:
                size = 0
            arrived = time.time()
            if not size:
                sel.unregister(s)
                closed[0] += 1
                continue
            buf = bufs[fd] + view[:size] if bufs[fd] else bytes(view[:size])
            if fd in header_pending:
                end = buf.find(b"\r\n\r\n")
                if end < 0:
                    bufs[fd] = buf
                    continue
                status = buf[9:12].decode()
                statuses[status] = statuses.get(status, 0) + 1
                header_pending.discard(fd)
                buf = buf[end + 4 :]
            # A frame ends with a blank line: "\n\n" (relay-trio) or "\r\n\r\n".
            cut = max(buf.rfind(b"\n\n") + 2, buf.rfind(b"\r\n\r\n") + 4)
            if cut < 2:
                bufs[fd] = buf
                continue
            done, bufs[fd] = buf[:cut], buf[cut:]
            found = _EVENT.findall(done)
            if not found:
                continue
            count = 0
            for seq_b, t_b in found:
                if int(seq_b) < planned:
                    count += 1
                    lat.append(arrived - float(t_b))
            if deadline is None and count:
                seq_b, t_b = found[0]
                deadline = float(t_b) - int(seq_b) / rate + duration + grace
            seen[fd] += count
    client_cpu = 100 * (_cpu() - cpu0) / (time.monotonic() - wall0)
    for s in socks:
        s.close()
    delivered = sum(seen.values())
    ordered = sorted(lat)
    return {
        "subscribers": n,
        "statuses": statuses,
        "closed_early": closed[0],
        "planned_per_subscriber": planned,
        "delivered": delivered,
        "delivered_pct": round(100 * delivered / (planned * n), 2) if planned and n else 0.0,
        "p50_ms": round(percentile(ordered, 50) * 1000, 1),
        "p99_ms": round(percentile(ordered, 99) * 1000, 1),
        "max_ms": round(ordered[-1] * 1000, 1) if ordered else float("nan"),
        "timed_out": deadline is None,
        "client_cpu_percent": round(client_cpu, 1),
    }


ASYNC_KINDS = {"post": post_load, "probe": probe, "pull": pull, "batch": batch, "stream": stream}


def main() -> None:
    args: dict[str, Any] = json.loads(sys.argv[1])
    raise_fd_limit()
    kind = args["kind"]
    result = sse(args) if kind == "sse" else trio.run(ASYNC_KINDS[kind], args)
    emit("RESULT", result)


if __name__ == "__main__":
    main()
