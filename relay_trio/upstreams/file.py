"""The embedded ``file://`` upstream: appends each message to a JSONL file and acknowledges at
once, so ``relay-trio run`` works with no other service.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Final

import attrs
import orjson
import trio

from .base import ACKED, TIMED_OUT, Outbound, SendResult, SendStatus

log = logging.getLogger("relay_trio.sender")

#: Batches up to this size may be appended on the Trio thread (see FileUpstream).
SYNC_WRITE_MAX: Final = 64 * 1024
#: A synchronous append slower than this is slow; SLOW_STREAK slow appends in a row send
#: the upstream to its worker thread (one alone is as likely the scheduler preempting the
#: process on a busy machine as a slow disk)...
SLOW_WRITE: Final = 0.002
SLOW_STREAK: Final = 3
#: ...and so does a single append slower than this (a stalled disk)...
STALLED_WRITE: Final = 0.05
#: ...for this long.
SLOW_WRITE_BACKOFF: Final = 60.0


@attrs.define(eq=False)
class FileUpstream:
    """The embedded default upstream: appends one JSON line per message and acks at once.

    Each batch is a single ``write`` on an ``O_APPEND`` descriptor, so concurrent sender
    tasks never interleave lines. Opening the file and large batches go to a worker
    thread. Small appends (up to ``SYNC_WRITE_MAX``) land in the page cache in
    microseconds, and a thread hop per batch costs more than the whole admission of a
    report (measured: single POSTs used ~35% more CPU each while writes went through the
    thread), so they are written on the Trio thread -- but every such write is timed:
    one that takes longer than ``STALLED_WRITE``, or ``SLOW_STREAK`` in a row longer than
    ``SLOW_WRITE``, send this upstream back to the worker thread for
    ``SLOW_WRITE_BACKOFF`` seconds, so a slow disk stalls the event loop at most a few
    times per backoff period, and one preemption of a busy process does not cost a
    minute of thread hops.
    """

    url: str
    path: Path = attrs.field(init=False)
    _fd: int | None = attrs.field(default=None, init=False)
    #: Trio time before which every write goes to the worker thread.
    _threaded_until: float = attrs.field(default=0.0, init=False)
    slow_writes: int = attrs.field(default=0, init=False)
    #: Consecutive synchronous appends slower than SLOW_WRITE.
    _slow_streak: int = attrs.field(default=0, init=False)

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
            if took <= SLOW_WRITE:
                self._slow_streak = 0
            else:
                self._slow_streak += 1
                if took > STALLED_WRITE or self._slow_streak >= SLOW_STREAK:
                    self._slow_streak = 0
                    self.slow_writes += 1
                    self._threaded_until = now + SLOW_WRITE_BACKOFF
                    log.warning(
                        "file upstream %s: an append took %.1f ms; "
                        "writing from a worker thread for %gs",
                        self.path,
                        took * 1000,
                        SLOW_WRITE_BACKOFF,
                    )
            await trio.lowlevel.checkpoint()
            return [ACKED] * len(batch)
        try:
            with trio.move_on_after(attempt_deadline):
                # A stalled disk must not hold shutdown: abandon the thread on cancel.
                await trio.to_thread.run_sync(self._write, data, abandon_on_cancel=True)
                return [ACKED] * len(batch)
        except OSError as exc:
            return [SendResult(SendStatus.FAILED, f"file: {exc.strerror}")] * len(batch)
        return [TIMED_OUT] * len(batch)

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
