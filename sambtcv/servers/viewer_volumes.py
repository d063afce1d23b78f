"""The viewer's volumes API (the table in `sambtcv.servers.server`): upload, status, downloads, the organs'
prompts, strokes, walks and undo, each a call of the volume's `sambtcv.servers.sessions.VolumeSession` run off
the event loop. A router of `sambtcv.servers.server.create_app`; the app's state holds its settings and
sessions."""
from __future__ import annotations

import asyncio
import gzip
import re
from pathlib import Path

from fastapi import APIRouter, Request
from fastapi.responses import Response
from starlette.concurrency import run_in_threadpool

from sambtcv.core.errors import PipelineError
from sambtcv.core.names import ORGAN_ID, ORGANS
from sambtcv.data.prompts_file import loads
from sambtcv.engine.volume import write_label_map
from sambtcv.servers.http import ApiError, read_body
from sambtcv.servers.jobs import job_result
from sambtcv.servers.sessions import ID_PATTERN

MAX_JSON_BYTES = 64 * 1024
MAX_PAINT_BYTES = 8 * 2 ** 20  # a painted slice's run lengths (a 1024 x 1024 slice of single pixels fits)
RAW_GZIP_LEVEL = 1
ID_RE = re.compile(ID_PATTERN)
UPLOAD_SETTING = "--max-upload-mb"

router = APIRouter()


# ---------------------------------------------------------------------------------------------- helpers
def session_of(request: Request, vid: str):
    if not ID_RE.match(vid):
        raise ApiError(404, "no volume with this id (ids are 32 hex digits made by the server)")
    return request.app.state.sessions.get(vid)


def organ_of(name: str) -> int:
    if name not in ORGAN_ID:
        raise ApiError(404, f"unknown organ {name[:40]!r}; use one of {', '.join(ORGANS)}")
    return ORGAN_ID[name]


def _kind(request: Request) -> str:
    return (request.headers.get("content-type") or "").split(";")[0].strip().lower()


async def json_body(request: Request, allow_empty: bool = False, max_bytes: int = MAX_JSON_BYTES):
    data = await read_body(request, max_bytes, "the request body", UPLOAD_SETTING)
    if not data.strip() and allow_empty:
        return {}
    if _kind(request) != "application/json":
        raise ApiError(415, "send the fields as JSON (Content-Type: application/json)")
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError:
        raise ApiError(400, "the request body is not UTF-8 JSON") from None
    try:
        return loads(text)
    except PipelineError as exc:
        raise ApiError(400, str(exc).replace("prompts JSON", "JSON")) from None


async def nifti_body(request: Request, what: str) -> bytes:
    if _kind(request) in ("application/json", "application/x-www-form-urlencoded", "multipart/form-data", "text/plain"):
        raise ApiError(415, f"send {what} as the raw .nii, .nii.gz or .zip bytes (Content-Type: "
                            f"application/octet-stream)")
    limit = int(request.app.state.settings.max_upload_mb * 2 ** 20)
    data = await read_body(request, limit, what, UPLOAD_SETTING)
    if not data:
        raise ApiError(422, f"{what} is empty; send the .nii or .nii.gz file's bytes")
    return data


def raw_response(payload: bytes, request: Request, media: str, **headers) -> Response:
    if "gzip" in (request.headers.get("accept-encoding") or ""):
        payload = gzip.compress(payload, compresslevel=RAW_GZIP_LEVEL, mtime=0)
        headers["Content-Encoding"] = "gzip"
    return Response(payload, media_type=media, headers={"Vary": "Accept-Encoding", **headers})


def nifti_response(data: bytes, filename: str) -> Response:
    """Gzipped NIfTI bytes as a download named `filename`."""
    return Response(data, media_type="application/gzip",
                    headers={"Content-Disposition": f'attachment; filename="{filename}"'})


# ---------------------------------------------------------------------------------------------- volumes
@router.post("/api/volumes", status_code=201)
async def upload(request: Request):
    data = await nifti_body(request, "the upload")
    session = await run_in_threadpool(request.app.state.sessions.open_bytes, data, "upload")
    return session.info()


@router.get("/api/volumes")
async def list_volumes(request: Request):
    sessions = request.app.state.sessions
    return {"volumes": [sessions.get(v).info() for v in sessions.ids()]}


@router.get("/api/volumes/{vid}")
async def volume_status(vid: str, request: Request):
    return await run_in_threadpool(session_of(request, vid).status)


@router.delete("/api/volumes/{vid}")
async def close_volume(vid: str, request: Request):
    session_of(request, vid)
    await run_in_threadpool(request.app.state.sessions.close, vid)
    return {"closed": vid}


@router.get("/api/volumes/{vid}/image.nii.gz")
async def image(vid: str, request: Request):
    return nifti_response(await run_in_threadpool(session_of(request, vid).image_nifti), "image.nii.gz")


@router.get("/api/volumes/{vid}/labels.nii.gz")
async def labels(vid: str, request: Request):
    return nifti_response(await run_in_threadpool(session_of(request, vid).label_map_nifti), "labels.nii.gz")


@router.get("/api/volumes/{vid}/seg.dcm")
async def seg(vid: str, request: Request):
    data = await run_in_threadpool(session_of(request, vid).seg_dicom)
    return Response(data, media_type="application/dicom",
                    headers={"Content-Disposition": 'attachment; filename="labels-seg.dcm"'})


@router.get("/api/volumes/{vid}/labels.raw")
async def label_slices(vid: str, request: Request, first: int = 0, last: int | None = None, live: bool = False):
    session = session_of(request, vid)
    last = session.n_slices - 1 if last is None else last
    version = session.version
    arr = await run_in_threadpool(session.label_slices, first, last, live)
    return raw_response(arr.tobytes(), request, "application/octet-stream",
                        **{"X-Shape": ",".join(map(str, arr.shape)), "X-Version": str(version)})


@router.post("/api/volumes/{vid}/undo")
async def undo(vid: str, request: Request):
    return await run_in_threadpool(session_of(request, vid).undo)


@router.put("/api/volumes/{vid}/focus")
async def focus(vid: str, request: Request):
    session = session_of(request, vid)
    body = await json_body(request)
    k = body.get("slice") if isinstance(body, dict) else None
    if not isinstance(body, dict) or set(body) != {"slice"} or isinstance(k, bool) or not isinstance(k, int) \
            or not 0 <= k < session.n_slices:
        raise ApiError(422, f'send {{"slice": k}} with k in 0..{session.n_slices - 1}')
    session.touch(k)
    return {}


@router.post("/api/volumes/{vid}/reference")
async def reference(vid: str, request: Request, edit: bool = True):
    session = session_of(request, vid)
    data = await nifti_body(request, "the reference label")
    return await run_in_threadpool(request.app.state.sessions.open_reference, session, data, edit)


@router.post("/api/volumes/{vid}/save")
async def save(vid: str, request: Request):
    session, state = session_of(request, vid), request.app.state
    out = state.settings.out
    if out is None or vid != state.startup:
        raise ApiError(409, "this server writes no file on Save (start it with --image and --out); download "
                            "labels.nii.gz instead")
    await run_in_threadpool(lambda: write_label_map(session.labels(), session.case, Path(out)))
    return {"written": str(out)}


# ---------------------------------------------------------------------------------------------- organs
@router.post("/api/volumes/{vid}/organs/{organ}/prompt")
async def prompt(vid: str, organ: str, request: Request):
    session, _ = session_of(request, vid), organ_of(organ)
    body = await json_body(request)
    return await run_in_threadpool(session.prompt, organ, body)


@router.post("/api/volumes/{vid}/organs/{organ}/paint")
async def paint(vid: str, organ: str, request: Request):
    session, oid = session_of(request, vid), organ_of(organ)
    body = await json_body(request, max_bytes=MAX_PAINT_BYTES)
    return await run_in_threadpool(session.paint, oid, body)


@router.delete("/api/volumes/{vid}/organs/{organ}/slices/{k}")
async def clear_slice(vid: str, organ: str, k: int, request: Request):
    session, oid = session_of(request, vid), organ_of(organ)
    if not 0 <= k < session.n_slices:
        raise ApiError(422, f"slice must be 0..{session.n_slices - 1}, got {k}")
    return await run_in_threadpool(session.clear_slice, oid, k)


@router.post("/api/volumes/{vid}/organs/{organ}/candidate")
async def candidate(vid: str, organ: str, request: Request):
    session, oid = session_of(request, vid), organ_of(organ)
    body = await json_body(request)
    if not isinstance(body, dict) or set(body) != {"index"}:
        raise ApiError(422, 'send {"index": i}, the candidate mask to show (0, 1 or 2)')
    return await run_in_threadpool(session.choose, oid, body["index"])


@router.post("/api/volumes/{vid}/organs/{organ}/propagate")
async def propagate(vid: str, organ: str, request: Request):
    session, oid = session_of(request, vid), organ_of(organ)
    body = await json_body(request, allow_empty=True)
    if body != {}:
        raise ApiError(422, "propagate takes no fields; send {}")
    job = await run_in_threadpool(session.start_propagation, oid)
    while not job.done.is_set():  # the walk runs in its own thread: a client that leaves does not stop it
        await asyncio.sleep(0.05)
    return job_result(job)


@router.delete("/api/volumes/{vid}/organs/{organ}")
async def erase(vid: str, organ: str, request: Request):
    session, oid = session_of(request, vid), organ_of(organ)
    return await run_in_threadpool(session.erase, oid)
