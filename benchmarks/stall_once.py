"""Locust plugin for ``benchmarks/loadgen_accuracy.py --stall-ms``: block the load generator once.

An adversarial check of the self-check, not part of the load test. With every
user spawned at once, the first tokens of all streams arrive together, ``--ttft``
after their requests, which started within some tens of ms of the test's start
(spawning 256 users takes that long). This blocks the whole process (a real
sleep, not gevent's, as a long garbage collection or a descheduled core would)
for ``--stall-ms`` at ``--stall-at`` seconds after the test's start. Aimed at the
first-token burst, streams whose first token waited through it get their second
token meanwhile and read both at once: their TTFT carries the second token's
arrival, and the run must come out invalid.
"""

from __future__ import annotations

import os

import gevent
import gevent.monkey
from locust import events

_block = gevent.monkey.get_original("time", "sleep")  # Locust's time.sleep yields to other greenlets


@events.test_start.add_listener
def _stall_once(**_kw) -> None:
    gevent.spawn_later(float(os.environ["LLMSLO_STALL_AT_S"]), _block, float(os.environ["LLMSLO_STALL_MS"]) / 1000)
