"""Everything cluster mode asks of NATS, as coroutines run on the bridge's asyncio loop.

:class:`NatsLink` holds the connection and the JetStream handles; the Trio side
(:mod:`relay_trio.cluster.node`) calls its methods through
:meth:`~relay_trio.cluster.bridge.AsyncioThread.call`, one bridged call per batch of work so
a batch costs one thread hop, not one per NATS round trip.

Longer than 450 lines: it is the whole asyncio side (admission, delivery, ACKs, dead letters
and redrive, the resource view, membership), one object on one connection, so nothing else
in the relay touches nats-py.
"""

from __future__ import annotations

import asyncio
import contextlib
import random
from collections.abc import Callable, Sequence
from typing import Any

import attrs
import nats
import orjson
from nats.aio.client import Client
from nats.aio.msg import Msg
from nats.js import JetStreamContext, api
from nats.js.errors import APIError, KeyNotFoundError, KeyWrongLastSequenceError, NotFoundError
from nats.js.kv import KeyValue as NatsKeyValue

from ..core.config import RelayConfig
from ..core.limiter import LeakyBucket
from .admission import CasAdmission, Conflict, Decision, Entry
from .assets import ensure_assets
from .names import (
    ADMISSION_BUCKET,
    DEAD_LETTER_STREAM,
    DEAD_LETTER_SUBJECT,
    INFLIGHT_BUCKET,
    MEMBERS_BUCKET,
    REPORTS_STREAM,
    SENDERS_CONSUMER,
    dead_letter_subject,
    report_subject,
    token,
    untoken,
)

#: Seconds one JetStream request (publish ack, KV op) may take before it fails.
REQUEST_TIMEOUT = 2.0
#: Seconds the first connection may take at start before the instance gives up.
START_TIMEOUT = 5.0
#: JetStream's error code for a failed ``Nats-Expected-Last-Subject-Sequence`` check.
WRONG_LAST_SEQUENCE = 10071


@attrs.define(eq=False)
class NatsKV:
    """The :class:`~relay_trio.cluster.admission.KeyValue` protocol over a JetStream KV."""

    kv: NatsKeyValue

    async def get(self, key: str) -> tuple[bytes, int] | None:
        try:
            entry = await self.kv.get(key)
        except KeyNotFoundError:
            return None
        return entry.value or b"", entry.revision or 0

    async def create(self, key: str, value: bytes) -> int:
        try:
            return await self.kv.create(key, value)
        except (KeyWrongLastSequenceError, nats.js.errors.BadRequestError) as exc:
            raise Conflict(key) from exc

    async def update(self, key: str, value: bytes, revision: int) -> int:
        try:
            return await self.kv.update(key, value, last=revision)
        except KeyWrongLastSequenceError as exc:
            raise Conflict(key) from exc


@attrs.frozen
class Incoming:
    """A report as it goes into the reports stream."""

    resource_id: str
    kind: str | None
    payload: Any


@attrs.frozen
class Redrive:
    """A dead letter to redrive: its dead-letter stream sequence and what to republish."""

    index: int
    message_id: str
    resource_id: str
    seq: int
    kind: str | None
    payload: bytes  # JSON


async def conflict_backoff(lost: int) -> None:
    """The pause after the ``lost``-th revision conflict in a row: random, up to 1 ms
    doubling per conflict, at most 50 ms (asyncio side)."""
    await asyncio.sleep(random.uniform(0, min(0.05, 0.001 * 2 ** min(lost, 6))))


@attrs.define(eq=False)
class NatsLink:
    """The NATS connection and every operation cluster mode performs on it (asyncio side)."""

    config: RelayConfig
    instance_id: str
    on_disconnect: Callable[[], None]
    on_reconnect: Callable[[], None]
    nc: Client = attrs.field(init=False, default=None)
    js: JetStreamContext = attrs.field(init=False, default=None)
    admission: CasAdmission = attrs.field(init=False, default=None)
    inflight: NatsKeyValue = attrs.field(init=False, default=None)
    members: NatsKeyValue = attrs.field(init=False, default=None)
    _sub: Any = attrs.field(init=False, default=None)
    #: Per resource being admitted here: its lock and how many admissions use it.
    _resource_locks: dict[str, tuple[asyncio.Lock, list[int]]] = attrs.field(
        init=False, factory=dict
    )

    async def connect(self) -> None:
        """Connect (first attempt must succeed), create or check the assets, bind handles."""
        c = self.config

        async def disconnected() -> None:
            self.on_disconnect()

        async def reconnected() -> None:
            self.on_reconnect()

        async def error(_exc: Exception) -> None:
            return None

        # nats-py annotates the timeouts as int but takes seconds as float.
        options: dict[str, Any] = {
            "servers": [s.strip() for s in c.nats_url.split(",") if s.strip()],
            "name": f"relay-trio {self.instance_id}",
            "connect_timeout": REQUEST_TIMEOUT,
            "max_reconnect_attempts": -1,
            "reconnect_time_wait": 0.25,
            "allow_reconnect": True,
            "disconnected_cb": disconnected,
            "reconnected_cb": reconnected,
            "error_cb": error,
        }
        self.nc = Client()
        try:
            # With unlimited reconnects nats-py retries a failed first connection forever:
            # bound it, so an instance that cannot reach NATS at start says so and exits.
            await asyncio.wait_for(self.nc.connect(**options), START_TIMEOUT)
        except TimeoutError:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(self.nc.close(), REQUEST_TIMEOUT)
            raise ConnectionError(f"no server answered within {START_TIMEOUT:g} s") from None
        self.js = self.nc.jetstream(timeout=int(REQUEST_TIMEOUT))
        await ensure_assets(self.js, c)
        self.admission = CasAdmission(
            NatsKV(await self.js.key_value(ADMISSION_BUCKET)),
            LeakyBucket.per_minute(c.rate_per_minute, c.burst),
            c.stale_ack_threshold,
            dry_run=c.dry_run,
            cache_size=c.max_resources,
            backoff=conflict_backoff,
        )
        self.inflight = await self.js.key_value(INFLIGHT_BUCKET)
        self.members = await self.js.key_value(MEMBERS_BUCKET)
        self._sub = await self.js.pull_subscribe_bind(SENDERS_CONSUMER, stream=REPORTS_STREAM)

    async def close(self) -> None:
        if self.nc is not None and not self.nc.is_closed:
            await self.nc.close()

    # -- admission -------------------------------------------------------------------

    async def admit(self, reports: Sequence[Incoming], now: float) -> list[Decision | str]:
        """Decide every report (in order per resource) and store the admitted ones.

        Returns, per report, its :class:`Decision` once stored (publish acknowledged), or an
        error string when the KV or the stream could not be reached (no 2xx may be sent).
        """
        results: list[Decision | str] = ["unset"] * len(reports)
        by_resource: dict[str, list[int]] = {}
        for i, r in enumerate(reports):
            by_resource.setdefault(r.resource_id, []).append(i)

        async def one_resource(indexes: list[int]) -> None:
            # Concurrent requests on this instance take turns per resource: they would
            # only race each other on the KV entry's revision, and their publishes keep
            # the order of their sequence numbers.
            rid = reports[indexes[0]].resource_id
            lock, users = self._resource_locks.setdefault(rid, (asyncio.Lock(), [0]))
            users[0] += 1
            try:
                async with lock:
                    await admit_in_order(indexes)
            finally:
                users[0] -= 1
                if not users[0]:
                    del self._resource_locks[rid]

        async def admit_in_order(indexes: list[int]) -> None:
            for i in indexes:
                r = reports[i]
                try:
                    decision = await self.admission.admit(r.resource_id, now)
                except Exception as exc:
                    results[i] = f"admission: {type(exc).__name__}"
                    continue
                if not decision.admitted:
                    results[i] = decision
                    continue
                message_id = f"{r.resource_id}:{decision.seq}"
                body = orjson.dumps(
                    {
                        "message_id": message_id,
                        "resource_id": r.resource_id,
                        "seq": decision.seq,
                        "kind": r.kind,
                        "payload": r.payload,
                        "admitted_at": now,
                        "instance": self.instance_id,
                    }
                )
                try:
                    await self.js.publish(
                        report_subject(r.resource_id),
                        body,
                        headers={"Nats-Msg-Id": message_id},
                    )
                except Exception as exc:
                    results[i] = f"publish: {type(exc).__name__}"
                    continue
                results[i] = decision

        await asyncio.gather(*(one_resource(ix) for ix in by_resource.values()))
        return results

    # -- delivery --------------------------------------------------------------------

    async def fetch(self, batch: int, timeout: float) -> list[Msg]:  # noqa: ASYNC109
        """Up to ``batch`` messages from the shared senders consumer ([] on timeout)."""
        try:
            msgs: list[Msg] = await self._sub.fetch(batch, timeout=timeout)
        except (TimeoutError, nats.errors.TimeoutError):
            return []
        return msgs

    async def begin(self, items: Sequence[tuple[str, bytes, bool]]) -> list[list[Any]]:
        """Record each delivery about to be attempted: ``(message_id, ack_reply, first)``.

        Returns each message's attempt history so far (read from the in-flight KV unless this
        is the first delivery) and writes the entry with the delivery's ACK reply subject, so
        an ACK posted to any instance can reach the message.
        """

        async def one(message_id: str, reply: bytes, first: bool) -> list[Any]:
            key = token(message_id)
            history: list[Any] = []
            if not first:
                try:
                    entry = await self.inflight.get(key)
                    history = orjson.loads(entry.value or b"{}").get("attempts", [])
                except KeyNotFoundError:
                    pass
            await self.inflight.put(
                key, orjson.dumps({"reply": reply.decode(), "attempts": history})
            )
            return history

        return list(await asyncio.gather(*(one(*item) for item in items)))

    async def settle(self, items: Sequence[tuple[str, str, str, float | None, list[Any]]]) -> None:
        """Apply send outcomes: ``(message_id, reply, action, delay, history)`` with action
        ``ack`` (ACK, forget the in-flight entry), ``nak`` (redeliver after ``delay``, keep
        the history) or ``wait`` (sent; the ACK comes later, keep the history)."""

        async def one(
            message_id: str, reply: str, action: str, delay: float | None, h: Any
        ) -> None:
            key = token(message_id)
            if action == "ack":
                await self.nc.publish(reply, b"+ACK")
                await self._forget(key)
                return
            await self.inflight.put(key, orjson.dumps({"reply": reply, "attempts": h}))
            if action == "nak":
                await self.nc.publish(reply, _nak(delay))

        await asyncio.gather(*(one(*item) for item in items))
        await self.nc.flush(timeout=int(REQUEST_TIMEOUT))

    async def _forget(self, key: str) -> None:
        with contextlib.suppress(NotFoundError):
            await self.inflight.delete(key)

    async def acknowledge(
        self,
        message_id: str,
        status: str,
        retry_after: float | None,
        delays: Sequence[float],
        now: float,
    ) -> tuple[str, list[Any]]:
        """An ACK/NACK posted to this instance for a message any instance sent.

        Returns the outcome (``acked``, ``nacked`` or ``unknown``) and the history. A NACK
        without ``retry_after`` waits ``delays[attempts - 1]`` (drawn by the caller)."""
        key = token(message_id)
        try:
            entry = await self.inflight.get(key)
        except KeyNotFoundError:
            return "unknown", []
        data = orjson.loads(entry.value or b"{}")
        reply = data.get("reply", "")
        history = data.get("attempts", [])
        if status == "ack":
            await self.nc.publish(reply, b"+ACK")
            await self.nc.flush(timeout=int(REQUEST_TIMEOUT))
            await self._forget(key)
            rid, _, seq = message_id.rpartition(":")
            await self.admission.acknowledged(rid, int(seq), now)
            return "acked", history
        attempts = sum(1 for a in history if a[1] in ("sent", "send_failed"))
        delay = delays[min(max(attempts, 1), len(delays)) - 1]
        history.append([now, "nack", "nack"])
        await self.inflight.put(key, orjson.dumps({"reply": reply, "attempts": history}))
        await self.nc.publish(reply, _nak(retry_after if retry_after is not None else delay))
        await self.nc.flush(timeout=int(REQUEST_TIMEOUT))
        return "nacked", history

    async def synchronously_acked(self, acked: Sequence[tuple[str, int]], now: float) -> None:
        """Record upstream ACKs given in the sends' answers, ``(resource_id, seq)`` each, in
        the admission entries (stale-ACK clock, last acknowledged sequence), concurrently."""
        await asyncio.gather(*(self.admission.acknowledged(r, seq, now) for r, seq in acked))

    async def dead_letter(self, records: Sequence[tuple[str, str, bytes]]) -> None:
        """Store dead letters ``(resource_id, ack_reply, record_json)``, then end the
        messages (TERM) and forget their in-flight entries."""
        for resource_id, reply, record in records:
            await self.js.publish(dead_letter_subject(resource_id), record)
            await self.nc.publish(reply, b"+TERM")
            await self._forget(token(orjson.loads(record)["message_id"]))
        await self.nc.flush(timeout=int(REQUEST_TIMEOUT))

    async def dead_letters(
        self, after: int, limit: int, resource_id: str | None
    ) -> list[tuple[int, bytes]]:
        """Up to ``limit`` dead letters with stream sequence > ``after`` (oldest first)."""
        info = await self.js.stream_info(DEAD_LETTER_STREAM)
        last = info.state.last_seq
        out: list[tuple[int, bytes]] = []
        subject = None if resource_id is None else dead_letter_subject(resource_id)
        seq = max(after + 1, info.state.first_seq)
        while seq <= last and len(out) < limit:
            try:
                msg = await self.js.get_msg(DEAD_LETTER_STREAM, seq=seq, subject=subject, next=True)
            except NotFoundError:
                break
            assert msg.seq is not None
            out.append((msg.seq, msg.data or b""))
            seq = msg.seq + 1
        return out

    async def redrive(
        self, items: Sequence[Redrive], dry_run: bool, force: bool, now: float
    ) -> list[str]:
        """Redrive dead letters: per item ``redriven``, ``superseded`` (the admission entry
        shows a newer message acknowledged; not checked with ``force``) or ``pending`` (the
        resource has a message in the reports stream, which a redrive would replace).

        A redrive publishes the message again (same id, ``admitted_at = now``; a new stream
        message, so JetStream counts deliveries from 1) only if its subject holds no message
        (``Nats-Expected-Last-Subject-Sequence: 0``: atomic against a concurrent admission
        or redrive), deduplicated by ``<message id>@<dead-letter sequence>``, then deletes
        the dead letter by its sequence. A crash between the two leaves the dead letter in
        place while the message is redriven; redriving it again within the duplicate window
        is dropped as a duplicate. The items of one resource are handled in order.
        """
        out = ["pending"] * len(items)
        by_resource: dict[str, list[int]] = {}
        for i, item in enumerate(items):
            by_resource.setdefault(item.resource_id, []).append(i)

        async def one(item: Redrive) -> str:
            if not force:
                got = await self.admission.kv.get(token(item.resource_id))
                if got is not None and Entry.decode(got[0]).acked_seq > item.seq:
                    return "superseded"
            subject = report_subject(item.resource_id)
            if dry_run:
                try:
                    await self.js.get_last_msg(REPORTS_STREAM, subject)
                except NotFoundError:
                    return "redriven"
                return "pending"
            body = orjson.dumps(
                {
                    "message_id": item.message_id,
                    "resource_id": item.resource_id,
                    "seq": item.seq,
                    "kind": item.kind,
                    "payload": orjson.Fragment(item.payload),
                    "admitted_at": now,
                    "instance": self.instance_id,
                }
            )
            headers = {
                "Nats-Msg-Id": f"{item.message_id}@{item.index}",
                "Nats-Expected-Last-Subject-Sequence": "0",
            }
            try:
                await self.js.publish(subject, body, headers=headers)
            except APIError as exc:
                if exc.err_code == WRONG_LAST_SEQUENCE:
                    return "pending"
                raise
            with contextlib.suppress(NotFoundError):
                await self.js.delete_msg(DEAD_LETTER_STREAM, item.index)
            return "redriven"

        async def resource(indexes: list[int]) -> None:
            for i in indexes:
                out[i] = await one(items[i])

        await asyncio.gather(*(resource(ix) for ix in by_resource.values()))
        return out

    async def resource(self, resource_id: str) -> tuple[bytes | None, bytes | None, bytes | None]:
        """What the cluster holds for one resource: its admission entry, its message in the
        reports stream and that message's in-flight entry (each ``None`` when absent)."""
        got = await self.admission.kv.get(token(resource_id))
        entry = None if got is None else got[0]
        try:
            msg = await self.js.get_last_msg(REPORTS_STREAM, report_subject(resource_id))
        except NotFoundError:
            return entry, None, None
        pending = msg.data or b"{}"
        try:
            flight = await self.inflight.get(token(orjson.loads(pending)["message_id"]))
        except KeyNotFoundError:
            return entry, pending, None
        return entry, pending, flight.value

    # -- membership and figures ---------------------------------------------------------

    async def heartbeat(self, info: dict[str, Any]) -> dict[str, Any]:
        """Write this instance's heartbeat; return members and stream/consumer figures."""
        await self.members.put(token(self.instance_id), orjson.dumps(info))
        members: list[dict[str, Any]] = []
        try:
            keys = await self.members.keys()
        except nats.js.errors.NoKeysError:
            keys = []
        for key in keys:
            try:
                entry = await self.members.get(key)
            except KeyNotFoundError:
                continue
            members.append({"instance_id": untoken(key), **orjson.loads(entry.value or b"{}")})
        stream = await self.js.stream_info(REPORTS_STREAM)
        consumer = await self.js.consumer_info(REPORTS_STREAM, SENDERS_CONSUMER)
        dead = await self.js.stream_info(DEAD_LETTER_STREAM)
        return {
            "members": members,
            "stream": {"messages": stream.state.messages, "bytes": stream.state.bytes},
            "consumer": {
                "pending": consumer.num_pending,
                "ack_pending": consumer.num_ack_pending,
                "redelivered": consumer.num_redelivered,
                "waiting": consumer.num_waiting,
            },
            "dead_letters": dead.state.messages,
        }


def _nak(delay: float | None) -> bytes:
    if delay is None or delay <= 0:
        return b"-NAK"
    return b"-NAK " + orjson.dumps({"delay": int(delay * 1e9)})


__all__ = ["DEAD_LETTER_SUBJECT", "Incoming", "NatsLink", "Redrive", "api"]
