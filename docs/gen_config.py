"""mkdocs hook: generate the configuration reference from ``relay_trio.core.config``.

The table replaces the ``<!-- CONFIG_TABLE -->`` marker in ``configuration.md`` on every
build, so the page cannot drift from the code. Run as a script to print the table:
``python docs/gen_config.py``.
"""

from __future__ import annotations

from typing import Any

MARKER = "<!-- CONFIG_TABLE -->"


def _default(f: Any) -> str:
    value = f.default
    if value is None:
        return "unset"
    if isinstance(value, tuple):
        return ", ".join(value) if value else "(empty)"
    if isinstance(value, bool):
        return "true" if value else "false"
    return str(value)


def config_table() -> str:
    """The reference table: name, flag, environment variable, default, help."""
    from relay_trio.core.config import ENV_PREFIX, config_fields, field_kind

    rows = [
        "| setting | flag | environment | type | default | description |",
        "|---|---|---|---|---|---|",
    ]
    for f in config_fields():
        kind = field_kind(f)
        flag = "--" + f.name.replace("_", "-")
        if kind == "bool":
            flag += f" / --no-{f.name.replace('_', '-')}"
        help_text = str(f.metadata["help"]).replace("|", "\\|")
        rows.append(
            f"| `{f.name}` | `{flag}` | `{ENV_PREFIX}{f.name.upper()}` | {kind} "
            f"| `{_default(f)}` | {help_text} |"
        )
    return "\n".join(rows)


def on_page_markdown(markdown: str, page: Any, **_: Any) -> str:
    """mkdocs hook: fill the marker on the configuration page."""
    if MARKER in markdown:
        return markdown.replace(MARKER, config_table())
    return markdown


if __name__ == "__main__":
    print(config_table())
