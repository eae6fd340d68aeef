"""Delivery: from an admitted message to its ACK, with every retry in between.

``Delivery`` owns the unconfirmed-message handler (UMH), the deadline scheduler, the router,
the upstream clients, the bounded send channel and the sender pool. A message enters through
:meth:`Delivery.enqueue` (admission) or :meth:`Delivery.readmit` (a dead-letter redrive);
outcomes come back from the sender pool (:meth:`Delivery.on_send_results`) and from ACKs
(:meth:`Delivery.acknowledge`). Every change a restart must see is staged into the store
(fire and forget: the store's writer commits it in the next group); nothing here awaits while
touching shared state.

Persisted per message: the row written at admission, then its attempt history and next due
time after each failed attempt (send failure, NACK) and at each resend (which also carries an
ACK timeout's history entry); deleted on ACK; moved to the dead letters when exhausted.

Longer than 400 lines: delivery owns one message from first send to ACK or dead letter,
including the shutdown flush; splitting it would split that life cycle.
"""

from __future__ import annotations

import logging
import random
from collections.abc import Callable, Sequence
from typing import Any, Final

import attrs
import orjson
import trio

from ..core import event_schemas as ev
from ..core.config import RelayConfig
from ..core.ids import MessageId
from ..core.model import new_tuple
from ..core.resources import ResourceState, ResourceTable
from ..core.routing import HealthPolicy, UpstreamRouter
from ..core.umh import AckOutcome, Attempt, DeadLetter, Due, RetryPolicy, UnconfirmedMessages
from ..core.webhooks import TraceContext
from ..metrics import RelayMetrics, Tally
from ..stores.base import (
    AttemptRecord,
    Changes,
    DeleteMessage,
    MessageRecord,
    Op,
    ResourceRecord,
    Store,
)
from ..tracing import start_trace
from ..upstreams.base import Outbound, SendResult, SendStatus, Upstream
from .deadletters import DeadLetterBook
from .publisher import EventPublisher
from .scheduler import DeadlineScheduler
from .senders import SenderPool

log = logging.getLogger("relay_trio")

#: How long a resend waits before another try when the send channel is full.
DEFER_WHEN_FULL: Final = 1.0


def attempt_records(history: Sequence[Attempt], wall_offset: float) -> tuple[AttemptRecord, ...]:
    """A UMH attempt history (Trio times) as store records (wall-clock times)."""
    return tuple(AttemptRecord(a.at + wall_offset, a.outcome, a.detail) for a in history)


def resource_record(state: ResourceState, wall_offset: float) -> ResourceRecord:
    """The durable part of a resource entry (bucket, sequence, last ACK), in wall-clock time."""
    acked = state.last_acked_at
    return new_tuple(  # one per ACK
        ResourceRecord,
        (
            state.resource_id,
            state.seq,
            state.level,
            state.last + wall_offset,
            None if acked is None else acked + wall_offset,
            state.acked_seq,
        ),
    )


@attrs.define(eq=False)
class Delivery:
    """Sends admitted messages and owns them until they are acknowledged or dead-lettered."""

    config: RelayConfig
    resources: ResourceTable
    store: Store
    dead_letters: DeadLetterBook
    events: EventPublisher
    metrics: RelayMetrics
    upstreams: list[Upstream]
    rng: random.Random
    wall_clock: Callable[[], float]

    umh: UnconfirmedMessages = attrs.field(init=False)
    scheduler: DeadlineScheduler = attrs.field(init=False)
    router: UpstreamRouter = attrs.field(init=False)
    senders: SenderPool = attrs.field(init=False)
    #: Set while shutting down: resends are parked for the shutdown flush.
    draining: bool = attrs.field(init=False, default=False)
    _send_tx: trio.MemorySendChannel[Outbound] = attrs.field(init=False)
    _send_tallies: dict[tuple[int, SendStatus], Tally] = attrs.field(init=False, factory=dict)
    _settled: trio.Event = attrs.field(init=False, factory=trio.Event)
    senders_done: trio.Event = attrs.field(init=False, factory=trio.Event)

    def __attrs_post_init__(self) -> None:
        c = self.config
        self.umh = UnconfirmedMessages(
            RetryPolicy(
                ack_timeout=c.ack_timeout,
                retry_base=c.retry_base,
                retry_cap=c.retry_cap,
                max_attempts=c.max_attempts,
                max_age=c.max_age,
            ),
            self.rng,
            max_dead_letters=c.max_dead_letters,
        )
        self.scheduler = DeadlineScheduler(self.umh, self._on_due)
        self.router = UpstreamRouter(
            c.effective_upstreams,
            HealthPolicy(
                failures_to_down=c.failures_to_down,
                successes_to_up=c.successes_to_up,
                probe_interval=c.probe_interval,
            ),
            self.rng,
        )
        self._send_tx, send_rx = trio.open_memory_channel[Outbound](c.send_queue_size)
        self.senders = SenderPool(
            self.upstreams,
            send_rx,
            self.on_send_results,
            send_timeout=c.send_timeout,
            tasks=c.sender_tasks,
        )

    def _wall_offset(self, now: float) -> float:
        return self.wall_clock() - now

    # -- entry points ----------------------------------------------------------------------

    def enqueue(
        self,
        message_id: str,
        state: ResourceState,
        kind: str | None,
        payload: Any,
        *,
        seq: int,
        upstream: int,
        now: float,
        trace: TraceContext | None = None,
    ) -> str | bool | None:
        """Hand a newly admitted message (``message_id`` is ``f"{resource}:{seq}"``) to the
        senders (first attempt, to upstream index ``upstream``) and track it.

        Returns ``False`` when the send channel is full (nothing changed: the caller answers
        503), else the id of the pending message it superseded (or ``None``). Never blocks.
        """
        try:
            self._send_tx.send_nowait(
                new_tuple(
                    Outbound, (message_id, state.resource_id, kind, payload, 1, upstream, trace)
                )
            )
        except trio.WouldBlock:
            return False
        return self.umh.admit(message_id, state.resource_id, now, seq)

    def readmit(
        self,
        message_id: str,
        state: ResourceState,
        *,
        kind: str | None,
        payload: Any,
        admitted_at: float,
        now: float,
    ) -> bool:
        """Start a redriven dead letter again: same id, fresh attempt count, sent at once
        (or as soon as the send channel has room). ``False`` if the resource has a pending
        message (the caller reports it skipped). Never blocks."""
        if self.umh.pending_for(state.resource_id) is not None:
            return False
        self.umh.restore(message_id, state.resource_id, admitted_at, (), now)
        state.payload, state.kind = payload, kind
        # A dead letter keeps no trace context: the redrive starts a new trace (its
        # webhook-id is still the message id).
        state.trace = start_trace()
        state.payload_seq = MessageId.of(message_id).seq
        state.pending_message_id = message_id
        if state.awaiting_ack_since is None:
            state.awaiting_ack_since = now
        self.scheduler.wake()
        return True

    def restore(
        self,
        message_id: str,
        state: ResourceState,
        admitted_at: float,
        history: tuple[Attempt, ...],
        due: float,
    ) -> None:
        """Re-arm a message loaded from the store at start (sent when ``due`` passes)."""
        self.umh.restore(message_id, state.resource_id, admitted_at, history, due)
        state.pending_message_id = message_id
        if state.awaiting_ack_since is None:
            state.awaiting_ack_since = admitted_at

    def acknowledge(
        self,
        message_id: str,
        status: str,
        reason: str | None,
        retry_after: float | None,
        *,
        synchronous: bool = False,
    ) -> str:
        """Feed one ACK or NACK to the UMH; returns the outcome (acked/nacked/dead/late/unknown).

        Synchronous; never blocks. An ACK for an older message never clears a newer one.
        """
        return self._acknowledged(
            message_id, status, reason, retry_after, trio.current_time(), synchronous=synchronous
        )

    def abandon(self, message_id: str, reason: str) -> bool:
        """Dead-letter a pending message now (eviction, shutdown of a memory store)."""
        now = trio.current_time()
        dead = self.umh.dead_letter_now(message_id, now, reason)
        if dead is None:
            return False
        self._on_dead_letter(dead, now)
        return True

    # -- outcomes --------------------------------------------------------------------------

    def on_send_results(self, batch: Sequence[Outbound], results: Sequence[SendResult]) -> None:
        """Feed one batch's send outcomes to the router, the UMH and the metrics.

        Called once per batch and upstream (the delivery hot path). Synchronous; never blocks.
        The batch's events (``acks`` above all) are published together.
        """
        with self.events.batch():
            self._on_send_results(batch, results)

    def _on_send_results(self, batch: Sequence[Outbound], results: Sequence[SendResult]) -> None:
        now = trio.current_time()
        router = self.router
        tallies = self._send_tallies
        woke = False
        # The synchronous ACKs' store operations, staged as one change set at the end.
        acked: list[Op] = []
        for message, result in zip(batch, results, strict=True):
            index, status = message.upstream, result.status
            tally = tallies.get((index, status))
            if tally is None:
                tally = tallies[index, status] = self.metrics.sends.labels(
                    router.urls[index], status.value
                )
            tally.value += 1  # Tally.inc() inlined: once per send
            if status is SendStatus.FAILED:
                if router.record_failure(index, now):
                    url = router.urls[index]
                    log.warning(
                        "upstream %s marked down after repeated failures",
                        url,
                        extra={"upstream": url},
                    )
                    self.events.emit(ev.upstream_down(url))
                outcome = self.umh.send_failed(
                    message.message_id, now, result.detail, result.retry_after
                )
                if outcome.dead_letter is not None:
                    self._on_dead_letter(outcome.dead_letter, now)
                elif outcome.kind == "retry":
                    self._persist_attempts(message.message_id, message.resource_id, now)
                woke = True
                continue
            if router.record_success(index, now):
                self.events.emit(ev.upstream_up(router.urls[index]))
            if status is SendStatus.ACKED:
                self._acknowledged(
                    message.message_id, "ack", None, None, now, synchronous=True, ops=acked
                )
            else:
                self.umh.sent(message.message_id, now)
                woke = True
        if acked:
            self.store.stage(Changes(acked))
        if woke:
            self.scheduler.wake()

    def _acknowledged(
        self,
        message_id: str,
        status: str,
        reason: str | None,
        retry_after: float | None,
        now: float,
        *,
        synchronous: bool,
        ops: list[Op] | None = None,
    ) -> str:
        """Feed one ACK or NACK to the UMH and stage what it changed. An ACK's store
        operations go to ``ops`` when given (the caller stages them), else are staged now."""
        if status == "ack":
            outcome = self.umh.ack(message_id, now)
        else:
            outcome = self.umh.nack(message_id, now, reason or "nack", retry_after)
            self.scheduler.wake()
        value = outcome.value
        self.metrics.acks[value].value += 1  # Tally.inc() inlined: once per ACK
        if outcome is AckOutcome.ACKED:
            # ACKED: the id was this resource's pending message, so it is one the relay
            # issued ("<resource>:<seq>"); the UMH already checked it matches exactly.
            rid, _, seq_text = message_id.rpartition(":")
            seq = int(seq_text)
            state = self.resources.get(rid)
            if state is not None:
                state.last_acked_at = now
                state.awaiting_ack_since = None
                state.acked_seq = max(state.acked_seq, seq)
                if state.pending_message_id == message_id:
                    state.pending_message_id = None
                    state.trace = None  # only a pending message's retries need it
                # Release the cached payload only if it is the one this ACK covers.
                if state.payload_seq == seq:
                    state.payload = None
            if self.store.keeps_rows:
                staged = [] if ops is None else ops
                staged.append(new_tuple(DeleteMessage, (message_id,)))
                if state is not None:
                    staged.append(resource_record(state, self.wall_clock() - now))
                if ops is None:
                    self.store.stage(Changes(staged))
        elif outcome is AckOutcome.DEAD:
            dead = self.umh.dead_letters.get(message_id)
            if dead is not None:
                self._on_dead_letter(dead, now)
        elif outcome is AckOutcome.NACKED:
            self._persist_attempts(message_id, MessageId.of(message_id).resource_id, now)
        if self.draining:
            self.check_settled()
        self.events.emit(ev.ack_received(message_id, status, value, synchronous, reason))
        return value

    def _persist_attempts(self, message_id: str, resource_id: str, now: float) -> None:
        """Stage the pending message's attempt history and next due time."""
        view = self.umh.pending_for(resource_id)
        if view is None or view.message_id != message_id or not self.store.keeps_rows:
            return
        offset = self._wall_offset(now)
        changes = Changes()
        changes.update_message(
            message_id,
            attempt_records(view.history, offset),
            None if view.deadline is None else view.deadline + offset,
        )
        self.store.stage(changes)

    def _on_due(self, due: list[Due]) -> None:
        now = trio.current_time()
        for item in due:
            if self.draining and item.kind == "resend":
                # The shutdown flush owns pending messages now; park this one for it.
                self.umh.defer(item.message_id, now, self.config.shutdown_timeout)
                continue
            if item.kind == "dead":
                if item.dead_letter is not None:
                    self._on_dead_letter(item.dead_letter, now)
                continue
            state = self.resources.get(item.resource_id)
            if state is None or state.payload is None:
                dead = self.umh.dead_letter_now(item.message_id, now, "evicted")
                if dead is not None:
                    self._on_dead_letter(dead, now)
                continue
            upstream = self.router.pick(item.resource_id)
            assert upstream is not None
            try:
                self._send_tx.send_nowait(
                    Outbound(
                        item.message_id,
                        item.resource_id,
                        state.kind,
                        state.payload,
                        item.attempt,
                        upstream,
                        state.trace,
                    )
                )
            except trio.WouldBlock:
                # Never drop a retry: try again shortly.
                self.umh.defer(item.message_id, now, DEFER_WHEN_FULL)
            else:
                state.payload_seq = MessageId.of(item.message_id).seq
                self.metrics.retries.inc()
                if item.attempt > 1:
                    self._persist_attempts(item.message_id, item.resource_id, now)

    def _on_dead_letter(self, dead: DeadLetter, now: float) -> None:
        state = self.resources.get(dead.resource_id)
        payload = None
        kind = None
        if state is not None:
            state.last_dead_letter = dead
            if state.pending_message_id == dead.message_id:
                state.pending_message_id = None
                state.awaiting_ack_since = None
            if state.payload_seq == MessageId.of(dead.message_id).seq:
                payload, kind = state.payload, state.kind
        index = self.router.pick(dead.resource_id)
        upstream = self.router.urls[index or 0]
        self.dead_letters.record(dead, kind, orjson.dumps(payload), upstream, now)
        if self.draining:
            self.check_settled()

    # -- shutdown --------------------------------------------------------------------------

    def close_sends(self) -> None:
        """No more first sends or resends: the sender pool finishes what is queued."""
        self._send_tx.close()

    def check_settled(self) -> None:
        """Wake :meth:`wait_settled` once nothing is pending any more."""
        if self.draining and self.umh.pending_count() == 0:
            self._settled.set()

    async def wait_settled(self) -> None:
        """Wait until every pending message is acknowledged or dead-lettered."""
        self.check_settled()
        await self._settled.wait()

    async def flush_pending(self, *, sequential: bool) -> None:
        """Deliver every pending message now, bypassing backoff (one attempt each)."""
        groups: dict[int, list[Outbound]] = {}
        for message_id in self.umh.pending_ids():
            rid = MessageId.of(message_id).resource_id
            state = self.resources.get(rid)
            view = self.umh.pending_for(rid)
            if state is None or view is None or state.payload is None:
                continue
            upstream = self.router.pick(rid)
            assert upstream is not None
            groups.setdefault(upstream, []).append(
                Outbound(
                    message_id,
                    rid,
                    state.kind,
                    state.payload,
                    view.attempts + 1,
                    upstream,
                    state.trace,
                )
            )

        async def flush(index: int, batch: list[Outbound]) -> None:
            results = await self.upstreams[index].send_batch(batch, self.config.send_timeout)
            self.on_send_results(batch, results)

        self.events.emit(
            ev.flushing("sequential" if sequential else "parallel", sum(map(len, groups.values())))
        )
        if sequential:
            for index, batch in sorted(groups.items()):
                await flush(index, batch)
        else:
            async with trio.open_nursery() as nursery:
                for index, batch in groups.items():
                    nursery.start_soon(flush, index, batch)

    def abandon_pending(self, reason: str) -> int:
        """Dead-letter everything still unconfirmed (reported, never silently dropped)."""
        count = sum(self.abandon(message_id, reason) for message_id in self.umh.pending_ids())
        if count:
            log.warning("%d message(s) undelivered at %s: dead-lettered", count, reason)
        return count

    # -- tasks -----------------------------------------------------------------------------

    @property
    def send_queue_used(self) -> int:
        """Messages waiting in the send channel."""
        return self._send_tx.statistics().current_buffer_used

    async def run_senders(
        self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED
    ) -> None:
        """The sender pool; :attr:`senders_done` is set when it has finished."""
        try:
            await self.senders.run(task_status=task_status)
        finally:
            self.senders_done.set()

    async def run_prober(
        self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED
    ) -> None:
        """Probe upstreams marked down, on the router's jittered schedule."""
        task_status.started()
        while True:
            next_at = self.router.next_probe_at()
            await trio.sleep_until(
                next_at if next_at is not None else trio.current_time() + self.config.probe_interval
            )
            for index in self.router.due_probes(trio.current_time()):
                ok = False
                with trio.move_on_after(self.config.send_timeout):
                    ok = await self.upstreams[index].probe()
                now = trio.current_time()
                if ok:
                    if self.router.record_success(index, now):
                        self.events.emit(ev.upstream_up(self.router.urls[index]))
                else:
                    self.router.record_failure(index, now)


def message_record(
    message_id: str,
    state: ResourceState,
    *,
    kind: str | None,
    payload_json: bytes,
    admitted_at: float,
    upstream: str,
) -> MessageRecord:
    """The row a newly admitted message is stored as (no attempts, due at once)."""
    return MessageRecord(
        message_id=message_id,
        resource_id=state.resource_id,
        seq=state.seq,
        kind=kind,
        payload=payload_json,
        admitted_at=admitted_at,
        attempts=(),
        due_at=None,
        upstream=upstream,
    )
