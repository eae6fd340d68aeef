"""Log output: human text or JSON lines (``log_format``), never a token or a payload.

A JSON line carries ``time`` (RFC 3339, UTC), ``level``, ``logger``, ``message`` and
the ids a log call names with ``extra=``: ``resource_id``, ``message_id``, ``upstream``.
Nothing else from a record is copied, so an ``extra`` holding a payload is never
written. Configured token values are also replaced by ``[redacted]`` in every message
and traceback, whatever the format: a token must not leak through an exception text.

Example::

    log.warning("dead letter %s", mid, extra={"message_id": mid, "resource_id": rid})
"""

from __future__ import annotations

import logging
import time
from collections.abc import Iterable
from typing import Final, TextIO

import orjson

#: The record attributes a JSON line carries besides time, level, logger and message.
ID_FIELDS: Final = ("resource_id", "message_id", "upstream")
LOG_FORMATS: Final = ("text", "json")
TEXT_FORMAT: Final = "%(asctime)s %(levelname)s %(name)s: %(message)s"
REDACTED: Final = "[redacted]"


def _rfc3339(created: float) -> str:
    seconds = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(created))
    return f"{seconds}.{int(created % 1 * 1000):03d}Z"


class JsonLineFormatter(logging.Formatter):
    """One JSON object per record, on one line (newlines in messages are escaped)."""

    def format(self, record: logging.LogRecord) -> str:
        line: dict[str, object] = {
            "time": _rfc3339(record.created),
            "level": record.levelname.lower(),
            "logger": record.name,
            "message": record.getMessage(),
        }
        for name in ID_FIELDS:
            value = record.__dict__.get(name)
            if isinstance(value, str | int):
                line[name] = value
        if record.exc_info:
            line["exception"] = record.exc_text or self.formatException(record.exc_info)
        return orjson.dumps(line).decode()


class RedactSecrets(logging.Filter):
    """Replaces each configured secret in a record's message (and traceback) by
    ``[redacted]``. Never drops a record."""

    def __init__(self, secrets: Iterable[str]) -> None:
        super().__init__()
        self.secrets = tuple(sorted({s for s in secrets if s}, key=len, reverse=True))

    def scrub(self, text: str) -> str:
        for secret in self.secrets:
            if secret in text:
                text = text.replace(secret, REDACTED)
        return text

    def filter(self, record: logging.LogRecord) -> bool:
        if not self.secrets:
            return True
        message = record.getMessage()
        clean = self.scrub(message)
        if clean != message:
            record.msg, record.args = clean, None
        if record.exc_info and not record.exc_text:
            record.exc_text = logging.Formatter().formatException(record.exc_info)
        if record.exc_text:
            record.exc_text = self.scrub(record.exc_text)
        return True


def configure_logging(
    level: str, log_format: str, stream: TextIO, secrets: Iterable[str] = ()
) -> logging.Handler:
    """Route every logger to ``stream`` in ``log_format`` (``text`` or ``json``) at
    ``level``, redacting ``secrets``. Replaces the root logger's handlers; returns the
    handler installed."""
    handler = logging.StreamHandler(stream)
    if log_format == "json":
        handler.setFormatter(JsonLineFormatter())
    else:
        handler.setFormatter(logging.Formatter(TEXT_FORMAT))
    handler.addFilter(RedactSecrets(secrets))
    root = logging.getLogger()
    for old in list(root.handlers):
        root.removeHandler(old)
    root.addHandler(handler)
    root.setLevel(level.upper())
    return handler


__all__ = ["ID_FIELDS", "LOG_FORMATS", "JsonLineFormatter", "RedactSecrets", "configure_logging"]
