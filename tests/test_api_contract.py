"""The HTTP API and its OpenAPI document agree (issue 11, findings 5 and 8; issue 12: one
parser per value). Real hypercorn on 127.0.0.1:0, httpx."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st
from relay_helpers import make_config, running_server

from relay_trio.core.ids import (
    CURSOR_MAX,
    MESSAGE_ID_MAX_LEN,
    MESSAGE_ID_PATTERN,
    SEQ_MAX,
    MessageId,
)

PROBLEM = "application/problem+json"


def _resolve(doc: dict[str, Any], schema: dict[str, Any]) -> dict[str, Any]:
    while "$ref" in schema:
        schema = doc["components"]["schemas"][schema["$ref"].rsplit("/", 1)[1]]
    return schema


# --------------------------------------------------------------------------- message ids


def test_message_id_parse_and_str() -> None:
    assert MessageId.parse("vm:1:42") == MessageId("vm:1", 42)
    assert str(MessageId("vm:1", 42)) == "vm:1:42"
    assert MessageId.parse(f"a:{SEQ_MAX}") == MessageId("a", SEQ_MAX)
    for bad in [
        "",
        "a",
        "a:",
        ":1",
        "a:0",
        "a:01",
        "a:-1",
        "a:+1",
        "a: 1",
        "a:1 ",
        "a:\u0663",  # ARABIC-INDIC DIGIT THREE: isdigit(), but not ASCII
        "a:\u00b2",  # SUPERSCRIPT TWO: isdigit(), and int() raises
        f"a:{SEQ_MAX + 1}",
        "a:" + "1" * 5000,  # past int()'s 4300-digit limit
        "b" * 129 + ":1",
        "a b:1",
        None,
        17,
        ["a:1"],
    ]:
        assert MessageId.parse(bad) is None, bad
        assert MessageId.split(bad) is None, bad


@given(st.text(alphabet="ab:0123456789\u0663 ", max_size=30) | st.from_regex(MESSAGE_ID_PATTERN))
def test_the_published_pattern_is_the_parser(text: str) -> None:
    """The schema's ``pattern``/``maxLength`` accept exactly what the parser accepts."""
    # JSON Schema (ECMA-262) anchors: ^...$ over the whole string, no trailing-newline slack.
    whole = MESSAGE_ID_PATTERN.removeprefix("^").removesuffix("$")
    published = re.fullmatch(whole, text) is not None and len(text) <= MESSAGE_ID_MAX_LEN
    assert published == (MessageId.parse(text) is not None)
    parsed = MessageId.parse(text)
    if parsed is not None:
        assert str(parsed) == text and 1 <= parsed.seq <= SEQ_MAX


@given(st.integers(1, SEQ_MAX), st.from_regex(r"[A-Za-z0-9._:-]{1,128}", fullmatch=True))
def test_every_valid_id_round_trips(seq: int, rid: str) -> None:
    assert MessageId.parse(f"{rid}:{seq}") == MessageId(rid, seq)


async def test_ack_with_a_5000_digit_seq_is_422_not_500(tmp_path: Path) -> None:
    async with running_server(make_config(tmp_path)) as (_server, client):
        for message_id in ["a:" + "1" * 5000, f"a:{SEQ_MAX + 1}", "", "a:01", "a:\u00b2"]:
            r = await client.post("/v1/acks", json={"message_id": message_id, "status": "ack"})
            assert r.status_code == 422, (message_id[:20], r.text)
            assert r.headers["content-type"] == PROBLEM
            assert r.json()["field"] == "message_id"
        largest = await client.post(
            "/v1/acks", json={"message_id": f"a:{SEQ_MAX}", "status": "ack"}
        )
        assert largest.status_code == 200 and largest.json()["outcome"] == "unknown"


# --------------------------------------------------------------------------- OpenAPI vs behaviour


async def test_405_answers_carry_allow(tmp_path: Path) -> None:
    async with running_server(make_config(tmp_path)) as (_server, client):
        for method, path, allowed in [
            ("PUT", "/v1/reports", "OPTIONS, POST"),
            ("DELETE", "/v1/acks", "OPTIONS, POST"),
            ("POST", "/v1/status", "GET, HEAD, OPTIONS"),
            ("TRACE", "/", "GET, HEAD, OPTIONS"),
        ]:
            r = await client.request(method, path)
            assert r.status_code == 405, (method, path)
            assert r.headers["content-type"] == PROBLEM
            assert r.headers["allow"] == allowed, (method, path)


async def test_every_integer_parameter_bound_is_published_and_enforced(tmp_path: Path) -> None:
    """For every integer query/header parameter in the served document: its minimum and
    maximum are answered 200, one past either is 422 problem+json (never a 500); a
    non-ASCII digit is 422 too."""
    async with running_server(make_config(tmp_path)) as (_server, client):
        doc = (await client.get("/openapi.json")).json()
        seen: set[tuple[str, str]] = set()
        for path, ops in doc["paths"].items():
            get = ops.get("get")
            if get is None or path == "/v1/events/stream":
                continue
            for param in get.get("parameters", []):
                schema = param["schema"]
                if schema.get("type") != "integer":
                    continue
                name, low, high = param["name"], schema["minimum"], schema["maximum"]
                seen.add((path, name))
                for value, status in [
                    (low, 200),
                    (high, 200),
                    (low - 1, 422),
                    (high + 1, 422),
                    ("\u00b2", 422),
                    ("1" * 5000, 422),
                ]:
                    r = await client.get(path, params={name: str(value)})
                    assert r.status_code == status, (path, name, str(value)[:20], r.text)
                    if status == 422:
                        assert r.headers["content-type"] == PROBLEM
                        assert r.json()["parameter"] == name
    assert {
        ("/v1/events", "after"),
        ("/v1/events", "limit"),
        ("/v1/deadletters", "cursor"),
        ("/v1/deadletters", "limit"),
    } <= seen
    after = next(p for p in doc["paths"]["/v1/events"]["get"]["parameters"] if p["name"] == "after")
    assert after["schema"]["maximum"] == CURSOR_MAX


async def test_last_event_id_header_and_query_share_one_parser(tmp_path: Path) -> None:
    """Last-Event-ID (header) and last_event_id (query) accept and refuse the same values
    as ``after``: one parser, one bound (they disagreed by a digit before)."""
    async with running_server(make_config(tmp_path)) as (_server, client):
        doc = (await client.get("/openapi.json")).json()
        params = {p["name"]: p for p in doc["paths"]["/v1/events/stream"]["get"]["parameters"]}
        assert params["Last-Event-ID"]["in"] == "header"
        assert params["Last-Event-ID"]["schema"]["maximum"] == CURSOR_MAX
        assert params["last_event_id"]["schema"]["maximum"] == CURSOR_MAX
        for bad in [str(CURSOR_MAX + 1), "-1", "\u00b2", "1.0", "9" * 40]:
            for kwargs in (
                {"headers": {"Last-Event-ID": bad.encode("latin-1")}},
                {"params": {"last_event_id": bad}},
            ):
                r = await client.get("/v1/events/stream", **kwargs)
                assert r.status_code == 422, (bad, kwargs)
                assert r.headers["content-type"] == PROBLEM
        # The largest id is accepted (a future id means "start live"): the stream opens.
        async with client.stream(
            "GET", "/v1/events/stream", headers={"Last-Event-ID": str(CURSOR_MAX)}
        ) as r:
            assert r.status_code == 200
            assert r.headers["content-type"].startswith("text/event-stream")


async def test_message_id_schema_has_its_pattern(tmp_path: Path) -> None:
    async with running_server(make_config(tmp_path)) as (_server, client):
        doc = (await client.get("/openapi.json")).json()
    ack = _resolve(doc, doc["paths"]["/v1/acks"]["post"]["requestBody"]["content"]["application/json"]["schema"])  # fmt: skip
    message_id = _resolve(doc, ack["properties"]["message_id"])
    assert message_id["pattern"] == MESSAGE_ID_PATTERN
    assert message_id["maxLength"] == MESSAGE_ID_MAX_LEN
    assert re.search(message_id["pattern"], "") is None


@pytest.mark.parametrize("kind", [None, "scan"])
async def test_kind_null_is_accepted_and_the_schema_says_so(
    tmp_path: Path, kind: str | None
) -> None:
    async with running_server(make_config(tmp_path)) as (_server, client):
        doc = (await client.get("/openapi.json")).json()
        report = doc["components"]["schemas"]["Report"]
        assert report["properties"]["kind"]["type"] == ["string", "null"]
        r = await client.post(
            "/v1/reports", json={"resource_id": "vm-1", "payload": 1, "kind": kind}
        )
        assert r.status_code == 202, r.text
        bad = await client.post(
            "/v1/reports", json={"resource_id": "vm-2", "payload": 1, "kind": ""}
        )
        assert bad.status_code == 422


@pytest.mark.parametrize("body", [b"", b"\n", b"  \n\r\n \n"])
async def test_empty_batch_is_400_problem_and_documented(tmp_path: Path, body: bytes) -> None:
    async with running_server(make_config(tmp_path)) as (_server, client):
        doc = (await client.get("/openapi.json")).json()
        batch = doc["paths"]["/v1/reports:batch"]["post"]
        assert "400" in batch["responses"]
        assert batch["requestBody"]["content"]["application/x-ndjson"]["schema"]["minItems"] == 1
        r = await client.post(
            "/v1/reports:batch", content=body, headers={"content-type": "application/x-ndjson"}
        )
        assert r.status_code == 400
        assert r.headers["content-type"] == PROBLEM
        assert r.json()["type"].endswith("/empty-batch")
