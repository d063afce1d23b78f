"""The HTTP side of the nnInteractive remote protocol (`nninteractive-client` 2.x; 3D Slicer's SlicerNNInteractive):
FastAPI over `sambtcv.servers.slicer`'s leases and sessions. slicer_server.py serves it with uvicorn.

======= ============================== ===============================================================================
GET     /healthz                       {"ok": true} (no key needed)
GET     /capabilities                  what works (sambtcv.servers.slicer.CAPABILITIES, the models and their licences)
POST    /claim                         {lease_token, idle_timeout_seconds, liveness_timeout_seconds, max_sessions};
                                         503 + Retry-After when every session is held
POST    /heartbeat, GET /lease_status  {remaining_seconds[, idle_timeout_seconds]}
POST    /release                       {released: true}
POST    /set_image                     NNIA [C, K, J, I] + X-Meta {image_properties: {spacing}} ->
                                         {original_image_shape}; encodes every slice for walks before it answers
POST    /set_target_buffer             {shape, dtype} -> {}
POST    /set_do_autozoom, /reset_interactions -> {}
POST    /add_bbox_interaction          {bbox_coords, include_interaction, run_prediction} -> a prediction reply
POST    /add_point_interaction         {coordinates, include_interaction, run_prediction} -> a prediction reply
POST    /add_scribble_interaction,     NNIA mask + X-Meta {include_interaction, run_prediction, interaction_bbox}
        /add_lasso_interaction           -> a prediction reply
POST    /add_initial_seg_interaction   NNIA segmentation + X-Meta {run_prediction} -> a prediction reply
POST    /undo, /predict                -> a prediction reply
======= ============================== ===============================================================================

A prediction reply: X-Meta {ran_prediction, bbox: [[lo, hi] x 3] half-open or null, dtype, shape} and, with a
bbox, the NNIA array of the target buffer inside it (every voxel changed since the client last heard). With
run_prediction false the interaction is applied and the change waits for the next reply (/predict).

Headers: ``Authorization: Bearer KEY`` (every path but /healthz, when the server has a key: 401 otherwise),
``X-Lease-Token`` (410 for an unknown, released or expired lease). Errors are ``{"detail": "one line"}``: 400 a
malformed body or a value outside the image, 413 too large; the server keeps serving.
"""
from __future__ import annotations

import hmac
from dataclasses import dataclass

from fastapi import FastAPI, Request

from sambtcv.core.errors import PipelineError
from sambtcv.servers import slicer_routes
from sambtcv.servers.http import ErrorStyle, foreign_host, install_errors
from sambtcv.servers.slicer import AtCapacity, Expired, Leases

RETRY_AFTER_S = 10


@dataclass
class SlicerSettings:
    """What slicer_server.py starts the server with."""

    api_key: str = ""  # empty: no key asked (only on a loopback host)
    host: str = "127.0.0.1"  # the address bound: on loopback, requests naming another host are refused
    max_sessions: int = 2
    idle_timeout_s: float = 600.0
    liveness_timeout_s: float = 60.0
    max_image_mb: float = 2048.0


def _status(exc: PipelineError) -> tuple:
    """A lease the server cannot give now: 503 with Retry-After; a lease gone: 410; else 400 (a bad value)."""
    if isinstance(exc, AtCapacity):
        return 503, {"Retry-After": str(RETRY_AFTER_S)}
    return (410 if isinstance(exc, Expired) else 400), None


# nninteractive-client reads FastAPI's "detail"
ERRORS = ErrorStyle("detail", {404: "no such path in the nnInteractive protocol",
                               405: "this path does not take that method"}, _status)


def create_slicer_app(engine, settings: SlicerSettings, leases: Leases | None = None) -> FastAPI:
    """The FastAPI app over `engine` (`sambtcv.engine.interactive.Engine`, loaded by the caller): the routes of
    `sambtcv.servers.slicer_routes`, errors as one line, the host check and the API key."""
    if leases is None:
        leases = Leases(settings.max_sessions, settings.idle_timeout_s, settings.liveness_timeout_s)
    app = FastAPI(title="sam-btcv: nnInteractive remote protocol", docs_url=None, redoc_url=None, openapi_url=None)
    app.state.leases, app.state.engine, app.state.version = leases, engine, _version()
    app.state.image_limit = int(settings.max_image_mb * 2 ** 20)
    install_errors(app, ERRORS)

    @app.middleware("http")
    async def authorize(request: Request, call_next):
        if foreign_host(request, settings.host):  # a page elsewhere rebound onto 127.0.0.1 (DNS rebinding)
            return ERRORS.response(400, f"this server answers only requests for {settings.host}")
        if settings.api_key and request.url.path != "/healthz":
            given = request.headers.get("authorization", "")
            if not given.startswith("Bearer "):
                return ERRORS.response(401, "missing bearer token: set the server's API key in the client")
            if not hmac.compare_digest(given[len("Bearer "):].encode(), settings.api_key.encode()):
                return ERRORS.response(401, "invalid bearer token: the client's API key is not this server's")
        return await call_next(request)

    app.include_router(slicer_routes.router)
    return app


def _version() -> str:
    from sambtcv.study.records import code_version

    return f"sam-btcv {code_version()['version']}"
