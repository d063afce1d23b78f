"""Would an INT8 image encoder do? NNCF's post-training quantization of a model's OpenVINO encoder, timed against
fp32 and its masks compared with fp32's on real CT, per prompt type (docs/MEASUREMENTS.md, section 12).

    pip install nncf==3.4.0                      # not a dependency of the project: INT8 stays off (section 12)
    python tools/int8_check.py --model litemedsam --data-dir ../shared/data/real_ct_dev
    python tools/int8_check.py --model mobilesam --data-dir ../shared/data/real_ct_dev --calibration-dir DATA

Calibration: CALIBRATION_SLICES slices of the phantom's training cases (data/phantom_quick, written by the quick
report; or every case of --calibration-dir), as the encoder sees them. Comparison: every organ of at least
MIN_AREA pixels on every SLICE_STEP-th slice of --data-dir's cases, prompted with its tight box and with a point at
its middle pixel; the agreement is the Dice of the INT8 mask against the fp32 one (1 where both are empty).
Prints one JSON line: seconds per slice in fp32 and INT8, mean and lowest agreement per prompt type.
"""
from __future__ import annotations

import json
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from sambtcv.cli import parse_config, run_main  # noqa: E402
from sambtcv.core.errors import PipelineError  # noqa: E402

# ---------------------------------------------------------------------------------------------- config
MODEL = "litemedsam"  # litemedsam | mobilesam: whose encoder is quantized
DATA_DIR = None  # labelled CTs to compare the masks on (any layout of the contract; both splits)
CALIBRATION_DIR = "data/phantom_quick"  # CTs to calibrate on (the quick report's phantom: its training cases)
CALIBRATION_SLICES = 48  # slices the quantization sees (>= 1)
SLICE_STEP = 6  # compare on every n-th slice of each case (>= 1)
MIN_AREA = 50  # pixels: smaller organ sections are not compared (>= 1)
PRESET = "transformer"  # transformer (NNCF's ModelType.TRANSFORMER) | cnn | weights (INT8 weights, fp32 activations)
CACHE_DIR = "data/model_cache"  # the fp32 OpenVINO encoder, converted once
SEED = 0  # accepted for a uniform interface; nothing here is random
DEVICE = "cpu"  # OpenVINO runs on the CPU
# -----------------------------------------------------------------------------------------------------

PRESETS = ("transformer", "cnn", "weights")


def slices_of(folder: Path, step: int, window=(-160.0, 240.0)):
    from sambtcv.data.btcv import find_cases
    from sambtcv.engine.volume import load_case

    found = find_cases(folder)
    for name, image, label in found["train"] + found["val"]:
        case = load_case(name, image, label, window)
        for k in range(0, len(case.stack), step):
            yield case.stack[k], case.label[k]


def main(argv=None):
    cfg = parse_config(globals(), argv)
    if cfg["preset"] not in PRESETS:
        raise PipelineError(f"--preset must be one of {', '.join(PRESETS)}")
    if not cfg["data_dir"]:
        raise PipelineError("give --data-dir: labelled CTs to compare the masks on")
    try:
        import nncf
    except ImportError:
        raise PipelineError("this check needs NNCF: pip install nncf==3.4.0 (the project does not depend on "
                            "it)") from None
    from sambtcv.core.prompts import Prompt, bound_box
    from sambtcv.models import openvino_runtime as ovr
    from sambtcv.models.backbones import load_backbone
    from sambtcv.models.decoder import load_decoder

    bb = load_backbone(cfg["model"], None, "cpu")
    fp32 = ovr.OpenVinoEncoder(bb, "fp32", cfg["cache_dir"]).cache.model(None)

    def encoder_input(sl):
        return bb.sam.preprocess(bb.frame.image(sl)[None]).numpy()

    cal = [encoder_input(s) for s, _ in slices_of(Path(cfg["calibration_dir"]), 2)][:cfg["calibration_slices"]]
    t0 = time.perf_counter()
    if cfg["preset"] == "weights":
        int8 = nncf.compress_weights(fp32)
    else:
        kind = {"model_type": nncf.ModelType.TRANSFORMER} if cfg["preset"] == "transformer" else {}
        int8 = nncf.quantize(fp32, nncf.Dataset(cal), subset_size=len(cal), **kind)
    quantize_s = time.perf_counter() - t0
    requests = [ovr.compile_model(m, "fp32").create_infer_request() for m in (fp32, int8)]
    dec = load_decoder(bb).eval()
    seconds, agree = [0.0, 0.0], {"box": [], "point": []}
    n_slices = 0
    for sl, lab in slices_of(Path(cfg["data_dir"]), cfg["slice_step"]):
        x, embs = encoder_input(sl), []
        n_slices += 1
        for i, req in enumerate(requests):
            t = time.perf_counter()
            req.infer({0: x})
            seconds[i] += time.perf_counter() - t
            embs.append(torch.from_numpy(req.get_output_tensor(0).data.copy()))
        for organ in (o for o in np.unique(lab) if o and (lab == o).sum() >= cfg["min_area"]):
            m = lab == organ
            ys, xs = np.nonzero(m)
            box = bb.frame.prompt(Prompt(box=np.array(bound_box(m), float)), sl.shape).box
            point = bb.frame.coords_to_input(np.array([[xs[len(xs) // 2], ys[len(ys) // 2]]], float), sl.shape)
            prompts = {"box": {"boxes": torch.tensor(box[None], dtype=torch.float32)},
                       "point": {"points": torch.tensor(point[None], dtype=torch.float32),
                                 "point_labels": torch.ones(1, 1)}}
            for kind, kw in prompts.items():
                with torch.no_grad():
                    a, b = ((dec(e, **kw)[0] > 0).numpy() for e in embs)
                total = a.sum() + b.sum()
                agree[kind].append(1.0 if total == 0 else float(2 * (a & b).sum() / total))
    print(json.dumps({"model": cfg["model"], "preset": cfg["preset"], "calibration": cfg["calibration_dir"],
                      "calibration_slices": len(cal), "quantize_s": round(quantize_s, 1), "slices": n_slices,
                      "s_per_slice_fp32": round(seconds[0] / n_slices, 3),
                      "s_per_slice_int8": round(seconds[1] / n_slices, 3),
                      **{f"{k}_agreement_mean": round(float(np.mean(v)), 4) for k, v in agree.items()},
                      **{f"{k}_agreement_min": round(float(np.min(v)), 4) for k, v in agree.items()},
                      "organ_sections": len(agree["box"])}))


if __name__ == "__main__":
    run_main(main)
