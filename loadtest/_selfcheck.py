"""Is the load generator itself the bottleneck? Its stamping delay, CPU and gevent loop lag.

The stamping delay is what matters: for every socket read of a stream, the
time from the kernel's receive timestamp of the bytes to the load test's
stamp of them (loadtest/_sse.py). It is measured on every read, so a burst of
hundreds of simultaneous chunks is seen exactly where it hurts; a timer
cannot see it (it samples time, not chunks: a 50 ms tick mostly lands between
bursts). Kept as a histogram of 0.1 ms bins so a long run costs constant
memory; its p99 is reported as the upper edge of its bin (a bound).

A timer greenlet also asks to sleep for a fixed tick; how late it wakes up is
the loop lag (kept as a second signal, and where the kernel gives no receive
timestamps, e.g. TLS).
"""

from __future__ import annotations

import itertools
import math
import socket
import time
from collections import Counter

import gevent
import numpy as np
import psutil

from loadtest._reads import kernel_timestamps_on

TICK_S = 0.05
CPU_EVERY = 20  # ticks (1 s)
DELAY_BIN_S = 1e-4  # stamping-delay histogram resolution
DELAY_BINS = 10_000  # the last bin holds every delay >= 1 s


class SelfCheck:
    """Collects loop-lag and CPU samples of this process until drained."""

    def __init__(self) -> None:
        self.loop_lag_s: list[float] = []
        self.cpu_percent: list[float] = []
        self.stamp_delay_bins: Counter[int] = Counter()
        self._unbinned_delays: list[float] = []
        self._greenlet: gevent.Greenlet | None = None
        self._proc = psutil.Process()
        self._cpu_at_reset = 0.0
        self._timestamps: socket.socket | None = None

    def reset(self) -> None:
        """Start of a run: drop old samples, restart the CPU-seconds count."""
        self.drain()
        self._cpu_at_reset = self._cpu_seconds()

    def observe_stamp_delays(self, delays_s: list[float]) -> None:
        """Add one stream's socket-arrival-to-stamp delays (called after the stream, off the timed path).

        Kept as they are until the next tick bins them all at once (numpy): per read this is one list append.
        """
        self._unbinned_delays.extend(delays_s)

    def _bin_delays(self) -> None:
        if not self._unbinned_delays:
            return
        bins = np.minimum((np.asarray(self._unbinned_delays) / DELAY_BIN_S).astype(np.int64), DELAY_BINS)
        self._unbinned_delays = []
        for b, n in zip(*np.unique(np.maximum(bins, 0), return_counts=True)):
            self.stamp_delay_bins[int(b)] += int(n)

    def _cpu_seconds(self) -> float:
        times = self._proc.cpu_times()
        return times.user + times.system

    def start(self) -> None:
        if self._timestamps is None:
            try:
                self._timestamps = kernel_timestamps_on()
            except OSError:  # no SO_TIMESTAMPNS here: no stamping delay, the loop lag still speaks
                pass
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
                self._bin_delays()

    def drain(self) -> dict[str, list[float]]:
        """Samples since the last drain, and CPU seconds used since reset (for shipping to the master)."""
        out = self.snapshot()
        self.loop_lag_s, self.cpu_percent, self.stamp_delay_bins = [], [], Counter()
        return out

    def snapshot(self) -> dict[str, list[float]]:
        """Samples so far without draining (single-process runs keep them here)."""
        self._bin_delays()
        return {"loop_lag_s": list(self.loop_lag_s), "cpu_percent": list(self.cpu_percent),
                "cpu_seconds": [self._cpu_seconds() - self._cpu_at_reset],
                "stamp_delay_bins": [[b, n] for b, n in self.stamp_delay_bins.items()]}


def stamp_delay_p99(bins: list[list[int]]) -> float | None:
    """Upper bound of the stamping delay's p99 from [bin, count] pairs (several batches may repeat a bin)."""
    counts: Counter[int] = Counter()
    for b, n in bins:
        counts[b] += n
    total = sum(counts.values())
    if not total:
        return None
    order = sorted(counts)
    cumulative = itertools.accumulate(counts[b] for b in order)
    return next((b + 1) * DELAY_BIN_S for b, seen in zip(order, cumulative) if seen >= 0.99 * total)


SHARES = ("coalesced_share", "coalesced_first_share", "late_shared_share", "late_shared_first_share")


def coalesced_gaps(records) -> dict[str, dict[str, float]]:
    """Per user process, how many tokens shared a socket read with the next one.

    ``coalesced_share``: token gaps of exactly 0 s (two tokens from one read, for any reason), and
    ``coalesced_first_share`` the same among first gaps. ``late_shared_share`` /
    ``late_shared_first_share``: tokens (first tokens) that shared a *late* read with the next one
    (loadtest/_reads.py: a pass in which some read came more than --max-stamp-delay-ms after its
    bytes), so they carry the next one's arrival: the reader's error, where a 0 s gap from a prompt
    read is the server's (it wrote both at once). First tokens are counted apart because in a burst
    they are the likeliest to share a read, and one per request weighs on TTFT's p99.
    """
    out: dict[str, list[int]] = {}
    for r in records:
        counts = out.setdefault(r.worker, [0, 0, 0, 0, 0, 0])
        counts[0] += sum(1 for gap in r.itl_s if gap == 0.0)
        counts[1] += len(r.itl_s)
        counts[2] += r.late_shared_reads
        if r.itl_s:
            counts[3] += r.itl_s[0] == 0.0
            counts[4] += r.first_token_late_shared
            counts[5] += 1
    share = lambda n, d: n / d if d else 0.0  # noqa: E731
    return {worker: dict(zip(SHARES, (share(zero, gaps), share(first, firsts), share(late, gaps),
                                      share(late_first, firsts))))
            for worker, (zero, gaps, late, first, late_first, firsts) in out.items()}


# A generator process below this CPU p90 (percent of one core) had time to spare: when it still read
# late, something held it up rather than its own load (README troubleshooting says how to tell which).
SPARE_CPU_P90 = 50.0
# What a generator process may use at p90 and still read bursts in time: 1024 lockstep streams spread
# over 2 and 4 processes passed the self-check at 73 % and 44 % CPU, 2 processes at 78 % did not
# (docs/benchmarks.md). A saturated run's hint sizes the spread to this.
SPREAD_CPU_P90 = 60.0


def _held_up(cpu: float | None) -> str:
    """The hint added to a late-read or loop-lag reason of a process that was not busy."""
    if cpu is None or cpu >= SPARE_CPU_P90:
        return ""
    return (f" (not its own load: CPU p90 {cpu:.0f}%; held up by the machine (other processes, the VM host) "
            "or by one long step of its own: README, troubleshooting)")


def _spread(processes: int, cpu: float) -> str:
    """The hint added to a CPU reason: how many generator processes the same load needs at least.

    A lower bound: a saturated process's CPU p90 says only that it wanted more than it had.
    """
    need = max(processes + 1, math.ceil(processes * cpu / SPREAD_CPU_P90))
    return (f" (the load generator was the bottleneck: spread the users over at least {need} processes, "
            "Locust's --processes N or workers on other machines)")


def validity(
    per_worker: dict[str, dict[str, list[float]]],
    schedule_lags: list[float],
    max_cpu: float,
    max_loop_lag_s: float,
    max_schedule_lag_s: float,
    coalesced: dict[str, dict[str, float]] | None = None,
    max_coalesced_share: float = 0.01,
) -> dict:
    """Run validity: invalid when any generator process saturated, read tokens too late to keep their own
    arrival times, or open-loop arrivals ran late.

    Stamps are the kernel's arrival times, so a late read alone costs nothing; it costs when the reader
    was so late that two tokens came in one read (the older one then carries the newer one's arrival).
    ``coalesced`` maps each process to its shares (:func:`coalesced_gaps`): a process is flagged when
    the share of tokens, or of first tokens, that shared a late read exceeds ``max_coalesced_share``.
    A server that writes several tokens at once makes 0 s gaps too, in prompt reads: not counted.
    """
    reasons = []
    workers = {}
    for worker, samples in sorted(per_worker.items()):
        cpu = np.percentile(samples["cpu_percent"], 90) if samples["cpu_percent"] else None
        lag = np.percentile(samples["loop_lag_s"], 99) if samples["loop_lag_s"] else None
        delay = stamp_delay_p99(samples.get("stamp_delay_bins") or [])
        workers[worker] = {"cpu_percent_p90": cpu, "loop_lag_p99_s": lag, "stamp_delay_p99_s": delay,
                           "stamp_delay_reads": sum(n for _, n in samples.get("stamp_delay_bins") or []),
                           "cpu_seconds": max(samples.get("cpu_seconds") or [0.0])}
        shares = (coalesced or {}).get(worker) or dict.fromkeys(SHARES, 0.0)
        workers[worker].update(shares)
        late, first = shares["late_shared_share"], shares["late_shared_first_share"]
        held_up = _held_up(cpu)
        if max(late, first) > max_coalesced_share:
            reasons.append(f"{worker}: {late:.1%} of tokens ({first:.1%} of first tokens) were read late together "
                           f"with the next one > {max_coalesced_share:.0%} (a read pass came more than "
                           f"--max-stamp-delay-ms after its bytes: those tokens carry the next one's arrival){held_up}")
        if cpu is not None and cpu > max_cpu:
            reasons.append(f"{worker}: CPU p90 {cpu:.0f}% > {max_cpu:.0f}%{_spread(len(per_worker), cpu)}")
        if lag is not None and lag > max_loop_lag_s:
            reasons.append(f"{worker}: gevent loop lag p99 {lag * 1e3:.1f} ms > {max_loop_lag_s * 1e3:.1f} ms{held_up}")
    lag99 = float(np.percentile(schedule_lags, 99)) if schedule_lags else None
    if lag99 is not None and lag99 > max_schedule_lag_s:
        reasons.append(
            f"open-loop schedule lag p99 {lag99 * 1e3:.1f} ms > {max_schedule_lag_s * 1e3:.1f} ms "
            "(arrival rate not achieved: add users)"
        )
    return {"valid": not reasons, "reasons": reasons, "workers": workers, "schedule_lag_p99_s": lag99}
