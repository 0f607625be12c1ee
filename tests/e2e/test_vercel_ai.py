"""
The Vercel AI SDK's default OpenAI provider (`openai(model)`, which means the Responses API)
streaming `streamText` through trioproxy: a real node process (`vercel_ai_stream.mjs`) →
trioproxy (hypercorn on 127.0.0.1:0) → `FakeUpstream` as Chat Completions or Anthropic Messages. `make vercel-ai`
installs the pinned SDK under `.node/`; without it the test is skipped, except under
`CI=true`, where it fails.
"""

from __future__ import annotations

import subprocess
from functools import partial
from pathlib import Path
from typing import Final

import httpx
import orjson
import pytest
import trio

from tests.conftest import installed
from trioproxy.testing import FakeUpstream, Reply

NODE_DIR: Final = Path(__file__).parents[2] / ".node"
SCRIPT: Final = Path(__file__).parent / "vercel_ai_stream.mjs"
TOKENS: Final = ("One", " two", " three", " four", " five")


@pytest.fixture
def node_dir() -> Path:
    installed(NODE_DIR / "node_modules" / "@ai-sdk" / "openai", "the Vercel AI SDK", "vercel-ai")
    return NODE_DIR


# What the SDK sends by default reaches an upstream of either protocol: none of it is refused.
@pytest.mark.parametrize(
    ("model", "path"), [("up/gpt-test", "/v1/chat/completions"), ("claude/claude-test", "/v1/messages")]
)
async def test_stream_text_streams_incrementally(
    node_dir: Path, proxy_url: str, upstream: FakeUpstream, model: str, path: str
) -> None:
    upstream.push(Reply(tokens=TOKENS, interval=0.3))
    command = ["node", str(SCRIPT), str(node_dir), proxy_url + "/v1", model, "Count to five"]
    lines: list[dict[str, str]] = []
    with trio.fail_after(30):
        async with trio.open_nursery() as nursery:
            run = partial(trio.run_process, command, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, check=False)
            process = await nursery.start(run)
            buffer = b""
            async for data in process.stdout:
                buffer += data
                *complete, buffer = buffer.split(b"\n")
                for line in complete:
                    lines.append(orjson.loads(line))
                    if len(lines) == 1:  # the first delta reached the client before the upstream finished
                        assert upstream.requests[-1].tokens_sent < len(TOKENS)
    assert process.returncode == 0
    assert [line["delta"] for line in lines[:-1]] == list(TOKENS)
    assert lines[-1] == {"text": "".join(TOKENS), "finishReason": "stop"}
    assert upstream.requests[-1].path == path
    async with httpx.AsyncClient() as http:  # the SDK asked the Responses front
        metrics = (await http.get(proxy_url + "/metrics")).text
    assert 'trioproxy_requests_total{outcome="completed",route="/v1/responses",status="200"} 1.0' in metrics
