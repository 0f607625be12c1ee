"""
The settings of a benchmark run, and the command-line flags that set them.

Shared by `trioproxy bench` and the scripts in `benchmarks/`, so that a flag means the same
everywhere. Kept free of heavy imports: the CLI imports it to build its parser.
"""

from __future__ import annotations

import argparse
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Literal
from urllib.parse import urlsplit

#: A stream per connection at least this many times, and at least this many streams per phase
#: in all, so that a phase at concurrency 1 still has percentiles worth the name.
MIN_ROUNDS = 2
MIN_STREAMS = 10
#: Bound on any concurrency asked for: each stream costs a socket in three processes.
CONCURRENCY_LIMIT = 20_000
#: Bound on `--workers`: each is a trioproxy process.
MAX_WORKERS = 256
#: A client protocol a run can drive trioproxy with: OpenAI Chat Completions
#: (`/v1/chat/completions`), Anthropic Messages (`/v1/messages`), OpenAI Responses
#: (`/v1/responses`) over SSE or in WebSocket mode.
Front = Literal["openai", "anthropic", "responses", "responses-ws"]
FRONTS: tuple[Front, ...] = ("openai", "anthropic", "responses", "responses-ws")
#: The front whose direct connection another is measured against, when the upstream has no
#: route of its own for it: WebSocket mode against the Responses stream over HTTP (the same
#: events; OpenAI serves both, the benchmark upstream only the latter).
DIRECT_FRONT: dict[Front, Front] = {"responses-ws": "responses"}


@dataclass(frozen=True)
class BenchSettings:
    """Everything that decides what a run measures. Defaults are the issue's reference workload."""

    concurrency: tuple[int, ...] = (1, 50, 200)
    #: Each front is measured direct (the upstream's own route) and through trioproxy.
    fronts: tuple[Front, ...] = ("openai",)
    tokens: int = 64
    ttft_ms: float = 50.0
    interval_ms: float = 20.0
    #: Other OpenAI-compatible proxies, `URL` or `NAME=URL`, routed to the same upstream.
    compare: tuple[str, ...] = ()
    #: The model name sent to `compare` proxies (and to a `proxy_url` trioproxy: `up/m`).
    compare_model: str = "up/m"
    #: Measure this running trioproxy instead of starting one (its CPU and RSS are not measured).
    proxy_url: str | None = None
    #: 0: any free port. A fixed port lets an external proxy be configured for the upstream.
    upstream_port: int = 0
    find_max: bool = False
    max_concurrency: int = 2000
    buffer_concurrency: int = 20
    #: Which parts to run: the latency sweep, the buffer modes.
    sweep: bool = True
    buffer: bool = True
    plot: bool = True
    output: Path | None = None
    #: Prefix of the output files' names.
    name: str = "bench"
    warmup_rounds: int = 1
    #: Start each phase's streams spread over one stream's duration (steady traffic), not all at once.
    staggered: bool = False
    #: Also measure `trioproxy serve --workers N` beside the one process, in the same run (None: one only).
    workers: int | None = None

    @property
    def stream_s(self) -> float:
        """How long a stream takes at the upstream's pace: what staggered starts are spread over."""
        return (self.ttft_ms + (self.tokens - 1) * self.interval_ms) / 1000

    def rounds_for(self, concurrency: int) -> int:
        """
        Measured streams per connection at `concurrency` (see `MIN_STREAMS`); with staggered
        starts one more, as the first and last stream's time ramp the concurrency up and down.
        """
        rounds = MIN_ROUNDS + 1 if self.staggered else MIN_ROUNDS
        return max(rounds, -(-MIN_STREAMS // concurrency))

    @property
    def stream_timeout_s(self) -> float:
        """Generous: 20 times a stream's ideal duration, at least 30 s, so a slow proxy shows as slow, not failed."""
        ideal = (self.ttft_ms + self.tokens * self.interval_ms) / 1000
        return max(30.0, 20 * ideal)


#: `--quick`: a smoke run that finishes well under a minute.
QUICK: dict[str, Any] = {
    "concurrency": (1, 10),
    "tokens": 16,
    "ttft_ms": 20.0,
    "interval_ms": 5.0,
    "buffer_concurrency": 4,
}
#: Flags that `--quick` gives a value when they are not given.
_WORKLOAD_FLAGS = tuple(QUICK)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The flags of `trioproxy bench` (defaults are None so `--quick` can fill in its own)."""
    parser.add_argument("--quick", action="store_true", help="a smoke run: concurrency 1,10; 16 tokens 5 ms apart")
    parser.add_argument("--concurrency", type=_concurrency_list, help="comma-separated sweep (default 1,50,200)")
    parser.add_argument(
        "--fronts", type=_front_list, default=("openai",),
        help="comma-separated client protocols to measure: openai, anthropic, responses, responses-ws (default openai)",
    )  # fmt: skip
    parser.add_argument("--tokens", type=_positive_int, help="tokens per stream (default 64)")
    parser.add_argument("--ttft-ms", type=_non_negative, help="upstream time to first token (default 50)")
    parser.add_argument("--interval-ms", type=_non_negative, help="upstream time between tokens (default 20)")
    parser.add_argument(
        "--compare", action="append", type=_compare_target, default=[], metavar="[NAME=]URL",
        help="another OpenAI-compatible proxy to measure side by side, named NAME in the report (repeatable)",
    )  # fmt: skip
    parser.add_argument("--compare-model", default="up/m", help="model name sent to --compare proxies (default up/m)")
    parser.add_argument("--proxy-url", type=_http_url, help="measure this running trioproxy instead of starting one")
    parser.add_argument(
        "--upstream-port", type=int, default=0, help="port for the benchmark upstream (default: any free port)"
    )
    parser.add_argument(
        "--staggered", action="store_true",
        help="start each phase's streams spread over one stream's duration (steady traffic), not all at once",
    )  # fmt: skip
    parser.add_argument(
        "--workers", type=_worker_count, metavar="N",
        help="also measure trioproxy with N worker processes beside one process, in the same run "
        "(adds a concurrency N times the largest unless --concurrency is given)",
    )  # fmt: skip
    parser.add_argument("--find-max", action="store_true", help="double the concurrency until streams suffer")
    parser.add_argument("--max-concurrency", type=_positive_int, default=2000, help="bound for --find-max (2000)")
    parser.add_argument("--buffer-concurrency", type=_positive_int, help="streams per buffer mode (default 20)")
    parser.add_argument("--no-plot", action="store_true", help="skip the PNG plot (no matplotlib needed)")
    parser.add_argument("--output", type=Path, help="directory for the JSON and PNG (default benchmarks/results/)")


def settings_from_args(args: argparse.Namespace, **overrides: Any) -> BenchSettings:
    """The settings the flags ask for: explicit flags win over `--quick`, which wins over defaults."""
    workload = dict(QUICK) if args.quick else {}
    workload.update({name: getattr(args, name) for name in _WORKLOAD_FLAGS if getattr(args, name) is not None})
    if args.workers is not None and args.concurrency is None:
        workload["concurrency"] = saturating(workload.get("concurrency", BenchSettings.concurrency), args.workers)
    settings = BenchSettings(
        **workload,
        fronts=args.fronts,
        compare=tuple(args.compare),
        compare_model=args.compare_model,
        proxy_url=args.proxy_url,
        upstream_port=args.upstream_port,
        find_max=args.find_max,
        staggered=args.staggered,
        workers=args.workers,
        max_concurrency=args.max_concurrency,
        plot=not args.no_plot,
        output=args.output,
    )
    return replace(settings, **overrides)


def saturating(concurrency: tuple[int, ...], workers: int) -> tuple[int, ...]:
    """
    `concurrency` and `workers` times its largest: a level the sweep's largest fills one
    process at, so that N processes are asked N times as much and their saturation shows.
    """
    return (*concurrency, max(concurrency) * workers)


def _worker_count(text: str) -> int:
    value = int(text)
    if not 2 <= value <= MAX_WORKERS:
        raise argparse.ArgumentTypeError(f"must be between 2 and {MAX_WORKERS} (one process is always measured)")
    return value


def _positive_int(text: str) -> int:
    value = int(text)
    if not 1 <= value <= CONCURRENCY_LIMIT:
        raise argparse.ArgumentTypeError(f"must be between 1 and {CONCURRENCY_LIMIT}")
    return value


def _non_negative(text: str) -> float:
    value = float(text)
    if not 0 <= value <= 60_000:
        raise argparse.ArgumentTypeError("must be between 0 and 60000")
    return value


def _concurrency_list(text: str) -> tuple[int, ...]:
    try:
        values = sorted({_positive_int(part) for part in text.split(",") if part.strip()})
    except ValueError as exc:
        raise argparse.ArgumentTypeError(f"expected numbers like 1,50,200: {exc}") from None
    if not values:
        raise argparse.ArgumentTypeError("expected at least one concurrency, like 1,50,200")
    return tuple(values)


def _front_list(text: str) -> tuple[Front, ...]:
    fronts = [part.strip() for part in text.split(",") if part.strip()]
    if not fronts or not set(fronts) <= set(FRONTS):
        raise argparse.ArgumentTypeError(f"expected some of {','.join(FRONTS)}, got {text!r}")
    return tuple(front for front in FRONTS if front in fronts)


def split_compare(text: str) -> tuple[str | None, str]:
    """`NAME=URL` as (NAME, URL); a bare URL as (None, URL)."""
    name, equals, url = text.partition("=")
    if not equals or "://" in name:
        return None, text
    return name, url


def _compare_target(text: str) -> str:
    name, url = split_compare(text)
    if name is not None and not name.strip():
        raise argparse.ArgumentTypeError(f"expected NAME=URL with a name before the '=': {text!r}")
    url = _http_url(url)
    return url if name is None else f"{name.strip()}={url}"


def _http_url(text: str) -> str:
    parts = urlsplit(text)
    if parts.scheme != "http" or not parts.hostname:
        raise argparse.ArgumentTypeError(f"expected an http:// URL (the load generator speaks no TLS): {text!r}")
    return text.rstrip("/")
