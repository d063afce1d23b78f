"""Table 3's baselines as a library: U-Net, ResU-Net, DeepLabV3 and SwinUNETR, their data, loss, training
run on the shared loop (`sambtcv.study.training.fit`), scoring with the one Dice, and speed measurement.

Each model is a 14-class 2D segmenter (background + the 13 BTCV organs, no prompt) built by a maintained
library, never written here: MONAI ``UNet`` (U-Net; ResU-Net with residual units), torchvision
``deeplabv3_resnet50(weights=None, weights_backbone=None)`` (DeepLabV3, random weights: nothing is ever
downloaded; the grey slice is repeated to its 3 input channels) and MONAI ``SwinUNETR(spatial_dims=2)``
(the transformer; it needs the ``einops`` package). Slices are resized to a square input (area averaging
when shrinking, bilinear when enlarging; labels nearest), intensities uint8 / 255, MONAI's ``DiceCELoss``
(softmax, one-hot labels), AdamW. Scoring: logits resized back to each slice's own size, argmax, then
`sambtcv.core.metrics.DiceTable`.
"""
from __future__ import annotations

import importlib.util
import time
from dataclasses import asdict, dataclass

import cv2
import numpy as np
import torch
from torch import nn

from sambtcv.core import config
from sambtcv.core.device import autocast, sync
from sambtcv.core.distributed import DistEnv
from sambtcv.core.errors import PipelineError
from sambtcv.core.files import Results, load_checkpoint
from sambtcv.core.metrics import DiceTable
from sambtcv.core.names import NUM_ORGANS, name_list
from sambtcv.data.slices import SliceSet
from sambtcv.study.training import collate, fit, run_batches

NUM_CLASSES = NUM_ORGANS + 1  # background + the 13 organs
UNET_CHANNELS = (16, 32, 64, 128, 256)  # MONAI UNet feature maps per level (4 down-samplings by 2)
SIZE_MULTIPLE = 32  # SwinUNETR's 5 stages of patch merging need a side divisible by 2**5


# ---------------------------------------------------------------------------------------------- models
class DeepLabV3Grey(nn.Module):
    """torchvision's DeepLabV3 (ResNet-50, random weights) on a 1-channel slice; returns the logits."""

    def __init__(self, num_classes: int = NUM_CLASSES):
        super().__init__()
        from torchvision.models.segmentation import deeplabv3_resnet50

        self.net = deeplabv3_resnet50(weights=None, weights_backbone=None, num_classes=num_classes)

    def forward(self, x):
        x = x.expand(-1, 3, -1, -1)
        if self.training and x.shape[0] == 1:  # BatchNorm after ASPP's global pooling needs 2 values a channel
            return self.net(x.repeat(2, 1, 1, 1))["out"][:1]
        return self.net(x)["out"]


def _unet(num_res_units: int):
    from monai.networks.nets import UNet

    return UNet(spatial_dims=2, in_channels=1, out_channels=NUM_CLASSES, channels=UNET_CHANNELS,
                strides=(2,) * (len(UNET_CHANNELS) - 1), num_res_units=num_res_units, norm="batch")


def _swinunetr():
    from monai.networks.nets import SwinUNETR

    return SwinUNETR(in_channels=1, out_channels=NUM_CLASSES, spatial_dims=2, feature_size=24)


@dataclass(frozen=True)
class Baseline:
    """One baseline: its --model key, its Table 3 name, how it is built, and that recipe as text (kept
    in checkpoints, so a resume refuses a changed architecture)."""

    key: str
    name: str
    build: object  # () -> nn.Module mapping (B, 1, S, S) in [0, 1] to (B, NUM_CLASSES, S, S) logits
    arch: str
    needs: str = ""  # an optional package it imports


BASELINES = {b.key: b for b in (
    Baseline("unet", "U-Net", lambda: _unet(0),
             f"monai UNet(2D, channels {UNET_CHANNELS}, strides 2, num_res_units 0, batch norm)"),
    Baseline("resunet", "ResU-Net", lambda: _unet(2),
             f"monai UNet(2D, channels {UNET_CHANNELS}, strides 2, num_res_units 2, batch norm)"),
    Baseline("deeplabv3", "DeepLabV3", DeepLabV3Grey, "torchvision deeplabv3_resnet50(weights=None, "
             "weights_backbone=None), grey slice repeated to 3 channels"),
    Baseline("swinunetr", "SwinUNETR", _swinunetr, "monai SwinUNETR(spatial_dims=2, feature_size=24)", "einops"),
)}


def model_keys(value: str) -> list[str]:
    """'all' or a comma list of model keys -> keys in BASELINES' order (one line for an unknown one)."""
    return name_list(value, list(BASELINES), "baseline model")


def build_model(key: str, seed: int, device) -> nn.Module:
    """The baseline's network with weights drawn from `seed` alone (whatever ran before)."""
    torch.manual_seed(seed)
    return BASELINES[key].build().to(device)


def n_params(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


# ---------------------------------------------------------------------------------------------- settings
@dataclass(frozen=True)
class Settings:
    """One model's training settings, the profile's with the command line's replacements."""

    epochs: int
    batch_size: int
    lr: float
    samples_per_epoch: int
    val_slices: int
    input_size: int
    dtype: str
    weight_decay: float
    seed: int


def run_config(key: str, s: Settings, train: SliceSet, resume: bool) -> dict:
    """What a run's checkpoints record and a --resume must match (training.RESUMABLE may change)."""
    return {"model": key, "arch": BASELINES[key].arch, **asdict(s), "slices_id": train.signature, "resume": resume}


def check_packages(keys) -> None:
    for key in keys:
        need = BASELINES[key].needs
        if need and importlib.util.find_spec(need) is None:
            raise PipelineError(f"the baseline {key} needs the {need} package, which is not installed; "
                                f"pip install {need} (or leave {key} out)")


# ---------------------------------------------------------------------------------------------- data
def resize_image(image: np.ndarray, size: int) -> np.ndarray:
    """uint8 (H, W) -> float32 (size, size) in [0, 1]: area averaging when shrinking, bilinear otherwise."""
    interp = cv2.INTER_AREA if size * size < image.size else cv2.INTER_LINEAR
    return cv2.resize(image.astype(np.float32) / 255.0, (size, size), interpolation=interp)


def resize_label(label: np.ndarray, size: int) -> np.ndarray:
    return cv2.resize(label, (size, size), interpolation=cv2.INTER_NEAREST)


class SliceData(torch.utils.data.Dataset):
    """The slices of one split at the model's input size, read from disk per item (memory does not grow
    with the number of slices). Item: ``{"image": (1, S, S) float, "label": (1, S, S) long, "index": i}``."""

    def __init__(self, slices: SliceSet, size: int):
        self.slices, self.size = slices, size

    def __len__(self):
        return len(self.slices)

    def __getitem__(self, i: int) -> dict:
        image, label = self.slices.load(i)
        return {"image": torch.from_numpy(resize_image(image, self.size))[None],
                "label": torch.from_numpy(resize_label(label, self.size).astype(np.int64))[None], "index": i}


def nonempty_split(slices_dir, split: str, what: str) -> SliceSet:
    """A split that must hold slices; one line otherwise."""
    slices = SliceSet(slices_dir, split)
    if len(slices) == 0:
        raise PipelineError(f"the {split} split of {slices_dir} has no slices; {what}")
    return slices


# ---------------------------------------------------------------------------------------------- loss, scoring
def dice_ce_losses(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """MONAI's DiceCELoss (softmax, one-hot labels) of each sample: (B,) for logits (B, C, S, S), labels
    (B, 1, S, S). Their mean is the loss of the whole batch."""
    from monai.losses import DiceCELoss

    loss = DiceCELoss(softmax=True, to_onehot_y=True)
    logits = logits.float()
    return torch.stack([loss(logits[b:b + 1], labels[b:b + 1]) for b in range(len(logits))])


def predict_label(logits: torch.Tensor, shape) -> np.ndarray:
    """(C, S, S) logits -> (H, W) label map at the slice's own size: logits resized (bilinear), argmax."""
    big = torch.nn.functional.interpolate(logits[None].float(), size=tuple(shape), mode="bilinear", align_corners=False)
    return big[0].argmax(0).to(torch.uint8).cpu().numpy()


@dataclass
class Scores:
    """A model scored on a split: the Dice table (row = model name), mean Dice+CE loss at input size, time."""

    table: DiceTable
    loss: float
    seconds: float
    n_slices: int

    def mdice(self, name: str) -> float:
        return self.table.mdice().get(name, float("nan"))


@torch.no_grad()
def score(module: nn.Module, slices: SliceSet, name: str, size: int, device, dtype: str, batch_size: int,
          limit: int = 0) -> Scores:
    """Per-organ Dice of `module` on `slices` (`limit` evenly spread slices if > 0), each prediction at
    its slice's own size, every organ of the slice's ground truth scored."""
    module.eval()
    table, losses, seen = DiceTable(), [], []
    t0 = time.perf_counter()

    def step(batch):
        with autocast(device, dtype):
            logits = module(batch["image"].to(device))
        losses.extend(dice_ce_losses(logits, batch["label"].to(device)).tolist())
        for b, i in enumerate(batch["index"].tolist()):
            gt = slices.load_label(i)
            pred = predict_label(logits[b], gt.shape)
            for organ in sorted(map(int, slices.records[i]["organs"])):
                table.add(name, organ, slices.records[i]["case"], pred == organ, gt == organ)
            seen.append(i)

    run_batches(SliceData(slices, size), batch_size, step, limit)
    return Scores(table, float(np.mean(losses)), time.perf_counter() - t0, len(seen))


# ---------------------------------------------------------------------------------------------- training
@dataclass
class TrainedRun:
    """What training one model gave: `training.fit`'s summary plus time and throughput."""

    best: str
    best_epoch: int
    history: list
    train_seconds: float  # sum of the epochs' seconds (each epoch's validation included), over all resumes
    train_samples_per_second: float | None  # training steps alone, epochs run in this call; None if none ran


def train_model(key: str, s: Settings, train: SliceSet, val: SliceSet, res: Results, device, resume: bool,
                eval_batch: int) -> TrainedRun:
    """Train one baseline with `training.fit` (checkpoints in RESULTS_DIR/baselines/<key>/)."""
    b = BASELINES[key]
    module = build_model(key, s.seed, device)
    optimizer = adamw(module, s.lr, s.weight_decay)
    val_seconds = []

    def loss_fn(model, batch):
        with autocast(device, s.dtype):
            logits = model(batch["image"].to(device))
        return dice_ce_losses(logits, batch["label"].to(device))

    def validate(model):
        scores = score(model, val, b.name, s.input_size, device, s.dtype, eval_batch, s.val_slices)
        val_seconds.append(scores.seconds)
        return {"val_loss": scores.loss, "val_metric": scores.mdice(b.name)}

    data = SliceData(train, s.input_size)
    run = fit(module=module, optimizer=optimizer, train_data=lambda epoch: data, loss_fn=loss_fn, validate=validate,
              cfg=run_config(key, s, train, resume), out_dir=res.baseline_run(key), env=DistEnv(device=device),
              what=b.name, kind="baseline", loss_name="Dice+CE loss")
    per_epoch = min(s.samples_per_epoch, len(train)) if s.samples_per_epoch else len(train)
    ran = len(val_seconds) - (0 if resume else 1)  # epochs trained in this call (epoch 0 is validation only)
    rows = run["history"][len(run["history"]) - ran:] if ran else []
    busy = sum(r["seconds"] for r in rows) - sum(val_seconds[len(val_seconds) - ran:])
    total = sum(r["seconds"] for r in run["history"])
    return TrainedRun(run["best"], run["best_epoch"], run["history"], total,
                      round(ran * per_epoch / busy, 2) if ran and busy > 0 else None)


def adamw(module: nn.Module, lr: float, weight_decay: float):
    """AdamW with its fused kernel: one pass over the weights per step (the default loops over tensors; 10-50x
    slower on this CPU for DeepLabV3's 40 M weights)."""
    return torch.optim.AdamW(module.parameters(), lr=lr, weight_decay=weight_decay, fused=True)


def load_best(key: str, best_path, device) -> nn.Module:
    """A baseline's best weights, through files.load_checkpoint (weights_only)."""
    module = BASELINES[key].build().to(device)
    module.load_state_dict(load_checkpoint(best_path, "baseline")["model"])
    return module


# ---------------------------------------------------------------------------------------------- outputs
def model_entry(key: str, s: Settings, run: TrainedRun, scores: Scores, module: nn.Module) -> dict:
    """baselines.json's record of one model (tables.table3_rows reads mdice, params, train/infer seconds)."""
    name = BASELINES[key].name
    return {"key": key, "mdice": scores.mdice(name), "per_organ": scores.table.per_organ().get(name, {}),
            "volume_dice": scores.table.volume_dice().get(name, {}), "n_slices": scores.n_slices,
            "params": n_params(module), "train_seconds": run.train_seconds, "infer_seconds": round(scores.seconds, 2),
            "train_samples_per_second": run.train_samples_per_second,
            "infer_slices_per_second": round(scores.n_slices / scores.seconds, 2),
            "best_epoch": run.best_epoch, "best_epoch_val_mdice": next(
                r["val_metric"] for r in run.history if r["epoch"] == run.best_epoch),
            "checkpoint": run.best, "arch": BASELINES[key].arch, "settings": asdict(s)}


def eval_entry(key: str, scores: Scores) -> dict:
    name = BASELINES[key].name
    return {"mdice": scores.mdice(name), "per_organ": scores.table.per_organ().get(name, {}),
            "volume_dice": scores.table.volume_dice().get(name, {}), "n_slices": scores.n_slices,
            "infer_seconds": round(scores.seconds, 2)}


# ---------------------------------------------------------------------------------------------- speed (bench.py)
def measure_speed(models, slices_dir, device, n_samples: int = 16, batch_size: int = 8, input_size: int = 160,
                  dtype: str = "fp32", seed: int = 0) -> dict:
    """Training samples/s and inference slices/s of each baseline (--model keys) on `n_samples` training
    slices of `slices_dir`: one warm-up step, then timed AdamW steps with the DiceCE loss; inference =
    forward passes alone. Writes nothing. -> {key: {"name", "params", "train_samples_per_second",
    "infer_slices_per_second"}}."""
    device = torch.device(device)
    data = SliceData(nonempty_split(slices_dir, "train", "measure_speed needs training slices"), input_size)
    picks = [i % len(data) for i in range(max(n_samples, 1))]
    batches = [collate(data, picks[j:j + batch_size]) for j in range(0, len(picks), batch_size)]
    keys = model_keys(",".join(models) if not isinstance(models, str) else models)
    return {key: _speed(key, batches, len(picks), device, dtype, seed) for key in keys}


def _speed(key: str, batches: list, n: int, device, dtype: str, seed: int) -> dict:
    module = build_model(key, seed, device)
    optimizer = adamw(module, 1e-4, config.BASELINE_WEIGHT_DECAY)
    module.train()
    train_s = _timed(device, batches, lambda batch: _train_step(module, optimizer, batch, device, dtype))
    module.eval()
    with torch.no_grad():
        infer_s = _timed(device, batches, lambda batch: _forward(module, batch, device, dtype))
    return {"name": BASELINES[key].name, "params": n_params(module), "train_samples_per_second": round(n / train_s, 2),
            "infer_slices_per_second": round(n / infer_s, 2)}


def _forward(module, batch, device, dtype):
    with autocast(device, dtype):
        return module(batch["image"].to(device))


def _train_step(module, optimizer, batch, device, dtype):
    loss = dice_ce_losses(_forward(module, batch, device, dtype), batch["label"].to(device)).mean()
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    optimizer.step()


def _timed(device, batches, fn) -> float:
    """Seconds of fn over all batches, after one untimed warm-up call."""
    fn(batches[0])
    sync(device)
    t0 = time.perf_counter()
    for batch in batches:
        fn(batch)
    sync(device)
    return time.perf_counter() - t0
