"""Is the load generator itself the bottleneck? Sample its CPU and gevent loop lag.

A timer greenlet asks to sleep for a fixed tick; how late it wakes up is the
loop lag, the delay every token stamp in this process may also have suffered.
"""

from __future__ import annotations

import time

import gevent
import numpy as np
import psutil

TICK_S = 0.05
CPU_EVERY = 20  # ticks (1 s)


class SelfCheck:
    """Collects loop-lag and CPU samples of this process until drained."""

    def __init__(self) -> None:
        self.loop_lag_s: list[float] = []
        self.cpu_percent: list[float] = []
        self._greenlet: gevent.Greenlet | None = None
        self._proc = psutil.Process()
        self._cpu_at_reset = 0.0

    def reset(self) -> None:
        """Start of a run: drop old samples, restart the CPU-seconds count."""
        self.drain()
        self._cpu_at_reset = self._cpu_seconds()

    def _cpu_seconds(self) -> float:
        times = self._proc.cpu_times()
        return times.user + times.system

    def start(self) -> None:
        if self._greenlet is None:
            self._greenlet = gevent.spawn(self._run)

    def _run(self) -> None:
        proc = psutil.Process()
        proc.cpu_percent(None)
        n = 0
        while True:
            before = time.perf_counter()
            gevent.sleep(TICK_S)
            self.loop_lag_s.append(max(0.0, time.perf_counter() - before - TICK_S))
            n += 1
            if n % CPU_EVERY == 0:
                self.cpu_percent.append(proc.cpu_percent(None))

    def drain(self) -> dict[str, list[float]]:
        """Samples since the last drain, and CPU seconds used since reset (for shipping to the master)."""
        out = {"loop_lag_s": self.loop_lag_s, "cpu_percent": self.cpu_percent,
               "cpu_seconds": [self._cpu_seconds() - self._cpu_at_reset]}
        self.loop_lag_s, self.cpu_percent = [], []
        return out

    def snapshot(self) -> dict[str, list[float]]:
        """Samples so far without draining (single-process runs keep them here)."""
        return {"loop_lag_s": list(self.loop_lag_s), "cpu_percent": list(self.cpu_percent),
                "cpu_seconds": [self._cpu_seconds() - self._cpu_at_reset]}


def validity(
    per_worker: dict[str, dict[str, list[float]]],
    schedule_lags: list[float],
    max_cpu: float,
    max_loop_lag_s: float,
    max_schedule_lag_s: float,
) -> dict:
    """Run validity: invalid when any generator process saturated or open-loop arrivals ran late."""
    reasons = []
    workers = {}
    for worker, samples in sorted(per_worker.items()):
        cpu = np.percentile(samples["cpu_percent"], 90) if samples["cpu_percent"] else None
        lag = np.percentile(samples["loop_lag_s"], 99) if samples["loop_lag_s"] else None
        workers[worker] = {"cpu_percent_p90": cpu, "loop_lag_p99_s": lag,
                           "cpu_seconds": max(samples.get("cpu_seconds") or [0.0])}
        if cpu is not None and cpu > max_cpu:
            reasons.append(f"{worker}: CPU p90 {cpu:.0f}% > {max_cpu:.0f}%")
        if lag is not None and lag > max_loop_lag_s:
            reasons.append(f"{worker}: gevent loop lag p99 {lag * 1e3:.1f} ms > {max_loop_lag_s * 1e3:.1f} ms")
    lag99 = float(np.percentile(schedule_lags, 99)) if schedule_lags else None
    if lag99 is not None and lag99 > max_schedule_lag_s:
        reasons.append(
            f"open-loop schedule lag p99 {lag99 * 1e3:.1f} ms > {max_schedule_lag_s * 1e3:.1f} ms "
            "(arrival rate not achieved: add users)"
        )
    return {"valid": not reasons, "reasons": reasons, "workers": workers, "schedule_lag_p99_s": lag99}
