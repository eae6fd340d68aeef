"""The staged shutdown: one owner for the whole sequence and for every budget in it.

Seed 002: an outer deadline must contain the budgets it waits on. Everything a shutdown
does happens inside ``shutdown_timeout``, measured from the moment it is requested:

====================  ================================================================
until                 stage
====================  ================================================================
``drain_budget``      stop admitting (503, readiness false, systemd ``STOPPING=1``), let
                      the stream receiver finish its lines, let queued and in-flight sends
                      finish, flush pending work per ``shutdown_flush``, await ACKs
then                  report what is left (kept in the store, or dead-lettered with the
                      ``memory`` store) and end every SSE stream with the ``shutdown`` event
``shutdown_timeout``  stop HTTP (in-flight requests finish), cut writes still blocked,
 - ``close_budget``   cancel the root scope
last ``close_budget`` the store commits what is staged and upstream clients close
====================  ================================================================

A second signal skips to the report and the cancellation at once.
"""

from __future__ import annotations

import logging
import signal
from collections.abc import Callable
from typing import Protocol

import attrs
import trio

from .core.config import RelayConfig
from .relay import Relay, SupportsDrain

log = logging.getLogger("relay_trio")


class Notifier(Protocol):
    """Where shutdown progress is announced (systemd, or nothing)."""

    def stopping(self, status: str) -> object: ...

    def status(self, text: str) -> object: ...


@attrs.define(eq=False)
class Shutdown:
    """Runs the staged shutdown of one server (see the module docstring)."""

    config: RelayConfig
    relay: Relay
    notifier: Notifier
    #: Set to stop the HTTP server (hypercorn's ``shutdown_trigger``).
    http_stop: trio.Event = attrs.field(factory=trio.Event)
    #: Set by the server once HTTP has stopped.
    http_done: trio.Event = attrs.field(factory=trio.Event)
    reason: str = ""

    async def run(
        self,
        root: trio.CancelScope,
        receiver: SupportsDrain | None,
        stop_receiver: Callable[[], None] | None = None,
        cut_writes: Callable[[], object] | None = None,
    ) -> None:
        """Wait for a shutdown request, then run every stage within ``shutdown_timeout``
        and cancel ``root``. Returns once ``root`` is cancelled."""
        relay, c = self.relay, self.config
        await relay.shutdown_requested.wait()
        self.reason = relay.shutdown_reason
        started = trio.current_time()
        self.notifier.stopping(f"draining ({self.reason})")
        with trio.move_on_at(started + c.drain_budget) as budget:
            if stop_receiver is not None:
                stop_receiver()
            await relay.drain(receiver)
        if budget.cancelled_caught:
            log.warning("shutdown drain budget exhausted; reporting what is left")
        relay.finish_shutdown()
        self.notifier.status("stopping HTTP")
        self.http_stop.set()
        with trio.move_on_at(started + c.shutdown_timeout - c.close_budget):
            await self.http_done.wait()
        # Whatever is still writing now would only delay the cancellation.
        if cut_writes is not None:
            cut_writes()
        root.cancel()

    async def watch_signals(self, root: trio.CancelScope) -> None:
        """SIGTERM/SIGINT request the staged shutdown; a second one stops at once (still
        reporting what is undelivered and ending SSE streams)."""
        with trio.open_signal_receiver(signal.SIGTERM, signal.SIGINT) as signals:
            async for signum in signals:
                name = signal.Signals(signum).name
                if not self.relay.shutdown_requested.is_set():
                    log.info("received %s: draining", name)
                    self.relay.request_shutdown(name)
                else:
                    log.warning("second signal: cancelling at once")
                    self.relay.finish_shutdown()
                    root.cancel()
                    return
