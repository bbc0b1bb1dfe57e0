"""Errors → HTTP in one place. Body: ``{"error": {"code", "message", "param", "type"}}`` (OpenAI's shape)."""

from __future__ import annotations

from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from core.errors import BudgetExceeded, CoreError, DatasetFormatError, InvalidSpec


class ApiError(Exception):
    """An error with its HTTP status, stable code and offending parameter."""

    def __init__(self, status: int, code: str, message: str, *, param: str | None = None,
                 type_: str = "invalid_request_error", extra: dict[str, Any] | None = None) -> None:
        super().__init__(message)
        self.status, self.code, self.message = status, code, message
        self.param, self.type, self.extra = param, type_, extra


def not_found(kind: str, ident: str, *, param: str | None = None) -> ApiError:
    return ApiError(404, f"{kind}_not_found", f"No {kind} with id {ident!r}", param=param)


def body(code: str, message: str, param: str | None, type_: str, extra: dict[str, Any] | None = None) -> dict:
    err: dict[str, Any] = {"code": code, "message": message, "param": param, "type": type_}
    err.update(extra or {})
    return {"error": err}


def _loc(loc: tuple[Any, ...]) -> str | None:
    parts = [str(p) for p in loc if p not in ("body", "query", "path", "form", "header")]
    return ".".join(parts) or None


def install(app: FastAPI) -> None:
    @app.exception_handler(ApiError)
    async def _api(_r: Request, exc: ApiError) -> JSONResponse:
        return JSONResponse(body(exc.code, exc.message, exc.param, exc.type, exc.extra), status_code=exc.status)

    @app.exception_handler(RequestValidationError)
    async def _validation(_r: Request, exc: RequestValidationError) -> JSONResponse:
        errors = exc.errors()
        first = errors[0] if errors else {"loc": (), "msg": "invalid request", "type": ""}
        if first.get("type") == "json_invalid":
            return JSONResponse(body("invalid_json", f"Request body is not valid JSON: {first.get('msg')}", None,
                                     "invalid_request_error"), status_code=400)
        param = _loc(tuple(first.get("loc", ())))
        msg = "; ".join(f"{_loc(tuple(e.get('loc', ()))) or 'body'}: {e.get('msg')}" for e in errors[:10])
        code = "missing_required_parameter" if first.get("type") == "missing" else "invalid_request"
        return JSONResponse(body(code, msg, param, "invalid_request_error"), status_code=422)

    @app.exception_handler(DatasetFormatError)
    async def _dataset(_r: Request, exc: DatasetFormatError) -> JSONResponse:
        issues = [{"line": i.line, "field": i.field, "message": i.message} for i in exc.issues]
        return JSONResponse(body(exc.code, exc.message, exc.param or "file", "invalid_request_error",
                                 {"issues": issues}), status_code=400)

    @app.exception_handler(BudgetExceeded)
    async def _budget(_r: Request, exc: BudgetExceeded) -> JSONResponse:
        return JSONResponse(body(exc.code, exc.message, exc.param, "budget_error",
                                 {"ledger": getattr(exc, "detail", None)}), status_code=409)

    @app.exception_handler(InvalidSpec)
    async def _spec(_r: Request, exc: InvalidSpec) -> JSONResponse:
        return JSONResponse(body(exc.code, exc.message, exc.param, "invalid_request_error"), status_code=422)

    @app.exception_handler(CoreError)
    async def _core(_r: Request, exc: CoreError) -> JSONResponse:
        return JSONResponse(body(exc.code, exc.message, exc.param, "invalid_request_error"), status_code=400)

    @app.exception_handler(StarletteHTTPException)
    async def _http(_r: Request, exc: StarletteHTTPException) -> JSONResponse:
        code = {404: "not_found", 405: "method_not_allowed", 401: "invalid_api_key"}.get(exc.status_code, "http_error")
        return JSONResponse(body(code, str(exc.detail), None, "invalid_request_error"), status_code=exc.status_code)
