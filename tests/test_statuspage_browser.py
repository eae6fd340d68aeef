"""The status page in headless Chromium against a real relay: charts and panels follow it."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import httpx
import pytest
import trio
from chromium_cdp import CdpError, Chromium, launch_chromium
from fake_upstream import Behaviour, run_fake_upstream
from relay_helpers import make_config, running_server

from relay_trio.stores.base import DeadLetterQuery

pytestmark = pytest.mark.slow

READ_TOKEN = "read-token-for-the-page"
ADMIN_TOKEN = "admin-token-for-redrive"
INGEST = {"Authorization": "Bearer ingest-token"}


async def wait_for(browser: Chromium, session: str, expression: str, within: float = 30) -> Any:
    """Poll a page expression (real time) until it is truthy; return its value. An
    expression that throws (page still loading) counts as not yet."""
    last: object = None
    try:
        with trio.fail_after(within):
            while True:
                try:
                    last = await browser.evaluate(session, expression)
                except CdpError as exc:
                    last = exc
                if last and not isinstance(last, CdpError):
                    return last
                await trio.sleep(0.2)
    except trio.TooSlowError:
        page = await browser.evaluate(
            session,
            "JSON.stringify([window.relayPage, document.getElementById('state').textContent])",
        )
        raise AssertionError(
            f"{expression} stayed falsy; last value {last!r}; page {page}; "
            f"errors {browser.page_errors}"
        ) from None


def series_sum(chart: str, index: int) -> str:
    return f"(window.relayCharts.{chart} || [[],[],[],[],[],[]])[{index}].reduce((a, b) => a + (b || 0), 0)"


async def post(client: httpx.AsyncClient, resource: str) -> int:
    r = await client.post(
        "/v1/reports", json={"resource_id": resource, "payload": {"n": 1}}, headers=INGEST
    )
    return r.status_code


async def test_page_charts_and_panels_follow_a_live_relay(tmp_path: Path) -> None:
    async with run_fake_upstream(Behaviour(sync_ack=True)) as up:
        config = make_config(
            tmp_path,
            upstreams=[up.url],
            read_token=READ_TOKEN,
            ingest_token="ingest-token",
            admin_token=ADMIN_TOKEN,
            burst=3,
            max_attempts=1,
            failures_to_down=2,
            probe_interval=60,
        )
        async with (
            running_server(config) as (server, client),
            launch_chromium(tmp_path / "chromium") as browser,
        ):
            base = server.urls[0]
            session = await browser.open_page(base + "/")
            # The relay has a read token: the page asks for it (it is not in the URL).
            await wait_for(
                browser, session, "document.getElementById('auth').offsetParent !== null"
            )
            await browser.evaluate(
                session,
                f"document.getElementById('auth-token').value = '{READ_TOKEN}';"
                "document.getElementById('auth').requestSubmit(); true",
            )
            await wait_for(browser, session, "window.relayPage.state === 'live'")
            assert READ_TOKEN not in await browser.evaluate(session, "location.href")
            assert await browser.evaluate(session, "typeof uPlot") == "function"  # served locally
            assert await browser.evaluate(session, series_sum("reports", 1)) == 0

            # 12 resources x 4 reports: burst 3 admits 36, rate-limits 12; all acknowledged.
            for i in range(12):
                for _ in range(4):
                    assert await post(client, f"vm-page-{i}") in (202, 429)
            await wait_for(browser, session, series_sum("reports", 1) + " === 36")
            await wait_for(browser, session, series_sum("reports", 2) + " === 12")
            # Every admitted message is acknowledged: superseded ones as late ACKs.
            acks = f"{series_sum('delivery', 1)} + {series_sum('delivery', 5)}"
            await wait_for(browser, session, acks + " === 36")
            counters = server.relay.status()["counters"]
            assert (
                await browser.evaluate(session, series_sum("delivery", 1)) == counters["umh_acked"]
            )
            log_text = await wait_for(
                browser,
                session,
                "document.getElementById('log').textContent.includes('vm-page-11:3')"
                " && document.getElementById('log').textContent",
            )
            assert "rate_limited" in log_text
            # The log filter narrows what is shown.
            shown = await browser.evaluate(
                session,
                "document.getElementById('log-filter').value = 'vm-page-5:';"
                "document.getElementById('log-filter').dispatchEvent(new Event('input'));"
                "document.getElementById('log').children.length",
            )
            assert shown == 3 + 3  # three reports events and three acks for vm-page-5
            await wait_for(browser, session, "window.relayPage.upstreams.length === 1")
            assert await browser.evaluate(session, "window.relayPage.upstreams[0].up") is True
            tiles = await wait_for(
                browser,
                session,
                "document.getElementById('tiles').textContent.includes('36reports admitted')"
                " && document.getElementById('tiles').textContent",
            )
            assert "SSE subscribers" in tiles

            # The upstream starts failing: send failures, dead letters, upstream down.
            up.behaviour = Behaviour(fail_all=True)
            for i in range(3):
                assert await post(client, f"dl-{i}") == 202
            await wait_for(browser, session, series_sum("deadletters", 1) + " === 3")
            await wait_for(browser, session, "window.relayPage.deadLetters.length === 3")
            # The "kept" tile reads /v1/status gauges.dead_letters_kept (the store's count).
            await wait_for(
                browser,
                session,
                "document.getElementById('tiles').textContent.includes('3dead letters kept')",
            )
            rows = await browser.evaluate(
                session, "document.getElementById('deadletters').textContent"
            )
            assert "dl-0:1" in rows and "max_attempts" in rows
            await wait_for(browser, session, "window.relayPage.upstreams[0].up === false")
            changed = await browser.evaluate(session, "window.relayPage.upstreams[0].changed_at")
            assert changed is not None and changed.endswith("Z")
            badge = await browser.evaluate(
                session, "document.querySelector('#upstreams .badge').textContent"
            )
            assert badge == "down"
            await wait_for(browser, session, series_sum("delivery", 4) + " >= 2")
            # Gauges come from /v1/status: the page is one of the SSE subscribers.
            await wait_for(browser, session, "Math.max(...window.relayCharts.subscribers[1]) >= 1")
            assert server.relay.hub.subscriber_count() == 1  # one subscription, not one per chart

            # Redrive one dead letter from its row: the page asks for the admin token (kept
            # in sessionStorage, never in the URL), shows the answer and lists the panel again.
            up.behaviour = Behaviour(sync_ack=True)
            row_button = (
                "[...document.querySelectorAll('#deadletters tr')]"
                ".find((tr) => tr.textContent.includes('dl-0:1')).querySelector('button.redrive')"
            )
            await browser.evaluate(session, row_button + ".click(); true")
            await wait_for(
                browser, session, "document.getElementById('admin-auth').offsetParent !== null"
            )
            await browser.evaluate(
                session,
                f"document.getElementById('admin-token').value = '{ADMIN_TOKEN}';"
                "document.getElementById('admin-auth').requestSubmit(); true",
            )
            answer = await wait_for(
                browser,
                session,
                "window.relayPage.redrive && window.relayPage.redrive.status === 200"
                " && window.relayPage.redrive.body",
            )
            assert answer["redriven"] == 1 and answer["message_ids"] == ["dl-0:1"], answer
            await wait_for(browser, session, "window.relayPage.deadLetters.length === 2")
            assert "dl-0:1" not in await browser.evaluate(session, "window.relayPage.deadLetters")
            shown = await browser.evaluate(
                session, "document.getElementById('redrive-result').textContent"
            )
            assert "1 redriven of 1" in shown, shown
            assert ADMIN_TOKEN not in await browser.evaluate(session, "location.href")
            assert (
                await browser.evaluate(session, "sessionStorage.getItem('relay-trio-admin-token')")
                == ADMIN_TOKEN
            )
            page = await server.relay.store.query_dead_letters(
                DeadLetterQuery(message_ids=("dl-0:1",))
            )
            assert page.items == []
            await browser.evaluate(
                session,
                "document.getElementById('log-filter').value = 'dl-0:1';"
                "document.getElementById('log-filter').dispatchEvent(new Event('input')); true",
            )
            await wait_for(
                browser,
                session,
                "document.getElementById('log').textContent.includes('redriven')",
            )
