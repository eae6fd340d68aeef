"""The resources table: per-resource metadata, payload cache and LRU/TTL eviction.

Owned by the relay's composition root and shared by admission and delivery; touched only
through these methods and never across a checkpoint, so it needs no lock. Eviction never
calls back into its owner: the entries it removes are returned (idle sweep) or collected
for :meth:`ResourceTable.take_evicted` (LRU), and the caller decides what to do with them.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Iterator
from typing import Any

import attrs


@attrs.define(eq=False)
class ResourceState:
    """What the relay knows about one resource.

    ``level``/``last`` are the leaky-bucket state; ``payload`` is the latest report body
    (latest wins, rejected reports included) that retries resend.
    """

    resource_id: str
    created_at: float
    updated_at: float
    level: float = 0.0
    last: float = 0.0
    seq: int = 0
    payload: Any = None
    kind: str | None = None
    payload_seq: int = 0
    last_acked_at: float | None = None
    awaiting_ack_since: float | None = None
    pending_message_id: str | None = None
    #: Highest sequence number the upstream acknowledged (a redrive of an older one is stale).
    acked_seq: int = 0
    admitted: int = 0
    rejected: int = 0
    last_dead_letter: Any = None
    #: Trace context (core.webhooks.TraceContext) of the pending message: sent on every
    #: attempt. Set at admission only (a rejected report does not change it).
    trace: Any = None

    def is_stale(self, now: float, threshold: float) -> bool:
        """True when sends have gone unacknowledged for at least ``threshold`` seconds."""
        return self.awaiting_ack_since is not None and now - self.awaiting_ack_since >= threshold


@attrs.define(eq=False)
class ResourceTable:
    """A capped, LRU-ordered map of resource id → :class:`ResourceState`.

    Entries pushed out by the cap are kept for :meth:`take_evicted`, so the owner can
    dead-letter a pending message instead of losing it silently.
    """

    max_resources: int
    #: Sequence numbers of new resources start above this (a durable store raises it to the
    #: highest sequence of any resource it forgot, so message ids never repeat).
    seq_floor: int = 0
    #: Entries the cap pushed out that :meth:`take_evicted` has not taken yet (read on
    #: every admission, so a plain attribute: non-empty means there is something to take).
    lru_evicted: list[ResourceState] = attrs.field(factory=list, init=False)
    _entries: OrderedDict[str, ResourceState] = attrs.field(factory=OrderedDict, init=False)
    # Last seq of recently removed resources, so a resource that comes back keeps
    # monotonic message ids (an upstream deduplicating on message id must never see a
    # reused one). Bounded like the table itself.
    _retired: OrderedDict[str, int] = attrs.field(factory=OrderedDict, init=False)
    evicted_lru: int = attrs.field(default=0, init=False)
    evicted_idle: int = attrs.field(default=0, init=False)

    def __len__(self) -> int:
        return len(self._entries)

    def __iter__(self) -> Iterator[ResourceState]:
        return iter(self._entries.values())

    def get(self, resource_id: str) -> ResourceState | None:
        """The entry, without changing its recency. Never blocks."""
        return self._entries.get(resource_id)

    def touch(self, resource_id: str, now: float) -> ResourceState:
        """Get or create the entry, mark it most recently used at ``now``.

        Creating an entry beyond ``max_resources`` evicts the least recently used one
        (O(1)). Never blocks.
        """
        entries = self._entries
        state = entries.get(resource_id)
        if state is None:
            state = ResourceState(resource_id, created_at=now, updated_at=now, last=now)
            state.seq = self._retired.pop(resource_id, self.seq_floor)
            entries[resource_id] = state
            while len(entries) > self.max_resources:
                _, old = entries.popitem(last=False)
                self.evicted_lru += 1
                self._retire(old)
                self.lru_evicted.append(old)
        else:
            state.updated_at = now
            entries.move_to_end(resource_id)
        return state

    def _retire(self, state: ResourceState) -> None:
        if state.seq:
            self._retired[state.resource_id] = state.seq
            if len(self._retired) > self.max_resources:
                self._retired.popitem(last=False)

    def evict_idle(self, now: float, ttl: float) -> list[ResourceState]:
        """Remove entries idle (not updated) for at least ``ttl`` seconds.

        An entry with a pending message is kept (its retry needs the payload cache), so
        eviction never resets the bucket of a resource that is still in flight. Cost is
        proportional to the number of idle entries examined, not the table size.
        """
        cutoff = now - ttl
        idle: list[ResourceState] = []
        for state in self._entries.values():
            if state.updated_at > cutoff:
                break
            idle.append(state)
        removed: list[ResourceState] = []
        for state in idle:
            if state.pending_message_id is not None:
                # Keep it, but move it behind the active ones so the next sweep's
                # early-exit scan is not blocked by it.
                self._entries.move_to_end(state.resource_id)
                continue
            del self._entries[state.resource_id]
            self._retire(state)
            removed.append(state)
        self.evicted_idle += len(removed)
        return removed

    def take_evicted(self) -> list[ResourceState]:
        """Entries the cap pushed out since the last call (oldest first). Never blocks."""
        evicted = self.lru_evicted
        if evicted:  # called on every admission: allocate only when something was pushed out
            self.lru_evicted = []
        return evicted

    def restore(self, state: ResourceState) -> None:
        """Put an entry loaded from the store (at start, before any admission)."""
        self._entries[state.resource_id] = state
