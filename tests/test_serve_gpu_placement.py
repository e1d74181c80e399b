"""GPU reservation of model copies, checked on a CPU machine with Ray-declared GPUs.

Ray is told the node has 2 GPUs (``--num-gpus 2``; nothing touches a real GPU: the
simulated engine runs and NVML is absent). With ``gpus_per_replica 1`` and 2 replicas,
Serve must place each replica in its own placement-group bundle, so the replicas get
different GPU ids. Also checks that the admin API is off when no token is configured.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time

import httpx

from conftest import REPO_ROOT, _stop, _wait_healthy, free_port


def _replica_starts(log_path) -> list[dict]:
    return [json.loads(line[line.index("{"):]) for line in log_path.read_text().splitlines()
            if '"replica_started"' in line]


def test_each_replica_gets_its_own_gpus_and_admin_is_off_by_default(tmp_path):
    port = free_port()
    log_path = tmp_path / "serve.log"
    cmd = [sys.executable, "-m", "serve.cli", "--host", "127.0.0.1", "--port", str(port),
           "--metrics-port", str(free_port()), "--replicas", "2", "--gpus-per-replica", "1",
           "--num-gpus", "2", "--num-cpus", "2", "--time-scale", "0.1"]
    env = {**os.environ, "RAY_USAGE_STATS_ENABLED": "0", "PYTHONUNBUFFERED": "1"}
    env.pop("LLMSLO_ADMIN_TOKEN", None)
    with open(log_path, "wb") as log:
        proc = subprocess.Popen(cmd, cwd=REPO_ROOT, env=env, stdout=log, stderr=subprocess.STDOUT,
                                start_new_session=True)
    url = f"http://127.0.0.1:{port}"
    try:
        _wait_healthy(url, proc, log_path)
        deadline = time.monotonic() + 90
        while len(starts := _replica_starts(log_path)) < 2 and time.monotonic() < deadline:
            time.sleep(1)
        assert len(starts) == 2, log_path.read_text()[-3000:]
        assert sorted(s["gpus"] for s in starts) == [["0"], ["1"]]
        resp = httpx.get(f"{url}/admin/faults", headers={"authorization": "Bearer x"}, timeout=10)
        assert resp.status_code == 404 and resp.json()["error"]["code"] == "admin_disabled"
    finally:
        _stop(proc)
