"""3D Slicer on a laptop CPU: this project's engine behind the nnInteractive remote protocol, so 3D Slicer's
SlicerNNInteractive extension (and `nninteractive-client` 2.x from Python) segments with it.

    ./run.sh slicer-server                                      # http://127.0.0.1:1527, no key (this machine only)
    ./run.sh slicer-server --port 1527 --max-sessions 2 --idle-timeout 600
    ./run.sh slicer-server --host 0.0.0.0 --api-key SECRET      # reachable from other machines: a key is required
    ssh -L 1527:127.0.0.1:1527 cpu-box                          # or keep it on 127.0.0.1 and tunnel to it

In Slicer: Extensions Manager -> SlicerNNInteractive; in its panel set the server URL
(http://127.0.0.1:1527) and, with --api-key, the key. What each Slicer tool does here (a box, a point, a
scribble, a lasso, an initial segmentation, undo) is `sambtcv.servers.slicer`'s docstring and the README's "In 3D
Slicer". Every image sent is windowed as every page windows CT (WINDOW_HU) and encoded for walks before
`set_image` answers (the 3D embedding cache under CACHE_DIR: the same CT again is ready at once).
Everything is checked before the models load; a problem is one line ``error: ...`` and exit status 2.
"""
from __future__ import annotations

import sys

from sambtcv.cli import flag, parse_config, run_main, start_run
from sambtcv.core import config
from sambtcv.core.errors import PipelineError
from sambtcv.core.names import check_choice
from sambtcv.models.runtime import RUNTIMES
from sambtcv.servers.http import LOOPBACK, check_port

# ---------------------------------------------------------------------------------------------- config
PORT = 1527  # the port served on (nnInteractive's own server's default) (>= 1)
HOST = "127.0.0.1"  # the address to bind; another than loopback needs --api-key
API_KEY = ""  # clients must send Authorization: Bearer API_KEY; empty: none asked (loopback only)
MAX_SESSIONS = 2  # clients served at once (a lease each: one CT, its target, its history); more get 503 (>= 1)
IDLE_TIMEOUT = 600.0  # seconds without an interaction after which a lease ends (410 to its client) (>= 1)
LIVENESS_TIMEOUT = 60.0  # seconds without any request (heartbeats count) after which a lease ends (>= 1)
MAX_IMAGE_MB = 2048.0  # the largest image (or mask) a client may send, MB uncompressed (>= 1)
MODEL = "litemedsam"  # boxes and walks (box-trained LiteMedSAM measured best on real CT: MEASUREMENTS 10)
POINT_MODEL = "mobilesam"  # the model that answers clicks; empty: MODEL
CACHE_DIR = config.CACHE_DIR_3D  # image embeddings by (volume content, model, encoder dtype), shared with the viewer
STRIDE_MM = config.STRIDE_MM  # > 0: a 3D box's first walk encodes a slice every this many mm (MEASUREMENTS 13); 0: all
WINDOW_HU = config.WINDOW_HU  # HU window the image is mapped through (as preprocess.py)
SEED = config.SEED  # accepted for a uniform interface; nothing here is random (>= 0)
DEVICE = config.DEVICE  # cpu | cuda; empty: cuda when present
DTYPE = config.DTYPE  # auto | fp32 | bf16 autocast of the decoder
ENCODER_DTYPE = config.DTYPE  # auto | fp32 | bf16 autocast of the image encoder
RUNTIME = config.RUNTIME  # auto | torch | openvino: runs the encoder and the decoder (auto: openvino on a CPU)
# -----------------------------------------------------------------------------------------------------


def check(cfg) -> None:
    """Every flag, before any model is loaded."""
    from sambtcv.data.btcv import parse_window
    from sambtcv.engine.volume import stride_mm
    from sambtcv.models.backbones import check_model_name

    for name in ("model", "point_model"):
        if cfg[name] or name == "model":
            with flag("--" + name.replace("_", "-")):
                check_model_name(cfg[name])
    with flag("--runtime"):
        check_choice(cfg["runtime"], RUNTIMES, "runtime")
    with flag("--window-hu"):
        parse_window(cfg["window_hu"])
    with flag("--stride-mm"):
        stride_mm(cfg["stride_mm"])
    if cfg["host"] not in LOOPBACK and not cfg["api_key"]:
        raise PipelineError(f"--host {cfg['host']} opens the server to other machines: give --api-key KEY too (the "
                            f"same key in Slicer's extension), or keep 127.0.0.1 and tunnel with ssh -L")
    if cfg["api_key"] and any(c.isspace() for c in cfg["api_key"]):
        raise PipelineError("--api-key must not hold spaces (it is sent in an HTTP header)")
    check_port(cfg["host"], cfg["port"])


def main(argv=None):
    cfg = parse_config(globals(), argv)
    device = start_run(cfg)
    check(cfg)
    from sambtcv.engine.interactive import load_engine
    from sambtcv.servers.slicer_app import SlicerSettings, create_slicer_app

    engine = load_engine(cfg["model"], None, None, device, cfg["dtype"], cfg["encoder_dtype"], cfg["cache_dir"],
                         window=cfg["window_hu"], runtime=cfg["runtime"], point_model=cfg["point_model"],
                         stride=cfg["stride_mm"])
    settings = SlicerSettings(cfg["api_key"], cfg["host"], cfg["max_sessions"], cfg["idle_timeout"],
                              cfg["liveness_timeout"], cfg["max_image_mb"])
    app = create_slicer_app(engine, settings)
    import uvicorn

    print(f"sam-btcv for 3D Slicer ({engine.model} boxes and walks, {engine.point_model} clicks, {device}): set "
          f"http://{cfg['host']}:{cfg['port']} as the server in SlicerNNInteractive"
          f"{' with its API key' if cfg['api_key'] else ''}  (Ctrl+C stops)", file=sys.stderr, flush=True)
    uvicorn.run(app, host=cfg["host"], port=cfg["port"], log_level="warning")


if __name__ == "__main__":
    run_main(main)
