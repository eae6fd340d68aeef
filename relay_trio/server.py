"""Running a relay: hypercorn on the trio worker, signals, staged shutdown.

``serve`` is a server function in hypercorn's style: it reports readiness (the bound
URLs) through ``task_status.started`` and returns once shutdown has finished.
"""

from __future__ import annotations

import errno
import gc
import logging
import math
from collections.abc import Callable
from functools import partial
from typing import Final

import attrs
import trio
from hypercorn.config import Config as HyperConfig

from .core.config import RelayConfig
from .core.listen import parse_listen
from .http.app import create_app
from .http.fast_lane import FastLane
from .http.hypercorn_patch import (
    ConnectionTable,
    FrontDoorPolicy,
    WriteWatchdog,
    check_hypercorn_version,
    serve_http,
)
from .metrics import HTTP_FRONT_DOOR_FIGURES, STREAM_RECEIVER_FIGURES
from .relay import Relay
from .shutdown import Shutdown
from .stream.receiver import ReceiverLimits, StreamReceiver
from .systemd import SystemdNotifier

log = logging.getLogger("relay_trio")


#: errno values of ``accept`` that mean "out of descriptors or kernel memory", not a bug.
ACCEPT_CAPACITY_ERRNOS: Final = frozenset({errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM})
#: How long the accept loop waits before retrying when descriptors ran out and no
#: connection could be closed to free one.
ACCEPT_RETRY: Final = 0.05
#: At most one capacity log line per this many seconds.
CAPACITY_LOG_INTERVAL: Final = 10.0


@attrs.define(eq=False)
class HttpFrontDoor:
    """Admission of HTTP connections: a cap, and a quiet degradation when it is reached.

    Issue 11: trickling clients could hold every descriptor, and ``trio.serve_listeners``
    then logged a traceback every 100 ms while ``/healthz`` timed out. Here, with
    ``max_connections`` open, a new connection closes the connection that has waited
    longest without serving a request (new, trickling a request, or idle keep-alive, as
    nginx reuses idle connections); when every connection is serving one (SSE streams
    included) the newcomer is accepted and closed at once (cheap: no task, no parsing).
    When ``accept`` itself fails for lack of descriptors, the loop frees one the same
    way, or retries after :data:`ACCEPT_RETRY` seconds: new connections work again as
    soon as descriptors free up. Either way at most one log line per
    :data:`CAPACITY_LOG_INTERVAL` seconds, with counts, and never a traceback.
    """

    max_connections: int
    policy: FrontDoorPolicy
    refused: int = 0
    accept_failures: int = 0
    _logged: tuple[int, int, int] = (0, 0, 0)
    _next_log: float = -math.inf

    @property
    def table(self) -> ConnectionTable:
        """The open connections."""
        return self.policy.table

    def counters(self) -> dict[str, int]:
        """Connections open, refused, evicted, read timeouts, accept failures and writes
        cut by the watchdog (see :data:`~relay_trio.metrics.HTTP_FRONT_DOOR_FIGURES`).
        Never blocks."""
        return {
            "connections_open": len(self.table),
            "refused": self.refused,
            "evicted": self.table.evicted,
            "read_timeouts": self.table.read_timeouts,
            "accept_failures": self.accept_failures,
            "write_timeouts": self.policy.watchdog.closed,
        }

    def _note_capacity(self, now: float) -> None:
        """Log the capacity counters, at most once per interval. Never blocks."""
        if now < self._next_log:
            return
        self._next_log = now + CAPACITY_LOG_INTERVAL
        counts = (self.refused, self.table.evicted, self.accept_failures)
        refused, evicted, failed = (
            new - old for new, old in zip(counts, self._logged, strict=True)
        )
        self._logged = counts
        log.warning(
            "HTTP front door full (http_max_connections=%d, %d open): since the last report "
            "refused %d new connection(s), closed %d waiting connection(s), %d accept(s) "
            "failed for lack of file descriptors",
            self.max_connections,
            len(self.table),
            refused,
            evicted,
            failed,
        )

    async def accept_loop(
        self, listener: trio.SocketListener, start: Callable[[trio.SocketStream], None]
    ) -> None:
        """Accept connections from ``listener`` until cancelled; ``start`` each admitted one.

        Raises only for ``accept`` errors other than running out of descriptors or memory.
        """
        while True:
            try:
                stream = await listener.accept()
            except OSError as exc:
                if exc.errno not in ACCEPT_CAPACITY_ERRNOS:
                    raise
                self.accept_failures += 1
                freed = self.table.evict_oldest_waiting()
                self._note_capacity(trio.current_time())
                if not freed:
                    await trio.sleep(ACCEPT_RETRY)
                continue
            if len(self.table) >= self.max_connections:
                if not self.table.evict_oldest_waiting():
                    self.refused += 1
                    stream.socket.close()
                    self._note_capacity(trio.current_time())
                    continue
                self._note_capacity(trio.current_time())
            start(stream)


def hypercorn_config(config: RelayConfig) -> HyperConfig:
    """Hypercorn settings derived from the relay's: bind, limits and timeouts."""
    hyper = HyperConfig()
    hyper.bind = [f"{config.host}:{config.port}"]
    hyper.accesslog = None
    hyper.errorlog = logging.getLogger("hypercorn.error")
    hyper.include_server_header = False
    # Header limits: a request head over 64 KiB is refused by h11 before routing.
    hyper.h11_max_incomplete_size = 64 * 1024
    hyper.keep_alive_timeout = config.keep_alive_timeout
    # Shutdown closes SSE streams first, so the graceful wait covers only short requests.
    hyper.graceful_timeout = min(5.0, config.shutdown_timeout * 0.15)
    # No per-read timeout: an SSE client legitimately sends nothing after its request.
    # RelayConnection applies http_read_timeout to requests in progress instead.
    hyper.read_timeout = None
    return hyper


def tune_gc_for_serving() -> None:
    """Process-wide garbage-collector settings for a long-running server (the ``relay-trio
    run`` entry point calls this once the relay is ready; an embedding application decides
    for itself). Blocks for one full collection.

    Seed: with many long-lived connections, full GC passes over start-up objects stall the
    server; freeze what exists now so they are never rescanned. Measured (SSE, 1000
    subscribers x 100 events/s, 2 cores): with the default (700, 10, 10) the collector ran
    ~2000 times in 9 s and stalled the loop 2.8 s in total (max 151 ms). A 50k young
    generation and rare older passes (a full one about hourly at that load) cut it to
    ~80 ms; p99 ~470 -> ~290 ms.
    """
    gc.collect()
    gc.freeze()
    gc.set_threshold(50_000, 20, 100)


@attrs.define(eq=False)
class RelayServer:
    """A relay plus its front doors (HTTP, stream receiver), run by :meth:`serve`."""

    config: RelayConfig
    relay: Relay = attrs.field(
        default=attrs.Factory(lambda self: Relay(self.config), takes_self=True)
    )
    notifier: SystemdNotifier = attrs.field(factory=SystemdNotifier)
    receiver: StreamReceiver | None = attrs.field(init=False, default=None)
    urls: list[str] = attrs.field(init=False, factory=list)
    watchdog: WriteWatchdog = attrs.field(
        init=False,
        default=attrs.Factory(
            lambda self: WriteWatchdog(self.config.write_timeout), takes_self=True
        ),
    )
    front_door: HttpFrontDoor = attrs.field(
        init=False,
        default=attrs.Factory(
            lambda self: HttpFrontDoor(
                self.config.effective_http_max_connections(),
                FrontDoorPolicy(self.config.http_read_timeout, self.watchdog),
            ),
            takes_self=True,
        ),
    )
    exit_reason: str = attrs.field(init=False, default="")
    #: The HTTP application being served (set by :meth:`serve`).
    http_app: FastLane | None = attrs.field(init=False, default=None)

    def __attrs_post_init__(self) -> None:
        self.relay.expose_front_door("http", HTTP_FRONT_DOOR_FIGURES, self.front_door.counters)
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
                admit_many=None if self.relay.cluster is None else self.relay.admit_cluster,
            )
            self.relay.expose_front_door(
                "stream_receiver", STREAM_RECEIVER_FIGURES, self.receiver.counters
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
        check_hypercorn_version()
        relay = self.relay
        app = self.http_app = FastLane(create_app(relay), relay)
        shutdown = Shutdown(self.config, relay, self.notifier)
        # The write watchdog outlives the root scope: when the root is cancelled, a write
        # hypercorn shields may still be blocked on a peer that never reads, and only the
        # watchdog can cut it.
        watchdog = self.watchdog
        async with trio.open_nursery() as outer:
            outer.start_soon(watchdog.run)
            outer.start_soon(self.notifier.run_watchdog)
            async with trio.open_nursery() as root:
                if install_signal_handlers:
                    root.start_soon(shutdown.watch_signals, root.cancel_scope)
                await root.start(relay.run)

                async def run_http(*, task_status: trio.TaskStatus[list[str]]) -> None:
                    try:
                        await serve_http(
                            app,
                            hypercorn_config(self.config),
                            self.front_door.policy,
                            self.front_door.accept_loop,
                            shutdown_trigger=shutdown.http_stop.wait,
                            task_status=task_status,
                        )
                    finally:
                        shutdown.http_done.set()

                binds: list[str] = await root.start(run_http)
                self.urls = list(binds)
                if self.receiver is not None:
                    await root.start(self.receiver.run)
                self.notifier.ready(f"listening on {self.urls[0]}")
                task_status.started(self.urls)
                await shutdown.run(
                    root.cancel_scope,
                    self.receiver,
                    stop_receiver=None if self.receiver is None else self.receiver.stop_accepting,
                    cut_writes=lambda: watchdog.sweep(trio.current_time(), older_than=0),
                )
                self.exit_reason = shutdown.reason
            outer.cancel_scope.cancel()


def run_forever(config: RelayConfig, announce: Callable[[str], None]) -> None:
    """Run a relay in this thread until it shuts down (the ``relay-trio run`` command).

    Tunes the process's garbage collector once the relay is ready
    (:func:`tune_gc_for_serving`); :meth:`RelayServer.serve` alone leaves it alone.
    """

    async def main() -> None:
        server = RelayServer(config, notifier=SystemdNotifier.from_environ())
        async with trio.open_nursery() as nursery:
            urls = await nursery.start(partial(server.serve, install_signal_handlers=True))
            tune_gc_for_serving()
            announce(f"listening on {urls[0]}")
        server.notifier.close()
        announce(f"stopped ({server.exit_reason or 'done'})")

    trio.run(main)
