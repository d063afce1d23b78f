"""Task 3 (training): teach SAM's decoder to say which organ it was prompted on.

    python classify_train_task3.py --slices data/slices --results-dir results
    python classify_train_task3.py --slices data/slices --results-dir results --prompt bound_box --epochs 10

Builds `modified_classifier.ClassifyingDecoder` on the Task 2 decoder finetuned with the same prompt
type (RESULTS_DIR/finetune/<prompt>/best.pt, or --finetuned PATH; --finetuned pretrained starts from
the backbone's own decoder; a missing checkpoint is an error).
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

from sambtcv.cli import flag, make_runtime, parse_config, results_folder, run_main, start_run
from sambtcv.core import config
from sambtcv.core.device import autocast
from sambtcv.core.distributed import DistEnv, distributed
from sambtcv.core.errors import PipelineError
from sambtcv.core.files import Results, load_checkpoint
from sambtcv.core.names import NUM_ORGANS, check_choice, one_prompt_type
from sambtcv.models.backbones import load_backbone
from sambtcv.models.classifier import build_classifier
from sambtcv.models.decoder import decode_batch
from sambtcv.study import records
from sambtcv.study.evaluation import EVAL_EPOCH, PromptDataset
from sambtcv.study.tables import slices_of
from sambtcv.study.training import check_some_to_resume, fit, precheck_resume, run_batches, setup_training

# ---------------------------------------------------------------------------------------------- config
SLICES = config.SLICES  # output of preprocess.py
RESULTS_DIR = config.RESULTS_DIR  # classifier/ checkpoints go here; Task 2's are read from here
MODEL = config.MODEL  # mobilesam | litemedsam | vit_b | vit_l | vit_h
CHECKPOINT = None  # backbone weights (see segmentation_task1.py)
PROMPT = "one_central_point"  # one prompt type; point prompts, as the report's Table 4
FINETUNED = ""  # Task 2 checkpoint to start from; empty: RESULTS_DIR/finetune/<PROMPT>/best.pt; pretrained: none
EPOCHS = 50  # passes over the training samples (>= 1)
BATCH_SIZE = 64  # samples per optimiser step (>= 1)
LR = 1e-5  # Adam learning rate (>= 0)
CLASS_WEIGHTING = "balanced"  # balanced (inverse class frequency) | none
SELECT_BY = "balanced"  # best epoch by balanced (mean per-organ) | weighted (over samples) validation accuracy
GRAD_CLIP = 0.0  # > 0: clip the gradient norm before each step (0: off, as the report) (>= 0)
SAMPLES_PER_EPOCH = 0  # 0: every (slice, organ) of the training split each epoch (>= 0)
VAL_SAMPLES = 0  # 0: every validation sample for the per-epoch validation (>= 0)
SEED = config.SEED  # prompts and training order (>= 0)
DEVICE = config.DEVICE  # cpu | cuda; empty: cuda when present
DTYPE = config.DTYPE  # auto | fp32 | bf16 autocast of the decoder
ENCODER_DTYPE = config.DTYPE  # auto | fp32 | bf16 autocast of the image-encoder pass that fills the embedding cache
RUNTIME = config.RUNTIME  # auto | torch | openvino: runs the encoder that fills the cache (training: torch)
RESUME = False  # continue from RESULTS_DIR/classifier/last.pt
ENCODE_BATCH = config.ENCODE_BATCH  # slices per image-encoder pass (>= 1)
DECODE_BATCH = config.DECODE_BATCH  # prompts per decoder pass in validation (>= 1)
# -----------------------------------------------------------------------------------------------------

WEIGHTINGS = ("balanced", "none")
SELECTIONS = ("balanced", "weighted")
PRETRAINED = "pretrained"  # --finetuned value: start from the backbone's own decoder


def class_weights(items, mode: str) -> torch.Tensor:
    """(13,) cross-entropy weights: inverse frequency of each organ among (slice, organ) samples,
    normalised to mean 1 over the organs present ('balanced'), or all ones ('none')."""
    if check_choice(mode, WEIGHTINGS, "class weighting") == "none":
        return torch.ones(NUM_ORGANS)
    counts = np.bincount([organ - 1 for _, organ in items], minlength=NUM_ORGANS).astype(np.float64)
    weights = np.where(counts > 0, 1.0 / np.maximum(counts, 1), 0.0)
    weights *= (counts > 0).sum() / weights.sum()
    return torch.tensor(weights, dtype=torch.float32)


def accuracy_metric(correct: list, organs: list, select_by: str) -> float:
    """Validation accuracy: over samples ("weighted") or the mean of the per-organ accuracies ("balanced")."""
    check_choice(select_by, SELECTIONS, "select-by")
    correct, organs = np.asarray(correct, dtype=float), np.asarray(organs)
    if select_by == "weighted":
        return float(correct.mean())
    return float(np.mean([correct[organs == o].mean() for o in np.unique(organs)]))


def class_logits(model, batch, prompt_type, device, dtype) -> torch.Tensor:
    """Class logits (B, 13) of a collated batch, without computing masks."""
    with autocast(device, dtype):
        return decode_batch(model, batch, prompt_type, device, with_masks=False).class_logits.float()


def start_decoder(cfg: dict, res: Results, prompt_type: str) -> str | None:
    """The Task 2 checkpoint to start from (None: the pretrained decoder); a missing file is an error."""
    if cfg["finetuned"] == PRETRAINED:
        return None
    path = cfg["finetuned"] or str(Results.best(res.finetune_run(prompt_type)))
    if not Path(path).is_file():
        raise PipelineError(f"--finetuned {path} not found; run finetune_task2.py --prompt {prompt_type} first, "
                            f"or pass --finetuned {PRETRAINED} to start from the pretrained decoder")
    with flag("--finetuned"):
        load_checkpoint(path, "finetune")  # a file that is no Task 2 checkpoint: before any work
    return path


def validation_fn(setup, cfg: dict, prompt_type: str):
    val_data = PromptDataset(setup.val, prompt_type, cfg["seed"], EVAL_EPOCH)
    device = setup.env.device

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

    return validate


def train(cfg: dict, env: DistEnv, res: Results, prompt_type: str, finetuned: str | None) -> dict:
    backbone = load_backbone(cfg["model"], cfg["checkpoint"], env.device)
    setup = setup_training(env, backbone, cfg["slices"], cfg["encoder_dtype"], cfg["encode_batch"], "classification",
                           make_runtime(cfg, backbone, env.device))
    device = setup.env.device
    torch.manual_seed(cfg["seed"])
    model = build_classifier(setup.backbone, finetuned).to(device)
    optimizer = torch.optim.Adam(model.freeze_all_but_class_branch(), lr=cfg["lr"])
    weights = class_weights(setup.train.slices.items, cfg["class_weighting"]).to(device)

    def loss_fn(m, batch):
        logits = class_logits(m, batch, prompt_type, device, cfg["dtype"])
        return F.cross_entropy(logits, batch["organ"].to(device) - 1, weight=weights, reduction="none")

    run = fit(module=model, optimizer=optimizer,
              train_data=lambda epoch: PromptDataset(setup.train, prompt_type, cfg["seed"], epoch),
              loss_fn=loss_fn, validate=validation_fn(setup, cfg, prompt_type),
              cfg=dict(cfg, prompt=prompt_type, backbone=setup.backbone.key, finetuned_path=finetuned,
                       slices_id=setup.train.slices.signature),
              out_dir=res.classifier_run, env=setup.env, what=f"classify {prompt_type}", kind="classifier",
              loss_name="CE loss", metric_name=f"{cfg['select_by']} accuracy")
    run["class_weights"] = weights.tolist()
    run["main"] = setup.env.main
    run["config"] = dict(cfg, prompt=prompt_type, backbone=setup.backbone.key, finetuned_path=finetuned)
    run["slices"] = slices_of(setup.val.slices, setup.train.slices)
    return run


def main(argv=None):
    cfg = parse_config(globals(), argv)
    device = start_run(cfg)
    with flag("--prompt"):
        prompt_type = one_prompt_type(cfg["prompt"])
    with flag("--select-by"):  # before any work
        check_choice(cfg["select_by"], SELECTIONS, "select-by")
    with flag("--class-weighting"):
        check_choice(cfg["class_weighting"], WEIGHTINGS, "class weighting")
    res = Results(cfg["results_dir"])
    with distributed(device) as env, results_folder(res.root):
        finetuned = start_decoder(cfg, res, prompt_type)
        if cfg["resume"]:
            check_some_to_resume({"classifier": precheck_resume(res.classifier_run, "classifier",
                                                                dict(cfg, prompt=prompt_type))},
                                 {"classifier": res.classifier_run})
        run = train(cfg, env, res, prompt_type, finetuned)
        if run["main"]:
            records.write_record(res.root, "task3_train", run["config"],
                                 {"best": run["best"], "last": run["last"], "best_epoch": run["best_epoch"],
                                  "best_val_accuracy": run["best_metric"], "class_weights": run["class_weights"],
                                  "history": run["history"]}, run["slices"])
            print(f"best validation accuracy {run['best_metric']:.4f}; checkpoint {run['best']}")


if __name__ == "__main__":
    run_main(main)
