"""Builds the upstream client for a URL by its scheme (the one place to add an upstream kind)."""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping

import httpx
import trio

from ..tracing import NO_TRACING, Tracing
from .base import Upstream
from .file import FileUpstream
from .http import HttpUpstream


def open_upstream(
    url: str,
    *,
    timeout: float,
    concurrency: int = 64,
    max_response_bytes: int = 65536,
    wall_clock: Callable[[], float] = time.time,
    signing_keys: tuple[bytes, ...] = (),
    tracing: Tracing = NO_TRACING,
) -> Upstream:
    """An upstream client for ``url`` (``http(s)://`` or ``file://``). Never blocks.

    ``concurrency`` bounds the requests in flight to an HTTP upstream (its connection pool
    has as many connections); ``max_response_bytes`` bounds what is read of each answer.
    ``signing_keys`` sign every delivery (Standard Webhooks); ``tracing`` makes a span per
    attempt. All of these are ignored for ``file://``.
    """
    if url.startswith("file://"):
        return FileUpstream(url)
    client = httpx.AsyncClient(
        timeout=httpx.Timeout(timeout),
        limits=httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency),
    )
    return HttpUpstream(
        url,
        client,
        trio.CapacityLimiter(concurrency),
        max_response_bytes=max_response_bytes,
        wall_clock=wall_clock,
        signing_keys=signing_keys,
        tracing=tracing,
    )


def upstream_builder(
    *,
    concurrency: int,
    max_response_bytes: int,
    wall_clock: Callable[[], float],
    signing: Mapping[str, tuple[bytes, ...]] | None = None,
    tracing: Tracing = NO_TRACING,
) -> Callable[[str, float], Upstream]:
    """An ``(url, send_timeout) -> Upstream`` factory with these limits (see
    :func:`open_upstream`); ``signing`` maps an upstream URL to its HMAC keys."""

    def build(url: str, timeout: float) -> Upstream:
        return open_upstream(
            url,
            timeout=timeout,
            concurrency=concurrency,
            max_response_bytes=max_response_bytes,
            wall_clock=wall_clock,
            signing_keys=(signing or {}).get(url, ()),
            tracing=tracing,
        )

    return build
