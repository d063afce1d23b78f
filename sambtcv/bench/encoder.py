"""Sections 2 and 2b: the image encoder in fp32 and bf16; PyTorch against OpenVINO."""
from __future__ import annotations

import shutil
import time
from pathlib import Path

import numpy as np
import torch

from sambtcv.bench.common import median_seconds, run_script, spread
from sambtcv.core.device import autocast, sync
from sambtcv.core.metrics import dice_score
from sambtcv.core.prompts import make_prompt, present_organs
from sambtcv.data.slices import SliceSet
from sambtcv.models.backbones import encode_images
from sambtcv.models.decoder import PromptedDecoder


def time_encoder(backbone, images, device, dtype: str, channels_last: bool):
    """(slices/s, embeddings) of the image encoder in one memory format and precision, batch 1."""
    backbone.channels_last = channels_last
    backbone.sam.image_encoder.to(memory_format=torch.channels_last if channels_last else torch.contiguous_format)
    encode_images(backbone, images[:1], device, dtype)  # warm-up
    sync(device)
    t0 = time.perf_counter()
    emb = [encode_images(backbone, [im], device, dtype) for im in images]
    sync(device)
    rate = len(images) / (time.perf_counter() - t0)
    layout = "channels_last" if channels_last else "contiguous"
    print(f"bench: encoder {dtype} {layout}: {rate:.2f} slices/s", flush=True)
    return rate, emb


def mask_agreement(backbone, slices: SliceSet, picks, emb_a, emb_b, device) -> tuple[float, list]:
    """Pixel agreement and per-mask Dice of bound-box masks decoded (fp32) from two sets of embeddings."""
    decoder = PromptedDecoder.from_backbone(backbone).eval()
    agree = total = 0
    dices = []
    with torch.no_grad():
        for n, i in enumerate(picks):
            label = slices.load_label(i)
            organs = present_organs(label)
            boxes = torch.tensor(np.stack([backbone.frame.prompt(make_prompt(label == o, "bound_box", None),
                                                                 label.shape).box for o in organs]),
                                 dtype=torch.float32, device=device)
            preds = []
            for emb in (emb_a, emb_b):
                logits = decoder(emb[n].expand(len(organs), -1, -1, -1), boxes=boxes, multimask=False)[0][:, 0]
                preds.append((backbone.frame.to_slice(logits, label.shape) > 0).cpu().numpy())
            agree += int((preds[0] == preds[1]).sum())
            total += preds[0].size
            dices += [dice_score(a, b) for a, b in zip(*preds)]
    return agree / total, dices


def bench_encoder(cfg, backbone, slices_dir: Path, device) -> dict:
    """Slices/s in fp32 and bf16, each contiguous and channels_last; the bf16 speed-up is the best bf16
    format against the best fp32 format, with the agreement of their masks."""
    slices = SliceSet(slices_dir, "val")
    picks = spread(len(slices), cfg["encoder_slices"])
    images = [slices.load(i)[0] for i in picks]
    default_format = backbone.channels_last
    rates, embs = {}, {}
    for dtype in ("fp32", "bf16"):
        for fmt in (False, True):
            rates[(dtype, fmt)], embs[(dtype, fmt)] = time_encoder(backbone, images, device, dtype, fmt)
    time_encoder(backbone, images[:1], device, "fp32", default_format)  # back to the backbone's own format
    best = {dtype: max((False, True), key=lambda f: rates[(dtype, f)]) for dtype in ("fp32", "bf16")}
    agreement, dices = mask_agreement(backbone, slices, picks, embs[("fp32", best["fp32"])],
                                      embs[("bf16", best["bf16"])], device)
    name = {False: "contiguous", True: "channels_last"}
    return {"encoder_bf16_speedup": rates[("bf16", best["bf16"])] / rates[("fp32", best["fp32"])],
            "encoder_bf16_mask_agreement": agreement,
            "encoder": {"model": backbone.name, "slices": len(images),
                        "slices_per_second": {f"{d}_{name[f]}": r for (d, f), r in rates.items()},
                        "fp32_slices_per_second": rates[("fp32", best["fp32"])],
                        "bf16_slices_per_second": rates[("bf16", best["bf16"])],
                        "best_format": {d: name[f] for d, f in best.items()},
                        "model_default_format": name[default_format], "masks_compared": len(dices),
                        "fp32_vs_bf16_mask_dice_mean": float(np.mean(dices)),
                        "fp32_vs_bf16_mask_dice_min": float(np.min(dices)),
                        "note": "batch 1 per encoder pass; bound-box masks of every organ, decoded in fp32 "
                                "from each embedding; agreement = equal pixels / all pixels"}}


RUNTIME_PATHS = [("torch", "fp32"), ("torch", "bf16"), ("openvino", "fp32"), ("openvino", "bf16")]


def bench_runtimes(cfg, backbone, slices_dir: Path, work: Path, device) -> dict:
    """PyTorch against OpenVINO on this CPU, side by side in one process: the encoder per slice (fp32, bf16)
    with the agreement and Dice of bound-box masks decoded in PyTorch fp32 from each path's embeddings
    against PyTorch fp32's; one prompt's decoder time per runtime and precision; peak RSS of a Task 1 run
    per runtime (subprocess, cold cache)."""
    if torch.device(device).type != "cpu":
        return {"runtimes": {"note": "OpenVINO runs on the CPU only; not measured on " + str(device)}}
    from sambtcv.models.openvino_runtime import OpenVinoEncoder

    slices = SliceSet(slices_dir, "val")
    picks = spread(len(slices), cfg["encoder_slices"])
    images = [slices.load(i)[0] for i in picks]
    cache = work / "model_cache"
    encoders = {("torch", d): None for d in ("fp32", "bf16")}
    encoders.update({("openvino", d): OpenVinoEncoder(backbone, d, cache) for d in ("fp32", "bf16")})
    enc, embs = {}, {}
    for rt, dtype in RUNTIME_PATHS:
        encoder = encoders[(rt, dtype)]
        enc[f"{rt}_{dtype}"] = median_seconds(lambda: encode_images(backbone, images[:1], device, dtype, encoder),
                                               cfg["encoder_slices"])
        embs[(rt, dtype)] = [encode_images(backbone, [im], device, dtype, encoder) for im in images]
        print(f"bench: encoder {rt} {dtype}: {enc[f'{rt}_{dtype}']:.3f} s/slice", flush=True)
    agreement = {}
    for path in RUNTIME_PATHS[1:]:
        agree, dices = mask_agreement(backbone, slices, picks, embs[("torch", "fp32")], embs[path], device)
        agreement[f"{path[0]}_{path[1]}"] = {"mask_agreement": agree, "dice_mean": float(np.mean(dices)),
                                             "dice_min": float(np.min(dices))}
    dec = bench_runtime_decoders(backbone, embs[("torch", "fp32")][0], cache, device)
    rss = {rt: bench_runtime_rss(cfg, slices_dir, work, rt) for rt in ("torch", "openvino")}
    return {"runtimes": {"encoder_seconds_per_slice": enc, "agreement_vs_torch_fp32": agreement,
                         "decoder_seconds": dec, "task1_runs": rss, "threads": torch.get_num_threads(),
                         "openvino_encoder_speedup_vs_torch_bf16": enc["torch_bf16"] / enc["openvino_bf16"],
                         "openvino_encoder_speedup_vs_torch_fp32": enc["torch_fp32"] / enc["openvino_fp32"],
                         "note": "median seconds over ENCODER_SLICES calls after a warm-up, batch 1; agreement = "
                                 "equal pixels of bound-box masks (PyTorch fp32 decoder) / all pixels"}}


def bench_runtime_decoders(backbone, embedding, cache: Path, device, repeats: int = 20) -> dict:
    """Median seconds of one box and one point prompt per runtime and precision on one embedding."""
    from sambtcv.models.openvino_runtime import OpenVinoDecoder

    size = backbone.img_size
    box = torch.tensor([[size * 0.3, size * 0.3, size * 0.6, size * 0.6]])
    point, label = torch.tensor([[[size * 0.45, size * 0.45]]]), torch.ones(1, 1)
    out = {}
    for rt, dtype in RUNTIME_PATHS:
        decoder = PromptedDecoder.from_backbone(backbone, copy_modules=True).eval()
        if rt == "openvino":
            decoder = OpenVinoDecoder(decoder, f"{backbone.key}-pretrained", dtype, cache)
        with torch.no_grad(), autocast(device, dtype if rt == "torch" else "fp32"):
            out[f"{rt}_{dtype}_box"] = median_seconds(lambda: decoder(embedding, boxes=box), repeats)
            out[f"{rt}_{dtype}_point"] = median_seconds(
                lambda: decoder(embedding, points=point, point_labels=label, multimask=True), repeats)
    return out


def bench_runtime_rss(cfg, slices_dir: Path, work: Path, runtime: str) -> dict:
    """A Task 1 run (bound box) in a subprocess with `runtime` and a cold embedding cache: wall time, peak RSS."""
    cold = work / f"runtime_{runtime}"
    shutil.rmtree(cold, ignore_errors=True)
    shutil.copytree(slices_dir, cold / "slices", ignore=shutil.ignore_patterns("embeddings"))
    r = run_script("segmentation_task1.py", ["--slices", cold / "slices", "--results-dir", cold / "results",
                                             "--model", cfg["model"], "--prompt", "bound_box", "--runtime", runtime,
                                             "--encoder-dtype", "bf16", "--dtype", "bf16", "--device", "cpu"],
                   cold / "log.txt")
    return {"seconds": round(r["seconds"], 2), "peak_rss_mib": r["peak_rss_mib"], "encoder_dtype": "bf16"}


def bench_encoder_batches(cfg, backbone, slices_dir: Path, device) -> dict:
    """Slices/s of the image encoder at each batch size of ENCODER_BATCHES, fp32 and bf16, the backbone's
    own memory format (encode_batch of the pages)."""
    slices = SliceSet(slices_dir, "val")
    sizes = [int(v) for v in str(cfg["encoder_batches"]).split(",") if v.strip()]
    images = [slices.load(i % len(slices))[0] for i in range(max(sizes) * 2)]
    out = {}
    for dtype in ("fp32", "bf16"):
        for size in sizes:
            encode_images(backbone, images[:size], device, dtype)  # warm-up
            sync(device)
            t0 = time.perf_counter()
            for start in range(0, len(images), size):
                encode_images(backbone, images[start:start + size], device, dtype)
            sync(device)
            out[f"{dtype}_batch{size}"] = round(len(images) / (time.perf_counter() - t0), 2)
            print(f"bench: encoder {dtype} batch {size}: {out[f'{dtype}_batch{size}']} slices/s", flush=True)
    return {"encoder_batches": {"model": backbone.name, "slices_per_second": out, "images": len(images)}}
