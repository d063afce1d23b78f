"""Sections 3, 3b and 4: decoder training speed, fp32 against bf16 (what auto picks), a Task 2 epoch's memory."""
from __future__ import annotations

import copy
import time
from pathlib import Path

import numpy as np
import torch

from sambtcv.bench.common import backbone_flags, fill_by_copy, run_script
from sambtcv.core import config
from sambtcv.core.device import autocast, sync
from sambtcv.core.names import POINT_PROMPTS
from sambtcv.data.slices import SliceSet
from sambtcv.models import precision
from sambtcv.models.decoder import PromptedDecoder, decode_batch
from sambtcv.models.embeddings import EmbeddingCache
from sambtcv.study.evaluation import PromptDataset
from sambtcv.study.training import epoch_order, mask_losses


def bench_training(cfg, backbone, data, device) -> dict:
    prompt_type = cfg["train_prompt"]
    ds = PromptDataset(data, prompt_type, cfg["seed"], epoch=1)
    order = epoch_order(len(ds), cfg["seed"], 1, cfg["train_samples"])
    samples = [ds[int(k)] for k in order]
    n = len(samples)
    multimask = prompt_type in POINT_PROMPTS
    pretrained = PromptedDecoder.from_backbone(backbone)

    def run(batch_size: int, dtype: str) -> float:
        torch.manual_seed(cfg["seed"])
        module = copy.deepcopy(pretrained).to(device).train()
        opt = torch.optim.SGD([p for p in module.parameters() if p.requires_grad], lr=config.FINETUNE_LR,
                              momentum=config.FINETUNE_MOMENTUM,
                              weight_decay=config.FINETUNE_WEIGHT_DECAY)
        batches = [torch.utils.data.default_collate(samples[s:s + batch_size]) for s in range(0, n, batch_size)]

        def step(batch):
            with autocast(device, dtype):
                out = decode_batch(module, batch, prompt_type, device)
            losses = mask_losses(out.masks, out.iou, batch["target"].to(device), 1.0 if multimask else 0.0)
            opt.zero_grad(set_to_none=True)
            (losses.sum() / len(losses)).backward()
            opt.step()

        step(batches[0])  # warm-up, not timed
        sync(device)
        t0 = time.perf_counter()
        for batch in batches:
            step(batch)
        sync(device)
        rate = n / (time.perf_counter() - t0)
        print(f"bench: decoder training {dtype} batch {batch_size}: {rate:.2f} samples/s", flush=True)
        return rate

    rates = {dtype: {"batched": run(cfg["train_batch"], dtype), "one_at_a_time": run(1, dtype)}
             for dtype in ("fp32", "bf16")}
    return {"decoder_batched_speedup": rates["fp32"]["batched"] / rates["fp32"]["one_at_a_time"],
            "decoder_training": {
                "prompt_type": prompt_type, "samples": n, "batch": cfg["train_batch"],
                "fp32_samples_per_second_batched": rates["fp32"]["batched"],
                "fp32_samples_per_second_one_at_a_time": rates["fp32"]["one_at_a_time"],
                "bf16_samples_per_second_batched": rates["bf16"]["batched"],
                "bf16_samples_per_second_one_at_a_time": rates["bf16"]["one_at_a_time"],
                "bf16_batched_speedup": rates["bf16"]["batched"] / rates["bf16"]["one_at_a_time"],
                "note": "forward + mask_losses + backward + SGD step (finetune_task2's recipe) on samples read "
                        "before timing; one warm-up step per run not timed"}}


def bench_precision(res: dict, device) -> dict:
    """fp32 against bf16 on this machine (the encoder's seconds per slice, one decoder training step of
    TRAIN_BATCH samples) beside what DTYPE = "auto" picks here (`sambtcv.models.precision`)."""
    enc, tr = res.get("encoder"), res.get("decoder_training")
    found = {rt: precision.support(device, rt) for rt in ("torch", "openvino")}
    out = {"auto": {rt: {"picks": "bf16" if f.native else "fp32", "why": f.detail} for rt, f in found.items()}}
    faster = {}
    if enc:
        out["encoder_seconds_per_slice"] = {d: 1.0 / enc[f"{d}_slices_per_second"] for d in ("fp32", "bf16")}
        faster["encoder"] = min(out["encoder_seconds_per_slice"], key=out["encoder_seconds_per_slice"].get)
    if tr:
        out["decoder_step_seconds"] = {d: tr["batch"] / tr[f"{d}_samples_per_second_batched"] for d in ("fp32", "bf16")}
        faster["decoder_step"] = min(out["decoder_step_seconds"], key=out["decoder_step_seconds"].get)
    out["faster"] = faster
    out["auto_picks_the_faster"] = all(v == out["auto"]["torch"]["picks"] for v in faster.values())
    print(f"bench: precision auto picks {out['auto']['torch']['picks']} ({found['torch'].detail}); faster: {faster}",
          flush=True)
    return {"precision": out}


def bench_memory(cfg, backbone, sets: dict, device, work: Path) -> dict:
    base_train = EmbeddingCache.for_split(SliceSet(sets["base"], "train"), backbone, "fp32")
    base_val = EmbeddingCache.for_split(SliceSet(sets["base"], "val"), backbone, "fp32")
    copied = 0
    for split in ("train", "val"):
        cache = EmbeddingCache.for_split(SliceSet(sets["rss4"], split), backbone, "fp32")
        copied += fill_by_copy(cache, [base_train, base_val])
        cache.fill(device, 1, progress=False)
    runs = {}
    for name, scale in (("base", 1), ("rss4", 4)):
        args = ["--slices", sets[name], "--results-dir", work / "out" / f"task2_{name}", "--prompt", "bound_box",
                "--epochs", 1, "--samples-per-epoch", cfg["rss_samples_per_epoch"], "--val-samples",
                cfg["rss_val_samples"], "--model", cfg["model"], "--seed", cfg["seed"], "--dtype", "fp32"]
        args += backbone_flags(cfg)
        print(f"bench: Task 2 epoch on {scale}x training slices (subprocess)", flush=True)
        r = run_script("finetune_task2.py", args, work / "logs" / f"task2_{name}.log")
        slices = SliceSet(sets[name], "train")
        r.update(train_slices=len(slices), train_samples=len(slices.items),
                 cache_mib=round(len(slices) * int(np.prod(base_train.shape[1:])) * 2 / 2**20, 1))
        runs[f"{scale}x"] = r
    return {"peak_rss_ratio_4x": runs["4x"]["peak_rss_mib"] / runs["1x"]["peak_rss_mib"],
            "memory": {"runs": runs, "samples_per_epoch_cap": cfg["rss_samples_per_epoch"] or "all samples",
                       "val_samples_cap": cfg["rss_val_samples"] or "all", "rows_copied_into_4x_cache": copied,
                       "note": ("finetune_task2.py --prompt bound_box --epochs 1 in a fresh Python each; peak RSS = "
                                "ru_maxrss of that process; caches filled before (the 4x set repeats the 1x volumes "
                                "under new case names, its rows copied from the 1x cache for identical images)")}}
