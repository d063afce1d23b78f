"""A predictor in the format of the CVPR 2025 SEGFM3D challenge: every *.npz of INPUTS -> OUTPUTS/<same name>.npz.

    python predict_segfm.py --inputs DIR --outputs DIR          # what the challenge's container runs per step
    python predict_segfm.py --inputs DIR --outputs DIR --model mobilesam --point-model ""

Each input holds ``imgs`` (D, H, W) uint8 (windowed 0..255, slices ``imgs[z]``, no affine), ``spacing``
(3,) mm in that axis order, and the interactions so far: ``boxes`` (one 3D box per class: z_min, z_max,
z_mid and the 2D box on z_mid), ``clicks`` (one {"fg": [[z, y, x], ...], "bg": [...]} per class) with
``clicks_order``; ``prev_pred`` is accepted and not needed. The output holds ``segs`` (D, H, W) uint8:
class i + 1 for the i-th box / clicks entry.

Each call is a new process, as the challenge starts a container per step. The engine is the viewer's
(`sambtcv.engine.editor`): each class's box is walked through its z range, then its clicks are applied in the
order given (`sambtcv.engine.protocol.predict`), so step n gives what one long session gives after n - 1
clicks. Embeddings come from the content-keyed cache in CACHE_DIR, so after the first call only newly
clicked slices are encoded, and each class's state after each step is saved there too (`sambtcv.engine.states`),
so a step applies only the click it adds. The boxes and clicks of the challenge's files are pickled
object arrays; they are read by an unpickler that admits only lists, dicts and numbers
(`sambtcv.engine.segfm.SafeUnpickler`). A file that cannot be used gets one line ``error: NAME: what is wrong``,
no output, and the exit status is 2 once the other files are written.
"""
from __future__ import annotations

import json
import sys
import time
from pathlib import Path

from sambtcv.cli import editor, flag, load_editor_models, parse_config, run_main, start_run
from sambtcv.core import config
from sambtcv.core.errors import PipelineError
from sambtcv.core.files import check_can_create
from sambtcv.engine.guard import Geometry
from sambtcv.engine.protocol import predict
from sambtcv.engine.states import StateStore

# ---------------------------------------------------------------------------------------------- config
INPUTS = None  # folder of the challenge's .npz inputs
OUTPUTS = None  # folder the .npz predictions go to (created if missing; never one of the inputs)
MODEL = "litemedsam"  # the model of boxes and walks (box-trained LiteMedSAM measured best: MEASUREMENTS 10)
POINT_MODEL = "mobilesam"  # the model that answers clicks; empty: MODEL
CHECKPOINT = None  # MODEL's weights (see segmentation_task1.py)
FINETUNED = None  # a Task 2 checkpoint of MODEL whose decoder is used instead of the pretrained one
CACHE_DIR = config.CACHE_DIR_3D  # image embeddings (by content, model, dtype) and classes' states: kept between steps
STOP = config.STOP  # the walk's stop rule where no box bounds it (a class given by clicks alone)
MARGIN_MM = "auto"  # mm around the previous mask's box; auto: per model, for walks inside a 3D box
CLICK = "local"  # how a click changes its slice: local | joint (sambtcv.engine.editor.CLICK_RULES)
AFTER_CLICK = "none"  # what a click does beyond its slice: none | walk (sambtcv.engine.editor.AFTER_CLICK)
MASK_INPUT = True  # a clicked slice's earlier low-res logits go back to SAM as its mask prompt
CARRY = True  # a click also corrects the neighbouring slices that share its error (Editor.carry)
GATE = True  # a click changes only pixels whose intensity backs it, where it can tell (Editor._gate)
GUARD = True  # a walk cuts a mask that outgrows or leaves the organ's last section (sambtcv.engine.guard)
REPAIR = True  # clicks repair: a wrong slab goes, a missed part or a doubted slice is walked (Editor.correct)
STRIDE_MM = config.STRIDE_MM  # > 0: a 3D box's first walk encodes a slice every this many mm (MEASUREMENTS 13); 0: all
SEED = config.SEED  # accepted for a uniform interface; nothing here is random (>= 0)
DEVICE = config.DEVICE  # cpu | cuda; empty: cuda when present
DTYPE = config.DTYPE  # auto | fp32 | bf16 autocast of the decoder (fp32: LiteMedSAM measured better, MEASUREMENTS 10)
ENCODER_DTYPE = config.DTYPE  # auto | fp32 | bf16 autocast of the image encoder
RUNTIME = config.RUNTIME  # auto | torch | openvino: runs the encoder and the decoder (auto: openvino on a CPU)
# -----------------------------------------------------------------------------------------------------
STATES_FOLDER = "segfm_states"  # in CACHE_DIR: sambtcv.engine.states


def check_folders(cfg) -> tuple[list[Path], Path]:
    """The input files and the output folder, checked before any model loads."""
    if not cfg["inputs"] or not cfg["outputs"]:
        raise PipelineError("give --inputs DIR (the challenge's .npz files) and --outputs DIR")
    inputs, outputs = Path(cfg["inputs"]), Path(cfg["outputs"])
    with flag("--inputs"):
        if not inputs.is_dir():
            raise PipelineError(f"{{subject}} {inputs} is not a folder", "inputs")
        files = sorted(p for p in inputs.glob("*.npz") if p.is_file())
        if not files:
            raise PipelineError(f"{{subject}} {inputs} holds no .npz files", "inputs")
    with flag("--outputs"):
        if outputs.exists() and inputs.resolve() == outputs.resolve():
            raise PipelineError("{subject} must be another folder than --inputs (outputs have the inputs' names)",
                                "outputs")
        if outputs.exists() and not outputs.is_dir():
            raise PipelineError(f"{{subject}} {outputs} is a file; give a folder", "outputs")
        if not outputs.exists():
            check_can_create(outputs / "x.npz", "outputs")
    return files, outputs


def engine_settings(cfg, ed) -> str:
    """What a class's saved state depends on besides its volume, box and clicks: the models, the rules (as
    the editor holds them, margins in px) and the code."""
    from sambtcv.study.records import code_version

    keys = ("model", "point_model", "checkpoint", "finetuned", "dtype", "encoder_dtype", "runtime", "stop")
    return json.dumps({**{k: cfg[k] for k in keys}, "rules": repr(ed.rules), "code": code_version()["version"]},
                      sort_keys=True, default=str)


def predict_file(path: Path, outputs: Path, models, cfg, device) -> None:
    """One challenge file -> its segs, written atomically; PipelineError for a file that cannot be used."""
    from sambtcv.engine import segfm

    case = segfm.read_case(path)
    t0 = time.perf_counter()
    ed = editor(case.imgs, models, cfg, device, Geometry.of(case.spacing), in_range=case.boxes is not None)
    segs = predict(ed, case, StateStore(Path(cfg["cache_dir"]) / STATES_FOLDER), engine_settings(cfg, ed))
    outputs.mkdir(parents=True, exist_ok=True)
    segfm.write_segs(outputs / path.name, segs)
    steps = max((len(c) for c in case.clicks), default=0)
    print(f"{path.name}: {case.n_classes} classes, {steps} click(s) each at most, {time.perf_counter() - t0:.1f} s",
          flush=True)


def main(argv=None):
    cfg = parse_config(globals(), argv)
    files, outputs = check_folders(cfg)
    device = start_run(cfg)
    models = load_editor_models(cfg, device)
    failed = 0
    for path in files:
        try:
            predict_file(path, outputs, models, cfg, device)
        except PipelineError as exc:
            failed += 1
            text = str(exc)
            print(f"error: {text if text.startswith(path.name) else f'{path.name}: {text}'}", file=sys.stderr,
                  flush=True)
    if failed:
        sys.exit(2)


if __name__ == "__main__":
    run_main(main)
