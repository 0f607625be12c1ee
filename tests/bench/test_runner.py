"""The runner's URLs: what a target's streams are sent to, from the URL the user gave."""

from __future__ import annotations

import argparse

import pytest

from trioproxy._bench.options import BenchSettings, add_arguments, settings_from_args
from trioproxy._bench.processes import Child
from trioproxy._bench.runner import _generic_url, _targets


@pytest.mark.parametrize(
    "proxy_url",
    ["http://127.0.0.1:8000", "http://127.0.0.1:8000/v1", "http://127.0.0.1:8000/v1/chat/completions"],
)
def test_a_running_proxy_is_reached_at_the_same_base_for_chat_and_generic_streams(proxy_url: str) -> None:
    upstream = Child("upstream", None, "http://127.0.0.1:9000", 0.0, None)  # type: ignore[arg-type]
    [direct, trioproxy] = _targets(BenchSettings(proxy_url=proxy_url), upstream, None)
    assert direct.url == "http://127.0.0.1:9000/v1/chat/completions"
    assert trioproxy.url == "http://127.0.0.1:8000/v1/chat/completions"
    assert _generic_url(trioproxy.url) == "http://127.0.0.1:8000/v1/chat/stream/json"


def test_compared_proxies_are_named_as_given_or_by_host() -> None:
    parser = argparse.ArgumentParser()
    add_arguments(parser)
    argv = ["--compare", "litellm=http://127.0.0.1:4000", "--compare", "http://127.0.0.1:4001/v1"]
    settings = settings_from_args(parser.parse_args(argv))
    upstream = Child("upstream", None, "http://127.0.0.1:9000", 0.0, None)  # type: ignore[arg-type]
    compared = _targets(settings, upstream, None)[1:]
    assert [(t.name, t.url) for t in compared] == [
        ("litellm", "http://127.0.0.1:4000/v1/chat/completions"),
        ("127.0.0.1:4001", "http://127.0.0.1:4001/v1/chat/completions"),
    ]
    with pytest.raises(SystemExit):
        parser.parse_args(["--compare", "=http://127.0.0.1:4000"])
