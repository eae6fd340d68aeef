"""log_format: JSON lines that parse, carry the ids involved, and never a token or payload."""

from __future__ import annotations

import io
import logging
import os
import signal
import socket
import subprocess
import sys
from pathlib import Path

import httpx
import orjson
import trio

from relay_trio.logs import configure_logging

MARKER = "payload-marker-7f3a9c"
TOKENS = {
    "RELAY_TRIO_INGEST_TOKEN": "ingest-secret-1b2c",
    "RELAY_TRIO_ACK_TOKEN": "ack-secret-3d4e",
    "RELAY_TRIO_ADMIN_TOKEN": "admin-secret-5f6a",
    "RELAY_TRIO_READ_TOKEN": "read-secret-7b8c",
}


def closed_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
    return port


async def test_json_logs_parse_name_the_ids_and_hide_tokens_and_payloads(tmp_path: Path) -> None:
    dead_upstream = f"http://127.0.0.1:{closed_port()}/ingest"
    env = {
        **os.environ,
        **TOKENS,
        "RELAY_TRIO_PORT": "0",
        "RELAY_TRIO_LOG_FORMAT": "json",
        "RELAY_TRIO_LOG_LEVEL": "debug",
        "RELAY_TRIO_UPSTREAMS": dead_upstream,
        "RELAY_TRIO_MAX_ATTEMPTS": "1",
        "RELAY_TRIO_FAILURES_TO_DOWN": "1",
        "RELAY_TRIO_SHUTDOWN_TIMEOUT": "5",
    }
    proc = await trio.lowlevel.open_process(
        [sys.executable, "-m", "relay_trio", "run"],
        cwd=tmp_path,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )
    stderr = bytearray()
    try:
        assert proc.stdout is not None and proc.stderr is not None
        buffer = b""
        with trio.fail_after(20):
            while b"\n" not in buffer:
                buffer += await proc.stdout.receive_some(4096)
        url = buffer.split(b"\n")[0].decode().removeprefix("listening on ")
        ingest = {"Authorization": f"Bearer {TOKENS['RELAY_TRIO_INGEST_TOKEN']}"}
        async with httpx.AsyncClient(base_url=url, timeout=10) as client:
            report = {"resource_id": "vm-1", "payload": {"secret": MARKER}}
            assert (
                await client.post("/v1/reports", json=report, headers=ingest)
            ).status_code == 202
            wrong = {"Authorization": f"Bearer {TOKENS['RELAY_TRIO_READ_TOKEN']}"}
            assert (await client.post("/v1/reports", json=report, headers=wrong)).status_code == 403
            broken = ('{"resource_id": "vm-2", "payload": "' + MARKER).encode()
            assert (
                await client.post("/v1/reports", content=broken, headers=ingest)
            ).status_code == 400
            read = {"Authorization": f"Bearer {TOKENS['RELAY_TRIO_READ_TOKEN']}"}
            with trio.fail_after(20):
                # Polling over HTTP: the state lives in another process.
                page: dict[str, list[object]] = {"dead_letters": []}
                while not page["dead_letters"]:
                    page = (await client.get("/v1/deadletters", headers=read)).json()
                    await trio.sleep(0.05)
        proc.send_signal(signal.SIGTERM)
        with trio.fail_after(20):
            while chunk := await proc.stderr.receive_some(65536):
                stderr += chunk
            assert await proc.wait() == 0
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()
    text = stderr.decode()
    lines = [orjson.loads(line) for line in text.splitlines()]
    assert lines, "no log lines"
    for line in lines:
        assert {"time", "level", "logger", "message"} <= set(line), line
        assert line["time"].endswith("Z") and line["level"] in {"debug", "info", "warning", "error"}
    dead = [line for line in lines if line["message"].startswith("dead letter vm-1:1")]
    assert dead and dead[0]["message_id"] == "vm-1:1" and dead[0]["resource_id"] == "vm-1"
    down = [line for line in lines if "marked down" in line["message"]]
    assert down and down[0]["upstream"] == dead_upstream
    assert MARKER not in text
    for token in TOKENS.values():
        assert token not in text


def test_json_formatter_copies_only_the_id_fields_and_redacts_tokens() -> None:
    stream = io.StringIO()
    root = logging.getLogger()
    saved = (list(root.handlers), root.level)
    try:
        configure_logging("info", "json", stream, ["tok-123"])
        log = logging.getLogger("relay_trio.test")
        log.info(
            "sent %s with tok-123",
            "vm-1:2",
            extra={"message_id": "vm-1:2", "resource_id": "vm-1", "payload": MARKER},
        )
        try:
            raise ValueError("bad tok-123")
        except ValueError:
            log.exception("boom")
    finally:
        root.handlers[:] = saved[0]
        root.setLevel(saved[1])
    first, second = (orjson.loads(line) for line in stream.getvalue().splitlines())
    assert first["message"] == "sent vm-1:2 with [redacted]"
    assert (first["logger"], first["level"]) == ("relay_trio.test", "info")
    assert (first["message_id"], first["resource_id"]) == ("vm-1:2", "vm-1")
    assert "payload" not in first and MARKER not in stream.getvalue()
    assert "ValueError: bad [redacted]" in second["exception"]
    assert "tok-123" not in stream.getvalue()


def test_text_format_is_the_classic_line() -> None:
    stream = io.StringIO()
    root = logging.getLogger()
    saved = (list(root.handlers), root.level)
    try:
        configure_logging("warning", "text", stream, [])
        logging.getLogger("relay_trio.test").info("hidden")
        logging.getLogger("relay_trio.test").warning("shown %d", 3)
    finally:
        root.handlers[:] = saved[0]
        root.setLevel(saved[1])
    (line,) = stream.getvalue().splitlines()
    assert line.endswith(" WARNING relay_trio.test: shown 3")
