"""OpenAI-style JSON errors: ``{"error": {"message", "type", "param", "code"}}``, one line each, never a traceback."""

from __future__ import annotations

import logging

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

logger = logging.getLogger(__name__)

# loc entries pydantic adds for the member of a union it tried; they are not field names
_TYPE_TAGS = {"str", "int", "float", "bool", "list[str]", "list[int]", "list[list[int]]", "list[TextPart]"}


class APIError(Exception):
    """An error answered as OpenAI's JSON error body.

    Args:
        status: HTTP status (400 bad input, 404 unknown model, 503 full queue, ...).
        message: one line saying what was wrong and with which value.
        param: the request field at fault, if one is.
        type: OpenAI's error type (``invalid_request_error``, ``server_error``, ...).
        code: a short machine-readable code (``model_not_found``, ``context_length_exceeded``, ...).
        headers: extra response headers (``Retry-After``).
    """

    def __init__(self, status: int, message: str, param: str | None = None, type: str = "invalid_request_error",
                 code: str | None = None, headers: dict[str, str] | None = None):
        super().__init__(message)
        self.status, self.message, self.param, self.type, self.code, self.headers = status, message, param, type, code, headers

    def body(self) -> dict:
        return error_body(self.message, self.type, self.param, self.code)


def error_body(message: str, type: str = "invalid_request_error", param: str | None = None, code: str | None = None) -> dict:
    """OpenAI's error object."""
    return {"error": {"message": message, "type": type, "param": param, "code": code}}


def validation_error(exc: RequestValidationError) -> APIError:
    """The first pydantic error of a request body as a 400 naming the field (or saying the JSON is malformed)."""
    errors = exc.errors()
    first = errors[0] if errors else {"type": "", "loc": (), "msg": "invalid request"}
    loc = [str(part) for part in first.get("loc", ()) if part != "body"]
    if first["type"] == "json_invalid":
        detail = (first.get("ctx") or {}).get("error", "")
        return APIError(400, f"request body is not valid JSON ({detail} at byte {loc[0] if loc else '?'})", code="invalid_json")
    field = ".".join(part for part in loc if part not in _TYPE_TAGS and not part.startswith(("function-", "literal[")))
    param = loc[0] if loc else None
    members = [str(e["loc"][2]) for e in errors if len(e["loc"]) > 2 and e["loc"][:2] == ("body", param)
               and str(e["loc"][2]) in _TYPE_TAGS]
    if len(set(members)) > 1:  # a union field: say which forms it takes
        forms = ", ".join(dict.fromkeys(members))
        return APIError(400, f"invalid value for '{param}': expected one of {forms} (got {first.get('input')!r:.60})",
                        param=param, code="invalid_value")
    if first["type"] == "extra_forbidden":
        message = f"unknown or unsupported field '{field}'"
    elif first["type"] == "missing":
        message = f"missing required field '{field}'"
    elif not field:
        message = f"request body: {first['msg']}"
    else:
        message = f"invalid value for '{field}': {first['msg']} (got {first.get('input')!r:.60})"
    return APIError(400, message, param=param, code="invalid_value")


def install_error_handlers(app: FastAPI) -> None:
    """Answer every error of ``app`` as OpenAI's JSON error body."""

    @app.exception_handler(APIError)
    async def api_error(request: Request, exc: APIError):
        return JSONResponse(exc.body(), status_code=exc.status, headers=exc.headers)

    @app.exception_handler(RequestValidationError)
    async def invalid_request(request: Request, exc: RequestValidationError):
        err = validation_error(exc)
        return JSONResponse(err.body(), status_code=err.status)

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, exc: StarletteHTTPException):
        kind = "not_found_error" if exc.status_code == 404 else "invalid_request_error"
        message = f"{request.method} {request.url.path}: {exc.detail}"
        return JSONResponse(error_body(message, kind), status_code=exc.status_code, headers=getattr(exc, "headers", None))

    @app.exception_handler(Exception)
    async def server_error(request: Request, exc: Exception):
        logger.error("%s %s failed: %s: %s", request.method, request.url.path, type(exc).__name__, exc)
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
        return JSONResponse(error_body(f"internal error: {type(exc).__name__}: {first}", "server_error"), status_code=500)
