"""Stream receiver: NDJSON report streams over TCP, Unix sockets and VSOCK.

Agents that keep a connection open (VM scanners talking VSOCK, local daemons on a Unix
socket) send one report per line and read one reply line per report, in order. Every line
goes through the same :class:`~relay_trio._model.Admitter` as ``POST /v1/reports``, so the
stream door can never bypass the rate limit or validation.

Wire protocol (one connection):

* client → relay: newline-delimited JSON, one report object per line. Blank lines are
  ignored for replies but count as keepalive (they reset the idle deadline).
* relay → client: one JSON line per non-blank line, in order: ``{"message_id": ...}`` or an
  RFC 9457 problem object (``status``, ``type``, ``retry_after`` for 429...).
* With a listener token configured, the first line must be ``{"token": "..."}``, answered
  ``{"ok": true}``; a wrong token gets a 401 line and the connection is closed.
* The relay may send one unsolicited problem line right before it closes the connection:
  503 ``too-many-connections`` / ``shutting-down``, 403 ``peer-not-allowed``,
  408 ``idle-timeout``, 413 ``too-large``.

The pure parts (:func:`parse_listen`, :func:`check_identity`, :func:`check_peer_cid`) import
no Trio; :class:`StreamReceiver` is the Trio service.
"""

from __future__ import annotations

import errno
import hmac
import logging
import math
import os
import re
import socket
import stat
from collections.abc import Mapping, Sequence
from typing import Any, Final, Literal

import attrs
import orjson
import trio

from ._model import Accepted, Admitter, Problem, malformed, reply_for, too_large

__all__ = [
    "Identity",
    "ListenAddress",
    "ReceiverLimits",
    "StreamReceiver",
    "check_identity",
    "check_peer_cid",
    "parse_listen",
]

log = logging.getLogger(__name__)

VMADDR_CID_ANY: Final = getattr(socket, "VMADDR_CID_ANY", 0xFFFFFFFF)
VMADDR_PORT_ANY: Final = getattr(socket, "VMADDR_PORT_ANY", 0xFFFFFFFF)
#: CIDs 0 (hypervisor), 1 (local loopback) and 2 (host) are never a guest VM.
MAX_RESERVED_CID: Final = 2
_U32_MAX: Final = 0xFFFFFFFF
#: ``sun_path`` is 108 bytes on Linux including the terminating NUL.
_MAX_UNIX_PATH: Final = 107
_HOSTNAME_RE: Final = re.compile(r"[A-Za-z0-9._-]+")
_IPV6_RE: Final = re.compile(r"[0-9A-Fa-f:.]+(%[A-Za-z0-9._-]+)?")
#: accept() errors that mean "out of descriptors/memory right now", not "listener broken".
_ACCEPT_CAPACITY_ERRNOS: Final = frozenset(
    {errno.EMFILE, errno.ENFILE, errno.ENOMEM, errno.ENOBUFS}
)
#: bind() errors that mean this kernel/VM has no usable VSOCK transport.
_VSOCK_UNAVAILABLE_ERRNOS: Final = frozenset(
    {errno.EADDRNOTAVAIL, errno.ENODEV, errno.EAFNOSUPPORT, errno.EPROTONOSUPPORT}
)
_OK_LINE: Final = orjson.dumps({"ok": True}) + b"\n"

Transport = Literal["tcp", "unix", "vsock"]


# --------------------------------------------------------------------------- addresses


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
        """The canonical URL; ``parse_listen(a.url) == a``. Keys the ``tokens`` mapping."""
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


# --------------------------------------------------------------------------- identity


@attrs.frozen
class Identity:
    """Who is on the other end of one connection.

    ``listen`` is the canonical URL of the listener it arrived on (keys the token map);
    ``peer`` is for logs only; ``cid`` is set for VSOCK connections and binds resource ids.
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


def _too_many_connections(detail: str) -> Problem:
    return Problem(503, "too-many-connections", "Too many connections", detail)


def _idle_timeout(seconds: float) -> Problem:
    return Problem(
        408, "idle-timeout", "Idle timeout", f"no complete line within {seconds:g} seconds"
    )


def _shutting_down() -> Problem:
    return Problem(503, "shutting-down", "Shutting down", "the relay is draining connections")


def _unauthorized() -> Problem:
    return Problem(
        401,
        "unauthorized",
        "Unauthorized",
        'the first line must be {"token": "..."} with this listener\'s token',
    )


# --------------------------------------------------------------------------- limits


def _positive(_inst: object, attribute: attrs.Attribute[Any], value: float) -> None:
    if not (value > 0 and math.isfinite(value)):
        raise ValueError(f"{attribute.name} must be a positive finite number, got {value!r}")


@attrs.frozen
class ReceiverLimits:
    """Bounds for the stream receiver. Every field is a hard cap.

    ``max_waiting`` bounds how many connections may wait for a slot at once (more are
    refused immediately), so a connection flood cannot pile up tasks for ``slot_wait``.
    Writes use ``idle_timeout`` as their deadline.
    """

    max_connections: int = attrs.field(default=50, validator=_positive)
    slot_wait: float = attrs.field(default=5.0, validator=_positive)
    idle_timeout: float = attrs.field(default=10.0, validator=_positive)
    max_frame: int = attrs.field(default=16 * 1024 * 1024, validator=_positive)
    read_chunk: int = attrs.field(default=64 * 1024, validator=_positive)
    max_waiting: int = attrs.field(default=50, validator=_positive)


# --------------------------------------------------------------------------- service


@attrs.define(eq=False)
class StreamReceiver:
    """Accepts NDJSON report streams and feeds each line to ``admitter``.

    Start with ``bound = await nursery.start(receiver.run)``; stop with
    :meth:`stop_accepting` then ``await`` :meth:`drain`.
    """

    addresses: Sequence[ListenAddress]
    admitter: Admitter
    limits: ReceiverLimits = attrs.field(factory=ReceiverLimits)
    tokens: Mapping[str, str] | None = None

    #: The real bound addresses (e.g. ``tcp://127.0.0.1:41234``), set before ``started``.
    bound: list[str] = attrs.field(init=False, factory=list)
    connections_open: int = attrs.field(init=False, default=0)
    connections_refused: int = attrs.field(init=False, default=0)
    lines_ok: int = attrs.field(init=False, default=0)
    lines_rejected: int = attrs.field(init=False, default=0)
    idle_timeouts: int = attrs.field(init=False, default=0)
    frames_too_large: int = attrs.field(init=False, default=0)
    auth_failures: int = attrs.field(init=False, default=0)
    #: Largest per-connection read buffer seen; never exceeds max_frame + read_chunk.
    buffer_high_water: int = attrs.field(init=False, default=0)

    _tokens: dict[str, bytes] = attrs.field(init=False, factory=dict)
    _slots: trio.CapacityLimiter = attrs.field(init=False)
    _listeners: list[trio.SocketListener] = attrs.field(init=False, factory=list)
    _stopping: bool = attrs.field(init=False, default=False)
    # Both sets hold at most one scope per live connection (bounded by the slot limiter
    # plus max_waiting), so caller input cannot grow them.
    _conn_scopes: set[trio.CancelScope] = attrs.field(init=False, factory=set)
    _idle_reads: set[trio.CancelScope] = attrs.field(init=False, factory=set)
    _all_done: trio.Event = attrs.field(init=False, factory=trio.Event)

    def __attrs_post_init__(self) -> None:
        self._slots = trio.CapacityLimiter(self.limits.max_connections)
        self._all_done.set()
        urls = {a.url for a in self.addresses}
        for key, token in (self.tokens or {}).items():
            url = parse_listen(key).url
            if url not in urls:
                # A typo here would silently leave a listener open to anyone.
                raise ValueError(f"token configured for {key!r}, which is not a listen address")
            if not token:
                raise ValueError(f"empty token configured for {key!r}")
            self._tokens[url] = token.encode()

    def counters(self) -> dict[str, int]:
        """A snapshot of the counters (for /v1/status and /metrics). Never blocks."""
        return {
            "connections_open": self.connections_open,
            "connections_refused": self.connections_refused,
            "lines_ok": self.lines_ok,
            "lines_rejected": self.lines_rejected,
            "idle_timeouts": self.idle_timeouts,
            "frames_too_large": self.frames_too_large,
            "auth_failures": self.auth_failures,
            "buffer_high_water": self.buffer_high_water,
        }

    # ------------------------------------------------------------------ lifecycle

    async def run(
        self, *, task_status: trio.TaskStatus[list[str]] = trio.TASK_STATUS_IGNORED
    ) -> None:
        """Open every listener, report ``started(bound)``, serve until stopped.

        Raises OSError if a tcp/unix address cannot be bound (nothing is left open). A
        VSOCK address the kernel does not support is skipped with one warning. Returns
        once :meth:`stop_accepting` was called and every connection has ended.
        """
        unix_paths: list[tuple[str, int]] = []
        opened: list[tuple[trio.SocketListener, ListenAddress]] = []
        try:
            for address in self.addresses:
                for listener in await self._open(address, unix_paths):
                    opened.append((listener, address))
                    self._listeners.append(listener)
            self.bound = [_describe_bound(listener, a) for listener, a in opened]
            for url in self.bound:
                log.info("stream receiver listening on %s", url)
            async with trio.open_nursery() as nursery:
                for listener, address in opened:
                    nursery.start_soon(self._accept_loop, listener, address, nursery)
                if self._stopping:
                    self._close_listeners()
                task_status.started(list(self.bound))
        finally:
            self._close_listeners()
            for path, inode in unix_paths:
                _unlink_if_same(path, inode)

    def stop_accepting(self) -> None:
        """Close every listener and end idle connections. Never blocks; idempotent.

        A connection in the middle of a line may finish that line and gets its replies;
        a connection waiting for its next line is sent a 503 ``shutting-down`` line and
        closed.
        """
        self._stopping = True
        self._close_listeners()
        for scope in list(self._idle_reads):
            scope.cancel()

    # The timeout is a grace period before cancelling connections (like hypercorn's
    # graceful_timeout), not a deadline for this call, so a cancel scope cannot replace it.
    async def drain(self, timeout: float) -> None:  # noqa: ASYNC109
        """Stop accepting, wait up to ``timeout`` seconds for connections to end, then
        cancel the rest and wait for them to close. Always a checkpoint.
        """
        self.stop_accepting()
        with trio.move_on_after(timeout):
            await self._all_done.wait()
        for scope in list(self._conn_scopes):
            scope.cancel()
        await self._all_done.wait()

    def _close_listeners(self) -> None:
        # trio's socket close() is synchronous and wakes a task blocked in accept()
        # with ClosedResourceError, which ends its accept loop.
        for listener in self._listeners:
            listener.socket.close()

    async def _open(
        self, address: ListenAddress, unix_paths: list[tuple[str, int]]
    ) -> list[trio.SocketListener]:
        if address.transport == "tcp":
            return await trio.open_tcp_listeners(address.port, host=address.host)
        if address.transport == "unix":
            listener, inode = await _open_unix_listener(address.path)
            unix_paths.append((address.path, inode))
            return [listener]
        vsock = await _open_vsock_listener(address)
        return [] if vsock is None else [vsock]

    async def _accept_loop(
        self, listener: trio.SocketListener, address: ListenAddress, nursery: trio.Nursery
    ) -> None:
        listen_url = address.url
        while True:
            try:
                stream = await listener.accept()
            except trio.ClosedResourceError:
                return
            except OSError as exc:
                if exc.errno not in _ACCEPT_CAPACITY_ERRNOS:
                    raise
                # Out of descriptors: back off instead of spinning; existing
                # connections keep working and will free descriptors.
                log.warning("stream receiver accept on %s: %s; pausing 100 ms", listen_url, exc)
                await trio.sleep(0.1)
                continue
            nursery.start_soon(self._connection_task, stream, _identity_of(stream, address))

    async def _connection_task(self, stream: trio.SocketStream, identity: Identity) -> None:
        try:
            await self.handle_stream(stream, identity)
        except Exception:
            # One broken connection (or a bug in the admitter) must not take down the
            # listener and every other agent's connection with it.
            log.exception("stream receiver: connection from %s failed", identity.peer)

    # ------------------------------------------------------------------ one connection

    async def handle_stream(self, stream: trio.abc.Stream, identity: Identity) -> None:
        """Serve one connection until EOF, idle timeout, an oversized frame, a failed
        token, shutdown or cancellation by :meth:`drain`.

        Always closes ``stream``. A peer that vanishes (BrokenResourceError) ends the
        connection quietly. Waits at most ``slot_wait`` for a connection slot; every write
        has a deadline of ``idle_timeout``. Always a checkpoint.
        """
        scope = trio.CancelScope()
        self._conn_scopes.add(scope)
        if len(self._conn_scopes) == 1:
            self._all_done = trio.Event()
        try:
            with scope:
                await self._admit_connection(stream, identity)
        except trio.BrokenResourceError:
            pass
        finally:
            self._conn_scopes.discard(scope)
            if not self._conn_scopes:
                self._all_done.set()
            await trio.aclose_forcefully(stream)

    async def _admit_connection(self, stream: trio.abc.Stream, identity: Identity) -> None:
        lim = self.limits
        if identity.cid is not None and (problem := check_peer_cid(identity.cid)):
            await self._refuse(stream, identity, problem)
            return
        if self._slots.statistics().tasks_waiting >= lim.max_waiting:
            detail = (
                f"{lim.max_connections} connections open and "
                f"{lim.max_waiting} already waiting for a slot"
            )
            await self._refuse(stream, identity, _too_many_connections(detail))
            return
        acquired = False
        with trio.move_on_after(lim.slot_wait):
            await self._slots.acquire()
            acquired = True
        if not acquired:
            detail = f"all {lim.max_connections} connection slots busy for {lim.slot_wait:g}s"
            await self._refuse(stream, identity, _too_many_connections(detail))
            return
        self.connections_open += 1
        try:
            await self._serve_lines(stream, identity)
        finally:
            self.connections_open -= 1
            self._slots.release()

    async def _refuse(self, stream: trio.abc.Stream, identity: Identity, problem: Problem) -> None:
        self.connections_refused += 1
        log.debug("stream receiver refused %s: %s", identity.peer, problem.slug)
        await self._send(stream, _problem_line(problem))

    async def _send(self, stream: trio.abc.Stream, data: bytes) -> bool:
        """Write with a deadline: a client that stops reading cannot hold the task."""
        if not data:
            return True
        with trio.move_on_after(self.limits.idle_timeout):
            await stream.send_all(data)
            return True
        log.debug("stream receiver: write deadline passed, closing")
        return False

    async def _serve_lines(self, stream: trio.abc.Stream, identity: Identity) -> None:
        lim = self.limits
        conn = _LineState(identity=identity, token=self._tokens.get(identity.listen))
        buf = bytearray()
        deadline = trio.current_time() + lim.idle_timeout
        while True:
            if self._stopping and not buf:
                await self._send(stream, _problem_line(_shutting_down()))
                return
            with trio.CancelScope(deadline=deadline) as read_scope:
                # Only a connection between lines may be woken by stop_accepting();
                # one mid-line is allowed to finish that line.
                if not buf:
                    self._idle_reads.add(read_scope)
                try:
                    chunk = await stream.receive_some(lim.read_chunk)
                finally:
                    self._idle_reads.discard(read_scope)
            if read_scope.cancelled_caught:
                if self._stopping and not buf:
                    continue
                self.idle_timeouts += 1
                await self._send(stream, _problem_line(_idle_timeout(lim.idle_timeout)))
                return
            if not chunk:
                # EOF: a last line without its newline is still a line.
                ok_before = self.lines_ok
                out, _ = self._answer([bytes(buf)], conn)
                if self.lines_ok != ok_before:
                    await self.admitter.durable()
                await self._send(stream, out)
                return
            start = len(buf)
            buf += chunk
            self.buffer_high_water = max(self.buffer_high_water, len(buf))
            newline = buf.rfind(b"\n", start)
            if newline < 0:
                if len(buf) > lim.max_frame:
                    out, _ = self._answer([buf], conn)
                    await self._send(stream, out)
                    return
                continue
            lines = buf[:newline].split(b"\n")
            del buf[: newline + 1]
            if len(buf) > lim.max_frame:
                lines.append(buf)  # the unfinished tail is already too long: answer 413
            deadline = trio.current_time() + lim.idle_timeout
            ok_before = self.lines_ok
            out, close = self._answer(lines, conn)
            if self.lines_ok != ok_before:
                # No reply says "accepted" before the store has the report.
                await self.admitter.durable()
            if not await self._send(stream, out) or close:
                return

    def _answer(self, lines: Sequence[bytes | bytearray], conn: _LineState) -> tuple[bytes, bool]:
        """Reply lines for ``lines`` (joined for one write), and whether to close after.

        Synchronous on purpose: admission never awaits, and one write per batch keeps the
        per-line cost down to a JSON parse, an admit() and a dumps().
        """
        max_frame = self.limits.max_frame
        identity = conn.identity
        admit = self.admitter.admit
        replies: list[bytes] = []
        for line in lines:
            if len(line) > max_frame:
                self.frames_too_large += 1
                self.lines_rejected += 1
                replies.append(_problem_line(too_large(max_frame)))
                return b"".join(replies), True
            if not line or line.isspace():
                continue
            if conn.token is not None and not conn.authed:
                if not _token_matches(line, conn.token):
                    self.auth_failures += 1
                    self.lines_rejected += 1
                    replies.append(_problem_line(_unauthorized()))
                    return b"".join(replies), True
                conn.authed = True
                replies.append(_OK_LINE)
                continue
            result: Accepted | Problem
            try:
                obj = orjson.loads(line)
            except orjson.JSONDecodeError as exc:
                result = malformed(str(exc))
            else:
                result = _identity_problem(obj, identity.cid) or admit(obj)
            if isinstance(result, Accepted):
                self.lines_ok += 1
            else:
                self.lines_rejected += 1
            replies.append(orjson.dumps(reply_for(result)) + b"\n")
        return b"".join(replies), False


@attrs.define(eq=False)
class _LineState:
    identity: Identity
    token: bytes | None
    authed: bool = False


def _identity_problem(obj: object, cid: int | None) -> Problem | None:
    # Objects without a string resource_id are left to admit(), which answers 422.
    if cid is None or not isinstance(obj, dict):
        return None
    rid = obj.get("resource_id")
    if not isinstance(rid, str):
        return None
    return check_identity(rid, cid)


def _token_matches(line: bytes | bytearray, expected: bytes) -> bool:
    try:
        obj = orjson.loads(line)
    except orjson.JSONDecodeError:
        return False
    got = obj.get("token") if isinstance(obj, dict) else None
    if not isinstance(got, str):
        return False
    return hmac.compare_digest(got.encode(), expected)


def _problem_line(problem: Problem) -> bytes:
    return orjson.dumps(problem.to_dict()) + b"\n"


# --------------------------------------------------------------------------- sockets


def _identity_of(stream: trio.SocketStream, address: ListenAddress) -> Identity:
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


def _describe_bound(listener: trio.SocketListener, address: ListenAddress) -> str:
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


async def _open_unix_listener(path: str) -> tuple[trio.SocketListener, int]:
    """Bind ``path``; a stale socket file from a crashed run is replaced, a live one is not.

    Returns the listener and the inode bound, so only our own file is unlinked at exit.
    """
    if _is_socket_file(path):
        probe = trio.socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        with probe:
            try:
                await probe.connect(path)
            except OSError:
                _unlink_if_same(path, None)
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


async def _open_vsock_listener(address: ListenAddress) -> trio.SocketListener | None:
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


def _unlink_if_same(path: str, inode: int | None) -> None:
    """Remove ``path`` if it still is the socket file we bound (``inode``), or any socket
    file when ``inode`` is None. Another process may have replaced it meanwhile."""
    try:
        st = os.lstat(path)
        if stat.S_ISSOCK(st.st_mode) and (inode is None or st.st_ino == inode):
            os.unlink(path)
    except OSError:
        pass
