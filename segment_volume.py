"""3D: one prompt per organ, propagated through a CT volume; a NIfTI label map that overlays the CT.

    python segment_volume.py --image ct.nii.gz --prompts prompts.json --out ct_sam.nii.gz       # your own prompts
    python segment_volume.py --image ct.nii.gz --label label.nii.gz --organs liver,spleen --out pred.nii.gz
    python segment_volume.py --data-dir RAW --split val --results-dir results                  # evaluation

The volume goes through preprocess.py's own path (MONAI load, reorientation to ORIENTATION, HU window)
and is cut into the same axial slices. Each organ is prompted on one slice (a box, points, or a 3D
box), and the mask is propagated slice by slice in both directions: the previous mask's box, enlarged
by MARGIN_MM millimetres, prompts the next slice, until the STOP rule ends the walk (`propagation.py`).
Overlapping organs: the highest mask logit wins. The label map (BTCV ids) is written with the input
image's exact shape and affine (the reorientation undone), so it opens over the CT in ITK-SNAP or 3D
Slicer. Embeddings are cached under CACHE_DIR by (volume content, model, encoder dtype): a second run
on the same CT makes no encoder pass.

Evaluation (--data-dir): for every case of the split and every organ in its label, (a) a tight box on
the organ's largest slice, propagated, and (b) a ground-truth box on every slice (the upper bound);
3D Dice and HD95 (mm) per organ and case -> volume_3d.json / .md, volumes/<case>.nii.gz (prediction a)
and figures/volume_3d_<case>.png (three orthogonal views).
"""
from __future__ import annotations

import json
import math
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

import utils
from cli import (DEFAULT_DEVICE, DEFAULT_DTYPE, DEFAULT_MODEL, DEFAULT_RESULTS_DIR, DEFAULT_SEED, PipelineError,
                 check_choice, parse_config, run_main, start_run)
from files import (Results, check_can_create, markdown_table, results_lock, save_figure, write_bytes, write_json,
                   write_text)
from models import load_backbone, load_decoder
from preprocess import (NIFTI_SUFFIXES, ORIENTATION, SPLITS, WINDOW_HU, axial_slice, check_geometry, find_cases,
                        from_stored_axes, load_image, load_label, parse_window, read_header, to_stored_axes, to_uint8)
from propagation import STOP_RULES, OrganMasks, VolumeDecoder, merge, propagate
from utils import Prompt, bound_box, dice_score

# ---------------------------------------------------------------------------------------------- config
IMAGE = None  # a CT volume (.nii.gz) to segment
PROMPTS = None  # with --image: prompts.json (README: "Prompts file")
LABEL = None  # with --image: a label map on the image's grid; one box per organ comes from it
ORGANS = "all"  # with --label: organs to segment (comma list of names, or all)
OUT = None  # with --image: the predicted label map (.nii.gz) to write
DATA_DIR = None  # evaluation: a dataset in one of the contract's layouts
SPLIT = "val"  # evaluation: val | train
RESULTS_DIR = DEFAULT_RESULTS_DIR  # evaluation: volume_3d.json / .md, volumes/, figures/ go here
MODEL = DEFAULT_MODEL  # mobilesam | litemedsam | vit_b | vit_l | vit_h
CHECKPOINT = None  # backbone weights (see segmentation_task1.py)
FINETUNED = None  # a Task 2 checkpoint whose decoder is used instead of the pretrained one
CACHE_DIR = "data/embeddings_3d"  # image embeddings by (volume content, model, encoder dtype)
STOP = "intensity"  # when the walk ends: intensity | vanish | iou | overlap (propagation.STOP_RULES)
MARGIN_MM = "auto"  # mm added on each side of the previous box to prompt the next slice, >= 0; auto: per model
WINDOW_HU = WINDOW_HU  # HU window, as preprocess.py
SEED = DEFAULT_SEED  # accepted for a uniform interface; nothing here is random (>= 0)
DEVICE = DEFAULT_DEVICE  # cpu | cuda; empty: cuda when present
DTYPE = DEFAULT_DTYPE  # fp32 | bf16 autocast of the decoder
ENCODER_DTYPE = DEFAULT_DTYPE  # fp32 | bf16 autocast of the image encoder
# -----------------------------------------------------------------------------------------------------

# The margin each model propagated best with (docs/MEASUREMENTS.md, section 6): box-trained LiteMedSAM
# gains from a looser box, SAM's decoder (MobileSAM) from a tighter one.
MARGIN_MM_BY_MODEL = {"litemedsam": 6.0, "mobilesam": 4.0}
DEFAULT_MARGIN_MM = 4.0


def margin_for(cfg: dict, model: str) -> float:
    """--margin-mm in mm (a finite number >= 0, 0 included), or the model's own margin for "auto"."""
    text = str(cfg["margin_mm"]).strip().lower()
    if text == "auto":
        return MARGIN_MM_BY_MODEL.get(model, DEFAULT_MARGIN_MM)
    try:
        value = float(text)
    except ValueError:
        value = math.nan
    if not (math.isfinite(value) and value >= 0):
        raise PipelineError(f"--margin-mm must be auto or a number of mm >= 0, got {cfg['margin_mm']!r}")
    return value


@dataclass
class Case:
    """One CT in the slice frame: uint8 slices (K, H, W), optional label (K, H, W), spacing (mm) of
    (row, column, slice) = (j, i, k) of the reoriented volume."""

    name: str
    image_path: Path
    stack: np.ndarray
    label: np.ndarray | None
    spacing: tuple


def load_case(name: str, image: Path, label: Path | None, window) -> Case:
    import nibabel as nib

    header = read_header(image)  # a 3D volume, or one line
    if label is not None:
        check_geometry(image, label)
    vol = to_uint8(load_image(image, ORIENTATION, window))
    stack = np.stack([axial_slice(vol, k) for k in range(vol.shape[2])])
    lab = None
    if label is not None:
        lv = load_label(label, ORIENTATION)
        lab = np.stack([axial_slice(lv, k) for k in range(lv.shape[2])])
    zooms = np.asarray(header.header.get_zooms()[:3], float)
    ornt = nib.orientations.io_orientation(header.affine)
    canon = np.empty(3)
    canon[ornt[:, 0].astype(int)] = zooms  # spacing along the reoriented axes (i, j, k)
    return Case(name, image, stack, lab, (float(canon[1]), float(canon[0]), float(canon[2])))


def write_label_map(labels: np.ndarray, case: Case, out: Path) -> Path:
    """The (K, H, W) label stack as a NIfTI in the input image's own axes, shape and affine."""
    import nibabel as nib

    src = nib.load(str(case.image_path))
    volume = to_stored_axes(labels.transpose(2, 1, 0), case.image_path, ORIENTATION).astype(np.uint8)
    header = src.header.copy()
    header.set_data_dtype(np.uint8)
    img = nib.Nifti1Image(volume, src.affine, header)
    img.header.set_slope_inter(1, 0)
    return write_bytes(out, img.to_bytes() if not str(out).endswith(".gz") else _gz(img.to_bytes()))


def _gz(raw: bytes) -> bytes:
    import gzip

    return gzip.compress(raw, compresslevel=6, mtime=0)


# ---------------------------------------------------------------------------------------------- prompts
def organ_ids(text: str) -> list[int]:
    if text == "all":
        return list(range(1, utils.NUM_ORGANS + 1))
    names = [n.strip() for n in text.split(",") if n.strip()]
    for n in names:
        if n not in utils.ORGAN_ID:
            raise PipelineError(f"unknown organ {n!r}; use names from: {', '.join(utils.ORGANS)}")
    return [utils.ORGAN_ID[n] for n in names]


def _numbers(value, n: int, what: str) -> list[float]:
    if not isinstance(value, list) or len(value) != n or not all(isinstance(v, (int, float)) for v in value):
        raise PipelineError(f"{what} must be a list of {n} numbers, got {value!r}")
    return [float(v) for v in value]


def check_box(box, hw, what: str) -> np.ndarray:
    x0, y0, x1, y1 = _numbers(box, 4, what)
    h, w = hw
    if not (0 <= x0 < x1 <= w - 1 and 0 <= y0 < y1 <= h - 1):
        raise PipelineError(f"{what} {box} is outside the {w} x {h} slice or has zero size (XYXY, x0 < x1, y0 < y1)")
    return np.array([x0, y0, x1, y1])


@dataclass
class OrganPrompt:
    """A parsed prompt: slice k with a Prompt (and point labels), or a 3D box as a slice range + XYXY box."""

    organ: int
    k: int
    prompt: Prompt
    point_labels: list | None = None
    k_range: tuple | None = None


def parse_prompt(name: str, spec, case: Case) -> OrganPrompt:
    what = f"prompts[{name!r}]"
    if name not in utils.ORGAN_ID:
        raise PipelineError(f"unknown organ {name!r} in the prompts file; use names from: {', '.join(utils.ORGANS)}")
    if not isinstance(spec, dict):
        raise PipelineError(f"{what} must be an object with slice and box/points, or box3d")
    n_k, h, w = case.stack.shape
    organ = utils.ORGAN_ID[name]
    if "box3d" in spec:
        return box3d_prompt(organ, _numbers(spec["box3d"], 6, f"{what}['box3d']"), case)
    k = spec.get("slice")
    if not isinstance(k, int) or not 0 <= k < n_k:
        raise PipelineError(f"{what}['slice'] must be a slice index in 0..{n_k - 1}, got {k!r}")
    if "box" in spec:
        return OrganPrompt(organ, k, Prompt(box=check_box(spec["box"], (h, w), f"{what}['box']")))
    points = spec.get("points")
    if not isinstance(points, list) or not points:
        raise PipelineError(f"{what} needs a 'box' [x0, y0, x1, y1] or 'points' [[x, y], ...]")
    xy = np.array([_numbers(p, 2, f"{what}['points']") for p in points])
    if not ((0 <= xy[:, 0]) & (xy[:, 0] <= w - 1) & (0 <= xy[:, 1]) & (xy[:, 1] <= h - 1)).all():
        raise PipelineError(f"{what}['points'] has a point outside the {w} x {h} slice")
    labels = spec.get("labels", [1] * len(points))
    if not isinstance(labels, list) or len(labels) != len(points) or any(v not in (0, 1) for v in labels):
        raise PipelineError(f"{what}['labels'] must be one 0 (background) or 1 (organ) per point")
    return OrganPrompt(organ, k, Prompt(points=xy), point_labels=labels)


def box3d_prompt(organ: int, box, case: Case) -> OrganPrompt:
    """A voxel box of the stored file -> the slice range and XYXY box in the slice frame."""
    import nibabel as nib

    shape = nib.load(str(case.image_path)).shape
    i0, j0, k0, i1, j1, k1 = (int(v) for v in box)
    if not all(0 <= a < b < n for a, b, n in zip((i0, j0, k0), (i1, j1, k1), shape)):
        raise PipelineError(f"box3d {box} must hold i0 < i1, j0 < j1, k0 < k1 inside the image's {shape} voxels")
    mask = np.zeros(shape, bool)
    mask[i0:i1 + 1, j0:j1 + 1, k0:k1 + 1] = True
    canon = from_stored_axes(mask, case.image_path, ORIENTATION)
    idx = [np.flatnonzero(canon.any(axis=tuple(a for a in range(3) if a != d))) for d in range(3)]
    (ci0, ci1), (cj0, cj1), (ck0, ck1) = [(int(v[0]), int(v[-1])) for v in idx]
    xyxy = np.array([ci0, cj0, ci1, cj1], float)  # slice frame: x = i, y = j
    return OrganPrompt(organ, (ck0 + ck1) // 2, Prompt(box=xyxy), k_range=(ck0, ck1))


def read_prompts(path, case: Case) -> list[OrganPrompt]:
    try:
        spec = json.loads(Path(path).read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise PipelineError(f"cannot read the prompts file {path}: {exc}") from exc
    if not isinstance(spec, dict) or not spec:
        raise PipelineError(f"the prompts file {path} must map organ names to prompts (README: Prompts file)")
    return [parse_prompt(name, value, case) for name, value in spec.items()]


def label_prompts(case: Case, organs: list[int]) -> list[OrganPrompt]:
    """One tight box per organ, on the slice where the organ's label is largest."""
    out = []
    for organ in organs:
        areas = (case.label == organ).sum(axis=(1, 2))
        if areas.any():
            k = int(np.argmax(areas))
            out.append(OrganPrompt(organ, k, Prompt(box=bound_box(case.label[k] == organ))))
    return out


# ---------------------------------------------------------------------------------------------- segmenting
def segment(dec: VolumeDecoder, prompts: list[OrganPrompt], cfg: dict, spacing) -> list[OrganMasks]:
    """Each organ's prompt decoded on its slice and propagated; MARGIN_MM is converted with the in-plane
    pixel size (`spacing` = row, column, slice mm)."""
    pixel_mm = (spacing[0] + spacing[1]) / 2
    margin_mm = margin_for(cfg, dec.backbone.name)
    out = []
    for p in prompts:
        first = dec.decode(p.k, p.prompt, p.point_labels)
        limit = p.prompt.box if p.k_range is not None else None
        out.append(propagate(dec, p.organ, p.k, first, cfg["stop"], margin_mm / pixel_mm, p.k_range, limit))
    return out


def every_slice_boxes(dec: VolumeDecoder, case: Case, organs: list[int]) -> list[OrganMasks]:
    """The upper bound: a ground-truth box on every slice that holds the organ."""
    out = []
    for organ in organs:
        om = OrganMasks(organ)
        for k in np.flatnonzero((case.label == organ).any(axis=(1, 2))):
            om.slices[int(k)] = dec.decode(int(k), Prompt(box=bound_box(case.label[k] == organ)))
            om.visited += 1
        out.append(om)
    return out


# ---------------------------------------------------------------------------------------------- evaluation
def hd95(pred: np.ndarray, gt: np.ndarray, spacing) -> float | None:
    """95th-percentile Hausdorff distance in mm (MONAI), None when the prediction or the ground truth is
    empty."""
    import torch
    from monai.metrics import compute_hausdorff_distance

    if not pred.any() or not gt.any():
        return None
    value = compute_hausdorff_distance(torch.from_numpy(pred[None, None]), torch.from_numpy(gt[None, None]),
                                       percentile=95, spacing=[spacing[2], spacing[0], spacing[1]])
    return float(value.item())


def score_case(case: Case, one_box: np.ndarray, every_slice: np.ndarray, organs: list[int]) -> dict:
    """Per organ: 3D Dice (the project's Dice, on the stacked slices) and HD95 of both predictions."""
    out = {}
    for organ in organs:
        gt = case.label == organ
        a, b = one_box == organ, every_slice == organ
        out[utils.organ_name(organ)] = {"dice_one_box": float(dice_score(a, gt)),
                                        "dice_every_slice_box": float(dice_score(b, gt)),
                                        "hd95_one_box": hd95(a, gt, case.spacing),
                                        "hd95_every_slice_box": hd95(b, gt, case.spacing)}
    return out


def mean_scores(cases: dict) -> dict:
    out = {}
    for key in ("dice_one_box", "dice_every_slice_box", "hd95_one_box"):
        per = {}
        for scores in cases.values():
            for organ, s in scores.items():
                if s[key] is not None:
                    per.setdefault(organ, []).append(s[key])
        out[key] = {o: float(np.mean(per[o])) for o in utils.ORGANS if o in per}
    return out


def views_figure(case: Case, pred: np.ndarray):
    """Axial, coronal and sagittal views through the labelled organs' centre: CT, ground truth, prediction."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fg = np.argwhere(case.label > 0)
    k, y, x = (fg.mean(0) if len(fg) else np.array(case.stack.shape) / 2).astype(int)
    cuts = {"axial": np.s_[k, :, :], "coronal": np.s_[::-1, y, :], "sagittal": np.s_[::-1, :, x]}
    aspect = {"axial": case.spacing[0] / case.spacing[1], "coronal": case.spacing[2] / case.spacing[1],
              "sagittal": case.spacing[2] / case.spacing[0]}
    cmap = plt.get_cmap("tab20", utils.NUM_ORGANS + 1)
    fig, axes = plt.subplots(2, 3, figsize=(13, 8.5))
    for col, (view, cut) in enumerate(cuts.items()):
        for row, (what, lab) in enumerate((("ground truth", case.label), ("prediction, one box per organ", pred))):
            ax = axes[row, col]
            ax.imshow(case.stack[cut], cmap="gray", aspect=aspect[view])
            ax.imshow(np.ma.masked_equal(lab[cut], 0), cmap=cmap, vmin=0, vmax=utils.NUM_ORGANS, alpha=0.45,
                      interpolation="nearest", aspect=aspect[view])
            ax.set_title(f"{case.name} {view}: {what}", fontsize=9)
            ax.axis("off")
    return fig


def evaluate_case(case: Case, dec: VolumeDecoder, cfg: dict, res: Results) -> dict:
    organs = utils.present_organs(case.label)
    one_box = merge(segment(dec, label_prompts(case, organs), cfg, case.spacing), case.stack.shape)
    every = merge(every_slice_boxes(dec, case, organs), case.stack.shape)
    write_label_map(one_box, case, res.volumes / f"{case.name}.nii.gz")
    save_figure(views_figure(case, one_box), res.figure(f"volume_3d_{case.name}"))
    return score_case(case, one_box, every, organs)


def volume_markdown(result: dict) -> str:
    mean = result["mean"]
    organs = list(mean["dice_one_box"])
    rows = [[o, mean["dice_one_box"][o], mean["dice_every_slice_box"].get(o), mean["hd95_one_box"].get(o)]
            for o in organs]
    return (f"## 3D: one box per organ ({result['model']}, {len(result['cases'])} case(s), stop rule "
            f"'{result['stop']}', margin {result['margin_mm']} mm)\n\n"
            + markdown_table(["organ", "3D Dice, one box propagated", "3D Dice, a box on every slice (upper bound)",
                              "HD95 one box (mm)"], rows)
            + f"\nOne box = a tight box on the organ's largest slice, propagated slice by slice "
              f"({STOP_RULES[result['stop']]} ends the walk). Upper bound = a ground-truth box on each slice. "
              f"{result['encoder_passes']} encoder passes for {result['visited_slices']} visited slices, "
              f"{result['seconds']:.0f} s.\n")


def evaluate_split(cfg: dict, device, res: Results) -> dict:
    check_choice(cfg["split"], SPLITS, "--split")
    cases = find_cases(Path(cfg["data_dir"]))[cfg["split"]]
    if not cases:
        raise PipelineError(f"the {cfg['split']} split of {cfg['data_dir']} has no cases")
    window = parse_window(cfg["window_hu"])
    for _, image, label in cases:  # every case readable and on its label's grid before any work
        check_geometry(image, label)
    t0 = time.perf_counter()
    backbone = load_backbone(cfg["model"], cfg["checkpoint"], device)
    decoder = load_decoder(backbone, cfg["finetuned"]).to(device)
    scores, passes, visited = {}, 0, 0
    for name, image, label in cases:
        case = load_case(name, image, label, window)
        dec = VolumeDecoder(case.stack, backbone, decoder, cfg["cache_dir"], device, cfg["dtype"], cfg["encoder_dtype"])
        scores[name] = evaluate_case(case, dec, cfg, res)
        passes, visited = passes + dec.encoder_passes, visited + len(dec.visited)
        print(f"{name}: " + ", ".join(f"{o} {s['dice_one_box']:.3f}" for o, s in scores[name].items()), flush=True)
    result = {"model": backbone.name, "finetuned": cfg["finetuned"], "stop": cfg["stop"],
              "margin_mm": margin_for(cfg, backbone.name),
              "encoder_passes": passes, "visited_slices": visited, "seconds": round(time.perf_counter() - t0, 2),
              "cases": scores, "mean": mean_scores(scores)}
    write_json(res.table("volume_3d", "json"), result)
    write_text(res.table("volume_3d", "md"), volume_markdown(result))
    return result


# ---------------------------------------------------------------------------------------------- main
def check_out(out, inputs: list[Path]) -> Path:
    """--out: a new or replaceable .nii/.nii.gz file in a writable folder, never one of the inputs."""
    if not out:
        raise PipelineError("--image needs --out PRED.nii.gz (where the label map goes)")
    out = Path(out)
    if out.is_dir():
        raise PipelineError(f"--out {out} is a folder; give a file name such as {out / 'pred.nii.gz'}")
    if not out.name.endswith(NIFTI_SUFFIXES):
        raise PipelineError(f"--out {out} must end with .nii.gz or .nii (a NIfTI label map)")
    for given in inputs:
        if out.exists() and given.exists() and out.samefile(given):
            raise PipelineError(f"--out {out} is an input of this run; write the label map to another file")
    check_can_create(out, "--out")  # creates nothing: a run that fails later leaves no folder behind
    return out


def segment_image(cfg: dict, device) -> None:
    """--image with --prompts or --label: write --out."""
    if bool(cfg["prompts"]) == bool(cfg["label"]):
        raise PipelineError("--image needs either --prompts PROMPTS.json or --label LABEL.nii.gz")
    image = Path(cfg["image"])
    if not image.is_file():
        raise PipelineError(f"--image {image} not found")
    check_out(cfg["out"], [image] + ([Path(cfg["label"])] if cfg["label"] else []))
    organs = organ_ids(cfg["organs"])
    backbone = load_backbone(cfg["model"], cfg["checkpoint"], device)  # a bad model or --finetuned fails before the CT
    decoder = load_decoder(backbone, cfg["finetuned"]).to(device)
    case = load_case(image.name, image, Path(cfg["label"]) if cfg["label"] else None, parse_window(cfg["window_hu"]))
    prompts = read_prompts(cfg["prompts"], case) if cfg["prompts"] else label_prompts(case, organs)
    if not prompts:
        raise PipelineError(f"none of the organs {cfg['organs']} is in --label {cfg['label']}")
    dec = VolumeDecoder(case.stack, backbone, decoder, cfg["cache_dir"], device, cfg["dtype"], cfg["encoder_dtype"])
    labels = merge(segment(dec, prompts, cfg, case.spacing), case.stack.shape)
    write_label_map(labels, case, Path(cfg["out"]))
    for p in prompts:
        n = int((labels == p.organ).sum())
        line = f"{utils.organ_name(p.organ)}: {n} voxels on {int((labels == p.organ).any(axis=(1, 2)).sum())} slices"
        if case.label is not None:
            line += f", 3D Dice {dice_score(labels == p.organ, case.label == p.organ):.4f}"
        print(line)
    print(f"{dec.encoder_passes} encoder passes; wrote {cfg['out']}")


def main(argv=None):
    cfg = parse_config(globals(), argv)
    device = start_run(cfg)
    check_choice(cfg["stop"], STOP_RULES, "--stop")
    margin_for(cfg, cfg["model"])
    organ_ids(cfg["organs"])
    if cfg["image"]:
        segment_image(cfg, device)
        return
    if not cfg["data_dir"]:
        raise PipelineError("give --image CT.nii.gz (with --prompts or --label, and --out) or --data-dir RAW (evaluation)")
    res = Results(cfg["results_dir"])
    with results_lock(res.root):
        result = evaluate_split(cfg, device, res)
    print(volume_markdown(result), end="")
    print(f"wrote {res.table('volume_3d', 'md')}")


if __name__ == "__main__":
    run_main(main)
