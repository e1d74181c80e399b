"""One run's state and the Locust event listeners that move records and judge them.

Data flow: each user process (local runner or worker) appends finished
request records; workers ship them to the master with every stats report
(``report_to_master``) and once more at stop (custom message, sent before
Locust's ``client_stopped`` so the master has every sample when its
``test_stop`` fires). The master alone computes the verdict.
"""

from __future__ import annotations

import logging
import sys
import time
from collections import Counter
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path

import gevent
from locust.runners import MasterRunner, WorkerRunner

from loadtest import _report, _selfcheck, _verdict
from loadtest._live import ClientMetrics, install_web_ui
from loadtest._options import OptionError, Settings, SLOFileError, add_arguments, settings
from loadtest._server_metrics import ServerWatch

log = logging.getLogger("llmslo.loadtest")
MSG_RECORDS = "llmslo_records"
MSG_LEVEL = "llmslo_level"
POLL_S = 2.0
FINAL_WAIT_S = 10.0


@dataclass
class Run:
    """Everything one process knows about the current run."""

    settings: Settings | None = None
    records: list[dict] = field(default_factory=list)
    pending: list[dict] = field(default_factory=list)
    level: int = 0
    level_epoch: int = 0  # +1 at every level change: a request that sees it change did not run at one load
    target_users: int = 0
    windows: dict[int, float] = field(default_factory=dict)
    level_since: float | None = None
    selfcheck: _selfcheck.SelfCheck = field(default_factory=_selfcheck.SelfCheck)
    worker_samples: dict[str, dict[str, list[float]]] = field(default_factory=dict)
    server: ServerWatch | None = None
    metrics: ClientMetrics | None = None
    t_start: float = 0.0
    t_stop: float | None = None
    wall_start: float = 0.0
    exit_code: int | None = None
    last_summary: dict | None = None
    poller: gevent.Greenlet | None = None
    is_worker: bool = False
    worker_id: str = "local"
    senders: set[str] = field(default_factory=set)
    finals: set[str] = field(default_factory=set)
    received: dict[str, int] = field(default_factory=dict)  # worker -> request records received from it
    finisher: gevent.Greenlet | None = None

    # --- samples -----------------------------------------------------------
    def add(self, rec: dict) -> None:
        if self.is_worker:
            self.pending.append(rec)
            return
        self.records.append(rec)
        if self.metrics:
            self.metrics.observe(rec)

    def ship(self, final: bool = False) -> dict:
        """Payload for the master: pending records and self-check samples since last time."""
        out = {"worker": self.worker_id, "records": self.pending, "selfcheck": self.selfcheck.drain(), "final": final}
        self.pending = []
        return out

    def receive(self, payload: dict) -> None:
        self.senders.add(payload["worker"])
        self.received[payload["worker"]] = self.received.get(payload["worker"], 0) + len(payload["records"])
        if payload["final"]:
            self.finals.add(payload["worker"])
        for rec in payload["records"]:
            self.add(rec)
        mine = self.worker_samples.setdefault(payload["worker"], {"loop_lag_s": [], "cpu_percent": [], "cpu_seconds": []})
        for key, values in payload["selfcheck"].items():
            mine[key].extend(values)

    # --- concurrency levels ------------------------------------------------
    def set_level(self, level: int) -> None:
        """Close the window of the current level and open ``level`` (0 = ramping, not judged)."""
        now = time.perf_counter()
        if self.level and self.level_since is not None:
            self.windows[self.level] = self.windows.get(self.level, 0.0) + now - self.level_since
        self.enter_level(level)
        self.level_since = now

    def enter_level(self, level: int) -> None:
        """The level every request started from now on belongs to (workers: as the master says)."""
        if level != self.level:
            self.level, self.level_epoch = level, self.level_epoch + 1

    # --- verdict -----------------------------------------------------------
    def summary(self, environment, final: bool) -> dict:
        """The whole summary.json content from the samples gathered so far."""
        assert self.settings is not None
        slo = self.settings.slo
        opts = environment.parsed_options
        if not final:  # live view: include the level in progress
            self.set_level(self.level)
        end = self.t_stop if self.t_stop is not None else time.perf_counter()
        duration = end - self.t_start
        records = list(self.records)
        levels = _verdict.level_table(records, slo, self.windows)
        facts = self.server.facts() if self.server else _verdict.ServerFacts()
        kpis = _verdict.verdict(records, slo, levels, facts, duration)
        samples = self.worker_samples if self.worker_samples else {self.worker_id: self.selfcheck.snapshot()}
        validity = _selfcheck.validity(
            samples,
            [r["schedule_lag_s"] for r in records if r["schedule_lag_s"] is not None],
            opts.max_worker_cpu,
            opts.max_loop_lag_ms / 1000,
            opts.max_schedule_lag_ms / 1000,
        )
        missing = sorted(self.senders - self.finals) if final else []
        if missing:
            validity["valid"] = False
            lost = ", ".join(f"{w} ({self.received.get(w, 0)} request records received before)" for w in missing)
            validity["reasons"].append(f"final samples of worker(s) {lost} never arrived")
            validity["lost_workers"] = {w: self.received.get(w, 0) for w in missing}
        failed = [r for r in records if not r["ok"]]
        discrepant = [r for r in records if r["ok"] and r["token_discrepancy"]]
        return {
            "verdict": _verdict.overall(kpis),
            "validity": validity,
            "kpis": kpis,
            "judged": _verdict.judged_records(records, slo)[1],
            "levels": levels,
            "metrics": _verdict.metric_table(records) if final else {},  # the live view skips the heavy part
            "requests": {
                "total": len(records),
                "failed": len(failed),
                "usage_vs_delta_discrepancies": len(discrepant),
                "tokens_from_deltas": sum(1 for r in records if r["ok"] and r["tokens_source"] == "deltas"),
            },
            "errors": dict(Counter(r["error"] for r in failed).most_common()),
            "server_metrics": {"url": opts.server_metrics_url or None, "note": facts.note, "scrapes": self.server.scrapes if self.server else 0},
            "duration_s": duration,
            "started_at": datetime.fromtimestamp(self.wall_start, timezone.utc).isoformat(),
            "report_dir": str(self.report_dir(opts)),
            "config": {
                "host": environment.host,
                "runner": type(environment.runner).__name__,
                "workers": sorted(samples),
                "options": {k: v for k, v in vars(opts).items() if _jsonable(v)},
            },
        }

    def report_dir(self, opts) -> Path:
        if opts.report_dir:
            return Path(opts.report_dir)
        stamp = datetime.fromtimestamp(self.wall_start, timezone.utc).strftime("%Y%m%dT%H%M%SZ")
        return Path("reports") / stamp


def _jsonable(value) -> bool:
    return value is None or isinstance(value, (str, int, float, bool, list))


RUN = Run()


# --- listeners ---------------------------------------------------------------
def on_parser(parser, **_kw) -> None:
    add_arguments(parser)


def on_init(environment, **_kw) -> None:
    """Validate options before any load; wire messages, the live view and metrics."""
    runner = environment.runner
    RUN.is_worker = isinstance(runner, WorkerRunner)
    if RUN.is_worker:
        RUN.worker_id = runner.client_id
        runner.register_message(MSG_LEVEL, lambda msg, **kw: _apply_level(msg.data))
        return
    try:
        RUN.settings = settings(environment.parsed_options)
    except (OptionError, SLOFileError) as exc:
        sys.stderr.write(f"llmslo loadtest: error: {exc}\n")
        sys.exit(2)
    RUN.metrics = ClientMetrics(RUN.settings.slo)
    environment.events.spawning_complete.add_listener(lambda user_count, **kw: on_spawning_complete(environment, user_count))
    if isinstance(runner, MasterRunner):
        runner.register_message(MSG_RECORDS, lambda msg, **kw: RUN.receive(msg.data))
    else:
        runner.register_message(MSG_LEVEL, lambda msg, **kw: _apply_level(msg.data))
    install_web_ui(environment, RUN.metrics, lambda: _live_rows(environment))
    if environment.parsed_options.client_metrics_port:
        RUN.metrics.serve(environment.parsed_options.client_metrics_port)


def _apply_level(data: dict) -> None:
    RUN.enter_level(data["level"])
    RUN.target_users = data["users"]


def broadcast_level(environment, level: int, users: int) -> None:
    """Master/local: tell every user process the level (0 while ramping) and the target user count."""
    if not RUN.is_worker:
        RUN.set_level(level)
    environment.runner.send_message(MSG_LEVEL, {"level": level, "users": users})


def on_test_start(environment, **_kw) -> None:
    runner = environment.runner
    if not isinstance(runner, MasterRunner):  # only processes that run users check themselves
        RUN.selfcheck.start()
        RUN.selfcheck.reset()
    if RUN.is_worker:
        RUN.pending = []
        try:  # the master validated these same options already
            RUN.settings = settings(environment.parsed_options)
        except (OptionError, SLOFileError) as exc:
            log.error("llmslo loadtest: error: %s", exc)
        return
    try:  # options may have been edited in the web UI's start form
        RUN.settings = settings(environment.parsed_options)
    except (OptionError, SLOFileError) as exc:
        log.error("llmslo loadtest: error: %s", exc)
        gevent.spawn(runner.stop)
        return
    opts = environment.parsed_options
    RUN.records, RUN.windows, RUN.worker_samples = [], {}, {}
    RUN.senders, RUN.finals, RUN.received = set(), set(), {}
    RUN.level, RUN.level_epoch, RUN.level_since, RUN.t_stop = 0, 0, None, None
    RUN.t_start, RUN.wall_start = time.perf_counter(), time.time()
    RUN.server = ServerWatch(opts.server_metrics_url or None, RUN.settings.slo.service.gpus_per_replica)
    RUN.server.poll()
    RUN.poller = gevent.spawn(_poll, environment)


def _poll(environment) -> None:
    while True:
        gevent.sleep(POLL_S)
        RUN.server.poll()
        RUN.metrics.refresh(environment.runner)


def on_spawning_complete(environment, user_count: int) -> None:
    if RUN.settings is not None:
        broadcast_level(environment, user_count, user_count)


def on_report_to_master(client_id, data: dict, **_kw) -> None:
    data[MSG_RECORDS] = RUN.ship()


def on_worker_report(client_id, data: dict, **_kw) -> None:
    if MSG_RECORDS in data:
        RUN.receive(data[MSG_RECORDS])


def on_test_stop(environment, **_kw) -> None:
    if RUN.is_worker:
        environment.runner.send_message(MSG_RECORDS, RUN.ship(final=True))
        return
    if RUN.settings is None or RUN.t_stop is not None:
        return
    if RUN.poller is not None:
        RUN.poller.kill(block=False)
    RUN.server.poll()
    RUN.set_level(0)
    RUN.t_stop = time.perf_counter()
    if isinstance(environment.runner, MasterRunner):
        # On a headless quit the master fires test_stop before telling workers to
        # stop; their final batches arrive afterwards, so judge once they are in.
        expected = RUN.senders | {c.id for c in environment.runner.clients.all}
        RUN.finisher = gevent.spawn(_finish_when_complete, environment, expected)
    else:
        finish(environment)


def _finish_when_complete(environment, expected: set[str], wait_s: float = FINAL_WAIT_S) -> None:
    deadline = time.perf_counter() + wait_s
    while not expected <= RUN.finals and time.perf_counter() < deadline:
        gevent.sleep(0.05)
    RUN.senders |= expected
    finish(environment)


def finish(environment) -> dict:
    """Compute the final summary, write the report folder, print the table, set the exit code."""
    summary = RUN.summary(environment, final=True)
    RUN.last_summary = summary
    folder = Path(summary["report_dir"])
    _report.write_report(folder, summary, RUN.records)
    print(_report.console_table(summary), flush=True)
    RUN.exit_code = exit_code(summary)
    return summary


def exit_code(summary: dict) -> int:
    """1: an SLO failed; 3: no SLO failed but the generator saturated (run invalid); 0: pass."""
    if summary["verdict"] == "FAIL":
        return 1
    return 0 if summary["validity"]["valid"] else 3


def on_quitting(environment, **_kw) -> None:
    if RUN.is_worker or RUN.settings is None:
        return
    if RUN.finisher is not None:
        RUN.finisher.join(timeout=FINAL_WAIT_S + 30)
    if RUN.exit_code is not None:
        environment.process_exit_code = RUN.exit_code


def _live_rows(environment) -> list[dict]:
    if RUN.settings is None or not RUN.t_start:
        return []
    summary = RUN.last_summary if RUN.t_stop is not None and RUN.last_summary else RUN.summary(environment, final=False)
    rows = _report.kpi_rows(summary["kpis"])
    rows.append({"kpi": "verdict", "value": summary["verdict"], "target": "", "status": "VALID" if summary["validity"]["valid"] else "INVALID",
                 "samples": str(summary["requests"]["total"]), "note": "; ".join(summary["validity"]["reasons"])})
    return rows


def register(events) -> None:
    """Attach every listener to Locust's event hooks."""
    events.init_command_line_parser.add_listener(on_parser)
    events.init.add_listener(on_init)
    events.test_start.add_listener(on_test_start)
    events.report_to_master.add_listener(on_report_to_master)
    events.worker_report.add_listener(on_worker_report)
    events.test_stop.add_listener(on_test_stop)
    events.quitting.add_listener(on_quitting)
