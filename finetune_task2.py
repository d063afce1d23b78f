"""Task 2: finetune SAM's prompt encoder and mask decoder on cached image embeddings; Tables 2 and 3.

    python finetune_task2.py --slices data/slices --results-dir results
    python finetune_task2.py --slices data/slices --results-dir results --prompt bound_box --epochs 5 --resume
    torchrun --nproc_per_node=2 finetune_task2.py --slices data/slices --results-dir results   # data parallel

The image encoder never runs in the training loop: embeddings come from the Task 1 cache (filled
here for any slice that lacks one) and are read from disk per batch. The report's recipe is the
default: SGD (momentum 0.9, weight decay 1e-4, lr 0.1), 50 epochs, a large batch, MONAI's Dice loss on
sigmoid mask logits. Prompts are drawn afresh every epoch. Point prompts train SAM's three-mask
output with the lowest loss per sample (SAM's own recipe); boxes train the single mask; the IoU
head can also be trained for points (IOU_LOSS_WEIGHT, off by default). One addition to the recipe:
the gradient norm is clipped to GRAD_CLIP (the README says why). One model per prompt type
(``--prompt all``), each evaluated with the Task 1 code on the validation split. Checkpoints:
RESULTS_DIR/finetune/<prompt>/{best,last}.pt with epochs.csv.
"""
from __future__ import annotations

import time
from dataclasses import dataclass

import numpy as np
import torch

from sambtcv.cli import flag, make_runtime, parse_config, results_folder, run_main, start_run
from sambtcv.core import config
from sambtcv.core.device import autocast
from sambtcv.core.distributed import DistEnv, distributed
from sambtcv.core.files import Results, load_checkpoint, markdown_table, save_figure
from sambtcv.core.metrics import DiceTable, dice_score
from sambtcv.core.names import POINT_PROMPTS, check_choice, prompt_types_arg
from sambtcv.models.backbones import load_backbone
from sambtcv.models.decoder import POINT_MASK_RULES, PromptedDecoder, decode_batch
from sambtcv.models.embeddings import SplitData
from sambtcv.study import records, tables
from sambtcv.study.evaluation import EVAL_EPOCH, PromptDataset, evaluate, evaluation_settings
from sambtcv.study.training import (
    LOSSES,
    check_some_to_resume,
    fit,
    mask_losses,
    precheck_resume,
    run_batches,
    setup_training,
)

# ---------------------------------------------------------------------------------------------- config
SLICES = config.SLICES  # output of preprocess.py
RESULTS_DIR = config.RESULTS_DIR  # tables, figures and finetune/<prompt>/ checkpoints go here
MODEL = config.MODEL  # mobilesam | litemedsam | vit_b | vit_l | vit_h
CHECKPOINT = None  # backbone weights (see segmentation_task1.py)
PROMPT = "all"  # all, or prompt types as a comma list (one model each)
EPOCHS = 50  # passes over the training samples (>= 1)
BATCH_SIZE = 64  # samples (slice, organ, prompt) per optimiser step, over all processes (>= 1)
LR = config.FINETUNE_LR  # SGD learning rate (>= 0)
MOMENTUM = config.FINETUNE_MOMENTUM  # SGD momentum (>= 0)
WEIGHT_DECAY = config.FINETUNE_WEIGHT_DECAY  # SGD weight decay (>= 0)
LOSS = "dice"  # dice (MONAI's DiceLoss, the report's) | dice_ce (+ binary cross-entropy, MedSAM's recipe)
IOU_LOSS_WEIGHT = 0.0  # > 0: MSE of the IoU head against the true IoU, point prompts (>= 0)
GRAD_CLIP = 1.0  # > 0: clip the gradient norm before each step; 0: the report's exact recipe (>= 0)
SAMPLES_PER_EPOCH = 0  # 0: every (slice, organ) of the training split each epoch (>= 0)
VAL_SAMPLES = 0  # 0: every validation sample for the per-epoch validation (>= 0)
SEED = config.SEED  # prompts and training order (>= 0)
DEVICE = config.DEVICE  # cpu | cuda; empty: cuda when present
DTYPE = config.DTYPE  # auto | fp32 | bf16 autocast of the decoder (training and validation)
ENCODER_DTYPE = config.DTYPE  # auto | fp32 | bf16 autocast of the image-encoder pass that fills the embedding cache
RUNTIME = config.RUNTIME  # auto | torch | openvino: runs the encoder and the decoder (auto: openvino on a CPU)
RESUME = False  # continue each prompt's run from its last.pt (a prompt without one starts fresh)
POINT_MASK = config.POINT_MASK  # which of SAM's three masks a point keeps: smallest | iou (the highest predicted IoU)
ENCODE_BATCH = config.ENCODE_BATCH  # slices per image-encoder pass (>= 1)
DECODE_BATCH = config.DECODE_BATCH  # prompts per decoder pass in validation (>= 1)
# -----------------------------------------------------------------------------------------------------


def loss_label(cfg: dict) -> str:
    return "Dice loss" if cfg["loss"] == "dice" else "Dice+CE loss"


def validation_fn(data: SplitData, prompt_type: str, cfg: dict, device):
    """validate(module) for `training.fit`: Dice loss and low-res mDice on the validation prompts."""
    ds = PromptDataset(data, prompt_type, cfg["seed"], EVAL_EPOCH)

    def validate(module):
        module.eval()
        losses, per_organ = [], {}

        def step(batch):
            with autocast(device, cfg["dtype"]):
                out = decode_batch(module, batch, prompt_type, device, cfg["point_mask"])
            target = batch["target"].to(device)
            losses.extend(mask_losses(out.best[:, None], out.iou[:, :1], target, 0.0, cfg["loss"]).tolist())
            dice = dice_score(out.best.float() > 0, target[:, 0] > 0.5)
            for organ, d in zip(batch["organ"].tolist(), dice.tolist()):
                per_organ.setdefault(organ, []).append(d)

        run_batches(ds, cfg["decode_batch"], step, cfg["val_samples"])
        return {"val_loss": float(np.mean(losses)),
                "val_metric": float(np.mean([np.mean(v) for v in per_organ.values()]))}

    return validate


def curve_figure(history: list, prompt_type: str, loss_name: str):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    epochs = [r["epoch"] for r in history]
    trained = [r for r in history if r["train_loss"] is not None]
    ax.plot([r["epoch"] for r in trained], [r["train_loss"] for r in trained], "o-", label=f"train {loss_name}")
    ax.plot(epochs, [r["val_loss"] for r in history], "s-", label=f"validation {loss_name}")
    ax.set_xlabel("epoch")
    ax.set_ylabel(loss_name)
    ax.set_title(f"Finetuning with {prompt_type.replace('_', ' ')} prompts")
    ax.grid(alpha=0.3)
    ax.legend()
    return fig


@dataclass
class ZeroShot:
    """Zero-shot per-organ Dice of the pretrained decoder, and the Task 1 record it was read from (None:
    computed here)."""

    per_organ: dict
    record: str | None


def zero_shot(cfg, res: Results, backbone, decoder, val: SplitData, device, prompts,
              runtime: str = "torch") -> ZeroShot:
    """Zero-shot per-organ Dice on the validation split: a Task 1 record of this results folder whose
    settings, taken as a whole, are the ones this evaluation would use (on these very slices), else
    computed here."""
    wanted = evaluation_settings(backbone, None, "val", prompts, cfg["seed"], cfg["dtype"], cfg["encoder_dtype"],
                                 runtime, cfg["point_mask"])
    found = records.reusable(res.root, "task1", wanted, val.slices.signature, covers=("prompts",))
    if found is not None:
        return ZeroShot(found.result["per_organ"], found.id)
    table = evaluate(decoder, val, prompts, cfg["seed"], device, cfg["dtype"], cfg["decode_batch"],
                     point_mask=cfg["point_mask"])
    return ZeroShot(table.per_organ(), None)


def train_prompt(setup, cfg: dict, res: Results, prompt_type: str, resume: bool) -> dict:
    """Finetune one prompt type's decoder (from its last.pt when `resume`); returns `training.fit`'s
    summary plus seconds."""
    env, device = setup.env, setup.env.device
    run_dir = res.finetune_run(prompt_type)
    torch.manual_seed(cfg["seed"])
    module = PromptedDecoder.from_backbone(setup.backbone, copy_modules=True).to(device)
    params = [p for p in module.parameters() if p.requires_grad]
    optimizer = torch.optim.SGD(params, lr=cfg["lr"], momentum=cfg["momentum"], weight_decay=cfg["weight_decay"])
    iou_weight = cfg["iou_loss_weight"] if prompt_type in POINT_PROMPTS else 0.0

    def loss_fn(model, batch):
        with autocast(device, cfg["dtype"]):
            out = decode_batch(model, batch, prompt_type, device)
        return mask_losses(out.masks, out.iou, batch["target"].to(device), iou_weight, cfg["loss"])

    t0 = time.perf_counter()
    run = fit(module=module, optimizer=optimizer,
              train_data=lambda epoch: PromptDataset(setup.train, prompt_type, cfg["seed"], epoch),
              loss_fn=loss_fn, validate=validation_fn(setup.val, prompt_type, cfg, device),
              cfg=dict(run_settings(cfg, prompt_type, setup.backbone, setup.train.slices.signature), resume=resume),
              out_dir=run_dir, env=env, what=f"finetune {prompt_type}", kind="finetune", loss_name=loss_label(cfg))
    run["seconds"] = time.perf_counter() - t0
    return run


def mean_or_none(values: list) -> float | None:
    return float(np.mean(values)) if values else None


def run_settings(cfg: dict, prompt_type: str, backbone, slices_id: str) -> dict:
    """A finetuning run's settings, as its checkpoints and its record keep them."""
    return dict(cfg, prompt=prompt_type, backbone=backbone.key, slices_id=slices_id)


def evaluate_runs(setup, cfg: dict, res: Results, runs: dict, prompts, rt) -> list:
    """Score each prompt's best checkpoint with the Task 1 code (in the runtime `rt`, as Task 1) and write
    one record per prompt type."""
    device, backbone = setup.env.device, setup.backbone
    pretrained = PromptedDecoder.from_backbone(backbone)
    zero = zero_shot(cfg, res, backbone, rt.decoder(pretrained, "pretrained"), setup.val, device, prompts, rt.name)
    slices = tables.slices_of(setup.val.slices, setup.train.slices)
    written = []
    for prompt_type in prompts:
        finetuned, run = DiceTable(), runs[prompt_type]
        module = PromptedDecoder.from_backbone(backbone, copy_modules=True).to(device)
        module.load_state_dict(load_checkpoint(run["best"], "finetune")["model"])
        module = rt.decoder(module, "finetuned")
        t0 = time.perf_counter()
        evaluate(module, setup.val, [prompt_type], cfg["seed"], device, cfg["dtype"], cfg["decode_batch"], finetuned,
                 point_mask=cfg["point_mask"])
        result = {
            "mdice_original": float(np.mean(list(zero.per_organ[prompt_type].values()))),
            "mdice_finetuned": finetuned.mdice()[prompt_type], "per_organ_original": zero.per_organ[prompt_type],
            "per_organ_finetuned": finetuned.per_organ()[prompt_type],
            "volume_dice_finetuned": finetuned.volume_dice()[prompt_type],
            "train_seconds": round(run["seconds"], 1), "eval_seconds": round(time.perf_counter() - t0, 2),
            "trainable_params": sum(p.numel() for p in pretrained.parameters()),
            "train_samples_per_second": mean_or_none([r["samples_per_second"] for r in run["history"]
                                                      if r["samples_per_second"]]),
            "best_epoch_val_mdice": run["best_metric"], "best_epoch": run["best_epoch"], "checkpoint": run["best"],
            "history": run["history"], "zero_shot_record": zero.record}
        settings = run_settings(cfg, prompt_type, backbone, setup.train.slices.signature)
        written.append(records.write_record(res.root, "task2", settings, result, slices))
        if prompt_type in Results.CURVES:
            save_figure(curve_figure(run["history"], prompt_type, loss_label(cfg)),
                        res.figure(Results.CURVES[prompt_type]))
    return written


def train_and_evaluate(cfg: dict, env: DistEnv, res: Results, prompts: list[str], resume: dict) -> dict | None:
    """Finetune one decoder per prompt type, then Tables 2-3 (their view; None on ranks other than 0)."""
    backbone = load_backbone(cfg["model"], cfg["checkpoint"], env.device)
    rt = make_runtime(cfg, backbone, env.device)
    setup = setup_training(env, backbone, cfg["slices"], cfg["encoder_dtype"], cfg["encode_batch"], "finetuning", rt)
    runs = {p: train_prompt(setup, cfg, res, p, resume[p]) for p in prompts}
    if not setup.env.main:
        return None
    evaluate_runs(setup, cfg, res, runs, prompts, rt)
    view = tables.write_table2(res.root)
    tables.write_table3(res.root)
    return view

def main(argv=None):
    cfg = parse_config(globals(), argv)
    device = start_run(cfg)
    with flag("--prompt"):
        prompts = prompt_types_arg(cfg["prompt"])
    with flag("--loss"):
        check_choice(cfg["loss"], LOSSES, "loss")
    with flag("--point-mask"):
        check_choice(cfg["point_mask"], POINT_MASK_RULES, "point mask rule")
    res = Results(cfg["results_dir"])
    with results_folder(res.root):
        resume = {p: cfg["resume"] and precheck_resume(res.finetune_run(p), "finetune", dict(cfg, prompt=p))
                  for p in prompts}
        if cfg["resume"]:
            check_some_to_resume(resume, {p: res.finetune_run(p) for p in prompts})
        with distributed(device) as env:
            view = train_and_evaluate(cfg, env, res, prompts, resume)
        if view is None:  # not rank 0
            return
    print(markdown_table(["prompt type", "mDice original", "mDice finetuned", "improved (%)"],
                         [[p, view["mdice_original"][p], view["mdice_finetuned"][p], view["improved_pct"][p]]
                          for p in view["mdice_finetuned"]]), end="")
    print(f"wrote {res.table('table2', 'md')}")


if __name__ == "__main__":
    run_main(main)
