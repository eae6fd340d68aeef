"""Admission: the one path every front door feeds, from a report to a stored message.

``admit`` is synchronous and never blocks: it validates the report, applies the
per-resource leaky bucket, allocates the message id, hands the message to delivery and
stages its row in the store. A front door then awaits :meth:`Admission.durable` before it
answers 2xx, so a 2xx always means the report is committed (seed of issue 13: a crash
after the answer must lose nothing). Rejected reports are never stored but still refresh
the resource's cached payload (latest wins).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any, Final

import attrs
import orjson
import trio

from ..core import event_schemas as ev
from ..core.config import RelayConfig
from ..core.idempotency import IdempotencyKeys, fingerprint
from ..core.limiter import LeakyBucket
from ..core.model import Accepted, Problem, idempotency_mismatch, new_tuple, validate_report
from ..core.resources import ResourceState, ResourceTable
from ..core.webhooks import TraceContext
from ..metrics import RelayMetrics, Tally
from ..stores.base import (
    Changes,
    DeleteMessage,
    IdempotencyRecord,
    MessageRecord,
    Op,
    ResourceRecord,
    Store,
    Ticket,
)
from ..tracing import NO_TRACING, Tracing
from .delivery import Delivery
from .publisher import EventPublisher
from .sidequeue import SideQueue

#: Staged change sets not yet committed beyond which admission answers 503 (the store's
#: writer has fallen behind; accepting more would only grow memory).
MAX_STORE_BACKLOG: Final = 100_000


@attrs.define(eq=False)
class Admission:
    """Admits reports under the per-resource bucket and stages them in the store."""

    config: RelayConfig
    resources: ResourceTable
    store: Store
    delivery: Delivery
    events: EventPublisher
    metrics: RelayMetrics
    side: SideQueue
    wall_clock: Callable[[], float]
    tracing: Tracing = NO_TRACING
    bucket: LeakyBucket = attrs.field(init=False)
    #: Ingest idempotency keys answered within the window (loaded from the store at start).
    idempotency: IdempotencyKeys = attrs.field(init=False)
    #: Set when shutdown starts: every report is answered 503 from then on.
    draining: bool = attrs.field(init=False, default=False)
    _side_enabled: bool = attrs.field(init=False, default=False)
    _ticket: Ticket | None = attrs.field(init=False, default=None)
    #: Operations of the admissions inside batch(), staged together when it ends.
    _batch_ops: list[Op] | None = attrs.field(init=False, default=None)
    _replays: Tally = attrs.field(init=False)
    _mismatches: Tally = attrs.field(init=False)

    def __attrs_post_init__(self) -> None:
        c = self.config
        self.bucket = LeakyBucket.per_minute(c.rate_per_minute, c.burst)
        self._side_enabled = bool(self.side.stats())
        self.idempotency = keys = IdempotencyKeys(c.idempotency_window, c.idempotency_max_keys)
        m = self.metrics
        self._replays = m.tally(
            "relay_idempotent_replays_total",
            "Reports answered from an idempotency key (not admitted again)",
        ).labels()
        self._mismatches = m.tally(
            "relay_idempotency_mismatches_total",
            "Reports refused 422: idempotency key reused for a different report",
        ).labels()
        m.labelled_function(
            "relay_idempotency_keys_removed_total",
            "Idempotency keys forgotten, by cause (expired: window passed; capacity: "
            "idempotency_max_keys reached, oldest first)",
            ("cause",),
            lambda: {("expired",): keys.expired, ("capacity",): keys.evicted},
            counter=True,
        )
        m.gauge("relay_idempotency_keys", "Idempotency keys remembered", lambda: len(keys))

    def restore_idempotency(self, records: list[IdempotencyRecord], wall_offset: float) -> None:
        """Load the keys the store holds (oldest first) at start. Keys past the window or
        beyond the bound are not loaded and are deleted from the store. Never blocks."""
        now = trio.current_time()
        c = self.config
        live = [r for r in records if now - (r.created_at - wall_offset) < c.idempotency_window]
        kept = live[-c.idempotency_max_keys :]
        for r in kept:
            self.idempotency.restore(r.key, r.fingerprint, r.message_id, r.created_at - wall_offset)
        if len(kept) < len(records):
            keep = {r.key for r in kept}
            changes = Changes()
            changes.delete_idempotency_keys([r.key for r in records if r.key not in keep])
            self.store.stage(changes)

    def admit(self, obj: object) -> Accepted | Problem:
        """Validate, rate-limit, queue and stage one report. Synchronous: never blocks.

        Returns the message id on admission, or a problem (422 invalid, 429 rate limited
        or stale ACK, 503 draining, send queue full or store behind). The caller must
        await :meth:`durable` before it tells anyone the report was accepted.
        """
        m = self.metrics
        m.reports_received.value += 1  # Tally.inc() inlined: once per report
        if self.draining:
            m.rejected["draining"].inc()
            return Problem(503, "draining", "Relay is shutting down", retry_after=5.0)
        report = validate_report(obj)
        if isinstance(report, Problem):
            m.rejected["invalid"].inc()
            return report
        now = trio.current_time()
        rid = report.resource_id
        key = report.idempotency_key
        fp = b""
        if key is not None:
            # Before the bucket: a repeat is answered, never admitted or counted again.
            fp = fingerprint(rid, report.kind, report.payload)
            seen = self.idempotency.lookup(key, now)
            if seen is not None:
                if seen.fingerprint != fp:
                    self._mismatches.inc()
                    m.rejected["invalid"].inc()
                    return idempotency_mismatch(key)
                self._replays.inc()
                seq = int(seen.message_id.rpartition(":")[2])
                return Accepted(seen.message_id, rid, seq, replayed=True)
        state = self.resources.touch(rid, now)
        # Latest wins: a rejected report still replaces the cached payload that a retry
        # will resend. payload_seq 0 marks it as carried by no message yet.
        state.payload = report.payload
        state.kind = report.kind
        state.payload_seq = 0
        c = self.config
        if state.is_stale(now, c.stale_ack_threshold):
            return self._reject(state, "stale_ack", c.ack_timeout)
        admitted, level, retry_after = self.bucket.offer(state.level, state.last, now)
        if not admitted:
            if not c.dry_run:
                state.level, state.last = level, now
                return self._reject(state, "rate_limited", retry_after)
            m.dry_run_would_reject.inc()
        if self.store.backlog > MAX_STORE_BACKLOG:
            m.rejected["overloaded"].inc()
            return Problem(503, "overloaded", "Store is behind", retry_after=1.0)
        # Seed 000: never block the select loop. A full send queue is back-pressure to
        # the caller (503), decided before anything is committed.
        seq = state.seq + 1
        message_id = f"{rid}:{seq}"
        router = self.delivery.router
        upstream = router.pick(rid) or 0
        trace = self.tracing.admitted(report.trace, message_id, rid)
        superseded = self.delivery.enqueue(
            message_id,
            state,
            report.kind,
            report.payload,
            seq=seq,
            upstream=upstream,
            now=now,
            trace=trace,
        )
        if superseded is False:
            m.rejected["overloaded"].inc()
            return Problem(503, "overloaded", "Send queue is full", retry_after=1.0)
        if admitted:
            state.level, state.last = level, now
        state.seq = seq
        state.payload_seq = seq
        state.admitted += 1
        state.pending_message_id = message_id
        state.trace = trace
        if state.awaiting_ack_since is None:
            state.awaiting_ack_since = now
        changes = None
        if key is not None:
            changes = Changes()
            offset = self.wall_clock() - now
            forgotten = self.idempotency.remember(key, fp, message_id, now)
            if forgotten:
                changes.delete_idempotency_keys(forgotten)
            changes.put_idempotency_key(IdempotencyRecord(key, fp, message_id, now + offset))
        self._stage(
            changes,
            state,
            message_id,
            kind=report.kind,
            payload=report.payload,
            superseded=superseded,
            upstream=router.urls[upstream],
            now=now,
            trace=trace,
        )
        m.reports_admitted.value += 1
        if isinstance(superseded, str):
            m.superseded.inc()
        self.events.emit(
            ev.report_admitted(
                message_id, rid, report.kind, superseded if isinstance(superseded, str) else None
            )
        )
        if self._side_enabled:
            self.side.offer(
                orjson.dumps(
                    {
                        "message_id": message_id,
                        "resource_id": rid,
                        "kind": report.kind,
                        "payload": report.payload,
                    }
                )
            )
        if self.resources.lru_evicted:  # rare: the table's cap pushed a resource out
            self._evict_pushed_out()
        return new_tuple(Accepted, (message_id, rid, seq, False))

    async def durable(self) -> None:
        """Wait until everything admitted so far is committed to the store.

        A checkpoint (only a cancellation point when nothing was ever staged). Raises
        :class:`~relay_trio.stores.base.StoreError` if the commit failed (the front door
        answers 503: the report may still be delivered, but no 2xx was promised).
        Cancellation does not undo the admission.
        """
        ticket = self._ticket
        if ticket is None:
            # Nothing was ever staged (the memory store keeps no rows): nothing to wait
            # for, and a full scheduler round trip per request measured ~10% of a single
            # POST. Still a cancellation point.
            await trio.lowlevel.checkpoint_if_cancelled()
        else:
            await self.store.durable(ticket)

    def _stage(
        self,
        changes: Changes | None,
        state: ResourceState,
        message_id: str,
        *,
        kind: str | None,
        payload: Any,
        superseded: str | bool | None,
        upstream: str,
        now: float,
        trace: TraceContext,
    ) -> None:
        # The hot path of every admission: records built positionally, one change set
        # (or a share of the batch's one, inside batch()).
        if not self.store.keeps_rows:
            if changes is not None:  # an idempotency key still goes to the store
                self._stage_ops(changes.ops)
            return
        offset = self.wall_clock() - now
        rid = state.resource_id
        acked = state.last_acked_at
        resource = new_tuple(
            ResourceRecord,
            (
                rid,
                state.seq,
                state.level,
                state.last + offset,
                None if acked is None else acked + offset,
                state.acked_seq,
            ),
        )
        message = new_tuple(
            MessageRecord,
            (
                message_id,
                rid,
                state.seq,
                kind,
                orjson.dumps(payload),
                now + offset,
                (),
                None,
                upstream,
                trace_meta(trace),
            ),
        )
        ops: list[Op] = [] if changes is None else changes.ops
        if isinstance(superseded, str):
            ops.append(DeleteMessage(superseded))
        ops += (resource, message)
        self._stage_ops(ops)

    def _stage_ops(self, ops: list[Op]) -> None:
        batch = self._batch_ops
        if batch is None:
            self._ticket = self.store.stage(Changes(ops))
        else:
            batch += ops

    @contextmanager
    def batch(self) -> Iterator[None]:
        """Stage every admission made inside the block as ONE change set when it ends (one
        store call and one ticket for a whole batch request or stream read, not one per
        report), and publish its events together (:meth:`EventPublisher.batch`). For a
        synchronous block: no checkpoint inside. Anything else staged meanwhile (an
        eviction) first flushes what the block admitted so far, so the store sees every
        operation in the order it happened. :meth:`durable` after the block covers it all.
        """
        if self._batch_ops is not None:  # nested: the outer block stages
            yield
            return
        self._batch_ops = []
        try:
            with self.events.batch():  # and publishes the block's events together
                yield
        finally:
            self._flush_batch()
            self._batch_ops = None

    def _flush_batch(self) -> None:
        ops = self._batch_ops
        if ops:
            self._ticket = self.store.stage(Changes(ops))
            self._batch_ops = []

    def _reject(self, state: ResourceState, reason: str, retry_after: float) -> Problem:
        state.rejected += 1
        self.metrics.rejected[reason].inc()
        self.events.emit(ev.report_dropped(state.resource_id, reason))
        title = "Rate limited" if reason == "rate_limited" else "Upstream ACK is stale"
        self._evict_pushed_out()
        return Problem(
            429,
            reason.replace("_", "-"),
            title,
            f"resource {state.resource_id}",
            {"reason": reason},
            retry_after=round(retry_after, 3),
        )

    def _evict_pushed_out(self) -> None:
        """Resources the table's cap pushed out: dead-letter what they had pending, forget
        them in the store (their sequence raises the store's floor)."""
        evicted = self.resources.take_evicted()
        if evicted:
            self._flush_batch()  # the forgetting must come after what was admitted
            forget(evicted, "evicted", self.delivery, self.store, self.metrics)


def trace_meta(trace: TraceContext) -> bytes:
    """A message's stored ``meta``: ``{"trace": <TraceContext.to_meta()>}`` as JSON.

    The common shape (the relay's own trace ids, no ``tracestate``) is formatted directly:
    one is built per admitted report."""
    if trace.tracestate is None and trace.parent_id is not None:
        return b'{"trace":{"trace_id":"%s","flags":"%s","parent_id":"%s"}}' % (
            trace.trace_id.encode(),
            trace.flags.encode(),
            trace.parent_id.encode(),
        )
    return orjson.dumps({"trace": trace.to_meta()})


def forget(
    states: list[ResourceState],
    reason: str,
    delivery: Delivery,
    store: Store,
    metrics: RelayMetrics,
) -> None:
    """Finish removing resources from the table: dead-letter their pending message (never
    lost silently), delete their rows, count the eviction. Never blocks."""
    changes = Changes()
    tally = metrics.evictions.labels(reason)
    for state in states:
        tally.inc()
        if state.pending_message_id is not None:
            delivery.abandon(state.pending_message_id, "evicted")
        changes.delete_resource(state.resource_id, state.seq)
    store.stage(changes)
