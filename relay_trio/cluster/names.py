"""Names of the JetStream assets and subjects cluster mode uses, and the key encoding.

Resource ids may contain ``:`` and ``.`` (``[A-Za-z0-9._:-]``), which KV keys and subject
tokens cannot hold as such; :func:`token` escapes them reversibly (``=`` never occurs in a
resource id, so the escape is unambiguous).
"""

from __future__ import annotations

from typing import Final

REPORTS_STREAM: Final = "RELAY_REPORTS"
REPORTS_SUBJECT: Final = "relay.reports"
SENDERS_CONSUMER: Final = "relay-senders"
DEAD_LETTER_STREAM: Final = "RELAY_DEADLETTERS"
DEAD_LETTER_SUBJECT: Final = "relay.deadletters"
ADMISSION_BUCKET: Final = "relay_admission"
INFLIGHT_BUCKET: Final = "relay_inflight"
MEMBERS_BUCKET: Final = "relay_members"
EVENTS_STREAM: Final = "RELAY_EVENTS"
EVENTS_SUBJECT: Final = "relay.events"


def token(text: str) -> str:
    """``text`` (a resource or message id) as one KV key / subject token. Reversible."""
    return text.replace(".", "=2E").replace(":", "=3A")


def untoken(key: str) -> str:
    """Inverse of :func:`token`."""
    return key.replace("=3A", ":").replace("=2E", ".")


def report_subject(resource_id: str) -> str:
    """The subject a resource's reports are published on (one pending per subject)."""
    return f"{REPORTS_SUBJECT}.{token(resource_id)}"


def dead_letter_subject(resource_id: str) -> str:
    """The subject a resource's dead letters are published on."""
    return f"{DEAD_LETTER_SUBJECT}.{token(resource_id)}"


def event_subject(topic: str) -> str:
    """The subject an event of ``topic`` is published on (topics are plain tokens)."""
    return f"{EVENTS_SUBJECT}.{topic}"
