"""Section 1: zero-shot evaluation, this pipeline against the loop users write around SamPredictor."""
from __future__ import annotations

import shutil
import time
from pathlib import Path

import numpy as np
import torch

from sambtcv.bench.common import spread
from sambtcv.core import config
from sambtcv.core.device import sync
from sambtcv.core.metrics import dice_score
from sambtcv.core.names import POINT_PROMPTS, organ_name, prompt_types_arg
from sambtcv.core.prompts import make_prompt, prompt_rng
from sambtcv.data.slices import SliceSet
from sambtcv.models.backbones import encode_images
from sambtcv.models.decoder import PromptedDecoder, pick
from sambtcv.models.embeddings import open_split
from sambtcv.study.evaluation import EVAL_EPOCH, evaluate


def naive_predictor_loop(backbone, slices: SliceSet, items: list, prompt_type: str, seed: int, device,
                         point_mask: str = config.POINT_MASK):
    """What users write around SamPredictor: set the image (re-encode) and predict, one prompt at a time;
    a point keeps the mask `point_mask` keeps in the pipeline (sambtcv.models.decoder.pick on SamPredictor's
    low-resolution logits, as the pipeline picks on its decoder's).

    The input tensor is the pipeline's `InputFrame.image` given through `set_torch_image`.
    Returns (per-item Dice, seconds, max |apply_coords - InputFrame.coords_to_input|)."""
    from segment_anything import SamPredictor

    predictor = SamPredictor(backbone.sam)
    frame = backbone.frame
    dices, coord_diff = [], 0.0
    sync(device)
    t0 = time.perf_counter()
    for i, organ in items:
        rec = slices.records[i]
        image, label = slices.load(i)
        mask = label == organ
        prompt = make_prompt(mask, prompt_type, prompt_rng(seed, rec["case"], rec["z"], organ, prompt_type, EVAL_EPOCH))
        predictor.set_torch_image(frame.image(image)[None].to(device), image.shape)
        if prompt_type in POINT_PROMPTS:
            pts = prompt.points
            coord_diff = max(coord_diff, float(np.abs(predictor.transform.apply_coords(pts, image.shape)
                                                      - frame.coords_to_input(pts, image.shape)).max()))
            masks, iou, low_res = predictor.predict(point_coords=pts, point_labels=np.ones(len(pts)),
                                                    multimask_output=True)
            pred = masks[int(pick(torch.from_numpy(low_res)[None], torch.from_numpy(iou)[None], point_mask)[0])]
        else:
            box = prompt.box
            coord_diff = max(coord_diff, float(np.abs(predictor.transform.apply_boxes(box, image.shape).reshape(4)
                                                      - frame.prompt(prompt, image.shape).box).max()))
            masks, _, _ = predictor.predict(box=box, multimask_output=False)
            pred = masks[0]
        dices.append(dice_score(pred, mask))
    sync(device)
    return dices, time.perf_counter() - t0, coord_diff


def per_organ_mean(items: list, dices: list) -> dict:
    out = {}
    for (_, organ), d in zip(items, dices):
        out.setdefault(organ, []).append(d)
    return {organ_name(o): float(np.mean(v)) for o, v in sorted(out.items())}


def bench_zero_shot(cfg, backbone, slices_dir: Path, device) -> dict:
    prompts = prompt_types_arg(cfg["zero_shot_prompt"])
    shutil.rmtree(slices_dir / "embeddings", ignore_errors=True)  # cold cache
    encode_images(backbone, [SliceSet(slices_dir, "val").load(0)[0]], device)  # warm-up, not timed
    subset = set()
    kept = {p: {} for p in prompts}

    def collect(prompt_type, items, decoded, preds):
        for item, pred in zip(items, preds):
            if item in subset:
                kept[prompt_type][item] = pred

    sync(device)
    t0 = time.perf_counter()
    data = open_split(slices_dir, "val", backbone, "fp32", device, 1)
    slices, passes, t_fill = data.slices, data.encoder_passes, data.seconds
    items = [slices.items[k] for k in spread(len(slices.items), cfg["naive_items"])]
    subset.update(items)
    table = evaluate(PromptedDecoder.from_backbone(backbone), data, prompts, cfg["seed"], device, "fp32",
                     cfg["decode_batch"], on_batch=collect, point_mask=config.POINT_MASK)
    sync(device)
    pipe_seconds = time.perf_counter() - t0
    n_pipe = len(slices.items) * len(prompts)
    naive_seconds, diffs, per_sample_diff, coord_diff, per_prompt = 0.0, [], 0.0, 0.0, {}
    for p in prompts:
        print(f"bench: naive SamPredictor loop, {p}, {len(items)} prompts", flush=True)
        naive_dice, secs, cdiff = naive_predictor_loop(backbone, slices, items, p, cfg["seed"], device)
        naive_seconds += secs
        coord_diff = max(coord_diff, cdiff)
        pipe_dice = [dice_score(kept[p][(i, organ)], slices.load_label(i) == organ) for i, organ in items]
        a, b = per_organ_mean(items, pipe_dice), per_organ_mean(items, naive_dice)
        diff = max(abs(a[o] - b[o]) for o in a)
        diffs.append(diff)
        per_sample_diff = max(per_sample_diff, float(np.max(np.abs(np.subtract(pipe_dice, naive_dice)))))
        per_prompt[p] = {"pipeline_mdice_subset": float(np.mean(list(a.values()))),
                         "naive_mdice_subset": float(np.mean(list(b.values()))), "per_organ_max_abs_diff": diff,
                         "naive_seconds": round(secs, 3)}
    n_naive = len(items) * len(prompts)
    pipe_pp, naive_pp = pipe_seconds / n_pipe, naive_seconds / n_naive
    return {
        "zero_shot_speedup": naive_pp / pipe_pp,
        "zero_shot_dice_max_abs_diff": max(diffs),
        "zero_shot": {
            "prompt_types": prompts, "n_slices": len(slices), "pipeline_prompts": n_pipe,
            "pipeline_seconds": round(pipe_seconds, 3), "pipeline_encoder_passes": passes,
            "pipeline_encode_seconds": round(t_fill, 3), "pipeline_seconds_per_prompt": pipe_pp,
            "naive_prompts": n_naive, "naive_items_per_prompt_type": len(items),
            "naive_seconds": round(naive_seconds, 3),
            "naive_seconds_per_prompt": naive_pp, "per_sample_dice_max_abs_diff": per_sample_diff,
            "coords_max_abs_diff_apply_coords_vs_coords_to_input": coord_diff,
            "pipeline_mdice_all": table.mdice(), "per_prompt": per_prompt,
            "note": ("pipeline: cold embedding cache fill (fp16 rows) + evaluate() over every (slice, organ) of the "
                     "val split; naive: SamPredictor.set_torch_image(image_to_input(...)) + predict() per prompt "
                     "on evenly spread items; speed-up = naive s/prompt / pipeline s/prompt; Dice compared on the "
                     "naive items only"),
        },
    }
