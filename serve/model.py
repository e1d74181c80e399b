"""The model deployment: each replica holds one engine (one copy of the model).

It streams the engine's Delta/Finish items to the ingress through a
DeploymentHandle, applies fault-drill directives around any engine, turns
engine failures into a :class:`StreamError` item (so an OOM never kills the
replica and never surfaces as a Ray exception), and publishes the replica-side
metrics: in-flight requests, engine queue wait, KV-cache usage, OOM events,
replica starts and build info, plus GPU/CPU telemetry (serve.telemetry).
"""

from __future__ import annotations

import asyncio
import importlib.metadata
import os
import time
from collections.abc import AsyncIterator
from contextlib import aclosing
from dataclasses import dataclass
from typing import Any, Literal

import psutil
import ray
import structlog
from ray import serve

from serve.crash_witness import ReplicaLedger
from serve.engines import create_engine
from serve.engines.base import (
    Delta,
    EngineError,
    EngineInputError,
    EngineOOMError,
    EngineOverloadedError,
    EngineUnavailableError,
    Finish,
    GenerationRequest,
)
from serve.faults import STALL_AFTER_TOKENS, Directive
from serve.logs import configure_logging
from serve.metrics import ServerMetrics
from serve.settings import AppSettings
from serve.telemetry import local_raylet, node_key, start_telemetry

log = structlog.get_logger("llmslo.model")
# Ray's agent evicts a gauge series not re-reported within 2 report intervals (>= 2 s),
# and gauges set only in the constructor went missing here, so every gauge is re-set
# this often.
GAUGE_REFRESH_S = 0.5


@dataclass(frozen=True)
class ReplicaHello:
    """First item of every stream: which replica serves the request, and since when (``time.time()``)."""

    replica_id: str
    started_at: float


@dataclass(frozen=True)
class ReplicaTiming:
    """Sent just before Finish: when the engine's first token came (``time.time()``, None without
    a token) and how long the request waited in the engine's own queue (per-hop timing)."""

    first_token_at: float | None
    queue_wait_s: float


@dataclass(frozen=True)
class StreamError:
    """Last item of a failed stream (replaces Finish)."""

    kind: Literal["oom", "overloaded", "unavailable", "unsupported", "engine"]
    message: str


def _classify(exc: BaseException) -> tuple[str, str | None]:
    """(kind, oom source) of an engine exception; a raw CUDA OOM counts as an OOM too."""
    if isinstance(exc, EngineOOMError):
        return "oom", exc.source
    if type(exc).__name__ == "OutOfMemoryError":  # torch.cuda.OutOfMemoryError leaking from an engine
        return "oom", "cuda"
    if isinstance(exc, EngineOverloadedError):
        return "overloaded", None
    if isinstance(exc, EngineUnavailableError):
        return "unavailable", None
    if isinstance(exc, EngineInputError):
        return "unsupported", None
    return "engine", None


class ModelServer:
    """One model replica (see module doc); its methods are called through handles."""

    async def __init__(self, settings: dict[str, Any]) -> None:
        constructed = time.monotonic()
        configure_logging()
        self.settings = AppSettings.model_validate(settings)
        self.model = self.settings.served_model
        self.replica_id = serve.get_replica_context().replica_id.unique_id
        self.engine = create_engine(self.settings.engine, self.model, self.settings.engine_options)
        await self.engine.start()
        self.metrics = ServerMetrics(self.model)
        self._in_flight = 0
        weights = "simulated" if self.engine.name == "simulated" else (
            "synthetic" if self.engine.synthetic_weights else "real"
        )
        self._build_tags = {
            "version": importlib.metadata.version("llmslo"),
            "engine": self.engine.name,
            "model": self.model,
            "weights": weights,
            "topology": "colocated" if self.settings.colocated else "split",
        }
        self.metrics.replica_starts.inc(1, self.metrics.tags)
        self._healthy = True  # last health check; a replica Serve stops as unhealthy leaves no goodbye
        raylet = local_raylet()
        self._ledger = ReplicaLedger(node_key(raylet)) if raylet is not None else None
        self.startup_s = time.monotonic() - constructed
        self._publish_gauges()
        start_telemetry(self.model, "replica")
        self._refresher = asyncio.get_running_loop().create_task(self._refresh_gauges())
        log.info("replica_started", replica=self.replica_id, model=self.model, engine=self.engine.name,
                 pid=os.getpid(), gpus=[str(g) for g in ray.get_gpu_ids()],
                 startup_s=round(self.startup_s, 3))

    async def generate(
        self, request: GenerationRequest, directive: Directive, sent_at: float
    ) -> AsyncIterator[ReplicaHello | ReplicaTiming | Delta | Finish | StreamError]:
        """Stream one request: hello, deltas, then Finish or StreamError.

        ``sent_at`` is the ingress's ``time.time()`` when it dispatched the request:
        the wait in Ray Serve's router (all replicas at ``max_ongoing_requests``)
        is part of the queue wait, which the engine's own queue wait completes."""
        started_at = time.time()
        routed_wait = max(0.0, started_at - sent_at)
        yield ReplicaHello(self.replica_id, started_at)
        self._in_flight += 1
        self._publish_gauges()
        try:
            async with aclosing(self._guarded(request, directive, routed_wait)) as items:
                async for item in items:
                    yield item
        finally:
            self._in_flight -= 1
            self._publish_gauges()

    async def _guarded(self, request: GenerationRequest, directive: Directive, routed_wait: float) -> AsyncIterator[Any]:
        try:
            if directive.oom:
                raise EngineOOMError("injected out-of-memory (fault drill)", source="simulated")
            last = time.monotonic()
            tokens = 0
            first_token_at: float | None = None
            # aclosing: a cancelled request closes the engine's generator now, which frees its slot
            async with aclosing(self.engine.generate(request)) as stream:
                async for item in stream:
                    if directive.slowdown > 1:
                        await asyncio.sleep((directive.slowdown - 1) * (time.monotonic() - last))
                    if isinstance(item, Finish):
                        self.metrics.queue_wait.observe(routed_wait + item.queue_wait_s, self.metrics.tags)
                        yield ReplicaTiming(first_token_at, item.queue_wait_s)
                    elif first_token_at is None:
                        first_token_at = time.time()
                    yield item
                    if directive.error and isinstance(item, Delta):
                        raise EngineError("injected engine error (fault drill)")
                    tokens += isinstance(item, Delta)
                    if directive.stall_s and tokens == STALL_AFTER_TOKENS:
                        time.sleep(directive.stall_s)  # the drill: a CPU-starved replica, nothing else runs
                    last = time.monotonic()  # slowdown stretches the engine's time to the next item only
        except asyncio.CancelledError:
            raise
        except Exception as exc:  # every engine failure becomes a StreamError, never a dead replica
            kind, source = _classify(exc)
            if source is not None:
                self.metrics.oom.inc(1, {**self.metrics.tags, "source": source})
            log.warning("generation_failed", request_id=request.request_id, replica=self.replica_id,
                        kind=kind, error=type(exc).__name__, message=str(exc))
            yield StreamError(kind, str(exc) if kind != "engine" or isinstance(exc, EngineError) else "internal engine error")

    async def ready(self) -> str:
        """Readiness for /healthz: this replica's id, or the engine's EngineUnavailableError."""
        check_ready = getattr(self.engine, "check_ready", None)
        if check_ready is not None:
            await check_ready()
        return self.replica_id

    async def check_health(self) -> None:
        """Called by Ray Serve; raising makes Serve replace the replica."""
        try:
            await self.engine.check_health()
        except BaseException:
            self._healthy = False
            raise
        self._healthy = True

    async def __del__(self) -> None:
        """Serve calls this when it stops the replica: the engine releases its GPUs and child processes.
        A healthy replica first leaves its goodbye, so the node's crash witness does not count it."""
        if getattr(self, "_healthy", False) and self._ledger is not None:
            me = psutil.Process()
            self._ledger.goodbye((me.pid, me.create_time()))
        shutdown = getattr(getattr(self, "engine", None), "shutdown", None)  # absent if __init__ failed early
        if shutdown is not None:
            await shutdown()

    async def kill(self) -> str:
        """Crash drill: exit the process shortly after answering (no cleanup, like a segfault)."""
        log.warning("replica_kill_requested", replica=self.replica_id)
        asyncio.get_running_loop().call_later(0.2, os._exit, 1)
        return self.replica_id

    def _publish_gauges(self) -> None:
        self.metrics.in_flight.set(self._in_flight, self.metrics.tags)
        self.metrics.kv_cache.set(self.engine.stats().kv_cache_usage, self.metrics.tags)
        self.metrics.build_info.set(1, self._build_tags)
        self.metrics.replica_startup.set(self.startup_s, self.metrics.tags)

    async def _refresh_gauges(self) -> None:
        while True:
            await asyncio.sleep(GAUGE_REFRESH_S)
            self._publish_gauges()
