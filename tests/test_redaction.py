"""Upstream URLs are shown without credentials everywhere (issue 11, finding 10): the
``relay-trio config`` output, ``/v1/status``, the ``upstream`` label in ``/metrics``, log lines
and ``system`` events. The relay still connects with them."""

from __future__ import annotations

import logging
import random
from pathlib import Path
from typing import Any

import orjson
import pytest
import trio
from click.testing import CliRunner
from relay_helpers import memory_relay, running_server

from relay_trio.cli import main as cli_main
from relay_trio.core.config import ConfigError, load_config
from relay_trio.core.redact import redact_url
from relay_trio.core.routing import HealthPolicy, UpstreamRouter

SECRET = "s3cr3t-pa55"


@pytest.mark.parametrize(
    ("url", "shown"),
    [
        ("https://user:pw@host:8443/ingest?x=1", "https://***@host:8443/ingest?x=1"),
        ("http://token@host", "http://***@host"),
        ("http://a@b@host/x", "http://***@host/x"),
        ("http://u:p@host?q=a@b", "http://***@host?q=a@b"),
        ("http://u:p@host#frag@x", "http://***@host#frag@x"),
        # No userinfo: unchanged, even with an @ in the path or query.
        ("http://host/users/@me", "http://host/users/@me"),
        ("file:///var/lib/relay/up@stream.jsonl", "file:///var/lib/relay/up@stream.jsonl"),
        ("not a url user:pw@host", "not a url user:pw@host"),
        ("", ""),
    ],
)
def test_redact_url(url: str, shown: str) -> None:
    assert redact_url(url) == shown


def test_config_command_hides_upstream_credentials() -> None:
    url = f"https://relay:{SECRET}@upstream.example/ingest"
    env = {
        "RELAY_TRIO_UPSTREAMS": f"{url},http://plain.example/x",
        "RELAY_TRIO_SHUTDOWN_TIMEOUT": "60",  # room to drain two upstreams
    }
    result = CliRunner().invoke(cli_main, ["config"], env=env)
    assert result.exit_code == 0, result.output
    assert SECRET not in result.output
    assert orjson.loads(result.output)["upstreams"] == [
        "https://***@upstream.example/ingest",
        "http://plain.example/x",
    ]


def test_config_errors_hide_credentials(tmp_path: Path) -> None:
    with pytest.raises(ConfigError) as bad:
        load_config({"upstreams": [f"ftp://u:{SECRET}@h/x"], "data_dir": str(tmp_path)}, {}, None)
    assert SECRET not in str(bad.value) and "***@h" in str(bad.value)
    # Two upstreams that differ only by credentials would be indistinguishable once shown.
    with pytest.raises(ConfigError, match="distinct"):
        load_config(
            {"upstreams": ["http://a:1@h/x", "http://b:2@h/x"], "data_dir": str(tmp_path)}, {}, None
        )


def test_router_never_holds_credentials() -> None:
    router = UpstreamRouter(
        [f"http://u:{SECRET}@h1/x", "http://h2/x"], HealthPolicy(), random.Random(1)
    )
    assert router.urls == ("http://***@h1/x", "http://h2/x")
    assert SECRET not in repr(router.states())


async def test_status_metrics_events_and_logs_hide_credentials(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG)
    url = f"https://relay:{SECRET}@upstream.example/ingest"
    shown = "https://***@upstream.example/ingest"
    relay, ups = memory_relay(
        tmp_path, mode="fail", upstreams=[url], failures_to_down=1, probe_interval=3600.0
    )
    async with running_server(relay.config, relay) as (_server, client):
        posted = await client.post("/v1/reports", json={"resource_id": "vm-1", "payload": 1})
        assert posted.status_code == 202

        async def system_events() -> list[dict[str, Any]]:
            page = (await client.get("/v1/events", params={"topic": "system"})).json()
            return [e["data"] for e in page["events"]]

        with trio.fail_after(10):
            # Polling a real server's HTTP API: there is no in-process event to wait on.
            while not any(d.get("kind") == "upstream_down" for d in await system_events()):  # noqa: ASYNC110
                await trio.sleep(0.02)
        events = await client.get("/v1/events", params={"topic": "system"})
        status = await client.get("/v1/status")
        metrics = await client.get("/metrics")
        resource = await client.get("/v1/resources/vm-1")
    # The upstream client itself still gets the real URL, credentials included.
    assert list(ups) == [url] and ups[url].received
    down = [e["data"] for e in events.json()["events"] if e["data"].get("kind") == "upstream_down"]
    assert down[0]["upstream"] == shown
    assert [u["url"] for u in status.json()["upstreams"]] == [shown]
    assert status.json()["config"]["upstreams"] == [shown]
    assert f'upstream="{shown}"' in metrics.text
    assert resource.json()["upstream"] == shown
    for text in (events.text, status.text, metrics.text, resource.text, caplog.text):
        assert SECRET not in text
    assert f"upstream {shown} marked down" in caplog.text
