"""Upstream clients and the sender pool: one attempt per send, each under a deadline.

The sender never retries on its own (seed 000): a failed or timed-out send is reported
back to the relay, which hands it to the unconfirmed-message handler like a NACK.
"""

from __future__ import annotations

import enum
import logging
import os
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, Final, NamedTuple, Protocol

import attrs
import httpx
import orjson
import trio

log = logging.getLogger("relay_trio.sender")


class Outbound(NamedTuple):
    """One send: the message, the payload to deliver and which attempt this is.

    A named tuple: one is built per admitted report and per retry."""

    message_id: str
    resource_id: str
    kind: str | None
    payload: Any
    attempt: int
    upstream: int

    def body(self) -> dict[str, Any]:
        """The JSON object the upstream receives."""
        return {
            "message_id": self.message_id,
            "resource_id": self.resource_id,
            "kind": self.kind,
            "payload": self.payload,
            "attempt": self.attempt,
        }


class SendStatus(enum.Enum):
    """How one attempt ended."""

    ACKED = "acked"  # upstream acknowledged synchronously
    SENT = "sent"  # upstream accepted it; the ACK comes later via POST /v1/acks
    FAILED = "failed"  # error status, network error or deadline


@attrs.frozen
class SendResult:
    """The outcome of one attempt, with a short reason when it failed."""

    status: SendStatus
    detail: str = ""


class Upstream(Protocol):
    """Where reports go. ``send_batch`` makes one attempt per message."""

    url: str

    async def send_batch(
        self, batch: Sequence[Outbound], attempt_deadline: float
    ) -> list[SendResult]:
        """Deliver each message once, each attempt within ``attempt_deadline`` seconds.

        Returns one result per message, in order. Raises nothing for delivery failures:
        a deadline miss is a ``FAILED`` result with detail ``send_timeout``.
        """
        ...

    async def probe(self) -> bool:
        """One health probe of a down upstream; True when it answered. Caller bounds it."""
        ...

    async def aclose(self) -> None: ...


#: Batches up to this size may be appended on the Trio thread (see FileUpstream).
SYNC_WRITE_MAX: Final = 64 * 1024
#: A synchronous append slower than this sends the upstream to its worker thread...
SLOW_WRITE: Final = 0.002
#: ...for this long.
SLOW_WRITE_BACKOFF: Final = 60.0


@attrs.define(eq=False)
class FileUpstream:
    """The embedded default upstream: appends one JSON line per message and acks at once.

    Each batch is a single ``write`` on an ``O_APPEND`` descriptor, so concurrent sender
    tasks never interleave lines. Opening the file and large batches go to a worker
    thread. Small appends (up to ``SYNC_WRITE_MAX``) land in the page cache in
    microseconds, and a thread hop per batch measured 17% of single-report ingest, so
    they are written on the Trio thread -- but every such write is timed, and one that
    takes longer than ``SLOW_WRITE`` (a stalled disk) sends this upstream back to the
    worker thread for ``SLOW_WRITE_BACKOFF`` seconds, so a slow disk stalls the event
    loop at most once per backoff period.
    """

    url: str
    path: Path = attrs.field(init=False)
    _fd: int | None = attrs.field(default=None, init=False)
    #: Trio time before which every write goes to the worker thread.
    _threaded_until: float = attrs.field(default=0.0, init=False)
    slow_writes: int = attrs.field(default=0, init=False)

    def __attrs_post_init__(self) -> None:
        self.path = Path(self.url.removeprefix("file://"))

    def _write(self, data: bytes) -> None:
        if self._fd is None:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self._fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
        view = memoryview(data)
        while view:
            written = os.write(self._fd, view)
            view = view[written:]

    async def send_batch(
        self, batch: Sequence[Outbound], attempt_deadline: float
    ) -> list[SendResult]:
        data = b"".join(orjson.dumps(m.body()) + b"\n" for m in batch)
        now = trio.current_time()
        if self._fd is not None and len(data) <= SYNC_WRITE_MAX and now >= self._threaded_until:
            try:
                self._write(data)
            except OSError as exc:
                return [SendResult(SendStatus.FAILED, f"file: {exc.strerror}")] * len(batch)
            took = trio.current_time() - now
            if took > SLOW_WRITE:
                self.slow_writes += 1
                self._threaded_until = now + SLOW_WRITE_BACKOFF
                log.warning(
                    "file upstream %s: an append took %.1f ms; writing from a worker thread for %gs",
                    self.path,
                    took * 1000,
                    SLOW_WRITE_BACKOFF,
                )
            await trio.lowlevel.checkpoint()
            return [_ACKED] * len(batch)
        try:
            with trio.move_on_after(attempt_deadline):
                # A stalled disk must not hold shutdown: abandon the thread on cancel.
                await trio.to_thread.run_sync(self._write, data, abandon_on_cancel=True)
                return [_ACKED] * len(batch)
        except OSError as exc:
            return [SendResult(SendStatus.FAILED, f"file: {exc.strerror}")] * len(batch)
        return [_TIMED_OUT] * len(batch)

    async def probe(self) -> bool:
        try:
            await trio.to_thread.run_sync(self._write, b"", abandon_on_cancel=True)
        except OSError:
            return False
        return True

    async def aclose(self) -> None:
        if self._fd is not None:
            fd, self._fd = self._fd, None
            await trio.to_thread.run_sync(os.close, fd)


@attrs.define(eq=False)
class HttpUpstream:
    """An HTTP upstream: POSTs each message as JSON.

    ``2xx {"ack": true}`` is a synchronous ACK; any other 2xx means accepted, ACK later;
    anything else (status, network error) is a failed attempt.
    """

    url: str
    client: httpx.AsyncClient
    #: Concurrent requests to this upstream (shared by every sender task).
    limiter: trio.CapacityLimiter = attrs.field(factory=lambda: trio.CapacityLimiter(64))

    async def _send_one(self, message: Outbound, attempt_deadline: float) -> SendResult:
        response: httpx.Response | None = None
        try:
            with trio.move_on_after(attempt_deadline):
                response = await self.client.post(
                    self.url,
                    content=orjson.dumps(message.body()),
                    headers={"content-type": "application/json"},
                )
        except httpx.HTTPError as exc:
            return SendResult(SendStatus.FAILED, type(exc).__name__)
        if response is None:
            return _TIMED_OUT
        if not 200 <= response.status_code < 300:
            return SendResult(SendStatus.FAILED, f"HTTP {response.status_code}")
        try:
            body = orjson.loads(response.content) if response.content else {}
        except orjson.JSONDecodeError:
            body = {}
        if isinstance(body, dict) and body.get("ack") is True:
            return _ACKED
        return SendResult(SendStatus.SENT)

    async def send_batch(
        self, batch: Sequence[Outbound], attempt_deadline: float
    ) -> list[SendResult]:
        return [await self._send_one(m, attempt_deadline) for m in batch]

    async def probe(self) -> bool:
        try:
            response = await self.client.get(self.url)
        except httpx.HTTPError:
            return False
        # Any answer below 500 (a 405 included) shows the server is up and routing.
        return response.status_code < 500

    async def aclose(self) -> None:
        await self.client.aclose()


def open_upstream(url: str, *, timeout: float) -> Upstream:
    """An upstream client for ``url`` (``http(s)://`` or ``file://``). Never blocks."""
    if url.startswith("file://"):
        return FileUpstream(url)
    client = httpx.AsyncClient(
        timeout=httpx.Timeout(timeout),
        limits=httpx.Limits(max_connections=64, max_keepalive_connections=32),
    )
    return HttpUpstream(url, client)


_ACKED = SendResult(SendStatus.ACKED)
_TIMED_OUT = SendResult(SendStatus.FAILED, "send_timeout")

OnResults = Callable[[Sequence[Outbound], Sequence[SendResult]], None]


@attrs.define(eq=False)
class SenderPool:
    """``tasks`` sender tasks reading one bounded channel of :class:`Outbound`.

    Each task takes what is queued (up to ``batch_max``), groups it by upstream and makes
    one attempt per message under ``send_timeout``. Every message gets exactly one
    result, reported through one ``on_results`` call per batch and upstream, a deadline miss included (reported as ``FAILED``), so nothing
    handed to the pool is lost.
    """

    upstreams: Sequence[Upstream]
    receive_channel: trio.MemoryReceiveChannel[Outbound]
    on_results: OnResults
    send_timeout: float
    tasks: int = 8
    batch_max: int = 256
    in_flight: int = attrs.field(default=0, init=False)
    _idle: trio.Event = attrs.field(factory=trio.Event, init=False)

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Run until the send channel is closed and drained (or cancelled)."""
        async with trio.open_nursery() as nursery:
            for _ in range(self.tasks):
                nursery.start_soon(self._worker)
            task_status.started()

    async def _worker(self) -> None:
        rx = self.receive_channel
        while True:
            try:
                first = await rx.receive()
            except (trio.EndOfChannel, trio.ClosedResourceError):
                return
            batch = [first]
            while len(batch) < self.batch_max:
                try:
                    batch.append(rx.receive_nowait())
                except (trio.WouldBlock, trio.EndOfChannel, trio.ClosedResourceError):
                    break
            self.in_flight += len(batch)
            try:
                await self._deliver(batch)
            finally:
                self.in_flight -= len(batch)

    async def _deliver(self, batch: list[Outbound]) -> None:
        groups: dict[int, list[Outbound]] = {}
        for message in batch:
            groups.setdefault(message.upstream, []).append(message)
        for index, group in groups.items():
            results = await self.upstreams[index].send_batch(group, self.send_timeout)
            self.on_results(group, results)
