"""What the two HTTP servers (the viewer's API, `sambtcv.servers.server`; 3D Slicer's, `sambtcv.servers.slicer_app`)
share: errors as one line in JSON and never a trace (`install_errors`), a server bound to loopback that refuses
requests naming another host (DNS rebinding, `foreign_host`), and request bodies read up to a limit
(`read_body`), and a port checked free before a server loads its models (`check_port`).
"""
from __future__ import annotations

import socket
import sys
import traceback
from dataclasses import dataclass, field
from typing import Callable

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from sambtcv.core.errors import PipelineError

LOOPBACK = ("127.0.0.1", "localhost", "::1")
LINE_LIMIT = 400  # characters of an error's one line


class ApiError(Exception):
    """A request the server refuses: an HTTP status and one line."""

    def __init__(self, status: int, message: str):
        super().__init__(message)
        self.status = status


def one_line(text: str, limit: int = LINE_LIMIT) -> str:
    text = " ".join(str(text).split())
    return text if len(text) <= limit else text[:limit - 3] + "..."


@dataclass(frozen=True)
class ErrorStyle:
    """How a server says its errors: the JSON key of the line (`key`), the lines for an unknown path or
    method (`paths`: status -> text), and the status and headers of the package's errors (`pipeline`)."""

    key: str
    paths: dict
    pipeline: Callable[[PipelineError], tuple] = field(default=lambda exc: (422, None))

    def response(self, status: int, message: str, headers=None) -> JSONResponse:
        return JSONResponse({self.key: one_line(message)}, status_code=status, headers=headers)


def install_errors(app: FastAPI, style: ErrorStyle) -> None:
    """Every error of `app` as one line in `style`: ApiError with its status, PipelineError by `style.pipeline`,
    unknown paths and methods, request validation (422), and anything else as 500 with the trace in the log."""

    @app.exception_handler(ApiError)
    async def _api_error(_req, exc: ApiError):
        return style.response(exc.status, str(exc))

    @app.exception_handler(PipelineError)
    async def _pipeline_error(_req, exc: PipelineError):
        status, headers = style.pipeline(exc)
        return style.response(status, str(exc), headers)

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(_req, exc):
        return style.response(exc.status_code, style.paths.get(exc.status_code, str(exc.detail)))

    @app.exception_handler(RequestValidationError)
    async def _validation_error(_req, exc):
        first = exc.errors()[0] if exc.errors() else {}
        where = ".".join(str(p) for p in first.get("loc", ()) if p not in ("query", "path", "body"))
        return style.response(422, f"{where or 'request'}: {first.get('msg', 'invalid value')}")

    @app.exception_handler(Exception)
    async def _internal(_req, exc):
        traceback.print_exception(exc, file=sys.stderr)
        return style.response(500, f"internal error ({type(exc).__name__}); the server's log has the details")


def foreign_host(request: Request, bound: str) -> bool:
    """A server bound to loopback got a request naming another host (a page on another site rebound onto
    127.0.0.1 by DNS): it must not answer."""
    host = (request.headers.get("host") or "").rsplit(":", 1)[0].strip("[]")
    return bound in LOOPBACK and host not in LOOPBACK


async def read_body(request: Request, max_bytes: int, what: str, setting: str) -> bytes:
    """A request's body, read until `max_bytes` (ApiError 413 beyond it, naming the server's `setting`)."""
    size = request.headers.get("content-length")
    if size is not None and size.isdigit() and int(size) > max_bytes:
        raise ApiError(413, f"{what} is {int(size) / 2**20:.1f} MB, more than this server takes "
                            f"({max_bytes / 2**20:.1f} MB, {setting})")
    chunks, total = [], 0
    async for chunk in request.stream():
        total += len(chunk)
        if total > max_bytes:
            raise ApiError(413, f"{what} is more than this server takes ({max_bytes / 2**20:.1f} MB, {setting})")
        chunks.append(chunk)
    return b"".join(chunks)


def check_port(host: str, port: int) -> None:
    """`port` is free to serve on at `host` (a server's flags, checked before any model loads)."""
    if not 1 <= port <= 65535:
        raise PipelineError(f"--port must be 1..65535, got {port}")
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    try:
        with socket.socket(family, socket.SOCK_STREAM) as probe:
            probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            probe.bind((host, port))
    except OSError as exc:
        raise PipelineError(f"cannot serve on {host}:{port} ({exc.strerror}); is another server running there? "
                            f"give another --port or --host") from None
