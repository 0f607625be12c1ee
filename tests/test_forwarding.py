"""Which provider forwards a path, and which headers cross: no sockets."""

from __future__ import annotations

import pytest

from trioproxy import parse_config
from trioproxy._config import ConfigError
from trioproxy._forwarding import allows, provider_for_path, request_headers, response_headers


def providers(**forward_paths: list[str]) -> list:
    tables = {
        name: {"type": "openai", "base_url": "http://u/v1", "forward_paths": p} for name, p in forward_paths.items()
    }
    configured = parse_config({"providers": tables}).providers
    return [configured[name] for name in forward_paths]


@pytest.mark.parametrize(
    ("path", "allowed"),
    [("/v1/files", True), ("/v1/files/f-1/content", True), ("/v1/filesX", False), ("/v1/file", False)],
)
def test_a_prefix_allows_itself_and_what_is_under_it(path: str, allowed: bool) -> None:
    assert allows(["/v1/files"], path) is allowed


def test_the_longest_prefix_wins_then_the_first_provider() -> None:
    a, b, c = providers(a=["/v1/x"], b=["/v1/x/y"], c=["/v1/x"])

    assert provider_for_path([a, b, c], "/v1/x/y/z") is b
    assert provider_for_path([a, b, c], "/v1/x/w") is a
    assert provider_for_path([a, b, c], "/v1/w") is None


def test_the_clients_credentials_and_hop_by_hop_headers_stay_behind() -> None:
    kept = request_headers(
        [
            ("Authorization", "Bearer client"),
            ("X-Api-Key", "client"),
            ("api-key", "client"),
            ("Cookie", "c=1"),
            ("Connection", "keep-alive, X-Hop"),
            ("X-Hop", "1"),
            ("TE", "trailers"),
            ("Host", "proxy"),
            ("Content-Length", "3"),
            ("Accept", "a"),
            ("Accept", "b"),
            ("OpenAI-Beta", "assistants=v2"),
        ]
    )
    assert kept == {"accept": "a, b", "openai-beta": "assistants=v2"}


def test_the_upstreams_framing_and_cookies_stay_behind() -> None:
    kept = response_headers(
        [("Content-Type", "text/event-stream"), ("Content-Length", "9"), ("Transfer-Encoding", "chunked"),
         ("Set-Cookie", "s=1"), ("Content-Encoding", "gzip"), ("x-request-id", "up-1")]
    )  # fmt: skip
    assert kept == {"content-type": "text/event-stream", "content-encoding": "gzip", "x-request-id": "up-1"}


@pytest.mark.parametrize("paths", [["/v2/files"], ["/v1/"], ["/v1/<path:x>"], "/v1/files", [3]])
def test_forward_paths_must_be_plain_prefixes_under_v1(paths: object) -> None:
    with pytest.raises(ConfigError, match="forward_paths"):
        parse_config({"providers": {"up": {"type": "openai", "base_url": "http://u/v1", "forward_paths": paths}}})


def test_a_simulated_provider_forwards_nothing() -> None:
    with pytest.raises(ConfigError, match="forward_paths"):
        parse_config({"providers": {"s": {"type": "simulated", "forward_paths": ["/v1/files"]}}})
