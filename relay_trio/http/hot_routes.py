"""The hot routes without a web framework: the two ingest routes (``POST /v1/reports``,
``POST /v1/reports:batch``) and ``POST /v1/acks``, each answered, given its body, as a
:class:`Reply`. Every report and every asynchronous ACK comes through one of them.

The Quart routes in :mod:`relay_trio.http.app` and the ASGI fast lane in
:mod:`relay_trio.http.fast_lane` both answer through :class:`HotRoutes`, so the two ways
in cannot drift apart: every admission, ACK, refusal count and problem is decided here once.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, Final, NamedTuple

import orjson

from ..core.limiter import retry_after_header
from ..core.line_protocol import reply_line
from ..core.model import Accepted, Problem, empty_batch, too_large, validate_ack
from ..stores.base import StoreError
from .params import decode_json, store_unavailable, with_contract_headers

if TYPE_CHECKING:  # the composition root sits above the front doors
    from ..relay import Relay

PROBLEM_JSON: Final = "application/problem+json"
JSON: Final = "application/json"
NDJSON: Final = "application/x-ndjson"


class Reply(NamedTuple):
    """One HTTP answer, framework-free: status, body, its media type and extra headers."""

    status: int
    body: bytes
    content_type: str
    headers: tuple[tuple[str, str], ...] = ()


def problem_reply(problem: Problem, headers: tuple[tuple[str, str], ...] = ()) -> Reply:
    """A problem+json answer; 429/503 carry ``Retry-After``."""
    if problem.retry_after is not None:
        headers = (("Retry-After", retry_after_header(problem.retry_after)), *headers)
    return Reply(problem.status, orjson.dumps(problem.to_dict()), PROBLEM_JSON, headers)


_REPLAYED: Final = (("Idempotent-Replayed", "true"),)


class HotRoutes:
    """What the hot routes answer, once the bearer token and the body size checked out.

    Never raises for bad input (a problem reply instead). A 2xx (or a batch line saying
    ``message_id``) is only returned after the store committed the report.
    """

    def __init__(self, relay: Relay) -> None:
        self.relay = relay
        self.config = relay.config
        #: Counts a report refused before admission as received and rejected.
        self.count_refused = relay.metrics.count_refused

    async def report(self, body: bytes, header: Callable[[str], str | None]) -> Reply:
        """``POST /v1/reports`` with this body; ``header(name)`` reads a request header
        (the delivery contract's ``Idempotency-Key``/``traceparent``/``tracestate``)."""
        relay = self.relay
        obj = decode_json(body)
        if isinstance(obj, Problem):
            self.count_refused("malformed")
            return problem_reply(obj)
        if isinstance(obj, dict):
            contract = with_contract_headers(obj, header)
            if isinstance(contract, Problem):
                self.count_refused("invalid")
                return problem_reply(contract)
            obj = contract
        if relay.cluster is not None:
            # Cluster mode: admission is a JetStream round trip; Accepted means stored.
            result = (await relay.admit_cluster([obj]))[0]
        else:
            result = relay.admit(obj)
            if isinstance(result, Accepted):
                # A 2xx promises durability: answer only once the store has the report.
                try:
                    await relay.durable()
                except StoreError as exc:
                    return problem_reply(store_unavailable(exc))
        if isinstance(result, Accepted):
            return Reply(
                202,
                b'{"message_id":%s}' % orjson.dumps(result.message_id),
                JSON,
                _REPLAYED if result.replayed else (),
            )
        return problem_reply(result)

    async def batch(self, body: bytes) -> Reply:
        """``POST /v1/reports:batch`` with this NDJSON body: one reply line per report line."""
        relay = self.relay
        config = self.config
        # Blank lines get no result, but keep their number: each result names its input line.
        lines = [(n, line) for n, line in enumerate(body.split(b"\n"), 1) if line.strip()]
        if not lines:
            return problem_reply(empty_batch())
        if len(lines) > config.batch_max_lines:
            return problem_reply(
                Problem(
                    413,
                    "too-many-lines",
                    "Too many reports",
                    f"at most {config.batch_max_lines} lines",
                )
            )
        results: list[tuple[int, Accepted | Problem]] = []
        clustered: list[tuple[int, object]] = []
        with relay.batch():  # one store change set for the whole request
            self._admit_lines(lines, results, clustered)
        if clustered:
            # Cluster mode: one bridged call admits and stores every line (in order).
            answers = await relay.admit_cluster([obj for _, obj in clustered])
            for (at, _), answer in zip(clustered, answers, strict=True):
                results[at] = (results[at][0], answer)
        elif any(isinstance(r, Accepted) for _, r in results):
            # One commit for the whole batch; no line says "accepted" before it is stored.
            try:
                await relay.durable()
            except StoreError as exc:
                return problem_reply(store_unavailable(exc))
        out = [reply_line(result, number) for number, result in results]
        return Reply(200, b"".join(out), NDJSON)

    async def ack(self, body: bytes) -> Reply:
        """``POST /v1/acks`` with this body. A 200 means the ACK is stored: a crash after it
        never redelivers the message."""
        obj = decode_json(body)
        if isinstance(obj, Problem):
            return problem_reply(obj)
        ack = validate_ack(obj)
        if isinstance(ack, Problem):
            return problem_reply(ack)
        try:
            outcome = await self.relay.acknowledge_any(
                ack.message_id, ack.status, ack.reason, ack.retry_after
            )
        except StoreError as exc:
            return problem_reply(store_unavailable(exc))
        return Reply(200, orjson.dumps({"message_id": ack.message_id, "outcome": outcome}), JSON)

    def _admit_lines(
        self,
        lines: list[tuple[int, bytes]],
        results: list[tuple[int, Accepted | Problem]],
        clustered: list[tuple[int, object]],
    ) -> None:
        """Decode and admit each batch line in order into ``results``; in cluster mode the
        decoded reports go to ``clustered`` (their results are decided in one call)."""
        relay = self.relay
        limit = self.config.max_body_bytes
        for number, line in lines:
            if len(line) > limit:
                result: Accepted | Problem = too_large(limit)
                self.count_refused("too_large")
            else:
                obj = decode_json(line)
                if isinstance(obj, Problem):
                    self.count_refused("malformed")
                if relay.cluster is not None and not isinstance(obj, Problem):
                    clustered.append((len(results), obj))
                    result = Problem(503, "cluster-pending", "Not decided yet")
                else:
                    result = obj if isinstance(obj, Problem) else relay.admit(obj)
            results.append((number, result))
