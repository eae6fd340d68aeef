"""The JetStream assets cluster mode needs, derived from the config, created or checked at start.

Runs on the bridge's asyncio loop. An asset that exists with settings contradicting the config
(another relay generation, a hand edit) is never changed: :class:`AssetConflict` carries a
one-line message naming the asset, the setting and both values, and the relay refuses to start.
"""

from __future__ import annotations

from typing import Any

import attrs
from nats.js import JetStreamContext, api
from nats.js.errors import NotFoundError

from ..core.config import RelayConfig
from .names import (
    ADMISSION_BUCKET,
    DEAD_LETTER_STREAM,
    DEAD_LETTER_SUBJECT,
    EVENTS_STREAM,
    EVENTS_SUBJECT,
    INFLIGHT_BUCKET,
    MEMBERS_BUCKET,
    REPORTS_STREAM,
    REPORTS_SUBJECT,
    SENDERS_CONSUMER,
)

#: Seconds JetStream remembers a ``Nats-Msg-Id`` to drop a duplicate publish.
DUPLICATE_WINDOW = 120.0
#: The same for the event stream: every event has an id to remember (the server keeps one
#: entry per id for the window), and an event's publish is retried within seconds.
EVENTS_DUPLICATE_WINDOW = 30.0


class AssetConflict(Exception):
    """An existing JetStream asset contradicts the config (one-line message)."""


def backoff_schedule(c: RelayConfig) -> list[float]:
    """JetStream BackOff for the senders consumer: the wait before redelivery after attempt
    ``n`` when no ACK came: ``ack_timeout`` plus the upper bound of the single-node
    full-jitter backoff, ``min(retry_cap, retry_base * 2**(n-1))`` (JetStream has no jitter)."""
    return [
        c.ack_timeout + min(c.retry_cap, c.retry_base * 2 ** (n - 1))
        for n in range(1, c.max_attempts + 1)
    ]


@attrs.frozen
class Assets:
    """What the config asks of each asset (the values checked against existing ones)."""

    reports: dict[str, Any]
    senders: dict[str, Any]
    dead_letters: dict[str, Any]
    events: dict[str, Any]
    buckets: dict[str, dict[str, Any]]


def wanted(c: RelayConfig) -> Assets:
    """Every asset setting that follows from the config."""
    backoff = backoff_schedule(c)
    return Assets(
        reports={
            "subjects": [f"{REPORTS_SUBJECT}.>"],
            "retention": api.RetentionPolicy.WORK_QUEUE,
            "max_msgs_per_subject": 1,
            "storage": api.StorageType.FILE,
            "num_replicas": c.nats_replicas,
            "duplicate_window": DUPLICATE_WINDOW,
        },
        senders={
            "ack_policy": api.AckPolicy.EXPLICIT,
            "ack_wait": backoff[0],
            "backoff": backoff,
            # One more than max_attempts: that delivery is never sent, it dead-letters.
            "max_deliver": c.max_attempts + 1,
            "max_ack_pending": c.max_resources,
        },
        dead_letters={
            "subjects": [f"{DEAD_LETTER_SUBJECT}.>"],
            "retention": api.RetentionPolicy.LIMITS,
            "max_msgs": c.max_dead_letters,
            "storage": api.StorageType.FILE,
            "num_replicas": c.nats_replicas,
        },
        # The event log: bounded like the single-node ring; the sequence is the event id.
        # Direct gets let any replica serve the reads of ids older than a mirror.
        events={
            "subjects": [f"{EVENTS_SUBJECT}.>"],
            "retention": api.RetentionPolicy.LIMITS,
            "max_msgs": c.event_ring_size,
            "max_bytes": c.event_ring_bytes,
            "discard": api.DiscardPolicy.OLD,
            "storage": api.StorageType.FILE,
            "num_replicas": c.nats_replicas,
            "duplicate_window": EVENTS_DUPLICATE_WINDOW,
            "allow_direct": True,
        },
        buckets={
            ADMISSION_BUCKET: {"history": 1, "ttl": None},
            INFLIGHT_BUCKET: {"history": 1, "ttl": 2 * c.max_age},
            MEMBERS_BUCKET: {"history": 1, "ttl": 3 * c.nats_heartbeat},
        },
    )


def _same(got: Any, want: Any) -> bool:
    if isinstance(want, list):
        return (
            got is not None
            and len(got) == len(want)
            and all(_same(a, b) for a, b in zip(got, want, strict=True))
        )
    if isinstance(want, float):
        return got is not None and abs(got - want) < 1e-3
    return bool(got == want)


def _check(asset: str, have: Any, want: dict[str, Any]) -> None:
    for name, value in want.items():
        got = getattr(have, name)
        if not _same(got, value):
            raise AssetConflict(
                f"JetStream {asset} has {name}={got!r} but the config needs {value!r}; "
                "delete it or fix the config"
            )


async def ensure_assets(js: JetStreamContext, c: RelayConfig) -> None:
    """Create the streams, the senders consumer and the KV buckets, or check existing ones.

    Raises :class:`AssetConflict` on a contradiction; never modifies an existing asset.
    """
    w = wanted(c)
    streams = (
        (REPORTS_STREAM, w.reports),
        (DEAD_LETTER_STREAM, w.dead_letters),
        (EVENTS_STREAM, w.events),
    )
    for name, want in streams:
        try:
            info = await js.stream_info(name)
        except NotFoundError:
            await js.add_stream(api.StreamConfig(name=name, **want))
        else:
            _check(f"stream {name}", info.config, want)
    try:
        cinfo = await js.consumer_info(REPORTS_STREAM, SENDERS_CONSUMER)
    except NotFoundError:
        await js.add_consumer(
            REPORTS_STREAM, api.ConsumerConfig(durable_name=SENDERS_CONSUMER, **w.senders)
        )
    else:
        _check(f"consumer {SENDERS_CONSUMER}", cinfo.config, w.senders)
    for bucket, want in w.buckets.items():
        stream = f"KV_{bucket}"
        try:
            info = await js.stream_info(stream)
        except NotFoundError:
            await js.create_key_value(
                api.KeyValueConfig(
                    bucket=bucket,
                    history=want["history"],
                    ttl=want["ttl"],
                    replicas=c.nats_replicas,
                )
            )
        else:
            ttl = info.config.max_age or None
            _check(f"KV bucket {bucket}", _Bucket(info.config.max_msgs_per_subject, ttl), want)


@attrs.frozen
class _Bucket:
    history: int
    ttl: float | None
