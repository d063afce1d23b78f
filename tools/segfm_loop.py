"""The challenge's evaluation loop around predict_segfm.py: each step of each case in a new process, as the
SEGFM3D challenge runs a submission's container (a 3D box, then 5 clicks at the largest error).

    python tools/segfm_loop.py --data-dir RAW --work DIR                 # every labelled organ (--organs a,b: some)
    python tools/segfm_loop.py --npz-dir CASES --work DIR        # challenge .npz files holding gts

Each case is written as the challenge hands it over (imgs (D, H, W) uint8, spacing, boxes; the labels kept
apart), then for every step: `predict_segfm.py --inputs DIR/inputs --outputs DIR/outputs` in a new Python
(its wall time is the step's time), the prediction scored (DSC per class), the next click per class added
to the input (`clicks`, `clicks_order`, `prev_pred`) as the challenge's loop adds it. Writes
DIR/segfm_loop.json: per case and class the DSC per step and each step's seconds. The boxes and clicks
follow `sambtcv.engine.segfm` (the challenge's rules and seeds), so this gives what `interactive_eval.py` gives
in one process, plus the time a container per step costs.
"""
from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from sambtcv.cli import parse_config, run_main  # noqa: E402
from sambtcv.core.errors import PipelineError  # noqa: E402
from sambtcv.core.files import write_json  # noqa: E402

# ---------------------------------------------------------------------------------------------- config
DATA_DIR = None  # a dataset in one of the contract's layouts (its SPLIT is measured)
NPZ_DIR = None  # or: challenge .npz files holding gts
SPLIT = "val"  # with --data-dir: val | train
ORGANS = "all"  # with --data-dir: organs to measure where labelled (all: BTCV's 13), e.g. spleen,liver
WORK = None  # a new folder for the inputs, outputs and segfm_loop.json
CLICKS = 5  # click steps after the box (>= 0)
PREDICTOR_ARGS = ""  # more flags for predict_segfm.py (e.g. "--cache-dir DIR --model mobilesam")
WINDOW_HU = "-160,240"  # with --data-dir: HU window, as preprocess.py
SEED = 0  # accepted for a uniform interface; boxes and clicks use the challenge's own seeds
DEVICE = "cpu"  # accepted for a uniform interface; the predictor picks its own
# -----------------------------------------------------------------------------------------------------

ROOT = Path(__file__).resolve().parents[1]


def cases_of(cfg):
    """(name, imgs, spacing (z, y, x), gts with classes 1..n, organ names) of each case."""
    from sambtcv.cli import split_cases
    from sambtcv.core import names
    from sambtcv.engine import segfm
    from sambtcv.engine.volume import load_case

    if cfg["npz_dir"]:
        for path in sorted(Path(cfg["npz_dir"]).glob("*.npz")):
            case = segfm.read_case(path)
            classes = [int(v) for v in np.unique(case.gts) if v > 0]
            gts = np.zeros(case.gts.shape, np.uint8)
            for i, v in enumerate(classes):
                gts[case.gts == v] = i + 1
            yield case.name, case.imgs, case.spacing, gts, [f"class_{v}" for v in classes]
        return
    wanted = names.organ_ids_arg(cfg["organs"])
    cases, window = split_cases(cfg)  # every case checked before the first step runs
    for name, image, label in cases:
        case = load_case(name, image, label, window)
        present = [o for o in wanted if (case.label == o).any()]
        if not present:
            continue
        gts = np.zeros(case.label.shape, np.uint8)
        for i, o in enumerate(present):
            gts[case.label == o] = i + 1
        sp = case.spacing
        yield name, case.stack, (sp[2], sp[0], sp[1]), gts, [names.organ_name(o) for o in present]


def run_case(work: Path, name: str, imgs, spacing, gts, labels: list, cfg) -> dict:
    from sambtcv.engine import segfm

    inputs, outputs = work / "inputs", work / "outputs"
    for folder in (inputs, outputs):
        folder.mkdir(parents=True, exist_ok=True)
        for old in folder.glob("*.npz"):
            old.unlink()
    rng = np.random.RandomState(segfm.BOX_SEED)
    n = len(labels)
    boxes = [segfm.challenge_box(gts == i + 1, rng) for i in range(n)]
    clicks = [{"fg": [], "bg": []} for _ in range(n)]
    order: list = [[] for _ in range(n)]
    path = inputs / f"{name}.npz"
    segfm.write_case(path, imgs, spacing, boxes=boxes)
    steps = []
    for step in range(cfg["clicks"] + 1):
        t0 = time.perf_counter()
        r = subprocess.run([sys.executable, str(ROOT / "predict_segfm.py"), "--inputs", str(inputs), "--outputs",
                            str(outputs), *cfg["predictor_args"].split()], capture_output=True, text=True)
        seconds = time.perf_counter() - t0
        if r.returncode != 0:
            raise PipelineError(f"predict_segfm.py failed at step {step + 1} of {name}: {r.stderr.strip()[-300:]}")
        segs = np.load(outputs / f"{name}.npz")["segs"]
        dsc = [segfm.dsc(gts == i + 1, segs == i + 1) for i in range(n)]
        steps.append({"seconds": round(seconds, 2), "dsc": dsc})
        print(f"{name} step {step + 1}: {seconds:.1f} s, DSC " + " ".join(f"{d:.3f}" for d in dsc), flush=True)
        if step == cfg["clicks"]:
            break
        for i in range(n):
            c = segfm.next_click(gts == i + 1, segs == i + 1)
            if c is not None:
                clicks[i]["fg" if c.positive else "bg"].append([c.z, c.y, c.x])
                order[i].append("fg" if c.positive else "bg")
        segfm.write_case(path, imgs, spacing, boxes=boxes, clicks=clicks, clicks_order=order, prev_pred=segs)
    return {"labels": labels, "steps": steps,
            "dsc": {lab: [s["dsc"][i] for s in steps] for i, lab in enumerate(labels)}}


def main(argv=None):
    cfg = parse_config(globals(), argv)
    if bool(cfg["data_dir"]) == bool(cfg["npz_dir"]) or not cfg["work"]:
        raise PipelineError("give --work DIR and one of --data-dir RAW or --npz-dir CASES")
    work = Path(cfg["work"])
    out = {}
    for name, imgs, spacing, gts, labels in cases_of(cfg):
        out[name] = run_case(work, name, imgs, spacing, gts, labels, cfg)
    finals = [v[-1] for c in out.values() for v in c["dsc"].values()]
    firsts = [v[0] for c in out.values() for v in c["dsc"].values()]
    later = [s["seconds"] / len(c["labels"]) for c in out.values() for s in c["steps"][1:]]
    summary = {"dsc_step1_mean": float(np.mean(firsts)), "dsc_final_mean": float(np.mean(finals)),
               "dsc_final_min": float(np.min(finals)),
               "seconds_per_class_later_steps_max": float(max(later, default=0)),
               "seconds_per_class_step1_max": float(max(c["steps"][0]["seconds"] / len(c["labels"])
                                                        for c in out.values()))}
    write_json(work / "segfm_loop.json", {"summary": summary, "cases": out, "settings": dict(cfg)})
    print(json.dumps(summary, indent=1))


if __name__ == "__main__":
    run_main(main)
