"""Task 1: zero-shot SAM on BTCV slices with five prompt types; the report's Table 1.

    python segmentation_task1.py --slices data/slices --results-dir results
    python segmentation_task1.py --slices data/slices --results-dir results --model vit_h --checkpoint checkpoints/sam_vit_h_4b8939.pth

Every slice of the split is encoded once (or read from the embedding cache under SLICES/embeddings,
which Tasks 2 and 3 reuse); all prompts of all organs are then decoded from the cached embeddings in
batches. Point prompts use SAM's multimask output and keep the mask with the highest predicted IoU;
boxes use single-mask output. Dice is computed at each slice's own resolution. Writes
table1_zero_shot.json / .md / .csv and figures/task1_overlay_<prompt>.png to RESULTS_DIR.
"""
from __future__ import annotations

import time
from pathlib import Path

import numpy as np

from sam_models import PromptedDecoder, evaluate, load_backbone, open_cache
from utils import (ORGANS, REPORT_ZERO_SHOT, DiceTable, SliceSet, markdown_table, parse_config, per_organ_markdown,
                   prompt_types_arg, run_main, save_figure, start_run, write_csv, write_json, write_text)

# ---------------------------------------------------------------------------------------------- config
SLICES = "data/slices"  # output of preprocess.py
RESULTS_DIR = "results"
MODEL = "litemedsam"  # litemedsam | vit_b | vit_l | vit_h
CHECKPOINT = None  # default: the bundled LiteMedSAM weights, or checkpoints/<official name> for vit_*
SPLIT = "val"
PROMPT = "all"  # all, or one prompt type (comma list allowed)
SEED = 0  # seeds the random point prompts
DEVICE = ""  # cpu | cuda; empty: cuda when present
DTYPE = "fp32"  # fp32 | bf16 autocast of the decoder
ENCODER_DTYPE = "fp32"  # fp32 | bf16 autocast of the image-encoder pass that fills the embedding cache
ENCODE_BATCH = 1  # slices per image-encoder pass (1 was fastest on a 2-core CPU)
DECODE_BATCH = 8  # prompts per decoder pass (8 was fastest on a 2-core CPU)
OVERLAY_SLICES = 3  # validation slices shown in each overlay figure
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
    md = (f"## Table 1: mDice of different prompts (zero-shot, {result['model']}, {result['split']} split, "
          f"{result['n_slices']} slices)\n\n"
          + markdown_table(["prompt type", "mDice (here)", "mDice (report, SAM ViT-H on BTCV)"], rows)
          + "\nPoint prompts: multimask output, the mask with the highest predicted IoU is kept. "
            "Boxes: single-mask output. Dice at each slice's own resolution; mDice = mean over organs present.\n\n")
    md += per_organ_markdown(result["per_organ"], "### Per-organ slice Dice") + "\n"
    md += per_organ_markdown(result["volume_dice"], "### Per-organ volume Dice (stacked slices, mean over cases)")
    md += f"\nSlices scored per organ: {result['n_per_organ']}\n"
    return md


def main(argv=None):
    cfg = parse_config(globals(), argv)
    device = start_run(cfg)
    prompts = prompt_types_arg(cfg["prompt"])
    t_start = time.perf_counter()
    backbone = load_backbone(cfg["model"], cfg["checkpoint"], device)
    slices, cache, passes, t_enc = open_cache(cfg["slices"], cfg["split"], backbone, cfg["encoder_dtype"], device,
                                              cfg["encode_batch"])
    per_slice = sorted(range(len(slices)), key=lambda i: -len(slices.records[i]["organs"]))
    picks = sorted(per_slice[: cfg["overlay_slices"]])
    overlays = {p: {} for p in prompts}

    def collect(prompt_type, batch, extra, preds):
        ds_items = cache.slices.items
        for k, pred in zip(batch["index"].tolist(), preds):
            i, organ = ds_items[k]
            if i in picks:
                overlays[prompt_type].setdefault(i, {})[organ] = pred

    t_dec = time.perf_counter()
    table = evaluate(PromptedDecoder.from_backbone(backbone), cache, prompts, cfg["seed"], device, cfg["dtype"],
                     cfg["decode_batch"], DiceTable(), on_batch=collect)
    t_end = time.perf_counter()
    n_prompts = len(slices.items) * len(prompts)
    result = {
        "model": backbone.name, "checkpoint": backbone.checkpoint, "split": cfg["split"], "n_slices": len(slices),
        "encoder_passes": passes, "seconds": round(t_end - t_start, 2),
        "timing": {"encode_seconds": round(t_enc, 2), "decode_seconds": round(t_end - t_dec, 2),
                   "n_prompts": n_prompts,
                   "encode_seconds_per_slice": round(t_enc / passes, 4) if passes else None,
                   "decoder_forward_seconds": round(table.decoder_seconds, 2),
                   "decoder_seconds_per_prompt": round(table.decoder_seconds / max(n_prompts, 1), 4),
                   # wall time over the time spent in the networks (encoder passes + decoder forwards)
                   "wall_over_model_time": round((t_end - t_start) / max(t_enc + table.decoder_seconds, 1e-9), 3)},
        "mdice": table.mdice(), "per_organ": table.per_organ(), "volume_dice": table.volume_dice(),
        "n_per_organ": table.counts(), "seed": cfg["seed"], "dtype": cfg["dtype"],
        "encoder_dtype": cfg["encoder_dtype"], "device": str(device),
        "point_prompt_mask": "multimask output, highest predicted IoU", "box_prompt_mask": "single mask",
    }
    out = Path(cfg["results_dir"])
    write_json(out / "table1_zero_shot.json", result)
    write_text(out / "table1_zero_shot.md", table1_markdown(result))
    write_csv(out / "table1_zero_shot.csv", ["prompt", "organ", "slice_dice", "volume_dice"],
              [[p, o, d, result["volume_dice"][p].get(o)] for p in result["per_organ"]
               for o, d in result["per_organ"][p].items()])
    for p in prompts:
        save_figure(overlay_figure(slices, picks, overlays[p], p), out / "figures" / f"task1_overlay_{p}.png")
    print(markdown_table(["prompt type", "mDice"], [[p, v] for p, v in result["mdice"].items()]), end="")
    print(f"{len(slices)} slices, {passes} encoder passes, {result['seconds']} s; wrote {out / 'table1_zero_shot.md'}")


if __name__ == "__main__":
    run_main(main)
