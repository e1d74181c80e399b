"""The load shape: fixed users (``-u``/``-r``/``-t``), a step ramp (``--step-users``) or a capacity search.

One LoadTestShape drives both, because Locust picks up any shape class in the
locustfile; ``use_common_options`` keeps -u/-r/-t meaningful (and visible in
the web UI). Each step is a level with a written life (docs/loadtest.md#levels):
ramp (users spawning), steady (until the step's time is up), drain (load held
at the level until every request that started before the drain has ended, at
most --request-timeout + 5 s), then the next step. The ramp stops after a step
whose judgement failed, unless --step-keep-going.

``--capacity-search`` picks each next level from the judgement of the last, as
``vllm bench sweep`` does for its SLA search: double the users from ``-u``
until a level does not PASS (or ``--capacity-max`` passed), then bisect between
the highest passing and the lowest non-passing level. Every probe is a full
level (ramp, steady for --step-duration, drain) judged by the judge's rules;
INCONCLUSIVE counts as not passing, so the answer never rests on too few samples.
"""

from __future__ import annotations

import logging
import time
from typing import Callable

from locust import LoadTestShape

from loadtest import _verdict
from loadtest._run import Run, run_of
from loadtest._verdict import CapacitySearch

log = logging.getLogger("llmslo.loadtest")
DRAIN_MARGIN_S = 5.0


class SLOShape(LoadTestShape):
    """Fixed users, steps of --step-users, or a capacity search; each level held for its
    --step-duration, then drained."""

    use_common_options = True

    def __init__(self) -> None:
        super().__init__()
        self._step: int | None = None
        self._since = 0.0  # perf_counter when the current step opened, or its drain began
        self._users = 0  # users of the current level
        self._search: CapacitySearch | None = None

    def reset_time(self) -> None:
        super().reset_time()
        self._step = None

    def tick(self):
        run = run_of(self.runner.environment)
        if run.settings is None:
            return None
        opts = run.environment.parsed_options
        if opts.capacity_search:
            return self._levels(run, float(opts.spawn_rate or 1), self._search_start, self._search_next)
        if not run.settings.steps:
            return self._fixed(run, int(opts.num_users or 1), float(opts.spawn_rate or 1), opts.run_time)
        return self._levels(run, float(opts.spawn_rate or 1), lambda r: r.settings.steps[0], self._ramp_next)

    def _fixed(self, run: Run, users: int, rate: float, run_time: float | None):
        if self._step is None:
            self._open(run, 0, users)
        if run_time and self.get_run_time() >= run_time:
            return None  # the stop drains in-flight requests and records them (_run.on_test_stopping)
        return users, rate

    def _levels(self, run: Run, spawn_rate: float, first: Callable[[Run], int],
                following: Callable[[Run, int, bool], int | None]):
        """Hold each level for its duration, drain it, then open the level ``following`` names.

        ``following(run, level, drained)`` is asked when the level's time is up (drained False;
        None stops the run at once and the stop drains it) and again once the
        level is drained, its judgement final (None stops the run).
        """
        if self._step is None:
            self._open(run, 0, first(run))
        users, now = self._users, time.perf_counter()
        if run.load.phase != "drain" and now - self._since >= self._duration(run):
            if following(run, users, False) is None:
                return None
            run.set_load(phase="drain")
            self._since = now
        if run.load.phase == "drain":
            limit = run.environment.parsed_options.request_timeout + DRAIN_MARGIN_S
            timed_out = now - self._since > limit
            if not (run.is_drained() or timed_out):
                return users, float(max(users, spawn_rate))
            if timed_out:
                run.notes.append(f"level {users}: drain gave up after {limit:g} s with requests still running")
            nxt = following(run, users, True)
            if nxt is None:
                return None
            self._open(run, self._step + 1, nxt)
        return self._users, float(max(self._users, spawn_rate))

    def _duration(self, run: Run) -> float:
        durations = run.settings.step_durations
        return durations[min(self._step, len(durations) - 1)]

    def _ramp_next(self, run: Run, level: int, drained: bool) -> int | None:
        """The next step of --step-users; none after the last, or after a failed one (unless --step-keep-going)."""
        steps = run.settings.steps
        if self._step >= len(steps) - 1:
            return None
        if drained and not run.environment.parsed_options.step_keep_going and self._status(run, level) == "FAIL":
            log.info("step ramp: SLOs failed at %d users; stopping the ramp", level)
            return None
        return steps[self._step + 1]

    def _search_start(self, run: Run) -> int:
        opts = run.environment.parsed_options
        self._search = CapacitySearch(int(opts.num_users or 1), opts.capacity_max, opts.capacity_probes)
        run.capacity = None
        run.notes.append(f"capacity search from {self._search.start} up to {self._search.maximum} streams, "
                         f"at most {self._search.max_probes} probes of {run.settings.step_durations[0]:g} s")
        return self._search.start

    def _search_next(self, run: Run, level: int, drained: bool) -> int | None:
        """Every probe is drained and judged; the search then names the next one."""
        if not drained:
            return level  # drain first: the probe's judgement needs every request of it
        nxt = self._search.after(level, self._status(run, level))
        log.info("capacity search: %d streams %s; next %s", level, self._search.probes[-1][1], nxt or "done")
        run.capacity = self._search.result()
        return nxt

    def _open(self, run: Run, index: int, users: int) -> None:
        self._step, self._users, self._since = index, users, time.perf_counter()
        run.open_level(users)

    @staticmethod
    def _status(run: Run, level: int) -> str | None:
        """The drained level's judgement (every one of its requests has ended)."""
        records = list(run.records)
        _verdict.assign(records, run.settings.slo)
        rows = [r for r in _verdict.level_table(records, run.settings.slo, run.windows, run.closed_loop) if r["level"] == level]
        return rows[0]["status"] if rows else None
