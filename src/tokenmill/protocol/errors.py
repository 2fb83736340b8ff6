"""API errors in OpenAI's shape: ``{"error": {"message", "type", "param", "code"}}`` and a status.

The same object serves HTTP (status and body) and gRPC (mapped to a status code),
so both fronts report a bad request the same way.
"""

from __future__ import annotations

from typing import Any


class APIError(Exception):
    """An error to return to the caller, with the HTTP status and OpenAI error fields."""

    def __init__(
        self,
        status: int,
        message: str,
        type: str,
        param: str | None = None,
        code: str | None = None,
        retry_after: float | None = None,
    ):
        super().__init__(message)
        self.status = status
        self.message = message
        self.type = type
        self.param = param
        self.code = code
        self.retry_after = retry_after  # seconds; sent as Retry-After on 429 and 503

    def to_body(self) -> dict[str, Any]:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}

    def headers(self) -> dict[str, str]:
        if self.retry_after is None:
            return {}
        return {"retry-after": str(max(1, round(self.retry_after)))}

    @classmethod
    def from_body(cls, status: int, body: Any) -> APIError:
        """Rebuild an error from a response (for clients); tolerant of bodies that are not OpenAI's."""
        err = body.get("error") if isinstance(body, dict) else None
        if not isinstance(err, dict):
            return cls(status, str(body)[:500] or f"HTTP {status}", "api_error")
        return cls(
            status,
            str(err.get("message", "")),
            str(err.get("type", "api_error")),
            err.get("param"),
            err.get("code"),
        )

    # The kinds a server raises; the type and code strings are OpenAI's where it has one.

    @classmethod
    def invalid_request(cls, message: str, param: str | None = None, code: str | None = None) -> APIError:
        return cls(400, message, "invalid_request_error", param, code)

    @classmethod
    def authentication(cls, message: str = "invalid API key") -> APIError:
        return cls(401, message, "authentication_error", None, "invalid_api_key")

    @classmethod
    def model_not_found(cls, model: str, available: list[str]) -> APIError:
        return cls(
            404,
            f"model {model!r} does not exist: this worker serves {', '.join(map(repr, available))}",
            "invalid_request_error",
            "model",
            "model_not_found",
        )

    @classmethod
    def not_found(cls, message: str) -> APIError:
        return cls(404, message, "invalid_request_error", None, "not_found")

    @classmethod
    def overloaded(cls, message: str, retry_after: float) -> APIError:
        return cls(429, message, "rate_limit_error", None, "engine_overloaded", retry_after)

    @classmethod
    def unavailable(cls, message: str, retry_after: float | None = None) -> APIError:
        return cls(503, message, "service_unavailable", None, "unavailable", retry_after)

    @classmethod
    def internal(cls, message: str) -> APIError:
        return cls(500, message, "internal_error", None, "internal_error")
