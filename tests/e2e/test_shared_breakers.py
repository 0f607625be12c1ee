"""
The routes' circuit breakers shared on Redis, as an operator runs them: two real `trioproxy
serve` processes sharing one real `redis-server`, a provider whose one target refuses
connections. The failures one process sees open the breaker, and the other process skips the
target from its first request on, without trying a connection.
"""

from __future__ import annotations

from pathlib import Path

import httpx

from tests.conftest import RedisServer, free_port
from tests.e2e.test_shared_limits import MESSAGES, proxies


async def test_a_target_opened_by_one_process_is_skipped_by_the_other(
    tmp_path: Path, redis_server: RedisServer
) -> None:
    text = f"""
[redis]
url = "{redis_server.url}"

[retry]
max_retries = 0

[providers.dead]
type = "openai"
base_url = "http://127.0.0.1:{free_port()}/v1"
breaker = {{ failures = 2, cooldown = 60 }}
"""
    body = {"model": "dead/m", "messages": MESSAGES}
    async with proxies(tmp_path, text, count=2) as (first, second), httpx.AsyncClient(timeout=30) as http:
        for _ in range(2):  # two connections refused: the second opens the breaker
            failed = await http.post(first.url + "/v1/chat/completions", json=body)
            assert failed.status_code == 502
            assert "skipped" not in failed.text
        skipped = await http.post(second.url + "/v1/chat/completions", json=body)
        assert skipped.status_code == 502
        assert (
            "every target of provider 'dead' is skipped for now: its circuit breaker is open"
            in (skipped.json()["error"]["message"])
        )
        health = (await http.get(second.url + "/health")).json()
    assert [target["state"] for target in health["providers"]["dead"]["targets"]] == ["open"]
