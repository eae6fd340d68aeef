"""Dead-letter spool: every dead letter appended to a JSONL file, off the Trio thread.

In-memory dead letters vanish with the process; the spool is what an operator reads
after a shutdown that could not deliver everything.
"""

from __future__ import annotations

import logging
import os
from collections import deque
from pathlib import Path

import attrs
import trio

log = logging.getLogger("relay_trio.spool")


@attrs.define(eq=False)
class DeadLetterSpool:
    """Appends records to ``path``. ``offer`` never blocks; a task writes in batches.

    The buffer is bounded (``max_buffered``); beyond it the oldest record is dropped and
    counted, so a dead disk cannot grow memory.
    """

    path: Path
    max_buffered: int = 10_000
    written: int = attrs.field(init=False, default=0)
    dropped: int = attrs.field(init=False, default=0)
    _buffer: deque[bytes] = attrs.field(init=False, factory=deque)
    _wake: trio.Event = attrs.field(init=False, factory=trio.Event)

    def offer(self, record: bytes) -> None:
        """Queue one JSON record. Synchronous; never blocks."""
        if len(self._buffer) >= self.max_buffered:
            self._buffer.popleft()
            self.dropped += 1
        self._buffer.append(record)
        self._wake.set()

    def _append(self, data: bytes) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
        try:
            os.write(fd, data)
        finally:
            os.close(fd)

    async def flush(self) -> None:
        """Write everything buffered now. Checkpoint; errors are logged, not raised."""
        if not self._buffer:
            return
        batch = list(self._buffer)
        self._buffer.clear()
        try:
            await trio.to_thread.run_sync(self._append, b"".join(r + b"\n" for r in batch))
            self.written += len(batch)
        except trio.Cancelled:
            # Cancelled before the thread started (so nothing was written): put the batch
            # back so the shielded flush on the way out still writes it.
            self._buffer.extendleft(reversed(batch))
            raise
        except OSError as exc:
            self.dropped += len(batch)
            log.error("dead-letter spool %s: %s", self.path, exc.strerror)

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Write batches as they come; on cancellation, flush what is left (shielded, bounded)."""
        task_status.started()
        try:
            while True:
                await self._wake.wait()
                self._wake = trio.Event()
                await self.flush()
        finally:
            with trio.CancelScope(shield=True), trio.move_on_after(5):
                await self.flush()
