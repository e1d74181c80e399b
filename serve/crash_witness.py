"""Counts the model replicas of a node that died without a graceful stop: the crash KPI's source.

Why a witness outside the replica: a process cannot count its own crash (a segfault, the
kernel's OOM killer, ``os._exit``), and the ingress only saw replicas die under its requests
(an idle replica's crash went uncounted; colocated there is no other process at all).
So the node's telemetry holder (serve.telemetry's ``NodeLock``) compares the model replica
processes it finds at each tree discovery with the ones it found before; one that is gone
without having left a goodbye mark crashed. A replica leaves its mark when Serve stops it
gracefully (``ModelServer.__del__``: scale-down, redeploy, shutdown) unless its last health
check failed (Serve replacing an unhealthy replica counts). The ledger lives in files beside the
node lock, so a new holder (the old one may be the replica that crashed) carries on from what
the old one last saw. A replica that starts and dies between two discoveries (5 s) is missed.
"""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path

Proc = tuple[int, float]  # (pid, create_time): a pid alone can be reused


class ReplicaLedger:
    """The node's files: replicas last seen (written by the witness), goodbyes (one per replica)."""

    def __init__(self, node_key: str, root: Path | None = None) -> None:
        self.dir = (root or Path(tempfile.gettempdir())) / f"llmslo-replicas-{node_key}"
        self.dir.mkdir(mode=0o700, exist_ok=True)
        self._seen = self.dir / "seen.json"

    def goodbye(self, proc: Proc) -> None:
        (self.dir / _mark(proc)).touch()

    def said_goodbye(self, proc: Proc) -> bool:
        return (self.dir / _mark(proc)).exists()

    def forget(self, proc: Proc) -> None:
        (self.dir / _mark(proc)).unlink(missing_ok=True)

    def seen(self) -> set[Proc]:
        try:
            return {(int(pid), float(start)) for pid, start in json.loads(self._seen.read_text())}
        except (OSError, ValueError):
            return set()

    def remember(self, procs: set[Proc]) -> None:
        tmp = self._seen.with_suffix(f".{os.getpid()}.tmp")
        tmp.write_text(json.dumps(sorted(procs)))
        tmp.replace(self._seen)  # atomic: a new holder never reads half a file


def _mark(proc: Proc) -> str:
    return f"bye-{proc[0]}-{proc[1]:.2f}"


class CrashWitness:
    """Turns successive sets of live model replica processes into a crash count."""

    def __init__(self, ledger: ReplicaLedger) -> None:
        self._ledger = ledger
        self._seen = ledger.seen()  # what the previous holder last saw; kept in memory from here on

    def update(self, alive: set[Proc]) -> int:
        """Crashes since the last update (of whichever process held the node lock then)."""
        if alive == self._seen:
            return 0
        gone = self._seen - alive
        crashed = sum(not self._ledger.said_goodbye(p) for p in gone)
        for proc in gone:
            self._ledger.forget(proc)
        self._ledger.remember(alive)
        self._seen = set(alive)
        return crashed
