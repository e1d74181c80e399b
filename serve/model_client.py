"""How the ingress reaches a model replica: through Ray (split) or in its own process (colocated).

The ingress needs four things of a model replica: a stream of one request's items,
readiness, the crash drill and, when it owns the replica, health and shutdown.
:class:`HandleClient` sends them through a Ray Serve ``DeploymentHandle`` to the model
deployment (Ray's router picks the replica; every token crosses a process). Colocated
(``llmslo serve --colocate``), :class:`LocalClient` runs one :class:`ModelServer` in the
ingress replica itself: each replica of the one deployment answers HTTP and generates,
so a token goes from the engine to the socket without leaving the process
(docs/serve.md#colocated-replicas says what that saves and what it changes).
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from typing import Any, Protocol

from ray.serve.handle import DeploymentHandle

from serve.engines.base import GenerationRequest
from serve.faults import Directive
from serve.model import ModelServer


class ModelStream(Protocol):
    """One request's items (ReplicaHello, deltas, ReplicaTiming, Finish or StreamError)."""

    def __aiter__(self) -> AsyncIterator[Any]: ...

    def cancel(self) -> None:
        """The client left: stop generating (frees the engine slot)."""


class ModelClient(Protocol):
    local_replica: str | None
    """The replica id when the model lives in this process (colocated), else None."""

    def stream(self, request: GenerationRequest, directive: Directive, sent_at: float) -> ModelStream: ...

    async def ready(self) -> str: ...

    async def kill(self) -> str: ...

    async def check_health(self) -> None: ...

    async def shutdown(self) -> None: ...


class HandleClient:
    """Model replicas of their own deployment, through Ray Serve's router."""

    local_replica = None

    def __init__(self, handle: DeploymentHandle) -> None:
        self._handle = handle
        self._streaming = handle.options(stream=True)

    def stream(self, request: GenerationRequest, directive: Directive, sent_at: float) -> ModelStream:
        return self._streaming.generate.remote(request, directive, sent_at)

    async def ready(self) -> str:
        return await self._handle.ready.remote()

    async def kill(self) -> str:
        return await self._handle.kill.remote()

    async def check_health(self) -> None:
        """The model deployment's replicas are health-checked by Serve themselves."""

    async def shutdown(self) -> None:
        """Serve stops the model replicas themselves."""


class _LocalStream:
    """A ModelServer.generate generator, iterated by the ingress in the same event loop."""

    def __init__(self, items: AsyncIterator[Any], closing: set[asyncio.Task[None]]) -> None:
        self._items = items
        self._closing = closing

    def __aiter__(self) -> AsyncIterator[Any]:
        return self._items

    def cancel(self) -> None:
        # Reached once nothing iterates the generator any more (the handler's or the body's task
        # was cancelled, or the answer ended): aclose ends a suspended generator, whose cleanup
        # frees the engine slot, and is a no-op on one that already finished.
        task = asyncio.get_running_loop().create_task(self._items.aclose())  # type: ignore[attr-defined]
        self._closing.add(task)  # the loop keeps only a weak reference to a task
        task.add_done_callback(self._closing.discard)


class LocalClient:
    """One model replica living in the ingress replica's process (colocated)."""

    def __init__(self, server: ModelServer) -> None:
        self._server = server
        self.local_replica: str | None = server.replica_id
        self._closing: set[asyncio.Task[None]] = set()

    @classmethod
    async def start(cls, settings: dict[str, Any]) -> LocalClient:
        """Build the engine here, as Serve would build a model replica (its ``__init__`` is async)."""
        server = object.__new__(ModelServer)
        await ModelServer.__init__(server, settings)  # type: ignore[misc]
        return cls(server)

    def stream(self, request: GenerationRequest, directive: Directive, sent_at: float) -> ModelStream:
        return _LocalStream(self._server.generate(request, directive, sent_at), self._closing)

    async def ready(self) -> str:
        return await self._server.ready()

    async def kill(self) -> str:
        return await self._server.kill()

    async def check_health(self) -> None:
        await self._server.check_health()

    async def shutdown(self) -> None:
        await self._server.__del__()
