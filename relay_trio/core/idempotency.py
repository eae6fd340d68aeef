"""Idempotency keys on ingest: the bounded, expiring map of keys already answered. Pure.

A client that retries a report it is not sure was accepted (a timeout, a dropped connection)
sends the same ``Idempotency-Key``; the relay answers the original ``message_id`` again
instead of admitting (and delivering) a duplicate. Only *admitted* answers are remembered:
a 429, 503 or 422 is not a result the client must keep, it retries and may be admitted then.

:class:`IdempotencyKeys` takes ``now`` as an argument (Trio time in the relay) and never
blocks. Keys expire exactly ``window`` seconds after they were first answered (an entry
created at ``t`` is gone at ``t + window``), and at most ``max_keys`` are kept: the oldest
leave first. Every key removed is returned to the caller, who deletes it from the store.
"""

from __future__ import annotations

import hashlib
import re
from collections import OrderedDict
from typing import Any, Final, NamedTuple

import attrs
import orjson

#: Longest key accepted (as Stripe and the IETF draft do: an opaque string, bounded).
MAX_KEY_LEN: Final = 255


IDEMPOTENCY_KEY_PATTERN: Final = f"^[!-~]{{1,{MAX_KEY_LEN}}}$"
_KEY = re.compile(IDEMPOTENCY_KEY_PATTERN)


def valid_key(value: object) -> bool:
    """True for 1..255 visible ASCII characters, no spaces (an HTTP header value strips
    spaces at its ends, so a key with them could not be sent the same way twice)."""
    return isinstance(value, str) and _KEY.fullmatch(value) is not None


def fingerprint(resource_id: str, kind: str | None, payload: Any) -> bytes:
    """A digest of what a report asks for (resource, kind, payload; keys sorted), so a
    repeat is recognised whatever order its JSON members came in. Trace context and the
    key itself are not part of it: a retry may carry another ``traceparent``."""
    canonical = orjson.dumps([resource_id, kind, payload], option=orjson.OPT_SORT_KEYS)
    return hashlib.sha256(canonical).digest()[:16]


class Remembered(NamedTuple):
    """What a key was answered with, and when (in the caller's clock)."""

    fingerprint: bytes
    message_id: str
    created: float


@attrs.define(eq=False)
class IdempotencyKeys:
    """Key → original answer, in creation order, bounded by ``max_keys`` and ``window``."""

    window: float
    max_keys: int
    _entries: OrderedDict[str, Remembered] = attrs.field(init=False, factory=OrderedDict)
    #: Keys removed because they reached ``window`` / because ``max_keys`` was reached.
    expired: int = attrs.field(init=False, default=0)
    evicted: int = attrs.field(init=False, default=0)

    def __len__(self) -> int:
        return len(self._entries)

    def lookup(self, key: str, now: float) -> Remembered | None:
        """The live answer for ``key``, or ``None`` (never seen, or expired). Never blocks."""
        entry = self._entries.get(key)
        if entry is None or now - entry.created >= self.window:
            return None
        return entry

    def remember(self, key: str, fp: bytes, message_id: str, now: float) -> list[str]:
        """Record ``key``'s answer; return every key removed on the way (expired ones, then
        the oldest beyond ``max_keys``), for the caller to delete from the store."""
        removed = self.expire(now)
        entries = self._entries
        if entries.pop(key, None) is not None:
            removed.append(key)  # an expired entry of the same key: replaced, not kept
            self.expired += 1
        entries[key] = Remembered(fp, message_id, now)
        while len(entries) > self.max_keys:
            removed.append(entries.popitem(last=False)[0])
            self.evicted += 1
        return [k for k in removed if k != key]

    def expire(self, now: float) -> list[str]:
        """Remove every key whose window has passed (``created + window <= now``); return them.

        Entries are in creation order, so this stops at the first live one: O(removed)."""
        entries = self._entries
        removed: list[str] = []
        window = self.window
        while entries:
            key, entry = next(iter(entries.items()))
            if now - entry.created < window:
                break
            del entries[key]
            removed.append(key)
        self.expired += len(removed)
        return removed

    def restore(self, key: str, fp: bytes, message_id: str, created: float) -> None:
        """Load one key at start (call in creation order; the bound still applies)."""
        self._entries[key] = Remembered(fp, message_id, created)
        if len(self._entries) > self.max_keys:
            self._entries.popitem(last=False)
            self.evicted += 1


__all__ = [
    "IDEMPOTENCY_KEY_PATTERN",
    "MAX_KEY_LEN",
    "IdempotencyKeys",
    "Remembered",
    "fingerprint",
    "valid_key",
]
