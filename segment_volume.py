"""3D: one prompt per organ, propagated through a CT volume; a NIfTI label map that overlays the CT.

    python segment_volume.py --image ct.nii.gz --prompts prompts.json --out ct_sam.nii.gz       # your own prompts
    python segment_volume.py --image ct.nii.gz --label label.nii.gz --organs liver,spleen --out pred.nii.gz
    python segment_volume.py --image DICOM_FOLDER --prompts prompts.json --out seg.dcm         # DICOM in, SEG out
    python segment_volume.py --data-dir RAW --split val --results-dir results                  # evaluation
    torchrun --nproc_per_node 4 segment_volume.py --data-dir RAW --split val --results-dir results   # cases shared out

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

import time
from pathlib import Path

import numpy as np

from sambtcv.cli import (
    ct_input,
    flag,
    input_file,
    label_map_out,
    load_models,
    parse_config,
    results_folder,
    run_main,
    split_cases,
    start_run,
    volume_decoder,
    walk_settings,
)
from sambtcv.core import config, names
from sambtcv.core.distributed import DistEnv, distributed
from sambtcv.core.errors import PipelineError
from sambtcv.core.files import Results, save_figure
from sambtcv.core.metrics import dice_score
from sambtcv.core.names import NUM_ORGANS, organ_name
from sambtcv.data.btcv import parse_window
from sambtcv.data.prompts_file import read_prompts_file
from sambtcv.engine.propagation import merge
from sambtcv.engine.volume import (
    Case,
    WalkSettings,
    case_prompt,
    evaluate_case,
    label_prompts,
    load_case,
    mean_scores,
    segment,
    walk_report,
    write_label_map,
)
from sambtcv.models.loading import Loaded
from sambtcv.study import records, tables

# ---------------------------------------------------------------------------------------------- config
IMAGE = None  # a CT to segment: a .nii.gz / .nii file, or a DICOM series (a folder of its files, or a .zip)
SERIES = None  # with a DICOM --image holding several series: the SeriesInstanceUID of the one to segment
PROMPTS = None  # with --image: prompts.json (README: "Prompts file")
LABEL = None  # with --image: a label map on the image's grid; one box per organ comes from it
ORGANS = "all"  # with --label or --data-dir: organs to segment, where labelled (comma list of names, or all)
OUT = None  # with --image: the label map to write: .nii.gz / .nii, or .dcm (a DICOM SEG; needs a DICOM series)
DATA_DIR = None  # evaluation: a dataset in one of the contract's layouts
SPLIT = "val"  # evaluation: val | train
RESULTS_DIR = config.RESULTS_DIR  # evaluation: volume_3d.json / .md, volumes/, figures/ go here
MODEL = config.MODEL  # mobilesam | litemedsam | vit_b | vit_l | vit_h
CHECKPOINT = None  # backbone weights (see segmentation_task1.py)
FINETUNED = None  # a Task 2 checkpoint whose decoder is used instead of the pretrained one
CACHE_DIR = config.CACHE_DIR_3D  # image embeddings by (volume content, model, encoder dtype)
STOP = config.STOP  # when the walk ends (propagation.STOP_RULES): intensity | continuity | vanish | iou | overlap | ...
MARGIN_MM = "auto"  # mm added on each side of the previous box to prompt the next slice, >= 0; auto: per model
GUARD = True  # a walk cuts a mask that outgrows or leaves the organ's last section (sambtcv.engine.guard)
STRIDE_MM = config.STRIDE_MM  # > 0: a 3D box's first walk encodes a slice every this many mm (MEASUREMENTS 13); 0: all
WINDOW_HU = config.WINDOW_HU  # HU window, as preprocess.py
SEED = config.SEED  # accepted for a uniform interface; nothing here is random (>= 0)
DEVICE = config.DEVICE  # cpu | cuda; empty: cuda when present
DTYPE = config.DTYPE  # auto | fp32 | bf16 autocast of the decoder
ENCODER_DTYPE = config.DTYPE  # auto | fp32 | bf16 autocast of the image encoder
RUNTIME = config.RUNTIME  # auto | torch | openvino: runs the encoder and the decoder (auto: openvino on a CPU)
# -----------------------------------------------------------------------------------------------------


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
    cmap = plt.get_cmap("tab20", NUM_ORGANS + 1)
    fig, axes = plt.subplots(2, 3, figsize=(13, 8.5))
    for col, (view, cut) in enumerate(cuts.items()):
        for row, (what, lab) in enumerate((("ground truth", case.label), ("prediction, one box per organ", pred))):
            ax = axes[row, col]
            ax.imshow(case.stack[cut], cmap="gray", aspect=aspect[view])
            ax.imshow(np.ma.masked_equal(lab[cut], 0), cmap=cmap, vmin=0, vmax=NUM_ORGANS, alpha=0.45,
                      interpolation="nearest", aspect=aspect[view])
            ax.set_title(f"{case.name} {view}: {what}", fontsize=9)
            ax.axis("off")
    return fig


def print_walks(walks: dict) -> None:
    """The log's lines of where each organ's walk stopped and why, and where it was unsure."""
    for organ, w in walks.items():
        stops = "; ".join(f"{s['direction']} at slice {s['slice']} ({s['reason']})" for s in w["stops"])
        unsure = ", ".join(str(u["slice"]) for u in w["unsure"])
        print(f"  {organ}: slices {w['slices']}, stopped {stops}" + (f"; unsure at {unsure}" if unsure else ""),
              flush=True)


def evaluate_cases(cases, window, walk: WalkSettings, cfg, env: DistEnv, res: Results, models: Loaded,
                   organs: list[int]) -> list:
    """This process's share of the cases, evaluated for `organs` (where labelled); their label maps and
    figures written. Returns [(name, scores, walks, encoder passes, visited slices)] of this rank, in case
    order."""
    out = []
    for name, image, label in env.mine(cases):
        case = load_case(name, image, label, window)
        dec = volume_decoder(case, models, cfg, env.device)
        result = evaluate_case(case, dec, walk, organs)
        write_label_map(result.one_box, case, res.volumes / f"{case.name}.nii.gz")
        save_figure(views_figure(case, result.one_box), res.figure(f"volume_3d_{case.name}"))
        print(f"{name}: " + ", ".join(f"{o} {s['dice_one_box']:.3f}" for o, s in result.scores.items()), flush=True)
        print_walks(result.walks)
        out.append((name, result.scores, result.walks, dec.encoder_passes, len(dec.visited)))
    return out


def evaluate_split(cfg, env: DistEnv, res: Results, organs: list[int], walk: WalkSettings) -> dict | None:
    """Every case of the split (shared out over the processes under torchrun); rank 0 writes the record
    and volume_3d.json / .md, in case order whatever the number of processes."""
    cases, window = split_cases(cfg)  # every case readable and on its label's grid before any work
    t0 = time.perf_counter()
    models = load_models(cfg, env.device)
    backbone = models.backbone
    parts = env.gather(evaluate_cases(cases, window, walk, cfg, env, res, models, organs))
    if not env.main:
        return None
    done = {name: rest for part in parts for name, *rest in part}
    order = [name for name, _, _ in cases]
    scores = {name: done[name][0] for name in order}
    walks = {name: done[name][1] for name in order}
    result = {"model": backbone.name, "finetuned": cfg["finetuned"], "stop": walk.stop, "margin_mm": walk.margin_mm,
              "guard": walk.guard, "stride_mm": walk.stride_mm,
              "encoder_passes": sum(done[n][2] for n in order), "visited_slices": sum(done[n][3] for n in order),
              "seconds": round(time.perf_counter() - t0, 2), "processes": env.world, "cases": scores,
              "mean": mean_scores(scores), "walks": walks}
    settings = {"model": backbone.name, "backbone": backbone.key, "checkpoint": backbone.checkpoint,
                "finetuned": cfg["finetuned"], "data_dir": str(Path(cfg["data_dir"]).resolve()), "split": cfg["split"],
                "organs": [organ_name(o) for o in organs], "stop": walk.stop, "margin_mm": walk.margin_mm,
                "guard": walk.guard, "stride_mm": walk.stride_mm, "window_hu": list(window), "dtype": cfg["dtype"],
                "encoder_dtype": cfg["encoder_dtype"], "runtime": models.runtime.name, "cache_dir": cfg["cache_dir"]}
    records.write_record(res.root, "volume_3d", settings, result,
                         {"id": None, "data": f"{cfg['split']} split of {cfg['data_dir']}"})
    return tables.write_volume(res.root)


# ---------------------------------------------------------------------------------------------- main
def check_out(out, inputs: list[Path]) -> Path:
    """--out: a new or replaceable .nii/.nii.gz file in a writable folder, never one of the inputs."""
    if not out:
        raise PipelineError("--image needs --out PRED.nii.gz (where the label map goes)")
    return label_map_out(out, inputs)


def segment_image(cfg, device, organs: list[int], walk: WalkSettings) -> None:
    """--image with --prompts or --label: write --out."""
    if bool(cfg["prompts"]) == bool(cfg["label"]):
        raise PipelineError("--image needs either --prompts PROMPTS.json or --label LABEL.nii.gz")
    image = ct_input(cfg["image"], "--image")
    label = input_file(cfg["label"], "--label") if cfg["label"] else None
    check_out(cfg["out"], [image] + ([label] if label else []))
    specs = read_prompts_file(input_file(cfg["prompts"], "--prompts")) if cfg["prompts"] else None
    with flag("--window-hu"):
        window = parse_window(cfg["window_hu"])
    models = load_models(cfg, device)  # a bad --model / --finetuned fails before the CT is read
    with flag("--image"):
        case = load_case(image.name, image, label, window, series=cfg["series"])
    prompts = [case_prompt(s, case) for s in specs] if specs else label_prompts(case, organs)
    if not prompts:
        raise PipelineError(f"none of the organs {', '.join(organ_name(o) for o in organs)} is in --label {label}")
    dec = volume_decoder(case, models, cfg, device)
    organ_walks = segment(dec, prompts, walk, case.geometry)
    labels = merge(organ_walks, case.stack.shape)
    write_label_map(labels, case, Path(cfg["out"]), model=models.backbone.name, source=image, series=cfg["series"])
    for p in prompts:
        n = int((labels == p.organ).sum())
        line = f"{organ_name(p.organ)}: {n} voxels on {int((labels == p.organ).any(axis=(1, 2)).sum())} slices"
        if case.label is not None:
            line += f", 3D Dice {dice_score(labels == p.organ, case.label == p.organ):.4f}"
        print(line)
    print_walks({organ_name(om.organ): walk_report(om, len(case.stack)) for om in organ_walks})
    print(f"{dec.encoder_passes} encoder passes; wrote {cfg['out']}")


def main(argv=None):
    cfg = parse_config(globals(), argv)
    device = start_run(cfg)
    walk = walk_settings(cfg)
    with flag("--organs"):
        organs = names.organ_ids_arg(cfg["organs"])
    if cfg["image"]:
        segment_image(cfg, device, organs, walk)
        return
    if not cfg["data_dir"]:
        raise PipelineError("give --image CT.nii.gz (with --prompts or --label, and --out) or --data-dir RAW "
                            "(evaluation)")
    res = Results(cfg["results_dir"])
    with distributed(device) as env, results_folder(res.root):
        view = evaluate_split(cfg, env, res, organs, walk)
    if view is None:  # not rank 0
        return
    print(tables.volume_markdown(view), end="")
    print(f"wrote {res.table('volume_3d', 'md')}")


if __name__ == "__main__":
    run_main(main)
