"""Cluster-wide admission: the leaky bucket and message sequence of each resource live in one
JetStream KV entry, changed only by compare-and-set on the entry's revision.

:func:`decide` is the pure decision (the single-node :class:`~relay_trio.core.limiter.LeakyBucket`
applied to the entry's state); :class:`CasAdmission` runs it against a :class:`KeyValue` and
retries on a revision conflict, so two instances can never both admit past the bucket or hand
out the same sequence. It is asyncio-agnostic: it only awaits the ``KeyValue`` it is given
(the NATS one on the bridge's loop, or an in-memory one in tests).

A cached entry that would *reject* is trusted without a round trip: every newer revision holds
the same or more admissions, so the real bucket is at least as full (never reset by eviction).
An admission must win the compare-and-set, so it is never decided on a stale copy.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Awaitable, Callable
from typing import Protocol

import attrs
import orjson

from ..core.limiter import LeakyBucket
from .names import token


class Conflict(Exception):
    """The entry's revision is not the one the update expected (or it already exists)."""


class KeyValue(Protocol):
    """The KV operations admission needs (NATS JetStream KV semantics)."""

    async def get(self, key: str) -> tuple[bytes, int] | None:
        """``(value, revision)``, or ``None`` when the key does not exist."""
        ...

    async def create(self, key: str, value: bytes) -> int:
        """Create ``key``; raise :class:`Conflict` if it exists. Returns the revision."""
        ...

    async def update(self, key: str, value: bytes, revision: int) -> int:
        """Replace ``key`` if its revision is ``revision``, else raise :class:`Conflict`."""
        ...


@attrs.frozen
class Entry:
    """A resource's shared state: sequence, bucket (level at wall time ``last``), last ACK
    (when, and the highest sequence acknowledged: redrive's ``superseded`` test)."""

    seq: int = 0
    level: float = 0.0
    last: float = 0.0
    acked_at: float | None = None
    awaiting_since: float | None = None
    acked_seq: int = 0

    def encode(self) -> bytes:
        return orjson.dumps(attrs.asdict(self))

    @classmethod
    def decode(cls, data: bytes) -> Entry:
        return cls(**orjson.loads(data))


@attrs.frozen
class Decision:
    """One arrival decided: admitted with ``seq``, or rejected for ``reason`` (``retry_after``)."""

    admitted: bool
    seq: int = 0
    reason: str = ""
    retry_after: float = 0.0


def decide(
    entry: Entry, now: float, bucket: LeakyBucket, stale_threshold: float, dry_run: bool
) -> tuple[Decision, Entry | None]:
    """Decide one arrival at wall time ``now`` against ``entry``. Pure.

    Returns the decision and the entry to write (``None`` when nothing changes: a rejection
    only drains the bucket, which is a function of time and needs no write).
    """
    if entry.awaiting_since is not None and now - entry.awaiting_since >= stale_threshold:
        return Decision(False, reason="stale_ack", retry_after=stale_threshold), None
    admitted, level, retry_after = bucket.offer(entry.level, entry.last, now)
    if not admitted and not dry_run:
        return Decision(False, reason="rate_limited", retry_after=retry_after), None
    if not admitted:  # dry run: admit, keep the bucket as it was (drained)
        level = bucket.drained(entry.level, entry.last, now)
    seq = entry.seq + 1
    awaiting = entry.awaiting_since if entry.awaiting_since is not None else now
    return Decision(True, seq), attrs.evolve(
        entry, seq=seq, level=level, last=now, awaiting_since=awaiting
    )


@attrs.define(eq=False)
class CasAdmission:
    """Admission against a shared KV with a bounded local cache of the last entry seen."""

    kv: KeyValue
    bucket: LeakyBucket
    stale_threshold: float
    dry_run: bool = False
    cache_size: int = 100_000
    max_tries: int = 64
    #: Awaited after the n-th revision conflict in a row on one arrival (``backoff(n)``):
    #: a randomised pause, so the instance that lost a race (it must re-read, one round
    #: trip more than the winner) is not beaten by the same winner every time. ``None``:
    #: retry at once (tests with an in-memory KV).
    backoff: Callable[[int], Awaitable[None]] | None = None
    #: Revision conflicts met (each costs one more round trip).
    conflicts: int = attrs.field(init=False, default=0)
    _cache: OrderedDict[str, tuple[Entry, int]] = attrs.field(init=False, factory=OrderedDict)

    async def admit(self, resource_id: str, now: float) -> Decision:
        """Decide one arrival for ``resource_id`` at wall time ``now``, cluster-wide.

        Raises :class:`Conflict` only after ``max_tries`` conflicts in a row (a pathological
        hot key), and whatever the KV raises when it cannot be reached.
        """
        key = token(resource_id)
        cached = self._cache.get(key)
        lost = 0
        for _ in range(self.max_tries):
            if cached is None:
                got = await self.kv.get(key)
                cached = (Entry(), 0) if got is None else (Entry.decode(got[0]), got[1])
            entry, revision = cached
            decision, new = decide(entry, now, self.bucket, self.stale_threshold, self.dry_run)
            if new is None:
                if decision.reason == "stale_ack" and revision and key in self._cache:
                    # Another instance may have seen the ACK: confirm on a fresh read.
                    self._cache.pop(key, None)
                    cached = None
                    continue
                self._remember(key, entry, revision)
                return decision
            try:
                if revision == 0:
                    new_revision = await self.kv.create(key, new.encode())
                else:
                    new_revision = await self.kv.update(key, new.encode(), revision)
            except Conflict:
                self.conflicts += 1
                self._cache.pop(key, None)
                cached = None
                lost += 1
                if self.backoff is not None:
                    await self.backoff(lost)
                continue
            self._remember(key, new, new_revision)
            return decision
        raise Conflict(f"{self.max_tries} revision conflicts in a row on {resource_id}")

    async def acknowledged(self, resource_id: str, seq: int, now: float) -> None:
        """Record an ACK of message ``seq`` at ``now``: clears the stale-ACK clock unless a
        newer message was admitted since (an older ACK never clears a newer one)."""
        key = token(resource_id)
        lost = 0
        for _ in range(self.max_tries):
            got = await self.kv.get(key)
            if got is None:
                return
            entry, revision = Entry.decode(got[0]), got[1]
            awaiting = None if entry.seq <= seq else entry.awaiting_since
            new = attrs.evolve(
                entry, acked_at=now, awaiting_since=awaiting, acked_seq=max(entry.acked_seq, seq)
            )
            try:
                new_revision = await self.kv.update(key, new.encode(), revision)
            except Conflict:
                self.conflicts += 1
                lost += 1
                if self.backoff is not None:
                    await self.backoff(lost)
                continue
            self._remember(key, new, new_revision)
            return

    def _remember(self, key: str, entry: Entry, revision: int) -> None:
        cache = self._cache
        cache[key] = (entry, revision)
        cache.move_to_end(key)
        if len(cache) > self.cache_size:
            cache.popitem(last=False)
