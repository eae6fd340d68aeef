"""Prometheus metrics for one relay, in a registry of its own.

Counters on the report path are :class:`Tally` objects: a plain attribute add per
``inc()``. prometheus-client's own ``Counter`` takes a lock and checks observability on
every increment (measured: ~22 us of ~60 us per admitted report end to end); the relay
runs on one Trio thread, so the lock buys nothing. Tallies are exposed through a
collector at scrape time, with the same names and types as real counters.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from functools import partial
from typing import Any

import attrs
from prometheus_client import CollectorRegistry, Gauge, Histogram
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.exposition import generate_latest
from prometheus_client.registry import Collector

REJECT_REASONS = (
    "rate_limited",
    "stale_ack",
    "invalid",
    "malformed",
    "too_large",
    "draining",
    "overloaded",
    "unauthorized",
)
ACK_OUTCOMES = ("acked", "late", "unknown", "nacked", "dead")
DEAD_REASONS = ("max_attempts", "max_age", "evicted", "shutdown")


@attrs.frozen
class Figure:
    """One figure an owner counts itself, exposed at scrape time: ``key`` in the owner's
    ``counters()`` dict, the metric ``name`` (``_total`` for counters, base units), help."""

    key: str
    name: str
    doc: str
    counter: bool = True


#: The stream receiver's :meth:`~relay_trio.stream.receiver.StreamReceiver.counters`.
STREAM_RECEIVER_FIGURES = (
    Figure("connections_open", "relay_stream_connections", "Stream connections open", False),
    Figure(
        "connections_refused",
        "relay_stream_connections_refused_total",
        "Stream connections refused (at capacity, or draining)",
    ),
    Figure("lines_ok", "relay_stream_lines_admitted_total", "Stream lines admitted"),
    Figure(
        "lines_rejected",
        "relay_stream_lines_rejected_total",
        "Stream lines answered with a problem",
    ),
    Figure(
        "idle_timeouts",
        "relay_stream_idle_timeouts_total",
        "Stream connections closed after stream_idle_timeout without a line",
    ),
    Figure(
        "frames_too_large",
        "relay_stream_frames_too_large_total",
        "Stream lines over stream_max_frame (each closed its connection)",
    ),
    Figure(
        "auth_failures",
        "relay_stream_auth_failures_total",
        "Stream connections closed for a missing or wrong token",
    ),
    Figure(
        "buffer_high_water",
        "relay_stream_read_buffer_high_water_bytes",
        "Largest per-connection stream read buffer seen",
        False,
    ),
)

#: The HTTP front door's ``counters()`` (``relay_trio.server.HttpFrontDoor``).
HTTP_FRONT_DOOR_FIGURES = (
    Figure("connections_open", "relay_http_connections", "HTTP connections open", False),
    Figure(
        "refused",
        "relay_http_connections_refused_total",
        "HTTP connections closed at accept: http_max_connections reached, all serving",
    ),
    Figure(
        "evicted",
        "relay_http_connections_evicted_total",
        "Waiting HTTP connections closed to make room for a new one",
    ),
    Figure(
        "read_timeouts",
        "relay_http_read_timeouts_total",
        "HTTP connections closed after http_read_timeout without a complete request",
    ),
    Figure(
        "accept_failures",
        "relay_http_accept_failures_total",
        "HTTP accepts that failed for lack of file descriptors or memory",
    ),
    Figure(
        "write_timeouts",
        "relay_http_write_timeouts_total",
        "HTTP connections closed by the write watchdog (a peer that stopped reading)",
    ),
)

#: Side-queue counters per sink (:meth:`~relay_trio.services.sidequeue.SideQueue.stats`).
SIDE_QUEUE_FIGURES = (
    Figure("offered", "relay_side_queue_offered_total", "Records offered to a side sink"),
    Figure("written", "relay_side_queue_written_total", "Records a side sink wrote"),
    Figure(
        "failed",
        "relay_side_queue_failed_total",
        "Records in side-sink batches that timed out or raised",
    ),
    Figure("timeouts", "relay_side_queue_batch_timeouts_total", "Side-sink batches timed out"),
    Figure("errors", "relay_side_queue_batch_errors_total", "Side-sink batches that raised"),
    Figure("queued", "relay_side_queue_queued", "Records waiting in a side queue", False),
    Figure("in_flight", "relay_side_queue_in_flight", "Records a side sink is writing", False),
)


@attrs.define(eq=False, slots=False)
class RelayMetrics:
    """Every metric of the relay. Gauges that mirror state are read at scrape time."""

    registry: CollectorRegistry = attrs.field(factory=lambda: CollectorRegistry(auto_describe=True))

    def __attrs_post_init__(self) -> None:
        r = self.registry
        self.reports_received = self.tally(
            "relay_reports_received_total", "Reports received on any front door"
        ).labels()
        self.reports_admitted = self.tally(
            "relay_reports_admitted_total", "Reports admitted and queued for sending"
        ).labels()
        rejected = self.tally(
            "relay_reports_rejected_total", "Reports rejected, by reason", ("reason",)
        )
        self.rejected = {reason: rejected.labels(reason) for reason in REJECT_REASONS}
        self.dry_run_would_reject = self.tally(
            "relay_dry_run_would_reject_total",
            "Reports admitted in dry-run mode that the limiter would have rejected",
        ).labels()
        self.sends = self.tally(
            "relay_sends_total", "Send attempts, by upstream and outcome", ("upstream", "outcome")
        )
        acks = self.tally(
            "relay_acks_total", "ACK/NACK messages received, by outcome", ("outcome",)
        )
        self.acks = {outcome: acks.labels(outcome) for outcome in ACK_OUTCOMES}
        self.retries = self.tally("relay_retries_total", "Resends scheduled by the UMH").labels()
        dead = self.tally(
            "relay_dead_letters_total", "Messages dead-lettered, by reason", ("reason",)
        )
        self.dead_letters = {reason: dead.labels(reason) for reason in DEAD_REASONS}
        self.superseded = self.tally(
            "relay_superseded_total", "Pending messages superseded by a newer report"
        ).labels()
        self.evictions = self.tally(
            "relay_resource_evictions_total", "Resources evicted, by reason", ("reason",)
        )
        self.events_published = self.tally(
            "relay_events_published_total", "Events published to the event log"
        ).labels()
        self.request_seconds = Histogram(
            "relay_http_request_duration_seconds",
            "HTTP request latency by route",
            ["route"],
            registry=r,
            buckets=(0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5),
        )

        self.store_commit_seconds = Histogram(
            "relay_store_commit_duration_seconds",
            "Time to commit one group of store changes",
            registry=r,
            buckets=(0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.5),
        )
        # Batch size = committed change sets / commits (two counters, so a rate() of each
        # gives the mean batch size over any window).
        self.store_commits = self.tally(
            "relay_store_commits_total", "Store transactions committed"
        ).labels()
        self.store_committed = self.tally(
            "relay_store_committed_changes_total", "Change sets committed by the store"
        ).labels()

    def observe_commit(self, seconds: float, batch_size: int) -> None:
        """Record one store commit (called by the store's writer after each transaction)."""
        self.store_commit_seconds.observe(seconds)
        self.store_commits.inc()
        self.store_committed.inc(batch_size)

    def count_refused(self, reason: str) -> None:
        """Count one report a front door refused before admission (malformed, too large,
        unauthorized): it was received and rejected, so received = admitted + rejected
        holds for every door. ``reason`` is one of :data:`REJECT_REASONS`. Never blocks."""
        self.reports_received.inc()
        self.rejected[reason].inc()

    def tally(self, name: str, doc: str, labels: tuple[str, ...] = ()) -> TallyFamily:
        """Register a counter family backed by plain ints (see the module docstring)."""
        family = TallyFamily(name, doc, labels)
        self.registry.register(family)
        return family

    def gauge(self, name: str, doc: str, read: Callable[[], float]) -> None:
        """Register a gauge whose value is read from the relay's state at scrape time."""
        g = Gauge(name, doc, registry=self.registry)
        g.set_function(read)

    def labelled_function(
        self,
        name: str,
        doc: str,
        labels: tuple[str, ...],
        read: Callable[[], Mapping[tuple[str, ...], float]],
        *,
        counter: bool = False,
    ) -> None:
        """Register a labelled counter or gauge read from its owner's state at scrape time.

        For figures the owner already counts (side-queue drops, SSE subscribers): nothing
        is recorded twice and the hot path pays nothing. ``read`` must not block.
        """
        self.registry.register(_Callback(name, doc, labels, read, counter))

    def expose(self, figures: Iterable[Figure], read: Callable[[], Mapping[str, float]]) -> None:
        """Register each figure, read from ``read()[figure.key]`` at scrape time.

        ``read`` must not block; it is called once per figure per scrape.
        """
        for figure in figures:
            self.labelled_function(
                figure.name, figure.doc, (), partial(_one, read, figure.key), counter=figure.counter
            )

    def expose_rows(
        self,
        figures: Iterable[Figure],
        label: str,
        read: Callable[[], Mapping[str, Mapping[str, float]]],
    ) -> None:
        """Like :meth:`expose` for one row of figures per ``label`` value (one per sink)."""
        for figure in figures:
            self.labelled_function(
                figure.name,
                figure.doc,
                (label,),
                partial(_column, read, figure.key),
                counter=figure.counter,
            )

    def snapshot(self) -> dict[str, Any]:
        """Every sample as JSON (for ``/v1/status``): ``name: value`` when unlabelled, else
        ``name: [{label: ..., "value": v}, ...]``. Histogram buckets are left out (count and
        sum stay). Never blocks."""
        out: dict[str, Any] = {}
        for family in self.registry.collect():
            for sample in family.samples:
                if sample.name.endswith(("_bucket", "_created")):
                    continue
                if sample.labels:
                    out.setdefault(sample.name, []).append({**sample.labels, "value": sample.value})
                else:
                    out[sample.name] = sample.value
        return out

    def value(self, name: str, **labels: str) -> int:
        """Current value of one counter sample (0 if never recorded)."""
        return int(self.registry.get_sample_value(name, labels) or 0)

    def render(self) -> bytes:
        """The Prometheus text exposition of every metric."""
        return generate_latest(self.registry)


def _one(read: Callable[[], Mapping[str, float]], key: str) -> dict[tuple[str, ...], float]:
    return {(): read()[key]}


def _column(
    read: Callable[[], Mapping[str, Mapping[str, float]]], key: str
) -> dict[tuple[str, ...], float]:
    return {(name,): row[key] for name, row in read().items() if key in row}


@attrs.define(eq=False)
class Tally:
    """One counter value. ``inc`` never blocks; only the owning Trio thread may call it."""

    value: float = 0.0

    def inc(self, amount: float = 1.0) -> None:
        self.value += amount


@attrs.define(eq=False)
class TallyFamily(Collector):
    """A labelled family of :class:`Tally` counters, collected as a Prometheus counter.

    Label values come from the relay's own fixed sets and its upstream list, never from
    caller input, so the family stays small.
    """

    name: str
    doc: str
    labelnames: tuple[str, ...]
    _children: dict[tuple[str, ...], Tally] = attrs.field(factory=dict, init=False)

    def labels(self, *values: str) -> Tally:
        """The child for these label values (created on first use)."""
        child = self._children.get(values)
        if child is None:
            if len(values) != len(self.labelnames):
                raise ValueError(f"{self.name} takes labels {self.labelnames}, got {values}")
            child = self._children[values] = Tally()
        return child

    def describe(self) -> Iterable[Metric]:
        return [CounterMetricFamily(self.name, self.doc, labels=self.labelnames)]

    def collect(self) -> Iterable[Metric]:
        family = CounterMetricFamily(self.name, self.doc, labels=self.labelnames)
        for values, child in self._children.items():
            family.add_metric(list(values), child.value)
        return [family]


@attrs.define(eq=False)
class _Callback(Collector):
    """A collector whose samples come from a function, evaluated at each scrape."""

    name: str
    doc: str
    labels: tuple[str, ...]
    read: Callable[[], Mapping[tuple[str, ...], float]]
    counter: bool

    def _family(self) -> CounterMetricFamily | GaugeMetricFamily:
        kind = CounterMetricFamily if self.counter else GaugeMetricFamily
        return kind(self.name, self.doc, labels=self.labels)

    def describe(self) -> Iterable[Metric]:
        return [self._family()]

    def collect(self) -> Iterable[Metric]:
        family = self._family()
        for values, value in self.read().items():
            family.add_metric(list(values), value)
        return [family]
