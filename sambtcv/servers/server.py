"""The viewer's HTTP server: FastAPI over `sambtcv.servers.sessions`, the page (web/) and NiiVue's module.

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

from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path

from fastapi import FastAPI, Request

from sambtcv.core import config
from sambtcv.core.errors import PipelineError
from sambtcv.engine.interactive import load_engine
from sambtcv.servers import viewer_page, viewer_volumes
from sambtcv.servers.http import ErrorStyle, foreign_host, install_errors
from sambtcv.servers.jobs import Busy
from sambtcv.servers.sessions import NotFound, Sessions

WEB_DIR = config.ROOT / "web"


@dataclass
class Settings:
    """What the server is started with (viewer.py's flags)."""

    image: Path | None = None  # opened at start (the page shows it)
    label: Path | None = None  # with image: a reference label, opened for editing
    out: Path | None = None  # with image: Save also writes the label map here
    model: str = config.MODEL
    point_model: str = ""  # the model that answers clicks; empty: model
    click: str = "local"  # sambtcv.engine.editor.CLICK_RULES
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
    background_slices: int = 2048  # each side of the slice in view, encoded while idle: every slice of a CT
    web_dir: Path = field(default_factory=lambda: WEB_DIR)


def status_of(exc: PipelineError) -> tuple:
    """The status (and headers) of the package's error in the viewer's API: 409 busy, 404 unknown, else 422."""
    if isinstance(exc, Busy):
        return 409, None
    if isinstance(exc, NotFound):
        return 404, None
    return getattr(exc, "status", 422), None


ERRORS = ErrorStyle("error", {404: "no such page or API path", 405: "this API path does not take that method"},
                    status_of)


def create_app(settings: Settings, engine=None, sessions: Sessions | None = None):
    """The FastAPI app: the page (`sambtcv.servers.viewer_page`) and the volumes' API
    (`sambtcv.servers.viewer_volumes`) over `sessions`. `engine` (sambtcv.engine.interactive.Engine) reuses loaded
    models; the volume of `settings.image` (and its label) is opened now, so a bad file fails before anything is
    served."""
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
    app.state.sessions, app.state.settings, app.state.startup = sessions, settings, startup
    install_errors(app, ERRORS)

    @app.middleware("http")
    async def guard(request: Request, call_next):
        """Requests must name this server as the host it was bound to (no DNS rebinding of a page on
        another site onto 127.0.0.1); responses are not framed by other sites."""
        if foreign_host(request, settings.host):
            return ERRORS.response(400, f"this viewer answers only requests for {settings.host}; open "
                                        f"http://127.0.0.1:{settings.port}/")
        response = await call_next(request)
        response.headers["X-Content-Type-Options"] = "nosniff"
        response.headers["X-Frame-Options"] = "DENY"
        response.headers.setdefault("Cache-Control", "no-store")
        return response

    app.include_router(viewer_page.router)
    app.include_router(viewer_volumes.router)
    return app
