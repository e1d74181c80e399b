"""Fault injection for alerting drills: OOMs, slowness, errors, replica stalls and kills.

The state lives in the ingress (one process sees every request), which stamps
each request with a :class:`Directive`; the model replica obeys it around
whatever engine runs, so drills work the same against every engine. An injected
OOM is raised as EngineOOMError inside the replica and counted exactly like an
engine's own.
"""

from __future__ import annotations

import random
from dataclasses import dataclass

from pydantic import BaseModel, ConfigDict, Field


class FaultSpec(BaseModel):
    """Body of ``POST /admin/faults``; omitted fields keep their current value."""

    model_config = ConfigDict(extra="forbid")

    oom: int | None = Field(None, ge=0, description="the next N requests fail with an OOM (added to pending)")
    slowdown: float | None = Field(None, ge=1, description="multiply every token's latency")
    error_rate: float | None = Field(None, ge=0, le=1, description="share of requests failing after the first token")
    kill: bool = Field(False, description="terminate one model replica process (os._exit)")
    stall: float | None = Field(None, ge=0, le=30, description="the next request's model replica blocks its "
                                "event loop this many seconds after that request's 5th token (one-shot)")


@dataclass(frozen=True)
class Directive:
    """What one request must suffer; the default is no fault."""

    oom: bool = False
    slowdown: float = 1.0
    error: bool = False
    stall_s: float = 0.0


# the stall drill blocks the replica after this many tokens of its request, so the stall
# falls between tokens the client has already started timing
STALL_AFTER_TOKENS = 5
NO_FAULT = Directive()


class FaultState:
    """Pending faults; :meth:`next_directive` consumes them one request at a time."""

    def __init__(self, seed: int = 0) -> None:
        self._rng = random.Random(seed)
        self.clear()

    def clear(self) -> None:
        self.oom_pending = 0
        self.slowdown = 1.0
        self.error_rate = 0.0
        self.stall_s = 0.0
        self.kills = 0

    def apply(self, spec: FaultSpec) -> None:
        if spec.oom is not None:
            self.oom_pending += spec.oom
        if spec.slowdown is not None:
            self.slowdown = spec.slowdown
        if spec.error_rate is not None:
            self.error_rate = spec.error_rate
        if spec.stall is not None:
            self.stall_s = spec.stall

    def next_directive(self) -> Directive:
        if not (self.oom_pending or self.slowdown != 1.0 or self.error_rate or self.stall_s):
            return NO_FAULT
        oom = self.oom_pending > 0
        self.oom_pending -= int(oom)
        error = self.error_rate > 0 and self._rng.random() < self.error_rate
        stall, self.stall_s = self.stall_s, 0.0
        return Directive(oom=oom, slowdown=self.slowdown, error=error, stall_s=stall)

    def snapshot(self) -> dict[str, float | int]:
        return {
            "oom_pending": self.oom_pending,
            "slowdown": self.slowdown,
            "error_rate": self.error_rate,
            "stall_pending_s": self.stall_s,
            "kills": self.kills,
        }
