"""In-process cost of admission + delivery per report, without HTTP.

    python -m benchmarks.admit_cost STORE [N]        # STORE: memory | sqlite | full

A relay with its embedded file upstream (which acknowledges at once) admits N reports for
fresh resources in batches of 500 (inside ``Relay.batch()``, as the batch route does),
awaits durability after each batch, then waits until every message is acknowledged.
Prints wall time and CPU per report for the Trio thread and for the other threads (the
SQLite writer). GC is tuned as ``relay-trio run`` tunes it.

Run from a checkout of commit 35ebfe8 (``PYTHONPATH=<checkout>``) the same script measures
the code before the store and the split (it has no ``store`` setting, ``batch()`` or
``durable()``). For deterministic figures run it under
``valgrind --tool=callgrind --separate-threads=yes`` twice (N = 2000 and 12000) and divide
the difference in instructions by 10000.
"""

from __future__ import annotations

import gc
import os
import sys
import tempfile
import time
from contextlib import nullcontext
from typing import Any

import orjson
import trio

sys.path.insert(0, os.getcwd())
if os.path.exists("relay_trio/_relay.py"):  # the checkout before the split
    from relay_trio._app import decode_json  # type: ignore[import-not-found]
    from relay_trio._config import load_config  # type: ignore[import-not-found]
    from relay_trio._relay import Relay  # type: ignore[import-not-found]

    BEFORE = True
else:
    from relay_trio.core.config import load_config
    from relay_trio.http.params import decode_json
    from relay_trio.relay import Relay

    BEFORE = False

BATCH = 500
REPORT = b'{"resource_id":"%s","kind":"scan","payload":{"os":"linux","n":%d}}'


async def measure(store: str, n: int) -> None:
    cfg: dict[str, Any] = {
        "data_dir": tempfile.mkdtemp(),
        "port": 0,
        "log_level": "warning",
        "rate_per_minute": 1e6,
        "burst": 10,
        "max_resources": 2_000_000,
    }
    if not BEFORE:
        cfg["store"] = "sqlite" if store == "full" else store
        if store == "full":
            cfg["store_sync"] = "full"
    relay = Relay(load_config(cfg, {}, None))
    async with trio.open_nursery() as nursery:
        await nursery.start(relay.run)
        gc.collect()
        gc.freeze()
        gc.set_threshold(50_000, 20, 100)
        batches = [
            [REPORT % (f"r{k}".encode(), k) for k in range(i, min(i + BATCH, n))]
            for i in range(0, n, BATCH)
        ]
        t0, c0, p0 = time.perf_counter(), time.thread_time(), time.process_time()
        for lines in batches:
            with nullcontext() if BEFORE else relay.batch():
                results = [relay.admit(decode_json(line)) for line in lines]
            if not BEFORE:
                await relay.durable()
            await trio.lowlevel.checkpoint()  # the reply write's turn: senders run
            b"".join(orjson.dumps({"message_id": r.message_id}) + b"\n" for r in results)
        while relay.umh._pending:  # every message acknowledged  # noqa: ASYNC110 - polls a plain dict
            await trio.sleep(0.001)
        if not BEFORE:
            await relay.all_durable()
        t1, c1, p1 = time.perf_counter(), time.thread_time(), time.process_time()
        print(
            f"{store}: {1e6 * (t1 - t0) / n:.1f} us/report wall, "
            f"{1e6 * (c1 - c0) / n:.1f} us Trio thread CPU, "
            f"{1e6 * (p1 - p0 - (c1 - c0)) / n:.1f} us other threads, {n / (t1 - t0):,.0f}/s"
        )
        nursery.cancel_scope.cancel()


if __name__ == "__main__":
    trio.run(measure, sys.argv[1], int(sys.argv[2]) if len(sys.argv) > 2 else 20_000)
