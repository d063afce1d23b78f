"""Table 3's baselines, measured here: U-Net, ResU-Net, DeepLabV3 and SwinUNETR trained on the slices.

    python baselines.py --slices S --results-dir R [--model unet,resunet,deeplabv3,swinunetr|all] [--resume]
    python baselines.py --slices data/slices --results-dir results                      # all four, full recipe
    python baselines.py --slices data/slices --results-dir results --model unet,resunet --profile quick
    python baselines.py --slices data/slices --results-dir results --model all --resume
    python baselines.py --slices data/slices --results-dir results --model unet --resume --eval-slices data/real_slices

Each model is a 14-class 2D segmenter (background + the 13 BTCV organs, no prompt) built by a maintained
library, never written here: MONAI ``UNet`` (U-Net; ResU-Net with residual units), torchvision
``deeplabv3_resnet50(weights=None, weights_backbone=None)`` (DeepLabV3, random weights: nothing is ever
downloaded; the grey slice is repeated to its 3 input channels) and MONAI ``SwinUNETR(spatial_dims=2)``
(the transformer; it needs the ``einops`` package). Every model trains from scratch on the training
split of SLICES (augmented copies that preprocess.py wrote are training slices like the others):
each slice resized to a square INPUT_SIZE (area averaging when shrinking, bilinear when enlarging;
labels nearest), intensities uint8 / 255, MONAI's ``DiceCELoss`` (softmax, one-hot labels), AdamW,
seeded order, with the project's one training loop (`training.fit`: epoch 0 = the starting weights,
best/last checkpoints in RESULTS_DIR/baselines/<model>/ with epochs.csv, exact ``--resume``, a NaN loss
stops the run). The best epoch is chosen by validation mDice on the validation split, which is also
where the table's numbers come from (the report's train/validation-only design), so read them as
optimistic. Scoring uses the project's one Dice (`utils.DiceTable`): logits resized back to each
slice's own size, argmax, then per organ over the validation slices where it is present, mean over
organs; volume Dice per organ and case. Outputs: baselines.json / .md, then Table 3
(table3_comparison.json / .md) with these rows beside the SAM row and the report's quoted rows.

Profiles (PROFILES, picked by --profile; EPOCHS, BATCH_SIZE, LR, SAMPLES_PER_EPOCH, VAL_SLICES,
INPUT_SIZE and DTYPE replace one of its values for every model when given):

* ``full`` (default): the recipe for BTCV on a GPU. Input 512 x 512 (BTCV's own size, so small organs
  keep their pixels), 100 epochs over every training slice, batch 16 (8 for SwinUNETR), AdamW lr 1e-3
  for the CNNs and 1e-4 for SwinUNETR (MONAI's BTCV tutorial), weight decay 1e-4, fp32, validation on
  every validation slice after each epoch. Not timed here (no GPU was available to measure it).
* ``quick``: what run_report.py's quick profile runs on its phantom (78 training and 26 validation
  slices of 160 x 160) on a 2-core CPU: bf16 autocast, input 160, batch 4; U-Net and ResU-Net 20 epochs
  over every slice (lr 1e-2 and 3e-3), DeepLabV3 6 and SwinUNETR 14 epochs (lr 1e-3), sized so that all
  four fit in the quick report's time budget (measured times: docs/MEASUREMENTS.md). Enough to rank the
  models on the phantom, not to quote them.
* ``smoke``: seconds per model, for the tests; its numbers mean nothing.

``--eval-slices S2`` also scores each trained model's best checkpoint on the validation split of
another slices folder (real CT, for the phantom-to-real gap); with ``--resume`` on finished runs it
trains nothing and only scores. `measure_speed` times training and inference of the models for bench.py.
"""
from __future__ import annotations

import importlib.util
import time
from dataclasses import asdict, dataclass

import cv2
import numpy as np
import torch
from torch import nn

from cli import (DEFAULT_DEVICE, DEFAULT_RESULTS_DIR, DEFAULT_SEED, DEFAULT_SLICES, PRECISIONS, PipelineError,
                 check_choice, parse_config, run_main, start_run)
from files import Results, fixed, load_checkpoint, markdown_table, read_json, results_lock, write_json, write_text
from models import autocast
from tables import data_description, write_table3
from training import DistEnv, check_some_to_resume, collate, fit, precheck_resume, run_batches
from utils import NUM_ORGANS, DiceTable, SliceSet, per_organ_markdown

# ---------------------------------------------------------------------------------------------- config
SLICES = DEFAULT_SLICES  # output of preprocess.py: models train on its train split and are scored on its val split
RESULTS_DIR = DEFAULT_RESULTS_DIR  # baselines.json/.md, Table 3 and baselines/<model>/ checkpoints go here
MODEL = "all"  # all, or a comma list of unet, resunet, deeplabv3, swinunetr
PROFILE = "full"  # full (BTCV on a GPU) | quick (run_report.py's quick profile, CPU) | smoke (tests): see PROFILES
EPOCHS = 0  # > 0: every model's passes over its training samples, instead of the profile's (>= 0)
BATCH_SIZE = 0  # > 0: slices per optimiser step for every model, instead of the profile's (>= 0)
LR = 0.0  # > 0: AdamW learning rate for every model, instead of the profile's (>= 0)
SAMPLES_PER_EPOCH = -1  # >= 0: training slices per epoch instead of the profile's; 0: all of them (>= -1)
VAL_SLICES = -1  # >= 0: evenly spread validation slices for the per-epoch validation; 0: all (>= -1)
INPUT_SIZE = 0  # > 0: side of the square model input in pixels, a multiple of 32, instead of the profile's (>= 0)
DTYPE = ""  # fp32 | bf16 autocast of training and inference; empty: the profile's
WEIGHT_DECAY = 1e-4  # AdamW weight decay (>= 0)
EVAL_BATCH = 8  # slices per forward pass when scoring (>= 1)
EVAL_SLICES = None  # also score each best checkpoint on the val split of this slices folder (e.g. real CT)
SEED = DEFAULT_SEED  # weight initialisation and training order (>= 0)
DEVICE = DEFAULT_DEVICE  # cpu | cuda; empty: cuda when present
RESUME = False  # continue each model's run from its last.pt (a model without one starts fresh)
# -----------------------------------------------------------------------------------------------------

NUM_CLASSES = NUM_ORGANS + 1  # background + the 13 organs
UNET_CHANNELS = (16, 32, 64, 128, 256)  # MONAI UNet feature maps per level (4 down-samplings by 2)
SIZE_MULTIPLE = 32  # SwinUNETR's 5 stages of patch merging need a side divisible by 2**5
RESULTS_KEY = "baselines"  # files.Results table name of baselines.json / .md
# Per-model settings of each profile ("models" keys are --model names); the module docstring says why.
PROFILES = {
    "full": {"input_size": 512, "dtype": "fp32", "models": {
        "unet": {"epochs": 100, "batch_size": 16, "lr": 1e-3, "samples_per_epoch": 0, "val_slices": 0},
        "resunet": {"epochs": 100, "batch_size": 16, "lr": 1e-3, "samples_per_epoch": 0, "val_slices": 0},
        "deeplabv3": {"epochs": 100, "batch_size": 16, "lr": 1e-3, "samples_per_epoch": 0, "val_slices": 0},
        "swinunetr": {"epochs": 100, "batch_size": 8, "lr": 1e-4, "samples_per_epoch": 0, "val_slices": 0}}},
    "quick": {"input_size": 160, "dtype": "bf16", "models": {
        "unet": {"epochs": 20, "batch_size": 4, "lr": 1e-2, "samples_per_epoch": 0, "val_slices": 0},
        "resunet": {"epochs": 20, "batch_size": 4, "lr": 3e-3, "samples_per_epoch": 0, "val_slices": 0},
        "deeplabv3": {"epochs": 6, "batch_size": 4, "lr": 1e-3, "samples_per_epoch": 0, "val_slices": 8},
        "swinunetr": {"epochs": 14, "batch_size": 4, "lr": 1e-3, "samples_per_epoch": 0, "val_slices": 8}}},
    "smoke": {"input_size": 64, "dtype": "fp32", "models": {
        key: {"epochs": 1, "batch_size": 2, "lr": 1e-3, "samples_per_epoch": 4, "val_slices": 2}
        for key in ("unet", "resunet", "deeplabv3", "swinunetr")}},
}
OVERRIDES = {"epochs": 0, "batch_size": 0, "lr": 0.0, "samples_per_epoch": -1, "val_slices": -1}  # "not given"


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
    """'all' or a comma list of --model names -> keys in BASELINES' order (one line for an unknown one)."""
    if value.strip() == "all":
        return list(BASELINES)
    names = [v.strip() for v in value.split(",") if v.strip()]
    for name in names or [value]:
        if name not in BASELINES:
            raise PipelineError(f"unknown --model {name!r}; use all or a comma list of {', '.join(BASELINES)}")
    return [k for k in BASELINES if k in names]


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

    profile: str
    epochs: int
    batch_size: int
    lr: float
    samples_per_epoch: int
    val_slices: int
    input_size: int
    dtype: str
    weight_decay: float
    seed: int


def resolve_settings(cfg: dict, key: str) -> Settings:
    """The settings `key` trains with; a bad profile, size or dtype is one line, before any work."""
    check_choice(cfg["profile"], PROFILES, "--profile")
    profile = PROFILES[cfg["profile"]]
    per_model = dict(profile["models"][key])
    for name, unset in OVERRIDES.items():
        if cfg[name] != unset:
            per_model[name] = cfg[name]
    size = cfg["input_size"] or profile["input_size"]
    if size % SIZE_MULTIPLE:
        raise PipelineError(f"--input-size must be a multiple of {SIZE_MULTIPLE} (SwinUNETR's patch merging), "
                            f"got {size}")
    dtype = check_choice(cfg["dtype"] or profile["dtype"], PRECISIONS, "--dtype")
    return Settings(cfg["profile"], int(per_model["epochs"]), int(per_model["batch_size"]), float(per_model["lr"]),
                    int(per_model["samples_per_epoch"]), int(per_model["val_slices"]), size, dtype,
                    cfg["weight_decay"], cfg["seed"])


def run_config(key: str, s: Settings, train: SliceSet, resume: bool) -> dict:
    """What a run's checkpoints record and a --resume must match (training.RESUMABLE may change)."""
    settings = {k: v for k, v in asdict(s).items() if k != "profile"}  # the values count, not the profile's name
    return {"model": key, "arch": BASELINES[key].arch, **settings, "slices_id": train.signature, "resume": resume}


def check_packages(keys) -> None:
    for key in keys:
        need = BASELINES[key].needs
        if need and importlib.util.find_spec(need) is None:
            raise PipelineError(f"--model {key} needs the {need} package, which is not installed; "
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
    module.load_state_dict(load_checkpoint(best_path, "baseline", "baseline checkpoint")["model"])
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


def merged(old: dict, new: dict) -> dict:
    """Model entries `old` updated with `new`'s, in BASELINES' order."""
    both = {**old, **new}
    order = [BASELINES[k].name for k in BASELINES]
    return {n: both[n] for n in sorted(both, key=lambda n: order.index(n) if n in order else len(order))}


def write_outputs(res: Results, result: dict) -> None:
    """baselines.json and .md, keeping other models' earlier entries computed on the same slices, then
    Table 3. A model that trained nothing in this call keeps its earlier training throughput."""
    path = res.table(RESULTS_KEY, "json")
    prev = read_json(path, "baselines table") if path.is_file() else {}
    old = prev.get("models", {}) if prev.get("slices_id") == result["slices_id"] else {}
    for name, entry in result["models"].items():
        if entry["train_samples_per_second"] is None and old.get(name, {}).get("checkpoint") == entry["checkpoint"]:
            entry["train_samples_per_second"] = old[name].get("train_samples_per_second")
    result["models"] = merged(old, result["models"])
    prev_eval = prev.get("eval_slices", {}) if old else {}
    if "eval_slices" in result:
        same = prev_eval.get("slices_id") == result["eval_slices"]["slices_id"]
        result["eval_slices"]["models"] = merged(prev_eval.get("models", {}) if same else {},
                                                 result["eval_slices"]["models"])
    elif prev_eval:
        result["eval_slices"] = prev_eval
    write_json(path, result)
    write_text(res.table(RESULTS_KEY, "md"), markdown(result))
    write_table3(res)


def markdown(result: dict) -> str:
    models = result["models"]
    rows = [[n, m["mdice"], f"{m['params'] / 1e6:.2f} M", fixed(m["train_seconds"], 0), fixed(m["infer_seconds"], 1),
             fixed(m["train_samples_per_second"], 1), fixed(m["infer_slices_per_second"], 1), m["best_epoch"],
             _settings_text(m["settings"])] for n, m in models.items()]
    text = (f"## Baselines trained here (validation split, {result['n_val_slices']} slices)\n\n"
            + markdown_table(["model", "mDice", "parameters", "train s", "inference s", "train samples/s",
                              "inference slices/s", "best epoch", "settings (epochs x samples)"], rows, "{:.4f}")
            + f"\nData: {result['data']}. Input {result['input_size']} x {result['input_size']} px, predictions "
              "resized back to each slice's own size; per-organ Dice over the slices where the organ is present.\n\n"
            + per_organ_markdown({n: m["per_organ"] for n, m in models.items()}, "### Per-organ Dice"))
    if "eval_slices" in result:
        other = result["eval_slices"]
        text += (f"\n### Best checkpoints on other slices: {other['data']} (val split, only labelled organs)\n\n"
                 + markdown_table(["model", "mDice", "slices"], [[n, m["mdice"], m["n_slices"]]
                                                               for n, m in other["models"].items()])
                 + "\n" + per_organ_markdown({n: m["per_organ"] for n, m in other["models"].items()},
                                              "#### Per-organ Dice on those slices"))
    return text


def _settings_text(s: dict) -> str:
    return (f"{s['profile']}: {s['epochs']} x {s['samples_per_epoch'] or 'all'}, batch {s['batch_size']}, "
            f"lr {s['lr']:g}, {s['dtype']}")


# ---------------------------------------------------------------------------------------------- speed (bench.py)
def measure_speed(models, slices_dir, device, n_samples: int = 16, batch_size: int = 8, input_size: int = 160,
                  dtype: str = "fp32", seed: int = DEFAULT_SEED) -> dict:
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
    optimizer = adamw(module, 1e-4, WEIGHT_DECAY)
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
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    t0 = time.perf_counter()
    for batch in batches:
        fn(batch)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return time.perf_counter() - t0


# ---------------------------------------------------------------------------------------------- main
@dataclass
class Inputs:
    """Everything checked before any work: models, their settings, and the slices."""

    keys: list
    settings: dict  # key -> Settings
    train: SliceSet
    val: SliceSet
    other: SliceSet | None  # --eval-slices' val split


def check_inputs(cfg: dict) -> Inputs:
    """Every user error of the command line, as one line, before the results folder is touched."""
    keys = model_keys(cfg["model"])
    settings = {k: resolve_settings(cfg, k) for k in keys}
    check_packages(keys)
    train = nonempty_split(cfg["slices"], "train", "the baselines need training cases")
    val = nonempty_split(cfg["slices"], "val", "the baselines are chosen and scored on validation cases")
    other = None
    if cfg["eval_slices"]:
        other = nonempty_split(cfg["eval_slices"], "val", "--eval-slices scores its val split")
    return Inputs(keys, settings, train, val, other)


def run_models(cfg: dict, inp: Inputs, res: Results, device, resume: dict) -> dict:
    """Train and score each model; the baselines.json result of this call."""
    models, others = {}, {}
    for key in inp.keys:
        s, name = inp.settings[key], BASELINES[key].name
        run = train_model(key, s, inp.train, inp.val, res, device, resume[key], cfg["eval_batch"])
        module = load_best(key, run.best, device)
        scores = score(module, inp.val, name, s.input_size, device, s.dtype, cfg["eval_batch"])
        models[name] = model_entry(key, s, run, scores, module)
        print(f"{name}: mDice {models[name]['mdice']:.4f} (best epoch {run.best_epoch}), "
              f"train {run.train_seconds:.0f} s, "
              f"inference {scores.seconds:.1f} s for {scores.n_slices} slices", flush=True)
        if inp.other is not None:
            others[name] = eval_entry(key, score(module, inp.other, name, s.input_size, device, s.dtype,
                                                 cfg["eval_batch"]))
            print(f"{name} on {cfg['eval_slices']}: mDice {others[name]['mdice']:.4f}", flush=True)
    first = inp.settings[inp.keys[0]]
    result = {"data": data_description(inp.val.params), "slices_id": inp.val.signature, "n_val_slices": len(inp.val),
              "profile": cfg["profile"], "input_size": first.input_size, "seed": cfg["seed"], "device": str(device),
              "models": models}
    if inp.other is not None:
        result["eval_slices"] = {"data": data_description(inp.other.params), "slices": str(cfg["eval_slices"]),
                                 "slices_id": inp.other.signature, "models": others}
    return result


def main(argv=None):
    cfg = parse_config(globals(), argv)
    inp = check_inputs(cfg)
    res = Results(cfg["results_dir"])
    with results_lock(res.root):
        resume = {k: cfg["resume"] and precheck_resume(res.baseline_run(k), "baseline",
                                                        run_config(k, inp.settings[k], inp.train, True))
                  for k in inp.keys}
        if cfg["resume"]:
            check_some_to_resume(resume, {k: res.baseline_run(k) for k in inp.keys})
        device = start_run(dict(cfg, dtype=inp.settings[inp.keys[0]].dtype))
        result = run_models(cfg, inp, res, device, resume)
        write_outputs(res, result)
    rows = [[n, m["mdice"], fixed(m["train_seconds"], 0), fixed(m["infer_seconds"], 1)]
            for n, m in result["models"].items()]
    print(markdown_table(["model", "mDice", "train s", "inference s"], rows), end="")
    print(f"wrote {res.table(RESULTS_KEY, 'md')} and {res.table('table3', 'md')}")


if __name__ == "__main__":
    run_main(main)
