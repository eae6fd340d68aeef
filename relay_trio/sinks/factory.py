"""Builds the configured side sinks (audit file, UDP, webhook) from the settings."""

from __future__ import annotations

import httpx

from .audit import AuditFileSink
from .base import SideSink
from .udp import UdpSink, parse_udp_target
from .webhook import WebhookSink


def build_sinks(
    audit_file: str | None,
    udp: str | None,
    webhook: str | None,
    client: httpx.AsyncClient | None,
) -> list[SideSink]:
    """Sinks for the ``side_audit_file``, ``side_udp`` and ``side_webhook`` settings.

    Unset or empty settings are skipped. Does no I/O (files and sockets open on first
    write). Raises ``ValueError`` for a malformed UDP target or a non-http(s) webhook URL.
    """
    sinks: list[SideSink] = []
    if audit_file:
        sinks.append(AuditFileSink(audit_file))
    if udp:
        host, port = parse_udp_target(udp)
        sinks.append(UdpSink(host, port))
    if webhook:
        try:
            url = httpx.URL(webhook)
        except httpx.InvalidURL as exc:
            raise ValueError(f"side_webhook is not a valid URL: {webhook!r} ({exc})") from exc
        if url.scheme not in ("http", "https") or not url.host:
            raise ValueError(f"side_webhook must be an http(s) URL with a host, got {webhook!r}")
        sinks.append(WebhookSink(webhook, client))
    return sinks
