"""The five benchmark scenarios. Each returns a JSON-ready dict with relay-trio's figure,
its baselines measured in the same run, and the ratios.

Servers and load generators run as separate processes (``benchmarks.servers`` and
``benchmarks.clients``); the limiter and UMH scenarios are pure CPU and run in-process.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import tempfile
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from ._common import Child, percentile

HERE = Path(__file__).resolve().parent
MIB = 1024 * 1024

#: Relay settings for throughput runs: every report is for a fresh resource, so the
#: per-resource limiter admits; the table is large enough to never evict during a run.
INGEST_CONFIG: dict[str, Any] = {
    "rate_per_minute": 1_000_000.0,
    "burst": 10,
    "max_resources": 2_000_000,
}


def ratio(a: float, b: float) -> float:
    return round(a / b, 3) if b else float("nan")


#: The code before the durable store and the architecture split (the last landed commit of
#: the previous session): the "before" rows run it from a git worktree in the same run.
BASELINE_COMMIT = "35ebfe8"


def baseline_tree(log: Callable[[str], None]) -> Path | None:
    """A checkout of :data:`BASELINE_COMMIT` (made once with ``git worktree``), or None."""
    tree = Path(tempfile.gettempdir()) / f"relay-trio-baseline-{BASELINE_COMMIT}"
    if not (tree / "relay_trio").exists():
        git = ["git", "-C", str(HERE.parent), "worktree", "add", "--detach", "-f"]
        made = subprocess.run(
            [*git, str(tree), BASELINE_COMMIT],
            capture_output=True,
            text=True,
            check=False,
        )
        if made.returncode != 0:
            log(f"  no baseline checkout: {made.stderr.strip()}")
            return None
    return tree


@contextmanager
def server(kind: str, **args: Any) -> Iterator[tuple[Child, dict[str, Any]]]:
    """A benchmark server child; ``cwd`` (a checkout) runs another version of the code."""
    cwd = args.pop("cwd", None)
    child = Child("benchmarks.servers", {"kind": kind, **args}, cwd=cwd)
    try:
        info = child.wait_ready(120)
        yield child, info
    finally:
        child.stop()


def client(kind: str, timeout: float, **args: Any) -> dict[str, Any]:
    child = Child("benchmarks.clients", {"kind": kind, **args})
    try:
        return child.result(timeout)
    finally:
        child.stop()


# -- 1. ingest -------------------------------------------------------------------------


def store_stats(url: str) -> dict[str, Any]:
    """The relay's store figures after a run: commits and the mean change sets per commit."""
    import httpx

    store: dict[str, Any] = httpx.get(url + "/v1/status", timeout=10).json()["store"]
    commits = store.get("commits", 0)
    store["mean_group"] = round(store.get("committed_changes", 0) / commits, 1) if commits else 0
    return store


def ensure_wrk(log: Callable[[str], None]) -> str | None:
    """The wrk binary, installing the Debian package when missing and possible."""
    found = shutil.which("wrk")
    if found or os.environ.get("BENCH_NO_INSTALL"):
        return found
    if shutil.which("apt-get") and os.geteuid() == 0:
        log("wrk missing: apt-get install -y wrk")
        subprocess.run(
            ["apt-get", "install", "-y", "wrk"],
            capture_output=True,
            timeout=180,
            check=False,
            env={**os.environ, "DEBIAN_FRONTEND": "noninteractive"},
        )
    return shutil.which("wrk")


def post_throughput(
    url: str, wrk: str | None, conns: int, duration: float, tag: str
) -> dict[str, Any]:
    """Closed-loop single-report POSTs at ``conns`` connections: req/s, p50/p99."""
    if wrk is not None:
        warm = subprocess.run(
            [wrk, "-t1", f"-c{conns}", "-d1s", "-s", str(HERE / "wrk_post.lua"), url, tag + "w"],
            capture_output=True,
            text=True,
            timeout=60,
            check=False,
        )
        out = subprocess.run(
            [
                wrk,
                "-t1",
                f"-c{conns}",
                f"-d{duration:g}s",
                "--latency",
                "-s",
                str(HERE / "wrk_post.lua"),
                url,
                tag,
            ],
            capture_output=True,
            text=True,
            timeout=duration + 60,
            check=False,
        )
        line = next((x for x in out.stdout.splitlines() if x.startswith("WRKJSON ")), None)
        if line is None:
            raise RuntimeError(f"wrk failed: {out.stdout}{out.stderr}{warm.stderr}")
        w = json.loads(line[8:])
        errors = sum(w[k] for k in ("connect_errors", "read_errors", "write_errors", "timeouts"))
        return {
            "tool": "wrk",
            "conns": conns,
            "rps": round(w["requests"] / (w["duration_us"] / 1e6), 1),
            "p50_ms": w["p50_us"] / 1000,
            "p99_ms": w["p99_us"] / 1000,
            "non_2xx": w["status_errors"],
            "socket_errors": errors,
        }
    # Fallback: two client processes, conns/2 keep-alive connections each.
    procs = [
        Child(
            "benchmarks.clients",
            {
                "kind": "post",
                "url": url,
                "duration": duration,
                "conns": max(1, conns // 2),
                "warmup": 1.0,
                "tag": f"{tag}{i}-",
            },
        )
        for i in range(2)
    ]
    try:
        results = [p.result(duration + 60) for p in procs]
    finally:
        for p in procs:
            p.stop()
    lat = [x for r in results for x in r["latencies"]]
    statuses: dict[str, int] = {}
    for r in results:
        for k, v in r["statuses"].items():
            statuses[k] = statuses.get(k, 0) + v
    return {
        "tool": "python-trio (2 processes)",
        "conns": conns,
        "rps": round(sum(r["rps"] for r in results), 1),
        "p50_ms": round(percentile(lat, 50) * 1000, 3),
        "p99_ms": round(percentile(lat, 99) * 1000, 3),
        "non_2xx": sum(v for k, v in statuses.items() if not k.startswith("2")),
        "socket_errors": 0,
    }


def ingest(quick: bool, log: Callable[[str], None]) -> dict[str, Any]:
    duration = 3.0 if quick else 10.0
    conns = 32
    wrk = ensure_wrk(log)
    posts: dict[str, Any] = {}
    before = baseline_tree(log)
    targets: list[tuple[str, str, dict[str, Any]]] = [
        ("relay-trio", "relay", {"config": INGEST_CONFIG}),
        ("relay-trio (store=memory)", "relay", {"config": {**INGEST_CONFIG, "store": "memory"}}),
        ("quart-trio (bare)", "quart", {}),
        ("starlette+uvicorn (bare)", "starlette", {}),
    ]
    if before is not None:
        targets.append(
            (
                f"relay-trio before ({BASELINE_COMMIT})",
                "relay",
                {"config": INGEST_CONFIG, "cwd": before},
            )
        )
    # This machine is shared and single runs swing by +-25%: in full mode every server
    # (the starlette baseline too: it is the denominator of the bulk targets) runs three
    # times, interleaved, and each keeps its median run.
    rounds = 1 if quick else 3
    samples: dict[str, list[dict[str, Any]]] = {name: [] for name, _, _ in targets}
    for _round in range(rounds):
        for name, kind, extra in targets:
            with server(kind, **extra) as (_, info):
                run = post_throughput(info["url"], wrk, conns, duration, "r")
                if "loop" in info:
                    run["server"] = f"uvicorn loop={info['loop']} http={info['http']}"
            samples[name].append(run)
            log(f"  POST {name}: {run['rps']:.0f} req/s p99 {run['p99_ms']:.1f} ms")
    for name, runs_of in samples.items():
        ordered = sorted(runs_of, key=lambda r: r["rps"])
        posts[name] = {**ordered[len(ordered) // 2], "runs_rps": [r["rps"] for r in runs_of]}
    bulk: dict[str, Any] = {}
    # Same run, three stores: the default (sqlite, store_sync=normal), sqlite with
    # store_sync=full (an fsync per group commit) and memory (no durability).
    stores: list[tuple[str, dict[str, Any]]] = [
        ("sqlite", {"store": "sqlite", "store_sync": "normal"}),
        ("sqlite full", {"store": "sqlite", "store_sync": "full"}),
        ("memory", {"store": "memory"}),
    ]
    runs: list[tuple[str, str, dict[str, Any]]] = [
        ("batch (500/request, 2 conns)", "batch", {"conns": 2, "batch": 500}),
        ("stream (8 conns)", "stream", {"conns": 8, "window": 250}),
    ]
    variants: list[tuple[str, dict[str, Any], Path | None]] = [
        (name, config, None) for name, config in stores
    ]
    if before is not None:
        variants.append((f"before ({BASELINE_COMMIT}, in memory)", {}, before))
    # Bulk runs swing as much as single POSTs: in full mode each row also runs three
    # times, interleaved with the others, and keeps its median run.
    bulk_runs: dict[str, list[dict[str, Any]]] = {}
    for _round in range(rounds):
        for store_name, store_config, cwd in variants:
            stream_config = {
                **INGEST_CONFIG,
                **store_config,
                "stream_listen": ["tcp://127.0.0.1:0"],
            }
            for name, kind, extra in runs:
                label = f"{name}, {store_name}"
                with server("relay", cwd=cwd, config=stream_config) as (_, info):
                    url = info["stream"][0] if kind == "stream" else info["url"]
                    run = client(
                        kind, duration + 60, url=url, duration=duration, warmup=1.0, **extra
                    )
                    run["store"] = store_stats(info["url"]) if cwd is None else {}
                bulk_runs.setdefault(label, []).append(run)
                log(
                    f"  {label}: {run['reports_per_s']:.0f} reports/s, "
                    f"round trip p99 {run['round_trip_p99_ms']:.1f} ms, "
                    f"mean commit group {run['store'].get('mean_group', 0):.0f}"
                )
    for label, of_label in bulk_runs.items():
        ordered = sorted(of_label, key=lambda r: r["reports_per_s"])
        bulk[label] = {
            **ordered[len(ordered) // 2],
            "runs_reports_per_s": [round(r["reports_per_s"]) for r in of_label],
        }
    ceiling = posts["quart-trio (bare)"]["rps"]
    uvicorn = posts["starlette+uvicorn (bare)"]["rps"]
    relay = posts["relay-trio"]["rps"]
    memory_post = posts["relay-trio (store=memory)"]["rps"]
    before_name = f"relay-trio before ({BASELINE_COMMIT})"
    vs_before: dict[str, float] = {}
    if before_name in posts:
        old = posts[before_name]["rps"]
        vs_before["POST, sqlite"] = ratio(relay, old)
        vs_before["POST, memory"] = ratio(memory_post, old)
        for name, _, _ in runs:
            old_bulk = bulk.get(f"{name}, before ({BASELINE_COMMIT}, in memory)")
            if old_bulk:
                for store_name, _ in stores:
                    new = bulk[f"{name}, {store_name}"]["reports_per_s"]
                    vs_before[f"{name}, {store_name}"] = ratio(new, old_bulk["reports_per_s"])
    return {
        "duration_s": duration,
        "post": posts,
        "bulk": bulk,
        "post_sqlite_vs_memory": ratio(relay, memory_post),
        "vs_before": vs_before,
        "relay_vs_quart_ceiling": ratio(relay, ceiling),
        "relay_vs_uvicorn": ratio(relay, uvicorn),
        "bulk_vs_uvicorn": {k: ratio(v["reports_per_s"], uvicorn) for k, v in bulk.items()},
    }


# -- 2. lock contention ----------------------------------------------------------------


def contention(quick: bool, log: Callable[[str], None]) -> dict[str, Any]:
    duration = 4.0 if quick else 15.0
    pullers = 64
    interval = float(
        os.environ.get("BENCH_PULL_INTERVAL", "1.0")
    )  # seconds between pulls, per puller
    probe = {"duration": duration, "conns": 4, "rate": 200}
    config = {
        **INGEST_CONFIG,
        "event_ring_bytes": 64 * MIB,
        "event_ring_size": 10_000_000,
    }
    out: dict[str, Any] = {
        "duration_s": duration,
        "pullers": pullers,
        "pull_interval_s": interval,
        "probe_rate": probe["rate"],
    }
    runs = [
        ("idle (no pullers)", {}, 0),
        ("relay-trio + 64 pullers", {}, pullers),
        ("naive whole-log copy + 64 pullers", {"naive_pages": True}, pullers),
    ]
    for name, extra, n in runs:
        with server("relay", config=config, fill_bytes=64 * MIB, **extra) as (_, info):
            puller: Child | None = None
            if n:
                puller = Child(
                    "benchmarks.clients",
                    {
                        "kind": "pull",
                        "url": info["url"],
                        "duration": duration + 2.0,
                        "pullers": n,
                        "interval": interval,
                        "last_id": info["events"],
                    },
                )
                time.sleep(1.0)
            try:
                result = client("probe", duration + 60, url=info["url"], **probe)
                if puller is not None:
                    result.update(puller.result(duration + 60))
            finally:
                if puller is not None:
                    puller.stop()
            result["events_in_log"] = info["events"]
            result["log_mib"] = round(info["event_bytes"] / MIB, 1)
        out[name] = result
        log(f"  {name}: POST p50 {result['p50_ms']:.2f} ms p99 {result['p99_ms']:.2f} ms")
    idle = out["idle (no pullers)"]["p99_ms"]
    out["p99_vs_idle"] = {k: ratio(out[k]["p99_ms"], idle) for k, _, n in runs if n}
    return out


# -- 3. SSE fan-out --------------------------------------------------------------------


def fanout(quick: bool, log: Callable[[str], None]) -> dict[str, Any]:
    subscribers = 1000
    rate = 100
    duration = 4.0 if quick else 15.0
    grace = 1.0
    spec = {"rate": rate, "duration": duration, "expect": subscribers, "grace": grace}
    relay_config = {"max_subscribers": subscribers + 100, "heartbeat_interval": 15.0}
    out: dict[str, Any] = {
        "subscribers": subscribers,
        "rate": rate,
        "duration_s": duration,
        "grace_s": grace,
    }
    runs: list[tuple[str, str, dict[str, Any], str]] = [
        (
            "relay-trio (coalesced)",
            "relay",
            {"config": relay_config},
            "/v1/events/stream?topic=system",
        ),
        (
            "relay-trio, one event per write",
            "relay",
            {"config": relay_config, "per_event_hub": True},
            "/v1/events/stream?topic=system",
        ),
        ("sse-starlette on uvicorn", "sse_starlette", {}, "/v1/events/stream"),
    ]
    for name, kind, extra, path in runs:
        with server(kind, sse=spec, **extra) as (srv, info):
            got = client(
                "sse",
                duration + 120,
                url=info["url"],
                path=path,
                subscribers=subscribers,
                rate=rate,
                duration=duration,
                grace=grace,
            )
            got["server"] = srv.result(60)
        out[name] = got
        log(
            f"  {name}: {got['delivered_pct']}% delivered, p50 {got['p50_ms']} ms, "
            f"p99 {got['p99_ms']} ms, CPU {got['server']['cpu_percent']}% "
            f"(client {got['client_cpu_percent']}%)"
        )
    base = out["sse-starlette on uvicorn"]
    relay = out["relay-trio (coalesced)"]
    out["p99_vs_sse_starlette"] = ratio(relay["p99_ms"], base["p99_ms"])
    return out


# -- 4. limiter ------------------------------------------------------------------------


def limiter(quick: bool, log: Callable[[str], None]) -> dict[str, Any]:
    import limits
    from limits.storage import MemoryStorage
    from limits.strategies import (
        FixedWindowRateLimiter,
        MovingWindowRateLimiter,
        SlidingWindowCounterRateLimiter,
    )

    from relay_trio.core.limiter import LeakyBucket
    from relay_trio.core.resources import ResourceTable

    resources = 100_000
    rounds = 1 if quick else 10
    ids = [f"vm-{i:06d}" for i in range(resources)]
    decisions = resources * rounds
    out: dict[str, Any] = {"resources": resources, "decisions": decisions}

    def relay_core() -> int:
        bucket = LeakyBucket.per_minute(60.0, 5)
        table = ResourceTable(resources * 2)
        clock = time.monotonic
        admitted = 0
        for _ in range(rounds):
            for rid in ids:
                now = clock()
                state = table.touch(rid, now)
                ok, level, _ = bucket.offer(state.level, state.last, now)
                if ok:
                    state.level, state.last = level, now
                    admitted += 1
        return admitted

    def limits_run(strategy: Any) -> Callable[[], int]:
        def go() -> int:
            lim = strategy(MemoryStorage())
            item = limits.RateLimitItemPerMinute(60)
            admitted = 0
            for _ in range(rounds):
                for rid in ids:
                    if lim.hit(item, rid):
                        admitted += 1
            return admitted

        return go

    runs: list[tuple[str, Callable[[], int]]] = [
        ("relay-trio LeakyBucket + ResourceTable", relay_core),
        ("limits moving window", limits_run(MovingWindowRateLimiter)),
        ("limits fixed window", limits_run(FixedWindowRateLimiter)),
        ("limits sliding window counter", limits_run(SlidingWindowCounterRateLimiter)),
    ]
    for name, fn in runs:
        t = time.perf_counter()
        admitted = fn()
        wall = time.perf_counter() - t
        out[name] = {
            "decisions_per_s": round(decisions / wall),
            "admitted": admitted,
            "seconds": round(wall, 3),
        }
        log(f"  {name}: {decisions / wall:,.0f} decisions/s")
    out["full_admit"] = _admit_path(ids, rounds)
    log(f"  Relay.admit (full path): {out['full_admit']['decisions_per_s']:,} decisions/s")
    relay = out[runs[0][0]]["decisions_per_s"]
    out["relay_vs"] = {name: ratio(relay, out[name]["decisions_per_s"]) for name, _ in runs[1:]}
    return out


def _admit_path(ids: list[str], rounds: int) -> dict[str, Any]:
    """``Relay.admit`` (validation, limiter, table, UMH, event) under ``trio.run``.

    The send channel is sized to hold every admitted message and no sender drains it,
    so only admission is timed.
    """
    import tempfile

    import trio

    from relay_trio.core.config import load_config
    from relay_trio.relay import Relay

    decisions = len(ids) * rounds
    with tempfile.TemporaryDirectory() as tmp:
        config = load_config(
            {
                "data_dir": tmp,
                "rate_per_minute": 60.0,
                "burst": 5,
                "max_resources": len(ids) * 2,
                "send_queue_size": decisions + 1,
            },
            {},
            None,
        )
        relay = Relay(config)
        reports = [{"resource_id": rid, "payload": {"n": 1}} for rid in ids]

        async def main() -> float:
            t = time.perf_counter()
            admit = relay.admit
            for _ in range(rounds):
                for report in reports:
                    admit(report)
            return time.perf_counter() - t

        wall = trio.run(main)
    return {"decisions_per_s": round(decisions / wall), "seconds": round(wall, 3)}


# -- 5. UMH scale ----------------------------------------------------------------------


def umh(quick: bool, log: Callable[[str], None]) -> dict[str, Any]:
    n = 100_000 if quick else 1_000_000
    try:
        from . import umh_scale
    except ImportError as exc:
        log(f"  umh_scale not available: {exc}")
        return {"n": n, "skipped": f"benchmarks/umh_scale.py not available ({exc})"}
    result: dict[str, Any] = umh_scale.run(n)
    log(f"  UMH: {json.dumps(result)[:300]}")
    return {"n": n, **result}


SCENARIOS: dict[str, Callable[[bool, Callable[[str], None]], dict[str, Any]]] = {
    "ingest": ingest,
    "contention": contention,
    "fanout": fanout,
    "limiter": limiter,
    "umh": umh,
}
