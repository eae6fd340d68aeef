"""Everything in relay-trio that depends on hypercorn's internals, and nothing else.

Hypercorn's public trio entry point (``hypercorn.trio.serve``) gives no control over
accepting connections, no deadline for a request in progress and no deadline for socket
writes. The HTTP front door needs all three (seed 002, issue 11 finding 4), so this module:

* runs hypercorn's own connection class through :func:`serve_http`, a copy of
  ``hypercorn.trio.serve`` + ``hypercorn.trio.run.worker_serve`` (plain TCP only) in which
  the caller supplies the accept loop (``trio.serve_listeners`` there logs a traceback
  every 100 ms while the process is out of file descriptors);
* subclasses ``TCPServer`` as :class:`RelayConnection`: write deadline
  (:class:`WriteWatchdog`), read deadline for a request in progress, the keep-alive fix
  below, and bookkeeping in a :class:`ConnectionTable` so that a full front door can
  close the oldest connection that is not serving a request.

Longer than 400 lines on purpose: every line that depends on hypercorn's
internals lives here, so an upgrade is reviewed in one file.

Nothing is monkeypatched: other hypercorn servers in the process keep hypercorn's
behaviour. Two guards keep the copy honest: :func:`check_hypercorn_version` refuses to run
outside the tested version range, and ``tests/test_hypercorn_patch.py`` recomputes the
sha256 of the source of every hypercorn function this module copies, overrides or relies
on (:data:`RELIED_ON_SOURCES`) and fails when hypercorn changes one of them: re-read the new
code, adjust this module, then record the new hashes.

Why idle keep-alive connections outlived ``keep_alive_timeout`` (issue 11): hypercorn arms
its keep-alive timer from ``H11Protocol._maybe_recycle``, which runs inside the ASGI
``send`` of the response's last chunk, i.e. in the application's task. Just before arming
it, hypercorn posts ``http.disconnect`` to the application; quart-trio's
``handle_messages`` task receives it and cancels the request nursery, so the timer's
``TrioSingleTask.restart`` (a lock and a ``nursery.start``, both checkpoints) raises
``Cancelled`` and the timer is never armed. With ``read_timeout = None`` nothing else closes
the connection. The same cancellation hits ``Closed`` (``send_eof`` checkpoints), which is
why a client that stopped mid-body got a 408 and a connection left open. The old
``protocol_send`` patch in ``_server.py`` was not the cause (plain hypercorn behaves the
same with this app), but it passed these events through unshielded.
:meth:`RelayConnection.protocol_send` handles ``Closed`` under a shield (bounded:
``shutdown(2)`` and ``close(2)``), and ``Updated`` without any checkpoint: the keep-alive
timer is one task per connection that re-reads when the connection went idle
(:meth:`RelayConnection._idle_timeout`), not a task started per request.
"""

from __future__ import annotations

import hashlib
import inspect
import logging
import os
from collections.abc import Awaitable, Callable
from importlib.metadata import version as dist_version
from math import inf
from typing import Any, Final

import attrs
import h11
import hypercorn.trio
import trio
from hypercorn.config import Config as HyperConfig
from hypercorn.events import Closed, Event, RawData, Updated
from hypercorn.protocol.h11 import H11Protocol
from hypercorn.trio import run as hypercorn_run
from hypercorn.trio.lifespan import Lifespan
from hypercorn.trio.statsd import StatsdLogger
from hypercorn.trio.tcp_server import MAX_RECV, TCPServer
from hypercorn.trio.worker_context import WorkerContext
from hypercorn.typing import ConnectionState, LifespanState
from hypercorn.utils import repr_socket_addr, wrap_app

log = logging.getLogger("relay_trio")

#: Hypercorn versions this module was read against: ``[low, high)``.
TESTED_RANGE: Final = ((0, 17), (0, 19))

#: sha256 of ``inspect.getsource`` of each hypercorn function this module copies,
#: overrides or whose behaviour it relies on, per reviewed hypercorn version.
RELIED_ON_SOURCES: Final[dict[str, dict[str, str]]] = {
    "0.18.0": {
        "hypercorn.trio.serve": "9b117d42d6cfa7efb9bf5797e6a710ffe1711bab4241514f77fb038758ac440d",
        "hypercorn.trio.run.worker_serve": "8dc8347a9fc357ca334f8c3e4bcf0368176510a96d434f21a5eb4c9ec4103726",
        "hypercorn.trio.tcp_server.TCPServer.run": "fd34b021d1a86c9859514de9472306ea47f4a6763732b26b7a5945278ded0e08",
        "hypercorn.trio.tcp_server.TCPServer.protocol_send": "225856426bff7be02990c0badb90f51f801db14ac5db0f3d0c210cafbeb528ab",
        "hypercorn.trio.tcp_server.TCPServer._read_data": "7ca747d922c65cf1fb6bd7ceabe82b0b51bb9de218ce159d7b7e093ec279f728",
        "hypercorn.trio.tcp_server.TCPServer._close": "bc73c4ae25a1ceec1d535639443b57b3d3dea8b03c5375d58bf9702b8056ee15",
        "hypercorn.protocol.h11.H11Protocol._maybe_recycle": "3ac53f52bc4e65de7e9b898df5c1c76c9865479e2821ed524acdf426c2075a88",
    },
    # Reviewed against 0.18.0: annotations differ, and TCPServer.run copies the state.
    "0.17.3": {
        "hypercorn.trio.serve": "b2bedde71197fea396d22de9204b67aa1f3f205e7b01264c8dbf743e91ae5a35",
        "hypercorn.trio.run.worker_serve": "22efe0285dc01572d27169c7c559b48e2404dfb33f602371ce57e2bf7cfcb682",
        "hypercorn.trio.tcp_server.TCPServer.run": "4f1af3593caa9d0e56da744af09d15aaee89187a3f12cf3d851239857d6fe1a4",
        "hypercorn.trio.tcp_server.TCPServer.protocol_send": "225856426bff7be02990c0badb90f51f801db14ac5db0f3d0c210cafbeb528ab",
        "hypercorn.trio.tcp_server.TCPServer._read_data": "1a0218d4101bba42596578c46afcbe3de0141b10946db4b880fdb1e512f1a79d",
        "hypercorn.trio.tcp_server.TCPServer._close": "bc73c4ae25a1ceec1d535639443b57b3d3dea8b03c5375d58bf9702b8056ee15",
        "hypercorn.protocol.h11.H11Protocol._maybe_recycle": "3ac53f52bc4e65de7e9b898df5c1c76c9865479e2821ed524acdf426c2075a88",
    },
}


class HypercornVersionError(RuntimeError):
    """The installed hypercorn is outside the range this module was written against."""


def _parse_version(text: str) -> tuple[int, ...]:
    parts: list[int] = []
    for piece in text.split("."):
        digits = "".join(ch for ch in piece if ch.isdigit())
        if not digits:
            break
        parts.append(int(digits))
        if digits != piece:
            break
    return tuple(parts)


def check_hypercorn_version(installed: str | None = None) -> str:
    """Return the installed hypercorn version; raise :class:`HypercornVersionError` when it
    is outside :data:`TESTED_RANGE` (the relay then refuses to start)."""
    text = dist_version("hypercorn") if installed is None else installed
    low, high = TESTED_RANGE
    if not low <= _parse_version(text) < high:
        raise HypercornVersionError(
            f"relay-trio's HTTP front door was written against hypercorn >= "
            f"{'.'.join(map(str, low))}, < {'.'.join(map(str, high))}, but hypercorn {text} "
            "is installed: its internals (relay_trio/http/hypercorn_patch.py) must be re-read "
            "before it can be used"
        )
    return text


def relied_on_functions() -> dict[str, Callable[..., Any]]:
    """The hypercorn functions named in :data:`RELIED_ON_SOURCES`, by qualified name."""
    return {
        "hypercorn.trio.serve": hypercorn.trio.serve,
        "hypercorn.trio.run.worker_serve": hypercorn_run.worker_serve,
        "hypercorn.trio.tcp_server.TCPServer.run": TCPServer.run,
        "hypercorn.trio.tcp_server.TCPServer.protocol_send": TCPServer.protocol_send,
        "hypercorn.trio.tcp_server.TCPServer._read_data": TCPServer._read_data,
        "hypercorn.trio.tcp_server.TCPServer._close": TCPServer._close,
        "hypercorn.protocol.h11.H11Protocol._maybe_recycle": H11Protocol._maybe_recycle,
    }


def source_hashes() -> dict[str, str]:
    """sha256 of the current source of every function in :func:`relied_on_functions`."""
    return {
        name: hashlib.sha256(inspect.getsource(func).encode()).hexdigest()
        for name, func in relied_on_functions().items()
    }


@attrs.define(eq=False)
class WriteWatchdog:
    """Closes HTTP connections whose current socket write has lasted ``timeout`` seconds.

    Seed 002: a client that stops reading must not hold a task or the shutdown. Hypercorn's
    trio worker writes under a shielded cancel scope with no deadline, so neither a
    cancelled request nor a graceful shutdown can interrupt a write to a peer that never
    reads. A per-write cancel scope would fix that but costs a deadline registration on
    every write (measured: ~14% of SSE fan-out time). Instead each write only stamps its
    start in a dict, and this one task sweeps it every ``timeout / 4`` and closes the
    socket of any write older than ``timeout``: the blocked ``send_all`` then fails with
    ``ClosedResourceError`` and hypercorn tears the connection down. A stuck write is
    cut between ``timeout`` and ``1.25 * timeout`` after it started.
    """

    timeout: float
    writing: dict[RelayConnection, float] = attrs.field(factory=dict)
    closed: int = 0

    def sweep(self, now: float, *, older_than: float | None = None) -> int:
        """Close every connection whose write started ``older_than`` (default: ``timeout``)
        seconds ago or earlier. ``older_than=0`` cuts every write in progress (used when
        the server is being cancelled anyway). Never blocks."""
        limit = self.timeout if older_than is None else older_than
        stuck = [conn for conn, started in self.writing.items() if now - started >= limit]
        for conn in stuck:
            del self.writing[conn]
            conn.close_socket()
        if stuck:
            self.closed += len(stuck)
            log.info("closed %d connection(s) whose peer stopped reading", len(stuck))
        return len(stuck)

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Sweep every ``timeout / 4`` until cancelled."""
        task_status.started()
        while True:
            await trio.sleep(self.timeout / 4)
            self.sweep(trio.current_time())


@attrs.define(eq=False)
class ConnectionTable:
    """The open HTTP connections, and which of them could be closed to make room.

    A connection is *waiting* while it is not serving a request: new (no complete request
    head yet), receiving a request head or body, or idle between keep-alive requests. It
    is *serving* from the moment its request is complete until its response has ended
    (SSE streams included). :meth:`evict_oldest_waiting` closes the connection that has
    been waiting longest; serving connections are never evicted. Never blocks.
    """

    open: dict[RelayConnection, None] = attrs.field(factory=dict)
    waiting: dict[RelayConnection, None] = attrs.field(factory=dict)
    evicted: int = 0
    read_timeouts: int = 0

    def __len__(self) -> int:
        return len(self.open)

    def add(self, conn: RelayConnection) -> None:
        """Count a new connection (waiting for its first request)."""
        self.open[conn] = None
        self.waiting[conn] = None

    def discard(self, conn: RelayConnection) -> None:
        """Forget a connection (idempotent)."""
        self.open.pop(conn, None)
        self.waiting.pop(conn, None)

    def mark(self, conn: RelayConnection, *, waiting: bool) -> None:
        """Record whether ``conn`` is waiting (evictable) or serving."""
        if conn not in self.open:
            return
        if not waiting:
            self.waiting.pop(conn, None)
        elif conn not in self.waiting:
            self.waiting[conn] = None

    def evict_oldest_waiting(self) -> bool:
        """Close the connection that has waited longest; False if every one is serving."""
        if not self.waiting:
            return False
        conn = next(iter(self.waiting))
        self.discard(conn)
        conn.close_socket()
        self.evicted += 1
        return True


@attrs.frozen
class FrontDoorPolicy:
    """What every HTTP connection of one server shares: its deadlines and its table."""

    read_timeout: float
    watchdog: WriteWatchdog
    table: ConnectionTable = attrs.field(factory=ConnectionTable)


class RelayConnection(TCPServer):
    """Hypercorn's trio connection with a write deadline, a read deadline for a request in
    progress, a keep-alive timer that is really armed, and table bookkeeping.

    Read deadline: a new connection must deliver a complete request head within
    ``read_timeout``; afterwards the deadline runs from the first byte of each request
    until its body is complete. A response in progress (SSE included) has no read deadline
    (the write deadline and heartbeats govern it), and an idle keep-alive connection is
    closed by hypercorn's keep-alive timer. When the read deadline passes, the socket is
    closed at once (the peer sees EOF; no response is attempted).
    Only HTTP/1.1 has a read deadline; HTTP/2 connections (prior knowledge only: no TLS
    here) are governed by the keep-alive timer and count as waiting (evictable).
    """

    def __init__(
        self,
        app: Any,
        config: HyperConfig,
        context: WorkerContext,
        state: ConnectionState,
        stream: trio.SocketStream,
        *,
        policy: FrontDoorPolicy,
    ) -> None:
        # hypercorn annotates ``stream`` as an SSLStream but handles plain sockets too.
        super().__init__(app, config, context, state, stream)  # type: ignore[arg-type]
        self.policy = policy
        self.read_deadline = trio.current_time() + policy.read_timeout
        # The keep-alive timer (see _idle_timeout): idle until the first request.
        self._idle_since: float | None = trio.current_time()
        self._idle_changed: trio.Event | None = None

    def close_socket(self) -> None:
        """Close the socket now (never blocks): a blocked read or write fails at once and
        hypercorn tears the connection down; the file descriptor is freed immediately."""
        socket = getattr(self.stream, "socket", None)
        if socket is not None:
            socket.close()

    def _request_phase(self) -> tuple[bool, bool]:
        """``(waiting, request_in_progress)`` from the HTTP/1.1 state machine."""
        protocol = getattr(getattr(self, "protocol", None), "protocol", None)
        connection = getattr(protocol, "connection", None)
        if not isinstance(protocol, H11Protocol) or not isinstance(connection, h11.Connection):
            return True, False
        theirs = connection.their_state
        if theirs is h11.SEND_BODY:
            return True, True
        if theirs is h11.IDLE:
            return True, bool(connection.trailing_data[0])
        if theirs is h11.DONE or theirs is h11.MUST_CLOSE:
            return False, False
        return True, False

    def _track(self) -> None:
        waiting, in_progress = self._request_phase()
        self.policy.table.mark(self, waiting=waiting)
        if not in_progress:
            self.read_deadline = inf
        elif self.read_deadline == inf:
            self.read_deadline = trio.current_time() + self.policy.read_timeout

    async def protocol_send(self, event: Event) -> None:
        """Hypercorn's ``protocol_send`` with a deadline on writes and shielded bookkeeping.

        A ``RawData`` frame is written all or nothing with respect to cancellation: either
        the whole frame reaches the socket, or none of it does (cancelled before the first
        byte), or the connection is closed (the write deadline cut it). ``Updated`` and
        ``Closed`` run shielded (see the module docstring for why).
        """
        if isinstance(event, RawData):
            await self._send_frame(event.data)
        elif isinstance(event, Closed):
            with trio.CancelScope(shield=True):
                await self._close()
            await self.protocol.handle(Closed())
        elif isinstance(event, Updated):
            self._track()
            # No checkpoint: a cancellation here (quart-trio cancels the request task
            # while hypercorn recycles the connection) must not skip the bookkeeping.
            self._set_idle(event.idle)

    def _set_idle(self, idle: bool) -> None:
        """Record that the connection went idle (now) or started serving a request.
        Synchronous and O(1): two attribute writes, no deadline to move (the timer task
        re-reads this when its deadline passes)."""
        if idle:
            self._idle_since = trio.current_time()
            if self._idle_changed is not None:
                self._idle_changed.set()
        else:
            self._idle_since = None

    async def _idle_timeout(self) -> None:
        """The keep-alive timer: ONE task per connection (hypercorn's ``run`` starts it once)
        instead of hypercorn's new task per request (a lock and a ``nursery.start`` each
        time: measured ~300 us of CPU per request, ~40% of a single-report POST).

        Lazy: a request only records when the connection went idle (:meth:`_set_idle`);
        this task sleeps until the recorded moment plus ``keep_alive_timeout`` and then
        looks again, so a busy connection costs nothing per request. Closes the connection
        once it has been idle for ``keep_alive_timeout``, or when the server terminates (a
        request in progress is let finish first), like hypercorn's timer."""
        terminated = self.context.terminated
        keep_alive = self.config.keep_alive_timeout
        while True:
            since = self._idle_since
            if since is None:
                # Serving a request: nothing to time until it is done.
                self._idle_changed = trio.Event()
                await self._idle_changed.wait()
                self._idle_changed = None
                continue
            with trio.move_on_at(since + keep_alive) as scope:
                await terminated.wait()
            if self._idle_since is None:
                continue  # a request started meanwhile
            if scope.cancelled_caught and self._idle_since != since:
                continue  # idle again since a later request: time from then
            break  # idle for keep_alive_timeout, or terminated while idle
        with trio.CancelScope(shield=True):
            await self.protocol.handle(Closed())
            await self.stream.aclose()

    async def _send_frame(self, data: bytes) -> None:
        # Fast path: a response or SSE chunk almost always fits the socket buffer. One
        # non-blocking write needs neither the send lock's checkpoint, send_all's
        # shielded checkpoint nor a watchdog entry (measured on SSE fan-out: ~100 -> ~60 us
        # per write, CPU 70% -> 43%). Only when nobody else is writing on this connection
        # (order is kept), and only on plain TCP.
        socket = getattr(self.stream, "socket", None)
        if socket is not None and data and not self.send_lock.locked():
            try:
                sent = os.write(socket.fileno(), data)
            except BlockingIOError:
                sent = 0
            except OSError:
                await self.protocol.handle(Closed())
                return
            if sent == len(data):
                # Still a checkpoint for cancellation, without a scheduler round trip.
                await trio.lowlevel.checkpoint_if_cancelled()
                return
            if sent:
                # Part of the frame is on the wire: a cancellation now would tear it and
                # every later frame would be garbage to the peer. Take the lock without a
                # checkpoint (it was free and nothing ran since) and finish under a shield;
                # the watchdog bounds the wait, and if it cuts the write the connection is
                # closed rather than left with a torn frame.
                with trio.CancelScope(shield=True):
                    self.send_lock.acquire_nowait()
                    try:
                        ok = await self._send_all_timed(data[sent:])
                    finally:
                        self.send_lock.release()
                if not ok:
                    await self.protocol.handle(Closed())
                return
        async with self.send_lock:
            ok = await self._send_all_timed(data)
            if not ok:
                await self.protocol.handle(Closed())

    async def _send_all_timed(self, data: bytes) -> bool:
        """Write ``data`` shielded, under the watchdog's deadline; False if the connection
        broke or the watchdog cut it."""
        watchdog = self.policy.watchdog
        watchdog.writing[self] = trio.current_time()
        try:
            with trio.CancelScope(shield=True):
                await self.stream.send_all(data)
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            return False
        finally:
            watchdog.writing.pop(self, None)
        return True

    async def _read_data(self) -> None:
        """Hypercorn's read loop with a read deadline for a request in progress.

        Returns when the peer closes, the socket is closed (evicted, keep-alive timer,
        write deadline) or the read deadline passes. On the way out the keep-alive timer is
        stopped, so the connection's task group (and its file descriptor) does not wait
        for it after the peer has gone.
        """
        while True:
            with trio.CancelScope(deadline=self.read_deadline) as scope:
                try:
                    data = await self.stream.receive_some(MAX_RECV)
                except (trio.ClosedResourceError, trio.BrokenResourceError):
                    break
            if scope.cancelled_caught:
                self.policy.table.read_timeouts += 1
                self.policy.table.discard(self)
                self.close_socket()
                break
            await self.protocol.handle(RawData(bytes(data)))
            if data == b"":
                break
            self._track()
        with trio.CancelScope(shield=True):
            await self.idle_task.stop()
        await self.protocol.handle(Closed())


#: The accept loop a caller gives :func:`serve_http`: it accepts from ``listener`` and
#: hands each admitted stream to the callback (which starts the connection at once).
AcceptLoop = Callable[[trio.SocketListener, Callable[[trio.SocketStream], None]], Awaitable[None]]


async def serve_http(
    app: Any,
    config: HyperConfig,
    policy: FrontDoorPolicy,
    accept_loop: AcceptLoop,
    *,
    shutdown_trigger: Callable[[], Awaitable[None]],
    task_status: trio.TaskStatus[list[str]] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Serve an ASGI app like ``hypercorn.trio.serve`` (plain TCP, HTTP/1.1 and h2c), with
    :class:`RelayConnection` connections accepted by ``accept_loop``.

    Reports the bound ``http://HOST:PORT`` URLs through ``task_status``; returns after
    ``shutdown_trigger`` returns and the connections have finished (at most
    ``config.graceful_timeout`` later) and the app's lifespan has shut down.
    Raises :class:`HypercornVersionError` before binding anything on an untested hypercorn.
    """
    check_hypercorn_version()
    if config.ssl_enabled or config.max_requests is not None:
        raise ValueError("serve_http supports plain TCP without max_requests only")
    asgi = wrap_app(app, config.wsgi_max_body_size, None)
    config.set_statsd_logger_class(StatsdLogger)
    lifespan_state: LifespanState = {}
    lifespan = Lifespan(asgi, config, lifespan_state)
    context = WorkerContext(None)

    async with trio.open_nursery() as lifespan_nursery:
        await lifespan_nursery.start(lifespan.handle_lifespan)
        await lifespan.wait_for_startup()

        async with trio.open_nursery() as server_nursery:
            listeners: list[trio.SocketListener] = []
            binds: list[str] = []
            for sock in config.create_sockets().insecure_sockets:
                sock.listen(config.backlog)
                listeners.append(trio.SocketListener(trio.socket.from_stdlib_socket(sock)))
                binds.append(f"http://{repr_socket_addr(sock.family, sock.getsockname())}")
            # One state object for every connection, as hypercorn does per listener.
            state = ConnectionState(lifespan_state.copy())

            async def run_connection(conn: RelayConnection) -> None:
                try:
                    await conn.run()
                finally:
                    policy.table.discard(conn)
                    # hypercorn's own close (send_eof, then aclose) is skipped when a
                    # cancellation arrives at send_eof (server shutting down as the
                    # connection starts): never leave the descriptor to the GC.
                    conn.close_socket()

            def start_connection(stream: trio.SocketStream) -> None:
                conn = RelayConnection(asgi, config, context, state, stream, policy=policy)
                policy.table.add(conn)
                server_nursery.start_soon(run_connection, conn)

            task_status.started(binds)
            try:
                async with trio.open_nursery() as accepting:
                    for listener in listeners:
                        accepting.start_soon(accept_loop, listener, start_connection)
                    await shutdown_trigger()
                    accepting.cancel_scope.cancel()
            finally:
                for listener in listeners:
                    listener.socket.close()
                await context.terminated.set()
                server_nursery.cancel_scope.deadline = trio.current_time() + config.graceful_timeout

        await lifespan.wait_for_shutdown()
        lifespan_nursery.cancel_scope.cancel()
