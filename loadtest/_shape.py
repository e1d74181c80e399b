"""The load shape: fixed users (``-u``/``-r``/``-t``) or a step ramp (``--step-users``).

One LoadTestShape drives both, because Locust picks up any shape class in the
locustfile. ``use_common_options`` keeps -u/-r/-t meaningful (and visible in
the web UI). The ramp stops after the first step at which an SLO failed (unless
--step-keep-going): the concurrency KPI is the highest step that passed.
"""

from __future__ import annotations

import logging

from locust import LoadTestShape

from loadtest import _verdict
from loadtest._run import RUN, broadcast_level

log = logging.getLogger("llmslo.loadtest")


class SLOShape(LoadTestShape):
    """Fixed users, or steps of --step-users each held --step-duration seconds."""

    use_common_options = True

    def __init__(self) -> None:
        super().__init__()
        self._last: int | None = None

    def reset_time(self) -> None:
        super().reset_time()
        self._last = None

    def tick(self):
        env = self.runner.environment
        opts = env.parsed_options
        if RUN.settings is None:
            return None
        steps = RUN.settings.steps
        elapsed = self.get_run_time()
        if steps:
            index = int(elapsed // opts.step_duration)
            stop_on_failure = not opts.step_keep_going
            if index >= len(steps) or (index > 0 and stop_on_failure and self._failed(steps[index - 1])):
                return None
            users, rate = steps[index], float(max(steps[index], opts.spawn_rate or 1))
        else:
            if opts.run_time and elapsed >= opts.run_time:
                return None
            users, rate = int(opts.num_users or 1), float(opts.spawn_rate or 1)
        if users != self._last:
            self._last = users
            broadcast_level(env, 0, users)  # ramping: not judged until spawning completes
        return users, rate

    @staticmethod
    def _failed(level: int) -> bool:
        """True when the step just held broke an SLO (judged on the samples received so far)."""
        assert RUN.settings is not None
        rows = [r for r in _verdict.level_table(RUN.records, RUN.settings.slo, RUN.windows) if r["level"] == level]
        failed = bool(rows) and not rows[0]["passes"]
        if failed:
            log.info("step ramp: SLOs broke at %d users; stopping the ramp", level)
        return failed
