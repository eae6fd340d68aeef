"""Configuration precedence (flag > env > file > default) and one-line errors."""

from __future__ import annotations

from pathlib import Path

import pytest
from click.testing import CliRunner

from relay_trio._cli import main
from relay_trio._config import ConfigError, RelayConfig, load_config


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


def test_shutdown_budget_must_contain_the_drain_it_waits_on() -> None:
    # 3 upstreams flushed one after another: 10 s in-flight + 3 x 10 s flush > 0.8 x 30 s.
    flags = {"upstreams": "http://a,http://b,http://c"}
    try:
        load_config(flags, {}, None)
    except ConfigError as exc:
        assert exc.setting == "shutdown_timeout"
        assert "send_timeout (10.0s)" in str(exc) and "sequential" in str(exc) and "40s" in str(exc)
    else:
        raise AssertionError("an impossible shutdown budget was accepted")
    assert (
        load_config({**flags, "shutdown_flush": "parallel"}, {}, None).drain_budget_needed() == 20
    )
    assert load_config({**flags, "shutdown_timeout": "51"}, {}, None).drain_budget >= 40


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
