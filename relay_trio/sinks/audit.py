"""Audit sink: appends every record to a JSONL file (off the Trio thread)."""

from __future__ import annotations

import os
from collections.abc import Sequence
from typing import IO

import attrs
import trio


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
