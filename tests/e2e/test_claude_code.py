"""
The Claude Code CLI, unmodified, through trioproxy's Anthropic front: `claude -p` (a real
process, its own empty `HOME`) → trioproxy (hypercorn on 127.0.0.1:0, Claude Code's model
names routed by a `[models]` pattern) → the simulated provider, or `FakeUpstream` spoken to
as OpenAI (translated) or as Anthropic (passed through).

Claude Code is the most demanding Anthropic client there is (tests/fixtures/anthropic/README.md
lists what it sends): a dozen tools, adaptive `thinking`, `context_management`, a long
`anthropic-beta` header, a `system` message inside `messages`, and a non-streaming retry of a
stream that ended in `event: error`. `make claude-code` installs the pinned CLI under `.node/`;
without it these tests are skipped, except under `CI=true`, where a missing CLI fails them.
"""

from __future__ import annotations

import os
import subprocess
from pathlib import Path
from typing import Final

import orjson
import pytest
import trio

from tests.conftest import ANTHROPIC_KEY, answer_statuses, cli_answer, installed, run_cli, serve_proxy
from trioproxy import parse_config
from trioproxy.testing import FakeUpstream, Reply, ToolCall

CLAUDE: Final = Path(__file__).parents[2] / ".node" / "node_modules" / ".bin" / "claude"
#: A bound on one `claude -p` run (a few seconds when all is well), so a hang fails the test.
CLAUDE_RUN_TIMEOUT: Final = 90
#: Claude Code sends its own model names (`claude-opus-5-5`, `claude-haiku-5-5`, ...).
CLAUDE_MODELS: Final = "claude-*"


@pytest.fixture
def claude() -> Path:
    return installed(CLAUDE, "the Claude Code CLI", "claude-code")


@pytest.fixture
def project(tmp_path: Path) -> Path:
    """The directory Claude Code works in (empty but for one note to read)."""
    path = tmp_path / "project"
    path.mkdir()
    (path / "note.txt").write_text("The secret word is pineapple.\n")
    return path


async def run_claude(claude: Path, proxy_url: str, project: Path, prompt: str) -> subprocess.CompletedProcess[bytes]:
    """
    `claude -p PROMPT` against the proxy, as a user would run it, but with nothing of this
    machine's: its own empty `HOME`, no telemetry or other traffic, no terminal on stdin.
    """
    home = project.parent / "home"
    home.mkdir(exist_ok=True)
    env = {
        "PATH": os.environ.get("PATH", "/usr/bin:/bin"),
        "HOME": str(home),
        "ANTHROPIC_BASE_URL": proxy_url,
        "ANTHROPIC_API_KEY": "client-key",
        "DISABLE_TELEMETRY": "1",
        "CLAUDE_CODE_DISABLE_NONESSENTIAL_TRAFFIC": "1",
    }
    with trio.fail_after(CLAUDE_RUN_TIMEOUT):
        return await run_cli([str(claude), "-p", prompt], cwd=project, env=env)


async def say_hi(claude: Path, proxy_url: str, project: Path, upstream: FakeUpstream, *answers: Reply) -> str:
    """What `claude -p "say hi"` prints through the proxy, the upstream giving `answers` in turn."""
    upstream.push(*answers)
    return cli_answer(await run_claude(claude, proxy_url, project, "say hi")).strip()


#: A stream that fails after two text deltas, then the whole answer to the retry.
HALF_THEN_WHOLE: Final = (
    Reply(tokens=("Half", " an", " answer"), error_after=2),
    Reply(tokens=("The", " whole", " answer.")),
)


async def test_claude_code_answers_from_the_simulated_provider(
    nursery: trio.Nursery, claude: Path, project: Path
) -> None:
    config = parse_config(
        {
            "providers": {"sim": {"type": "simulated", "ttft_ms": 0, "token_interval_ms": 0}},
            "models": {CLAUDE_MODELS: "sim/echo"},
        },
        environ={},
    )
    proxy = await serve_proxy(nursery, config)

    run = await run_claude(claude, proxy, project, "pineapple banana")

    assert "pineapple banana" in cli_answer(run)
    # Claude Code recovers from a refusal by sending its request again without what was
    # refused: only the proxy's counts tell that it served the request as Claude Code made it.
    assert await answer_statuses(proxy) == {"200": 1}


async def proxy_to(nursery: trio.Nursery, upstream: FakeUpstream, provider: str) -> str:
    """
    trioproxy sending Claude Code's model names, kept whole, to `upstream` as `provider`:
    `up` speaks OpenAI Chat Completions to it, `resp` OpenAI Responses, `claude` Anthropic Messages.
    """
    config = parse_config(
        {
            "retry": {"max_retries": 0},
            "models": {CLAUDE_MODELS: provider},
            "providers": {
                "up": {"type": "openai", "base_url": upstream.url + "/v1"},
                "resp": {"type": "openai_responses", "base_url": upstream.url + "/v1"},
                # No continuation: these tests watch Claude Code's own retry of a broken stream.
                "claude": {
                    "type": "anthropic",
                    "base_url": upstream.url,
                    "api_key_env": "CLAUDE_KEY",
                    "continuation": "none",
                },
            },
        },
        environ={"CLAUDE_KEY": ANTHROPIC_KEY},
    )
    return await serve_proxy(nursery, config)


@pytest.fixture
async def proxy_to_openai(nursery: trio.Nursery, upstream: FakeUpstream) -> str:
    return await proxy_to(nursery, upstream, "up")


@pytest.fixture
async def proxy_to_anthropic(nursery: trio.Nursery, upstream: FakeUpstream) -> str:
    return await proxy_to(nursery, upstream, "claude")


async def test_claude_code_answers_from_an_openai_upstream(
    claude: Path, project: Path, upstream: FakeUpstream, proxy_to_openai: str
) -> None:
    answer = Reply(tokens=("Hi", " from", " the", " OpenAI", " side."))
    assert await say_hi(claude, proxy_to_openai, project, upstream, answer) == "Hi from the OpenAI side."
    assert await answer_statuses(proxy_to_openai) == {"200": 1}
    [sent] = upstream.requests
    assert sent.path == "/v1/chat/completions"
    assert sent.json["model"].startswith("claude-")
    roles = [m["role"] for m in sent.json["messages"]]
    assert roles[0] == "system"
    assert "user" in roles
    assert "say hi" in orjson.dumps(sent.json["messages"]).decode()
    assert {t["function"]["name"] for t in sent.json["tools"]} >= {"Bash", "Read"}


async def test_claude_code_answers_from_a_responses_upstream(
    nursery: trio.Nursery, claude: Path, project: Path, upstream: FakeUpstream
) -> None:
    """Nothing Claude Code always sends is refused: `thinking`, `context_management` and the like are hints, dropped."""
    proxy = await proxy_to(nursery, upstream, "resp")
    answer = Reply(tokens=("Hi", " from", " Responses."))
    assert await say_hi(claude, proxy, project, upstream, answer) == "Hi from Responses."
    [sent] = upstream.requests
    assert sent.path == "/v1/responses"
    assert {"Bash", "Read"} <= {tool["name"] for tool in sent.json["tools"]}


async def test_claude_code_runs_a_tool_through_an_openai_upstream(
    claude: Path, project: Path, upstream: FakeUpstream, proxy_to_openai: str
) -> None:
    read_note = ToolCall("call_read_1", "Read", orjson.dumps({"file_path": str(project / "note.txt")}).decode())
    upstream.push(Reply(tokens=("Reading it.",), tool_calls=[read_note]), Reply(tokens=("It", " says", " pineapple.")))

    run = await run_claude(claude, proxy_to_openai, project, "what does note.txt say?")

    assert cli_answer(run).strip().endswith("It says pineapple.")
    [_, second] = upstream.requests
    call = next(m for m in second.json["messages"] if m.get("tool_calls"))
    assert call["tool_calls"][0]["id"] == "call_read_1"
    result = next(m for m in second.json["messages"] if m["role"] == "tool")
    assert result["tool_call_id"] == "call_read_1"
    assert "The secret word is pineapple." in orjson.dumps(result["content"]).decode()


async def test_a_stream_that_fails_after_text_is_answered_again_whole(
    claude: Path, project: Path, upstream: FakeUpstream, proxy_to_openai: str
) -> None:
    # The delivered half is not shown as the answer: the stream ended in `event: error`, not `message_stop`.
    assert await say_hi(claude, proxy_to_openai, project, upstream, *HALF_THEN_WHOLE) == "The whole answer."
    assert len(upstream.requests) == 2


async def test_claude_code_passes_through_to_an_anthropic_upstream_whole(
    claude: Path, project: Path, upstream: FakeUpstream, proxy_to_anthropic: str
) -> None:
    answer = Reply(tokens=("Hi", " from", " the", " Anthropic", " side."))
    assert await say_hi(claude, proxy_to_anthropic, project, upstream, answer) == "Hi from the Anthropic side."
    assert await answer_statuses(proxy_to_anthropic) == {"200": 1}
    [sent] = upstream.requests
    assert sent.path.startswith("/v1/messages")
    assert {"thinking", "context_management", "output_config", "metadata", "system", "tools"} <= sent.json.keys()
    assert any(message["role"] == "system" for message in sent.json["messages"])
    assert "claude-code-20250219" in sent.headers["anthropic-beta"]
    assert sent.headers["x-api-key"] == ANTHROPIC_KEY  # the proxy's key, never the client's


async def test_claude_code_retries_a_failed_stream_without_streaming(
    claude: Path, project: Path, upstream: FakeUpstream, proxy_to_anthropic: str
) -> None:
    assert await say_hi(claude, proxy_to_anthropic, project, upstream, *HALF_THEN_WHOLE) == "The whole answer."
    [streamed, retried] = upstream.requests
    # The proxy streams from the upstream either way (a non-streaming answer is folded from
    # the stream); what marks Claude Code's non-streaming retry in the body it passes on is
    # its smaller `max_tokens` (tests/fixtures/anthropic/claude_code_nonstream_retry_request.json).
    assert retried.json["max_tokens"] < streamed.json["max_tokens"]
    assert retried.json["messages"] == streamed.json["messages"]
