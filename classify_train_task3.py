"""Task 3 (training): teach SAM's decoder to say which organ it was prompted on.

    python classify_train_task3.py --slices data/slices --results-dir results
    python classify_train_task3.py --slices data/slices --results-dir results --prompt bound_box --epochs 10

Builds `modified_classifier.ClassifyingDecoder` on the Task 2 decoder finetuned with the same prompt
type (RESULTS_DIR/finetune/<prompt>/best.pt; the pretrained decoder, with a warning, when absent).
The prompt encoder and the mask/IoU parts stay frozen; the class token, its two-way transformer and
`class_prediction_head` are trained with Adam (lr 1e-5, the report's recipe) and cross-entropy on
the cached image embeddings, prompts drawn afresh each epoch. Class imbalance (adrenal glands are
under 3% of samples): the cross-entropy is weighted by inverse class frequency in the training split
(CLASS_WEIGHTING = "balanced"; "none" for the plain loss). Checkpoints: RESULTS_DIR/classifier/
{best,last}.pt with epochs.csv; the best epoch is chosen by balanced validation accuracy (the mean of the
per-organ accuracies, what the balanced loss optimises; SELECT_BY = "weighted" for plain accuracy).
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from modified_classifier import build_classifier
from sam_models import EVAL_EPOCH, PromptDataset, decode_batch
from training import checkpoint_paths, fit, load_checkpoint, run_batches, setup_training
from utils import (NUM_ORGANS, PipelineError, autocast, parse_config, prompt_types_arg, run_main, write_json)

# ---------------------------------------------------------------------------------------------- config
SLICES = "data/slices"
RESULTS_DIR = "results"
MODEL = "litemedsam"  # litemedsam | vit_b | vit_l | vit_h
CHECKPOINT = None  # backbone weights (see segmentation_task1.py)
PROMPT = "one_central_point"  # point prompts, as the report's Table 4; any contract prompt type works
FINETUNED = None  # Task 2 checkpoint; default RESULTS_DIR/finetune/<PROMPT>/best.pt
EPOCHS = 50
BATCH_SIZE = 64
LR = 1e-5  # Adam
CLASS_WEIGHTING = "balanced"  # balanced (inverse class frequency) | none
SELECT_BY = "balanced"  # best epoch by balanced (mean per-organ) | weighted (over samples) validation accuracy
GRAD_CLIP = 0.0  # > 0: clip the gradient norm before each step (0: off, as the report)
SAMPLES_PER_EPOCH = 0  # 0: every (slice, organ) of the training split each epoch
VAL_SAMPLES = 0  # 0: every validation sample for the per-epoch validation
SEED = 0
DEVICE = ""
DTYPE = "fp32"  # fp32 | bf16 autocast of the decoder
ENCODER_DTYPE = "fp32"  # fp32 | bf16 autocast of the image-encoder pass that fills the embedding cache
RESUME = False
ENCODE_BATCH = 1
DECODE_BATCH = 8
# -----------------------------------------------------------------------------------------------------


def class_weights(items, mode: str) -> torch.Tensor:
    """(13,) cross-entropy weights: inverse frequency of each organ among (slice, organ) samples,
    normalised to mean 1 over the organs present ('balanced'), or all ones ('none')."""
    if mode == "none":
        return torch.ones(NUM_ORGANS)
    if mode != "balanced":
        raise PipelineError(f"unknown --class-weighting {mode!r}; use balanced or none")
    counts = np.bincount([organ - 1 for _, organ in items], minlength=NUM_ORGANS).astype(np.float64)
    weights = np.where(counts > 0, 1.0 / np.maximum(counts, 1), 0.0)
    weights *= (counts > 0).sum() / weights.sum()
    return torch.tensor(weights, dtype=torch.float32)


def check_select_by(select_by: str) -> None:
    if select_by not in ("balanced", "weighted"):
        raise PipelineError(f"unknown --select-by {select_by!r}; use balanced or weighted")


def accuracy_metric(correct: list, organs: list, select_by: str) -> float:
    """Validation accuracy: over samples ("weighted") or the mean of the per-organ accuracies ("balanced")."""
    check_select_by(select_by)
    correct, organs = np.asarray(correct, dtype=float), np.asarray(organs)
    if select_by == "weighted":
        return float(correct.mean())
    return float(np.mean([correct[organs == o].mean() for o in np.unique(organs)]))


def class_logits(model, batch, prompt_type, device, dtype) -> torch.Tensor:
    """Class logits (B, 13) of a collated batch, without computing masks."""
    with autocast(device, dtype):
        return decode_batch(model, batch, prompt_type, device, with_masks=False)[3][0].float()


def main(argv=None):
    cfg = parse_config(globals(), argv)
    prompts = prompt_types_arg(cfg["prompt"])
    if len(prompts) != 1:
        raise PipelineError("--prompt takes one prompt type for classification")
    prompt_type = prompts[0]
    check_select_by(cfg["select_by"])  # before any work
    out = Path(cfg["results_dir"])
    last = checkpoint_paths(out / "classifier")[0]
    if cfg["resume"] and last.is_file():
        before = load_checkpoint(last)["config"].get("select_by", "weighted")
        if before != cfg["select_by"]:
            raise PipelineError(f"{last} chose its best epoch by {before} accuracy; resume with --select-by "
                                f"{before} or start again without --resume")
    env, backbone, train_cache, val_cache = setup_training(cfg, "classification")
    device = env.device
    finetuned = cfg["finetuned"] or str(out / "finetune" / prompt_type / "best.pt")
    torch.manual_seed(cfg["seed"])
    model = build_classifier(backbone, finetuned).to(device)
    trainable = model.freeze_all_but_class_branch()
    optimizer = torch.optim.Adam(trainable, lr=cfg["lr"])
    weights = class_weights(train_cache.slices.items, cfg["class_weighting"]).to(device)

    def loss_fn(m, batch):
        logits = class_logits(m, batch, prompt_type, device, cfg["dtype"])
        return F.cross_entropy(logits, batch["organ"].to(device) - 1, weight=weights, reduction="none")

    val_data = PromptDataset(val_cache, prompt_type, cfg["seed"], EVAL_EPOCH)

    def validate(m):
        m.eval()
        losses, correct, organs = [], [], []

        def step(batch):
            logits = class_logits(m, batch, prompt_type, device, cfg["dtype"])
            target = batch["organ"].to(device) - 1
            losses.extend(F.cross_entropy(logits, target, reduction="none").tolist())
            correct.extend((logits.argmax(1) == target).tolist())
            organs.extend(batch["organ"].tolist())

        run_batches(val_data, cfg["decode_batch"], step, cfg["val_samples"])
        return {"val_loss": float(np.mean(losses)), "val_metric": accuracy_metric(correct, organs, cfg["select_by"])}

    run = fit(module=model, optimizer=optimizer,
              train_data=lambda epoch: PromptDataset(train_cache, prompt_type, cfg["seed"], epoch),
              loss_fn=loss_fn, validate=validate,
              cfg=dict(cfg, prompt=prompt_type, backbone=backbone.key, finetuned=finetuned,
                       finetuned_used=Path(finetuned).is_file()),
              out_dir=out / "classifier", env=env, what=f"classify {prompt_type}", loss_name="CE loss",
              metric_name=f"{cfg['select_by']} accuracy")
    if env.main:
        write_json(out / "classifier" / "train_summary.json",
                   {"prompt": prompt_type, "best": run["best"], "last": run["last"], "best_val_accuracy": run["best_metric"],
                    "select_by": cfg["select_by"],
                    "finetuned_decoder": finetuned if Path(finetuned).is_file() else None,
                    "class_weights": weights.tolist(), "history": run["history"]})
        print(f"best validation accuracy {run['best_metric']:.4f}; checkpoint {run['best']}")


if __name__ == "__main__":
    run_main(main)
