"""
The Codex CLI, unmodified, through trioproxy's Responses front: `codex exec` (a real process,
its own empty `CODEX_HOME` and `HOME`) with a model provider whose `base_url` is trioproxy
(hypercorn on 127.0.0.1:0) → the simulated provider, or `FakeUpstream` spoken to as Chat
Completions (translated); over HTTP, and over WebSocket mode (`supports_websockets`).

Codex sends what no SDK example does (tests/fixtures/responses/README.md): `store: false` with
the whole history, `include`, `client_metadata`, a `namespace` of tools and the hosted
`web_search` tool, and over WebSocket a `generate: false` warm-up first. `make codex` installs
the pinned CLI under `.node/`; without it these tests are skipped, except under `CI=true`,
where a missing CLI fails them.
"""

from __future__ import annotations

import os
import subprocess
from pathlib import Path
from typing import Final

import pytest
import trio

from tests.conftest import answer_statuses, cli_answer, installed, run_cli, serve_proxy
from trioproxy import parse_config
from trioproxy.testing import FakeUpstream, Reply

CODEX: Final = Path(__file__).parents[2] / ".node" / "node_modules" / ".bin" / "codex"
#: A bound on one `codex exec` run (about a second when all is well), so a hang fails the test.
CODEX_RUN_TIMEOUT: Final = 90


@pytest.fixture
def codex() -> Path:
    return installed(CODEX, "the Codex CLI", "codex")


@pytest.fixture
def project(tmp_path: Path) -> Path:
    """The directory Codex works in (empty: it is not a git repository)."""
    path = tmp_path / "project"
    path.mkdir()
    return path


async def run_codex(
    codex: Path, proxy_url: str, project: Path, prompt: str, *, model: str, websocket: bool, built_in: bool = False
) -> subprocess.CompletedProcess[bytes]:
    """
    `codex exec PROMPT` against the proxy, with the provider flags the README gives (or, with
    `built_in`, Codex's own OpenAI provider given the proxy's URL), and nothing of this
    machine's: its own `CODEX_HOME` and `HOME`, no terminal on stdin.
    """
    home = project.parent / "home"
    home.mkdir(exist_ok=True)
    env = {
        "PATH": os.environ.get("PATH", "/usr/bin:/bin"),
        "HOME": str(home),
        "CODEX_HOME": str(home),
        "TP_KEY": "client-key",
        "OPENAI_API_KEY": "client-key",
    }
    provider = [
        "-c",
        "model_provider=tp",
        "-c",
        "model_providers.tp.name=tp",
        "-c",
        f'model_providers.tp.base_url="{proxy_url}/v1"',
        "-c",
        "model_providers.tp.wire_api=responses",
        "-c",
        "model_providers.tp.env_key=TP_KEY",
        "-c",
        f"model_providers.tp.supports_websockets={'true' if websocket else 'false'}",
    ]
    if built_in:
        provider = ["-c", f'openai_base_url="{proxy_url}/v1"']
    argv = [str(codex), "exec", "--skip-git-repo-check", *provider, "-m", model, prompt]
    with trio.fail_after(CODEX_RUN_TIMEOUT):
        return await run_cli(argv, cwd=project, env=env)


@pytest.fixture
async def proxy_url(nursery: trio.Nursery, upstream: FakeUpstream) -> str:
    config = parse_config(
        {
            "retry": {"max_retries": 0},
            "providers": {
                "sim": {"type": "simulated", "ttft_ms": 0, "token_interval_ms": 0},
                "up": {"type": "openai", "base_url": upstream.url + "/v1"},
                "claude": {"type": "anthropic", "base_url": upstream.url},
            },
        },
        environ={},
    )
    return await serve_proxy(nursery, config)


WEBSOCKET = pytest.mark.parametrize("websocket", [False, True], ids=["http", "websocket"])


@WEBSOCKET
async def test_codex_answers_from_the_simulated_provider(
    codex: Path, proxy_url: str, project: Path, websocket: bool
) -> None:
    run = await run_codex(codex, proxy_url, project, "pineapple banana", model="sim/echo", websocket=websocket)
    assert cli_answer(run).strip() == "pineapple banana"
    counted = await answer_statuses(proxy_url, "/v1/responses")
    assert ("101" in counted) is websocket
    assert not any(status.startswith(("4", "5")) for status in counted), counted


@WEBSOCKET
async def test_codex_answers_from_a_chat_completions_upstream(
    codex: Path, proxy_url: str, upstream: FakeUpstream, project: Path, websocket: bool
) -> None:
    upstream.push(Reply(tokens=("The answer", " is", " 42.")))
    run = await run_codex(codex, proxy_url, project, "What is the answer?", model="up/gpt-test", websocket=websocket)
    assert cli_answer(run).strip() == "The answer is 42."
    (request,) = upstream.requests
    assert request.path == "/v1/chat/completions"
    body = request.json
    assert body["model"] == "gpt-test"
    assert body["messages"][-1]["role"] == "user"
    assert "What is the answer?" in str(body["messages"][-1]["content"])
    assert "exec_command" in [tool["function"]["name"] for tool in body["tools"]]


async def test_codex_answers_from_an_anthropic_upstream(
    codex: Path, proxy_url: str, upstream: FakeUpstream, project: Path
) -> None:
    """Nothing Codex always sends is refused: `prompt_cache_key` and the like are hints, dropped."""
    upstream.push(Reply(tokens=("The answer", " is", " 42.")))
    run = await run_codex(codex, proxy_url, project, "What is the answer?", model="claude/claude-test", websocket=False)
    assert cli_answer(run).strip() == "The answer is 42."
    (request,) = upstream.requests
    assert request.path == "/v1/messages"
    assert "exec_command" in [tool["name"] for tool in request.json["tools"]]
    assert "prompt_cache_key" not in request.json


async def test_codex_s_own_openai_provider_given_the_proxy_s_url_uses_websocket_mode(
    codex: Path, proxy_url: str, project: Path
) -> None:
    run = await run_codex(codex, proxy_url, project, "pineapple", model="sim/echo", websocket=True, built_in=True)
    assert cli_answer(run).strip() == "pineapple"
    counted = await answer_statuses(proxy_url, "/v1/responses")
    assert "101" in counted
    assert not any(status.startswith(("4", "5")) for status in counted), counted
