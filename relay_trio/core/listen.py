"""Listen addresses for the stream receiver: ``tcp://``, ``unix://`` and ``vsock://`` URLs.

Pure (no Trio, no sockets): the server parses ``stream_listen`` with it, and the
``relay-trio send`` client parses its ``--url`` with the same code, so both sides agree on
what an address means.
"""

from __future__ import annotations

import os
import re
from typing import Final, Literal

import attrs

__all__ = ["ListenAddress", "Transport", "parse_listen"]

_U32_MAX: Final = 0xFFFFFFFF
#: ``sun_path`` is 108 bytes on Linux including the terminating NUL.
_MAX_UNIX_PATH: Final = 107
_HOSTNAME_RE: Final = re.compile(r"[A-Za-z0-9._-]+")
_IPV6_RE: Final = re.compile(r"[0-9A-Fa-f:.]+(%[A-Za-z0-9._-]+)?")

Transport = Literal["tcp", "unix", "vsock"]


@attrs.frozen
class ListenAddress:
    """One place to listen. Build it with :func:`parse_listen`.

    ``host``/``port`` are used for tcp, ``path`` for unix, ``cid``/``port`` for vsock
    (``cid == -1`` is VMADDR_CID_ANY, ``port == -1`` on vsock is VMADDR_PORT_ANY).
    """

    transport: Transport
    host: str = ""
    port: int = 0
    path: str = ""
    cid: int = -1

    @property
    def url(self) -> str:
        """The canonical URL; ``parse_listen(a.url) == a``."""
        if self.transport == "tcp":
            host = f"[{self.host}]" if ":" in self.host else self.host
            return f"tcp://{host}:{self.port}"
        if self.transport == "unix":
            return f"unix://{self.path}"
        cid = "any" if self.cid == -1 else str(self.cid)
        port = "any" if self.port == -1 else str(self.port)
        return f"vsock://{cid}:{port}"


_USAGE: Final = "expected tcp://HOST:PORT, unix:///abs/path.sock or vsock://CID:PORT"


def parse_listen(url: str) -> ListenAddress:
    """Parse a listen URL. Pure; never blocks.

    Accepts ``tcp://HOST:PORT`` (IPv6 hosts in brackets, port 0 = any free port),
    ``unix:///abs/path.sock`` and ``vsock://CID:PORT`` (CID ``any``/``-1`` for
    VMADDR_CID_ANY; PORT ``any``/``-1`` for VMADDR_PORT_ANY).

    Raises:
        ValueError: with a message naming the URL and what is wrong with it.
    """
    scheme, sep, rest = url.partition("://")
    if not sep:
        raise ValueError(f"listen address {url!r}: missing scheme; {_USAGE}")
    scheme = scheme.lower()
    if scheme == "tcp":
        host, port_text = _split_host_port(url, rest)
        host = _check_tcp_host(url, host)
        return ListenAddress("tcp", host=host, port=_parse_int(url, "port", port_text, 0, 65535))
    if scheme == "unix":
        return ListenAddress("unix", path=_check_unix_path(url, rest))
    if scheme == "vsock":
        cid_text, port_text = _split_host_port(url, rest)
        cid = _parse_any_int(url, "CID", cid_text, _U32_MAX)
        port = _parse_any_int(url, "port", port_text, _U32_MAX)
        return ListenAddress("vsock", cid=cid, port=port)
    raise ValueError(f"listen address {url!r}: unknown scheme {scheme!r}; {_USAGE}")


def _split_host_port(url: str, rest: str) -> tuple[str, str]:
    if any(c in rest for c in "/?#@") or any(c.isspace() for c in rest):
        raise ValueError(f"listen address {url!r}: expected only HOST:PORT after '://'")
    host, sep, port = rest.rpartition(":")
    if not sep or not host or not port:
        raise ValueError(f"listen address {url!r}: expected HOST:PORT after '://'")
    return host, port


def _check_tcp_host(url: str, host: str) -> str:
    if host.startswith("[") and host.endswith("]"):
        inner = host[1:-1]
        if ":" in inner and _IPV6_RE.fullmatch(inner):
            return inner
        raise ValueError(f"listen address {url!r}: bad IPv6 host {host!r}")
    if ":" in host:
        raise ValueError(f"listen address {url!r}: IPv6 hosts must be in brackets, e.g. [::1]")
    if not _HOSTNAME_RE.fullmatch(host):
        raise ValueError(f"listen address {url!r}: bad host {host!r}")
    return host


def _check_unix_path(url: str, path: str) -> str:
    if not path.startswith("/"):
        raise ValueError(
            f"listen address {url!r}: unix path must be absolute (unix:///abs/path.sock)"
        )
    if "\0" in path or path.endswith("/"):
        raise ValueError(f"listen address {url!r}: bad unix socket path")
    if len(os.fsencode(path)) > _MAX_UNIX_PATH:
        raise ValueError(
            f"listen address {url!r}: unix socket path longer than {_MAX_UNIX_PATH} bytes"
        )
    return path


def _parse_int(url: str, what: str, text: str, low: int, high: int) -> int:
    # isdecimal() rejects '+1', ' 1', '1_000' and non-ASCII digits that int() would take.
    body = text[1:] if text.startswith("-") else text
    if not body.isascii() or not body.isdecimal():
        raise ValueError(f"listen address {url!r}: {what} {text!r} is not an integer")
    value = int(text)
    if not low <= value <= high:
        raise ValueError(f"listen address {url!r}: {what} {value} not in {low}..{high}")
    return value


def _parse_any_int(url: str, what: str, text: str, any_value: int) -> int:
    """``any``, ``-1`` and the all-ones wildcard all normalise to -1."""
    if text.lower() == "any":
        return -1
    value = _parse_int(url, what, text, -1, any_value)
    return -1 if value == any_value else value
