"""The viewer: a CT in the browser, a box or points on a slice, the organ propagated in 3D, corrected, saved.

    ./run.sh viewer                                                   # the phantom's validation CT; prints the URL
    ./run.sh viewer --image ct.nii.gz [--label ref.nii.gz] [--out ct_sam.nii.gz] [--model litemedsam] [--port 8765]
    ssh -L 8765:127.0.0.1:8765 gpu-box                                # then open http://127.0.0.1:8765/ here

Serves a page (web/: NiiVue's axial, coronal and sagittal views) and the HTTP API of docs/CONTRACT.md
("Viewer") on HOST:PORT. The page and the API run the engine segment_volume.py uses (the same models,
`propagation.py`'s walk with STOP and MARGIN_MM, the 3D embedding cache under CACHE_DIR, the same NIfTI
writing), so a box gives the label map segment_volume.py gives for it. Without --image it opens the
synthetic phantom's validation CT (written once under data/phantom_viewer/, the quick report's phantom).
With --label the page opens that label map for editing and shows each organ's Dice against it; with
--out, Save also writes the label map there (the input's exact shape, affine and orientation).
Everything is checked before the server starts; a problem is one line ``error: ...`` and exit status 2.
"""
from __future__ import annotations

import sys
from pathlib import Path

from sambtcv.cli import flag, input_file, label_map_out, parse_config, run_main, start_run, walk_settings
from sambtcv.core import config
from sambtcv.core.errors import PipelineError
from sambtcv.core.names import check_choice
from sambtcv.data.btcv import find_cases
from sambtcv.models.runtime import RUNTIMES
from sambtcv.servers.http import LOOPBACK, check_port
from sambtcv.servers.server import Settings, create_app

# ---------------------------------------------------------------------------------------------- config
IMAGE = None  # a CT (.nii.gz / .nii) to open; empty: the synthetic phantom's validation CT
LABEL = None  # with --image: a label map on its grid, opened for editing; the page shows each organ's Dice against it
OUT = None  # with --image: Save also writes the label map (.nii.gz or .nii) here
MODEL = "litemedsam"  # boxes and walks: litemedsam (box-trained, best on real CT: MEASUREMENTS 10) | mobilesam | vit_*
POINT_MODEL = "mobilesam"  # the model that answers clicks; empty: MODEL
CLICK = "local"  # how a click changes its slice: local (near the click) | joint (the slice's whole prompt decoded)
CHECKPOINT = None  # backbone weights (see segmentation_task1.py)
FINETUNED = None  # a Task 2 checkpoint whose decoder is used instead of the pretrained one
PORT = 8765  # the port the page and the API are served on (>= 1)
HOST = "127.0.0.1"  # the address to bind; another than 127.0.0.1 opens the viewer (it has no login) to the network
MAX_UPLOAD_MB = 1024.0  # the largest CT or label file a client may upload, MB (>= 1)
CACHE_DIR = config.CACHE_DIR_3D  # image embeddings by (volume content, model, encoder dtype); segment_volume.py's too
STOP = config.STOP  # when the walk ends (propagation.STOP_RULES): intensity | continuity | vanish | iou | overlap | ...
MARGIN_MM = "auto"  # mm added on each side of the previous box to prompt the next slice, >= 0; auto: per model
STRIDE_MM = config.STRIDE_MM  # > 0: a 3D box's first walk encodes a slice every this many mm (MEASUREMENTS 13); 0: all
BACKGROUND_SLICES = 2048  # slices each side of the one in view encoded while idle, from opening (all); 0: none
SEED = config.SEED  # accepted for a uniform interface; nothing here is random (>= 0)
DEVICE = config.DEVICE  # cpu | cuda; empty: cuda when present
DTYPE = config.DTYPE  # auto | fp32 | bf16 autocast of the decoder
ENCODER_DTYPE = config.DTYPE  # auto | fp32 | bf16 autocast of the image encoder
RUNTIME = config.RUNTIME  # auto | torch | openvino: runs the encoder and the decoder (auto: openvino on a CPU)
# -----------------------------------------------------------------------------------------------------

PHANTOM_DIR = Path("data/phantom_viewer")  # the embedded default (written once): the quick report's phantom
PHANTOM = {"n": 4, "seed": 0, "shape": (160, 160, 32)}


def default_ct() -> tuple[Path, Path]:
    """The phantom's validation CT and its label, written under data/ when absent."""
    from sambtcv.data.phantom import MARKER, write_phantom

    if not (PHANTOM_DIR / MARKER).is_file():
        print(f"writing the synthetic phantom to {PHANTOM_DIR} (once) ...", flush=True)
        write_phantom(PHANTOM_DIR, PHANTOM["n"], PHANTOM["seed"], shape=PHANTOM["shape"])
    _, image, label = find_cases(PHANTOM_DIR)["val"][0]
    return image, label


def settings_of(cfg) -> Settings:
    """Every flag checked, files first, before any model or CT is loaded."""
    if cfg["host"] not in LOOPBACK:
        print(f"warning: --host {cfg['host']} makes the viewer reachable from other machines; it has no login, so "
              f"anyone who reaches {cfg['host']}:{cfg['port']} can read and segment the CTs it holds. Prefer "
              f"127.0.0.1 with ssh -L {cfg['port']}:127.0.0.1:{cfg['port']}", file=sys.stderr, flush=True)
    if not cfg["image"]:
        for name in ("label", "out"):
            if cfg[name]:
                raise PipelineError(f"--{name} needs --image (it belongs to that CT)")
        image, phantom_label = default_ct()
        print(f"no --image: opening the synthetic phantom's validation CT {image} (add --image {image} --label "
              f"{phantom_label} to open its label and see Dice)", flush=True)
        label = None
    else:
        image = input_file(cfg["image"], "--image")
        label = input_file(cfg["label"], "--label") if cfg["label"] else None
    out = label_map_out(cfg["out"], [image] + ([label] if label else [])) if cfg["out"] else None
    from sambtcv.engine.editor import CLICK_RULES
    from sambtcv.models.backbones import check_model_name

    with flag("--model"):
        check_model_name(cfg["model"])
    if cfg["point_model"]:
        with flag("--point-model"):
            check_model_name(cfg["point_model"])
    with flag("--click"):
        check_choice(cfg["click"], CLICK_RULES, "click rule")
    walk_settings(cfg)
    with flag("--runtime"):
        check_choice(cfg["runtime"], RUNTIMES, "runtime")
    check_port(cfg["host"], cfg["port"])
    return Settings(image=image, label=label, out=out, model=cfg["model"], point_model=cfg["point_model"],
                    click=cfg["click"], checkpoint=cfg["checkpoint"],
                    finetuned=cfg["finetuned"], device=cfg["device"], dtype=cfg["dtype"],
                    encoder_dtype=cfg["encoder_dtype"], cache_dir=cfg["cache_dir"], stop=cfg["stop"],
                    margin_mm=cfg["margin_mm"], stride_mm=cfg["stride_mm"], host=cfg["host"], port=cfg["port"],
                    max_upload_mb=cfg["max_upload_mb"], background_slices=cfg["background_slices"],
                    runtime=cfg["runtime"])


def url(host: str, port: int) -> str:
    shown = "127.0.0.1" if host in ("0.0.0.0", "::") else host
    return f"http://[{shown}]:{port}/" if ":" in shown else f"http://{shown}:{port}/"


def main(argv=None):
    cfg = parse_config(globals(), argv)
    device = start_run(cfg)
    settings = settings_of(cfg)
    settings.device = str(device)
    app = create_app(settings)  # loads the model and the CT: a bad file fails here, before serving
    import uvicorn

    clicks = settings.point_model or settings.model
    print(f"sam-btcv viewer ({settings.model} boxes, {clicks} clicks, {device}): open "
          f"{url(settings.host, settings.port)}  (Ctrl+C stops)", flush=True)
    uvicorn.run(app, host=settings.host, port=settings.port, log_level="warning")


if __name__ == "__main__":
    run_main(main)
