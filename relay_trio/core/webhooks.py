"""Signed deliveries (the Standard Webhooks scheme) and W3C trace context. Pure.

Signing: every HTTP delivery carries ``webhook-id`` (the message id, the same on every
attempt and redrive), ``webhook-timestamp`` (Unix seconds) and, when the upstream has
secrets, ``webhook-signature``: ``v1,<base64 HMAC-SHA256(key, "<id>.<timestamp>.<body>")>``,
one per secret, separated by spaces (several during a rotation). A secret is written
``whsec_<base64 key>``; the HMAC key is the decoded bytes.

Trace context (https://www.w3.org/TR/trace-context/): a ``traceparent`` is
``00-<32 hex trace id>-<16 hex parent id>-<2 hex flags>``; an invalid one is ignored (a
new trace is started), as the recommendation asks.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import re
from collections.abc import Sequence
from typing import Final, NamedTuple

SECRET_PREFIX: Final = "whsec_"
#: ``upstream_signing_secrets`` entry for an upstream that is not signed.
NO_SECRET: Final = "-"
MAX_TRACESTATE_LEN: Final = 512

_TRACEPARENT = re.compile(r"^([0-9a-f]{2})-([0-9a-f]{32})-([0-9a-f]{16})-([0-9a-f]{2})(-.*)?$")


def parse_secrets(value: str) -> tuple[bytes, ...]:
    """The HMAC keys of one upstream's entry: ``-`` (none) or space-separated
    ``whsec_<base64>`` secrets. Raises ``ValueError`` (without echoing the secret)."""
    if value.strip() == NO_SECRET:
        return ()
    keys: list[bytes] = []
    for i, part in enumerate(value.split(), 1):
        if not part.startswith(SECRET_PREFIX):
            raise ValueError(f"secret {i} must start with {SECRET_PREFIX}")
        try:
            key = base64.b64decode(part[len(SECRET_PREFIX) :], validate=True)
        except (binascii.Error, ValueError):
            raise ValueError(f"secret {i} is not valid base64 after {SECRET_PREFIX}") from None
        if len(key) < 16:
            raise ValueError(f"secret {i} must decode to at least 16 bytes")
        keys.append(key)
    if not keys:
        raise ValueError(f"an entry must hold a secret or {NO_SECRET}")
    return tuple(keys)


def signature_header(keys: Sequence[bytes], message_id: str, timestamp: int, body: bytes) -> str:
    """The ``webhook-signature`` value: ``v1,<base64>`` per key, space-separated."""
    signed = b"%s.%d.%s" % (message_id.encode(), timestamp, body)
    return " ".join(
        "v1," + base64.b64encode(hmac.new(key, signed, hashlib.sha256).digest()).decode()
        for key in keys
    )


class TraceContext(NamedTuple):
    """The W3C trace a message belongs to: trace id, flags and the caller's ``tracestate``.

    ``parent_id`` is the span id the report arrived with (``None`` when the relay started
    the trace)."""

    trace_id: str
    parent_id: str | None
    flags: str
    tracestate: str | None = None

    def traceparent(self, span_id: str) -> str:
        """The ``traceparent`` header for a request made from span ``span_id``."""
        return f"00-{self.trace_id}-{span_id}-{self.flags}"

    def to_meta(self) -> dict[str, str]:
        """A JSON-ready form for the store (see :meth:`from_meta`)."""
        out = {"trace_id": self.trace_id, "flags": self.flags}
        if self.parent_id is not None:
            out["parent_id"] = self.parent_id
        if self.tracestate is not None:
            out["tracestate"] = self.tracestate
        return out

    @classmethod
    def from_meta(cls, meta: object) -> TraceContext | None:
        """Inverse of :meth:`to_meta`; ``None`` for anything else. Never raises."""
        if not isinstance(meta, dict):
            return None
        trace_id, flags = meta.get("trace_id"), meta.get("flags")
        parent, state = meta.get("parent_id"), meta.get("tracestate")
        if not (isinstance(trace_id, str) and isinstance(flags, str)):
            return None
        return cls(
            trace_id,
            parent if isinstance(parent, str) else None,
            flags,
            state if isinstance(state, str) else None,
        )


def parse_traceparent(value: object, tracestate: object = None) -> TraceContext | None:
    """The trace a ``traceparent`` value names, or ``None`` when absent or invalid (version
    ff, all-zero ids, wrong shape). ``tracestate`` is kept only with a valid parent, and only
    when it is a string of at most 512 characters."""
    if not isinstance(value, str) or len(value) > 512:
        return None
    m = _TRACEPARENT.match(value.strip().lower())
    if m is None:
        return None
    version, trace_id, parent_id, flags, rest = m.groups()
    if version == "ff" or (version == "00" and rest) or trace_id == "0" * 32:
        return None
    if parent_id == "0" * 16:
        return None
    state = (
        tracestate
        if isinstance(tracestate, str) and 0 < len(tracestate) <= MAX_TRACESTATE_LEN
        else None
    )
    return TraceContext(trace_id, parent_id, flags, state)


def new_trace(random_bits: int) -> TraceContext:
    """A new sampled trace whose id is the given 128 random bits (never all zero)."""
    return TraceContext(f"{random_bits or 1:032x}", None, "01")


__all__ = [
    "NO_SECRET",
    "SECRET_PREFIX",
    "TraceContext",
    "new_trace",
    "parse_secrets",
    "parse_traceparent",
    "signature_header",
]
