"""`SimulatedUpstream`: the built-in `simulated` provider's script, played on trio's clock."""

from __future__ import annotations

import trio

from .._events import OPENED
from .._exceptions import NotFoundError, RequestError, TrioproxyError
from .._forwarding import ForwardRequest, ForwardSink
from .._request import ChatRequest
from ..pipeline._items import Sink
from ..providers.simulated import SimulatedSettings, Stall, script

__all__ = ["SimulatedUpstream"]


class SimulatedUpstream:
    """
    Plays `providers.simulated.script()` in real (or mock) time, making each step only when
    it is due. Every step is a checkpoint, a zero delay included: a script with no delays
    still lets the other tasks run between its tokens.
    """

    def __init__(self, settings: SimulatedSettings) -> None:
        self.settings = settings

    async def stream(self, chat: ChatRequest, send: Sink) -> None:
        settings = self.settings
        overrides = chat.common_body().get("simulate")
        if overrides is not None:
            if not isinstance(overrides, dict):
                raise RequestError("'simulate' must be an object", param="simulate")
            settings = settings.overridden(overrides, where="simulate")
        opened = False
        for delay, step in script(chat, settings):
            await trio.sleep(delay)
            if isinstance(step, TrioproxyError):
                raise step
            if not opened:
                await send.send(OPENED)
                opened = True
            if isinstance(step, Stall):
                await trio.sleep_forever()
            await send.send(step)

    async def count_tokens(self, chat: ChatRequest) -> None:
        return None  # a script has no tokenizer

    async def forward(self, request: ForwardRequest, sink: ForwardSink) -> None:
        raise NotFoundError("a simulated provider has no other paths to forward to")  # the config gives it none

    async def compact(self, chat: ChatRequest) -> None:
        return None

    async def aclose(self) -> None:
        pass
