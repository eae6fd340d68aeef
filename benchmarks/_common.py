"""Shared helpers for the benchmark harness: machine info, percentiles, child processes,
and a tiny raw HTTP/1.1 client on Trio sockets (keep-alive, no pipelining).

Everything here is for measuring, not for the product: it may read the wall clock.
"""

from __future__ import annotations

import json
import os
import platform
import queue
import resource
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import trio

ROOT = Path(__file__).resolve().parent.parent
RESULTS = Path(__file__).resolve().parent / "results"


def raise_fd_limit(want: int = 65536) -> int:
    """Raise the soft open-files limit towards ``want`` (never above the hard limit)."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    target = want if hard == resource.RLIM_INFINITY else min(want, hard)
    if soft < target:
        resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
        soft = target
    return soft


def percentile(values: Sequence[float], p: float) -> float:
    """The ``p``-th percentile (0..100) by nearest rank; NaN for no values."""
    if not values:
        return float("nan")
    ordered = sorted(values)
    k = max(0, min(len(ordered) - 1, round(p / 100 * len(ordered) + 0.5) - 1))
    return ordered[k]


def machine_info() -> dict[str, Any]:
    """CPU count and model, Python, OS, and the git commit of the tree being measured."""
    model = platform.processor() or ""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    commit = "unknown"
    dirty = False
    try:
        commit = subprocess.run(
            ["git", "rev-parse", "--short=12", "HEAD"],
            cwd=ROOT,
            capture_output=True,
            text=True,
            check=True,
        ).stdout.strip()
        dirty = bool(
            subprocess.run(
                ["git", "status", "--porcelain", "--untracked-files=no", "relay_trio"],
                cwd=ROOT,
                capture_output=True,
                text=True,
                check=True,
            ).stdout.strip()
        )
    except (OSError, subprocess.CalledProcessError):
        pass
    try:
        mem = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError):
        mem = 0
    return {
        "cpu_count": os.cpu_count(),
        "cpu_model": model,
        "memory_gib": round(mem / 2**30, 1),
        "python": platform.python_version(),
        "implementation": platform.python_implementation(),
        "platform": platform.platform(),
        "git_commit": commit,
        "relay_trio_dirty": dirty,
        "date": time.strftime("%Y-%m-%d %H:%M:%S %Z"),
    }


# -- child processes ---------------------------------------------------------------------


class Child:
    """A child Python process (``python -m benchmarks.<module> ...``) speaking by lines.

    The child prints ``READY <json>`` once it is serving and may print ``RESULT <json>``
    lines; everything else on stdout is ignored. Always stopped by :meth:`stop`.
    """

    def __init__(
        self,
        module: str,
        args: dict[str, Any],
        *,
        env: dict[str, str] | None = None,
        cwd: Path | None = None,
    ):
        self.args = args
        full_env = {**os.environ, **(env or {}), "PYTHONUNBUFFERED": "1"}
        self.proc = subprocess.Popen(
            [sys.executable, "-m", module, json.dumps(args)],
            cwd=cwd or ROOT,
            stdout=subprocess.PIPE,
            stderr=None,
            text=True,
            env=full_env,
        )
        self.results: list[dict[str, Any]] = []
        self.module = f"{module} {args.get('kind', '')}"
        self._lines: queue.Queue[str] = queue.Queue()
        threading.Thread(target=self._pump, daemon=True).start()

    @property
    def pid(self) -> int:
        return self.proc.pid

    def _pump(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            if line.startswith(("READY ", "RESULT ")):
                self._lines.put(line)
        self._lines.put("")

    def _line(self, timeout: float) -> str:
        try:
            line = self._lines.get(timeout=timeout)
        except queue.Empty:
            raise TimeoutError(f"{self.module}: no answer within {timeout}s") from None
        if not line:
            raise RuntimeError(f"{self.module}: child exited (rc={self.proc.wait()})")
        return line

    def wait_ready(self, timeout: float = 60) -> dict[str, Any]:
        line = self._line(timeout)
        if not line.startswith("READY "):
            raise RuntimeError(f"expected READY, got {line!r}")
        info: dict[str, Any] = json.loads(line[6:])
        return info

    def result(self, timeout: float = 600) -> dict[str, Any]:
        line = self._line(timeout)
        value: dict[str, Any] = json.loads(line.split(" ", 1)[1])
        self.results.append(value)
        return value

    def stop(self, timeout: float = 15) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


def emit(tag: str, value: dict[str, Any]) -> None:
    """Print one ``READY``/``RESULT`` line for the parent."""
    sys.stdout.write(f"{tag} {json.dumps(value)}\n")
    sys.stdout.flush()


# -- raw HTTP/1.1 over trio sockets ------------------------------------------------------


class HttpConn:
    """One keep-alive HTTP/1.1 connection; requests are sent one at a time."""

    def __init__(self, stream: trio.SocketStream, host: str) -> None:
        self.stream = stream
        self.host = host
        self.buf = bytearray()

    @classmethod
    async def open(cls, host: str, port: int) -> HttpConn:
        stream = await trio.open_tcp_stream(host, port)
        return cls(stream, f"{host}:{port}")

    def build(self, method: str, path: str, body: bytes = b"", ctype: str = "") -> bytes:
        head = f"{method} {path} HTTP/1.1\r\nHost: {self.host}\r\n"
        if body or method == "POST":
            head += f"Content-Length: {len(body)}\r\n"
            if ctype:
                head += f"Content-Type: {ctype}\r\n"
        return head.encode() + b"\r\n" + body

    async def request(
        self, method: str, path: str, body: bytes = b"", ctype: str = "application/json"
    ) -> tuple[int, bytes]:
        """Send one request and read the whole response (Content-Length framed)."""
        await self.stream.send_all(self.build(method, path, body, ctype))
        return await self.read_response()

    async def read_response(self) -> tuple[int, bytes]:
        buf = self.buf
        while True:
            end = buf.find(b"\r\n\r\n")
            if end >= 0:
                break
            chunk = await self.stream.receive_some(262144)
            if not chunk:
                raise ConnectionError("server closed the connection")
            buf += chunk
        head = bytes(buf[:end]).decode("latin-1")
        status = int(head[9:12])
        length = 0
        for line in head.split("\r\n")[1:]:
            name, _, value = line.partition(":")
            if name.strip().lower() == "content-length":
                length = int(value)
        total = end + 4 + length
        while len(buf) < total:
            chunk = await self.stream.receive_some(max(262144, total - len(buf)))
            if not chunk:
                raise ConnectionError("server closed the connection mid-body")
            buf += chunk
        body = bytes(buf[end + 4 : total])
        del buf[:total]
        return status, body

    async def aclose(self) -> None:
        await self.stream.aclose()


def split_url(url: str) -> tuple[str, int]:
    """``http://HOST:PORT[/...]`` or ``tcp://HOST:PORT`` → (host, port)."""
    rest = url.split("://", 1)[1].split("/", 1)[0]
    host, _, port = rest.rpartition(":")
    return host.strip("[]"), int(port)
