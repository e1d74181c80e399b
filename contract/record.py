"""The one per-request record: filled by the load test's stream reader, read by its verdict and report.

Workers send it to the master as a plain dict (Locust's message transport);
:meth:`RequestRecord.from_dict` rebuilds it and refuses a dict with a missing
or unknown field, so renaming a field fails loudly instead of silently
emptying a KPI. Every field is defined in docs/glossary.md.
"""

from __future__ import annotations

from dataclasses import dataclass, field, fields
from typing import Literal

Phase = Literal["ramp", "steady", "drain"]
"""Where in its level's life a request started (docs/loadtest.md#levels):
ramp: users being spawned up to the level; steady: the level held;
drain: the level's time was up and the generator was waiting for its
requests to finish (load still at the level, but the request may run into
the next level)."""

Judgement = Literal["judged", "headroom", "drain", "warmup", ""]
"""What the verdict did with a request's latency (its errors always count):
judged at its level; headroom (level above the concurrency target);
drain (started after its level's time was up); warmup (--warmup-s)."""


@dataclass
class RequestRecord:
    """Everything measured about one request (times in seconds, monotonic clock)."""

    id: str
    cls: str
    thinking: bool
    short: bool
    max_tokens: int
    worker: str = ""
    start_wall: float = 0.0
    start_mono: float = 0.0
    # where the load was when the request started (set by the load test's run state)
    level: int = 0
    epoch: int = 0
    phase: Phase = "ramp"
    warmup: bool = False
    level_end_s: float | None = None  # seconds after its start at which its level ended, if it did mid-request
    schedule_lag_s: float | None = None
    # outcome
    ok: bool = False
    error: str | None = None
    status: int = 0
    ttft_s: float | None = None
    ttfo_s: float | None = None
    e2e_s: float | None = None
    duration_s: float | None = None  # send -> the request ended, success or failure
    tpot_s: float | None = None
    decode_tokens_per_s: float | None = None
    output_tokens_per_s: float | None = None
    itl_s: list[float] = field(default_factory=list)
    # token events the load test read late together with the next one (each then carries the next one's
    # arrival: loadtest/_reads.py); the self-check counts them against --max-coalesced-share
    late_shared_reads: int = 0
    first_token_late_shared: bool = False
    output_tokens: int | None = None
    reasoning_tokens: int | None = None
    prompt_tokens: int | None = None
    tokens_source: str = "usage"
    content_deltas: int = 0
    reasoning_deltas: int = 0
    token_discrepancy: int | None = None
    connection_retries: int = 0  # resent once: the server closed a kept-alive connection before answering
    request_bytes: int = 0
    response_bytes: int = 0
    judgement: Judgement = ""  # set by the verdict on the master
    server_timing: dict[str, float] | None = None  # usage.llmslo_timing of an llmslo server (contract/timing.py)

    def as_dict(self) -> dict:
        """The fields as a plain dict, its containers copied (what ``asdict`` gives, without its deep copy
        of every float: 62 µs a record with 64 gaps, paid per request by each worker)."""
        data = {f.name: getattr(self, f.name) for f in _FIELDS}
        data["itl_s"] = list(self.itl_s)
        if self.server_timing is not None:
            data["server_timing"] = dict(self.server_timing)
        return data

    @classmethod
    def from_dict(cls, data: dict) -> "RequestRecord":
        """Rebuild a record sent by a worker; a missing or unknown field is an error."""
        unknown = sorted(set(data) - {f.name for f in _FIELDS})
        if unknown:
            raise ValueError(f"request record has unknown field(s) {', '.join(unknown)}")
        return cls(**data)

    @property
    def busy_s(self) -> float:
        """Seconds the request was in flight within its own level (clipped at the level's end)."""
        e2e = self.duration_s or 0.0
        return e2e if self.level_end_s is None else min(e2e, self.level_end_s)

    def tokens_within_level(self) -> float:
        """Output tokens that arrived before its level ended (token events counted, scaled to usage)."""
        if not self.ok or not self.output_tokens:
            return 0.0
        if self.level_end_s is None or self.ttft_s is None:
            return float(self.output_tokens)
        t, inside = self.ttft_s, 0
        for gap in [0.0, *self.itl_s]:
            t += gap
            inside += t <= self.level_end_s
        events = 1 + len(self.itl_s)
        return self.output_tokens * inside / events


_FIELDS = fields(RequestRecord)
