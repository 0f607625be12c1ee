"""The runner's targets and URLs: what a target's streams are sent to, from the URL the user gave."""

from __future__ import annotations

import argparse
import tomllib
from types import SimpleNamespace

import pytest

from trioproxy import parse_config
from trioproxy._bench.options import BenchSettings, add_arguments, settings_from_args
from trioproxy._bench.processes import Child
from trioproxy._bench.runner import _generic_url, _targets, proxy_config

UPSTREAM = Child("upstream", None, "http://127.0.0.1:9000", 0.0, None)  # type: ignore[arg-type]
#: A trioproxy the bench started (it has a process), as opposed to one at `--proxy-url`.
PROXY = Child("trioproxy", SimpleNamespace(pid=4242), "http://127.0.0.1:8000", 0.0, None)  # type: ignore[arg-type]


@pytest.mark.parametrize(
    "proxy_url",
    ["http://127.0.0.1:8000", "http://127.0.0.1:8000/v1", "http://127.0.0.1:8000/v1/chat/completions"],
)
def test_a_running_proxy_is_reached_at_the_same_base_for_chat_and_generic_streams(proxy_url: str) -> None:
    [direct, trioproxy] = _targets(BenchSettings(proxy_url=proxy_url), UPSTREAM, None)
    assert direct.url == "http://127.0.0.1:9000/v1/chat/completions"
    assert trioproxy.url == "http://127.0.0.1:8000/v1/chat/completions"
    assert _generic_url(trioproxy.url) == "http://127.0.0.1:8000/v1/chat/stream/json"


def test_compared_proxies_are_named_as_given_or_by_host() -> None:
    parser = argparse.ArgumentParser()
    add_arguments(parser)
    argv = ["--compare", "litellm=http://127.0.0.1:4000", "--compare", "http://127.0.0.1:4001/v1"]
    settings = settings_from_args(parser.parse_args(argv))
    compared = _targets(settings, UPSTREAM, None)[1:]
    assert [(t.name, t.url) for t in compared] == [
        ("litellm", "http://127.0.0.1:4000/v1/chat/completions"),
        ("127.0.0.1:4001", "http://127.0.0.1:4001/v1/chat/completions"),
    ]
    with pytest.raises(SystemExit):
        parser.parse_args(["--compare", "=http://127.0.0.1:4000"])


def test_each_front_is_measured_direct_and_through_trioproxy_on_an_upstream_of_its_protocol() -> None:
    targets = _targets(BenchSettings(fronts=("openai", "anthropic")), UPSTREAM, PROXY)

    assert [(t.name, t.kind, t.front, t.url, t.model) for t in targets] == [
        ("direct", "direct", "openai", "http://127.0.0.1:9000/v1/chat/completions", "m"),
        ("trioproxy", "trioproxy", "openai", "http://127.0.0.1:8000/v1/chat/completions", "up/m"),
        ("direct-anthropic", "direct", "anthropic", "http://127.0.0.1:9000/v1/messages", "m"),
        ("trioproxy-anthropic", "trioproxy", "anthropic", "http://127.0.0.1:8000/v1/messages", "up-anthropic/m"),
    ]
    config = parse_config(tomllib.loads(proxy_config(UPSTREAM.url, 50)), environ={})
    assert config.providers["up"].type == "openai"
    assert config.providers["up-anthropic"].type == "anthropic"
    assert config.providers["up-anthropic"].base_url == UPSTREAM.url


@pytest.mark.parametrize("proxy_url", ["http://127.0.0.1:8000/v1", "http://127.0.0.1:8000/v1/chat/completions"])
def test_a_running_proxys_anthropic_front_is_its_messages_route(proxy_url: str) -> None:
    settings = BenchSettings(fronts=("anthropic",), proxy_url=proxy_url)
    [direct, trioproxy] = _targets(settings, UPSTREAM, None)
    assert (direct.url, trioproxy.url) == ("http://127.0.0.1:9000/v1/messages", "http://127.0.0.1:8000/v1/messages")


def test_the_responses_fronts_share_a_direct_connection_to_the_upstream_s_responses_route() -> None:
    targets = _targets(BenchSettings(fronts=("responses", "responses-ws")), UPSTREAM, PROXY)

    assert [(t.name, t.kind, t.front, t.url, t.model) for t in targets] == [
        ("direct-responses", "direct", "responses", "http://127.0.0.1:9000/v1/responses", "m"),
        ("trioproxy-responses", "trioproxy", "responses", "http://127.0.0.1:8000/v1/responses", "up-responses/m"),
        ("trioproxy-responses-ws", "trioproxy", "responses-ws", "http://127.0.0.1:8000/v1/responses", "up-responses/m"),
    ]
    only_websocket = _targets(BenchSettings(fronts=("responses-ws",)), UPSTREAM, PROXY)
    assert [(t.name, t.front) for t in only_websocket] == [
        ("direct-responses", "responses"),
        ("trioproxy-responses-ws", "responses-ws"),
    ]
    config = parse_config(tomllib.loads(proxy_config(UPSTREAM.url, 50)), environ={})
    assert config.providers["up-responses"].type == "openai_responses"
    assert config.providers["up-responses"].base_url == UPSTREAM.url + "/v1"


def test_the_server_s_stream_limit_is_the_pool_s_unless_given() -> None:
    def limits(**extra: int) -> tuple[int, int | None]:
        config = parse_config(tomllib.loads(proxy_config(UPSTREAM.url, 50, **extra)), environ={})
        return config.limits.max_concurrent_streams, config.providers["up"].max_connections

    assert limits() == (50, 50)
    assert limits(max_streams=100) == (100, 50)
