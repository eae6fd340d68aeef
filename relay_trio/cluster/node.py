"""The Trio side of cluster mode: admission, delivery, ACKs, membership, on one NATS link.

:class:`ClusterNode` replaces the single-node store, admission and delivery when
``store = "nats"``: admission is a compare-and-set on a shared KV entry then a publish to the
reports stream (a 2xx only after the publish is acknowledged); delivery is a set of sender
tasks pulling from one durable consumer shared by every instance, mapping the UMH onto
JetStream's own controls (AckWait/BackOff, MaxDeliver, NAK with delay, one message per
subject). docs/cluster.md lists every asset, subject and where semantics differ.

Longer than 450 lines: one instance's whole cluster life cycle (connection and readiness,
admission, the senders, ACKs, dead letters and their redrive, the resource view, status) on
one link; the NATS calls themselves are in :mod:`relay_trio.cluster.link`.
"""

from __future__ import annotations

import logging
import os
import random
import socket
from collections import Counter
from collections.abc import Callable, Sequence
from typing import Any

import attrs
import orjson
import trio
import trio_util

from ..core import event_schemas as ev
from ..core.config import RelayConfig
from ..core.limiter import LeakyBucket
from ..core.model import Accepted, Problem, validate_report
from ..core.routing import UpstreamRouter
from ..core.views import rfc3339
from ..metrics import RelayMetrics
from ..services.publisher import EventPublisher
from ..services.redrive import RedriveRequest, redrive_answer
from ..stores.base import (
    AttemptRecord,
    DeadLetterPage,
    DeadLetterQuery,
    DeadLetterRecord,
    StoreError,
)
from ..upstreams.base import Outbound, SendStatus, Upstream
from .bridge import AsyncioThread

log = logging.getLogger("relay_trio")

#: Messages one sender task pulls per fetch.
FETCH_BATCH = 64
#: Seconds a fetch waits for messages before it returns empty (and checks for shutdown).
FETCH_WAIT = 0.5
#: Attempt-history outcomes that were a delivery attempt.
_SENDS = ("sent", "send_failed")


class ClusterUnavailable(StoreError):
    """NATS cannot be reached at start, or an asset contradicts the config (one line)."""


def default_instance_id() -> str:
    """``hostname-pid``: unique per process on a host, readable in ``/v1/status``."""
    return f"{socket.gethostname()}-{os.getpid()}"


def unavailable(detail: str) -> Problem:
    """503 while this instance has no NATS connection (nothing was admitted)."""
    return Problem(
        503, "cluster-unavailable", "NATS JetStream unreachable", detail, retry_after=1.0
    )


@attrs.define(eq=False)
class ClusterNode:
    """One relay instance's membership in the cluster."""

    config: RelayConfig
    events: EventPublisher
    metrics: RelayMetrics
    router: UpstreamRouter
    upstreams: list[Upstream]
    wall_clock: Callable[[], float]
    rng: random.Random
    instance_id: str = ""
    bridge: AsyncioThread = attrs.field(init=False, factory=AsyncioThread)
    connected: trio_util.AsyncBool = attrs.field(init=False, factory=trio_util.AsyncBool)
    draining: bool = attrs.field(init=False, default=False)
    disconnects: int = attrs.field(init=False, default=0)
    figures: dict[str, Any] = attrs.field(init=False, factory=dict)
    in_flight: int = attrs.field(init=False, default=0)
    _link: Any = attrs.field(init=False, default=None)
    _senders_done: trio.Event = attrs.field(init=False, factory=trio.Event)
    _closing: bool = attrs.field(init=False, default=False)
    #: The per-resource bucket (the same one admission applies to the shared entries).
    bucket: LeakyBucket = attrs.field(init=False)

    def __attrs_post_init__(self) -> None:
        if not self.instance_id:
            self.instance_id = self.config.instance_id or default_instance_id()
        self.bucket = LeakyBucket.per_minute(self.config.rate_per_minute, self.config.burst)

    @property
    def link(self) -> Any:
        """The connected :class:`~relay_trio.cluster.link.NatsLink` (``None`` before ``run``
        has connected); its ``js`` serves the event log."""
        return self._link

    # -- connection ----------------------------------------------------------------------

    def _on_disconnect(self) -> None:  # asyncio thread
        self.bridge.to_trio(lambda: self._set_connected(False))

    def _on_reconnect(self) -> None:  # asyncio thread
        self.bridge.to_trio(lambda: self._set_connected(True))

    def _set_connected(self, up: bool) -> None:
        if self.connected.value == up or self._closing:
            return  # closing the connection on the way out is no loss to report
        self.connected.value = up
        if not up:
            self.disconnects += 1
            log.warning("NATS connection lost: admission paused (503)")
        else:
            log.info("NATS connection restored: admission resumed")
        self.events.emit(ev.nats_connection(up, self.instance_id))

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Connect, create or check the assets, then run the senders and the heartbeat.

        Raises :class:`ClusterUnavailable` (one line) before ``started()`` if NATS is
        unreachable or an asset contradicts the config. On cancellation the connection is
        closed (shielded, bounded) and the loop thread stopped.
        """
        from .assets import AssetConflict
        from .link import NatsLink

        self.bridge.start()
        link = NatsLink(self.config, self.instance_id, self._on_disconnect, self._on_reconnect)
        try:
            try:
                await self.bridge.call(link.connect)
            except AssetConflict as exc:
                raise ClusterUnavailable(str(exc)) from None
            except Exception as exc:
                raise ClusterUnavailable(
                    f"cannot use NATS JetStream at {self.config.nats_url}: "
                    f"{type(exc).__name__} {exc}".strip()
                ) from None
            self._link = link
            self.connected.value = True
            async with trio.open_nursery() as nursery:
                await nursery.start(self._heartbeat)
                nursery.start_soon(self._senders)
                task_status.started()
        finally:
            self._closing = True
            with trio.CancelScope(shield=True), trio.move_on_after(3):
                try:
                    await self.bridge.call(link.close)
                except Exception:  # closing a dead connection: nothing to save
                    log.debug("closing the NATS connection failed", exc_info=True)
                await self.bridge.stop()

    async def _heartbeat(
        self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED
    ) -> None:
        interval = self.config.nats_heartbeat
        started = self.wall_clock()
        first = True
        while True:
            if self.connected.value:
                info = {"started_at": started, "at": self.wall_clock(), "draining": self.draining}
                with trio.move_on_after(interval * 2):
                    try:
                        self.figures = await self.bridge.call(self._link.heartbeat, info)
                    except Exception as exc:
                        log.debug("cluster heartbeat failed: %s", exc)
            if first:
                task_status.started()
                first = False
            await trio.sleep(interval)

    # -- admission -----------------------------------------------------------------------

    async def admit_many(self, objs: Sequence[object]) -> list[Accepted | Problem]:
        """Admit reports cluster-wide; every ``Accepted`` is already stored in JetStream.

        A checkpoint. Per item: 422 invalid, 429 rate limited or stale ACK (whichever
        instance admitted before), 503 draining or NATS unreachable (nothing promised).
        """
        from .link import Incoming

        m = self.metrics
        out: list[Accepted | Problem | None] = [None] * len(objs)
        todo: list[tuple[int, Incoming]] = []
        for i, obj in enumerate(objs):
            m.reports_received.inc()
            if self.draining:
                m.rejected["draining"].inc()
                out[i] = Problem(503, "draining", "Relay is shutting down", retry_after=5.0)
                continue
            report = validate_report(obj)
            if isinstance(report, Problem):
                m.rejected["invalid"].inc()
                out[i] = report
                continue
            if not self.connected.value:
                m.rejected["overloaded"].inc()
                out[i] = unavailable("no connection; retry")
                continue
            todo.append((i, Incoming(report.resource_id, report.kind, report.payload)))
        if todo:
            try:
                decisions = await self.bridge.call(
                    self._link.admit, [r for _, r in todo], self.wall_clock()
                )
            except Exception as exc:
                decisions = [f"{type(exc).__name__}"] * len(todo)
            for (i, r), d in zip(todo, decisions, strict=True):
                out[i] = self._answer(r.resource_id, r.kind, d)
        return [o for o in out if o is not None]

    def _answer(self, rid: str, kind: str | None, d: Any) -> Accepted | Problem:
        m = self.metrics
        if isinstance(d, str):
            m.rejected["overloaded"].inc()
            return unavailable(d)
        if not d.admitted:
            m.rejected[d.reason].inc()
            self.events.emit(ev.report_dropped(rid, d.reason))
            retry = self.config.ack_timeout if d.reason == "stale_ack" else d.retry_after
            return Problem(
                429,
                d.reason.replace("_", "-"),
                "Rate limited" if d.reason == "rate_limited" else "Upstream ACK is stale",
                f"resource {rid}",
                {"reason": d.reason},
                retry_after=round(retry, 3),
            )
        message_id = f"{rid}:{d.seq}"
        m.reports_admitted.inc()
        self.events.emit(ev.report_admitted(message_id, rid, kind, None))
        return Accepted(message_id, rid, d.seq)

    # -- ACKs ----------------------------------------------------------------------------

    async def acknowledge(
        self, message_id: str, status: str, reason: str | None, retry_after: float | None
    ) -> str:
        """An ACK or NACK for a message whichever instance sent it. Checkpoint.

        Raises :class:`ClusterUnavailable` when NATS cannot be reached."""
        if not self.connected.value:
            raise ClusterUnavailable("no NATS connection")
        try:
            outcome, _history = await self.bridge.call(
                self._link.acknowledge,
                message_id,
                status,
                retry_after,
                [self._backoff(k) for k in range(1, self.config.max_attempts + 1)],
                self.wall_clock(),
            )
        except Exception as exc:
            raise ClusterUnavailable(type(exc).__name__) from None
        self.metrics.acks[outcome].inc()
        self.events.emit(ev.ack_received(message_id, status, outcome, False, reason))
        return str(outcome)

    def _backoff(self, attempt: int) -> float:
        c = self.config
        if attempt >= c.max_attempts:
            return 0.0  # the next delivery is the dead-letter step
        return self.rng.uniform(0.0, min(c.retry_cap, c.retry_base * 2 ** max(0, attempt - 1)))

    # -- delivery ------------------------------------------------------------------------

    async def _senders(self) -> None:
        try:
            async with trio.open_nursery() as nursery:
                for _ in range(max(1, min(self.config.sender_tasks, 4))):
                    nursery.start_soon(self._sender)
        finally:
            self._senders_done.set()

    async def _sender(self) -> None:
        while not self.draining:
            if not self.connected.value:
                await self.connected.wait_value(True)
                continue
            try:
                msgs = await self.bridge.call(self._link.fetch, FETCH_BATCH, FETCH_WAIT)
            except Exception as exc:
                log.debug("fetch failed: %s", exc)
                await trio.sleep(0.2)
                continue
            if msgs:
                self.in_flight += len(msgs)
                try:
                    await self._deliver(msgs)
                except Exception as exc:
                    # The messages stay unacknowledged: JetStream redelivers them after AckWait.
                    log.warning("cluster delivery batch failed: %s", exc)
                finally:
                    self.in_flight -= len(msgs)

    async def _deliver(self, msgs: list[Any]) -> None:
        c = self.config
        now = self.wall_clock()
        dead: list[tuple[str, dict[str, Any], str]] = []
        sends: list[tuple[Outbound, str, dict[str, Any], int]] = []
        for msg in msgs:
            body = orjson.loads(msg.data)
            n = msg.metadata.num_delivered
            if n > c.max_attempts:
                dead.append((msg.reply, body, "max_attempts"))
                continue
            if now - body["admitted_at"] >= c.max_age:
                dead.append((msg.reply, body, "max_age"))
                continue
            rid = body["resource_id"]
            upstream = self.router.pick(rid) or 0
            ob = Outbound(body["message_id"], rid, body["kind"], body["payload"], n, upstream)
            sends.append((ob, msg.reply, body, n))
        begin = [(b["message_id"], r.encode(), False) for r, b, _ in dead]
        begin += [(b["message_id"], r.encode(), n == 1) for _, r, b, n in sends]
        histories = await self.bridge.call(self._link.begin, begin)
        history_of: dict[str, list[Any]] = {}
        for (message_id, _, _), h in zip(begin, histories, strict=True):
            if h and h[-1][1] == "sent":
                h.append([now, "ack_timeout", ""])
            history_of[message_id] = h
        if dead:
            records = []
            for reply, body, reason in dead:
                rid = body["resource_id"]
                records.append((rid, reply, self._dead_record(body, reason, history_of, now)))
                self.metrics.dead_letters[reason].inc()
                made = sum(1 for a in history_of.get(body["message_id"], []) if a[1] in _SENDS)
                self.events.emit(ev.dead_lettered(body["message_id"], rid, reason, made))
            await self.bridge.call(self._link.dead_letter, records)
        live = sends
        groups: dict[int, list[tuple[Outbound, str, dict[str, Any], int]]] = {}
        for s in live:
            groups.setdefault(s[0].upstream, []).append(s)
        settle: list[tuple[str, str, str, float | None, list[Any]]] = []
        acked: list[tuple[str, int]] = []

        async def send(index: int, batch: list[tuple[Outbound, str, dict[str, Any], int]]) -> None:
            results = await self.upstreams[index].send_batch([s[0] for s in batch], c.send_timeout)
            at = self.wall_clock()
            url = self.router.urls[index]
            for (ob, reply, body, n), result in zip(batch, results, strict=True):
                self.metrics.sends.labels(url, result.status.value).inc()
                h = history_of[ob.message_id]
                if result.status is SendStatus.ACKED:
                    self.router.record_success(index, at)
                    settle.append((ob.message_id, reply, "ack", None, h))
                    acked.append((ob.resource_id, body["seq"]))
                    self.metrics.acks["acked"].inc()
                    self.events.emit(ev.ack_received(ob.message_id, "ack", "acked", True, None))
                elif result.status is SendStatus.SENT:
                    self.router.record_success(index, at)
                    settle.append((ob.message_id, reply, "wait", None, [*h, [at, "sent", url]]))
                else:
                    self.router.record_failure(index, at)
                    delay = self._backoff(n)
                    if result.retry_after is not None and n < c.max_attempts:
                        delay = max(delay, result.retry_after)
                    settle.append(
                        (
                            ob.message_id,
                            reply,
                            "nak",
                            delay,
                            [*h, [at, "send_failed", result.detail]],
                        )
                    )

        async with trio.open_nursery() as nursery:
            for index, batch in groups.items():
                nursery.start_soon(send, index, batch)
        if settle:
            await self.bridge.call(self._link.settle, settle)
        if acked:
            await self.bridge.call(self._link.synchronously_acked, acked, self.wall_clock())

    def _dead_record(
        self, body: dict[str, Any], reason: str, history_of: dict[str, list[Any]], now: float
    ) -> bytes:
        h = history_of.get(body["message_id"], [])
        return orjson.dumps(
            {
                "message_id": body["message_id"],
                "resource_id": body["resource_id"],
                "seq": body["seq"],
                "kind": body["kind"],
                "payload": body["payload"],
                "reason": reason,
                "upstream": self.router.urls[self.router.pick(body["resource_id"]) or 0],
                "admitted_at": body["admitted_at"],
                "dead_at": now,
                "attempts": h,
            }
        )

    # -- dead letters --------------------------------------------------------------------

    async def dead_letters(self, q: DeadLetterQuery) -> DeadLetterPage:
        """One page of the dead-letter stream (index = stream sequence). Checkpoint; raises
        :class:`ClusterUnavailable` when NATS cannot be reached."""
        items: list[DeadLetterRecord] = []
        after = q.after_index
        while len(items) <= q.limit:
            if not self.connected.value:
                raise ClusterUnavailable("no NATS connection")
            try:
                raw = await self.bridge.call(self._link.dead_letters, after, 256, q.resource_id)
            except Exception as exc:
                raise ClusterUnavailable(f"dead letters: {type(exc).__name__}") from None
            if not raw:
                break
            for seq, data in raw:
                after = seq
                d = orjson.loads(data)
                rec = DeadLetterRecord(
                    index=seq,
                    message_id=d["message_id"],
                    resource_id=d["resource_id"],
                    seq=d["seq"],
                    kind=d["kind"],
                    payload=orjson.dumps(d["payload"]),
                    reason=d["reason"],
                    upstream=d["upstream"],
                    admitted_at=d["admitted_at"],
                    dead_at=d["dead_at"],
                    attempts=tuple(AttemptRecord(float(a), o, det) for a, o, det in d["attempts"]),
                )
                if q.matches(rec):
                    if len(items) == q.limit:
                        return DeadLetterPage(items, items[-1].index)
                    items.append(rec)
        return DeadLetterPage(items, None)

    async def redrive(self, request: RedriveRequest) -> dict[str, Any]:
        """``POST /v1/deadletters:redrive`` in cluster mode, answered like a single node's.

        Each redriven dead letter is back in the reports stream (publish acknowledged) and
        deleted from the dead-letter stream before the answer, and published as a
        ``deadletter`` ``redriven`` event. A checkpoint; raises :class:`ClusterUnavailable`
        when NATS cannot be reached (some may be redriven already: they are not listed
        again, being gone from the dead letters).
        """
        from .link import Redrive

        if not self.connected.value:
            raise ClusterUnavailable("no NATS connection")
        try:
            page = await self.dead_letters(request.query)
            items = [
                Redrive(d.index, d.message_id, d.resource_id, d.seq, d.kind, d.payload or b"null")
                for d in page.items
            ]
            outcomes = await self.bridge.call(
                self._link.redrive, items, request.dry_run, request.force, self.wall_clock()
            )
        except Exception as exc:
            raise ClusterUnavailable(f"redrive: {type(exc).__name__} {exc}".strip()) from None
        redriven = [
            d.message_id for d, o in zip(page.items, outcomes, strict=True) if o == "redriven"
        ]
        skipped = Counter(o for o in outcomes if o != "redriven")
        if not request.dry_run:
            for d, o in zip(page.items, outcomes, strict=True):
                if o == "redriven":
                    self.events.emit(ev.redriven(d.message_id, d.resource_id, d.reason))
        return redrive_answer(len(page.items), redriven, skipped, dry_run=request.dry_run)

    # -- the resource view ------------------------------------------------------------

    async def resource_view(self, resource_id: str) -> dict[str, Any] | None:
        """``GET /v1/resources/{id}`` from the cluster: the admission entry (sequence,
        bucket, last ACK), the message in the reports stream and its attempt history.
        ``None`` for a resource no instance admitted. A checkpoint; raises
        :class:`ClusterUnavailable` when NATS cannot be reached."""
        if not self.connected.value:
            raise ClusterUnavailable("no NATS connection")
        try:
            raw, pending, flight = await self.bridge.call(self._link.resource, resource_id)
        except Exception as exc:
            raise ClusterUnavailable(f"resource: {type(exc).__name__}") from None
        if raw is None:
            return None
        from .admission import Entry

        c = self.config
        entry = Entry.decode(raw)
        now = self.wall_clock()
        bucket = self.bucket
        wall = _wall
        return {
            "resource_id": resource_id,
            "seq": entry.seq,
            "last_acked_at": wall(entry.acked_at),
            "last_acked_seq": entry.acked_seq,
            "awaiting_ack_since": wall(entry.awaiting_since),
            "stale_ack": entry.awaiting_since is not None
            and now - entry.awaiting_since >= c.stale_ack_threshold,
            "bucket": {
                "level": round(bucket.drained(entry.level, entry.last, now), 6),
                "burst": c.burst,
                "rate_per_minute": c.rate_per_minute,
                "available": round(max(0.0, bucket.headroom(entry.level, entry.last, now)), 6),
            },
            "upstream": self.router.urls[self.router.pick(resource_id) or 0],
            "pending": None if pending is None else _pending_view(pending, flight),
        }

    # -- status and shutdown ---------------------------------------------------------------

    def status(self) -> dict[str, Any]:
        """The cluster section of ``/v1/status`` (figures from the last heartbeat)."""
        now = self.wall_clock()
        horizon = 2 * self.config.nats_heartbeat
        figures = self.figures
        members = [{**m, "up": now - m.get("at", 0) <= horizon} for m in figures.get("members", [])]
        return {
            "instance_id": self.instance_id,
            "connected": self.connected.value,
            "disconnects": self.disconnects,
            "members": members,
            "members_up": sum(1 for m in members if m["up"]),
            "stream": figures.get("stream", {}),
            "consumer": figures.get("consumer", {}),
            "dead_letters": figures.get("dead_letters", 0),
            "in_flight": self.in_flight,
        }

    async def drain(self) -> None:
        """Stop admitting and fetching; in-flight sends finish. Messages not yet acknowledged
        stay in JetStream for the other instances (or this one's next start)."""
        self.draining = True
        await self._senders_done.wait()


def _wall(t: float | None) -> str | None:
    return None if t is None else rfc3339(t)


def _pending_view(message: bytes, flight: bytes | None) -> dict[str, Any]:
    """The resource's message in the reports stream, with its in-flight attempt history."""
    body = orjson.loads(message)
    history = [] if flight is None else orjson.loads(flight).get("attempts", [])
    return {
        "message_id": body["message_id"],
        "attempts": sum(1 for a in history if a[1] in ("sent", "send_failed")),
        "admitted_at": rfc3339(body["admitted_at"]),
        "history": [{"at": rfc3339(a), "outcome": o, "detail": d} for a, o, d in history],
    }
