"""SqliteStore: the store port in one SQLite file (WAL mode) with group commit.

Two layers:

* :class:`SqliteFile`, synchronous: open/migrate/load, apply a batch of :class:`Changes` in
  one transaction, query dead letters. It owns the only connection and is only ever called
  from one worker thread at a time.
* :class:`SqliteStore`, the Trio service: ``stage`` queues change sets (never blocks), ``run``
  commits everything staged since the last commit in ONE transaction off the Trio thread and
  wakes every waiter of that batch; while a commit runs, new stages pile up for the next one.

Threading: every call into :class:`SqliteFile` goes through ``trio.to_thread.run_sync`` with a
``CapacityLimiter(1)`` (the connection is opened with ``check_same_thread=False``; the limiter,
not the thread identity, is what serialises access). Trio keeps idle worker threads cached, so
in practice consecutive commits run on the same OS thread. The hop costs ~50-100 µs per commit
(``benchmarks/store_commit.py`` measures it: batch-1 async vs the synchronous core); group
commit amortises it. A dedicated writer thread woken at stage time (no wait for the Trio
scheduler to start a commit) was measured on bulk ingest at 0-8%, within this machine's noise,
and would add a second shutdown path. SQLite work never runs on the Trio thread.
"""

from __future__ import annotations

import time
from collections import deque
from collections.abc import Callable
from pathlib import Path

import attrs
import trio

from .base import (
    Changes,
    DeadLetterPage,
    DeadLetterQuery,
    Recovered,
    StoreError,
    StoreStats,
    Ticket,
    done_ticket,
    wait_durable,
)
from .sqlite_file import CommitResult, SqliteFile, SyncMode


@attrs.define(eq=False)
class _Batch:
    changes: list[Changes] = attrs.field(factory=list)
    ticket: Ticket = attrs.field(factory=Ticket)


@attrs.define(eq=False)
class SqliteStore:
    """The store port on one SQLite file, with group commit (see the module docstring).

    ``backlog`` counts change sets staged but not yet committed (including the commit in
    flight). ``stage`` never refuses; the admission path reads ``backlog`` and answers 503
    past its own limit, which is what bounds the staged buffer.
    """

    path: Path
    sync: SyncMode
    max_dead_letters: int
    max_batch: int = 2000
    #: How long the final commit at cancellation may take (shielded).
    flush_budget: float = 1.0
    kind: str = attrs.field(init=False, default="sqlite")
    keeps_rows: bool = attrs.field(init=False, default=True)
    on_commit: Callable[[float, int], None] | None = attrs.field(init=False, default=None)
    _file: SqliteFile = attrs.field(init=False)
    _limiter: trio.CapacityLimiter = attrs.field(
        init=False, factory=lambda: trio.CapacityLimiter(1)
    )
    _staged: deque[_Batch] = attrs.field(init=False, factory=deque)
    _inflight: _Batch | None = attrs.field(init=False, default=None)
    _wake: trio.Event = attrs.field(init=False, factory=trio.Event)
    _backlog: int = attrs.field(init=False, default=0)
    _closed: bool = attrs.field(init=False, default=False)
    _commits: int = attrs.field(init=False, default=0)
    _committed_changes: int = attrs.field(init=False, default=0)
    _last_batch_size: int = attrs.field(init=False, default=0)
    _last: CommitResult = attrs.field(init=False, default=CommitResult(0, 0, 0, 0))
    _last_ticket: Ticket = attrs.field(init=False, factory=done_ticket)

    def __attrs_post_init__(self) -> None:
        if self.max_batch < 1:
            raise ValueError("max_batch must be at least 1")
        self._file = SqliteFile(self.path, self.sync, self.max_dead_letters)

    @property
    def backlog(self) -> int:
        """Change sets staged and not yet committed (the one in flight included)."""
        return self._backlog

    async def open(self) -> Recovered:
        """Create or open the file and load everything, off the Trio thread. Checkpoint.

        Raises :class:`StoreError` (file untouched) for an unreadable, corrupt, foreign or
        newer-schema file.
        """
        recovered = await trio.to_thread.run_sync(self._file.open, limiter=self._limiter)
        self._last = CommitResult(
            pending_rows=len(recovered.messages),
            dead_letters=recovered.dead_letters,
            dead_letters_pruned=0,
            file_bytes=await trio.to_thread.run_sync(self._file.file_bytes),
        )
        return recovered

    def stage(self, changes: Changes) -> Ticket:
        """Queue ``changes`` for the next group commit. Never blocks; not a checkpoint.

        After the store has closed, the returned ticket is already failed.
        """
        if self._closed:
            ticket = Ticket(error=StoreError(f"store {self.path} is closed"))
            ticket.done.set()
            return ticket
        staged = self._staged
        if staged and len(staged[-1].changes) < self.max_batch:
            batch = staged[-1]
        else:
            batch = _Batch()
            staged.append(batch)
        batch.changes.append(changes)
        self._backlog += 1
        wake = self._wake
        if not wake.is_set():
            wake.set()
        self._last_ticket = batch.ticket
        return batch.ticket

    @property
    def last_ticket(self) -> Ticket:
        """The ticket of the newest staged change set: done once everything staged so far
        is committed."""
        return self._last_ticket

    async def durable(self, ticket: Ticket) -> None:
        """Return once ``ticket``'s commit is done; raise :class:`StoreError` if it failed.
        Checkpoint. Cancelling the wait leaves the changes staged."""
        await wait_durable(ticket)

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Commit loop: wait for staged changes, commit up to ``max_batch`` change sets in one
        transaction, wake their waiters, repeat. Call :meth:`open` first.

        On cancellation: commits what is still staged within 1 s (shielded; a commit already
        on the thread always finishes), fails the tickets of whatever is left, then closes
        the connection.
        """
        if not self._file.is_open:
            raise RuntimeError("SqliteStore.open() must succeed before run()")
        task_status.started()
        try:
            while True:
                if not self._staged:
                    self._wake = trio.Event()
                    await self._wake.wait()
                await self._commit(self._staged.popleft())
        finally:
            with trio.CancelScope(shield=True):
                with trio.move_on_after(self.flush_budget):
                    while self._staged:
                        await self._commit(self._staged.popleft())
                self._closed = True
                error = StoreError(f"store {self.path} closed before this commit")
                while self._staged:
                    self._finish(self._staged.popleft(), error)
                await trio.to_thread.run_sync(self._file.close, limiter=self._limiter)

    def _finish(self, batch: _Batch, error: StoreError | None) -> None:
        self._backlog -= len(batch.changes)
        batch.ticket.error = error
        batch.ticket.done.set()

    async def _commit(self, batch: _Batch) -> None:
        self._inflight = batch
        started = time.perf_counter()
        try:
            result = await trio.to_thread.run_sync(
                self._file.apply, batch.changes, limiter=self._limiter
            )
        except StoreError as exc:
            self._finish(batch, exc)
            return
        except trio.Cancelled:
            # Only possible before the thread took the batch (the call is not abandonable):
            # put it back first in line for the shielded flush in run().
            self._staged.appendleft(batch)
            raise
        except BaseException:
            # A bug: never leave a waiter hanging.
            self._finish(batch, StoreError(f"commit to {self.path} did not run"))
            raise
        finally:
            self._inflight = None
        size = len(batch.changes)
        self._commits += 1
        self._committed_changes += size
        self._last_batch_size = size
        self._last = result
        self._finish(batch, None)
        if self.on_commit is not None:
            self.on_commit(time.perf_counter() - started, size)

    async def query_dead_letters(self, q: DeadLetterQuery) -> DeadLetterPage:
        """One page of dead letters, after every change staged before this call has been
        committed (or has failed). Checkpoint; runs on the store's thread."""
        last = self._staged[-1] if self._staged else self._inflight
        if last is not None:
            await last.ticket.done.wait()
        return await trio.to_thread.run_sync(self._file.query, q, limiter=self._limiter)

    def stats(self) -> StoreStats:
        """Counters as of the last commit. Synchronous, cheap (no I/O)."""
        last = self._last
        return StoreStats(
            commits=self._commits,
            committed_changes=self._committed_changes,
            last_batch_size=self._last_batch_size,
            pending_rows=last.pending_rows,
            dead_letters=last.dead_letters,
            dead_letters_pruned=last.dead_letters_pruned,
            file_bytes=last.file_bytes,
            backlog=self._backlog,
        )
