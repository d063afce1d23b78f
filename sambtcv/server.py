"""The viewer's HTTP server: FastAPI over `sambtcv.sessions`, the page (web/) and NiiVue's module.

`create_app(settings)` builds the app; viewer.py serves it with uvicorn. The API (docs/CONTRACT.md,
"Viewer"; coordinates in the slice frame of the prompts file, organs by BTCV name):

====== ============================================== ==================================================
POST   /api/volumes                                   body: .nii / .nii.gz bytes, or a .zip of one DICOM series ->
                                                         201 {id, shape [K, H, W], spacing, name, dicom, series}
GET    /api/volumes                                   -> {volumes: [{id, shape, spacing, name}]}
GET    /api/volumes/{id}                              -> status: organs (slices, anchor, pending, stops,
                                                         unsure, candidates), dice, job (a walk's progress), version
DELETE /api/volumes/{id}                              -> {closed}
GET    /api/volumes/{id}/image.nii.gz                 the CT reoriented to the slice frame's axes (config.ORIENTATION):
                                                         voxel (i, j, k) = pixel (x = i, y = j) of slice k
GET    /api/volumes/{id}/labels.nii.gz                the label map (BTCV ids) in the uploaded file's geometry
GET    /api/volumes/{id}/seg.dcm                      the label map as a DICOM SEG (a CT uploaded as a DICOM series)
GET    /api/volumes/{id}/labels.raw?first=&last=&live= slices first..last of the label map, uint8 (n, H, W) C order
POST   /api/volumes/{id}/organs/{organ}/prompt        {slice, box?, points?, labels?, mode? add|new} -> {slice, area,
                                                         iou, seconds, candidate, candidates, prompt (what the
                                                         slice holds), mask {shape, order, counts}, changed,
                                                         propagated, version}; adds to the slice's prompt
POST   /api/volumes/{id}/organs/{organ}/paint         {slice, mask {counts}} -> as prompt (a painted slice: an anchor)
DELETE /api/volumes/{id}/organs/{organ}/slices/{k}    -> {organ, changed, version} (slice k's prompt and mask cleared)
POST   /api/volumes/{id}/organs/{organ}/candidate     {index} -> as prompt (another of SAM's masks for the last prompt)
POST   /api/volumes/{id}/organs/{organ}/propagate     {} -> {slices [first, last], voxels, encoder_passes, visited,
                                                         seconds, stops, unsure, changed, version}
DELETE /api/volumes/{id}/organs/{organ}               -> {organ, changed, version}
POST   /api/volumes/{id}/undo                         -> {organ, changed, version, undo_steps}
PUT    /api/volumes/{id}/focus                        {slice} -> {} (the background encodes near it)
POST   /api/volumes/{id}/reference?edit=1             body: a label map on the CT's grid -> {organs, changed, version}
POST   /api/volumes/{id}/save                         -> {written: path} (the volume of --image, to --out)
GET    /api/config                                    -> {volume, organs, model, out, max_upload_mb, ...}
====== ============================================== ==================================================

Errors are 4xx with ``{"error": "one line"}`` (400 malformed request, 404 unknown volume/organ/path,
409 the volume is being propagated, 413 upload too large, 415 wrong content type, 422 a value the
pipeline refuses); the server keeps serving. It never reads or writes a path a client names: volumes
live in its own temporary folder under server-made ids, and Save writes only the --out given at start.
"""
from __future__ import annotations

import asyncio
import gzip
import re
import socket
import sys
import traceback
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import FileResponse, JSONResponse, Response
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException as StarletteHTTPException

from sambtcv import config
from sambtcv.errors import PipelineError
from sambtcv.interactive import load_engine
from sambtcv.names import ORGAN_ID, ORGANS
from sambtcv.prompts_file import loads
from sambtcv.sessions import ID_PATTERN, Busy, NotFound, Sessions, job_result
from sambtcv.volume import write_label_map

WEB_DIR = config.ROOT / "web"
NIIVUE = "node_modules/@niivue/niivue/dist/index.js"
FFLATE = "node_modules/fflate/esm/browser.js"  # NiiVue's own zip library: the page zips a DICOM series' files
HTML, JS, CSS = "text/html; charset=utf-8", "text/javascript; charset=utf-8", "text/css; charset=utf-8"
STATIC = {"/": ("index.html", HTML), "/index.html": ("index.html", HTML), "/app.js": ("app.js", JS),
          "/style.css": ("style.css", CSS), f"/{NIIVUE}": (NIIVUE, JS), f"/{FFLATE}": (FFLATE, JS)}  # all it serves
LOOPBACK = ("127.0.0.1", "localhost", "::1")
MAX_JSON_BYTES = 64 * 1024
MAX_PAINT_BYTES = 8 * 2 ** 20  # a painted slice's run lengths (a 1024 x 1024 slice of single pixels fits)
RAW_GZIP_LEVEL = 1
ID_RE = re.compile(ID_PATTERN)


@dataclass
class Settings:
    """What the server is started with (viewer.py's flags)."""

    image: Path | None = None  # opened at start (the page shows it)
    label: Path | None = None  # with image: a reference label, opened for editing
    out: Path | None = None  # with image: Save also writes the label map here
    model: str = config.MODEL
    point_model: str = ""  # the model that answers clicks; empty: model
    click: str = "local"  # sambtcv.editor.CLICK_RULES
    checkpoint: str | None = None
    finetuned: str | None = None
    device: str = config.DEVICE
    dtype: str = config.DTYPE
    encoder_dtype: str = config.DTYPE
    cache_dir: str = config.CACHE_DIR_3D
    stop: str = config.STOP
    margin_mm: str = "auto"
    stride_mm: float = config.STRIDE_MM
    runtime: str = config.RUNTIME
    host: str = "127.0.0.1"
    port: int = 8765
    max_upload_mb: float = 1024.0
    max_volumes: int = 8
    background_slices: int = 16
    web_dir: Path = field(default_factory=lambda: WEB_DIR)


class ApiError(Exception):
    def __init__(self, status: int, message: str):
        super().__init__(message)
        self.status = status


def one_line(text: str, limit: int = 400) -> str:
    text = " ".join(str(text).split())
    return text if len(text) <= limit else text[:limit - 3] + "..."


def status_of(exc: PipelineError) -> int:
    if isinstance(exc, Busy):
        return 409
    if isinstance(exc, NotFound):
        return 404
    return getattr(exc, "status", 422)


def foreign_host(request: Request, bound: str) -> bool:
    """A server bound to loopback got a request naming another host (a page on another site rebound onto
    127.0.0.1 by DNS): it must not answer."""
    host = (request.headers.get("host") or "").rsplit(":", 1)[0].strip("[]")
    return bound in LOOPBACK and host not in LOOPBACK


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


def nifti_response(data: bytes, filename: str) -> Response:
    """Gzipped NIfTI bytes as a download named `filename`."""
    return Response(data, media_type="application/gzip",
                    headers={"Content-Disposition": f'attachment; filename="{filename}"'})


def create_app(settings: Settings, engine=None, sessions: Sessions | None = None):
    """The FastAPI app. `engine` (sambtcv.interactive.Engine) reuses loaded models; the volume of
    `settings.image` (and its label) is opened now, so a bad file fails before anything is served."""
    if sessions is None:
        if engine is None:
            engine = load_engine(settings.model, settings.checkpoint, settings.finetuned, settings.device or None,
                                 settings.dtype, settings.encoder_dtype, settings.cache_dir, settings.stop,
                                 settings.margin_mm, runtime=settings.runtime, point_model=settings.point_model,
                                 click=settings.click, stride=settings.stride_mm)
        sessions = Sessions(engine, settings.max_volumes, settings.background_slices)
    startup = None
    if settings.image is not None:
        image = Path(settings.image)
        label = Path(settings.label).read_bytes() if settings.label else None
        try:
            startup = sessions.open_bytes(image.read_bytes(), image.name, label, what=f"--image {image}").id
        except PipelineError as exc:
            sessions.shutdown()
            raise PipelineError(str(exc).replace("the reference label", f"--label {settings.label}")) from None

    @asynccontextmanager
    async def lifespan(_app):
        yield
        sessions.shutdown()

    app = FastAPI(title="sam-btcv viewer", lifespan=lifespan, docs_url=None, redoc_url=None, openapi_url=None)
    app.state.sessions = sessions
    app.state.settings = settings
    app.state.startup = startup
    limit = int(settings.max_upload_mb * 2 ** 20)

    # ------------------------------------------------------------------ errors: one line, never a trace
    def error(status: int, message: str) -> JSONResponse:
        return JSONResponse({"error": one_line(message)}, status_code=status)

    @app.exception_handler(ApiError)
    async def _api_error(_req, exc: ApiError):
        return error(exc.status, str(exc))

    @app.exception_handler(PipelineError)
    async def _pipeline_error(_req, exc: PipelineError):
        return error(status_of(exc), str(exc))

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(_req, exc):
        text = {404: "no such page or API path", 405: "this API path does not take that method"}.get(
            exc.status_code, str(exc.detail))
        return error(exc.status_code, text)

    @app.exception_handler(RequestValidationError)
    async def _validation_error(_req, exc):
        first = exc.errors()[0] if exc.errors() else {}
        where = ".".join(str(p) for p in first.get("loc", ()) if p not in ("query", "path", "body"))
        return error(422, f"{where or 'request'}: {first.get('msg', 'invalid value')}")

    @app.exception_handler(Exception)
    async def _internal(_req, exc):
        traceback.print_exception(exc, file=sys.stderr)
        return error(500, f"internal error ({type(exc).__name__}); the server's log has the details")

    @app.middleware("http")
    async def guard(request: Request, call_next):
        """Requests must name this server as the host it was bound to (no DNS rebinding of a page on
        another site onto 127.0.0.1); responses are not framed by other sites."""
        if foreign_host(request, settings.host):
            return error(400, f"this viewer answers only requests for {settings.host}; open "
                              f"http://127.0.0.1:{settings.port}/")
        response = await call_next(request)
        response.headers["X-Content-Type-Options"] = "nosniff"
        response.headers["X-Frame-Options"] = "DENY"
        response.headers.setdefault("Cache-Control", "no-store")
        return response

    # ------------------------------------------------------------------ helpers
    def session_of(vid: str):
        if not ID_RE.match(vid):
            raise ApiError(404, "no volume with this id (ids are 32 hex digits made by the server)")
        return sessions.get(vid)

    def organ_of(name: str) -> int:
        if name not in ORGAN_ID:
            raise ApiError(404, f"unknown organ {name[:40]!r}; use one of {', '.join(ORGANS)}")
        return ORGAN_ID[name]

    async def json_body(request: Request, allow_empty: bool = False, max_bytes: int = MAX_JSON_BYTES):
        kind = (request.headers.get("content-type") or "").split(";")[0].strip().lower()
        data = await read_body(request, max_bytes, "the request body", "--max-upload-mb")
        if not data.strip() and allow_empty:
            return {}
        if kind != "application/json":
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
        kind = (request.headers.get("content-type") or "").split(";")[0].strip().lower()
        if kind in ("application/json", "application/x-www-form-urlencoded", "multipart/form-data", "text/plain"):
            raise ApiError(415, f"send {what} as the raw .nii, .nii.gz or .zip bytes (Content-Type: "
                                f"application/octet-stream)")
        data = await read_body(request, limit, what, "--max-upload-mb")
        if not data:
            raise ApiError(422, f"{what} is empty; send the .nii or .nii.gz file's bytes")
        return data

    def raw_response(payload: bytes, request: Request, media: str, **headers) -> Response:
        if "gzip" in (request.headers.get("accept-encoding") or ""):
            payload = gzip.compress(payload, compresslevel=RAW_GZIP_LEVEL, mtime=0)
            headers["Content-Encoding"] = "gzip"
        return Response(payload, media_type=media, headers={"Vary": "Accept-Encoding", **headers})

    # ------------------------------------------------------------------ the page
    def static(path: str):
        name, media = STATIC[path]
        file = Path(settings.web_dir) / name
        if not file.is_file():
            hint = " (NiiVue is installed by ./run.sh into web/node_modules)" if name == NIIVUE else ""
            raise ApiError(404, f"the page's file {name} is missing{hint}")
        return FileResponse(file, media_type=media, headers={"Cache-Control": "no-cache"})

    for route in STATIC:
        app.add_api_route(route, (lambda p: (lambda: static(p)))(route), methods=["GET"], include_in_schema=False)

    @app.get("/api/config")
    async def api_config():
        return {"volume": startup, "organs": ORGANS, "model": sessions.engine.model,
                "point_model": sessions.engine.point_model,
                "out": str(settings.out) if settings.out else None, "max_upload_mb": settings.max_upload_mb,
                "stop": sessions.engine.walk.stop, "margin_mm": sessions.engine.walk.margin_mm,
                "orientation": config.ORIENTATION}

    # ------------------------------------------------------------------ volumes
    @app.post("/api/volumes", status_code=201)
    async def upload(request: Request):
        data = await nifti_body(request, "the upload")
        session = await run_in_threadpool(sessions.open_bytes, data, "upload")
        return session.info()

    @app.get("/api/volumes")
    async def list_volumes():
        return {"volumes": [sessions.get(v).info() for v in sessions.ids()]}

    @app.get("/api/volumes/{vid}")
    async def volume_status(vid: str):
        session = session_of(vid)
        return await run_in_threadpool(session.status)

    @app.delete("/api/volumes/{vid}")
    async def close_volume(vid: str):
        session_of(vid)
        await run_in_threadpool(sessions.close, vid)
        return {"closed": vid}

    @app.get("/api/volumes/{vid}/image.nii.gz")
    async def image(vid: str):
        session = session_of(vid)
        return nifti_response(await run_in_threadpool(session.image_nifti), "image.nii.gz")

    @app.get("/api/volumes/{vid}/labels.nii.gz")
    async def labels(vid: str):
        session = session_of(vid)
        return nifti_response(await run_in_threadpool(session.label_map_nifti), "labels.nii.gz")

    @app.get("/api/volumes/{vid}/seg.dcm")
    async def seg(vid: str):
        session = session_of(vid)
        data = await run_in_threadpool(session.seg_dicom)
        return Response(data, media_type="application/dicom",
                        headers={"Content-Disposition": 'attachment; filename="labels-seg.dcm"'})

    @app.get("/api/volumes/{vid}/labels.raw")
    async def label_slices(vid: str, request: Request, first: int = 0, last: int | None = None, live: bool = False):
        session = session_of(vid)
        last = session.n_slices - 1 if last is None else last
        version = session.version
        arr = await run_in_threadpool(session.label_slices, first, last, live)
        return raw_response(arr.tobytes(), request, "application/octet-stream",
                            **{"X-Shape": ",".join(map(str, arr.shape)), "X-Version": str(version)})

    @app.post("/api/volumes/{vid}/organs/{organ}/prompt")
    async def prompt(vid: str, organ: str, request: Request):
        session, _ = session_of(vid), organ_of(organ)
        body = await json_body(request)
        return await run_in_threadpool(session.prompt, organ, body)

    @app.post("/api/volumes/{vid}/organs/{organ}/paint")
    async def paint(vid: str, organ: str, request: Request):
        session, oid = session_of(vid), organ_of(organ)
        body = await json_body(request, max_bytes=MAX_PAINT_BYTES)
        return await run_in_threadpool(session.paint, oid, body)

    @app.delete("/api/volumes/{vid}/organs/{organ}/slices/{k}")
    async def clear_slice(vid: str, organ: str, k: int):
        session, oid = session_of(vid), organ_of(organ)
        if not 0 <= k < session.n_slices:
            raise ApiError(422, f"slice must be 0..{session.n_slices - 1}, got {k}")
        return await run_in_threadpool(session.clear_slice, oid, k)

    @app.post("/api/volumes/{vid}/organs/{organ}/candidate")
    async def candidate(vid: str, organ: str, request: Request):
        session, oid = session_of(vid), organ_of(organ)
        body = await json_body(request)
        if not isinstance(body, dict) or set(body) != {"index"}:
            raise ApiError(422, 'send {"index": i}, the candidate mask to show (0, 1 or 2)')
        return await run_in_threadpool(session.choose, oid, body["index"])

    @app.post("/api/volumes/{vid}/organs/{organ}/propagate")
    async def propagate(vid: str, organ: str, request: Request):
        session, oid = session_of(vid), organ_of(organ)
        body = await json_body(request, allow_empty=True)
        if body != {}:
            raise ApiError(422, "propagate takes no fields; send {}")
        job = await run_in_threadpool(session.start_propagation, oid)
        while not job.done.is_set():  # the walk runs in its own thread: a client that leaves does not stop it
            await asyncio.sleep(0.05)
        return job_result(job)

    @app.delete("/api/volumes/{vid}/organs/{organ}")
    async def erase(vid: str, organ: str):
        session, oid = session_of(vid), organ_of(organ)
        return await run_in_threadpool(session.erase, oid)

    @app.post("/api/volumes/{vid}/undo")
    async def undo(vid: str):
        session = session_of(vid)
        return await run_in_threadpool(session.undo)

    @app.put("/api/volumes/{vid}/focus")
    async def focus(vid: str, request: Request):
        session = session_of(vid)
        body = await json_body(request)
        k = body.get("slice") if isinstance(body, dict) else None
        if not isinstance(body, dict) or set(body) != {"slice"} or isinstance(k, bool) or not isinstance(k, int) \
                or not 0 <= k < session.n_slices:
            raise ApiError(422, f'send {{"slice": k}} with k in 0..{session.n_slices - 1}')
        session.touch(k)
        return {}

    @app.post("/api/volumes/{vid}/reference")
    async def reference(vid: str, request: Request, edit: bool = True):
        session = session_of(vid)
        data = await nifti_body(request, "the reference label")
        return await run_in_threadpool(sessions.open_reference, session, data, edit)

    @app.post("/api/volumes/{vid}/save")
    async def save(vid: str):
        session = session_of(vid)
        if settings.out is None or vid != startup:
            raise ApiError(409, "this server writes no file on Save (start it with --image and --out); download "
                                "labels.nii.gz instead")
        await run_in_threadpool(lambda: write_label_map(session.labels(), session.case, Path(settings.out)))
        return {"written": str(settings.out)}

    return app
