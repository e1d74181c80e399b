"""Drill: a Locust worker is SIGKILLed mid-run.

The master must still finish, write its report, mark the run invalid and name the
lost worker with the number of request records it had delivered (the records of its
last report interval die with it, so the verdict must not pass as if complete).
"""

from __future__ import annotations

import json
import time
from collections import Counter

from conftest import free_port
from locust_cluster import locust_cluster
from loadtest._truth_server import fetch_truth, running

TRAFFIC = ("--mix", "text=1", "--input-tokens", "10", "--output-tokens", "12", "--short-share", "0")


def test_killed_worker_is_named_with_its_samples_and_the_master_finishes(tmp_path):
    with running(free_port(), "--ttft", "0.03", "--itl", "0.008") as url:
        with locust_cluster(url, tmp_path / "run", 4, "20s", *TRAFFIC) as (master, workers):
            deadline = time.monotonic() + 60
            while len(fetch_truth(url)) < 20 and time.monotonic() < deadline:  # the load is running
                time.sleep(0.5)
            time.sleep(4)  # longer than Locust's 3 s worker report interval: both workers have delivered
            workers[0].kill()
            output, _ = master.communicate(timeout=120)
    assert master.returncode == 3, output[-3000:]  # judged invalid (a worker's records are missing), not crashed
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert (tmp_path / "run" / "report.html").exists()
    validity = summary["validity"]
    assert validity["valid"] is False
    by_worker = Counter(json.loads(line)["worker"] for line in (tmp_path / "run" / "requests.jsonl").read_text().splitlines())
    lost = validity["lost_workers"]
    assert len(lost) == 1, validity
    (name, delivered), = lost.items()
    assert delivered == by_worker[name] > 0, (lost, by_worker)
    assert any(name in r and f"{delivered} request records" in r for r in validity["reasons"]), validity["reasons"]
    survivor = set(by_worker) - {name}
    assert survivor and by_worker[survivor.pop()] > 0
    print(f"lost worker {name}: {delivered} records delivered; reasons: {validity['reasons']}")
