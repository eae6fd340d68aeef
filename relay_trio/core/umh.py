"""Unconfirmed-message handler (UMH): who owns a report between its first send and its ACK.

Pure bookkeeping: every method takes ``now`` and none of them blocks, awaits or reads a clock,
so a single Trio task (:mod:`relay_trio.services.scheduler`) can drive it and tests can drive it with
plain numbers.

Per resource at most one message is *pending*: a newer report supersedes the older one, and an
ACK for an older message never clears a newer one (the stale-ACK bug of the StackRox VM relay).
A pending message is in one of three phases:

* ``in_flight``: being sent (after :meth:`UnconfirmedMessages.admit` or after a ``resend``
  :class:`Due`); no deadline, the sender reports back with ``sent``/``send_failed``.
* ``awaiting_ack``: upstream accepted it; the ACK deadline is armed.
* ``retry_wait``: an attempt failed; the retry deadline is armed.

Deadlines live in one binary heap of ``(deadline, token, entry)`` with lazy deletion: cancelling
a deadline only zeroes the entry's token, so arm and cancel are ``O(log n)`` / ``O(1)``, and the
heap is rebuilt when stale tuples outnumber live ones two to one.  Message ids are
``"<resource_id>:<seq>"``; the UMH relies on that shape to find the pending entry from an id with
one dict keyed by resource (no second index), which keeps a pending entry under ~300 bytes.

Longer than 400 lines: one state machine whose invariants (one pending message per
resource, lazy heap deletion, bounded history) span every method.
"""

from __future__ import annotations

import enum
import heapq
import itertools
import math
import random
from collections import OrderedDict, deque
from collections.abc import Iterator
from typing import Final, Literal

import attrs

from .ids import MessageId

#: Below this many stale heap tuples the heap is never compacted (rebuilding is not worth it).
_COMPACT_MIN: Final = 1024
#: Largest page :meth:`DeadLetterLog.page` returns, like every other paged API of the relay.
MAX_PAGE: Final = 1000


class Phase(enum.StrEnum):
    """Where a pending message is in its send/ACK cycle."""

    IN_FLIGHT = "in_flight"
    AWAITING_ACK = "awaiting_ack"
    RETRY_WAIT = "retry_wait"


class MessageState(enum.StrEnum):
    """Lifecycle state of a message the UMH knows about (pending or recently finished)."""

    PENDING = "pending"
    ACKED = "acked"
    SUPERSEDED = "superseded"
    DEAD = "dead"


class AckOutcome(enum.StrEnum):
    """What an ACK or NACK did. Compares equal to its string value."""

    #: ACK for the resource's current pending message: it is done.
    ACKED = "acked"
    #: NACK for the current pending message: a retry is armed.
    NACKED = "nacked"
    #: NACK for the current pending message that exhausted it: it is now a dead letter.
    DEAD = "dead"
    #: A message we know of that is no longer pending (older, superseded, acked, dead).
    LATE = "late"
    #: Never seen, malformed, or forgotten (beyond ``max_history``).
    UNKNOWN = "unknown"


def _positive(_inst: object, attribute: attrs.Attribute[float], value: float) -> None:
    if not value > 0 or math.isinf(value):
        raise ValueError(f"{attribute.name} must be a positive finite number, got {value!r}")


@attrs.frozen
class RetryPolicy:
    """ACK deadline, retry backoff and exhaustion limits (seconds). Validated on construction."""

    ack_timeout: float = attrs.field(default=30.0, validator=_positive)
    retry_base: float = attrs.field(default=30.0, validator=_positive)
    retry_cap: float = attrs.field(default=600.0, validator=_positive)
    max_attempts: int = attrs.field(default=10, validator=attrs.validators.ge(1))
    max_age: float = attrs.field(default=14400.0, validator=_positive)

    def backoff(self, attempt: int, rng: random.Random) -> float:
        """Full-jitter delay after failed attempt number ``attempt`` (1-based).

        ``rng.uniform(0, min(retry_cap, retry_base * 2**(attempt-1)))``; consumes exactly one
        random number. Raises ``ValueError`` for ``attempt < 1``.
        """
        if attempt < 1:
            raise ValueError(f"attempt must be >= 1, got {attempt}")
        # Exponent capped so huge attempt numbers cannot overflow a float (2**62 * base >> cap).
        ceiling = min(self.retry_cap, self.retry_base * 2.0 ** min(attempt - 1, 62))
        return rng.uniform(0.0, ceiling)

    def bound_retry_after(self, retry_after: float) -> float | None:
        """An upstream's ``retry_after`` clamped to ``[0, retry_cap]``; ``None`` if NaN."""
        if math.isnan(retry_after):
            return None
        return min(max(retry_after, 0.0), self.retry_cap)


@attrs.frozen
class Attempt:
    """One failed delivery attempt: when, how (``send_failed``/``nack``/``ack_timeout``), why."""

    at: float
    outcome: str
    detail: str


@attrs.frozen
class DeadLetter:
    """A message the UMH gave up on. ``index`` is its position in :class:`DeadLetterLog`."""

    message_id: str
    resource_id: str
    reason: str
    admitted_at: float
    dead_at: float
    attempts: tuple[Attempt, ...]
    index: int = 0


@attrs.frozen
class Outcome:
    """Result of :meth:`UnconfirmedMessages.send_failed`.

    ``kind`` is ``"retry"`` (``retry_at`` set), ``"dead"`` (``dead_letter`` set) or
    ``"ignored"`` (the message was no longer pending, e.g. superseded while it was being sent).
    """

    kind: Literal["retry", "dead", "ignored"]
    retry_at: float | None = None
    dead_letter: DeadLetter | None = None


@attrs.frozen
class Due:
    """An expired deadline that needs the caller's action.

    ``kind == "resend"``: fetch the payload and send the message again; ``attempt`` is the
    1-based number of that send attempt; the message is in flight until ``sent``,
    ``send_failed``, ``ack``, ``nack`` or ``defer``.
    ``kind == "dead"``: the ACK timeout exhausted the message; ``dead_letter`` says why and
    ``attempt`` is the number of failed attempts.
    """

    kind: Literal["resend", "dead"]
    message_id: str
    resource_id: str
    attempt: int
    deadline: float
    dead_letter: DeadLetter | None = None


@attrs.frozen
class PendingView:
    """Snapshot of a resource's pending message (for ``GET /v1/resources/{id}``)."""

    message_id: str
    resource_id: str
    admitted_at: float
    phase: Phase
    attempts: int
    deadline: float | None
    history: tuple[Attempt, ...]


@attrs.define(eq=False, weakref_slot=False)
class _Entry:
    # Kept to 7 slots: this object exists once per pending message (1M at the memory target).
    message_id: str
    resource_id: str
    admitted_at: float
    phase: Phase = Phase.IN_FLIGHT
    deadline: float | None = None
    # Heap token of the armed deadline; 0 = none. A heap tuple is live iff its token matches.
    token: int = 0
    # None until the first failure: most messages are acked at once and never need one.
    # A tuple (rebuilt per failure, at most max_attempts long) is 40 bytes smaller than a list.
    history: tuple[Attempt, ...] | None = None


# on_setattr=NO_OP: validators run in __init__ only; attrs would otherwise wrap every
# attribute write (every counter increment) in a validating __setattr__.
@attrs.define(eq=False, on_setattr=attrs.setters.NO_OP)
class DeadLetterLog:
    """Bounded, append-only log of dead letters, oldest evicted first. Never blocks.

    Each entry gets a monotonic ``index`` (1, 2, ...); page with ``after=<last index seen>``.
    """

    capacity: int = attrs.field(validator=attrs.validators.ge(1))
    total: int = attrs.field(default=0, init=False)
    _items: deque[DeadLetter] = attrs.field(factory=deque, init=False, repr=False)
    _by_id: dict[str, DeadLetter] = attrs.field(factory=dict, init=False, repr=False)

    def record(
        self,
        message_id: str,
        resource_id: str,
        reason: str,
        *,
        admitted_at: float,
        dead_at: float,
        attempts: tuple[Attempt, ...],
    ) -> DeadLetter:
        """Append a dead letter (evicting the oldest beyond ``capacity``) and return it."""
        self.total += 1
        dl = DeadLetter(message_id, resource_id, reason, admitted_at, dead_at, attempts, self.total)
        self._items.append(dl)
        self._by_id[message_id] = dl
        if len(self._items) > self.capacity:
            old = self._items.popleft()
            if self._by_id.get(old.message_id) is old:
                del self._by_id[old.message_id]
        return dl

    def page(self, after: int = 0, limit: int = 100) -> list[DeadLetter]:
        """Up to ``limit`` (clamped to 1..1000) dead letters with ``index > after``, oldest first.

        Copies only the page. Entries evicted before ``after`` are simply skipped; compare
        the first returned index with ``after + 1`` (or use :attr:`evicted`) to detect a gap.
        """
        limit = min(max(limit, 1), MAX_PAGE)
        if not self._items:
            return []
        start = max(0, after + 1 - self._items[0].index)
        return list(itertools.islice(self._items, start, start + limit))

    def get(self, message_id: str) -> DeadLetter | None:
        """The retained dead letter for ``message_id``, if any."""
        return self._by_id.get(message_id)

    @property
    def evicted(self) -> int:
        """How many dead letters were dropped to stay within ``capacity``."""
        return self.total - len(self._items)

    def __len__(self) -> int:
        return len(self._items)

    def __iter__(self) -> Iterator[DeadLetter]:
        return iter(self._items)


@attrs.define(eq=False, on_setattr=attrs.setters.NO_OP)
class UnconfirmedMessages:
    """Tracks every sent-but-unacknowledged message: ACK deadlines, retries, dead letters.

    Nothing here blocks, awaits or raises for unexpected ids (only :meth:`admit` validates its
    input). Memory is bounded: one entry per pending message (at most one per resource), at
    most ``max_history`` remembered finished ids and ``max_dead_letters`` dead letters. A
    message's attempt history holds at most ``policy.max_attempts`` entries, because the
    ``max_attempts``-th failure dead-letters it.
    """

    policy: RetryPolicy
    rng: random.Random
    max_dead_letters: int = attrs.field(default=10_000, validator=attrs.validators.ge(1))
    max_history: int = attrs.field(default=100_000, validator=attrs.validators.ge(0))
    dead_letters: DeadLetterLog = attrs.field(
        init=False,
        default=attrs.Factory(lambda self: DeadLetterLog(self.max_dead_letters), takes_self=True),
    )
    # Counters (monotonic, plain ints).
    admitted: int = attrs.field(default=0, init=False)
    acked: int = attrs.field(default=0, init=False)
    late_acks: int = attrs.field(default=0, init=False)
    unknown_acks: int = attrs.field(default=0, init=False)
    nacks: int = attrs.field(default=0, init=False)
    send_failures: int = attrs.field(default=0, init=False)
    ack_timeouts: int = attrs.field(default=0, init=False)
    retries: int = attrs.field(default=0, init=False)
    deferred: int = attrs.field(default=0, init=False)
    dead_lettered: int = attrs.field(default=0, init=False)
    superseded: int = attrs.field(default=0, init=False)
    _pending: dict[str, _Entry] = attrs.field(repr=False, factory=dict, init=False)
    _finished: OrderedDict[str, MessageState] = attrs.field(
        repr=False, factory=OrderedDict, init=False
    )
    _heap: list[tuple[float, int, _Entry]] = attrs.field(repr=False, factory=list, init=False)
    _armed: int = attrs.field(default=0, init=False)
    _timeout_detail: str = attrs.field(
        init=False,
        repr=False,
        default=attrs.Factory(
            lambda self: f"no ack within {self.policy.ack_timeout:g}s", takes_self=True
        ),
    )
    _tokens: Iterator[int] = attrs.field(repr=False, factory=lambda: itertools.count(1), init=False)

    # ------------------------------------------------------------------ events from the relay

    def admit(
        self, message_id: str, resource_id: str, now: float, seq: int | None = None
    ) -> str | None:
        """Track a new message whose first send is now in flight (no deadline yet).

        If the resource had a pending older message it becomes SUPERSEDED (its deadline is
        cancelled) and its id is returned so the caller can drop its payload. Raises
        ``ValueError`` if ``message_id`` is not ``"<resource_id>:<seq>"`` or its seq is not
        newer than the pending message's. A caller that built the id itself passes ``seq``
        and vouches that ``message_id == f"{resource_id}:{seq}"`` (the parse is skipped).
        """
        if seq is None:
            parts = MessageId.split(message_id)
            if parts is None or parts[0] != resource_id:
                raise ValueError(f"message id {message_id!r} is not '{resource_id}:<seq>'")
            seq = parts[1]
        old = self._pending.get(resource_id)
        old_id: str | None = None
        if old is not None:
            # Every pending id was checked on its way in: "<resource_id>:<decimal seq>".
            if seq <= int(old.message_id.rpartition(":")[2]):
                raise ValueError(f"message id {message_id!r} is not newer than {old.message_id!r}")
            old_id = old.message_id
            self._finish(old, MessageState.SUPERSEDED)
            self.superseded += 1
        self._pending[resource_id] = _Entry(message_id, resource_id, now)
        self.admitted += 1
        return old_id

    def restore(
        self,
        message_id: str,
        resource_id: str,
        admitted_at: float,
        history: tuple[Attempt, ...],
        deadline: float,
    ) -> None:
        """Track a message carried over from elsewhere (a restart, a dead-letter redrive):
        it waits for a retry at ``deadline`` with its earlier ``history`` (empty for a fresh
        attempt count). Raises ``ValueError`` for a malformed id or if the resource already
        has a pending message.
        """
        parts = MessageId.split(message_id)
        if parts is None or parts[0] != resource_id:
            raise ValueError(f"message id {message_id!r} is not '{resource_id}:<seq>'")
        if resource_id in self._pending:
            raise ValueError(f"resource {resource_id!r} already has a pending message")
        self._finished.pop(message_id, None)
        e = _Entry(message_id, resource_id, admitted_at, history=history or None)
        self._pending[resource_id] = e
        self._arm(e, deadline, Phase.RETRY_WAIT)

    def sent(self, message_id: str, now: float) -> None:
        """A send succeeded without a synchronous ACK: arm the ACK deadline ``now+ack_timeout``.

        Ignored unless the message is pending and in flight (it may have been superseded,
        acked or nacked while the send was running).
        """
        e = self._lookup(message_id)
        if e is not None and e.phase is Phase.IN_FLIGHT:
            self._arm(e, now + self.policy.ack_timeout, Phase.AWAITING_ACK)

    def send_failed(
        self, message_id: str, now: float, reason: str, retry_after: float | None = None
    ) -> Outcome:
        """A send attempt failed: record it and arm a retry, or dead-letter it.

        The retry is at ``now + retry_after`` (the upstream's ``Retry-After``, clamped to
        ``[0, retry_cap]`` exactly like a NACK's) or, without one, ``now + backoff``.
        Dead-letters when attempts reach ``max_attempts`` or the message is ``max_age`` old.
        The message is never dropped silently. ``Outcome("ignored")`` if it is not pending.
        """
        e = self._lookup(message_id)
        if e is None:
            return Outcome("ignored")
        self.send_failures += 1
        return self._fail(e, now, "send_failed", reason, retry_after)

    def ack(self, message_id: str, now: float) -> AckOutcome:
        """Record an upstream ACK.

        ``ACKED`` only if ``message_id`` is its resource's current pending message (any phase);
        ``LATE`` for a known older/finished id (it never touches a newer pending message);
        ``UNKNOWN`` otherwise. Late and unknown ACKs are counted, never errors.
        """
        e = self._lookup(message_id)
        if e is None:
            return self._not_pending(message_id)
        self._finish(e, MessageState.ACKED)
        self.acked += 1
        return AckOutcome.ACKED

    def nack(
        self, message_id: str, now: float, reason: str, retry_after: float | None = None
    ) -> AckOutcome:
        """Record an upstream NACK for the current pending message.

        Counts a failed attempt and arms a retry at ``now + retry_after`` (clamped to
        ``[0, retry_cap]``) or ``now + backoff``; returns ``NACKED``, or ``DEAD`` when that
        exhausted the message. If the message is already waiting for a retry (its attempt was
        already counted, e.g. by an ACK timeout) the NACK is not counted again; a
        ``retry_after`` can only postpone that retry. Old/unknown ids: ``LATE``/``UNKNOWN``.
        """
        e = self._lookup(message_id)
        if e is None:
            return self._not_pending(message_id)
        self.nacks += 1
        if e.phase is Phase.RETRY_WAIT:
            bounded = None if retry_after is None else self.policy.bound_retry_after(retry_after)
            if bounded is not None and (e.deadline is None or now + bounded > e.deadline):
                self._arm(e, now + bounded, Phase.RETRY_WAIT)
            return AckOutcome.NACKED
        result = self._fail(e, now, "nack", reason, retry_after)
        return AckOutcome.DEAD if result.kind == "dead" else AckOutcome.NACKED

    def defer(self, message_id: str, now: float, delay: float) -> None:
        """The message could not be handed to the sender (channel full): retry at ``now+delay``.

        Not an attempt. Only applies to a pending in-flight message (others already have a
        deadline, or are gone); a negative or NaN delay counts as 0.
        """
        e = self._lookup(message_id)
        if e is None or e.phase is not Phase.IN_FLIGHT:
            return
        delay = delay if delay > 0 else 0.0
        self.deferred += 1
        self._arm(e, now + delay, Phase.RETRY_WAIT)

    def dead_letter_now(self, message_id: str, now: float, reason: str) -> DeadLetter | None:
        """Give up on a pending message at once (shutdown, eviction). ``None`` if not pending."""
        e = self._lookup(message_id)
        if e is None:
            return None
        return self._dead(e, now, reason)

    def pop_due(self, now: float, limit: int | None = None) -> list[Due]:
        """Process expired deadlines (``deadline <= now``) in deadline order.

        An expired ACK deadline is a failed attempt (``ack_timeout``): it arms a retry, or
        yields a ``"dead"`` :class:`Due`. An expired retry deadline yields a ``"resend"``
        :class:`Due` and leaves the message in flight. ``limit`` caps how many expirations
        are processed in this call (so a caller can yield between batches).
        """
        out: list[Due] = []
        processed = 0
        # One shared string, not one per message: a mass timeout must not allocate N copies.
        timeout_detail = self._timeout_detail
        while limit is None or processed < limit:
            heap = self._heap  # re-read: _fail may compact (replace) the heap
            if not heap or heap[0][0] > now:
                break
            deadline, token, e = heapq.heappop(heap)
            if e.token != token:
                continue
            processed += 1
            e.token = 0
            e.deadline = None
            self._armed -= 1
            if e.phase is Phase.AWAITING_ACK:
                self.ack_timeouts += 1
                result = self._fail(e, now, "ack_timeout", timeout_detail, None)
                if result.dead_letter is not None:
                    dl = result.dead_letter
                    out.append(
                        Due("dead", e.message_id, e.resource_id, len(dl.attempts), deadline, dl)
                    )
            else:
                e.phase = Phase.IN_FLIGHT
                self.retries += 1
                attempt = (len(e.history) if e.history else 0) + 1
                out.append(Due("resend", e.message_id, e.resource_id, attempt, deadline))
        return out

    # ------------------------------------------------------------------ queries

    def next_deadline(self) -> float | None:
        """The earliest armed deadline over pending messages, or ``None``. Amortised O(1)."""
        heap = self._heap
        while heap:
            deadline, token, e = heap[0]
            if e.token == token:
                return deadline
            heapq.heappop(heap)
        return None

    def state_of(self, message_id: str) -> MessageState | None:
        """PENDING, or the final state of a recently finished message, or ``None``."""
        if self._lookup(message_id) is not None:
            return MessageState.PENDING
        return self._finished.get(message_id)

    def pending_for(self, resource_id: str) -> PendingView | None:
        """Snapshot of the resource's pending message, or ``None``."""
        e = self._pending.get(resource_id)
        if e is None:
            return None
        history = e.history or ()
        return PendingView(
            e.message_id, e.resource_id, e.admitted_at, e.phase, len(history), e.deadline, history
        )

    def pending_ids(self) -> list[str]:
        """Ids of all pending messages (a copy; O(n), for shutdown flushes and tests)."""
        return [e.message_id for e in self._pending.values()]

    def pending_count(self) -> int:
        """Number of pending messages (at most one per resource)."""
        return len(self._pending)

    def armed_count(self) -> int:
        """Number of pending messages with an armed deadline (not in flight)."""
        return self._armed

    def heap_size(self) -> int:
        """Heap length including stale tuples (exposed for tests and metrics)."""
        return len(self._heap)

    def counters(self) -> dict[str, int]:
        """All counters and gauges as a JSON-ready dict (for ``/v1/status`` and metrics)."""
        return {
            "admitted": self.admitted,
            "acked": self.acked,
            "late_acks": self.late_acks,
            "unknown_acks": self.unknown_acks,
            "nacks": self.nacks,
            "send_failures": self.send_failures,
            "ack_timeouts": self.ack_timeouts,
            "retries": self.retries,
            "deferred": self.deferred,
            "dead_lettered": self.dead_lettered,
            "superseded": self.superseded,
            "pending": len(self._pending),
            "armed": self._armed,
        }

    # ------------------------------------------------------------------ internals

    def _lookup(self, message_id: str) -> _Entry | None:
        # A dict key, not a parse: the exact-match test below turns any malformed id into a
        # miss, and this runs on every send and ACK (MessageId.split would double its cost).
        e = self._pending.get(message_id.rpartition(":")[0])
        if e is None or e.message_id != message_id:
            return None
        return e

    def _not_pending(self, message_id: str) -> AckOutcome:
        if message_id in self._finished:
            self.late_acks += 1
            return AckOutcome.LATE
        # Forgotten or never recorded, but older than the resource's current message: late.
        parts = MessageId.split(message_id)
        current = None if parts is None else self._pending.get(parts[0])
        if parts is not None and current is not None:
            current_parts = MessageId.split(current.message_id)
            if current_parts is not None and parts[1] < current_parts[1]:
                self.late_acks += 1
                return AckOutcome.LATE
        self.unknown_acks += 1
        return AckOutcome.UNKNOWN

    def _fail(
        self, e: _Entry, now: float, outcome: str, detail: str, retry_after: float | None
    ) -> Outcome:
        attempt = Attempt(now, outcome, detail)
        history = e.history = (attempt,) if e.history is None else (*e.history, attempt)
        policy = self.policy
        if len(history) >= policy.max_attempts:
            return Outcome("dead", dead_letter=self._dead(e, now, "max_attempts"))
        if now - e.admitted_at >= policy.max_age:
            return Outcome("dead", dead_letter=self._dead(e, now, "max_age"))
        bounded = None if retry_after is None else policy.bound_retry_after(retry_after)
        delay = policy.backoff(len(history), self.rng) if bounded is None else bounded
        retry_at = now + delay
        self._arm(e, retry_at, Phase.RETRY_WAIT)
        return Outcome("retry", retry_at=retry_at)

    def _dead(self, e: _Entry, now: float, reason: str) -> DeadLetter:
        self._finish(e, MessageState.DEAD)
        self.dead_lettered += 1
        attempts = e.history or ()
        return self.dead_letters.record(
            e.message_id,
            e.resource_id,
            reason,
            admitted_at=e.admitted_at,
            dead_at=now,
            attempts=attempts,
        )

    def _finish(self, e: _Entry, state: MessageState) -> None:
        del self._pending[e.resource_id]
        self._disarm(e)
        if self.max_history:
            finished = self._finished
            finished[e.message_id] = state
            finished.move_to_end(e.message_id)
            if len(finished) > self.max_history:
                finished.popitem(last=False)

    def _arm(self, e: _Entry, deadline: float, phase: Phase) -> None:
        if e.token:
            self._armed -= 1  # the old tuple becomes stale
        token = next(self._tokens)
        e.token = token
        e.deadline = deadline
        e.phase = phase
        heap = self._heap
        heapq.heappush(heap, (deadline, token, e))
        self._armed += 1
        if len(heap) - self._armed > _COMPACT_MIN:  # cheap pre-check on the hot path
            self._maybe_compact()

    def _disarm(self, e: _Entry) -> None:
        e.deadline = None
        if e.token:
            e.token = 0
            self._armed -= 1
            self._maybe_compact()

    def _maybe_compact(self) -> None:
        stale = len(self._heap) - self._armed
        if stale > _COMPACT_MIN and stale > 2 * self._armed:
            # Rebuilding is O(live); it runs after >= 2*live cancellations, so O(1) amortised.
            heap = [t for t in self._heap if t[2].token == t[1]]
            heapq.heapify(heap)
            self._heap = heap
