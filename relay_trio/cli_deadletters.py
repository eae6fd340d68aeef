"""``relay-trio deadletters list|redrive``: look at dead letters and send them again.

Thin clients of ``GET /v1/deadletters`` and ``POST /v1/deadletters:redrive`` (httpx, one
request per page). ``list`` prints one JSON object per line and follows the cursor up to
``--max``; ``redrive`` prints the relay's answer. Exit codes: 0 done, 1 the relay could not
be reached or answered an error (its problem detail is printed).
"""

from __future__ import annotations

import sys
from typing import Any

import click
import httpx
import orjson

_URL = click.option(
    "--url", default="http://127.0.0.1:8080", show_default=True, help="Relay base URL."
)


def _filters(func: Any) -> Any:
    for name, help_text in reversed(
        [
            ("resource-id", "Only this resource."),
            ("reason", "Only this reason (max_attempts, max_age, evicted, shutdown)."),
            ("upstream", "Only this upstream URL (as shown in the dead letter)."),
            ("since", "Dead at or after this RFC 3339 time."),
            ("until", "Dead before this RFC 3339 time."),
        ]
    ):
        func = click.option(f"--{name}", name.replace("-", "_"), default=None, help=help_text)(func)
    return func


def _fail(response: httpx.Response) -> None:
    try:
        detail = response.json().get("detail") or response.json().get("title")
    except ValueError:
        detail = response.text[:200]
    click.echo(f"relay-trio deadletters: HTTP {response.status_code}: {detail}", err=True)
    sys.exit(1)


def _headers(token: str | None) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"} if token else {}


@click.group()
def deadletters() -> None:
    """List dead letters or redrive them (see docs/operations.md)."""


@deadletters.command("list")
@_URL
@_filters
@click.option("--limit", default=100, show_default=True, type=click.IntRange(1, 1000))
@click.option("--max", "max_items", default=1000, show_default=True, type=click.IntRange(1))
@click.option("--token", envvar="RELAY_TRIO_READ_TOKEN", default=None, help="Read token.")
def list_dead_letters(
    url: str, limit: int, max_items: int, token: str | None, **filters: str | None
) -> None:
    """Print dead letters as JSON lines, oldest first, following the cursor."""
    params: dict[str, Any] = {k: v for k, v in filters.items() if v is not None}
    printed = 0
    try:
        with httpx.Client(base_url=url, timeout=30, headers=_headers(token)) as client:
            cursor = 0
            while printed < max_items:
                page_size = min(limit, max_items - printed)
                r = client.get(
                    "/v1/deadletters", params={**params, "cursor": cursor, "limit": page_size}
                )
                if r.status_code != 200:
                    _fail(r)
                body = r.json()
                for item in body["dead_letters"]:
                    click.echo(orjson.dumps(item).decode())
                    printed += 1
                if body["next_cursor"] is None:
                    break
                cursor = body["next_cursor"]
    except httpx.HTTPError as exc:
        click.echo(f"relay-trio deadletters: {exc}", err=True)
        sys.exit(1)


@deadletters.command("redrive")
@_URL
@_filters
@click.option("--message-id", "message_ids", multiple=True, help="Redrive this id (repeatable).")
@click.option("--limit", default=100, show_default=True, type=click.IntRange(1, 1000))
@click.option("--dry-run", is_flag=True, help="Only count what would be redriven.")
@click.option("--force", is_flag=True, help="Also redrive messages a newer ACK superseded.")
@click.option("--token", envvar="RELAY_TRIO_ADMIN_TOKEN", default=None, help="Admin token.")
def redrive_dead_letters(  # noqa: PLR0917 - click passes every option as a parameter
    url: str,
    message_ids: tuple[str, ...],
    limit: int,
    dry_run: bool,
    force: bool,
    token: str | None,
    **filters: str | None,
) -> None:
    """Send matching dead letters again (same message ids, fresh attempt count)."""
    body: dict[str, Any] = {k: v for k, v in filters.items() if v is not None}
    if message_ids:
        body["message_ids"] = list(message_ids)
    body.update(limit=limit, dry_run=dry_run, force=force)
    try:
        with httpx.Client(base_url=url, timeout=30, headers=_headers(token)) as client:
            r = client.post("/v1/deadletters:redrive", content=orjson.dumps(body))
    except httpx.HTTPError as exc:
        click.echo(f"relay-trio deadletters: {exc}", err=True)
        sys.exit(1)
    if r.status_code != 200:
        _fail(r)
    click.echo(orjson.dumps(r.json()).decode())
