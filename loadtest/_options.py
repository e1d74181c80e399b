"""The load test's custom Locust arguments and their validation.

All of them appear in the web UI's start form (Locust custom arguments), so
defaults are typed values, never None: the form re-types what it sends back by
the default's type. 0 / "" mean "take it from slo.yaml" where noted.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from contract.slo import DEFAULT_PATH, SLOConfig, SLOFileError, load_slo
from loadtest._traffic import DIALECTS, Mix, TrafficError


class OptionError(ValueError):
    """An invalid option; the message is one line."""


SECRET_OPTIONS = ("api_key",)  # our own options whose values never reach a report or log


def add_arguments(parser) -> None:
    """Register the custom arguments on Locust's parser (init_command_line_parser)."""
    g = parser  # Locust's parser (not a group) understands include_in_web_ui
    g.add_argument("--slo-file", default=str(DEFAULT_PATH), help="slo.yaml with the KPI targets")
    g.add_argument("--model", default="", help="model id to request (default: service.model of slo.yaml)")
    g.add_argument("--api-key", default="", is_secret=True,  # listed in SECRET_OPTIONS env_var="OPENAI_API_KEY",
                   help="sent as 'Authorization: Bearer KEY' when set (env OPENAI_API_KEY)")
    g.add_argument("--mix", default="text=5,image=3,audio=2", help="traffic class weights CLASS=W,... (text, image, audio)")
    g.add_argument("--thinking-share", type=float, default=0.3, help="share of long requests sent with enable_thinking")
    g.add_argument("--short-share", type=float, default=0.25,
                   help="share of requests asking for a short reply (benchmark.short_reply_max_tokens), judged by the e2e KPI")
    g.add_argument("--input-tokens", type=int, default=0, help="prompt length in tokens (0: benchmark.input_tokens)")
    g.add_argument("--output-tokens", type=int, default=0, help="reply length in tokens (0: benchmark.output_tokens)")
    g.add_argument("--length-spread", type=float, default=0.0, help="lengths drawn uniformly within ±this fraction")
    # one image of <= 896 px (<= 1026 prompt tokens) keeps the seed's 512-token prompt and
    # 256-token reply within its 2048-token context (vLLM --max-model-len 2048, seed 001)
    g.add_argument("--images-max", type=int, default=1, help="images per image request: 1..N")
    g.add_argument("--image-min-px", type=int, default=224, help="smallest image side in pixels")
    g.add_argument("--image-max-px", type=int, default=896, help="largest image side in pixels (up to 1344 and more)")
    g.add_argument("--audio-min-s", type=float, default=1.0, help="shortest audio clip in seconds")
    g.add_argument("--audio-max-s", type=float, default=10.0, help="longest audio clip in seconds")
    g.add_argument("--prompts-file", default="", help="JSONL of real prompts ({'prompt'|'messages', 'max_tokens'?})")
    g.add_argument("--request-timeout", type=float, default=120.0, help="whole-request limit in seconds")
    g.add_argument("--stall-timeout", type=float, default=30.0, help="fail a stream after this many seconds without a byte")
    g.add_argument("--arrival-rate", type=float, default=0.0, help="open loop: requests/s over all users (0: closed loop)")
    g.add_argument("--arrival", choices=["poisson", "constant"], default="poisson", help="open-loop inter-arrival law")
    g.add_argument("--step-users", default="", help="step ramp: comma list of user counts, e.g. 1,2,4,8,16 ('' : fixed -u)")
    g.add_argument("--step-duration", default="30",
                   help="seconds per step of the ramp: one number for every step, or one per step (e.g. 120,30)")
    g.add_argument("--warmup-s", type=float, default=0.0,
                   help="requests started in the first N seconds are not judged for latency (errors still count); 0: none")
    g.add_argument("--step-keep-going", action="store_true", default=False,
                   help="hold every step even after one broke an SLO (default: stop at the first failing step)")
    g.add_argument("--capacity-search", action="store_true", default=False,
                   help="find the highest concurrency meeting every SLO: double users from -u, then bisect; "
                        "each probe a level held --step-duration s and judged")
    g.add_argument("--capacity-max", type=int, default=64, help="capacity search: most users to probe")
    g.add_argument("--capacity-probes", type=int, default=10, help="capacity search: most probes (levels)")
    g.add_argument("--report-dir", default="", help="report folder (default reports/<UTC time>)")
    g.add_argument("--server-metrics-url", default="", help="server's Prometheus endpoint for OOM/crash/GPU/CPU KPIs")
    g.add_argument("--client-metrics-port", type=int, default=0, include_in_web_ui=False,
                   help="serve client-side Prometheus metrics on this port (web UI always has /metrics)")
    g.add_argument("--max-worker-cpu", type=float, default=90.0, help="generator CPU p90 above this marks the run invalid")
    g.add_argument("--max-loop-lag-ms", type=float, default=20.0, help="gevent loop lag p99 above this marks the run invalid")
    g.add_argument("--max-schedule-lag-ms", type=float, default=100.0, help="open-loop lag p99 above this marks the run invalid")
    g.add_argument("--seed", type=int, default=0, help="random seed of the traffic mix (per user: seed + user number)")
    # what the target accepts, and when a broken run ends (issue 12); docs/loadtest.md#options
    g.add_argument("--server-dialect", choices=sorted(DIALECTS), default="openai",
                   help="request fields the server takes: openai (plain fields, any server), vllm (+ min_tokens, "
                        "ignore_eos, chat_template_kwargs), llmslo (+ enable_thinking, return_reasoning)")
    g.add_argument("--max-errors", type=int, default=0,
                   help="end the run with a FAIL verdict after this many failed requests (0: never)")
    g.add_argument("--max-error-rate", type=float, default=0.0,
                   help="end the run with a FAIL verdict when this share of requests failed (0: never) ...")
    g.add_argument("--max-error-rate-min", type=int, default=20,
                   help="... once at least this many requests ended")
    g.add_argument("--max-stamp-delay-ms", type=float, default=5.0,
                   help="a read pass in which some read came this long after its bytes (socket arrival -> read) "
                        "is late: tokens it read together with the next one count against --max-coalesced-share")
    g.add_argument("--max-coalesced-share", type=float, default=0.01,
                   help="share of tokens, or of first tokens, read late together with the next one (each then "
                        "carries the next one's arrival) above this marks the run invalid")


@dataclass(frozen=True)
class Settings:
    """Validated settings derived from options and slo.yaml."""

    slo: SLOConfig
    mix: Mix
    steps: tuple[int, ...]
    step_durations: tuple[float, ...]


def settings(opts) -> Settings:
    """Load slo.yaml and validate every option; raise OptionError/SLOFileError with one line."""
    slo = load_slo(opts.slo_file)
    bench = slo.benchmark
    opts.input_tokens = opts.input_tokens or bench.input_tokens
    opts.output_tokens = opts.output_tokens or bench.output_tokens
    try:
        mix = Mix.from_options(opts, bench.short_reply_max_tokens, slo.service.model)
    except TrafficError as exc:
        raise OptionError(str(exc)) from None
    for name in ("request_timeout", "stall_timeout"):
        if getattr(opts, name) <= 0:
            raise OptionError(f"--{name.replace('_', '-')} must be > 0")
    if opts.warmup_s < 0:
        raise OptionError("--warmup-s must be >= 0")
    if opts.arrival_rate < 0:
        raise OptionError("--arrival-rate must be >= 0")
    if opts.max_errors < 0 or opts.max_error_rate_min < 1 or not 0 <= opts.max_error_rate <= 1:
        raise OptionError("--max-errors must be >= 0, --max-error-rate within [0, 1], --max-error-rate-min >= 1")
    try:
        steps = tuple(int(s) for s in str(opts.step_users).split(",") if s.strip())
    except ValueError:
        raise OptionError(f"--step-users: expected comma-separated integers, got {opts.step_users!r}") from None
    if any(s < 1 for s in steps) or list(steps) != sorted(set(steps)):
        raise OptionError("--step-users: user counts must be >= 1 and strictly increasing")
    durations = _durations(str(opts.step_duration), len(steps))
    _check_capacity_search(opts, steps, durations)
    if opts.server_metrics_url and not str(opts.server_metrics_url).startswith(("http://", "https://")):
        raise OptionError("--server-metrics-url must be an http(s) URL")
    return Settings(slo, mix, steps, durations)


def _check_capacity_search(opts, steps: tuple[int, ...], durations: tuple[float, ...]) -> None:
    """--capacity-search runs closed loop with one probe duration; it picks the levels itself."""
    if not opts.capacity_search:
        return
    if steps:
        raise OptionError("--capacity-search picks the levels itself: leave --step-users empty")
    if opts.arrival_rate:
        raise OptionError("--capacity-search searches concurrency (closed loop): leave --arrival-rate at 0")
    if len(set(durations)) != 1:
        raise OptionError("--capacity-search: give --step-duration one value (every probe is held as long)")
    if opts.capacity_max < max(1, int(opts.num_users or 1)) or opts.capacity_probes < 2:
        raise OptionError("--capacity-max must be >= -u and --capacity-probes >= 2")


def _durations(text: str, steps: int) -> tuple[float, ...]:
    """--step-duration: one value for every step, or exactly one per step; each > 0."""
    try:
        values = tuple(float(v) for v in text.split(",") if v.strip())
    except ValueError:
        raise OptionError(f"--step-duration: expected seconds or a comma list of seconds, got {text!r}") from None
    if not values or any(v <= 0 for v in values):
        raise OptionError("--step-duration must be > 0")
    if len(values) == 1:
        return values * max(1, steps)
    if len(values) != steps:
        raise OptionError(f"--step-duration: {len(values)} durations for {steps} steps of --step-users")
    return values


LOCUST_SECRET_OPTIONS = ("web_login", "web_auth")  # Locust's own options that may carry credentials


@dataclass(frozen=True)
class Secrets:
    """Values that must never reach a report, a log line or the console (options marked is_secret)."""

    names: frozenset[str] = frozenset()
    values: tuple[str, ...] = field(default=())

    @classmethod
    def of(cls, opts) -> "Secrets":
        names = frozenset(SECRET_OPTIONS) | frozenset(LOCUST_SECRET_OPTIONS)
        values = tuple(str(v) for n in names if isinstance(v := getattr(opts, n, None), str) and len(v) >= 4)
        return cls(names, values)

    def redact_options(self, options: dict[str, Any]) -> dict[str, Any]:
        """The options for the report: JSON-able values, secret ones as '***' when set."""
        out = {}
        for key, value in options.items():
            if value is None or isinstance(value, (str, int, float, bool, list)):
                out[key] = "***" if key in self.names and value else value
        return out

    def scrub(self, text: str) -> str:
        """``text`` with every secret value replaced (belt and braces for free-form text)."""
        for value in self.values:
            text = text.replace(value, "***")
        return text


__all__ = ["OptionError", "SLOFileError", "Secrets", "Settings", "add_arguments", "settings"]
