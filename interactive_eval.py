"""Interactive 3D segmentation measured as the field measures it: a 3D box per organ, then 5 clicks at the
largest error (the protocol of the CVPR 2025 SEGFM3D challenge) -> interactive_3d.json / .md / .csv.

    python interactive_eval.py --data-dir RAW --split val --results-dir results        # the project's layouts
    python interactive_eval.py --npz-dir CASES --results-dir results                   # challenge .npz files (with gts)
    python interactive_eval.py --data-dir RAW --model mobilesam --point-model ""       # one model for all

Per case, through the engine the viewer and predict_segfm.py use (`sambtcv.engine.editor`): step 1 gives each
organ the challenge's 3D box (z range and a jittered 2D box on its middle slice) and walks it; steps 2-6
each add one click per organ at the centre of its largest 26-connected error component (+ where the
prediction misses the organ, - where it claims it wrongly). After every step: DSC and NSD (2 mm, MONAI's
surface Dice) per organ; then the AUCs over the click steps, the final values and the seconds per step
and organ. The record holds every number and click; Table 5 is the view. Boxes and clicks follow the
challenge's rules and seeds (`sambtcv.engine.segfm`), so the same data give the same table.
"""
from __future__ import annotations

import time
from pathlib import Path

import numpy as np

from sambtcv.cli import editor, flag, load_editor_models, parse_config, results_folder, run_main, split_cases, start_run
from sambtcv.core import config, names
from sambtcv.core.errors import PipelineError
from sambtcv.core.files import Results
from sambtcv.core.names import check_choice, organ_name
from sambtcv.engine.guard import Geometry
from sambtcv.engine.protocol import FIRST_STEPS, class_name, run_case
from sambtcv.engine.volume import load_case
from sambtcv.models import runtime
from sambtcv.study import records, tables

# ---------------------------------------------------------------------------------------------- config
DATA_DIR = None  # a dataset in one of the contract's layouts (its SPLIT is measured)
NPZ_DIR = None  # or: a folder of challenge .npz files holding imgs, spacing and gts
SPLIT = "val"  # with --data-dir: val | train
ORGANS = "all"  # with --data-dir: organs to measure where labelled (all: BTCV's 13), e.g. spleen,liver
RESULTS_DIR = config.RESULTS_DIR  # interactive_3d.json / .md / .csv and the record go here
MODEL = "litemedsam"  # the model of boxes and walks (box-trained LiteMedSAM measured best: MEASUREMENTS 10)
POINT_MODEL = "mobilesam"  # the model that answers clicks; empty: MODEL
CHECKPOINT = None  # MODEL's weights (see segmentation_task1.py)
FINETUNED = None  # a Task 2 checkpoint of MODEL whose decoder is used instead of the pretrained one
CACHE_DIR = config.CACHE_DIR_3D  # image embeddings by (volume content, model, encoder dtype)
STOP = config.STOP  # the walk's stop rule where no z range bounds it (propagation.STOP_RULES)
MARGIN_MM = "auto"  # mm around the previous mask's box; auto: per model, for walks inside a 3D box
CLICK = "local"  # how a click changes its slice: local | joint (sambtcv.engine.editor.CLICK_RULES)
AFTER_CLICK = "none"  # what a click does beyond its slice: none | walk (sambtcv.engine.editor.AFTER_CLICK)
MASK_INPUT = True  # a clicked slice's earlier low-res logits go back to SAM as its mask prompt
CARRY = True  # a click also corrects the neighbouring slices that share its error (Editor.carry)
GATE = True  # a click changes only pixels whose intensity backs it, where it can tell (Editor._gate)
GUARD = True  # a walk cuts a mask that outgrows or leaves the organ's last section (sambtcv.engine.guard)
REPAIR = True  # clicks repair: a wrong slab goes, a missed part or a doubted slice is walked (Editor.correct)
STRIDE_MM = config.STRIDE_MM  # > 0: a 3D box's first walk encodes a slice every this many mm (MEASUREMENTS 13); 0: all
CLICKS = 5  # click steps after the box (the challenge: 5) (>= 0)
FIRST = "box3d"  # step 1: box3d (the challenge's 3D box) | box (the viewer's: largest slice's box and P, no z range)
NSD = True  # also the normalised surface Dice per step (slower on large CTs)
WINDOW_HU = config.WINDOW_HU  # with --data-dir: HU window, as preprocess.py
SEED = config.SEED  # accepted for a uniform interface; boxes and clicks use the challenge's own seeds (>= 0)
DEVICE = config.DEVICE  # cpu | cuda; empty: cuda when present
DTYPE = config.DTYPE  # auto | fp32 | bf16 autocast of the decoder (fp32: LiteMedSAM measured better, MEASUREMENTS 10)
ENCODER_DTYPE = config.DTYPE  # auto | fp32 | bf16 autocast of the image encoder
RUNTIME = config.RUNTIME  # auto | torch | openvino: runs the encoder and the decoder (auto: openvino on a CPU)
# -----------------------------------------------------------------------------------------------------


def dataset_cases(cfg, organs: list[int]):
    """(name, stack, gt, spacing (z, y, x) mm, organs, their names) of each case of --data-dir's split, loaded
    one at a time; every case checked first."""
    cases, window = split_cases(cfg)

    def load():
        for name, image, label in cases:
            case = load_case(name, image, label, window)
            sp = case.spacing
            yield name, case.stack, case.label, (sp[2], sp[0], sp[1]), organs, organ_name
    return load()


def npz_cases(folder: Path):
    """The same of each challenge .npz with gts in `folder` (classes are its gts' values)."""
    from sambtcv.engine import segfm

    files = sorted(folder.glob("*.npz"))
    if not files:
        raise PipelineError(f"{{subject}} {folder} holds no .npz files", "npz dir")
    for path in files:  # every file readable and with gts before any work
        case = segfm.read_case(path)
        if case.gts is None:
            raise PipelineError(f"{path.name} has no gts; interactive_eval.py needs the reference labels")

    def load():
        for path in files:
            case = segfm.read_case(path)
            classes = [int(v) for v in np.unique(case.gts) if v > 0]
            yield case.name, case.imgs, case.gts, case.spacing, classes, class_name
    return load()


def measure(cfg, device, cases) -> dict:
    """Every case through the protocol; the record's result."""
    models = load_editor_models(cfg, device)
    out, t0 = {}, time.perf_counter()
    for name, stack, gt, spacing, organs, name_of in cases:
        ed = editor(stack, models, cfg, device, Geometry.of(spacing), in_range=cfg["first"] == "box3d")
        run = run_case(ed, name, gt, spacing, organs, cfg["clicks"], cfg["nsd"], name_of, cfg["first"])
        out[name] = {"organs": run.summary(),
                     "spacing": [float(s) for s in spacing], "shape": list(stack.shape)}
        for organ, s in out[name]["organs"].items():
            print(f"{name} {organ}: DSC " + " ".join(f"{v:.3f}" for v in s["dsc"])
                  + f" (AUC {s['dsc_auc']:.3f}); NSD final {s['nsd_final']:.3f}; s/step "
                  + " ".join(f"{v:.1f}" for v in s["seconds"]), flush=True)
        if not out[name]["organs"]:
            print(f"{name}: none of the organs asked for is labelled; left out", flush=True)
    return {"cases": out, "mean": tables.interactive_means(out), "seconds": round(time.perf_counter() - t0, 1),
            "model": cfg["model"], "point_model": cfg["point_model"] or cfg["model"]}


def settings_of(cfg, device) -> dict:
    """The record's settings: the run's constants, the runtime as resolved (auto -> what ran)."""
    keys = ("data_dir", "npz_dir", "split", "organs", "model", "point_model", "checkpoint", "finetuned", "stop",
            "margin_mm", "click", "after_click", "carry", "gate", "guard", "repair", "stride_mm", "mask_input",
            "clicks", "first", "nsd", "window_hu", "dtype", "encoder_dtype", "runtime", "cache_dir")
    out = {k: cfg[k] for k in keys}
    out["runtime"] = runtime.resolve(cfg["runtime"], device)
    for k in ("data_dir", "npz_dir"):
        out[k] = str(Path(out[k]).resolve()) if out[k] else None
    return out


def main(argv=None):
    cfg = parse_config(globals(), argv)
    device = start_run(cfg)
    if bool(cfg["data_dir"]) == bool(cfg["npz_dir"]):
        raise PipelineError("give --data-dir RAW (a dataset) or --npz-dir CASES (challenge .npz files), one of them")
    with flag("--organs"):
        organs = names.organ_ids_arg(cfg["organs"])
    with flag("--first"):
        check_choice(cfg["first"], FIRST_STEPS, "first step")
    with flag("--npz-dir"):
        cases = npz_cases(Path(cfg["npz_dir"])) if cfg["npz_dir"] else dataset_cases(cfg, organs)
    res = Results(cfg["results_dir"])
    with results_folder(res.root):
        result = measure(cfg, device, cases)
        what = (f"challenge files in {cfg['npz_dir']}" if cfg["npz_dir"]
                else f"{cfg['split']} split of {cfg['data_dir']}")
        records.write_record(res.root, "interactive_3d", settings_of(cfg, device), result, {"id": None, "data": what})
        view = tables.write_interactive(res.root)
    print(tables.interactive_markdown(view), end="")
    print(f"wrote {res.table('interactive_3d', 'md')}; organs {', '.join(organ_name(o) for o in organs)}")


if __name__ == "__main__":
    run_main(main)
