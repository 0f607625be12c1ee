"""The runner's URLs: what a target's streams are sent to, from the URL the user gave."""

from __future__ import annotations

import pytest

from trioproxy._bench.options import BenchSettings
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
