"""Stream receiver: the Trio service that serves NDJSON report streams over TCP, Unix
sockets and VSOCK.

Agents that keep a connection open (VM scanners talking VSOCK, local daemons on a Unix
socket) send one report per line and read one reply line per report, in order. Every line
goes through the same :class:`~relay_trio.core.model.Admitter` as ``POST /v1/reports``, so the
stream door can never bypass the ingest token, the rate limit or validation.

This module owns the I/O: listeners, connection slots, idle and write deadlines, draining.
The wire protocol itself (framing, handshake, replies, line numbers) is the sans-I/O
:class:`~relay_trio.core.line_protocol.LineConnection`; listen URLs are parsed by
:mod:`relay_trio.core.listen`, sockets opened by :mod:`relay_trio.stream.listeners`.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Awaitable, Callable, Sequence
from typing import Any

import attrs
import trio

from ..core.identity import Identity, check_peer_cid
from ..core.line_protocol import (
    LineConnection,
    LineCounters,
    idle_timeout,
    problem_line,
    shutting_down,
    token_digest,
    too_many_connections,
)
from ..core.listen import ListenAddress
from ..core.model import Accepted, Admitter, Problem
from .listeners import (
    ACCEPT_CAPACITY_ERRNOS,
    describe_bound,
    open_listeners,
    peer_identity,
    unlink_if_same,
)

__all__ = ["ReceiverLimits", "StreamReceiver"]

log = logging.getLogger(__name__)

#: Admits decoded reports in order, awaiting their storage (cluster mode).
AdmitMany = Callable[[list[object]], Awaitable[list[Accepted | Problem]]]


def _count_nothing(_reason: str) -> None:
    pass


def _positive(_inst: object, attribute: attrs.Attribute[Any], value: float) -> None:
    if not (value > 0 and math.isfinite(value)):
        raise ValueError(f"{attribute.name} must be a positive finite number, got {value!r}")


@attrs.frozen
class ReceiverLimits:
    """Bounds for the stream receiver. Every field is a hard cap.

    ``max_waiting`` bounds how many connections may wait for a slot at once (more are
    refused immediately), so a connection flood cannot pile up tasks for ``slot_wait``.
    Writes use ``idle_timeout`` as their deadline.
    """

    max_connections: int = attrs.field(default=50, validator=_positive)
    slot_wait: float = attrs.field(default=5.0, validator=_positive)
    idle_timeout: float = attrs.field(default=10.0, validator=_positive)
    max_frame: int = attrs.field(default=16 * 1024 * 1024, validator=_positive)
    read_chunk: int = attrs.field(default=64 * 1024, validator=_positive)
    max_waiting: int = attrs.field(default=50, validator=_positive)


# --------------------------------------------------------------------------- service


@attrs.define(eq=False)
class StreamReceiver:
    """Accepts NDJSON report streams and feeds each line to ``admitter``.

    ``token`` is the relay's ``ingest_token``: when set, every connection on every listener
    must open with the ``{"token": ...}`` handshake before anything it sends is admitted.
    ``count_refused(reason)`` is called for each line refused before admission (malformed,
    too large, failed handshake, another guest's resource), so that the relay's
    ``received = admitted + rejected`` holds for this door as for HTTP. With ``admit_many``
    (cluster mode) the reports of each read are admitted in one awaited call instead, and
    their reply lines are written once it returns (each ``Accepted`` is stored by then).

    Start with ``bound = await nursery.start(receiver.run)``; stop with
    :meth:`stop_accepting` then ``await`` :meth:`drain`.
    """

    addresses: Sequence[ListenAddress]
    admitter: Admitter
    limits: ReceiverLimits = attrs.field(factory=ReceiverLimits)
    token: str | None = attrs.field(default=None, repr=False)
    count_refused: Callable[[str], None] = _count_nothing
    #: Cluster mode: admits the reports of one read in one awaited call, each ``Accepted``
    #: already stored (JetStream publish acknowledged); ``admitter.admit`` is then unused.
    admit_many: AdmitMany | None = None

    #: The real bound addresses (e.g. ``tcp://127.0.0.1:41234``), set before ``started``.
    bound: list[str] = attrs.field(init=False, factory=list)
    connections_open: int = attrs.field(init=False, default=0)
    connections_refused: int = attrs.field(init=False, default=0)
    idle_timeouts: int = attrs.field(init=False, default=0)
    lines: LineCounters = attrs.field(init=False, factory=LineCounters)

    _token_digest: bytes | None = attrs.field(init=False, default=None)
    _slots: trio.CapacityLimiter = attrs.field(init=False)
    _listeners: list[trio.SocketListener] = attrs.field(init=False, factory=list)
    _stopping: bool = attrs.field(init=False, default=False)
    # Both sets hold at most one scope per live connection (bounded by the slot limiter
    # plus max_waiting), so caller input cannot grow them.
    _conn_scopes: set[trio.CancelScope] = attrs.field(init=False, factory=set)
    _idle_reads: set[trio.CancelScope] = attrs.field(init=False, factory=set)
    _all_done: trio.Event = attrs.field(init=False, factory=trio.Event)

    def __attrs_post_init__(self) -> None:
        self._slots = trio.CapacityLimiter(self.limits.max_connections)
        self._all_done.set()
        if self.token is not None:
            if not self.token:
                # An empty token would make the handshake accept {"token": ""}.
                raise ValueError("the stream receiver's token must not be empty")
            self._token_digest = token_digest(self.token)

    @property
    def lines_ok(self) -> int:
        """Lines admitted, over every connection."""
        return self.lines.lines_ok

    @property
    def lines_rejected(self) -> int:
        """Lines answered with a problem, over every connection."""
        return self.lines.lines_rejected

    @property
    def frames_too_large(self) -> int:
        """Lines answered 413 (each closed its connection)."""
        return self.lines.frames_too_large

    @property
    def auth_failures(self) -> int:
        """Connections closed for a missing or wrong token."""
        return self.lines.auth_failures

    @property
    def buffer_high_water(self) -> int:
        """Largest per-connection read buffer seen; never exceeds max_frame + read_chunk."""
        return self.lines.buffer_high_water

    def counters(self) -> dict[str, int]:
        """A snapshot of the counters (for /v1/status and /metrics). Never blocks."""
        return {
            "connections_open": self.connections_open,
            "connections_refused": self.connections_refused,
            "lines_ok": self.lines_ok,
            "lines_rejected": self.lines_rejected,
            "idle_timeouts": self.idle_timeouts,
            "frames_too_large": self.frames_too_large,
            "auth_failures": self.auth_failures,
            "buffer_high_water": self.buffer_high_water,
        }

    # ------------------------------------------------------------------ lifecycle

    async def run(
        self, *, task_status: trio.TaskStatus[list[str]] = trio.TASK_STATUS_IGNORED
    ) -> None:
        """Open every listener, report ``started(bound)``, serve until stopped.

        Raises OSError if a tcp/unix address cannot be bound (nothing is left open). A
        VSOCK address the kernel does not support is skipped with one warning. Returns
        once :meth:`stop_accepting` was called and every connection has ended.
        """
        unix_paths: list[tuple[str, int]] = []
        opened: list[tuple[trio.SocketListener, ListenAddress]] = []
        try:
            for address in self.addresses:
                for listener in await open_listeners(address, unix_paths):
                    opened.append((listener, address))
                    self._listeners.append(listener)
            self.bound = [describe_bound(listener, a) for listener, a in opened]
            for url in self.bound:
                log.info("stream receiver listening on %s", url)
            async with trio.open_nursery() as nursery:
                for listener, address in opened:
                    nursery.start_soon(self._accept_loop, listener, address, nursery)
                if self._stopping:
                    self._close_listeners()
                task_status.started(list(self.bound))
        finally:
            self._close_listeners()
            for path, inode in unix_paths:
                unlink_if_same(path, inode)

    def stop_accepting(self) -> None:
        """Close every listener and end idle connections. Never blocks; idempotent.

        A connection in the middle of a line may finish that line and gets its replies;
        a connection waiting for its next line is sent a 503 ``shutting-down`` line and
        closed.
        """
        self._stopping = True
        self._close_listeners()
        for scope in list(self._idle_reads):
            scope.cancel()

    # The timeout is a grace period before cancelling connections (like hypercorn's
    # graceful_timeout), not a deadline for this call, so a cancel scope cannot replace it.
    async def drain(self, timeout: float) -> None:  # noqa: ASYNC109
        """Stop accepting, wait up to ``timeout`` seconds for connections to end, then
        cancel the rest and wait for them to close. Always a checkpoint.
        """
        self.stop_accepting()
        with trio.move_on_after(timeout):
            await self._all_done.wait()
        for scope in list(self._conn_scopes):
            scope.cancel()
        await self._all_done.wait()

    def _close_listeners(self) -> None:
        # trio's socket close() is synchronous and wakes a task blocked in accept()
        # with ClosedResourceError, which ends its accept loop.
        for listener in self._listeners:
            listener.socket.close()

    async def _accept_loop(
        self, listener: trio.SocketListener, address: ListenAddress, nursery: trio.Nursery
    ) -> None:
        listen_url = address.url
        while True:
            try:
                stream = await listener.accept()
            except trio.ClosedResourceError:
                return
            except OSError as exc:
                if exc.errno not in ACCEPT_CAPACITY_ERRNOS:
                    raise
                # Out of descriptors: back off instead of spinning; existing
                # connections keep working and will free descriptors.
                log.warning("stream receiver accept on %s: %s; pausing 100 ms", listen_url, exc)
                await trio.sleep(0.1)
                continue
            nursery.start_soon(self._connection_task, stream, peer_identity(stream, address))

    async def _connection_task(self, stream: trio.SocketStream, identity: Identity) -> None:
        try:
            await self.handle_stream(stream, identity)
        except Exception:
            # One broken connection (or a bug in the admitter) must not take down the
            # listener and every other agent's connection with it.
            log.exception("stream receiver: connection from %s failed", identity.peer)

    # ------------------------------------------------------------------ one connection

    async def handle_stream(self, stream: trio.abc.Stream, identity: Identity) -> None:
        """Serve one connection until EOF, idle timeout, an oversized frame, a failed
        token, shutdown or cancellation by :meth:`drain`.

        Always closes ``stream``. A peer that vanishes (BrokenResourceError) ends the
        connection quietly. Waits at most ``slot_wait`` for a connection slot; every write
        has a deadline of ``idle_timeout``. Always a checkpoint.
        """
        scope = trio.CancelScope()
        self._conn_scopes.add(scope)
        if len(self._conn_scopes) == 1:
            self._all_done = trio.Event()
        try:
            with scope:
                await self._admit_connection(stream, identity)
        except trio.BrokenResourceError:
            pass
        finally:
            self._conn_scopes.discard(scope)
            if not self._conn_scopes:
                self._all_done.set()
            await trio.aclose_forcefully(stream)

    async def _admit_connection(self, stream: trio.abc.Stream, identity: Identity) -> None:
        lim = self.limits
        if identity.cid is not None and (problem := check_peer_cid(identity.cid)):
            await self._refuse(stream, identity, problem)
            return
        if self._slots.statistics().tasks_waiting >= lim.max_waiting:
            detail = (
                f"{lim.max_connections} connections open and "
                f"{lim.max_waiting} already waiting for a slot"
            )
            await self._refuse(stream, identity, too_many_connections(detail))
            return
        acquired = False
        with trio.move_on_after(lim.slot_wait):
            await self._slots.acquire()
            acquired = True
        if not acquired:
            detail = f"all {lim.max_connections} connection slots busy for {lim.slot_wait:g}s"
            await self._refuse(stream, identity, too_many_connections(detail))
            return
        self.connections_open += 1
        try:
            await self._serve_lines(stream, identity)
        finally:
            self.connections_open -= 1
            self._slots.release()

    async def _refuse(self, stream: trio.abc.Stream, identity: Identity, problem: Problem) -> None:
        self.connections_refused += 1
        log.debug(
            "stream receiver refused %s on %s: %s", identity.peer, identity.listen, problem.slug
        )
        await self._send(stream, problem_line(problem))

    async def _send(self, stream: trio.abc.Stream, data: bytes) -> bool:
        """Write with a deadline: a client that stops reading cannot hold the task."""
        if not data:
            return True
        with trio.move_on_after(self.limits.idle_timeout):
            await stream.send_all(data)
            return True
        log.debug("stream receiver: write deadline passed, closing")
        return False

    async def _serve_lines(self, stream: trio.abc.Stream, identity: Identity) -> None:
        lim = self.limits
        conn = LineConnection(
            self.admitter.admit,
            lim.max_frame,
            token=self._token_digest,
            cid=identity.cid,
            counters=self.lines,
            count_refused=self.count_refused,
        )
        deadline = trio.current_time() + lim.idle_timeout
        while True:
            if self._stopping and not conn.mid_line:
                await self._send(stream, problem_line(shutting_down()))
                return
            with trio.CancelScope(deadline=deadline) as read_scope:
                # Only a connection between lines may be woken by stop_accepting();
                # one mid-line is allowed to finish that line.
                if not conn.mid_line:
                    self._idle_reads.add(read_scope)
                try:
                    chunk = await stream.receive_some(lim.read_chunk)
                finally:
                    self._idle_reads.discard(read_scope)
            if read_scope.cancelled_caught:
                if self._stopping and not conn.mid_line:
                    continue
                self.idle_timeouts += 1
                await self._send(stream, problem_line(idle_timeout(lim.idle_timeout)))
                return
            lines_before, admitted_before = conn.lines_read, conn.admitted
            if self.admit_many is None:
                with self.admitter.batch():  # one store change set per read
                    out = conn.receive_data(chunk) if chunk else conn.receive_eof()
            else:
                batch = conn.read_data(chunk) if chunk else conn.read_eof()
                # One call per read: the window of lines decided and stored together.
                results = await self.admit_many(batch.reports) if batch.reports else []
                out = conn.answer(batch, results)
            if conn.lines_read != lines_before:
                # Only a complete line (a blank keepalive too) resets the idle deadline:
                # a slowloris dribbling bytes without a newline is cut off on time.
                deadline = trio.current_time() + lim.idle_timeout
            if conn.admitted != admitted_before and self.admit_many is None:
                # No reply says "accepted" before the store has the report.
                await self.admitter.durable()
            if not await self._send(stream, out) or conn.closed:
                return
