"""The load shape: fixed users (``-u``/``-r``/``-t``) or a step ramp (``--step-users``).

One LoadTestShape drives both, because Locust picks up any shape class in the
locustfile; ``use_common_options`` keeps -u/-r/-t meaningful (and visible in
the web UI). Each step is a level with a written life (docs/loadtest.md#levels):
ramp (users spawning), steady (until the step's time is up), drain (load held
at the level until every request that started before the drain has ended, at
most --request-timeout + 5 s), then the next step. The ramp stops after a step
whose judgement failed, unless --step-keep-going.
"""

from __future__ import annotations

import logging
import time

from locust import LoadTestShape

from loadtest import _verdict
from loadtest._run import Run, run_of

log = logging.getLogger("llmslo.loadtest")
DRAIN_MARGIN_S = 5.0


class SLOShape(LoadTestShape):
    """Fixed users, or steps of --step-users each held for its --step-duration, then drained."""

    use_common_options = True

    def __init__(self) -> None:
        super().__init__()
        self._step: int | None = None
        self._since = 0.0  # perf_counter when the current step opened, or its drain began

    def reset_time(self) -> None:
        super().reset_time()
        self._step = None

    def tick(self):
        run = run_of(self.runner.environment)
        if run.settings is None:
            return None
        opts = run.environment.parsed_options
        if not run.settings.steps:
            return self._fixed(run, int(opts.num_users or 1), float(opts.spawn_rate or 1), opts.run_time)
        return self._ramp(run, float(opts.spawn_rate or 1), not opts.step_keep_going)

    def _fixed(self, run: Run, users: int, rate: float, run_time: float | None):
        if self._step is None:
            self._open(run, 0, users)
        if run_time and self.get_run_time() >= run_time:
            return None  # Locust's --stop-timeout lets in-flight requests end and be recorded
        return users, rate

    def _ramp(self, run: Run, spawn_rate: float, stop_on_failure: bool):
        steps, durations = run.settings.steps, run.settings.step_durations
        if self._step is None:
            self._open(run, 0, steps[0])
        i, now = self._step, time.perf_counter()
        if run.load.phase != "drain" and now - self._since >= durations[i]:
            if i == len(steps) - 1:
                return None  # the last step: the stop's --stop-timeout drains it
            run.set_load(phase="drain")
            self._since = now
        if run.load.phase == "drain":
            limit = run.environment.parsed_options.request_timeout + DRAIN_MARGIN_S
            timed_out = now - self._since > limit
            if not (run.is_drained() or timed_out):
                return steps[i], max(steps[i], spawn_rate)
            if timed_out:
                run.notes.append(f"level {steps[i]}: drain gave up after {limit:g} s with requests still running")
            if stop_on_failure and self._failed(run, steps[i]):
                return None
            self._open(run, i + 1, steps[i + 1])
            i = i + 1
        return steps[i], float(max(steps[i], spawn_rate))

    def _open(self, run: Run, index: int, users: int) -> None:
        self._step, self._since = index, time.perf_counter()
        run.open_level(users)

    @staticmethod
    def _failed(run: Run, level: int) -> bool:
        """True when the drained level's judgement failed (every one of its requests has ended)."""
        records = list(run.records)
        _verdict.assign(records, run.settings.slo)
        rows = [r for r in _verdict.level_table(records, run.settings.slo, run.windows) if r["level"] == level]
        failed = bool(rows) and rows[0]["status"] == "FAIL"
        if failed:
            log.info("step ramp: SLOs failed at %d users; stopping the ramp", level)
        return failed
