"""
Tests of the settings loader: `parse_config` over dicts, `load_config` over files in `tmp_path`.

Every mistake must come back as one sentence in `ConfigError.problems` that names the key, and
all mistakes of a file at once.
"""

from __future__ import annotations

import importlib
import sys
from collections.abc import Iterator
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest

from trioproxy._config import (
    DEFAULT_ANTHROPIC_URL,
    Config,
    CorsConfig,
    LimitsConfig,
    ModelRoute,
    ProviderConfig,
    ServerConfig,
    TracingConfig,
    load_config,
    parse_config,
)
from trioproxy._exceptions import ConfigError
from trioproxy._policy import BufferConfig, RetryConfig, StreamsConfig, Timeouts
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
TOP_LEVEL_KEYS = (
    "auth, breaker, buffer, builtin_sim, cors, default_provider, limits, logging, models, providers, redis, retry, "
    "server, streams, timeouts, tracing"
)


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
        continuation="prefill",  # Anthropic's default
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


def test_builtin_sim_false_leaves_it_out() -> None:
    raw = {"builtin_sim": False, "providers": {"local": {"type": "openai", "base_url": "http://127.0.0.1:9/v1"}}}
    assert list(parse_config(raw, environ={}).providers) == ["local"]
    declared = parse_config({"builtin_sim": False, "providers": {"sim": {"type": "simulated"}}}, environ={})
    assert list(declared.providers) == ["sim"]


def test_builtin_sim_false_and_no_provider_is_a_mistake() -> None:
    assert only_problem({"builtin_sim": False}) == (
        "no provider is declared: add a [providers.NAME] table (builtin_sim = false leaves out 'sim')"
    )


def test_builtin_sim_must_be_a_boolean() -> None:
    assert only_problem({"builtin_sim": "no"}) == "builtin_sim must be true or false, got 'no'"


def test_default_provider_cannot_name_a_left_out_sim() -> None:
    raw = {"builtin_sim": False, "default_provider": "sim", "providers": {"s": {"type": "simulated"}}}
    assert only_problem(raw) == "default_provider = 'sim' names no provider (declared: s)"


def test_the_sims_output_cap_is_configured() -> None:
    config = parse_config({"providers": {"sim": {"type": "simulated", "max_output_tokens": 100}}}, environ={})
    assert config.providers["sim"].simulated.max_output_tokens == 100
    assert only_problem({"providers": {"s": {"type": "simulated", "max_output_tokens": 10, "lorem_tokens": 11}}}) == (
        "[providers.s].lorem_tokens: 11 is more than max_output_tokens (10)"
    )


# --------------------------------------------------------------------------------------------
# one mistake, one sentence naming the key


def test_unknown_top_level_key() -> None:
    assert only_problem({"providrs": {}}) == (f"config: unknown key 'providrs' (known: {TOP_LEVEL_KEYS})")


def test_unknown_server_key() -> None:
    assert only_problem({"server": {"hots": "x"}}) == (
        "[server]: unknown key 'hots' (known: body_timeout, host, keep_alive_timeout, port, shutdown_grace_period, "
        "workers, write_timeout)"
    )


def test_unknown_provider_key() -> None:
    problem = only_problem({"providers": {"local": {"type": "openai", "base_url": "http://h/v1", "api_kye": "x"}}})
    assert problem.startswith("[providers.local]: unknown key 'api_kye' (known: ")
    assert "api_key_env" in problem


def test_drop_params() -> None:
    config = parse_config(
        {
            "providers": {
                "claude": {"type": "anthropic", "drop_params": ["seed", "logit_bias"]},
                "resp": {"type": "openai_responses", "base_url": "http://h/v1", "drop_params": True},
                "vllm": {"type": "openai", "base_url": "http://h/v1", "drop_params": ["top_logprobs"]},
                "strict": {"type": "anthropic"},
            }
        },
        environ={},
    )
    drops = {name: provider.drop_params for name, provider in config.providers.items() if name != "sim"}
    assert drops == {
        "claude": frozenset({"seed", "logit_bias"}),
        "resp": True,
        "vllm": frozenset({"top_logprobs"}),
        "strict": False,
    }
    problem = only_problem({"providers": {"s": {"type": "simulated", "drop_params": True}}})
    assert problem.startswith("[providers.s]: unknown key 'drop_params'")


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
            {"type": "anthropic", "skip_malformed_events": 1},
            "[providers.p].skip_malformed_events must be true or false, got 1",
        ),
        (
            {"type": "openai", "base_url": "http://h/v1", "models": "gpt"},
            "[providers.p].models must be a list of model names, got 'gpt'",
        ),
        (
            {"type": "openai", "base_url": "http://h/v1", "models": ["ok", ""]},
            "[providers.p].models[1] = '' is not a model name",
        ),
        (
            {"type": "openai", "base_url": "http://h/v1", "headers": {"X": 1}},
            "[providers.p].headers.X must be a string, got 1",
        ),
        (
            {"type": "openai", "base_url": "http://h/v1", "headers": ["X: 1"]},
            "[providers.p].headers must be a table of strings, got ['X: 1']",
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
        (
            {"type": "anthropic", "drop_params": "seed"},
            "[providers.p].drop_params must be true, false or a list of field names (e.g. ['seed', 'logit_bias']), "
            "got 'seed'",
        ),
        (
            {"type": "openai_responses", "base_url": "http://h/v1", "drop_params": ["seed", 3]},
            "[providers.p].drop_params must be true, false or a list of field names (e.g. ['seed', 'logit_bias']), "
            "got ['seed', 3]",
        ),
        (
            {"type": "gemini"},
            "[providers.p].type 'gemini' is unknown: say which protocol the upstream speaks, "
            "one of 'openai', 'openai_responses', 'anthropic', 'simulated'",
        ),
        (
            {},
            "[providers.p].type is missing: say which protocol the upstream speaks, "
            "one of 'openai', 'openai_responses', 'anthropic', 'simulated'",
        ),
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


@pytest.mark.parametrize("workers", [0, 257, "2", 2.0, True])
def test_bad_workers(workers: Any) -> None:
    assert only_problem({"server": {"workers": workers}}) == (
        f"[server].workers must be an integer from 1 to 256, got {workers!r}"
    )


def test_workers_default_to_one() -> None:
    assert parse_config({}).server.workers == 1
    assert parse_config({"server": {"workers": 4}}).server.workers == 4


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


@pytest.mark.parametrize(
    ("key", "value"),
    [
        ("base_url", "http://127.0.0.1:9000/v1"),
        ("base_urls", ["http://127.0.0.1:9000/v1"]),
        ("targets", [{"base_url": "http://127.0.0.1:9000/v1"}]),
        ("breaker", {"failures": 3}),
        ("api_key_env", "SIM_KEY"),
        ("headers", {"x-team": "a"}),
        ("connect_timeout", 5),
        ("max_connections", 10),
        ("skip_malformed_events", True),
    ],
)
def test_a_key_that_does_nothing_for_a_simulated_provider_is_refused(key: str, value: object) -> None:
    assert only_problem({"providers": {"s": {"type": "simulated", key: value}}}) == (
        f"[providers.s]: {key!r} does nothing for a simulated provider (it plays a script: no upstream, no connection)"
    )


def test_every_mistake_of_a_simulated_provider_is_reported_together() -> None:
    problems = problems_of({"providers": {"s": {"type": "simulated", "headers": 5, "ttft": 1, "base_url": "x"}}})
    assert [problem.split(" (")[0] for problem in problems] == [
        "[providers.s]: 'headers' does nothing for a simulated provider",
        "[providers.s]: unknown key 'ttft'",
        "[providers.s]: 'base_url' does nothing for a simulated provider",
    ]
    assert "base_url" not in problems[1]  # not among the keys it knows


def test_default_provider_naming_no_provider() -> None:
    assert only_problem({"default_provider": "nope"}) == "default_provider = 'nope' names no provider (declared: sim)"


@pytest.mark.parametrize("value", [["sim"], 1, {"name": "sim"}])
def test_default_provider_not_a_string(value: Any) -> None:
    assert only_problem({"default_provider": value}) == (
        f"default_provider must be a provider name (a string), got {value!r}"
    )


def test_models_table() -> None:
    config = parse_config(
        {"models": {"claude-haiku-4-5": "sim/echo", "claude-*": "sim", "fast": "sim/lorem"}}, environ={}
    )
    assert config.models == (
        ModelRoute("claude-haiku-4-5", "sim", "echo"),
        ModelRoute("claude-*", "sim", None),
        ModelRoute("fast", "sim", "lorem"),
    )
    assert [route.is_pattern for route in config.models] == [False, True, False]


@pytest.mark.parametrize(
    ("raw", "expected"),
    [
        (
            {"models": ["a"]},
            "[models] must be a table of model names (or patterns like 'claude-*') to 'provider' or 'provider/model'",
        ),
        ({"models": {"a": 1}}, "[models].'a' must be 'provider' or 'provider/model', got 1"),
        ({"models": {"a": "nope/x"}}, "[models].'a' = 'nope/x' names no provider (declared: sim)"),
        ({"models": {"a": "sim/"}}, "[models].'a' = 'sim/' names no model after 'sim/'"),
        ({"models": {"": "sim"}}, "[models]: a model name must not be empty"),
    ],
)
def test_bad_models(raw: dict[str, Any], expected: str) -> None:
    assert only_problem(raw) == expected


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
        f"config: unknown key 'sever' (known: {TOP_LEVEL_KEYS})",
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
        f"config: unknown key 'x' (known: {TOP_LEVEL_KEYS})",
        f"config: unknown key 'y' (known: {TOP_LEVEL_KEYS})",
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


# --------------------------------------------------------------------------------------------
# timeouts, retries, buffering: global tables and per-provider overrides

OPENAI = {"type": "openai", "base_url": "http://h/v1"}
TIMEOUT_KEYS = "connect_timeout, first_token_timeout, silence_timeout, total_timeout, heartbeat_interval, hedge_after"
RETRY_KEYS = (
    "max_retries, base_delay_ms, max_delay_ms, exponential_base, jitter, retry_on, max_hedges, max_continuations, "
    "continuation_cooldown"
)
BUFFER_KEYS = "min_chunk_size, max_chunk_size, flush_interval_ms, buffer_by_word, buffer_by_sentence"


def test_policies_default_without_tables() -> None:
    config = parse_config({"providers": {"p": OPENAI}}, environ={})
    for provider in config.providers.values():
        assert provider.timeouts == Timeouts()
        assert provider.retry == RetryConfig()
        assert provider.buffer == BufferConfig()
        assert provider.buffer.enabled is False
        assert provider.connect_timeout == 10.0
        assert (provider.fallbacks, provider.transforms, provider.validators) == ((), (), ())


def test_global_tables_apply_to_every_provider_including_sim() -> None:
    config = parse_config(
        {
            "timeouts": {"connect_timeout": 3, "silence_timeout": 5.5, "heartbeat_interval": 0},
            "retry": {"max_retries": 0, "jitter": 0},
            "buffer": {"buffer_by_word": True, "flush_interval_ms": 40},
            "providers": {
                "p": OPENAI,
                "c": {"type": "anthropic"},
                "s": {"type": "simulated", "ttft_ms": 0},
            },
        },
        environ={},
    )
    assert list(config.providers) == ["sim", "p", "c", "s"]
    for provider in config.providers.values():
        assert provider.timeouts == Timeouts(connect_timeout=3, silence_timeout=5.5, heartbeat_interval=0)
        assert provider.connect_timeout == 3
        assert provider.retry == RetryConfig(max_retries=0, jitter=0)
        assert provider.buffer == BufferConfig(buffer_by_word=True, flush_interval_ms=40)
        assert provider.buffer.enabled is True


def test_global_tables_apply_to_a_declared_sim() -> None:
    config = parse_config(
        {"timeouts": {"first_token_timeout": 7}, "providers": {"sim": {"type": "simulated"}}}, environ={}
    )
    assert config.providers["sim"].timeouts == Timeouts(first_token_timeout=7)


def test_provider_keys_override_the_globals() -> None:
    config = parse_config(
        {
            "timeouts": {"first_token_timeout": 30, "silence_timeout": 5, "connect_timeout": 4},
            "retry": {"max_retries": 5, "base_delay_ms": 100},
            "buffer": {"flush_interval_ms": 100, "min_chunk_size": 8},
            "providers": {
                "p": {
                    **OPENAI,
                    "silence_timeout": 1,
                    "heartbeat_interval": 2.5,
                    "total_timeout": 60,
                    "connect_timeout": 0.5,
                    "retry": {"max_retries": 1},
                    "buffer": {"buffer_by_sentence": True, "min_chunk_size": 0},
                },
                "q": OPENAI,
            },
        },
        environ={},
    )
    p, q = config.providers["p"], config.providers["q"]
    # a provider key replaces that key only: the others still come from the global table
    assert p.timeouts == Timeouts(
        connect_timeout=0.5, first_token_timeout=30, silence_timeout=1, total_timeout=60, heartbeat_interval=2.5
    )
    assert p.connect_timeout == 0.5
    assert p.retry == RetryConfig(max_retries=1, base_delay_ms=100)
    assert p.buffer == BufferConfig(flush_interval_ms=100, buffer_by_sentence=True)
    # a provider without overrides keeps the globals
    assert q.timeouts == Timeouts(first_token_timeout=30, silence_timeout=5, connect_timeout=4)
    assert q.retry == RetryConfig(max_retries=5, base_delay_ms=100)
    assert q.buffer == BufferConfig(flush_interval_ms=100, min_chunk_size=8)
    assert config.providers["sim"].timeouts == q.timeouts


@pytest.mark.parametrize(
    ("raw", "expected"),
    [
        ({"timeouts": {"silence_timeout": -1}}, "[timeouts].silence_timeout must not be negative, got -1"),
        ({"timeouts": {"total_timeout": "20m"}}, "[timeouts].total_timeout must be a number, got '20m'"),
        ({"timeouts": {"heartbeat_interval": True}}, "[timeouts].heartbeat_interval must be a number, got True"),
        ({"timeouts": {"connect_timeout": 0}}, "[timeouts].connect_timeout must be a positive number"),
        ({"timeouts": {"x": 1}}, f"[timeouts]: unknown key 'x' (known: {TIMEOUT_KEYS})"),
        ({"timeouts": 30}, "[timeouts] must be a table/object, got 30"),
        ({"retry": {"max_retries": 1.5}}, "[retry].max_retries must be an integer, got 1.5"),
        ({"retry": {"max_retries": -1}}, "[retry].max_retries must not be negative, got -1"),
        ({"retry": {"jitter": 1.5}}, "[retry].jitter must be between 0 and 1, got 1.5"),
        ({"retry": {"exponential_base": 0.5}}, "[retry].exponential_base must be at least 1, got 0.5"),
        ({"retry": {"retries": 3}}, f"[retry]: unknown key 'retries' (known: {RETRY_KEYS})"),
        ({"retry": [1]}, "[retry] must be a table/object, got [1]"),
        ({"buffer": {"buffer_by_word": "yes"}}, "[buffer].buffer_by_word must be a boolean, got 'yes'"),
        ({"buffer": {"max_chunk_size": 2.5}}, "[buffer].max_chunk_size must be an integer, got 2.5"),
        (
            {"buffer": {"min_chunk_size": 10, "max_chunk_size": 5}},
            "[buffer]: min_chunk_size (10) is larger than max_chunk_size (5)",
        ),
        ({"buffer": {"by_word": True}}, f"[buffer]: unknown key 'by_word' (known: {BUFFER_KEYS})"),
    ],
)
def test_bad_global_policy(raw: dict[str, Any], expected: str) -> None:
    # one sentence, not one per provider
    assert only_problem({**raw, "providers": {"p": OPENAI, "c": {"type": "anthropic"}}}) == expected


@pytest.mark.parametrize(
    ("keys", "expected"),
    [
        ({"first_token_timeout": -1}, "[providers.p].first_token_timeout must not be negative, got -1"),
        ({"silence_timeout": "5"}, "[providers.p].silence_timeout must be a number, got '5'"),
        ({"total_timeout": None}, "[providers.p].total_timeout must be a number, got None"),
        ({"heartbeat_interval": False}, "[providers.p].heartbeat_interval must be a number, got False"),
        ({"connect_timeout": -2}, "[providers.p].connect_timeout must be a positive number, got -2"),
        ({"retry": {"max_retries": 2.0}}, "[providers.p].retry.max_retries must be an integer, got 2.0"),
        ({"retry": {"base_delay_ms": -5}}, "[providers.p].retry.base_delay_ms must not be negative, got -5"),
        ({"retry": {"jitter": 2}}, "[providers.p].retry.jitter must be between 0 and 1, got 2"),
        ({"retry": {"tries": 3}}, f"[providers.p].retry: unknown key 'tries' (known: {RETRY_KEYS})"),
        ({"retry": 3}, "[providers.p].retry must be a table/object, got 3"),
        ({"buffer": {"min_chunk_size": -1}}, "[providers.p].buffer.min_chunk_size must not be negative, got -1"),
        ({"buffer": {"flush_interval_ms": "1s"}}, "[providers.p].buffer.flush_interval_ms must be a number, got '1s'"),
        ({"buffer": {"buffer_by_sentence": 1}}, "[providers.p].buffer.buffer_by_sentence must be a boolean, got 1"),
        (
            {"buffer": {"min_chunk_size": 10, "max_chunk_size": 5}},
            "[providers.p].buffer: min_chunk_size (10) is larger than max_chunk_size (5)",
        ),
        ({"buffer": {"size": 5}}, f"[providers.p].buffer: unknown key 'size' (known: {BUFFER_KEYS})"),
        ({"buffer": "word"}, "[providers.p].buffer must be a table/object, got 'word'"),
    ],
)
def test_bad_provider_policy(keys: dict[str, Any], expected: str) -> None:
    assert only_problem({"providers": {"p": {**OPENAI, **keys}}}) == expected


def test_provider_max_chunk_size_below_the_global_minimum() -> None:
    assert only_problem(
        {"buffer": {"min_chunk_size": 50}, "providers": {"p": {**OPENAI, "buffer": {"max_chunk_size": 10}}}}
    ) == ("[providers.p].buffer: min_chunk_size (50) is larger than max_chunk_size (10)")


def test_nan_in_a_toml_file(tmp_path: Path) -> None:
    path = write(
        tmp_path, "[timeouts]\nsilence_timeout = nan\n\n[providers.p]\ntype = 'simulated'\nretry = { jitter = nan }\n"
    )
    with pytest.raises(ConfigError) as info:
        load_config(path, environ={})
    assert info.value.problems == [
        "[timeouts].silence_timeout must be a number, got nan",
        "[providers.p].retry.jitter must be a number, got nan",
    ]


# --------------------------------------------------------------------------------------------
# fallbacks


def test_fallbacks() -> None:
    config = parse_config({"providers": {"p": {**OPENAI, "fallbacks": ["q/big", "sim/echo"]}, "q": OPENAI}}, environ={})
    assert config.providers["p"].fallbacks == ("q/big", "sim/echo")
    assert config.providers["q"].fallbacks == ()


def test_continuation_per_model_by_patterns_in_order() -> None:
    table = {"type": "anthropic", "continuation": {"claude-opus-4-6*": "none", "*": "prefill"}}
    provider = parse_config({"providers": {"c": table}}, environ={}).providers["c"]
    assert provider.continuation_for("claude-opus-4-6-20260101") == "none"
    assert provider.continuation_for("claude-sonnet-4-5") == "prefill"
    assert only_problem({"providers": {"p": {**OPENAI, "continuation": {"qwen*": "prefill"}}}}) == (
        "[providers.p].continuation.'qwen*' must be one of 'none', 'continue_final_message', got 'prefill'"
    )


def test_a_model_no_continuation_pattern_matches_continues_as_its_type_does() -> None:
    table = {"type": "anthropic", "continuation": {"claude-opus-4-6*": "none"}}
    provider = parse_config({"providers": {"c": table}}, environ={}).providers["c"]
    assert provider.continuation_for("claude-opus-4-6-20260101") == "none"
    assert provider.continuation_for("claude-sonnet-4-5") == "prefill"


def test_continuation_defaults_by_type_and_is_checked() -> None:
    config = parse_config({"providers": {"p": OPENAI, "c": {"type": "anthropic"}}}, environ={})
    assert (config.providers["p"].continuation, config.providers["c"].continuation) == ("none", "prefill")
    vllm = parse_config({"providers": {"v": {**OPENAI, "continuation": "continue_final_message"}}}, environ={})
    assert vllm.providers["v"].continuation == "continue_final_message"
    assert only_problem({"providers": {"p": {**OPENAI, "continuation": "prefill"}}}) == (
        "[providers.p].continuation must be one of 'none', 'continue_final_message', got 'prefill'"
    )


@pytest.mark.parametrize("key", ["fallbacks", "context_fallbacks"])
def test_fallback_naming_no_provider(key: str) -> None:
    assert only_problem({"providers": {"p": {**OPENAI, key: ["sim/echo", "nope/m"]}}}) == (
        f"[providers.p].{key}[1] = 'nope/m' names no provider (write it as 'provider/model')"
    )


def test_context_fallbacks() -> None:
    config = parse_config({"providers": {"p": {**OPENAI, "context_fallbacks": ["q/long"]}, "q": OPENAI}}, environ={})
    assert (config.providers["p"].context_fallbacks, config.providers["q"].context_fallbacks) == (("q/long",), ())


def test_fallback_to_a_broken_provider_reports_only_that_provider() -> None:
    assert only_problem({"providers": {"p": {**OPENAI, "fallbacks": ["q/m"]}, "q": {"type": "openai"}}}) == (
        "[providers.q].base_url is required for an openai provider (e.g. 'http://127.0.0.1:9000/v1')"
    )


@pytest.mark.parametrize(
    ("fallbacks", "expected"),
    [
        ("q/m", "fallbacks must be a list of 'provider/model' names, got 'q/m'"),
        ({"q": "m"}, "fallbacks must be a list of 'provider/model' names, got {'q': 'm'}"),
        (["q/m", "q"], "fallbacks[1] = 'q' is not a 'provider/model' name"),
        ([5], "fallbacks[0] = 5 is not a 'provider/model' name"),
        (["/m"], "fallbacks[0] = '/m' is not a 'provider/model' name"),
    ],
)
def test_fallbacks_must_be_provider_model_names(fallbacks: Any, expected: str) -> None:
    assert only_problem({"providers": {"p": {**OPENAI, "fallbacks": fallbacks}, "q": OPENAI}}) == (
        f"[providers.p].{expected}"
    )


# --------------------------------------------------------------------------------------------
# transforms and validators


def test_builtin_transforms_and_validators() -> None:
    config = parse_config(
        {
            "providers": {
                "p": {
                    **OPENAI,
                    "transforms": [
                        {"type": "regex_redact", "pattern": r"\b\d{3}-\d{4}\b", "replacement": "[phone]"},
                        {"type": "replace", "old": "colour", "new": "color"},
                    ],
                    "validators": [
                        {"type": "banned_phrases", "phrases": ["internal use only"]},
                        {"type": "max_length", "characters": 20},
                    ],
                }
            }
        },
        environ={},
    )
    p = config.providers["p"]
    redact, replace = p.transforms
    assert replace(redact("colour 555-1234")) == "color [phone]"
    banned, longest = p.validators
    assert banned("for INTERNAL use only", "only") == "the response contains a banned phrase ('internal use only')"
    assert longest("x" * 21, "x") == "the response is longer than 20 characters"
    assert config.providers["sim"].transforms == ()


@pytest.mark.parametrize(
    ("keys", "expected"),
    [
        (
            {"transforms": [{"type": "uppercase"}]},
            "[providers.p].transforms[0].type 'uppercase' is unknown (known: regex_redact, replace, python)",
        ),
        (
            {"validators": [{"type": "max_length", "characters": 5}, {"type": "profanity"}]},
            "[providers.p].validators[1].type 'profanity' is unknown (known: banned_phrases, max_length, python)",
        ),
        (
            {"transforms": [{"type": "regex_redact", "pattern": "(\\d{3}"}]},
            (
                "[providers.p].transforms[0] (regex_redact): 'pattern' is not a regular expression: "
                "missing ), unterminated subpattern at position 0"
            ),
        ),
        (
            {"transforms": [{"type": "regex_redact", "pattern": "*"}]},
            (
                "[providers.p].transforms[0] (regex_redact): 'pattern' is not a regular expression: "
                "nothing to repeat at position 0"
            ),
        ),
        (
            {"validators": [{"type": "banned_phrases", "phrases": "secret"}]},
            "[providers.p].validators[0] (banned_phrases): 'phrases' must be a list of strings, got 'secret'",
        ),
        (
            {"transforms": {"type": "replace"}},
            '[providers.p].transforms must be a list of tables like {type = "regex_redact", ...}',
        ),
        (
            {"validators": ["max_length"]},
            "[providers.p].validators[0] must be a table like {type = \"banned_phrases\", ...}, got 'max_length'",
        ),
        (
            {"validators": [{"type": "max_length"}]},
            "[providers.p].validators[0] (max_length): missing argument 'characters'",
        ),
        (
            {"validators": [{"type": "python", "function": "trioproxy_no_such_hooks:check"}]},
            (
                "[providers.p].validators[0] (python): cannot import 'trioproxy_no_such_hooks': "
                "No module named 'trioproxy_no_such_hooks'"
            ),
        ),
    ],
)
def test_bad_transform_or_validator(keys: dict[str, Any], expected: str) -> None:
    assert only_problem({"providers": {"p": {**OPENAI, **keys}}}) == expected


HOOKS_MODULE = "trioproxy_test_config_hooks"
HOOKS_SOURCE = """\
FACTORY_CALLS = []


def shout(text):
    return text.upper()


def no_word(word, reason="banned word"):
    FACTORY_CALLS.append(word)

    def check(text, new):
        return reason if word in text[-(len(new) + len(word)) :] else None

    return check
"""


@pytest.fixture
def hooks(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[ModuleType]:
    (tmp_path / f"{HOOKS_MODULE}.py").write_text(HOOKS_SOURCE, encoding="utf-8")
    monkeypatch.syspath_prepend(str(tmp_path))
    yield importlib.import_module(HOOKS_MODULE)
    sys.modules.pop(HOOKS_MODULE, None)


def test_python_hook_plain_function(hooks: ModuleType) -> None:
    config = parse_config(
        {"providers": {"p": {**OPENAI, "transforms": [{"type": "python", "function": f"{HOOKS_MODULE}:shout"}]}}},
        environ={},
    )
    (transform,) = config.providers["p"].transforms
    assert transform is hooks.shout
    assert transform("héllo wörld") == "HÉLLO WÖRLD"


def test_python_hook_factory_with_args(hooks: ModuleType) -> None:
    config = parse_config(
        {
            "providers": {
                "p": {
                    **OPENAI,
                    "validators": [
                        {
                            "type": "python",
                            "function": f"{HOOKS_MODULE}:no_word",
                            "args": {"word": "cheese", "reason": "no cheese talk"},
                        }
                    ],
                }
            }
        },
        environ={},
    )
    (validator,) = config.providers["p"].validators
    assert hooks.FACTORY_CALLS == ["cheese"]  # called once, at start-up
    assert validator("I like bread", " bread") is None
    assert validator("I like chee" + "se", "se") == "no cheese talk"
    assert hooks.FACTORY_CALLS == ["cheese"]


def test_python_hooks_from_a_toml_file(hooks: ModuleType, tmp_path: Path) -> None:
    path = write(
        tmp_path,
        f"""\
[buffer]
buffer_by_sentence = true

[providers.p]
type = "simulated"
transforms = [{{ type = "python", function = "{HOOKS_MODULE}:shout" }}]
validators = [{{ type = "python", function = "{HOOKS_MODULE}:no_word", args = {{ word = "BAD" }} }}]
""",
    )
    p = load_config(path, environ={}).providers["p"]
    assert p.buffer == BufferConfig(buffer_by_sentence=True)
    (transform,) = p.transforms
    (validator,) = p.validators
    assert validator(transform("a bad day"), "A BAD DAY") == "banned word"


def test_python_hook_problems(hooks: ModuleType) -> None:
    problems = problems_of(
        {
            "providers": {
                "p": {
                    **OPENAI,
                    "transforms": [
                        {"type": "python", "function": f"{HOOKS_MODULE}:whisper"},
                        {"type": "python", "function": f"{HOOKS_MODULE}.shout"},
                    ],
                    "validators": [
                        {"type": "python", "function": f"{HOOKS_MODULE}:no_word", "args": {"words": ["x"]}},
                        {"type": "python", "function": f"{HOOKS_MODULE}:FACTORY_CALLS"},
                    ],
                }
            }
        }
    )
    assert problems == [
        f"[providers.p].transforms[0] (python): module '{HOOKS_MODULE}' has no 'whisper'",
        "[providers.p].transforms[1] (python): 'function' must be 'package.module:name'",
        (
            f"[providers.p].validators[0] (python): 'args' for {HOOKS_MODULE}:no_word: missing argument 'word'; "
            "unknown argument 'words' (takes 'word', 'reason')"
        ),
        f"[providers.p].validators[1] (python): {HOOKS_MODULE}:FACTORY_CALLS is not callable",
    ]


# -- [streams]: resumable, shareable streams on the generic SSE endpoints ----------------------


def test_streams_default_without_a_table() -> None:
    assert parse_config({}, environ={}).streams == StreamsConfig()
    assert StreamsConfig() == StreamsConfig(
        resume_grace_period=30.0, retention=300.0, max_replay_bytes=1024 * 1024, max_streams=1000, watcher_queue=64
    )


def test_streams_table() -> None:
    config = parse_config(
        {
            "streams": {
                "resume_grace_period": 0.5,
                "retention": 60,
                "max_replay_bytes": 4096,
                "max_streams": 3,
                "watcher_queue": 8,
            }
        },
        environ={},
    )
    assert config.streams == StreamsConfig(
        resume_grace_period=0.5, retention=60, max_replay_bytes=4096, max_streams=3, watcher_queue=8
    )


def test_streams_grace_period_may_be_zero() -> None:
    assert parse_config({"streams": {"resume_grace_period": 0}}, environ={}).streams.resume_grace_period == 0


@pytest.mark.parametrize(
    ("table", "expected"),
    [
        ({"resume_grace_period": -1}, "[streams].resume_grace_period must not be negative, got -1"),
        ({"retention": "5m"}, "[streams].retention must be a number, got '5m'"),
        ({"max_replay_bytes": 1.5}, "[streams].max_replay_bytes must be an integer, got 1.5"),
        ({"max_streams": 0}, "[streams].max_streams must be at least 1, got 0"),
        ({"watcher_queue": True}, "[streams].watcher_queue must be an integer, got True"),
        ({"watcher_queue": 0}, "[streams].watcher_queue must be at least 1, got 0"),
        (
            {"grace": 1},
            (
                "[streams]: unknown key 'grace' (known: resume_grace_period, retention, max_replay_bytes, "
                "max_streams, watcher_queue)"
            ),
        ),
    ],
)
def test_bad_streams_setting(table: dict[str, Any], expected: str) -> None:
    assert only_problem({"streams": table}) == expected


def test_streams_not_a_table() -> None:
    assert only_problem({"streams": 5}) == "[streams] must be a table/object, got 5"


def test_server_write_timeout() -> None:
    assert parse_config({"server": {"write_timeout": 2.5}}, environ={}).server.write_timeout == 2.5
    assert parse_config({}, environ={}).server.write_timeout == 30.0
    assert only_problem({"server": {"write_timeout": 0}}) == (
        "[server].write_timeout must be a positive number of seconds, got 0"
    )


def test_server_keep_alive_timeout() -> None:
    assert parse_config({"server": {"keep_alive_timeout": 5}}, environ={}).server.keep_alive_timeout == 5
    assert parse_config({}, environ={}).server.keep_alive_timeout == 75.0
    for bad in (0, -1, "75", True, float("inf")):
        assert only_problem({"server": {"keep_alive_timeout": bad}}) == (
            f"[server].keep_alive_timeout must be a positive number of seconds, got {bad!r}"
        )


def test_server_body_timeout() -> None:
    assert parse_config({"server": {"body_timeout": 2.5}}, environ={}).server.body_timeout == 2.5
    assert parse_config({}, environ={}).server.body_timeout == 60.0
    for bad in (0, -1, "60", True, float("inf")):
        assert only_problem({"server": {"body_timeout": bad}}) == (
            f"[server].body_timeout must be a positive number of seconds, got {bad!r}"
        )


def test_server_shutdown_grace_period() -> None:
    assert parse_config({"server": {"shutdown_grace_period": 2.5}}, environ={}).server.shutdown_grace_period == 2.5
    assert parse_config({"server": {"shutdown_grace_period": 0}}, environ={}).server.shutdown_grace_period == 0
    assert parse_config({}, environ={}).server.shutdown_grace_period == 30.0
    for bad in (-1, "10", True, float("inf"), float("nan")):
        assert only_problem({"server": {"shutdown_grace_period": bad}}) == (
            f"[server].shutdown_grace_period must be a number of seconds, 0 or more, got {bad!r}"
        )


def test_auth_keys_from_the_file_and_the_environment() -> None:
    config = parse_config({"auth": {"keys": ["k1"], "keys_env": "KEYS"}}, environ={"KEYS": "k2,k3  k4"})
    assert config.auth.keys == ("k1", "k2", "k3", "k4")
    assert config.auth.enabled
    assert config.auth.protect_metrics
    assert "k1" not in repr(config)
    assert not parse_config({}, environ={}).auth.enabled
    assert only_problem({"auth": {"keys": "k1"}}) == "[auth].keys must be a list of non-empty strings"


@pytest.mark.parametrize(
    ("auth", "environ", "expected"),
    [
        (
            {"keys_env": "NOPE"},
            {},
            "[auth].keys_env: environment variable NOPE is not set; the server would serve every route without a key",
        ),
        (
            {"keys_env": "KEYS", "keys": ["k1"]},
            {"KEYS": " ,, "},
            "[auth].keys_env: environment variable KEYS holds no keys; "
            "the server would serve every route without a key",
        ),
        (
            {"keys": []},
            {},
            "[auth].keys is empty: list a key, or remove it (an empty list would leave every route open)",
        ),
    ],
)
def test_a_key_source_that_yields_no_key_is_a_mistake(
    auth: dict[str, Any], environ: dict[str, str], expected: str
) -> None:
    with pytest.raises(ConfigError) as info:
        parse_config({"auth": auth}, environ=environ)
    assert info.value.problems == [expected]


@pytest.mark.parametrize(
    ("raw", "expected"),
    [
        ({"auth": {"protect_metrics": "no"}}, "[auth].protect_metrics must be true or false, got 'no'"),
        ({"logging": {"access_log": 0}}, "[logging].access_log must be true or false, got 0"),
        ({"logging": {"include_prompts": "yes"}}, "[logging].include_prompts must be true or false, got 'yes'"),
    ],
)
def test_bad_boolean(raw: dict[str, Any], expected: str) -> None:
    assert only_problem(raw) == expected


# -- [limits] and [cors] ------------------------------------------------------------------------


def test_limits_defaults_and_table() -> None:
    limits = parse_config({}, environ={}).limits
    assert limits == LimitsConfig()
    assert (limits.max_body_bytes, limits.max_messages, limits.max_string_chars) == (8 * 1024 * 1024, 2048, 0)
    assert (limits.requests_per_minute, limits.max_streams_per_key, limits.max_concurrent_streams) == (0, 0, 1000)
    table = {"max_body_bytes": 1024, "requests_per_minute": 60, "max_streams_per_key": 0, "max_concurrent_streams": 0}
    assert parse_config({"limits": table}, environ={}).limits == LimitsConfig(
        max_body_bytes=1024, requests_per_minute=60, max_streams_per_key=0, max_concurrent_streams=0
    )


@pytest.mark.parametrize(
    ("table", "expected"),
    [
        ({"max_body_bytes": 0}, "[limits].max_body_bytes must be a positive integer, got 0"),
        ({"estimated_output_tokens": 0}, "[limits].estimated_output_tokens must be a positive integer, got 0"),
        ({"tokens_per_day": -5}, "[limits].tokens_per_day must be an integer, 0 or more (0: no limit), got -5"),
        ({"max_messages": -1}, "[limits].max_messages must be an integer, 0 or more (0: no limit), got -1"),
        (
            {"requests_per_minute": 1.5},
            "[limits].requests_per_minute must be an integer, 0 or more (0: no limit), got 1.5",
        ),
        (
            {"max_concurrent_streams": True},
            "[limits].max_concurrent_streams must be an integer, 0 or more (0: no limit), got True",
        ),
        (
            {"max_stream": 3},
            (
                "[limits]: unknown key 'max_stream' (known: estimated_output_tokens, max_body_bytes, "
                "max_concurrent_streams, max_messages, max_streams_per_key, max_string_chars, "
                "requests_per_minute, tokens_per_day, tokens_per_minute)"
            ),
        ),
    ],
)
def test_bad_limits(table: dict[str, Any], expected: str) -> None:
    assert only_problem({"limits": table}) == expected


def test_tracing_off_by_default_and_table() -> None:
    assert parse_config({}, environ={}).tracing == TracingConfig(enabled=False)
    table = {
        "enabled": True,
        "endpoint": "http://collector:4318",
        "protocol": "grpc",
        "service_name": "edge-proxy",
        "sample_ratio": 0,
        "shutdown_timeout": 0.5,
    }
    assert parse_config({"tracing": table}, environ={}).tracing == TracingConfig(
        enabled=True,
        endpoint="http://collector:4318",
        protocol="grpc",
        service_name="edge-proxy",
        sample_ratio=0.0,
        shutdown_timeout=0.5,
    )
    assert parse_config({}, environ={}).tracing.shutdown_timeout == 2.0


@pytest.mark.parametrize(
    ("table", "expected"),
    [
        ({"enabled": "yes"}, "[tracing].enabled must be true or false, got 'yes'"),
        ({"endpoint": "collector:4318"}, "[tracing].endpoint must be an http:// or https:// URL, got 'collector:4318'"),
        (
            {"protocol": "http/json"},
            "[tracing].protocol must be one of 'http/protobuf', 'grpc', got 'http/json'",
        ),
        ({"service_name": " "}, "[tracing].service_name must be a non-empty string, got ' '"),
        ({"sample_ratio": 1.5}, "[tracing].sample_ratio must be a number from 0 to 1, got 1.5"),
        ({"shutdown_timeout": 0}, "[tracing].shutdown_timeout must be a positive number of seconds, got 0"),
        (
            {"sample_ration": 1},
            "[tracing]: unknown key 'sample_ration' (known: enabled, endpoint, protocol, sample_ratio, service_name, "
            "shutdown_timeout)",
        ),
        ([], "[tracing] must be a table"),
    ],
)
def test_bad_tracing(table: Any, expected: str) -> None:
    assert only_problem({"tracing": table}) == expected


def test_cors_off_by_default_and_table() -> None:
    assert not parse_config({}, environ={}).cors.enabled
    cors = parse_config(
        {
            "cors": {
                "allow_origins": ["https://App.Example.com", "http://localhost:5173"],
                "allow_headers": ["Authorization", "x-my-*"],
                "expose_headers": ["x-request-id"],
                "max_age": 60,
                "allow_credentials": True,
            }
        },
        environ={},
    ).cors
    assert cors == CorsConfig(
        allow_origins=("https://app.example.com", "http://localhost:5173"),
        allow_headers=("authorization", "x-my-*"),
        expose_headers=("x-request-id",),
        max_age=60,
        allow_credentials=True,
    )
    assert cors.enabled
    assert "x-stainless-*" in CorsConfig().allow_headers
    assert "authorization" in CorsConfig().allow_headers


@pytest.mark.parametrize(
    ("table", "expected"),
    [
        (
            {"allow_origins": ["https://app.example.com/"]},
            (
                "[cors].allow_origins: 'https://app.example.com/' is not an origin: write scheme://host[:port], "
                "with no path and no trailing slash (e.g. 'https://app.example.com')"
            ),
        ),
        (
            {"allow_origins": "*"},
            "[cors].allow_origins must be a list of origins like 'https://app.example.com', or ['*']",
        ),
        ({"allow_headers": ["x y"]}, "[cors].allow_headers: 'x y' is not a header name (or 'prefix-*')"),
        ({"allow_headers": ["a*b"]}, "[cors].allow_headers: 'a*b' is not a header name (or 'prefix-*')"),
        ({"expose_headers": ["x-*"]}, "[cors].expose_headers: 'x-*' is not a header name"),
        ({"max_age": -1}, "[cors].max_age must be a number of seconds, 0 or more, got -1"),
        ({"allow_credentials": "yes"}, "[cors].allow_credentials must be true or false, got 'yes'"),
        (
            {"allow_origins": ["*"], "allow_credentials": True},
            (
                "[cors].allow_credentials = true needs the origins listed: with '*', every web site could send "
                "its visitors' cookies to the proxy"
            ),
        ),
        (
            {"allow_origin": ["*"]},
            (
                "[cors]: unknown key 'allow_origin' (known: allow_credentials, allow_headers, "
                "allow_origins, expose_headers, max_age)"
            ),
        ),
    ],
)
def test_bad_cors(table: dict[str, Any], expected: str) -> None:
    assert only_problem({"cors": table}) == expected


def test_several_targets_by_base_urls_or_weighted_tables() -> None:
    config = parse_config(
        {
            "breaker": {"failures": 3},
            "providers": {
                "v": {"type": "openai", "base_urls": ["http://a/v1", "http://b/v1"], "breaker": {"cooldown": 5}},
                "w": {
                    "type": "openai",
                    "targets": [{"base_url": "http://a/v1", "weight": 3}, {"base_url": "http://b/v1"}],
                },
            },
        },
        environ={},
    )
    v, w = config.providers["v"], config.providers["w"]
    assert [(t.base_url, t.weight) for t in v.targets] == [("http://a/v1", 1.0), ("http://b/v1", 1.0)]
    assert v.base_url == "http://a/v1"
    assert (v.breaker.failures, v.breaker.cooldown) == (3, 5)
    assert [(t.base_url, t.weight) for t in w.targets] == [("http://a/v1", 3.0), ("http://b/v1", 1.0)]


@pytest.mark.parametrize(
    ("table", "expected"),
    [
        (
            {"base_url": "http://a/v1", "base_urls": ["http://b/v1"]},
            "[providers.p]: give one of base_url, base_urls and targets, not base_url and base_urls",
        ),
        ({"base_urls": []}, "[providers.p].base_urls must be a non-empty list of http:// or https:// URLs, got []"),
        (
            {"targets": [{"base_url": "http://a", "weight": 0}]},
            "[providers.p].targets[0].weight must be a positive number, got 0",
        ),
        (
            {"targets": [{"url": "http://a"}]},
            "[providers.p].targets[0] must be a table with base_url and an optional weight, got {'url': 'http://a'}",
        ),
        (
            {"base_url": "http://a/v1", "breaker": {"failures": 0}},
            "[providers.p].breaker.failures must be at least 1, got 0",
        ),
    ],
)
def test_bad_targets_are_named(table: dict[str, Any], expected: str) -> None:
    assert only_problem({"providers": {"p": {"type": "openai", **table}}}) == expected


def test_redis_stream_settings() -> None:
    table = {"url": "redis://h:1/0", "stream_max_events": 50, "stream_write_interval": 0.5, "follow_block": 2}
    redis = parse_config({"redis": table}, environ={}).redis
    assert (redis.stream_max_events, redis.stream_write_interval, redis.follow_block) == (50, 0.5, 2)
    assert parse_config({}, environ={}).redis.stream_max_events == 10_000
    assert only_problem({"redis": {"stream_max_events": 0}}) == (
        "[redis].stream_max_events must be a positive integer, got 0"
    )
    assert only_problem({"redis": {"follow_block": -1}}) == (
        "[redis].follow_block must be a positive number of seconds, got -1"
    )


def test_redis_breaker_snapshot_age() -> None:
    assert parse_config({}, environ={}).redis.breaker_snapshot_age == 0.1
    assert parse_config({"redis": {"breaker_snapshot_age": 0}}, environ={}).redis.breaker_snapshot_age == 0
    assert only_problem({"redis": {"breaker_snapshot_age": -0.5}}) == (
        "[redis].breaker_snapshot_age must be 0 or a positive number of seconds, got -0.5"
    )
