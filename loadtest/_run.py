"""One run's state (on Locust's ``Environment``) and the event listeners that move and judge records.

Data flow: each user process (local runner or worker) stamps every request
with the load it started under (level, epoch, phase), records it when it ends
however it ends, and ships records to the master with every stats report and
once more at stop (sent before Locust's ``client_stopped``, so the master has
every record when its ``test_stop`` fires). The master alone decides levels
and computes the verdict.

Levels (docs/loadtest.md#levels): the load shape opens a level (``ramp``),
spawning completes (``steady``), the level's time runs out (``drain``: load
stays at the level, new requests are not judged at it, and the shape waits
until every request that started before the drain has finished), then the
next level opens. Each user process reports when its pre-drain requests are
done; when the run stops, every user process lets its in-flight requests end
and records them before Locust stops the users (``on_test_stopping``).
"""

from __future__ import annotations

import logging
import sys
import time
from collections import Counter
from dataclasses import asdict, dataclass, field
from datetime import datetime, timezone
from pathlib import Path

import gevent
from locust.env import Environment
from locust.rpc import Message
from locust.runners import MasterRunner, WorkerRunner

from contract.record import Phase, RequestRecord
from loadtest import _hops, _report, _selfcheck, _verdict
from loadtest._backlog import Backlog
from loadtest._gc import fewer_gc_pauses
from loadtest._reads import ReadLoop, read_loop
from loadtest._live import ClientMetrics, install_web_ui
from loadtest._options import OptionError, Secrets, Settings, SLOFileError, add_arguments, settings
from loadtest._server_metrics import ServerWatch

log = logging.getLogger("llmslo.loadtest")
MSG_RECORDS = "llmslo_records"
MSG_LEVEL = "llmslo_level"
MSG_DRAINED = "llmslo_drained"
POLL_S = 2.0
FINAL_WAIT_S = 10.0


@dataclass
class LoadState:
    """The load right now, as the master decided it (sent to every worker on each change)."""

    level: int = 0
    epoch: int = 0  # +1 each time a level opens
    phase: Phase = "ramp"
    warmup: bool = False
    send_key: bool = True  # the API key goes only to the host the run was configured with


@dataclass
class Run:
    """Everything one process knows about the current run; lives at ``environment.llmslo``."""

    environment: Environment
    settings: Settings | None = None
    secrets: Secrets = field(default_factory=Secrets)
    configured_host: str | None = None
    load: LoadState = field(default_factory=LoadState)
    epoch_began: dict[int, float] = field(default_factory=dict)  # epoch -> perf_counter in this process
    open_requests: Counter = field(default_factory=Counter)  # epoch -> pre-drain requests in flight here
    in_flight: int = 0  # requests in flight in this process, any phase
    stopping: bool = False  # the run is stopping: users start no new request
    stopped_at: float | None = None  # perf_counter here when the stop began: the last level ended then
    locust_stop_timeout: float | None = None  # Locust's own, while a lower level lends it another
    records: list[RequestRecord] = field(default_factory=list)
    pending: list[dict] = field(default_factory=list)
    windows: dict[int, float] = field(default_factory=dict)
    level_since: float | None = None
    drained: set[str] = field(default_factory=set)  # workers whose pre-drain requests of this epoch ended
    selfcheck: _selfcheck.SelfCheck = field(default_factory=_selfcheck.SelfCheck)
    reads: ReadLoop | None = None  # reads every stream socket of this process (user processes, from test start)
    backlog: Backlog | None = None  # parses and records read requests when idle (user processes, from test start)
    worker_samples: dict[str, dict[str, list[float]]] = field(default_factory=dict)
    server: ServerWatch | None = None
    metrics: ClientMetrics | None = None
    t_start: float = 0.0
    t_stop: float | None = None
    wall_start: float = 0.0
    exit_code: int | None = None
    last_summary: dict | None = None
    poller: gevent.Greenlet | None = None
    worker_id: str = "local"
    senders: set[str] = field(default_factory=set)
    finals: set[str] = field(default_factory=set)
    received: dict[str, int] = field(default_factory=dict)  # worker -> request records received from it
    finisher: gevent.Greenlet | None = None
    notes: list[str] = field(default_factory=list)
    capacity: dict | None = None  # the capacity search's answer (loadtest/_shape.py), when one ran
    failed: int = 0  # failed requests recorded in this run (for --max-errors / --max-error-rate)
    stopped_early: str | None = None  # why the run was ended before its time (the verdict is then FAIL)

    @property
    def is_worker(self) -> bool:
        return isinstance(self.environment.runner, WorkerRunner)

    @property
    def closed_loop(self) -> bool:
        """Users send back to back (no ``--arrival-rate``): a level's users are its intended load."""
        return not self.environment.parsed_options.arrival_rate

    @property
    def is_master(self) -> bool:
        return isinstance(self.environment.runner, MasterRunner)

    # --- requests (user processes) ------------------------------------------------
    def begin(self, rec: RequestRecord) -> None:
        """Stamp the load the request starts under; count it while it may still be judged."""
        rec.level, rec.epoch, rec.phase, rec.warmup = self.load.level, self.load.epoch, self.load.phase, self.load.warmup
        rec.worker = self.worker_id
        if rec.phase != "drain":
            self.open_requests[rec.epoch] += 1
        self.in_flight += 1

    def end(self, rec: RequestRecord) -> None:
        """The request ended (any way): note where its level ended, record it, report a finished drain.
        The stop ends the last level: nothing new is sent while the final drain waits."""
        if rec.epoch != self.load.epoch and rec.epoch + 1 in self.epoch_began:
            rec.level_end_s = max(0.0, self.epoch_began[rec.epoch + 1] - rec.start_mono)
        elif self.stopped_at is not None and rec.start_mono < self.stopped_at:
            rec.level_end_s = self.stopped_at - rec.start_mono
        if rec.phase != "drain":
            self.open_requests[rec.epoch] -= 1
        self.in_flight -= 1
        self.add(rec)
        self._report_drained()

    def add(self, rec: RequestRecord) -> None:
        if self.is_worker:
            self.pending.append(rec.as_dict())
            return
        self.records.append(rec)
        if self.metrics:
            self.metrics.observe(rec)
        if not rec.ok:
            self.failed += 1
            self._stop_if_broken()

    def _stop_if_broken(self) -> None:
        """--max-errors / --max-error-rate: end a broken run now instead of hammering the server to the end."""
        opts = self.environment.parsed_options
        total = len(self.records)
        if opts.max_errors and self.failed >= opts.max_errors:
            limit = f"--max-errors {opts.max_errors}"
        elif opts.max_error_rate and total >= opts.max_error_rate_min and self.failed / total >= opts.max_error_rate:
            limit = f"--max-error-rate {opts.max_error_rate:g} after >= {opts.max_error_rate_min} requests"
        else:
            return
        if self.stopped_early is not None or self.t_stop is not None:
            return
        top, count = Counter(r.error for r in self.records if not r.ok).most_common(1)[0]
        self.stopped_early = (f"stopped early: {self.failed} of {total} requests failed ({limit}); "
                              f"most frequent error (x{count}): {top}")
        self.notes.append(self.stopped_early)
        log.error("llmslo loadtest: %s", self.secrets.scrub(self.stopped_early))
        runner = self.environment.runner
        # a separate greenlet: this may run inside a user's greenlet, which stopping kills
        gevent.spawn(runner.quit if opts.headless else runner.stop)

    def apply_load(self, state: LoadState) -> None:
        """Adopt the master's load state (every process, the master included)."""
        if state.epoch != self.load.epoch:
            self.epoch_began[state.epoch] = time.perf_counter()
            self._let_surplus_users_finish(lower=state.level < self.load.level)
        self.load = state
        if self.server is not None:  # server scrapes are attributed to the level they were taken at
            self.server.level = state.level
        self._report_drained()

    def _let_surplus_users_finish(self, lower: bool) -> None:
        """A lower level (the capacity search bisecting down) stops some users: each ends its request first.

        Locust stops surplus users at once unless ``stop_timeout`` is set; killed mid-stream, their
        requests would be failures the server never caused. So for the Locust stop that a lower
        level brings, users may take up to --request-timeout to end what they started; the final
        stop drains its own way (:func:`on_test_stopping` clears this again).
        """
        env = self.environment
        if self.locust_stop_timeout is None:
            self.locust_stop_timeout = env.stop_timeout or 0
        env.stop_timeout = env.parsed_options.request_timeout if lower else self.locust_stop_timeout

    def pre_drain_open(self) -> int:
        return self.open_requests[self.load.epoch]

    def _report_drained(self) -> None:
        """Workers: tell the master once no request of the draining level is in flight here."""
        if self.is_worker and self.load.phase == "drain" and self.pre_drain_open() <= 0:
            self.environment.runner.send_message(MSG_DRAINED, {"worker": self.worker_id, "epoch": self.load.epoch})

    # --- records in transit (workers -> master) ------------------------------------
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
        for data in payload["records"]:
            self.add(RequestRecord.from_dict(data))
        mine = self.worker_samples.setdefault(
            payload["worker"], {"loop_lag_s": [], "cpu_percent": [], "cpu_seconds": [], "stamp_delay_bins": []})
        for key, values in payload["selfcheck"].items():
            mine[key].extend(values)

    # --- levels (master / local runner) ---------------------------------------------
    def set_load(self, **changes) -> None:
        """Change the load state and tell every user process."""
        state = LoadState(**{**asdict(self.load), **changes})
        if state.level != self.load.level or state.epoch != self.load.epoch:
            self._close_window()
        self.apply_load(state)
        if state.phase == "drain":
            self.drained = set()
        if self.is_master:
            self.environment.runner.send_message(MSG_LEVEL, asdict(state))

    def open_level(self, users: int) -> None:
        """A new level starts ramping to ``users``."""
        self.set_load(level=users, epoch=self.load.epoch + 1, phase="ramp")

    def _close_window(self) -> None:
        """Add the time since the window opened to the level's; once the stop began, no window
        opens again (the final drain sends nothing, so it is no level's time)."""
        now = time.perf_counter()
        if self.load.level and self.level_since is not None:
            self.windows[self.load.level] = self.windows.get(self.load.level, 0.0) + now - self.level_since
        self.level_since = None if self.stopped_at is not None else now

    def begin_stop(self) -> None:
        """The run stops: no new request, and the last level's window ends here."""
        self.stopping, self.stopped_at = True, time.perf_counter()
        self._close_window()

    def is_drained(self) -> bool:
        """Every request that started before the drain has ended (in every user process)."""
        if self.is_master:
            runner = self.environment.runner
            active = {c.id for c in runner.clients.all if c.state not in ("missing", "stopped")}
            return active <= self.drained
        return self.pre_drain_open() <= 0

    # --- verdict -----------------------------------------------------------------------
    def summary(self, final: bool) -> dict:
        """The whole summary.json content from the records gathered so far."""
        assert self.settings is not None
        slo, opts = self.settings.slo, self.environment.parsed_options
        if not final:  # live view: include the level in progress
            self._close_window()
        end = self.t_stop if self.t_stop is not None else time.perf_counter()
        records = list(self.records)
        _verdict.assign(records, slo)
        levels = _verdict.level_table(records, slo, self.windows, self.closed_loop)
        facts = self.server.facts(slo.concurrency_target) if self.server else _verdict.ServerFacts()
        kpis = _verdict.verdict(records, slo, levels, facts, end - self.t_start)
        acc = _verdict.accounting(records)
        first_users = self.settings.steps[0] if self.settings.steps else int(opts.num_users or 1)
        return {
            "verdict": "FAIL" if self.stopped_early else _verdict.overall(kpis),
            "stopped_early": self.stopped_early,
            "validity": self._validity(records, final),
            "kpis": kpis,
            "accounting": acc,
            "accounting_line": _verdict.accounting_line(acc, opts.warmup_s),
            "levels": levels,
            "capacity_search": self.capacity,
            "cold_start": _verdict.cold_start(records, first_users),
            "ttft_hops": _hops.by_level(records),
            "metrics": _verdict.metric_table(records) if final else {},  # the live view skips the heavy part
            "requests": {
                "total": len(records),
                "failed": acc["failed"],
                "usage_vs_delta_discrepancies": sum(1 for r in records if r.ok and r.token_discrepancy),
                "tokens_from_deltas": sum(1 for r in records if r.ok and r.tokens_source == "deltas"),
                "shorter_than_max_tokens": sum(1 for r in records if r.ok and (r.output_tokens or 0) < r.max_tokens),
                "connection_retries": sum(r.connection_retries for r in records),
            },
            "errors": dict(Counter(r.error for r in records if not r.ok).most_common()),
            "notes": list(self.notes),
            "server_metrics": {"url": opts.server_metrics_url or None, "note": facts.note,
                               "scrapes": self.server.scrapes if self.server else 0},
            "duration_s": end - self.t_start,
            "started_at": datetime.fromtimestamp(self.wall_start, timezone.utc).isoformat(),
            "report_dir": str(self.report_dir()),
            "config": {
                "host": self.environment.host,
                "runner": type(self.environment.runner).__name__,
                "workers": sorted(self.worker_samples or {self.worker_id: None}),
                "warmup_s": opts.warmup_s,
                "request_fields": self._request_fields(),  # shown in report.html's configuration
                "options": self.secrets.redact_options(vars(opts)),
            },
        }

    def _request_fields(self) -> dict:
        """What the requests asked of the server beyond plain OpenAI (--server-dialect), for the report."""
        assert self.settings is not None
        dialect = self.settings.mix.dialect
        return {"dialect": dialect.name, "length_control": dialect.length_control,
                "thinking_fields": list(dialect.thinking_fields)}

    def _validity(self, records: list[RequestRecord], final: bool) -> dict:
        opts = self.environment.parsed_options
        samples = self.worker_samples if self.worker_samples else {self.worker_id: self.selfcheck.snapshot()}
        validity = _selfcheck.validity(
            samples, [r.schedule_lag_s for r in records if r.schedule_lag_s is not None],
            opts.max_worker_cpu, opts.max_loop_lag_ms / 1000, opts.max_schedule_lag_ms / 1000,
            _selfcheck.coalesced_gaps(records), opts.max_coalesced_share,
        )
        missing = sorted(self.senders - self.finals) if final else []
        if missing:
            validity["valid"] = False
            lost = ", ".join(f"{w} ({self.received.get(w, 0)} request records received before)" for w in missing)
            validity["reasons"].append(f"final records of worker(s) {lost} never arrived")
            validity["lost_workers"] = {w: self.received.get(w, 0) for w in missing}
        return validity

    def report_dir(self) -> Path:
        opts = self.environment.parsed_options
        if opts.report_dir:
            return Path(opts.report_dir)
        stamp = datetime.fromtimestamp(self.wall_start, timezone.utc).strftime("%Y%m%dT%H%M%SZ")
        return Path("reports") / stamp


def run_of(environment: Environment) -> Run:
    """The run state of this Locust environment (created by the init listener)."""
    return environment.llmslo


# --- listeners -----------------------------------------------------------------------
def on_parser(parser, **_kw) -> None:
    add_arguments(parser)


def on_init(environment, **_kw) -> None:
    """Validate options before any load; wire messages, the live view and metrics."""
    run = environment.llmslo = Run(environment, secrets=Secrets.of(environment.parsed_options))
    runner = environment.runner
    runner.register_message(MSG_LEVEL, lambda msg, **kw: run.apply_load(LoadState(**msg.data)))
    if run.is_worker:
        run.worker_id = runner.client_id
        environment.events.report_to_master.add_listener(lambda client_id, data, **kw: data.update({MSG_RECORDS: run.ship()}))
        return
    try:
        run.settings = settings(environment.parsed_options)
    except (OptionError, SLOFileError) as exc:
        sys.stderr.write(f"llmslo loadtest: error: {exc}\n")
        sys.exit(2)
    opts = environment.parsed_options
    run.configured_host = environment.host
    run.metrics = ClientMetrics(run.settings.slo)
    environment.events.spawning_complete.add_listener(lambda user_count, **kw: _steady(run))
    if run.is_master:
        runner.register_message(MSG_RECORDS, lambda msg, **kw: run.receive(msg.data))
        runner.register_message(MSG_DRAINED, lambda msg, **kw: _drained(run, msg.data))
        environment.events.worker_report.add_listener(
            lambda client_id, data, **kw: run.receive(data[MSG_RECORDS]) if MSG_RECORDS in data else None)
    install_web_ui(environment, run.metrics, lambda: _live_rows(run))
    if opts.client_metrics_port:
        run.metrics.serve(opts.client_metrics_port)


def _steady(run: Run) -> None:
    if run.settings is not None and run.load.phase == "ramp":
        run.set_load(phase="steady")


def _drained(run: Run, data: dict) -> None:
    if data["epoch"] == run.load.epoch:
        run.drained.add(data["worker"])


def on_test_start(environment, **_kw) -> None:
    run = run_of(environment)
    run.stopping, run.stopped_at = False, None
    if not run.is_master:  # only processes that run users read streams and check themselves
        if run.backlog is None:  # once per process
            run.reads, run.backlog = read_loop(), Backlog()
            fewer_gc_pauses()
        if run.reads is not None:  # this run's option (the web UI's start form may change it)
            run.reads.late_s = environment.parsed_options.max_stamp_delay_ms / 1000
        run.selfcheck.start()
        run.selfcheck.reset()
    if run.is_worker:
        run.pending, run.open_requests = [], Counter()
        try:  # the master validated these same options already
            run.settings = settings(environment.parsed_options)
        except (OptionError, SLOFileError) as exc:
            log.error("llmslo loadtest: error: %s", exc)
        return
    try:  # options may have been edited in the web UI's start form
        run.settings = settings(environment.parsed_options)
    except (OptionError, SLOFileError) as exc:
        log.error("llmslo loadtest: error: %s", exc)
        gevent.spawn(environment.runner.stop)
        return
    opts = environment.parsed_options
    run.records, run.windows, run.worker_samples, run.notes = [], {}, {}, []
    run.failed, run.stopped_early = 0, None
    dialect = run.settings.mix.dialect
    run.notes.append(f"--server-dialect {dialect.name}: reply length by {dialect.length_control}"
                     + ("" if dialect.thinking_fields else "; no thinking switch sent (--thinking-share ignored)"))
    run.senders, run.finals, run.received, run.open_requests = set(), set(), {}, Counter()
    run.t_stop, run.last_summary = None, None  # the shape opened the first level just before this event
    run.t_start, run.wall_start = time.perf_counter(), time.time()
    send_key = environment.host == run.configured_host or not opts.api_key
    if not send_key:
        run.notes.append(f"API key withheld: the host was changed from {run.configured_host} to {environment.host}")
        log.warning("llmslo loadtest: %s", run.notes[-1])
    run.set_load(warmup=opts.warmup_s > 0, send_key=send_key)
    if opts.warmup_s > 0:
        gevent.spawn_later(opts.warmup_s, run.set_load, warmup=False)
    run.server = ServerWatch(opts.server_metrics_url or None, run.settings.slo.service.gpus_per_replica,
                             level=run.load.level)
    run.server.poll()
    run.poller = gevent.spawn(_poll, run)


def _poll(run: Run) -> None:
    while True:
        gevent.sleep(POLL_S)
        run.server.poll()
        run.metrics.refresh(run.environment.runner)


def on_test_stop(environment, **_kw) -> None:
    run = run_of(environment)
    if run.is_worker:
        environment.runner.send_message(MSG_RECORDS, run.ship(final=True))
        return
    if run.settings is None or run.t_stop is not None:
        return
    if run.poller is not None:
        run.poller.kill(block=False)
    run.server.poll()
    run._close_window()
    run.t_stop = time.perf_counter()
    if run.is_master:
        expected = run.senders | {c.id for c in environment.runner.clients.all}
        wait_s = final_drain_s(environment) + FINAL_WAIT_S
        if environment.parsed_options.headless:
            _tell_workers_to_quit(environment.runner)
            _await_finals(run, expected, wait_s)  # here, while Locust's quit() still listens to them
            wait_s = 0.0  # waited already
        run.finisher = gevent.spawn(_finish_when_complete, run, expected, wait_s)
    else:
        finish(run)


def _tell_workers_to_quit(runner: MasterRunner) -> None:
    """A headless master: the "quit" that Locust's ``MasterRunner.quit()`` sends next, sent now.

    quit() fires test_stop (on_test_stop, which calls this) before it tells the workers anything, sends them
    "quit", waits 0.5 s and then stops the master's message listener. A worker's final records
    come after its drain (the requests still running end first, seconds with long replies), so
    they arrived to a deaf master: lost, and the run hung for the whole final wait (1024 users in
    2 processes: no answer after 260 s). Told now, the workers drain while test_stop waits for
    their finals, and quit() goes on once they are in (or the wait ran out).
    """
    for client in runner.clients.all:
        runner.server.send_to_client(Message("quit", None, client.id))


def _await_finals(run: Run, expected: set[str], wait_s: float) -> None:
    """Until every live worker's final records are in (a worker gone missing is not waited for)."""
    deadline = time.perf_counter() + wait_s
    runner = run.environment.runner
    while time.perf_counter() < deadline:
        missing = {c.id for c in runner.clients.all if c.state == "missing"}
        if expected - missing <= run.finals:
            return
        gevent.sleep(0.05)


def _finish_when_complete(run: Run, expected: set[str], wait_s: float) -> None:
    """Judge once the final records are in (a headless master waited for them in test_stop: ``wait_s`` 0)."""
    _await_finals(run, expected, wait_s)
    run.senders |= expected
    finish(run)


def finish(run: Run) -> dict:
    """Compute the final summary, write the report folder, print the table, set the exit code."""
    summary = run.summary(final=True)
    run.last_summary = summary
    _report.write_report(Path(summary["report_dir"]), summary, run.records, run.secrets)
    print(run.secrets.scrub(_report.console_table(summary)), flush=True)
    run.exit_code = exit_code(summary)
    return summary


def exit_code(summary: dict) -> int:
    """1: an SLO failed; 3: the generator saturated (run invalid); 4: inconclusive; 0: pass."""
    if summary["verdict"] == "FAIL":
        return 1
    if not summary["validity"]["valid"]:
        return 3
    return 4 if summary["verdict"] == "INCONCLUSIVE" else 0


def on_quitting(environment, **_kw) -> None:
    run = run_of(environment)
    if run.is_worker or run.settings is None:
        return
    if run.finisher is not None:
        run.finisher.join(timeout=final_drain_s(environment) + FINAL_WAIT_S + 30)
    if run.exit_code is not None:
        environment.process_exit_code = run.exit_code


def _live_rows(run: Run) -> list[dict]:
    if run.settings is None or not run.t_start:
        return []
    summary = run.last_summary if run.t_stop is not None and run.last_summary else run.summary(final=False)
    rows = _report.kpi_rows(summary["kpis"])
    rows.append({"kpi": "verdict", "value": summary["verdict"], "target": "", "status": "VALID" if summary["validity"]["valid"] else "INVALID",
                 "samples": str(summary["requests"]["total"]), "note": summary["accounting_line"]})
    rows.extend(_report.level_rows_live(summary))
    return rows


def final_drain_s(environment) -> float:
    """Longest wait for the requests in flight when the run stops (a request ends by its timeout)."""
    return environment.parsed_options.request_timeout + 5 + environment.stop_timeout


def on_test_stopping(environment, **_kw) -> None:
    """Before Locust stops the users: no new request, and the ones in flight end and are recorded.

    Locust's own ``--stop-timeout`` would do the same per user, but a worker then sleeps that
    long before it answers the master again (``--processes`` runs hung on it); here every
    process drains once, bounded by :func:`final_drain_s`.
    """
    run = run_of(environment)
    if run.locust_stop_timeout is not None:  # this drain, not Locust's per-user wait (Run._let_surplus_users_finish)
        environment.stop_timeout = run.locust_stop_timeout
    run.begin_stop()
    if run.is_master:
        return
    deadline = time.perf_counter() + final_drain_s(environment)
    while run.in_flight > 0 and time.perf_counter() < deadline:
        gevent.sleep(0.05)
    _let_ended_users_leave(environment.runner.user_greenlets)


def _let_ended_users_leave(users) -> None:
    """Wait (at most 1 s) until the users that ended in the drain have left Locust's group of users.

    A user ends after its last request (it starts no new one now), and gevent removes its greenlet
    from the group a moment later. Locust's stop, which comes next, logs an ERROR for each ended
    user still in the group ("a user that didn't have proper args": 96 of them when 1024 users
    in 2 processes stopped at once); harmless, but it reads like a fault.
    """
    deadline = time.perf_counter() + 1.0
    while any(g.dead for g in users) and time.perf_counter() < deadline:
        gevent.sleep(0.01)


def register(events) -> None:
    """Attach every listener to Locust's event hooks."""
    events.init_command_line_parser.add_listener(on_parser)
    events.init.add_listener(on_init)
    events.test_start.add_listener(on_test_start)
    events.test_stopping.add_listener(on_test_stopping)
    events.test_stop.add_listener(on_test_stop)
    events.quitting.add_listener(on_quitting)
