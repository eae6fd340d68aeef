"""UMH at scale: cost per operation and bytes per pending message at N pending (default 1M).

    python -m benchmarks.umh_scale [--n N] [--json PATH] [--seed S]

Phases (each timed without tracemalloc):

* ``arm``: ``admit`` + ``sent`` for N new messages (N pending, N ACK deadlines armed);
* ``pop_timeout``: every ACK deadline expires; ``pop_due`` turns each into a failed attempt
  and arms a backoff retry (per expiry);
* ``pop_resend``: every retry expires; ``pop_due`` yields N ``resend`` items (per item);
* ``rearm``: ``sent`` again for all N;
* ``ack``: ACK all N (cancels deadlines; includes the amortised heap compaction).

Memory is measured in a separate pass with ``tracemalloc``: the bytes the UMH allocates for N
pending messages, ids created beforehand (the relay owns those strings anyway; their size is
reported separately), plus the extra bytes once each message has one failed attempt in its
history. RSS growth of the timed pass is reported too.

This is a measuring tool, not product code: it reads the wall clock (``perf_counter``).
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import platform
import random
import sys
import time
import tracemalloc
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from relay_trio.core.umh import RetryPolicy, UnconfirmedMessages

DEFAULT_N = 1_000_000
DEFAULT_JSON = Path(__file__).resolve().parent / "results" / "umh_scale.json"
#: Messages popped per pop_due call, like the scheduler's batch size.
BATCH = 1000


def _rss_bytes() -> int:
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except OSError:  # not Linux: RSS not reported
        return 0


def _ids(n: int) -> tuple[list[str], list[str]]:
    rids = [f"vm-{i:07d}" for i in range(n)]
    return [f"{r}:1" for r in rids], rids


def _pop_all(umh: UnconfirmedMessages, now: float) -> int:
    count = 0
    while True:
        due = umh.pop_due(now, limit=BATCH)
        count += len(due)
        nxt = umh.next_deadline()
        if nxt is None or nxt > now:
            return count


def measure_memory(n: int, seed: int = 1) -> dict[str, float]:
    """Bytes per pending entry (tracemalloc), and extra bytes after one failed attempt."""
    ids, rids = _ids(n)
    policy = RetryPolicy()
    gc.collect()
    tracemalloc.start()
    try:
        base = tracemalloc.get_traced_memory()[0]
        umh = UnconfirmedMessages(policy, random.Random(seed))
        for i in range(n):
            now = i * 1e-6  # a fresh float per call, as trio.current_time() gives
            umh.admit(ids[i], rids[i], now)
            umh.sent(ids[i], now)
        pending = tracemalloc.get_traced_memory()[0]
        assert umh.pending_count() == n
        # Every ACK deadline expires: one Attempt in each history, a retry armed for each.
        umh.pop_due(n * 1e-6 + policy.ack_timeout + 1.0)
        gc.collect()
        with_history = tracemalloc.get_traced_memory()[0]
    finally:
        tracemalloc.stop()
    id_bytes = sum(sys.getsizeof(s) for s in ids) + sum(sys.getsizeof(s) for s in rids)
    return {
        "bytes_per_pending": (pending - base) / n,
        "bytes_per_pending_with_1_attempt": (with_history - base) / n,
        "id_string_bytes_per_message": id_bytes / n,
    }


def measure_time(n: int, seed: int = 1) -> dict[str, float]:
    """Mean nanoseconds per operation for each phase, and RSS growth per pending message."""
    ids, rids = _ids(n)
    policy = RetryPolicy()
    umh = UnconfirmedMessages(policy, random.Random(seed))
    out: dict[str, float] = {}
    gc.collect()
    rss0 = _rss_bytes()

    t0 = time.perf_counter()
    for i in range(n):
        now = i * 1e-6
        umh.admit(ids[i], rids[i], now)
        umh.sent(ids[i], now)
    out["arm_ns"] = (time.perf_counter() - t0) / n * 1e9
    out["rss_bytes_per_pending"] = (_rss_bytes() - rss0) / n
    out["next_deadline"] = umh.next_deadline() or 0.0

    now = n * 1e-6 + policy.ack_timeout + 1.0
    t0 = time.perf_counter()
    popped = _pop_all(umh, now)
    out["pop_timeout_ns"] = (time.perf_counter() - t0) / n * 1e9
    assert popped == 0 and umh.ack_timeouts == n, (popped, umh.ack_timeouts)

    now += policy.retry_cap + 1.0
    t0 = time.perf_counter()
    popped = _pop_all(umh, now)
    out["pop_resend_ns"] = (time.perf_counter() - t0) / n * 1e9
    assert popped == n and umh.retries == n

    t0 = time.perf_counter()
    for mid in ids:
        umh.sent(mid, now)
    out["rearm_ns"] = (time.perf_counter() - t0) / n * 1e9

    t0 = time.perf_counter()
    for mid in ids:
        umh.ack(mid, now)
    out["ack_ns"] = (time.perf_counter() - t0) / n * 1e9
    assert umh.acked == n and umh.pending_count() == 0
    out["heap_after_acks"] = umh.heap_size()
    del out["next_deadline"]
    return out


def run(n: int = DEFAULT_N, seed: int = 1) -> dict[str, Any]:
    """Run both passes for ``n`` pending messages and return the results as a JSON-ready dict."""
    timing = measure_time(n, seed)
    gc.collect()
    memory = measure_memory(n, seed)
    return {
        "benchmark": "umh_scale",
        "n": n,
        "python": platform.python_version(),
        "platform": platform.platform(),
        "cpus": os.cpu_count(),
        **timing,
        **memory,
    }


def format_table(r: dict[str, Any]) -> str:
    rows = [
        ("admit+sent (arm)", f"{r['arm_ns'] / 1000:.2f} us/op"),
        ("pop_due ack timeout -> retry", f"{r['pop_timeout_ns'] / 1000:.2f} us/op"),
        ("pop_due resend", f"{r['pop_resend_ns'] / 1000:.2f} us/op"),
        ("sent (re-arm)", f"{r['rearm_ns'] / 1000:.2f} us/op"),
        ("ack", f"{r['ack_ns'] / 1000:.2f} us/op"),
        ("bytes / pending (tracemalloc)", f"{r['bytes_per_pending']:.0f} B"),
        ("  after 1 failed attempt", f"{r['bytes_per_pending_with_1_attempt']:.0f} B"),
        ("  id strings (caller-owned)", f"{r['id_string_bytes_per_message']:.0f} B"),
        ("RSS growth / pending", f"{r['rss_bytes_per_pending']:.0f} B"),
    ]
    width = max(len(k) for k, _ in rows)
    lines = [f"UMH scale, N={r['n']:,} pending (Python {r['python']}, {r['cpus']} CPUs)"]
    lines += [f"  {k:<{width}}  {v}" for k, v in rows]
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.umh_scale", description=__doc__)
    parser.add_argument("--n", type=int, default=DEFAULT_N, help="pending messages (1000000)")
    parser.add_argument("--json", type=Path, default=DEFAULT_JSON, help="where to write results")
    parser.add_argument("--seed", type=int, default=1)
    args = parser.parse_args(argv)
    if args.n < 1:
        parser.error("--n must be >= 1")
    result = run(args.n, args.seed)
    print(format_table(result))
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
