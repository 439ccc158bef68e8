"""The one error tree: each class knows its HTTP status and OpenAI `type`/`code`; rendered in OpenAI's shape."""

from __future__ import annotations

import math

import msgspec

__all__ = [
    "AuthenticationError",
    "BadRequest",
    "BudgetExceeded",
    "EngineOverloaded",
    "GatewayError",
    "HTTP_ERROR_CODES",
    "INTERNAL_ERROR_BODY",
    "INTERNAL_FAILURE",
    "InsufficientMemory",
    "ModelNotFound",
    "NotFound",
    "PermissionDenied",
    "RateLimited",
    "ServiceUnavailable",
    "UnsupportedParameter",
    "UpstreamError",
    "UpstreamInvalidResponse",
    "UpstreamStatusError",
    "UpstreamTimeout",
    "UpstreamUnavailable",
    "error_body",
    "http_error_body",
]


class GatewayError(Exception):
    status: int = 500
    type: str = "api_error"
    code: str | None = None
    # response headers that go with this error (an upstream's Retry-After, a rate limit's reset); set per instance
    headers: dict[str, str] = {}  # noqa: RUF012 - never mutated, only replaced

    def __init__(self, message: str, *, param: str | None = None, code: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.param = param
        if code is not None:
            self.code = code

    def payload(self) -> dict:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}

    def body(self) -> bytes:
        return msgspec.json.encode(self.payload())


class BadRequest(GatewayError):
    status = 400
    type = "invalid_request_error"


class UnsupportedParameter(BadRequest):
    code = "unsupported_parameter"


class AuthenticationError(GatewayError):
    status = 401
    type = "invalid_request_error"
    code = "invalid_api_key"


class PermissionDenied(GatewayError):
    """A valid key whose role or allowed models do not cover what it asked for."""

    status = 403
    type = "invalid_request_error"
    code = "permission_denied"


class NotFound(GatewayError):
    status = 404
    type = "invalid_request_error"
    code = "not_found"


class ModelNotFound(NotFound):
    code = "model_not_found"


class ServiceUnavailable(GatewayError):
    status = 503
    type = "api_error"
    code = "service_unavailable"


class UpstreamError(GatewayError):
    """Something went wrong talking to an upstream; retryable subclasses may move to another deployment."""

    status = 502
    type = "api_error"
    retryable = True


class UpstreamUnavailable(UpstreamError):
    code = "upstream_unavailable"


class UpstreamTimeout(UpstreamError):
    status = 504
    code = "upstream_timeout"


class UpstreamStatusError(UpstreamError):
    """An upstream answered with an HTTP error: relayed with its own status and, when OpenAI-shaped, its body.

    `headers`: the upstream's headers worth relaying to the client (Retry-After, x-ratelimit-*), lowercase.
    """

    def __init__(self, status: int, body: bytes, *, headers: dict[str, str] | None = None) -> None:
        # a 4xx or 5xx is relayed as it is; any other status (a 3xx redirect, or 600-999, which no client or HTTP
        # server of ours takes) is no answer a client can be given: 502, and another deployment may serve it
        relayed = 400 <= status <= 599
        self.status = status if relayed else 502
        self.headers = headers if headers is not None else {}
        self.retryable = status >= 500 or status == 429 or not relayed
        try:
            decoded = msgspec.json.decode(body)
        except (msgspec.DecodeError, RecursionError):  # RecursionError: nested too deeply to decode
            decoded = None
        err = decoded.get("error") if isinstance(decoded, dict) else None
        self._relay = body if isinstance(err, dict) else None
        if isinstance(err, dict):
            code = err.get("code")  # vLLM's is the status, an int: a usage row's error_code is text
            super().__init__(str(err.get("message", "")), param=err.get("param"),
                             code=None if code is None else str(code))
            self.type = str(err.get("type") or "api_error")
        else:
            text = body[:500].decode("utf-8", "replace").strip()
            if not relayed:
                text = f"upstream answered HTTP {status}" + (f": {text}" if text else "")
            super().__init__(f"upstream error: {text or f'upstream answered HTTP {status}'}", code="upstream_error")
            self.type = "invalid_request_error" if self.status < 500 else "api_error"

    def body(self) -> bytes:
        return self._relay if self._relay is not None else super().body()


def error_body(message: str, type_: str, code: str | None = None, param: str | None = None) -> bytes:
    return msgspec.json.encode({"error": {"message": message, "type": type_, "param": param, "code": code}})


# what a client is told of a failure inside the gateway itself (its details go to the log, never to the client)
INTERNAL_FAILURE = "The gateway failed to process the request."
INTERNAL_ERROR_BODY = error_body(INTERNAL_FAILURE, "api_error", "internal_error")
# the `code` of an error the web framework raised (no route, a body over server.max_body_mb, ...), by status
HTTP_ERROR_CODES = {404: "not_found", 405: "method_not_allowed", 413: "request_too_large", 401: "invalid_api_key"}


def http_error_body(status: int, message: str, param: str | None = None) -> bytes:
    """OpenAI's error object for an HTTP error the framework raised rather than the gateway."""
    return error_body(message, "invalid_request_error" if status < 500 else "api_error", HTTP_ERROR_CODES.get(status),
                      param)


class UpstreamInvalidResponse(UpstreamError):
    """An upstream answered 2xx with a body that is not a JSON object (a captive portal, a truncated proxy reply)."""

    code = "upstream_invalid_response"


class RateLimited(GatewayError):
    """Over a rate limit: 429 with `retry-after` and OpenAI's x-ratelimit-* headers. `type` is "requests", or
    "tokens" per instance when a tokens-per-minute limit refused (as OpenAI sends it)."""

    status = 429
    type = "requests"
    code = "rate_limit_exceeded"


class BudgetExceeded(GatewayError):
    """A budget (tokens or USD per period) cannot cover the request's worst case: 429 with `retry-after` until
    the period ends (none for a `total` budget, which never resets)."""

    status = 429
    type = "insufficient_quota"
    code = "budget_exceeded"


class EngineOverloaded(GatewayError):
    """A local engine's running batch and its queue are both full: 429 with `retry-after`, nothing was started."""

    status = 429
    type = "api_error"
    code = "engine_overloaded"

    def __init__(self, message: str, *, retry_after_s: float = 1.0) -> None:
        super().__init__(message)
        self.headers = {"retry-after": str(max(1, math.ceil(retry_after_s)))}


class InsufficientMemory(UpstreamError):
    """A local model cannot be loaded within `engines.memory_budget_gb`: 503, and a fallback chain moves on."""

    status = 503
    code = "insufficient_memory"
