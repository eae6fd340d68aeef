"""Side queue: audit and mirror taps that never sit on the request path.

Seed 001 (vault-audit-filter #22): notifying and forwarding inline made every audited request
wait for the slowest side effect, and a dead UDP collector stalled the whole server. Here the
request path only calls :meth:`SideQueue.offer`, which is synchronous and never blocks: each
sink has its own bounded memory channel and its own worker task, so a stalled webhook can
neither slow a request nor starve the audit file. A full queue drops the record and counts it;
every sink write runs under ``timeout``; a sink that raises or hangs is counted and skipped,
never allowed to kill the relay.

Records are pre-encoded JSON documents (``bytes``, no trailing newline).
"""

from __future__ import annotations

import logging
import math
import os
from collections.abc import Mapping, Sequence
from typing import IO, Any, Protocol, runtime_checkable

import attrs
import httpx
import trio

__all__ = [
    "AuditFileSink",
    "SideQueue",
    "SideSink",
    "SinkCounters",
    "UdpSink",
    "WebhookError",
    "WebhookSink",
    "build_sinks",
    "parse_udp_target",
]

log = logging.getLogger(__name__)

# Largest UDP payload IPv4 can carry (65535 - 8 byte UDP header - 20 byte IP header).
MAX_UDP_PAYLOAD = 65_507


class SideSink(Protocol):
    """Where side records go. One worker task calls ``write`` at a time, never concurrently."""

    name: str

    async def write(self, batch: Sequence[bytes]) -> None:
        """Deliver ``batch`` (pre-encoded JSON records, no trailing newline).

        May block for as long as it likes: the caller bounds it with a cancel scope.
        Raises on failure; returning means the sink accepted the whole batch.
        """
        ...

    async def aclose(self) -> None:
        """Release the sink's resources. Called once, after the last ``write``."""
        ...


@runtime_checkable
class SinkCounters(Protocol):
    """Optional: a sink with its own counters, merged into :meth:`SideQueue.stats`."""

    def counters(self) -> Mapping[str, int]: ...


# --------------------------------------------------------------------------- sinks


@attrs.define(eq=False)
class AuditFileSink:
    """Appends one JSON line per record to ``path`` (opened once, on the first write).

    All file I/O runs in a worker thread (``trio.to_thread.run_sync``), never on the Trio
    thread. A write is flushed to the OS before ``write`` returns (no fsync). A disk write
    that is already in its thread cannot be interrupted: a timeout takes effect when the
    thread returns, which keeps writes serialised so lines never interleave.
    """

    path: str | os.PathLike[str]
    name: str = "audit_file"
    _file: IO[bytes] | None = attrs.field(default=None, init=False)
    _closed: bool = attrs.field(default=False, init=False)

    async def write(self, batch: Sequence[bytes]) -> None:
        """Append ``batch`` as JSON lines. Checkpoint; raises ``OSError`` on I/O failure."""
        if not batch:
            await trio.lowlevel.checkpoint()
            return
        data = b"\n".join(batch) + b"\n"
        await trio.to_thread.run_sync(self._append_blocking, data)

    async def aclose(self) -> None:
        """Close the file (in a thread). Idempotent; later writes raise ``ClosedResourceError``."""
        await trio.to_thread.run_sync(self._close_blocking)

    def _append_blocking(self, data: bytes) -> None:
        if self._closed:
            raise trio.ClosedResourceError(f"audit file sink {self.name!r} is closed")
        if self._file is None:
            parent = os.path.dirname(os.fspath(self.path))
            if parent:
                os.makedirs(parent, exist_ok=True)
            # Held open for the sink's lifetime on purpose; closed in aclose().
            self._file = open(self.path, "ab")  # noqa: SIM115
        self._file.write(data)
        self._file.flush()

    def _close_blocking(self) -> None:
        self._closed = True
        if self._file is not None:
            file, self._file = self._file, None
            file.close()


@attrs.define(eq=False)
class UdpSink:
    """Sends one datagram per record to ``host:port`` (resolved once, on the first write).

    Records longer than ``max_datagram`` bytes are dropped and counted in ``oversized``,
    never fragmented or truncated: a partial JSON document is worse than none. Each
    ``sendto`` is a checkpoint and the queue's timeout bounds the whole batch.
    """

    host: str
    port: int
    max_datagram: int = attrs.field(default=65_000)
    name: str = "udp"
    oversized: int = attrs.field(default=0, init=False)
    sent: int = attrs.field(default=0, init=False)
    _sock: trio.socket.SocketType | None = attrs.field(default=None, init=False)
    _addr: Any = attrs.field(default=None, init=False)

    @max_datagram.validator
    def _check_max_datagram(self, _attribute: object, value: int) -> None:
        if not 1 <= value <= MAX_UDP_PAYLOAD:
            raise ValueError(f"max_datagram must be in 1..{MAX_UDP_PAYLOAD}, got {value}")

    async def write(self, batch: Sequence[bytes]) -> None:
        """Send each record as one datagram. Checkpoint; raises ``OSError`` on socket errors."""
        sock, addr = await self._socket()
        for record in batch:
            if len(record) > self.max_datagram:
                self.oversized += 1
                continue
            await sock.sendto(record, addr)
            self.sent += 1

    async def aclose(self) -> None:
        """Close the socket. Idempotent. Checkpoint."""
        if self._sock is not None:
            sock, self._sock = self._sock, None
            sock.close()
        await trio.lowlevel.checkpoint()

    def counters(self) -> Mapping[str, int]:
        """Datagrams sent and records dropped for exceeding ``max_datagram``."""
        return {"oversized": self.oversized, "datagrams_sent": self.sent}

    async def _socket(self) -> tuple[trio.socket.SocketType, Any]:
        if self._sock is None:
            infos = await trio.socket.getaddrinfo(self.host, self.port, type=trio.socket.SOCK_DGRAM)
            if not infos:
                raise OSError(f"cannot resolve UDP target {self.host}:{self.port}")
            family, type_, proto, _canonname, sockaddr = infos[0]
            self._sock = trio.socket.socket(family, type_, proto)
            self._addr = sockaddr
        else:
            await trio.lowlevel.checkpoint()
        return self._sock, self._addr


class WebhookError(Exception):
    """The webhook answered with a non-2xx status."""

    def __init__(self, url: str, status: int) -> None:
        super().__init__(f"webhook {url} answered HTTP {status}")
        self.url = url
        self.status = status


@attrs.define(eq=False)
class WebhookSink:
    """POSTs each batch to ``url`` as one JSON array (``application/json``).

    Uses ``client`` if given (the caller owns and closes it); otherwise creates its own
    ``httpx.AsyncClient`` with no httpx timeout (the queue's cancel scope is the deadline)
    and closes it in :meth:`aclose`. A non-2xx answer raises :class:`WebhookError`.
    """

    url: str
    client: httpx.AsyncClient | None = None
    name: str = "webhook"
    _http: httpx.AsyncClient = attrs.field(init=False)
    _owns_client: bool = attrs.field(init=False)

    def __attrs_post_init__(self) -> None:
        self._owns_client = self.client is None
        self._http = self.client if self.client is not None else httpx.AsyncClient(timeout=None)

    async def write(self, batch: Sequence[bytes]) -> None:
        """POST the batch. Checkpoint; raises ``WebhookError`` or ``httpx.HTTPError``."""
        body = b"[" + b",".join(batch) + b"]"
        response = await self._http.post(
            self.url, content=body, headers={"content-type": "application/json"}
        )
        if not response.is_success:
            raise WebhookError(self.url, response.status_code)

    async def aclose(self) -> None:
        """Close the client if this sink created it. Checkpoint."""
        if self._owns_client:
            await self._http.aclose()
        else:
            await trio.lowlevel.checkpoint()


# --------------------------------------------------------------------------- queue


@attrs.define(eq=False)
class _LaneCounters:
    offered: int = 0
    written: int = 0
    dropped_full: int = 0
    # Offered after drain() closed the queue, or still queued/in flight when it was cancelled.
    dropped_closed: int = 0
    # Records in batches that timed out or raised.
    failed: int = 0
    timeouts: int = 0
    errors: int = 0
    in_flight: int = 0


@attrs.define(eq=False)
class _Lane:
    sink: SideSink
    send: trio.MemorySendChannel[bytes]
    receive: trio.MemoryReceiveChannel[bytes]
    counters: _LaneCounters = attrs.field(factory=_LaneCounters)
    failing: bool = False


def _positive_int(_instance: object, attribute: attrs.Attribute[int], value: int) -> None:
    if value < 1:
        raise ValueError(f"{attribute.name} must be >= 1, got {value}")


def _positive_finite(_instance: object, attribute: attrs.Attribute[float], value: float) -> None:
    if not (value > 0 and math.isfinite(value)):
        raise ValueError(f"{attribute.name} must be a positive finite number, got {value}")


@attrs.define(eq=False)
class SideQueue:
    """Fans records out to sinks without ever blocking the producer.

    Each sink gets its own bounded channel of ``queue_size`` records and its own worker,
    which sends batches of up to ``batch_max`` records, each write bounded by ``timeout``
    seconds. Per-sink accounting always balances::

        offered == written + dropped_full + dropped_closed + failed + queued + in_flight
    """

    sinks: Sequence[SideSink]
    queue_size: int = attrs.field(default=1000, validator=_positive_int)
    timeout: float = attrs.field(default=2.0, validator=_positive_finite)
    batch_max: int = attrs.field(default=256, validator=_positive_int)
    _lanes: tuple[_Lane, ...] = attrs.field(init=False)
    _started: bool = attrs.field(default=False, init=False)
    _scope: trio.CancelScope | None = attrs.field(default=None, init=False)
    _done: trio.Event = attrs.field(factory=trio.Event, init=False)

    def __attrs_post_init__(self) -> None:
        names = [sink.name for sink in self.sinks]
        duplicates = sorted({n for n in names if names.count(n) > 1})
        if duplicates:
            raise ValueError(f"side sink names must be unique, duplicated: {duplicates}")
        lanes = []
        for sink in self.sinks:
            send, receive = trio.open_memory_channel[bytes](self.queue_size)
            lanes.append(_Lane(sink, send, receive))
        self._lanes = tuple(lanes)

    def offer(self, record: bytes) -> None:
        """Queue ``record`` for every sink. Synchronous: never blocks, never checkpoints.

        A sink whose queue is full drops the record (``dropped_full``); after :meth:`drain`
        began, records are dropped as ``dropped_closed``. Never raises.
        """
        for lane in self._lanes:
            counters = lane.counters
            counters.offered += 1
            try:
                lane.send.send_nowait(record)
            except trio.WouldBlock:
                counters.dropped_full += 1
            except (trio.ClosedResourceError, trio.BrokenResourceError):
                counters.dropped_closed += 1

    def stats(self) -> dict[str, dict[str, int]]:
        """Counters per sink name (a fresh dict; never blocks).

        Keys: ``offered``, ``written``, ``dropped_full``, ``dropped_closed``, ``failed``
        (records), ``timeouts``, ``errors`` (batches), gauges ``queued`` and ``in_flight``,
        plus any counters the sink reports itself (:class:`SinkCounters`).
        """
        out: dict[str, dict[str, int]] = {}
        for lane in self._lanes:
            row = attrs.asdict(lane.counters)
            row["queued"] = lane.send.statistics().current_buffer_used
            if isinstance(lane.sink, SinkCounters):
                row.update(lane.sink.counters())
            out[lane.sink.name] = row
        return out

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Run one worker per sink until :meth:`drain` finishes or the caller cancels.

        Ready (``task_status.started()``) once the workers are spawned. Closes every sink on
        exit (shielded, bounded by ``timeout``). Sink failures never propagate out of here.
        Raises ``RuntimeError`` if called twice.
        """
        if self._started:
            raise RuntimeError("SideQueue.run() may only be called once")
        self._started = True
        try:
            with trio.CancelScope() as scope:
                self._scope = scope
                async with trio.open_nursery() as nursery:
                    for lane in self._lanes:
                        nursery.start_soon(self._work, lane, name=f"side-sink:{lane.sink.name}")
                    task_status.started()
        finally:
            self._done.set()

    # The timeout is a flush budget, not an abort: when it runs out the workers are cancelled
    # and the leftovers counted, which a caller's cancel scope around drain() could not do.
    async def drain(self, timeout: float) -> bool:  # noqa: ASYNC109
        """Stop accepting records and let the workers flush what is queued.

        Returns ``True`` if every queued record was attempted (written or counted as failed)
        within ``timeout`` seconds; otherwise cancels the workers, counts what was left as
        ``dropped_closed`` and returns ``False``. Waits a further ``timeout`` (this queue's)
        at most for sinks to close. Checkpoint. If :meth:`run` never started, discards the
        queues and closes the sinks.
        """
        for lane in self._lanes:
            lane.send.close()
        if not self._started:
            flushed = all(lane.send.statistics().current_buffer_used == 0 for lane in self._lanes)
            for lane in self._lanes:
                self._discard(lane)
                await self._close_sink(lane)
            await trio.lowlevel.checkpoint()
            return flushed
        with trio.move_on_after(timeout):
            await self._done.wait()
            return True
        if self._scope is not None:
            self._scope.cancel()
        await self._done.wait()
        return False

    async def _work(self, lane: _Lane) -> None:
        receive = lane.receive
        try:
            async for first in receive:
                batch = [first]
                while len(batch) < self.batch_max:
                    try:
                        batch.append(receive.receive_nowait())
                    except (trio.WouldBlock, trio.EndOfChannel):
                        break
                await self._deliver(lane, batch)
        finally:
            self._discard(lane)
            await self._close_sink(lane)

    async def _deliver(self, lane: _Lane, batch: list[bytes]) -> None:
        counters = lane.counters
        size = len(batch)
        counters.in_flight = size
        settled = False
        try:
            with trio.move_on_after(self.timeout) as scope:
                try:
                    await lane.sink.write(batch)
                except Exception as exc:
                    counters.errors += 1
                    counters.failed += size
                    settled = True
                    self._note_failure(lane, f"raised {exc!r}")
                else:
                    counters.written += size
                    settled = True
                    if lane.failing:
                        lane.failing = False
                        log.info("side sink %r recovered", lane.sink.name)
            if scope.cancelled_caught:
                counters.timeouts += 1
                counters.failed += size
                settled = True
                self._note_failure(lane, f"timed out after {self.timeout}s")
        finally:
            counters.in_flight = 0
            if not settled:
                # Cancelled from outside (drain timeout or relay shutdown).
                counters.dropped_closed += size

    def _note_failure(self, lane: _Lane, what: str) -> None:
        # Log transitions only: a sink that is down for an hour must not flood the log.
        if not lane.failing:
            lane.failing = True
            log.warning(
                "side sink %r %s; dropping its records until it recovers", lane.sink.name, what
            )

    def _discard(self, lane: _Lane) -> None:
        # Records still buffered will never be written; count them before the channel closes.
        while True:
            try:
                lane.receive.receive_nowait()
            except (trio.WouldBlock, trio.EndOfChannel, trio.ClosedResourceError):
                break
            lane.counters.dropped_closed += 1
        lane.receive.close()

    async def _close_sink(self, lane: _Lane) -> None:
        with trio.move_on_after(self.timeout, shield=True):
            try:
                await lane.sink.aclose()
            except Exception:
                log.warning("side sink %r failed to close", lane.sink.name, exc_info=True)


# --------------------------------------------------------------------------- config


def parse_udp_target(target: str) -> tuple[str, int]:
    """Parse ``side_udp`` (``HOST:PORT``, IPv6 as ``[::1]:514``). Raises ``ValueError``."""
    host, sep, port_text = target.strip().rpartition(":")
    if not sep or not host or not port_text:
        raise ValueError(f"side_udp must be HOST:PORT, got {target!r}")
    if host.startswith("[") or host.endswith("]"):
        if not (host.startswith("[") and host.endswith("]")) or len(host) < 3:
            raise ValueError(f"side_udp has a malformed [IPv6] host: {target!r}")
        host = host[1:-1]
    elif ":" in host:
        raise ValueError(f"side_udp IPv6 hosts must be bracketed, like [::1]:514; got {target!r}")
    if not (port_text.isascii() and port_text.isdigit()):
        raise ValueError(f"side_udp port must be a number, got {port_text!r} in {target!r}")
    port = int(port_text)
    if not 1 <= port <= 65535:
        raise ValueError(f"side_udp port must be in 1..65535, got {port} in {target!r}")
    return host, port


def build_sinks(
    audit_file: str | None,
    udp: str | None,
    webhook: str | None,
    client: httpx.AsyncClient | None,
) -> list[SideSink]:
    """Sinks for the ``side_audit_file``, ``side_udp`` and ``side_webhook`` settings.

    Unset or empty settings are skipped. Does no I/O (files and sockets open on first
    write). Raises ``ValueError`` for a malformed UDP target or a non-http(s) webhook URL.
    """
    sinks: list[SideSink] = []
    if audit_file:
        sinks.append(AuditFileSink(audit_file))
    if udp:
        host, port = parse_udp_target(udp)
        sinks.append(UdpSink(host, port))
    if webhook:
        try:
            url = httpx.URL(webhook)
        except httpx.InvalidURL as exc:
            raise ValueError(f"side_webhook is not a valid URL: {webhook!r} ({exc})") from exc
        if url.scheme not in ("http", "https") or not url.host:
            raise ValueError(f"side_webhook must be an http(s) URL with a host, got {webhook!r}")
        sinks.append(WebhookSink(webhook, client))
    return sinks
