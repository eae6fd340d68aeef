"""Showing configured URLs without their secrets.

Upstream and webhook URLs may carry credentials (``https://user:pass@host/ingest``). The
relay needs them to connect, but every place that *shows* a URL (``relay-trio config``,
``/v1/status``, metric labels, log lines, events) shows :func:`redact_url` of it instead:
one helper, so no display path can forget a case.

Pure: no I/O.
"""

from __future__ import annotations

from typing import Final

REDACTED: Final = "***"


def redact_url(url: str) -> str:
    """``url`` with its userinfo (``user:pass@``, ``token@``) replaced by ``***@``.

    The authority ends at the first ``/``, ``?`` or ``#`` after ``scheme://`` (RFC 3986, as
    httpx reads it), and the userinfo is everything up to its last ``@``. Strings without
    ``://`` or without userinfo come back unchanged. Never raises.
    """
    scheme, sep, rest = url.partition("://")
    if not sep:
        return url
    end = len(rest)
    for delimiter in "/?#":
        index = rest.find(delimiter, 0, end)
        if index != -1:
            end = index
    _userinfo, at, host = rest[:end].rpartition("@")
    if not at:
        return url
    return f"{scheme}://{REDACTED}@{host}{rest[end:]}"


def redact_value(value: object) -> object:
    """:func:`redact_url` applied to a string, or to each string of a list or tuple (as a
    list); anything else unchanged. For settings summaries."""
    if isinstance(value, str):
        return redact_url(value)
    if isinstance(value, list | tuple):
        return [redact_url(v) if isinstance(v, str) else v for v in value]
    return value


__all__ = ["REDACTED", "redact_url", "redact_value"]
