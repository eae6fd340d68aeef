"""The ``relay-trio`` command line: ``run`` (serve), ``tail`` (follow events), ``send``."""

from __future__ import annotations

import contextlib
import os
import sys
from typing import Any, TypeVar

import click

from .cli_deadletters import deadletters
from .core.config import ConfigError, RelayConfig, config_fields, field_kind, load_config


class ConfigText(click.types.StringParamType):
    """A setting's text as given on the command line, shown in ``--help`` as its type.

    The text is handed to :func:`load_config` unparsed, so a flag is parsed by the same
    code as the environment and the TOML file (one parser cannot drift from another), and
    a bad value gets the same one-line error.
    """

    def __init__(self, name: str) -> None:
        self.name = name


_METAVARS = {"int": "integer", "optint": "integer", "float": "float", "optfloat": "float"}


def _config_options(func: Any) -> Any:
    """Add one ``--some-name`` option per config field (generated: it cannot drift)."""
    for f in reversed(list(config_fields())):
        kind = field_kind(f)
        flag = "--" + f.name.replace("_", "-")
        help_text = f.metadata["help"]
        if kind in ("list", "secretlist"):
            func = click.option(flag, f.name, multiple=True, default=None, help=help_text)(func)
        elif kind == "bool":
            func = click.option(flag + "/--no-" + flag[2:], f.name, default=None, help=help_text)(
                func
            )
        else:
            shown = "unset" if f.default is None else f.default
            func = click.option(
                flag,
                f.name,
                type=ConfigText(_METAVARS.get(kind, "text")),
                default=None,
                help=f"{help_text} [default: {shown}]",
            )(func)
    return func


def build_config(config_file: str | None, flags: dict[str, Any]) -> RelayConfig:
    """Merge flags given on the command line with env and file; exit 2 with one line on error."""
    given = {k: v for k, v in flags.items() if v is not None and v != ()}
    try:
        return load_config(given, os.environ, config_file or os.environ.get("RELAY_TRIO_CONFIG"))
    except ConfigError as exc:
        click.echo(f"relay-trio: {exc}", err=True)
        sys.exit(2)


config_file_option = click.option(
    "--config",
    "config_file",
    type=click.Path(dir_okay=False),
    default=None,
    help="TOML config file (also RELAY_TRIO_CONFIG).",
)


@click.group()
@click.version_option(package_name="relay-trio")
def main() -> None:
    """relay-trio: a reliable, rate-limited report relay built on Trio."""


@main.command()
@config_file_option
@_config_options
def run(config_file: str | None, **flags: Any) -> None:
    """Run the relay until SIGTERM/SIGINT (or POST /admin/shutdown)."""
    config = build_config(config_file, flags)
    from .logs import configure_logging

    secrets = [config.ingest_token, config.ack_token, config.admin_token, config.read_token]
    secrets += [part for entry in config.upstream_signing_secrets for part in entry.split()]
    configure_logging(
        config.log_level,
        config.log_format,
        sys.stderr,
        [s for s in secrets if s is not None and s != "-"],
    )
    from .server import run_forever
    from .stores.base import StoreError

    try:
        run_forever(config, lambda line: click.echo(line, nl=True))
    except (StoreError, BaseExceptionGroup) as exc:
        # A bad store stops the start with one line, never a traceback and never an empty
        # store created over it.
        store_error = _find(exc, StoreError)
        if store_error is None:
            raise
        click.echo(f"relay-trio: {store_error}", err=True)
        sys.exit(2)


_E = TypeVar("_E", bound=BaseException)


def _find(exc: BaseException, kind: type[_E]) -> _E | None:
    """The first ``kind`` exception in ``exc`` or (depth first) in its exception groups."""
    if isinstance(exc, kind):
        return exc
    if isinstance(exc, BaseExceptionGroup):
        for inner in exc.exceptions:
            found = _find(inner, kind)
            if found is not None:
                return found
    return None


main.add_command(deadletters)


@main.command("config")
@config_file_option
@click.option(
    "--check",
    is_flag=True,
    help="Only validate: print one line and exit 0, or the error and exit 2.",
)
@_config_options
def show_config(config_file: str | None, check: bool, **flags: Any) -> None:
    """Print the effective configuration (tokens shown as set/unset) as JSON."""
    import orjson

    config = build_config(config_file, flags)
    if check:
        where = config_file or os.environ.get("RELAY_TRIO_CONFIG")
        click.echo(f"relay-trio: configuration OK{f' ({where})' if where else ''}")
        return
    click.echo(orjson.dumps(config.summary(), option=orjson.OPT_INDENT_2).decode())


@main.command()
@click.option("--url", default="http://127.0.0.1:8080", show_default=True, help="Relay base URL.")
@click.option(
    "--topic", default=None, help="Only this topic (reports, acks, drops, deadletter, system)."
)
@click.option(
    "--token",
    envvar="RELAY_TRIO_READ_TOKEN",
    default=None,
    help="Read token (env RELAY_TRIO_READ_TOKEN).",
)
@click.option("--last-event-id", default=None, help="Resume after this event id.")
def tail(url: str, topic: str | None, token: str | None, last_event_id: str | None) -> None:
    """Follow the event stream in the terminal; resumes where it left off on reconnect.

    Each line is ``<id> <event> [@<instance>] <json>``; in cluster mode ``@<instance>`` names
    the relay instance that produced the event."""
    import trio

    from .client import SseEvent, describe, follow_events

    def show(event: SseEvent) -> bool:
        click.echo(describe(event))
        return False

    with contextlib.suppress(KeyboardInterrupt):
        trio.run(
            lambda: follow_events(url, show, topic=topic, token=token, last_event_id=last_event_id)
        )


@main.command()
@click.argument("source", type=click.File("rb"), default="-")
@click.option(
    "--url",
    default="http://127.0.0.1:8080",
    show_default=True,
    help="http(s)://HOST:PORT (batch endpoint) or a stream address tcp://HOST:PORT, unix:///PATH.",
)
@click.option(
    "--token",
    envvar="RELAY_TRIO_INGEST_TOKEN",
    default=None,
    help="Ingest token (env RELAY_TRIO_INGEST_TOKEN).",
)
@click.option("--batch-size", default=500, show_default=True, type=click.IntRange(1, 10_000))
@click.option(
    "--max-retry-wait",
    default=120.0,
    show_default=True,
    type=float,
    help="Give up on a 429 asking to wait longer.",
)
def send(source: Any, url: str, token: str | None, batch_size: int, max_retry_wait: float) -> None:
    """Send NDJSON reports from SOURCE (a file, or - for stdin), honouring 429 retry_after."""
    import trio

    from .client import send_reports

    lines = list(source)
    with click.progressbar(length=len(lines), label="sending", file=sys.stderr) as bar:
        try:
            summary = trio.run(
                lambda: send_reports(
                    url,
                    lines,
                    token=token,
                    batch_size=batch_size,
                    max_retry_wait=max_retry_wait,
                    progress=bar.update,
                )
            )
        except (OSError, ValueError, PermissionError) as exc:
            click.echo(f"relay-trio send: {exc}", err=True)
            sys.exit(1)
    click.echo(summary.line())
    if summary.rejected:
        sys.exit(3)
