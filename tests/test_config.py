"""Configuration precedence (flag > env > file > default) and one-line errors."""

from __future__ import annotations

from pathlib import Path

import pytest
from click.testing import CliRunner

from relay_trio.cli import main
from relay_trio.core.config import ConfigError, RelayConfig, load_config


def test_defaults_match_the_design() -> None:
    c = load_config({}, {}, None)
    assert (c.host, c.port, c.rate_per_minute, c.burst) == ("127.0.0.1", 8080, 1.0, 1)
    assert c.effective_eviction_interval == 7200.0
    assert c.effective_upstreams[0].startswith("file://") and c.effective_upstreams[0].endswith(
        "upstream.jsonl"
    )
    assert (c.ack_timeout, c.retry_base, c.retry_cap, c.max_attempts) == (30.0, 30.0, 600.0, 10)
    assert (c.event_ring_size, c.event_ring_bytes, c.subscriber_buffer) == (
        10_000,
        64 * 1024 * 1024,
        1000,
    )


def test_precedence_flag_over_env_over_file(tmp_path: Path) -> None:
    toml = tmp_path / "relay.toml"
    toml.write_text(
        'port = 1111\nburst = 4\nrate_per_minute = 2.5\nupstreams = ["http://a", "http://b"]\n'
        'shutdown_flush = "parallel"\n'
    )
    env = {"RELAY_TRIO_PORT": "2222", "RELAY_TRIO_UPSTREAMS": "http://c, http://d"}
    c = load_config({"port": "3333"}, env, toml)
    assert c.port == 3333
    assert c.upstreams == ("http://c", "http://d")
    assert (c.burst, c.rate_per_minute) == (4, 2.5)
    assert load_config({}, env, toml).port == 2222
    assert load_config({}, {}, toml).port == 1111


def test_shutdown_budget_grows_to_hold_the_drain_when_the_user_did_not_set_it() -> None:
    # 3 upstreams flushed one after another: 10 s in-flight + 3 x 10 s flush = 40 s of
    # drain, more than 0.8 x 30 s: the unset shutdown_timeout grows to fit (40 / 0.8 + 1).
    flags = {"upstreams": "http://a,http://b,http://c"}
    c = load_config(flags, {}, None)
    assert (c.shutdown_timeout, c.send_timeout, c.write_timeout) == (51.0, 10.0, 10.0)
    assert c.drain_budget >= c.drain_budget_needed() == 40
    assert (
        load_config({**flags, "shutdown_flush": "parallel"}, {}, None).drain_budget_needed() == 20
    )
    # A long write deadline the user chose: the shutdown budget holds 1.25 x it.
    assert load_config({"write_timeout": "60"}, {}, None).shutdown_timeout == 76.0
    # Nothing set: the documented defaults, unchanged.
    d = load_config({}, {}, None)
    assert (d.shutdown_timeout, d.send_timeout, d.write_timeout) == (30.0, 10.0, 10.0)


def test_only_shutdown_timeout_set_derives_write_and_send_timeouts_that_fit() -> None:
    c = load_config({"shutdown_timeout": "5"}, {}, None)
    # write: half the budget; send: the 4 s drain over in-flight + 1 sequential round.
    assert (c.shutdown_timeout, c.write_timeout, c.send_timeout) == (5.0, 2.5, 2.0)
    assert c.explicit == {"shutdown_timeout"}
    three = load_config({"shutdown_timeout": "5", "upstreams": "http://a,http://b,http://c"})
    assert three.send_timeout == 1.0 and three.drain_budget >= three.drain_budget_needed()
    # A value the user set is kept even when the other one is derived.
    kept = load_config({"shutdown_timeout": "5", "send_timeout": "1.5"}, {}, None)
    assert (kept.send_timeout, kept.write_timeout) == (1.5, 2.5)


@pytest.mark.parametrize(
    ("flags", "other", "fragment"),
    [
        ({"shutdown_timeout": "5", "write_timeout": "10"}, "write_timeout", "must exceed"),
        ({"shutdown_timeout": "5", "send_timeout": "3"}, "send_timeout", "needs 6s"),
    ],
)
def test_both_set_and_incompatible_is_one_line_naming_both(
    flags: dict[str, str], other: str, fragment: str
) -> None:
    with pytest.raises(ConfigError) as info:
        load_config(flags, {}, None)
    line = str(info.value)
    assert info.value.settings == ("shutdown_timeout", other)
    assert line.startswith(f"invalid settings shutdown_timeout and {other}: ")
    assert fragment in line and "\n" not in line


def test_cli_run_check_accepts_only_shutdown_timeout(tmp_path: Path) -> None:
    ok = CliRunner().invoke(main, ["config", "--check", "--shutdown-timeout", "5"])
    assert ok.exit_code == 0, ok.output
    bad = CliRunner().invoke(
        main, ["config", "--check", "--shutdown-timeout", "5", "--write-timeout", "10"]
    )
    assert bad.exit_code == 2
    assert bad.output.strip().splitlines() == [
        "relay-trio: invalid settings shutdown_timeout and write_timeout: shutdown_timeout (5s) "
        "must exceed write_timeout (10s): a write to a client that stopped reading is only cut "
        "at its write deadline"
    ]


def test_token_from_file_and_never_in_summary(tmp_path: Path) -> None:
    secret = tmp_path / "tok"
    secret.write_text("s3cret\n")
    c = load_config({"admin_token": f"@{secret}"}, {}, None)
    assert c.admin_token == "s3cret"
    assert c.summary()["admin_token"] == "set" and "s3cret" not in str(c.summary())


@pytest.mark.parametrize(
    ("flags", "setting"),
    [
        ({"port": "99999"}, "port"),
        ({"port": "eighty"}, "port"),
        ({"burst": "0"}, "burst"),
        ({"rate_per_minute": "-1"}, "rate_per_minute"),
        ({"shutdown_flush": "sometimes"}, "shutdown_flush"),
        ({"upstreams": "ftp://x"}, "upstreams"),
        ({"shutdown_timeout": "5", "send_timeout": "10"}, "shutdown_timeout"),
        ({"shutdown_timeout": "8", "send_timeout": "2", "write_timeout": "9"}, "shutdown_timeout"),
        ({"retry_cap": "1", "retry_base": "30"}, "retry_cap"),
        ({"dry_run": "perhaps"}, "dry_run"),
        ({"nonsense": "1"}, "nonsense"),
        ({"ack_timeout": "nan"}, "ack_timeout"),
    ],
)
def test_invalid_values_name_the_setting(flags: dict[str, str], setting: str) -> None:
    with pytest.raises(ConfigError) as info:
        load_config(flags, {}, None)
    assert info.value.setting == setting
    assert "\n" not in str(info.value) and setting in str(info.value)


def test_cli_reports_bad_config_in_one_line_with_exit_2() -> None:
    result = CliRunner().invoke(main, ["run", "--port", "nope"])
    assert result.exit_code == 2
    assert result.output.strip().splitlines() == [
        "relay-trio: invalid setting port: invalid literal for int() with base 10: 'nope'"
    ]


def test_cli_config_shows_effective_values_from_env() -> None:
    result = CliRunner().invoke(main, ["config", "--burst", "3"], env={"RELAY_TRIO_PORT": "9090"})
    assert result.exit_code == 0, result.output
    assert '"port": 9090' in result.output and '"burst": 3' in result.output


def test_every_field_has_help_text() -> None:
    import attrs

    assert all(f.metadata["help"] for f in attrs.fields(RelayConfig))


def test_help_shows_numeric_options_as_integer_and_float() -> None:
    result = CliRunner().invoke(main, ["run", "--help"], terminal_width=200)
    assert result.exit_code == 0
    lines = {
        line.split()[0]: line.split()[1] for line in result.output.splitlines() if "  --" in line
    }
    assert lines["--port"] == "INTEGER" and lines["--max-subscribers-per-topic"] == "INTEGER"
    assert lines["--shutdown-timeout"] == "FLOAT" and lines["--eviction-interval"] == "FLOAT"
    assert lines["--host"] == "TEXT" and lines["--log-format"] == "TEXT"


def test_config_check_exits_0_or_2_with_one_line(tmp_path: Path) -> None:
    good = tmp_path / "good.toml"
    good.write_text('shutdown_timeout = 5\nlog_format = "json"\nupstreams = ["http://a"]\n')
    ok = CliRunner().invoke(main, ["config", "--check", "--config", str(good)])
    assert (ok.exit_code, ok.output) == (0, f"relay-trio: configuration OK ({good})\n")
    cases = {
        "bad_value.toml": ("burst = 0\n", "relay-trio: invalid setting burst: must be >= 1"),
        "unknown.toml": ("colour = 1\n", "relay-trio: invalid setting colour: unknown setting"),
        "not_toml.toml": ("port = \n", "relay-trio: invalid setting config: "),
        "budget.toml": (
            "shutdown_timeout = 5\nsend_timeout = 4\n",
            "relay-trio: invalid settings shutdown_timeout and send_timeout: ",
        ),
    }
    for name, (text, start) in cases.items():
        path = tmp_path / name
        path.write_text(text)
        bad = CliRunner().invoke(main, ["config", "--check", "--config", str(path)])
        assert bad.exit_code == 2, name
        assert len(bad.output.splitlines()) == 1 and bad.output.startswith(start), bad.output
    missing = CliRunner().invoke(main, ["config", "--check", "--config", str(tmp_path / "no")])
    assert missing.exit_code == 2 and "cannot read" in missing.output
