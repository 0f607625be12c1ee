"""
Settings: one TOML file plus environment variables, checked at start-up.

Every mistake in the file is reported at once, one sentence each naming the key, so a user
fixes the file in one go rather than one error per restart. Secrets never live in the file:
a provider names the environment variable that holds its key (`api_key_env`), and the key is
kept out of every `repr`.
"""

from __future__ import annotations

import math
import os
import re
import tomllib
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field, replace
from fnmatch import fnmatchcase
from pathlib import Path
from typing import Any, Final, Literal, TypeGuard
from urllib.parse import urlsplit

from ._exceptions import ConfigError
from ._logs import LOG_FORMATS, LOG_LEVELS, LoggingConfig
from ._policy import BreakerConfig, BufferConfig, RetryConfig, StreamsConfig, Timeouts, parse_policy
from .pipeline._content import Transform, Validator, build_transforms, build_validators
from .providers.simulated import SimulatedSettings, settings_problems

__all__ = [
    "AuthConfig",
    "Config",
    "CorsConfig",
    "LimitsConfig",
    "ModelRoute",
    "ProviderConfig",
    "RedisConfig",
    "ServerConfig",
    "TargetConfig",
    "TracingConfig",
    "load_config",
    "parse_config",
]

PROVIDER_TYPES: Final = ("openai", "openai_responses", "anthropic", "simulated")
SIM: Final = "sim"
DEFAULT_ANTHROPIC_URL: Final = "https://api.anthropic.com"
_NAME = re.compile(r"^[A-Za-z0-9_.\-]+$")
_FALLBACK = re.compile(r"^[A-Za-z0-9_.\-]+/.+$")


DEFAULT_HOST: Final = "127.0.0.1"
DEFAULT_PORT: Final = 8000


DEFAULT_WRITE_TIMEOUT: Final = 30.0
DEFAULT_BODY_TIMEOUT: Final = 60.0
DEFAULT_KEEP_ALIVE_TIMEOUT: Final = 75.0
DEFAULT_TRACING_SHUTDOWN_TIMEOUT: Final = 2.0
DEFAULT_MAX_BODY_BYTES: Final = 8 * 1024 * 1024
DEFAULT_CORS_ALLOW_HEADERS: Final = (
    "authorization",
    "content-type",
    "x-api-key",
    "last-event-id",
    "openai-organization",
    "openai-project",
    "openai-beta",
    "anthropic-version",
    "anthropic-beta",
    "anthropic-dangerous-direct-browser-access",
    "x-stainless-*",
)
"""What browsers preflight for the OpenAI and Anthropic SDKs, `fetch` with JSON, and EventSource."""
_ORIGIN = re.compile(r"^[a-z][a-z0-9+.\-]*://[^/?#\s]+$")
_HEADER_NAME = re.compile(r"^[!#$%&'*+.^_`|~0-9a-z\-]+$")
DEFAULT_SHUTDOWN_GRACE_PERIOD: Final = 30.0
MAX_WORKERS: Final = 256
"""More worker processes than any machine has cores for: a typo, not a plan."""


@dataclass(frozen=True, slots=True)
class ServerConfig:
    """
    `write_timeout`: seconds a client may leave what we sent it unacknowledged (it stopped
    reading, or vanished) before the kernel drops its connection — and with it the stream and
    its upstream request.

    `shutdown_grace_period`: seconds the streams in flight get to finish once the server was
    asked to stop (SIGTERM, SIGINT); whatever still runs then ends with an in-stream error.

    `keep_alive_timeout`: seconds an idle client connection is kept open for its next request;
    longer than common load balancers' idle timeout, so they close first.

    `body_timeout`: seconds a request's body may take to arrive, whole; a client that trickles
    it (or stops sending) gets a 408 then, rather than holding its connection and task.

    `workers`: processes serving the listening address, each on its own core (`_workers.py`).
    """

    host: str = DEFAULT_HOST
    port: int = DEFAULT_PORT
    write_timeout: float = DEFAULT_WRITE_TIMEOUT
    shutdown_grace_period: float = DEFAULT_SHUTDOWN_GRACE_PERIOD
    keep_alive_timeout: float = DEFAULT_KEEP_ALIVE_TIMEOUT
    body_timeout: float = DEFAULT_BODY_TIMEOUT
    workers: int = 1


@dataclass(frozen=True, slots=True)
class TargetConfig:
    """One replica of a provider: its base URL, and its share of the requests (`weight`)."""

    base_url: str
    weight: float = 1.0


@dataclass(frozen=True, slots=True)
class ProviderConfig:
    """
    One `[providers.NAME]` table: where the upstream is, and how its streams are run
    (timeouts, retries, fallbacks, buffering, transforms and validators). `context_fallbacks`
    (larger-context models) take a request its model refused as too long for its context.

    `max_connections` bounds the provider's connection pool. `forward_paths` are the path
    prefixes under `/v1/` that the proxy forwards to it as they are (`server/fronts/forwarding.py`).
    `skip_malformed_events` passes over an upstream event that cannot be read (counted, and logged
    with the request's id) instead of ending the stream with it. `continuation` is how the upstream
    continues a broken answer (the ways each type allows: `_CONTINUATION_WAYS`): `prefill` by default for
    Anthropic, `none` for an OpenAI-compatible upstream unless it is set to
    `continue_final_message`; a table of model patterns sets it per model (`continuation_for`).
    """

    name: str
    type: str
    base_url: str = ""
    targets: tuple[TargetConfig, ...] = ()
    """Every replica, when `base_urls` or `targets` lists them (`base_url` is the first's)."""
    api_key_env: str | None = None
    api_key: str | None = field(default=None, repr=False)
    headers: Mapping[str, str] = field(default_factory=dict, repr=False)
    models: tuple[str, ...] = ()
    max_connections: int = 1000
    timeouts: Timeouts = field(default_factory=Timeouts)
    retry: RetryConfig = field(default_factory=RetryConfig)
    fallbacks: tuple[str, ...] = ()
    context_fallbacks: tuple[str, ...] = ()
    buffer: BufferConfig = field(default_factory=BufferConfig)
    breaker: BreakerConfig = field(default_factory=BreakerConfig)
    transforms: tuple[Transform, ...] = ()
    validators: tuple[Validator, ...] = ()
    request_usage: bool = True
    forward_paths: tuple[str, ...] = ()
    skip_malformed_events: bool = False
    continuation: str = "none"
    continuation_models: tuple[tuple[str, str], ...] = ()
    """`(model pattern, way)` pairs that override `continuation` for the models they match, in order."""
    anthropic_version: str = "2023-06-01"
    default_max_tokens: int = 4096
    drop_params: bool | frozenset[str] = False
    """
    What the translation to this provider's protocol drops instead of refusing, of the fields
    it has no equivalent for (`_request.DropParams`): all, those named, or none.
    """
    simulated: SimulatedSettings = field(default_factory=SimulatedSettings)

    @property
    def connect_timeout(self) -> float:
        return self.timeouts.connect_timeout

    def continuation_for(self, model: str) -> str:
        """How `model` continues a broken answer: the first pattern that matches it, else `continuation`."""
        return next(
            (way for pattern, way in self.continuation_models if fnmatchcase(model, pattern)), self.continuation
        )


@dataclass(frozen=True, slots=True)
class _Defaults:
    """The global `[timeouts]`, `[retry]`, `[buffer]` and `[breaker]` tables, which providers override."""

    timeouts: Timeouts = field(default_factory=Timeouts)
    retry: RetryConfig = field(default_factory=RetryConfig)
    buffer: BufferConfig = field(default_factory=BufferConfig)
    breaker: BreakerConfig = field(default_factory=BreakerConfig)


@dataclass(frozen=True, slots=True)
class AuthConfig:
    """
    Client keys. When any are set, every `/v1/*` route wants one, as `Authorization: Bearer`
    or `x-api-key`; `protect_metrics` extends that to `/metrics`. Keys come from the file's
    `keys` list and from the environment variable `keys_env` names (several, separated by
    commas or whitespace), and are kept out of every `repr`.
    """

    keys: tuple[str, ...] = field(default=(), repr=False)
    protect_metrics: bool = True

    @property
    def enabled(self) -> bool:
        return bool(self.keys)


@dataclass(frozen=True, slots=True)
class LimitsConfig:
    """
    What one request may ask of the proxy (the `[limits]` table); 0 turns a limit off.

    - `max_body_bytes`: a larger request body (or WebSocket message) is refused with 413 and
      not read past the limit. Images sent inline as base64 make real bodies large;
    - `max_messages`: a longer `messages` array is a 400;
    - `max_string_chars`: any string of the body (message content, tool arguments, a key)
      longer than this is a 400. Off by default: an inline image is one long string, and
      `max_body_bytes` bounds every string already;
    - `requests_per_minute`: streams one client may start in any 60 seconds (429);
    - `max_streams_per_key`: streams one client may run at once (429);
    - `max_concurrent_streams`: streams the whole server runs at once (503);
    - `tokens_per_minute`, `tokens_per_day`: tokens one client may use (429). Admission
      reserves the request's prompt (about four characters a token) and its maximum output
      (`max_tokens`, `max_output_tokens`, or `estimated_output_tokens` when it gives none);
      the stream's end corrects that to the upstream's count.

    A "client" is its key when `[auth]` keys are on, else its address. Every generation
    counts as a stream, `stream: false` requests included.
    """

    max_body_bytes: int = DEFAULT_MAX_BODY_BYTES
    max_messages: int = 2048
    max_string_chars: int = 0
    requests_per_minute: int = 0
    max_streams_per_key: int = 0
    max_concurrent_streams: int = 1000
    tokens_per_minute: int = 0
    tokens_per_day: int = 0
    estimated_output_tokens: int = 1024


@dataclass(frozen=True, slots=True)
class CorsConfig:
    """
    Cross-origin access for browser apps (the `[cors]` table); off while `allow_origins` is
    empty. Origins are compared lowercased, `"*"` allows any; `allow_headers` entries may end
    in `*` to allow a family (`x-stainless-*`), and a lone `"*"` allows whatever is asked.
    """

    allow_origins: tuple[str, ...] = ()
    allow_headers: tuple[str, ...] = DEFAULT_CORS_ALLOW_HEADERS
    expose_headers: tuple[str, ...] = ("x-request-id", "x-stream-id", "retry-after")
    max_age: int = 600
    allow_credentials: bool = False

    @property
    def enabled(self) -> bool:
        return bool(self.allow_origins)


OTLP_PROTOCOLS: Final = ("http/protobuf", "grpc")


@dataclass(frozen=True, slots=True)
class TracingConfig:
    """
    OpenTelemetry traces (the `[tracing]` table), off by default; `_tracing.py` says what is traced.

    What is left unset is the OpenTelemetry SDK's to decide, from its `OTEL_*` environment
    variables: `endpoint` (`OTEL_EXPORTER_OTLP_TRACES_ENDPOINT`, `OTEL_EXPORTER_OTLP_ENDPOINT`,
    else a collector on localhost), `service_name` (`OTEL_SERVICE_NAME`, else "trioproxy") and
    `sample_ratio` (`OTEL_TRACES_SAMPLER`, else every trace the client's `traceparent` does not
    leave out). `endpoint` is the collector's URL; with no path, the signal's own (`/v1/traces`).
    `shutdown_timeout`: seconds a stopping server waits for the last spans to be exported, so
    that an unreachable collector (which the exporter retries for seconds) does not hold it up.
    """

    enabled: bool = False
    endpoint: str | None = None
    protocol: str = "http/protobuf"
    service_name: str | None = None
    sample_ratio: float | None = None
    shutdown_timeout: float = DEFAULT_TRACING_SHUTDOWN_TIMEOUT


@dataclass(frozen=True, slots=True)
class RedisConfig:
    """
    Shared state on Redis (`[redis]`): off while `url` is empty. See `_redis.py`.

    `url` is `redis://` or `rediss://` (TLS) `host:port/db`, its password never in the file:
    `password_env` names the environment variable holding it. Keys live under `key_prefix`.
    `timeout`: seconds any one call to Redis may take, connecting included, before it counts
    as failed. `lease_ttl`: seconds a stream's place in the shared limits outlives its process
    if that process dies (a live process renews its places every third of it). `on_error`:
    what admission does when Redis fails or is slow — "open" admits by this process's own
    limits, "closed" refuses with a 503. `stream_max_events`: entries one resumable stream
    (or stored response) keeps in its Redis Stream, at most (the oldest go first).
    `stream_write_interval`: seconds between two writes of one stream's events to Redis, at
    least (what comes meanwhile goes in the next; each write is a round trip and costs CPU).
    `follow_block`: seconds a process following another's stream waits on Redis for its next
    event before it writes a keep-alive and waits again. `breaker_snapshot_age`: seconds a
    circuit breaker that Redis said is closed is taken as closed without asking again (0: ask
    every time); a target opened elsewhere is skipped here within it.
    """

    url: str = ""
    password: str | None = field(default=None, repr=False)
    key_prefix: str = "trioproxy:"
    timeout: float = 0.5
    lease_ttl: float = 30.0
    on_error: Literal["open", "closed"] = "open"
    stream_max_events: int = 10_000
    stream_write_interval: float = 0.2
    follow_block: float = 5.0
    breaker_snapshot_age: float = 0.1

    @property
    def enabled(self) -> bool:
        return bool(self.url)


@dataclass(frozen=True, slots=True)
class ModelRoute:
    """
    One `[models]` entry: a model name, or a glob pattern (`claude-*`), and where it goes:
    `provider`, asked for `model`, or for the name the client sent when `model` is `None`.
    """

    name: str
    provider: str
    model: str | None = None

    @property
    def is_pattern(self) -> bool:
        return any(c in self.name for c in "*?[")


@dataclass(frozen=True, slots=True)
class Config:
    server: ServerConfig = field(default_factory=ServerConfig)
    providers: Mapping[str, ProviderConfig] = field(
        default_factory=lambda: {SIM: ProviderConfig(name=SIM, type="simulated")}
    )
    default_provider: str | None = None
    models: tuple[ModelRoute, ...] = ()
    warnings: tuple[str, ...] = ()
    streams: StreamsConfig = field(default_factory=StreamsConfig)
    auth: AuthConfig = field(default_factory=AuthConfig)
    logging: LoggingConfig = field(default_factory=LoggingConfig)
    limits: LimitsConfig = field(default_factory=LimitsConfig)
    cors: CorsConfig = field(default_factory=CorsConfig)
    redis: RedisConfig = field(default_factory=RedisConfig)
    tracing: TracingConfig = field(default_factory=TracingConfig)


def load_config(path: str | os.PathLike[str] | None, *, environ: Mapping[str, str] | None = None) -> Config:
    """Read and check a config file; `None` gives the built-in defaults (just `sim`)."""
    if path is None:
        return parse_config({}, environ=environ)
    try:
        text = Path(path).read_text(encoding="utf-8")
    except OSError as exc:
        raise ConfigError([f"cannot read config file {str(path)!r}: {exc.strerror}"]) from None
    except UnicodeDecodeError as exc:
        raise ConfigError([f"{path}: not valid UTF-8 text: {exc.reason} at byte {exc.start}"]) from None
    try:
        raw = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError([f"{path}: not valid TOML: {exc}"]) from None
    return parse_config(raw, environ=environ)


def parse_config(raw: Mapping[str, object], *, environ: Mapping[str, str] | None = None) -> Config:
    """Check a parsed config document; raises `ConfigError` listing every problem."""
    env = os.environ if environ is None else environ
    problems: list[str] = []
    warnings: list[str] = []

    _unknown_keys(
        raw,
        {
            "server",
            "providers",
            "builtin_sim",
            "default_provider",
            "timeouts",
            "retry",
            "buffer",
            "breaker",
            "streams",
            "auth",
            "limits",
            "cors",
            "logging",
            "models",
            "redis",
            "tracing",
        },
        "config",
        problems,
    )
    server = _server(raw.get("server", {}), problems)
    defaults = _Defaults(
        timeouts=parse_policy(Timeouts(), raw.get("timeouts", {}), where="[timeouts]", problems=problems),
        retry=parse_policy(RetryConfig(), raw.get("retry", {}), where="[retry]", problems=problems),
        buffer=parse_policy(BufferConfig(), raw.get("buffer", {}), where="[buffer]", problems=problems),
        breaker=parse_policy(BreakerConfig(), raw.get("breaker", {}), where="[breaker]", problems=problems),
    )
    streams = parse_policy(StreamsConfig(), raw.get("streams", {}), where="[streams]", problems=problems)
    auth = _auth(raw.get("auth", {}), env, problems)
    logs = _logging(raw.get("logging", {}), problems)
    limits = _limits(raw.get("limits", {}), problems)
    cors = _cors(raw.get("cors", {}), problems)
    redis = _redis(raw.get("redis", {}), env, problems)
    tracing = _tracing(raw.get("tracing", {}), problems)
    if defaults.timeouts.connect_timeout <= 0:
        problems.append("[timeouts].connect_timeout must be a positive number")

    providers, tables = _providers(raw, defaults, env, problems, warnings)
    # A provider whose table has mistakes is declared all the same: its own sentences say what is wrong.
    declared = {*providers, *tables}
    default_provider = _default_provider(raw.get("default_provider"), declared, problems)
    _check_fallbacks_name_providers(providers.values(), declared, problems)
    models = _models(raw.get("models", {}), declared, problems)

    if problems:
        raise ConfigError(problems)
    return Config(
        server=server,
        providers=providers,
        default_provider=default_provider,
        models=models,
        warnings=tuple(warnings),
        streams=streams,
        auth=auth,
        logging=logs,
        limits=limits,
        cors=cors,
        redis=redis,
        tracing=tracing,
    )


def _models(table: object, declared: set[str], problems: list[str]) -> tuple[ModelRoute, ...]:
    """The `[models]` table: aliases and patterns, in file order (the first pattern that matches wins)."""
    if not isinstance(table, dict):
        problems.append(
            "[models] must be a table of model names (or patterns like 'claude-*') to 'provider' or 'provider/model'"
        )
        return ()
    routes = []
    for name, target in table.items():
        if not name:
            problems.append("[models]: a model name must not be empty")
            continue
        if not isinstance(target, str) or not target:
            problems.append(f"[models].{name!r} must be 'provider' or 'provider/model', got {target!r}")
            continue
        provider, sep, model = target.partition("/")
        if provider not in declared:
            problems.append(
                f"[models].{name!r} = {target!r} names no provider (declared: {', '.join(sorted(declared))})"
            )
        elif sep and not model:
            problems.append(f"[models].{name!r} = {target!r} names no model after {provider + '/'!r}")
        else:
            routes.append(ModelRoute(name, provider, model or None))
    return tuple(routes)


def _limits(table: object, problems: list[str]) -> LimitsConfig:
    if not isinstance(table, dict):
        problems.append("[limits] must be a table")
        return LimitsConfig()
    known = set(LimitsConfig.__dataclass_fields__)
    _unknown_keys(table, known, "[limits]", problems)
    checked: dict[str, int] = {}
    for key, value in table.items():
        if key not in known:
            continue
        least = 1 if key in ("max_body_bytes", "estimated_output_tokens") else 0
        if isinstance(value, bool) or not isinstance(value, int) or value < least:
            what = "a positive integer" if least else "an integer, 0 or more (0: no limit)"
            problems.append(f"[limits].{key} must be {what}, got {value!r}")
        else:
            checked[key] = value
    return LimitsConfig(**checked)


def _providers(
    raw: Mapping[str, object], defaults: _Defaults, env: Mapping[str, str], problems: list[str], warnings: list[str]
) -> tuple[dict[str, ProviderConfig], dict[str, Any]]:
    """The providers that are well formed, the built-in `sim` unless left out; and every provider table."""
    builtin_sim = raw.get("builtin_sim", True)
    if not isinstance(builtin_sim, bool):
        problems.append(f"builtin_sim must be true or false, got {builtin_sim!r}")
    providers: dict[str, ProviderConfig] = {}
    if builtin_sim is not False:
        providers[SIM] = ProviderConfig(
            name=SIM, type="simulated", timeouts=defaults.timeouts, retry=defaults.retry, buffer=defaults.buffer
        )
    tables = raw.get("providers", {})
    if not isinstance(tables, dict):
        problems.append("[providers] must be a table of provider tables")
        tables = {}
    for name, table in tables.items():
        provider = _provider(name, table, defaults, env, problems, warnings)
        if provider is not None:
            providers[name] = provider
    if not providers and not tables:
        problems.append("no provider is declared: add a [providers.NAME] table (builtin_sim = false leaves out 'sim')")
    return providers, tables


def _default_provider(value: object, declared: set[str], problems: list[str]) -> str | None:
    if value is None:
        return None
    if not isinstance(value, str):
        problems.append(f"default_provider must be a provider name (a string), got {value!r}")
        return None
    if value not in declared:
        problems.append(f"default_provider = {value!r} names no provider (declared: {', '.join(sorted(declared))})")
    return value


def _check_fallbacks_name_providers(
    providers: Iterable[ProviderConfig], declared: set[str], problems: list[str]
) -> None:
    for provider in providers:
        for key in ("fallbacks", "context_fallbacks"):
            for i, fallback in enumerate(getattr(provider, key)):
                if fallback.partition("/")[0] not in declared:
                    problems.append(
                        f"[providers.{provider.name}].{key}[{i}] = {fallback!r} names no provider "
                        "(write it as 'provider/model')"
                    )


def _redis(table: object, env: Mapping[str, str], problems: list[str]) -> RedisConfig:
    if not isinstance(table, dict):
        problems.append("[redis] must be a table")
        return RedisConfig()
    known = {"url", "password_env", "key_prefix", "timeout", "lease_ttl", "on_error"}
    known |= {"stream_max_events", "stream_write_interval", "follow_block", "breaker_snapshot_age"}
    _unknown_keys(table, known, "[redis]", problems)
    base = RedisConfig()
    url = _redis_url(table.get("url", ""), problems)
    password = _redis_password(table.get("password_env"), env, problems)
    prefix = table.get("key_prefix", base.key_prefix)
    if not isinstance(prefix, str):
        problems.append(f"[redis].key_prefix must be a string, got {prefix!r}")
        prefix = base.key_prefix

    on_error = table.get("on_error", base.on_error)
    if on_error not in ("open", "closed"):
        problems.append(f"[redis].on_error must be 'open' or 'closed', got {on_error!r}")
        on_error = base.on_error
    max_events = table.get("stream_max_events", base.stream_max_events)
    if isinstance(max_events, bool) or not isinstance(max_events, int) or max_events < 1:
        problems.append(f"[redis].stream_max_events must be a positive integer, got {max_events!r}")
        max_events = base.stream_max_events
    snapshot_age = table.get("breaker_snapshot_age", base.breaker_snapshot_age)
    if isinstance(snapshot_age, bool) or not isinstance(snapshot_age, (int, float)) or not 0 <= snapshot_age < math.inf:
        problems.append(f"[redis].breaker_snapshot_age must be 0 or a positive number of seconds, got {snapshot_age!r}")
        snapshot_age = base.breaker_snapshot_age
    return RedisConfig(
        url=url,
        password=password,
        key_prefix=prefix,
        timeout=_positive_seconds(table, "timeout", base.timeout, "[redis]", problems),
        lease_ttl=_positive_seconds(table, "lease_ttl", base.lease_ttl, "[redis]", problems),
        on_error=on_error,
        stream_max_events=max_events,
        stream_write_interval=_positive_seconds(
            table, "stream_write_interval", base.stream_write_interval, "[redis]", problems
        ),
        follow_block=_positive_seconds(table, "follow_block", base.follow_block, "[redis]", problems),
        breaker_snapshot_age=snapshot_age,
    )


def _redis_url(url: object, problems: list[str]) -> str:
    """`[redis].url`, if it is a Redis URL without a password; otherwise "" (Redis off)."""
    if not isinstance(url, str) or (url and urlsplit(url).scheme not in ("redis", "rediss")):
        problems.append(f"[redis].url must be a redis:// or rediss:// URL, got {url!r}")
        return ""
    if urlsplit(url).password:
        problems.append("[redis].url must not hold a password: name the variable that does in [redis].password_env")
        return ""
    return url


def _redis_password(password_env: object, env: Mapping[str, str], problems: list[str]) -> str | None:
    """The password in the environment variable `[redis].password_env` names, if it names one."""
    if password_env is None:
        return None
    if not isinstance(password_env, str) or not password_env:
        problems.append(f"[redis].password_env must be the name of an environment variable, got {password_env!r}")
        return None
    if not env.get(password_env):
        problems.append(f"[redis].password_env: environment variable {password_env} is not set")
        return None
    return env[password_env]


def _cors(table: object, problems: list[str]) -> CorsConfig:
    if not isinstance(table, dict):
        problems.append("[cors] must be a table")
        return CorsConfig()
    _unknown_keys(table, set(CorsConfig.__dataclass_fields__), "[cors]", problems)
    checked: dict[str, Any] = {}
    _cors_origins(table, problems, checked)
    for key in ("allow_headers", "expose_headers"):
        _cors_header_names(table, key, problems, checked)
    max_age = table.get("max_age")
    if max_age is not None:
        if isinstance(max_age, bool) or not isinstance(max_age, int) or max_age < 0:
            problems.append(f"[cors].max_age must be a number of seconds, 0 or more, got {max_age!r}")
        else:
            checked["max_age"] = max_age
    _bool(table, "allow_credentials", "[cors]", problems, checked)
    if checked.get("allow_credentials") and "*" in checked.get("allow_origins", ()):
        problems.append(
            "[cors].allow_credentials = true needs the origins listed: with '*', "
            "every web site could send its visitors' cookies to the proxy"
        )
    return CorsConfig(**checked)


def _cors_origins(table: Mapping[str, object], problems: list[str], checked: dict[str, Any]) -> None:
    origins = table.get("allow_origins", [])
    if not isinstance(origins, list) or not all(isinstance(o, str) for o in origins):
        problems.append("[cors].allow_origins must be a list of origins like 'https://app.example.com', or ['*']")
        return
    checked["allow_origins"] = tuple(o.strip().lower() for o in origins)
    for origin in checked["allow_origins"]:
        if origin != "*" and not _ORIGIN.match(origin):
            problems.append(
                f"[cors].allow_origins: {origin!r} is not an origin: write scheme://host[:port], "
                "with no path and no trailing slash (e.g. 'https://app.example.com')"
            )


def _cors_header_names(table: Mapping[str, object], key: str, problems: list[str], checked: dict[str, Any]) -> None:
    """`allow_headers` (where a name may end in `*`: a prefix) or `expose_headers`."""
    names = table.get(key)
    if names is None:
        return
    if not isinstance(names, list) or not all(isinstance(n, str) for n in names):
        problems.append(f"[cors].{key} must be a list of header names")
        return
    checked[key] = tuple(n.strip().lower() for n in names)
    for name in checked[key]:
        pattern = key == "allow_headers" and name.endswith("*")
        if not _HEADER_NAME.match(name) or "*" in (name[:-1] if pattern else name):
            problems.append(
                f"[cors].{key}: {name!r} is not a header name" + (" (or 'prefix-*')" if key == "allow_headers" else "")
            )


def _tracing(table: Any, problems: list[str]) -> TracingConfig:
    if not isinstance(table, dict):
        problems.append("[tracing] must be a table")
        return TracingConfig()
    _unknown_keys(table, set(TracingConfig.__dataclass_fields__), "[tracing]", problems)
    checked: dict[str, Any] = {}
    _bool(table, "enabled", "[tracing]", problems, checked)
    endpoint = table.get("endpoint")
    if endpoint is not None:
        if not _is_url(endpoint):
            problems.append(f"[tracing].endpoint must be an http:// or https:// URL, got {endpoint!r}")
        else:
            checked["endpoint"] = endpoint
    protocol = table.get("protocol")
    if protocol is not None:
        if protocol not in OTLP_PROTOCOLS:
            choices = ", ".join(map(repr, OTLP_PROTOCOLS))
            problems.append(f"[tracing].protocol must be one of {choices}, got {protocol!r}")
        else:
            checked["protocol"] = protocol
    service_name = table.get("service_name")
    if service_name is not None:
        if not isinstance(service_name, str) or not service_name.strip():
            problems.append(f"[tracing].service_name must be a non-empty string, got {service_name!r}")
        else:
            checked["service_name"] = service_name
    ratio = table.get("sample_ratio")
    if ratio is not None:
        if isinstance(ratio, bool) or not isinstance(ratio, (int, float)) or not 0 <= ratio <= 1:
            problems.append(f"[tracing].sample_ratio must be a number from 0 to 1, got {ratio!r}")
        else:
            checked["sample_ratio"] = float(ratio)
    checked["shutdown_timeout"] = _positive_seconds(
        table, "shutdown_timeout", DEFAULT_TRACING_SHUTDOWN_TIMEOUT, "[tracing]", problems
    )
    return TracingConfig(**checked)


def _auth(table: object, env: Mapping[str, str], problems: list[str]) -> AuthConfig:
    """
    Every key source named must yield a key: a source that yields none (an unset or empty
    variable, an empty list) would leave every route open while the file says it is closed.
    """
    if not isinstance(table, dict):
        problems.append("[auth] must be a table")
        return AuthConfig()
    _unknown_keys(table, {"keys", "keys_env", "protect_metrics"}, "[auth]", problems)
    keys: list[str] = []
    listed = table.get("keys", [])
    if not isinstance(listed, list) or not all(isinstance(k, str) and k.strip() for k in listed):
        problems.append("[auth].keys must be a list of non-empty strings")
    elif "keys" in table and not listed:
        problems.append("[auth].keys is empty: list a key, or remove it (an empty list would leave every route open)")
    else:
        keys.extend(k.strip() for k in listed)
    keys_env = table.get("keys_env")
    if keys_env is not None:
        if not isinstance(keys_env, str) or not keys_env:
            problems.append(f"[auth].keys_env must be the name of an environment variable, got {keys_env!r}")
        else:
            found = [k for k in re.split(r"[\s,]+", env.get(keys_env, "")) if k]
            if not found:
                state = "is not set" if keys_env not in env else "holds no keys"
                problems.append(
                    f"[auth].keys_env: environment variable {keys_env} {state}; "
                    "the server would serve every route without a key"
                )
            keys.extend(found)
    checked: dict[str, Any] = {}
    _bool(table, "protect_metrics", "[auth]", problems, checked)
    return AuthConfig(keys=tuple(keys), **checked)


def _logging(table: object, problems: list[str]) -> LoggingConfig:
    if not isinstance(table, dict):
        problems.append("[logging] must be a table")
        return LoggingConfig()
    _unknown_keys(table, {"format", "level", "access_log", "include_prompts"}, "[logging]", problems)
    changes: dict[str, Any] = {}
    for key, choices in (("format", LOG_FORMATS), ("level", LOG_LEVELS)):
        value = table.get(key)
        if value is None:
            continue
        if value not in choices:
            problems.append(f"[logging].{key} must be one of {', '.join(map(repr, choices))}, got {value!r}")
        else:
            changes[key] = value
    for key in ("access_log", "include_prompts"):
        _bool(table, key, "[logging]", problems, changes)
    return replace(LoggingConfig(), **changes)


def _server(table: object, problems: list[str]) -> ServerConfig:
    if not isinstance(table, dict):
        problems.append("[server] must be a table")
        return ServerConfig()
    _unknown_keys(
        table,
        {
            "host",
            "port",
            "write_timeout",
            "shutdown_grace_period",
            "keep_alive_timeout",
            "body_timeout",
            "workers",
        },
        "[server]",
        problems,
    )
    host = table.get("host", DEFAULT_HOST)
    port = table.get("port", DEFAULT_PORT)
    if not isinstance(host, str) or not host:
        problems.append(f"[server].host must be a non-empty string, got {host!r}")
        host = DEFAULT_HOST
    if not isinstance(port, int) or isinstance(port, bool) or not 0 <= port <= 65535:
        problems.append(f"[server].port must be an integer from 0 to 65535, got {port!r}")
        port = DEFAULT_PORT

    write_timeout = _positive_seconds(table, "write_timeout", DEFAULT_WRITE_TIMEOUT, "[server]", problems)
    keep_alive_timeout = _positive_seconds(
        table, "keep_alive_timeout", DEFAULT_KEEP_ALIVE_TIMEOUT, "[server]", problems
    )
    body_timeout = _positive_seconds(table, "body_timeout", DEFAULT_BODY_TIMEOUT, "[server]", problems)
    grace = table.get("shutdown_grace_period", DEFAULT_SHUTDOWN_GRACE_PERIOD)
    if isinstance(grace, bool) or not isinstance(grace, (int, float)) or not 0 <= grace < math.inf:
        problems.append(f"[server].shutdown_grace_period must be a number of seconds, 0 or more, got {grace!r}")
        grace = DEFAULT_SHUTDOWN_GRACE_PERIOD
    workers = table.get("workers", 1)
    if isinstance(workers, bool) or not isinstance(workers, int) or not 1 <= workers <= MAX_WORKERS:
        problems.append(f"[server].workers must be an integer from 1 to {MAX_WORKERS}, got {workers!r}")
        workers = 1
    return ServerConfig(
        host=host,
        port=port,
        write_timeout=write_timeout,
        shutdown_grace_period=grace,
        keep_alive_timeout=keep_alive_timeout,
        body_timeout=body_timeout,
        workers=workers,
    )


_FORWARD_PATH: Final = re.compile(r"^/v1/[A-Za-z0-9._~-][A-Za-z0-9._~/-]*$")
"""A forwarded path prefix: under `/v1/`, in the characters of a plain URL path (it becomes a URL rule)."""

_TIMEOUT_KEYS: Final = {"first_token_timeout", "silence_timeout", "total_timeout", "heartbeat_interval", "hedge_after"}
_COMMON_KEYS: Final = {
    "type",
    "models",
    "retry",
    "fallbacks",
    "context_fallbacks",
    "buffer",
    "transforms",
    "validators",
    "continuation",
    *_TIMEOUT_KEYS,
}
_CONNECTION_KEYS: Final = {
    "base_url",
    "base_urls",
    "targets",
    "breaker",
    "api_key_env",
    "headers",
    "connect_timeout",
    "max_connections",
    "skip_malformed_events",
}
"""How a provider reaches its upstream over HTTP: nothing a simulated provider, a script, has."""
_CONTINUATION_WAYS: Final = {
    "openai": ("none", "continue_final_message"),
    "anthropic": ("none", "prefill"),
    "openai_responses": ("none",),
    "simulated": ("none",),
}
"""How each type of upstream can continue a broken answer (`trioproxy._continuation`)."""
_TYPE_KEYS: Final = {
    "openai": {*_CONNECTION_KEYS, "request_usage", "forward_paths", "drop_params"},
    "openai_responses": {*_CONNECTION_KEYS, "drop_params"},
    "anthropic": {*_CONNECTION_KEYS, "anthropic_version", "default_max_tokens", "forward_paths", "drop_params"},
    "simulated": set(SimulatedSettings.__dataclass_fields__),
}


def _provider(
    name: str, table: object, defaults: _Defaults, env: Mapping[str, str], problems: list[str], warnings: list[str]
) -> ProviderConfig | None:
    where = f"[providers.{name}]"
    if not _NAME.match(name):
        problems.append(f"{where}: a provider name may hold only letters, digits, '_', '-' and '.'")
        return None
    if not isinstance(table, dict):
        problems.append(f"{where} must be a table")
        return None
    type_ = _provider_type(table, where, problems)
    if type_ is None:
        return None
    before = len(problems)
    table = _provider_keys(table, type_, where, problems)
    checked: dict[str, Any] = {}
    _base_url(table, type_, where, problems, checked)
    _api_key(table, env, where, problems, warnings, checked)
    _headers(table, where, problems, checked)
    _model_names(table, where, problems, checked)
    _policies(table, defaults, where, problems, checked)
    for key in ("fallbacks", "context_fallbacks"):
        _fallbacks(table, key, where, problems, checked)
    if "transforms" in table:
        checked["transforms"] = build_transforms(table["transforms"], where=f"{where}.transforms", problems=problems)
    if "validators" in table:
        checked["validators"] = build_validators(table["validators"], where=f"{where}.validators", problems=problems)
    _number(table, "max_connections", where, problems, checked, positive=True, integer=True)
    _number(table, "default_max_tokens", where, problems, checked, positive=True, integer=True)
    _bool(table, "request_usage", where, problems, checked)
    _forward_paths(table, where, problems, checked)
    _drop_params(table, where, problems, checked)
    _bool(table, "skip_malformed_events", where, problems, checked)
    _continuation(table, type_, where, problems, checked)
    _string(table, "anthropic_version", where, problems, checked)
    if type_ == "simulated":
        _simulated(table, where, problems, checked)
    if len(problems) > before:
        return None
    return ProviderConfig(name=name, type=type_, **checked)


def _provider_keys(table: Mapping[str, object], type_: str, where: str, problems: list[str]) -> dict[str, object]:
    """
    `table` without the keys that do nothing for a provider of `type_` (a simulated one's
    connection keys): each is a problem, as an unknown key is, in the table's order.
    """
    known = _COMMON_KEYS | _TYPE_KEYS[type_]
    pointless = _CONNECTION_KEYS - known
    for key in table:
        if key in pointless:
            why = "it plays a script: no upstream, no connection"
            problems.append(f"{where}: {key!r} does nothing for a simulated provider ({why})")
        elif key not in known:
            problems.append(_unknown_key(key, known, where))
    return {key: value for key, value in table.items() if key not in pointless}


def _provider_type(table: Mapping[str, object], where: str, problems: list[str]) -> str | None:
    type_ = table.get("type")
    if not isinstance(type_, str) or type_ not in PROVIDER_TYPES:
        what = "is missing" if type_ is None else f"{type_!r} is unknown"
        types = ", ".join(map(repr, PROVIDER_TYPES))
        problems.append(f"{where}.type {what}: say which protocol the upstream speaks, one of {types}")
        return None
    return type_


def _base_url(
    table: Mapping[str, object], type_: str, where: str, problems: list[str], checked: dict[str, Any]
) -> None:
    """`targets` and the `base_url` of the first (or only) one."""
    targets = _targets(table, where, problems)
    if targets:
        checked["targets"] = targets
    base_url = (
        targets[0].base_url if targets else table.get("base_url", DEFAULT_ANTHROPIC_URL if type_ == "anthropic" else "")
    )
    if type_ in ("openai", "openai_responses") and not ({"base_url", "base_urls", "targets"} & table.keys()):
        problems.append(f"{where}.base_url is required for an {type_} provider (e.g. 'http://127.0.0.1:9000/v1')")
    elif type_ != "simulated" and not ({"base_urls", "targets"} & table.keys()) and not _is_url(base_url):
        problems.append(f"{where}.base_url must be an http:// or https:// URL, got {base_url!r}")
    checked["base_url"] = base_url if isinstance(base_url, str) else ""


def _api_key(
    table: Mapping[str, object],
    env: Mapping[str, str],
    where: str,
    problems: list[str],
    warnings: list[str],
    checked: dict[str, Any],
) -> None:
    api_key_env = table.get("api_key_env")
    if api_key_env is None:
        return
    if not isinstance(api_key_env, str) or not api_key_env:
        problems.append(f"{where}.api_key_env must be the name of an environment variable, got {api_key_env!r}")
        return
    checked["api_key_env"] = api_key_env
    checked["api_key"] = env.get(api_key_env) or None
    if checked["api_key"] is None:
        warnings.append(f"{where}: environment variable {api_key_env} is not set; requests go without a key")


def _headers(table: Mapping[str, object], where: str, problems: list[str], checked: dict[str, Any]) -> None:
    headers = table.get("headers", {})
    if not isinstance(headers, dict):
        problems.append(f"{where}.headers must be a table of strings, got {headers!r}")
    elif bad_headers := [(k, v) for k, v in headers.items() if not isinstance(v, str)]:
        problems.extend(f"{where}.headers.{k} must be a string, got {v!r}" for k, v in bad_headers)
    else:
        checked["headers"] = dict(headers)


def _model_names(table: Mapping[str, object], where: str, problems: list[str], checked: dict[str, Any]) -> None:
    models = table.get("models", [])
    if not isinstance(models, list):
        problems.append(f"{where}.models must be a list of model names, got {models!r}")
    elif bad_models := [(i, m) for i, m in enumerate(models) if not isinstance(m, str) or not m]:
        problems.extend(f"{where}.models[{i}] = {m!r} is not a model name" for i, m in bad_models)
    else:
        checked["models"] = tuple(models)


def _policies(
    table: Mapping[str, object], defaults: _Defaults, where: str, problems: list[str], checked: dict[str, Any]
) -> None:
    """The provider's timeouts (keys of its own table) and its retry, buffer and breaker tables, over the defaults."""
    timeouts = parse_policy(
        defaults.timeouts,
        {k: v for k, v in table.items() if k in _TIMEOUT_KEYS},
        where=where,
        problems=problems,
    )
    _number(table, "connect_timeout", where, problems, checked, positive=True)
    checked["timeouts"] = replace(timeouts, connect_timeout=checked.pop("connect_timeout", timeouts.connect_timeout))
    checked["retry"] = parse_policy(defaults.retry, table.get("retry", {}), where=f"{where}.retry", problems=problems)
    checked["buffer"] = parse_policy(
        defaults.buffer, table.get("buffer", {}), where=f"{where}.buffer", problems=problems
    )
    checked["breaker"] = parse_policy(
        defaults.breaker, table.get("breaker", {}), where=f"{where}.breaker", problems=problems
    )


def _fallbacks(table: Mapping[str, object], key: str, where: str, problems: list[str], checked: dict[str, Any]) -> None:
    names = table.get(key, [])
    if not isinstance(names, list):
        problems.append(f"{where}.{key} must be a list of 'provider/model' names, got {names!r}")
        return
    bad = [(i, f) for i, f in enumerate(names) if not isinstance(f, str) or not _FALLBACK.match(f)]
    for i, fallback in bad:
        problems.append(f"{where}.{key}[{i}] = {fallback!r} is not a 'provider/model' name")
    if not bad:
        checked[key] = tuple(names)


def _forward_paths(table: Mapping[str, object], where: str, problems: list[str], checked: dict[str, Any]) -> None:
    if "forward_paths" not in table:
        return
    forward_paths = table["forward_paths"]
    if not isinstance(forward_paths, list) or not all(
        isinstance(path, str) and _FORWARD_PATH.match(path) for path in forward_paths
    ):
        problems.append(
            f"{where}.forward_paths must be a list of path prefixes under /v1/ "
            "(letters, digits and '/._~-', e.g. '/v1/moderations')"
        )
    else:
        checked["forward_paths"] = tuple(path.rstrip("/") for path in forward_paths)


def _drop_params(table: Mapping[str, object], where: str, problems: list[str], checked: dict[str, Any]) -> None:
    """`drop_params`: true, false, or the names of the fields to drop."""
    drop_params = table.get("drop_params", False)
    if isinstance(drop_params, bool):
        checked["drop_params"] = drop_params
    elif isinstance(drop_params, list) and all(isinstance(n, str) and n for n in drop_params):
        checked["drop_params"] = frozenset(drop_params)
    else:
        problems.append(
            f"{where}.drop_params must be true, false or a list of field names (e.g. ['seed', 'logit_bias']), "
            f"got {drop_params!r}"
        )


def _continuation(
    table: Mapping[str, object], type_: str, where: str, problems: list[str], checked: dict[str, Any]
) -> None:
    """
    `continuation`: one way for every model, or a table of model patterns and their ways (a
    model none matches continues as its type does by default).
    """
    ways = _CONTINUATION_WAYS[type_]
    default = "prefill" if type_ == "anthropic" else "none"
    continuation = table.get("continuation", default)
    named: list[tuple[str, object]] = (
        list(continuation.items()) if isinstance(continuation, dict) else [("", continuation)]
    )
    bad = [(pattern, way) for pattern, way in named if way not in ways]
    for pattern, way in bad:
        key = f"continuation.{pattern!r}" if pattern else "continuation"
        problems.append(f"{where}.{key} must be one of {', '.join(map(repr, ways))}, got {way!r}")
    if not bad and isinstance(continuation, dict):
        checked["continuation_models"] = tuple(continuation.items())
        checked["continuation"] = default
    elif not bad:
        checked["continuation"] = continuation


def _simulated(table: Mapping[str, object], where: str, problems: list[str], checked: dict[str, Any]) -> None:
    """The settings of a `simulated` provider, which are keys of its own table."""
    sim_values: dict[str, Any] = {k: v for k, v in table.items() if k in _TYPE_KEYS["simulated"]}  # checked below
    sim_problems = settings_problems(sim_values, where=where)
    if not sim_problems:
        checked["simulated"] = SimulatedSettings(**sim_values)
        sim_problems = checked["simulated"].cap_problems(where=where)
    problems.extend(sim_problems)


def _is_url(value: object) -> TypeGuard[str]:
    return isinstance(value, str) and re.match(r"^https?://[^/]", value) is not None


def _targets(table: Mapping[str, object], where: str, problems: list[str]) -> tuple[TargetConfig, ...]:
    """A provider's replicas: `base_urls = [...]`, or `[[targets]]` tables with `base_url` and `weight`."""
    given = [key for key in ("base_url", "base_urls", "targets") if key in table]
    if len(given) > 1:
        problems.append(f"{where}: give one of base_url, base_urls and targets, not {' and '.join(given)}")
        return ()
    if "base_urls" in table:
        urls = table["base_urls"]
        if not isinstance(urls, list) or not urls or not all(_is_url(url) for url in urls):
            problems.append(f"{where}.base_urls must be a non-empty list of http:// or https:// URLs, got {urls!r}")
            return ()
        return tuple(TargetConfig(url) for url in urls)
    if "targets" not in table:
        return ()
    tables = table["targets"]
    if not isinstance(tables, list) or not tables:
        problems.append(f"{where}.targets must be a non-empty list of tables with base_url (and weight)")
        return ()
    targets = []
    for i, target in enumerate(tables):
        at = f"{where}.targets[{i}]"
        if not isinstance(target, dict) or set(target) - {"base_url", "weight"}:
            problems.append(f"{at} must be a table with base_url and an optional weight, got {target!r}")
            continue
        url, weight = target.get("base_url"), target.get("weight", 1)
        if not _is_url(url):
            problems.append(f"{at}.base_url must be an http:// or https:// URL, got {url!r}")
        elif isinstance(weight, bool) or not isinstance(weight, (int, float)) or not weight > 0:
            problems.append(f"{at}.weight must be a positive number, got {weight!r}")
        else:
            targets.append(TargetConfig(url, float(weight)))
    return tuple(targets) if len(targets) == len(tables) else ()


def _number(
    table: Mapping[str, object],
    key: str,
    where: str,
    problems: list[str],
    checked: dict[str, Any],
    *,
    positive: bool,
    integer: bool = False,
) -> None:
    if key not in table:
        return
    value = table[key]
    kinds = (int,) if integer else (int, float)
    if isinstance(value, bool) or not isinstance(value, kinds) or (positive and value <= 0):
        what = "a positive integer" if integer else "a positive number"
        problems.append(f"{where}.{key} must be {what}, got {value!r}")
    else:
        checked[key] = value


def _positive_seconds(table: Mapping[str, object], key: str, default: float, where: str, problems: list[str]) -> float:
    value = table.get(key, default)
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 < value < math.inf:
        problems.append(f"{where}.{key} must be a positive number of seconds, got {value!r}")
        return default
    return value


def _string(table: Mapping[str, object], key: str, where: str, problems: list[str], checked: dict[str, Any]) -> None:
    if key not in table:
        return
    value = table[key]
    if isinstance(value, str):
        checked[key] = value
    else:
        problems.append(f"{where}.{key} must be a string")


def _bool(table: Mapping[str, object], key: str, where: str, problems: list[str], checked: dict[str, Any]) -> None:
    if key not in table:
        return
    if isinstance(table[key], bool):
        checked[key] = table[key]
    else:
        problems.append(f"{where}.{key} must be true or false, got {table[key]!r}")


def _unknown_keys(table: Mapping[str, object], known: set[str], where: str, problems: list[str]) -> None:
    problems.extend(_unknown_key(key, known, where) for key in table if key not in known)


def _unknown_key(key: str, known: set[str], where: str) -> str:
    return f"{where}: unknown key {key!r} (known: {', '.join(sorted(known))})"
