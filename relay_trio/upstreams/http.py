"""The ``http(s)://`` upstream: one POST per message with httpx, concurrent up to
``upstream_concurrency`` per upstream, the answer read up to ``upstream_max_response_bytes``;
``Retry-After`` on 429/503 is reported with the failure.
"""

from __future__ import annotations

import datetime
import math
import time
import zlib
from collections.abc import AsyncGenerator, Callable, Sequence
from contextlib import aclosing
from email.utils import parsedate_to_datetime
from typing import Final, cast

import attrs
import httpx
import orjson
import trio

from ..core.webhooks import TraceContext, signature_header
from ..tracing import NO_TRACING, Tracing, start_trace
from .base import ACKED, TIMED_OUT, Outbound, SendResult, SendStatus

#: Largest ``Content-Length`` (in digits) worth converting; longer is over any cap anyway.
_MAX_LENGTH_DIGITS: Final = 15
#: Statuses whose ``Retry-After`` sets the next attempt (RFC 9110 section 10.2.3).
_RETRY_AFTER_STATUSES: Final = frozenset({429, 503})


def parse_retry_after(value: str | None, now: float) -> float | None:
    """Seconds to wait from an HTTP ``Retry-After`` value, or ``None`` if absent or invalid.

    Accepts delta-seconds (``"120"``) or an HTTP-date, read against the wall-clock time
    ``now`` (a date in the past gives 0; a date without a zone is GMT, as HTTP-dates are).
    Anything else -- negative or fractional numbers, garbage -- is ignored (``None``) so
    the caller falls back to its normal backoff. Pure; never raises.
    """
    if value is None:
        return None
    value = value.strip()
    if value.isascii() and value.isdigit():
        # float(), not int(): no digit limit, and a huge value is capped by the caller.
        return float(value)
    try:
        when = parsedate_to_datetime(value)
    except (TypeError, ValueError, IndexError, OverflowError):
        return None
    if when.tzinfo is None:  # "-0000" or an obsolete zone-less format: HTTP-dates are GMT
        when = when.replace(tzinfo=datetime.UTC)
    try:
        delay = when.timestamp() - now
    except (OverflowError, OSError, ValueError):
        return None
    return max(delay, 0.0) if math.isfinite(delay) else None


@attrs.define(eq=False)
class HttpUpstream:
    """An HTTP upstream: POSTs each message as JSON, at most ``limiter`` requests at a time.

    ``2xx {"ack": true}`` is a synchronous ACK; any other 2xx means accepted, ACK later;
    anything else (status, network error, an answer over ``max_response_bytes``) is a
    failed attempt. A 429 or 503 with a valid ``Retry-After`` carries it in the result.
    The answer is streamed and never held beyond ``max_response_bytes`` (an ACK is a few
    bytes; an upstream answering megabytes must not cost the relay its memory).
    """

    url: str
    client: httpx.AsyncClient
    #: Concurrent requests to this upstream, shared by every sender task and the shutdown
    #: flush: one hung request holds one slot, for at most the attempt deadline.
    limiter: trio.CapacityLimiter = attrs.field(factory=lambda: trio.CapacityLimiter(64))
    max_response_bytes: int = 65536
    #: Wall-clock seconds, to read a ``Retry-After`` HTTP-date and for ``webhook-timestamp``.
    wall_clock: Callable[[], float] = time.time
    #: HMAC keys (decoded ``whsec_`` secrets): one ``webhook-signature`` entry each.
    signing_keys: tuple[bytes, ...] = ()
    tracing: Tracing = NO_TRACING

    async def send_one(self, message: Outbound, attempt_deadline: float) -> SendResult:
        """POST ``message`` once, within ``attempt_deadline`` seconds.

        Takes no slot of ``limiter``: the caller holds one. Delivery failures are results,
        never exceptions (a deadline miss is ``FAILED`` ``send_timeout``); cancellation
        propagates. The response is closed before this returns.
        """
        with trio.move_on_after(attempt_deadline):
            return await self._post(message)
        return TIMED_OUT

    def headers(
        self, message: Outbound, trace: TraceContext, body: bytes, span_id: str
    ) -> dict[str, str]:
        """The delivery contract's headers for ``body`` (docs/upstream.md): ``webhook-id``
        (the message id: the same on every attempt and redrive), ``webhook-timestamp``,
        ``webhook-signature`` when the upstream has keys, ``traceparent``/``tracestate``.
        The signature covers exactly ``body``, the bytes sent. Never blocks."""
        timestamp = int(self.wall_clock())
        headers = {
            "content-type": "application/json",
            # identity: a compressed answer could expand past the cap inside one chunk.
            "accept-encoding": "identity",
            "webhook-id": message.message_id,
            "webhook-timestamp": str(timestamp),
            "traceparent": trace.traceparent(span_id),
        }
        if self.signing_keys:
            headers["webhook-signature"] = signature_header(
                self.signing_keys, message.message_id, timestamp, body
            )
        if trace.tracestate is not None:
            headers["tracestate"] = trace.tracestate
        return headers

    async def _post(self, message: Outbound) -> SendResult:
        """One attempt inside its span (ended however the attempt ends, cancellation too)."""
        body = orjson.dumps(message.body())
        trace = message.trace if message.trace is not None else start_trace()
        span = self.tracing.attempt(trace, message.message_id, message.attempt, self.url)
        result = SendResult(SendStatus.FAILED, "cancelled")
        try:
            result = await self._exchange(self.headers(message, trace, body, span.span_id), body)
        except httpx.HTTPError as exc:
            result = SendResult(SendStatus.FAILED, type(exc).__name__)
        finally:
            span.end(result.status.value, result.detail)
        return result

    async def _exchange(self, headers: dict[str, str], body: bytes) -> SendResult:
        async with self.client.stream("POST", self.url, content=body, headers=headers) as response:
            status = response.status_code
            content = await self._read_capped(response)
            if not 200 <= status < 300:
                retry_after = None
                if status in _RETRY_AFTER_STATUSES:
                    retry_after = parse_retry_after(
                        response.headers.get("retry-after"), self.wall_clock()
                    )
                if retry_after is None:
                    return SendResult(SendStatus.FAILED, f"HTTP {status}")
                return SendResult(
                    SendStatus.FAILED, f"HTTP {status}, Retry-After {retry_after:g}s", retry_after
                )
            if content is None:
                return SendResult(
                    SendStatus.FAILED, f"response body over {self.max_response_bytes} bytes"
                )
        try:
            answer = orjson.loads(content) if content else {}
        except orjson.JSONDecodeError:
            answer = {}
        if isinstance(answer, dict) and answer.get("ack") is True:
            return ACKED
        return SendResult(SendStatus.SENT)

    async def _read_capped(self, response: httpx.Response) -> bytes | None:
        """The decoded body, or ``None`` as soon as it is known to exceed the cap.

        Stops reading at the first chunk past the cap (the caller's ``async with`` then
        closes the connection), so at most the cap plus one network chunk is ever held.
        """
        cap = self.max_response_bytes
        declared = response.headers.get("content-length", "")
        if (
            declared.isascii()
            and declared.isdigit()
            and (len(declared) > _MAX_LENGTH_DIGITS or int(declared) > cap)
        ):
            return None
        if response.is_stream_consumed:
            # Already in memory (an in-process transport such as httpx.MockTransport).
            content = response.content
            return None if len(content) > cap else content
        raw = bytearray()
        chunks = cast(AsyncGenerator[bytes, None], response.aiter_raw())
        async with aclosing(chunks):
            async for chunk in chunks:
                raw += chunk
                if len(raw) > cap:
                    return None
        encoding = response.headers.get("content-encoding", "identity").strip().lower()
        if encoding in ("", "identity"):
            return bytes(raw)
        if encoding in ("gzip", "x-gzip", "deflate"):
            # Bounded inflate: a small compressed answer may not expand past the cap either.
            try:
                inflated = zlib.decompressobj(zlib.MAX_WBITS | 32).decompress(raw, cap + 1)
            except zlib.error:
                return b""
            return None if len(inflated) > cap else inflated
        return b""  # an encoding we asked not to get: unreadable, so not an ACK

    async def send_batch(
        self, batch: Sequence[Outbound], attempt_deadline: float
    ) -> list[SendResult]:
        """Send every message concurrently (each holding one slot of ``limiter``).

        Returns within ``attempt_deadline`` seconds: a message still waiting for a slot
        or an answer then is ``FAILED`` ``send_timeout``.
        """
        results = [TIMED_OUT] * len(batch)

        async def one(i: int, message: Outbound) -> None:
            async with self.limiter:
                results[i] = await self.send_one(message, attempt_deadline)

        with trio.move_on_after(attempt_deadline):
            async with trio.open_nursery() as nursery:
                for i, message in enumerate(batch):
                    nursery.start_soon(one, i, message)
        return results

    async def probe(self) -> bool:
        try:
            async with self.client.stream("GET", self.url) as response:
                # Any answer below 500 (a 405 included) shows the server is up and routing.
                # The body is never read: a probe must not download a huge answer either.
                return response.status_code < 500
        except httpx.HTTPError:
            return False

    async def aclose(self) -> None:
        await self.client.aclose()
