#!/usr/bin/env python3
"""
The recovery fault matrix (issue 13): each fault of the README's table, played by a scripted
upstream on loopback, through an in-process proxy and the official `openai` SDK, with the
outcome the client got and its time to answer. Prints the table as Markdown.

Time is trio's MockClock (it jumps whenever every task waits), so a case with a 20 s first
token takes milliseconds and its times are exact: they are the proxy's own decisions, not
the machine's speed. Bounded: twelve cases, at most a dozen requests each, loopback only.

The recovery settings (`hedge_after`, `continuation`, `context_fallbacks`, `breaker`,
`base_urls`) are applied only where the checkout knows them, so the same script measures a
checkout from before recovery (issue 13) with what it had: retries and fallbacks.

    python benchmarks/fault_matrix.py                          # this checkout
    /path/to/old/.venv/bin/python benchmarks/fault_matrix.py --checkout /path/to/old
"""

from __future__ import annotations

import argparse
import importlib.util
import logging
import sys
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

CANONICAL = tuple(f" w{i}" if i % 7 else f" w{i}." for i in range(60))
"""The answer every case expects: 60 tokens, some ending a sentence."""
MESSAGES = [{"role": "user", "content": "go"}]
PREFILL_REFUSAL = "This model does not support assistant message prefill"


@dataclass
class Outcome:
    answers: list[str] = field(default_factory=list)
    """What each request got: `whole text`, `HTTP 400`, or `error after N characters`."""
    seconds: list[float] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)


@dataclass
class Case:
    fault: str
    play: Callable[[Any], Awaitable[Outcome]]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--checkout", type=Path, default=Path(__file__).resolve().parents[1], help="the trioproxy tree")
    args = parser.parse_args(argv)
    sys.path.insert(0, str(args.checkout.resolve()))
    import trio
    import trio.testing

    logging.basicConfig(level=logging.ERROR)  # the breakers' warnings are part of the outcome, not of the table
    recovery = importlib.util.find_spec("trioproxy._continuation") is not None
    print(f"trioproxy from {args.checkout} ({'with' if recovery else 'without'} recovery)\n")
    print("| fault | what the client got | time to answer | upstream requests (left open) |")
    print("|---|---|---|---|")
    for case in cases(recovery):
        world = World(recovery)
        outcome = trio.run(world.run, case.play, clock=trio.testing.MockClock(autojump_threshold=0))
        print(f"| {case.fault} | {summary(outcome.answers)} | {times(outcome.seconds)} | {world.upstream_counts()} |")
    return 0


class World:
    """The scripted upstreams of one case and the proxy in front of them, on one MockClock."""

    def __init__(self, recovery: bool) -> None:
        self.recovery = recovery
        self.upstreams: dict[str, Any] = {}

    async def run(self, play: Callable[[World], Awaitable[Outcome]]) -> Outcome:
        import trio

        async with trio.open_nursery() as nursery:
            self.nursery = nursery
            outcome = await play(self)
            nursery.cancel_scope.cancel()
        return outcome

    async def upstream(self, name: str, *replies: Any) -> Any:
        from trioproxy.testing import open_fake_upstream

        upstream = await open_fake_upstream(self.nursery, Script(replies))
        self.upstreams[name] = upstream
        return upstream

    @staticmethod
    def script(upstream: Any) -> Script:  # a FakeUpstream of the checkout measured
        """The upstream's `Script`: `replies` today, `_replies` in a checkout from before it was public."""
        return upstream.replies if hasattr(upstream, "replies") else upstream._replies

    def upstream_counts(self) -> str:
        parts = []
        for name, upstream in self.upstreams.items():
            resets = self.script(upstream).resets
            left_open = sum(
                1 for r in upstream.requests if not r.completed and not r.disconnected.is_set() and id(r) not in resets
            )
            parts.append(f"{name} {upstream.request_count}" + (f" ({left_open})" if left_open else ""))
        return ", ".join(parts)

    async def ask(
        self,
        tables: dict[str, dict[str, Any]],
        *,
        recovery: dict[str, dict[str, Any]],
        policy: dict[str, Any],
        model: str,
        requests: int = 1,
        pause_after: tuple[int, float, Callable[[], None]] | None = None,
    ) -> Outcome:
        """`requests` streamed chat completions of `model`; `recovery` settings join `tables` where known."""
        import httpx
        import openai
        import trio

        from trioproxy import create_app, parse_config

        if self.recovery:
            tables = {name: {**table, **recovery.get(name, {})} for name, table in tables.items()}
        config = parse_config({**policy, "providers": tables}, environ={})
        app = create_app(config)
        outcome = Outcome()
        async with app.test_app():
            http = httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://proxy.test")
            async with openai.AsyncOpenAI(
                base_url="http://proxy.test/v1", api_key="k", max_retries=0, http_client=http
            ) as client:
                await client.models.list()  # the SDK's platform lookup, in a thread: not part of a case's time
                for number in range(requests):
                    if pause_after is not None and number == pause_after[0]:
                        pause_after[2]()
                        await trio.sleep(pause_after[1])
                    start = trio.current_time()
                    outcome.answers.append(await answer(client, model))
                    outcome.seconds.append(trio.current_time() - start)
        return outcome


async def answer(client: Any, model: str) -> str:
    import openai

    text = ""
    try:
        stream = await client.chat.completions.create(model=model, messages=MESSAGES, stream=True)
        async for chunk in stream:
            text += (chunk.choices[0].delta.content or "") if chunk.choices else ""
    except openai.APIStatusError as exc:
        if not text and exc.status_code:
            return f"HTTP {exc.status_code}"
        return f"error after {len(text)} characters"
    except openai.APIError:
        return f"error after {len(text)} characters"
    return "the whole text" if text == "".join(CANONICAL) else f"wrong text ({len(text)} characters)"


class Script:
    """
    An upstream's replies in turn (the last one for every request after), where `CONTINUE`
    answers like a model that continues a final assistant message, and `REFUSE_PREFILL` like
    one that takes none; without one, the whole answer.
    """

    def __init__(self, replies: tuple[Any, ...]) -> None:
        self.replies = list(replies)
        self.resets: set[int] = set()
        """The requests this upstream itself cut (`reset_after`): closed, not left open."""

    def __call__(self, request: Any) -> Any:
        from trioproxy.testing import Reply

        reply = self.replies.pop(0) if len(self.replies) > 1 else self.replies[0]
        if getattr(reply, "reset_after", None) is not None:
            self.resets.add(id(request))
        if reply in (CONTINUE, REFUSE_PREFILL):
            prefix = assistant_prefix(request.json)
            if prefix is None:
                return Reply(tokens=CANONICAL)
            if reply == REFUSE_PREFILL:
                return Reply(status=400, error_message=PREFILL_REFUSAL)
            return Reply(tokens=rest_of(prefix))
        return reply


CONTINUE = "continue"
REFUSE_PREFILL = "refuse prefill"


def assistant_prefix(body: dict[str, Any]) -> str | None:
    last = (body.get("messages") or [{}])[-1]
    if last.get("role") != "assistant":
        return None
    content = last.get("content")
    return content if isinstance(content, str) else "".join(part.get("text", "") for part in content)


def rest_of(prefix: str) -> tuple[str, ...]:
    """What follows `prefix` in the canonical text: whitespace a prefill left out is written again."""
    text = "".join(CANONICAL)
    assert text.startswith(prefix), prefix
    return (text[len(prefix) :],)


def openai_table(upstream: Any, **extra: Any) -> dict[str, Any]:
    return {"type": "openai", "base_url": upstream.url + "/v1", **extra}


def chunk(content: str) -> bytes:
    import orjson

    choice = {"index": 0, "delta": {"content": content}, "finish_reason": None}
    return b"data: " + orjson.dumps({"id": "c", "object": "chat.completion.chunk", "choices": [choice]}) + b"\n\n"


def cases(recovery: bool) -> list[Case]:  # noqa: C901 - one closure per scenario: the matrix reads as one table
    from trioproxy.testing import Reply

    whole = Reply(tokens=CANONICAL)
    vllm = {"continuation": "continue_final_message"}

    async def no_response(world: World) -> Outcome:
        primary = await world.upstream("primary", Reply(headers_delay=1000))
        backup = await world.upstream("backup", whole)
        tables = {"primary": openai_table(primary, fallbacks=["backup/m"]), "backup": openai_table(backup)}
        policy = {"timeouts": {"first_token_timeout": 5}, "retry": {"max_retries": 2}}
        return await world.ask(tables, recovery={}, policy=policy, model="primary/m")

    async def slow_first_token(world: World) -> Outcome:
        primary = await world.upstream("primary", Reply(tokens=CANONICAL, ttft=20))
        backup = await world.upstream("backup", Reply(tokens=CANONICAL, ttft=0.5))
        tables = {"primary": openai_table(primary, fallbacks=["backup/m"]), "backup": openai_table(backup)}
        recovery = {"primary": {"hedge_after": 3}}
        return await world.ask(tables, recovery=recovery, policy={}, model="primary/m")

    def broken(fault: dict[str, Any], policy: dict[str, Any] | None = None) -> Callable[[World], Awaitable[Outcome]]:
        async def play(world: World) -> Outcome:
            upstream = await world.upstream("vllm", Reply(tokens=CANONICAL, **fault), CONTINUE)
            tables = {"vllm": openai_table(upstream)}
            return await world.ask(tables, recovery={"vllm": vllm}, policy=policy or {}, model="vllm/m")

        return play

    async def malformed_tenth(world: World) -> Outcome:
        nine = b"".join(chunk(token) for token in CANONICAL[:9])
        upstream = await world.upstream("vllm", Reply(raw_body=nine + b"data: {not json\n\n"), CONTINUE)
        return await world.ask({"vllm": openai_table(upstream)}, recovery={"vllm": vllm}, policy={}, model="vllm/m")

    async def no_done(world: World) -> Outcome:
        upstream = await world.upstream("vllm", Reply(tokens=CANONICAL, omit_done=True))
        return await world.ask({"vllm": openai_table(upstream)}, recovery={}, policy={}, model="vllm/m")

    async def context_length(world: World) -> Outcome:
        too_long = "This model's maximum context length is 8192 tokens. However, you requested 9000 tokens."
        small = await world.upstream("small", Reply(status=400, error_message=too_long))
        large = await world.upstream("large", whole)
        tables = {"small": openai_table(small), "large": openai_table(large)}
        recovery = {"small": {"context_fallbacks": ["large/m-128k"]}}
        return await world.ask(tables, recovery=recovery, policy={}, model="small/m")

    async def content_filter(world: World) -> Outcome:
        primary = await world.upstream("primary", Reply(status=400, error_message="the prompt was filtered"))
        backup = await world.upstream("backup", whole)
        tables = {"primary": openai_table(primary, fallbacks=["backup/m"]), "backup": openai_table(backup)}
        return await world.ask(tables, recovery={}, policy={"retry": {"max_retries": 2}}, model="primary/m")

    async def rejects_prefill(world: World) -> Outcome:
        primary = await world.upstream("primary", Reply(tokens=CANONICAL, reset_after=40))
        backup = await world.upstream("claude", REFUSE_PREFILL)
        tables = {
            "primary": openai_table(primary, fallbacks=["claude/m"]),
            "claude": {"type": "anthropic", "base_url": backup.url},
        }
        return await world.ask(tables, recovery={}, policy={}, model="primary/m", requests=2)

    async def down_then_healthy(world: World) -> Outcome:
        primary = await world.upstream("primary", Reply(status=502))
        backup = await world.upstream("backup", whole)
        tables = {"primary": openai_table(primary, fallbacks=["backup/m"]), "backup": openai_table(backup)}
        recovery = {"primary": {"breaker": {"failures": 2, "cooldown": 30}}}

        def heal() -> None:
            world.script(primary).replies = [whole]

        policy = {"retry": {"max_retries": 2}}
        return await world.ask(
            tables, recovery=recovery, policy=policy, model="primary/m", requests=7, pause_after=(5, 30, heal)
        )

    async def replica_down(world: World) -> Outcome:
        down = await world.upstream("down", Reply(status=503))
        up1 = await world.upstream("up1", whole)
        up2 = await world.upstream("up2", whole)
        if world.recovery:  # one provider, three targets
            urls = [u.url + "/v1" for u in (down, up1, up2)]
            tables = {"vllm": {"type": "openai", "base_urls": urls, "breaker": {"failures": 2, "cooldown": 60}}}
        else:  # one base_url a provider: the replicas as fallbacks
            tables = {
                "vllm": openai_table(down, fallbacks=["up1/m", "up2/m"]),
                "up1": openai_table(up1),
                "up2": openai_table(up2),
            }
        policy = {"retry": {"max_retries": 2, "base_delay_ms": 10}}
        return await world.ask(tables, recovery={}, policy=policy, model="vllm/m", requests=12)

    silence = {"timeouts": {"silence_timeout": 5}}
    return [
        Case("no response at all (`first_token_timeout = 5`, 2 retries, a fallback)", no_response),
        Case("first token after 20 s (`hedge_after = 3`, a fallback answering in 0.5 s)", slow_first_token),
        Case("stream cut after 40 of 60 tokens", broken({"reset_after": 40})),
        Case("stall after 20 tokens (`silence_timeout = 5`)", broken({"stall_after": 20}, silence)),
        Case("in-stream `overloaded`-class error after 30 tokens", broken({"error_after": 30})),
        Case("a malformed tenth event", malformed_tenth),
        Case("no `[DONE]` after the finish reason", no_done),
        Case("context length exceeded (`context_fallbacks`)", context_length),
        Case("content-filter refusal (400; 2 retries, a fallback)", content_filter),
        Case("stream cut, and the fallback rejects prefill (2 requests)", rejects_prefill),
        Case("a primary down (502), then healthy again after 30 s (7 requests)", down_then_healthy),
        Case("one of three replicas down (503; 12 requests)", replica_down),
    ]


def summary(answers: list[str]) -> str:
    """`the whole text`, or each distinct answer with how many requests got it."""
    distinct = dict.fromkeys(answers)
    if len(distinct) == 1:
        (only,) = distinct
        return only if len(answers) == 1 else f"{len(answers)} × {only}"
    return ", ".join(f"{answers.count(a)} × {a}" for a in distinct)


def times(seconds: list[float]) -> str:
    shown = [f"{s:.2f}".rstrip("0").rstrip(".") + " s" for s in seconds]
    if len(shown) == 1:
        return shown[0]
    if len(set(shown)) == 1:
        return f"{shown[0]} each"
    return f"{sum(seconds):.2f} s in all: " + ", ".join(shown)


if __name__ == "__main__":
    sys.exit(main())
