"""A Locust master with N workers as real processes on loopback, for the distributed tests."""

from __future__ import annotations

import subprocess
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from conftest import free_port
from loadtest._headless import locust_argv, locust_command


@contextmanager
def locust_cluster(url: str, report_dir: Path, users: int, run_time: str, *args: str,
                   workers: int = 2) -> Iterator[tuple[subprocess.Popen, list[subprocess.Popen]]]:
    """Start the master (output captured) and its workers; kill whatever is left on exit."""
    port = free_port()
    master = subprocess.Popen(
        [*locust_command(url, report_dir, users, run_time, *args), "--master", "--expect-workers", str(workers),
         "--master-bind-host", "127.0.0.1", "--master-bind-port", str(port)],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
    )
    worker = locust_argv("--worker", "--master-host", "127.0.0.1", "--master-port", str(port))
    procs = [subprocess.Popen(worker, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL) for _ in range(workers)]
    try:
        yield master, procs
    finally:
        for proc in [master, *procs]:
            if proc.poll() is None:
                proc.kill()
            proc.wait()
