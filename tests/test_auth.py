"""Bearer-token auth on every protected route of a real server, and tokens never leaking."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import httpx
import orjson
import pytest
import trio
from click.testing import CliRunner
from relay_helpers import make_config, running_server

from relay_trio.cli import main as cli_main

PROBLEM = "application/problem+json"

TOKENS = {
    "ingest": "ingest-Tok-7f3a9c0e11",
    "ack": "ack-Tok-2b8d4e6f22",
    "admin": "admin-Tok-9c1d5a7b33",
    "read": "read-Tok-4e2f8b0c44",
}

#: (scope, method, path, body) for every protected route except /admin/shutdown.
ROUTES: list[tuple[str, str, str, bytes]] = [
    ("ingest", "POST", "/v1/reports", b'{"resource_id": "r-auth", "payload": 1}'),
    ("ingest", "POST", "/v1/reports:batch", b'{"resource_id": "r-batch", "payload": 2}\n'),
    ("ack", "POST", "/v1/acks", b'{"message_id": "r-auth:1", "status": "ack"}'),
    ("read", "GET", "/v1/resources/r-auth", b""),
    ("read", "GET", "/v1/deadletters", b""),
    ("read", "GET", "/v1/events", b""),
    ("read", "GET", "/v1/events/stream", b""),
    ("read", "GET", "/v1/status", b""),
    ("read", "GET", "/metrics", b""),
]

BAD_HEADERS: list[dict[str, str]] = [
    {},
    {"Authorization": ""},
    {"Authorization": "Basic " + TOKENS["read"]},
    {"Authorization": "Token " + TOKENS["read"]},
    {"Authorization": "Bearer"},
    {"Authorization": "Bearer\tx"},
    {"Authorization": TOKENS["read"]},
]


def bearer(token: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


def token_config(tmp_path: Path, **overrides: Any) -> Any:
    return make_config(
        tmp_path,
        ingest_token=TOKENS["ingest"],
        ack_token=TOKENS["ack"],
        admin_token=TOKENS["admin"],
        read_token=TOKENS["read"],
        heartbeat_interval=0.2,
        **overrides,
    )


async def request(
    client: httpx.AsyncClient, method: str, path: str, body: bytes, headers: dict[str, str]
) -> httpx.Response:
    """One request; a 200 SSE stream is closed after its headers (it never ends by itself)."""
    if path == "/v1/events/stream":
        async with client.stream(method, path, headers=headers) as response:
            if response.status_code >= 400:
                await response.aread()
            return response
    return await client.request(method, path, content=body, headers=headers)


def assert_problem(response: httpx.Response, status: int, what: object) -> None:
    assert response.status_code == status, (what, response.status_code, response.text)
    assert response.headers["content-type"] == PROBLEM, what
    problem = response.json()
    assert problem["status"] == status
    assert problem["type"].startswith("https://")
    for token in TOKENS.values():
        assert token not in response.text


async def exercise_routes(client: httpx.AsyncClient) -> None:
    """Every protected route: 401 without a usable bearer, 403 wrong, works when right."""
    for scope, method, path, body in ROUTES:
        for headers in BAD_HEADERS:
            r = await request(client, method, path, body, headers)
            assert_problem(r, 401, (path, headers))
        # Wrong token: another scope's token is as wrong as a made-up one.
        other = next(t for s, t in TOKENS.items() if s != scope)
        for wrong in (other, TOKENS[scope] + "x", TOKENS[scope][:-1], "nope"):
            r = await request(client, method, path, body, bearer(wrong))
            assert_problem(r, 403, (path, wrong))
    # The right token works (ingest first, so acks and reads have something to see).
    for scope, method, path, body in ROUTES:
        r = await request(client, method, path, body, bearer(TOKENS[scope]))
        assert r.status_code < 300, (path, r.status_code, r.text)
        if path == "/v1/events/stream":
            assert r.headers["content-type"].startswith("text/event-stream")
    # A token of one scope never opens another scope's route.
    r = await client.post(
        "/v1/reports",
        content=b'{"resource_id": "r-x", "payload": 1}',
        headers=bearer(TOKENS["admin"]),
    )
    assert_problem(r, 403, "admin token on ingest")
    # Open routes stay open.
    for path in ("/healthz", "/readyz", "/openapi.json", "/"):
        assert (await client.get(path)).status_code == 200, path


async def test_every_protected_route_needs_its_token(tmp_path: Path) -> None:
    with trio.fail_after(20):
        async with running_server(token_config(tmp_path)) as (server, client):
            await exercise_routes(client)
            # The report admitted with the right token is really there.
            view = await client.get("/v1/resources/r-auth", headers=bearer(TOKENS["read"]))
            assert view.json()["seq"] == 1
            assert server.relay.metrics.value("relay_reports_admitted_total") == 2
            # Refused single reports are counted as rejected (unauthorized), never admitted:
            # 7 without a usable bearer + 4 wrong tokens + the admin token, on /v1/reports.
            m = server.relay.metrics
            assert m.value("relay_reports_rejected_total", reason="unauthorized") == 12
            assert m.value("relay_reports_received_total") == 12 + 2


async def test_admin_shutdown_requires_admin_token(tmp_path: Path) -> None:
    with trio.fail_after(20):
        async with running_server(token_config(tmp_path)) as (server, client):
            for headers in BAD_HEADERS:
                assert_problem(await client.post("/admin/shutdown", headers=headers), 401, headers)
            for wrong in (TOKENS["read"], TOKENS["ingest"], TOKENS["admin"] + "0"):
                r = await client.post("/admin/shutdown", headers=bearer(wrong))
                assert_problem(r, 403, wrong)
            assert not server.relay.shutdown_requested.is_set()
            r = await client.post("/admin/shutdown", headers=bearer(TOKENS["admin"]))
            assert r.status_code == 202 and r.json() == {"shutdown": "started"}
            with trio.fail_after(5):
                await server.relay.shutdown_requested.wait()
            assert server.relay.shutdown_reason == "admin"


async def test_admin_shutdown_is_forbidden_without_admin_token(tmp_path: Path) -> None:
    with trio.fail_after(20):
        async with running_server(make_config(tmp_path)) as (server, client):
            r = await client.post("/admin/shutdown", headers=bearer("anything"))
            assert_problem(r, 403, "no admin token configured")
            r = await client.post("/admin/shutdown")
            assert_problem(r, 403, "no admin token configured")
            assert not server.relay.shutdown_requested.is_set()


async def test_token_files_are_read(tmp_path: Path) -> None:
    secret = tmp_path / "ingest.token"
    secret.write_text(TOKENS["ingest"] + "\n")
    config = make_config(tmp_path, ingest_token="@" + str(secret))
    assert config.ingest_token == TOKENS["ingest"]
    with trio.fail_after(20):
        async with running_server(config) as (_, client):
            body = b'{"resource_id": "f", "payload": 1}'
            assert (await client.post("/v1/reports", content=body)).status_code == 401
            r = await client.post("/v1/reports", content=body, headers=bearer(TOKENS["ingest"]))
            assert r.status_code == 202


async def test_tokens_never_logged_nor_in_status(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG)
    with trio.fail_after(20):
        async with running_server(token_config(tmp_path)) as (_, client):
            await exercise_routes(client)
            status = await client.get("/v1/status", headers=bearer(TOKENS["read"]))
            assert status.status_code == 200
            config = status.json()["config"]
            for scope in TOKENS:
                assert config[f"{scope}_token"] == "set"
            metrics = await client.get("/metrics", headers=bearer(TOKENS["read"]))
            events = await client.get("/v1/events?limit=1000", headers=bearer(TOKENS["read"]))
            for token in TOKENS.values():
                assert token not in status.text
                assert token not in metrics.text
                assert token not in events.text
            await client.post("/admin/shutdown", headers=bearer(TOKENS["admin"]))
    assert caplog.records, "expected some log records to check"
    for record in caplog.records:
        text = record.getMessage() + repr(record.args) + str(record.exc_info)
        for token in TOKENS.values():
            assert token not in text, (record.name, record.levelname, text)


def test_config_command_hides_tokens(tmp_path: Path) -> None:
    secret = tmp_path / "admin.token"
    secret.write_text(TOKENS["admin"])
    runner = CliRunner()
    result = runner.invoke(
        cli_main,
        ["config", "--ingest-token", TOKENS["ingest"], "--admin-token", "@" + str(secret)],
        env={"RELAY_TRIO_READ_TOKEN": TOKENS["read"], "RELAY_TRIO_ACK_TOKEN": TOKENS["ack"]},
    )
    assert result.exit_code == 0, result.output
    summary = orjson.loads(result.output)
    assert {summary[f"{s}_token"] for s in TOKENS} == {"set"}
    for token in TOKENS.values():
        assert token not in result.output
    unset = runner.invoke(cli_main, ["config"], env={})
    assert orjson.loads(unset.output)["ingest_token"] == "unset"
