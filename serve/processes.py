"""Port and process-tree helpers of a server that must stop cleanly (used by ``llmslo serve`` and the supervisor).

Ray is why: a Ray driver's raylet, GCS and workers outlive SIGTERM of their
parent by seconds, and one that still holds a port answers for a server that
is gone. These helpers find a live listener, list a process's descendants and
make sure they are gone.
"""

from __future__ import annotations

import random
import socket
from collections.abc import Iterable
from typing import Any

import psutil


LATE_BIND_PORTS = range(20000, 30000)
"""Where to pick a port that another program binds later: below Linux's ephemeral range
(32768-60999, what the kernel gives every bind to port 0 and every outgoing connection, Ray's
many processes included, so a kernel-picked port can be taken before its owner binds it; a full
test run once saw Ray's metrics answer on the port picked for Locust), above Ray's worker
ports (10002-19999), apart from Serve's direct-ingress replica ports (30000-31000)."""

_handed_out: set[int] = set()  # this process's picks in a range: two picks before either binds never coincide


def free_port(within: range = LATE_BIND_PORTS) -> int:
    """A TCP port that nothing listens on right now and that this process has not handed out
    before: a random one of ``within``. Nearly every caller hands it to a program that binds it
    later (a server, Ray, Prometheus, Locust), hence the range: see :data:`LATE_BIND_PORTS`."""
    for port in random.sample(within, min(len(within), 64)):
        if port not in _handed_out and not port_taken("0.0.0.0", port):
            _handed_out.add(port)
            return port
    raise OSError(f"no free port in {within.start}-{within.stop - 1}")


def port_taken(host: str, port: int) -> bool:
    """True when a socket already listens on ``host:port``.

    Binds with SO_REUSEADDR, as servers do, so a port in TIME_WAIT after a clean
    stop counts as free and only a live listener counts as taken.
    """
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family) as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind((host, port))
        except OSError:
            return True
    return False


def descendants(pid: int) -> list[psutil.Process]:
    """Every live descendant of ``pid`` (psutil objects: safe against pid reuse)."""
    try:
        return psutil.Process(pid).children(recursive=True)
    except psutil.NoSuchProcess:
        return []


def reap(procs: Iterable[psutil.Process], grace_s: float) -> list[int]:
    """Wait up to ``grace_s`` for ``procs`` to exit, then SIGTERM, then SIGKILL; returns pids that had to be killed."""
    _, left = psutil.wait_procs([p for p in procs if _alive(p)], timeout=grace_s)
    for p in left:
        _quietly(p.terminate)
    _, stragglers = psutil.wait_procs(left, timeout=5)
    for p in stragglers:
        _quietly(p.kill)
    psutil.wait_procs(stragglers, timeout=5)
    return [p.pid for p in left]


def _alive(p: psutil.Process) -> bool:
    try:
        return p.is_running() and p.status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


def _quietly(action: Any) -> None:
    try:
        action()
    except psutil.NoSuchProcess:
        pass
