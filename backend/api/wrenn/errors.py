"""Wrenn's error bodies: ``{"error": {"code": str, "message": str}}``. The SDK picks its
exception class by ``code`` (wrenn/exceptions.py: ``not_found`` -> WrennNotFoundError,
``invalid_state`` / ``conflict`` -> WrennConflictError, ...)."""

from __future__ import annotations

from starlette.responses import JSONResponse

CODES = {
    400: "invalid_request",
    401: "unauthorized",
    403: "forbidden",
    404: "not_found",
    409: "conflict",
    413: "invalid_request",
    415: "invalid_request",
    429: "conflict",
    502: "agent_error",
    503: "host_unavailable",
}


class WrennError(Exception):
    def __init__(self, status: int, message: str, code: str | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.code = code or CODES.get(status, "internal_error")
        self.message = message


def invalid(message: str) -> WrennError:
    return WrennError(400, message)


def not_found(message: str) -> WrennError:
    return WrennError(404, message)


def invalid_state(message: str) -> WrennError:
    return WrennError(409, message, "invalid_state")


def conflict(message: str) -> WrennError:
    return WrennError(409, message)


def agent_error(message: str) -> WrennError:
    """The host side (VMM, envd in the capsule) failed: Wrenn's 502, never a bare 500."""
    return WrennError(502, message)


def error_body(status: int, code: str, message: str) -> dict[str, dict[str, str]]:
    return {"error": {"code": code, "message": message}}


def error_response(exc: WrennError) -> JSONResponse:
    return JSONResponse(error_body(exc.status, exc.code, exc.message), status_code=exc.status)
