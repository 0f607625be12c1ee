"""
Tests of routing by model name, with stub upstreams (no httpx client, no sockets).
"""

from __future__ import annotations

from typing import Any

import pytest

from trioproxy._config import Config, ProviderConfig, parse_config
from trioproxy._exceptions import ModelNotFoundError
from trioproxy._router import Route, Router


class StubUpstream:
    def __init__(self, provider: ProviderConfig) -> None:
        self.provider = provider
        self.closed = False

    async def aclose(self) -> None:
        self.closed = True


def config(**raw: Any) -> Config:
    providers = {
        "local": {"type": "openai", "base_url": "http://127.0.0.1:9000/v1", "models": ["gpt-x", "meta-llama/L-3"]},
        "claude": {"type": "anthropic"},
    }
    return parse_config({"providers": providers, **raw}, environ={})


def router(**raw: Any) -> Router:
    return Router(config(**raw), make_upstream=StubUpstream)


def test_one_upstream_per_provider() -> None:
    r = router()
    assert list(r.upstreams) == ["sim", "local", "claude"]
    for name, upstream in r.upstreams.items():
        assert isinstance(upstream, StubUpstream)
        assert upstream.provider is r.config.providers[name]


def test_prefix_picks_the_provider() -> None:
    r = router()
    route = r.route("local/gpt-x")
    assert isinstance(route, Route)
    assert route.provider.name == "local"
    assert route.provider is r.config.providers["local"]
    assert route.upstream is r.upstreams["local"]
    assert route.upstream_model == "gpt-x"


def test_model_keeps_its_own_slashes() -> None:
    route = router().route("local/meta-llama/Llama-3-8B")
    assert (route.provider.name, route.upstream_model) == ("local", "meta-llama/Llama-3-8B")


def test_builtin_sim() -> None:
    route = router().route("sim/echo")
    assert (route.provider.name, route.provider.type, route.upstream_model) == ("sim", "simulated", "echo")


def test_provider_override_takes_the_whole_name() -> None:
    route = router().route("gpt-x", provider="local")
    assert (route.provider.name, route.upstream_model) == ("local", "gpt-x")
    route = router().route("meta-llama/Llama-3-8B", provider="local")
    assert (route.provider.name, route.upstream_model) == ("local", "meta-llama/Llama-3-8B")


def test_provider_override_with_prefixed_model() -> None:
    route = router().route("local/gpt-x", provider="local")
    assert (route.provider.name, route.upstream_model) == ("local", "gpt-x")


def test_provider_override_wins_over_another_prefix() -> None:
    route = router().route("claude/opus", provider="local")
    assert (route.provider.name, route.upstream_model) == ("local", "claude/opus")


def test_unknown_prefix_without_default_is_404_listing_providers() -> None:
    with pytest.raises(ModelNotFoundError) as info:
        router().route("gpt-4o")
    error = info.value
    assert error.status == 404
    assert error.type == "not_found_error"
    assert error.code == "model_not_found"
    assert error.param == "model"
    assert error.message == (
        "no route for model 'gpt-4o': name it as 'provider/model' with a provider among claude, local, sim"
    )


def test_unknown_prefix_with_slash_without_default() -> None:
    with pytest.raises(ModelNotFoundError) as info:
        router().route("openai/gpt-4o")
    assert info.value.message == (
        "no route for model 'openai/gpt-4o': name it as 'provider/model' with a provider among claude, local, sim"
    )


def test_prefix_without_model() -> None:
    with pytest.raises(ModelNotFoundError) as info:
        router().route("local/")
    assert info.value.status == 404
    assert "'local/'" in info.value.message


def test_unknown_provider_override() -> None:
    with pytest.raises(ModelNotFoundError) as info:
        router().route("gpt-x", provider="nope")
    assert info.value.status == 404
    assert info.value.message == "unknown provider 'nope'; configured providers: claude, local, sim"


def test_provider_override_without_model() -> None:
    with pytest.raises(ModelNotFoundError) as info:
        router().route("local/", provider="local")
    assert info.value.message == "no model named for provider 'local'"


def test_default_provider_routes_the_whole_name() -> None:
    r = router(default_provider="local")
    route = r.route("gpt-4o")
    assert (route.provider.name, route.upstream_model) == ("local", "gpt-4o")
    # a prefix that is no provider is part of the model name
    route = r.route("openai/gpt-4o")
    assert (route.provider.name, route.upstream_model) == ("local", "openai/gpt-4o")
    # a prefix that is a provider still wins
    route = r.route("claude/opus")
    assert (route.provider.name, route.upstream_model) == ("claude", "opus")


def test_models_lists_sim_models_and_declared_models() -> None:
    assert router().models() == [
        ("sim/echo", "sim"),
        ("sim/lorem", "sim"),
        ("sim/tools", "sim"),
        ("local/gpt-x", "local"),
        ("local/meta-llama/L-3", "local"),
    ]


def test_models_of_a_simulated_provider_with_declared_models() -> None:
    cfg = parse_config({"providers": {"sim": {"type": "simulated", "models": ["echo"]}}}, environ={})
    assert Router(cfg, make_upstream=StubUpstream).models() == [("sim/echo", "sim")]


async def test_aclose_closes_every_upstream() -> None:  # runs under pytest-trio
    r = router()
    await r.aclose()
    assert [u.closed for u in r.upstreams.values()] == [True, True, True]


async def test_aclose_closes_every_upstream_even_when_one_fails() -> None:
    class FailingUpstream(StubUpstream):
        async def aclose(self) -> None:
            raise OSError("socket already gone")

    made: list[StubUpstream] = []

    def make(provider: ProviderConfig) -> StubUpstream:
        made.append((FailingUpstream if provider.name == "local" else StubUpstream)(provider))
        return made[-1]

    routes = Router(config(), make_upstream=make)
    with pytest.raises(BaseExceptionGroup) as info:
        await routes.aclose()
    assert [type(e) for e in info.value.exceptions] == [OSError]
    assert [u.closed for u in made if not isinstance(u, FailingUpstream)] == [True, True]  # sim and claude


# --------------------------------------------------------------------------------------------
# [models]: aliases and patterns


MODELS = {
    "claude-haiku-4-5": "local/meta-llama/L-3",
    "fast": "sim/echo",
    "openai/gpt-4o": "local/gpt-x",
    "claude-*": "claude",
    "gpt-4?-mini": "local",
    "o[13]-*": "local/gpt-x",
}


@pytest.mark.parametrize(
    ("model", "provider", "upstream_model"),
    [
        ("claude-haiku-4-5", "local", "meta-llama/L-3"),  # an alias wins over a pattern
        ("fast", "sim", "echo"),
        ("openai/gpt-4o", "local", "gpt-x"),  # an alias may take a prefixed name
        ("claude-sonnet-4-5-20250929", "claude", "claude-sonnet-4-5-20250929"),  # the name kept
        ("gpt-4o-mini", "local", "gpt-4o-mini"),
        ("o1-preview", "local", "gpt-x"),
        ("claude/claude-opus-4-1", "claude", "claude-opus-4-1"),  # a prefix still routes
    ],
)
def test_aliases_then_prefixes_then_patterns(model: str, provider: str, upstream_model: str) -> None:
    route = router(models=MODELS).route(model)
    assert (route.provider.name, route.upstream_model) == (provider, upstream_model)


def test_patterns_in_file_order_and_before_the_default_provider() -> None:
    r = router(models={"claude-3*": "local", "claude-*": "claude"}, default_provider="sim")
    assert r.route("claude-3-opus").provider.name == "local"
    assert r.route("claude-opus-4").provider.name == "claude"
    assert r.route("echo").provider.name == "sim"


def test_a_provider_override_ignores_aliases() -> None:
    route = router(models=MODELS).route("fast", provider="local")
    assert (route.provider.name, route.upstream_model) == ("local", "fast")


def test_a_name_nothing_matches_is_still_404() -> None:
    with pytest.raises(ModelNotFoundError) as info:
        router(models=MODELS).route("mistral-large")
    assert "'mistral-large'" in info.value.message


def test_aliases_are_listed_patterns_are_not() -> None:
    listed = router(models=MODELS).models()
    assert ("claude-haiku-4-5", "local") in listed
    assert ("fast", "sim") in listed
    assert not [model for model, _ in listed if "*" in model or "?" in model or "[" in model]
