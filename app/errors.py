"""OpenAI-shaped errors: ``{"error": {"message", "type", "param", "code"}}`` with OpenAI's status codes."""
from __future__ import annotations

from typing import Any


class APIError(Exception):
    """An error a client caused or must handle; carries its HTTP status and OpenAI error fields."""

    status_code = 500
    type = "internal_error"

    def __init__(self, message: str, *, param: str | None = None, code: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.param = param
        self.code = code

    def to_dict(self) -> dict[str, Any]:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}

    def __reduce__(self):  # keeps param/code (and a subclass's extra fields) when crossing Ray process boundaries
        return (_rebuild, (type(self), self.message, self.param, self.code, self._extra()))

    def _extra(self) -> dict[str, Any]:
        return {}


def _rebuild(cls: type[APIError], message: str, param: str | None, code: str | None,
             extra: dict[str, Any] | None = None) -> APIError:
    return cls(message, param=param, code=code, **(extra or {}))


class InvalidRequest(APIError):
    status_code = 400
    type = "invalid_request_error"


class Unauthorized(APIError):
    status_code = 401
    type = "invalid_request_error"


class Forbidden(APIError):
    status_code = 403
    type = "permission_error"


class NotFound(APIError):
    status_code = 404
    type = "invalid_request_error"


class PayloadTooLarge(APIError):
    status_code = 413
    type = "invalid_request_error"


class RequestTimeout(APIError):
    """The end-to-end deadline passed (408, as Serve's own proxy timeout answers)."""

    status_code = 408
    type = "timeout"


class RateLimited(APIError):
    """The tenant's request budget is spent; ``retry_after_s`` says when one request is allowed again."""

    status_code = 429
    type = "requests"  # what OpenAI's request-rate 429 says

    def __init__(self, message: str, *, retry_after_s: float = 1.0, headers: dict[str, str] | None = None,
                 type_: str | None = None, **kwargs) -> None:
        super().__init__(message, **kwargs)
        self.retry_after_s = retry_after_s
        self.headers = headers or {}  # the bucket's x-ratelimit-* headers, when a rate limit said no
        if type_ is not None:  # 'tokens' (token rate) or 'insufficient_quota' (monthly quota), as OpenAI says
            self.type = type_

    def _extra(self) -> dict[str, Any]:
        return {"retry_after_s": self.retry_after_s, "headers": self.headers, "type_": self.type}


class ServiceUnavailable(APIError):
    status_code = 503
    type = "service_unavailable"


def unwrap(exc: BaseException) -> BaseException:
    """Returns the original exception inside a Ray task error (``RayTaskError.cause``)."""
    seen = 0
    while hasattr(exc, "cause") and isinstance(exc.cause, BaseException) and seen < 8:
        exc = exc.cause
        seen += 1
    return exc
