"""Work a user process does when nothing more urgent is due: one greenlet, one item at a time.

A user hands the parsing and bookkeeping of a request it has read to the end
(~0.4 ms) to the backlog and sends its next request at once (loadtest/locustfile.py).
Each item waits for ``gevent.idle()``: until no socket, timer or woken greenlet is
pending. So in a burst of streams ending together, every user resends before
any parse runs, and between two items the loop serves sockets and timers
(a parse delays a read by one item at most, as when users parsed in turn).
A process that is never idle (saturated, or a greenlet that keeps yielding) still
runs one item every ``IDLE_WAIT_S``; its users, who wait for their own outcomes
before sending on (loadtest/locustfile.py ``_back_off``), then slow down to match.
"""

from __future__ import annotations

import logging
from collections import deque
from typing import Callable

import gevent
from gevent.event import Event

log = logging.getLogger("llmslo.loadtest")
IDLE_WAIT_S = 0.05  # an item waits at most this long for the loop to be idle


class Backlog:
    """A queue of calls run in order by one greenlet, each once the loop is idle; one per user process."""

    def __init__(self) -> None:
        self._items: deque[tuple[Callable[..., None], tuple]] = deque()
        self._added = Event()
        gevent.spawn(self._run)

    def add(self, func: Callable[..., None], *args) -> None:
        self._items.append((func, args))
        self._added.set()

    def _run(self) -> None:
        while True:
            self._added.wait()
            self._added.clear()
            while self._items:
                with gevent.Timeout(IDLE_WAIT_S, False):
                    gevent.idle()
                func, args = self._items.popleft()
                try:
                    func(*args)
                except Exception:  # one item's bug must not stop the rest (each records its request itself)
                    log.exception("llmslo loadtest: a backlog item failed")
