"""What an upstream sees (issue 16, docs/upstream.md): signed deliveries with a stable
``webhook-id`` across attempts and redrive, W3C trace context on every attempt, spans.

Real sockets: a relay on 127.0.0.1:0 and a recording upstream (hypercorn) that checks each
signature with its own standard-library HMAC, written from the documented recipe.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import re
from collections.abc import AsyncIterator, Callable, Mapping
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import attrs
import orjson
import pytest
import trio
from fake_upstream import serve_on_free_port
from relay_helpers import make_config, running_server

from relay_trio.core.config import ConfigError, load_config
from relay_trio.relay import Relay

SECRET_A = "whsec_" + base64.b64encode(b"A" * 32).decode()
SECRET_B = "whsec_" + base64.b64encode(b"b-secret-0123456789abcdef").decode()
SECRET_WRONG = "whsec_" + base64.b64encode(b"W" * 32).decode()
DOCS = Path(__file__).resolve().parent.parent / "docs" / "upstream.md"
TRACEPARENT = re.compile(r"^00-([0-9a-f]{32})-([0-9a-f]{16})-([0-9a-f]{2})$")


def independent_verify(secret: str, headers: Mapping[str, str], body: bytes) -> bool:
    """The documented recipe, written again here: HMAC-SHA256 over "id.timestamp.body"."""
    key = base64.b64decode(secret[len("whsec_") :])
    content = f"{headers['webhook-id']}.{headers['webhook-timestamp']}.".encode() + body
    want = base64.b64encode(hmac.new(key, content, hashlib.sha256).digest()).decode()
    given = [s.split(",", 1) for s in headers.get("webhook-signature", "").split(" ") if s]
    return any(v == "v1" and hmac.compare_digest(sig, want) for v, sig in given)


@attrs.frozen
class Delivery:
    headers: dict[str, str]
    body: bytes
    verified: bool

    @property
    def json(self) -> Any:
        return orjson.loads(self.body)


@attrs.define(eq=False)
class VerifyingUpstream:
    """Checks each POST's signature with ``secret``: 401 when it does not verify, else the
    status ``answers`` gives for that attempt (index = number of POSTs before it)."""

    secret: str | None
    answers: Callable[[int], int] = lambda _n: 200
    deliveries: list[Delivery] = attrs.field(factory=list)
    url: str = ""
    changed: trio.Event = attrs.field(factory=trio.Event)

    async def app(self, scope: Any, receive: Any, send: Any) -> None:
        if scope["type"] == "lifespan":
            while True:
                message = await receive()
                if message["type"] == "lifespan.startup":
                    await send({"type": "lifespan.startup.complete"})
                else:
                    await send({"type": "lifespan.shutdown.complete"})
                    return
        body = b""
        while True:
            message = await receive()
            body += message.get("body", b"")
            if not message.get("more_body"):
                break
        if scope["method"] != "POST":
            await _answer(send, 200, {})
            return
        headers = {k.decode().lower(): v.decode() for k, v in scope["headers"]}
        ok = self.secret is None or independent_verify(self.secret, headers, body)
        status = self.answers(len(self.deliveries)) if ok else 401
        self.deliveries.append(Delivery(headers, body, ok))
        self.changed.set()
        self.changed = trio.Event()
        await _answer(send, status, {"ack": True} if status == 200 else {"error": status})

    async def wait_deliveries(self, count: int) -> None:
        with trio.fail_after(10):
            while len(self.deliveries) < count:
                await self.changed.wait()


async def _answer(send: Any, status: int, body: Any) -> None:
    data = orjson.dumps(body)
    await send(
        {
            "type": "http.response.start",
            "status": status,
            "headers": [(b"content-type", b"application/json")],
        }
    )
    await send({"type": "http.response.body", "body": data})


@asynccontextmanager
async def upstream(
    secret: str | None, answers: Callable[[int], int] = lambda _n: 200
) -> AsyncIterator[VerifyingUpstream]:
    up = VerifyingUpstream(secret, answers)
    async with trio.open_nursery() as nursery:
        base, shutdown = await serve_on_free_port(up.app, nursery, graceful_timeout=0.2)
        up.url = base + "/hook"
        yield up
        shutdown.set()


def fast_retries(tmp_path: Path, up: VerifyingUpstream, **overrides: Any) -> Any:
    return make_config(
        tmp_path,
        store="memory",
        upstreams=[up.url],
        rate_per_minute=600.0,
        retry_base=0.02,
        retry_cap=0.02,
        failures_to_down=100,
        **overrides,
    )


async def test_signed_first_attempt_retry_and_redrive_verify_with_one_webhook_id(
    tmp_path: Path,
) -> None:
    # Attempts 1 and 2 answer 503 (max_attempts 2: dead letter), the redrive gets 200.
    async with upstream(SECRET_A, lambda n: 503 if n < 2 else 200) as up:
        config = fast_retries(tmp_path, up, upstream_signing_secrets=[SECRET_A], max_attempts=2)
        async with running_server(config) as (_server, client):
            r = await client.post("/v1/reports", json={"resource_id": "vm-1", "payload": {"a": 1}})
            mid = r.json()["message_id"]
            await up.wait_deliveries(2)
            with trio.fail_after(10):
                while not (await client.get("/v1/deadletters")).json()["dead_letters"]:  # noqa: ASYNC110
                    await trio.sleep(0.02)
            redrive = await client.post("/v1/deadletters:redrive", json={"message_ids": [mid]})
            assert redrive.json()["redriven"] == 1
            await up.wait_deliveries(3)
    assert [d.verified for d in up.deliveries] == [True, True, True]
    assert {d.headers["webhook-id"] for d in up.deliveries} == {mid}
    assert [d.json["attempt"] for d in up.deliveries] == [1, 2, 1]
    # Exactly the bytes sent were signed, and one signature per secret.
    assert all(d.headers["webhook-signature"].count("v1,") == 1 for d in up.deliveries)
    # The documented example (the block in docs/upstream.md) accepts them too.
    verify = documented_verify()
    assert all(verify(SECRET_A, d.headers, d.body) for d in up.deliveries)
    assert not verify(SECRET_A, up.deliveries[0].headers, up.deliveries[0].body + b" ")
    assert not verify(SECRET_WRONG, up.deliveries[0].headers, up.deliveries[0].body)


async def test_rotation_two_secrets_either_verifies(tmp_path: Path) -> None:
    async with upstream(SECRET_B) as up:
        config = fast_retries(tmp_path, up, upstream_signing_secrets=[f"{SECRET_A} {SECRET_B}"])
        async with running_server(config) as (_server, client):
            await client.post("/v1/reports", json={"resource_id": "vm-1", "payload": 1})
            await up.wait_deliveries(1)
    (d,) = up.deliveries
    assert d.verified
    assert d.headers["webhook-signature"].count("v1,") == 2
    assert independent_verify(SECRET_A, d.headers, d.body)
    assert documented_verify()(SECRET_B, d.headers, d.body)


async def test_wrong_secret_fails_verification_and_the_attempt(tmp_path: Path) -> None:
    async with upstream(SECRET_WRONG) as up:
        config = fast_retries(tmp_path, up, upstream_signing_secrets=[SECRET_A], max_attempts=1)
        async with running_server(config) as (_server, client):
            await client.post("/v1/reports", json={"resource_id": "vm-1", "payload": 1})
            await up.wait_deliveries(1)
            with trio.fail_after(10):
                while not (await client.get("/v1/deadletters")).json()["dead_letters"]:  # noqa: ASYNC110
                    await trio.sleep(0.02)
    assert [d.verified for d in up.deliveries] == [False]
    assert "webhook-signature" in up.deliveries[0].headers


async def test_unsigned_upstream_still_gets_webhook_id_and_timestamp(tmp_path: Path) -> None:
    async with upstream(None) as up:
        config = fast_retries(tmp_path, up)
        async with running_server(config) as (_server, client):
            r = await client.post("/v1/reports", json={"resource_id": "vm-1", "payload": 1})
            await up.wait_deliveries(1)
    (d,) = up.deliveries
    assert d.headers["webhook-id"] == r.json()["message_id"]
    assert d.headers["webhook-timestamp"].isdigit()
    assert "webhook-signature" not in d.headers


async def test_traceparent_arrives_on_every_attempt_with_the_same_trace_id(
    tmp_path: Path,
) -> None:
    incoming = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01"
    async with upstream(None, lambda n: 503 if n < 2 else 200) as up:
        config = fast_retries(tmp_path, up)
        async with running_server(config) as (_server, client):
            await client.post(
                "/v1/reports",
                json={"resource_id": "vm-1", "payload": 1},
                headers={"traceparent": incoming, "tracestate": "vendor=abc"},
            )
            await up.wait_deliveries(3)
            # Without a traceparent (and on a batch line with a bad one): a new trace.
            lines = b"\n".join(
                [
                    orjson.dumps({"resource_id": "vm-2", "payload": 1}),
                    orjson.dumps({"resource_id": "vm-3", "payload": 1, "traceparent": "junk"}),
                ]
            )
            await client.post("/v1/reports:batch", content=lines)
            await up.wait_deliveries(5)
    first = [d for d in up.deliveries if d.json["resource_id"] == "vm-1"]
    parsed = [TRACEPARENT.match(d.headers["traceparent"]) for d in first]
    assert all(m is not None for m in parsed)
    assert {m.group(1) for m in parsed if m} == {"4bf92f3577b34da6a3ce929d0e0e4736"}
    spans = [m.group(2) for m in parsed if m]
    assert len(set(spans)) == 3 and "00f067aa0ba902b7" not in spans  # one span per attempt
    assert all(d.headers["tracestate"] == "vendor=abc" for d in first)
    others = [d for d in up.deliveries if d.json["resource_id"] != "vm-1"]
    trace_ids = {TRACEPARENT.match(d.headers["traceparent"]).group(1) for d in others}  # type: ignore[union-attr]
    assert len(trace_ids) == 2 and "4bf92f3577b34da6a3ce929d0e0e4736" not in trace_ids
    assert all("tracestate" not in d.headers for d in others)


async def test_spans_for_admission_and_each_attempt(tmp_path: Path) -> None:
    from opentelemetry.sdk.trace.export import SimpleSpanProcessor
    from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

    from relay_trio.tracing import open_tracing

    exporter = InMemorySpanExporter()
    incoming = "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01"
    async with upstream(None, lambda n: 503 if n < 1 else 200) as up:
        config = fast_retries(tmp_path, up)
        relay = Relay(config, tracing=open_tracing(None, processor=SimpleSpanProcessor(exporter)))
        async with running_server(config, relay) as (_server, client):
            await client.post(
                "/v1/reports",
                json={"resource_id": "vm-1", "payload": 1},
                headers={"traceparent": incoming},
            )
            await up.wait_deliveries(2)
            with trio.fail_after(5):
                while len(exporter.get_finished_spans()) < 3:  # noqa: ASYNC110
                    await trio.sleep(0.01)
    spans = exporter.get_finished_spans()
    admit = [s for s in spans if s.name == "relay.admit"]
    attempts = [s for s in spans if s.name == "relay.deliver"]
    assert len(admit) == 1 and len(attempts) == 2
    trace_id = int("0af7651916cd43dd8448eb211c80319c", 16)
    assert all(s.context.trace_id == trace_id for s in spans)
    assert admit[0].parent is not None and admit[0].parent.span_id == int("b7ad6b7169203331", 16)
    assert all(
        s.parent is not None and s.parent.span_id == admit[0].context.span_id for s in attempts
    )
    sent = [TRACEPARENT.match(d.headers["traceparent"]).group(2) for d in up.deliveries]  # type: ignore[union-attr]
    assert sent == [f"{s.context.span_id:016x}" for s in attempts]
    assert [(s.attributes or {})["relay.outcome"] for s in attempts] == ["failed", "acked"]


def documented_verify() -> Callable[[str, Mapping[str, str], bytes], bool]:
    """The ``verify_webhook`` function of docs/upstream.md, from its python code block."""
    text = DOCS.read_text()
    blocks = re.findall(r"```python\n(.*?)```", text, re.S)
    (code,) = [b for b in blocks if "def verify_webhook" in b]
    namespace: dict[str, Any] = {}
    exec(compile(code, str(DOCS), "exec"), namespace)
    verify: Callable[[str, Mapping[str, str], bytes], bool] = namespace["verify_webhook"]
    return verify


def test_signing_secrets_are_validated_hidden_and_read_from_files(tmp_path: Path) -> None:
    ups = ["http://a.example/x", "http://b.example/y"]
    with pytest.raises(ConfigError, match="upstream_signing_secrets: entry 1: secret 1 must"):
        load_config({"upstreams": ups, "upstream_signing_secrets": ["nope"]})
    with pytest.raises(ConfigError, match="not valid base64"):
        load_config({"upstreams": ups, "upstream_signing_secrets": ["whsec_***"]})
    with pytest.raises(ConfigError, match="3 entries for 2 upstream"):
        load_config({"upstreams": ups, "upstream_signing_secrets": ["-", "-", "-"]})
    secret_file = tmp_path / "secret"
    secret_file.write_text(SECRET_B + "\n")
    config = load_config(
        {"upstreams": ups, "upstream_signing_secrets": ["-", f"@{secret_file}"]},
        {},
    )
    assert config.signing_keys() == {ups[1]: (base64.b64decode(SECRET_B[6:]),)}
    assert config.summary()["upstream_signing_secrets"] == ["unset", "set"]
    assert SECRET_B not in repr(config.summary())
    env = load_config(
        None,
        {
            "RELAY_TRIO_UPSTREAMS": ",".join(ups),
            "RELAY_TRIO_UPSTREAM_SIGNING_SECRETS": f"{SECRET_A} {SECRET_B},-",
        },
    )
    assert list(env.signing_keys()) == [ups[0]]
    assert len(env.signing_keys()[ups[0]]) == 2
