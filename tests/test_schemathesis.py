"""schemathesis over the served OpenAPI document of a real relay (subprocess, real sockets).

Every operation but ``POST /admin/shutdown`` (it would stop the server under test) and the SSE
stream (an endless response) gets schemathesis' coverage and fuzzing phases (schema-valid and
schema-invalid requests, undocumented methods, missing parts) with every check but:

* ``use_after_free``, ``ensure_resource_availability``: stateful checks for APIs that create
  and delete resources through links; the relay deletes nothing and declares no links;
* ``ignored_auth``: the relay under test runs without tokens (auth has its own tests);
* ``negative_data_rejection`` on ``POST /v1/reports:batch``: a batch answers 200 with one
  result line per input line, and an invalid line's problem is that line's result (the
  documented contract), not a request-level rejection. Elsewhere 413 counts as a rejection
  (a batch over ``batch_max_lines``).

So what must hold: no 5xx, every status, content type, header and body as documented, valid
data accepted, invalid data refused with a 4xx, 405 with ``Allow`` for undocumented methods.

schemathesis runs as its CLI (``python -m schemathesis.cli``) against the real server: its
pytest integration (``from_fixture``) fails under pytest 9 (``Function._nodeid``), and the CLI
is also the only way to get the coverage phase (405s, boundary values) into one run.
Settings: ``tests/schemathesis.toml``; the NDJSON serializer: ``tests/schemathesis_hooks.py``.
"""

from __future__ import annotations

import os
import selectors
import signal
import subprocess
import sys
import xml.etree.ElementTree as ET
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

TESTS = Path(__file__).resolve().parent


def _wait_line(proc: subprocess.Popen[bytes], within: float) -> str:
    assert proc.stdout is not None
    sel = selectors.DefaultSelector()
    sel.register(proc.stdout, selectors.EVENT_READ)
    try:
        if not sel.select(within):
            raise TimeoutError("relay did not announce its address")
        return proc.stdout.readline().decode().strip()
    finally:
        sel.close()


@pytest.fixture(scope="module")
def relay(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[str, Path]]:
    """A relay subprocess; yields its base URL and the path of its stderr log."""
    tmp = tmp_path_factory.mktemp("schemathesis")
    env = {
        **os.environ,
        "RELAY_TRIO_PORT": "0",
        "RELAY_TRIO_DATA_DIR": str(tmp / "data"),
        # Valid reports must be admitted (202), not rate limited, however many are generated.
        "RELAY_TRIO_RATE_PER_MINUTE": "6000000",
        "RELAY_TRIO_BURST": "100000",
        "RELAY_TRIO_MAX_BODY_BYTES": "65536",
        "RELAY_TRIO_BATCH_MAX_BYTES": "1048576",
        "RELAY_TRIO_BATCH_MAX_LINES": "50",
        "RELAY_TRIO_SHUTDOWN_TIMEOUT": "15",
        "RELAY_TRIO_SEND_TIMEOUT": "5",
    }
    stderr = tmp / "stderr.log"
    with stderr.open("wb") as err:
        proc = subprocess.Popen(
            [sys.executable, "-m", "relay_trio", "run"],
            cwd=tmp,
            env=env,
            stdout=subprocess.PIPE,
            stderr=err,
        )
    try:
        line = _wait_line(proc, 20)
        assert line.startswith("listening on http://127.0.0.1:"), line
        yield line.removeprefix("listening on "), stderr
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(20)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        if proc.stdout is not None:
            proc.stdout.close()


def test_api_conforms_to_its_openapi_document(relay: tuple[str, Path], tmp_path: Path) -> None:
    url, stderr = relay
    junit = tmp_path / "junit.xml"
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join(filter(None, [str(TESTS), os.environ.get("PYTHONPATH")])),
        "NO_COLOR": "1",
    }
    command = [
        sys.executable,
        "-m",
        "schemathesis.cli",
        "--config-file",
        str(TESTS / "schemathesis.toml"),
        "run",
        f"{url}/openapi.json",
        "--exclude-path",
        "/admin/shutdown",
        "--exclude-path",
        "/v1/events/stream",
        "--phases",
        "examples,coverage,fuzzing",
        "--report",
        "junit",
        "--report-junit-path",
        str(junit),
    ]
    done = subprocess.run(
        command, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300, check=False
    )
    output = done.stdout + done.stderr
    assert done.returncode == 0, output
    # Every documented operation was tested, but the two excluded ones and the document itself
    # (schemathesis never fuzzes the schema's own URL).
    doc = httpx.get(f"{url}/openapi.json", timeout=5).json()
    documented = {f"{m.upper()} {path}" for path, ops in doc["paths"].items() for m in ops}
    tested = {case.get("name") for case in ET.parse(junit).getroot().iter("testcase")}
    skipped = {"POST /admin/shutdown", "GET /v1/events/stream", "GET /openapi.json"}
    assert tested == documented - skipped, output
    assert "Traceback" not in stderr.read_text(errors="replace")
    # The relay is still healthy after the run.
    assert httpx.get(f"{url}/healthz", timeout=5).status_code == 200
