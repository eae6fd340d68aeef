"""Upstream clients and the sender pool: one attempt per send, each under a deadline.

The sender never retries on its own (seed 000): a failed or timed-out send is reported
back to the relay, which hands it to the unconfirmed-message handler like a NACK.
"""

from __future__ import annotations

import datetime
import enum
import logging
import math
import os
import time
import zlib
from collections.abc import AsyncGenerator, Callable, Sequence
from contextlib import aclosing
from email.utils import parsedate_to_datetime
from pathlib import Path
from typing import Any, Final, NamedTuple, Protocol, cast

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
    """The outcome of one attempt, with a short reason when it failed.

    ``retry_after`` (seconds, from an upstream's ``Retry-After`` on a 429 or 503) asks
    that the next attempt wait at least that long; ``None`` means normal backoff.
    """

    status: SendStatus
    detail: str = ""
    retry_after: float | None = None


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


#: Largest ``Content-Length`` (in digits) worth converting; longer is over any cap anyway.
_MAX_LENGTH_DIGITS: Final = 15
#: Statuses whose ``Retry-After`` sets the next attempt (RFC 9110 section 10.2.3).
_RETRY_AFTER_STATUSES: Final = frozenset({429, 503})


def parse_retry_after(value: str | None, now: float) -> float | None:
    """Seconds to wait from an HTTP ``Retry-After`` value, or ``None`` if absent or invalid.

    Accepts delta-seconds (``"120"``) or an HTTP-date, read against the wall-clock time
    ``now`` (a date in the past gives 0; a date without a zone is GMT, as HTTP-dates are).
    Anything else -- negative or fractional numbers, garbage -- is ignored (``None``) so
    the caller falls back to its normal backoff. Pure; never raises.
    """
    if value is None:
        return None
    value = value.strip()
    if value.isascii() and value.isdigit():
        # float(), not int(): no digit limit, and a huge value is capped by the caller.
        return float(value)
    try:
        when = parsedate_to_datetime(value)
    except (TypeError, ValueError, IndexError, OverflowError):
        return None
    if when.tzinfo is None:  # "-0000" or an obsolete zone-less format: HTTP-dates are GMT
        when = when.replace(tzinfo=datetime.UTC)
    try:
        delay = when.timestamp() - now
    except (OverflowError, OSError, ValueError):
        return None
    return max(delay, 0.0) if math.isfinite(delay) else None


@attrs.define(eq=False)
class HttpUpstream:
    """An HTTP upstream: POSTs each message as JSON, at most ``limiter`` requests at a time.

    ``2xx {"ack": true}`` is a synchronous ACK; any other 2xx means accepted, ACK later;
    anything else (status, network error, an answer over ``max_response_bytes``) is a
    failed attempt. A 429 or 503 with a valid ``Retry-After`` carries it in the result.
    The answer is streamed and never held beyond ``max_response_bytes`` (an ACK is a few
    bytes; an upstream answering megabytes must not cost the relay its memory).
    """

    url: str
    client: httpx.AsyncClient
    #: Concurrent requests to this upstream, shared by every sender task and the shutdown
    #: flush: one hung request holds one slot, for at most the attempt deadline.
    limiter: trio.CapacityLimiter = attrs.field(factory=lambda: trio.CapacityLimiter(64))
    max_response_bytes: int = 65536
    #: Wall-clock seconds, to read a ``Retry-After`` HTTP-date.
    wall_clock: Callable[[], float] = time.time

    async def send_one(self, message: Outbound, attempt_deadline: float) -> SendResult:
        """POST ``message`` once, within ``attempt_deadline`` seconds.

        Takes no slot of ``limiter``: the caller holds one. Delivery failures are results,
        never exceptions (a deadline miss is ``FAILED`` ``send_timeout``); cancellation
        propagates. The response is closed before this returns.
        """
        with trio.move_on_after(attempt_deadline):
            try:
                return await self._post(message)
            except httpx.HTTPError as exc:
                return SendResult(SendStatus.FAILED, type(exc).__name__)
        return _TIMED_OUT

    async def _post(self, message: Outbound) -> SendResult:
        async with self.client.stream(
            "POST",
            self.url,
            content=orjson.dumps(message.body()),
            # identity: a compressed answer could expand past the cap inside one chunk.
            headers={"content-type": "application/json", "accept-encoding": "identity"},
        ) as response:
            status = response.status_code
            content = await self._read_capped(response)
            if not 200 <= status < 300:
                retry_after = None
                if status in _RETRY_AFTER_STATUSES:
                    retry_after = parse_retry_after(
                        response.headers.get("retry-after"), self.wall_clock()
                    )
                if retry_after is None:
                    return SendResult(SendStatus.FAILED, f"HTTP {status}")
                return SendResult(
                    SendStatus.FAILED, f"HTTP {status}, Retry-After {retry_after:g}s", retry_after
                )
            if content is None:
                return SendResult(
                    SendStatus.FAILED, f"response body over {self.max_response_bytes} bytes"
                )
        try:
            body = orjson.loads(content) if content else {}
        except orjson.JSONDecodeError:
            body = {}
        if isinstance(body, dict) and body.get("ack") is True:
            return _ACKED
        return SendResult(SendStatus.SENT)

    async def _read_capped(self, response: httpx.Response) -> bytes | None:
        """The decoded body, or ``None`` as soon as it is known to exceed the cap.

        Stops reading at the first chunk past the cap (the caller's ``async with`` then
        closes the connection), so at most the cap plus one network chunk is ever held.
        """
        cap = self.max_response_bytes
        declared = response.headers.get("content-length", "")
        if (
            declared.isascii()
            and declared.isdigit()
            and (len(declared) > _MAX_LENGTH_DIGITS or int(declared) > cap)
        ):
            return None
        if response.is_stream_consumed:
            # Already in memory (an in-process transport such as httpx.MockTransport).
            content = response.content
            return None if len(content) > cap else content
        raw = bytearray()
        chunks = cast(AsyncGenerator[bytes, None], response.aiter_raw())
        async with aclosing(chunks):
            async for chunk in chunks:
                raw += chunk
                if len(raw) > cap:
                    return None
        encoding = response.headers.get("content-encoding", "identity").strip().lower()
        if encoding in ("", "identity"):
            return bytes(raw)
        if encoding in ("gzip", "x-gzip", "deflate"):
            # Bounded inflate: a small compressed answer may not expand past the cap either.
            try:
                inflated = zlib.decompressobj(zlib.MAX_WBITS | 32).decompress(raw, cap + 1)
            except zlib.error:
                return b""
            return None if len(inflated) > cap else inflated
        return b""  # an encoding we asked not to get: unreadable, so not an ACK

    async def send_batch(
        self, batch: Sequence[Outbound], attempt_deadline: float
    ) -> list[SendResult]:
        """Send every message concurrently (each holding one slot of ``limiter``).

        Returns within ``attempt_deadline`` seconds: a message still waiting for a slot
        or an answer then is ``FAILED`` ``send_timeout``.
        """
        results = [_TIMED_OUT] * len(batch)

        async def one(i: int, message: Outbound) -> None:
            async with self.limiter:
                results[i] = await self.send_one(message, attempt_deadline)

        with trio.move_on_after(attempt_deadline):
            async with trio.open_nursery() as nursery:
                for i, message in enumerate(batch):
                    nursery.start_soon(one, i, message)
        return results

    async def probe(self) -> bool:
        try:
            async with self.client.stream("GET", self.url) as response:
                # Any answer below 500 (a 405 included) shows the server is up and routing.
                # The body is never read: a probe must not download a huge answer either.
                return response.status_code < 500
        except httpx.HTTPError:
            return False

    async def aclose(self) -> None:
        await self.client.aclose()


def open_upstream(
    url: str,
    *,
    timeout: float,
    concurrency: int = 64,
    max_response_bytes: int = 65536,
    wall_clock: Callable[[], float] = time.time,
) -> Upstream:
    """An upstream client for ``url`` (``http(s)://`` or ``file://``). Never blocks.

    ``concurrency`` bounds the requests in flight to an HTTP upstream (its connection pool
    has as many connections); ``max_response_bytes`` bounds what is read of each answer.
    Both are ignored for ``file://``.
    """
    if url.startswith("file://"):
        return FileUpstream(url)
    client = httpx.AsyncClient(
        timeout=httpx.Timeout(timeout),
        limits=httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency),
    )
    return HttpUpstream(
        url,
        client,
        trio.CapacityLimiter(concurrency),
        max_response_bytes=max_response_bytes,
        wall_clock=wall_clock,
    )


def upstream_builder(
    *, concurrency: int, max_response_bytes: int, wall_clock: Callable[[], float]
) -> Callable[[str, float], Upstream]:
    """An ``(url, send_timeout) -> Upstream`` factory with these limits (see :func:`open_upstream`)."""

    def build(url: str, timeout: float) -> Upstream:
        return open_upstream(
            url,
            timeout=timeout,
            concurrency=concurrency,
            max_response_bytes=max_response_bytes,
            wall_clock=wall_clock,
        )

    return build


_ACKED = SendResult(SendStatus.ACKED)
_TIMED_OUT = SendResult(SendStatus.FAILED, "send_timeout")

OnResults = Callable[[Sequence[Outbound], Sequence[SendResult]], None]


@attrs.define(eq=False)
class SenderPool:
    """``tasks`` sender tasks reading one bounded channel of :class:`Outbound`.

    Each task takes what is queued (up to ``batch_max``) and groups it by upstream. A
    group for an :class:`HttpUpstream` (one request per message anyway) is sent message by
    message, each in its own task holding one slot of that upstream's ``limiter`` and
    reported on its own as soon as it ends: a hung request costs one slot for at most
    ``send_timeout``, never its batch-mates nor the sender task, which only waits when
    every slot of that upstream is busy (back-pressure to admission through the channel).
    Any other upstream (the file sink) gets the whole group in one ``send_batch`` call.
    Every message gets exactly one result, reported through ``on_results``, a deadline
    miss included (reported as ``FAILED``), so nothing handed to the pool is lost.
    """

    upstreams: Sequence[Upstream]
    receive_channel: trio.MemoryReceiveChannel[Outbound]
    on_results: OnResults
    send_timeout: float
    tasks: int = 8
    batch_max: int = 256
    #: Messages taken from the channel whose result is not reported yet.
    in_flight: int = attrs.field(default=0, init=False)

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Run until the send channel is closed and drained and every send has ended (or
        until cancelled)."""
        async with trio.open_nursery() as nursery:
            for _ in range(self.tasks):
                nursery.start_soon(self._worker, nursery)
            task_status.started()

    async def _worker(self, nursery: trio.Nursery) -> None:
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
            await self._deliver(batch, nursery)

    async def _deliver(self, batch: list[Outbound], nursery: trio.Nursery) -> None:
        groups: dict[int, list[Outbound]] = {}
        for message in batch:
            groups.setdefault(message.upstream, []).append(message)
        # Messages whose result this task still owes (the rest belong to _send_one tasks).
        owed = len(batch)
        try:
            for index, group in groups.items():
                upstream = self.upstreams[index]
                if isinstance(upstream, HttpUpstream):
                    for message in group:
                        slot = object()
                        await upstream.limiter.acquire_on_behalf_of(slot)
                        nursery.start_soon(self._send_one, upstream, message, slot)
                        owed -= 1
                else:
                    results = await upstream.send_batch(group, self.send_timeout)
                    self.on_results(group, results)
                    owed -= len(group)
                    self.in_flight -= len(group)
        finally:
            self.in_flight -= owed

    async def _send_one(self, upstream: HttpUpstream, message: Outbound, slot: object) -> None:
        try:
            result = await upstream.send_one(message, self.send_timeout)
            self.on_results((message,), (result,))
        finally:
            upstream.limiter.release_on_behalf_of(slot)
            self.in_flight -= 1
