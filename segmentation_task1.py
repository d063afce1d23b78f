"""Task 1: zero-shot SAM on BTCV slices with five prompt types; the report's Table 1.

    python segmentation_task1.py --slices data/slices --results-dir results
    python segmentation_task1.py --slices data/slices --results-dir results --model vit_h --checkpoint checkpoints/sam_vit_h_4b8939.pth
    python segmentation_task1.py --slices other/slices --results-dir r2 --finetuned results/finetune/bound_box/best.pt

Every slice of the split is encoded once (or read from the embedding cache under SLICES/embeddings,
which Tasks 2 and 3 reuse); all prompts of all organs are then decoded from the cached embeddings in
batches. Point prompts use SAM's multimask output and keep the mask with the highest predicted IoU;
boxes use single-mask output. Dice is computed at each slice's own resolution. With --finetuned, the
decoder of a Task 2 checkpoint (of the same backbone) is scored instead of the pretrained one, on any
slices. Writes table1_zero_shot.json / .md / .csv and figures/task1_overlay_<prompt>.png to RESULTS_DIR.
"""
from __future__ import annotations

import time

import numpy as np

from cache import evaluate, open_split
from cli import (DEFAULT_DECODE_BATCH, DEFAULT_DEVICE, DEFAULT_DTYPE, DEFAULT_ENCODE_BATCH, DEFAULT_MODEL,
                 DEFAULT_RESULTS_DIR, DEFAULT_SEED, DEFAULT_SLICES, check_choice, parse_config, run_main, start_run)
from files import (Results, load_checkpoint, markdown_table, results_lock, save_figure, write_csv, write_json,
                   write_text)
from models import load_backbone, load_decoder
from tables import REPORT_ZERO_SHOT
from utils import ORGANS, SPLITS, DiceTable, SliceSet, per_organ_markdown, prompt_types_arg

# ---------------------------------------------------------------------------------------------- config
SLICES = DEFAULT_SLICES  # output of preprocess.py
RESULTS_DIR = DEFAULT_RESULTS_DIR  # where the tables and figures go
MODEL = DEFAULT_MODEL  # mobilesam | litemedsam | vit_b | vit_l | vit_h
CHECKPOINT = None  # backbone weights; default: the packaged ones, or checkpoints/<official name> for vit_*
FINETUNED = None  # a Task 2 checkpoint (finetune/<prompt>/best.pt) whose decoder is scored instead
SPLIT = "val"  # val | train
PROMPT = "all"  # all, or prompt types as a comma list
SEED = DEFAULT_SEED  # seeds the random point prompts (>= 0)
DEVICE = DEFAULT_DEVICE  # cpu | cuda; empty: cuda when present
DTYPE = DEFAULT_DTYPE  # fp32 | bf16 autocast of the decoder
ENCODER_DTYPE = DEFAULT_DTYPE  # fp32 | bf16 autocast of the image-encoder pass that fills the embedding cache
ENCODE_BATCH = DEFAULT_ENCODE_BATCH  # slices per image-encoder pass (>= 1)
DECODE_BATCH = DEFAULT_DECODE_BATCH  # prompts per decoder pass (>= 1)
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


def table1_markdown(result: dict) -> str:
    rows = [[p, result["mdice"][p], REPORT_ZERO_SHOT[p]] for p in result["mdice"]]
    which = f"finetuned decoder {result['finetuned']}" if result.get("finetuned") else "zero-shot"
    md = (f"## Table 1: mDice of different prompts ({which}, {result['model']}, {result['split']} split, "
          f"{result['n_slices']} slices)\n\n"
          + markdown_table(["prompt type", "mDice (here)", "mDice (report, SAM ViT-H on BTCV)"], rows)
          + "\nPoint prompts: multimask output, the mask with the highest predicted IoU is kept. "
            "Boxes: single-mask output. Dice at each slice's own resolution; mDice = mean over organs present.\n\n")
    md += per_organ_markdown(result["per_organ"], "### Per-organ slice Dice") + "\n"
    md += per_organ_markdown(result["volume_dice"], "### Per-organ volume Dice (stacked slices, mean over cases)")
    md += f"\nSlices scored per organ: {result['n_per_organ']}\n"
    return md


def timing(seconds: float, t_enc: float, passes: int, t_dec: float, table: DiceTable, n_prompts: int) -> dict:
    return {"encode_seconds": round(t_enc, 2), "decode_seconds": round(t_dec, 2), "n_prompts": n_prompts,
            "encode_seconds_per_slice": round(t_enc / passes, 4) if passes else None,
            "decoder_forward_seconds": round(table.decoder_seconds, 2),
            "decoder_seconds_per_prompt": round(table.decoder_seconds / max(n_prompts, 1), 4),
            # wall time over the time spent in the networks (encoder passes + decoder forwards)
            "wall_over_model_time": round(seconds / max(t_enc + table.decoder_seconds, 1e-9), 3)}


def write_outputs(res: Results, result: dict, slices: SliceSet, picks, overlays: dict) -> None:
    write_json(res.table("table1", "json"), result)
    write_text(res.table("table1", "md"), table1_markdown(result))
    write_csv(res.table("table1", "csv"), ["prompt", "organ", "slice_dice", "volume_dice"],
              [[p, o, d, result["volume_dice"][p].get(o)] for p in result["per_organ"]
               for o, d in result["per_organ"][p].items()])
    for p, preds in overlays.items():
        save_figure(overlay_figure(slices, picks, preds, p), res.overlay(p))


def run(cfg: dict, device, res: Results) -> dict:
    prompts = prompt_types_arg(cfg["prompt"])
    t_start = time.perf_counter()
    backbone = load_backbone(cfg["model"], cfg["checkpoint"], device)
    decoder = load_decoder(backbone, cfg["finetuned"]).to(device)
    data = open_split(cfg["slices"], cfg["split"], backbone, cfg["encoder_dtype"], device, cfg["encode_batch"])
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
                     on_batch=collect)
    seconds = time.perf_counter() - t_start
    result = {
        "model": backbone.name, "checkpoint": backbone.checkpoint, "finetuned": cfg["finetuned"],
        "split": cfg["split"], "n_slices": len(slices), "slices_id": slices.signature,
        "encoder_passes": data.encoder_passes, "seconds": round(seconds, 2),
        "timing": timing(seconds, data.seconds, data.encoder_passes, time.perf_counter() - t_dec, table,
                         len(slices.items) * len(prompts)),
        "mdice": table.mdice(), "per_organ": table.per_organ(), "volume_dice": table.volume_dice(),
        "n_per_organ": table.counts(), "seed": cfg["seed"], "dtype": cfg["dtype"],
        "encoder_dtype": cfg["encoder_dtype"], "device": str(device),
        "point_prompt_mask": "multimask output, highest predicted IoU", "box_prompt_mask": "single mask",
    }
    write_outputs(res, result, slices, picks, overlays)
    return result


def main(argv=None):
    cfg = parse_config(globals(), argv)
    device = start_run(cfg)
    prompt_types_arg(cfg["prompt"])  # checked before any work
    check_choice(cfg["split"], SPLITS, "--split")
    if cfg["finetuned"]:  # a mistyped path or a file that is no Task 2 checkpoint fails before any work
        load_checkpoint(cfg["finetuned"], "finetune", "--finetuned")
    res = Results(cfg["results_dir"])
    with results_lock(res.root):
        result = run(cfg, device, res)
    print(markdown_table(["prompt type", "mDice"], [[p, v] for p, v in result["mdice"].items()]), end="")
    print(f"{result['n_slices']} slices, {result['encoder_passes']} encoder passes, {result['seconds']} s; "
          f"wrote {res.table('table1', 'md')}")


if __name__ == "__main__":
    run_main(main)
