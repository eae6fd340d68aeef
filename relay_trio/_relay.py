"""The relay: admission, delivery bookkeeping and the root nursery that owns every service.

``Relay`` owns all shared state (resources table, UMH, router, event hub). Every method
that touches it is synchronous, so no state is ever held across a checkpoint and no lock
is needed. The tasks that drive it (senders, deadline scheduler, eviction ticker, probes)
are thin loops in :meth:`Relay.run`.
"""

from __future__ import annotations

import logging
import random
import time
from collections import OrderedDict
from collections.abc import Callable, Sequence
from contextlib import aclosing
from pathlib import Path
from typing import Any, Final, Protocol

import attrs
import orjson
import trio
import trio_util

from . import __version__
from ._config import RelayConfig
from ._events import TOPICS, EventRing
from ._hub import EventHub
from ._metrics import RelayMetrics, Tally
from ._model import RESOURCE_ID_RE, Accepted, Problem, validate_report
from ._ratelimit import LeakyBucket
from ._resources import ResourceState, ResourceTable
from ._scheduler import DeadlineScheduler
from ._sender import Outbound, SenderPool, SendResult, SendStatus, Upstream, open_upstream
from ._sidequeue import SideQueue, build_sinks
from ._spool import DeadLetterSpool
from ._umh import AckOutcome, DeadLetter, Due, RetryPolicy, UnconfirmedMessages
from ._upstreams import HealthPolicy, UpstreamRouter
from ._views import dead_letter_view, pending_view, rfc3339, wall_converter

log = logging.getLogger("relay_trio")

# How long a resend waits before another try when the send channel is full.
_DEFER_WHEN_FULL: Final = 1.0


def parse_message_id(value: object) -> tuple[str, int] | None:
    """Split ``"<resource_id>:<seq>"``; ``None`` unless both parts are valid."""
    if not isinstance(value, str):
        return None
    rid, sep, seq = value.rpartition(":")
    if not sep or not seq.isdigit() or not seq.isascii() or RESOURCE_ID_RE.fullmatch(rid) is None:
        return None
    number = int(seq)
    return (rid, number) if number >= 1 else None


class SupportsDrain(Protocol):
    """A front door that can finish its in-flight work within a bound."""

    async def drain(self, timeout: float) -> None: ...  # noqa: ASYNC109


@attrs.define(eq=False)
class Relay:
    """One relay instance: build it from a config, then ``await nursery.start(relay.run)``."""

    config: RelayConfig
    wall_clock: Callable[[], float] = time.time
    rng: random.Random = attrs.field(factory=random.Random)
    metrics: RelayMetrics = attrs.field(factory=RelayMetrics)
    #: Builds the client for each upstream URL (tests inject in-memory upstreams).
    upstream_factory: Callable[[str, float], Upstream] = attrs.field(
        default=lambda url, deadline: open_upstream(url, timeout=deadline)
    )

    bucket: LeakyBucket = attrs.field(init=False)
    resources: ResourceTable = attrs.field(init=False)
    umh: UnconfirmedMessages = attrs.field(init=False)
    scheduler: DeadlineScheduler = attrs.field(init=False)
    router: UpstreamRouter = attrs.field(init=False)
    upstreams: list[Upstream] = attrs.field(init=False)
    hub: EventHub = attrs.field(init=False)
    side: SideQueue = attrs.field(init=False)
    spool: DeadLetterSpool = attrs.field(init=False)
    senders: SenderPool = attrs.field(init=False)
    ready: trio_util.AsyncBool = attrs.field(init=False, factory=trio_util.AsyncBool)
    draining: bool = attrs.field(init=False, default=False)
    started_at: float = attrs.field(init=False, default=0.0)
    _side_enabled: bool = attrs.field(init=False, default=False)
    shutdown_requested: trio.Event = attrs.field(init=False, factory=trio.Event)
    shutdown_reason: str = attrs.field(init=False, default="")
    _senders_done: trio.Event = attrs.field(init=False, factory=trio.Event)
    # The payload each kept dead letter carried when it died (bounded like the log).
    _dead_payloads: OrderedDict[str, Any] = attrs.field(init=False, factory=OrderedDict)
    _send_tallies: dict[tuple[int, SendStatus], Tally] = attrs.field(init=False, factory=dict)
    _settled: trio.Event = attrs.field(init=False, factory=trio.Event)
    _send_tx: trio.MemorySendChannel[Outbound] = attrs.field(init=False)

    def __attrs_post_init__(self) -> None:
        c = self.config
        self.bucket = LeakyBucket.per_minute(c.rate_per_minute, c.burst)
        self.resources = ResourceTable(c.max_resources, on_evict=self._on_evict)
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
        urls = c.effective_upstreams
        self.router = UpstreamRouter(
            urls,
            HealthPolicy(
                failures_to_down=c.failures_to_down,
                successes_to_up=c.successes_to_up,
                probe_interval=c.probe_interval,
            ),
            self.rng,
        )
        self.upstreams = [self.upstream_factory(url, c.send_timeout) for url in urls]
        self.hub = EventHub(
            EventRing(c.event_ring_size, c.event_ring_bytes),
            max_subscribers=c.max_subscribers,
            max_subscribers_per_topic=c.effective_max_subscribers_per_topic,
            subscriber_buffer=c.subscriber_buffer,
            heartbeat_interval=c.heartbeat_interval,
            coalesce_interval=c.coalesce_interval,
            write_budget=c.sse_write_budget,
        )
        self.spool = DeadLetterSpool(Path(c.data_dir) / "deadletters.jsonl")
        self.side = SideQueue(
            build_sinks(c.side_audit_file, c.side_udp, c.side_webhook, None),
            queue_size=c.side_queue_size,
            timeout=c.side_timeout,
        )
        self._side_enabled = bool(self.side.stats())
        self._send_tx, send_rx = trio.open_memory_channel[Outbound](c.send_queue_size)
        self.senders = SenderPool(
            self.upstreams,
            send_rx,
            self._on_send_results,
            send_timeout=c.send_timeout,
            tasks=c.sender_tasks,
        )
        self._register_gauges()

    # -- events -------------------------------------------------------------------------

    def publish(self, topic: str, data: dict[str, Any]) -> None:
        """Publish one event (never blocks; the ring rejects an unknown topic)."""
        self.hub.publish(topic, data, rfc3339(self.wall_clock()))
        self.metrics.events_published.inc()

    # -- admission (the one path every front door feeds) ---------------------------------

    def admit(self, obj: object) -> Accepted | Problem:
        """Validate, rate-limit and queue one report. Synchronous: never blocks or awaits.

        Returns the message id on admission, or a problem (422 invalid, 429 rate limited
        or stale ACK, 503 draining or send queue full). A rejected report still refreshes
        the resource's cached payload (latest wins).
        """
        m = self.metrics
        m.reports_received.inc()
        if self.draining:
            m.rejected["draining"].inc()
            return Problem(503, "draining", "Relay is shutting down", retry_after=5.0)
        report = validate_report(obj)
        if isinstance(report, Problem):
            m.rejected["invalid"].inc()
            return report
        now = trio.current_time()
        rid = report.resource_id
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
        # Seed 000: never block the select loop. A full send queue is back-pressure to
        # the caller (503), decided before anything is committed.
        upstream = self.router.pick(rid)
        assert upstream is not None
        message_id = f"{rid}:{state.seq + 1}"
        try:
            self._send_tx.send_nowait(
                Outbound(message_id, rid, report.kind, report.payload, 1, upstream)
            )
        except trio.WouldBlock:
            m.rejected["overloaded"].inc()
            return Problem(503, "overloaded", "Send queue is full", retry_after=1.0)
        if admitted:
            state.level, state.last = level, now
        state.seq += 1
        state.payload_seq = state.seq
        state.admitted += 1
        state.pending_message_id = message_id
        if state.awaiting_ack_since is None:
            state.awaiting_ack_since = now
        superseded = self.umh.admit(message_id, rid, now)
        m.reports_admitted.inc()
        event: dict[str, Any] = {"message_id": message_id, "resource_id": rid, "kind": report.kind}
        if superseded is not None:
            m.superseded.inc()
            event["superseded"] = superseded
        self.publish("reports", event)
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
        return Accepted(message_id, rid, state.seq)

    def _reject(self, state: ResourceState, reason: str, retry_after: float) -> Problem:
        state.rejected += 1
        self.metrics.rejected[reason].inc()
        self.publish("drops", {"resource_id": state.resource_id, "reason": reason})
        title = "Rate limited" if reason == "rate_limited" else "Upstream ACK is stale"
        return Problem(
            429,
            reason.replace("_", "-"),
            title,
            f"resource {state.resource_id}",
            {"reason": reason},
            retry_after=round(retry_after, 3),
        )

    # -- delivery outcomes -----------------------------------------------------------------

    def _on_send_results(self, batch: Sequence[Outbound], results: Sequence[SendResult]) -> None:
        """Feed one batch's send outcomes to the router, the UMH and the metrics.

        Called once per batch and upstream (per-report cost matters: this is the delivery
        hot path). Synchronous; never blocks.
        """
        now = trio.current_time()
        router = self.router
        tallies = self._send_tallies
        woke = False
        for message, result in zip(batch, results, strict=True):
            index, status = message.upstream, result.status
            tally = tallies.get((index, status))
            if tally is None:
                tally = tallies[index, status] = self.metrics.sends.labels(
                    router.urls[index], status.value
                )
            tally.inc()
            if status is SendStatus.FAILED:
                if router.record_failure(index, now):
                    url = router.urls[index]
                    log.warning(
                        "upstream %s marked down after repeated failures",
                        url,
                        extra={"upstream": url},
                    )
                    self.publish("system", {"kind": "upstream_down", "upstream": url})
                outcome = self.umh.send_failed(message.message_id, now, result.detail)
                if outcome.dead_letter is not None:
                    self._on_dead_letter(outcome.dead_letter)
                woke = True
                continue
            if router.record_success(index, now):
                self.publish("system", {"kind": "upstream_up", "upstream": router.urls[index]})
            if status is SendStatus.ACKED:
                self._acknowledged(message.message_id, "ack", None, None, now, synchronous=True)
            else:
                self.umh.sent(message.message_id, now)
                woke = True
        if woke:
            self.scheduler.wake()

    def acknowledge(
        self,
        message_id: str,
        status: str,
        reason: str | None,
        retry_after: float | None,
        *,
        synchronous: bool = False,
    ) -> str:
        """Feed one ACK or NACK to the UMH; returns the outcome (acked/nacked/late/unknown).

        Synchronous; never blocks. An ACK for an older message never clears a newer one.
        """
        return self._acknowledged(
            message_id, status, reason, retry_after, trio.current_time(), synchronous=synchronous
        )

    def _acknowledged(
        self,
        message_id: str,
        status: str,
        reason: str | None,
        retry_after: float | None,
        now: float,
        *,
        synchronous: bool,
    ) -> str:
        if status == "ack":
            outcome = self.umh.ack(message_id, now)
        else:
            outcome = self.umh.nack(message_id, now, reason or "nack", retry_after)
            self.scheduler.wake()
        self.metrics.acks["nacked" if outcome is AckOutcome.DEAD else outcome.value].inc()
        rid, _, seq = message_id.rpartition(":")
        if outcome is AckOutcome.ACKED:
            state = self.resources.get(rid)
            if state is not None:
                state.last_acked_at = now
                state.awaiting_ack_since = None
                if state.pending_message_id == message_id:
                    state.pending_message_id = None
                # Release the cached payload only if it is the one this ACK covers.
                if str(state.payload_seq) == seq:
                    state.payload = None
        elif outcome is AckOutcome.DEAD:
            dead = self.umh.dead_letters.get(message_id)
            if dead is not None:
                self._on_dead_letter(dead)
        if self.draining:
            self._check_settled()
        self.publish(
            "acks",
            {
                "message_id": message_id,
                "status": status,
                "outcome": outcome,
                "synchronous": synchronous,
                **({"reason": reason} if reason else {}),
            },
        )
        return outcome.value

    def _on_due(self, due: list[Due]) -> None:
        now = trio.current_time()
        for item in due:
            if self.draining and item.kind == "resend":
                # The shutdown flush owns pending messages now; park this one for it.
                self.umh.defer(item.message_id, now, self.config.shutdown_timeout)
                continue
            if item.kind == "dead":
                if item.dead_letter is not None:
                    self._on_dead_letter(item.dead_letter)
                continue
            state = self.resources.get(item.resource_id)
            if state is None:
                dead = self.umh.dead_letter_now(item.message_id, now, "evicted")
                if dead is not None:
                    self._on_dead_letter(dead)
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
                    )
                )
            except trio.WouldBlock:
                # Never drop a retry: try again shortly.
                self.umh.defer(item.message_id, now, _DEFER_WHEN_FULL)
            else:
                state.payload_seq = int(item.message_id.rpartition(":")[2])
                self.metrics.retries.inc()

    def _on_dead_letter(self, dead: DeadLetter) -> None:
        state = self.resources.get(dead.resource_id)
        if state is not None:
            state.last_dead_letter = dead
            if state.pending_message_id == dead.message_id:
                state.pending_message_id = None
                state.awaiting_ack_since = None
        reason = dead.reason if dead.reason in self.metrics.dead_letters else "max_attempts"
        self.metrics.dead_letters[reason].inc()
        log.warning(
            "dead letter %s (%s)",
            dead.message_id,
            dead.reason,
            extra={"message_id": dead.message_id, "resource_id": dead.resource_id},
        )
        if self.draining:
            self._check_settled()
        payload = state.payload if state is not None else None
        self._dead_payloads[dead.message_id] = payload
        while len(self._dead_payloads) > self.config.max_dead_letters:
            self._dead_payloads.popitem(last=False)
        wall_of = wall_converter(trio.current_time(), self.wall_clock())
        self.spool.offer(orjson.dumps({**dead_letter_view(dead, wall_of), "payload": payload}))
        self.publish(
            "deadletter",
            {
                "message_id": dead.message_id,
                "resource_id": dead.resource_id,
                "reason": dead.reason,
                "attempts": len(dead.attempts),
            },
        )

    def _on_evict(self, state: ResourceState, reason: str) -> None:
        self.metrics.evictions.labels(reason).inc()
        if state.pending_message_id is not None:
            dead = self.umh.dead_letter_now(
                state.pending_message_id, trio.current_time(), "evicted"
            )
            if dead is not None:
                self._on_dead_letter(dead)

    # -- views ---------------------------------------------------------------------------

    def resource_view(self, resource_id: str) -> dict[str, Any] | None:
        """The JSON view of one resource for ``GET /v1/resources/{id}``."""
        state = self.resources.get(resource_id)
        if state is None:
            return None
        now = trio.current_time()
        wall_of = wall_converter(now, self.wall_clock())
        c = self.config
        headroom = self.bucket.headroom(state.level, state.last, now)
        pending = self.umh.pending_for(resource_id)
        return {
            "resource_id": resource_id,
            "seq": state.seq,
            "admitted": state.admitted,
            "rejected": state.rejected,
            "created_at": wall_of(state.created_at),
            "updated_at": wall_of(state.updated_at),
            "last_acked_at": wall_of(state.last_acked_at),
            "awaiting_ack_since": wall_of(state.awaiting_ack_since),
            "stale_ack": state.is_stale(now, c.stale_ack_threshold),
            "bucket": {
                "level": round(self.bucket.drained(state.level, state.last, now), 6),
                "burst": c.burst,
                "rate_per_minute": c.rate_per_minute,
                "available": round(max(0.0, headroom), 6),
            },
            "upstream": self.router.urls[self.router.pick(resource_id) or 0],
            "pending": None if pending is None else pending_view(pending, wall_of),
            "has_cached_payload": state.payload is not None,
            "last_dead_letter": None
            if state.last_dead_letter is None
            else dead_letter_view(state.last_dead_letter, wall_of),
        }

    def dead_letter_page(self, after: int, limit: int) -> dict[str, Any]:
        """``GET /v1/deadletters``: dead letters with index > ``after``, oldest first."""
        wall_of = wall_converter(trio.current_time(), self.wall_clock())
        items = self.umh.dead_letters.page(after, limit)
        return {
            "dead_letters": [
                {**dead_letter_view(d, wall_of), "payload": self._dead_payloads.get(d.message_id)}
                for d in items
            ],
            "next_after": items[-1].index if items else after,
            "evicted": self.umh.dead_letters.evicted,
        }

    def status(self) -> dict[str, Any]:
        """Counters and gauges as JSON (``GET /v1/status``), like NATS ``/varz``."""
        umh = self.umh
        return {
            "version": __version__,
            "uptime_seconds": round(trio.current_time() - self.started_at, 3),
            "ready": self.ready.value and not self.draining,
            "draining": self.draining,
            "counters": {
                # The tallies themselves: a registry lookup per figure would collect every
                # metric each time (the snapshot below already collects once).
                "reports_received": int(self.metrics.reports_received.value),
                "reports_admitted": int(self.metrics.reports_admitted.value),
                **{f"rejected_{k}": int(v.value) for k, v in self.metrics.rejected.items()},
                **{f"umh_{k}": v for k, v in umh.counters().items()},
                "events_published": self.hub.published,
                "sse_overflowed": self.hub.overflowed,
                "resources_evicted_lru": self.resources.evicted_lru,
                "resources_evicted_idle": self.resources.evicted_idle,
            },
            "gauges": {
                "pending_messages": umh.pending_count(),
                "resources": len(self.resources),
                "send_queue": self._send_tx.statistics().current_buffer_used,
                "sends_in_flight": self.senders.in_flight,
                "sse_subscribers": self.hub.subscriber_count(),
                "dead_letters_kept": len(umh.dead_letters),
            },
            "events": {"first_id": self.hub.ring.first_id, "last_id": self.hub.ring.last_id},
            "upstreams": self.router.states(),
            "side_queue": self.side.stats(),
            "metrics": self.metrics.snapshot(),
            "config": self.config.summary(),
        }

    def _register_gauges(self) -> None:
        m = self.metrics
        m.gauge(
            "relay_pending_messages",
            "Messages awaiting ACK or retry",
            self.umh.pending_count,
        )
        m.gauge("relay_resources", "Resources tracked", lambda: len(self.resources))
        m.labelled_function(
            "relay_events_dropped_total",
            "Events not delivered to SSE subscribers that fell behind",
            (),
            lambda: {(): self.hub.dropped},
            counter=True,
        )
        m.labelled_function(
            "relay_upstream_up",
            "1 while an upstream is up, 0 while marked down",
            ("upstream",),
            lambda: {(s["url"],): float(s["up"]) for s in self.router.states()},
        )
        m.labelled_function(
            "relay_sse_subscribers",
            "SSE subscribers receiving each topic",
            ("topic",),
            lambda: {(t,): self.hub.subscriber_count(t) for t in sorted(TOPICS)},
        )
        m.labelled_function(
            "relay_side_queue_drops_total",
            "Side-queue records dropped (queue full or closed), by sink",
            ("sink",),
            lambda: {
                (name,): row["dropped_full"] + row["dropped_closed"]
                for name, row in self.side.stats().items()
            },
            counter=True,
        )

    # -- tasks ---------------------------------------------------------------------------

    async def _eviction_ticker(
        self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED
    ) -> None:
        interval = self.config.effective_eviction_interval
        task_status.started()
        async with aclosing(trio_util.periodic(interval)) as ticks:
            async for _ in ticks:
                now = trio.current_time()
                self.resources.evict_idle(now, self.config.resource_ttl)

    async def _prober(
        self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED
    ) -> None:
        task_status.started()
        while True:
            next_at = self.router.next_probe_at()
            await trio.sleep_until(
                next_at if next_at is not None else trio.current_time() + self.config.probe_interval
            )
            for index in self.router.due_probes(trio.current_time()):
                ok = await self._probe(index)
                now = trio.current_time()
                if ok:
                    if self.router.record_success(index, now):
                        self.publish(
                            "system", {"kind": "upstream_up", "upstream": self.router.urls[index]}
                        )
                else:
                    self.router.record_failure(index, now)

    async def _run_senders(
        self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED
    ) -> None:
        try:
            await self.senders.run(task_status=task_status)
        finally:
            self._senders_done.set()

    # -- shutdown ------------------------------------------------------------------------

    def request_shutdown(self, reason: str) -> None:
        """Ask for a staged shutdown (signal or admin route). Idempotent; never blocks."""
        if not self.shutdown_requested.is_set():
            self.shutdown_reason = reason
            self.shutdown_requested.set()

    async def drain(self, receiver: SupportsDrain | None = None) -> None:
        """Stage shutdown: stop admitting, finish in-flight sends, flush pending work.

        The caller bounds this with a cancel scope and then calls :meth:`finish_shutdown`,
        whether or not the drain completed. Order: readiness false and new reports get
        503; the stream receiver drains; queued and in-flight sends finish; pending retries
        are delivered per ``shutdown_flush`` (``sequential``: one upstream at a time;
        ``parallel``: all at once; ``none``: not at all), then outstanding ACKs are awaited.
        """
        c = self.config
        self.draining = True
        self.ready.value = False
        self.publish("system", {"kind": "draining", "flush": c.shutdown_flush})
        if receiver is not None:
            await receiver.drain(c.receiver_drain_budget)
        self._send_tx.close()
        await self._senders_done.wait()
        await self.side.drain(c.side_timeout)
        if c.shutdown_flush == "none":
            return
        await self._flush_pending(sequential=c.shutdown_flush == "sequential")
        # Delivered but not yet confirmed: give the upstream's ACKs the rest of the budget.
        self._check_settled()
        await self._settled.wait()

    def _check_settled(self) -> None:
        if self.draining and self.umh.pending_count() == 0:
            self._settled.set()

    def finish_shutdown(self) -> None:
        """Last shutdown step (synchronous): report what is still unconfirmed and close
        every SSE stream with a ``system`` ``shutdown`` event. Never blocks."""
        self.draining = True
        self.ready.value = False
        self.abandon_pending("shutdown")
        self.close_streams()

    async def _flush_pending(self, *, sequential: bool) -> None:
        """Deliver every pending message now, bypassing backoff (one attempt each)."""
        groups: dict[int, list[Outbound]] = {}
        for message_id in self.umh.pending_ids():
            rid = message_id.rpartition(":")[0]
            state = self.resources.get(rid)
            view = self.umh.pending_for(rid)
            if state is None or view is None or state.payload is None:
                continue
            upstream = self.router.pick(rid)
            assert upstream is not None
            groups.setdefault(upstream, []).append(
                Outbound(message_id, rid, state.kind, state.payload, view.attempts + 1, upstream)
            )

        async def flush(index: int, batch: list[Outbound]) -> None:
            results = await self.upstreams[index].send_batch(batch, self.config.send_timeout)
            self._on_send_results(batch, results)

        self.publish(
            "system",
            {
                "kind": "flush",
                "mode": "sequential" if sequential else "parallel",
                "messages": sum(map(len, groups.values())),
            },
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
        now = trio.current_time()
        count = 0
        for message_id in self.umh.pending_ids():
            dead = self.umh.dead_letter_now(message_id, now, reason)
            if dead is not None:
                self._on_dead_letter(dead)
                count += 1
        if count:
            log.warning("%d message(s) undelivered at %s: dead-lettered and spooled", count, reason)
        return count

    def close_streams(self) -> None:
        """Send the ``system`` ``shutdown`` event to every SSE subscriber and end streams."""
        if not self.hub.closed:
            self.hub.close(
                {"kind": "shutdown", "reason": self.shutdown_reason}, rfc3339(self.wall_clock())
            )

    async def _probe(self, index: int) -> bool:
        with trio.move_on_after(self.config.send_timeout):
            return await self.upstreams[index].probe()
        return False

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Run every relay service in one nursery; ready once all have started.

        Cancelling the surrounding scope ends every task; upstream clients are closed on
        the way out (shielded, bounded).
        """
        self.started_at = trio.current_time()
        try:
            async with trio.open_nursery() as nursery:
                await nursery.start(self.hub.run)
                await nursery.start(self.scheduler.run)
                await nursery.start(self._run_senders)
                await nursery.start(self._eviction_ticker)
                await nursery.start(self._prober)
                await nursery.start(self.side.run)
                await nursery.start(self.spool.run)
                self.publish("system", {"kind": "started"})
                self.ready.value = True
                task_status.started()
        finally:
            self.ready.value = False
            with trio.CancelScope(shield=True), trio.move_on_after(5):
                for upstream in self.upstreams:
                    await upstream.aclose()


__all__ = ["Relay", "parse_message_id"]
