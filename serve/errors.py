"""OpenAI-shaped API errors: ``{"error": {"message", "type", "param", "code"}}``.

Raised anywhere in the request path; the ingress turns an :class:`APIError` into
a JSON response (or, once a stream has started, an SSE error event), so no bad
input reaches the engine and none becomes a 500.
"""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel


class APIError(Exception):
    """An error answered to the client with ``status`` and OpenAI's error body."""

    def __init__(
        self,
        status: int,
        message: str,
        *,
        type: str = "invalid_request_error",
        param: str | None = None,
        code: str | None = None,
    ) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.type = type
        self.param = param
        self.code = code

    def body(self) -> dict[str, Any]:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}


class ErrorDetail(BaseModel):
    message: str
    type: str
    param: str | None
    code: str | None


class ErrorResponse(BaseModel):
    """Every error answer's body (published in the OpenAPI schema)."""

    error: ErrorDetail


def invalid(message: str, param: str | None = None, code: str = "invalid_value") -> APIError:
    """A 400 for a request that can never succeed as sent."""
    return APIError(400, message, param=param, code=code)


def server_error(message: str, code: str, status: int = 500) -> APIError:
    """A 5xx whose cause is on our side (engine failure, OOM, overload)."""
    return APIError(status, message, type="server_error", code=code)
