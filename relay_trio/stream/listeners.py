"""The stream receiver's sockets: open TCP, Unix and VSOCK listeners, name their peers.

Trio sockets only; no protocol here. What a Unix listener leaves on disk is cleaned up by
its owner with :func:`unlink_if_same`, so a crashed run's stale socket file is replaced
but a live listener's is never stolen.
"""

from __future__ import annotations

import errno
import logging
import os
import socket
import stat
from typing import Final

import trio

from ..core.identity import Identity
from ..core.listen import ListenAddress

__all__ = [
    "ACCEPT_CAPACITY_ERRNOS",
    "describe_bound",
    "open_listeners",
    "peer_identity",
    "unlink_if_same",
]

log = logging.getLogger(__name__)

VMADDR_CID_ANY: Final = getattr(socket, "VMADDR_CID_ANY", 0xFFFFFFFF)
VMADDR_PORT_ANY: Final = getattr(socket, "VMADDR_PORT_ANY", 0xFFFFFFFF)
#: accept() errors that mean "out of descriptors/memory right now", not "listener broken".
ACCEPT_CAPACITY_ERRNOS: Final = frozenset({errno.EMFILE, errno.ENFILE, errno.ENOMEM, errno.ENOBUFS})
#: bind() errors that mean this kernel/VM has no usable VSOCK transport.
_VSOCK_UNAVAILABLE_ERRNOS: Final = frozenset(
    {errno.EADDRNOTAVAIL, errno.ENODEV, errno.EAFNOSUPPORT, errno.EPROTONOSUPPORT}
)


async def open_listeners(
    address: ListenAddress, unix_paths: list[tuple[str, int]]
) -> list[trio.SocketListener]:
    """The listeners for ``address`` (a TCP host may resolve to several; an unsupported
    VSOCK address gives none, after one warning). A bound Unix path is appended to
    ``unix_paths`` with its inode, for :func:`unlink_if_same` at exit.

    Raises OSError when a TCP or Unix address cannot be bound.
    """
    if address.transport == "tcp":
        return await trio.open_tcp_listeners(address.port, host=address.host)
    if address.transport == "unix":
        listener, inode = await open_unix_listener(address.path)
        unix_paths.append((address.path, inode))
        return [listener]
    vsock = await open_vsock_listener(address)
    return [] if vsock is None else [vsock]


def peer_identity(stream: trio.SocketStream, address: ListenAddress) -> Identity:
    """Who is connected on ``stream`` (the CID for VSOCK, from the kernel). Never blocks."""
    url = address.url
    try:
        peer = stream.socket.getpeername()
    except OSError:
        return Identity(listen=url, peer="unknown")
    if address.transport == "vsock":
        cid, port = peer
        return Identity(listen=url, peer=f"vsock://{cid}:{port}", cid=int(cid))
    if address.transport == "tcp":
        host = f"[{peer[0]}]" if ":" in peer[0] else peer[0]
        return Identity(listen=url, peer=f"tcp://{host}:{peer[1]}")
    return Identity(listen=url, peer=f"unix:{peer or '(unnamed)'}")


def describe_bound(listener: trio.SocketListener, address: ListenAddress) -> str:
    """The canonical URL ``listener`` is really bound to (port 0 resolved). Never blocks."""
    name = listener.socket.getsockname()
    if address.transport == "tcp":
        host, port = name[0], name[1]
        return ListenAddress("tcp", host=host, port=port).url
    if address.transport == "unix":
        return address.url
    cid, port = name
    return ListenAddress(
        "vsock",
        cid=-1 if cid == VMADDR_CID_ANY else cid,
        port=-1 if port == VMADDR_PORT_ANY else port,
    ).url


async def open_unix_listener(path: str) -> tuple[trio.SocketListener, int]:
    """Bind ``path``; a stale socket file from a crashed run is replaced, a live one is not.

    Returns the listener and the inode bound, so only our own file is unlinked at exit.
    """
    if _is_socket_file(path):
        probe = trio.socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        with probe:
            try:
                await probe.connect(path)
            except OSError:
                unlink_if_same(path, None)
            else:
                raise OSError(errno.EADDRINUSE, f"{path} is in use by a live listener")
    sock = trio.socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        await sock.bind(path)
        sock.listen(socket.SOMAXCONN)
        inode = _inode(path)
    except BaseException:
        sock.close()
        raise
    return trio.SocketListener(sock), inode


async def open_vsock_listener(address: ListenAddress) -> trio.SocketListener | None:
    """A VSOCK listener, or None (after one warning) when this kernel has no VSOCK."""
    family = getattr(socket, "AF_VSOCK", None)
    if family is None:
        log.warning("stream receiver: skipping %s: this Python has no AF_VSOCK", address.url)
        return None
    try:
        sock = trio.socket.socket(family, socket.SOCK_STREAM)
    except OSError as exc:
        log.warning("stream receiver: skipping %s: VSOCK unavailable (%s)", address.url, exc)
        return None
    cid = VMADDR_CID_ANY if address.cid == -1 else address.cid
    port = VMADDR_PORT_ANY if address.port == -1 else address.port
    try:
        await sock.bind((cid, port))
        sock.listen(socket.SOMAXCONN)
    except OSError as exc:
        sock.close()
        if exc.errno in _VSOCK_UNAVAILABLE_ERRNOS:
            log.warning("stream receiver: skipping %s: VSOCK unavailable (%s)", address.url, exc)
            return None
        raise
    except BaseException:
        sock.close()
        raise
    return trio.SocketListener(sock)


def _is_socket_file(path: str) -> bool:
    try:
        return stat.S_ISSOCK(os.lstat(path).st_mode)
    except OSError:
        return False


def _inode(path: str) -> int:
    return os.lstat(path).st_ino


def unlink_if_same(path: str, inode: int | None) -> None:
    """Remove ``path`` if it still is the socket file we bound (``inode``), or any socket
    file when ``inode`` is None. Another process may have replaced it meanwhile."""
    try:
        st = os.lstat(path)
        if stat.S_ISSOCK(st.st_mode) and (inode is None or st.st_ino == inode):
            os.unlink(path)
    except OSError:
        pass
