"""Load and validate ``slo.yaml``, the one source of truth for targets.

Everything that judges or alerts (the load test verdict, the Prometheus rule
generator, the dashboard generator) reads targets through :func:`load_slo`, so a
typo in the file fails once, early, with one clear line instead of three
different ways downstream.
"""

from __future__ import annotations

import operator
from pathlib import Path
from typing import Callable, Literal, get_args

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

DEFAULT_PATH = Path(__file__).resolve().parent.parent / "slo.yaml"  # the repository root

_OPS: dict[str, Callable[[float, float], bool]] = {
    "<": operator.lt,
    "<=": operator.le,
    ">": operator.gt,
    ">=": operator.ge,
}


class SLOFileError(ValueError):
    """slo.yaml is missing or invalid; the message is one line a user can act on."""


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class Service(_Strict):
    model: str
    gpus_per_replica: int = Field(ge=0)


TrafficClass = Literal["text", "image", "audio"]
"""The load test's traffic classes (loadtest/_traffic.py sends them); per-class targets are keyed by them."""
TRAFFIC_CLASSES: tuple[str, ...] = get_args(TrafficClass)


class Benchmark(_Strict):
    input_tokens: int = Field(gt=0)
    output_tokens: int = Field(gt=0)
    concurrency: list[int]
    short_reply_max_tokens: int = Field(gt=0)
    # Seconds of budget per prompt token above input_tokens, for KPIs with grows_with_prompt
    # (0: budgets do not grow). slo.yaml derives it from the seed's own prefill rate.
    prefill_s_per_token: float = Field(0.0, ge=0)


class Streaming(_Strict):
    """Stream smoothness: a gap between two chunks longer than ``stall_gap_s`` is a stall."""

    stall_gap_s: float = Field(0.5, gt=0)


class KPI(_Strict):
    title: str
    metric: str
    stat: str
    op: Literal["<", "<=", ">", ">="]
    target: float
    unit: str
    applies_to: str | None = None
    seed: str | None = None
    # per-request budgets (client KPIs): a target per traffic class, and one that grows
    # with the prompt by benchmark.prefill_s_per_token per token above benchmark.input_tokens
    classes: dict[TrafficClass, float] = Field(default_factory=dict)
    grows_with_prompt: bool = False
    # False: measured, judged and shown, but left out of the verdict (no seed number for it)
    enforced: bool = True

    @model_validator(mode="after")
    def _budget_is_a_latency(self) -> "KPI":
        """A budget that grows with the prompt is seconds that must stay below it."""
        if self.grows_with_prompt and (self.unit != "s" or self.op not in ("<", "<=")):
            raise ValueError("grows_with_prompt needs a latency KPI (unit s, op < or <=)")
        return self

    def passes(self, value: float, target: float | None = None) -> bool:
        """True when the measured value meets the target (or a request's own ``target``)."""
        return _OPS[self.op](value, self.target if target is None else target)


class ErrorBudgetSLO(_Strict):
    title: str
    objective: float = Field(gt=0, lt=1)
    # a latency SLO: a request is good when its latency stays below either one fixed threshold
    # or, with budget_kpi, that KPI's per-request budget (class target + prompt allowance)
    threshold_s: float | None = None
    budget_kpi: str | None = None
    period: str = "30d"   # error-budget window of the "budget left" figure

    @property
    def error_budget(self) -> float:
        return 1.0 - self.objective


class BurnWindow(_Strict):
    long: str
    short: str
    factor: float = Field(gt=0)
    severity: Literal["page", "ticket"]


class SLOConfig(_Strict):
    service: Service
    benchmark: Benchmark
    kpis: dict[str, KPI]
    slos: dict[str, ErrorBudgetSLO]
    burn_rate_windows: list[BurnWindow]
    streaming: Streaming = Field(default_factory=Streaming)

    @model_validator(mode="after")
    def _budget_kpis_exist(self) -> "SLOConfig":
        for key, slo in self.slos.items():
            kpi = self.kpis.get(slo.budget_kpi) if slo.budget_kpi else None
            if slo.budget_kpi and (kpi is None or kpi.unit != "s"):
                raise ValueError(f"slos.{key}.budget_kpi must name a latency KPI (unit s)")
        return self

    def request_budget_s(self, slo_key: str, classes: tuple[str, ...], prompt_tokens: int | None) -> float | None:
        """Latency SLO ``slo_key``'s budget for one request; the largest over ``classes`` (a request may
        carry an image and audio). None for an SLO with no latency threshold."""
        slo = self.slos[slo_key]
        if slo.budget_kpi is None:
            return slo.threshold_s
        return max(self.target_for(slo.budget_kpi, cls, prompt_tokens) for cls in classes)

    @property
    def concurrency_target(self) -> int:
        return int(self.kpis["concurrency"].target)

    def target_for(self, name: str, cls: str, prompt_tokens: int | None) -> float:
        """KPI ``name``'s budget for one request: its class's target plus its prompt allowance.

        A request without a reported prompt length gets no allowance (the strict reading).
        """
        kpi = self.kpis[name]
        target = kpi.classes.get(cls, kpi.target)  # type: ignore[call-overload]
        if kpi.grows_with_prompt and prompt_tokens:
            target += self.benchmark.prefill_s_per_token * max(0, prompt_tokens - self.benchmark.input_tokens)
        return target


REQUIRED_KPIS = (
    "ttft_p95",
    "e2e_short_p95",
    "concurrency",
    "decode_tokens_per_s_p10",
    "output_tokens_per_s_mean",
    "error_rate",
    "oom_per_hour",
    "crashes_per_day",
    "gpu_memory_gb",
    "cpu_percent",
)


def load_slo(path: str | Path | None = None) -> SLOConfig:
    """Parse and validate slo.yaml; raise SLOFileError with a one-line message."""
    path = Path(path) if path else DEFAULT_PATH
    try:
        raw = yaml.safe_load(path.read_text(encoding="utf-8"))
    except OSError as exc:
        raise SLOFileError(f"cannot read {path}: {exc.strerror}") from exc
    except yaml.YAMLError as exc:
        raise SLOFileError(f"{path} is not valid YAML: {exc}".replace("\n", " ")) from exc
    try:
        cfg = SLOConfig.model_validate(raw)
    except ValidationError as exc:
        first = exc.errors()[0]
        where = ".".join(str(p) for p in first["loc"])
        raise SLOFileError(f"{path}: {where}: {first['msg']}") from exc
    missing = [k for k in REQUIRED_KPIS if k not in cfg.kpis]
    if missing:
        raise SLOFileError(f"{path}: kpis is missing {', '.join(missing)}")
    return cfg
