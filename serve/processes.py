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


def free_port(within: range | None = None) -> int:
    """A TCP port on 127.0.0.1 that nothing listens on right now: the kernel's pick, or a
    random free one of ``within`` (for a port another program binds later, on every interface:
    a pick from the kernel's ephemeral range may meanwhile become some connection's source port)."""
    if within is None:
        with socket.socket() as sock:
            sock.bind(("127.0.0.1", 0))
            return sock.getsockname()[1]
    for port in random.sample(within, min(len(within), 64)):
        if not port_taken("0.0.0.0", port):
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
