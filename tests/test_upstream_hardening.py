"""Hostile and unlucky upstreams (issue 11, findings 2, 3 and 6).

* Finding 2: an answer larger than ``upstream_max_response_bytes`` is a failed attempt with a
  clear reason; the relay never holds it (a 50 MiB answer, measured in a subprocess relay).
* Finding 3: sends to one upstream run concurrently, one slot each, so a hung request costs
  one slot for at most ``send_timeout``, never its batch.
* Finding 6: a 429/503 ``Retry-After`` sets the next attempt, capped by ``retry_cap``, like a
  NACK's ``retry_after``; invalid values fall back to the normal backoff.

Virtual-time tests drive the real :class:`HttpUpstream` through ``httpx.MockTransport`` (no
sockets, so the autojump clock applies); the rest use real sockets and the fake upstream.
"""

from __future__ import annotations

import math
import os
import random
import subprocess
import sys
from collections.abc import AsyncIterator, Callable, Coroutine
from contextlib import asynccontextmanager
from email.utils import formatdate
from pathlib import Path
from typing import Any

import httpx
import orjson
import pytest
import trio
import trio.testing
from fake_upstream import Behaviour, run_fake_upstream
from relay_helpers import make_config, running_server

from relay_trio.core.model import Accepted
from relay_trio.core.umh import MessageState, Phase, RetryPolicy, UnconfirmedMessages
from relay_trio.relay import Relay
from relay_trio.upstreams.base import Outbound, SendResult, SendStatus
from relay_trio.upstreams.factory import open_upstream
from relay_trio.upstreams.http import HttpUpstream, parse_retry_after

MIB = 1024 * 1024
URL = "http://upstream.test/ingest"
#: Wall-clock seconds at virtual time 0 (whole seconds: HTTP-dates have no fractions).
WALL0 = 1_700_000_000.0

Handler = Callable[[httpx.Request], Coroutine[None, None, httpx.Response]]


def http_relay(
    tmp_path: Path, handler: Handler, *, concurrency: int = 64, **overrides: Any
) -> Relay:
    """A relay whose one upstream is a real :class:`HttpUpstream` over an in-memory
    transport, allowing ``concurrency`` requests at a time."""
    config = make_config(tmp_path, upstreams=[URL], rate_per_minute=6000, burst=100, **overrides)

    def factory(url: str, _deadline: float) -> HttpUpstream:
        client = httpx.AsyncClient(transport=httpx.MockTransport(handler))
        return HttpUpstream(url, client, trio.CapacityLimiter(concurrency))

    return Relay(config, rng=random.Random(7), upstream_factory=factory)


@asynccontextmanager
async def started(relay: Relay) -> AsyncIterator[Relay]:
    async with trio.open_nursery() as nursery:
        await nursery.start(relay.run)
        yield relay
        nursery.cancel_scope.cancel()


def admit(relay: Relay, rid: str) -> str:
    accepted = relay.admit({"resource_id": rid, "payload": {"n": 1}})
    assert isinstance(accepted, Accepted), accepted
    return accepted.message_id


def outbound(rid: str = "vm-1") -> Outbound:
    return Outbound(f"{rid}:1", rid, None, {"n": 1}, 1, 0)


# -- finding 6: Retry-After -------------------------------------------------------------


def test_parse_retry_after_reads_seconds_and_http_dates() -> None:
    assert parse_retry_after("120", WALL0) == 120.0
    assert parse_retry_after(" 0 ", WALL0) == 0.0
    assert parse_retry_after(formatdate(WALL0 + 90, usegmt=True), WALL0) == 90.0
    assert parse_retry_after(formatdate(WALL0 + 90), WALL0) == 90.0  # "-0000": GMT
    assert parse_retry_after("Tue, 14 Nov 2023 23:14:50 +0100", WALL0) == 90.0
    assert parse_retry_after("Tue Nov 14 22:14:50 2023", WALL0) == 90.0  # asctime
    assert parse_retry_after(formatdate(WALL0 - 50, usegmt=True), WALL0) == 0.0  # past
    # A 5000-digit number must not hit int()'s digit limit: it is huge, then capped.
    assert parse_retry_after("9" * 5000, WALL0) == math.inf


@pytest.mark.parametrize(
    "value",
    [None, "", "soon", "-5", "1.5", "1e3", "\u0663", "Wed, 99 Foo 2024 00:00:00 GMT"],
)
def test_parse_retry_after_ignores_invalid_values(value: str | None) -> None:
    assert parse_retry_after(value, WALL0) is None


def test_send_failed_retry_after_sets_the_retry_exactly_like_a_nack() -> None:
    umh = UnconfirmedMessages(RetryPolicy(retry_base=1.0, retry_cap=600.0), random.Random(1))
    for i, (retry_after, expected) in enumerate(
        [(120.0, 120.0), (5000.0, 600.0), (math.inf, 600.0), (-3.0, 0.0)], start=1
    ):
        rid = f"vm-{i}"
        umh.admit(f"{rid}:1", rid, 10.0)
        outcome = umh.send_failed(f"{rid}:1", 10.0, "HTTP 503", retry_after)
        assert (outcome.kind, outcome.retry_at) == ("retry", 10.0 + expected)
        view = umh.pending_for(rid)
        assert view is not None and view.phase is Phase.RETRY_WAIT
        assert view.deadline == 10.0 + expected
    # Without one (or NaN): the normal backoff, here at most retry_base.
    no_hint: list[tuple[str, float | None]] = [("vm-a", None), ("vm-b", math.nan)]
    for rid, hint in no_hint:
        umh.admit(f"{rid}:1", rid, 10.0)
        outcome = umh.send_failed(f"{rid}:1", 10.0, "HTTP 503", hint)
        assert outcome.retry_at is not None and 10.0 <= outcome.retry_at <= 11.0


@pytest.mark.parametrize("status", [429, 503])
async def test_http_upstream_reports_retry_after_with_the_failure(
    status: int, autojump_clock: trio.testing.MockClock
) -> None:
    async def handler(_request: httpx.Request) -> httpx.Response:
        await trio.lowlevel.checkpoint()
        return httpx.Response(status, headers={"retry-after": "120"})

    up = HttpUpstream(URL, httpx.AsyncClient(transport=httpx.MockTransport(handler)))
    async with up.client:
        result = await up.send_one(outbound(), 10.0)
    assert result == SendResult(SendStatus.FAILED, f"HTTP {status}, Retry-After 120s", 120.0)


async def test_retry_after_is_only_read_on_429_and_503(
    autojump_clock: trio.testing.MockClock,
) -> None:
    async def handler(_request: httpx.Request) -> httpx.Response:
        await trio.lowlevel.checkpoint()
        return httpx.Response(500, headers={"retry-after": "120"})

    up = HttpUpstream(URL, httpx.AsyncClient(transport=httpx.MockTransport(handler)))
    async with up.client:
        assert await up.send_one(outbound(), 10.0) == SendResult(SendStatus.FAILED, "HTTP 500")


@pytest.mark.parametrize(
    ("status", "header", "delay", "detail"),
    [
        (503, "120", 120.0, "HTTP 503, Retry-After 120s"),
        (429, "120", 120.0, "HTTP 429, Retry-After 120s"),
        (503, "date+90", 90.0, "HTTP 503, Retry-After 90s"),
        (429, "5000", 600.0, "HTTP 429, Retry-After 5000s"),  # capped by retry_cap
    ],
)
async def test_retry_after_sets_the_next_attempt_in_virtual_time(  # noqa: PLR0917
    tmp_path: Path,
    autojump_clock: trio.testing.MockClock,
    status: int,
    header: str,
    delay: float,
    detail: str,
) -> None:
    attempts: list[tuple[float, int]] = []

    async def handler(request: httpx.Request) -> httpx.Response:
        await trio.lowlevel.checkpoint()
        attempts.append((trio.current_time(), orjson.loads(request.content)["attempt"]))
        if len(attempts) > 1:
            return httpx.Response(200, json={"ack": True})
        value = header
        if header == "date+90":
            value = formatdate(WALL0 + trio.current_time() + 90, usegmt=True)
        return httpx.Response(status, headers={"retry-after": value})

    config = make_config(
        tmp_path, upstreams=[URL], retry_base=1, retry_cap=600, rate_per_minute=6000
    )

    def factory(url: str, _deadline: float) -> HttpUpstream:
        up = HttpUpstream(url, httpx.AsyncClient(transport=httpx.MockTransport(handler)))
        if header == "date+90":
            up.wall_clock = lambda: WALL0 + trio.current_time()
        return up

    relay = Relay(config, upstream_factory=factory)
    async with started(relay):
        t0 = trio.current_time()
        assert t0 == int(t0)
        message_id = admit(relay, "vm-1")
        await trio.sleep(delay - 0.5)
        # Not before it says: still waiting, with the reason in the history.
        view = relay.umh.pending_for("vm-1")
        assert view is not None and view.phase is Phase.RETRY_WAIT
        assert view.deadline == t0 + delay
        assert [a.detail for a in view.history] == [detail]
        await trio.sleep(1)
        assert attempts == [(t0, 1), (t0 + delay, 2)]
        assert relay.umh.state_of(message_id) is MessageState.ACKED


async def test_invalid_retry_after_falls_back_to_the_backoff(
    tmp_path: Path, autojump_clock: trio.testing.MockClock
) -> None:
    attempts: list[float] = []

    async def handler(_request: httpx.Request) -> httpx.Response:
        await trio.lowlevel.checkpoint()
        attempts.append(trio.current_time())
        if len(attempts) > 1:
            return httpx.Response(200, json={"ack": True})
        return httpx.Response(503, headers={"retry-after": "in a while"})

    relay = http_relay(tmp_path, handler, retry_base=1, retry_cap=600)
    async with started(relay):
        admit(relay, "vm-1")
        await trio.sleep(5)
        assert len(attempts) == 2 and attempts[1] - attempts[0] <= 1.0


async def test_retry_after_over_real_sockets_delays_the_retry(tmp_path: Path) -> None:
    with trio.fail_after(30):
        behaviour = Behaviour(fail_first=1, fail_status=429, retry_after="2")
        async with run_fake_upstream(behaviour) as up:
            config = make_config(
                tmp_path, upstreams=[up.url], retry_base=0.05, retry_cap=5, send_timeout=2
            )
            async with running_server(config) as (_server, client):
                r = await client.post("/v1/reports", json={"resource_id": "vm-1", "payload": 1})
                assert r.status_code == 202
                await up.wait_received(1)
                await trio.sleep(0.5)
                state = (await client.get("/v1/resources/vm-1")).json()
                history = state["pending"]["history"]
                assert [h["detail"] for h in history] == ["HTTP 429, Retry-After 2s"]
                assert len(up.received) == 1  # the 0.05 s backoff would have retried by now
                await up.wait_received(2)
                gap = up.received[1].at - up.received[0].at
                assert 2.0 <= gap < 4.0, gap
                assert [r.outcome for r in up.received] == ["fail", "ack"]


# -- finding 3: one hung request costs one slot --------------------------------------------


def hang_for(prefix: str, arrivals: dict[str, float]) -> Handler:
    async def handler(request: httpx.Request) -> httpx.Response:
        body = orjson.loads(request.content)
        arrivals.setdefault(body["message_id"], trio.current_time())
        if body["resource_id"].startswith(prefix):
            await trio.sleep_forever()
        await trio.lowlevel.checkpoint()
        return httpx.Response(200, json={"ack": True})

    return handler


async def test_a_hung_request_does_not_hold_its_batch(
    tmp_path: Path, autojump_clock: trio.testing.MockClock
) -> None:
    arrivals: dict[str, float] = {}
    # One sender task: the 53 messages are one batch, the three hung ones at its head.
    relay = http_relay(tmp_path, hang_for("stuck", arrivals), send_timeout=10, sender_tasks=1)
    async with started(relay):
        t0 = trio.current_time()
        stuck = [admit(relay, f"stuck-{i}") for i in range(3)]
        others = [admit(relay, f"vm-{i}") for i in range(50)]
        await trio.sleep(1)
        # All taken in one batch, behind three hung requests: delivered and acked at once.
        assert {arrivals[m] for m in stuck + others} == {t0}
        assert {relay.umh.state_of(m) for m in others} == {MessageState.ACKED}
        for i in range(50):
            state = relay.resources.get(f"vm-{i}")
            assert state is not None and state.last_acked_at == t0
        await trio.sleep(9.5)  # t0 + 10.5: each hung request failed at its own deadline
        for i in range(3):
            view = relay.umh.pending_for(f"stuck-{i}")
            assert view is not None
            assert [(a.at, a.outcome, a.detail) for a in view.history] == [
                (t0 + 10, "send_failed", "send_timeout")
            ]


async def test_each_hung_request_holds_one_slot_for_send_timeout(
    tmp_path: Path, autojump_clock: trio.testing.MockClock
) -> None:
    arrivals: dict[str, float] = {}
    # One sender task takes the messages in admission order, so the hung ones ask first.
    relay = http_relay(
        tmp_path,
        hang_for("stuck", arrivals),
        send_timeout=10,
        concurrency=2,
        sender_tasks=1,
    )
    async with started(relay):
        t0 = trio.current_time()
        stuck = [admit(relay, f"stuck-{i}") for i in range(2)]
        others = [admit(relay, f"vm-{i}") for i in range(5)]
        await trio.sleep(5)
        # Both slots are held by the hung requests: nothing else is on the wire.
        assert set(arrivals) == set(stuck)
        await trio.sleep(6)
        # Their deadline frees the slots at t0 + 10, and the rest go at once.
        assert {arrivals[m] for m in others} == {t0 + 10}
        assert {relay.umh.state_of(m) for m in others} == {MessageState.ACKED}


async def test_hung_upstream_requests_over_real_sockets_hold_nothing_else(
    tmp_path: Path,
) -> None:
    send_timeout = 3.0
    with trio.fail_after(40):
        # More hung resources than sender tasks (8): before, every task ended up stuck.
        hung = [f"stuck-{i}" for i in range(12)]
        behaviour = Behaviour(hang_resources=frozenset(hung))
        async with run_fake_upstream(behaviour) as up:
            config = make_config(
                tmp_path,
                upstreams=[up.url],
                send_timeout=send_timeout,
                rate_per_minute=6000,
                burst=100,
            )
            async with running_server(config) as (server, client):
                rids = hung + [f"vm-{i}" for i in range(40)]
                body = b"".join(
                    orjson.dumps({"resource_id": rid, "payload": {"i": i}}) + b"\n"
                    for i, rid in enumerate(rids)
                )
                admitted_at = trio.current_time()
                r = await client.post("/v1/reports:batch", content=body)
                assert r.status_code == 200
                ids = [orjson.loads(line)["message_id"] for line in r.text.splitlines()]
                umh = server.relay.umh
                others = ids[len(hung) :]
                # Every other message is delivered and acknowledged within one send_timeout
                # of admission (before, each hung request held the rest for send_timeout).
                with trio.move_on_after(send_timeout):
                    # The UMH has no event to wait on: poll it (bounded by the scope).
                    while any(umh.state_of(m) is not MessageState.ACKED for m in others):  # noqa: ASYNC110
                        await trio.sleep(0.01)
                assert trio.current_time() - admitted_at < send_timeout
                received = {r.body["message_id"]: r.at for r in up.received}
                assert all(received[m] - admitted_at < send_timeout for m in others)
                assert {umh.state_of(m) for m in ids[: len(hung)]} == {MessageState.PENDING}


async def test_the_settings_reach_the_http_upstream(tmp_path: Path) -> None:
    config = make_config(
        tmp_path, upstreams=[URL], upstream_concurrency=5, upstream_max_response_bytes=100
    )
    (up,) = Relay(config).upstreams
    assert isinstance(up, HttpUpstream)
    assert (up.limiter.total_tokens, up.max_response_bytes) == (5, 100)
    await up.aclose()


# -- finding 2: a huge answer --------------------------------------------------------------


@pytest.mark.parametrize("declare_length", [True, False], ids=["content-length", "chunked"])
async def test_an_answer_over_the_cap_is_a_failed_attempt(declare_length: bool) -> None:
    with trio.fail_after(20):
        behaviour = Behaviour(answer_bytes=50 * MIB, declare_length=declare_length)
        async with run_fake_upstream(behaviour) as up:
            upstream = open_upstream(up.url, timeout=10)
            try:
                assert isinstance(upstream, HttpUpstream)
                result = await upstream.send_one(outbound(), 10.0)
                assert result == SendResult(SendStatus.FAILED, "response body over 65536 bytes")
                # The relay hung up instead of reading on: the fake never sent it all.
                await up.wait_until(lambda u: u.received[0].outcome == "huge_cut")
                # The client is still usable for the next (sane) answer.
                up.behaviour = Behaviour()
                assert (await upstream.send_one(outbound(), 10.0)).status is SendStatus.ACKED
                # An answer right at the cap is read whole.
                up.behaviour = Behaviour(answer_bytes=65536, declare_length=declare_length)
                result = await upstream.send_one(outbound(), 10.0)
                assert result.status is SendStatus.SENT  # filler is no ACK
                assert up.received[-1].outcome == "huge"
            finally:
                await upstream.aclose()


def _vm_kib(pid: int, field: str) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise AssertionError(f"{field} not in /proc/{pid}/status")


@pytest.mark.skipif(not Path("/proc/self/status").exists(), reason="needs /proc")
async def test_relay_memory_stays_flat_while_an_upstream_answers_50_mib(tmp_path: Path) -> None:
    with trio.fail_after(90):
        async with run_fake_upstream() as up:
            env = {
                **os.environ,
                "RELAY_TRIO_PORT": "0",
                "RELAY_TRIO_UPSTREAMS": up.url,
                "RELAY_TRIO_RATE_PER_MINUTE": "6000",
                "RELAY_TRIO_BURST": "100",
                "RELAY_TRIO_RETRY_BASE": "0.2",
                "RELAY_TRIO_RETRY_CAP": "0.2",
                "RELAY_TRIO_MAX_ATTEMPTS": "1000",
                "RELAY_TRIO_FAILURES_TO_DOWN": "1000",
            }
            proc = await trio.lowlevel.open_process(
                [sys.executable, "-m", "relay_trio", "run"],
                cwd=tmp_path,
                env=env,
                stdout=subprocess.PIPE,
                stderr=subprocess.DEVNULL,
            )
            try:
                assert proc.stdout is not None
                buffer = b""
                while b"\n" not in buffer:
                    buffer += await proc.stdout.receive_some(4096)
                url = buffer.split(b"\n")[0].decode().removeprefix("listening on ")
                async with httpx.AsyncClient(base_url=url, timeout=10) as client:
                    # Warm up every code path with a sane answer, then take the baseline.
                    r = await client.post("/v1/reports", json={"resource_id": "warm", "payload": 1})
                    assert r.status_code == 202
                    await up.wait_received(1)
                    await trio.sleep(0.5)
                    baseline = _vm_kib(proc.pid, "VmHWM")
                    up.behaviour = Behaviour(answer_bytes=50 * MIB, declare_length=False)
                    for i in range(10):
                        r = await client.post(
                            "/v1/reports", json={"resource_id": f"vm-{i}", "payload": i}
                        )
                        assert r.status_code == 202
                    # Ten first attempts and twenty retries; bounded, so that a relay that
                    # downloads every answer fails on its memory, not on the clock.
                    with trio.move_on_after(40):
                        await up.wait_received(1 + 30)
                    peak = _vm_kib(proc.pid, "VmHWM")
                    grown_mib = (peak - baseline) / 1024
                    assert grown_mib < 20, f"peak RSS grew {grown_mib:.1f} MiB"
                    assert len(up.received) >= 1 + 30
                    retried = [
                        r.body["attempt"] for r in up.received if r.body["resource_id"] == "vm-0"
                    ]
                    assert retried[:2] == [1, 2]
                    state = (await client.get("/v1/resources/vm-0")).json()
                    details = {h["detail"] for h in state["pending"]["history"]}
                    assert details == {"response body over 65536 bytes"}
            finally:
                proc.kill()
                await proc.wait()
