"""
Tests of the settings loader: `parse_config` over dicts, `load_config` over files in `tmp_path`.

Every mistake must come back as one sentence in `ConfigError.problems` that names the key, and
all mistakes of a file at once.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from trioproxy._config import (
    DEFAULT_ANTHROPIC_URL,
    Config,
    ProviderConfig,
    ServerConfig,
    load_config,
    parse_config,
)
from trioproxy._exceptions import ConfigError
from trioproxy.providers.simulated import SimulatedSettings

README_EXAMPLE = """\
[providers.local]
type = "openai"
base_url = "http://127.0.0.1:9000/v1"
api_key_env = "LOCAL_API_KEY"      # optional for local servers

[providers.claude]
type = "anthropic"
api_key_env = "ANTHROPIC_API_KEY"
"""

LOCAL_KEY = "local-secret-key-1234"
CLAUDE_KEY = "sk-ant-secret-5678"


def write(tmp_path: Path, text: str, name: str = "trioproxy.toml") -> Path:
    path = tmp_path / name
    path.write_text(text, encoding="utf-8")
    return path


def problems_of(raw: dict[str, Any], **kwargs: Any) -> list[str]:
    with pytest.raises(ConfigError) as info:
        parse_config(raw, environ={}, **kwargs)
    return info.value.problems


def only_problem(raw: dict[str, Any]) -> str:
    problems = problems_of(raw)
    assert len(problems) == 1, problems
    return problems[0]


# --------------------------------------------------------------------------------------------
# the README example


def test_readme_example_parses_as_written(tmp_path: Path) -> None:
    config = load_config(
        write(tmp_path, README_EXAMPLE),
        environ={"LOCAL_API_KEY": LOCAL_KEY, "ANTHROPIC_API_KEY": CLAUDE_KEY},
    )
    assert list(config.providers) == ["sim", "local", "claude"]
    assert config.providers["local"] == ProviderConfig(
        name="local",
        type="openai",
        base_url="http://127.0.0.1:9000/v1",
        api_key_env="LOCAL_API_KEY",
        api_key=LOCAL_KEY,
    )
    assert config.providers["claude"] == ProviderConfig(
        name="claude",
        type="anthropic",
        base_url="https://api.anthropic.com",
        api_key_env="ANTHROPIC_API_KEY",
        api_key=CLAUDE_KEY,
    )
    assert DEFAULT_ANTHROPIC_URL == "https://api.anthropic.com"
    assert config.providers["sim"] == ProviderConfig(name="sim", type="simulated")
    assert config.providers["sim"].simulated == SimulatedSettings()
    assert config.default_provider is None
    assert config.server == ServerConfig(host="127.0.0.1", port=8000)
    assert config.warnings == ()


def test_missing_env_var_is_a_warning_not_an_error(tmp_path: Path) -> None:
    config = load_config(write(tmp_path, README_EXAMPLE), environ={"ANTHROPIC_API_KEY": CLAUDE_KEY})
    assert config.providers["local"].api_key is None
    assert config.providers["local"].api_key_env == "LOCAL_API_KEY"
    assert config.providers["claude"].api_key == CLAUDE_KEY
    assert config.warnings == (
        "[providers.local]: environment variable LOCAL_API_KEY is not set; requests go without a key",
    )


def test_empty_env_var_counts_as_unset() -> None:
    config = parse_config(
        {"providers": {"local": {"type": "openai", "base_url": "http://h/v1", "api_key_env": "K"}}},
        environ={"K": ""},
    )
    assert config.providers["local"].api_key is None
    assert len(config.warnings) == 1
    assert "K is not set" in config.warnings[0]


def test_environ_defaults_to_os_environ(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("TRIOPROXY_TEST_KEY", "from-os-environ")
    config = parse_config(
        {"providers": {"local": {"type": "openai", "base_url": "http://h/v1", "api_key_env": "TRIOPROXY_TEST_KEY"}}}
    )
    assert config.providers["local"].api_key == "from-os-environ"


def test_api_key_never_in_repr(tmp_path: Path) -> None:
    config = load_config(
        write(tmp_path, README_EXAMPLE),
        environ={"LOCAL_API_KEY": LOCAL_KEY, "ANTHROPIC_API_KEY": CLAUDE_KEY},
    )
    for text in (repr(config), str(config), repr(config.providers["local"]), repr(config.providers)):
        assert LOCAL_KEY not in text
        assert CLAUDE_KEY not in text
    # the variable's name is no secret and helps debugging
    assert "LOCAL_API_KEY" in repr(config)


def test_headers_not_in_repr() -> None:
    config = parse_config(
        {"providers": {"gw": {"type": "openai", "base_url": "http://h/v1", "headers": {"X-Token": "hdr-secret"}}}},
        environ={},
    )
    assert config.providers["gw"].headers == {"X-Token": "hdr-secret"}
    assert "hdr-secret" not in repr(config)


def test_no_file_gives_defaults() -> None:
    config = load_config(None, environ={})
    assert config == Config()
    assert list(config.providers) == ["sim"]
    assert config.providers["sim"].type == "simulated"
    assert config.warnings == ()


def test_full_settings() -> None:
    config = parse_config(
        {
            "server": {"host": "0.0.0.0", "port": 0},
            "default_provider": "gw",
            "providers": {
                "gw": {
                    "type": "openai",
                    "base_url": "https://gw.example/v1/",
                    "models": ["a", "b/c"],
                    "connect_timeout": 2.5,
                    "max_connections": 10,
                    "request_usage": False,
                    "headers": {"X-Org": "acme"},
                },
                "claude": {
                    "type": "anthropic",
                    "base_url": "http://127.0.0.1:9001",
                    "anthropic_version": "2024-01-01",
                    "default_max_tokens": 512,
                },
                "fast": {"type": "simulated", "ttft_ms": 0, "token_interval_ms": 1.5, "fail_after_tokens": 3},
            },
        },
        environ={},
    )
    assert config.server == ServerConfig(host="0.0.0.0", port=0)
    assert config.default_provider == "gw"
    gw = config.providers["gw"]
    assert (gw.base_url, gw.models, gw.connect_timeout, gw.max_connections, gw.request_usage) == (
        "https://gw.example/v1/",
        ("a", "b/c"),
        2.5,
        10,
        False,
    )
    assert gw.headers == {"X-Org": "acme"}
    claude = config.providers["claude"]
    assert (claude.base_url, claude.anthropic_version, claude.default_max_tokens) == (
        "http://127.0.0.1:9001",
        "2024-01-01",
        512,
    )
    assert config.providers["fast"].simulated == SimulatedSettings(
        ttft_ms=0, token_interval_ms=1.5, fail_after_tokens=3
    )


def test_a_declared_sim_replaces_the_builtin() -> None:
    config = parse_config({"providers": {"sim": {"type": "simulated", "ttft_ms": 0}}}, environ={})
    assert list(config.providers) == ["sim"]
    assert config.providers["sim"].simulated.ttft_ms == 0


# --------------------------------------------------------------------------------------------
# one mistake, one sentence naming the key


def test_unknown_top_level_key() -> None:
    assert only_problem({"providrs": {}}) == (
        "config: unknown key 'providrs' (known: default_provider, providers, server)"
    )


def test_unknown_server_key() -> None:
    assert only_problem({"server": {"hots": "x"}}) == "[server]: unknown key 'hots' (known: host, port)"


def test_unknown_provider_key() -> None:
    problem = only_problem({"providers": {"local": {"type": "openai", "base_url": "http://h/v1", "api_kye": "x"}}})
    assert problem.startswith("[providers.local]: unknown key 'api_kye' (known: ")
    assert "api_key_env" in problem


def test_key_of_another_provider_type_is_unknown() -> None:
    problem = only_problem({"providers": {"c": {"type": "anthropic", "request_usage": True}}})
    assert problem.startswith("[providers.c]: unknown key 'request_usage'")


@pytest.mark.parametrize(
    ("table", "expected"),
    [
        (
            {"type": "openai", "base_url": "http://h/v1", "connect_timeout": "5"},
            "[providers.p].connect_timeout must be a positive number, got '5'",
        ),
        (
            {"type": "openai", "base_url": "http://h/v1", "connect_timeout": 0},
            "[providers.p].connect_timeout must be a positive number, got 0",
        ),
        (
            {"type": "openai", "base_url": "http://h/v1", "max_connections": 1.5},
            "[providers.p].max_connections must be a positive integer, got 1.5",
        ),
        (
            {"type": "openai", "base_url": "http://h/v1", "max_connections": True},
            "[providers.p].max_connections must be a positive integer, got True",
        ),
        (
            {"type": "openai", "base_url": "http://h/v1", "request_usage": "yes"},
            "[providers.p].request_usage must be true or false, got 'yes'",
        ),
        (
            {"type": "openai", "base_url": "http://h/v1", "models": "gpt"},
            "[providers.p].models must be a list of model names",
        ),
        (
            {"type": "openai", "base_url": "http://h/v1", "models": ["ok", ""]},
            "[providers.p].models must be a list of model names",
        ),
        (
            {"type": "openai", "base_url": "http://h/v1", "headers": {"X": 1}},
            "[providers.p].headers must be a table of strings",
        ),
        (
            {"type": "openai", "base_url": "http://h/v1", "api_key_env": 5},
            "[providers.p].api_key_env must be the name of an environment variable, got 5",
        ),
        (
            {"type": "anthropic", "default_max_tokens": -1},
            "[providers.p].default_max_tokens must be a positive integer, got -1",
        ),
        ({"type": "anthropic", "anthropic_version": 2023}, "[providers.p].anthropic_version must be a string"),
        ({"type": "gemini"}, "[providers.p].type must be one of 'openai', 'anthropic', 'simulated', got 'gemini'"),
        ({}, "[providers.p].type must be one of 'openai', 'anthropic', 'simulated', got None"),
    ],
)
def test_bad_type(table: dict[str, Any], expected: str) -> None:
    assert only_problem({"providers": {"p": table}}) == expected


def test_openai_without_base_url() -> None:
    assert only_problem({"providers": {"local": {"type": "openai"}}}) == (
        "[providers.local].base_url is required for an openai provider (e.g. 'http://127.0.0.1:9000/v1')"
    )


@pytest.mark.parametrize("url", ["127.0.0.1:9000/v1", "ftp://h/v1", "http:///v1", "", 9000])
def test_bad_url(url: Any) -> None:
    assert only_problem({"providers": {"local": {"type": "openai", "base_url": url}}}) == (
        f"[providers.local].base_url must be an http:// or https:// URL, got {url!r}"
    )


def test_bad_anthropic_url() -> None:
    assert only_problem({"providers": {"c": {"type": "anthropic", "base_url": "api.anthropic.com"}}}) == (
        "[providers.c].base_url must be an http:// or https:// URL, got 'api.anthropic.com'"
    )


@pytest.mark.parametrize("port", [-1, 65536, "8000", 8000.0, True])
def test_bad_port(port: Any) -> None:
    assert only_problem({"server": {"port": port}}) == (
        f"[server].port must be an integer from 0 to 65535, got {port!r}"
    )


@pytest.mark.parametrize("host", ["", 127])
def test_bad_host(host: Any) -> None:
    assert only_problem({"server": {"host": host}}) == f"[server].host must be a non-empty string, got {host!r}"


def test_server_not_a_table() -> None:
    assert only_problem({"server": 8000}) == "[server] must be a table"


def test_providers_not_a_table() -> None:
    assert only_problem({"providers": ["local"]}) == "[providers] must be a table of provider tables"


def test_provider_not_a_table() -> None:
    assert only_problem({"providers": {"local": "openai"}}) == "[providers.local] must be a table"


def test_bad_provider_name() -> None:
    assert only_problem({"providers": {"my local": {"type": "simulated"}}}) == (
        "[providers.my local]: a provider name may hold only letters, digits, '_', '-' and '.'"
    )


@pytest.mark.parametrize(
    ("setting", "expected"),
    [
        ({"ttft_ms": "fast"}, "[providers.s].ttft_ms: expected int or float, got 'fast'"),
        ({"ttft_ms": -5}, "[providers.s].ttft_ms: must not be negative, got -5"),
        ({"lorem_tokens": 2.5}, "[providers.s].lorem_tokens: expected int, got 2.5"),
        ({"lorem_tokens": True}, "[providers.s].lorem_tokens: expected int, got True"),
        ({"fail_before_first_token": 1}, "[providers.s].fail_before_first_token: expected bool, got 1"),
        ({"stall_after_tokens": -1}, "[providers.s].stall_after_tokens: must not be negative, got -1"),
    ],
)
def test_bad_simulated_setting(setting: dict[str, Any], expected: str) -> None:
    assert only_problem({"providers": {"s": {"type": "simulated", **setting}}}) == expected


def test_unknown_simulated_setting() -> None:
    problem = only_problem({"providers": {"s": {"type": "simulated", "ttft": 5}}})
    assert problem.startswith("[providers.s]: unknown key 'ttft' (known: ")
    assert "ttft_ms" in problem


def test_default_provider_naming_no_provider() -> None:
    assert only_problem({"default_provider": "nope"}) == "default_provider = 'nope' names no provider (declared: sim)"


@pytest.mark.parametrize("value", [["sim"], 1, {"name": "sim"}])
def test_default_provider_not_a_string(value: Any) -> None:
    assert only_problem({"default_provider": value}) == (
        f"default_provider must be a provider name (a string), got {value!r}"
    )


def test_default_provider_naming_a_broken_provider_reports_only_the_provider() -> None:
    # The provider is declared; what is wrong is its table, not `default_provider`.
    assert only_problem({"default_provider": "local", "providers": {"local": {"type": "openai"}}}) == (
        "[providers.local].base_url is required for an openai provider (e.g. 'http://127.0.0.1:9000/v1')"
    )


def test_several_mistakes_reported_at_once() -> None:
    problems = problems_of(
        {
            "sever": {},
            "server": {"port": 70000},
            "default_provider": "nope",
            "providers": {
                "local": {"type": "openai", "base_url": "localhost:9000", "timeout": 3},
                "claude": {"type": "anthropic", "default_max_tokens": 0},
                "s": {"type": "simulated", "ttft_ms": "x"},
            },
        }
    )
    assert problems == [
        "config: unknown key 'sever' (known: default_provider, providers, server)",
        "[server].port must be an integer from 0 to 65535, got 70000",
        problems[2],  # the unknown-key sentence lists every known key; checked below
        "[providers.local].base_url must be an http:// or https:// URL, got 'localhost:9000'",
        "[providers.claude].default_max_tokens must be a positive integer, got 0",
        "[providers.s].ttft_ms: expected int or float, got 'x'",
        "default_provider = 'nope' names no provider (declared: claude, local, s, sim)",
    ]
    assert problems[2].startswith("[providers.local]: unknown key 'timeout' (known: ")


def test_config_error_message_lists_every_problem() -> None:
    with pytest.raises(ConfigError) as info:
        parse_config({"x": 1, "y": 2}, environ={})
    error = info.value
    assert error.problems == [
        "config: unknown key 'x' (known: default_provider, providers, server)",
        "config: unknown key 'y' (known: default_provider, providers, server)",
    ]
    assert str(error) == "invalid configuration:\n" + "\n".join(f"  - {p}" for p in error.problems)


# --------------------------------------------------------------------------------------------
# files


def test_unreadable_file(tmp_path: Path) -> None:
    missing = tmp_path / "missing.toml"
    with pytest.raises(ConfigError) as info:
        load_config(missing, environ={})
    assert info.value.problems == [f"cannot read config file {str(missing)!r}: No such file or directory"]


def test_directory_is_unreadable(tmp_path: Path) -> None:
    with pytest.raises(ConfigError) as info:
        load_config(tmp_path, environ={})
    assert info.value.problems == [f"cannot read config file {str(tmp_path)!r}: Is a directory"]


def test_file_not_utf8(tmp_path: Path) -> None:
    path = tmp_path / "latin1.toml"
    path.write_bytes(b'[server]\nhost = "caf\xe9"\n')
    with pytest.raises(ConfigError) as info:
        load_config(path, environ={})
    assert info.value.problems == [f"{path}: not valid UTF-8 text: invalid continuation byte at byte 20"]


def test_invalid_toml(tmp_path: Path) -> None:
    path = write(tmp_path, '[providers.local]\ntype = "openai\n')
    with pytest.raises(ConfigError) as info:
        load_config(path, environ={})
    [problem] = info.value.problems
    assert problem.startswith(f"{path}: not valid TOML: ")
    assert "line 2" in problem


def test_file_mistakes_reported_like_dict_mistakes(tmp_path: Path) -> None:
    path = write(tmp_path, '[providers.local]\ntype = "openai"\n\n[server]\nport = "80"\n')
    with pytest.raises(ConfigError) as info:
        load_config(str(path), environ={})
    assert info.value.problems == [
        "[server].port must be an integer from 0 to 65535, got '80'",
        "[providers.local].base_url is required for an openai provider (e.g. 'http://127.0.0.1:9000/v1')",
    ]
