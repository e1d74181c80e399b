"""The process supervisor: start services, wait until each answers, stop every descendant.

Knows nothing about which services exist (that is :mod:`llmslo.catalogue`).
The port check and the process-tree reaping live in :mod:`serve.processes`
(``llmslo serve`` needs them and the server imports nothing of the CLI);
they are written once and used here.

Ray is why the stop is thorough: a Ray driver's raylet, GCS and workers outlive
SIGTERM of their parent by seconds, and one that still holds a port answers
for a server that is gone. Every descendant is recorded while it runs and
killed if it outlives its grace period.
"""

from __future__ import annotations

import os
import signal
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import psutil

from serve.processes import descendants, reap

ROOT = Path(__file__).resolve().parent.parent


class StackError(RuntimeError):
    """A service did not come up; the message names it and ends with its log's last lines."""


@dataclass
class Service:
    """One process of the stack: how to start it and which URL says it is ready."""

    name: str
    argv: list[str]
    ready_url: str
    url: str
    env: dict[str, str] = field(default_factory=dict)
    ready_timeout_s: float = 90.0
    required: bool = True  # False: the stack goes on without it (a Ray worker node may be lost)
    proc: subprocess.Popen | None = None
    family: dict[int, psutil.Process] = field(default_factory=dict)

    def remember_descendants(self) -> None:
        """Record every descendant now, so ones that outlive their parent are still found."""
        if self.proc is None:
            return
        try:
            root = psutil.Process(self.proc.pid)
        except psutil.NoSuchProcess:
            return
        for p in [root, *descendants(root.pid)]:
            self.family.setdefault(p.pid, p)


class Stack:
    """Start services in order, wait for each, stop all in reverse; a context manager."""

    def __init__(self, services: list[Service], run_dir: Path, grace_s: float = 20.0) -> None:
        self.services = services
        self.run_dir = run_dir
        self.grace_s = grace_s
        (run_dir / "logs").mkdir(parents=True, exist_ok=True)

    def __enter__(self) -> Stack:
        self.start()
        return self

    def start(self) -> None:
        """Start every service in order; if one fails (or Ctrl-C), stop those started."""
        try:
            for service in self.services:
                self._start(service)
        except BaseException:
            self.stop()
            raise

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def log_path(self, service: Service) -> Path:
        return self.run_dir / "logs" / f"{service.name}.log"

    def _start(self, service: Service) -> None:
        log = self.log_path(service).open("ab")
        service.proc = subprocess.Popen(
            service.argv,
            cwd=ROOT,
            env={**os.environ, **service.env},
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,  # own process group: a terminal Ctrl-C reaches us only
        )
        log.close()
        self._wait_ready(service)

    def _wait_ready(self, service: Service) -> None:
        deadline = time.monotonic() + service.ready_timeout_s
        while time.monotonic() < deadline:
            service.remember_descendants()
            if service.proc.poll() is not None:
                raise StackError(f"{service.name} exited with {service.proc.returncode}\n{self.tail(service)}")
            try:
                if httpx.get(service.ready_url, timeout=2.0).status_code < 500:
                    return
            except httpx.HTTPError:
                pass
            time.sleep(0.5)
        raise StackError(
            f"{service.name} did not answer {service.ready_url} within {service.ready_timeout_s:.0f} s\n"
            f"{self.tail(service)}"
        )

    def tail(self, service: Service, lines: int = 20) -> str:
        text = self.log_path(service).read_text(errors="replace").splitlines()[-lines:]
        return "\n".join(f"  {service.name}| {line}" for line in text)

    def watch(self) -> Service | None:
        """Refresh the descendant records; return the first required service that has died."""
        for service in self.services:
            service.remember_descendants()
            if service.required and service.proc is not None and service.proc.poll() is not None:
                return service
        return None

    def lost(self) -> list[Service]:
        """Services that may die without stopping the stack, and did."""
        return [s for s in self.services if not s.required and s.proc is not None and s.proc.poll() is not None]

    def stop(self) -> None:
        """SIGTERM each leader (reverse order), then its group and leftovers; SIGKILL stragglers."""
        for service in reversed(self.services):
            if service.proc is None:
                continue
            service.remember_descendants()
            _signal(service.proc.pid, signal.SIGTERM)
            try:
                service.proc.wait(timeout=self.grace_s)
            except subprocess.TimeoutExpired:
                pass
            reap(service.family.values(), grace_s=0)
            _signal_group(service.proc.pid, signal.SIGKILL)  # the unreaped leader keeps its pgid ours
            service.proc.wait()
            service.proc = None


def _interrupt(signum: int, frame: object) -> None:
    raise KeyboardInterrupt(f"signal {signum}")


def stop_on_sigterm() -> None:
    """Make SIGTERM unwind like Ctrl-C, so ``with Stack`` stops every process."""
    signal.signal(signal.SIGTERM, _interrupt)


def _signal(pid: int, sig: signal.Signals) -> None:
    try:
        os.kill(pid, sig)
    except ProcessLookupError:
        pass


def _signal_group(pgid: int, sig: signal.Signals) -> None:
    try:
        os.killpg(pgid, sig)
    except (ProcessLookupError, PermissionError):
        pass
