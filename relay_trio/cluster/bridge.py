"""One asyncio event loop in a dedicated thread, driven from Trio.

``nats-py`` is an asyncio library. The relay runs on Trio, so every NATS call is a coroutine
submitted to this loop with :func:`asyncio.run_coroutine_threadsafe`; the Trio task waiting
for it sleeps on a :class:`trio.Event` set from the loop thread through the Trio token
(:meth:`trio.lowlevel.TrioToken.run_sync_soon`): no worker thread is held per call, and
callbacks from nats-py (disconnect, reconnect) reach Trio the same way. docs/cluster.md
records the measurement against ``trio-asyncio`` that chose this design.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import threading
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar

import attrs
import trio

T = TypeVar("T")


@attrs.define(eq=False)
class AsyncioThread:
    """An asyncio loop running in its own daemon thread until :meth:`stop`."""

    loop: asyncio.AbstractEventLoop = attrs.field(init=False, factory=asyncio.new_event_loop)
    _thread: threading.Thread | None = attrs.field(init=False, default=None)
    _token: trio.lowlevel.TrioToken | None = attrs.field(init=False, default=None)

    def start(self) -> None:
        """Start the loop thread and remember the calling Trio run's token. Never blocks
        (the loop accepts work as soon as the thread runs it)."""
        self._token = trio.lowlevel.current_trio_token()
        self._thread = threading.Thread(
            target=self.loop.run_forever, name="relay-trio-nats", daemon=True
        )
        self._thread.start()

    async def call(self, fn: Callable[..., Awaitable[T]], *args: Any) -> T:
        """Run ``fn(*args)`` on the loop and return its result (or raise its exception).

        A checkpoint. Cancelling the Trio caller cancels the asyncio task (best effort: the
        coroutine sees ``CancelledError`` at its next await) and raises ``Cancelled``.
        """
        assert self._token is not None, "start() first"
        done = trio.Event()
        token = self._token
        future: concurrent.futures.Future[T] = asyncio.run_coroutine_threadsafe(
            _as_coroutine(fn, args), self.loop
        )

        def wake(_f: object) -> None:
            with contextlib.suppress(trio.RunFinishedError):
                token.run_sync_soon(done.set)

        future.add_done_callback(wake)
        try:
            await done.wait()
        except trio.Cancelled:
            future.cancel()
            raise
        return future.result()

    def to_trio(self, fn: Callable[[], None]) -> None:
        """From the loop thread: run ``fn`` on the Trio thread soon (never blocks)."""
        assert self._token is not None
        with contextlib.suppress(trio.RunFinishedError):
            self._token.run_sync_soon(fn)

    async def stop(self, timeout: float = 5.0) -> None:  # noqa: ASYNC109 - bounded join
        """Cancel the loop's remaining tasks and let them finish (bounded), then stop the
        loop and join its thread (off the Trio thread, bounded).

        A task left pending on a closed loop (nats-py's subscription readers) would raise
        "Event loop is closed" whenever the garbage collector finally reaches it.
        """
        if self._thread is None:
            return
        # Whatever the remaining tasks raise: the loop is going away anyway.
        with trio.move_on_after(timeout), contextlib.suppress(Exception):
            await self.call(_cancel_the_others)
        self.loop.call_soon_threadsafe(self.loop.stop)
        thread = self._thread
        await trio.to_thread.run_sync(thread.join, timeout, abandon_on_cancel=True)
        if not thread.is_alive():
            self.loop.close()
        self._thread = None


async def _as_coroutine(fn: Callable[..., Awaitable[T]], args: tuple[Any, ...]) -> T:
    return await fn(*args)


async def _cancel_the_others() -> None:
    """Cancel every task of the running loop but this one and wait until they are done."""
    tasks = [t for t in asyncio.all_tasks() if t is not asyncio.current_task()]
    for task in tasks:
        task.cancel()
    await asyncio.gather(*tasks, return_exceptions=True)
