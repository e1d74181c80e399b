"""The load generator's garbage-collector regime (loadtest/_gc.py): survivors frozen, dead cycles freed."""

from __future__ import annotations

import gc
import weakref

import gevent

from loadtest import _gc


class _Node:
    pass


def test_what_a_young_collection_leaves_alive_is_frozen_and_dead_cycles_are_freed(monkeypatch):
    monkeypatch.setattr(_gc, "FREEZE_S", 0.01)
    freezer = gevent.spawn(_gc._freeze_survivors)
    try:
        kept = [{"record": i} for i in range(2000)]  # alive: what the run keeps to its end
        node = _Node()
        node.itself = node  # a reference cycle, dead as soon as the name goes
        dead = weakref.ref(node)
        del node
        before = gc.get_freeze_count()
        gevent.sleep(0.1)
        assert dead() is None  # collected, not frozen: a failure's cycle dies before it can be frozen
        assert gc.get_freeze_count() >= before + len(kept)
    finally:
        freezer.kill()
        gc.unfreeze()
