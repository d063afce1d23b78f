"""The training loop shared by Task 2 (finetuning), Task 3 (classification) and the baselines.

One loop for all: seeded per-epoch order, batches that hold many slices, optional data parallelism
over processes with PyTorch's own engine (run the script under ``torchrun``: gloo on CPU, NCCL on
GPU; gradients are averaged by DistributedDataParallel and only rank 0 writes), a clean stop on a
NaN loss, and checkpoints that survive a kill at any moment:

* ``last.pt`` is the one commit point. It holds the model, optimiser, RNG state, epoch, history,
  config and the best weights so far; it is written (atomically) before anything else of an epoch.
* ``best.pt`` and ``epochs.csv`` are derived from it. ``--resume`` re-derives them when a kill came
  between the writes, and refuses settings that differ from the checkpoint's.
"""
from __future__ import annotations

import json
import math
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F
from tqdm import tqdm

from sambtcv.core.distributed import DistEnv
from sambtcv.core.errors import PipelineError
from sambtcv.core.files import Results, load_checkpoint, remove_stale_temps, save_checkpoint, write_csv
from sambtcv.core.metrics import iou_score

LOG_FIELDS = ["epoch", "train_loss", "val_loss", "val_metric", "seconds", "samples_per_second"]
ORDER_SALT = 7919  # mixed into the per-epoch sample order's seed, apart from the prompts' generator
# settings that may change on --resume: how long, where and how fast, never what is computed
RESUMABLE = {"epochs", "resume", "device", "decode_batch", "encode_batch", "slices", "results_dir", "checkpoint",
             "profile"}
LOSSES = ("dice", "dice_ce")


@dataclass
class TrainingSetup:
    """What Task 2 and Task 3 share before their loop."""

    env: DistEnv
    backbone: object  # sambtcv.models.backbones.Backbone
    train: object  # sambtcv.models.embeddings.SplitData
    val: object  # sambtcv.models.embeddings.SplitData


def setup_training(env: DistEnv, backbone, slices, encoder_dtype: str, encode_batch: int, what: str,
                   runtime=None) -> TrainingSetup:
    """Filled embedding caches of both splits of `slices` (the encoding shared out over the processes;
    `runtime` a `sambtcv.models.runtime.Runtime` whose encoder fills them, None for PyTorch); the image encoder
    then leaves the device."""
    from sambtcv.models.embeddings import open_split

    train, val = (open_split(slices, split, backbone, encoder_dtype, env.device, encode_batch, env, runtime)
                  for split in ("train", "val"))
    backbone.sam.image_encoder.to("cpu")  # never used in the training loop
    if not train.slices.items:
        raise PipelineError(f"the train split of {slices} has no slices; {what} needs training cases")
    return TrainingSetup(env, backbone, train, val)


def epoch_order(n: int, seed: int, epoch: int, limit: int = 0) -> np.ndarray:
    """The seeded order of an epoch's n samples (the first `limit` of it when limit > 0)."""
    order = np.random.default_rng([seed, epoch, ORDER_SALT]).permutation(n)
    return order[:limit] if limit else order


def epoch_batches(n: int, batch_size: int, seed: int, epoch: int, env: DistEnv, limit: int = 0):
    """This rank's batches of one epoch: the seeded order cut into global batches, each global batch
    dealt out over the ranks. Yields (local indices, global batch size)."""
    order = epoch_order(n, seed, epoch, limit)
    for start in range(0, len(order), batch_size):
        global_batch = order[start:start + batch_size]
        if len(global_batch) < env.world:
            break
        yield global_batch[env.rank::env.world].tolist(), len(global_batch)


def collate(dataset, indices):
    return torch.utils.data.default_collate([dataset[i] for i in indices])


@torch.no_grad()
def run_batches(dataset, batch_size: int, fn, limit: int = 0) -> None:
    """Call fn(batch) on `dataset` in order, `batch_size` samples at a time (`limit` evenly spread ones if set)."""
    order = np.arange(len(dataset))
    if limit and limit < len(dataset):  # evenly spread, so that every organ and case is represented
        order = np.unique(np.linspace(0, len(dataset) - 1, limit).round().astype(int))
    for start in range(0, len(order), batch_size):
        fn(collate(dataset, order[start:start + batch_size].tolist()))


def mask_losses(masks: torch.Tensor, iou_pred: torch.Tensor, target: torch.Tensor, iou_weight: float,
                loss: str = "dice") -> torch.Tensor:
    """Per-sample loss of SAM's decoder: the lowest mask loss over the K predicted masks (K = 1 for
    boxes) plus iou_weight x MSE between predicted and true IoU. The mask loss is MONAI's Dice loss on
    sigmoid logits ("dice"), plus the mean binary cross-entropy for "dice_ce". masks (B, K, L, L)
    logits, target (B, 1, L, L) in {0, 1}."""
    from monai.losses import DiceLoss

    masks = masks.float()
    tgt = target.expand_as(masks)
    per_mask = DiceLoss(sigmoid=True, reduction="none")(masks, tgt).flatten(1)  # (B, K)
    if loss == "dice_ce":
        per_mask = per_mask + F.binary_cross_entropy_with_logits(masks, tgt, reduction="none").flatten(2).mean(-1)
    total = per_mask.min(dim=1).values
    if masks.shape[1] > 1 and iou_weight:
        with torch.no_grad():
            b, k = masks.shape[:2]
            true_iou = iou_score(masks.reshape(b * k, -1) > 0, tgt.reshape(b * k, -1) > 0.5).reshape(b, k)
        total = total + iou_weight * ((iou_pred.float() - true_iou) ** 2).mean(dim=1)
    return total


# ---------------------------------------------------------------------------------------------- checkpoints
def plain_config(cfg: dict) -> dict:
    """The config as JSON types only (what a weights_only checkpoint may hold)."""
    return json.loads(json.dumps(cfg))


def check_resume_settings(saved: dict, cfg: dict, path, keys=None) -> None:
    """Refuse to resume a run whose settings differ from the checkpoint's (other than RESUMABLE ones), over
    `keys` (default: all of both)."""
    keys = set(saved) | set(cfg) if keys is None else set(keys)
    changed = sorted(k for k in keys if k not in RESUMABLE and saved.get(k) != cfg.get(k))
    if changed:
        diffs = ", ".join(f"{k}: {saved.get(k)!r} -> {cfg.get(k)!r}" for k in changed)
        raise PipelineError(f"cannot resume {path} with other settings ({diffs}); use the checkpoint's "
                            f"settings or start again without resuming")


def precheck_resume(run_dir, kind: str, cfg: dict) -> bool:
    """Before any expensive work: whether run_dir has a last.pt to resume, and if so, that the
    command-line settings in `cfg` match it (one line otherwise)."""
    last = Results.last(run_dir)
    if not last.is_file():
        return False
    saved = load_checkpoint(last, kind)["config"]
    check_resume_settings(saved, cfg, last, keys=cfg)
    return True


def check_some_to_resume(resumable: dict, run_dirs: dict) -> None:
    """Resuming several runs: an error when none has a checkpoint (a wrong results folder?); runs
    without one start fresh, with a note."""
    if not any(resumable.values()):
        where = ", ".join(str(Results.last(d)) for d in run_dirs.values())
        raise PipelineError(f"there is no checkpoint to resume ({where}); start again without resuming")
    for name, ok in resumable.items():
        if not ok:
            print(f"{name}: no checkpoint in {run_dirs[name]} to resume; starting it fresh", flush=True)


@dataclass
class RunState:
    """Where a training run stands; what last.pt records besides the weights."""

    epoch: int = 0
    best_metric: float = -math.inf
    best_epoch: int | None = None
    history: list = field(default_factory=list)


class Checkpoints:
    """best.pt, last.pt and epochs.csv of one run folder, kept consistent (see the module docstring)."""

    def __init__(self, run_dir, kind: str, module, optimizer, cfg: dict):
        self.dir = Path(run_dir)
        self.last, self.best = Results.last(self.dir), Results.best(self.dir)
        self.kind, self.module, self.optimizer, self.cfg = kind, module, optimizer, plain_config(cfg)
        self.best_state = None  # best weights so far (CPU copies), None while they are the current ones

    def before_epoch(self) -> None:
        """Keep a copy of the current weights when they are the best so far: the epoch will move them."""
        if self.best_state is None:
            self.best_state = {k: v.detach().cpu().clone() for k, v in self.module.state_dict().items()}

    def commit(self, state: RunState, improved: bool) -> None:
        """Write last.pt (the commit point), then best.pt when the epoch improved, then epochs.csv."""
        if improved:
            self.best_state = None
        common = {"epoch": state.epoch, "best_metric": state.best_metric, "best_epoch": state.best_epoch,
                  "history": state.history, "config": self.cfg}
        save_checkpoint(self.last, self.kind, {**common, "model": self.module.state_dict(),
                                               "optimizer": self.optimizer.state_dict(),
                                               "rng": torch.get_rng_state(), "best_model": self.best_state})
        if improved:
            self._write_best(self.module.state_dict(), state)
        self._write_log(state)

    def _write_best(self, weights: dict, state: RunState) -> None:
        save_checkpoint(self.best, self.kind, {"model": weights, "epoch": state.best_epoch,
                                               "best_metric": state.best_metric, "config": self.cfg})

    def _write_log(self, state: RunState) -> None:
        write_csv(Results.epochs_csv(self.dir), LOG_FIELDS, [[r[k] for k in LOG_FIELDS] for r in state.history])

    def resume(self) -> RunState:
        """Load last.pt into the module and optimiser; repair best.pt and epochs.csv if a kill came
        between the writes of the last committed epoch."""
        if not self.last.is_file():
            raise PipelineError(f"there is no checkpoint to resume at {self.last}; start again without resuming")
        ck = load_checkpoint(self.last, self.kind)
        check_resume_settings(ck["config"], self.cfg, self.last)
        self.module.load_state_dict(ck["model"])
        self.optimizer.load_state_dict(ck["optimizer"])
        torch.set_rng_state(ck["rng"])
        self.best_state = ck["best_model"]
        state = RunState(ck["epoch"], ck["best_metric"], ck["best_epoch"], ck["history"])
        best_epoch = None
        if self.best.is_file():
            try:
                best_epoch = load_checkpoint(self.best, self.kind).get("epoch")
            except PipelineError:  # derived from last.pt, which holds the best weights: rebuilt below
                print(f"{self.best} is unreadable; rebuilt from {self.last}", flush=True)
                best_epoch = "unreadable"
        if best_epoch != state.best_epoch:
            print(f"{self.best} held epoch {best_epoch}, {self.last} says {state.best_epoch}: rewritten", flush=True)
            self._write_best(self.best_state if self.best_state is not None else self.module.state_dict(), state)
        self._write_log(state)
        return state


# ---------------------------------------------------------------------------------------------- the loop
def fit(*, module, optimizer, train_data, loss_fn, validate, cfg: dict, out_dir, env: DistEnv, what: str,
        kind: str, loss_name: str = "dice loss", metric_name: str = "mDice") -> dict:
    """Train `module` for cfg['epochs'] epochs; returns the history, checkpoint paths and best epoch.

    train_data(epoch) -> Dataset of the epoch's samples (prompts drawn afresh per epoch);
    loss_fn(model, batch) -> per-sample losses (B,); validate(module) -> {"val_loss", "val_metric"}
    (higher val_metric is better; rank 0 only). The starting weights are validated first (epoch 0) and
    stay "best" unless an epoch beats them, so training never reports worse weights than it started
    from. `kind` names the checkpoint kind (files.CHECKPOINT_KINDS).
    """
    ck = Checkpoints(out_dir, kind, module, optimizer, cfg)
    if env.main:
        remove_stale_temps(ck.dir)
    state = ck.resume() if cfg.get("resume") else RunState()
    if cfg.get("resume") and env.main:
        print(f"{what}: resumed from {ck.last} after epoch {state.epoch}")
    model = module
    if env.world > 1:
        model = torch.nn.parallel.DistributedDataParallel(
            module, device_ids=[env.device.index] if env.device.type == "cuda" else None, find_unused_parameters=True)
    if not state.history and env.main:  # the starting weights are a candidate for "best" too (epoch 0)
        val = validate(module)
        state.history.append({"epoch": 0, "train_loss": None, "val_loss": val["val_loss"],
                              "val_metric": val["val_metric"], "seconds": 0.0, "samples_per_second": None})
        state.best_metric, state.best_epoch = val["val_metric"], 0
        ck.commit(state, improved=True)
        print(f"{what} epoch 0 (start) | val {loss_name} {val['val_loss']:.4f} | val {metric_name} "
              f"{state.best_metric:.4f}", flush=True)
    for epoch in range(state.epoch + 1, cfg["epochs"] + 1):
        t0 = time.perf_counter()
        if env.main:
            ck.before_epoch()
        total, count = train_epoch(model, optimizer, train_data(epoch), loss_fn, cfg, env, epoch, what)
        if env.main:
            end_epoch(ck, state, validate(module), epoch, total, count, time.perf_counter() - t0)
            row = state.history[-1]
            print(f"{what} epoch {epoch} | train {loss_name} {row['train_loss']:.4f} | val {loss_name} "
                  f"{row['val_loss']:.4f} | val {metric_name} {row['val_metric']:.4f} | {row['seconds']:.1f} s"
                  + (" | best" if state.best_epoch == epoch else ""), flush=True)
        env.barrier()
    if env.main and not any(r["epoch"] > 0 for r in state.history):
        raise PipelineError(f"{what}: nothing to train (epochs={cfg['epochs']})")
    return {"history": state.history, "last": str(ck.last), "best": str(ck.best), "best_metric": state.best_metric,
            "best_epoch": state.best_epoch}


def train_epoch(model, optimizer, data, loss_fn, cfg: dict, env: DistEnv, epoch: int, what: str):
    """One pass over this rank's batches; returns (summed loss, samples) over all ranks."""
    model.train()
    batches = list(epoch_batches(len(data), cfg["batch_size"], cfg["seed"], epoch, env,
                                 cfg.get("samples_per_epoch", 0)))
    total, count = 0.0, 0
    bar = tqdm(batches, desc=f"{what} epoch {epoch}/{cfg['epochs']}", leave=False, disable=None if env.main else True)
    for step, (indices, global_size) in enumerate(bar):
        losses = loss_fn(model, collate(data, indices))
        loss = losses.sum() * env.world / global_size  # DDP averages over ranks -> mean over the global batch
        if not torch.isfinite(loss):
            raise PipelineError(f"{what}: loss became {loss.item()} at epoch {epoch} step {step}; stopped, the last "
                                f"good checkpoint is the last.pt of this run (epoch {epoch - 1})")
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        if cfg.get("grad_clip"):
            torch.nn.utils.clip_grad_norm_([p for g in optimizer.param_groups for p in g["params"]], cfg["grad_clip"])
        optimizer.step()
        total += float(losses.detach().sum())
        count += len(indices)
        bar.set_postfix(loss=f"{total / max(count, 1):.4f}")
    if env.world > 1:
        stats = torch.tensor([total, count], dtype=torch.float64, device=env.device)
        dist.all_reduce(stats)
        total, count = float(stats[0]), int(stats[1])
    return total, count


def end_epoch(ck: Checkpoints, state: RunState, val: dict, epoch: int, total: float, count: int, seconds: float):
    """Record an epoch's validation, pick the best, and commit (rank 0)."""
    state.epoch = epoch
    state.history.append({"epoch": epoch, "train_loss": total / max(count, 1), "val_loss": val["val_loss"],
                          "val_metric": val["val_metric"], "seconds": round(seconds, 2),
                          "samples_per_second": round(count / seconds, 2)})
    improved = val["val_metric"] > state.best_metric
    if improved:
        state.best_metric, state.best_epoch = val["val_metric"], epoch
    ck.commit(state, improved)
