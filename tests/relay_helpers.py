"""Shared test helpers: a real relay server on 127.0.0.1:0 and in-memory upstreams."""

from __future__ import annotations

import contextlib
import subprocess
import sys
from collections.abc import AsyncIterator, Callable, Mapping, Sequence
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import attrs
import httpx
import trio

from relay_trio.core.config import RelayConfig, load_config
from relay_trio.core.model import Accepted, Problem, validate_report
from relay_trio.relay import Relay
from relay_trio.server import RelayServer
from relay_trio.upstreams.base import Outbound, SendResult, SendStatus


@attrs.define(eq=False)
class MemoryUpstream:
    """An in-process upstream (no I/O, no threads) for virtual-time tests.

    ``mode`` is ``"ack"`` (synchronous ACK), ``"sent"`` (ACK comes later) or ``"fail"``.
    ``delay`` makes each batch take that long (virtual seconds).
    """

    url: str
    mode: str = "ack"
    delay: float = 0.0
    received: list[Outbound] = attrs.field(factory=list)
    probes: int = 0

    async def send_batch(
        self, batch: Sequence[Outbound], attempt_deadline: float
    ) -> list[SendResult]:
        with trio.move_on_after(attempt_deadline):
            if self.delay:
                await trio.sleep(self.delay)
            else:
                await trio.lowlevel.checkpoint()
            self.received.extend(batch)
            if self.mode == "fail":
                return [SendResult(SendStatus.FAILED, "HTTP 503")] * len(batch)
            status = SendStatus.ACKED if self.mode == "ack" else SendStatus.SENT
            return [SendResult(status)] * len(batch)
        return [SendResult(SendStatus.FAILED, "send_timeout")] * len(batch)

    async def probe(self) -> bool:
        self.probes += 1
        await trio.lowlevel.checkpoint()
        return self.mode != "fail"

    async def aclose(self) -> None:
        await trio.lowlevel.checkpoint()


async def eventually(
    predicate: Callable[[], bool], within: float = 10.0, step: float = 0.01
) -> None:
    """Wait (real time, bounded) until ``predicate()`` holds: for state outside Trio's view,
    such as a file another task appends to. Raises ``trio.TooSlowError`` on timeout."""
    with trio.fail_after(within):
        while not predicate():  # noqa: ASYNC110 - nothing to wait on but the state itself
            await trio.sleep(step)


def make_config(tmp_path: Path, **overrides: Any) -> RelayConfig:
    """A validated config writing into ``tmp_path``, on a free port."""
    base: dict[str, Any] = {"data_dir": str(tmp_path / "data"), "port": 0}
    base.update(overrides)
    return load_config(base, {}, None)


def memory_relay(
    tmp_path: Path, mode: str = "ack", **overrides: Any
) -> tuple[Relay, dict[str, MemoryUpstream]]:
    """A relay whose upstreams are :class:`MemoryUpstream` objects (one per URL)."""
    ups: dict[str, MemoryUpstream] = {}

    def factory(url: str, _deadline: float) -> MemoryUpstream:
        ups[url] = MemoryUpstream(url, mode)
        return ups[url]

    overrides.setdefault("store", "memory")
    relay = Relay(make_config(tmp_path, **overrides), upstream_factory=factory)
    return relay, ups


@asynccontextmanager
async def running_server(
    config: RelayConfig, relay: Relay | None = None
) -> AsyncIterator[tuple[RelayServer, httpx.AsyncClient]]:
    """A real relay (hypercorn, trio worker) on 127.0.0.1:0 and an httpx client for it."""
    server = RelayServer(config) if relay is None else RelayServer(config, relay)
    async with trio.open_nursery() as nursery:
        urls = await nursery.start(server.serve)
        async with httpx.AsyncClient(base_url=urls[0], timeout=10) as client:
            yield server, client
        server.relay.request_shutdown("test")


@attrs.define(eq=False)
class FakeAdmitter:
    """Records every object it is given; every ``limit_every``-th valid report gets a 429."""

    limit_every: int = 0
    seen: list[object] = attrs.field(factory=list)

    def admit(self, obj: object) -> Accepted | Problem:
        self.seen.append(obj)
        report = validate_report(obj)
        if isinstance(report, Problem):
            return report
        n = len(self.seen)
        if self.limit_every and n % self.limit_every == 0:
            return Problem(429, "rate-limited", "Too many reports", retry_after=30.0)
        return Accepted(f"{report.resource_id}:{n}", report.resource_id, n)

    def batch(self) -> contextlib.AbstractContextManager[None]:
        return contextlib.nullcontext()

    async def durable(self) -> None:
        await trio.lowlevel.checkpoint()


@asynccontextmanager
async def relay_subprocess(
    env: Mapping[str, str], stderr: Path, *, cwd: Path | None = None, within: float = 20
) -> AsyncIterator[tuple[trio.Process, str]]:
    """``python -m relay_trio run`` in a child process (settings in ``env``, its log in
    ``stderr``); yields the process and its base URL once it printed ``listening on``,
    and kills it on the way out if it is still running."""
    with stderr.open("wb") as err:
        proc = await trio.lowlevel.open_process(
            [sys.executable, "-m", "relay_trio", "run"],
            cwd=cwd,
            env=dict(env),
            stdout=subprocess.PIPE,
            stderr=err,
        )
    try:
        assert proc.stdout is not None
        buffer = b""
        with trio.fail_after(within):
            while b"\n" not in buffer:
                chunk = await proc.stdout.receive_some(4096)
                assert chunk, f"relay exited: {await trio.Path(stderr).read_text()}"
                buffer += chunk
        line = buffer.split(b"\n")[0].decode()
        assert line.startswith("listening on http://127.0.0.1:"), line
        yield proc, line.removeprefix("listening on ")
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()
