"""Running a relay: hypercorn on the trio worker, signals, staged shutdown.

``serve`` is a server function in hypercorn's style: it reports readiness (the bound
URLs) through ``task_status.started`` and returns once shutdown has finished.
"""

from __future__ import annotations

import gc
import logging
import signal
from collections.abc import Callable
from functools import partial

import attrs
import hypercorn.trio
import trio
from hypercorn.config import Config as HyperConfig

from ._app import create_app
from ._config import RelayConfig
from ._receiver import ReceiverLimits, StreamReceiver, parse_listen
from ._relay import Relay

log = logging.getLogger("relay_trio")


def hypercorn_config(config: RelayConfig) -> HyperConfig:
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
    hyper.graceful_timeout = min(5.0, config.shutdown_timeout / 4)
    hyper.read_timeout = 60
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
        async with trio.open_nursery() as root:
            if install_signal_handlers:
                root.start_soon(self._watch_signals, root.cancel_scope)
            await root.start(relay.run)
            http_done = trio.Event()

            async def serve_http(*, task_status: trio.TaskStatus[list[str]]) -> None:
                try:
                    await hypercorn.trio.serve(
                        app,
                        hypercorn_config(self.config),
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
            task_status.started(self.urls)
            await relay.shutdown_requested.wait()
            self.exit_reason = relay.shutdown_reason
            with trio.move_on_after(self.config.shutdown_timeout) as budget:
                if self.receiver is not None:
                    self.receiver.stop_accepting()
                await relay.drain(self.receiver)
            if budget.cancelled_caught:
                log.warning(
                    "shutdown budget of %ss exhausted; cancelling the rest",
                    self.config.shutdown_timeout,
                )
                relay.abandon_pending("shutdown")
            http_stopped.set()
            with trio.move_on_after(self.config.shutdown_timeout / 4):
                await http_done.wait()
            root.cancel_scope.cancel()

    async def _watch_signals(self, root: trio.CancelScope) -> None:
        with trio.open_signal_receiver(signal.SIGTERM, signal.SIGINT) as signals:
            async for signum in signals:
                if not self.relay.shutdown_requested.is_set():
                    log.info("received %s: draining", signal.Signals(signum).name)
                    self.relay.request_shutdown(signal.Signals(signum).name)
                else:
                    log.warning("second signal: cancelling at once")
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
