"""
A real, scripted LLM upstream on loopback, for end-to-end tests and benchmarks.

Why this exists: the behaviour that matters most in trioproxy happens at the socket, and a fake
transport such as `httpx.MockTransport` never reaches a socket. It cannot show connection
pooling and keep-alive, chunked framing, a stream that is only half read, a peer that resets
the connection, or how long a closed connection takes to be noticed at the other end. So the
end-to-end tests and the benchmarks point trioproxy at `FakeUpstream` instead. It is a raw trio
TCP server on `127.0.0.1:0` that speaks HTTP/1.1 through `h11` (sans-IO) and streams OpenAI
`chat.completion.chunk`s (`sse_protocol.md` §4.3) or Anthropic Messages events (§5.1-5.2)
exactly as the real APIs do. Each request is answered from a script (`Reply`) that sets the
tokens and their timing, tool calls, error statuses, and faults: reset the connection, stall,
send an in-stream error, or send raw malformed bytes.

It records every request. Above all, it notices within milliseconds when the client (the
proxy) closes its connection, so a test can show that a client disconnect really reached the
upstream. A reader task watches the socket for the whole life of the connection. On EOF it
marks the in-flight request `disconnected` and cancels the writer, and it does so even while
the script is sleeping (headers delay, time to first token, stall).

It deliberately uses none of httpx, quart or hypercorn: a test double must not share code with
the thing it tests. It uses trio, h11, orjson and the standard library only.

Typical use (pytest-trio)::

    async def test_stream(nursery):
        upstream = await open_fake_upstream(nursery, Reply(tokens=("Hi", "!"), interval=0.01))
        ...  # point the proxy at upstream.url
        await upstream.wait_for_requests(1)
        assert upstream.requests[0].json["model"] == "gpt-4o-mini"

Routes (the query string is ignored for routing):

- `POST /v1/chat/completions` and `POST /chat/completions`: OpenAI format.
- `POST /v1/messages`: Anthropic format.
- `POST /v1/responses` and `POST /responses`: OpenAI Responses format (typed events with `sequence_number`).
- `POST /v1/completions` and `POST /completions`: legacy text completions (`text_completion`
  chunks, or one `text_completion` object), `prompt` and `suffix` taken as they come.
- `POST /v1/embeddings` and `POST /embeddings`: one embedding per input (a small vector made
  from the input's length and index), as floats or, when asked, base64 (as the SDKs ask).
- `GET /v1/models`: a static OpenAI models list.
- Any method on `/v1/echo` or a path under it: the request body sent back, its content type
  kept, with `x-echo-method` and `x-echo-target` (the target as received); to a request that
  accepts `text/event-stream`, the `Reply`'s tokens as bare `data:` events instead.
- Anything else: 404, with an OpenAI-shaped error body.

Every route but `/v1/models` takes a `Reply` (from the `push()` queue, else the default). A
body that is not a JSON object gets a 400 in the route's error shape and uses up no `Reply`
(the echo route takes any body).

One job a module: `_script` (`Reply`, `ToolCall`: plain data), `_wire` (what each API puts on
the wire for a `Reply`, sans-IO, shared with the benchmark upstream), `_server` (the h11
server, its connections, `RecordedRequest`).
"""

from ._script import Reply, ToolCall
from ._server import FakeUpstream, RecordedRequest, open_fake_upstream

__all__ = [
    "FakeUpstream",
    "RecordedRequest",
    "Reply",
    "ToolCall",
    "open_fake_upstream",
]
