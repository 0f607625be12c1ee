"""
Routing: which upstream serves a model name, tried in this order.

1. An alias of `[models]` (`"claude-haiku-4-5" = "local/qwen2.5-7b"`): that provider, asked
   for that model (or for the name as it is, when the alias names only a provider).
2. `NAME/model` goes to `[providers.NAME]`, and the upstream sees `model` (which may itself
   hold slashes: `local/meta-llama/Llama-3-8B` asks `local` for `meta-llama/Llama-3-8B`).
3. The first pattern of `[models]` that matches (`"claude-*" = "anthropic"`), in file order.
4. The `default_provider`, when one is configured, with the name whole.

So clients that send bare names (Claude Code, the SDKs' examples) are routed without being
changed, and an app written for one upstream keeps its model names.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from fnmatch import fnmatchcase

import trio

from ._config import Config, ProviderConfig
from ._continuation import Refusals
from ._exceptions import ModelNotFoundError
from ._upstream import BalancedUpstream, HttpUpstream, Upstream, build_upstream
from .providers.simulated import SIMULATED_MODELS

__all__ = ["Route", "Router"]


@dataclass(frozen=True, slots=True)
class Route:
    provider: ProviderConfig
    upstream: Upstream
    upstream_model: str


class Router:
    """Owns one upstream (and so one connection pool) per provider."""

    def __init__(self, config: Config, *, make_upstream: Callable[[ProviderConfig], Upstream] = build_upstream) -> None:
        self.config = config
        self.upstreams: Mapping[str, Upstream] = {name: make_upstream(p) for name, p in config.providers.items()}
        self._aliases = {alias.name: alias for alias in config.models if not alias.is_pattern}
        self._patterns = [pattern for pattern in config.models if pattern.is_pattern]
        self.continuation_refusals = Refusals()
        """Routes that refused a continuation lately, for every request."""

    def route(self, model: str, *, provider: str | None = None) -> Route:
        """The route for `model`; `provider`, when given, overrides the model's prefix and `[models]`."""
        if provider is None:
            prefix, sep, rest = model.partition("/")
            alias = self._aliases.get(model)
            if alias is None and not (sep and prefix in self.upstreams and rest):
                alias = next((p for p in self._patterns if fnmatchcase(model, p.name)), None)
            if alias is not None:
                provider, model = alias.provider, alias.model or model
            elif sep and prefix in self.upstreams and rest:
                provider, model = prefix, rest
            elif self.config.default_provider is not None:
                provider = self.config.default_provider
            else:
                raise ModelNotFoundError(
                    f"no route for model {model!r}: name it as 'provider/model' with a provider among "
                    f"{', '.join(sorted(self.upstreams))}"
                )
        elif model.startswith(provider + "/"):
            model = model[len(provider) + 1 :]
        if provider not in self.upstreams:
            raise ModelNotFoundError(
                f"unknown provider {provider!r}; configured providers: {', '.join(sorted(self.upstreams))}"
            )
        if not model:
            raise ModelNotFoundError(f"no model named for provider {provider!r}")
        return Route(self.config.providers[provider], self.upstreams[provider], model)

    def models(self) -> list[tuple[str, str]]:
        """`(model id, provider)` pairs that can be routed, for `GET /v1/models`: aliases first."""
        listed = [(alias.name, alias.provider) for alias in self._aliases.values()]
        for name, provider in self.config.providers.items():
            models = SIMULATED_MODELS if provider.type == "simulated" and not provider.models else provider.models
            listed.extend((f"{name}/{model}", name) for model in models)
        return listed

    def targets(self) -> list[tuple[str, BalancedUpstream]]:
        """Each provider with targets behind circuit breakers (every HTTP provider), for `/health` and `/metrics`."""
        return [(name, u) for name, u in self.upstreams.items() if isinstance(u, BalancedUpstream)]

    async def expire_idle_connections(self) -> None:
        """Run each HTTP upstream's pool timer (idle connections closed without waiting for traffic), until `aclose`."""
        async with trio.open_nursery() as nursery:
            for upstream in self.upstreams.values():
                if isinstance(upstream, HttpUpstream | BalancedUpstream):
                    nursery.start_soon(upstream.expire_idle_connections)

    async def aclose(self) -> None:
        """Close every upstream's pool, each whatever the others do (their errors leave together)."""
        async with trio.open_nursery() as nursery:
            for upstream in self.upstreams.values():
                nursery.start_soon(upstream.aclose)
