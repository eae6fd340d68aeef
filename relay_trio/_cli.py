"""The ``relay-trio`` command line: ``run`` (serve), ``tail`` (follow events), ``send``."""

from __future__ import annotations

import logging
import os
import sys
from typing import Any

import attrs
import click

from ._config import ConfigError, RelayConfig, config_fields, field_kind, load_config


def _config_options(func: Any) -> Any:
    """Add one ``--some-name`` option per config field (generated: it cannot drift)."""
    for f in reversed(list(config_fields())):
        kind = field_kind(f)
        flag = "--" + f.name.replace("_", "-")
        help_text = f.metadata["help"]
        if kind == "list":
            func = click.option(flag, f.name, multiple=True, default=None, help=help_text)(func)
        elif kind == "bool":
            func = click.option(flag + "/--no-" + flag[2:], f.name, default=None, help=help_text)(
                func
            )
        else:
            func = click.option(
                flag, f.name, default=None, help=f"{help_text} [default: {f.default}]"
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


@click.group()
@click.version_option(package_name="relay-trio")
def main() -> None:
    """relay-trio: a reliable, rate-limited report relay built on Trio."""


@main.command()
@click.option(
    "--config",
    "config_file",
    type=click.Path(dir_okay=False),
    default=None,
    help="TOML config file.",
)
@_config_options
def run(config_file: str | None, **flags: Any) -> None:
    """Run the relay until SIGTERM/SIGINT (or POST /admin/shutdown)."""
    config = build_config(config_file, flags)
    logging.basicConfig(
        level=config.log_level.upper(),
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        stream=sys.stderr,
    )
    from ._server import run_forever

    run_forever(config, lambda line: click.echo(line, nl=True))


@main.command("config")
@click.option(
    "--config",
    "config_file",
    type=click.Path(dir_okay=False),
    default=None,
    help="TOML config file.",
)
@_config_options
def show_config(config_file: str | None, **flags: Any) -> None:
    """Print the effective configuration (tokens shown as set/unset) as JSON."""
    import orjson

    config = build_config(config_file, flags)
    click.echo(orjson.dumps(config.summary(), option=orjson.OPT_INDENT_2).decode())


_ = attrs
