"""The viewer's page: the files of web/ it serves (and nothing else of the disk) and GET /api/config, what
the page asks first. A router of `sambtcv.servers.server.create_app`; the app's state holds its settings,
sessions and the volume opened at start."""
from __future__ import annotations

from pathlib import Path

from fastapi import APIRouter, Request
from fastapi.responses import FileResponse

from sambtcv.core import config
from sambtcv.core.names import ORGANS
from sambtcv.servers.http import ApiError

NIIVUE = "node_modules/@niivue/niivue/dist/index.js"
FFLATE = "node_modules/fflate/esm/browser.js"  # NiiVue's own zip library: the page zips a DICOM series' files
HTML, JS, CSS = "text/html; charset=utf-8", "text/javascript; charset=utf-8", "text/css; charset=utf-8"
STATIC = {"/": ("index.html", HTML), "/index.html": ("index.html", HTML), "/app.js": ("app.js", JS),
          "/style.css": ("style.css", CSS), f"/{NIIVUE}": (NIIVUE, JS), f"/{FFLATE}": (FFLATE, JS)}  # all it serves

router = APIRouter()


def _static(path: str):
    """The handler of one of STATIC's paths: its file in the settings' web folder."""
    name, media = STATIC[path]

    async def serve(request: Request):
        file = Path(request.app.state.settings.web_dir) / name
        if not file.is_file():
            hint = " (NiiVue is installed by ./run.sh into web/node_modules)" if name == NIIVUE else ""
            raise ApiError(404, f"the page's file {name} is missing{hint}")
        return FileResponse(file, media_type=media, headers={"Cache-Control": "no-cache"})

    return serve


for _path in STATIC:
    router.add_api_route(_path, _static(_path), methods=["GET"], include_in_schema=False)


@router.get("/api/config")
async def api_config(request: Request):
    state = request.app.state
    engine, settings = state.sessions.engine, state.settings
    return {"volume": state.startup, "organs": ORGANS, "model": engine.model, "point_model": engine.point_model,
            "out": str(settings.out) if settings.out else None, "max_upload_mb": settings.max_upload_mb,
            "stop": engine.walk.stop, "margin_mm": engine.walk.margin_mm, "orientation": config.ORIENTATION}
