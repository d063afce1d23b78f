"""Task 1: zero-shot SAM on BTCV slices with five prompt types; the report's Table 1.

    python segmentation_task1.py --slices data/slices --results-dir results
    python segmentation_task1.py --slices data/slices --results-dir results --model vit_h \
        --checkpoint checkpoints/sam_vit_h_4b8939.pth
    python segmentation_task1.py --slices other/slices --results-dir r2 --finetuned results/finetune/bound_box/best.pt
    torchrun --nproc_per_node 4 segmentation_task1.py --slices data/slices --results-dir results   # one table

Every slice of the split is encoded once (or read from the embedding cache under SLICES/embeddings, which
Tasks 2 and 3 reuse); all prompts of all organs are then decoded from the cached embeddings in batches. Point
prompts use SAM's multimask output and keep one of its three masks by POINT_MASK (the smallest; `iou` keeps
the highest predicted IoU, segment_anything's own choice); boxes use single-mask output. Dice is computed at
each slice's own resolution. With --finetuned, the decoder of a Task 2 checkpoint (of the same backbone) is
scored instead of the pretrained one, on any slices. Writes a record (RESULTS_DIR/records/task1/), then
table1_zero_shot.json / .md / .csv built from it and figures/task1_overlay_<prompt>.png. Under torchrun the
encoder passes and the decoder batches are dealt out over the processes (the same batches one process makes)
and rank 0 writes one result, equal to one process's.
"""
from __future__ import annotations

import time

import numpy as np

from sambtcv.cli import flag, load_models, parse_config, results_folder, run_main, start_run
from sambtcv.core import config
from sambtcv.core.distributed import DistEnv, distributed
from sambtcv.core.files import Results, load_checkpoint, markdown_table, save_figure
from sambtcv.core.metrics import DiceTable
from sambtcv.core.names import ORGANS, SPLITS, check_choice, prompt_types_arg
from sambtcv.data.slices import SliceSet
from sambtcv.models.decoder import POINT_MASK_RULES
from sambtcv.models.embeddings import open_split
from sambtcv.study import tables
from sambtcv.study.evaluation import evaluate, evaluation_settings
from sambtcv.study.records import write_record

# ---------------------------------------------------------------------------------------------- config
SLICES = config.SLICES  # output of preprocess.py
RESULTS_DIR = config.RESULTS_DIR  # where the tables and figures go
MODEL = config.MODEL  # mobilesam | litemedsam | vit_b | vit_l | vit_h
CHECKPOINT = None  # backbone weights; default: the packaged ones, or checkpoints/<official name> for vit_*
FINETUNED = None  # a Task 2 checkpoint (finetune/<prompt>/best.pt) whose decoder is scored instead
SPLIT = "val"  # val | train
PROMPT = "all"  # all, or prompt types as a comma list
SEED = config.SEED  # seeds the random point prompts (>= 0)
DEVICE = config.DEVICE  # cpu | cuda; empty: cuda when present
DTYPE = config.DTYPE  # auto | fp32 | bf16 autocast of the decoder
ENCODER_DTYPE = config.DTYPE  # auto | fp32 | bf16 autocast of the image-encoder pass that fills the embedding cache
RUNTIME = config.RUNTIME  # auto | torch | openvino: runs the encoder and the decoder (auto: openvino on a CPU)
POINT_MASK = config.POINT_MASK  # which of SAM's three masks a point keeps: smallest | iou (the highest predicted IoU)
ENCODE_BATCH = config.ENCODE_BATCH  # slices per image-encoder pass (>= 1)
DECODE_BATCH = config.DECODE_BATCH  # prompts per decoder pass (>= 1)
OVERLAY_SLICES = 3  # validation slices shown in each overlay figure (>= 1)
# -----------------------------------------------------------------------------------------------------


def overlay_figure(slices: SliceSet, picks, preds: dict, prompt_type: str):
    """Ground truth (contours) against prediction (filled) for a few slices."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(2, len(picks), figsize=(4 * len(picks), 8), squeeze=False)
    cmap = plt.get_cmap("tab20", len(ORGANS) + 1)
    for col, i in enumerate(picks):
        image, label = slices.load(i)
        pred = np.zeros_like(label)
        for organ, mask in preds.get(i, {}).items():
            pred[mask & (pred == 0)] = organ
        for row, (what, lab) in enumerate((("ground truth", label), (f"prediction ({prompt_type})", pred))):
            ax = axes[row, col]
            ax.imshow(image, cmap="gray")
            ax.imshow(np.ma.masked_equal(lab, 0), cmap=cmap, vmin=0, vmax=len(ORGANS), alpha=0.45,
                      interpolation="nearest")
            ax.set_title(f"{slices.records[i]['case']} z={slices.records[i]['z']}: {what}", fontsize=9)
            ax.axis("off")
    return fig


def timing(seconds: float, t_enc: float, passes: int, t_dec: float, table: DiceTable, n_prompts: int) -> dict:
    return {"encode_seconds": round(t_enc, 2), "decode_seconds": round(t_dec, 2), "n_prompts": n_prompts,
            "encode_seconds_per_slice": round(t_enc / passes, 4) if passes else None,
            "decoder_forward_seconds": round(table.decoder_seconds, 2),
            "decoder_seconds_per_prompt": round(table.decoder_seconds / max(n_prompts, 1), 4),
            # wall time over the time spent in the networks (encoder passes + decoder forwards)
            "wall_over_model_time": round(seconds / max(t_enc + table.decoder_seconds, 1e-9), 3)}


def merged_overlays(parts: list[dict]) -> dict:
    """The overlay masks that each rank collected, as one {prompt: {slice: {organ: mask}}}."""
    out = {}
    for part in parts:
        for p, per_slice in part.items():
            for i, organs in per_slice.items():
                out.setdefault(p, {}).setdefault(i, {}).update(organs)
    return out


def run(cfg: dict, env: DistEnv, res: Results) -> dict | None:
    """Task 1 on this process's share (all of it alone); rank 0 writes the record, table and figures."""
    device = env.device
    prompts = prompt_types_arg(cfg["prompt"])
    t_start = time.perf_counter()
    models = load_models(cfg, device)
    backbone, decoder, rt = models.backbone, models.decoder, models.runtime
    data = open_split(cfg["slices"], cfg["split"], backbone, cfg["encoder_dtype"], device, cfg["encode_batch"], env,
                      rt)
    slices = data.slices
    per_slice = sorted(range(len(slices)), key=lambda i: -len(slices.records[i]["organs"]))
    picks = sorted(per_slice[: cfg["overlay_slices"]])
    overlays = {p: {} for p in prompts}

    def collect(prompt_type, items, decoded, preds):
        for (i, organ), pred in zip(items, preds):
            if i in picks:
                overlays[prompt_type].setdefault(i, {})[organ] = pred

    t_dec = time.perf_counter()
    table = evaluate(decoder, data, prompts, cfg["seed"], device, cfg["dtype"], cfg["decode_batch"], DiceTable(),
                     on_batch=collect, env=env, point_mask=cfg["point_mask"])
    passes = env.gather(data.encoder_passes)
    overlays = env.gather(overlays)
    if not env.main:
        return None
    seconds = time.perf_counter() - t_start
    passes, overlays = sum(passes), merged_overlays(overlays)
    result = {
        "n_slices": len(slices), "encoder_passes": passes, "seconds": round(seconds, 2), "processes": env.world,
        "timing": timing(seconds, data.seconds, passes, time.perf_counter() - t_dec, table,
                         len(slices.items) * len(prompts)),
        "mdice": table.mdice(), "per_organ": table.per_organ(), "volume_dice": table.volume_dice(),
        "n_per_organ": table.counts(), "device": str(device),
        "point_prompt_mask": f"multimask output, {POINT_MASK_RULES[cfg['point_mask']]}",
        "box_prompt_mask": "single mask",
    }
    settings = evaluation_settings(backbone, cfg["finetuned"], cfg["split"], prompts, cfg["seed"], cfg["dtype"],
                                   cfg["encoder_dtype"], rt.name, cfg["point_mask"])
    settings.update(decode_batch=cfg["decode_batch"], encode_batch=cfg["encode_batch"])
    write_record(res.root, "task1", settings, result,
                 tables.slices_of(slices))
    view = tables.write_table1(res.root)
    for p, preds in overlays.items():
        save_figure(overlay_figure(slices, picks, preds, p), res.overlay(p))
    return view


def main(argv=None):
    cfg = parse_config(globals(), argv)
    device = start_run(cfg)
    with flag("--prompt"):
        prompt_types_arg(cfg["prompt"])  # checked before any work
    with flag("--split"):
        check_choice(cfg["split"], SPLITS, "split")
    with flag("--point-mask"):
        check_choice(cfg["point_mask"], POINT_MASK_RULES, "point mask rule")
    if cfg["finetuned"]:  # a mistyped path or a file that is no Task 2 checkpoint fails before any work
        with flag("--finetuned"):
            load_checkpoint(cfg["finetuned"], "finetune")
    res = Results(cfg["results_dir"])
    with distributed(device) as env, results_folder(res.root):
        result = run(cfg, env, res)
    if result is None:  # not rank 0
        return
    print(markdown_table(["prompt type", "mDice"], [[p, v] for p, v in result["mdice"].items()]), end="")
    print(f"{result['n_slices']} slices, {result['encoder_passes']} encoder passes, {result['seconds']} s; "
          f"wrote {res.table('table1', 'md')}")


if __name__ == "__main__":
    run_main(main)
