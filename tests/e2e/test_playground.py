"""
The playground page at `/`, in a real headless Chromium: Debian's `/usr/bin/chromium` (which
`make test` installs), driven by Playwright's sync API.

Playwright's sync API runs its own asyncio loop and is bound to the thread that started it, so
one thread owns the browser for the whole module (`Chromium`). Each test hands that thread a
function of a fresh page (`await chromium.run(steps)`, through `trio.to_thread.run_sync`) while
the proxy (real hypercorn) and `FakeUpstream` run in trio; the steps call back into trio with
`session.trio(...)`. Every browser wait (actions and `expect`) is bounded by `WAIT_MS`.

Screenshots go to `$TRIOPROXY_TEST_ARTIFACTS` (default `.artifacts/`): the streamed answer in
light and dark (narrow) layouts, a stopped and a failed stream, and the page of any browser
test that fails.
"""

from __future__ import annotations

import os
import re
from collections.abc import Awaitable, Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any, TypeVar

import httpx
import pytest
import trio

from tests.conftest import openai_sdk, serve_proxy, streamed_chat_text
from trioproxy import Config, SSEDecoder, parse_config, serve
from trioproxy.testing import FakeUpstream, RecordedRequest, Reply

try:
    from playwright.sync_api import Browser, Page, Playwright, expect, sync_playwright
except ImportError:  # reported by the `chromium` fixture, so the rest of the suite still runs
    sync_playwright = None

T = TypeVar("T")

CHROMIUM = "/usr/bin/chromium"
#: Without the background-networking flags Chromium keeps trying to reach its services.
CHROMIUM_ARGS = [
    "--no-sandbox",  # root in a container
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]
#: The longest any single browser step may take (ms, Playwright's unit).
WAIT_MS = 10_000
ARTIFACTS = Path(os.environ.get("TRIOPROXY_TEST_ARTIFACTS") or Path(__file__).parents[2] / ".artifacts")
SIM_MODELS = ["sim/echo", "sim/lorem", "sim/tools"]
LOREM_TOKENS = 32


@dataclass
class PageSession:
    """A fresh page (its own context: no shared sessionStorage) and a way back into trio."""

    page: Page
    origin: str
    trio_token: trio.lowlevel.TrioToken
    requests: list[str] = field(default_factory=list)
    page_errors: list[str] = field(default_factory=list)

    def trio(self, afn: Callable[..., Awaitable[T]], *args: Any) -> T:
        """`await afn(*args)` in trio, from the browser's thread, within `WAIT_MS`."""
        return trio.from_thread.run(_within, WAIT_MS / 1000, afn, *args, trio_token=self.trio_token)

    def open(self) -> None:
        self.page.goto(self.origin + "/")
        expect(self.page.get_by_test_id("model")).to_be_enabled()

    def select_model(self, model: str) -> None:
        if model in self.page.get_by_test_id("model").locator("option").all_inner_texts():
            self.page.get_by_test_id("model").select_option(model)
        else:
            self.page.get_by_test_id("model").select_option(label="Other model…")
            self.page.get_by_test_id("custom-model").fill(model)

    def send(self, model: str, prompt: str) -> None:
        self.select_model(model)
        self.page.get_by_test_id("prompt").fill(prompt)
        self.page.get_by_test_id("send").click()

    def wait_for_state(self, state: str) -> None:
        expect(self.page.get_by_test_id("status")).to_have_attribute("data-state", state)

    def text(self, test_id: str) -> str:
        return self.page.get_by_test_id(test_id).inner_text()


async def _within(seconds: float, afn: Callable[..., Awaitable[T]], *args: Any) -> T:
    with trio.fail_after(seconds):
        return await afn(*args)


class Chromium:
    """One headless Chromium, owned by one thread for its whole life."""

    def __init__(self) -> None:
        self._thread = ThreadPoolExecutor(max_workers=1, thread_name_prefix="chromium")
        self._playwright: Playwright | None = None
        self._browser: Browser | None = None

    def start(self) -> None:
        self._thread.submit(self._launch).result(timeout=60)

    def close(self) -> None:
        self._thread.submit(self._shut_down).result(timeout=60)
        self._thread.shutdown()

    async def run(self, origin: str, steps: Callable[[PageSession], T], **context: Any) -> T:
        """Run `steps` on a fresh page in the browser's thread; a failing page is screenshotted."""
        job = partial(self._in_fresh_page, origin, trio.lowlevel.current_trio_token(), steps, context)
        return await trio.to_thread.run_sync(lambda: self._thread.submit(job).result())

    def _launch(self) -> None:
        expect.set_options(timeout=WAIT_MS)
        self._playwright = sync_playwright().start()
        self._browser = self._playwright.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)

    def _shut_down(self) -> None:
        if self._browser is not None:
            self._browser.close()
        if self._playwright is not None:
            self._playwright.stop()

    def _in_fresh_page(
        self, origin: str, token: trio.lowlevel.TrioToken, steps: Callable[[PageSession], T], context: dict
    ) -> T:
        assert self._browser is not None
        browser_context = self._browser.new_context(**{"viewport": {"width": 1000, "height": 800}, **context})
        try:
            page = browser_context.new_page()
            page.set_default_timeout(WAIT_MS)
            session = PageSession(page, origin, token)
            page.on("request", lambda request: session.requests.append(request.url))
            page.on("pageerror", lambda error: session.page_errors.append(str(error)))
            try:
                result = steps(session)
            except BaseException:
                test = os.environ.get("PYTEST_CURRENT_TEST", "unknown").split("::")[-1].split(" ")[0]
                name = re.sub(r"[^\w.-]", "_", test)
                page.screenshot(path=ARTIFACTS / f"failed-{name}.png", full_page=True)
                raise
            assert not session.page_errors, f"the page raised: {session.page_errors}"
            strangers = [url for url in session.requests if not url.startswith(origin + "/")]
            assert not strangers, f"the page reached beyond its proxy: {strangers}"
            return result
        finally:
            browser_context.close()


@pytest.fixture(scope="module")
def chromium() -> Iterator[Chromium]:
    if not os.access(CHROMIUM, os.X_OK):
        pytest.fail(
            f"{CHROMIUM} is missing: the playground tests drive Debian's Chromium. `make test` installs it "
            "(apt-get install --no-install-recommends chromium)",
            pytrace=False,
        )
    if sync_playwright is None:
        pytest.fail("the playwright package is missing: `make test` installs the test extra (.[test])", pytrace=False)
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    for stale in ARTIFACTS.glob("failed-*.png"):  # from an earlier run: not this one's failures
        stale.unlink()
    browser = Chromium()
    try:
        browser.start()
        yield browser
    finally:
        browser.close()


def playground_config(upstream: FakeUpstream, **extra: Any) -> Config:
    """`sim` with a visible pace (about 40 tokens/s) and `up/m`, an OpenAI provider on `upstream`."""
    return parse_config(
        {
            "retry": {"max_retries": 0},
            "server": {"write_timeout": 5},
            "providers": {
                "sim": {"type": "simulated", "ttft_ms": 150, "token_interval_ms": 25, "lorem_tokens": LOREM_TOKENS},
                "up": {
                    "type": "openai",
                    "base_url": upstream.url + "/v1",
                    "models": ["m"],
                    "heartbeat_interval": 0.1,
                },
            },
            **extra,
        },
        environ={},
    )


@pytest.fixture
async def proxy(nursery: trio.Nursery, upstream: FakeUpstream) -> str:
    return await serve_proxy(nursery, playground_config(upstream))


@pytest.fixture
async def keyed_proxy(nursery: trio.Nursery, upstream: FakeUpstream) -> str:
    config = playground_config(upstream, auth={"keys": ["key-one"]})
    return await serve_proxy(nursery, config)


# --- the page itself --------------------------------------------------------------------------


async def test_the_page_is_served_whole_and_stays_open_with_client_keys(keyed_proxy: str) -> None:
    async with httpx.AsyncClient() as http:
        page = await http.get(keyed_proxy + "/")
        models = await http.get(keyed_proxy + "/v1/models")
    assert page.status_code == 200
    assert page.headers["content-type"] == "text/html; charset=utf-8"
    assert "connect-src 'self'" in page.headers["content-security-policy"]
    assert "<title>trioproxy playground</title>" in page.text
    assert "://" not in page.text  # no CDN, no external URL of any kind
    assert models.status_code == 401


async def test_the_page_lists_the_models_and_picks_a_sim_one(chromium: Chromium, proxy: str) -> None:
    def steps(session: PageSession) -> tuple[list[str], str]:
        session.open()
        picker = session.page.get_by_test_id("model")
        return picker.locator("option").all_inner_texts(), picker.input_value()

    options, chosen = await chromium.run(proxy, steps)
    async with httpx.AsyncClient() as http:
        listed = [model["id"] for model in (await http.get(proxy + "/v1/models")).json()["data"]]
    assert listed == [*SIM_MODELS, "up/m"]
    assert options == [*listed, "Other model…"]
    assert chosen == "sim/lorem"


# --- streaming ----------------------------------------------------------------------------------


def _number(text: str) -> float:
    match = re.match(r"([\d.]+)", text)
    assert match, f"no number in {text!r}"
    return float(match.group(1))


async def test_a_sim_answer_streams_in_live_with_ttft_and_tokens_per_second(chromium: Chromium, proxy: str) -> None:
    async with openai_sdk(proxy, "unused") as sdk:
        stream = await sdk.chat.completions.create(
            model="sim/lorem", messages=[{"role": "user", "content": "Tell me"}], stream=True
        )
        expected = await streamed_chat_text(stream)
    assert len(expected.split()) == LOREM_TOKENS

    def steps(session: PageSession) -> dict[str, str]:
        page = session.page
        session.open()
        page.get_by_test_id("prompt").fill("Tell me")
        page.get_by_test_id("prompt").press("Control+Enter")
        session.wait_for_state("streaming")
        live = {"answer": session.text("answer"), "ttft": session.text("ttft")}
        expect(page.get_by_test_id("stop")).to_be_enabled()
        session.wait_for_state("complete")
        page.screenshot(path=ARTIFACTS / "playground-streamed.png", full_page=True)
        final = {name: session.text(name) for name in ("answer", "status", "ttft", "tokens", "tps", "elapsed")}
        expect(page.get_by_test_id("stop")).to_be_disabled()
        expect(page.get_by_test_id("error")).to_be_hidden()
        return {**final, "live_answer": live["answer"], "live_ttft": live["ttft"]}

    seen = await chromium.run(proxy, steps)
    assert seen["answer"] == expected
    assert expected.startswith(seen["live_answer"])
    assert len(seen["live_answer"]) < len(expected)
    assert seen["live_ttft"].endswith(" ms")  # measured as soon as the first token arrived
    assert seen["status"] == "Complete (finish reason: stop)"
    assert 150 <= _number(seen["ttft"]) < 5000  # the simulated 150 ms, plus the trip
    assert seen["tokens"] == f"{LOREM_TOKENS} reported"  # the proxy's usage chunk, not a count
    assert 5 <= _number(seen["tps"]) <= 200  # 25 ms apart: about 40 a second
    assert _number(seen["elapsed"]) >= 0.9  # 150 ms + 31 gaps of 25 ms


async def test_the_dark_narrow_layout_streams_too(chromium: Chromium, proxy: str) -> None:
    def steps(session: PageSession) -> str:
        page = session.page
        session.open()
        session.send("sim/echo", "Narrow screens and dark rooms stream the same words")
        session.wait_for_state("complete")
        page.screenshot(path=ARTIFACTS / "playground-dark-narrow.png", full_page=True)
        width = page.evaluate("document.documentElement.scrollWidth")
        assert width <= 390, f"the page scrolls sideways at 390 px ({width} px wide)"
        return session.text("answer")

    answer = await chromium.run(proxy, steps, viewport={"width": 390, "height": 844}, color_scheme="dark")
    assert answer == "Narrow screens and dark rooms stream the same words"


async def test_a_tool_call_is_shown_as_it_streams(chromium: Chromium, proxy: str) -> None:
    async with openai_sdk(proxy, "unused") as sdk:
        stream = await sdk.chat.completions.create(
            model="sim/tools", messages=[{"role": "user", "content": "Weather in Lisbon?"}], stream=True
        )
        name = arguments = ""
        async for chunk in stream:
            for call in chunk.choices[0].delta.tool_calls or [] if chunk.choices else []:
                name += call.function.name or ""
                arguments += call.function.arguments or ""
    assert name == "get_weather"
    assert "Weather in Lisbon?" in arguments

    def steps(session: PageSession) -> tuple[str, str, str]:
        session.open()
        session.send("sim/tools", "Weather in Lisbon?")
        session.wait_for_state("complete")
        answer = session.page.get_by_test_id("answer")
        return session.text("status"), session.text("tool-calls"), answer.get_attribute("data-placeholder") or ""

    status, calls, placeholder = await chromium.run(proxy, steps)
    assert status == "Complete (finish reason: tool_calls)"
    assert calls == f"→ {name}({arguments})"
    assert placeholder == "No text: the model asked for the tool call below."


async def test_keep_alive_comments_before_the_first_token_are_skipped(
    chromium: Chromium, proxy: str, upstream: FakeUpstream
) -> None:
    reply = Reply(tokens=("Worth", " the", " wait"), ttft=0.5)
    upstream.push(reply)
    async with httpx.AsyncClient() as http:
        body = {"model": "up/m", "messages": [{"role": "user", "content": "hi"}], "stream": True}
        raw = (await http.post(proxy + "/v1/chat/completions", json=body)).text
    assert raw.startswith(": keep-alive\n\n")  # what the page has to skip

    def steps(session: PageSession) -> str:
        session.open()
        upstream.push(reply)
        session.send("up/m", "hi")
        session.wait_for_state("complete")
        return session.text("answer")

    assert await chromium.run(proxy, steps) == "Worth the wait"


async def test_stop_cancels_the_stream_and_its_upstream_request(
    chromium: Chromium, proxy: str, upstream: FakeUpstream
) -> None:
    upstream.push(Reply(tokens=("tick ",) * 2000, interval=0.01))  # 20 s unless stopped

    def steps(session: PageSession) -> tuple[str, str]:
        page = session.page
        session.open()
        session.send("up/m", "count")
        expect(page.get_by_test_id("answer")).to_contain_text("tick tick tick")
        page.get_by_test_id("stop").click()
        session.wait_for_state("stopped")
        page.screenshot(path=ARTIFACTS / "playground-stopped.png", full_page=True)
        expect(page.get_by_test_id("send")).to_be_enabled()
        expect(page.get_by_test_id("error")).to_be_hidden()
        return session.text("status"), session.text("answer")

    status, answer = await chromium.run(proxy, steps)
    await _assert_hung_up(upstream.requests[-1])
    assert 3 <= answer.count("tick") < 2000
    assert re.fullmatch(r"Stopped: the request was cancelled after \d+ tokens", status)


async def test_escape_stops_too_even_before_the_first_token(
    chromium: Chromium, proxy: str, upstream: FakeUpstream
) -> None:
    upstream.push(Reply(tokens=("late",), ttft=20))

    def steps(session: PageSession) -> str:
        session.open()
        session.send("up/m", "wait for it")
        session.trio(upstream.wait_for_requests, 1)
        session.page.keyboard.press("Escape")
        session.wait_for_state("stopped")
        return session.text("status")

    assert await chromium.run(proxy, steps) == "Stopped: the request was cancelled after 0 tokens"
    await _assert_hung_up(upstream.requests[-1])


async def _assert_hung_up(recorded: RecordedRequest) -> None:
    """The browser's abort reached the upstream: the proxy closed its request, soon."""
    with trio.fail_after(1):
        await recorded.disconnected.wait()
    assert not recorded.completed


# --- errors ------------------------------------------------------------------------------------


async def test_errors_are_shown_plainly(chromium: Chromium, proxy: str, upstream: FakeUpstream) -> None:
    def error_after(session: PageSession, model: str) -> tuple[str, str, str]:
        session.send(model, "hi")
        session.wait_for_state("error")
        expect(session.page.get_by_test_id("error")).to_be_visible()
        return session.text("error-title"), session.text("error-message"), session.text("error-detail")

    def steps(session: PageSession) -> dict[str, Any]:
        session.open()
        seen: dict[str, Any] = {"unknown": error_after(session, "nope/x")}
        upstream.push(Reply(status=500, error_message="the upstream is on fire"))
        seen["status"] = error_after(session, "up/m")
        upstream.push(Reply(tokens=("one", " two", " three"), error_after=2))
        seen["in_stream"] = error_after(session, "up/m")
        seen["partial_answer"] = session.text("answer")
        session.page.screenshot(path=ARTIFACTS / "playground-error.png", full_page=True)
        upstream.push(Reply(tokens=("fine",)))
        session.send("up/m", "again")
        session.wait_for_state("complete")
        expect(session.page.get_by_test_id("error")).to_be_hidden()
        return seen

    seen = await chromium.run(proxy, steps)
    title, message, detail = seen["unknown"]
    assert title == "The proxy refused the request (HTTP 404 Not Found)"
    assert message.startswith("no route for model 'nope/x'")
    assert detail.startswith("type: not_found_error")
    title, message, _ = seen["status"]
    assert title == "The request failed (HTTP 500 Internal Server Error)"
    assert "the upstream is on fire" in message
    title, message, detail = seen["in_stream"]
    assert title == "The stream failed"
    assert message.startswith("upstream failure")
    assert detail.startswith("type: server_error")
    assert seen["partial_answer"] == "one two"


@pytest.mark.parametrize(
    ("body", "title", "message"),
    [
        ('data: {"choices": [{"delta": {"content": "half"}}]}\n\n', "The stream was cut short", "it ended without"),
        ('data: {"choices": [{"delta": {"content": "half"}}]}\n\ndata: {oops\n\n', "Malformed stream", "not JSON"),
        ('data: {"choices": [{"delta": {"content": "half"}}]}\n\ndata: 5\n\n', "Malformed stream", "not a JSON"),
    ],
)
async def test_streams_the_proxy_never_sends_still_fail_plainly(
    chromium: Chromium, proxy: str, body: str, title: str, message: str
) -> None:
    """As a hop between the page and the proxy might cut or garble them (the browser serves these)."""

    def steps(session: PageSession) -> tuple[str, str, str]:
        session.open()
        session.page.route(
            "**/v1/chat/completions", lambda route: route.fulfill(body=body, content_type="text/event-stream")
        )
        session.send("sim/echo", "hi")
        session.wait_for_state("error")
        return session.text("error-title"), session.text("error-message"), session.text("answer")

    seen_title, seen_message, answer = await chromium.run(proxy, steps)
    assert (seen_title, answer) == (title, "half")
    assert seen_message.startswith(message)


async def test_a_proxy_that_is_gone_is_a_network_error(chromium: Chromium, upstream: FakeUpstream) -> None:
    proxy_scope = trio.CancelScope()
    proxy_gone = trio.Event()

    async def run_proxy(*, task_status: trio.TaskStatus[list[str]]) -> None:
        try:
            with proxy_scope:
                await serve(playground_config(upstream), host="127.0.0.1", port=0, task_status=task_status)
        finally:
            proxy_gone.set()

    async def stop_proxy() -> None:
        proxy_scope.cancel()
        await proxy_gone.wait()

    def steps(session: PageSession) -> tuple[str, str]:
        session.open()
        session.trio(stop_proxy)  # the page stays, the proxy goes
        session.send("sim/echo", "anyone there?")
        session.wait_for_state("error")
        return session.text("error-title"), session.text("error-message")

    async with trio.open_nursery() as nursery:
        origin = (await nursery.start(run_proxy))[0]
        title, message = await chromium.run(origin, steps)
    assert title == "Network error"
    assert message.startswith("could not reach the proxy (")


# --- client keys ------------------------------------------------------------------------------------


async def test_with_client_keys_the_page_shows_the_401_then_works_with_the_key(
    chromium: Chromium, keyed_proxy: str
) -> None:
    def steps(session: PageSession) -> dict[str, Any]:
        page = session.page
        page.goto(keyed_proxy + "/")
        error = page.get_by_test_id("error")
        expect(error).to_contain_text("HTTP 401")
        seen: dict[str, Any] = {"models_error": error.inner_text()}
        session.send("sim/echo", "let me in")
        session.wait_for_state("error")
        seen["send_error"] = error.inner_text()
        page.get_by_test_id("api-key").fill("key-one")
        expect(page.get_by_test_id("model")).to_have_value("sim/lorem")  # the models list loaded
        session.send("sim/echo", "let me in")
        session.wait_for_state("complete")
        expect(error).to_be_hidden()
        seen["answer"] = session.text("answer")
        page.reload()  # the key is kept for the tab
        expect(page.get_by_test_id("model")).to_have_value("sim/echo")
        seen["key_after_reload"] = page.get_by_test_id("api-key").input_value()
        expect(error).to_be_hidden()
        return seen

    seen = await chromium.run(keyed_proxy, steps)
    assert "Could not list the models (HTTP 401 Unauthorized)" in seen["models_error"]
    assert "missing or invalid API key" in seen["models_error"]
    assert "The proxy refused the request (HTTP 401 Unauthorized)" in seen["send_error"]
    assert seen["answer"] == "let me in"
    assert seen["key_after_reload"] == "key-one"


# --- the page's SSE parser, against trioproxy's own decoder --------------------------------------

SSE_STREAMS = [
    'data: {"a": 1}\n\n: keep-alive\n\ndata: [DONE]\n\n',
    "data: one\r\ndata: two\r\n\r\n:comment\rdata:three\r\rdata: x\n\n",
    "event: error\ndata: {}\n\nid: 7\nretry: 10\ndata\n\ndata: last without its blank line",
    "\ufeffdata: bom first\n\nfield-only\ndata:  two spaces, café, €\n\n",
]


@pytest.mark.parametrize("stream", SSE_STREAMS)
async def test_the_pages_sse_parser_agrees_with_trioproxys_decoder_at_every_split(
    chromium: Chromium, proxy: str, stream: str
) -> None:
    decoder = SSEDecoder()
    expected = [[event.event, event.data] for event in [*decoder.feed(stream.encode()), *decoder.close()]]
    assert expected  # the stream has events at all

    def steps(session: PageSession) -> list[Any]:
        session.open()
        return session.page.evaluate(
            """(stream) => {
                const results = [];
                const bytes = new TextEncoder().encode(stream);
                for (let split = 0; split <= bytes.length; split++) {
                    for (const second of [split, Math.min(bytes.length, split + 1)]) {
                        const parser = new SSEParser();
                        const decoder = new TextDecoder();
                        const events = [];
                        for (const part of [[0, split], [split, second], [second, bytes.length]]) {
                            const text = decoder.decode(bytes.subarray(...part), {stream: true});
                            events.push(...parser.feed(text).map((e) => [e.type, e.data]));
                        }
                        events.push(...parser.feed(decoder.decode()).map((e) => [e.type, e.data]));
                        results.push(events);
                    }
                }
                return results;
            }""",
            stream,
        )

    results = await chromium.run(proxy, steps)
    assert len(results) == 2 * (len(stream.encode()) + 1)
    for events in results:
        assert events == expected
