"""The HTTP ingress deployment: OpenAI-compatible API in front of the model replicas.

(No ``from __future__ import annotations`` here: FastAPI must see real types in
the route signatures that Serve re-wraps.)

Validates requests (schema, media, context budget) before any replica work,
streams tokens from a model replica (serve.model_client: through a DeploymentHandle,
or colocated in this process), writes OpenAI's wire format, measures every
request (serve.observe) and hosts the token-protected fault-injection admin API.

Status of a stream is decided before the first byte: the ingress waits for the
first token, so failures at admission (OOM, overload, dead replica) are proper
HTTP errors; failures after it are an SSE error event followed by ``[DONE]``.
"""


import asyncio
import time
import uuid
from collections.abc import AsyncIterator, Callable
from typing import Any

import structlog
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.openapi.utils import get_openapi
from fastapi.responses import JSONResponse, Response, StreamingResponse
from pydantic import ValidationError
from ray import serve
from ray.exceptions import ActorUnavailableError, RayActorError
from ray.serve.handle import DeploymentHandle
from starlette.exceptions import HTTPException as StarletteHTTPException

from contract.slo import load_slo
from serve.access import RateLimited, RateLimiter, check_bearer, read_body
from serve.engines.base import Delta, EngineUnavailableError, Finish
from serve.errors import APIError, ErrorResponse, invalid, server_error
from serve.faults import FaultSpec, FaultState
from serve.logs import configure_logging
from serve.metrics import ServerMetrics
from serve.model import ReplicaHello, ReplicaTiming, StreamError
from serve.model_client import HandleClient, LocalClient, ModelClient, ModelStream
from serve.observe import MODALITY_CLASSES, RequestRecord
from serve.openai_format import DONE, ChunkWriter, completion, delta_fields
from serve.schema import ChatCompletionRequest, Prepared, parse_body, prepare, validation_error
from serve.settings import AppSettings
from serve.telemetry import start_telemetry

log = structlog.get_logger("llmslo.ingress")
HEALTH_TIMEOUT_S = 5.0

app = FastAPI(title="llmslo model service", docs_url=None, redoc_url=None)

_STREAM_ERRORS = {
    "oom": (500, "out_of_memory"),
    "overloaded": (503, "overloaded"),
    "unavailable": (503, "upstream_unavailable"),
    "engine": (500, "engine_error"),
}
_ERRORS = {code: {"model": ErrorResponse} for code in (400, 401, 404, 408, 413, 429, 500, 503)}
_CHAT_BODY = {
    "requestBody": {
        "required": True,
        "content": {"application/json": {"schema": {"$ref": "#/components/schemas/ChatCompletionRequest"}}},
    }
}


def _openapi() -> dict[str, Any]:
    """FastAPI's schema plus the chat request model (the route reads the raw body itself,
    so that every validation failure is answered in OpenAI's error shape)."""
    if app.openapi_schema is None:
        schema = get_openapi(title=app.title, version=app.version, routes=app.routes)
        request = ChatCompletionRequest.model_json_schema(ref_template="#/components/schemas/{model}")
        components = schema.setdefault("components", {}).setdefault("schemas", {})
        components.update(request.pop("$defs", {}))
        components["ChatCompletionRequest"] = request
        app.openapi_schema = schema
    return app.openapi_schema


app.openapi = _openapi  # type: ignore[method-assign]


def error_response(err: APIError) -> JSONResponse:
    headers = {"retry-after": str(err.retry_after)} if isinstance(err, RateLimited) else None
    return JSONResponse(err.body(), status_code=err.status, headers=headers)


def _abandon(stream: ModelStream, rec: RequestRecord) -> None:
    """The client left before the answer ended: cancel generation (frees the engine slot)."""
    if not rec.closed:
        stream.cancel()
        rec.close(499)


class _CleanupStreamingResponse(StreamingResponse):
    """Runs ``on_close`` however the response ends, even if the body was never started
    (a client gone before the first byte would otherwise leave the generation running)."""

    def __init__(self, content: AsyncIterator[bytes], on_close: Callable[[], None], **kwargs: Any) -> None:
        super().__init__(content, **kwargs)
        self._on_close = on_close

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            self._on_close()


@app.exception_handler(APIError)
async def _api_error(_: Request, exc: APIError) -> JSONResponse:
    return error_response(exc)


@app.exception_handler(StarletteHTTPException)
async def _http_error(_: Request, exc: StarletteHTTPException) -> JSONResponse:
    code = {404: "not_found", 405: "method_not_allowed"}.get(exc.status_code)
    return error_response(APIError(exc.status_code, str(exc.detail), code=code))


@app.exception_handler(RequestValidationError)
async def _validation_error(_: Request, exc: RequestValidationError) -> JSONResponse:
    """FastAPI answers schema errors with 422; OpenAI clients expect 400 and its error body."""
    first = exc.errors()[0]
    param = ".".join(str(p) for p in first["loc"][1:]) or None
    return error_response(invalid(f"{param}: {first['msg']}" if param else first["msg"], param))


@app.exception_handler(Exception)
async def _unexpected(_: Request, exc: Exception) -> JSONResponse:
    log.exception("unhandled_error", error=type(exc).__name__)
    return error_response(server_error("internal server error", "internal_error"))


@serve.ingress(app)
class Ingress:
    """API front door: one replica in front of the model deployment (it only validates and
    relays), or, colocated (``model`` None), one per model replica, each holding its engine."""

    async def __init__(self, model: DeploymentHandle | None, settings: dict[str, Any]) -> None:
        configure_logging()
        self.settings = AppSettings.model_validate(settings)
        self.model_name = self.settings.served_model
        self.model: ModelClient = HandleClient(model) if model is not None else await LocalClient.start(settings)
        self.metrics = ServerMetrics(self.model_name)
        self.slo = load_slo(self.settings.slo_path)
        self.faults = FaultState()
        self.limiter = RateLimiter(self.settings.rate_limit_per_s, self.settings.rate_burst)
        self.created = int(time.time())
        start_telemetry(self.model_name, "ingress")

    # ---- public API -------------------------------------------------------

    @app.get("/healthz")
    async def healthz(self) -> JSONResponse:
        """200 once a model replica answers and its engine can serve (an upstream engine's
        server is reachable), else 503 with the reason."""
        try:
            await asyncio.wait_for(self._ready(), HEALTH_TIMEOUT_S)
        except EngineUnavailableError:
            return JSONResponse({"status": "unavailable", "reason": "upstream inference server unreachable"}, 503)
        except Exception:  # noqa: BLE001 - any failure means "not ready"
            return JSONResponse({"status": "unavailable", "reason": "no model replica answered"}, status_code=503)
        return JSONResponse({"status": "ok"})

    @app.get("/v1/models", responses=_ERRORS)
    async def models(self, request: Request) -> dict[str, Any]:
        self._admit(request)
        return {
            "object": "list",
            "data": [{"id": self.model_name, "object": "model", "created": self.created, "owned_by": "llmslo"}],
        }

    @app.post("/v1/chat/completions", responses=_ERRORS, openapi_extra=_CHAT_BODY)
    async def chat_completions(self, request: Request) -> Response:
        request_id = f"chatcmpl-{uuid.uuid4().hex}"
        rec = RequestRecord(self.metrics, request_id)
        try:
            self._admit(request)
            body = await read_body(request, self.settings.max_body_bytes, self.settings.body_timeout_s)
            prepared = await prepare(parse_body(body), self.settings, request_id)
        except APIError as err:
            rec.close(err.status, err.code)
            return error_response(err)
        rec.stream, rec.modality = prepared.stream, prepared.modality
        rec.prompt_tokens = prepared.generation.prompt_tokens
        rec.ttft_budget_s = self.slo.request_budget_s("ttft", MODALITY_CLASSES[rec.modality], rec.prompt_tokens)
        for kind, count in (("image", prepared.images), ("audio", prepared.audios)):
            if count:
                self.metrics.multimodal.inc(count, {**self.metrics.tags, "kind": kind})
        rec.dispatched = time.monotonic()
        stream = self.model.stream(prepared.generation, self.faults.next_directive(), time.time())
        items = self._items(stream, rec)
        try:  # a stream's status is decided at its first token; a plain answer's at its end
            first = await self._next(items)
            if not prepared.stream:
                content, reasoning, finish = await self._collect(first, items)
        except APIError as err:
            rec.close(err.status, err.code)
            return error_response(err)
        except asyncio.CancelledError:
            _abandon(stream, rec)
            raise
        headers = {"x-llmslo-replica": rec.replica or ""}
        if prepared.stream:
            return _CleanupStreamingResponse(
                self._sse(prepared, rec, first, items),
                on_close=lambda: _abandon(stream, rec),
                media_type="text/event-stream",
                headers={**headers, "cache-control": "no-cache", "x-accel-buffering": "no"},
            )
        shown = reasoning if prepared.generation.thinking and prepared.return_reasoning else None
        rec.mark_first_byte()  # a plain answer's first byte is its whole body
        body = completion(rec.request_id, self.model_name, content, shown, finish, rec.timing())
        rec.close(200)
        return JSONResponse(body, headers=headers)

    # ---- admin / fault injection -------------------------------------------

    @app.get("/admin/faults", include_in_schema=False)
    async def get_faults(self, request: Request) -> JSONResponse:
        self._authorize(request)
        return JSONResponse(self._fault_state())

    @app.delete("/admin/faults", include_in_schema=False)
    async def clear_faults(self, request: Request) -> JSONResponse:
        self._authorize(request)
        self.faults.clear()
        return JSONResponse(self._fault_state())

    @app.post("/admin/faults", include_in_schema=False)
    async def set_faults(self, request: Request) -> JSONResponse:
        self._authorize(request)
        try:
            spec = FaultSpec.model_validate_json(await request.body())
        except ValidationError as exc:
            raise validation_error(exc) from None
        self.faults.apply(spec)
        answer = self._fault_state()
        if spec.kill:
            replica = await self.model.kill()
            self.faults.kills += 1  # the node's crash witness counts the crash (serve/crash_witness.py)
            answer.update(kills=self.faults.kills, killed_replica=replica)
        log.warning("faults_changed", **{k: v for k, v in spec.model_dump().items() if v}, state=self.faults.snapshot())
        return JSONResponse(answer)

    # ---- internals ------------------------------------------------------------

    def _fault_state(self) -> dict[str, Any]:
        """The faults in force; colocated, they hold only in the replica that answers, named here."""
        state: dict[str, Any] = dict(self.faults.snapshot())
        if self.model.local_replica is not None:
            state["replica"] = self.model.local_replica
        return state

    async def _ready(self) -> str:
        return await self.model.ready()

    async def check_health(self) -> None:
        """Called by Ray Serve; a colocated engine's failure makes Serve replace this replica."""
        await self.model.check_health()

    async def __del__(self) -> None:
        """Serve calls this when it stops the replica: a colocated engine releases its GPUs."""
        model = getattr(self, "model", None)  # absent if __init__ failed early
        if model is not None:
            await model.shutdown()

    def _authorize(self, request: Request) -> None:
        token = self.settings.admin
        if not token:
            raise APIError(404, "the admin API is disabled (set admin_token)", code="admin_disabled")
        check_bearer(request, token, "admin")

    def _admit(self, request: Request) -> None:
        """Rate limit, then the API key (when configured) of a /v1 call."""
        self.limiter.check(request)
        if self.settings.api_token:
            check_bearer(request, self.settings.api_token, "API")

    async def _items(self, stream: ModelStream, rec: RequestRecord) -> AsyncIterator[Delta | Finish]:
        """Engine items of one request; a StreamError or a dead replica raises APIError."""
        try:
            async for item in stream:
                if isinstance(item, ReplicaHello):
                    rec.replica, rec.replica_started_unix = item.replica_id, item.started_at
                    continue
                if isinstance(item, ReplicaTiming):
                    rec.engine_first_token_unix, rec.engine_queue_wait_s = item.first_token_at, item.queue_wait_s
                    continue
                if isinstance(item, StreamError) and item.kind == "unsupported":  # the input, not the server
                    raise invalid(item.message, "messages", "unsupported_input")
                if isinstance(item, StreamError):
                    status, code = _STREAM_ERRORS[item.kind]
                    raise server_error(item.message, code, status)
                rec.on_item(item)
                yield item
        except (RayActorError, ActorUnavailableError):
            raise server_error("the model replica serving this request died", "replica_died", 503) from None
        except APIError:
            raise
        except Exception as exc:  # a Ray/Serve failure on the way: answer it, never hang the stream
            log.exception("stream_failed", request_id=rec.request_id, error=type(exc).__name__)
            raise server_error("internal error while streaming from the model", "internal_error") from None

    @staticmethod
    async def _next(items: AsyncIterator[Delta | Finish]) -> Delta | Finish:
        try:
            return await anext(items)
        except StopAsyncIteration:
            raise server_error("the engine stream ended without a finish", "engine_error") from None

    async def _sse(
        self, prepared: Prepared, rec: RequestRecord, item: Delta | Finish, items: AsyncIterator[Delta | Finish]
    ) -> AsyncIterator[bytes]:
        writer = ChunkWriter(rec.request_id, self.model_name, prepared.include_usage)
        yield writer.role()
        try:
            while not isinstance(item, Finish):
                delta = delta_fields(item, prepared.return_reasoning)
                if delta:
                    yield writer.chunk(delta)
                    rec.mark_first_byte()  # resumed: Starlette has passed the chunk on
                item = await self._next(items)
            yield writer.chunk({}, item.reason)
            if prepared.include_usage:
                yield writer.usage_chunk(item, rec.timing())
            rec.close(200)
        except APIError as err:
            rec.close(err.status, err.code)
            yield writer.error(err)
        yield DONE

    async def _collect(self, item: Delta | Finish, items: AsyncIterator[Delta | Finish]) -> tuple[str, str, Finish]:
        """(content, reasoning, Finish) of a non-streamed answer, from its first item on."""
        content: list[str] = []
        reasoning: list[str] = []
        while not isinstance(item, Finish):
            content.append(item.content)
            reasoning.append(item.reasoning)
            item = await self._next(items)
        return "".join(content), "".join(reasoning), item
