"""
Requests near valid ones, made up by hypothesis, to every front through a real proxy (hypercorn
on 127.0.0.1:0, a `FakeUpstream` answering normally behind it), sent by a raw httpx client (the
SDKs validate what they send): whatever the body, headers or query, the answer comes within
`ANSWER_BOUND`, is never a 5xx (the upstream answers normally, so one would be the proxy's own
failure), a 4xx is in the protocol's own error shape, a 200 stream ends as its protocol ends a
whole stream, a body that is no JSON object is never answered 200, and the proxy logs no
unhandled error. One 3xx is allowed, werkzeug's own: a path with an empty segment (an id of
`/x` in `/v1/responses/{id}`) gets a 308 to the path without it, with an HTML body; whether
an API should redirect there at all is a question for the routing, not a parser's bug.

One proxy per test: hypothesis runs in a worker thread (`fuzz`) and each example is a request
made on the test's trio loop (`trio.from_thread.run`), so that shrinking replays against the
same server. Deterministic (`derandomize`, as no hypothesis profile says otherwise), as CI
must be; `FUZZ_EXAMPLES=2000` hunts longer (about five minutes).
"""

from __future__ import annotations

import dataclasses
import json
import logging
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any, Final
from urllib.parse import quote

import httpx
import orjson
import pytest
import trio
from hypothesis import HealthCheck, given
from hypothesis import strategies as st

from tests.conftest import proxy_config, serve_proxy
from tests.fuzzing import fuzzed, json_paths, replaced, value_at
from trioproxy import SSEDecoder
from trioproxy._config import AuthConfig
from trioproxy.testing import FakeUpstream, open_fake_upstream

#: Real seconds an answer may take, whole: a guard against a hang, not a measure (the upstream
#: answers at once; a busy two-core machine stretches that many times).
ANSWER_BOUND: Final = 10.0
CLIENT_KEY: Final = "client-key"
#: Every provider type the fronts translate to: Chat Completions, Anthropic, Responses, simulated.
MODELS: Final = ("up/m", "claude/m", "resp/m", "sim/echo", "sim/tools")
#: A long string among the values: far beyond any field's expected size, well within `max_body_bytes`.
LONG: Final = 20_000

#: 150 examples per test: the file runs in about half a minute on two cores.
FUZZ_SETTINGS: Final = fuzzed(150, HealthCheck.data_too_large)  # a server's answer per example


# --------------------------------------------------------------------------------------------
# What is sent: a valid body, mutated


@dataclass(frozen=True)
class Body:
    """A request body to send: `value` as JSON, unless `raw` (bytes that need not be JSON) is given."""

    value: Any = None
    raw: bytes | None = None

    def encoded(self) -> bytes:
        if self.raw is not None:
            return self.raw
        # The standard library's encoder, not orjson: it writes integers past 64 bits and NaN.
        return json.dumps(self.value).encode()

    @property
    def is_object(self) -> bool:
        """Whether the proxy sees a JSON object (else a 400 is the only right answer)."""
        try:
            return isinstance(orjson.loads(self.encoded()), dict)
        except orjson.JSONDecodeError:
            return False


leaves = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(min_value=-(2**63), max_value=2**63),
    st.sampled_from([0, -1, 10**30, -(10**30), 2**64]),
    st.floats(allow_nan=True, allow_infinity=True),  # NaN and Infinity: JSON's standard-library extension
    st.text(max_size=12),
    st.sampled_from(["", "x" * LONG, "user", "assistant", "text", "tool_use", "input_text", "message"]),
)
json_values = st.recursive(
    leaves,
    lambda children: st.lists(children, max_size=3) | st.dictionaries(st.text(max_size=8), children, max_size=3),
    max_leaves=6,
)


def deleted(value: Any, at: tuple[Any, ...]) -> Any:
    """`value` without what is at `at` (not the root)."""
    *parent_path, last = at
    parent = value_at(value, tuple(parent_path))
    if isinstance(parent, dict):
        rest: Any = {k: v for k, v in parent.items() if k != last}
    else:
        rest = [v for i, v in enumerate(parent) if i != last]
    return replaced(value, tuple(parent_path), rest)


@st.composite
def mutated(draw: st.DrawFn, value: Any) -> Any:
    """
    `value` with one to three changes: a value of another type (or of the same) in a place, a
    key gone, unknown keys added to an object, a place nested in arrays up to past the limit.
    """
    for _ in range(draw(st.integers(1, 3))):
        at = draw(st.sampled_from(json_paths(value)))
        old = value_at(value, at)
        change = draw(st.sampled_from(["replace", "delete", "add", "nest"]))
        if change == "delete" and at:
            value = deleted(value, at)
        elif change == "add" and isinstance(old, dict):
            extra = draw(st.dictionaries(st.text(max_size=10), json_values, min_size=1, max_size=2))
            value = replaced(value, at, {**old, **extra})
        elif change == "nest":
            for _level in range(draw(st.sampled_from([2, 50, 126, 127, 128, 200]))):
                old = [old]
            value = replaced(value, at, old)
        else:
            value = replaced(value, at, draw(json_values))
    return value


@st.composite
def raw_bodies(draw: st.DrawFn, valid: Any) -> Body:
    """Bytes that are not a JSON object: cut, spoilt, not UTF-8, another top-level value, nothing."""
    text = json.dumps(valid).encode()
    kind = draw(st.sampled_from(["cut", "bad_utf8", "top_level", "garbage", "empty"]))
    if kind == "cut":
        return Body(raw=text[: draw(st.integers(0, len(text) - 1))])
    if kind == "bad_utf8":
        at = draw(st.integers(0, len(text)))
        bad = draw(st.sampled_from([b"\xff", b"\xc3", b"\xed\xa0\x80", b"\xf8\x88\x80\x80\x80", b"\x80"]))
        return Body(raw=text[:at] + bad + text[at:])
    if kind == "top_level":
        return Body(value=draw(st.one_of(st.lists(json_values, max_size=2), leaves)))
    if kind == "garbage":
        return Body(raw=draw(st.binary(max_size=64)))
    return Body(raw=b"")


def bodies(valid: st.SearchStrategy[Any]) -> st.SearchStrategy[Body]:
    """Mostly valid bodies mutated; some valid as they are; some no JSON object at all."""
    return valid.flatmap(
        lambda body: st.one_of(st.just(Body(body)), mutated(body).map(Body), mutated(body).map(Body), raw_bodies(body))
    )


#: Any value a client can send (h11, on both sides, refuses a control character or an edge space).
header_values = st.one_of(
    st.text(st.characters(min_codepoint=0x20, max_codepoint=0xFF, exclude_characters="\x7f"), max_size=20),
    st.sampled_from(["", "2023-06-01", "é", "x" * 300]),
).map(lambda value: value.strip(" \t"))


@st.composite
def headers(draw: st.DrawFn) -> list[tuple[bytes, bytes]]:
    """A key (mostly the right one, as a bearer token or an `x-api-key`), then headers of any value."""
    chosen: list[tuple[bytes, bytes]] = []
    right = [(b"authorization", b"Bearer " + CLIENT_KEY.encode()), (b"x-api-key", CLIENT_KEY.encode())]
    key = draw(
        st.sampled_from(
            [
                *right * 4,
                (b"authorization", b"Bearer"),
                (b"authorization", b"Basic " + CLIENT_KEY.encode()),
                (b"authorization", b"bearer  " + CLIENT_KEY.encode()),
                (b"authorization", b"Bearer wrong"),
                (b"authorization", "Bearer clé".encode("latin-1")),
                None,
            ]
        )
    )
    if key is not None:
        chosen.append(key)
    content_type = draw(
        st.sampled_from(
            [
                "application/json",
                "application/json",
                "text/plain",
                "application/x-www-form-urlencoded",
                "multipart/form-data; boundary=x",
                "application/json; charset=latin-1",
                None,
            ]
        )
    )
    if content_type is not None:
        chosen.append((b"content-type", content_type.encode()))
    for name in ("anthropic-version", "anthropic-beta", "accept", "last-event-id", "x-request-id"):
        if draw(st.booleans()):
            chosen.append((name.encode(), draw(header_values).encode("latin-1")))
    return chosen


# --------------------------------------------------------------------------------------------
# Valid bodies, per endpoint

IMAGE: Final = "data:image/png;base64,iVBORw0KGgo="
#: A conversation with every kind of turn Chat Completions has: system, an image, a tool call and its result.
CHAT_TURNS: Final = [
    {"role": "system", "content": "Be brief."},
    {
        "role": "user",
        "content": [{"type": "text", "text": "What?"}, {"type": "image_url", "image_url": {"url": IMAGE}}],
    },
    {
        "role": "assistant",
        "content": None,
        "tool_calls": [{"id": "call_1", "type": "function", "function": {"name": "f", "arguments": '{"a": 1}'}}],
    },
    {"role": "tool", "tool_call_id": "call_1", "content": "42"},
]
#: The same in Messages blocks, with an earlier answer's thinking and a cache hint.
MESSAGES_TURNS: Final = [
    {
        "role": "user",
        "content": [
            {"type": "text", "text": "What?"},
            {"type": "image", "source": {"type": "base64", "media_type": "image/png", "data": "iVBORw0KGgo="}},
        ],
    },
    {
        "role": "assistant",
        "content": [
            {"type": "thinking", "thinking": "Hm.", "signature": "sig"},
            {"type": "text", "text": "Asking f."},
            {"type": "tool_use", "id": "tu_1", "name": "f", "input": {"a": 1}},
        ],
    },
    {
        "role": "user",
        "content": [
            {
                "type": "tool_result",
                "tool_use_id": "tu_1",
                "content": [{"type": "text", "text": "42"}],
                "is_error": False,
            },
            {"type": "text", "text": "Go on.", "cache_control": {"type": "ephemeral"}},
        ],
    },
]
#: The same in Responses items, with a reasoning item.
RESPONSES_ITEMS: Final = [
    {"role": "developer", "content": "Be brief."},
    {
        "type": "message",
        "role": "user",
        "content": [
            {"type": "input_text", "text": "What?"},
            {"type": "input_image", "image_url": IMAGE, "detail": "low"},
        ],
    },
    {"type": "reasoning", "id": "rs_1", "summary": []},
    {"type": "function_call", "call_id": "call_1", "name": "f", "arguments": '{"a": 1}'},
    {"type": "function_call_output", "call_id": "call_1", "output": "42"},
    {"type": "message", "role": "assistant", "content": [{"type": "output_text", "text": "Done."}]},
]

streams = st.booleans()
models = st.sampled_from(MODELS)
user_text = st.sampled_from(["Hi", "Say something.", "x" * 40])
chat_messages = st.one_of(user_text.map(lambda t: [{"role": "user", "content": t}]), st.just(CHAT_TURNS))
chat_tools = [{"type": "function", "function": {"name": "f", "parameters": {"type": "object"}}}]


def chat_body() -> st.SearchStrategy[Any]:
    return st.fixed_dictionaries(
        {"model": models, "stream": streams, "messages": chat_messages},
        optional={
            "max_tokens": st.integers(1, 64),
            "stream_options": st.just({"include_usage": True}),
            "temperature": st.just(0.5),
            "tools": st.just(chat_tools),
            "tool_choice": st.sampled_from(["auto", {"type": "function", "function": {"name": "f"}}]),
            "response_format": st.just({"type": "json_schema", "json_schema": {"name": "s", "schema": {}}}),
            "stop": st.just(["\n"]),
            "reasoning_effort": st.just("low"),
        },
    )


def completion_body() -> st.SearchStrategy[Any]:
    return st.fixed_dictionaries(
        {"model": st.just("up/m"), "stream": streams, "prompt": user_text},
        optional={"suffix": st.just("\n"), "max_tokens": st.integers(1, 64), "n": st.just(1)},
    )


def messages_body(*, counting: bool = False) -> st.SearchStrategy[Any]:
    simple = user_text.map(lambda t: [{"role": "user", "content": [{"type": "text", "text": t}]}])
    required: dict[str, st.SearchStrategy[Any]] = {
        "model": models,
        "messages": st.one_of(simple, st.just(MESSAGES_TURNS)),
    }
    if not counting:
        required |= {"max_tokens": st.integers(1, 64), "stream": streams}
    return st.fixed_dictionaries(
        required,
        optional={
            "system": st.just([{"type": "text", "text": "Be brief."}]),
            "tools": st.just([{"name": "f", "input_schema": {"type": "object"}}]),
            "tool_choice": st.sampled_from([{"type": "auto"}, {"type": "tool", "name": "f"}]),
            "metadata": st.just({"user_id": "u"}),
            "thinking": st.just({"type": "enabled", "budget_tokens": 1024}),
            "stop_sequences": st.just(["\n"]),
            "output_config": st.just({"format": {"type": "json_schema", "schema": {"type": "object"}}}),
            "top_k": st.just(5),
        },
    )


def responses_body(*, side: bool = False) -> st.SearchStrategy[Any]:
    items = user_text.map(lambda t: [{"role": "user", "content": [{"type": "input_text", "text": t}]}])
    required: dict[str, st.SearchStrategy[Any]] = {
        "model": models,
        "input": st.one_of(user_text, items, st.just(RESPONSES_ITEMS)),
    }
    if not side:
        required |= {"stream": streams, "store": st.booleans()}
    return st.fixed_dictionaries(
        required,
        optional={
            "instructions": st.just("Be brief."),
            "max_output_tokens": st.integers(16, 2048),
            "tools": st.just([{"type": "function", "name": "f", "parameters": {"type": "object"}}]),
            "tool_choice": st.sampled_from(["auto", {"type": "function", "name": "f"}]),
            "text": st.sampled_from(
                [{"format": {"type": "text"}}, {"format": {"type": "json_schema", "name": "s", "schema": {}}}]
            ),
            "reasoning": st.just({"effort": "low", "summary": "auto"}),
            "parallel_tool_calls": st.booleans(),
            "background": st.booleans(),
            "include": st.just(["reasoning.encrypted_content"]),
            "metadata": st.just({"k": "v"}),
        },
    )


def generic_body() -> st.SearchStrategy[Any]:
    return st.fixed_dictionaries(
        {"model": models, "messages": chat_messages},
        optional={"max_tokens": st.integers(1, 64), "buffer_config": st.just({"min_chunk_size": 4})},
    )


# --------------------------------------------------------------------------------------------
# What must come back, per protocol


@dataclass
class Answer:
    status: int
    content_type: str
    body: bytes
    location: str | None = None

    def json(self) -> Any:
        return orjson.loads(self.body)

    def sse(self) -> list[tuple[str, str]]:
        return [(event.event, event.data) for event in SSEDecoder().feed(self.body)]


def is_text(value: object) -> bool:
    return isinstance(value, str) and bool(value)


def described_error(error: Any) -> bool:
    """An error object that says what went wrong: a `message` and a `type`."""
    return isinstance(error, dict) and is_text(error.get("message")) and is_text(error.get("type"))


def openai_error(answer: Answer) -> None:
    body = answer.json()
    assert set(body) == {"error"}, body
    assert described_error(body["error"]), body


def anthropic_error(answer: Answer) -> None:
    body = answer.json()
    assert body["type"] == "error", body
    assert described_error(body["error"]), body


def openai_chunks(answer: Answer) -> None:
    """Chat or legacy completion chunks, ending with `[DONE]`; no error among them."""
    *chunks, last = [data for _, data in answer.sse()] or [""]
    assert last == "[DONE]", chunks[-3:]
    for data in chunks:
        assert "error" not in orjson.loads(data), data


def anthropic_events(answer: Answer) -> None:
    names = [name for name, _ in answer.sse()]
    assert names[:1] == ["message_start"], names
    assert names[-1:] == ["message_stop"], names
    assert "error" not in names, names


def responses_events(answer: Answer, *, refusal: bool = False) -> None:
    """
    Typed events numbered from 0, ending with exactly one terminal event; `response.failed`
    only when `refusal` allows it, after an `error` event saying the request was invalid.
    """
    payloads = [orjson.loads(data) for _, data in answer.sse()]
    assert [p["sequence_number"] for p in payloads] == list(range(len(payloads))), payloads[-3:]
    ends = ("response.completed", "response.incomplete", "response.failed")
    types = [p["type"] for p in payloads]
    assert [t for t in types if t in ends] == types[-1:], types
    if refusal and types[-2:] == ["error", "response.failed"]:
        assert payloads[-2]["error"]["type"] == "invalid_request_error", payloads[-2]
    else:
        assert types[-1] != "response.failed", payloads[-3:]
        assert "error" not in types, payloads[-3:]


def background_events(answer: Answer) -> None:
    """
    A background response is answered once the limits took it, before it is sent upstream: a
    request the upstream's translation refuses (a 400 without `background`) is a stream that
    fails with that refusal. Whether it should be the request's own 400 is left open: the
    README promises only the limits' refusals (429, 503) as a background request's status.
    """
    responses_events(answer, refusal=True)


def generic_events(answer: Answer) -> list[dict[str, Any]]:
    """Our events, as SSE or NDJSON, whatever the content type says."""
    if answer.content_type.startswith("application/x-ndjson"):
        return [orjson.loads(line) for line in answer.body.splitlines() if line]
    return [orjson.loads(data) for _, data in answer.sse()]


def generic_error(answer: Answer) -> None:
    [event] = generic_events(answer)
    assert event["type"] == "error", event
    assert described_error(event["data"]), event
    assert event["data"]["status"] == answer.status, event


def generic_stream(answer: Answer) -> None:
    types = [e["type"] for e in generic_events(answer) if e["data"] != "heartbeat"]
    assert types[-1:] == ["done"], types
    assert "error" not in types, types


@dataclass(frozen=True)
class Protocol:
    """How one front answers: its error shape, its whole stream, its whole non-streamed answer."""

    error: Callable[[Answer], None]
    stream: Callable[[Answer], None]
    whole: Callable[[Any], bool]


def openai_whole(body: Any) -> bool:
    """An answer, not an error (a Response object carries `"error": null`), nor a failed response."""
    return isinstance(body, dict) and body.get("error") is None and body.get("status") != "failed"


OPENAI = Protocol(openai_error, openai_chunks, openai_whole)
RESPONSES = Protocol(openai_error, responses_events, openai_whole)
BACKGROUND_RESPONSES = Protocol(openai_error, background_events, openai_whole)
ANTHROPIC = Protocol(anthropic_error, anthropic_events, lambda body: isinstance(body, dict) and "error" not in body)
EVENTS = Protocol(generic_error, generic_stream, lambda body: False)  # always a stream


def check_answer(answer: Answer, protocol: Protocol, *, json_object: bool) -> None:
    """The properties every answer has, whatever was asked."""
    assert answer.status < 500, answer
    if not json_object and answer.status < 400:
        pytest.fail(f"a body that is no JSON object was answered {answer.status}: {answer}")
    if 300 <= answer.status < 400:
        # werkzeug's own redirect of a path with an empty segment (see the module's docstring).
        assert answer.status == 308, answer
        assert answer.location is not None, answer
        assert "//" not in httpx.URL(answer.location).path, answer
    elif answer.status >= 400:
        protocol.error(answer)
    elif answer.content_type.startswith(("text/event-stream", "application/x-ndjson")):
        protocol.stream(answer)
    else:
        assert answer.content_type.startswith("application/json"), answer
        assert protocol.whole(answer.json()), answer


# --------------------------------------------------------------------------------------------
# The harness: one proxy, hypothesis in a thread, each example a request on the test's loop


@pytest.fixture
async def upstream(nursery: trio.Nursery) -> FakeUpstream:
    return await open_fake_upstream(nursery)


async def start_proxy(nursery: trio.Nursery, upstream: FakeUpstream) -> str:
    resp = {"type": "openai_responses", "base_url": upstream.url + "/v1"}
    config = dataclasses.replace(proxy_config(upstream, resp=resp), auth=AuthConfig(keys=(CLIENT_KEY,)))
    return await serve_proxy(nursery, config)


def unhandled_errors(caplog: pytest.LogCaptureFixture) -> list[logging.LogRecord]:
    """What the proxy (and its server) logged as a failure of its own: an error with a traceback."""
    return [r for r in caplog.records if r.levelno >= logging.ERROR and (r.exc_info or r.name.startswith("hypercorn"))]


Headers = list[tuple[bytes, bytes]]


async def ask(http: httpx.AsyncClient, method: str, target: str, head: Headers, body: bytes) -> Answer:
    """One request, its answer read whole within `ANSWER_BOUND`."""
    with trio.fail_after(ANSWER_BOUND):
        async with http.stream(method, target, headers=head, content=body) as response:
            content = await response.aread()
    headers = response.headers
    return Answer(response.status_code, headers.get("content-type", ""), content, headers.get("location"))


async def fuzz(
    caplog: pytest.LogCaptureFixture, strategy: st.SearchStrategy[Any], example: Callable[[Any], Awaitable[None]]
) -> None:
    """
    Run `example` on every value hypothesis draws from `strategy` (in a worker thread, each
    example back on this loop), each then checked for unhandled errors in the log.
    """
    caplog.set_level(logging.ERROR)

    async def checked(value: Any) -> None:
        caplog.clear()  # this example's records only
        await example(value)
        unhandled = unhandled_errors(caplog)
        assert not unhandled, [(r.getMessage(), r.exc_info and repr(r.exc_info[1])) for r in unhandled]

    @FUZZ_SETTINGS
    @given(strategy)
    def run(value: Any) -> None:
        trio.from_thread.run(checked, value)

    await trio.to_thread.run_sync(run)


@dataclass(frozen=True)
class Endpoint:
    path: str
    valid: Callable[[], st.SearchStrategy[Any]]
    protocol: Protocol


ENDPOINTS: Final = [
    Endpoint("/v1/chat/completions", chat_body, OPENAI),
    Endpoint("/v1/completions", completion_body, OPENAI),
    Endpoint("/v1/messages", messages_body, ANTHROPIC),
    Endpoint("/v1/messages?beta=true", messages_body, ANTHROPIC),
    Endpoint("/v1/messages/count_tokens", lambda: messages_body(counting=True), ANTHROPIC),
    Endpoint("/v1/responses", responses_body, RESPONSES),
    Endpoint("/v1/responses/input_tokens", lambda: responses_body(side=True), RESPONSES),
    Endpoint("/v1/responses/compact", lambda: responses_body(side=True), RESPONSES),
    Endpoint("/v1/chat/stream", generic_body, EVENTS),
    Endpoint("/v1/stream/sse", generic_body, EVENTS),
    Endpoint("/v1/chat/stream/json", generic_body, EVENTS),
]


@pytest.mark.parametrize("endpoint", ENDPOINTS, ids=[e.path for e in ENDPOINTS])
async def test_any_body_headers_and_query_get_an_answer_in_the_protocol(
    nursery: trio.Nursery, upstream: FakeUpstream, caplog: pytest.LogCaptureFixture, endpoint: Endpoint
) -> None:
    proxy = await start_proxy(nursery, upstream)
    async with httpx.AsyncClient(base_url=proxy, timeout=None) as http:

        async def example(drawn: tuple[Body, Headers, dict[str, str]]) -> None:
            body, head, params = drawn
            target = httpx.URL(endpoint.path).copy_merge_params(params)
            answer = await ask(http, "POST", str(target), head, body.encoded())
            background = (
                endpoint.protocol is RESPONSES and isinstance(body.value, dict) and body.value.get("background") is True
            )
            check_answer(answer, BACKGROUND_RESPONSES if background else endpoint.protocol, json_object=body.is_object)

        queries = st.dictionaries(st.sampled_from(["beta", "stream", "model", "api-version"]), st.text(max_size=6))
        await fuzz(caplog, st.tuples(bodies(endpoint.valid()), headers(), queries), example)


# --------------------------------------------------------------------------------------------
# The routes of what is stored: ids, queries and `Last-Event-ID`

AUTHORIZED: Final = [(b"authorization", b"Bearer " + CLIENT_KEY.encode())]


async def stored_response(http: httpx.AsyncClient, **fields: Any) -> str:
    """A stored response's id, once it ran to its end."""
    body = {"model": "up/m", "input": "Hi", **fields}
    answer = await ask(http, "POST", "/v1/responses", AUTHORIZED, orjson.dumps(body))
    assert answer.status == 200, answer
    return str(answer.json()["id"])


async def resumable_stream(http: httpx.AsyncClient) -> str:
    """A resumable stream's id, once it ran to its end."""
    body = {"model": "up/m", "messages": [{"role": "user", "content": "Hi"}]}
    answer = await ask(http, "POST", "/v1/chat/stream", AUTHORIZED, orjson.dumps(body))
    assert answer.status == 200, answer
    return str(orjson.loads(answer.sse()[0][1])["metadata"]["stream_id"])


def ids(*known: str) -> st.SearchStrategy[str]:
    """One of the `known` ids, one near it, or any other."""
    near = [id_ + "x" for id_ in known] + [id_[:5] for id_ in known]
    return st.one_of(st.sampled_from([*known, *near]), st.text(min_size=1, max_size=10))


def query(names: tuple[str, ...], *known: str) -> st.SearchStrategy[dict[str, str]]:
    values = st.one_of(
        st.text(max_size=8),
        st.sampled_from(["", "0", "-1", "-2", "1", "100", "101", "true", "1e3", "9" * 30, "asc", "desc", *known]),
    )
    return st.dictionaries(st.sampled_from(names), values, max_size=len(names))


async def test_stored_responses_and_streams_take_any_id_query_and_last_event_id(
    nursery: trio.Nursery, upstream: FakeUpstream, caplog: pytest.LogCaptureFixture
) -> None:
    proxy = await start_proxy(nursery, upstream)
    async with httpx.AsyncClient(base_url=proxy, timeout=None) as http:
        stored = await stored_response(http)
        background = await stored_response(http, background=True)
        # An item only a Responses upstream takes, as it is: stored, and listed, whatever its shape.
        unknown_item = await stored_response(http, model="resp/m", input=[{"type": ["x"]}])
        responses = ids(stored, background, unknown_item)
        listed = await ask(http, "GET", f"/v1/responses/{stored}/input_items", AUTHORIZED, b"")
        cursors = query(("limit", "order", "after", "before"), *[item["id"] for item in listed.json()["data"]])
        routes = st.one_of(
            st.tuples(st.just("GET /v1/responses/{}"), responses, query(("stream", "starting_after"))),
            st.tuples(st.just("GET /v1/responses/{}/input_items"), responses, cursors),
            st.tuples(st.just("POST /v1/responses/{}/cancel"), responses, st.just({})),
            st.tuples(st.just("GET /v1/streams/{}"), ids(await resumable_stream(http)), st.just({})),
        )

        async def example(drawn: tuple[tuple[str, str, dict[str, str]], Headers]) -> None:
            (route, id_, params), head = drawn
            method, path = route.split(" ")
            target = httpx.URL(path.format(quote(id_, safe="") or "%20"), params=params)
            answer = await ask(http, method, str(target), head, b"")
            check_answer(answer, EVENTS if path.startswith("/v1/streams/") else RESPONSES, json_object=True)

        await fuzz(caplog, st.tuples(routes, headers()), example)
