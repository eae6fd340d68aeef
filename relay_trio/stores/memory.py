"""MemoryStore: the store port in plain dicts (in-process only; nothing survives the process).

Also the reference model the SQLite store is tested against: every operation is applied
one by one, in order, exactly as :class:`relay_trio.stores.base.Changes` documents it.
"""

from __future__ import annotations

import bisect
from collections.abc import Callable

import attrs
import trio

from .base import (
    SEQ_FLOOR,
    Changes,
    DeadLetterPage,
    DeadLetterQuery,
    DeadLetterRecord,
    DeleteDeadLetters,
    DeleteIdempotencyKeys,
    DeleteMessage,
    DeleteResource,
    IdempotencyRecord,
    MessageRecord,
    Recovered,
    ResourceRecord,
    SetMeta,
    StoreStats,
    Ticket,
    UpdateMessage,
    wait_durable,
)


def _index_of(d: DeadLetterRecord) -> int:
    return d.index


def _created_at(r: IdempotencyRecord) -> float:
    return r.created_at


@attrs.define(eq=False)
class MemoryStore:
    """The store port in memory. ``stage`` applies at once and returns a done ticket.

    ``open`` returns the current contents (empty the first time). ``on_commit`` is not called:
    there is no commit to time.
    """

    max_dead_letters: int
    #: ``False`` for ``store = memory``: the relay stages no message/resource rows (they
    #: could only serve a restart, which a process-local store never sees). The reference
    #: model in the store tests keeps them.
    keeps_rows: bool = True
    kind: str = attrs.field(init=False, default="memory")
    on_commit: Callable[[float, int], None] | None = attrs.field(init=False, default=None)
    resources: dict[str, ResourceRecord] = attrs.field(init=False, factory=dict)
    messages: dict[str, MessageRecord] = attrs.field(init=False, factory=dict)
    meta: dict[str, int] = attrs.field(init=False, factory=dict)
    idempotency: dict[str, IdempotencyRecord] = attrs.field(init=False, factory=dict)
    # In index order (indexes only grow), so a cursor is a bisect.
    dead_letters: list[DeadLetterRecord] = attrs.field(init=False, factory=list)
    dead_letter_index: int = attrs.field(init=False, default=0)
    dead_letters_pruned: int = attrs.field(init=False, default=0)
    commits: int = attrs.field(init=False, default=0)
    committed_changes: int = attrs.field(init=False, default=0)
    _done: Ticket = attrs.field(init=False, factory=Ticket)

    def __attrs_post_init__(self) -> None:
        self._done.done.set()

    @property
    def last_ticket(self) -> Ticket:
        """Always done: every stage is applied at once."""
        return self._done

    @property
    def backlog(self) -> int:
        """Always 0: nothing waits."""
        return 0

    async def open(self) -> Recovered:
        """Return the current contents (empty the first time). Checkpoint."""
        await trio.lowlevel.checkpoint()
        return self.snapshot()

    def snapshot(self) -> Recovered:
        """What :meth:`open` returns, synchronously."""
        meta = {SEQ_FLOOR: 0, **self.meta}
        return Recovered(
            resources=[self.resources[k] for k in sorted(self.resources)],
            messages=[self.messages[k] for k in sorted(self.messages)],
            meta=meta,
            dead_letters=len(self.dead_letters),
            dead_letter_index=self.dead_letter_index,
            idempotency=sorted(self.idempotency.values(), key=_created_at),
        )

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Nothing to write: report ready and sleep until cancelled."""
        task_status.started()
        await trio.sleep_forever()

    def stage(self, changes: Changes) -> Ticket:
        """Apply ``changes`` now, in order. Never blocks; not a checkpoint."""
        self.apply(changes)
        return self._done

    async def durable(self, ticket: Ticket) -> None:
        """Checkpoint; ``ticket`` is already done."""
        await wait_durable(ticket)

    def apply(self, changes: Changes) -> None:
        """Apply every operation of ``changes`` in order."""
        for op in changes.ops:
            if isinstance(op, MessageRecord):
                self.messages[op.message_id] = op
            elif isinstance(op, ResourceRecord):
                self.resources[op.resource_id] = op
            elif isinstance(op, DeleteMessage):
                self.messages.pop(op.message_id, None)
            elif isinstance(op, UpdateMessage):
                old = self.messages.get(op.message_id)
                if old is not None:
                    self.messages[op.message_id] = old._replace(
                        attempts=op.attempts, due_at=op.due_at
                    )
            elif isinstance(op, DeleteResource):
                self.resources.pop(op.resource_id, None)
                self.meta[SEQ_FLOOR] = max(self.meta.get(SEQ_FLOOR, 0), op.seq)
            elif isinstance(op, SetMeta):
                self.meta[op.key] = op.value
            elif isinstance(op, DeadLetterRecord):
                self.dead_letter_index += 1
                self.dead_letters.append(attrs.evolve(op, index=self.dead_letter_index))
                self.messages.pop(op.message_id, None)
                excess = len(self.dead_letters) - self.max_dead_letters
                if excess > 0:
                    del self.dead_letters[:excess]
                    self.dead_letters_pruned += excess
            elif isinstance(op, IdempotencyRecord):
                self.idempotency[op.key] = op
            elif isinstance(op, DeleteIdempotencyKeys):
                for key in op.keys:
                    self.idempotency.pop(key, None)
            elif isinstance(op, DeleteDeadLetters):
                ids = set(op.message_ids)
                self.dead_letters = [d for d in self.dead_letters if d.message_id not in ids]
            else:  # pragma: no cover - exhaustive
                raise TypeError(f"unknown store operation {op!r}")
        self.commits += 1
        self.committed_changes += 1

    async def query_dead_letters(self, q: DeadLetterQuery) -> DeadLetterPage:
        """One page of dead letters. Checkpoint."""
        await trio.lowlevel.checkpoint()
        return self.query(q)

    def query(self, q: DeadLetterQuery) -> DeadLetterPage:
        """:meth:`query_dead_letters`, synchronously."""
        items: list[DeadLetterRecord] = []
        start = bisect.bisect_right(self.dead_letters, q.after_index, key=_index_of)
        dead = self.dead_letters
        for i in range(start, len(dead)):
            d = dead[i]
            if q.matches(d):
                if len(items) == q.limit:
                    return DeadLetterPage(items, items[-1].index)
                items.append(d)
        return DeadLetterPage(items, None)

    def stats(self) -> StoreStats:
        """Current counters (``file_bytes`` is 0)."""
        return StoreStats(
            commits=self.commits,
            committed_changes=self.committed_changes,
            last_batch_size=1 if self.commits else 0,
            pending_rows=len(self.messages),
            dead_letters=len(self.dead_letters),
            dead_letters_pruned=self.dead_letters_pruned,
            file_bytes=0,
            backlog=0,
        )
