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
import json
from dataclasses import dataclass

import numpy as np
from fastapi import FastAPI, Request
from fastapi.responses import Response
from starlette.concurrency import run_in_threadpool

from sambtcv.core.errors import PipelineError
from sambtcv.servers import nnia
from sambtcv.servers.http import ApiError, ErrorStyle, foreign_host, install_errors, read_body
from sambtcv.servers.slicer import CAPABILITIES, AtCapacity, Expired, Leases, SlicerSession

LEASE_HEADER = "X-Lease-Token"
META_HEADER = "X-Meta"
RETRY_AFTER_S = 10
MAX_JSON_BYTES = 64 * 1024
MAX_META_BYTES = 16 * 1024
LICENSES = {"litemedsam": "LiteMedSAM: Apache-2.0 (MedSAM)", "mobilesam": "MobileSAM: Apache-2.0",
            "vit_b": "SAM: Apache-2.0", "vit_l": "SAM: Apache-2.0", "vit_h": "SAM: Apache-2.0"}


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
    """The FastAPI app over `engine` (`sambtcv.engine.interactive.Engine`, loaded by the caller)."""
    if leases is None:
        leases = Leases(settings.max_sessions, settings.idle_timeout_s, settings.liveness_timeout_s)
    app = FastAPI(title="sam-btcv: nnInteractive remote protocol", docs_url=None, redoc_url=None, openapi_url=None)
    app.state.leases = leases
    image_limit = int(settings.max_image_mb * 2 ** 20)
    version = _version()

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

    # ------------------------------------------------------------------ helpers
    def lease_of(request: Request, active: bool = False, touch: bool = True):
        return leases.get(request.headers.get(LEASE_HEADER), active, touch)

    async def json_of(request: Request) -> dict:
        data = await read_body(request, MAX_JSON_BYTES, "the request body", "64 kB for JSON")
        if not data.strip():
            return {}
        try:
            body = json.loads(data)
        except (UnicodeDecodeError, ValueError, RecursionError):
            raise ApiError(400, "the request body is not JSON") from None
        if not isinstance(body, dict):
            raise ApiError(400, "the request body must be a JSON object")
        return body

    def meta_of(request: Request) -> dict:
        text = request.headers.get(META_HEADER, "")
        if not text:
            return {}
        try:
            meta = json.loads(text[:MAX_META_BYTES])
        except (ValueError, RecursionError):
            raise ApiError(400, f"bad {META_HEADER} header: not JSON") from None
        if not isinstance(meta, dict):
            raise ApiError(400, f"bad {META_HEADER} header: not a JSON object")
        return meta

    async def array_of(request: Request, limit: int, what: str) -> np.ndarray:
        data = await read_body(request, limit, what, "--max-image-mb")
        if not data:
            raise ApiError(400, f"{what} is missing (an NNIA array is the body)")
        return await run_in_threadpool(nnia.unpack, data, limit, what)

    def mask_limit(lease) -> int:
        """A mask or segmentation holds at most the image's voxels (8 bytes each, the widest dtype)."""
        return min(image_limit, 8 * int(np.prod(session_of(lease).shape[1:])))

    def flag(body: dict, name: str, default=None) -> bool:
        value = body.get(name, default)
        if not isinstance(value, bool):
            raise ApiError(400, f"{name} must be true or false")
        return value

    def session_of(lease) -> SlicerSession:
        if lease.session is None:
            raise ApiError(400, "no image yet: send it first (set_image)")
        return lease.session

    def prediction(session: SlicerSession, run: bool) -> Response:
        """The reply to an interaction: with `run`, what changed since the client last heard; else nothing yet."""
        reply = session.reply(True) if run else None
        if reply is None or reply.bbox is None:
            return Response(b"", media_type="application/octet-stream",
                            headers={META_HEADER: json.dumps({"ran_prediction": bool(run), "bbox": None})})
        meta = {"ran_prediction": True, "bbox": reply.bbox, "dtype": reply.values.dtype.name,
                "shape": list(reply.values.shape)}
        return Response(nnia.pack(reply.values), media_type="application/octet-stream",
                        headers={META_HEADER: json.dumps(meta)})

    async def interact(request: Request, work, run: bool) -> Response:
        """`work(session)` under the lease's lock, in a worker thread, then the prediction reply."""
        lease = lease_of(request, active=True)

        def locked():
            with lease.work:
                session = session_of(lease)
                work(session)
                return prediction(session, run)
        return await run_in_threadpool(locked)

    # ------------------------------------------------------------------ leases
    @app.get("/healthz")
    async def healthz():
        return {"ok": True}

    @app.get("/capabilities")
    async def capabilities():
        names = [engine.model] + ([engine.point_model] if engine.point_model != engine.model else [])
        return {**CAPABILITIES, "inference_session_version": version,
                "license": "; ".join(LICENSES.get(n, f"{n}: see its checkpoint's licence") for n in names)}

    @app.post("/claim")
    async def claim():
        lease = leases.claim()
        return {"lease_token": lease.token, "idle_timeout_seconds": leases.idle_s,
                "liveness_timeout_seconds": leases.liveness_s, "max_sessions": leases.max_sessions}

    @app.post("/heartbeat")
    async def heartbeat(request: Request):
        return {"remaining_seconds": leases.remaining(lease_of(request))}

    @app.get("/lease_status")
    async def lease_status(request: Request):
        return {"remaining_seconds": leases.remaining(lease_of(request, touch=False)),
                "idle_timeout_seconds": leases.idle_s}

    @app.post("/release")
    async def release(request: Request):
        leases.release(request.headers.get(LEASE_HEADER))
        return {"released": True}

    # ------------------------------------------------------------------ the image and the target
    @app.post("/set_image")
    async def set_image(request: Request):
        lease = lease_of(request, active=True)
        props = meta_of(request).get("image_properties") or {}
        image = await array_of(request, image_limit, "the image")
        spacing = _spacing(props.get("spacing") if isinstance(props, dict) else None)

        def load():
            with lease.work:
                lease.session = None
                session = SlicerSession(engine, image, spacing)
                session.encode()
                lease.session = session
        await run_in_threadpool(load)
        return {"original_image_shape": list(image.shape)}

    @app.post("/set_target_buffer")
    async def set_target_buffer(request: Request):
        body = await json_of(request)
        shape, dtype = body.get("shape"), body.get("dtype")
        if not (isinstance(shape, list) and len(shape) == 3 and all(isinstance(v, int) and v > 0 for v in shape)
                and isinstance(dtype, str)):
            raise ApiError(400, "set_target_buffer takes {shape: [three positive ints], dtype: a type name}")
        lease = lease_of(request, active=True)

        def locked():
            with lease.work:
                session_of(lease).set_target(shape, dtype)
        await run_in_threadpool(locked)
        return {}

    @app.post("/set_do_autozoom")
    async def set_do_autozoom(request: Request):
        flag(await json_of(request), "do_autozoom")  # accepted; the engine walks the whole volume, never zooms
        lease_of(request, active=True)
        return {}

    @app.post("/reset_interactions")
    async def reset_interactions(request: Request):
        await json_of(request)
        lease = lease_of(request, active=True)

        def locked():
            with lease.work:
                if lease.session is not None:
                    lease.session.reset()
        await run_in_threadpool(locked)
        return {}

    # ------------------------------------------------------------------ interactions
    @app.post("/add_bbox_interaction")
    async def add_bbox(request: Request):
        body = await json_of(request)
        box, positive = body.get("bbox_coords"), flag(body, "include_interaction")
        return await interact(request, lambda s: s.bbox(box, positive), flag(body, "run_prediction", True))

    @app.post("/add_point_interaction")
    async def add_point(request: Request):
        body = await json_of(request)
        coords, positive = body.get("coordinates"), flag(body, "include_interaction")
        if not isinstance(coords, list) or len(coords) != 3:
            raise ApiError(400, "coordinates must be three voxel indices [k, j, i]")
        return await interact(request, lambda s: s.point(coords, positive), flag(body, "run_prediction", True))

    async def mask_interaction(request: Request, kind: str) -> Response:
        meta = meta_of(request)
        positive, run = flag(meta, "include_interaction"), flag(meta, "run_prediction", True)
        data = await array_of(request, mask_limit(lease_of(request)), f"the {kind}")

        def work(s: SlicerSession):
            mask = s.full_mask(data, meta.get("interaction_bbox"))
            (s.scribble if kind == "scribble" else s.lasso)(mask, positive)
        return await interact(request, work, run)

    @app.post("/add_scribble_interaction")
    async def add_scribble(request: Request):
        return await mask_interaction(request, "scribble")

    @app.post("/add_lasso_interaction")
    async def add_lasso(request: Request):
        return await mask_interaction(request, "lasso")

    @app.post("/add_initial_seg_interaction")
    async def add_initial_seg(request: Request):
        run = flag(meta_of(request), "run_prediction", False)
        seg = await array_of(request, mask_limit(lease_of(request)), "the initial segmentation")
        return await interact(request, lambda s: s.initial(seg), run)

    @app.post("/undo")
    async def undo(request: Request):
        await json_of(request)
        lease = lease_of(request, active=True)

        def locked():
            with lease.work:
                session = session_of(lease)
                return prediction(session, session.undo())
        return await run_in_threadpool(locked)

    @app.post("/predict")
    async def predict(request: Request):
        await json_of(request)
        return await interact(request, lambda s: None, True)

    return app


def _spacing(value):
    """[sk, sj, si] mm from image_properties, or None (1 mm assumed) when absent."""
    if value is None:
        return None
    try:
        vals = [float(v) for v in value]
    except (TypeError, ValueError, OverflowError):
        raise ApiError(400, "image_properties.spacing must be three numbers (mm)") from None
    if len(vals) != 3 or not all(np.isfinite(vals)) or min(vals) <= 0:
        raise ApiError(400, "image_properties.spacing must be three positive numbers (mm)")
    return vals


def _version() -> str:
    from sambtcv.study.records import code_version

    return f"sam-btcv {code_version()['version']}"
