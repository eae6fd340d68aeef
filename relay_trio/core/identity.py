"""Who is on the other end of a stream connection, and what that peer may report on.

Pure (no Trio, no sockets). A VSOCK peer's CID comes from the kernel, so a guest VM can be
bound to the resources it reports on: a guest cannot report on behalf of another guest.
"""

from __future__ import annotations

from typing import Final

import attrs

from .model import Problem

__all__ = [
    "MAX_RESERVED_CID",
    "Identity",
    "check_identity",
    "check_peer_cid",
    "identity_problem",
]

#: CIDs 0 (hypervisor), 1 (local loopback) and 2 (host) are never a guest VM.
MAX_RESERVED_CID: Final = 2


@attrs.frozen
class Identity:
    """Who is on the other end of one connection.

    ``listen`` is the canonical URL of the listener it arrived on and ``peer`` the remote
    address, both for logs only; ``cid`` is set for VSOCK connections and binds resource
    ids (see :func:`check_identity`).
    """

    listen: str
    peer: str = ""
    cid: int | None = None


def check_identity(resource_id: str, cid: int) -> Problem | None:
    """A 403 problem unless ``resource_id`` belongs to VSOCK peer ``cid``. Pure.

    A resource belongs to a CID when it is exactly ``str(cid)`` or ends with ``":<cid>"``
    (``"vm-1:100"`` belongs to CID 100; ``"vm-1:1100"`` does not). The CID comes from
    the kernel, so a guest cannot report on behalf of another guest.
    """
    tail = str(cid)
    if resource_id == tail or resource_id.endswith(":" + tail):
        return None
    return Problem(
        403,
        "identity-mismatch",
        "Resource does not belong to this peer",
        f"resource_id must be {tail!r} or end with ':{tail}' on this connection",
        {"cid": cid},
    )


def check_peer_cid(cid: int) -> Problem | None:
    """A 403 problem for a VSOCK peer that is not a guest VM (CID <= 2). Pure."""
    if cid > MAX_RESERVED_CID:
        return None
    return Problem(
        403,
        "peer-not-allowed",
        "Peer not allowed",
        f"VSOCK peer CID {cid} is the hypervisor or host, not a guest VM",
        {"cid": cid},
    )


def identity_problem(obj: object, cid: int | None) -> Problem | None:
    """The 403 for a decoded report that names a resource not owned by VSOCK peer ``cid``.

    None when there is no CID (TCP, Unix) or the object has no string ``resource_id``:
    those are left to admission, which answers 422. Pure.
    """
    if cid is None or not isinstance(obj, dict):
        return None
    rid = obj.get("resource_id")
    if not isinstance(rid, str):
        return None
    return check_identity(rid, cid)
