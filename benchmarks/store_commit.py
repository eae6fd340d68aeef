"""SQLite store commit cost: commits/s and µs per row for batch sizes 1, 100, 500, sync normal/full.

    python -m benchmarks.store_commit [--reports N] [--payload BYTES] [--json PATH]

Each "report" is one change set of two rows, as admission writes it: ``put_resource`` (sequence
and bucket) + ``put_message`` (payload, history). The ``ack`` phase deletes every message again
(one ``delete_message`` row per change set). Modes:

* ``core``: :meth:`SqliteFile.apply` called directly, ``batch`` change sets per transaction
  (the cost of SQLite + row building, no thread hop);
* ``store``: through :class:`SqliteStore`: stage ``batch`` change sets, await ``durable`` on
  the last ticket (one group commit each; adds the Trio -> worker thread hop);
* ``tasks``: ``batch`` concurrent Trio tasks, each ``stage`` + ``durable`` one change set in a
  loop: group commit forms the batches by itself (shown: mean commit batch size).

Wall-clock µs/row is what a request waits; CPU µs/row (``process_time``, every thread) is
steadier on a shared machine and shows the work itself. This is a measuring tool, not product code: it reads the wall clock (``perf_counter``).
"""

from __future__ import annotations

import argparse
import functools
import json
import platform
import sqlite3
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import trio

from relay_trio.stores.base import Changes, MessageRecord, ResourceRecord
from relay_trio.stores.sqlite import SqliteStore
from relay_trio.stores.sqlite_file import SqliteFile, SyncMode

BATCHES = (1, 100, 500)
SYNCS: tuple[SyncMode, ...] = ("normal", "full")


def admit_changes(i: int, payload: bytes) -> Changes:
    rid = f"vm-{i % 5000}"
    c = Changes()
    c.put_resource(ResourceRecord(rid, i, 1.0, 1700000000.0 + i, None, 0))
    c.put_message(
        MessageRecord(f"{rid}:{i}", rid, i, "scan", payload, 1700000000.0 + i, (), None, "up-0")
    )
    return c


def ack_changes(i: int) -> Changes:
    c = Changes()
    c.delete_message(f"vm-{i % 5000}:{i}")
    return c


def chunks(items: list[Changes], size: int) -> list[list[Changes]]:
    return [items[i : i + size] for i in range(0, len(items), size)]


def bench_core(
    path: Path, sync: SyncMode, batch: int, admits: list[Changes], acks: list[Changes]
) -> dict[str, float]:
    f = SqliteFile(path, sync, 1000)
    f.open()
    out: dict[str, float] = {}
    try:
        for phase, items in (("admit", admits), ("ack", acks)):
            groups = chunks(items, batch)
            c0, t0 = time.process_time(), time.perf_counter()
            for g in groups:
                f.apply(g)
            out[phase] = time.perf_counter() - t0
            out[f"{phase}_cpu"] = time.process_time() - c0
            out[f"{phase}_commits"] = len(groups)
    finally:
        f.close()
    return out


async def _store_phase(store: SqliteStore, items: list[Changes], batch: int) -> float:
    t0 = time.perf_counter()
    for g in chunks(items, batch):
        ticket = None
        for c in g:
            ticket = store.stage(c)
        assert ticket is not None
        await store.durable(ticket)
    return time.perf_counter() - t0


async def _tasks_phase(store: SqliteStore, items: list[Changes], tasks: int) -> float:
    async def worker(mine: list[Changes]) -> None:
        for c in mine:
            await store.durable(store.stage(c))

    t0 = time.perf_counter()
    async with trio.open_nursery() as nursery:
        for k in range(tasks):
            nursery.start_soon(worker, items[k::tasks])
    return time.perf_counter() - t0


def bench_async(
    path: Path,
    sync: SyncMode,
    batch: int,
    admits: list[Changes],
    acks: list[Changes],
    *,
    tasks: bool,
) -> dict[str, float]:
    out: dict[str, float] = {}

    async def main() -> None:
        store = SqliteStore(path, sync, 1000)
        await store.open()
        async with trio.open_nursery() as nursery:
            await nursery.start(store.run)
            for phase, items in (("admit", admits), ("ack", acks)):
                before = store.stats().commits
                c0 = time.process_time()
                if tasks:
                    out[phase] = await _tasks_phase(store, items, batch)
                else:
                    out[phase] = await _store_phase(store, items, batch)
                out[f"{phase}_cpu"] = time.process_time() - c0
                out[f"{phase}_commits"] = store.stats().commits - before
            nursery.cancel_scope.cancel()

    trio.run(main)
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--reports", type=int, default=20_000, help="change sets per phase (batch > 1)"
    )
    parser.add_argument(
        "--reports-single", type=int, default=2_000, help="change sets per phase (batch 1)"
    )
    parser.add_argument("--payload", type=int, default=200, help="payload bytes per report")
    parser.add_argument("--json", type=Path, default=None, help="also write the results here")
    args = parser.parse_args(argv)
    payload = b'{"x": "' + b"a" * max(0, args.payload - 9) + b'"}'
    rows: list[dict[str, Any]] = []
    modes: list[tuple[str, Callable[..., dict[str, float]]]] = [
        ("core", bench_core),
        ("store", functools.partial(bench_async, tasks=False)),
        ("tasks", functools.partial(bench_async, tasks=True)),
    ]
    print(
        f"sqlite {sqlite3.sqlite_version}, python {platform.python_version()}, "
        f"payload {len(payload)} B; admit = put_resource + put_message (2 rows), ack = delete_message (1 row)"
    )
    header = (
        f"{'sync':6} {'mode':5} {'batch':>5} | {'admit commits/s':>15} {'µs/row':>7} "
        f"{'cpu µs/row':>10} {'rows/commit':>11} | {'ack commits/s':>13} {'µs/row':>7} "
        f"{'cpu µs/row':>10}"
    )
    print(header)
    print("-" * len(header))
    for sync in SYNCS:
        for mode, fn in modes:
            for batch in BATCHES:
                n = args.reports_single if batch == 1 else args.reports
                admits = [admit_changes(i, payload) for i in range(n)]
                acks = [ack_changes(i) for i in range(n)]
                with tempfile.TemporaryDirectory() as tmp:
                    r = fn(Path(tmp) / "relay.db", sync, batch, admits, acks)
                row = {
                    "sync": sync,
                    "mode": mode,
                    "batch": batch,
                    "reports": n,
                    "admit_commits_per_s": r["admit_commits"] / r["admit"],
                    "admit_us_per_row": r["admit"] / (2 * n) * 1e6,
                    "admit_cpu_us_per_row": r["admit_cpu"] / (2 * n) * 1e6,
                    "admit_rows_per_commit": 2 * n / r["admit_commits"],
                    "ack_commits_per_s": r["ack_commits"] / r["ack"],
                    "ack_us_per_row": r["ack"] / n * 1e6,
                    "ack_cpu_us_per_row": r["ack_cpu"] / n * 1e6,
                }
                rows.append(row)
                print(
                    f"{sync:6} {mode:5} {batch:>5} | {row['admit_commits_per_s']:>15.0f} "
                    f"{row['admit_us_per_row']:>7.2f} {row['admit_cpu_us_per_row']:>10.2f} "
                    f"{row['admit_rows_per_commit']:>11.1f} | "
                    f"{row['ack_commits_per_s']:>13.0f} {row['ack_us_per_row']:>7.2f} "
                    f"{row['ack_cpu_us_per_row']:>10.2f}",
                    flush=True,
                )
    if args.json is not None:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps({"rows": rows}, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
