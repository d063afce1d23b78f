"""The routes of the nnInteractive remote protocol (the table in `sambtcv.servers.slicer_app`): leases, the image
and the target buffer, and the interactions, each on the lease's `sambtcv.servers.slicer.SlicerSession` under the
lease's lock, off the event loop. A router of `sambtcv.servers.slicer_app.create_slicer_app`; the app's state holds
the engine, the leases, the image limit and the server's version."""
from __future__ import annotations

import json

import numpy as np
from fastapi import APIRouter, Request
from fastapi.responses import Response
from starlette.concurrency import run_in_threadpool

from sambtcv.servers import nnia
from sambtcv.servers.http import ApiError, read_body
from sambtcv.servers.slicer import CAPABILITIES, SlicerSession

LEASE_HEADER = "X-Lease-Token"
META_HEADER = "X-Meta"
MAX_JSON_BYTES = 64 * 1024
MAX_META_BYTES = 16 * 1024
LICENSES = {"litemedsam": "LiteMedSAM: Apache-2.0 (MedSAM)", "mobilesam": "MobileSAM: Apache-2.0",
            "vit_b": "SAM: Apache-2.0", "vit_l": "SAM: Apache-2.0", "vit_h": "SAM: Apache-2.0"}

router = APIRouter()


# ---------------------------------------------------------------------------------------------- helpers
def lease_of(request: Request, active: bool = False, touch: bool = True):
    return request.app.state.leases.get(request.headers.get(LEASE_HEADER), active, touch)


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


def mask_limit(request: Request, lease) -> int:
    """A mask or segmentation holds at most the image's voxels (8 bytes each, the widest dtype)."""
    return min(request.app.state.image_limit, 8 * int(np.prod(session_of(lease).shape[1:])))


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


async def locked(request: Request, work):
    """`work(lease)` under the (active) lease's lock, in a worker thread; what it returns."""
    lease = lease_of(request, active=True)

    def run():
        with lease.work:
            return work(lease)
    return await run_in_threadpool(run)


async def interact(request: Request, work, run: bool) -> Response:
    """`work(session)` under the lease's lock, in a worker thread, then the prediction reply."""
    def apply(lease):
        session = session_of(lease)
        work(session)
        return prediction(session, run)
    return await locked(request, apply)


# ---------------------------------------------------------------------------------------------- leases
@router.get("/healthz")
async def healthz():
    return {"ok": True}


@router.get("/capabilities")
async def capabilities(request: Request):
    engine = request.app.state.engine
    names = [engine.model] + ([engine.point_model] if engine.point_model != engine.model else [])
    return {**CAPABILITIES, "inference_session_version": request.app.state.version,
            "license": "; ".join(LICENSES.get(n, f"{n}: see its checkpoint's licence") for n in names)}


@router.post("/claim")
async def claim(request: Request):
    leases = request.app.state.leases
    lease = leases.claim()
    return {"lease_token": lease.token, "idle_timeout_seconds": leases.idle_s,
            "liveness_timeout_seconds": leases.liveness_s, "max_sessions": leases.max_sessions}


@router.post("/heartbeat")
async def heartbeat(request: Request):
    return {"remaining_seconds": request.app.state.leases.remaining(lease_of(request))}


@router.get("/lease_status")
async def lease_status(request: Request):
    leases = request.app.state.leases
    return {"remaining_seconds": leases.remaining(lease_of(request, touch=False)),
            "idle_timeout_seconds": leases.idle_s}


@router.post("/release")
async def release(request: Request):
    request.app.state.leases.release(request.headers.get(LEASE_HEADER))
    return {"released": True}


# ------------------------------------------------------------------------------------- the image and the target
@router.post("/set_image")
async def set_image(request: Request):
    lease = lease_of(request, active=True)
    props = meta_of(request).get("image_properties") or {}
    image = await array_of(request, request.app.state.image_limit, "the image")
    spacing = _spacing(props.get("spacing") if isinstance(props, dict) else None)

    def load():
        with lease.work:
            lease.session = None
            session = SlicerSession(request.app.state.engine, image, spacing)
            session.encode()
            lease.session = session
    await run_in_threadpool(load)
    return {"original_image_shape": list(image.shape)}


@router.post("/set_target_buffer")
async def set_target_buffer(request: Request):
    body = await json_of(request)
    shape, dtype = body.get("shape"), body.get("dtype")
    if not (isinstance(shape, list) and len(shape) == 3 and all(isinstance(v, int) and v > 0 for v in shape)
            and isinstance(dtype, str)):
        raise ApiError(400, "set_target_buffer takes {shape: [three positive ints], dtype: a type name}")
    await locked(request, lambda lease: session_of(lease).set_target(shape, dtype))
    return {}


@router.post("/set_do_autozoom")
async def set_do_autozoom(request: Request):
    flag(await json_of(request), "do_autozoom")  # accepted; the engine walks the whole volume, never zooms
    lease_of(request, active=True)
    return {}


@router.post("/reset_interactions")
async def reset_interactions(request: Request):
    await json_of(request)

    def reset(lease):
        if lease.session is not None:
            lease.session.reset()
    await locked(request, reset)
    return {}


# ---------------------------------------------------------------------------------------------- interactions
@router.post("/add_bbox_interaction")
async def add_bbox(request: Request):
    body = await json_of(request)
    box, positive = body.get("bbox_coords"), flag(body, "include_interaction")
    return await interact(request, lambda s: s.bbox(box, positive), flag(body, "run_prediction", True))


@router.post("/add_point_interaction")
async def add_point(request: Request):
    body = await json_of(request)
    coords, positive = body.get("coordinates"), flag(body, "include_interaction")
    if not isinstance(coords, list) or len(coords) != 3:
        raise ApiError(400, "coordinates must be three voxel indices [k, j, i]")
    return await interact(request, lambda s: s.point(coords, positive), flag(body, "run_prediction", True))


async def mask_interaction(request: Request, kind: str) -> Response:
    meta = meta_of(request)
    positive, run = flag(meta, "include_interaction"), flag(meta, "run_prediction", True)
    data = await array_of(request, mask_limit(request, lease_of(request)), f"the {kind}")

    def work(s: SlicerSession):
        mask = s.full_mask(data, meta.get("interaction_bbox"))
        (s.scribble if kind == "scribble" else s.lasso)(mask, positive)
    return await interact(request, work, run)


@router.post("/add_scribble_interaction")
async def add_scribble(request: Request):
    return await mask_interaction(request, "scribble")


@router.post("/add_lasso_interaction")
async def add_lasso(request: Request):
    return await mask_interaction(request, "lasso")


@router.post("/add_initial_seg_interaction")
async def add_initial_seg(request: Request):
    run = flag(meta_of(request), "run_prediction", False)
    seg = await array_of(request, mask_limit(request, lease_of(request)), "the initial segmentation")
    return await interact(request, lambda s: s.initial(seg), run)


@router.post("/undo")
async def undo(request: Request):
    await json_of(request)

    def undo_one(lease):
        session = session_of(lease)
        return prediction(session, session.undo())
    return await locked(request, undo_one)


@router.post("/predict")
async def predict(request: Request):
    await json_of(request)
    return await interact(request, lambda s: None, True)


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
