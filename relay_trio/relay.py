"""The composition root: builds every part of one relay, injects them, runs them.

``Relay`` owns no decisions of its own. It builds the store, the event hub and publisher,
delivery (UMH, scheduler, senders, router), admission, dead letters and the side queue,
wires them together (each gets what it uses, none calls back into this object) and runs
their long-lived tasks in one nursery. The methods here are the surface the front doors
and the server use; each delegates to the part that owns the decision.

The path of one report: front door → :meth:`Admission.admit` (bucket, id, stage in the
store, hand to delivery) → the front door awaits :meth:`Admission.durable` → 2xx. Delivery's
senders send it; an ACK comes back through :meth:`Delivery.acknowledge`.

Longer than 400 lines: besides wiring (single node, or the cluster node of
:mod:`relay_trio.cluster` with ``store = "nats"``), the composition root holds the two views
that read every part at once (``/v1/status`` and the resource view) and the recovery at start.
"""

from __future__ import annotations

import logging
import random
import time
from collections.abc import Callable, Iterable
from contextlib import AbstractContextManager, aclosing
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal, Protocol, cast

import attrs
import orjson
import trio
import trio_util

from . import __version__
from .core import event_schemas as ev
from .core.config import RelayConfig
from .core.events import TOPICS, EventRing
from .core.model import Accepted, Problem
from .core.resources import ResourceState, ResourceTable
from .core.routing import UpstreamRouter
from .core.umh import Attempt, UnconfirmedMessages
from .core.views import dead_letter_view, pending_view, rfc3339, wall_converter
from .core.webhooks import TraceContext
from .metrics import SIDE_QUEUE_FIGURES, Figure, RelayMetrics
from .services.admission import Admission, forget
from .services.deadletters import DeadLetterBook, page_view
from .services.delivery import Delivery
from .services.hub import EventHub, Subscription
from .services.publisher import META_EVENT_ID, EventPublisher
from .services.redrive import RedriveRequest, redrive
from .services.scheduler import DeadlineScheduler
from .services.senders import SenderPool
from .services.sidequeue import SideQueue
from .sinks.factory import build_sinks
from .stores.base import DeadLetterQuery, Recovered, Store
from .stores.memory import MemoryStore
from .tracing import Tracing, open_tracing
from .upstreams.base import Upstream
from .upstreams.factory import upstream_builder
from .upstreams.file import FileUpstream

if TYPE_CHECKING:
    from .cluster.eventlog import ClusterEventLog
    from .cluster.node import ClusterNode

log = logging.getLogger("relay_trio")

#: Seconds an SSE resumption waits for this instance's event mirror to reach the client's
#: ``Last-Event-ID`` (cluster mode; the mirror usually lags by milliseconds).
RESUME_WAIT = 2.0


class SupportsDrain(Protocol):
    """A front door that can finish its in-flight work within a bound."""

    async def drain(self, timeout: float) -> None: ...  # noqa: ASYNC109


def open_store(config: RelayConfig) -> Store:
    """The store the config names (``sqlite``: ``<data_dir>/relay.db``; ``memory``).

    With ``nats`` the single-node store only backs the idle single-node parts: cluster
    mode keeps everything in JetStream (:mod:`relay_trio.cluster`)."""
    if config.store in ("memory", "nats"):
        store = MemoryStore(config.max_dead_letters, keeps_rows=False)
        store.kind = config.store
        return store
    from .stores.sqlite import SqliteStore

    sync = cast(Literal["normal", "full", "off"], config.store_sync)  # validated by config
    return SqliteStore(
        Path(config.data_dir) / "relay.db",
        sync,
        config.max_dead_letters,
        # Half of the close budget; closing the upstream clients gets the other half.
        flush_budget=config.close_budget / 2,
    )


@attrs.define(eq=False)
class Relay:
    """One relay instance: build it from a config, then ``await nursery.start(relay.run)``."""

    config: RelayConfig
    wall_clock: Callable[[], float] = time.time
    rng: random.Random = attrs.field(factory=random.Random)
    metrics: RelayMetrics = attrs.field(factory=RelayMetrics)
    #: Trace ids and, with ``otel_endpoint`` (or a test's processor), exported spans.
    tracing: Tracing = attrs.field(
        default=attrs.Factory(lambda self: open_tracing(self.config.otel_endpoint), True)
    )
    #: Builds the client for each upstream URL (tests inject in-memory upstreams).
    upstream_factory: Callable[[str, float], Upstream] = attrs.field(
        default=attrs.Factory(
            lambda self: upstream_builder(
                concurrency=self.config.upstream_concurrency,
                max_response_bytes=self.config.upstream_max_response_bytes,
                wall_clock=self.wall_clock,
                signing=self.config.signing_keys(),
                tracing=self.tracing,
            ),
            takes_self=True,
        )
    )
    store: Store = attrs.field(default=attrs.Factory(lambda self: open_store(self.config), True))

    resources: ResourceTable = attrs.field(init=False)
    hub: EventHub = attrs.field(init=False)
    events: EventPublisher = attrs.field(init=False)
    dead_letter_book: DeadLetterBook = attrs.field(init=False)
    delivery: Delivery = attrs.field(init=False)
    admission: Admission = attrs.field(init=False)
    side: SideQueue = attrs.field(init=False)
    ready: trio_util.AsyncBool = attrs.field(init=False, factory=trio_util.AsyncBool)
    draining: bool = attrs.field(init=False, default=False)
    started_at: float = attrs.field(init=False, default=0.0)
    shutdown_requested: trio.Event = attrs.field(init=False, factory=trio.Event)
    shutdown_reason: str = attrs.field(init=False, default="")
    recovered_messages: int = attrs.field(init=False, default=0)
    #: Counters of the front doors the server runs (``http``, ``stream_receiver``).
    front_doors: dict[str, Callable[[], dict[str, int]]] = attrs.field(init=False, factory=dict)
    #: Cluster mode (``store = "nats"``): admission, delivery and dead letters on JetStream.
    cluster: ClusterNode | None = attrs.field(init=False, default=None)
    #: Cluster mode: the one event log across instances (outbox, mirror, older ids).
    cluster_events: ClusterEventLog | None = attrs.field(init=False, default=None)

    def __attrs_post_init__(self) -> None:
        c = self.config
        self.resources = ResourceTable(c.max_resources)
        self.hub = EventHub(
            EventRing(c.event_ring_size, c.event_ring_bytes),
            max_subscribers=c.max_subscribers,
            max_subscribers_per_topic=c.effective_max_subscribers_per_topic,
            subscriber_buffer=c.subscriber_buffer,
            heartbeat_interval=c.heartbeat_interval,
            coalesce_interval=c.coalesce_interval,
            sse_write_budget=c.sse_write_budget,
        )
        instance = ""
        if c.store == "nats":
            from .cluster.eventlog import (
                ClusterEventLog,
                ClusterEventPublisher,
                EventOutbox,
                outbox_prefix,
            )
            from .cluster.node import default_instance_id

            instance = c.instance_id or default_instance_id()
            # Half the stream: what an outage kept, with its loss report, fits in the log.
            outbox = EventOutbox(max(1, c.event_ring_size // 2), outbox_prefix(instance))
            self.events = ClusterEventPublisher(
                self.hub,
                self.store,
                self.metrics,
                self.wall_clock,
                outbox=outbox,
                instance_id=instance,
            )
            self.cluster_events = ClusterEventLog(self.hub, outbox, instance, self.wall_clock)
            self.hub.older = self.cluster_events
        else:
            self.events = EventPublisher(self.hub, self.store, self.metrics, self.wall_clock)
        self.dead_letter_book = DeadLetterBook(
            self.store, self.events, self.metrics, self.wall_clock
        )
        self.delivery = Delivery(
            c,
            self.resources,
            self.store,
            self.dead_letter_book,
            self.events,
            self.metrics,
            [self.upstream_factory(url, c.send_timeout) for url in c.effective_upstreams],
            self.rng,
            self.wall_clock,
        )
        self.side = SideQueue(
            build_sinks(c.side_audit_file, c.side_udp, c.side_webhook, None),
            queue_size=c.side_queue_size,
            timeout=c.side_timeout,
        )
        self.admission = Admission(
            c,
            self.resources,
            self.store,
            self.delivery,
            self.events,
            self.metrics,
            self.side,
            self.wall_clock,
            self.tracing,
        )
        if c.store == "nats":
            from .cluster.node import ClusterNode

            self.cluster = ClusterNode(
                c,
                self.events,
                self.metrics,
                self.router,
                self.upstreams,
                self.wall_clock,
                self.rng,
                instance_id=instance,
            )
            cluster = self.cluster
            assert self.cluster_events is not None
            events = self.cluster_events
            self.metrics.gauge(
                "relay_cluster_connected",
                "1 while this instance has its NATS connection (cluster mode), else 0",
                lambda: float(cluster.connected.value),
            )
            self.metrics.labelled_function(
                "relay_cluster_disconnects_total",
                "Times this instance lost its NATS connection",
                (),
                lambda: {(): cluster.disconnects},
                counter=True,
            )
            self.metrics.gauge(
                "relay_cluster_event_outbox",
                "Events of this instance not yet stored in the event stream",
                lambda: float(events.status()["outbox"]),
            )
            self.metrics.labelled_function(
                "relay_cluster_events_lost_total",
                "Events of this instance dropped from a full outbox while NATS was unreachable",
                (),
                lambda: {(): events.outbox.lost},
                counter=True,
            )
        self._register_gauges()

    # -- the parts, by the names the front doors and tests use ----------------------------

    @property
    def umh(self) -> UnconfirmedMessages:
        """Delivery's unconfirmed-message handler."""
        return self.delivery.umh

    @property
    def router(self) -> UpstreamRouter:
        """Delivery's upstream router."""
        return self.delivery.router

    @property
    def scheduler(self) -> DeadlineScheduler:
        """Delivery's deadline scheduler."""
        return self.delivery.scheduler

    @property
    def senders(self) -> SenderPool:
        """Delivery's sender pool."""
        return self.delivery.senders

    @property
    def upstreams(self) -> list[Upstream]:
        """The upstream clients, in ``effective_upstreams`` order."""
        return self.delivery.upstreams

    def publish(self, topic: str, data: dict[str, Any]) -> None:
        """Publish an arbitrary payload (never blocks; the ring rejects an unknown topic).

        For tests and benchmarks that need load on the event log; the relay's own events
        are built by the constructors of :mod:`relay_trio.core.event_schemas`.
        """
        self.events.publish(topic, data)

    async def subscribe_events(
        self, topics: frozenset[str] | None, last_event_id: int | None
    ) -> Subscription:
        """An SSE subscription (see :meth:`EventHub.subscribe`). A checkpoint.

        Cluster mode: a ``last_event_id`` this instance's mirror has not reached yet (another
        instance gave it to the client a moment ago) is waited for up to
        :data:`RESUME_WAIT` seconds, so the resumption neither repeats nor skips events.
        """
        if self.cluster is not None and last_event_id is not None:
            await self.hub.wait_for(last_event_id, RESUME_WAIT)
        else:
            await trio.lowlevel.checkpoint()
        return self.hub.subscribe(topics, last_event_id)

    def admit(self, obj: object) -> Accepted | Problem:
        """Admit one report (see :meth:`Admission.admit`); await :meth:`durable` before 2xx.

        In cluster mode admission needs NATS round trips: front doors use
        :meth:`admit_cluster` instead, and this answers 503."""
        if self.cluster is not None:
            return Problem(503, "cluster-mode", "Use the HTTP doors in cluster mode")
        return self.admission.admit(obj)

    def batch(self) -> AbstractContextManager[None]:
        """Admissions inside the block are staged as one change set when it ends (see
        :meth:`Admission.batch`); front doors wrap a batch request or a stream read in it."""
        return self.admission.batch()

    async def admit_cluster(self, objs: list[object]) -> list[Accepted | Problem]:
        """Cluster mode: admit ``objs`` cluster-wide; each ``Accepted`` is already stored."""
        assert self.cluster is not None
        return await self.cluster.admit_many(objs)

    async def acknowledge_any(
        self, message_id: str, status: str, reason: str | None, retry_after: float | None
    ) -> str:
        """``POST /v1/acks``: :meth:`acknowledge` and wait for its commit, or in cluster mode
        an ACK/NACK for a message any instance sent. A checkpoint; raises
        :class:`~relay_trio.stores.base.StoreError` if the store (or NATS) cannot take it."""
        if self.cluster is None:
            outcome = self.acknowledge(message_id, status, reason, retry_after)
            await self.all_durable()  # the ACK's change is committed before the answer
            return outcome
        return await self.cluster.acknowledge(message_id, status, reason, retry_after)

    async def durable(self) -> None:
        """Wait until every report admitted so far is committed (see :meth:`Admission.durable`)."""
        await self.admission.durable()

    async def all_durable(self) -> None:
        """Wait until every change staged so far (ACKs included) is committed. A checkpoint;
        raises ``StoreError`` if that commit failed."""
        await self.store.durable(self.store.last_ticket)

    def acknowledge(
        self,
        message_id: str,
        status: str,
        reason: str | None,
        retry_after: float | None,
        *,
        synchronous: bool = False,
    ) -> str:
        """Feed one ACK or NACK to delivery; returns the outcome. Never blocks."""
        return self.delivery.acknowledge(
            message_id, status, reason, retry_after, synchronous=synchronous
        )

    # -- views ---------------------------------------------------------------------------

    def resource_view(self, resource_id: str) -> dict[str, Any] | None:
        """The JSON view of one resource for ``GET /v1/resources/{id}``."""
        state = self.resources.get(resource_id)
        if state is None:
            return None
        now = trio.current_time()
        wall_of = wall_converter(now, self.wall_clock())
        c = self.config
        bucket = self.admission.bucket
        headroom = bucket.headroom(state.level, state.last, now)
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
                "level": round(bucket.drained(state.level, state.last, now), 6),
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

    async def resource_view_any(self, resource_id: str) -> dict[str, Any] | None:
        """``GET /v1/resources/{id}``: :meth:`resource_view`, or in cluster mode the view
        built from the cluster's state (:meth:`ClusterNode.resource_view`). A checkpoint in
        cluster mode; raises ``StoreError`` there when NATS cannot be reached."""
        if self.cluster is not None:
            return await self.cluster.resource_view(resource_id)
        return self.resource_view(resource_id)

    async def dead_letter_page(self, query: DeadLetterQuery) -> dict[str, Any]:
        """``GET /v1/deadletters``: stored dead letters matching ``query``, oldest first."""
        if self.cluster is not None:
            return page_view(await self.cluster.dead_letters(query), 0)
        page = await self.store.query_dead_letters(query)
        return page_view(page, self.store.stats().dead_letters_pruned)

    async def redrive(self, request: RedriveRequest) -> dict[str, Any]:
        """``POST /v1/deadletters:redrive``: see :func:`relay_trio.services.redrive.redrive`
        (cluster mode: :meth:`ClusterNode.redrive`)."""
        if self.cluster is not None:
            return await self.cluster.redrive(request)
        return await redrive(request, self.store, self.delivery, self.resources, self.events)

    def expose_front_door(
        self, name: str, figures: Iterable[Figure], counters: Callable[[], dict[str, int]]
    ) -> None:
        """Show a front door's ``counters()`` in ``/v1/status`` (section ``name``) and as
        the ``figures`` in ``/metrics``. Called once per door, before serving."""
        self.front_doors[name] = counters
        self.metrics.expose(figures, counters)

    def status(self) -> dict[str, Any]:
        """Counters and gauges as JSON (``GET /v1/status``), like NATS ``/varz``."""
        umh = self.umh
        store = self.store.stats()
        return {
            "version": __version__,
            "uptime_seconds": round(trio.current_time() - self.started_at, 3),
            "ready": self.ready.value and not self.draining,
            "draining": self.draining,
            "counters": {
                "reports_received": int(self.metrics.reports_received.value),
                "reports_admitted": int(self.metrics.reports_admitted.value),
                **{f"rejected_{k}": int(v.value) for k, v in self.metrics.rejected.items()},
                **{f"umh_{k}": v for k, v in umh.counters().items()},
                "events_published": self.hub.published,
                "sse_overflowed": self.hub.overflowed,
                "events_dropped": self.hub.dropped,
                "resources_evicted_lru": self.resources.evicted_lru,
                "resources_evicted_idle": self.resources.evicted_idle,
                "recovered_messages": self.recovered_messages,
            },
            "gauges": {
                "pending_messages": umh.pending_count(),
                "resources": len(self.resources),
                "send_queue": self.delivery.send_queue_used,
                "sends_in_flight": self.senders.in_flight,
                "sse_subscribers": self.hub.subscriber_count(),
                "dead_letters_kept": store.dead_letters,
            },
            "store": {"kind": self.store.kind, **attrs.asdict(store)},
            "events": {"first_id": self.hub.ring.first_id, "last_id": self.hub.ring.last_id},
            "upstreams": self.router.states(),
            "side_queue": self.side.stats(),
            **{name: counters() for name, counters in self.front_doors.items()},
            "file_upstream_slow_writes": self._slow_writes(),
            "metrics": self.metrics.snapshot(),
            "config": self.config.summary(),
            **({} if self.cluster is None else {"cluster": self._cluster_status(self.cluster)}),
        }

    def _cluster_status(self, cluster: ClusterNode) -> dict[str, Any]:
        events = {} if self.cluster_events is None else self.cluster_events.status()
        return {**cluster.status(), "events": events}

    def _register_gauges(self) -> None:
        m = self.metrics
        m.gauge("relay_pending_messages", "Messages awaiting ACK or retry", self.umh.pending_count)
        m.gauge("relay_resources", "Resources tracked", lambda: len(self.resources))
        m.gauge(
            "relay_store_pending_rows",
            "Messages stored awaiting ACK or retry",
            lambda: self.store.stats().pending_rows,
        )
        m.gauge(
            "relay_store_dead_letters",
            "Dead letters kept in the store",
            lambda: self.store.stats().dead_letters,
        )
        m.gauge(
            "relay_store_file_bytes",
            "Size of the store's files (database and write-ahead log)",
            lambda: self.store.stats().file_bytes,
        )
        m.labelled_function(
            "relay_store_dead_letters_pruned_total",
            "Dead letters removed to stay within max_dead_letters",
            (),
            lambda: {(): self.store.stats().dead_letters_pruned},
            counter=True,
        )
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
            "Side-queue records dropped, by sink and reason (queue full, or closed)",
            ("sink", "reason"),
            lambda: {
                (name, reason): row[f"dropped_{reason}"]
                for name, row in self.side.stats().items()
                for reason in ("full", "closed")
            },
            counter=True,
        )
        m.expose_rows(SIDE_QUEUE_FIGURES, "sink", self.side.stats)
        m.gauge(
            "relay_store_backlog",
            "Change sets staged in the store but not committed yet",
            lambda: self.store.stats().backlog,
        )
        m.gauge("relay_send_queue", "Messages waiting in the send channel", self._send_queue)
        m.gauge("relay_sends_in_flight", "Sends in progress", lambda: self.senders.in_flight)
        m.labelled_function(
            "relay_sse_overflows_total",
            "SSE subscribers disconnected for falling behind",
            (),
            lambda: {(): self.hub.overflowed},
            counter=True,
        )
        m.labelled_function(
            "relay_file_upstream_slow_writes_total",
            "File-upstream appends slower than SLOW_WRITE (each moved writes to a thread)",
            ("upstream",),
            lambda: {(url,): n for url, n in self._slow_writes().items()},
            counter=True,
        )
        self.store.on_commit = m.observe_commit

    def _send_queue(self) -> int:
        return self.delivery.send_queue_used

    def _slow_writes(self) -> dict[str, int]:
        """Slow appends per file upstream (see :class:`FileUpstream`)."""
        return {u.url: u.slow_writes for u in self.upstreams if isinstance(u, FileUpstream)}

    # -- start: recover what the store holds ----------------------------------------------

    def _recover(self, recovered: Recovered) -> None:
        """Rebuild resources, pending messages and the event id sequence from the store.

        Overdue messages are spread at ``recovery_rate`` per second so a large backlog does
        not stampede the upstream. Synchronous; runs before any front door is open.
        """
        now = trio.current_time()
        offset = self.wall_clock() - now
        self.resources.seq_floor = recovered.meta.get("seq_floor", 0)
        for r in recovered.resources:
            state = ResourceState(r.resource_id, created_at=now, updated_at=now)
            state.seq, state.level, state.last = r.seq, r.level, r.last - offset
            state.last_acked_at = None if r.last_acked_at is None else r.last_acked_at - offset
            state.acked_seq = r.acked_seq
            self.resources.restore(state)
        overdue = 0
        spacing = 1.0 / self.config.recovery_rate
        for m in sorted(recovered.messages, key=lambda m: (m.due_at or 0.0, m.seq)):
            known = self.resources.get(m.resource_id)
            if known is None:
                known = ResourceState(m.resource_id, created_at=now, updated_at=now)
                self.resources.restore(known)
            state = known
            if self.umh.pending_for(m.resource_id) is not None:
                continue  # an older row a crash left behind; the newer one wins
            state.seq = max(state.seq, m.seq)
            state.payload, state.kind, state.payload_seq = orjson.loads(m.payload), m.kind, m.seq
            state.trace = message_trace(m.meta)
            due = now if m.due_at is None else m.due_at - offset
            if due <= now:
                due = now + overdue * spacing
                overdue += 1
            history = tuple(Attempt(a.at - offset, a.outcome, a.detail) for a in m.attempts)
            self.delivery.restore(m.message_id, state, m.admitted_at - offset, history, due)
            self.recovered_messages += 1
        self.events.resume(recovered.meta.get(META_EVENT_ID, 0))
        self.admission.restore_idempotency(recovered.idempotency, offset)
        if self.recovered_messages:
            log.info(
                "recovered %d pending message(s) from the %s store",
                self.recovered_messages,
                self.store.kind,
            )

    # -- tasks ---------------------------------------------------------------------------

    async def _eviction_ticker(
        self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED
    ) -> None:
        interval = self.config.effective_eviction_interval
        task_status.started()
        async with aclosing(trio_util.periodic(interval)) as ticks:
            async for _ in ticks:
                removed = self.resources.evict_idle(trio.current_time(), self.config.resource_ttl)
                if removed:
                    forget(removed, "idle", self.delivery, self.store, self.metrics)

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
        self._stop_admitting()
        self.events.emit(ev.draining(c.shutdown_flush))
        if receiver is not None:
            await receiver.drain(c.receiver_drain_budget)
        if self.cluster is not None:
            # Unacknowledged messages stay in JetStream for the other instances.
            await self.cluster.drain()
            if self.cluster_events is not None:
                await self.cluster_events.flush()  # the draining event and the last reports
            await self.side.drain(c.side_timeout)
            return
        self.delivery.close_sends()
        await self.delivery.senders_done.wait()
        await self.side.drain(c.side_timeout)
        if c.shutdown_flush == "none":
            return
        await self.delivery.flush_pending(sequential=c.shutdown_flush == "sequential")
        # Delivered but not yet confirmed: give the upstream's ACKs the rest of the budget.
        await self.delivery.wait_settled()

    def _stop_admitting(self) -> None:
        self.draining = True
        self.admission.draining = True
        if self.cluster is not None:
            self.cluster.draining = True
        self.delivery.draining = True
        self.ready.value = False

    def finish_shutdown(self) -> None:
        """Last shutdown step (synchronous): report what is still unconfirmed and close
        every SSE stream with a ``system`` ``shutdown`` event. Never blocks.

        With a durable store, undelivered messages stay pending for the next start; only
        the ``memory`` store dead-letters them (reported, never silently dropped).
        """
        self._stop_admitting()
        if self.store.kind == "memory":
            self.delivery.abandon_pending("shutdown")
        elif self.umh.pending_count():
            log.info(
                "%d message(s) undelivered: kept in the %s store for the next start",
                self.umh.pending_count(),
                self.store.kind,
            )
        self.close_streams()

    def close_streams(self) -> None:
        """Send the ``system`` ``shutdown`` event to every SSE subscriber and end streams."""
        if not self.hub.closed:
            # Cluster ids belong to the stream: the local shutdown frame carries none.
            self.hub.close(
                self.shutdown_reason, rfc3339(self.wall_clock()), numbered=self.cluster is None
            )

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Open the store, recover, then run every relay service in one nursery; ready once
        all have started. Raises :class:`~relay_trio.stores.base.StoreError` before starting
        anything if the store cannot be opened.

        Cancelling the surrounding scope ends every task; the store's writer commits what is
        staged and upstream clients are closed on the way out (shielded, bounded).
        """
        self.started_at = trio.current_time()
        if self.cluster is not None:
            await self._run_cluster(self.cluster, task_status)
            return
        self._recover(await self.store.open())
        try:
            async with trio.open_nursery() as nursery:
                await nursery.start(self.store.run)
                await nursery.start(self.hub.run)
                await nursery.start(self.scheduler.run)
                await nursery.start(self.delivery.run_senders)
                await nursery.start(self._eviction_ticker)
                await nursery.start(self.delivery.run_prober)
                await nursery.start(self.side.run)
                self.events.emit(ev.started(self.recovered_messages))
                self.ready.value = True
                task_status.started()
        finally:
            self.ready.value = False
            # The last share of shutdown_timeout (close_budget): see relay_trio/shutdown.py.
            with trio.CancelScope(shield=True), trio.move_on_after(self.config.close_budget / 2):
                for upstream in self.upstreams:
                    await upstream.aclose()
                if self.tracing.exporting:
                    await trio.to_thread.run_sync(self.tracing.shutdown, abandon_on_cancel=True)

    async def _run_cluster(self, cluster: ClusterNode, task_status: trio.TaskStatus[None]) -> None:
        """Cluster mode: the NATS node replaces the store, scheduler and sender pool."""
        try:
            async with trio.open_nursery() as nursery:
                await nursery.start(self.hub.run)
                await nursery.start(cluster.run)
                if self.cluster_events is not None:
                    await nursery.start(
                        self.cluster_events.run, cluster.bridge, cluster.link, cluster.connected
                    )
                await nursery.start(self.delivery.run_prober)
                await nursery.start(self.side.run)
                nursery.start_soon(self._follow_connection, cluster)
                self.events.emit(ev.started(0))
                self.ready.value = True
                task_status.started()
        finally:
            self.ready.value = False
            with trio.CancelScope(shield=True), trio.move_on_after(self.config.close_budget / 2):
                for upstream in self.upstreams:
                    await upstream.aclose()

    async def _follow_connection(self, cluster: ClusterNode) -> None:
        """Readiness follows the NATS connection (false while it is lost)."""
        while True:
            await cluster.connected.wait_value(False)
            self.ready.value = False
            await cluster.connected.wait_value(True)
            self.ready.value = not self.draining


def message_trace(meta: bytes) -> TraceContext | None:
    """The trace context stored with a message row (``None`` for rows without one)."""
    if not meta:
        return None
    try:
        stored = orjson.loads(meta)
    except orjson.JSONDecodeError:
        return None
    return TraceContext.from_meta(stored.get("trace") if isinstance(stored, dict) else None)


__all__ = ["Relay", "open_store"]
