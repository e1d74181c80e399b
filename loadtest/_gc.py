"""The garbage-collector regime of a load-test user process: few, short pauses of the read loop.

A collection stops every greenlet of the process, the read loop included; a pause longer than
the gap between two tokens makes the reader take both in one read, and the older one then
carries the newer one's arrival (docs/benchmarks.md measures both regimes).
"""

from __future__ import annotations

import gc

import gevent

GC_THRESHOLDS = (20_000, 20, 10)  # Python's default is (700, 10, 10): see fewer_gc_pauses
FREEZE_S = 0.25  # how often what survived a young collection is frozen (_freeze_survivors)


def fewer_gc_pauses() -> None:
    """Keep Python's garbage collector from pausing the read loop for tens of milliseconds.

    Measured at 1024 streams in one process (docs/benchmarks.md): with the default thresholds
    the collector ran 1,800 times in 20 s, its full collections paused for up to 132 ms (every
    record kept for the verdict is scanned again each time), and the reads they delayed made
    9.6 % of tokens share a read with the next. So objects alive at test start (modules,
    classes, Locust's own) are frozen out of every collection, the young generation is
    collected after 20,000 allocations instead of 700, and every ``FREEZE_S`` what survived a
    young collection is frozen too (:func:`_freeze_survivors`).
    """
    gc.freeze()
    gc.set_threshold(*GC_THRESHOLDS)
    gevent.spawn(_freeze_survivors)


def _freeze_survivors() -> None:
    """Every ``FREEZE_S``: collect the young generation, then freeze what it left alive.

    The survivors are mostly what the run keeps to its end (records, Locust's stats, open
    streams), so no collection scans them again: without this, the middle generation's
    collections paused the process for 50-78 ms at 1024 streams (reads delayed past the next
    token) and the full ones grow with the records of a long run. What dies later and sits in
    a reference cycle is never freed; probes (docs/benchmarks.md) found no such garbage from
    the run itself, nor from a run whose every request failed, since a failure's cycle
    (exception, traceback, frames) dies before the next young collection.
    """
    while True:
        gevent.sleep(FREEZE_S)
        gc.collect(0)
        gc.freeze()
