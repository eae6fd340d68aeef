"""Screenshot of the live status page for the docs: ``python -m benchmarks.statuspage_screenshot``.

Starts a relay in-process with two fake HTTP upstreams on 127.0.0.1, drives a varying
load for about ``--seconds`` (admissions, rate-limit rejections, invalid reports, an
upstream outage with retries, dead letters, fail-over and recovery), opens the page in
headless Chromium and writes ``docs/img/statuspage.png``. Needs ``chromium``.
"""

from __future__ import annotations

import argparse
import math
import random
import sys
import tempfile
from pathlib import Path

import httpx
import orjson
import trio

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))

from chromium_cdp import launch_chromium
from fake_upstream import Behaviour, run_fake_upstream
from relay_helpers import make_config, running_server

OUT = Path(__file__).resolve().parent.parent / "docs" / "img" / "statuspage.png"


async def drive(client: httpx.AsyncClient, seconds: float, rng: random.Random) -> None:
    """Post batches ten times a second at a slowly varying rate (~40-120 reports/s)."""
    start = trio.current_time()
    while (t := trio.current_time() - start) < seconds:
        count = int(8 + 4 * math.sin(t / 9) + rng.random() * 3)
        lines = [
            orjson.dumps({"resource_id": f"vm-{rng.randrange(400)}", "payload": {"load": i}})
            for i in range(count)
        ]
        if rng.random() < 0.1:
            lines.append(b'{"resource_id": "bad id", "payload": 1}')
        await client.post("/v1/reports:batch", content=b"\n".join(lines))
        await trio.sleep(0.1)


async def main(seconds: float, out: Path) -> None:
    rng = random.Random(7)
    with tempfile.TemporaryDirectory() as tmp:
        tmp_path = Path(tmp)
        async with (
            run_fake_upstream(Behaviour(sync_ack=True)) as primary,
            run_fake_upstream(Behaviour(sync_ack=True)) as secondary,
        ):
            config = make_config(
                tmp_path,
                upstreams=[primary.url, secondary.url],
                rate_per_minute=6,
                burst=2,
                ack_timeout=3,
                retry_base=1,
                retry_cap=2,
                max_attempts=2,
                failures_to_down=3,
                successes_to_up=2,
                probe_interval=3,
            )
            async with (
                running_server(config) as (server, client),
                launch_chromium(tmp_path / "chromium") as browser,
                trio.open_nursery() as nursery,
            ):
                session = await browser.open_page(server.urls[0] + "/", 1440, 1000)
                nursery.start_soon(drive, client, seconds, rng)
                # A third of the way in, the secondary upstream accepts but stops
                # acknowledging (pending grows, ACK timeouts, retries, dead letters), then
                # fails outright (marked down, its resources fail over), then recovers.
                await trio.sleep(seconds * 0.3)
                secondary.behaviour = Behaviour(sync_ack=False)
                await trio.sleep(seconds * 0.2)
                secondary.behaviour = Behaviour(fail_all=True)
                await trio.sleep(seconds * 0.15)
                secondary.behaviour = Behaviour(sync_ack=True)
                await trio.sleep(seconds * 0.35 + 1.5)
                png = await browser.screenshot(session)
                errors = browser.page_errors
                nursery.cancel_scope.cancel()
    await trio.Path(out).write_bytes(png)
    print(f"wrote {out} ({len(png)} bytes); page errors: {errors or 'none'}")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--seconds", type=float, default=90.0)
    parser.add_argument("--out", type=Path, default=OUT)
    args = parser.parse_args()
    trio.run(main, args.seconds, args.out)
