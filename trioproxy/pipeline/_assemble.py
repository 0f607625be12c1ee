"""
The one place where a request's pipeline is assembled from config.

Read `Pipeline.stages` to see everything a streamed request goes through:

    upstream reader (attempts, retries, failover, hedges, context fallbacks, continuations;
                     first-token and silence watchdog)
      → buffer      (when the route or request configures one)
      → transforms  (in config order)
      → validators  (in config order)
      → delivery    (accumulator, heartbeats, the response) — in `StreamSession`
"""

from __future__ import annotations

import functools
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass, field, replace
from typing import TYPE_CHECKING

from .._continuation import Refusals
from .._policy import BufferConfig, Timeouts
from ._content import Transform, Validator
from ._stages import Receive, Send, buffer_stage, transform_stage, validate_stage

if TYPE_CHECKING:
    from .._router import Route, Router
    from .._tracing import RequestTrace

__all__ = ["Pipeline", "Stage", "pipeline_for"]

Stage = Callable[[Receive, Send], Awaitable[None]]


@dataclass(frozen=True, slots=True)
class Pipeline:
    routes: tuple[Route, ...]
    """The route asked for, then its fallbacks, in order."""
    buffer: BufferConfig
    transforms: tuple[Transform, ...]
    validators: tuple[Validator, ...]
    context_fallbacks: Mapping[str, tuple[Route, ...]] = field(default_factory=dict)
    """Each provider's `context_fallbacks`, for every provider a request may reach."""
    refusals: Refusals = field(default_factory=Refusals)
    """The routes that refused a continuation lately (the router's, shared by every request)."""
    trace: RequestTrace | None = None
    """The request's trace when tracing is on: each upstream attempt is a span of it."""

    @property
    def timeouts(self) -> Timeouts:
        return self.routes[0].provider.timeouts

    @property
    def passthrough(self) -> bool:
        """No stage changes content: upstream OpenAI chunks may reach the client byte for byte."""
        return not (self.buffer.enabled or self.transforms or self.validators)

    def unstaged(self) -> Pipeline:
        """
        This pipeline without its stages, for an answer that is no generation (embeddings):
        nothing in it for a buffer, a transform or a validator, and its bytes pass unchanged.
        """
        return replace(self, buffer=BufferConfig(), transforms=(), validators=())

    def stages(self, abort_upstream: Callable[[], None]) -> list[Stage]:
        stages: list[Stage] = []
        if self.buffer.enabled:
            stages.append(functools.partial(buffer_stage, self.buffer))
        if self.transforms:
            stages.append(functools.partial(transform_stage, self.transforms))
        if self.validators:
            stages.append(functools.partial(validate_stage, self.validators, abort_upstream))
        return stages


def pipeline_for(router: Router, route: Route, *, buffer: BufferConfig | None = None) -> Pipeline:
    """The pipeline of a request to `route`; `buffer` (from the request) overrides the route's."""
    provider = route.provider
    routes = (route, *(router.route(name) for name in provider.fallbacks))
    context_fallbacks: dict[str, tuple[Route, ...]] = {}
    reachable = list(routes)
    while reachable:
        provider_config = reachable.pop().provider
        if provider_config.name not in context_fallbacks:
            larger = tuple(router.route(name) for name in provider_config.context_fallbacks)
            context_fallbacks[provider_config.name] = larger
            reachable += larger
    return Pipeline(
        routes=routes,
        context_fallbacks=context_fallbacks,
        refusals=router.continuation_refusals,
        buffer=provider.buffer if buffer is None else buffer,
        transforms=provider.transforms,
        validators=provider.validators,
    )
