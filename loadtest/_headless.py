"""Run a bounded headless load test from Python and read its verdict.

For programs (``llmslo demo``, tests, benchmarks) that need the same run a
person gets from the command line: it *is* that command line, run as a
subprocess, so Locust's process model and exit code stay exactly the same.
"""

from __future__ import annotations

import json
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

LOCUSTFILE_DIR = Path(__file__).resolve().parent


@dataclass
class Outcome:
    """What a run left behind: Locust's exit code, its output, and summary.json (None if not written)."""

    returncode: int
    output: str
    summary: dict | None
    report_dir: Path

    @property
    def verdict(self) -> str | None:
        return self.summary["verdict"] if self.summary else None


def locust_argv(*args: str) -> list[str]:
    """``python -m locust -f loadtest/ ARGS``: the one way every part of the project starts Locust
    (``llmslo up``'s web UI, the demo, this helper, the distributed tests), with this interpreter."""
    return [sys.executable, "-m", "locust", "-f", str(LOCUSTFILE_DIR), *args]


def locust_command(host: str, report_dir: Path, users: int, run_time: str, *extra: str) -> list[str]:
    """The exact command line: ``locust -f loadtest/ --headless ...``."""
    return locust_argv(
        "--headless", "--host", host, "-u", str(users), "-r", str(users), "-t", run_time, "--only-summary",
        "--report-dir", str(report_dir), *extra,
    )


def run_headless(
    host: str, report_dir: str | Path, users: int = 8, run_time: str = "30s", *extra: str, timeout: float = 600
) -> Outcome:
    """Run ``locust -f loadtest/`` headless against ``host`` and return the outcome.

    ``extra`` are further Locust/llmslo flags (e.g. ``"--mix", "text=1"``).
    Exit codes: 0 pass, 1 an SLO failed, 2 bad options/slo.yaml, 3 run invalid, 4 inconclusive.
    """
    report_dir = Path(report_dir)
    proc = subprocess.run(
        locust_command(host, report_dir, users, run_time, *extra),
        capture_output=True, text=True, timeout=timeout,
    )
    summary_file = report_dir / "summary.json"
    summary = json.loads(summary_file.read_text()) if summary_file.exists() else None
    return Outcome(proc.returncode, proc.stdout + proc.stderr, summary, report_dir)
