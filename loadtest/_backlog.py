"""Work a user process does when nothing more urgent is due: one greenlet, one item at a time.

A user hands the parsing and bookkeeping of a request it has read to the end
(~0.4 ms) to the backlog and sends its next request at once (loadtest/locustfile.py).
Each item waits for ``gevent.idle()``: until no socket, timer or woken greenlet is
pending. So in a burst of streams ending together, every user resends before
any parse runs, and between two items the loop serves sockets and timers
(a parse delays a read by one item at most, as when users parsed in turn).
A user never gets more than one request ahead of its own items: before sending,
it runs any older item of its own that is still waiting (loadtest/locustfile.py
``_back_off``), so a saturated process degrades to users parsing their own
requests, as before the backlog. With no user left to need them (the stop's
drain), items that never find the loop idle run one every ``IDLE_WAIT_S``.
"""

from __future__ import annotations

import logging
from collections import deque
from typing import Callable

import gevent
from gevent.event import Event

log = logging.getLogger("llmslo.loadtest")
IDLE_WAIT_S = 0.05  # an item waits at most this long for the loop to be idle


class Task:
    """One call in the backlog; runs once, by the backlog or by whoever needs its result first."""

    __slots__ = ("_call", "_args")

    def __init__(self, call: Callable[..., None], args: tuple) -> None:
        self._call: Callable[..., None] | None = call
        self._args = args

    def run(self) -> None:
        call, self._call = self._call, None
        if call is None:
            return
        args, self._args = self._args, ()
        try:
            call(*args)
        except Exception:  # one item's bug must not stop the rest (each records its request itself)
            log.exception("llmslo loadtest: a backlog item failed")


class Backlog:
    """A queue of calls run in order by one greenlet, each once the loop is idle; one per user process."""

    def __init__(self) -> None:
        self._tasks: deque[Task] = deque()
        self._added = Event()
        gevent.spawn(self._run)

    def add(self, call: Callable[..., None], *args) -> Task:
        task = Task(call, args)
        self._tasks.append(task)
        self._added.set()
        return task

    def _run(self) -> None:
        while True:
            self._added.wait()
            self._added.clear()
            while self._tasks:
                with gevent.Timeout(IDLE_WAIT_S, False):
                    gevent.idle()
                self._tasks.popleft().run()
