"""mkdocs hook: generate the event payload reference from ``relay_trio.core.event_schemas``.

The tables replace the ``<!-- EVENT_SCHEMAS -->`` marker in ``events.md`` on every build, so
the page cannot drift from the code. Run as a script to print them:
``python docs/gen_events.py``.
"""

from __future__ import annotations

from typing import Any

MARKER = "<!-- EVENT_SCHEMAS -->"


def events_reference() -> str:
    """One section per payload: topic (and ``kind``/``action``), what it means, its fields."""
    from relay_trio.core.event_schemas import OVERFLOW, SCHEMAS

    out: list[str] = []
    for schema in (*SCHEMAS, OVERFLOW):
        title = f"`{schema.topic}`"
        if schema.discriminator is not None:
            title += f" · `{schema.discriminator}: {schema.value}`"
        out += [f"### {title}", "", schema.doc, "", "| field | type | meaning |", "|---|---|---|"]
        for f in schema.fields:
            optional = " (optional)" if f.optional else ""
            meaning = f.meaning.replace("|", "\\|")
            out.append(f"| `{f.name}` | {f.type}{optional} | {meaning} |")
        out.append("")
    return "\n".join(out)


def on_page_markdown(markdown: str, page: Any, **_: Any) -> str:
    """mkdocs hook: fill the marker on the events page."""
    if MARKER in markdown:
        return markdown.replace(MARKER, events_reference())
    return markdown


if __name__ == "__main__":
    print(events_reference())
