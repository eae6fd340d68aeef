"""Identifiers: resource ids and message ids, each defined and parsed in exactly one place.

A message id is ``"<resource_id>:<seq>"``: the resource id (1-128 characters of
``[A-Za-z0-9._:-]``, so it may itself contain ``:``) and the per-resource sequence number, a
canonical decimal (ASCII digits, no leading zero) in ``[1, 2**63 - 1]`` (an SQLite/JSON-safe
signed 64-bit integer). Message ids arrive from the network (ACKs, redrives), so the parser is
total: it returns ``None`` for anything else and never raises. It bounds the length *before*
converting digits, so ``"a:" + 5000 digits`` costs one ``len()`` (``int()`` raises past 4300
digits and is slow well before: one parser copy that skipped the bound answered 500).

The OpenAPI document publishes :data:`MESSAGE_ID_PATTERN` and :data:`MESSAGE_ID_MAX_LEN`,
the very regex and bound the parser uses, so the schema cannot drift from the code.

Pure: no I/O, no Trio.
"""

from __future__ import annotations

import re
from typing import Final

import attrs

RESOURCE_ID_MAX_LEN: Final = 128
#: One resource id (no anchors: ``fullmatch`` it, or embed it in a larger pattern).
RESOURCE_ID_CHARS: Final = rf"[A-Za-z0-9._:-]{{1,{RESOURCE_ID_MAX_LEN}}}"
RESOURCE_ID_RE: Final = re.compile(RESOURCE_ID_CHARS)
SEQ_MAX: Final = 2**63 - 1
#: Largest cursor a client may send: event ids (``after``, ``Last-Event-ID``) and dead-letter
#: indexes (``after``). Signed 64-bit, like every id the relay hands out.
CURSOR_MAX: Final = 2**63 - 1


def _decimal_up_to(limit: int) -> str:
    """A regex (no anchors) matching exactly the canonical decimals ``1..limit``.

    Shorter numbers than ``limit`` are free; a number as long as ``limit`` must agree with
    it on a prefix and then have a smaller digit, or equal it.
    """
    digits = str(limit)
    n = len(digits)
    branches = [f"[1-9][0-9]{{0,{n - 2}}}"] if n > 1 else []
    for i, d in enumerate(digits):
        low = 1 if i == 0 else 0
        top = int(d) - 1
        if top >= low:
            cls = f"[{low}-{top}]" if top > low else str(low)
            rest = f"[0-9]{{{n - i - 1}}}" if n - i - 1 else ""
            branches.append(digits[:i] + cls + rest)
    branches.append(digits)
    return "|".join(branches)


SEQ_PATTERN: Final = _decimal_up_to(SEQ_MAX)
MESSAGE_ID_MAX_LEN: Final = RESOURCE_ID_MAX_LEN + 1 + len(str(SEQ_MAX))
#: The whole message id, anchored (JSON Schema ``pattern`` semantics: search, so anchor it).
MESSAGE_ID_PATTERN: Final = f"^{RESOURCE_ID_CHARS}:(?:{SEQ_PATTERN})$"
_MESSAGE_ID_RE: Final = re.compile(f"({RESOURCE_ID_CHARS}):({SEQ_PATTERN})")


@attrs.frozen
class MessageId:
    """A parsed message id; ``str()`` gives back the canonical ``"<resource_id>:<seq>"``."""

    resource_id: str
    seq: int

    @staticmethod
    def split(text: object) -> tuple[str, int] | None:
        """The message-id parser: ``(resource_id, seq)``, or ``None`` if ``text`` is not one.

        :meth:`parse` without building the object, for hot paths (the UMH parses one id per
        admission) where the attrs instance would cost more than the parse. Never raises.
        """
        # The length bound first: the regex and int() then see at most 148 characters.
        if not isinstance(text, str) or len(text) > MESSAGE_ID_MAX_LEN:
            return None
        match = _MESSAGE_ID_RE.fullmatch(text)
        if match is None:
            return None
        rid, seq = match.groups()
        return rid, int(seq)

    @classmethod
    def parse(cls, text: object) -> MessageId | None:
        """The :class:`MessageId` that ``text`` spells, or ``None``. Never raises."""
        parts = cls.split(text)
        return None if parts is None else cls(*parts)

    @classmethod
    def of(cls, text: str) -> MessageId:
        """:meth:`parse` for ids the relay issued itself: ``ValueError`` if ``text`` is not one
        (a bug, not bad input)."""
        parsed = cls.parse(text)
        if parsed is None:
            raise ValueError(f"not a message id: {text[: MESSAGE_ID_MAX_LEN + 1]!r}")
        return parsed

    def __str__(self) -> str:
        return f"{self.resource_id}:{self.seq}"


def is_valid_resource_id(value: object) -> bool:
    """True when ``value`` is a string of 1-128 chars from ``[A-Za-z0-9._:-]``."""
    return isinstance(value, str) and RESOURCE_ID_RE.fullmatch(value) is not None


__all__ = [
    "CURSOR_MAX",
    "MESSAGE_ID_MAX_LEN",
    "MESSAGE_ID_PATTERN",
    "RESOURCE_ID_RE",
    "SEQ_MAX",
    "MessageId",
    "is_valid_resource_id",
]
