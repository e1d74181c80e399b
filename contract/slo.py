"""Load and validate ``slo.yaml``, the one source of truth for targets.

Everything that judges or alerts (the load test verdict, the Prometheus rule
generator, the dashboard generator) reads targets through :func:`load_slo`, so a
typo in the file fails once, early, with one clear line instead of three
different ways downstream.
"""

from __future__ import annotations

import operator
from pathlib import Path
from typing import Callable, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError

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


class Benchmark(_Strict):
    input_tokens: int = Field(gt=0)
    output_tokens: int = Field(gt=0)
    concurrency: list[int]
    short_reply_max_tokens: int = Field(gt=0)


class KPI(_Strict):
    title: str
    metric: str
    stat: str
    op: Literal["<", "<=", ">", ">="]
    target: float
    unit: str
    applies_to: str | None = None
    seed: str | None = None

    def passes(self, value: float) -> bool:
        """True when the measured value meets the target."""
        return _OPS[self.op](value, self.target)


class ErrorBudgetSLO(_Strict):
    title: str
    objective: float = Field(gt=0, lt=1)
    threshold_s: float | None = None
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

    @property
    def concurrency_target(self) -> int:
        return int(self.kpis["concurrency"].target)


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
