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

import numpy as np
import torch

from cache import EVAL_EPOCH, PromptDataset, SplitData, evaluate
from cli import (DEFAULT_DECODE_BATCH, DEFAULT_DEVICE, DEFAULT_DTYPE, DEFAULT_ENCODE_BATCH, DEFAULT_MODEL,
                 DEFAULT_RESULTS_DIR, DEFAULT_SEED, DEFAULT_SLICES, check_choice, check_precision, parse_config,
                 run_main)
from files import Results, load_checkpoint, results_lock, markdown_table, read_json, save_figure, write_csv, write_json, write_text
from models import PromptedDecoder, autocast, decode_batch
from tables import REPORT_FINETUNED, REPORT_ZERO_SHOT, data_description, write_table3
from training import LOSSES, check_some_to_resume, fit, mask_losses, precheck_resume, run_batches, setup_training
from utils import POINT_PROMPTS, PROMPT_TYPES, DiceTable, dice_score, per_organ_markdown, prompt_types_arg

# ---------------------------------------------------------------------------------------------- config
SLICES = DEFAULT_SLICES  # output of preprocess.py
RESULTS_DIR = DEFAULT_RESULTS_DIR  # tables, figures and finetune/<prompt>/ checkpoints go here
MODEL = DEFAULT_MODEL  # mobilesam | litemedsam | vit_b | vit_l | vit_h
CHECKPOINT = None  # backbone weights (see segmentation_task1.py)
PROMPT = "all"  # all, or prompt types as a comma list (one model each)
EPOCHS = 50  # passes over the training samples (>= 1)
BATCH_SIZE = 64  # samples (slice, organ, prompt) per optimiser step, over all processes (>= 1)
LR = 0.1  # SGD learning rate (>= 0)
MOMENTUM = 0.9  # SGD momentum (>= 0)
WEIGHT_DECAY = 1e-4  # SGD weight decay (>= 0)
LOSS = "dice"  # dice (MONAI's DiceLoss, the report's) | dice_ce (+ binary cross-entropy, MedSAM's recipe)
IOU_LOSS_WEIGHT = 0.0  # > 0: MSE of the IoU head against the true IoU, point prompts (>= 0)
GRAD_CLIP = 1.0  # > 0: clip the gradient norm before each step; 0: the report's exact recipe (>= 0)
SAMPLES_PER_EPOCH = 0  # 0: every (slice, organ) of the training split each epoch (>= 0)
VAL_SAMPLES = 0  # 0: every validation sample for the per-epoch validation (>= 0)
SEED = DEFAULT_SEED  # prompts and training order (>= 0)
DEVICE = DEFAULT_DEVICE  # cpu | cuda; empty: cuda when present
DTYPE = DEFAULT_DTYPE  # fp32 | bf16 autocast of the decoder (training and validation)
ENCODER_DTYPE = DEFAULT_DTYPE  # fp32 | bf16 autocast of the image-encoder pass that fills the embedding cache
RESUME = False  # continue each prompt's run from its last.pt (a prompt without one starts fresh)
ENCODE_BATCH = DEFAULT_ENCODE_BATCH  # slices per image-encoder pass (>= 1)
DECODE_BATCH = DEFAULT_DECODE_BATCH  # prompts per decoder pass in validation (>= 1)
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
                out = decode_batch(module, batch, prompt_type, device)
            target = batch["target"].to(device)
            losses.extend(mask_losses(out.best[:, None], out.iou[:, :1], target, 0.0, cfg["loss"]).tolist())
            dice = dice_score(out.best.float() > 0, target[:, 0] > 0.5)
            for organ, d in zip(batch["organ"].tolist(), dice.tolist()):
                per_organ.setdefault(organ, []).append(d)

        run_batches(ds, cfg["decode_batch"], step, cfg["val_samples"])
        return {"val_loss": float(np.mean(losses)), "val_metric": float(np.mean([np.mean(v) for v in per_organ.values()]))}

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


def zero_shot(cfg, res: Results, backbone, decoder, val: SplitData, device, prompts) -> dict:
    """Zero-shot per-organ Dice on the validation split: Task 1's table when it was computed on these
    very slices with these settings, else computed here."""
    t1 = res.table("table1", "json")
    if t1.is_file():
        prev = read_json(t1)
        if (prev.get("model") == backbone.name and prev.get("checkpoint") == backbone.checkpoint
                and not prev.get("finetuned") and prev.get("split") == "val" and prev.get("seed") == cfg["seed"]
                and prev.get("dtype") == cfg["dtype"] and prev.get("encoder_dtype") == cfg["encoder_dtype"]
                and prev.get("slices_id") == val.slices.signature
                and all(p in prev.get("per_organ", {}) for p in prompts)):
            return prev["per_organ"]
    return evaluate(decoder, val, prompts, cfg["seed"], device, cfg["dtype"], cfg["decode_batch"]).per_organ()


def write_tables(res: Results, result: dict) -> None:
    prompts = list(result["mdice_finetuned"])
    rows = [[p, result["mdice_original"][p], result["mdice_finetuned"][p], result["improved_pct"][p],
             result["best_epoch"].get(p), REPORT_ZERO_SHOT[p], REPORT_FINETUNED[p]] for p in prompts]
    md = (f"## Table 2: mDice of different prompts after finetuning ({result['model']}, validation split)\n\n"
          + markdown_table(["prompt type", "mDice (original)", "mDice (finetuned)", "improved (%)", "best epoch",
                            "report original", "report finetuned"], rows, "{:.4f}")
          + f"\nData: {result['data']}. Epochs: {result['epochs']}, batch {result['batch_size']}, "
            f"SGD lr {result['lr']}. Dice at each slice's own resolution. Best checkpoint by validation Dice; best "
            f"epoch 0 means no epoch beat the starting weights, which were kept.\n\n"
          + per_organ_markdown(result["per_organ_finetuned"], "### Per-organ Dice after finetuning"))
    write_json(res.table("table2", "json"), result)
    write_text(res.table("table2", "md"), md)
    write_csv(res.table("table2", "csv"), ["prompt", "mdice_original", "mdice_finetuned", "improved_pct"],
              [r[:4] for r in rows])
    write_table3(res)


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
              cfg=dict(cfg, prompt=prompt_type, backbone=setup.backbone.key, resume=resume,
                       slices_id=setup.train.slices.signature),
              out_dir=run_dir, env=env, what=f"finetune {prompt_type}", kind="finetune", loss_name=loss_label(cfg))
    run["seconds"] = time.perf_counter() - t0
    return run


def evaluate_runs(setup, cfg: dict, res: Results, runs: dict, prompts) -> dict:
    """Score each prompt's best checkpoint with the Task 1 code; the Table 2 result."""
    device, backbone = setup.env.device, setup.backbone
    pretrained = PromptedDecoder.from_backbone(backbone)
    per_organ_zero = zero_shot(cfg, res, backbone, pretrained, setup.val, device, prompts)
    finetuned, eval_seconds = DiceTable(), {}
    for prompt_type in prompts:
        module = PromptedDecoder.from_backbone(backbone, copy_modules=True).to(device)
        module.load_state_dict(load_checkpoint(runs[prompt_type]["best"], "finetune")["model"])
        t0 = time.perf_counter()
        evaluate(module, setup.val, [prompt_type], cfg["seed"], device, cfg["dtype"], cfg["decode_batch"], finetuned)
        eval_seconds[prompt_type] = round(time.perf_counter() - t0, 2)
        if prompt_type in Results.CURVES:
            save_figure(curve_figure(runs[prompt_type]["history"], prompt_type, loss_label(cfg)),
                        res.figure(Results.CURVES[prompt_type]))
    return merge_previous(res, {
        "model": backbone.name,
        "mdice_original": {p: float(np.mean(list(per_organ_zero[p].values()))) for p in prompts},
        "mdice_finetuned": finetuned.mdice(), "improved_pct": {},
        "per_organ_original": {p: per_organ_zero[p] for p in prompts}, "per_organ_finetuned": finetuned.per_organ(),
        "volume_dice_finetuned": finetuned.volume_dice(),
        "train_seconds": {p: round(runs[p]["seconds"], 1) for p in prompts}, "eval_seconds": eval_seconds,
        "trainable_params": sum(p.numel() for p in pretrained.parameters()),
        "train_samples_per_second": {p: float(np.mean([r["samples_per_second"] for r in runs[p]["history"]
                                                        if r["samples_per_second"]])) for p in prompts},
        "best_epoch_val_mdice": {p: runs[p]["best_metric"] for p in prompts},
        "best_epoch": {p: runs[p]["best_epoch"] for p in prompts},
        "epochs": cfg["epochs"], "batch_size": cfg["batch_size"], "lr": cfg["lr"], "seed": cfg["seed"],
        "dtype": cfg["dtype"], "encoder_dtype": cfg["encoder_dtype"],
        "data": data_description(setup.train.slices.params), "slices_id": setup.val.slices.signature,
        "checkpoints": {p: runs[p]["best"] for p in prompts},
    })


def merge_previous(res: Results, result: dict) -> dict:
    """Keep other prompts' rows from an earlier run of the same model on the same slices, so runs per
    prompt add up."""
    path = res.table("table2", "json")
    if path.is_file():
        prev = read_json(path)
        if prev.get("model") == result["model"] and prev.get("slices_id") == result["slices_id"]:
            for key, value in result.items():
                if isinstance(value, dict) and isinstance(prev.get(key), dict):
                    merged = {**prev[key], **value}
                    result[key] = {p: merged[p] for p in PROMPT_TYPES if p in merged}
    result["improved_pct"] = {p: 100.0 * (result["mdice_finetuned"][p] - result["mdice_original"][p])
                              / max(result["mdice_original"][p], 1e-8) for p in result["mdice_finetuned"]}
    return result


def main(argv=None):
    cfg = parse_config(globals(), argv)
    prompts = prompt_types_arg(cfg["prompt"])
    check_choice(cfg["loss"], LOSSES, "--loss")
    check_precision(cfg["dtype"])
    res = Results(cfg["results_dir"])
    with results_lock(res.root):
        resume = {p: cfg["resume"] and precheck_resume(res.finetune_run(p), "finetune", dict(cfg, prompt=p))
                  for p in prompts}
        if cfg["resume"]:
            check_some_to_resume(resume, {p: res.finetune_run(p) for p in prompts})
        setup = setup_training(cfg, "finetuning")
        runs = {p: train_prompt(setup, cfg, res, p, resume[p]) for p in prompts}
        if not setup.env.main:
            return
        result = evaluate_runs(setup, cfg, res, runs, prompts)
        write_tables(res, result)
    print(markdown_table(["prompt type", "mDice original", "mDice finetuned", "improved (%)"],
                         [[p, result["mdice_original"][p], result["mdice_finetuned"][p], result["improved_pct"][p]]
                          for p in result["mdice_finetuned"]]), end="")
    print(f"wrote {res.table('table2', 'md')}")


if __name__ == "__main__":
    run_main(main)
