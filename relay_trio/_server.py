"""Running a relay: hypercorn on the trio worker, signals, staged shutdown.

``serve`` is a server function in hypercorn's style: it reports readiness (the bound
URLs) through ``task_status.started`` and returns once shutdown has finished.
"""

from __future__ import annotations

import gc
import logging
import os
import signal
from collections.abc import Callable
from functools import partial

import attrs
import hypercorn.trio
import trio
from hypercorn.config import Config as HyperConfig
from hypercorn.events import Closed, Event, RawData
from hypercorn.trio import tcp_server

from ._app import create_app
from ._config import RelayConfig
from ._listen import parse_listen
from ._receiver import ReceiverLimits, StreamReceiver
from ._relay import Relay

log = logging.getLogger("relay_trio")


_WATCHDOG_ATTR = "relay_trio_write_watchdog"


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
    writing: dict[tcp_server.TCPServer, float] = attrs.field(factory=dict)
    closed: int = 0

    def sweep(self, now: float, *, older_than: float | None = None) -> int:
        """Close every connection whose write started ``older_than`` (default: ``timeout``)
        seconds ago or earlier. ``older_than=0`` cuts every write in progress (used when
        the server is being cancelled anyway). Never blocks."""
        limit = self.timeout if older_than is None else older_than
        stuck = [srv for srv, started in self.writing.items() if now - started >= limit]
        for srv in stuck:
            del self.writing[srv]
            socket = getattr(srv.stream, "socket", None)
            if socket is not None:
                socket.close()
        if stuck:
            self.closed += len(stuck)
            log.info("closed %d connection(s) whose peer stopped reading", len(stuck))
        return len(stuck)

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        task_status.started()
        while True:
            await trio.sleep(self.timeout / 4)
            self.sweep(trio.current_time())


def install_write_watchdog() -> None:
    """Route hypercorn's socket writes through :class:`WriteWatchdog` (idempotent).

    Only servers whose config carries a ``relay_trio_write_watchdog`` are affected; other
    hypercorn servers in the process keep hypercorn's behaviour.
    """
    if getattr(tcp_server.TCPServer, "_relay_trio_watchdog", False):
        return
    if not hasattr(tcp_server.TCPServer, "protocol_send"):
        log.warning("this hypercorn has no TCPServer.protocol_send: HTTP writes have no deadline")
        return
    original = tcp_server.TCPServer.protocol_send

    async def protocol_send(self: tcp_server.TCPServer, event: Event) -> None:
        watchdog: WriteWatchdog | None = getattr(self.config, _WATCHDOG_ATTR, None)
        if watchdog is None or not isinstance(event, RawData):
            await original(self, event)
            return
        # Fast path: a response or SSE chunk almost always fits the socket buffer. One
        # non-blocking write needs neither the send lock's checkpoint, send_all's
        # shielded checkpoint nor a watchdog entry (measured on SSE fan-out: ~100 -> ~60 us
        # per write, CPU 70% -> 43%). Only when nobody else is writing on this connection
        # (order is kept), and only on plain TCP (TLS keeps hypercorn's path). What does
        # not fit goes through the slow path below, timed by the watchdog.
        socket = getattr(self.stream, "socket", None)
        if socket is not None and not self.send_lock.locked() and event.data:
            data = event.data
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
            event = RawData(data=data[sent:])
        async with self.send_lock:
            watchdog.writing[self] = trio.current_time()
            try:
                with trio.CancelScope(shield=True):
                    await self.stream.send_all(event.data)
            except (trio.BrokenResourceError, trio.ClosedResourceError):
                await self.protocol.handle(Closed())
            finally:
                watchdog.writing.pop(self, None)

    tcp_server.TCPServer.protocol_send = protocol_send  # type: ignore[method-assign]
    tcp_server.TCPServer._relay_trio_watchdog = True  # type: ignore[attr-defined]


def hypercorn_config(config: RelayConfig, watchdog: WriteWatchdog | None = None) -> HyperConfig:
    """Hypercorn settings derived from the relay's: bind, limits and timeouts."""
    hyper = HyperConfig()
    hyper.bind = [f"{config.host}:{config.port}"]
    hyper.accesslog = None
    hyper.errorlog = logging.getLogger("hypercorn.error")
    hyper.include_server_header = False
    # Header limits: a request head over 64 KiB is refused by h11 before routing.
    hyper.h11_max_incomplete_size = 64 * 1024
    hyper.keep_alive_timeout = 75
    # Shutdown closes SSE streams first, so the graceful wait covers only short requests.
    hyper.graceful_timeout = min(5.0, config.shutdown_timeout * 0.15)
    # No read timeout: an SSE client legitimately sends nothing after its request, and
    # hypercorn's read timeout would close it. Idle keep-alive connections are bounded by
    # keep_alive_timeout, and writes by the deadline below.
    hyper.read_timeout = None
    if watchdog is not None:
        setattr(hyper, _WATCHDOG_ATTR, watchdog)
        install_write_watchdog()
    return hyper


@attrs.define(eq=False)
class RelayServer:
    """A relay plus its front doors (HTTP, stream receiver), run by :meth:`serve`."""

    config: RelayConfig
    relay: Relay = attrs.field(
        default=attrs.Factory(lambda self: Relay(self.config), takes_self=True)
    )
    receiver: StreamReceiver | None = attrs.field(init=False, default=None)
    urls: list[str] = attrs.field(init=False, factory=list)
    watchdog: WriteWatchdog = attrs.field(
        init=False,
        default=attrs.Factory(
            lambda self: WriteWatchdog(self.config.write_timeout), takes_self=True
        ),
    )
    exit_reason: str = attrs.field(init=False, default="")

    def __attrs_post_init__(self) -> None:
        if self.config.stream_listen:
            c = self.config
            self.receiver = StreamReceiver(
                [parse_listen(url) for url in c.stream_listen],
                self.relay,
                ReceiverLimits(
                    max_connections=c.stream_max_connections,
                    slot_wait=c.stream_slot_wait,
                    idle_timeout=c.stream_idle_timeout,
                    max_frame=c.stream_max_frame,
                ),
                token=c.ingest_token,
                count_refused=self.relay.metrics.count_refused,
            )

    async def serve(
        self,
        *,
        install_signal_handlers: bool = False,
        task_status: trio.TaskStatus[list[str]] = trio.TASK_STATUS_IGNORED,
    ) -> None:
        """Serve until shutdown is requested (signal or ``/admin/shutdown``), then drain.

        Shutdown is staged and bounded by ``shutdown_timeout``: stop admitting (503),
        finish in-flight sends, flush pending work per ``shutdown_flush``, send the
        ``system`` ``shutdown`` event to every SSE subscriber, stop HTTP, cancel the rest.
        A second signal cancels at once.
        """
        relay = self.relay
        app = create_app(relay)
        http_stopped = trio.Event()
        # The write watchdog outlives the root scope: when the root is cancelled, a write
        # hypercorn shields may still be blocked on a peer that never reads, and only the
        # watchdog can cut it.
        watchdog = self.watchdog
        async with trio.open_nursery() as outer:
            outer.start_soon(watchdog.run)
            async with trio.open_nursery() as root:
                if install_signal_handlers:
                    root.start_soon(self._watch_signals, root.cancel_scope)
                await root.start(relay.run)
                http_done = trio.Event()

                async def serve_http(*, task_status: trio.TaskStatus[list[str]]) -> None:
                    try:
                        await hypercorn.trio.serve(
                            app,
                            hypercorn_config(self.config, watchdog),
                            shutdown_trigger=http_stopped.wait,
                            task_status=task_status,
                        )
                    finally:
                        http_done.set()

                binds: list[str] = await root.start(serve_http)
                self.urls = list(binds)
                if self.receiver is not None:
                    await root.start(self.receiver.run)
                # Seed: with many long-lived connections, full GC passes over start-up objects
                # stall the server; freeze what exists now so they are never rescanned.
                gc.collect()
                gc.freeze()
                # Measured (SSE, 1000 subscribers x 100 events/s, 2 cores): with the default
                # (700, 10, 10) the collector ran ~2000 times in 9 s and stalled the loop
                # 2.8 s in total (max 151 ms). A 50k young generation and rare older passes
                # (a full one about hourly at that load) cut it to ~80 ms; p99 ~470 -> ~290 ms.
                gc.set_threshold(50_000, 20, 100)
                task_status.started(self.urls)
                await relay.shutdown_requested.wait()
                self.exit_reason = relay.shutdown_reason
                # Seed 002: the drain gets most of the budget; stopping HTTP gets the rest.
                with trio.move_on_after(self.config.drain_budget) as budget:
                    if self.receiver is not None:
                        self.receiver.stop_accepting()
                    await relay.drain(self.receiver)
                if budget.cancelled_caught:
                    log.warning("shutdown drain budget exhausted; reporting what is left")
                relay.finish_shutdown()
                http_stopped.set()
                with trio.move_on_after(self.config.shutdown_timeout - self.config.drain_budget):
                    await http_done.wait()
                # Whatever is still writing now would only delay the cancellation.
                watchdog.sweep(trio.current_time(), older_than=0)
                root.cancel_scope.cancel()
            outer.cancel_scope.cancel()

    async def _watch_signals(self, root: trio.CancelScope) -> None:
        with trio.open_signal_receiver(signal.SIGTERM, signal.SIGINT) as signals:
            async for signum in signals:
                if not self.relay.shutdown_requested.is_set():
                    log.info("received %s: draining", signal.Signals(signum).name)
                    self.relay.request_shutdown(signal.Signals(signum).name)
                else:
                    log.warning("second signal: cancelling at once")
                    # Even a hard stop reports what it could not deliver (dead letters,
                    # spooled on cancellation) and ends SSE streams with the shutdown event.
                    self.relay.finish_shutdown()
                    root.cancel()
                    return


def run_forever(config: RelayConfig, announce: Callable[[str], None]) -> None:
    """Run a relay in this thread until it shuts down (the ``relay-trio run`` command)."""

    async def main() -> None:
        server = RelayServer(config)
        async with trio.open_nursery() as nursery:
            urls = await nursery.start(partial(server.serve, install_signal_handlers=True))
            announce(f"listening on {urls[0]}")
        announce(f"stopped ({server.exit_reason or 'done'})")

    trio.run(main)
