"""``python -m benchmarks run [--quick] [--only NAME ...]`` and ``python -m benchmarks report``.

``run`` starts every server itself on 127.0.0.1, drives bounded load, writes
``benchmarks/results/latest.json`` and regenerates ``docs/benchmarks.md`` and the chart
from that JSON. ``report`` only re-renders the docs from the JSON.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from typing import Any

from ._common import RESULTS, machine_info, raise_fd_limit
from .report import render
from .scenarios import SCENARIOS


def log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def run(quick: bool, only: list[str]) -> int:
    raise_fd_limit()
    names = only or list(SCENARIOS)
    unknown = [n for n in names if n not in SCENARIOS]
    if unknown:
        log(f"unknown scenario(s): {', '.join(unknown)}; choose from {', '.join(SCENARIOS)}")
        return 2
    latest = RESULTS / "latest.json"
    data: dict[str, Any] = {"scenarios": {}}
    if only and latest.exists():
        # A partial run updates its scenarios and keeps the others from the last run.
        data = json.loads(latest.read_text())
    machine = machine_info()
    data["machine"] = machine
    data["mode"] = "quick" if quick else "full"
    started = time.monotonic()
    failed = 0
    for name in names:
        log(f"[{name}] ({data['mode']})")
        t = time.monotonic()
        try:
            result = SCENARIOS[name](quick, log)
        except Exception as exc:  # one broken scenario must not lose the others' numbers
            log(f"[{name}] FAILED: {exc!r}")
            result = {"error": repr(exc)}
            failed += 1
        result["mode"] = data["mode"]
        result["seconds"] = round(time.monotonic() - t, 1)
        result["commit"] = machine["git_commit"]
        data["scenarios"][name] = result
        RESULTS.mkdir(parents=True, exist_ok=True)
        latest.write_text(json.dumps(data, indent=2, sort_keys=False) + "\n")
    data["elapsed_s"] = round(time.monotonic() - started, 1)
    latest.write_text(json.dumps(data, indent=2) + "\n")
    log(f"wrote {latest} in {data['elapsed_s']} s")
    render(data)
    return 1 if failed else 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks")
    sub = parser.add_subparsers(dest="command", required=True)
    p_run = sub.add_parser("run", help="run the benchmarks and regenerate the docs")
    p_run.add_argument("--quick", action="store_true", help="short runs (under 2 minutes)")
    p_run.add_argument(
        "--only",
        action="append",
        default=[],
        metavar="NAME",
        help=f"run only this scenario (repeatable): {', '.join(SCENARIOS)}",
    )
    sub.add_parser("report", help="re-render docs/benchmarks.md and the chart from the JSON")
    args = parser.parse_args(argv)
    if args.command == "run":
        return run(args.quick, args.only)
    data = json.loads((RESULTS / "latest.json").read_text())
    render(data)
    return 0


if __name__ == "__main__":
    sys.exit(main())
