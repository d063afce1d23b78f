"""The training loop shared by Task 2 (finetuning) and Task 3 (classification).

One loop for both: seeded per-epoch order, batches that hold many slices (each sample its own
embedding and prompt), optional data parallelism over processes with PyTorch's own engine (run the
script under ``torchrun``: gloo on CPU, NCCL on GPU; gradients are averaged by
DistributedDataParallel and only rank 0 writes), best and last checkpoints kept apart and written
atomically, exact ``--resume``, a CSV log of every epoch, and a clean stop on a NaN loss.
"""
from __future__ import annotations

import math
import os
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
from tqdm import tqdm

from utils import PipelineError, torch_save, write_csv

LOG_FIELDS = ["epoch", "train_loss", "val_loss", "val_metric", "seconds", "samples_per_second"]


@dataclass
class DistEnv:
    rank: int = 0
    world: int = 1
    device: torch.device = torch.device("cpu")

    @property
    def main(self) -> bool:
        return self.rank == 0


def init_distributed(device: torch.device) -> DistEnv:
    """Join the process group when started by torchrun (WORLD_SIZE > 1); otherwise a single process."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return DistEnv(0, 1, device)
    rank = int(os.environ["RANK"])
    if device.type == "cuda":
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
        torch.cuda.set_device(device)
    if not dist.is_initialized():
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    return DistEnv(rank, world, device)


def setup_training(cfg: dict, what: str):
    """What Task 2 and Task 3 training share before the loop: seeds and device, the process group under
    torchrun, the backbone, and filled embedding caches of both splits (only rank 0 encodes).
    Returns (env, backbone, train cache, val cache)."""
    from sam_models import load_backbone, open_cache
    from utils import start_run

    env = init_distributed(start_run(cfg))
    barrier = dist.barrier if env.world > 1 else None
    backbone = load_backbone(cfg["model"], cfg["checkpoint"], env.device)
    caches = [open_cache(cfg["slices"], split, backbone, cfg["encoder_dtype"], env.device, cfg["encode_batch"], env.main,
                         barrier)[1] for split in ("train", "val")]
    backbone.sam.image_encoder.to("cpu")  # never used in the training loop
    if not caches[0].slices.items:
        raise PipelineError(f"the train split of {cfg['slices']} has no slices; {what} needs training cases")
    return env, backbone, caches[0], caches[1]


def epoch_batches(n: int, batch_size: int, seed: int, epoch: int, env: DistEnv, limit: int = 0):
    """This rank's batches of one epoch: a seeded permutation cut into global batches, each global
    batch dealt out over the ranks. Yields (local indices, global batch size)."""
    order = np.random.default_rng([seed, epoch, 7919]).permutation(n)
    if limit:
        order = order[:limit]
    for start in range(0, len(order), batch_size):
        global_batch = order[start:start + batch_size]
        if len(global_batch) < env.world:
            break
        yield global_batch[env.rank::env.world].tolist(), len(global_batch)


def _collate(dataset, indices):
    return torch.utils.data.default_collate([dataset[i] for i in indices])


def checkpoint_paths(out_dir) -> tuple[Path, Path]:
    out_dir = Path(out_dir)
    return out_dir / "last.pt", out_dir / "best.pt"


def load_checkpoint(path) -> dict:
    path = Path(path)
    if not path.is_file():
        raise PipelineError(f"checkpoint not found: {path}")
    try:
        return torch.load(path, map_location="cpu", weights_only=False)
    except Exception as exc:
        raise PipelineError(f"cannot read checkpoint {path}: {type(exc).__name__}: {exc}") from exc


def fit(*, module, optimizer, train_data, loss_fn, validate, cfg: dict, out_dir, env: DistEnv, what: str,
        loss_name: str = "dice loss", metric_name: str = "mDice") -> dict:
    """Train `module` for cfg['epochs'] epochs; returns the history and checkpoint paths.

    train_data(epoch) -> Dataset of the epoch's samples (prompts drawn afresh per epoch);
    loss_fn(model, batch) -> per-sample losses (B,); validate(module) -> {"val_loss", "val_metric"}
    (higher val_metric is better; rank 0 only). The starting weights are validated first (epoch 0) and
    stay "best" unless an epoch beats them, so finetuning never reports worse weights than it started
    from. Checkpoints hold the module, optimiser, epoch, best metric, history and cfg.
    """
    out_dir = Path(out_dir)
    last_path, best_path = checkpoint_paths(out_dir)
    start_epoch, best, best_epoch, history = 1, -math.inf, None, []
    if cfg.get("resume"):
        if not last_path.is_file():
            raise PipelineError(f"--resume given but there is no checkpoint at {last_path}; run without --resume")
        ck = load_checkpoint(last_path)
        module.load_state_dict(ck["model"])
        optimizer.load_state_dict(ck["optimizer"])
        start_epoch, best, history = ck["epoch"] + 1, ck["best_metric"], ck["history"]
        best_epoch = ck.get("best_epoch")
        if env.main:
            print(f"{what}: resumed from {last_path} after epoch {ck['epoch']}")
    model = module
    if env.world > 1:
        model = torch.nn.parallel.DistributedDataParallel(
            module, device_ids=[env.device.index] if env.device.type == "cuda" else None, find_unused_parameters=True)

    def snapshot(epoch: int) -> dict:
        return {"model": module.state_dict(), "optimizer": optimizer.state_dict(), "epoch": epoch,
                "best_metric": best, "best_epoch": best_epoch, "history": history, "config": cfg}

    if start_epoch == 1 and env.main:  # the starting weights are a candidate for "best" too (epoch 0)
        val = validate(module)
        history.append({"epoch": 0, "train_loss": None, "val_loss": val["val_loss"], "val_metric": val["val_metric"],
                        "seconds": 0.0, "samples_per_second": None})
        best, best_epoch = val["val_metric"], 0
        torch_save(snapshot(0), best_path)
        print(f"{what} epoch 0 (start) | val {loss_name} {val['val_loss']:.4f} | val {metric_name} {best:.4f}", flush=True)
    batch_size = cfg["batch_size"]
    for epoch in range(start_epoch, cfg["epochs"] + 1):
        t0 = time.perf_counter()
        module.train()
        data = train_data(epoch)
        batches = list(epoch_batches(len(data), batch_size, cfg["seed"], epoch, env, cfg.get("samples_per_epoch", 0)))
        total, count = 0.0, 0
        bar = tqdm(batches, desc=f"{what} epoch {epoch}/{cfg['epochs']}", leave=False, disable=not env.main)
        for step, (indices, global_size) in enumerate(bar):
            batch = _collate(data, indices)
            losses = loss_fn(model, batch)
            loss = losses.sum() * env.world / global_size  # DDP averages over ranks -> mean over the global batch
            if not torch.isfinite(loss):
                raise PipelineError(f"{what}: loss became {loss.item()} at epoch {epoch} step {step}; stopped, "
                                    f"the last good checkpoint is {last_path if last_path.exists() else 'none yet'}")
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
        if env.main:
            val = validate(module)
            seconds = time.perf_counter() - t0
            row = {"epoch": epoch, "train_loss": total / max(count, 1), "val_loss": val["val_loss"],
                   "val_metric": val["val_metric"], "seconds": round(seconds, 2),
                   "samples_per_second": round(count / seconds, 2)}
            history.append(row)
            improved = row["val_metric"] > best
            if improved:
                best, best_epoch = row["val_metric"], epoch
            state = snapshot(epoch)
            torch_save(state, last_path)
            if improved:
                torch_save(state, best_path)
            write_csv(out_dir / "epochs.csv", LOG_FIELDS, [[r[k] for k in LOG_FIELDS] for r in history])
            print(f"{what} epoch {epoch} | train {loss_name} {row['train_loss']:.4f} | val {loss_name} "
                  f"{row['val_loss']:.4f} | val {metric_name} {row['val_metric']:.4f} | {seconds:.1f} s"
                  + (" | best" if improved else ""), flush=True)
        if env.world > 1:
            dist.barrier()
    if env.main and not any(r["epoch"] > 0 for r in history):
        raise PipelineError(f"{what}: nothing to train (epochs={cfg['epochs']})")
    return {"history": history, "last": str(last_path), "best": str(best_path), "best_metric": best,
            "best_epoch": best_epoch}


@torch.no_grad()
def run_batches(dataset, batch_size: int, fn, limit: int = 0) -> None:
    """Call fn(batch) on `dataset` in order, `batch_size` samples at a time (`limit` evenly spread ones if set)."""
    order = np.arange(len(dataset))
    if limit and limit < len(dataset):  # evenly spread, so that every organ and case is represented
        order = np.unique(np.linspace(0, len(dataset) - 1, limit).round().astype(int))
    for start in range(0, len(order), batch_size):
        fn(_collate(dataset, order[start:start + batch_size].tolist()))
