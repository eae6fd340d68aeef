"""`relay-trio run` as a subprocess: prints its address, serves, exits 0 on SIGTERM."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

import httpx
import orjson
import trio


async def test_run_serves_and_exits_zero_on_sigterm(tmp_path: Path) -> None:
    env = {**os.environ, "RELAY_TRIO_PORT": "0"}
    proc = await trio.lowlevel.open_process(
        [sys.executable, "-m", "relay_trio", "run"],
        cwd=tmp_path,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
    )
    try:
        assert proc.stdout is not None
        buffer = b""
        with trio.fail_after(20):
            while b"\n" not in buffer:
                buffer += await proc.stdout.receive_some(4096)
        line = buffer.split(b"\n")[0].decode()
        assert line.startswith("listening on http://127.0.0.1:")
        url = line.removeprefix("listening on ")
        async with httpx.AsyncClient(base_url=url) as client:
            r = await client.post("/v1/reports", json={"resource_id": "vm-9", "payload": [1, 2]})
            assert r.status_code == 202
            assert (
                await client.post("/v1/reports", json={"resource_id": "vm-9", "payload": 3})
            ).status_code == 429
        proc.send_signal(signal.SIGTERM)
        with trio.fail_after(20):
            code = await proc.wait()
        assert code == 0
        sink = tmp_path / "relay-trio-data" / "upstream.jsonl"
        assert orjson.loads(sink.read_bytes().splitlines()[0])["message_id"] == "vm-9:1"
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()
